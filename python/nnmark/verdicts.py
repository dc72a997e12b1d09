"""``nnmark.verify``: one entry point for every key kind.

White-box keys read a carrier's weights; trigger keys run the model on the
secret trigger set. Either way each source gets a :class:`~nnmark.stats.Verdict`
with the same fields: ``verified``, ``matches``, ``bits``, ``ber``, ``p_value``
(exact one-sided binomial), ``threshold`` and ``status``.
"""
from __future__ import annotations

from .blackbox import trigger_verdicts
from .whitebox import _is_batch, verify_whitebox


def verify(key, source, alpha: float = 1e-6, *, arch=None, null_rate: float | None = None, device=None):
    """Verdict(s) for ``key`` on ``source``: one Verdict, or a list for a list of sources.

    ``source``: a module, a state dict, a checkpoint path (white-box keys also take
    the carrier tensor itself), or a list of them, checked in one batched native call.
    ``arch``: for trigger keys, the model factory (a callable or ``"module:function"``)
    that state dicts and files are loaded into. ``null_rate``: the chance match rate
    under the null hypothesis (default 1/2 per bit, 1/num_classes per trigger), e.g.
    the one :func:`nnmark.calibrate` measured. A source that cannot be checked
    (missing carrier, wrong shape, NaN/Inf, unreadable or unsafe file) gets
    ``verified=False`` with its ``status`` and a ``detail``; it never passes silently
    and never stops the others.
    """
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if null_rate is not None and not 0.0 < float(null_rate) < 1.0:
        raise ValueError(f"null_rate must be in (0, 1), got {null_rate!r}")
    from .triggers import TriggerKey

    if isinstance(key, TriggerKey):
        batch = _is_batch(source)
        sources = list(source) if batch else [source]
        if not sources:
            raise ValueError("verify() got an empty list of sources")
        verdicts = trigger_verdicts(key, sources, alpha, arch=arch, null_rate=null_rate, device=device,
                                    single=not batch)
        return verdicts if batch else verdicts[0]
    return verify_whitebox(key, source, alpha, null_rate=null_rate)
