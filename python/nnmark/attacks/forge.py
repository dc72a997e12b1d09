"""Key forging (the survey's ambiguity attack): a key made *after* the fact for a model that was
never marked with it, which nonetheless verifies.

A verdict is a p-value for one key. In a dispute the other side brings a key of its own,
and :func:`forge_key` shows what such a key costs:

- free owner bits (``message=None``, ``target_bits=None``): draw a random secret and set
  the bits to those the model already gives under it. Every bit matches, in one try,
  whatever the bit count and alpha. Only a commitment to the key made before the model's
  release tells the owner's key from such a one.
- owner bits fixed in advance (derived from ``message`` by :func:`nnmark.message_bits`, or
  given as ``target_bits``): search random secrets. Each try is a fresh 32-byte secret, its
  subkey (SHA-256, spec section 4.3), the carrier's T bits under it and their matches; a
  try verifies with probability q = P[Binomial(T, 1/2) >= threshold] <= alpha, so about
  1/q tries (:func:`nnmark.stats.forge_tries`). Tries are batched: one native call
  (:func:`nnmark.ops.keyed_projection_many_keys`) projects the carrier under thousands of
  subkeys.

A key the search finds is confirmed by the verifier itself (the engine's extraction of
the same carrier), so it verifies with ``nnmark.verify(record.key, model, alpha=alpha)``.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import ops
from ..checkpoints import CheckpointError, label_of, open_checkpoint
from ..keys import MAX_BITS, SECRET_BYTES, WhiteBoxKey, message_bits, projection_subkeys
from ..stats import binomial_p_value, binomial_threshold, check_alpha
from ..whitebox import WhiteBoxCheck, reduce_cpu
from .finetune import check_int, check_positive

MODES = ("free-bits", "message", "target-bits")


@dataclass
class ForgeRecord:
    """What ``forge_key`` did. ``key``: the forged :class:`~nnmark.WhiteBoxKey` (None when
    none was found within the budget); it verifies on the model at ``alpha``.

    ``tries``: keys tried (the found one included); ``seconds`` and ``cpu_seconds``: wall
    and process CPU time of the search (all threads); ``matches``: of the forged key (when
    not found: the most any tried key reached); ``threshold``: the fewest matches that
    verify at ``alpha`` (as ``nnmark.verify`` computes it); ``p_value``: of ``matches``;
    ``expected_tries``: 1 / P[Binomial(bits, 1/2) >= threshold] for a search (1 with free
    bits); ``mode``: ``free-bits``, ``message`` or ``target-bits``. ``to_dict()`` gives
    every field but the key (its ``key_id`` instead)."""

    attack: str
    mode: str
    found: bool
    key: WhiteBoxKey | None = field(repr=False)
    tries: int
    seconds: float
    cpu_seconds: float
    matches: int
    threshold: int
    bits: int
    alpha: float
    p_value: float
    expected_tries: float
    carrier: str
    reduction: str
    key_id: str = ""

    @property
    def tries_per_second(self) -> float:
        return self.tries / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Every field but the key (a secret), plus ``tries_per_second``."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "key"}
        out["tries_per_second"] = self.tries_per_second
        return out


def _target(bits: int, message, target_bits) -> tuple[str, np.ndarray | None]:
    if message is not None and target_bits is not None:
        raise ValueError("give message or target_bits, not both")
    if message is not None:
        if not isinstance(message, (str, bytes, bytearray)) or len(message) == 0:
            raise ValueError(f"message must be a non-empty str or bytes, got {type(message).__name__}")
        return "message", message_bits(message, bits).astype(bool)
    if target_bits is not None:
        t = np.asarray(target_bits.cpu() if isinstance(target_bits, torch.Tensor) else target_bits)
        if t.ndim != 1 or t.size != bits or not np.all((t == 0) | (t == 1)):
            raise ValueError(f"target_bits must be {bits} values of 0 or 1 (bits={bits}), got shape "
                             f"{list(t.shape)}")
        return "target-bits", t.astype(bool)
    return "free-bits", None


def _make_key(secret: bytes, carrier: str, bits, reduction: str, shape) -> WhiteBoxKey:
    with warnings.catch_warnings():  # "can never verify at alpha=1e-6": the caller chose alpha
        warnings.simplefilter("ignore")
        return WhiteBoxKey(secret, carrier, np.asarray(bits, dtype=np.uint8), reduction, shape)


def _verifies(key: WhiteBoxKey, c, alpha: float) -> tuple[bool, int]:
    """(verified, matches) of ``key`` on carrier ``c``, as the verifier decides it."""
    check = WhiteBoxCheck(key, alpha)
    got = check.extract_bits([c])[0]
    if isinstance(got, CheckpointError):
        raise ValueError(f"the carrier cannot be checked: {got}")
    f = check.fields([got])[0]
    return bool(f["verified"]), int(f["matches"])


def forge_key(model, carrier: str, bits: int = 64, alpha: float = 1e-6, message: str | bytes | None = None, *,
              target_bits=None, max_tries: int | None = 10_000_000, seconds: float | None = 60.0,
              reduction: str = "filter_mean", batch: int = 8192, seed: int | None = None) -> ForgeRecord:
    """Makes a white-box key that verifies on ``model``, which was never marked with it.

    Args:
        model: an ``nn.Module``, a state dict or a checkpoint path (read as ``nnmark.verify``
            reads it).
        carrier: the state-dict name of the carrier weight (wrapper prefixes tolerated).
        bits: the key's bit count T.
        alpha: the significance level the key must verify at.
        message: owner bits from this text (:func:`nnmark.message_bits`): the search case.
        target_bits: owner bits given outright (T values of 0/1): the search case too.
            With neither, the bits are free: one try.
        max_tries, seconds: the search stops after this many tries or this much wall time
            (checked between batches, so it may run one batch over), whichever comes
            first; either may be None, not both.
        reduction: the carrier reduction (``filter_mean`` or ``flat``).
        batch: keys per native call.
        seed: None draws secrets from ``os.urandom``; an int makes the search reproducible
            (secrets from numpy's PCG64 seeded with it: not secret, for tests and benchmarks).

    Returns:
        A :class:`ForgeRecord`; ``found`` False when the budget ran out first.

    Raises:
        ValueError: bad arguments; ``bits`` too few to ever verify at ``alpha``; a model
            whose carrier cannot be read or checked (missing, wrong shape, NaN/Inf).
    """
    bits = check_int("bits", bits, 1)
    if bits > MAX_BITS:
        raise ValueError(f"bits must be at most {MAX_BITS}, got {bits}")
    probe = _make_key(os.urandom(SECRET_BYTES), carrier, np.zeros(bits), reduction, None)  # checks the names
    alpha = check_alpha(alpha)
    mode, target = _target(bits, message, target_bits)
    if max_tries is None and seconds is None:
        raise ValueError("give max_tries or seconds (or both): the search must stop")
    if max_tries is not None:
        max_tries = check_int("max_tries", max_tries, 1)
    if seconds is not None:
        seconds = check_positive("seconds", seconds)
    batch = check_int("batch", batch, 1)
    if seed is not None:
        seed = check_int("seed", seed, 0)
    threshold = binomial_threshold(bits, alpha)
    if threshold > bits:
        raise ValueError(f"{bits} bits can never verify at alpha={alpha:g} (even {bits} matches have p = "
                         f"2^-{bits}); a forger needs at least {math.ceil(-math.log2(alpha))} bits")
    q = binomial_p_value(threshold, bits)
    draw = np.random.default_rng(seed).bytes if seed is not None else os.urandom

    t0, c0 = time.perf_counter(), time.process_time()
    label = label_of(model)
    try:
        with open_checkpoint(model, label) as ck:
            c = ck.carrier(carrier, WhiteBoxCheck(probe, alpha).validate)
    except CheckpointError as exc:
        raise ValueError(f"{label}: {exc} (status {exc.status})") from None
    shape = tuple(c.tensor.shape)

    def record(found, key, tries, matches):
        return ForgeRecord("forge_key", mode, found, key, tries, time.perf_counter() - t0, time.process_time() - c0,
                           matches, threshold, bits, alpha, binomial_p_value(matches, bits), 1.0 if target is None
                           else 1.0 / q, carrier, reduction, key.key_id if key is not None else "")

    if target is None:  # free bits: the model's own bits under a fresh secret
        secret = draw(SECRET_BYTES)
        check = WhiteBoxCheck(_make_key(secret, carrier, np.zeros(bits), reduction, shape), alpha)
        got = check.extract_bits([c])[0]
        if isinstance(got, CheckpointError):
            raise ValueError(f"{label}: the carrier cannot be checked: {got}")
        key = _make_key(secret, carrier, got, reduction, shape)
        ok, matches = _verifies(key, c, alpha)
        return record(ok, key if ok else None, 1, matches)

    # The carrier vector as the verifier reduces it (float32 unless float64), then float64.
    t = c.tensor.detach().cpu()
    v = reduce_cpu(probe, t.unsqueeze(0))
    v = torch.from_numpy(v[0]) if v is not None else probe.reduce(t.float())
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{label}: carrier {c.name!r} contains NaN or Inf (or overflows when reduced)")
    tries, best = 0, 0
    while True:
        k = batch if max_tries is None else min(batch, max_tries - tries)
        secrets = draw(SECRET_BYTES * k)
        p = ops.keyed_projection_many_keys(v, projection_subkeys(secrets, carrier), bits).numpy()  # [k, T]
        matches = np.count_nonzero((p > 0) == target, axis=1)  # [k]
        best = max(best, int(matches.max()))
        for j in np.flatnonzero(matches >= threshold).tolist():
            # float64 here, the verifier's float32: confirm with the verifier itself.
            key = _make_key(secrets[SECRET_BYTES * j:SECRET_BYTES * (j + 1)], carrier, target, reduction, shape)
            ok, m = _verifies(key, c, alpha)
            if ok:
                return record(True, key, tries + j + 1, m)
        tries += k
        if (max_tries is not None and tries >= max_tries) or (
                seconds is not None and time.perf_counter() - t0 >= seconds):
            return record(False, None, tries, best)


__all__ = ["forge_key", "ForgeRecord", "MODES"]
