"""The float32 fast path of the magnitude select (lists of 1M+ weights): a sampled
bracket, one streaming pass and a finish on the candidates, with the radix select
behind it whenever the bracket misses. Checked against torch on the concatenation."""
from __future__ import annotations

import pytest
import torch

from nnmark import ops

from conftest import ISAS, num_threads, use_isa

SIZES = [600_000, 1, 0, 700_003]  # 1.3M: over the fast path's 1M floor; odd tails


def _data(kind: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, generator=g) * (0.01 + i) for i, n in enumerate(SIZES)]  # a scale per tensor
    if kind == "levels":  # 1000 magnitudes: ~1300 ties at every threshold (partial ties)
        ts = [torch.round(t * 100) / 100 for t in ts]
    elif kind == "few":  # 3 magnitudes: the bracket holds a third of everything (the radix select takes over)
        ts = [torch.randint(-3, 4, (n,), generator=g).float() for n in SIZES]
    elif kind == "zeros":  # half already pruned, with -0.0 among them, and inf / nan
        for t in ts:
            t[: t.numel() // 2] = 0.0
            t[: t.numel() // 8] = -0.0
        ts[0][-3:] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    return ts


def _reference(ts, k):
    flat = torch.cat([t.flatten() for t in ts]).abs().double()
    flat[flat.isnan()] = float("inf") * 2  # nan ranks above +inf, as in the op
    order = torch.argsort(flat, stable=True)
    return flat, order[:k]


@pytest.mark.parametrize("kind", ["normal", "levels", "few", "zeros"])
def test_threshold_and_counts_equal_torch(kind):
    ts = _data(kind, 11)
    flat = torch.cat([t.flatten() for t in ts]).abs()
    total = flat.numel()
    for k in (1, 17, total // 3, total // 2, total - 5, total):
        thr, below, equal = ops.magnitude_threshold(ts, k)
        if kind != "zeros" or k < total - 3:  # away from the nan (kthvalue's nan order differs)
            kth = torch.kthvalue(flat.double(), k).values.item()
            assert thr == kth, (kind, k)
            assert below == int((flat < thr).sum()) and equal == int((flat == thr).sum())
        assert below < k <= below + equal


@pytest.mark.parametrize("kind", ["normal", "levels", "zeros"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 3])
def test_prune_zeroes_exactly_the_k_smallest_in_order(kind, isa, threads):
    before = _data(kind, 5)
    total = sum(t.numel() for t in before)
    k = int(total * 0.37)
    flat, smallest = _reference(before, k)
    expect = torch.cat([t.flatten() for t in before]).clone()
    expect[smallest] = 0
    work = [t.clone() for t in before]
    with use_isa(isa), num_threads(threads):
        thr, below, equal = ops.prune_smallest(work, k)
    after = torch.cat([t.flatten() for t in work])
    assert below < k <= below + equal
    # Exactly those weights are zero now (ties at the threshold taken in tensor order);
    # every other weight is bit-identical.
    changed = after.view(torch.int32) != expect.view(torch.int32)
    if kind == "zeros":  # -0.0 at the threshold 0 may turn +0.0: same value
        changed &= ~((after == 0) & (expect == 0))
    assert not changed.any()
    if kind == "levels":
        assert 0 < k - below < equal  # the partial-tie case was exercised


@pytest.mark.parametrize("isa", ISAS)
def test_isas_and_threads_agree(isa):
    ts = _data("normal", 8)
    k = sum(t.numel() for t in ts) // 2
    with use_isa(None), num_threads(2):
        want = ops.magnitude_threshold(ts, k)
    with use_isa(isa), num_threads(1):
        assert ops.magnitude_threshold(ts, k) == want


def test_mixed_dtypes_take_the_general_path():
    ts = _data("normal", 3)
    ts[0] = ts[0].double()  # one float64 tensor: 64-bit keys
    flat = torch.cat([t.flatten().double() for t in ts]).abs()
    k = flat.numel() // 2
    thr, below, equal = ops.magnitude_threshold(ts, k)
    assert thr == torch.kthvalue(flat, k).values.item()
