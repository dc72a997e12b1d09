"""Overwriting: the attacker embeds a watermark of their own (a second white-box key, or a
trigger set) by training the marked model with it, hoping to erase or drown the owner's.

:func:`attacker_key_like` makes the attacker's key from the owner key's public shape
alone (kind, carrier, bit count, trigger count...), never from its secret, so a
robustness report can overwrite "with a key like the owner's" honestly.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..keys import SECRET_BYTES, DenseKey, WhiteBoxKey, WhiteBoxKeyBase
from ..stats import binomial_p_value
from ..triggers import TriggerKey, TriggerMixer
from ..whitebox import Uchida
from .data import check_pair, is_pair
from .finetune import (check_data, check_int, check_model, check_optimizer, check_positive, resolve_device, seeded,
                       train)

_SEED_DOMAIN = b"nnmark:attacker-key:v1:"
_BITS_DOMAIN = b"nnmark:attacker-bits:v1:"


@dataclass
class OverwriteRecord:
    """What ``overwrite`` did, and proof that it took: the attacker's own mark measured
    on the model afterwards (``attacker_ber`` and its p-value for a white-box key,
    ``attacker_trigger_acc`` and its p-value for a trigger key). ``final_loss``: mean
    training loss (task + penalty) over the last epoch. ``key_id`` is the attacker
    key's public fingerprint (never the secret)."""

    attack: str
    key_kind: str  # "whitebox", "whitebox-dense" or "trigger"
    carrier: str | None  # white-box keys
    n_triggers: int | None  # trigger keys
    epochs: int
    strength: float | None  # white-box keys
    final_loss: float
    attacker_ber: float | None = None
    attacker_trigger_acc: float | None = None
    attacker_p_value: float = 1.0
    lr: float = 0.01
    steps: int = 0
    per_batch: int | None = None  # trigger keys
    trigger_kind: str | None = None
    key_id: str = ""
    optimizer: str = "adam"


def _secret(seed: int | None) -> bytes:
    if seed is None:
        return os.urandom(SECRET_BYTES)
    seed = check_int("seed", seed, 0)
    return hashlib.sha256(_SEED_DOMAIN + str(seed).encode("ascii")).digest()


