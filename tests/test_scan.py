"""nnmark.scan over a generated corpus: hundreds of checkpoints in every format,
marked and unmarked, and every kind of bad input; resuming, SIGKILL, JSON, the CLI."""
from __future__ import annotations

import importlib
import io
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import nnmark
from nnmark import scan as scan_fn
from nnmark.cli import main
from nnmark.ledger import FIELDS, TIMING_FIELDS, Ledger, mac_key
from nnmark.scan import expand_paths, load_manifest, scan_batch, write_manifest

from _corpus import Evil, write

CARRIER = "features.3.weight"
SHAPE = (16, 16, 3, 3)
PER_FORMAT = 20  # marked and as many unmarked files per format
FORMATS = ("safetensors", "torch-zip", "torch-legacy", "lightning", "module-prefix")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _state(w, g):
    return {"features.0.weight": torch.randn(16, 1, 3, 3, generator=g), CARRIER: w,
            "features.3.bias": torch.randn(16, generator=g), "fc.weight": torch.randn(10, 16, generator=g)}


def _marked_carrier(key) -> torch.Tensor:
    """A carrier whose projection gives the owner's bits with margin (a stand-in for training)."""
    torch.manual_seed(0)
    w = (0.1 * torch.randn(SHAPE)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    target = key.bits.float()
    for _ in range(100):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(key.project(w), target, reduction="sum")
        loss.backward()
        opt.step()
        if loss.item() < 1e-2:  # every bit right, with margin
            break
    w = w.detach()
    assert nnmark.verify(key, w).ber == 0
    return w


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(root, keys, expected): expected[relative path] = ((status, error_class, verified) per key)."""
    root = tmp_path_factory.mktemp("corpus")
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, shape=SHAPE)
    key2 = nnmark.WhiteBoxKey.generate(carrier="fc.weight", bits=32, reduction="flat")
    marked = _marked_carrier(key)
    g = torch.Generator().manual_seed(1)
    exp = {}
    ok_plain = (("ok", None, False), ("ok", None, False))
    for fmt in FORMATS:
        (root / fmt / "deeper").mkdir(parents=True)
        for i in range(PER_FORMAT):
            sub = root / fmt / ("deeper" if i % 2 else "")
            w = marked + 1e-3 * torch.randn(SHAPE, generator=g)
            write(sub / f"marked{i:02d}.ckpt", _state(w, g), fmt)
            write(sub / f"plain{i:02d}.ckpt", _state(0.1 * torch.randn(SHAPE, generator=g), g), fmt)
            rel = os.path.relpath(sub, root)
            exp[os.path.normpath(f"{rel}/marked{i:02d}.ckpt")] = (("ok", None, True), ("ok", None, False))
            exp[os.path.normpath(f"{rel}/plain{i:02d}.ckpt")] = ok_plain
    # Hugging Face sharded checkpoints: the carrier in the second shard; one folder counts once
    for name, w in (("hf_marked", marked), ("hf_plain", 0.1 * torch.randn(SHAPE, generator=g))):
        d = root / name
        d.mkdir()
        sd = _state(w, g)
        parts = [{k: v for k, v in sd.items() if k != CARRIER}, {CARRIER: w}]
        wm = {}
        for i, part in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, str(d / fname))
            wm.update({k: fname for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        exp[f"{name}/model.safetensors.index.json"] = (("ok", None, name == "hf_marked"), ("ok", None, False))
    (root / "hf_marked" / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    exp["hf_marked/config.json"] = (("unsupported", "UnknownFormat", False),) * 2

    bad = root / "bad"
    bad.mkdir()
    base = _state(0.1 * torch.randn(SHAPE, generator=g), g)
    p = write(bad / "trunc_header.safetensors", base, "safetensors")
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: 8 + struct.unpack("<Q", raw[:8])[0] // 2])
    exp["bad/trunc_header.safetensors"] = (("corrupt", "TruncatedFile", False),) * 2
    p = write(bad / "trunc_data.safetensors", {CARRIER: base[CARRIER], "fc.weight": base["fc.weight"]}, "safetensors")
    n = struct.unpack("<Q", open(p, "rb").read(8))[0]
    hdr = json.loads(open(p, "rb").read(8 + n)[8:])
    cut = 8 + n + hdr[CARRIER]["data_offsets"][0] + 8
    open(p, "r+b").truncate(cut)
    # the whole file is corrupt (safetensors would refuse it), whichever tensor the cut hit
    exp["bad/trunc_data.safetensors"] = (("corrupt", "TruncatedFile", False),) * 2
    p = write(bad / "trunc.pt", base, "torch-zip")
    open(p, "r+b").truncate(os.path.getsize(p) // 2)
    exp["bad/trunc.pt"] = (("corrupt", None, False),) * 2
    (bad / "empty.pt").write_bytes(b"")
    exp["bad/empty.pt"] = (("corrupt", "EmptyFile", False),) * 2
    (bad / "garbage.bin").write_bytes(os.urandom(3000).replace(b"PK", b"pk").replace(b"\x80", b"\x81"))
    exp["bad/garbage.bin"] = (("unsupported", None, False),) * 2
    (bad / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    exp["bad/model.h5"] = (("unsupported", "UnsupportedFormat", False),) * 2
    with zipfile.ZipFile(bad / "archive.zip", "w") as z:
        z.writestr("notes.txt", "not a model")
    exp["bad/archive.zip"] = (("unsupported", "NotTorchZip", False),) * 2
    marker = root.parent / f"{root.name}-pwned"
    for legacy in (False, True):
        name = f"evil_{'legacy' if legacy else 'zip'}.pt"
        torch.save({**base, "payload": Evil(marker)}, bad / name, _use_new_zipfile_serialization=not legacy)
        exp[f"bad/{name}"] = (("unsafe", "UnsafePickle", False),) * 2
    write(bad / "no_carrier.safetensors", {k: v for k, v in base.items() if k != CARRIER}, "safetensors")
    exp["bad/no_carrier.safetensors"] = (("absent", "MissingCarrier", False), ("ok", None, False))
    write(bad / "wrong_shape.safetensors", {**base, CARRIER: torch.randn(8, 16, 3, 3)}, "safetensors")
    exp["bad/wrong_shape.safetensors"] = (("invalid", "WrongShape", False), ("ok", None, False))
    nan = marked.clone()
    nan[3, 2, 1, 1] = float("nan")
    write(bad / "nan.safetensors", {**base, CARRIER: nan}, "safetensors")
    exp["bad/nan.safetensors"] = (("invalid", "NonFinite", False), ("ok", None, False))
    inf = marked.clone()
    inf[0, 0, 0, 0] = float("inf")
    write(bad / "inf.pt", {**base, CARRIER: inf}, "torch-zip")
    exp["bad/inf.pt"] = (("invalid", "NonFinite", False), ("ok", None, False))
    write(bad / "int_carrier.safetensors", {**base, CARRIER: torch.ones(SHAPE, dtype=torch.int64)}, "safetensors")
    exp["bad/int_carrier.safetensors"] = (("invalid", "WrongDtype", False), ("ok", None, False))
    if not IS_ROOT:
        p = write(bad / "unreadable.safetensors", base, "safetensors")
        os.chmod(p, 0)
        exp["bad/unreadable.safetensors"] = (("io_error", "PermissionError", False),) * 2
    assert not marker.exists()
    return root, (key, key2), exp, marker, marked


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and k != "skipped"} for r in rows]


def _ledger_rows(path):
    with Ledger(path) as led:
        return _strip(led.rows())


def _check_rows(rows, root, keys, exp):
    got = {}
    for r in rows:
        rel = os.path.relpath(r["path"], root)
        assert (rel, r["key_id"]) not in got, f"two rows for {rel}"
        got[(rel, r["key_id"])] = r
    assert set(got) == {(rel, k.key_id) for rel in exp for k in keys}  # exactly one row per (file, key)
    for rel, per_key in exp.items():
        for k, (status, cls, verified) in zip(keys, per_key):
            r = got[(rel, k.key_id)]
            assert r["status"] == status, (rel, r["status"], r["error_message"])
            if cls is not None:
                assert r["error_class"] == cls, (rel, r["error_class"], r["error_message"])
            assert r["verified"] is verified, (rel, r["matches"], r["p_value"])
            if status == "ok":
                assert r["carrier_sha256"] and len(r["carrier_sha256"]) == 64 and r["error_class"] is None
                assert 0 <= r["matches"] <= r["bits"] and 0 < r["bytes_read"] <= r["size"]
            else:
                assert r["error_message"] and r["error_class"] and r["p_value"] is None


def test_scan_corpus_every_file_one_row_per_key(corpus, tmp_path):
    root, keys, exp, marker, _ = corpus
    ledger = tmp_path / "ledger.sqlite"
    res = scan_fn(list(keys), [str(root)], ledger=ledger, progress=False, batch_size=64)
    assert len(exp) > 200
    _check_rows(res.rows, str(root), keys, exp)
    assert not marker.exists(), "scanning ran a pickle's payload"
    s = res.summary
    assert s["files"] == s["scanned"] == len(exp) and s["skipped"] == 0 and s["rows"] == 2 * len(exp)
    n_marked = sum(v[0][2] for v in exp.values())
    assert s["verified"] == n_marked == len(FORMATS) * PER_FORMAT + 1
    assert s["per_key"][keys[0].key_id]["verified"] == n_marked and s["per_key"][keys[1].key_id]["verified"] == 0
    assert res.exit_code == 2  # some files could not be checked
    assert _ledger_rows(ledger) == sorted(_strip(res.rows), key=lambda r: (r["path"], r["key_id"]))
    # the same carrier bytes give the same digest whatever the format
    hf = [r for r in res.rows if r["path"].endswith("hf_marked/model.safetensors.index.json")][0]
    assert hf["format"] == "hf-sharded" and hf["carrier"] == CARRIER
    # the shards are not scanned on their own
    assert not any("model-0000" in r["path"] for r in res.rows)
    # the same verdicts as nnmark.verify, file by file
    some = [r for r in res.rows if r["key_id"] == keys[0].key_id and r["status"] == "ok"
            and r["format"] != "hf-sharded"][::25]  # verify() reads single files
    for r, v in zip(some, nnmark.verify(keys[0], [r["path"] for r in some])):
        assert (r["matches"], r["p_value"], r["threshold"], r["verified"]) == (v.matches, v.p_value, v.threshold,
                                                                                v.verified)


def test_rescan_skips_unchanged_files(corpus, tmp_path):
    root, keys, exp, _, _ = corpus
    sub = [str(root / "safetensors"), str(root / "torch-zip"), str(root / "bad")]
    ledger = tmp_path / "ledger.sqlite"
    first = scan_fn(list(keys), sub, ledger=ledger, progress=False)
    retried = sum(1 for r in first.rows if r["status"] == "io_error") // 2
    again = scan_fn(list(keys), sub, ledger=ledger, progress=False)
    assert again.summary["scanned"] == retried and again.summary["skipped"] == first.summary["files"] - retried
    assert _strip(again.rows) == _strip(first.rows) and all(r["skipped"] for r in again.rows if r["status"] != "io_error")
    assert again.exit_code == first.exit_code
    # a touched file (new mtime) is checked again, and only it
    target = root / "safetensors" / "plain00.ckpt"
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = scan_fn(list(keys), sub, ledger=ledger, progress=False)
    assert third.summary["scanned"] == 1 + retried
    # another alpha is another verdict: everything is checked again; rescan=True forces it too
    assert scan_fn(list(keys), sub, ledger=ledger, progress=False, alpha=1e-3).summary["skipped"] == 0
    assert scan_fn(list(keys), sub, ledger=ledger, progress=False, alpha=1e-3, rescan=True).summary["skipped"] == 0


def test_workers_and_batches_do_not_change_rows(corpus):
    root, keys, _, _, _ = corpus
    sub = [str(root / "torch-legacy"), str(root / "bad"), str(root / "hf_plain")]
    a = scan_fn(list(keys), sub, progress=False, workers=1, batch_size=1000)
    b = scan_fn(list(keys), sub, progress=False, workers=3, batch_size=3)
    assert _strip(a.rows) == _strip(b.rows)


def test_scan_batch_is_the_unit_of_work(corpus, tmp_path):
    root, keys, _, _, _ = corpus
    files = expand_paths([str(root / "lightning"), str(root / "bad")])
    keys[0].save(tmp_path / "k1.key")
    rows = scan_batch(files, [tmp_path / "k1.key", keys[1]], alpha=1e-6)  # key files or objects
    assert [(r["path"], r["key_id"]) for r in rows] == [(f, k.key_id) for f in files for k in keys]
    full = scan_fn(list(keys), [str(root / "lightning"), str(root / "bad")], progress=False)
    assert _strip(rows) == _strip(full.rows)
    # known identities skip files: no rows for them
    macs = {k.key_id: mac_key(k) for k in keys}
    with Ledger(None) as led:
        led.write(rows, macs)
        known = led.identities(macs=macs)
    assert scan_batch(files[:5], list(keys), known=known) == []


def test_vanishing_and_missing_files(corpus, tmp_path, monkeypatch):
    scan_mod = importlib.import_module("nnmark.scan")  # "import nnmark.scan" names the function nnmark.scan

    root, keys, _, _, _ = corpus
    d = tmp_path / "v"
    d.mkdir()
    for i in range(3):
        save_file({CARRIER: torch.randn(SHAPE)}, str(d / f"m{i}.safetensors"))
    real = scan_mod.walk_paths

    def listing_then_delete(paths, exclude=(), include_hidden=False):
        found = real(paths, exclude, include_hidden)
        os.remove(d / "m1.safetensors")  # gone between listing and reading
        return found

    monkeypatch.setattr(scan_mod, "walk_paths", listing_then_delete)
    res = scan_fn(keys[0], [str(d), str(tmp_path / "never-existed.pt")], progress=False)
    by = {os.path.basename(r["path"]): r for r in res.rows}
    assert [by[f"m{i}.safetensors"]["status"] for i in range(3)] == ["ok", "io_error", "ok"]
    assert by["m1.safetensors"]["error_class"] == "FileNotFoundError"
    assert by["never-existed.pt"]["status"] == "io_error"
    assert res.exit_code == 2


def test_special_files_never_block(tmp_path):
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32)
    os.mkfifo(tmp_path / "pipe")  # opening a FIFO for reading would wait for a writer forever
    save_file({CARRIER: torch.randn(SHAPE)}, str(tmp_path / "ok.safetensors"))
    os.symlink(tmp_path / "gone", tmp_path / "dangling.pt")
    bomb = b'{"a": ' + b"[" * 200_000  # nesting deeper than any parser's recursion limit
    (tmp_path / "nested.safetensors").write_bytes(struct.pack("<Q", len(bomb)) + bomb)
    res = scan_fn(key, [str(tmp_path)], progress=False)
    got = {os.path.basename(r["path"]): (r["status"], r["error_class"]) for r in res.rows}
    assert got == {"pipe": ("unsupported", "NotARegularFile"), "ok.safetensors": ("ok", None),
                   "dangling.pt": ("io_error", "FileNotFoundError"), "nested.safetensors": ("corrupt", "BadHeader")}


def test_unreadable_file_row(tmp_path, monkeypatch):
    """An unreadable file (chmod 000 for a user; a denied open for root) gets an io_error row."""
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32)
    p = str(tmp_path / "locked.safetensors")
    save_file({CARRIER: torch.randn(SHAPE)}, p)
    real = os.open

    def deny(path, *a, **kw):
        if os.fspath(path) == p:
            raise PermissionError(13, "Permission denied", path)
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    (row,) = scan_fn(key, [p], progress=False).rows
    assert (row["status"], row["error_class"]) == ("io_error", "PermissionError") and row["size"] > 0


def test_bytes_read_stay_near_the_carrier(tmp_path):
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64)
    p = tmp_path / "big.safetensors"
    save_file({CARRIER: torch.randn(SHAPE), **{f"layer{i}.weight": torch.randn(256, 256) for i in range(16)}}, str(p))
    (row,) = scan_fn(key, [str(p)], progress=False).rows
    header = 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]
    carrier_bytes = 4 * 16 * 16 * 9
    assert row["status"] == "ok" and row["bytes_read"] <= carrier_bytes + header + 64 * 1024
    assert row["size"] > 4_000_000


def test_json_lines_one_object_per_file_and_key(corpus):
    root, keys, exp, _, _ = corpus
    buf = io.StringIO()
    res = scan_fn(list(keys), [str(root / "bad"), str(root / "hf_marked")], progress=False, json_out=buf)
    objs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(objs) == len(res.rows) == len(keys) * res.summary["files"]
    assert len({o["path"] for o in objs}) == res.summary["files"]
    for o, r in zip(objs, res.rows):  # the row itself, in scan order: fields, then "skipped"
        assert list(o) == list(FIELDS) + ["skipped"]
        assert (o["path"], o["key_id"], o["status"], o["error_class"]) == (r["path"], r["key_id"], r["status"],
                                                                           r["error_class"])
        assert o["status"] in nnmark.rows.STATUSES and isinstance(o["verified"], bool) and o["skipped"] is False
    by_file = {}
    for o in objs:
        by_file.setdefault(o["path"], []).append(o["key_id"])
    assert all(ids == [k.key_id for k in keys] for ids in by_file.values())  # keys in the order given
    hf = [o for o in objs if o["format"] == "hf-sharded"][0]
    assert hf["verified"] is True and hf["status"] == "ok" and hf["key_id"] == keys[0].key_id


def test_manifest_flags_changed_files(tmp_path, corpus):
    root, keys, _, _, w = corpus
    d = tmp_path / "m"
    d.mkdir()
    for i in range(3):
        save_file({CARRIER: w, "fc.weight": torch.randn(10, 16)}, str(d / f"m{i}.safetensors"))
    man = tmp_path / "manifest.sha256"
    n, failed = write_manifest([str(d)], man)
    assert n == 3 and not failed
    digests = load_manifest(man)
    import hashlib

    assert digests[str(d / "m0.safetensors")] == hashlib.sha256((d / "m0.safetensors").read_bytes()).hexdigest()
    assert "m0.safetensors" in man.read_text()  # sha256sum format, paths relative to the manifest
    led = tmp_path / "l.sqlite"
    assert scan_fn(keys[0], [str(d)], ledger=led, progress=False).rows[0]["integrity"] is None
    res = scan_fn(keys[0], [str(d)], ledger=led, manifest=man, progress=False)
    assert [r["integrity"] for r in res.rows] == ["ok"] * 3 and res.exit_code == 0
    assert all(r["file_sha256"] == digests[r["path"]] for r in res.rows)
    # bit rot: one bit of fc.weight (stored last) flips; size and mtime stay as they were
    p1 = d / "m1.safetensors"
    st = os.stat(p1)
    raw = bytearray(p1.read_bytes())
    raw[-1] ^= 0x01
    p1.write_bytes(bytes(raw))
    os.utime(p1, ns=(st.st_atime_ns, st.st_mtime_ns))
    save_file({CARRIER: w}, str(d / "new.safetensors"))
    # size and mtime are blind to the rewrite; its ctime (which no user can set back) is not
    assert scan_fn(keys[0], [str(d)], ledger=led, progress=False).summary["skipped"] == 2
    res = scan_fn(keys[0], [str(d)], ledger=led, manifest=man, progress=False)
    assert res.summary["skipped"] == 0  # against a manifest every file is read again
    by = {os.path.basename(r["path"]): r["integrity"] for r in res.rows}
    assert by == {"m0.safetensors": "ok", "m1.safetensors": "changed", "m2.safetensors": "ok",
                  "new.safetensors": "unlisted"}
    assert all(r["verified"] for r in res.rows) and res.exit_code == 1 and res.summary["changed"] == 1


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_scan_exit_codes(tmp_path, corpus, capsys):
    root, keys, _, _, w = corpus
    kf = tmp_path / "owner.key"
    keys[0].save(kf)
    led = tmp_path / "l.sqlite"
    good, mixed, empty = tmp_path / "good", tmp_path / "mixed", tmp_path / "empty"
    for d in (good, mixed, empty):
        d.mkdir()
    for i in range(2):
        save_file({CARRIER: w}, str(good / f"g{i}.safetensors"))
        save_file({CARRIER: w}, str(mixed / f"g{i}.safetensors"))
    save_file({CARRIER: torch.randn(SHAPE)}, str(mixed / "plain.safetensors"))
    base = ["scan", "--key", kf, "--ledger", led, "--no-progress"]
    code, out, _ = _run_cli(base + [good], capsys)
    assert code == 0 and "2 files" in out
    code, out, err = _run_cli(base + ["--json", mixed], capsys)
    assert code == 1
    objs = [json.loads(x) for x in out.splitlines()]
    assert sorted(o["verified"] for o in objs) == [False, True, True] and "nnmark scan" in err
    code, _, _ = _run_cli(base + [root / "bad"], capsys)
    assert code == 2
    code, out, _ = _run_cli(base + [empty], capsys)
    assert code == 3 and "no files" in out
    code, _, _ = _run_cli(["scan", "--key", tmp_path / "missing.key", good], capsys)
    assert code == 2
    code, _, _ = _run_cli(["scan", "--key", kf, "--batch-size", "0", good], capsys)
    assert code == 4
    code, _, err = _run_cli(["manifest", good, "-o", tmp_path / "man.txt", "--no-progress"], capsys)
    assert code == 0 and len((tmp_path / "man.txt").read_text().splitlines()) == 2
    code, _, _ = _run_cli(base + ["--manifest", tmp_path / "man.txt", good], capsys)
    assert code == 0


def test_cli_registered_under_python_m(tmp_path):
    """`python -m nnmark.cli` runs cli.py as __main__: the commands must be registered there too."""
    r = subprocess.run([sys.executable, "-m", "nnmark.cli", "scan", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Exit codes" in r.stdout and "--ledger" in r.stdout


_KILLED_SCAN = textwrap.dedent("""
    import sys, time
    import nnmark
    from nnmark import ledger as L

    write = L.Ledger.write

    def slow_write(self, rows, *args):  # slow the scan down so that it is killed mid-way
        n = write(self, rows, *args)
        time.sleep(0.15)
        return n

    L.Ledger.write = slow_write
    nnmark.scan([nnmark.load_key(sys.argv[1])], [sys.argv[2]], ledger=sys.argv[3], batch_size=8, workers=2,
                progress=False)
""")


def test_sigkill_mid_scan_then_resume_matches_an_uninterrupted_scan(tmp_path, corpus):
    root, keys, _, _, _ = corpus
    kf = tmp_path / "k.key"
    keys[0].save(kf)
    target = str(root / "safetensors")
    total = len(expand_paths([target]))
    killed = tmp_path / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SCAN, str(kf), target, str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    rows_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if killed.exists():
                try:
                    with sqlite3.connect(killed) as db:
                        rows_at_kill = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                except sqlite3.Error:
                    rows_at_kill = 0
                if rows_at_kill >= 16:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    with sqlite3.connect(killed) as db:
        survived = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert rows_at_kill <= survived < total  # killed mid-way; no committed row was lost
    resumed = scan_fn(keys[0], [target], ledger=killed, progress=False)
    assert resumed.summary["skipped"] == survived and resumed.summary["scanned"] == total - survived
    fresh = tmp_path / "fresh.sqlite"
    scan_fn(keys[0], [target], ledger=fresh, progress=False)
    assert _ledger_rows(killed) == _ledger_rows(fresh)


class TinyNet(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_trigger_keys_in_a_scan(tmp_path):
    tkey = nnmark.TriggerKey.generate(n=30, input_shape=(1, 8, 8))
    wkey = nnmark.WhiteBoxKey.generate(carrier="fc.weight", bits=32, reduction="flat")
    x, y = tkey.triggers()
    xf = torch.cat([x.flatten(1), torch.ones(len(x), 1)], 1)  # fit weights and bias so argmax gives the labels
    sol = torch.linalg.lstsq(xf.double(), (10 * F.one_hot(y, 10)).double()).solution.float()
    marked = TinyNet()
    with torch.no_grad():
        marked.fc.weight.copy_(sol[:-1].T)
        marked.fc.bias.copy_(sol[-1])
    torch.manual_seed(3)
    save_file(marked.state_dict(), str(tmp_path / "marked.safetensors"))
    torch.save({"state_dict": {"model." + k: v for k, v in marked.state_dict().items()}}, tmp_path / "marked.ckpt")
    save_file(TinyNet().state_dict(), str(tmp_path / "plain.safetensors"))
    save_file(TinyNet(5).state_dict(), str(tmp_path / "other_arch.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"junk" * 10)
    res = scan_fn([tkey, wkey], [str(tmp_path)], arch=TinyNet, progress=False)
    got = {(os.path.basename(r["path"]), r["key_id"]): r for r in res.rows}
    t, w = tkey.key_id, wkey.key_id
    assert len(got) == 10
    assert got[("marked.safetensors", t)]["verified"] and got[("marked.ckpt", t)]["verified"]
    assert got[("marked.safetensors", t)]["carrier_sha256"] == got[("marked.ckpt", t)]["carrier_sha256"]
    assert got[("plain.safetensors", t)]["status"] == "ok" and not got[("plain.safetensors", t)]["verified"]
    assert got[("other_arch.safetensors", t)]["status"] == "invalid"
    assert got[("other_arch.safetensors", w)]["status"] == "ok"  # the white-box key reads its carrier anyway
    assert got[("junk.bin", t)]["status"] == got[("junk.bin", w)]["status"] == "unsupported"
    with pytest.raises(ValueError, match="arch"):
        scan_fn(tkey, [str(tmp_path)], progress=False)


def test_bad_arguments():
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32)
    with pytest.raises(ValueError, match="alpha"):
        scan_fn(key, ["."], alpha=2.0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        scan_fn(key, ["."], batch_size=0, progress=False)
    with pytest.raises(TypeError, match="key"):
        scan_fn([object()], ["."], progress=False)
    with pytest.raises(ValueError, match="key_id"):
        scan_fn([key, key], ["."], progress=False)
