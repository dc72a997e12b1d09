"""Computes the known-answer vectors of docs/spec.md with the installed nnmark package.

    python tests/make_spec_vectors.py            # print every vector block
    python tests/make_spec_vectors.py --write    # rewrite the blocks in docs/spec.md in place

In docs/spec.md each vector is a fenced ```json block right after a marker line
``<!-- kat:NAME -->``; ``--write`` replaces the block's contents and nothing else,
so every number in the document comes from running code. tests/test_spec.py reads
the blocks back and checks them against the package and against tests/_spec.py.
Key files are written by the package itself, with the clock fixed to CREATED.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import nnmark
from nnmark import keys as _keys
from nnmark import triggers as _triggers

SPEC = Path(__file__).resolve().parent.parent / "docs" / "spec.md"
CREATED = "2025-01-01T00:00:00+00:00"
SECRET = bytes(range(32))
PHILOX = [  # DESIGN.md section 4
    (("00000000",) * 4, ("00000000",) * 2),
    (("ffffffff",) * 4, ("ffffffff",) * 2),
    (("243f6a88", "85a308d3", "13198a2e", "03707344"), ("a4093822", "299f31d0")),
]


@contextmanager
def fixed_clock():
    class _Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromisoformat(CREATED).astimezone(tz)

    with mock.patch.object(_keys, "datetime", _Clock):
        yield


def saved_text(key) -> str:
    with tempfile.TemporaryDirectory() as d, fixed_clock():
        return key.save(Path(d) / "k.key").read_text()


def f32_sha(a) -> str:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def f64_sha(a) -> str:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f8").tobytes()).hexdigest()


def bitstring(bits) -> str:
    return "".join(str(int(b)) for b in bits)


# The tensors of the examples, from formulas (tests/test_spec.py builds them the same way).
def whitebox_carrier() -> np.ndarray:
    o, c, i, j = np.indices((4, 3, 3, 3))
    return (((o * 29 + c * 13 + i * 7 + j * 3) % 17 - 8) / 8).astype(np.float32)


def dense_matrix() -> np.ndarray:
    t, i = np.indices((24, 12))
    return (((13 * t + 7 * i + t * i * i) % 29 - 14) / 8).astype(np.float32)


def dense_carrier() -> np.ndarray:
    o, c, i, j = np.indices((2, 3, 2, 2))
    return (((o * 7 + c * 5 + i * 3 + j) % 13 - 6) / 4).astype(np.float32)


def samples(shape) -> np.ndarray:
    k = np.arange(int(np.prod(shape)))
    return ((k * 37 % 101) / 100.0).reshape(shape).astype(np.float32)


TRIGGER_EXAMPLES = {
    # name: constructor arguments (secret is SECRET; samples from samples(samples_shape))
    "abstract": dict(kind="abstract", n=6, num_classes=10, input_shape=[1, 8, 8], value_range=[0.0, 1.0],
                     mean=[0.5], std=[0.25]),
    "abstract-rgb": dict(kind="abstract", n=3, num_classes=10, input_shape=[3, 5, 7], value_range=[-1.0, 2.0],
                         mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]),
    "content": dict(kind="content", n=6, num_classes=10, target=7, samples_shape=[6, 1, 8, 8],
                    value_range=[0.0, 1.0], mean=[0.5], std=[0.25]),
    "content-rgb": dict(kind="content", n=3, num_classes=5, target=2, samples_shape=[3, 3, 10, 6],
                        value_range=[-1.0, 1.0], mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7]),
    "noise": dict(kind="noise", n=6, num_classes=10, target=7, samples_shape=[6, 1, 8, 8],
                  value_range=[0.0, 1.0], mean=[0.5], std=[0.25], noise_std=0.25),
    "unrelated": dict(kind="unrelated", n=6, num_classes=10, target=7, samples_shape=[6, 1, 8, 8],
                      value_range=[0.0, 1.0], mean=[0.5], std=[0.25]),
}


def trigger_key(params: dict) -> nnmark.TriggerKey:
    p = dict(params)
    shape = p.pop("samples_shape", None)
    return nnmark.TriggerKey(SECRET, samples=samples(shape) if shape is not None else None, **p)


# ---------------------------------------------------------------------------- the vectors
def vectors() -> dict[str, object]:
    v: dict[str, object] = {}

    # Philox4x32-10 (DESIGN.md section 4), computed by the package
    v["philox"] = [{"counter": list(c), "key": list(k),
                    "output": [f"{w:08x}" for w in nnmark.philox4x32_10([int(x, 16) for x in c],
                                                                        [int(x, 16) for x in k])]}
                   for c, k in PHILOX]

    # subkey
    carrier = "features.0.weight"
    key = nnmark.WhiteBoxKey(SECRET, carrier, [0, 1] * 16)
    d = hashlib.sha256(SECRET + b"nnmark:projection:v1:" + carrier.encode()).hexdigest()
    k0, k1 = key.subkey()
    v["subkey"] = {"secret": SECRET.hex(), "carrier": carrier, "sha256": d, "k0": f"{k0:08x}", "k1": f"{k1:08x}"}

    # projection: Philox words of a few (column, block) counters and X entries
    cols = [0, 1, 2, 4294967297]
    words = {}
    for i in cols:
        for b in (0, 1):
            out = nnmark.philox4x32_10([i & 0xFFFFFFFF, i >> 32, b, 0], [k0, k1])
            words[f"{i},{b}"] = [f"{w:08x}" for w in out]
    column_bits = {}
    for i in cols:
        bits = []
        for t in range(256):
            o = [int(x, 16) for x in words[f"{i},{t >> 7}"]]
            j = t & 127
            bits.append((o[j >> 5] >> (j & 31)) & 1)
        column_bits[str(i)] = bitstring(bits)
    # X[0:8, 0:16] from the native op: projecting the unit vectors e_i gives column i of X
    eye = torch.eye(16, dtype=torch.float64)
    X = nnmark.keyed_projection(eye, (k0, k1), 8).numpy().T  # [8, 16]
    for i in range(3):  # the native columns agree with the Philox words above
        assert bitstring((X[:, i] > 0).astype(int)) == column_bits[str(i)][:8]
    v["projection"] = {"k0": f"{k0:08x}", "k1": f"{k1:08x}", "philox_words": words,
                       "column_bits_t0_to_255": column_bits,
                       "X_rows_0_to_7_cols_0_to_15": ["".join("+" if x > 0 else "-" for x in row) for row in X]}

    # key ids
    dkey = nnmark.DenseKey(dense_matrix(), "conv.weight", [1, 0, 0] * 8, "filter_mean", order="keras",
                           shape=(2, 3, 2, 2))
    v["key_id"] = {"secret": SECRET.hex(), "whitebox": key.key_id,
                   "trigger": nnmark.TriggerKey(SECRET, "abstract", n=1).key_id,
                   "dense_matrix_sha256": f32_sha(dense_matrix()), "dense": dkey.key_id}

    # message bits
    msg = "ACME Corp, model v3"
    v["message_bits"] = {"message": msg, "n": 64,
                         "shake256_8_bytes": hashlib.shake_256(b"nnmark:message:v1:" + msg.encode()).hexdigest(8),
                         "bits": bitstring(nnmark.message_bits(msg, 64))}

    # white-box key file and extraction
    owner = nnmark.message_bits(msg, 32)
    wkey = nnmark.WhiteBoxKey(SECRET, carrier, owner, "filter_mean", shape=(4, 3, 3, 3))
    v["whitebox-key-file"] = saved_text(wkey)
    w = torch.from_numpy(whitebox_carrier())
    p = wkey.project(w.double()).numpy()
    p32 = wkey.project(w).numpy()
    assert np.array_equal(p, p32.astype(np.float64))  # dyadic values: exact in float32 and float64
    assert np.array_equal(p * 32, np.round(p * 32))  # multiples of 1/32
    bits = nnmark.extract(wkey, {carrier: w})
    verdict = nnmark.verify(wkey, {carrier: w}, alpha=1e-6)
    penalty = float(nnmark.Uchida(wkey, strength=0.01).penalty(_Holder(carrier, w)))
    v["whitebox-extract"] = {
        "carrier_shape": [4, 3, 3, 3], "carrier_sha256": f32_sha(w),
        "reduced_first_8": [float(x) for x in wkey.reduce(w.double()).numpy()[:8]],
        "projections_times_32": [int(x * 32) for x in p],
        "extracted_bits": bitstring(bits), "matches": verdict.matches, "p_value": verdict.p_value,
        "threshold_at_1e-6": verdict.threshold, "penalty_strength_0.01": penalty}

    # dense key file and extraction
    v["dense-key-file"] = saved_text(dkey)
    dw = torch.from_numpy(dense_carrier())
    v["dense-extract"] = {
        "carrier_shape": [2, 3, 2, 2], "carrier_sha256": f32_sha(dw),
        "reduced_torch_order": [float(x) for x in nnmark.DenseKey(dense_matrix(), "conv.weight", [1, 0, 0] * 8,
                                                                   order="torch").reduce(dw.double()).numpy()],
        "reduced_keras_order": [float(x) for x in dkey.reduce(dw.double()).numpy()],
        "projections": [float(x) for x in dkey.project(dw.double()).numpy()],
        "extracted_bits": bitstring(nnmark.extract(dkey, {"conv.weight": dw}))}

    # keyed streams and portable math
    v["trigger-streams"] = {
        "secret": SECRET.hex(),
        "labels_first_16_bytes": _triggers._stream(SECRET, "labels", 16).hex(),
        "labels_first_2_uint64": [str(int(x)) for x in _triggers._uint64(SECRET, "labels", 2)],
        "abstract_first_2_uniforms": [float(x).hex() for x in _triggers._uniform(SECRET, "abstract", 2)],
        "noise_first_3_gaussians": [float(x).hex() for x in _triggers._gaussian(SECRET, "noise", 3)],
        "order:0_first_10_of_100": [int(x) for x in _triggers._permutation(SECRET, "order:0", 100)[:10]],
        "order:1_first_10_of_100": [int(x) for x in _triggers._permutation(SECRET, "order:1", 100)[:10]],
        "select_first_5_of_40": [int(x) for x in _triggers._permutation(SECRET, "select", 40)[:5]],
    }
    xs = np.array([-10.0, -1.0, 0.1, 1.0, 2.5, 3.0, 100.0])
    v["portable-math"] = {
        "x": [x.hex() for x in xs],
        "sin": [float(y).hex() for y in _triggers._sin(xs)],
        "cos": [float(y).hex() for y in _triggers._cos(xs)],
        "exp": [float(y).hex() for y in _triggers._exp(xs)],
        "log": [float(y).hex() for y in _triggers._log(np.abs(xs))],
    }

    # trigger sets
    tv = {}
    for name, params in TRIGGER_EXAMPLES.items():
        tk = trigger_key(params)
        x, y = tk.triggers()
        raw, _ = tk.triggers(normalized=False)
        raw64, _ = tk.triggers(normalized=False, dtype=torch.float64)
        entry = {"params": params, "key_id": tk.key_id}
        if "samples_shape" in params:
            entry["samples_sha256"] = f32_sha(samples(params["samples_shape"]))
        entry.update({"labels": [int(t) for t in y], "sha256_raw_f32": f32_sha(raw), "sha256_raw_f64": f64_sha(raw64),
                      "sha256_f32": f32_sha(x), "first_4_raw": [float(t) for t in raw64.reshape(-1)[:4]]})
        if params["kind"] == "content":
            r0, c0, ph, pw, pbits = tk._patch()
            entry["patch"] = {"row": r0, "col": c0, "height": ph, "width": pw,
                              "bits": bitstring(pbits.reshape(-1).astype(int))}
        tv[name] = entry
    v["trigger-sets"] = tv
    v["trigger-key-file"] = saved_text(trigger_key(TRIGGER_EXAMPLES["abstract"]))

    # controls, the decoy stamp, held-back controls, per-sample labels, the training set
    v["trigger-controls"] = controls_vectors()
    v["held-back-keys"], v["per-sample-key-file"] = held_back_vectors()
    v["frontier-keys"], v["frontier-key-file"] = frontier_vectors()

    # verdict statistics
    v["binomial"] = {
        "thresholds": [{"n": n, "p0": p0s, "alpha": a, "threshold": nnmark.binomial_threshold(n, a, p0)}
                       for n, p0s, p0, a in [(256, "1/2", 0.5, 1e-6), (100, "1/10", 0.1, 1e-6),
                                             (64, "1/2", 0.5, 1e-6), (32, "1/2", 0.5, 1e-3),
                                             (20, "1/2", 0.5, 1e-6), (10, "1/2", 0.5, 1e-6)]],
        "p_values": [{"n": n, "p0": p0s, "matches": m, "p_value": nnmark.binomial_p_value(m, n, p0)}
                     for n, p0s, p0, m in [(256, "1/2", 0.5, 167), (256, "1/2", 0.5, 166), (256, "1/2", 0.5, 0),
                                           (100, "1/10", 0.1, 28), (100, "1/10", 0.1, 27), (32, "1/2", 0.5, 32)]],
    }
    v["control-tests"] = control_test_vectors()
    v["beta-binomial"], v["calibration-file"] = calibration_vectors()
    v.update(claim_vectors(wkey, dkey, trigger_key(TRIGGER_EXAMPLES["abstract"])))
    v["deepsigns-key-file"], v["deepsigns-extract"] = deepsigns_vectors()
    return v


# ------------------------------------------------------------------- DeepSigns (§9)
DS_LAYER = "fc"
DS_CLASSES = [5, 2]
DS_LABELS = [2, 5, 5, 2, 5, 2, 2, 5]


def ds_inputs() -> np.ndarray:
    """The §9.7 key's inputs [8, 4]: multiples of 1/8 (tests/test_spec.py builds them the same way)."""
    i, j = np.indices((8, 4))
    return (((3 * i + 5 * j + i * j) % 9 - 4) / 8).astype(np.float32)


