"""Hugging Face: a ``Trainer`` whose ``compute_loss`` adds the marks' penalty.

    from nnmark.integrations.huggingface import WatermarkTrainer
    trainer = WatermarkTrainer(model=model, args=args, train_dataset=ds, marks=[key])
    trainer.train()

or, for a Trainer subclass of your own, ``class MyTrainer(WatermarkTrainerMixin, MyBase)``.

The penalty is added to the training loss, so it goes through ``backward`` with
the task loss: AMP scaling, gradient clipping and DDP's all-reduce apply to it
(every rank adds the same penalty, so the average is the penalty). With gradient
accumulation it is scaled the way the Trainer scales the loss, so each optimizer
step gets the penalty once. Evaluation losses are left alone. With a ``mixer``,
the triggers are appended to ``inputs[trigger_input]`` and ``inputs[label_key]``.
The adapter's state (steps, mixer cursor, key ids; no secret) is written as
``nnmark_state.json`` into each ``checkpoint-N`` folder and read back by
``train(resume_from_checkpoint=...)``.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

from .core import Embedding

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError:
    raise ImportError('nnmark.integrations.huggingface needs transformers: pip install "nnmark[hf]"') from None

STATE_FILE = "nnmark_state.json"


class _SaveState(TrainerCallback):
    """Writes the adapter's state into each checkpoint folder the Trainer has just written."""

    def __init__(self, embedding: Embedding):
        self.embedding = embedding

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.embedding.steps = state.global_step
            tmp = os.path.join(folder, STATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.embedding.state_dict(), f)
            os.replace(tmp, os.path.join(folder, STATE_FILE))
        return control


class WatermarkTrainerMixin:
    """Adds nnmark's marks to a ``transformers.Trainer`` (subclass) through ``compute_loss``.

    Keyword arguments taken before the Trainer's own: ``marks`` (white-box keys or key-file
    paths at ``strength``, or :class:`nnmark.Uchida`), ``mixer`` (:class:`nnmark.TriggerMixer`,
    or a trigger key / key-file path mixed ``per_batch`` at a time; default a third of each batch),
    ``trigger_input`` (the input key the triggers join, default ``"pixel_values"``),
    ``label_key`` (default ``"labels"``). Carrier names are looked up in the model the
    Trainer trains (``model.``/``module.`` wrapper prefixes are tolerated).
    """

    def __init__(self, *args: Any, marks: Any = None, strength: float = 0.01, mixer: Any = None, per_batch: int | None = None,
                 trigger_input: str = "pixel_values", label_key: str = "labels", **kwargs: Any):
        self.nnmark = Embedding(marks, mixer=mixer, strength=strength, per_batch=per_batch)
        self.nnmark_trigger_input = trigger_input
        self.nnmark_label_key = label_key
        super().__init__(*args, **kwargs)
        self.nnmark.carriers(self.model)  # a missing carrier fails now, not at the first step
        self.add_callback(_SaveState(self.nnmark))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        training = model.training
        if training and self.nnmark.mixer is not None:
            inputs = self._nnmark_mix(inputs)
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        if not training or not self.nnmark.regularizers:
            return out
        loss, outputs = out if return_outputs else (out, None)
        penalty = self.nnmark.penalty(model).to(loss.device)
        # training_step divides the loss by the accumulation steps unless it is already
        # normalised over the whole accumulated batch: then the penalty is divided here.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        if scaled:
            ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            penalty = penalty / ga
        loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _nnmark_mix(self, inputs):
        key, labels = self.nnmark_trigger_input, self.nnmark_label_key
        if key not in inputs or labels not in inputs:
            raise KeyError(f"trigger mixing needs inputs[{key!r}] and inputs[{labels!r}]; the batch has "
                           f"{sorted(inputs)} (set trigger_input= / label_key=)")
        x, y = self.nnmark.mixer.mix(inputs[key], inputs[labels])
        mixed = dict(inputs)
        mixed[key], mixed[labels] = x, y
        return mixed

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.nnmark.regularizers and self.nnmark.last_penalty is not None:
            logs = {**logs, "nnmark_penalty": self.nnmark.last_penalty}
        return super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if folder:
            path = os.path.join(folder, STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.nnmark.load_state_dict(json.load(f))
            else:
                warnings.warn(f"{folder} has no {STATE_FILE} (saved without nnmark?): "
                              "the watermark state starts afresh", stacklevel=2)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class WatermarkTrainer(WatermarkTrainerMixin, Trainer):
    """``transformers.Trainer`` with nnmark's marks: ``WatermarkTrainer(..., marks=[key])``."""
