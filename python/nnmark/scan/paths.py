"""Which files a scan checks: files, folders (walked recursively) and glob patterns.

The walk and the glob matching are nnmark's own, not ``os.walk``/``glob.glob``: a
scanned tree is input like the files in it, and may hold directory links that loop,
links that leave it, folders nobody may list, or paths longer than the system allows.
Nothing is ever visited twice and nothing is dropped silently: every file gets a row,
or :class:`Expansion` names it, by reason, in ``left_out``.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..checkpoints import CheckpointError, index_shards

# Why a path under the given ones gets no row (Expansion.left_out's keys).
LEFT_OUT_REASONS = ("hidden", "unlisted_folder", "loop", "outside", "too_long", "duplicate", "excluded")
# The reasons that mean "not everything was checked" (a scan's exit code 2). A file left
# out as excluded was the user's choice; a duplicate was checked, under its first path.
NOT_CHECKED = ("hidden", "unlisted_folder", "loop", "outside", "too_long")

_MAGIC = re.compile(r"[*?[]")


@dataclass
class Expansion:
    """What a list of paths expands to: ``files`` (absolute, in walk order, each real
    file once) and ``left_out``: {reason: [paths]} of what got no row, reasons from
    :data:`LEFT_OUT_REASONS`:

    - ``hidden``: a name starting with ``.`` inside a walked folder or matched by a
      glob (the file or folder itself; a hidden folder is not entered);
    - ``unlisted_folder``: a folder that could not be listed (permission denied...);
    - ``loop``: a link that leads back into a folder it is in (or to itself);
    - ``outside``: a link (to a file or a folder) inside a walked folder whose target
      lies outside the folder given (a glob: the folder before its first pattern);
      not followed. A path named explicitly is followed as given;
    - ``too_long``: a path longer than the system allows;
    - ``duplicate``: a file or folder reached again through another path (a link, a
      hard link): checked once, under the first path in walk order;
    - ``excluded``: matched an ``exclude`` pattern.
    """

    files: list[str]
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """{reason: how many paths} for the reasons that left something out."""
        return {r: len(self.left_out[r]) for r in LEFT_OUT_REASONS if self.left_out.get(r)}

    def examples(self, n: int = 5) -> dict[str, list[str]]:
        """{reason: its first ``n`` paths}."""
        return {r: self.left_out[r][:n] for r in LEFT_OUT_REASONS if self.left_out.get(r)}

    @property
    def not_checked(self) -> int:
        """How many paths were left out for a reason in :data:`NOT_CHECKED`."""
        return sum(len(self.left_out.get(r, ())) for r in NOT_CHECKED)


def expand_paths(paths, exclude: Iterable[str] = (), include_hidden: bool = False) -> list[str]:
    """Checkpoint paths (absolute, in walk order, each real file once) of files, folders
    (walked recursively; hidden entries skipped unless ``include_hidden``) and glob
    patterns (``**``: any depth). In a folder with a valid shard index (``*.index.json``
    naming regular files beside it), the index stands for the shards it names. A path
    that does not exist is kept (its row says io_error); a pattern that matches nothing
    adds nothing. ``exclude``: glob patterns matched against the file name and the full
    path. What is left out, and why: :func:`walk_paths`."""
    return walk_paths(paths, exclude, include_hidden).files


def walk_paths(paths, exclude: Iterable[str] = (), include_hidden: bool = False) -> Expansion:
    """:func:`expand_paths`, with what was left out and why (an :class:`Expansion`).

    Directory links are followed only while they stay inside the folder given and do not
    loop; a file reached twice (links, hard links) is listed once. ``exclude`` patterns
    also apply to the entries that would be left out for another reason (a hidden or
    unlistable folder, a link leaving the folder): those count as ``excluded``."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    w = _Walker([os.fsdecode(e) for e in exclude], include_hidden)
    for raw in paths:
        s = os.fsdecode(raw)
        if os.path.isdir(s):  # named explicitly: followed as given, even through a link
            top = os.path.abspath(s)
            w.walk(top, os.path.realpath(top))
        elif os.path.lexists(s) or not _MAGIC.search(s):
            p = os.path.abspath(s)
            try:
                st = os.stat(p)
            except OSError:
                st = None  # its row says why it cannot be read
            w.add_file(p, st)
        else:
            w.glob(s)
    return Expansion(list(w.files), w.left_out)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root if root.endswith(os.sep) else root + os.sep)


