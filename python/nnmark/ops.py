"""Native ops over torch tensors (registered as torch custom ops ``torch.ops.nnmark.*``,
see :mod:`nnmark._custom_ops`, so torch.compile and torch.export see them): the keyed projection of key spec v1 (X never
stored) and the dense projection for imported keys, each differentiable.

Shapes: carriers ``w`` are ``[N]`` or ``[C, N]``; projections are ``[T]`` or
``[C, T]``. Accumulation is float32 for float32/float16/bfloat16 carriers and
float64 for float64 ones; results come back in that accumulation dtype.
"""
from __future__ import annotations

import itertools
import operator

import numpy as np
import torch

from . import _custom_ops as _ops
from . import _ext
from ._arrays import DTYPE_CODES, FLOAT_DTYPES, as_tensor

_UINT32 = 1 << 32


def philox4x32_10(counter, key) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one 4-word counter under a 2-word key (for known-answer checks)."""
    c = [int(v) for v in counter]
    k = [int(v) for v in key]
    if len(c) != 4 or len(k) != 2 or not all(0 <= v < _UINT32 for v in c + k):
        raise ValueError(f"philox4x32_10 expects 4 counter and 2 key words in [0, 2^32), got {counter!r}, {key!r}")
    return tuple(_ext.cpu.philox4x32_10(*c, *k))


def _check_subkey(subkey) -> tuple[int, int]:
    try:
        k0, k1 = subkey
        k0, k1 = int(k0), int(k1)
    except (TypeError, ValueError):
        raise ValueError(f"subkey must be two uint32 words (k0, k1), got {subkey!r}") from None
    if not (0 <= k0 < _UINT32 and 0 <= k1 < _UINT32):
        raise ValueError(f"subkey words must be in [0, 2^32), got ({k0}, {k1})")
    return k0, k1


def _carriers(w, what: str = "carrier") -> tuple[torch.Tensor, bool]:
    w = as_tensor(w, what)
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float64, float16 or bfloat16, got {w.dtype}")
    if w.dim() not in (1, 2):
        raise ValueError(f"{what} must be [N] or [C, N], got shape {list(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{what} is empty (shape {list(w.shape)})")
    return w, w.dim() == 1


def keyed_projection(w, subkey, bits: int, col0: int = 0) -> torch.Tensor:
    """``p = X . w`` with X in {-1,+1}^{bits x N} drawn from Philox under ``subkey``.

    ``w``: ``[N]`` or ``[C, N]`` (torch, numpy or cupy; CPU or CUDA). Returns ``[T]``
    or ``[C, T]`` (float32, or float64 for float64 input); differentiable in ``w``.
    ``col0``: the index in a longer carrier of ``w``'s first element (a shard projects
    with X's columns col0..col0+N-1, so the shards' projections sum to the whole one).
    """
    k0, k1 = _check_subkey(subkey)
    T = int(bits)
    if T < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if isinstance(col0, bool) or int(col0) != col0 or col0 < 0:
        raise ValueError(f"col0 must be an integer >= 0, got {col0!r}")
    w, single = _carriers(w)
    w2 = w.unsqueeze(0) if single else w
    p = _keyed(w2, T, k0, k1, int(col0))
    return p.squeeze(0) if single else p


def _keyed(w2: torch.Tensor, T: int, k0: int, k1: int, col0: int) -> torch.Tensor:
    """The op on ``[C, N]``. Plain eager code skips the dispatcher (it costs more than a small
    projection): the kernel itself when no graph is recorded, else the op's backward formula
    as an autograd Function. Compilers, tracers and tensor subclasses get the registered op."""
    if _ops.direct_grad(w2):
        if w2.requires_grad and torch.is_grad_enabled():
            return _ops.EagerProjection.apply(w2, T, k0, k1, col0)
        return _ops.project(w2, T, k0, k1, col0)
    return _ops.keyed_projection(w2, T, k0, k1, col0)


def keyed_projection_transpose(gp, subkey, n: int) -> torch.Tensor:
    """``g = X^T . gp`` for ``gp`` ``[T]`` or ``[C, T]`` (float32/float64): the backward op."""
    k0, k1 = _check_subkey(subkey)
    gp = as_tensor(gp, "gp")
    if gp.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gp must be float32 or float64, got {gp.dtype}")
    if gp.dim() not in (1, 2) or gp.numel() == 0:
        raise ValueError(f"gp must be a non-empty [T] or [C, T], got shape {list(gp.shape)}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    single = gp.dim() == 1
    g = _ops.keyed_projection_t(gp.unsqueeze(0) if single else gp, int(n), k0, k1)
    return g.squeeze(0) if single else g


def _subkey_array(subkeys) -> np.ndarray:
    """``subkeys`` as a C-contiguous uint32 numpy ``[K, 2]``, each word checked to be in [0, 2^32)."""
    if isinstance(subkeys, torch.Tensor):
        if subkeys.device.type != "cpu":
            raise ValueError(f"subkeys are on {subkeys.device}; keyed_projection_many_keys runs on the CPU")
        subkeys = subkeys.detach().numpy()
    arr = np.asarray(subkeys)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"subkeys must be integers (uint32 words), got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
        raise ValueError(f"subkeys must be [K, 2] (k0, k1 per key) with K >= 1, got shape {list(arr.shape)}")
    if arr.dtype != np.uint32:
        wide = arr.astype(np.int64) if arr.dtype != np.uint64 else arr
        if (wide < 0).any() or (wide >= _UINT32).any():
            raise ValueError("subkey words must be in [0, 2^32)")
        arr = wide.astype(np.uint32)
    return np.ascontiguousarray(arr)


def keyed_projection_many_keys(w, subkeys, bits: int) -> torch.Tensor:
    """``p[k] = X_k . w`` for one carrier ``w`` under many subkeys, in one native call.

    ``w``: one carrier ``[N]`` (float32, float64, float16 or bfloat16; torch or numpy, on
    the CPU), widened exactly to float64. ``subkeys``: ``[K, 2]`` uint32 words (k0, k1) per
    key (torch, numpy or a list of pairs; integer dtypes are checked to fit uint32).
    Returns float64 ``[K, bits]``: row k equals ``keyed_projection(w.double(), subkeys[k],
    bits)`` (the same sums in the same order as that op on one thread; a carrier it splits
    over threads sums in another order, so rows then agree to rounding). Keys are split over
    the CPU threads (:func:`nnmark.set_num_threads`). Not differentiable. For key searches
    (:func:`nnmark.attacks.forge_key`). CPU only: a CUDA ``w`` raises ValueError (move it
    with ``w.cpu()``); there is no CUDA kernel yet.
    """
    w = as_tensor(w, "carrier")
    if w.device.type != "cpu":
        raise ValueError(f"carrier is on {w.device}; keyed_projection_many_keys runs on the CPU only "
                         f"(pass w.cpu())")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"carrier must be float32, float64, float16 or bfloat16, got {w.dtype}")
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"carrier must be one non-empty vector [N], got shape {list(w.shape)}")
    if isinstance(bits, bool) or int(bits) != bits or int(bits) < 1:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    T = int(bits)
    sk = torch.from_numpy(_subkey_array(subkeys).astype(np.int64))
    return _ops.keyed_projection_many_keys(w.detach().to(torch.float64), sk, T)


# ---------------------------------------------------------------- dense (imported keys)
def dense_projection(w, x) -> torch.Tensor:
    """``p = X . w`` with an explicit matrix ``x`` ``[T, N]`` (float32 or float64).

    For keys made by other tools (e.g. Uchida et al.'s saved Gaussian matrix).
    ``w`` is ``[N]`` or ``[C, N]`` on the same device; differentiable in ``w``.
    """
    w, single = _carriers(w)
    x = as_tensor(x, "projection matrix").detach()
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"projection matrix must be float32 or float64, got {x.dtype}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"projection matrix must be a non-empty [T, N], got shape {list(x.shape)}")
    if x.shape[1] != w.shape[-1]:
        raise ValueError(f"projection matrix has N={x.shape[1]} columns but the carrier has length {w.shape[-1]}")
    if x.device != w.device:
        raise ValueError(f"projection matrix is on {x.device} but the carrier is on {w.device}")
    if x.dtype == torch.float64 and w.dtype != torch.float64:
        w = w.double()
    elif x.dtype == torch.float32 and w.dtype == torch.float64:
        x = x.double()
    p = _ops.dense_projection(w.unsqueeze(0) if single else w, x.contiguous())
    return p.squeeze(0) if single else p


# ---------------------------------------------------------------- trigger-set verification
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _trigger_logits(logits) -> tuple[torch.Tensor, bool]:
    """Logits as a [K, B, C] tensor, and whether the caller passed a single [B, C]."""
    logits = as_tensor(logits, "logits")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [K, B, C] or [B, C], got shape {list(logits.shape)}")
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"logits are on {logits.device}; expected a cpu or cuda tensor")
    single = logits.dim() == 2
    if single:
        logits = logits.unsqueeze(0)
    K, B, C = logits.shape
    if K < 1 or B < 1:
        raise ValueError(f"logits are empty: need at least one checkpoint and one trigger, got shape "
                         f"{list(logits.shape)}")
    if C < 2:
        raise ValueError(f"logits need at least 2 classes, got C={C} (shape {list(logits.shape)})")
    return logits, single


def _trigger_labels(labels, B: int, C: int, device: torch.device) -> torch.Tensor:
    """Labels as a contiguous int64 [B] tensor on ``device``, each checked to be in [0, C)."""
    if isinstance(labels, (list, tuple)):
        labels = torch.as_tensor(labels)
    labels = as_tensor(labels, "labels")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int64, int32, int16, int8 or uint8), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be [B], got shape {list(labels.shape)}")
    if labels.shape[0] != B:
        raise ValueError(f"got {labels.shape[0]} labels for B={B} triggers in the logits")
    if labels.device != device and labels.device.type != "cpu":
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}; "
                         f"pass labels on the cpu or on {device}")
    bad = (labels < 0) | (labels >= C)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(labels[i])} at index {i} is out of range: labels must be in [0, {C}) "
                         f"for C={C} classes")
    return labels.to(device=device, dtype=torch.int64).contiguous()


def _null_rate(null_rate, C: int) -> float:
    if null_rate is None:
        return 1.0 / C
    try:
        if isinstance(null_rate, (bool, str, bytes)):
            raise TypeError
        rate = float(null_rate)
    except (TypeError, ValueError):
        raise TypeError(f"null_rate must be a float in (0, 1) or None, got {type(null_rate).__name__}") from None
    if not (0.0 < rate < 1.0):  # also rejects NaN
        raise ValueError(f"null_rate must be in (0, 1), got {null_rate!r}")
    return rate


def trigger_verify(logits, labels, null_rate=None) -> dict[str, torch.Tensor]:
    """Black-box verification of K checkpoints on one trigger set, in one native call.

    ``logits``: ``[K, B, C]`` (K checkpoints, B triggers, C classes) or ``[B, C]``;
    float32/float64/float16/bfloat16; torch, numpy or cupy; CPU or CUDA (CUDA runs on
    the current stream). ``labels``: ``[B]`` integers in ``[0, C)``, on the CPU or on the
    logits' device (moved there). ``null_rate``: hit probability of one trigger under
    the null hypothesis, in (0, 1); default ``1 / C`` (or a rate measured by calibration
    on unmarked models).

    Per checkpoint, a trigger is a hit when its top-1 class (argmax, ties to the lowest
    index as ``torch.argmax``) equals its label; a row holding a NaN logit is a miss.
    Returns CPU tensors ``hits`` (int64), ``margin`` (float64: mean over rows of
    ``logit[label] - max other logit``; rows whose margin is NaN -- a NaN logit, or label
    and runner-up the same infinity -- are left out, NaN if none is left) and ``p_value``
    (float64: exact ``P[Binomial(B, null_rate) >= hits]``), each ``[K]``, or 0-d for a
    ``[B, C]`` input.
    """
    logits, single = _trigger_logits(logits)
    K, B, C = logits.shape
    rate = _null_rate(null_rate, C)
    y = _trigger_labels(labels, B, C, logits.device)
    h, m, p = _ops.trigger_verify(logits.detach(), y, rate)
    out = {"hits": h, "margin": m, "p_value": p}
    if logits.is_cuda:
        out = {k: v.cpu() for k, v in out.items()}
    return {k: v.squeeze(0) for k, v in out.items()} if single else out


# ---------------------------------------------------------------- magnitude selection (pruning)
_DTYPE_OF = operator.attrgetter("dtype")
_ON_CPU, _ON_CUDA = operator.attrgetter("is_cpu"), operator.attrgetter("is_cuda")


def _weight_list(tensors, what: str = "tensors") -> tuple[list[torch.Tensor], torch.device]:
    """The tensors as a list, checked, and the one device (cpu or a cuda device) they share."""
    ts = list(tensors)
    if not ts:
        raise ValueError(f"{what}: the list is empty")
    if _weights_ok(ts):
        return ts, ts[0].device
    for i, t in enumerate(ts):  # something is wrong: find it and say which
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a torch tensor")
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{what}[{i}] has dtype {t.dtype}; expected float32, float64, float16 or bfloat16")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{what}[{i}] is on {t.device}; the native select runs on cpu or cuda tensors")
        if t.device != ts[0].device:
            raise ValueError(f"{what}[{i}] is on {t.device} but {what}[0] is on {ts[0].device}; "
                             f"put all the tensors on one device")
        if not t.is_contiguous():
            raise ValueError(f"{what}[{i}] is not contiguous")
    return ts, ts[0].device


def _weights_ok(ts: list) -> bool:
    """Whether every tensor passes _weight_list's checks, one C-level pass per property (a
    model has thousands of tensors: a Python loop of attribute reads took ~1 ms per 1,600)."""
    if not all(map(isinstance, ts, itertools.repeat(torch.Tensor))):
        return False
    if not set(map(_DTYPE_OF, ts)) <= DTYPE_CODES.keys():
        return False
    if all(map(_ON_CPU, ts)):
        pass
    elif not (all(map(_ON_CUDA, ts)) and len(set(map(torch.Tensor.get_device, ts))) == 1):
        return False
    return all(map(torch.Tensor.is_contiguous, ts))


def _written(*tensors: torch.Tensor) -> None:
    """Bumps the version counters of tensors a native op wrote in place (as torch's own
    in-place ops do), so autograd sees that saved tensors changed. Inference-mode
    tensors have no counter."""
    ts = [t for t in tensors if not t.is_inference()]
    if ts:
        torch.autograd.graph.increment_version(ts)


def magnitude_threshold(tensors, k: int) -> tuple[float, int, int]:
    """The k-th smallest |w| (1-based) over a list of tensors, without concatenating them.

    The tensors are contiguous, all on the CPU or all on one CUDA device (CUDA runs on
    the current stream and waits for it). Returns ``(threshold, below, equal)``:
    ``below`` weights have |w| < threshold and ``equal`` have |w| == threshold
    (below < k <= below + equal). Exact: the same value as
    ``torch.kthvalue(torch.cat([t.abs().flatten() ...]), k)``, and the same result on
    either device. NaN ranks above +inf.
    """
    ts, _ = _weight_list(tensors)
    return _threshold(ts, k)


def _threshold(ts: list[torch.Tensor], k: int) -> tuple[float, int, int]:
    total = sum(map(torch.Tensor.numel, ts))
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= total:
        raise ValueError(f"k must be an integer in [1, {total}] (the number of weights), got {k!r}")
    if _ops.direct_call(ts):  # eager: the kernel without the dispatcher's pass over the list
        return _ops.select_native(ts, int(k))
    thr, counts = _ops.magnitude_select(ts, int(k))
    below, equal = counts.tolist()
    return float(thr), below, equal


class MagnitudeSelector:
    """The select of :func:`magnitude_threshold` over a fixed list of CUDA tensors, with no
    host sync: :meth:`select` only queues kernels on the current stream and returns the
    threshold and counts as device tensors, so it can be captured in a CUDA graph.

    The constructor (not capturable: call it before capturing) checks the tensors, makes
    the table of their addresses on the device and allocates the scratch, both through
    torch's caching allocator. The tensors' storage must stay where it is (the table
    holds their addresses); their values may change between calls. One stream at a
    time: calls share the scratch.
    """

    def __init__(self, tensors):
        ts, device = _weight_list(tensors)
        module = _ext.cuda_module() if device.type == "cuda" else _ext.cpu
        if not hasattr(module, "magnitude_select_plan"):  # the CPU module (the CUDA simulator has it)
            raise ValueError(f"MagnitudeSelector runs on CUDA tensors, got tensors on {device}; "
                             f"use magnitude_threshold on the CPU")
        table, self._nchunks, self.total, self._key64, nscratch = module.magnitude_select_plan(*_ops.list_args(ts))
        self._tensors = ts  # the table holds their addresses
        self._table = torch.empty(len(table), dtype=torch.uint8, device=device)
        self._table.copy_(torch.frombuffer(bytearray(table), dtype=torch.uint8))
        self._scratch = torch.empty(nscratch, dtype=torch.uint8, device=device)

    def select(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(threshold, counts)`` on the tensors' device: float64 0-d and int64 ``[below, equal]``,
        as :func:`magnitude_threshold` returns them; queued, not waited for."""
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= self.total:
            raise ValueError(f"k must be an integer in [1, {self.total}] (the number of weights), got {k!r}")
        device = self._scratch.device
        threshold = torch.empty((), dtype=torch.float64, device=device)
        counts = torch.empty(2, dtype=torch.int64, device=device)
        _ops.call_native("magnitude_select_device", self._scratch, self._table.data_ptr(), self._nchunks, self._key64,
                   self.total, int(k), self._scratch.data_ptr(), self._scratch.numel(), threshold.data_ptr(),
                   counts.data_ptr())
        return threshold, counts


