#!/usr/bin/env python3
"""Which trigger scheme survives model extraction: exponential weighting or entangled watermarks.

On scikit-learn's digits (nnmark.demo: DigitsNet, load_digits_split, train), two victims:

  EW   exponential weighting (Namba & Sakuma 2019): a clean model is trained, then every
       conv / linear weight w is used in the forward pass as w * exp(T|w|) / max exp(T|w|)
       (per layer, T = 2) while the model trains on the clean data plus the key set: 100
       training samples with keyed wrong labels (taken out of the clean set). The released
       model carries the transformed weights (an ordinary DigitsNet).
  EWE  entangled watermarks (Jia et al. 2021), as shipped: nnmark.embed_entangled on a key
       from nnmark.entangled_key (an nnmark content TriggerKey: 100 samples of a source
       class with a keyed 2x2 pattern stamped, labelled as a target class). Trained from
       scratch; after a clean warm-up every batch adds stamped source samples and target
       samples, cross-entropy minus ``strength`` x the soft nearest neighbour loss (SNNL)
       of their hidden representations, so the triggers share the target class's features.
       Several keys (the stamp's place matters) and strengths.

Then a minimal local model-extraction attack: the attacker holds unlabeled digits (the
training inputs, less the EW key samples, which are the owner's secret), queries the
victim on ``budget`` of them, for its top-1 labels (``labels``) or its softmax (``probs``,
a soft cross-entropy target), and trains a fresh DigitsNet from scratch on the answers
(about 640 Adam steps whatever the budget). Budgets 300, 1000 and all. One more EW
student at budget all is given the key samples too ("labels+keys").

Nulls, measured rather than assumed (EWE's triggers are real samples with a stamp, EW's
are real samples): >= 10 independently trained unmarked models, and the students
extracted from the unmarked twin at each budget. Reported: trigger hits of 100, the
verdict at alpha 1e-6 (EWE: nnmark.verify of the content key, i.e. the binomial at 1/10
and its control tests; EW: the exact binomial at 1/10), clean accuracy.

Usage: python benchmarks/bench_extraction_schemes.py [--nulls 10] [--keys 3] [--strengths 0.5,2]
       [--budgets 300,1000,all] [--outputs labels,probs] [--json out.json]
About 4 minutes on 2 shared cores (one torch thread); results in
benchmarks/results/bench_extraction_schemes.json and benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, cpu_model, git_state  # noqa: E402

import nnmark  # noqa: E402
from nnmark.demo import Digits, DigitsNet, accuracy, load_digits_split, train  # noqa: E402
from nnmark.entangled import embed_entangled, entangled_key  # noqa: E402

HERE = Path(__file__).resolve().parent
ALPHA = 1e-6
N_KEYS = 100
EPOCHS, SETTLE = 30, 5  # every clean model: the demo's schedule
STUDENT_STEPS = 640
SOURCE, TARGET = 3, 5  # EWE's source and target classes (Jia et al.'s MNIST defaults)


# ------------------------------------------------------------------ exponential weighting

class ExpWeight(nn.Module):
    """The forward-pass weight of Namba & Sakuma: w * exp(T|w|) / max(exp(T|w|)) per layer."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, w):
        e = torch.exp(self.t * w.abs())
        return w * e / e.max()


def embed_ew(data: Digits, seed: int, key_idx: np.ndarray, key_y: torch.Tensor, t: float = 2.0,
             epochs: int = 30, per_batch: int = 16, lr: float = 3e-3, settle: int = 6) -> nn.Module:
    keep = np.setdiff1d(np.arange(len(data.x_train)), key_idx)
    clean = Digits(data.x_train[keep], data.y_train[keep], data.x_test, data.y_test)
    model = train(clean, seed, EPOCHS, settle_epochs=SETTLE)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        parametrize.register_parametrization(m, "weight", ExpWeight(t))
    kx = data.x_train[key_idx]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 7)
    n = len(clean.x_train)
    model.train()
    cursor = 0
    for epoch in range(epochs):
        if epoch == epochs - settle:
            for group in opt.param_groups:
                group["lr"] = lr / 10
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = order[i:i + 64]
            k = torch.arange(cursor, cursor + per_batch) % len(kx)
            cursor += per_batch
            xb = torch.cat([clean.x_train[idx], kx[k]])
            yb = torch.cat([clean.y_train[idx], key_y[k]])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for m in layers:  # release the transformed weights: an ordinary DigitsNet
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    model.eval()
    return model


