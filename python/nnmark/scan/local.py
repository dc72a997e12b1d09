"""The local backend of :func:`nnmark.scan`: a pool of loader threads on this machine."""
from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from .engine import Loaded, check_sources, chunks, fail, internal_error, new_row

# While a local scan runs, the interpreter's thread switch interval (sys.setswitchinterval;
# 5 ms by default). A loader that has hashed a carrier waits for the GIL while another
# runs Python between short system calls, each of which drops the GIL and takes it
# straight back; only after the switch interval does the waiter get its turn. At 100 us
# the CPUs stay busy: about 12% more files per second on two cores.
SCAN_SWITCH_INTERVAL = 1e-4
_switching = {"depth": 0, "saved": None}
_switching_lock = threading.Lock()


@contextlib.contextmanager
def quick_switching():
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


# While a local scan runs, the objects that were alive before it (torch and its imports:
# some 200,000) are moved out of the cyclic collector's reach with gc.freeze(). A scan
# makes garbage fast enough to trigger a full collection now and then, and each one walks
# that whole heap holding the GIL (65 ms in a 1 s scan of 10,000 small files: every loader
# thread waits). Unless the process had frozen objects itself (a pre-fork server does, to
# keep pages shared): then nothing is frozen here, and nothing of theirs is unfrozen.
_frozen = {"depth": 0, "ours": False}


@contextlib.contextmanager
def frozen_heap():
    """Freezes the heap for the scans running in this process, unfreezes it after the last."""
    with _switching_lock:
        if _frozen["depth"] == 0:
            _frozen["ours"] = gc.get_freeze_count() == 0 and gc.isenabled()
            if _frozen["ours"]:
                gc.freeze()
        _frozen["depth"] += 1
    try:
        yield
    finally:
        with _switching_lock:
            _frozen["depth"] -= 1
            if _frozen["depth"] == 0 and _frozen["ours"]:
                _frozen["ours"] = False
                gc.unfreeze()


def run_batch(paths: list[str], checks, settings, known) -> list[dict]:
    """The rows of one batch of files (a loader thread's unit of work)."""
    s = settings
    try:
        return check_sources(paths, checks, arch=s.arch, device=s.device, labels=paths, known=known,
                             manifest=s.manifest, max_batch_bytes=s.max_batch_bytes)
    except Exception as exc:  # noqa: BLE001 - check_sources reports per file; this is a last resort
        now = time.time()
        return [fail(new_row(Loaded(p), c, now), internal_error(p, exc, "checking the batch of")) for p in paths
                for c in checks]


def local_batches(targets: list[str], checks, settings, known, workers: int, batch_size: int):
    """(index, chunk, rows) of each batch, in order, from a pool of loader threads. Each
    reads a batch (Python: it holds the GIL), then hashes and verifies it (hashlib,
    numpy and the native projection release the GIL): with two threads or more, one
    reads while another hashes."""
    # Batches of at most batch_size files, but small enough that every worker gets a few
    # (64 large checkpoints must not become one batch read by one thread).
    size = max(1, min(batch_size, -(-len(targets) // (4 * workers))))
    parts = chunks(targets, size)
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_heap())
        if workers > 1:
            stack.enter_context(quick_switching())
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nnmark-scan"))
        queue: deque = deque()
        it = iter(enumerate(parts))

        def submit() -> bool:
            nxt = next(it, None)
            if nxt is None:
                return False
            i, c = nxt
            # A batch is a self-contained task: its files, the ledger's identities of
            # those files, the settings -> rows (what a Ray task runs too).
            seen = {p: known[p] for p in c if p in known} if known else None
            queue.append((i, c, pool.submit(run_batch, c, checks, settings, seen)))
            return True

        for _ in range(workers + 1):  # batches read ahead of the one being written
            if not submit():
                break
        try:
            while queue:
                i, part, fut = queue[0]
                rows = fut.result()
                queue.popleft()
                submit()
                yield i, part, rows
        finally:
            for _, _, fut in queue:  # stopped early: do not read what nobody will write
                fut.cancel()


__all__ = ["SCAN_SWITCH_INTERVAL", "quick_switching", "frozen_heap", "local_batches", "run_batch"]
