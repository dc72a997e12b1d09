"""Sharded carriers (nnmark.sharded): 2 processes over gloo on the CPU. The projection of
DTensor shards equals the unsharded projection and extracts the same bits on every rank;
the mark embeds under FSDP2 (fully_shard) and under tensor-parallel row- and column-wise
splits, with the gradients a single process gets; layouts it cannot handle (Partial,
2-D meshes such as HSDP, FSDP1's flattened shards) are named, by key.project, by
PenaltyHook when it is made, and in verify()'s verdict on a live sharded model."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nnmark
from nnmark.integrations import PenaltyHook

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

STEPS = 15
TP_STEPS, TP_STRENGTH = 40, 3.0  # small carriers (N = 64 and 32) need a firmer push


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _batch(step, rank=0, image=True):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 3, 8, 8, generator=g) if image else torch.randn(8, 64, generator=g)
    return x, torch.randint(0, 10, (8,), generator=g)


def _keys(folder: str):
    """The keys of every case, made once and loaded by each process (as a user would)."""
    specs = {
        "conv_fm": dict(carrier="2.weight", bits=32, reduction="filter_mean"),
        "conv_flat": dict(carrier="2.weight", bits=40, reduction="flat"),
        "row": dict(carrier="0.weight", bits=24, reduction="filter_mean"),
        "col": dict(carrier="2.weight", bits=20, reduction="filter_mean"),
        "small": dict(carrier="w", bits=20, reduction="flat"),
    }
    for name, spec in specs.items():
        nnmark.WhiteBoxKey.generate(**spec).save(os.path.join(folder, f"{name}.key"))


def _load(folder, name):
    return nnmark.load_key(os.path.join(folder, f"{name}.key"))


# ------------------------------------------------------------------ the worker: all cases in one spawn
def _worker(rank: int, world: int, init_file: str, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _init(rank, world, init_file)
    out: dict = {}
    try:
        mesh = init_device_mesh("cpu", (world,))
        # 1. projections of shards against the whole tensor: conv weights, each dim split
        #    (dim 2 has 3 rows over 2 ranks: uneven), both reductions; a 5-row weight
        #    splits unevenly; a dense key too.
        torch.manual_seed(1)
        W = torch.randn(8, 16, 3, 3, dtype=torch.float64)  # float64: bits near 0 cannot flip by rounding
        proj = {}
        for kname in ("conv_fm", "conv_flat"):
            key = _load(folder, kname)
            for pl in (Shard(0), Shard(1), Shard(2), Replicate()):
                p = key.project(distribute_tensor(W, mesh, [pl]))
                proj[f"{kname}/{pl}"] = p.detach()
        dense = nnmark.DenseKey(torch.randn(24, 16 * 9), carrier="2.weight", bits=np.arange(24) % 2)
        dense._matrix = dense._matrix.double()  # float64 as W (a test-only shortcut)
        proj["dense/S(0)"] = dense.project(distribute_tensor(W, mesh, [Shard(0)])).detach()
        proj["dense/S(1)"] = dense.project(distribute_tensor(W, mesh, [Shard(1)])).detach()
        out["dense_whole"] = dense.project(W).detach()
        V = torch.randn(5, 7, dtype=torch.float64)  # uneven rows; with 3 ranks' worth of rows the last would be empty
        out["V"] = V
        proj["small/S(0)"] = _load(folder, "small").project(distribute_tensor(V, mesh, [Shard(0)])).detach()
        out["proj"] = proj
        # the gradient through the shards is the shard of the whole gradient
        key = _load(folder, "conv_fm")
        Wd = distribute_tensor(W, mesh, [Shard(1)]).requires_grad_()
        F.binary_cross_entropy_with_logits(key.project(Wd), key.bits.float(), reduction="sum").backward()
        out["grad_shard"] = Wd.grad.to_local().clone()
        out["grad_offset"] = 8 * rank  # Shard(1) of 16 in-channels over 2 ranks

        # 2. layouts that cannot be handled are named
        errors = {}
        for name, make in (("partial", lambda: DTensor.from_local(W / world, mesh, [Partial()])),
                           ("2d", lambda: distribute_tensor(W, init_device_mesh("cpu", (1, world)),
                                                            [Replicate(), Shard(0)]))):
            try:
                key.project(make())
                errors[name] = None
            except ValueError as exc:
                errors[name] = str(exc)
        out["errors"] = errors

        # ... and through PenaltyHook, when it is made (before the first step): HSDP
        # (fully_shard on a 2-D mesh), and FSDP1, whose shards are slices of a flattened
        # 1-D parameter (with use_orig_params, or one flat parameter without).
        from torch.distributed.fsdp import FullyShardedDataParallel

        hooked = {}
        makers = {
            "hsdp": lambda: fully_shard(_conv_net(), mesh=init_device_mesh("cpu", (1, world),
                                                                        mesh_dim_names=("replicate", "shard"))),
            "fsdp1_orig": lambda: FullyShardedDataParallel(_conv_net(), use_orig_params=True,
                                                           device_id=torch.device("cpu")),
            "fsdp1_flat": lambda: FullyShardedDataParallel(_conv_net(), use_orig_params=False,
                                                           device_id=torch.device("cpu")),
        }
        verdicts = {}
        for name, make in makers.items():
            m = make()
            try:
                PenaltyHook(m, _load(folder, "conv_fm"), strength=1.0)
                hooked[name] = None
            except ValueError as exc:
                hooked[name] = str(exc)
            v = nnmark.verify(_load(folder, "conv_fm"), m)  # a live sharded model: a verdict naming the layout
            verdicts[name] = (v.status, v.error_class, v.error_message)
        out["hook_errors"] = hooked

        # 3. FSDP2: the mark embeds through PenaltyHook; each rank its own data
        model = _conv_net()
        fully_shard(model[2])
        fully_shard(model)
        assert type(model[2].weight).__name__ == "DTensor"
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = PenaltyHook(model, _load(folder, "conv_fm"), strength=1.0).attach(opt)
        for step in range(STEPS):
            x, y = _batch(step, rank)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        v = nnmark.verify(_load(folder, "conv_fm"), model)
        verdicts["fsdp2"] = (v.status, v.error_class, v.error_message)
        out["verdicts"] = verdicts
        out["fsdp"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        out["fsdp_steps"] = hook.steps

        # 4. tensor parallel: 0.weight split row-wise (Shard(0)), 2.weight column-wise
        #    (Shard(1)); the same batch on both ranks, as TP needs; one mark on each; the
        #    penalty in the loss this time (the Hugging Face adapter's way).
        tp = _mlp()
        parallelize_module(tp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        assert tuple(tp[0].weight.placements) == (Shard(0),) and tuple(tp[2].weight.placements) == (Shard(1),)
        emb = nnmark.integrations.Embedding([_load(folder, "row"), _load(folder, "col")], strength=TP_STRENGTH)
        opt = torch.optim.SGD(tp.parameters(), lr=0.1)
        for step in range(TP_STEPS):
            x, y = _batch(step, 0, image=False)
            loss = F.cross_entropy(tp(x), y) + emb.penalty(tp)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out["tp"] = {n: p.full_tensor().detach() for n, p in tp.named_parameters()}
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("sharded")
    _keys(str(folder))
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_the_projection_on_shards_equals_the_whole_and_the_bits_are_identical(results):
    folder, (r0, r1) = results
    torch.manual_seed(1)
    W = torch.randn(8, 16, 3, 3, dtype=torch.float64)
    for name, p0 in r0["proj"].items():
        p1 = r1["proj"][name]
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # the ranks agree exactly (one all-reduce)
        kname = name.split("/")[0]
        if kname == "dense":
            whole = r0["dense_whole"]
        elif kname == "small":
            whole = _load(folder, "small").project(r0["V"])
        else:
            whole = _load(folder, kname).project(W)
        torch.testing.assert_close(p0, whole, rtol=1e-10, atol=1e-10, msg=name)
        assert torch.equal(p0 > 0, whole > 0), name
    assert len(r0["proj"]) == 11


def test_the_gradient_on_a_shard_is_that_shard_of_the_whole_gradient(results):
    folder, rs = results
    torch.manual_seed(1)
    W = torch.randn(8, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    key = _load(folder, "conv_fm")
    F.binary_cross_entropy_with_logits(key.project(W), key.bits.float(), reduction="sum").backward()
    for r in rs:
        o = r["grad_offset"]
        torch.testing.assert_close(r["grad_shard"], W.grad[:, o:o + 8], rtol=1e-10, atol=1e-12)


def test_a_layout_it_cannot_handle_is_named(results):
    _, (r0, _) = results
    assert r0["errors"]["partial"] is not None and "Partial" in r0["errors"]["partial"]
    assert "2.weight" in r0["errors"]["partial"]
    assert r0["errors"]["2d"] is not None and "2-D device mesh" in r0["errors"]["2d"]


def test_a_layout_it_cannot_handle_is_named_by_penalty_hook(results):
    _, (r0, r1) = results
    for r in (r0, r1):
        errs = r["hook_errors"]
        assert errs["hsdp"] is not None and "2-D device mesh" in errs["hsdp"] and "2.weight" in errs["hsdp"]
        for name in ("fsdp1_orig", "fsdp1_flat"):
            assert errs[name] is not None and "FSDP1 (FullyShardedDataParallel, FULL_SHARD)" in errs[name], name
            assert "'2.weight'" in errs[name] and "[8, 16, 3, 3]" in errs[name] and "fully_shard" in errs[name]


def test_verifying_a_live_sharded_model_names_the_layout(results):
    """verify() of a module whose carrier is sharded: an invalid verdict naming the layout
    (each rank holds a part), never a projection of a part."""
    _, (r0, r1) = results
    for r in (r0, r1):
        v = r["verdicts"]
        assert set(v) == {"hsdp", "fsdp1_orig", "fsdp1_flat", "fsdp2"}
        for name, (status, error_class, message) in v.items():
            assert (status, error_class) == ("invalid", "ShardedCarrier"), (name, message)
            assert "'2.weight'" in message, name
        assert "(Shard(dim=0),) on a 1-D device mesh" in v["fsdp2"][2]
        assert "2-D device mesh" in v["hsdp"][2]
        assert "FSDP1" in v["fsdp1_orig"][2] and "FSDP1" in v["fsdp1_flat"][2]


def test_the_mark_embeds_under_fsdp2_as_in_one_process(results):
    folder, (r0, r1) = results
    assert r0["fsdp_steps"] == r1["fsdp_steps"] == STEPS
    for n in r0["fsdp"]:
        assert torch.equal(r0["fsdp"][n], r1["fsdp"][n]), n
    key = _load(folder, "conv_fm")
    ref = _conv_net()
    reg = nnmark.Uchida(key, strength=1.0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(STEPS):
        loss = sum(F.cross_entropy(ref(x), y) for x, y in (_batch(step, 0), _batch(step, 1))) / 2
        opt.zero_grad()
        (loss + reg.penalty(ref)).backward()
        opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(r0["fsdp"][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    model = _conv_net()
    model.load_state_dict(r0["fsdp"])
    assert nnmark.verify(key, model).ber == 0.0


def test_the_mark_embeds_under_row_and_column_wise_tensor_parallel(results):
    folder, (r0, r1) = results
    for n in r0["tp"]:
        assert torch.equal(r0["tp"][n], r1["tp"][n]), n
    keys = [_load(folder, "row"), _load(folder, "col")]
    ref = _mlp()
    regs = [nnmark.Uchida(k, strength=TP_STRENGTH) for k in keys]
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(TP_STEPS):
        x, y = _batch(step, 0, image=False)
        loss = F.cross_entropy(ref(x), y) + sum(r.penalty(ref) for r in regs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(r0["tp"][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    model = _mlp()
    model.load_state_dict(r0["tp"])
    for k in keys:
        assert nnmark.verify(k, model).ber == 0.0, k.carrier
