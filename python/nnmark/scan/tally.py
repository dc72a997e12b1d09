"""What a scan found: the tally of its rows (ledger writes, counts, JSON Lines, the
progress bar) and the result it returns."""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

from ..ledger import Ledger, LedgerError, mac_key, row_verifies
from ..rows import row_json

# Exit codes of a scan (modelscan's convention, as in nnmark.cli).
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_NO_FILES = 0, 1, 2, 3


@dataclass
class ScanResult:
    """What a scan found. ``rows``: one dict per (file, key) in scan order (rows of
    files skipped as unchanged come from the ledger, with ``skipped=True``; empty when
    ``keep_rows=False``); ``summary``: counts, rates and the exit code; ``problems``:
    the first rows that could not be checked. A scan stopped by a ledger it could no
    longer write (a full disk, a read-only file) has ``summary["fatal"]``, the reason,
    exit code 2, and the rows of the batches written before."""

    rows: list[dict]
    summary: dict
    problems: list[dict]
    ledger: str | None

    @property
    def exit_code(self) -> int:
        return self.summary["exit_code"]

    def __len__(self) -> int:
        return len(self.rows)

    def by_status(self) -> dict[str, int]:
        return dict(self.summary["status"])

    def to_dict(self) -> dict:
        return {"summary": self.summary, "rows": self.rows}


def exit_code(n_files: int, status_counts: dict[str, int], not_verified: int, changed: int,
              not_checked: int = 0) -> int:
    """0 every (file, key) verified; 1 some checkpoint does not carry a mark, or changed
    against the manifest; 2 some checkpoint could not be checked, or ``not_checked``
    files or folders under the paths were left out (hidden, unlisted, a loop, a link
    leaving the folder, a path too long: :data:`nnmark.scan.paths.NOT_CHECKED`); 3 no
    files found (and nothing left out but what was excluded or seen twice)."""
    if n_files == 0:
        return EXIT_ERROR if not_checked else EXIT_NO_FILES
    if not_checked or any(n for s, n in status_counts.items() if s != "ok"):
        return EXIT_ERROR
    if not_verified or changed:
        return EXIT_FINDINGS
    return EXIT_OK


