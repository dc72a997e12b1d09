"""Exact k-th smallest |w| across tensors (native radix select) and magnitude pruning."""
from __future__ import annotations

import pytest
import torch

import nnmark
from nnmark import ops
from nnmark.attacks import prune_magnitude

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _tensors(rng_seed, sizes, dtype, ties=False):
    g = torch.Generator().manual_seed(rng_seed)
    out = []
    for n in sizes:
        t = torch.randn(n, generator=g, dtype=torch.float64)
        if ties:  # few distinct magnitudes, both signs: many ties at any threshold
            t = torch.randint(-4, 5, (n,), generator=g).double() / 4
        out.append(t.to(dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1], [7, 0, 300], [1000, 1, 4097, 33], [70_000, 50_000]])
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_equals_kthvalue_of_concatenation(dtype, sizes, ties):
    ts = _tensors(sum(sizes) + len(sizes), sizes, dtype, ties)
    flat = torch.cat([t.flatten().double() for t in ts]).abs()
    total = flat.numel()
    for k in sorted({1, total, max(1, total // 2), max(1, total // 3), max(1, total - 1)}):
        thr, below, equal = ops.magnitude_threshold(ts, k)
        assert thr == torch.kthvalue(flat, k).values.item()
        assert below == int((flat < thr).sum()) and equal == int((flat == thr).sum())
        assert below < k <= below + equal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_prune_smallest_zeroes_exactly_k(dtype, ties):
    ts = _tensors(3, [500, 1, 2000, 77], dtype, ties)
    before = [t.clone() for t in ts]
    flat = torch.cat([t.flatten().double() for t in before]).abs()
    nonzero_before = int((flat != 0).sum())
    for k in (1, 600, 1500):
        work = [t.clone() for t in before]
        thr, below, equal = ops.prune_smallest(work, k)
        after = torch.cat([t.flatten().double() for t in work])
        changed = torch.cat([(a != b).flatten() for a, b in zip(work, before)])
        # exactly the k smallest are zero: everything below the threshold, ties in order
        pruned_positions = torch.argsort(flat, stable=True)[:k]
        expect = before_flat = torch.cat([t.flatten().double() for t in before])
        expect = expect.clone()
        expect[pruned_positions] = 0
        assert torch.equal(after, expect)
        assert int((after == 0).sum()) - int((before_flat == 0).sum()) == int(changed.sum())
        assert int((flat[pruned_positions] != 0).sum()) == int(changed.sum())
        assert nonzero_before - int((after != 0).sum()) <= k


def test_threads_do_not_change_the_result():
    ts = _tensors(5, [300_000, 200_001], torch.float32, ties=True)
    before = nnmark.get_num_threads()
    try:
        results = []
        for n in (1, 2, 5):
            nnmark.set_num_threads(n)
            work = [t.clone() for t in ts]
            results.append((ops.prune_smallest(work, 250_000), torch.cat(work)))
    finally:
        nnmark.set_num_threads(before)
    for sel, flat in results[1:]:
        assert sel == results[0][0] and torch.equal(flat, results[0][1])


def test_nan_ranks_above_inf():
    t = torch.tensor([float("nan"), 1.0, float("inf"), -2.0])
    assert ops.magnitude_threshold([t], 3)[0] == float("inf")
    assert ops.magnitude_threshold([t], 4)[0] != ops.magnitude_threshold([t], 4)[0]  # NaN


@pytest.mark.parametrize("tensors,k,exc,match", [
    ([], 1, ValueError, "empty"),
    ([torch.randn(3)], 0, ValueError, "k must be"),
    ([torch.randn(3)], 4, ValueError, "k must be"),
    ([torch.randn(3)], 1.5, ValueError, "k must be"),
    ([torch.arange(3)], 1, TypeError, "dtype"),
    ([torch.randn(4, 4).t()], 1, ValueError, "contiguous"),
    ([torch.randn(3), "x"], 1, TypeError, "not a torch tensor"),
    ([torch.randn(3, device="meta")], 1, ValueError, "on meta"),
])
def test_rejected_inputs(tensors, k, exc, match):
    with pytest.raises(exc, match=match):
        ops.magnitude_threshold(tensors, k)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1)[:, :32])


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prune_magnitude_global(sparsity):
    torch.manual_seed(0)
    m = Net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rec = prune_magnitude(m, sparsity=sparsity, scope="global")
    weights = ["conv.weight", "fc.weight"]
    total = sum(before[n].numel() for n in weights)
    assert rec.total == total and rec.pruned == round(sparsity * total) and rec.tensors == weights
    zeros = sum(int((m.state_dict()[n] == 0).sum()) for n in weights)
    assert zeros == rec.pruned
    flat = torch.cat([before[n].abs().flatten() for n in weights])
    if rec.pruned:
        assert rec.thresholds["global"] == torch.kthvalue(flat, rec.pruned).values.item()
    for name, value in m.state_dict().items():  # nothing else changed
        if name not in weights:
            assert torch.equal(value, before[name]), name


def test_prune_magnitude_per_layer_and_errors():
    torch.manual_seed(1)
    m = Net()
    rec = prune_magnitude(m, sparsity=0.5, scope="layer")
    for n in ("conv.weight", "fc.weight"):
        p = m.get_parameter(n)
        assert int((p == 0).sum()) == round(0.5 * p.numel())
        assert n in rec.thresholds
    with pytest.raises(ValueError, match="sparsity"):
        prune_magnitude(m, sparsity=1.5)
    with pytest.raises(ValueError, match="scope"):
        prune_magnitude(m, scope="row")
    with pytest.raises(ValueError, match="no such parameters"):
        prune_magnitude(m, names=["nope.weight"])
    with pytest.raises(TypeError, match="nn.Module"):
        prune_magnitude({"w": torch.randn(3)})


def test_quantize_levels_and_only_weights():
    from nnmark.attacks import quantize

    torch.manual_seed(2)
    m = Net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rec = quantize(m, bits=3)
    assert rec.tensors == ["conv.weight", "fc.weight"] and rec.changed > 0
    for n in rec.tensors:
        w, b = m.state_dict()[n], before[n]
        scale = b.abs().max() / 3
        levels = torch.unique(torch.round(w / scale))
        assert levels.numel() <= 7 and levels.abs().max() <= 3  # 2^(3-1)-1 = 3 levels a side
        assert (w - b).abs().max() <= scale / 2 + 1e-6
    for n, v in m.state_dict().items():
        if n not in rec.tensors:
            assert torch.equal(v, before[n])
    with pytest.raises(ValueError, match="bits"):
        quantize(m, bits=1)


def test_gaussian_noise_relative_std_and_seed():
    from nnmark.attacks import gaussian_noise

    torch.manual_seed(3)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    before = a.fc.weight.detach().clone()
    gaussian_noise(a, std=0.1, seed=7)
    gaussian_noise(b, std=0.1, seed=7)
    assert torch.equal(a.fc.weight, b.fc.weight)  # seeded: reproducible
    delta = a.fc.weight.detach() - before
    assert abs(float(delta.std()) / float(before.std()) - 0.1) < 0.02
    assert torch.equal(a.fc.bias, b.fc.bias)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(a, std=-1)
