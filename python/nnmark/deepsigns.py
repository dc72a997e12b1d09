"""DeepSigns (Rouhani, Chen, Koushanfar, ASPLOS 2019): a white-box mark in activations.

The mark lives in the mean activation of one hidden layer over a keyed subset of the
owner's training inputs of a few chosen classes (the centres of those classes' Gaussians
in the paper's mixture model), projected by a keyed matrix: bit t is the sign of
``X[t] . mu_c(t)``, ``mu_c`` the mean of the layer's flattened output over the key's
inputs of class c, and class c(t) = ``classes[t mod s]`` (each row of X is used for one
class only, so every extracted bit is a fair coin over the key's randomness).

The key (:class:`DeepSignsKey`) holds a 32-byte secret, the layer's name, the owner's
bits, the chosen classes and the keyed inputs with their labels (the verifier must run
the model on them, so the key file is self-contained; like every key file it is secret).
The projection X in {-1, +1}^{T x M} is regenerated from the secret as key spec v1 does
(Philox under the subkey of the carrier name ``"deepsigns:" + layer``), never stored:
docs/spec.md §9.

Embed: ``loss = task_loss + nnmark.DeepSigns(key, strength=...).penalty(model)`` each
step: ``strength`` x the binary cross-entropy of sigmoid(projection of the class means)
against the bits (a sum over bits, as Uchida's penalty), plus ``centre`` x the mean
squared distance of the key inputs' activations from their class mean, which keeps each
class tight around its centre (the paper's first loss term). Unlike the paper, the
centres are the class means themselves rather than separately trained variables: the
penalty acts directly on what extraction reads.

Check: ``nnmark.verify(key, model_or_state_dict_or_file, arch=...)`` runs the model on the
key's inputs (one batch per model, a forward hook on the layer) through the trigger
checks' inference path, and projects the class means of every model in one native call.
Under the null (a model that does not carry the key) each bit matches with probability
1/2: exact binomial p-value.
"""
from __future__ import annotations

import base64
import hashlib
import math
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import keys as _keys
from ._keyfile import f32_field, int_field, int_list, is_int, secret_field, show
from .checkpoints import CheckpointError
from .keys import MAX_BITS, MAX_NAME_CHARS, SECRET_BYTES, message_bits, projection_subkeys, write_key_file
from .stats import binomial_threshold, check_alpha, check_null_rate
from .triggers import MAX_CLASSES, MAX_INPUT_ELEMENTS, MAX_TRIGGER_ELEMENTS, MAX_TRIGGERS

FILE_KIND = "deepsigns"
PROJECTION_PREFIX = "deepsigns:"  # the subkey's carrier name is this + the layer (docs/spec.md §9.3)
_KEY_ID_DOMAIN = b"nnmark:deepsigns:v1:key-id"
_STREAM_DOMAIN = b"nnmark:deepsigns:v1:"
MAX_INPUT_DIMS = 4  # one input: [D], [L, D], [C, H, W] or [C, D, H, W]
DEFAULT_PER_CLASS = 32


# ------------------------------------------------------------------ keyed choices (generate only)
def _words(secret: bytes, name: str, count: int) -> np.ndarray:
    raw = hashlib.shake_256(_STREAM_DOMAIN + name.encode("ascii") + b"\x00" + secret).digest(8 * max(count, 1))
    return np.frombuffer(raw, dtype="<u8")


