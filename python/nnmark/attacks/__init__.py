"""Attacks a watermark must survive (or be shown to fail against).

Each attack changes a model in place and returns a record of what it did.
"""
from .pruning import PruneRecord, prune_magnitude
from .weights import WeightAttackRecord, gaussian_noise, quantize

__all__ = ["prune_magnitude", "PruneRecord", "quantize", "gaussian_noise", "WeightAttackRecord"]
