"""Structural obfuscation (permute_units) keeps the function and breaks naive white-box
extraction; realign (the defence) restores the owner's unit order and BER."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnmark
from nnmark.attacks import (ObfuscationRecord, RealignRecord, gaussian_noise, permute_units, prune_magnitude,
                            realign)
from nnmark.demo import CARRIER, DigitsNet, load_digits_split, train


# ------------------------------------------------------------------ models

def _mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.LeakyReLU(0.1), nn.Dropout(0.2),
                         nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))


def _bn_cnn():
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # 0: rescale on BN 1
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(12), nn.MaxPool2d(2),  # 3: rescale on BN 5
        nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6, affine=False), nn.ReLU(),  # 7: BN without affine: no rescale
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 10), nn.BatchNorm1d(10), nn.ReLU(),  # 12: flatten, S=4
        nn.Linear(10, 3))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial statistics and affine parameters, so a wrong permutation shows
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(mod.num_features, generator=g))
    return m


class _Functional(nn.Module):
    """Functional activations and pooling, and a view(x.size(0), -1) flatten."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc1, self.fc2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 5, 3), nn.Linear(5 * 2 * 2, 7), \
            nn.Linear(7, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(torch.relu(self.c1(x)))), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.leaky_relu(self.fc1(x), 0.2))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv1, self.conv2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))  # the skip: stem and conv2 outputs are added
        return self.head(x.mean(dim=(2, 3)))


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it, its parts it can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU())
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else -self.b(h)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.block(self.block(F.relu(self.inp(x)))))


MODELS = {
    "digits": (lambda: DigitsNet(), (1, 8, 8)),
    "mlp": (_mlp, (12,)),
    "bn_cnn": (_bn_cnn, (3, 8, 8)),
    "functional": (_Functional, (1, 8, 8)),
}


def _make(name, seed=0):
    torch.manual_seed(seed)
    factory, shape = MODELS[name]
    m = factory().eval()
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(seed + 1))
    return m, x


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------ permute_units

