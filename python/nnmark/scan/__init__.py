"""``nnmark.scan``: verify keys across thousands of checkpoint files.

Paths (files, folders walked recursively, globs) expand to checkpoints
(:mod:`.paths`: loops, links leaving the folder, hidden and unlistable entries are
left out and counted, never silently); a folder with a shard index (``*.index.json``) holds a sharded
checkpoint that counts once, as its index. Batches of files go to loader threads
(:mod:`.local`) or Ray tasks (:mod:`.ray_backend`); each batch is read by the one
checkpoint reader and checked by the batch engine (:mod:`.engine`) that
``nnmark.verify`` uses too: white-box keys read only their carrier's bytes and
are verified by one native projection call per key and carrier shape; trigger
keys run their trigger set through each checkpoint (``arch``).

Every (file, key) gets exactly one row (see :mod:`nnmark.ledger` for the fields);
bad input gives a row with its status and never stops the scan. Rows go to the
ledger one transaction per batch (:mod:`.tally`), each row signed with a MAC keyed
from its key, so a killed scan loses no finished batch, and a re-run skips files
whose identity (path, size, mtime, inode, ctime), alpha and null are unchanged and
whose rows' MACs verify (rows with an ``io_error`` or ``error`` are retried; against
a manifest (:mod:`.manifest`) every file is read again).

``nnmark.scan`` is this package's :func:`scan` function; its modules stay importable
with ``from nnmark.scan import engine`` or ``from nnmark.scan.engine import scan_batch``
(``import nnmark.scan.engine as engine`` finds the function first, and fails).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from ..ledger import FIELDS, Ledger, mac_key
from .engine import MAX_BATCH_BYTES, load_calibrations, make_checks, scan_batch
from .local import local_batches
from .manifest import load_manifest, write_manifest
from .paths import LEFT_OUT_REASONS, NOT_CHECKED, Expansion, expand_paths, walk_paths
from .tally import EXIT_ERROR, EXIT_FINDINGS, EXIT_NO_FILES, EXIT_OK, LedgerFatal, ScanResult, Tally, exit_code

DEFAULT_BATCH = 256
# Files per Ray task: enough to amortise a task's start and its key loading.
RAY_BATCH = 100


@dataclass
class Settings:
    """What every batch of one scan shares (besides the keys)."""

    alpha: float
    arch: Any
    device: Any
    null_rate: float | None
    manifest: dict[str, str] | None
    max_batch_bytes: int
    calibrations: list = None  # the Calibration objects of some keys (not secret: they travel to Ray tasks)



def scan(keys, paths, *, ledger=None, alpha: float = 1e-6, arch=None, device=None, workers: int | None = None,
         batch_size: int | None = None, json_out: IO[str] | None = None, progress: bool = True,
         manifest: str | os.PathLike | None = None, rescan: bool = False, null_rate: float | None = None,
         exclude: Iterable[str] = (), keep_rows: bool = True, max_problems: int = 50,
         ray: str | None = None, calibration=None, include_hidden: bool = False) -> ScanResult:
    """Verifies ``keys`` in every checkpoint under ``paths``: one row per (file, key).

    Args:
        keys: key objects or key file paths (white-box and trigger keys), one or a list.
        paths: files, folders (walked recursively) and glob patterns (``**``: any depth;
            see :func:`walk_paths`). Every file under them gets rows, or the summary names
            it under ``left_out``, by reason: ``hidden`` (a name starting with ``.``:
            skipped unless ``include_hidden``), ``unlisted_folder`` (a folder that could
            not be listed), ``loop`` (a link back into a folder it is in), ``outside`` (a
            link inside a walked folder to a target outside the folder given: not
            followed; a path named explicitly is followed as given), ``too_long`` (a path
            longer than the system allows); any of these makes the exit code 2, even when
            every file checked verified. ``duplicate`` (a file reached again through a
            link or a hard link: checked once) and ``excluded`` are counted too, and
            leave the exit code alone. A folder with a valid shard index stands for the
            shards it names (an invalid one gets a ``BadIndex`` row, and its shards their
            own rows).
        ledger: an SQLite file (created if missing; a re-run skips unchanged files), a
            :class:`~nnmark.ledger.Ledger`, or None (in memory).
        alpha: significance level: a (file, key) verifies iff its p-value <= alpha.
        arch: the model factory trigger keys need (a callable or ``"module:function"``).
        device: where carriers are projected / models run (default: the CPU).
        workers: loader threads (default: the CPU count, 2 to 8). With two or more, the
            interpreter's thread switch interval is 100 us while the scan runs, then the
            caller's again (see :data:`nnmark.scan.local.SCAN_SWITCH_INTERVAL`).
        batch_size: files per batch: one ledger transaction, one native call per key and
            carrier shape (default 256, or 100 files per task with ``ray``).
        json_out: a text stream that gets one JSON object per (file, key): the row, as
            ``nnmark verify --json`` prints it (:func:`nnmark.rows.row_json`).
        progress: a progress bar on stderr.
        manifest: a file from :func:`write_manifest`: each file is then read and hashed
            whole (none is skipped: size and mtime cannot vouch for unchanged bytes) and
            flagged ``changed`` when it differs, ``unlisted`` when the manifest lacks it.
        rescan: ignore the ledger's rows (check every file again).
        null_rate: the chance match rate under the null (default 1/2 per bit,
            1/num_classes per trigger).
        calibration: calibrations of some of the keys (:class:`~nnmark.Calibration` objects
            or their files, one or a list; matched by key_id): their p-values come from the
            beta-binomial fitted on unmarked models. A calibration of none of the keys is an
            error.
        exclude: glob patterns of files to leave out (matched on the name and the path);
            they also silence what would be left out for another reason (a hidden or
            unlistable folder, a link leaving the folder), counted as ``excluded``.
        include_hidden: check files and folders whose name starts with ``.`` too.
        keep_rows: False keeps only the summary and the first ``max_problems`` rows that
            could not be checked (for scans of millions of files).
        max_problems: how many rows that could not be checked the result keeps.
        ray: run the batches as Ray tasks (``pip install "nnmark[ray]"``): ``"auto"``
            connects to the running cluster (``RAY_ADDRESS`` or ``ray start``'s), else
            starts Ray on this machine; any other string is a cluster address
            (``"ray://head:10001"``, ``"head:6379"``). Keys must then be key file paths,
            and workers read the key files and the checkpoints at the same paths as this
            process (a shared filesystem): keys are secrets and never travel. Rows land in
            this process's ledger as tasks finish, the rows a local scan writes (see
            :mod:`nnmark.scan.ray_backend`); ``json_out`` gets them in the order tasks
            finish; ``workers`` is not used.

    Returns:
        A :class:`ScanResult`: ``rows`` (one dict per (file, key), in scan order),
        ``summary`` (counts by status and key, rates, ``left_out`` {reason: count},
        ``left_out_examples`` {reason: the first few paths}, ``exit_code``), ``problems``.

    Raises:
        ValueError: a bad argument, an unusable ledger or manifest, an ``arch`` that
            cannot be imported (:class:`~nnmark.ledger.LedgerError` for a ledger that cannot
            be opened, read or written when the scan begins). A bad checkpoint never raises:
            it gets a row. A ledger that fails during the scan (a full disk) stops it:
            ``summary["fatal"]`` says why, the exit code is 2, finished batches are kept.
    """
    key_files = None
    if ray is not None:
        from .ray_backend import check_address, key_file_paths

        ray = check_address(ray)
        key_files = key_file_paths(keys)
        keys = key_files
    cals = load_calibrations(calibration)
    checks = make_checks(keys, alpha, null_rate, list(cals.values()))
    alpha = checks[0].alpha
    if any(c.trigger for c in checks):
        if arch is None:
            raise ValueError("trigger and DeepSigns keys run the model: pass arch= (a model factory or "
                             "'module:function')")
        from ..inference import load_factory

        load_factory(arch)  # a bad arch is a usage error, found before any file is read
    if batch_size is None:
        batch_size = DEFAULT_BATCH if ray is None else RAY_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if workers is None:
        workers = max(2, min(8, os.cpu_count() or 2))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    man = load_manifest(manifest) if manifest is not None else None
    own = not isinstance(ledger, Ledger)
    led = Ledger(ledger) if own else ledger
    try:
        skip_files = [os.path.abspath(manifest)] if manifest is not None else []
        if led.path is not None:  # never scan the ledger itself
            lp = os.path.abspath(led.path)
            skip_files += [lp, lp + "-wal", lp + "-shm", lp + "-journal"]
        skip_set = set(skip_files)
        expansion = walk_paths(paths, exclude, include_hidden)
        targets = [t for t in expansion.files if t not in skip_set]
        key_ids = [c.key_id for c in checks]
        # Only rows whose MAC verifies under these keys are trusted (see nnmark.ledger).
        verified_at = led.data_version()
        known = None if rescan else led.identities(key_ids, macs={c.key_id: mac_key(c.key) for c in checks},
                                                   paths=set(targets))
        settings = Settings(alpha, arch, device, null_rate, man, MAX_BATCH_BYTES, list(cals.values()))
        tally = Tally(led, key_ids, json_out, progress, len(targets), keep_rows, max_problems, checks, verified_at)
        try:
            with contextlib.ExitStack() as stack:
                if ray is None:
                    batches = local_batches(targets, checks, settings, known, workers, batch_size)
                else:
                    from .ray_backend import ray_batches

                    batches = ray_batches(ray, targets, checks, key_files, settings, known, batch_size)
                # Closed on the way out: an interrupted scan, or one whose ledger failed, stops
                # its loader threads (batches not begun are dropped) or cancels its Ray tasks.
                stack.enter_context(contextlib.closing(batches))
                for index, chunk, rows in batches:
                    tally.add(index, chunk, rows)
        except LedgerFatal:
            pass  # tally.fatal says why; the result carries it, with exit code 2
        finally:
            tally.close()
        return tally.result(len(targets), alpha, expansion)
    finally:
        if own:
            led.close()



__all__ = ["scan", "scan_batch", "expand_paths", "walk_paths", "Expansion", "LEFT_OUT_REASONS", "NOT_CHECKED",
           "write_manifest", "load_manifest", "ScanResult", "exit_code",
           "EXIT_OK", "EXIT_FINDINGS", "EXIT_ERROR", "EXIT_NO_FILES", "FIELDS"]
