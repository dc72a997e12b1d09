"""``nnmark.scan``: verify keys across thousands of checkpoint files.

Paths (files, folders walked recursively, globs) expand to checkpoints; a
folder with a shard index (``*.index.json``) holds a sharded checkpoint that
counts once, as its index. Files are read lazily by :mod:`nnmark.formats`
(white-box keys read only their carrier's bytes) on loader threads, and each
batch of carriers is verified by one native projection call per key and
carrier shape; trigger keys run their trigger set through each checkpoint
with the batched inference of :mod:`nnmark.inference` (``arch``).

Every (file, key) gets exactly one row (see :mod:`nnmark.ledger` for the
fields); bad input gives a row with its status and never stops the scan.
Rows go to the ledger one transaction per batch, so a killed scan loses no
finished batch, and a re-run skips files whose identity (path, size, mtime)
and alpha are unchanged (rows with an ``io_error`` are retried; against a
manifest every file is read again).

:func:`scan_batch` (a list of files -> their rows) is pure: no ledger, no
progress, no shared state; it is the unit a cluster task runs.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch

from .carriers import carrier_length
from .formats import Carrier, Checkpoint, FormatError, file_sha256, index_shards, open_file
from .ledger import FIELDS, Ledger
from .stats import STATUSES

# Exit codes of a scan (modelscan's convention, as in nnmark.cli).
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_NO_FILES = 0, 1, 2, 3
DEFAULT_BATCH = 256
# Files per Ray task: enough to amortise a task's start and its key loading.
RAY_BATCH = 100
# A batch is verified early once its carriers (or, for trigger keys, whole legacy
# files) hold this many bytes, so memory stays bounded with large checkpoints.
MAX_BATCH_BYTES = 16 << 20
# Checkpoints a batch holds open for trigger keys before it runs them.
_MAX_OPEN = 64
# How severe a status is, for the one-line status of a file with several keys.
_SEVERITY = {s: i for i, s in enumerate(("ok", "absent", "invalid", "unsupported", "corrupt", "io_error", "unsafe"))}


# ------------------------------------------------------------------ keys
@dataclass
class _Plan:
    """What a scan needs of one key, computed once."""

    key: Any
    key_id: str
    trigger: bool
    bits: int
    threshold: int
    p_values: list[float] | None = None  # p_values[m] = P[Binomial(bits, p0) >= m]
    owner: torch.Tensor | None = None
    null_rate: float | None = None


def _load_keys(keys) -> list:
    from .keys import load_key

    if keys is None:
        raise ValueError("scan needs at least one key (a key object or a key file path)")
    if isinstance(keys, (str, os.PathLike)) or not isinstance(keys, (list, tuple)):
        keys = [keys]
    out = [load_key(k) if isinstance(k, (str, os.PathLike)) else k for k in keys]
    if not out:
        raise ValueError("scan needs at least one key (a key object or a key file path)")
    return out


def _plans(keys, alpha: float, null_rate: float | None) -> list[_Plan]:
    from scipy.stats import binom

    from .keys import _WhiteBoxBase
    from .stats import binomial_threshold
    from .triggers import TriggerKey

    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if null_rate is not None and not 0.0 < float(null_rate) < 1.0:
        raise ValueError(f"null_rate must be in (0, 1), got {null_rate!r}")
    plans, seen = [], {}
    for k in _load_keys(keys):
        if isinstance(k, TriggerKey):
            p0 = k.null_rate if null_rate is None else float(null_rate)
            plans.append(_Plan(k, k.key_id, True, k.n, binomial_threshold(k.n, alpha, p0), null_rate=null_rate))
        elif isinstance(k, _WhiteBoxBase):
            n = k.num_bits
            p0 = 0.5 if null_rate is None else float(null_rate)
            # One table per key: a verdict is then a lookup, not a scipy call per file.
            pv = binom.sf(np.arange(-1, n), n, p0).astype(np.float64)
            pv[0] = 1.0
            plans.append(_Plan(k, k.key_id, False, n, binomial_threshold(n, alpha, p0), pv.tolist(), k.bits, p0))
        else:
            raise TypeError(f"a key must be a WhiteBoxKey, DenseKey or TriggerKey (or a key file path), "
                            f"got {type(k).__name__}")
        if k.key_id in seen:
            raise ValueError(f"two keys share key_id {k.key_id} (the same secret); the ledger tells rows apart by key_id")
        seen[k.key_id] = True
    return plans


def _validator(key):
    """Checks a carrier from its header (shape, dtype) before its bytes are read."""
    good: set[tuple] = set()  # shapes that passed: thousands of files share a few

    def validate(name: str, shape: tuple, dtype) -> None:
        if dtype is not None and shape in good:
            return
        if dtype is None:
            raise FormatError("invalid", "WrongDtype", f"carrier {name!r} is not floating point")
        if key.shape is not None and tuple(shape) != key.shape:
            raise FormatError("invalid", "WrongShape", f"carrier {name!r} has shape {list(shape)}, "
                                                       f"the key expects {list(key.shape)}")
        try:
            n = carrier_length(shape, key.reduction)
        except ValueError as exc:
            raise FormatError("invalid", "WrongShape", f"carrier {name!r}: {exc}") from None
        if key.length is not None and n != key.length:
            raise FormatError("invalid", "WrongShape", f"carrier {name!r} reduces to length {n}, "
                                                       f"the key expects {key.length}")
        good.add(shape)

    return validate


# ------------------------------------------------------------------ paths
def expand_paths(paths, exclude: Iterable[str] = ()) -> list[str]:
    """Checkpoint paths (absolute, sorted per argument, no duplicates) of files, folders
    (walked recursively; hidden entries skipped) and glob patterns. In a folder with a
    shard index (``*.index.json`` naming shards beside it), the index stands for the
    shards it names. A path that does not exist is kept (its row says io_error); a
    pattern that matches nothing adds nothing. ``exclude``: glob patterns matched
    against the file name and the full path."""
    import fnmatch

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    excl = [os.fspath(e) for e in exclude]
    out: dict[str, None] = {}

    def add(p: str, absolute: bool = False) -> None:
        if not absolute:
            p = os.path.abspath(p)
        if not excl or not any(fnmatch.fnmatch(os.path.basename(p), e) or fnmatch.fnmatch(p, e) for e in excl):
            out.setdefault(p, None)

    for raw in paths:
        s = os.fspath(raw)
        if os.path.isdir(s):
            for p in _walk(os.path.abspath(s)):  # absolute and normalised already
                add(p, True)
        elif os.path.lexists(s) or not glob.has_magic(s):
            add(s)
        else:
            for m in sorted(glob.glob(s, recursive=True)):
                if os.path.isdir(m):
                    for p in _walk(os.path.abspath(m)):
                        add(p, True)
                else:
                    add(m)
    return list(out)


def _walk(top: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = sorted(f for f in filenames if not f.startswith("."))
        shards: set[str] = set()
        for f in files:
            if f.endswith(".index.json"):
                try:
                    shards.update(os.path.basename(s) for s in index_shards(os.path.join(dirpath, f)))
                except FormatError:
                    pass  # not an index after all: scanned like any file
        found += [os.path.join(dirpath, f) for f in files if f not in shards]
    return found


# ------------------------------------------------------------------ manifest
def write_manifest(paths, out: str | os.PathLike | IO[str], exclude: Iterable[str] = (), workers: int | None = None,
                   progress=None) -> tuple[int, list[str]]:
    """Writes the whole-file sha256 of every file under ``paths`` (shards included) in
    ``sha256sum`` format (``<hex>  <path>``; paths relative to the manifest's folder when
    inside it). Reads every byte, on purpose: the formats themselves carry no checksum.
    Unreadable files are left out with a warning on stderr. Returns (files written,
    paths that could not be read)."""
    import sys

    files: list[str] = []
    for p in expand_paths(paths, exclude):
        files.append(p)
        if p.endswith(".index.json"):
            try:
                files += index_shards(p)
            except FormatError:
                pass
    if isinstance(out, (str, os.PathLike)):
        out_path = os.path.abspath(out)
        files = [f for f in files if f != out_path]
        base = os.path.dirname(out_path)
    else:
        base = None
    files = list(dict.fromkeys(files))

    def one(p):
        try:
            return p, file_sha256(p)
        except OSError as exc:
            return p, exc

    lines, failed = [], []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2)) as pool:
        for i, (p, h) in enumerate(pool.map(one, files)):
            if progress is not None:
                progress(i + 1, len(files))
            if isinstance(h, OSError):
                print(f"warning: {p}: {h.strerror or h}; not in the manifest", file=sys.stderr)
                failed.append(p)
                continue
            shown = os.path.relpath(p, base) if base and (p + os.sep).startswith(base + os.sep) else p
            lines.append(_manifest_line(h, shown))
    text = "".join(lines)
    if isinstance(out, (str, os.PathLike)):
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        out.write(text)
    return len(lines), failed


def _manifest_line(digest: str, path: str) -> str:
    if "\\" in path or "\n" in path:  # sha256sum's escaping of awkward names
        return "\\" + digest + "  " + path.replace("\\", "\\\\").replace("\n", "\\n") + "\n"
    return f"{digest}  {path}\n"


def load_manifest(path: str | os.PathLike) -> dict[str, str]:
    """{absolute path: sha256} from a manifest (``sha256sum`` format; relative paths are
    relative to the manifest's folder). Raises ValueError on a malformed line."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read manifest {os.fspath(path)!r}: {exc}") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        digest, sep, name = line.partition("  ")
        if not sep:
            digest, sep, name = line.partition(" *")  # sha256sum's binary-mode marker
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError(f"manifest {os.fspath(path)!r} line {n}: expected '<sha256 hex>  <path>', got {line[:80]!r}")
        if escaped:
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        out[os.path.normpath(os.path.join(base, name))] = digest.lower()
    return out


def _integrity(path: str, ck: Checkpoint | None, manifest: dict[str, str]) -> tuple[str, str | None]:
    """(ok | changed | unlisted, whole-file sha256 of path) for a file and its shards."""
    members = [path]
    if ck is not None and ck.format == "hf-sharded":
        members += index_shards(path)
    state, first = "ok", None
    for m in members:
        h = file_sha256(m)
        first = first or h
        want = manifest.get(m)
        if want is None:
            state = "unlisted" if state == "ok" else state
        elif want != h:
            state = "changed"
    return state, first


# ------------------------------------------------------------------ one batch
class _Arena:
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


def _arena() -> _Arena:
    """This thread's arena: a loader thread reuses its buffers batch after batch (fresh
    pages cost a fault each, which on some VMs is dearer than the read itself)."""
    a = getattr(_LOCAL, "arena", None)
    if a is None:
        a = _LOCAL.arena = _Arena()
    return a


def _as_batch(cs: list[Carrier]) -> torch.Tensor:
    """``[C, *shape]``: a view when the carriers were read into consecutive rows of one
    batch tensor (the usual case), else a stack of copies."""
    s0 = cs[0].slot
    if s0 is not None:
        base, i0 = s0
        if all(c.slot is not None and c.slot[0] is base and c.slot[1] == i0 + j for j, c in enumerate(cs)):
            return base[i0:i0 + len(cs)]
    return torch.stack([c.tensor for c in cs])


@dataclass
class _File:
    path: str
    size: int | None = None
    mtime_ns: int | None = None
    format: str | None = None
    error: FormatError | None = None  # the whole file failed
    carriers: dict = field(default_factory=dict)  # key_id -> Carrier | FormatError
    ck: Checkpoint | None = None  # kept open for trigger keys
    sd: Any = None
    bytes_read: int = 0
    read_s: float = 0.0
    integrity: str | None = None
    file_sha256: str | None = None


def _error_of(exc: BaseException) -> FormatError:
    if isinstance(exc, FormatError):
        return exc
    if isinstance(exc, OSError):
        return FormatError("io_error", type(exc).__name__, f"cannot read: {exc.strerror or exc}")
    status = getattr(exc, "status", None)
    if status in STATUSES and status != "ok":  # a CheckpointError from the shared readers
        return FormatError(status, type(exc).__name__, str(exc))
    # Anything else is still this file's problem, not the scan's.
    return FormatError("corrupt", type(exc).__name__, f"unexpected error reading the file: {str(exc)[:300]}")


def _skip(known: dict | None, path: str, size: int, mtime: int, plans, alpha: float, manifest) -> bool:
    # Against a manifest every file is read again: size and mtime cannot vouch for
    # unchanged bytes (bit rot, or an edit that restored the mtime), the hash can.
    if not known or manifest is not None:
        return False
    seen = known.get(path)
    if not seen:
        return False
    for p in plans:
        ident = seen.get(p.key_id)
        if ident is None or ident[0] != size or ident[1] != mtime or ident[2] != alpha or ident[3] == "io_error":
            return False
    return True


def _load(path: str, wb: list[_Plan], tk: list[_Plan], validators: dict, known, alpha: float, manifest,
          allocators: dict) -> _File | None:
    """Reads what the keys need of one file; None when the ledger says it is unchanged."""
    t0 = time.perf_counter()
    f = _File(path)
    ck = None
    try:
        st = os.stat(path)
        f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a device never end
            raise FormatError("unsupported", "NotARegularFile", f"{path!r} is not a regular file")
        if known and _skip(known, path, f.size, f.mtime_ns, wb + tk, alpha, manifest):
            return None
        ck = open_file(path, st)
        f.format, f.size, f.mtime_ns = ck.format, ck.size, ck.mtime_ns
        if known and ck.format == "hf-sharded" and _skip(known, path, f.size, f.mtime_ns, wb + tk, alpha, manifest):
            ck.close()
            return None
        for p in wb:
            try:
                f.carriers[p.key_id] = ck.carrier(p.key.carrier, validators[p.key_id], allocators.get(p.key_id))
            except Exception as exc:  # noqa: BLE001 - one carrier's problem, reported in its row
                f.carriers[p.key_id] = _error_of(exc)
        if manifest is not None:
            f.integrity, f.file_sha256 = _integrity(path, ck, manifest)
        if tk:
            f.ck, f.sd = ck, ck.state_dict()
    except Exception as exc:  # noqa: BLE001 - bad input never stops a scan
        f.error = _error_of(exc)
        if isinstance(exc, FileNotFoundError) and f.size is None:
            f.error = FormatError("io_error", "FileNotFoundError", f"cannot read {path!r}: no such file (or it vanished)")
        elif manifest is not None and f.size is not None and f.integrity is None:
            try:  # a damaged file that differs from the manifest says how it was damaged
                f.integrity, f.file_sha256 = _integrity(path, None, manifest)
            except OSError:
                pass
    finally:
        if ck is not None and f.ck is None:
            f.bytes_read = ck.bytes_read
            ck.close()
    f.read_s = time.perf_counter() - t0
    return f


def _row(f: _File, p: _Plan, alpha: float, now: float) -> dict:
    return {"path": f.path, "key_id": p.key_id, "size": f.size, "mtime_ns": f.mtime_ns, "format": f.format,
            "carrier": None, "carrier_sha256": None, "bytes_read": f.bytes_read, "status": "ok", "verified": False,
            "matches": None, "bits": p.bits, "ber": None, "p_value": None, "threshold": p.threshold, "alpha": alpha,
            "error_class": None, "error_message": None, "integrity": f.integrity, "file_sha256": f.file_sha256,
            "read_s": f.read_s, "verify_s": 0.0, "scanned_at": now}


def _fail(row: dict, err: FormatError) -> dict:
    row.update(status=err.status, verified=False, error_class=getattr(err, "error_class", None) or type(err).__name__,
               error_message=str(err))
    return row


def _reduce_cpu(key, batch: torch.Tensor) -> np.ndarray | None:
    """``key.reduce(batch, batched=True)`` in numpy for a CPU batch ``[C, *shape]``:
    float32 (float64 stays float64), or None for a dtype numpy lacks (float8). numpy
    runs on the calling loader thread; torch would wake its intra-op pool for every
    small batch, and two loaders' pools then fight over the same cores."""
    dt = batch.dtype
    if dt == torch.float32 or dt == torch.float64:
        a = batch.numpy()
    elif dt == torch.float16:
        a = batch.numpy().astype(np.float32)
    elif dt == torch.bfloat16:  # exact: a bfloat16 is the top half of a float32
        a = batch.view(torch.int16).numpy().astype(np.int32)
        a <<= 16
        a = a.view(np.float32)
    else:
        return None
    C = a.shape[0]
    if key.reduction == "flat":
        return a.reshape(C, -1)
    m = a.mean(axis=1)  # filter_mean: over out-channels, as reduce_carrier
    if key.order == "keras" and m.ndim > 2:
        m = np.moveaxis(m, 1, -1)  # (in, kh, kw) -> (kh, kw, in)
    return np.ascontiguousarray(m.reshape(C, -1))


def _verify_whitebox(p: _Plan, files: list[_File], rows: list[dict], device) -> None:
    """Fills the rows of one white-box key: one native projection per carrier shape and dtype."""
    groups: dict = {}
    kid = p.key_id
    for i, f in enumerate(files):
        c = f.carriers.get(kid)
        if isinstance(c, Carrier):
            r = rows[i]
            r["carrier"], r["carrier_sha256"] = c.name, c.sha256  # hashes the bytes read (GIL released)
            # Carriers read into one batch tensor share its shape and dtype: group them by it.
            g = id(c.slot[0]) if c.slot is not None else (tuple(c.tensor.shape), c.tensor.dtype)
            groups.setdefault(g, []).append(i)
        elif f.error is None:
            _fail(rows[i], c)
    owner = p.owner
    owner_np = owner.numpy().astype(bool)
    on_cpu = device is None or torch.device(device).type == "cpu"
    for idx in groups.values():
        t0 = time.perf_counter()
        cs = [files[i].carriers[p.key_id] for i in idx]
        try:
            # As whitebox._project_batch (what nnmark.verify uses): float32 unless float64,
            # stacked, reduced, one native call; the reduced vectors also tell which
            # carriers hold NaN/Inf (the projection kernel does not propagate them).
            stacked = _as_batch(cs)
            v = _reduce_cpu(p.key, stacked) if on_cpu else None
            if v is not None:
                finite = np.isfinite(v).all(axis=1).tolist()
                proj = p.key.project_vectors(torch.from_numpy(v)).numpy()  # [C, T]
                matches = np.count_nonzero((proj > 0) == owner_np, axis=1).tolist()
            else:
                if device is not None:
                    stacked = stacked.to(device, non_blocking=True)
                if stacked.dtype != torch.float64:
                    stacked = stacked.to(torch.float32)
                vt = p.key.reduce(stacked, batched=True)  # [C, N]
                finite = torch.isfinite(vt).all(dim=1).tolist()
                with torch.no_grad():
                    pt = p.key.project_vectors(vt)  # [C, T]
                matches = ((pt > 0).to(torch.uint8).cpu() == owner).sum(dim=1).tolist()
        except (ValueError, TypeError, RuntimeError) as exc:  # e.g. a dtype the kernels do not take
            for i in idx:
                _fail(rows[i], FormatError("invalid", type(exc).__name__, f"carrier could not be projected: "
                                                                          f"{str(exc).splitlines()[0][:300]}"))
            continue
        share = (time.perf_counter() - t0) / len(idx)
        n, pv, thr = p.bits, p.p_values, p.threshold
        for j, i in enumerate(idx):
            r = rows[i]
            r["verify_s"] = share
            if not finite[j]:
                if not bool(torch.isfinite(cs[j].tensor).all()):
                    _fail(r, FormatError("invalid", "NonFinite", f"carrier {r['carrier']!r} contains NaN or Inf"))
                else:
                    _fail(r, FormatError("invalid", "ProjectionOverflow", f"carrier {r['carrier']!r} has values too "
                                                                          f"large to reduce in float32"))
                continue
            m = matches[j]
            r["matches"], r["ber"], r["p_value"], r["verified"] = m, 1.0 - m / n, pv[m], m >= thr


def _verify_trigger(p: _Plan, files: list[_File], rows: list[dict], arch, device, alpha: float) -> None:
    from .blackbox import trigger_verdicts

    idx = [i for i, f in enumerate(files) if f.error is None and f.sd is not None]
    if not idx:
        return
    t0 = time.perf_counter()
    verdicts = trigger_verdicts(p.key, [files[i].sd for i in idx], alpha, arch=arch, null_rate=p.null_rate,
                                device=device)
    share = (time.perf_counter() - t0) / len(idx)
    for i, v in zip(idx, verdicts):
        r = rows[i]
        r["verify_s"] = share
        r["carrier_sha256"] = files[i].sd.sha256
        if v.status != "ok":
            _fail(r, FormatError(v.status, _trigger_error_class(v.detail, v.status), v.detail))
            continue
        r.update(matches=v.matches, ber=v.ber, p_value=v.p_value, verified=bool(v.verified), threshold=v.threshold)


def _trigger_error_class(detail: str, status: str) -> str:
    if "does not fit the architecture" in detail or "the architecture has" in detail:
        return "ArchitectureMismatch"
    if "running the checkpoint failed" in detail:
        return "InferenceError"
    return {"absent": "MissingTensor", "invalid": "InvalidTensor", "corrupt": "CorruptTensor"}.get(status, "CheckError")


def _verify(files: list[_File], plans: list[_Plan], alpha: float, arch, device) -> list[dict]:
    now = time.time()
    by_key: dict[str, list[dict]] = {}
    for p in plans:
        rows = [_row(f, p, alpha, now) for f in files]
        for f, r in zip(files, rows):
            if f.error is not None:
                _fail(r, f.error)
        if p.trigger:
            _verify_trigger(p, files, rows, arch, device, alpha)
        else:
            _verify_whitebox(p, files, rows, device)
        by_key[p.key_id] = rows
    for f in files:
        if f.ck is not None:
            f.bytes_read = f.ck.bytes_read
            f.ck.close()
            f.ck = f.sd = None
    out = []
    for i, f in enumerate(files):  # rows in file order, keys in the order given
        for p in plans:
            r = by_key[p.key_id][i]
            if f.bytes_read > r["bytes_read"]:
                r["bytes_read"] = f.bytes_read
            out.append(r)
    return out


def _scan_batch(targets: Sequence[str], plans: list[_Plan], alpha: float, arch=None, device=None, known=None,
                manifest=None, max_batch_bytes: int = MAX_BATCH_BYTES) -> list[dict]:
    wb = [p for p in plans if not p.trigger]
    tk = [p for p in plans if p.trigger]
    validators = {p.key_id: _validator(p.key) for p in wb}
    arena = _arena()
    arena.reset()
    allocators = {p.key_id: arena.allocator(p.key_id, max_batch_bytes) for p in wb}
    rows: list[dict] = []
    pending: list[_File] = []
    held = 0
    # The carriers are read now and hashed when a part is verified: the hashes of a
    # whole part in a row (hashlib releases the GIL for each, so another loader thread
    # reads meanwhile), not one hash between two reads.
    for path in targets:
        f = _load(path, wb, tk, validators, known, alpha, manifest, allocators)
        if f is None:
            continue
        pending.append(f)
        for c in f.carriers.values():
            if isinstance(c, Carrier):
                held += c.nbytes
        if f.ck is not None and f.ck.format == "torch-legacy":
            held += f.size or 0  # read whole and kept for the model
        # Trigger keys keep each checkpoint open until its model has run: bound the open files.
        if held >= max_batch_bytes or (tk and len(pending) >= _MAX_OPEN):
            rows += _verify(pending, plans, alpha, arch, device)
            pending, held = [], 0
            arena.reset()  # the verified carriers are no longer referenced
    if pending:
        rows += _verify(pending, plans, alpha, arch, device)
    return rows


def scan_batch(targets: Sequence[str | os.PathLike], keys, *, alpha: float = 1e-6, arch=None, device=None,
               null_rate: float | None = None, known: dict | None = None, manifest: dict[str, str] | None = None,
               max_batch_bytes: int = MAX_BATCH_BYTES) -> list[dict]:
    """Rows (dicts with :data:`nnmark.ledger.FIELDS`) for a batch of checkpoint paths:
    one per (file, key), files in the order given, keys in the order given.

    Pure: reads the files, writes nothing, keeps no state, never raises for a bad
    file. ``keys``: key objects or key file paths. ``known``: ``{path: {key_id:
    (size, mtime_ns, alpha, status, integrity)}}`` (:meth:`Ledger.identities`) --
    files whose identity matches for every key are skipped (no rows).
    ``manifest``: ``{absolute path: sha256}`` (:func:`load_manifest`). ``targets``
    are used as given (pass absolute paths, as :func:`expand_paths` makes them).
    """
    plans = _plans(keys, alpha, null_rate)
    if any(p.trigger for p in plans) and arch is None:
        raise ValueError("trigger keys run the model: pass arch= (a model factory or 'module:function')")
    return _scan_batch([os.fspath(t) for t in targets], plans, float(alpha), arch, device, known, manifest,
                       max_batch_bytes)


# ------------------------------------------------------------------ the scan
@dataclass
class ScanResult:
    """What a scan found. ``rows``: one dict per (file, key) in scan order (rows of
    files skipped as unchanged come from the ledger, with ``skipped=True``; empty when
    ``keep_rows=False``); ``summary``: counts, rates and the exit code; ``problems``:
    the first rows that could not be checked."""

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


def exit_code(n_files: int, status_counts: dict[str, int], not_verified: int, changed: int) -> int:
    """0 every (file, key) verified; 1 some checkpoint does not carry a mark, or changed
    against the manifest; 2 some checkpoint could not be checked; 3 no files found."""
    if n_files == 0:
        return EXIT_NO_FILES
    if any(n for s, n in status_counts.items() if s != "ok"):
        return EXIT_ERROR
    if not_verified or changed:
        return EXIT_FINDINGS
    return EXIT_OK


class _Progress:
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


def _json_file(path: str, rows: list[dict], skipped: bool) -> dict:
    """The --json object of one file: its identity and one result per key."""
    first = rows[0]
    worst = max((r["status"] for r in rows), key=lambda s: _SEVERITY.get(s, 99))
    per_key = []
    for r in rows:
        d = {k: r[k] for k in ("key_id", "carrier", "carrier_sha256", "status", "verified", "matches", "bits", "ber",
                               "p_value", "threshold", "alpha", "error_class", "error_message")}
        per_key.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()})
    return {"path": path, "format": first["format"], "size": first["size"], "mtime_ns": first["mtime_ns"],
            "bytes_read": first["bytes_read"], "status": worst, "verified": all(r["verified"] for r in rows),
            "integrity": first["integrity"], "skipped": skipped, "results": per_key}


