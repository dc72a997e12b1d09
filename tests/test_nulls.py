"""Verdicts that hold under the null (issue 12): the beta-binomial calibration, the suspect's
own controls, per-sample labels, and the warnings -- on synthetic models whose behaviour is
known exactly, so that every property is checked against its definition."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import betabinom

import nnmark
from nnmark.calibration import MIN_MODELS, CalibrationError, fit_beta_binomial
from nnmark.cli import main

C = 10


class Scripted(torch.nn.Module):
    """A model whose answers are scripted per input row: rows [0, n) are the triggers, the
    rows after them the controls (the order TriggerCheck feeds them: for content, each
    sample unmarked, then with a decoy stamp). ``trigger_rate``: the chance of answering
    ``target`` on a trigger; ``control_rate`` on a control; other answers are a non-target
    class. Rows are decided by a per-model generator."""

    def __init__(self, seed, n, target, trigger_rate, control_rate=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n, self.target = n, target
        self.rt, self.rc = float(trigger_rate), float(control_rate)
        self.u = torch.rand(10_000, generator=g)
        self.other = (target + 1 + torch.randint(0, C - 1, (10_000,), generator=g)) % C
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = x.shape[0]
        rows = torch.arange(k)
        is_trigger = rows < self.n
        rate = torch.where(is_trigger, self.rt, self.rc)
        # A control's answer depends on its sample (i = row mod n), not on its group: the
        # unmarked and the decoy-stamped copies of a sample get the same answer.
        sample = torch.where(is_trigger, rows, self.n + (rows - self.n) % self.n)
        cls = torch.where(self.u[sample] < rate, torch.full((k,), self.target), self.other[sample])
        return torch.nn.functional.one_hot(cls, C).float() + 0 * self.anchor


def _content_key(n=60, target=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nnmark.TriggerKey.generate(kind="content", samples=torch.rand(n, 1, 8, 8, generator=g), target=target)


def _clopper_pearson_low(k, n, level=0.95):
    return 0.0 if k == 0 else float(beta_dist.ppf((1 - level) / 2, k, n - k + 1))


# ------------------------------------------------------------------------------ the fit
def test_the_fit_recovers_a_beta_binomial_and_a_binomial():
    rng = np.random.default_rng(0)
    counts = betabinom.rvs(100, 2.0, 14.0, size=600, random_state=rng)
    a, b = fit_beta_binomial(counts.tolist(), 100, 0.1)
    assert abs(a / (a + b) - 2 / 16) < 0.015 and 1 / (a + b + 1) == pytest.approx(1 / 17, rel=0.35)
    plain = rng.binomial(100, 0.1, size=600)
    a, b = fit_beta_binomial(plain.tolist(), 100, 0.1)
    assert abs(a / (a + b) - 0.1) < 0.01 and 1 / (a + b + 1) < 0.01  # no dispersion to speak of


def test_no_calibration_yields_a_zero_rate():
    key = _content_key()
    nulls = [Scripted(s, key.n, 3, 0.0) for s in range(MIN_MODELS)]  # not one trigger hit
    cal = nnmark.calibrate(key, nulls)
    assert all(c == 0 for c in cal.counts) and 0 < cal.null_rate < 0.05
    v = nnmark.verify(key, Scripted(99, key.n, 3, 1.0), calibration=cal)  # no ValueError, a finite p
    assert v.status == "ok" and 0 <= v.p_value < 1e-6 and v.verified


# ------------------------------------------------------------------------------ the promise
def test_calibration_keeps_the_promise_where_the_binomial_breaks_it():
    """Null models whose trigger hit rates spread as Beta(1, 4) (mean 0.2: far from 1/10
    and overdispersed): the nominal binomial verifies many, a beta-binomial fitted on one
    half keeps the other half's false-positive rate at alpha."""
    key = _content_key(n=60)
    rng = np.random.default_rng(1)
    rates = rng.beta(1.0, 4.0, size=400)
    nulls = [Scripted(s, key.n, 3, r) for s, r in enumerate(rates)]
    half_a, half_b = nulls[:200], nulls[200:]
    alpha = 1e-2
    plain = nnmark.verify(key, half_b, alpha=alpha)
    fp_plain = sum(v.verified for v in plain)
    assert fp_plain > 40  # about 40% of these unmarked models look marked under 1/10
    cal = nnmark.calibrate(key, half_a, alpha=alpha)
    assert cal.dispersion > 0.1 and abs(cal.null_rate - 0.2) < 0.05
    held = nnmark.verify(key, half_b, alpha=alpha, calibration=cal)
    fp = sum(v.verified for v in held)
    assert _clopper_pearson_low(fp, len(held)) <= alpha  # at or below alpha within its interval
    assert all(v.null == cal.describe() and v.null.startswith("beta-binomial") for v in held)
    marked = nnmark.verify(key, [Scripted(1000 + s, key.n, 3, 1.0) for s in range(5)], alpha=alpha, calibration=cal)
    assert all(v.verified for v in marked)  # power stays


