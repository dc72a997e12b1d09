"""The batch engine: sources in, one result row per (source, key) out.

Every front door ends here: ``nnmark.verify`` and ``nnmark.calibrate`` (sources in
memory or on disk), ``nnmark.scan`` on local threads and on Ray (files). Sources
are opened by the one reader (:func:`nnmark.checkpoints.open_checkpoint`); each
white-box key checks its carriers with :class:`nnmark.whitebox.WhiteBoxCheck` (one
native projection per key and carrier shape), each trigger key runs its trigger set
with :class:`nnmark.blackbox.TriggerCheck`. These alone decide a row's status,
error class and p-value; a row has the fields of :data:`nnmark.rows.FIELDS`.

:func:`check_sources` and :func:`scan_batch` are pure: no ledger, no progress, no
shared state; a bad source gives a row with its status and never raises.
"""
from __future__ import annotations

import math
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..blackbox import TriggerCheck, is_trigger_key
from ..checkpoints import (Carrier, Checkpoint, CheckpointError, error_of, identity_of, open_checkpoint,
                           open_file)
from ..commitments import parsed_stamp
from ..keys import WhiteBoxKeyBase
from ..rows import RETRY_STATUSES
from ..whitebox import WhiteBoxCheck
from .manifest import integrity

# A batch is verified early once its carriers (or, for trigger keys, whole legacy
# files) hold this many bytes, so memory stays bounded with large checkpoints.
MAX_BATCH_BYTES = 16 << 20
# Checkpoints a batch holds open for trigger keys before it runs them.
MAX_OPEN = 64


# ------------------------------------------------------------------ keys
def load_keys(keys) -> list:
    """Key objects from key objects and/or key file paths (one or a list)."""
    from ..keys import load_key

    if keys is None:
        raise ValueError("at least one key is needed (a key object or a key file path)")
    if isinstance(keys, (str, os.PathLike)) or not isinstance(keys, (list, tuple)):
        keys = [keys]
    out = [load_key(k) if isinstance(k, (str, os.PathLike)) else k for k in keys]
    if not out:
        raise ValueError("at least one key is needed (a key object or a key file path)")
    return out


def make_check(key, alpha: float = 1e-6, null_rate: float | None = None, calibration=None):
    """The check of one key: :class:`WhiteBoxCheck`, :class:`TriggerCheck` or
    :class:`~nnmark.deepsigns.DeepSignsCheck` (it runs the model like a trigger check);
    ``calibration`` (a :class:`~nnmark.calibration.Calibration` of this key) replaces the
    nominal null."""
    from ..deepsigns import DeepSignsCheck, is_deepsigns_key

    if is_trigger_key(key):
        return TriggerCheck(key, alpha, null_rate, calibration)
    if is_deepsigns_key(key):
        return DeepSignsCheck(key, alpha, null_rate, calibration)
    if isinstance(key, WhiteBoxKeyBase):
        return WhiteBoxCheck(key, alpha, null_rate, calibration)
    raise TypeError(f"a key must be a white-box key (nnmark.WhiteBoxKey, nnmark.DenseKey, nnmark.DeepSignsKey) or "
                    f"a trigger key (nnmark.TriggerKey), got {type(key).__name__}")


def load_calibrations(calibration) -> dict:
    """{key_id: Calibration} from None, one calibration (object or file path) or a list of them."""
    from ..calibration import Calibration, load_calibration

    if calibration is None:
        return {}
    items = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    out = {}
    for c in items:
        if isinstance(c, (str, os.PathLike)):
            c = load_calibration(c)
        if not isinstance(c, Calibration):
            raise TypeError(f"a calibration must be an nnmark.Calibration or a calibration file path, "
                            f"got {type(c).__name__}")
        if c.key_id in out:
            raise ValueError(f"two calibrations for key {c.key_id}")
        out[c.key_id] = c
    return out


def make_checks(keys, alpha: float = 1e-6, null_rate: float | None = None, calibration=None) -> list:
    """The checks of keys given as objects or key file paths; two keys with one key_id are
    refused, and so is a calibration made for none of the keys."""
    cals = load_calibrations(calibration)
    checks, seen = [], set()
    for k in load_keys(keys):
        c = make_check(k, alpha, null_rate, cals.get(getattr(k, "key_id", None)))
        if c.key_id in seen:
            raise ValueError(f"two keys share key_id {c.key_id} (the same secret); rows are told apart by key_id")
        seen.add(c.key_id)
        checks.append(c)
    stray = sorted(set(cals) - seen)
    if stray:
        from ..calibration import CalibrationError

        raise CalibrationError(f"a calibration was made for key {stray[0]}, which is not among the keys "
                               f"{sorted(seen)}: calibrate the keys in use")
    return checks


