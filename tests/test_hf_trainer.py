"""The Hugging Face adapter: nnmark.integrations.huggingface.WatermarkTrainer with a real
transformers Trainer (CPU, tiny model): the penalty joins the training loss only
(scaled like the loss under gradient accumulation), embeds the mark, trigger mixing,
checkpoints hold the adapter's state and no secret, resuming restores it; 2-process DDP
over gloo under torch.distributed.run; a torch.compile'd model; FSDP2 on 2 processes over
gloo, both ways transformers has: ``from_pretrained(distributed_config=...)`` (its own
fully_shard, which runs on the CPU as it is) and ``TrainingArguments(fsdp=True)`` through
accelerate. On the CPU accelerate (1.16) never selects its FSDP mode: accelerate/state.py,
``AcceleratorState.__init__``, sets ``DistributedType.FSDP`` only inside the branch for
``MULTI_GPU, MULTI_MLU, ... MULTI_NEURON``, which leaves out ``MULTI_CPU``, so ``fsdp=...``
runs as plain DDP and nothing is sharded. That test makes the same selection for
``MULTI_CPU`` (patching nothing else), and accelerate's real FSDP2 path shards the model."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import nnmark

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import TrainingArguments  # noqa: E402

from nnmark.integrations.huggingface import STATE_FILE, WatermarkTrainer  # noqa: E402
from _dist import run_two  # noqa: E402
from test_integrations import assert_no_secret  # noqa: E402

SHAPE = (8, 16, 3, 3)


class TinyNet(torch.nn.Module):
    """A model as the Trainer expects: keyword inputs, a dict with "loss"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
        self.seen = []

    def forward(self, pixel_values, labels=None):
        self.seen.append(pixel_values.shape[0])
        logits = self.body(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _args(tmp_path, **kw):
    opts = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=8,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=4, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)
    opts.update(kw)
    return TrainingArguments(**opts)


def _key(bits=32):
    return nnmark.WhiteBoxKey.generate(carrier="body.2.weight", bits=bits, shape=SHAPE)


def test_the_penalty_joins_the_training_loss_only(tmp_path):
    key = _key()
    model = TinyNet()
    trainer = WatermarkTrainer(model=model, args=_args(tmp_path), train_dataset=Data(), marks=[key], strength=0.5)
    batch = {"pixel_values": Data().x[:8], "labels": Data().y[:8]}
    task = F.cross_entropy(model.body(batch["pixel_values"]), batch["labels"])
    penalty = nnmark.Uchida(key, strength=0.5).penalty(model)
    model.train()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), task + penalty)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), task)  # evaluation: no penalty
    # a loss the Trainer does not divide by the accumulation steps gets the penalty divided here
    model.train()
    trainer.loss_is_scaled_for_ga = True
    trainer.current_gradient_accumulation_steps = 4
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch), num_items_in_batch=8), task + penalty / 4)


def test_training_embeds_the_mark_and_logs_the_penalty(tmp_path):
    key = _key()
    model = TinyNet()
    trainer = WatermarkTrainer(model=model, args=_args(tmp_path, max_steps=40, gradient_accumulation_steps=2),
                               train_dataset=Data(), marks=[key], strength=1.0)
    trainer.train()
    v = nnmark.verify(key, model)
    assert v.ber == 0.0 and v.verified
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("nnmark_penalty" in h for h in logged)


def test_bf16_autocast(tmp_path):
    key = _key()
    model = TinyNet()
    trainer = WatermarkTrainer(model=model, args=_args(tmp_path, max_steps=30, bf16=True), train_dataset=Data(),
                               marks=[key], strength=1.0)
    trainer.train()
    assert nnmark.verify(key, model).ber == 0.0


def test_trigger_mixing(tmp_path):
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    mixer = nnmark.TriggerMixer(tkey, per_batch=3)
    model = TinyNet()
    trainer = WatermarkTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=Data(), mixer=mixer)
    trainer.train()
    assert model.seen == [11] * 4 and mixer.cursor == 12


