"""White-box keys (key spec v1, DESIGN.md §4) and the key file format.

A key is a secret. Key files are written with mode 0600; no ``repr``, log or
report shows the secret (only ``key_id``, a one-way fingerprint); keys refuse
to be pickled, so they never end up inside a checkpoint.

Key file: UTF-8 JSON with ``format="nnmark-key"``, ``version=1``, the key's
fields and ``checksum`` = SHA-256 over the canonical JSON of all other fields.
``load_key`` rejects unknown formats and versions, truncated files, files whose
checksum does not match (the file changed since it was written: a corrupted copy
or an edit that did not update the checksum) and fields of the wrong type or
beyond the limits below. The checksum is unkeyed: it catches accidents, not
deliberate edits (whoever can edit the file can recompute it; docs/spec.md §2.2).

Key files are written through a fresh, randomly named temporary file created
exclusively in the target's folder (never following a link), then renamed over the
target; a key file that users other than its owner can read or write loads with a
:class:`KeyPermissionWarning` (or is refused: ``permissions="refuse"``), like ssh.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets as _secrets
import stat
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import ops
from ._keyfile import (NumberError, f32_field, file_type, int_field, int_list, is_int, open_regular, parse_json,
                       read_fd, read_regular, secret_field, show, write_atomic)
from .carriers import REDUCTIONS, carrier_length, reduce_carrier
from .sharded import is_dtensor, project_sharded

FORMAT = "nnmark-key"
VERSION = 1
SECRET_BYTES = 32
_PROJECTION_DOMAIN = b"nnmark:projection:v1:"
_MESSAGE_DOMAIN = b"nnmark:message:v1:"
_KEY_ID_DOMAIN = b"nnmark:key-id:v1:"
_LEDGER_MAC_DOMAIN = b"nnmark:ledger-mac:v1:"
# DenseKey's matrix_layout: unknown (refused when square), nnmark's [T, N], Uchida's [N, T].
MATRIX_LAYOUTS = (None, "TN", "NT")

# Limits on what a key claims. Generous for real use, and small enough that a hostile or
# broken key file fails at load with a clear error instead of allocating gigabytes later.
MAX_BITS = 1 << 20  # owner bits T: published marks use 32 to a few thousand
MAX_NAME_CHARS = 4096  # a carrier's state-dict name: real ones are well under 200 characters
MAX_SHAPE_DIMS = 16  # a recorded carrier shape: weights have 1 to 5 dims
MAX_SHAPE_ELEMENTS = 1 << 40  # elements of a recorded shape: 4 TiB of float32, beyond any one weight
# A key file holds a secret and some parameters; trigger keys may hold samples too.
MAX_KEY_FILE_BYTES = 256 << 20

# How load_key treats a key file that others can read or write: ssh's rule, with an override.
PERMISSIONS = ("warn", "refuse", "ignore")
PERMISSIONS_ENV = "NNMARK_KEY_PERMISSIONS"


def derive_ledger_mac_key(secret: bytes) -> bytes:
    """The key of ledger row MACs (:mod:`nnmark.ledger`): HMAC-SHA256 of a domain string under
    the key's secret material. One-way: the MAC key reveals nothing of the secret."""
    return hmac.new(secret, _LEDGER_MAC_DOMAIN, hashlib.sha256).digest()


class KeyFileError(ValueError):
    """A key file that cannot be used: unreadable, truncated, changed since it was written,
    malformed, of an unknown version, or (``permissions="refuse"``) readable by others."""


class KeyPermissionWarning(UserWarning):
    """A key file that users other than its owner can read or write (group/other mode bits set).

    The secret in it lets anyone who reads it verify and remove the mark. The fix the
    message names: ``chmod 600 FILE``."""


def message_bits(message: str | bytes, n: int) -> np.ndarray:
    """The n owner bits derived from a message.

    bits = the first n bits (most significant first in each byte) of
    SHAKE-256(b"nnmark:message:v1:" + message as UTF-8). The same message always
    gives the same bits, so an owner can re-derive them from a label such as
    "ACME Corp, model v3"; the bits look random, as the null hypothesis assumes.
    """
    if isinstance(message, str):
        message = message.encode("utf-8")
    if not isinstance(message, (bytes, bytearray)) or len(message) == 0:
        raise ValueError("message must be a non-empty str or bytes")
    digest = hashlib.shake_256(_MESSAGE_DOMAIN + bytes(message)).digest((n + 7) // 8)
    return np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:n].astype(np.uint8)