def ds_layer_weights() -> tuple[np.ndarray, np.ndarray]:
    """The §9.7 model's layer ``fc`` (Linear 4 -> 8): W [8, 4] and b [8], multiples of 1/4 and 1/8."""
    j, i = np.indices((8, 4))
    return (((5 * j + 3 * i) % 7 - 3) / 4).astype(np.float32), ((np.arange(8) % 3 - 1) / 8).astype(np.float32)


def ds_model() -> torch.nn.Module:
    """fc (the marked layer), a ReLU and a head: only fc's output matters to the mark."""
    from collections import OrderedDict

    m = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(4, 8), act=torch.nn.ReLU(), head=torch.nn.Linear(8, 10)))
    w, b = ds_layer_weights()
    with torch.no_grad():
        m.fc.weight.copy_(torch.from_numpy(w))
        m.fc.bias.copy_(torch.from_numpy(b))
        m.head.weight.zero_()
        m.head.bias.zero_()
    return m.eval()


def ds_key() -> nnmark.DeepSignsKey:
    bits = nnmark.message_bits("ACME Corp, model v3", 24)
    return nnmark.DeepSignsKey(SECRET, DS_LAYER, bits, DS_CLASSES, ds_inputs(), DS_LABELS, 10)


def deepsigns_vectors() -> tuple[str, dict]:
    key = ds_key()
    model = ds_model()
    carrier = "deepsigns:" + DS_LAYER
    d = hashlib.sha256(SECRET + b"nnmark:projection:v1:" + carrier.encode()).hexdigest()
    k0, k1 = key.subkey()
    wm = nnmark.DeepSigns(key, strength=0.1, centre=0.01)
    with torch.no_grad():
        act = wm.activations(model)  # [8, 8]
        means = key.averaging() @ act
        p = key.project(means)
        p, bce, centre = wm.losses(model)
        penalty = float(wm.penalty(model))
    a = act.double().numpy()
    assert np.array_equal(a * 32, np.round(a * 32))  # dyadic: exact in float32
    m = means.double().numpy()
    pd = p.double().numpy()
    assert np.array_equal(pd * 128, np.round(pd * 128)) and np.abs(pd).min() >= 1 / 128
    verdict = nnmark.verify(key, model, alpha=1e-6)
    return saved_text(key), {
        "subkey_carrier": carrier, "sha256": d, "k0": f"{k0:08x}", "k1": f"{k1:08x}",
        "activations_times_32": [[int(x) for x in row] for row in np.round(a * 32)],
        "class_means_times_128": [[int(x) for x in row] for row in np.round(m * 128)],
        "projections_times_128": [int(x) for x in np.round(pd * 128)],
        "extracted_bits": bitstring(nnmark.extract(key, model)), "matches": verdict.matches,
        "p_value": verdict.p_value, "threshold_at_1e-6": verdict.threshold,
        "bce_sum": float(bce), "centre_term": float(centre), "penalty_strength_0.1_centre_0.01": penalty}


