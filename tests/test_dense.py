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


def test_dense_cpu_cuda_parity(gpu, rng):
    X = torch.from_numpy(rng.standard_normal((256, 576)))
    w = torch.from_numpy(rng.standard_normal((3, 576)))
    p_cpu = nnmark.dense_projection(w, X)
    wg = gpu.put(w).requires_grad_(True)
    with gpu.run():
        p_gpu = nnmark.dense_projection(wg, gpu.put(X))
        p_gpu.sum().backward()
    assert torch.equal((p_gpu > 0).cpu(), p_cpu > 0)
    torch.testing.assert_close(p_gpu.detach().cpu(), p_cpu, rtol=0,
                               atol=1e-9 * 24 * float(X.abs().max() * w.abs().max()))
    torch.testing.assert_close(wg.grad.cpu(), X.sum(0).expand(3, -1), rtol=0, atol=1e-9 * 16 * float(X.abs().max()))


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


# ---------------------------------------------------------------------------- Uchida et al.'s files
# Their code (github.com/yu4u/dnn-watermark): WatermarkRegularizer.set_param makes X = np.random.randn(N, T)
# with N = kh*kw*in of a Keras (kh, kw, in, out) kernel; train_wrn.py's save_wmark_signatures writes X as
# PREFIX_layerK_w.npy ([N, T], float64) and the owner's bits b as PREFIX_layerK_b.npy (float [1, T]).
# A bit is sigmoid(mean_out(kernel).reshape(1, N) . X) > 0.5 (utility/wmark_validate.py).
KH, KW, CIN, COUT = 3, 3, 16, 8  # N = 144


def _uchida_files(tmp_path, rng, T, n=KH * KW * CIN, name="wrn_layer7"):
    X = rng.standard_normal((n, T))
    b = rng.integers(0, 2, (1, T)).astype(np.float64)
    w_path, b_path = tmp_path / f"{name}_w.npy", tmp_path / f"{name}_b.npy"
    np.save(w_path, X)
    np.save(b_path, b)
    return w_path, b_path, X, b


def _uchida_carrier(X, b, rng) -> torch.Tensor:
    """A torch conv weight [out, in, kh, kw] that carries b as Uchida's code reads it: every filter the
    least-norm v (in Keras (kh, kw, in) order) with v . X = 2b - 1, plus a little noise."""
    v = np.linalg.lstsq(X.T, 2.0 * b.reshape(-1) - 1.0, rcond=None)[0]
    filt = v.reshape(KH, KW, CIN).transpose(2, 0, 1)  # (kh, kw, in) -> torch's [in, kh, kw]
    w = filt[None] + 1e-3 * rng.standard_normal((COUT, CIN, KH, KW))
    # their extraction, on the Keras kernel (kh, kw, in, out): the carrier holds b
    kernel = w.transpose(2, 3, 1, 0)
    assert np.array_equal(1 / (1 + np.exp(-(kernel.mean(axis=3).reshape(1, -1) @ X))) > 0.5, b == 1)
    return torch.from_numpy(w.astype(np.float32))


