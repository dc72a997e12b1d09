"""False positives on unmarked models, a small subset of benchmarks/bench_fpr.py.

Every key kind (white-box; abstract, content, noise, unrelated and unrelated with one
label per sample) on: degenerate models (one class for everything, all-zero weights,
40 untrained models per architecture) -- none may verify at alpha 1e-6; 20 quickly
trained unmarked models of two architectures sharing the carrier -- none may verify
at 1e-6 uncalibrated, nor calibrated on one half and checked on the other; and one
marked model per kind, which must verify (power).

Keys are built from fixed secrets (the constructors, not generate()), so every run
checks the same keys and the outcome does not depend on chance.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_fpr as bf  # noqa: E402

KINDS = bf.KINDS
N_NULLS = 20


def fixed_key(kind: str, j: int, data):
    """Key j of ``kind`` from a fixed secret, built as TriggerKey.generate would build it."""
    secret = bytes([17 + j, KINDS.index(kind)]) * 16
    if kind == "whitebox":
        bits = np.random.default_rng(100 + j).integers(0, 2, 64).astype(np.uint8)
        return nnmark.WhiteBoxKey(secret, bf.CARRIER, bits, "filter_mean", bf.CARRIER_SHAPE)
    common = dict(num_classes=10, input_shape=(1, 8, 8))
    if kind == "abstract":
        return nnmark.TriggerKey(secret, "abstract", 100, **common)
    t = (3 * j + KINDS.index(kind)) % 10
    if kind in ("content", "noise"):
        keep = data.y_test != t
        return nnmark.TriggerKey(secret, kind, 100, samples=data.x_test[keep][:100], target=t, **common)
    x = bf.ood_patches(seed=7_000 + j)
    if kind == "unrelated":
        return nnmark.TriggerKey(secret, "unrelated", 100, samples=x[:100], target=t, controls=x[100:],
                                 control_target=t, controls_from="held-back", **common)
    labels = np.random.default_rng(8_000 + j).integers(0, 10, len(x)).tolist()
    return nnmark.TriggerKey(secret, "unrelated", 100, samples=x[:100], target=labels[:100], controls=x[100:],
                             control_target=labels[100:], controls_from="held-back", **common)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models: one torch thread (two spin against each other on a busy machine)."""
    with bf.torch_threads_one():
        yield


@pytest.fixture(scope="module")
def data():
    from nnmark.demo import load_digits_split

    return load_digits_split(0)


@pytest.fixture(scope="module")
def keys(data):
    return {kind: [fixed_key(kind, j, data) for j in range(2)] for kind in KINDS}


@pytest.fixture(scope="module")
def nulls(data):
    """20 unmarked models, alternating the two architectures, 4 epochs each, own seeds."""
    models = [bf.train_net(bf.ARCHS[i % 2], data, seed=90_000 + i, epochs=4, settle_epochs=1)
              for i in range(N_NULLS)]
    meta = [{"arch": bf.ARCHS[i % 2]} for i in range(N_NULLS)]
    return models, bf.split_halves(meta)


@pytest.fixture(scope="module")
def marked(data, keys):
    """One marked model per kind, carrying that kind's key 0 (the benchmark's recipe,
    trigger kinds in 15 epochs)."""
    out = {}
    for i, kind in enumerate(KINDS):
        key = keys[kind][0]
        if kind == "whitebox":
            out[kind] = bf.train_net("digits", data, seed=91_000, epochs=8, settle_epochs=1,
                                     wm=nnmark.Uchida(key, strength=bf.WB_STRENGTH))
        else:
            out[kind] = bf.train_net(bf.ARCHS[i % 2], data, seed=91_000 + i, epochs=15, settle_epochs=2,
                                     mixer=nnmark.TriggerMixer(key, per_batch=bf.MARK_PER_BATCH))
    return out


@pytest.fixture(scope="module")
def degenerate():
    return bf.degenerate_models(random_init=40)


def test_the_degenerate_models_are_what_they_claim(degenerate, data):
    x = data.x_test[:50]
    with torch.no_grad():
        for c, m in enumerate(degenerate["constant"]):
            assert (m(x).argmax(1) == c % 10).all()
        for m in degenerate["zeros"]:
            assert all((p == 0).all() for p in m.parameters())
    assert len(degenerate["random-init"]) == 80
    assert {type(m).__name__ for m in degenerate["random-init"]} == {"DigitsNet", "VariantNet"}
    a, b = degenerate["random-init"][0], degenerate["random-init"][1]
    assert not torch.equal(a.features[2].weight, b.features[2].weight)


@pytest.mark.parametrize("kind", KINDS)
def test_no_degenerate_model_verifies(kind, keys, degenerate, nulls):
    """Constant-class, all-zero and 40 + 40 untrained models: 0 verified at 1e-6, with
    the binomial null and with a calibration made on trained unmarked models."""
    models = [m for group in degenerate.values() for m in group]
    half_a = [nulls[0][i] for i in nulls[1][0]]
    for key in keys[kind]:
        cal = nnmark.calibrate(key, half_a, alpha=1e-6)
        for calibration in (None, cal):
            vs = nnmark.verify(key, models, alpha=1e-6, calibration=calibration)
            bad = [(i, v.matches, v.p_value) for i, v in enumerate(vs) if v.verified]
            assert not bad, f"{kind} key {key.key_id}: degenerate models verified: {bad}"
            assert all(v.status == "ok" for v in vs)


