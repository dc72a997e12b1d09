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

from ._display import markup_safe
from .attacks.data import batches, check_pair, is_pair

__all__ = ["robustness_report", "RobustnessReport", "ATTACKS", "DEFAULT_GRID", "parse_attack"]

FORMAT = "nnmark-robustness"
VERSION = 1
MAX_DROP = 0.05  # a "removal" that costs more clean accuracy than this left the attacker a worse model


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
    # How the attacker holds the model: "white-box" (the weights: every weight attack) or
    # "black-box" (only an API to query: extraction, evasion).
    setting: str = "white-box"
    # The runner's record carries the model to check in ``.model`` (a student, a guard)
    # instead of changing the copy it was given.
    returns_model: bool = False
    in_default: bool = True      # part of DEFAULT_GRID


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


def _run_distill(output):
    def run(model, s, ctx):
        return _attack_fn("distill")(model, ctx.train, budget=s, output=output, seed=ctx.seed, device=ctx.device)
    return run


def _run_evasion(model, s, ctx):
    from .attacks.evasion import evasion_record
    from .triggers import TriggerKey

    t0 = time.perf_counter()
    guard = _attack_fn("evasion_filter")(model, ctx.train, false_alarm=s, seed=ctx.seed)
    return evasion_record(guard, [k for k in ctx.marks if isinstance(k, TriggerKey)], time.perf_counter() - t0)


def _false_alarm(name):
    def check(s):
        if isinstance(s, bool) or not isinstance(s, _NUMBER) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"{name}: strength (the false-alarm rate on clean data) must be a number in [0, 1), "
                             f"got {s!r}")
        return float(s)
    return check


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
    # Black-box distribution: the attacker only queries the model. Not in the default grid.
    _Attack("distill", "queries (victim's top-1 labels) to train a fresh student", (100, 300, 1000),
            _int_range("distill", "queries", 1), _run_distill("labels"), needs_train=True, setting="black-box",
            returns_model=True, in_default=False),
    _Attack("distill_probs", "queries (victim's probabilities) to train a fresh student", (100, 300, 1000),
            _int_range("distill_probs", "queries", 1), _run_distill("probs"), needs_train=True, setting="black-box",
            returns_model=True, in_default=False),
    _Attack("evasion", "false-alarm rate of the API's out-of-distribution filter", (0.01, 0.05),
            _false_alarm("evasion"), _run_evasion, needs_train=True, setting="black-box", returns_model=True,
            in_default=False),
]
ATTACKS: dict[str, _Attack] = {a.name: a for a in _ALL}
"""Attack names a grid may use, with their default strengths (``ATTACKS[name].defaults``)."""

DEFAULT_GRID: dict[str, tuple] = {a.name: a.defaults for a in _ALL if a.in_default}


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
        # A record's model (a distilled student, a guard) is not part of a report.
        return {f.name: _plain(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)
                if not isinstance(getattr(obj, f.name), torch.nn.Module)}
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
            "distribution": self.distribution_table().to_dict(),
            "plots": self.plots,
        })

    @classmethod
    def from_dict(cls, d: Mapping) -> "RobustnessReport":
        """A report back from :meth:`to_dict` (e.g. ``robustness.json``), for its table."""
        known = {"format", "version", "alpha", "seed", "marks", "grid", "skipped", "rows", "summary", "distribution",
                 "plots"}
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

    def distribution_table(self, max_drop: float | None = MAX_DROP) -> DistributionTable:
        """The survey's conclusion, measured: rows = how the model is distributed (``white-box``:
        the attacker holds the weights and uses every weight attack in the grid; ``black-box``:
        it only queries an API, so extraction and evasion), columns = the marks, cells = the
        attacker's strongest attack there (does the mark still verify at alpha, and the clean
        accuracy kept). A removal counts only if the attacked model kept accuracy within
        ``max_drop`` (a fraction, default 0.05) of the unattacked one; None: any removal counts."""
        if max_drop is not None:
            max_drop = float(max_drop)
            if not 0.0 <= max_drop <= 1.0:
                raise ValueError(f"max_drop must be in [0, 1] or None, got {max_drop!r}")
        return _distribution(self, max_drop)

    def notes(self) -> list[str]:
        """Lines for people under the table: what was skipped, what failed."""
        lines = [f"skipped {s['attack']}: {s['reason']}" for s in self.skipped]
        lines += [f"{r['attack']} {_fmt_strength(r['strength'])}: {r['error']}" for r in self.rows if r.get("error")]
        return lines