# ------------------------------------------------------------------ batch buffers
class Arena:
    """Batch buffers of one thread, reused from batch to batch: safetensors carriers
    are read straight into consecutive rows of one ``[cap, *shape]`` tensor per (key,
    shape, dtype), which the projection then takes as it is -- no per-file buffer, no
    stacking copy, no fresh pages to fault in for every batch."""

    MAX_BUFFERS = 8

    def __init__(self):
        self.bufs: dict[tuple, list] = {}  # (key_id, shape, dtype) -> [base tensor, uint8 rows, used]

    def reset(self) -> None:
        for e in self.bufs.values():
            e[2] = 0

    def allocator(self, key_id: str, max_bytes: int):
        def out(shape: tuple, dtype: torch.dtype):
            k = (key_id, shape, dtype)
            e = self.bufs.get(k)
            if e is None:
                nbytes = math.prod(shape) * dtype.itemsize
                cap = max_bytes // max(nbytes, 1) + 1  # the batch is verified once it holds max_bytes
                if cap < 2 or nbytes == 0:
                    return None  # one carrier per batch: nothing to gain
                if len(self.bufs) >= self.MAX_BUFFERS:
                    self.bufs = {kk: v for kk, v in self.bufs.items() if v[2]}
                base = torch.empty((cap, *shape), dtype=dtype)
                e = self.bufs[k] = [base, base.view(cap, -1).view(torch.uint8).numpy(), 0]
            base, rows, used = e
            if used >= len(rows):
                return None
            e[2] = used + 1
            return rows[used], base, used

        return out


_LOCAL = threading.local()


def thread_arena() -> Arena:
    """This thread's arena: a loader thread reuses its buffers batch after batch (fresh
    pages cost a fault each, which on some VMs is dearer than the read itself)."""
    a = getattr(_LOCAL, "arena", None)
    if a is None:
        a = _LOCAL.arena = Arena()
    return a


# ------------------------------------------------------------------ one source
@dataclass
class Loaded:
    """What the keys need of one source, read."""

    path: str
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    ctime_ns: int | None = None
    format: str | None = None
    error: CheckpointError | None = None  # the whole source failed
    carriers: dict = field(default_factory=dict)  # key_id -> Carrier | CheckpointError
    ck: Checkpoint | None = None  # kept open for trigger keys
    model: Any = None  # what trigger keys run: the module itself, or a lazy state dict
    model_error: CheckpointError | None = None  # why trigger keys cannot run it
    extra: dict = field(default_factory=dict)  # key_id -> what a key kind reports beside the row
    bytes_read: int = 0
    read_s: float = 0.0
    integrity: str | None = None
    file_sha256: str | None = None
    stamp: str | None = None  # the text of a commitment stamped into the file, unparsed


def _skip(known: dict | None, path: str, ident: tuple, checks, manifest) -> bool:
    # ident: (size, mtime_ns, inode, ctime_ns) now; the ledger's rows were trusted only if
    # their MACs verified (Ledger.identities). Against a manifest every file is read again:
    # its identity cannot vouch for unchanged bytes (bit rot), the hash can.
    if not known or manifest is not None:
        return False
    seen = known.get(path)
    if not seen:
        return False
    for c in checks:
        old = seen.get(c.key_id)  # (size, mtime_ns, inode, ctime_ns, alpha, status, integrity, null)
        if old is None or len(old) != 8 or old[:4] != ident or old[4] != c.alpha or old[5] in RETRY_STATUSES \
                or old[7] != c.null:  # another null (a calibration): check again
            return False
    return True


