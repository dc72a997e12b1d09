"""An independent implementation of spec v1, for tests.

Written from the specification alone -- it deliberately does not import ``nnmark``
(nor ``nnmark._reference``), so a mistake shared by the library and its own
reference cannot hide here. Only numpy and the standard library (hashlib, json,
base64, fractions).

From the design document (DESIGN.md §4, key specification v1):

- Philox4x32-10 (Random123): a scalar version on Python ints and a vectorised
  one on numpy uint64 arrays holding 32-bit values.
- The projection matrix X in {-1,+1}^{T x N}: X[t, i] from column counter
  (i mod 2^32, i >> 32, t >> 7, 0), bit (t & 127) of the four output words.
- p = X . w and g = X^T . gp in float64, chunk by chunk so that large N stays
  small in memory.
- The subkey: SHA-256(secret || b"nnmark:projection:v1:" || carrier UTF-8),
  k0/k1 the little-endian uint32 of bytes 0:4 / 4:8.

From the public specification docs/spec.md (the second half of this file):

- key files: parsing and checks in the order of §2.3, the canonical-JSON checksum;
- key ids of every kind, message bits, the reductions (torch and Keras order),
  extraction and the embedding penalty of white-box and dense keys;
- the verdict statistics in exact rational arithmetic;
- the trigger sets of every kind: keyed SHAKE-256 streams, the portable float64
  sin/cos/exp/log, abstract images, the content stamp, noise, unrelated samples,
  normalisation, and the visiting order;
- per-sample labels, the control sets of every kind (the decoy stamp of content
  keys, stored controls, keyed stand-ins), the keyed selection of a new key's
  triggers and held-back controls, the training set and its order;
- the verdict with controls: top-1 hits, McNemar's and Fisher's exact tests, the
  beta-binomial null of a calibration (exact rationals from the stored float64 a, b),
  a maximum-likelihood fit of it (Newton's method: another optimiser than nnmark's),
  and calibration files;
- DeepSigns keys (§9): their key files and key id, class means of given activations,
  the projection under the subkey of "deepsigns:" + layer, extracted bits, the penalty.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from fractions import Fraction

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Random123 PHILOX_M4x32_0/1)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
ROWS_PER_BLOCK = 128  # one Philox call gives 4 x 32 = 128 bits
U32 = (1 << 32) - 1
PROJECTION_DOMAIN = b"nnmark:projection:v1:"


# ------------------------------------------------------------------ Philox, scalar
def _mulhilo(a: int, b: int) -> tuple[int, int]:
    prod = a * b
    return prod >> 32, prod & U32


def philox_scalar(counter, key) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one counter (4 words) under one key (2 words), Python ints."""
    x0, x1, x2, x3 = (int(v) & U32 for v in counter)
    k0, k1 = (int(v) & U32 for v in key)
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W[0]) & U32
            k1 = (k1 + PHILOX_W[1]) & U32
        hi0, lo0 = _mulhilo(PHILOX_M[0], x0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


# ------------------------------------------------------------------ Philox, vectorised
def philox_vec(x0, x1, x2, x3, k0: int, k1: int) -> np.ndarray:
    """Philox4x32-10 over arrays of counters; returns a uint64 array [4, n] of 32-bit words."""
    mask = np.uint64(U32)
    sh = np.uint64(32)
    x = [np.asarray(v, dtype=np.uint64) & mask for v in (x0, x1, x2, x3)]
    x = np.broadcast_arrays(*x)
    x0, x1, x2, x3 = (np.array(v, dtype=np.uint64) for v in x)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    ka, kb = int(k0) & U32, int(k1) & U32
    for r in range(ROUNDS):
        if r:
            ka = (ka + PHILOX_W[0]) & U32
            kb = (kb + PHILOX_W[1]) & U32
        p0 = x0 * m0  # < 2^64: exact in uint64
        p1 = x2 * m1
        x0, x1, x2, x3 = ((p1 >> sh) ^ x1 ^ np.uint64(ka), p1 & mask,
                          (p0 >> sh) ^ x3 ^ np.uint64(kb), p0 & mask)
    return np.stack([x0, x1, x2, x3])


# ------------------------------------------------------------------ projection matrix
def projection_block(subkey, T: int, col0: int, n: int) -> np.ndarray:
    """X[:, col0:col0+n] of spec v1 as float64 +-1, shape [T, n]."""
    k0, k1 = (int(v) for v in subkey)
    cols = np.arange(col0, col0 + n, dtype=np.uint64)
    lo, hi = cols & np.uint64(U32), cols >> np.uint64(32)
    nblk = -(-T // ROWS_PER_BLOCK)
    shifts = np.arange(32, dtype=np.uint64)
    rows = []
    for b in range(nblk):
        words = philox_vec(lo, hi, np.full(n, b, dtype=np.uint64), np.zeros(n, dtype=np.uint64), k0, k1)
        # row j = 32 * (j >> 5) + (j & 31): bit (j & 31) of word (j >> 5)
        bits = (words[:, None, :] >> shifts[None, :, None]) & np.uint64(1)  # [4, 32, n]
        rows.append(bits.reshape(ROWS_PER_BLOCK, n))
    bits = np.concatenate(rows)[:T]
    return np.where(bits == 1, 1.0, -1.0)


def projection_matrix(subkey, T: int, N: int) -> np.ndarray:
    """The whole X [T, N] (float64 +-1); mind the memory for large T * N."""
    return projection_block(subkey, T, 0, N)


def forward(w, subkey, T: int, chunk: int = 16384) -> np.ndarray:
    """p = X . w in float64; ``w`` [N] or [C, N] -> [T] or [C, T]."""
    w = np.asarray(w, dtype=np.float64)
    N = w.shape[-1]
    p = np.zeros(w.shape[:-1] + (T,), dtype=np.float64)
    for c0 in range(0, N, chunk):
        n = min(chunk, N - c0)
        X = projection_block(subkey, T, c0, n)
        p += (X @ w[..., c0:c0 + n].T).T  # X @ w.T: the fast way round for BLAS
    return p


def transpose(gp, subkey, N: int, chunk: int = 16384) -> np.ndarray:
    """g = X^T . gp in float64; ``gp`` [T] or [C, T] -> [N] or [C, N]."""
    gp = np.asarray(gp, dtype=np.float64)
    T = gp.shape[-1]
    parts = []
    for c0 in range(0, N, chunk):
        n = min(chunk, N - c0)
        parts.append(gp @ projection_block(subkey, T, c0, n))
    return np.concatenate(parts, axis=-1)


# ------------------------------------------------------------------ subkey
def subkey(secret: bytes, carrier: str) -> tuple[int, int]:
    """Spec v1 step 1: (k0, k1) from SHA-256(secret || domain || carrier as UTF-8)."""
    d = hashlib.sha256(bytes(secret) + PROJECTION_DOMAIN + carrier.encode("utf-8")).digest()
    k0, k1 = struct.unpack("<II", d[:8])
    return k0, k1


# ------------------------------------------------------------------ known answers (DESIGN.md §4)
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


# ==================================================================================
# The rest of spec v1, written from docs/spec.md (still no nnmark import): key files
# and their checksum, key ids, message bits, reductions, extraction, the verdict
# statistics (exact rationals) and the trigger sets of every kind.
# ==================================================================================
KEY_FORMAT = "nnmark-key"
KEY_VERSION = 1
KEY_ID_DOMAIN = b"nnmark:key-id:v1:"
MESSAGE_DOMAIN = b"nnmark:message:v1:"
TRIGGER_DOMAIN = b"nnmark:trigger:v1:"
TRIGGER_KEY_ID_DOMAIN = b"nnmark:trigger:v1:key-id"
DEEPSIGNS_KEY_ID_DOMAIN = b"nnmark:deepsigns:v1:key-id"
TRIGGER_KINDS = ("abstract", "content", "noise", "unrelated", "frontier")
FRONTIER_MEMBERS = ("control_answers", "false_adversaries", "false_adversaries_shape", "false_target", "eps")
WARNING = "SECRET: whoever holds this file can verify and remove this watermark. Keep it private."


class SpecKeyError(ValueError):
    """A key file that spec v1 rejects."""


# ------------------------------------------------------------------ key files (spec §2)
def canonical_json(body: dict) -> bytes:
    """§2.2: every member but "checksum", sorted, no whitespace, ASCII escapes, repr floats."""
    rest = {k: v for k, v in body.items() if k != "checksum"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def checksum(body: dict) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


def minified_without_checksum(text: str) -> bytes:
    """§2.2's shortcut for files nnmark wrote: the text with the whitespace between
    tokens removed and the checksum member dropped (a tiny tokenizer, not the json module)."""
    out, i, in_str = [], 0, False
    while i < len(text):
        ch = text[i]
        if in_str:
            out.append(ch)
            if ch == "\\":
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
            out.append(ch)
        elif ch not in " \t\r\n":
            out.append(ch)
        i += 1
    s = "".join(out)
    # "checksum" sorts before the always-present "created", so it is never the last member
    s, count = re.subn(r'"checksum":"[0-9a-f]*",', "", s, count=1)
    assert count == 1, "no checksum member"
    return s.encode("ascii")


def whitebox_key_id(secret: bytes) -> str:
    return hashlib.sha256(KEY_ID_DOMAIN + bytes(secret)).hexdigest()[:16]


def dense_key_id(matrix) -> str:
    return hashlib.sha256(KEY_ID_DOMAIN + np.ascontiguousarray(matrix, dtype="<f4").tobytes()).hexdigest()[:16]


def trigger_key_id(secret: bytes) -> str:
    return hashlib.sha256(TRIGGER_KEY_ID_DOMAIN + b"\x00" + bytes(secret)).hexdigest()[:16]


def deepsigns_key_id(secret: bytes) -> str:
    return hashlib.sha256(DEEPSIGNS_KEY_ID_DOMAIN + b"\x00" + bytes(secret)).hexdigest()[:16]


def message_bits(message, n: int) -> np.ndarray:
    """§4.1: the first n bits, MSB first, of SHAKE-256(domain || UTF-8 message)."""
    m = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    if not m:
        raise ValueError("empty message")
    digest = hashlib.shake_256(MESSAGE_DOMAIN + m).digest((n + 7) // 8)
    return np.array([(digest[t >> 3] >> (7 - (t & 7))) & 1 for t in range(n)], dtype=np.uint8)


def _bits(body: dict) -> np.ndarray:
    s = body["bits"]
    if not isinstance(s, str) or set(s) - {"0", "1"} or len(s) != body["num_bits"] or not s:
        raise SpecKeyError("bits must be a bit string of num_bits characters")
    return np.frombuffer(s.encode("ascii"), dtype=np.uint8) - ord("0")


def _secret(body: dict) -> bytes:
    secret = bytes.fromhex(body["secret"])
    if len(secret) != 32:
        raise SpecKeyError("secret must be 32 bytes")
    return secret


def _f32(b64: str, shape) -> np.ndarray:
    raw = base64.b64decode(b64, validate=True)
    shape = tuple(int(s) for s in shape)
    if len(raw) != 4 * int(np.prod(shape)):
        raise SpecKeyError("float32 blob has the wrong length")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


def _channels(value, c: int):
    if value is None:
        return None
    vals = [float(v) for v in value]
    if len(vals) not in (1, c):
        raise SpecKeyError("mean/std need 1 or C values")
    return vals * c if len(vals) == 1 else vals


def _labels(value, count: int, num_classes: int, name: str) -> np.ndarray:
    """§2.6: an integer (every sample's label) or an array of exactly ``count`` integers."""
    if type(value) is int:
        value = [value] * count
    if type(value) is not list or len(value) != count or any(type(v) is not int for v in value):
        raise SpecKeyError(f"{name} must be an integer or {count} integers")
    if any(not 0 <= v < num_classes for v in value):
        raise SpecKeyError(f"{name} out of range")
    return np.array(value, dtype=np.int64)


def parse_key_file(data: bytes) -> dict:
    """Reads a key file as §2.3 says; returns its members decoded (secret as bytes,
    bits as uint8, matrix/samples as float32 arrays, tuples for shapes)."""
    if not data.strip():
        raise SpecKeyError("empty key file")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SpecKeyError("not JSON") from None
    if not isinstance(body, dict) or body.get("format") != KEY_FORMAT:
        raise SpecKeyError("not an nnmark key file")
    if type(body.get("version")) is not int or body["version"] != KEY_VERSION:
        raise SpecKeyError(f"version {body.get('version')!r}")
    if body.get("checksum") != checksum(body):
        raise SpecKeyError("checksum")
    kind = body.get("kind")
    key = {"kind": kind, "key_id": body.get("key_id")}
    if kind in ("whitebox", "whitebox-dense"):
        if body["reduction"] not in ("filter_mean", "flat") or not body["carrier"]:
            raise SpecKeyError("bad carrier or reduction")
        key.update(carrier=body["carrier"], reduction=body["reduction"], bits=_bits(body),
                   shape=tuple(body["shape"]) if body["shape"] is not None else None)
        if kind == "whitebox":
            key.update(secret=_secret(body), order="torch")
            want = whitebox_key_id(key["secret"])
        else:
            if body["order"] not in ("torch", "keras"):
                raise SpecKeyError("bad order")
            m = _f32(body["matrix"], body["matrix_shape"])
            if m.ndim != 2 or m.shape[0] != len(key["bits"]) or not np.isfinite(m).all():
                raise SpecKeyError("bad matrix")
            key.update(matrix=m, order=body["order"])
            want = dense_key_id(m)
    elif kind == "trigger":
        tk = body["trigger_kind"]
        if tk not in TRIGGER_KINDS:
            raise SpecKeyError("bad trigger_kind")
        shape = tuple(int(s) for s in body["input_shape"])
        if not 1 <= len(shape) <= 3 or min(shape) < 1 or body["n"] < 1 or body["num_classes"] < 2:
            raise SpecKeyError("bad n, num_classes or input_shape")
        lo, hi = (float(v) for v in body["value_range"])
        if not lo < hi:
            raise SpecKeyError("bad value_range")
        c = chw(shape)[0]
        key.update(secret=_secret(body), trigger_kind=tk, n=body["n"], num_classes=body["num_classes"],
                   input_shape=shape, value_range=(lo, hi), mean=_channels(body["mean"], c),
                   std=_channels(body["std"], c), noise_std=float(body["noise_std"]), target=body["target"])
        if key["std"] is not None and min(key["std"]) <= 0:
            raise SpecKeyError("std must be > 0")
        key.update(controls=None, control_labels=None, controls_from=None)
        if tk == "abstract":
            if body["samples"] is not None or body["target"] is not None:
                raise SpecKeyError("abstract keys have no samples and no target")
            if body.get("controls") is not None:
                raise SpecKeyError("abstract keys have no controls")
            key["samples"] = None
        else:
            if list(body["samples_shape"]) != [body["n"], *shape]:
                raise SpecKeyError("samples_shape")
            key["samples"] = _f32(body["samples"], body["samples_shape"])
            if not np.isfinite(key["samples"]).all():
                raise SpecKeyError("samples must be finite")
            key["labels"] = _labels(body["target"], body["n"], body["num_classes"], "target")
            key["true_labels"] = None
            if body.get("sample_labels") is not None:  # §2.6: the samples' own classes (content, noise)
                if tk not in ("content", "noise"):
                    raise SpecKeyError("only content and noise keys store sample_labels")
                if not isinstance(body["sample_labels"], list):
                    raise SpecKeyError("sample_labels must be an array")
                key["true_labels"] = _labels(body["sample_labels"], body["n"], body["num_classes"], "sample_labels")
            if body.get("controls") is not None:  # §2.6: stored controls, unrelated and frontier keys
                if tk not in ("unrelated", "frontier"):
                    raise SpecKeyError("only unrelated and frontier keys store controls")
                cshape = [int(s) for s in body["controls_shape"]]
                if len(cshape) != 1 + len(shape) or tuple(cshape[1:]) != shape or cshape[0] < 1:
                    raise SpecKeyError("controls_shape")
                ctrl = _f32(body["controls"], cshape)
                if not np.isfinite(ctrl).all():
                    raise SpecKeyError("controls must be finite")
                if body["controls_from"] not in ("held-back", "given"):
                    raise SpecKeyError("controls_from")
                key.update(controls=ctrl, controls_from=body["controls_from"],
                           control_labels=_labels(body["control_target"], cshape[0], body["num_classes"],
                                                  "control_target"))
        _parse_frontier(body, key)
        want = trigger_key_id(key["secret"])
    elif kind == "deepsigns":
        key.update(_deepsigns_members(body))
        want = deepsigns_key_id(key["secret"])
    else:
        raise SpecKeyError(f"unknown kind {kind!r}")
    if body.get("key_id") != want:
        raise SpecKeyError("key_id does not match")
    return key


def _parse_frontier(body: dict, key: dict) -> None:
    """§2.6.2: the members of frontier keys (and their absence from every other kind)."""
    if key["trigger_kind"] != "frontier":
        if any(body.get(m) is not None for m in FRONTIER_MEMBERS):
            raise SpecKeyError("only frontier keys hold control_answers, false adversaries and eps")
        return
    if key["controls"] is None or key["controls_from"] != "held-back":
        raise SpecKeyError("a frontier key stores held-back controls")
    k = len(key["controls"])
    answers = body.get("control_answers")
    if not isinstance(answers, list):
        raise SpecKeyError("control_answers must be an array")
    answers = _labels(answers, k, body["num_classes"], "control_answers")
    if (answers == key["control_labels"]).any():
        raise SpecKeyError("a control answer equals its control's label")
    key.update(control_answers=answers, false_adversaries=None, false_labels=None)
    if body.get("false_adversaries") is not None:
        fshape = [int(s) for s in body["false_adversaries_shape"]]
        if len(fshape) != 1 + len(key["input_shape"]) or tuple(fshape[1:]) != key["input_shape"] or fshape[0] < 1:
            raise SpecKeyError("false_adversaries_shape")
        fx = _f32(body["false_adversaries"], fshape)
        if not np.isfinite(fx).all():
            raise SpecKeyError("false adversaries must be finite")
        if not isinstance(body.get("false_target"), list):
            raise SpecKeyError("false_target must be an array")
        key.update(false_adversaries=fx,
                   false_labels=_labels(body["false_target"], fshape[0], body["num_classes"], "false_target"))
    eps = body.get("eps")
    if eps is not None and (type(eps) not in (int, float)):
        raise SpecKeyError("eps must be a number or null")
    key["eps"] = eps


def _deepsigns_members(body: dict) -> dict:
    """§9.1: the members of a deepsigns key, strictly typed and consistent."""
    layer = body["layer"]
    if type(layer) is not str or not layer or len(layer) > 4096:
        raise SpecKeyError("bad layer")
    bits = _bits(body)
    nc = body["num_classes"]
    if type(nc) is not int or not 2 <= nc <= 1 << 20:
        raise SpecKeyError("bad num_classes")
    classes = body["classes"]
    if type(classes) is not list or any(type(c) is not int for c in classes) or len(set(classes)) != len(classes) \
            or not 1 <= len(classes) <= min(len(bits), nc) or any(not 0 <= c < nc for c in classes):
        raise SpecKeyError("bad classes")
    shape = body["inputs_shape"]
    if type(shape) is not list or not 2 <= len(shape) <= 5 or any(type(d) is not int or d < 1 for d in shape):
        raise SpecKeyError("bad inputs_shape")
    per = int(np.prod(shape[1:]))
    if shape[0] > 1 << 20 or per > 1 << 24 or shape[0] * per > 1 << 25:
        raise SpecKeyError("inputs beyond the limits")
    inputs = _f32(body["inputs"], shape)
    if not np.isfinite(inputs).all():
        raise SpecKeyError("inputs must be finite")
    labels = body["labels"]
    if type(labels) is not list or len(labels) != shape[0] or any(type(v) is not int for v in labels) \
            or not set(labels) <= set(classes) or set(labels) != set(classes):
        raise SpecKeyError("bad labels")
    return {"secret": _secret(body), "layer": layer, "bits": bits, "num_classes": nc, "classes": list(classes),
            "inputs": inputs, "labels": np.array(labels, dtype=np.int64)}


# ------------------------------------------------------------------ DeepSigns (spec §9)
def deepsigns_class_means(key: dict, activations) -> np.ndarray:
    """§9.4: mu_j, the mean activation [M] of the inputs of class classes[j], in float64; [s, M]."""
    a = np.asarray(activations, dtype=np.float64).reshape(len(key["labels"]), -1)
    return np.stack([a[key["labels"] == c].mean(axis=0) for c in key["classes"]])


def deepsigns_projections(key: dict, activations) -> np.ndarray:
    """§9.3-9.4: p_t = X[t] . mu_{t mod s} under the subkey of "deepsigns:" + layer."""
    mu = deepsigns_class_means(key, activations)
    T, s = len(key["bits"]), len(key["classes"])
    p = forward(mu, subkey(key["secret"], "deepsigns:" + key["layer"]), T)  # [s, T]
    return np.array([p[t % s, t] for t in range(T)])


def deepsigns_bits(key: dict, activations) -> np.ndarray:
    return (deepsigns_projections(key, activations) > 0).astype(np.uint8)


def deepsigns_penalty(key: dict, activations, strength: float, centre: float) -> tuple[float, float, float]:
    """§9.5: (BCE sum, centre term, penalty) in float64."""
    a = np.asarray(activations, dtype=np.float64).reshape(len(key["labels"]), -1)
    p = deepsigns_projections(key, a)
    b = key["bits"].astype(np.float64)
    bce = float(np.sum(np.logaddexp(0.0, p) - b * p))
    mu = deepsigns_class_means(key, a)
    j = np.array([key["classes"].index(int(c)) for c in key["labels"]])
    c = float(np.mean((a - mu[j]) ** 2))
    return bce, c, strength * bce + centre * c


# ------------------------------------------------------------------ white-box (spec §4)
def reduce(weight, reduction: str, order: str = "torch") -> np.ndarray:
    """§4.2 in float64: filter_mean (torch or keras element order) or flat."""
    w = np.asarray(weight, dtype=np.float64)
    if reduction == "flat":
        return w.reshape(-1).copy()
    out = w.shape[0]
    m = w.reshape(out, -1).sum(axis=0).reshape(w.shape[1:]) / out
    if order == "keras" and m.ndim > 1:
        m = np.moveaxis(m, 0, -1)  # (in, k1, ..., kr) -> (k1, ..., kr, in)
    return np.ascontiguousarray(m).reshape(-1)


def projections(key: dict, weight) -> np.ndarray:
    v = reduce(weight, key["reduction"], key["order"])
    T = len(key["bits"])
    if key["kind"] == "whitebox":
        return forward(v, subkey(key["secret"], key["carrier"]), T)
    return key["matrix"].astype(np.float64) @ v


def extract_bits(key: dict, weight) -> np.ndarray:
    return (projections(key, weight) > 0).astype(np.uint8)


def penalty(key: dict, weight, strength: float) -> float:
    p = projections(key, weight)
    b = key["bits"].astype(np.float64)
    return float(strength * np.sum(np.logaddexp(0.0, p) - b * p))


# ------------------------------------------------------------------ verdicts (spec §6)
def binomial_sf(matches: int, n: int, p0: Fraction) -> Fraction:
    """Exact P[Binomial(n, p0) >= matches] as a rational."""
    from math import comb

    q = 1 - p0
    return sum((comb(n, k) * p0 ** k * q ** (n - k) for k in range(max(matches, 0), n + 1)), Fraction(0))


def binomial_threshold(n: int, alpha, p0: Fraction) -> int:
    alpha = Fraction(alpha)
    for m in range(n + 1):
        if binomial_sf(m, n, p0) <= alpha:
            return m
    return n + 1


# ------------------------------------------------------------------ trigger sets (spec §5)
def stream(secret: bytes, name: str, k: int) -> bytes:
    return hashlib.shake_256(TRIGGER_DOMAIN + name.encode("ascii") + b"\x00" + bytes(secret)).digest(k)


def words(secret: bytes, name: str, count: int) -> list[int]:
    s = stream(secret, name, 8 * count)
    return [int.from_bytes(s[8 * i:8 * i + 8], "little") for i in range(count)]


def uniforms(secret: bytes, name: str, count: int) -> np.ndarray:
    return np.array([(w >> 11) * 2.0 ** -53 for w in words(secret, name, count)], dtype=np.float64)


def permutation(secret: bytes, name: str, n: int) -> list[int]:
    w = words(secret, name, max(n, 1))
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = w[i] % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


TWO_PI = float.fromhex("0x1.921fb54442d18p+2")
LN2 = float.fromhex("0x1.62e42fefa39efp-1")
INV_TWO_PI = 1.0 / TWO_PI
INV_LN2 = 1.0 / LN2
HALF_PI = 0.25 * TWO_PI


def p_sin(x):
    x = np.asarray(x, dtype=np.float64)
    k = np.floor(x * INV_TWO_PI + 0.5)
    r = x - k * TWO_PI
    r2 = r * r
    acc = np.ones_like(r)
    for j in range(13, 0, -1):
        acc = 1.0 - (acc * r2) / float(2 * j * (2 * j + 1))
    return r * acc


def p_cos(x):
    return p_sin(np.asarray(x, dtype=np.float64) + HALF_PI)


def p_exp(x):
    x = np.maximum(np.asarray(x, dtype=np.float64), -700.0)
    k = np.floor(x * INV_LN2 + 0.5)
    r = x - k * LN2
    acc = np.ones_like(r)
    for j in range(20, 0, -1):
        acc = 1.0 + (acc * r) / float(j)
    return np.ldexp(acc, k.astype(np.int64))


def p_log(u):
    m, e = np.frexp(np.asarray(u, dtype=np.float64))
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = np.zeros_like(s)
    for j in range(30, -1, -1):
        acc = (1.0 / float(2 * j + 1)) + acc * s2
    return (2.0 * s) * acc + e.astype(np.float64) * LN2


def gaussians(secret: bytes, name: str, count: int) -> np.ndarray:
    u = uniforms(secret, name, 2 * count)
    return np.sqrt(-2.0 * p_log(1.0 - u[0::2])) * p_cos(TWO_PI * u[1::2])


def chw(shape) -> tuple[int, int, int]:
    shape = tuple(shape)
    return {1: lambda: (1, 1, shape[0]), 2: lambda: (1, shape[0], shape[1]), 3: lambda: shape}[len(shape)]()


def _abstract(key: dict, name: str = "abstract", count: int | None = None) -> np.ndarray:
    """§5.4: ``count`` (default n) images from the uniforms of stream ``name``."""
    n, (C, H, W) = key["n"] if count is None else count, chw(key["input_shape"])
    lo, hi = key["value_range"]
    u = uniforms(key["secret"], name, 20 * n * C).reshape(n, C, 20)
    yy = ((np.arange(H) + 0.5) / H)[:, None]  # [H, 1]
    xx = ((np.arange(W) + 0.5) / W)[None, :]  # [1, W]
    out = np.empty((n, C, H, W))
    for m in range(n):
        for c in range(C):
            prm = u[m, c]
            v = np.zeros((H, W))
            for k in range(3):
                f, a, ph, amp = prm[4 * k:4 * k + 4]
                freq = 0.5 + 2.0 * f
                ang = TWO_PI * a
                arg = (TWO_PI * freq) * (xx * p_cos(ang) + yy * p_sin(ang)) + TWO_PI * ph
                v = v + (0.3 + 0.7 * amp) * p_sin(arg)
            for k in range(2):
                cy, cx, wd, amp = prm[12 + 4 * k:16 + 4 * k]
                sigma = 0.1 + 0.25 * wd
                d2 = (yy - cy) * (yy - cy) + (xx - cx) * (xx - cx)
                v = v + (3.0 * amp - 1.5) * p_exp(-d2 / ((2.0 * sigma) * sigma))
            out[m, c] = v
        vmin, vmax = out[m].min(), out[m].max()
        span = vmax - vmin if vmax > vmin else 1.0
        out[m] = np.minimum(np.maximum(lo + (hi - lo) * ((out[m] - vmin) / span), lo), hi)
    return out.reshape(n, *key["input_shape"])


def content_patch(key: dict):
    """§5.5: (r0, c0, ph, pw, bits [C, ph, pw] as uint8)."""
    C, H, W = chw(key["input_shape"])
    ph = min(H, max(2, round(H / 4)))  # Python's round: half to even
    pw = min(W, max(2, round(W / 4)))
    w0, w1 = words(key["secret"], "content-place", 2)
    r0, c0 = w0 % (H - ph + 1), w1 % (W - pw + 1)
    nb = C * ph * pw
    s = stream(key["secret"], "content-bits", (nb + 7) // 8)
    bits = np.array([(s[t >> 3] >> (7 - (t & 7))) & 1 for t in range(nb)], dtype=np.uint8)
    if bits.all() or not bits.any():
        bits[0] ^= 1
    return r0, c0, ph, pw, bits.reshape(C, ph, pw)


def stamp(key: dict, x: np.ndarray, patch) -> np.ndarray:
    """§5.5: a copy of the raw images ``x`` with ``patch`` (r0, c0, ph, pw, bits) set to lo / hi."""
    C, H, W = chw(key["input_shape"])
    lo, hi = key["value_range"]
    r0, c0, ph, pw, bits = patch
    out = np.array(x, dtype=np.float64).reshape(len(x), C, H, W)
    out[:, :, r0:r0 + ph, c0:c0 + pw] = np.where(bits == 1, hi, lo)
    return out.reshape(x.shape)


def trigger_raw(key: dict) -> np.ndarray:
    """The raw trigger inputs, float64 [n, *input_shape] (§5.4-§5.7)."""
    if key["trigger_kind"] == "abstract":
        return _abstract(key)
    lo, hi = key["value_range"]
    x = np.minimum(np.maximum(key["samples"].astype(np.float64), lo), hi)
    if key["trigger_kind"] == "content":
        x = stamp(key, x, content_patch(key))
    elif key["trigger_kind"] == "noise":
        g = gaussians(key["secret"], "noise", x.size).reshape(x.shape)
        x = np.minimum(np.maximum(x + g * (key["noise_std"] * (hi - lo)), lo), hi)
    return x


def trigger_labels(key: dict) -> np.ndarray:
    if key["trigger_kind"] == "abstract":
        return np.array([w % key["num_classes"] for w in words(key["secret"], "labels", key["n"])], dtype=np.int64)
    return sample_labels(key)


def sample_labels(key: dict) -> np.ndarray:
    """§2.6: L_m, the label of sample m (the integer target for all, or target[m])."""
    if "labels" in key:
        return np.array(key["labels"], dtype=np.int64)
    t = key["target"]
    if isinstance(t, (list, tuple, np.ndarray)):
        return _labels([int(v) for v in t], key["n"], key["num_classes"], "target")
    return np.full(key["n"], t, dtype=np.int64)


def normalise(key: dict, raw: np.ndarray) -> np.ndarray:
    """§5.8 in float64 (round to float32 afterwards, once)."""
    if key["mean"] is None and key["std"] is None:
        return raw
    C, H, W = chw(key["input_shape"])
    mean = np.array(key["mean"] if key["mean"] is not None else [0.0] * C).reshape(1, C, 1, 1)
    std = np.array(key["std"] if key["std"] is not None else [1.0] * C).reshape(1, C, 1, 1)
    return ((raw.reshape(-1, C, H, W) - mean) / std).reshape(raw.shape)


def trigger_set(key: dict) -> dict:
    """Everything §5 regenerates: raw (float64), raw32 and x (float32), labels (int64)."""
    raw = trigger_raw(key)
    return {"raw": raw, "raw32": raw.astype("<f4"), "x": normalise(key, raw).astype("<f4"),
            "labels": trigger_labels(key)}


def trigger_order(key: dict, epoch: int) -> list[int]:
    return permutation(key["secret"], f"order:{int(epoch)}", key["n"])


# ------------------------------------------------------------------ controls (spec §5.10)
def _bits_of(secret: bytes, name: str, count: int) -> np.ndarray:
    s = stream(secret, name, (count + 7) // 8)
    return np.array([(s[t >> 3] >> (7 - (t & 7))) & 1 for t in range(count)], dtype=np.uint8)


def decoy_patch(key: dict):
    """§5.10.1: (r1, c1, ph, pw, bits [C, ph, pw] as uint8) of the decoy stamp, and the
    number of places it was drawn from."""
    C, H, W = chw(key["input_shape"])
    r0, c0, ph, pw, real = content_patch(key)
    every = [(r, q) for r in range(H - ph + 1) for q in range(W - pw + 1)]  # q varies fastest
    places = [(r, q) for r, q in every if r + ph <= r0 or r >= r0 + ph or q + pw <= c0 or q >= c0 + pw]
    if not places:
        places = [(r, q) for r, q in every if (r, q) != (r0, c0)] or [(r0, c0)]
    r1, c1 = places[words(key["secret"], "decoy-place", 1)[0] % len(places)]
    bits = _bits_of(key["secret"], "decoy-bits", C * ph * pw)
    if bits.all() or not bits.any():
        bits[0] ^= 1
    if np.array_equal(bits, real.reshape(-1)):
        bits[0] ^= 1  # may leave a uniform pattern: §5.10.1, reproduced as specified
    return (r1, c1, ph, pw, bits.reshape(C, ph, pw)), len(places)


def control_raw(key: dict):
    """§5.10: (raw controls float64 [k, *input_shape], their labels [k], groups) or None.
    ``groups`` is the number of paired groups (content 2, noise 1), 0 for unpaired controls."""
    tk = key["trigger_kind"]
    if tk == "abstract":
        return None
    lo, hi = key["value_range"]
    labels = sample_labels(key)
    x0 = np.minimum(np.maximum(key["samples"].astype(np.float64), lo), hi)
    if tk == "content":
        decoy, _ = decoy_patch(key)
        return np.concatenate([x0, stamp(key, x0, decoy)]), np.concatenate([labels, labels]), 2
    if tk == "noise":
        return x0, labels, 1
    if key.get("controls") is not None:
        c = np.minimum(np.maximum(key["controls"].astype(np.float64), lo), hi)
        return c, np.array(key["control_labels"], dtype=np.int64), 0
    n = key["n"]
    pick = [w % n for w in words(key["secret"], "controls-labels", n)]
    return _abstract(key, "controls-abstract", n), labels[pick], 0


def control_set(key: dict):
    """The control set as the suspect sees it: raw (float64), raw32, x (normalised float32),
    labels, groups; None for abstract keys."""
    got = control_raw(key)
    if got is None:
        return None
    raw, labels, groups = got
    return {"raw": raw, "raw32": raw.astype("<f4"), "x": normalise(key, raw).astype("<f4"), "labels": labels,
            "groups": groups}


# ------------------------------------------------------------------ training set (spec §5.11)
def held_back(key: dict) -> bool:
    return key.get("controls") is not None and key.get("controls_from") == "held-back"


def training_set(key: dict):
    """§5.11: (x float32 [n (+ k) (+ f), ...], labels) that embedding trains on."""
    t = trigger_set(key)
    if not held_back(key):
        return t["x"], t["labels"]
    c = control_set(key)
    if key["trigger_kind"] == "frontier":  # §5.12: the owner's answers, then the false adversaries
        xs, ys = [t["x"], c["x"]], [t["labels"], np.asarray(key["control_answers"], dtype=np.int64)]
        if key.get("false_adversaries") is not None:
            lo, hi = key["value_range"]
            raw = np.minimum(np.maximum(key["false_adversaries"].astype(np.float64), lo), hi)
            xs.append(normalise(key, raw).astype("<f4"))
            ys.append(np.asarray(key["false_labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)
    C, k = key["num_classes"], len(c["labels"])
    shift = [1 + w % (C - 1) for w in words(key["secret"], "control-train-labels", k)]
    other = np.array([(int(y) + s) % C for y, s in zip(c["labels"], shift)], dtype=np.int64)
    return np.concatenate([t["x"], c["x"]]), np.concatenate([t["labels"], other])


def training_order(key: dict, epoch: int) -> list[int]:
    if not held_back(key):
        return trigger_order(key, epoch)
    f = len(key["false_adversaries"]) if key.get("false_adversaries") is not None else 0
    return permutation(key["secret"], f"train-order:{int(epoch)}", key["n"] + len(key["controls"]) + f)


# ------------------------------------------------------------------ generation (spec §5.9)
def select(secret: bytes, kind: str, m0: int, n=None, target=0, sample_labels=None, controls=None):
    """§5.9: which of the m0 given samples a new key keeps. Returns (kept, triggers, held):
    ``kept`` the indices (into the m0 samples) left after the sample_labels filter, and
    ``triggers`` / ``held`` indices into ``kept`` of the triggers and the held-back controls.
    ``controls``: an integer (how many to hold back), None (the default), or anything else
    for controls given as inputs (none held back)."""
    kept = list(range(m0))
    if sample_labels is not None:
        kept = [i for i in kept if int(sample_labels[i]) != target]
    m = len(kept)
    k = 0
    if kind == "unrelated" and isinstance(controls, int) and not isinstance(controls, bool):
        k = controls
    elif kind == "unrelated" and controls is None:
        k = m - n if n is not None else m // 2
    if n is None and k:
        n = m - k
    if n is None:
        return kept, list(range(m)), []
    assert n + k <= m
    perm = permutation(secret, "select", m)
    return kept, sorted(perm[:n]), sorted(perm[n:n + k])


def frontier_linear(secret: bytes, S, Y, W, bias, value_range, eps: float, n: int, k: int, f: int) -> dict:
    """§5.12 for a linear model (logits W x + bias on the flattened raw input, no
    normalisation), in float64: the keyed walk, one FGSM step per sample the model classifies
    right, the first n + k true and f false adversaries, the keyed split. Returns the walk,
    the split, the sample indices of triggers / controls / false adversaries, their inputs
    (float32), labels and answers; ``margins``: the smallest nonzero |gradient| component and
    the smallest top-1 margin met on the way (where float32 and float64 could disagree)."""
    lo, hi = value_range
    W, bias = np.asarray(W, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    walk = permutation(secret, "frontier-order", len(S))
    true, false = [], []  # (sample index, adversarial input, answer)
    grad_min = margin_min = float("inf")

    def top1(z):
        nonlocal margin_min
        order = np.argsort(-z, kind="stable")
        margin_min = min(margin_min, z[order[0]] - z[order[1]])
        return int(order[0])

    for i in walk:
        x = np.minimum(np.maximum(np.asarray(S[i], dtype=np.float64).reshape(-1), lo), hi)
        z = W @ x + bias
        if top1(z) != int(Y[i]):
            continue
        p = np.exp(z - z.max())
        p /= p.sum()
        g = W.T @ (p - np.eye(len(z))[int(Y[i])])  # d CE / d x
        if (g != 0).any():
            grad_min = min(grad_min, float(np.abs(g[g != 0]).min()))
        a = np.minimum(np.maximum(x + eps * (hi - lo) * np.sign(g), lo), hi).astype("<f4")
        ans = top1(W @ a.astype(np.float64) + bias)
        (true if ans != int(Y[i]) else false).append((int(i), a.reshape(np.shape(S[i])), ans))
        if len(true) >= n + k and len(false) >= f:
            break
    assert len(true) >= n + k and len(false) >= f
    split = permutation(secret, "frontier-split", n + k)
    groups = {"triggers": [true[j] for j in sorted(split[:n])], "controls": [true[j] for j in sorted(split[n:n + k])],
              "false": false[:f]}
    out = {"walk": walk, "split": split, "margins": (grad_min, margin_min)}
    for name, rows in groups.items():
        out[name] = [r[0] for r in rows]
        out[name + "_x"] = np.stack([r[1] for r in rows]) if rows else None
        out[name + "_labels"] = [int(Y[r[0]]) for r in rows]
        out[name + "_answers"] = [r[2] for r in rows]
    return out


# ------------------------------------------------------------------ verdicts (spec §6)
def predictions(logits) -> np.ndarray:
    """§6.3: per row, the top-1 class (ties to the lowest, +-inf compared as numbers), or -1
    for a row holding a NaN."""
    z = np.asarray(logits, dtype=np.float32)
    out = []
    for row in z:
        if np.isnan(row).any():
            out.append(-1)
            continue
        best = 0
        for j in range(1, len(row)):
            if row[j] > row[best]:
                best = j
        out.append(best)
    return np.array(out, dtype=np.int64)


def hits(logits, labels) -> np.ndarray:
    """§6.1: per row, top-1 (ties to the lowest class) equals the label; a row holding a NaN
    is a miss."""
    return predictions(logits) == np.asarray(labels, dtype=np.int64)


def mcnemar_p(b: int, c: int) -> Fraction:
    """§6.3: exact one-sided McNemar: P[Binomial(b + c, 1/2) >= b], 1 when b = 0."""
    if b == 0:
        return Fraction(1)
    return binomial_sf(b, b + c, Fraction(1, 2))


def fisher_p(t: int, c: int, n: int, k: int) -> Fraction:
    """§6.3: exact one-sided Fisher: P[X >= t] for X ~ Hypergeometric(n + k, t + c, n), 1 when t = 0."""
    from math import comb

    if t == 0:
        return Fraction(1)
    K, N = t + c, n + k
    return Fraction(sum(comb(K, x) * comb(N - K, n - x) for x in range(t, min(n, K) + 1)), comb(N, n))


def beta_binomial_pmf(n: int, a, b) -> list[Fraction]:
    """P[X = x], x = 0..n, for X ~ BetaBinomial(n, a, b), exact for the rationals a, b
    (a float64 is the rational it stores): C(n, x) B(x + a, n - x + b) / B(a, b)."""
    a, b = Fraction(a), Fraction(b)
    p = Fraction(1)
    for i in range(n):  # P[X = 0] = prod (b + i) / (a + b + i)
        p *= (b + i) / (a + b + i)
    out = [p]
    for x in range(n):  # P[X = x + 1] / P[X = x] = (n - x)(a + x) / ((x + 1)(b + n - x - 1))
        p = p * (n - x) * (a + x) / ((x + 1) * (b + n - x - 1))
        out.append(p)
    return out


def beta_binomial_sf(matches: int, n: int, a, b) -> Fraction:
    if matches <= 0:
        return Fraction(1)
    return sum(beta_binomial_pmf(n, a, b)[matches:], Fraction(0))


def beta_binomial_threshold(n: int, alpha, a, b) -> int:
    """Fewest m in 0..n with P[X >= m] <= alpha; n + 1 when there is none."""
    pmf, alpha = beta_binomial_pmf(n, a, b), Fraction(alpha)
    tail = Fraction(1)  # P[X >= m]
    for m in range(n + 1):
        if tail <= alpha:
            return m
        tail -= pmf[m]
    return n + 1


def control_test(key: dict, logits) -> tuple[int, Fraction]:
    """§6.3: (control matches, control p-value) from the logits of the n triggers followed
    by the controls (float32 [n + k, C])."""
    n = key["n"]
    c = control_set(key)
    labels = np.concatenate([trigger_labels(key), c["labels"]])
    h = hits(logits, labels)
    ht, hc = h[:n], h[n:]
    if c["groups"]:
        ps = []
        for g in range(c["groups"]):
            hg = hc[g * n:(g + 1) * n]
            ps.append(mcnemar_p(int((ht & ~hg).sum()), int((~ht & hg).sum())))
        a = predictions(logits)
        if key.get("true_labels") is not None:  # the suspect must do the task (§6.3)
            right = int((a[n:2 * n] == key["true_labels"]).sum())
            ps.append(Fraction(1) if right == 0 else binomial_sf(right, n, Fraction(1, key["num_classes"])))
        if c["groups"] == 2:  # content: does the mark move the answers more than its decoy?
            m, u, d = a[:n], a[n:2 * n], a[2 * n:3 * n]
            ps.append(mcnemar_p(int(((m != u) & (d == u)).sum()), int(((m == u) & (d != u)).sum())))
        return int(hc.sum()), max(ps)
    return int(hc.sum()), fisher_p(int(ht.sum()), int(hc.sum()), n, len(hc))


def verdict(key: dict, logits, alpha: float = 1e-6, p0=None, calibration=None) -> dict:
    """§6.4 for a trigger key: ``logits`` float32 [n + k, C] (triggers, then controls).
    ``p0``: a Fraction (default 1/num_classes); ``calibration``: (a, b) of a beta-binomial."""
    n = key["n"]
    matches = int(hits(np.asarray(logits)[:n], trigger_labels(key)).sum())
    if calibration is not None:
        null_p = beta_binomial_sf(matches, n, *calibration)
    else:
        null_p = binomial_sf(matches, n, Fraction(1, key["num_classes"]) if p0 is None else Fraction(p0))
    out = {"matches": matches, "null_p_value": null_p, "control_matches": None, "control_p_value": None}
    p = null_p
    if key["trigger_kind"] != "abstract":
        cm, cp = control_test(key, logits)
        out.update(control_matches=cm, control_p_value=cp)
        p = max(p, cp)
    out.update(p_value=p, verified=p <= Fraction(alpha))
    return out


# ------------------------------------------------------------------ calibrations (spec §6.5, §6.6)
MAX_PRECISION = 10 ** 7


def beta_binomial_loglik(counts, n: int, a: float, b: float) -> float:
    """Σ_j log P[X = k_j] for X ~ BetaBinomial(n, a, b) (float64, by sums of logs)."""
    import math

    total = 0.0
    for k in counts:
        total += math.log(math.comb(n, k))
        total += sum(math.log(a + i) for i in range(k)) + sum(math.log(b + i) for i in range(n - k))
        total -= sum(math.log(a + b + i) for i in range(n))
    return total


def fit_beta_binomial(counts, n: int, p0: float) -> tuple[float, float]:
    """§6.5: maximum likelihood (a, b) of the counts plus one pseudo-model at round(n p0),
    by Newton's method on (log a, log b) with step halving -- another optimiser than
    nnmark's: the two agree to the tolerance the specification states, not bitwise."""
    import math

    k = [int(c) for c in counts] + [int(round(n * p0))]

    def grad_hess(a, b):
        ga = gb = haa = hbb = hab = 0.0
        for x in k:
            da = sum(1.0 / (a + i) for i in range(x))
            db = sum(1.0 / (b + i) for i in range(n - x))
            ds = sum(1.0 / (a + b + i) for i in range(n))
            ga += da - ds
            gb += db - ds
            d2s = sum(1.0 / (a + b + i) ** 2 for i in range(n))
            haa += -sum(1.0 / (a + i) ** 2 for i in range(x)) + d2s
            hbb += -sum(1.0 / (b + i) ** 2 for i in range(n - x)) + d2s
            hab += d2s
        return ga, gb, haa, hbb, hab

    mean = sum(k) / len(k) / n
    a, b = 10.0 * mean, 10.0 * (1 - mean)  # a start with a + b = 10, as one of nnmark's
    f = beta_binomial_loglik(k, n, a, b)
    for _ in range(200):
        ga, gb, haa, hbb, hab = grad_hess(a, b)
        # in u = log a, v = log b: gradient (a ga, b gb), Hessian by the chain rule
        g = (a * ga, b * gb)
        H = ((a * a * haa + a * ga, a * b * hab), (a * b * hab, b * b * hbb + b * gb))
        det = H[0][0] * H[1][1] - H[0][1] * H[1][0]
        if H[0][0] < 0 and det > 0:  # concave here: the Newton step
            step = (-(H[1][1] * g[0] - H[0][1] * g[1]) / det, -(H[0][0] * g[1] - H[1][0] * g[0]) / det)
        else:  # else uphill along the gradient
            step = (g[0] * 0.1, g[1] * 0.1)
        t = 1.0
        while t > 1e-12:
            na, nb = a * math.exp(t * step[0]), b * math.exp(t * step[1])
            if na + nb > MAX_PRECISION:
                na, nb = na * MAX_PRECISION / (na + nb), nb * MAX_PRECISION / (na + nb)
            nf = beta_binomial_loglik(k, n, na, nb)
            if nf >= f:
                break
            t *= 0.5
        else:
            break
        if abs(nf - f) < 1e-13 * max(1.0, abs(f)) and max(abs(t * step[0]), abs(t * step[1])) < 1e-10:
            a, b, f = na, nb, nf
            break
        a, b, f = na, nb, nf
    return a, b


CALIBRATION_FORMAT = "nnmark-calibration"
CALIBRATION_VERSION = 1
MIN_MODELS = 10


def parse_calibration_file(data: bytes) -> dict:
    """§6.6: the members a verdict uses, checked; derived members recomputed."""
    body = json.loads(data.decode("utf-8"))
    if not isinstance(body, dict) or body.get("format") != CALIBRATION_FORMAT:
        raise ValueError("not a calibration file")
    if type(body.get("version")) is not int or body["version"] != CALIBRATION_VERSION:
        raise ValueError("version")
    key_id, n, counts = body["key_id"], body["n"], body["counts"]
    if not (isinstance(key_id, str) and re.fullmatch(r"[0-9a-f]{16}", key_id)):
        raise ValueError("key_id")
    if type(n) is not int or n < 1:
        raise ValueError("n")
    if type(counts) is not list or any(type(c) is not int or not 0 <= c <= n for c in counts):
        raise ValueError("counts")
    if type(body["n_models"]) is not int or body["n_models"] != len(counts) or len(counts) < MIN_MODELS:
        raise ValueError("n_models")
    if not isinstance(body["kind"], str):
        raise ValueError("kind")
    out = {"key_id": key_id, "n": n, "counts": counts, "kind": body["kind"]}
    for name, lo, hi in (("a", 1e-12, 2e7), ("b", 1e-12, 2e7), ("null_rate_used", 0.0, 1.0), ("alpha", 0.0, 1.0)):
        v = body[name]
        if type(v) not in (int, float) or not lo <= v <= hi or v != v:
            raise ValueError(name)
        out[name] = float(v)
    if not (0 < out["null_rate_used"] < 1 and 0 < out["alpha"] < 1):
        raise ValueError("null_rate_used / alpha")
    pv = body.get("p_values")
    if pv is not None and (type(pv) is not list or len(pv) != len(counts)
                           or any(type(v) not in (int, float) or not 0 <= v <= 1 for v in pv)):
        raise ValueError("p_values")
    a, b = out["a"], out["b"]
    out["null_rate"] = a / (a + b)
    out["dispersion"] = 1.0 / (a + b + 1.0)
    out["threshold"] = beta_binomial_threshold(n, out["alpha"], a, b)
    out["nominal_threshold"] = binomial_threshold(n, out["alpha"], Fraction(out["null_rate_used"]))
    out["false_positives"] = sum(c >= out["nominal_threshold"] for c in counts)
    out["support"] = 1.0 / (len(counts) + 1)
    return out
