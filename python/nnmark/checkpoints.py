"""Reading tensors from checkpoint files that may be hostile.

A checkpoint under verification is suspect input: safetensors are opened
lazily (only the tensors asked for are read), torch files go through
``torch.load(weights_only=True)`` only, so no arbitrary object is ever
unpickled. Failures raise :class:`CheckpointError` carrying a status for the
verdict: ``corrupt``, ``unsafe``, ``unsupported``, ``io_error`` or ``absent``.
"""
from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .carriers import find_name

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def sniff(path: str | os.PathLike) -> str:
    """Format from the first bytes: ``safetensors``, ``torch-zip``, ``torch-legacy``, ``empty`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        # A plausible header length and a JSON header: safetensors, even if cut short
        # (safetensors itself then reports the damage, and the file is "corrupt").
        if head[8:9] == b"{" and n < (1 << 30):
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    return "unknown"


def _unsafe_globals(message: str) -> list[str]:
    # torch names what weights_only refused, e.g. "Unsupported global: GLOBAL posix.system";
    # pickle records os functions under their implementing module (posix, nt): say os.
    names = re.findall(r"GLOBAL ([\w.]+)", message)
    return sorted({re.sub(r"^(posix|nt)\.", "os.", n) for n in names})


def load_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """All tensors of a torch file (weights_only), or a lazy view of a safetensors file."""
    path = Path(path)
    try:
        fmt = sniff(path)
    except OSError as exc:
        raise CheckpointError("io_error", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if fmt == "empty":
        raise CheckpointError("corrupt", f"{str(path)!r} is empty")
    if fmt == "safetensors":
        return _SafetensorsView(path)
    if fmt == "unknown":
        raise CheckpointError("unsupported", f"{str(path)!r} is neither safetensors nor a torch checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(str(exc))
        if names:
            raise CheckpointError("unsafe", f"{str(path)!r} would import {', '.join(names)} to load; refused "
                                  "(only plain tensors are loaded)") from None
        raise CheckpointError("corrupt", f"{str(path)!r} is not a readable torch checkpoint: {_first_line(exc)}") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise CheckpointError("io_error", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except OSError as exc:  # the file was readable (sniffed): torch's zip reader failed on its contents
        raise CheckpointError("corrupt", f"{str(path)!r} is not a readable torch checkpoint: {exc.strerror or exc}") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, struct.error) as exc:
        raise CheckpointError("corrupt", f"{str(path)!r} is not a readable torch checkpoint: {_first_line(exc)}") from None
    return state_dict_of(obj, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def state_dict_of(obj, path) -> Mapping[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object: itself, or its "state_dict"/"model_state_dict"/"model"."""
    if isinstance(obj, Mapping):
        for k in STATE_DICT_KEYS:  # Lightning .ckpt and common training-script layouts
            inner = obj.get(k)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("unsupported", f"{str(path)!r} holds no state dict of tensors (got {type(obj).__name__})")


class _SafetensorsView(Mapping):
    """Read-only mapping over a safetensors file that reads a tensor only when asked."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._f.keys())
        except OSError as exc:
            raise CheckpointError("io_error", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
        except Exception as exc:  # SafetensorError: bad header, bad offsets
            raise CheckpointError("corrupt", f"{str(path)!r} is not a valid safetensors file: {_first_line(exc)}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        try:
            return self._f.get_tensor(name)
        except Exception as exc:
            raise CheckpointError("corrupt", f"{str(self.path)!r}: tensor {name!r} unreadable: {_first_line(exc)}") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One named tensor of a checkpoint (wrapper prefixes tolerated)."""
    sd = load_state_dict(path)
    try:
        return sd[find_name(sd.keys(), name)]
    except KeyError as exc:
        raise CheckpointError("absent", f"{str(path)!r}: {exc.args[0]}") from None
    except ValueError as exc:
        raise CheckpointError("invalid", f"{str(path)!r}: {exc}") from None
