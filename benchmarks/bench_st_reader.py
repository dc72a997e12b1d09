#!/usr/bin/env python3
"""safetensors carrier reads: nnmark's hand-written parser vs the safetensors library's API.

Issue 11: can ``safetensors.safe_open`` (or ``safetensors.torch.load`` on bytes) replace
``nnmark.checkpoints.SafetensorsFile`` while keeping what the scan guarantees (bytes read per
file ~ carrier + header; a hostile header gives a row, never a crash)? Three parts, each
reading ONE carrier tensor per file, as a scan does:

  cold     bytes read per file, page cache dropped before every file (posix_fadvise
           DONTNEED; the data is synced after it is written): /proc/self/io read_bytes
           (storage reads by the process, mmap page faults included; rchar would miss
           them) and the file's page-cache residency afterwards (mincore through ctypes).
           Large files: ResNet-50-sized checkpoints (~102 MB, carrier layer3.0.conv2.weight,
           3x3x256x256 float32), the layout of bench_scan.py. Limit: carrier + header + 64 KiB.
  warm     files/s reading the carrier and hashing its bytes (sha256, as the scan does)
           of 10,000 small safetensors files (~160 kB, carrier 3x3x64x64) with a warm page
           cache, on 1 and 2 threads (a thread pool over the files). Sides interleaved,
           repeated; medians.
  hostile  60 damaged or hostile files, each read by each reader in its own child (forked
           from one process that imported torch once) under a timeout and an address-space
           cap (RLIMIT_AS = the child's size + 2 GiB): outcome (accepted / clean exception /
           crash by signal / hang / MemoryError), exception type and message, time, peak RSS
           growth (VmHWM, reset before the read).

Readers:
  hand         nnmark.checkpoints.SafetensorsFile(path).carrier(name)  (own header parser, pread)
  hand_nocache the same with the layout cache switched off (every header parsed)
  scan_open    nnmark.checkpoints.open_file(path).carrier(name)  (what nnmark.scan calls: sniff,
               POSIX_FADV_RANDOM above 4 MiB, then SafetensorsFile)
  st_mmap      safetensors.safe_open(path, "pt").get_tensor(name)  (default backend: mmap
               through torch.UntypedStorage.from_file; the carrier stays mapped, hashing
               touches its pages)
  st_pread     safetensors.safe_open(path, "pt", backend="pread").get_tensor(name)
  st_numpy     safetensors.safe_open(path, "numpy").get_tensor(name)  (mmap, copied out)
  st_bytes     safetensors.torch.load(whole file's bytes)[name]  (warm and hostile only)

Usage:
  python benchmarks/bench_st_reader.py                 # 64 large (3 cold repeats), 10,000 small (5), all hostile cases
  python benchmarks/bench_st_reader.py --quick         # 8 large (1 cold repeat), 1,000 small, 2 repeats
  python benchmarks/bench_st_reader.py --part hostile
  python benchmarks/bench_st_reader.py --data /big/disk/dir --keep-data
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import glob
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (LARGE_CARRIER, LARGE_SHAPE, SMALL_CARRIER, SMALL_SHAPE, OtherLoad, cpu_model,  # noqa: E402
                     git_state, read_bytes, resnet50_shapes, small_shapes)

DEFAULT_JSON = HERE / "results" / "bench_st_reader.json"
MARK = "@@bench_st_reader@@ "
SLACK = 64 * 1024  # the scan's limit: carrier + header + 64 KiB per file
DATA_VERSION = 1
READERS = ("hand", "hand_nocache", "scan_open", "st_mmap", "st_pread", "st_numpy", "st_bytes")
COLD_READERS = ("hand", "scan_open", "st_mmap", "st_pread", "st_numpy")
HOSTILE_READERS = ("hand", "scan_open", "st_mmap", "st_pread", "st_bytes")


# ================================================================== data
def generate(folder: Path, kind: str, count: int) -> None:
    """count checkpoints ckpt00000.safetensors... sharing one layout, a fresh random carrier each."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = resnet50_shapes() if kind == "large" else small_shapes()
    carrier, shape = (LARGE_CARRIER, LARGE_SHAPE) if kind == "large" else (SMALL_CARRIER, SMALL_SHAPE)
    g = torch.Generator().manual_seed(1234)
    base = {n: (torch.zeros(s, dtype=torch.int64) if n.endswith("num_batches_tracked")
                else 0.05 * torch.randn(s, generator=g)) for n, s in shapes.items()}
    for i in range(count):
        sd = dict(base)
        sd[carrier] = 0.05 * torch.randn(shape, generator=g)
        save_file(sd, str(folder / f"ckpt{i:05d}.safetensors"))
    os.sync()  # written back: DONTNEED can then drop every page


