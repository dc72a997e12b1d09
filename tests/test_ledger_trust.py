"""A ledger is trusted only when it can be (issue 13): identity a user cannot set back
(inode, ctime), rows signed with a MAC keyed from the key, hostile SQLite files refused,
names that are not UTF-8, and a ledger that fails mid-scan stopping the scan cleanly."""
from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time

import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark import scan as scan_fn
from nnmark.cli import main
from nnmark.ledger import _ADDED, FIELDS, SCHEMA_VERSION, Ledger, LedgerError, mac_key, row_verifies
from nnmark.scan.engine import make_check

CARRIER = "w"
SHAPE = (16, 64)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def key():
    return nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32, reduction="flat", shape=SHAPE)


def _marked(key) -> torch.Tensor:
    # w = X^T s: its projection X w = X X^T s has the owner's signs (N >> T)
    s = key.bits.float() * 2 - 1
    return (key.project_vectors(torch.eye(SHAPE[0] * SHAPE[1])) @ s).reshape(SHAPE)


def _plain(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _folder(tmp_path, key, n_plain: int = 1):
    d = tmp_path / "models"
    d.mkdir()
    save_file({CARRIER: _marked(key)}, str(d / "marked.safetensors"))
    for i in range(n_plain):
        save_file({CARRIER: _plain(i)}, str(d / f"plain{i}.safetensors"))
    return d


def _scan(key, d, led, **kw):
    return scan_fn(key, [str(d)], ledger=led, progress=False, workers=1, **kw)


def _by_name(res):
    return {os.path.basename(r["path"]): r for r in res.rows}


def _db(path):
    return sqlite3.connect(path, isolation_level=None)


def test_rewrite_with_size_and_mtime_restored_is_checked_again(tmp_path, key):
    """`touch -r`: the content changes, size and mtime are put back; the ctime cannot be."""
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    first = _by_name(_scan(key, d, led))
    assert first["marked.safetensors"]["verified"] and first["marked.safetensors"]["inode"] is not None
    p = d / "marked.safetensors"
    st = os.stat(p)
    assert first["marked.safetensors"]["ctime_ns"] == st.st_ctime_ns
    buf = tmp_path / "plain.safetensors"
    save_file({CARRIER: _plain(99)}, str(buf))
    data = buf.read_bytes()
    assert len(data) == st.st_size
    with open(p, "r+b") as f:  # in place: the inode stays the same
        f.write(data)
    for _ in range(400):  # timestamps tick coarsely: restore the mtime until the ctime has moved on
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        if os.stat(p).st_ctime_ns != st.st_ctime_ns:
            break
        time.sleep(0.005)
    now = os.stat(p)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    res = _scan(key, d, led)
    by = _by_name(res)
    assert res.summary["skipped"] == 1 and res.summary["scanned"] == 1  # plain0 unchanged; marked read again
    assert by["marked.safetensors"]["skipped"] is False and by["marked.safetensors"]["verified"] is False
    assert res.exit_code == 1


def test_hand_edited_row_is_checked_again_and_the_truth_reported(tmp_path, key):
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    assert _scan(key, d, led).summary["not_verified"] == 1
    db = _db(led)
    db.execute("UPDATE results SET verified=1, matches=32, p_value=1e-12 WHERE path LIKE '%plain0%'")
    db.close()
    with Ledger(led) as lg:
        rows = {os.path.basename(r["path"]): r for r in lg.rows()}
    assert not row_verifies(rows["plain0.safetensors"], mac_key(key))
    assert row_verifies(rows["marked.safetensors"], mac_key(key))
    res = _scan(key, d, led)
    by = _by_name(res)
    assert by["plain0.safetensors"]["skipped"] is False and by["plain0.safetensors"]["verified"] is False
    assert by["marked.safetensors"]["skipped"] is True and res.exit_code == 1
    with Ledger(led) as lg:  # the forged row was replaced by a signed one
        assert all(row_verifies(r, mac_key(key)) for r in lg.rows())


def test_injected_rows_are_not_trusted(tmp_path, key):
    """A row for a file never scanned, with the file's true identity and a copied MAC."""
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    _scan(key, d, led)
    late = d / "late.safetensors"
    save_file({CARRIER: _plain(7)}, str(late))
    st = os.stat(late)
    with Ledger(led) as lg:
        (good,) = [r for r in lg.rows() if r["path"].endswith("marked.safetensors")]
    forged = {**good, "path": str(late), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
              "ctime_ns": st.st_ctime_ns}  # a verified verdict, the marked file's valid MAC
    with Ledger(led) as lg:
        lg.write([forged])  # no MAC keys: the row keeps the copied mac
    res = _scan(key, d, led)
    by = _by_name(res)
    assert by["late.safetensors"]["skipped"] is False and by["late.safetensors"]["verified"] is False
    assert res.summary["skipped"] == 2 and res.summary["verified"] == 1


def test_a_row_that_stops_verifying_during_the_scan_is_not_shown(tmp_path, key, monkeypatch):
    """Edited after the scan chose to skip the file: an error row, checked again next time."""
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    _scan(key, d, led)
    real = Ledger.identities

    def then_edit(self, *a, **kw):
        out = real(self, *a, **kw)
        db = _db(led)  # another connection, as another process would
        db.execute("UPDATE results SET verified=1 WHERE path LIKE '%plain0%'")
        db.close()
        return out

    monkeypatch.setattr(Ledger, "identities", then_edit)
    res = _scan(key, d, led)
    by = _by_name(res)
    assert by["plain0.safetensors"]["status"] == "error" and not by["plain0.safetensors"]["verified"]
    assert by["plain0.safetensors"]["error_class"] == "UntrustedLedgerRow" and res.exit_code == 2
    monkeypatch.undo()
    res = _scan(key, d, led)
    assert _by_name(res)["plain0.safetensors"]["status"] == "ok" and res.summary["scanned"] == 1


def _plant(path, sql):
    db = _db(path)
    db.executescript(sql)
    db.close()


def test_a_planted_trigger_is_refused_before_it_can_run(tmp_path, key, capsys):
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    _scan(key, d, led)
    _plant(led, """CREATE TABLE pwned (x);
        CREATE TRIGGER t1 AFTER INSERT ON results BEGIN INSERT INTO pwned VALUES ('insert'); END;
        CREATE TRIGGER t2 AFTER UPDATE ON meta BEGIN INSERT INTO pwned VALUES ('meta'); END;
        CREATE TRIGGER t3 BEFORE DELETE ON results BEGIN INSERT INTO pwned VALUES ('delete'); END;""")
    for attempt in (lambda: Ledger(led), lambda: _scan(key, d, led, rescan=True),
                    lambda: nnmark.ledger.export_ledger(led, io.StringIO())):
        with pytest.raises(LedgerError, match="trigger 't1'"):
            attempt()
    kf = tmp_path / "k.key"
    key.save(kf)
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--key", str(kf), "--ledger", str(led), "--no-progress", "--rescan", str(d)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "trigger" in err and "Traceback" not in err
    db = _db(led)
    assert db.execute("SELECT COUNT(*) FROM pwned").fetchone()[0] == 0  # it never ran


@pytest.mark.parametrize("sql, what", [
    ("CREATE VIEW v AS SELECT * FROM results", "view 'v'"),
    ("ALTER TABLE results ADD COLUMN extra TEXT", "unexpected columns ['extra']"),
    ("ALTER TABLE results ADD COLUMN g INTEGER GENERATED ALWAYS AS (size + 1) VIRTUAL", "unexpected columns"),
    ("ALTER TABLE results DROP COLUMN warning", "missing columns ['warning']"),
])
def test_other_hostile_schemas_are_refused(tmp_path, sql, what):
    led = tmp_path / "l.sqlite"
    Ledger(led).close()
    _plant(led, sql)
    with pytest.raises(LedgerError, match=what.replace("[", r"\[").replace("]", r"\]")):
        Ledger(led)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_as_ledger_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "l.sqlite")
    with pytest.raises(LedgerError, match="not a regular file"):
        Ledger(tmp_path / "l.sqlite")