def scan(keys, paths, ledger=None, alpha: float = 1e-6, arch=None, device=None, workers: int | None = None,
         batch_size: int | None = None, json_out: IO[str] | None = None, progress: bool = True,
         manifest: str | os.PathLike | None = None, rescan: bool = False, null_rate: float | None = None,
         exclude: Iterable[str] = (), keep_rows: bool = True, max_problems: int = 50,
         ray: str | None = None) -> ScanResult:
    """Verify ``keys`` in every checkpoint under ``paths``; one row per (file, key).

    ``keys``: key objects or key files (white-box and trigger keys). ``paths``: files,
    folders (recursive) and glob patterns (see :func:`expand_paths`). ``ledger``: an
    SQLite file (created if missing; a re-run skips unchanged files), a
    :class:`~nnmark.ledger.Ledger`, or None (in memory). ``arch``: the model factory
    trigger keys need. ``device``: where carriers are projected / models run.
    ``workers``: loader threads (default: the CPU count, 2 to 8; with two or more, the
    interpreter's thread switch interval is 100 us while the scan runs, then the
    caller's again: see SCAN_SWITCH_INTERVAL). ``batch_size``: files
    per batch (one ledger transaction, one native call per key and carrier shape;
    default 256, or 100 files per task with ``ray``).
    ``json_out``: a text stream that gets one JSON object per file. ``progress``: a bar
    on stderr. ``manifest``: a file from :func:`write_manifest`; each file is then read and
    hashed whole (none is skipped: size and mtime cannot vouch for unchanged bytes) and
    flagged ``changed`` when it differs, ``unlisted`` when the manifest lacks it.
    ``rescan``: ignore the ledger's rows. ``exclude``: glob patterns of files to leave
    out. ``keep_rows=False`` keeps only the summary and the first ``max_problems`` rows
    that could not be checked (for scans of millions of files).

    ``ray``: run the batches as Ray tasks (``pip install "nnmark[ray]"``): ``"auto"``
    connects to the running cluster (``RAY_ADDRESS`` or ``ray start``'s), else starts
    Ray on this machine; any other string is a cluster address (``"ray://head:10001"``,
    ``"head:6379"``). Keys must then be key file paths, and workers read the key files
    and the checkpoints at the same paths as this process (a shared filesystem): keys
    are secrets and never travel. Rows land in this process's ledger as tasks finish,
    the same rows a local scan writes (see :mod:`nnmark.scan_ray`); ``json_out`` gets
    the files in the order their tasks finish; ``workers`` is not used."""
    key_files = None
    if ray is not None:
        from .scan_ray import check_address, key_file_paths

        ray = check_address(ray)
        key_files = key_file_paths(keys)
        keys = key_files
    plans = _plans(keys, alpha, null_rate)
    alpha = float(alpha)
    if any(p.trigger for p in plans):
        if arch is None:
            raise ValueError("trigger keys run the model: pass arch= (a model factory or 'module:function')")
        from .inference import load_factory

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
        targets = [t for t in expand_paths(paths, exclude) if t not in skip_set]
        key_ids = [p.key_id for p in plans]
        known = None if rescan else led.identities(key_ids)
        settings = _Settings(alpha, arch, device, null_rate, man, MAX_BATCH_BYTES)
        tally = _Tally(led, key_ids, json_out, progress, len(targets), keep_rows, max_problems)
        try:
            with contextlib.ExitStack() as stack:
                if ray is None:
                    batches = _local_batches(targets, plans, settings, known, workers, batch_size)
                    if workers > 1:
                        stack.enter_context(_quick_switching())
                else:
                    from .scan_ray import ray_batches

                    batches = ray_batches(ray, targets, plans, key_files, settings, known, batch_size)
                stack.enter_context(contextlib.closing(batches))  # an interrupted scan stops its tasks
                for index, chunk, rows in batches:
                    tally.add(index, chunk, rows)
        finally:
            tally.close()
        return tally.result(len(targets), alpha)
    finally:
        if own:
            led.close()