def _load(source, label: str, wb: list, tk: list, known, manifest, allocators: dict) -> Loaded | None:
    """Reads what the keys need of one source; None when the ledger says the file is unchanged."""
    t0 = time.perf_counter()
    f = Loaded(label)
    ck = None
    is_file = isinstance(source, (str, os.PathLike))
    try:
        if is_file:
            st = os.stat(source)
            ident = identity_of(st)
            f.size, f.mtime_ns, f.inode, f.ctime_ns = ident
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a device never end
                raise CheckpointError("unsupported", "NotARegularFile", f"{label!r} is not a regular file")
            if known and _skip(known, label, ident, wb + tk, manifest):
                return None
            ck = open_file(source)
            ident = ck.size, ck.mtime_ns, ck.inode, ck.ctime_ns
            f.size, f.mtime_ns, f.inode, f.ctime_ns = ident
            if known and ck.format == "hf-sharded" and _skip(known, label, ident, wb + tk, manifest):
                ck.close()
                return None
        else:
            ck = open_checkpoint(source, label)
        f.format, f.stamp = ck.format, ck.stamp
        for c in wb:
            try:
                f.carriers[c.key_id] = ck.carrier(c.key.carrier, c.validate, allocators.get(c.key_id))
            except Exception as exc:  # noqa: BLE001 - one carrier's problem, reported in its row
                f.carriers[c.key_id] = error_of(exc, label)
        if manifest is not None and is_file:
            f.integrity, f.file_sha256 = integrity(label, ck.format == "hf-sharded", manifest)
        if tk:
            f.ck = ck
            try:
                f.model = ck.module if ck.module is not None else ck.state_dict()
            except Exception as exc:  # noqa: BLE001 - e.g. a bare tensor cannot run
                f.model_error = error_of(exc, label)
    except Exception as exc:  # noqa: BLE001 - bad input never stops a scan
        f.error = error_of(exc, label)
        if manifest is not None and is_file and f.size is not None and f.integrity is None:
            try:  # a damaged file that differs from the manifest says how it was damaged
                f.integrity, f.file_sha256 = integrity(label, False, manifest)
            except (OSError, CheckpointError):
                pass
    finally:
        if ck is not None and f.ck is None:
            f.bytes_read = ck.bytes_read
            ck.close()
    f.read_s = time.perf_counter() - t0
    return f


# ------------------------------------------------------------------ rows
_STAMPS_PER_CHECK = 256  # distinct stamps remembered per key (a zoo holds a few: one per release)


def stamp_fields(stamp: str | None, check) -> tuple[str | None, bool | None]:
    """(commitment_id, commitment_matches) of a row: the id of the commitment stamped into the
    file, and whether it is a commitment to the check's key -- the key with the stamp's own
    created, statement and spec hashes to it (a malformed stamp: None, False)."""
    if stamp is None:
        return None, None
    c = parsed_stamp(stamp)
    if c is None:
        return None, False
    seen = getattr(check, "stamp_matches", None)
    if seen is None:
        seen = check.stamp_matches = {}
    hit = seen.get(stamp)
    if hit is None:  # hashed once per distinct stamp and key, and only when some file carries a stamp
        if len(seen) >= _STAMPS_PER_CHECK:
            seen.clear()
        hit = seen[stamp] = c.matches(check.key)
    return c.id, hit


def new_row(f: Loaded, check, now: float) -> dict:
    cid, cmatch = stamp_fields(f.stamp, check)
    return {"path": f.path, "key_id": check.key_id, "size": f.size, "mtime_ns": f.mtime_ns, "inode": f.inode,
            "ctime_ns": f.ctime_ns, "format": f.format,
            "carrier": None, "carrier_sha256": None, "bytes_read": f.bytes_read, "status": "ok", "verified": False,
            "matches": None, "bits": check.bits, "ber": None, "p_value": None, "threshold": check.threshold,
            "alpha": check.alpha, "null": check.null, "controls": check.num_controls, "control_matches": None,
            "control_p_value": None, "warning": check.warning, "error_class": None, "error_message": None, "integrity": f.integrity,
            "file_sha256": f.file_sha256, "commitment_id": cid, "commitment_matches": cmatch, "read_s": f.read_s, "verify_s": 0.0, "scanned_at": now, "mac": None}


def fail(row: dict, err: CheckpointError) -> dict:
    row.update(status=err.status, verified=False, error_class=err.error_class, error_message=str(err))
    return row


def failed_rows(path: str, checks, exc: BaseException) -> list[dict]:
    """The rows of a file whose whole check failed outside the engine (e.g. its Ray task
    died every try): ``io_error``, so that the next scan tries it again."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    err = CheckpointError("io_error", type(exc).__name__, f"the task checking {path!r} failed every try "
                                                          f"({first}); the next scan tries it again")
    now = time.time()
    return [fail(new_row(Loaded(path), c, now), err) for c in checks]


def internal_error(path: str, exc: BaseException, where: str) -> CheckpointError:
    """An exception nnmark did not expect while checking one file, as that file's error:
    status ``error`` (the exit code says not everything was checked; the next scan tries
    the file again), the exception's class, and where it happened."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return CheckpointError("error", type(exc).__name__, f"nnmark failed while {where} {path!r}{at}: "
                                                         f"{first or type(exc).__name__} (please report this)")