def test_the_suspects_own_controls():
    key = _content_key(n=60)
    everything = Scripted(0, key.n, 3, 1.0, control_rate=1.0)  # answers the target for every input
    marked = Scripted(1, key.n, 3, 1.0, control_rate=0.0)
    v_all, v_marked = nnmark.verify(key, [everything, marked])
    assert not v_all.verified and v_all.control_p_value == 1.0 and v_all.control_matches == key.num_controls
    assert v_marked.verified and v_marked.control_matches == 0 and v_marked.p_value == max(
        v_marked.control_p_value, nnmark.binomial_p_value(key.n, key.n, 0.1))
    assert v_all.controls == key.num_controls == 2 * key.n  # unmarked samples, then a decoy stamp


@pytest.mark.parametrize("kind", ["abstract", "content", "noise", "unrelated"])
def test_degenerate_models_never_verify(kind):
    from nnmark.demo import DigitsNet, load_digits_split

    data = load_digits_split()
    if kind == "abstract":
        key = nnmark.TriggerKey.generate(kind="abstract", n=100)
    elif kind == "unrelated":
        key = nnmark.TriggerKey.generate(kind="unrelated", samples=1 - data.x_test[:200], target=3)
    else:
        key = nnmark.TriggerKey.generate(kind=kind, samples=data.x_test[:150], target=3,
                                         sample_labels=data.y_test[:150], n=100)

    class Constant(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.c), C).float() + 0 * self.anchor

    zero = DigitsNet()
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    torch.manual_seed(7)
    models = [Constant(c) for c in range(C)] + [zero] + [DigitsNet() for _ in range(40)]
    verdicts = nnmark.verify(key, models, alpha=1e-6)
    assert all(v.status == "ok" for v in verdicts)
    assert not any(v.verified for v in verdicts), [(i, v.matches, v.p_value) for i, v in enumerate(verdicts)
                                                   if v.verified]


# ------------------------------------------------------------------------------ per-sample labels
def test_a_published_trigger_set_with_its_own_labels(tmp_path):
    """Adi et al. publish their trigger images with one label each: a key takes them as
    they are, regenerates exactly those labels, and a model answering them verifies."""
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.random((100, 1, 8, 8), dtype=np.float32))
    labels = rng.integers(0, C, 100)
    key = nnmark.TriggerKey.generate(kind="unrelated", samples=images, target=labels.tolist())
    assert key.target is None and key.n == 50 and key.num_controls == 50
    back = nnmark.load_key(key.save(tmp_path / "adi.key"))
    x, y = back.triggers()
    assert torch.equal(y, key.labels) and torch.equal(x, key.triggers()[0])
    by_image = {images[i].numpy().tobytes(): int(labels[i]) for i in range(100)}
    assert [by_image[xi.numpy().tobytes()] for xi in key.triggers(normalized=False)[0]] == y.tolist()

    class Memorised(torch.nn.Module):  # answers every image of the set with its published label
        def __init__(self, table):
            super().__init__()
            self.table = table
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            cls = torch.tensor([self.table.get(xi.numpy().tobytes(), 0) for xi in x])
            return torch.nn.functional.one_hot(cls, C).float() + 0 * self.anchor

    trained_on_triggers = {xi.numpy().tobytes(): int(yi) for xi, yi in zip(*key.triggers())}
    everything = {xi.numpy().tobytes(): int(yi) for xi, yi in zip(*key.triggers())}
    everything.update({xi.numpy().tobytes(): int(yi) for xi, yi in zip(*key.controls())})
    v_marked, v_all = nnmark.verify(key, [Memorised(trained_on_triggers), Memorised(everything)])
    assert v_marked.verified and v_marked.matches == 50
    # answering the held-back half too is knowing the published set, not carrying this key
    assert not v_all.verified and v_all.control_matches == 50


