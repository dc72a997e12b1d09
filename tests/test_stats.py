"""Exact binomial p-values and thresholds, against exact rational arithmetic."""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import pytest

import nnmark
from nnmark import Verdict, binomial_p_value, binomial_threshold


@functools.lru_cache(maxsize=None)
def _exact_tails(n: int, p0: Fraction) -> tuple[Fraction, ...]:
    """tails[m] = P[X >= m] for m = 0..n+1, X ~ Binomial(n, p0), in exact fractions (math.comb)."""
    # a common denominator: p0 = a/d, so P[X = k] = C(n, k) a^k (d-a)^(n-k) / d^n
    a, d = p0.numerator, p0.denominator
    counts = [math.comb(n, k) * a**k * (d - a) ** (n - k) for k in range(n + 1)]
    tails, acc = [Fraction(0)] * (n + 2), 0
    for k in range(n, -1, -1):
        acc += counts[k]
        tails[k] = Fraction(acc, d**n)
    return tuple(tails)


def exact_sf(m: int, n: int, p0: Fraction) -> Fraction:
    """P[X >= m], X ~ Binomial(n, p0), exactly."""
    return _exact_tails(n, p0)[m]


def exact_threshold(n: int, alpha: Fraction, p0: Fraction) -> int:
    tails = _exact_tails(n, p0)
    return next((m for m in range(n + 1) if tails[m] <= alpha), n + 1)


P0S = {"1/2": Fraction(1, 2), "1/10": Fraction(1, 10), "1/3": Fraction(1, 3)}


@pytest.mark.parametrize("p0name", list(P0S))
@pytest.mark.parametrize("n", [1, 2, 10, 64, 100, 256])
def test_p_value_exact(n, p0name):
    p0 = P0S[p0name]
    ms = sorted({0, 1, n // 3, n // 2, (2 * n) // 3, n - 1, n})
    for m in ms:
        if m < 0:
            continue
        exact = exact_sf(m, n, p0)
        got = binomial_p_value(m, n, float(p0))
        assert isinstance(got, float)
        assert math.isclose(got, float(exact), rel_tol=1e-9, abs_tol=0), (m, n, got, float(exact))


def test_p_value_edges():
    assert binomial_p_value(0, 256) == 1.0
    assert math.isclose(binomial_p_value(256, 256), 2.0**-256, rel_tol=1e-12)
    assert math.isclose(binomial_p_value(1, 1, 0.25), 0.25, rel_tol=1e-12)
    # monotone non-increasing in the match count
    ps = [binomial_p_value(m, 100, 0.1) for m in range(101)]
    assert all(a >= b for a, b in zip(ps, ps[1:]))


@pytest.mark.parametrize("alpha", [1e-6, 1e-3, 0.05, 1e-12])
@pytest.mark.parametrize("p0name", list(P0S))
@pytest.mark.parametrize("n", [1, 5, 20, 64, 100, 256])
def test_threshold_is_smallest_m(n, p0name, alpha):
    p0 = P0S[p0name]
    m = binomial_threshold(n, alpha, float(p0))
    # the library works with the float p0 it was given: so does the exact threshold
    assert m == exact_threshold(n, Fraction(alpha), Fraction(float(p0)))
    if m <= n:
        assert binomial_p_value(m, n, float(p0)) <= alpha
    if m >= 1:
        assert binomial_p_value(m - 1, n, float(p0)) > alpha


def test_reference_cutoffs_from_design():
    # 256 bits at alpha 1e-6 -> 167 matching bits
    assert binomial_threshold(256, 1e-6) == 167
    assert exact_sf(167, 256, Fraction(1, 2)) <= Fraction(1e-6) < exact_sf(166, 256, Fraction(1, 2))
    assert binomial_p_value(166, 256) > 1e-6 >= binomial_p_value(167, 256)
    # 100 triggers over 10 classes -> 28 hits
    assert binomial_threshold(100, 1e-6, 0.1) == 28
    assert exact_sf(28, 100, Fraction(1, 10)) <= Fraction(1e-6) < exact_sf(27, 100, Fraction(1, 10))
    assert binomial_p_value(27, 100, 0.1) > 1e-6 >= binomial_p_value(28, 100, 0.1)


def test_threshold_unreachable():
    # 10 bits can never reach 1e-6 (2^-10 ~ 1e-3): no m works -> n + 1
    assert binomial_threshold(10, 1e-6) == 11
    assert binomial_threshold(19, 1e-6) == 20
    assert binomial_threshold(20, 1e-6) == 20  # 2^-20 < 1e-6


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: binomial_p_value(1, 0), "number of trials must be an integer >= 1"),
        (lambda: binomial_p_value(1, -3), "number of trials"),
        (lambda: binomial_p_value(1, 2.5), "number of trials"),
        (lambda: binomial_p_value(1, 10, 0.0), r"null match probability must be in \(0, 1\)"),
        (lambda: binomial_p_value(1, 10, 1.0), r"null match probability"),
        (lambda: binomial_p_value(1, 10, -0.1), r"null match probability"),
        (lambda: binomial_p_value(1, 10, float("nan")), r"null match probability"),
        (lambda: binomial_p_value(11, 10), r"matches must be in \[0, 10\], got 11"),
        (lambda: binomial_p_value(-1, 10), r"matches must be in \[0, 10\], got -1"),
        (lambda: binomial_threshold(0, 1e-6), "number of trials"),
        (lambda: binomial_threshold(10, 0.0), r"alpha must be in \(0, 1\)"),
        (lambda: binomial_threshold(10, 1.0), r"alpha must be in \(0, 1\)"),
        (lambda: binomial_threshold(10, -1e-6), r"alpha must be in \(0, 1\)"),
        (lambda: binomial_threshold(10, float("nan")), r"alpha must be in \(0, 1\)"),
        (lambda: binomial_threshold(10, 1e-6, 1.5), r"null match probability"),
    ],
)
def test_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_verdict_from_matches():
    v = Verdict.from_matches(170, 256, 1e-6, key_id="abc", source="m.pt")
    assert v.verified and v.matches == 170 and v.bits == 256 and v.status == "ok"
    assert math.isclose(v.ber, 86 / 256)
    assert math.isclose(v.p_value, float(exact_sf(170, 256, Fraction(1, 2))), rel_tol=1e-9)
    assert v.threshold == 167 and v.alpha == 1e-6
    d = v.to_dict()
    assert d["verified"] is True and d["key_id"] == "abc" and d["path"] == "m.pt" and v.source == "m.pt"
    assert not Verdict.from_matches(166, 256, 1e-6).verified
    assert Verdict.from_matches(167, 256, 1e-6).verified
    assert Verdict.from_matches(30, 100, 1e-6, p0=0.1).threshold == 28


def test_verdict_failed():
    v = Verdict.failed("absent", "no such tensor", 256, 1e-6)
    assert not v.verified and v.status == "absent" and v.detail == "no such tensor"
    assert math.isnan(v.p_value) and math.isnan(v.ber) and v.threshold == 167
    with pytest.raises(ValueError, match="non-ok status"):
        Verdict.failed("ok", "", 256, 1e-6)
    with pytest.raises(ValueError, match="non-ok status"):
        Verdict.failed("weird", "", 256, 1e-6)


def test_exported():
    assert nnmark.binomial_p_value is binomial_p_value and nnmark.binomial_threshold is binomial_threshold