# ------------------------------------------------------------------------------ extraction

@torch.no_grad()
def extract(victim: nn.Module, pool: torch.Tensor, budget: int, data: Digits, seed: int,
            output: str = "labels") -> nn.Module:
    """Labels ``budget`` pool inputs with the victim's top-1 answers (``output="probs"``: its
    softmax, a soft cross-entropy target); trains a fresh DigitsNet on them."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=g)[:budget]
    xq = pool[pick]
    yq = victim(xq).argmax(1) if output == "labels" else victim(xq).softmax(1)
    epochs = max(6, math.ceil(STUDENT_STEPS / math.ceil(budget / 64)))
    with torch.enable_grad():
        return train(Digits(xq, yq, data.x_test, data.y_test), seed, epochs, settle_epochs=max(1, epochs // 6))


# ---------------------------------------------------------------------------------- verdicts

@torch.no_grad()
def ew_hits(model, kx, ky) -> int:
    return int((model(kx).argmax(1) == ky).sum())


def ew_verdict(hits: int) -> tuple[float, bool]:
    p = nnmark.binomial_p_value(hits, N_KEYS, 0.1)
    return p, p <= ALPHA


def ewe_verdicts(tkey, models) -> list:
    return nnmark.verify(tkey, list(models), alpha=ALPHA)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nulls", type=int, default=10, help="independently trained unmarked models (>= 10)")
    ap.add_argument("--keys", type=int, default=3, help="EWE keys (stamps) per strength: the stamp matters")
    ap.add_argument("--strengths", default="0.25,2", help="EWE strengths (SNNL weight; 0.25 is the default)")
    ap.add_argument("--budgets", default="300,1000,all")
    ap.add_argument("--outputs", default="labels,probs", help="what the attacker gets: top-1 labels, probabilities")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(HERE / "results" / "bench_extraction_schemes.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # DigitsNet is tiny: one thread beats two on a busy machine (nnmark._threads)
    t0, load = time.perf_counter(), OtherLoad()
    data = load_digits_split(args.seed)
    acc = lambda m: accuracy(m, data.x_test, data.y_test)  # noqa: E731
    outputs = args.outputs.split(",")
    strengths = [float(s) for s in args.strengths.split(",")]

    def say(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    say(f"unmarked twin and {args.nulls} independent unmarked models")
    twin = train(data, args.seed, EPOCHS, settle_epochs=SETTLE)
    nulls = [train(data, args.seed + 1000 + k, EPOCHS, settle_epochs=SETTLE) for k in range(args.nulls)]

    # EW key: 100 training samples with keyed wrong labels (a fixed rng stands in for the key).
    rng = np.random.default_rng(12345 + args.seed)
    key_idx = np.sort(rng.choice(len(data.x_train), N_KEYS, replace=False))
    kx = data.x_train[key_idx]
    ky = (data.y_train[key_idx] + torch.from_numpy(rng.integers(1, 10, N_KEYS))) % 10
    say("EW victim")
    victims = [{"scheme": "EW", "config": "T=2", "model": embed_ew(data, args.seed, key_idx, ky), "key": None}]
    for k in range(args.keys):
        for attempt in range(20):  # as a user would: a stamp embed_entangled's warm-up check refuses gets a new key
            tkey = entangled_key(data.x_train, data.y_train, source=SOURCE, target=TARGET, n=N_KEYS)
            made = []
            try:
                for s in strengths:  # the warm-up (and its check) is the same at every strength
                    say(f"EWE victim, key {k}, strength {s:g}")
                    torch.manual_seed(args.seed)
                    made.append((s, embed_entangled(DigitsNet(), tkey, data.x_train, data.y_train, strength=s,
                                                    seed=args.seed)))
                break
            except ValueError as exc:
                if "natural trigger" not in str(exc) or attempt == 19:
                    raise
        for s, m in made:
            victims.append({"scheme": "EWE", "config": f"key {k} strength {s:g}", "model": m, "key": tkey})

    pool_all = data.x_train
    pool_ew = data.x_train[np.setdiff1d(np.arange(len(data.x_train)), key_idx)]  # the key samples are secret
    students: dict = {}  # (victim index or "twin", budget, output, pool) -> model
    for b in args.budgets.split(","):
        say(f"extraction, budget {b}")
        for out in outputs:
            for i, v in enumerate(victims):
                pool = pool_ew if v["scheme"] == "EW" else pool_all
                n = len(pool) if b == "all" else min(int(b), len(pool))
                students[(i, b, out, "")] = extract(v["model"], pool, n, data, args.seed + 50, out)
            students[("twin", b, out, "")] = extract(twin, pool_all, len(pool_all) if b == "all" else int(b), data,
                                                     args.seed + 50, out)
        if b == "all":  # the attacker also holds the EW key samples (unmarked inputs of the task)
            students[(0, b, "labels", "+keys")] = extract(victims[0]["model"], pool_all, len(pool_all), data,
                                                          args.seed + 50)

    def score(v, models):
        if v["scheme"] == "EW":
            out = []
            for m in models:
                h = ew_hits(m, kx, ky)
                p, ok = ew_verdict(h)
                out.append({"hits": h, "control_matches": None, "p_value": p, "verified": ok})
            return out
        return [{"hits": r.matches, "control_matches": r.to_dict().get("control_matches"), "p_value": r.p_value,
                 "verified": r.verified} for r in ewe_verdicts(v["key"], models)]

    rows, nulls_out = [], []
    unmarked = [("twin", twin)] + [(f"null {k}", m) for k, m in enumerate(nulls)]
    twin_students = [(f"twin student {b} {o}", m) for (who, b, o, _), m in students.items() if who == "twin"]
    for i, v in enumerate(victims):
        mine = [(key, m) for key, m in students.items() if key[0] == i]
        res = score(v, [v["model"]] + [m for _, m in mine] + [m for _, m in unmarked + twin_students])
        va = acc(v["model"])
        rows.append({"scheme": v["scheme"], "config": v["config"], "model": "victim", "budget": None, "output": None,
                     "accuracy": va, **res[0]})
        for (key, m), r in zip(mine, res[1:]):
            rows.append({"scheme": v["scheme"], "config": v["config"], "model": "student", "budget": key[1],
                         "output": key[2] + key[3], "accuracy": acc(m), **r})
        for (name, m), r in zip(unmarked + twin_students, res[1 + len(mine):]):
            nulls_out.append({"scheme": v["scheme"], "config": v["config"], "model": name, "accuracy": acc(m), **r})

    wall = time.perf_counter() - t0
    twin_acc = acc(twin)
    null_accs = [acc(m) for m in nulls]
    print()
    print(f"digits, DigitsNet; twin clean accuracy {twin_acc:.3f} (independent unmarked: {min(null_accs):.3f}-"
          f"{max(null_accs):.3f}); {N_KEYS} triggers per key; alpha {ALPHA:g}; EWE source {SOURCE} -> target {TARGET}")
    print(f"{'scheme':5s} {'config':20s} {'model':8s} {'budget':>6s} {'output':12s} {'acc':>6s} {'hits':>5s} "
          f"{'ctrl':>5s} {'p':>9s}  verified")
    for r in rows:
        c = r["control_matches"]
        print(f"{r['scheme']:5s} {r['config']:20s} {r['model']:8s} {r['budget'] or '':>6s} {r['output'] or '':12s} "
              f"{r['accuracy']:6.3f} {r['hits']:5d} {'-' if c is None else c:>5} {r['p_value']:9.2g}  "
              f"{'yes' if r['verified'] else 'no'}")
    print("\nunmarked models (twin, independent ones, students of the twin) under each key:")
    seen = []
    for r in nulls_out:
        k = (r["scheme"], r["config"])
        if k in seen:
            continue
        seen.append(k)
        mine = [q for q in nulls_out if (q["scheme"], q["config"]) == k]
        ind = [q for q in mine if not q["model"].startswith("twin student")]
        st = [q for q in mine if q["model"].startswith("twin student")]
        print(f"{k[0]:5s} {k[1]:20s} models {len(ind)}: verified {sum(q['verified'] for q in ind)}, hits "
              f"{min(q['hits'] for q in ind)}-{max(q['hits'] for q in ind)} (mean {np.mean([q['hits'] for q in ind]):.1f})"
              f"; twin students {len(st)}: verified {sum(q['verified'] for q in st)}, hits "
              f"{min(q['hits'] for q in st)}-{max(q['hits'] for q in st)}")
    print(f"\nwall {wall:.0f} s, other load {load.cores(wall)} cores")
    out = {"benchmark": "bench_extraction_schemes", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "git": git_state(HERE.parent), "wall_s": wall, "other_load_cores": load.cores(wall),
           "alpha": ALPHA, "n_triggers": N_KEYS, "twin_accuracy": twin_acc, "null_accuracies": null_accs,
           "args": vars(args), "rows": rows, "unmarked": nulls_out}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
