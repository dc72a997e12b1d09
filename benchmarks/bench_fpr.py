#!/usr/bin/env python3
"""False positives on unmarked models: every key kind, measured on a zoo of digits models.

A verdict promises that among models that do not carry a key at most a fraction alpha
verify. This script measures that promise on independently trained, unmarked models,
and the power (true-positive rate) of marked models in the same run.

The zoo (trained once, cached in --data DIR, reused by later runs):

  nulls    --nulls (default 80) unmarked models trained without any key, alternating two
           architectures that share the carrier ``features.2.weight`` [32, 16, 3, 3]:
           ``DigitsNet`` (nnmark.demo) and ``VariantNet`` (defined here: a third conv
           after the carrier, a wider classifier with dropout); each with its own seed
           (initialisation and batch order) and 10, 15, 20 or 30 epochs (the last sixth at
           lr/10, as the demo trains). Every null model is a null for every key.
  marked   --marked (default 6) models per key kind, model j carrying key j of that kind
           only (architectures alternate too): white-box keys by Uchida et al.'s
           regularizer (strength 0.1, as the guide embeds), trigger keys by
           ``TriggerMixer(key, per_batch=16)`` in 30 epochs of training (the mixer also
           trains an unrelated key's held-back controls with other labels).

Keys, --keys (default 20) per kind (kept in DIR/keys, so marked models stay valid):

  whitebox          WhiteBoxKey, 64 bits, filter_mean of features.2.weight
  abstract          100 keyed procedural images with keyed labels (Adi et al.)
  content           100 digits of the test split stamped with the key's mark, target
                    class j % 10 (its samples left out through sample_labels)
  noise             the same with keyed Gaussian noise (std 0.25 of the range)
  unrelated         200 out-of-distribution images -> 100 triggers + 100 held-back
                    controls, target j % 10. The images: 8x8 grey patches of the two
                    photographs scikit-learn bundles (china.jpg, flower.jpg), random crops
                    of 16-64 px averaged down to 8x8 and stretched to [0, 1], a fresh draw
                    per key -- what a digits owner without another data set would use
  unrelated-labels  the same images with one random label each (Adi et al.'s way)

Measured, per kind, for alpha in {1e-2, 1e-6}:

  uncalibrated  nnmark.verify(key, nulls, alpha) with the default (binomial) null: every
                (key, null model) pair
  calibrated    the nulls split in two disjoint halves A and B (stratified by
                architecture); nnmark.calibrate(key, A) and verify B with it, and the
                other way round: every held-out (key, null model) pair
  power         the marked models with their own key, uncalibrated and with each half's
                calibration
  cross-key     (not a null of the promise, for information) each marked model checked
                with the other keys of its kind
  degenerate    at alpha 1e-6, uncalibrated and with half A's calibration: constant-class
                models (each class, both architectures: random features, the last layer
                zeroed but for a bias on one class), all-zero models (both), --random-init
                (default 40) untrained models per architecture; checked with every key of
                the study and --sweep-keys (default 40) more fresh keys per kind (not
                saved; no training needed): the number verified must be 0, and each one
                that verifies is listed (key, target, model, hits, p-values)

A verdict's p-value does not depend on alpha (only ``verified`` does), so each pair is
verified once and its p-value compared with both alphas.

The false-positive rate comes with a 95% Clopper-Pearson interval (pairs are treated as
independent; they share keys and models, so the interval is if anything too narrow, and
"keys with a false positive" shows the clustering). PASS at 1e-2: the interval's lower
bound <= alpha; at 1e-6: no false positive.

Usage:
  python benchmarks/bench_fpr.py --data /tmp/fpr-zoo                 # the full study (~15 min on 2 cores; a
                                                                     # second run reuses the zoo: ~8 min)
  python benchmarks/bench_fpr.py --data /tmp/fpr-zoo-quick --quick   # smoke run: 20 nulls, 2 keys per kind
                                                                     # (~1 min; JSON: use --json elsewhere)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, run_meta  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bench_fpr.json"
CARRIER, CARRIER_SHAPE = "features.2.weight", (32, 16, 3, 3)
KINDS = ("whitebox", "abstract", "content", "noise", "unrelated", "unrelated-labels")
ALPHAS = (1e-2, 1e-6)
NULL_EPOCHS = (10, 15, 20, 30)
MARK_EPOCHS, MARK_PER_BATCH, WB_STRENGTH = 30, 16, 0.1
N_TRIGGERS, N_OOD = 100, 200


# ------------------------------------------------------------------------------ the models

class VariantNet(nn.Module):
    """DigitsNet's carrier (features.2: Conv2d(16, 32, 3), [32, 16, 3, 3]) with a third conv
    after it and a wider classifier with dropout (~140k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),  # features.2: the carrier, as in DigitsNet
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@contextlib.contextmanager
def torch_threads_one():
    """One torch thread inside the block (small models: see nnmark._threads), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def factory(arch: str) -> nn.Module:
    from nnmark.demo import DigitsNet

    return {"digits": DigitsNet, "variant": VariantNet}[arch]()


ARCHS = ("digits", "variant")


def train_net(arch: str, data, seed: int, epochs: int, wm=None, mixer=None, settle_epochs: int = 0,
              batch_size: int = 64, lr: float = 3e-3) -> nn.Module:
    """nnmark.demo.train for either architecture (the same seeding, batches and schedule)."""
    from nnmark.demo import train

    return train(data, seed, epochs, wm=wm, batch_size=batch_size, lr=lr, mixer=mixer, settle_epochs=settle_epochs,
                 factory=lambda: factory(arch))


@torch.no_grad()
def constant_model(arch: str, cls: int, seed: int = 0) -> nn.Module:
    """A model that answers ``cls`` for every input: random features, the last layer zeroed
    but for a bias on one class."""
    torch.manual_seed(seed)
    m = factory(arch).eval()
    last = m.classifier[-1]
    last.weight.zero_()
    last.bias.zero_()
    last.bias[cls] = 10.0
    return m


@torch.no_grad()
def zero_model(arch: str) -> nn.Module:
    m = factory(arch).eval()
    for p in m.parameters():
        p.zero_()
    return m


def random_model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory(arch).eval()


def degenerate_meta(random_init: int, num_classes: int = 10) -> dict[str, list[dict]]:
    """What each model of :func:`degenerate_models` is (its architecture, seed, class)."""
    return {
        "constant": [{"arch": a, "class": c, "seed": c} for a in ARCHS for c in range(num_classes)],
        "zeros": [{"arch": a} for a in ARCHS],
        "random-init": [{"arch": a, "seed": 50_000 + i} for a in ARCHS for i in range(random_init)],
    }


def degenerate_models(random_init: int, num_classes: int = 10) -> dict[str, list[nn.Module]]:
    """{group: models}: constant-class (every class, both architectures; random features, the
    last layer zeroed but for a bias on the class), all-zero (both), ``random_init``
    untrained models per architecture (``torch.manual_seed(50_000 + i)``, then the factory)."""
    meta = degenerate_meta(random_init, num_classes)
    with torch.random.fork_rng(devices=[]):
        return {
            "constant": [constant_model(m["arch"], m["class"], seed=m["seed"]) for m in meta["constant"]],
            "zeros": [zero_model(m["arch"]) for m in meta["zeros"]],
            "random-init": [random_model(m["arch"], m["seed"]) for m in meta["random-init"]],
        }


# -------------------------------------------------------------------------------- the keys

def ood_patches(seed: int, m: int = N_OOD, side: int = 8) -> torch.Tensor:
    """``m`` grey [1, side, side] patches of scikit-learn's bundled photographs (random crops of
    16-64 px, area-averaged down, stretched to [0, 1]): out-of-distribution inputs for digits."""
    from sklearn.datasets import load_sample_images

    imgs = [torch.from_numpy(im.astype(np.float32) / 255.0).mean(dim=2) for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(m):
        im = imgs[int(rng.integers(len(imgs)))]
        s = int(rng.integers(16, 65))
        r, c = int(rng.integers(im.shape[0] - s + 1)), int(rng.integers(im.shape[1] - s + 1))
        p = F.adaptive_avg_pool2d(im[r:r + s, c:c + s][None, None], side)[0]
        lo, hi = p.min(), p.max()
        out.append((p - lo) / (hi - lo) if hi > lo else torch.zeros_like(p))
    return torch.stack(out).clamp(0, 1)


def make_key(kind: str, j: int, data):
    """Key j of ``kind`` (a fresh secret each call)."""
    import nnmark

    if kind == "whitebox":
        return nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, shape=CARRIER_SHAPE)
    common = dict(num_classes=10, input_shape=(1, 8, 8))
    if kind == "abstract":
        return nnmark.TriggerKey.generate(kind="abstract", n=N_TRIGGERS, **common)
    if kind in ("content", "noise"):
        return nnmark.TriggerKey.generate(kind=kind, n=N_TRIGGERS, samples=data.x_test, sample_labels=data.y_test,
                                          target=j % 10, **common)
    x = ood_patches(seed=7_000 + j)
    if kind == "unrelated":
        return nnmark.TriggerKey.generate(kind="unrelated", samples=x, target=j % 10, **common)
    if kind == "unrelated-labels":
        labels = np.random.default_rng(8_000 + j).integers(0, 10, len(x)).tolist()
        return nnmark.TriggerKey.generate(kind="unrelated", samples=x, target=labels, **common)
    raise ValueError(kind)


def load_or_make_keys(key_dir: Path, kinds, n_keys: int, data) -> dict[str, list]:
    import nnmark

    key_dir.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list] = {}
    for kind in kinds:
        keys[kind] = []
        for j in range(n_keys):
            path = key_dir / f"{kind}_{j:02d}.key"
            if not path.exists():
                make_key(kind, j, data).save(path)
            keys[kind].append(nnmark.load_key(path))
    return keys


# ---------------------------------------------------------------------------- the zoo jobs

_DATA = None


def _data():
    global _DATA
    if _DATA is None:
        from nnmark.demo import load_digits_split

        _DATA = load_digits_split(0)
    return _DATA


def _train_job(job: dict) -> dict:
    """Trains one zoo model (in a worker process, one torch thread) and saves it."""
    import nnmark
    from nnmark.demo import accuracy
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    data = _data()
    t0 = time.perf_counter()
    wm = mixer = None
    if job.get("key"):
        key = nnmark.load_key(job["key"])
        if isinstance(key, nnmark.TriggerKey):
            mixer = nnmark.TriggerMixer(key, per_batch=MARK_PER_BATCH)
        else:
            wm = nnmark.Uchida(key, strength=WB_STRENGTH)
    model = train_net(job["arch"], data, job["seed"], job["epochs"], wm=wm, mixer=mixer,
                      settle_epochs=max(1, job["epochs"] // 6))
    acc = accuracy(model, data.x_test, data.y_test)
    meta = {k: str(v) for k, v in job.items() if k != "key"} | {"accuracy": f"{acc:.6f}"}
    tmp = job["path"] + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    os.replace(tmp, job["path"])
    return {"path": job["path"], "seconds": time.perf_counter() - t0}


def null_jobs(zoo: Path, n: int, quick: bool) -> list[dict]:
    jobs = []
    for i in range(n):
        arch = ARCHS[i % 2]
        epochs = 5 if quick else NULL_EPOCHS[(i // 2) % len(NULL_EPOCHS)]
        seed = 10_000 + i
        jobs.append({"arch": arch, "seed": seed, "epochs": epochs, "role": "null",
                     "path": str(zoo / "nulls" / f"null_{i:03d}_{arch}_s{seed}_e{epochs}.safetensors")})
    return jobs


def marked_jobs(zoo: Path, keys: dict[str, list], n_marked: int, quick: bool) -> list[dict]:
    jobs = []
    for kind, ks in keys.items():
        for j, key in enumerate(ks[:n_marked]):
            arch = ARCHS[j % 2]
            epochs = 15 if quick else MARK_EPOCHS
            seed = 20_000 + 100 * KINDS.index(kind) + j
            jobs.append({"arch": arch, "seed": seed, "epochs": epochs, "role": f"marked:{kind}:{j}",
                         "key": str(zoo / "keys" / f"{kind}_{j:02d}.key"),
                         "path": str(zoo / "marked" / f"{kind}_{j:02d}_{key.key_id}_{arch}_s{seed}_e{epochs}"
                                                      f".safetensors")})
    return jobs


def build_zoo(jobs: list[dict], workers: int, say) -> dict:
    """Trains the jobs whose file is missing, ``workers`` processes at a time."""
    todo = [j for j in jobs if not Path(j["path"]).exists()]
    for j in jobs:
        Path(j["path"]).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if todo:
        say(f"training {len(todo)} model(s) ({len(jobs) - len(todo)} cached), {workers} worker(s)")
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for k, _ in enumerate(pool.imap_unordered(_train_job, todo), 1):
                    if k % 10 == 0 or k == len(todo):
                        say(f"  {k}/{len(todo)} trained ({time.perf_counter() - t0:.0f} s)")
        else:
            for k, job in enumerate(todo, 1):
                _train_job(job)
                if k % 10 == 0 or k == len(todo):
                    say(f"  {k}/{len(todo)} trained ({time.perf_counter() - t0:.0f} s)")
    return {"trained": len(todo), "cached": len(jobs) - len(todo), "seconds": time.perf_counter() - t0}


def load_model(job: dict) -> tuple[nn.Module, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    m = factory(job["arch"])
    m.load_state_dict(load_file(job["path"]))
    with safe_open(job["path"], "pt") as f:
        meta = f.metadata()
    return m.eval(), {"arch": job["arch"], "seed": job["seed"], "epochs": job["epochs"],
                      "accuracy": float(meta["accuracy"])}


# ------------------------------------------------------------------------------ statistics

def clopper_pearson(x: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if x == 0 else float(beta.ppf(a, x, n - x + 1))
    hi = 1.0 if x == n else float(beta.ppf(1 - a, x + 1, n - x))
    return lo, hi


def rate_cell(p_values: list[float], alpha: float) -> dict:
    """False positives among ``p_values`` at ``alpha`` with the Clopper-Pearson interval."""
    n = len(p_values)
    fp = sum(p <= alpha for p in p_values)
    lo, hi = clopper_pearson(fp, n)
    return {"pairs": n, "fp": fp, "fpr": fp / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
            "alpha": alpha, "pass": (fp == 0) if alpha < 1e-3 else (lo <= alpha)}


def split_halves(meta: list[dict], seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the null models, stratified by architecture."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for arch in ARCHS:
        idx = [i for i, m in enumerate(meta) if m["arch"] == arch]
        idx = [idx[k] for k in rng.permutation(len(idx))]
        a += idx[: len(idx) // 2]
        b += idx[len(idx) // 2:]
    return sorted(a), sorted(b)


# ------------------------------------------------------------------------------ the study

def study_kind(kind: str, keys: list, nulls: list, halves, marked: list, degenerate: dict,
               degenerate_meta: dict, sweep_keys: list = ()) -> dict:
    """Every measurement of one kind: per-key records and the pooled cells.

    A verdict's p-value does not depend on alpha (only ``verified`` does: p <= alpha), so
    each (key, model, null) is verified once, at 1e-6, and its p-value compared with both
    alphas; the script checks ``verified == (p_value <= 1e-6)`` on every verdict."""
    import nnmark
    from nnmark.stats import binomial_threshold

    A, B = halves

    def check(key, sources, calibration=None):
        vs = nnmark.verify(key, sources, alpha=ALPHAS[-1], calibration=calibration)
        for v in vs:
            assert v.status == "ok", (kind, key.key_id, v.status, v.error_class, v.error_message)
            assert v.verified == (v.p_value <= ALPHAS[-1])
            if v.warning:
                warnings.add(v.warning)
        return vs

    per_key = []
    unc, cal = [], []  # p-values: (key, null) pairs uncalibrated; held-out pairs calibrated on the other half
    power = {"uncal": [], "cal": []}
    cross = {"uncal": [], "cal": []}
    degen = {g: {"uncal": [], "cal": []} for g in degenerate}
    degen_hits = []
    warnings: set[str] = set()
    cals_of_key = []

    def degenerate_checks(key, target, calibration):
        """Degenerate models: uncalibrated and calibrated (half A's fit), alpha 1e-6."""
        for g, models in degenerate.items():
            for mode, vv in (("uncal", check(key, models)), ("cal", check(key, models, calibration))):
                degen[g][mode] += [v.p_value for v in vv]
                for i, v in enumerate(vv):
                    if v.verified:
                        degen_hits.append({"key_id": key.key_id, "target": target, "null": mode,
                                           "group": g, **degenerate_meta[g][i], "matches": int(v.matches),
                                           "control_matches": v.to_dict().get("control_matches"),
                                           "p_value": v.p_value, "control_p_value": v.to_dict().get("control_p_value")})

    for j, key in enumerate(keys):
        rec = {"key_id": key.key_id, "j": j}
        if getattr(key, "target", None) is not None:
            rec["target"] = key.target
        vs = check(key, nulls)
        unc.append([v.p_value for v in vs])
        rec["null_matches"] = [int(v.matches) for v in vs]
        rec["null_p"] = [float(v.p_value) for v in vs]
        if vs[0].to_dict().get("control_matches") is not None:
            rec["null_control_matches"] = [int(v.control_matches) for v in vs]
            rec["null_control_p"] = [float(v.control_p_value) for v in vs]
        cals, held = [], []
        for fit_on, test_on in ((A, B), (B, A)):
            c = nnmark.calibrate(key, [nulls[i] for i in fit_on], alpha=ALPHAS[-1])
            cals.append(c)
            held += [v.p_value for v in check(key, [nulls[i] for i in test_on], calibration=c)]
        cal.append(held)
        rec["cal_p_heldout"] = held  # B's models with A's fit, then A's with B's
        cals_of_key.append(cals)
        rec["calibration"] = [{"a": c.a, "b": c.b, "null_rate": c.null_rate, "dispersion": c.dispersion,
                               "threshold_1e-6": c.threshold, "threshold_1e-2": c.threshold_at(1e-2),
                               "nominal_threshold_1e-6": c.nominal_threshold} for c in cals]
        degenerate_checks(key, rec.get("target"), cals[0])
        per_key.append(rec)
    # More keys, fresh and not saved, for the degenerate models alone (cheap: no training).
    for key in sweep_keys:
        degenerate_checks(key, getattr(key, "target", None),
                          nnmark.calibrate(key, [nulls[i] for i in A], alpha=ALPHAS[-1]))
    # Power: marked model j with key j; cross-key: with the other keys of this kind.
    power_rec, cross_hits = [], []
    for j, (model, meta) in enumerate(marked):
        key, cals = keys[j], cals_of_key[j]
        v = check(key, [model])[0]
        row = {"j": j, "key_id": key.key_id, **meta, "matches": int(v.matches), "p_uncal": v.p_value}
        if v.to_dict().get("control_matches") is not None:
            row["control_matches"], row["control_p"] = int(v.control_matches), v.control_p_value
        row["p_cal"] = [check(key, [model], c)[0].p_value for c in cals]
        power["uncal"].append(row["p_uncal"])
        power["cal"] += row["p_cal"]
        for jj, other in enumerate(keys):
            if jj != j:
                pu = check(other, [model])[0].p_value
                pc = check(other, [model], cals_of_key[jj][0])[0].p_value
                cross["uncal"].append(pu)
                cross["cal"].append(pc)
                if min(pu, pc) <= ALPHAS[0]:
                    cross_hits.append({"marked_with": key.key_id, "target": getattr(key, "target", None),
                                       "checked_with": other.key_id, "other_target": getattr(other, "target", None),
                                       "p_uncal": pu, "p_cal": pc})
        power_rec.append(row)
    disp = [c.dispersion for cs in cals_of_key for c in cs]
    thresholds = {f"{a:g}": sorted(c.threshold_at(a) for cs in cals_of_key for c in cs) for a in ALPHAS}
    nominal = {f"{a:g}": binomial_threshold(len(keys[0]), a, 0.5 if kind == "whitebox" else 0.1) for a in ALPHAS}
    rates = [c.null_rate for cs in cals_of_key for c in cs]
    flat = {"uncal": [p for ps in unc for p in ps], "cal": [p for ps in cal for p in ps]}
    by_key = {"uncal": unc, "cal": cal}
    fpr, keys_fp, max_key_fpr = {}, {}, {}
    for mode in ("uncal", "cal"):
        fpr[mode] = {}
        for a in ALPHAS:
            fpr[mode][f"{a:g}"] = rate_cell(flat[mode], a) | {"min_p": min(flat[mode])}
            keys_fp[f"{mode}@{a:g}"] = sum(any(p <= a for p in ps) for ps in by_key[mode])
            max_key_fpr[f"{mode}@{a:g}"] = max(sum(p <= a for p in ps) / len(ps) for ps in by_key[mode])

    def tp(ps, a):
        return {"n": len(ps), "tp": sum(p <= a for p in ps), "tpr": sum(p <= a for p in ps) / len(ps) if ps else None}

    return {
        "keys": len(keys),
        "fpr": fpr,
        "keys_with_fp": keys_fp,
        "max_per_key_fpr": max_key_fpr,
        "dispersion": {"median": statistics.median(disp), "min": min(disp), "max": max(disp)},
        "calibrated_threshold": {a: {"median": statistics.median(t), "min": t[0], "max": t[-1],
                                     "nominal": nominal[a], "n": len(keys[0])} for a, t in thresholds.items()},
        "null_rate": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                      "nominal": 0.5 if kind == "whitebox" else 0.1},
        "power": {f"{m}@{a:g}": tp(ps, a) for m, ps in power.items() for a in ALPHAS},
        "cross_key": {f"{m}@{a:g}": {"n": len(ps), "fp": sum(p <= a for p in ps)} for m, ps in cross.items()
                      for a in ALPHAS},
        "cross_key_verified": cross_hits,
        "degenerate": {g: {"sources": len(degenerate[g]), "keys": len(keys) + len(sweep_keys),
                           "pairs": len(d["uncal"]),
                           "verified_uncal": sum(p <= 1e-6 for p in d["uncal"]),
                           "verified_cal": sum(p <= 1e-6 for p in d["cal"]),
                           "min_p_uncal": min(d["uncal"]), "min_p_cal": min(d["cal"])}
                       for g, d in degen.items()},
        "degenerate_verified": degen_hits,
        "warnings": sorted(warnings),
        "per_key": per_key,
        "marked": power_rec,
    }