def test_a_version_2_ledger_migrates_and_its_rows_are_checked_again(tmp_path, key):
    d = _folder(tmp_path, key)
    led = tmp_path / "v2.sqlite"
    old = [c for c in FIELDS if c not in _ADDED[3]]
    db = _db(led)
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute(f"CREATE TABLE results ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in old)}, "
               f"PRIMARY KEY (path, key_id)) WITHOUT ROWID")
    p = d / "plain0.safetensors"
    st = os.stat(p)
    # what a v2 scan wrote, with its verdict turned to "verified": the identity a v2 scan trusted
    lie = dict(path=str(p), key_id=key.key_id, size=st.st_size, mtime_ns=st.st_mtime_ns, format="safetensors",
               status="ok", verified=1, matches=32, bits=32, alpha=1e-6, threshold=30,
               null=make_check(key).null)
    db.execute(f"INSERT INTO results ({', '.join(chr(34) + c + chr(34) for c in lie)}) "
               f"VALUES ({', '.join('?' * len(lie))})", list(lie.values()))
    db.close()
    res = _scan(key, d, led)
    assert res.summary["skipped"] == 0 and not _by_name(res)["plain0.safetensors"]["verified"]
    db = _db(led)
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert {"inode", "ctime_ns", "mac"} <= {r[1] for r in db.execute("PRAGMA table_info(results)")}
    assert _scan(key, d, led).summary["skipped"] == 2  # now signed


