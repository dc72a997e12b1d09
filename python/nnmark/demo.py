"""The end-to-end demo on bundled data (scikit-learn's 8x8 digits).

Trains a small CNN with a white-box mark (Uchida et al.'s regularizer on the
second conv layer), an unmarked twin (same seed, same batches) and ten more
independently trained unmarked models, then verifies all of them with the
owner's key. The marked model must verify; no unmarked model may.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._threads import forward_macs, small_work_threads, threads_for, torch_threads

CARRIER = "features.2.weight"


class DigitsNet(nn.Module):
    """A small CNN for 1x8x8 digits: 2 convs, a pool, 2 linears (~43k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),  # features.2: the carrier, 32x16x3x3
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's bundled digits (1797 images, no download), scaled to [0, 1], split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # [n, 1, 8, 8]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target)
    return Digits(torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long())


def train(data: Digits, seed: int, epochs: int = 12, wm=None, batch_size: int = 64, lr: float = 3e-3,
          mixer=None, settle_epochs: int = 0, factory=None, model: nn.Module | None = None) -> nn.Module:
    """Trains a DigitsNet (or ``factory()``, another net for 1x8x8 digits); ``wm`` (e.g.
    nnmark.Uchida, or a list of such) adds its penalty to the loss and ``mixer``
    (nnmark.TriggerMixer, or a list) puts trigger samples into every batch. The last
    ``settle_epochs`` run at lr/10, so clean accuracy settles after the marks are learnt.
    ``model``: go on training this one instead of a fresh net."""
    regs = [] if wm is None else list(wm) if isinstance(wm, (list, tuple)) else [wm]
    mixers = [] if mixer is None else list(mixer) if isinstance(mixer, (list, tuple)) else [mixer]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model is None:
        model = (factory or DigitsNet)()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x_train)
    model.train()
    with small_work_threads(model):  # a small model: one torch thread (see nnmark._threads)
        for epoch in range(epochs):
            if epoch == epochs - settle_epochs:
                for group in opt.param_groups:
                    group["lr"] = lr / 10
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                xb, yb = data.x_train[idx], data.y_train[idx]
                for m in mixers:
                    xb, yb = m.mix(xb, yb)
                loss = F.cross_entropy(model(xb), yb)
                for r in regs:
                    loss = loss + r.penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


# The demo's robustness grid: small, so the whole demo stays well under a minute and a half.
# Weight attacks (what a holder of the weights can do) and the two query-only attacks
# (what an API's user can do), so the distribution table has both rows.
DEMO_GRID = {
    "prune_global": [0.1, 0.3, 0.5, 0.7, 0.9],
    "fine_prune": [0.5, 0.9],
    "ftal": [1, 3],
    "overwrite": [1, 3],
    "quantize": [8, 4, 2],
    "permute": [1],
    "permute+realign": [1],
    "distill": [100, 1000],
    "evasion": [0.01],
}


def full_grid() -> dict:
    """``nnmark demo --full-grid``: every attack at its default strengths, extraction at
    several budgets (labels and probabilities, up to every training input) and evasion."""
    from .robustness import DEFAULT_GRID

    return {**DEFAULT_GRID, "distill": [30, 100, 300, 1000, 1347], "distill_probs": [100, 300, 1000, 1347],
            "evasion": [0.01, 0.05]}


DEEPSIGNS_LAYER = "classifier.1"  # the 64-unit linear layer before its ReLU (docs: why this one)
FRONTIER = 100  # frontier triggers, as many held back, and as many false adversaries


