"""Ownership claims a third party can check (docs/spec.md §8).

What to publish when:

1. **Before release**, commit to the key (:func:`commit`, ``nnmark commit``) and publish
   the commitment: stamp it into the released model (:func:`stamp`), post it, have it
   timestamped. It holds nothing secret.
2. **On a dispute**, certify the suspect model (:func:`certify`, ``nnmark certify``): a
   certificate holds the checkpoint's whole-file sha256, the key -- revealed for the
   check --, the commitment, and the verdict (matches, bits, p-value, alpha, the null).
3. Anyone **checks** it (:func:`check_claim`, ``nnmark check``, or the standalone
   ``docs/check_claim.py`` for white-box keys): the revealed key, with the commitment's
   created time, statement and spec, must hash to the commitment, the file to its sha256,
   and the mark must verify, with every verdict field re-derived by the nnmark version
   that made the certificate (another one only when asked: ``any_version``). Against a
   commitment published before the suspect model existed, a key forged afterwards to fit
   the model does not match.

Certificates are parsed strictly (exact members, types, sizes, versions): a malformed one
raises :class:`ClaimError`, never passes.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._keyfile import is_int, parse_json, read_regular, show, write_atomic
from .calibration import Calibration, CalibrationError, calibration_from_body, load_calibration
from .checkpoints import CheckpointError, fd_sha256, identity_of, open_regular, sniff
from .commitments import (SPEC, ClaimError, Commitment, check_header, check_members, commit, load_commitment, read_stamp,
                          stamp, text_ok)
from .keys import MAX_BITS, MAX_KEY_FILE_BYTES, MAX_NAME_CHARS, KeyFileError, canonical_json, key_body, key_from_body
from .rows import STATUSES
from .verdicts import verify
from ._version import __version__

FORMAT = "nnmark-certificate"
VERSION = 1
NOTE = ("This key is revealed for the check: whoever holds this certificate can verify and remove the watermark. "
        "Publish it only to settle a claim.")
MEMBERS = ("format", "version", "spec", "nnmark_version", "note", "commitment", "revealed_key", "checkpoint", "arch",
           "calibration", "verdict")
CHECKPOINT_MEMBERS = ("name", "size", "sha256")
# The verdict's fields: its inputs (alpha, null_rate) and what re-deriving it must give.
VERDICT_MEMBERS = ("status", "verified", "matches", "bits", "ber", "p_value", "threshold", "alpha", "null_rate",
                   "null", "carrier", "carrier_sha256", "controls", "control_matches", "control_p_value", "warning")
# Floats that another implementation computes to about 1e-12 relative (docs/spec.md §6).
FLOAT_FIELDS = ("ber", "p_value", "control_p_value")
REL_TOLERANCE = 1e-9
# A certificate holds a key (a key file is at most 256 MiB) and maybe a calibration (64 MiB).
MAX_FILE_BYTES = MAX_KEY_FILE_BYTES + (64 << 20)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION_TEXT = re.compile(r"[0-9A-Za-z.+!_-]{0,64}")
_MAX_ARCH_CHARS = 4096
_MAX_NULL_CHARS = 200
_MAX_WARNING_CHARS = 16384


def _nnmark_version() -> str:
    """The version of the nnmark running (the package's own, not whatever pip installed
    beside a source tree)."""
    return __version__


@dataclass(frozen=True)
class Certificate:
    """What a third party needs to check a claim (docs/spec.md §8.4): the commitment, the
    key revealed for the check (``revealed_key``: its file's members, secret included),
    the checkpoint (name, size, whole-file sha256), the model factory of a trigger key
    (``arch``), the calibration used (or None) and the verdict. ``to_dict()`` is the file's
    JSON object; ``save(path)`` writes it (mode 0600: it reveals the key)."""

    commitment: Commitment
    revealed_key: dict
    checkpoint: dict
    verdict: dict
    arch: str | None = None
    calibration: dict | None = None
    nnmark_version: str = ""
    spec: int = SPEC

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "spec": self.spec, "nnmark_version": self.nnmark_version,
                "note": NOTE, "commitment": self.commitment.to_dict(), "revealed_key": self.revealed_key,
                "checkpoint": self.checkpoint, "arch": self.arch, "calibration": self.calibration,
                "verdict": self.verdict}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the certificate (mode 0600: it holds the key's secret)."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"
        return write_atomic(path, text.encode("ascii"), private=True)

    def key(self):
        """The revealed key, as a key object."""
        return _revealed_key(self.revealed_key, "certificate")


# ------------------------------------------------------------------ reading
def load_certificate(path: str | os.PathLike) -> Certificate:
    """A certificate file, checked strictly; ClaimError naming the file and the field."""
    p = str(path)
    raw, _ = read_regular(path, MAX_FILE_BYTES, "certificate", ClaimError)
    where = f"certificate {p!r}"
    if not raw.strip():
        raise ClaimError(f"{where} is empty")
    try:
        body = parse_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        raise ClaimError(f"{where} is not valid JSON (truncated, or not a certificate)") from None
    return certificate_from_dict(body, where)


def certificate_from_dict(body: Any, where: str = "certificate") -> Certificate:
    """A certificate from its JSON object: exactly the members of docs/spec.md §8.4, each of
    its type and within its limits, else ClaimError naming ``where`` and the field."""

    def bad(name: str, why: str) -> ClaimError:
        return ClaimError(f"{where}: field {name!r} {why}")

    check_members(body, MEMBERS, where, "", "certificate")
    check_header(body, FORMAT, VERSION, bad)
    ver = body["nnmark_version"]
    if not isinstance(ver, str) or not _VERSION_TEXT.fullmatch(ver):
        raise bad("nnmark_version", f"must be a version such as '0.1.0', got {show(ver)}")
    if body["note"] != NOTE:
        raise bad("note", f"must be exactly {NOTE!r}")
    com = Commitment.from_dict(body["commitment"], where, "commitment.")
    if not isinstance(body["revealed_key"], dict):
        raise bad("revealed_key", f"must be a JSON object (the key's members), got "
                                  f"{type(body['revealed_key']).__name__}")
    ck = body["checkpoint"]
    check_members(ck, CHECKPOINT_MEMBERS, where, "checkpoint.", "certificate")
    if not text_ok(ck["name"], MAX_NAME_CHARS) or not ck["name"]:
        raise bad("checkpoint.name", f"must be a file name of 1 to {MAX_NAME_CHARS} characters, got {show(ck['name'])}")
    if not is_int(ck["size"]) or not 0 <= ck["size"] < 1 << 63:
        raise bad("checkpoint.size", f"must be a size in bytes, got {show(ck['size'])}")
    if not isinstance(ck["sha256"], str) or not _HEX64.fullmatch(ck["sha256"]):
        raise bad("checkpoint.sha256", f"must be 64 lowercase hex digits, got {show(ck['sha256'])}")
    arch = body["arch"]
    if arch is not None and (not text_ok(arch, _MAX_ARCH_CHARS) or arch.count(":") != 1):
        raise bad("arch", f"must be null or a model factory 'module:function', got {show(arch)}")
    cal = body["calibration"]
    if cal is not None and not isinstance(cal, dict):
        raise bad("calibration", f"must be null or a calibration's JSON object, got {type(cal).__name__}")
    verdict = _verdict(body["verdict"], where)
    return Certificate(com, body["revealed_key"], dict(ck), verdict, arch, cal, ver)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _verdict(v: Any, where: str) -> dict:
    check_members(v, VERDICT_MEMBERS, where, "verdict.", "certificate")

    def need(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise ClaimError(f"{where}: field {'verdict.' + name!r} must be {what}, got {show(v[name])}")

    need("status", isinstance(v["status"], str) and v["status"] in STATUSES, f"one of {list(STATUSES)}")
    need("verified", isinstance(v["verified"], bool), "true or false")
    need("bits", is_int(v["bits"]) and 1 <= v["bits"] <= MAX_BITS, f"an integer in [1, {MAX_BITS}]")
    n = v["bits"]
    need("matches", is_int(v["matches"]) and 0 <= v["matches"] <= n, f"an integer in [0, {n}]")
    need("threshold", is_int(v["threshold"]) and 0 <= v["threshold"] <= n + 1, f"an integer in [0, {n + 1}]")
    for name in ("ber", "p_value"):
        need(name, _number(v[name]) and 0 <= v[name] <= 1, "a number in [0, 1]")
    need("alpha", _number(v["alpha"]) and 0 < v["alpha"] < 1, "a number in (0, 1)")
    need("null_rate", v["null_rate"] is None or (_number(v["null_rate"]) and 0 < v["null_rate"] < 1),
         "null or a number in (0, 1)")
    need("null", text_ok(v["null"], _MAX_NULL_CHARS), f"a text of at most {_MAX_NULL_CHARS} characters")
    need("carrier", v["carrier"] is None or text_ok(v["carrier"], MAX_NAME_CHARS), "null or a tensor name")
    need("carrier_sha256", v["carrier_sha256"] is None or (isinstance(v["carrier_sha256"], str)
                                                           and _HEX64.fullmatch(v["carrier_sha256"]) is not None),
         "null or 64 lowercase hex digits")
    need("controls", v["controls"] is None or (is_int(v["controls"]) and 1 <= v["controls"] <= 1 << 21),
         "null or a positive integer")
    k = v["controls"] or 0
    need("control_matches", v["control_matches"] is None or (is_int(v["control_matches"])
                                                             and 0 <= v["control_matches"] <= k),
         f"null or an integer in [0, {k}]")
    need("control_p_value", v["control_p_value"] is None or (_number(v["control_p_value"])
                                                             and 0 <= v["control_p_value"] <= 1),
         "null or a number in [0, 1]")
    need("warning", v["warning"] is None or text_ok(v["warning"], _MAX_WARNING_CHARS), "null or a text")
    return dict(v)


def _revealed_key(body: dict, where: str):
    """The key of a certificate's ``revealed_key``; ClaimError naming the member. The body
    must be exactly the canonical members of that key (docs/spec.md §8.1)."""
    try:
        key = key_from_body(body, f"{where}: field 'revealed_key'")
    except KeyFileError as exc:
        raise ClaimError(str(exc)) from None
    canon = key_body(key)
    odd = sorted(set(body) ^ set(canon)) or sorted(n for n in canon
                                                   if canonical_json(canon[n]) != canonical_json(body[n]))
    if odd:  # an unknown member, or one written otherwise than nnmark writes it (e.g. an uppercase secret)
        raise ClaimError(f"{where}: field {'revealed_key.' + odd[0]!r} is not as the key's file holds it (unknown, "
                         f"missing or not in canonical form)")
    return key


# ------------------------------------------------------------------ certify
def _identity(path: str) -> tuple:
    st = os.stat(path)
    return identity_of(st)


def _whole_file(path: str) -> tuple[int, str, tuple]:
    """(size, sha256, identity) of a single regular checkpoint file."""
    try:
        fmt = sniff(path)
        fd, st = open_regular(path)
    except CheckpointError as exc:
        raise ClaimError(f"cannot read the checkpoint {path!r}: {exc}") from None
    try:
        if fmt == "hf-sharded":
            raise ClaimError(f"{path!r} is a shard index: certify and check a single checkpoint file (its sha256 "
                             f"covers the whole file)")
        digest = fd_sha256(fd)
        end = os.fstat(fd)
    except OSError as exc:
        raise ClaimError(f"cannot read the checkpoint {path!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if identity_of(end) != identity_of(st):
        raise ClaimError(f"the checkpoint {path!r} changed while it was read; try again")
    return st.st_size, digest, identity_of(st)


def _verdict_fields(v, null_rate) -> dict:
    row = v.to_dict()
    out = {name: row.get(name) for name in VERDICT_MEMBERS if name != "null_rate"}
    out["null_rate"] = None if null_rate is None else float(null_rate)
    out["verified"] = bool(out["verified"])
    return {name: out[name] for name in VERDICT_MEMBERS}


def _calibration_of(calibration) -> Calibration | None:
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(calibration)
    raise TypeError(f"calibration must be an nnmark.Calibration or a calibration file, got "
                    f"{type(calibration).__name__}")


def certify(key, checkpoint: str | os.PathLike, commitment, *, alpha: float = 1e-6, null_rate: float | None = None,
            calibration=None, arch: str | None = None, device=None) -> Certificate:
    """A certificate of ``key``'s mark in one checkpoint file, for a third party to check.

    Args:
        key: the key, as committed to earlier.
        checkpoint: a single checkpoint file (safetensors or torch); its whole-file sha256
            goes into the certificate.
        commitment: the commitment published earlier (a :class:`Commitment` or its file);
            the key must hash to it.
        alpha: significance level of the verdict.
        null_rate: the chance match rate under the null (default 1/2 per bit, 1/classes per trigger).
        calibration: a calibration of the key (object or file), included whole (it holds no secret).
        arch: trigger keys: the model factory as ``"module:function"`` text (recorded: a
            verifier passes the same).
        device: where carriers are projected / models run.

    Returns:
        A :class:`Certificate` (``save(path)``); its verdict says whether the mark verifies.

    Raises:
        ClaimError: the key does not match the commitment, the checkpoint is not one
            readable file, changed while it was read, or could not be checked.
    """
    com = commitment if isinstance(commitment, Commitment) else load_commitment(commitment)
    if not com.matches(key):
        raise ClaimError(f"the key (key_id {key.key_id}) does not match commitment {com.id}: with the commitment's "
                         f"created, statement and spec it hashes to {com.hash_of(key)[:16]}; certify with the key "
                         f"that was committed to")
    kind = key.file_kind
    if kind == "trigger":
        if not isinstance(arch, str):
            raise ValueError("a trigger key runs the model: pass arch= as 'module:function' text (recorded in the "
                             "certificate, so that a verifier can name the same factory)")
    elif arch is not None:
        raise ValueError("arch is for trigger keys; a white-box key reads the carrier's weights")
    cal = _calibration_of(calibration)
    path = os.fspath(checkpoint)
    if not text_ok(os.path.basename(path), MAX_NAME_CHARS):
        raise ClaimError(f"the checkpoint's name {show(os.path.basename(path))} is not text a certificate can hold "
                         f"(not valid Unicode, or too long): rename the file")
    size, digest, ident = _whole_file(path)
    v = verify(key, path, alpha=alpha, null_rate=null_rate, calibration=cal, arch=arch, device=device)
    if _identity(path) != ident:
        raise ClaimError(f"the checkpoint {path!r} changed while it was checked; try again")
    if v.status != "ok":
        raise ClaimError(f"{path!r} could not be checked: {v.status} ({v.error_class}): {v.detail}")
    return Certificate(com, key_body(key), {"name": os.path.basename(path), "size": size, "sha256": digest},
                       _verdict_fields(v, null_rate), arch, cal.file_body() if cal is not None else None,
                       _nnmark_version())


# ------------------------------------------------------------------ check
@dataclass
class ClaimCheck:
    """The result of :func:`check_claim`. ``holds``: every check passed; ``failures``:
    (field, message) for each that did not, the field as the certificate names it
    (``commitment.commitment``, ``checkpoint.sha256``, ``verdict.matches``, ...);
    ``notes``: what was not compared and why (e.g. a version difference accepted with
    ``any_version``), and what the checkpoint's stamp says;
    ``stamp``: the commitment stamped into the checkpoint, if any; ``verdict``: the
    re-derived :class:`~nnmark.Verdict`."""

    holds: bool
    failures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    commitment: Commitment | None = None
    stamp: Commitment | None = None
    verdict: Any = None

    @property
    def exit_code(self) -> int:
        """0 the claim holds, 1 it does not (the CLI's convention)."""
        return 0 if self.holds else 1


def check_claim(certificate, checkpoint: str | os.PathLike, *, commitment=None, arch: str | None = None,
                device=None, any_version: bool = False) -> ClaimCheck:
    """Re-derives everything a certificate says about ``checkpoint``.

    Args:
        certificate: a :class:`Certificate` or a certificate file.
        checkpoint: the checkpoint file the claim is about.
        commitment: the commitment you trust (a :class:`Commitment` or its file), e.g. the
            one the owner published before the dispute; the certificate's must equal it.
            Without it, the certificate's own commitment is used and the result says so.
        arch: trigger keys: the model factory, the same ``"module:function"`` the
            certificate names (nnmark never imports what a certificate names by itself).
        device: where carriers are projected / models run.
        any_version: accept a certificate made by another nnmark version (its
            ``nnmark_version``): the verdict is re-derived by this one, and a note says so.
            By default such a certificate does not hold (field ``nnmark_version``).

    Returns:
        A :class:`ClaimCheck`: ``holds`` only when the revealed key, with the commitment's
        created, statement and spec, hashes to the commitment (and that equals
        ``commitment``), the file has the certificate's size and sha256, the mark verifies,
        every verdict field re-derives to the certificate's value, and the certificate was
        made by this nnmark version (or ``any_version``).

    Raises:
        ClaimError: a malformed certificate, commitment or revealed key, or a checkpoint
            that cannot be read.
    """
    if isinstance(certificate, Certificate):
        cert, where = certificate_from_dict(certificate.to_dict()), "certificate"
    else:
        cert, where = load_certificate(certificate), f"certificate {str(certificate)!r}"
    trusted = None
    if commitment is not None:
        trusted = commitment if isinstance(commitment, Commitment) else load_commitment(commitment)
    key = _revealed_key(cert.revealed_key, where)
    cal = None
    if cert.calibration is not None:
        try:
            cal = calibration_from_body(cert.calibration, f"{where}: field 'calibration'")
        except CalibrationError as exc:
            raise ClaimError(str(exc)) from None
    failures: list[tuple[str, str]] = []
    notes: list[str] = []

    def fail(name: str, why: str) -> None:
        failures.append((name, f"field {name!r}: {why}"))

    # 1. the revealed key against the commitment (the certificate's, and the one trusted)
    com = cert.commitment
    mine = com.hash_of(key)
    if mine != com.commitment:  # the hash covers the key and the details: which one was edited cannot be told
        fail("commitment.commitment", f"the revealed key (revealed_key, key_id {key.key_id}) with the commitment's "
                                      f"created, statement and spec (commitment.created, commitment.statement, "
                                      f"commitment.spec) hashes to {mine}, not to the certificate's commitment "
                                      f"{com.commitment}: the key or those details are not the ones committed to")
    kind = key.file_kind
    carrier = None if kind == "trigger" else key.carrier
    for name, want in (("kind", kind), ("carrier", carrier), ("bits", len(key))):
        if getattr(com, name) != want:
            fail(f"commitment.{name}", f"the certificate says {_val(getattr(com, name))}, the revealed key has "
                                       f"{_val(want)}")
    if trusted is not None:
        for name in ("commitment", "kind", "carrier", "bits", "created", "statement", "spec"):
            if getattr(com, name) != getattr(trusted, name):
                fail(f"commitment.{name}", f"the certificate says {_val(getattr(com, name))}, the commitment you "
                                           f"trust says {_val(getattr(trusted, name))}")
    else:
        notes.append(f"the commitment was taken from the certificate itself ({com.describe()}); pass the commitment "
                     f"published before the dispute (commitment=, --commitment) to check that it is that one")
    # 2. the checkpoint file
    path = os.fspath(checkpoint)
    size, digest, ident = _whole_file(path)
    ck = cert.checkpoint
    if ck["name"] != os.path.basename(path):
        fail("checkpoint.name", f"the certificate is about {show(ck['name'])}, the file checked is named "
                                f"{show(os.path.basename(path))}")
    if ck["size"] != size:
        fail("checkpoint.size", f"the certificate says {ck['size']} bytes, the file has {size}")
    if ck["sha256"] != digest:
        fail("checkpoint.sha256", f"the certificate says {ck['sha256']}, the file's sha256 is {digest}: not the "
                                  f"file certified")
    stamped = None
    try:
        stamped = read_stamp(path)
    except ClaimError as exc:
        notes.append(f"the checkpoint's stamp could not be read: {exc}")
    if stamped is not None:
        same = "the certificate's commitment" if stamped == com else (
            "another commitment to the revealed key" if stamped.matches(key)
            else "another commitment (a stamp is the file's own claim, whoever wrote it)")
        notes.append(f"the checkpoint is stamped with {stamped.describe()}: {same}")
    # 3. the verdict, re-derived with the certificate's inputs
    v = cert.verdict
    if kind == "trigger":
        if arch is None:
            raise ClaimError(f"{where} is about a trigger key: pass arch= (--arch) naming the model factory, "
                             f"{show(cert.arch)} as the certificate says")
        if cert.arch != arch:
            fail("arch", f"the certificate was made with arch {show(cert.arch)}, the check runs {show(arch)}")
    else:
        if cert.arch is not None:
            fail("arch", f"a white-box certificate has no arch, this one says {show(cert.arch)}")
        arch = None
    if cal is not None and v["null_rate"] is not None:
        fail("verdict.null_rate", "a certificate with a calibration has no null_rate (the calibration is the null)")
        redo = None
    else:
        try:
            redo = verify(key, path, alpha=v["alpha"], null_rate=v["null_rate"], calibration=cal, arch=arch,
                          device=device)
        except (CalibrationError, ValueError) as exc:  # e.g. a calibration of another key
            fail("calibration" if isinstance(exc, CalibrationError) else "verdict",
                 f"the verdict cannot be re-derived: {exc}")
            redo = None
    if _identity(path) != ident:
        raise ClaimError(f"the checkpoint {path!r} changed while it was checked; try again")
    if redo is not None:
        got = _verdict_fields(redo, v["null_rate"])
        inputs = f"at verdict.alpha = {v['alpha']!r}" + (f", verdict.null_rate = {v['null_rate']!r}"
                                                           if v["null_rate"] is not None else "")
        for name in VERDICT_MEMBERS:
            if name in ("alpha", "null_rate"):
                continue
            a, b = v[name], got[name]
            if not _same(name, a, b):
                fail(f"verdict.{name}", f"the certificate says {_val(a)}, re-deriving it {inputs} gives {_val(b)}")
        if not redo.verified:
            fail("verdict.verified", f"the mark does not verify in this file ({redo.status}, p-value "
                                     f"{redo.p_value:.3g} {inputs})")
    if not v["verified"]:
        fail("verdict.verified", "the certificate does not claim that the mark verifies")
    running = _nnmark_version()
    if cert.nnmark_version != running:
        made = f"the certificate was made by nnmark {show(cert.nnmark_version)}, this is nnmark {show(running)}"
        if any_version:
            notes.append(f"{made}; accepted (any_version): the verdict was re-derived by this version")
        else:  # another version may derive otherwise (a fixed bug, a changed default): say it, never hide it
            fail("nnmark_version", f"{made}: check it with that version, or pass any_version=True (--any-version) "
                                   f"to accept the verdict as this version re-derives it")
    seen, unique = set(), []
    for name, msg in failures:
        if msg not in seen:
            seen.add(msg)
            unique.append((name, msg))
    return ClaimCheck(not unique, unique, notes, com, stamped, redo)


def _val(v) -> str:
    """A value in a message: whole when short enough to compare by eye (a sha256), else cut."""
    r = repr(v)
    return r if len(r) <= 100 else show(v)


def _same(name: str, a, b) -> bool:
    if name in FLOAT_FIELDS and a is not None and b is not None and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=0.0)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b and type(a) is type(b) or (is_int(a) and is_int(b) and a == b)


__all__ = ["Certificate", "ClaimCheck", "ClaimError", "Commitment", "certify", "check_claim", "commit",
           "load_certificate", "certificate_from_dict", "load_commitment", "read_stamp", "stamp", "FORMAT",
           "VERSION", "NOTE"]