# Found by benchmarks/bench_fpr.py (benchmarks/RESULTS.md, "bench_fpr"): an untrained model that
# answers mostly one or two classes verified a content or noise key at 1e-6: its answers moved
# toward the target under the key's stamp (noise) more than under the decoy and more than on
# the unmarked samples, so the paired (McNemar) controls rejected, and its hits were far above
# 1/10. A key that holds its samples' own classes (sample_labels) now also asks the suspect to
# do the task -- answer the unmarked samples better than chance -- and these no longer verify;
# a key without them still can, and its verdicts say so.
_RANDOM_INIT_CASES = [
    pytest.param("content", bytes([5]) * 32, 5, 4, id="content-untrained-seed4"),
    pytest.param("noise", bytes([14, 1]) * 16, 4, 50_032, id="noise-untrained-seed50032"),
]


@pytest.mark.parametrize("kind, secret, target, seed", _RANDOM_INIT_CASES)
def test_an_untrained_model_does_not_verify_a_sample_key(kind, secret, target, seed, data):
    from nnmark.demo import DigitsNet

    keep = data.y_test != target
    samples, true = data.x_test[keep][:100], data.y_test[keep][:100]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsNet().eval()
    key = nnmark.TriggerKey(secret, kind=kind, n=100, num_classes=10, input_shape=(1, 8, 8), samples=samples,
                            target=target, sample_labels=true)
    v = nnmark.verify(key, model, alpha=1e-6)
    assert v.status == "ok" and not v.verified, (v.matches, v.control_matches, v.p_value)
    bare = nnmark.TriggerKey(secret, kind=kind, n=100, num_classes=10, input_shape=(1, 8, 8), samples=samples,
                             target=target)  # the same key without the samples' classes
    vb = nnmark.verify(bare, model, alpha=1e-6)
    assert vb.matches == v.matches and "sample labels" in vb.warning  # the limit is said, verified or not


@pytest.mark.parametrize("kind", KINDS)
def test_unmarked_models_do_not_verify(kind, keys, nulls):
    """20 trained unmarked models: none verifies at 1e-6 with the binomial null, nor with
    a calibration made on the other half (both ways)."""
    models, (half_a, half_b) = nulls
    for key in keys[kind]:
        vs = nnmark.verify(key, models, alpha=1e-6)
        assert all(v.status == "ok" for v in vs)
        assert not any(v.verified for v in vs), [v.p_value for v in vs]
        assert all(v.verified == (v.p_value <= 1e-6) for v in vs)
        for fit, test in ((half_a, half_b), (half_b, half_a)):
            cal = nnmark.calibrate(key, [models[i] for i in fit], alpha=1e-6)
            assert cal.n_models == len(fit) == N_NULLS // 2
            vc = nnmark.verify(key, [models[i] for i in test], alpha=1e-6, calibration=cal)
            assert not any(v.verified for v in vc), [v.p_value for v in vc]
            assert all(v.null.startswith("beta-binomial") for v in vc)


def test_the_halves_are_disjoint_and_stratified(nulls):
    models, (a, b) = nulls
    assert not set(a) & set(b) and sorted(a + b) == list(range(N_NULLS))
    for half in (a, b):
        assert sorted(type(models[i]).__name__ for i in half).count("DigitsNet") == N_NULLS // 4


@pytest.mark.parametrize("kind", KINDS)
def test_marked_models_verify(kind, keys, marked, nulls):
    """Power: the marked model verifies at 1e-6, uncalibrated and calibrated on unmarked
    models; the other key of its kind does not verify on it."""
    models, (half_a, _) = nulls
    key, other = keys[kind]
    model = marked[kind]
    v = nnmark.verify(key, model, alpha=1e-6)
    assert v.verified, (v.matches, v.p_value)
    cal = nnmark.calibrate(key, [models[i] for i in half_a], alpha=1e-6)
    assert nnmark.verify(key, model, alpha=1e-6, calibration=cal).verified
    assert not nnmark.verify(other, model, alpha=1e-6).verified


def test_clopper_pearson_and_rate_cells():
    from scipy.stats import binom

    lo, hi = bf.clopper_pearson(0, 800)
    assert lo == 0 and binom.cdf(0, 800, hi) == pytest.approx(0.025, rel=1e-6)
    lo, hi = bf.clopper_pearson(5, 100)
    assert binom.sf(4, 100, lo) == pytest.approx(0.025, rel=1e-6)
    assert binom.cdf(5, 100, hi) == pytest.approx(0.025, rel=1e-6)
    cell = bf.rate_cell([1e-3] * 2 + [0.5] * 98, 1e-2)  # 2 of 100 at 1e-2: the interval reaches below 1e-2
    assert cell["fp"] == 2 and cell["pass"] and cell["ci_low"] < 1e-2
    assert not bf.rate_cell([1e-3] * 10 + [0.5] * 90, 1e-2)["pass"]
    assert not bf.rate_cell([1e-7] + [0.5] * 999, 1e-6)["pass"]  # 1e-6: any false positive fails
