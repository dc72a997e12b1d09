"""The keyed projection p = X . w of key spec v1 and its transpose, against the
independent float64 spec in ``_spec`` -- on every device and every CPU SIMD path."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import _spec
import nnmark
from conftest import ISAS, num_threads, on_cuda_sim, requires_cuda, use_isa
from nnmark.ops import keyed_projection_transpose

N_VALUES = [1, 7, 17, 255, 257, 1000, 4099]
T_VALUES = [1, 31, 64, 129, 256, 1000]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
ACC = {torch.float64: torch.float64, torch.float32: torch.float32,
       torch.float16: torch.float32, torch.bfloat16: torch.float32}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f64", "f32", "f16", "bf16"]


def _subkey_for(*sizes) -> tuple[int, int]:
    """A random subkey per problem size (seeded by the sizes, so the spec matrix can be cached)."""
    r = np.random.default_rng([0x5EED, *sizes])
    return tuple(int(v) for v in r.integers(0, 2**32, size=2, dtype=np.uint64))


@functools.lru_cache(maxsize=64)
def _x_int8(subkey, T, N) -> np.ndarray:
    return _spec.projection_matrix(subkey, T, N).astype(np.int8)


def _x(subkey, T, N) -> np.ndarray:
    return _x_int8(subkey, T, N).astype(np.float64)


def _skip_big_on_sim(N, T):
    if N * T > 10**6 and on_cuda_sim():
        pytest.skip("the largest size does not run on the CUDA simulator (time)")


def _random_carrier(rng, C, N, dtype, device) -> torch.Tensor:
    shape = (N,) if C is None else (C, N)
    scale = 10.0 ** rng.uniform(-3, 1)  # magnitudes vary between tests
    w = torch.from_numpy(rng.standard_normal(shape) * scale)
    return w.to(dtype).to(device)


def _fwd(w, X) -> np.ndarray:
    """p = X . w for w [N] or [C, N] (float64), as X @ w.T: the fast way round for BLAS."""
    return (X @ np.asarray(w, dtype=np.float64).T).T


def _atol(tol: float, length: int, x: torch.Tensor) -> float:
    """tol * sqrt(length) * scale, scale = the largest |input| (at least a tiny floor)."""
    scale = float(x.detach().abs().max().double().cpu())
    return tol * math.sqrt(length) * max(scale, 1e-30)


def _close(got: torch.Tensor, ref: np.ndarray, atol: float) -> None:
    got64 = got.detach().double().cpu().numpy()
    assert got64.shape == ref.shape
    err = np.abs(got64 - ref)
    assert np.all(np.isfinite(got64))
    assert err.max() <= atol, f"max error {err.max():.3e} > {atol:.3e} at {np.unravel_index(err.argmax(), err.shape)}"


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("N", N_VALUES)
def test_forward_matches_spec(backend, N, T, dtype, rng):
    _skip_big_on_sim(N, T)
    sk = _subkey_for(N, T)
    X = _x(sk, T, N)
    for C in (None, 1, 3):  # None: a single [N] carrier
        w = _random_carrier(rng, C, N, dtype, backend)
        p = nnmark.keyed_projection(w, sk, T)
        assert p.device.type == backend
        assert p.dtype == ACC[dtype]
        assert p.shape == ((T,) if C is None else (C, T))
        # The reference sees exactly the values the op saw (rounded for f16/bf16).
        ref = _fwd(w.double().cpu().numpy(), X)
        _close(p, ref, _atol(TOL[dtype], N, w))


# ---------------------------------------------------------------------------- transpose
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("N", N_VALUES)
def test_transpose_matches_spec(backend, N, T, dtype, rng):
    _skip_big_on_sim(N, T)
    sk = _subkey_for(N, T)
    X = _x(sk, T, N)
    for C in (None, 1, 3):
        gp = _random_carrier(rng, C, T, dtype, backend)
        g = keyed_projection_transpose(gp, sk, N)
        assert g.device.type == backend
        assert g.dtype == dtype
        assert g.shape == ((N,) if C is None else (C, N))
        _close(g, gp.double().cpu().numpy() @ X, _atol(TOL[dtype], T, gp))


# ---------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("N,T", [(1, 1), (17, 129), (257, 64), (1000, 31), (4099, 256)])
def test_backward_is_transpose(backend, N, T, dtype, rng):
    _skip_big_on_sim(N, T)
    sk = _subkey_for(N, T)
    X = _x(sk, T, N)
    for C in (None, 3):
        w = _random_carrier(rng, C, N, dtype, backend).requires_grad_(True)
        p = nnmark.keyed_projection(w, sk, T)
        g = torch.from_numpy(rng.standard_normal(p.shape)).to(p.dtype).to(backend)
        p.backward(g)
        assert w.grad is not None and w.grad.dtype == dtype and w.grad.shape == w.shape
        ref = g.double().cpu().numpy() @ X
        if dtype in (torch.float16, torch.bfloat16):
            # The gradient is computed in float32 then rounded to the carrier's dtype.
            eps = torch.finfo(dtype).eps
            atol = _atol(1e-4, T, g) + eps * np.abs(ref).max()
        else:
            atol = _atol(TOL[dtype], T, g)
        _close(w.grad, ref, atol)


def test_gradcheck_float64():
    sk = _subkey_for(5, 3)
    for shape in [(5,), (2, 5)]:
        w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: nnmark.keyed_projection(v, sk, 3), (w,))
        gp = torch.randn(*shape[:-1], 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: keyed_projection_transpose(v, sk, 5), (gp,))


def test_gradgradcheck_float64():
    sk = _subkey_for(6, 130)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: nnmark.keyed_projection(v, sk, 130), (w,))
    gp = torch.randn(2, 130, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: keyed_projection_transpose(v, sk, 6), (gp,))


def test_second_order_through_a_nonlinear_loss(rng):
    """d/dw of ||grad_w L||^2 with L = sum(tanh(Xw)) needs the backward to be differentiable."""
    sk = _subkey_for(9, 40)
    X = torch.from_numpy(_x(sk, 40, 9))
    w = torch.from_numpy(rng.standard_normal(9) * 0.1).requires_grad_(True)
    (g,) = torch.autograd.grad(torch.tanh(nnmark.keyed_projection(w, sk, 40)).sum(), w, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), w)
    w2 = w.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(torch.tanh(X @ w2).sum(), w2, create_graph=True)
    (h2,) = torch.autograd.grad((g2 * g2).sum(), w2)
    np.testing.assert_allclose(g.detach().numpy(), g2.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(h.numpy(), h2.numpy(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- subkeys
@pytest.mark.parametrize("carrier", ["features.3.weight", "fc.weight", "блок.0.вес", "layer\u00e9.w"])
def test_subkey_matches_spec(carrier, rng):
    secret = rng.bytes(32)
    key = nnmark.WhiteBoxKey(secret, carrier, rng.integers(0, 2, 64))
    assert key.subkey() == _spec.subkey(secret, carrier)
    # different carrier or secret -> a different subkey
    assert key.subkey() != _spec.subkey(secret, carrier + "x")
    other = bytes([secret[0] ^ 1]) + secret[1:]
    assert key.subkey() != _spec.subkey(other, carrier)


def test_key_projection_end_to_end_matches_spec(rng):
    """secret -> subkey -> X -> p for a conv weight with filter_mean, all from the spec."""
    secret = rng.bytes(32)
    key = nnmark.WhiteBoxKey(secret, "features.3.weight", rng.integers(0, 2, 200), "filter_mean")
    weight = torch.from_numpy(rng.standard_normal((8, 4, 3, 3)))
    v = weight.numpy().reshape(8, -1).mean(axis=0)  # [in*kh*kw] = 36
    ref = _spec.forward(v, _spec.subkey(secret, "features.3.weight"), 200)
    _close(key.project(weight), ref, _atol(1e-9, 36, torch.from_numpy(v)))


# ---------------------------------------------------------------------------- large N, threads
LARGE_N, LARGE_T = 300_000, 256


@functools.lru_cache(maxsize=1)
def _large_case():
    r = np.random.default_rng(20240601)
    sk = tuple(int(v) for v in r.integers(0, 2**32, size=2, dtype=np.uint64))
    w = r.standard_normal((2, LARGE_N))
    gp = r.standard_normal((2, LARGE_T))
    # Reference in chunks (X is never held whole): p = X w and g = X^T gp.
    w32 = w.astype(np.float32).astype(np.float64)  # what a float32 carrier holds
    p = np.zeros((2, LARGE_T))
    p32 = np.zeros((2, LARGE_T))
    g = np.empty((2, LARGE_N))
    chunk = 16384
    for c0 in range(0, LARGE_N, chunk):
        n = min(chunk, LARGE_N - c0)
        Xc = _spec.projection_block(sk, LARGE_T, c0, n)
        p += _fwd(w[:, c0:c0 + n], Xc)
        p32 += _fwd(w32[:, c0:c0 + n], Xc)
        g[:, c0:c0 + n] = gp @ Xc
    return sk, w, gp, p, g, p32


def test_spec_chunked_forward_matches_whole_matrix(rng):
    sk = _subkey_for(3000, 300)
    w = rng.standard_normal((2, 3000))
    np.testing.assert_allclose(_spec.forward(w, sk, 300, chunk=777), _fwd(w, _x(sk, 300, 3000)), rtol=0, atol=1e-9)
    gp = rng.standard_normal(300)
    np.testing.assert_allclose(_spec.transpose(gp, sk, 3000, chunk=777), gp @ _x(sk, 300, 3000), rtol=0, atol=1e-9)


@pytest.mark.parametrize("isa_name", ISAS)
def test_large_n_two_threads(isa_name):
    sk, w, gp, p_ref, g_ref, p32_ref = _large_case()
    with use_isa(isa_name), num_threads(2):
        assert nnmark.get_num_threads() == 2
        wt = torch.from_numpy(w)
        p = nnmark.keyed_projection(wt, sk, LARGE_T)
        p1 = nnmark.keyed_projection(wt[1], sk, LARGE_T)
        g = keyed_projection_transpose(torch.from_numpy(gp), sk, LARGE_N)
        p32 = nnmark.keyed_projection(wt.float(), sk, LARGE_T)
        g32 = keyed_projection_transpose(torch.from_numpy(gp).float(), sk, LARGE_N)
    _close(p, p_ref, _atol(1e-9, LARGE_N, wt))
    _close(p1, p_ref[1], _atol(1e-9, LARGE_N, wt))
    _close(g, g_ref, _atol(1e-9, LARGE_T, torch.from_numpy(gp)))
    _close(p32, p32_ref, _atol(1e-4, LARGE_N, wt))
    _close(g32, g_ref, _atol(1e-4, LARGE_T, torch.from_numpy(gp)))


def test_thread_count_does_not_change_results(rng):
    sk = _subkey_for(100_000, 200)
    w = torch.from_numpy(rng.standard_normal((2, 100_000)))
    gp = torch.from_numpy(rng.standard_normal((2, 200)))
    out = {}
    for n in (1, 2, 3, 7):
        with num_threads(n):
            out[n] = (nnmark.keyed_projection(w, sk, 200), keyed_projection_transpose(gp, sk, 100_000))
    for n in (2, 3, 7):
        torch.testing.assert_close(out[n][0], out[1][0], rtol=0, atol=1e-9 * math.sqrt(100_000) * 5)
        torch.testing.assert_close(out[n][1], out[1][1], rtol=0, atol=1e-9 * math.sqrt(200) * 5)


def test_isas_agree_on_bits(rng):
    """Every SIMD path gives the same signs on float64 carriers (exact) and float32 (integers: exact)."""
    sk = _subkey_for(5000, 300)
    w64 = torch.from_numpy(rng.standard_normal((3, 5000)))
    w32 = torch.from_numpy(rng.integers(-8, 9, size=(3, 5000)).astype(np.float32))
    exact = _fwd(w32.double().numpy(), _x(sk, 300, 5000))
    results = {}
    for name in ISAS:
        with use_isa(name):
            p32 = nnmark.keyed_projection(w32, sk, 300)
            results[name] = nnmark.keyed_projection(w64, sk, 300) > 0
        # small integers: every partial sum is exact in float32
        np.testing.assert_array_equal(p32.double().numpy(), exact)
    for name in ISAS:
        assert torch.equal(results[name], results[ISAS[0]])


# ---------------------------------------------------------------------------- CPU / CUDA parity
# (37, 6300): more rows than one launch of the float64 backward holds in shared memory (6144)
@pytest.mark.parametrize("N,T", [(1, 1), (255, 129), (4099, 256), (37, 6300), (70_000, 1000)])
def test_cpu_cuda_parity(gpu, N, T, rng):
    if gpu.name == "cudasim" and N * T > 10**7:
        pytest.skip("the largest size does not run on the simulator (time)")
    sk = _subkey_for(N, T)
    w = torch.from_numpy(rng.standard_normal((3, N)))
    wi = torch.from_numpy(rng.integers(-8, 9, size=(3, N)).astype(np.float32))
    w32 = w.float()
    gp = torch.from_numpy(rng.standard_normal((3, T)))
    p_cpu = nnmark.keyed_projection(w, sk, T)
    with gpu.run():
        p_gpu = nnmark.keyed_projection(gpu.put(w), sk, T)
        pi_gpu = nnmark.keyed_projection(gpu.put(wi), sk, T).cpu()
        p32_gpu = nnmark.keyed_projection(gpu.put(w32), sk, T).cpu()
        g_gpu = keyed_projection_transpose(gpu.put(gp), sk, N).cpu()
    assert p_gpu.is_cuda == (gpu.name == "cuda")
    assert torch.equal((p_gpu > 0).cpu(), p_cpu > 0)
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=0, atol=_atol(1e-9, N, w))
    # float32, integer-valued carriers: sums are exact, so values and bits match exactly
    assert torch.equal(pi_gpu, nnmark.keyed_projection(wi, sk, T))
    # float32, random carriers: close
    torch.testing.assert_close(p32_gpu, nnmark.keyed_projection(w32, sk, T), rtol=0, atol=_atol(1e-4, N, w32))
    torch.testing.assert_close(g_gpu, keyed_projection_transpose(gp, sk, N), rtol=0, atol=_atol(1e-9, T, gp))


@pytest.mark.parametrize("col0", [1, 4097, 2**32 - 100])
def test_cpu_cuda_parity_with_col0(gpu, col0, rng):
    """A shard (col0 > 0, the last crossing 2^32 into the counter's high word) draws X's
    columns col0..col0+N-1 on the GPU as on the CPU and as the spec: forward and backward."""
    N, T = 300, 200
    sk = _subkey_for(N, T, col0)
    X = _spec.projection_block(sk, T, col0, N)  # [T, N]
    w = torch.from_numpy(rng.standard_normal((2, N)))
    gp = torch.from_numpy(rng.standard_normal((2, T)))
    wi = torch.from_numpy(rng.integers(-8, 9, size=(2, N)).astype(np.float32))
    gpi = torch.from_numpy(rng.integers(-8, 9, size=(2, T)).astype(np.float32))

    def project(put, w, gp):
        wd = put(w).requires_grad_(True)
        p = nnmark.keyed_projection(wd, sk, T, col0=col0)
        p.backward(put(gp))
        return p.detach().cpu(), wd.grad.cpu()

    with gpu.run():
        p64, g64 = project(gpu.put, w, gp)
        p32, g32 = project(gpu.put, wi, gpi)
    _close(p64, _fwd(w.numpy(), X), _atol(1e-9, N, w))
    _close(g64, gp.numpy() @ X, _atol(1e-9, T, gp))
    # integer-valued float32: the sums are exact, so the GPU side equals the CPU and the spec bit for bit
    p_cpu, g_cpu = project(lambda t: t.clone(), wi, gpi)
    assert torch.equal(p32, p_cpu) and torch.equal(g32, g_cpu)
    np.testing.assert_array_equal(p32.double().numpy(), _fwd(wi.numpy(), X))
    np.testing.assert_array_equal(g32.double().numpy(), gpi.double().numpy() @ X)


@requires_cuda
def test_cuda_autograd_matches_cpu(rng):
    sk = _subkey_for(333, 200)
    w = torch.from_numpy(rng.standard_normal((2, 333))).float()
    g = torch.from_numpy(rng.standard_normal((2, 200))).float()
    grads = []
    for dev in ("cpu", "cuda"):
        wd = w.to(dev).requires_grad_(True)
        nnmark.keyed_projection(wd, sk, 200).backward(g.to(dev))
        grads.append(wd.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=_atol(1e-4, 200, g))


# ---------------------------------------------------------------------------- inputs and errors
def test_numpy_input(rng):
    sk = _subkey_for(300, 70)
    X = _x(sk, 70, 300)
    for dtype in (np.float64, np.float32):
        w = rng.standard_normal((2, 300)).astype(dtype)
        p = nnmark.keyed_projection(w, sk, 70)
        assert isinstance(p, torch.Tensor)
        _close(p, _fwd(w, X), _atol(TOL[torch.from_numpy(w).dtype], 300, torch.from_numpy(w)))
        gp = rng.standard_normal(70).astype(dtype)
        g = keyed_projection_transpose(gp, sk, 300)
        _close(g, gp.astype(np.float64) @ X, _atol(TOL[torch.from_numpy(gp).dtype], 70, torch.from_numpy(gp)))


def test_non_contiguous_input(backend, rng):
    sk = _subkey_for(513, 130)
    X = _x(sk, 130, 513)
    base = torch.from_numpy(rng.standard_normal((513, 3))).to(backend)
    w = base.t()  # [3, 513], not contiguous
    assert not w.is_contiguous()
    _close(nnmark.keyed_projection(w, sk, 130), _fwd(w.cpu().numpy(), X), _atol(1e-9, 513, w))
    strided = torch.from_numpy(rng.standard_normal(1026)).to(backend)[::2]
    _close(nnmark.keyed_projection(strided, sk, 130), _fwd(strided.cpu().numpy(), X), _atol(1e-9, 513, strided))


def test_subkey_words_are_used(rng):
    """Changing either subkey word changes the projection (and the spec agrees)."""
    w = torch.from_numpy(rng.standard_normal(200))
    base = nnmark.keyed_projection(w, (1, 2), 64)
    for other in [(2, 2), (1, 3), (2**32 - 1, 2), (1, 2**32 - 1)]:
        p = nnmark.keyed_projection(w, other, 64)
        assert not torch.allclose(p, base)
        _close(p, _spec.forward(w.numpy(), other, 64), _atol(1e-9, 200, w))


@pytest.mark.parametrize(
    "w,exc,match",
    [
        (torch.zeros(2, 3, 4), ValueError, r"must be \[N\] or \[C, N\].*\[2, 3, 4\]"),
        (torch.tensor(1.0), ValueError, r"must be \[N\] or \[C, N\]"),
        (torch.zeros(0), ValueError, r"empty"),
        (torch.zeros(3, 0), ValueError, r"empty"),
        (torch.zeros(10, dtype=torch.int64), TypeError, r"float32, float64, float16 or bfloat16.*int64"),
        (torch.zeros(10, dtype=torch.int32), TypeError, r"int32"),
        (torch.zeros(10, dtype=torch.complex64), TypeError, r"complex64"),
        ([1.0, 2.0], TypeError, r"torch tensor, numpy array or cupy array.*list"),
    ],
    ids=["3d", "0d", "empty", "empty-rows", "int64", "int32", "complex", "list"],
)
def test_forward_bad_carrier(w, exc, match):
    with pytest.raises(exc, match=match):
        nnmark.keyed_projection(w, (1, 2), 8)


@pytest.mark.parametrize(
    "subkey,match",
    [
        ((1, 2, 3), r"subkey must be two uint32 words"),
        ((1,), r"subkey must be two uint32 words"),
        (None, r"subkey must be two uint32 words"),
        ("ab", r"subkey must be two uint32 words"),
        ((-1, 0), r"subkey words must be in \[0, 2\^32\)"),
        ((0, 2**32), r"subkey words must be in \[0, 2\^32\)"),
    ],
)
def test_bad_subkey(subkey, match):
    with pytest.raises(ValueError, match=match):
        nnmark.keyed_projection(torch.ones(4), subkey, 8)
    with pytest.raises(ValueError, match=match):
        keyed_projection_transpose(torch.ones(4), subkey, 8)


@pytest.mark.parametrize("bits", [0, -1, -128])
def test_bits_below_one(bits):
    with pytest.raises(ValueError, match=r"bits must be >= 1"):
        nnmark.keyed_projection(torch.ones(4), (1, 2), bits)


@pytest.mark.parametrize(
    "gp,n,exc,match",
    [
        (torch.ones(4, dtype=torch.int64), 5, TypeError, r"gp must be float32 or float64.*int64"),
        (torch.ones(4, dtype=torch.float16), 5, TypeError, r"gp must be float32 or float64.*float16"),
        (torch.ones(2, 2, 2), 5, ValueError, r"gp must be a non-empty \[T\] or \[C, T\]"),
        (torch.ones(0), 5, ValueError, r"gp must be a non-empty"),
        (torch.ones(4), 0, ValueError, r"n must be >= 1"),
        (torch.ones(4), -3, ValueError, r"n must be >= 1"),
    ],
)
def test_transpose_errors(gp, n, exc, match):
    with pytest.raises(exc, match=match):
        keyed_projection_transpose(gp, (1, 2), n)


def test_cuda_module_matches_build_info():
    """A build without CUDA imports fine and fails at the call; a CUDA build hands out its module."""
    from nnmark import _ext

    if nnmark.build_info()["cuda"]:
        assert _ext.cuda_built()
        assert hasattr(_ext.cuda_module(), "projection_forward")
    else:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _ext.cuda_module()


# ---------------------------------------------------------------------------- a build without CUDA
_CPU_ONLY_SCRIPT = r"""
import json, torch, nnmark
from nnmark import _ext
info = nnmark.build_info()
try:
    _ext.cuda_module()
    raised = ""
except RuntimeError as exc:
    raised = str(exc)
p = nnmark.keyed_projection(torch.ones(300, dtype=torch.float64), (1, 2), 5)
print(json.dumps({"info": info, "raised": raised, "p": p.tolist()}))
"""


@pytest.fixture(scope="module")
def cpu_only_build(tmp_path_factory):
    """The installed package copied without its _C_cuda module (as a NNMARK_CUDA=OFF build ships),
    imported in a fresh interpreter."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(nnmark.__file__)
    root = tmp_path_factory.mktemp("cpu_only")
    shutil.copytree(src, root / "nnmark", ignore=shutil.ignore_patterns("_C_cuda*", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", _CPU_ONLY_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_only_build_imports_and_fails_at_the_call(cpu_only_build):
    assert cpu_only_build["info"]["cuda"] is False and cpu_only_build["info"]["cpu"] is True
    assert "built without CUDA" in cpu_only_build["raised"]
    np.testing.assert_allclose(cpu_only_build["p"], _spec.forward(np.ones(300), (1, 2), 5), rtol=0, atol=1e-9)


def test_cpu_only_build_reports_no_import_error(cpu_only_build):
    """A module that was simply not built is no import *error*: _ext.build_info() means to
    leave 'cuda_import_error' out then (it filters "No module named" messages)."""
    info = cpu_only_build["info"]
    assert "cuda_import_error" not in info, info.get("cuda_import_error")
