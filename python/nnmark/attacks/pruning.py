"""Magnitude pruning, global or per layer, on the native exact select (CPU or CUDA)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops


@dataclass
class PruneRecord:
    """What ``prune_magnitude`` did: the sparsity asked for, the weights it zeroed
    (exactly ``round(sparsity * total)`` per scope), and the thresholds used."""

    attack: str
    sparsity: float
    scope: str
    total: int
    pruned: int
    thresholds: dict[str, float] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)


def prunable(model: torch.nn.Module, names):
    """(names, tensors) of the weights pruning touches: ``names``, or every conv and linear weight."""
    params = dict(model.named_parameters())
    if names is None:  # conv and linear weights, as in the literature (biases and norms stay)
        names = [n for n, p in params.items() if n.endswith("weight") and p.dim() >= 2]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"no such parameters: {missing}")
    if not names:
        raise ValueError("the model has no prunable weights (conv/linear weights with >= 2 dims)")
    return names, [params[n] for n in names]


@torch.no_grad()
def prune_magnitude(model: torch.nn.Module, sparsity: float = 0.5, scope: str = "global",
                    names=None) -> PruneRecord:
    """Zeroes the smallest-magnitude weights of ``model`` in place.

    ``scope="global"``: the ``round(sparsity * N)`` smallest |w| over all prunable
    weights together (N of them); ``"layer"``: that fraction of each tensor. ``names``
    restricts the attack to those parameters (default: every conv/linear weight).
    Exactly that many weights become zero (ties at the threshold in order).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prune_magnitude needs a torch.nn.Module, got {type(model).__name__}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    names, tensors = prunable(model, names)
    total = sum(t.numel() for t in tensors)
    record = PruneRecord("prune_magnitude", sparsity, scope, total, 0, tensors=list(names))
    groups = [(names, tensors)] if scope == "global" else [([n], [t]) for n, t in zip(names, tensors)]
    for gnames, gtensors in groups:
        k = round(sparsity * sum(t.numel() for t in gtensors))
        record.pruned += k
        if k == 0:
            continue
        # The native exact select on the weights' device (CPU or CUDA), in place. Strided
        # weights go through a contiguous copy; weights spread over several devices through
        # CPU copies (one global order needs one device). Copies are written back.
        same = all(t.device == gtensors[0].device for t in gtensors)
        target = gtensors[0].device if same else torch.device("cpu")
        work = [t.data.to(target).contiguous() for t in gtensors]
        thr, _, _ = ops.prune_smallest(work, k)
        for t, w in zip(gtensors, work):
            if w.device != t.device or w.data_ptr() != t.data_ptr():
                t.data.copy_(w)
        record.thresholds["global" if scope == "global" else gnames[0]] = thr
    return record
