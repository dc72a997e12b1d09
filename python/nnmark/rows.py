"""The result row: one per (source, key), the same wherever it was made.

``nnmark.verify`` (a :class:`~nnmark.stats.Verdict` is a view of a row),
``nnmark.scan`` and its ledger, ``--json`` output and ledger exports all carry
these fields, in this order, with these statuses. A new field or status is
written here once.
"""
from __future__ import annotations

import math
from typing import Any

# Why a check could not be made (or "ok").
# "error": nnmark itself failed on this file (a bug; the message says where): the row is
# kept, the exit code says so, and the next scan checks the file again (like io_error).
STATUSES = ("ok", "absent", "invalid", "corrupt", "unsafe", "unsupported", "io_error", "error")
# Statuses a re-run checks again instead of trusting the ledger's row.
RETRY_STATUSES = ("io_error", "error")

# (column, SQL type, meaning) -- the order of the table, of exports and of rows.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("path", "TEXT NOT NULL", "absolute path of the checkpoint (a shard index for a sharded checkpoint); "
                              "<module>, <state_dict 3>... for a source in memory"),
    ("key_id", "TEXT NOT NULL", "public fingerprint of the key (never the secret)"),
    ("size", "INTEGER", "file size in bytes (sharded: index + shards); NULL if it could not be stat'ed"),
    ("mtime_ns", "INTEGER", "modification time in ns (sharded: the latest)"),
    ("inode", "INTEGER", "inode number (sharded: the index's), as a signed 64-bit integer; NULL in memory"),
    ("ctime_ns", "INTEGER", "status-change time in ns (sharded: the latest), which no user can set back: with "
                            "path, size, mtime_ns and inode, the identity a re-scan compares; NULL in memory"),
    ("format", "TEXT", "safetensors, hf-sharded, torch-zip or torch-legacy (module, state_dict or tensor in "
                       "memory); NULL if not recognised"),
    ("carrier", "TEXT", "tensor name of the carrier in the file (white-box keys)"),
    ("carrier_sha256", "TEXT", "sha256 of the carrier bytes read (trigger keys: of every tensor the model read)"),
    ("bytes_read", "INTEGER", "bytes read from the checkpoint to check it (all keys of this scan)"),
    ("status", "TEXT NOT NULL", "ok, absent, corrupt, unsafe, unsupported, io_error, invalid or error"),
    ("verified", "INTEGER NOT NULL", "1 if the mark is present at significance alpha"),
    ("matches", "INTEGER", "matching bits (white-box) or trigger labels (black-box)"),
    ("bits", "INTEGER", "number of bits or triggers"),
    ("ber", "REAL", "bit (or trigger) error rate"),
    ("p_value", "REAL", "exact one-sided p-value under the null (and the control test, where there is one)"),
    ("threshold", "INTEGER", "fewest matches that verify at alpha"),
    ("alpha", "REAL", "significance level"),
    ("null", "TEXT", "the null distribution the p-value is taken from, e.g. binomial(p0=0.1) or "
                     "beta-binomial(a=2.1, b=15.3; 50 models)"),
    ("controls", "INTEGER", "trigger keys whose triggers share labels: control inputs without the mark"),
    ("control_matches", "INTEGER", "controls the model answered with the triggers' labels"),
    ("control_p_value", "REAL", "exact test of triggers against controls (paired McNemar or Fisher); "
                                "p_value is the larger of it and the null's"),
    ("warning", "TEXT", "why the p-value may deserve less trust (e.g. uncalibrated sample-based triggers)"),
    ("error_class", "TEXT", "why the check could not be made, a stable CamelCase name (e.g. TruncatedFile)"),
    ("error_message", "TEXT", "what was wrong, for people"),
    ("integrity", "TEXT", "against --manifest: ok, changed or unlisted; NULL without a manifest"),
    ("file_sha256", "TEXT", "whole-file sha256 (only computed against a manifest)"),
    ("commitment_id", "TEXT", "id (16 hex digits) of the ownership commitment stamped into the file "
                              "(nnmark stamp; safetensors metadata), NULL when it holds none or a malformed one"),
    ("commitment_matches", "INTEGER", "1 when the file's stamped commitment is this key's (nnmark.commit), 0 when "
                                      "it is another key's or malformed; NULL when the file holds no stamp"),
    ("read_s", "REAL", "seconds spent reading the file"),
    ("verify_s", "REAL", "seconds of verification attributed to this row"),
    ("scanned_at", "REAL", "UNIX time the row was produced"),
    ("mac", "TEXT", "HMAC-SHA256 of the row's other fields, keyed from the key's secret (see nnmark.ledger): "
                    "a re-scan trusts only rows whose MAC verifies; NULL outside a ledger"),
)
FIELDS: tuple[str, ...] = tuple(c[0] for c in COLUMNS)
# Columns that differ between two scans of the same files (the timings, and the MAC that
# covers them; everything else must not).
TIMING_FIELDS = ("read_s", "verify_s", "scanned_at", "mac")


def row_json(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of a row (``--json`` of ``verify`` and ``scan``, ledger exports):
    every field in order, then ``skipped``; non-finite floats as null."""
    out = {f: row.get(f) for f in FIELDS}
    out["verified"] = bool(out["verified"])
    if out["commitment_matches"] is not None:
        out["commitment_matches"] = bool(out["commitment_matches"])
    out["skipped"] = bool(row.get("skipped", False))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


__all__ = ["STATUSES", "RETRY_STATUSES", "COLUMNS", "FIELDS", "TIMING_FIELDS", "row_json"]
