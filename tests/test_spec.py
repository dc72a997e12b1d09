"""docs/spec.md against the package and against the independent implementation in _spec.

(a) Every known-answer block of docs/spec.md (``<!-- kat:NAME -->`` + a ```json block)
    is read from the document itself and checked against nnmark and against _spec,
    so the document, the package and the independent implementation cannot drift apart.
(b) Keys of every kind made with random secrets and saved by nnmark are read by _spec
    from the key file alone, and _spec reproduces nnmark's extracted bits and trigger
    sets exactly (the trigger inputs bitwise, as float32 and float64).

Philox on random inputs, the projection against _spec and the subkey are covered by
test_philox.py / test_projection.py / test_keys.py; this file does not repeat them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import _spec
import make_spec_vectors as gen
import nnmark
from nnmark import triggers as _triggers

SPEC = Path(__file__).resolve().parent.parent / "docs" / "spec.md"
SECRET = bytes(range(32))
BLOCK = re.compile(r"<!-- kat:(?P<name>[\w.-]+) -->\n```json\n(?P<body>.*?)\n^```$", re.S | re.M)
KAT_NAMES = {"philox", "subkey", "projection", "key_id", "message_bits", "whitebox-key-file", "whitebox-extract",
             "dense-key-file", "dense-extract", "trigger-streams", "portable-math", "trigger-sets",
             "trigger-key-file", "binomial"}


def _blocks() -> dict[str, str]:
    text = SPEC.read_text(encoding="utf-8")
    found = [(m["name"], m["body"]) for m in BLOCK.finditer(text)]
    names = [n for n, _ in found]
    assert len(names) == len(set(names)), f"duplicate vector blocks: {names}"
    return dict(found)


BLOCKS = _blocks()


def kat(name: str):
    return json.loads(BLOCKS[name])


def sha(a: np.ndarray, dtype: str = "<f4") -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=dtype).tobytes()).hexdigest()


def bitstring(bits) -> str:
    return "".join(str(int(b)) for b in bits)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    path.chmod(0o600)
    return path


# The example tensors, transcribed from the formulas in the text of docs/spec.md §7.
def whitebox_carrier() -> np.ndarray:
    o, c, i, j = np.indices((4, 3, 3, 3))
    return (((29 * o + 13 * c + 7 * i + 3 * j) % 17 - 8) / 8).astype(np.float32)


def dense_matrix() -> np.ndarray:
    t, i = np.indices((24, 12))
    return (((13 * t + 7 * i + t * i * i) % 29 - 14) / 8).astype(np.float32)


def dense_carrier() -> np.ndarray:
    o, c, i, j = np.indices((2, 3, 2, 2))
    return (((7 * o + 5 * c + 3 * i + j) % 13 - 6) / 4).astype(np.float32)


def samples(shape) -> np.ndarray:
    k = np.arange(int(np.prod(shape)))
    return ((37 * k % 101) / 100.0).reshape(shape).astype(np.float32)


# =============================================================== (a) known answers
def test_the_document_has_every_vector_block():
    assert set(BLOCKS) == KAT_NAMES
    text = SPEC.read_text(encoding="utf-8")
    assert text.count("<!-- kat:") == len(KAT_NAMES)  # no marker the pattern missed


def test_the_vectors_are_the_package_output():
    """What tests/make_spec_vectors.py --write would put in the document is already there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = gen.vectors()
    assert set(v) == KAT_NAMES
    for name, value in v.items():
        assert gen.render(value) == BLOCKS[name], f"vector {name!r} in docs/spec.md is stale"


def test_philox():
    vectors = kat("philox")
    assert [(tuple(int(x, 16) for x in e["counter"]), tuple(int(x, 16) for x in e["key"]),
             tuple(int(x, 16) for x in e["output"])) for e in vectors] == _spec.KNOWN_ANSWERS  # DESIGN.md §4
    text = SPEC.read_text(encoding="utf-8")
    for e in vectors:
        counter, key, out = (tuple(int(x, 16) for x in e[k]) for k in ("counter", "key", "output"))
        assert _spec.philox_scalar(counter, key) == out
        assert tuple(nnmark.philox4x32_10(counter, key)) == out
        assert " ".join(e["output"]) in text  # the prose list of §4.4 says the same