# ------------------------------------------------------------------- claims (§8)
CLAIM_CARRIER = "features.0.weight"
CLAIM_STATEMENT = "ACME Corp, model v3"
UNICODE_STATEMENT = "ACME Corp \u2014 mod\u00e8le v3 \U0001d538"  # escaped in canonical JSON, one as a surrogate pair


def claim_header() -> str:
    """The safetensors header of the §7.15 checkpoint: the §7.6 carrier alone, padded with
    spaces to a multiple of 8 bytes (as the safetensors library writes it)."""
    h = json.dumps({CLAIM_CARRIER: {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [0, 432]}},
                   separators=(",", ":"))
    return h + " " * (-len(h) % 8)


def claim_file_bytes(header: str, data: bytes) -> bytes:
    raw = header.encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw + data


def claim_key() -> nnmark.WhiteBoxKey:
    """The common secret, the §7.6 carrier, and as owner bits the bits the §7.6 carrier gives:
    the carrier carries this key (32 of 32 bits)."""
    w = torch.from_numpy(whitebox_carrier())
    probe = nnmark.WhiteBoxKey(SECRET, CLAIM_CARRIER, [0] * 32, "filter_mean", shape=(4, 3, 3, 3))
    return nnmark.WhiteBoxKey(SECRET, CLAIM_CARRIER, nnmark.extract(probe, {CLAIM_CARRIER: w}), "filter_mean",
                              shape=(4, 3, 3, 3))


