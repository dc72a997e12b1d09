"""torch / numpy / cupy arrays -> what the native modules take: an address, a
dtype code, a device index and a CUDA stream. The extension never sees torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Codes shared with csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)


@dataclass(frozen=True)
class Native:
    ptr: int
    dtype: int
    device: int  # -1 for the CPU
    stream: int  # cudaStream_t as an integer; 0 on the CPU


def as_tensor(x, what: str = "input") -> torch.Tensor:
    """A torch view of a torch tensor, a numpy array or a cupy array (no copy where possible)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)  # cupy and other DLPack producers
    raise TypeError(f"{what} must be a torch tensor, numpy array or cupy array, got {type(x).__name__}")


def native(t: torch.Tensor) -> Native:
    """Address and metadata of a contiguous tensor for a native call."""
    if not t.is_contiguous():
        raise ValueError("internal: native() needs a contiguous tensor")
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"unsupported dtype {t.dtype}; expected one of float32, float64, float16, bfloat16")
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(t.device).cuda_stream
        return Native(t.data_ptr(), code, index, stream)
    if t.device.type != "cpu":
        raise ValueError(f"tensors on {t.device.type} are not supported; use cpu or cuda")
    return Native(t.data_ptr(), code, -1, 0)