def _verify_whitebox(check: WhiteBoxCheck, files: list[Loaded], rows: list[dict], device) -> None:
    kid = check.key_id
    idx, carriers = [], []
    for i, f in enumerate(files):
        c = f.carriers.get(kid)
        if isinstance(c, Carrier):
            idx.append(i)
            carriers.append(c)
        elif f.error is None:
            fail(rows[i], c)
    if not carriers:
        return
    t0 = time.perf_counter()
    results = check.extract_bits(carriers, device)
    share = (time.perf_counter() - t0) / len(idx)
    Carrier.hash_all(carriers)  # (a batch's hashes in one call without the GIL)
    good = [r for r in results if not isinstance(r, CheckpointError)]
    fields = iter(check.fields(good))
    for i, c, r in zip(idx, carriers, results):
        row = rows[i]
        row["carrier"], row["carrier_sha256"], row["verify_s"] = c.name, c.sha256, share
        if isinstance(r, CheckpointError):
            fail(row, r)
        else:
            row.update(next(fields))


def _verify_trigger(check: TriggerCheck, files: list[Loaded], rows: list[dict], arch, device) -> None:
    idx = []
    for i, f in enumerate(files):
        if f.error is not None:
            continue
        if f.model_error is not None:
            fail(rows[i], f.model_error)
        else:
            idx.append(i)
    if not idx:
        return
    t0 = time.perf_counter()
    results = check.run([files[i].model for i in idx], arch, device)
    share = (time.perf_counter() - t0) / len(idx)
    for i, r in zip(idx, results):
        row = rows[i]
        row["verify_s"] = share
        sd = files[i].model
        row["carrier_sha256"] = getattr(sd, "sha256", None)  # every tensor the model read (files, state dicts)
        if isinstance(r, CheckpointError):
            fail(row, r)
        else:
            files[i].extra[check.key_id] = {"margin": r.pop("margin"), "null_rate": check.p0}
            row.update(r)


def _verify(files: list[Loaded], checks: list, arch, device, extras: list | None) -> list[dict]:
    now = time.time()
    by_key: dict[str, list[dict]] = {}
    for c in checks:
        rows = [new_row(f, c, now) for f in files]
        for f, r in zip(files, rows):
            if f.error is not None:
                fail(r, f.error)
        if c.trigger:
            _verify_trigger(c, files, rows, arch, device)
        else:
            _verify_whitebox(c, files, rows, device)
        by_key[c.key_id] = rows
    for f in files:
        if f.ck is not None:
            f.bytes_read = f.ck.bytes_read
            f.ck.close()
            f.ck = f.model = None
    out = []
    for i, f in enumerate(files):  # rows in source order, keys in the order given
        for c in checks:
            r = by_key[c.key_id][i]
            if f.bytes_read > r["bytes_read"]:
                r["bytes_read"] = f.bytes_read
            out.append(r)
            if extras is not None:
                extras.append(f.extra.get(c.key_id, {}))
    return out


def _verify_batch(files: list[Loaded], checks: list, arch, device, extras: list | None) -> list[dict]:
    """:func:`_verify`, and if it raises (a bug, or a tensor nothing foresaw), each file
    again on its own, so that only the file that raises gets ``error`` rows."""
    parts = [files]
    for attempt in range(2):
        rows = []
        for part in parts:
            mark = len(extras) if extras is not None else 0
            try:
                rows += _verify(part, checks, arch, device, extras)
            except Exception as exc:  # noqa: BLE001 - one file must not stop the others
                if extras is not None:
                    del extras[mark:]
                if attempt == 0 and len(files) > 1:
                    break
                rows += error_rows(part[0], checks, internal_error(part[0].path, exc, "verifying"), extras)
        else:
            return rows
        parts = [[f] for f in files]
    return rows


def error_rows(f: Loaded, checks: list, err: CheckpointError, extras: list | None = None) -> list[dict]:
    """The rows of a file whose check failed as a whole: ``err`` in every key's row."""
    if f.ck is not None:
        try:
            f.bytes_read = f.ck.bytes_read
            f.ck.close()
        except Exception:  # noqa: BLE001 - closing a broken checkpoint
            pass
        f.ck = f.model = None
    now = time.time()
    rows = [fail(new_row(f, c, now), err) for c in checks]
    if extras is not None:
        extras += [{} for _ in checks]
    return rows


