"""White-box keys: construction, message bits, key files (mode, checksum, versions),
and secrecy (no secret in reprs or reports, no pickling)."""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

import _spec
import nnmark
from nnmark import KeyFileError, WhiteBoxKey, load_key


def _key(rng, carrier="features.3.weight", n=64, reduction="filter_mean", **kw) -> tuple[WhiteBoxKey, bytes]:
    secret = rng.bytes(32)
    return WhiteBoxKey(secret, carrier, rng.integers(0, 2, n), reduction, **kw), secret


def _rewrite(path, body: dict, resign: bool = False) -> None:
    """Write ``body`` as key.save does; with ``resign``, recompute the checksum like keys.py does:
    SHA-256 over the canonical JSON (sorted keys, no spaces) of every field but ``checksum``."""
    if resign:
        rest = {k: v for k, v in body.items() if k != "checksum"}
        body = {**body, "checksum": hashlib.sha256(
            json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()}
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- construction
def test_generate_random_bits():
    key = WhiteBoxKey.generate(carrier="features.3.weight", bits=256, reduction="filter_mean", message=None)
    assert key.carrier == "features.3.weight" and key.reduction == "filter_mean"
    assert key.num_bits == 256 and len(key) == 256
    b = key.bits
    assert b.dtype == torch.uint8 and b.shape == (256,) and set(b.unique().tolist()) <= {0, 1}
    assert 60 < int(b.sum()) < 196  # random bits: P(outside) < 1e-15
    other = WhiteBoxKey.generate(carrier="features.3.weight", bits=256)
    assert other.key_id != key.key_id and other.subkey() != key.subkey()
    assert not torch.equal(other.bits, key.bits)
    assert key != other


def test_construct_from_secret(rng):
    secret = rng.bytes(32)
    bits = rng.integers(0, 2, 100).tolist()
    key = WhiteBoxKey(secret=secret, carrier="fc.weight", bits=bits, reduction="flat")
    assert key.bits.tolist() == bits
    assert key.carrier == "fc.weight" and key.reduction == "flat" and key.num_bits == 100
    assert key.subkey() == _spec.subkey(secret, "fc.weight")
    # bits as a tensor, a numpy array or a bytearray secret: the same key
    same = WhiteBoxKey(bytearray(secret), "fc.weight", torch.tensor(bits, dtype=torch.uint8), "flat")
    assert same == key
    assert WhiteBoxKey(secret, "fc.weight", np.array(bits, dtype=np.int64), "flat") == key
    assert WhiteBoxKey(secret, "fc.weight", [1 - b for b in bits], "flat") != key
    assert WhiteBoxKey(secret, "fc.bias", bits, "flat") != key


def test_bits_property_is_a_copy(rng):
    key, _ = _key(rng)
    b = key.bits
    b[:] = 1 - b
    assert not torch.equal(key.bits, b)


def test_message_bits(rng):
    k1 = WhiteBoxKey.generate(carrier="c.weight", bits=256, message="ACME Corp, model v3")
    k2 = WhiteBoxKey.generate(carrier="c.weight", bits=256, message="ACME Corp, model v3")
    expected = nnmark.message_bits("ACME Corp, model v3", 256)
    assert torch.equal(k1.bits, torch.from_numpy(expected)) and torch.equal(k2.bits, k1.bits)
    assert k1.key_id != k2.key_id  # same bits, fresh secrets
    # deterministic, prefix-consistent, bytes == UTF-8 str, different messages differ
    np.testing.assert_array_equal(nnmark.message_bits("ACME Corp, model v3", 256), expected)
    np.testing.assert_array_equal(nnmark.message_bits("ACME Corp, model v3", 100), expected[:100])
    np.testing.assert_array_equal(nnmark.message_bits("ACME Corp, model v3".encode(), 256), expected)
    assert not np.array_equal(nnmark.message_bits("ACME Corp, model v4", 256), expected)
    # as documented: the first n bits, MSB first, of SHAKE-256(b"nnmark:message:v1:" + message)
    digest = hashlib.shake_256(b"nnmark:message:v1:" + "Grüße".encode("utf-8")).digest(13)
    manual = [(byte >> (7 - k)) & 1 for byte in digest for k in range(8)][:100]
    assert nnmark.message_bits("Grüße", 100).tolist() == manual
    with pytest.raises(ValueError, match="message must be a non-empty"):
        nnmark.message_bits("", 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(secret=b"x" * 31), r"secret must be 32 bytes, got 31 bytes"),
        (dict(secret=b"x" * 33), r"secret must be 32 bytes, got 33 bytes"),
        (dict(secret=b""), r"secret must be 32 bytes, got 0 bytes"),
        (dict(secret="x" * 32), r"secret must be 32 bytes, got str"),
        (dict(bits=[0, 1, 2, 1] * 8), r"bits must contain only 0 and 1, found \[2"),
        (dict(bits=[0, 1, -1, 1] * 8), r"bits must contain only 0 and 1"),
        (dict(bits=[]), r"bits must be a non-empty 1-D"),
        (dict(bits=[[0, 1]] * 16), r"bits must be a non-empty 1-D"),
        (dict(carrier=""), r"carrier must be a non-empty"),
        (dict(carrier=None), r"carrier must be a non-empty"),
        (dict(reduction="mean"), r"reduction must be one of \['filter_mean', 'flat'\], got 'mean'"),
        (dict(shape=(3, 0)), r"shape must be a non-empty tuple of positive sizes"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    args = dict(secret=b"\x01" * 32, carrier="c.weight", bits=[0, 1] * 16, reduction="filter_mean", **{})
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        WhiteBoxKey(**args)


def test_bits_as_text_refused():
    with pytest.raises(TypeError, match="message="):
        WhiteBoxKey(b"\x01" * 32, "c.weight", "0101" * 8)


@pytest.mark.parametrize("bits", [0, -5, 2.5, True, "256"])
def test_generate_bad_bit_count(bits):
    with pytest.raises(ValueError, match="bits must be a positive int"):
        WhiteBoxKey.generate(carrier="c.weight", bits=bits)


def test_generate_bad_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        WhiteBoxKey.generate(carrier="c.weight", bits=64, reduction="max")


def test_few_bits_warn(rng):
    with pytest.warns(UserWarning, match="can never verify"):
        WhiteBoxKey(rng.bytes(32), "c.weight", [0, 1] * 5)


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path, rng):
    key, secret = _key(rng, n=256, shape=(64, 64, 3, 3))
    path = key.save(tmp_path / "owner.key")
    assert path == tmp_path / "owner.key"
    back = load_key(path)
    assert isinstance(back, WhiteBoxKey)
    assert back == key
    assert back.subkey() == key.subkey() == _spec.subkey(secret, key.carrier)
    assert torch.equal(back.bits, key.bits)
    assert (back.carrier, back.reduction, back.key_id, back.shape) == (key.carrier, key.reduction, key.key_id,
                                                                       (64, 64, 3, 3))
    w = torch.randn(64, 64, 3, 3)
    assert torch.equal(back.project(w), key.project(w))
    # str paths work too, and nothing but the key file is left behind
    assert load_key(str(path)) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.key"]


def test_key_file_mode_is_0600(tmp_path, rng):
    key, _ = _key(rng)
    old = os.umask(0)  # even under a permissive umask
    try:
        path = key.save(tmp_path / "a.key")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    # overwriting a world-readable older key file leaves it 0600 as well
    other = tmp_path / "b.key"
    key.save(other)
    os.chmod(other, 0o644)
    key.save(other)
    assert os.stat(other).st_mode & 0o777 == 0o600
    assert load_key(other) == key


def test_save_refuses_to_overwrite_a_non_key_file(tmp_path, rng):
    """keys.py documents: save() 'Refuses to overwrite a non-key file.'"""
    key, _ = _key(rng)
    precious = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, precious)
    before = precious.read_bytes()
    with pytest.raises((FileExistsError, ValueError)):
        key.save(precious)
    assert precious.read_bytes() == before


