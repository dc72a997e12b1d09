"""The Lightning adapter: nnmark.integrations.lightning.WatermarkCallback with a real
Lightning Trainer (CPU, tiny model): embeds under 32-bit and bf16 precision, the
penalty's gradient is clipped with the task's, trigger mixing, checkpoints without
secrets, resuming restores the callback's state; a torch.compile'd model; FSDP2 through
ModelParallelStrategy and FSDP1 through FSDPStrategy (2 processes over gloo).

Lightning refuses FSDPStrategy on the CPU accelerator ("requires a GPU accelerator",
lightning/pytorch/trainer/connectors/accelerator_connector.py, _check_strategy_and_fallback),
a check of ``type(strategy) is FSDPStrategy``: the FSDP1 test runs a subclass that changes
nothing else. Its own wrapping passes ``device_id=root_device.index`` (None on the CPU),
which torch's FSDP1 refuses ("FSDP needs a non-CPU accelerator device"), so the test
wraps in ``configure_model`` with ``device_id=cpu``, as Lightning's manual wrapping does;
the callback's path for Lightning's own wrapping (one unit around the LightningModule)
is run with that unit made by hand."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import nnmark
import pytest

L = pytest.importorskip("lightning.pytorch")
from nnmark.integrations.lightning import WatermarkCallback  # noqa: E402

from _dist import run_two  # noqa: E402
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


class Steady(Tiny):
    """Tiny without the per-step Python side effect (a list append) that would make
    torch.compile recompile on every step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


@pytest.mark.parametrize("what", ["module", "submodule"])
def test_the_callback_embeds_into_a_compiled_model(tmp_path, what):
    """torch.compile of the LightningModule (Lightning unwraps it: names unchanged) or of
    its network (``net._orig_mod.2.weight``): the key's ``net.2.weight`` resolves and embeds."""
    key = _key()
    model = Steady()
    if what == "module":
        fitted = torch.compile(model)
    else:
        model.net = fitted = torch.compile(model.net)
        fitted = model
    cb = WatermarkCallback(key, strength=1.0)
    _trainer(tmp_path, max_epochs=6, callbacks=[cb]).fit(fitted, _loader())
    assert cb.embedding.steps == 6 * 8
    sd = model.state_dict()
    assert ("net._orig_mod.2.weight" in sd) == (what == "submodule")
    v = nnmark.verify(key, sd)
    assert v.ber == 0.0 and v.verified


class Sharded(Steady):
    """FSDP2 in configure_model, as ModelParallelStrategy asks: the carrier becomes a DTensor
    sharded over the data-parallel mesh."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Probe(L.Callback):
    """Records the carrier's layout while training and saves the full weights at the end."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        w = pl_module.net[2].weight
        self.layout = f"{type(w).__name__} {tuple(getattr(w, 'placements', ()))}"

    def on_train_end(self, trainer, pl_module):
        full = {n: p.full_tensor().detach() for n, p in pl_module.named_parameters()}
        torch.save({"params": full, "layout": self.layout}, f"{self.folder}/rank{trainer.global_rank}.pt")


