"""Per-channel activation statistics of one layer on clean data, recorded by a forward
hook through the native :func:`nnmark.ops.channel_stats` (the ranking fine-pruning uses:
Liu, Dolan-Gavitt, Garg 2018 prune the channels with the lowest mean activation).

    with ChannelStats(model.layer4) as st:
        for x in loader:
            model(x)
    st.mean, st.frac_positive          # float64 [C]

or in one call: ``channel_activations(model, "layer4", (x, y))``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .. import ops
from .._threads import small_work_threads
from .data import batches


class ChannelStats:
    """Accumulates the per-channel mean and fraction of positive values of a module's
    output over every forward pass, until :meth:`remove` (or the end of a ``with``).

    The output must be a tensor ``[B, C, *spatial]`` (conv, linear, norm, activation
    layers); statistics are over the batch and spatial positions of each channel.
    Accumulators live on the output's device (float64 sums, int64 counts).
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"ChannelStats needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self._sums: torch.Tensor | None = None
        self._positives: torch.Tensor | None = None
        self._count = 0
        self._batches = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"ChannelStats: {type(module).__name__} returned a {type(output).__name__}; "
                            "expected a tensor [B, C, ...]")
        if output.dim() < 2:
            raise ValueError(f"ChannelStats: {type(module).__name__} returned shape {list(output.shape)}; "
                             "expected [B, C, ...] (at least 2 dims)")
        C = output.shape[1]
        if self._sums is not None:
            if self._sums.shape[0] != C:
                raise ValueError(f"ChannelStats: {type(module).__name__} returned {C} channels after "
                                 f"{self._sums.shape[0]} in earlier batches")
            if self._sums.device != output.device:  # the model moved: follow it
                self._sums = self._sums.to(output.device)
                self._positives = self._positives.to(output.device)
        self._sums, self._positives = ops.channel_stats(output, self._sums, self._positives)
        self._count += output.numel() // C
        self._batches += 1

    # ---------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Unregisters the hook (statistics recorded so far stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "ChannelStats":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---------------------------------------------------------------- results
    @property
    def count(self) -> int:
        """Elements seen per channel (batch size times spatial positions, over all batches)."""
        return self._count

    @property
    def batches(self) -> int:
        """Forward passes recorded."""
        return self._batches

    def _seen(self) -> None:
        if self._sums is None or self._count == 0:
            raise RuntimeError(f"ChannelStats: {type(self.module).__name__} has not produced any output since "
                               "the hook was registered; run the model on some data first")

    @property
    def sums(self) -> torch.Tensor:
        """Per-channel sum of the outputs, float64 [C] on the CPU."""
        self._seen()
        return self._sums.cpu()

    @property
    def positives(self) -> torch.Tensor:
        """Per-channel count of outputs > 0, int64 [C] on the CPU."""
        self._seen()
        return self._positives.cpu()

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean activation, float64 [C] on the CPU."""
        return self.sums / self._count

    @property
    def frac_positive(self) -> torch.Tensor:
        """Per-channel fraction of activations > 0, float64 [C] on the CPU."""
        return self.positives.double() / self._count


@dataclass(frozen=True)
class ChannelActivations:
    """Per-channel statistics of one layer's output over a data set."""

    layer: str                    # module name, as in model.named_modules()
    mean: torch.Tensor            # float64 [C]: mean activation per channel
    frac_positive: torch.Tensor   # float64 [C]: fraction of activations > 0 per channel
    count: int                    # elements per channel seen (samples x spatial positions)


def _resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return name, m
        raise ValueError(f"layer: the given {type(layer).__name__} is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str) or a torch.nn.Module, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n]
        hint = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"layer {layer!r} is not a module of the model; named modules: {hint}")
    return layer, modules[layer]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _inputs(data: Any, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Input batches on ``device`` from x alone, an (x, y) pair or an iterable of (x, y) batches."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        x = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
        if x.dim() == 0 or len(x) == 0:
            raise ValueError(f"data is empty (shape {list(x.shape)})")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size].to(device)
        return
    for x, _ in batches(data, batch_size=batch_size, device=device):
        yield x


@torch.no_grad()
def channel_activations(model: nn.Module, layer: str | nn.Module, data: Any, batch_size: int = 256,
                        device: Any = None) -> ChannelActivations:
    """Mean activation and fraction positive of each channel of ``layer``'s output.

    Runs ``model`` in eval mode (its training flag is restored afterwards), without
    gradients, over ``data``: inputs ``x`` alone, an ``(x, y)`` pair (tensors or numpy
    arrays, cut into ``batch_size`` batches) or an iterable of ``(x, y)`` batches such as
    a DataLoader. ``layer``: a name from ``model.named_modules()`` or the module itself.
    ``device``: where to run (default: the model's device); inputs are moved there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, module = _resolve_layer(model, layer)
    device = _model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with ChannelStats(module) as st, small_work_threads(model):  # small models: one torch thread
            for x in _inputs(data, batch_size, device):
                model(x)
    finally:
        model.train(was_training)
    if st.batches == 0:
        raise RuntimeError(f"layer {name!r} produced no output while the model ran on the data "
                           "(is it used in the model's forward?)")
    return ChannelActivations(layer=name, mean=st.mean, frac_positive=st.frac_positive, count=st.count)