def test_a_name_that_is_not_utf8_round_trips(tmp_path, key, capsys):
    d = _folder(tmp_path, key, n_plain=0)
    odd = os.fsdecode(b"caf\xe9 \xff.safetensors")  # latin-1 bytes: not UTF-8
    save_file({CARRIER: _marked(key)}, os.path.join(str(d), odd))
    led = tmp_path / "l.sqlite"
    res = _scan(key, d, led)
    assert res.summary["files"] == 2 and res.exit_code == 0
    path = os.path.join(str(d), odd)
    db = _db(led)
    stored = dict(db.execute("SELECT typeof(path), path FROM results WHERE typeof(path) = 'blob'").fetchall())
    assert stored == {"blob": os.fsencode(path)}
    db.close()
    again = _scan(key, d, led)
    assert again.summary["skipped"] == 2 and {r["path"] for r in again.rows} == {path, str(d / "marked.safetensors")}
    with Ledger(led) as lg:
        assert [r["path"] for r in lg.rows(paths=[path])] == [path]
    out = io.StringIO()
    assert nnmark.ledger.export_ledger(led, out, "jsonl") == 2
    assert path in {json.loads(x)["path"] for x in out.getvalue().splitlines()}  # \udcXX escapes
    assert nnmark.ledger.export_ledger(led, tmp_path / "x.csv") == 2
    names = {r["path"] for r in csv.DictReader(open(tmp_path / "x.csv", encoding="utf-8", newline=""))}
    assert os.path.join(str(d), "caf\\xe9 \\xff.safetensors") in names
    kf = tmp_path / "k.key"
    key.save(kf)
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--key", str(kf), "--ledger", str(led), "--no-progress", "--json", "--rescan", str(d)])
    assert exc.value.code == 0
    assert path in {json.loads(x)["path"] for x in capsys.readouterr().out.splitlines()}


def test_a_full_disk_stops_the_scan_and_keeps_the_written_batches(tmp_path, key, monkeypatch, capsys):
    d = _folder(tmp_path, key, n_plain=5)
    led = tmp_path / "l.sqlite"
    real, calls = Ledger.write, []

    def full(self, rows, *a):
        calls.append(len(rows))
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, rows, *a)

    monkeypatch.setattr(Ledger, "write", full)
    res = _scan(key, d, led, batch_size=2)
    assert "database or disk is full" in res.summary["fatal"] and res.exit_code == 2
    assert len(calls) == 2 and len(res.rows) == 2  # stopped at the failing batch
    monkeypatch.undo()
    with Ledger(led) as lg:
        kept = [r["path"] for r in lg.rows()]
    assert kept == sorted(r["path"] for r in res.rows) and len(kept) == 2  # the first batch's rows
    kf = tmp_path / "k.key"
    key.save(kf)
    monkeypatch.setattr(Ledger, "write", full)
    calls.clear()
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--key", str(kf), "--ledger", str(led), "--no-progress", "--batch-size", "1", "--workers",
              "1", "--rescan", str(d)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        x for x in err.splitlines() if "disk is full" in x]


def test_a_read_only_ledger_is_a_clear_error(tmp_path, key, monkeypatch, capsys):
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    _scan(key, d, led)
    real = sqlite3.connect

    def read_only(db, *a, **kw):  # what a read-only file gives, whoever runs this
        return real(f"file:{db}?mode=ro", *a, uri=True, **kw)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    with pytest.raises(LedgerError, match="readonly"):
        Ledger(led)
    kf = tmp_path / "k.key"
    key.save(kf)
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--key", str(kf), "--ledger", str(led), "--no-progress", str(d)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot use the ledger" in err and "Traceback" not in err
    monkeypatch.undo()
    assert nnmark.ledger.export_ledger(led, io.StringIO()) == 2  # exports read it without writing


@pytest.mark.skipif(IS_ROOT, reason="root writes read-only files")
def test_a_chmod_read_only_ledger_and_folder(tmp_path, key):
    d = _folder(tmp_path, key)
    sub = tmp_path / "ro"
    sub.mkdir()
    led = sub / "l.sqlite"
    _scan(key, d, led)
    os.chmod(led, 0o444)
    try:
        with pytest.raises(LedgerError, match="read-only"):
            _scan(key, d, led)
        os.chmod(led, 0o644)
        os.chmod(sub, 0o555)
        with pytest.raises(LedgerError, match="not writable"):
            _scan(key, d, sub / "new.sqlite")
    finally:
        os.chmod(sub, 0o755)
        os.chmod(led, 0o644)


def test_the_mac_is_keyed_and_the_ledger_holds_no_secret(tmp_path, key):
    d = _folder(tmp_path, key)
    led = tmp_path / "l.sqlite"
    res = _scan(key, d, led)
    other = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32, reduction="flat", shape=SHAPE)
    for r in res.rows:
        assert len(r["mac"]) == 64 and row_verifies(r, mac_key(key)) and not row_verifies(r, mac_key(other))
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("l.sqlite*"))
    secret = key._secret
    assert secret not in raw and secret.hex().encode() not in raw and mac_key(key) not in raw
    assert mac_key(key) != secret and len(mac_key(key)) == 32
    dense = nnmark.DenseKey(torch.randn(24, 32).sign(), carrier=CARRIER, bits=[0, 1] * 12)
    trig = nnmark.TriggerKey.generate(n=10, num_classes=10, input_shape=(1, 4, 4))
    assert len({mac_key(k) for k in (key, other, dense, trig)}) == 4
