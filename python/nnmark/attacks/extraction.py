"""Model extraction by distillation: the attacker of a model served behind an API.

The attacker holds no weights: only query access to the victim (its top-1 label, or its
output probabilities), a query budget (how many inputs the victim may label), and
unlabeled inputs of its own from the task's distribution. It labels up to ``budget`` of
them with the victim and trains a student — a fresh copy of the victim's architecture,
or any model of its own — on the answers (Hinton et al. 2015; Orekondy et al. 2019).
A white-box mark lives in weights the student never sees; a trigger set survives only as
far as the victim's answers on ordinary inputs carry it over.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._threads import small_work_threads
from .data import collect_inputs, is_pair
from .finetune import check_int, check_model, check_optimizer, check_positive, resolve_device, seeded, train

OUTPUTS = ("labels", "probs")
REUSE = ("cap", "augment")
_TARGET_STEPS = 400  # default epochs: enough for about this many optimizer steps (at least 10, at most 200 epochs)


@dataclass
class DistillRecord:
    """What ``distill`` did. ``budget``: the queries allowed (None: one per input the
    attacker had); ``queries``: inputs the victim labelled (never more than the budget);
    ``pool``: unlabeled inputs the attacker brought; ``capped``: the budget exceeded the
    pool and ``reuse="cap"`` stopped at the pool; ``augmented``: queries made on jittered
    copies (``reuse="augment"``); ``refused``: queries the victim answered with NaN (an API that
    refuses; left out of training); ``agreement``: the fraction of the answered queries
    on which the trained student's top-1 equals the victim's; ``student``: its class,
    ``student_init``: ``"reset copy"`` (the victim's architecture, re-initialised),
    ``"given"`` or ``"factory"``; ``kept``: parameters of that copy no
    ``reset_parameters()`` reached (they start as the victim's: a warning says so);
    ``final_loss``: mean training loss over the last epoch; ``seconds``: wall time of
    the whole attack. ``model``: the trained student (not part of a report's JSON)."""

    attack: str
    output: str
    budget: int | None
    queries: int
    pool: int
    epochs: int
    agreement: float
    seconds: float
    student: str
    student_init: str
    reuse: str = "cap"
    capped: bool = False
    augmented: int = 0
    lr: float = 3e-3
    batch_size: int = 64
    steps: int = 0
    final_loss: float = float("nan")
    optimizer: str = "adam"
    kept: list[str] = field(default_factory=list)
    note: str = ""
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    refused: int = 0


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((t.device for t in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def query(victim: torch.nn.Module, x: torch.Tensor, output: str,
          batch_size: int = 1024) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The victim's answers on ``x`` (on the CPU), its number of classes C, and which
    queries it refused (bool ``[m]``: a NaN in the output row, as an
    :class:`~nnmark.attacks.EvasionGuard` refuses). Answers: top-1 labels (int64 ``[m]``)
    or output probabilities (float32 ``[m, C]``, the softmax of its logits). Batched; the
    victim runs in eval mode without gradients, and its training flag is restored
    afterwards."""
    dev = _device_of(victim)
    dtype = next((t.dtype for t in victim.parameters() if t.is_floating_point()), torch.float32)
    was_training = victim.training
    victim.eval()
    out, refused = [], []
    try:
        with small_work_threads(victim):
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].to(dev)
                logits = victim(xb.to(dtype) if xb.is_floating_point() else xb)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(xb):
                    got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ValueError(f"the victim must answer a batch of {len(xb)} inputs with logits "
                                     f"[{len(xb)}, classes], got {got}")
                logits = logits.float()
                refused.append(logits.isnan().any(1).cpu())
                out.append(logits.argmax(1).cpu() if output == "labels" else F.softmax(logits, 1).cpu())
    finally:
        victim.train(was_training)
    return torch.cat(out), int(logits.shape[1]), torch.cat(refused)


def _jitter(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor,
            g: torch.Generator) -> torch.Tensor:
    """Light augmentation: Gaussian noise of 5% of the inputs' std, and for images
    ``[n, C, H, W]`` a random shift by up to one pixel each way (cyclic), clipped to the
    inputs' range."""
    out = x + 0.05 * scale * torch.randn(x.shape, generator=g, dtype=x.dtype)
    if x.dim() >= 4:
        shifts = torch.randint(-1, 2, (len(x), 2), generator=g)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                if (dy or dx) and sel.any():
                    out[sel] = out[sel].roll((dy, dx), dims=(-2, -1))
    return torch.minimum(torch.maximum(out, lo), hi)


def _fresh_copy(victim: torch.nn.Module, seed: int, device: torch.device) -> tuple[torch.nn.Module, list[str]]:
    """A deep copy of the victim's architecture with every module that has
    ``reset_parameters()`` re-initialised (seeded); also the names of the parameters that
    no reset reached."""
    from .evasion import EvasionGuard

    inner = victim.model if isinstance(victim, EvasionGuard) else victim  # the model behind an API guard
    student = copy.deepcopy(inner)
    reached: set[int] = set()
    with seeded(seed, device), torch.no_grad():
        for m in student.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
                reached.update(id(p) for p in m.parameters())
    kept = [n for n, p in student.named_parameters() if id(p) not in reached]
    return student, kept


def _build_student(student: Any, victim: torch.nn.Module, seed: int, device: Any) -> tuple[torch.nn.Module, str,
                                                                                            list[str]]:
    if student is None:
        model, kept = _fresh_copy(victim, seed, _device_of(victim) if device is None else torch.device(device))
        if kept:
            warnings.warn(f"distill: {len(kept)} parameters of the victim's architecture have no reset_parameters() "
                          f"and start as the victim's ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}); "
                          "pass student= a factory for a truly fresh student", stacklevel=3)
        return model, "reset copy", kept
    if isinstance(student, torch.nn.Module):
        check_model(student, "distill: student")
        return student, "given", []
    if callable(student):
        dev = _device_of(victim) if device is None else torch.device(device)
        with seeded(seed, dev):
            model = student()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"student factory must return a torch.nn.Module, got {type(model).__name__}")
        check_model(model, "distill: student")
        return model, "factory", []
    raise TypeError(f"student must be None (a re-initialised copy of the victim), a torch.nn.Module or a "
                    f"factory returning one, got {type(student).__name__}")


def distill(victim: torch.nn.Module, data: Any, budget: int | None = None, output: str = "labels",
            student: torch.nn.Module | Callable[[], torch.nn.Module] | None = None, epochs: int | None = None,
            lr: float = 3e-3, batch_size: int = 64, optimizer: str = "adam", momentum: float = 0.9,
            reuse: str = "cap", query_batch_size: int = 1024, seed: int = 0, device: Any = None) -> DistillRecord:
    """Extracts ``victim`` by distillation; returns a :class:`DistillRecord` whose
    ``.model`` is the trained student. The victim is only queried (eval mode, no
    gradients) and never changed.

    ``data``: the attacker's unlabeled inputs from the task distribution — a tensor
    ``[m, ...]``, an ``(x, y)`` pair (``y`` is never read) or an iterable of batches
    (``x`` or ``(x, y)``; read only until ``budget`` inputs are in hand).
    ``budget``: how many inputs the victim may label (None: all of ``data``). Below the
    pool, a seeded random draw of ``budget`` inputs is queried. Above it, ``reuse="cap"``
    stops at the pool (``record.capped``, and the note says so) and ``reuse="augment"``
    spends the rest on jittered copies of pool inputs (noise of 5% of the inputs' std and,
    for images, a shift of up to one pixel; float inputs only).
    ``output``: what the API returns — ``"labels"`` (top-1 class; the student learns them
    with cross-entropy) or ``"probs"`` (the softmax of the victim's logits; the student
    learns them with soft-label cross-entropy).
    ``student``: None — a deep copy of the victim's architecture with every module's
    ``reset_parameters()`` called (seeded); a module of any architecture with the same
    number of outputs (trained in place); or a factory called with no arguments.
    ``epochs``: None — enough for about 400 optimizer steps (at least 10 epochs, at most
    200), so that small budgets still train. Training: all student parameters,
    ``optimizer`` ``"adam"`` (default) or ``"sgd"`` (with ``momentum``) at ``lr``, batches
    of ``batch_size``; queries go to the victim in batches of ``query_batch_size``.
    ``seed``: the draw of queries, the augmentation, the student's initialisation and the
    batch order; same seed, same student. ``device``: where the student trains (default:
    its own device; for the default student, the victim's).
    """
    start = time.perf_counter()
    check_model(victim, "distill: victim")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)} (what the victim's API returns), got {output!r}")
    if budget is not None:
        budget = check_int("budget", budget, 1)
    if epochs is not None:
        epochs = check_int("epochs", epochs, 1)
    lr = check_positive("lr", lr)
    batch_size = check_int("batch_size", batch_size, 1)
    query_batch_size = check_int("query_batch_size", query_batch_size, 1)
    seed = check_int("seed", seed, 0)
    optimizer, momentum = check_optimizer(optimizer, momentum)
    if reuse not in REUSE:
        raise ValueError(f"reuse must be one of {list(REUSE)} (what to do when the budget exceeds the data), "
                         f"got {reuse!r}")
    if device is not None:
        try:
            torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"device must be a torch device or its name, got {device!r}") from exc
    if student is not None and not callable(student):
        raise TypeError(f"student must be None (a re-initialised copy of the victim), a torch.nn.Module or a "
                        f"factory returning one, got {type(student).__name__}")

    # An iterable of batches is read only as far as the budget; tensors are drawn from.
    whole = isinstance(data, (torch.Tensor, np.ndarray)) or is_pair(data)
    pool = collect_inputs(data, limit=None if whole or budget is None else budget, what="data")
    g = torch.Generator().manual_seed(seed)
    want = len(pool) if budget is None else budget
    note, capped, extra = "", False, 0
    if want <= len(pool):
        x = pool if want == len(pool) else pool[torch.randperm(len(pool), generator=g)[:want]]
    elif reuse == "cap":
        x, capped = pool, True
        note = (f"budget {budget} exceeds the {len(pool)} inputs the attacker has: capped at {len(pool)} queries "
                "(reuse='cap')")
    else:
        if not pool.is_floating_point():
            raise ValueError(f"reuse='augment' jitters inputs, but data holds {pool.dtype} inputs; use reuse='cap'")
        extra = want - len(pool)
        src = pool[torch.randint(len(pool), (extra,), generator=g)]
        flat = pool.float()
        x = torch.cat([pool, _jitter(src, pool.amin(), pool.amax(), flat.std(), g)])
        note = f"budget {budget} exceeds the {len(pool)} inputs the attacker has: {extra} queries on jittered copies"

    model, init, kept = _build_student(student, victim, seed, device)
    dev = resolve_device(model, device)
    answers, classes, refused = query(victim, x, output, query_batch_size)
    queries = len(x)
    n_refused = int(refused.sum())
    if n_refused:  # a spent query without an answer: nothing to learn from
        if n_refused == queries:
            raise ValueError(f"the victim refused all {queries} queries (NaN outputs): nothing to train on")
        x, answers = x[~refused], answers[~refused]
        note = (note + "; " if note else "") + f"{n_refused} of {queries} queries refused (NaN answers), left out"
    top1 = answers if output == "labels" else answers.argmax(1)
    probe = x[:2].to(dev)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            pdtype = next(p.dtype for p in model.parameters())
            out = model(probe.to(pdtype) if probe.is_floating_point() else probe)
        finally:
            model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != classes:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the student must output logits [batch, {classes}] like the victim, got {got}")

    steps_per_epoch = math.ceil(len(x) / batch_size)
    if epochs is None:
        epochs = max(10, min(200, math.ceil(_TARGET_STEPS / steps_per_epoch)))
    names = [n for n, _ in model.named_parameters()]
    with seeded(seed, dev):
        steps, final = train(model, names, (x, answers), epochs=epochs, lr=lr, batch_size=batch_size,
                             optimizer=optimizer, momentum=momentum, seed=seed, device=dev)

    with torch.no_grad(), small_work_threads(model):
        pdtype = next(p.dtype for p in model.parameters())
        agree = 0
        for i in range(0, len(x), query_batch_size):
            xb = x[i:i + query_batch_size].to(dev)
            pred = model(xb.to(pdtype) if xb.is_floating_point() else xb).argmax(1).cpu()
            agree += int((pred == top1[i:i + query_batch_size]).sum())
    return DistillRecord("distill", output, budget, queries, len(pool), epochs, agree / len(x),
                         time.perf_counter() - start, type(model).__name__, init, reuse, capped, extra, lr, batch_size,
                         steps, final, optimizer, kept, note, model, n_refused)
