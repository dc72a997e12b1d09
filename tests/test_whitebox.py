"""White-box marks end to end: Uchida et al.'s regularizer embeds a key into a small
CNN trained on scikit-learn's digits; verify/extract read it back from modules,
state dicts and checkpoint files; bad sources give failed verdicts, not crashes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import _spec
import nnmark
from conftest import requires_cuda
from nnmark import Uchida, WhiteBoxKey

CARRIER = "features.3.weight"  # the second conv: [32, 16, 3, 3] -> filter_mean N = 144
BITS = 64
EPOCHS = 20
BATCH = 50
PAIRS = (0, 1, 2)  # seeds of the (clean, marked) twins: accuracy is compared on their mean


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class Wrapper(nn.Module):
    """Like DataParallel: the model under ``module.``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [1797, 1, 8, 8]
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1100], perm[1100:]
    return x[tr], y[tr], x[te], y[te]


def train(digits, seed: int, epochs: int, reg: Uchida | None = None) -> nn.Module:
    """Adam with a one-cycle schedule; the seed fixes the init and the batch order."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(seed)
    model = Net()
    steps = epochs * math.ceil(len(ytr) / BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    order = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=order)
        for i in range(0, len(perm), BATCH):
            b = perm[i:i + BATCH]
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            if reg is not None:
                loss = loss + reg.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, digits) -> float:
    _, _, xte, yte = digits
    return float((model(xte).argmax(1) == yte).float().mean())


@pytest.fixture(scope="module")
def twins(digits):
    """(key, [(clean, marked)] per seed): each pair shares its init and its batches."""
    r = np.random.default_rng(2017)  # a fixed key, so the run is reproducible
    key = WhiteBoxKey(r.bytes(32), CARRIER, r.integers(0, 2, BITS), reduction="filter_mean")
    pairs = [(train(digits, seed=s, epochs=EPOCHS), train(digits, seed=s, epochs=EPOCHS, reg=Uchida(key, strength=0.01)))
             for s in PAIRS]
    return key, pairs


@pytest.fixture(scope="module")
def trained(twins):
    key, pairs = twins
    clean, marked = pairs[0]
    return key, clean, marked


# ---------------------------------------------------------------------------- embedding
def test_embedding_on_digits(twins, digits):
    key, pairs = twins
    reg = Uchida(key, strength=0.01)
    for clean, marked in pairs:
        assert reg.ber(marked) == 0.0
        assert nnmark.verify(key, marked).verified
        assert not nnmark.verify(key, clean).verified
    acc_clean = np.array([accuracy(c, digits) for c, _ in pairs])
    acc_marked = np.array([accuracy(m, digits) for _, m in pairs])
    assert acc_clean.min() > 0.95, acc_clean  # the task itself was learned
    # The mark costs no accuracy: within 1 point on average over the twins (one pair alone
    # varies by about +-0.5 points with the seed: 1 point is 7 of the 697 test digits).
    assert abs(acc_marked.mean() - acc_clean.mean()) <= 0.01, (acc_clean, acc_marked)
    assert np.abs(acc_marked - acc_clean).max() <= 0.02, (acc_clean, acc_marked)
    clean, marked = pairs[0]
    v = nnmark.verify(key, marked)
    assert v.verified and v.status == "ok"
    assert v.matches == BITS and v.ber == 0.0
    assert v.p_value <= 1e-6 and math.isclose(v.p_value, 2.0**-BITS, rel_tol=1e-9)
    assert v.threshold == nnmark.binomial_threshold(BITS, 1e-6)
    assert v.key_id == key.key_id
    # the clean twin (same init, same batches) does not carry the mark
    assert not nnmark.verify(key, clean).verified
    assert reg.ber(clean) > 0.2


def test_unmarked_models_do_not_verify(trained, digits):
    key, _, _ = trained
    verdicts = []
    for seed in range(100, 110):  # independently trained, short
        model = train(digits, seed=seed, epochs=1)
        verdicts.append(nnmark.verify(key, model))
    assert len(verdicts) == 10
    for v in verdicts:
        assert v.status == "ok" and not v.verified and v.p_value > 1e-6 and v.matches < v.threshold
    # and no other key verifies on the marked model
    _, _, marked = trained
    for _ in range(5):
        other = WhiteBoxKey.generate(carrier=CARRIER, bits=BITS)
        assert not nnmark.verify(other, marked).verified


def test_alpha_is_honoured(trained):
    key, _, marked = trained
    v = nnmark.verify(key, marked, alpha=1e-30)  # 64 bits can never reach 1e-30
    assert not v.verified and v.matches == BITS and v.threshold == BITS + 1 and v.alpha == 1e-30
    for alpha in (0.0, 1.0, -1e-6, float("nan")):
        with pytest.raises(ValueError, match="alpha must be in"):
            nnmark.verify(key, marked, alpha=alpha)


# ---------------------------------------------------------------------------- sources
def test_verify_many_sources(trained, tmp_path):
    key, clean, marked = trained
    sd = {k: v.detach().clone() for k, v in marked.state_dict().items()}
    st_path = tmp_path / "marked.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st_path))
    pt_path = tmp_path / "marked.pt"
    torch.save(sd, pt_path)
    clean_path = tmp_path / "clean.pt"
    torch.save(clean.state_dict(), clean_path)
    sources = [marked, sd, st_path, str(pt_path), clean_path, tmp_path / "missing.pt", marked.features[3].weight]
    verdicts = nnmark.verify(key, sources)
    assert isinstance(verdicts, list) and len(verdicts) == len(sources)
    for v, s in zip(verdicts[:4], sources[:4]):
        single = nnmark.verify(key, s)
        assert v.verified and single.verified
        assert (v.matches, v.p_value, v.threshold, v.status) == (single.matches, single.p_value, single.threshold, "ok")
    single_clean = nnmark.verify(key, clean_path)
    assert not verdicts[4].verified and verdicts[4].matches == single_clean.matches
    assert verdicts[5].status == "io_error" and not verdicts[5].verified  # one bad row, the others still checked
    assert verdicts[6].verified and verdicts[6].matches == BITS  # a bare carrier tensor
    assert verdicts[2].source == str(st_path) and verdicts[3].source == str(pt_path)
    assert verdicts[0].source.startswith("<module") and verdicts[1].source.startswith("<state_dict")
    assert nnmark.verify(key, tuple(sources[:2]))[1].verified
    with pytest.raises(ValueError, match="empty list"):
        nnmark.verify(key, [])


def test_extract_matches_projection(trained, tmp_path):
    key, clean, marked = trained
    pt_path = tmp_path / "clean.pt"
    torch.save(clean.state_dict(), pt_path)
    for model, src in [(marked, marked), (marked, marked.state_dict()), (clean, pt_path)]:
        w = model.features[3].weight.detach()
        expected = (key.project(w) > 0).to(torch.uint8)
        bits = nnmark.extract(key, src)
        assert bits.dtype == torch.uint8 and bits.shape == (BITS,)
        assert torch.equal(bits, expected)
    assert torch.equal(nnmark.extract(key, marked), key.bits)
    both = nnmark.extract(key, [marked, clean])
    assert both.shape == (2, BITS)
    assert torch.equal(both[0], key.bits) and torch.equal(both[1], nnmark.extract(key, clean))


def test_extract_matches_spec(rng):
    """extract() on a fresh model equals the sign of the spec projection of its carrier."""
    secret = rng.bytes(32)
    key = WhiteBoxKey(secret, CARRIER, rng.integers(0, 2, 200))
    model = Net()
    w = model.features[3].weight.detach().double().numpy()
    v = w.reshape(32, -1).mean(axis=0)
    ref = _spec.forward(v, _spec.subkey(secret, CARRIER), 200)
    got = nnmark.extract(key, model).numpy()
    clear = np.abs(ref) > 1e-5  # float32 carrier: ignore projections that round to either side of 0
    assert clear.sum() > 190
    np.testing.assert_array_equal(got[clear], (ref[clear] > 0).astype(np.uint8))


def test_missing_carrier(trained):
    key, _, marked = trained
    other = WhiteBoxKey.generate(carrier="features.4.weight", bits=BITS)
    v = nnmark.verify(other, marked)
    assert v.status == "absent" and not v.verified and "features.4.weight" in v.detail
    assert nnmark.verify(other, {"fc.weight": torch.ones(10, 128)}).status == "absent"
    with pytest.raises(ValueError, match="absent"):
        nnmark.extract(other, marked)
    with pytest.raises(ValueError, match="absent"):
        nnmark.extract(other, marked.state_dict())


def test_wrong_shape_is_invalid(trained):
    _, _, marked = trained
    key = WhiteBoxKey.generate(carrier=CARRIER, bits=BITS, shape=(32, 16, 5, 5))
    v = nnmark.verify(key, marked)
    assert v.status == "invalid" and not v.verified and "shape" in v.detail
    with pytest.raises(ValueError, match="invalid"):
        nnmark.extract(key, marked)
    right = WhiteBoxKey.generate(carrier=CARRIER, bits=BITS, shape=(32, 16, 3, 3))
    assert nnmark.verify(right, marked).status == "ok"
    # a vector carrier cannot be reduced with filter_mean
    bias_key = WhiteBoxKey.generate(carrier="features.3.bias", bits=BITS, reduction="filter_mean")
    assert nnmark.verify(bias_key, marked).status == "invalid"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_invalid(trained, bad):
    key, _, marked = trained
    sd = {k: v.detach().clone() for k, v in marked.state_dict().items()}
    sd[CARRIER][3, 2, 1, 0] = bad
    v = nnmark.verify(key, sd)
    assert v.status == "invalid" and v.verified is False and "NaN or Inf" in v.detail
    assert math.isnan(v.p_value)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nnmark.extract(key, sd)


def test_prefixed_state_dict_resolves(trained):
    key, _, marked = trained
    sd = {"module." + k: v for k, v in marked.state_dict().items()}
    assert "module.features.3.weight" in sd
    v = nnmark.verify(key, sd)
    assert v.status == "ok" and v.verified and v.matches == BITS
    assert torch.equal(nnmark.extract(key, sd), key.bits)
    # and the other way round: a key naming the wrapped parameter, a bare state dict
    wrapped_key = WhiteBoxKey.generate(carrier="module." + CARRIER, bits=BITS)
    assert nnmark.verify(wrapped_key, marked.state_dict()).status == "ok"
    # a wrapped module (DataParallel-like) works for verification and for the penalty
    assert nnmark.verify(key, Wrapper(marked)).verified
    assert Uchida(key).ber(Wrapper(marked)) == 0.0


# ---------------------------------------------------------------------------- the regularizer
def test_penalty_value_matches_spec(rng):
    secret = rng.bytes(32)
    bits = rng.integers(0, 2, BITS)
    key = WhiteBoxKey(secret, CARRIER, bits)
    model = Net()
    pen = Uchida(key, strength=0.03).penalty(model)
    w = model.features[3].weight.detach().double().numpy()
    p = _spec.forward(w.reshape(32, -1).mean(axis=0), _spec.subkey(secret, CARRIER), BITS)
    s = 1 / (1 + np.exp(-p))
    bce = -(bits * np.log(s) + (1 - bits) * np.log(1 - s)).sum()  # a sum over the bits
    assert pen.dim() == 0
    assert math.isclose(float(pen.detach()), 0.03 * bce, rel_tol=1e-4)


def test_penalty_gradient_only_into_carrier(rng):
    secret = rng.bytes(32)
    bits = rng.integers(0, 2, BITS)
    key = WhiteBoxKey(secret, CARRIER, bits)
    model = Net()
    Uchida(key, strength=0.01).penalty(model).backward()
    for name, prm in model.named_parameters():
        if name == CARRIER:
            assert prm.grad is not None and float(prm.grad.abs().sum()) > 0
        else:
            assert prm.grad is None, name
    # and it is the analytic gradient: strength * X^T (sigmoid(p) - b) / out, for every filter
    w = model.features[3].weight.detach().double().numpy()
    X = _spec.projection_matrix(_spec.subkey(secret, CARRIER), BITS, 144)
    p = X @ w.reshape(32, -1).mean(axis=0)
    g = 0.01 * (X.T @ (1 / (1 + np.exp(-p)) - bits)) / 32
    grad = model.features[3].weight.grad.double().numpy().reshape(32, -1)
    np.testing.assert_allclose(grad, np.broadcast_to(g, (32, 144)), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("strength", [0, -0.01, float("nan"), float("inf"), -float("inf")])
def test_bad_strength(strength, rng):
    key = WhiteBoxKey(rng.bytes(32), CARRIER, rng.integers(0, 2, BITS))
    with pytest.raises(ValueError, match="strength must be a positive finite number"):
        Uchida(key, strength=strength)


def test_bad_key_types(trained):
    _, _, marked = trained
    with pytest.raises(TypeError, match="white-box key"):
        Uchida("not a key")
    with pytest.raises(TypeError, match="white-box key"):
        nnmark.verify(b"\x00" * 32, marked)
    with pytest.raises(TypeError, match="white-box key"):
        nnmark.extract(None, marked)


def test_penalty_on_missing_carrier(rng):
    key = WhiteBoxKey(rng.bytes(32), "features.9.weight", rng.integers(0, 2, BITS))
    with pytest.raises(KeyError, match="features.9.weight"):
        Uchida(key).penalty(Net())
    with pytest.raises(TypeError, match="nn.Module"):
        Uchida(key).penalty({"features.9.weight": torch.ones(3)})


@pytest.mark.parametrize("reduction", ["filter_mean", "flat"])
def test_linear_layer_carrier(reduction, rng):
    """A mark in a Linear weight ([out, in]: filter_mean averages over out -> in values)."""
    key = WhiteBoxKey(rng.bytes(32), "fc.weight", rng.integers(0, 2, BITS), reduction)
    model = Net()
    assert key.reduce(model.fc.weight).shape == ((128,) if reduction == "filter_mean" else (1280,))
    reg = Uchida(key, strength=0.01)
    assert not nnmark.verify(key, model).verified
    opt = torch.optim.Adam([model.fc.weight], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        reg.penalty(model).backward()
        opt.step()
        if reg.ber(model) == 0.0:
            break
    assert reg.ber(model) == 0.0
    v = nnmark.verify(key, model)
    assert v.verified and v.matches == BITS
    assert torch.equal(nnmark.extract(key, model.state_dict()), key.bits)


@requires_cuda
def test_penalty_on_cuda_matches_cpu(rng):
    key = WhiteBoxKey(rng.bytes(32), CARRIER, rng.integers(0, 2, BITS))
    model = Net()
    reg = Uchida(key, strength=0.01)
    pen_cpu = reg.penalty(model)
    pen_cpu.backward()
    grad_cpu = model.features[3].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.cuda()
    pen_gpu = reg.penalty(model)
    assert pen_gpu.is_cuda
    pen_gpu.backward()
    assert math.isclose(float(pen_gpu.detach()), float(pen_cpu.detach()), rel_tol=1e-5)
    torch.testing.assert_close(model.features[3].weight.grad.cpu(), grad_cpu, rtol=1e-4, atol=1e-7)
    assert torch.equal(nnmark.extract(key, model), nnmark.extract(key, model.cpu()))
