"""Files that hold secrets or claims, read and written safely (key files, calibrations).

Reading: opened without blocking and checked on the descriptor (a FIFO or device is
refused, never waited on, and nothing can be swapped in between a check and the open),
bounded in size, parsed as strict JSON (no NaN/Infinity, no 1e999, no absurdly long
integers), every field checked for its type and limits with an error naming the field.
Writing: a fresh, randomly named temporary file created exclusively beside the target
without following links, fsynced, then renamed over the target.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Digits of any JSON integer in a key or calibration file: no field needs more than 64 bits
# (20 digits), and a short bound keeps parsing cheap whatever sys.set_int_max_str_digits allows.
MAX_INT_DIGITS = 32


def show(value: Any) -> str:
    """A value as an error message shows it: short (never call it on a secret)."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)


def temp_name(path: Path) -> Path:
    """A fresh, unpredictable name beside ``path`` (a planted name cannot be guessed)."""
    return path.with_name(f".nnmark-{secrets.token_hex(12)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes, private: bool = False) -> Path:
    """Writes ``data`` to ``path`` through a fresh temporary file in the same folder.

    The temporary file has a random name and is created exclusively (``O_EXCL``) without
    following a link (``O_NOFOLLOW``), so nothing planted in the folder is ever written
    through; it is written and fsynced, then renamed over ``path`` (``os.replace``: a link
    at ``path`` is replaced, never followed), and the folder is fsynced where the system
    allows. ``private``: mode 0600 from the start, so a secret is never readable by others,
    not even briefly; otherwise 0666 less the umask. On any error the temporary file is
    removed and ``path`` keeps what it held."""
    return write_atomic_with(path, lambda f: f.write(data), private=private)


def write_atomic_with(path: str | os.PathLike, write, private: bool = False, mode: int | None = None) -> Path:
    """:func:`write_atomic` with the content written by ``write(f)`` (a binary file open on
    the temporary file), for content too large to hold in memory. ``mode``: the file's mode
    bits once written (e.g. those of a file being replaced)."""
    path = Path(path)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _O_CLOEXEC
             | getattr(os, "O_BINARY", 0))
    for _ in range(16):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, flags, 0o600 if private else 0o666)
            break
        except FileExistsError:  # a collision, or a name someone planted: draw another
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file beside {str(path)!r}: every name tried was taken")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod") and (private or mode is not None):
                # exactly 0600 (or the mode asked for), on the descriptor: no path to swap
                os.fchmod(f.fileno(), 0o600 if private else mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Makes a rename durable; where a system cannot (Windows, some network filesystems), skip."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_type(st: os.stat_result) -> str:
    m = st.st_mode
    return ("a directory" if stat.S_ISDIR(m) else "a FIFO" if stat.S_ISFIFO(m)
            else "a socket" if stat.S_ISSOCK(m) else "a character device" if stat.S_ISCHR(m)
            else "a block device" if stat.S_ISBLK(m) else "not a regular file")


def read_fd(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``fd`` (fewer if the file shrank meanwhile)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A descriptor and its fstat: opened without blocking (a FIFO would wait for a writer
    forever), checked on the descriptor (nothing can be swapped in between)."""
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_NOCTTY | _O_CLOEXEC | getattr(os, "O_BINARY", 0))
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int, what: str,
                 error: type[Exception]) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most ``limit`` bytes, and its fstat; anything
    else (missing, unreadable, a directory, FIFO or device, too large) raises ``error``
    naming ``what`` and the path."""
    p = str(path)
    try:
        fd, st = open_regular(path)
    except OSError as exc:
        raise error(f"cannot read {what} {p!r}: {exc.strerror or exc}") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            raise error(f"cannot read {what} {p!r}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {p!r} is not a regular file ({file_type(st)}); refusing to read it")
        if st.st_size > limit:
            raise error(f"{what} {p!r} has {st.st_size} bytes, more than a {what} holds ({limit})")
        return read_fd(fd, st.st_size), st
    except OSError as exc:
        raise error(f"cannot read {what} {p!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


# -- strict JSON ----------------------------------------------------------------------------


class NumberError(ValueError):
    """A JSON number a key file never holds (NaN, an infinity, an absurdly long integer)."""


def _json_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise NumberError(f"it holds an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _json_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise NumberError(f"it holds the number {show(text)}, beyond the range of a float64")
    return v


def _json_constant(name: str):
    raise NumberError(f"it holds {name}, which is not JSON (numbers in a key file are finite)")


def parse_json(raw: bytes) -> Any:
    """JSON as RFC 8259 defines it: no NaN or Infinity, numbers within float64, integers
    of at most MAX_INT_DIGITS digits (json alone reads 1e999 as inf and NaN as nan)."""
    return json.loads(raw.decode("utf-8"), parse_int=_json_int, parse_float=_json_float,
                      parse_constant=_json_constant)


# -- strict fields (TypeError/ValueError naming the field; the caller adds the file) -------------


def int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = body[name]
    if not is_int(v):
        raise TypeError(f"field {name!r} must be an integer, got {type(v).__name__} {show(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"field {name!r} must be in [{lo}, {hi}], got {v}")
    return int(v)


def int_list(body: dict[str, Any], name: str, min_len: int, max_len: int) -> list[int]:
    """A field holding an array of ``min_len`` to ``max_len`` positive integers."""
    v = body[name]
    if not isinstance(v, list) or not min_len <= len(v) <= max_len or not all(is_int(s) and s >= 1 for s in v):
        size = f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}"
        raise ValueError(f"field {name!r} must be an array of {size} positive integers, got {show(v)}")
    return [int(s) for s in v]


def secret_field(body: dict[str, Any], name: str = "secret", nbytes: int = 32) -> bytes:
    v = body[name]
    # exactly 2 * nbytes ASCII hex digits (bytes.fromhex alone also skips whitespace);
    # the value is never shown: it is the secret
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{%d}" % (2 * nbytes), v):
        raise ValueError(f"field {name!r} must be {2 * nbytes} hex digits")
    return bytes.fromhex(v)


def f32_field(body: dict[str, Any], name: str, shape: Sequence[int]) -> np.ndarray:
    """A base64 field of little-endian float32 values in C order; its length is checked
    against ``shape`` before anything is decoded or allocated."""
    v = body[name]
    if not isinstance(v, str):
        raise TypeError(f"field {name!r} must be a base64 string, got {type(v).__name__}")
    count = math.prod(shape)
    want = 4 * ((4 * count + 2) // 3)
    if len(v) != want:
        raise ValueError(f"field {name!r} holds {len(v)} base64 characters; {list(shape)} float32 values "
                         f"take {want}")
    try:
        blob = base64.b64decode(v, validate=True)
    except ValueError:
        raise ValueError(f"field {name!r} is not valid base64") from None
    if len(blob) != 4 * count:
        raise ValueError(f"field {name!r} holds {len(blob)} bytes, expected {4 * count}")
    return np.frombuffer(blob, dtype="<f4").reshape(tuple(shape))
