"""Verdict statistics: exact one-sided binomial tests.

Under the null hypothesis (the model does not carry this key) each extracted
bit matches the owner's bit with probability 1/2 (each trigger label with about
1/num_classes). A verdict reports the matches, the exact p-value
P[Binomial(n, p0) >= matches] and the fewest matches that verify at alpha.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy.stats import binom

STATUSES = ("ok", "absent", "invalid", "corrupt", "unsafe", "unsupported", "io_error")


def _check(n: int, p0: float) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"number of trials must be an integer >= 1, got {n!r}")
    if not (0.0 < p0 < 1.0):
        raise ValueError(f"null match probability must be in (0, 1), got {p0!r}")


def binomial_p_value(matches: int, n: int, p0: float = 0.5) -> float:
    """Exact P[X >= matches] for X ~ Binomial(n, p0)."""
    _check(n, p0)
    if not (0 <= matches <= n):
        raise ValueError(f"matches must be in [0, {n}], got {matches}")
    if matches == 0:
        return 1.0
    return float(binom.sf(matches - 1, n, p0))


def binomial_threshold(n: int, alpha: float, p0: float = 0.5) -> int:
    """Fewest matches m with P[X >= m] <= alpha; n + 1 if even n matches are not enough."""
    _check(n, p0)
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    m = int(binom.isf(alpha, n, p0)) + 1 if math.isfinite(binom.isf(alpha, n, p0)) else n + 1
    # isf works in floating point: settle the integer boundary exactly.
    m = max(0, min(m, n + 1))
    while m > 0 and binomial_p_value(m - 1, n, p0) <= alpha:
        m -= 1
    while m <= n and binomial_p_value(m, n, p0) > alpha:
        m += 1
    return m


@dataclass
class Verdict:
    """One watermark check of one model.

    ``verified``: the mark is present at significance ``alpha``; ``matches`` of
    ``bits`` agree (bits or trigger labels); ``ber``: bit error rate;
    ``p_value``: exact one-sided binomial p-value; ``threshold``: fewest matches
    that verify; ``status``: ``ok`` or why the check could not be made, with
    ``detail`` saying more.
    """

    verified: bool
    matches: int
    bits: int
    ber: float
    p_value: float
    threshold: int
    status: str = "ok"
    detail: str = ""
    alpha: float = 1e-6
    key_id: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_matches(cls, matches: int, n: int, alpha: float, p0: float = 0.5, **kw) -> "Verdict":
        p = binomial_p_value(matches, n, p0)
        return cls(verified=p <= alpha, matches=int(matches), bits=int(n), ber=1.0 - matches / n,
                   p_value=p, threshold=binomial_threshold(n, alpha, p0), alpha=alpha, **kw)

    @classmethod
    def failed(cls, status: str, detail: str, n: int, alpha: float, p0: float = 0.5, **kw) -> "Verdict":
        """A check that could not be made: never verified."""
        if status not in STATUSES or status == "ok":
            raise ValueError(f"failed verdict needs a non-ok status from {STATUSES}, got {status!r}")
        return cls(verified=False, matches=0, bits=int(n), ber=float("nan"), p_value=float("nan"),
                   threshold=binomial_threshold(n, alpha, p0), status=status, detail=detail, alpha=alpha, **kw)
