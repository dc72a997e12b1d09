"""The native trigger-set verification op (nnmark.ops.trigger_verify): hits, mean
margin and exact binomial p-values of K checkpoints on B triggers, against the float64
numpy + scipy reference -- on every device, for every logit dtype."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

import nnmark
from conftest import num_threads, on_cuda_sim, requires_cuda
from nnmark import _C_cpu, _reference
from nnmark.ops import trigger_verify

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]
SIZES = [(K, B, C) for K in (1, 3, 64) for B in (1, 7, 100, 1000) for C in (2, 10, 1000)]


def _random_logits(K, B, C, dtype, device, nan_rows=True):
    """Random logits [K, B, C] and labels [B]; checkpoints get different hit rates, and
    16-bit dtypes with many classes produce exact ties. A few NaN entries when B > 1."""
    y = torch.randint(0, C, (B,))
    scale = float(10.0 ** torch.empty(()).uniform_(-2, 1))
    gen = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(K, B, C, dtype=gen) * scale
    x[:, torch.arange(B), y] += torch.rand(K, 1, dtype=gen) * 3 * scale  # plant hits
    if nan_rows and B > 1:
        x[torch.randint(0, K, ()), torch.randint(0, B, ()), torch.randint(0, C, ())] = float("nan")
    return x.to(dtype).to(device), y


def _check_against_reference(out, x, y, null_rate=None, single=False):
    ref = _reference.trigger_verify(x.double().cpu().numpy(), y.cpu().numpy(), null_rate)
    shape = () if single else (x.shape[0],)
    for name, dtype in (("hits", torch.int64), ("margin", torch.float64), ("p_value", torch.float64)):
        t = out[name]
        assert t.device.type == "cpu" and t.dtype == dtype and tuple(t.shape) == shape, (name, t)
    np.testing.assert_array_equal(out["hits"].numpy(), ref["hits"])
    scale = max(1.0, float(torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).max()))  # largest finite |logit|
    np.testing.assert_allclose(out["margin"].numpy(), ref["margin"], rtol=1e-12, atol=1e-12 * scale, equal_nan=True)
    # Relative 1e-10 down to 1e-300 (below that the doubles run out of digits).
    np.testing.assert_allclose(out["p_value"].numpy(), ref["p_value"], rtol=1e-10, atol=1e-300)


# ---------------------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("K,B,C", SIZES, ids=[f"K{K}-B{B}-C{C}" for K, B, C in SIZES])
def test_matches_reference(device, K, B, C, dtype):
    if K * B * C > 10**7 and (dtype != torch.float32 or on_cuda_sim()):
        pytest.skip("the largest size runs for float32 only, and not on the simulator (time)")
    x, y = _random_logits(K, B, C, dtype, device)
    _check_against_reference(trigger_verify(x, y), x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_checkpoint_squeezes(device, dtype):
    x, y = _random_logits(1, 50, 7, dtype, device)
    out = trigger_verify(x[0], y)
    _check_against_reference(out, x[0], y, single=True)
    full = trigger_verify(x, y)
    for name in out:
        assert torch.equal(out[name], full[name][0]) or (name == "margin" and out[name].isnan() and full[name][0].isnan())


def test_explicit_null_rate(device):
    x, y = _random_logits(5, 300, 10, torch.float32, device)
    for rate in (0.05, 0.1, 0.37, 0.9):  # e.g. a hit rate measured on unmarked models
        _check_against_reference(trigger_verify(x, y, null_rate=rate), x, y, null_rate=rate)
    default = trigger_verify(x, y)
    assert torch.equal(default["p_value"], trigger_verify(x, y, null_rate=0.1)["p_value"])  # 1 / C


# ---------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_go_to_lowest_index(device, dtype):
    rows = [
        ([3.0, 3.0, 3.0, 3.0], 0, 1, 0.0),   # all equal: class 0 is top-1
        ([3.0, 3.0, 3.0, 3.0], 2, 0, 0.0),
        ([1.0, 5.0, 5.0, 2.0], 1, 1, 0.0),   # tie between 1 and 2: 1 wins
        ([1.0, 5.0, 5.0, 2.0], 2, 0, 0.0),
        ([5.0, 1.0, 2.0, 5.0], 3, 0, 0.0),
        ([5.0, 1.0, 2.0, 5.0], 0, 1, 0.0),
        ([-0.0, 0.0, -1.0, -2.0], 1, 0, 0.0),  # -0 == +0: a tie, index 0 wins
        ([0.0, -0.0, -1.0, -2.0], 0, 1, 0.0),
        ([-math.inf] * 4, 0, 1, None),       # all -inf: class 0 wins; margin NaN (left out)
        ([1.0, 2.0, 7.0, 2.0], 2, 1, 5.0),   # a plain hit
    ]
    x = torch.tensor([r[0] for r in rows], dtype=dtype, device=device)
    y = torch.tensor([r[1] for r in rows])
    assert torch.equal(torch.argmax(x.float(), dim=1).cpu() == y, torch.tensor([bool(r[2]) for r in rows]))
    for i, (_, _, hit, margin) in enumerate(rows):  # row by row
        out = trigger_verify(x[i:i + 1], y[i:i + 1])
        assert int(out["hits"]) == hit, rows[i]
        if margin is None:
            assert math.isnan(float(out["margin"]))
        else:
            assert float(out["margin"]) == margin
    out = trigger_verify(x, y)  # all together: the NaN margin is left out of the mean
    assert int(out["hits"]) == sum(r[2] for r in rows)
    assert float(out["margin"]) == pytest.approx(5.0 / 9)
    _check_against_reference(out, x, y, single=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_rows_are_misses_and_left_out_of_the_margin(device, dtype):
    nan, inf = math.nan, math.inf
    rows = [
        ([9.0, nan, 0.0], 0),   # label on top but a NaN elsewhere: miss
        ([nan, 1.0, 0.0], 0),   # NaN at the label: miss
        ([nan, nan, nan], 2),   # all NaN: miss
        ([0.0, 4.0, 1.0], 1),   # hit, margin 3
        ([2.0, 0.0, 1.0], 1),   # miss, margin -2
        ([inf, 1.0, 0.0], 0),   # label +inf: hit, margin +inf ...
        ([0.0, inf, inf], 2),   # label and runner-up +inf: miss (index 1 first), margin NaN, left out
    ]
    x = torch.tensor([r[0] for r in rows], dtype=dtype, device=device)
    y = torch.tensor([r[1] for r in rows])
    out = trigger_verify(x[:5], y[:5])
    assert int(out["hits"]) == 1
    assert float(out["margin"]) == pytest.approx(0.5)  # (3 - 2) / 2: NaN rows left out
    _check_against_reference(out, x[:5], y[:5], single=True)
    out = trigger_verify(x, y)
    assert int(out["hits"]) == 2 and float(out["margin"]) == inf
    _check_against_reference(out, x, y, single=True)
    out = trigger_verify(x[:3], y[:3])  # no row left for the mean
    assert int(out["hits"]) == 0 and math.isnan(float(out["margin"])) and float(out["p_value"]) == 1.0
    # A checkpoint that is all NaN beside a healthy one, in the same call.
    good = torch.tensor([[0.0, 4.0, 1.0]] * 3, dtype=dtype, device=device)
    both = torch.stack([good, torch.full_like(good, nan)])
    out = trigger_verify(both, torch.tensor([1, 1, 1]))
    assert out["hits"].tolist() == [3, 0]
    assert out["margin"][0] == 3.0 and math.isnan(float(out["margin"][1]))
    assert out["p_value"][1] == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_planted_hit_counts(device, dtype):
    K, B, C = 12, 300, 10
    want = torch.tensor([0, 1, 2, 29, 30, 31, 100, 150, 299, 300, 17, 250])
    y = torch.randint(0, C, (B,))
    x = torch.round(torch.randn(K, B, C, dtype=torch.float64) * 4) / 4  # quarter steps: exact in bf16 here
    rows = torch.arange(B)
    for k in range(K):
        hit = torch.zeros(B, dtype=torch.bool)
        hit[torch.randperm(B)[: int(want[k])]] = True
        others = x[k].clone()
        others[rows, y] = -math.inf
        top = others.max(dim=1).values
        x[k, rows, y] = torch.where(hit, top + 1.0, top - 1.0)  # exactly representable in every dtype
    out = trigger_verify(x.to(dtype).to(device), y.to(device))
    assert out["hits"].tolist() == want.tolist()
    expect = [1.0 if h == 0 else binom.sf(h - 1, B, 1 / C) for h in want.tolist()]
    np.testing.assert_allclose(out["p_value"].numpy(), expect, rtol=1e-10)
    assert out["p_value"][0] == 1.0


# ---------------------------------------------------------------------------- p-values
def test_p_values_match_scipy_down_to_1e_300():
    worst = 0.0
    tiny = 0
    for n in (1, 2, 7, 15, 16, 17, 36, 100, 256, 1000, 4099, 10000):
        for p in (0.5, 0.1, 0.01, 1 / 3, 1 / 7, 1 / 1000, 0.9, 0.999, 1e-6):
            hs = np.unique(np.concatenate([np.arange(min(n, 30) + 1), np.linspace(0, n, 40).astype(int), [n - 1, n]]))
            for h in hs.tolist():
                ref = 1.0 if h == 0 else float(binom.sf(h - 1, n, p))
                got = _C_cpu.binomial_sf(h, n, p)
                if ref < 1e-300:  # below the stated range: tiny, or underflowed to 0 as scipy does
                    assert got < 1e-290
                    continue
                tiny += ref < 1e-200
                worst = max(worst, abs(got - ref) / ref)
    assert tiny > 50
    assert worst < 1e-10, worst


def test_p_value_known_cutoffs_and_edges():
    # DESIGN.md: 100 triggers over 10 classes need >= 28 hits for p <= 1e-6; 256 bits need >= 167.
    assert _C_cpu.binomial_sf(28, 100, 0.1) <= 1e-6 < _C_cpu.binomial_sf(27, 100, 0.1)
    assert _C_cpu.binomial_sf(167, 256, 0.5) <= 1e-6 < _C_cpu.binomial_sf(166, 256, 0.5)
    assert _C_cpu.binomial_sf(0, 10, 0.3) == 1.0
    assert _C_cpu.binomial_sf(11, 10, 0.3) == 0.0
    assert _C_cpu.binomial_sf(10, 10, 0.3) == pytest.approx(0.3**10, rel=1e-14)
    assert _C_cpu.binomial_sf(1, 10, 0.3) == pytest.approx(1 - 0.7**10, rel=1e-14)
    assert nnmark.binomial_p_value(28, 100, 0.1) == pytest.approx(_C_cpu.binomial_sf(28, 100, 0.1), rel=1e-12)


def test_tiny_p_values_through_the_op(device):
    B = 10000
    want = [6779, 6500, 5100, 5000, 0, B]  # 1.6e-283, ~1e-200, 0.023, 0.5, 1, 2^-10000 (underflows to 0)
    y = torch.zeros(B, dtype=torch.int64)
    x = torch.zeros(len(want), B, 2)
    for k, h in enumerate(want):
        x[k, :h, 0] = 1.0   # hit rows: class 0 on top
        x[k, h:, 1] = 1.0   # miss rows
    out = trigger_verify(x.to(device), y)
    assert out["hits"].tolist() == want
    expect = np.array([1.0 if h == 0 else binom.sf(h - 1, B, 0.5) for h in want])
    assert 1e-300 < expect[0] < 1e-280 and expect[-1] == 0.0
    np.testing.assert_allclose(out["p_value"].numpy(), expect, rtol=1e-10, atol=0)
    assert out["p_value"][-1] == 0.0


# ---------------------------------------------------------------------------- threads, inputs
def test_threads_do_not_change_the_result():
    x, y = _random_logits(9, 1000, 300, torch.float32, "cpu")  # 36 work items, several ranges
    with num_threads(1):
        one = trigger_verify(x, y)
    with num_threads(2):
        two = trigger_verify(x, y)
    with num_threads(7):
        seven = trigger_verify(x, y)
    for name in one:
        assert torch.equal(one[name], two[name]) and torch.equal(one[name], seven[name]), name
    _check_against_reference(one, x, y)


def test_numpy_and_other_inputs():
    x, y = _random_logits(4, 120, 10, torch.float32, "cpu")
    base = trigger_verify(x, y)
    for xs, ys in ((x.numpy(), y.numpy()), (x.numpy(), y.numpy().astype(np.int32)), (x, y.tolist()),
                   (x, y.to(torch.uint8)), (x.transpose(1, 2).contiguous().transpose(1, 2), y)):
        out = trigger_verify(xs, ys)
        for name in base:
            assert torch.equal(out[name], base[name]), name
    f16 = x.numpy().astype(np.float16)
    _check_against_reference(trigger_verify(f16, y.numpy()), torch.from_numpy(f16), y)
    out = trigger_verify(x.clone().requires_grad_(True), y)  # no graph needed, no error
    assert torch.equal(out["hits"], base["hits"])


# ---------------------------------------------------------------------------- CPU / CUDA parity
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_cuda_parity(gpu_side, dtype):
    for K, B, C in ((1, 1, 2), (3, 7, 10), (5, 257, 17), (64, 100, 129), (2, 1000, 1000), (4, 600, 3000)):
        x, y = _random_logits(K, B, C, dtype, "cpu")
        x[0, 0, :] = 2.0  # a row of ties
        cpu = trigger_verify(x, y)
        if gpu_side.name == "cuda":
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):  # runs on the caller's current stream
                gpu = trigger_verify(x.cuda(), y)             # labels moved to the device
                gpu2 = trigger_verify(x.cuda(), y.cuda().int())  # labels already there
        else:
            with gpu_side.run():
                gpu = trigger_verify(gpu_side.put(x), y)
                gpu2 = trigger_verify(gpu_side.put(x), y.int())
        assert torch.equal(cpu["hits"], gpu["hits"]) and torch.equal(gpu["hits"], gpu2["hits"])
        # Same tiling and order as the CPU: margins agree to the last bit or nearly.
        np.testing.assert_allclose(gpu["margin"].numpy(), cpu["margin"].numpy(), rtol=1e-14, equal_nan=True)
        if gpu_side.name == "cudasim":  # the host's float arithmetic: the same bits
            assert torch.equal(gpu["margin"].nan_to_num(7.0), cpu["margin"].nan_to_num(7.0))
        np.testing.assert_allclose(gpu["p_value"].numpy(), cpu["p_value"].numpy(), rtol=1e-12)
        _check_against_reference(gpu, x, y)


@requires_cuda
def test_cuda_labels_on_the_cpu_logits_device_mismatch():
    x, y = _random_logits(2, 10, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"labels are on cuda.* but the logits are on cpu"):
        trigger_verify(x, y.cuda())


# ---------------------------------------------------------------------------- errors
def test_rejected_inputs():
    x = torch.randn(2, 6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cases = [
        (dict(logits=torch.randn(6)), ValueError, r"logits must be \[K, B, C\] or \[B, C\], got shape \[6\]"),
        (dict(logits=torch.randn(1, 2, 6, 4)), ValueError, r"logits must be \[K, B, C\] or \[B, C\], got shape \[1, 2, 6, 4\]"),
        (dict(logits=torch.ones(2, 6, 4, dtype=torch.int32)), TypeError, r"logits must be float32.*got torch.int32"),
        (dict(logits=[[0.0, 1.0]]), TypeError, r"logits must be a torch tensor, numpy array or cupy array, got list"),
        (dict(logits=torch.randn(2, 6, 1)), ValueError, r"at least 2 classes, got C=1"),
        (dict(logits=torch.randn(0, 6, 4)), ValueError, r"logits are empty"),
        (dict(logits=torch.randn(2, 0, 4), labels=torch.zeros(0, dtype=torch.int64)), ValueError, r"logits are empty"),
        (dict(logits=torch.randn(2, 6, 4, device="meta")), ValueError, r"logits are on meta"),
        (dict(labels=y.float()), TypeError, r"labels must be an integer tensor.*got torch.float32"),
        (dict(labels=y.bool()), TypeError, r"labels must be an integer tensor.*got torch.bool"),
        (dict(labels=y[None]), ValueError, r"labels must be \[B\], got shape \[1, 6\]"),
        (dict(labels=y[:5]), ValueError, r"got 5 labels for B=6 triggers"),
        (dict(labels=torch.tensor([0, 1, -1, 3, 0, 1])), ValueError, r"label -1 at index 2 is out of range.*\[0, 4\)"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 4, 1])), ValueError, r"label 4 at index 4 is out of range.*\[0, 4\)"),
        (dict(labels=y.to("meta")), ValueError, r"labels are on meta but the logits are on cpu"),
        (dict(labels="012301"), TypeError, r"labels must be a torch tensor"),
        (dict(null_rate=0.0), ValueError, r"null_rate must be in \(0, 1\), got 0.0"),
        (dict(null_rate=1), ValueError, r"null_rate must be in \(0, 1\), got 1"),
        (dict(null_rate=-0.25), ValueError, r"null_rate must be in \(0, 1\)"),
        (dict(null_rate=float("nan")), ValueError, r"null_rate must be in \(0, 1\), got nan"),
        (dict(null_rate="0.1"), TypeError, r"null_rate must be a float in \(0, 1\) or None, got str"),
        (dict(null_rate=True), TypeError, r"null_rate must be a float .* got bool"),
    ]
    for kw, exc, pattern in cases:
        args = dict(logits=x, labels=y, null_rate=None) | kw
        with pytest.raises(exc, match=pattern):
            trigger_verify(**args)


def test_native_checks_name_the_bad_value():
    x = torch.randn(2, 6, 4)
    y = torch.tensor([0, 1, 2, 7, 0, 1])
    out = [torch.empty(2, dtype=torch.int64), torch.empty(2, dtype=torch.float64), torch.empty(2, dtype=torch.float64)]
    ptrs = [t.data_ptr() for t in out]

    def call(dtype_code=0, K=2, B=6, C=4, rate=0.25, labels=y):
        _C_cpu.trigger_verify(x.data_ptr(), dtype_code, labels.data_ptr(), K, B, C, rate, *ptrs)

    with pytest.raises(ValueError, match=r"label at index 3 is 7, expected in \[0, 4\)"):
        call()
    good = torch.tensor([0, 1, 2, 3, 0, 1])
    call(labels=good)  # the same call with good labels works
    with pytest.raises(ValueError, match=r"unknown dtype code 9"):
        call(dtype_code=9, labels=good)
    with pytest.raises(ValueError, match=r"number of classes C must be >= 2, got 1"):
        call(C=1, labels=good)
    with pytest.raises(ValueError, match=r"number of triggers B must be >= 1, got 0"):
        call(B=0, labels=good)
    with pytest.raises(ValueError, match=r"null hit rate must be in \(0, 1\), got 1"):
        call(rate=1.0, labels=good)
    with pytest.raises(ValueError, match=r"success probability must be in \(0, 1\)"):
        _C_cpu.binomial_sf(3, 10, 0.0)
    with pytest.raises(ValueError, match=r"number of trials must be >= 1, got 0"):
        _C_cpu.binomial_sf(0, 0, 0.5)
