#!/usr/bin/env python3
"""Does the binomial null hold for entangled-watermark keys once their stamps are screened? (issue 15)

An entangled key (``nnmark.entangled_key``) is a ``content`` trigger key: source-class
samples with a keyed stamp, labelled with a target class. A stamp can be a natural
trigger (a stroke that closes a 5 into a 9), and then models that never saw the key
answer the target on the stamped samples: before screening, 1 of 80 digits keys made 3 of
10 unmarked models verify. ``entangled_key`` now screens each stamp with a stand-in model
of the task and draws another when that model answers the target on more than
``natural_rate`` (2 %) of the triggers. This measures, on scikit-learn's digits:

- ``--keys`` fresh stamps (random secrets; source -> target pairs drawn from ``--seed``),
  each checked with ``nnmark.verify`` at alpha 1e-6 on ``--suspects`` independently
  trained unmarked DigitsNets (seeds ``--suspect-seed``+, default 1000+, 30 epochs, last 6 at lr/10);
- for each stamp, what each screen says: the pixel probe ``entangled_key`` uses without
  ``reference=`` (ridge regression on the samples), ``reference=`` one unmarked DigitsNet
  trained apart from the suspects (``--reference-seed``, default 2000), and the check ``embed_entangled`` makes
  with the model it is about to mark after its clean warm-up (stood in for by a DigitsNet
  trained 5 clean epochs, the default warm-up of 30 epochs, reference seed + 1000);
- so, per arm (no screen, each screen, and the user's two paths: ``entangled_key`` then
  ``embed_entangled``, with or without ``reference=``): the stamps the screens keep
  (``entangled_key`` draws stamps until one passes, so the keys it returns are exactly the
  kept stamps), how many of them made at least one suspect verify, and the share of
  (key, suspect) pairs verified, against alpha;
- ``--public K``: K keys made the way a user makes them (``entangled_key`` with its
  defaults, and with ``reference=``), checked on the suspects the same way.

Usage: python benchmarks/bench_entangled_null.py [--keys 4000] [--suspects 10] [--public 200] [--json out.json]
About 20 s per 100 keys on one thread, plus ~30 s of training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, cpu_model, git_state  # noqa: E402

import nnmark  # noqa: E402
from nnmark.demo import load_digits_split, train  # noqa: E402
from nnmark.entangled import NATURAL_RATE, _natural_rate, _pixel_probe, entangled_key  # noqa: E402
from nnmark.triggers import TriggerKey  # noqa: E402

HERE = Path(__file__).resolve().parent
ALPHA = 1e-6


def _pair(rng) -> tuple[int, int]:
    src = int(rng.integers(10))
    return src, int(rng.choice([c for c in range(10) if c != src]))


def _stamp(data, src: int, tgt: int) -> TriggerKey:
    """An unscreened key, made as entangled_key makes each candidate."""
    pick = data.y_train == src
    return TriggerKey.generate(kind="content", n=100, samples=data.x_train[pick], target=tgt,
                               sample_labels=data.y_train[pick])


def _arm(rows: list[dict], keep) -> dict:
    kept = [r for r in rows if keep(r)]
    pairs = sum(r["suspects"] for r in kept)
    fp = sum(r["verified"] for r in kept)
    return {"kept": len(kept), "of": len(rows), "keys_with_a_false_positive": sum(r["verified"] > 0 for r in kept),
            "false_positive_pairs": fp, "pairs": pairs, "pair_rate": fp / pairs if pairs else None,
            "max_suspect_hits": max((r["max_hits"] for r in kept), default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=4000, help="fresh stamps, each judged by every screen")
    ap.add_argument("--suspects", type=int, default=10, help="independently trained unmarked models")
    ap.add_argument("--public", type=int, default=200, help="keys made by entangled_key itself, per screen")
    ap.add_argument("--seed", type=int, default=0, help="draws the source -> target pairs")
    ap.add_argument("--suspect-seed", type=int, default=1000, help="the suspects' seeds: this and the next ones")
    ap.add_argument("--reference-seed", type=int, default=2000, help="seed of the reference model (warm-up: + 1000)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, load = time.perf_counter(), OtherLoad()
    data = load_digits_split(0)
    suspects = [train(data, args.suspect_seed + j, 30, settle_epochs=6) for j in range(args.suspects)]
    reference = train(data, args.reference_seed, 30, settle_epochs=6)
    warm = train(data, args.reference_seed + 1000, 5)
    print(f"trained {args.suspects} suspects, 1 reference and 1 warm-up model in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    probe = None
    rows = []
    for k in range(args.keys):
        src, tgt = _pair(rng)
        key = _stamp(data, src, tgt)
        if probe is None:  # the probe depends on the samples only, not on the stamp
            probe = _pixel_probe(key, data.x_train, data.y_train)
        v = nnmark.verify(key, suspects, alpha=ALPHA)
        rows.append({"key": k, "source": src, "target": tgt, "suspects": len(v),
                     "verified": sum(r.verified for r in v), "max_hits": max(r.matches for r in v),
                     "probe_rate": _natural_rate(key, [probe]), "reference_rate": _natural_rate(key, [reference]),
                     "warm_rate": _natural_rate(key, [warm])})
        r = rows[-1]
        if r["verified"] or (k + 1) % 500 == 0:
            print(f"key {k}: {src}->{tgt} suspects verified {r['verified']}, max hits {r['max_hits']}, "
                  f"probe {r['probe_rate']:.2f}, reference {r['reference_rate']:.2f}, warm {r['warm_rate']:.2f}", flush=True)
    arms = {"none": _arm(rows, lambda r: True),
            "probe": _arm(rows, lambda r: r["probe_rate"] <= NATURAL_RATE),
            "reference": _arm(rows, lambda r: r["reference_rate"] <= NATURAL_RATE),
            "warm-up": _arm(rows, lambda r: r["warm_rate"] <= NATURAL_RATE),
            "probe+warm-up (defaults)": _arm(rows, lambda r: max(r["probe_rate"], r["warm_rate"]) <= NATURAL_RATE),
            "reference+warm-up": _arm(rows, lambda r: max(r["reference_rate"], r["warm_rate"]) <= NATURAL_RATE)}
    print(f"\n{'screen':26s} {'kept':>11s} {'keys with a FP':>15s} {'FP pairs':>12s} {'max hits':>8s}")
    for name, a in arms.items():
        print(f"{name:26s} {a['kept']:5d}/{a['of']:<5d} {a['keys_with_a_false_positive']:15d} "
              f"{a['false_positive_pairs']:5d}/{a['pairs']:<6d} {a['max_suspect_hits']:8d}")

    public = {}
    for name, ref in (("entangled_key", None), ("entangled_key(reference=)", reference)):
        got = []
        for k in range(args.public):
            src, tgt = _pair(rng)
            try:
                key = entangled_key(data.x_train, data.y_train, source=src, target=tgt, n=100, reference=ref)
            except ValueError as exc:  # every stamp drawn failed the screen
                got.append({"source": src, "target": tgt, "error": str(exc)})
                continue
            v = nnmark.verify(key, suspects, alpha=ALPHA)
            got.append({"source": src, "target": tgt, "verified": sum(r.verified for r in v),
                        "max_hits": max(r.matches for r in v)})
        ok = [g for g in got if "error" not in g]
        public[name] = {"keys": len(got), "refused": len(got) - len(ok),
                        "keys_with_a_false_positive": sum(g["verified"] > 0 for g in ok),
                        "false_positive_pairs": sum(g["verified"] for g in ok), "pairs": len(ok) * args.suspects,
                        "max_suspect_hits": max((g["max_hits"] for g in ok), default=None)}
        p = public[name]
        print(f"{name}: {p['keys']} keys ({p['refused']} refused), {p['keys_with_a_false_positive']} with a false "
              f"positive, {p['false_positive_pairs']}/{p['pairs']} pairs, max suspect hits {p['max_suspect_hits']}",
              flush=True)
    wall = time.perf_counter() - t0
    print(f"wall {wall:.0f} s, other load {load.cores(wall)} cores")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "bench_entangled_null", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "git": git_state(HERE.parent), "wall_s": wall, "other_load_cores": load.cores(wall),
            "alpha": ALPHA, "natural_rate": NATURAL_RATE, "args": vars(args), "arms": arms, "public": public,
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
