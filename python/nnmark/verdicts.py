"""``nnmark.verify`` and ``nnmark.calibrate``: every key kind, on the scan's batch engine.

White-box keys read a carrier's weights; trigger keys run the model on the
secret trigger set. Either way each source gets a :class:`~nnmark.stats.Verdict`,
a view of the row ``nnmark.scan`` would write for the same source and key: the
same status, error class, matches and p-value.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import torch

from .calibration import (MIN_MODELS, Calibration, CalibrationError, fit_beta_binomial, load_calibration,
                          make_calibration)
from .checkpoints import label_of
from .scan.engine import check_sources, make_check
from .stats import Verdict


def verify(key, source, *, alpha: float = 1e-6, arch=None, null_rate: float | None = None, calibration=None,
           device=None):
    """Checks ``key``'s watermark in one source or a list of sources.

    Args:
        key: a white-box key (:class:`~nnmark.WhiteBoxKey`, :class:`~nnmark.DenseKey`,
            :class:`~nnmark.DeepSignsKey`) or a :class:`~nnmark.TriggerKey`.
        source: a module, a state dict, a checkpoint path (safetensors, torch zip or
            legacy, Lightning ``.ckpt``, a Hugging Face shard index), a carrier tensor
            (white-box keys), or a list of them, checked in one batch (one native
            projection per carrier shape).
        alpha: significance level: a source verifies iff its p-value <= alpha.
        arch: for trigger and DeepSigns keys, the model factory (a callable or
            ``"module:function"``) that state dicts and files are loaded into; modules run
            themselves.
        null_rate: the chance match rate under the null hypothesis (default 1/2 per bit,
            1/num_classes per trigger).
        calibration: a :class:`~nnmark.Calibration` of this key (or its file), from
            :func:`nnmark.calibrate` on unmarked models: p-values then come from the
            beta-binomial fitted there (``null`` in the verdict says which null was used).
        device: where carriers are projected / models run (default: where a module's
            tensors are; files: the CPU).

    Returns:
        A :class:`~nnmark.Verdict` (a list of them for a list of sources); ``warning`` says
        when its p-value deserves less trust (content, noise or unrelated triggers without a
        calibration; an alpha beyond what the calibration's models show). A source that
        cannot be checked (missing carrier, wrong shape, NaN/Inf, unreadable, unsafe or
        unknown file) gets ``verified=False`` with its ``status``, ``error_class`` and
        ``error_message``; it never passes silently and never stops the others.

    Raises:
        TypeError: ``key`` is not a key.
        ValueError: a bad ``alpha`` or ``null_rate``, an empty list, a trigger key without
            ``arch`` for sources that are not modules, or a calibration of another key.
    """
    if calibration is not None and not isinstance(calibration, Calibration):
        if isinstance(calibration, (str, os.PathLike)):
            calibration = load_calibration(calibration)
        else:
            raise TypeError(f"calibration must be an nnmark.Calibration or a calibration file path, "
                            f"got {type(calibration).__name__}")
    check = make_check(key, alpha, null_rate, calibration)
    batch = isinstance(source, (list, tuple))
    sources = list(source) if batch else [source]
    if not sources:
        raise ValueError("verify() got an empty list of sources")
    if check.trigger:
        if arch is None and any(not isinstance(s, torch.nn.Module) for s in sources):
            raise ValueError(f"a {'DeepSigns' if key.kind == 'deepsigns' else 'trigger'} key checks a model by "
                             f"running it: pass arch= (a model factory or 'module:function') to verify state dicts "
                             f"or checkpoint files")
        if arch is not None:
            from .inference import load_factory

            load_factory(arch)  # a bad arch is the caller's error, not every source's
    labels = [label_of(s, i if batch else None) for i, s in enumerate(sources)]
    extras: list[dict] = []
    rows = check_sources(sources, [check], arch=arch, device=device, labels=labels, extras=extras)
    verdicts = [Verdict(r, e) for r, e in zip(rows, extras)]
    return verdicts if batch else verdicts[0]



def calibrate(key, null_models, *, alpha: float = 1e-6, arch=None, null_rate: float | None = None,
              device=None) -> Calibration:
    """Measures a key's match counts on independent unmarked models and fits their null.

    Args:
        key: a white-box or trigger key.
        null_models: at least 10 models that do not carry the key: modules, state dicts or
            checkpoint paths (any source ``verify`` reads).
        alpha: the significance level whose thresholds the calibration reports.
        arch: for trigger keys, the model factory (a callable or ``"module:function"``).
        null_rate: the nominal chance rate to compare with (default 1/2 per bit,
            1/num_classes per trigger).
        device: where carriers are projected / models run.

    Returns:
        A :class:`Calibration`; pass it as ``verify(..., calibration=cal)``, save it with
        ``cal.save(path)``.

    Raises:
        ValueError: fewer than 10 null models, or one that could not be checked (its path,
            status and error class).
    """
    from importlib.metadata import PackageNotFoundError, version

    null_models = list(null_models)
    if len(null_models) < MIN_MODELS:
        raise CalibrationError(f"calibrate() needs at least {MIN_MODELS} null models (independently trained, without "
                               f"the mark), got {len(null_models)}")
    check = make_check(key, alpha, null_rate)  # the bad key or alpha is named before any model is read
    verdicts = verify(key, null_models, alpha=alpha, arch=arch, null_rate=null_rate, device=device)
    bad = [v for v in verdicts if v.status != "ok"]
    if bad:
        raise CalibrationError(f"{len(bad)} null model(s) could not be checked, e.g. {bad[0].source}: {bad[0].status} "
                               f"({bad[0].error_class}): {bad[0].detail}")
    counts = [int(v.matches) for v in verdicts]
    a, b = fit_beta_binomial(counts, check.bits, check.p0)
    kind = getattr(check, "calibration_kind", None) or (f"trigger:{key.kind}" if check.trigger else "whitebox")
    try:
        ours = version("nnmark")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        ours = ""
    return make_calibration(key.key_id, kind, check.bits, counts, a, b, check.alpha, check.p0,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), version=ours,
                            p_values=[v.p_value for v in verdicts])


__all__ = ["verify", "calibrate"]