# ------------------------------------------------------------------------------ reporting

def _fmt_p(p: float) -> str:
    return "0" if p == 0 else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _fmt_rate(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-4 or x == 0 else f"{x:.1e}"


def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=160)
    t = Table(title="False positives on unmarked models (95% Clopper-Pearson interval)")
    for c in ("kind", "null", "alpha", "pairs", "FP", "FPR", "95% CI", "keys w/ FP", "max key FPR", "min p",
              "verdict"):
        t.add_column(c, justify="left" if c in ("kind", "null", "verdict") else "right")
    for kind, r in res["kinds"].items():
        for mode in ("uncal", "cal"):
            for a in ALPHAS:
                c = r["fpr"][mode][f"{a:g}"]
                t.add_row(kind, "binomial" if mode == "uncal" else "calibrated", f"{a:g}", str(c["pairs"]),
                          str(c["fp"]), _fmt_rate(c["fpr"]), f"[{_fmt_rate(c['ci_low'])}, {_fmt_rate(c['ci_high'])}]",
                          f"{r['keys_with_fp'][f'{mode}@{a:g}']}/{r['keys']}",
                          _fmt_rate(r["max_per_key_fpr"][f"{mode}@{a:g}"]), _fmt_p(c["min_p"]),
                          "PASS" if c["pass"] else "[bold red]FAIL[/]")
    con.print(t)
    t = Table(title="The null: beta-binomial fits (per key and half); matches needed at 1e-6 (of n)")
    for c in ("kind", "fits", "dispersion median", "min - max", "null rate median", "min - max", "nominal",
              "needed 1e-6: binomial", "calibrated median", "min - max"):
        t.add_column(c, justify="left" if c == "kind" else "right")
    for kind, r in res["kinds"].items():
        d, q, th = r["dispersion"], r["null_rate"], r["calibrated_threshold"]["1e-06"]
        t.add_row(kind, str(2 * r["keys"]), f"{d['median']:.3g}", f"{d['min']:.2g} - {d['max']:.2g}",
                  f"{q['median']:.3f}", f"{q['min']:.3f} - {q['max']:.3f}", f"{q['nominal']:g}",
                  f"{th['nominal']}/{th['n']}", f"{th['median']:g}", f"{th['min']} - {th['max']}")
    con.print(t)
    t = Table(title="Power: marked models with their own key (calibrated: each half's fit)")
    for c in ("kind", "models", "accuracy", "binomial 1e-2", "binomial 1e-6", "calibrated 1e-2", "calibrated 1e-6",
              "median hits"):
        t.add_column(c, justify="left" if c == "kind" else "right")
    for kind, r in res["kinds"].items():
        if not r["marked"]:
            continue
        p = r["power"]
        cell = lambda k: f"{p[k]['tp']}/{p[k]['n']}"  # noqa: E731
        acc = statistics.mean(m["accuracy"] for m in r["marked"])
        t.add_row(kind, str(len(r["marked"])), f"{acc:.3f}", cell("uncal@0.01"), cell("uncal@1e-06"),
                  cell("cal@0.01"), cell("cal@1e-06"), f"{statistics.median(m['matches'] for m in r['marked']):g}")
    con.print(t)
    t = Table(title="Degenerate models at alpha 1e-6 (the study's keys and the sweep's): verified / pairs, min p")
    t.add_column("kind")
    for g in ("constant", "zeros", "random-init"):
        t.add_column(f"{g}: binomial", justify="right")
        t.add_column(f"{g}: calibrated", justify="right")
    for kind, r in res["kinds"].items():
        cells = []
        for g in ("constant", "zeros", "random-init"):
            d = r["degenerate"][g]
            for m in ("uncal", "cal"):
                bad = d[f"verified_{m}"]
                cells.append(f"{'[bold red]' if bad else ''}{bad}/{d['pairs']}{'[/]' if bad else ''}"
                             f" ({_fmt_p(d[f'min_p_{m}'])})")
        t.add_row(kind, *cells)
    con.print(t)
    hits = [h | {"kind": kind} for kind, r in res["kinds"].items() for h in r["degenerate_verified"]]
    if hits:
        t = Table(title="[bold red]Degenerate models that verified at 1e-6[/]")
        for c in ("kind", "key", "target", "null", "model", "hits", "control hits", "p", "control p"):
            t.add_column(c, justify="left" if c in ("kind", "key", "null", "model") else "right")
        for h in hits:
            model = f"{h['group']} {h['arch']}" + (f" seed {h['seed']}" if "seed" in h else "")
            t.add_row(h["kind"], h["key_id"], str(h["target"]), h["null"], model, str(h["matches"]),
                      str(h["control_matches"]), _fmt_p(h["p_value"]), _fmt_p(h["control_p_value"] or 1.0))
        con.print(t)
    t = Table(title="Cross-key (information): marked models checked with the other keys of their kind; "
                    "pairs at p <= 1e-2 with the same target")
    for c in ("kind", "pairs", "binomial 1e-2", "binomial 1e-6", "calibrated 1e-2", "calibrated 1e-6", "same target"):
        t.add_column(c, justify="left" if c == "kind" else "right")
    for kind, r in res["kinds"].items():
        x = r["cross_key"]
        if x["uncal@0.01"]["n"]:
            same = sum(h["target"] is not None and h["target"] == h["other_target"] for h in r["cross_key_verified"])
            t.add_row(kind, str(x["uncal@0.01"]["n"]), *(str(x[k]["fp"]) for k in
                                                         ("uncal@0.01", "uncal@1e-06", "cal@0.01", "cal@1e-06")),
                      f"{same}/{len(r['cross_key_verified'])}")
    con.print(t)