def attacker_key_like(owner_key, seed: int | None = None, samples: Any = None):
    """A fresh random key of the same shape as ``owner_key``, built only from its public
    parameters (the owner's secret, bits, projection matrix and samples are never read).

    - ``WhiteBoxKey``: same carrier, bit count, reduction and shape; new secret and bits.
    - ``DenseKey``: same carrier, bit count, reduction, order and shape; a new random
      +-1 matrix of the same size and new bits.
    - ``TriggerKey``: same kind, n, num_classes, input_shape, value range, normalisation,
      target and noise level; a new secret. The content / noise / unrelated kinds are
      built on in-distribution ``samples`` (``[m >= n, *input_shape]``, raw range), which
      the attacker must bring: the owner's are part of the owner's secret.

    ``seed``: None draws the secret from ``os.urandom``; an int derives it (and
    everything else) deterministically, for reproducible reports.
    """
    secret = _secret(seed)
    if isinstance(owner_key, WhiteBoxKeyBase):
        t = owner_key.num_bits
        stream = hashlib.shake_256(_BITS_DOMAIN + secret).digest((t + 7) // 8 + 8)
        bits = np.unpackbits(np.frombuffer(stream[:(t + 7) // 8], dtype=np.uint8))[:t]
        with warnings.catch_warnings():  # a short key already warned when the owner made theirs
            warnings.simplefilter("ignore")
            if isinstance(owner_key, WhiteBoxKey):
                return WhiteBoxKey(secret, owner_key.carrier, bits, owner_key.reduction, owner_key.shape)
            if isinstance(owner_key, DenseKey):
                rng = np.random.default_rng(int.from_bytes(stream[-8:], "little"))
                matrix = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(t, owner_key.length))
                return DenseKey(matrix, owner_key.carrier, bits, owner_key.reduction, owner_key.order,
                                owner_key.shape, matrix_layout="TN")  # built [T, N] here, square or not
    if isinstance(owner_key, TriggerKey):
        if owner_key.kind == "abstract":
            if samples is not None:
                raise ValueError("abstract trigger keys build their own images; samples must be None")
        elif samples is None:
            raise ValueError(f"a {owner_key.kind!r} trigger key is built on in-distribution samples: pass the "
                             f"attacker's own samples=[m >= {owner_key.n}, "
                             f"{', '.join(map(str, owner_key.input_shape))}] (the owner's are secret)")
        return TriggerKey(secret, owner_key.kind, owner_key.n, owner_key.num_classes, owner_key.input_shape,
                          samples, owner_key.target, owner_key.value_range, owner_key.mean, owner_key.std,
                          owner_key.noise_std)
    raise TypeError(f"attacker_key_like needs a WhiteBoxKey, DenseKey or TriggerKey, got {type(owner_key).__name__}")


def overwrite(model: torch.nn.Module, key, data: Any, strength: float = 0.01, epochs: int = 5, lr: float = 0.01,
              batch_size: int = 64, per_batch: int = 2, seed: int = 0, device: Any = None,
              optimizer: str = "adam", momentum: float = 0.9) -> OverwriteRecord:
    """Trains ``model`` (all layers, in place) on ``data`` while embedding the attacker's
    ``key``; returns an :class:`OverwriteRecord`.

    ``key``: a ``WhiteBoxKey`` / ``DenseKey`` — Uchida et al.'s penalty
    ``Uchida(key, strength)`` is added to the cross-entropy; or a ``TriggerKey`` —
    ``per_batch`` triggers are mixed into every batch (``TriggerMixer``; ``strength``
    is then unused). Use :func:`attacker_key_like` for a key shaped like the owner's.
    ``optimizer``: ``"adam"`` (default) or ``"sgd"`` with ``momentum``. Adam is the
    default because an overwrite is only an attack if the attacker's mark takes: on the
    digits CNN, 5 epochs of Adam at lr 0.01 bring a 64-bit key at strength 0.01 to
    BER 0, where SGD at lr 0.01 leaves it near chance (BER ~0.45). Same ``seed`` →
    same weights. The model ends in eval mode on ``device`` (default: its own).
    """
    check_model(model, "overwrite")
    white = isinstance(key, WhiteBoxKeyBase)
    if not white and not isinstance(key, TriggerKey):
        raise TypeError(f"key must be the attacker's WhiteBoxKey, DenseKey or TriggerKey, got {type(key).__name__}")
    epochs = check_int("epochs", epochs, 1)
    lr = check_positive("lr", lr)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    optimizer, momentum = check_optimizer(optimizer, momentum)
    check_data(data, epochs)
    if white:
        strength = check_positive("strength", strength)
        wm = Uchida(key, strength)
        try:
            carrier = wm.parameter(model)
            with torch.no_grad():
                wm.projections(model)
        except KeyError as exc:
            raise ValueError(f"the attacker's key cannot be embedded in this model: {exc.args[0]}") from None
        if not any(carrier is p for p in model.parameters()):
            raise ValueError(f"the key's carrier {key.carrier!r} is a buffer, not a trainable parameter")
        mixer, extra = None, wm.penalty
    else:
        per_batch = check_int("per_batch", per_batch, 1)
        if is_pair(data):
            x, _ = check_pair(data)
            if tuple(x.shape[1:]) != key.input_shape:
                raise ValueError(f"data inputs have shape {list(x.shape)}, the trigger key's are "
                                 f"[n, {', '.join(map(str, key.input_shape))}]")
        mixer, extra = TriggerMixer(key, per_batch), None
    device = resolve_device(model, device)

    names = [n for n, _ in model.named_parameters()]
    with seeded(seed, device):
        steps, final = train(model, names, data, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                             momentum=momentum, seed=seed, device=device, extra_loss=extra, mixer=mixer)

    rec = OverwriteRecord("overwrite", key.kind if white else "trigger", key.carrier if white else None,
                          None if white else key.n, epochs, strength if white else None, final, lr=lr, steps=steps,
                          per_batch=None if white else per_batch, trigger_kind=None if white else key.kind,
                          key_id=key.key_id, optimizer=optimizer)
    with torch.no_grad():
        if white:
            got = (wm.projections(model) > 0).to(torch.uint8).cpu()
            matches = int((got == key.bits).sum())
            rec.attacker_ber = 1.0 - matches / key.num_bits
            rec.attacker_p_value = binomial_p_value(matches, key.num_bits, 0.5)
        else:
            dtype = next(model.parameters()).dtype
            tx, ty = key.triggers(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
            hits = sum(int((model(tx[i:i + batch_size]).argmax(1) == ty[i:i + batch_size]).sum())
                       for i in range(0, key.n, batch_size))
            rec.attacker_trigger_acc = hits / key.n
            rec.attacker_p_value = binomial_p_value(hits, key.n, key.null_rate)
    return rec
