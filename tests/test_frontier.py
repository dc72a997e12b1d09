"""Frontier stitching (Le Merrer, Perez, Tredan 2019): TriggerKey kind "frontier".

Key generation from the owner's model (a keyed walk, batched FGSM, true and false
adversaries, a keyed split), determinism from the secret, key files, bad input,
the training set, and the verdict on digits: the marked model verifies, unmarked
ones -- which answer many frontier triggers right by themselves -- do not."""
from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch

import nnmark
from nnmark import TriggerKey, TriggerMixer, demo, embed_triggers, load_key
from nnmark.keys import KeyFileError

SECRET = bytes(range(32))
N, K, F = 50, 50, 50  # triggers, held-back true adversaries, false adversaries
NULLS = 5  # unmarked models here (benchmarks/bench_frontier.py trains 12)


@pytest.fixture(scope="module")
def digits():
    """The owner's digits model (before marking), a frontier key made from it, the model
    marked by fine-tuning, and independently trained unmarked models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: one thread is as fast and does not fight other jobs
    try:
        data = demo.load_digits_split(0)
        owner = demo.train(data, 0, settle_epochs=2)
        key = TriggerKey.generate(kind="frontier", model=owner, samples=data.x_train, labels=data.y_train,
                                  n=N, controls=K, false_adversaries=F, secret=SECRET)
        marked = embed_triggers(copy.deepcopy(owner), key, data.x_train, data.y_train)
        nulls = [demo.train(data, 100 + s, settle_epochs=2) for s in range(NULLS)]
    finally:
        torch.set_num_threads(threads)
    return data, owner, key, marked, nulls


def _gen(owner, data, **kw):
    args = {"model": owner, "samples": data.x_train, "labels": data.y_train, "n": 20, "controls": 20,
            "false_adversaries": 10, "secret": SECRET}
    args.update(kw)
    return TriggerKey.generate(kind="frontier", **args)


def _answers(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


# --------------------------------------------------------------------- generation
def test_generation_finds_true_and_false_adversaries(digits):
    data, owner, key, _, _ = digits
    assert (key.kind, key.n, key.num_controls, key.num_classes, key.input_shape) == ("frontier", N, K, 10, (1, 8, 8))
    assert key.training_size == N + K + F and key.has_controls and not key.controls_paired
    assert key.eps == pytest.approx(0.1) and key.controls_from == "held-back"
    x, y = key.triggers()
    xc, yc = key.controls()
    xf, yf = key.false_adversaries()
    # true adversaries fool the owner's model (before marking); false ones do not
    assert (_answers(owner, x) != y).all() and (_answers(owner, xc) != yc).all()
    assert torch.equal(_answers(owner, xc), key.control_answers)
    assert torch.equal(_answers(owner, xf), yf)
    # each is one FGSM step of eps (clipped to [0, 1]) from a training sample of the same label
    raw = torch.cat([key.triggers(normalized=False)[0], key.controls(normalized=False)[0],
                     key.false_adversaries(normalized=False)[0]]).reshape(N + K + F, -1)
    labels = torch.cat([y, yc, yf])
    d = torch.cdist(raw.double(), data.x_train.reshape(len(data.x_train), -1).double(), p=float("inf"))
    nearest = d.argmin(1)
    assert float(d.min(1).values.max()) <= 0.1 + 1e-6
    assert torch.equal(data.y_train[nearest], labels)
    moved = (raw - data.x_train.reshape(len(data.x_train), -1)[nearest]).abs()
    inside = (raw > 1e-6) & (raw < 1 - 1e-6)  # not clipped: moved by exactly eps, or not at all (zero gradient)
    assert ((moved[inside] - 0.1).abs() < 1e-6).float().mean() > 0.9
    assert len(set(nearest.tolist())) == N + K + F  # distinct samples


def test_generation_is_deterministic_from_the_secret(digits):
    data, owner, key, _, _ = digits
    again = TriggerKey.generate(kind="frontier", model=owner, samples=data.x_train, labels=data.y_train,
                                n=N, controls=K, false_adversaries=F, secret=SECRET)
    assert again == key and again.key_id == key.key_id
    for a, b in zip(again.training_set(), key.training_set()):
        assert torch.equal(a, b)
    other = TriggerKey.generate(kind="frontier", model=owner, samples=data.x_train, labels=data.y_train,
                                n=N, controls=K, false_adversaries=F, secret=bytes(32))
    assert other.key_id != key.key_id and not torch.equal(other.triggers()[0], key.triggers()[0])
    fresh = TriggerKey.generate(kind="frontier", model=owner, samples=data.x_train, labels=data.y_train, n=N)
    assert fresh.key_id != key.key_id  # a fresh secret from os.urandom by default


def test_generation_leaves_the_model_and_rngs_alone(digits):
    data, owner, _, _, _ = digits
    model = copy.deepcopy(owner).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _gen(model, data)
    assert model.training  # its mode comes back
    assert all(p.grad is None for p in model.parameters())  # no gradient left in the parameters
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_normalised_models_and_num_classes(digits):
    """A model that eats normalised inputs: the FGSM runs through the key's mean/std, and
    the key's triggers (normalised by triggers()) still fool it."""
    data, owner, _, _, _ = digits

    class Normalised(torch.nn.Module):  # owner's model behind a normalisation: eats (x - 0.5) / 0.25
        def __init__(self):
            super().__init__()
            self.net = owner

        def forward(self, z):
            return self.net(z * 0.25 + 0.5)

    key = _gen(Normalised(), data, mean=0.5, std=0.25)
    x, y = key.triggers()
    assert (_answers(Normalised(), x) != y).all()
    assert float(key.triggers(normalized=False)[0].min()) >= 0.0 and float(x.min()) < 0  # normalised
    with pytest.raises(ValueError, match="num_classes=7, but the model gives 10 logits"):
        _gen(owner, data, num_classes=7)
    assert _gen(owner, data, num_classes=10) == _gen(owner, data)


