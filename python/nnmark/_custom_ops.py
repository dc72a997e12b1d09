"""The native kernels as torch custom ops (``torch.ops.nnmark.*``), so that
``torch.compile``, ``torch.export``, FakeTensor and the meta device see them as ops
with known output shapes and gradients, not as opaque Python.

Nothing here links libtorch: each op's kernel is the pybind11 function of
``_C_cpu`` / ``_C_cuda`` called with raw addresses, exactly as before; torch only
learns the op's schema, a fake (meta) implementation that makes empty outputs of
the right shape, and its autograd formula. One registration per op covers CPU and
CUDA: :func:`_call` picks the module from the device of the first tensor.

The ops take checked, contiguous torch tensors; :mod:`nnmark.ops` validates user
input (numpy and cupy arrays become tensors there) and calls these.

Shapes: ``w`` ``[C, N]``, ``p`` ``[C, T]``. ``col0`` is the global index of column 0
of ``w`` (a shard of a longer carrier draws X's columns col0..col0+N-1).
"""
from __future__ import annotations

import operator

import torch
from torch.library import custom_op, register_autograd, register_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _ext
from ._arrays import DTYPE_CODES


# ---------------------------------------------------------------- the registration table
def call_native(name: str, t: torch.Tensor, *args) -> object:
    """``_C_cpu.<name>(*args)`` for a CPU tensor ``t``, ``_C_cuda.<name>(*args, device,
    stream)`` for a CUDA one: the CUDA twins take the same arguments plus where to run."""
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return getattr(_ext.cuda_module(), name)(*args, index, torch.cuda.current_stream(t.device).cuda_stream)
    if t.device.type != "cpu":
        raise ValueError(f"nnmark's native ops run on cpu or cuda tensors, got one on {t.device}")
    return getattr(_ext.cpu, name)(*args)


_dispatch_mode = _get_current_dispatch_mode
_functorch = torch._C._functorch.peek_interpreter_stack


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- keyed projection (spec v1)
def project(w: torch.Tensor, bits: int, k0: int, k1: int, col0: int = 0) -> torch.Tensor:
    """``p[C, bits] = X[:, col0:col0+N] . w[C, N]`` (float32, float64 for float64 ``w``)."""
    w = w.contiguous()
    C, N = w.shape
    p = torch.empty((C, bits), dtype=_acc(w.dtype), device=w.device)
    if w.device.type == "cpu":  # the common small-carrier case: keep the Python path short
        _ext.cpu.projection_forward(w.data_ptr(), DTYPE_CODES[w.dtype], C, N, bits, k0, k1, p.data_ptr(), col0)
    else:
        call_native("projection_forward", w, w.data_ptr(), DTYPE_CODES[w.dtype], C, N, bits, k0, k1, p.data_ptr(), col0)
    return p


keyed_projection = custom_op("nnmark::keyed_projection", project, mutates_args=())


@register_fake("nnmark::keyed_projection")
def _(w, bits, k0, k1, col0=0):
    return w.new_empty((w.shape[0], bits), dtype=_acc(w.dtype))


def _transpose(gp: torch.Tensor, n: int, k0: int, k1: int, col0: int = 0) -> torch.Tensor:
    """``g[C, n] = X[:, col0:col0+n]^T . gp[C, T]`` (gp float32 or float64; g the same dtype)."""
    C, T = gp.shape
    gp = gp.contiguous()
    g = torch.empty((C, n), dtype=gp.dtype, device=gp.device)
    args = (gp.data_ptr(), DTYPE_CODES[gp.dtype], C, n, T, k0, k1, g.data_ptr(), col0)
    if gp.device.type == "cpu":
        _ext.cpu.projection_backward(*args)
    else:
        call_native("projection_backward", gp, *args)
    return g


keyed_projection_t = custom_op("nnmark::keyed_projection_t", _transpose, mutates_args=())


@register_fake("nnmark::keyed_projection_t")
def _(gp, n, k0, k1, col0=0):
    return gp.new_empty((gp.shape[0], n))


def _save_projection(ctx, inputs, output):
    w, bits, k0, k1, col0 = inputs
    ctx.meta = (w.shape[1], k0, k1, col0, w.dtype)


def _projection_backward(ctx, gp):
    n, k0, k1, col0, w_dtype = ctx.meta
    if gp.dtype not in (torch.float32, torch.float64):
        gp = gp.float()
    return keyed_projection_t(gp, n, k0, k1, col0).to(w_dtype), None, None, None, None


def _save_transpose(ctx, inputs, output):
    gp, n, k0, k1, col0 = inputs
    ctx.meta = (gp.shape[1], k0, k1, col0, gp.dtype)


def _transpose_backward(ctx, ggw):
    # The backward of X^T.gp is X.(grad): create_graph and gradgradcheck work.
    bits, k0, k1, col0, gp_dtype = ctx.meta
    return keyed_projection(ggw.to(gp_dtype), bits, k0, k1, col0).to(gp_dtype), None, None, None, None