# ----------------------------------------------------------------------------------------------
# The survey's conclusion as a table: how the model is distributed × each mark.

DISTRIBUTIONS = {
    "white-box": "the attacker holds the weights: every weight attack in the grid (it can query the model "
                 "too, so its best is the better of both rows)",
    "black-box": "the attacker only queries an API: model extraction and evasion",
}
# Attacks that filter queries without touching the weights: nothing to a mark read from
# the weights (a white-box verifier of the suspect holds them behind the filter).
_QUERY_FILTERS = {"evasion"}


# The survey's third attack is on the claim, not the model: measured by its own tool.
AMBIGUITY = ("ambiguity (a forged key that a model it was never embedded in verifies under) attacks the claim, "
             "not the model: measure it with nnmark.attacks.forge_key; keys committed before release "
             "(nnmark.commit, nnmark.certify) answer it")


def attack_setting(name: str) -> str:
    """``"black-box"`` for attacks that only query the model (extraction, evasion), else ``"white-box"``."""
    return ATTACKS[name].setting if name in ATTACKS else "white-box"


def _scheme(mark: dict) -> str:
    """A mark's scheme, as people name it (the table's column)."""
    kind = mark.get("trigger_kind")
    if kind is not None:
        return {"frontier": "frontier stitching"}.get(kind, f"triggers ({kind})")
    return {"WhiteBoxKey": "Uchida", "DenseKey": "Uchida (dense key)", "DeepSignsKey": "DeepSigns"}.get(
        mark.get("type"), mark.get("scheme") or mark.get("type") or "mark")


def _distribution_cell(rows: list[dict], kid: str, base_acc, max_drop: float | None) -> dict:
    """The attacker's best result against one mark among ``rows``: the removal that kept the
    most clean accuracy (within ``max_drop`` of the unattacked model), else the attack that came
    closest to removing the mark (largest p-value)."""
    ran = [r for r in rows if not r.get("error") and kid in r["marks"]]
    if not ran:
        return {"verified": None, "attack": None, "strength": None, "accuracy": None, "p_value": None,
                "attacks_run": 0, "removed_at_cost": None}

    def acc(r):
        return -1.0 if r.get("accuracy") is None else r["accuracy"]

    def affordable(r):
        return max_drop is None or base_acc is None or r.get("accuracy") is None or \
            r["accuracy"] >= base_acc - max_drop

    def p(r):
        v = r["marks"][kid].get("p_value")
        return -1.0 if v is None else v

    def removed(r):
        return not r["marks"][kid]["verified"]

    within = [r for r in ran if affordable(r)]
    if any(removed(r) for r in within):
        best, verified = max((r for r in within if removed(r)), key=acc), False
    elif within:
        best, verified = max(within, key=lambda r: (p(r), -acc(r))), True  # the closest call
    else:
        best, verified = max(ran, key=acc), True  # every attack cost more accuracy than allowed
    costly = [r for r in ran if removed(r) and not affordable(r)]
    cost = max(costly, key=acc) if costly and verified else None
    return {"verified": verified, "attack": best["attack"], "strength": best["strength"],
            "accuracy": best.get("accuracy"), "p_value": best["marks"][kid].get("p_value"), "attacks_run": len(ran),
            "removed_at_cost": None if cost is None else
            {"attack": cost["attack"], "strength": cost["strength"], "accuracy": cost.get("accuracy")}}


