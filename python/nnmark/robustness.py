"""The robustness report: marks × attacks × strengths on one model.

Every (attack, strength) cell attacks a fresh deep copy of the model (the
model passed in is never changed), then verifies every mark on the result and
measures its clean accuracy. The report holds one row per cell (the unattacked
baseline first), a per-mark summary of what removed it, and — when asked — a
``robustness.json`` and one PNG per attack. Keys appear only as their
``key_id``: a report never holds a secret.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attacks.data import batches, check_pair, is_pair

__all__ = ["robustness_report", "RobustnessReport", "ATTACKS", "DEFAULT_GRID", "parse_attack"]

FORMAT = "nnmark-robustness"
VERSION = 1


# ----------------------------------------------------------------------------------------------
# The attacks a grid can name. Each runner attacks ``model`` in place and returns its record.


@dataclass(frozen=True)
class _Attack:
    name: str
    strength: str              # what the strength means (axis label)
    defaults: tuple
    check: Callable[[Any], Any]  # validates one strength, returns it normalised
    run: Callable[..., Any]      # (model, strength, ctx) -> record
    needs_train: bool = False
    descending: bool = False     # stronger as the number falls (quantization bits)


@dataclass
class _Context:
    train: Any
    seed: int
    device: Any
    reference: torch.nn.Module | None
    marks: list


_NUMBER = (int, float, np.integer, np.floating)


def _fraction(name: str, lo_open: bool):
    def check(s):
        if isinstance(s, bool) or not isinstance(s, _NUMBER):
            raise ValueError(f"{name}: strength must be a number, got {s!r}")
        s = float(s)
        ok = (0.0 < s <= 1.0) if lo_open else (0.0 <= s <= 1.0)
        if not ok:
            raise ValueError(f"{name}: strength must be a fraction in {'(0, 1]' if lo_open else '[0, 1]'}, got {s}")
        return s
    return check


def _int_range(name: str, what: str, lo: int, hi: int | None = None):
    def check(s):
        if isinstance(s, bool) or not isinstance(s, _NUMBER) or not math.isfinite(s) or float(s) != int(s):
            raise ValueError(f"{name}: strength ({what}) must be an integer, got {s!r}")
        s = int(s)
        if s < lo or (hi is not None and s > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name}: strength ({what}) must be {rng}, got {s}")
        return s
    return check


def _nonneg(name: str):
    def check(s):
        if isinstance(s, bool) or not isinstance(s, _NUMBER):
            raise ValueError(f"{name}: strength must be a number, got {s!r}")
        s = float(s)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"{name}: strength must be a finite number >= 0, got {s}")
        return s
    return check


def _attacks_module():
    from . import attacks

    return attacks


def _attack_fn(name: str):
    fn = getattr(_attacks_module(), name, None)
    if fn is None:  # pragma: no cover - only while the suite is incomplete
        raise RuntimeError(f"nnmark.attacks.{name} is not available in this build")
    return fn


def _run_prune(scope):
    def run(model, s, ctx):
        return _attack_fn("prune_magnitude")(model, sparsity=s, scope=scope)
    return run


def _run_finetune(mode):
    def run(model, s, ctx):
        return _attack_fn("finetune")(model, ctx.train, mode=mode, epochs=s, seed=ctx.seed, device=ctx.device)
    return run


def _run_fine_prune(model, s, ctx):
    return _attack_fn("fine_prune")(model, ctx.train, fraction=s, seed=ctx.seed, device=ctx.device)


def _overwrite_target(marks):
    # The classic overwrite embeds a second white-box mark in the owner's carrier; with
    # only trigger keys, a second trigger set. The attacker's key is fresh, never the owner's.
    from .keys import WhiteBoxKeyBase

    white = [k for k in marks if isinstance(k, WhiteBoxKeyBase)]  # weights: Uchida's penalty can overwrite
    return (white or list(marks))[0]


def _run_overwrite(model, s, ctx):
    attacks = _attacks_module()
    theirs = attacks.attacker_key_like(_overwrite_target(ctx.marks), seed=ctx.seed)
    return attacks.overwrite(model, theirs, ctx.train, epochs=s, seed=ctx.seed, device=ctx.device)


def _run_quantize(model, s, ctx):
    return _attack_fn("quantize")(model, bits=s)


def _run_noise(model, s, ctx):
    return _attack_fn("gaussian_noise")(model, std=s, seed=ctx.seed)


def _run_permute(model, s, ctx):
    return _attack_fn("permute_units")(model, seed=ctx.seed, rescale=bool(s))


def _run_permute_realign(model, s, ctx):
    # The owner's defence: realign the suspect's units to the owner's reference model,
    # then extract. Both records are kept.
    attacks = _attacks_module()
    permuted = attacks.permute_units(model, seed=ctx.seed, rescale=bool(s))
    realigned = attacks.realign(model, ctx.reference)
    return {"permute": permuted, "realign": realigned}


def _permute_check(name):
    def check(s):
        if isinstance(s, bool) or not isinstance(s, _NUMBER) or float(s) not in (0.0, 1.0):
            raise ValueError(f"{name}: strength must be 0 (permutation only) or 1 (permutation and rescaling), "
                             f"got {s!r}")
        return int(s)
    return check


_ALL = [
    _Attack("prune_global", "fraction of weights pruned (global)", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
            _fraction("prune_global", False), _run_prune("global")),
    _Attack("prune_layer", "fraction of weights pruned (per layer)", (0.1, 0.3, 0.5, 0.7, 0.9),
            _fraction("prune_layer", False), _run_prune("layer")),
    _Attack("fine_prune", "fraction of channels pruned, then fine-tuned", (0.5, 0.7, 0.9),
            _fraction("fine_prune", True), _run_fine_prune, needs_train=True),
    *[_Attack(m.lower(), f"{m} epochs", (1, 3, 5), _int_range(m.lower(), "epochs", 1), _run_finetune(m),
              needs_train=True) for m in ("FTAL", "FTLL", "RTLL", "RTAL")],
    _Attack("overwrite", "epochs embedding the attacker's own mark", (1, 3, 5),
            _int_range("overwrite", "epochs", 1), _run_overwrite, needs_train=True),
    _Attack("quantize", "bits per weight", (8, 7, 6, 5, 4, 3, 2), _int_range("quantize", "bits", 2, 16),
            _run_quantize, descending=True),
    _Attack("noise", "Gaussian weight noise (std / tensor std)", (0.01, 0.05, 0.1, 0.2, 0.5, 1.0),
            _nonneg("noise"), _run_noise),
    _Attack("permute", "0: permute units, 1: permute + rescale", (0, 1), _permute_check("permute"), _run_permute),
    _Attack("permute+realign", "0: permute, 1: permute + rescale; then realign", (0, 1),
            _permute_check("permute+realign"), _run_permute_realign),
]
ATTACKS: dict[str, _Attack] = {a.name: a for a in _ALL}
"""Attack names a grid may use, with their default strengths (``ATTACKS[name].defaults``)."""

DEFAULT_GRID: dict[str, tuple] = {a.name: a.defaults for a in _ALL}


def _unknown(name) -> ValueError:
    return ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")


def normalise_grid(attacks) -> list[tuple[str, list]]:
    """The grid as ``[(name, [strength, ...]), ...]``, every name and strength checked."""
    if attacks is None:
        items = list(DEFAULT_GRID.items())
    elif isinstance(attacks, Mapping):
        items = list(attacks.items())
    elif isinstance(attacks, str) or not isinstance(attacks, Iterable):
        raise TypeError(f"attacks must be a dict {{name: [strengths]}} or a list of (name, strengths) pairs or "
                        f"names, got {type(attacks).__name__}")
    else:
        items = []
        for it in attacks:
            if isinstance(it, str):
                items.append((it, None))  # a bare name: its default strengths
            elif isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[0], str):
                items.append((it[0], it[1]))
            else:
                raise TypeError(f"attacks: each entry must be a name or a (name, strengths) pair, got {it!r}")
    if not items:
        raise ValueError("attacks: the grid is empty")
    grid, seen = [], set()
    for name, strengths in items:
        if not isinstance(name, str) or name not in ATTACKS:
            raise _unknown(name)
        if name in seen:
            raise ValueError(f"attacks: {name!r} appears twice in the grid")
        seen.add(name)
        spec = ATTACKS[name]
        if strengths is None:
            strengths = spec.defaults
        elif isinstance(strengths, _NUMBER) and not isinstance(strengths, bool):
            strengths = [strengths]
        elif isinstance(strengths, (str, bytes)) or not isinstance(strengths, Iterable):
            raise ValueError(f"{name}: strengths must be a list of numbers, got {strengths!r}")
        checked = [spec.check(s) for s in strengths]
        if not checked:
            raise ValueError(f"{name}: no strengths given")
        grid.append((name, list(dict.fromkeys(checked))))  # drop repeats, keep order
    return grid


def parse_attack(text: str) -> tuple[str, list | None]:
    """``"NAME:S1,S2,..."`` (or a bare ``"NAME"`` for its default strengths) → ``(name, strengths)``.

    Strengths are read as numbers and checked against the attack (raises ValueError)."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in ATTACKS:
        raise _unknown(name)
    if not rest.strip():
        return name, None
    values = []
    for tok in rest.split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            v = float(tok)
        except ValueError:
            raise ValueError(f"{name}: strength {tok!r} is not a number (expected e.g. {name}:"
                             f"{','.join(str(s) for s in ATTACKS[name].defaults[:3])})") from None
        values.append(int(v) if v.is_integer() and "." not in tok else v)
    if not values:
        raise ValueError(f"{name}: no strengths after ':' (expected e.g. {name}:"
                         f"{','.join(str(s) for s in ATTACKS[name].defaults[:3])})")
    return name, [ATTACKS[name].check(v) for v in values]


