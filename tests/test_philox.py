"""Philox4x32-10: the known answers of DESIGN.md §4, native vs the independent spec."""
from __future__ import annotations

import numpy as np
import pytest

import _spec
import nnmark


@pytest.mark.parametrize("counter,key,expected", _spec.KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_known_answers_native(counter, key, expected):
    out = nnmark.philox4x32_10(counter, key)
    assert tuple(int(v) for v in out) == expected, [f"{v:08x}" for v in out]


@pytest.mark.parametrize("counter,key,expected", _spec.KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_known_answers_spec(counter, key, expected):
    assert _spec.philox_scalar(counter, key) == expected
    vec = _spec.philox_vec(*(np.array([c]) for c in counter), *key)
    assert tuple(int(v) for v in vec[:, 0]) == expected


def test_native_matches_spec_on_random_inputs(rng):
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(64, 2), dtype=np.uint64)
    for c, k in zip(counters, keys):
        c, k = [int(v) for v in c], [int(v) for v in k]
        assert tuple(nnmark.philox4x32_10(c, k)) == _spec.philox_scalar(c, k)


def test_vectorised_spec_matches_scalar_spec(rng):
    c = rng.integers(0, 2**32, size=(4, 50), dtype=np.uint64)
    k0, k1 = (int(v) for v in rng.integers(0, 2**32, size=2, dtype=np.uint64))
    vec = _spec.philox_vec(*c, k0, k1)
    for n in range(50):
        assert tuple(int(v) for v in vec[:, n]) == _spec.philox_scalar(c[:, n], (k0, k1))


def test_accepts_numpy_and_list_words():
    counter, key, expected = _spec.KNOWN_ANSWERS[2]
    out = nnmark.philox4x32_10(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint64))
    assert tuple(out) == expected
    assert tuple(nnmark.philox4x32_10(list(counter), list(key))) == expected


@pytest.mark.parametrize(
    "counter,key",
    [
        ((0, 0, 0), (0, 0)),  # counter too short
        ((0, 0, 0, 0, 0), (0, 0)),  # counter too long
        ((0, 0, 0, 0), (0,)),  # key too short
        ((0, 0, 0, 0), (0, 0, 0)),  # key too long
        ((0, -1, 0, 0), (0, 0)),  # negative counter word
        ((0, 0, 0, 0), (-5, 0)),  # negative key word
        ((0, 0, 2**32, 0), (0, 0)),  # counter word too large
        ((0, 0, 0, 0), (0, 2**32)),  # key word too large
        ((2**64, 0, 0, 0), (0, 0)),
    ],
)
def test_bad_inputs_raise(counter, key):
    with pytest.raises(ValueError, match=r"philox4x32_10 expects 4 counter and 2 key words"):
        nnmark.philox4x32_10(counter, key)
