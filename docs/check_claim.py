#!/usr/bin/env python3
"""Check an nnmark ownership certificate without nnmark, following docs/spec.md.

    python3 check_claim.py CERTIFICATE CHECKPOINT.safetensors [--commitment COMMITMENT]

Needs only the Python standard library and numpy. It re-derives, from the spec alone
(§2.2 canonical JSON, §3 key ids, §4 the projection, §6 the binomial verdict, §8 claims):
the commitment hash of the revealed key with the commitment's created time, statement and
spec, the checkpoint's size and whole-file sha256, the carrier's bytes and their sha256,
its reduction, the projection (Philox4x32-10 in numpy uint32 arithmetic), the extracted
bits, the matches, the exact binomial p-value and threshold (integer arithmetic), and
compares each with the certificate.

Scope (docs/spec.md §8.6): white-box certificates (kinds whitebox and whitebox-dense) of
a single safetensors file whose carrier is F32, F16, BF16 or F64, with the binomial null
(no calibration). Trigger certificates run a model, and calibrated ones fit a
beta-binomial: check those with `nnmark check` (this script exits 2 on them).
The certificate's `nnmark_version` is ignored: it names the nnmark that made it, and
this script is not nnmark (§8.5, §8.6).

Exit codes: 0 the claim holds; 1 it does not (each failing field is printed);
2 the certificate or checkpoint cannot be checked (malformed, out of scope, unreadable).
"""
import base64
import hashlib
import json
import math
import os
import struct
import sys
from fractions import Fraction

import numpy as np

DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}  # BF16: the high half of a float32
PREFIXES = ("module.", "model.", "_orig_mod.")  # wrapper prefixes (§4.2 carrier names)
REL_TOLERANCE = 1e-9  # p-values: float64 of an exact value (§6.2)
MEMBERS = ("format", "version", "spec", "nnmark_version", "note", "commitment", "revealed_key", "checkpoint", "arch",
           "calibration", "verdict")
COMMITMENT = ("format", "version", "spec", "commitment", "kind", "carrier", "bits", "created", "statement")
VERDICT = ("status", "verified", "matches", "bits", "ber", "p_value", "threshold", "alpha", "null_rate", "null",
           "carrier", "carrier_sha256", "controls", "control_matches", "control_p_value", "warning")
NOTE = ("This key is revealed for the check: whoever holds this certificate can verify and remove the watermark. "
        "Publish it only to settle a claim.")


class CannotCheck(Exception):
    pass


def same(a, b):  # JSON values equal as JSON: true is not 1, 1.0 is not 1
    return a == b and type(a) is type(b)


