"""Per-channel activation statistics: the native op nnmark.ops.channel_stats against a
float64 torch reference (every device, dtype, layout and CPU SIMD path), and the hook
recorder nnmark.attacks.ChannelStats / channel_activations on a small CNN."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import num_threads, requires_cuda
from nnmark import _C_cpu
from nnmark.attacks import ChannelActivations, ChannelStats, channel_activations
from nnmark.ops import channel_stats

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]
# The native op reads rows of S >= 48 one by one, shorter rows (with >= 4 samples) and
# [B, C] / channels-last data as columns; the shapes cover both, their tails and blocks.
SHAPES = [
    (4, 8, 5, 7),       # conv output, odd spatial size (short rows)
    (6, 10),            # linear output [B, C]: S = 1
    (3, 5, 11),         # 1-d conv output [B, C, L]
    (2, 1, 3, 3),       # C = 1
    (1, 3, 1, 1),       # S = 1 in 4-d
    (5, 17, 13, 3),     # odd everything
    (3, 5, 7, 9),       # rows of 63: a full vector, a partial one
    (6, 16, 7, 7),      # rows of 49 (ResNet-50's last block)
    (130, 3, 4, 4),     # many samples, tiny rows
    (1, 2, 130, 131),   # rows longer than one native segment (16384)
    (40, 2050),         # more channels than one native channel block (2048)
    (2, 3, 2, 2, 5),    # 3-d conv output
    (7, 300, 3, 3),     # short rows over several column blocks
    (2, 2000, 40),      # short rows, too few samples for the columns loop
    (200, 8, 8, 8),     # several batch blocks
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _activation(shape, dtype, device, zeros=True):
    """Random activations with exact zeros (and negative zeros) among them: not positive."""
    x = torch.randn(shape, dtype=torch.float64) * 3
    if zeros:
        x[x.abs() < 0.3] = 0.0
        x[(x.abs() < 0.6) & (x.abs() >= 0.3)] = -0.0
    return x.to(dtype).to(device)


def _reference(x: torch.Tensor):
    """float64 per-channel sums and counts of x > 0 over all dims but 1."""
    dims = [d for d in range(x.dim()) if d != 1]
    xd = x.double().cpu()
    return xd.sum(dim=dims), (xd > 0).sum(dim=dims)


def _check(sums, positives, x, base_sums=None, base_pos=None):
    ref_s, ref_p = _reference(x)
    if base_sums is not None:
        ref_s, ref_p = ref_s + base_sums, ref_p + base_pos
    assert sums.dtype == torch.float64 and positives.dtype == torch.int64
    assert sums.shape == (x.shape[1],) and positives.shape == (x.shape[1],)
    assert torch.equal(positives.cpu(), ref_p)
    # Exact widening + float64 adds: only float64 rounding separates the two.
    dims = [d for d in range(x.dim()) if d != 1]
    scale = x.double().abs().sum(dim=dims).cpu() + 1.0
    assert torch.all((sums.cpu() - ref_s).abs() <= 1e-13 * scale), (sums.cpu() - ref_s).abs().max()


# ---------------------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(backend, shape, dtype):
    x = _activation(shape, dtype, backend)
    sums, positives = channel_stats(x)
    assert sums.device == x.device and positives.device == x.device
    _check(sums, positives, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["nhwc", "nlc", "ndhwc", "strided"])
def test_channels_last_and_strided_layouts(backend, layout, dtype):
    if layout == "nhwc":
        x = _activation((3, 19, 6, 5), dtype, backend).contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    elif layout == "nlc":  # [B, L, C] memory seen as [B, C, L]
        x = _activation((4, 23, 7), dtype, backend).transpose(1, 2)
    elif layout == "ndhwc":
        x = _activation((2, 6, 3, 4, 5), dtype, backend).contiguous(memory_format=torch.channels_last_3d)
    else:  # neither layout: copied first
        x = _activation((4, 12, 9, 8), dtype, backend)[:, ::2, :, 1:]
    sums, positives = channel_stats(x)
    _check(sums, positives, x)
    # The same numbers as the contiguous copy (the count exactly).
    s2, p2 = channel_stats(x.contiguous())
    assert torch.equal(p2, positives)
    assert torch.allclose(s2, sums, rtol=1e-13, atol=1e-13)


def test_float64_accumulation_keeps_small_terms(backend):
    """2^24 + 1 + 1 + ... is exact in float64 but stuck at 2^24 in float32 adds."""
    x = torch.ones(3, 2, 1000, dtype=torch.float32)
    x[0, 0, 0] = 2.0 ** 24
    x[1, 1, 0] = -(2.0 ** 24)
    sums, positives = channel_stats(x.to(backend))
    assert sums.tolist() == [2.0 ** 24 + 2999.0, -(2.0 ** 24) + 2999.0]
    assert positives.tolist() == [3000, 2999]


def test_nan_and_inf(backend):
    x = torch.tensor([[[1.0, float("nan"), 2.0]], [[float("inf"), -1.0, 0.5]]]).to(backend)  # [2, 1, 3]
    sums, positives = channel_stats(x)
    assert torch.isnan(sums[0]) and positives.tolist() == [4]  # NaN is not positive
    sums, positives = channel_stats(x.nan_to_num(nan=0.0, posinf=float("inf")))
    assert sums.tolist() == [float("inf")] and positives.tolist() == [4]


# ---------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("shape", [(8, 6, 5, 5), (9, 33), (4, 3, 70, 70)], ids=["conv", "linear", "big-rows"])
def test_accumulates_in_place_over_batches(backend, shape):
    xs = [_activation(shape, torch.float32, backend) for _ in range(4)]
    sums, positives = channel_stats(xs[0])
    ptr_s, ptr_p = sums.data_ptr(), positives.data_ptr()
    for x in xs[1:]:
        out = channel_stats(x, sums, positives)
        assert out[0] is sums and out[1] is positives  # the same tensors, added to
    assert sums.data_ptr() == ptr_s and positives.data_ptr() == ptr_p
    _check(sums, positives, torch.cat(xs))


def test_adds_to_given_accumulators(backend):
    x = _activation((5, 7, 4, 4), torch.bfloat16, backend)
    base_s = torch.linspace(-3, 3, 7, dtype=torch.float64)
    base_p = torch.arange(7, dtype=torch.int64) * 1000
    sums, positives = channel_stats(x, base_s.clone().to(backend), base_p.clone().to(backend))
    _check(sums, positives, x, base_s, base_p)


def test_empty_batch_adds_nothing(backend):
    sums, positives = channel_stats(torch.zeros(0, 4, 3, 3, device=backend))
    assert sums.tolist() == [0.0] * 4 and positives.tolist() == [0] * 4


@pytest.mark.parametrize("shape,channels_last", [((64, 32, 20, 20), False), ((4096, 300), False),
                                                 ((16, 40, 30, 30), True), ((1, 3, 200, 300), False),
                                                 ((512, 64, 3, 3), False)],
                         ids=["rows", "linear", "nhwc", "long-rows", "short-rows"])
def test_threads_do_not_change_the_result(isa, shape, channels_last):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with num_threads(1):
        one = channel_stats(x)
    for n in (2, 3, 7):
        with num_threads(n):
            many = channel_stats(x)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1]), n


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES + [(64, 256, 14, 14)], ids=SHAPE_IDS + ["resnet"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cpu_cuda_parity(gpu, shape, dtype, layout):
    if gpu.name == "cudasim" and len(shape) == 4 and shape[0] * shape[1] >= 64 * 256 and dtype != torch.float32:
        pytest.skip("the largest shape runs on the simulator for float32 only (time)")
    x = _activation(shape, dtype, "cpu")
    if layout == "nhwc":
        if len(shape) != 4:
            pytest.skip("channels-last needs [B, C, H, W]")
        x = x.contiguous(memory_format=torch.channels_last)
    cs, cp = channel_stats(x)
    xd = gpu.put(x.contiguous()) if layout == "nchw" else gpu.put(x.contiguous()).contiguous(
        memory_format=torch.channels_last)
    with gpu.run():
        gs, gp = channel_stats(xd)
        again = channel_stats(xd)[0]
    assert torch.equal(cp, gp.cpu())
    assert torch.allclose(cs, gs.cpu(), rtol=1e-13, atol=1e-13)
    assert torch.equal(gs, again)  # run to run: bit for bit


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("x,exc,match", [
    (torch.ones(3, 4, dtype=torch.int32), TypeError, "float32, float64, float16 or bfloat16"),
    (torch.ones(3, 4, dtype=torch.bool), TypeError, "got torch.bool"),
    (torch.ones(5), ValueError, r"at least 2 dims\), got shape \[5\]"),
    (torch.tensor(1.0), ValueError, "at least 2 dims"),
    (torch.ones(3, 0, 2), ValueError, "no channels"),
    (torch.ones(2, 3, device="meta"), ValueError, "expected a cpu or cuda tensor"),
    ([[1.0, 2.0]], TypeError, "activation x must be a torch tensor, numpy array or cupy array"),
], ids=["int", "bool", "1d", "0d", "no-channels", "meta", "list"])
def test_rejected_inputs(x, exc, match):
    with pytest.raises(exc, match=match):
        channel_stats(x)


@pytest.mark.parametrize("sums,positives,exc,match", [
    (torch.zeros(4, dtype=torch.float32), None, TypeError, "sums must be torch.float64"),
    (None, torch.zeros(4, dtype=torch.int32), TypeError, "positives must be torch.int64"),
    (torch.zeros(5, dtype=torch.float64), None, ValueError, r"sums must have shape \[4\].*got \[5\]"),
    (None, torch.zeros(1, 4, dtype=torch.int64), ValueError, r"positives must have shape \[4\]"),
    (torch.zeros(8, dtype=torch.float64)[::2], None, ValueError, "sums must be contiguous"),
    ([0.0] * 4, None, TypeError, "sums must be a torch tensor"),
    (np.zeros(4), None, TypeError, "got ndarray"),
], ids=["sums-f32", "pos-i32", "sums-shape", "pos-shape", "sums-strided", "sums-list", "sums-numpy"])
def test_rejected_accumulators(sums, positives, exc, match):
    with pytest.raises(exc, match=match):
        channel_stats(torch.ones(2, 4, 3), sums, positives)


@requires_cuda
def test_accumulators_must_be_on_the_device_of_x():
    with pytest.raises(ValueError, match="sums is on cpu but x is on cuda"):
        channel_stats(torch.ones(2, 4, device="cuda"), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positives is on cuda:0 but x is on cpu"):
        channel_stats(torch.ones(2, 4), None, torch.zeros(4, dtype=torch.int64, device="cuda"))


def test_numpy_input():
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    sums, positives = channel_stats(x)
    _check(sums, positives, torch.from_numpy(x))


def test_native_checks():
    s, p = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        _C_cpu.channel_stats(x.data_ptr(), 0, 0, 2, 1, False, s.data_ptr(), p.data_ptr())
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        _C_cpu.channel_stats(x.data_ptr(), 7, 3, 2, 1, False, s.data_ptr(), p.data_ptr())
    with pytest.raises(ValueError, match="null data pointer"):
        _C_cpu.channel_stats(x.data_ptr(), 0, 3, 2, 1, False, 0, p.data_ptr())


# ---------------------------------------------------------------------------- hook recorder
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).flatten(1)))


def _model(device):
    torch.manual_seed(0)
    m = SmallCNN().to(device)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval and train differ
        m.features[3].running_mean.uniform_(-0.5, 0.5)
        m.features[3].running_var.uniform_(0.5, 2.0)
    return m


def _outputs(model, module, xs):
    """The module's outputs on the batches, by a plain torch hook (eval mode, no grad)."""
    outs = []
    h = module.register_forward_hook(lambda m, i, o: outs.append(o.detach().double().cpu()))
    try:
        model.eval()
        with torch.no_grad():
            for x in xs:
                model(x)
    finally:
        h.remove()
    return torch.cat(outs)


