"""Black-box attacks: model extraction by distillation, and evasion behind an OOD filter.

The subject is the digits CNN trained for a few epochs (and a copy marked with a white-box
key and an abstract trigger set); every attack must keep to its budget, be reproducible
from its seed, and reject bad input with a clear error.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import nnmark
from nnmark._threads import small_work_threads
from nnmark.attacks import DistillRecord, EvasionGuard, distill, evasion_filter
from nnmark.demo import CARRIER, DigitsNet, accuracy, load_digits_split, train
from nnmark.robustness import ATTACKS, DEFAULT_GRID, _accuracy, robustness_report

from conftest import requires_cuda


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0)


@pytest.fixture(scope="module")
def victim(digits):
    return train(digits, 0, epochs=5, settle_epochs=1)


@pytest.fixture(scope="module")
def marked(digits):
    """A DigitsNet with a 64-bit white-box mark and 100 abstract triggers (fixed secrets)."""
    wkey = nnmark.WhiteBoxKey(bytes(range(32)), CARRIER, nnmark.message_bits("owner", 64), shape=(32, 16, 3, 3))
    tkey = nnmark.TriggerKey(bytes(range(1, 33)), "abstract", 100, 10, (1, 8, 8))
    model = train(digits, 0, epochs=5, wm=nnmark.Uchida(wkey, 0.01), settle_epochs=1)
    with small_work_threads(model):  # one torch thread for a small model (a busy machine makes two spin)
        nnmark.embed_triggers(model, tkey, digits.x_train, digits.y_train, epochs=25, per_batch=10)
    assert nnmark.verify(wkey, model).verified and nnmark.verify(tkey, model).verified
    return model, wkey, tkey


class Counter:
    """Counts the rows (and calls) a module's forward sees, and how it was called."""

    def __init__(self, module):
        self.rows = self.calls = 0
        self.grad = self.training = False
        self.handle = module.register_forward_hook(self)

    def __call__(self, mod, inp, out):
        self.rows += len(inp[0])
        self.calls += 1
        self.grad |= torch.is_grad_enabled()
        self.training |= mod.training

    def remove(self):
        self.handle.remove()


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------- distill


@pytest.mark.parametrize("output", ["labels", "probs"])
def test_distill_trains_an_accurate_student(digits, victim, output):
    before = _state(victim)
    victim.train()  # the attack must query in eval mode and leave the flag as it was
    rec = distill(victim, (digits.x_train, digits.y_train), budget=600, output=output)
    assert victim.training
    victim.eval()
    assert isinstance(rec, DistillRecord) and rec.attack == "distill" and rec.output == output
    assert rec.budget == 600 and rec.queries == 600 and rec.pool == len(digits.x_train) and not rec.capped
    assert rec.student == "DigitsNet" and rec.student_init == "reset copy" and rec.kept == []
    assert rec.model is not victim and isinstance(rec.model, DigitsNet) and not rec.model.training
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())  # the victim is only queried
    assert rec.agreement > 0.9 and rec.steps > 0 and math.isfinite(rec.final_loss) and rec.seconds > 0
    assert accuracy(rec.model, digits.x_test, digits.y_test) > 0.85


def test_distill_keeps_to_the_budget(digits, victim):
    x = digits.x_train
    count = Counter(victim)
    try:
        rec = distill(victim, x, budget=150, epochs=1, query_batch_size=64)  # inputs alone
        assert (count.rows, count.calls) == (150, 3) and rec.queries == 150
        assert not count.grad and not count.training  # eval mode, no gradients

        count.rows = 0
        rec = distill(victim, x[:100], budget=500, epochs=1)  # more budget than data: capped
        assert count.rows == 100 and rec.queries == 100 and rec.capped and "capped at 100" in rec.note

        count.rows = 0
        rec = distill(victim, x[:100], budget=500, epochs=1, reuse="augment")
        assert count.rows == 500 and rec.queries == 500 and rec.augmented == 400 and not rec.capped

        # An iterable of batches is read only as far as the budget.
        read = []

        def loader():
            for i in range(0, len(x), 50):
                read.append(i)
                yield x[i:i + 50], digits.y_train[i:i + 50]

        count.rows = 0
        rec = distill(victim, loader(), budget=120, epochs=1)
        assert count.rows == 120 and rec.pool == 120 and len(read) == 3
    finally:
        count.remove()


