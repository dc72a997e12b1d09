"""Key forging (nnmark.attacks.forge_key) and the op it searches with
(nnmark.ops.keyed_projection_many_keys): a key made after the fact for a model that was
never marked verifies, and the many-key projection equals the single-key one."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nnmark
from conftest import ISAS, num_threads, requires_cuda, use_isa
from nnmark import _C_cpu, _reference
from nnmark.attacks import ForgeRecord, forge_key
from nnmark.keys import projection_subkeys
from nnmark.demo import CARRIER, load_digits_split, train
from nnmark.ops import keyed_projection_many_keys
from nnmark.stats import FORGE_BUDGET_TRIES, binomial_p_value, binomial_threshold, forge_tries, forge_warning


def _subkeys(rng, K: int) -> np.ndarray:
    return rng.integers(0, 2**32, size=(K, 2), dtype=np.uint64).astype(np.uint32)


# ---------------------------------------------------------------------------- the many-key op
@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("N,T,K", [(1, 1, 1), (144, 16, 5), (144, 64, 300), (300, 100, 7), (257, 128, 3),
                                   (1000, 200, 4), (70, 300, 2)])
def test_many_keys_equals_single_key_calls(isa_name, N, T, K, rng):
    w = torch.from_numpy(rng.standard_normal(N))
    sk = _subkeys(rng, K)
    with use_isa(isa_name):
        with num_threads(2):  # keys split over threads: each row still its own key's
            many = keyed_projection_many_keys(w, sk, T)
        with num_threads(1):  # the single-key op on one thread sums in the same order
            single = torch.stack([nnmark.keyed_projection(w, (int(a), int(b)), T) for a, b in sk])
    assert many.dtype == torch.float64 and many.shape == (K, T)
    assert torch.equal(many, single)
    ref = _reference.projection_many_keys(w.numpy(), sk[:3], T)  # the spec, in numpy
    np.testing.assert_allclose(many[:3].numpy(), ref, rtol=0, atol=1e-9 * math.sqrt(N))


def test_many_keys_on_a_carrier_the_single_key_op_splits(rng):
    """A long carrier: the single-key op sums per thread range, this op per key -- the bits
    agree and the projections to rounding."""
    N, T = 60_000, 150
    w = torch.from_numpy(rng.standard_normal(N))
    sk = _subkeys(rng, 3)
    with num_threads(2):
        many = keyed_projection_many_keys(w, sk, T)
        single = torch.stack([nnmark.keyed_projection(w, (int(a), int(b)), T) for a, b in sk])
    torch.testing.assert_close(many, single, rtol=0, atol=1e-9 * math.sqrt(N))
    assert torch.equal(many > 0, single > 0)


def test_many_keys_widens_other_dtypes_exactly(rng):
    w32 = torch.from_numpy(rng.standard_normal(200).astype(np.float32))
    sk = _subkeys(rng, 4)
    for w in (w32, w32.half(), w32.bfloat16(), w32.numpy()):
        t = torch.as_tensor(w)
        ref = keyed_projection_many_keys(t.double(), sk, 70)
        assert torch.equal(keyed_projection_many_keys(w, sk, 70), ref)
    # subkeys as int64 torch, a list of pairs, or uint32 numpy: the same
    lists = [[int(a), int(b)] for a, b in sk]
    base = keyed_projection_many_keys(w32, sk, 70)
    assert torch.equal(keyed_projection_many_keys(w32, torch.from_numpy(sk.astype(np.int64)), 70), base)
    assert torch.equal(keyed_projection_many_keys(w32, lists, 70), base)


@pytest.mark.parametrize("w,sk,bits,exc,match", [
    (torch.zeros(2, 8), [[1, 2]], 8, ValueError, "one non-empty vector"),
    (torch.zeros(0), [[1, 2]], 8, ValueError, "one non-empty vector"),
    (torch.zeros(8, dtype=torch.int32), [[1, 2]], 8, TypeError, "float32, float64"),
    ("abc", [[1, 2]], 8, TypeError, "torch tensor, numpy array"),
    (torch.zeros(8), [[1, 2, 3]], 8, ValueError, r"\[K, 2\]"),
    (torch.zeros(8), [1, 2], 8, ValueError, r"\[K, 2\]"),
    (torch.zeros(8), np.zeros((0, 2), dtype=np.uint32), 8, ValueError, "K >= 1"),
    (torch.zeros(8), [[1.5, 2.0]], 8, TypeError, "integers"),
    (torch.zeros(8), [[-1, 2]], 8, ValueError, r"\[0, 2\^32\)"),
    (torch.zeros(8), [[2**32, 2]], 8, ValueError, r"\[0, 2\^32\)"),
    (torch.zeros(8), [[1, 2]], 0, ValueError, "bits must be an integer >= 1"),
    (torch.zeros(8), [[1, 2]], 2.5, ValueError, "bits must be an integer >= 1"),
    (torch.zeros(8), [[1, 2]], True, ValueError, "bits must be an integer >= 1"),
])
def test_many_keys_bad_input(w, sk, bits, exc, match):
    with pytest.raises(exc, match=match):
        keyed_projection_many_keys(w, sk, bits)


def test_many_keys_native_checks():
    w = torch.zeros(8, dtype=torch.float64)
    sk = np.zeros((1, 2), dtype=np.uint32)
    p = torch.empty(1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="number of keys K"):
        _C_cpu.projection_many_keys(w.data_ptr(), sk.ctypes.data, 0, 8, 8, p.data_ptr())
    with pytest.raises(ValueError, match="bit count T"):
        _C_cpu.projection_many_keys(w.data_ptr(), sk.ctypes.data, 1, 8, 0, p.data_ptr())
    with pytest.raises(ValueError, match="null data pointer"):
        _C_cpu.projection_many_keys(0, sk.ctypes.data, 1, 8, 8, p.data_ptr())


@requires_cuda
def test_many_keys_refuses_cuda():
    with pytest.raises(ValueError, match="CPU only"):
        keyed_projection_many_keys(torch.zeros(8, device="cuda"), [[1, 2]], 8)


def test_projection_subkeys_match_the_key_spec(rng):
    secrets = rng.bytes(32 * 5)
    for carrier in ("features.2.weight", "blöck.0.wéight"):
        got = projection_subkeys(secrets, carrier)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = [nnmark.WhiteBoxKey(secrets[32 * i:32 * i + 32], carrier, [1] * 8).subkey() for i in range(5)]
        assert got.dtype == np.uint32 and got.tolist() == [list(w) for w in want]
    with pytest.raises(ValueError, match="multiple of 32 bytes, got 33 bytes"):
        projection_subkeys(b"x" * 33, "c")


# ---------------------------------------------------------------------------- forging
@pytest.fixture(scope="module")
def unmarked():
    """A DigitsNet trained 2 epochs on the digits, never marked."""
    return train(load_digits_split(0), seed=0, epochs=2)


def test_free_bits_forge_in_one_try(unmarked):
    rec = forge_key(unmarked, CARRIER, bits=64, alpha=1e-6)
    assert isinstance(rec, ForgeRecord) and rec.mode == "free-bits"
    assert rec.found and rec.tries == 1 and rec.matches == 64 and rec.expected_tries == 1.0
    assert rec.key.num_bits == 64 and rec.key.carrier == CARRIER and rec.key.shape == (32, 16, 3, 3)
    v = nnmark.verify(rec.key, unmarked, alpha=1e-6)
    assert v.verified and v.matches == 64 and v.key_id == rec.key_id


def test_message_bits_forge_verifies_within_bounded_tries(unmarked, tmp_path):
    T, alpha = 16, 1e-2
    rec = forge_key(unmarked, CARRIER, bits=T, alpha=alpha, message="ACME Corp, model v3", max_tries=200_000,
                    seconds=None, seed=0)
    assert rec.mode == "message" and rec.found and 1 <= rec.tries <= 200_000
    thr = binomial_threshold(T, alpha)
    assert rec.threshold == thr and rec.matches >= thr and rec.p_value <= alpha
    assert rec.expected_tries == pytest.approx(1 / binomial_p_value(thr, T))
    assert rec.key.bits.tolist() == nnmark.message_bits("ACME Corp, model v3", T).tolist()
    v = nnmark.verify(rec.key, unmarked, alpha=alpha)
    assert v.verified and v.matches == rec.matches
    # the same key on the model's checkpoint file and state dict
    path = tmp_path / "m.safetensors"
    save_file({k: t.contiguous() for k, t in unmarked.state_dict().items()}, str(path))
    assert all(x.verified for x in nnmark.verify(rec.key, [str(path), unmarked.state_dict()], alpha=alpha))
    # a seeded search is reproducible; the record never holds the secret
    again = forge_key(unmarked, CARRIER, bits=T, alpha=alpha, message="ACME Corp, model v3", max_tries=200_000,
                      seconds=None, seed=0)
    assert (again.key_id, again.tries) == (rec.key_id, rec.tries)
    secret = rec.key._secret.hex()
    assert secret not in repr(rec) and secret not in json.dumps(rec.to_dict())


def test_a_search_from_a_checkpoint_path_and_fixed_target_bits(unmarked, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {"model." + k: v for k, v in unmarked.state_dict().items()}}, path)  # Lightning-like
    target = np.ones(16, dtype=np.uint8)
    rec = forge_key(str(path), CARRIER, bits=16, alpha=1e-2, target_bits=target, max_tries=200_000, seed=1)
    assert rec.mode == "target-bits" and rec.found and rec.key.bits.tolist() == target.tolist()
    assert nnmark.verify(rec.key, str(path), alpha=1e-2).verified


def test_a_search_out_of_reach_stops_at_its_budget(unmarked):
    rec = forge_key(unmarked, CARRIER, bits=256, alpha=1e-12, message="ACME", max_tries=5000, seconds=None, seed=2)
    assert not rec.found and rec.key is None and rec.key_id == "" and rec.tries == 5000
    assert rec.matches < rec.threshold and rec.expected_tries > 1e11
    rec = forge_key(unmarked, CARRIER, bits=256, alpha=1e-12, message="ACME", max_tries=None, seconds=0.05,
                    batch=256, seed=3)
    assert not rec.found and rec.tries >= 256 and rec.tries % 256 == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 16, "alpha": 1e-6, "message": "m"}, "can never verify at alpha=1e-06"),
    ({"bits": 16, "alpha": 1e-6}, "can never verify"),
    ({"message": "m", "target_bits": [0] * 64}, "not both"),
    ({"message": ""}, "non-empty"),
    ({"target_bits": [0, 1, 2] + [0] * 61}, "target_bits must be 64 values of 0 or 1"),
    ({"target_bits": [0] * 63}, "target_bits must be 64 values"),
    ({"max_tries": None, "seconds": None, "message": "m"}, "must stop"),
    ({"max_tries": 0}, "max_tries must be an int >= 1"),
    ({"seconds": -1.0}, "seconds must be a positive finite number"),
    ({"batch": 0}, "batch must be an int >= 1"),
    ({"bits": 0}, "bits must be an int >= 1"),
    ({"alpha": 0.0}, "alpha must be in"),
    ({"reduction": "mean"}, "reduction must be one of"),
    ({"seed": -1}, "seed must be an int >= 0"),
])
def test_forge_bad_arguments(unmarked, kwargs, match):
    with pytest.raises(ValueError, match=match):
        forge_key(unmarked, CARRIER, **kwargs)


def test_forge_bad_sources(unmarked):
    with pytest.raises(ValueError, match="absent"):
        forge_key(unmarked, "no.such.weight", bits=64)
    with pytest.raises(ValueError, match="carrier must be a non-empty"):
        forge_key(unmarked, "", bits=64)
    with pytest.raises(ValueError, match="unsupported"):
        forge_key(42, CARRIER, bits=64)
    bad = {k: v.clone() for k, v in unmarked.state_dict().items()}
    bad[CARRIER][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        forge_key(bad, CARRIER, bits=16, alpha=1e-2, message="m")


# ---------------------------------------------------------------------------- the cost and the warning
def test_forge_tries_is_the_inverse_tail_at_the_threshold():
    assert forge_tries(64, 1e-6) == pytest.approx(1 / binomial_p_value(51, 64))
    assert forge_tries(16, 1e-6) == math.inf
    assert forge_tries(64, 1e-19) == pytest.approx(2.0 ** 64)
    assert forge_tries(64, 1e-6, threshold=60) == pytest.approx(1 / binomial_p_value(60, 64))
    for bits, alpha in ((32, 1e-3), (256, 1e-6), (1024, 1e-20)):
        assert forge_tries(bits, alpha) >= 1 / alpha  # the threshold's tail is at most alpha
    assert "2^20.0" in forge_warning(64, 1e-6) and "commitment" in forge_warning(64, 1e-6)
    assert forge_warning(256, 1e-30) is None and forge_warning(16, 1e-6) is None  # out of reach, never verifies
    assert forge_warning(64, 1e-6, budget=1e6) is None
    assert FORGE_BUDGET_TRIES == 2 ** 50


def test_cli_verify_warns_when_a_forging_search_is_within_reach(unmarked, tmp_path):
    from click.testing import CliRunner

    from nnmark.cli import cli

    save_file({k: t.contiguous() for k, t in unmarked.state_dict().items()}, str(tmp_path / "m.safetensors"))
    rec = forge_key(unmarked, CARRIER, bits=64, alpha=1e-6)  # a key that verifies: exit 0
    rec.key.save(tmp_path / "forged.key")
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "forged.key"), str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    assert "within reach of a forging search" in r.output and "2^20.0 tries" in r.output
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "forged.key"), str(tmp_path / "m.safetensors"), "--json"])
    assert r.exit_code == 0 and [json.loads(line)["verified"] for line in r.output.splitlines()] == [True]
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "forged.key"), str(tmp_path / "m.safetensors"),
                                 "--alpha", "1e-19"])
    assert r.exit_code == 0 and "forging" not in r.output  # 64 of 64 at 1e-19: 2^64 tries, beyond the budget