register_autograd("nnmark::keyed_projection", _projection_backward, setup_context=_save_projection)
register_autograd("nnmark::keyed_projection_t", _transpose_backward, setup_context=_save_transpose)


class EagerProjection(torch.autograd.Function):
    """The op's own kernel and backward formula as a plain autograd Function: eager training
    steps take it (see :func:`direct_grad`), skipping the two dispatcher round trips of
    the registered autograd (about 50 us per call at N=576, more than the projection)."""

    @staticmethod
    def forward(ctx, w, bits, k0, k1, col0):
        _save_projection(ctx, (w, bits, k0, k1, col0), None)
        return project(w.detach(), bits, k0, k1, col0)

    @staticmethod
    def backward(ctx, gp):
        n, k0, k1, col0, w_dtype = ctx.meta
        if torch.is_grad_enabled():  # create_graph: the differentiable op
            return _projection_backward(ctx, gp)
        if gp.dtype not in (torch.float32, torch.float64):
            gp = gp.float()
        return _transpose(gp, n, k0, k1, col0).to(w_dtype), None, None, None, None


def direct_grad(t: torch.Tensor) -> bool:
    """Whether a differentiable call on ``t`` may take :class:`EagerProjection`: a plain eager
    tensor outside any compiler, tracer, dispatch mode or functorch transform."""
    return (type(t) is torch.Tensor and t.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()
            and _dispatch_mode() is None
            and _functorch() is None)


@custom_op("nnmark::keyed_projection_many_keys", mutates_args=(), device_types="cpu")
def keyed_projection_many_keys(w: torch.Tensor, subkeys: torch.Tensor, bits: int) -> torch.Tensor:
    """``p[K, bits]`` float64: one float64 carrier ``w[N]`` under subkeys ``[K, 2]`` (int64 holding uint32)."""
    sk = subkeys.to(torch.int64).numpy().astype("uint32")  # the kernel reads uint32 pairs
    K, N = sk.shape[0], w.shape[0]
    w = w.contiguous()
    p = torch.empty((K, bits), dtype=torch.float64)
    _ext.cpu.projection_many_keys(w.data_ptr(), sk.ctypes.data, K, N, bits, p.data_ptr())
    return p


@register_fake("nnmark::keyed_projection_many_keys")
def _(w, subkeys, bits):
    return w.new_empty((subkeys.shape[0], bits), dtype=torch.float64)