@pytest.mark.parametrize("field", ["bits", "carrier", "secret", "reduction", "num_bits", "shape"])
def test_tampered_file_fails_checksum(tmp_path, rng, field):
    key, secret = _key(rng, shape=(8, 4, 3, 3))
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())
    if field == "bits":
        s = body["bits"]
        body["bits"] = s[:10] + ("1" if s[10] == "0" else "0") + s[11:]  # one bit flipped
    elif field == "carrier":
        body["carrier"] = "features.4.weight"
    elif field == "secret":
        body["secret"] = bytes([secret[0] ^ 0x80]).hex() + body["secret"][2:]
    elif field == "reduction":
        body["reduction"] = "flat"
    elif field == "num_bits":
        body["num_bits"] = 63
    else:
        body["shape"] = [8, 4, 3, 4]
    _rewrite(path, body)
    with pytest.raises(KeyFileError, match="checksum"):
        load_key(path)


def test_tampered_bytes_fail(tmp_path, rng):
    """An in-place edit of one character of the bit string, as an editor would do it."""
    key, _ = _key(rng)
    path = key.save(tmp_path / "k.key")
    text = path.read_text()
    i = text.index('"bits": "') + len('"bits": "') + 5
    path.write_text(text[:i] + ("1" if text[i] == "0" else "0") + text[i + 1:])
    with pytest.raises(KeyFileError, match="checksum"):
        load_key(path)


def test_resigned_edit_is_read(tmp_path, rng):
    """Control for the version test: re-signing an edit the way keys.py does gives a valid file."""
    key, _ = _key(rng)
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())
    body["carrier"] = "features.9.weight"
    _rewrite(path, body, resign=True)
    back = load_key(path)
    assert back.carrier == "features.9.weight" and back.key_id == key.key_id


