"""Ownership commitments: a public promise, made before release, that a key exists
(docs/spec.md §8).

A claim of ownership holds only if the key was fixed before the suspect model
existed. :func:`commit` turns a key into a :class:`Commitment`: the SHA-256, under a
domain tag, of the key's canonical bytes together with the spec version, a creation time
and an optional owner statement, plus the key's kind, carrier and number of bits. It
holds nothing secret and reveals nothing about the bits (the hashed bytes include the
key's 32-byte secret). The hash binds the time and the statement too: neither can be
edited without the commitment ceasing to match the key. Publish it before the model is
released -- :func:`stamp` writes it into the released safetensors file's metadata -- and
reveal the key only when you must prove ownership (:mod:`nnmark.claims`).

The ``created`` time is the committer's own word: it proves nothing. What proves the key
came first is where and when the commitment was published (stamped into the released
model, posted publicly, given to a timestamping service).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._keyfile import is_int, parse_json, read_regular, show, write_atomic, write_atomic_with
from .checkpoints import (HEAD_BYTES, HEADER_LIMIT_BYTES, STAMP_KEY, CheckpointError, SafetensorsFile, open_regular,
                          sniff_head)
from .keys import MAX_BITS, MAX_NAME_CHARS, canonical_json, key_body

FORMAT = "nnmark-commitment"
VERSION = 1
SPEC = 1  # the version of docs/spec.md whose derivations a commitment (and a certificate) follows
DOMAIN = b"nnmark:commitment:v1:"
KINDS = ("whitebox", "whitebox-dense", "trigger")
MEMBERS = ("format", "version", "spec", "commitment", "kind", "carrier", "bits", "created", "statement")
# A commitment is a few hundred bytes; a statement a sentence or a paragraph.
MAX_FILE_BYTES = 64 << 10
MAX_STATEMENT_CHARS = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CREATED = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00")
_COPY_CHUNK = 1 << 20


class ClaimError(ValueError):
    """A commitment or certificate that cannot be used (unreadable, not JSON, of another
    version, a field missing, unknown, of the wrong type or too large), or a claim that
    cannot be made or checked. The message names the file and the field."""


def key_bytes(key) -> bytes:
    """The canonical bytes of a key (docs/spec.md §8.1): the canonical JSON of its file's
    members but ``created``, ``warning`` and ``checksum``. They hold the secret."""
    return canonical_json(key_body(key))


def commitment_hash(key, created: str, statement: str | None = None, spec: int = SPEC) -> str:
    """What a commitment publishes (docs/spec.md §8.2): hex(SHA-256(b"nnmark:commitment:v1:" ‖
    canonical JSON of {"created": created, "key": key body, "spec": spec, "statement":
    statement})), the key body being the object whose canonical JSON :func:`key_bytes` is."""
    details = {"created": created, "key": key_body(key), "spec": spec, "statement": statement}
    return hashlib.sha256(DOMAIN + canonical_json(details)).hexdigest()


def _key_shape(key) -> tuple[str, str | None, int]:
    """(kind, carrier or None, bits or triggers) of a key, as a commitment states them."""
    kind = key.file_kind
    if kind == "deepsigns":  # its claims would run the model on a file: spec §8 does not cover that yet
        raise TypeError("ownership claims take white-box, dense and trigger keys; DeepSigns keys are not supported")
    return kind, (None if kind == "trigger" else key.carrier), len(key)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Commitment:
    """A public commitment to a key (docs/spec.md §8.2). ``commitment``: the hash of the
    key's canonical bytes with ``created``, ``statement`` and ``spec`` (64 hex digits,
    :func:`commitment_hash`); ``kind``, ``carrier`` (None for trigger keys), ``bits`` (T,
    or the number of triggers n); ``created``: UTC time, ISO 8601, the committer's own
    word; ``statement``: an optional owner statement. ``id``: the first 16 hex digits of
    ``commitment``, for display."""

    commitment: str
    kind: str
    carrier: str | None
    bits: int
    created: str
    statement: str | None = None
    spec: int = SPEC

    @property
    def id(self) -> str:
        return self.commitment[:16]

    def hash_of(self, key) -> str:
        """The commitment ``key`` would have with this commitment's created, statement and spec."""
        return commitment_hash(key, self.created, self.statement, self.spec)

    def matches(self, key) -> bool:
        """Whether this is a commitment to ``key``: ``key`` with this commitment's created,
        statement and spec hashes to it, and it states the key's kind, carrier and size."""
        return (hmac.compare_digest(self.hash_of(key), self.commitment)
                and (self.kind, self.carrier, self.bits) == _key_shape(key))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "spec": self.spec, "commitment": self.commitment,
                "kind": self.kind, "carrier": self.carrier, "bits": self.bits, "created": self.created,
                "statement": self.statement}

    def to_json(self) -> str:
        """The canonical JSON (docs/spec.md §2.2): what a stamp holds."""
        return canonical_json(self.to_dict()).decode("ascii")

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the commitment as JSON (nothing secret in it: publish it)."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=True) + "\n"
        return write_atomic(path, text.encode("ascii"))

    def describe(self) -> str:
        what = f"carrier {self.carrier}, {self.bits} bits" if self.carrier is not None else f"{self.bits} triggers"
        return f"commitment {self.id} ({self.kind}, {what}, created {self.created})"

    @classmethod
    def from_dict(cls, body: Any, where: str = "commitment", prefix: str = "") -> "Commitment":
        """A commitment from its JSON object, checked strictly: exactly the members of
        docs/spec.md §8.2, each of its type and within its limits; ClaimError naming
        ``where`` and the field (``prefix`` + name) otherwise."""

        def bad(name: str, why: str) -> ClaimError:
            return ClaimError(f"{where}: field {prefix + name!r} {why}")

        check_members(body, MEMBERS, where, prefix, "commitment")
        check_header(body, FORMAT, VERSION, bad)
        c = body["commitment"]
        if not isinstance(c, str) or not _HEX64.fullmatch(c):
            raise bad("commitment", f"must be 64 lowercase hex digits, got {show(c)}")
        kind = body["kind"]
        if not isinstance(kind, str) or kind not in KINDS:
            raise bad("kind", f"must be one of {list(KINDS)}, got {show(kind)}")
        carrier = body["carrier"]
        if kind == "trigger":
            if carrier is not None:
                raise bad("carrier", f"must be null for a trigger key, got {show(carrier)}")
        elif not text_ok(carrier, MAX_NAME_CHARS) or not carrier:
            raise bad("carrier", f"must be a state-dict name of 1 to {MAX_NAME_CHARS} characters, got {show(carrier)}")
        bits = body["bits"]
        if not is_int(bits) or not 1 <= bits <= MAX_BITS:
            raise bad("bits", f"must be an integer in [1, {MAX_BITS}], got {show(bits)}")
        created = body["created"]
        if not isinstance(created, str) or not _CREATED.fullmatch(created) or not _valid_time(created):
            raise bad("created", f"must be a UTC time such as '2025-01-01T00:00:00+00:00', got {show(created)}")
        statement = body["statement"]
        if statement is not None and not text_ok(statement, MAX_STATEMENT_CHARS):
            raise bad("statement", f"must be null or a text of at most {MAX_STATEMENT_CHARS} characters, got "
                                   f"{show(statement)}")
        return cls(c, kind, carrier, int(bits), created, statement)