def _permutation(secret: bytes, name: str, n: int) -> np.ndarray:
    """A keyed permutation of range(n) (Fisher-Yates on a keyed stream)."""
    words = _words(secret, name, n)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(words[i] % np.uint64(i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


# ------------------------------------------------------------------ validation
def _check_layer(layer: Any) -> str:
    if not isinstance(layer, str) or not layer or len(layer) > MAX_NAME_CHARS:
        raise ValueError(f"layer must be a non-empty module name such as 'classifier.1' (at most "
                         f"{MAX_NAME_CHARS} characters), got {show(layer)}")
    try:
        layer.encode("utf-8")  # its UTF-8 bytes enter the subkey
    except UnicodeEncodeError:
        raise ValueError(f"layer {show(layer)} is not valid Unicode text") from None
    return layer


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {show(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def _as_array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{what} must be an array, got {type(value).__name__}")
    try:
        return np.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a numeric array, got {type(value).__name__}") from None


def _check_inputs(inputs: Any) -> np.ndarray:
    """The key's inputs as float32 ``[n, *input_shape]``: finite and within the limits."""
    arr = _as_array(inputs, "inputs")
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"inputs must hold numbers, got dtype {arr.dtype}")
    if not 2 <= arr.ndim <= 1 + MAX_INPUT_DIMS or 0 in arr.shape:
        raise ValueError(f"inputs must be a non-empty [n, *input_shape] array with 1 to {MAX_INPUT_DIMS} input "
                         f"dims, got shape {list(arr.shape)}")
    n, per = arr.shape[0], math.prod(arr.shape[1:])
    _check_int("the number of inputs", n, 1, MAX_TRIGGERS)
    if per > MAX_INPUT_ELEMENTS:
        raise ValueError(f"one input has {per} elements, more than {MAX_INPUT_ELEMENTS}")
    if n * per > MAX_TRIGGER_ELEMENTS:
        raise ValueError(f"{n} inputs of {per} elements hold {n * per} values, more than {MAX_TRIGGER_ELEMENTS}")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)  # the key's own copy: the caller's stays writable
    if not np.isfinite(out).all():
        raise ValueError("inputs contain NaN or Inf (or values beyond float32)")
    return out


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    arr = _as_array(labels, "labels")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be [n] = [{n}] class indices, got shape {list(arr.shape)}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"labels must be in [0, {num_classes}), found {bad[:3].tolist()}")
    return arr


def _check_classes(classes: Any, num_classes: int, num_bits: int) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple, np.ndarray, torch.Tensor)):
        raise TypeError(f"classes must be a list of class indices, got {type(classes).__name__}")
    vals = classes.tolist() if isinstance(classes, (np.ndarray, torch.Tensor)) else list(classes)
    if not vals or not all(is_int(c) for c in vals):
        raise ValueError(f"classes must be a non-empty list of ints, got {show(vals)}")
    vals = [int(c) for c in vals]
    if len(set(vals)) != len(vals):
        raise ValueError(f"classes must be distinct, got {show(vals)}")
    if any(not 0 <= c < num_classes for c in vals):
        raise ValueError(f"classes must be in [0, {num_classes}), got {show(vals)}")
    if len(vals) > num_bits:
        raise ValueError(f"{len(vals)} classes for {num_bits} bits: every class must carry at least one bit")
    return vals


