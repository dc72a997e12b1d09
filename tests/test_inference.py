"""Trigger-set inference across checkpoints: model factories, sources of every
kind, bad files, foreign architectures, buffers, model reuse, the CUDA graph."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from conftest import requires_cuda
from nnmark.checkpoints import CheckpointError
from nnmark.demo import DigitsNet
from nnmark.inference import TriggerRunner, load_factory, trigger_logits

NUM_CLASSES = 10


class Net(nn.Module):
    """A small CNN for 3x8x8 inputs with buffers (BatchNorm running statistics)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 4 * 4, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(self.features(x))


class WideNet(Net):
    """Same tensor names as Net, other shapes."""

    def __init__(self):
        super().__init__(width=12)


def make_net(seed: int) -> Net:
    """A Net with random weights AND random BatchNorm statistics / affine (so buffers matter)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net()
    bn = net.features[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.1)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.num_batches_tracked.fill_(seed)
    return net.eval()


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


@torch.no_grad()
def direct(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.eval()(x).float()


@pytest.fixture
def x():
    return torch.rand(16, 3, 8, 8)


def _assert_rows(logits, errors, expected: dict[int, torch.Tensor]):
    for k, want in expected.items():
        assert errors[k] is None, f"source {k}: {errors[k]}"
        assert torch.allclose(logits[k], want, rtol=1e-5, atol=1e-5), f"source {k}: logits differ"


# ============================================================== load_factory
def test_factory_callable_is_returned_as_is():
    assert load_factory(Net) is Net
    fn = lambda: Net()  # noqa: E731
    assert load_factory(fn) is fn


def test_factory_module_function():
    f = load_factory("nnmark.demo:DigitsNet")
    assert f is DigitsNet
    assert isinstance(f(), DigitsNet)


def test_factory_file_function(tmp_path):
    path = tmp_path / "my_arch.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    """))
    f = load_factory(f"{path}:build")
    m = f()
    assert isinstance(m, nn.Sequential) and m[1].weight.shape == (3, 12)
    # and it runs end to end
    sd = state(m)
    xx = torch.rand(5, 3, 2, 2)
    logits, errors = trigger_logits(f"{path}:build", [sd], xx)
    assert errors == [None]
    assert torch.allclose(logits[0], direct(m, xx))


@pytest.mark.parametrize("spec, match", [
    (42, r"callable or 'module:function'.*42"),
    (None, r"callable or 'module:function'.*None"),
    ("nnmark.demo.DigitsNet", r"'module:function'.*nnmark\.demo\.DigitsNet"),   # no colon
    ("a:b:c", r"'module:function'.*a:b:c"),                                     # two colons
    ("nnmark_no_such_module_xyz:f", r"cannot import arch module 'nnmark_no_such_module_xyz'"),
    ("nnmark.demo:NoSuchNet", r"no callable 'NoSuchNet'"),
    ("nnmark.demo:CARRIER", r"no callable 'CARRIER'"),                           # exists, not callable
    ("nnmark.demo:", r"no callable ''"),
])
def test_factory_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_factory(spec)


def test_factory_missing_file(tmp_path):
    spec = f"{tmp_path / 'nope.py'}:build"
    with pytest.raises(ValueError, match=r"arch file .*nope\.py.* does not exist"):
        load_factory(spec)


def test_factory_file_without_function(tmp_path):
    path = tmp_path / "arch_nofn.py"
    path.write_text("X = 1\n")
    with pytest.raises(ValueError, match=r"no callable 'build'"):
        load_factory(f"{path}:build")


def test_factory_file_that_fails_to_execute(tmp_path):
    """An arch file that cannot be executed is a bad spec too: ValueError naming the file and the cause,
    not a bare SyntaxError/NameError from deep inside importlib; and no half-initialised module is left
    in sys.modules."""
    path = tmp_path / "arch_broken.py"
    path.write_text("def build(:\n    pass\n")
    with pytest.raises(ValueError, match=r"arch_broken\.py"):
        load_factory(f"{path}:build")
    assert "nnmark_arch_arch_broken" not in sys.modules


