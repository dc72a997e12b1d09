"""The Ray backend of :func:`nnmark.scan` (``scan(..., ray="auto")``, ``nnmark scan --ray auto``).

The driver (the process that calls ``scan``) lists the files and cuts them into
tasks of about 100 files; each task runs :func:`nnmark.scan.engine.scan_batch` on a Ray
worker, which reads its files and verifies the keys there, and returns the rows.
The driver writes each task's rows to its ledger as the task finishes (one
transaction per task), so a killed driver loses no finished task and a re-run
skips what is done, as after a local scan; the rows are those a local scan
writes, timings aside.

What a cluster needs:

- nnmark installed on every node (``pip install "nnmark[ray]"`` adds Ray).
- The same paths everywhere: workers open the checkpoints *and the key files* at
  the paths the driver sees (a shared filesystem). Keys are secrets: they travel
  as paths, never as bytes. A worker checks that each key file it reads holds the
  key_id the driver read from the same path; a missing or different key file
  stops the scan with an error naming the host.
- GPUs: with ``device="cuda"`` every task takes one GPU (``num_gpus=1``); with no
  device, tasks of scans that run models (trigger keys) take one when the cluster
  has GPUs. White-box scans read a few bytes per file and stay on CPUs.

Failures: Ray retries a task whose worker died (a crash, an out-of-memory kill, a
lost node) up to :data:`RAY_MAX_RETRIES` times, and one that raised an OSError or
MemoryError. A task that still fails is split in halves, each tried twice, down to
single files: the file that keeps failing gets an ``io_error`` row naming the
failure (the next scan tries it again), the rest of its task gets its rows. When
the first three tasks fail so and none has succeeded, the cluster cannot run the
scan at all: it stops with that error instead.
"""
from __future__ import annotations

import logging
import os
import socket
from collections import deque

from .engine import chunks, failed_rows, scan_batch

RAY_MAX_RETRIES = 3
# Tries of each half of a task that failed every retry: enough to tell a file that
# kills its worker from one that was unlucky.
SPLIT_RETRIES = 1
INSTALL_HINT = 'pip install "nnmark[ray]"'
_RETRY_EXCEPTIONS = [OSError, MemoryError]


class KeySetupError(ValueError):
    """A Ray worker cannot use a key file: unreadable there, or another key than the driver's."""