def projection_subkeys(secrets: bytes, carrier: str) -> np.ndarray:
    """Philox subkeys ``[K, 2]`` (uint32) of K concatenated 32-byte secrets for one carrier
    (spec v1 step 1): the first two little-endian words of SHA-256(secret ||
    b"nnmark:projection:v1:" || carrier as UTF-8). Batched for key searches
    (:func:`nnmark.attacks.forge_key`); ``WhiteBoxKey.subkey`` is the one-secret case."""
    if not isinstance(secrets, (bytes, bytearray)) or len(secrets) == 0 or len(secrets) % SECRET_BYTES:
        got = f"{len(secrets)} bytes" if isinstance(secrets, (bytes, bytearray)) else type(secrets).__name__
        raise ValueError(f"secrets must be a non-empty multiple of {SECRET_BYTES} bytes, got {got}")
    suffix = _PROJECTION_DOMAIN + carrier.encode("utf-8")
    sha, mv = hashlib.sha256, memoryview(secrets)
    digests = b"".join([sha(mv[i:i + SECRET_BYTES].tobytes() + suffix).digest()[:8]
                        for i in range(0, len(secrets), SECRET_BYTES)])
    return np.frombuffer(digests, dtype="<u4").reshape(-1, 2).astype(np.uint32)


def as_bits(bits: Any) -> np.ndarray:
    """Owner bits as uint8 ``[T]``: a non-empty 1-D sequence of 0/1, at most MAX_BITS (every key kind)."""
    if isinstance(bits, (str, bytes)):
        raise TypeError("bits must be a sequence of 0/1 values (use message=... to derive bits from text)")
    arr = np.asarray(bits.cpu() if isinstance(bits, torch.Tensor) else bits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"bits must be a non-empty 1-D sequence of 0/1, got shape {arr.shape}")
    if arr.size > MAX_BITS:
        raise ValueError(f"{arr.size} bits: a key holds at most {MAX_BITS}")
    if not np.all((arr == 0) | (arr == 1)):
        bad = arr[(arr != 0) & (arr != 1)][:3].tolist()
        raise ValueError(f"bits must contain only 0 and 1, found {bad}")
    return arr.astype(np.uint8)


def _row_bits(bits: Any) -> Any:
    """Bits given as one row [1, T] (as Uchida's *_b.npy) become [T]; other 2-D shapes are refused."""
    if isinstance(bits, (str, bytes)):
        return bits
    arr = np.asarray(bits.cpu() if isinstance(bits, torch.Tensor) else bits)
    if arr.ndim == 2:
        if arr.shape[0] != 1:
            raise ValueError(f"bits must be [T] or one row [1, T], got shape {list(arr.shape)}")
        return arr[0]
    return arr


def _read_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """One array from a .npy file, never unpickling anything (a pickle could run code)."""
    p = str(path)
    try:
        fd, st = open_regular(path)  # never blocks on a FIFO
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise KeyFileError(f"{what} file {p!r} is not a regular file ({file_type(st)})")
        with os.fdopen(fd, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            if magic != b"\x93NUMPY":
                kind = ("an .npz archive" if magic.startswith(b"PK") else
                        "a pickle" if magic[:1] == b"\x80" else "not a .npy file")
                raise KeyFileError(f"{what} file {p!r} is {kind}; expected a .npy array"
                                   + (" (pickled data is refused: loading it could run code)"
                                      if kind == "a pickle" else ""))
            arr = np.load(f, allow_pickle=False)
    except KeyFileError:
        raise
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {p!r}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        if "pickle" in str(exc).lower():
            raise KeyFileError(f"{what} file {p!r} holds pickled Python objects (an object array), which nnmark "
                               f"refuses to load: loading them could run code. Save a numeric array") from None
        raise KeyFileError(f"{what} file {p!r} is not a readable .npy array (truncated or damaged): {exc}") from None
    return np.asarray(arr)


def _check_carrier(carrier: Any) -> str:
    if not isinstance(carrier, str) or not carrier or len(carrier) > MAX_NAME_CHARS:
        raise ValueError(f"carrier must be a non-empty state-dict name such as 'features.3.weight' (at most "
                         f"{MAX_NAME_CHARS} characters), got {show(carrier)}")
    try:
        carrier.encode("utf-8")  # its UTF-8 bytes enter the subkey; a lone surrogate has none
    except UnicodeEncodeError:
        raise ValueError(f"carrier {show(carrier)} is not valid Unicode text") from None
    return carrier


def _check_reduction(reduction: Any) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {show(reduction)}")
    return reduction


def _check_shape(shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if (isinstance(shape, (str, bytes)) or dims is None or not 1 <= len(dims) <= MAX_SHAPE_DIMS
            or not all(is_int(s) and s >= 1 for s in dims)):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes (ints, at most {MAX_SHAPE_DIMS} dims), "
                         f"got {show(shape)}")
    dims = tuple(int(s) for s in dims)
    if math.prod(dims) > MAX_SHAPE_ELEMENTS:
        raise ValueError(f"shape {list(dims)} has more than {MAX_SHAPE_ELEMENTS} elements")
    return dims


def min_bits_warning(n: int) -> None:
    """Warns that a key of ``n`` bits can never verify at the default alpha (every key kind)."""
    if n < 20:  # 2^-20 ~ 1e-6: fewer bits can never reach the default alpha
        warnings.warn(f"a key with {n} bits can never verify at alpha=1e-6 (needs >= 20 bits)", stacklevel=3)


class HoldsSecret:
    """What every key kind shares about its secret: never pickled or deep-copied (save the
    key instead); equal only to a key of the same kind with the same secret and fields;
    its public ``key_id`` and its ledger MAC key, both derived from the secret."""

    _KEY_ID_PREFIX = b""  # each kind's domain (docs/spec.md): key_id = sha256(prefix || secret)[:16]

    @property
    def key_id(self) -> str:
        """A public fingerprint (16 hex digits of a domain-separated hash of the secret): safe to log."""
        return hashlib.sha256(self._KEY_ID_PREFIX + self._secret).hexdigest()[:16]

    def _ledger_mac_key(self) -> bytes:
        return derive_ledger_mac_key(self._secret)

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} holds a secret and is not picklable; use key.save(path)")

    def __deepcopy__(self, memo):
        raise TypeError(f"{type(self).__name__} holds a secret and is not copied; use key.save(path)")

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and _secrets.compare_digest(self._secret, other._secret)
                and self._fields() == other._fields())

    __hash__ = None  # type: ignore[assignment]


