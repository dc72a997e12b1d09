"""What every training-stack adapter shares: the marks, the penalty, its gradient, the state.

An adapter owns one :class:`Embedding`: a list of regularizers -- :class:`nnmark.Uchida`
(white-box marks in weights) and :class:`nnmark.DeepSigns` (white-box marks in
activations) -- and optionally a :class:`nnmark.TriggerMixer` (black-box marks).
Its state (steps done, the mixer's cursor, which keys) holds key ids only, never
a secret, so trainers may save it in their checkpoints.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch

from ..deepsigns import DeepSigns, DeepSignsKey
from ..keys import WhiteBoxKeyBase, load_key
from ..sharded import check_layout, is_dtensor
from ..triggers import TriggerKey, TriggerMixer
from ..whitebox import Uchida

Regularizer = Uchida | DeepSigns

STATE_VERSION = 1


def _is_path(m: Any) -> bool:
    return isinstance(m, (str, os.PathLike))


def as_regularizers(marks: Any, strength: float = 0.01) -> list[Regularizer]:
    """``marks``: an Uchida or DeepSigns regularizer, a white-box or DeepSigns key or
    key-file path (wrapped at ``strength``), or a list of them."""
    if marks is None:
        return []
    items = list(marks) if isinstance(marks, (list, tuple)) else [marks]
    out = []
    for m in items:
        if _is_path(m):
            m = load_key(m)
            if isinstance(m, TriggerKey):
                raise TypeError("a trigger key file was given in marks: pass it as mixer= (its triggers are "
                                "mixed into batches)")
        if isinstance(m, (Uchida, DeepSigns)):
            out.append(m)
        elif isinstance(m, WhiteBoxKeyBase):
            out.append(Uchida(m, strength=strength))
        elif isinstance(m, DeepSignsKey):
            out.append(DeepSigns(m, strength=strength))
        elif isinstance(m, TriggerKey):
            raise TypeError("a TriggerKey is embedded by mixing its triggers into batches: "
                            "pass mixer=nnmark.TriggerMixer(tkey) instead of listing it in marks")
        else:
            raise TypeError(f"marks must be nnmark.Uchida or nnmark.DeepSigns regularizers, or white-box keys "
                            f"(WhiteBoxKey, DenseKey, DeepSignsKey), got {type(m).__name__}")
    ids = [r.key.key_id for r in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the same key is listed twice in marks: {ids}")
    return out


def parameters_of(r: Regularizer, model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a regularizer's penalty moves: Uchida's carrier, or every trainable
    parameter for DeepSigns (those before its layer get a gradient)."""
    return r.parameters(model) if isinstance(r, DeepSigns) else [r.parameter(model)]


def where(r: Regularizer) -> str:
    """What a mark is embedded in, as states and messages name it: a carrier or a layer."""
    return r.key.layer if isinstance(r, DeepSigns) else r.key.carrier


