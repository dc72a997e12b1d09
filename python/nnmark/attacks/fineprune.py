"""Fine-pruning (Liu, Dolan-Gavitt, Garg 2018): prune the channels of one layer that stay
dormant on clean data, then fine-tune the whole model with those channels held at zero.

A backdoor (a trigger set) tends to live in neurons the clean data leaves quiet;
pruning them and fine-tuning removes it at little cost in clean accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .activations import channel_activations
from .data import batches
from .finetune import (check_data, check_int, check_model, check_optimizer, check_positive, module_named,
                       resolve_device, seeded, train)

ACTIVATIONS = ("relu", "output")


@dataclass
class FinePruneRecord:
    """What ``fine_prune`` did: the channels of ``layer`` it pruned (``pruned_channels``,
    ascending, out of ``channels``), where their activation was measured (``measured_at``,
    a module name), the parameters it holds masked (``masked``), and the fine-tuning
    (``final_loss``: mean loss over the last epoch; None when ``epochs=0``)."""

    attack: str
    layer: str
    fraction: float
    pruned_channels: list[int] = field(default_factory=list)
    epochs: int = 0
    lr: float = 0.01
    final_loss: float | None = None
    channels: int = 0
    measured_at: str = ""
    masked: list[str] = field(default_factory=list)
    steps: int = 0
    optimizer: str = "sgd"


def _prunable_layer(m: torch.nn.Module) -> bool:
    conv = isinstance(m, torch.nn.modules.conv._ConvNd) and not m.transposed
    return (conv or isinstance(m, torch.nn.Linear)) and isinstance(getattr(m, "weight", None), torch.nn.Parameter)


def default_layer(model: torch.nn.Module) -> str:
    """The last ``nn.Conv2d`` (Liu et al. prune the last conv layer), else the last hidden
    ``nn.Linear`` (every Linear but the output one)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if convs:
        return convs[-1]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if len(linears) >= 2:
        return linears[-2]
    raise ValueError("the model has no nn.Conv2d and no hidden nn.Linear to prune; pass layer=<module name>")


@torch.no_grad()
def _followers(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> tuple[str | None, str | None]:
    """Names of the BatchNorm fed directly by ``layer``'s output (if any) and of the ReLU
    module fed by that (or directly by ``layer``), found by following the tensors of one
    eval-mode forward pass (module registration order says nothing about data flow)."""
    names = {id(m): n for n, m in model.named_modules()}
    seen: list[torch.Tensor] = []  # the layer's output, then the BatchNorm's
    found: dict[str, str] = {}

    def on_layer(mod, inp, out):
        if not seen:
            seen.append(out)

    def on_norm(mod, inp, out):
        if "bn" not in found and len(seen) == 1 and inp and inp[0] is seen[0]:
            found["bn"] = names[id(mod)]
            seen.append(out)

    def on_relu(mod, inp, out):
        if "relu" not in found and inp and any(inp[0] is t for t in seen):
            found["relu"] = names[id(mod)]

    hooks = [layer.register_forward_hook(on_layer)]
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_hook(on_norm))
        elif isinstance(m, torch.nn.ReLU):
            hooks.append(m.register_forward_hook(on_relu))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found.get("bn"), found.get("relu")


