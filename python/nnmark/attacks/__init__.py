"""Attacks a watermark must survive (or be shown to fail against).

Each attack changes a model in place and returns a record of what it did.
"""
from .pruning import PruneRecord, prune_magnitude
from .weights import WeightAttackRecord, gaussian_noise, quantize

__all__ = ["prune_magnitude", "PruneRecord", "quantize", "gaussian_noise", "WeightAttackRecord"]

from .finetune import FineTuneRecord, finetune
from .fineprune import FinePruneRecord, fine_prune
from .overwrite import OverwriteRecord, attacker_key_like, overwrite

__all__ += ["finetune", "FineTuneRecord", "fine_prune", "FinePruneRecord", "overwrite", "OverwriteRecord",
            "attacker_key_like"]

from .obfuscation import ObfuscationRecord, RealignRecord, permute_units, realign

__all__ += ["permute_units", "ObfuscationRecord", "realign", "RealignRecord"]

from .activations import ChannelActivations, ChannelStats, channel_activations

__all__ += ["ChannelStats", "channel_activations", "ChannelActivations"]

from .forge import ForgeRecord, forge_key

__all__ += ["forge_key", "ForgeRecord"]

from .extraction import DistillRecord, distill

__all__ += ["distill", "DistillRecord"]

from .evasion import EvasionGuard, EvasionRecord, evasion_filter

__all__ += ["evasion_filter", "EvasionGuard", "EvasionRecord"]