def _commitment_entry(key, statement: str | None = None) -> dict:
    from nnmark.commitments import DOMAIN, key_bytes
    from nnmark.keys import canonical_json, key_body

    b = key_bytes(key)
    c = nnmark.commit(key, created=CREATED, statement=statement)
    hashed = DOMAIN + canonical_json({"created": CREATED, "key": key_body(key), "spec": 1, "statement": statement})
    assert hashlib.sha256(hashed).hexdigest() == c.commitment
    return {"key_bytes_length": len(b), "key_bytes_sha256": hashlib.sha256(b).hexdigest(), "created": CREATED,
            "statement": statement, "hashed_length": len(hashed), "commitment": c.commitment, "id": c.id}


def claim_vectors(wkey, dkey, tkey) -> dict:
    from dataclasses import replace

    out = {"commitment": {"whitebox": _commitment_entry(wkey), "whitebox-dense": _commitment_entry(dkey),
                          "trigger": _commitment_entry(tkey),
                          "whitebox-statement": _commitment_entry(wkey, UNICODE_STATEMENT)}}
    with tempfile.TemporaryDirectory() as d:
        com = nnmark.commit(wkey, statement=CLAIM_STATEMENT, created=CREATED)
        out["commitment-file"] = com.save(Path(d) / "c.json").read_text()
        header = claim_header()
        path = Path(d) / "model.safetensors"
        path.write_bytes(claim_file_bytes(header, whitebox_carrier().astype("<f4").tobytes()))
        plain = path.read_bytes()
        ckey = claim_key()
        ccom = nnmark.commit(ckey, statement=CLAIM_STATEMENT, created=CREATED)
        nnmark.stamp(path, ccom)
        stamped = path.read_bytes()
        n = int.from_bytes(stamped[:8], "little")
        out["claim-checkpoint"] = {
            "header": header, "size": len(plain), "sha256": hashlib.sha256(plain).hexdigest(),
            "owner_bits": bitstring(ckey.bits), "stamped_header": stamped[8:8 + n].decode("utf-8"),
            "stamped_size": len(stamped), "stamped_sha256": hashlib.sha256(stamped).hexdigest()}
        cert = replace(nnmark.certify(ckey, path, ccom), nnmark_version="0.0.0")
        out["certificate-file"] = cert.save(Path(d) / "claim.json").read_text()
    return out


