"""DeepSigns keys (a white-box mark in a hidden layer's activations): key files (mode,
round trip, strict fields), the keyed projection (spec v1 under the "deepsigns:" carrier
name, a fair coin per bit), embedding on the digits CNN against its unmarked twin, and
verification through every door (module, state dict, safetensors file, scan, robustness
report). The false-positive study on >= 10 unmarked models is benchmarks/bench_deepsigns.py."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark import DeepSigns, DeepSignsKey, KeyFileError, load_key
from nnmark.demo import DigitsNet, accuracy, load_digits_split, train

SECRET = bytes(range(64, 96))
LAYER = "classifier.1"  # DigitsNet's first linear layer (64 units), before its ReLU
ARCH = "nnmark.demo:DigitsNet"
EPOCHS, SETTLE = 30, 5  # as the demo trains


def _key(bits=32, classes=(3, 7), n_per=4, layer=LAYER) -> DeepSignsKey:
    rng = np.random.default_rng(5)
    labels = np.repeat(np.asarray(classes), n_per)
    return DeepSignsKey(SECRET, layer, rng.integers(0, 2, bits), list(classes),
                        rng.random((len(labels), 1, 8, 8)).astype(np.float32), labels, 10)


def _secret_shown(text: str) -> bool:
    h = SECRET.hex()
    return any(part in text.lower() for part in (h, h[:16], h[-16:]))


def _resigned(body: dict) -> str:
    rest = {k: v for k, v in body.items() if k != "checksum"}
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    return json.dumps({**rest, "checksum": digest}, indent=1, sort_keys=True) + "\n"


def _write(path, text: str):
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# --------------------------------------------------------------------------- keys and files
def test_generate_draws_classes_and_inputs_from_the_owners_data():
    data = load_digits_split()
    key = DeepSignsKey.generate(LAYER, data.x_train, data.y_train, bits=48, classes=3, per_class=5)
    assert len(key.classes) == 3 and len(set(key.classes)) == 3 and key.num_classes == 10
    assert key.n == 15 and key.input_shape == (1, 8, 8) and len(key) == key.num_bits == 48
    labels = key.labels.numpy()
    assert sorted(set(labels.tolist())) == sorted(key.classes) and all((labels == c).sum() == 5 for c in key.classes)
    # every input is one of the owner's samples of its class
    x = data.x_train.numpy().reshape(len(data.x_train), -1)
    for xi, yi in zip(key.inputs().numpy().reshape(key.n, -1), labels):
        rows = np.flatnonzero((x == xi).all(axis=1))
        assert rows.size and (data.y_train.numpy()[rows] == yi).all()
    # bit t is carried by class classes[t mod s]
    assert key.bit_classes().tolist() == [t % 3 for t in range(48)]
    # given classes, message bits, fewer samples than per_class
    key2 = DeepSignsKey.generate(LAYER, data.x_train[:40], data.y_train[:40], bits=24, classes=[1, 2],
                                 per_class=1000, message="ACME")
    assert key2.classes == (1, 2) and key2.n == int(((data.y_train[:40] == 1) | (data.y_train[:40] == 2)).sum())
    assert key2.bits.tolist() == nnmark.message_bits("ACME", 24).tolist()
    assert key.key_id != key2.key_id  # fresh secrets


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer=""), "layer"),
    (dict(classes=[11]), "classes"),
    (dict(classes=0), "classes"),
    (dict(classes=[1, 1]), "distinct"),
    (dict(bits=1, classes=2), "classes"),
    (dict(per_class=0), "per_class"),
    (dict(bits=0), "bits"),
])
def test_generate_refuses_bad_arguments(kwargs, match):
    data = load_digits_split()
    args = dict(layer=LAYER, samples=data.x_train[:200], labels=data.y_train[:200])
    layer = kwargs.pop("layer", args.pop("layer"))
    args.pop("layer", None)
    with pytest.raises((ValueError, TypeError), match=match):
        DeepSignsKey.generate(layer, **args, **kwargs)


def test_the_key_file_round_trip_mode_and_secrecy(tmp_path):
    key = _key()
    path = key.save(tmp_path / "ds.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    body = json.loads(path.read_text())
    assert body["kind"] == "deepsigns" and body["layer"] == LAYER and body["inputs_shape"] == [8, 1, 8, 8]
    assert body["key_id"] == key.key_id == hashlib.sha256(b"nnmark:deepsigns:v1:key-id\x00" + SECRET).hexdigest()[:16]
    back = load_key(path)
    assert isinstance(back, DeepSignsKey) and back == key and back.key_id == key.key_id
    assert torch.equal(back.inputs(), key.inputs()) and torch.equal(back.labels, key.labels)
    assert back.classes == (3, 7) and back.num_classes == 10 and torch.equal(back.bits, key.bits)
    assert not _secret_shown(repr(key)) and key.key_id in repr(key)
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(key)
    # a changed file whose checksum was not recomputed
    _write(path, path.read_text().replace('"layer": "classifier.1"', '"layer": "classifier.3"'))
    with pytest.raises(KeyFileError, match="checksum"):
        load_key(path)


CASES = [
    ("layer", "", "layer"),
    ("layer", ["classifier.1"], "layer"),
    ("layer", "x" * 5000, "layer"),
    ("num_bits", 32.0, "num_bits"),
    ("bits", "01" * 15 + "02", "bits"),
    ("num_classes", 1, "num_classes"),
    ("num_classes", True, "num_classes"),
    ("classes", [3, 3], "distinct"),
    ("classes", [3, 12], "classes"),
    ("classes", [3], "not among the chosen classes"),
    ("classes", [3, 7, 1], "no input"),
    ("classes", "37", "classes"),
    ("classes", [3.0, 7], "classes"),
    ("inputs_shape", [8, 1, 8, 8.0], "inputs_shape"),
    ("inputs_shape", [8], "inputs_shape"),
    ("inputs_shape", [8, 1, 100000, 100000], "inputs_shape"),
    ("inputs_shape", [9, 1, 8, 8], "inputs"),
    ("inputs", "AAAA", "inputs"),
    ("inputs", 7, "inputs"),
    ("labels", [3] * 7, "labels"),
    ("labels", [3] * 4 + [7] * 3 + [True], "labels"),
    ("labels", [3] * 4 + [7] * 3 + [10], "labels"),
    ("secret", SECRET.hex()[:-2], "secret"),
]


@pytest.mark.parametrize("field,value,names", CASES, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(CASES)])
def test_strict_fields_with_a_recomputed_checksum(tmp_path, field, value, names):
    body = json.loads(_key().save(tmp_path / "k.key").read_text())
    body[field] = value
    path = _write(tmp_path / "k.key", _resigned(body))
    with pytest.raises(KeyFileError) as err:
        load_key(path)
    msg = str(err.value)
    assert "checksum" not in msg and names in msg, msg
    assert str(path) in msg and not _secret_shown(msg)


def test_non_finite_inputs_and_any_value_in_any_field(tmp_path):
    key = _key()
    body = json.loads(key.save(tmp_path / "k.key").read_text())
    x = key.inputs().numpy().copy()
    x[0, 0, 0, 0] = np.nan
    import base64

    path = _write(tmp_path / "k.key", _resigned({**body, "inputs": base64.b64encode(x.astype("<f4").tobytes())
                                                 .decode("ascii")}))
    with pytest.raises(KeyFileError, match="NaN"):
        load_key(path)
    for field in sorted(set(body) - {"checksum"}):
        for value in (None, True, 0, -1, 1.5, "", "x", [], [None], {}, [[1]]):
            _write(path, _resigned({**body, field: value}))
            try:
                load_key(path)
            except KeyFileError as exc:  # anything else fails the test
                assert not _secret_shown(str(exc)), (field, value)


# --------------------------------------------------------------------------- the projection
def test_the_projection_is_spec_v1_under_the_prefixed_carrier_name():
    key = _key(bits=40)
    twin = nnmark.WhiteBoxKey(SECRET, "deepsigns:" + LAYER, [0, 1] * 20, reduction="flat")
    assert key.subkey() == twin.subkey()
    rng = np.random.default_rng(0)
    means = torch.from_numpy(rng.standard_normal((2, 64)))
    X = nnmark.keyed_projection(torch.eye(64, dtype=torch.float64), key.subkey(), 40).T  # [T, M]
    want = torch.stack([X[t] @ means[t % 2] for t in range(40)])
    assert torch.allclose(key.project(means), want, rtol=0, atol=1e-12)
    assert torch.allclose(key.project(torch.stack([means, -means])), torch.stack([want, -want]), rtol=0, atol=1e-12)
    # another layer, another projection
    assert _key(layer="classifier.2").subkey() != key.subkey()


def test_each_bit_is_a_fair_coin_over_the_keys_randomness():
    """A fixed non-negative mean (as a ReLU layer gives) projected by keyed rows: the
    extracted bits of 400 keys x 64 bits are 1 about half the time (rows symmetric), and
    bits of one key are uncorrelated (rows independent)."""
    v = torch.from_numpy(np.random.default_rng(1).random((1, 64)))  # all positive
    bits = []
    for i in range(400):
        secret = hashlib.sha256(b"fair-coin" + bytes([i % 256, i // 256])).digest()
        k = DeepSignsKey(secret, LAYER, [0, 1] * 32, [0], np.zeros((1, 4), np.float32), [0], 10)
        bits.append((k.project(v) > 0).numpy())
    b = np.asarray(bits, dtype=np.float64)  # [400, 64]
    n = b.size
    assert abs(b.mean() - 0.5) < 5 * 0.5 / np.sqrt(n)  # 5 sigma of a fair coin
    corr = np.corrcoef(b[:, :32].ravel(), b[:, 32:].ravel())[0, 1]
    assert abs(corr) < 5 / np.sqrt(b[:, :32].size)
    # the matrix entries themselves: +-1, half each
    X = nnmark.keyed_projection(torch.eye(256, dtype=torch.float64), (12345, 678), 256).numpy()
    assert set(np.unique(X).tolist()) == {-1.0, 1.0} and abs((X > 0).mean() - 0.5) < 5 * 0.5 / 256


# --------------------------------------------------------------------------- trained models
@pytest.fixture(scope="module")
def zoo():
    data = load_digits_split()
    key = DeepSignsKey.generate(LAYER, data.x_train, data.y_train, bits=64, classes=2)
    wm = DeepSigns(key)
    marked = train(data, 0, EPOCHS, wm=wm, settle_epochs=SETTLE)
    twin = train(data, 0, EPOCHS, settle_epochs=SETTLE)  # same seed and batches, no mark
    null = train(data, 7, 12, settle_epochs=2)  # independently trained
    torch.manual_seed(11)
    untrained = DigitsNet().eval()
    return dict(data=data, key=key, wm=wm, marked=marked, twin=twin, null=null, untrained=untrained)


def test_the_marked_model_verifies_within_a_point_of_its_twin(zoo):
    data, key = zoo["data"], zoo["key"]
    acc_marked = accuracy(zoo["marked"], data.x_test, data.y_test)
    acc_twin = accuracy(zoo["twin"], data.x_test, data.y_test)
    assert acc_twin - acc_marked <= 0.01, (acc_marked, acc_twin)
    v = nnmark.verify(key, zoo["marked"], alpha=1e-6)
    assert v.status == "ok" and v.verified and v.p_value <= 1e-6 and v.bits == 64
    assert v.matches >= v.threshold and v.null == "binomial(p0=0.5)"
    assert zoo["wm"].ber(zoo["marked"]) == v.ber
    assert nnmark.extract(key, zoo["marked"]).tolist() == (zoo["wm"].losses(zoo["marked"])[0] > 0).int().tolist()
    for name in ("twin", "null", "untrained"):
        u = nnmark.verify(key, zoo[name], alpha=1e-6)
        assert u.status == "ok" and not u.verified and u.p_value > 1e-6, name


def test_verify_a_state_dict_and_safetensors_files_with_arch(zoo, tmp_path):
    key = zoo["key"]
    sd = zoo["marked"].state_dict()
    with pytest.raises(ValueError, match="DeepSigns key checks a model by running it"):
        nnmark.verify(key, sd)
    v = nnmark.verify(key, sd, arch=ARCH)
    want = nnmark.verify(key, zoo["marked"])
    assert v.verified and (v.matches, v.p_value) == (want.matches, want.p_value)
    paths = []
    for name in ("marked", "twin", "null"):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(zoo[name].state_dict(), str(paths[-1]))
    bad = {k: v.clone() for k, v in sd.items()}
    bad["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    paths.append(tmp_path / "nan.safetensors")
    got = nnmark.verify(key, [str(p) for p in paths], arch=DigitsNet)
    assert [g.verified for g in got] == [True, False, False, False]
    assert got[0].matches == want.matches and got[0].to_dict()["carrier_sha256"]
    assert got[3].status == "invalid" and got[3].error_class == "NonFinite"
    # an architecture without the key's layer: every file says so
    other = DeepSignsKey(bytes(32), "features.9", [0, 1] * 16, list(key.classes), key.inputs(), key.labels, 10)
    rows = nnmark.verify(other, [str(paths[0]), zoo["marked"]], arch=ARCH)
    assert [(r.status, r.error_class) for r in rows] == [("invalid", "MissingLayer")] * 2
    # the bits extracted from a file are the module's
    from nnmark.deepsigns import extract

    assert torch.equal(extract(key, str(paths[0]), arch=ARCH), nnmark.extract(key, zoo["marked"]))


def test_scan_and_calibration_kind(zoo, tmp_path):
    key = zoo["key"]
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("marked", "twin"):
        save_file(zoo[name].state_dict(), str(folder / f"{name}.safetensors"))
    key_path = key.save(tmp_path / "ds.key")
    with pytest.raises(ValueError, match="arch"):
        nnmark.scan(str(key_path), [str(folder)], progress=False)
    res = nnmark.scan(str(key_path), [str(folder)], arch=ARCH, progress=False)
    got = {os.path.basename(r["path"]): r for r in res.rows}
    assert got["marked.safetensors"]["verified"] and not got["twin.safetensors"]["verified"]
    assert got["marked.safetensors"]["key_id"] == key.key_id and got["twin.safetensors"]["status"] == "ok"


def test_robustness_report_with_a_deepsigns_key(zoo, tmp_path):
    data, key = zoo["data"], zoo["key"]
    rep = nnmark.robustness_report(zoo["marked"], [key], test=(data.x_test, data.y_test),
                                   attacks={"prune_global": [0.3], "quantize": [8]}, out_dir=tmp_path / "rep",
                                   progress=False)
    assert rep.marks == [{"key_id": key.key_id, "kind": "white-box", "type": "DeepSignsKey", "n": 64,
                          "layer": LAYER, "classes": list(key.classes)}]
    assert rep.baseline["marks"][key.key_id]["verified"]
    assert [r["attack"] for r in rep.rows] == ["baseline", "prune_global", "quantize"]
    assert all(r["error"] is None and r["marks"][key.key_id]["status"] == "ok" for r in rep.rows)
    text = (tmp_path / "rep" / "robustness.json").read_text()
    assert key.key_id in text and not any(part in text for part in (key._secret.hex()[:16],))


# --------------------------------------------------------------------------- the adapters
def test_penalty_hook_embeds_a_deepsigns_mark(tmp_path):
    """The plain-torch adapter adds DeepSigns' gradient in optimizer.step(): the training
    loop stays unchanged, and its state holds the key id and layer, never the secret."""
    data = load_digits_split()
    key = DeepSignsKey.generate(LAYER, data.x_train, data.y_train, bits=64, classes=2)
    path = key.save(tmp_path / "ds.key")
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hook = nnmark.PenaltyHook(model, str(path), strength=0.1).attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        order = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    v = nnmark.verify(key, model)
    assert v.verified and hook.steps == 6 * 22 and hook.ber() == {key.key_id: v.ber}
    state = hook.state_dict()
    assert state["marks"] == [{"key_id": key.key_id, "carrier": LAYER, "strength": 0.1, "bits": 64}]
    assert not _secret_shown(json.dumps(state)) and key._secret.hex() not in json.dumps(state)
    # the same gradient as the penalty's, on every parameter up to the layer, none after it
    emb = nnmark.integrations.Embedding(DeepSigns(key, strength=0.1))
    model.zero_grad()
    emb.add_penalty_grad(model)
    ref = torch.autograd.grad(DeepSigns(key, strength=0.1).penalty(model), list(model.parameters()),
                              allow_unused=True)
    for (name, p), r in zip(model.named_parameters(), ref):
        if r is None:
            assert p.grad is None and name.startswith("classifier.3"), name
        else:
            assert torch.allclose(p.grad, r, rtol=1e-5, atol=1e-7), name
    with pytest.raises(KeyError, match="layer"):
        nnmark.PenaltyHook(torch.nn.Sequential(torch.nn.Linear(64, 10)), key)


def test_cli_verify_and_scan_need_arch(zoo, tmp_path):
    from click.testing import CliRunner

    from nnmark.cli import cli

    key_path = zoo["key"].save(tmp_path / "ds.key")
    model_path = tmp_path / "marked.safetensors"
    save_file(zoo["marked"].state_dict(), str(model_path))
    r = CliRunner().invoke(cli, ["verify", str(key_path), str(model_path)])
    assert r.exit_code != 0 and "DeepSigns key runs the model" in r.output and "--arch" in r.output
    r = CliRunner().invoke(cli, ["verify", str(key_path), str(model_path), "--arch", ARCH])
    assert r.exit_code == 0 and "1/1 verified" in r.output, r.output
    r = CliRunner().invoke(cli, ["scan", str(tmp_path), "--key", str(key_path), "--ledger", str(tmp_path / "l.db")])
    assert r.exit_code != 0 and "--arch" in r.output


def test_claims_refuse_deepsigns_keys_clearly():
    with pytest.raises(TypeError, match="DeepSigns keys are not supported"):
        nnmark.commit(_key())