def check_members(body: Any, members: tuple, where: str, prefix: str, what: str) -> None:
    """``body`` is a JSON object with exactly ``members``, else ClaimError naming ``where`` and
    the field (``prefix`` + name); ``what`` names the object ("commitment", "certificate")."""
    if not isinstance(body, dict):
        raise ClaimError(f"{where}: {('field ' + repr(prefix.rstrip('.'))) if prefix else 'the ' + what} must be "
                         f"a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(members))
    if unknown:
        raise ClaimError(f"{where}: field {prefix + unknown[0]!r} is not a field of a {what} (unknown fields "
                         f"are refused)")
    for name in members:
        if name not in body:
            raise ClaimError(f"{where}: field {prefix + name!r} is missing")


def check_header(body: dict, fmt: str, version: int, bad) -> None:
    """The ``format``, ``version`` and ``spec`` members every claim file opens with."""
    if body["format"] != fmt:
        raise bad("format", f"must be {fmt!r}, got {show(body['format'])}")
    for name, want in (("version", version), ("spec", SPEC)):
        v = body[name]
        if not is_int(v) or v != want:
            raise bad(name, f"must be {want} (this nnmark reads version {want}), got {show(v)}")


def text_ok(v: Any, limit: int) -> bool:
    """A str of at most ``limit`` characters that is text (no lone surrogate)."""
    if not isinstance(v, str) or len(v) > limit:
        return False
    try:
        v.encode("utf-8")  # a lone surrogate is no text
    except UnicodeEncodeError:
        return False
    return True


def _valid_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def commit(key, *, statement: str | None = None, created: str | None = None) -> Commitment:
    """A public commitment to ``key``: publish it before you release a model.

    Args:
        key: a white-box, dense or trigger key.
        statement: an optional owner statement (e.g. "ACME Corp, model v3"), at most 4096
            characters. Covered by the hash, like ``created``: an edited one no longer matches.
        created: the UTC time to state, ISO 8601 to the second (default: now). Self-declared:
            it proves nothing; publishing the commitment early does.

    Returns:
        A :class:`Commitment` (``save(path)`` writes it; :func:`stamp` writes it into a
        safetensors file).
    """
    kind, carrier, bits = _key_shape(key)
    when = created or _now()
    c = Commitment("0" * 64, kind, carrier, bits, when, statement)
    Commitment.from_dict(c.to_dict(), "commit()")  # the same checks as a file gets, before hashing them
    return Commitment(commitment_hash(key, when, statement, SPEC), kind, carrier, bits, when, statement)


def load_commitment(path: str | os.PathLike) -> Commitment:
    """A commitment file (from :meth:`Commitment.save` or ``nnmark commit``); ClaimError on any defect."""
    p = str(path)
    raw, _ = read_regular(path, MAX_FILE_BYTES, "commitment", ClaimError)
    return parse_commitment(raw, f"commitment {p!r}")


def parse_commitment(raw: bytes | str, where: str) -> Commitment:
    """A commitment from its JSON text (a file's bytes, a stamp's text)."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise ClaimError(f"{where} is not valid text") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ClaimError(f"{where} has {len(raw)} bytes, more than a commitment holds ({MAX_FILE_BYTES})")
    if not raw.strip():
        raise ClaimError(f"{where} is empty")
    try:
        body = parse_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ClaimError(f"{where} is not valid JSON (truncated, or not a commitment)") from None
    return Commitment.from_dict(body, where)


# ------------------------------------------------------------------ stamps
def read_stamp(path: str | os.PathLike) -> Commitment | None:
    """The commitment stamped into a safetensors file (None when it holds none, or is not a
    safetensors file). Raises ClaimError when the file cannot be read or its stamp is malformed."""
    p = os.fspath(path)
    try:
        fd, st = open_regular(p)
        try:
            head = os.pread(fd, min(st.st_size, HEAD_BYTES), 0)
        except OSError as exc:
            os.close(fd)
            raise ClaimError(f"cannot read {p!r}: {exc.strerror or exc}") from None
        if sniff_head(head) != "safetensors":
            os.close(fd)
            return None
        with SafetensorsFile(p, st, fd, head) as sf:  # it owns fd now
            raw = sf.stamp
    except CheckpointError as exc:
        raise ClaimError(f"cannot read {p!r}: {exc}") from None
    return None if raw is None else parse_commitment(raw, f"the stamp in {p!r}")


@functools.lru_cache(maxsize=64)
def parsed_stamp(raw: str) -> Commitment | None:
    """A stamp's commitment, or None when it is malformed (for scan rows: a file's stamp is
    the file's claim, and a bad one is reported, never believed)."""
    try:
        return parse_commitment(raw, "stamp")
    except ClaimError:
        return None


def stamp(path: str | os.PathLike, commitment, *, output: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """Writes ``commitment`` into a safetensors file's metadata (``__metadata__`` entry
    ``nnmark.commitment``, docs/spec.md §8.3).

    Only the header is rewritten: the tensors, their names, shapes and bytes, and the other
    metadata stay as they are. The new file is written beside the target through a fresh
    temporary file (created exclusively, never through a link), then renamed over it, with
    the file's mode kept.

    Args:
        path: a safetensors file.
        commitment: a :class:`Commitment` or a commitment file.
        output: where to write the stamped file (default: ``path`` itself, replaced).
        force: replace a stamp of another commitment (else ClaimError).

    Returns:
        The path written.

    Raises:
        ClaimError: not a safetensors file, a damaged one, a stamp of another commitment
            already there (without ``force``), or the file changed while it was copied.
    """
    c = commitment if isinstance(commitment, Commitment) else load_commitment(commitment)
    src = os.fspath(path)
    dst = Path(output) if output is not None else Path(src)
    try:
        fd, st = open_regular(src)
    except CheckpointError as exc:
        raise ClaimError(f"cannot stamp {src!r}: {exc}") from None
    try:
        head = os.pread(fd, min(st.st_size, HEAD_BYTES), 0)
        fmt = sniff_head(head)
        if fmt != "safetensors":
            raise ClaimError(f"cannot stamp {src!r}: stamps go into a safetensors file's metadata, and this is "
                             f"{'an empty file' if fmt == 'empty' else 'not a safetensors file'} (save the model "
                             f"with safetensors)")
        try:  # the whole layout checked as a scan checks it (a descriptor of the same open file)
            with SafetensorsFile(src, st, os.dup(fd), head) as sf:
                old = sf.stamp
        except CheckpointError as exc:
            raise ClaimError(f"cannot stamp {src!r}: {exc}") from None
        text = c.to_json()
        if old is not None and old != text:
            prev = parsed_stamp(old)
            if not force:
                what = f"commitment {prev.id}" if prev is not None else "a malformed stamp"
                raise ClaimError(f"{src!r} is already stamped with {what}; pass force=True (--force) to replace it")
        if old == text and dst == Path(src):
            return dst
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, n, 8).decode("utf-8"))  # checked above
        meta = dict(header.pop("__metadata__", None) or {})
        meta[STAMP_KEY] = text
        blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # tensor data stays 8-byte aligned, as safetensors writes it
        if len(blob) > HEADER_LIMIT_BYTES:
            raise ClaimError(f"cannot stamp {src!r}: its header would be {len(blob)} bytes, over the limit of "
                             f"{HEADER_LIMIT_BYTES}")

        def write(f) -> None:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            offset, end = 8 + n, st.st_size
            while offset < end:  # the tensor data, byte for byte
                chunk = os.pread(fd, min(_COPY_CHUNK, end - offset), offset)
                if not chunk:
                    break
                f.write(chunk)
                offset += len(chunk)
            now = os.fstat(fd)
            if offset != end or (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (st.st_size, st.st_mtime_ns,
                                                                                    st.st_ctime_ns):
                raise ClaimError(f"cannot stamp {src!r}: the file changed while it was copied; try again")

        try:
            write_atomic_with(dst, write, mode=stat.S_IMODE(st.st_mode))
        except OSError as exc:
            raise ClaimError(f"cannot write {str(dst)!r}: {exc.strerror or exc}") from None
    except OSError as exc:  # reading the source failed (an I/O error)
        raise ClaimError(f"cannot stamp {src!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    got = read_stamp(dst)
    if got != c:  # pragma: no cover - what was just written reads back
        raise ClaimError(f"the stamp written to {str(dst)!r} does not read back")
    return dst


__all__ = ["Commitment", "ClaimError", "commit", "load_commitment", "parse_commitment", "read_stamp", "stamp",
           "parsed_stamp", "commitment_hash", "key_bytes", "FORMAT", "VERSION", "SPEC", "DOMAIN", "STAMP_KEY"]