# ============================================================== sources of every kind
def _write_sources(tmp_path, nets):
    """Five checkpoints of Net, one per format. Returns (sources, expected rows by index)."""
    sds = [state(n) for n in nets]
    st = tmp_path / "a.safetensors"
    save_file(sds[0], str(st))
    pt = tmp_path / "b.pt"
    torch.save(sds[1], pt)
    ckpt = tmp_path / "c.ckpt"  # Lightning-style: under "state_dict", names prefixed
    torch.save({"epoch": 7, "global_step": 123, "state_dict": {"module." + k: v for k, v in sds[2].items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}, ckpt)
    in_memory = sds[3]
    module = nets[4]
    return [st, str(pt), ckpt, in_memory, module]


def test_mixed_sources_equal_direct(tmp_path, x):
    nets = [make_net(s) for s in range(5)]
    sources = _write_sources(tmp_path, nets)
    want = [direct(n, x) for n in nets]
    logits, errors = trigger_logits(Net, sources, x)
    assert logits.shape == (5, 16, NUM_CLASSES) and logits.dtype == torch.float32
    assert errors == [None] * 5
    _assert_rows(logits, errors, dict(enumerate(want)))
    # rows really differ between checkpoints (not one model's output five times)
    assert not torch.allclose(logits[0], logits[1])


def test_in_memory_prefixed_and_superset_state_dicts(x):
    nets = [make_net(s) for s in range(3)]
    sources = [
        {"_orig_mod." + k: v for k, v in state(nets[0]).items()},        # torch.compile prefix
        {"model." + k: v for k, v in state(nets[1]).items()},            # Lightning prefix
        {**state(nets[2]), "extra.head.weight": torch.zeros(3, 3)},       # extra tensors are ignored
    ]
    logits, errors = trigger_logits(Net, sources, x)
    _assert_rows(logits, errors, {k: direct(n, x) for k, n in enumerate(nets)})


def test_module_sources_only_need_no_factory(x):
    nets = [make_net(s) for s in range(2)]
    logits, errors = trigger_logits(None, nets, x)
    _assert_rows(logits, errors, {k: direct(n, x) for k, n in enumerate(nets)})


def test_string_factory_end_to_end():
    x = torch.rand(7, 1, 8, 8)
    nets = []
    for s in range(3):
        torch.manual_seed(100 + s)
        nets.append(DigitsNet().eval())
    logits, errors = trigger_logits("nnmark.demo:DigitsNet", [state(n) for n in nets], x)
    _assert_rows(logits, errors, {k: direct(n, x) for k, n in enumerate(nets)})


def test_float64_and_float16_checkpoints_are_cast(x):
    net = make_net(3)
    sd64 = {k: (v.double() if v.is_floating_point() else v) for k, v in state(net).items()}
    sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in state(net).items()}
    logits, errors = trigger_logits(Net, [sd64, sd16], x)
    assert errors == [None, None]
    assert torch.allclose(logits[0], direct(net, x), atol=1e-5)
    ref16 = Net().eval()
    ref16.load_state_dict(sd16)  # torch casts the half tensors to float32 the same way
    assert torch.allclose(logits[1], direct(ref16, x), atol=1e-5)


