#!/usr/bin/env python3
"""Frontier stitching on digits: does the marked model verify, and what do unmarked models
answer on the frontier triggers?

For each key seed s (default 3): the owner's model, ``nnmark.demo.train(data, s)`` on the
demo's schedule (30 epochs, the last 5 at lr / 10; split ``load_digits_split(0)``: 1347
training, 450 test images); a frontier key made from it at the defaults
(``TriggerKey.generate(kind="frontier", model=owner, samples=x_train, labels=y_train)``:
n = 100 triggers, 100 held-back true adversaries, 100 false adversaries, eps = 0.1); the
marked model, ``nnmark.embed_triggers(copy of owner, key, x_train, y_train)`` at its
defaults. The unmarked twin is the owner's model before marking (marking is fine-tuning).
Then M (default 12) independently trained unmarked models (seeds 1000 + j, same schedule)
are verified with every key.

Reported per key: the marked model's trigger and control matches, its p-value at alpha
1e-6, its clean accuracy and the twin's; per unmarked model: its trigger matches (the
match rate a binomial null would have to assume is 1/num_classes = 0.1), control matches,
the verdict's p-value (Fisher's exact test of triggers against held-back true adversaries,
§6.3 of docs/spec.md) and what a binomial at 0.1 alone would give. PASS: every marked model
verifies at 1e-6 within 1 point of its twin's accuracy, and no unmarked model verifies.

Usage:
  python benchmarks/bench_frontier.py                      # 3 keys, 12 unmarked models: ~2 min on one core
  python benchmarks/bench_frontier.py --keys 5 --nulls 20 --json benchmarks/results/bench_frontier.json
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, run_meta  # noqa: E402

ALPHA = 1e-6
SCHEDULE = {"epochs": 30, "settle_epochs": 5}  # nnmark demo's


def run(keys: int, nulls: int) -> dict:
    import nnmark
    from nnmark import demo
    from nnmark.stats import binomial_p_value

    data = demo.load_digits_split(0)
    acc = lambda m: demo.accuracy(m, data.x_test, data.y_test)  # noqa: E731
    t0 = time.perf_counter()
    unmarked = [demo.train(data, 1000 + j, **SCHEDULE) for j in range(nulls)]
    print(f"  {nulls} unmarked models: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    marked_rows, null_rows = [], []
    for s in range(keys):
        owner = demo.train(data, s, **SCHEDULE)
        secret = hashlib.sha256(b"nnmark:bench-frontier:" + str(s).encode()).digest()
        t0 = time.perf_counter()
        key = nnmark.TriggerKey.generate(kind="frontier", model=owner, samples=data.x_train, labels=data.y_train,
                                         secret=secret)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        marked = nnmark.embed_triggers(copy.deepcopy(owner), key, data.x_train, data.y_train)
        t_embed = time.perf_counter() - t0
        verdicts = nnmark.verify(key, [marked, owner, *unmarked], alpha=ALPHA)
        v = verdicts[0].to_dict()
        marked_rows.append({"key": s, "n": key.n, "controls": key.num_controls, "matches": v["matches"],
                            "control_matches": v["control_matches"], "p_value": v["p_value"],
                            "verified": v["verified"], "acc_marked": acc(marked), "acc_twin": acc(owner),
                            "twin_matches": verdicts[1].matches, "twin_verified": verdicts[1].verified,
                            "gen_s": t_gen, "embed_s": t_embed})
        for j, u in enumerate(verdicts[2:]):
            d = u.to_dict()
            null_rows.append({"key": s, "model": j, "matches": d["matches"], "rate": d["matches"] / key.n,
                              "control_matches": d["control_matches"], "p_value": d["p_value"],
                              "verified": d["verified"], "binomial_p": binomial_p_value(d["matches"], key.n, 0.1)})
        print(f"  key {s}: marked {v['matches']}/{key.n}, p {v['p_value']:.3g}", file=sys.stderr, flush=True)
    return {"marked": marked_rows, "unmarked": null_rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--nulls", type=int, default=12, help="independently trained unmarked models (>= 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a tiny CNN)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load, t0 = OtherLoad(), time.perf_counter()
    res = run(args.keys, args.nulls)
    wall = time.perf_counter() - t0
    print(f"\nFrontier stitching, digits CNN, {args.keys} keys (n = 100 triggers, 100 held back, 100 false, eps 0.1), "
          f"{args.nulls} unmarked models; {wall:.0f} s, {args.threads} torch thread(s), other load "
          f"{load.cores(wall)} cores\n")
    print("| key | marked matches | control matches | p-value | verified | acc marked | acc twin | diff (points) "
          "| twin matches | generate s | embed s |")
    print("|-----|----------------|-----------------|---------|----------|------------|----------|---------------"
          "|--------------|------------|---------|")
    for r in res["marked"]:
        print(f"| {r['key']} | {r['matches']}/{r['n']} | {r['control_matches']}/{r['controls']} | {r['p_value']:.2g} | "
              f"{r['verified']} | {100 * r['acc_marked']:.2f} | {100 * r['acc_twin']:.2f} | "
              f"{100 * (r['acc_marked'] - r['acc_twin']):+.2f} | {r['twin_matches']} | {r['gen_s']:.2f} | "
              f"{r['embed_s']:.1f} |")
    print("\n| key | unmarked match rate min / mean / max | control matches mean | verdict p min | verified "
          "| binomial(0.1) p < 1e-6 |")
    print("|-----|--------------------------------------|----------------------|---------------|----------"
          "|------------------------|")
    for s in range(args.keys):
        rows = [r for r in res["unmarked"] if r["key"] == s]
        rates = [r["rate"] for r in rows]
        print(f"| {s} | {min(rates):.2f} / {statistics.mean(rates):.2f} / {max(rates):.2f} | "
              f"{statistics.mean(r['control_matches'] for r in rows):.1f} | {min(r['p_value'] for r in rows):.2g} | "
              f"{sum(r['verified'] for r in rows)} of {len(rows)} | "
              f"{sum(r['binomial_p'] < ALPHA for r in rows)} of {len(rows)} |")
    ok = (all(r["verified"] and r["acc_marked"] >= r["acc_twin"] - 0.01 for r in res["marked"])
          and not any(r["verified"] for r in res["unmarked"]) and args.nulls >= 10)
    print(f"\n{'PASS' if ok else 'FAIL'}: every marked model verifies at alpha {ALPHA:g} within 1 point of its twin; "
          f"0 of {len(res['unmarked'])} (key, unmarked model) pairs verify")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": run_meta("cpu"), "keys": args.keys, "nulls": args.nulls,
                                         "wall_s": wall, **res}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
