"""The plain-torch adapter (nnmark.PenaltyHook) and what every adapter shares
(nnmark.integrations.Embedding): the penalty's gradient is added exactly once per
optimizer step, after AMP unscaling; bf16/fp16 weights; 2-process DDP over gloo;
state without secrets."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import nnmark
from nnmark.integrations import Embedding, PenaltyHook


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)).to(dtype)


def _batch(step, rank=0, n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, 3, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _key(bits=32):
    return nnmark.WhiteBoxKey.generate(carrier="2.weight", bits=bits, shape=(8, 16, 3, 3))


def secrets_of(*keys) -> list[bytes]:
    """Every form a key's secret could take in a file: raw bytes, hex (both cases)."""
    out = []
    for k in keys:
        s = k._secret
        out += [s, s.hex().encode(), s.hex().upper().encode()]
    return out


def assert_no_secret(data: bytes, *keys) -> None:
    for s in secrets_of(*keys):
        assert s not in data


def test_the_hook_adds_exactly_the_penalty_gradient():
    key = _key()
    ref, hooked = _net(), _net()
    reg = nnmark.Uchida(key, strength=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(hooked.parameters(), lr=0.1)
    hook = PenaltyHook(hooked, reg).attach(opt)
    for step in range(3):
        x, y = _batch(step)
        loss = F.cross_entropy(ref(x), y) + reg.penalty(ref)  # the penalty in the loss, by hand
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()
        loss = F.cross_entropy(hooked(x), y)  # the training loop as it was
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(ref.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert hook.steps == 3 and hook.last_penalty > 0


def test_with_gradient_accumulation_the_penalty_is_added_once_per_step():
    key = _key()
    ref, hooked = _net(), _net()
    reg = nnmark.Uchida(key, strength=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(hooked.parameters(), lr=0.1)
    PenaltyHook(hooked, reg).attach(opt)
    opt_ref.zero_grad()
    opt.zero_grad()
    for micro in range(3):
        x, y = _batch(micro)
        (F.cross_entropy(ref(x), y) / 3).backward()
        (F.cross_entropy(hooked(x), y) / 3).backward()
    reg.penalty(ref).backward()
    opt_ref.step()
    opt.step()
    for a, b in zip(ref.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_mark_is_embedded_and_verifies():
    key = _key(bits=48)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = PenaltyHook(model, key, strength=1.0).attach(opt)
    for step in range(60):
        x, y = _batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert hook.ber() == {key.key_id: 0.0}
    v = nnmark.verify(key, model)
    assert v.verified and v.ber == 0.0


def test_under_a_grad_scaler_the_penalty_gradient_is_unscaled():
    """fp16 autocast + GradScaler (scale 2^12): the hook runs inside scaler.step, after the
    unscale, so the update differs from an unhooked run by exactly lr * the penalty gradient."""
    key = _key()
    reg = nnmark.Uchida(key, strength=0.5)
    runs = []
    for hooked in (False, True):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if hooked:
            PenaltyHook(model, reg).attach(opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
        x, y = _batch(0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 4096.0  # the step was taken (no inf)
        runs.append(model[2].weight.detach().clone())
    before = _net()
    g = torch.autograd.grad(reg.penalty(before), before[2].weight)[0]
    torch.testing.assert_close(runs[0] - runs[1], 0.1 * g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    key = _key(bits=32)
    model = _net(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hook = PenaltyHook(model, key, strength=2.0).attach(opt)
    for step in range(40):
        x, y = _batch(step, dtype=dtype)
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert model[2].weight.grad.dtype == dtype
    assert hook.ber() == {key.key_id: 0.0}
    assert nnmark.verify(key, model).verified


def test_under_bf16_autocast_with_float32_weights():
    key = _key(bits=32)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = PenaltyHook(model, key, strength=1.0).attach(opt)
    for step in range(40):
        x, y = _batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert hook.ber() == {key.key_id: 0.0}
    assert isinstance(hook.last_penalty, float)


def test_state_round_trip_and_no_secret_in_the_checkpoint(tmp_path):
    key = _key()
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = PenaltyHook(model, key, mixer=nnmark.TriggerMixer(tkey, per_batch=2)).attach(opt)
    for step in range(5):
        x, y = hook.mix(*_batch(step))
        assert x.shape[0] == 10
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "nnmark": hook.state_dict()}, path)
    assert_no_secret(path.read_bytes(), key, tkey)
    state = torch.load(path, weights_only=True)["nnmark"]
    assert state["steps"] == 5 and state["mixer"]["cursor"] == 10
    assert json.loads(json.dumps(state)) == state  # plain data
    fresh = PenaltyHook(_net(), key, mixer=nnmark.TriggerMixer(tkey, per_batch=2))
    fresh.load_state_dict(state)
    assert fresh.steps == 5 and fresh.embedding.mixer.cursor == 10
    with pytest.raises(ValueError, match="embeds keys"):
        PenaltyHook(_net(), _key(), mixer=nnmark.TriggerMixer(tkey)).load_state_dict(state)
    with pytest.raises(ValueError, match="trigger mixing"):
        PenaltyHook(_net(), key).load_state_dict(state)
    with pytest.raises(ValueError, match="not an nnmark"):
        fresh.load_state_dict({"steps": 1})


def test_bad_input_is_named():
    key = _key()
    model = _net()
    with pytest.raises(KeyError, match="carrier"):
        PenaltyHook(model, nnmark.WhiteBoxKey.generate(carrier="nope.weight", bits=24))
    with pytest.raises(TypeError, match="TriggerKey"):
        PenaltyHook(model, nnmark.TriggerKey.generate(n=5, input_shape=(3, 8, 8)))
    with pytest.raises(TypeError, match="white-box keys"):
        PenaltyHook(model, 42)
    with pytest.raises(nnmark.KeyFileError, match="missing.key"):
        PenaltyHook(model, "missing.key")
    with pytest.raises(ValueError, match="twice"):
        PenaltyHook(model, [key, key])
    with pytest.raises(ValueError, match="nothing to embed"):
        Embedding([])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        PenaltyHook(object(), key)
    with pytest.raises(ValueError, match="does not update carrier"):
        PenaltyHook(model, key).attach(torch.optim.SGD(model[5].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="Optimizer"):
        PenaltyHook(model, key).attach(object())
    with pytest.raises(ValueError, match="no mixer"):
        PenaltyHook(model, key).mix(*_batch(0))
    frozen = _net()
    frozen[2].weight.requires_grad_(False)
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    PenaltyHook(frozen, key).attach(opt)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step()


def test_remove_detaches_and_two_marks_share_a_step():
    k1 = _key()
    k2 = nnmark.WhiteBoxKey.generate(carrier="5.weight", bits=24, reduction="flat")
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = PenaltyHook(model, [k1, k2]).attach(opt)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert hook.steps == 1 and set(hook.ber()) == {k1.key_id, k2.key_id}
    hook.remove()
    opt.step()
    assert hook.steps == 1


# ------------------------------------------------------------------ DDP: 2 processes, gloo, CPU
DDP_STEPS = 12


def _ddp_worker(rank: int, world: int, init_file: str, key_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _net()
        ddp = DDP(model)
        key = nnmark.load_key(key_path)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        hook = PenaltyHook(ddp, key, strength=1.0).attach(opt)  # names carry DDP's "module." prefix
        for step in range(DDP_STEPS):
            x, y = _batch(step, rank)  # each rank its own data
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"params": model.state_dict(), "steps": hook.steps}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done with their last all-reduce before either tears gloo down: a rank that
        # destroys the group while its peer still talks to it can abort the peer (SIGABRT, seen
        # once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    key = _key(bits=32)
    key.save(tmp_path / "owner.key")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "owner.key"), str(tmp_path)), nprocs=2,
             join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == DDP_STEPS
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name  # the ranks stayed in step
    # One process doing what the two did: the mean of the ranks' losses, plus the penalty once.
    ref = _net()
    reg = nnmark.Uchida(key, strength=1.0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(DDP_STEPS):
        loss = sum(F.cross_entropy(ref(x), y) for x, y in (_batch(step, 0), _batch(step, 1))) / 2
        opt.zero_grad()
        (loss + reg.penalty(ref)).backward()
        opt.step()
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(r0["params"][name], p, rtol=1e-4, atol=1e-5)
    model = _net()
    model.load_state_dict(r0["params"])
    assert nnmark.verify(key, model).ber == 0.0


def test_embedding_penalty_sums_the_marks():
    k1 = _key()
    k2 = nnmark.WhiteBoxKey.generate(carrier="5.weight", bits=24, reduction="flat")
    model = _net()
    emb = Embedding([k1, nnmark.Uchida(k2, strength=0.3)])
    want = nnmark.Uchida(k1).penalty(model) + nnmark.Uchida(k2, strength=0.3).penalty(model)
    torch.testing.assert_close(emb.penalty(model), want)
    assert emb.penalty(model).requires_grad


def test_adapters_from_key_files_pickle_without_secrets(tmp_path):
    import pickle

    key = _key()
    tkey = nnmark.TriggerKey.generate(n=20, input_shape=(3, 8, 8))
    key.save(tmp_path / "owner.key")
    tkey.save(tmp_path / "triggers.key")
    emb = Embedding(str(tmp_path / "owner.key"), mixer=tmp_path / "triggers.key", strength=0.5, per_batch=3)
    emb.mixer.next_indices()
    data = pickle.dumps(emb)
    assert_no_secret(data, key, tkey)  # paths travel, not keys
    back = pickle.loads(data)
    assert back.key_ids == [key.key_id] and back.mixer.cursor == 3 and back.mixer.per_batch == 3
    assert back.regularizers[0].strength == 0.5
    with pytest.raises(TypeError, match="key-file paths"):
        pickle.dumps(Embedding(key))
    with pytest.raises(TypeError, match="mixer="):
        Embedding(str(tmp_path / "triggers.key"))


def test_a_frozen_carrier_is_refused_by_the_loss_penalty_too():
    model = _net()
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        Embedding(_key()).penalty(model)
    with torch.no_grad():  # evaluating the penalty without training is fine
        assert float(Embedding(_key()).penalty(model)) > 0