def run_demo(out_dir: str | os.PathLike = "nnmark-demo", unmarked: int = 10, epochs: int = 30, bits: int = 64,
             seed: int = 0, alpha: float = 1e-6, triggers: int = 100, per_batch: int | None = None, progress=None,
             robustness=True, frontier: int = FRONTIER) -> dict:
    """Runs the demo; writes the keys, the models and ``demo.json`` into ``out_dir``; returns the results.

    The marked model carries four marks: two white-box ones — ``bits`` bits in the second
    conv layer's weights (Uchida et al.'s regularizer) and ``bits`` bits in the mean
    activation of ``classifier.1`` on a few keyed inputs (DeepSigns) — and two black-box
    ones: ``triggers`` abstract trigger images with keyed labels (Adi et al., ``per_batch``
    mixed into every batch; default TriggerMixer's share, a third of each batch) and ``frontier`` frontier-stitching adversaries (Le Merrer et
    al., made from the trained model, then stitched in by a short fine-tuning; 0: none).
    Models: the marked one, its unmarked twin (same seed, batches and fine-tuning: the fair
    accuracy comparison) and ``unmarked`` independently trained unmarked models. Then,
    unless ``robustness`` is False, the marked model goes through a grid of attacks
    (``DEMO_GRID``; ``"full"`` for :func:`full_grid`; or the grid ``robustness`` gives; the
    attacker's data is the training split) and the report, with its distribution table, is
    written to ``out_dir/robustness/``; ``result["robustness"]`` holds it.
    """
    # Every model here is a DigitsNet, 21M multiply-adds for a batch of 64: training,
    # verifying and attacking them run on one torch thread (nnmark._threads), which on a
    # machine busy with other processes was 10x faster than two spinning ones. The
    # caller's thread count comes back afterwards.
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation leaves the caller's RNG alone
        macs = forward_macs(DigitsNet(), torch.zeros(64, 1, 8, 8))
    with torch_threads(threads_for(macs)):
        return _run_demo(out_dir, unmarked, epochs, bits, seed, alpha, triggers, per_batch, progress, robustness,
                         frontier)