EXPECTED = {  # producers permuted, producers rescaled, producers skipped
    "digits": (["features.0", "features.2", "classifier.1"], ["features.0", "features.2", "classifier.1"],
               ["classifier.3"]),
    "mlp": (["0", "2", "5"], ["0", "2"], ["7"]),
    "bn_cnn": (["0", "3", "7", "12"], ["0", "3", "12"], ["15"]),
    "functional": (["c1", "c2", "fc1"], ["c1", "c2", "fc1"], ["fc2"]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_permutation_keeps_function_changes_weights(name):
    model, x = _make(name)
    before = model(x).detach()
    orig = copy.deepcopy(model)
    rec = permute_units(model, seed=3, example_input=x)
    assert isinstance(rec, ObfuscationRecord) and rec.attack == "permute_units" and rec.seed == 3
    layers, scaled, skipped = EXPECTED[name]
    assert rec.layers == layers
    assert sorted(rec.scales) == sorted(scaled)
    assert sorted(rec.skipped) == skipped and "output" in rec.skipped[skipped[0]]
    assert set(rec.unscaled) == set(layers) - set(scaled)
    for n in layers:
        p = rec.permutations[n]
        assert sorted(p) == list(range(len(p))) and p != list(range(len(p)))
        assert all(0.5 <= s <= 2.0 for s in rec.scales.get(n, [1.0]))
    after = model(x)
    assert _close(after, before)
    assert rec.max_output_change is not None and rec.max_output_change <= 1e-5 * max(1.0, float(before.abs().max()))
    for n in layers:  # every permuted producer's weights moved
        assert not torch.equal(model.get_submodule(n).weight, orig.get_submodule(n).weight)
    if name == "bn_cnn":  # BatchNorm with batch statistics (training mode) agrees too
        model.train(), orig.train()
        assert _close(model(x), orig(x))


def test_permutation_without_rescale_only_reorders():
    model, x = _make("mlp")
    orig = copy.deepcopy(model)
    rec = permute_units(model, seed=1, rescale=False)
    assert rec.scales == {} and rec.unscaled == {}
    p = torch.tensor(rec.permutations["0"])
    assert torch.equal(model[0].weight, orig[0].weight[p]) and torch.equal(model[0].bias, orig[0].bias[p])
    assert torch.equal(model[2].weight, orig[2].weight[torch.tensor(rec.permutations["2"])][:, p])
    assert _close(model(x), orig(x))


def test_seeded_reproducible_and_layers_restrict():
    a, x = _make("digits")
    b, c, d = copy.deepcopy(a), copy.deepcopy(a), copy.deepcopy(a)
    ra, rb = permute_units(a, seed=7), permute_units(b, seed=7)
    assert _same_weights(a, b) and ra.permutations == rb.permutations and ra.scales == rb.scales
    rc = permute_units(c, seed=8)
    assert rc.permutations != ra.permutations and not _same_weights(a, c)
    # one producer only: its rows and its consumer's columns change, nothing else
    rd = permute_units(d, seed=7, layers=["features.2"])
    assert rd.layers == ["features.2"] and rd.permutations["features.2"] == ra.permutations["features.2"]
    orig = _make("digits")[0]
    changed = {k for k, v in d.state_dict().items() if not torch.equal(v, orig.state_dict()[k])}
    assert changed == {"features.2.weight", "features.2.bias", "classifier.1.weight"}
    assert _close(d(x), orig(x))
    # asking for a producer that cannot be permuted: nothing changes, and the record says why
    e = copy.deepcopy(orig)
    re_ = permute_units(e, seed=7, layers="classifier.3")
    assert re_.layers == [] and list(re_.skipped) == ["classifier.3"] and _same_weights(e, orig)


def test_residual_untraceable_and_reused_modules_are_skipped():
    torch.manual_seed(0)
    for model, x, permuted, skipped, reason in [
        (_Residual(), torch.randn(4, 2, 6, 6), ["conv1"], ["stem", "conv2", "head"], "used 2 times"),
        (_Untraceable(), torch.randn(4, 6), ["a.0"], ["<model>", "a.2", "b"], "cannot trace"),
        (_Twice(), torch.randn(4, 4), [], ["inp", "block.0", "out"], "called 2 times"),
    ]:
        model.eval()
        before = model(x)
        rec = permute_units(model, seed=0)
        assert rec.layers == permuted, type(model).__name__
        assert sorted(rec.skipped) == sorted(skipped), rec.skipped
        assert any(reason in r for r in rec.skipped.values()), rec.skipped
        assert _close(model(x), before)
    assert "used 2 times" in permute_units(_Residual(), seed=0).skipped["stem"]


# ------------------------------------------------------------------ marked model, extraction, realign

@pytest.fixture(scope="module")
def marked():
    """A DigitsNet with a 64-bit Uchida mark on features.2.weight (a few seconds of training);
    the key is fixed so the test is deterministic."""
    data = load_digits_split(0)
    rng = np.random.default_rng(1)
    key = nnmark.WhiteBoxKey(bytes(range(1, 33)), CARRIER, rng.integers(0, 2, 64), "filter_mean", (32, 16, 3, 3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # strength 0.03 (not the paper's 0.01): BER 0 within 3 epochs, with margin
        model = train(data, 0, epochs=3, wm=nnmark.Uchida(key, strength=0.03))
    finally:
        torch.set_num_threads(threads)
    assert nnmark.verify(key, model).ber == 0.0
    return key, model, data.x_test[:64]


def test_permutation_breaks_extraction_realign_restores(marked):
    key, ref, x = marked
    suspect = copy.deepcopy(ref)
    permute_units(suspect, seed=0)
    assert _close(suspect(x), ref(x))
    naive = nnmark.verify(key, suspect)
    assert not naive.verified and naive.ber > 0.2
    rec = realign(suspect, reference=ref)
    assert isinstance(rec, RealignRecord) and rec.attack == "realign"
    assert rec.layers == ["features.0", "features.2", "classifier.1"]
    assert all(v > 0.999999 for v in rec.mean_similarity.values())
    assert rec.changed["features.2"] > 0 and rec.changed["classifier.1"] > 0
    fixed = nnmark.verify(key, suspect)
    assert fixed.verified and fixed.ber == 0.0
    assert _close(suspect(x), ref(x))
    for k, v in suspect.state_dict().items():  # back to the owner's weights, up to float rounding
        assert torch.allclose(v, ref.state_dict()[k], rtol=1e-5, atol=1e-7), k
    # a state dict works as the reference too
    again = copy.deepcopy(ref)
    permute_units(again, seed=4)
    realign(again, reference=ref.state_dict())
    assert nnmark.verify(key, again).ber == 0.0


def test_realign_unpermuted_is_identity(marked):
    _, ref, _ = marked
    suspect = copy.deepcopy(ref)
    rec = realign(suspect, ref)
    assert rec.changed == {"features.0": 0, "features.2": 0, "classifier.1": 0}
    assert _same_weights(suspect, ref)


@pytest.mark.parametrize("damage", ["noise", "prune"])
def test_realign_recovers_permutation_of_damaged_suspect(marked, damage):
    key, ref, x = marked
    suspect = copy.deepcopy(ref)
    permute_units(suspect, seed=2)
    if damage == "noise":
        gaussian_noise(suspect, std=0.02, seed=0)  # 2% of each tensor's std
    else:
        prune_magnitude(suspect, sparsity=0.3)
    assert nnmark.verify(key, suspect).ber > 0.2
    rec = realign(suspect, ref)
    assert all(0.9 < v < 1.0 for v in rec.mean_similarity.values())
    for n in rec.layers:  # every unit went back to its own index: its nearest reference unit is itself
        a = suspect.get_submodule(n).weight.detach().flatten(1)
        r = ref.get_submodule(n).weight.detach().flatten(1)
        cos = F.normalize(a, dim=1) @ F.normalize(r, dim=1).T
        assert torch.equal(cos.argmax(1), torch.arange(len(a))), n
    assert nnmark.verify(key, suspect).ber == 0.0


def test_realign_unrelated_model_has_low_similarity():
    torch.manual_seed(1)
    a = DigitsNet()
    torch.manual_seed(2)
    b = DigitsNet()
    rec = realign(a, b)
    assert rec.mean_similarity["features.2"] < 0.5 and rec.mean_similarity["classifier.1"] < 0.5


def test_realign_bn_cnn_round_trip():
    model, x = _make("bn_cnn")
    ref = copy.deepcopy(model)
    permute_units(model, seed=9)
    rec = realign(model, ref)
    assert rec.layers == ["0", "3", "7", "12"]
    assert _close(model(x), ref(x))
    for k, v in model.state_dict().items():
        assert torch.allclose(v.double(), ref.state_dict()[k].double(), rtol=1e-5, atol=1e-6), k


# ------------------------------------------------------------------ errors

def test_errors():
    model, _ = _make("digits")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        permute_units("model")
    with pytest.raises(TypeError, match="seed"):
        permute_units(model, seed="1")
    with pytest.raises(TypeError, match="rescale"):
        permute_units(model, rescale="yes")
    with pytest.raises(ValueError, match="scale_range"):
        permute_units(model, scale_range=(0.0, 2.0))
    with pytest.raises(ValueError, match="scale_range"):
        permute_units(model, scale_range=(2.0, 1.0))
    with pytest.raises(TypeError, match="scale_range"):
        permute_units(model, scale_range=3)
    with pytest.raises(ValueError, match="nope"):
        permute_units(model, layers=["features.2", "nope"])
    with pytest.raises(ValueError, match="features.1"):  # a ReLU is no Conv/Linear
        permute_units(model, layers=["features.1"])
    with pytest.raises(TypeError, match="layers"):
        permute_units(model, layers=[2])
    with pytest.raises(TypeError, match="suspect"):
        realign("model", model)
    with pytest.raises(TypeError, match="reference"):
        realign(model, "model")
    with pytest.raises(ValueError, match="architecture"):
        realign(model, _mlp())
    with pytest.raises(ValueError, match="shape mismatch"):
        realign(model, DigitsNet(num_classes=5))
    with pytest.raises(ValueError, match="architecture"):
        realign(_mlp(), {k: v for k, v in _mlp().state_dict().items() if k != "7.bias"})
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        realign(bad, model)
    assert _same_weights(model, _make("digits")[0])  # nothing was changed by the failed calls