# ============================================================== bad files
def _bad_files(tmp_path, sd):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all\n" * 20)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    good_st = tmp_path / "full.safetensors"
    save_file(sd, str(good_st))
    data = good_st.read_bytes()
    trunc_st = tmp_path / "truncated.safetensors"
    trunc_st.write_bytes(data[: len(data) // 2])
    good_pt = tmp_path / "full.pt"
    torch.save(sd, good_pt)
    data = good_pt.read_bytes()
    trunc_pt = tmp_path / "truncated.pt"
    trunc_pt.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "missing.safetensors"
    directory = tmp_path / "a_directory.pt"
    directory.mkdir()
    return {"garbage": (garbage, "unsupported"), "empty": (empty, "corrupt"),
            "truncated safetensors": (trunc_st, "corrupt"), "truncated torch": (trunc_pt, "corrupt"),
            "missing": (missing, "io_error"), "directory": (directory, "io_error")}


def test_bad_files_give_error_rows_and_the_rest_is_right(tmp_path, x):
    nets = [make_net(s) for s in range(3)]
    bad = _bad_files(tmp_path, state(nets[0]))
    good_paths = []
    for k, n in enumerate(nets):
        p = tmp_path / f"good{k}.safetensors"
        save_file(state(n), str(p))
        good_paths.append(p)
    # interleaved: a bad file first, then good, bad, good, bad, ... (a bad file last too)
    sources, expect_ok, expect_bad = [], {}, {}
    for i, (path, status) in enumerate(bad.values()):
        if i:
            expect_ok[len(sources)] = direct(nets[i % 3], x)
            sources.append(good_paths[i % 3])
        expect_bad[len(sources)] = (path, status)
        sources.append(path)
    logits, errors = trigger_logits(Net, sources, x)
    assert logits.shape == (len(sources), 16, NUM_CLASSES)
    _assert_rows(logits, errors, expect_ok)
    for k, (path, status) in expect_bad.items():
        assert isinstance(errors[k], CheckpointError), f"{path.name}: no error"
        assert errors[k].status == status, f"{path.name}: status {errors[k].status!r}, expected {status!r}: {errors[k]}"
        assert path.name in str(errors[k])
        assert torch.isnan(logits[k]).all()


def test_all_sources_bad(tmp_path, x):
    bad = _bad_files(tmp_path, state(make_net(0)))
    logits, errors = trigger_logits(Net, [p for p, _ in bad.values()], x)
    assert logits is None
    assert [e.status for e in errors] == [s for _, s in bad.values()]


def test_no_sources(x):
    logits, errors = trigger_logits(Net, [], x)
    assert logits is None and errors == []


# ============================================================== other architectures
def test_foreign_architecture_is_invalid(tmp_path, x):
    good = make_net(1)
    torch.manual_seed(0)
    digits = state(DigitsNet())                           # other tensor names: tensors missing
    wide = state(WideNet())                               # same names, other shapes
    partial = state(make_net(2))
    del partial["classifier.1.bias"]                      # one tensor missing
    reshaped = state(make_net(2))
    reshaped["classifier.1.weight"] = reshaped["classifier.1.weight"].reshape(-1)  # same numel, other shape
    ints = state(make_net(2))
    ints["features.0.weight"] = ints["features.0.weight"].to(torch.int32)          # not floating point
    save_file(wide, str(tmp_path / "wide.safetensors"))
    sources = [digits, tmp_path / "wide.safetensors", state(good), partial, reshaped, ints, state(good)]
    logits, errors = trigger_logits(Net, sources, x)
    want = direct(good, x)
    _assert_rows(logits, errors, {2: want, 6: want})
    for k in (0, 1, 3, 4, 5):
        assert errors[k] is not None and errors[k].status == "invalid", f"source {k}: {errors[k]!r}"
        assert torch.isnan(logits[k]).all()
    assert "missing" in str(errors[0]) and "missing" in str(errors[3]) and "classifier.1.bias" in str(errors[3])
    assert "shape" in str(errors[1]) and "shape" in str(errors[4]) and "classifier.1.weight" in str(errors[4])
    assert "int32" in str(errors[5])


# ============================================================== buffers, reuse
def test_buffers_are_loaded(x):
    """Two checkpoints that differ ONLY in the BatchNorm running statistics give different, right rows."""
    a = make_net(5)
    b = make_net(5)
    with torch.no_grad():
        b.features[1].running_mean.add_(1.5)
        b.features[1].running_var.mul_(2.0)
    wa, wb = direct(a, x), direct(b, x)
    assert not torch.allclose(wa, wb)
    logits, errors = trigger_logits(Net, [state(a), state(b), state(a)], x)
    _assert_rows(logits, errors, {0: wa, 1: wb, 2: wa})


def test_order_independent(tmp_path, x):
    nets = [make_net(s) for s in range(6)]
    sources = _write_sources(tmp_path, nets[:5]) + [state(nets[5])]
    fwd, e1 = trigger_logits(Net, sources, x)
    rev, e2 = trigger_logits(Net, sources[::-1], x)
    assert e1 == [None] * 6 and e2 == [None] * 6
    assert torch.allclose(fwd, rev.flip(0), rtol=1e-6, atol=1e-6)


def test_failed_load_does_not_leak_into_next(x):
    """A checkpoint that fails half-way through the copy (a bad shape in a late tensor) leaves nothing
    behind: the next checkpoint's row is exactly its own."""
    a, b = make_net(1), make_net(2)
    half = state(make_net(3))
    half["classifier.1.weight"] = torch.zeros(3, 3)  # early tensors are copied before this one fails
    logits, errors = trigger_logits(Net, [state(a), half, state(b)], x)
    assert errors[1].status == "invalid"
    _assert_rows(logits, errors, {0: direct(a, x), 2: direct(b, x)})


def test_runner_reuses_one_model(x):
    runner = TriggerRunner(Net, x)
    model = runner.model
    ptrs = {n: t.data_ptr() for n, t in runner.tensors.items()}
    outs = []
    for s in range(3):
        runner.load(state(make_net(s)))
        outs.append(runner.logits())
        assert runner.model is model
        assert {n: t.data_ptr() for n, t in runner.tensors.items()} == ptrs  # copied in place
    for s, o in enumerate(outs):
        assert torch.allclose(o, direct(make_net(s), x), rtol=1e-5, atol=1e-5)
    assert not model.training


def test_checkpoint_without_num_batches_tracked(x):
    """Checkpoints from torch < 0.4.1 (and some converters) lack BatchNorm's num_batches_tracked, which
    the eval forward never reads. torch's own load_state_dict accepts them (it fills in 0), so the
    plain torch loop runs them; nnmark should too."""
    net = make_net(4)
    sd = {k: v for k, v in state(net).items() if not k.endswith("num_batches_tracked")}
    ref = Net().eval()
    ref.load_state_dict(sd)  # torch accepts it
    logits, errors = trigger_logits(Net, [sd], x)
    assert errors == [None], errors
    assert torch.allclose(logits[0], direct(net, x), atol=1e-5)


class NetWithConstant(Net):
    """A Net with a non-persistent buffer (not part of state_dict(), like a positional table or a mask)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((NUM_CLASSES,), 2.0), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.scale


def test_non_persistent_buffers_are_not_required(tmp_path, x):
    """A checkpoint saved from the model's own state_dict() must load: non-persistent buffers are never
    in a state dict and keep the value the factory gives them."""
    torch.manual_seed(0)
    net = NetWithConstant().eval()
    path = tmp_path / "m.safetensors"
    save_file(state(net), str(path))
    logits, errors = trigger_logits(NetWithConstant, [state(net), path], x)
    assert errors == [None, None], errors
    assert torch.allclose(logits[0], direct(net, x), atol=1e-5)
    assert torch.allclose(logits[1], direct(net, x), atol=1e-5)


def test_module_source_mode_is_left_as_found(x):
    """Verifying a model in the middle of training must not switch it to eval mode for the rest of the
    training (BatchNorm statistics would freeze, dropout would stop)."""
    net = make_net(0).train()
    logits, errors = trigger_logits(None, [net], x)
    assert errors == [None]
    assert net.training, "trigger_logits left a module source in eval mode"
    assert torch.allclose(logits[0], direct(make_net(0), x), atol=1e-5)  # and it ran in eval mode


def test_progress_called_per_source(x):
    seen = []
    trigger_logits(Net, [state(make_net(s)) for s in range(4)], x, progress=seen.append)
    assert seen == [1, 2, 3, 4]


# ============================================================== CUDA graph
@requires_cuda
def test_cuda_graph_equals_eager(tmp_path, x):
    nets = [make_net(s) for s in range(6)]
    sources = _write_sources(tmp_path, nets[:5]) + [state(nets[5])]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint" * 8)
    half = state(make_net(9))
    half["classifier.1.weight"] = torch.zeros(3, 3)
    sources = sources[:2] + [bad, half] + sources[2:]
    xc = x.cuda()
    runner = TriggerRunner(Net, xc)
    assert runner.graph is not None  # the graph path is the default on CUDA
    graph, eg = trigger_logits(Net, sources, xc)
    eager, ee = trigger_logits(Net, sources, xc, cuda_graph=False)
    cpu, ec = trigger_logits(Net, sources, x)
    assert graph.is_cuda and eager.is_cuda
    assert [e and e.status for e in eg] == [e and e.status for e in ee] == [e and e.status for e in ec]
    assert [e and e.status for e in eg][2:4] == ["unsupported", "invalid"]
    ok = [k for k, e in enumerate(eg) if e is None]
    assert torch.allclose(graph[ok], eager[ok], rtol=1e-5, atol=1e-5)  # same kernels, same inputs
    assert torch.allclose(graph[ok].cpu(), cpu[ok], rtol=1e-2, atol=2e-2)  # TF32 convolutions allowed
    assert torch.isnan(graph[2:4]).all()
    # reversed order through the graph: the same rows
    rev, _ = trigger_logits(Net, sources[::-1], xc)
    assert torch.allclose(rev.flip(0)[ok], graph[ok], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- device errors fail the run
class _Failing(nn.Module):
    """A module source whose forward raises ``exc`` (a device error, mocked on the CPU)."""

    def __init__(self, exc: BaseException):
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.exc = exc

    def forward(self, x):
        raise self.exc


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("nnmark: CUDA error at x.cu:12 in `cudaMallocAsync(...)`: out of memory"),
], ids=["oom", "fault", "nnmark-oom"])
def test_device_errors_fail_the_run_instead_of_marking_the_checkpoint_invalid(x, exc):
    good = make_net(1)
    with pytest.raises(type(exc), match=str(exc)[:20]):
        trigger_logits(None, [good, _Failing(exc), good], x)


def test_other_runtime_errors_still_mark_only_that_checkpoint_invalid(x):
    good = make_net(1)
    logits, errors = trigger_logits(None, [good, _Failing(RuntimeError("mat1 and mat2 shapes cannot be multiplied")),
                                           good], x)
    assert errors[0] is None and errors[2] is None
    assert (errors[1].status, errors[1].error_class) == ("invalid", "InferenceError")
    assert torch.equal(logits[0], direct(good, x)) and torch.isnan(logits[1]).all()


def test_a_device_error_while_reading_ahead_fails_the_run(x, monkeypatch):
    from nnmark import inference

    def boom(self, sd):
        raise torch.OutOfMemoryError("CUDA out of memory while loading")

    monkeypatch.setattr(inference.TriggerRunner, "align", boom)
    with pytest.raises(torch.OutOfMemoryError):
        trigger_logits(lambda: make_net(0), [state(make_net(1))], x)


def test_the_model_is_built_once_across_calls(x):
    from nnmark import inference

    inference.clear_runner_cache()
    built = []

    def factory():
        built.append(1)
        return Net()

    a, b = make_net(1), make_net(2)
    first, errors = trigger_logits(factory, [state(a)], x)
    assert errors == [None]
    x2 = x + 0.5  # same shape and dtype: the kept model runs the new batch
    second, errors = trigger_logits(factory, [state(b), state(a)], x2)
    assert errors == [None, None] and len(built) == 1
    _assert_rows(first, [None], {0: direct(a, x)})
    _assert_rows(second, [None, None], {0: direct(b, x2), 1: direct(a, x2)})
    trigger_logits(factory, [state(a)], x[:1])  # another input shape: another model
    assert len(built) == 2
    inference.clear_runner_cache()
    trigger_logits(factory, [state(a)], x)
    assert len(built) == 3