def ensure_data(root: Path, kind: str, count: int, notes: list, log) -> list[str]:
    folder = root / kind
    stamp = folder / ".bench_st_reader.json"
    want = {"version": DATA_VERSION, "kind": kind, "files": count}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(folder, ignore_errors=True)
        per = (sum(4 * math.prod(s) for s in (resnet50_shapes() if kind == "large" else small_shapes()).values())
               + 64 * 1024)
        free = shutil.disk_usage(root).free - (2 << 30)  # leave 2 GiB
        if count * per > free:
            fit = max(1, int(free // per))
            notes.append(f"{kind}: only {free / 1e9:.1f} GB free at {root}: {fit} files instead of {count}")
            log(notes[-1])
            count = want["files"] = fit
        log(f"generating {count:,} {kind} checkpoints in {folder} ...")
        t0 = time.perf_counter()
        generate(folder, kind, count)
        stamp.write_text(json.dumps(want))
        log(f"  {time.perf_counter() - t0:.0f} s")
    return sorted(glob.glob(str(folder / "*.safetensors")))


def header_and_carrier(path: str, carrier: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    b, e = header[carrier]["data_offsets"]
    return 8 + n, e - b


# ================================================================== readers
def _digest_tensor(t) -> str:
    """sha256 of a CPU tensor's bytes (C order), as nnmark.checkpoints.tensor_sha256."""
    import torch

    t = t.contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def make_reader(kind: str):
    """fn(path, name) -> dict(sha256, nbytes, dtype, shape[, asked]): one carrier read and hashed."""
    if kind in ("hand", "hand_nocache", "scan_open"):
        from nnmark import checkpoints as formats

        if kind == "hand_nocache":
            formats._LAYOUT_CACHE_BYTES = -1  # nothing is cached (the module reads it per header)
        opener = formats.open_file if kind == "scan_open" else formats.SafetensorsFile

        def read(path, name):
            with opener(path) as ck:
                c = ck.carrier(name)
                t = c.tensor
                return {"sha256": c.sha256, "nbytes": c.nbytes, "dtype": str(t.dtype), "shape": list(t.shape),
                        "asked": ck.bytes_read}
        return read
    if kind in ("st_mmap", "st_pread", "st_numpy"):
        from safetensors import safe_open

        fw = "numpy" if kind == "st_numpy" else "pt"
        kw = {"backend": "pread"} if kind == "st_pread" else {}

        def read(path, name):
            with safe_open(path, framework=fw, **kw) as f:
                t = f.get_tensor(name)
            if fw == "numpy":
                import numpy as np

                a = np.ascontiguousarray(t)
                return {"sha256": hashlib.sha256(a.view(np.uint8) if a.size else b"").hexdigest(),
                        "nbytes": a.nbytes, "dtype": str(a.dtype), "shape": list(a.shape)}
            return {"sha256": _digest_tensor(t), "nbytes": t.numel() * t.element_size(), "dtype": str(t.dtype),
                    "shape": list(t.shape)}
        return read
    if kind == "st_bytes":
        from safetensors.torch import load

        def read(path, name):
            with open(path, "rb") as f:
                data = f.read()
            t = load(data)[name]
            return {"sha256": _digest_tensor(t), "nbytes": t.numel() * t.element_size(), "dtype": str(t.dtype),
                    "shape": list(t.shape)}
        return read
    raise ValueError(kind)


# ================================================================== cold: bytes read per file
_libc = None


def resident_bytes(path: str) -> int | None:
    """Bytes of the file in the page cache now (mincore on a fresh PROT_READ mapping, which
    faults nothing in); None where mincore is unavailable."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            npages = (size + page - 1) // page
            vec = ctypes.create_string_buffer(npages)
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec.raw) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def _cold_worker(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    read = make_reader(cfg["reader"])
    rows = []
    for p in _files(cfg["dir"]):
        drop_cache(p)
        left = resident_bytes(p)
        rb0, t0 = read_bytes(), time.perf_counter()
        r = read(p, cfg["carrier"])
        wall = time.perf_counter() - t0
        gc.collect()  # mappings released before residency is measured (not timed)
        rb = read_bytes() - rb0
        rows.append({"read_bytes": rb, "resident_after": resident_bytes(p), "resident_before": left, "wall_s": wall,
                     "sha256": r["sha256"], "asked": r.get("asked")})
    return {"rows": rows}


def run_child(args: list[str], timeout: float) -> tuple[dict | None, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):]), ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return None, f"exit {proc.returncode}: {' | '.join(tail)}"


def part_cold(files: list[str], repeats: int, log) -> dict:
    header, carrier = header_and_carrier(files[0], LARGE_CARRIER)
    limit = carrier + header + SLACK
    runs = {r: [] for r in COLD_READERS}
    for rep in range(repeats):
        for reader in COLD_READERS:  # interleaved
            res, err = run_child(["--_cold", json.dumps({"reader": reader, "dir": os.path.dirname(files[0]), "carrier": LARGE_CARRIER})],
                                 timeout=1800)
            if res is None:
                log(f"cold {reader}: {err}")
                runs[reader].append({"error": err})
                continue
            rows = res["rows"]
            runs[reader].append({
                "read_bytes_per_file": statistics.median(r["read_bytes"] for r in rows),
                "read_bytes_max": max(r["read_bytes"] for r in rows),
                "resident_per_file": statistics.median(r["resident_after"] for r in rows),
                "resident_before_max": max(r["resident_before"] for r in rows),
                "ms_per_file": 1e3 * statistics.median(r["wall_s"] for r in rows),
                "asked_per_file": statistics.median(r["asked"] for r in rows) if rows[0]["asked"] is not None else None,
                "sha256": [r["sha256"] for r in rows]})
            m = runs[reader][-1]
            log(f"cold rep {rep + 1}/{repeats} {reader:10s}: read_bytes {m['read_bytes_per_file']:>12,.0f} B/file "
                f"(max {m['read_bytes_max']:,}), resident after {m['resident_per_file']:>12,.0f} B, "
                f"{m['ms_per_file']:.1f} ms/file")
    med = {}
    digests = None
    same = True
    for reader, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        med[reader] = {k: statistics.median(r[k] for r in ok) for k in
                       ("read_bytes_per_file", "resident_per_file", "ms_per_file")}
        med[reader]["read_bytes_max"] = max(r["read_bytes_max"] for r in ok)
        med[reader]["resident_before_max"] = max(r["resident_before_max"] for r in ok)
        if ok[0]["asked_per_file"] is not None:
            med[reader]["asked_per_file"] = statistics.median(r["asked_per_file"] for r in ok)
        med[reader]["within_limit"] = med[reader]["read_bytes_per_file"] <= limit
        med[reader]["x_limit"] = med[reader]["read_bytes_per_file"] / limit
        for r in ok:
            if digests is None:
                digests = r["sha256"]
            same = same and r["sha256"] == digests
    for rs in runs.values():
        for r in rs:
            r.pop("sha256", None)
    return {"files": len(files), "file_bytes": os.path.getsize(files[0]), "header_bytes": header,
            "carrier_bytes": carrier, "limit_bytes": limit, "repeats": repeats, "median": med, "runs": runs,
            "digests_agree": same,
            "read_ahead_kb": _read_ahead_kb(files[0])}


def _read_ahead_kb(path: str):
    """The block device's readahead (it sizes mmap read-around): /sys/dev/block/M:m/queue/read_ahead_kb."""
    dev = os.stat(path).st_dev
    for cand in (f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb",
                 f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/../queue/read_ahead_kb"):
        try:
            return int(open(cand).read())
        except (OSError, ValueError):
            continue
    return None


# ================================================================== warm: files/s
def _run_warm(read, files, name, threads):
    t0 = time.perf_counter()
    if threads == 1:
        out = [read(p, name)["sha256"] for p in files]
    else:
        with ThreadPoolExecutor(threads) as ex:
            out = [r["sha256"] for r in ex.map(lambda p: read(p, name), files, chunksize=64)]
    return time.perf_counter() - t0, out


def _warm_worker(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # no intra-op pool: the threads are the pool's
    read = make_reader(cfg["reader"])
    files = _files(cfg["dir"])
    _run_warm(read, files[:200], SMALL_CARRIER, 1)  # imports, first-call costs
    c0 = time.process_time()
    wall, digests = _run_warm(read, files, SMALL_CARRIER, cfg["threads"])
    cpu = time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "files_per_s": len(files) / wall,
            "digest_of_digests": hashlib.sha256("".join(digests).encode()).hexdigest()}


def part_warm(files: list[str], repeats: int, log) -> dict:
    for p in files:  # warm the page cache
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    runs = {f"{r}@{t}": [] for t in (1, 2) for r in READERS}
    for rep in range(repeats):
        for threads in (1, 2):
            for reader in READERS:  # interleaved, each in a fresh process (imports not timed)
                key = f"{reader}@{threads}"
                load = OtherLoad()
                t0 = time.perf_counter()
                res, err = run_child(["--_warm", json.dumps({"reader": reader, "dir": os.path.dirname(files[0]), "threads": threads})],
                                     timeout=900)
                if res is None:
                    log(f"warm {key}: {err}")
                    runs[key].append({"error": err})
                    continue
                res["other_processes_cores_avg"] = load.cores(time.perf_counter() - t0)
                runs[key].append(res)
                log(f"warm rep {rep + 1}/{repeats} {key:16s}: {res['files_per_s']:>8,.0f} files/s "
                    f"({res['cpu_s'] / len(files) * 1e6:.0f} µs CPU/file; others {res['other_processes_cores_avg']:.2f} cores)")
    med = {}
    for key, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            med[key] = {"files_per_s": statistics.median(r["files_per_s"] for r in ok),
                        "files_per_s_min": min(r["files_per_s"] for r in ok),
                        "files_per_s_max": max(r["files_per_s"] for r in ok),
                        "cpu_us_per_file": statistics.median(r["cpu_s"] / len(files) * 1e6 for r in ok)}
    # ratio to the hand parser, per repeat (same moment), then the median of those ratios
    ratios = {}
    for key in runs:
        reader, threads = key.split("@")
        base = runs[f"hand@{threads}"]
        rr = [a["files_per_s"] / b["files_per_s"] for a, b in zip(runs[key], base) if "error" not in a
              and "error" not in b]
        if rr:
            ratios[key] = {"median": statistics.median(rr), "min": min(rr), "max": max(rr)}
    agree = len({r["digest_of_digests"] for rs in runs.values() for r in rs if "error" not in r}) == 1
    header, carrier = header_and_carrier(files[0], SMALL_CARRIER)
    return {"files": len(files), "file_bytes": os.path.getsize(files[0]), "header_bytes": header,
            "carrier_bytes": carrier, "repeats": repeats, "median": med, "ratio_to_hand": ratios, "runs": runs,
            "digests_agree": agree}


# ================================================================== hostile headers
def _st(header, data: bytes = b"", n: int | None = None, raw_header: bytes | None = None) -> bytes:
    """A safetensors file: 8-byte length, the header (a dict is dumped as JSON), data."""
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _t(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


W16 = _t("F32", [4], 0, 16)  # the carrier "w": 4 float32 = 16 bytes
D16 = bytes(range(16))


def _valid_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, 3)}, metadata={"format": "pt"})


def hostile_cases(quick: bool) -> list[dict]:
    """[{name, group, note, build(dir) -> path, carrier, expect ('accept'|'refuse'), timeout}]"""
    valid = _valid_bytes()
    big_valid = _st({"w": _t("F32", [1 << 18], 0, 1 << 20)}, b"\x01" * (1 << 20))
    n_valid = struct.unpack("<Q", valid[:8])[0]
    cases = []

    def add(name, group, note, content=None, carrier="w", expect="refuse", timeout=20, build=None, **kw):
        cases.append({"name": name, "group": group, "note": note, "content": content, "carrier": carrier,
                      "expect": expect, "timeout": timeout, "build": build, **kw})

    add("valid", "control", "save() output: w F32[4], b F32[2,3], __metadata__", valid, expect="accept")
    add("valid_zero_size", "control", "w F32[4] + z F32[0,3] at [16,16]",
        _st({"w": W16, "z": _t("F32", [0, 3], 16, 16)}, D16), expect="accept")
    # --- header length
    add("len_gt_file", "length", "n = file size + 100 (< 100 MB)", _st({"w": W16}, D16, n=200))
    add("len_gt_100MB", "length", "n = 200,000,000, file small", _st({"w": W16}, D16, n=200_000_000))
    add("len_u64_max", "length", "n = 2^64-1", _st({"w": W16}, D16, n=2**64 - 1))
    add("len_zero", "length", "n = 0", _st({"w": W16}, D16, n=0))
    add("len_100MB_to_100MiB", "length",
        "valid JSON padded with spaces to n = 101,000,000 (between the library's 100,000,000 cap and "
        "nnmark's 100 MiB)", build=lambda d: _big_padded(d, 101_000_000), expect="refuse", timeout=60)
    # --- JSON
    add("not_json", "json", "header '{not json'", _st(None, D16, raw_header=b"{not json"))
    add("json_array", "json", "header is a JSON array", _st(None, D16, raw_header=b"[1,2]"))
    add("json_string", "json", "header is a JSON string", _st(None, D16, raw_header=b'"abc"'))
    add("json_number", "json", "header is a JSON number", _st(None, D16, raw_header=b"123"))
    add("deep_arrays", "json", "'{\"a\":' + 100000 x '[' ... ']' + '}'",
        _st(None, D16, raw_header=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    add("deep_objects", "json", "100000 nested {\"a\": ...}",
        _st(None, D16, raw_header=b'{"a":' * 100_000 + b"1" + b"}" * 100_000))
    add("deep_unclosed", "json", "'{\"a\":' + 10 MB of '['",
        _st(None, D16, raw_header=b'{"a":' + b"[" * 10_000_000))
    add("non_utf8", "json", "a tensor name with bytes ff fe",
        _st(None, D16, raw_header=b'{"w\xff\xfe":' + json.dumps(W16).encode() + b"}"), carrier="w")
    add("bom", "json", "UTF-8 BOM before '{'",
        _st(None, D16, raw_header="\ufeff".encode() + json.dumps({"w": W16}).encode()))
    add("lone_surrogate", "json", "second tensor named \"\\ud800\" (valid JSON escape, not valid Unicode)",
        _st(None, D16 + D16, raw_header=b'{"w":' + json.dumps(W16).encode() + b',"\\ud800":'
            + json.dumps(_t("F32", [4], 16, 32)).encode() + b"}"), carrier="w")
    add("nan_in_metadata", "json", "__metadata__ {\"a\": NaN} (NaN is not JSON)",
        _st(None, D16, raw_header=b'{"__metadata__":{"a":NaN},"w":' + json.dumps(W16).encode() + b"}"))
    add("bigint_offset", "json", "data_offsets [0, <5000-digit integer>]",
        _st(None, D16, raw_header=b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,' + b"9" * 5000 + b"]}}"))
    add("trailing_garbage_json", "json", "'{...} xyz' (text after the object)",
        _st(None, D16, raw_header=json.dumps({"w": W16}).encode() + b" xyz"))
    add("leading_space", "json", "' {...}' (whitespace before the object)",
        _st(None, D16, raw_header=b" " + json.dumps({"w": W16}).encode()), expect="either")
    add("space_padded", "json", "'{...}' + 7 spaces (how writers align the header): valid",
        _st(None, D16, raw_header=json.dumps({"w": W16}).encode() + b" " * 7), expect="accept")
    # --- tensor entries
    add("offsets_past_data", "entries", "w U8[2^40] at [0, 2^40], 16 bytes of data",
        _st({"w": _t("U8", [2**40], 0, 2**40)}, D16))
    add("offsets_begin_gt_end", "entries", "w at [16, 0]", _st({"w": _t("F32", [4], 16, 0)}, D16))
    add("offsets_overlap", "entries", "w [0,16], v [8,24], 24 bytes",
        _st({"w": W16, "v": _t("F32", [4], 8, 24)}, D16 + D16[:8]))
    add("offsets_gap", "entries", "w [0,16], v [32,48], 48 bytes",
        _st({"w": W16, "v": _t("F32", [4], 32, 48)}, D16 * 3))
    add("offsets_three", "entries", "data_offsets [0,16,32]", _st({"w": {**W16, "data_offsets": [0, 16, 32]}}, D16))
    add("offsets_bool", "entries", "w U8[1] at [false, true]", _st({"w": _t("U8", [1], False, True)}, D16[:1]))
    add("offsets_float", "entries", "w at [0.0, 16.0]", _st({"w": _t("F32", [4], 0.0, 16.0)}, D16))
    add("trailing_bytes", "entries", "valid file + 100 bytes", valid + b"\0" * 100)
    add("dtype_unknown", "entries", "dtype 'F128'", _st({"w": _t("F128", [1], 0, 16)}, D16))
    add("dtype_newer_other", "entries", "carrier w F32 fine; another tensor e F8_E8M0[16] (a dtype the library "
        "knows): a valid file", _st({"w": W16, "e": _t("F8_E8M0", [16], 16, 32)}, D16 + D16), expect="accept")
    add("dtype_c64_other", "entries", "carrier w F32 fine; another tensor c C64[2]: a valid file",
        _st({"w": W16, "c": _t("C64", [2], 16, 32)}, D16 + D16), expect="accept")
    add("dtype_fnuz_other", "entries", "carrier w F32 fine; another tensor f F8_E4M3FNUZ[16]: a valid file",
        _st({"w": W16, "f": _t("F8_E4M3FNUZ", [16], 16, 32)}, D16 + D16), expect="accept")
    add("dtype_f4_odd", "entries", "w F4[3] (12 bits, not whole bytes) at [0,2]",
        _st({"w": _t("F4", [3], 0, 2)}, D16[:2]))
    add("shape_negative", "entries", "w F32 shape [-1,-4] at [0,16]", _st({"w": _t("F32", [-1, -4], 0, 16)}, D16))
    add("shape_overflow", "entries", "w F32 shape [2^32,2^32,2^32] (product overflows 64 bits) at [0,16]",
        _st({"w": _t("F32", [2**32, 2**32, 2**32], 0, 16)}, D16))
    add("shape_wrap_to_4", "entries", "w U8 shape [2^62+1, 4]: the product 2^64+4 is 4 modulo 2^64; at [0,4]", _st({"w": _t("U8", [2**62 + 1, 4], 0, 4)}, D16[:4]))
    add("shape_u64_overflow", "entries", "w shape [2^64]", _st({"w": _t("U8", [2**64], 0, 16)}, D16))
    add("shape_float", "entries", "w shape [4.0]", _st({"w": _t("F32", [4.0], 0, 16)}, D16))
    add("span_mismatch", "entries", "w F32[4] at [0,12]", _st({"w": _t("F32", [4], 0, 12)}, D16[:12]))
    add("zero_size_huge_dim", "entries", "carrier z F32 [0, 2^63] at [16,16] (0 bytes; the dim fits u64 only)",
        _st({"w": W16, "z": _t("F32", [0, 2**63], 16, 16)}, D16), carrier="z")
    add("entry_not_object", "entries", "\"x\": 5 beside w", _st({"w": W16, "x": 5}, D16))
    add("entry_extra_field", "entries", "w with an extra field \"foo\": 1", _st({"w": {**W16, "foo": 1}}, D16),
        expect="accept")
    add("duplicate_name_shape", "entries", "\"w\" twice: F32[4] then F32[2,2], both [0,16] (JSON last wins?)",
        _st(None, D16, raw_header=b'{"w":' + json.dumps(W16).encode() + b',"w":'
            + json.dumps(_t("F32", [2, 2], 0, 16)).encode() + b"}"), expect="either")
    add("duplicate_name_dtype", "entries", "\"w\" twice: F32[4] then I32[4], both [0,16]",
        _st(None, D16, raw_header=b'{"w":' + json.dumps(W16).encode() + b',"w":'
            + json.dumps(_t("I32", [4], 0, 16)).encode() + b"}"), expect="either")
    add("duplicate_metadata", "entries", "\"__metadata__\" twice",
        _st(None, D16, raw_header=b'{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"},"w":'
            + json.dumps(W16).encode() + b"}"), expect="either")
    n_entries = 100_000 if quick else 1_000_000
    add("entries_1e6", "entries", f"{n_entries:,} tensors U8[1] (header ~{n_entries * 52 / 1e6:.0f} MB); carrier t0",
        build=lambda d: _many_entries(d, n_entries), carrier="t0", expect="accept", timeout=120)
    add("metadata_non_string", "entries", "__metadata__ {\"a\": 1}",
        _st({"__metadata__": {"a": 1}, "w": W16}, D16))
    add("metadata_nested", "entries", "__metadata__ {\"a\": {\"b\": [1,2]}}",
        _st({"__metadata__": {"a": {"b": [1, 2]}}, "w": W16}, D16))
    add("metadata_not_object", "entries", "__metadata__ [1,2,3]", _st({"__metadata__": [1, 2, 3], "w": W16}, D16))
    add("metadata_null", "entries", "__metadata__ null", _st({"__metadata__": None, "w": W16}, D16), expect="either")
    # --- files
    add("truncated_in_header", "file", "save() output cut at 8 + n/2", valid[:8 + n_valid // 2])
    add("truncated_in_data", "file", "save() output cut 8 bytes before its end", valid[:-8])
    add("only_length", "file", "just the 8-byte length", valid[:8])
    add("three_bytes", "file", "3 bytes", b"\x10\0\0")
    add("zero_length", "file", "0 bytes", b"")
    add("fifo", "file", "a FIFO (nobody writes): must not hang", build=_fifo, timeout=5)
    add("dev_zero", "file", "/dev/zero (a character device)", build=lambda d: "/dev/zero", timeout=5)
    add("truncated_after_open", "file", "valid file with a 1 MiB carrier, cut to its header by a writer after "
        "the reader opened it, before the carrier read (a checkpoint rewritten during a scan)", big_valid,
        race="truncate")
    return cases


def _big_padded(d: Path, n: int) -> str:
    h = json.dumps({"w": W16}).encode()
    p = d / "big_padded.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", n) + h + b" " * (n - len(h)) + D16)
    return str(p)


def _many_entries(d: Path, count: int) -> str:
    p = d / "many.safetensors"
    parts = [b"{"]
    for i in range(count):
        parts.append(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}%s'
                     % (i, i, i + 1, b"," if i + 1 < count else b""))
    parts.append(b"}")
    h = b"".join(parts)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"\x07" * count)
    return str(p)


def _fifo(d: Path) -> str:
    p = d / "fifo.safetensors"
    if not p.exists():
        os.mkfifo(p)
    return str(p)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _run_one(job: dict, readers: dict) -> dict:
    """In the forked child: cap the address space, reset the peak-RSS mark, read."""
    cap = _proc_status("VmSize") + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass
    rss0 = _proc_status("VmRSS")
    out = {"cap_bytes": cap}
    t0 = time.perf_counter()
    try:
        if job.get("race") == "truncate":
            out.update(_race_truncate(job))
        else:
            r = readers[job["reader"]](job["path"], job["carrier"])
            out.update(outcome="accepted", dtype=r["dtype"], shape=r["shape"], sha256=r["sha256"][:16])
    except BaseException as exc:  # noqa: BLE001 - everything is the result here
        out.update(_exc_info(exc))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_growth_bytes"] = max(0, _proc_status("VmHWM") - rss0)
    return out


def _fork_run(job: dict, readers: dict, timeout: float) -> dict:
    """Runs one read in a forked child; a signal, a hang or a dead child is observed, not suffered."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        try:
            data = json.dumps(_run_one(job, readers)).encode()
        except BaseException as exc:  # noqa: BLE001
            data = json.dumps({"outcome": "died", "message": repr(exc)[:300]}).encode()
        try:
            os.write(wfd, data)
        finally:
            os._exit(0)
    os.close(wfd)
    os.set_blocking(rfd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    status = None
    while True:
        try:
            chunk = os.read(rfd, 1 << 16)
            if chunk:
                buf += chunk
        except BlockingIOError:
            pass
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    try:
        while True:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            buf += chunk
    except BlockingIOError:
        pass
    os.close(rfd)
    if status is None:
        return {"outcome": "hang", "message": f"no answer after {timeout:g} s (killed)"}
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return {"outcome": "abort" if sig == "SIGABRT" else "crash", "signal": sig,
                "message": f"killed by {sig}"}
    try:
        return json.loads(buf)
    except ValueError:
        return {"outcome": "died", "message": f"exit status {os.waitstatus_to_exitcode(status)}, no result"}


def _exc_info(exc: BaseException) -> dict:
    msg = str(exc).replace("\n", " ")
    return {"outcome": "exception", "exc_type": type(exc).__name__,
            "is_exception": isinstance(exc, Exception),  # a scan's `except Exception` catches it
            "status": getattr(exc, "status", None), "error_class": getattr(exc, "error_class", None),
            "message": msg[:300]}


def _race_truncate(job: dict) -> dict:
    """Opens with the reader, cuts the file to its header, then reads the carrier."""
    path, name, reader = job["path"], job["carrier"], job["reader"]
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    if reader in ("hand", "scan_open"):
        from nnmark import checkpoints as formats

        ck = (formats.open_file if reader == "scan_open" else formats.SafetensorsFile)(path)
        os.truncate(path, 8 + n)
        c = ck.carrier(name)
        return {"outcome": "accepted", "dtype": str(c.tensor.dtype), "shape": list(c.tensor.shape),
                "sha256": c.sha256[:16]}
    if reader in ("st_mmap", "st_pread"):
        from safetensors import safe_open

        kw = {"backend": "pread"} if reader == "st_pread" else {}
        with safe_open(path, framework="pt", **kw) as f:
            os.truncate(path, 8 + n)
            t = f.get_tensor(name)
            d = _digest_tensor(t)  # touches the pages
        return {"outcome": "accepted", "dtype": str(t.dtype), "shape": list(t.shape), "sha256": d[:16]}
    return {"outcome": "n/a", "message": "reads the whole file in one call: nothing to race"}


def _hostile_server(cfg: dict) -> dict:
    """Builds every hostile file and reads each with each reader in a forked child. One
    process imports torch once; each read still runs alone, capped and timed."""
    import torch

    torch.set_num_threads(1)  # no thread pool alive across fork()
    readers = {r: make_reader(r) for r in HOSTILE_READERS}
    work = Path(cfg["work"])
    rows = []
    for case in hostile_cases(cfg["quick"]):
        row = {k: v for k, v in case.items() if k not in ("content", "build")}
        row["results"] = {}
        for reader in HOSTILE_READERS:
            d = work / reader  # a fresh file per reader: the race case changes it
            d.mkdir(parents=True, exist_ok=True)
            if case["build"] is not None:
                path = case["build"](d)
            else:
                path = str(d / f"{case['name']}.safetensors")
                with open(path, "wb") as f:
                    f.write(case["content"])
            job = {"reader": reader, "path": path, "carrier": case["carrier"], "race": case.get("race")}
            row["results"][reader] = r = _fork_run(job, readers, case["timeout"])
            print(f"hostile {case['name']:22s} {reader:9s}: {_short(r)}", file=sys.stderr, flush=True)
        rows.append(row)
        for p in work.glob("*/*"):  # big cases: do not keep 100 MB files around
            if p.is_file() and p.stat().st_size > (1 << 20):
                p.unlink()
    return {"cases": rows, "readers": list(HOSTILE_READERS)}


def part_hostile(work: Path, quick: bool, log) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_hostile", json.dumps({"work": str(work), "quick": quick})]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=3600)  # progress on stderr
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"the hostile-file server failed (exit {proc.returncode})")


def _short(r: dict) -> str:
    o = r["outcome"]
    if o == "accepted":
        s = f"accepted {r['dtype'].replace('torch.', '')}{r['shape']}"
    elif o == "exception":
        what = r.get("error_class") or r["exc_type"]
        if not r.get("is_exception", True):
            what += " (BaseException!)"
        s = f"{what}: {r['message'][:90]}"
    elif o in ("crash", "abort"):
        s = f"{o.upper()} {r.get('signal')}"
    else:
        s = f"{o.upper()}: {r.get('message', '')[:80]}"
    if "seconds" in r and (r["seconds"] > 0.2 or r.get("peak_rss_growth_bytes", 0) > (32 << 20)):
        s += f" [{r['seconds']:.2f} s, peak RSS +{r['peak_rss_growth_bytes'] / 2**20:.0f} MiB]"
    return s


# ================================================================== report
def _meta() -> dict:
    import numpy
    import safetensors
    import torch

    import nnmark

    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv), "python": sys.version.split()[0],
            "machine": platform.machine(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "kernel": platform.release(), "torch_version": torch.__version__, "numpy_version": numpy.__version__,
            "safetensors_version": safetensors.__version__, "nnmark_version": nnmark.__version__,
            "nnmark_path": str(Path(nnmark.__file__).parent), "git": git_state(HERE.parent),
            "loadavg_start": os.getloadavg()}


def print_report(res: dict) -> None:
    m = res["meta"]
    print(f"\nbench_st_reader {m['date_utc']}  {m['cpu_model']}, {m['cpu_count']} cores, kernel {m['kernel']}, "
          f"torch {m['torch_version']}, safetensors {m['safetensors_version']}")
    c = res.get("cold")
    if c:
        print(f"\ncold cache, {c['files']} x {c['file_bytes']:,} B files; carrier {c['carrier_bytes']:,} B, header "
              f"{c['header_bytes']:,} B, limit carrier + header + 64 KiB = {c['limit_bytes']:,} B; device readahead "
              f"{c['read_ahead_kb']} KiB; digests agree: {c['digests_agree']}")
        print(f"{'reader':12s} {'read_bytes/file':>16s} {'x limit':>8s} {'resident/file':>15s} {'ms/file':>8s}")
        for r, v in c["median"].items():
            print(f"{r:12s} {v['read_bytes_per_file']:>16,.0f} {v['x_limit']:>8.2f} {v['resident_per_file']:>15,.0f} "
                  f"{v['ms_per_file']:>8.1f}")
    w = res.get("warm")
    if w:
        print(f"\nwarm cache, {w['files']:,} x {w['file_bytes']:,} B files, carrier {w['carrier_bytes']:,} B; "
              f"median of {w['repeats']}; ratio = reader / hand in the same repeat; digests agree: {w['digests_agree']}")
        print(f"{'reader':14s} {'1 thr files/s':>14s} {'ratio':>7s} {'2 thr files/s':>14s} {'ratio':>7s} "
              f"{'CPU µs/file (1 thr)':>20s}")
        for r in READERS:
            a, b = w["median"].get(f"{r}@1"), w["median"].get(f"{r}@2")
            ra, rb = w["ratio_to_hand"].get(f"{r}@1"), w["ratio_to_hand"].get(f"{r}@2")
            print(f"{r:14s} {a['files_per_s'] if a else float('nan'):>14,.0f} "
                  f"{ra['median'] if ra else float('nan'):>7.2f} {b['files_per_s'] if b else float('nan'):>14,.0f} "
                  f"{rb['median'] if rb else float('nan'):>7.2f} {a['cpu_us_per_file'] if a else float('nan'):>20,.0f}")
    h = res.get("hostile")
    if h:
        print("\nhostile files (outcome per reader)")
        for row in h["cases"]:
            print(f"- {row['name']} ({row['note']}), expected: {row['expect']}")
            for reader, r in row["results"].items():
                print(f"    {reader:9s} {_short(r)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "cold", "warm", "hostile"), default="all")
    ap.add_argument("--large-files", type=int, default=64)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=None, help="warm repeats (default 5; --quick 2); cold: 3 (1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 large, 1,000 small, 2 repeats, 1e5 entries")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "nnmark-bench-st-reader",
                    help="folder for the generated files (default: $TMPDIR/nnmark-bench-st-reader)")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated checkpoints (reused next time)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--_cold", help=argparse.SUPPRESS)
    ap.add_argument("--_warm", help=argparse.SUPPRESS)
    ap.add_argument("--_hostile", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag, fn in (("_cold", _cold_worker), ("_warm", _warm_worker), ("_hostile", _hostile_server)):
        if getattr(args, flag):
            print(MARK + json.dumps(fn(json.loads(getattr(args, flag)))), flush=True)
            return 0

    def log(s):
        print(s, flush=True)

    if args.quick:
        args.large_files, args.small_files = min(args.large_files, 8), min(args.small_files, 1000)
    repeats = args.repeats or (2 if args.quick else 5)
    meta = _meta()
    load = OtherLoad()
    t_start = time.perf_counter()
    notes: list[str] = []
    args.data.mkdir(parents=True, exist_ok=True)
    res = {"benchmark": "bench_st_reader", "meta": meta}
    if args.part in ("all", "cold"):
        files = ensure_data(args.data, "large", args.large_files, notes, log)
        res["cold"] = part_cold(files, 1 if args.quick else 3, log)
    if args.part in ("all", "warm"):
        files = ensure_data(args.data, "small", args.small_files, notes, log)
        res["warm"] = part_warm(files, repeats, log)
    if args.part in ("all", "hostile"):
        res["hostile"] = part_hostile(args.data / "hostile", args.quick, log)
        shutil.rmtree(args.data / "hostile", ignore_errors=True)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = os.getloadavg()
    meta["other_processes_cores_avg"] = load.cores(meta["wall_s"])
    meta["notes"] = notes
    print_report(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nJSON: {args.json}; wall {meta['wall_s']:.0f} s; other processes {meta['other_processes_cores_avg']:.2f} "
          f"cores on average")
    if not args.keep_data:
        shutil.rmtree(args.data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