class OwnerBits:
    """The owner's bits of a key kind that holds them in ``_bits`` (uint8 ``[T]``)."""

    @property
    def bits(self) -> torch.Tensor:
        """The owner's bits, uint8 ``[T]``."""
        return torch.from_numpy(self._bits.copy())

    @property
    def num_bits(self) -> int:
        return int(self._bits.size)

    def __len__(self) -> int:
        return self.num_bits


class WhiteBoxKeyBase(OwnerBits, HoldsSecret):
    """What both key kinds share: carrier, reduction, owner bits, projection, files."""

    kind = ""

    @property
    def file_kind(self) -> str:
        """The ``kind`` member of this key's file (docs/spec.md §2)."""
        return self.kind

    def __init__(self, carrier, bits, reduction, shape, order="torch"):
        self.carrier = _check_carrier(carrier)
        self.reduction = _check_reduction(reduction)
        self._bits = as_bits(bits)
        self.shape = _check_shape(shape)
        if order not in ("torch", "keras"):
            raise ValueError(f"order must be 'torch' or 'keras', got {show(order)}")
        self.order = order

    # -- projection ------------------------------------------------------------------
    def reduce(self, weight: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """The carrier vector(s) of a weight tensor: ``[N]``, or ``[C, N]`` when batched."""
        return reduce_carrier(weight, self.reduction, batched=batched, order=self.order)

    def project(self, tensor, batched: bool = False) -> torch.Tensor:
        """Raw projections of a carrier weight tensor after the key's reduction.

        ``tensor``: one weight tensor -> ``[T]``; a list/tuple of weight tensors,
        or one stacked tensor with ``batched=True`` -> ``[C, T]``. Differentiable.
        """
        if isinstance(tensor, (list, tuple)):
            if not tensor:
                raise ValueError("project() got an empty list of tensors")
            shapes = {tuple(t.shape) for t in tensor}
            if len(shapes) != 1:
                raise ValueError(f"project() needs tensors of one shape to batch, got {sorted(shapes)}")
            tensor, batched = torch.stack([torch.as_tensor(t) for t in tensor]), True
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        if not batched and is_dtensor(tensor):  # a sharded carrier: each rank projects its shard
            if self.shape is not None and tuple(tensor.shape) != self.shape:
                raise ValueError(f"carrier {self.carrier!r} has shape {list(tensor.shape)}, "
                                 f"the key expects {list(self.shape)}")
            return project_sharded(self, tensor)
        if self.shape is not None:
            got = tuple(tensor.shape[1:] if batched else tensor.shape)
            if got != self.shape:
                raise ValueError(f"carrier {self.carrier!r} has shape {list(got)}, the key expects {list(self.shape)}")
        return self.project_vectors(self.reduce(tensor, batched=batched))

    def project_vectors(self, v: torch.Tensor, col0: int | None = None) -> torch.Tensor:  # pragma: no cover
        """Projections of reduced carrier vectors ``v`` ``[..., L]``: whole carriers, or, with
        ``col0``, a piece whose first element is at index ``col0`` of the whole carrier."""
        raise NotImplementedError

    @property
    def length(self) -> int | None:
        """Carrier length N the key requires, or None when any length works."""
        return None

    # -- files -----------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        return {
            "carrier": self.carrier,
            "reduction": self.reduction,
            "order": self.order,
            "num_bits": self.num_bits,
            "bits": "".join(str(int(b)) for b in self._bits),
            "shape": list(self.shape) if self.shape is not None else None,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the key to ``path`` (mode 0600). Refuses to overwrite a non-key file."""
        return write_key_file(path, self.kind, self.key_id, self._fields())


class WhiteBoxKey(WhiteBoxKeyBase):
    """A keyed white-box watermark key (spec v1): 32-byte secret, carrier, reduction, bits.

    The projection X in {-1,+1}^{T x N} is derived from the secret and the carrier
    name and never stored.
    """

    _KEY_ID_PREFIX = _KEY_ID_DOMAIN

    kind = "whitebox"

    def __init__(self, secret: bytes, carrier: str, bits: Sequence[int], reduction: str = "filter_mean",
                 shape: Sequence[int] | None = None):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
            got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {got}")
        super().__init__(carrier, bits, reduction, shape)
        self._secret = bytes(secret)
        # Derived once: a training step calls subkey() every time, and torch.compile
        # cannot trace hashlib (each call would break the graph).
        k0, k1 = projection_subkeys(self._secret, self.carrier)[0].tolist()
        self._subkey = (k0, k1)
        min_bits_warning(self.num_bits)

    @classmethod
    def generate(cls, carrier: str = "features.3.weight", bits: int = 256, reduction: str = "filter_mean",
                 message: str | bytes | None = None, shape: Sequence[int] | None = None) -> "WhiteBoxKey":
        """A new key with a fresh secret from ``os.urandom``.

        ``bits`` is the number of bits T. The owner's bits are random, or derived
        from ``message`` (see :func:`message_bits`). ``shape`` (optional) records
        the carrier's weight shape so a wrong-shaped carrier is reported.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be a positive int (the number of bits) up to {MAX_BITS}, got {show(bits)}")
        owner = (message_bits(message, bits) if message is not None
                 else np.unpackbits(np.frombuffer(os.urandom((bits + 7) // 8), dtype=np.uint8))[:bits])
        return cls(os.urandom(SECRET_BYTES), carrier, owner, reduction, shape)

    def subkey(self) -> tuple[int, int]:
        """Philox key (k0, k1) of this carrier (spec v1 step 1). Secret: do not log."""
        return self._subkey

    def project_vectors(self, v: torch.Tensor, col0: int | None = None) -> torch.Tensor:
        return ops.keyed_projection(v, self.subkey(), self.num_bits, col0 or 0)

    def _fields(self) -> dict[str, Any]:
        return {"secret": self._secret.hex(), **super()._fields()}

    def __repr__(self) -> str:
        return (f"WhiteBoxKey(key_id={self.key_id!r}, carrier={self.carrier!r}, bits={self.num_bits}, "
                f"reduction={self.reduction!r})")

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return (isinstance(other, WhiteBoxKey) and _secrets.compare_digest(self._secret, other._secret)
                and self._fields() == other._fields())

    __hash__ = None  # type: ignore[assignment]


class DenseKey(WhiteBoxKeyBase):
    """A white-box key with an explicit projection matrix X[T, N] (keys from other tools).

    ``order`` says which element order X expects of a ``filter_mean`` conv carrier:
    ``"torch"`` ((in, kh, kw), torch's [out, in, kh, kw] averaged over out) or
    ``"keras"`` ((kh, kw, in), Uchida's Keras code averaging a (kh, kw, in, out) kernel).

    ``matrix_layout`` says which axis of ``matrix`` is which: ``"TN"`` (nnmark's
    [T, N]: row t is bit t) or ``"NT"`` (Uchida's [N, T], as their code saves it;
    transposed here). When None, a matrix with T rows is taken as [T, N], and a
    square one (N == T) is refused: its orientation cannot be told from its shape,
    and the wrong one extracts wrong bits. ``bits`` may be [T] or [1, T].
    """

    kind = "whitebox-dense"

    def __init__(self, matrix, carrier: str, bits: Sequence[int], reduction: str = "filter_mean",
                 order: str = "torch", shape: Sequence[int] | None = None, *, matrix_layout: str | None = None):
        super().__init__(carrier, _row_bits(bits), reduction, shape, order)
        if matrix_layout not in MATRIX_LAYOUTS:
            raise ValueError(f"matrix_layout must be None, 'TN' (nnmark's [T, N]) or 'NT' (Uchida's [N, T]), "
                             f"got {matrix_layout!r}")
        x = torch.as_tensor(np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix))
        if x.dim() != 2 or x.numel() == 0:
            raise ValueError(f"matrix must be a non-empty [T, N] array, got shape {list(x.shape)}")
        t = self.num_bits
        if matrix_layout is None and x.shape[0] == x.shape[1] == t:
            raise ValueError(f"matrix is square ({t} x {t}, N == T), so its orientation cannot be told from its "
                             f"shape: pass matrix_layout='TN' (nnmark's [T, N], row t is bit t) or 'NT' "
                             f"(Uchida et al.'s [N, T] as their code saves it)")
        if matrix_layout == "NT":
            if x.shape[1] != t:
                raise ValueError(f"matrix_layout='NT' says the matrix is [N, T], but it has {x.shape[1]} columns "
                                 f"and there are {t} bits")
            x = x.T
        if x.shape[0] != t:
            hint = (" (it looks like [N, T], as Uchida et al.'s code saves it: pass matrix_layout='NT' or use "
                    "DenseKey.from_uchida)" if matrix_layout is None and x.shape[1] == t else "")
            raise ValueError(f"matrix has {x.shape[0]} rows but there are {t} bits{hint}")
        if not torch.isfinite(x).all():
            raise ValueError("matrix contains NaN or Inf")
        self._matrix = x.to(torch.float32).contiguous()
        min_bits_warning(self.num_bits)

    @classmethod
    def from_uchida(cls, w_path: str | os.PathLike, b_path: str | os.PathLike, *, carrier: str,
                    order: str = "keras", reduction: str = "filter_mean", shape: Sequence[int] | None = None,
                    matrix_layout: str | None = None) -> "DenseKey":
        """A key from the two .npy files of Uchida et al.'s code (github.com/yu4u/dnn-watermark).

        ``w_path``: the projection matrix X as saved, [N, T] (``*_layerK_w.npy``);
        ``b_path``: the owner's bits, [1, T] or [T], values 0/1 (``*_layerK_b.npy``,
        float in their code). ``carrier``: the state-dict name of the marked weight.
        ``order="keras"``: their regularizer averages a Keras (kh, kw, in, out) kernel
        over out and reads it in (kh, kw, in) order; use ``"torch"`` for a port that
        reads torch's (in, kh, kw). When N == T the matrix's orientation cannot be told
        from the shapes and ``matrix_layout`` must say it (``"NT"``: as Uchida's code
        saves it; ``"TN"``: already nnmark's [T, N]); given for a non-square matrix, it
        must agree with the shapes. Files are read with ``allow_pickle=False``.
        A defect of the files raises :class:`KeyFileError` (a ValueError) naming the file
        and the problem; bad arguments raise ValueError.
        """
        if matrix_layout not in MATRIX_LAYOUTS:
            raise ValueError(f"matrix_layout must be None, 'NT' (Uchida's [N, T], as saved) or 'TN' "
                             f"(nnmark's [T, N]), got {matrix_layout!r}")
        x = _read_npy(w_path, "projection matrix (w)")
        b = _read_npy(b_path, "owner bits (b)")
        wp, bp = str(w_path), str(b_path)
        if x.ndim != 2 or x.size == 0:
            raise KeyFileError(f"projection matrix file {wp!r} holds an array of shape {list(x.shape)}; "
                               f"Uchida's *_w.npy is a non-empty 2-D [N, T] matrix")
        if x.dtype.kind not in "fiu":
            raise KeyFileError(f"projection matrix file {wp!r} holds {x.dtype} values; expected real numbers")
        if not np.isfinite(x).all():
            raise KeyFileError(f"projection matrix file {wp!r} contains NaN or Inf")
        if not (b.ndim == 1 or (b.ndim == 2 and b.shape[0] == 1)) or b.size == 0:
            raise KeyFileError(f"owner bits file {bp!r} holds an array of shape {list(b.shape)}; "
                               f"expected [1, T] (as Uchida's *_b.npy) or [T]")
        if b.dtype.kind not in "fiub":
            raise KeyFileError(f"owner bits file {bp!r} holds {b.dtype} values; expected 0/1")
        b = b.reshape(-1)
        if not np.all((b == 0) | (b == 1)):
            bad = b[(b != 0) & (b != 1)][:3].tolist()
            raise KeyFileError(f"owner bits file {bp!r} must hold only 0 and 1, found {bad}")
        t = b.size
        rows, cols = x.shape
        if matrix_layout is None:
            if rows == cols == t:
                raise KeyFileError(f"projection matrix in {wp!r} is square ({t} x {t}: N == T), so which axis is "
                                   f"which cannot be told from the shapes; pass matrix_layout='NT' (the [N, T] "
                                   f"layout Uchida's code saves) or matrix_layout='TN' (nnmark's [T, N])")
            if cols == t:
                matrix_layout = "NT"
            elif rows == t:
                matrix_layout = "TN"
            else:
                raise KeyFileError(f"projection matrix in {wp!r} is [{rows}, {cols}] but {bp!r} holds {t} bits: "
                                   f"neither axis is T = {t}")
        elif (cols if matrix_layout == "NT" else rows) != t:
            axis = "[N, T]: its columns" if matrix_layout == "NT" else "[T, N]: its rows"
            raise KeyFileError(f"matrix_layout={matrix_layout!r} says the matrix in {wp!r} is {axis} are the bits, "
                               f"but it is [{rows}, {cols}] and {bp!r} holds {t} bits")
        m = x.T if matrix_layout == "NT" else x
        if shape is not None and reduction in REDUCTIONS:
            n = carrier_length(_check_shape(shape), reduction)
            if n != m.shape[1]:
                raise ValueError(f"carrier shape {list(shape)} reduces ({reduction}) to length {n}, but the "
                                 f"matrix in {wp!r} expects N = {m.shape[1]}")
        return cls(m.astype(np.float64), carrier, b.astype(np.uint8), reduction, order, shape, matrix_layout="TN")

    @property
    def matrix(self) -> torch.Tensor:
        return self._matrix.clone()

    @property
    def length(self) -> int:
        return int(self._matrix.shape[1])

    @property
    def key_id(self) -> str:
        return hashlib.sha256(_KEY_ID_DOMAIN + self._matrix.numpy().tobytes()).hexdigest()[:16]

    def _ledger_mac_key(self) -> bytes:
        return derive_ledger_mac_key(self._matrix.numpy().tobytes())  # the matrix is this key's secret

    def project_vectors(self, v: torch.Tensor, col0: int | None = None) -> torch.Tensor:
        n, end = self._matrix.shape[1], (col0 or 0) + v.shape[-1]
        if end > n or (col0 is None and end != n):
            raise ValueError(f"carrier {self.carrier!r} reduces to length {end}, the key's matrix expects {n}")
        x = self._matrix if col0 is None else self._matrix[:, col0:end]
        return ops.dense_projection(v, x.to(v.device))

    def _fields(self) -> dict[str, Any]:
        m = self._matrix.numpy().astype("<f4")
        return {"matrix": base64.b64encode(m.tobytes()).decode("ascii"), "matrix_shape": list(m.shape),
                **super()._fields()}

    def __repr__(self) -> str:
        return (f"DenseKey(key_id={self.key_id!r}, carrier={self.carrier!r}, bits={self.num_bits}, "
                f"n={self._matrix.shape[1]}, order={self.order!r})")

    __str__ = __repr__


def write_key_file(path: str | os.PathLike, kind: str, key_id: str, fields: dict[str, Any]) -> Path:
    """Writes a versioned, checksummed key file with mode 0600 (every key kind uses this).

    Refuses to overwrite an existing file that is not an nnmark key file, or is not a
    regular file (a FIFO or device there is refused, never waited on). A symbolic link
    at ``path`` is replaced by the key file; what it pointed to is left as it was."""
    path = Path(path)
    _check_overwritable(path)
    body = {"format": FORMAT, "version": VERSION, "kind": kind, "key_id": key_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "warning": "SECRET: whoever holds this file can verify and remove this watermark. Keep it private.",
            **fields}
    body["checksum"] = _checksum(body)
    return write_private(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` atomically to ``path`` with mode 0600 (for secrets and trigger sets);
    see :func:`write_atomic`."""
    return write_atomic(path, data, private=True)


def _check_overwritable(path: Path) -> None:
    """FileExistsError unless ``path`` is free (or a dangling link) or holds an nnmark key
    file. Read without blocking and only when regular and no larger than a key file."""
    p = str(path)
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise FileExistsError(f"{p!r} exists and cannot be read ({exc.strerror or exc}); refusing to overwrite "
                              f"it with a key file") from None
    try:
        if not stat.S_ISREG(st.st_mode):
            raise FileExistsError(f"{p!r} exists and is not a regular file ({file_type(st)}); refusing to "
                                  f"overwrite it with a key file")
        if st.st_size > MAX_KEY_FILE_BYTES or not _is_key_body(read_fd(fd, st.st_size)):
            raise FileExistsError(f"{p!r} exists and is not an nnmark key file; refusing to overwrite it")
    except FileExistsError:
        raise
    except OSError as exc:
        raise FileExistsError(f"{p!r} exists and cannot be read ({exc.strerror or exc}); refusing to overwrite "
                              f"it with a key file") from None
    finally:
        os.close(fd)


def _is_key_body(raw: bytes) -> bool:
    try:
        body = parse_json(raw)
    except (ValueError, RecursionError, MemoryError):
        return False
    return isinstance(body, dict) and body.get("format") == FORMAT


# kind -> function(body) -> key, for key kinds defined in other modules (trigger keys).
_LOADERS: dict[str, Any] = {}


def register_key_kind(kind: str, loader) -> None:
    """Lets ``load_key`` read files of ``kind``: ``loader(body)`` builds the key from the
    verified JSON body (raise KeyError/TypeError/ValueError on malformed fields, naming the
    field and never showing the secret)."""
    _LOADERS[kind] = loader


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON of docs/spec.md §2.2: members sorted, no whitespace, non-ASCII as
    ``\\uXXXX`` escapes, floats as ``repr``; ASCII bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in body.items() if k != "checksum"})).hexdigest()


def key_body(key) -> dict[str, Any]:
    """The members of ``key``'s file but ``created``, ``warning`` and ``checksum``, and no
    member its kind does not define (docs/spec.md §8.1): what a commitment hashes and a
    certificate reveals. It holds the secret: never log it."""
    fields = getattr(key, "_fields", None)
    if fields is None or not isinstance(getattr(key, "file_kind", None), str):
        raise TypeError(f"a key must be an nnmark key (WhiteBoxKey, DenseKey, TriggerKey), got {type(key).__name__}")
    return {"format": FORMAT, "version": VERSION, "kind": key.file_kind, "key_id": key.key_id, **fields()}


# -- strict fields (TypeError/ValueError naming the field; load_key adds the file) --------------


def bits_field(body: dict[str, Any]) -> np.ndarray:
    """A key file's ``num_bits`` and ``bits`` members, strictly checked (every key kind with bits)."""
    t = int_field(body, "num_bits", 1, MAX_BITS)
    bits = body["bits"]
    if not isinstance(bits, str):
        raise TypeError(f"field 'bits' must be a string of '0' and '1', got {type(bits).__name__}")
    if len(bits) != t:
        raise ValueError(f"num_bits={t} but {len(bits)} bits stored")
    if bits.strip("01"):  # only ASCII '0'/'1': int() would also read other scripts' digits
        raise ValueError("field 'bits' must hold only the characters '0' and '1'")
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")


def _shape_field(body: dict[str, Any], name: str = "shape") -> tuple[int, ...] | None:
    v = body[name]
    if v is not None and not isinstance(v, list):
        raise TypeError(f"field {name!r} must be an array of positive integers or null, got {type(v).__name__}")
    return _check_shape(v)


def _load_whitebox(body: dict[str, Any]) -> WhiteBoxKey:
    return WhiteBoxKey(secret_field(body, nbytes=SECRET_BYTES), _check_carrier(body["carrier"]), bits_field(body),
                       _check_reduction(body["reduction"]), _shape_field(body))


def _load_dense(body: dict[str, Any]) -> DenseKey:
    bits = bits_field(body)
    rows, cols = int_list(body, "matrix_shape", 2, 2)
    if rows != bits.size:
        raise ValueError(f"field 'matrix_shape' says {rows} rows, num_bits says {bits.size}")
    m = f32_field(body, "matrix", (rows, cols))
    # nnmark stores [T, N]: say so, or a square matrix (N == T) would be refused
    return DenseKey(m, _check_carrier(body["carrier"]), bits, _check_reduction(body["reduction"]), body["order"],
                    _shape_field(body), matrix_layout="TN")


# -- reading ------------------------------------------------------------------------------


def _permission_policy(permissions: str | None) -> str:
    if permissions is not None:
        if not isinstance(permissions, str) or permissions not in PERMISSIONS:
            raise ValueError(f"permissions must be one of {list(PERMISSIONS)}, got {show(permissions)}")
        return permissions
    env = os.environ.get(PERMISSIONS_ENV, "").strip().lower()
    if env and env not in PERMISSIONS:
        raise KeyFileError(f"{PERMISSIONS_ENV}={show(env)} is not one of {', '.join(PERMISSIONS)}")
    return env or "warn"


def _exposure(path: Path, mode: int) -> str | None:
    """Why a key file's mode exposes it, or None (ssh's rule: no group or other bits)."""
    if os.name == "nt" or not mode & 0o077:  # Windows has no such mode bits
        return None
    import shlex

    can = " or ".join(v for v, bits in (("read", 0o044), ("change", 0o022)) if mode & bits) or "open"
    return (f"key file {str(path)!r} has mode {stat.S_IMODE(mode):04o}: users other than its owner can {can} it, "
            f"and whoever reads it can verify and remove the mark. Fix: chmod 600 {shlex.quote(str(path))}")


class _as_key_file_error:
    """Turns every exception a bad file can raise into a KeyFileError naming the file
    (``label``: how messages name it, default ``key file 'PATH'``)."""

    def __init__(self, path: Path, label: str | None = None):
        self.label = label or f"key file {str(path)!r}"

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or issubclass(kind, KeyFileError) or not issubclass(kind, Exception):
            return False
        what = self.label
        if issubclass(kind, RecursionError):
            raise KeyFileError(f"{what} is nested too deeply to be a key file") from None
        if issubclass(kind, MemoryError):
            raise KeyFileError(f"{what} needs more memory than a key file can") from None
        if issubclass(kind, KeyError):
            raise KeyFileError(f"{what} is malformed: field {show(exc.args[0] if exc.args else None)} "
                               f"is missing") from None
        if issubclass(kind, (TypeError, ValueError, OverflowError, IndexError)):
            raise KeyFileError(f"{what} is malformed: {exc}") from None
        # Anything else is nnmark's bug, but still a file it cannot use: say which, show no value.
        raise KeyFileError(f"{what} could not be read ({kind.__name__})") from None


def load_key(path: str | os.PathLike, permissions: str | None = None):
    """Read a key file written by ``key.save``; raises :class:`KeyFileError` on any defect.

    ``permissions``: what to do when users other than the file's owner can read or write
    it (mode & 0o077, the rule ssh applies to private keys): ``"warn"`` (the default) loads
    it with a :class:`KeyPermissionWarning` naming the file, its mode and the fix
    (``chmod 600 FILE``); ``"refuse"`` raises KeyFileError; ``"ignore"`` loads it silently.
    When not given, the environment variable ``NNMARK_KEY_PERMISSIONS`` (warn, refuse or
    ignore) sets it. Not checked on Windows.

    Whatever is wrong with the file -- unreadable, not a regular file, too large, not
    JSON, nested too deeply, a number beyond float64, a field missing, of the wrong type or
    beyond the limits (``MAX_BITS``, ``triggers.MAX_TRIGGERS``, ...), a checksum or key_id
    that does not match -- the error is a KeyFileError naming the file and the field, and
    no message shows the secret.
    """
    policy = _permission_policy(permissions)
    path = Path(path)
    p = str(path)
    raw, st = read_regular(path, MAX_KEY_FILE_BYTES, "key file", KeyFileError)
    with _as_key_file_error(path):
        body = _key_body(p, raw)
    why = _exposure(path, st.st_mode) if policy != "ignore" else None
    if why is not None:
        if policy == "refuse":
            raise KeyFileError(f"{why} (refused: permissions='refuse' or {PERMISSIONS_ENV}=refuse)")
        warnings.warn(KeyPermissionWarning(why), stacklevel=2)
    with _as_key_file_error(path):
        return _key_from_body(p, body)


def _key_body(p: str, raw: bytes) -> dict[str, Any]:
    """Steps 1 and 2 of reading (docs/spec.md §2.3): a JSON object of this format and version."""
    if not raw.strip():
        raise KeyFileError(f"key file {p!r} is empty")
    try:
        body = parse_json(raw)
    except NumberError as exc:
        raise KeyFileError(f"key file {p!r} is not a key file nnmark can read: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyFileError(f"key file {p!r} is not valid key JSON (truncated or not a key file)") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        fmt = body.get("format") if isinstance(body, dict) else None
        raise KeyFileError(f"{p!r} is not an nnmark key file (format is {show(fmt)})")
    version = body.get("version")
    if not is_int(version) or version != VERSION:  # no bool: True == 1 in Python
        raise KeyFileError(f"key file {p!r} has version {show(version)}; this nnmark reads version {VERSION}")
    return body


def key_from_body(body: Any, what: str = "revealed key"):
    """The key a :func:`key_body` object describes (a certificate's revealed key): steps 2,
    4 and 5 of reading a key file (docs/spec.md §2.3; it has no checksum). Raises
    :class:`KeyFileError` naming ``what`` and the member; no message shows the secret."""
    with _as_key_file_error(Path(what), what):
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise KeyFileError(f"{what} is not an nnmark key (format is "
                               f"{show(body.get('format') if isinstance(body, dict) else type(body).__name__)})")
        version = body.get("version")
        if not is_int(version) or version != VERSION:
            raise KeyFileError(f"{what} has version {show(version)}; this nnmark reads version {VERSION}")
        return _key_from_body(what, body, checksum=False)


def _key_from_body(p: str, body: dict[str, Any], checksum: bool = True):
    """Steps 3 to 5 of reading: checksum (unless ``checksum=False``: ``p`` then names the
    body as messages show it), the kind's fields, key_id."""
    label = f"key file {p!r}" if checksum else p
    if checksum and body.get("checksum") != _checksum(body):
        raise KeyFileError(f"{label} failed its checksum: the file changed since it was written (a "
                           f"corrupted copy, or an edit that did not update the checksum)")
    kind = body.get("kind")
    loaders = {WhiteBoxKey.kind: _load_whitebox, DenseKey.kind: _load_dense, **_LOADERS}
    loader = loaders.get(kind) if isinstance(kind, str) else None
    if loader is None:
        raise KeyFileError(f"{label} has unknown kind {show(kind)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = loader(body)
    if key.key_id != body.get("key_id"):
        raise KeyFileError(f"{label}: key_id does not match its secret")
    return key


def load_keys_for_cli(paths, note) -> list:
    """``load_key`` of each path for a command line: a :class:`KeyPermissionWarning` becomes
    one ``warning: ...`` line given to ``note`` (shown inert, once per file) instead of
    Python's warning text; the key still loads (``NNMARK_KEY_PERMISSIONS=refuse`` refuses)."""
    from ._display import inert_line

    keys, shown = [], set()
    for path in paths:
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", KeyPermissionWarning)
                keys.append(load_key(path))
        finally:
            for w in caught:
                if not issubclass(w.category, KeyPermissionWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
                elif str(w.message) not in shown:
                    shown.add(str(w.message))
                    note(f"warning: {inert_line(str(w.message))}")
    return keys
