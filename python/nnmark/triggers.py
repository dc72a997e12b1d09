"""Black-box watermarks: trigger keys, trigger mixing, embedding by fine-tuning.

A :class:`TriggerKey` is a 32-byte secret (plus a few public parameters) from
which the whole trigger set regenerates bit for bit, so there is no image
folder to keep or leak. Kinds:

- ``abstract`` (Adi et al. 2018): keyed procedural images (sums of oriented
  sinusoids and Gaussian blobs per channel, scaled to fill ``value_range``)
  with keyed random labels in ``[0, num_classes)``.
- ``content`` (Zhang et al. 2018): a keyed binary pattern in a keyed square
  patch (about 1/4 of the side, at least 2 px) stamped with the extremes of
  ``value_range`` onto user-supplied in-distribution samples; label ``target``.
- ``noise`` (Zhang et al. 2018): keyed Gaussian noise of standard deviation
  ``noise_std * (hi - lo)`` added to user-supplied in-distribution samples,
  clipped to ``value_range``; label ``target``.
- ``unrelated`` (Zhang et al. 2018): user-supplied out-of-distribution samples
  as given (clipped to ``value_range``); label ``target``.
- ``frontier`` (Le Merrer, Perez, Tredan 2019): adversarial examples near the
  decision boundary of the owner's trained model, made from user samples by one
  FGSM step each (``TriggerKey.generate(kind="frontier", model=..., samples=...,
  labels=...)``), labelled with their true labels; a keyed half of the "true
  adversaries" (the model answers them wrong) are the triggers, the other half is
  held back as controls, and "false adversaries" (still answered right) are
  trained on too. Verified by Fisher's exact test of triggers against the
  held-back half, exact for any model that never saw the key (a binomial at
  1/num_classes is not: unmarked models answer many such triggers right).

For ``content``, ``noise``, ``unrelated`` and ``frontier`` the key file
**contains the samples** (float32, base64) so the set regenerates from the file
alone: the key file then holds those inputs too; treat it (as every key file)
as secret.

Value range and normalisation follow the model's inputs: triggers are built
and clipped in the raw range ``value_range = (lo, hi)`` (the range of the
``samples`` too), and ``triggers()`` returns them normalised as
``(x - mean) / std`` (per channel, ``input_shape[0]`` channels) so they can be
fed to the model directly. ``mean=None``/``std=None`` means no normalisation.

Determinism: every keyed choice comes from SHAKE-256 streams over the secret,
domain-separated (``b"nnmark:trigger:v1:<name>\\x00" + secret``); the images
are computed in float64 numpy with only correctly rounded IEEE-754 operations
(+, -, *, /, sqrt, floor, frexp/ldexp; sin, exp and log are evaluated by
fixed polynomials here, not by libm or numpy's SIMD transcendental code), then
rounded once to float32. The bytes are therefore identical across processes,
machines and numpy versions. No global RNG (torch, numpy, random) is touched.
"""
from __future__ import annotations

import base64
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import keys as _keys
from ._keyfile import f32_field, int_field, int_list, secret_field, show
from ._threads import small_work_threads
from .keys import SECRET_BYTES, write_key_file

KINDS = ("abstract", "content", "noise", "unrelated", "frontier")
_SAMPLE_KINDS = ("content", "noise", "unrelated", "frontier")
FRONTIER_EPS = 0.1  # frontier: FGSM step as a fraction of hi - lo (digits: ~40% of the steps fool the model)
FRONTIER_BATCH = 256  # frontier: samples per forward/backward pass while the key is made
_DOMAIN = b"nnmark:trigger:v1:"
_KEY_ID_DOMAIN = b"nnmark:trigger:v1:key-id"
_FILE_KIND = "trigger"
DEFAULT_N = 100
MIX_SHARE = 3  # TriggerMixer's default: one trigger for every 3 clean samples of a batch

# Limits on what a trigger key claims. Generous for real use (trigger sets hold tens to a
# few thousand inputs), and small enough that a hostile key file or argument fails at once
# with a clear error instead of a MemoryError when the set is built.
MAX_TRIGGERS = 1 << 20  # triggers n (and stored controls k)
MAX_CLASSES = 1 << 20  # num_classes: ImageNet-21k has 21,841; a large vocabulary ~250k
MAX_INPUT_ELEMENTS = 1 << 24  # elements of one input: 3 x 2048 x 2048 fits
# Elements of all n triggers (or all controls): 128 MiB as float32, 200 ImageNet-sized inputs.
# Building that many abstract triggers takes seconds and a few GB (float64 temporaries).
MAX_TRIGGER_ELEMENTS = 1 << 25

# --------------------------------------------------------------------------- keyed streams


def _stream(secret: bytes, name: str, nbytes: int) -> bytes:
    """``nbytes`` of the SHAKE-256 stream ``name`` of ``secret`` (prefix-stable in nbytes)."""
    return hashlib.shake_256(_DOMAIN + name.encode("ascii") + b"\x00" + secret).digest(nbytes)


def _uint64(secret: bytes, name: str, count: int) -> np.ndarray:
    return np.frombuffer(_stream(secret, name, 8 * count), dtype="<u8").astype(np.uint64)