def test_distill_is_seeded(digits, victim):
    data = (digits.x_train, digits.y_train)
    a = distill(victim, data, budget=200, epochs=2, seed=3).model.state_dict()
    b = distill(victim, data, budget=200, epochs=2, seed=3).model.state_dict()
    c = distill(victim, data, budget=200, epochs=2, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_default_student_starts_fresh(digits, marked):
    model, wkey, _ = marked
    # lr so small the student stays at its initialisation: re-initialised, not the victim's weights.
    rec = distill(model, digits.x_train, budget=64, epochs=1, lr=1e-12)
    for (name, p), q in zip(rec.model.named_parameters(), model.parameters()):
        assert not torch.allclose(p, q), name
    assert not nnmark.verify(wkey, rec.model).verified


def test_distill_students_of_another_architecture(digits, victim):
    torch.manual_seed(0)
    given = mlp()
    rec = distill(victim, (digits.x_train, digits.y_train), student=given)
    assert rec.model is given and rec.student_init == "given" and rec.student == "Sequential"
    assert accuracy(given, digits.x_test, digits.y_test) > 0.85
    rec = distill(victim, (digits.x_train, digits.y_train), student=mlp, output="probs")
    assert rec.student_init == "factory" and accuracy(rec.model, digits.x_test, digits.y_test) > 0.85


def test_distill_warns_of_parameters_no_reset_reaches(digits):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([2.0]))

        def forward(self, x):
            return x * self.scale

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Scale())
    with pytest.warns(UserWarning, match="reset_parameters"):
        rec = distill(net, digits.x_train, budget=32, epochs=1)
    assert rec.kept == ["2.scale"]


def test_distill_rejects_bad_arguments(digits, victim):
    x = digits.x_train
    with pytest.raises(TypeError, match="victim"):
        distill("model", x)
    with pytest.raises(ValueError, match="output must be one of"):
        distill(victim, x, output="logits")
    for bad in (0, -3, 1.5, True, "100"):
        with pytest.raises(ValueError, match="budget must be an int >= 1"):
            distill(victim, x, budget=bad)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        distill(victim, x, epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        distill(victim, x, lr=-1)
    with pytest.raises(ValueError, match="reuse must be one of"):
        distill(victim, x, reuse="loop")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        distill(victim, x, optimizer="lbfgs")
    with pytest.raises(TypeError, match="student must be None"):
        distill(victim, x, student="resnet")
    with pytest.raises(TypeError, match="factory must return"):
        distill(victim, x, student=lambda: 3)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(ValueError, match=r"student must output logits \[batch, 10\]"):
        distill(victim, x, budget=10, student=wrong)
    with pytest.raises(TypeError, match="data must be inputs"):
        distill(victim, None)
    with pytest.raises(ValueError, match="no inputs"):
        distill(victim, x[:0])
    with pytest.raises(ValueError, match="reuse='augment' jitters"):
        distill(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 3)), torch.zeros(4, 2, dtype=torch.long),
                budget=8, reuse="augment")


# ----------------------------------------------------------------------------- evasion


