"""Checkpoint formats for scanning: sniffed from magic bytes, read lazily.

A scan must not read whole checkpoints to check one carrier, and must never
run code from them. Per format:

- ``safetensors``: one small read (8-byte length + JSON header, parsed here),
  then ``os.pread`` of exactly the carrier's byte range;
- ``hf-sharded`` (``*.safetensors.index.json`` / ``*.bin.index.json``): the
  index names the one shard that holds the carrier; only that shard is opened;
- ``torch-zip``: ``torch.load(weights_only=True, mmap=True)``: the pickle is
  read, tensors stay mapped and only the carrier's pages are touched;
- ``torch-legacy``: ``torch.load(weights_only=True)`` (this format cannot be mapped).

Lightning ``.ckpt`` files and other training-script layouts (weights under
``state_dict``/``model_state_dict``/``model``) and wrapper prefixes
(``module.``, ``model.``, ``_orig_mod.``) are resolved. Every failure is a
:class:`FormatError` with a ``status`` (the ledger's: ``absent``, ``corrupt``,
``unsafe``, ``unsupported``, ``io_error``, ``invalid``) and an ``error_class``
(the specific reason, a stable CamelCase name: an exception class name where
one applies, e.g. ``PermissionError``, ``UnpicklingError``).

The sha256 a read reports is over the carrier tensor's elements in C order
(little-endian), i.e. the bytes actually read for safetensors; the same
tensor gives the same digest in every format.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .carriers import _strip, find_name
from .checkpoints import CheckpointError, _first_line, _unsafe_globals, state_dict_of

# First read of a file: enough for the header of a small safetensors file in one
# syscall, far below the "header + 64 KiB" a lazy read may cost.
HEAD_BYTES = 8192
# safetensors' own cap on its JSON header.
MAX_HEADER_BYTES = 100 << 20
# Files above this are read without kernel readahead: a cold read then costs the
# header and the carrier, not a readahead window around each.
NO_READAHEAD_BYTES = 4 << 20
_HASH_CHUNK = 1 << 20
_FADVISE = hasattr(os, "posix_fadvise")
# Checked safetensors layouts by their raw header bytes: the thousands of checkpoints
# of one training run share a few headers, so a scan parses and checks each once.
# Headers above _LAYOUT_CACHE_BYTES (rare, and parsing is then not the cost) are not kept.
_LAYOUTS: dict[bytes, tuple[dict, dict, int]] = {}
_LAYOUT_CACHE_SIZE = 256
_LAYOUT_CACHE_BYTES = 1 << 16

# safetensors dtype -> (torch dtype or None when torch lacks it, bytes per element)
_ST_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U64": (getattr(torch, "uint64", None), 8), "U32": (getattr(torch, "uint32", None), 4),
    "U16": (getattr(torch, "uint16", None), 2), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

# Recognised, but not checkpoints nnmark reads: named in the error instead of "unknown".
_OTHER_MAGIC = ((b"\x89HDF\r\n\x1a\n", "HDF5 (Keras .h5)"), (b"GGUF", "GGUF"), (b"\x93NUMPY", "NumPy .npy"),
                (b"\x7fELF", "an ELF executable"))

FORMATS = ("safetensors", "hf-sharded", "torch-zip", "torch-legacy")


class FormatError(CheckpointError):
    """A checkpoint (or one carrier of it) that cannot be checked.

    ``status``: the ledger status; ``error_class``: the specific reason."""

    def __init__(self, status: str, error_class: str, message: str):
        super().__init__(status, message)
        self.error_class = error_class


def _io_error(path: str, exc: OSError) -> FormatError:
    what = "no longer exists" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
    return FormatError("io_error", type(exc).__name__, f"cannot read {path!r}: {what}")


def sniff_head(head: bytes) -> str:
    """Format from a file's first bytes: one of :data:`FORMATS` minus ``hf-sharded``,
    ``json`` (maybe a shard index), ``empty``, or ``unknown``."""
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < MAX_HEADER_BYTES:
        return "safetensors"  # even when cut short: the read then reports the damage
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if head.lstrip()[:1] == b"{":
        return "json"
    return "unknown"


def sniff(path: str | os.PathLike) -> str:
    """Format of a file from its magic bytes: ``safetensors``, ``hf-sharded`` (a shard
    index), ``torch-zip``, ``torch-legacy``, ``empty`` or ``unknown``. Raises OSError."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    fmt = sniff_head(head)
    if fmt == "json":
        try:
            return "hf-sharded" if isinstance(_parse_index(path, head if len(head) < HEAD_BYTES else None), dict) else "unknown"
        except FormatError:
            return "unknown"
    return fmt