def import_ray():
    """The ray module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"scanning on Ray needs the ray package, an optional extra of nnmark: {INSTALL_HINT} "
                          f"({exc})") from None
    return ray


def check_address(address) -> str:
    """``"auto"`` or a cluster address, checked; imports ray (a clear error if it is missing)."""
    if not isinstance(address, str):
        raise TypeError(f"ray must be 'auto' or a Ray cluster address such as 'ray://head:10001', "
                        f"got {type(address).__name__}")
    address = address.strip()
    if not address:
        raise ValueError("ray must be 'auto' or a Ray cluster address such as 'ray://head:10001', got ''")
    import_ray()
    return address


def key_file_paths(keys) -> list[str]:
    """Absolute paths of the key files a Ray scan ships to its workers (never the keys)."""
    if keys is None:
        raise ValueError("scan needs at least one key (a key file path)")
    if isinstance(keys, (str, os.PathLike)) or not isinstance(keys, (list, tuple)):
        keys = [keys]
    out = []
    for k in keys:
        if not isinstance(k, (str, os.PathLike)):
            raise TypeError(f"a Ray scan takes keys as key file paths, got a {type(k).__name__}: keys are secrets "
                            f"and are never sent to workers; each worker reads the key file at the same path "
                            f"(save it with key.save(path) on a filesystem the cluster shares)")
        p = os.path.abspath(os.fspath(k))
        if not os.path.isfile(p):
            raise ValueError(f"key file {p!r} does not exist")
        out.append(p)
    if not out:
        raise ValueError("scan needs at least one key (a key file path)")
    return out


def _ray_scan_task(targets, known, key_files, key_ids, alpha, arch, device, null_rate, manifest, max_batch_bytes,
                   calibrations=None):
    """One Ray task: the rows of a batch of files, as :func:`nnmark.scan.scan_batch`."""
    from .._ext import set_num_threads
    from ..keys import load_key

    set_num_threads(1)  # a task holds one CPU (Ray sets OMP_NUM_THREADS=1 for the same reason)

    keys = []
    for path, want in zip(key_files, key_ids):
        try:
            k = load_key(path)
        except Exception as exc:  # noqa: BLE001 - whatever it is, this worker cannot scan
            raise KeySetupError(f"a Ray worker on {socket.gethostname()} cannot use key file {path!r}: {exc}. "
                                f"Workers read key files at the driver's paths (a filesystem the cluster "
                                f"shares)") from None
        if k.key_id != want:
            raise KeySetupError(f"key file {path!r} on the Ray worker on {socket.gethostname()} holds key {k.key_id}, "
                                f"the driver's holds key {want}: the cluster must see the same key files")
        keys.append(k)
    return scan_batch(targets, keys, alpha=alpha, arch=arch, device=device, null_rate=null_rate, known=known,
                      manifest=manifest, max_batch_bytes=max_batch_bytes, calibration=calibrations or None)


def ray_batches(address: str, targets: list[str], checks, key_files: list[str], settings, known, batch_size: int):
    """(index, chunk, rows) of each task as it finishes (any order). Connects to Ray
    (or starts it, for "auto" without a cluster) unless this process is connected
    already, and disconnects at the end only when it connected."""
    if not targets:  # nothing to run: no cluster to start
        return
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
        started = True
    try:
        yield from _drive(ray, targets, checks, key_files, settings, known, batch_size)
    finally:
        if started:
            ray.shutdown()


def _drive(ray, targets, checks, key_files, settings, known, batch_size):

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    dev = settings.device
    want_gpu = dev is not None and str(dev).startswith("cuda")
    if want_gpu and not gpus:
        raise ValueError(f"device={str(dev)!r}, but the Ray cluster has no GPUs")
    if dev is None and gpus and any(c.trigger for c in checks):
        want_gpu = True  # models run faster there; white-box checks are I/O and stay on CPUs
    # A GPU task sees its one GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES).
    task_device = "cuda" if want_gpu else dev
    # Looked up now, not at import: tests put a failing task in its place.
    remote = ray.remote(_ray_scan_task)
    opts = {"num_cpus": 1, "num_gpus": 1 if want_gpu else 0, "retry_exceptions": _RETRY_EXCEPTIONS}
    manifest = ray.put(settings.manifest) if settings.manifest is not None else None  # stored once, not per task
    common = (key_files, [c.key_id for c in checks], settings.alpha, settings.arch, task_device, settings.null_rate,
              manifest, settings.max_batch_bytes, settings.calibrations or None)
    # Tasks in flight: enough to keep every CPU busy while finished ones are written, few
    # enough that a cluster's results do not pile up ahead of the ledger.
    limit = max(2, 2 * int(resources.get("CPU", 1)))
    todo = deque(((i,), c, RAY_MAX_RETRIES) for i, c in enumerate(chunks(targets, batch_size)))
    inflight: dict = {}
    succeeded = failed = 0  # whole tasks: a cluster where none runs is not split file by file
    try:
        while todo or inflight:
            while todo and len(inflight) < limit:
                index, chunk, retries = todo.popleft()
                seen = {p: known[p] for p in chunk if p in known} if known else None
                ref = remote.options(max_retries=retries, **opts).remote(chunk, seen, *common)
                inflight[ref] = (index, chunk)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                index, chunk = inflight.pop(ref)
                try:
                    rows = ray.get(ref)
                    succeeded += 1
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, KeySetupError):
                        raise KeySetupError(str(cause)) from None
                    if isinstance(cause, ImportError):
                        raise ImportError(f"a Ray worker cannot import nnmark: install it on every node "
                                          f"({INSTALL_HINT}): {cause}") from None
                    if len(index) == 1:
                        failed += 1
                        if not succeeded and failed >= 3:
                            raise RuntimeError(f"the first {failed} Ray tasks of this scan failed every try and "
                                               f"none succeeded; the last error: {exc}") from None
                    if len(chunk) > 1:  # find the file that fails: the rest get their rows
                        half = len(chunk) // 2
                        todo.appendleft((index + (1,), chunk[half:], SPLIT_RETRIES))
                        todo.appendleft((index + (0,), chunk[:half], SPLIT_RETRIES))
                        continue
                    rows = failed_rows(chunk[0], checks, cause if cause is not None else exc)
                yield index, chunk, rows
    finally:
        for ref in inflight:  # stopped early (an error, Ctrl-C): do not leave work running
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort; the task may be done already
                pass


__all__ = ["RAY_MAX_RETRIES", "SPLIT_RETRIES", "INSTALL_HINT", "KeySetupError", "import_ray", "check_address",
           "key_file_paths", "ray_batches"]
