"""Plain PyTorch: an optimizer step pre-hook that adds the penalty's gradient.

    hook = nnmark.PenaltyHook(model, key).attach(optimizer)
    for x, y in loader:                      # the training loop is unchanged
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()

The hook runs inside ``optimizer.step()``, after ``loss.backward()``; so with a
``GradScaler`` it sees unscaled gradients (``scaler.step`` unscales before it
steps, and skips the step, and so the hook, on inf/NaN), with gradient
accumulation it adds the penalty once per step, and under DDP it adds the same
gradient on every rank after the all-reduce. Clipping done between backward and
step does not include the penalty's gradient (Lightning's callback does).
"""
from __future__ import annotations

from typing import Any

import torch

from .core import Embedding, parameters_of, where


class PenaltyHook:
    """Embeds white-box ``marks`` in ``model`` through ``optimizer.step()``.

    ``marks``: white-box or DeepSigns keys or key-file paths (each at ``strength``) or
    :class:`nnmark.Uchida` / :class:`nnmark.DeepSigns` regularizers, one or a list. ``mixer``: an optional
    :class:`nnmark.TriggerMixer` (or a trigger key / key-file path, ``per_batch`` a step; default a third of each batch, as TriggerMixer)
    whose cursor is saved with this hook's state (call ``hook.mix(x, y)`` in the loop,
    or use ``mixer.collate`` in the DataLoader). ``state_dict()`` holds no secret: save
    it with the model and optimizer, ``load_state_dict`` it when resuming.
    """

    def __init__(self, model: torch.nn.Module, marks: Any, strength: float = 0.01, mixer: Any = None,
                 per_batch: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PenaltyHook needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.embedding = Embedding(marks, mixer=mixer, strength=strength, per_batch=per_batch)
        if not self.embedding.regularizers:
            raise ValueError("PenaltyHook needs at least one white-box mark (a mixer alone needs no hook)")
        self.embedding.carriers(model)  # a missing carrier fails here, not at the first step
        self._handles: list = []

    def __repr__(self) -> str:
        return f"PenaltyHook(marks={self.embedding.key_ids}, steps={self.steps}, attached={len(self._handles)})"

    @property
    def steps(self) -> int:
        return self.embedding.steps

    @property
    def last_penalty(self) -> float | None:
        return self.embedding.last_penalty

    def attach(self, optimizer: torch.optim.Optimizer) -> PenaltyHook:
        """Registers the step pre-hook on ``optimizer``; returns self. Every carrier must be
        among the optimizer's parameters (else the mark could never be embedded)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for r in self.embedding.regularizers:
            if not any(id(w) in owned for w in parameters_of(r, self.model)):
                raise ValueError(f"the optimizer does not update carrier {where(r)!r}: "
                                 "pass the model's parameters (or a group holding it) to the optimizer")

        def pre_step(opt, args, kwargs):
            self.embedding.add_penalty_grad(self.model, opt)

        self._handles.append(optimizer.register_step_pre_hook(pre_step))
        return self

    def remove(self) -> None:
        """Detaches from every optimizer it was attached to."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixer's ``mix(x, y)`` (triggers appended to the batch)."""
        if self.embedding.mixer is None:
            raise ValueError("this hook has no mixer: PenaltyHook(..., mixer=nnmark.TriggerMixer(tkey))")
        return self.embedding.mixer.mix(x, y)

    def ber(self) -> dict[str, float]:
        """Bit error rate per key id."""
        return self.embedding.ber(self.model)

    def state_dict(self) -> dict[str, Any]:
        return self.embedding.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.embedding.load_state_dict(state)
