"""The user guide (docs/guide.md) runs as written: each part's code blocks, in order, in
one Python namespace (bash blocks in a shell) in an empty folder, as a reader would
paste them. Then a few checks that the blocks did what the guide says."""
from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
SKIP = "<!-- guide-test: skip"


def parts() -> dict[str, list[tuple[str, str]]]:
    """{part title: [(language, code), ...]} for the '## ' parts, skipped blocks left out."""
    out: dict[str, list[tuple[str, str]]] = {}
    title = None
    skip_next = False
    lines = GUIDE.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        elif line.startswith(SKIP):
            skip_next = True
        elif line.startswith("```") and len(line) > 3:
            lang = line[3:].strip()
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            if title is not None and not skip_next:
                out[title].append((lang, "\n".join(lines[i + 1:j]) + "\n"))
            skip_next = False
            i = j
        i += 1
    return out


def run_part(title: str, folder: Path, monkeypatch) -> dict:
    """Runs one part's blocks in ``folder``; returns the Python namespace."""
    monkeypatch.chdir(folder)
    # `nnmark` in the bash blocks: this interpreter's nnmark, whatever is on PATH.
    bindir = folder / ".bin"
    bindir.mkdir()
    shim = bindir / "nnmark"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nnmark "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ns: dict = {"__name__": "__guide__"}
    blocks = parts()[title]
    assert blocks, f"no code in part {title!r}"
    for n, (lang, code) in enumerate(blocks):
        if lang == "python":
            exec(compile(code, f"{GUIDE.name}: {title}, block {n + 1}", "exec"), ns)
        elif lang == "bash":
            r = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, timeout=300)
            out = r.stdout + r.stderr
            assert r.returncode == 0, f"block {n + 1} of {title!r} failed ({r.returncode}):\n{out}"
            for bad in ("Traceback", "Usage:", "command not found", "No such option"):
                assert bad not in out, f"block {n + 1} of {title!r}:\n{out}"
            ns.setdefault("_bash", []).append(out)
        else:
            raise AssertionError(f"unknown code block language {lang!r} in {title!r}")
    return ns


def test_the_guide_has_the_four_parts():
    titles = list(parts())
    assert titles == ["1. Verify many checkpoints", "2. Benchmark schemes and attacks", "3. Embed in training",
                      "4. Claim ownership"]
    langs = {lang for blocks in parts().values() for lang, _ in blocks}
    assert langs == {"python", "bash"}


def test_part_1_verify_many_checkpoints(tmp_path, monkeypatch):
    ns = run_part("1. Verify many checkpoints", tmp_path, monkeypatch)
    assert "exit code 2" in ns["_bash"][0]  # the broken file
    rows = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert all(by_name[f"epoch{s}.{ext}"]["verified"] for s in range(2) for ext in ("safetensors", "ckpt"))
    assert not by_name["net0.pt"]["verified"] and by_name["broken.safetensors"]["status"] == "corrupt"
    with open(tmp_path / "verdicts.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    assert len((tmp_path / "runs.sha256").read_text().splitlines()) == 7
    assert ns["res"].summary["verified"] == 4


def test_part_2_benchmark_schemes_and_attacks(tmp_path, monkeypatch):
    ns = run_part("2. Benchmark schemes and attacks", tmp_path, monkeypatch)
    import nnmark

    assert nnmark.verify(ns["key"], ns["model"]).verified and nnmark.verify(ns["tkey"], ns["model"]).verified
    dkey = nnmark.load_key(tmp_path / "deepsigns.key")
    assert nnmark.verify(dkey, ns["marked"]).verified and not nnmark.verify(dkey, ns["model"]).verified
    assert nnmark.verify(ns["ekey"], ns["ewe"]).verified  # the entangled watermark
    report = json.loads((tmp_path / "report" / "robustness.json").read_text())
    assert len(report["rows"]) >= 6
    assert any(p.suffix == ".png" for p in (tmp_path / "report").iterdir())


def test_part_3_embed_in_training(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    ns = run_part("3. Embed in training", tmp_path, monkeypatch)
    import nnmark

    assert nnmark.verify(ns["key"], ns["model"]).verified  # the last block's (Hugging Face) model
    assert (tmp_path / "checkpoint.pt").exists()
    assert any(tmp_path.glob("hf-run/checkpoint-*/nnmark_state.json"))
    secret = json.loads((tmp_path / "owner.key").read_text())["secret"]
    for f in [tmp_path / "checkpoint.pt", *tmp_path.glob("hf-run/**/*"), *tmp_path.glob("lightning-run/**/*")]:
        if f.is_file():
            assert secret.encode() not in f.read_bytes() and bytes.fromhex(secret) not in f.read_bytes()
    assert re.search(r"nnmark\.examples\.minilm", GUIDE.read_text())  # the real-model example is shown


def test_part_4_claim_ownership(tmp_path, monkeypatch):
    """keygen -> commit -> train -> stamp -> certify -> check, as the guide writes it."""
    ns = run_part("4. Claim ownership", tmp_path, monkeypatch)
    import nnmark

    bash = "".join(ns["_bash"])
    assert "the release carries our commitment" in bash and "claim holds" in bash
    com = nnmark.load_commitment(tmp_path / "commitment.json")
    key = nnmark.load_key(tmp_path / "owner.key")
    assert com.matches(key) and nnmark.read_stamp(tmp_path / "release.safetensors") == com
    assert nnmark.read_stamp(tmp_path / "suspect.safetensors") is None
    cert = json.loads((tmp_path / "claim.json").read_text())
    assert cert["revealed_key"]["key_id"] == key.key_id and cert["verdict"]["verified"]
    assert stat.S_IMODE((tmp_path / "claim.json").stat().st_mode) == 0o600
    assert not ns["check"].holds and ns["check"].failures[0][0] == "commitment.commitment"
    secret = json.loads((tmp_path / "owner.key").read_text())["secret"]
    for name in ("commitment.json", "release.safetensors", "rows.jsonl"):  # published: no secret in them
        assert secret.encode() not in (tmp_path / name).read_bytes()
    r = subprocess.run([sys.executable, str(GUIDE.parent / "check_claim.py"), "claim.json", "suspect.safetensors",
                        "--commitment", "commitment.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "claim holds" in r.stdout, r.stdout + r.stderr  # the skipped block, as written

