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

from ..checkpoints import CheckpointError, file_sha256, index_shards
from .paths import expand_paths


def write_manifest(paths, out: str | os.PathLike | IO[str], exclude: Iterable[str] = (), workers: int | None = None,
                   progress=None) -> tuple[int, list[str]]:
    """Writes the whole-file sha256 of every file under ``paths`` (shards included) in
    ``sha256sum`` format (``<hex>  <path>``; paths relative to the manifest's folder when
    inside it). Reads every byte, on purpose: the formats themselves carry no checksum.
    Unreadable files (and anything not a regular file) are left out with a warning on
    stderr. Returns (files written, paths that could not be read)."""
    files: list[str] = []
    for p in expand_paths(paths, exclude):
        files.append(p)
        if p.endswith(".index.json"):
            try:
                files += index_shards(p)
            except CheckpointError:
                pass
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
                print(f"warning: {p}: {why}; not in the manifest", file=sys.stderr)
                failed.append(p)
                continue
            shown = os.path.relpath(p, base) if base and (p + os.sep).startswith(base + os.sep) else p
            lines.append(_manifest_line(h, shown))
    text = "".join(lines)
    if isinstance(out, (str, os.PathLike)):
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        out.write(text)
    return len(lines), failed


def _manifest_line(digest: str, path: str) -> str:
    if "\\" in path or "\n" in path:  # sha256sum's escaping of awkward names
        return "\\" + digest + "  " + path.replace("\\", "\\\\").replace("\n", "\\n") + "\n"
    return f"{digest}  {path}\n"


def load_manifest(path: str | os.PathLike) -> dict[str, str]:
    """{absolute path: sha256} from a manifest (``sha256sum`` format; relative paths are
    relative to the manifest's folder). Raises ValueError on a malformed line."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read manifest {os.fspath(path)!r}: {exc}") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        digest, sep, name = line.partition("  ")
        if not sep:
            digest, sep, name = line.partition(" *")  # sha256sum's binary-mode marker
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError(f"manifest {os.fspath(path)!r} line {n}: expected '<sha256 hex>  <path>', got {line[:80]!r}")
        if escaped:
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        out[os.path.normpath(os.path.join(base, name))] = digest.lower()
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


__all__ = ["write_manifest", "load_manifest", "integrity"]
