"""The data the training attacks take: an ``(x, y)`` pair of tensors (or arrays), or
any iterable of ``(x, y)`` batches such as a ``torch.utils.data.DataLoader``."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


def _tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    raise TypeError(f"{what} must be a torch tensor or numpy array, got {type(v).__name__}")


def is_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in data)


def check_pair(data: Any, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(x, y)`` as tensors, checking they are the same length and non-empty."""
    x, y = _tensor(data[0], f"{what}[0] (inputs)"), _tensor(data[1], f"{what}[1] (labels)")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{what} is empty")
    return x, y.long() if not y.is_floating_point() else y


def batches(data: Any, batch_size: int = 64, shuffle: bool = False, generator: torch.Generator | None = None,
            device: Any = None, what: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields ``(x, y)`` batches on ``device`` from an ``(x, y)`` pair (shuffled with
    ``generator`` when asked) or from an iterable of batches (taken as it comes)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if is_pair(data):
        x, y = check_pair(data, what)
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx].to(device), y[idx].to(device)
        return
    if data is None or isinstance(data, (str, bytes, torch.Tensor, np.ndarray)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{what} must be an (x, y) pair of tensors or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}")
    n = 0
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"{what}: each batch must be an (x, y) pair, got {type(item).__name__}")
        x, y = _tensor(item[0], f"{what} batch inputs"), _tensor(item[1], f"{what} batch labels")
        n += 1
        yield x.to(device), y.to(device)
    if n == 0:
        raise ValueError(f"{what} yielded no batches")


def collect_inputs(data: Any, limit: int | None = None, what: str = "data") -> torch.Tensor:
    """The inputs of ``data`` as one tensor (on the CPU, or where the data is): ``data`` is
    inputs alone (a tensor or array ``[m, ...]``), an ``(x, y)`` pair (``y`` is not read)
    or an iterable of batches, each ``x`` or ``(x, y, ...)``. An iterable is read only
    until ``limit`` inputs are in hand (None: to its end); the result is at most ``limit``
    long."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = _tensor(data, what)
        if x.dim() == 0:
            raise ValueError(f"{what} must be inputs [m, ...], got a scalar")
    elif is_pair(data):
        x = _tensor(data[0], f"{what}[0] (inputs)")
    elif data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{what} must be inputs (a tensor [m, ...]), an (x, y) pair or an iterable of batches, "
                        f"got {type(data).__name__}")
    else:
        parts, n = [], 0
        for item in data:
            xb = item[0] if isinstance(item, (tuple, list)) and item else item
            xb = _tensor(xb, f"{what} batch inputs")
            if xb.dim() == 0:
                raise ValueError(f"{what}: a batch of inputs must be [b, ...], got a scalar")
            if parts and xb.shape[1:] != parts[0].shape[1:]:
                raise ValueError(f"{what}: batches of inputs {list(parts[0].shape[1:])} and {list(xb.shape[1:])} "
                                 "per sample differ")
            parts.append(xb)
            n += len(xb)
            if limit is not None and n >= limit:
                break
        if not parts:
            raise ValueError(f"{what} yielded no batches")
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
    if len(x) == 0:
        raise ValueError(f"{what} holds no inputs")
    return x if limit is None else x[:limit]
