"""docs/spec.md against the package and against the independent implementation in _spec.

(a) Every known-answer block of docs/spec.md (``<!-- kat:NAME -->`` + a ```json block)
    is read from the document itself and checked against nnmark and against _spec,
    so the document, the package and the independent implementation cannot drift apart.
(b) Keys of every kind made with random secrets and saved by nnmark are read by _spec
    from the key file alone, and _spec reproduces nnmark's extracted bits and trigger
    sets exactly (the trigger inputs bitwise, as float32 and float64), and for trigger
    keys with per-sample labels and controls of every kind their control sets, labels,
    training sets and orders.
(c) Verdicts of ``nnmark.verify`` on small models are reproduced by _spec from the
    models' logits (null, McNemar and Fisher p-values, calibrated or not).
(d) Ownership claims (§7.15, §8): commitments recomputed from the key files of the
    document alone, the checkpoint rebuilt and stamped, the certificate checked by
    nnmark and by the standalone docs/check_claim.py.
(e) DeepSigns keys (§9): the known answers of §9.7 (key file, subkey, activations, class
    means, projections, bits, penalty), and random keys saved by nnmark whose bits _spec
    reproduces from the marked layer's activations.

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
             "trigger-key-file", "binomial", "trigger-controls", "held-back-keys", "per-sample-key-file",
             "control-tests", "beta-binomial", "calibration-file", "commitment", "commitment-file", "claim-checkpoint",
             "certificate-file", "frontier-keys", "frontier-key-file", "deepsigns-key-file", "deepsigns-extract"}
# The fitted a, b of the beta-binomial block are an optimiser's result (docs/spec.md §6.5):
# compared within the block's rel_tolerance, not as text.
FITTED = {"a", "b"}


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
        if name == "beta-binomial":
            doc = kat(name)
            assert {k: x for k, x in value.items() if k not in FITTED} == {k: x for k, x in doc.items()
                                                                          if k not in FITTED}
            for k in FITTED:
                assert value[k] == pytest.approx(doc[k], rel=doc["rel_tolerance"]), k
            continue
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
    _check_against_spec(key, spec_key)  # controls (stand-ins, unmarked, decoy, held back), training set


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


# ======================================== controls, held-back samples, per-sample labels
def _spec_key(secret: bytes, kind: str, n: int, num_classes: int, input_shape, value_range=(0.0, 1.0), mean=None,
              std=None, noise_std=0.25, samples=None, labels=None, controls=None, control_labels=None,
              controls_from=None) -> dict:
    """A _spec trigger key from its parts (what parse_key_file returns for its file)."""
    input_shape = tuple(input_shape)
    c = _spec.chw(input_shape)[0]
    key = {"kind": "trigger", "secret": secret, "trigger_kind": kind, "n": n, "num_classes": num_classes,
           "input_shape": input_shape, "value_range": tuple(value_range), "mean": _spec._channels(mean, c),
           "std": _spec._channels(std, c), "noise_std": noise_std, "target": None, "samples": samples,
           "controls": controls, "control_labels": control_labels, "controls_from": controls_from}
    if labels is not None:
        key["labels"] = np.asarray(labels, dtype=np.int64)
    return key


def _as_list(v):
    return [v] if isinstance(v, (int, float)) else v


def _example_spec_key(params: dict, secret: bytes = SECRET) -> dict:
    """The _spec key of a §7.9 / §7.11 example (constructor arguments, samples from the formula)."""
    shape = params.get("samples_shape")
    n = params["n"]
    t = params.get("target")
    labels = None if t is None else (t if isinstance(t, list) else [t] * n)
    return _spec_key(secret, params["kind"], n, params["num_classes"],
                     params["input_shape"] if shape is None else shape[1:], params["value_range"],
                     _as_list(params.get("mean")), _as_list(params.get("std")), params.get("noise_std", 0.25),
                     samples(shape) if shape is not None else None, labels)


def _example_key(params: dict, secret: bytes = SECRET) -> nnmark.TriggerKey:
    p = dict(params)
    shape = p.pop("samples_shape", None)
    return nnmark.TriggerKey(secret, samples=samples(shape) if shape is not None else None, **p)


def _patch(entry: dict) -> tuple:
    return entry["row"], entry["col"], entry["height"], entry["width"], entry["bits"]


def _spec_patch(patch) -> tuple:
    r, c, ph, pw, bits = patch
    return int(r), int(c), int(ph), int(pw), bitstring(np.asarray(bits).reshape(-1))


CONTROL_NAMES = ["content", "content-rgb", "noise", "unrelated", "content-narrow", "content-1d",
                 "content-single-place", "content-uniform-decoy"]


@pytest.mark.parametrize("name", CONTROL_NAMES)
def test_trigger_controls(name):
    entries = kat("trigger-controls")
    assert list(entries) == CONTROL_NAMES
    entry = entries[name]
    params = entry.get("params") or kat("trigger-sets")[name]["params"]
    secret = SECRET
    if "secret" in entry:  # the smallest i whose secret gives a uniform decoy (§7.11)
        i = entry["secret_index"]
        seeds = [hashlib.sha256(b"nnmark:spec:decoy:" + str(j).encode()).digest() for j in range(i + 1)]
        assert seeds[-1].hex() == entry["secret"]
        for j, s in enumerate(seeds):
            bits = _spec.decoy_patch(_example_spec_key(params, s))[0][4]
            assert (bits.all() or not bits.any()) == (j == i), j
        secret = seeds[-1]
    spec_key = _example_spec_key(params, secret)
    key = _example_key(params, secret)
    c = _spec.control_set(spec_key)
    xc, yc = key.controls()
    raw, _ = key.controls(normalized=False)
    raw64, _ = key.controls(normalized=False, dtype=torch.float64)
    assert entry["count"] == len(c["labels"]) == key.num_controls
    assert entry["paired"] == (c["groups"] > 0) == key.controls_paired
    assert c["labels"].tolist() == entry["labels"] == yc.tolist()
    assert sha(c["raw32"]) == entry["sha256_raw_f32"] == sha(raw.numpy())
    assert sha(c["raw"], "<f8") == entry["sha256_raw_f64"] == sha(raw64.numpy(), "<f8")
    assert sha(c["x"]) == entry["sha256_f32"] == sha(xc.numpy())
    if params["kind"] == "content":
        assert _spec_patch(_spec.content_patch(spec_key)) == _patch(entry["patch"]) == _spec_patch(key._patch())
        decoy, places = _spec.decoy_patch(spec_key)
        assert _spec_patch(decoy) == _patch(entry["decoy"]) == _spec_patch(key._decoy_patch())
        C, H, W = _spec.chw(spec_key["input_shape"])
        r0, c0, ph, pw, _ = _spec.content_patch(spec_key)
        apart = [(r, q) for r in range(H - ph + 1) for q in range(W - pw + 1)
                 if not (r0 - ph < r < r0 + ph and c0 - pw < q < c0 + pw)]
        assert len(apart) == entry["decoy"]["places_apart"]
        assert places == (len(apart) if apart else max(1, (H - ph + 1) * (W - pw + 1) - 1))
        r1, c1 = entry["decoy"]["row"], entry["decoy"]["col"]
        assert (r1, c1) in apart if apart else (r1, c1) != (r0, c0) or places == 1
        assert c["groups"] == 2
        x0 = _spec.trigger_raw(dict(spec_key, trigger_kind="unrelated"))  # the samples, clipped
        assert np.array_equal(c["raw"][:params["n"]], x0)
    elif params["kind"] == "noise":
        assert c["groups"] == 1
    else:  # the stand-ins of an unrelated key without stored controls: keyed abstract images
        assert c["groups"] == 0 and spec_key["controls"] is None


def _held_back_spec_key(params: dict) -> tuple[dict, dict]:
    """The key of a §7.12 example as _spec makes it from the generate arguments (§5.9)."""
    shape = params["samples_shape"]
    S = samples(shape)
    t = params["target"]
    per_sample = isinstance(t, list)
    kept, trig, held = _spec.select(SECRET, params["kind"], shape[0], params.get("n"), None if per_sample else t,
                                    params.get("sample_labels"), params.get("controls"))
    lab = np.array([t[i] for i in kept] if per_sample else [t] * len(kept))
    Sk = S[kept]
    key = _spec_key(SECRET, params["kind"], len(trig), params["num_classes"], shape[1:], params["value_range"],
                    _as_list(params.get("mean")), _as_list(params.get("std")), samples=Sk[trig],
                    labels=lab[trig], controls=Sk[held] if held else None,
                    control_labels=lab[held] if held else None, controls_from="held-back" if held else None)
    return key, {"m": len(kept), "triggers": trig, "held": held}


@pytest.mark.parametrize("name", ["target", "per-sample"])
def test_held_back_keys(name):
    entry = kat("held-back-keys")[name]
    params = entry["params"]
    spec_key, sel = _held_back_spec_key(params)
    assert _spec.permutation(SECRET, "select", sel["m"]) == entry["select_permutation"]
    assert (spec_key["n"], len(spec_key["controls"]), spec_key["controls_from"]) == (
        entry["n"], entry["num_controls"], entry["controls_from"])
    t, c = _spec.trigger_set(spec_key), _spec.control_set(spec_key)
    xt, yt = _spec.training_set(spec_key)
    assert t["labels"].tolist() == entry["labels"]
    assert c["labels"].tolist() == entry["control_labels"]
    assert yt.tolist() == entry["training_labels"]
    assert all(a != b for a, b in zip(yt[spec_key["n"]:], c["labels"]))  # never the control's own label
    for e in (0, 1):
        assert _spec.training_order(spec_key, e) == entry[f"training_order:{e}"]
    assert (sha(t["x"]), sha(c["x"]), sha(xt)) == (entry["sha256_f32"], entry["controls_sha256_f32"],
                                                   entry["training_sha256_f32"])
    # the package, made by generate with the common secret
    key = gen.generated_key(params)
    assert key.key_id == entry["key_id"] == _spec.trigger_key_id(SECRET)
    x, y = key.triggers()
    xc, yc = key.controls()
    xk, yk = key.training_set()
    assert (key.n, key.num_controls, key.controls_from) == (entry["n"], entry["num_controls"], entry["controls_from"])
    assert y.tolist() == entry["labels"] and yc.tolist() == entry["control_labels"]
    assert yk.tolist() == entry["training_labels"]
    assert (sha(x.numpy()), sha(xc.numpy()), sha(xk.numpy())) == (entry["sha256_f32"], entry["controls_sha256_f32"],
                                                                  entry["training_sha256_f32"])
    for e in (0, 1):
        assert key.training_order(e).tolist() == entry[f"training_order:{e}"]


def test_per_sample_key_file(tmp_path):
    spec_key, key = _check_key_file_text(tmp_path, "per-sample-key-file")
    body = json.loads(BLOCKS["per-sample-key-file"])
    assert isinstance(body["target"], list) and isinstance(body["control_target"], list)
    entry = kat("held-back-keys")["per-sample"]
    want, _ = _held_back_spec_key(entry["params"])
    assert np.array_equal(spec_key["samples"], want["samples"]) and np.array_equal(spec_key["controls"],
                                                                                   want["controls"])
    assert spec_key["labels"].tolist() == entry["labels"] == body["target"] == key.labels.tolist()
    assert spec_key["control_labels"].tolist() == entry["control_labels"] == body["control_target"]
    xt, yt = _spec.training_set(spec_key)
    assert yt.tolist() == entry["training_labels"] and sha(xt) == entry["training_sha256_f32"]
    assert _spec.training_order(spec_key, 1) == entry["training_order:1"] == key.training_order(1).tolist()


# ------------------------------------------------------------------ verdicts (§6, §7.13)
def logit_row(code: str, y: int, C: int) -> list[float]:
    """The row codes of docs/spec.md §7.13, transcribed from the text."""
    z = [0.0] * C
    if code == "hit":
        z[y] = 1.0
    elif code == "miss":
        z[(y + 1) % C] = 1.0
    elif code == "tie-hit":
        z[y] = z[C - 1] = 1.0
    elif code == "tie-miss":
        z[0] = z[y] = 1.0
    else:
        assert code == "nan"
        z[y], z[(y + 1) % C] = 1.0, float("nan")
    return z


class Fixed(torch.nn.Module):
    def __init__(self, z: np.ndarray):
        super().__init__()
        self.register_buffer("z", torch.as_tensor(z, dtype=torch.float32))

    def forward(self, x):
        assert x.shape[0] == self.z.shape[0]
        return self.z.clone()


def _coded_logits(labels, codes, C) -> np.ndarray:
    return np.array([logit_row(c, int(y), C) for c, y in zip(codes, labels)], dtype=np.float32)


def test_control_test_vectors(tmp_path):
    v = kat("control-tests")
    for e in v["mcnemar"]:
        b, c = e["b"], e["c"]
        assert float(_spec.mcnemar_p(b, c)) == pytest.approx(e["p_value"], rel=1e-12)
        n = b + c + 2
        key = nnmark.TriggerKey(SECRET, "noise", samples=samples([n, 1, 2, 2]), target=1, num_classes=4)
        spec_key = _spec_key(SECRET, "noise", n, 4, (1, 2, 2), samples=samples([n, 1, 2, 2]), labels=[1] * n)
        codes = ["hit"] * b + ["miss"] * c + ["hit", "miss"] + ["miss"] * b + ["hit"] * c + ["hit", "miss"]
        z = _coded_logits([1] * 2 * n, codes, 4)
        assert _spec.control_test(spec_key, z) == (c + 1, _spec.mcnemar_p(b, c))
        assert nnmark.verify(key, Fixed(z), alpha=1e-3).control_p_value == pytest.approx(e["p_value"], rel=1e-12)
    for e in v["fisher"]:
        n, k, t, c = e["n"], e["k"], e["t"], e["c"]
        assert float(_spec.fisher_p(t, c, n, k)) == pytest.approx(e["p_value"], rel=1e-12)
        ctrl = samples([k, 1, 2, 2])[::-1].copy()
        key = nnmark.TriggerKey(SECRET, "unrelated", samples=samples([n, 1, 2, 2]), target=1, num_classes=4,
                                controls=ctrl, controls_from="given")
        spec_key = _spec_key(SECRET, "unrelated", n, 4, (1, 2, 2), samples=samples([n, 1, 2, 2]), labels=[1] * n,
                             controls=ctrl, control_labels=[1] * k, controls_from="given")
        codes = ["hit"] * t + ["miss"] * (n - t) + ["hit"] * c + ["miss"] * (k - c)
        z = _coded_logits([1] * (n + k), codes, 4)
        assert _spec.control_test(spec_key, z) == (c, _spec.fisher_p(t, c, n, k))
        assert nnmark.verify(key, Fixed(z), alpha=1e-3).control_p_value == pytest.approx(e["p_value"], rel=1e-12)
    # whole verdicts of the content example, without and with the calibration of §7.14
    params = kat("trigger-sets")["content"]["params"]
    spec_key, key = _example_spec_key(params), _example_key(params)
    cal_body = json.loads(BLOCKS["calibration-file"])
    cal = nnmark.load_calibration(write(tmp_path, "c.json", BLOCKS["calibration-file"] + "\n"))
    assert cal_body["key_id"] == key.key_id and cal_body["n"] == key.n
    ab = (cal_body["a"], cal_body["b"])
    alpha = v["verdict_alpha"]
    labels = [7] * 18
    for e in v["verdicts"]:
        z = _coded_logits(labels, e["triggers"] + e["unmarked"] + e["decoy"], 10)
        for calibration, prefix in ((None, ""), (ab, "calibrated_")):
            s = _spec.verdict(spec_key, z, alpha, calibration=calibration)
            assert s["matches"] == e["matches"] and s["control_matches"] == e["control_matches"]
            assert float(s["control_p_value"]) == pytest.approx(e["control_p_value"], rel=1e-12)
            assert float(s["null_p_value"]) == pytest.approx(e[prefix + "null_p_value"], rel=1e-9)
            assert float(s["p_value"]) == pytest.approx(e[prefix + "p_value"], rel=1e-9)
            assert s["verified"] == e[prefix + "verified"]
            got = nnmark.verify(key, Fixed(z), alpha=alpha, calibration=cal if calibration else None)
            assert (got.matches, got.control_matches, got.verified) == (e["matches"], e["control_matches"],
                                                                        e[prefix + "verified"])
            assert got.p_value == pytest.approx(e[prefix + "p_value"], rel=1e-12)
            assert got.threshold == e[prefix + "threshold"]
        assert _spec.binomial_threshold(6, alpha, Fraction(1, 10)) == e["threshold"]
        assert _spec.beta_binomial_threshold(6, alpha, *ab) == e["calibrated_threshold"]


def test_beta_binomial_fit_and_tails():
    from nnmark.calibration import fit_beta_binomial

    v = kat("beta-binomial")
    n, p0, counts, tol = v["n"], v["p0"], v["counts"], v["rel_tolerance"]
    assert v["pseudo_count"] == round(n * p0)
    a, b = _spec.fit_beta_binomial(counts, n, p0)  # another maximiser: agrees within the stated tolerance
    assert a == pytest.approx(v["a"], rel=tol) and b == pytest.approx(v["b"], rel=tol)
    pa, pb = fit_beta_binomial(counts, n, p0)
    assert pa == pytest.approx(v["a"], rel=tol) and pb == pytest.approx(v["b"], rel=tol)
    k = counts + [v["pseudo_count"]]
    best = _spec.beta_binomial_loglik(k, n, a, b)
    assert _spec.beta_binomial_loglik(k, n, pa, pb) == pytest.approx(best, abs=1e-8)
    for da, db in ((1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99)):  # a maximum
        assert _spec.beta_binomial_loglik(k, n, a * da, b * db) < best
    cal = nnmark.calibration.make_calibration("0" * 16, "x", n, counts, v["a"], v["b"], 1e-6, p0)
    for e in v["tails"]:
        exact = float(_spec.beta_binomial_sf(e["matches"], n, v["a"], v["b"]))
        assert e["p_value"] == pytest.approx(exact, rel=1e-9)
        assert cal.p_value(e["matches"]) == pytest.approx(exact, rel=1e-9)
    for e in v["thresholds"]:
        assert _spec.beta_binomial_threshold(n, e["alpha"], v["a"], v["b"]) == e["threshold"]
        assert cal.threshold_at(e["alpha"]) == e["threshold"]


def test_calibration_file(tmp_path):
    text = BLOCKS["calibration-file"] + "\n"
    body = json.loads(text)
    assert list(body) == ["format", "version", "key_id", "kind", "n", "n_models", "counts", "a", "b", "null_rate",
                          "dispersion", "alpha", "threshold", "null_rate_used", "nominal_threshold",
                          "false_positives", "false_positive_rate", "rates", "max_rate", "p_values", "created",
                          "nnmark_version", "support", "null"]  # the order of §6.6
    assert text == json.dumps(body, indent=1) + "\n"
    s = _spec.parse_calibration_file(text.encode())
    for name in ("threshold", "nominal_threshold", "false_positives", "support", "null_rate", "dispersion"):
        assert s[name] == body[name], name
    assert body["false_positive_rate"] == body["false_positives"] / body["n_models"]
    assert body["rates"] == [c / body["n"] for c in body["counts"]] and body["max_rate"] == max(body["rates"])
    assert body["null"] == f"beta-binomial(a={body['a']:.4g}, b={body['b']:.4g}; {body['n_models']} models)"
    for c, p in zip(body["counts"], body["p_values"]):  # the binomial p-values of the counts
        assert p == pytest.approx(float(_spec.binomial_sf(c, body["n"], Fraction(1, 10))), rel=1e-12)
    assert body["counts"] == gen.VERDICT_COUNTS
    from nnmark.calibration import fit_beta_binomial

    a, b = _spec.fit_beta_binomial(body["counts"], body["n"], body["null_rate_used"])
    assert a == pytest.approx(body["a"], rel=1e-4) and b == pytest.approx(body["b"], rel=1e-4)
    pa, pb = fit_beta_binomial(body["counts"], body["n"], body["null_rate_used"])
    assert (float(f"{pa:.6g}"), float(f"{pb:.6g}")) == (body["a"], body["b"])
    cal = nnmark.load_calibration(write(tmp_path, "c.json", text))
    assert cal.save(tmp_path / "again.json").read_text() == text
    # derived members are recomputed on reading; optional ones may be absent
    lean = {k: body[k] for k in ("format", "version", "key_id", "kind", "n", "n_models", "counts", "a", "b",
                                 "null_rate_used", "alpha")}
    lean["threshold"] = 0
    cal2 = nnmark.load_calibration(write(tmp_path, "lean.json", json.dumps(lean)))
    assert cal2.threshold == body["threshold"] and cal2.p_values == body["p_values"]
    assert _spec.parse_calibration_file(json.dumps(lean).encode())["threshold"] == body["threshold"]


# ======================== (b) random keys with labels and controls, from the file alone
CONTROL_CASES = {  # generate arguments besides samples [m, *input_shape]; "labels": per-sample target
    "content-per-sample": dict(kind="content", m=8, n=5, input_shape=(3, 7, 9), labels=True, mean=[0.4, 0.5, 0.6],
                               std=[0.2, 0.3, 0.25]),
    "content-tiny": dict(kind="content", m=3, input_shape=(1, 2, 3), value_range=(-1.0, 1.0)),
    "content-1d": dict(kind="content", m=9, n=4, input_shape=(5,), sample_labels=True, mean=0.5, std=0.2),
    "content-single-place": dict(kind="content", m=4, input_shape=(2, 2, 2), labels=True),
    "noise-per-sample": dict(kind="noise", m=7, n=4, input_shape=(1, 6, 6), labels=True, mean=0.1307, std=0.3081),
    "unrelated-half": dict(kind="unrelated", m=11, input_shape=(3, 4, 4), labels=True, mean=[0.485, 0.456, 0.406],
                           std=[0.229, 0.224, 0.225]),
    "unrelated-count": dict(kind="unrelated", m=10, n=4, controls=3, input_shape=(1, 5, 5), sample_labels=True),
    "unrelated-given": dict(kind="unrelated", m=9, n=5, controls="given", input_shape=(6, 6), value_range=(0.0, 255.0)),
    "unrelated-none": dict(kind="unrelated", m=6, controls=0, input_shape=(2, 3, 5), labels=True, std=[0.5, 2.0]),
    "unrelated-all": dict(kind="unrelated", m=5, n=5, input_shape=(1, 4, 4)),
}


def _generate(rng, case: dict):
    """A key made by TriggerKey.generate, and the arguments it was made from."""
    case = dict(case)
    kind, m, shape = case.pop("kind"), case.pop("m"), case.pop("input_shape")
    lo, hi = case.pop("value_range", (0.0, 1.0))
    C = int(rng.integers(2, 9))
    S = (lo + (hi - lo) * rng.uniform(-0.005, 1.005, size=(m, *shape))).astype(np.float32)
    kw = dict(kind=kind, num_classes=C, samples=S, value_range=(lo, hi), mean=case.pop("mean", None),
              std=case.pop("std", None), noise_std=float(rng.uniform(0.05, 0.5)))
    if "n" in case:
        kw["n"] = case.pop("n")
    target = int(rng.integers(0, C))
    if case.pop("labels", False):
        target = rng.integers(0, C, size=m).tolist()
    kw["target"] = target
    if case.pop("sample_labels", False):
        sl = rng.integers(0, C, size=m)
        sl[: m - 2] = (target + 1 + rng.integers(0, C - 1, size=m - 2)) % C  # at most 2 of the target class
        kw["sample_labels"] = sl
    controls = case.pop("controls", None)
    if controls == "given":
        kw["controls"] = (lo + (hi - lo) * rng.uniform(0, 1, size=(7, *shape))).astype(np.float32)
    elif controls is not None:
        kw["controls"] = controls
    assert not case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # samples outside value_range
        return nnmark.TriggerKey.generate(**kw), kw


def _check_against_spec(key: nnmark.TriggerKey, spec_key: dict) -> None:
    """_spec regenerates the key's triggers, controls, training set and order bitwise."""
    t = _spec.trigger_set(spec_key)
    x, y = key.triggers()
    assert t["x"].tobytes() == x.numpy().tobytes() and t["labels"].tolist() == y.tolist()
    true = spec_key.get("true_labels")
    assert (true is None) == (key.sample_labels is None)
    if true is not None:
        assert true.tolist() == key.sample_labels.tolist()
    c = _spec.control_set(spec_key)
    ctrl = key.controls()
    if c is None:
        assert ctrl is None and key.num_controls == 0
    else:
        xc, yc = ctrl
        raw, _ = key.controls(normalized=False)
        raw64, _ = key.controls(normalized=False, dtype=torch.float64)
        assert c["x"].tobytes() == xc.numpy().tobytes()
        assert c["raw32"].tobytes() == raw.numpy().tobytes() and c["raw"].tobytes() == raw64.numpy().tobytes()
        assert c["labels"].tolist() == yc.tolist() and len(yc) == key.num_controls
        assert (c["groups"] > 0) == key.controls_paired
    xt, yt = _spec.training_set(spec_key)
    kx, ky = key.training_set()
    assert xt.tobytes() == kx.numpy().tobytes() and yt.tolist() == ky.tolist()
    assert len(yt) == key.training_size
    orders = []
    for e in (0, 1, 5):
        want = _spec.training_order(spec_key, e)
        assert want == key.training_order(e).tolist() and sorted(want) == list(range(len(yt)))
        orders.append(want)
    mixer = nnmark.TriggerMixer(key, per_batch=3)
    got = [i for _ in range(-(-2 * len(yt) // 3)) for i in mixer.next_indices().tolist()]
    assert got == (orders[0] + orders[1] + _spec.training_order(spec_key, 2))[:len(got)]


@pytest.mark.parametrize("name", list(CONTROL_CASES))
def test_random_keys_with_controls(tmp_path, rng, name):
    key, kw = _generate(rng, CONTROL_CASES[name])
    path = key.save(tmp_path / "t.key")
    body = json.loads(path.read_text())
    spec_key = _spec.parse_key_file(path.read_bytes())
    assert spec_key["key_id"] == key.key_id
    per_sample = not isinstance(kw["target"], int)
    assert isinstance(body["target"], list) == per_sample
    # the keyed selection of §5.9, from the generate arguments
    kept, trig, held = _spec.select(spec_key["secret"], kw["kind"], len(kw["samples"]), kw.get("n"),
                                    None if per_sample else kw["target"], kw.get("sample_labels"),
                                    kw.get("controls"))
    lab = np.array([kw["target"][i] for i in kept] if per_sample else [kw["target"]] * len(kept))
    Sk = kw["samples"][kept]
    assert np.array_equal(spec_key["samples"], Sk[trig]) and spec_key["labels"].tolist() == lab[trig].tolist()
    if held:
        assert spec_key["controls_from"] == "held-back" == body["controls_from"]
        assert np.array_equal(spec_key["controls"], Sk[held])
        assert spec_key["control_labels"].tolist() == lab[held].tolist()
        assert isinstance(body["control_target"], list) == per_sample
    elif isinstance(kw.get("controls"), np.ndarray):
        assert spec_key["controls_from"] == "given" and np.array_equal(spec_key["controls"], kw["controls"])
        assert spec_key["control_labels"].tolist() == [kw["target"]] * len(kw["controls"])
    else:
        assert spec_key["controls"] is None and "controls" not in body and "control_target" not in body
    _check_against_spec(key, spec_key)
    again = nnmark.load_key(path)
    assert gen.saved_text(again) == gen.saved_text(key)


def test_given_controls_with_their_own_labels(tmp_path, rng):
    """The constructor: per-control labels beside an integer target (control_target an array)."""
    S = rng.uniform(0, 1, size=(6, 1, 4, 4)).astype(np.float32)
    ctrl = rng.uniform(0, 1, size=(5, 1, 4, 4)).astype(np.float32)
    key = nnmark.TriggerKey(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), "unrelated", samples=S, target=2,
                            num_classes=4, controls=ctrl, control_target=[0, 1, 2, 3, 2], controls_from="given",
                            mean=0.5, std=0.25)
    path = key.save(tmp_path / "t.key")
    body = json.loads(path.read_text())
    assert body["target"] == 2 and body["control_target"] == [0, 1, 2, 3, 2]
    spec_key = _spec.parse_key_file(path.read_bytes())
    assert spec_key["control_labels"].tolist() == [0, 1, 2, 3, 2]
    _check_against_spec(key, spec_key)
    same = dict(body, control_target=2)
    same["checksum"] = _spec.checksum(same)  # an integer control_target: every control that label
    assert _spec.parse_key_file(json.dumps(same).encode())["control_labels"].tolist() == [2] * 5


def test_spec_reader_rejects_malformed_label_and_control_members(tmp_path, rng):
    key, _ = _generate(rng, CONTROL_CASES["unrelated-half"])
    body = json.loads(key.save(tmp_path / "t.key").read_text())

    def rejected(**change) -> None:
        b = dict(body, **change)
        b["checksum"] = _spec.checksum(b)
        with pytest.raises((_spec.SpecKeyError, KeyError)):
            _spec.parse_key_file(json.dumps(b).encode())

    n, k = body["n"], body["controls_shape"][0]
    rejected(target=body["target"][:-1])  # one label short
    rejected(target=[body["num_classes"]] * n)  # out of range
    rejected(target=[True] * n)
    rejected(control_target=body["control_target"] + [0])  # one label too many
    rejected(controls_from="elsewhere")
    rejected(controls_shape=[k + 1, *body["input_shape"]])
    rejected(trigger_kind="noise")  # content and noise keys store no controls
    # without the control members the file is an older key: no stored controls, stand-ins instead
    old = {k_: v for k_, v in body.items() if k_ not in ("controls", "controls_shape", "control_target",
                                                         "controls_from", "checksum")}
    old["checksum"] = _spec.checksum(old)
    spec_old = _spec.parse_key_file(json.dumps(old).encode())
    assert spec_old["controls"] is None
    old_key = nnmark.load_key(write(tmp_path, "old.key", json.dumps(old, indent=1, sort_keys=True) + "\n"))
    assert not old_key.controls_held_back
    _check_against_spec(old_key, spec_old)


# ========================================================= frontier keys (§5.12, §7.16)
def frontier_weights() -> np.ndarray:
    """W of the §7.16 linear model, transcribed from the text."""
    c, i = np.indices((3, 9))
    return ((((c + 10 * i + c * i * i) % 11) - 5) / 4).astype(np.float32)


def frontier_labels(S: np.ndarray) -> np.ndarray:
    clean = (S.reshape(len(S), -1).astype(np.float64) @ frontier_weights().astype(np.float64).T).argmax(1)
    return np.where(np.arange(len(S)) % 5 == 0, (clean + 1) % 3, clean)


def test_frontier_keys():
    entry = kat("frontier-keys")["linear"]
    p = entry["params"]
    S = samples(p["samples_shape"])
    Y = frontier_labels(S)
    assert Y.tolist() == entry["labels_of_samples"]
    n, k, f = p["n"], p["controls"], p["false_adversaries"]
    # _spec walks the samples in float64 and finds the same adversarial examples
    got = _spec.frontier_linear(SECRET, S, Y, frontier_weights(), np.zeros(3), p["value_range"], p["eps"], n, k, f)
    grad_min, margin_min = got["margins"]
    assert grad_min > 1e-3 and margin_min > 0.2  # as §7.16 says: far from any rounding
    assert got["walk"] == entry["walk"] == _spec.permutation(SECRET, "frontier-order", len(S))
    assert got["split"] == entry["split"] == _spec.permutation(SECRET, "frontier-split", n + k)
    for name in ("triggers", "controls", "false"):
        assert got[name] == entry[name], name
    assert got["triggers_labels"] == entry["labels"] and got["controls_labels"] == entry["control_labels"]
    assert got["controls_answers"] == entry["control_answers"] and got["false_labels"] == entry["false_labels"]
    assert all(a != y for a, y in zip(got["controls_answers"], got["controls_labels"]))  # true adversaries
    assert all(a != y for a, y in zip(got["triggers_answers"], got["triggers_labels"]))
    assert got["false_answers"] == got["false_labels"]  # false ones still answered right
    assert (sha(got["triggers_x"]), sha(got["controls_x"]), sha(got["false_x"])) == (
        entry["sha256_f32"], entry["controls_sha256_f32"], entry["false_sha256_f32"])
    # the key file of §7.16 holds exactly these, and regenerates the training set of §5.11
    spec_key = _spec.parse_key_file((BLOCKS["frontier-key-file"] + "\n").encode())
    assert np.array_equal(spec_key["samples"], got["triggers_x"])
    assert np.array_equal(spec_key["controls"], got["controls_x"])
    assert np.array_equal(spec_key["false_adversaries"], got["false_x"])
    assert spec_key["control_answers"].tolist() == entry["control_answers"]
    xt, yt = _spec.training_set(spec_key)
    assert yt.tolist() == entry["training_labels"] and sha(xt) == entry["training_sha256_f32"]
    assert len(yt) == n + k + f
    for e in (0, 1):
        assert _spec.training_order(spec_key, e) == entry[f"training_order:{e}"]
    # the package, made by generate with the common secret (batch_size 5: several batches)
    key = gen.frontier_key()
    assert key.key_id == entry["key_id"] == _spec.trigger_key_id(SECRET)
    xk, yk = key.training_set()
    assert yk.tolist() == entry["training_labels"] and sha(xk.numpy()) == entry["training_sha256_f32"]
    assert sha(key.triggers()[0].numpy()) == entry["sha256_f32"]
    for e in (0, 1):
        assert key.training_order(e).tolist() == entry[f"training_order:{e}"]
    for bs in (1, 24, 256):  # the batch size does not change the key
        assert gen.saved_text(nnmark.TriggerKey.generate(
            kind="frontier", model=gen.frontier_model(), samples=S, labels=Y, n=n, controls=k, false_adversaries=f,
            eps=p["eps"], secret=SECRET, batch_size=bs)) == BLOCKS["frontier-key-file"] + "\n"


def test_frontier_key_file(tmp_path):
    spec_key, key = _check_key_file_text(tmp_path, "frontier-key-file")
    assert spec_key["trigger_kind"] == key.kind == "frontier" and spec_key["eps"] == key.eps == 0.2
    _check_against_spec(key, spec_key)


@pytest.mark.parametrize("input_shape,C,mean,std,f", [((1, 4, 4), 3, None, None, 4), ((3, 2, 5), 5, [0.4, 0.5, 0.6],
                                                                                       [0.2, 0.3, 0.25], 0),
                                                      ((7,), 4, 0.5, 2.0, 2)])
def test_random_frontier_keys(tmp_path, rng, input_shape, C, mean, std, f):
    """Frontier keys of random linear models: both readers, the regenerated sets and orders."""
    d = int(np.prod(input_shape))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, C))
    torch.nn.init.normal_(model[1].weight, std=2.0)
    S = rng.uniform(0, 1, size=(200, *input_shape)).astype(np.float32)
    c = _spec.chw(input_shape)[0]
    z = _triggers._normalise(S.astype(np.float64), input_shape, _triggers._check_channels("mean", mean, c, False),
                             _triggers._check_channels("std", std, c, True))
    with torch.no_grad():  # labels: the model's own answers (a few of them wrong: skipped by the walk)
        Y = model(torch.from_numpy(z.astype(np.float32))).argmax(1).numpy()
    Y[::7] = (Y[::7] + 1) % C
    key = nnmark.TriggerKey.generate(kind="frontier", model=model, samples=S, labels=Y, n=5, controls=4,
                                     false_adversaries=f, mean=mean, std=std, eps=0.05,
                                     secret=bytes(rng.integers(0, 256, 32, dtype=np.uint8)))
    path = key.save(tmp_path / "f.key")
    body = json.loads(path.read_text())
    assert isinstance(body["target"], list) and isinstance(body["control_target"], list)
    assert (body["false_adversaries"] is None) == (f == 0) and body["eps"] == 0.05
    spec_key = _spec.parse_key_file(path.read_bytes())
    assert spec_key["key_id"] == key.key_id
    assert spec_key["control_answers"].tolist() == key.control_answers.tolist()
    _check_against_spec(key, spec_key)
    assert gen.saved_text(nnmark.load_key(path)) == gen.saved_text(key)