def _run_demo(out_dir, unmarked, epochs, bits, seed, alpha, triggers, per_batch, progress, robustness,
              frontier) -> dict:
    import nnmark
    from safetensors.torch import save_file

    if unmarked < 1:
        raise ValueError(f"unmarked must be >= 1, got {unmarked}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(seed)
    shape = tuple(DigitsNet().get_parameter(CARRIER).shape)
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=bits, reduction="filter_mean", shape=shape)
    key.save(out / "owner.key")
    dkey = nnmark.DeepSignsKey.generate(DEEPSIGNS_LAYER, data.x_train, data.y_train, bits=bits, classes=2)
    dkey.save(out / "deepsigns.key")
    tkey = nnmark.TriggerKey.generate(kind="abstract", n=triggers, num_classes=10, input_shape=(1, 8, 8))
    tkey.save(out / "triggers.key")

    def step(msg):
        if progress is not None:
            progress(msg)

    step("training the marked model (Uchida + DeepSigns regularizers, abstract trigger set)")
    settle = max(1, epochs // 6)  # the last epochs at lr/10, for every model alike
    regs = [nnmark.Uchida(key, strength=0.01), nnmark.DeepSigns(dkey, strength=0.1)]
    mixers = [nnmark.TriggerMixer(tkey, per_batch=per_batch)]
    marked = train(data, seed, epochs, wm=regs, mixer=mixers, settle_epochs=settle)
    step("training its unmarked twin (same seed and batches)")
    twin = train(data, seed, epochs, settle_epochs=settle)
    fkey = None
    if frontier:
        # Frontier stitching needs the trained model: adversaries near its boundary, then a
        # short fine-tuning (every other mark kept in the batches). The twin gets the same.
        step("frontier stitching: adversaries near the marked model's boundary, stitched in")
        fkey = nnmark.TriggerKey.generate(kind="frontier", model=marked, samples=data.x_train, labels=data.y_train,
                                          n=frontier, controls=frontier, false_adversaries=frontier)
        fkey.save(out / "frontier.key")
        stitch = max(2, epochs // 2)
        marked = train(data, seed + 1, stitch, wm=regs, settle_epochs=max(1, stitch // 4), model=marked,
                       mixer=mixers + [nnmark.TriggerMixer(fkey)])
        twin = train(data, seed + 1, stitch, settle_epochs=max(1, stitch // 4), model=twin)
    models = [("marked", marked), ("twin", twin)]  # twin: unmarked, same seed and batches
    for k in range(unmarked):
        step(f"training independent unmarked model {k + 1}/{unmarked}")
        models.append((f"null {k + 1}", train(data, seed + 1000 + k, epochs, settle_epochs=settle)))

    paths = []
    for name, model in models:
        path = out / (name.replace(" ", "_").replace("#", "") + ".safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths.append(path)
    step("verifying")
    # White-box: one batched native call for every model. DeepSigns and the trigger sets
    # run their inputs through each model, then one native call scores them all.
    nets = [m for _, m in models]
    white = nnmark.verify(key, nets, alpha=alpha)
    deep = nnmark.verify(dkey, nets, alpha=alpha)
    black = nnmark.verify(tkey, nets, alpha=alpha)
    front = nnmark.verify(fkey, nets, alpha=alpha) if fkey is not None else [None] * len(nets)
    fields = ("verified", "matches", "bits", "ber", "p_value", "threshold", "status")
    rows = []
    for (name, model), path, v, d, t, f in zip(models, paths, white, deep, black, front):
        tv, dv = t.to_dict(), d.to_dict()
        row = {"model": name, "path": str(path), "accuracy": accuracy(model, data.x_test, data.y_test),
               **{k: v.to_dict()[k] for k in fields},
               **{f"deepsigns_{k}": dv[k] for k in ("verified", "matches", "bits", "p_value", "threshold")},
               **{f"trigger_{k}": tv[k] for k in ("verified", "matches", "p_value", "threshold")},
               "trigger_n": tv["bits"]}
        if f is not None:
            fv = f.to_dict()
            row.update({f"frontier_{k}": fv[k] for k in ("verified", "matches", "p_value")})
            row["frontier_n"] = fv["bits"]
            row["frontier_held_back"] = fv.get("control_matches")
        rows.append(row)
    result = {
        "key_id": key.key_id, "deepsigns_key_id": dkey.key_id, "trigger_key_id": tkey.key_id,
        "frontier_key_id": fkey.key_id if fkey is not None else None,
        "carrier": CARRIER, "deepsigns_layer": DEEPSIGNS_LAYER, "bits": bits, "triggers": triggers,
        "frontier": frontier, "alpha": alpha, "rows": rows,
        "marked_verified": rows[0]["verified"],
        "marked_deepsigns_verified": rows[0]["deepsigns_verified"],
        "marked_trigger_verified": rows[0]["trigger_verified"],
        "marked_frontier_verified": rows[0].get("frontier_verified"),
        "unmarked_verified": sum(r["verified"] for r in rows[1:]),
        "unmarked_deepsigns_verified": sum(r["deepsigns_verified"] for r in rows[1:]),
        "unmarked_trigger_verified": sum(r["trigger_verified"] for r in rows[1:]),
        "unmarked_frontier_verified": sum(bool(r.get("frontier_verified")) for r in rows[1:]),
        "unmarked_total": len(rows) - 1,
        "accuracy_drop": rows[1]["accuracy"] - rows[0]["accuracy"],
    }
    result["ok"] = bool(result["marked_verified"] and result["marked_deepsigns_verified"]
                        and result["marked_trigger_verified"] and result["marked_frontier_verified"] is not False
                        and not any(result[f"unmarked_{m}verified"] for m in ("", "deepsigns_", "trigger_",
                                                                               "frontier_")))
    if robustness is not False and robustness is not None:
        from .robustness import robustness_report

        grid = DEMO_GRID if robustness is True else full_grid() if robustness == "full" else robustness
        marks = [key, dkey, tkey] + ([fkey] if fkey is not None else [])
        report = robustness_report(marked, marks, train=(data.x_train, data.y_train),
                                   test=(data.x_test, data.y_test), attacks=grid, out_dir=out / "robustness",
                                   alpha=alpha, seed=seed,
                                   progress=lambda done, total, what: step(f"robustness grid {done}/{total}: {what}"))
        result["robustness"] = report.to_dict()
    (out / "demo.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    return result


def jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj
