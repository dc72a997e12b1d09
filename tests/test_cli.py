"""The command line as a user runs it: `python -m nnmark.cli ...` in a subprocess,
so exit codes are the real ones (0 ok, 1 not verified, 2 error, 4 usage)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark.demo import CARRIER, DigitsNet


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nnmark.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _mark(model: torch.nn.Module, key) -> None:
    """Embeds the key by optimising the carrier alone (fast stand-in for training)."""
    w = model.get_parameter(CARRIER)
    opt = torch.optim.Adam([w], lr=1e-2)
    wm = nnmark.Uchida(key, strength=1.0)
    for _ in range(300):
        opt.zero_grad()
        wm.penalty(model).backward()
        opt.step()
        if wm.ber(model) == 0:
            break
    assert wm.ber(model) == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, shape=(32, 16, 3, 3))
    key.save(d / "owner.key")
    marked, plain = DigitsNet(), DigitsNet()
    _mark(marked, key)
    save_file(marked.state_dict(), str(d / "marked.safetensors"))
    torch.save({"state_dict": marked.state_dict()}, d / "marked.ckpt")  # Lightning layout
    save_file(plain.state_dict(), str(d / "plain.safetensors"))
    (d / "garbage.bin").write_bytes(os.urandom(1000))
    return d, key


def test_info_json():
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert info["threads"] >= 1 and info["compiler"]
    assert info == {**info, **nnmark.build_info()} or info["cpu_isa"] == nnmark.build_info()["cpu_isa"]


def test_keygen_writes_private_key_and_never_prints_secret(tmp_path):
    path = tmp_path / "k.key"
    r = run("keygen", "--carrier", "features.3.weight", "--bits", "256", "--message", "ACME", "-o", path)
    assert r.returncode == 0, r.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    body = json.loads(path.read_text())
    assert body["secret"] not in r.stdout + r.stderr
    key = nnmark.load_key(path)
    assert key.num_bits == 256 and key.carrier == "features.3.weight"
    assert key.bits.tolist() == nnmark.message_bits("ACME", 256).tolist()
    # Refuses to overwrite without --force: a usage error, exit 4.
    again = run("keygen", "--carrier", "x.weight", "-o", path)
    assert again.returncode == 4 and "exists" in again.stderr
    assert nnmark.load_key(path).carrier == "features.3.weight"


def test_verify_marked_exit_0_and_json(files):
    d, key = files
    r = run("verify", d / "owner.key", d / "marked.safetensors", d / "marked.ckpt", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(d / "marked.safetensors"), str(d / "marked.ckpt")]
    for row in rows:
        assert row["verified"] is True and row["matches"] == 64 and row["bits"] == 64 and row["ber"] == 0.0
        assert row["status"] == "ok" and row["p_value"] <= 1e-6 and row["threshold"] == 51
        assert set(row) >= {"path", "verified", "matches", "bits", "ber", "p_value", "threshold", "status"}


def test_verify_unmarked_exit_1_table(files):
    d, _ = files
    r = run("verify", d / "owner.key", d / "marked.safetensors", d / "plain.safetensors")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1/2 verified" in r.stdout


def test_verify_bad_files_exit_2_but_all_rows(files, tmp_path):
    d, _ = files
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    r = run("verify", d / "owner.key", d / "marked.safetensors", d / "garbage.bin", empty, tmp_path / "missing.pt", "--json")
    assert r.returncode == 2
    rows = {row["path"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert len(rows) == 4
    assert rows[str(d / "marked.safetensors")]["verified"] is True
    assert rows[str(d / "garbage.bin")]["status"] == "unsupported"
    assert rows[str(empty)]["status"] == "corrupt"
    assert rows[str(tmp_path / "missing.pt")]["status"] == "io_error"
    for p in (d / "garbage.bin", empty, tmp_path / "missing.pt"):
        assert rows[str(p)]["verified"] is False and rows[str(p)]["p_value"] is None


def test_verify_tampered_key_exit_2(files, tmp_path):
    d, _ = files
    body = json.loads((d / "owner.key").read_text())
    body["carrier"] = "features.0.weight"
    bad = tmp_path / "bad.key"
    bad.write_text(json.dumps(body))
    r = run("verify", bad, d / "marked.safetensors")
    assert r.returncode == 2 and "checksum" in r.stderr


def test_usage_errors_exit_4(files):
    d, _ = files
    assert run("verify").returncode == 4
    assert run("verify", d / "owner.key", d / "marked.safetensors", "--alpha", "2").returncode == 4
    assert run("no-such-command").returncode == 4


def test_demo_end_to_end(tmp_path):
    """The README's main job: the marked model carries both marks, >= 10 independent unmarked models neither."""
    r = run("demo", "--out", tmp_path / "demo", "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(r.stdout)
    rows = res["rows"]
    assert rows[0]["model"] == "marked" and rows[0]["verified"] and rows[0]["ber"] == 0.0
    assert rows[0]["p_value"] <= 1e-6
    assert rows[0]["trigger_verified"] and rows[0]["trigger_matches"] >= 95  # >= 95% trigger hits
    unmarked = rows[1:]
    assert len(unmarked) >= 11 and not any(r["verified"] for r in unmarked)
    assert not any(r["trigger_verified"] for r in unmarked)
    # DeepSigns and frontier stitching too: the marked model verifies, no unmarked one does.
    assert rows[0]["deepsigns_verified"] and rows[0]["deepsigns_p_value"] <= 1e-6
    # Frontier: most triggers stitched back, few held-back ones (85-100 vs 0-7 in runs of the demo).
    assert rows[0]["frontier_verified"] and rows[0]["frontier_matches"] >= 70 and rows[0]["frontier_held_back"] <= 20
    assert not any(r["deepsigns_verified"] or r["frontier_verified"] for r in unmarked)
    assert res["unmarked_deepsigns_verified"] == res["unmarked_frontier_verified"] == 0
    # The report's distribution table: both ways of distributing the model, every mark.
    dist = res["robustness"]["distribution"]
    assert [r["distribution"] for r in dist["rows"]] == ["white-box", "black-box"]
    assert {c["scheme"] for c in dist["columns"]} == {"Uchida", "DeepSigns", "triggers (abstract)",
                                                      "frontier stitching"}
    assert "distill" in dist["rows"][1]["attacks"] and "evasion" in dist["rows"][1]["attacks"]
    assert all(c["verified"] in (True, False) for r in dist["rows"] for c in r["cells"].values())
    assert (tmp_path / "demo" / "robustness" / "distribution.png").is_file()
    # Both marks at once, with fresh random keys: within 2 points of the unmarked twin here;
    # the 1-point bounds of each mark alone are tested in test_whitebox and test_triggers.
    assert res["accuracy_drop"] <= 0.02 + 1e-9
    # No timing here: tests check behaviour, speed is for benchmarks/bench_demo_load.py.
    assert res["ok"] is True and "seconds" in res
    assert os.stat(tmp_path / "demo" / "owner.key").st_mode & 0o777 == 0o600
    # The saved models verify from disk with the saved key, as the demo's hint says.
    key = nnmark.load_key(tmp_path / "demo" / "owner.key")
    assert nnmark.verify(key, str(tmp_path / "demo" / "marked.safetensors")).verified
    # ... and so does the trigger key, through the CLI with --arch.
    r = run("verify", tmp_path / "demo" / "triggers.key", tmp_path / "demo" / "marked.safetensors",
            tmp_path / "demo" / "twin.safetensors", "--arch", "nnmark.demo:DigitsNet", "--json")
    assert r.returncode == 1, r.stdout + r.stderr  # the twin does not carry the mark
    marked, twin = map(json.loads, r.stdout.splitlines())
    assert marked["verified"] and marked["matches"] >= 95 and marked["bits"] == 100
    assert not twin["verified"] and twin["status"] == "ok"
    for name in ("triggers.key", "deepsigns.key", "frontier.key"):
        assert os.stat(tmp_path / "demo" / name).st_mode & 0o777 == 0o600