# ---------------------------------------------------------------- dense projection (imported keys)
@custom_op("nnmark::dense_projection", mutates_args=())
def dense_projection(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p[C, T] = x[T, N] . w[C, N]`` in x's dtype (float32, or float64 with float64 ``w``)."""
    C, N = w.shape
    T = x.shape[0]
    w, x = w.contiguous(), x.contiguous()
    p = torch.empty((C, T), dtype=x.dtype, device=w.device)
    call_native("dense_forward", w, x.data_ptr(), DTYPE_CODES[x.dtype], w.data_ptr(), DTYPE_CODES[w.dtype], C, N, T,
          p.data_ptr())
    return p


@register_fake("nnmark::dense_projection")
def _(w, x):
    return w.new_empty((w.shape[0], x.shape[0]), dtype=x.dtype)


@custom_op("nnmark::dense_projection_t", mutates_args=())
def dense_projection_t(x: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """``g[C, N] = x[T, N]^T . gp[C, T]`` in x's dtype (gp of x's dtype)."""
    C, T = gp.shape
    N = x.shape[1]
    x, gp = x.contiguous(), gp.contiguous()
    g = torch.empty((C, N), dtype=x.dtype, device=gp.device)
    call_native("dense_backward", gp, x.data_ptr(), DTYPE_CODES[x.dtype], gp.data_ptr(), C, N, T, g.data_ptr())
    return g


@register_fake("nnmark::dense_projection_t")
def _(x, gp):
    return gp.new_empty((gp.shape[0], x.shape[1]), dtype=x.dtype)


def _save_dense(ctx, inputs, output):
    w, x = inputs
    ctx.save_for_backward(x)
    ctx.w_dtype = w.dtype


def _dense_backward(ctx, gp):
    (x,) = ctx.saved_tensors
    return dense_projection_t(x, gp.to(x.dtype)).to(ctx.w_dtype), None  # X is a constant of the key


def _save_dense_t(ctx, inputs, output):
    x, gp = inputs
    ctx.save_for_backward(x)
    ctx.gp_dtype = gp.dtype


def _dense_t_backward(ctx, ggw):
    (x,) = ctx.saved_tensors
    return None, dense_projection(ggw.to(x.dtype), x).to(ctx.gp_dtype)


register_autograd("nnmark::dense_projection", _dense_backward, setup_context=_save_dense)
register_autograd("nnmark::dense_projection_t", _dense_t_backward, setup_context=_save_dense_t)


# ---------------------------------------------------------------- trigger-set verification
@custom_op("nnmark::trigger_verify", mutates_args=())
def trigger_verify(logits: torch.Tensor, labels: torch.Tensor,
                   null_rate: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hits int64 [K], margin float64 [K], p_value float64 [K])`` on logits' device, for
    logits ``[K, B, C]`` and int64 labels ``[B]`` on the same device."""
    K, B, C = logits.shape
    x, y = logits.contiguous(), labels.contiguous()
    h = torch.empty(K, dtype=torch.int64, device=x.device)
    m = torch.empty(K, dtype=torch.float64, device=x.device)
    p = torch.empty(K, dtype=torch.float64, device=x.device)
    call_native("trigger_verify", x, x.data_ptr(), DTYPE_CODES[x.dtype], y.data_ptr(), K, B, C, null_rate, h.data_ptr(),
          m.data_ptr(), p.data_ptr())
    return h, m, p


@register_fake("nnmark::trigger_verify")
def _(logits, labels, null_rate):
    K = logits.shape[0]
    return (logits.new_empty(K, dtype=torch.int64), logits.new_empty(K, dtype=torch.float64),
            logits.new_empty(K, dtype=torch.float64))


# ---------------------------------------------------------------- magnitude selection (pruning)
_DTYPE_OF = operator.attrgetter("dtype")


def list_args(ts: list[torch.Tensor]) -> tuple[list[int], list[int], list[int]]:
    return (list(map(torch.Tensor.data_ptr, ts)), list(map(torch.Tensor.numel, ts)),
            list(map(DTYPE_CODES.__getitem__, map(_DTYPE_OF, ts))))


_PLAIN = {torch.Tensor, torch.nn.Parameter}


def direct_call(ts: list[torch.Tensor]) -> bool:
    """Whether an op on a list of plain eager tensors (or parameters) may call the kernel
    directly: outside any compiler, tracer, dispatch mode or tensor subclass, where the
    registered op only adds the dispatcher's pass over the list (~0.5 ms for 1,600 tensors)."""
    return (not torch.compiler.is_compiling() and _dispatch_mode() is None and _functorch() is None
            and set(map(type, ts)) <= _PLAIN)


def select_native(tensors: list[torch.Tensor], k: int) -> tuple[float, int, int]:
    """The kernel of ``magnitude_select``: ``(threshold, below, equal)`` as Python numbers."""
    thr, below, equal = call_native("magnitude_select", tensors[0], *list_args(tensors), k)
    return thr, below, equal


def prune_native(tensors: list[torch.Tensor], k: int, threshold: float, below: int, equal: int) -> None:
    """The kernel of ``magnitude_prune`` (the caller bumps the version counters)."""
    call_native("magnitude_prune", tensors[0], *list_args(tensors), k, threshold, below, equal)


@custom_op("nnmark::magnitude_select", mutates_args=())
def magnitude_select(tensors: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th smallest |w| over contiguous tensors: ``(threshold float64 0-d, [below, equal] int64)``, on the CPU."""
    thr, below, equal = select_native(tensors, k)
    return torch.tensor(thr, dtype=torch.float64), torch.tensor([below, equal], dtype=torch.int64)


@register_fake("nnmark::magnitude_select")
def _(tensors, k):
    return (torch.empty((), dtype=torch.float64, device="cpu"), torch.empty(2, dtype=torch.int64, device="cpu"))


@custom_op("nnmark::magnitude_prune", mutates_args=("tensors",))
def magnitude_prune(tensors: list[torch.Tensor], k: int, threshold: float, below: int, equal: int) -> None:
    """Zeroes the k smallest-magnitude weights in place, given their selection."""
    prune_native(tensors, k, threshold, below, equal)


@register_fake("nnmark::magnitude_prune")
def _(tensors, k, threshold, below, equal):
    return None


# ---------------------------------------------------------------- per-channel activation statistics
@custom_op("nnmark::channel_stats", mutates_args=("sums", "positives"))
def channel_stats(x: torch.Tensor, channels_last: bool, sums: torch.Tensor, positives: torch.Tensor) -> None:
    """Adds per-channel sums (float64) and counts of x > 0 (int64) of ``x`` ``[B, C, S]``
    (``[B, S, C]`` when ``channels_last``), both contiguous, into ``sums`` and ``positives`` ``[C]``."""
    B = x.shape[0]
    C = x.shape[2] if channels_last else x.shape[1]
    S = x.shape[1] if channels_last else x.shape[2]
    call_native("channel_stats", x, x.data_ptr(), DTYPE_CODES[x.dtype], B, C, S, channels_last, sums.data_ptr(),
          positives.data_ptr())


@register_fake("nnmark::channel_stats")
def _(x, channels_last, sums, positives):
    return None