# ------------------------------------------------------------------- controls (§5.10, §5.11)
CONTROL_EXAMPLES = {  # beside the content, content-rgb, noise and unrelated examples of §7.9
    "content-narrow": dict(kind="content", n=2, num_classes=3, target=1, samples_shape=[2, 1, 3, 5],
                           value_range=[0.0, 1.0]),
    "content-1d": dict(kind="content", n=2, num_classes=3, target=[2, 0], samples_shape=[2, 6],
                       value_range=[-1.0, 1.0], mean=[0.0], std=[0.5]),
    "content-single-place": dict(kind="content", n=2, num_classes=3, target=1, samples_shape=[2, 2, 2, 2],
                                 value_range=[0.0, 1.0]),
}
UNIFORM_DECOY = dict(kind="content", n=2, num_classes=10, target=7, samples_shape=[2, 1, 8, 8],
                     value_range=[0.0, 1.0])


def uniform_decoy_secret() -> tuple[int, bytes]:
    """The first i whose secret SHA-256(b"nnmark:spec:decoy:" + decimal i) gives a decoy that is
    all one extreme (§5.10.1)."""
    for i in range(10000):
        secret = hashlib.sha256(b"nnmark:spec:decoy:" + str(i).encode()).digest()
        p = dict(UNIFORM_DECOY)
        shape = p.pop("samples_shape")
        bits = nnmark.TriggerKey(secret, samples=samples(shape), **p)._decoy_patch()[4]
        if bits.all() or not bits.any():
            return i, secret
    raise AssertionError("no example")


def _patch_json(patch) -> dict:
    r, c, ph, pw, bits = patch
    return {"row": int(r), "col": int(c), "height": int(ph), "width": int(pw),
            "bits": bitstring(np.asarray(bits).reshape(-1).astype(int))}


def _controls_entry(tk) -> dict:
    xc, yc = tk.controls()
    raw, _ = tk.controls(normalized=False)
    raw64, _ = tk.controls(normalized=False, dtype=torch.float64)
    e = {"count": tk.num_controls, "paired": tk.controls_paired, "labels": [int(t) for t in yc],
         "sha256_raw_f32": f32_sha(raw), "sha256_raw_f64": f64_sha(raw64), "sha256_f32": f32_sha(xc)}
    if tk.kind == "content":
        c, h, w = _triggers._chw(tk.input_shape)
        e["patch"] = _patch_json(tk._patch())
        e["decoy"] = _patch_json(tk._decoy_patch())
        ph, pw = e["patch"]["height"], e["patch"]["width"]
        r0, c0 = e["patch"]["row"], e["patch"]["col"]
        free = [(r, q) for r in range(h - ph + 1) for q in range(w - pw + 1)
                if r + ph <= r0 or r >= r0 + ph or q + pw <= c0 or q >= c0 + pw]
        e["decoy"]["places_apart"] = len(free)
    return e


def controls_vectors() -> dict:
    out = {}
    for name in ("content", "content-rgb", "noise", "unrelated"):
        out[name] = _controls_entry(trigger_key(TRIGGER_EXAMPLES[name]))
    for name, params in CONTROL_EXAMPLES.items():
        out[name] = {"params": params, **_controls_entry(trigger_key(params))}
    i, secret = uniform_decoy_secret()
    p = dict(UNIFORM_DECOY)
    shape = p.pop("samples_shape")
    tk = nnmark.TriggerKey(secret, samples=samples(shape), **p)
    out["content-uniform-decoy"] = {"params": UNIFORM_DECOY, "secret_index": i, "secret": secret.hex(),
                                    **_controls_entry(tk)}
    return out


