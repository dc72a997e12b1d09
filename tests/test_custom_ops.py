"""nnmark's native ops as torch custom ops (torch.ops.nnmark.*): opcheck for each op,
fake/meta tensors, a compiled training step with the penalty in one graph (zero
breaks, eager loss and gradients), torch.export, and PenaltyHook on a compiled model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nnmark
from nnmark import _custom_ops as cops
from nnmark import keys as keys_mod
from nnmark.integrations import PenaltyHook

SUBKEY = (0x243F6A88, 0x85A308D3)


def _opcheck(op, args):
    torch.library.opcheck(op, args)  # raises on a schema, fake, autograd or dispatch defect


# ------------------------------------------------------------------ opcheck, one op at a time
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("col0", [0, 300])
def test_opcheck_keyed_projection_and_its_transpose(dtype, col0):
    w = torch.randn(2, 40, dtype=dtype, requires_grad=True)
    _opcheck(cops.keyed_projection, (w, 70, *SUBKEY, col0))
    gp = torch.randn(2, 70, dtype=dtype, requires_grad=True)
    _opcheck(cops.keyed_projection_t, (gp, 40, *SUBKEY, col0))


def test_opcheck_keyed_projection_half_precision_carrier():
    _opcheck(cops.keyed_projection, (torch.randn(1, 33).to(torch.bfloat16).requires_grad_(), 16, *SUBKEY, 0))


def test_opcheck_many_keys():
    sk = torch.tensor([[1, 2], [3, 2**32 - 1]], dtype=torch.int64)
    _opcheck(cops.keyed_projection_many_keys, (torch.randn(50, dtype=torch.float64), sk, 20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_dense_projection_and_its_transpose(dtype):
    x = torch.randn(12, 30, dtype=dtype)
    _opcheck(cops.dense_projection, (torch.randn(3, 30, dtype=dtype, requires_grad=True), x))
    _opcheck(cops.dense_projection_t, (x, torch.randn(3, 12, dtype=dtype, requires_grad=True)))


def test_opcheck_trigger_verify():
    _opcheck(cops.trigger_verify, (torch.randn(2, 9, 5), torch.randint(0, 5, (9,)), 0.2))


def test_opcheck_magnitude_select_and_prune():
    ts = [torch.randn(7), torch.randn(3, 4)]
    _opcheck(cops.magnitude_select, (ts, 5))
    thr, counts = cops.magnitude_select(ts, 5)
    below, equal = counts.tolist()
    _opcheck(cops.magnitude_prune, ([t.clone() for t in ts], 5, float(thr), below, equal))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_channel_stats(channels_last):
    x = torch.randn(2, 4, 5)
    C = 5 if channels_last else 4
    _opcheck(cops.channel_stats, (x, channels_last, torch.zeros(C, dtype=torch.float64),
                                  torch.zeros(C, dtype=torch.int64)))


# ------------------------------------------------------------------ what the ops compute
def test_a_shard_with_its_global_column_offset_projects_its_part_of_the_carrier():
    w = torch.randn(3, 1000, dtype=torch.float64)
    whole = cops.keyed_projection(w, 130, *SUBKEY)
    parts = sum(cops.keyed_projection(w[:, a:b], 130, *SUBKEY, a) for a, b in ((0, 257), (257, 700), (700, 1000)))
    torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-9)
    g = torch.randn(3, 130, dtype=torch.float64)
    gw = cops.keyed_projection_t(g, 1000, *SUBKEY)
    torch.testing.assert_close(cops.keyed_projection_t(g, 443, *SUBKEY, 257), gw[:, 257:700])


def test_a_negative_column_offset_is_refused():
    with pytest.raises(ValueError, match="col0"):
        cops.keyed_projection(torch.randn(1, 10), 8, *SUBKEY, -1)


def test_fake_and_meta_tensors_get_shapes_without_touching_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = nnmark.WhiteBoxKey.generate(carrier="w", bits=48, reduction="flat")
    with FakeTensorMode():
        p = key.project(torch.randn(6, 7))
    assert p.shape == (48,) and p.dtype == torch.float32
    m = nnmark.keyed_projection(torch.empty(2, 90, device="meta", dtype=torch.float64), SUBKEY, 40)
    assert m.shape == (2, 40) and m.device.type == "meta" and m.dtype == torch.float64
    d = nnmark.dense_projection(torch.empty(90, device="meta"), torch.empty(5, 90, device="meta"))
    assert d.shape == (5,)


def test_numpy_input_still_works_and_matches_torch():
    w = np.random.default_rng(0).standard_normal(77).astype(np.float32)
    torch.testing.assert_close(nnmark.keyed_projection(w, SUBKEY, 33), nnmark.keyed_projection(torch.from_numpy(w),
                                                                                               SUBKEY, 33))


def test_eager_fast_path_and_the_registered_op_give_the_same_value_and_gradients():
    w = torch.randn(2, 100, requires_grad=True)
    nnmark.keyed_projection(w, SUBKEY, 50).pow(2).sum().backward()
    g_eager = w.grad.clone()
    w.grad = None
    cops.keyed_projection(w, 50, *SUBKEY).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, g_eager)
    # second order through the registered transpose op
    w64 = torch.randn(1, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: nnmark.keyed_projection(v, SUBKEY, 9).pow(2), (w64,))


def test_the_subkey_is_derived_once_per_key(monkeypatch):
    key = nnmark.WhiteBoxKey.generate(carrier="w", bits=32, reduction="flat")
    first = key.subkey()

    def boom(*a, **k):
        raise AssertionError("projection_subkeys recomputed")

    monkeypatch.setattr(keys_mod, "projection_subkeys", boom)
    assert key.subkey() == first
    key.project(torch.randn(10))  # no hash per call


# ------------------------------------------------------------------ torch.compile / torch.export
def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10))


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


@pytest.fixture(scope="module")
def wkey():
    return nnmark.WhiteBoxKey.generate(carrier="2.weight", bits=32)


def test_a_training_step_with_the_penalty_compiles_to_one_graph(wkey):
    model = _net()
    reg = nnmark.Uchida(wkey, strength=1.0)

    def step(x, y):
        return F.cross_entropy(model(x), y) + reg.penalty(model)

    x, y = _data()
    ex = torch._dynamo.explain(step)(x, y)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    loss_e = step(x, y)
    loss_e.backward()
    grads_e = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)  # inductor
    loss_c = compiled(x, y)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[n], rtol=1e-4, atol=1e-6)
    # a few compiled steps embed the mark
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        compiled(x, y).backward()
        opt.step()
    assert reg.ber(model) == 0.0


def test_dense_key_penalty_compiles_without_breaks():
    x = torch.randn(24, 8 * 9)
    key = nnmark.DenseKey(x, carrier="2.weight", bits=np.arange(24) % 2)
    model, reg = _net(), nnmark.Uchida(key)
    cnt = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    out = torch.compile(lambda: reg.penalty(model), backend=cnt, fullgraph=True)()
    assert cnt.frame_count == 1
    torch.testing.assert_close(out, reg.penalty(model))


class _Marked(torch.nn.Module):
    def __init__(self, key):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.key = key

    def forward(self, x):
        return self.lin(x).sum() + self.key.project(self.lin.weight).sum()


def test_torch_export_of_a_module_using_the_keyed_projection():
    key = nnmark.WhiteBoxKey.generate(carrier="lin.weight", bits=24)
    m = _Marked(key)
    x = torch.randn(3, 16)
    ep = torch.export.export(m, (x,))
    assert "nnmark.keyed_projection" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), m(x))


def test_penalty_hook_works_with_a_compiled_model(wkey):
    model = _net()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    hook = PenaltyHook(compiled, wkey, strength=1.0).attach(opt)  # names carry "_orig_mod."
    x, y = _data()
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert hook.steps == 25
    assert nnmark.verify(wkey, model).ber == 0.0


def test_penalty_hook_works_with_a_compiled_submodule(wkey):
    """``self.net = torch.compile(net)`` puts ``_orig_mod.`` inside the names
    (``net._orig_mod.2.weight``): the key's ``net.2.weight`` (or ``2.weight`` on the
    bare net) still resolves, in the live model and in its state dict."""
    from nnmark.carriers import find_name

    outer = torch.nn.Module()
    outer.net = torch.compile(_net())
    key = nnmark.WhiteBoxKey.generate(carrier="net.2.weight", bits=32)
    opt = torch.optim.SGD(outer.parameters(), lr=0.1)
    hook = PenaltyHook(outer, key, strength=1.0).attach(opt)
    x, y = _data()
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(outer.net(x), y).backward()
        opt.step()
    assert hook.steps == 25
    sd = outer.state_dict()
    assert "net._orig_mod.2.weight" in sd
    assert nnmark.verify(key, sd).ber == 0.0
    assert find_name(sd, "net.2.weight") == "net._orig_mod.2.weight"
    assert find_name(["net", "net._orig_mod", "net._orig_mod.2"], "net") == "net"  # a module name stays itself
    with pytest.raises(KeyError, match="close names"):
        find_name(sd, "net.9.weight")
