r"""The scan ledger: one SQLite row per (checkpoint, key), written as a scan goes.

A row records the file's identity (path, size, mtime_ns, inode, ctime_ns: what a
re-run compares to skip unchanged files; ``ctime_ns`` changes with every write and
no user can set it back, as ``touch -r`` sets back the mtime), what was read (the
carrier's tensor name, the sha256 of the carrier bytes actually read, bytes read),
the verdict (verified, matches, bits, ber, p_value, threshold, alpha), why a check
could not be made (status, error_class, error_message), the integrity check against
a manifest, timings, and a MAC. Keys appear only as their public ``key_id``.

**Trust.** A ledger is a file anyone who can write it can edit. So each row carries
``mac``: HMAC-SHA256, keyed from the row's key, over a canonical encoding of every
other field; a re-scan skips a file (and reports its old verdict) only when its
rows' MACs verify with the keys in use -- an edited row (``verified=1``), an injected
one (a file never scanned) or a row of a ledger written before MACs (schema 1 and 2)
is checked again, not believed. A ledger of an older schema gains the newer columns
(schema 4: the stamped commitment's ``commitment_id`` and ``commitment_matches``); its
rows' MACs then cover fields they were not made over, so their files are checked again.

- MAC key, per key: ``HMAC-SHA256(key=secret, msg=b"nnmark:ledger-mac:v1:")``, where
  the secret is a WhiteBoxKey's or TriggerKey's 32 secret bytes and a DenseKey's
  matrix (float32 bytes). It is derived when a scan starts, in the process that writes
  the ledger; neither it nor the secret is ever stored. The MAC is HMAC output only.
- Canonical encoding: the values of every field but ``mac``, in the order of the field
  names sorted (``alpha``, ``ber``, ``bits``, ``bytes_read``, ... ``warning``), each as
  SQLite stores it and gives it back, in two parts. First the values of the INTEGER and
  TEXT columns as one JSON array: ``json.dumps(values, separators=(",", ":"),
  ensure_ascii=True)`` -- INTEGER as JSON integers (``verified`` 0 or 1), text as JSON
  strings (non-ASCII as ``\uXXXX``; a name that is not valid UTF-8 as Python's ``str``
  of it, its undecodable bytes as ``\udcXX``), missing values as ``null``. Then, right
  after it, the values of the REAL columns as little-endian IEEE 754 doubles in
  lowercase hex (16 digits each; a missing or non-finite value as the quiet NaN
  ``000000000000f87f``): exact, and the same in any language (a float's shortest
  decimal form is neither, and costs more to make than the HMAC). ASCII bytes.
- ``mac`` is the lowercase hex digest; rows written without keys (``Ledger.write``
  without ``macs``) keep whatever ``mac`` they hold, usually NULL, and are not trusted.

**Names that are not UTF-8.** A file name with bytes that are not UTF-8 comes to
Python as a ``str`` with surrogate escapes; SQLite text cannot hold it. Such a value
(in any text column) is stored as a BLOB of its bytes (``value.encode("utf-8",
"surrogateescape")``): SQLite never compares a BLOB equal to a TEXT, so it cannot be
mistaken for another name, and it reads back as the same ``str``. JSON Lines exports
and ``--json`` write it with ``\udcXX`` escapes (``json.loads`` gives the same
``str`` back); CSV exports write its undecodable bytes as ``\xNN`` text.

**Hostile files.** A ledger is opened with ``trusted_schema=OFF`` and no extension
loading, and its schema is read before anything is written: an SQLite file with a
trigger, a view or a virtual table, or whose ``results`` table has other columns, a
generated column or another primary key, is refused (:class:`LedgerError`) -- a
planted trigger never runs.

The database runs in WAL mode with ``synchronous=NORMAL``: each committed batch
survives the scanning process being killed at any moment (SIGKILL); only a power
loss can cost the last commits. Rows are written by one thread. A ledger that cannot
be written (a read-only file or folder, a full disk, an I/O error) raises
:class:`LedgerError`; a scan then stops with the rows of its finished batches kept.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import math
import operator
import os
import sqlite3
import sys
import time
import urllib.parse
from array import array
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import IO, Any

from . import _ext
from .rows import COLUMNS, FIELDS, TIMING_FIELDS

SCHEMA_VERSION = 4
# Columns each schema version added: a ledger of an older version gains them (NULL in its
# rows: a row without a MAC is never trusted, so a migrated ledger's files are checked again).
_ADDED = {2: ("null", "controls", "control_matches", "control_p_value", "warning"),
          3: ("inode", "ctime_ns", "mac"),
          4: ("commitment_id", "commitment_matches")}
DEFAULT_LEDGER = "nnmark-ledger.sqlite"
LEDGER_ENV = "NNMARK_LEDGER"
EXPORT_FORMATS = ("jsonl", "csv")

# WITHOUT ROWID: one b-tree keyed by (path, key_id) instead of a table plus an index.
# Column names quoted: "null" is an SQL keyword.
_QUOTED = ", ".join(f'"{n}"' for n in FIELDS)
_CREATE = ("CREATE TABLE IF NOT EXISTS results (" + ", ".join(f'"{n}" {t}' for n, t, _ in COLUMNS)
           + ", PRIMARY KEY (path, key_id)) WITHOUT ROWID")
_MARKS = f"({', '.join('?' * len(FIELDS))})"
_INSERT = f"INSERT OR REPLACE INTO results ({_QUOTED}) VALUES {_MARKS}"
# Rows per INSERT statement: as many as SQLite's smallest cap on bound parameters (999,
# before SQLite 3.32) lets in.
_PER_STATEMENT = 999 // len(FIELDS)
_INSERT_MANY = f"INSERT OR REPLACE INTO results ({_QUOTED}) VALUES " + ", ".join([_MARKS] * _PER_STATEMENT)
_INT_COLS = tuple(i for i, (_, t, _) in enumerate(COLUMNS) if t.startswith("INTEGER"))
_REAL_COLS = tuple(i for i, (_, t, _) in enumerate(COLUMNS) if t.startswith("REAL"))
_TEXT_COLS = tuple(i for i, (_, t, _) in enumerate(COLUMNS) if t.startswith("TEXT"))
_ALL_COLS = tuple(range(len(FIELDS)))
_MAC = FIELDS.index("mac")
_KEY_ID = FIELDS.index("key_id")
# The fields a MAC covers, sorted by name: the order of the canonical JSON array.
_SIGNED = tuple(sorted((n, i) for i, n in enumerate(FIELDS) if n != "mac"))
_IDENTITY_FIELDS = ("size", "mtime_ns", "inode", "ctime_ns", "alpha", "status", "integrity", "null")
# Ledger.identities reads the columns in the MAC's order, then mac.
_SIGNED_ORDER = tuple(n for n, _ in _SIGNED) + ("mac",)
_S_PATH, _S_KEY_ID = _SIGNED_ORDER.index("path"), _SIGNED_ORDER.index("key_id")
_S_TEXT = tuple(_SIGNED_ORDER.index(FIELDS[i]) for i in _TEXT_COLS)
_S_IDENTITY = operator.itemgetter(*(_SIGNED_ORDER.index(n) for n in _IDENTITY_FIELDS))


class LedgerError(ValueError):
    """A ledger that cannot be used: not an nnmark ledger, a hostile schema (triggers,
    views), or a file that cannot be opened, read or written (read-only, disk full)."""


def default_ledger_path() -> Path:
    """``$NNMARK_LEDGER``, else ``nnmark-ledger.sqlite`` in the current directory."""
    return Path(os.environ.get(LEDGER_ENV) or DEFAULT_LEDGER)


def mac_key(key) -> bytes:
    """The MAC key of ``key``'s ledger rows (derived from its secret, one way; see the module
    docstring). Secret: never print or store it."""
    derive = getattr(key, "_ledger_mac_key", None)
    if derive is None:
        raise TypeError(f"{type(key).__name__} is not an nnmark key: its ledger rows cannot be signed")
    return derive()


# ------------------------------------------------------------------ values and MACs
def _as_int(x):
    try:
        return operator.index(x)  # bool, numpy integers
    except TypeError:
        pass
    x = float(x)
    if not math.isfinite(x):
        return None
    return int(x) if x.is_integer() and abs(x) < 2 ** 63 else x  # SQLite keeps a fractional value as REAL


def _normalize(v: list) -> list:
    """Row values (in FIELDS order) as SQLite stores and returns them: what a MAC covers.
    Changes ``v`` in place."""
    for i in _INT_COLS:
        x = v[i]
        if x is not None and x.__class__ is not int:
            v[i] = _as_int(x)
    for i in _REAL_COLS:
        x = v[i]
        if x is not None:
            if x.__class__ is not float:
                x = v[i] = float(x)
            if not math.isfinite(x):  # NaN p-values of failed checks: NULL (SQLite has no NaN)
                v[i] = None
            elif x == 0.0:  # -0.0 comes back from SQLite as 0.0: sign what it returns
                v[i] = 0.0
    for i in _TEXT_COLS:
        x = v[i]
        if x is not None and x.__class__ is not str:
            v[i] = str(x)
    return v


_SIGNED_AT = [i for _, i in _SIGNED]
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
try:  # json's C encoder, made once (json.dumps makes one per call): the same bytes, 2x faster
    from json.encoder import c_make_encoder as _make, encode_basestring_ascii as _quote

    def _no_default(o):
        raise TypeError(f"a ledger value must be None, int, float or str, got {type(o).__name__}")

    _c_encode = _make(None, _no_default, _quote, None, ":", ",", False, False, False)
    _sample = [None, 1, -2 ** 62, 1e-06, 0.1, 1.7e9, "caf\udcff \u00e9 \"q\"\n"]
    if "".join(_c_encode(_sample, 0)) != _dumps(_sample):
        raise ValueError("json's C encoder differs")

    def _encode(values: list) -> str:
        return "".join(_c_encode(values, 0))
except Exception:  # noqa: BLE001 - another Python: the public encoder, same output
    _encode = _dumps


_REAL_SET = frozenset(_REAL_COLS)
# Where the REAL and the other columns sit: in a row in FIELDS order (written rows), and
# in a row in the MAC's order (rows read back by Ledger.identities).
_get_real = operator.itemgetter(*(i for i in _SIGNED_AT if i in _REAL_SET))
_get_other = operator.itemgetter(*(i for i in _SIGNED_AT if i not in _REAL_SET))
_sget_real = operator.itemgetter(*(k for k, i in enumerate(_SIGNED_AT) if i in _REAL_SET))
_sget_other = operator.itemgetter(*(k for k, i in enumerate(_SIGNED_AT) if i not in _REAL_SET))
_NULL_REAL = float("nan")  # a missing REAL: the quiet NaN, 00 00 00 00 00 00 f8 7f


def _encode_parts(others: tuple, reals: tuple) -> bytes:
    packed = array("d", [_NULL_REAL if x is None else x for x in reals])
    if sys.byteorder != "little":  # pragma: no cover
        packed.byteswap()
    return (_encode(others) + packed.tobytes().hex()).encode("ascii")


def _canonical(v) -> bytes:
    """The bytes a row's MAC covers (the module docstring says how), from its values in
    FIELDS order as :func:`_normalize` leaves them."""
    return _encode_parts(_get_other(v), _get_real(v))


def _canonical_signed(s) -> bytes:
    """The same bytes from the values in the MAC's order (a row as identities reads it)."""
    return _encode_parts(_sget_other(s), _sget_real(s))