class Carrier:
    """A carrier tensor read from a checkpoint: its name there, the tensor, the sha256 of
    its bytes (C order) and how many bytes that is. ``slot``: ``(base, i)`` when it was
    read into row ``i`` of a caller's batch tensor ``base`` (``tensor`` is then ``base[i]``).

    ``sha256`` may be computed on first use, from ``raw`` (the bytes read): a scan then
    hashes a whole batch at once instead of between two reads."""

    __slots__ = ("name", "_tensor", "_sha256", "_raw", "nbytes", "slot")

    def __init__(self, name: str, tensor: torch.Tensor | None, sha256: str | None, nbytes: int,
                 slot: tuple | None = None, raw=None):
        self.name, self._tensor, self._sha256, self.nbytes, self.slot = name, tensor, sha256, nbytes, slot
        self._raw = raw
        if sha256 is None and raw is None:
            raise ValueError("Carrier needs its sha256 or the raw bytes to compute it")

    @property
    def sha256(self) -> str:
        h = self._sha256
        if h is None:
            h = self._sha256 = hashlib.sha256(self._raw).hexdigest()  # releases the GIL while it hashes
            self._raw = None
        return h

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            base, i = self.slot
            self._tensor = base[i]
        return self._tensor

    def __repr__(self) -> str:
        return f"Carrier(name={self.name!r}, nbytes={self.nbytes}, sha256={self.sha256[:12]}...)"


# validate(name, shape, dtype) runs before a carrier's bytes are read; it raises FormatError.
Validator = Callable[[str, tuple, "torch.dtype | None"], None]
# out(shape, dtype) -> None, or (row, base, i): row a writable uint8 buffer of the carrier's
# size that is row i of the batch tensor base [cap, *shape] (read straight into it).
Allocator = Callable[[tuple, torch.dtype], "tuple | None"]


class Checkpoint:
    """A checkpoint opened for scanning. ``size``/``mtime_ns``: its identity (for a sharded
    checkpoint: the index and all shards, summed / latest); ``bytes_read``: so far."""

    format = ""

    def __init__(self, path: str, size: int, mtime_ns: int):
        self.path, self.size, self.mtime_ns = path, size, mtime_ns
        self.bytes_read = 0

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        """The tensor called ``name`` (wrapper prefixes tolerated), its bytes hashed.

        ``validate(name, shape, dtype)`` runs before any tensor byte is read; ``out(shape,
        dtype)`` may give a contiguous tensor to read the bytes into (formats that read
        bytes themselves use it; None: a fresh buffer)."""
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def state_dict(self) -> "HashingStateDict":
        """All tensors, read lazily as asked for (for trigger keys, which run the model)."""
        return HashingStateDict(self)

    def _tensor(self, name: str) -> torch.Tensor:  # an exact name from names()
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _resolve(self, names, name: str) -> str:
        try:
            return find_name(names, name)
        except KeyError as exc:
            raise FormatError("absent", "MissingCarrier", f"{self.path!r}: {exc.args[0]}") from None
        except ValueError as exc:
            raise FormatError("invalid", "AmbiguousCarrier", f"{self.path!r}: {exc}") from None


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's elements in C order (the bytes safetensors stores)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    raw = t.reshape(-1).view(torch.uint8).numpy()
    if sys.byteorder != "little":  # pragma: no cover - safetensors bytes are little-endian
        raw = t.reshape(-1).numpy().byteswap().view("uint8")
    return hashlib.sha256(raw).hexdigest()


class HashingStateDict(Mapping):
    """A lazy, read-only view of a checkpoint's tensors that records a digest of every
    tensor read; ``sha256`` combines them (sorted by name, so access order does not matter)."""

    def __init__(self, ckpt: Checkpoint):
        self._ckpt = ckpt
        self._names = ckpt.names()
        self._set = set(self._names)
        self._digests: dict[str, str] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        t = self._ckpt._tensor(name)
        if name not in self._digests:
            self._digests[name] = tensor_sha256(t)
        return t

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def sha256(self) -> str | None:
        if not self._digests:
            return None
        h = hashlib.sha256()
        # Names without wrapper prefixes: the same weights give the same digest in a
        # Lightning .ckpt ("model.") or a DataParallel file ("module.") as in a plain one.
        for name in sorted(self._digests, key=_strip):
            h.update(_strip(name).encode("utf-8") + b"\0" + self._digests[name].encode("ascii") + b"\n")
        return h.hexdigest()


