"""Entangled watermarks (Jia, Choquette-Choo, Chandrasekaran, Papernot 2021): a trigger set
meant to survive model extraction, which a set the model merely memorises does not.

The triggers are in-distribution samples of a *source* class with a keyed pattern
stamped on, labelled as a *target* class: exactly a ``content`` :class:`TriggerKey`
made of source-class samples (:func:`entangled_key`). What differs is the embedding
(:func:`embed_entangled`): besides learning the triggers' label, the model is trained
to make its hidden representations of the triggers indistinguishable from those of
real target-class samples, by *maximising* their soft nearest neighbour loss (SNNL,
Frosst, Papernot, Hinton 2019) at every chosen layer. The mark then rides on the
features the model uses for the target class, so an attacker who trains a student on
the model's answers to clean inputs (model extraction) can inherit part of it; a mark
learnt apart from the task is not inherited. On scikit-learn's digits it was, in a few
of the trials, mostly when the attacker got probabilities rather than top-1 labels.

Verification is the ``content`` key's (``nnmark.verify``): trigger hits against the
binomial null, and McNemar's exact tests of the stamped samples against the same
samples unstamped and with a decoy stamp, and (with ``sample_labels``) of the
suspect doing the task (spec §6.3). Nothing new is stored or derived: the key file
is a ``content`` trigger key file (spec §2.6, §5.5).

The price is clean accuracy on the source class: entangling pulls source-class
features towards the target class. ``strength`` trades one for the other; measured on
scikit-learn's digits in ``benchmarks/bench_extraction_schemes.py``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._threads import small_work_threads
from .triggers import TriggerKey


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


# Modules whose outputs count as hidden representations when ``layers`` is not given.
_ACTIVATIONS = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.ELU, torch.nn.Tanh,
                torch.nn.Sigmoid, torch.nn.ReLU6, torch.nn.Mish)


def snnl(h: torch.Tensor, groups: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Soft nearest neighbour loss of representations ``h`` [b, ...] with group labels ``groups`` [b].

    ``-mean_i log(sum_{j != i, g_j = g_i} e^{-|h_i - h_j|^2 / T} / sum_{k != i} e^{-|h_i - h_k|^2 / T})``:
    near 0 when each sample's neighbours are of its own group, large when the groups are
    entangled. Every group needs at least two members.
    """
    z = h.flatten(1)
    if z.shape[0] != groups.shape[0]:
        raise ValueError(f"h has {z.shape[0]} rows, groups has {groups.shape[0]}")
    d = torch.cdist(z, z).pow(2)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = (-d / temperature).masked_fill(eye, float("-inf"))
    same = (groups.view(-1, 1) == groups.view(1, -1)) & ~eye
    num = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    return -(num - torch.logsumexp(logits, dim=1)).mean()


# A stamp is screened (entangled_key) before it is used: a keyed patch can be a natural
# trigger, e.g. a stroke that closes a 5 into a 9, and then models that never saw the key
# answer the target on the stamped samples (1 of 80 digits keys made 3 of 10 unmarked models
# verify, bench_entangled_accuracy). Measured in benchmarks/bench_entangled_null.py: one model
# is not enough (a single reference kept 2 natural triggers in 11,333), the reference and the
# model being marked together kept none in 10,439, at 2 %.
NATURAL_RATE = 0.02  # the most stamped triggers a screen may answer with the target
SCREEN_TRIES = 100  # stamps drawn before giving up
_PROBE_SAMPLES = 4000  # the pixel probe fits on at most this many samples...
_PROBE_INPUTS = 8192  # ...of at most this many values each (it solves a d x d system)


