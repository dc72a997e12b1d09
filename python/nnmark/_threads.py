"""One torch intra-op thread for small work, scoped.

On a 2-core machine shared with other processes, torch's OpenMP threads made the demo's
tiny models train 10-15x slower with 2 threads than with 1: each op on a 64-image batch
of 8x8 digits lasts tens to hundreds of microseconds, OpenMP's workers busy-wait at the
barrier after it, and when the scheduler has taken one of them away for a time slice the
others spin until it comes back (benchmarks/RESULTS.md, "Demo under CPU load"). Work
that small gains little from a second thread on an idle machine, so it runs on one.

The decision is by size, never by load: the multiply-adds of one forward pass, counted
from the layers' shapes (see :func:`forward_macs`). Below :data:`SMALL_MACS` the block
runs with one thread; otherwise the caller's setting stands. Every context here restores
the caller's thread count on exit (``torch.set_num_threads`` is process-wide: it is not
meant for blocks running in several Python threads at once).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

# Forward multiply-adds of one batch below which a block runs with one torch thread.
# 2**27 (134M) is 10-30 ms of forward work on one core of this class spread over several
# ops: a second thread saves at most a few ms a step on an idle machine, while under load
# every op can wait a scheduler time slice for a descheduled, spinning thread.
# The demo's DigitsNet: 0.34M per image, 24M for a 64 + 8 image batch.
SMALL_MACS = 1 << 27


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Runs the block with ``n`` torch intra-op threads (None: as they are); the caller's
    count comes back afterwards, also when the block raises."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"torch_threads expects an int >= 1 or None, got {n!r}")
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _module_macs(module: nn.Module, out: Any) -> float:
    """Multiply-adds of one call: exact for Linear and conv layers; for any other layer
    with parameters of its own an upper bound (parameters x output elements), so that an
    unknown layer makes the work look big, never small. Infinite when it cannot tell."""
    own = sum(p.numel() for p in module.parameters(recurse=False))
    t = _first_tensor(out)
    if t is None:
        return float("inf")
    if isinstance(module, nn.Linear) and t.dim() >= 1 and t.shape[-1] > 0:
        return module.weight.numel() * (t.numel() // t.shape[-1])
    if isinstance(module, nn.modules.conv._ConvNd) and t.dim() >= 2 and t.shape[1] > 0:
        return module.weight.numel() * (t.numel() // t.shape[1])
    return float(own) * t.numel()


class _Counter:
    """Forward hooks on ``model``'s layers with parameters that add up the multiply-adds
    of the next forward pass; ``done(total, on_cpu)`` is called once, after it."""

    def __init__(self, model: nn.Module, done):
        self.total = 0.0
        self.on_cpu = True
        self.handles = []
        self._done = done
        for m in model.modules():
            if next(m.parameters(recurse=False), None) is not None:
                self.handles.append(m.register_forward_hook(self._layer))
        self.handles.append(model.register_forward_hook(self._root))

    def _layer(self, module, inputs, out):
        self.total += _module_macs(module, out)
        t = _first_tensor(out)
        if t is not None and t.device.type != "cpu":
            self.on_cpu = False

    def _root(self, module, inputs, out):
        self.remove()
        t = _first_tensor(out)
        on_cpu = self.on_cpu and (t is None or t.device.type == "cpu")
        self._done(self.total, on_cpu)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def threads_for(macs: float) -> int | None:
    """1 for a forward pass of fewer than :data:`SMALL_MACS` multiply-adds, else None (the
    caller's setting stands)."""
    return 1 if macs < SMALL_MACS else None


@torch.no_grad()
def forward_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of ``model(x)``, counted from the layers' shapes during one forward
    pass (so call it only where that pass has no side effects: e.g. on a fresh model)."""
    counted = []
    counter = _Counter(model, lambda total, on_cpu: counted.append(total))
    try:
        model(x)
    finally:
        counter.remove()
    return counted[0] if counted else float("inf")


@contextlib.contextmanager
def small_work_threads(model: nn.Module):
    """For a training or inference loop over ``model``: the loop's first forward pass is
    measured (hooks that read the layers' output shapes; they are removed after it) and,
    when it is small work on the CPU (:func:`threads_for`), the rest of the block runs
    with one torch thread. The caller's thread count comes back on exit. Nothing changes
    when torch already runs one thread, for models on a GPU, or for big batches."""
    if torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()

    def done(total, on_cpu):
        if on_cpu and threads_for(total) == 1:
            torch.set_num_threads(1)

    counter = _Counter(model, done)
    try:
        yield
    finally:
        counter.remove()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
