"""Sharded carriers: the projection of a DTensor carrier (FSDP2's ``fully_shard``, tensor
parallel row- or column-wise splits) without ever gathering it.

Key spec v1 draws column i of X from a Philox counter holding i, the column's index in
the whole carrier. So each rank projects only the elements it holds, with X's columns
at their global indices, and one all-reduce of the T partial projections completes
``p = X . w`` on every rank (T floats per carrier per step). ``filter_mean`` over
out-channels split across ranks is linear too: each rank projects its out-channels'
partial sum (divided by the global out-channel count) and the same all-reduce of T
values adds the parts; no N-long vector is communicated at all.

Gradients need no communication: every rank computes the same penalty from the same
``p``, so the gradient with respect to a rank's partial projection is the gradient with
respect to ``p`` (the all-reduce's backward is the identity), and each rank's shard gets
exactly its part of the unsharded gradient.

Handled: a 1-D device mesh with ``Shard(d)`` (any d; uneven shards and empty shards
too) or ``Replicate()``. Anything else (``Partial``, strided shards, 2-D meshes such as
FSDP2 + tensor parallel, a Keras-order key on a sharded conv) raises ValueError naming
the layout: a wrong penalty is never computed silently. So does a carrier held by FSDP1
(``FullyShardedDataParallel``, as Lightning's ``FSDPStrategy`` and ``fsdp_config
version 1`` use): its shards are slices of a flattened 1-D parameter that keep no shape.
"""
from __future__ import annotations

import math
import sys