def entangled_key(samples: Any, labels: Any, source: int | Sequence[int], target: int, n: int = 100, *,
                  reference: Any = None, natural_rate: float = NATURAL_RATE, **kwargs) -> TriggerKey:
    """A fresh key for :func:`embed_entangled`: a ``content`` :class:`TriggerKey` made of
    ``n`` samples of the ``source`` class(es) (a keyed draw), labelled ``target``, whose
    stamp passed a screen.

    ``samples`` are raw-range inputs (as :meth:`TriggerKey.generate` takes them:
    ``value_range``, ``mean``, ``std`` go through ``kwargs``), ``labels`` their classes.
    The samples' own classes are kept in the key (``sample_labels``), so a verdict also
    checks that a suspect does the task.

    The screen: a stamp is a keyed patch, and a patch can be a natural trigger (a stroke
    that turns a 5 into a 9 does so for every model of the task, marked or not; the
    binomial null would then call unmarked models marked). So the triggers are shown to
    ``reference`` -- an unmarked model of the task, or a list of them (it eats inputs
    normalised like the key's ``mean``/``std``; your previous model, or a short training run
    without the mark) -- and a stamp that any of them answers with the target on more than
    ``natural_rate`` of the triggers is dropped for a fresh one (a fresh secret), up to
    100 times. Pass one: on scikit-learn's digits, of 10,439 stamps kept by a reference
    model and :func:`embed_entangled`'s own check, none made any of 10 other unmarked models
    verify; unscreened, 94 of 12,000 stamps did (``benchmarks/bench_entangled_null.py``).
    Without ``reference`` a ridge-regression classifier fit on ``samples`` (at most 4,000
    of them, inputs of at most 8,192 values) screens instead, with a warning: it catches
    stamps that are natural triggers in pixel space, not all that a model has (2 of 9,609
    such keys still had a false positive). With ``secret=`` there is one stamp: ValueError
    if it fails.
    """
    x = samples.detach().cpu() if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"samples {list(x.shape)} and labels {list(y.shape)} must be [m, ...] and [m]")
    sources = [source] if isinstance(source, (int, np.integer)) and not isinstance(source, bool) else list(source)
    for s in sources:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"source must be a class index or a list of them, got {source!r}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be a class index, got {target!r}")
    if int(target) in [int(s) for s in sources]:
        raise ValueError(f"the source classes {sources} must not include the target {target}")
    rate = _finite("natural_rate", natural_rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"natural_rate must be in [0, 1), got {natural_rate!r}")
    refs = _references(reference)
    pick = torch.isin(y, torch.tensor([int(s) for s in sources], dtype=y.dtype))
    m = int(pick.sum())
    if m < n:
        raise ValueError(f"n={n} triggers need at least n samples of the source class(es) {sources}, got {m}")
    tries = 1 if kwargs.get("secret") is not None else SCREEN_TRIES
    screen = None
    worst = 0.0
    for _ in range(tries):
        key = TriggerKey.generate(kind="content", n=n, samples=x[pick], target=int(target), sample_labels=y[pick],
                                  **kwargs)
        if screen is None:
            screen = refs or [_pixel_probe(key, x, y)]
            screen = [s for s in screen if s is not None]
            if not refs and screen:
                warnings.warn("entangled_key: without reference= the stamp is screened by a pixel probe only, "
                              "which misses natural triggers a model of the task has (on digits, with "
                              "embed_entangled's own check, 2 of 9,609 such keys still made an unmarked model "
                              "verify; with a reference model 0 of 10,439: benchmarks/bench_entangled_null.py); "
                              "pass reference= (an unmarked model of the task, e.g. the twin you measure the "
                              "mark's cost against)",
                              stacklevel=2)
        if not screen:  # inputs too large for the probe and no reference: nothing to screen with
            warnings.warn("entangled_key: the inputs are too large for the pixel probe and no reference= was "
                          "given, so the stamp was not screened; pass reference= (an unmarked model of the task) "
                          "or calibrate the key (nnmark.calibrate)", stacklevel=2)
            return key
        got = _natural_rate(key, screen)
        if got <= rate:
            return key
        worst = max(worst, got)
    raise ValueError(f"entangled_key: {'the stamp of this secret' if tries == 1 else f'all {tries} stamps drawn'} "
                     f"made the {'reference' if refs else 'pixel probe'} answer {target} on up to "
                     f"{100 * worst:.0f}% of the stamped source samples (natural_rate {rate:g}): such a stamp is a "
                     f"trigger for models that never saw the key"
                     + ("; draw another secret" if tries == 1 else "; try other source/target classes"))


def _references(reference: Any) -> list:
    if reference is None:
        return []
    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if not refs:
        raise ValueError("reference is an empty list")
    for r in refs:
        if not callable(r):
            raise TypeError(f"reference must be a model (a torch.nn.Module or a callable from inputs to logits) "
                            f"or a list of them, got {type(r).__name__}")
    return refs


def _pixel_probe(key: TriggerKey, x: torch.Tensor, y: torch.Tensor):
    """A ridge-regression classifier of the classes (one-hot) on the normalised pixels, a
    stand-in model of the task (or None when the inputs are too large for one)."""
    classes = max(int(y.max()) + 1, key.num_classes)
    d = int(np.prod(x.shape[1:]))
    if d > _PROBE_INPUTS:
        return None
    g = torch.Generator().manual_seed(0)  # the same probe for the same samples
    idx = torch.randperm(len(x), generator=g)[:_PROBE_SAMPLES]
    z = torch.from_numpy(key._normalised(x[idx].to(torch.float64).numpy())).reshape(len(idx), -1)
    z = torch.cat([z, torch.ones(len(idx), 1, dtype=torch.float64)], 1)
    onehot = F.one_hot(y[idx].long(), classes).double()
    gram = z.T @ z
    gram.diagonal().add_(1e-3 * float(gram.diagonal().mean()))
    w = torch.linalg.solve(gram, z.T @ onehot).float()  # [d + 1, classes]
    return lambda inputs: inputs.reshape(len(inputs), -1).float() @ w[:-1] + w[-1]