@contextmanager
def fixed_secret():
    """TriggerKey.generate draws its secret from os.urandom: the common secret instead."""
    with mock.patch.object(_triggers.os, "urandom", lambda k: SECRET):
        yield


HELD_BACK_EXAMPLES = {  # TriggerKey.generate arguments (samples: samples(samples_shape))
    "target": dict(kind="unrelated", num_classes=5, target=3, samples_shape=[12, 1, 4, 4],
                   sample_labels=[0, 3, 1, 2, 3, 4, 0, 1, 2, 4, 0, 1], value_range=[0.0, 1.0], mean=0.5,
                   std=0.25),
    "per-sample": dict(kind="unrelated", num_classes=4, target=[2, 0, 3, 1, 1, 2, 0, 3, 2], n=5, controls=3,
                       samples_shape=[9, 1, 3, 3], value_range=[0.0, 1.0]),
}


def generated_key(params: dict) -> nnmark.TriggerKey:
    p = dict(params)
    shape = p.pop("samples_shape")
    with fixed_secret():
        return nnmark.TriggerKey.generate(samples=samples(shape), **p)


def held_back_vectors() -> tuple[dict, str]:
    out = {}
    for name, params in HELD_BACK_EXAMPLES.items():
        tk = generated_key(params)
        x, y = tk.triggers()
        xc, yc = tk.controls()
        xt, yt = tk.training_set()
        m = params["samples_shape"][0] - sum(1 for s in params.get("sample_labels", []) if s == params["target"])
        out[name] = {
            "params": params, "key_id": tk.key_id, "n": tk.n, "num_controls": tk.num_controls,
            "controls_from": tk.controls_from,
            "select_permutation": [int(i) for i in _triggers._permutation(SECRET, "select", m)],
            "labels": [int(t) for t in y], "control_labels": [int(t) for t in yc],
            "training_labels": [int(t) for t in yt],
            "training_order:0": [int(i) for i in tk.training_order(0)],
            "training_order:1": [int(i) for i in tk.training_order(1)],
            "sha256_f32": f32_sha(x), "controls_sha256_f32": f32_sha(xc), "training_sha256_f32": f32_sha(xt)}
    return out, saved_text(generated_key(HELD_BACK_EXAMPLES["per-sample"]))


# ------------------------------------------------------------------- frontier keys (§5.12)
FRONTIER_EXAMPLE = dict(samples_shape=[24, 1, 3, 3], num_classes=3, n=3, controls=3, false_adversaries=2, eps=0.2,
                        batch_size=5, value_range=[0.0, 1.0])


def frontier_weights() -> np.ndarray:
    """W [3, 9] of the §7.16 linear model: logits = W . flatten(x)."""
    c, i = np.indices((3, 9))
    return ((((c + 10 * i + c * i * i) % 11) - 5) / 4).astype(np.float32)


def frontier_model() -> torch.nn.Module:
    w = torch.from_numpy(frontier_weights())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w)
    return model


def frontier_labels(S: np.ndarray) -> np.ndarray:
    """The model's own answer to each sample, but (answer + 1) mod 3 for every fifth (k mod 5 = 0)."""
    clean = (S.reshape(len(S), -1).astype(np.float64) @ frontier_weights().astype(np.float64).T).argmax(1)
    return np.where(np.arange(len(S)) % 5 == 0, (clean + 1) % 3, clean).astype(np.int64)


def frontier_key() -> nnmark.TriggerKey:
    p = dict(FRONTIER_EXAMPLE)
    S = samples(p.pop("samples_shape"))
    return nnmark.TriggerKey.generate(kind="frontier", model=frontier_model(), samples=S, labels=frontier_labels(S),
                                      secret=SECRET, **p)


def _sources(x: torch.Tensor, S: np.ndarray, labels: np.ndarray, eps: float) -> list[int]:
    """The sample each adversarial input was made from: the one of its label within eps (one FGSM step)."""
    d = np.abs(x.numpy().reshape(len(x), 1, -1).astype(np.float64) - S.reshape(1, len(S), -1)).max(-1)
    out = []
    for row, lab in zip(d, labels):
        near = [int(j) for j in np.nonzero(row <= eps + 1e-6)[0]]
        assert len(near) >= 1
        out.append(near[0] if len(near) == 1 else min(near, key=lambda j: row[j]))
    return out