def test_subkey():
    v = kat("subkey")
    secret = bytes.fromhex(v["secret"])
    assert secret == SECRET
    d = hashlib.sha256(secret + b"nnmark:projection:v1:" + v["carrier"].encode()).hexdigest()
    assert d == v["sha256"]
    want = (int(v["k0"], 16), int(v["k1"], 16))
    assert want == (int.from_bytes(bytes.fromhex(d)[0:4], "little"), int.from_bytes(bytes.fromhex(d)[4:8], "little"))
    assert _spec.subkey(secret, v["carrier"]) == want
    assert nnmark.WhiteBoxKey(secret, v["carrier"], [0, 1] * 16).subkey() == want


def test_projection_matrix():
    v = kat("projection")
    sk = (int(v["k0"], 16), int(v["k1"], 16))
    assert sk == _spec.subkey(SECRET, kat("subkey")["carrier"])
    for ib, words in v["philox_words"].items():
        i, b = (int(s) for s in ib.split(","))
        counter = (i & 0xFFFFFFFF, i >> 32, b, 0)
        want = tuple(int(w, 16) for w in words)
        assert _spec.philox_scalar(counter, sk) == want
        assert tuple(nnmark.philox4x32_10(counter, sk)) == want
    for i, bits in v["column_bits_t0_to_255"].items():
        col = _spec.projection_block(sk, 256, int(i), 1)[:, 0]
        assert bitstring(col > 0) == bits
    rows = v["X_rows_0_to_7_cols_0_to_15"]
    X = _spec.projection_matrix(sk, 8, 16)
    assert ["".join("+" if x > 0 else "-" for x in row) for row in X] == rows
    # the native op: projecting the unit vectors gives the columns of X
    native = nnmark.keyed_projection(torch.eye(16, dtype=torch.float64), sk, 8).numpy().T
    assert np.array_equal(native, X)
    # and the first 256 rows of columns 0-2 through the native op
    native = nnmark.keyed_projection(torch.eye(3, dtype=torch.float64), sk, 256).numpy()
    for i in range(3):
        assert bitstring(native[i] > 0) == v["column_bits_t0_to_255"][str(i)]


def test_key_ids():
    v = kat("key_id")
    secret = bytes.fromhex(v["secret"])
    assert v["whitebox"] == _spec.whitebox_key_id(secret) == nnmark.WhiteBoxKey(secret, "w", [0, 1] * 16).key_id
    assert v["trigger"] == _spec.trigger_key_id(secret) == nnmark.TriggerKey(secret, n=1).key_id
    m = dense_matrix()
    assert sha(m) == v["dense_matrix_sha256"]
    assert v["dense"] == _spec.dense_key_id(m) == nnmark.DenseKey(m, "conv.weight", [1, 0, 0] * 8).key_id


def test_message_bits():
    v = kat("message_bits")
    digest = hashlib.shake_256(b"nnmark:message:v1:" + v["message"].encode()).hexdigest(8)
    assert digest == v["shake256_8_bytes"]
    assert bitstring(_spec.message_bits(v["message"], v["n"])) == v["bits"]
    assert bitstring(nnmark.message_bits(v["message"], v["n"])) == v["bits"]
    assert v["bits"] == bin(int(digest, 16))[2:].zfill(64)  # most significant bit first


def _check_key_file_text(tmp_path, name: str):
    """The block is a key file as nnmark writes it: both readers accept it, nnmark re-saves
    it byte for byte, and the canonical JSON is the minified text without the checksum."""
    text = BLOCKS[name] + "\n"
    body = json.loads(text)
    assert body["format"] == "nnmark-key" and body["version"] == 1 and body["warning"] == _spec.WARNING
    assert body["checksum"] == _spec.checksum(body)
    assert _spec.minified_without_checksum(text) == _spec.canonical_json(body)
    spec_key = _spec.parse_key_file(text.encode("utf-8"))
    key = nnmark.load_key(write(tmp_path, name + ".key", text))
    assert gen.saved_text(key) == text
    assert text == json.dumps(body, indent=1, sort_keys=True) + "\n"
    return spec_key, key


