"""Carriers: the weight tensor a white-box mark lives in, and its reduction to a
vector (key spec v1). Also finds a carrier by state-dict name in a module or a
state dict, tolerating the usual wrapper prefixes."""
from __future__ import annotations

import difflib
import math
import re
from typing import Mapping

import torch

REDUCTIONS = ("filter_mean", "flat")
# Wrappers that prefix parameter names: DataParallel/DDP, Lightning, torch.compile.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# Wrappers that put a segment inside the names: torch.compile of a submodule
# (``self.net = torch.compile(net)``: ``net._orig_mod.2.weight`` is ``net.2.weight``) and
# FSDP1 (``_fsdp_wrapped_module.``; nnmark.sharded refuses its flattened shards by name).
_WRAPPER_SEGMENT = re.compile(r"(?<![^.])(?:_orig_mod|_fsdp_wrapped_module)\.")  # a whole segment


def reduce_carrier(weight: torch.Tensor, reduction: str, batched: bool = False, order: str = "torch") -> torch.Tensor:
    """``filter_mean``: weight as [out, -1] averaged over out (Uchida et al.: a 3x3x64x64
    conv gives 576 values); ``flat``: the whole tensor in C order. Batched input
    ``[C, *shape]`` gives ``[C, N]``. ``order="keras"`` lists a conv's filter_mean
    in (kh, kw, in) order, as Uchida's Keras code does."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"carrier weight must be a torch tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"carrier weight must be floating point, got {weight.dtype}")
    w = weight if batched else weight.unsqueeze(0)
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"carrier weight has unusable shape {list(weight.shape)}")
    if reduction == "flat":
        v = w.reshape(w.shape[0], -1)
    elif reduction == "filter_mean":
        if w.dim() < 3:
            raise ValueError(f"filter_mean needs a weight with an out-channel dimension (e.g. [out, in, kh, kw] "
                             f"or [out, in]); got shape {list(weight.shape)}; use reduction='flat' for vectors")
        m = w.mean(dim=1)  # [C, in, *k]
        if order == "keras" and m.dim() > 2:
            m = m.permute(0, *range(2, m.dim()), 1)  # (in, kh, kw) -> (kh, kw, in)
        v = m.reshape(w.shape[0], -1)
    else:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return v if batched else v.squeeze(0)  # a view: its backward copies nothing


def carrier_length(shape, reduction: str) -> int:
    """Length N of the carrier vector a weight of ``shape`` reduces to; ValueError if it cannot."""
    shape = tuple(shape)
    if reduction == "flat":
        if not shape or 0 in shape:
            raise ValueError(f"carrier weight has unusable shape {list(shape)}")
        return math.prod(shape)
    if reduction == "filter_mean":
        if len(shape) < 2 or 0 in shape:
            raise ValueError(f"filter_mean needs a weight with an out-channel dimension (e.g. [out, in, kh, kw] "
                             f"or [out, in]); got shape {list(shape)}; use reduction='flat' for vectors")
        return math.prod(shape[1:])
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def find_name(names, carrier: str) -> str:
    """The name in ``names`` that is ``carrier``, allowing wrapper prefixes on either side
    (and ``_orig_mod.`` / ``_fsdp_wrapped_module.`` inside a name: a compiled or FSDP1-wrapped submodule).

    Raises KeyError with close matches when there is none, ValueError when ambiguous."""
    names = list(names)
    if carrier in names:
        return carrier
    bare = bare_name(carrier)
    hits = [n for n in names if bare_name(n) == bare]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ValueError(f"carrier {carrier!r} is ambiguous here: {hits}")
    close = difflib.get_close_matches(carrier, names, n=3)
    hint = f"; close names: {close}" if close else ""
    raise KeyError(f"carrier {carrier!r} not found among {len(names)} tensors{hint}")


def bare_name(name: str) -> str:
    """``name`` as the unwrapped model calls it: wrapper prefixes and segments removed."""
    return strip_prefixes(_WRAPPER_SEGMENT.sub("", name))


def strip_prefixes(name: str) -> str:
    """``name`` without the wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) it starts with."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def module_tensor(model: torch.nn.Module, carrier: str) -> tuple[str, torch.Tensor]:
    """``(name, tensor)``: the live parameter (or else buffer) of ``model`` called ``carrier``.

    Raises KeyError with close matches when there is none, ValueError when ambiguous."""
    named = dict(model.named_parameters())
    try:
        name = find_name(named, carrier)
        return name, named[name]
    except KeyError:
        buffers = dict(model.named_buffers())
        if buffers:
            try:
                name = find_name(buffers, carrier)
                return name, buffers[name]
            except KeyError:
                pass
        raise


def module_parameter(model: torch.nn.Module, carrier: str) -> torch.Tensor:
    """The live parameter (or buffer) of ``model`` called ``carrier``."""
    return module_tensor(model, carrier)[1]


def from_state_dict(sd: Mapping[str, torch.Tensor], carrier: str) -> torch.Tensor:
    t = sd[find_name(sd.keys(), carrier)]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"state dict entry {carrier!r} is a {type(t).__name__}, not a tensor")
    return t