def test_checkpoints_hold_the_state_and_no_secret_and_resume(tmp_path):
    key = _key()
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    args = _args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    trainer = WatermarkTrainer(model=TinyNet(), args=args, train_dataset=Data(), marks=[key],
                               mixer=nnmark.TriggerMixer(tkey, per_batch=2))
    trainer.train()
    out = tmp_path / "out"
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        state = json.loads((out / ckpt / STATE_FILE).read_text())
        step = int(ckpt.split("-")[1])
        assert state["steps"] == step and state["mixer"]["cursor"] == 2 * step
        assert state["marks"][0]["key_id"] == key.key_id
    for f in out.rglob("*"):
        if f.is_file():
            assert_no_secret(f.read_bytes(), key, tkey)
    # resume from checkpoint-3: the mixer's cursor comes back, and goes on to step 6
    mixer = nnmark.TriggerMixer(tkey, per_batch=2)
    again = WatermarkTrainer(model=TinyNet(), args=args, train_dataset=Data(), marks=[key], mixer=mixer)
    again.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert mixer.cursor == 12
    other = WatermarkTrainer(model=TinyNet(), args=args, train_dataset=Data(), marks=[_key()])
    with pytest.raises(ValueError, match="embeds keys"):
        other.train(resume_from_checkpoint=True)  # the last checkpoint embeds another key


def test_bad_input(tmp_path):
    with pytest.raises(KeyError, match="carrier"):
        WatermarkTrainer(model=TinyNet(), args=_args(tmp_path), train_dataset=Data(),
                         marks=[nnmark.WhiteBoxKey.generate(carrier="body.9.weight", bits=32)])
    with pytest.raises(ValueError, match="nothing to embed"):
        WatermarkTrainer(model=TinyNet(), args=_args(tmp_path), train_dataset=Data())
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    trainer = WatermarkTrainer(model=TinyNet(), args=_args(tmp_path), train_dataset=Data(),
                               mixer=nnmark.TriggerMixer(tkey), trigger_input="images")
    with pytest.raises(KeyError, match="images"):
        trainer.train()


DDP_WORKER = '''
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, os.environ["NNMARK_TESTS_DIR"])
from test_hf_trainer import Data, TinyNet, _args
from nnmark.integrations.huggingface import WatermarkTrainer

out = Path(sys.argv[1])
torch.set_num_threads(1)
model = TinyNet()
trainer = WatermarkTrainer(model=model, args=_args(out, max_steps=20, per_device_train_batch_size=4),
                           train_dataset=Data(), marks=[str(out / "owner.key")], strength=1.0)
trainer.train()
torch.save({"params": model.state_dict(), "world": trainer.args.world_size,
            "distributed": str(trainer.accelerator.distributed_type)}, out / f"rank{os.environ['RANK']}.pt")
# Tear gloo down while both ranks are alive: left to the interpreter's exit, a rank whose
# partner is already gone can abort in the process group's destructor (a flaky SIGABRT).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def test_ddp_two_processes_gloo(tmp_path):
    """Two CPU processes under torch.distributed.run: the Trainer runs DDP over gloo, each
    rank adds the same penalty to its loss, the ranks end with the same weights, marked."""
    key = _key()
    key.save(tmp_path / "owner.key")
    run_two(tmp_path, DDP_WORKER)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == 2 and "MULTI_CPU" in r0["distributed"]
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert nnmark.verify(key, r0["params"]).ber == 0.0


class SteadyNet(TinyNet):
    """TinyNet without the per-call list append (which makes torch.compile recompile each step)."""

    def forward(self, pixel_values, labels=None):
        logits = self.body(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_a_compiled_model(tmp_path):
    """torch_compile=True (the Trainer compiles: compute_loss gets the compiled module,
    names ``_orig_mod.body.2.weight``) embeds the mark; a model the user compiled
    resolves its carrier and gets the same penalty."""
    key = _key()
    model = SteadyNet()
    trainer = WatermarkTrainer(model=model, args=_args(tmp_path, max_steps=40, torch_compile=True),
                               train_dataset=Data(), marks=[key], strength=1.0)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    v = nnmark.verify(key, model)
    assert v.ber == 0.0 and v.verified
    compiled = torch.compile(SteadyNet())
    trainer = WatermarkTrainer(model=compiled, args=_args(tmp_path), train_dataset=Data(), marks=[key], strength=0.5)
    assert "_orig_mod.body.2.weight" in compiled.state_dict()
    batch = {"pixel_values": Data().x[:8], "labels": Data().y[:8]}
    task = F.cross_entropy(compiled._orig_mod.body(batch["pixel_values"]), batch["labels"])
    penalty = nnmark.Uchida(key, strength=0.5).penalty(compiled._orig_mod)
    torch.testing.assert_close(trainer.compute_loss(compiled, dict(batch)), task + penalty)


FSDP_WORKER = '''
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, os.environ["NNMARK_TESTS_DIR"])
from transformers import TrainerCallback
from test_hf_trainer import Data, TinyNet, _args
from nnmark.integrations.huggingface import WatermarkTrainer

