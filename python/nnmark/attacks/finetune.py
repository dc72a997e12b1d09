"""Fine-tuning attacks (Adi et al. 2018): FTLL, FTAL, RTLL, RTAL.

- FTLL: fine-tune the last layer only;  FTAL: fine-tune all layers;
- RTLL: re-initialise the last layer, then train only it;
- RTAL: re-initialise the last layer, then train all layers.

The training loop here is shared by the other training attacks (fine-pruning,
overwriting): cross-entropy on the attacker's data, SGD with momentum (or Adam),
batches shuffled by a private generator, everything seeded so that the same seed
gives bit-identical weights, and the model left in eval mode.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .._threads import small_work_threads
from .data import batches, check_pair, is_pair

MODES = ("FTLL", "FTAL", "RTLL", "RTAL")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class FineTuneRecord:
    """What ``finetune`` did. ``trained``: the parameters it updated (state-dict names);
    ``final_loss``: mean training loss over the last epoch."""

    attack: str
    mode: str
    epochs: int
    lr: float
    steps: int
    last_layer: str
    trained: list[str] = field(default_factory=list)
    final_loss: float = float("nan")
    optimizer: str = "sgd"


# ----------------------------------------------------------------------------- checks


def check_model(model: Any, what: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what} needs a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError(f"{what}: the model has no parameters")


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_optimizer(optimizer: Any, momentum: Any) -> tuple[str, float]:
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    try:
        m = float(momentum)
    except (TypeError, ValueError):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}") from None
    if not 0.0 <= m < 1.0:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    return name, m


def check_data(data: Any, passes: int, what: str = "data") -> None:
    """Fails early (before the model is touched) on data the attack cannot use; it will
    be iterated ``passes`` times."""
    if is_pair(data):
        check_pair(data, what)
        return
    if data is None or isinstance(data, (str, bytes, torch.Tensor)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{what} must be an (x, y) pair of tensors or an iterable of (x, y) batches "
                        f"(e.g. a DataLoader), got {type(data).__name__}")
    if passes > 1 and iter(data) is data:  # a generator or iterator is spent after one pass
        raise ValueError(f"{what} is a one-shot iterator ({type(data).__name__}) but is read {passes} times "
                         "(once per epoch, plus once for statistics where needed): pass an (x, y) pair, "
                         "a list of batches or a DataLoader")


def resolve_device(model: torch.nn.Module, device: Any) -> torch.device:
    """``device`` (the model is moved there, in place) or the device of the model's parameters."""
    if device is None:
        return next(model.parameters()).device
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device must be a torch device or its name, got {device!r}") from exc
    model.to(dev)
    return dev


def module_named(model: torch.nn.Module, name: Any, what: str) -> torch.nn.Module:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a module name (str), got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        near = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
        raise ValueError(f"{what}={name!r} is not a module of the model; conv/linear modules: {near}")
    return modules[name]


def last_linear(model: torch.nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear module to take as the last layer; pass last_layer=<module name>")
    return names[-1]


def params_of(model: torch.nn.Module, prefix: str) -> list[str]:
    """State-dict names of the parameters that belong to module ``prefix``."""
    return [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]


# ----------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seeds torch's global RNGs (CPU, and ``device`` when CUDA) for re-initialisation and
    dropout, restoring the caller's RNG states afterwards."""
    cuda = device.type == "cuda"
    devs = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devs):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(devs[0]):
                torch.cuda.manual_seed(seed)
        yield