@torch.no_grad()
def prune_smallest(tensors, k: int) -> tuple[float, int, int]:
    """Zeroes exactly the k smallest-magnitude weights across the tensors, in place.

    Ties at the threshold are pruned in list order, then element order. Returns the
    selection ``(threshold, below, equal)`` (threshold 0.0 when k is 0). On CUDA the
    zeroing is queued on the current stream (the selection itself waits for it).
    """
    ts, device = _weight_list(tensors)
    if int(k) == 0:
        return 0.0, 0, 0
    thr, below, equal = _threshold(ts, k)
    if _ops.direct_call(ts):
        _ops.prune_native(ts, int(k), thr, below, equal)
        _written(*ts)
    else:  # the registered op bumps the version counters of what it mutates itself
        _ops.magnitude_prune(ts, int(k), thr, below, equal)
    return thr, below, equal


# ---------------------------------------------------------------- per-channel activation statistics
def _stats_accumulator(t, name: str, dtype: torch.dtype, C: int, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.zeros(C, dtype=dtype, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor ({dtype}, [{C}]) or None, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (it accumulates in place), got {t.dtype}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name} must have shape [{C}] (one entry per channel of x), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; accumulators must be on x's device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def channel_stats(x, sums=None, positives=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds per-channel statistics of an activation to running accumulators, in place.

    ``x``: ``[B, C, *spatial]`` (a conv output ``[B, C, H, W]``, a linear output ``[B, C]``,
    ...), float32/float64/float16/bfloat16, on the CPU or CUDA (the current stream).
    Contiguous and channels-last layouts are read as they are; any other strides are
    copied first. ``sums`` (float64 ``[C]``) gets the sum of ``x`` over the batch and
    spatial positions of each channel added, ``positives`` (int64 ``[C]``) the count of
    ``x > 0``; both are created (zeros, on ``x``'s device) when not given. Returns
    ``(sums, positives)``. Deterministic; every element is widened exactly to float64.
    The mean activation of channel c is ``sums[c] / (B * prod(spatial))``, summed over batches.
    """
    x = as_tensor(x, "activation x")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"activation x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"activation x must be [B, C, ...] (at least 2 dims), got shape {list(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"activation x is on {x.device}; expected a cpu or cuda tensor")
    B, C = x.shape[0], x.shape[1]
    if C < 1:
        raise ValueError(f"activation x has no channels (shape {list(x.shape)})")
    sums = _stats_accumulator(sums, "sums", torch.float64, C, x.device)
    positives = _stats_accumulator(positives, "positives", torch.int64, C, x.device)
    if x.numel() == 0:  # an empty batch adds nothing
        return sums, positives
    S = x.numel() // (B * C)
    x = x.detach()
    channels_last = False
    if not x.is_contiguous():
        # [B, *spatial, C] in memory (NHWC and its 1-d / 3-d kin) is read as it is.
        moved = x.movedim(1, -1)
        if moved.is_contiguous():
            x, channels_last = moved, True
        else:
            x = x.contiguous()
    x3 = x.reshape(B, S, C) if channels_last else x.reshape(B, C, S)  # a view: x is contiguous here
    _ops.channel_stats(x3, channels_last, sums, positives)
    _written(sums, positives)
    return sums, positives
