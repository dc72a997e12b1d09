"""Black-box (trigger-set) verdicts and null calibration.

A model carries a trigger key when it answers the secret trigger set with the
owner's labels far more often than chance: with n triggers, hits top-1 matches
and a null hit rate p0 (1/num_classes by default, or one measured by
:func:`calibrate`), the p-value is the exact P[Binomial(n, p0) >= hits].
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from . import ops
from .inference import trigger_logits
from .stats import Verdict, binomial_threshold


def _label(source, i):
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    kind = "module" if isinstance(source, torch.nn.Module) else "state_dict" if isinstance(source, Mapping) else "source"
    return f"<{kind}>" if i is None else f"<{kind} {i}>"


def _null_rate(key, null_rate):
    p0 = key.null_rate if null_rate is None else float(null_rate)
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"null_rate must be in (0, 1), got {null_rate!r}")
    return p0


def trigger_verdicts(key, sources, alpha: float = 1e-6, arch=None, null_rate: float | None = None,
                     device=None, single: bool = False):
    """Verdicts of a trigger key for ``sources`` (modules, state dicts or paths; ``arch`` builds the model)."""
    p0 = _null_rate(key, null_rate)
    n = key.n
    sources = list(sources)
    if arch is None and any(not isinstance(s, torch.nn.Module) for s in sources):
        raise ValueError("a trigger key checks a model by running it: pass arch= (a model factory or "
                         "'module:function') to verify state dicts or checkpoint files")
    x, y = key.triggers()
    logits, errors = trigger_logits(arch, sources, x, device=device)
    verdicts: list[Verdict] = []
    ok = [k for k, e in enumerate(errors) if e is None]
    res = ops.trigger_verify(logits[ok], y, null_rate=p0) if ok else None
    threshold = binomial_threshold(n, alpha, p0)
    j = 0
    for k, (s, e) in enumerate(zip(sources, errors)):
        label = _label(s, None if single else k)
        if e is not None:
            verdicts.append(Verdict.failed(e.status, str(e), n, alpha, p0, key_id=key.key_id, source=label))
            continue
        hits, p = int(res["hits"][j]), float(res["p_value"][j])
        verdicts.append(Verdict(verified=p <= alpha, matches=hits, bits=n, ber=1.0 - hits / n, p_value=p,
                                threshold=threshold, alpha=alpha, key_id=key.key_id, source=label,
                                extra={"margin": float(res["margin"][j]), "null_rate": p0}))
        j += 1
    return verdicts


@dataclass
class Calibration:
    """The distribution of a key's match rate on independent (null) models.

    ``rates``: matches / n per null model; ``null_rate``: their mean (use it as
    ``verify(..., null_rate=...)`` when chance is not 1/num_classes or 1/2);
    ``threshold``: fewest matches that verify at ``alpha`` under ``null_rate_used``;
    ``false_positive_rate``: the fraction of null models at or above it (the
    empirical FPR of the threshold in use); ``max_rate``: the highest null rate seen.
    """

    n_models: int
    n: int
    rates: list[float]
    null_rate: float
    max_rate: float
    null_rate_used: float
    alpha: float
    threshold: int
    false_positives: int
    false_positive_rate: float

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(key, null_models, alpha: float = 1e-6, arch=None, null_rate: float | None = None) -> Calibration:
    """Measures the match-rate distribution of ``key`` on independent models (white-box or trigger key)
    and the empirical false-positive rate at the threshold in use."""
    from .verdicts import verify as _verify  # dispatches on the key kind

    null_models = list(null_models)
    if not null_models:
        raise ValueError("calibrate() needs at least one null model")
    verdicts = _verify(key, null_models, alpha=alpha, arch=arch, null_rate=null_rate)
    bad = [v for v in verdicts if v.status != "ok"]
    if bad:
        raise ValueError(f"{len(bad)} null model(s) could not be checked, e.g. {bad[0].source}: {bad[0].detail}")
    n = verdicts[0].bits
    rates = [v.matches / n for v in verdicts]
    used = verdicts[0].extra.get("null_rate", 0.5) if verdicts[0].extra else 0.5
    fp = sum(v.verified for v in verdicts)
    return Calibration(n_models=len(verdicts), n=n, rates=rates, null_rate=sum(rates) / len(rates),
                       max_rate=max(rates), null_rate_used=used, alpha=alpha, threshold=verdicts[0].threshold,
                       false_positives=fp, false_positive_rate=fp / len(verdicts))