def test_resigned_secret_change_fails_key_id(tmp_path, rng):
    key, secret = _key(rng)
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())
    body["secret"] = bytes(b ^ 0xFF for b in secret).hex()
    _rewrite(path, body, resign=True)
    with pytest.raises(KeyFileError, match="key_id does not match"):
        load_key(path)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_version(tmp_path, rng, version):
    key, _ = _key(rng)
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())
    body["version"] = version
    _rewrite(path, body, resign=True)  # a valid checksum: only the version check can refuse it
    with pytest.raises(KeyFileError, match=rf"version {version!r}"):
        load_key(path)


def test_unknown_format_and_kind(tmp_path, rng):
    key, _ = _key(rng)
    path = key.save(tmp_path / "k.key")
    body = json.loads(path.read_text())
    _rewrite(path, {**body, "format": "other-tool"}, resign=True)
    with pytest.raises(KeyFileError, match="not an nnmark key file"):
        load_key(path)
    _rewrite(path, {**body, "kind": "blackbox-v9"}, resign=True)
    with pytest.raises(KeyFileError, match="unknown kind"):
        load_key(path)
    _rewrite(path, {k: v for k, v in body.items() if k != "secret"}, resign=True)
    with pytest.raises(KeyFileError, match="malformed"):
        load_key(path)


def test_truncated_file(tmp_path, rng):
    key, _ = _key(rng)
    path = key.save(tmp_path / "k.key")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(KeyFileError, match="truncated|not valid"):
        load_key(path)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"this is not json", "not valid key JSON"),
        (b"\x80\x04\x95garbage\xff\xfe", "not valid key JSON"),
        (b"[1, 2, 3]", "not an nnmark key file"),
        (b'{"format": "nnmark-key"}', "version None"),
    ],
    ids=["empty", "blank", "text", "binary", "list", "no-version"],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match):
        load_key(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_key(tmp_path)
    assert issubclass(KeyFileError, ValueError)


def test_dense_key_round_trip_and_tamper(tmp_path, rng):
    X = rng.standard_normal((48, 20))
    key = nnmark.DenseKey(X, "fc.weight", rng.integers(0, 2, 48), "filter_mean", order="torch")
    path = key.save(tmp_path / "d.key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    back = load_key(path)
    assert isinstance(back, nnmark.DenseKey)
    assert torch.equal(back.matrix, key.matrix) and torch.equal(back.bits, key.bits)
    assert (back.carrier, back.reduction, back.order, back.key_id) == (key.carrier, key.reduction, "torch", key.key_id)
    w = torch.randn(7, 20)
    assert torch.equal(back.project(w), key.project(w))
    body = json.loads(path.read_text())
    m = bytearray(base64.b64decode(body["matrix"]))
    m[5] ^= 0x01
    body["matrix"] = base64.b64encode(bytes(m)).decode("ascii")
    _rewrite(path, body)
    with pytest.raises(KeyFileError, match="checksum"):
        load_key(path)


# ---------------------------------------------------------------------------- secrecy
def test_secret_never_shown(tmp_path, rng):
    key, secret = _key(rng, carrier="conv.weight", n=64)
    hexes = [secret.hex(), secret.hex().upper()]
    texts = [repr(key), str(key), f"{key}", repr([key]), repr(nnmark.Uchida(key))]
    key2 = WhiteBoxKey(secret, "0.weight", rng.integers(0, 2, 64))
    verdict = nnmark.verify(key2, {"0.weight": torch.randn(3, 2, 3, 3)})
    texts += [json.dumps(verdict.to_dict(), default=str), repr(verdict), str(verdict)]
    for t in texts:
        for h in hexes:
            assert h not in t
        assert secret.hex()[:16] not in t
        for word in (*key.subkey(), *key2.subkey()):  # the subkey is secret too
            assert str(word) not in t and f"{word:08x}" not in t
    assert key.key_id in repr(key)
    assert verdict.to_dict()["key_id"] == key2.key_id
    # the key id is a one-way fingerprint, not a piece of the secret
    assert key.key_id not in secret.hex()


def test_keys_refuse_pickling(rng):
    key, _ = _key(rng)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        pickle.dumps({"model": {"w": torch.ones(2)}, "key": key})
    with pytest.raises(TypeError):
        copy.deepcopy(key)
    with pytest.raises(TypeError):
        copy.copy(key)
    with pytest.raises(TypeError):  # never stored inside a checkpoint
        torch.save({"state_dict": {}, "key": key}, io.BytesIO())
    dense = nnmark.DenseKey(np.ones((32, 4)), "fc.weight", [0, 1] * 16, "flat")
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(dense)


def test_keys_are_unhashable(rng):
    key, _ = _key(rng)
    with pytest.raises(TypeError):
        hash(key)