# ------------------------------------------------------------------ safetensors
class SafetensorsFile(Checkpoint):
    """A safetensors file read with its own header parser and ``os.pread``."""

    format = "safetensors"

    def __init__(self, path: str, st: os.stat_result | None = None, fd: int | None = None, head: bytes | None = None):
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise _io_error(path, exc) from None
        self._fd = fd
        try:
            if st is None:
                st = os.fstat(fd)
            super().__init__(path, st.st_size, st.st_mtime_ns)
            if head is None:
                head = self._pread(min(st.st_size, HEAD_BYTES), 0)
                self.bytes_read += len(head)
            self._parse(head)
        except BaseException:
            self.close()
            raise

    def _pread(self, n: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, n, offset)
        except OSError as exc:
            raise _io_error(self.path, exc) from None

    def _parse(self, head: bytes) -> None:
        size = self.size
        if len(head) < 8:
            raise FormatError("corrupt", "TruncatedFile", f"{self.path!r}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES:
            raise FormatError("corrupt", "BadHeader", f"{self.path!r}: safetensors header length {n} is implausible")
        if 8 + n > size:
            raise FormatError("corrupt", "TruncatedFile", f"{self.path!r}: the safetensors header needs {8 + n} bytes, "
                                                          f"the file has {size} (truncated)")
        raw = head[8:8 + n]
        if len(raw) < n:
            rest = self._pread(8 + n - len(head), len(head))
            self.bytes_read += len(rest)
            raw = head[8:] + rest
            if len(raw) < n:
                raise FormatError("corrupt", "TruncatedFile", f"{self.path!r}: the file ends inside its header")
        layout = _LAYOUTS.get(raw)
        if layout is None:
            try:
                header = json.loads(raw.decode("utf-8"))  # a str skips json's encoding detection
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
                raise FormatError("corrupt", "BadHeader", f"{self.path!r}: the safetensors header is not valid JSON: "
                                                          f"{_first_line(exc)}") from None
            if not isinstance(header, dict):
                raise FormatError("corrupt", "BadHeader", f"{self.path!r}: the safetensors header is not a JSON object")
            header.pop("__metadata__", None)
            layout = self._layout(header)
            if n <= _LAYOUT_CACHE_BYTES:
                if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
                    _LAYOUTS.clear()
                _LAYOUTS[raw] = layout
        self._header, self._entries, described = layout
        self._data_start = 8 + n
        self._head = head  # small files: the carrier may be in it already
        data_bytes = size - 8 - n
        if described > data_bytes:
            raise FormatError("corrupt", "TruncatedFile", f"{self.path!r}: the header describes {described} bytes of "
                                                          f"tensor data, the file holds {data_bytes} (truncated)")
        if described < data_bytes:
            raise FormatError("corrupt", "TrailingBytes", f"{self.path!r}: {data_bytes - described} bytes follow the "
                                                          f"last tensor (safetensors refuses such files)")

    def _layout(self, header: dict) -> tuple[dict, dict, int]:
        """The checks safetensors makes before it loads anything, from the header alone:
        every tensor's span fits its dtype and shape, the spans tile the data exactly
        (the caller compares their end with the file: a file cut short or padded
        anywhere is corrupt, even if the carrier is intact). Returns (header, {name:
        (dtype code, shape, torch dtype, begin, end)}, bytes of tensor data described)."""
        spans = []
        entries = {}
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                itemsize = _ST_DTYPES[entry["dtype"]][1]
                shape = entry["shape"]
                if not (type(begin) is int and type(end) is int and 0 <= begin <= end  # type(): a bool is not a size
                        and all(type(d) is int and d >= 0 for d in shape)):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise FormatError("corrupt", "BadHeader", f"{self.path!r}: tensor {name!r} has a malformed header "
                                                          f"entry {str(entry)[:200]}") from None
            if end - begin != math.prod(shape) * itemsize:
                raise FormatError("corrupt", "BadHeader", f"{self.path!r}: tensor {name!r} spans {end - begin} bytes, "
                                                          f"its shape {list(shape)} x {entry['dtype']} needs "
                                                          f"{math.prod(shape) * itemsize}")
            spans.append((begin, end))
            entries[name] = (entry["dtype"], tuple(shape), _ST_DTYPES[entry["dtype"]][0], begin, end)
        spans.sort()
        pos = 0
        for begin, end in spans:
            if begin != pos:
                raise FormatError("corrupt", "BadHeader", f"{self.path!r}: tensor data overlaps or leaves a gap at "
                                                          f"byte {min(begin, pos)} of the data")
            pos = end
        return header, entries, pos

    def names(self) -> list[str]:
        return list(self._header)

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        real = name if name in self._header else self._resolve(self._header, name)
        return self._read(real, validate, hash_it=True, out=out)

    def _tensor(self, name: str) -> torch.Tensor:
        return self._read(name, None, hash_it=False).tensor

    def _read(self, name: str, validate: Validator | None, hash_it: bool, out: Allocator | None = None) -> Carrier:
        code, shape, dtype, begin, end = self._entries[name]  # checked by _layout
        if validate is not None:
            validate(name, shape, dtype if code in _FLOAT_CODES else None)
        if dtype is None:
            raise FormatError("unsupported", "UnsupportedDtype", f"{self.path!r}: tensor {name!r} has dtype {code}, "
                                                                 f"which this torch cannot hold")
        offset, nbytes = self._data_start + begin, end - begin
        if offset + nbytes > self.size:
            raise FormatError("corrupt", "TruncatedFile", f"{self.path!r}: tensor {name!r} ends at byte "
                                                          f"{offset + nbytes}, the file has {self.size} (truncated)")
        if nbytes:
            dst = out(shape, dtype) if out is not None else None
            if dst is not None:  # straight into the caller's batch: no copy, no fresh pages
                buf = dst[0]
            else:
                buf = bytearray(nbytes)
            mv = memoryview(buf)
            head = self._head
            have = min(len(head), offset + nbytes) - offset if offset < len(head) else 0
            if have > 0:  # the first read already holds the start of it
                mv[:have] = head[offset:offset + have]
            else:
                have = 0
            got = 0
            if have < nbytes:
                try:
                    got = os.preadv(self._fd, [mv[have:]], offset + have)
                except OSError as exc:
                    raise _io_error(self.path, exc) from None
                self.bytes_read += got
            if have + got != nbytes:  # the file shrank after it was measured
                raise FormatError("corrupt", "TruncatedFile", f"{self.path!r}: tensor {name!r}: read {have + got} of "
                                                              f"{nbytes} bytes (the file is shorter than its header says)")
            if dst is not None:  # the caller's batch: hashed when the batch asks for it
                return Carrier(name, None, None if hash_it else "", nbytes, (dst[1], dst[2]), raw=buf)
            t = torch.frombuffer(buf, dtype=dtype).view(shape)
            if sys.byteorder != "little":  # pragma: no cover
                t = torch.from_numpy(t.numpy().byteswap())
        else:
            buf = b""
            t = torch.empty(shape, dtype=dtype)
        digest = hashlib.sha256(buf).hexdigest() if hash_it else ""
        return Carrier(name, t, digest, nbytes)

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


# ------------------------------------------------------------------ torch
def _rchar() -> int | None:
    """Bytes this thread has read through read()-like calls so far (Linux), else None."""
    try:
        with open("/proc/thread-self/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _torch_load(path: str, fmt: str):
    """torch.load(weights_only=True) of a sniffed torch file; mapped when the format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(str(exc))
        if names:
            raise FormatError("unsafe", "UnsafePickle", f"{path!r} would import {', '.join(names)} to load; refused "
                                                        f"(nothing in it was run)") from None
        raise FormatError("corrupt", "UnpicklingError", f"{path!r} is not a readable torch checkpoint: "
                                                        f"{_first_line(exc)}") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise _io_error(path, exc) from None
    except Exception as exc:  # zip reader, truncated pickles, storages of the wrong size
        if fmt == "torch-zip" and _is_foreign_zip(path):
            raise FormatError("unsupported", "NotTorchZip", f"{path!r} is a zip archive but not a torch checkpoint "
                                                            f"(no data.pkl)") from None
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise FormatError("corrupt", type(exc).__name__, f"{path!r} is not a readable torch checkpoint: {msg}") from None


def _is_foreign_zip(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return not any(n.endswith("data.pkl") for n in z.namelist())
    except Exception:  # a damaged zip is corrupt, not foreign
        return False


def _state_dict_of(obj, path: str) -> Mapping[str, torch.Tensor]:
    try:  # the layouts checkpoints.py knows (Lightning .ckpt, training-script dicts)
        return state_dict_of(obj, path)
    except CheckpointError as exc:
        raise FormatError(exc.status, "NoStateDict", str(exc)) from None


class TorchFile(Checkpoint):
    """A torch checkpoint loaded with ``weights_only=True`` (mapped for the zip format)."""

    def __init__(self, path: str, fmt: str, st: os.stat_result):
        super().__init__(path, st.st_size, st.st_mtime_ns)
        self.format = fmt
        before = _rchar() if fmt == "torch-zip" else None
        obj = _torch_load(path, fmt)
        if fmt == "torch-zip":
            after = _rchar()
            # Mapped: the zip directory and pickle went through read(); tensor pages are
            # counted as they are hashed.
            self.bytes_read = (after - before) if before is not None and after is not None else 0
            # torch probes the header more than once; count at most the file
            self.bytes_read = min(self.bytes_read, st.st_size)
        else:
            self.bytes_read = st.st_size  # the legacy format is read whole
        self._sd = _state_dict_of(obj, path)

    def names(self) -> list[str]:
        return [k for k, v in self._sd.items() if isinstance(v, torch.Tensor)]

    def _get(self, name: str) -> torch.Tensor:
        t = self._sd[name]
        if not isinstance(t, torch.Tensor):
            raise FormatError("invalid", "NotATensor", f"{self.path!r}: entry {name!r} is a {type(t).__name__}, not a tensor")
        return t

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        real = name if name in self._sd else self._resolve(self.names(), name)
        t = self._get(real)
        if validate is not None:
            validate(real, tuple(t.shape), t.dtype if t.is_floating_point() else None)
        nbytes = t.numel() * t.element_size()
        digest = tensor_sha256(t)  # touches the mapped pages: this is the read
        if self.format == "torch-zip":
            self.bytes_read = min(self.bytes_read + nbytes, self.size)
        return Carrier(real, t, digest, nbytes)

    def _tensor(self, name: str) -> torch.Tensor:
        t = self._get(name)
        if self.format == "torch-zip":
            self.bytes_read = min(self.bytes_read + t.numel() * t.element_size(), self.size)
        return t

    def close(self) -> None:
        self._sd = {}


# ------------------------------------------------------------------ sharded (Hugging Face)
def _parse_index(path, head: bytes | None = None) -> dict:
    """The weight map {tensor name: shard file name} of a shard index, or FormatError."""
    try:
        raw = head if head is not None else open(path, "rb").read(MAX_HEADER_BYTES)
    except OSError as exc:
        raise _io_error(os.fspath(path), exc) from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError("unsupported", "UnknownFormat", f"{os.fspath(path)!r} is a JSON or text file, "
                                                          f"not a checkpoint") from None
    wm = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(wm, dict):
        raise FormatError("unsupported", "UnknownFormat", f"{os.fspath(path)!r} is a JSON file without a "
                                                          f"'weight_map': not a checkpoint shard index")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError("corrupt", "BadIndex", f"{os.fspath(path)!r}: weight_map must map tensor names to shard files")
    return wm


def index_shards(path: str, raw: bytes | None = None) -> list[str]:
    """The shard files (absolute paths) a shard index names, in first-use order."""
    wm = _parse_index(path, raw)
    base = os.path.dirname(os.path.abspath(path))
    seen: dict[str, None] = {}
    for shard in wm.values():
        seen.setdefault(_shard_path(path, base, shard), None)
    return list(seen)


def _shard_path(index: str, base: str, shard: str) -> str:
    p = os.path.normpath(os.path.join(base, shard))
    # A shard outside the checkpoint's folder is not part of it (and an index must not
    # send the scan to read arbitrary files).
    if os.path.dirname(p) != base or os.path.isabs(shard):
        raise FormatError("corrupt", "BadIndex", f"{index!r}: shard {shard!r} is not a file beside the index")
    return p


class ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded checkpoint: the index, and each shard opened only when it
    holds a tensor that is asked for."""

    format = "hf-sharded"

    def __init__(self, path: str, raw: bytes, st: os.stat_result):
        self._wm = _parse_index(path, raw)
        self._base = os.path.dirname(os.path.abspath(path))
        shards = {}
        for s in self._wm.values():
            shards.setdefault(s, _shard_path(path, self._base, s))
        size, mtime = st.st_size, st.st_mtime_ns
        self._stats: dict[str, os.stat_result] = {}
        for s, p in shards.items():
            try:
                sst = os.stat(p)
            except FileNotFoundError:
                raise FormatError("corrupt", "MissingShard", f"{path!r}: shard {s!r} does not exist") from None
            except OSError as exc:
                raise _io_error(p, exc) from None
            self._stats[s] = sst
            size += sst.st_size
            mtime = max(mtime, sst.st_mtime_ns)
        super().__init__(path, size, mtime)
        self.bytes_read = len(raw)
        self._open: dict[str, Checkpoint] = {}

    def names(self) -> list[str]:
        return list(self._wm)

    def _shard(self, name: str) -> Checkpoint:
        s = self._wm[name]
        ck = self._open.get(s)
        if ck is None:
            p = os.path.join(self._base, s)
            ck = open_file(p, self._stats[s])
            if isinstance(ck, ShardedCheckpoint):
                ck.close()
                raise FormatError("corrupt", "BadIndex", f"{self.path!r}: shard {s!r} is itself an index")
            self._open[s] = ck
            self.bytes_read += ck.bytes_read
        return ck

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        real = name if name in self._wm else self._resolve(self._wm, name)
        ck = self._shard(real)
        before = ck.bytes_read
        try:
            return ck.carrier(real, validate, out)
        except FormatError as exc:
            if exc.status == "absent":  # the index names a tensor its shard lacks
                raise FormatError("corrupt", "BadIndex", f"{self.path!r}: the index puts {real!r} in "
                                                         f"{self._wm[real]!r}, which lacks it") from None
            raise
        finally:
            self.bytes_read += ck.bytes_read - before

    def _tensor(self, name: str) -> torch.Tensor:
        ck = self._shard(name)
        before = ck.bytes_read
        try:
            return ck._tensor(name)
        finally:
            self.bytes_read += ck.bytes_read - before

    def close(self) -> None:
        for ck in self._open.values():
            ck.close()
        self._open = {}


# ------------------------------------------------------------------ entry points
def open_file(path: str, st: os.stat_result | None = None) -> Checkpoint:
    """Opens a checkpoint file of any supported format (sniffed from its first bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _io_error(path, exc) from None
    handed_over = False
    try:
        try:
            if st is None:
                st = os.fstat(fd)
            if st.st_size > NO_READAHEAD_BYTES and _FADVISE:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            head = os.pread(fd, min(st.st_size, HEAD_BYTES), 0)
        except OSError as exc:
            raise _io_error(path, exc) from None
        fmt = sniff_head(head)
        if fmt == "safetensors":
            handed_over = True  # the file object owns fd now, and closes it on failure
            ck = SafetensorsFile(path, st, fd, head)
            ck.bytes_read += len(head)
            return ck
        if fmt == "empty":
            raise FormatError("corrupt", "EmptyFile", f"{path!r} is empty")
        if fmt in ("torch-zip", "torch-legacy"):
            return TorchFile(path, fmt, st)
        if fmt == "json":
            raw = head if len(head) == st.st_size else head + _read_rest(fd, path, len(head), st.st_size)
            return ShardedCheckpoint(path, raw, st)
        for magic, what in _OTHER_MAGIC:
            if head.startswith(magic):
                raise FormatError("unsupported", "UnsupportedFormat", f"{path!r} is {what}, not a checkpoint "
                                                                      f"nnmark reads (safetensors or torch)")
        raise FormatError("unsupported", "UnknownFormat", f"{path!r} is neither safetensors nor a torch checkpoint")
    finally:
        if not handed_over:
            os.close(fd)


def _read_rest(fd: int, path: str, start: int, size: int) -> bytes:
    if size > MAX_HEADER_BYTES:
        raise FormatError("unsupported", "UnknownFormat", f"{path!r} is a {size}-byte JSON or text file, not a checkpoint")
    try:
        return os.pread(fd, size - start, start)
    except OSError as exc:
        raise _io_error(path, exc) from None


def read_carrier(path: str | os.PathLike, name: str, validate: Validator | None = None) -> Carrier:
    """One carrier of a checkpoint file (any format), read lazily and hashed."""
    with open_file(os.fspath(path)) as ck:
        return ck.carrier(name, validate)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a whole file (reads all of it)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


__all__ = ["FORMATS", "FormatError", "Carrier", "Checkpoint", "SafetensorsFile", "TorchFile", "ShardedCheckpoint",
           "HashingStateDict", "sniff", "sniff_head", "open_file", "read_carrier", "index_shards", "tensor_sha256",
           "file_sha256"]
