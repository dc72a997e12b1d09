"""Hostile and broken input: one file, name or tensor never stops a run (issue 13).

Names are shown inert; an error nnmark did not expect gets an ``error`` row for the
file that raised it (and exit code 2), never a traceback that loses the other rows."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

import nnmark
from nnmark._display import inert, inert_line, markup_safe
from nnmark.scan import engine


def _marked(key, tmp_path, name):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g) * 0.1
    p = tmp_path / name
    save_file({key.carrier: w}, str(p))
    return str(p)


def _key():
    return nnmark.WhiteBoxKey.generate(carrier="conv.weight", bits=32, reduction="filter_mean", shape=(8, 3, 3, 3))


def test_unexpected_error_in_one_file_gives_error_rows_only_for_it(tmp_path, monkeypatch):
    key = _key()
    paths = [_marked(key, tmp_path, f"{n}.safetensors") for n in ("a", "bad", "c")]
    real = engine._verify_whitebox

    def flaky(check, files, rows, device):
        if any("bad" in f.path for f in files):
            raise RuntimeError("a kernel nobody foresaw")
        return real(check, files, rows, device)

    monkeypatch.setattr(engine, "_verify_whitebox", flaky)
    res = nnmark.scan(key, str(tmp_path), ledger=None, progress=False, workers=1)
    by = {r["path"].rsplit("/", 1)[1]: r for r in res.rows}
    assert set(by) == {"a.safetensors", "bad.safetensors", "c.safetensors"}
    assert by["bad.safetensors"]["status"] == "error"
    assert by["bad.safetensors"]["error_class"] == "RuntimeError"
    assert "a kernel nobody foresaw" in by["bad.safetensors"]["error_message"]
    assert by["a.safetensors"]["status"] == by["c.safetensors"]["status"] == "ok"
    assert res.exit_code == 2
    # verify (another front door) gives the same row, and never raises
    v = nnmark.verify(key, paths[1])
    assert v.status == "error" and not v.verified


def test_unexpected_error_while_reading_gives_an_error_row(tmp_path, monkeypatch):
    key = _key()
    _marked(key, tmp_path, "a.safetensors")
    _marked(key, tmp_path, "b.safetensors")

    real = engine._load

    def broken(source, label, *a, **k):
        if label.endswith("b.safetensors"):
            raise KeyError("bug")
        return real(source, label, *a, **k)

    monkeypatch.setattr(engine, "_load", broken)
    res = nnmark.scan(key, str(tmp_path), progress=False, workers=1)
    st = {r["path"].rsplit("/", 1)[1]: (r["status"], r["error_class"]) for r in res.rows}
    assert st == {"a.safetensors": ("ok", None), "b.safetensors": ("error", "KeyError")}
    assert res.exit_code == 2


def test_error_rows_are_checked_again_by_the_next_scan(tmp_path, monkeypatch):
    key = _key()
    _marked(key, tmp_path, "a.safetensors")
    led = tmp_path / "l.sqlite"
    real = engine._verify_whitebox
    monkeypatch.setattr(engine, "_verify_whitebox", lambda *a: (_ for _ in ()).throw(ValueError("once")))
    first = nnmark.scan(key, str(tmp_path), ledger=str(led), progress=False)
    assert [r["status"] for r in first.rows] == ["error"]
    monkeypatch.setattr(engine, "_verify_whitebox", real)
    second = nnmark.scan(key, str(tmp_path), ledger=str(led), progress=False)
    assert [(r["status"], r["skipped"]) for r in second.rows] == [("ok", False)]


def test_inert_escapes_controls_bidi_and_undecodable_bytes():
    assert inert("model.safetensors") == "model.safetensors"
    assert inert("a\x1b]0;pwned\x07b") == "a\\x1b]0;pwned\\x07b"
    assert inert("x\u202etxt.exe") == "x\\u202etxt.exe"
    assert inert(b"caf\xff.pt") == "caf\\xff.pt"
    assert inert("caf\udcff.pt") == "caf\\xff.pt"
    assert inert("\x9b31m") == "\\x9b31m"
    assert inert("línea ünïcode 模型") == "línea ünïcode 模型"
    assert inert_line("a\nb\tc") == "a\\nb\\tc"
    assert "\\[" in markup_safe("[/x] [bold]") and "\x1b" not in markup_safe("\x1b[31m")


def _cli(*args, cwd=None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "nnmark.cli", *map(str, args)], capture_output=True, cwd=cwd,
                          env=env, timeout=300)


# (a path holding "[/x]" is a folder "q[" with a file "x] ...": rich would read a closing tag)
HOSTILE_NAMES = ["a\x1b]0;pwned\x07b.safetensors", "q[/x] [bold]c.safetensors", "d\u202egpj.safetensors",
                 "e\x9b31mf.safetensors"]


def _hostile_folder(tmp_path, key):
    import os

    d = tmp_path / "models"
    d.mkdir()
    (d / "q[").mkdir()
    for n in HOSTILE_NAMES:
        _marked(key, d, n)
    (d / "junk\x1b[2J.pt").write_bytes(b"not a checkpoint")  # an error row whose message names the file
    raw = os.fsencode(str(d)) + b"/g\xff\x1b[31m.safetensors"  # not UTF-8 either
    with open(raw, "wb") as f:
        f.write(b"{}")
    return d


def _assert_inert(out: bytes):
    assert b"\x1b" not in out and b"\x07" not in out and b"\xc2\x9b" not in out, out[:2000]
    assert "\u202e".encode() not in out
    assert b"Traceback" not in out


def test_cli_verify_and_scan_show_hostile_names_inert(tmp_path):
    key = _key()
    kf = tmp_path / "owner.key"
    key.save(kf)
    d = _hostile_folder(tmp_path, key)
    files = sorted(str(p) for p in d.rglob("*") if p.is_file())
    r = _cli("verify", kf, *files)
    _assert_inert(r.stdout + r.stderr)
    assert r.returncode == 2  # the junk files cannot be checked
    assert b"\\x1b]0;pwned\\x07b.safetensors" in r.stdout  # shown, escaped
    assert b"q[/x] [bold]c.safetensors" in r.stdout.replace(b"\n", b"")  # markup shown as text
    r = _cli("scan", "--key", kf, d, "--ledger", tmp_path / "l.sqlite", "--no-progress")
    _assert_inert(r.stdout + r.stderr)
    assert r.returncode == 2
    assert b"junk\\x1b[2J.pt" in r.stdout + r.stderr


def test_legacy_pickle_that_torch_refuses_unnamed_is_unsafe_and_named(tmp_path):
    """A plain pickle (protocol 4: FRAME, STACK_GLOBAL) that would run os.system: torch's
    weights-only loader stops at the FRAME opcode without naming the global; nnmark's own
    opcode walk names it. Nothing runs."""
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"conv.weight": Evil()}, protocol=4))
    v = nnmark.verify(_key(), str(p))
    assert (v.status, v.error_class) == ("unsafe", "UnsafePickle")
    assert "os.system" in v.error_message and not marker.exists()
    # a damaged pickle torch refuses for its opcodes alone says why, without torch's advice to load unsafely
    q = tmp_path / "p4.pt"
    torch.save({"conv.weight": torch.ones(8, 3, 3, 3)}, q, _use_new_zipfile_serialization=False, pickle_protocol=4)
    v = nnmark.verify(_key(), str(q))
    assert (v.status, v.error_class) == ("corrupt", "UnpicklingError")
    assert "weights_only` set to `False`" not in v.error_message and "refused" in v.error_message
