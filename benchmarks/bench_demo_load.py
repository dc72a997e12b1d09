#!/usr/bin/env python3
"""The demo (`nnmark demo`) with and without competing CPU load.

Runs `python -m nnmark.cli demo --json` in a subprocess, first with no added load, then
with N busy processes (`python -c "while True: pass"`) started just before it and killed
right after, and prints the wall time, the demo's own CPU time (user + system of the
subprocess) and the loaded / unloaded ratio. Variants (each `NAME:ENV=VALUE,ENV=VALUE`)
run the same demo with extra environment variables, e.g. `OMP_NUM_THREADS=1` or
`NNMARK_NUM_THREADS=1`, or `PYTHONPATH=/some/older/copy` for a before/after comparison;
runs are interleaved (repeat, then load level, then variant) so that drifting
background load hits every variant alike. "other load" is the CPU other processes
(the busy loops included) took meanwhile, in cores on average.

Usage:
  python benchmarks/bench_demo_load.py                         # idle and 2 busy, the full demo
  python benchmarks/bench_demo_load.py --busy 0,2,4 --repeats 2 --demo-args "--unmarked 2 --epochs 10"
  python benchmarks/bench_demo_load.py --variant default: --variant omp1:OMP_NUM_THREADS=1
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, run_meta  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    env = {}
    for item in filter(None, rest.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected NAME:ENV=VALUE,...")
        env[k] = v
    return name or "default", env


def run_demo(env_extra: dict, busy: int, demo_args: list[str], timeout: float) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)  # the busy loops are running before the demo starts
        with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile("w+") as out, \
                tempfile.TemporaryFile("w+") as err:
            env = {**os.environ, **env_extra}
            load = OtherLoad()
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "nnmark.cli", "demo", "--out", str(Path(d) / "demo"),
                                     "--json", *demo_args], env=env, stdout=out, stderr=err, text=True)
            while True:  # wait4: the demo's own CPU time, not the busy loops'
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    return {"wall_s": None, "timed_out": True}
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            other = load.cores(wall)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()
    res = {"wall_s": round(wall, 2), "demo_cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
           "other_load_cores": other, "rc": os.waitstatus_to_exitcode(status)}
    try:
        j = json.loads(stdout)
        res["demo_seconds"] = round(j["seconds"], 2)
        res["ok"] = j["ok"]
    except (json.JSONDecodeError, KeyError):
        res["error"] = stderr[-500:]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", default="0,2", help="busy background processes per run, comma separated (default 0,2)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[], help="NAME:ENV=VALUE,... (repeatable; default: one "
                    "variant with the environment as it is)")
    ap.add_argument("--demo-args", default="", help="extra arguments for `nnmark demo`, e.g. \"--unmarked 2\"")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per demo run before it is killed")
    ap.add_argument("--json", default=None, help="write the runs here as JSON")
    args = ap.parse_args()
    busy = [int(b) for b in args.busy.split(",")]
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    demo_args = shlex.split(args.demo_args)
    meta = run_meta("cpu")
    runs = []
    for rep in range(args.repeats):
        for b in busy:
            for name, env in variants:
                r = run_demo(env, b, demo_args, args.timeout)
                r.update(variant=name, env=env, busy=b, repeat=rep)
                runs.append(r)
                print(json.dumps(r), flush=True)
    print()
    print(f"{'variant':<16} {'busy':>4} {'wall s (runs)':<28} {'demo CPU s':<20} {'vs busy 0':>9}")
    for name, _ in variants:
        base = [r["wall_s"] for r in runs if r["variant"] == name and r["busy"] == 0 and r["wall_s"]]
        for b in busy:
            rs = [r for r in runs if r["variant"] == name and r["busy"] == b]
            walls = [r["wall_s"] for r in rs if r["wall_s"] is not None]
            cpus = [r.get("demo_cpu_s") for r in rs]
            ratio = f"{min(walls) / min(base):.2f}x" if walls and base else "-"
            print(f"{name:<16} {b:>4} {', '.join(map(str, walls)) or 'timed out':<28} "
                  f"{', '.join(map(str, cpus)):<20} {ratio:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
