"""Training attacks: fine-tuning (FTLL/FTAL/RTLL/RTAL), fine-pruning, overwriting.

Each attack changes what it says and nothing else, is reproducible from its seed,
and rejects bad input. A small digits CNN trained for a few epochs is the subject.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnmark
from nnmark.attacks import (FinePruneRecord, FineTuneRecord, OverwriteRecord, attacker_key_like, fine_prune,
                            finetune, overwrite)
from nnmark.demo import CARRIER, DigitsNet, accuracy, load_digits_split, train

from conftest import DEVICES

LAST = ["classifier.3.weight", "classifier.3.bias"]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0)


@pytest.fixture(scope="module")
def marked(digits):
    """A DigitsNet with a 64-bit white-box mark, short schedule (a few seconds)."""
    # A fixed secret: the same model on every run (a test must not depend on luck).
    key = nnmark.WhiteBoxKey(bytes(range(32)), CARRIER, nnmark.message_bits("owner", 64), shape=(32, 16, 3, 3))
    model = train(digits, 0, epochs=5, wm=nnmark.Uchida(key, 0.01), settle_epochs=1)
    return model, key


@pytest.fixture
def model(marked):
    return copy.deepcopy(marked[0])


@pytest.fixture(scope="module")
def small(digits):
    """A 256-sample slice of the training set: enough to move every weight, quickly."""
    return digits.x_train[:256], digits.y_train[:256]


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


class BNNet(nn.Module):
    """conv -> BN -> ReLU twice, then linear: the BatchNorm paths of every attack."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        return self.head(self.body(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("mode", ["FTLL", "rtll"])
def test_last_layer_modes_change_only_the_last_layer(model, small, mode):
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rec = finetune(model, small, mode=mode, epochs=2, batch_size=64)
    assert isinstance(rec, FineTuneRecord)
    assert rec.attack == "finetune" and rec.mode == mode.upper() and rec.last_layer == "classifier.3"
    assert rec.trained == LAST and rec.steps == 2 * 4 and math.isfinite(rec.final_loss)
    assert _changed(before, _state(model)) == sorted(LAST)  # everything else bit-identical
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_rtll_reinitialises_the_last_layer(model, small):
    old = model.classifier[3].weight.detach().clone()
    with torch.random.fork_rng():  # what a seeded reset_parameters() gives
        torch.manual_seed(7)
        ref = nn.Linear(64, 10)
    # A vanishing lr: the layer stays where the re-initialisation put it.
    finetune(model, small, mode="RTLL", epochs=1, lr=1e-12, seed=7)
    w = model.classifier[3].weight.detach()
    torch.testing.assert_close(w, ref.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.classifier[3].bias.detach(), ref.bias.detach(), rtol=0, atol=1e-6)
    assert (w - old).abs().max() > 0.05


@pytest.mark.parametrize("mode", ["FTAL", "RTAL"])
def test_all_layer_modes_train_everything(model, small, mode):
    before = _state(model)
    rec = finetune(model, small, mode=mode, epochs=1)
    assert rec.trained == [n for n, _ in model.named_parameters()]
    assert _changed(before, _state(model)) == sorted(before)
    assert not model.training


def test_finetune_leaves_global_rng_and_is_reproducible(marked, small):
    state = torch.random.get_rng_state()
    a, b, c = (copy.deepcopy(marked[0]) for _ in range(3))
    ra = finetune(a, small, mode="RTAL", epochs=1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    rb = finetune(b, small, mode="RTAL", epochs=1, seed=3)
    finetune(c, small, mode="RTAL", epochs=1, seed=4)
    assert _changed(_state(a), _state(b)) == [] and ra.final_loss == rb.final_loss
    assert _changed(_state(a), _state(c)) != []


def test_ftal_keeps_clean_accuracy_of_a_marked_model(model, digits, marked):
    acc0 = accuracy(model, digits.x_test, digits.y_test)
    assert acc0 > 0.93
    finetune(model, (digits.x_train, digits.y_train), mode="FTAL", epochs=2, lr=0.01)
    acc = accuracy(model, digits.x_test, digits.y_test)
    assert acc > 0.9 and acc > acc0 - 0.05


def test_batchnorm_model_last_layer_mode_keeps_running_stats(small):
    torch.manual_seed(0)
    net = BNNet()
    finetune(net, small, mode="FTAL", epochs=1)  # runs, and trains BN statistics
    before = _state(net)
    rec = finetune(net, small, mode="RTLL", epochs=1)
    assert rec.last_layer == "head"
    assert _changed(before, _state(net)) == ["head.bias", "head.weight"]


def test_finetune_takes_an_iterable_of_batches(model, small):
    x, y = small
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, len(x), 50)]
    rec = finetune(model, loader, mode="FTLL", epochs=2)
    assert rec.steps == 2 * len(loader)