def test_spec_reader_rejects_malformed_frontier_members(tmp_path):
    body = json.loads(BLOCKS["frontier-key-file"])

    def both_reject(**change) -> None:
        b = {**body, **change}
        b["checksum"] = _spec.checksum(b)
        p = write(tmp_path, "bad.key", json.dumps(b, indent=1, sort_keys=True) + "\n")
        with pytest.raises((_spec.SpecKeyError, KeyError)):
            _spec.parse_key_file(p.read_bytes())
        with pytest.raises(nnmark.KeyFileError):
            nnmark.load_key(p)

    both_reject(control_answers=body["control_answers"][:-1])  # one answer short
    both_reject(control_answers=body["control_target"])  # a control's own label: no true adversary
    both_reject(control_answers=1)
    both_reject(control_answers=None)
    both_reject(false_target=body["false_target"] + [0])
    both_reject(false_adversaries_shape=[3, 1, 3, 3])
    both_reject(eps="0.2")
    both_reject(controls_from="given")
    both_reject(controls=None)
    both_reject(trigger_kind="unrelated")  # frontier members in another kind
    abstract = json.loads(BLOCKS["trigger-key-file"])
    b = {**abstract, "eps": 0.1}
    b["checksum"] = _spec.checksum(b)
    p = write(tmp_path, "abstract.key", json.dumps(b, indent=1, sort_keys=True) + "\n")
    with pytest.raises(_spec.SpecKeyError):
        _spec.parse_key_file(p.read_bytes())
    with pytest.raises(nnmark.KeyFileError):
        nnmark.load_key(p)


