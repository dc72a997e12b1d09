"""``nnmark.calibrate``: how often a key matches on models that do not carry it.

The null hypothesis of a verdict assumes a chance match rate (1/2 per bit, about
1/num_classes per trigger). Calibration measures the rate on independent (null)
models through the same batch engine as ``verify`` and ``scan``, and the
empirical false-positive rate of the threshold in use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Calibration:
    """The distribution of a key's match rate on independent (null) models.

    ``rates``: matches / n per null model; ``p_values``: each null model's p-value (what
    ``verify`` reports for it); ``null_rate``: their mean rate (use it as
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
    p_values: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(key, null_models, *, alpha: float = 1e-6, arch=None, null_rate: float | None = None,
              device=None) -> Calibration:
    """Measures the match-rate distribution of ``key`` on independent models and the
    empirical false-positive rate at the threshold in use.

    Args:
        key: a white-box or trigger key.
        null_models: models that do not carry the key: modules, state dicts or
            checkpoint paths (any format ``verify`` reads).
        alpha: the significance level whose threshold is evaluated.
        arch: for trigger keys, the model factory (a callable or ``"module:function"``).
        null_rate: the chance match rate the threshold assumes (default 1/2 per bit,
            1/num_classes per trigger).
        device: where carriers are projected / models run.

    Returns:
        A :class:`Calibration`.

    Raises:
        ValueError: no null models, or one that could not be checked (its path and why).
    """
    from .scan.engine import make_check
    from .verdicts import verify

    null_models = list(null_models)
    if not null_models:
        raise ValueError("calibrate() needs at least one null model")
    check = make_check(key, alpha, null_rate)  # the bad key or alpha is named before any model is read
    verdicts = verify(key, null_models, alpha=alpha, arch=arch, null_rate=null_rate, device=device)
    bad = [v for v in verdicts if v.status != "ok"]
    if bad:
        raise ValueError(f"{len(bad)} null model(s) could not be checked, e.g. {bad[0].source}: {bad[0].status} "
                         f"({bad[0].error_class}): {bad[0].detail}")
    n = check.bits
    rates = [v.matches / n for v in verdicts]
    fp = sum(v.verified for v in verdicts)
    return Calibration(n_models=len(verdicts), n=n, rates=rates, null_rate=sum(rates) / len(rates),
                       max_rate=max(rates), null_rate_used=check.p0, alpha=check.alpha, threshold=check.threshold,
                       false_positives=fp, false_positive_rate=fp / len(verdicts),
                       p_values=[v.p_value for v in verdicts])


__all__ = ["Calibration", "calibrate"]
