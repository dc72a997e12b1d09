"""Exact k-th smallest |w| across tensors (native radix select) and magnitude pruning."""
from __future__ import annotations

import pytest
import torch

import nnmark
from nnmark import ops
from nnmark.attacks import prune_magnitude

from conftest import requires_cuda

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


# ---------------------------------------------------------------- strided weights
def test_prune_magnitude_strided_weights_pruned_in_place():
    torch.manual_seed(4)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    # b's fc weight: the same values in a transposed (non-contiguous) layout
    b.fc.weight = torch.nn.Parameter(b.fc.weight.detach().t().contiguous().t())
    assert not b.fc.weight.is_contiguous()
    ra = prune_magnitude(a, sparsity=0.6, scope="global")
    rb = prune_magnitude(b, sparsity=0.6, scope="global")
    assert ra.thresholds == rb.thresholds
    assert not b.fc.weight.is_contiguous()  # pruned where it lives, layout kept
    for n in ("conv.weight", "fc.weight"):
        assert torch.equal(a.get_parameter(n), b.get_parameter(n)), n
    assert int((b.fc.weight == 0).sum()) + int((b.conv.weight == 0).sum()) == rb.pruned


# ---------------------------------------------------------------- CUDA: parity with the CPU op
def _mixed(seed, sizes, dtypes, ties):
    """Tensors of `sizes`, dtypes cycling through `dtypes`."""
    return [t.to(dtypes[i % len(dtypes)]) for i, t in enumerate(_tensors(seed, sizes, torch.float64, ties))]


def cuda_matches_cpu(gpu, ts, ks, offset=0):
    """Select and prune on the CUDA side (`gpu`, views `offset` elements into their buffers:
    the kernels' scalar head and tail) give the CPU's answers, bit for bit."""
    for k in ks:
        sel = ops.magnitude_threshold(ts, k)
        dev = [gpu.put(t, offset) for t in ts]
        assert offset == 0 or all(d.data_ptr() % 16 != 0 for d in dev)
        work = [t.clone() for t in ts]
        assert ops.prune_smallest(work, k) == sel
        with gpu.run():
            assert ops.magnitude_threshold(dev, k) == sel, k
            assert ops.prune_smallest(dev, k) == sel
        for got, want in zip(dev, work):
            got = got.cpu()
            assert torch.equal(got == 0, want == 0), k  # the same weights pruned
            assert torch.equal(got, want), k


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float64], [torch.float16], [torch.bfloat16],
                                    [torch.float16, torch.float32, torch.bfloat16], [torch.bfloat16, torch.float64]],
                         ids=["f32", "f64", "f16", "bf16", "mixed16-32", "mixed-64"])