@pytest.mark.parametrize("name", ["features.0", "features.4", "fc"])
def test_channel_stats_hook_matches_torch(device, name):
    model = _model(device)
    module = dict(model.named_modules())[name]
    xs = [torch.randn(b, 3, 8, 8, device=device) for b in (5, 7, 1)]
    ref = _outputs(model, module, xs)
    dims = [d for d in range(ref.dim()) if d != 1]
    with ChannelStats(module) as st:
        assert st.batches == 0 and st.count == 0
        with torch.no_grad():
            for x in xs:
                model(x)
    assert st.batches == 3 and st.count == ref.numel() // ref.shape[1]
    for got in (st.mean, st.frac_positive, st.sums):
        assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (ref.shape[1],)
    assert torch.allclose(st.mean, ref.mean(dim=dims), rtol=1e-12, atol=1e-12)
    assert torch.equal(st.positives, (ref > 0).sum(dim=dims))
    assert torch.allclose(st.frac_positive, (ref > 0).double().mean(dim=dims), rtol=1e-15, atol=0)
    if name == "features.4":  # after a ReLU: no negative means, and dead channels are exactly 0
        assert bool((st.mean >= 0).all())
    # The hook is gone: more forward passes change nothing.
    with torch.no_grad():
        model(xs[0])
    assert st.batches == 3


