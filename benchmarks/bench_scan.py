#!/usr/bin/env python3
"""nnmark scan vs the naive loop: files per second, bytes read per file.

Two cases, each side timed in its own fresh process (imports not timed):

  large   64 ResNet-50-sized safetensors checkpoints (~102 MB each, 25.5M float32
          parameters in ResNet-50's layout; the carrier is layer3.0.conv2.weight, a
          3x3x256x256 conv), page cache dropped before each side
          (posix_fadvise(DONTNEED) on every file, after a sync).
  small   10,000 small safetensors checkpoints (~160 kB: a 3x3x64x64 carrier,
          layer1.0.conv2.weight, among a few other tensors), warm page cache.

  nnmark  nnmark.scan(key, [folder], ledger=<a fresh SQLite file>): listing, reading,
          hashing the carrier bytes, verifying, writing every row to the ledger.
  naive   one process, plain torch: list the folder; per file safetensors'
          load_file (the whole file), the carrier's filter mean, X @ v with the key's
          projection matrix X generated once and kept ([T, N] float32, from
          nnmark._reference.torch_projection_matrix), the bits compared with the
          owner's. Rows kept in a list (no ledger). Timed with torch's default
          threads and with one thread; the faster is the baseline.

Bytes read per file: /proc/self/io read_bytes (bytes fetched from storage by the
process, all threads) over the timed region, divided by the files; nnmark also
reports the bytes it asked for (the ledger's bytes_read). Half the checkpoints
carry the mark; the two sides' match counts are compared file by file.

Targets (issue 5, on the 2-core CI machine): large, cold cache: nnmark >= 8x the
naive loop's files/s and reads <= carrier + header + 64 KiB per file; small, warm
cache: nnmark >= 2x the naive loop's files/s, ledger writes included.

Usage:
  python benchmarks/bench_scan.py                      # both cases, 3 repeats of the small one
  python benchmarks/bench_scan.py --quick              # smoke run: 8 large, 1,000 small, 1 repeat
  python benchmarks/bench_scan.py --case small --small-files 10000 --repeats 5
  python benchmarks/bench_scan.py --data /big/disk/bench --keep-data
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (LARGE_CARRIER, LARGE_SHAPE, SMALL_CARRIER, SMALL_SHAPE, OtherLoad, cpu_model,  # noqa: E402
                     git_state, read_bytes, resnet50_shapes, small_shapes)

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bench_scan.json"
RESULT_MARK = "@@bench_scan@@ "
SECRET = bytes(range(32))  # a fixed, public benchmark key: results are reproducible
BITS = 256
MARK_MESSAGE = "nnmark bench_scan"
DATA_VERSION = 1

# Targets from the issue.
TARGET_LARGE_RATIO = 8.0
TARGET_LARGE_SLACK = 64 * 1024   # bytes read per file <= carrier + header + this
TARGET_SMALL_RATIO = 2.0


# ================================================================== data
def bench_key(carrier: str, shape: tuple):
    import nnmark

    return nnmark.WhiteBoxKey(SECRET, carrier, nnmark.message_bits(MARK_MESSAGE, BITS), shape=shape)


def _marked_vector(key, n: int):
    """The least-norm v with X.v = the owner's bits as +-1: a carrier whose filters all
    equal v carries the mark with margin (a stand-in for training)."""
    import torch

    from nnmark._reference import torch_projection_matrix

    x = torch_projection_matrix(key.subkey(), BITS, 0, n, dtype=torch.float64)
    return torch.linalg.lstsq(x, 2.0 * key.bits.double() - 1.0, driver="gelsd").solution.float()


def generate(folder: Path, kind: str, count: int, progress=None) -> None:
    """count checkpoints in folder (ckpt00000.safetensors, ...), even ones marked."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = resnet50_shapes() if kind == "large" else small_shapes()
    carrier, shape = (LARGE_CARRIER, LARGE_SHAPE) if kind == "large" else (SMALL_CARRIER, SMALL_SHAPE)
    key = bench_key(carrier, shape)
    g = torch.Generator().manual_seed(1234)
    base = {n: (torch.zeros(s, dtype=torch.int64) if n.endswith("num_batches_tracked")
                else 0.05 * torch.randn(s, generator=g)) for n, s in shapes.items()}
    v = _marked_vector(key, math.prod(shape[1:]))
    scale = 0.05 / float(v.abs().mean())
    for i in range(count):
        if i % 2 == 0:  # marked: every filter the marked vector, plus noise
            w = (scale * v).reshape(1, *shape[1:]) + 0.01 * torch.randn(shape, generator=g)
        else:
            w = 0.05 * torch.randn(shape, generator=g)
        sd = dict(base)
        sd[carrier] = w.contiguous()
        save_file(sd, str(folder / f"ckpt{i:05d}.safetensors"))
        if progress is not None:
            progress(i + 1)
    os.sync()  # written back: the cold-cache runs can then drop every page


