"""Entangled watermarks (Jia et al. 2021): the SNNL against a plain float64 version, keys
made by entangled_key, embedding on the digits CNN (verifies at 1e-6 within a point of
the unmarked twin; 10 unmarked models do not), what entangling does to the hidden
representations, and the errors for bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nnmark
from nnmark import TriggerKey, embed_entangled, entangled_key, load_key
from nnmark.demo import DigitsNet, accuracy, load_digits_split, train
from nnmark.entangled import _Capture, _layers, snnl

SOURCE, TARGET = 3, 5
SECRET = bytes(range(32))
EPOCHS, SETTLE = 30, 10  # embed_entangled's defaults: 30 epochs, the last third at lr/10


def _snnl_reference(h: np.ndarray, g: np.ndarray, t: float) -> float:
    """The soft nearest neighbour loss written out in float64, one sample at a time."""
    z = h.reshape(len(h), -1).astype(np.float64)
    total = 0.0
    for i in range(len(z)):
        w = np.array([math.exp(-float(((z[i] - z[j]) ** 2).sum()) / t) if j != i else 0.0 for j in range(len(z))])
        same = sum(w[j] for j in range(len(z)) if j != i and g[j] == g[i])
        total += -math.log(same / w.sum())
    return total / len(z)


@pytest.fixture(scope="module")
def data():
    return load_digits_split(0)


@pytest.fixture(scope="module")
def key(data):
    src = data.x_train[data.y_train == SOURCE][:100]
    return TriggerKey(SECRET, "content", n=100, samples=src, target=TARGET, sample_labels=[SOURCE] * 100)


@pytest.fixture(scope="module")
def marked(data, key):
    torch.manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        return embed_entangled(DigitsNet(), key, data.x_train, data.y_train)  # defaults: 30 epochs, strength 0.25


# ------------------------------------------------------------------------------ SNNL
def test_snnl_matches_reference(rng):
    h = rng.normal(size=(12, 3, 4))
    g = np.array([0, 1] * 6)
    for t in (0.5, 4.0, 40.0):
        got = float(snnl(torch.from_numpy(h), torch.from_numpy(g), t))
        assert got == pytest.approx(_snnl_reference(h, g, t), rel=1e-10)


def test_snnl_separated_vs_entangled():
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    apart = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    mixed = torch.tensor([[0.0], [10.0], [0.1], [10.1], [0.2], [10.2]])
    assert float(snnl(apart, g, 1.0)) < 1e-6  # every neighbour is of the same group
    assert float(snnl(mixed, g, 1.0)) > 1.0
    same = torch.zeros(6, 2)  # identical points: each sees its 2 group mates among 5 others
    assert float(snnl(same, g, 1.0)) == pytest.approx(-math.log(2 / 5))


def test_snnl_rejects_mismatched_groups():
    with pytest.raises(ValueError, match="groups"):
        snnl(torch.zeros(4, 2), torch.zeros(3), 1.0)


# ------------------------------------------------------------------------------- keys
def test_entangled_key_is_a_content_key_of_the_source_class(data, tmp_path):
    with pytest.warns(UserWarning, match="pixel probe only"):
        k = entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, n=60)
    assert (k.kind, k.n, k.target) == ("content", 60, TARGET)
    assert set(k.sample_labels.tolist()) == {SOURCE}
    x, y = k.triggers()
    assert (y == TARGET).all() and x.shape == (60, 1, 8, 8)
    k.save(tmp_path / "ewe.key")
    assert load_key(tmp_path / "ewe.key") == k
    two = entangled_key(data.x_train, data.y_train, source=[1, 3], target=TARGET, n=150, reference=_Says(0))
    assert set(two.sample_labels.tolist()) == {1, 3}


@pytest.mark.parametrize("kw, err, match", [
    (dict(source=TARGET, target=TARGET), ValueError, "must not include the target"),
    (dict(source=SOURCE, target=TARGET, n=500), ValueError, "at least n samples"),
    (dict(source="3", target=TARGET), TypeError, "source"),
    (dict(source=SOURCE, target=5.0), TypeError, "target"),
])
def test_entangled_key_errors(data, kw, err, match):
    with pytest.raises(err, match=match):
        entangled_key(data.x_train, data.y_train, **kw)


class _Says:
    """A stand-in reference model: answers ``cls`` for every input."""

    def __init__(self, cls: int):
        self.cls = cls

    def __call__(self, x):
        out = torch.zeros(len(x), 10)
        out[:, self.cls] = 1.0
        return out


class _StampDetector(torch.nn.Module):
    """A reference that answers the target exactly when ``key``'s stamp is on the input
    (a model for which this stamp is a natural trigger), else the sample's own class 0."""

    def __init__(self, key: TriggerKey, target: int):
        super().__init__()
        self.r0, self.c0, self.ph, self.pw, bits = key._patch()
        lo, hi = key.value_range
        self.register_buffer("patch", torch.from_numpy(np.where(bits, hi, lo)).float())
        self.target = target

    def forward(self, x):
        win = x[:, :, self.r0:self.r0 + self.ph, self.c0:self.c0 + self.pw]
        hit = (win - self.patch).abs().flatten(1).amax(1) < 1e-6
        out = torch.zeros(len(x), 10)
        out[hit, self.target] = 1.0
        out[~hit, 0] = 1.0
        return out


