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
HSDP or FSDP2 + tensor parallel, a Keras-order key on a sharded conv) raises ValueError
naming the layout: a wrong penalty is never computed silently.

FSDP1 (``FullyShardedDataParallel``, as Lightning's ``FSDPStrategy`` uses) with
``use_orig_params=True`` (Lightning's default) and ``FULL_SHARD`` or ``SHARD_GRAD_OP``:
between steps each rank's carrier parameter is a 1-D view of its contiguous slice
``[a, b)`` of the carrier flattened in C order (possibly empty). ``flat`` projects the
slice at column ``a``; ``filter_mean`` adds element ``i`` (divided by the out-channel
count) to column ``i mod N``, so a rank reduces its slice to the columns it touches and
projects those; the same all-reduce of T values completes ``p`` (:func:`project_flat_slice`).
Between forward and backward under ``SHARD_GRAD_OP`` the module holds unsharded views
instead: every rank projects the whole carrier, and FSDP reduce-scatters its gradient.
Without ``use_orig_params`` the carrier is no parameter of its own (one flat parameter
holds the unit), the hybrid strategies replicate across a second group, and a unit
wrapping the module given from outside cannot be read from it: all refused by name.
"""
from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

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


FSDP1_SEGMENT = "_fsdp_wrapped_module."


def _readable(m) -> bool:
    fp = getattr(m, "_flat_param", None)
    return fp is not None and all(hasattr(fp, a) for a in ("_fqns", "_shapes", "_unpadded_unsharded_size",
                                                            "_shard_param_infos"))


def _owner(model: torch.nn.Module, name: str):
    """The FSDP1 unit before the last ``_fsdp_wrapped_module.`` of parameter ``name``, or None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        m = model.get_submodule(name.rpartition(FSDP1_SEGMENT)[0][:-1])
    except AttributeError:
        return None
    return m if isinstance(m, FullyShardedDataParallel) else None


def _fsdp1_unit(model: torch.nn.Module, carrier: str, name: str | None = None):
    """(FSDP1 unit, index in its flat parameter) of the unit whose flat parameter holds
    ``carrier``; None when no FSDP1 unit holds it (or torch's private FlatParameter
    metadata is missing: the carrier is then not found, or fails its shape check).
    ``name``: the carrier's parameter name in ``model``, when known (the owning unit is
    the module before its last ``_fsdp_wrapped_module.``: no walk over the modules)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    from .carriers import bare_name

    if name is not None and FSDP1_SEGMENT in name:
        m, fqn = _owner(model, name), name.rpartition(FSDP1_SEGMENT)[2]
        if m is not None and _readable(m) and fqn in m._flat_param._fqns:
            return m, m._flat_param._fqns.index(fqn)
    want = bare_name(carrier)
    for name, m in model.named_modules():
        if not isinstance(m, FullyShardedDataParallel):
            continue
        if not _readable(m):
            continue
        fp = m._flat_param
        inner = f"{name}.{FSDP1_SEGMENT}" if name else FSDP1_SEGMENT
        for i, fqn in enumerate(fp._fqns):
            if bare_name(inner + fqn) == want:
                return m, i
    return None


def _sharded_now(fp) -> bool:
    """Whether this rank holds only its shard of FSDP1 flat parameter ``fp`` now (not under
    NO_SHARD, on one rank, or inside ``summon_full_params``)."""
    return fp.numel() < fp._unpadded_unsharded_size.numel()


def _fsdp1_describe(m, i: int) -> str:
    fp = m._flat_param
    orig = "use_orig_params=True" if getattr(m, "_use_orig_params", False) else "use_orig_params=False"
    return (f"FSDP1 (FullyShardedDataParallel, {m.sharding_strategy.name}, {orig}): a slice of a flattened "
            f"{fp.numel()}-element shard of {fp._unpadded_unsharded_size.numel()} elements, its shape "
            f"{list(fp._shapes[i])}")


def fsdp1_layout(model: torch.nn.Module, carrier: str) -> str | None:
    """How FSDP1 holds ``carrier`` when it holds it sharded (a slice of a flattened 1-D
    parameter on each rank); None when FSDP1 does not hold it, or holds it whole (NO_SHARD,
    or inside ``summon_full_params``)."""
    found = _fsdp1_unit(model, carrier)
    if found is None or not _sharded_now(found[0]._flat_param):
        return None
    return _fsdp1_describe(*found)


def _refuse_fsdp1(carrier: str, how: str, why: str) -> ValueError:
    return ValueError(f"carrier {carrier!r} is held by {how}: {why}. nnmark projects a carrier sharded by FSDP1 "
                      f"with use_orig_params=True (Lightning's FSDPStrategy default) and FULL_SHARD or "
                      f"SHARD_GRAD_OP, or held as a DTensor: FSDP2 (torch.distributed.fsdp.fully_shard; Lightning's "
                      f"ModelParallelStrategy, Hugging Face fsdp_config={{'version': 2}}) or tensor parallel")


def check_not_fsdp1(model: torch.nn.Module, carrier: str) -> None:
    """ValueError naming the layout when FSDP1 holds ``carrier`` sharded where no parameter
    of the model is the carrier (``use_orig_params=False``: one flat parameter)."""
    found = _fsdp1_unit(model, carrier)
    if found is not None and _sharded_now(found[0]._flat_param):
        raise _refuse_fsdp1(carrier, _fsdp1_describe(*found),
                            "the carrier is no parameter of its own, its shape is lost in the flat parameter")


class FlatSlice(NamedTuple):
    """This rank's part of a carrier FSDP1 shards (``use_orig_params=True``): elements
    ``[start, start + numel)`` of the carrier of ``shape`` flattened in C order."""

    shape: tuple[int, ...]
    start: int
    numel: int
    group: Any  # the process group the unit shards over
    how: str  # the layout, for messages
    param: Any  # the original parameter, which the module holds while the unit is sharded


def fsdp1_holds(model: torch.nn.Module, carrier: str) -> bool:
    """Whether an FSDP1 unit inside ``model`` holds ``carrier`` in its flat parameter."""
    return _fsdp1_unit(model, carrier) is not None


def is_fsdp1_flattened(t) -> bool:
    """Whether FSDP1 made ``t`` an original parameter of a flat parameter (``use_orig_params``)."""
    return bool(getattr(t, "_fsdp_flattened", False)) and not is_dtensor(t)


def fsdp1_slice(model: torch.nn.Module, carrier: str, name: str | None = None, param=None) -> FlatSlice | None:
    """Where FSDP1 keeps this rank's part of ``carrier`` when it holds it sharded now; None
    when FSDP1 does not hold it or holds it whole. ValueError naming the layout when it is
    sharded in a way :func:`project_flat_slice` cannot project (a hybrid strategy), or when
    ``param`` (the carrier parameter ``name`` resolved to) is one FSDP1 flattened but no unit
    inside ``model`` holds it (the unit wraps ``model`` from outside)."""
    found = _fsdp1_unit(model, carrier, name)
    if found is None and param is not None and is_fsdp1_flattened(param):
        raise ValueError(f"carrier {carrier!r} is a parameter FSDP1 flattened (use_orig_params=True), held by a "
                         f"FullyShardedDataParallel unit outside the module given, which may hold only a slice of "
                         f"it: pass the module FSDP1 wrapped (the outermost FullyShardedDataParallel)")
    if found is None and name is not None and FSDP1_SEGMENT in name:
        unit = _owner(model, name)
        if unit is not None and not _readable(unit):  # a torch whose private FlatParameter changed
            raise ValueError(f"carrier {carrier!r} is held by FSDP1, whose flat parameter metadata (private to "
                             f"torch) is not readable in torch {torch.__version__}: nnmark cannot tell which "
                             f"slice of the carrier this rank holds")
    if found is None or not _sharded_now(found[0]._flat_param):
        return None
    m, i = found
    from torch.distributed.fsdp import ShardingStrategy

    how = _fsdp1_describe(m, i)
    if getattr(m._flat_param, "_params", None) is None:  # use_orig_params=False
        raise _refuse_fsdp1(carrier, how, "the carrier is no parameter of its own, its shape is lost in the flat "
                                          "parameter")
    if m.sharding_strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
        raise _refuse_fsdp1(carrier, how, "a hybrid strategy replicates the shards across a second process group")
    fp = m._flat_param
    info, shape, param = fp._shard_param_infos[i], tuple(fp._shapes[i]), fp._params[i]
    if not info.in_shard:
        return FlatSlice(shape, 0, 0, m.process_group, how, param)
    return FlatSlice(shape, int(info.intra_param_start_idx), int(info.numel_in_shard), m.process_group, how, param)


def project_flat_slice(key, piece: torch.Tensor, where: FlatSlice) -> torch.Tensor:
    """The raw projections ``[T]`` of a carrier FSDP1 shards, from this rank's ``piece``
    (its parameter: a 1-D view of elements ``[a, b)`` of the flattened carrier), the same on
    every rank as ``key.project`` of the whole carrier; differentiable in ``piece``. One
    all-reduce of T values on the unit's process group; the carrier is never gathered."""
    S, a, n = where.shape, where.start, where.numel
    if piece is not where.param and tuple(piece.shape) == S:
        # Unsharded views (SHARD_GRAD_OP between forward and backward): every rank holds the
        # whole carrier, a view into the unsharded flat parameter that FSDP reduce-scatters.
        return key.project(piece)
    if piece is not where.param or piece.numel() != n:
        raise ValueError(f"carrier {key.carrier!r} is held by {where.how}, but this rank's carrier tensor has "
                         f"shape {list(piece.shape)} where FSDP1 records a slice of {n} elements: a state nnmark "
                         f"cannot read")
    _check_shape(key, S)
    if n == 0:
        runs = []
    elif key.reduction == "flat":
        runs = [(a, piece.reshape(-1))]
    else:  # filter_mean: element i adds W_i / C_out to column i mod N
        acc = torch.float64 if piece.dtype == torch.float64 else torch.float32
        N, b = math.prod(S[1:]), a + n
        x = piece.reshape(-1).to(acc) / S[0]
        keras = key.order == "keras" and len(S) > 2
        if a // N == (b - 1) // N and not keras:  # inside one out-channel: columns a mod N onward
            runs = [(a % N, x)]
        else:  # rows of N, the first and last padded with zeros, summed over the rows
            r0, r1 = a // N, -(-b // N)
            m = torch.nn.functional.pad(x, (a - r0 * N, r1 * N - b)).reshape(r1 - r0, N).sum(0)
            if keras:
                m = m.reshape(S[1:]).permute(*range(1, len(S) - 1), 0).reshape(-1)  # (in, kh, kw) -> (kh, kw, in)
            runs = [(0, m)]
    return _sum(key, runs, piece, where.group)


def _check_shape(key, S: tuple) -> None:
    """The checks ``key.project`` makes of a whole carrier, made of a sharded one's global shape."""
    from .carriers import carrier_length

    if key.shape is not None and tuple(S) != tuple(key.shape):
        raise ValueError(f"carrier {key.carrier!r} has shape {list(S)}, the key expects {list(key.shape)}")
    n = carrier_length(S, key.reduction)
    if key.length is not None and n != key.length:
        raise ValueError(f"carrier {key.carrier!r} reduces to length {n}, the key's matrix expects {key.length}")


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
    _check_shape(key, tuple(t.shape))
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
            return _sum(key, [(0, m.reshape(-1))], local, mesh.get_group())
        return _sum(key, _runs(m, S[1:], d - 1, o), local, mesh.get_group())  # (keras order refused by check_layout)
    return _sum(key, _runs(local, S, d, o), local, mesh.get_group())


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


def _sum(key, runs, local: torch.Tensor, group) -> torch.Tensor:
    T = key.num_bits
    acc = torch.float64 if local.dtype == torch.float64 else torch.float32
    part = torch.zeros(T, dtype=acc, device=local.device)
    for col0, v in runs:
        if v.numel():
            part = part + key.project_vectors(v, col0).to(acc)
    if not runs:  # an empty shard still joins the all-reduce, and keeps the graph to its carrier
        part = part + local.sum() * 0
    return _SumOverRanks.apply(part, group)
