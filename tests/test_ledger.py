"""nnmark.ledger: the SQLite schema, upserts, identities for resuming, exports."""
from __future__ import annotations

import csv
import io
import json
import math
import sqlite3

import pytest

from nnmark.cli import main
from nnmark.ledger import FIELDS, SCHEMA_VERSION, Ledger, default_ledger_path, export_ledger


def _row(i, key="k1", **kw):
    r = {f: None for f in FIELDS}
    r.update(path=f"/m/{i:04d}.safetensors", key_id=key, size=100 + i, mtime_ns=10**18 + i, format="safetensors",
             carrier="features.3.weight", carrier_sha256="ab" * 32, bytes_read=50, status="ok", verified=i % 2 == 0,
             matches=60, bits=64, ber=4 / 64, p_value=1e-9, threshold=51, alpha=1e-6, read_s=0.001, verify_s=0.002,
             scanned_at=1.7e9)
    r.update(kw)
    return r


def test_schema_and_crash_safe_settings(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        assert len(led) == 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # commits survive SIGKILL
    cols = [r[1] for r in db.execute("PRAGMA table_info(results)")]
    assert tuple(cols) == FIELDS
    pk = sorted((r[5], r[1]) for r in db.execute("PRAGMA table_info(results)") if r[5])
    assert [c for _, c in pk] == ["path", "key_id"]
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


MACS = {"k1": b"1" * 32, "k2": b"2" * 32}  # MAC keys (a scan derives them from its keys' secrets)


def test_write_upsert_and_read_back(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        assert led.write([_row(i) for i in range(10)] + [_row(0, key="k2")], MACS) == 11
        led.write([_row(3, status="corrupt", verified=False, p_value=float("nan"), error_class="TruncatedFile",
                        error_message="cut")], MACS)
        assert len(led) == 11  # (path, key_id) replaced, not added
    with Ledger(path) as led:  # reopened: the rows were committed
        rows = list(led.rows())
        assert [r["path"] for r in rows[:3]] == ["/m/0000.safetensors"] * 2 + ["/m/0001.safetensors"]
        r3 = next(r for r in rows if r["path"].endswith("0003.safetensors"))
        assert r3["status"] == "corrupt" and r3["p_value"] is None and r3["verified"] is False
        assert r3["error_class"] == "TruncatedFile"
        assert rows[0]["verified"] is True and rows[0]["ber"] == 4 / 64
        ident = led.identities(macs=MACS)
        # (size, mtime_ns, inode, ctime_ns, alpha, status, integrity, null)
        assert ident["/m/0003.safetensors"]["k1"] == (103, 10**18 + 3, None, None, 1e-6, "corrupt", None, None)
        assert set(ident["/m/0000.safetensors"]) == {"k1", "k2"}
        assert set(led.identities(["k2"], macs=MACS)) == {"/m/0000.safetensors"}
        assert set(led.identities(macs={"k2": MACS["k2"]})) == {"/m/0000.safetensors"}
        assert led.identities(macs={"k1": b"another key" * 3}) == {}  # MACs of another key: nothing trusted
        assert set(led.identities(macs=MACS, paths={"/m/0001.safetensors"})) == {"/m/0001.safetensors"}
        assert [r["key_id"] for r in led.rows(paths=["/m/0000.safetensors"], key_ids=["k2"])] == ["k2"]
        assert len(list(led.rows(status="corrupt"))) == 1


def test_a_large_batch_is_written_in_order_whole_or_not_at_all(tmp_path):
    # Rows go in statements of many rows: the last row of a (path, key_id) wins, within a
    # statement and across two; a name that is not UTF-8 anywhere in the batch is written too.
    from nnmark.ledger import _PER_STATEMENT

    n = 2 * _PER_STATEMENT + 7
    rows = [_row(i) for i in range(n)]
    rows += [_row(1, matches=1), _row(n - 1, matches=2), _row(_PER_STATEMENT + 1, matches=3), _row(2, matches=4)]
    rows.insert(5, _row(0, path="/m/caf\udcff.safetensors"))
    with Ledger(tmp_path / "l.sqlite") as led:
        assert led.write(rows, MACS) == len(rows)
        got = {r["path"]: r for r in led.rows()}
        assert len(got) == n + 1 and "/m/caf\udcff.safetensors" in got
        assert [got[_row(i)["path"]]["matches"] for i in (1, n - 1, _PER_STATEMENT + 1, 2, 3)] == [1, 2, 3, 4, 60]
        assert len(led.identities(macs=MACS)) == n + 1  # every row as it was signed
        with pytest.raises(OverflowError):  # a value SQLite cannot hold, in the last statement: nothing written
            led.write([_row(i, matches=7) for i in range(n)] + [_row(0, size=2 ** 64)], MACS)
        assert {r["matches"] for r in led.rows()} == {60, 1, 2, 3, 4}


def test_rows_by_many_paths(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        led.write([_row(i) for i in range(1200)])
        got = list(led.rows(paths=[f"/m/{i:04d}.safetensors" for i in range(0, 1200, 1)]))
        assert len(got) == 1200  # more paths than SQLite takes parameters in one query


def test_export_jsonl_and_csv(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.write([_row(i) for i in range(5)] + [_row(9, status="unsafe", verified=False, ber=math.nan,
                                                       error_class="UnsafePickle", error_message="os.system")])
    assert export_ledger(path, tmp_path / "out.jsonl") == 6
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == set(FIELDS)
    assert lines[-1]["status"] == "unsafe" and lines[-1]["ber"] is None and lines[-1]["verified"] is False
    assert export_ledger(path, tmp_path / "out.csv") == 6
    rows = list(csv.DictReader(open(tmp_path / "out.csv", newline="")))
    assert len(rows) == 6 and tuple(rows[0]) == FIELDS
    assert rows[0]["verified"] == "1" and rows[1]["verified"] == "0" and rows[-1]["ber"] == ""
    buf = io.StringIO()
    assert export_ledger(path, buf, "csv", status="unsafe") == 1
    assert len(buf.getvalue().splitlines()) == 2
    with pytest.raises(ValueError, match="export format"):
        export_ledger(path, buf, "xml")


def test_bad_ledgers(tmp_path, monkeypatch):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ValueError, match="not an nnmark ledger"):
        Ledger(junk)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="schema version 99"):
        Ledger(other)
    with pytest.raises(ValueError, match="directory"):
        Ledger(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        export_ledger(tmp_path / "nope.sqlite", io.StringIO())
    monkeypatch.setenv("NNMARK_LEDGER", str(tmp_path / "env.sqlite"))
    assert default_ledger_path() == tmp_path / "env.sqlite"
    monkeypatch.delenv("NNMARK_LEDGER")
    assert str(default_ledger_path()) == "nnmark-ledger.sqlite"


def test_cli_ledger_export(tmp_path, capsys):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.write([_row(i) for i in range(3)])
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "export", "--ledger", str(path)])
    assert exc.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and json.loads(out[0])["key_id"] == "k1"
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "export", "--ledger", str(path), "-o", str(tmp_path / "x.csv")])
    assert exc.value.code == 0 and len((tmp_path / "x.csv").read_text().splitlines()) == 4
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "export", "--ledger", str(tmp_path / "missing.sqlite")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "export", "--ledger", str(path), "--format", "xml"])
    assert exc.value.code == 4