def check_sources(sources: Sequence, checks: list, *, arch=None, device=None, labels: Sequence[str] | None = None,
                  known: dict | None = None, manifest: dict[str, str] | None = None,
                  max_batch_bytes: int = MAX_BATCH_BYTES, extras: list | None = None) -> list[dict]:
    """Rows for ``sources`` (paths, modules, state dicts, tensors): one per (source, check),
    sources in the order given, checks in the order given. Never raises for a bad source.

    ``labels``: the ``path`` of each source's rows (default: the path itself, or
    ``<module>``...). ``known``: ``{path: {key_id: (size, mtime_ns, inode, ctime_ns, alpha,
    status, integrity, null)}}`` (:meth:`Ledger.identities`, which returns only rows whose
    MAC verifies) -- files whose identity matches for every key are skipped (no rows).
    ``manifest``: ``{absolute path: sha256}``: files are hashed whole and compared.
    ``extras``: a list that gets, for each row, a dict of what its key kind reports
    beside the row (trigger keys: ``margin``, ``null_rate``)."""
    from ..checkpoints import label_of

    wb = [c for c in checks if not c.trigger]
    tk = [c for c in checks if c.trigger]
    if labels is None:
        labels = [label_of(s) for s in sources]
    arena = thread_arena()
    arena.reset()
    allocators = {c.key_id: arena.allocator(c.key_id, max_batch_bytes) for c in wb}
    rows: list[dict] = []
    pending: list[Loaded] = []
    held = 0
    # The carriers are read now and hashed when a part is verified: the hashes of a
    # whole part in a row (hashlib releases the GIL for each, so another loader thread
    # reads meanwhile), not one hash between two reads.
    for source, label in zip(sources, labels):
        try:
            f = _load(source, label, wb, tk, known, manifest, allocators)
        except Exception as exc:  # noqa: BLE001 - _load reports bad input itself; this is nnmark failing
            f = Loaded(label, error=internal_error(label, exc, "reading"))
        if f is None:
            continue
        pending.append(f)
        for c in f.carriers.values():
            if isinstance(c, Carrier):
                held += c.nbytes
        if f.ck is not None and f.ck.format == "torch-legacy":
            held += f.size or 0  # read whole and kept for the model
        # Trigger keys keep each checkpoint open until its model has run: bound the open files.
        if held >= max_batch_bytes or (tk and len(pending) >= MAX_OPEN):
            rows += _verify_batch(pending, checks, arch, device, extras)
            pending, held = [], 0
            arena.reset()  # the verified carriers are no longer referenced
    if pending:
        rows += _verify_batch(pending, checks, arch, device, extras)
    return rows



def scan_batch(targets: Sequence[str | os.PathLike], keys, *, alpha: float = 1e-6, arch=None, device=None,
               null_rate: float | None = None, known: dict | None = None, manifest: dict[str, str] | None = None,
               max_batch_bytes: int = MAX_BATCH_BYTES, calibration=None) -> list[dict]:
    """Rows (dicts with :data:`nnmark.rows.FIELDS`) for a batch of checkpoint paths:
    one per (file, key), files in the order given, keys in the order given.

    Pure: reads the files, writes nothing, keeps no state, never raises for a bad
    file; the unit of work of a scan's loader thread and of a Ray task. ``keys``: key
    objects or key file paths. ``known``: ``{path: {key_id: (size, mtime_ns, inode,
    ctime_ns, alpha, status, integrity, null)}}`` (:meth:`Ledger.identities`) -- files whose
    identity matches for every key are skipped (no rows). ``manifest``: ``{absolute path:
    sha256}`` (:func:`load_manifest`). ``targets`` are used as given (pass absolute
    paths, as :func:`expand_paths` makes them). ``calibration``: calibrations (objects or
    files) of some of the keys."""
    checks = make_checks(keys, alpha, null_rate, calibration)
    if any(c.trigger for c in checks) and arch is None:
        raise ValueError("trigger and DeepSigns keys run the model: pass arch= (a model factory or "
                         "'module:function')")
    targets = [os.fspath(t) for t in targets]
    return check_sources(targets, checks, arch=arch, device=device, labels=targets, known=known, manifest=manifest,
                         max_batch_bytes=max_batch_bytes)


def chunks(items: list, size: int) -> list[list]:
    """``items`` cut into lists of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


__all__ = ["MAX_BATCH_BYTES", "MAX_OPEN", "load_keys", "make_check", "make_checks", "check_sources", "scan_batch",
           "failed_rows", "error_rows", "internal_error", "new_row", "stamp_fields", "fail", "chunks", "Arena", "thread_arena", "Loaded"]
