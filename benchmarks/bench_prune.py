#!/usr/bin/env python3
"""Global magnitude pruning at 50%: nnmark's exact select against the plain-torch ways.

The parameter set is ResNet-50's: its 161 tensors (convs, batch-norm weights and
biases, the classifier), 25.6M parameters, initialised as torch would (He-normal
convs, BN weights near 1, biases near 0). '250M' is ten copies of it (1610 tensors).
k = half the parameters. Methods (each finds the k-th smallest |w| over all tensors):

  nnmark select        nnmark.ops.magnitude_threshold(tensors, k): no concatenation
  nnmark prune         nnmark.ops.prune_smallest(tensors, k): the select, then exactly
                       k weights zeroed in place
  cat+kthvalue         torch.kthvalue(torch.cat(flattened).abs_(), k)
  cat+topk             torch.topk(cat, k, largest=False), then its max
  cat+numpy.partition  numpy.partition(cat.numpy(), k - 1)[k - 1]
  cat+kthvalue+mask    the plain prune: the kthvalue threshold, then t[|t| <= thr] = 0
  global_unstructured  torch.nn.utils.prune.global_unstructured(L1Unstructured, 0.5)
  torch.quantile       torch.quantile(cat, 0.5) (refuses inputs over 16.8M elements)

Every case runs in its own process, so its peak extra memory is its own: on the CPU
the peak resident set (VmHWM, reset through /proc/self/clear_refs once the tensors
exist) minus the resident set before the call; on CUDA torch's peak allocation minus
the allocation before, plus the device memory nnmark's op takes for itself from
the CUDA memory pool (the drop in free device memory over its first call). Times are medians; in-place methods get the original weights
back before each repeat (not timed). Each threshold is checked against nnmark's.

Usage:
  python benchmarks/bench_prune.py                     # 25.6M and 250M on the CPU
  python benchmarks/bench_prune.py --sizes 25.6M --quick
  python benchmarks/bench_prune.py --device cuda --json benchmarks/results/bench_prune_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, cpu_ticks, fmt_time, own_cpu_s  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bench_prune.json"
RESULT_MARK = "@@bench_prune@@ "
METHODS = ["nnmark select", "nnmark prune", "cat+kthvalue", "cat+topk", "cat+numpy.partition",
           "cat+kthvalue+mask", "global_unstructured", "torch.quantile"]
SIZES = {"25.6M": 1, "250M": 10}  # copies of ResNet-50's parameter set
TARGETS = {("cpu", "25.6M"): (25e-3, 16 * 2**20), ("cuda", "250M"): (2e-3, None)}


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:  # the projection shortcut
                shapes += [(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)]
            inplanes = width * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def make_tensors(copies: int, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for c in range(copies):
        shapes = resnet50_shapes()
        for i, s in enumerate(shapes):
            if len(s) > 1:  # He-normal
                fan_in = 1
                for d in s[1:]:
                    fan_in *= d
                t = torch.randn(s, generator=g) * (2.0 / fan_in) ** 0.5
            elif i + 1 < len(shapes) and shapes[i + 1] == s and len(s) == 1:  # BN weight
                t = 1 + 0.1 * torch.randn(s, generator=g)
            else:  # BN / classifier bias
                t = 0.05 * torch.randn(s, generator=g)
            out.append(t.to(device))
    return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(cfg: dict) -> dict:
    import numpy as np
    import torch

    import nnmark
    from nnmark import ops

    method, size, device, repeats = cfg["method"], cfg["size"], cfg["device"], cfg["repeats"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
        nnmark.set_num_threads(cfg["threads"])
    ts = make_tensors(SIZES[size], device)
    total = sum(t.numel() for t in ts)
    k = total // 2
    orig = [t.clone() for t in ts] if method in ("nnmark prune", "cat+kthvalue+mask", "global_unstructured") else None
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def cat():
        return torch.cat([t.flatten() for t in ts]).abs_()

    def run():
        if method == "nnmark select":
            return ops.magnitude_threshold(ts, k)[0]
        if method == "nnmark prune":
            return ops.prune_smallest(ts, k)[0]
        if method == "cat+kthvalue":
            return torch.kthvalue(cat(), k).values
        if method == "cat+topk":
            return torch.topk(cat(), k, largest=False, sorted=False).values.max()
        if method == "cat+numpy.partition":
            a = cat().cpu().numpy()
            return float(np.partition(a, k - 1)[k - 1])
        if method == "cat+kthvalue+mask":
            thr = torch.kthvalue(cat(), k).values
            for t in ts:
                t.masked_fill_(t.abs() <= thr, 0)
            return thr
        if method == "global_unstructured":
            import torch.nn.utils.prune as prune

            mods = []
            for t in ts:
                m = torch.nn.Module()
                m.weight = torch.nn.Parameter(t, requires_grad=False)
                mods.append(m)
            prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured, amount=0.5)
            # The threshold (largest pruned |w|) is read after the clock stops.
            return lambda: max(float(m.weight_orig.abs()[m.weight_mask == 0].max()) for m in mods
                               if bool((m.weight_mask == 0).any()))
        if method == "torch.quantile":
            return torch.quantile(cat(), 0.5)
        raise ValueError(method)

    def restore():
        if orig is not None:
            for t, o in zip(ts, orig):
                t.copy_(o)

    res = {"method": method, "size": size, "device": device, "params": total, "tensors": len(ts), "k": k}
    # Warm up (page faults, CUDA context, lazy init) before the memory baseline. nnmark's
    # CUDA scratch comes from the device's memory pool, which keeps it after the call,
    # so its size is the drop in free device memory over the first call.
    native_extra = 0
    try:
        restore()
        sync()
        if method in ("nnmark select", "nnmark prune"):
            free0 = torch.cuda.mem_get_info()[0] if cuda else 0
            run()
            sync()
            if cuda:
                native_extra = max(0, free0 - torch.cuda.mem_get_info()[0])
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return res
    times, thr = [], None
    if cuda:
        torch.cuda.empty_cache()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    before = _rss_kib("VmRSS") * 1024 if not cuda else torch.cuda.memory_allocated()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        for r in range(repeats):
            restore()
            sync()
            t0 = time.perf_counter()
            thr = run()
            sync()
            times.append(time.perf_counter() - t0)
            if r == 0:
                peak = (_rss_kib("VmHWM") * 1024 if not cuda else torch.cuda.max_memory_allocated())
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return res
    if callable(thr):
        thr = thr()
    res.update(time_s=statistics.median(times), times_s=times,
               extra_bytes=max(0, peak - before) + native_extra, threshold=float(thr))
    return res


def _run_case(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(cfg)]
    try:
        # A fixed mmap threshold: blocks of 64 KiB and more are mapped and unmapped on
        # free, so a warm-up's freed buffers can't hide in the heap from the next peak.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**cfg, "error": f"worker failed (rc {p.returncode}): {tail[0][:200]}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="25.6M,250M", help="comma separated, of " + ", ".join(SIZES))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma separated, of: " + ", ".join(METHODS))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--repeats", type=int, default=9, help="timed repeats for fast methods")
    ap.add_argument("--quick", action="store_true", help="3 repeats, no global_unstructured at 250M")
    ap.add_argument("--threads", type=int, default=None, help="torch and nnmark threads (default: all cores)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print(RESULT_MARK + json.dumps(_worker(json.loads(args._worker))), flush=True)
        return 0

    from rich.console import Console
    from rich.table import Table

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    console = Console(width=max(120, Console().width))
    busy0, tot0 = cpu_ticks()
    own0 = own_cpu_s()
    cases = []
    for size in sizes:
        mem_need = 4 * 25.6e6 * SIZES[size] * 3  # weights, their copy, the concatenation
        avail = _available_bytes(args.device)
        for method in methods:
            slow = method in ("global_unstructured",) or (method == "cat+topk" and args.device == "cpu")
            if method == "global_unstructured" and (SIZES[size] > 1 and args.quick):
                continue
            if mem_need * (3 if method == "global_unstructured" else 1) > avail:
                cases.append({"method": method, "size": size, "device": args.device,
                              "error": f"skipped: needs about {mem_need / 2**30:.1f} GiB, {avail / 2**30:.1f} available"})
                continue
            if method.startswith("nnmark"):  # fast: always the full repeats
                reps = args.repeats
            else:
                reps = 1 if slow and SIZES[size] > 1 else (3 if slow or args.quick or SIZES[size] > 1 else args.repeats)
            cfg = {"method": method, "size": size, "device": args.device, "repeats": reps, "threads": args.threads}
            with console.status(f"{size} {method} ({reps} repeats)"):
                res = _run_case(cfg, args.timeout)
            cases.append(res)
            console.print(f"  {size:>6} {method:<20} "
                          + (res["error"] if "error" in res else
                             f"{fmt_time(res['time_s']):>10}  +{res['extra_bytes'] / 2**20:8.1f} MiB"))
    busy1, tot1 = cpu_ticks()

    # Ratios against nnmark in the same run; thresholds checked against nnmark's.
    table = Table(title=f"global magnitude pruning at 50% ({args.device})")
    for col in ("size", "method", "time", "× nnmark select", "peak extra", "threshold ok"):
        table.add_column(col, justify="right" if col not in ("method",) else "left")
    for c in cases:
        ref = next((r for r in cases if r["size"] == c["size"] and r["method"] == "nnmark select" and "time_s" in r),
                   None)
        if "time_s" in c and ref is not None:
            c["ratio_to_nnmark"] = c["time_s"] / ref["time_s"]
            c["threshold_matches"] = (c["threshold"] == ref["threshold"]) if c["method"] != "torch.quantile" else None
        table.add_row(c["size"], c["method"], fmt_time(c.get("time_s")) if "time_s" in c else c.get("error", "-"),
                      f"{c['ratio_to_nnmark']:.1f}" if "ratio_to_nnmark" in c else "-",
                      f"{c['extra_bytes'] / 2**20:.1f} MiB" if "extra_bytes" in c else "-",
                      {True: "yes", False: "NO", None: "-"}[c.get("threshold_matches")])
    console.print(table)
    targets = []
    for (dev, size), (t_max, m_max) in TARGETS.items():
        c = next((r for r in cases if r["size"] == size and r["method"] == "nnmark select" and "time_s" in r), None)
        if dev != args.device or c is None:
            continue
        p = next((r for r in cases if r["size"] == size and r["method"] == "nnmark prune" and "time_s" in r), None)
        tgt = {"device": dev, "size": size, "time_target_s": t_max, "select_s": c["time_s"],
               "select_met": c["time_s"] <= t_max, "prune_s": p and p["time_s"],
               "memory_target_bytes": m_max, "extra_bytes": c["extra_bytes"]}
        if m_max is not None:
            tgt["memory_met"] = max(c["extra_bytes"], p["extra_bytes"] if p else 0) <= m_max
        targets.append(tgt)
        console.print(f"target {dev} {size}: select {fmt_time(c['time_s'])} (≤ {fmt_time(t_max)}: "
                      f"{'met' if tgt['select_met'] else 'NOT met'}), prune {fmt_time(tgt['prune_s'])}"
                      + (f"; extra memory {'met' if tgt.get('memory_met') else 'NOT met'} (≤ {m_max / 2**20:.0f} MiB)"
                         if m_max else ""))
    meta = _meta(args, busy1 - busy0, tot1 - tot0, own_cpu_s() - own0)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "bench_prune", "meta": meta, "cases": cases,
                                     "targets": targets}, indent=1) + "\n")
    console.print(f"JSON: {args.json}")
    return 0


def _available_bytes(device: str) -> float:
    if device == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return float("inf")


def _meta(args, busy: int, total: int, own: float) -> dict:
    import torch

    import nnmark

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
            "cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "nnmark": nnmark.build_info(), "threads": args.threads or nnmark.get_num_threads(),
            "machine_busy_fraction": busy / total if total else None, "own_cpu_s": own}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


if __name__ == "__main__":
    sys.exit(main())