def test_whitebox_key_file_and_extraction(tmp_path):
    spec_key, key = _check_key_file_text(tmp_path, "whitebox-key-file")
    assert spec_key["kind"] == "whitebox" and isinstance(key, nnmark.WhiteBoxKey)
    msg = kat("message_bits")
    assert bitstring(spec_key["bits"]) == msg["bits"][:32] == bitstring(key.bits)
    v = kat("whitebox-extract")
    w = whitebox_carrier()
    assert list(w.shape) == v["carrier_shape"] and sha(w) == v["carrier_sha256"]
    assert _spec.reduce(w, "filter_mean")[:8].tolist() == v["reduced_first_8"]
    p = _spec.projections(spec_key, w)
    assert (p * 32).tolist() == v["projections_times_32"]  # exact
    assert bitstring(_spec.extract_bits(spec_key, w)) == v["extracted_bits"]
    wt = torch.from_numpy(w)
    assert np.array_equal(key.project(wt).numpy() * 32, np.array(v["projections_times_32"], dtype=np.float32))
    assert bitstring(nnmark.extract(key, {key.carrier: wt})) == v["extracted_bits"]
    matches = int((_spec.extract_bits(spec_key, w) == spec_key["bits"]).sum())
    assert matches == v["matches"]
    exact = _spec.binomial_sf(matches, 32, Fraction(1, 2))
    assert v["p_value"] == pytest.approx(float(exact), rel=1e-12)
    assert _spec.binomial_threshold(32, 1e-6, Fraction(1, 2)) == v["threshold_at_1e-6"]
    verdict = nnmark.verify(key, {key.carrier: wt}, alpha=1e-6)
    assert (verdict.matches, verdict.p_value, verdict.threshold) == (v["matches"], v["p_value"],
                                                                   v["threshold_at_1e-6"])
    assert f"{v['matches']} of the 32 bits match, p-value {v['p_value']:.2f}" in SPEC.read_text(encoding="utf-8")
    assert _spec.penalty(spec_key, w, 0.01) == pytest.approx(v["penalty_strength_0.01"], rel=1e-6)
    holder = gen._Holder(key.carrier, wt)
    assert float(nnmark.Uchida(key, 0.01).penalty(holder)) == v["penalty_strength_0.01"]


def test_dense_key_file_and_extraction(tmp_path):
    spec_key, key = _check_key_file_text(tmp_path, "dense-key-file")
    assert spec_key["kind"] == "whitebox-dense" and isinstance(key, nnmark.DenseKey)
    assert np.array_equal(spec_key["matrix"], dense_matrix()) and spec_key["order"] == "keras"
    v = kat("dense-extract")
    w = dense_carrier()
    assert list(w.shape) == v["carrier_shape"] and sha(w) == v["carrier_sha256"]
    assert _spec.reduce(w, "filter_mean", "torch").tolist() == v["reduced_torch_order"]
    assert _spec.reduce(w, "filter_mean", "keras").tolist() == v["reduced_keras_order"]
    wt = torch.from_numpy(w)
    assert key.reduce(wt.double()).tolist() == v["reduced_keras_order"]
    assert _spec.projections(spec_key, w).tolist() == v["projections"]
    assert key.project(wt).double().tolist() == v["projections"]
    assert bitstring(_spec.extract_bits(spec_key, w)) == v["extracted_bits"]
    assert bitstring(nnmark.extract(key, {key.carrier: wt})) == v["extracted_bits"]