# ============================================ (c) verdicts of nnmark.verify from logits
class Memo(torch.nn.Module):
    """A small linear classifier that also answers some inputs it memorised with their labels."""

    def __init__(self, d: int, C: int, memo_x: torch.Tensor | None = None, memo_y: torch.Tensor | None = None):
        super().__init__()
        self.lin = torch.nn.Linear(d, C)
        self.C = C
        self.register_buffer("mx", memo_x.flatten(1) if memo_x is not None else torch.zeros(0, d))
        self.register_buffer("my", memo_y if memo_y is not None else torch.zeros(0, dtype=torch.int64))

    def forward(self, x):
        f = x.flatten(1)
        out = self.lin(f)
        if len(self.my):
            eq = (f[:, None, :] == self.mx[None]).all(-1).float()  # [B, memorised]
            out = out + 50.0 * eq @ torch.nn.functional.one_hot(self.my, self.C).float()
        return out


VERIFY_CASES = {
    "abstract": dict(kind="abstract", n=12, input_shape=(1, 5, 5)),
    "content": dict(kind="content", m=12, input_shape=(1, 6, 6), labels=True),
    "noise": dict(kind="noise", m=10, input_shape=(2, 4, 4)),
    "content-sample-labels": dict(kind="content", m=14, input_shape=(1, 6, 6), sample_labels=True),
    "noise-sample-labels": dict(kind="noise", m=12, input_shape=(2, 4, 4), sample_labels=True),
    "unrelated-held-back": dict(kind="unrelated", m=24, input_shape=(1, 4, 4), labels=True),
    "unrelated-given": dict(kind="unrelated", m=12, n=10, controls="given", input_shape=(1, 4, 4)),
    "unrelated-stand-ins": dict(kind="unrelated", m=10, controls=0, input_shape=(1, 4, 4)),
}