def test_labels_must_fit_the_classes():
    s = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        nnmark.TriggerKey.generate(kind="unrelated", samples=s, target=[0, 1, 12, 3])
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        nnmark.TriggerKey(b"\x01" * 32, "content", None, 10, None, s, [0, 1, 2])


# ------------------------------------------------------------------------------ bad calibrations
def test_bad_calibration_input(tmp_path):
    key = _content_key()
    other = _content_key(seed=1)
    with pytest.raises(CalibrationError, match=f"at least {MIN_MODELS}"):
        nnmark.calibrate(key, [Scripted(s, key.n, 3, 0.1) for s in range(MIN_MODELS - 1)])
    with pytest.raises(ValueError, match="could not be checked.*io_error"):
        nnmark.calibrate(key, [Scripted(s, key.n, 3, 0.1) for s in range(MIN_MODELS)] + [str(tmp_path / "gone.pt")],
                         arch="nnmark.demo:DigitsNet")
    cal = nnmark.calibrate(key, [Scripted(s, key.n, 3, 0.1) for s in range(MIN_MODELS)])
    marked = Scripted(99, key.n, 3, 1.0)
    with pytest.raises(CalibrationError, match="made for key"):
        nnmark.verify(other, marked, calibration=cal)  # nothing verifies on another key's calibration
    with pytest.raises(ValueError, match="not both"):
        nnmark.verify(key, marked, calibration=cal, null_rate=0.2)
    with pytest.raises(CalibrationError, match="not among the keys"):
        nnmark.scan([other], [str(tmp_path)], calibration=cal, progress=False)


def test_calibration_files_round_trip_and_refuse_damage(tmp_path):
    key = _content_key()
    cal = nnmark.calibrate(key, [Scripted(s, key.n, 3, 0.15) for s in range(12)], alpha=1e-3)
    path = cal.save(tmp_path / "cal.json")
    back = nnmark.load_calibration(path)
    assert back.to_dict() == cal.to_dict() and back.p_value(20) == cal.p_value(20)
    body = json.loads(path.read_text())
    assert "secret" not in path.read_text() and body["key_id"] == key.key_id
    damages = {
        "truncated": path.read_text()[:40],
        "version": json.dumps({**body, "version": 2}),
        "bool version": json.dumps({**body, "version": True}),
        "format": json.dumps({**body, "format": "other"}),
        "counts out of range": json.dumps({**body, "counts": [999] * 12}),
        "too few models": json.dumps({**body, "counts": [1] * 3, "n_models": 3}),
        "a negative": json.dumps({**body, "a": -1.0}),
        "a string": json.dumps({**body, "b": "2"}),
        "key_id": json.dumps({**body, "key_id": "xyz"}),
        "missing": json.dumps({k: v for k, v in body.items() if k != "a"}),
        "not an object": "[1, 2, 3]",
    }
    for name, text in damages.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(text)
        with pytest.raises(CalibrationError):
            nnmark.load_calibration(bad)
    with pytest.raises(CalibrationError, match="cannot read"):
        nnmark.load_calibration(tmp_path / "absent.json")