@pytest.mark.parametrize("kw,exc,match", [
    ({"model": None}, TypeError, "needs model="),
    ({"model": "owner.pt"}, TypeError, "needs model="),
    ({"samples": None}, ValueError, "needs samples"),
    ({"labels": None}, ValueError, "needs labels"),
    ({"labels": torch.zeros(5, dtype=torch.int64)}, ValueError, "labels must be one int label per sample"),
    ({"labels": 3}, ValueError, "labels must be one int label per sample"),
    ({"samples": torch.zeros(10, 8, 8)}, ValueError, "labels must be one int label per sample"),
    ({"input_shape": (1, 4, 4)}, ValueError, "samples have shape"),
    ({"eps": 0.0}, ValueError, "eps must be in"),
    ({"eps": 2.0}, ValueError, "eps must be in"),
    ({"eps": float("nan")}, ValueError, "eps must be finite"),
    ({"controls": 0}, ValueError, "controls must be >= 1"),
    ({"false_adversaries": -1}, ValueError, "false_adversaries must be >= 0"),
    ({"n": 5000}, ValueError, "found .* true and .* false adversaries among the 1347 samples"),
    ({"false_adversaries": 5000}, ValueError, "a smaller one \\(more false\\)"),
    ({"target": 3}, ValueError, "target does not apply"),
    ({"sample_labels": [0] * 1347}, ValueError, "as labels=, not sample_labels="),
    ({"secret": b"short"}, ValueError, "secret must be 32 bytes"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
])
def test_bad_input(digits, kw, exc, match):
    data, owner, _, _, _ = digits
    with pytest.raises(exc, match=match):
        _gen(owner, data, **kw)


def test_bad_models_and_labels(digits):
    data, owner, _, _, _ = digits
    with pytest.raises(ValueError, match="model must return logits"):
        _gen(torch.nn.Flatten(0), data)  # one flat vector, not [batch, num_classes]
    labels = data.y_train.clone()
    labels[3] = 10
    with pytest.raises(ValueError, match=r"labels labels must be in \[0, 10\)"):
        _gen(owner, data, labels=labels)
    with pytest.raises(ValueError, match="only for kind='frontier'"):
        TriggerKey.generate(kind="abstract", model=owner)
    with pytest.raises(ValueError, match="only for kind='frontier'"):
        TriggerKey.generate(kind="unrelated", samples=data.x_train[:10], eps=0.2)


def test_constructor_checks_frontier_parts(digits):
    _, _, key, _, _ = digits
    x = key.triggers(normalized=False)[0]
    xc, yc = key.controls(normalized=False)
    parts = dict(n=N, num_classes=10, input_shape=(1, 8, 8), samples=x, target=key.labels.tolist(),
                 controls=xc, control_target=yc.tolist(), controls_from="held-back",
                 control_answers=key.control_answers.tolist(), eps=0.1)
    rebuilt = TriggerKey(SECRET, "frontier", **parts)
    assert torch.equal(rebuilt.triggers()[0], key.triggers()[0]) and rebuilt.training_size == N + K
    with pytest.raises(ValueError, match="held-back true adversaries"):
        TriggerKey(SECRET, "frontier", **{**parts, "controls": None, "control_target": None, "controls_from": None,
                                          "control_answers": None})
    with pytest.raises(ValueError, match="needs control_answers"):
        TriggerKey(SECRET, "frontier", **{**parts, "control_answers": None})
    with pytest.raises(ValueError, match="one answer per control"):
        TriggerKey(SECRET, "frontier", **{**parts, "control_answers": parts["control_answers"][:-1]})
    with pytest.raises(ValueError, match="must differ from the controls' labels"):
        TriggerKey(SECRET, "frontier", **{**parts, "control_answers": yc.tolist()})
    with pytest.raises(ValueError, match="false_target must give one label per false adversary"):
        TriggerKey(SECRET, "frontier", **parts, false_adversaries=x[:3], false_target=[1, 2])
    with pytest.raises(ValueError, match="false_target needs false_adversaries"):
        TriggerKey(SECRET, "frontier", **parts, false_target=[1, 2])
    with pytest.raises(ValueError, match="eps must be > 0"):
        TriggerKey(SECRET, "frontier", **{**parts, "eps": -0.1})
    with pytest.raises(ValueError, match="belong to frontier keys"):
        TriggerKey(SECRET, "unrelated", samples=x, target=1, eps=0.1)


# ------------------------------------------------------------------------ key files
def test_save_and_load_round_trip(digits, tmp_path):
    _, _, key, _, _ = digits
    path = key.save(tmp_path / "frontier.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    body = json.loads(path.read_text())
    assert body["trigger_kind"] == "frontier" and body["controls_from"] == "held-back"
    assert body["samples_shape"] == [N, 1, 8, 8] and body["controls_shape"] == [K, 1, 8, 8]
    assert body["false_adversaries_shape"] == [F, 1, 8, 8] and len(body["false_target"]) == F
    assert body["control_answers"] == key.control_answers.tolist() and body["eps"] == 0.1
    back = load_key(path)
    assert back == key and back.key_id == key.key_id and back.eps == key.eps
    for a, b in zip(back.training_set(), key.training_set()):
        assert torch.equal(a, b)
    for a, b in zip(back.controls(), key.controls()):
        assert torch.equal(a, b)
    assert torch.equal(back.training_order(3), key.training_order(3))
    assert SECRET.hex() not in repr(back)


def _resign(path, body):
    """Writes ``body`` back with a recomputed checksum: what a careful forger would do."""
    from nnmark.keys import _checksum

    body["checksum"] = _checksum(body)
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("change,match", [
    (lambda b: b.update(control_answers=b["control_answers"][:-1]), "control_answers"),
    (lambda b: b.update(control_answers=7), "control_answers"),
    (lambda b: b.update(control_answers=b["control_target"]), "must differ"),
    (lambda b: b.update(false_target=b["false_target"][:-1]), "false_target"),
    (lambda b: b.update(false_adversaries_shape=[F, 1, 8, 7]), "false_adversaries_shape"),
    (lambda b: b.update(eps="0.1"), "eps"),
    (lambda b: b.update(controls=None), "held-back true adversaries"),
])
def test_malformed_frontier_files_are_rejected(digits, tmp_path, change, match):
    _, _, key, _, _ = digits
    path = key.save(tmp_path / "frontier.key")
    body = json.loads(path.read_text())
    change(body)
    _resign(path, body)
    with pytest.raises((KeyFileError, ValueError, TypeError), match=match):
        load_key(path)


def test_frontier_members_in_other_kinds_are_rejected(tmp_path):
    key = TriggerKey(SECRET, "abstract", n=4)
    path = key.save(tmp_path / "abstract.key")
    body = json.loads(path.read_text())
    body["control_answers"] = [1, 2]
    _resign(path, body)
    with pytest.raises((KeyFileError, ValueError), match="belongs to frontier keys"):
        load_key(path)


# ------------------------------------------------------------------- embedding, verdict
def test_training_set_and_mixer(digits):
    _, _, key, _, _ = digits
    x, y = key.training_set()
    assert x.shape == (N + K + F, 1, 8, 8)
    assert torch.equal(y[:N], key.labels)
    assert torch.equal(y[N:N + K], key.control_answers)  # the held-back ones keep the owner's answers
    assert torch.equal(y[N + K:], key.false_adversaries()[1])
    assert sorted(key.training_order(0).tolist()) == list(range(N + K + F))
    mixer = TriggerMixer(key, per_batch=N + K + F)
    mx, my = mixer(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
    assert sorted(my[2:].tolist()) == sorted(y.tolist())  # one pass visits the whole training set


def test_marked_model_verifies_and_unmarked_do_not(digits):
    data, owner, key, marked, nulls = digits
    acc_owner = demo.accuracy(owner, data.x_test, data.y_test)
    acc_marked = demo.accuracy(marked, data.x_test, data.y_test)
    assert acc_owner >= 0.95 and acc_marked >= acc_owner - 0.01  # within a point of the model before marking
    verdicts = nnmark.verify(key, [marked, owner, *nulls], alpha=1e-6)
    v = verdicts[0]
    assert v.verified and v.matches >= 0.95 * N and v.to_dict()["control_matches"] <= 0.1 * K
    assert v.p_value <= 1e-12 and v.warning is None
    assert not verdicts[1].verified and verdicts[1].matches == 0  # the owner's own model before marking
    for u in verdicts[2:]:
        assert not u.verified and u.to_dict()["control_p_value"] > 1e-3
    # Unmarked models answer many frontier triggers right by themselves (here 10-22 of 50):
    # a binomial at 1/num_classes is no null for them, and would call some of them marked.
    matches = [u.matches for u in verdicts[2:]]
    assert sum(matches) / (N * len(matches)) >= 0.2
    assert min(nnmark.stats.binomial_p_value(m, N, 0.1) for m in matches) < 1e-6
