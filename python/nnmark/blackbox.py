"""Black-box (trigger-set) checks: the one trigger verifier.

A model carries a trigger key when it answers the secret trigger set with the
owner's labels far more often than chance: with n triggers, hits top-1 matches
and a null hit rate p0 (1/num_classes by default, or one measured by
:func:`nnmark.calibrate`), the p-value is the exact P[Binomial(n, p0) >= hits].

:class:`TriggerCheck` runs the trigger set through a batch of opened checkpoints
(modules run themselves; state dicts and files are loaded into the architecture's
model, see :mod:`nnmark.inference`) and scores them in one native call.
``nnmark.verify``, ``nnmark.calibrate`` and ``nnmark.scan`` reach it through the
batch engine (:mod:`nnmark.scan.engine`).
"""
from __future__ import annotations

import torch

from . import ops
from .checkpoints import CheckpointError
from .inference import trigger_logits
from .stats import binomial_threshold, check_alpha, check_null_rate


def is_trigger_key(key) -> bool:
    from .triggers import TriggerKey

    return isinstance(key, TriggerKey)


class TriggerCheck:
    """One trigger key made ready to check many models (what every front door uses).

    ``run(sources, arch, device)`` gives, per source (a module, or a mapping of tensors
    to load into ``arch``'s model), the verdict fields of its row or the CheckpointError
    that kept it from running. ``null_rate``: the chance hit rate under the null
    hypothesis (default 1/num_classes)."""

    trigger = True

    def __init__(self, key, alpha: float = 1e-6, null_rate: float | None = None):
        if not is_trigger_key(key):
            raise TypeError(f"expected a trigger key (nnmark.TriggerKey), got {type(key).__name__}")
        self.key = key
        self.key_id = key.key_id
        self.alpha = check_alpha(alpha)
        self.p0 = key.null_rate if null_rate is None else check_null_rate(null_rate)
        self.null_rate = null_rate
        self.bits = key.n
        self.threshold = binomial_threshold(self.bits, self.alpha, self.p0)
        self._set: tuple[torch.Tensor, torch.Tensor] | None = None

    def triggers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trigger inputs and labels, regenerated once per check."""
        if self._set is None:
            self._set = self.key.triggers()
        return self._set

    def run(self, sources: list, arch=None, device=None) -> list:
        """Per source: ``{"matches", "ber", "p_value", "verified", "margin"}`` or a CheckpointError."""
        if not sources:
            return []
        x, y = self.triggers()
        logits, errors = trigger_logits(arch, sources, x, device=device)
        ok = [k for k, e in enumerate(errors) if e is None]
        res = ops.trigger_verify(logits[ok], y, null_rate=self.p0) if ok else None
        out: list = []
        j = 0
        n = self.bits
        for e in errors:
            if e is not None:
                out.append(e if isinstance(e, CheckpointError) else CheckpointError("invalid", "InferenceError", str(e)))
                continue
            hits, p = int(res["hits"][j]), float(res["p_value"][j])
            out.append({"matches": hits, "ber": 1.0 - hits / n, "p_value": p, "verified": p <= self.alpha,
                        "margin": float(res["margin"][j])})
            j += 1
        return out


__all__ = ["TriggerCheck", "is_trigger_key"]