def drop_cache(files: list[str]) -> None:
    """Drops the page cache of these files (clean pages only: the data was synced)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(files: list[str]) -> None:
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def carrier_and_header_bytes(path: str, carrier: str) -> tuple[int, int]:
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    b, e = header[carrier]["data_offsets"]
    return e - b, 8 + n


# ================================================================== timed sides (in a worker process)
def _side_naive(cfg: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from nnmark._reference import torch_projection_matrix
    from nnmark.stats import binomial_threshold

    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    carrier, shape = (LARGE_CARRIER, LARGE_SHAPE) if cfg["case"] == "large" else (SMALL_CARRIER, SMALL_SHAPE)
    key = bench_key(carrier, shape)
    X = torch_projection_matrix(key.subkey(), BITS, 0, math.prod(shape[1:]))  # generated once, kept
    owner = key.bits.bool()
    thr = binomial_threshold(BITS, 1e-6)
    rb0, c0, t0 = read_bytes(), time.process_time(), time.perf_counter()
    rows = []
    for p in sorted(glob.glob(os.path.join(cfg["dir"], "*.safetensors"))):
        w = load_file(p)[carrier]
        v = w.reshape(w.shape[0], -1).mean(0)
        m = int(((X @ v > 0) == owner).sum())
        rows.append((p, m, m >= thr))
    wall, cpu, rb = time.perf_counter() - t0, time.process_time() - c0, read_bytes() - rb0
    return {"files": len(rows), "wall_s": wall, "cpu_s": cpu, "read_bytes": rb,
            "torch_threads": torch.get_num_threads(),
            "matches": {p: m for p, m, _ in rows}, "verified": sum(v for _, _, v in rows)}


def _side_nnmark(cfg: dict) -> dict:
    import nnmark

    carrier, shape = (LARGE_CARRIER, LARGE_SHAPE) if cfg["case"] == "large" else (SMALL_CARRIER, SMALL_SHAPE)
    key = bench_key(carrier, shape)
    ledger = cfg["ledger"]
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(ledger + suffix):
            os.remove(ledger + suffix)
    rb0, c0, t0 = read_bytes(), time.process_time(), time.perf_counter()
    res = nnmark.scan(key, [cfg["dir"]], ledger=ledger, progress=False, workers=cfg["workers"])
    wall, cpu, rb = time.perf_counter() - t0, time.process_time() - c0, read_bytes() - rb0
    rows = res.rows
    s = res.summary
    out = {"files": s["scanned"], "wall_s": wall, "cpu_s": cpu, "read_bytes": rb, "requested_bytes": s["bytes_read"],
           "matches": {r["path"]: r["matches"] for r in rows}, "verified": s["verified"], "status": s["status"],
           "workers": cfg["workers"] or max(2, min(8, os.cpu_count() or 2)), "nnmark_threads": nnmark.get_num_threads()}
    from nnmark.ledger import Ledger

    with Ledger(ledger) as led:
        out["ledger_rows"] = len(led)
    return out


def _worker(cfg: dict) -> dict:
    return _side_naive(cfg) if cfg["side"] == "naive" else _side_nnmark(cfg)


def _run_side(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(cfg)]
    load = OtherLoad()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout:.0f} s"}
    dt = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            r = json.loads(line[len(RESULT_MARK):])
            r["other_processes_cores_avg"] = load.cores(dt)  # while this side ran
            r["files_per_s"] = r["files"] / r["wall_s"] if r["wall_s"] > 0 else None
            return r
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"worker exit {proc.returncode}: {' | '.join(tail)}"}


# ================================================================== the cases
def _compare(naive: dict, nn: dict) -> dict:
    a, b = naive["matches"], nn["matches"]
    common = set(a) & set(b)
    diff = [p for p in common if a[p] != b[p]]
    return {"files_compared": len(common), "files_only_one_side": len(set(a) ^ set(b)),
            "match_counts_differ": len(diff), "max_match_diff": max((abs(a[p] - b[p]) for p in diff), default=0),
            "verified_naive": naive["verified"], "verified_nnmark": nn["verified"]}


def _strip_matches(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "matches"}


def run_case(case: str, folder: Path, files: list[str], repeats: int, cold: bool, workers, timeout: float,
             console) -> dict:
    ledger = str(folder.parent / f"ledger-{case}.sqlite")
    sides = {"naive": [], "naive_1thread": [], "nnmark": []}
    configs = {"naive": {"side": "naive", "threads": None}, "naive_1thread": {"side": "naive", "threads": 1},
               "nnmark": {"side": "nnmark", "ledger": ledger, "workers": workers}}
    last = {}
    if not cold:
        warm_cache(files)
    # nnmark's cold runs take a fraction of a second: it gets at least 3 (the median counts)
    runs = {"naive": repeats, "naive_1thread": repeats, "nnmark": max(repeats, 3) if cold else repeats}
    for rep in range(max(runs.values())):
        for name, extra in configs.items():  # interleaved, so a slow moment hits every side
            if rep >= runs[name]:
                continue
            if cold:
                drop_cache(files)
            cfg = {"case": case, "dir": str(folder), **extra}
            r = _run_side(cfg, timeout)
            if "error" in r:
                console.print(f"[red]{case} {name}: {r['error']}[/red]")
                sides[name].append(r)
                continue
            last[name] = r
            sides[name].append(_strip_matches(r))
            console.print(f"{case} rep {rep + 1}/{runs[name]} {name}: {r['files']} files in {r['wall_s']:.2f} s, "
                          f"{r['files_per_s']:,.0f} files/s, {r['read_bytes'] / max(r['files'], 1) / 1e6:,.3f} MB "
                          f"read per file (other processes: {r['other_processes_cores_avg']:.2f} cores)")
    out = {"case": case, "files": len(files), "cache": "cold" if cold else "warm", "repeats": runs, "runs": sides}
    med = {}
    for name, runs in sides.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            med[name] = {"files_per_s": statistics.median(r["files_per_s"] for r in ok),
                         "cpu_us_per_file": statistics.median(r["cpu_s"] / r["files"] * 1e6 for r in ok),
                         "read_bytes_per_file": statistics.median(r["read_bytes"] / r["files"] for r in ok)}
            if name == "nnmark":
                med[name]["requested_bytes_per_file"] = statistics.median(r["requested_bytes"] / r["files"] for r in ok)
    out["median"] = med
    if "nnmark" in last and ("naive" in last or "naive_1thread" in last):
        base = max((n for n in ("naive", "naive_1thread") if n in med), key=lambda n: med[n]["files_per_s"])
        out["baseline"] = base
        out["ratio"] = med["nnmark"]["files_per_s"] / med[base]["files_per_s"]
        out["check"] = _compare(last[base], last["nnmark"])
    carrier = LARGE_CARRIER if case == "large" else SMALL_CARRIER
    out["carrier_bytes"], out["header_bytes"] = carrier_and_header_bytes(files[0], carrier)
    out["file_bytes"] = os.path.getsize(files[0])
    return out


def _targets(cases: dict) -> list[dict]:
    out = []
    c = cases.get("large")
    if c is not None:
        item = {"target": f"large, cold cache: nnmark >= {TARGET_LARGE_RATIO:g}x the naive loop's files/s",
                "value": None, "met": None}
        if "ratio" in c:
            item.update(value=round(c["ratio"], 2), met=c["ratio"] >= TARGET_LARGE_RATIO)
        out.append(item)
        limit = c["carrier_bytes"] + c["header_bytes"] + TARGET_LARGE_SLACK
        item = {"target": f"large, cold cache: bytes read per file <= carrier + header + 64 KiB = {limit:,}",
                "value": None, "met": None}
        if "nnmark" in c["median"]:
            v = c["median"]["nnmark"]["read_bytes_per_file"]
            item.update(value=round(v), met=v <= limit)
        out.append(item)
        if c["files"] < 64:
            for it in out[-2:]:
                it["note"] = f"{c['files']} files, not 64"
    c = cases.get("small")
    if c is not None:
        item = {"target": f"small, warm cache: nnmark >= {TARGET_SMALL_RATIO:g}x the naive loop's files/s "
                          f"(ledger writes included)", "value": None, "met": None}
        if "ratio" in c:
            item.update(value=round(c["ratio"], 2), met=c["ratio"] >= TARGET_SMALL_RATIO)
        if c["files"] < 10_000:
            item["note"] = f"{c['files']} files, not 10,000"
        out.append(item)
    return out


def _meta(args) -> dict:
    import torch

    import nnmark

    git = git_state(HERE.parent)
    import safetensors

    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "python": sys.version.split()[0], "machine": platform.machine(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "safetensors_version": safetensors.__version__, "nnmark_version": nnmark.__version__,
        "nnmark_path": str(Path(nnmark.__file__).parent), "nnmark_build_info": nnmark.build_info(), "git": git,
        "loadavg_start": os.getloadavg(),
    }


def _fmt_rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_bytes(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:,.2f} MB" if v >= 1e6 else f"{v / 1e3:,.1f} kB"


def _table(cases: dict):
    from rich.table import Table

    t = Table(title="nnmark scan vs the naive loop (median of repeats; ratio = nnmark / the faster naive)")
    for col in ("case", "side", "files/s", "CPU µs/file", "read/file\n(read_bytes)", "asked/file\n(bytes_read)",
                "ratio", "check"):
        t.add_column(col, justify="left" if col in ("case", "side") else "right")
    for name, c in cases.items():
        label = f"{name}: {c['files']:,} × {_fmt_bytes(c['file_bytes'])}, {c['cache']} cache"
        chk = c.get("check")
        chk_s = "-"
        if chk is not None:
            same = chk["match_counts_differ"] == 0 and chk["verified_naive"] == chk["verified_nnmark"]
            chk_s = (f"{'ok' if same else '[red]DIFF[/red]'} ({chk['match_counts_differ']} differ, "
                     f"verified {chk['verified_nnmark']}/{chk['files_compared']})")
        for side in ("naive", "naive_1thread", "nnmark"):
            m = c["median"].get(side)
            if m is None:
                t.add_row(label, side, "[red]failed[/red]", "-", "-", "-", "-", "-")
                continue
            ratio = f"{c['ratio']:.2f}×" if side == "nnmark" and "ratio" in c else (
                "baseline" if side == c.get("baseline") else "")
            t.add_row(label if side == "naive" else "", side + (" (torch 1 thread)" if side == "naive_1thread" else ""),
                      _fmt_rate(m["files_per_s"]), f"{m['cpu_us_per_file']:,.0f}", _fmt_bytes(m["read_bytes_per_file"]),
                      _fmt_bytes(m.get("requested_bytes_per_file")), ratio, chk_s if side == "nnmark" else "")
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=("both", "large", "small"), default="both")
    ap.add_argument("--large-files", type=int, default=64)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each side per case (default: small 3; large 1, and 3 of nnmark's)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 large, 1,000 small, 1 repeat")
    ap.add_argument("--workers", type=int, default=None, help="nnmark loader threads (default: nnmark's)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "nnmark-bench-scan",
                    help="folder for the generated checkpoints (default: $TMPDIR/nnmark-bench-scan)")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated checkpoints (reused next time)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per timed side before giving up")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args._worker))), flush=True)
        return 0

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the table
        console = Console(width=200)
    if args.quick:
        args.large_files, args.small_files = min(args.large_files, 8), min(args.small_files, 1000)
    meta = _meta(args)
    t_start = time.perf_counter()
    load = OtherLoad()
    notes = []
    wanted = ("large", "small") if args.case == "both" else (args.case,)
    large_bytes = sum(4 * math.prod(s) for s in resnet50_shapes().values()) + 64 * 1024
    small_bytes = sum(4 * math.prod(s) for s in small_shapes().values()) + 4096
    args.data.mkdir(parents=True, exist_ok=True)
    counts = {"large": args.large_files, "small": args.small_files}
    cases = {}
    for case in wanted:
        folder = args.data / case
        stamp = folder / ".bench_scan.json"
        want = {"version": DATA_VERSION, "case": case, "files": counts[case]}
        fresh = not (stamp.exists() and json.loads(stamp.read_text()) == want)
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
            per = large_bytes if case == "large" else small_bytes
            free = shutil.disk_usage(args.data).free - (1 << 30)  # leave 1 GiB
            if counts[case] * per > free:
                fit = max(1, int(free // per))
                notes.append(f"{case}: only {free / 1e9:.1f} GB free at {args.data}: {fit} files instead of "
                             f"{counts[case]}")
                console.print(f"[yellow]{notes[-1]}[/yellow]")
                counts[case] = want["files"] = fit
            console.print(f"generating {counts[case]:,} {case} checkpoints in {folder} ...")
            t0 = time.perf_counter()
            generate(folder, case, counts[case])
            stamp.write_text(json.dumps(want))
            console.print(f"  {time.perf_counter() - t0:.0f} s")
        files = sorted(glob.glob(str(folder / "*.safetensors")))
        repeats = args.repeats or (1 if args.quick or case == "large" else 3)
        cases[case] = run_case(case, folder, files, repeats, case == "large", args.workers, args.timeout, console)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["other_processes_cores_avg"] = load.cores(meta["wall_s"])
    meta["notes"] = notes
    targets = _targets(cases)

    console.print(f"[bold]bench_scan[/bold] {meta['date_utc']}  {meta['cpu_model']}, {meta['cpu_count']} cores, "
                  f"torch {meta['torch_version']}, safetensors {meta['safetensors_version']}; nnmark from "
                  f"{meta['nnmark_path']}")
    console.print(_table(cases))
    for name, c in cases.items():
        console.print(f"{name}: carrier {c['carrier_bytes']:,} B, header {c['header_bytes']:,} B, file "
                      f"{c['file_bytes']:,} B")
    for tg in targets:
        met = {True: "[green]met[/green]", False: "[red]NOT met[/red]", None: "n/a"}[tg["met"]]
        note = f" — {tg['note']}" if "note" in tg else ""
        console.print(f"target {tg['target']}: {met} (value {tg['value']}){note}")
    console.print(f"wall time {meta['wall_s']:.0f} s; load average start {meta['loadavg_start'][0]:.2f}, end "
                  f"{meta['loadavg_end'][0]:.2f}; CPU used by other processes meanwhile: "
                  f"{meta['other_processes_cores_avg']:.2f} cores on average")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "bench_scan", "meta": meta, "cases": cases, "targets": targets}, f, indent=1)
    console.print(f"JSON: {args.json}")
    if not args.keep_data:
        shutil.rmtree(args.data, ignore_errors=True)
    failed = any("error" in r for c in cases.values() for runs in c["runs"].values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
