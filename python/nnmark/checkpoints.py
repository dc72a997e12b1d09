"""The one checkpoint reader: every front door (verify, extract, calibrate, scan
local and on Ray, the robustness report, the CLI) opens its sources here.

:func:`open_checkpoint` takes a path, an ``nn.Module``, a state dict or a bare
tensor and returns a :class:`Checkpoint`: ``carrier(name)`` gives one tensor by
name (wrapper prefixes tolerated) with the sha256 of its bytes, ``state_dict()``
the tensors a model needs, read lazily. Every failure is a
:class:`CheckpointError` with a ``status`` (``absent``, ``corrupt``, ``unsafe``,
``unsupported``, ``io_error``, ``invalid``), an ``error_class`` (the specific
reason, a stable CamelCase name such as ``TruncatedFile`` or ``UnsafePickle``)
and a message naming the file.

A checkpoint under verification is suspect input, and a scan must not read whole
files to check one carrier. Files are sniffed from their first bytes, never their
names, and opened without blocking (a FIFO or a device is refused, not waited on):

- ``safetensors``: one small read (8-byte length + JSON header, parsed and checked
  here as strictly as the safetensors library does), then ``os.pread`` of exactly the
  bytes of the tensors asked for;
- ``hf-sharded`` (``*.safetensors.index.json`` / ``*.bin.index.json``): the index
  names the one shard that holds a tensor; only that shard is opened;
- ``torch-zip``: ``torch.load(weights_only=True, mmap=True)``: the pickle is read,
  tensors stay mapped and only the pages of the tensors used are touched;
- ``torch-legacy``: ``torch.load(weights_only=True)`` (this format cannot be mapped).

Nothing in a file is ever executed: a pickle asking for other globals is refused as
``unsafe``, naming them. Lightning ``.ckpt`` files and other training-script layouts
(weights under ``state_dict``/``model_state_dict``/``model``) and wrapper prefixes
(``module.``, ``model.``, ``_orig_mod.``) are resolved, for files and for state dicts
in memory alike.

The sha256 a carrier reports is over its elements in C order (little-endian), i.e.
the bytes a safetensors file stores; the same tensor gives the same digest in every
format and in memory.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import stat
import struct
import sys
import zipfile
from collections.abc import Callable, Mapping

import torch

from . import _ext
from .carriers import find_name, module_tensor, strip_prefixes
from .stats import STATUSES

# First read of a file: enough for the header of a small safetensors file in one
# syscall, far below the "header + 64 KiB" a lazy read may cost.
HEAD_BYTES = 8192
# safetensors' own cap on its JSON header (the library refuses longer ones): beyond it a
# file is corrupt.
MAX_HEADER_BYTES = 100_000_000
# nnmark's own, lower caps (issue 13: memory per file must stay bounded; parsed JSON takes up
# to ~26x its bytes, a header entry ~1 kB while it is checked). Real single-file headers hold
# a few thousand tensors in a few hundred kB (SDXL: ~2,500 tensors, ~200 kB; Flux: ~780);
# even all of DeepSeek-V3 (~92,000 tensors with its FP8 scales, ~14 MB of header, shipped as
# 163 shards of ~560 each) would fit two of these caps. Beyond either: unsupported/HeaderTooLarge.
HEADER_LIMIT_BYTES = 16 << 20
MAX_HEADER_ENTRIES = 200_000
# A shard index is a small JSON file; anything far larger is not one.
MAX_INDEX_BYTES = 100 << 20
# Files above this are read without kernel readahead: a cold read then costs the
# header and the carrier, not a readahead window around each.
NO_READAHEAD_BYTES = 4 << 20
HASH_CHUNK = 1 << 20
# A torch zip's pickle (data.pkl) takes up to ~80x its bytes once unpickled (a pickle of empty
# lists); real ones hold ~130 bytes per tensor (~350 with Adam's state): 16 MiB is ~125,000
# tensors. Its size is the directory's (uncompressed: a deflated pickle of a few kB can
# declare gigabytes). Members: one per storage plus ~6; 250,000 is far beyond real files.
MAX_PICKLE_BYTES = 16 << 20
MAX_ZIP_MEMBERS = 250_000
# A legacy torch file has no directory that sizes its pickle: its opcodes are counted before
# it is loaded (~31 per tensor; a pickle of empty lists builds an object per opcode).
MAX_PICKLE_OPS = 4_000_000
_FADVISE = hasattr(os, "posix_fadvise")
# Checked safetensors layouts by their raw header bytes: the thousands of checkpoints
# of one training run share a few headers, so a scan parses and checks each once.
# Headers above _LAYOUT_CACHE_BYTES (rare, and parsing is then not the cost) are not kept.
_LAYOUTS: dict[bytes, tuple[dict, int]] = {}
_LAYOUT_CACHE_SIZE = 256
_LAYOUT_CACHE_BYTES = 1 << 16

# safetensors dtype -> (torch dtype or None when torch lacks it, bits per element): every
# dtype the safetensors library (0.8) reads, so that no valid file is refused here.
_ST_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 64), "F32": (torch.float32, 32), "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16), "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8), "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8), "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F6_E2M3": (None, 6), "F6_E3M2": (None, 6), "F4": (None, 4),
    "C64": (torch.complex64, 64),
    "I64": (torch.int64, 64), "I32": (torch.int32, 32), "I16": (torch.int16, 16), "I8": (torch.int8, 8),
    "U64": (getattr(torch, "uint64", None), 64), "U32": (getattr(torch, "uint32", None), 32),
    "U16": (getattr(torch, "uint16", None), 16), "U8": (torch.uint8, 8), "BOOL": (torch.bool, 8),
}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0",
                "F6_E2M3", "F6_E3M2", "F4")

# Recognised, but not checkpoints nnmark reads: named in the error instead of "unknown".
_OTHER_MAGIC = ((b"\x89HDF\r\n\x1a\n", "HDF5 (Keras .h5)"), (b"GGUF", "GGUF"), (b"\x93NUMPY", "NumPy .npy"),
                (b"\x7fELF", "an ELF executable"))

FORMATS = ("safetensors", "hf-sharded", "torch-zip", "torch-legacy")
# The safetensors __metadata__ entry that holds a stamped ownership commitment
# (nnmark.claims.stamp; docs/spec.md §8.3).
STAMP_KEY = "nnmark.commitment"
# What in-memory sources report as their format.
MEMORY_FORMATS = ("module", "state_dict", "tensor")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _JSONObject(dict):
    """A parsed JSON object that remembers which names it had more than once (the last
    one wins, as in the safetensors library, which refuses only repeated structure)."""

    repeated: frozenset = frozenset()


def _object(pairs: list) -> dict:
    d = _JSONObject(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        d.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return d


# Names the safetensors library refuses to see twice: its header's and its entries' fields.
_STRUCTURE = frozenset(("__metadata__", "dtype", "shape", "data_offsets"))


class CheckpointError(Exception):
    """A checkpoint (or one tensor of it) that cannot be checked.

    ``status``: the verdict's status (never ``ok``); ``error_class``: the specific
    reason, a stable CamelCase name; the message names the file and what was wrong."""

    def __init__(self, status: str, error_class: str, message: str):
        if status not in STATUSES or status == "ok":
            raise ValueError(f"CheckpointError needs a non-ok status from {STATUSES}, got {status!r}")
        super().__init__(message)
        self.status = status
        self.error_class = error_class

    @property
    def message(self) -> str:
        return str(self)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its class name."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def error_of(exc: BaseException, path: str | None = None) -> CheckpointError:
    """Any exception raised while reading one source, as that source's CheckpointError.

    Bad input is the source's problem, never the caller's: OSErrors are ``io_error``,
    anything unexpected is ``corrupt``, with its class name as the error class."""
    if isinstance(exc, CheckpointError):
        return exc
    where = f"{path!r}: " if path else ""
    if isinstance(exc, FileNotFoundError):
        return CheckpointError("io_error", "FileNotFoundError", f"cannot read {where}no such file (or it vanished)")
    if isinstance(exc, OSError):
        return CheckpointError("io_error", type(exc).__name__, f"cannot read {where}{exc.strerror or exc}")
    if isinstance(exc, MemoryError):
        return CheckpointError("invalid", "MemoryError", f"{where}too large to load into memory")
    return CheckpointError("corrupt", type(exc).__name__, f"{where}unexpected error reading it: {first_line(exc)}")


def _io_error(path: str, exc: OSError) -> CheckpointError:
    what = "no longer exists" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
    return CheckpointError("io_error", type(exc).__name__, f"cannot read {path!r}: {what}")


def _unsafe_globals(message: str) -> list[str]:
    # torch names what weights_only refused, e.g. "Unsupported global: GLOBAL posix.system";
    # pickle records os functions under their implementing module (posix, nt): say os.
    names = re.findall(r"GLOBAL ([\w.]+)", message)
    return sorted({re.sub(r"^(posix|nt)\.", "os.", n) for n in names})


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its fstat, or CheckpointError. Opened
    without blocking (a FIFO would wait for a writer forever) and refused unless it is
    a regular file (a device never ends), checked on the descriptor itself, so a file
    swapped between a stat and the open cannot slip through."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _io_error(path, exc) from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _io_error(path, exc) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError("io_error", "IsADirectoryError", f"cannot read {path!r}: it is a directory")
        raise CheckpointError("unsupported", "NotARegularFile", f"{path!r} is not a regular file")
    return fd, st


def sniff_head(head: bytes) -> str:
    """Format from a file's first bytes: ``safetensors``, ``torch-zip``, ``torch-legacy``,
    ``json`` (maybe a shard index), ``empty``, or ``unknown``."""
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:].lstrip(b" \t\r\n")[:1] == b"{" and \
            struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES:
        return "safetensors"  # even when cut short: the read then reports the damage
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if head.lstrip()[:1] == b"{":
        return "json"
    return "unknown"


def sniff(path: str | os.PathLike) -> str:
    """Format of a file from its magic bytes: ``safetensors``, ``hf-sharded`` (a shard
    index), ``torch-zip``, ``torch-legacy``, ``empty`` or ``unknown``. Raises CheckpointError
    when the file cannot be read (``io_error``) or is not a regular file."""
    path = os.fspath(path)
    fd, st = open_regular(path)
    try:
        head = os.pread(fd, min(st.st_size, HEAD_BYTES), 0)
        fmt = sniff_head(head)
        if fmt != "json":
            return fmt
        raw = head if len(head) == st.st_size else head + _read_rest(fd, path, len(head), st.st_size)
    except OSError as exc:
        raise _io_error(path, exc) from None
    except CheckpointError:
        return "unknown"
    finally:
        os.close(fd)
    try:
        _parse_index(path, raw)
        return "hf-sharded"
    except CheckpointError:
        return "unknown"


class Carrier:
    """A tensor read from a checkpoint: its name there, the tensor, the sha256 of its
    bytes (C order) and how many bytes that is. ``slot``: ``(base, i)`` when it was
    read into row ``i`` of a caller's batch tensor ``base`` (``tensor`` is then ``base[i]``).

    ``sha256`` may be computed on first use, from ``raw`` (the bytes read, or the tensor
    itself for a source in memory): a scan then hashes a whole batch at once instead of
    between two reads, and ``extract`` never hashes at all."""

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
            raw = self._raw
            # (hashlib releases the GIL while it hashes)
            h = self._sha256 = tensor_sha256(raw) if isinstance(raw, torch.Tensor) else hashlib.sha256(raw).hexdigest()
            self._raw = None
        return h

    @staticmethod
    def hash_all(carriers) -> None:
        """Computes the pending sha256 of many carriers (a scan batch's) in one native call:
        same-length carriers hashed side by side, the GIL let go once for all of them."""
        todo = [c for c in carriers if c._sha256 is None and not isinstance(c._raw, torch.Tensor)]
        if len(todo) > 1:
            for c, h in zip(todo, _ext.cpu.sha256_hex_many([c._raw for c in todo])):
                c._sha256, c._raw = h, None

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            base, i = self.slot
            self._tensor = base[i]
        return self._tensor

    def __repr__(self) -> str:
        return f"Carrier(name={self.name!r}, nbytes={self.nbytes}, sha256={self.sha256[:12]}...)"


# validate(name, shape, dtype) runs before a carrier's bytes are read; it raises CheckpointError.
# dtype is None for a tensor that is not floating point.
Validator = Callable[[str, tuple, "torch.dtype | None"], None]
# out(shape, dtype) -> None, or (row, base, i): row a writable uint8 buffer of the carrier's
# size that is row i of the batch tensor base [cap, *shape] (read straight into it).
Allocator = Callable[[tuple, torch.dtype], "tuple | None"]


def identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, inode, ctime_ns) of a file's stat: what a re-scan compares. The
    inode as a signed 64-bit integer (what SQLite holds), however the file system numbers it."""
    ino = st.st_ino
    return st.st_size, st.st_mtime_ns, ino - (1 << 64) if ino >= 1 << 63 else ino, st.st_ctime_ns


class Checkpoint:
    """An opened source. ``path``: the file, or a label such as ``<module>`` for a source
    in memory; ``format``: one of :data:`FORMATS` or :data:`MEMORY_FORMATS`;
    ``size``/``mtime_ns``/``inode``/``ctime_ns``: a file's identity, from the descriptor's
    fstat (for a sharded checkpoint: the index and all shards, summed / latest / the index's /
    latest; None in memory); ``bytes_read``: so far."""

    format = ""
    module: torch.nn.Module | None = None  # a model that runs itself (trigger keys)
    # The text of a stamped commitment (a single safetensors file's __metadata__[STAMP_KEY]),
    # as the file holds it: parsed and checked by nnmark.commitments, never trusted here.
    stamp: str | None = None

    def __init__(self, path: str, size: int | None, mtime_ns: int | None, inode: int | None = None,
                 ctime_ns: int | None = None):
        self.path, self.size, self.mtime_ns, self.inode, self.ctime_ns = path, size, mtime_ns, inode, ctime_ns
        self.bytes_read = 0

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        """The tensor called ``name`` (wrapper prefixes tolerated), its bytes hashed.

        ``validate(name, shape, dtype)`` runs before any tensor byte is read; ``out(shape,
        dtype)`` may give a contiguous tensor to read the bytes into (formats that read
        bytes themselves use it; None: a fresh buffer)."""
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor of an exact name from :meth:`names`."""
        raise NotImplementedError

    def state_dict(self) -> "HashingStateDict":
        """All tensors, read lazily as asked for (for trigger keys, which run the model)."""
        return HashingStateDict(self)

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
            raise CheckpointError("absent", "MissingCarrier", f"{self.path!r}: {exc.args[0]}") from None
        except ValueError as exc:
            raise CheckpointError("invalid", "AmbiguousCarrier", f"{self.path!r}: {exc}") from None


def check_tensor(path: str, name: str, t) -> torch.Tensor:
    """``t`` if it is a plain tensor with data (not a list, a meta or a sparse tensor), else
    CheckpointError(invalid)."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError("invalid", "NotATensor", f"{path!r}: entry {name!r} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise CheckpointError("invalid", "UnsupportedTensor", f"{path!r}: tensor {name!r} has layout {t.layout} "
                                                              f"(only dense tensors carry weights)")
    if t.is_meta:
        raise CheckpointError("invalid", "UnsupportedTensor", f"{path!r}: tensor {name!r} is on the meta device "
                                                              f"(it has no data)")
    if t.numel() and t.untyped_storage().nbytes() < t.numel() * t.element_size():
        # A view that repeats its storage (zero strides): a few bytes on disk that would
        # take gigabytes once copied. Weights never look like this.
        raise CheckpointError("invalid", "ExpandedTensor", f"{path!r}: tensor {name!r} has {t.numel()} elements "
                                                           f"over {t.untyped_storage().nbytes()} bytes of storage "
                                                           f"(a repeating view, not weights)")
    return t


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's elements in C order (the bytes safetensors stores)."""
    t = t.detach()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    t = t.cpu().contiguous()
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
        t = self._ckpt.tensor(name)
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
        for name in sorted(self._digests, key=strip_prefixes):
            h.update(strip_prefixes(name).encode("utf-8") + b"\0" + self._digests[name].encode("ascii") + b"\n")
        return h.hexdigest()


def state_dict_of(obj, path) -> Mapping[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object: itself, or its "state_dict"/"model_state_dict"/"model"."""
    if isinstance(obj, Mapping):
        for k in STATE_DICT_KEYS:  # Lightning .ckpt and common training-script layouts
            inner = obj.get(k)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("unsupported", "NoStateDict", f"{str(path)!r} holds no state dict of tensors "
                                                        f"(got {type(obj).__name__})")


# ------------------------------------------------------------------ safetensors
class SafetensorsFile(Checkpoint):
    """A safetensors file read with its own header parser and ``os.pread``."""

    format = "safetensors"

    def __init__(self, path: str, st: os.stat_result | None = None, fd: int | None = None, head: bytes | None = None):
        if fd is None:
            fd, st = open_regular(path)
        self._fd = fd
        try:
            if st is None:
                st = os.fstat(fd)
            super().__init__(path, *identity_of(st))
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
            raise CheckpointError("corrupt", "TruncatedFile", f"{self.path!r}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES:
            raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: safetensors header length {n} is implausible")
        if 8 + n > size:
            raise CheckpointError("corrupt", "TruncatedFile", f"{self.path!r}: the safetensors header needs {8 + n} bytes, "
                                                          f"the file has {size} (truncated)")
        if n > HEADER_LIMIT_BYTES:
            raise CheckpointError("unsupported", "HeaderTooLarge", f"{self.path!r}: its safetensors header is {n} bytes, "
                                                                   f"over nnmark's limit of {HEADER_LIMIT_BYTES} "
                                                                   f"(real checkpoints' headers are at most a few MB)")
        raw = head[8:8 + n]
        if len(raw) < n:
            rest = self._pread(8 + n - len(head), len(head))
            self.bytes_read += len(rest)
            raw = head[8:] + rest
            if len(raw) < n:
                raise CheckpointError("corrupt", "TruncatedFile", f"{self.path!r}: the file ends inside its header")
        layout = _LAYOUTS.get(raw)
        if layout is None:
            try:
                # As strict as the safetensors library: no NaN/Infinity, no repeated structure
                # (a second __metadata__, dtype...). A str skips json's encoding detection.
                header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_object)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: the safetensors header is not valid "
                                                              f"JSON: {first_line(exc)}") from None
            if not isinstance(header, dict):
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: the safetensors header is not a JSON "
                                                              f"object")
            if "__metadata__" in getattr(header, "repeated", ()):
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: the safetensors header has two "
                                                              f"__metadata__")
            meta = header.pop("__metadata__", None)
            if len(header) > MAX_HEADER_ENTRIES:
                raise CheckpointError("unsupported", "HeaderTooLarge", f"{self.path!r}: its safetensors header has "
                                                                       f"{len(header)} entries, over nnmark's limit of "
                                                                       f"{MAX_HEADER_ENTRIES} tensors per file")
            if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: the safetensors __metadata__ must map "
                                                              f"names to strings")
            entries, described = self._layout(header)
            layout = entries, described, meta.get(STAMP_KEY) if meta else None
            if n <= _LAYOUT_CACHE_BYTES:
                if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
                    _LAYOUTS.clear()
                _LAYOUTS[raw] = layout
        self._entries, described, self.stamp = layout
        self._data_start = 8 + n
        self._head = head  # small files: the carrier may be in it already
        data_bytes = size - 8 - n
        if described > data_bytes:
            raise CheckpointError("corrupt", "TruncatedFile", f"{self.path!r}: the header describes {described} bytes of "
                                                          f"tensor data, the file holds {data_bytes} (truncated)")
        if described < data_bytes:
            raise CheckpointError("corrupt", "TrailingBytes", f"{self.path!r}: {data_bytes - described} bytes follow the "
                                                          f"last tensor (safetensors refuses such files)")

    def _layout(self, header: dict) -> tuple[dict, int]:
        """The checks safetensors makes before it loads anything, from the header alone:
        every tensor's span fits its dtype and shape, the spans tile the data exactly
        (the caller compares their end with the file: a file cut short or padded
        anywhere is corrupt, even if the carrier is intact). Returns ({name: (dtype code,
        shape, torch dtype, begin, end)}, bytes of tensor data described): the parsed header
        itself is dropped (its dicts cost several times these tuples)."""
        spans = []
        entries = {}
        for name, entry in header.items():
            try:
                name.encode("utf-8")  # a lone surrogate ("\ud800") is no tensor name
                if getattr(entry, "repeated", None) and entry.repeated & _STRUCTURE:
                    raise ValueError
                begin, end = entry["data_offsets"]
                bits = _ST_DTYPES[entry["dtype"]][1]
                shape = entry["shape"]
                if not (type(begin) is int and type(end) is int and 0 <= begin <= end  # type(): a bool is not a size
                        and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                    raise ValueError
                count = math.prod(shape)
                if count >= 1 << 63 or count * bits % 8:  # sub-byte dtypes fill whole bytes
                    raise ValueError
            except (KeyError, TypeError, ValueError, UnicodeEncodeError):
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: tensor {name!r} has a malformed header "
                                                              f"entry {str(entry)[:200]}") from None
            if end - begin != count * bits // 8:
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: tensor {name!r} spans {end - begin} "
                                                              f"bytes, its shape {list(shape)} x {entry['dtype']} needs "
                                                              f"{count * bits // 8}")
            spans.append((begin, end))
            entries[name] = (entry["dtype"], tuple(shape), _ST_DTYPES[entry["dtype"]][0], begin, end)
        spans.sort()
        pos = 0
        for begin, end in spans:
            if begin != pos:
                raise CheckpointError("corrupt", "BadHeader", f"{self.path!r}: tensor data overlaps or leaves a gap at "
                                                          f"byte {min(begin, pos)} of the data")
            pos = end
        return entries, pos

    def names(self) -> list[str]:
        return list(self._entries)

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        real = name if name in self._entries else self._resolve(self._entries, name)
        return self._read(real, validate, hash_it=True, out=out)

    def tensor(self, name: str) -> torch.Tensor:
        return self._read(name, None, hash_it=False).tensor

    def _read(self, name: str, validate: Validator | None, hash_it: bool, out: Allocator | None = None) -> Carrier:
        code, shape, dtype, begin, end = self._entries[name]  # checked by _layout
        if validate is not None:
            validate(name, shape, dtype if code in _FLOAT_CODES else None)
        if dtype is None:
            raise CheckpointError("unsupported", "UnsupportedDtype", f"{self.path!r}: tensor {name!r} has dtype {code}, "
                                                                 f"which this torch cannot hold")
        offset, nbytes = self._data_start + begin, end - begin
        if offset + nbytes > self.size:
            raise CheckpointError("corrupt", "TruncatedFile", f"{self.path!r}: tensor {name!r} ends at byte "
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
                raise CheckpointError("corrupt", "TruncatedFile", f"{self.path!r}: tensor {name!r}: read {have + got} of "
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

    def __del__(self):  # a view dropped without close() must not leak its descriptor
        self.close()


# ------------------------------------------------------------------ torch
def _fd_path(fd: int, path: str) -> str:
    """A name for the file open as ``fd`` that torch can open again (and map): the
    descriptor's own, so the file checked is the file loaded, whatever happens to
    ``path`` meanwhile; ``path`` where the system has no /proc/self/fd."""
    p = f"/proc/self/fd/{fd}"
    return p if os.path.exists(p) else path


def _torch_load(path: str, fd: int, fmt: str, members: dict[str, tuple[int, int]] | None = None,
                imports: list[str] | None = None):
    """torch.load(weights_only=True) of a sniffed torch file; mapped when the format allows.
    ``members``: the zip's, from :func:`_zip_members` (None: a damaged or legacy file);
    ``imports``: a legacy file's globals, from :func:`_check_legacy`."""
    try:
        return torch.load(_fd_path(fd, path), map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(str(exc)) or _refused_imports(imports or [])
        if names:
            raise CheckpointError("unsafe", "UnsafePickle", f"{path!r} would import {', '.join(names)} to load; "
                                                            f"refused (nothing in it was run)") from None
        raise CheckpointError("corrupt", "UnpicklingError", f"{path!r} is not a readable torch checkpoint: "
                                                            f"{_weights_only_reason(exc)}") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise _io_error(path, exc) from None
    except Exception as exc:  # zip reader, truncated pickles, storages of the wrong size
        if members is not None and not any(n.endswith("data.pkl") for n in members):
            raise CheckpointError("unsupported", "NotTorchZip", f"{path!r} is a zip archive but not a torch "
                                                                f"checkpoint (no data.pkl)") from None
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise CheckpointError("corrupt", type(exc).__name__, f"{path!r} is not a readable torch checkpoint: "
                                                             f"{msg}") from None


def _check_legacy(path: str, fd: int) -> list[str]:
    """Walks the opcodes of a legacy torch file's pickles (magic, protocol, system info, the
    objects) without running any: refuses one of more than MAX_PICKLE_OPS, and returns the
    globals they would import ("module.name"), so a refusal can name them."""
    import pickletools

    ops, imports, strings = 0, [], []
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            for _ in range(4):
                for op, arg, _pos in pickletools.genops(f):
                    ops += 1
                    if ops > MAX_PICKLE_OPS:
                        raise CheckpointError("unsupported", "PickleTooLarge", f"{path!r}: its pickle has more than "
                                                                               f"{MAX_PICKLE_OPS} opcodes, over "
                                                                               f"nnmark's limit")
                    if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        imports.append(arg.replace(" ", ".", 1))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # module, name: the last two strings
                        imports.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str) and "UNICODE" in op.name:
                        strings = (strings + [arg])[-2:]
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001 - damage: torch.load says what it is
            pass
    return imports


def _refused_imports(imports: list[str]) -> list[str]:
    """The globals among ``imports`` that torch's weights-only loader does not allow."""
    try:
        from torch import _weights_only_unpickler as wo

        allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except Exception:  # noqa: BLE001 - a torch without these: torch's own message is all we have
        return []
    return sorted({re.sub(r"^(posix|nt)\.", "os.", n) for n in imports if n not in allowed})


def _weights_only_reason(exc: BaseException) -> str:
    """What torch's weights-only loader refused, without its advice to load unsafely."""
    text = str(exc)
    i = text.find("WeightsUnpickler error:")
    if i >= 0:
        rest = [ln.strip() for ln in text[i + len("WeightsUnpickler error:"):].splitlines() if ln.strip()]
        if rest:
            return f"the weights-only loader refused it: {rest[0][:300]}"
    return first_line(exc)


def _zip_entries(fd: int, size: int) -> int | None:
    """How many members the zip open as ``fd`` declares in its end record (read from the
    file's last 64 kB, before any directory is loaded); None if there is none."""
    tail_len = min(size, 65_557)  # end record (22) + the longest comment
    try:
        tail = os.pread(fd, tail_len, size - tail_len)
    except OSError:
        return None
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or i + 22 > len(tail):
        return None
    count = struct.unpack_from("<H", tail, i + 10)[0]
    if count == 0xFFFF and i >= 20 and tail[i - 20:i - 16] == b"PK\x06\x07":  # zip64: its own end record
        (off,) = struct.unpack_from("<Q", tail, i - 12)
        try:
            rec = os.pread(fd, 40, off)
        except OSError:
            return None
        if len(rec) == 40 and rec[:4] == b"PK\x06\x06":
            count = struct.unpack_from("<Q", rec, 32)[0]
    return count


def _zip_members(fd: int) -> dict[str, tuple[int, int]] | None:
    """{member name: (stored bytes, uncompressed bytes)} of the zip archive open as ``fd``;
    None if it is damaged."""
    try:
        with zipfile.ZipFile(os.fdopen(os.dup(fd), "rb")) as z:
            return {i.filename: (i.compress_size, i.file_size) for i in z.infolist()}
    except Exception:  # noqa: BLE001 - a damaged zip is corrupt, not foreign
        return None


def _check_zip(path: str, fd: int, size: int) -> dict[str, tuple[int, int]] | None:
    """The members of a torch zip, after the checks that bound what loading it costs:
    at most MAX_ZIP_MEMBERS members, a data.pkl of at most MAX_PICKLE_BYTES."""
    n = _zip_entries(fd, size)
    if n is not None and n > MAX_ZIP_MEMBERS:
        raise CheckpointError("unsupported", "TooManyMembers", f"{path!r}: its zip holds {n} members, over nnmark's "
                                                               f"limit of {MAX_ZIP_MEMBERS}")
    members = _zip_members(fd)
    for name, (_, unpacked) in (members or {}).items():
        if name.endswith("data.pkl") and unpacked > MAX_PICKLE_BYTES:
            raise CheckpointError("unsupported", "PickleTooLarge", f"{path!r}: its pickle {name!r} is {unpacked} bytes "
                                                                   f"unpacked, over nnmark's limit of {MAX_PICKLE_BYTES}")
    return members


class TorchFile(Checkpoint):
    """A torch checkpoint loaded with ``weights_only=True`` (mapped for the zip format)."""

    def __init__(self, path: str, fmt: str, st: os.stat_result, fd: int):
        super().__init__(path, *identity_of(st))
        self.format = fmt
        members = _check_zip(path, fd, st.st_size) if fmt == "torch-zip" else None
        imports = _check_legacy(path, fd) if fmt != "torch-zip" else None
        obj = _torch_load(path, fd, fmt, members, imports)
        if fmt == "torch-zip":
            # Mapped: the zip directory and the pickle are read; tensor pages are counted as
            # they are used. (From the archive's layout, not a system counter: the same file
            # reports the same bytes whoever reads it.)
            tensor_bytes = sum(n for name, (n, _) in (members or {}).items()
                               if "/data/" in name and not name.endswith(".pkl"))
            self.bytes_read = max(0, min(st.st_size - tensor_bytes, st.st_size))
        else:
            self.bytes_read = st.st_size  # the legacy format is read whole
        self._sd = state_dict_of(obj, path)

    def names(self) -> list[str]:
        return [k for k, v in self._sd.items() if isinstance(v, torch.Tensor)]

    def _get(self, name: str) -> torch.Tensor:
        return check_tensor(self.path, name, self._sd[name])

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

    def tensor(self, name: str) -> torch.Tensor:
        t = self._get(name)
        if self.format == "torch-zip":
            self.bytes_read = min(self.bytes_read + t.numel() * t.element_size(), self.size)
        return t

    def close(self) -> None:
        self._sd = {}


# ------------------------------------------------------------------ sharded (Hugging Face)
def _parse_index(path, head: bytes | None = None) -> dict:
    """The weight map {tensor name: shard file name} of a shard index, or CheckpointError."""
    raw = head if head is not None else read_small(os.fspath(path), MAX_INDEX_BYTES)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError("unsupported", "UnknownFormat", f"{os.fspath(path)!r} is a JSON or text file, "
                                                          f"not a checkpoint") from None
    wm = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError("unsupported", "UnknownFormat", f"{os.fspath(path)!r} is a JSON file without a "
                                                          f"'weight_map': not a checkpoint shard index")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError("corrupt", "BadIndex", f"{os.fspath(path)!r}: weight_map must map tensor names to shard files")
    return wm


def index_shards(path: str, raw: bytes | None = None) -> list[str]:
    """The shard files (absolute paths) a shard index names, in first-use order; raises
    CheckpointError unless the index is valid (see :func:`_check_shards`)."""
    return [p for p, _ in _check_shards(path, _parse_index(path, raw)).values()]


def _shard_path(index: str, base: str, shard: str) -> str:
    p = os.path.normpath(os.path.join(base, shard))
    # A shard outside the checkpoint's folder is not part of it (and an index must not
    # send the scan to read arbitrary files).
    if os.path.dirname(p) != base or os.path.isabs(shard):
        raise CheckpointError("corrupt", "BadIndex", f"{index!r}: shard {shard!r} is not a file beside the index")
    # An index that is its own shard (or names another index) would hide a file from a
    # scan's walk while checking nothing of it.
    if os.path.basename(p) == os.path.basename(index):
        raise CheckpointError("corrupt", "BadIndex", f"{index!r} lists itself as a shard")
    if shard.endswith(".index.json"):
        raise CheckpointError("corrupt", "BadIndex", f"{index!r}: shard {shard!r} is another index")
    return p


def _check_shards(index: str, wm: dict) -> dict[str, tuple[str, os.stat_result]]:
    """{shard name: (absolute path, stat)} of a valid index: every shard a regular file
    beside it, neither the index itself nor another index, and, when it is a link, one
    whose target stays inside the index's folder (a shard linked elsewhere would make
    this checkpoint verify with weights it does not hold). Else CheckpointError."""
    index = os.fspath(index)
    base = os.path.dirname(os.path.abspath(index))
    out: dict[str, tuple[str, os.stat_result]] = {}
    real_base = real_index = None
    for s in wm.values():
        if s in out:
            continue
        p = _shard_path(index, base, s)
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                if real_base is None:
                    real_base = os.path.realpath(base)
                    real_index = os.path.realpath(index)
                real = os.path.realpath(p)
                if real == real_index:
                    raise CheckpointError("corrupt", "BadIndex", f"{index!r} lists itself as a shard (through the "
                                                                 f"link {s!r})")
                if real.endswith(".index.json"):
                    raise CheckpointError("corrupt", "BadIndex", f"{index!r}: shard {s!r} is a link to another index")
                if not real.startswith(real_base.rstrip(os.sep) + os.sep):
                    raise CheckpointError("corrupt", "BadIndex", f"{index!r}: shard {s!r} is a link to a file outside "
                                                                 f"the index's folder")
                st = os.stat(p)
        except FileNotFoundError:
            raise CheckpointError("corrupt", "MissingShard", f"{index!r}: shard {s!r} does not exist") from None
        except OSError as exc:
            raise _io_error(p, exc) from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError("corrupt", "BadIndex", f"{index!r}: shard {s!r} is not a regular file")
        out[s] = (p, st)
    return out


class ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded checkpoint: the index, and each shard opened only when it
    holds a tensor that is asked for. An index is refused (``corrupt``, ``BadIndex``)
    when a shard is the index itself or another index, not a regular file, or a link
    leaving the index's folder."""

    format = "hf-sharded"

    def __init__(self, path: str, raw: bytes, st: os.stat_result):
        self._wm = _parse_index(path, raw)
        self._base = os.path.dirname(os.path.abspath(path))
        shards = _check_shards(path, self._wm)
        size, mtime, inode, ctime = identity_of(st)
        self._stats: dict[str, os.stat_result] = {}
        for s, (_, sst) in shards.items():
            self._stats[s] = sst
            size += sst.st_size
            mtime = max(mtime, sst.st_mtime_ns)
            ctime = max(ctime, sst.st_ctime_ns)  # a rewritten shard changes the checkpoint
        super().__init__(path, size, mtime, inode, ctime)
        self.bytes_read = len(raw)
        self._open: dict[str, Checkpoint] = {}

    def names(self) -> list[str]:
        return list(self._wm)

    def _shard(self, name: str) -> Checkpoint:
        s = self._wm[name]
        ck = self._open.get(s)
        if ck is None:
            p = os.path.join(self._base, s)
            ck = open_file(p)
            if isinstance(ck, ShardedCheckpoint):
                ck.close()
                raise CheckpointError("corrupt", "BadIndex", f"{self.path!r}: shard {s!r} is itself an index")
            self._open[s] = ck
            self.bytes_read += ck.bytes_read
        return ck

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        real = name if name in self._wm else self._resolve(self._wm, name)
        ck = self._shard(real)
        before = ck.bytes_read
        try:
            return ck.carrier(real, validate, out)
        except CheckpointError as exc:
            if exc.status == "absent":  # the index names a tensor its shard lacks
                raise CheckpointError("corrupt", "BadIndex", f"{self.path!r}: the index puts {real!r} in "
                                                         f"{self._wm[real]!r}, which lacks it") from None
            raise
        finally:
            self.bytes_read += ck.bytes_read - before

    def tensor(self, name: str) -> torch.Tensor:
        ck = self._shard(name)
        before = ck.bytes_read
        try:
            return ck.tensor(name)
        finally:
            self.bytes_read += ck.bytes_read - before

    def close(self) -> None:
        for ck in self._open.values():
            ck.close()
        self._open = {}


# ------------------------------------------------------------------ sources in memory
class ModuleCheckpoint(Checkpoint):
    """A live ``nn.Module``: carriers are its parameters (or buffers), detached; trigger
    keys run the module itself."""

    format = "module"

    def __init__(self, module: torch.nn.Module, label: str):
        super().__init__(label, None, None)
        self.module = module

    def names(self) -> list[str]:
        return list(self.module.state_dict(keep_vars=True))

    def tensor(self, name: str) -> torch.Tensor:
        return check_tensor(self.path, name, self.module.state_dict(keep_vars=True)[name]).detach()

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        from .sharded import fsdp1_holds, fsdp1_layout, is_dtensor, is_fsdp1_flattened, layout

        # A live sharded model holds a part of the carrier on each rank: checking it is
        # refused by name (gathering it is a collective every rank would have to join).
        how = fsdp1_layout(self.module, name)
        if how is not None:
            raise CheckpointError("invalid", "ShardedCarrier", f"{self.path!r}: carrier {name!r} is held by {how}; "
                                                               f"verify the model's full state dict")
        try:
            real, t = module_tensor(self.module, name)
        except KeyError as exc:
            raise CheckpointError("absent", "MissingCarrier", f"{self.path!r}: {exc.args[0]}") from None
        except ValueError as exc:
            raise CheckpointError("invalid", "AmbiguousCarrier", f"{self.path!r}: {exc}") from None
        if is_fsdp1_flattened(t) and not fsdp1_holds(self.module, name):
            raise CheckpointError("invalid", "ShardedCarrier",
                                  f"{self.path!r}: carrier {real!r} is a parameter FSDP1 flattened, held by a "
                                  f"FullyShardedDataParallel unit outside the module given (a slice of it, maybe); "
                                  f"verify the model's full state dict")
        if is_dtensor(t):
            raise CheckpointError("invalid", "ShardedCarrier",
                                  f"{self.path!r}: carrier {real!r} is a DTensor with {layout(t)}; verify the full "
                                  f"weights (the model's full state dict, or DTensor.full_tensor() on every rank)")
        return _memory_carrier(self.path, real, t.detach(), validate)


def _memory_carrier(path: str, name: str, t, validate: Validator | None) -> Carrier:
    t = check_tensor(path, name, t)
    if validate is not None:
        validate(name, tuple(t.shape), t.dtype if t.is_floating_point() else None)
    return Carrier(name, t, None, t.numel() * t.element_size(), raw=t)


class StateDictCheckpoint(Checkpoint):
    """A state dict in memory (unwrapped from ``{"state_dict": ...}`` as files are)."""

    format = "state_dict"

    def __init__(self, sd: Mapping, label: str):
        super().__init__(label, None, None)
        self._sd = state_dict_of(sd, label)

    def names(self) -> list[str]:
        return [k for k, v in self._sd.items() if isinstance(v, torch.Tensor)]

    def tensor(self, name: str) -> torch.Tensor:
        return check_tensor(self.path, name, self._sd[name]).detach()

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The state dict itself: its tensors are in memory already, and hashing all of
        them would cost more than running the model (rows of sources in memory carry no
        digest of the whole model)."""
        return self._sd

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        real = name if name in self._sd else self._resolve(list(self._sd.keys()), name)
        return _memory_carrier(self.path, real, self._sd[real], validate)


class TensorCheckpoint(Checkpoint):
    """A bare carrier tensor: it is the carrier whatever the key calls it (white-box keys only)."""

    format = "tensor"

    def __init__(self, t: torch.Tensor, label: str):
        super().__init__(label, None, None)
        self._t = t

    def names(self) -> list[str]:
        return []

    def tensor(self, name: str) -> torch.Tensor:  # pragma: no cover - names() is empty
        raise KeyError(name)

    def state_dict(self):
        raise CheckpointError("unsupported", "NotAModel", f"{self.path!r}: a bare tensor cannot be run; a trigger key "
                                                          f"needs a module, a state dict or a checkpoint file")

    def carrier(self, name: str, validate: Validator | None = None, out: Allocator | None = None) -> Carrier:
        return _memory_carrier(self.path, name, self._t, validate)


# ------------------------------------------------------------------ entry points
def read_small(path: str, limit: int) -> bytes:
    """A whole small regular file (at most ``limit`` bytes, else CheckpointError), opened without blocking."""
    fd, st = open_regular(path)
    try:
        if st.st_size > limit:
            raise CheckpointError("unsupported", "UnknownFormat", f"{path!r} is a {st.st_size}-byte file, more than "
                                                                  f"the {limit} bytes expected here")
        return os.pread(fd, st.st_size, 0)
    except OSError as exc:
        raise _io_error(path, exc) from None
    finally:
        os.close(fd)


def open_file(path: str | os.PathLike) -> Checkpoint:
    """Opens a checkpoint file of any supported format (sniffed from its first bytes)."""
    path = os.fspath(path)
    fd, st = open_regular(path)
    handed_over = False
    try:
        try:
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
            raise CheckpointError("corrupt", "EmptyFile", f"{path!r} is empty")
        if fmt in ("torch-zip", "torch-legacy"):
            return TorchFile(path, fmt, st, fd)
        if fmt == "json":
            raw = head if len(head) == st.st_size else head + _read_rest(fd, path, len(head), st.st_size)
            return ShardedCheckpoint(path, raw, st)
        for magic, what in _OTHER_MAGIC:
            if head.startswith(magic):
                raise CheckpointError("unsupported", "UnsupportedFormat", f"{path!r} is {what}, not a checkpoint "
                                                                          f"nnmark reads (safetensors or torch)")
        raise CheckpointError("unsupported", "UnknownFormat", f"{path!r} is neither safetensors nor a torch checkpoint")
    finally:
        if not handed_over:
            os.close(fd)


def _read_rest(fd: int, path: str, start: int, size: int) -> bytes:
    if size > MAX_INDEX_BYTES:
        raise CheckpointError("unsupported", "UnknownFormat", f"{path!r} is a {size}-byte JSON or text file, "
                                                              f"not a checkpoint")
    try:
        return os.pread(fd, size - start, start)
    except OSError as exc:
        raise _io_error(path, exc) from None


def label_of(source, index: int | None = None) -> str:
    """How a source is named in rows and messages: a path as given, else ``<module>``,
    ``<state_dict 3>`` (its index in a list), ``<tensor>``..."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    kind = ("module" if isinstance(source, torch.nn.Module) else "state_dict" if isinstance(source, Mapping)
            else "tensor" if isinstance(source, torch.Tensor) else type(source).__name__)
    return f"<{kind}>" if index is None else f"<{kind} {index}>"


def open_checkpoint(source, label: str | None = None) -> Checkpoint:
    """The one way in: a checkpoint path (any supported format), an ``nn.Module``, a state
    dict or a bare carrier tensor, opened as a :class:`Checkpoint`. ``label`` names an
    in-memory source in rows and messages (default ``<module>``, ``<state_dict>``...).
    Raises CheckpointError (for a source that is none of these: ``unsupported``,
    ``UnsupportedSource``)."""
    if isinstance(source, (str, os.PathLike)):
        return open_file(source)
    label = label or label_of(source)
    if isinstance(source, torch.nn.Module):
        return ModuleCheckpoint(source, label)
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, label)
    if isinstance(source, torch.Tensor):
        return TensorCheckpoint(source, label)
    raise CheckpointError("unsupported", "UnsupportedSource", f"{label}: a source must be a checkpoint path, an "
                                                              f"nn.Module, a state dict or a tensor, "
                                                              f"got {type(source).__name__}")


