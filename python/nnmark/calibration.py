"""Calibrations: how often a key matches on models that do not carry it (``nnmark.calibrate``
in :mod:`nnmark.verdicts` measures them; this module fits, stores and applies them).

A verdict's p-value promises that among models without the mark at most a fraction
alpha verify. The nominal null (1/2 per bit, 1/num_classes per trigger) keeps that
promise for white-box and abstract trigger keys, but the hit rate of triggers made
from the user's samples (content, noise, unrelated) varies from model to model far
more than a binomial allows: across independently trained digits models their hit
counts had about 14 times the binomial variance. A calibration measures the hit
counts of a key on independent unmarked models (through the same engine as
``verify`` and ``scan``) and fits a **beta-binomial** to them by maximum likelihood:
the hit rate of a random unmarked model is Beta(a, b), and its hits given that rate
are binomial. ``verify(key, suspects, calibration=cal)`` then takes p-values from
that fit, whose tail is as heavy as the models' spread demands.

The fit has one pseudo-model at the nominal chance rate added to the data (a weak
prior, one model's worth): no calibration ever yields a zero rate, even when no
calibration model hits a single trigger. A beta-binomial fitted on M models speaks
for tail probabilities down to about 1/(M+1); below that it extrapolates, and every
verdict whose alpha lies below says so.

Calibration files hold no secret (only the key's public ``key_id``): JSON with
``format: "nnmark-calibration"``, ``version: 1``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._keyfile import is_int, parse_json, read_regular, show, write_atomic

FORMAT = "nnmark-calibration"
VERSION = 1
# Fewer null models than this cannot tell a dispersion from noise.
MIN_MODELS = 10
# a + b above this is a binomial for every practical purpose (and keeps the fit finite).
_MAX_PRECISION = 1e7
# Limits on what a calibration file claims: n as many as a key has (bits or triggers, at most
# 2^20 either way); M null models, each one a model run, so a million is beyond any calibration.
MAX_N = 1 << 20
MAX_MODELS = 1 << 20
# A calibration holds M counts and M p-values: a few MB at most.
MAX_FILE_BYTES = 64 << 20


class CalibrationError(ValueError):
    """A calibration that cannot be used: too few models, a malformed file, another key's."""


