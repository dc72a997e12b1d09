"""The dense projection p = X . w (explicit matrix, for keys made by other tools)
and DenseKey, including Uchida et al.'s Keras element order."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nnmark
from conftest import requires_cuda

SIZES = [(1, 1), (7, 3), (576, 256), (1000, 31), (4099, 64)]  # (N, T)


def _atol(tol, n, x, w) -> float:
    sx = float(torch.as_tensor(x).abs().max())
    sw = float(torch.as_tensor(w).detach().abs().max().double().cpu())
    return tol * math.sqrt(n) * max(sx * sw, 1e-30)


def _close(got, ref, atol):
    got = got.detach().double().cpu().numpy()
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= atol, f"max error {err:.3e} > {atol:.3e}"


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float32], ids=["X64", "X32"])
@pytest.mark.parametrize("w_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["w64", "w32", "w16", "wbf16"])
@pytest.mark.parametrize("N,T", SIZES)
def test_dense_forward_and_gradient(device, N, T, x_dtype, w_dtype, rng):
    X = rng.standard_normal((T, N))
    xt = torch.from_numpy(X).to(x_dtype).to(device)
    X_used = xt.double().cpu().numpy()  # the values the op saw
    out_dtype = torch.float64 if torch.float64 in (x_dtype, w_dtype) else torch.float32
    tol = 1e-9 if out_dtype == torch.float64 else 1e-4
    for C in (None, 3):
        shape = (N,) if C is None else (C, N)
        w = torch.from_numpy(rng.standard_normal(shape)).to(w_dtype).to(device).requires_grad_(True)
        p = nnmark.dense_projection(w, xt)
        assert p.dtype == out_dtype and p.device.type == device
        assert p.shape == ((T,) if C is None else (C, T))
        w_used = w.detach().double().cpu().numpy()
        _close(p, (X_used @ w_used.T).T, _atol(tol, N, X_used, w))
        g = torch.from_numpy(rng.standard_normal(p.shape)).to(p.dtype).to(device)
        p.backward(g)
        assert w.grad.dtype == w_dtype and w.grad.shape == w.shape
        ref = g.double().cpu().numpy() @ X_used
        atol = _atol(tol, T, X_used, g)
        if w_dtype != torch.float64:  # the gradient comes back rounded to the carrier's dtype
            atol += torch.finfo(w_dtype).eps * np.abs(ref).max()
        _close(w.grad, ref, atol)


def test_dense_gradcheck():
    X = torch.randn(4, 6, dtype=torch.float64)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: nnmark.dense_projection(v, X), (w,))


def test_dense_numpy_inputs(rng):
    X = rng.standard_normal((20, 50))
    w = rng.standard_normal(50)
    p = nnmark.dense_projection(w, X)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), X @ w, rtol=1e-12, atol=1e-12)


def test_dense_multithreaded(rng):
    """Large enough that rows and columns are split over threads."""
    X = rng.standard_normal((600, 3000))
    w = torch.from_numpy(rng.standard_normal((2, 3000))).requires_grad_(True)
    before = nnmark.get_num_threads()
    nnmark.set_num_threads(3)
    try:
        p = nnmark.dense_projection(w, X)
        g = torch.from_numpy(rng.standard_normal((2, 600)))
        p.backward(g)
    finally:
        nnmark.set_num_threads(before)
    np.testing.assert_allclose(p.detach().numpy(), w.detach().numpy() @ X.T, rtol=0, atol=1e-9)
    np.testing.assert_allclose(w.grad.numpy(), g.numpy() @ X, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "w,x,exc,match",
    [
        (torch.ones(5), torch.ones(3, 4), ValueError, r"N=4 columns but the carrier has length 5"),
        (torch.ones(2, 5), torch.ones(3, 6), ValueError, r"N=6 columns but the carrier has length 5"),
        (torch.ones(5), torch.ones(5), ValueError, r"projection matrix must be a non-empty \[T, N\].*\[5\]"),
        (torch.ones(5), torch.ones(2, 3, 5), ValueError, r"projection matrix must be a non-empty \[T, N\]"),
        (torch.ones(5), torch.ones(0, 5), ValueError, r"projection matrix must be a non-empty \[T, N\]"),
        (torch.ones(5), torch.ones(3, 5, dtype=torch.int64), TypeError, r"projection matrix must be float32 or float64"),
        (torch.ones(5), torch.ones(3, 5, dtype=torch.float16), TypeError, r"float32 or float64.*float16"),
        (torch.ones(2, 2, 5), torch.ones(3, 5), ValueError, r"carrier must be \[N\] or \[C, N\]"),
        (torch.ones(0), torch.ones(3, 5), ValueError, r"carrier is empty"),
        (torch.ones(5, dtype=torch.int32), torch.ones(3, 5), TypeError, r"carrier must be float32.*int32"),
    ],
)
def test_dense_errors(w, x, exc, match):
    with pytest.raises(exc, match=match):
        nnmark.dense_projection(w, x)


def test_dense_device_mismatch():
    # A matrix on another device (meta: needs no GPU) is refused before any native call.
    with pytest.raises(ValueError, match=r"projection matrix is on meta but the carrier is on cpu"):
        nnmark.dense_projection(torch.ones(5), torch.ones(3, 5, device="meta"))


@requires_cuda
def test_dense_device_mismatch_cuda():
    with pytest.raises(ValueError, match=r"projection matrix is on cuda.* but the carrier is on cpu"):
        nnmark.dense_projection(torch.ones(5), torch.ones(3, 5, device="cuda"))
    with pytest.raises(ValueError, match=r"projection matrix is on cpu but the carrier is on cuda"):
        nnmark.dense_projection(torch.ones(5, device="cuda"), torch.ones(3, 5))


@requires_cuda
def test_dense_cpu_cuda_parity(rng):
    X = torch.from_numpy(rng.standard_normal((256, 576)))
    w = torch.from_numpy(rng.standard_normal((3, 576)))
    p_cpu = nnmark.dense_projection(w, X)
    p_gpu = nnmark.dense_projection(w.cuda(), X.cuda())
    assert torch.equal((p_gpu > 0).cpu(), p_cpu > 0)
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=0, atol=1e-9 * 24 * float(X.abs().max() * w.abs().max()))


# ---------------------------------------------------------------------------- DenseKey
def _keras_case(rng, kh=3, kw=3, cin=4, cout=5, T=64):
    """A Keras-order carrier as Uchida's code makes it, and the same weight in torch layout."""
    kernel = rng.standard_normal((kh, kw, cin, cout))  # Keras Conv2D kernel
    keras_vector = kernel.mean(axis=3).reshape(-1)  # averaged over out, (kh, kw, in) order
    X = rng.standard_normal((T, keras_vector.size))  # Uchida saves a Gaussian matrix
    torch_weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # [out, in, kh, kw]
    return X, keras_vector, torch_weight