# ----------------------------------------------------------------------------------------------
# Making records and results JSON-safe without ever copying a key.


def _is_key(obj) -> bool:
    from .deepsigns import DeepSignsKey
    from .keys import DenseKey, WhiteBoxKey
    from .triggers import TriggerKey

    return isinstance(obj, (WhiteBoxKey, DenseKey, TriggerKey, DeepSignsKey))


def _plain(obj, depth: int = 0):
    """A JSON-safe copy: dataclasses field by field (``dataclasses.asdict`` would deep-copy,
    and keys refuse to be copied), keys as their ``key_id``, tensors as lists (summaries when
    large), non-finite floats as None, bytes never (they could be secret)."""
    if depth > 20:
        return repr(type(obj).__name__)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if _is_key(obj):
        return {"key_id": obj.key_id}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        if arr.size <= 64:
            return _plain(arr.tolist(), depth + 1)
        return {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return repr(type(obj).__name__)


# ----------------------------------------------------------------------------------------------
# The report.


def _mark_kind(key) -> str:
    from .triggers import TriggerKey

    return "black-box" if isinstance(key, TriggerKey) else "white-box"


def _mark_info(key) -> dict:
    from .deepsigns import DeepSignsKey
    from .triggers import TriggerKey

    if isinstance(key, TriggerKey):
        return {"key_id": key.key_id, "kind": "black-box", "type": "TriggerKey", "n": int(key.n),
                "trigger_kind": key.kind, "num_classes": int(key.num_classes)}
    if isinstance(key, DeepSignsKey):  # white-box: it reads a hidden layer's activations
        return {"key_id": key.key_id, "kind": "white-box", "type": "DeepSignsKey", "n": int(key.num_bits),
                "layer": key.layer, "classes": list(key.classes)}
    return {"key_id": key.key_id, "kind": "white-box", "type": type(key).__name__, "n": int(key.num_bits),
            "carrier": key.carrier, "reduction": key.reduction}


def _short(mark: dict) -> str:
    return f"{'wb' if mark['kind'] == 'white-box' else 'bb'}:{mark['key_id'][:6]}"


def _fmt_p(p) -> str:
    return "—" if p is None or p != p else f"{p:.2g}"


def _fmt_strength(s) -> str:
    if isinstance(s, float):
        return f"{s:g}"
    return str(s)


@dataclass
class RobustnessReport:
    """What :func:`robustness_report` found.

    ``rows``: one dict per cell, the unattacked baseline first (attack ``"baseline"``,
    strength 0): ``attack``, ``strength``, ``accuracy`` (None without test data),
    ``marks`` ({key_id: {verified, p_value, ber, match_rate, matches, n, status}}),
    ``record`` (what the attack did), ``seconds`` (the whole cell), ``attack_seconds``,
    ``error`` (None, or why the attack failed on this model). ``marks``: one dict per
    key (key_id, kind, n — never the secret). ``skipped``: attacks not run, with why.
    ``plots``: the PNGs written, by attack.
    """

    rows: list[dict]
    marks: list[dict]
    alpha: float
    seed: int
    grid: list[dict]
    skipped: list[dict] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    json_path: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def baseline(self) -> dict:
        return self.rows[0]

    def _mark_id(self, mark) -> str:
        if isinstance(mark, int) and not isinstance(mark, bool):
            if not 0 <= mark < len(self.marks):
                raise ValueError(f"mark index {mark} out of range: the report has {len(self.marks)} marks")
            return self.marks[mark]["key_id"]
        kid = mark if isinstance(mark, str) else getattr(mark, "key_id", None)
        if kid not in {m["key_id"] for m in self.marks}:
            raise ValueError(f"mark {kid!r} is not in this report (key_ids: {[m['key_id'] for m in self.marks]})")
        return kid

    def survives(self, mark=0) -> dict[str, dict]:
        """Per attack, for ``mark`` (a key, its key_id or its index): ``survives`` (verified at
        every strength tried), ``removed_at`` (the first strength, in the order tried, at which
        it no longer verifies, or None) and ``accuracy_there`` (the clean accuracy left there).
        ``survives`` is None for an attack that failed to run at every strength."""
        kid = self._mark_id(mark)
        out: dict[str, dict] = {}
        for r in self.rows[1:]:
            s = out.setdefault(r["attack"], {"survives": None, "removed_at": None, "accuracy_there": None})
            if r.get("error"):
                continue  # the attack did not run: says nothing about the mark
            if s["survives"] is None:
                s["survives"] = True
            m = r["marks"].get(kid)
            ok = bool(m and m["verified"])
            if not ok and s["removed_at"] is None:
                s["survives"] = False
                s["removed_at"] = r["strength"]
                s["accuracy_there"] = r["accuracy"]
        return out

    def to_dict(self) -> dict:
        return _plain({
            "format": FORMAT, "version": VERSION, "alpha": self.alpha, "seed": self.seed, **self.meta,
            "marks": self.marks, "grid": self.grid, "skipped": self.skipped, "rows": self.rows,
            "summary": {m["key_id"]: self.survives(m["key_id"]) for m in self.marks},
            "plots": self.plots,
        })

    @classmethod
    def from_dict(cls, d: Mapping) -> "RobustnessReport":
        """A report back from :meth:`to_dict` (e.g. ``robustness.json``), for its table."""
        known = {"format", "version", "alpha", "seed", "marks", "grid", "skipped", "rows", "summary", "plots"}
        return cls(rows=list(d["rows"]), marks=list(d["marks"]), alpha=float(d["alpha"]), seed=int(d["seed"]),
                   grid=list(d.get("grid", [])), skipped=list(d.get("skipped", [])), plots=dict(d.get("plots", {})),
                   meta={k: v for k, v in d.items() if k not in known})

    def table(self, title: str | None = None):
        """A rich Table for people: one row per attack × strength; per mark whether it
        verified and its p-value, then its BER (white-box) or trigger hit rate (black-box);
        the attacked model's clean accuracy last."""
        from rich import box
        from rich.table import Table

        t = Table(title=title or f"nnmark robustness — alpha {self.alpha:g}, seed {self.seed}",
                  box=box.SIMPLE_HEAD, pad_edge=False, caption="per mark: verified? p-value; BER or trigger hits")
        t.add_column("attack", no_wrap=True)
        t.add_column("strength", justify="right", no_wrap=True)
        for m in self.marks:
            t.add_column(_short(m), no_wrap=True)
            t.add_column("BER" if m["kind"] == "white-box" else "hits", justify="right", no_wrap=True)
        t.add_column("acc.", justify="right", no_wrap=True)
        prev = None
        for r in self.rows:
            cells = [r["attack"] if r["attack"] != prev else "", "—" if r["attack"] == "baseline"
                     else _fmt_strength(r["strength"])]
            prev = r["attack"]
            for m in self.marks:
                v = r["marks"].get(m["key_id"])
                if r.get("error") or v is None:
                    cells += ["[red]error[/red]", "—"]
                elif v["status"] != "ok":
                    cells += [f"[red]{v['status']}[/red]", "—"]
                else:
                    verdict = "[green]yes[/green]" if v["verified"] else "[yellow]no[/yellow] "
                    cells.append(f"{verdict} {_fmt_p(v['p_value'])}")
                    cells.append(f"{v['ber']:.2f}" if m["kind"] == "white-box" else f"{v['match_rate']:.0%}")
            acc = r.get("accuracy")
            cells.append("—" if acc is None else f"{100 * acc:.1f}%")
            t.add_row(*cells, end_section=r["attack"] == "baseline")
        return t

    def notes(self) -> list[str]:
        """Lines for people under the table: what was skipped, what failed."""
        lines = [f"skipped {s['attack']}: {s['reason']}" for s in self.skipped]
        lines += [f"{r['attack']} {_fmt_strength(r['strength'])}: {r['error']}" for r in self.rows if r.get("error")]
        return lines


def _materialise(data, what: str):
    """(x, y) tensors checked; a one-shot iterator read into a list (the grid reuses it)."""
    if data is None:
        return None
    if is_pair(data):
        return check_pair(data, what)
    if isinstance(data, (str, bytes, torch.Tensor, np.ndarray)) or not isinstance(data, Iterable):
        raise TypeError(f"{what} must be an (x, y) pair of tensors or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}")
    if iter(data) is data:
        data = list(data)
    return data


@torch.no_grad()
def _accuracy(model: torch.nn.Module, test) -> float:
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    correct = total = 0
    for x, y in batches(test, batch_size=1024, device=dev, what="test"):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def _verdicts(marks, model, alpha) -> dict:
    from .verdicts import verify

    out = {}
    for key in marks:
        v = verify(key, model, alpha=alpha)
        n = int(v.bits)
        ok = v.status == "ok"
        out[key.key_id] = {
            "verified": bool(v.verified), "p_value": v.p_value if ok else None,
            "ber": v.ber if ok else None, "match_rate": (v.matches / n) if ok else None,
            "matches": int(v.matches) if ok else None, "n": n, "threshold": int(v.threshold), "status": v.status,
            **({"detail": v.detail} if not ok else {}),
        }
    return out


class _Progress:
    """A rich progress bar (progress=True), a callable ``progress(done, total, description)``, or nothing."""

    def __init__(self, progress, total: int):
        self.fn = progress if callable(progress) else None
        self.bar = None
        self.total = total
        self.done = 0
        if progress is True:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.task = self.bar.add_task("robustness", total=total)
            self.bar.start()

    def start(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=desc)
        if self.fn is not None:
            self.fn(self.done, self.total, desc)

    def advance(self, desc: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=desc)
        if self.fn is not None:
            self.fn(self.done, self.total, desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_secrets(text: str, marks) -> None:
    # Belt and braces: a report must never carry a key's secret (only key_ids).
    for k in marks:
        secret = getattr(k, "_secret", None)
        if secret and secret.hex() in text:  # pragma: no cover - would be a bug
            raise RuntimeError(f"refusing to write a report containing the secret of key {k.key_id}")


def robustness_report(model: torch.nn.Module, marks, train=None, test=None, attacks=None,
                      out_dir: str | os.PathLike | None = None, alpha: float = 1e-6, seed: int = 0, device=None,
                      progress=True, reference: torch.nn.Module | None = None) -> RobustnessReport:
    """Runs a grid of attacks × strengths on copies of ``model`` and verifies every mark after each.

    ``marks``: a key or a list of keys (WhiteBoxKey, DenseKey, TriggerKey, DeepSignsKey), each checked
    with :func:`nnmark.verify` at ``alpha``. ``train``: the attacker's data, an ``(x, y)``
    pair or an iterable of batches, used by the training attacks (fine-tuning,
    fine-pruning, overwriting); without it those attacks are skipped and the report says
    so. ``test``: ``(x, y)`` for clean accuracy (None: accuracy not measured).
    ``attacks``: the grid — ``{name: [strengths]}``, a list of ``(name, strengths)`` pairs,
    or a list of names (their default strengths); None: :data:`DEFAULT_GRID`. Names:
    ``prune_global``, ``prune_layer`` (fraction pruned), ``fine_prune`` (fraction of
    channels), ``ftal``/``ftll``/``rtll``/``rtal`` and ``overwrite`` (epochs),
    ``quantize`` (bits), ``noise`` (std relative to each tensor's), ``permute`` and
    ``permute+realign`` (0: permutation only, 1: with rescaling; realigned to
    ``reference``, by default the unattacked model). Each cell runs on a deep copy of
    ``model`` (moved to ``device`` if given) with torch's RNG seeded from ``seed``;
    ``model`` itself is never changed. ``out_dir``: write ``robustness.json`` and one PNG
    per attack there. ``progress``: True for a progress bar on stderr, False for none,
    or a callable ``progress(done, total, description)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"robustness_report needs a torch.nn.Module, got {type(model).__name__}")
    keys = list(marks) if isinstance(marks, (list, tuple)) else [marks]
    if not keys:
        raise ValueError("marks: give at least one key")
    for k in keys:
        if not _is_key(k):
            raise TypeError(f"marks must be keys (WhiteBoxKey, DenseKey, TriggerKey or DeepSignsKey), got "
                            f"{type(k).__name__}")
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise ValueError("marks: the same key is given twice")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not (progress is True or progress is False or progress is None or callable(progress)):
        raise TypeError(f"progress must be True, False or a callable(done, total, description), got {progress!r}")
    if reference is not None and not isinstance(reference, torch.nn.Module):
        raise TypeError(f"reference must be a torch.nn.Module, got {type(reference).__name__}")
    grid = normalise_grid(attacks)
    train = _materialise(train, "train")
    test = _materialise(test, "test")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but no CUDA device is available")

    skipped = []
    runnable = []
    for name, strengths in grid:
        if ATTACKS[name].needs_train and train is None:
            skipped.append({"attack": name, "strengths": strengths,
                            "reason": "needs training data (the attacker's data); none was given"})
        else:
            runnable.append((name, strengths))

    def fresh() -> torch.nn.Module:
        m = copy.deepcopy(model)
        return m.to(device) if device is not None else m

    # A copy: realignment reads the reference, and the caller's model must stay as it was.
    ref = (fresh() if reference is None else copy.deepcopy(reference)).eval()
    if device is not None:
        ref = ref.to(device)
    ctx = _Context(train=train, seed=seed, device=device, reference=ref, marks=keys)

    cells = [(name, s) for name, strengths in runnable for s in strengths]
    bar = _Progress(progress if progress is not None else False, total=len(cells) + 1)
    start = time.perf_counter()
    rows: list[dict] = []
    try:
        bar.start("baseline")
        t0 = time.perf_counter()
        base = fresh()
        rows.append({"attack": "baseline", "strength": 0, "accuracy": _accuracy(base, test) if test is not None
                     else None, "marks": _verdicts(keys, base, alpha), "record": None, "attack_seconds": 0.0,
                     "seconds": time.perf_counter() - t0, "error": None})
        del base
        bar.advance("baseline")
        for name, s in cells:
            desc = f"{name} {_fmt_strength(s)}"
            bar.start(desc)
            t0 = time.perf_counter()
            attacked = fresh()
            row = {"attack": name, "strength": s}
            with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG left as it was
                torch.manual_seed(seed)
                try:
                    rec = ATTACKS[name].run(attacked, s, ctx)
                    row["error"] = None
                except (ValueError, TypeError, RuntimeError) as exc:
                    # This attack cannot run on this model (e.g. no conv layer to fine-prune):
                    # an error row, not a crashed grid.
                    rec, row["error"] = None, f"{type(exc).__name__}: {exc}"
            row["attack_seconds"] = time.perf_counter() - t0
            if row["error"] is None:
                attacked.eval()
                row["accuracy"] = _accuracy(attacked, test) if test is not None else None
                row["marks"] = _verdicts(keys, attacked, alpha)
            else:
                row["accuracy"], row["marks"] = None, {}
            row["record"] = _plain(rec)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            del attacked
            bar.advance(desc)
    finally:
        bar.close()

    n_train = None
    if train is not None and is_pair(train):
        n_train = len(train[0])
    report = RobustnessReport(
        rows=_plain(rows), marks=[_mark_info(k) for k in keys], alpha=alpha, seed=seed,
        grid=[{"attack": n, "strengths": s, "strength_means": ATTACKS[n].strength} for n, s in grid],
        skipped=_plain(skipped),
        meta={"model": {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())},
              "train_samples": n_train, "test_samples": len(test[0]) if test is not None and is_pair(test) else None,
              "device": str(device) if device is not None else None,
              "seconds": time.perf_counter() - start})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.plots = plot_report(report, out)
        report.meta["seconds"] = time.perf_counter() - start  # the plots included
        text = json.dumps(report.to_dict(), indent=1) + "\n"
        _check_secrets(text, keys)
        (out / "robustness.json").write_text(text)
        report.json_path = str(out / "robustness.json")
    return report


# ----------------------------------------------------------------------------------------------
# Plots.


def _file_name(attack: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", attack) + ".png"


def _neglog10(p) -> float:
    if p is None:
        return float("nan")
    return -math.log10(max(float(p), 1e-300))  # p can underflow to 0: cap at 300


def plot_report(report: RobustnessReport, out_dir: str | os.PathLike) -> dict[str, str]:
    """One PNG per attack in ``out_dir``: −log10 p and BER (white-box) / 1 − hit rate (black-box)
    against strength for every mark, with the alpha line; clean accuracy in a panel beside."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    base = report.rows[0]
    paths: dict[str, str] = {}
    by_attack: dict[str, list[dict]] = {}
    for r in report.rows[1:]:
        by_attack.setdefault(r["attack"], []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for attack, rows in by_attack.items():
        rows = sorted(rows, key=lambda r: r["strength"])
        xs = [r["strength"] for r in rows]
        fig, (ax_p, ax_e, ax_a) = plt.subplots(1, 3, figsize=(13, 3.8))
        for i, m in enumerate(report.marks):
            kid, c = m["key_id"], colors[i % len(colors)]
            label = f"{m['kind']} {kid[:8]}"
            ps = [_neglog10(r["marks"].get(kid, {}).get("p_value")) for r in rows]
            es = [r["marks"].get(kid, {}).get("ber") for r in rows]
            es = [float("nan") if e is None else e for e in es]
            ax_p.plot(xs, ps, "o-", color=c, label=label)
            ax_e.plot(xs, es, "o-", color=c, label=label)
            b = base["marks"].get(kid, {})
            if b.get("p_value") is not None:
                ax_p.axhline(_neglog10(b["p_value"]), color=c, ls=":", lw=1)
            if b.get("ber") is not None:
                ax_e.axhline(b["ber"], color=c, ls=":", lw=1)
        ax_p.axhline(-math.log10(report.alpha), color="red", ls="--", lw=1, label=f"alpha = {report.alpha:g}")
        ax_p.set_ylabel("−log10 p-value (higher: stronger evidence)")
        ax_p.set_ylim(bottom=0)
        ax_e.axhline(0.5, color="gray", ls="--", lw=1, label="chance (white-box)")
        ax_e.set_ylabel("BER (white-box) / 1 − hit rate (black-box)")
        ax_e.set_ylim(-0.02, 1.02)
        accs = [float("nan") if r["accuracy"] is None else r["accuracy"] for r in rows]
        ax_a.plot(xs, accs, "s-", color="black", label="attacked")
        if base.get("accuracy") is not None:
            ax_a.axhline(base["accuracy"], color="black", ls=":", lw=1, label="unattacked")
        ax_a.set_ylabel("clean accuracy")
        ax_a.set_ylim(-0.02, 1.02)
        spec = ATTACKS.get(attack)
        for ax in (ax_p, ax_e, ax_a):
            ax.set_xlabel(spec.strength if spec else "strength")
            ax.grid(alpha=0.3)
            if spec is not None and spec.descending:
                ax.invert_xaxis()  # fewer bits = a stronger attack, to the right
            if len(set(xs)) <= 10:
                ax.set_xticks(sorted(set(xs)))
        ax_p.legend(fontsize=7, loc="best")
        ax_e.legend(fontsize=7, loc="best")
        ax_a.legend(fontsize=7, loc="best")
        fig.suptitle(f"{attack}: watermark evidence and clean accuracy (dotted: unattacked)")
        fig.tight_layout()
        path = out / _file_name(attack)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths[attack] = str(path)
    return paths