def test_trigger_streams():
    v = kat("trigger-streams")
    s = bytes.fromhex(v["secret"])
    assert _spec.stream(s, "labels", 16).hex() == v["labels_first_16_bytes"] == _triggers._stream(s, "labels", 16).hex()
    words = [str(w) for w in _spec.words(s, "labels", 2)]
    assert words == v["labels_first_2_uint64"] == [str(int(w)) for w in _triggers._uint64(s, "labels", 2)]
    assert [x.hex() for x in _spec.uniforms(s, "abstract", 2)] == v["abstract_first_2_uniforms"]
    assert [float(x).hex() for x in _triggers._uniform(s, "abstract", 2)] == v["abstract_first_2_uniforms"]
    assert [float(x).hex() for x in _spec.gaussians(s, "noise", 3)] == v["noise_first_3_gaussians"]
    assert [float(x).hex() for x in _triggers._gaussian(s, "noise", 3)] == v["noise_first_3_gaussians"]
    key = nnmark.TriggerKey(s, n=100)
    for e in (0, 1):
        want = v[f"order:{e}_first_10_of_100"]
        assert _spec.permutation(s, f"order:{e}", 100)[:10] == want == key.order(e)[:10].tolist()
    assert _spec.permutation(s, "select", 40)[:5] == v["select_first_5_of_40"]
    assert _triggers._permutation(s, "select", 40)[:5].tolist() == v["select_first_5_of_40"]


def test_portable_math():
    v = kat("portable-math")
    x = np.array([float.fromhex(h) for h in v["x"]])
    for name, spec_fn, pkg_fn, arg in [("sin", _spec.p_sin, _triggers._sin, x), ("cos", _spec.p_cos, _triggers._cos, x),
                                       ("exp", _spec.p_exp, _triggers._exp, x),
                                       ("log", _spec.p_log, _triggers._log, np.abs(x))]:
        assert [float(y).hex() for y in spec_fn(arg)] == v[name], name
        assert [float(y).hex() for y in pkg_fn(arg)] == v[name], name
        ref = {"sin": np.sin, "cos": np.cos, "exp": np.exp, "log": np.log}[name](arg)
        np.testing.assert_allclose(spec_fn(arg), ref, rtol=1e-13, atol=1e-15)  # and they are sin, cos, ...
    assert _spec.p_log(np.array([1.0]))[0] == 2.0 ** -53  # the documented quirk of §5.2


def test_constants_in_the_text():
    """The float64 constants of §5.2, as the document prints them, are the ones in use."""
    text = SPEC.read_text(encoding="utf-8")
    for name, value in [("TWO_PI", _triggers._TWO_PI), ("LN2", _triggers._LN2),
                        ("INV_TWO_PI", 1.0 / _triggers._TWO_PI), ("INV_LN2", 1.0 / _triggers._LN2),
                        ("HALF_PI", 0.25 * _triggers._TWO_PI)]:
        line = re.search(rf"^{name} +=[^#\n]*# (?:exact: )?(\S+)$", text, re.M)
        assert line is not None, name
        assert float.fromhex(line[1]) == value == getattr(_spec, name), name
    assert f"TWO_PI = {_triggers._TWO_PI!r} " in text and f"LN2    = {_triggers._LN2!r} " in text


def _spec_trigger_key(params: dict) -> dict:
    p = dict(params)
    shape = p.pop("samples_shape", None)
    input_shape = tuple(p["input_shape"]) if "input_shape" in p else tuple(shape[1:])
    c = _spec.chw(input_shape)[0]
    return {"kind": "trigger", "secret": SECRET, "trigger_kind": p["kind"], "n": p["n"],
            "num_classes": p["num_classes"], "input_shape": input_shape, "value_range": tuple(p["value_range"]),
            "mean": _spec._channels(p.get("mean"), c), "std": _spec._channels(p.get("std"), c),
            "noise_std": p.get("noise_std", 0.25), "target": p.get("target"),
            "samples": samples(shape) if shape is not None else None}


def _check_trigger_entry(entry: dict, spec_key: dict, key: nnmark.TriggerKey) -> None:
    if spec_key["samples"] is not None:
        assert sha(spec_key["samples"]) == entry["samples_sha256"]
    s = _spec.trigger_set(spec_key)
    x, y = key.triggers()
    raw, _ = key.triggers(normalized=False)
    raw64, _ = key.triggers(normalized=False, dtype=torch.float64)
    assert s["labels"].tolist() == entry["labels"] == y.tolist()
    assert sha(s["raw32"]) == entry["sha256_raw_f32"] == sha(raw.numpy())
    assert sha(s["raw"], "<f8") == entry["sha256_raw_f64"] == sha(raw64.numpy(), "<f8")
    assert sha(s["x"]) == entry["sha256_f32"] == sha(x.numpy())
    assert s["raw"].reshape(-1)[:4].tolist() == entry["first_4_raw"]
    assert _spec.trigger_key_id(SECRET) == entry["key_id"] == key.key_id
    if "patch" in entry:
        r0, c0, ph, pw, bits = _spec.content_patch(spec_key)
        p = entry["patch"]
        assert (r0, c0, ph, pw, bitstring(bits.reshape(-1))) == (p["row"], p["col"], p["height"], p["width"],
                                                                p["bits"])
        assert key._patch()[:4] == (r0, c0, ph, pw)