def frontier_vectors() -> tuple[dict, str]:
    tk = frontier_key()
    S = samples(FRONTIER_EXAMPLE["samples_shape"])
    m, eps = len(S), FRONTIER_EXAMPLE["eps"]
    x, y = tk.triggers()
    xc, yc = tk.controls()
    xf, yf = tk.false_adversaries()
    xt, yt = tk.training_set()
    entry = {
        "params": FRONTIER_EXAMPLE, "key_id": tk.key_id, "labels_of_samples": [int(v) for v in frontier_labels(S)],
        "walk": [int(i) for i in _triggers._permutation(SECRET, "frontier-order", m)],
        "split": [int(i) for i in _triggers._permutation(SECRET, "frontier-split", tk.n + tk.num_controls)],
        "triggers": _sources(x, S, y, eps), "controls": _sources(xc, S, yc, eps), "false": _sources(xf, S, yf, eps),
        "labels": [int(t) for t in y], "control_labels": [int(t) for t in yc],
        "control_answers": [int(t) for t in tk.control_answers], "false_labels": [int(t) for t in yf],
        "training_labels": [int(t) for t in yt],
        "training_order:0": [int(i) for i in tk.training_order(0)],
        "training_order:1": [int(i) for i in tk.training_order(1)],
        "sha256_f32": f32_sha(x), "controls_sha256_f32": f32_sha(xc), "false_sha256_f32": f32_sha(xf),
        "training_sha256_f32": f32_sha(xt)}
    return {"linear": entry}, saved_text(tk)


# ------------------------------------------------------------------- verdicts (§6)
class _Fixed(torch.nn.Module):
    """A "model" that answers any batch of the right size with fixed logits."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x):
        assert x.shape[0] == self.z.shape[0]
        return self.z.clone()


def logit_row(code: str, y: int, C: int) -> list[float]:
    """§7.12's row codes: hit, miss, tie-hit, tie-miss, nan."""
    z = [0.0] * C
    if code == "hit":
        z[y] = 1.0
    elif code == "miss":
        z[(y + 1) % C] = 1.0
    elif code == "tie-hit":  # label and class C-1 tie: the label is the lower index
        z[y] = z[C - 1] = 1.0
    elif code == "tie-miss":  # class 0 and the label tie: class 0 wins
        z[0] = z[y] = 1.0
    elif code == "nan":
        z[y] = 1.0
        z[(y + 1) % C] = float("nan")
    else:
        raise ValueError(code)
    return z


def fixed_model(tk: nnmark.TriggerKey, codes: list[str]) -> _Fixed:
    y = tk.triggers()[1].tolist() + (tk.controls()[1].tolist() if tk.has_controls else [])
    assert len(codes) == len(y)
    return _Fixed(torch.tensor([logit_row(c, t, tk.num_classes) for c, t in zip(codes, y)], dtype=torch.float32))


def mcnemar_codes(b: int, c: int) -> tuple[list[str], list[str]]:
    """Triggers and their paired controls with b pairs (hit, miss), c pairs (miss, hit),
    then one pair (hit, hit) and one (miss, miss)."""
    return (["hit"] * b + ["miss"] * c + ["hit", "miss"], ["miss"] * b + ["hit"] * c + ["hit", "miss"])


MCNEMAR_CASES = [(9, 1), (12, 0), (0, 5), (5, 5), (30, 10)]
FISHER_CASES = [(10, 10, 9, 1), (20, 5, 20, 0), (8, 12, 0, 3), (30, 30, 12, 10), (6, 6, 6, 1)]  # n, k, t, c


def control_test_vectors() -> dict:
    mc = []
    for b, c in MCNEMAR_CASES:
        n = b + c + 2
        tk = nnmark.TriggerKey(SECRET, "noise", samples=samples([n, 1, 2, 2]), target=1, num_classes=4)
        t_codes, c_codes = mcnemar_codes(b, c)
        verdict = nnmark.verify(tk, fixed_model(tk, t_codes + c_codes), alpha=1e-3)
        mc.append({"b": b, "c": c, "p_value": verdict.control_p_value})
    fi = []
    for n, k, t, c in FISHER_CASES:
        tk = nnmark.TriggerKey(SECRET, "unrelated", samples=samples([n, 1, 2, 2]), target=1, num_classes=4,
                               controls=samples([k, 1, 2, 2])[::-1].copy(), controls_from="given")
        codes = ["hit"] * t + ["miss"] * (n - t) + ["hit"] * c + ["miss"] * (k - c)
        verdict = nnmark.verify(tk, fixed_model(tk, codes), alpha=1e-3)
        fi.append({"n": n, "k": k, "t": t, "c": c, "p_value": verdict.control_p_value})
    # whole verdicts: the content example of §7.9, rows by code, without and with a calibration
    tk = trigger_key(TRIGGER_EXAMPLES["content"])
    cal = verdict_calibration()
    verdicts = []
    for triggers, unmarked, decoy in VERDICT_CASES:
        model = fixed_model(tk, triggers + unmarked + decoy)
        verdict = nnmark.verify(tk, model, alpha=VERDICT_ALPHA)
        vcal = nnmark.verify(tk, model, alpha=VERDICT_ALPHA, calibration=cal)
        verdicts.append({
            "triggers": triggers, "unmarked": unmarked, "decoy": decoy, "matches": verdict.matches,
            "control_matches": verdict.control_matches, "control_p_value": verdict.control_p_value,
            "null_p_value": nnmark.binomial_p_value(verdict.matches, tk.n, tk.null_rate),
            "p_value": verdict.p_value, "verified": verdict.verified, "threshold": verdict.threshold,
            "calibrated_null_p_value": cal.p_value(verdict.matches), "calibrated_p_value": vcal.p_value,
            "calibrated_verified": vcal.verified, "calibrated_threshold": vcal.threshold})
    return {"mcnemar": mc, "fisher": fi, "verdict_alpha": VERDICT_ALPHA, "verdicts": verdicts}