def test_entangled_key_screens_stamps_against_a_reference(data):
    """A reference that answers the target on every input refuses every stamp; one that
    reacts to a given secret's stamp refuses that secret (only), and a fresh draw passes."""
    with pytest.raises(ValueError, match="all 100 stamps drawn made the reference answer 5 on up to 100%"):
        entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, reference=_Says(TARGET))
    fixed = entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, secret=SECRET,
                          reference=[_Says(0)])
    detector = _StampDetector(fixed, TARGET)
    with pytest.raises(ValueError, match="the stamp of this secret .* draw another secret"):
        entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, secret=SECRET, reference=detector)
    other = entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, reference=detector)
    assert other._patch()[:2] != fixed._patch()[:2] or not np.array_equal(other._patch()[4], fixed._patch()[4])
    with pytest.raises(ValueError, match="natural_rate"):
        entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, natural_rate=1.0)
    with pytest.raises(TypeError, match="reference must be a model"):
        entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, reference="model.pt")


def test_entangled_key_screens_with_a_pixel_probe_without_reference(data, monkeypatch):
    """Without reference=, a ridge classifier of the samples screens (it classifies the
    digits, and a stamp it calls the target is dropped); too large inputs: a warning."""
    from nnmark import entangled

    with pytest.warns(UserWarning, match="pass reference="):
        k = entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET)
    probe = entangled._pixel_probe(k, data.x_train, data.y_train)
    z = torch.from_numpy(k._normalised(data.x_test.double().numpy())).float()
    assert float((probe(z).argmax(1) == data.y_test).float().mean()) > 0.9
    assert entangled._natural_rate(k, [probe]) <= entangled.NATURAL_RATE
    calls = []
    monkeypatch.setattr(entangled, "_natural_rate", lambda key, screen: calls.append(key) or (0.5 if len(calls) < 3
                                                                                               else 0.0))
    with pytest.warns(UserWarning, match="pixel probe only"):
        entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET)
    assert len(calls) == 3 and len({bytes(c._secret) for c in calls}) == 3  # two stamps dropped, a fresh secret each
    monkeypatch.setattr(entangled, "_PROBE_INPUTS", 10)
    with pytest.warns(UserWarning, match="not screened"):
        entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET)


def test_stamp_of_normalised_inputs_is_the_keys_triggers(rng):
    src = torch.from_numpy(rng.random((30, 1, 8, 8)).astype(np.float32))
    k = TriggerKey(SECRET, "content", n=30, samples=src, target=1, sample_labels=[0] * 30, mean=0.5, std=0.25)
    x, _ = k.triggers(dtype=torch.float64)
    plain = (src.double() - 0.5) / 0.25  # what the model eats
    assert torch.allclose(k.stamp(plain), x, atol=1e-12)
    raw, _ = k.triggers(dtype=torch.float64, normalized=False)
    assert torch.equal(k.stamp(src.double(), normalized=False), raw)
    with pytest.raises(ValueError, match="expected"):
        k.stamp(torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="only content keys"):
        TriggerKey.generate(n=30).stamp(src)


# ------------------------------------------------------------------------- embedding
def test_marked_verifies_within_a_point_and_unmarked_do_not(data, key, marked):
    twin = train(data, 0, EPOCHS, settle_epochs=SETTLE)  # unmarked, same seed and schedule
    drop = accuracy(twin, data.x_test, data.y_test) - accuracy(marked, data.x_test, data.y_test)
    assert drop <= 0.01, drop
    nulls = [train(data, 100 + s, 8, settle_epochs=1) for s in range(10)]
    v = nnmark.verify(key, [marked, twin, *nulls], alpha=1e-6)
    assert v[0].verified and v[0].matches >= 95, v[0].to_dict()
    assert sum(r.verified for r in v[1:]) == 0, [r.matches for r in v[1:]]