@dataclass
class _Settings:
    """What every batch of one scan shares (besides the keys)."""

    alpha: float
    arch: Any
    device: Any
    null_rate: float | None
    manifest: dict[str, str] | None
    max_batch_bytes: int


def _chunks(targets: list[str], size: int) -> list[list[str]]:
    return [targets[i:i + size] for i in range(0, len(targets), size)]


# While a local scan runs, the interpreter's thread switch interval (sys.setswitchinterval;
# 5 ms by default). A loader that has hashed a carrier waits for the GIL while another
# runs Python between short system calls, each of which drops the GIL and takes it
# straight back; only after the switch interval does the waiter get its turn. At 100 us
# the CPUs stay busy: about 12% more files per second on two cores.
SCAN_SWITCH_INTERVAL = 1e-4
_switching = {"depth": 0, "saved": None}
_switching_lock = threading.Lock()


@contextlib.contextmanager
def _quick_switching():
    """Lowers the switch interval for the scans running in this process, and puts back
    the caller's value when the last one ends (unless someone changed it meanwhile)."""
    with _switching_lock:
        if _switching["depth"] == 0:
            _switching["saved"] = sys.getswitchinterval()
            if _switching["saved"] > SCAN_SWITCH_INTERVAL:
                sys.setswitchinterval(SCAN_SWITCH_INTERVAL)
        _switching["depth"] += 1
    try:
        yield
    finally:
        with _switching_lock:
            _switching["depth"] -= 1
            saved = _switching["saved"]
            # (the interpreter keeps the interval in whole microseconds)
            if _switching["depth"] == 0 and saved > SCAN_SWITCH_INTERVAL and \
                    abs(sys.getswitchinterval() - SCAN_SWITCH_INTERVAL) < 1e-6:
                sys.setswitchinterval(saved)