def test_from_uchida_files_verify(tmp_path, rng):
    w_path, b_path, X, b = _uchida_files(tmp_path, rng, T=64)
    weight = _uchida_carrier(X, b, rng)
    key = nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight", order="keras",
                                      shape=(COUT, CIN, KH, KW))
    assert key.num_bits == 64 and key.length == KH * KW * CIN and key.order == "keras"
    assert torch.equal(key.matrix, torch.from_numpy(X.T.astype(np.float32)))
    assert torch.equal(key.bits, torch.from_numpy(b[0].astype(np.uint8)))
    v = nnmark.verify(key, {"conv.weight": weight})
    assert v.verified and v.ber == 0.0 and v.matches == 64
    # the same key from the arrays, bits [T] or [1, T] as saved
    same = nnmark.DenseKey(X, "conv.weight", b, order="keras", matrix_layout="NT")
    assert same.key_id == key.key_id and torch.equal(same.bits, key.bits)
    # b saved as int [T] reads the same
    np.save(b_path, b[0].astype(np.int64))
    assert torch.equal(nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight").bits, key.bits)
    # the element order matters: torch's (in, kh, kw) reading of the same files does not verify
    torch_order = nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight", order="torch")
    assert not nnmark.verify(torch_order, {"conv.weight": weight}).verified


def test_from_uchida_square_needs_layout(tmp_path, rng):
    T = KH * KW * CIN  # N == T: the shapes cannot tell [N, T] from [T, N]
    w_path, b_path, X, b = _uchida_files(tmp_path, rng, T=T)
    weight = _uchida_carrier(X, b, rng)
    with pytest.raises(nnmark.KeyFileError, match=r"square \(144 x 144: N == T\).*matrix_layout='NT'"):
        nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight", order="keras")
    key = nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight", order="keras", matrix_layout="NT")
    v = nnmark.verify(key, {"conv.weight": weight})
    assert v.verified and v.ber == 0.0 and v.matches == T
    # the layout matters: read untransposed, the same files give wrong bits
    wrong = nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight", order="keras", matrix_layout="TN")
    v = nnmark.verify(wrong, {"conv.weight": weight})
    assert not v.verified and v.matches < 0.7 * T
    # the plain constructor refuses the square matrix too, unless told its layout
    with pytest.raises(ValueError, match=r"square \(144 x 144, N == T\).*matrix_layout='TN'.*'NT'"):
        nnmark.DenseKey(X, "conv.weight", b, order="keras")
    for m, layout in ((X, "NT"), (X.T, "TN")):
        k = nnmark.DenseKey(m, "conv.weight", b, order="keras", matrix_layout=layout)
        assert k.key_id == key.key_id and nnmark.verify(k, {"conv.weight": weight}).verified


def test_from_uchida_layout_must_agree_with_shapes(tmp_path, rng):
    w_path, b_path, X, b = _uchida_files(tmp_path, rng, T=64)
    key = nnmark.DenseKey.from_uchida(w_path, b_path, carrier="c", matrix_layout="NT")
    with pytest.raises(nnmark.KeyFileError, match=r"matrix_layout='TN' says .* is \[T, N\].*\[144, 64\].*64 bits"):
        nnmark.DenseKey.from_uchida(w_path, b_path, carrier="c", matrix_layout="TN")
    with pytest.raises(ValueError, match=r"matrix_layout must be None, 'NT'"):
        nnmark.DenseKey.from_uchida(w_path, b_path, carrier="c", matrix_layout="nt")
    with pytest.raises(ValueError, match=r"carrier shape \[8, 16, 3, 2\] reduces \(filter_mean\) to length 96.*N = 144"):
        nnmark.DenseKey.from_uchida(w_path, b_path, carrier="c", shape=(8, 16, 3, 2))
    # a non-square matrix already in nnmark's [T, N] is unambiguous
    np.save(w_path, X.T)
    assert nnmark.DenseKey.from_uchida(w_path, b_path, carrier="c").key_id == key.key_id
    with pytest.raises(nnmark.KeyFileError, match=r"matrix_layout='NT' says .* is \[N, T\].*\[64, 144\]"):
        nnmark.DenseKey.from_uchida(w_path, b_path, carrier="c", matrix_layout="NT")


class _Boom:
    pass


@pytest.mark.parametrize(
    "which,write,match",
    [
        ("w", lambda p, X, b: np.save(p, np.array([_Boom()], dtype=object), allow_pickle=True),
         r"projection matrix \(w\) file .* pickled Python objects .* could run code"),
        ("b", lambda p, X, b: np.save(p, np.array([b.tolist()], dtype=object), allow_pickle=True),
         r"owner bits \(b\) file .* pickled Python objects"),
        ("w", lambda p, X, b: p.write_bytes(__import__("pickle").dumps(X)),
         r"projection matrix \(w\) file .* is a pickle.*refused"),
        ("w", lambda p, X, b: np.savez(str(p)[:-4], X=X) or (p.with_suffix(".npz")).replace(p),
         r"is an \.npz archive; expected a \.npy array"),
        ("w", lambda p, X, b: p.write_bytes(p.read_bytes()[:200]), r"not a readable \.npy array \(truncated"),
        ("w", lambda p, X, b: p.write_text("hello"), r"is not a \.npy file"),
        ("w", lambda p, X, b: p.unlink(), r"cannot read projection matrix \(w\) file .*wrn_layer7_w\.npy"),
        ("b", lambda p, X, b: p.unlink(), r"cannot read owner bits \(b\) file .*wrn_layer7_b\.npy"),
        ("w", lambda p, X, b: np.save(p, np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X)),
         r"projection matrix file .* contains NaN or Inf"),
        ("w", lambda p, X, b: np.save(p, X.reshape(16, 9, -1)), r"shape \[16, 9, 64\].*2-D \[N, T\]"),
        ("w", lambda p, X, b: np.save(p, X[0]), r"shape \[64\].*2-D \[N, T\]"),
        ("w", lambda p, X, b: np.save(p, X.astype(np.complex128)), r"complex128 values; expected real"),
        ("b", lambda p, X, b: np.save(p, 2 * b), r"owner bits file .* only 0 and 1, found \[2\.0"),
        ("b", lambda p, X, b: np.save(p, b - 0.5), r"only 0 and 1, found \[-?0\.5"),
        ("b", lambda p, X, b: np.save(p, b[:, :60]), r"\[144, 64\] but .* holds 60 bits: neither axis is T = 60"),
        ("b", lambda p, X, b: np.save(p, np.vstack([b, b])), r"shape \[2, 64\]; expected \[1, T\]"),
        ("b", lambda p, X, b: np.save(p, np.array(["1"] * 64)), r"<U1 values; expected 0/1"),
    ],
    ids=["pickled-w", "pickled-b", "raw-pickle", "npz", "truncated", "text", "missing-w", "missing-b", "nan",
         "3d", "1d", "complex", "b-two", "b-half", "b-length", "b-two-rows", "b-strings"],
)
def test_from_uchida_bad_files(tmp_path, rng, which, write, match):
    w_path, b_path, X, b = _uchida_files(tmp_path, rng, T=64)
    write(w_path if which == "w" else b_path, X, b)
    with pytest.raises(nnmark.KeyFileError, match=match):
        nnmark.DenseKey.from_uchida(w_path, b_path, carrier="conv.weight")
    assert issubclass(nnmark.KeyFileError, ValueError)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(matrix=np.ones((3, 4)), bits=[[0, 1, 0], [1, 1, 0]]), r"bits must be \[T\] or one row \[1, T\], got shape \[2, 3\]"),
        (dict(matrix=np.ones((3, 4)), bits=[0, 1, 0], matrix_layout="NT"), r"matrix_layout='NT' says .*\[N, T\].*4 columns.*3 bits"),
        (dict(matrix=np.ones((4, 3)), bits=[0, 1, 0]), r"4 rows but there are 3 bits \(it looks like \[N, T\].*matrix_layout='NT'"),
        (dict(matrix=np.ones((4, 3)), bits=[0, 1, 0], matrix_layout="TN"), r"4 rows but there are 3 bits$"),
        (dict(matrix=np.ones((3, 3)), bits=[0, 1, 0]), r"matrix is square \(3 x 3, N == T\)"),
        (dict(matrix=np.ones((3, 3)), bits=[0, 1, 0], matrix_layout="T,N"), r"matrix_layout must be None, 'TN'"),
    ],
)
def test_dense_key_layout_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nnmark.DenseKey(carrier="c.weight", reduction="flat", **kwargs)