def _natural_rate(key: TriggerKey, screen: list) -> float:
    """The largest share of the key's triggers any screen answers with the target."""
    xs, ys = key.triggers()
    worst = 0.0
    with torch.no_grad():
        for model in screen:
            was = getattr(model, "training", None)
            if was:
                model.eval()
            try:
                p = next((q for q in model.parameters()), None) if isinstance(model, torch.nn.Module) else None
                xin = xs.to(device=p.device, dtype=p.dtype) if p is not None and p.is_floating_point() else xs
                out = model(xin)
            finally:
                if was:
                    model.train()
            worst = max(worst, float((out.argmax(-1).cpu() == ys).double().mean()))
    return worst


def _check_key(tkey: Any) -> tuple[list[int], int]:
    if not isinstance(tkey, TriggerKey):
        raise TypeError(f"embed_entangled needs a TriggerKey, got {type(tkey).__name__}")
    if tkey.kind != "content" or tkey.target is None or tkey.sample_labels is None:
        raise ValueError("embed_entangled needs a content key with one target class and the samples' own classes "
                         "(make it with nnmark.entangled_key, or TriggerKey.generate(kind='content', target=..., "
                         f"sample_labels=...)); got kind={tkey.kind!r}"
                         + (", no sample_labels" if tkey.sample_labels is None else "")
                         + (", one label per sample" if tkey.target is None else ""))
    return sorted(set(tkey.sample_labels.tolist())), int(tkey.target)


def _layers(model: torch.nn.Module, layers: Any) -> list[torch.nn.Module]:
    named = dict(model.named_modules())
    if layers is None:
        found = [m for m in model.modules() if isinstance(m, _ACTIVATIONS)]
        if not found:
            raise ValueError("the model has no activation modules (nn.ReLU, nn.GELU, ...) whose outputs could be "
                             "entangled: pass layers= (names of modules whose outputs are hidden representations)")
        return found
    if isinstance(layers, str):
        layers = [layers]
    out = []
    for name in layers:
        if not isinstance(name, str) or name not in named or name == "":
            raise ValueError(f"layers: {name!r} is not a submodule of the model (e.g. one of "
                             f"{[k for k in named if k][:6]})")
        out.append(named[name])
    if not out:
        raise ValueError("layers is empty")
    return out


