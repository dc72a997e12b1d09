#!/usr/bin/env python3
"""Do trigger sets take? Abstract-trigger hits and clean accuracy of digits models marked
with nnmark's defaults, against unmarked twins.

For each seed s: a fresh abstract key of 100 triggers (10 classes), the digits split of
``nnmark.demo.load_digits_split(0)`` (1347 training, 450 test images) and these models,
each trained by ``nnmark.demo.train`` (DigitsNet, batches of 64, Adam at 3e-3) on one of
two schedules: the demo's (``nnmark demo``: 30 epochs, the last 5 at lr / 10) or
demo.train's bare defaults (12 epochs, no low-lr tail):

  old default       demo schedule, TriggerMixer(key, per_batch=2) (the default before:
                    Adi et al.'s 2 per 100)
  mixer default     demo schedule, TriggerMixer(key): one trigger for every 3 clean
                    samples (22 to a batch of 64)
  mixer, 12 ep      demo.train's defaults, TriggerMixer(key)
  embed default     the unmarked twin of the demo schedule, fine-tuned by
                    nnmark.embed_triggers(model, key, x_train, y_train) at its defaults

Each marked model is compared with its unmarked twin: same seed, same schedule, same clean
batches, no mixer (for "embed default": the model before fine-tuning). Reported per model: hits of
the 100 triggers, clean test accuracy of the marked model and of its twin, the difference
in points (marked - twin), seconds of training. Then per setting: the fewest and mean hits,
the mean and worst accuracy difference. PASS: "mixer default" and "embed default" reach
>= 95 of 100 with every seed, and their mean difference is within 1 point ("mixer, 12 ep"
is shown, not judged: 12 epochs without a low-lr tail leave a few models at 92-94).

Usage:
  python benchmarks/bench_trigger_embed.py                 # 5 seeds, ~2 min on one core
  python benchmarks/bench_trigger_embed.py --seeds 10 --json benchmarks/results/bench_trigger_embed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, run_meta  # noqa: E402

SETTINGS = ("old default", "mixer default", "mixer, 12 ep", "embed default")
JUDGED = ("mixer default", "embed default")
DEMO = {"epochs": 30, "settle_epochs": 5}  # nnmark demo's schedule (run_demo: epochs // 6 at lr / 10)


def hits(model, key) -> int:
    x, y = key.triggers()
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def run(seeds: int) -> list[dict]:
    import nnmark
    from nnmark import demo

    data = demo.load_digits_split(0)
    acc = lambda m: demo.accuracy(m, data.x_test, data.y_test)  # noqa: E731
    rows = []
    for s in range(seeds):
        key = nnmark.TriggerKey(bytes([s + 1]) * 32, "abstract", n=100, num_classes=10, input_shape=(1, 8, 8))
        twin = demo.train(data, s, **DEMO)
        twin12 = demo.train(data, s)
        for setting in SETTINGS:
            t0 = time.perf_counter()
            if setting == "old default":
                model, base = demo.train(data, s, mixer=nnmark.TriggerMixer(key, per_batch=2), **DEMO), twin
            elif setting == "mixer default":
                model, base = demo.train(data, s, mixer=nnmark.TriggerMixer(key), **DEMO), twin
            elif setting == "mixer, 12 ep":
                model, base = demo.train(data, s, mixer=nnmark.TriggerMixer(key)), twin12
            else:
                base = twin
                model = nnmark.embed_triggers(copy.deepcopy(base), key, data.x_train, data.y_train, seed=s)
            seconds = time.perf_counter() - t0
            a, b = acc(model), acc(base)
            rows.append({"setting": setting, "seed": s, "hits": hits(model, key), "acc_marked": a, "acc_twin": b,
                         "diff_points": 100 * (a - b), "seconds": seconds})
            print(f"  seed {s}  {setting:<14} hits {rows[-1]['hits']:>3}  acc {100 * a:.2f} vs {100 * b:.2f}",
                  file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for setting in SETTINGS:
        r = [x for x in rows if x["setting"] == setting]
        out.append({"setting": setting, "min_hits": min(x["hits"] for x in r),
                    "mean_hits": statistics.mean(x["hits"] for x in r),
                    "mean_diff_points": statistics.mean(x["diff_points"] for x in r),
                    "worst_diff_points": min(x["diff_points"] for x in r),
                    "mean_acc_marked": 100 * statistics.mean(x["acc_marked"] for x in r),
                    "mean_acc_twin": 100 * statistics.mean(x["acc_twin"] for x in r),
                    "mean_seconds": statistics.mean(x["seconds"] for x in r)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a tiny CNN)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and summary here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load, t0 = OtherLoad(), time.perf_counter()
    rows = run(args.seeds)
    wall = time.perf_counter() - t0
    summ = summary(rows)
    print(f"\nDigits CNN, 100 abstract triggers, {args.seeds} seeds, demo.train (batches of 64), "
          f"{args.threads} torch thread(s), {wall:.0f} s (other load {load.cores(wall)} cores)\n")
    print(f"| {'setting':<14} | seed | hits/100 | acc marked | acc twin | diff (points) | s |")
    print(f"|{'-' * 16}|------|----------|------------|----------|---------------|---|")
    for r in rows:
        print(f"| {r['setting']:<14} | {r['seed']:>4} | {r['hits']:>8} | {100 * r['acc_marked']:>10.2f} | "
              f"{100 * r['acc_twin']:>8.2f} | {r['diff_points']:>+13.2f} | {r['seconds']:.1f} |")
    print(f"\n| {'setting':<14} | fewest hits | mean hits | mean acc marked | mean acc twin | mean diff | worst diff |")
    print(f"|{'-' * 16}|-------------|-----------|-----------------|---------------|-----------|------------|")
    for r in summ:
        print(f"| {r['setting']:<14} | {r['min_hits']:>11} | {r['mean_hits']:>9.1f} | {r['mean_acc_marked']:>15.2f} | "
              f"{r['mean_acc_twin']:>13.2f} | {r['mean_diff_points']:>+9.2f} | {r['worst_diff_points']:>+10.2f} |")
    ok = all(r["min_hits"] >= 95 and r["mean_diff_points"] >= -1.0 for r in summ if r["setting"] in JUDGED)
    print(f"\n{'PASS' if ok else 'FAIL'}: {' and '.join(JUDGED)}: >= 95 of 100 hits with every seed, mean "
          f"accuracy within 1 point of the twin")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": run_meta("cpu"), "seeds": args.seeds, "wall_s": wall, "rows": rows,
                                         "summary": summ}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