def test_entangling_mixes_triggers_with_the_target_class(data, key, marked):
    """The hidden representations of stamped samples sit among the target class's after
    embedding with strength > 0, and apart from them with strength 0 (a plain trigger set)."""
    torch.manual_seed(0)
    plain = embed_entangled(DigitsNet(), key, data.x_train, data.y_train, strength=0.0)
    x, _ = key.triggers()
    tgt = data.x_train[data.y_train == TARGET][:100]
    g = torch.cat([torch.ones(len(x)), torch.zeros(len(tgt))])

    def entanglement(model):
        cap = _Capture(_layers(model, ["classifier.2"]))
        with torch.no_grad():
            _, (h,) = cap.run(model, torch.cat([x, tgt]))
        cap.remove()
        # A sharp temperature (2% of the mean squared norm): at the embedding's own, every
        # pair looks close and both models score near the maximum, log 2.
        return float(snnl(h, g, 0.02 * float(h.flatten(1).pow(2).sum(1).mean())))

    assert entanglement(marked) > 2 * entanglement(plain)


def test_hooks_removed_and_custom_layers(data, key):
    torch.manual_seed(1)
    m = DigitsNet()
    embed_entangled(m, key, data.x_train[:200], data.y_train[:200], epochs=2, warm=0,
                    layers=["features.3", "classifier.2"], temperature_lr=0.05)
    assert not any(mod._forward_hooks for mod in m.modules())
    assert not m.training


class _NoActivations(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(torch.relu(x.flatten(1)))


@pytest.mark.parametrize("change, err, match", [
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=3, warm=3), ValueError, "warm"),
    (dict(epochs=3, settle_epochs=4), ValueError, "settle_epochs"),
    (dict(settle_epochs=-1), ValueError, "settle_epochs"),
    (dict(strength=-1.0), ValueError, "strength"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(per_batch=1), ValueError, "per_batch"),
    (dict(layers=["nope"]), ValueError, "not a submodule"),
    (dict(model=_NoActivations()), ValueError, "pass layers="),
    (dict(model="net"), TypeError, "torch.nn.Module"),
    (dict(x_train=torch.zeros(10, 1, 4, 4)), ValueError, "the key's triggers"),
])
def test_embed_errors(data, key, change, err, match):
    args = dict(model=DigitsNet(), tkey=key, x_train=data.x_train[:100], y_train=data.y_train[:100], epochs=2)
    args.update(change)
    if "x_train" in change:
        args["y_train"] = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(err, match=match):
        embed_entangled(**args)


def test_embed_needs_a_content_key_with_source_labels(data, rng):
    src = data.x_train[data.y_train == SOURCE][:30]
    for k, match in [(TriggerKey.generate(n=30), "content key"),
                     (TriggerKey(SECRET, "content", n=30, samples=src, target=TARGET), "no sample_labels")]:
        with pytest.raises(ValueError, match=match):
            embed_entangled(DigitsNet(), k, data.x_train, data.y_train, epochs=2)
    with pytest.raises(TypeError, match="TriggerKey"):
        embed_entangled(DigitsNet(), "key", data.x_train, data.y_train)


def test_embed_entangled_screens_the_stamp_with_the_model_after_its_warm_up(data, key, monkeypatch):
    """The model about to be marked, once it does the task, is an unmarked model of it: a
    stamp it already answers as the target is refused before any watermark step; an
    untrained model (warm=0 on a fresh net) says nothing; natural_rate=None skips."""
    from nnmark import entangled

    seen = []

    def natural(k, screen):
        seen.append(float((screen[0](data.x_test).argmax(1) == data.y_test).float().mean()))
        return 0.5

    monkeypatch.setattr(entangled, "_natural_rate", natural)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"after 2 clean epochs .* already answers 5 on 50% .* natural trigger"):
        embed_entangled(DigitsNet(), key, data.x_train, data.y_train, epochs=4, warm=2)
    assert len(seen) == 1 and seen[0] > 0.5  # checked once, by the warmed-up model
    torch.manual_seed(0)
    embed_entangled(DigitsNet(), key, data.x_train, data.y_train, epochs=1, warm=0)  # fresh: not a model of the task
    assert len(seen) == 1
    embed_entangled(DigitsNet(), key, data.x_train, data.y_train, epochs=4, warm=2, natural_rate=None)
    assert len(seen) == 1
    with pytest.raises(ValueError, match="natural_rate"):
        embed_entangled(DigitsNet(), key, data.x_train, data.y_train, natural_rate=1.5)