class _Signer:
    """HMAC-SHA256 under one key with its padded key blocks hashed once (RFC 2104, as
    ``hmac.digest``): half the cost per row."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"a ledger MAC key is bytes (nnmark.ledger.mac_key(key)), got {type(key).__name__}")
        key = bytes(key)
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __call__(self, msg: bytes) -> str:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def _signers(macs: Mapping[str, bytes]) -> dict[str, _Signer]:
    return {kid: _Signer(k) for kid, k in macs.items()}


def _mac(v, sign: _Signer) -> str:
    return sign(_canonical(v))


def _verifies(v, sign: _Signer | None) -> bool:
    m = v[_MAC]
    if sign is None or m.__class__ is not str or not m.isascii():  # (compare_digest takes ASCII str only)
        return False
    try:
        mine = _mac(v, sign)
    except TypeError:  # a BLOB (a name that is not UTF-8): its str, as the MAC was made over
        try:
            mine = _mac(_from_db(v), sign)
        except TypeError:  # text in a REAL column: an edit
            return False
    return hmac.compare_digest(mine, m)


def _row_values(r, signers: dict[str, _Signer]) -> list:
    """A row's values in FIELDS order as SQLite stores them, with its ``mac`` (set in ``r``
    too) when ``signers`` has its key: what the native encoder gives, made in Python."""
    v = _normalize(list(map(r.get, FIELDS)))
    sign = signers.get(v[_KEY_ID])
    if sign is not None:
        r["mac"] = v[_MAC] = _mac(v, sign)
    return v


# Column kinds for the native encoder: INTEGER, REAL or TEXT.
_KINDS = "".join("i" if i in _INT_COLS else "r" if i in _REAL_COLS else "t" for i in range(len(FIELDS)))
# The native encoder (csrc/bindings/ledger_rows.cpp): per batch, the same values and MACs as
# _row_values, with the HMACs computed without the GIL (a scan's loader threads run
# meanwhile); a row of other types than it handles goes to _row_values. None in a build of
# the native module older than this file.
_native_rows = getattr(_ext.cpu, "ledger_rows", None)


def _batch_values(rows: list, macs: Mapping[str, bytes] | None) -> list[list]:
    """The values of a batch of rows (each signed when ``macs`` has its key), for one
    ``executemany``. ``rows``: a list nobody else holds (the native encoder reads it
    without a reference of its own to each row)."""
    signers = _signers(macs) if macs else {}  # (checks the keys' types)
    if _native_rows is None:
        return [_row_values(r, signers) for r in rows]
    keys = {kid: bytes(k) for kid, k in macs.items()} if macs else {}
    return _native_rows(rows, FIELDS, _KINDS, _SIGNED_AT, _KEY_ID, _MAC, keys,
                        lambda r: _row_values(r, signers))


def _insert(db: sqlite3.Connection, values: list[list]) -> None:
    """Inserts (or replaces) rows, in order, _PER_STATEMENT to a statement. The sqlite3
    module lets go of the GIL for each statement it runs; in a scan a loader thread takes
    it then, and the writer waits to get it back: one statement per row made the ledger
    write cost a scan several times its own time."""
    full = len(values) - len(values) % _PER_STATEMENT
    for i in range(0, full, _PER_STATEMENT):
        db.execute(_INSERT_MANY, list(chain.from_iterable(values[i:i + _PER_STATEMENT])))
    if full < len(values):
        db.executemany(_INSERT, values[full:])


def row_mac(row: Mapping[str, Any], key: bytes) -> str:
    """The MAC of a row (a dict with :data:`FIELDS`) under a MAC key (:func:`mac_key`)."""
    return _mac(_normalize(list(map(row.get, FIELDS))), _Signer(key))


def row_verifies(row: Mapping[str, Any], key: bytes | None) -> bool:
    """Whether a row's ``mac`` is the MAC of its other fields under ``key`` (None: no key, False)."""
    return key is not None and _verifies(_normalize(list(map(row.get, FIELDS))), _Signer(key))


