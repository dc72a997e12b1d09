"""Sharded carriers (nnmark.sharded): 2 processes over gloo on the CPU. The projection of
DTensor shards and of FSDP1's flattened slices (use_orig_params=True) equals the
unsharded projection and extracts the same bits on every rank; the mark embeds under
FSDP2 (fully_shard), under FSDP1 (FULL_SHARD through PenaltyHook, SHARD_GRAD_OP with the
penalty in the loss) and under tensor-parallel row- and column-wise splits, with the
gradients a single process gets; layouts it cannot handle (Partial, 2-D meshes such as
HSDP, FSDP1 without use_orig_params or with a hybrid strategy, an FSDP1 unit wrapping the
module from outside) are named, by key.project, by PenaltyHook when it is made, and in
verify()'s verdict on a live sharded model."""
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
        "first": dict(carrier="0.weight", bits=24, reduction="filter_mean"),  # FSDP1: all on rank 0
        "last": dict(carrier="5.weight", bits=24, reduction="filter_mean"),  # FSDP1: all on rank 1
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
        # (fully_shard on a 2-D mesh), FSDP1 without use_orig_params (one flat parameter,
        # the carrier is none), FSDP1's hybrid strategy, and an FSDP1 unit around the module.
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        cpu = torch.device("cpu")
        hooked = {}
        makers = {
            "hsdp": lambda: fully_shard(_conv_net(), mesh=init_device_mesh("cpu", (1, world),
                                                                        mesh_dim_names=("replicate", "shard"))),
            "fsdp1_flat": lambda: FullyShardedDataParallel(_conv_net(), use_orig_params=False, device_id=cpu),
            "fsdp1_hybrid": lambda: FullyShardedDataParallel(
                _conv_net(), use_orig_params=True, device_id=cpu, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                device_mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))),
            "fsdp1_outside": lambda: FullyShardedDataParallel(_conv_net(), use_orig_params=True,
                                                              device_id=cpu).module,
            "fsdp1_orig": lambda: FullyShardedDataParallel(_conv_net(), use_orig_params=True, device_id=cpu),
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

        # 2b. FSDP1 with use_orig_params: each rank's carrier is a 1-D slice of the flattened
        #     weight (2.weight: [0, 1001) on rank 0, [1001, 1152) on rank 1; 0.weight all on
        #     rank 0 and 5.weight all on rank 1, an empty slice on the other).
        from nnmark.sharded import FlatSlice, fsdp1_slice, project_flat_slice

        m1 = FullyShardedDataParallel(_conv_net(), use_orig_params=True, device_id=cpu)
        w = m1.get_parameter("_fsdp_wrapped_module.2.weight")
        where = fsdp1_slice(m1, "2.weight", "_fsdp_wrapped_module.2.weight")
        out["fsdp1_slice"] = (tuple(w.shape), where.start, where.numel, where.shape)
        out["fsdp1_proj"] = {k: nnmark.Uchida(_load(folder, k)).projections(m1).detach()
                             for k in ("conv_fm", "conv_flat", "first", "last")}
        # every way a slice can fall: empty, inside one out-channel, on a row boundary, many
        # rows, the last few elements; a Keras-order dense key reads columns out of order
        keras = nnmark.DenseKey(torch.randn(24, 16 * 9), carrier="2.weight", bits=np.arange(24) % 2, order="keras")
        keras._matrix = keras._matrix.double()
        out["keras_whole"] = keras.project(W).detach()
        cuts = {}
        for c in (0, 5, 144, 1001, 1149, 1152):
            piece = W.reshape(-1)[:c] if rank == 0 else W.reshape(-1)[c:]
            start = 0 if rank == 0 else c
            slc = FlatSlice(tuple(W.shape), start, piece.numel(), dist.group.WORLD, "a test slice", piece)
            for kname, key in (("conv_fm", _load(folder, "conv_fm")), ("conv_flat", _load(folder, "conv_flat")),
                               ("keras", keras)):
                cuts[f"{kname}/{c}"] = project_flat_slice(key, piece, slc).detach()
        out["cuts"] = cuts

        # 2c. FSDP1 embeds: FULL_SHARD through PenaltyHook (the gradient added after backward),
        #     SHARD_GRAD_OP with the penalty in the loss (there the carrier is unsharded
        #     between forward and backward: projected whole, its gradient reduce-scattered).
        for mode, strategy in (("hook", ShardingStrategy.FULL_SHARD), ("loss", ShardingStrategy.SHARD_GRAD_OP)):
            model = FullyShardedDataParallel(_conv_net(), use_orig_params=True, device_id=cpu,
                                             sharding_strategy=strategy)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            if mode == "hook":
                hook = PenaltyHook(model, _load(folder, "conv_fm"), strength=1.0).attach(opt)
            else:
                emb = nnmark.integrations.Embedding(_load(folder, "conv_fm"), strength=1.0)
            for step in range(STEPS):
                x, y = _batch(step, rank)
                loss = F.cross_entropy(model(x), y)
                if mode == "loss":
                    loss = loss + emb.penalty(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if mode == "hook":
                out["fsdp1_hook_steps"] = hook.steps
            with FullyShardedDataParallel.summon_full_params(model):
                out[f"fsdp1_{mode}"] = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                                        for n, p in model.named_parameters()}

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
        assert errs["fsdp1_orig"] is None  # FSDP1 with use_orig_params is projected (below)
        assert errs["hsdp"] is not None and "2-D device mesh" in errs["hsdp"] and "2.weight" in errs["hsdp"]
        flat, hybrid, outside = errs["fsdp1_flat"], errs["fsdp1_hybrid"], errs["fsdp1_outside"]
        assert flat is not None and "FSDP1 (FullyShardedDataParallel, FULL_SHARD, use_orig_params=False)" in flat
        assert "no parameter of its own" in flat and "[8, 16, 3, 3]" in flat
        assert hybrid is not None and "FSDP1 (FullyShardedDataParallel, HYBRID_SHARD, use_orig_params=True)" in hybrid
        assert "hybrid strategy" in hybrid
        for e in (flat, hybrid):
            assert "'2.weight'" in e and "fully_shard" in e and "use_orig_params=True" in e
        assert outside is not None and "outside the module given" in outside and "'2.weight'" in outside


