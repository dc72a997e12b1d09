"""White-box watermarks (Uchida et al. 2017) on the keyed projection of spec v1.

Embed: ``loss = task_loss + Uchida(key, strength=0.01).penalty(model)``.
Check: :class:`WhiteBoxCheck` is the one white-box verifier: it validates a carrier
from its header (before its bytes are read), and turns a batch of carriers into
extracted bits and verdict fields with one native projection per carrier shape.
``nnmark.verify``, ``nnmark.calibrate`` and ``nnmark.scan`` reach it through the
batch engine (:mod:`nnmark.scan.engine`); :func:`extract` calls it directly.
A source is a module, a state dict, a checkpoint path, a carrier weight tensor,
or a list of them (see :func:`nnmark.checkpoints.open_checkpoint`).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

import numpy as np

from .carriers import carrier_length, find_name, module_parameter
from .checkpoints import Carrier, CheckpointError, label_of, open_checkpoint
from .keys import WhiteBoxKeyBase
from .sharded import FSDP1_SEGMENT, check_not_fsdp1, fsdp1_slice, is_fsdp1_flattened, project_flat_slice
from .stats import binomial_threshold, check_alpha, check_null_rate

Source = Any  # nn.Module | Mapping[str, Tensor] | str | os.PathLike | Tensor


def check_key(key) -> None:
    """TypeError unless ``key`` is a white-box key."""
    if not isinstance(key, WhiteBoxKeyBase):
        raise TypeError(f"expected a white-box key (nnmark.WhiteBoxKey or nnmark.DenseKey), got {type(key).__name__}")


class Uchida:
    """The embedding regularizer: ``strength * sum_t BCE(sigmoid(p_t), b_t)``, p = X . carrier.

    A sum over the bits, as in Uchida et al.'s code, so strength 0.01 is the paper's lambda.
    Works for Conv and Linear weights (any parameter) addressed by state-dict name,
    on CPU and CUDA; the gradient flows through the native projection op.
    """

    def __init__(self, key, strength: float = 0.01):
        check_key(key)
        strength = float(strength)
        if not strength > 0 or strength != strength or strength == float("inf"):
            raise ValueError(f"strength must be a positive finite number, got {strength!r}")
        self.key = key
        self.strength = strength
        self._targets: dict[torch.device, torch.Tensor] = {}
        # Resolved parameter name per model: resolving scans every parameter, a
        # training step should not.
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"Uchida(key={self.key!r}, strength={self.strength})"

    def parameter(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's carrier parameter (under FSDP1, this rank's flattened slice of it)."""
        return self._carrier(model)[0]

    def _carrier(self, model: torch.nn.Module):
        """(carrier tensor, FlatSlice when FSDP1 holds it sharded, else None)."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"penalty() needs a torch.nn.Module, got {type(model).__name__}")
        name, w = self._names.get(model), None
        if name is not None:
            try:
                w = model.get_parameter(name)
            except AttributeError:  # the model was restructured: resolve again
                pass
            else:
                if is_fsdp1_flattened(w) and FSDP1_SEGMENT not in name:
                    w = None  # a name resolved before FSDP1 wrapped the model (FSDP forwards attributes)
        if w is None:
            try:
                named = dict(model.named_parameters())
                name = find_name(named, self.key.carrier)
            except KeyError as exc:
                check_not_fsdp1(model, self.key.carrier)  # FSDP1 without use_orig_params: only a flat parameter
                try:  # a buffer can carry a mark too (no training through it)
                    return module_parameter(model, self.key.carrier), None
                except KeyError:
                    raise KeyError(f"model has no carrier parameter: {exc.args[0]}") from None
            w = named[name]
            self._names[model] = name
        # sharded or whole may change between calls (summon_full_params), so asked every time
        if FSDP1_SEGMENT in name or is_fsdp1_flattened(w):
            return w, fsdp1_slice(model, self.key.carrier, name, w)
        return w, None

    def projections(self, model: torch.nn.Module) -> torch.Tensor:
        """Raw projections ``[T]`` of the model's carrier (differentiable). Under FSDP1 (and
        for DTensor carriers) every rank must call it: one all-reduce of T values."""
        w, where = self._carrier(model)
        if where is not None:
            return project_flat_slice(self.key, w, where)
        return self.key.project(w)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """The scalar regularizer to add to the task loss."""
        p = self.projections(model)
        target = self._targets.get(p.device)
        if target is None:
            target = self.key.bits.to(device=p.device, dtype=torch.float32)
            self._targets[p.device] = target
        return self.strength * F.binary_cross_entropy_with_logits(p.float(), target, reduction="sum")

    @torch.no_grad()
    def ber(self, model: torch.nn.Module) -> float:
        """Bit error rate of the model's carrier against the owner's bits."""
        bits = (self.projections(model) > 0).to(torch.uint8).cpu()
        return float((bits != self.key.bits).float().mean())


class WhiteBoxCheck:
    """One white-box key made ready to check many carriers (what every front door uses).

    ``validate`` checks a carrier from its name, shape and dtype before its bytes are
    read; ``extract_bits`` projects a batch of carriers (one native call per carrier
    shape and dtype) and says which could not be; ``fields`` turns extracted bits into
    the verdict fields of a row. The null: each bit matches with probability
    ``null_rate`` (default 1/2), or the match counts follow ``calibration`` (a
    beta-binomial fitted on unmarked models, :func:`nnmark.calibrate`)."""

    trigger = False
    num_controls = None

    def __init__(self, key, alpha: float = 1e-6, null_rate: float | None = None, calibration=None):
        from scipy.stats import binom

        check_key(key)
        if calibration is not None and null_rate is not None:
            raise ValueError("give a calibration or a null_rate, not both")
        self.key = key
        self.key_id = key.key_id
        self.alpha = check_alpha(alpha)
        self.p0 = 0.5 if null_rate is None else check_null_rate(null_rate)
        self.bits = n = key.num_bits
        self.calibration = calibration
        # p_values[m] = P[X >= m] under the null: a verdict is a lookup, not a scipy call per carrier.
        if calibration is not None:
            calibration.check_for(key)
            pv = calibration.tails().astype(np.float64).copy()
            self.threshold = calibration.threshold_at(self.alpha)
            self.null = calibration.describe()
            self.warning = calibration.extrapolation(self.alpha)
        else:
            pv = binom.sf(np.arange(-1, n), n, self.p0).astype(np.float64)
            self.threshold = binomial_threshold(n, self.alpha, self.p0)
            self.null = f"binomial(p0={self.p0:.6g})"
            self.warning = None
        pv[0] = 1.0
        self.p_values = pv.tolist()
        self.owner = key.bits.numpy().astype(bool)
        self._good: set[tuple] = set()  # shapes that passed: thousands of files share a few

    def validate(self, name: str, shape: tuple, dtype) -> None:
        """CheckpointError(invalid) unless a carrier of this shape and dtype can be checked."""
        shape = tuple(shape)
        if dtype is not None and shape in self._good:
            return
        key = self.key
        if dtype is None:
            raise CheckpointError("invalid", "WrongDtype", f"carrier {name!r} is not floating point")
        if key.shape is not None and shape != key.shape:
            raise CheckpointError("invalid", "WrongShape", f"carrier {name!r} has shape {list(shape)}, "
                                                           f"the key expects {list(key.shape)}")
        try:
            n = carrier_length(shape, key.reduction)
        except ValueError as exc:
            raise CheckpointError("invalid", "WrongShape", f"carrier {name!r}: {exc}") from None
        if key.length is not None and n != key.length:
            raise CheckpointError("invalid", "WrongShape", f"carrier {name!r} reduces to length {n}, "
                                                           f"the key expects {key.length}")
        self._good.add(shape)

    def extract_bits(self, carriers: list[Carrier], device=None) -> list:
        """Per carrier: its extracted bits (numpy bool ``[T]``) or the CheckpointError that
        kept it from being projected (NaN/Inf, an overflowing reduction, a failed projection).

        Carriers are projected where ``device`` says, else where their tensors are."""
        out: list = [None] * len(carriers)
        groups: dict = {}
        for i, c in enumerate(carriers):
            t = c.tensor if c.slot is None else None
            # Carriers read into one batch tensor share its shape and dtype: group them by it.
            g = id(c.slot[0]) if t is None else (tuple(t.shape), t.dtype, t.device)
            groups.setdefault(g, []).append(i)
        for idx in groups.values():
            cs = [carriers[i] for i in idx]
            try:
                bits, finite = self._project(as_batch(cs), device)
            except (ValueError, TypeError, RuntimeError) as exc:  # e.g. a dtype the kernels do not take
                err = CheckpointError("invalid", "ProjectionFailed", f"carrier could not be projected: "
                                                                     f"{str(exc).splitlines()[0][:300]}")
                for i in idx:
                    out[i] = err
                continue
            for j, i in enumerate(idx):
                if finite[j]:
                    out[i] = bits[j]
                elif not bool(torch.isfinite(cs[j].tensor.float()).all()):  # float(): float8 has no isfinite
                    out[i] = CheckpointError("invalid", "NonFinite", f"carrier {cs[j].name!r} contains NaN or Inf")
                else:
                    out[i] = CheckpointError("invalid", "ProjectionOverflow", f"carrier {cs[j].name!r} has values "
                                                                              f"too large to reduce in float32")
        return out

    def _project(self, stacked: torch.Tensor, device) -> tuple[np.ndarray, list[bool]]:
        """``[C, *shape]`` -> (bits ``[C, T]`` bool, finite per carrier). float32 unless float64,
        reduced, one native call; the reduced vectors also tell which carriers hold NaN/Inf
        or overflow (the projection kernel does not propagate them)."""
        key = self.key
        target = torch.device(device) if device is not None else stacked.device
        v = reduce_cpu(key, stacked) if target.type == "cpu" and stacked.device.type == "cpu" else None
        if v is not None:
            finite = np.isfinite(v).all(axis=1).tolist()
            proj = key.project_vectors(torch.from_numpy(v)).numpy()  # [C, T]
            return proj > 0, finite
        stacked = stacked.detach().to(target, non_blocking=True)
        if stacked.dtype != torch.float64:
            stacked = stacked.to(torch.float32)
        vt = key.reduce(stacked, batched=True)  # [C, N]
        finite = torch.isfinite(vt).all(dim=1).tolist()
        with torch.no_grad():
            pt = key.project_vectors(vt)  # [C, T]
        return (pt > 0).cpu().numpy(), finite

    def fields(self, bits: list[np.ndarray]) -> list[dict]:
        """The verdict fields of a row for each carrier's extracted bits: matches, ber,
        p_value, verified (one vectorised count for all)."""
        if not bits:
            return []
        matches = np.count_nonzero(np.asarray(bits) == self.owner, axis=1).tolist()
        n, pv, thr = self.bits, self.p_values, self.threshold
        return [{"matches": m, "ber": 1.0 - m / n, "p_value": pv[m], "verified": m >= thr} for m in matches]


def as_batch(cs: list[Carrier]) -> torch.Tensor:
    """``[C, *shape]``: a view when the carriers were read into consecutive rows of one
    batch tensor (a scan's usual case), else a stack of copies."""
    s0 = cs[0].slot
    if s0 is not None:
        base, i0 = s0
        if all(c.slot is not None and c.slot[0] is base and c.slot[1] == i0 + j for j, c in enumerate(cs)):
            return base[i0:i0 + len(cs)]
    return torch.stack([c.tensor.detach() for c in cs])


def reduce_cpu(key, batch: torch.Tensor) -> np.ndarray | None:
    """``key.reduce(batch, batched=True)`` in numpy for a CPU batch ``[C, *shape]``:
    float32 (float64 stays float64), or None for a dtype numpy lacks (float8). numpy
    runs on the calling thread; torch would wake its intra-op pool for every small
    batch, and a scan's loader threads would then fight over the same cores."""
    dt = batch.dtype
    if dt == torch.float32 or dt == torch.float64:
        a = batch.detach().numpy()
    elif dt == torch.float16:
        a = batch.detach().numpy().astype(np.float32)
    elif dt == torch.bfloat16:  # exact: a bfloat16 is the top half of a float32
        a = batch.detach().view(torch.int16).numpy().astype(np.int32)
        a <<= 16
        a = a.view(np.float32)
    else:
        return None
    if a.ndim < 3 and key.reduction == "filter_mean":
        return None  # key.reduce says why it cannot
    C = a.shape[0]
    if key.reduction == "flat":
        return a.reshape(C, -1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported per carrier, not warned
        m = a.mean(axis=1)  # filter_mean: over out-channels, as reduce_carrier
    if key.order == "keras" and m.ndim > 2:
        m = np.moveaxis(m, 1, -1)  # (in, kh, kw) -> (kh, kw, in)
    return np.ascontiguousarray(m.reshape(C, -1))


def extract(key, source: Source, *, device=None) -> torch.Tensor:
    """The bits a white-box key extracts from a model.

    Args:
        key: a white-box key (:class:`~nnmark.WhiteBoxKey` or :class:`~nnmark.DenseKey`).
        source: a module, a state dict, a checkpoint path or the carrier tensor itself,
            or a list of them (projected in one batched native call).
        device: where to project (default: where each carrier is; files: the CPU).

    Returns:
        uint8 bits: ``[T]`` for one source, ``[C, T]`` for a list.

    Raises:
        ValueError: a source cannot be checked (its label, the reason and the status
            a verdict would report: absent, invalid, corrupt, unsafe, unsupported, io_error).
    """
    from .deepsigns import extract as deepsigns_extract, is_deepsigns_key

    if is_deepsigns_key(key):  # activations, not weights: it runs the model (modules only here)
        return deepsigns_extract(key, source, device=device)
    check_key(key)
    batch = isinstance(source, (list, tuple))
    sources = list(source) if batch else [source]
    if not sources:
        raise ValueError("extract() got an empty list of sources")
    check = WhiteBoxCheck(key)
    carriers, labels = [], []
    for i, s in enumerate(sources):
        label = label_of(s, i if batch else None)
        try:
            with open_checkpoint(s, label) as ck:
                carriers.append(ck.carrier(key.carrier, check.validate))
        except CheckpointError as exc:
            raise ValueError(f"{label}: {exc} (status {exc.status})") from None
        labels.append(label)
    got = check.extract_bits(carriers, device)
    for label, r in zip(labels, got):
        if isinstance(r, CheckpointError):
            raise ValueError(f"{label}: {r} (status {r.status})")
    bits = torch.from_numpy(np.stack(got).astype(np.uint8))
    return bits if batch else bits[0]


__all__ = ["Uchida", "WhiteBoxCheck", "extract", "check_key"]