def _local_batches(targets, plans, settings: _Settings, known, workers: int, batch_size: int):
    """(index, chunk, rows) of each batch, in order, from a pool of loader threads. Each
    reads a batch (Python: it holds the GIL), then hashes and verifies it (hashlib,
    numpy and the native projection release the GIL): with two threads or more, one
    reads while another hashes."""
    # Batches of at most batch_size files, but small enough that every worker gets a few
    # (64 large checkpoints must not become one batch read by one thread).
    size = max(1, min(batch_size, -(-len(targets) // (4 * workers))))
    chunks = _chunks(targets, size)
    s = settings
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nnmark-scan") as pool:
        queue: deque = deque()
        it = iter(enumerate(chunks))

        def submit() -> bool:
            nxt = next(it, None)
            if nxt is None:
                return False
            i, c = nxt
            # A batch is a self-contained task: its files, the ledger's identities of
            # those files, the settings -> rows (what a Ray task runs too).
            seen = {p: known[p] for p in c if p in known} if known else None
            queue.append((i, c, pool.submit(_scan_batch, c, plans, s.alpha, s.arch, s.device, seen, s.manifest,
                                             s.max_batch_bytes)))
            return True

        for _ in range(workers + 1):  # batches read ahead of the one being written
            if not submit():
                break
        try:
            while queue:
                i, chunk, fut = queue[0]
                rows = fut.result()
                queue.popleft()
                submit()
                yield i, chunk, rows
        finally:
            for _, _, fut in queue:  # stopped early: do not read what nobody will write
                fut.cancel()


class _Tally:
    """Takes each finished batch: writes its rows to the ledger (one transaction), counts
    them, streams JSON, keeps rows; batches may come in any order (Ray)."""

    def __init__(self, led: Ledger, key_ids: list[str], json_out, progress: bool, total: int, keep_rows: bool,
                 max_problems: int):
        self.led, self.key_ids, self.json_out = led, key_ids, json_out
        self.keep_rows, self.max_problems = keep_rows, max_problems
        self.order = {k: i for i, k in enumerate(key_ids)}
        self.status: dict[str, int] = {}
        self.kept: dict[int, list[dict]] = {}
        self.problems: list[dict] = []
        self.n_verified = self.n_not = self.n_changed = self.n_skipped = self.n_scanned = 0
        self.per_key = {k: {"verified": 0, "not_verified": 0, "errors": 0} for k in key_ids}
        self.bytes_read = self.done = 0
        self.start = time.perf_counter()
        self.bar = _Progress(total, progress)

    def add(self, index: int, chunk: list[str], rows: list[dict]) -> None:
        self.led.write(rows)  # first: a killed scan keeps every finished batch
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
            old: dict[str, list[dict]] = {}
            for r in self.led.rows(paths=skipped, key_ids=self.key_ids):
                r["skipped"] = True
                old.setdefault(r["path"], []).append(r)
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
                st = r["status"]
                status[st] = status.get(st, 0) + 1
                pk = per_key[r["key_id"]]
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
                self.json_out.write(json.dumps(_json_file(path, file_rows, not new)) + "\n")
        if self.json_out is not None:
            self.json_out.flush()
        if kept is not None:
            self.kept[index] = kept
        self.done += len(chunk)
        self.bar.update(self.done, self.bytes_read)

    def close(self) -> None:
        self.bar.close()

    def result(self, n_files: int, alpha: float) -> ScanResult:
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
        }
        summary["exit_code"] = exit_code(n_files, status, self.n_not, self.n_changed)
        return ScanResult(rows, summary, self.problems, summary["ledger"])


__all__ = ["scan", "scan_batch", "expand_paths", "write_manifest", "load_manifest", "ScanResult", "exit_code",
           "EXIT_OK", "EXIT_FINDINGS", "EXIT_ERROR", "EXIT_NO_FILES", "FIELDS"]