def train(model: torch.nn.Module, names: list[str], data: Any, *, epochs: int, lr: float, batch_size: int,
          optimizer: str, momentum: float, seed: int, device: torch.device,
          extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
          mixer: Any = None, after_step: Callable[[], None] | None = None,
          frozen_modules: Iterable[torch.nn.Module] = ()) -> tuple[int, float]:
    """Trains the parameters ``names`` of ``model`` (all others are left untouched) with
    cross-entropy (+ ``extra_loss(model)``) on ``data``; ``mixer.mix`` adds samples to each
    batch; ``after_step()`` runs after each optimizer step. The model trains in train mode,
    except ``frozen_modules`` (kept in eval so their running statistics stay put), and ends
    in eval mode. Returns (optimizer steps, mean loss over the last epoch)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    # Only the trained parameters need gradients: the frozen ones skip their backward
    # work and, not being in the optimizer, stay bit-identical.
    flags = {n: p.requires_grad for n, p in named.items()}
    dtype = params[0].dtype if params else next(model.parameters()).dtype
    steps, final = 0, float("nan")
    trained = set(names)
    try:
        for n, p in named.items():
            p.requires_grad_(n in trained)
        opt = (torch.optim.SGD(params, lr=lr, momentum=momentum) if optimizer == "sgd"
               else torch.optim.Adam(params, lr=lr))
        g = torch.Generator().manual_seed(seed)
        model.train()
        for m in frozen_modules:
            m.eval()
        # Small models train on one torch thread (nnmark._threads: a second one spins
        # against other processes on a busy machine); the caller's count comes back after.
        with small_work_threads(model):
            for _ in range(epochs):
                total, count = None, 0
                for xb, yb in batches(data, batch_size, shuffle=True, generator=g, device=device):
                    if xb.is_floating_point():
                        xb = xb.to(dtype)
                    if not yb.is_floating_point():
                        yb = yb.long()
                    if mixer is not None:
                        xb, yb = mixer.mix(xb, yb)
                    loss = F.cross_entropy(model(xb), yb)
                    if extra_loss is not None:
                        loss = loss + extra_loss(model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    if after_step is not None:
                        after_step()
                    # Summed on the device: one sync per epoch, not per step.
                    total = loss.detach() if total is None else total + loss.detach()
                    count += 1
                final = float(total) / count
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.eval()
    return steps, final


# ----------------------------------------------------------------------------- the attack


def finetune(model: torch.nn.Module, data: Any, mode: str = "FTAL", epochs: int = 5, lr: float = 0.01,
             batch_size: int = 64, last_layer: str | None = None, optimizer: str = "sgd", momentum: float = 0.9,
             seed: int = 0, device: Any = None) -> FineTuneRecord:
    """Fine-tunes ``model`` in place on ``data`` (an ``(x, y)`` pair or an iterable of
    batches) in one of Adi et al.'s modes; returns a :class:`FineTuneRecord`.

    ``mode`` (case-insensitive): ``"FTLL"`` trains only the last layer, ``"FTAL"`` all
    layers; ``"RTLL"`` / ``"RTAL"`` first re-initialise the last layer
    (``reset_parameters()``, seeded) and then train it alone / everything.
    ``last_layer``: module name of the output layer (default: the last ``nn.Linear``
    in ``model.named_modules()``). In the last-layer modes every other parameter stays
    bit-identical, and BatchNorm layers outside the last layer keep their running
    statistics (they run in eval mode): the frozen part is a fixed feature extractor.
    ``optimizer``: ``"sgd"`` (with ``momentum``, Adi et al.'s setting at lr 0.01) or
    ``"adam"``. Same ``seed`` (shuffling, re-initialisation, dropout) → same weights.
    ``device``: where to train (the model is moved there); default the model's device.
    """
    check_model(model, "finetune")
    if not isinstance(mode, str) or mode.upper() not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} (case-insensitive), got {mode!r}")
    mode = mode.upper()
    epochs = check_int("epochs", epochs, 1)
    lr = check_positive("lr", lr)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    optimizer, momentum = check_optimizer(optimizer, momentum)
    last_layer = last_linear(model) if last_layer is None else last_layer
    layer = module_named(model, last_layer, "last_layer")
    layer_params = params_of(model, last_layer)
    if not layer_params:
        raise ValueError(f"last_layer={last_layer!r} ({type(layer).__name__}) has no parameters to train")
    if mode.startswith("RT") and not callable(getattr(layer, "reset_parameters", None)):
        raise ValueError(f"mode {mode} re-initialises the last layer, but {last_layer!r} "
                         f"({type(layer).__name__}) has no reset_parameters()")
    check_data(data, epochs)
    device = resolve_device(model, device)

    whole = mode.endswith("AL")
    names = [n for n, _ in model.named_parameters()] if whole else layer_params
    inside = {id(m) for m in layer.modules()}
    frozen = [] if whole else [m for m in model.modules()
                               if isinstance(m, torch.nn.modules.batchnorm._NormBase) and id(m) not in inside]
    with seeded(seed, device):
        if mode.startswith("RT"):
            with torch.no_grad():
                layer.reset_parameters()
        steps, final = train(model, names, data, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                             momentum=momentum, seed=seed, device=device, frozen_modules=frozen)
    return FineTuneRecord("finetune", mode, epochs, lr, steps, last_layer, list(names), final, optimizer)
