#!/usr/bin/env python3
"""DeepSigns on digits: power, accuracy cost and false positives, measured.

  marked   --keys (default 3) DeepSigns keys, key j embedded in a DigitsNet trained with
           seed j (nnmark.DeepSigns(key, strength=0.1, centre=0.01), layer classifier.1,
           64 bits over 2 classes, 32 inputs per class; 30 epochs, the last 5 at lr/10, as
           the demo trains); its twin trained with the same seed and batches, no mark.
  nulls    --nulls (default 12) DigitsNets trained independently (seeds 1000 + k, 30
           epochs), without any key; plus the twins. Every null is a null for every key.

Measured: the marked models' clean accuracy against their twins', matches and p-values;
every (key, null model) pair's p-value at alpha 1e-6 and 1e-2 (count verified; the
promise at 1e-6 is 0); each key calibrated on the nulls (nnmark.calibrate: the fitted
beta-binomial's dispersion, 0 for an exactly binomial null); cross-key pairs (marked model
j with key i != j) for information; and, for information, marked model 0 through a small
attack grid (robustness_report: pruning, quantisation, fine-tuning, fine-pruning; the
attacker holds the training split).

  python benchmarks/bench_deepsigns.py [--keys 3] [--nulls 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import nnmark  # noqa: E402
from nnmark.demo import accuracy, load_digits_split, train  # noqa: E402

LAYER = "classifier.1"
EPOCHS, SETTLE = 30, 5
ATTACKS = {"prune_global": [0.3, 0.5, 0.7, 0.9], "quantize": [8, 4, 2], "ftal": [1, 5], "rtal": [1, 5],
           "fine_prune": [0.5, 0.9]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--nulls", type=int, default=12)
    ap.add_argument("--strength", type=float, default=0.1)
    ap.add_argument("--centre", type=float, default=0.01)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    from _common import OtherLoad, cpu_model, git_state

    torch.set_num_threads(1)
    load = OtherLoad()
    t0 = time.perf_counter()
    data = load_digits_split()
    acc = lambda m: accuracy(m, data.x_test, data.y_test)  # noqa: E731
    keys, marked, twins = [], [], []
    rows = []
    for j in range(args.keys):
        key = nnmark.DeepSignsKey.generate(LAYER, data.x_train, data.y_train, bits=64, classes=2)
        m = train(data, j, EPOCHS, wm=nnmark.DeepSigns(key, strength=args.strength, centre=args.centre),
                  settle_epochs=SETTLE)
        tw = train(data, j, EPOCHS, settle_epochs=SETTLE)
        v = nnmark.verify(key, m)
        keys.append(key), marked.append(m), twins.append(tw)
        rows.append({"key": j, "classes": list(key.classes), "acc_marked": acc(m), "acc_twin": acc(tw),
                     "drop_points": 100 * (acc(tw) - acc(m)), "matches": v.matches, "bits": v.bits,
                     "p_value": v.p_value, "verified": v.verified})
        print(f"key {j}: classes {list(key.classes)}, marked {100 * acc(m):.2f}% vs twin {100 * acc(tw):.2f}%, "
              f"{v.matches}/{v.bits} bits, p = {v.p_value:.3g}, verified {v.verified}", flush=True)
    nulls = [train(data, 1000 + k, EPOCHS, settle_epochs=SETTLE) for k in range(args.nulls)]
    null_acc = [acc(m) for m in nulls]
    print(f"{len(nulls)} nulls: accuracy {100 * min(null_acc):.2f}-{100 * max(null_acc):.2f}%", flush=True)
    pairs, cals = [], []
    for j, key in enumerate(keys):
        vs = nnmark.verify(key, nulls + twins)
        pairs += [{"key": j, "model": f"null {k}" if k < len(nulls) else f"twin {k - len(nulls)}",
                   "matches": v.matches, "p_value": v.p_value} for k, v in enumerate(vs)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cal = nnmark.calibrate(key, nulls)
        cals.append({"key": j, "mean_rate": cal.null_rate, "max_rate": cal.max_rate, "dispersion": cal.dispersion,
                     "a": cal.a, "b": cal.b, "nominal_threshold": cal.nominal_threshold,
                     "false_positives_nominal": cal.false_positives})
    cross = [{"key": i, "model": j, "p_value": nnmark.verify(keys[i], marked[j]).p_value}
             for i in range(len(keys)) for j in range(len(keys)) if i != j]
    rep = nnmark.robustness_report(marked[0], [keys[0]], train=(data.x_train, data.y_train),
                                   test=(data.x_test, data.y_test), attacks=ATTACKS, progress=False)
    attacked = [{"attack": r["attack"], "strength": r["strength"], "accuracy": r["accuracy"],
                 **{k: r["marks"][keys[0].key_id][k] for k in ("verified", "matches", "p_value")}}
                for r in rep.rows if not r.get("error")]
    for r in attacked:
        print(f"{r['attack']:>13} {r['strength']!s:>5}: accuracy {100 * r['accuracy']:.2f}%, {r['matches']}/64 bits, "
              f"p = {r['p_value']:.3g}, verified {r['verified']}")
    ps = [p["p_value"] for p in pairs]
    summary = {
        "null_pairs": len(pairs), "verified_at_1e-6": sum(p <= 1e-6 for p in ps),
        "verified_at_1e-2": sum(p <= 1e-2 for p in ps), "min_null_p": min(ps),
        "null_models": len(nulls) + len(twins), "marked_verified": sum(r["verified"] for r in rows),
        "max_drop_points": max(r["drop_points"] for r in rows),
        "mean_drop_points": sum(r["drop_points"] for r in rows) / len(rows),
        "cross_key_verified_at_1e-6": sum(c["p_value"] <= 1e-6 for c in cross),
    }
    wall = time.perf_counter() - t0
    print(json.dumps(summary, indent=1))
    for c in cals:
        print(f"key {c['key']}: null match rate {c['mean_rate']:.3f} (max {c['max_rate']:.3f}), dispersion "
              f"{c['dispersion']:.3g}, nominal threshold reached by {c['false_positives_nominal']} nulls")
    if args.json:
        out = {"bench": "bench_deepsigns", "args": vars(args), "summary": summary, "marked": rows,
               "null_accuracy": null_acc, "pairs": pairs, "calibrations": cals, "cross_key": cross,
               "attacks_on_marked_0": attacked,
               "wall_s": wall, "other_load_cores": load.cores(wall), "cpu": cpu_model(),
               "git": git_state(Path(__file__).resolve().parent.parent)}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if summary["verified_at_1e-6"] == 0 and summary["marked_verified"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
