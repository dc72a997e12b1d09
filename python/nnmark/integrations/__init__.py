"""Embedding marks inside existing training stacks, without rewriting the training code.

- plain PyTorch: :class:`PenaltyHook` (an optimizer step pre-hook);
- Lightning: :class:`nnmark.integrations.lightning.WatermarkCallback`;
- Hugging Face: :class:`nnmark.integrations.huggingface.WatermarkTrainer`
  (or the mixin ``WatermarkTrainerMixin`` for a Trainer subclass of your own).

The Lightning and Hugging Face modules import their framework, so they are not
imported here.
"""
from .core import Embedding
from .plain import PenaltyHook

__all__ = ["Embedding", "PenaltyHook"]