def test_verifying_a_live_sharded_model_names_the_layout(results):
    """verify() of a module whose carrier is sharded: an invalid verdict naming the layout
    (each rank holds a part), never a projection of a part."""
    _, (r0, r1) = results
    for r in (r0, r1):
        v = r["verdicts"]
        assert set(v) == {"hsdp", "fsdp1_orig", "fsdp1_flat", "fsdp1_hybrid", "fsdp1_outside", "fsdp2"}
        for name, (status, error_class, message) in v.items():
            assert (status, error_class) == ("invalid", "ShardedCarrier"), (name, message)
            assert "'2.weight'" in message, name
        assert "(Shard(dim=0),) on a 1-D device mesh" in v["fsdp2"][2]
        assert "2-D device mesh" in v["hsdp"][2]
        for name in ("fsdp1_orig", "fsdp1_flat", "fsdp1_hybrid", "fsdp1_outside"):
            assert "FSDP1" in v[name][2], name


def test_fsdp1_slices_project_as_the_whole_carrier(results):
    """FSDP1 with use_orig_params: each rank holds a 1-D slice (uneven, or empty), projects
    it at its global columns, and one all-reduce gives the whole carrier's projection."""
    folder, (r0, r1) = results
    assert r0["fsdp1_slice"] == ((1001,), 0, 1001, (8, 16, 3, 3))  # really sharded, and unevenly
    assert r1["fsdp1_slice"] == ((151,), 1001, 151, (8, 16, 3, 3))
    ref = _conv_net()
    for name, p0 in r0["fsdp1_proj"].items():
        torch.testing.assert_close(p0, r1["fsdp1_proj"][name], rtol=0, atol=0)
        whole = nnmark.Uchida(_load(folder, name)).projections(ref).detach()
        torch.testing.assert_close(p0, whole, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(p0 > 0, whole > 0), name
    torch.manual_seed(1)
    W = torch.randn(8, 16, 3, 3, dtype=torch.float64)
    wholes = {"conv_fm": _load(folder, "conv_fm").project(W), "conv_flat": _load(folder, "conv_flat").project(W),
              "keras": r0["keras_whole"]}
    for name, p0 in r0["cuts"].items():
        torch.testing.assert_close(p0, r1["cuts"][name], rtol=0, atol=0)
        whole = wholes[name.split("/")[0]]
        torch.testing.assert_close(p0, whole, rtol=1e-10, atol=1e-10, msg=name)
        assert torch.equal(p0 > 0, whole > 0), name
    assert len(r0["cuts"]) == 18


def _reference(folder):
    """The FSDP runs' training in one process: both ranks' batches averaged, the penalty added."""
    ref = _conv_net()
    reg = nnmark.Uchida(_load(folder, "conv_fm"), strength=1.0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(STEPS):
        loss = sum(F.cross_entropy(ref(x), y) for x, y in (_batch(step, 0), _batch(step, 1))) / 2
        opt.zero_grad()
        (loss + reg.penalty(ref)).backward()
        opt.step()
    return ref


def _assert_embeds_as_in_one_process(folder, r0, r1, what):
    for n in r0[what]:
        assert torch.equal(r0[what][n], r1[what][n]), n
    for n, p in _reference(folder).named_parameters():
        torch.testing.assert_close(r0[what][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    model = _conv_net()
    model.load_state_dict(r0[what])
    assert nnmark.verify(_load(folder, "conv_fm"), model).ber == 0.0


def test_the_mark_embeds_under_fsdp2_as_in_one_process(results):
    folder, (r0, r1) = results
    assert r0["fsdp_steps"] == r1["fsdp_steps"] == STEPS
    _assert_embeds_as_in_one_process(folder, r0, r1, "fsdp")


@pytest.mark.parametrize("mode", ["hook", "loss"])
def test_the_mark_embeds_under_fsdp1_as_in_one_process(results, mode):
    """FULL_SHARD through PenaltyHook; SHARD_GRAD_OP with the penalty in the loss."""
    folder, (r0, r1) = results
    if mode == "hook":
        assert r0["fsdp1_hook_steps"] == r1["fsdp1_hook_steps"] == STEPS
    _assert_embeds_as_in_one_process(folder, r0, r1, f"fsdp1_{mode}")


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
