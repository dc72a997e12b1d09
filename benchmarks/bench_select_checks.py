#!/usr/bin/env python3
"""The Python side of the global magnitude select and prune, without the kernel's work.

ResNet-50's 161 parameter tensors ten times over (1,610 tensors, as bench_prune's '250M')
but of one element each, on the CPU: the native select and prune then cost ~0.1 ms, so
what is left is the Python before and around them (checks, argument lists, dispatch,
version counters), which is the same Python on CUDA. The target (issue 17): the whole
select over 250M parameters on an H100 in <= 2 ms, so this part must stay well below.

Usage: python benchmarks/bench_select_checks.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import resnet50_shapes  # noqa: E402

from nnmark import _C_cpu, ops  # noqa: E402
from nnmark import _custom_ops as C  # noqa: E402


def median_ms(f, n: int = 50) -> float:
    f()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1e3


def main() -> None:
    ts = [torch.empty(1) for _ in resnet50_shapes() * 10]
    k = len(ts) // 2
    args = C._list_args(ts)
    rows = [
        ("ops.magnitude_threshold", lambda: ops.magnitude_threshold(ts, k)),
        ("ops.prune_smallest", lambda: ops.prune_smallest(ts, k)),
        ("  checks (_weight_list)", lambda: ops._weight_list(ts)),
        ("  argument lists", lambda: C._list_args(ts)),
        ("  native select alone", lambda: _C_cpu.magnitude_select(*args, k)),
        ("torch.ops.nnmark.magnitude_select", lambda: C.magnitude_select(ts, k)),
    ]
    print(f"{len(ts)} tensors of one element, CPU, medians of 50")
    for name, f in rows:
        print(f"{name:36s} {median_ms(f):7.3f} ms")


if __name__ == "__main__":
    main()