FSDP_WORKER = '''
import os, sys
import torch
sys.path.insert(0, os.environ["NNMARK_TESTS_DIR"])
import lightning.pytorch as L
from lightning.pytorch.strategies import ModelParallelStrategy
from test_lightning import Probe, Sharded, _loader, _trainer
from nnmark.integrations.lightning import WatermarkCallback

out = sys.argv[1]
torch.set_num_threads(1)
cb = WatermarkCallback(os.path.join(out, "owner.key"), strength=1.0)
trainer = _trainer(out, max_epochs=3, devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                   callbacks=[cb, Probe(out)])
trainer.fit(Sharded(), _loader())
assert cb.embedding.steps == 3 * 4, cb.embedding.steps  # 8 batches an epoch, 4 per rank
if torch.distributed.is_initialized():  # torn down while both ranks are alive (see test_hf_trainer)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def test_fsdp2_through_model_parallel_strategy_two_processes(tmp_path):
    """ModelParallelStrategy with fully_shard in configure_model, 2 CPU processes over gloo:
    the callback's penalty is computed on the DTensor shards (never gathered), the ranks
    end with the same weights and the mark embeds."""
    key = _key()
    key.save(tmp_path / "owner.key")
    run_two(tmp_path, FSDP_WORKER)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["layout"] == r1["layout"] == "DTensor (Shard(dim=0),)"
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    v = nnmark.verify(key, r0["params"])
    assert v.ber == 0.0 and v.verified


class Wrapped(Steady):
    """FSDP1 in configure_model (Lightning's manual wrapping; FSDPStrategy then wraps nothing
    more): the carrier becomes a 1-D slice of the unit's flattened parameter on each rank."""

    def configure_model(self):
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.net = FullyShardedDataParallel(self.net, use_orig_params=True, device_id=torch.device("cpu"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SliceProbe(L.Callback):
    """Records the carrier's shape while training and saves the full weights at the end."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shape = tuple(pl_module.net.get_parameter("_fsdp_wrapped_module.2.weight").shape)

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(pl_module.net):
            full = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"params": full, "shape": self.shape, "strategy": type(trainer.strategy).__mro__[1].__name__},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


FSDP1_WORKER = '''
import os, sys
from types import SimpleNamespace
import torch
import torch.nn.functional as F
sys.path.insert(0, os.environ["NNMARK_TESTS_DIR"])
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
import nnmark
from test_lightning import SliceProbe, Steady, Wrapped, _loader, _trainer
from nnmark.integrations.lightning import WatermarkCallback


class CpuFSDPStrategy(FSDPStrategy):
    """FSDPStrategy itself: a subclass only escapes the accelerator connector's GPU check."""


out = sys.argv[1]
torch.set_num_threads(1)
key = os.path.join(out, "owner.key")
cb = WatermarkCallback(key, strength=1.0)
trainer = _trainer(out, max_epochs=3, devices=2, strategy=CpuFSDPStrategy(), callbacks=[cb, SliceProbe(out)])
trainer.fit(Wrapped(), _loader())
assert trainer.strategy.kwargs["use_orig_params"] is True  # FSDPStrategy's default
assert cb.embedding.steps == 3 * 4, cb.embedding.steps

# Lightning's own wrapping puts one unit around the LightningModule (trainer.strategy.model):
# the callback looks the carrier up from there; the LightningModule alone is refused.
module = Steady()
root = FullyShardedDataParallel(module, use_orig_params=True, device_id=torch.device("cpu"))
fake = SimpleNamespace(strategy=SimpleNamespace(model=root), loggers=[])
opt = torch.optim.SGD(root.parameters(), lr=0.1)
x, y = next(iter(_loader()))
F.cross_entropy(root(x), y).backward()
cb = WatermarkCallback(key, strength=1.0)
try:
    cb.on_before_optimizer_step(SimpleNamespace(strategy=SimpleNamespace(model=module), loggers=[]), module, opt)
    raise AssertionError("the LightningModule inside an FSDP1 unit was not refused")
except ValueError as exc:
    assert "outside the module given" in str(exc), exc
cb.on_before_optimizer_step(fake, module, opt)
assert cb.embedding.steps == 1
whole = nnmark.Uchida(nnmark.load_key(key), strength=1.0).penalty(Steady()).item()
assert abs(cb.embedding.last_penalty - whole) < 1e-4 * whole, (cb.embedding.last_penalty, whole)
if torch.distributed.is_initialized():  # torn down while both ranks are alive (see test_hf_trainer)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def test_fsdp1_through_fsdp_strategy_two_processes(tmp_path):
    """FSDPStrategy (FSDP1, use_orig_params=True) on 2 CPU processes over gloo: each rank's
    carrier is a 1-D slice of the flattened weight, the callback projects the slices (never
    gathered), the ranks end with the same weights and the mark embeds."""
    key = _key()
    key.save(tmp_path / "owner.key")
    run_two(tmp_path, FSDP1_WORKER)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["strategy"] == r1["strategy"] == "FSDPStrategy"
    assert r0["shape"] == (1001,) and r1["shape"] == (151,)  # 1-D slices of the 1152 elements
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    v = nnmark.verify(key, r0["params"])
    assert v.ber == 0.0 and v.verified