def _ident(st: os.stat_result | int) -> int:
    """A file's identity: (st_dev << 64) | st_ino, from its stat or as already computed
    (an int: a plain file listed in a folder, see _Walker.entry)."""
    return st if st.__class__ is int else (st.st_dev << 64) | st.st_ino


# Linux's PATH_MAX, in bytes (a longer path cannot be opened); paths from a quarter of it on
# are measured in bytes (a character may take four).
_PATH_MAX = 4096
_LONG_PATH = _PATH_MAX // 4


class _Walker:
    """One expansion: the files found (each real file once), the folders walked, and
    what was left out."""

    def __init__(self, exclude: list[str], include_hidden: bool):
        self.excl, self.include_hidden = exclude, include_hidden
        self.files: dict[str, None] = {}
        self.seen: set[int] = set()  # identities (st_dev, st_ino) of the files found
        self.walked: dict[int, str] = {}  # identity of each folder walked -> its path
        self.devices: dict[str, int] = {}  # folder -> its st_dev
        self.left_out: dict[str, list[str]] = {}
        self.said: set[tuple[str, str]] = set()

    def excluded(self, path: str) -> bool:
        base = os.path.basename(path)
        return any(fnmatch.fnmatch(base, e) or fnmatch.fnmatch(path, e) for e in self.excl)

    def leave(self, reason: str, path: str) -> None:
        if reason != "duplicate" and reason != "excluded" and self.excl and self.excluded(path):
            reason = "excluded"
        if (reason, path) not in self.said:  # (two patterns may meet the same entry)
            self.said.add((reason, path))
            self.left_out.setdefault(reason, []).append(path)

    def add_file(self, path: str, st: os.stat_result | None) -> None:
        if path in self.files:  # the same path again (overlapping arguments): one row, nothing to say
            return
        if self.excl and self.excluded(path):
            self.leave("excluded", path)
            return
        if st is not None:
            ident = _ident(st)
            if ident in self.seen:
                self.leave("duplicate", path)
                return
            self.seen.add(ident)
        self.files[path] = None

    def hidden(self, name: str, path: str, pattern: str | None = None) -> bool:
        """Whether a dot name is skipped here (and then says so). Like glob, a pattern
        that starts with a dot asks for dot names."""
        if name[0] != "." or self.include_hidden or (pattern is not None and pattern[0] == "."):
            return False
        self.leave("hidden", path)
        return True

    def entry(self, e: os.DirEntry, root: str, folder: str) -> tuple[str, os.stat_result | int | None] | None:
        """("dir" | "file", its identity) of a listed entry, following a link that stays
        inside ``root`` (a realpath); None when it is left out (and said so). A plain file
        costs no system call: its type comes from the listing, its identity (an int, which
        the garbage collector need not track) from its folder's device and the listing's
        inode (a folder is stat-ed: loops are told by it)."""
        try:
            if e.is_symlink():
                return self.link(e.path, root)
            if e.is_dir(follow_symlinks=False):
                return "dir", e.stat(follow_symlinks=False)
            if len(e.path) > _LONG_PATH and len(os.fsencode(e.path)) >= _PATH_MAX:
                self.leave("too_long", e.path)  # no call could open it
                return None
            return "file", (self.device(folder) << 64) | e.inode()
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                self.leave("too_long", e.path)
                return None
            try:
                if e.is_dir(follow_symlinks=False):
                    self.leave("unlisted_folder", e.path)  # a folder that cannot be stat-ed cannot be listed
                    return None
            except OSError:
                pass
            return "file", None  # its row says why it cannot be read

    def listing(self, d: str) -> list[os.DirEntry] | None:
        """The entries of folder ``d`` in name order; None when it cannot be listed (said so)."""
        try:
            with os.scandir(d) as it:
                return sorted(it, key=_name)
        except OSError as exc:
            self.leave("too_long" if exc.errno == errno.ENAMETOOLONG else "unlisted_folder", d)
            return None

    def device(self, d: str) -> int:
        """The device of folder ``d`` (one stat per folder): that of the files listed in it,
        except a file bind-mounted onto another (then at worst two such files are taken for
        one; the reader checks each file it opens on its descriptor)."""
        dev = self.devices.get(d)
        if dev is None:
            dev = self.devices[d] = os.stat(d).st_dev
        return dev

    def link(self, path: str, root: str) -> tuple[str, os.stat_result | None] | None:
        if not _inside(os.path.realpath(path), root):
            self.leave("outside", path)
            return None
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.leave("loop", path)
                return None
            if exc.errno == errno.ENAMETOOLONG:
                self.leave("too_long", path)
                return None
            return "file", None  # a dangling link inside the folder: its row says it is missing
        return ("dir" if stat.S_ISDIR(st.st_mode) else "file"), st

    def walk(self, top: str, root: str, top_st: os.stat_result | None = None, ancestors: tuple = ()) -> None:
        """Every file under the folder ``top``, depth first in name order (a folder's
        files before its sub-folders), links followed while they stay inside ``root``."""
        if top_st is None:
            try:
                top_st = os.stat(top)
            except OSError as exc:
                self.leave("too_long" if exc.errno == errno.ENAMETOOLONG else "unlisted_folder", top)
                return
        # (folder, its identity, the identities of the folders above it: a link back to one is a loop)
        stack = [(top, _ident(top_st), ancestors)]
        while stack:
            d, ident, above = stack.pop()
            if ident in above:
                self.leave("loop", d)
                continue
            first = self.walked.get(ident)
            if first is not None:
                if first != d:
                    self.leave("duplicate", d)
                continue
            self.walked[ident] = d
            self.devices[d] = ident >> 64  # (its files' device: no stat for each)
            entries = self.listing(d)
            if entries is None:
                continue
            files: list[tuple[str, str, os.stat_result | None]] = []
            subdirs = []
            for e in entries:
                if self.hidden(e.name, e.path):
                    continue
                found = self.entry(e, root, d)
                if found is None:
                    continue
                kind, st = found
                if kind == "dir":  # (a folder's stat is always known: it was needed to tell it is one)
                    subdirs.append((e.path, _ident(st)))
                else:
                    files.append((e.name, e.path, st))
            shards = self.shards(files) if any(f[0].endswith(".index.json") for f in files) else ()
            for name, path, st in files:
                if name not in shards:
                    self.add_file(path, st)
            down = above + (ident,)
            stack.extend((p, i, down) for p, i in reversed(subdirs))

    def shards(self, files) -> set[str]:
        """Names of the files in one folder that a valid shard index there stands for."""
        out: set[str] = set()
        for name, path, _ in files:
            if name.endswith(".index.json") and not (self.excl and self.excluded(path)):
                try:
                    out.update(os.path.basename(s) for s in index_shards(path))
                except CheckpointError:
                    pass  # not a valid index: scanned like any file, and its files each get a row
        return out

    # ------------------------------------------------------------------ globs
    def glob(self, pattern: str) -> None:
        """Files matching ``pattern``: ``*``, ``?``, ``[...]`` within one name, ``**`` as a
        whole component for any number of folders; a matched folder is walked."""
        parts = [c for c in re.split(r"[/\\]" if os.altsep else "/", pattern) if c]
        lead = os.sep if os.path.isabs(pattern) else ""
        i = next((j for j, c in enumerate(parts) if _MAGIC.search(c)), len(parts))
        base = os.path.abspath(os.path.join(lead, *parts[:i]) if (lead or i) else ".")
        try:
            base_st = os.stat(base)
        except OSError:
            return  # matches nothing
        if not stat.S_ISDIR(base_st.st_mode):
            return
        root = os.path.realpath(base)
        rest = parts[i:]
        # The folders matched so far: (path, stat, identities of the folders above it).
        current = [(base, base_st, ())]
        for j, comp in enumerate(rest):
            last = j == len(rest) - 1
            if comp == "**" and last:  # everything below: the walk
                for d, st, above in current:
                    self.walk(d, root, st, above)
                return
            nxt: list = []
            seen: set[str] = set()
            done: dict[int, str] = {}  # the folders ** matched in this step (identity -> path)

            def keep(path, st, above):
                if path not in seen:
                    seen.add(path)
                    nxt.append((path, st, above))

            for d, st, above in current:
                if comp == "**":
                    for sub in self.folders(d, st, above, root, done):
                        keep(*sub)
                    continue
                down = above + (_ident(st),)
                for path, kind, est in self.match(d, comp, root):
                    if kind == "dir":
                        if last:
                            self.walk(path, root, est, down)
                        else:
                            keep(path, est, down)
                    elif last:
                        self.add_file(path, est)
            current = nxt

    def match(self, d: str, comp: str, root: str):
        """(path, "dir" | "file", stat) of the entries of folder ``d`` matching one
        pattern component, in name order."""
        if not _MAGIC.search(comp):
            p = os.path.join(d, comp)
            try:
                lst = os.lstat(p)
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    self.leave("too_long", p)
                return
            if stat.S_ISLNK(lst.st_mode):
                found = self.link(p, root)
                if found is not None:
                    yield p, found[0], found[1]
            else:
                yield p, ("dir" if stat.S_ISDIR(lst.st_mode) else "file"), lst
            return
        entries = self.listing(d)
        if entries is None:
            return
        for e in entries:
            if not fnmatch.fnmatch(e.name, comp) or self.hidden(e.name, e.path, comp):
                continue
            found = self.entry(e, root, d)
            if found is not None:
                yield e.path, found[0], found[1]

    def folders(self, top: str, top_st: os.stat_result, above: tuple, root: str, done: dict[int, str]):
        """``top`` and every folder below it (what ``**`` matches), each once (``done``:
        those matched already), hidden ones, loops and links leaving ``root`` left out
        (and said so)."""
        stack = [(top, top_st, above)]
        while stack:
            d, st, up = stack.pop()
            ident = _ident(st)
            if ident in up:
                self.leave("loop", d)
                continue
            first = done.get(ident)
            if first is not None:
                if first != d:
                    self.leave("duplicate", d)
                continue
            done[ident] = d
            yield d, st, up
            entries = self.listing(d)
            if entries is None:
                continue
            down = up + (ident,)
            subs = []
            for e in entries:
                try:
                    if not e.is_dir():  # (follows a link: a link to a file is not a folder)
                        continue
                except OSError as exc:  # a link that loops (or a name too long): said, unless hidden
                    if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG) and not self.hidden(e.name, e.path):
                        self.leave("loop" if exc.errno == errno.ELOOP else "too_long", e.path)
                    continue
                if self.hidden(e.name, e.path):
                    continue
                found = self.entry(e, root, d)
                if found is not None and found[0] == "dir":
                    subs.append((e.path, found[1], down))
            stack.extend(reversed(subs))


def _name(e: os.DirEntry) -> str:
    return e.name


__all__ = ["expand_paths", "walk_paths", "Expansion", "LEFT_OUT_REASONS", "NOT_CHECKED"]