def test_finetune_explicit_last_layer(model, small):
    before = _state(model)
    rec = finetune(model, small, mode="FTLL", epochs=1, last_layer="classifier.1", optimizer="ADAM")
    assert rec.trained == ["classifier.1.weight", "classifier.1.bias"] and rec.optimizer == "adam"
    assert _changed(before, _state(model)) == ["classifier.1.bias", "classifier.1.weight"]


def test_finetune_errors(model, small):
    before = _state(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        finetune(model, small, mode="FTXX")
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, small, epochs=0)
    for lr in (0, -1, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="lr"):
            finetune(model, small, lr=lr)
    with pytest.raises(ValueError, match="batch_size"):
        finetune(model, small, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        finetune(model, small, seed=-1)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(model, small, optimizer="lbfgs")
    with pytest.raises(ValueError, match="momentum"):
        finetune(model, small, momentum=1.5)
    with pytest.raises(ValueError, match="not a module"):
        finetune(model, small, last_layer="classifier.9")
    with pytest.raises(ValueError, match="no parameters"):
        finetune(model, small, last_layer="features.1")  # a ReLU
    with pytest.raises(ValueError, match="no reset_parameters"):
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sequential(nn.Identity()))
        net[2].register_parameter("scale", nn.Parameter(torch.ones(10)))
        finetune(net, small, mode="RTLL", last_layer="2")
    with pytest.raises(ValueError, match="no nn.Linear"):
        finetune(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()), small)
    with pytest.raises(TypeError, match="pair of tensors"):
        finetune(model, None)
    with pytest.raises(TypeError, match="pair of tensors"):
        finetune(model, small[0])
    with pytest.raises(ValueError, match="labels"):
        finetune(model, (small[0], small[1][:10]))
    with pytest.raises(ValueError, match="one-shot iterator"):
        finetune(model, iter([small]), epochs=2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        finetune("model", small)
    assert _changed(before, _state(model)) == []  # nothing happened on any error


# ----------------------------------------------------------------------------- fine-pruning


def _post_relu_means(model, data):
    out = []
    h = model.features[3].register_forward_hook(lambda m, i, o: out.append(o.double().mean(dim=(0, 2, 3)) * len(o)))
    with torch.no_grad():
        model.eval()
        model(data[0])
    h.remove()
    return out[0] / len(data[0])


def test_fine_prune_prunes_the_most_dormant_channels(model, small):
    means = _post_relu_means(model, small)
    before = _state(model)
    rec = fine_prune(model, small, fraction=0.5, epochs=2)
    assert isinstance(rec, FinePruneRecord)
    assert rec.attack == "fine_prune" and rec.layer == "features.2" and rec.measured_at == "features.3"
    assert rec.channels == 32 and len(rec.pruned_channels) == 16 and rec.steps == 2 * 4
    assert rec.pruned_channels == sorted(rec.pruned_channels)
    # the pruned channels are the 16 lowest mean post-ReLU activations
    order = torch.argsort(means, stable=True).tolist()
    assert set(rec.pruned_channels) == set(order[:16])
    idx = torch.tensor(rec.pruned_channels)
    w, b = model.features[2].weight.detach(), model.features[2].bias.detach()
    assert torch.all(w[idx] == 0) and torch.all(b[idx] == 0)  # still zero after fine-tuning
    keep = torch.tensor(sorted(set(range(32)) - set(rec.pruned_channels)))
    assert torch.all(w[keep].flatten(1).abs().sum(1) > 0)
    assert set(_changed(before, _state(model))) == set(before)  # fine-tuned: every layer moved
    assert rec.masked == ["features.2.weight", "features.2.bias"] and not model.training


def test_fine_prune_zero_epochs_touches_only_the_pruned_rows(model, small):
    before = _state(model)
    rec = fine_prune(model, small, fraction=0.25, epochs=0, activation="output")
    assert rec.final_loss is None and rec.steps == 0 and rec.measured_at == "features.2"
    assert _changed(before, _state(model)) == ["features.2.bias", "features.2.weight"]
    keep = [c for c in range(32) if c not in rec.pruned_channels]
    assert len(rec.pruned_channels) == 8
    assert torch.equal(model.features[2].weight[keep], before["features.2.weight"][keep])
    rec0 = fine_prune(model, small, fraction=0.0, epochs=0)
    assert rec0.pruned_channels == [] and rec0.masked == []


def test_fine_prune_through_batchnorm(small):
    torch.manual_seed(0)
    net = BNNet()
    finetune(net, small, mode="FTAL", epochs=1)
    rec = fine_prune(net, small, fraction=0.5, epochs=1)
    assert rec.layer == "body.3" and rec.measured_at == "body.5"
    assert rec.masked == ["body.3.weight", "body.3.bias", "body.4.weight", "body.4.bias"]
    idx = torch.tensor(rec.pruned_channels)
    for name in rec.masked:
        assert torch.all(net.get_parameter(name)[idx] == 0)
    acts = []
    h = net.body[4].register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        net(small[0][:32])
    h.remove()
    assert torch.all(acts[0][:, idx] == 0)  # the pruned channels are dead after the BatchNorm too


def test_fine_prune_mlp_defaults_to_the_hidden_linear(small):
    torch.manual_seed(0)
    net = MLP()
    rec = fine_prune(net, small, fraction=0.5, epochs=1)
    # F.relu is no module: the layer's own output is measured
    assert rec.layer == "fc1" and rec.measured_at == "fc1" and len(rec.pruned_channels) == 16
    assert torch.all(net.fc1.weight[torch.tensor(rec.pruned_channels)] == 0)


def test_fine_prune_reproducible(marked, small):
    a, b = copy.deepcopy(marked[0]), copy.deepcopy(marked[0])
    ra = fine_prune(a, small, fraction=0.5, epochs=1, seed=5)
    rb = fine_prune(b, small, fraction=0.5, epochs=1, seed=5)
    assert ra == rb and _changed(_state(a), _state(b)) == []


def test_fine_prune_errors(model, small):
    before = _state(model)
    for f in (-0.1, 1.5, "x", float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            fine_prune(model, small, fraction=f)
    with pytest.raises(ValueError, match="epochs"):
        fine_prune(model, small, epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        fine_prune(model, small, lr=0)
    with pytest.raises(ValueError, match="not a module"):
        fine_prune(model, small, layer="features.7")
    with pytest.raises(ValueError, match="conv .* or linear"):
        fine_prune(model, small, layer="features.4")  # the max-pool
    with pytest.raises(ValueError, match="activation"):
        fine_prune(model, small, activation="sigmoid")
    with pytest.raises(ValueError, match="one-shot iterator"):
        fine_prune(model, iter([small]), epochs=0)
    with pytest.raises(TypeError, match="pair of tensors"):
        fine_prune(model, "digits")
    with pytest.raises(ValueError, match="no nn.Conv2d and no hidden"):
        fine_prune(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), small)
    assert _changed(before, _state(model)) == []


# ----------------------------------------------------------------------------- overwriting


def test_overwrite_whitebox_embeds_the_attackers_key(model, marked, digits):
    owner = marked[1]
    attacker = attacker_key_like(owner, seed=1)
    assert attacker.key_id != owner.key_id
    assert (attacker.carrier, attacker.num_bits, attacker.shape) == (owner.carrier, owner.num_bits, owner.shape)
    assert not nnmark.verify(attacker, model).verified  # not there before
    rec = overwrite(model, attacker, (digits.x_train, digits.y_train), epochs=2)
    assert isinstance(rec, OverwriteRecord)
    assert rec.attack == "overwrite" and rec.key_kind == "whitebox" and rec.carrier == CARRIER
    assert rec.n_triggers is None and rec.strength == 0.01 and rec.steps == 2 * 22
    v = nnmark.verify(attacker, model)
    assert v.verified and rec.attacker_p_value == pytest.approx(v.p_value) and rec.attacker_ber == v.ber
    assert rec.attacker_p_value < 1e-6 and not model.training


def test_overwrite_trigger_set(model, digits):
    owner = nnmark.TriggerKey.generate(n=20, num_classes=10, input_shape=(1, 8, 8))
    attacker = attacker_key_like(owner, seed=2)
    rec = overwrite(model, attacker, (digits.x_train, digits.y_train), epochs=2, per_batch=8)
    assert rec.key_kind == "trigger" and rec.trigger_kind == "abstract" and rec.n_triggers == 20
    assert rec.strength is None and rec.per_batch == 8 and rec.carrier is None
    v = nnmark.verify(attacker, model)
    assert rec.attacker_trigger_acc == v.matches / 20 and rec.attacker_p_value == pytest.approx(v.p_value)
    assert rec.attacker_p_value < 1e-6


def test_overwrite_reproducible(marked, small):
    attacker = attacker_key_like(marked[1], seed=1)
    a, b = copy.deepcopy(marked[0]), copy.deepcopy(marked[0])
    ra = overwrite(a, attacker, small, epochs=1, seed=9)
    rb = overwrite(b, attacker, small, epochs=1, seed=9)
    assert ra == rb and _changed(_state(a), _state(b)) == []


def test_attacker_key_like(marked, small):
    owner = marked[1]
    assert attacker_key_like(owner, seed=3) == attacker_key_like(owner, seed=3)
    assert attacker_key_like(owner, seed=3) != attacker_key_like(owner, seed=4)
    assert attacker_key_like(owner) != attacker_key_like(owner)  # fresh secrets
    dense = nnmark.DenseKey(torch.randn(32, 144).sign(), CARRIER, [0, 1] * 16, order="keras")
    ad = attacker_key_like(dense, seed=1)
    assert isinstance(ad, nnmark.DenseKey) and ad.length == 144 and ad.num_bits == 32 and ad.order == "keras"
    assert not torch.equal(ad.matrix, dense.matrix) and set(ad.matrix.unique().tolist()) == {-1.0, 1.0}
    tk = nnmark.TriggerKey.generate(n=30, num_classes=10, input_shape=(1, 8, 8), mean=0.5, std=0.25)
    at = attacker_key_like(tk, seed=1)
    assert (at.kind, at.n, at.num_classes, at.input_shape, at.mean, at.std) == ("abstract", 30, 10, (1, 8, 8),
                                                                                tk.mean, tk.std)
    assert at.key_id != tk.key_id
    content = nnmark.TriggerKey.generate(kind="content", samples=small[0][:40], target=3)
    with pytest.raises(ValueError, match="samples"):
        attacker_key_like(content)
    ac = attacker_key_like(content, samples=small[0][100:160], seed=1)
    assert ac.kind == "content" and ac.n == 40 and ac.target == 3
    with pytest.raises(ValueError, match="samples must be None"):
        attacker_key_like(tk, samples=small[0])
    with pytest.raises(TypeError, match="WhiteBoxKey"):
        attacker_key_like("key")
    with pytest.raises(ValueError, match="seed"):
        attacker_key_like(owner, seed=-1)


def test_overwrite_errors(model, marked, small):
    before = _state(model)
    attacker = attacker_key_like(marked[1], seed=1)
    with pytest.raises(TypeError, match="WhiteBoxKey, DenseKey or TriggerKey"):
        overwrite(model, "key", small)
    with pytest.raises(ValueError, match="strength"):
        overwrite(model, attacker, small, strength=0)
    with pytest.raises(ValueError, match="epochs"):
        overwrite(model, attacker, small, epochs=0)
    elsewhere = nnmark.WhiteBoxKey.generate(carrier="body.9.weight", bits=32)
    with pytest.raises(ValueError, match="cannot be embedded"):
        overwrite(model, elsewhere, small)
    wrong = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32, shape=(16, 16, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        overwrite(model, wrong, small)
    tk = nnmark.TriggerKey.generate(n=10, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="trigger key"):
        overwrite(model, tk, small)
    with pytest.raises(ValueError, match="per_batch"):
        overwrite(model, attacker_key_like(tk), small, per_batch=0)
    assert _changed(before, _state(model)) == []


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("dev", DEVICES)
def test_attacks_run_on_device(marked, small, dev):
    model = copy.deepcopy(marked[0])
    finetune(model, small, mode="RTAL", epochs=1, device=dev)
    assert next(model.parameters()).device.type == dev and not model.training
    rec = fine_prune(model, small, fraction=0.5, epochs=1, device=dev)
    assert torch.all(model.features[2].weight[torch.tensor(rec.pruned_channels, device=dev)] == 0)
    rec = overwrite(model, attacker_key_like(marked[1], seed=1), small, epochs=2, device=dev)
    assert rec.attacker_ber < 0.5