@pytest.mark.parametrize("sizes", [[1], [7, 0, 300], [16384, 16385, 0, 5], [70_000, 3, 50_001]])
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_select_and_prune_equal_cpu(gpu, dtypes, sizes, ties):
    ts = _mixed(sum(sizes) + 7, sizes, dtypes, ties)
    total = sum(sizes)
    cuda_matches_cpu(gpu, ts, sorted({1, total, max(1, total // 2), max(1, total // 3), max(1, total - 1)}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_candidate_buffer_paths(gpu, dtype):
    # the passes after the second read a buffer of the candidates (at most max(16384,
    # total/16) keys): one chunk whose 16384 weights are all candidates (more than a
    # block's stage: the rest go to the buffer one by one), and candidates that overflow
    # the buffer (the later passes walk the weights again)
    g = torch.Generator().manual_seed(11)
    dense = 1.0 + torch.rand(16384, generator=g, dtype=torch.float64) * 2.0 ** -5  # one top-11-bit bucket
    spread = 10.0 ** (torch.rand(60_000, generator=g, dtype=torch.float64) * 16 - 8)
    ts = [spread[:30_000].to(dtype), dense.to(dtype), spread[30_000:].to(dtype)]
    below = int((spread < 1.0).sum())
    cuda_matches_cpu(gpu, ts, [below + 1, below + 8000, below + 16384, 5, 76_384])
    crowd = [(1.0 + torch.rand(n, generator=g, dtype=torch.float64) * 2.0 ** -5).to(dtype) for n in (40_000, 9)]
    cuda_matches_cpu(gpu, crowd, [1, 20_000, 40_009])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_views_and_partial_ties(gpu, dtype):
    # views 1 element into their buffers: the kernels' unaligned head and tail; ties at
    # every level, so k in the middle of a level prunes only the first ties, in order
    ts = _mixed(8, [40_000, 17, 33_333], [dtype], ties=True)
    total = sum(t.numel() for t in ts)
    flat = torch.cat([t.double().abs() for t in ts])
    level = float(flat.sort().values[total // 2])
    below, equal = int((flat < level).sum()), int((flat == level).sum())
    cuda_matches_cpu(gpu, ts, [below + 1, below + equal // 2, below + equal - 1, total // 5], offset=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_special_values(gpu, dtype):
    t = torch.randn(5000, dtype=torch.float64).to(dtype)
    t[::7] = 0.0
    t[3::11] = -0.0
    t[5::13] = float("inf")
    t[6::17] = -float("inf")
    t[8::19] = float("nan")
    t[9::23] = torch.finfo(dtype).tiny / 4  # subnormal
    ts = [t[:1234], t[1234:1235], t[1235:]]
    for k in (1, 600, 2500, 4500, 4700, 4990, 5000):
        want = ops.magnitude_threshold(ts, k)
        work, dev = [x.clone() for x in ts], [gpu.put(x) for x in ts]
        ops.prune_smallest(work, k)
        with gpu.run():
            got = ops.magnitude_threshold(dev, k)
            ops.prune_smallest(dev, k)
        assert got[1:] == want[1:] and (got[0] == want[0] or (got[0] != got[0] and want[0] != want[0])), k
        for g, w in zip(dev, work):
            assert torch.equal(g.cpu() == 0, w == 0), k
            assert torch.equal(g.cpu().nan_to_num(7.0), w.nan_to_num(7.0)), k


@pytest.mark.parametrize("kind", ["normal", "levels", "zeros"])
def test_cuda_float32_bitwise_equals_cpu_fast_path(gpu, kind):
    # 1.3M float32: the CPU takes its sampled fast path; results, pruned bits included
    # (-0.0 ties at a zero threshold too), are the same
    g = torch.Generator().manual_seed(12)
    ts = [torch.randn(n, generator=g) * (0.01 + i) for i, n in enumerate([600_000, 1, 0, 700_003])]
    if kind == "levels":  # ~1300 ties per level: partial ties
        ts = [torch.round(t * 100) / 100 for t in ts]
    elif kind == "zeros":
        for t in ts:
            t[: t.numel() // 2] = 0.0
            t[: t.numel() // 8] = -0.0
    total = sum(t.numel() for t in ts)
    for k in (1, total // 3, total // 2, total):
        work, dev = [t.clone() for t in ts], [gpu.put(t) for t in ts]
        want = ops.prune_smallest(work, k)
        with gpu.run():
            assert ops.prune_smallest(dev, k) == want, k
        for got, want in zip(dev, work):
            assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32)), k


@requires_cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        ops.magnitude_threshold([torch.randn(3), torch.randn(3, device="cuda")], 1)
    with pytest.raises(ValueError, match="contiguous"):
        ops.prune_smallest([torch.randn(4, 4, device="cuda").t()], 1)


@requires_cuda
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_magnitude_cuda_equals_cpu(scope):
    torch.manual_seed(5)
    cpu = Net()
    gpu = Net().cuda()
    gpu.load_state_dict(cpu.state_dict())
    gpu.fc.weight = torch.nn.Parameter(gpu.fc.weight.detach().t().contiguous().t())  # strided on the GPU
    rc = prune_magnitude(cpu, sparsity=0.7, scope=scope)
    rg = prune_magnitude(gpu, sparsity=0.7, scope=scope)
    assert rc.thresholds == rg.thresholds and rc.pruned == rg.pruned
    for name, value in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[name].cpu(), value), name


def test_in_place_writes_bump_version_counters():
    # autograd must see that a tensor it saved was changed by the native op
    w = torch.randn(100, requires_grad=True)
    y = w * 1.0
    z = (y * y).sum()  # saves y for the backward
    before = y._version
    ops.prune_smallest([y.detach()], 10)
    assert y._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    with torch.inference_mode():
        t = torch.randn(50)
    ops.prune_smallest([t], 5)  # inference tensors have no counter: no error
    assert int((t == 0).sum()) >= 5


# ---------------------------------------------------------------- the capturable select (no host sync)
@pytest.mark.parametrize("dtypes", [[torch.float32, torch.float16, torch.bfloat16], [torch.float32, torch.float64]],
                         ids=["32-bit keys", "64-bit keys"])
def test_selector_matches_the_cpu_select(gpu_side, dtypes):
    """MagnitudeSelector (table and scratch from torch, the result left on the device) gives
    magnitude_threshold's answers, and sees the tensors' new values on the next call."""
    ts = _mixed(5, [30_000, 9, 20_001], dtypes, ties=True)
    dev = [gpu_side.put(t, 1) for t in ts]
    with gpu_side.run():
        selector = ops.MagnitudeSelector(dev)
        for k in (1, 17, 25_000, 50_010):
            thr, counts = selector.select(k)
            assert thr.device == dev[0].device and counts.device == dev[0].device
            assert (float(thr), *counts.tolist()) == ops.magnitude_threshold(ts, k), k
        for d in dev:
            d.mul_(-2)  # new values, same storage
        thr, counts = selector.select(25_000)
        with pytest.raises(ValueError, match="k must be an integer in"):
            selector.select(50_011)
    assert (float(thr), *counts.tolist()) == ops.magnitude_threshold([t * -2 for t in ts], 25_000)


def test_selector_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.MagnitudeSelector([torch.ones(3)])
