"""Verdict statistics: exact one-sided binomial tests.

Under the null hypothesis (the model does not carry this key) each extracted
bit matches the owner's bit with probability 1/2 (each trigger label with about
1/num_classes). A verdict reports the matches, the exact p-value
P[Binomial(n, p0) >= matches] and the fewest matches that verify at alpha.
"""
from __future__ import annotations

import math
from typing import Any

from scipy.stats import binom

from .rows import FIELDS, STATUSES, TIMING_FIELDS


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


# Below this many expected key tries, `nnmark verify` warns that a verdict's bits and alpha are
# within reach of a forging search (nnmark.attacks.forge_key). 2^50 ~ 1.1e15 tries: at the
# ~1.3 CPU-microseconds a try costs in benchmarks/bench_forge.py, about 46 core-years, a
# thousand rented cores for two to three weeks; see benchmarks/RESULTS.md.
FORGE_BUDGET_TRIES = 2 ** 50


def forge_tries(bits: int, alpha: float, threshold: int | None = None) -> float:
    """Expected number of random keys a forger tries before one verifies at ``alpha``.

    A key whose owner bits are fixed in advance (derived from a message, or given) and
    whose secret is random matches a model it was never embedded in like ``bits`` fair
    coins (for a fixed carrier, X and -X are equally likely), so each try verifies with
    probability q = P[Binomial(bits, 1/2) >= threshold], the threshold
    :func:`binomial_threshold` gives at ``alpha`` (q <= alpha), or ``threshold`` when a
    verdict used another one (a calibrated null). Returns 1/q, or ``inf`` when even
    ``bits`` matches cannot verify. An adversary who tries 2^k keys succeeds with
    probability about min(1, 2^k q): demand alpha far below 2^-k. (With free owner bits a
    forger needs one try whatever bits and alpha are: only a commitment made before the
    dispute defends.)
    """
    m = binomial_threshold(bits, alpha) if threshold is None else int(threshold)
    return math.inf if m > bits else 1.0 / binomial_p_value(max(m, 0), bits)


def forge_warning(bits: int, alpha: float, budget: float = FORGE_BUDGET_TRIES,
                  threshold: int | None = None) -> str | None:
    """The warning `nnmark verify` prints when a forging search would reach ``alpha`` (or
    ``threshold`` matches) with ``bits`` owner bits in fewer than ``budget`` expected tries;
    None otherwise."""
    tries = forge_tries(bits, alpha, threshold)
    if not tries < budget:
        return None
    return (f"{bits} bits at alpha {alpha:g} are within reach of a forging search: a key made for this model "
            f"after the fact (random secrets, bits from a message) verifies after about 2^{math.log2(tries):.1f} "
            f"tries (forging budget 2^{math.log2(budget):g}); against an adversary who can try 2^k keys demand "
            f"alpha far below 2^-k, and with free owner bits only a commitment made before release counts "
            f"(see 'Which alpha to demand' in the README)")


def _open_unit(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return v


def check_alpha(alpha) -> float:
    """``alpha`` as a float in (0, 1), else ValueError."""
    return _open_unit("alpha", alpha)


def check_null_rate(null_rate) -> float:
    """``null_rate`` as a float in (0, 1), else ValueError."""
    return _open_unit("null_rate", null_rate)


ROW_FIELDS = FIELDS
_NAN_WHEN_MISSING = ("ber", "p_value")


class Verdict:
    """One watermark check of one source: a view of the result row that ``nnmark.scan``
    writes to its ledger, with the same field names, statuses and error classes.

    ``verified``: the mark is present at significance ``alpha``; ``matches`` of
    ``bits`` agree (bits or trigger labels); ``ber``: bit error rate; ``p_value``:
    exact one-sided binomial p-value; ``threshold``: fewest matches that verify;
    ``status``: ``ok`` or why the check could not be made (``error_class``,
    ``error_message``). Every row field is an attribute (``path``, ``format``,
    ``carrier``, ``carrier_sha256``, ``bytes_read``, ...); ``ber`` and ``p_value``
    are NaN when the check could not be made (the row holds None). ``source`` and
    ``detail`` are the row's ``path`` and ``error_message`` (``""`` when none).
    ``to_dict()`` is the row. ``extra``: what a key kind reports beside the row
    (trigger keys: the mean logit ``margin`` and the ``null_rate`` used).
    """

    __slots__ = ("row", "extra")

    def __init__(self, row: dict[str, Any], extra: dict[str, Any] | None = None):
        missing = [f for f in ("status", "verified", "bits", "alpha") if f not in row]
        if missing:
            raise ValueError(f"a verdict row needs the fields {missing}")
        self.row = {f: row.get(f) for f in ROW_FIELDS}
        self.row["verified"] = bool(self.row["verified"])
        self.extra = dict(extra or {})

    def __getattr__(self, name: str):
        try:
            row = object.__getattribute__(self, "row")
        except AttributeError:  # during unpickling
            raise AttributeError(name) from None
        if name in row:
            v = row[name]
            return float("nan") if v is None and name in _NAN_WHEN_MISSING else v
        raise AttributeError(f"'Verdict' has no field {name!r}")

    @property
    def source(self) -> str:
        return self.row["path"] or ""

    @property
    def detail(self) -> str:
        return self.row["error_message"] or ""

    def to_dict(self) -> dict[str, Any]:
        """The row: every field of :data:`ROW_FIELDS` (None where a check could not be made)."""
        return dict(self.row)

    def __getstate__(self):
        return {"row": self.row, "extra": self.extra}

    def __setstate__(self, state):
        self.row, self.extra = state["row"], state["extra"]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Verdict):
            return NotImplemented
        return all(self.row[f] == other.row[f] for f in ROW_FIELDS if f not in TIMING_FIELDS) and self.extra == other.extra

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        r = self.row
        if r["status"] != "ok":
            return (f"Verdict(status={r['status']!r}, error_class={r['error_class']!r}, path={r['path']!r}, "
                    f"key_id={r['key_id']!r})")
        return (f"Verdict(verified={r['verified']}, matches={r['matches']}/{r['bits']}, p_value={r['p_value']:.3g}, "
                f"threshold={r['threshold']}, alpha={r['alpha']:g}, path={r['path']!r}, key_id={r['key_id']!r})")

    @classmethod
    def from_matches(cls, matches: int, n: int, alpha: float, p0: float = 0.5, *, key_id: str = "",
                     source: str = "") -> "Verdict":
        """A verdict of ``matches`` out of ``n`` under Binomial(n, p0)."""
        p = binomial_p_value(matches, n, p0)
        return cls({"path": source, "key_id": key_id, "status": "ok", "verified": p <= alpha,
                    "matches": int(matches), "bits": int(n), "ber": 1.0 - matches / n, "p_value": p,
                    "threshold": binomial_threshold(n, alpha, p0), "alpha": alpha})

    @classmethod
    def failed(cls, status: str, detail: str, n: int, alpha: float, p0: float = 0.5, *, key_id: str = "",
               source: str = "", error_class: str | None = None) -> "Verdict":
        """A check that could not be made: never verified."""
        if status not in STATUSES or status == "ok":
            raise ValueError(f"failed verdict needs a non-ok status from {STATUSES}, got {status!r}")
        return cls({"path": source, "key_id": key_id, "status": status, "verified": False, "bits": int(n),
                    "threshold": binomial_threshold(n, alpha, p0), "alpha": alpha,
                    "error_class": error_class or "CheckError", "error_message": detail})