out, mode = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
CARRIER = {"native": "model.layers.0.mlp.down_proj.weight", "accelerate": "body.2.weight"}[mode]


class Layout(TrainerCallback):
    """The carrier as the Trainer trains it, after each step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        w = model.get_parameter(CARRIER)
        self.seen = (type(w).__name__, str(tuple(getattr(w, "placements", ()))), tuple(w.to_local().shape))


if mode == "accelerate":
    import accelerate.state as st
    from accelerate.utils import DistributedType

    init = st.AcceleratorState.__init__

    def cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        """What AcceleratorState.__init__ does for MULTI_GPU when given an FSDP plugin, done for MULTI_CPU."""
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    st.AcceleratorState.__init__ = cpu_fsdp
    model, data = TinyNet(), Data()
    args = _args(out, max_steps=20, per_device_train_batch_size=4, fsdp=True, fsdp_config={"version": 2})
else:
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    model = LlamaForCausalLM.from_pretrained(out / "tiny", distributed_config=DistributedConfig(fsdp_size=2))
    data = Tokens()
    # the task pulls on down_proj as hard as the penalty: more steps than TinyNet needs
    args = _args(out, max_steps=80, per_device_train_batch_size=4)
layout = Layout()
trainer = WatermarkTrainer(model=model, args=args, train_dataset=data, marks=[str(out / "owner.key")],
                           strength=1.0, callbacks=[layout])
trainer.train()
full = {n: p.full_tensor().detach() for n, p in trainer.model.named_parameters()}  # every rank joins
torch.save({"params": full, "layout": layout.seen, "distributed": str(trainer.accelerator.distributed_type)},
           out / f"rank{os.environ['RANK']}.pt")
if torch.distributed.is_initialized():  # torn down while both ranks are alive (see DDP_WORKER)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


@pytest.mark.parametrize("mode", ["native", "accelerate"])
def test_fsdp2_two_processes_gloo(tmp_path, mode):
    """FSDP2 on 2 CPU processes: the carrier is a DTensor shard on each rank while the
    Trainer trains, the penalty projects the shards (never gathered), the ranks end with the
    same weights and the owner's bits come out of the gathered weights.

    ``native``: transformers shards a tiny Llama itself, ``from_pretrained(...,
    distributed_config=DistributedConfig(fsdp_size=2))``; the carrier is a decoder layer's
    ``down_proj`` [32, 64]. ``accelerate``: ``TrainingArguments(fsdp=True, fsdp_config=
    {"version": 2})`` with accelerate's FSDP mode selected on the CPU (see the module's
    docstring); the carrier is TinyNet's ``body.2.weight`` [8, 16, 3, 3]."""
    if mode == "native":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
        key = nnmark.WhiteBoxKey.generate(carrier="model.layers.0.mlp.down_proj.weight", bits=32, shape=(32, 64))
        local = (16, 64)
    else:
        key = _key()
        local = (4, 16, 3, 3)
    key.save(tmp_path / "owner.key")
    run_two(tmp_path, FSDP_WORKER, mode)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["layout"] == r1["layout"] == ("DTensor", "(Shard(dim=0),)", local)
    if mode == "accelerate":
        assert r0["distributed"] == "DistributedType.FSDP"
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    v = nnmark.verify(key, r0["params"])
    assert v.ber == 0.0 and v.verified
