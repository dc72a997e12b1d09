"""The robustness report: grid runs on copies, JSON without secrets, PNGs, the CLI.

One small MLP on the bundled digits carries a white-box mark (flat carrier of its
hidden layer) and a trigger mark; every grid here has a few cells only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import nnmark
import nnmark.attacks
from conftest import requires_cuda
from nnmark import demo
from nnmark.robustness import ATTACKS, DEFAULT_GRID, RobustnessReport, parse_attack
from nnmark import robustness_report

ARCH = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""


def make() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and spares a 2-core CI box the
    thread contention that otherwise makes each step 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    """A trained MLP (~96% on digits) with both marks embedded while it trained."""
    data = demo.load_digits_split(0)
    # Fixed secrets: the fixture asserts both marks took, which a fresh secret made true
    # almost always, not always.
    bits = [int(b) for b in torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))]
    key = nnmark.WhiteBoxKey(bytes(range(32)), "1.weight", bits, reduction="flat", shape=(32, 64))
    tkey = nnmark.TriggerKey(bytes(range(1, 33)), kind="abstract", n=50, num_classes=10, input_shape=(1, 8, 8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
        wm, mixer = nnmark.Uchida(key, strength=0.05), nnmark.TriggerMixer(tkey, per_batch=8)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            order = torch.randperm(len(data.x_train), generator=g)
            for i in range(0, len(order), 64):
                xb, yb = mixer.mix(data.x_train[order[i:i + 64]], data.y_train[order[i:i + 64]])
                loss = F.cross_entropy(model(xb), yb) + wm.penalty(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    assert nnmark.verify(key, model).ber == 0.0 and nnmark.verify(tkey, model).verified
    return model, key, tkey, data


def _secrets(tmp_path, *keys) -> list[str]:
    """The secrets as their key files store them (hex), to search reports for."""
    out = []
    for i, k in enumerate(keys):
        k.save(tmp_path / f"k{i}.key")
        out.append(json.loads((tmp_path / f"k{i}.key").read_text())["secret"])
    assert all(len(s) == 64 for s in out)
    return out


GRID = {"prune_global": [0.5, 0.9], "quantize": [4], "noise": [0.1], "ftal": [1], "fine_prune": [0.5],
        "overwrite": [1]}


def test_grid_on_copies_json_pngs_table(setup, tmp_path):
    model, key, tkey, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    calls = []
    rep = robustness_report(model, [key, tkey], train=(data.x_train, data.y_train), test=(data.x_test, data.y_test),
                            attacks=GRID, out_dir=tmp_path / "rep", progress=lambda *a: calls.append(a))
    # The model passed in never changes (every cell attacks a deep copy); the RNG is the caller's still.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    # One row per cell, the unattacked baseline first.
    assert [(r["attack"], r["strength"]) for r in rep.rows] == [
        ("baseline", 0), ("prune_global", 0.5), ("prune_global", 0.9), ("quantize", 4), ("noise", 0.1),
        ("ftal", 1), ("fine_prune", 0.5), ("overwrite", 1)]
    assert all(r["error"] is None for r in rep.rows), [r["error"] for r in rep.rows]
    base = rep.baseline
    assert base["marks"][key.key_id]["verified"] and base["marks"][key.key_id]["ber"] == 0.0
    assert base["marks"][tkey.key_id]["verified"] and base["marks"][tkey.key_id]["n"] == 50
    assert base["accuracy"] > 0.9
    # Pruning 90% of the weights costs accuracy; 50% barely.
    acc = {(r["attack"], r["strength"]): r["accuracy"] for r in rep.rows}
    assert acc[("prune_global", 0.9)] < base["accuracy"] - 0.2
    assert acc[("prune_global", 0.5)] > base["accuracy"] - 0.05
    prune9 = rep.rows[2]
    assert prune9["record"]["pruned"] == round(0.9 * prune9["record"]["total"])
    assert len(rep.rows[6]["record"]["pruned_channels"]) == 16  # half of the 32 hidden units
    # The overwrite record names the attacker's fresh key (seeded like every cell), never the owner's.
    ow = rep.rows[-1]["record"]
    theirs = nnmark.attacks.attacker_key_like(key, seed=0)
    assert ow["key_id"] == theirs.key_id and ow["key_id"] not in (key.key_id, tkey.key_id)
    # Progress: (done, total, what), ending at total.
    assert calls[-1][0] == calls[-1][1] == len(rep.rows)
    # robustness.json: everything, and no secret.
    text = (tmp_path / "rep" / "robustness.json").read_text()
    for s in _secrets(tmp_path, key, tkey, theirs):
        assert s not in text and s.upper() not in text
    d = json.loads(text)
    assert d["format"] == "nnmark-robustness" and d["alpha"] == 1e-6
    assert [m["key_id"] for m in d["marks"]] == [key.key_id, tkey.key_id]
    assert d["rows"] == json.loads(json.dumps(rep.to_dict()))["rows"]
    assert set(d["rows"][1]["marks"][key.key_id]) >= {"verified", "p_value", "ber", "match_rate", "matches", "n"}
    assert d["summary"][tkey.key_id]["prune_global"]["survives"] in (True, False)
    assert RobustnessReport.from_dict(d).rows == d["rows"]
    # One valid PNG per attack.
    import matplotlib.image

    assert set(rep.plots) == set(GRID) | {"distribution"}
    # The distribution table: only weight attacks ran, so the black-box row was not attacked.
    dist = d["distribution"]
    assert [r["distribution"] for r in dist["rows"]] == ["white-box", "black-box"]
    assert dist["rows"][0]["attacks"] == list(GRID) and dist["rows"][1]["attacks"] == []
    assert all(c["verified"] is None for c in dist["rows"][1]["cells"].values())
    assert dist == json.loads(json.dumps(rep.distribution_table().to_dict()))
    for attack, path in rep.plots.items():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", attack
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600
        assert img.std() > 0.01  # not a blank canvas
    # A table for people: a row per cell.
    from rich.console import Console

    t = rep.table()
    assert t.row_count == len(rep.rows)
    con = Console(record=True, width=120)
    con.print(t)
    out = con.export_text()
    assert "prune_global" in out and "overwrite" in out and f"{100 * base['accuracy']:.1f}%" in out


def test_permute_breaks_whitebox_and_realign_restores_it(setup):
    model, key, tkey, data = setup
    rep = robustness_report(model, [key, tkey], test=(data.x_test, data.y_test),
                            attacks={"permute": [0, 1], "permute+realign": [0, 1]}, progress=False)
    rows = {(r["attack"], r["strength"]): r for r in rep.rows}
    for s in (0, 1):
        perm, back = rows[("permute", s)], rows[("permute+realign", s)]
        assert not perm["marks"][key.key_id]["verified"] and perm["marks"][key.key_id]["ber"] > 0.2
        assert back["marks"][key.key_id]["verified"] and back["marks"][key.key_id]["ber"] == 0.0
        # The function is unchanged: the black-box mark and the accuracy stay.
        for r in (perm, back):
            assert r["marks"][tkey.key_id]["matches"] == rep.baseline["marks"][tkey.key_id]["matches"]
            assert abs(r["accuracy"] - rep.baseline["accuracy"]) <= 1 / len(data.y_test)
        assert "permute" in back["record"] and "realign" in back["record"]
    assert rep.survives(key)["permute"] == {"survives": False, "removed_at": 0,
                                            "accuracy_there": rows[("permute", 0)]["accuracy"]}
    assert rep.survives(key.key_id)["permute+realign"]["survives"] is True


@requires_cuda
def test_grid_on_cuda_leaves_the_cpu_model_alone(setup):
    model, key, tkey, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = robustness_report(model, [key, tkey], train=(data.x_train, data.y_train), test=(data.x_test, data.y_test),
                            attacks={"prune_global": [0.9], "ftal": [1], "overwrite": [1], "quantize": [4],
                                     "permute+realign": [1]}, device="cuda", progress=False)
    assert all(r["error"] is None for r in rep.rows), [r["error"] for r in rep.rows]
    assert rep.meta["device"] == "cuda"
    assert rep.baseline["marks"][key.key_id]["ber"] == 0.0 and rep.baseline["marks"][tkey.key_id]["verified"]
    assert rep.rows[-1]["marks"][key.key_id]["ber"] == 0.0  # realigned on the GPU too
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_attacks_skipped_without_data(setup):
    model, key, _, data = setup
    rep = robustness_report(model, key, attacks=["ftal", ("prune_layer", [0.5]), "fine_prune"], progress=False)
    assert [s["attack"] for s in rep.skipped] == ["ftal", "fine_prune"]
    assert "training data" in rep.skipped[0]["reason"]
    assert [r["attack"] for r in rep.rows] == ["baseline", "prune_layer"]
    assert rep.rows[1]["accuracy"] is None  # no test data: accuracy not measured
    assert any("skipped ftal" in line for line in rep.notes())
    assert rep.to_dict()["skipped"][0]["strengths"] == list(DEFAULT_GRID["ftal"])


@pytest.mark.parametrize("attacks, match", [
    ({"prune": [0.5]}, r"unknown attack 'prune'; expected one of prune_global"),
    ({"prune_global": [1.5]}, r"prune_global: strength must be a fraction in \[0, 1\], got 1.5"),
    ({"fine_prune": [0]}, r"fine_prune: strength must be a fraction in \(0, 1\]"),
    ({"quantize": [1]}, r"quantize: strength \(bits\) must be in \[2, 16\], got 1"),
    ({"ftal": [0.5]}, r"ftal: strength \(epochs\) must be an integer, got 0.5"),
    ({"overwrite": [float("nan")]}, r"overwrite: strength \(epochs\) must be an integer, got nan"),
    ({"noise": [-0.1]}, r"noise: strength must be a finite number >= 0"),
    ({"permute": [2]}, r"permute: strength must be 0 \(permutation only\) or 1"),
    ({"quantize": []}, r"quantize: no strengths given"),
    ({"quantize": "4"}, r"quantize: strengths must be a list of numbers"),
    ([("quantize", [4]), ("quantize", [2])], r"'quantize' appears twice"),
    ({}, r"the grid is empty"),
])
def test_bad_grids_are_refused_before_any_work(setup, attacks, match):
    model, key, _, _ = setup
    with pytest.raises(ValueError, match=match):
        robustness_report(model, key, attacks=attacks, progress=False)


def test_bad_arguments(setup):
    model, key, tkey, data = setup
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        robustness_report(model.state_dict(), key)
    with pytest.raises(TypeError, match="marks must be keys"):
        robustness_report(model, ["owner.key"])
    with pytest.raises(ValueError, match="same key is given twice"):
        robustness_report(model, [key, key])
    with pytest.raises(ValueError, match="alpha must be in"):
        robustness_report(model, key, alpha=2)
    with pytest.raises(ValueError, match="test: 450 inputs but 3 labels"):
        robustness_report(model, key, test=(data.x_test, data.y_test[:3]), attacks={"quantize": [4]})
    with pytest.raises(TypeError, match="attacks must be a dict"):
        robustness_report(model, key, attacks="quantize")


def test_parse_attack():
    assert parse_attack("prune_global:0.1,0.5") == ("prune_global", [0.1, 0.5])
    assert parse_attack("quantize:8,4") == ("quantize", [8, 4])
    assert parse_attack("permute+realign") == ("permute+realign", None)
    with pytest.raises(ValueError, match=r"strength 'x' is not a number \(expected e.g. quantize:8,7,6\)"):
        parse_attack("quantize:4,x")
    with pytest.raises(ValueError, match="unknown attack 'qantize'"):
        parse_attack("qantize:4")
    with pytest.raises(ValueError, match="bits.*must be in"):
        parse_attack("quantize:40")
    # Every default strength passes its own check; the demo's grid names real attacks.
    for name, spec in ATTACKS.items():
        assert [spec.check(s) for s in spec.defaults] == list(spec.defaults)
    assert set(demo.DEMO_GRID) <= set(ATTACKS)


def test_demo_writes_the_report(tmp_path):
    """run_demo's robustness stage (a tiny run: the full demo is test_cli's)."""
    res = demo.run_demo(tmp_path / "d", unmarked=1, epochs=1, bits=32, triggers=30, frontier=0,
                        robustness={"prune_global": [0.9], "permute+realign": [1]})
    rob = res["robustness"]
    assert [(r["attack"], r["strength"]) for r in rob["rows"]] == [("baseline", 0), ("prune_global", 0.9),
                                                                   ("permute+realign", 1)]
    assert {m["key_id"] for m in rob["marks"]} == {res["key_id"], res["deepsigns_key_id"], res["trigger_key_id"]}
    assert res["frontier_key_id"] is None and "frontier_verified" not in res["rows"][0]
    assert (tmp_path / "d" / "robustness" / "robustness.json").is_file()
    assert sorted(p.name for p in (tmp_path / "d" / "robustness").glob("*.png")) == ["distribution.png", "permute_realign.png",
                                                                                    "prune_global.png"]
    assert json.loads((tmp_path / "d" / "demo.json").read_text())["robustness"]["rows"] == rob["rows"]
    text = (tmp_path / "d" / "robustness" / "robustness.json").read_text()
    for name in ("owner.key", "deepsigns.key", "triggers.key"):
        assert json.loads((tmp_path / "d" / name).read_text())["secret"] not in text


def run(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: see one_thread
    return subprocess.run([sys.executable, "-m", "nnmark.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=env)


def test_cli_robustness(setup, tmp_path, capsys):
    model, key, tkey, data = setup
    (tmp_path / "arch.py").write_text(ARCH)
    key.save(tmp_path / "owner.key")
    tkey.save(tmp_path / "triggers.key")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "marked.safetensors"))
    arch = f"{tmp_path / 'arch.py'}:make"
    common = ("--arch", arch, "--key", tmp_path / "owner.key", "--key", tmp_path / "triggers.key")
    r = run("robustness", tmp_path / "marked.safetensors", *common, "--data", "digits",
            "--attack", "prune_global:0.5,0.9", "--attack", "quantize:4", "--out", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert [(x["attack"], x["strength"]) for x in d["rows"]] == [("baseline", 0), ("prune_global", 0.5),
                                                                ("prune_global", 0.9), ("quantize", 4)]
    assert d["rows"][0]["marks"][key.key_id]["verified"] and d["test_samples"] == 450
    assert d["rows"][2]["accuracy"] < d["rows"][0]["accuracy"] - 0.2
    assert (tmp_path / "out" / "robustness.json").is_file() and (tmp_path / "out" / "quantize.png").is_file()
    secrets = _secrets(tmp_path, key, tkey)
    assert not any(s in r.stdout + r.stderr for s in secrets)

    # In-process from here (same entry point and exit codes, no interpreter start-up).
    # A data file of one's own; an unmarked checkpoint: the table, and exit 1 (the
    # unattacked model does not carry the mark).
    save_file({"x_test": data.x_test[:100].contiguous(), "y_test": data.y_test[:100].contiguous()},
              str(tmp_path / "data.safetensors"))
    torch.manual_seed(1)
    save_file(make().state_dict(), str(tmp_path / "plain.safetensors"))
    rc, out, err = cli(capsys, "robustness", tmp_path / "plain.safetensors", "--arch", arch, "--key",
                       tmp_path / "owner.key", "--data", tmp_path / "data.safetensors", "--attack", "quantize:4",
                       "--attack", "ftal:1")
    assert rc == 1, out + err
    assert "quantize" in out and "baseline" in out and "skipped ftal" in out and "no " in out
    assert not any(s in out + err for s in secrets)

    # Bad command lines: exit 4, saying what was wrong; unreadable inputs: exit 2.
    marked = tmp_path / "marked.safetensors"
    rc, _, err = cli(capsys, "robustness", marked, *common, "--data", "digits", "--attack", "prune:0.5")
    assert rc == 4 and "unknown attack 'prune'" in err
    rc, _, err = cli(capsys, "robustness", marked, *common, "--data", "digits", "--attack", "quantize:1")
    assert rc == 4 and "must be in [2, 16]" in err
    rc, _, err = cli(capsys, "robustness", marked, *common, "--data", "digits", "--attack", "ftal:1",
                     "--attack", "ftal:2")
    assert rc == 4 and "'ftal' appears twice" in err
    rc, _, err = cli(capsys, "robustness", marked, *common, "--data", tmp_path / "nope.safetensors")
    assert rc == 4 and "neither 'digits' nor an existing safetensors file" in err
    save_file({"x_train": data.x_test[:10].contiguous()}, str(tmp_path / "bad.safetensors"))
    rc, _, err = cli(capsys, "robustness", marked, *common, "--data", tmp_path / "bad.safetensors")
    assert rc == 2 and "must hold tensors x_test and y_test" in err and "[red]" not in err
    rc, _, err = cli(capsys, "robustness", tmp_path / "bad.safetensors", *common, "--data", "digits")
    assert rc == 2 and "does not fit the architecture" in err
    rc, _, err = cli(capsys, "robustness", marked, "--arch", "nnmark.demo:NoSuchNet", "--key", tmp_path / "owner.key",
                     "--data", "digits")
    assert rc == 2 and "no callable 'NoSuchNet'" in err
    (tmp_path / "broken.key").write_text("{}")
    rc, _, err = cli(capsys, "robustness", marked, "--arch", arch, "--key", tmp_path / "broken.key", "--data", "digits")
    assert rc == 2 and "broken.key" in err


def cli(capsys, *args):
    """``nnmark ARGS`` in this process: (exit code, stdout, stderr)."""
    from nnmark.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    got = capsys.readouterr()
    return exc.value.code, got.out, got.err


def _row(attack, strength, acc, **marks):
    return {"attack": attack, "strength": strength, "accuracy": acc, "error": None, "record": None,
            "marks": {k: {"verified": v[0], "p_value": v[1], "status": "ok"} for k, v in marks.items()}}


def _report(rows):
    marks = [{"key_id": "a" * 16, "kind": "white-box", "type": "WhiteBoxKey"},
             {"key_id": "b" * 16, "kind": "black-box", "type": "TriggerKey", "trigger_kind": "abstract"}]
    return RobustnessReport(rows=rows, marks=marks, alpha=1e-6, seed=0, grid=[])


def test_distribution_table_picks_the_attackers_best():
    a, b = "a" * 16, "b" * 16
    rep = _report([
        _row("baseline", 0, 0.95, **{a: (True, 1e-20), b: (True, 1e-30)}),
        _row("prune_global", 0.9, 0.30, **{a: (False, 0.2), b: (False, 0.5)}),   # removes both, ruins the model
        _row("ftal", 1, 0.94, **{a: (True, 1e-9), b: (False, 0.01)}),           # removes b, keeps accuracy
        _row("overwrite", 1, 0.93, **{a: (True, 1e-7), b: (False, 0.02)}),      # closest call for a
        _row("distill", 1000, 0.91, **{a: (False, 0.4), b: (True, 1e-8)}),      # a query-only attack
        # A query filter leaves the weights alone: no attack on the white-box mark a (its row is ignored for a).
        _row("evasion", 0.01, 0.94, **{a: (False, 0.3), b: (True, 1e-12)}),
    ])
    t = rep.distribution_table()
    wa, wb, ba, bb = t["white-box"][a], t["white-box"][b], t["black-box"][a], t["black-box"][b]
    # White-box: the weight attacks. a survives every affordable one (pruning 90% cost 65 points):
    # the closest call is reported, and the costly removal beside it.
    assert (wa["verified"], wa["attack"], wa["p_value"]) == (True, "overwrite", 1e-7)
    assert wa["removed_at_cost"] == {"attack": "prune_global", "strength": 0.9, "accuracy": 0.30}
    assert t.attacks["white-box"] == ["prune_global", "ftal", "overwrite"]
    # b: the removal that kept the most accuracy.
    assert (wb["verified"], wb["attack"], wb["strength"], wb["accuracy"]) == (False, "ftal", 1, 0.94)
    # Black-box: only extraction ran; a's weights did not carry over, b's triggers did.
    assert t.attacks["black-box"] == ["distill", "evasion"]
    assert (ba["verified"], ba["attack"]) == (False, "distill")
    assert (bb["verified"], bb["attack"], bb["p_value"], bb["removed_at_cost"]) == (True, "distill", 1e-8, None)
    # Extraction: the budget at which each mark stops verifying, and the student's accuracy there.
    assert t.extraction[a] == {"distill": {"budgets": [1000], "stops_at": 1000, "student_accuracy": 0.91}}
    assert t.extraction[b]["distill"]["stops_at"] is None
    assert any("removes it from 1000 queries" in line for line in t.notes())
    assert any("survives extraction from top-1 labels" in line for line in t.notes())
    assert "forge_key" in t.notes()[-1] and "forge_key" in t.to_dict()["ambiguity"]  # ambiguity: the claims tools
    # Without extraction, nothing attacks a in the black-box row (evasion leaves the weights alone).
    del rep.rows[-2]
    t = rep.distribution_table()
    assert t["black-box"][a]["verified"] is None and t["black-box"][a]["attacks_run"] == 0  # evasion only
    assert t["black-box"][b]["attack"] == "evasion" and t["black-box"][b]["verified"]
    # A permutation the grid also realigned is undone by the verifier: only the realigned row counts.
    rep.rows += [_row("permute", 1, 0.95, **{a: (False, 0.5), b: (True, 1e-30)}),
                 _row("permute+realign", 1, 0.95, **{a: (True, 1e-20), b: (True, 1e-30)})]
    assert rep.distribution_table()["white-box"][a]["verified"]
    rep.rows.pop()
    assert rep.distribution_table()["white-box"][a]["attack"] == "permute"  # not realigned: it counts
    rep.rows.pop()
    # max_drop=None: any removal counts, even one that ruined the model.
    assert rep.distribution_table(max_drop=None)["white-box"][a]["attack"] == "prune_global"
    with pytest.raises(ValueError, match="max_drop"):
        rep.distribution_table(max_drop=2)
    # It prints (rich) and round-trips through JSON.
    from rich.console import Console

    con = Console(record=True, width=160)
    con.print(t)
    out = con.export_text()
    assert "white-box" in out and "black-box" in out and "Uchida" in out and "triggers (abstract)" in out
    assert RobustnessReport.from_dict(json.loads(json.dumps(rep.to_dict()))).distribution_table().to_dict() == \
        t.to_dict()