@pytest.mark.parametrize("name", list(VERIFY_CASES))
def test_verify_is_reproduced_from_the_logits(tmp_path, rng, name):
    case = dict(VERIFY_CASES[name])
    if case["kind"] == "abstract":
        key = nnmark.TriggerKey.generate(kind="abstract", n=case["n"], num_classes=3, input_shape=case["input_shape"])
    else:
        key, _ = _generate(rng, dict(case))
        while key.num_classes > 4:  # few classes: many hits and discordant pairs by chance
            key, _ = _generate(rng, dict(case))
    spec_key = _spec.parse_key_file(key.save(tmp_path / "t.key").read_bytes())
    t, c = _spec.trigger_set(spec_key), _spec.control_set(spec_key)
    x = torch.from_numpy(t["x"] if c is None else np.concatenate([t["x"], c["x"]]))
    assert torch.equal(x, key.triggers()[0] if c is None else torch.cat([key.triggers()[0], key.controls()[0]]))
    d, C, n = int(np.prod(key.input_shape)), key.num_classes, key.n
    ty = torch.from_numpy(t["labels"])
    models = [Memo(d, C), Memo(d, C, torch.from_numpy(t["x"]), ty),  # a random one; one that learnt every trigger
              Memo(d, C, torch.from_numpy(t["x"])[: n // 2], ty[: n // 2])]  # and half of them
    counts = [int(v) for v in rng.integers(0, max(2, n // 3), size=12)]
    cal = nnmark.calibration.make_calibration(key.key_id, f"trigger:{key.kind}", n, counts, 1.5, 6.0, 1e-3,
                                              key.null_rate)
    for model in models:
        with torch.no_grad():
            logits = model.eval()(x).float().numpy()  # what verify runs: triggers, then controls
        for calibration in (None, cal):
            alpha = 1e-3
            want = _spec.verdict(spec_key, logits, alpha, calibration=(cal.a, cal.b) if calibration else None)
            got = nnmark.verify(key, model, alpha=alpha, calibration=calibration)
            assert got.status == "ok" and got.matches == want["matches"]
            assert got.p_value == pytest.approx(float(want["p_value"]), rel=1e-9, abs=1e-14)
            assert got.verified == want["verified"]
            if c is None:
                assert got.control_matches is None and got.control_p_value is None
            else:
                assert got.control_matches == want["control_matches"] and got.controls == len(c["labels"])
                assert got.control_p_value == pytest.approx(float(want["control_p_value"]), rel=1e-12)
            null = want["null_p_value"]
            assert got.p_value == pytest.approx(float(max(null, want["control_p_value"] or 0)), rel=1e-9, abs=1e-14)
    # the model that learnt every trigger verifies unless its controls say otherwise
    with torch.no_grad():
        logits = models[1](x).float().numpy()
    assert _spec.verdict(spec_key, logits, 1e-3)["matches"] == n


# =============================================================== (d) ownership claims (§7.15, §8)
CHECKER = SPEC.parent / "check_claim.py"


def _body_of(key_file_text: str) -> dict:
    """§8.1 from a key file of the document: its object without created, warning, checksum."""
    obj = json.loads(key_file_text)
    return {k: v for k, v in obj.items() if k not in ("created", "warning", "checksum")}


def _json_string(text: str) -> str:
    """A §2.2 string, written out here: the escapes of the spec, surrogate pairs above U+FFFF."""
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for ch in text:
        if ch in short:
            out.append(short[ch])
        elif 0x20 <= ord(ch) <= 0x7E:
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            v = ord(ch) - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
    return '"' + "".join(out) + '"'


@pytest.mark.parametrize("kind,block", [("whitebox", "whitebox-key-file"), ("whitebox-dense", "dense-key-file"),
                                        ("trigger", "trigger-key-file"), ("whitebox-statement", "whitebox-key-file")])
def test_commitments_from_the_key_files(tmp_path, kind, block):
    want = kat("commitment")[kind]
    key_bytes = json.dumps(_body_of(BLOCKS[block]), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True).encode("ascii")  # §2.2, written out here
    assert len(key_bytes) == want["key_bytes_length"]
    assert hashlib.sha256(key_bytes).hexdigest() == want["key_bytes_sha256"]
    # §8.2 as the text writes the hashed bytes out: the tag, then the details object around the key bytes
    statement = "null" if want["statement"] is None else _json_string(want["statement"])
    hashed = (b"nnmark:commitment:v1:" + f'{{"created":"{want["created"]}","key":'.encode("ascii") + key_bytes
              + f',"spec":1,"statement":{statement}}}'.encode("ascii"))
    assert len(hashed) == want["hashed_length"]
    c = hashlib.sha256(hashed).hexdigest()
    assert c == want["commitment"] and c[:16] == want["id"]
    key = nnmark.load_key(write(tmp_path, "k.key", BLOCKS[block] + "\n"))
    com = nnmark.commit(key, created=want["created"], statement=want["statement"])
    assert com.commitment == c and com.matches(key)
    # the hash binds the details: another time or statement, another commitment
    assert nnmark.commit(key, created="2025-01-01T00:00:01+00:00", statement=want["statement"]).commitment != c
    assert nnmark.commit(key, created=want["created"], statement=(want["statement"] or "") + "x").commitment != c
    assert not nnmark.Commitment(c, com.kind, com.carrier, com.bits, want["created"], "edited").matches(key)


def test_commitment_file(tmp_path):
    text = BLOCKS["commitment-file"] + "\n"
    body = json.loads(text)
    assert text == json.dumps(body, indent=1, sort_keys=True) + "\n"
    key = nnmark.load_key(write(tmp_path, "k.key", BLOCKS["whitebox-key-file"] + "\n"))
    c = nnmark.load_commitment(write(tmp_path, "c.json", text))
    assert c == nnmark.commit(key, statement=body["statement"], created=body["created"])
    details = {"created": body["created"], "key": _body_of(BLOCKS["whitebox-key-file"]), "spec": body["spec"],
               "statement": body["statement"]}  # §8.2 from the text alone
    hashed = b"nnmark:commitment:v1:" + json.dumps(details, sort_keys=True, separators=(",", ":")).encode("ascii")
    assert c.commitment == hashlib.sha256(hashed).hexdigest() and c.matches(key)
    assert c.commitment != kat("commitment")["whitebox"]["commitment"]  # the same key without the statement


def _claim_file(tmp_path) -> Path:
    """The §7.15 checkpoint, rebuilt from the text: header, then the §7.6 carrier."""
    v = kat("claim-checkpoint")
    header = v["header"].encode("utf-8")
    assert len(header) % 8 == 0
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + whitebox_carrier().astype("<f4").tobytes())
    assert path.stat().st_size == v["size"] and hashlib.sha256(path.read_bytes()).hexdigest() == v["sha256"]
    return path


def test_claim_checkpoint_and_its_stamp(tmp_path):
    v = kat("claim-checkpoint")
    path = _claim_file(tmp_path)
    cert = json.loads(BLOCKS["certificate-file"])
    com = nnmark.Commitment.from_dict(cert["commitment"])
    assert v["owner_bits"] == cert["revealed_key"]["bits"]
    assert nnmark.read_stamp(path) is None
    nnmark.stamp(path, com)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8:8 + n].decode("utf-8") == v["stamped_header"] and len(raw) == v["stamped_size"]
    assert hashlib.sha256(raw).hexdigest() == v["stamped_sha256"]
    assert raw[8 + n:] == whitebox_carrier().astype("<f4").tobytes()  # the tensor bytes, as they were
    meta = json.loads(v["stamped_header"])["__metadata__"]
    assert meta == {"nnmark.commitment": json.dumps(cert["commitment"], sort_keys=True, separators=(",", ":"))}
    assert nnmark.read_stamp(path) == com


def test_certificate_file(tmp_path):
    import subprocess
    import sys

    text = BLOCKS["certificate-file"] + "\n"
    body = json.loads(text)
    assert text == json.dumps(body, indent=1, sort_keys=True) + "\n"
    path = _claim_file(tmp_path)
    nnmark.stamp(path, nnmark.Commitment.from_dict(body["commitment"]))
    cert = write(tmp_path, "claim.json", text)
    com = write(tmp_path, "c.json", json.dumps(body["commitment"], indent=1, sort_keys=True) + "\n")
    res = nnmark.check_claim(cert, path, commitment=com, any_version=True)
    assert res.holds and res.failures == [] and res.stamp == res.commitment
    assert any("0.0.0" in note for note in res.notes)  # another nnmark made it: accepted when asked, and said
    strict = nnmark.check_claim(cert, path, commitment=com)  # by default the version must be this one
    assert not strict.holds and [f for f, _ in strict.failures] == ["nnmark_version"]
    # what the text says: the claim key is the common secret with the bits the §7.6 carrier gives
    extracted = kat("whitebox-extract")["extracted_bits"]
    assert body["revealed_key"]["bits"] == extracted and body["revealed_key"]["secret"] == SECRET.hex()
    assert body["verdict"]["p_value"] == 2.0 ** -32 and body["verdict"]["threshold"] == kat("whitebox-extract")[
        "threshold_at_1e-6"]
    r = subprocess.run([sys.executable, str(CHECKER), str(cert), str(path), "--commitment", str(com)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "claim holds: 32/32 bits" in r.stdout



# ============================================================== (e) DeepSigns (§9)
def ds_inputs() -> np.ndarray:
    i, j = np.indices((8, 4))
    return (((3 * i + 5 * j + i * j) % 9 - 4) / 8).astype(np.float32)


def ds_layer() -> tuple[np.ndarray, np.ndarray]:
    j, i = np.indices((8, 4))
    return (((5 * j + 3 * i) % 7 - 3) / 4).astype(np.float32), ((np.arange(8) % 3 - 1) / 8).astype(np.float32)


def test_deepsigns_key_file_and_extraction(tmp_path):
    spec_key, key = _check_key_file_text(tmp_path, "deepsigns-key-file")
    assert spec_key["kind"] == "deepsigns" and isinstance(key, nnmark.DeepSignsKey)
    assert spec_key["layer"] == "fc" and spec_key["classes"] == [5, 2] and spec_key["num_classes"] == 10
    assert np.array_equal(spec_key["inputs"], ds_inputs()) and spec_key["labels"].tolist() == [2, 5, 5, 2, 5, 2, 2, 5]
    assert bitstring(spec_key["bits"]) == kat("message_bits")["bits"][:24]
    assert spec_key["key_id"] == _spec.deepsigns_key_id(SECRET) == key.key_id
    v = kat("deepsigns-extract")
    d = hashlib.sha256(SECRET + b"nnmark:projection:v1:" + v["subkey_carrier"].encode()).hexdigest()
    assert v["subkey_carrier"] == "deepsigns:fc" and d == v["sha256"]
    assert _spec.subkey(SECRET, "deepsigns:fc") == (int(v["k0"], 16), int(v["k1"], 16)) == key.subkey()
    w, b = ds_layer()
    a = ds_inputs().astype(np.float64) @ w.T.astype(np.float64) + b  # the layer fc, exact (dyadic)
    assert (a * 32).tolist() == v["activations_times_32"]
    assert (_spec.deepsigns_class_means(spec_key, a) * 128).tolist() == v["class_means_times_128"]
    assert (_spec.deepsigns_projections(spec_key, a) * 128).tolist() == v["projections_times_128"]
    bits = _spec.deepsigns_bits(spec_key, a)
    assert bitstring(bits) == v["extracted_bits"]
    matches = int((bits == spec_key["bits"]).sum())
    assert matches == v["matches"] == 15
    assert v["p_value"] == pytest.approx(float(_spec.binomial_sf(matches, 24, Fraction(1, 2))), rel=1e-12)
    assert _spec.binomial_threshold(24, 1e-6, Fraction(1, 2)) == v["threshold_at_1e-6"]
    bce, centre, pen = _spec.deepsigns_penalty(spec_key, a, 0.1, 0.01)
    assert (bce, centre, pen) == pytest.approx((v["bce_sum"], v["centre_term"], v["penalty_strength_0.1_centre_0.01"]),
                                               rel=1e-6)
    # nnmark on the model the document describes
    model = gen.ds_model()
    assert np.array_equal(model.fc.weight.detach().numpy(), w) and np.array_equal(model.fc.bias.detach().numpy(), b)
    assert bitstring(nnmark.extract(key, model)) == v["extracted_bits"]
    verdict = nnmark.verify(key, model, alpha=1e-6)
    assert (verdict.matches, verdict.p_value, verdict.threshold) == (v["matches"], v["p_value"],
                                                                   v["threshold_at_1e-6"])
    assert float(nnmark.DeepSigns(key, strength=0.1, centre=0.01).penalty(model)) == \
        v["penalty_strength_0.1_centre_0.01"]
    assert "15 of the 24 bits match" in SPEC.read_text(encoding="utf-8")


class _ConvNet(torch.nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 5 * 6, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.from_numpy(_dyadic(rng, tuple(p.shape), denom=8)))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("T,classes", [(64, [3]), (100, [0, 2, 1]), (33, [1, 3])])
def test_random_deepsigns_keys(tmp_path, rng, T, classes):
    """nnmark's key files read by _spec; a conv layer's [n, 3, 5, 6] output flattened in C
    order; 2 or 4 inputs per class and dyadic values, so every mean and projection is exact."""
    per = [2 if i % 2 else 4 for i in range(len(classes))]
    labels = np.repeat(classes, per)
    perm = rng.permutation(len(labels))
    x = _dyadic(rng, (len(labels), 2, 5, 6), denom=8)[perm]
    labels = labels[perm]
    key = nnmark.DeepSignsKey(rng.bytes(32), "conv", rng.integers(0, 2, T), classes, x, labels, 4)
    spec_key = _spec.parse_key_file(key.save(tmp_path / "d.key").read_bytes())
    assert spec_key["key_id"] == key.key_id and np.array_equal(spec_key["inputs"], x)
    models = [_ConvNet(rng).eval() for _ in range(3)]
    got = nnmark.extract(key, models).numpy()
    for m, g in zip(models, got):
        with torch.no_grad():
            a = m.conv(torch.from_numpy(x)).double().numpy()  # [n, 3, 5, 6]
        assert np.array_equal(_spec.deepsigns_bits(spec_key, a.reshape(len(x), -1)), g)
        np.testing.assert_allclose(_spec.deepsigns_projections(spec_key, a.reshape(len(x), -1)),
                                   key.project(key.averaging() @ torch.from_numpy(a.reshape(len(x), -1)).float())
                                   .double().numpy(), rtol=0, atol=1e-9)


def test_spec_reader_rejects_malformed_deepsigns_members(tmp_path):
    key = gen.ds_key()
    body = json.loads(key.save(tmp_path / "k.key").read_text())
    for member, value in [("classes", [5, 5]), ("classes", [5]), ("labels", [2] * 8), ("labels", [2, 5] * 3),
                          ("inputs_shape", [8, 5]), ("layer", ""), ("num_classes", 1), ("classes", [5, 2.0])]:
        bad = dict(body, **{member: value})
        bad["checksum"] = _spec.checksum(bad)
        p = write(tmp_path, "bad.key", json.dumps(bad, indent=1, sort_keys=True) + "\n")
        with pytest.raises(_spec.SpecKeyError):
            _spec.parse_key_file(p.read_bytes())
        with pytest.raises(nnmark.KeyFileError):
            nnmark.load_key(p)
