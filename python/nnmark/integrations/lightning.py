"""Lightning: a callback that embeds marks without touching the LightningModule.

    from nnmark.integrations.lightning import WatermarkCallback
    trainer = L.Trainer(callbacks=[WatermarkCallback(key)], precision="bf16-mixed")

The penalty's gradient is added in ``on_before_optimizer_step``: after Lightning
has unscaled AMP gradients and before it clips them, so clipping (and every
other gradient hook) sees the task and the penalty together; with gradient
accumulation it is added once per optimizer step; under DDP every rank adds the
same gradient. With a ``mixer`` the triggers are appended to each training batch
in ``on_train_batch_start`` (the batch must be a list or dict, as the default
collate gives). The callback's state (steps, mixer cursor, key ids; no secret)
is saved in Lightning checkpoints and restored on ``fit(ckpt_path=...)``.
"""
from __future__ import annotations

from typing import Any

import torch

from .core import Embedding

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError('nnmark.integrations.lightning needs Lightning: pip install "nnmark[lightning]"') from None


def _fsdp1_wraps(root, module) -> bool:
    """Whether ``root`` is an FSDP1 unit wrapping ``module`` (no import of FSDP when unused)."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(root, fsdp.FullyShardedDataParallel) and root.module is module


class WatermarkCallback(pl.Callback):
    """Embeds ``marks`` (white-box keys or key-file paths at ``strength``, or
    :class:`nnmark.Uchida`) and/or the triggers of ``mixer`` (a :class:`nnmark.TriggerMixer`,
    or a trigger key / key-file path mixed ``per_batch`` at a time; default a third of each batch) while a Lightning
    ``Trainer`` fits. Given as key-file paths, the callback can be pickled, as
    ``strategy="ddp_spawn"`` needs: each process loads the keys from the files.

    ``submodule``: the attribute path of the network inside the LightningModule when
    carrier names are relative to it (``"net"`` for ``self.net``); by default the
    carrier is looked up in the LightningModule itself (``model.`` and ``module.``
    prefixes are tolerated). ``inputs``/``labels``: where a batch keeps them (list
    indices or dict keys) for trigger mixing. ``log``: log ``nnmark/penalty`` each step.
    """

    def __init__(self, marks: Any = None, strength: float = 0.01, mixer: Any = None, per_batch: int | None = None,
                 submodule: str | None = None, inputs: int | str = 0, labels: int | str = 1, log: bool = True):
        super().__init__()
        self.embedding = Embedding(marks, mixer=mixer, strength=strength, per_batch=per_batch)
        self.submodule = submodule
        self.inputs, self.labels = inputs, labels
        self.log = bool(log)

    def __repr__(self) -> str:
        return f"WatermarkCallback({self.embedding!r})"

    @property
    def state_key(self) -> str:
        # One state per set of keys: two callbacks with other keys do not collide.
        return self._generate_state_key(keys=tuple(self.embedding.key_ids),
                                        mixer=self.embedding.mixer.key.key_id if self.embedding.mixer else None)

    def network(self, pl_module: torch.nn.Module, trainer=None) -> torch.nn.Module:
        if self.submodule is None:
            # FSDPStrategy wraps the whole LightningModule in one FSDP1 unit: the unit, which
            # holds the carriers' slices, is looked up from the wrapper (names are the same).
            root = getattr(getattr(trainer, "strategy", None), "model", None)
            return root if root is not pl_module and _fsdp1_wraps(root, pl_module) else pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise ValueError(f"the LightningModule has no submodule {self.submodule!r}") from None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.embedding.carriers(self.network(pl_module))  # a missing carrier fails before training

    def on_fit_start(self, trainer, pl_module) -> None:
        # Again once the strategy has sharded the model (configure_model runs after setup):
        # a carrier layout the penalty cannot handle fails before the first step.
        self.embedding.carriers(self.network(pl_module, trainer))

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        mixer = self.embedding.mixer
        if mixer is None:
            return
        if not isinstance(batch, (list, dict)):
            raise TypeError(f"trigger mixing changes the batch in place, which needs a list or dict batch, "
                            f"got {type(batch).__name__}; or mix in the DataLoader: collate_fn=mixer.collate")
        batch[self.inputs], batch[self.labels] = mixer.mix(batch[self.inputs], batch[self.labels])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer: torch.optim.Optimizer) -> None:
        if not self.embedding.regularizers:
            return
        before = self.embedding.steps
        self.embedding.add_penalty_grad(self.network(pl_module, trainer), optimizer)
        if self.log and trainer.loggers and self.embedding.steps != before:
            pl_module.log("nnmark/penalty", self.embedding.last_penalty_tensor.float(), on_step=True, prog_bar=False,
                          logger=True, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return self.embedding.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.embedding.load_state_dict(state_dict)