def canonical(obj):  # §2.2
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def strict_json(raw):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def philox(c0, c1, c2, c3, k0, k1):  # §4.4, on numpy uint32 arrays
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    k0, k1 = np.uint32(k0), np.uint32(k1)
    for r in range(10):
        if r:
            k0, k1 = k0 + np.uint32(0x9E3779B9), k1 + np.uint32(0xBB67AE85)
        p0, p1 = m0 * c0.astype(np.uint64), m1 * c2.astype(np.uint64)
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keyed_projection(secret, carrier, t, v):  # §4.3, §4.5, §4.6: p = X . v
    d = hashlib.sha256(secret + b"nnmark:projection:v1:" + carrier.encode("utf-8")).digest()
    k0, k1 = int.from_bytes(d[0:4], "little"), int.from_bytes(d[4:8], "little")
    p = np.zeros(t)
    shifts = np.arange(32, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, v.size, 1 << 15):  # columns in chunks: X is never held whole
            i = np.arange(start, min(start + (1 << 15), v.size), dtype=np.uint64)
            lo, hi = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32), (i >> np.uint64(32)).astype(np.uint32)
            for b in range((t + 127) // 128):
                words = np.stack(philox(lo, hi, np.full_like(lo, b), np.zeros_like(lo), k0, k1))  # [4, cols]
                bits = ((words[:, None, :] >> shifts[None, :, None]) & 1).reshape(128, -1)  # row j: bit j
                rows = min(128, t - 128 * b)
                p[128 * b:128 * b + rows] += (2.0 * bits[:rows] - 1.0) @ v[start:start + i.size]
    return p


def binomial_tails(n, p0):
    """Exact P[X >= m] for m = 0..n+1, X ~ Binomial(n, p0), as Fractions (p0 a Fraction)."""
    a, b, d = p0.numerator, p0.denominator - p0.numerator, p0.denominator
    tails, acc = [Fraction(0)] * (n + 2), 0
    for k in range(n, -1, -1):
        acc += math.comb(n, k) * a ** k * b ** (n - k)
        tails[k] = Fraction(acc, d ** n)
    return tails


def main(argv):
    args = list(argv)
    trusted = None
    if "--commitment" in args:
        i = args.index("--commitment")
        trusted = args[i + 1]
        del args[i:i + 2]
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cert_path, ck_path = args
    failures, out = [], []

    def check(field, ok, why, against=""):
        if ok:
            out.append(f"ok    {field}{against}")
        else:
            failures.append(f"FAIL  field {field!r}: {why}")

    cert = strict_json(open(cert_path, "rb").read())
    if not all(same(cert.get(k), want) for k, want in (("format", "nnmark-certificate"), ("version", 1), ("spec", 1))):
        raise CannotCheck("not an nnmark certificate of version 1, spec 1")
    key, com, ck, v = cert["revealed_key"], cert["commitment"], cert["checkpoint"], cert["verdict"]
    for obj, names in ((cert, MEMBERS), (com, COMMITMENT), (ck, ("name", "size", "sha256")), (v, VERDICT)):
        if set(obj) != set(names):  # exactly the members of §8.2 and §8.4
            raise CannotCheck(f"unknown or missing members: {sorted(set(obj) ^ set(names))}")
    check("note", cert["note"] == NOTE, "is not the note of §8.4")
    kind = key["kind"]
    if kind not in ("whitebox", "whitebox-dense"):
        raise CannotCheck(f"a {kind!r} certificate: this script checks white-box ones (use nnmark check)")
    if cert["calibration"] is not None:
        raise CannotCheck("the verdict uses a calibration (a beta-binomial null): use nnmark check")
    if cert["arch"] is not None:
        raise CannotCheck("a white-box certificate has no arch")

    # 1. the commitment (§8.1, §8.2): the key and the commitment's details, hashed together
    details = {"created": com["created"], "key": key, "spec": com["spec"], "statement": com["statement"]}
    mine = hashlib.sha256(b"nnmark:commitment:v1:" + canonical(details)).hexdigest()
    check("commitment.commitment", mine == com["commitment"],
          f"the revealed key with commitment.created, commitment.statement and commitment.spec hashes to {mine}: "
          f"the key or those details are not the ones committed to")
    check("commitment.kind", com["kind"] == kind, "not the revealed key's kind")
    check("commitment.carrier", com["carrier"] == key["carrier"], "not the revealed key's carrier")
    check("commitment.bits", same(com["bits"], key["num_bits"]), "not the revealed key's number of bits")
    for name, want in (("format", "nnmark-commitment"), ("version", 1), ("spec", 1)):
        check(f"commitment.{name}", same(com[name], want), f"must be {want!r}")
    if trusted is not None:
        published = strict_json(open(trusted, "rb").read())
        for name in COMMITMENT:
            check(f"commitment.{name}", same(com.get(name), published.get(name)),
                  "differs from the commitment you trust", " (= the commitment you trust)")
    # 2. the key (§2.4, §2.5, §3)
    bits = key["bits"]
    if not (isinstance(bits, str) and bits and set(bits) <= {"0", "1"} and len(bits) == key["num_bits"]):
        raise CannotCheck("revealed_key.bits is not a bit string of num_bits characters")
    t = len(bits)
    if kind == "whitebox":
        if key["order"] != "torch":
            raise CannotCheck("a whitebox key's order is 'torch' (§2.4)")
        secret = bytes.fromhex(key["secret"])
        key_id = hashlib.sha256(b"nnmark:key-id:v1:" + secret).hexdigest()[:16]
    else:
        rows, cols = key["matrix_shape"]
        matrix = np.frombuffer(base64.b64decode(key["matrix"], validate=True), dtype="<f4").reshape(rows, cols)
        key_id = hashlib.sha256(b"nnmark:key-id:v1:" + matrix.tobytes()).hexdigest()[:16]
    check("revealed_key.key_id", key_id == key["key_id"], "does not match the key's secret")
    # 3. the checkpoint (§8.4): the whole file, then its safetensors header
    f = open(ck_path, "rb")
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(1 << 20), b""):  # the whole file, hashed as it streams by
        h.update(chunk)
        size += len(chunk)
    digest = h.hexdigest()
    check("checkpoint.name", ck["name"] == os.path.basename(ck_path), f"the file is {os.path.basename(ck_path)!r}")
    check("checkpoint.size", same(ck["size"], size), f"the file has {size} bytes")
    check("checkpoint.sha256", ck["sha256"] == digest, f"the file's sha256 is {digest}")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise CannotCheck("the safetensors header is longer than the file")
    header = strict_json(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    if "nnmark.commitment" in meta:
        stamped = strict_json(meta["nnmark.commitment"].encode("utf-8"))
        which = "the certificate's" if stamped == com else "another (a stamp is the file's own claim)"
        out.append(f"note  the file is stamped with commitment {str(stamped.get('commitment'))[:16]}: {which}")
    name = key["carrier"]
    if name not in header:  # a wrapper prefix on either side
        hits = [other for other in header if _strip(other) == _strip(name)]
        if len(hits) != 1:
            raise CannotCheck(f"carrier {name!r} is {'ambiguous' if hits else 'not in the file'}")
        name = hits[0]
    entry = header[name]
    if entry["dtype"] not in DTYPES:
        raise CannotCheck(f"carrier dtype {entry['dtype']}: this script reads F32, F16, BF16 and F64")
    begin, end = entry["data_offsets"]
    f.seek(8 + n + begin)
    raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise CannotCheck("the file ends inside the carrier")
    shape = tuple(entry["shape"])
    w = np.frombuffer(raw, dtype=DTYPES[entry["dtype"]])
    w = (w.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" else w
    w = w.astype(np.float64).reshape(shape)
    if key["shape"] is not None and tuple(key["shape"]) != shape:
        raise CannotCheck(f"carrier shape {list(shape)}, the key expects {key['shape']}")
    # 4. reduction (§4.2), projection (§4.5-§4.7), extraction (§4.6)
    if key["reduction"] == "flat":
        vec = w.reshape(-1)
    elif w.ndim >= 2:
        m = w.mean(axis=0)  # filter_mean: averaged over out_channels, [in, k...]
        if key["order"] == "keras" and m.ndim > 1:
            m = np.moveaxis(m, 0, -1)  # (in, kh, kw) -> (kh, kw, in)
        vec = m.reshape(-1)
    else:
        raise CannotCheck(f"filter_mean needs a carrier of 2 or more dims, got shape {list(shape)}")
    if not np.isfinite(vec).all():
        raise CannotCheck("the carrier holds NaN or Inf")
    p = keyed_projection(secret, key["carrier"], t, vec) if kind == "whitebox" else matrix.astype(np.float64) @ vec
    owner = np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
    matches = int(np.count_nonzero((p > 0) == (owner == 1)))
    # 5. the verdict (§6.2, §6.4)
    p0 = 0.5 if v["null_rate"] is None else v["null_rate"]
    tails = binomial_tails(t, Fraction(p0))
    alpha = Fraction(v["alpha"])
    threshold = next((m for m in range(t + 1) if tails[m] <= alpha), t + 1)
    p_value = float(tails[matches]) if matches else 1.0
    got = {"status": "ok", "carrier": name, "carrier_sha256": hashlib.sha256(raw).hexdigest(), "matches": matches,
           "bits": t, "ber": 1.0 - matches / t, "p_value": p_value, "threshold": threshold,
           "verified": matches >= threshold, "null": f"binomial(p0={p0:.6g})", "controls": None,
           "control_matches": None, "control_p_value": None, "warning": None}
    for field_name, want in got.items():
        have = v[field_name]
        if field_name in ("ber", "p_value") and isinstance(have, (int, float)) and not isinstance(have, bool):
            ok = math.isclose(have, want, rel_tol=REL_TOLERANCE, abs_tol=0.0)
        else:
            ok = same(have, want)
        check(f"verdict.{field_name}", ok, f"the certificate says {have!r}, re-derived: {want!r}")
    check("verdict.verified", v["verified"] is True and got["verified"], "the mark does not verify")
    for line in out:
        print(line)
    for line in failures:
        print(line)
    if failures:
        print(f"claim does NOT hold: {len(failures)} check(s) failed")
        return 1
    print(f"claim holds: {matches}/{t} bits match, p-value {p_value:.3g} <= alpha {float(alpha):g}")
    return 0


def _strip(name):
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except CannotCheck as exc:
        print(f"cannot check: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - malformed or unreadable input: never a pass, never "does not hold"
        print(f"cannot check: malformed or unreadable input ({type(exc).__name__}: {exc})", file=sys.stderr)
        sys.exit(2)