@pytest.mark.parametrize("name", ["abstract", "abstract-rgb", "content", "content-rgb", "noise", "unrelated"])
def test_trigger_sets(name):
    entries = kat("trigger-sets")
    assert set(entries) == {"abstract", "abstract-rgb", "content", "content-rgb", "noise", "unrelated"}
    entry = entries[name]
    params = dict(entry["params"])
    shape = params.pop("samples_shape", None)
    key = nnmark.TriggerKey(SECRET, samples=samples(shape) if shape is not None else None, **params)
    _check_trigger_entry(entry, _spec_trigger_key(entry["params"]), key)


def test_trigger_key_file(tmp_path):
    spec_key, key = _check_key_file_text(tmp_path, "trigger-key-file")
    assert spec_key["trigger_kind"] == "abstract" and isinstance(key, nnmark.TriggerKey)
    _check_trigger_entry(kat("trigger-sets")["abstract"], spec_key, key)


def test_binomial():
    v = kat("binomial")
    text = SPEC.read_text(encoding="utf-8")
    cases = {(e["n"], e["p0"], e["alpha"]): e["threshold"] for e in v["thresholds"]}
    assert cases[(256, "1/2", 1e-6)] == 167 and cases[(100, "1/10", 1e-6)] == 28  # the reference cut-offs
    assert "need ≥ 167 matching bits" in text and "need ≥ 28 hits" in text
    for (n, p0, alpha), m in cases.items():
        assert _spec.binomial_threshold(n, alpha, Fraction(p0)) == m
        assert nnmark.binomial_threshold(n, alpha, float(Fraction(p0))) == m
    for e in v["p_values"]:
        n, p0, matches = e["n"], Fraction(e["p0"]), e["matches"]
        exact = float(_spec.binomial_sf(matches, n, p0))
        assert e["p_value"] == pytest.approx(exact, rel=1e-12)
        assert nnmark.binomial_p_value(matches, n, float(p0)) == pytest.approx(exact, rel=1e-12)
        if p0 != Fraction(1, 2):  # the native trigger verifier: `matches` hits out of n rows
            C = p0.denominator
            labels = torch.arange(n) % C
            logits = torch.zeros(n, C)
            logits[torch.arange(n), (labels + (torch.arange(n) >= matches).long()) % C] = 1.0
            res = nnmark.ops.trigger_verify(logits, labels)
            assert int(res["hits"]) == matches
            assert float(res["p_value"]) == pytest.approx(exact, rel=1e-9)


# ========================================================= (b) random keys, both readers
def _dyadic(rng, shape, denom=64):
    return (rng.integers(-denom, denom + 1, size=shape) / denom).astype(np.float32)


WHITEBOX_CASES = [  # carrier name, weight shape, reduction, T
    ("features.3.weight", (16, 8, 3, 3), "filter_mean", 300),
    ("fc.weight", (8, 40), "filter_mean", 64),
    ("block.0.conv1d.weight", (4, 6, 5), "filter_mean", 129),
    ("bias", (50,), "flat", 40),
    ("encoder.ü.weight", (2, 3, 4), "flat", 256),  # non-ASCII name: escaped in the file, UTF-8 in the subkey
]