def load_state_dict(source) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (or state dict), read safely, as a plain dict."""
    with open_checkpoint(source) as ck:
        return {k: ck.tensor(k) for k in ck.names()}


def read_carrier(source, name: str, validate: Validator | None = None) -> Carrier:
    """One tensor of a checkpoint, read lazily and hashed (wrapper prefixes tolerated)."""
    with open_checkpoint(source) as ck:
        return ck.carrier(name, validate)


def read_tensor(source, name: str) -> torch.Tensor:
    """One named tensor of a checkpoint (wrapper prefixes tolerated)."""
    with open_checkpoint(source) as ck:
        return ck.carrier(name).tensor


def fd_sha256(fd: int) -> str:
    """sha256 of everything from ``fd``'s position to its end (the caller closes ``fd``)."""
    h = hashlib.sha256()
    with open(fd, "rb", buffering=0, closefd=False) as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a whole regular file (reads all of it)."""
    fd, _ = open_regular(os.fspath(path))
    try:
        return fd_sha256(fd)
    finally:
        os.close(fd)


__all__ = ["FORMATS", "MEMORY_FORMATS", "STAMP_KEY", "CheckpointError", "Carrier", "Checkpoint", "SafetensorsFile", "TorchFile",
           "ShardedCheckpoint", "ModuleCheckpoint", "StateDictCheckpoint", "TensorCheckpoint", "HashingStateDict",
           "open_checkpoint", "open_file", "sniff", "sniff_head", "read_carrier", "read_tensor", "load_state_dict", "index_shards",
           "tensor_sha256", "file_sha256", "fd_sha256", "state_dict_of", "error_of", "label_of", "check_tensor"]