class Progress:
    """A rich progress bar on stderr: files, files/s, MB/s read, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled and total > 0
        self.start = time.perf_counter()
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task("scan", total=total, rate="")
        self.bar.start()

    def update(self, done: int, bytes_read: int) -> None:
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=done, rate=f"{done / dt:,.0f} files/s  {bytes_read / dt / 1e6:,.1f} MB/s")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


class LedgerFatal(Exception):
    """The ledger can no longer be written or read: the scan stops (``Tally.fatal`` says why)."""


class Tally:
    """Takes each finished batch: signs its rows and writes them to the ledger (one
    transaction), counts them, streams JSON, keeps rows; batches may come in any order
    (Ray). ``checks``: the scan's key checks; their keys sign the rows (in this process:
    keys never travel) and vouch for the ledger rows of skipped files. ``verified_at``:
    the ledger's :meth:`~nnmark.ledger.Ledger.data_version` before the scan verified the
    rows it skips: while no other connection has changed the ledger since, those rows
    are not verified a second time when they are read back."""

    def __init__(self, led: Ledger, key_ids: list[str], json_out, progress: bool, total: int, keep_rows: bool,
                 max_problems: int, checks=None, verified_at: int | None = None):
        self.led, self.key_ids, self.json_out = led, key_ids, json_out
        self.verified_at = verified_at
        self.checks = {c.key_id: c for c in checks or ()}
        self.macs = {c.key_id: mac_key(c.key) for c in checks} if checks else None
        self.fatal: str | None = None
        self.keep_rows, self.max_problems = keep_rows, max_problems
        self.order = {k: i for i, k in enumerate(key_ids)}
        self.status: dict[str, int] = {}
        self.kept: dict[int, list[dict]] = {}
        self.problems: list[dict] = []
        self.n_verified = self.n_not = self.n_changed = self.n_skipped = self.n_scanned = 0
        # stamped: files with a commitment stamped in; stamp_matches: of those, this key's commitment
        self.per_key = {k: {"verified": 0, "not_verified": 0, "errors": 0, "stamped": 0, "stamp_matches": 0}
                        for k in key_ids}
        self.warnings: dict[str, str] = {}  # key_id -> the warning its rows carry (one per key)
        self.bytes_read = self.done = 0
        self.start = time.perf_counter()
        self.total = total
        self.bar = Progress(total, progress)

    def add(self, index: int, chunk: list[str], rows: list[dict]) -> None:
        """Writes, counts and streams one batch; raises :class:`LedgerFatal` (``fatal`` set)
        when the ledger cannot be written or read: the caller stops the scan."""
        try:
            self._add(index, chunk, rows)
        except (sqlite3.Error, LedgerError) as exc:
            where = repr(str(self.led.path) if self.led.path is not None else ":memory:")
            why = str(exc) if isinstance(exc, LedgerError) else f"cannot write the ledger {where}: {exc}"
            self.fatal = (f"{why}; the scan stopped after {self.done} of {self.total} files (the rows of "
                          f"those were kept)")
            raise LedgerFatal(self.fatal) from None

    def _add(self, index: int, chunk: list[str], rows: list[dict]) -> None:
        self.led.write(rows, self.macs)  # first: a killed scan keeps every finished batch
        K = len(self.key_ids)
        # Rows come in file order, K per file (keys in the order given); files without
        # rows were skipped as unchanged, and their rows come from the ledger.
        files: list[tuple[str, list[dict], bool]] = []
        skipped: list[str] = []
        j, n = 0, len(rows)
        for path in chunk:
            if j < n and rows[j]["path"] == path:
                files.append((path, rows[j:j + K], True))
                j += K
            else:
                files.append((path, [], False))
                skipped.append(path)
        if skipped:
            old = self._ledger_rows(skipped)
            order = self.order
            files = [(p, fr if new else sorted(old.get(p, []), key=lambda r: order[r["key_id"]]), new)
                     for p, fr, new in files]
        status, per_key, problems = self.status, self.per_key, self.problems
        kept = [] if self.keep_rows else None
        for path, file_rows, new in files:
            if not file_rows:  # pragma: no cover - a skipped file always has ledger rows
                continue
            if new:
                self.n_scanned += 1
                self.bytes_read += file_rows[0]["bytes_read"] or 0
            else:
                self.n_skipped += 1
            for r in file_rows:
                if r.get("warning") and r["key_id"] not in self.warnings:
                    self.warnings[r["key_id"]] = r["warning"]
                st = r["status"]
                status[st] = status.get(st, 0) + 1
                pk = per_key[r["key_id"]]
                if r.get("commitment_matches") is not None:
                    pk["stamped"] += 1
                    pk["stamp_matches"] += bool(r["commitment_matches"])
                if st == "ok":
                    if r["verified"]:
                        self.n_verified += 1
                        pk["verified"] += 1
                    else:
                        self.n_not += 1
                        pk["not_verified"] += 1
                else:
                    pk["errors"] += 1
                    if len(problems) < self.max_problems:
                        problems.append(r)
            if file_rows[0]["integrity"] == "changed":
                self.n_changed += 1
            if kept is not None:
                if new:
                    for r in file_rows:
                        r["skipped"] = False
                kept += file_rows
            if self.json_out is not None:
                for r in file_rows:
                    self.json_out.write(json.dumps(row_json(r)) + "\n")
        if self.json_out is not None:
            self.json_out.flush()
        if kept is not None:
            self.kept[index] = kept
        self.done += len(chunk)
        self.bar.update(self.done, self.bytes_read)

    def _ledger_rows(self, paths: list[str]) -> dict[str, list[dict]]:
        """The ledger's rows of files skipped as unchanged, each verified again: one that no
        longer verifies (rewritten since the scan began, by hand or by another scan of other
        keys) is not shown as a verdict but replaced by an ``error`` row, which the next scan
        checks again."""
        old: dict[str, list[dict]] = {}
        rows = list(self.led.rows(paths=paths, key_ids=self.key_ids))
        # After the read: a change committed by anyone else up to now shows.
        check = self.macs is not None and (self.verified_at is None or self.led.data_version() != self.verified_at)
        for r in rows:
            if check and not row_verifies(r, self.macs.get(r["key_id"])):
                continue
            r["skipped"] = True
            old.setdefault(r["path"], []).append(r)
        if self.macs is None:
            return old
        from ..checkpoints import CheckpointError
        from .engine import Loaded, fail, new_row

        lost, now = [], time.time()
        for p in paths:
            have = {r["key_id"] for r in old.get(p, ())}
            for kid in self.key_ids:
                if kid not in have:
                    err = CheckpointError("error", "UntrustedLedgerRow", (
                        f"the ledger's row of {p!r} for key {kid} changed or vanished after this scan chose to "
                        f"skip the file, and its MAC does not verify: it is not reported; the next scan checks "
                        f"the file again"))
                    r = fail(new_row(Loaded(p), self.checks[kid], now), err)
                    r["skipped"] = False
                    lost.append(r)
                    old.setdefault(p, []).append(r)
        if lost:
            self.led.write(lost, self.macs)  # in place of the rows that do not verify
        return old

    def close(self) -> None:
        self.bar.close()

    def result(self, n_files: int, alpha: float, expansion=None) -> ScanResult:
        """The result; ``expansion`` (an :class:`~nnmark.scan.paths.Expansion`) says what
        the paths' walk left out: ``left_out`` {reason: count} and ``left_out_examples``
        {reason: the first few paths} in the summary, and exit code 2 when it left out
        something other than excluded files and duplicates."""
        elapsed = time.perf_counter() - self.start
        status = self.status
        rows = [r for i in sorted(self.kept) for r in self.kept[i]]  # scan order, however batches finished
        summary = {
            "files": n_files, "scanned": self.n_scanned, "skipped": self.n_skipped, "rows": sum(status.values()),
            "keys": self.key_ids, "alpha": alpha, "per_key": self.per_key, "status": status,
            "verified": self.n_verified, "not_verified": self.n_not,
            "errors": sum(n for s, n in status.items() if s != "ok"), "changed": self.n_changed,
            "bytes_read": self.bytes_read, "seconds": elapsed,
            "files_per_s": self.n_scanned / elapsed if elapsed > 0 else 0.0,
            "mb_per_s": self.bytes_read / elapsed / 1e6 if elapsed > 0 else 0.0,
            "ledger": str(self.led.path) if self.led.path is not None else None,
            "warnings": dict(self.warnings),
            "left_out": expansion.counts() if expansion is not None else {},
            "left_out_examples": expansion.examples() if expansion is not None else {},
        }
        not_checked = expansion.not_checked if expansion is not None else 0
        if self.fatal is not None:
            summary["fatal"] = self.fatal
        summary["exit_code"] = EXIT_ERROR if self.fatal is not None else exit_code(n_files, status, self.n_not,
                                                                                      self.n_changed, not_checked)
        return ScanResult(rows, summary, self.problems, summary["ledger"])


__all__ = ["Tally", "LedgerFatal", "ScanResult", "Progress", "exit_code", "EXIT_OK", "EXIT_FINDINGS", "EXIT_ERROR",
           "EXIT_NO_FILES"]
