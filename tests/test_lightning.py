"""The Lightning adapter: nnmark.integrations.lightning.WatermarkCallback with a real
Lightning Trainer (CPU, tiny model): embeds under 32-bit and bf16 precision, the
penalty's gradient is clipped with the task's, trigger mixing, checkpoints without
secrets, resuming restores the callback's state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import nnmark
import pytest

L = pytest.importorskip("lightning.pytorch")
from nnmark.integrations.lightning import WatermarkCallback  # noqa: E402

from test_integrations import assert_no_secret  # noqa: E402

CARRIER = "net.2.weight"
SHAPE = (8, 16, 3, 3)


class Tiny(L.LightningModule):
    def __init__(self, lr=1e-2, opt="adam"):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                       torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
        self.lr, self.opt = lr, opt
        self.batch_sizes = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(x.shape[0])
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch)


def _trainer(tmp_path, **kw):
    opts = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    opts.update(kw)
    return L.Trainer(**opts)


def _key(bits=32, carrier=CARRIER):
    return nnmark.WhiteBoxKey.generate(carrier=carrier, bits=bits, shape=SHAPE)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_the_callback_embeds_the_mark(tmp_path, precision):
    key = _key()
    model = Tiny()
    cb = WatermarkCallback(key, strength=1.0)
    _trainer(tmp_path, max_epochs=6, precision=precision, callbacks=[cb]).fit(model, _loader())
    assert cb.embedding.steps == 6 * 8
    v = nnmark.verify(key, model)
    assert v.ber == 0.0 and v.verified
    # the carrier name is resolved with the LightningModule's own names, or under submodule=
    assert WatermarkCallback(nnmark.WhiteBoxKey.generate(carrier="2.weight", bits=32, shape=SHAPE),
                             submodule="net").network(model) is model.net


def test_gradient_clipping_applies_to_the_penalty(tmp_path):
    """Lightning clips after on_before_optimizer_step: with a huge penalty and a tiny clip
    norm, one SGD step at lr 1 moves the weights by at most the clip norm."""
    key = _key()
    model = Tiny(lr=1.0, opt="sgd")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cb = WatermarkCallback(key, strength=1000.0)
    _trainer(tmp_path, max_steps=1, gradient_clip_val=1e-3, gradient_clip_algorithm="norm",
             callbacks=[cb]).fit(model, _loader())
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert cb.embedding.steps == 1
    assert float((after - before).norm()) <= 1e-3 * 1.001


def test_gradient_accumulation_adds_the_penalty_once_per_step(tmp_path):
    key = _key()
    model = Tiny()
    cb = WatermarkCallback(key)
    _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=4, callbacks=[cb]).fit(model, _loader())
    assert cb.embedding.steps == 2  # 8 batches, 4 per optimizer step


def test_trigger_mixing_grows_every_batch(tmp_path):
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    mixer = nnmark.TriggerMixer(tkey, per_batch=3)
    model = Tiny()
    cb = WatermarkCallback(mixer=mixer)
    _trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, _loader())
    assert model.batch_sizes == [11] * 8 and mixer.cursor == 24
    assert cb.embedding.steps == 0  # no white-box mark: no penalty steps


def test_checkpoints_hold_the_state_and_no_secret_and_resume(tmp_path):
    key = _key()
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    ckpt_cb = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = WatermarkCallback(key, mixer=nnmark.TriggerMixer(tkey, per_batch=2))
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=True,
             callbacks=[cb, ckpt_cb]).fit(Tiny(), _loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert_no_secret(last.read_bytes(), key, tkey)
    saved = torch.load(last, weights_only=True)["callbacks"][cb.state_key]
    assert saved["steps"] == 16 and saved["mixer"]["cursor"] == 32
    assert saved["marks"][0]["key_id"] == key.key_id
    # resume: a new callback (the keys loaded again) continues from the saved state
    cb2 = WatermarkCallback(key, mixer=nnmark.TriggerMixer(tkey, per_batch=2))
    _trainer(tmp_path, max_epochs=3, callbacks=[cb2]).fit(Tiny(), _loader(), ckpt_path=str(last))
    assert cb2.embedding.steps == 24 and cb2.embedding.mixer.cursor == 48


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="nothing to embed"):
        WatermarkCallback()
    cb = WatermarkCallback(_key(carrier="net.9.weight"))
    with pytest.raises(KeyError, match="carrier"):
        _trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(Tiny(), _loader())
    with pytest.raises(ValueError, match="no submodule"):
        WatermarkCallback(_key(), submodule="body").network(Tiny())
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    cb = WatermarkCallback(mixer=nnmark.TriggerMixer(tkey))
    with pytest.raises(TypeError, match="list or dict"):
        cb.on_train_batch_start(None, None, (torch.zeros(1, 3, 8, 8), torch.zeros(1)), 0)


class SaveRankWeights(L.Callback):
    """Each rank writes its final weights (to check that the ranks stayed in step)."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.folder}/rank{trainer.global_rank}.pt")


def test_ddp_spawn_two_processes(tmp_path):
    """strategy="ddp_spawn" pickles the callbacks: given key-file paths, the callback
    travels without its secret, each rank loads the key and adds the same penalty."""
    key = _key()
    key.save(tmp_path / "owner.key")
    cb = WatermarkCallback(str(tmp_path / "owner.key"), strength=1.0)
    model = Tiny()
    trainer = _trainer(tmp_path, max_epochs=3, devices=2, strategy="ddp_spawn",
                       callbacks=[cb, SaveRankWeights(tmp_path)])
    trainer.fit(model, _loader())
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert nnmark.verify(key, model).ber == 0.0  # the weights came back from the ranks


def test_the_penalty_is_logged(tmp_path):
    import csv

    cb = WatermarkCallback(_key(), strength=1.0)
    logger = L.loggers.CSVLogger(str(tmp_path / "logs"))
    _trainer(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=2, callbacks=[cb]).fit(Tiny(), _loader())
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    with open(metrics) as f:
        values = [float(r["nnmark/penalty"]) for r in csv.DictReader(f) if r.get("nnmark/penalty")]
    assert len(values) == 8 and values[-1] < values[0]  # logged every other step, and falling