@dataclass
class Calibration:
    """The distribution of a key's match count on independent (null) models.

    ``counts``: matches per null model (of ``n`` bits or triggers); ``a``, ``b``: the
    beta-binomial fitted to them (maximum likelihood, one pseudo-model at the nominal
    chance rate added); ``null_rate``: its mean rate a / (a + b), always > 0;
    ``dispersion``: 1 / (a + b + 1), the intra-class correlation (0: binomial);
    ``threshold``: fewest matches that verify at ``alpha`` under the fit;
    ``nominal_threshold``, ``false_positives``, ``false_positive_rate``: the threshold of
    the nominal null (``null_rate_used``: 1/2 per bit, 1/num_classes per trigger) and
    how many null models reach it (its empirical false-positive rate); ``rates``: counts
    / n; ``p_values``: each null model's verdict p-value without the calibration; ``support``:
    1 / (M + 1), the smallest tail probability M models speak for.
    """

    key_id: str
    kind: str
    n: int
    n_models: int
    counts: list[int]
    a: float
    b: float
    null_rate: float
    dispersion: float
    alpha: float
    threshold: int
    null_rate_used: float
    nominal_threshold: int
    false_positives: int
    false_positive_rate: float
    rates: list[float] = field(default_factory=list)
    max_rate: float = 0.0
    p_values: list[float] = field(default_factory=list)
    created: str = ""
    nnmark_version: str = ""

    # -- the fitted null --------------------------------------------------------------
    @property
    def support(self) -> float:
        return 1.0 / (self.n_models + 1)

    def describe(self) -> str:
        """The null as a verdict names it: ``beta-binomial(a=..., b=...; M models)``."""
        return f"beta-binomial(a={self.a:.4g}, b={self.b:.4g}; {self.n_models} models)"

    def tails(self) -> np.ndarray:
        """``tails[m]`` = P[X >= m] for m = 0 .. n under the fit (cached)."""
        t = getattr(self, "_tails", None)
        if t is None:
            t = self._tails = beta_binomial_tails(self.n, self.a, self.b)
        return t

    def p_value(self, matches: int) -> float:
        """P[X >= matches] for X ~ BetaBinomial(n, a, b)."""
        if matches <= 0:
            return 1.0
        return float(self.tails()[min(int(matches), self.n)]) if matches <= self.n else 0.0

    def threshold_at(self, alpha: float) -> int:
        """Fewest matches m with P[X >= m] <= alpha under the fit; n + 1 if none."""
        ok = np.nonzero(self.tails() <= alpha)[0]
        return int(ok[0]) if ok.size else self.n + 1

    def extrapolation(self, alpha: float) -> str | None:
        """Why a p-value at ``alpha`` goes beyond what the calibration models show, or None."""
        if alpha >= self.support:
            return None
        return (f"alpha {alpha:g} lies below what the {self.n_models} calibration models can show (about "
                f"1/{self.n_models + 1} = {self.support:.2g}): the p-value extrapolates the fitted beta-binomial "
                f"into its tail")

    def check_for(self, key) -> None:
        """CalibrationError unless this calibration was made for ``key``."""
        if key.key_id != self.key_id:
            raise CalibrationError(f"this calibration was made for key {self.key_id}, not for key {key.key_id}: "
                                   f"calibrate the key in use (nnmark calibrate)")
        n = len(key)  # bits of a white-box key, triggers of a trigger key
        if n != self.n:
            raise CalibrationError(f"this calibration counts {self.n} matches, the key has {n}")

    # -- files ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["support"] = self.support
        d["null"] = self.describe()
        return d

    def file_body(self) -> dict:
        """The JSON object of the calibration's file (docs/spec.md §6.6)."""
        return {"format": FORMAT, "version": VERSION, **self.to_dict()}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the calibration as JSON (no secret in it: the key appears as its key_id)."""
        body = self.file_body()
        # through a fresh temporary file renamed into place, never through a planted link
        return write_atomic(path, (json.dumps(body, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """A calibration written by :meth:`Calibration.save`; CalibrationError on any defect."""
    path = Path(path)
    p = str(path)
    # Opened without blocking and read only when a regular file of a calibration's size.
    raw, _ = read_regular(path, MAX_FILE_BYTES, "calibration", CalibrationError)
    try:
        body = parse_json(raw)  # strict: no NaN/Infinity, no 1e999, no absurdly long integers
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        raise CalibrationError(f"calibration {p!r} is not valid JSON (or holds numbers a calibration never "
                               f"holds, or is nested too deeply)") from None
    return calibration_from_body(body, f"calibration {p!r}")


def calibration_from_body(body, where: str = "calibration") -> Calibration:
    """A calibration from the JSON object of its file (as :meth:`Calibration.file_body` gives
    it, e.g. inside a certificate); CalibrationError naming ``where`` on any defect."""
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CalibrationError(f"{where} is not an nnmark calibration")
    if not is_int(body.get("version")) or body.get("version") != VERSION:
        raise CalibrationError(f"{where} has version {show(body.get('version'))}; this nnmark reads "
                               f"version {VERSION}")
    try:
        return _from_body(body)
    except KeyError as exc:
        raise CalibrationError(f"{where} is malformed: field {show(exc.args[0] if exc.args else None)} "
                               f"is missing") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, MemoryError, RecursionError) as exc:
        raise CalibrationError(f"{where} is malformed: {exc}") from None


def _from_body(body: dict) -> Calibration:
    def num(name, types=(int, float), lo=None, hi=None):
        v = body[name]
        if isinstance(v, bool) or not isinstance(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{name}={v!r} is out of range")
        return v

    key_id = body["key_id"]
    if not (isinstance(key_id, str) and len(key_id) == 16 and all(c in "0123456789abcdef" for c in key_id)):
        raise ValueError(f"key_id must be 16 hex digits, got {show(key_id)}")
    n = num("n", int, 1, MAX_N)
    counts = body["counts"]
    n_models = num("n_models", int, MIN_MODELS, MAX_MODELS)
    if not isinstance(counts, list) or len(counts) != n_models:
        raise ValueError(f"counts must be a list of n_models = {n_models} ints")
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= n for c in counts):
        raise ValueError(f"counts must be a list of ints in [0, {n}]")
    kind = body["kind"]
    if not isinstance(kind, str) or len(kind) > 200:
        raise TypeError("kind must be a short string")
    for name in ("created", "nnmark_version"):
        if not isinstance(body.get(name, ""), str) or len(body.get(name, "")) > 200:
            raise TypeError(f"{name} must be a short string")
    a, b = num("a", lo=1e-12, hi=_MAX_PRECISION * 2), num("b", lo=1e-12, hi=_MAX_PRECISION * 2)
    p0 = num("null_rate_used", lo=0.0, hi=1.0)
    alpha = num("alpha", lo=0.0, hi=1.0)
    if not (0 < p0 < 1 and 0 < alpha < 1):
        raise ValueError("null_rate_used and alpha must lie in (0, 1)")
    # A calibration file has no checksum: its a and b must be the fit of its counts (to the
    # optimiser's precision), so an edited null is refused rather than believed.
    fa, fb = fit_beta_binomial(counts, n, p0)
    best, stored = _log_likelihood(counts, n, p0, fa, fb), _log_likelihood(counts, n, p0, a, b)
    if not stored >= best - (1e-4 + 1e-6 * len(counts)):
        raise ValueError(f"a={a!r}, b={b!r} are not the fit of its counts (log-likelihood {stored:.6g}, the fit's "
                         f"{best:.6g}): the file was edited")
    pv = body.get("p_values")
    if pv is not None and (not isinstance(pv, list) or len(pv) != len(counts)
                           or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in pv)):
        raise ValueError("p_values must be one probability per null model")
    return make_calibration(key_id, kind, n, counts, a, b, alpha, p0, created=str(body.get("created", "")),
                 version=str(body.get("nnmark_version", "")), p_values=pv)


def beta_binomial_tails(n: int, a: float, b: float) -> np.ndarray:
    """``tails[m]`` = P[X >= m], m = 0 .. n, X ~ BetaBinomial(n, a, b): summed from the
    probabilities in log space from the top, so a tail far below 1e-16 keeps its
    relative accuracy (scipy's ``betabinom.sf`` works in absolute terms and returns 0
    there)."""
    from scipy.stats import betabinom

    logp = betabinom.logpmf(np.arange(n + 1), n, a, b)
    tails = np.exp(np.logaddexp.accumulate(logp[::-1])[::-1])
    tails[0] = 1.0
    return np.minimum(tails, 1.0)


def _log_likelihood(counts, n: int, p0: float, a: float, b: float) -> float:
    from scipy.stats import betabinom

    k = np.asarray(list(counts) + [int(round(n * p0))])
    return float(betabinom.logpmf(k, n, a, b).sum())


def fit_beta_binomial(counts, n: int, p0: float) -> tuple[float, float]:
    """(a, b): the maximum-likelihood beta-binomial of ``counts`` (each of ``n``), with one
    pseudo-count at the nominal chance ``round(n * p0)`` added (a weak prior that keeps
    the mean rate above 0)."""
    from scipy.optimize import minimize
    from scipy.special import betaln, gammaln

    k = np.asarray(list(counts) + [int(round(n * p0))], dtype=np.float64)
    const = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    def nll(theta):
        mu = 1.0 / (1.0 + math.exp(-theta[0]))
        s = math.exp(min(theta[1], math.log(_MAX_PRECISION)))
        a, b = mu * s, (1.0 - mu) * s
        return -float(np.sum(const + betaln(k + a, n - k + b) - betaln(a, b)))

    mean = k.mean() / n
    var = k.var() / (n * n)
    mu0 = min(max(mean, 1e-6), 1 - 1e-6)
    # Method of moments for the start: rho = (var / (mu (1 - mu)) - 1/n) / (1 - 1/n).
    rho = (var / (mu0 * (1 - mu0)) - 1.0 / n) / (1.0 - 1.0 / n) if n > 1 else 0.0
    s0 = (1.0 / rho - 1.0) if 1e-6 < rho < 1 else 1e4
    best = None
    for start in ((math.log(mu0 / (1 - mu0)), math.log(max(s0, 1e-3))),
                  (math.log(mu0 / (1 - mu0)), math.log(10.0))):
        res = minimize(nll, np.array(start), method="Nelder-Mead",
                       options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
        if best is None or res.fun < best.fun:
            best = res
    mu = 1.0 / (1.0 + math.exp(-best.x[0]))
    s = math.exp(min(best.x[1], math.log(_MAX_PRECISION)))
    return mu * s, (1.0 - mu) * s


def make_calibration(key_id, kind, n, counts, a, b, alpha, p0, created="", version="",
                     p_values=None) -> Calibration:
    """A Calibration from its fitted parameters and data (thresholds and rates derived here)."""
    from .stats import binomial_p_value, binomial_threshold

    counts = [int(c) for c in counts]
    m = len(counts)
    nominal = binomial_threshold(n, alpha, p0)
    fp = sum(c >= nominal for c in counts)
    cal = Calibration(key_id=key_id, kind=kind, n=n, n_models=m, counts=counts, a=float(a), b=float(b),
                      null_rate=a / (a + b), dispersion=1.0 / (a + b + 1.0), alpha=alpha, threshold=0,
                      null_rate_used=p0, nominal_threshold=nominal, false_positives=fp,
                      false_positive_rate=fp / m, rates=[c / n for c in counts], max_rate=max(counts) / n,
                      p_values=(list(p_values) if p_values is not None else
                                [binomial_p_value(c, n, p0) for c in counts]), created=created,
                      nnmark_version=version)
    cal.threshold = cal.threshold_at(alpha)
    return cal


__all__ = ["Calibration", "CalibrationError", "load_calibration", "calibration_from_body", "fit_beta_binomial", "beta_binomial_tails",
           "make_calibration",
           "MIN_MODELS"]