@pytest.mark.parametrize("carrier,shape,reduction,T", WHITEBOX_CASES)
def test_random_whitebox_keys(tmp_path, rng, carrier, shape, reduction, T):
    key = nnmark.WhiteBoxKey.generate(carrier=carrier, bits=T, reduction=reduction,
                                      shape=shape if len(shape) > 1 else None)
    path = key.save(tmp_path / "k.key")
    text = path.read_text()
    spec_key = _spec.parse_key_file(path.read_bytes())
    assert spec_key["key_id"] == key.key_id and bitstring(spec_key["bits"]) == bitstring(key.bits)
    assert _spec.minified_without_checksum(text) == _spec.canonical_json(json.loads(text))
    assert text.isascii()
    # dyadic weights (power-of-two out channels): every sum is exact, the bits must be equal
    w = _dyadic(rng, shape)
    ws = [w, -w, _dyadic(rng, shape)]
    got = nnmark.extract(key, [{carrier: torch.from_numpy(x)} for x in ws]).numpy()
    for x, g in zip(ws, got):
        assert np.array_equal(_spec.extract_bits(spec_key, x), g)
    # ordinary float weights: equal wherever the float64 projection is clear of zero
    w = rng.standard_normal(shape).astype(np.float32)
    p = _spec.projections(spec_key, w)
    clear = np.abs(p) > 1e-4 * np.sqrt(np.sum(np.square(_spec.reduce(w, reduction))))
    assert clear.mean() > 0.95
    got = nnmark.extract(key, {carrier: torch.from_numpy(w)}).numpy()
    assert np.array_equal((p > 0)[clear], got.astype(bool)[clear])


@pytest.mark.parametrize("order,shape", [("keras", (4, 3, 2, 2)), ("torch", (4, 3, 2, 2)), ("keras", (8, 5, 3)),
                                         ("torch", (8, 10))])
def test_random_dense_keys(tmp_path, rng, order, shape):
    N = int(np.prod(shape[1:]))
    T = 32
    matrix = (rng.integers(-4, 5, size=(T, N)) / 4).astype(np.float32)
    key = nnmark.DenseKey(matrix, "layer.weight", rng.integers(0, 2, T), "filter_mean", order=order, shape=shape)
    path = key.save(tmp_path / "d.key")
    spec_key = _spec.parse_key_file(path.read_bytes())
    assert np.array_equal(spec_key["matrix"], matrix) and spec_key["order"] == order
    assert spec_key["key_id"] == key.key_id == _spec.dense_key_id(matrix)
    for _ in range(3):
        w = _dyadic(rng, shape)
        got = nnmark.extract(key, {"layer.weight": torch.from_numpy(w)}).numpy()
        assert np.array_equal(_spec.extract_bits(spec_key, w), got)
        np.testing.assert_array_equal(_spec.projections(spec_key, w),
                                      key.project(torch.from_numpy(w)).double().numpy())


TRIGGER_CASES = [  # kind, input_shape, n, m samples, value_range, mean, std
    ("abstract", (1, 8, 8), 40, None, (0.0, 1.0), None, None),
    ("abstract", (3, 6, 9), 12, None, (-1.0, 2.5), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]),
    ("abstract", (5, 7), 9, None, (0.0, 255.0), 120.0, None),
    ("abstract", (17,), 7, None, (-3.0, 3.0), None, 2.0),
    ("content", (3, 10, 6), 10, 14, (0.0, 1.0), [0.5, 0.4, 0.3], [0.2, 0.2, 0.3]),
    ("content", (1, 9, 14), 8, 8, (-1.0, 1.0), None, None),
    ("content", (12,), 5, 9, (0.0, 1.0), 0.5, 0.25),
    ("noise", (1, 8, 8), 20, 30, (0.0, 1.0), 0.1307, 0.3081),
    ("noise", (2, 5, 5), 6, 6, (-1.0, 1.0), None, [0.5, 2.0]),
    ("unrelated", (3, 4, 4), 9, 15, (0.0, 1.0), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ("unrelated", (6, 6), 4, 4, (0.0, 255.0), None, None),
]