def _uniform(secret: bytes, name: str, count: int) -> np.ndarray:
    """``count`` float64 uniforms in [0, 1): the top 53 bits of each keyed uint64, exactly."""
    return (_uint64(secret, name, count) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def _below(words: np.ndarray, bound: int) -> np.ndarray:
    """Keyed integers in [0, bound) from uint64 words (bias <= bound / 2^64)."""
    return (words % np.uint64(bound)).astype(np.int64)


def _permutation(secret: bytes, name: str, n: int) -> np.ndarray:
    """A keyed permutation of range(n) (Fisher-Yates on a keyed stream)."""
    words = _uint64(secret, name, max(n, 1))
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(words[i] % np.uint64(i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


# --------------------------------------------------------------- portable float64 math
# Only +, -, *, /, floor, frexp and ldexp (all exact or correctly rounded), so the
# results do not depend on the platform's libm or numpy's SIMD dispatch.

_TWO_PI = 6.283185307179586
_LN2 = 0.6931471805599453


def _sin(x: np.ndarray) -> np.ndarray:
    k = np.floor(x * (1.0 / _TWO_PI) + 0.5)
    r = x - k * _TWO_PI  # in about [-pi, pi]
    r2 = r * r
    acc = np.ones_like(r)
    for j in range(13, 0, -1):  # Taylor to r^27: error < 3e-15 on [-pi, pi]
        acc = 1.0 - acc * r2 / float((2 * j) * (2 * j + 1))
    return r * acc


def _cos(x: np.ndarray) -> np.ndarray:
    return _sin(x + 0.25 * _TWO_PI)


def _exp(x: np.ndarray) -> np.ndarray:
    x = np.maximum(x, -700.0)
    k = np.floor(x * (1.0 / _LN2) + 0.5)
    r = x - k * _LN2  # |r| <= ~0.35
    acc = np.ones_like(r)
    for j in range(20, 0, -1):
        acc = 1.0 + acc * r / float(j)
    return np.ldexp(acc, k.astype(np.int64))


def _log(u: np.ndarray) -> np.ndarray:
    """Natural log of positive values: frexp, then 2*atanh((m-1)/(m+1)) by its series."""
    m, e = np.frexp(u)  # m in [0.5, 1)
    s = (m - 1.0) / (m + 1.0)  # |s| <= 1/3
    s2 = s * s
    acc = np.zeros_like(s)
    for j in range(30, -1, -1):
        acc = 1.0 / float(2 * j + 1) + acc * s2
    return 2.0 * s * acc + e.astype(np.float64) * _LN2


def _gaussian(secret: bytes, name: str, count: int) -> np.ndarray:
    """``count`` keyed standard normals (Box-Muller, portable math)."""
    u = _uniform(secret, name, 2 * count).reshape(count, 2)
    radius = np.sqrt(-2.0 * _log(1.0 - u[:, 0]))  # 1 - u in (0, 1]
    return radius * _cos(_TWO_PI * u[:, 1])


# ------------------------------------------------------------------------ validation


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {show(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _check_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple such as (1, 8, 8), got {show(input_shape)}") from None
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"input_shape must have 1 to 3 dims ((D,), (H, W) or (C, H, W)), got {show(shape)}")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"input_shape must hold positive ints, got {show(shape)}")
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"input_shape {list(shape)} has {math.prod(shape)} elements per input, more than "
                         f"{MAX_INPUT_ELEMENTS}")
    return shape


def _check_total(what: str, count: int, shape: tuple[int, ...]) -> None:
    """Refuses a set whose inputs together exceed MAX_TRIGGER_ELEMENTS (before anything is built)."""
    if count * math.prod(shape) > MAX_TRIGGER_ELEMENTS:
        raise ValueError(f"{count} {what} of shape {list(shape)} hold {count * math.prod(shape)} values, more than "
                         f"{MAX_TRIGGER_ELEMENTS}")


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) view of an input shape: (D,) -> (1, 1, D), (H, W) -> (1, H, W)."""
    if len(shape) == 1:
        return 1, 1, shape[0]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return shape[0], shape[1], shape[2]


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _check_range(value_range: Any) -> tuple[float, float]:
    try:
        lo, hi = value_range
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair (lo, hi), got {value_range!r}") from None
    lo, hi = _finite("value_range[0]", lo), _finite("value_range[1]", hi)
    if not lo < hi:
        raise ValueError(f"value_range must have lo < hi, got ({lo}, {hi})")
    return lo, hi


def _check_channels(name: str, value: Any, channels: int, positive: bool) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    vals = [value] if not isinstance(value, (list, tuple)) else list(value)
    if len(vals) not in (1, channels):
        raise ValueError(f"{name} must be a scalar or one value per channel ({channels}), got {len(vals)} values")
    out = tuple(_finite(name, v) for v in vals)
    if positive and any(v <= 0 for v in out):
        raise ValueError(f"{name} must be > 0, got {list(out)}")
    return out * channels if len(out) == 1 else out


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_target(name: str, target: Any, n: int, num_classes: int) -> tuple[int | None, np.ndarray]:
    """(the shared label or None, the labels of the n samples): ``target`` is one int for
    all samples, or one label per sample (a sequence, array or tensor of n ints)."""
    if _is_int(target):
        t = _check_int(name, target, 0)
        if t >= num_classes:
            raise ValueError(f"{name} must be in [0, {num_classes}), got {t}")
        return t, np.full(n, t, dtype=np.int64)
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    if isinstance(target, (str, bytes)) or target is None:
        raise TypeError(f"{name} must be an int or one int label per sample, got {target!r}")
    try:
        arr = np.asarray(target)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or one int label per sample, got {type(target).__name__}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise TypeError(f"{name} must be an int or a 1-D sequence of int labels, got shape {list(arr.shape)} "
                        f"of {arr.dtype}")
    if arr.shape[0] < n:
        raise ValueError(f"{name} gives {arr.shape[0]} labels for {n} samples")
    arr = arr[:n].astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"{name} labels must be in [0, {num_classes}), found {bad[:3].tolist()}")
    return None, arr


def _as_samples(samples: Any, input_shape: tuple[int, ...] | None) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        arr = samples.detach().cpu().to(torch.float64).numpy()
    else:
        try:
            arr = np.asarray(samples, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"samples must be a tensor or array [m, *input_shape], got {type(samples).__name__}") from None
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty batch [m, *input_shape], got shape {list(arr.shape)}")
    if input_shape is not None and tuple(arr.shape[1:]) != input_shape:
        raise ValueError(f"samples have shape {list(arr.shape)}, expected [m, {', '.join(map(str, input_shape))}]"
                         f" (input_shape={input_shape})")
    if not np.isfinite(arr).all():
        raise ValueError(f"samples contain {int((~np.isfinite(arr)).sum())} NaN or Inf values")
    # Stored as float32 in the key file: round here so a reloaded key is bit-identical.
    return np.ascontiguousarray(arr.astype("<f4"))


def _normalise(x: np.ndarray, input_shape: tuple[int, ...], mean, std) -> np.ndarray:
    """``(x - mean) / std`` per channel in float64 (x raw-range float64 ``[m, *input_shape]``)."""
    if mean is None and std is None:
        return x
    c = _chw(input_shape)[0]
    m = np.asarray(mean if mean is not None else (0.0,) * c, dtype=np.float64)
    s = np.asarray(std if std is not None else (1.0,) * c, dtype=np.float64)
    shape = (1, c, 1, 1)
    xs = x.reshape(x.shape[0], *_chw(input_shape))
    return ((xs - m.reshape(shape)) / s.reshape(shape)).reshape(x.shape)


# ---------------------------------------------------------------- frontier stitching


def _frontier_key(secret: bytes, model: Any, samples: Any, labels: Any, n: int | None, num_classes: int | None,
                  input_shape: Any, value_range: Any, mean: Any, std: Any, eps: Any, controls: Any,
                  false_adversaries: Any, batch_size: Any) -> dict[str, Any]:
    """The parts of a new frontier key (TriggerKey's keyword arguments): FGSM steps on a keyed
    walk over ``samples``, batched, until enough true and false adversaries are found."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"kind='frontier' needs model= (the owner's trained torch.nn.Module, before marking), "
                        f"got {type(model).__name__}")
    if samples is None:
        raise ValueError("kind='frontier' needs samples: a tensor or array [m, *input_shape] of raw-range inputs")
    if labels is None:
        raise ValueError("kind='frontier' needs labels: the samples' true labels [m]")
    shape = _check_shape(input_shape) if input_shape is not None else None
    arr = _as_samples(samples, shape)
    shape = tuple(int(s) for s in arr.shape[1:])
    _check_shape(shape)
    m = arr.shape[0]
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    if _is_int(lab) or isinstance(lab, (str, bytes)) or np.asarray(lab).shape != (m,):
        raise ValueError(f"labels must be one int label per sample, shape [{m}], got "
                         f"{list(np.asarray(lab).shape) if not isinstance(lab, (str, bytes)) else type(lab).__name__}")
    n = _check_int("n", DEFAULT_N if n is None else n, 1, MAX_TRIGGERS)
    k = _check_int("controls", n if controls is None else controls, 1, MAX_TRIGGERS)
    f = _check_int("false_adversaries", n if false_adversaries is None else false_adversaries, 0, MAX_TRIGGERS)
    batch_size = _check_int("batch_size", batch_size, 1)
    lo, hi = _check_range(value_range)
    eps = _finite("eps", eps)
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] (a fraction of hi - lo), got {eps!r}")
    channels = _chw(shape)[0]
    mean = _check_channels("mean", mean, channels, positive=False)
    std = _check_channels("std", std, channels, positive=True)
    try:
        param = next(model.parameters())
        device, dtype = param.device, (param.dtype if param.dtype.is_floating_point else torch.float32)
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32

    def inputs(raw: np.ndarray) -> torch.Tensor:
        # exactly what triggers() hands the model: normalised in float64, rounded once to float32
        x = torch.from_numpy(_normalise(raw.astype(np.float64), shape, mean, std).astype(np.float32))
        return x.to(device=device, dtype=dtype)

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model must return logits [batch, num_classes], got "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out

    order = _permutation(secret, "frontier-order", m)
    step = eps * (hi - lo)
    # per batch of the walk, in walk order: the true adversaries (input, label, the model's
    # answer) and the false ones (input, label)
    true_x, true_y, true_a, false_x, false_y = [], [], [], [], []
    found_true = found_false = 0
    width = None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, m, batch_size):
            idx = order[start:start + batch_size]
            raw = np.clip(arr[idx].astype(np.float64), lo, hi)
            x = inputs(raw).requires_grad_(True)
            with torch.enable_grad():
                out = logits(x)
                if width is None:
                    width = out.shape[1]
                    num_classes = _check_int("num_classes", width if num_classes is None else num_classes, 2,
                                             MAX_CLASSES)
                    if num_classes != width:
                        raise ValueError(f"num_classes={num_classes}, but the model gives {width} logits")
                    _, lab = _check_target("labels", lab, m, num_classes)
                y = torch.from_numpy(lab[idx]).to(device)
                loss = torch.nn.functional.cross_entropy(out.float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
            right = (out.detach().argmax(1) == y).cpu().numpy()
            # the step in the raw range has the gradient's sign (std > 0), clipped, rounded once to float32
            sign = grad.sign().cpu().to(torch.float64).numpy().reshape(raw.shape)
            adv = np.clip(raw + step * sign, lo, hi).astype("<f4")
            with torch.no_grad():
                ans = logits(inputs(adv)).argmax(1).cpu().numpy()
            fooled, kept = right & (ans != lab[idx]), right & (ans == lab[idx])
            true_x.append(adv[fooled])
            true_y.append(lab[idx][fooled])
            true_a.append(ans[fooled].astype(np.int64))
            false_x.append(adv[kept])
            false_y.append(lab[idx][kept])
            found_true, found_false = found_true + int(fooled.sum()), found_false + int(kept.sum())
            if found_true >= n + k and found_false >= f:
                break
    finally:
        model.train(was_training)
    if found_true < n + k or found_false < f:
        raise ValueError(f"found {found_true} true and {found_false} false adversaries among the {m} samples at "
                         f"eps={eps:g}; this key needs n + controls = {n + k} true and {f} false: give more samples, "
                         f"a larger eps (more true adversaries) or a smaller one (more false)")
    # the first n + k true adversaries of the walk, split by the key into triggers and held-back ones
    px, py, pa = (np.concatenate(v)[:n + k] for v in (true_x, true_y, true_a))
    split = _permutation(secret, "frontier-split", n + k)
    trig, held = np.sort(split[:n]), np.sort(split[n:])
    fx, fy = (np.concatenate(v)[:f] for v in (false_x, false_y))
    return {"n": n, "num_classes": num_classes, "input_shape": shape, "samples": px[trig], "target": py[trig].tolist(),
            "value_range": (lo, hi), "mean": mean, "std": std, "controls": px[held],
            "control_target": py[held].tolist(), "controls_from": "held-back", "control_answers": pa[held].tolist(),
            "false_adversaries": fx if f else None, "false_target": fy.tolist() if f else None, "eps": eps}


class TriggerKey(_keys.HoldsSecret):
    """A black-box (trigger set) watermark key: a 32-byte secret and public parameters.

    ``TriggerKey(secret, kind, n, num_classes, input_shape, samples, target,
    value_range, mean, std, noise_std)`` builds one from explicit parts (``samples``
    used as given: the first ``n`` rows); :meth:`generate` makes a fresh one.
    ``triggers()`` returns ``(x, y)``; ``save`` / ``nnmark.load_key`` round-trip it.

    Frontier keys (``kind="frontier"``, see :meth:`generate`) also hold the held-back
    true adversaries (``controls``, ``controls_from="held-back"``), the owner's model's
    answers to them (``control_answers``: what embedding keeps them at), the false
    adversaries (``false_adversaries``, ``false_target``) and ``eps``. Their verdict rests
    on the control test alone: the key split one set of true adversaries at random into
    triggers and controls, so a model that never saw the key answers both alike (Fisher's
    exact test, no calibration needed), while a marked one answers the triggers with their
    true labels and the controls as the owner's model did. The binomial at 1/num_classes
    is no null for these triggers: twelve independently trained unmarked digits models
    answered 14-48% of them right (benchmarks/bench_frontier.py), and it would have called
    20 of 36 (key, model) pairs marked at alpha 1e-6.
    """

    _KEY_ID_PREFIX = _KEY_ID_DOMAIN + b"\x00"

    file_kind = _FILE_KIND  # the key file's "kind"; ``kind`` is the trigger kind

    def __init__(self, secret: bytes, kind: str = "abstract", n: int | None = None, num_classes: int = 10,
                 input_shape: Sequence[int] | None = None, samples: Any = None, target: Any = 0,
                 value_range: Sequence[float] = (0.0, 1.0), mean: Any = None, std: Any = None,
                 noise_std: float = 0.25, controls: Any = None, control_target: Any = None,
                 controls_from: str | None = None, sample_labels: Any = None, control_answers: Any = None,
                 false_adversaries: Any = None, false_target: Any = None, eps: float | None = None):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
            got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {got}")
        if kind not in KINDS:
            raise ValueError(f"unknown trigger kind {kind!r}; expected one of {list(KINDS)}")
        self._secret = bytes(secret)
        self.kind = kind
        self.num_classes = _check_int("num_classes", num_classes, 2, MAX_CLASSES)
        self.value_range = _check_range(value_range)
        shape = _check_shape(input_shape) if input_shape is not None else None
        if kind == "abstract":
            if samples is not None:
                raise ValueError("kind='abstract' builds its own images; samples must be None")
            self.input_shape = shape if shape is not None else (1, 8, 8)
            self.n = _check_int("n", DEFAULT_N if n is None else n, 1, MAX_TRIGGERS)
            _check_total("triggers", self.n, self.input_shape)
            self.target = None
            self._samples = None
            self._labels = None
            if controls is not None or control_target is not None:
                raise ValueError("kind='abstract' has no controls (its keyed labels make the binomial null exact)")
        else:
            if samples is None:
                raise ValueError(f"kind={kind!r} needs samples: a tensor or array [m, *input_shape] of raw-range inputs")
            arr = _as_samples(samples, shape)
            self.input_shape = tuple(int(s) for s in arr.shape[1:])
            _check_shape(self.input_shape)
            m = arr.shape[0]
            self.n = _check_int("n", m if n is None else n, 1, MAX_TRIGGERS)
            _check_total("triggers", self.n, self.input_shape)
            if self.n > m:
                raise ValueError(f"n={self.n} triggers need at least n samples, got {m}")
            self._samples = arr[: self.n].copy()
            lo, hi = self.value_range
            outside = float(np.mean((self._samples < lo) | (self._samples > hi)))
            if outside > 0.01:
                warnings.warn(f"{100 * outside:.0f}% of the sample values lie outside value_range=({lo:g}, {hi:g}) "
                              "and will be clipped: samples must be raw-range inputs (normalisation is given "
                              "by mean/std)", stacklevel=2)
            self.target, self._labels = _check_target("target", target, self.n, self.num_classes)
        channels = _chw(self.input_shape)[0]
        self.mean = _check_channels("mean", mean, channels, positive=False)
        self.std = _check_channels("std", std, channels, positive=True)
        self.noise_std = _finite("noise_std", noise_std)
        if kind == "noise" and not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0 for kind='noise', got {noise_std!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self._controls, self._control_labels, self.controls_from = None, None, None
        self._true = None
        if sample_labels is not None:
            if kind not in ("content", "noise"):
                raise ValueError("sample_labels (the samples' own classes) apply to content and noise keys")
            _, self._true = _check_target("sample_labels", sample_labels, self.n, self.num_classes)
        if kind == "frontier" and (controls is None or controls_from != "held-back"):
            raise ValueError("kind='frontier' needs its held-back true adversaries: controls=[k, *input_shape] with "
                             "controls_from='held-back' (TriggerKey.generate(kind='frontier', ...) makes them)")
        if kind in ("content", "noise") and (controls is not None or control_target is not None):
            raise ValueError(f"kind={kind!r} takes its controls from its own samples (without the "
                             f"{'stamp' if kind == 'content' else 'noise'}); controls must be None")
        if controls is not None:
            ctrl = _as_samples(controls, self.input_shape)
            _check_int("the number of controls", len(ctrl), 1, MAX_TRIGGERS)
            _check_total("controls", len(ctrl), self.input_shape)
            self._controls = ctrl.copy()
            ct = self.target if control_target is None else control_target
            if ct is None:
                raise ValueError("per-sample labels: control_target must give one label per control")
            _, self._control_labels = _check_target("control_target", ct, len(ctrl), self.num_classes)
            if controls_from not in ("held-back", "given"):
                raise ValueError(f"controls_from must be 'held-back' (samples of the trigger set kept apart) or "
                                 f"'given' (inputs of the task), got {controls_from!r}")
            self.controls_from = controls_from
        elif control_target is not None:
            raise ValueError("control_target needs controls")
        self._answers = self._false = self._false_labels = None
        self.eps = None
        if kind == "frontier":
            self._frontier_parts(control_answers, false_adversaries, false_target, eps)
        elif any(v is not None for v in (control_answers, false_adversaries, false_target, eps)):
            raise ValueError("control_answers, false_adversaries, false_target and eps belong to frontier keys")
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        self._control_cache: tuple[np.ndarray, np.ndarray] | None = None

    def _frontier_parts(self, control_answers: Any, false_adversaries: Any, false_target: Any, eps: Any) -> None:
        """Checks and keeps what only frontier keys hold: the owner's answers to the held-back
        true adversaries (their training labels), the false adversaries and their labels, eps."""
        k = len(self._controls)
        if control_answers is None or _is_int(control_answers):
            raise ValueError(f"kind='frontier' needs control_answers: the owner's model's answer to each of the {k} "
                             f"held-back true adversaries")
        if len(control_answers) != k:
            raise ValueError(f"control_answers must hold one answer per control ({k}), got {len(control_answers)}")
        _, self._answers = _check_target("control_answers", control_answers, k, self.num_classes)
        same = np.nonzero(self._answers == self._control_labels)[0]
        if same.size:
            raise ValueError(f"control_answers must differ from the controls' labels (true adversaries fool the "
                             f"owner's model); control {int(same[0])} has answer {int(self._answers[same[0]])}")
        if false_adversaries is not None:
            arr = _as_samples(false_adversaries, self.input_shape)
            _check_int("the number of false adversaries", len(arr), 1, MAX_TRIGGERS)
            _check_total("false adversaries", len(arr), self.input_shape)
            if false_target is None or _is_int(false_target) or len(false_target) != len(arr):
                raise ValueError(f"false_target must give one label per false adversary ({len(arr)})")
            _, self._false_labels = _check_target("false_target", false_target, len(arr), self.num_classes)
            self._false = arr.copy()
        elif false_target is not None:
            raise ValueError("false_target needs false_adversaries")
        if eps is not None:
            self.eps = _finite("eps", eps)
            if not self.eps > 0:
                raise ValueError(f"eps must be > 0, got {eps!r}")

    # -- construction ------------------------------------------------------------------
    @classmethod
    def generate(cls, kind: str = "abstract", n: int | None = None, num_classes: int | None = None,
                 input_shape: Sequence[int] | None = None, samples: Any = None, target: Any = 0,
                 value_range: Sequence[float] = (0.0, 1.0), mean: Any = None, std: Any = None,
                 noise_std: float = 0.25, sample_labels: Any = None, controls: Any = None, *,
                 model: torch.nn.Module | None = None, labels: Any = None, eps: float = FRONTIER_EPS,
                 false_adversaries: int | None = None, batch_size: int = FRONTIER_BATCH,
                 secret: bytes | None = None) -> "TriggerKey":
        """A new key with a fresh secret from ``os.urandom`` (or ``secret``, 32 bytes: the same
        secret and arguments give the same key).

        ``n``: number of triggers (default 100 for ``abstract``; for the other kinds
        all ``m`` samples, or ``n <= m`` of them chosen by a keyed draw).
        ``input_shape`` defaults to ``samples.shape[1:]`` or ``(1, 8, 8)``.
        ``samples``: raw-range inputs ``[m, *input_shape]`` (needed by content, noise,
        unrelated; stored in the key file). ``sample_labels`` (optional, ``[m]``): the
        samples' true labels; samples of class ``target`` are then left out (a clean
        model would already say ``target`` for them), and content and noise keys keep the
        rest: a suspect must then answer the unmarked samples better than chance to verify
        (an untrained model that a stamp or noise happens to push to the target does not).
        ``target``: label of content/noise/unrelated triggers (ignored for abstract): one
        int for all, or one label per sample (``[m]``, e.g. a published trigger set's own
        labels), kept with its samples through every selection.
        ``controls`` (``unrelated``; for ``frontier`` see below): inputs without the mark,
        stored in the key and shown to a suspect beside the triggers; a model that answers the triggers' labels
        just as often on them does not verify. An int holds back that many of the samples
        (default ``None``: the ``m - n`` left over, or half of them): the triggers are then
        a keyed random draw of the set, and the test of triggers against the rest is exact
        for any model that never saw the key. Embedding (:class:`TriggerMixer`,
        :func:`embed_triggers`) trains the held-back samples with other labels, so that a
        marked model answers these triggers, not their whole source, with the target
        (many unmarked models answer a whole out-of-distribution source with one class).
        An array gives controls of your own (e.g. in-distribution inputs of the task: no
        training on them; the verdict's null then rests on a calibration). ``0``: none
        (keyed procedural images stand in, a weaker control; the verdict says so).
        Content and noise keys need none: their controls are their own samples without
        the stamp or the noise.
        ``value_range``: raw input range ``(lo, hi)``; ``mean``/``std``: the model's
        input normalisation (scalars or per channel), applied by ``triggers()``.
        ``noise_std``: noise level of ``noise`` triggers as a fraction of ``hi - lo``.
        ``num_classes``: default 10 (frontier: the width of the model's output).

        ``kind="frontier"`` (Le Merrer, Perez, Tredan 2019) builds adversarial examples near
        the decision boundary of the owner's ``model`` (before it is marked) from ``samples``
        (raw range ``[m, *input_shape]``) and their true ``labels`` (``[m]``): a keyed walk
        over the samples, ``batch_size`` at a time, takes one FGSM step of ``eps * (hi - lo)``
        on each sample the model classifies right. A *true adversary* then fools the model,
        a *false adversary* does not. The first ``n`` (default 100) + ``controls`` (default
        ``n``) true adversaries of the walk are split by the key into the ``n`` triggers and
        ``controls`` held-back ones; the first ``false_adversaries`` (default ``n``) false
        ones are kept too. All are stored in the key file, triggers and controls labelled
        with their true labels. Embedding (:class:`TriggerMixer`, :func:`embed_triggers`)
        trains the triggers and false adversaries with their true labels (stitching the
        boundary back over the triggers) and the held-back ones with the model's answer
        (``control_answers``: the boundary stays where it was for them). The verdict tests
        the triggers against the held-back true adversaries (Fisher's exact test): for a
        model that never saw the key the two are a random split of one set, so the test is
        exact without a calibration. A binomial at 1/num_classes is *not*: independently
        trained unmarked digits models answered 14-48% of such triggers right (they are
        slight perturbations of real samples, with their true labels). The smallest p-value
        the test can give is ``1 / C(n + controls, n)``: 12 + 12 reach 1e-6. ``eps``: the
        FGSM step as a fraction of ``hi - lo`` (default 0.1: on digits about 40% of the
        steps fool the model); ``false_adversaries=0`` keeps none. ``model``, ``labels``,
        ``eps``, ``false_adversaries`` and ``batch_size`` apply to frontier keys only.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown trigger kind {kind!r}; expected one of {list(KINDS)}")
        if secret is None:
            secret = os.urandom(SECRET_BYTES)
        elif not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
            raise ValueError(f"secret must be {SECRET_BYTES} bytes")
        secret = bytes(secret)
        if kind == "frontier":
            if sample_labels is not None:
                raise ValueError("kind='frontier' takes the samples' true labels as labels=, not sample_labels=")
            if not (_is_int(target) and target == 0):
                raise ValueError("kind='frontier' keeps each sample's own label (labels=); target does not apply")
            return cls(secret, "frontier", **_frontier_key(
                secret, model, samples, labels, n, num_classes, input_shape, value_range, mean, std, eps,
                controls, false_adversaries, batch_size), noise_std=noise_std)
        frontier_only = {"model": model, "labels": labels, "false_adversaries": false_adversaries}
        given = [name for name, v in frontier_only.items() if v is not None]
        if given or eps != FRONTIER_EPS or batch_size != FRONTIER_BATCH:
            raise ValueError(f"{', '.join(given) or 'eps, batch_size'}: only for kind='frontier'")
        num_classes = 10 if num_classes is None else num_classes
        control_samples = control_target = true = None
        if kind in _SAMPLE_KINDS and samples is not None:
            shape = _check_shape(input_shape) if input_shape is not None else None
            arr = _as_samples(samples, shape)
            labels = None
            if not _is_int(target):  # one label per sample: they travel with their samples
                _, labels = _check_target("target", target, arr.shape[0], num_classes)
            if sample_labels is not None:
                if labels is not None:
                    raise ValueError("sample_labels leaves out the samples of class target; with one label per "
                                     "sample (target=[...]) choose the samples yourself")
                lab = np.asarray(sample_labels.detach().cpu() if isinstance(sample_labels, torch.Tensor)
                                 else sample_labels)
                if lab.shape != (arr.shape[0],):
                    raise ValueError(f"sample_labels must have shape [{arr.shape[0]}], got {list(lab.shape)}")
                keep = lab != target
                if not keep.any():
                    raise ValueError(f"every sample has label target={target}; pass samples of other classes")
                arr = arr[keep]
                true = lab[keep].astype(np.int64)
            m = arr.shape[0]
            if kind != "unrelated" and controls is not None:
                raise ValueError(f"kind={kind!r} takes its controls from its own samples; controls must be None")
            k = 0
            if kind == "unrelated" and isinstance(controls, (int, np.integer)) and not isinstance(controls, bool):
                k = _check_int("controls", controls, 0)
            elif kind == "unrelated" and controls is None:  # hold back the rest (or half) of the set
                k = (m - _check_int("n", n, 1)) if n is not None else m // 2
            elif controls is not None:  # explicit control samples
                control_samples = controls
            if n is None and k:
                n = m - k
            if n is not None:
                n = _check_int("n", n, 1)
                if n + k > m:
                    raise ValueError(f"n={n} triggers and {k} controls need at least {n + k} samples, got {m}"
                                     + (" (after leaving out the target class)" if sample_labels is not None else ""))
                perm = _permutation(secret, "select", m)
                pick, held = np.sort(perm[:n]), np.sort(perm[n:n + k])
                if k:
                    control_samples = arr[held]
                    control_target = labels[held].tolist() if labels is not None else None
                arr = arr[pick]
                if labels is not None:
                    labels = labels[pick]
                if true is not None:
                    true = true[pick]
            samples = arr
            if labels is not None:
                target = labels.tolist()
        elif sample_labels is not None:
            raise ValueError("sample_labels only applies to kinds with samples (content, noise, unrelated)")
        elif controls is not None:
            raise ValueError("controls only apply to kind='unrelated' (with its samples)")
        return cls(secret, kind, n, num_classes, input_shape, samples, target, value_range, mean, std, noise_std,
                   control_samples, control_target,
                   None if control_samples is None else ("held-back" if k else "given"),
                   sample_labels=true if kind in ("content", "noise") else None)

    # -- public properties -------------------------------------------------------------
    @property
    def null_rate(self) -> float:
        """Chance that an unmarked model gives a trigger's label: 1 / num_classes."""
        return 1.0 / self.num_classes

    @property
    def has_samples(self) -> bool:
        """True when the key (and its file) holds user samples (content, noise, unrelated)."""
        return self._samples is not None

    def __len__(self) -> int:
        return self.n

    # -- the trigger set ---------------------------------------------------------------
    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        """Raw-range triggers ``[n, *input_shape]`` float64 and labels int64 (cached)."""
        if self._cache is None:
            if self.kind == "abstract":
                x = self._abstract()
                y = _below(_uint64(self._secret, "labels", self.n), self.num_classes)
            else:
                lo, hi = self.value_range
                x = np.clip(self._samples.astype(np.float64), lo, hi)
                if self.kind == "content":
                    x = self._stamp(x)
                elif self.kind == "noise":
                    g = _gaussian(self._secret, "noise", x.size).reshape(x.shape)
                    x = np.clip(x + g * (self.noise_std * (hi - lo)), lo, hi)
                y = self._labels.copy()
            x.setflags(write=False)
            y.setflags(write=False)
            self._cache = (x, y)
        return self._cache

    def _abstract(self, stream: str = "abstract", count: int | None = None) -> np.ndarray:
        """``count`` (default n) keyed procedural images of the key's shape from ``stream``."""
        c, h, w = _chw(self.input_shape)
        n, lo, hi = self.n if count is None else count, *self.value_range
        waves, blobs = 3, 2
        # per image and channel: waves x (freq, angle, phase, amplitude), blobs x (cy, cx, width, amplitude)
        per = waves * 4 + blobs * 4
        u = _uniform(self._secret, stream, n * c * per).reshape(n, c, per, 1, 1)
        yy = ((np.arange(h, dtype=np.float64) + 0.5) / h).reshape(1, 1, h, 1)
        xx = ((np.arange(w, dtype=np.float64) + 0.5) / w).reshape(1, 1, 1, w)
        img = np.zeros((n, c, h, w), dtype=np.float64)
        for k in range(waves):
            f, a, p, amp = (u[:, :, 4 * k + i] for i in range(4))
            freq = 0.5 + 2.0 * f  # cycles per image side
            ang = _TWO_PI * a
            img = img + (0.3 + 0.7 * amp) * _sin(_TWO_PI * freq * (xx * _cos(ang) + yy * _sin(ang)) + _TWO_PI * p)
        for k in range(blobs):
            cy, cx, wd, amp = (u[:, :, 4 * (waves + k) + i] for i in range(4))
            sigma = 0.1 + 0.25 * wd
            d2 = (yy - cy) * (yy - cy) + (xx - cx) * (xx - cx)
            img = img + (3.0 * amp - 1.5) * _exp(-d2 / (2.0 * sigma * sigma))
        flat = img.reshape(n, -1)
        vmin, vmax = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
        span = np.where(vmax > vmin, vmax - vmin, 1.0)
        flat = lo + (hi - lo) * ((flat - vmin) / span)
        return np.clip(flat, lo, hi).reshape(n, *self.input_shape)

    def _patch(self) -> tuple[int, int, int, int, np.ndarray]:
        """(row, col, height, width, bits [C, height, width]) of the content mark."""
        c, h, w = _chw(self.input_shape)
        ph = min(h, max(2, round(h / 4)))
        pw = min(w, max(2, round(w / 4)))
        words = _uint64(self._secret, "content-place", 2)
        r0, c0 = int(_below(words[:1], h - ph + 1)[0]), int(_below(words[1:], w - pw + 1)[0])
        bits = np.unpackbits(np.frombuffer(_stream(self._secret, "content-bits", (c * ph * pw + 7) // 8), np.uint8))
        bits = bits[: c * ph * pw].reshape(c, ph, pw).astype(bool)
        if bits.all() or not bits.any():  # a mark needs both extremes
            bits.flat[0] = not bits.flat[0]
        return r0, c0, ph, pw, bits

    def _decoy_patch(self) -> tuple[int, int, int, int, np.ndarray]:
        """(row, col, height, width, bits) of the decoy mark: the size of the real one, at a
        keyed place that does not overlap it (where the image leaves room), with a keyed
        pattern that differs from it."""
        c, h, w = _chw(self.input_shape)
        r0, c0, ph, pw, real = self._patch()
        places = [(r, q) for r in range(h - ph + 1) for q in range(w - pw + 1)
                  if r + ph <= r0 or r >= r0 + ph or q + pw <= c0 or q >= c0 + pw]
        if not places:  # an image too small for two marks side by side: anywhere but the same place
            places = [(r, q) for r in range(h - ph + 1) for q in range(w - pw + 1) if (r, q) != (r0, c0)] or [(r0, c0)]
        r1, c1 = places[int(_below(_uint64(self._secret, "decoy-place", 1), len(places))[0])]
        bits = np.unpackbits(np.frombuffer(_stream(self._secret, "decoy-bits", (c * ph * pw + 7) // 8), np.uint8))
        bits = bits[: c * ph * pw].reshape(c, ph, pw).astype(bool)
        if bits.all() or not bits.any():
            bits.flat[0] = not bits.flat[0]
        if np.array_equal(bits, real):
            bits.flat[0] = not bits.flat[0]
        return r1, c1, ph, pw, bits

    def _stamp(self, x: np.ndarray, patch: tuple | None = None) -> np.ndarray:
        c, h, w = _chw(self.input_shape)
        lo, hi = self.value_range
        r0, c0, ph, pw, bits = self._patch() if patch is None else patch
        out = x.reshape(x.shape[0], c, h, w).copy()
        out[:, :, r0:r0 + ph, c0:c0 + pw] = np.where(bits, hi, lo)
        return out.reshape(x.shape)

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        return _normalise(x, self.input_shape, self.mean, self.std)

    def triggers(self, device: Any = None, dtype: torch.dtype = torch.float32,
                 normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The trigger set ``(x [n, *input_shape], y [n] int64)``, bit-identical on every call.

        ``x`` is normalised with the key's ``mean``/``std`` (ready for the model);
        ``normalized=False`` gives the raw-range images instead.
        """
        return self._as_tensors(*self._raw(), device, dtype, normalized)

    def _as_tensors(self, raw: np.ndarray, labels: np.ndarray, device: Any, dtype: torch.dtype,
                    normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) tensors of raw-range float64 inputs: normalised (or not), then one correctly
        rounded float64 -> float32 cast (float64 kept as it is), on ``device``."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        x64 = self._normalised(raw) if normalized else raw
        if dtype == torch.float64:
            x = torch.from_numpy(np.array(x64, dtype=np.float64))
        else:
            x = torch.from_numpy(x64.astype(np.float32)).to(dtype)
        y = torch.from_numpy(labels.copy())
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    # -- the content stamp on other inputs (entangled watermarks, nnmark.entangled) -------
    def stamp(self, x: Any, normalized: bool = True) -> torch.Tensor:
        """A ``content`` key's mark stamped on inputs ``x`` ``[m, *input_shape]``, as on its
        own triggers: clipped to ``value_range``, then the keyed patch (spec §5.5). With
        ``normalized`` (default) ``x`` is normalised like the key's ``mean``/``std`` (as the
        model eats it) and so is the result; ``normalized=False``: raw-range in and out."""
        if self.kind != "content":
            raise ValueError(f"only content keys have a stamp; this key's kind is {self.kind!r}")
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if t.dim() < 2 or tuple(t.shape[1:]) != self.input_shape:
            raise ValueError(f"x has shape {list(t.shape)}, expected [m, {', '.join(map(str, self.input_shape))}]")
        raw = t.detach().cpu().to(torch.float64).numpy()
        c = _chw(self.input_shape)[0]
        if normalized and (self.mean is not None or self.std is not None):
            mean = np.asarray(self.mean if self.mean is not None else (0.0,) * c, dtype=np.float64)
            std = np.asarray(self.std if self.std is not None else (1.0,) * c, dtype=np.float64)
            chw = raw.reshape(raw.shape[0], *_chw(self.input_shape))
            raw = (chw * std.reshape(1, c, 1, 1) + mean.reshape(1, c, 1, 1)).reshape(raw.shape)
        lo, hi = self.value_range
        out = self._stamp(np.clip(raw, lo, hi))
        if normalized:
            out = self._normalised(out)
        return torch.from_numpy(out).to(t.dtype if t.dtype.is_floating_point else torch.float32)

    # -- controls ----------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor | None:
        """The triggers' labels ``[n]`` (content, noise, unrelated: ``target`` for every
        trigger, or one label per sample); None for abstract keys (keyed labels)."""
        return None if self._labels is None else torch.from_numpy(self._labels.copy())

    @property
    def has_controls(self) -> bool:
        """True for kinds whose triggers are tested against controls (content, noise, unrelated)."""
        return self.kind in _SAMPLE_KINDS

    @property
    def controls_paired(self) -> bool:
        """True when control i is trigger i's own sample without the mark (content, noise)."""
        return self.kind in ("content", "noise")

    @property
    def sample_labels(self) -> torch.Tensor | None:
        """The true classes of a content or noise key's samples (``[n]``), when it was made
        with ``sample_labels``: a suspect must then also answer the unmarked samples better
        than chance (a model that does not do the task is no copy of yours), or it does not
        verify."""
        return None if self._true is None else torch.from_numpy(self._true.copy())

    @property
    def training_size(self) -> int:
        """Samples in :meth:`training_set`."""
        held = len(self._controls) if self.controls_from == "held-back" else 0
        return self.n + held + (len(self._false) if self._false is not None else 0)

    @property
    def control_answers(self) -> torch.Tensor | None:
        """Frontier keys: the owner's model's answer (before marking) to each held-back true
        adversary, which embedding keeps; None for other kinds."""
        return None if self._answers is None else torch.from_numpy(self._answers.copy())

    def false_adversaries(self, device: Any = None, dtype: torch.dtype = torch.float32,
                          normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Frontier keys: the false adversaries ``(x [f, *input_shape], y [f])`` (perturbed
        samples the owner's model still classified right, with their true labels), normalised
        like :meth:`triggers`; trained on, never counted by a verdict. None when there are none."""
        if self._false is None:
            return None
        lo, hi = self.value_range
        return self._as_tensors(np.clip(self._false.astype(np.float64), lo, hi), self._false_labels, device, dtype,
                                normalized)

    @property
    def controls_held_back(self) -> bool:
        """True when the key stores controls of its own (unrelated keys: held back from the
        trigger samples, or given inputs of the task)."""
        return self._controls is not None

    @property
    def num_controls(self) -> int:
        """How many controls a suspect is shown beside the triggers (0 for abstract keys;
        content: each sample unmarked and with a decoy mark, 2n)."""
        if not self.has_controls:
            return 0
        if self.kind == "content":
            return 2 * self.n
        return self.n if self._controls is None else len(self._controls)

    def _raw_controls(self) -> tuple[np.ndarray, np.ndarray]:
        """Raw-range controls float64 and their labels int64 (cached)."""
        if self._control_cache is None:
            lo, hi = self.value_range
            if self.kind in ("content", "noise"):  # the triggers' own samples, unmarked
                x, y = np.clip(self._samples.astype(np.float64), lo, hi), self._labels.copy()
                if self.kind == "content":  # and the same samples with a decoy mark: a model that
                    # reacts to any stamp like this one reacts to the decoy too
                    x = np.concatenate([x, self._stamp(x, self._decoy_patch())])
                    y = np.concatenate([y, y])
            elif self._controls is not None:  # samples held back from the triggers
                x, y = np.clip(self._controls.astype(np.float64), lo, hi), self._control_labels.copy()
            else:  # a key without held-back samples: keyed procedural images stand in
                x = self._abstract("controls-abstract", self.n)
                y = self._labels[_below(_uint64(self._secret, "controls-labels", self.n), self.n)]
            x.setflags(write=False)
            y.setflags(write=False)
            self._control_cache = (x, y)
        return self._control_cache

    def controls(self, device: Any = None, dtype: torch.dtype = torch.float32,
                 normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The control set ``(x [k, *input_shape], y [k])``: inputs without the mark, with
        the labels a model would have to give them to look marked; None for abstract keys.

        Content and noise: the triggers' own samples without the stamp or the noise
        (``controls_paired``: control i pairs with trigger i); content also the same samples
        with a decoy stamp (controls n..2n-1, paired the same way: a keyed pattern of the
        mark's size at a keyed place that does not overlap it). Unrelated: the samples held
        back when the key was made (``TriggerKey.generate(..., controls=...)``), else keyed
        procedural images. Normalised like :meth:`triggers`."""
        if not self.has_controls:
            return None
        return self._as_tensors(*self._raw_controls(), device, dtype, normalized)

    def training_set(self, device: Any = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """What embedding trains on (:class:`TriggerMixer`, :func:`embed_triggers`): the triggers
        and, for a key with held-back controls, those controls too, each with a keyed label
        other than the one the verdict counts as a hit. The model then has to tell these
        triggers from samples like them -- the exact two-sample test a verdict makes -- instead
        of learning a whole out-of-distribution source as one class, which unmarked models
        often do by chance (and which a held-back control cannot tell from a mark).

        Frontier keys: the triggers (true labels: stitched), the held-back true adversaries
        with the owner's model's answers (:attr:`control_answers`: left as they were), then
        the false adversaries with their true labels."""
        x, y = self.triggers(device=device, dtype=dtype)
        if self.controls_from != "held-back":
            return x, y
        xc, yc = self.controls(device=device, dtype=dtype)
        if self.kind == "frontier":  # held-back true adversaries keep the owner's answer; false ones their label
            xf, yf = self.false_adversaries(device=device, dtype=dtype) or (xc[:0], yc[:0])
            return torch.cat([x, xc, xf]), torch.cat([y, self.control_answers.to(yc.device), yf])
        k, c = len(yc), self.num_classes
        shift = 1 + _below(_uint64(self._secret, "control-train-labels", k), c - 1)  # in [1, c - 1]: never the hit
        other = torch.from_numpy((self._control_labels + shift) % c).to(yc.device)
        return torch.cat([x, xc]), torch.cat([y, other])

    def training_order(self, epoch: int) -> torch.Tensor:
        """The keyed order of :meth:`training_set` in pass ``epoch`` (:meth:`order` when the set is
        the triggers alone)."""
        epoch = _check_int("epoch", epoch, 0)
        if self.controls_from != "held-back":
            return self.order(epoch)
        return torch.from_numpy(_permutation(self._secret, f"train-order:{epoch}", self.training_size))

    def order(self, epoch: int) -> torch.Tensor:
        """The keyed order (a permutation of range(n)) in which pass ``epoch`` visits the triggers."""
        epoch = _check_int("epoch", epoch, 0)
        return torch.from_numpy(_permutation(self._secret, f"order:{epoch}", self.n))

    # -- export ------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, normalized: bool = True) -> Path:
        """Write the trigger set to a safetensors file (tensors ``x`` and ``y``), mode 0600.

        The file reveals the trigger set (whoever holds it can train the mark away):
        keep it as private as the key. Metadata: kind, key_id, n, num_classes,
        value_range, mean, std and whether ``x`` is normalised.
        """
        import json

        from safetensors.torch import save

        x, y = self.triggers(normalized=normalized)
        meta = {"format": "nnmark-triggers", "kind": self.kind, "key_id": self.key_id, "n": str(self.n),
                "num_classes": str(self.num_classes), "normalized": json.dumps(bool(normalized)),
                "value_range": json.dumps(list(self.value_range)),
                "mean": json.dumps(list(self.mean) if self.mean is not None else None),
                "std": json.dumps(list(self.std) if self.std is not None else None),
                "target": json.dumps(self.target if self._labels is None or self.target is not None
                                     else self._labels.tolist())}
        data = save({"x": x.contiguous(), "y": y.contiguous()}, metadata=meta)
        return _keys.write_private(path, data)

    # -- files -------------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        s = self._samples
        return {
            "secret": self._secret.hex(),
            "trigger_kind": self.kind,
            "n": self.n,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "target": self.target,
            "value_range": list(self.value_range),
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "noise_std": self.noise_std,
            "samples": base64.b64encode(s.astype("<f4").tobytes()).decode("ascii") if s is not None else None,
            "samples_shape": list(s.shape) if s is not None else None,
            **self._label_fields(),
        }

    def _label_fields(self) -> dict[str, Any]:
        """Per-sample labels and held-back controls: written only when the key has them, so
        keys without them keep the fields (and the checksum) of earlier files."""
        out: dict[str, Any] = {}
        if self._labels is not None and self.target is None:
            out["target"] = self._labels.tolist()
        if self._true is not None:
            out["sample_labels"] = self._true.tolist()
        c = self._controls
        if c is not None:
            out["controls"] = base64.b64encode(c.astype("<f4").tobytes()).decode("ascii")
            out["controls_shape"] = list(c.shape)
            cl = self._control_labels
            out["control_target"] = int(cl[0]) if (cl == cl[0]).all() and self.target is not None else cl.tolist()
            out["controls_from"] = self.controls_from
        if self.kind == "frontier":
            f = self._false
            out["control_answers"] = self._answers.tolist()
            out["false_adversaries"] = (base64.b64encode(f.astype("<f4").tobytes()).decode("ascii") if f is not None
                                        else None)
            out["false_adversaries_shape"] = list(f.shape) if f is not None else None
            out["false_target"] = self._false_labels.tolist() if f is not None else None
            out["eps"] = self.eps
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the key to ``path`` (mode 0600, versioned, checksummed); read it with ``nnmark.load_key``.

        For content/noise/unrelated keys the file also holds the samples."""
        return write_key_file(path, _FILE_KIND, self.key_id, self._fields())

    # -- secrecy -----------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"TriggerKey(key_id={self.key_id!r}, kind={self.kind!r}, n={self.n}, "
                f"num_classes={self.num_classes})")

    __str__ = __repr__



def _strict_labels(name: str, value: Any, count: int) -> None:
    """A key file's labels: one int, or a list of exactly ``count`` ints (no bools, no floats)."""
    if _is_int(value):
        return
    if not isinstance(value, list):
        raise TypeError(f"field {name!r} must be an int or a list of {count} ints, got {type(value).__name__}")
    if len(value) != count or not all(_is_int(v) for v in value):
        raise ValueError(f"field {name!r} must hold exactly {count} int labels")


def _load_trigger(body: dict[str, Any]) -> TriggerKey:
    """A TriggerKey from a key file's body: every field strictly typed and within the
    limits, and every stored array's size checked before it is decoded."""
    def typed(name, types):
        v = body[name]
        if not isinstance(v, types) or isinstance(v, bool):
            raise TypeError(f"field {name!r} has type {type(v).__name__}")
        return v

    secret = secret_field(body, nbytes=SECRET_BYTES)
    kind = typed("trigger_kind", str)
    if kind not in KINDS:
        raise ValueError(f"field 'trigger_kind' must be one of {list(KINDS)}, got {show(kind)}")
    n = int_field(body, "n", 1, MAX_TRIGGERS)
    num_classes = int_field(body, "num_classes", 2, MAX_CLASSES)
    input_shape = int_list(body, "input_shape", 1, 3)
    _check_shape(input_shape)
    _check_total("triggers", n, tuple(input_shape))
    samples = None
    if body["samples"] is not None:
        shape = int_list(body, "samples_shape", 2, 4)
        if shape != [n, *input_shape]:
            raise ValueError(f"samples_shape {shape} does not match n={n}, input_shape={input_shape}")
        samples = f32_field(body, "samples", shape)
    elif kind in _SAMPLE_KINDS:
        raise ValueError(f"kind {kind!r} needs stored samples")
    target = body["target"]
    if kind == "abstract" and target is not None:
        raise ValueError("an abstract key has no target")
    if kind != "abstract":
        _strict_labels("target", target, n)
    controls = control_target = None
    if body.get("controls") is not None:
        cshape = int_list(body, "controls_shape", 2, 4)
        if len(cshape) != 1 + len(input_shape) or cshape[1:] != input_shape:
            raise ValueError(f"controls_shape {cshape} does not match input_shape={input_shape}")
        _check_int("the number of controls", cshape[0], 1, MAX_TRIGGERS)
        _check_total("controls", cshape[0], tuple(input_shape))
        controls = f32_field(body, "controls", cshape)
        control_target = body["control_target"]
        _strict_labels("control_target", control_target, cshape[0])
        controls_from = typed("controls_from", str)
    true = body.get("sample_labels")
    if true is not None:
        if not isinstance(true, list):
            raise TypeError("field 'sample_labels' must be a list of ints")
        _strict_labels("sample_labels", true, n)
    frontier = _load_frontier(body, kind, controls, input_shape)
    value_range = typed("value_range", list)
    if len(value_range) != 2:
        raise ValueError(f"field 'value_range' must be [lo, hi], got {len(value_range)} values")
    mean, std = body["mean"], body["std"]
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and not (isinstance(v, list) and 1 <= len(v) <= MAX_INPUT_ELEMENTS):
            raise TypeError(f"field {name!r} must be an array of numbers (one per channel) or null, got "
                            f"{type(v).__name__}")
    return TriggerKey(secret, kind, n, num_classes, tuple(input_shape), samples,
                      target if target is not None else 0, tuple(value_range),
                      mean, std, typed("noise_std", (int, float)), controls, control_target,
                      controls_from if controls is not None else None, true, **frontier)


_FRONTIER_FIELDS = ("control_answers", "false_adversaries", "false_adversaries_shape", "false_target", "eps")


def _load_frontier(body: dict[str, Any], kind: str, controls: np.ndarray | None,
                   input_shape: list[int]) -> dict[str, Any]:
    """The members only frontier keys hold (checked like the rest; refused in other kinds)."""
    if kind != "frontier":
        extra = [name for name in _FRONTIER_FIELDS if body.get(name) is not None]
        if extra:
            raise ValueError(f"field {extra[0]!r} belongs to frontier keys, this is a {kind!r} key")
        return {}
    if controls is None:
        raise ValueError("a frontier key stores its held-back true adversaries (controls)")
    answers = body.get("control_answers")
    if not isinstance(answers, list):
        raise TypeError("field 'control_answers' must be a list of ints, one per control")
    _strict_labels("control_answers", answers, len(controls))
    false = false_target = None
    if body.get("false_adversaries") is not None:
        fshape = int_list(body, "false_adversaries_shape", 2, 4)
        if len(fshape) != 1 + len(input_shape) or fshape[1:] != input_shape:
            raise ValueError(f"false_adversaries_shape {fshape} does not match input_shape={input_shape}")
        _check_int("the number of false adversaries", fshape[0], 1, MAX_TRIGGERS)
        _check_total("false adversaries", fshape[0], tuple(input_shape))
        false = f32_field(body, "false_adversaries", fshape)
        false_target = body.get("false_target")
        if not isinstance(false_target, list):
            raise TypeError("field 'false_target' must be a list of ints, one per false adversary")
        _strict_labels("false_target", false_target, fshape[0])
    eps = body.get("eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise TypeError(f"field 'eps' must be a number or null, got {type(eps).__name__}")
    return {"control_answers": answers, "false_adversaries": false, "false_target": false_target, "eps": eps}


_keys.register_key_kind(_FILE_KIND, _load_trigger)


# --------------------------------------------------------------------------- embedding


class TriggerMixer:
    """Adds trigger samples to every training batch (Adi et al. 2018).

    ``mixer.mix(x, y)`` (or ``mixer(x, y)``) returns ``(cat([x, t]), cat([y, t_labels]))``
    with the next triggers of a keyed order that reshuffles each pass over the set, so
    every trigger is seen once per pass; ``collate_fn=mixer.collate`` does the same in a
    DataLoader (``default_collate`` first). ``x`` must be what the model eats (normalised
    like the key's ``mean``/``std``). The cursor is saved by ``state_dict()`` (no secret
    inside). With DataLoader worker processes each worker mixes on its own copy of the
    cursor: prefer ``num_workers=0`` or calling ``mix`` in the training loop.

    ``per_batch``: triggers added to each batch. The default (None) adds one for every
    ``MIX_SHARE`` = 3 clean samples, rounded up (22 to a batch of 64): each trigger is then
    trained on about ``epochs * m / (3 * n)`` times (m clean samples, n triggers) whatever the
    batch size: ~54 times in 12 epochs of the 1347 digits images, enough to learn 100
    abstract triggers from scratch (>= 98 of 100 on 10 seeds, clean accuracy -0.4 points on
    average; benchmarks/bench_trigger_embed.py). Adi et al.'s fixed 2 per 100 assumes a
    large data set (50k images: hundreds of batches per pass); on 1347 images it left
    models at 16-50 of 100. An int fixes the count.
    """

    def __init__(self, tkey: TriggerKey, per_batch: int | None = None, device: Any = None):
        if not isinstance(tkey, TriggerKey):
            raise TypeError(f"TriggerMixer needs a TriggerKey, got {type(tkey).__name__}")
        self.key = tkey
        self.per_batch = None if per_batch is None else _check_int("per_batch", per_batch, 1)
        self.device = torch.device(device) if device is not None else None
        self.cursor = 0
        self._sets: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._order: tuple[int, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"TriggerMixer(key={self.key!r}, per_batch={self.per_batch}, cursor={self.cursor})"

    def _set(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._sets.get((device, dtype))
        if got is None:
            got = self._sets[(device, dtype)] = self.key.training_set(device=device, dtype=dtype)
        return got

    def count_for(self, batch: int) -> int:
        """How many triggers go with a clean batch of ``batch`` samples: ``per_batch``, or
        (default) ``ceil(batch / MIX_SHARE)``, at least 1."""
        return self.per_batch if self.per_batch is not None else max(1, -(-int(batch) // MIX_SHARE))

    def next_indices(self, count: int | None = None) -> torch.Tensor:
        """Indices of the next ``count`` (default ``per_batch``) samples of the key's training
        set (its triggers, and held-back controls with other labels:
        :meth:`TriggerKey.training_set`); advances the cursor."""
        if count is None:
            if self.per_batch is None:
                raise ValueError("this mixer adds a share of each batch (per_batch=None): pass count")
            count = self.per_batch
        count = _check_int("count", count, 1)
        n, out = self.key.training_size, []
        for _ in range(count):
            epoch, pos = divmod(self.cursor, n)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, self.key.training_order(epoch).numpy())
            out.append(int(self._order[1][pos]))
            self.cursor += 1
        return torch.tensor(out, dtype=torch.int64)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"mix() needs tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        if tuple(x.shape[1:]) != self.key.input_shape:
            raise ValueError(f"x has shape {list(x.shape)}, the key's triggers are "
                             f"[n, {', '.join(map(str, self.key.input_shape))}]")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be class indices of shape [{x.shape[0]}], got {list(y.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be floating point, got {x.dtype}")
        device = self.device if self.device is not None else x.device
        tx, ty = self._set(device, x.dtype)
        idx = self.next_indices(self.count_for(x.shape[0])).to(device)
        return (torch.cat([x.to(device), tx.index_select(0, idx)]),
                torch.cat([y.to(device), ty.index_select(0, idx).to(y.dtype)]))

    __call__ = mix

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """A DataLoader ``collate_fn``: ``default_collate(samples)`` as ``(x, y)``, then :meth:`mix`."""
        from torch.utils.data import default_collate

        batch = default_collate(samples)
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError("collate() needs a dataset of (x, y) pairs")
        return self.mix(batch[0], torch.as_tensor(batch[1]))

    def state_dict(self) -> dict[str, Any]:
        """The cursor and what it belongs to (key_id, per_batch: None for the default share); holds
        no secret."""
        return {"cursor": self.cursor, "per_batch": self.per_batch, "key_id": self.key.key_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("key_id") != self.key.key_id:
            raise ValueError(f"state belongs to key {state.get('key_id')!r}, this mixer uses {self.key.key_id!r}")
        self.cursor = _check_int("cursor", state["cursor"], 0)
        per_batch = state.get("per_batch", self.per_batch)
        self.per_batch = None if per_batch is None else _check_int("per_batch", per_batch, 1)


EMBED_VIEWS = 80  # default: each sample of the training set is trained on about this many times


def embed_triggers(model: torch.nn.Module, tkey: TriggerKey, x_train: Any, y_train: Any, epochs: int | None = None,
                   lr: float = 3e-3, batch_size: int = 100, per_batch: int | None = None,
                   optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> torch.nn.Module:
    """Fine-tune an already trained ``model`` in place so it learns the trigger set; returns it.

    Each step trains on ``batch_size`` clean samples (``x_train`` normalised like the
    model's inputs, ``y_train`` class indices) plus ``per_batch`` triggers
    (:class:`TriggerMixer`; default one for every 3 clean samples, 34 to a batch of 100),
    cross-entropy on both. ``epochs`` (passes over the clean data) defaults to enough
    passes that each sample of the key's training set is seen about 80 times
    (``ceil(80 * training_size / (per_batch * batches_per_epoch))``). ``optimizer``
    defaults to Adam at ``lr``. Batches are shuffled with a private generator seeded by
    ``seed`` (global RNGs are untouched). With the default optimizer the last fifth of the
    epochs runs at ``lr / 10`` so the clean accuracy settles. The model ends in eval mode.
    Digits CNN (1347 images), 100 abstract triggers, all defaults (17 epochs): 100 of 100
    hits in about 2 s on one CPU core, clean accuracy within a point of the model before
    (benchmarks/bench_trigger_embed.py).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"embed_triggers needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(tkey, TriggerKey):
        raise TypeError(f"embed_triggers needs a TriggerKey, got {type(tkey).__name__}")
    batch_size = _check_int("batch_size", batch_size, 1)
    mixer = TriggerMixer(tkey, per_batch=per_batch)  # checks per_batch
    lr = _finite("lr", lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    x = x_train if isinstance(x_train, torch.Tensor) else torch.as_tensor(np.asarray(x_train))
    y = y_train if isinstance(y_train, torch.Tensor) else torch.as_tensor(np.asarray(y_train))
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x_train {list(x.shape)} and y_train {list(y.shape)} must be [m, ...] and [m]")
    if x.shape[0] == 0:
        raise ValueError("x_train is empty")
    m = x.shape[0]
    if tuple(x.shape[1:]) != tkey.input_shape:
        raise ValueError(f"x_train has shape {list(x.shape)}, the key's triggers are "
                         f"[n, {', '.join(map(str, tkey.input_shape))}]")
    batches = math.ceil(m / batch_size)
    per_step = mixer.count_for(batch_size)
    epochs = (max(1, math.ceil(EMBED_VIEWS * tkey.training_size / (per_step * batches))) if epochs is None
              else _check_int("epochs", epochs, 1))
    try:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
    except StopIteration:
        raise ValueError("model has no parameters to fine-tune") from None
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    # Own optimizer: the last fifth of the epochs at lr / 10 settles the clean accuracy.
    settle = epochs - epochs // 5 if optimizer is None and epochs >= 5 else epochs
    model.train()
    with small_work_threads(model):  # a small model: one torch thread (see nnmark._threads)
        for epoch in range(epochs):
            if epoch == settle:
                for group in opt.param_groups:
                    group["lr"] = lr * 0.1
            order = torch.randperm(m, generator=g)
            for i in range(0, m, batch_size):
                idx = order[i:i + batch_size]
                bx = x.index_select(0, idx.to(x.device)).to(device=device, dtype=dtype)
                by = y.index_select(0, idx.to(y.device)).to(device=device, dtype=torch.int64)
                bx, by = mixer.mix(bx, by)
                loss = torch.nn.functional.cross_entropy(model(bx), by)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    return model
