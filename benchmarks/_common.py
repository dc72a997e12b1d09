"""Helpers shared by the benchmark scripts: machine facts and time formatting."""
from __future__ import annotations

import os
import platform
import subprocess


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def own_cpu_s() -> float:
    """CPU seconds used by this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """CPU time other processes take while a benchmark runs (all busy CPU time minus this
    process's own, children included), in cores on average: how noisy the machine was."""

    def __init__(self):
        self.busy0, self.own0 = cpu_ticks()[0], own_cpu_s()

    def cores(self, wall_s: float) -> float:
        busy = (cpu_ticks()[0] - self.busy0) / os.sysconf("SC_CLK_TCK")
        return round(max(0.0, busy - (own_cpu_s() - self.own0)) / wall_s, 3)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_time(s) -> str:
    """Seconds as µs / ms / s for tables; '-' for None."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def git_state(root) -> dict:
    """The commit a benchmark ran at and the tracked files changed since (empty if no git)."""
    git = {}
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True,  # noqa: E731
                                        text=True, timeout=10).stdout
        git["commit"] = run("rev-parse", "HEAD").strip()
        git["dirty_files"] = [s.strip() for s in run("status", "--porcelain", "--untracked-files=no").split("\n")
                              if s.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    return git


def run_meta(device: str) -> dict:
    """What every benchmark's JSON records about the run: when, what command, the
    machine, torch, the nnmark build used (with a hash of its CPU module) and git."""
    import hashlib
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    import torch

    import nnmark

    so = next(Path(nnmark.__file__).parent.glob("_C_cpu*"), None)
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nnmark_version": nnmark.__version__,
        "nnmark_path": str(Path(nnmark.__file__).parent),
        "nnmark_threads": nnmark.get_num_threads(),
        "nnmark_build_info": nnmark.build_info(),
        "nnmark_cpu_so_sha256": hashlib.sha256(so.read_bytes()).hexdigest()[:16] if so else None,
        "git": git_state(Path(__file__).resolve().parent.parent),
        "device": device,
        "loadavg_start": os.getloadavg(),
    }


def read_bytes() -> int:
    """Bytes this process has had fetched from storage (/proc/self/io read_bytes: page
    faults of mapped files included, page-cache hits not)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


# ------------------------------------------------------------------ checkpoint layouts
# The checkpoints bench_scan and bench_st_reader generate: ResNet-50's tensors (the carrier
# one 3x3x256x256 conv) and a small net around a 3x3x64x64 carrier.
LARGE_CARRIER, LARGE_SHAPE = "layer3.0.conv2.weight", (256, 256, 3, 3)
SMALL_CARRIER, SMALL_SHAPE = "layer1.0.conv2.weight", (64, 64, 3, 3)


def resnet50_shapes() -> dict[str, tuple]:
    """Every tensor of torchvision's resnet50() state dict, in its order."""
    shapes: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), 1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def small_shapes() -> dict[str, tuple]:
    return {"conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,), "bn1.bias": (64,), SMALL_CARRIER: SMALL_SHAPE,
            "fc.weight": (10, 64), "fc.bias": (10,)}
