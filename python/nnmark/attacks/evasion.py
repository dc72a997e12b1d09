"""Evasion: an API that will not answer queries that look unusual.

A thief who serves a stolen model can put an out-of-distribution detector in front of
it: ordinary queries are answered, inputs the detector flags (trigger images look like
nothing in the task) are refused or answered at random, so the owner's trigger set gets
no answer (Hitaj et al. 2019; Namba and Sakuma 2019). :func:`evasion_filter` builds such
a guard from the model itself and the attacker's clean data, with a threshold set so
that only a chosen fraction of clean inputs is flagged.

The default detector is the deep-nearest-neighbour score (Sun et al. 2022): the cosine
distance from an input's penultimate features (the input of the last ``nn.Linear``) to
its k-th nearest clean input. Measured by ``benchmarks/bench_extraction.py`` on digits
models that learnt their trigger sets in training, at 1% false alarms on the training
data (1.3-2.9% on held-out digits): it answers 0 of 100 abstract and unrelated triggers,
6 of 100 content and 33 of 100 noise triggers. Max-softmax and energy let most triggers
through (46-100 and 23-100 of 100: the model is confident on what it learnt) at higher
held-out false alarms; they are there to compare with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._threads import small_work_threads
from .data import collect_inputs
from .finetune import check_int, check_model, module_named

SCORES = ("knn", "msp", "energy")
MODES = ("refuse", "random")


@dataclass
class EvasionRecord:
    """What the robustness report's ``evasion`` attack built: the guard's detector
    (``score``, ``layer``, ``k``), its ``threshold`` at ``false_alarm``, how many clean
    inputs it holds (``reference``) and what fraction of the calibration inputs it flags
    (``clean_flagged``, leave-one-out for ``knn``), and per trigger mark (by key_id) how many of its ``n`` triggers
    the guard still answers (``answered``). ``model``: the guard."""

    attack: str
    false_alarm: float
    threshold: float
    score: str
    mode: str
    layer: str | None
    k: int | None
    reference: int
    clean_flagged: float
    answered: dict = field(default_factory=dict)
    seconds: float = 0.0
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)


class EvasionGuard(torch.nn.Module):
    """A model behind an out-of-distribution filter (made by :func:`evasion_filter`).

    ``guard(x)`` runs the wrapped model once on the batch and scores every input; inputs
    whose score exceeds ``threshold`` are *flagged*: with ``mode="refuse"`` their output
    row is NaN — no answer, as an API that returns an error (nnmark's verifier counts a
    NaN row as a miss, and so does a top-1 reader that checks for it); with
    ``mode="random"`` the row keeps the model's logits but its top logit is swapped with
    that of a uniformly random class, so the answer looks as confident as any other and
    is right only by chance (the draws come from ``seed`` and the number of calls so far).
    Unflagged inputs get the model's own output, bit for bit.

    ``queries`` and ``flagged`` count the inputs seen by ``forward`` (:meth:`reset_counts`
    zeroes them); :meth:`answered`, :meth:`flags` and :meth:`scores` measure a set of
    inputs without counting it. The wrapped model is ``guard.model`` (not a copy); the
    guard's state dict is the model's under the prefix ``model.`` (the detector's clean
    features are a non-persistent buffer), which nnmark's carrier lookup resolves like
    any wrapper prefix: a white-box mark checks on the guard as on the model. That is a
    check the owner could make only if handed the weights; under black-box distribution
    only the guard's answers are evidence.
    """

    def __init__(self, model: torch.nn.Module, score: str, mode: str, threshold: float, false_alarm: float,
                 layer: str | None, k: int | None, bank: torch.Tensor | None, seed: int = 0):
        super().__init__()
        self.model = model
        self.score = score
        self.mode = mode
        self.threshold = float(threshold)
        self.false_alarm = float(false_alarm)
        self.layer = layer
        self.k = k
        self.seed = seed
        self.register_buffer("bank", bank, persistent=False)
        self.clean_flagged = 0.0  # the fraction of the calibration inputs flagged (leave-one-out for knn)
        self.queries = 0
        self.flagged = 0
        self._calls = 0

    def extra_repr(self) -> str:
        return (f"score={self.score!r}, mode={self.mode!r}, false_alarm={self.false_alarm:g}, "
                f"threshold={self.threshold:.6g}" + (f", layer={self.layer!r}, k={self.k}" if self.layer else ""))

    def reset_counts(self) -> None:
        self.queries = self.flagged = 0

    # ---------------------------------------------------------------- scoring
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the model's logits, each input's score), one forward pass."""
        feats: list[torch.Tensor] = []
        hook = None
        if self.score == "knn":
            hook = self.model.get_submodule(self.layer).register_forward_pre_hook(
                lambda mod, inp: feats.append(inp[0]))
        try:
            logits = self.model(x)
        finally:
            if hook is not None:
                hook.remove()
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the guarded model must return logits [batch, classes], got {got}")
        with torch.no_grad():
            lg = logits.detach().float()
            if self.score == "msp":
                s = -F.softmax(lg, 1).amax(1)
            elif self.score == "energy":
                s = -torch.logsumexp(lg, 1)
            else:
                if not feats:
                    raise RuntimeError(f"layer {self.layer!r} did not run in the model's forward")
                s = knn_distance(_features(feats[0]), self.bank, self.k)
        return logits, s

    @torch.no_grad()
    def _measure(self, x: Any, batch_size: int) -> torch.Tensor:
        x = collect_inputs(x, what="inputs")
        batch_size = check_int("batch_size", batch_size, 1)
        dev = self.bank.device if self.bank is not None else next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = []
        was_training = self.training
        self.eval()
        try:
            with small_work_threads(self.model):
                for i in range(0, len(x), batch_size):
                    xb = x[i:i + batch_size].to(dev)
                    out.append(self._run(xb.to(dtype) if xb.is_floating_point() else xb)[1].cpu())
        finally:
            self.train(was_training)
        return torch.cat(out)

    def scores(self, x: Any, batch_size: int = 1024) -> torch.Tensor:
        """The detector's score of each input (float32 ``[m]``, on the CPU; higher: more
        unusual). ``x``: inputs, an ``(x, y)`` pair or an iterable of batches. Not counted
        as queries."""
        return self._measure(x, batch_size)

    def flags(self, x: Any, batch_size: int = 1024) -> torch.Tensor:
        """Which inputs the guard would flag (bool ``[m]``, on the CPU). Not counted."""
        return self._measure(x, batch_size) > self.threshold

    def answered(self, x: Any, batch_size: int = 1024) -> int:
        """How many of the inputs the guard would answer (not flag). Not counted."""
        return int((~self.flags(x, batch_size)).sum())

    # ---------------------------------------------------------------- the API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, s = self._run(x)
        flag = s > self.threshold
        n_flag = int(flag.sum())
        self.queries += len(x)
        self.flagged += n_flag
        if not n_flag:
            return logits
        out = logits.clone()
        rows = flag.nonzero().squeeze(1)
        if self.mode == "refuse":
            out[rows] = float("nan")
            return out
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self._calls) % (1 << 63))
        self._calls += 1
        sub = out[rows]
        top = sub.argmax(1, keepdim=True)
        pick = torch.randint(sub.shape[1], (len(rows), 1), generator=g).to(sub.device)
        a, b = sub.gather(1, top), sub.gather(1, pick)
        sub = sub.scatter(1, top, b).scatter(1, pick, a)
        out[rows] = sub
        return out


