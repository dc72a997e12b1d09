"""Structural obfuscation (permute and rescale hidden units) and its defence (realignment).

``permute_units`` changes the weights of a model but not its function: it
permutes the output units of a Conv/Linear layer (the *producer*), the
per-channel parameters between it and the next Conv/Linear layer (the
*consumer*), and the consumer's input units alike; optionally it scales each
unit by s > 0 and the consumer's matching input by 1/s, which passes unchanged
through positively homogeneous operations (ReLU, LeakyReLU, PReLU, max/avg
pooling, dropout, identity). A white-box mark read from the consumer's weights
(e.g. Uchida's filter_mean over out channels) then reads garbage.

``realign`` is the defence: given the owner's reference model, it walks the same
producer -> consumer chains and recovers each permutation as an assignment
problem (cosine similarity of the units' incoming weights, solved by
``scipy.optimize.linear_sum_assignment``), estimates the scales, and undoes both
on the suspect -- again without changing its function.

Chains come from a ``torch.fx`` trace. Only a producer whose output reaches exactly
one consumer through per-channel operations is touched; anything else (residual
adds, concatenations, a module called twice, shared parameters, untraceable code)
is skipped and the reason recorded -- never a silently different function.
"""
from __future__ import annotations

import builtins
import hashlib
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..carriers import strip_prefixes

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Per-channel ops with f(s*x) = s*f(x) for s > 0: a positive rescale passes through them.
_HOMOG_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Elementwise but not homogeneous: a permutation passes, a rescale does not.
_ELEMENTWISE = (nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink)
_HOMOG_FUNCS = {F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d,
                F.dropout3d}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_ELEMENTWISE_FUNCS = {torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.gelu, F.silu, F.elu, F.selu, F.relu6,
                      F.hardswish, F.hardsigmoid, F.softplus, F.mish}
_HOMOG_METHODS = {"relu", "relu_", "contiguous"}
_ELEMENTWISE_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
# Uses of a tensor that read only its metadata, never its values.
_META_METHODS = {"size", "dim", "numel"}
_META_ATTRS = {"shape", "dtype", "device", "ndim"}


@dataclass
class ObfuscationRecord:
    """What ``permute_units`` did.

    ``layers``: the producers permuted. ``permutations[name][i]``: the old index of
    the unit now at position i. ``scales[name][i]``: the factor unit i (new order)
    was scaled by -- only for producers whose chain allows a positive rescale;
    ``unscaled`` says why the others were not rescaled. ``skipped``: producers left
    alone, with the reason. ``max_output_change``: max |output change| on
    ``example_input`` when one was given, else None.
    """

    attack: str
    seed: int
    rescale: bool
    scale_range: tuple[float, float] = (0.5, 2.0)
    layers: list[str] = field(default_factory=list)
    permutations: dict[str, list[int]] = field(default_factory=dict)
    scales: dict[str, list[float]] = field(default_factory=dict)
    unscaled: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    max_output_change: float | None = None


@dataclass
class RealignRecord:
    """What ``realign`` did: per producer realigned, the mean cosine similarity of the
    matched units (1.0: an exact copy up to permutation and scale; an unrelated model
    gives far less) and how many units moved; ``skipped`` as in ObfuscationRecord."""

    attack: str = "realign"
    layers: list[str] = field(default_factory=list)
    mean_similarity: dict[str, float] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class _Chain:
    producer: str
    consumer: str
    units: int
    block: int  # S: consumer input features per unit (a conv channel flattened into S = H*W features)
    per_channel: list[str]  # BatchNorm / per-channel PReLU modules between producer and consumer
    scale_at: str | None  # where a rescale is applied (producer or the last affine BatchNorm); None: not possible
    unscaled_reason: str = ""


# ---------------------------------------------------------------- chain discovery

def _nodes_in(args) -> list:
    out: list = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(args)
    return out


def _is_meta_use(user: torch.fx.Node) -> bool:
    if user.op == "call_method" and user.target in _META_METHODS:
        return True
    return (user.op == "call_function" and user.target is builtins.getattr and len(user.args) > 1
            and user.args[1] in _META_ATTRS)