def test_channel_stats_remove_and_errors():
    model = _model("cpu")
    st = ChannelStats(model.fc)
    with pytest.raises(RuntimeError, match="Linear has not produced any output"):
        st.mean
    with pytest.raises(RuntimeError, match="run the model on some data first"):
        st.frac_positive
    model(torch.randn(2, 3, 8, 8))
    assert st.batches == 1 and st.count == 2
    st.remove()
    st.remove()  # twice is fine
    model(torch.randn(2, 3, 8, 8))
    assert st.batches == 1

    with pytest.raises(TypeError, match="needs a torch.nn.Module, got Tensor"):
        ChannelStats(torch.ones(3))

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with ChannelStats(Pair()) as st, pytest.raises(TypeError, match="Pair returned a tuple; expected a tensor"):
        st.module(torch.ones(2, 3))
    ident = nn.Identity()
    with ChannelStats(ident):
        with pytest.raises(ValueError, match=r"returned shape \[4\]"):
            ident(torch.ones(4))
        ident(torch.ones(2, 3))
        with pytest.raises(ValueError, match="returned 5 channels after 3 in earlier batches"):
            ident(torch.ones(2, 5))


def _data_forms(x, y):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    return {"pair": (x, y), "x": x, "numpy-pair": (x.numpy(), y.numpy()), "x-numpy": x.numpy(),
            "loader": loader, "list": [(x[i:i + 4], y[i:i + 4]) for i in range(0, len(x), 4)]}


