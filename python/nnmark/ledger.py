"""The scan ledger: one SQLite row per (checkpoint, key), written as a scan goes.

A row records the file's identity (path, size, mtime_ns: what a re-run
compares to skip unchanged files), what was read (the carrier's tensor name,
the sha256 of the carrier bytes actually read, bytes read), the verdict
(verified, matches, bits, ber, p_value, threshold, alpha), why a check could
not be made (status, error_class, error_message), the integrity check against
a manifest, and timings. Keys appear only as their public ``key_id``.

The database runs in WAL mode with ``synchronous=NORMAL``: each committed
batch survives the scanning process being killed at any moment (SIGKILL);
only a power loss can cost the last commits. Rows are written by one thread.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .rows import COLUMNS, FIELDS, TIMING_FIELDS

SCHEMA_VERSION = 2
# Columns each schema version added: a ledger of an older version gains them (NULL in its rows).
_ADDED = {2: ("null", "controls", "control_matches", "control_p_value", "warning")}
DEFAULT_LEDGER = "nnmark-ledger.sqlite"
LEDGER_ENV = "NNMARK_LEDGER"
EXPORT_FORMATS = ("jsonl", "csv")

# WITHOUT ROWID: one b-tree keyed by (path, key_id) instead of a table plus an index.
# Column names quoted: "null" is an SQL keyword.
_QUOTED = ", ".join(f'"{n}"' for n in FIELDS)
_CREATE = ("CREATE TABLE IF NOT EXISTS results (" + ", ".join(f'"{n}" {t}' for n, t, _ in COLUMNS)
           + ", PRIMARY KEY (path, key_id)) WITHOUT ROWID")
_FLOAT_COLS = tuple(i for i, (_, t, _) in enumerate(COLUMNS) if t.startswith("REAL"))
_INSERT = f"INSERT OR REPLACE INTO results ({_QUOTED}) VALUES ({', '.join('?' * len(FIELDS))})"


def default_ledger_path() -> Path:
    """``$NNMARK_LEDGER``, else ``nnmark-ledger.sqlite`` in the current directory."""
    return Path(os.environ.get(LEDGER_ENV) or DEFAULT_LEDGER)


def _clean(v: Any) -> Any:
    # NaN p-values of failed checks are stored as NULL (SQLite has no NaN).
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Ledger:
    """An SQLite ledger of scan results. ``path=None``: an in-memory ledger (nothing kept)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None and self.path.is_dir():
            raise ValueError(f"ledger {str(self.path)!r} is a directory; expected an SQLite file path")
        if self.path is not None and self.path.parent and not self.path.parent.exists():
            raise ValueError(f"ledger {str(self.path)!r}: folder {str(self.path.parent)!r} does not exist")
        try:
            # timeout: another scan may be committing to the same ledger; wait for it.
            self._db = sqlite3.connect(":memory:" if path is None else str(self.path), isolation_level=None,
                                       timeout=60.0)
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{str(self.path)!r} is not an nnmark ledger (SQLite said: {exc})") from None

    def _init_schema(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is None:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "results" in tables:
                raise ValueError(f"{str(self.path)!r} has a results table but no nnmark schema version; "
                                 "not an nnmark ledger")
            db.execute("BEGIN")
            db.execute(_CREATE)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT INTO meta VALUES ('created', ?)", (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),))
            db.execute("COMMIT")
        elif row[0] != str(SCHEMA_VERSION):
            try:
                old = int(row[0])
            except ValueError:
                old = None
            if old is None or not 1 <= old < SCHEMA_VERSION:
                raise ValueError(f"ledger {str(self.path)!r} has schema version {row[0]}; this nnmark writes "
                                 f"version {SCHEMA_VERSION}: use another --ledger file")
            self._migrate(old)

    def _migrate(self, old: int) -> None:
        """Adds the columns later versions added (the rows keep theirs; the new fields are NULL)."""
        db = self._db
        types = {n: t for n, t, _ in COLUMNS}
        db.execute("BEGIN")
        try:
            have = {r[1] for r in db.execute("PRAGMA table_info(results)")}
            for version in range(old + 1, SCHEMA_VERSION + 1):
                for name in _ADDED.get(version, ()):
                    if name not in have:
                        db.execute(f'ALTER TABLE results ADD COLUMN "{name}" {types[name]}')
            db.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(SCHEMA_VERSION),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- writing -----------------------------------------------------------------
    def write(self, rows: Iterable[dict]) -> int:
        """Inserts or replaces rows (dicts with :data:`FIELDS`) in one transaction."""
        values = []
        for r in rows:
            v = tuple(map(r.get, FIELDS))
            if not all(v[i] is None or math.isfinite(v[i]) for i in _FLOAT_COLS):
                v = tuple(map(_clean, v))
            values.append(v)
        if not values:
            return 0
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(_INSERT, values)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return len(values)

    # -- reading -----------------------------------------------------------------
    def identities(self, key_ids: Iterable[str] | None = None) -> dict[str, dict[str, tuple]]:
        """{path: {key_id: (size, mtime_ns, alpha, status, integrity, null)}} of every row."""
        want = None if key_ids is None else set(key_ids)
        out: dict[str, dict[str, tuple]] = {}
        for path, kid, size, mtime, alpha, status, integrity, null in self._db.execute(
                'SELECT path, key_id, size, mtime_ns, alpha, status, integrity, "null" FROM results'):
            if want is None or kid in want:
                out.setdefault(path, {})[kid] = (size, mtime, alpha, status, integrity, null)
        return out

    def rows(self, paths: Iterable[str] | None = None, key_ids: Iterable[str] | None = None,
             status: str | None = None) -> Iterator[dict]:
        """Rows as dicts, ordered by path then key_id (``verified`` as a bool)."""
        where, args = [], []
        if key_ids is not None:
            kids = list(key_ids)
            where.append(f"key_id IN ({', '.join('?' * len(kids))})")
            args += kids
        if status is not None:
            where.append("status = ?")
            args.append(status)
        base = f"SELECT {_QUOTED} FROM results" + (f" WHERE {' AND '.join(where)}" if where else "")
        if paths is None:
            yield from (self._row(v) for v in self._db.execute(base + " ORDER BY path, key_id", args))
            return
        paths = list(paths)
        for i in range(0, len(paths), 500):  # SQLite caps the number of parameters
            part = paths[i:i + 500]
            q = base + (" AND " if where else " WHERE ") + f"path IN ({', '.join('?' * len(part))}) ORDER BY path, key_id"
            yield from (self._row(v) for v in self._db.execute(q, args + part))

    @staticmethod
    def _row(values) -> dict:
        d = dict(zip(FIELDS, values))
        d["verified"] = bool(d["verified"])
        return d

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- export --------------------------------------------------------------------
    def export(self, out: str | os.PathLike | IO[str], fmt: str | None = None, status: str | None = None) -> int:
        """Writes every row to ``out`` (a path or a text stream) as JSON Lines or CSV;
        ``fmt`` defaults to the file suffix (``.csv`` -> CSV, else JSON Lines). Returns the row count."""
        if fmt is None:
            fmt = "csv" if isinstance(out, (str, os.PathLike)) and os.fspath(out).lower().endswith(".csv") else "jsonl"
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
        if isinstance(out, (str, os.PathLike)):
            with open(out, "w", newline="" if fmt == "csv" else None, encoding="utf-8") as f:
                return self._export(f, fmt, status)
        return self._export(out, fmt, status)

    def _export(self, f: IO[str], fmt: str, status: str | None) -> int:
        n = 0
        if fmt == "csv":
            w = csv.writer(f)
            w.writerow(FIELDS)
            for r in self.rows(status=status):
                w.writerow(["" if r[k] is None else int(r[k]) if k == "verified" else r[k] for k in FIELDS])
                n += 1
        else:
            for r in self.rows(status=status):
                f.write(json.dumps(r) + "\n")
                n += 1
        return n

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path) if self.path else ':memory:'!r})"


def export_ledger(ledger: str | os.PathLike, out: str | os.PathLike | IO[str], fmt: str | None = None,
                  status: str | None = None) -> int:
    """Exports an existing ledger file to JSON Lines or CSV; returns the row count."""
    ledger = Path(ledger)
    if not ledger.is_file():
        raise ValueError(f"ledger {str(ledger)!r} does not exist")
    with Ledger(ledger) as led:
        return led.export(out, fmt, status)


__all__ = ["Ledger", "COLUMNS", "FIELDS", "TIMING_FIELDS", "SCHEMA_VERSION", "DEFAULT_LEDGER", "default_ledger_path",
           "export_ledger"]