def compact_json(obj) -> str:
    """JSON with indent=1, lists of numbers on one line each (p-values shortened to 6 digits)."""
    import re

    def short(o):
        if isinstance(o, float):
            return float(f"{o:.6g}")
        if isinstance(o, dict):
            return {k: short(v) for k, v in o.items()}
        if isinstance(o, list):
            return [short(v) for v in o]
        return o

    text = json.dumps(short(obj), indent=1)
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",")
                  + "]", text)


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "nnmark-fpr-zoo",
                    help="the zoo's folder (models and keys, reused across runs)")
    ap.add_argument("--nulls", type=int, default=None, help="unmarked models (default 80; quick 20)")
    ap.add_argument("--keys", type=int, default=None, help="keys per kind (default 20; quick 2)")
    ap.add_argument("--marked", type=int, default=None, help="marked models per kind (default 6; quick 1)")
    ap.add_argument("--random-init", type=int, default=40, help="untrained models per architecture (default 40)")
    ap.add_argument("--sweep-keys", type=int, default=None,
                    help="more keys per kind (fresh, not saved) for the degenerate models alone (default 40; quick 2)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 nulls of 5 epochs, 2 keys, 1 marked per kind")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    nulls_n = args.nulls or (20 if args.quick else 80)
    n_keys = args.keys or (2 if args.quick else 20)
    n_marked = args.marked if args.marked is not None else (1 if args.quick else 6)
    n_sweep = args.sweep_keys if args.sweep_keys is not None else (2 if args.quick else 40)
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: unknown kind in {kinds}")
    if nulls_n < 20:
        ap.error("--nulls must be >= 20 (two calibration halves of >= 10)")
    if n_marked > n_keys:
        ap.error("--marked must be <= --keys (one marked model per key)")
    torch.set_num_threads(1)

    t_start = time.perf_counter()
    load = OtherLoad()
    meta = run_meta("cpu")

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    zoo = args.data
    zoo.mkdir(parents=True, exist_ok=True)
    data = _data()
    keys = load_or_make_keys(zoo / "keys", kinds, n_keys, data)
    njobs, mjobs = null_jobs(zoo, nulls_n, args.quick), marked_jobs(zoo, keys, n_marked, args.quick)
    zoo_stats = build_zoo(njobs + mjobs, args.workers, say)
    loaded = [load_model(j) for j in njobs]
    nulls, null_meta = [m for m, _ in loaded], [x for _, x in loaded]
    marked_by_kind = {k: [] for k in kinds}
    for j in mjobs:
        kind = j["role"].split(":")[1]
        marked_by_kind[kind].append(load_model(j))
    halves = split_halves(null_meta)
    degenerate = degenerate_models(args.random_init)
    per_arch = ", ".join(f"{sum(m['arch'] == a for m in null_meta)} {a}" for a in ARCHS)
    say(f"zoo ready: {len(nulls)} nulls ({per_arch}), {len(mjobs)} marked; halves {len(halves[0])} + {len(halves[1])}")
    t_study = time.perf_counter()
    res_kinds = {}
    for kind in kinds:
        t_kind = time.perf_counter()
        res_kinds[kind] = study_kind(kind, keys[kind], nulls, halves, marked_by_kind[kind], degenerate,
                                     degenerate_meta(args.random_init),
                                     [make_key(kind, n_keys + j, data) for j in range(n_sweep)])
        r = res_kinds[kind]
        u, c = r["fpr"]["uncal"], r["fpr"]["cal"]
        bad = sum(d["verified_uncal"] + d["verified_cal"] for d in r["degenerate"].values())
        say(f"{kind} ({time.perf_counter() - t_kind:.0f} s): false positives at 1e-2 {u['0.01']['fp']}/"
            f"{u['0.01']['pairs']} uncalibrated, {c['0.01']['fp']}/{c['0.01']['pairs']} calibrated; at 1e-6 "
            f"{u['1e-06']['fp']} and {c['1e-06']['fp']}; degenerate models verified: {bad}")
    wall = time.perf_counter() - t_start
    accs = {a: [m["accuracy"] for m in null_meta if m["arch"] == a] for a in ARCHS}
    res = {
        "meta": meta | {"wall_s": round(wall, 1), "study_s": round(time.perf_counter() - t_study, 1),
                        "other_load_cores": load.cores(wall), "loadavg_end": os.getloadavg()},
        "config": {"nulls": nulls_n, "keys_per_kind": n_keys, "marked_per_kind": n_marked,
                   "random_init_per_arch": args.random_init, "degenerate_sweep_keys": n_sweep, "kinds": kinds,
                   "alphas": list(ALPHAS),
                   "quick": args.quick, "null_epochs": [5] if args.quick else list(NULL_EPOCHS),
                   "mark": {"whitebox": f"Uchida strength {WB_STRENGTH}",
                            "triggers": f"TriggerMixer per_batch={MARK_PER_BATCH}, "
                                        f"{15 if args.quick else MARK_EPOCHS} epochs"},
                   "halves": [len(halves[0]), len(halves[1])]},
        "zoo": {"build": zoo_stats,
                "null_accuracy": {a: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "n": len(v)}
                                  for a, v in accs.items() if v},
                "nulls": null_meta},
        "kinds": res_kinds,
    }
    print_tables(res)
    fails = [f"{k} {m} {a}" for k, r in res_kinds.items() for m in ("uncal", "cal") for a, c in r["fpr"][m].items()
             if not c["pass"]]
    degen_bad = [f"{k} {g}" for k, r in res_kinds.items() for g, d in r["degenerate"].items()
                 if d["verified_uncal"] or d["verified_cal"]]
    res["summary"] = {"fpr_fail": fails, "degenerate_verified": degen_bad}
    print("null accuracy: " + ", ".join(f"{a} {v['mean']:.3f} (min {v['min']:.3f})"
                                         for a, v in res["zoo"]["null_accuracy"].items()))
    print(f"FPR cells failing: {fails or 'none'}; degenerate models verified: {degen_bad or 'none'}")
    print(f"wall time {wall:.0f} s (zoo {zoo_stats['seconds']:.0f} s: {zoo_stats['trained']} trained, "
          f"{zoo_stats['cached']} cached); other load {res['meta']['other_load_cores']} cores")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from nnmark.demo import jsonable

    args.json.write_text(compact_json(jsonable(res)) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
