#!/usr/bin/env python3
"""Model extraction and evasion against every mark: which budget removes which mark.

Issue 15, items 4 and 5. One digits model (nnmark.demo's DigitsNet, 30 epochs, the
last fifth at lr/10) per mark, each carrying that mark only:

  whitebox   Uchida et al.'s regularizer, 64 bits in features.2.weight (filter_mean),
             strength 0.01 (the demo's white-box path)
  abstract   100 keyed procedural images with keyed labels (Adi et al.)
  content    100 test-split digits stamped with the key's pattern, target 0
             (their own class left out through sample_labels)
  noise      the same with keyed Gaussian noise (std 0.25 of the range)
  unrelated  200 out-of-distribution images (8x8 patches of scikit-learn's two bundled
             photographs, as bench_fpr makes them) -> 100 triggers + 100 held-back
             controls, target 0

Trigger sets are trained in with TriggerMixer(key, per_batch=16) (bench_fpr's setting).
Then, per marked model:

  extraction  nnmark.attacks.distill(model, train inputs, budget=B, output=labels|probs):
              a re-initialised DigitsNet trained on the victim's answers for B of the
              1347 training inputs (default B in 100, 300, 1000, 1347 = all); the student's
              clean accuracy on the 450 test digits, its agreement with the victim on the
              queries, and the mark's verdict (nnmark.verify at alpha) on the student.
              "stops at" is the smallest budget at which the mark no longer verifies.
  evasion     nnmark.attacks.evasion_filter(model, train inputs, false_alarm=F) for each
              detector score (knn: deep nearest neighbours on the penultimate features,
              msp: max softmax, energy): the fraction of held-out clean digits it flags,
              how many triggers it still answers, and the mark's verdict through the guard.

Usage:
  python benchmarks/bench_extraction.py                    # ~3 min on 2 cores
  python benchmarks/bench_extraction.py --quick            # smoke run (~40 s)
  python benchmarks/bench_extraction.py --json benchmarks/results/bench_extraction.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, run_meta  # noqa: E402
from bench_fpr import ood_patches  # noqa: E402

MARKS = ("whitebox", "abstract", "content", "noise", "unrelated")
CARRIER, CARRIER_SHAPE = "features.2.weight", (32, 16, 3, 3)
OUTPUTS = ("labels", "probs")
SCORES = ("knn", "msp", "energy")


def make_key(kind: str, data):
    import nnmark

    if kind == "whitebox":
        return nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, reduction="filter_mean", shape=CARRIER_SHAPE)
    common = dict(num_classes=10, input_shape=(1, 8, 8))
    if kind == "abstract":
        return nnmark.TriggerKey.generate(kind="abstract", n=100, **common)
    if kind in ("content", "noise"):
        return nnmark.TriggerKey.generate(kind=kind, n=100, samples=data.x_test, sample_labels=data.y_test, target=0,
                                          **common)
    if kind == "unrelated":
        return nnmark.TriggerKey.generate(kind="unrelated", samples=ood_patches(seed=7_000), target=0, **common)
    raise ValueError(kind)


def marked_model(kind: str, key, data, seed: int, epochs: int):
    import nnmark
    from nnmark.demo import train

    settle = max(1, epochs // 5)
    if kind == "whitebox":
        return train(data, seed, epochs, wm=nnmark.Uchida(key, strength=0.01), settle_epochs=settle)
    return train(data, seed, epochs, mixer=nnmark.TriggerMixer(key, per_batch=16), settle_epochs=settle)


def verdict(key, model, alpha: float) -> dict:
    import nnmark

    v = nnmark.verify(key, model, alpha=alpha)
    return {"verified": bool(v.verified), "p_value": v.p_value, "matches": int(v.matches), "n": int(v.bits),
            "status": v.status}


def fmt_v(v: dict) -> str:
    if v["status"] != "ok":
        return v["status"]
    return f"{'yes' if v['verified'] else 'no'} {v['p_value']:.1e} ({v['matches']}/{v['n']})"


def stops_at(rows: list[dict]) -> dict:
    """The smallest budget at which the mark no longer verifies (rows ascending), and the
    student's accuracy there; None when it verifies at every budget tried."""
    for r in rows:
        if not r["mark"]["verified"]:
            return {"budget": r["budget"], "student_accuracy": r["accuracy"], "queries": r["queries"]}
    return {"budget": None, "student_accuracy": None, "queries": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=None, help="query budgets (default 100 300 1000 all)")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of the marked models")
    ap.add_argument("--false-alarm", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--marks", nargs="+", default=list(MARKS), choices=MARKS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 marks, 8 epochs, budgets 100 and all")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()

    import nnmark
    from nnmark.attacks import distill, evasion_filter
    from nnmark.demo import accuracy, load_digits_split

    torch.set_num_threads(1)  # a small model: one torch thread (see nnmark._threads)
    load = OtherLoad()
    t_start = time.perf_counter()
    data = load_digits_split(args.seed)
    full = len(data.x_train)
    marks = ["whitebox", "abstract"] if args.quick else args.marks
    epochs = 8 if args.quick else args.epochs
    budgets = sorted(set(args.budgets or ([100, full] if args.quick else [100, 300, 1000, full])))
    results: dict = {"meta": run_meta("cpu"), "alpha": args.alpha, "false_alarm": args.false_alarm,
                     "budgets": budgets, "epochs": epochs, "train_inputs": full, "test_inputs": len(data.x_test),
                     "marks": {}}

    for kind in marks:
        t0 = time.perf_counter()
        key = make_key(kind, data)
        victim = marked_model(kind, key, data, args.seed, epochs)
        res = {"key_id": key.key_id, "victim": {"accuracy": accuracy(victim, data.x_test, data.y_test),
                                                "mark": verdict(key, victim, args.alpha)},
               "train_seconds": time.perf_counter() - t0, "extraction": {}, "evasion": {}}
        print(f"\n== {kind}: victim accuracy {res['victim']['accuracy']:.3f}, mark {fmt_v(res['victim']['mark'])} "
              f"(trained in {res['train_seconds']:.1f} s)", flush=True)
        for output in OUTPUTS:
            rows = []
            for b in budgets:
                rec = distill(victim, data.x_train, budget=b, output=output, seed=args.seed)
                rows.append({"budget": b, "queries": rec.queries, "epochs": rec.epochs, "steps": rec.steps,
                             "agreement": rec.agreement, "accuracy": accuracy(rec.model, data.x_test, data.y_test),
                             "mark": verdict(key, rec.model, args.alpha), "seconds": rec.seconds})
            res["extraction"][output] = {"rows": rows, "stops_at": stops_at(rows)}
        for score in SCORES:
            guard = evasion_filter(victim, data.x_train, false_alarm=args.false_alarm, score=score, seed=args.seed)
            row = {"held_out_flagged": float(guard.flags(data.x_test).float().mean()),
                   "clean_flagged": guard.clean_flagged, "threshold": guard.threshold,
                   "accuracy": accuracy_answered(guard, data)}
            if isinstance(key, nnmark.TriggerKey):
                row["answered"] = guard.answered(key.triggers()[0])
                row["n"] = key.n
            row["mark"] = verdict(key, guard, args.alpha)
            res["evasion"][score] = row
        results["marks"][kind] = res
        print_mark(kind, res)

    print_summary(results)
    results["meta"]["wall_seconds"] = time.perf_counter() - t_start
    results["meta"]["other_load_cores"] = load.cores(results["meta"]["wall_seconds"])
    meta = results["meta"]
    print(f"\nwall time {meta['wall_seconds']:.0f} s; other load {meta['other_load_cores']} cores")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")


