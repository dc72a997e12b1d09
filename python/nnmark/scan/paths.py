"""Which files a scan checks: files, folders (walked recursively) and glob patterns."""
from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable

from ..checkpoints import CheckpointError, index_shards


def expand_paths(paths, exclude: Iterable[str] = ()) -> list[str]:
    """Checkpoint paths (absolute, sorted per argument, no duplicates) of files, folders
    (walked recursively; hidden entries skipped) and glob patterns. In a folder with a
    shard index (``*.index.json`` naming shards beside it), the index stands for the
    shards it names. A path that does not exist is kept (its row says io_error); a
    pattern that matches nothing adds nothing. ``exclude``: glob patterns matched
    against the file name and the full path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    excl = [os.fspath(e) for e in exclude]
    out: dict[str, None] = {}

    def add(p: str, absolute: bool = False) -> None:
        if not absolute:
            p = os.path.abspath(p)
        if not excl or not any(fnmatch.fnmatch(os.path.basename(p), e) or fnmatch.fnmatch(p, e) for e in excl):
            out.setdefault(p, None)

    for raw in paths:
        s = os.fspath(raw)
        if os.path.isdir(s):
            for p in _walk(os.path.abspath(s)):  # absolute and normalised already
                add(p, True)
        elif os.path.lexists(s) or not glob.has_magic(s):
            add(s)
        else:
            for m in sorted(glob.glob(s, recursive=True)):
                if os.path.isdir(m):
                    for p in _walk(os.path.abspath(m)):
                        add(p, True)
                else:
                    add(m)
    return list(out)


def _walk(top: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = sorted(f for f in filenames if not f.startswith("."))
        shards: set[str] = set()
        for f in files:
            if f.endswith(".index.json"):
                try:
                    shards.update(os.path.basename(s) for s in index_shards(os.path.join(dirpath, f)))
                except CheckpointError:
                    pass  # not an index after all: scanned like any file
        found += [os.path.join(dirpath, f) for f in files if f not in shards]
    return found


__all__ = ["expand_paths"]
