"""Manifests: whole-file sha256s, written before and checked during a scan.

Neither safetensors nor torch files checksum their data: ``nnmark manifest``
reads every byte, on purpose, so that ``nnmark scan --manifest`` (or
``sha256sum -c``) can flag files that changed since.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from .._display import inert_line
from ..checkpoints import CheckpointError, file_sha256, index_shards, open_regular
from .paths import Expansion, walk_paths

# A manifest line is a digest and a path (~100-300 bytes): 1 GiB is millions of files,
# and far more than any manifest a scan should hold in memory.
MAX_MANIFEST_BYTES = 1 << 30


def write_manifest(paths, out: str | os.PathLike | IO, exclude: Iterable[str] = (), workers: int | None = None,
                   progress=None, include_hidden: bool = False) -> tuple[int, list[str]]:
    """Writes the whole-file sha256 of every file under ``paths`` (shards included) in
    ``sha256sum`` format (``<hex>  <path>``; paths relative to the manifest's folder when
    inside it; names written as their bytes, as ``sha256sum`` does, so a name that is not
    UTF-8 round-trips through :func:`load_manifest`). ``paths`` may be an
    :class:`~nnmark.scan.paths.Expansion` from :func:`walk_paths` (``exclude`` and
    ``include_hidden`` then unused). Reads every byte, on purpose: the formats themselves
    carry no checksum. Files are opened without blocking; unreadable files (and anything
    not a regular file: a FIFO, a device) are left out with a warning on stderr. Returns
    (files written, paths that could not be read)."""
    exp = paths if isinstance(paths, Expansion) else walk_paths(paths, exclude, include_hidden)
    files: list[str] = []
    for p in exp.files:
        files.append(p)
        if p.endswith(".index.json"):
            try:
                files += index_shards(p)
            except CheckpointError:
                pass  # not a valid index: the walk listed the files it names, each on its own
    if isinstance(out, (str, os.PathLike)):
        out_path = os.path.abspath(out)
        files = [f for f in files if f != out_path]
        base = os.path.dirname(out_path)
    else:
        base = None
    files = list(dict.fromkeys(files))

    def one(p):
        try:
            return p, file_sha256(p)
        except (OSError, CheckpointError) as exc:
            return p, exc

    lines, failed = [], []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2)) as pool:
        for i, (p, h) in enumerate(pool.map(one, files)):
            if progress is not None:
                progress(i + 1, len(files))
            if isinstance(h, Exception):
                why = h.strerror if isinstance(h, OSError) and h.strerror else str(h)
                print(inert_line(f"warning: {p}: {why}; not in the manifest"), file=sys.stderr)
                failed.append(p)
                continue
            shown = os.path.relpath(p, base) if base and (p + os.sep).startswith(base + os.sep) else p
            lines.append(_manifest_line(h, shown))
    data = b"".join(lines)
    if isinstance(out, (str, os.PathLike)):
        with open(out, "wb") as f:
            f.write(data)
    else:
        raw = getattr(out, "buffer", None)
        if raw is not None:  # a text stream over bytes (sys.stdout): the names' own bytes
            out.flush()
            raw.write(data)
            raw.flush()
        elif _binary(out):
            out.write(data)
        else:  # a text stream in memory: names that are not UTF-8 keep their surrogate escapes
            out.write(data.decode("utf-8", "surrogateescape"))
    return len(lines), failed


def _binary(out) -> bool:
    import io

    return isinstance(out, (io.RawIOBase, io.BufferedIOBase)) or "b" in getattr(out, "mode", "")


def _manifest_line(digest: str, path: str) -> bytes:
    name = os.fsencode(path)  # the name's bytes, undecodable ones included (surrogateescape)
    if b"\\" in name or b"\n" in name or b"\r" in name:  # sha256sum's escaping of awkward names
        name = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + digest.encode() + b"  " + name + b"\n"
    return digest.encode() + b"  " + name + b"\n"


def _unescape(name: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(name):
        c = name[i:i + 1]
        if c == b"\\" and i + 1 < len(name):
            nxt = name[i + 1:i + 2]
            out += {b"n": b"\n", b"r": b"\r", b"\\": b"\\"}.get(nxt, c + nxt)
            i += 2
        else:
            out += c
            i += 1
    return bytes(out)


def load_manifest(path: str | os.PathLike) -> dict[str, str]:
    """{absolute path: sha256} from a manifest (``sha256sum`` format; relative paths are
    relative to the manifest's folder; names are bytes, decoded as file names are, so
    names that are not UTF-8 match the files). The manifest is opened without blocking
    and must be a regular file of at most :data:`MAX_MANIFEST_BYTES`. Raises ValueError
    when it cannot be read, and on a malformed line."""
    shown = inert_line(os.fspath(path))
    base = os.path.dirname(os.path.abspath(path))
    try:
        fd, st = open_regular(os.fspath(path))
    except CheckpointError as exc:
        raise ValueError(f"cannot read manifest {shown}: {exc}") from None
    try:
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest {shown} is {st.st_size} bytes, more than the {MAX_MANIFEST_BYTES} a "
                             f"manifest may have")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)  # (a file that grows while read stops here)
    except OSError as exc:
        raise ValueError(f"cannot read manifest {shown}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest {shown} is more than the {MAX_MANIFEST_BYTES} bytes a manifest may have")
    out = {}
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.endswith(b"\r"):  # a CRLF file (a name's own \r is written escaped)
            line = line[:-1]
        if not line.strip():
            continue
        escaped = line.startswith(b"\\")
        if escaped:
            line = line[1:]
        digest, sep, name = line.partition(b"  ")
        if not sep:
            digest, sep, name = line.partition(b" *")  # sha256sum's binary-mode marker
        if not sep or len(digest) != 64 or any(c not in b"0123456789abcdefABCDEF" for c in digest):
            raise ValueError(f"manifest {shown} line {n}: expected '<sha256 hex>  <path>', "
                             f"got {inert_line(line[:80].decode('utf-8', 'replace'))!r}")
        if escaped:
            name = _unescape(name)
        out[os.path.normpath(os.path.join(base, os.fsdecode(name)))] = digest.decode().lower()
    return out


def integrity(path: str, sharded: bool, manifest: dict[str, str]) -> tuple[str, str | None]:
    """(ok | changed | unlisted, whole-file sha256 of path) for a file and, when it is a
    shard index (``sharded``), its shards."""
    members = [path]
    if sharded:
        members += index_shards(path)
    state, first = "ok", None
    for m in members:
        h = file_sha256(m)
        first = first or h
        want = manifest.get(m)
        if want is None:
            state = "unlisted" if state == "ok" else state
        elif want != h:
            state = "changed"
    return state, first


__all__ = ["write_manifest", "load_manifest", "integrity", "MAX_MANIFEST_BYTES"]