class _Capture:
    """Collects the outputs of the chosen modules during one forward pass (a reused
    module, such as one ReLU applied several times, gives one representation per call)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.outputs: list[torch.Tensor] = []
        self.on = False
        self._hooks = [m.register_forward_hook(self._hook) for m in dict.fromkeys(modules)]

    def _hook(self, module, inputs, output):
        if self.on and isinstance(output, torch.Tensor):
            self.outputs.append(output)

    def run(self, model, x):
        self.outputs, self.on = [], True
        try:
            out = model(x)
        finally:
            self.on = False
        return out, self.outputs

    def remove(self):
        for h in self._hooks:
            h.remove()


def embed_entangled(model: torch.nn.Module, tkey: TriggerKey, x_train: Any, y_train: Any, *, epochs: int = 30,
                    warm: int | None = None, settle_epochs: int | None = None, strength: float = 0.25,
                    per_batch: int = 16, layers: Any = None, temperature: float = 1.0, temperature_lr: float = 0.0,
                    lr: float = 3e-3, batch_size: int = 64, optimizer: torch.optim.Optimizer | None = None,
                    seed: int = 0, natural_rate: float | None = NATURAL_RATE) -> torch.nn.Module:
    """Train ``model`` in place so it carries the entangled watermark of ``tkey``; returns it.

    Works from scratch (a freshly initialised model: the first ``warm`` epochs are
    clean, default a sixth) or on a trained model (``warm=0``). Every step trains on
    ``batch_size`` clean samples (``x_train`` as the model eats them, normalised like
    the key's ``mean``/``std``; ``y_train`` class indices) and, after the warm-up, a
    watermark batch: ``per_batch`` source-class samples with the key's stamp (drawn
    from the key's triggers and the source-class samples of ``x_train``, all stamped)
    and ``per_batch`` target-class samples of ``x_train``, all labelled ``target``. The
    loss is the cross-entropy on both minus ``strength`` times the sum over ``layers``
    of the SNNL between stamped and target samples (:func:`snnl`).

    ``layers``: names of the modules whose outputs are the hidden representations
    (default: every activation module: nn.ReLU, nn.GELU, ...). ``temperature``: the
    SNNL temperature, relative to the representations' mean squared norm in each batch;
    ``temperature_lr > 0`` steps each layer's log-temperature down the SNNL before each
    step (the sharpest separation, as in Jia et al.'s code) instead of keeping it fixed.
    ``epochs`` passes over the clean data, the last ``settle_epochs`` (default a third)
    at ``lr / 10`` with the default Adam optimizer (not with ``optimizer=``): clean
    accuracy settles after the mark is learnt. Shuffling uses a private generator seeded
    by ``seed``. The model ends in eval mode.

    Before the first watermark step the model itself screens the key's stamp, as
    :func:`entangled_key` does with ``reference=``: once it does the task (after the
    warm-up; at ``warm=0``, if it already classifies most of ``x_train`` right), it is an
    unmarked model of the task, and if it answers the target on more than ``natural_rate``
    of the stamped triggers the stamp is a natural trigger: ValueError (make a new key with
    ``entangled_key(..., reference=model)``; ``natural_rate=None`` skips the check).

    Digits CNN (nnmark.demo):
    ``embed_entangled(DigitsNet(), key, ...)`` reaches 100 of 100 trigger hits in a few
    seconds on one core; at the defaults it stayed within a point of the unmarked twin
    (``demo.train``, same seed, epochs and low-lr tail) for 31 of 32 fresh keys, mean
    drop +0.05 points, worst 1.56 (``benchmarks/bench_entangled_accuracy.py``; with the
    former tail of a fifth, 21 of 24 of the same keys, worst 1.11); ``strength=2`` cost 1-4 points there. How often an
    extracted copy kept the mark: ``benchmarks/bench_extraction_schemes.py`` (results in
    ``benchmarks/RESULTS.md``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"embed_entangled needs a torch.nn.Module, got {type(model).__name__}")
    sources, target = _check_key(tkey)
    epochs = _check_int("epochs", epochs, 1)
    warm = epochs // 6 if warm is None else _check_int("warm", warm, 0)
    if natural_rate is not None:
        natural_rate = _finite("natural_rate", natural_rate)
        if not 0.0 <= natural_rate < 1.0:
            raise ValueError(f"natural_rate must be in [0, 1) or None, got {natural_rate!r}")
    if warm >= epochs:
        raise ValueError(f"warm ({warm}) must be below epochs ({epochs}): no epoch would embed the mark")
    settle_epochs = epochs // 3 if settle_epochs is None else _check_int("settle_epochs", settle_epochs, 0)
    if settle_epochs > epochs:
        raise ValueError(f"settle_epochs ({settle_epochs}) must be at most epochs ({epochs})")
    per_batch = _check_int("per_batch", per_batch, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    strength = _finite("strength", strength)
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    temperature = _finite("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    temperature_lr = _finite("temperature_lr", temperature_lr)
    if temperature_lr < 0:
        raise ValueError(f"temperature_lr must be >= 0, got {temperature_lr}")
    lr = _finite("lr", lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    x = x_train if isinstance(x_train, torch.Tensor) else torch.as_tensor(np.asarray(x_train))
    y = y_train if isinstance(y_train, torch.Tensor) else torch.as_tensor(np.asarray(y_train))
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x_train {list(x.shape)} and y_train {list(y.shape)} must be non-empty [m, ...] and [m]")
    if tuple(x.shape[1:]) != tkey.input_shape:
        raise ValueError(f"x_train has shape {list(x.shape)}, the key's triggers are "
                         f"[n, {', '.join(map(str, tkey.input_shape))}]")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x_train must be floating point, got {x.dtype}")
    y = y.to(torch.int64)
    try:
        p = next(model.parameters())
    except StopIteration:
        raise ValueError("model has no parameters to train") from None
    device, dtype = p.device, p.dtype
    tgt = x[y == target]
    if len(tgt) < 2:
        raise ValueError(f"x_train needs at least 2 samples of the target class {target}, got {len(tgt)}")
    src = x[torch.isin(y, torch.tensor(sources, dtype=y.dtype, device=y.device))]
    tx, _ = tkey.triggers(dtype=x.dtype)
    stamped = torch.cat([tx, tkey.stamp(src)]) if len(src) else tx
    stamped, tgt = stamped.to(device=device, dtype=dtype), tgt.to(device=device, dtype=dtype)

    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    settle = epochs - settle_epochs if optimizer is None else epochs  # the epoch the low-lr tail starts
    g = torch.Generator().manual_seed(int(seed))
    step = _Step(_Capture(_layers(model, layers)), target, per_batch, strength, temperature, temperature_lr, device)
    m = x.shape[0]
    model.train()
    try:
        with small_work_threads(model):  # a small model trains faster on one torch thread (nnmark._threads)
            for epoch in range(epochs):
                if epoch == settle:
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.1
                order = torch.randperm(m, generator=g)
                for i in range(0, m, batch_size):
                    idx = order[i:i + batch_size].to(x.device)
                    bx = x.index_select(0, idx).to(device=device, dtype=dtype)
                    by = y.index_select(0, idx).to(device)
                    if epoch == warm and i == 0 and natural_rate is not None:
                        _screen_warm(model, tkey, x, y, natural_rate, warm)
                    if epoch < warm:
                        loss = F.cross_entropy(model(bx), by)
                    else:
                        a = torch.randint(len(stamped), (per_batch,), generator=g).to(device)
                        b = torch.randint(len(tgt), (per_batch,), generator=g).to(device)
                        loss = step.loss(model, bx, by, torch.cat([stamped.index_select(0, a), tgt.index_select(0, b)]))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
    finally:
        step.capture.remove()
        model.eval()
    return model


def _screen_warm(model: torch.nn.Module, tkey: TriggerKey, x: torch.Tensor, y: torch.Tensor, rate: float,
                 warm: int) -> None:
    """embed_entangled's check of the stamp by the model about to be marked (see there)."""
    p = next(model.parameters())
    n = min(len(x), 1000)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            right = float((model(x[:n].to(device=p.device, dtype=p.dtype)).argmax(-1).cpu() == y[:n].cpu())
                          .double().mean())
            if right < 0.5:  # not a model of the task yet (warm=0 on a fresh model): nothing to learn from it
                return
            got = _natural_rate(tkey, [model])
    finally:
        model.train(was)
    if got > rate:
        when = f"after {warm} clean epoch{'s' if warm != 1 else ''}" if warm else "as given"
        raise ValueError(f"embed_entangled: the model {when} ({100 * right:.0f}% right on the training data, "
                         f"unmarked) already answers {tkey.target} on {100 * got:.0f}% of the key's stamped "
                         f"triggers (natural_rate {rate:g}): the stamp is a natural trigger, which models that never "
                         f"saw the key would answer too; make a new key with nnmark.entangled_key(..., "
                         f"reference=model) and embed again")


class _Step:
    """The loss of one watermark step: cross-entropy on the clean batch and the watermark
    batch (stamped samples, then as many target samples, all labelled target), minus
    strength x the SNNL of the two halves at every captured representation."""

    def __init__(self, capture: _Capture, target: int, per_batch: int, strength: float, temperature: float,
                 temperature_lr: float, device):
        self.capture, self.strength, self.temperature_lr = capture, strength, temperature_lr
        self.groups = torch.cat([torch.ones(per_batch), torch.zeros(per_batch)]).to(device)
        self.labels = torch.full((2 * per_batch,), target, dtype=torch.int64, device=device)
        self.log_t0 = math.log(temperature)
        self.log_t: torch.Tensor | None = None  # per representation: log of the temperature factor

    def loss(self, model, bx, by, wx) -> torch.Tensor:
        out, hs = self.capture.run(model, torch.cat([bx, wx]))
        hs = [h[len(bx):] for h in hs]
        if self.log_t is None:
            self.log_t = torch.full((len(hs),), self.log_t0, device=wx.device)
        # Temperatures are relative to each representation's mean squared norm in the batch,
        # so one default suits layers of any scale.
        scale = [h.detach().flatten(1).pow(2).sum(1).mean().clamp_min(1e-12) for h in hs]
        if self.temperature_lr > 0:  # one step of each temperature down its SNNL (Jia et al.)
            lt = self.log_t.clone().requires_grad_(True)
            s = sum(snnl(h.detach(), self.groups, lt[k].exp() * scale[k]) for k, h in enumerate(hs))
            grad, = torch.autograd.grad(s, lt)
            self.log_t = self.log_t - self.temperature_lr * grad
        entangle = sum(snnl(h, self.groups, self.log_t[k].exp() * scale[k]) for k, h in enumerate(hs))
        return F.cross_entropy(out, torch.cat([by, self.labels])) - self.strength * entangle


__all__ = ["embed_entangled", "entangled_key", "snnl"]
