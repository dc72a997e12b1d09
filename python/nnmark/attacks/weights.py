"""Weight-level attacks: k-bit quantization per tensor and Gaussian weight noise."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pruning import prunable


@dataclass
class WeightAttackRecord:
    """What a weight attack did: its name and strength, and the tensors it changed."""

    attack: str
    strength: float
    tensors: list[str] = field(default_factory=list)
    changed: int = 0  # weights whose value changed


@torch.no_grad()
def quantize(model: torch.nn.Module, bits: int = 5, names=None) -> WeightAttackRecord:
    """Uniform symmetric quantization of each weight tensor to ``bits`` bits, in place
    (2^(bits-1) - 1 levels each side of zero, the scale from the tensor's max |w|;
    Lukas et al.'s SoK uses 5 bits)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    names, tensors = prunable(model, names)
    rec = WeightAttackRecord("quantize", float(bits), list(names))
    levels = 2 ** (bits - 1) - 1
    for t in tensors:
        scale = t.abs().max() / levels
        if scale == 0:
            continue
        q = torch.round(t / scale).clamp_(-levels, levels) * scale
        rec.changed += int((q != t).sum())
        t.copy_(q)
    return rec


@torch.no_grad()
def gaussian_noise(model: torch.nn.Module, std: float = 0.01, relative: bool = True, names=None,
                   seed: int | None = None) -> WeightAttackRecord:
    """Adds Gaussian noise to each weight tensor in place: std × (the tensor's own
    standard deviation) when ``relative``, else std in absolute units."""
    std = float(std)
    if not std >= 0 or std != std or std == float("inf"):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    names, tensors = prunable(model, names)
    rec = WeightAttackRecord("gaussian_noise", std, list(names))
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for t in tensors:
        sigma = std * (float(t.std()) if relative and t.numel() > 1 else 1.0)
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) * sigma
        t.add_(noise)
        rec.changed += int((noise != 0).sum())
    return rec