def _features(h: torch.Tensor) -> torch.Tensor:
    return F.normalize(h.detach().float().flatten(1), dim=1)


def knn_distance(f: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """Cosine distance (1 - similarity) from each row of ``f`` (unit rows) to its ``k``-th
    nearest row of ``bank`` (unit rows), in chunks of ``chunk`` rows. ``exclude_self``:
    ``f`` is ``bank`` and a row is not its own neighbour (leave-one-out)."""
    out = []
    for i in range(0, len(f), chunk):
        sim = f[i:i + chunk] @ bank.T
        if exclude_self:
            idx = torch.arange(i, i + len(sim), device=sim.device)
            sim[torch.arange(len(sim), device=sim.device), idx] = -float("inf")
        out.append(1.0 - sim.topk(k, dim=1).values[:, -1])
    return torch.cat(out)


def _threshold(scores: torch.Tensor, false_alarm: float) -> float:
    """The smallest clean score with at most ``false_alarm`` of the clean scores above it."""
    s = torch.sort(scores.double()).values
    i = min(len(s) - 1, max(0, math.ceil((1.0 - false_alarm) * len(s)) - 1))
    return float(s[i])


def _last_linear(model: torch.nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError("score='knn' reads the input of the last nn.Linear (the penultimate features), and the "
                         "model has none: pass layer=<module name> (the module whose input is the feature vector)")
    return names[-1]


def evasion_filter(model: torch.nn.Module, clean_data: Any, false_alarm: float = 0.01, mode: str = "refuse",
                   score: str = "knn", layer: str | None = None, k: int = 5, max_reference: int = 10000,
                   batch_size: int = 1024, seed: int = 0) -> EvasionGuard:
    """Puts ``model`` behind an out-of-distribution filter; returns the guard
    (:class:`EvasionGuard`, an ``nn.Module``), whose forward answers in-distribution
    inputs as the model does and refuses (``mode="refuse"``: a NaN row, no answer) or
    randomises (``mode="random"``: a random top-1 class) the inputs it flags.

    ``clean_data``: the attacker's clean inputs from the task (a tensor, an ``(x, y)``
    pair whose labels are not read, or an iterable of batches). The threshold is the
    clean score below which all but ``false_alarm`` of them fall (0 <= false_alarm < 1):
    about that fraction of clean queries is flagged. ``score``:

    - ``"knn"`` (default): the cosine distance from the input's features — the input of
      module ``layer`` (default: the last ``nn.Linear``, i.e. the penultimate features) —
      to its ``k``-th nearest clean input. The clean features (up to ``max_reference``
      inputs, a seeded random draw beyond that) stay in the guard; the threshold is
      calibrated leave-one-out on them, so calibrating on the model's own training data
      flags a little more than ``false_alarm`` of held-out data (features of training
      inputs sit closer together).
    - ``"msp"``: minus the maximum softmax probability (Hendrycks and Gimpel 2017).
    - ``"energy"``: minus the log-sum-exp of the logits (Liu et al. 2020).

    The model is wrapped, not copied, and runs in whatever mode it is in (``verify`` puts
    it in eval mode). ``batch_size``: clean inputs per forward pass while calibrating.
    ``seed``: the draw of reference inputs and the random answers.
    """
    check_model(model, "evasion_filter")
    fa = float(false_alarm) if isinstance(false_alarm, (int, float, np.integer, np.floating)) else math.nan
    if isinstance(false_alarm, bool) or not 0.0 <= fa < 1.0:
        raise ValueError(f"false_alarm must be a number in [0, 1) (the fraction of clean inputs flagged), "
                         f"got {false_alarm!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    k = check_int("k", k, 1)
    max_reference = check_int("max_reference", max_reference, 2)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    if score == "knn":
        layer = _last_linear(model) if layer is None else layer
        module_named(model, layer, "layer")
    elif layer is not None:
        raise ValueError(f"layer applies to score='knn' only (score={score!r} reads the logits)")
    x = collect_inputs(clean_data, what="clean_data")
    if len(x) > max_reference:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_reference]]
    if score == "knn" and len(x) < k + 1:
        raise ValueError(f"clean_data has {len(x)} inputs; score='knn' with k={k} needs at least {k + 1}")

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    guard = EvasionGuard(model, score, mode, float("inf"), fa, layer if score == "knn" else None,
                         k if score == "knn" else None, None, seed)
    feats: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), small_work_threads(model):
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].to(dev)
                xb = xb.to(dtype) if xb.is_floating_point() else xb
                if score == "knn":
                    got: list[torch.Tensor] = []
                    hook = model.get_submodule(layer).register_forward_pre_hook(lambda mod, inp: got.append(inp[0]))
                    try:
                        model(xb)
                    finally:
                        hook.remove()
                    if not got:
                        raise ValueError(f"layer {layer!r} did not run in the model's forward")
                    feats.append(_features(got[0]))
                else:
                    scores.append(guard._run(xb)[1])
            if score == "knn":
                bank = torch.cat(feats)
                guard.bank = bank
                clean = knn_distance(bank, bank, k, exclude_self=True)
            else:
                clean = torch.cat(scores)
    finally:
        model.train(was_training)
    clean = clean.cpu()
    guard.threshold = _threshold(clean, fa)
    guard.clean_flagged = float((clean > guard.threshold).double().mean())
    return guard


def evasion_record(guard: EvasionGuard, trigger_keys=(), seconds: float = 0.0) -> EvasionRecord:
    """The :class:`EvasionRecord` of ``guard``: per trigger key, how many of its triggers it
    answers (measured, not counted as queries)."""
    dtype = next(guard.model.parameters()).dtype
    answered = {}
    for key in trigger_keys:
        tx, _ = key.triggers(dtype=dtype if dtype.is_floating_point else torch.float32)
        answered[key.key_id] = {"answered": guard.answered(tx), "n": int(key.n)}
    return EvasionRecord("evasion", guard.false_alarm, guard.threshold, guard.score, guard.mode, guard.layer, guard.k,
                         0 if guard.bank is None else len(guard.bank), guard.clean_flagged, answered, seconds, guard)