def test_channel_activations_every_data_form():
    model = _model("cpu")
    x, y = torch.randn(23, 3, 8, 8), torch.randint(0, 10, (23,))
    ref = _outputs(model, model.features[4], [x])
    expect_mean, expect_frac = ref.mean(dim=(0, 2, 3)), (ref > 0).double().mean(dim=(0, 2, 3))
    model.train()
    for form, data in _data_forms(x, y).items():
        r = channel_activations(model, "features.4", data, batch_size=5)
        assert isinstance(r, ChannelActivations) and r.layer == "features.4", form
        assert r.count == 23 * 8 * 8 and r.mean.dtype == torch.float64, form
        # Eval mode (batch-norm running statistics, no dropout): equal to the reference.
        assert torch.allclose(r.mean, expect_mean, rtol=1e-12, atol=1e-12), form
        assert torch.allclose(r.frac_positive, expect_frac, rtol=1e-15, atol=0), form
        assert model.training, form  # the training flag is restored
    # The module itself names the same layer.
    r = channel_activations(model, model.features[4], (x, y))
    assert r.layer == "features.4" and torch.allclose(r.mean, expect_mean, rtol=1e-12, atol=1e-12)
    # Dormant channels rank first, as fine-pruning uses them.
    assert torch.equal(torch.argsort(r.mean, stable=True), torch.argsort(expect_mean, stable=True))


@requires_cuda
def test_channel_activations_on_cuda():
    model = _model("cuda")
    x, y = torch.randn(30, 3, 8, 8), torch.randint(0, 10, (30,))
    r = channel_activations(model, "fc", (x, y), batch_size=8)  # data moved to the model's device
    ref = _outputs(model.cpu(), model.fc, [x])
    assert torch.allclose(r.mean, ref.mean(dim=0), rtol=1e-6, atol=1e-6)  # CPU vs GPU convolutions
    assert r.count == 30


def test_channel_activations_errors():
    model = _model("cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"layer 'conv9' is not a module of the model; named modules: 'features'"):
        channel_activations(model, "conv9", x)
    with pytest.raises(ValueError, match="the given Conv2d is not a submodule of the model"):
        channel_activations(model, nn.Conv2d(3, 3, 1), x)
    with pytest.raises(TypeError, match="layer must be a module name"):
        channel_activations(model, 3, x)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        channel_activations("model", "fc", x)
    model.unused = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="layer 'unused' produced no output"):
        channel_activations(model, "unused", x)
    with pytest.raises(ValueError, match="data is empty"):
        channel_activations(model, "fc", x[:0])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        channel_activations(model, "fc", x, batch_size=0)
    with pytest.raises(TypeError, match="must be an .x, y. pair of tensors or an iterable"):
        channel_activations(model, "fc", 42)
    assert model.training  # restored after the failures too


def test_accumulators_version_counters_are_bumped():
    sums, positives = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
    vs, vp = sums._version, positives._version
    channel_stats(torch.randn(4, 3, 5), sums, positives)
    assert sums._version > vs and positives._version > vp