import torch


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (no import of torch.distributed when nothing made one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def layout(t) -> str:
    """``"placements (Shard(dim=0),) on a 1-D mesh of 2 ranks"``: how a DTensor is laid out."""
    mesh = t.device_mesh
    return f"placements {tuple(t.placements)} on a {mesh.ndim}-D device mesh of shape {tuple(mesh.shape)}"


# What the marks communicated in this process (benchmarks read it): all-reduces and bytes.
COMM = {"all_reduces": 0, "bytes": 0}


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of the partial projections; the backward is the identity (see the
    module docstring: each rank's penalty is the same function of the summed ``p``)."""

    @staticmethod
    def forward(ctx, part, group):
        import torch.distributed as dist

        out = part.contiguous().clone()
        dist.all_reduce(out, group=group)
        COMM["all_reduces"] += 1
        COMM["bytes"] += out.numel() * out.element_size()
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fsdp1_layout(model: torch.nn.Module, carrier: str) -> str | None:
    """How FSDP1 holds ``carrier`` when it holds it sharded (a slice of a flattened 1-D
    parameter on each rank); None when FSDP1 does not hold it, or holds it whole (NO_SHARD,
    or inside ``summon_full_params``)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    from .carriers import bare_name

    want = bare_name(carrier)
    for name, m in model.named_modules():
        if not isinstance(m, FullyShardedDataParallel):
            continue
        # FlatParameter's metadata is private to torch: without it the carrier is not found
        # (or fails its shape check) rather than being named here.
        fp = getattr(m, "_flat_param", None)
        if fp is None or not hasattr(fp, "_fqns") or not hasattr(fp, "_unpadded_unsharded_size"):
            continue
        inner = bare_name(f"{name}._fsdp_wrapped_module." if name else "_fsdp_wrapped_module.")
        for fqn, shape in zip(fp._fqns, fp._shapes):
            if bare_name(inner + fqn) != want:
                continue
            if fp.numel() >= fp._unpadded_unsharded_size.numel():
                return None  # this rank holds the whole flat parameter now
            return (f"FSDP1 (FullyShardedDataParallel, {m.sharding_strategy.name}): a slice of a flattened "
                    f"{fp.numel()}-element shard of {fp._unpadded_unsharded_size.numel()} elements, its shape "
                    f"{list(shape)} lost")
    return None


def check_not_fsdp1(model: torch.nn.Module, carrier: str) -> None:
    """ValueError naming the layout when FSDP1 holds ``carrier`` sharded."""
    how = fsdp1_layout(model, carrier)
    if how is not None:
        raise ValueError(f"carrier {carrier!r} is held by {how}. nnmark projects sharded carriers held as DTensors: "
                         f"shard with FSDP2 (torch.distributed.fsdp.fully_shard; Lightning's ModelParallelStrategy, "
                         f"Hugging Face fsdp_config={{'version': 2}}) or tensor parallel")


def _unsupported(key, t, why: str) -> ValueError:
    return ValueError(f"carrier {key.carrier!r} is a DTensor with {layout(t)}: {why}. nnmark projects a sharded "
                      f"carrier on a 1-D device mesh with Shard(d) or Replicate() placements (FSDP2 fully_shard, "
                      f"row- or column-wise tensor parallel)")


def check_layout(key, t) -> None:
    """ValueError naming the layout when :func:`project_sharded` cannot project DTensor ``t``
    under ``key`` (adapters call it before training, so every rank fails at the start)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)
    if t.device_mesh.ndim != 1 or len(placements) != 1:
        raise _unsupported(key, t, "a mesh of more than one dimension")
    pl = placements[0]
    if isinstance(pl, Replicate):
        return
    if type(pl) is not Shard:  # Partial (pending sums), _StridedShard (FSDP2 + TP), ...
        raise _unsupported(key, t, f"placement {pl} is not a plain Shard or Replicate")
    if key.reduction == "filter_mean":
        if t.dim() < 2:
            raise _unsupported(key, t, "filter_mean needs a weight with an out-channel dimension")
        if key.order == "keras" and t.dim() > 2 and pl.dim % t.dim() != 0:
            raise _unsupported(key, t, "a Keras-order key reads the carrier in (kh, kw, in) order, which "
                                       "splits an in-channel shard into many pieces")


def project_sharded(key, t) -> torch.Tensor:
    """The raw projections ``[T]`` of a DTensor carrier ``t`` under ``key``, the same on
    every rank (to float rounding) as ``key.project`` of the whole tensor; differentiable
    in ``t``. One all-reduce of T values on the mesh's group; the carrier is never gathered."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    check_layout(key, t)
    mesh, placements = t.device_mesh, tuple(t.placements)
    pl = placements[0]
    local = t.to_local()  # differentiable: the gradient flows back to this rank's shard
    if isinstance(pl, Replicate):
        return key.project(local)
    S = tuple(t.shape)
    d = pl.dim % len(S)
    _, offset = compute_local_shape_and_global_offset(S, mesh, placements)
    o = int(offset[d])
    T = key.num_bits
    if key.reduction == "filter_mean":
        acc = torch.float64 if local.dtype == torch.float64 else torch.float32
        # The out-channel mean as a sum of this rank's channels over the global count.
        m = local.sum(0, dtype=acc) / S[0]
        if d == 0:  # out-channels split (FSDP2, column-wise TP): every rank holds a partial of all N
            if key.order == "keras" and m.dim() > 1:
                m = m.permute(*range(1, m.dim()), 0)  # (in, kh, kw) -> (kh, kw, in)
            return _sum(key, [(0, m.reshape(-1))], local, mesh)
        return _sum(key, _runs(m, S[1:], d - 1, o), local, mesh)  # (keras order refused by check_layout)
    return _sum(key, _runs(local, S, d, o), local, mesh)


def _runs(a: torch.Tensor, G: tuple, d: int, o: int) -> list[tuple[int, torch.Tensor]]:
    """A block ``a`` of a C-order tensor of global shape ``G``, split on dim ``d`` at offset
    ``o``, as (global flat index of the first element, contiguous piece) runs."""
    R = math.prod(G[:d])  # one run per index of the dims before d
    inner = math.prod(G[d + 1:])
    if a.numel() == 0:
        return []
    rows = a.reshape(R, -1)
    stride = math.prod(G[d:])
    return [(r * stride + o * inner, rows[r]) for r in range(R)]


def _sum(key, runs, local: torch.Tensor, mesh) -> torch.Tensor:
    T = key.num_bits
    acc = torch.float64 if local.dtype == torch.float64 else torch.float32
    part = torch.zeros(T, dtype=acc, device=local.device)
    for col0, v in runs:
        if v.numel():
            part = part + key.project_vectors(v, col0).to(acc)
    if not runs:  # an empty shard still joins the all-reduce, and keeps the graph to its carrier
        part = part + local.sum() * 0
    return _SumOverRanks.apply(part, mesh.get_group())