def fine_prune(model: torch.nn.Module, data: Any, layer: str | None = None, fraction: float = 0.9, epochs: int = 1,
               lr: float = 0.01, batch_size: int = 64, seed: int = 0, device: Any = None,
               activation: str = "relu", optimizer: str = "sgd", momentum: float = 0.9) -> FinePruneRecord:
    """Fine-prunes ``model`` in place; returns a :class:`FinePruneRecord`.

    1. Measures the mean activation of each output channel of ``layer`` (a conv or
       linear module name; default: the last ``nn.Conv2d``, else the last hidden
       ``nn.Linear``) on the clean ``data`` with ``nnmark.attacks.channel_activations``,
       in eval mode. ``activation="relu"`` (Liu et al.'s choice) measures after the
       ``nn.ReLU`` module that follows the layer (through a BatchNorm directly after
       it, if there is one), falling back to the layer's own output when no ReLU
       module follows (e.g. a functional ``F.relu``); ``"output"`` always measures the
       layer's own output. The record's ``measured_at`` says which module was used.
    2. Prunes the ``round(fraction * channels)`` channels with the lowest mean (ties
       broken by channel index): zeroes their weights and bias, and the weight and bias
       of a BatchNorm fed directly by the layer, so those channels output exactly zero.
    3. Fine-tunes all layers for ``epochs`` (0: prune only) with cross-entropy on
       ``data`` (SGD with ``momentum`` by default, or ``optimizer="adam"``),
       re-applying the mask after every optimizer step so pruned channels stay pruned.

    ``data``: an ``(x, y)`` pair or a re-iterable of batches (it is read more than
    once). Same ``seed`` → same weights. The model ends in eval mode on ``device``
    (default: its own device).
    """
    check_model(model, "fine_prune")
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}") from None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1] (the share of channels to prune), got {fraction!r}")
    epochs = check_int("epochs", epochs, 0)
    lr = check_positive("lr", lr)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    optimizer, momentum = check_optimizer(optimizer, momentum)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    layer = default_layer(model) if layer is None else layer
    mod = module_named(model, layer, "layer")
    if not _prunable_layer(mod):
        raise ValueError(f"layer={layer!r} is a {type(mod).__name__}; fine-pruning needs a conv (not transposed) "
                         "or linear module with a weight parameter")
    # Read for the probe, the statistics and each epoch: a one-shot iterator will not do.
    check_data(data, epochs + 2)
    device = resolve_device(model, device)

    channels = int(mod.weight.shape[0])
    x0, _ = next(iter(batches(data, batch_size, device=device)))
    if x0.is_floating_point():
        x0 = x0.to(mod.weight.dtype)
    bn_name, relu_name = _followers(model, mod, x0)
    measured_at = relu_name if activation == "relu" and relu_name is not None else layer
    stats = channel_activations(model, measured_at, data, batch_size=batch_size, device=device)
    mean = torch.as_tensor(stats.mean).detach().double().cpu().flatten()
    if mean.numel() != channels:
        raise ValueError(f"channel statistics of {measured_at!r} have {mean.numel()} channels, "
                         f"layer {layer!r} has {channels} output channels")
    k = int(round(fraction * channels))
    # NaN means (a channel that never saw data) count as the most dormant.
    order = torch.argsort(torch.nan_to_num(mean, nan=-float("inf")), stable=True)
    pruned = sorted(int(i) for i in order[:k])

    masked: list[tuple[str, torch.Tensor]] = [(f"{layer}.weight", mod.weight)]
    if isinstance(getattr(mod, "bias", None), torch.Tensor):
        masked.append((f"{layer}.bias", mod.bias))
    if bn_name is not None:
        bn = model.get_submodule(bn_name)
        for pname in ("weight", "bias"):
            t = getattr(bn, pname, None)
            if isinstance(t, torch.Tensor) and t.shape[:1] == (channels,):
                masked.append((f"{bn_name}.{pname}", t))
    idx = torch.tensor(pruned, dtype=torch.long, device=device)

    @torch.no_grad()
    def apply_mask() -> None:
        for _, t in masked:
            t.index_fill_(0, idx, 0)

    if k:
        apply_mask()
    steps, final = 0, None
    if epochs:
        names = [n for n, _ in model.named_parameters()]
        with seeded(seed, device):
            steps, final = train(model, names, data, epochs=epochs, lr=lr, batch_size=batch_size,
                                 optimizer=optimizer, momentum=momentum, seed=seed, device=device,
                                 after_step=apply_mask if k else None)
    model.eval()
    return FinePruneRecord("fine_prune", layer, fraction, pruned, epochs, lr, final, channels, measured_at,
                           [n for n, _ in masked] if k else [], steps, optimizer)