def test_evasion_flags_about_the_false_alarm_rate(digits, victim):
    guard = evasion_filter(victim, (digits.x_train, digits.y_train), false_alarm=0.01)
    assert isinstance(guard, EvasionGuard) and guard.model is victim and guard.score == "knn"
    assert guard.layer == "classifier.3" and guard.false_alarm == 0.01 and math.isfinite(guard.threshold)
    assert 0 < guard.clean_flagged <= 0.01
    held_out = float(guard.flags(digits.x_test).float().mean())
    assert held_out <= 0.05  # calibrated on training data: a little above 1% on held-out data at most
    wide = evasion_filter(victim, digits.x_train, false_alarm=0.1)
    assert 0.05 <= float(wide.flags(digits.x_test).float().mean()) <= 0.2
    assert guard.queries == 0  # measuring is not querying
    for score in ("msp", "energy"):
        g = evasion_filter(victim, digits.x_train, false_alarm=0.05, score=score)
        assert g.layer is None and g.bank is None and 0 < g.clean_flagged <= 0.05


def test_evasion_answers_clean_inputs_as_the_model_does(digits, victim):
    guard = evasion_filter(victim, digits.x_train, false_alarm=0.05)
    noise = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 4 - 2
    x = torch.cat([digits.x_test, noise])
    with torch.no_grad():
        want, got = victim(x), guard(x)
    flag = guard.flags(x)
    assert flag[-20:].sum() >= 15  # far outside the data (in the penultimate features, most of it)
    assert torch.equal(got[~flag], want[~flag]) and got[flag].isnan().all()
    assert guard.queries == len(x) and guard.flagged == int(flag.sum())
    # The report's clean accuracy counts a refusal as a wrong answer.
    right = (want.argmax(1)[:len(digits.y_test)] == digits.y_test) & ~flag[:len(digits.y_test)]
    assert _accuracy(guard, (digits.x_test, digits.y_test)) == pytest.approx(float(right.float().mean()))
    guard.reset_counts()
    assert guard.queries == guard.flagged == 0

    rnd = evasion_filter(victim, digits.x_train, false_alarm=0.05, mode="random", seed=7)
    with torch.no_grad():
        a = rnd(x)
    again = evasion_filter(victim, digits.x_train, false_alarm=0.05, mode="random", seed=7)
    with torch.no_grad():
        b = again(x)
    assert torch.equal(a, b) and torch.equal(a[~flag], want[~flag])
    # The same logits, the top one swapped with a random class's: as confident, right by chance.
    assert torch.equal(a[flag].sort(1).values, want[flag].sort(1).values)
    assert not torch.equal(a[flag].argmax(1), want[flag].argmax(1))