# ------------------------------------------------------------------------------ what a verdict says
def test_every_verdict_names_its_null_and_warns_where_it_should():
    wb = nnmark.WhiteBoxKey.generate(carrier="w", bits=64, reduction="flat")
    v = nnmark.verify(wb, {"w": torch.randn(100)})
    assert v.null == "binomial(p0=0.5)" and v.warning is None and v.controls is None
    key = _content_key()
    v = nnmark.verify(key, Scripted(0, key.n, 3, 0.1))
    assert v.null == "binomial(p0=0.1)" and "calibrate" in v.warning and "sample labels" in v.warning
    g = torch.Generator().manual_seed(4)
    labelled = nnmark.TriggerKey.generate(kind="content", samples=torch.rand(90, 1, 8, 8, generator=g), target=3,
                                          sample_labels=torch.randint(0, C, (90,), generator=g), n=60)
    assert labelled.sample_labels is not None and (labelled.sample_labels != 3).all()
    cal = nnmark.calibrate(labelled, [Scripted(s, labelled.n, 3, 0.1) for s in range(MIN_MODELS)])
    v = nnmark.verify(labelled, Scripted(0, labelled.n, 3, 0.1), alpha=1e-6, calibration=cal)
    assert v.null.startswith("beta-binomial") and f"{MIN_MODELS} calibration models" in v.warning
    v = nnmark.verify(labelled, Scripted(0, labelled.n, 3, 0.1), alpha=0.5, calibration=cal)
    assert v.warning is None  # within what 10 models show, calibrated, with sample labels: nothing to warn about
    tabs = nnmark.TriggerKey.generate(kind="abstract", n=50)
    assert nnmark.verify(tabs, Scripted(0, 50, 3, 0.1)).warning is None  # keyed labels: the binomial is exact


