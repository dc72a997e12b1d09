#!/usr/bin/env python3
"""Per-channel activation statistics: nnmark.ops.channel_stats vs plain torch.

For activations x of the shapes a ResNet-50 produces at batch 64 (and a linear
output, a channels-last and a bfloat16 case), per channel c:

  nnmark             nnmark.ops.channel_stats(x, sums, positives): sum (float64) and
                     count of x > 0 in one streaming pass, added to preallocated
                     accumulators (as the fine-pruning hook does batch after batch)
  torch mean         x.mean(dim=(0, 2, 3)) (dim=0 for [B, C]): the mean alone
  torch mean+pos     x.mean(dim=...) and (x > 0).float().mean(dim=...): the same two
                     statistics, the equal-work baseline
  torch sum (ref)    x.sum(): one number, no per-channel split; a reading of the memory
                     bandwidth a torch reduction reaches on this machine (not a baseline)

GB/s = bytes of x / time (each method reads x once at best; torch mean+pos reads it
twice and writes a float copy). Methods take turns, the order rotated each repeat, so
a busy spell of a shared machine hits all of them; the time is the median over the
repeats and the ratio nnmark / torch is the median of the per-repeat ratios (paired).
Checks: nnmark's sums and counts against a float64 torch reference (counts exact,
sums to 1e-12 of sum |x|), and torch's float32 mean error beside it.

Usage:
  python benchmarks/bench_channel_stats.py                  # CPU, all cases
  python benchmarks/bench_channel_stats.py --quick          # smoke run, small shapes
  python benchmarks/bench_channel_stats.py --device cuda --json benchmarks/results/bench_channel_stats_cuda.json
  python benchmarks/bench_channel_stats.py --threads 2 --reps 15
  python benchmarks/bench_channel_stats.py --case activation --reps 21 --json /tmp/activation.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, fmt_time, run_meta  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bench_channel_stats.json"

# (name, shape, dtype, channels_last). ResNet-50 activations at batch 64.
CASES = [
    ("activation", (64, 256, 56, 56), "float32", False),
    ("conv1", (64, 64, 112, 112), "float32", False),
    ("layer2", (64, 512, 28, 28), "float32", False),
    ("layer3", (64, 1024, 14, 14), "float32", False),
    ("layer4", (64, 2048, 7, 7), "float32", False),
    ("linear", (4096, 2048), "float32", False),
    ("activation NHWC", (64, 256, 56, 56), "float32", True),
    ("activation bf16", (64, 256, 56, 56), "bfloat16", False),
]
QUICK_CASES = [
    ("small", (8, 64, 28, 28), "float32", False),
    ("small linear", (256, 512), "float32", False),
    ("small NHWC", (8, 64, 28, 28), "float32", True),
]
TARGET_CPU_GBS = 30.0  # issue 4: channel statistics on the CPU >= 30 GB/s (the "activation" case)


def _sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_case(torch, nnmark, dev, name, shape, dtype_name, channels_last, reps, min_time) -> dict:
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=g).to(dtype)  # ~half the values positive, like pre-ReLU outputs
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dev)
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    C = shape[1]
    nbytes = x.numel() * x.element_size()
    sums = torch.zeros(C, dtype=torch.float64, device=dev)
    pos = torch.zeros(C, dtype=torch.int64, device=dev)

    def nn_stats():
        sums.zero_()
        pos.zero_()
        nnmark.ops.channel_stats(x, sums, pos)

    methods = {
        "nnmark": nn_stats,
        "torch mean": lambda: x.mean(dim=dims),
        "torch mean+pos": lambda: (x.mean(dim=dims), (x > 0).float().mean(dim=dims)),
        "torch sum (ref)": lambda: x.sum(),
    }
    for fn in methods.values():  # warm-up
        fn()
    _sync(torch, dev)
    # Enough calls per timed sample that one sample takes >= min_time / reps.
    t0 = time.perf_counter()
    nn_stats()
    _sync(torch, dev)
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_time / reps / one))
    names = list(methods)
    samples = {m: [] for m in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            fn = methods[m]
            _sync(torch, dev)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(torch, dev)
            samples[m].append((time.perf_counter() - t0) / inner)

    # Checks (untimed): nnmark against float64; torch's float32 mean error beside it.
    nn_stats()
    ref_s = x.double().sum(dim=dims)
    ref_p = (x > 0).sum(dim=dims)
    scale = float(x.double().abs().sum(dim=dims).max())
    count = x.numel() // C
    mean_t = x.mean(dim=dims).double()
    check = {
        "positives_equal": bool(torch.equal(pos, ref_p)),
        "sums_max_abs_err_rel": float((sums - ref_s).abs().max()) / max(scale, 1e-30),
        "torch_mean_max_abs_err_rel": float((mean_t * count - ref_s).abs().max()) / max(scale, 1e-30),
    }
    check["ok"] = check["positives_equal"] and check["sums_max_abs_err_rel"] <= 1e-12

    res = {"name": name, "shape": list(shape), "dtype": dtype_name, "channels_last": channels_last,
           "bytes": nbytes, "inner_calls": inner, "check": check}
    for m in names:
        med = statistics.median(samples[m])
        res[m] = {"median_s": med, "min_s": min(samples[m]), "reps": reps, "gb_per_s": nbytes / med / 1e9,
                  "times_s": [round(t, 7) for t in samples[m]]}
    for m in names[1:3]:
        ratios = sorted(a / b for a, b in zip(samples["nnmark"], samples[m]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        res[m]["ratio_nnmark_over_torch"] = {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}
    return res


def _meta(args, torch, nnmark) -> dict:
    meta = {**run_meta(args.device), "reps": args.reps}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


def _targets(cases: list[dict], device: str) -> list[dict]:
    item = {"target": f"CPU, activation 64x256x56x56 float32: nnmark >= {TARGET_CPU_GBS:.0f} GB/s",
            "met": None, "value": None}
    c = next((c for c in cases if c["name"] == "activation"), None)
    if device != "cpu":
        item["note"] = "a CPU target; this run is on " + device
    elif c is None:
        item["note"] = "case not in this run"
    else:
        v = c["nnmark"]["gb_per_s"]
        item.update(value=round(v, 2), met=v >= TARGET_CPU_GBS)
    return [item]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: small shapes only")
    ap.add_argument("--reps", type=int, default=None, help="timed samples per method and case (default 9; quick 3)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of timed calls per method and case (default 1.0; quick 0.1)")
    ap.add_argument("--threads", type=int, default=None, help="set torch and nnmark threads (default: all cores)")
    ap.add_argument("--case", action="append", default=None, metavar="NAME",
                    help="run only this case (repeatable): " + ", ".join(repr(c[0]) for c in CASES))
    ap.add_argument("--json", type=Path, default=None,
                    help=f"JSON output (default {DEFAULT_JSON}, or *_cuda.json with --device cuda)")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import nnmark
    import nnmark.ops

    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the table
        console = Console(width=160)
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: torch sees no CUDA device[/red]")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        nnmark.set_num_threads(args.threads)
    args.reps = args.reps or (3 if args.quick else 9)
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 1.0)
    if args.json is None:
        args.json = DEFAULT_JSON.with_name("bench_channel_stats_cuda.json") if args.device == "cuda" else DEFAULT_JSON
    dev = torch.device(args.device)
    cases_cfg = QUICK_CASES if args.quick else CASES
    if args.case:
        unknown = sorted(set(args.case) - {c[0] for c in cases_cfg})
        if unknown:
            ap.error(f"unknown case(s) {unknown}; choose from {[c[0] for c in cases_cfg]}")
        cases_cfg = [c for c in cases_cfg if c[0] in args.case]
    meta = _meta(args, torch, nnmark)
    t_start = time.perf_counter()
    load = OtherLoad()
    cases = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("bench_channel_stats", total=len(cases_cfg))
        for name, shape, dtype, cl in cases_cfg:
            prog.update(task, description=f"{name} {'x'.join(map(str, shape))}")
            try:
                cases.append(run_case(torch, nnmark, dev, name, shape, dtype, cl, args.reps, min_time))
            except Exception as exc:  # one failing case (memory) must not lose the others
                cases.append({"name": name, "shape": list(shape), "dtype": dtype, "channels_last": cl,
                              "error": f"{type(exc).__name__}: {exc}"})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            prog.advance(task)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["other_processes_cores_avg"] = load.cores(meta["wall_s"])
    targets = _targets(cases, args.device)

    bi = meta["nnmark_build_info"]
    console.print(f"[bold]bench_channel_stats[/bold] {meta['date_utc']}  {meta['cpu_model']}, {meta['cpu_count']} "
                  f"cores, cpu_isa={bi['cpu_isa']}, torch {meta['torch_version']}, threads: torch "
                  f"{meta['torch_threads'] if not args.threads else args.threads}, nnmark {nnmark.get_num_threads()}"
                  + (f", GPU {meta['gpu']}" if "gpu" in meta else ""))
    t = Table(title=f"Per-channel sum + count of x > 0 ({args.device}; median of {args.reps}; "
                    f"ratio = nnmark / torch, paired median (quartiles))")
    for col in ("case", "shape", "dtype", "nnmark", "GB/s", "torch mean", "GB/s", "ratio", "torch mean+pos",
                "GB/s", "ratio", "x.sum()\nGB/s", "check"):
        t.add_column(col, justify="right")
    for c in cases:
        shape = "x".join(map(str, c["shape"])) + (" NHWC" if c["channels_last"] else "")
        if "error" in c:
            t.add_row(c["name"], shape, c["dtype"], f"[red]{c['error'][:60]}[/red]", *["-"] * 9)
            continue
        cells = []
        for m in ("torch mean", "torch mean+pos"):
            r = c[m]["ratio_nnmark_over_torch"]
            cells += [fmt_time(c[m]["median_s"]), f"{c[m]['gb_per_s']:.1f}",
                      f"{r['median']:.3f} ({r['q1']:.2f}-{r['q3']:.2f})"]
        ck = c["check"]
        chk = (f"{'ok' if ck['ok'] else '[red]MISMATCH[/red]'} {ck['sums_max_abs_err_rel']:.0e} "
               f"(torch {ck['torch_mean_max_abs_err_rel']:.0e})")
        t.add_row(c["name"], shape, c["dtype"], fmt_time(c["nnmark"]["median_s"]), f"{c['nnmark']['gb_per_s']:.1f}",
                  *cells, f"{c['torch sum (ref)']['gb_per_s']:.1f}", chk)
    console.print(t)
    console.print("check: counts equal a float64 reference; max |sum error| / sum |x| of nnmark (ok <= 1e-12), "
                  "and of torch's float32 mean x count in brackets.")
    for tg in targets:
        met = {True: "[green]met[/green]", False: "[red]NOT met[/red]", None: "n/a"}[tg["met"]]
        console.print(f"target {tg['target']}: {met} (value {tg['value']}){' — ' + tg['note'] if 'note' in tg else ''}")
    console.print(f"wall time {meta['wall_s']:.0f} s; load average start {meta['loadavg_start'][0]:.2f}, "
                  f"end {meta['loadavg_end'][0]:.2f}; CPU used by other processes meanwhile: "
                  f"{meta['other_processes_cores_avg']:.2f} cores on average")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "bench_channel_stats", "meta": meta, "cases": cases, "targets": targets}, f, indent=1)
    console.print(f"JSON: {args.json}")
    bad = any("error" in c or not c["check"]["ok"] for c in cases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