VERDICT_ALPHA = 0.05
VERDICT_CASES = [  # row codes of the 6 triggers, the 6 unmarked samples, the 6 decoy-stamped samples
    (["hit", "hit", "tie-hit", "hit", "nan", "hit"], ["miss", "miss", "tie-miss", "miss", "miss", "hit"],
     ["miss", "miss", "miss", "nan", "hit", "miss"]),
    (["hit"] * 6, ["miss"] * 6, ["hit"] * 6),  # a model that answers any stamp
    (["hit"] * 6, ["miss"] * 6, ["miss"] * 6),
]
VERDICT_COUNTS = [0, 1, 0, 2, 0, 0, 1, 3, 0, 1, 0, 0]  # 12 null models of the content example


def verdict_calibration():
    tk = trigger_key(TRIGGER_EXAMPLES["content"])
    return make_example_calibration(tk.key_id, tk.n, "trigger:content", VERDICT_COUNTS, tk.null_rate)


def make_example_calibration(key_id: str, n: int, kind: str, counts: list[int], p0: float):
    """A calibration whose a, b are the fit rounded to 6 significant digits (an optimiser's
    result: stable in print only when rounded)."""
    from nnmark.calibration import fit_beta_binomial, make_calibration

    a, b = fit_beta_binomial(counts, n, p0)
    return make_calibration(key_id, kind, n, counts, float(f"{a:.6g}"), float(f"{b:.6g}"), 1e-6, p0,
                            created=CREATED, version="0.0.0")


BB_COUNTS = [5, 11, 7, 3, 9, 4, 6, 5, 12, 0, 10, 4, 8, 2, 4, 10, 4, 4, 6, 1, 9, 7, 7, 10]  # 24 null models, n = 40


def calibration_vectors() -> tuple[dict, str]:
    from nnmark.calibration import fit_beta_binomial

    n, p0 = 40, 0.1
    a, b = fit_beta_binomial(BB_COUNTS, n, p0)
    cal = make_example_calibration("fc616e7f848b75fa", n, "trigger:unrelated", BB_COUNTS, p0)
    v = {"n": n, "p0": p0, "counts": BB_COUNTS, "pseudo_count": int(round(n * p0)),
         "a": float(f"{a:.6g}"), "b": float(f"{b:.6g}"), "rel_tolerance": 1e-4,
         "tails": [{"matches": m, "p_value": cal.p_value(m)} for m in (0, 1, 4, 10, 16, 20, 24)],
         "thresholds": [{"alpha": al, "threshold": cal.threshold_at(al)} for al in (1e-2, 1e-3, 1e-6)]}
    with tempfile.TemporaryDirectory() as d:
        text = verdict_calibration().save(Path(d) / "c.json").read_text()
    return v, text


class _Holder(torch.nn.Module):
    """A module whose parameter ``carrier`` is ``w`` (for the penalty)."""

    def __init__(self, carrier: str, w: torch.Tensor):
        super().__init__()
        mod = self
        parts = carrier.split(".")
        for part in parts[:-1]:
            child = torch.nn.Module()
            mod.add_module(part, child)
            mod = child
        mod.register_parameter(parts[-1], torch.nn.Parameter(w.clone()))


# ------------------------------------------------------------------------------ formatting
def render(value) -> str:
    """A vector as the text of its ```json block: key files verbatim, others one field a line."""
    if isinstance(value, str):
        return value.rstrip("\n")
    if isinstance(value, dict):
        lines = [f" {json.dumps(k)}: {json.dumps(val)}" for k, val in value.items()]
        return "{\n" + ",\n".join(lines) + "\n}"
    return "[\n" + ",\n".join(f" {json.dumps(x)}" for x in value) + "\n]"


BLOCK = re.compile(r"(<!-- kat:(?P<name>[\w.-]+) -->\n```json\n)(?P<body>.*?)(^```$)", re.S | re.M)


def write(path: Path, v: dict) -> None:
    text = path.read_text()
    seen = set()

    def sub(m):
        name = m.group("name")
        if name not in v:
            raise SystemExit(f"{path}: unknown vector {name!r}")
        seen.add(name)
        return m.group(1) + render(v[name]) + "\n" + m.group(4)

    text = BLOCK.sub(sub, text)
    missing = set(v) - seen
    if missing:
        raise SystemExit(f"{path}: no block for {sorted(missing)}")
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the vector blocks of docs/spec.md")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = vectors()
    if args.write:
        write(SPEC, v)
    else:
        for name, value in v.items():
            print(f"<!-- kat:{name} -->\n```json\n{render(value)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