def test_evasion_hides_the_trigger_set(digits, marked):
    model, wkey, tkey = marked
    tx, _ = tkey.triggers()
    guard = evasion_filter(model, (digits.x_train, digits.y_train), false_alarm=0.01)
    assert guard.answered(tx) <= 10  # most abstract triggers flagged (100 of 100 when measured)
    v = nnmark.verify(tkey, guard)
    assert v.status == "ok" and not v.verified and v.matches <= 10
    assert guard.queries == tkey.n and guard.flagged >= tkey.n - 10  # verify ran the guard, not the model
    assert not nnmark.verify(tkey, evasion_filter(model, digits.x_train, mode="random")).verified
    # White-box marks read the wrapped weights: the guard's state dict is the model's under "model.".
    assert set(guard.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert nnmark.verify(wkey, guard).verified


def test_evasion_filter_rejects_bad_arguments(digits, victim):
    x = digits.x_train
    for bad in (1.0, -0.1, True, "0.01", float("nan")):
        with pytest.raises(ValueError, match="false_alarm must be a number in"):
            evasion_filter(victim, x, false_alarm=bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        evasion_filter(victim, x, mode="drop")
    with pytest.raises(ValueError, match="score must be one of"):
        evasion_filter(victim, x, score="mahalanobis")
    with pytest.raises(ValueError, match="layer applies to score='knn' only"):
        evasion_filter(victim, x, score="msp", layer="classifier.3")
    with pytest.raises(ValueError, match="not a module of the model"):
        evasion_filter(victim, x, layer="head")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        evasion_filter(victim, x, k=0)
    with pytest.raises(ValueError, match="needs at least 6"):
        evasion_filter(victim, x[:5])
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        evasion_filter(None, x)
    conv = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(ValueError, match="pass layer="):
        evasion_filter(conv, x)


def test_distill_through_a_guard_copies_the_model_behind_it(digits, victim):
    guard = evasion_filter(victim, digits.x_train, false_alarm=0.05)
    noise = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 4 - 2
    x = torch.cat([digits.x_test, noise])
    refused = int(guard.flags(x).sum())
    assert refused >= 20
    for output in ("labels", "probs"):
        rec = distill(guard, x, epochs=1, output=output)
        assert isinstance(rec.model, DigitsNet) and rec.queries == len(x) and rec.refused == refused
        assert f"{refused} of {len(x)} queries refused" in rec.note
        assert all(torch.isfinite(p).all() for p in rec.model.parameters())
    with pytest.raises(ValueError, match="refused all 30 queries"):
        distill(guard, noise[guard.flags(noise)].repeat(2, 1, 1, 1)[:30], epochs=1)


# ----------------------------------------------------------------------------- the report


def test_robustness_report_runs_the_black_box_attacks(digits, marked):
    model, wkey, tkey = marked
    assert {ATTACKS[n].setting for n in ("distill", "distill_probs", "evasion")} == {"black-box"}
    assert {ATTACKS[n].setting for n in ("prune_global", "ftal", "overwrite", "quantize", "permute")} == {"white-box"}
    assert not {"distill", "distill_probs", "evasion"} & set(DEFAULT_GRID)
    before = _state(model)
    rep = robustness_report(model, [wkey, tkey], train=(digits.x_train, digits.y_train),
                            test=(digits.x_test, digits.y_test), attacks={"distill": [200, 1000], "evasion": [0.01]},
                            progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [(r["attack"], r["strength"]) for r in rep.rows] == [("baseline", 0), ("distill", 200),
                                                                ("distill", 1000), ("evasion", 0.01)]
    assert {g["setting"] for g in rep.grid} == {"black-box"}
    for r in rep.rows:
        assert r["error"] is None
        assert {m["status"] for m in r["marks"].values()} == {"ok"} and len(r["marks"]) == 2
    base, d200, d1000, ev = rep.rows
    for r in (d200, d1000):  # a student of the API: neither mark survives
        assert r["record"]["queries"] == r["strength"] and "model" not in r["record"]
        assert not r["marks"][wkey.key_id]["verified"] and not r["marks"][tkey.key_id]["verified"]
    assert d1000["accuracy"] > 0.9
    assert ev["record"]["answered"][tkey.key_id]["answered"] <= 10
    assert not ev["marks"][tkey.key_id]["verified"] and ev["marks"][wkey.key_id]["verified"]
    assert ev["accuracy"] > base["accuracy"] - 0.05  # refusals cost about the false-alarm rate
    assert rep.survives(tkey)["evasion"]["removed_at"] == 0.01
    json.dumps(rep.to_dict())


@requires_cuda
def test_black_box_attacks_on_cuda(digits, marked):
    model, wkey, tkey = marked
    gpu = copy.deepcopy(model).cuda()
    rec = distill(gpu, digits.x_train, budget=300)
    assert next(rec.model.parameters()).is_cuda and rec.queries == 300
    assert accuracy(rec.model, digits.x_test.cuda(), digits.y_test.cuda()) > 0.85
    guard = evasion_filter(gpu, digits.x_train)
    assert guard.bank.is_cuda and guard.answered(tkey.triggers()[0]) <= 10
    assert not nnmark.verify(tkey, guard).verified and nnmark.verify(wkey, guard).verified
    cpu = evasion_filter(model, digits.x_train)
    assert guard.threshold == pytest.approx(cpu.threshold, abs=1e-4)