def test_dense_key_keras_order(rng):
    X, keras_vector, weight = _keras_case(rng)
    bits = (X @ keras_vector > 0).astype(np.uint8)
    key = nnmark.DenseKey(X, "conv.weight", bits, "filter_mean", order="keras")
    p = key.project(weight)
    np.testing.assert_allclose(p.detach().numpy(), X.astype(np.float32).astype(np.float64) @ keras_vector,
                               rtol=0, atol=1e-9 * 100)
    # the reduction itself is the Keras vector
    np.testing.assert_allclose(key.reduce(weight).numpy(), keras_vector, rtol=0, atol=1e-12)
    # and a torch-order key of the same matrix reads the elements differently
    torch_key = nnmark.DenseKey(X, "conv.weight", bits, "filter_mean", order="torch")
    torch_vector = weight.numpy().mean(axis=0).reshape(-1)
    np.testing.assert_allclose(torch_key.project(weight).numpy(),
                               X.astype(np.float32).astype(np.float64) @ torch_vector, rtol=0, atol=1e-9 * 100)
    assert not np.allclose(torch_key.project(weight).numpy(), p.numpy())
    # the mark embedded in Keras order verifies in torch
    v = nnmark.verify(key, {"conv.weight": weight})
    assert v.matches == 64 and v.verified and v.ber == 0.0
    assert nnmark.verify(torch_key, {"conv.weight": weight}).matches < 64


def test_dense_key_batched_and_extract(rng):
    X, keras_vector, weight = _keras_case(rng, T=40)
    bits = (X @ keras_vector > 0).astype(np.uint8)
    key = nnmark.DenseKey(X, "conv.weight", bits, "filter_mean", order="keras")
    weights = [weight, -weight, weight * 2.0]
    p = key.project(weights)
    assert p.shape == (3, 40)
    for j, w in enumerate(weights):
        torch.testing.assert_close(p[j], key.project(w))
    got = nnmark.extract(key, [{"conv.weight": w} for w in weights])
    assert got.shape == (3, 40)
    assert torch.equal(got[0], torch.from_numpy(bits))
    assert torch.equal(got[1], torch.from_numpy(1 - bits))


def test_dense_key_round_trip(tmp_path, rng):
    X = rng.standard_normal((32, 36)).astype(np.float32)
    key = nnmark.DenseKey(X, "features.0.weight", rng.integers(0, 2, 32), "filter_mean", order="keras",
                          shape=(5, 4, 3, 3))
    path = key.save(tmp_path / "dense.key")
    back = nnmark.load_key(path)
    assert isinstance(back, nnmark.DenseKey)
    assert torch.equal(back.matrix, key.matrix)
    assert torch.equal(back.bits, key.bits)
    assert (back.carrier, back.reduction, back.order, back.shape, back.key_id) == \
        (key.carrier, key.reduction, key.order, key.shape, key.key_id)
    w = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(back.project(w), key.project(w), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(matrix=np.ones((4, 3)), bits=[0, 1, 0]), r"matrix has 4 rows but there are 3 bits"),
        (dict(matrix=np.ones(3), bits=[0, 1, 0]), r"matrix must be a non-empty \[T, N\]"),
        (dict(matrix=np.full((3, 2), np.nan), bits=[0, 1, 0]), r"NaN or Inf"),
        (dict(matrix=np.ones((3, 2)), bits=[0, 1, 0], order="tf"), r"order must be 'torch' or 'keras'"),
        (dict(matrix=np.ones((3, 2)), bits=[0, 2, 0]), r"bits must contain only 0 and 1"),
    ],
)
def test_dense_key_bad_args(kwargs, match):
    kwargs = {"carrier": "c.weight", "reduction": "flat", **kwargs}
    with pytest.raises(ValueError, match=match):
        nnmark.DenseKey(**kwargs)


def test_dense_key_wrong_length_carrier(rng):
    X = rng.standard_normal((30, 36))
    key = nnmark.DenseKey(X, "conv.weight", rng.integers(0, 2, 30), "filter_mean")
    with pytest.raises(ValueError, match=r"reduces to length 18, the key's matrix expects 36"):
        key.project(torch.randn(5, 2, 3, 3))
    v = nnmark.verify(key, {"conv.weight": torch.randn(5, 2, 3, 3)})
    assert v.status == "invalid" and not v.verified and "expects 36" in v.detail