def test_cli_ledger_export_takes_the_ledger_as_an_argument(tmp_path, capsys):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.write([_row(i) for i in range(2)])
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "export", str(path), "--format", "csv"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # header + 2 rows
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "export", str(path), "--ledger", str(tmp_path / "other.sqlite")])
    assert exc.value.code == 4
    assert "two ledgers" in capsys.readouterr().err


def test_a_version_1_ledger_gains_the_new_columns(tmp_path):
    """Ledgers written before the null/control fields (schema 1) are migrated in place: their
    rows stay, the new fields read as None, and a re-scan writes them."""
    import sqlite3

    from nnmark.ledger import _ADDED

    added = set(_ADDED[2])
    old_cols = [c for c in FIELDS if c not in added]
    p = tmp_path / "v1.sqlite"
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(f"CREATE TABLE results ({', '.join(old_cols)}, PRIMARY KEY (path, key_id)) WITHOUT ROWID")
    row = _row(0)
    db.execute(f"INSERT INTO results ({', '.join(old_cols)}) VALUES ({', '.join('?' * len(old_cols))})",
               [row[c] for c in old_cols])
    db.commit()
    db.close()
    with Ledger(p) as led:
        (got,) = list(led.rows())
        assert all(got[c] is None for c in added) and got["path"] == row["path"] and got["matches"] == row["matches"]
        led.write([{**row, "null": "binomial(p0=0.5)", "path": "/m/new.safetensors"}])
        assert len(led) == 2
    db = sqlite3.connect(p)
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert added <= {r[1] for r in db.execute("PRAGMA table_info(results)")}