def _no_autocast(device: torch.device):
    """The penalty is computed in float32 from the weights as they are: autocast off."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return nullcontext()


class Embedding:
    """The marks an adapter embeds, and its resumable state.

    - :meth:`penalty` (differentiable): the sum of the regularizers' penalties, for
      adapters that add it to the loss (Hugging Face ``compute_loss``);
    - :meth:`add_penalty_grad`: adds the penalty's gradient to the carriers' ``.grad``,
      for adapters that run just before the optimizer step (the plain-torch hook,
      Lightning). There the task gradient is final: unscaled by AMP, averaged by
      DDP, accumulated; every rank adds the same penalty gradient, so ranks stay
      in step without any extra communication.
    """

    def __init__(self, marks: Any = None, mixer: Any = None, strength: float = 0.01, per_batch: int | None = None):
        # Key-file paths are remembered: an adapter made from paths can be pickled (spawn
        # launchers such as Lightning's ddp_spawn do) and each process loads the keys itself.
        items = list(marks) if isinstance(marks, (list, tuple)) else [] if marks is None else [marks]
        # None: some mark is a key object, so this embedding cannot be pickled.
        self._paths = [os.fspath(m) for m in items] if all(_is_path(m) for m in items) else None
        self._strength = strength
        self._mixer_path = None
        self.regularizers = as_regularizers(marks, strength)
        if _is_path(mixer):
            self._mixer_path = os.fspath(mixer)
            mixer = load_key(mixer)
        if isinstance(mixer, TriggerKey):
            mixer = TriggerMixer(mixer, per_batch=per_batch)
        if mixer is not None and not isinstance(mixer, TriggerMixer):
            raise TypeError(f"mixer must be an nnmark.TriggerMixer, a TriggerKey or a trigger key file, "
                            f"got {type(mixer).__name__}")
        if not self.regularizers and mixer is None:
            raise ValueError("nothing to embed: give marks (white-box keys) and/or a mixer (trigger key)")
        self.mixer = mixer
        self.steps = 0  # optimizer steps the penalty was added to
        self._last: torch.Tensor | None = None  # kept as a tensor: no device sync per step

    def __repr__(self) -> str:
        ids = [r.key.key_id for r in self.regularizers]
        return f"Embedding(marks={ids}, mixer={self.mixer!r}, steps={self.steps})"

    # Pickling: only what was given as key-file paths travels, never a secret.
    def __getstate__(self) -> dict[str, Any]:
        if self._paths is None or (self.mixer is not None and self._mixer_path is None):
            raise TypeError("this nnmark adapter holds keys (secrets) and cannot be pickled, as spawn-based "
                            "launchers (Lightning's ddp_spawn, mp.spawn) need: give the keys as key-file paths "
                            "(marks=['owner.key'], mixer='triggers.key') and each process loads them")
        return {"paths": self._paths, "strength": self._strength, "mixer_path": self._mixer_path,
                "per_batch": self.mixer.per_batch if self.mixer is not None else None, "state": self.state_dict()}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(st["paths"] or None, mixer=st["mixer_path"], strength=st["strength"], per_batch=st["per_batch"])
        self.load_state_dict(st["state"])

    @property
    def key_ids(self) -> list[str]:
        return [r.key.key_id for r in self.regularizers]

    @property
    def last_penalty(self) -> float | None:
        """The penalty of the last step (a float; None before the first)."""
        return None if self._last is None else float(self._last)

    @property
    def last_penalty_tensor(self) -> torch.Tensor | None:
        """The penalty of the last step as a 0-d tensor on its device (no host sync; None before the first)."""
        return self._last

    def carriers(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """One tensor per mark: its carrier (Uchida), or the model's first trainable parameter
        (DeepSigns; its layer is resolved here, so that a missing one fails early)."""
        out = []
        for r in self.regularizers:
            if isinstance(r, DeepSigns):
                r.layer_of(model)
            params = parameters_of(r, model)
            if not params:
                raise ValueError(f"the model has no trainable parameter for the mark in {where(r)!r}")
            if isinstance(r, Uchida) and is_dtensor(params[0]):
                check_layout(r.key, params[0])  # a layout the penalty cannot handle fails before training
            out.append(params[0])
        return out

    @staticmethod
    def _total(regs: list[Regularizer], model: torch.nn.Module) -> torch.Tensor:
        """Sum of ``regs``' penalties, autocast off; refuses a frozen carrier while training."""
        params = [parameters_of(r, model) for r in regs]
        if torch.is_grad_enabled():
            for r, ws in zip(regs, params):
                if not ws or not any(w.requires_grad for w in ws):  # a constant penalty: no mark, and no error
                    what = "layer" if isinstance(r, DeepSigns) else "carrier"
                    raise ValueError(f"{what} {where(r)!r} does not require grad: the mark cannot be embedded")
        with _no_autocast(next((ws[0].device for ws in params if ws), torch.device("cpu"))):
            total = regs[0].penalty(model)
            for r in regs[1:]:
                total = total + r.penalty(model).to(total.device)
        return total

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """Sum of the marks' penalties (float32 scalar, differentiable, autocast off)."""
        if not self.regularizers:
            raise ValueError("no white-box marks to penalise")
        total = self._total(self.regularizers, model)
        self._last = total.detach()
        return total

    def add_penalty_grad(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Adds d(penalty)/d(carrier) to each carrier's ``.grad`` (creates it when None).

        ``optimizer``: the one about to step; marks whose carrier it does not update are
        left out of this step."""
        regs = self.regularizers
        owned = None
        if optimizer is not None:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            regs = [r for r in regs if any(id(w) in owned for w in parameters_of(r, model))]
        if not regs:
            return
        with torch.enable_grad():
            total = self._total(regs, model)
            unique = list({id(w): w for r in regs for w in parameters_of(r, model)
                           if owned is None or id(w) in owned}.values())
            # DeepSigns reaches only the parameters up to its layer: the others get no gradient
            grads = torch.autograd.grad(total, unique, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(unique, grads):
                if g is None:
                    continue
                if w.grad is None:
                    w.grad = g.to(w.dtype).contiguous()
                else:
                    w.grad.add_(g.to(w.grad.dtype))
        self._last = total.detach()
        self.steps += 1

    @torch.no_grad()
    def ber(self, model: torch.nn.Module) -> dict[str, float]:
        """Bit error rate per key id: 0.0 once a mark is embedded."""
        return {r.key.key_id: r.ber(model) for r in self.regularizers}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Steps, the marks' public fields and the mixer's cursor; no secret."""
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "marks": [{"key_id": r.key.key_id, "carrier": where(r), "strength": r.strength,
                       "bits": r.key.num_bits} for r in self.regularizers],
            "mixer": self.mixer.state_dict() if self.mixer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an nnmark embedding state (version {STATE_VERSION}): {type(state).__name__}")
        saved = [m.get("key_id") for m in state.get("marks", [])]
        if saved != self.key_ids:
            raise ValueError(f"the saved state embeds keys {saved}, this adapter embeds {self.key_ids}")
        if (state.get("mixer") is None) != (self.mixer is None):
            raise ValueError("the saved state and this adapter disagree on trigger mixing "
                             f"(saved: {'a mixer' if state.get('mixer') else 'none'}, "
                             f"here: {'a mixer' if self.mixer is not None else 'none'})")
        steps = state.get("steps")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"bad steps in the saved state: {steps!r}")
        if self.mixer is not None:
            self.mixer.load_state_dict(state["mixer"])
        self.steps = steps