@pytest.mark.parametrize("kind,input_shape,n,m,value_range,mean,std", TRIGGER_CASES)
def test_random_trigger_keys(tmp_path, rng, kind, input_shape, n, m, value_range, mean, std):
    lo, hi = value_range
    kw = dict(kind=kind, n=n, num_classes=int(rng.integers(2, 12)), input_shape=input_shape,
              value_range=value_range, mean=mean, std=std, noise_std=float(rng.uniform(0.05, 0.5)))
    if kind != "abstract":
        # raw-range samples (a few outside the range: clipped) with labels; those of the
        # target class are left out, at least n others are kept
        s = (lo + (hi - lo) * rng.uniform(-0.005, 1.005, size=(m, *input_shape))).astype(np.float32)
        target = int(rng.integers(0, kw["num_classes"]))
        labels = rng.integers(0, kw["num_classes"], size=m)
        labels[:n] = (target + 1 + rng.integers(0, kw["num_classes"] - 1, size=n)) % kw["num_classes"]
        kw.update(samples=s, sample_labels=labels, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # samples outside value_range
        key = nnmark.TriggerKey.generate(**kw)
    path = key.save(tmp_path / "t.key")
    spec_key = _spec.parse_key_file(path.read_bytes())
    assert spec_key["key_id"] == key.key_id and spec_key["n"] == key.n == n
    if kind != "abstract":  # the stored samples are the keyed selection of §5.9
        secret = spec_key["secret"]
        kept = kw["samples"][kw["sample_labels"] != kw["target"]]
        idx = sorted(_spec.permutation(secret, "select", len(kept))[:n]) if n < len(kept) else list(range(n))
        assert np.array_equal(spec_key["samples"], kept[idx])
    s = _spec.trigger_set(spec_key)
    x, y = key.triggers()
    raw, _ = key.triggers(normalized=False)
    raw64, _ = key.triggers(normalized=False, dtype=torch.float64)
    x64, _ = key.triggers(dtype=torch.float64)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and tuple(x.shape) == (n, *input_shape)
    assert np.array_equal(s["labels"], y.numpy())
    assert s["x"].tobytes() == x.numpy().astype("<f4").tobytes()
    assert s["raw32"].tobytes() == raw.numpy().astype("<f4").tobytes()
    assert s["raw"].tobytes() == raw64.numpy().astype("<f8").tobytes()
    assert _spec.normalise(spec_key, s["raw"]).tobytes() == x64.numpy().astype("<f8").tobytes()
    assert np.isfinite(s["raw"]).all() and s["raw"].min() >= lo and s["raw"].max() <= hi
    for epoch in (0, 1, 7):
        assert _spec.trigger_order(spec_key, epoch) == key.order(epoch).tolist()


def test_spec_reader_rejects_what_nnmark_rejects(tmp_path, rng):
    key = nnmark.WhiteBoxKey.generate(carrier="fc.weight", bits=64)
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())

    def both_reject(b: dict, match: str) -> None:
        p = write(tmp_path, "bad.key", json.dumps(b, indent=1, sort_keys=True) + "\n")
        with pytest.raises(_spec.SpecKeyError, match=match):
            _spec.parse_key_file(p.read_bytes())
        with pytest.raises(nnmark.KeyFileError):
            nnmark.load_key(p)

    edited = dict(body, bits=("1" if body["bits"][0] == "0" else "0") + body["bits"][1:])
    both_reject(edited, "checksum")  # an edit without a new checksum
    resigned = dict(edited, checksum=_spec.checksum(edited))  # re-signed: the checksum cannot tell
    assert bitstring(_spec.parse_key_file(json.dumps(resigned).encode())["bits"]) == resigned["bits"]
    other = dict(body, secret=bytes(b ^ 0xFF for b in bytes.fromhex(body["secret"])).hex())
    both_reject(dict(other, checksum=_spec.checksum(other)), "key_id")
    both_reject(dict(body, version=2, checksum=_spec.checksum(dict(body, version=2))), "version")
    both_reject(dict(body, kind="x", checksum=_spec.checksum(dict(body, kind="x"))), "kind")
    tkey = nnmark.TriggerKey.generate(kind="noise", samples=rng.random((4, 1, 3, 3)), target=1)
    tbody = json.loads(tkey.save(tmp_path / "t.key").read_text())
    short = dict(tbody, samples=base64.b64encode(base64.b64decode(tbody["samples"])[:-4]).decode())
    both_reject(dict(short, checksum=_spec.checksum(short)), "length")
