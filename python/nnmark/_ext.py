"""Loads the compiled modules: _C_cpu always, _C_cuda when it was built.

A build without CUDA imports fine everywhere; a CUDA call on it raises at the
call (see :func:`cuda_module`), never at import.
"""
from __future__ import annotations

import importlib.util
import os
import platform
from typing import Any

from . import _C_cpu  # noqa: F401  (always built)

_CUDA_BUILT = importlib.util.find_spec(f"{__package__}._C_cuda") is not None
_CUDA_IMPORT_ERROR: str | None = None
_C_cuda = None
if _CUDA_BUILT:  # optional: built only when nvcc was found (NNMARK_CUDA=AUTO/ON)
    try:
        from . import _C_cuda  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # built, but its libraries cannot be loaded here
        _CUDA_IMPORT_ERROR = str(exc)
else:
    _CUDA_IMPORT_ERROR = "this build has no CUDA module (nvcc was not found, or NNMARK_CUDA=OFF)"

cpu = _C_cpu


def cuda_module():
    """The CUDA module, or a RuntimeError that says why there is none."""
    if _C_cuda is None:
        raise RuntimeError(
            "nnmark was built without CUDA kernels, so it cannot run on CUDA tensors "
            f"(import said: {_CUDA_IMPORT_ERROR}). Reinstall with NNMARK_CUDA=ON and nvcc on PATH, "
            "or move the tensors to the CPU."
        )
    return _C_cuda


def cuda_built() -> bool:
    return _C_cuda is not None


def build_info() -> dict[str, Any]:
    """What was built: ``cpu``, ``cuda``, the compiler, CUDA archs, threads and SIMD path."""
    info: dict[str, Any] = {
        "version": _version(),
        "cpu": True,
        "cuda": _C_cuda is not None,
        "compiler": _C_cpu.compiler,
        "cpu_isa": _C_cpu.isa(),
        "cpu_isa_detected": _C_cpu.detected_isa(),
        "threads": _C_cpu.get_num_threads(),
        "machine": platform.machine(),
        "cuda_archs": [],
        "cuda_version": None,
        "cuda_devices": 0,
    }
    if _C_cuda is not None:
        info["cuda_archs"] = [a for a in str(getattr(_C_cuda, "archs", "")).split(",") if a]
        info["cuda_version"] = getattr(_C_cuda, "cuda_version", None)
        info["cuda_devices"] = _C_cuda.device_count()
    elif _CUDA_BUILT:
        info["cuda_import_error"] = _CUDA_IMPORT_ERROR
    if os.environ.get("NNMARK_NUM_THREADS"):
        info["threads_from_env"] = True
    return info


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nnmark")
    except Exception:  # running from a source tree
        return "unknown"


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (default: CPUs this process may use, or NNMARK_NUM_THREADS)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads expects an int >= 1, got {n!r}")
    _C_cpu.set_num_threads(n)


def get_num_threads() -> int:
    return _C_cpu.get_num_threads()