def _text_to_db(v: list) -> list:
    for i in _TEXT_COLS:
        x = v[i]
        if x is not None and not x.isascii():
            v[i] = _to_db(x)
    return v


def _to_db(s: str):
    # SQLite text must be UTF-8: a name with undecodable bytes (surrogate escapes) goes in as
    # the BLOB of its bytes, which never equals any TEXT value.
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate no file name holds (not a round trip)
            return s.encode("utf-8", "surrogatepass")


def _from_db(v: tuple, text_cols: tuple = _TEXT_COLS) -> list:
    v = list(v)
    for i in text_cols:
        x = v[i]
        if x.__class__ is bytes:
            v[i] = x.decode("utf-8", "surrogateescape")
    return v


def _printable(s: str) -> str:
    """A str a UTF-8 text file can hold: undecodable bytes of a name as ``\\xNN`` (CSV exports)."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape" if _escapable(s) else "surrogatepass").decode("utf-8",
                                                                                                  "backslashreplace")


def _escapable(s: str) -> bool:
    try:
        s.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


# ------------------------------------------------------------------ opening
# SQLite result codes that mean the file cannot be used as it is (not: that it is no database).
_CANNOT = ("SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED",
           "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_NOLFS")


def _cannot_use(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name:
        return name.startswith(_CANNOT)
    text = str(exc).lower()
    return any(w in text for w in ("readonly", "read-only", "disk is full", "disk i/o", "unable to open", "locked"))


class Ledger:
    """An SQLite ledger of scan results. ``path=None``: an in-memory ledger (nothing kept).
    ``readonly``: open an existing ledger only to read it (exports): nothing is written,
    an older schema is read as it is."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False):
        self.path = None if path is None else Path(path)
        self.readonly = readonly
        shown = repr(str(self.path))
        if self.path is not None and self.path.is_dir():
            raise LedgerError(f"ledger {shown} is a directory; expected an SQLite file path")
        if self.path is not None and self.path.parent and not self.path.parent.exists():
            raise LedgerError(f"ledger {shown}: folder {str(self.path.parent)!r} does not exist")
        if self.path is not None and self.path.exists() and not self.path.is_file():
            # a FIFO would block SQLite's first read forever
            raise LedgerError(f"ledger {shown} is not a regular file")
        if readonly and (self.path is None or not self.path.is_file()):
            raise LedgerError(f"ledger {shown} does not exist")
        if self.path is not None and not readonly:
            self._check_writable()
        self._db = None
        try:
            if path is None:
                db = sqlite3.connect(":memory:", isolation_level=None)
            elif readonly:
                uri = "file:" + urllib.parse.quote(os.fsencode(os.path.abspath(self.path))) + "?mode=ro"
                db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=60.0)
            else:
                # timeout: another scan may be committing to the same ledger; wait for it.
                db = sqlite3.connect(str(self.path), isolation_level=None, timeout=60.0)
            self._db = db
            # Nothing in the file may run code: no schema functions with side effects, no
            # extensions. Then its schema is read -- before any write, which a trigger could hook.
            db.execute("PRAGMA trusted_schema=OFF")
            if hasattr(db, "enable_load_extension"):
                db.enable_load_extension(False)
            version = self._check_schema()
            if not readonly:
                if path is not None:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                self._init_schema(version)
                if path is not None:
                    # A ledger opened read-only, or on a read-only mount, says so now, not at the
                    # first batch: a write that changes nothing.
                    db.execute("UPDATE meta SET value=value WHERE name='schema_version'")
            self._columns = {r[1] for r in db.execute("PRAGMA table_info(results)")}
            if readonly and not self._columns:  # an empty SQLite file: a ledger with no rows yet
                self._select = None
        except sqlite3.Error as exc:
            self._close_quietly()
            if _cannot_use(exc):
                raise LedgerError(f"cannot {'read' if readonly else 'use'} the ledger {shown}: {exc}") from None
            raise LedgerError(f"{shown} is not an nnmark ledger (SQLite said: {exc})") from None
        except BaseException:
            self._close_quietly()
            raise
        # Columns an old ledger opened read-only lacks read as NULL.
        if not readonly or self._columns:
            self._select = ", ".join(f'"{n}"' if n in self._columns else "NULL" for n in FIELDS)

    def _close_quietly(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    def _check_writable(self) -> None:
        # Said before SQLite tries (its "attempt to write a readonly database" comes late and
        # names no cause). Root passes every access check; SQLite then finds out itself.
        p, shown = self.path, repr(str(self.path))
        folder = p.parent if str(p.parent) else Path(".")
        if p.exists() and not os.access(p, os.R_OK | os.W_OK):
            raise LedgerError(f"cannot write the ledger {shown}: the file is read-only for this user")
        wal = Path(str(p) + "-wal")
        if (not p.exists() or not wal.exists()) and not os.access(folder, os.W_OK | os.X_OK):
            raise LedgerError(f"cannot write the ledger {shown}: folder {str(folder)!r} is not writable "
                              f"(SQLite keeps its journal beside the ledger)")

    def _check_schema(self) -> int | None:
        """Refuses what an nnmark ledger never holds; returns the schema version (None: new)."""
        db, shown = self._db, repr(str(self.path) if self.path else ":memory:")
        entries = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        bad = [f"{t} {n!r}" for t, n, sql in entries
               if t not in ("table", "index") or (sql or "").lstrip().upper().startswith("CREATE VIRTUAL")]
        if bad:
            raise LedgerError(f"ledger {shown} holds {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: an "
                              f"nnmark ledger has no triggers, views or virtual tables; refused (nothing in it "
                              f"was run). Use another --ledger file")
        tables = {n for t, n, _ in entries if t == "table"}
        version = None
        if "meta" in tables:
            cols = [(r[1], r[6]) for r in db.execute("PRAGMA table_xinfo(meta)")]
            if sorted(cols) != [("name", 0), ("value", 0)]:
                raise LedgerError(f"{shown} is not an nnmark ledger: its meta table has the columns "
                                  f"{[c for c, _ in cols]}")
            row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is not None:
                try:
                    version = int(row[0])
                except (TypeError, ValueError):
                    raise LedgerError(f"ledger {shown} has schema version {row[0]!r}; this nnmark writes "
                                      f"version {SCHEMA_VERSION}: use another --ledger file") from None
                if not 1 <= version <= SCHEMA_VERSION:
                    raise LedgerError(f"ledger {shown} has schema version {row[0]}; this nnmark writes version "
                                      f"{SCHEMA_VERSION}: use another --ledger file")
        if "results" in tables:
            if version is None:
                raise LedgerError(f"{shown} has a results table but no nnmark schema version; not an nnmark ledger")
            info = db.execute("PRAGMA table_xinfo(results)").fetchall()  # (cid, name, type, notnull, dflt, pk, hidden)
            names = [r[1] for r in info]
            later = {c for v, cs in _ADDED.items() if v > version for c in cs}
            odd = sorted(set(names) - set(FIELDS))
            missing = [c for c in FIELDS if c not in names and c not in later]
            generated = [r[1] for r in info if r[6]]
            pk = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]
            if odd or missing or generated or pk != ["path", "key_id"] or len(names) != len(set(names)):
                what = "; ".join(x for x in (
                    odd and f"unexpected columns {odd}", missing and f"missing columns {missing}",
                    generated and f"generated columns {generated}",
                    pk != ["path", "key_id"] and f"primary key {pk}, not ['path', 'key_id']") if x) or "odd columns"
                raise LedgerError(f"ledger {shown}: its results table is not an nnmark ledger's ({what}); refused")
        return version

    def _init_schema(self, version: int | None) -> None:
        db = self._db
        if version is None:
            db.execute("BEGIN")
            try:
                db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
                db.execute(_CREATE)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)",
                           (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),))
            except BaseException:
                self._rollback()
                raise
            db.execute("COMMIT")
        elif version != SCHEMA_VERSION:
            self._migrate(version)

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:  # e.g. the disk is full: SQLite has rolled back itself
            pass

    def _migrate(self, old: int) -> None:
        """Adds the columns later versions added (the rows keep theirs; the new fields are NULL)."""
        db = self._db
        types = {n: t for n, t, _ in COLUMNS}
        db.execute("BEGIN IMMEDIATE")
        try:
            have = {r[1] for r in db.execute("PRAGMA table_info(results)")}
            for version in range(old + 1, SCHEMA_VERSION + 1):
                for name in _ADDED.get(version, ()):
                    if name not in have:
                        db.execute(f'ALTER TABLE results ADD COLUMN "{name}" {types[name]}')
            db.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(SCHEMA_VERSION),))
        except BaseException:
            self._rollback()
            raise
        db.execute("COMMIT")

    # -- writing -----------------------------------------------------------------
    def write(self, rows: Iterable[dict], macs: Mapping[str, bytes] | None = None) -> int:
        """Inserts or replaces rows (dicts with :data:`FIELDS`) in one transaction.

        ``macs``: ``{key_id: MAC key}`` (:func:`mac_key`): each row of those keys gets its
        ``mac`` (set in the row dict too). Without it a row keeps the ``mac`` it holds.
        Raises :class:`LedgerError` when the ledger cannot be written (the transaction is
        rolled back: the batch is written whole or not at all)."""
        if self.readonly:
            raise LedgerError(f"ledger {str(self.path)!r} was opened read-only")
        values = _batch_values(list(rows), macs)
        if not values:
            return 0
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                try:
                    _insert(db, values)
                except UnicodeEncodeError:  # a name that is not UTF-8 (rare): as BLOBs, and again
                    self._rollback()
                    db.execute("BEGIN")
                    _insert(db, [_text_to_db(v) for v in values])
            except BaseException:
                self._rollback()
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write the ledger {str(self.path) if self.path else ':memory:'!r}: "
                              f"{exc}") from exc
        return len(values)

    # -- reading -----------------------------------------------------------------
    def _fail(self, exc: sqlite3.Error, doing: str) -> LedgerError:
        return LedgerError(f"cannot {doing} the ledger {str(self.path) if self.path else ':memory:'!r}: {exc}")

    def identities(self, key_ids: Iterable[str] | None = None, *, macs: Mapping[str, bytes],
                   paths: Iterable[str] | None = None) -> dict[str, dict[str, tuple]]:
        """``{path: {key_id: (size, mtime_ns, inode, ctime_ns, alpha, status, integrity, null)}}``
        of the rows a re-scan may trust: those of the keys in ``macs`` (``{key_id: MAC key}``,
        :func:`mac_key`; and in ``key_ids`` when given) whose MAC verifies. ``paths``: only rows
        of these paths (the rest are not even verified)."""
        want = set(macs) if key_ids is None else set(key_ids) & set(macs)
        if not want or self._select is None:
            return {}
        only = None if paths is None else (paths if isinstance(paths, (set, frozenset, dict)) else set(paths))
        signers = _signers({kid: macs[kid] for kid in want})
        out: dict[str, dict[str, tuple]] = {}
        kids = sorted(want)
        # Columns in the MAC's order, then mac: the canonical values are a slice of the row.
        cols = ", ".join(f'"{n}"' if n in self._columns else "NULL" for n in _SIGNED_ORDER)
        q = f"SELECT {cols} FROM results WHERE key_id IN ({', '.join('?' * len(kids))})"
        ident, at_path, at_kid = _S_IDENTITY, _S_PATH, _S_KEY_ID
        try:
            for v in self._db.execute(q, kids):
                path = v[at_path]
                if path.__class__ is bytes:
                    v = _from_db(v, _S_TEXT)
                    path = v[at_path]
                if only is not None and path not in only:
                    continue
                m = v[-1]
                if m.__class__ is not str or not m.isascii():
                    continue
                try:
                    msg = _canonical_signed(v)
                except TypeError:  # a BLOB in another text column, or text in a REAL one (an edit)
                    v = _from_db(v, _S_TEXT)
                    try:
                        msg = _canonical_signed(v)
                    except TypeError:
                        continue
                if hmac.compare_digest(signers[v[at_kid]](msg), m):
                    out.setdefault(path, {})[v[at_kid]] = ident(v)
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from exc
        return out

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: the same number as long as no other connection
        (another scan, a hand edit) has committed a change to the ledger. A scan takes it
        before :meth:`identities`; the same number when it reads back the rows of skipped
        files means they are the rows whose MACs it verified."""
        try:
            return self._db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from exc

    def rows(self, paths: Iterable[str] | None = None, key_ids: Iterable[str] | None = None,
             status: str | None = None) -> Iterator[dict]:
        """Rows as dicts, ordered by path then key_id (``verified`` as a bool). Rows are as the
        file holds them: :func:`row_verifies` says whether one can be trusted."""
        if self._select is None:
            return
        where, args = [], []
        if key_ids is not None:
            kids = list(key_ids)
            where.append(f"key_id IN ({', '.join('?' * len(kids))})")
            args += kids
        if status is not None:
            where.append("status = ?")
            args.append(status)
        base = f"SELECT {self._select} FROM results" + (f" WHERE {' AND '.join(where)}" if where else "")
        try:
            if paths is None:
                for v in self._db.execute(base + " ORDER BY path, key_id", args):
                    yield self._row(v)
                return
            paths = [_to_db(p) for p in paths]
            for i in range(0, len(paths), 500):  # SQLite caps the number of parameters
                part = paths[i:i + 500]
                q = base + (" AND " if where else " WHERE ") + f"path IN ({', '.join('?' * len(part))}) ORDER BY path, key_id"
                for v in self._db.execute(q, args + part):
                    yield self._row(v)
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from exc

    @staticmethod
    def _row(values) -> dict:
        # (a BLOB in any column reads as text: a hand-made one must not break an export)
        d = dict(zip(FIELDS, _from_db(values, _ALL_COLS) if bytes in map(type, values) else values))
        d["verified"] = bool(d["verified"])
        if d["commitment_matches"] is not None:
            d["commitment_matches"] = bool(d["commitment_matches"])
        return d

    def __len__(self) -> int:
        if self._select is None:
            return 0
        try:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from exc

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
                w.writerow(["" if r[k] is None else int(r[k]) if k in ("verified", "commitment_matches") else
                            _printable(r[k]) if isinstance(r[k], str) else r[k] for k in FIELDS])
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
        raise LedgerError(f"ledger {str(ledger)!r} does not exist")
    with Ledger(ledger, readonly=True) as led:
        return led.export(out, fmt, status)


__all__ = ["Ledger", "LedgerError", "mac_key", "row_mac", "row_verifies", "COLUMNS", "FIELDS", "TIMING_FIELDS", "SCHEMA_VERSION", "DEFAULT_LEDGER", "default_ledger_path",
           "export_ledger"]