def test_dense_key_row_bits_and_layouts(rng):
    X = rng.standard_normal((30, 12))
    bits = rng.integers(0, 2, 30)
    key = nnmark.DenseKey(X, "c.weight", bits[None, :], "flat")  # [1, T], as Uchida's b
    assert torch.equal(key.bits, torch.from_numpy(bits.astype(np.uint8)))
    assert nnmark.DenseKey(X.T, "c.weight", torch.from_numpy(bits)[None], "flat", matrix_layout="NT").key_id == key.key_id
    assert nnmark.DenseKey(X, "c.weight", bits, "flat", matrix_layout="TN").key_id == key.key_id


def test_square_dense_key_file_still_loads(tmp_path, rng):
    """A square key file as nnmark has always written it ([T, N], no layout member) loads unchanged."""
    import base64
    import hashlib

    from nnmark.keys import write_key_file

    T = 36
    M = (rng.integers(-4, 5, size=(T, T)) / 4).astype("<f4")
    bits = rng.integers(0, 2, T)
    key_id = hashlib.sha256(b"nnmark:key-id:v1:" + M.tobytes()).hexdigest()[:16]
    fields = {"matrix": base64.b64encode(M.tobytes()).decode("ascii"), "matrix_shape": [T, T],
              "carrier": "features.0.weight", "reduction": "filter_mean", "order": "keras", "num_bits": T,
              "bits": "".join(map(str, bits)), "shape": [5, 4, 3, 3]}
    path = write_key_file(tmp_path / "old.key", "whitebox-dense", key_id, fields)
    key = nnmark.load_key(path)
    assert isinstance(key, nnmark.DenseKey) and key.key_id == key_id
    assert torch.equal(key.matrix, torch.from_numpy(M)) and key.bits.tolist() == bits.tolist()
    w = torch.from_numpy(rng.standard_normal((5, 4, 3, 3)).astype(np.float32))
    v = w.double().numpy().mean(axis=0).transpose(1, 2, 0).reshape(-1)  # keras (kh, kw, in)
    p = M.astype(np.float64) @ v
    assert np.all(np.abs(p) > 1e-4)
    assert nnmark.extract(key, {"features.0.weight": w}).tolist() == (p > 0).astype(int).tolist()
    # and it saves and loads again, bit for bit
    again = nnmark.load_key(key.save(tmp_path / "again.key"))
    assert again.key_id == key_id and torch.equal(again.matrix, key.matrix) and torch.equal(again.bits, key.bits)
    assert torch.equal(nnmark.extract(again, {"features.0.weight": w}), nnmark.extract(key, {"features.0.weight": w}))


def test_attacker_key_like_a_square_dense_key():
    """The overwriting attack builds an attacker key like the owner's: a square dense key too."""
    from nnmark.attacks import attacker_key_like

    rng = np.random.default_rng(5)
    owner = nnmark.DenseKey(rng.standard_normal((36, 36)), "conv.weight", rng.integers(0, 2, 36),
                            matrix_layout="TN")
    attacker = attacker_key_like(owner, seed=1)
    assert isinstance(attacker, nnmark.DenseKey) and attacker.matrix.shape == (36, 36)
    assert attacker.key_id != owner.key_id