def _value_users(node: torch.fx.Node) -> list:
    return [u for u in node.users if not _is_meta_use(u)]


def _is_batch_size(a) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` in the traced graph."""
    if not isinstance(a, torch.fx.Node):
        return False
    if a.op == "call_method" and a.target == "size":
        return len(a.args) == 2 and a.args[1] == 0
    if a.op == "call_function" and a.target is operator.getitem and a.args[1] == 0:
        src = a.args[0]
        return (isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target is builtins.getattr
                and src.args[1] == "shape")
    return False


def _flatten_kind(node: torch.fx.Node, modules) -> str | None:
    """'flatten' if ``node`` flattens every dim after the batch dim; 'bad' for another
    flatten/view/reshape; None if it is no reshaping at all."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.Flatten):
        m = modules[node.target]
        return "flatten" if m.start_dim == 1 and m.end_dim == -1 else "bad"
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return "flatten" if start == 1 and end == -1 else "bad"
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = list(node.args[1:])
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
            shape = list(shape[0])
        # only view(x.size(0), -1): view(-1, K) flattens correctly only if K is the whole sample
        return "flatten" if len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1 else "bad"
    if node.op == "call_function" and node.target in (torch.reshape,):
        return "bad"
    return None


def _describe(node: torch.fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', str(node.target))}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


def _follow(node: torch.fx.Node, modules, calls, shared) -> _Chain | str:
    """The chain from producer ``node`` to its one consumer, or why there is none."""
    pname = node.target
    producer = modules[pname]
    is_conv = isinstance(producer, _CONVS)
    units = producer.out_channels if is_conv else producer.out_features
    per_channel: list[str] = []
    scale_at: str | None = pname
    unscaled = ""
    flattened = False
    cur = node
    while True:
        users = _value_users(cur)
        if not users:
            return "its output is not used"
        if len(users) > 1:
            what = ", ".join(_describe(u, modules) for u in users[:4])
            return (f"its output is used {len(users)} times ({what}): a branch, residual or "
                    f"concatenation, where a permutation would not be function-preserving")
        user = users[0]
        if user.op == "output":
            return "its units are (part of) the model's output"
        others = _nodes_in((user.args[1:], user.kwargs))  # x.size(0) in a view, say; never the units again
        if not user.args or user.args[0] is not cur or (user.op == "call_module" and others) or \
                any(n is cur for n in others):
            return f"its output enters {_describe(user, modules)} in an unsupported way"
        mod = modules[user.target] if user.op == "call_module" else None
        # the consumer
        if isinstance(mod, (nn.Linear,) + _CONVS):
            if calls.get(id(mod), 0) != 1:
                return f"its consumer {user.target} is called {calls.get(id(mod), 0)} times"
            if user.target in shared:
                return f"its consumer {user.target} shares parameters with another module"
            if isinstance(mod, _CONVS):
                if not is_conv or flattened or type(mod) is not type(producer):
                    return f"{user.target} ({type(mod).__name__}) after {pname} ({type(producer).__name__}) " \
                           f"needs a reshape this tool does not follow"
                if mod.groups != 1:
                    return f"its consumer {user.target} is a grouped convolution (groups={mod.groups})"
                if mod.in_channels != units:
                    return f"{user.target} has {mod.in_channels} input channels, {pname} gives {units}"
                block = 1
            else:
                if is_conv and not flattened:
                    return f"a Linear ({user.target}) follows the convolution without a flatten"
                if mod.in_features % units or (not is_conv and mod.in_features != units):
                    return (f"{user.target} has {mod.in_features} input features, not a multiple of the "
                            f"{units} units of {pname} laid out unit-major")
                block = mod.in_features // units
            return _Chain(pname, user.target, units, block, per_channel, scale_at, unscaled)
        # operations between producer and consumer
        kind = _flatten_kind(user, modules)
        if kind == "bad":
            return f"{_describe(user, modules)} reshapes its output in a way this tool does not follow"
        if kind == "flatten":
            if flattened:
                return "its output is flattened twice"
            flattened = True
        elif isinstance(mod, _BNS):
            if flattened:
                return f"BatchNorm {user.target} after the flatten mixes units and positions"
            if mod.num_features != units:
                return f"BatchNorm {user.target} has {mod.num_features} features, {pname} gives {units}"
            if calls.get(id(mod), 0) != 1 or user.target in shared:
                return f"BatchNorm {user.target} is called more than once or shares parameters"
            per_channel.append(user.target)
            if mod.affine:  # BatchNorm cancels a rescale of its input: rescale its affine output instead
                scale_at, unscaled = user.target, ""
            else:
                scale_at, unscaled = None, f"BatchNorm {user.target} has no affine parameters to rescale"
        elif isinstance(mod, nn.PReLU):
            if mod.num_parameters != 1:
                if flattened or mod.num_parameters != units:
                    return f"PReLU {user.target} has {mod.num_parameters} parameters, not one per unit"
                if calls.get(id(mod), 0) != 1 or user.target in shared:
                    return f"PReLU {user.target} is called more than once or shares parameters"
                per_channel.append(user.target)
        elif isinstance(mod, _POOLS) or (user.op == "call_function" and user.target in _POOL_FUNCS):
            if not is_conv or flattened:
                return f"{_describe(user, modules)} would pool across units"
            if getattr(mod, "return_indices", False) or user.kwargs.get("return_indices", False):
                return f"{_describe(user, modules)} returns indices"
        elif isinstance(mod, _HOMOG_ELEMENTWISE) or (user.op == "call_function" and user.target in _HOMOG_FUNCS) \
                or (user.op == "call_method" and user.target in _HOMOG_METHODS):
            pass
        elif isinstance(mod, _ELEMENTWISE) or (user.op == "call_function" and user.target in _ELEMENTWISE_FUNCS) \
                or (user.op == "call_method" and user.target in _ELEMENTWISE_METHODS):
            if scale_at is not None:
                scale_at, unscaled = None, f"{_describe(user, modules)} is not positively homogeneous"
        else:
            return f"unsupported operation after it: {_describe(user, modules)}"
        cur = user


def _shared_names(model: nn.Module) -> set[str]:
    """Modules whose parameters or buffers are also reachable under another name (tied weights,
    a module registered twice): changing them in one place changes them in the other."""
    owners: dict[int, set[str]] = {}
    mods: dict[int, set[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        mods.setdefault(id(m), set()).add(name)
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            owners.setdefault(id(t), set()).add(name)
    shared: set[str] = set()
    for names in list(owners.values()) + list(mods.values()):
        if len(names) > 1:
            shared |= names
    return shared


def _find_chains(model: nn.Module) -> tuple[list[_Chain], dict[str, str]]:
    """Chains in forward order, and the reason for every Conv/Linear that is not the start of one."""
    shared = _shared_names(model)
    chains: list[_Chain] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()

    def analyse(mod: nn.Module, prefix: str):
        try:
            gm = torch.fx.symbolic_trace(mod)
        except Exception as exc:  # untraceable forward (data-dependent control flow, ...): try its parts
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            skipped[prefix or "<model>"] = (f"torch.fx cannot trace its forward ({type(exc).__name__}: {msg}); "
                                            f"only chains inside its traceable submodules are used")
            for cname, child in mod.named_children():
                analyse(child, f"{prefix}.{cname}" if prefix else cname)
            return
        modules = {f"{prefix}.{k}" if prefix else k: v for k, v in mod.named_modules(remove_duplicate=False)}
        calls: dict[int, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                n.target = f"{prefix}.{n.target}" if prefix else n.target
                calls[id(modules[n.target])] = calls.get(id(modules[n.target]), 0) + 1
        attrs = [f"{prefix}.{n.target}" if prefix else n.target for n in gm.graph.nodes if n.op == "get_attr"]
        for n in gm.graph.nodes:
            if n.op != "call_module" or not isinstance(modules[n.target], (nn.Linear,) + _CONVS):
                continue
            name, m = n.target, modules[n.target]
            if name in seen:
                continue
            seen.add(name)
            if isinstance(m, _CONVS) and m.groups != 1:
                skipped[name] = f"grouped convolution (groups={m.groups})"
            elif calls[id(m)] != 1:
                skipped[name] = f"called {calls[id(m)]} times in forward"
            elif name in shared:
                skipped[name] = "shares parameters with another module"
            else:
                r = _follow(n, modules, calls, shared)
                if isinstance(r, str):
                    skipped[name] = r
                elif any(a.startswith(mname + ".") for a in attrs for mname in
                         [r.producer, r.consumer] + r.per_channel):
                    skipped[name] = "forward reads its (or its consumer's) parameters directly"
                else:
                    chains.append(r)

    analyse(model, "")
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear,) + _CONVS) and name not in seen and name not in skipped:
            skipped[name] = "not reached by a traceable forward"
    return chains, skipped


# ---------------------------------------------------------------- transformation

def _apply(model: nn.Module, chain: _Chain, perm: torch.Tensor, scale: torch.Tensor | None) -> None:
    """New unit i := old unit perm[i], then scaled by scale[i] at the chain's scale point,
    with the consumer's input i scaled by 1/scale[i]: the function is unchanged."""
    prod = model.get_submodule(chain.producer)
    cons = model.get_submodule(chain.consumer)

    def take(t: torch.Tensor | None, dim: int):
        if t is not None:
            t.copy_(t.index_select(dim, perm.to(t.device)))

    take(prod.weight, 0)
    take(prod.bias, 0)
    for name in chain.per_channel:
        m = model.get_submodule(name)
        if isinstance(m, _BNS):
            take(m.weight, 0)
            take(m.bias, 0)
            take(m.running_mean, 0)
            take(m.running_var, 0)
        else:  # per-channel PReLU
            take(m.weight, 0)
    w = cons.weight
    v = w.reshape(w.shape[0], chain.units, chain.block, *w.shape[2:])  # [out, units, S, *k]
    v = v.index_select(1, perm.to(w.device))
    if scale is not None:
        point = model.get_submodule(chain.scale_at)
        for t in (point.weight, point.bias):
            if t is not None:
                s = scale.to(t.device, torch.float64)
                t.copy_((t.double() * s.view(-1, *[1] * (t.dim() - 1))).to(t.dtype))
        inv = (1.0 / scale).to(w.device, torch.float64)
        v = (v.double() * inv.view(1, -1, *[1] * (v.dim() - 2))).to(w.dtype)
    w.copy_(v.reshape(w.shape))


def _layer_generator(seed: int, name: str) -> torch.Generator:
    # per-layer stream: a layer's permutation does not depend on which other layers are chosen
    d = hashlib.sha256(f"nnmark:permute_units:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(d[:8], "little") & ((1 << 63) - 1))


def _relevant(skipped: dict[str, str], wanted: set[str] | None, model: nn.Module) -> dict[str, str]:
    """The skip reasons worth reporting: all of them, or (with ``layers``) those of the
    producers asked for plus the parts of the model that could not be traced."""
    if wanted is None:
        return dict(skipped)
    producers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear,) + _CONVS)}
    return {k: v for k, v in skipped.items() if k in wanted or k not in producers}


def _check_layers(layers, model: nn.Module, fn: str) -> set[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers) if isinstance(layers, Iterable) else layers
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"{fn}: layers must be None or a list of module names (str), got {layers!r}")
    names = dict(model.named_modules())
    bad = [n for n in layers if not isinstance(names.get(n), (nn.Linear,) + _CONVS)]
    if bad:
        valid = [n for n, m in names.items() if isinstance(m, (nn.Linear,) + _CONVS)]
        raise ValueError(f"{fn}: layers {bad} are not Conv/Linear modules of the model; expected some of {valid}")
    return set(layers)


@torch.no_grad()
def _outputs(model: nn.Module, x):
    training = {m: m.training for m in model.modules()}
    model.eval()  # eval: dropout off, BatchNorm running stats read, not updated
    try:
        return model(x)
    finally:
        for m, t in training.items():
            m.train(t)


def _max_change(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (list, tuple)):
        return max((_max_change(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, Mapping):
        return max((_max_change(a[k], b[k]) for k in a), default=0.0)
    return 0.0


@torch.no_grad()
def permute_units(model: nn.Module, seed: int = 0, rescale: bool = True, scale_range=(0.5, 2.0), layers=None,
                  *, example_input=None) -> ObfuscationRecord:
    """Permutes (and rescales) the hidden units of ``model`` in place, keeping its function.

    For every Conv/Linear producer whose output reaches exactly one Conv/Linear
    consumer through per-channel operations (activations, BatchNorm, pooling,
    dropout, a flatten into a Linear), draws a random permutation of its units
    (seeded by ``seed`` and the layer's name) and applies it to the producer's
    output units, the per-channel parameters in between and the consumer's input
    units. With ``rescale``, unit u is also scaled by s_u, log-uniform in
    ``scale_range``, and the consumer's input u by 1/s_u -- where every operation
    after the scale point is positively homogeneous (after a BatchNorm the scale
    goes onto its affine weight and bias, since BatchNorm cancels a scaled input).
    ``layers`` restricts the producers (module names). Other producers are left
    alone and listed in ``record.skipped`` with the reason.

    ``example_input``: when given, the model runs on it (in eval mode) before and
    after, and ``record.max_output_change`` says by how much the outputs moved
    (float rounding only). Dropout in training mode draws different masks for
    permuted units: the function is the same in distribution, not sample by sample.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"permute_units needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(rescale, (bool, np.bool_)):
        raise TypeError(f"rescale must be a bool, got {rescale!r}")
    try:
        lo, hi = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise TypeError(f"scale_range must be a pair of numbers (lo, hi), got {scale_range!r}") from None
    if not (0 < lo <= hi < math.inf):
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi < inf, got {scale_range!r}")
    wanted = _check_layers(layers, model, "permute_units")
    before = _outputs(model, example_input) if example_input is not None else None

    chains, skipped = _find_chains(model)
    rec = ObfuscationRecord("permute_units", int(seed), bool(rescale), (lo, hi))
    rec.skipped = _relevant(skipped, wanted, model)
    for chain in chains:
        if wanted is not None and chain.producer not in wanted:
            continue
        g = _layer_generator(int(seed), chain.producer)
        perm = torch.randperm(chain.units, generator=g)
        scale = None
        if rescale and chain.scale_at is not None:
            u = torch.rand(chain.units, generator=g, dtype=torch.float64)
            scale = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        elif rescale:
            rec.unscaled[chain.producer] = chain.unscaled_reason
        _apply(model, chain, perm, scale)
        rec.layers.append(chain.producer)
        rec.permutations[chain.producer] = perm.tolist()
        if scale is not None:
            rec.scales[chain.producer] = scale.tolist()
    if before is not None:
        rec.max_output_change = _max_change(before, _outputs(model, example_input))
    return rec


# ---------------------------------------------------------------- realignment

def _reference_state(reference, suspect: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's tensors under the suspect's state-dict names; ValueError on any mismatch."""
    if isinstance(reference, nn.Module):
        ref = reference.state_dict()
    elif isinstance(reference, Mapping):
        ref = dict(reference)
    else:
        raise TypeError(f"reference must be a torch.nn.Module or a state dict, got {type(reference).__name__}")
    sus = suspect.state_dict()
    ref_by = {strip_prefixes(k): k for k in ref}
    sus_by = {strip_prefixes(k): k for k in sus}
    missing = sorted(set(sus_by) - set(ref_by))
    extra = sorted(set(ref_by) - set(sus_by))
    shapes = [f"{k}: suspect {list(sus[sus_by[k]].shape)} vs reference {list(ref[ref_by[k]].shape)}"
              for k in sorted(set(sus_by) & set(ref_by))
              if not isinstance(ref[ref_by[k]], torch.Tensor) or ref[ref_by[k]].shape != sus[sus_by[k]].shape]
    if missing or extra or shapes:
        parts = ([f"missing in the reference: {missing[:5]}"] if missing else []) + \
                ([f"not in the suspect: {extra[:5]}"] if extra else []) + \
                ([f"shape mismatch: {shapes[:5]}"] if shapes else [])
        raise ValueError("reference does not have the suspect's architecture (the same state-dict names "
                         "and shapes are needed): " + "; ".join(parts))
    if isinstance(reference, nn.Module):
        rmods = {strip_prefixes(n): type(m) for n, m in reference.named_modules()}
        diff = [n for n, m in suspect.named_modules() if strip_prefixes(n) in rmods and rmods[strip_prefixes(n)] is not type(m)]
        if diff:
            raise ValueError(f"reference does not have the suspect's architecture: modules {diff[:5]} differ in type")
    return {sk: ref[ref_by[strip_prefixes(sk)]] for sk in sus}


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor:
    return t.detach().reshape(n, -1).double().cpu() if t is not None else torch.zeros(n, 0, dtype=torch.float64)


@torch.no_grad()
def realign(suspect: nn.Module, reference, layers=None) -> RealignRecord:
    """Undoes ``permute_units`` (or any unit permutation and positive rescale) on ``suspect``
    in place, using the owner's ``reference`` model (a module or its state dict, same
    architecture), so that white-box extraction reads the carrier in the owner's order.

    Chains are walked in forward order; each producer's inputs are already realigned
    when it is reached, so its units can be matched to the reference's by the cosine
    similarity of their incoming weights (bias included; scale-invariant), as an
    assignment problem (``scipy.optimize.linear_sum_assignment``). Each unit's scale
    is then estimated by least squares against its reference unit at the scale point
    (the producer's row, or a BatchNorm's weight and bias) and divided out, the
    consumer's inputs multiplied back: the suspect's function is unchanged.
    Fine-tuned or pruned suspects get the best assignment; ``mean_similarity`` tells
    how close the matched units are. ``layers`` restricts the producers realigned
    (realigning a layer assumes the layers feeding it are aligned already).
    """
    from scipy.optimize import linear_sum_assignment

    if not isinstance(suspect, nn.Module):
        raise TypeError(f"realign needs the suspect as a torch.nn.Module, got {type(suspect).__name__}")
    ref = _reference_state(reference, suspect)
    wanted = _check_layers(layers, suspect, "realign")
    chains, skipped = _find_chains(suspect)
    rec = RealignRecord(skipped=_relevant(skipped, wanted, suspect))
    for chain in chains:
        if wanted is not None and chain.producer not in wanted:
            continue
        n = chain.units
        prod = suspect.get_submodule(chain.producer)
        pw, pb = f"{chain.producer}.weight", f"{chain.producer}.bias"
        a = torch.cat([_rows(prod.weight, n), _rows(prod.bias, n)], 1)
        r = torch.cat([_rows(ref[pw], n), _rows(ref.get(pb), n)], 1)
        for what, t in (("suspect", a), ("reference", r)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"realign: the {what}'s {chain.producer} weights contain NaN or Inf")
        an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)  # a dead (all-zero) unit matches nothing well
        rn = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
        sim = (an @ rn.T).numpy()
        rows, cols = linear_sum_assignment(sim, maximize=True)
        sigma = np.empty(n, dtype=np.int64)
        sigma[cols] = rows  # reference unit j is suspect unit sigma[j]
        perm = torch.from_numpy(sigma)
        scale = None
        if chain.scale_at is not None:
            point = suspect.get_submodule(chain.scale_at)
            sa = torch.cat([_rows(point.weight, n), _rows(point.bias, n)], 1)[perm]
            sr = torch.cat([_rows(ref[f"{chain.scale_at}.weight"], n), _rows(ref.get(f"{chain.scale_at}.bias"), n)], 1)
            den = (sr * sr).sum(1)
            s = (sa * sr).sum(1) / den.clamp_min(1e-300)
            # no usable estimate (a dead unit, a sign flip from heavy fine-tuning): leave that unit's scale
            s = torch.where((den > 0) & (s > 0) & torch.isfinite(s), s, torch.ones_like(s))
            if not bool((s == 1).all()):
                scale = 1.0 / s
        _apply(suspect, chain, perm, scale)
        rec.layers.append(chain.producer)
        rec.mean_similarity[chain.producer] = float(sim[sigma, np.arange(n)].mean())
        rec.changed[chain.producer] = int((sigma != np.arange(n)).sum())
    return rec


__all__ = ["permute_units", "realign", "ObfuscationRecord", "RealignRecord"]