@dataclass
class DistributionTable:
    """How the model is distributed (rows) × each mark (columns): the strongest attack's result.

    ``cells[distribution][key_id]``: ``verified`` (True: every attack of that setting within
    ``max_drop`` of clean accuracy left the mark verifying at alpha; False: one removed it;
    None: no attack of that setting was run), ``attack``/``strength`` (the attacker's best
    attack: the removal that kept the most accuracy, or, when the mark survived, the one that
    came closest), ``accuracy`` (the clean accuracy the attacker kept there), ``p_value``,
    ``attacks_run``, ``removed_at_cost`` (a removal that cost more than ``max_drop``, if any).
    Print it with rich (``Console().print(table)``); ``to_dict()`` is ``"distribution"`` in
    ``robustness.json``.
    """

    alpha: float
    max_drop: float | None
    baseline_accuracy: float | None
    marks: list[dict]
    attacks: dict[str, list[str]]
    cells: dict[str, dict[str, dict]]
    # {key_id: {extraction attack: {"budgets", "stops_at", "student_accuracy"}}}: the smallest
    # query budget whose student no longer verifies, and that student's clean accuracy.
    extraction: dict[str, dict[str, dict]] = field(default_factory=dict)

    def __getitem__(self, distribution: str) -> dict[str, dict]:
        return self.cells[distribution]

    def to_dict(self) -> dict:
        return _plain({
            "alpha": self.alpha, "max_drop": self.max_drop, "baseline_accuracy": self.baseline_accuracy,
            "columns": [{"key_id": m["key_id"], "scheme": _scheme(m), "kind": m["kind"]} for m in self.marks],
            "rows": [{"distribution": d, "meaning": DISTRIBUTIONS[d], "attacks": self.attacks[d],
                      "cells": self.cells[d]} for d in DISTRIBUTIONS],
            "extraction": self.extraction,
            "ambiguity": AMBIGUITY,
        })

    def notes(self) -> list[str]:
        """One line per mark and extraction attack (the budget at which the mark stops
        verifying), and where ambiguity (key forging) is measured."""
        lines = []
        for m in self.marks:
            for attack, e in self.extraction.get(m["key_id"], {}).items():
                how = "top-1 labels" if attack == "distill" else "probabilities"
                budgets = ", ".join(str(b) for b in e["budgets"])
                if e["stops_at"] is None:
                    lines.append(f"{_scheme(m)} {m['key_id'][:8]}: survives extraction from {how} at every budget "
                                 f"tried ({budgets} queries)")
                else:
                    acc = "" if e["student_accuracy"] is None else \
                        f"; the student's clean accuracy there {100 * e['student_accuracy']:.1f}%"
                    lines.append(f"{_scheme(m)} {m['key_id'][:8]}: extraction from {how} removes it from "
                                 f"{e['stops_at']} queries (of {budgets}){acc}")
        return lines + [AMBIGUITY[0].upper() + AMBIGUITY[1:] + "."]

    def cell_text(self, distribution: str, kid: str) -> str:
        c = self.cells[distribution][kid]
        if c["verified"] is None:
            return "not attacked"
        word = "verifies" if c["verified"] else "removed"
        acc = "" if c["accuracy"] is None else f", acc {100 * c['accuracy']:.1f}%"
        return f"{word}\n{c['attack']} {_fmt_strength(c['strength'])}{acc}"

    def __rich__(self):
        from rich import box
        from rich.table import Table

        base = "" if self.baseline_accuracy is None else f", unattacked accuracy {100 * self.baseline_accuracy:.1f}%"
        t = Table(title=f"who can remove each mark — alpha {self.alpha:g}{base}", box=box.SIMPLE_HEAD,
                  caption="cell: does the mark still verify after the attacker's strongest attack, which one, "
                          "and the clean accuracy it kept"
                          + ("" if self.max_drop is None else f" (removals costing > {100 * self.max_drop:g} points "
                                                               "of accuracy don't count)"))
        t.add_column("distribution", no_wrap=True)
        for m in self.marks:
            t.add_column(f"{_scheme(m)}\n{m['key_id'][:8]}")
        for d in DISTRIBUTIONS:
            cells = []
            for m in self.marks:
                text = "\n".join(markup_safe(line) for line in self.cell_text(d, m["key_id"]).split("\n"))
                v = self.cells[d][m["key_id"]]["verified"]
                cells.append(text if v is None else f"[{'green' if v else 'red'}]{text}[/]")
            t.add_row(d, *cells)
        return t


def _distribution(report: "RobustnessReport", max_drop: float | None) -> DistributionTable:
    base_acc = report.rows[0].get("accuracy") if report.rows else None
    attacked = report.rows[1:]
    by = {d: [r for r in attacked if attack_setting(r["attack"]) == d] for d in DISTRIBUTIONS}
    return DistributionTable(
        alpha=report.alpha, max_drop=max_drop, baseline_accuracy=base_acc, marks=report.marks,
        attacks={d: list(dict.fromkeys(r["attack"] for r in rows)) for d, rows in by.items()},
        cells={d: {m["key_id"]: _distribution_cell(_against(rows, m), m["key_id"], base_acc, max_drop)
                   for m in report.marks} for d, rows in by.items()},
        extraction={m["key_id"]: _extraction(attacked, m["key_id"]) for m in report.marks})