# ------------------------------------------------------------------ the key
class DeepSignsKey(_keys.OwnerBits, _keys.HoldsSecret):
    """A DeepSigns key: secret, layer, owner bits, chosen classes, keyed inputs and labels.

    ``layer``: the name of the hidden layer (a submodule, as ``model.named_modules()``
    names it) whose output carries the mark, e.g. ``"classifier.1"`` (the first linear
    layer of :class:`nnmark.demo.DigitsNet`, before its ReLU: a layer whose outputs can
    take either sign embeds more easily than a ReLU's, benchmarks/RESULTS.md). ``inputs``: ``[n, *input_shape]``,
    exactly what the model eats (normalised as in training); ``labels``: their classes,
    each one of ``classes``, every class with at least one input. Bit t is carried by
    class ``classes[t % len(classes)]``. The projection is regenerated from the secret.
    """

    _KEY_ID_PREFIX = _KEY_ID_DOMAIN + b"\x00"

    kind = FILE_KIND
    file_kind = FILE_KIND

    def __init__(self, secret: bytes, layer: str, bits: Sequence[int], classes: Sequence[int], inputs: Any,
                 labels: Any, num_classes: int):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
            got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {got}")
        self._secret = bytes(secret)
        self.layer = _check_layer(layer)
        self._bits = _keys.as_bits(bits)
        self.num_classes = _check_int("num_classes", num_classes, 2, MAX_CLASSES)
        self.classes = tuple(_check_classes(classes, self.num_classes, self.num_bits))
        self._inputs = _check_inputs(inputs)
        self._inputs.setflags(write=False)
        self._labels = _check_labels(labels, len(self._inputs), self.num_classes)
        self._labels.setflags(write=False)
        missing = [c for c in self.classes if not (self._labels == c).any()]
        if missing:
            raise ValueError(f"classes {missing} have no input: every chosen class needs at least one")
        stray = sorted(set(self._labels.tolist()) - set(self.classes))
        if stray:
            raise ValueError(f"inputs of classes {stray[:3]} are not among the chosen classes {list(self.classes)}")
        _keys.min_bits_warning(self.num_bits)

    @classmethod
    def generate(cls, layer: str, samples: Any, labels: Any, bits: int = 64, classes: int | Sequence[int] = 2,
                 per_class: int = DEFAULT_PER_CLASS, num_classes: int | None = None,
                 message: str | bytes | None = None) -> "DeepSignsKey":
        """A new key with a fresh secret from ``os.urandom``.

        ``samples``: the owner's training inputs ``[m, *input_shape]`` as the model eats
        them, ``labels`` their classes ``[m]``. ``classes``: how many classes carry the mark
        (drawn by the key among those present in ``labels``), or the classes themselves.
        ``per_class``: inputs per chosen class, a keyed draw among its samples (all of them
        if it has fewer). ``bits``: the number of bits T; the owner's bits are random, or
        derived from ``message`` (:func:`nnmark.message_bits`). ``num_classes`` defaults
        to ``max(labels) + 1`` (at least 2). Only the chosen inputs enter the key.
        """
        T = _check_int("bits", bits, 1, MAX_BITS)
        per_class = _check_int("per_class", per_class, 1, MAX_TRIGGERS)
        x = _as_array(samples, "samples")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"samples must be a non-empty [m, *input_shape] array, got shape {list(x.shape)}")
        y = _as_array(labels, "labels")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels must be [m] = [{x.shape[0]}] class indices, got shape {list(y.shape)}")
        y = _check_labels(y, x.shape[0], MAX_CLASSES + 1)
        if num_classes is None:
            num_classes = max(2, int(y.max()) + 1)
        num_classes = _check_int("num_classes", num_classes, 2, MAX_CLASSES)
        if int(y.max()) >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), found {int(y.max())}")
        secret = os.urandom(SECRET_BYTES)
        present = np.unique(y)
        if is_int(classes):
            s = _check_int("classes", classes, 1, min(T, len(present)))
            chosen = [int(present[i]) for i in _permutation(secret, "classes", len(present))[:s]]
        else:
            chosen = _check_classes(classes, num_classes, T)
            absent = [c for c in chosen if c not in set(present.tolist())]
            if absent:
                raise ValueError(f"classes {absent} have no samples in labels")
        pick = []
        for c in chosen:
            idx = np.flatnonzero(y == c)
            pick.append(idx[_permutation(secret, f"inputs:{c}", len(idx))[:per_class]])
        pick = np.concatenate(pick)
        owner = (message_bits(message, T) if message is not None
                 else np.unpackbits(np.frombuffer(os.urandom((T + 7) // 8), dtype=np.uint8))[:T])
        return cls(secret, layer, owner, chosen, x[pick], y[pick], num_classes)

    # -- public properties ------------------------------------------------------------
    @property
    def n(self) -> int:
        """How many inputs the key holds."""
        return int(self._inputs.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._inputs.shape[1:])

    @property
    def labels(self) -> torch.Tensor:
        """The classes of the key's inputs, int64 ``[n]``."""
        return torch.from_numpy(self._labels.copy())

    def inputs(self, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The key's inputs ``[n, *input_shape]`` (what the model is run on)."""
        x = torch.from_numpy(self._inputs.copy()).to(dtype)
        return x.to(device) if device is not None else x

    def subkey(self) -> tuple[int, int]:
        """Philox key (k0, k1) of the projection (spec v1's subkey of ``"deepsigns:" + layer``). Secret."""
        k0, k1 = projection_subkeys(self._secret, PROJECTION_PREFIX + self.layer)[0].tolist()
        return k0, k1

    def bit_classes(self) -> torch.Tensor:
        """For each bit t, the index into ``classes`` of the class carrying it: ``t mod s``, int64 ``[T]``."""
        return torch.arange(self.num_bits) % len(self.classes)

    def averaging(self, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``G [s, n]`` with ``G @ activations`` the class means: ``G[j, i] = 1/n_j`` when input i is of
        class ``classes[j]`` (n_j such inputs), else 0."""
        onehot = torch.from_numpy((self._labels[None, :] == np.asarray(self.classes)[:, None]).astype(np.float64))
        g = onehot / onehot.sum(dim=1, keepdim=True)
        return g.to(device=device, dtype=dtype)

    def project(self, means: torch.Tensor) -> torch.Tensor:
        """Projections ``[T]`` (``[K, T]`` for a batch ``[K, s, M]``) of the class means
        ``[s, M]``: ``p_t = X[t] . means[t mod s]``. One native call; differentiable."""
        batched = means.dim() == 3
        m = means if batched else means.unsqueeze(0)
        k, s, width = m.shape
        if s != len(self.classes):
            raise ValueError(f"means has {s} rows, the key has {len(self.classes)} classes")
        from .ops import keyed_projection

        p = keyed_projection(m.reshape(k * s, width), self.subkey(), self.num_bits).reshape(k, s, self.num_bits)
        t = torch.arange(self.num_bits, device=p.device)
        out = p[:, t % s, t]
        return out if batched else out[0]

    # -- files --------------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        x = self._inputs
        return {
            "secret": self._secret.hex(),
            "layer": self.layer,
            "num_bits": self.num_bits,
            "bits": "".join(str(int(b)) for b in self._bits),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "inputs": base64.b64encode(x.astype("<f4").tobytes()).decode("ascii"),
            "inputs_shape": list(x.shape),
            "labels": self._labels.tolist(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the key to ``path`` (mode 0600, versioned, checksummed; it holds the inputs too);
        read it with ``nnmark.load_key``."""
        return write_key_file(path, FILE_KIND, self.key_id, self._fields())

    # -- secrecy -----------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"DeepSignsKey(key_id={self.key_id!r}, layer={self.layer!r}, bits={self.num_bits}, "
                f"classes={list(self.classes)}, n={self.n})")

    __str__ = __repr__



def _load_deepsigns(body: dict[str, Any]) -> DeepSignsKey:
    """A DeepSignsKey from a key file's body: every member strictly typed and within the
    limits, the inputs' size checked before they are decoded."""
    secret = secret_field(body, nbytes=SECRET_BYTES)
    layer = body["layer"]
    if not isinstance(layer, str):
        raise TypeError(f"field 'layer' must be a string, got {type(layer).__name__}")
    bits = _keys.bits_field(body)
    num_classes = int_field(body, "num_classes", 2, MAX_CLASSES)
    classes = body["classes"]
    if not isinstance(classes, list) or not 1 <= len(classes) <= min(bits.size, num_classes) \
            or not all(is_int(c) for c in classes):
        raise ValueError(f"field 'classes' must be an array of 1 to min(num_bits, num_classes) integers")
    shape = int_list(body, "inputs_shape", 2, 1 + MAX_INPUT_DIMS)
    _check_int("inputs_shape[0] (the number of inputs)", shape[0], 1, MAX_TRIGGERS)
    per = math.prod(shape[1:])
    if per > MAX_INPUT_ELEMENTS or shape[0] * per > MAX_TRIGGER_ELEMENTS:
        raise ValueError(f"field 'inputs_shape' {shape} is beyond the limits ({MAX_INPUT_ELEMENTS} values per "
                         f"input, {MAX_TRIGGER_ELEMENTS} in all)")
    inputs = f32_field(body, "inputs", shape)
    labels = body["labels"]
    if not isinstance(labels, list) or len(labels) != shape[0] or not all(is_int(v) for v in labels):
        raise ValueError(f"field 'labels' must be an array of exactly {shape[0]} integers")
    return DeepSignsKey(secret, layer, bits, classes, inputs, np.asarray(labels, dtype=np.int64), num_classes)


_keys.register_key_kind(FILE_KIND, _load_deepsigns)


def is_deepsigns_key(key) -> bool:
    return isinstance(key, DeepSignsKey)


# ------------------------------------------------------------------ embedding
class DeepSigns:
    """The DeepSigns embedding loss: add ``penalty(model)`` to the training loss each step.

    ``penalty = strength * sum_t BCE(sigmoid(p_t), b_t) + centre * mean_i,j (a_ij - mu_c(i),j)^2``
    where ``a`` are the layer's (flattened) activations on the key's inputs, ``mu_c`` their
    class means and ``p`` the keyed projections of the means (:meth:`DeepSignsKey.project`).
    The forward on the key's inputs runs in eval mode (no dropout noise, no batch-norm
    statistics updated: the activations extraction will read), every submodule's mode
    restored afterwards; under DataParallel / DDP it runs the wrapped module. Works on CPU
    and CUDA (the inputs follow the model's device). On the digits CNN (layer
    ``classifier.1``, 64 bits over 2 classes, 32 inputs each) the defaults embed every bit
    within 6 epochs of training from scratch, and after 30 epochs the clean accuracy is
    within half a point of the unmarked twin's (benchmarks/bench_deepsigns.py).
    """

    def __init__(self, key: DeepSignsKey, strength: float = 0.1, centre: float = 0.01):
        if not isinstance(key, DeepSignsKey):
            raise TypeError(f"DeepSigns needs a DeepSignsKey, got {type(key).__name__}")
        for name, v in (("strength", strength), ("centre", centre)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not strength > 0:
            raise ValueError(f"strength must be > 0, got {strength!r}")
        self.key = key
        self.strength = float(strength)
        self.centre = float(centre)
        self._inputs: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> the key's inputs there
        self._aux: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"DeepSigns(key={self.key!r}, strength={self.strength}, centre={self.centre})"

    def _aux_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(averaging matrix G [s, n], owner bits as float [T], class index of each input [n]) on ``device``."""
        got = self._aux.get(device)
        if got is None:
            k = self.key
            got = self._aux[device] = (k.averaging(device=device), k.bits.to(device=device, dtype=torch.float32),
                                       torch.as_tensor([k.classes.index(int(c)) for c in k._labels], device=device))
        return got

    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The trainable parameters the penalty can move (those of the whole model; the ones
        after the layer get no gradient)."""
        return [p for p in model.parameters() if p.requires_grad]

    @staticmethod
    def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
        """The module itself under DataParallel / DistributedDataParallel: their forward
        belongs to the training step (DDP would expect a backward for it), so the key's
        inputs run through the wrapped module."""
        from torch.nn.parallel import DataParallel, DistributedDataParallel

        while isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        return model

    def layer_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's submodule named by the key's layer (wrapper prefixes tolerated);
        KeyError naming the layer when there is none."""
        from .inference import find_layer

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"penalty() needs a torch.nn.Module, got {type(model).__name__}")
        model = self._unwrapped(model)
        layer = self._layers.get(model)
        if layer is None:
            try:
                layer = self._layers[model] = find_layer(model, self.key.layer)
            except CheckpointError as exc:
                raise KeyError(str(exc)) from None
        return layer

    def activations(self, model: torch.nn.Module) -> torch.Tensor:
        """The layer's flattened activations ``[n, M]`` on the key's inputs (differentiable)."""
        layer = self.layer_of(model)
        model = self._unwrapped(model)
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = self._inputs.get((device, dtype))
        if x is None:
            x = self._inputs[(device, dtype)] = self.key.inputs(device=device, dtype=dtype)
        kept: list[torch.Tensor] = []

        def keep(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {self.key.layer!r} returns {type(output).__name__}, not a tensor")
            kept.append(output)

        modes = [(m, m.training) for m in model.modules()]
        handle = layer.register_forward_hook(keep)
        try:
            model.eval()(x)
        finally:
            handle.remove()
            for m, mode in modes:
                m.training = mode
        if not kept:
            raise RuntimeError(f"layer {self.key.layer!r} did not run in the model's forward pass")
        a = kept[0]
        return a.reshape(a.shape[0], -1)

    def losses(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(projections [T], BCE sum, centre term)`` of the model now (differentiable)."""
        a = self.activations(model)
        if a.dtype != torch.float64:
            a = a.float()
        g, target, which = self._aux_on(a.device)
        means = g.to(a.dtype) @ a  # [s, M]: one matmul, no per-sample loop
        p = self.key.project(means)
        bce = F.binary_cross_entropy_with_logits(p.float(), target, reduction="sum")
        centre = ((a - means[which]) ** 2).mean()
        return p, bce, centre

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """The scalar loss to add to the task loss."""
        _, bce, centre = self.losses(model)
        return self.strength * bce + self.centre * centre.float()

    @torch.no_grad()
    def ber(self, model: torch.nn.Module) -> float:
        """Bit error rate of the model's extracted bits against the owner's."""
        p = self.losses(model)[0]
        return float(((p > 0).to(torch.uint8).cpu() != self.key.bits).float().mean())


# ------------------------------------------------------------------ the check
class DeepSignsCheck:
    """One DeepSigns key made ready to check many models (what every front door uses).

    It runs models like trigger checks do (``trigger = True`` for the batch engine: modules
    run themselves, state dicts and files are loaded into ``arch``'s model,
    :func:`nnmark.inference.trigger_logits`), but keeps the layer's class means of the key's
    inputs instead of the logits, projects them for every model in one native call and
    counts the matching bits. The null: each bit matches with probability ``null_rate``
    (default 1/2), or the counts follow ``calibration``."""

    trigger = True  # it runs the model: the engine's path for keys that need arch=
    num_controls = None
    calibration_kind = "deepsigns"

    def __init__(self, key, alpha: float = 1e-6, null_rate: float | None = None, calibration=None):
        if not isinstance(key, DeepSignsKey):
            raise TypeError(f"expected a DeepSignsKey, got {type(key).__name__}")
        if calibration is not None and null_rate is not None:
            raise ValueError("give a calibration or a null_rate, not both")
        self.key = key
        self.key_id = key.key_id
        self.alpha = check_alpha(alpha)
        self.p0 = 0.5 if null_rate is None else check_null_rate(null_rate)
        self.null_rate = null_rate
        self.bits = n = key.num_bits
        self.calibration = calibration
        if calibration is not None:
            calibration.check_for(key)
            self.threshold = calibration.threshold_at(self.alpha)
            self.null = calibration.describe()
            self.warning = calibration.extrapolation(self.alpha)
        else:
            self.threshold = binomial_threshold(n, self.alpha, self.p0)
            self.null = f"binomial(p0={self.p0:.6g})"
            self.warning = None
        self.owner = key.bits.to(torch.bool)

    def class_means(self, sources: list, arch=None, device=None) -> tuple[torch.Tensor | None, list]:
        """``(means [K, s, M], errors)``: the layer's class means of the key's inputs per source."""
        from .inference import trigger_logits

        key = self.key
        g = key.averaging(dtype=torch.float64)
        cache: dict = {}

        def reduce(act: torch.Tensor) -> torch.Tensor:
            gd = cache.get(act.device)
            if gd is None:
                gd = cache[act.device] = g.to(device=act.device, dtype=torch.float32)
            return gd @ act  # [s, M]

        return trigger_logits(arch, sources, key.inputs(), device=device, layer=key.layer, reduce=reduce)

    def run(self, sources: list, arch=None, device=None) -> list:
        """Per source: the row's verdict fields (``matches``, ``ber``, ``p_value``, ``verified``)
        plus ``margin`` (the mean over bits of the signed cosine between projection row t and
        its class mean: 1 when every bit is as far on the owner's side as it can be), or a
        CheckpointError."""
        if not sources:
            return []
        means, errors = self.class_means(sources, arch, device)
        out: list = [None] * len(sources)
        ok = [k for k, e in enumerate(errors) if e is None]
        for k in ok:
            if not bool(torch.isfinite(means[k]).all()):
                errors[k] = CheckpointError("invalid", "NonFinite", f"the activations of layer {self.key.layer!r} "
                                                                    f"contain NaN or Inf")
        ok = [k for k, e in enumerate(errors) if e is None]
        if ok:
            m = means[ok]
            with torch.no_grad():
                p = self.key.project(m).double().cpu()  # [K, T]
            norms = m.double().norm(dim=2).cpu()[:, self.key.bit_classes()] * math.sqrt(m.shape[2])  # [K, T]
            sign = self.owner.double() * 2 - 1
            cos = torch.where(norms > 0, p / norms.clamp_min(1e-300), torch.zeros_like(p))
            margin = (cos * sign).mean(dim=1).tolist()
            matches = ((p > 0) == self.owner).sum(dim=1).tolist()
            for j, k in enumerate(ok):
                out[k] = self._fields(int(matches[j]), float(margin[j]))
        for k, e in enumerate(errors):
            if e is not None:
                out[k] = e if isinstance(e, CheckpointError) else CheckpointError("invalid", "InferenceError", str(e))
        return out

    def _fields(self, m: int, margin: float) -> dict:
        from .stats import binomial_p_value

        n = self.bits
        p = self.calibration.p_value(m) if self.calibration is not None else binomial_p_value(m, n, self.p0)
        return {"matches": m, "ber": 1.0 - m / n, "p_value": p, "verified": p <= self.alpha, "margin": margin}


def extract(key: DeepSignsKey, source, *, arch=None, device=None) -> torch.Tensor:
    """The bits a DeepSigns key extracts from a model (a module; or a state dict or file with
    ``arch``), uint8 ``[T]`` (``[K, T]`` for a list). ValueError when a source cannot be run."""
    from .checkpoints import label_of

    batch = isinstance(source, (list, tuple))
    sources = list(source) if batch else [source]
    if not sources:
        raise ValueError("extract() got an empty list of sources")
    if arch is None and any(not isinstance(s, torch.nn.Module) for s in sources):
        raise ValueError("a DeepSigns key runs the model: pass arch= (a model factory or 'module:function') to "
                         "extract from state dicts or checkpoint files")
    check = DeepSignsCheck(key)
    means, errors = check.class_means(sources, arch, device)
    for i, e in enumerate(errors):
        if e is not None:
            raise ValueError(f"{label_of(sources[i], i if batch else None)}: {e} (status {e.status})")
    with torch.no_grad():
        bits = (key.project(means) > 0).to(torch.uint8).cpu()
    return bits if batch else bits[0]


__all__ = ["DeepSignsKey", "DeepSigns", "DeepSignsCheck", "extract", "is_deepsigns_key"]