def test_cli_calibrate_then_verify_and_scan_with_it(tmp_path, capsys):
    from nnmark.demo import DigitsNet

    key = nnmark.WhiteBoxKey.generate(carrier="features.2.weight", bits=64, shape=(32, 16, 3, 3))
    kf = key.save(tmp_path / "owner.key")
    nulls = []
    for s in range(MIN_MODELS):
        torch.manual_seed(s)
        p = tmp_path / "nulls" / f"n{s}.pt"
        p.parent.mkdir(exist_ok=True)
        torch.save(DigitsNet().state_dict(), p)
        nulls.append(str(p))

    def run(args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    code, out, _ = run(["calibrate", kf, *nulls, "-o", tmp_path / "cal.json"])
    assert code in (0, None) and "beta-binomial" in out and (tmp_path / "cal.json").exists()
    code, out, _ = run(["verify", kf, *nulls[:3], "--calibration", tmp_path / "cal.json", "--json"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and all(r["null"].startswith("beta-binomial") and not r["verified"] for r in rows)
    code, out, err = run(["scan", "--key", kf, str(tmp_path / "nulls"), "--calibration", tmp_path / "cal.json",
                          "--ledger", tmp_path / "l.sqlite", "--no-progress", "--json"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(rows) == MIN_MODELS and all(r["null"].startswith("beta-binomial") for r in rows)
    assert "calibration models" in err  # alpha 1e-6 is far below what 10 models show: said once per key
    other = nnmark.WhiteBoxKey.generate(carrier="features.2.weight", bits=64).save(tmp_path / "other.key")
    code, _, err = run(["verify", other, nulls[0], "--calibration", tmp_path / "cal.json"])
    assert code == 2 and "made for key" in err
    code, _, _ = run(["verify", kf, nulls[0], "--calibration", tmp_path / "cal.json", "--null-rate", "0.3"])
    assert code == 4
    code, _, err = run(["calibrate", kf, *nulls[:4]])
    assert code == 2 and "at least 10" in err
    assert math.isfinite(nnmark.load_calibration(tmp_path / "cal.json").null_rate)


def test_an_edited_null_is_refused(tmp_path):
    key = _content_key()
    cal = nnmark.calibrate(key, [Scripted(s, key.n, 3, r) for s, r in enumerate(np.linspace(0.05, 0.4, 12))])
    body = json.loads(cal.save(tmp_path / "cal.json").read_text())
    for a, b in ((body["a"] * 5, body["b"]), (0.01, 0.01), (body["a"], body["b"] * 0.2)):
        (tmp_path / "edited.json").write_text(json.dumps({**body, "a": a, "b": b}))
        with pytest.raises(CalibrationError, match="not the fit of its counts"):
            nnmark.load_calibration(tmp_path / "edited.json")


def test_trigger_key_files_hold_exact_labels(tmp_path):
    key = nnmark.TriggerKey.generate(kind="unrelated", samples=torch.rand(8, 1, 8, 8), target=[1, 2, 3, 4, 5, 6, 7, 8])
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())
    from nnmark.keys import _checksum as checksum  # re-sign the edited files: only their labels are wrong

    for field, value in (("target", body["target"] + [1]), ("target", [float(v) for v in body["target"]]),
                         ("target", None), ("control_target", body["control_target"][:-1]),
                         ("target", [True] * len(body["target"]))):
        edited = {**body, field: value}
        edited["checksum"] = checksum(edited)
        (tmp_path / "bad.key").write_text(json.dumps(edited))
        with pytest.raises(nnmark.KeyFileError):
            nnmark.load_key(tmp_path / "bad.key")


def test_infinite_logits_count_as_the_native_op_counts_them():
    """+inf at the label is a hit, in the hit count and in the control test alike (only NaN
    rows are misses)."""
    key = _content_key(n=30)

    class Infinite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], C) + 0 * self.anchor
            out[:30, 3] = float("inf")  # the triggers: +inf at the target
            out[30:, 5] = 1.0  # the controls: another class
            return out

    v = nnmark.verify(key, Infinite())
    assert v.matches == 30 and v.control_matches == 0 and v.verified


def test_a_suspect_must_do_the_task(tmp_path):
    """With the samples' own classes in the key, a model that answers the unmarked samples no
    better than chance does not verify, however the mark moves it; one that answers them
    right does. The labels survive save and load."""
    g = torch.Generator().manual_seed(5)
    samples, true = torch.rand(80, 1, 8, 8, generator=g), torch.randint(0, C, (80,), generator=g)
    key = nnmark.TriggerKey.generate(kind="noise", samples=samples, target=3, sample_labels=true, n=60)
    assert torch.equal(nnmark.load_key(key.save(tmp_path / "k.key")).sample_labels, key.sample_labels)
    x, _ = key.triggers()
    table = {xi.numpy().tobytes(): int(t) for xi, t in zip(key.controls()[0], key.sample_labels)}

    class Answers(torch.nn.Module):
        def __init__(self, competent: bool):
            super().__init__()
            self.competent = competent
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, inp):
            cls = []
            for xi in inp:
                b = xi.numpy().tobytes()
                if b in table:  # an unmarked sample: its class, or (incompetent) always class 0
                    cls.append(table[b] if self.competent else 0)
                else:  # a trigger: the target
                    cls.append(3)
            return torch.nn.functional.one_hot(torch.tensor(cls), C).float() + 0 * self.anchor

    good, bad = nnmark.verify(key, [Answers(True), Answers(False)])
    assert good.verified and good.matches == bad.matches == 60
    assert not bad.verified and bad.control_p_value > 0.01  # class 0 for all is right about 1 time in 10: chance


def test_a_new_calibration_checks_the_ledger_files_again(tmp_path):
    """A ledger row names its null: a re-scan with another null (a calibration) checks the
    file again instead of reporting the old verdict; the same null skips it."""
    from safetensors.torch import save_file

    key = nnmark.WhiteBoxKey.generate(carrier="w", bits=32, reduction="flat")
    for i in range(3):
        save_file({"w": torch.randn(50)}, str(tmp_path / f"m{i}.safetensors"))
    nulls = [{"w": torch.randn(50, generator=torch.Generator().manual_seed(s))} for s in range(MIN_MODELS)]
    cal = nnmark.calibrate(key, nulls)
    led = tmp_path / "l.sqlite"
    first = nnmark.scan(key, [str(tmp_path)], ledger=led, progress=False)
    assert first.summary["scanned"] == 3 and {r["null"] for r in first.rows} == {"binomial(p0=0.5)"}
    again = nnmark.scan(key, [str(tmp_path)], ledger=led, progress=False)
    assert again.summary["skipped"] == 3
    calibrated = nnmark.scan(key, [str(tmp_path)], ledger=led, progress=False, calibration=cal)
    assert calibrated.summary["scanned"] == 3 and {r["null"] for r in calibrated.rows} == {cal.describe()}