def _extraction(rows: list[dict], kid: str) -> dict[str, dict]:
    """Per extraction attack, in increasing budget: the first budget whose student no longer verifies."""
    out = {}
    for attack in ("distill", "distill_probs"):
        ran = sorted((r for r in rows if r["attack"] == attack and not r.get("error") and kid in r["marks"]),
                     key=lambda r: r["strength"])
        if not ran:
            continue
        stop = next((r for r in ran if not r["marks"][kid]["verified"]), None)
        out[attack] = {"budgets": [r["strength"] for r in ran], "stops_at": None if stop is None else stop["strength"],
                       "student_accuracy": None if stop is None else stop.get("accuracy")}
    return out


def _against(rows: list[dict], mark: dict) -> list[dict]:
    """The rows that attack ``mark``: a query filter does nothing to a mark in the weights,
    and a permutation the grid also realigned is one the verifier undoes (it holds the
    original model), so only the realigned row counts."""
    realigned = {r["strength"] for r in rows if r["attack"] == "permute+realign" and not r.get("error")}
    rows = [r for r in rows if not (r["attack"] == "permute" and r["strength"] in realigned)]
    if mark["kind"] != "white-box":
        return rows
    return [r for r in rows if r["attack"] not in _QUERY_FILTERS]


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
        out = model(x)
        # A NaN row is no answer (an API that refuses the input): never right.
        correct += int(((out.argmax(1) == y) & ~out.isnan().any(1)).sum())
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
    fine-pruning, overwriting; extraction and evasion read only its inputs); without it
    those attacks are skipped and the report says so. ``test``: ``(x, y)`` for clean
    accuracy (None: accuracy not measured; a NaN output row, a refusal, counts as wrong).
    ``attacks``: the grid — ``{name: [strengths]}``, a list of ``(name, strengths)`` pairs,
    or a list of names (their default strengths); None: :data:`DEFAULT_GRID`. Names:
    ``prune_global``, ``prune_layer`` (fraction pruned), ``fine_prune`` (fraction of
    channels), ``ftal``/``ftll``/``rtll``/``rtal`` and ``overwrite`` (epochs),
    ``quantize`` (bits), ``noise`` (std relative to each tensor's), ``permute`` and
    ``permute+realign`` (0: permutation only, 1: with rescaling; realigned to
    ``reference``, by default the unattacked model) — the white-box attacks, which hold
    the weights — and the black-box ones, which only query the model (not in the default
    grid): ``distill`` / ``distill_probs`` (query budget: a fresh copy of the
    architecture trained on the model's top-1 labels / probabilities for that many of
    ``train``'s inputs; the student is what gets verified) and ``evasion`` (false-alarm
    rate: the model behind an out-of-distribution filter calibrated on ``train``'s inputs,
    refusing what it flags; verified through the filter, so trigger sets are answered only
    where the filter lets them through; a white-box mark reads the wrapped weights, which a
    black-box verifier would not hold). ``ATTACKS[name].setting`` says which. Each cell runs on a deep copy of
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
                    if ATTACKS[name].returns_model:
                        attacked = rec.model  # the student / the guard is what the owner now meets
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
        grid=[{"attack": n, "strengths": s, "strength_means": ATTACKS[n].strength, "setting": ATTACKS[n].setting}
              for n, s in grid],
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
    paths["distribution"] = plot_distribution(report.distribution_table(), out / "distribution.png")
    return paths


def plot_distribution(table: DistributionTable, path: str | os.PathLike) -> str:
    """The distribution table as a PNG: one coloured cell per (distribution, mark); green: the
    mark still verifies after the strongest attack, red: removed, grey: not attacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = list(DISTRIBUTIONS), table.marks
    fig, ax = plt.subplots(figsize=(max(7.5, 1.2 + 2.3 * len(cols)), 1.2 + 1.1 * len(rows)))
    colour = {True: "#b7e1b0", False: "#f2b0a8", None: "#dddddd"}
    for i, d in enumerate(rows):
        for j, m in enumerate(cols):
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=colour[table.cells[d][m["key_id"]]["verified"]],
                                       edgecolor="white", lw=2))
            ax.text(j + 0.5, i + 0.5, table.cell_text(d, m["key_id"]), ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([j + 0.5 for j in range(len(cols))], [f"{_scheme(m)}\n{m['key_id'][:8]}" for m in cols], fontsize=8)
    ax.set_yticks([i + 0.5 for i in range(len(rows))], rows)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    base = "" if table.baseline_accuracy is None else f"; unattacked accuracy {100 * table.baseline_accuracy:.1f}%"
    ax.set_title(f"After the attacker's strongest attack: does each mark verify at alpha {table.alpha:g}?{base}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