@torch.no_grad()
def accuracy_answered(guard, data) -> float:
    """Clean accuracy through the guard: a refused (NaN) answer is a wrong one."""
    out = guard(data.x_test)
    guard.reset_counts()
    return float(((out.argmax(1) == data.y_test) & ~out.isnan().any(1)).float().mean())


def print_mark(kind: str, res: dict) -> None:
    for output, ext in res["extraction"].items():
        print(f"\n{kind}, distillation on {output}:")
        print("| budget | queries | epochs | agreement | student acc | mark on the student |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in ext["rows"]:
            print(f"| {r['budget']} | {r['queries']} | {r['epochs']} | {r['agreement']:.3f} | {r['accuracy']:.3f} | "
                  f"{fmt_v(r['mark'])} |")
    print(f"\n{kind}, evasion (refusals):")
    print("| score | held-out flagged | triggers answered | acc. through the guard | mark through the guard |")
    print("|---|---:|---:|---:|---|")
    for score, r in res["evasion"].items():
        ans = f"{r['answered']}/{r['n']}" if "answered" in r else "—"
        print(f"| {score} | {r['held_out_flagged']:.3f} | {ans} | {r['accuracy']:.3f} | {fmt_v(r['mark'])} |")


def print_summary(results: dict) -> None:
    print(f"\nSummary (alpha {results['alpha']:g}): the smallest budget at which each mark stops verifying "
          "(student accuracy there; '≤ B': already at the smallest budget tried)")
    print("| mark | victim acc | labels: stops at | probs: stops at | evasion (knn) answers / verdict |")
    print("|---|---:|---|---|---|")
    for kind, res in results["marks"].items():
        cells = []
        for output in OUTPUTS:
            s = res["extraction"][output]["stops_at"]
            first = results["budgets"][0]
            cells.append(f"verifies up to {results['budgets'][-1]}" if s["budget"] is None
                         else f"{'≤ ' if s['budget'] == first else ''}{s['budget']} ({s['student_accuracy']:.3f})")
        ev = res["evasion"]["knn"]
        ans = f"{ev['answered']}/{ev['n']}, " if "answered" in ev else ""
        cells.append(f"{ans}{'verifies' if ev['mark']['verified'] else 'does not verify'}")
        print(f"| {kind} | {res['victim']['accuracy']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
