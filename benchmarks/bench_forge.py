#!/usr/bin/env python3
"""Key forging: how many tries, and how much CPU, until a forged key verifies on an unmarked model.

A key whose owner bits are fixed in advance (from a message) and whose secret is random
matches a model it was never embedded in like T fair coins: each try verifies with
probability q = P[Binomial(T, 1/2) >= threshold(T, alpha)], so a forger needs about 1/q
tries (``nnmark.attacks.forge_key``, ``nnmark.stats.forge_tries``). This script measures
that search on a real model and says which alpha to demand.

The model: a ``DigitsNet`` (nnmark.demo) trained without any mark on the bundled digits
(--epochs, default 10; seed 0); carrier ``features.2.weight`` [32, 16, 3, 3], filter_mean:
N = 144.

Measured:

  rate      tries per second of the search at each T (medians of --rate-reps interleaved
            rounds), three ways,
            each try = SHA-256 subkey (hashlib, shared) + projection + match count:
              nnmark        ops.keyed_projection_many_keys: the carrier under a batch of
                            subkeys in one native call (what forge_key runs)
              torch batch   plain torch, Philox vectorised over keys and columns in int64,
                            X [K, T, N] built per 64 keys, then X @ w
              torch loop    plain torch, one key at a time: X [T, N] built, then X @ w
            Both torch ways sum as nnmark does (p = 2 A - S, A the sum of w under the
            set bits) and run at torch's default thread count and at one thread: the
            faster counts. nnmark runs at its default (all cores). The match counts of
            the three on the same secrets must agree exactly (check column).
  forging   forge_key(model, bits=T, alpha, message=...) for T in --Ts and alpha in
            --alphas: repeated (up to --runs, within --cell-seconds) where the expected
            time is under half the cell's budget; tries and CPU seconds measured (each
            run's tries are geometric: their spread is as large as their mean). The
            rest are extrapolated: 1/q tries at the search rate of that T (pooled over
            its forging runs when they took 2 s or more, else the rate measurement). Cells out of reach
            are extrapolated from the exact 1/q and the measured rate (marked so). A cell
            where even T matches cannot reach alpha is "never".

Usage:
  python benchmarks/bench_forge.py                      # ~3 min on 2 cores
  python benchmarks/bench_forge.py --quick --json /tmp/f.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, fmt_time, run_meta  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bench_forge.json"
M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


# ------------------------------------------------------------------ plain torch
def torch_words(torch, i, k0, k1, b: int):
    """Philox4x32-10 words [K, 4, n] (uint32 values in int64) of columns i [n], block b, keys k0, k1 [K, 1].

    32x32-bit products wrap modulo 2^64 in int64, which keeps all 64 bits: hi = (p >> 32) & mask."""
    K, n = k0.shape[0], i.numel()
    c0 = (i & MASK).expand(K, n)
    c1 = (i >> 32).expand(K, n)
    c2 = torch.full((K, n), b, dtype=torch.int64)
    c3 = torch.zeros((K, n), dtype=torch.int64)
    ka, kb = k0, k1
    for _ in range(10):
        p0 = c0 * M0
        p1 = c2 * M1
        c0, c2 = ((p1 >> 32) & MASK) ^ c1 ^ ka, ((p0 >> 32) & MASK) ^ c3 ^ kb
        c1, c3 = p1 & MASK, p0 & MASK
        ka, kb = (ka + W0) & MASK, (kb + W1) & MASK
    return torch.stack((c0, c1, c2, c3), 1)


def torch_projection(torch, w, subkeys, T: int):
    """p [K, T] float64 = X_k . w for subkeys [K, 2] (int64), X_k built in plain torch (spec v1).

    As nnmark sums it: p = 2 A - S, A[t] = sum of w where bit t is set, S = sum of w."""
    N = w.numel()
    i = torch.arange(N, dtype=torch.int64)
    k0, k1 = subkeys[:, :1], subkeys[:, 1:]
    shifts = torch.arange(32, dtype=torch.int64).view(1, 1, 32, 1)
    S = w.sum()
    out = []
    for b in range((T + 127) // 128):
        rows = min(128, T - 128 * b)
        nw = (rows + 31) // 32  # words holding these rows
        words = torch_words(torch, i, k0, k1, b)[:, :nw]  # [K, nw, N]
        bits = ((words.unsqueeze(2) >> shifts) & 1).view(-1, 32 * nw, N)[:, :rows]  # row j: bit j&31 of word j>>5
        out.append(2 * (bits.to(torch.float64) @ w) - S)  # [K, rows]
    return torch.cat(out, 1)


# ------------------------------------------------------------------ measurements
def rate_case(model_vec, T: int, n_keys: int, n_loop: int, carrier: str, seed: int, reps: int) -> dict:
    import numpy as np
    import torch

    from nnmark import ops
    from nnmark._threads import torch_threads
    from nnmark.keys import projection_subkeys

    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, T).astype(bool)
    w64 = model_vec.double()
    res = {"T": T}

    def run(project, n):
        secrets = rng.bytes(32 * n)
        t0, c0 = time.perf_counter(), time.process_time()
        sk = projection_subkeys(secrets, carrier)
        p = project(sk)
        m = np.count_nonzero((p > 0) == target, axis=1)
        return m, time.perf_counter() - t0, time.process_time() - c0, secrets

    batch = 8192

    def nnmark_proj(sk):
        return np.concatenate([ops.keyed_projection_many_keys(model_vec, sk[j:j + batch], T).numpy()
                               for j in range(0, len(sk), batch)])

    def torch_batch(sk):  # 64 keys per batch: the fastest of 16, 64 and 256 here
        skt = torch.from_numpy(sk.astype(np.int64))
        return np.concatenate([torch_projection(torch, w64, skt[j:j + 64], T).numpy()
                               for j in range(0, len(sk), 64)])

    def torch_loop(sk):
        skt = torch.from_numpy(sk.astype(np.int64))
        return np.stack([torch_projection(torch, w64, skt[j:j + 1], T)[0].numpy() for j in range(len(sk))])

    nnmark_proj(projection_subkeys(rng.bytes(32 * 64), carrier))  # warm up
    # Plain torch at its default thread count and at one thread (on a busy machine one
    # thread can be faster): the faster counts. Methods interleaved, `reps` rounds, medians:
    # other processes on a shared machine come and go.
    cases = [("nnmark", nnmark_proj, n_keys, None)]
    for threads in sorted({torch.get_num_threads(), 1}):
        cases += [("torch batch", torch_batch, max(n_keys // 8, 64), threads), ("torch loop", torch_loop, n_loop,
                                                                                 threads)]
    runs: dict = {}
    for _ in range(reps):
        for name, fn, n, threads in cases:
            with torch_threads(threads):
                if not runs.get((name, threads)):
                    fn(projection_subkeys(rng.bytes(32 * 64), carrier))  # warm up
                _, wall, cpu, _ = run(fn, n)
            runs.setdefault((name, threads), []).append((n / wall, cpu / n, wall))
    hashing = []
    for _ in range(reps):  # the subkeys alone (hashlib SHA-256 per secret), part of every method's try
        secrets = rng.bytes(32 * n_keys)
        c0 = time.process_time()
        projection_subkeys(secrets, carrier)
        hashing.append((time.process_time() - c0) / n_keys)
    res["sha256_cpu_s_per_try"] = statistics.median(hashing)
    for (name, threads), rs in runs.items():
        entry = {"tries": n_keys if name == "nnmark" else (max(n_keys // 8, 64) if name == "torch batch" else n_loop),
                 "reps": len(rs), "tries_per_s": statistics.median(r[0] for r in rs),
                 "cpu_s_per_try": statistics.median(r[1] for r in rs), "wall_s": [r[2] for r in rs],
                 "torch_threads": threads}
        if name not in res or entry["tries_per_s"] > res[name]["tries_per_s"]:
            res[name] = entry
        res.setdefault("all", []).append({"method": name, **entry})
    # the same secrets through all three: equal match counts
    secrets = rng.bytes(32 * min(n_loop, 512))
    sk = projection_subkeys(secrets, carrier)
    a, b, c = (np.count_nonzero((f(sk) > 0) == target, axis=1) for f in (nnmark_proj, torch_batch, torch_loop))
    res["check_keys"] = len(sk)
    res["check"] = bool((a == b).all() and (a == c).all())
    return res


def forge_cell(model, carrier: str, T: int, alpha: float, rate: dict, runs: int, cell_seconds: float,
               seed: int) -> dict:
    from nnmark.attacks import forge_key
    from nnmark.stats import binomial_p_value, binomial_threshold, forge_tries

    thr = binomial_threshold(T, alpha)
    cell = {"T": T, "alpha": alpha, "threshold": thr}
    if thr > T:
        cell.update(status="never", q=0.0, expected_tries=math.inf)
        return cell
    q = binomial_p_value(thr, T)
    expected = forge_tries(T, alpha)
    tps = rate["nnmark"]["tries_per_s"]
    cell.update(q=q, expected_tries=expected, log2_expected=math.log2(expected))
    if expected / tps > cell_seconds / 2:
        cell["status"] = "extrapolated"
        return cell
    done = []
    t_end = time.perf_counter() + cell_seconds
    for r in range(runs):
        left = t_end - time.perf_counter()
        if left <= 0 and done:
            break
        rec = forge_key(model, carrier, bits=T, alpha=alpha, message="ACME Corp, model v3", seed=seed + r,
                        max_tries=None, seconds=max(left, 1.0))
        if not rec.found:
            break
        done.append(rec.to_dict())
    if not done:
        cell["status"] = "extrapolated"
        return cell
    tries = [d["tries"] for d in done]
    cell.update(status="measured", runs=len(done), tries=tries, mean_tries=statistics.fmean(tries),
                median_tries=statistics.median(tries), mean_wall_s=statistics.fmean(d["seconds"] for d in done),
                mean_cpu_s=statistics.fmean(d["cpu_seconds"] for d in done),
                total_wall_s=sum(d["seconds"] for d in done), total_cpu_s=sum(d["cpu_seconds"] for d in done),
                matches=[d["matches"] for d in done])
    return cell


def search_rate(rate: dict, cells: list[dict]) -> dict:
    """Tries per wall second and CPU seconds per try of the search at one T: pooled over the
    measured forging runs when they took 2 s or more (a longer sample of a noisy machine),
    else the rate measurement's."""
    runs = [c for c in cells if c["status"] == "measured"]
    wall = sum(c["total_wall_s"] for c in runs)
    if wall >= 2.0:
        tries = sum(sum(c["tries"]) for c in runs)
        return {"source": "forging runs", "tries": tries, "wall_s": wall, "tries_per_s": tries / wall,
                "cpu_s_per_try": sum(c["total_cpu_s"] for c in runs) / tries}
    n = rate["nnmark"]
    return {"source": "rate measurement", "tries_per_s": n["tries_per_s"], "cpu_s_per_try": n["cpu_s_per_try"]}


def rule_rows(ks, margin: float = 0.01, ber: float = 0.2) -> list[dict]:
    """For an adversary who tries 2^k keys: the alpha that keeps its success below ``margin``,
    and the fewest bits whose threshold at that alpha still tolerates a bit error rate ``ber``."""
    from nnmark.stats import binomial_threshold

    out = []
    for k in ks:
        alpha = margin * 2.0 ** -k
        T = 8
        while binomial_threshold(T, alpha) > (1 - ber) * T:
            T += 8 if T < 512 else 64
        lo = T - 8 if T <= 512 else T - 64
        for t in range(max(lo, 1), T + 1):  # the smallest T in the last step
            if binomial_threshold(t, alpha) <= (1 - ber) * t:
                T = t
                break
        out.append({"k": k, "alpha": alpha, "min_bits": T, "threshold": binomial_threshold(T, alpha)})
    return out


# ------------------------------------------------------------------ tables
def fmt_n(x: float) -> str:
    if x == math.inf:
        return "∞"
    if x < 1e4:
        return f"{x:.0f}"
    return f"{x:.2e}".replace("e+0", "e").replace("e+", "e")


def fmt_s(s: float) -> str:
    if s < 60:
        return fmt_time(s)
    for unit, n in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.3g} {unit}"
    return fmt_time(s)


def tables(out: dict) -> str:
    lines = ["### Search rate (tries per second; one try = SHA-256 subkey + projection + match count)", "",
             "| T | nnmark | torch batch | torch loop | time ratio nnmark / torch batch | nnmark / torch loop | "
             "CPU µs per try (nnmark) | of which SHA-256 | during the forging runs | check |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in out["rates"]:
        n, b, lp, sr = r["nnmark"], r["torch batch"], r["torch loop"], r["search"]
        during = (f"{sr['tries_per_s']:.3g}/s, {sr['cpu_s_per_try'] * 1e6:.2f} µs CPU" if sr["source"] == "forging runs"
                  else "–")
        lines.append(f"| {r['T']} | {n['tries_per_s']:.3g} | {b['tries_per_s']:.3g} | {lp['tries_per_s']:.3g} | "
                     f"{b['tries_per_s'] / n['tries_per_s']:.3f} | "
                     f"{lp['tries_per_s'] / n['tries_per_s']:.4f} | {n['cpu_s_per_try'] * 1e6:.2f} | "
                     f"{r['sha256_cpu_s_per_try'] * 1e6:.2f} | {during} | "
                     f"{'ok' if r['check'] else 'MISMATCH'} ({r['check_keys']} keys) |")
    lines += ["", "### Tries and time to forge a key that verifies (bits from a message; model never marked)", "",
              "| T | alpha | threshold | q per try | expected tries 1/q | log2 | measured: runs, mean tries "
              "(median) | wall s | CPU s | or extrapolated: wall | CPU |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in out["cells"]:
        head = f"| {c['T']} | {c['alpha']:g} | "
        if c["status"] == "never":
            lines.append(head + f"{c['threshold']} > T | 0 | never | – | – | – | – | – | – |")
            continue
        mid = (f"{c['threshold']} | {c['q']:.3g} | {fmt_n(c['expected_tries'])} | {c['log2_expected']:.1f} | ")
        if c["status"] == "measured":
            lines.append(head + mid + f"{c['runs']}, {fmt_n(c['mean_tries'])} ({fmt_n(c['median_tries'])}) | "
                         f"{c['mean_wall_s']:.3g} | {c['mean_cpu_s']:.3g} | – | – |")
        else:
            lines.append(head + mid + f"– | – | – | **{fmt_s(c['predicted_wall_s'])}*** | "
                         f"**{fmt_s(c['predicted_cpu_s'])}*** |")
    lines += ["", "### Which alpha to demand (exact binomial; not measured)", "",
              "| adversary tries 2^k | alpha for success ≤ 1% | fewest bits with threshold ≤ 0.8 T | threshold |",
              "|---:|---:|---:|---:|"]
    for r in out["rule"]:
        lines.append(f"| 2^{r['k']} | {r['alpha']:.2g} | {r['min_bits']} | {r['threshold']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="16,24,32,48,64")
    ap.add_argument("--alphas", default="1e-2,1e-4,1e-6,1e-9")
    ap.add_argument("--runs", type=int, default=20, help="forging runs per reachable cell (at most)")
    ap.add_argument("--cell-seconds", type=float, default=20.0, help="wall budget per cell")
    ap.add_argument("--rate-keys", type=int, default=65536, help="tries per rate measurement (nnmark, torch batch)")
    ap.add_argument("--loop-keys", type=int, default=1024, help="tries for the per-key torch loop")
    ap.add_argument("--rate-reps", type=int, default=5, help="rounds of the rate measurement (medians)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of the unmarked model")
    ap.add_argument("--quick", action="store_true", help="small: T 16,32; 2 runs; 5 s cells")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    if args.quick:
        args.Ts, args.runs, args.cell_seconds, args.rate_keys, args.loop_keys, args.rate_reps = \
            "16,32", 3, 5.0, 8192, 256, 2

    import torch

    import nnmark
    from nnmark.demo import CARRIER, DigitsNet, accuracy, load_digits_split, train
    from nnmark.whitebox import reduce_cpu

    meta = run_meta("cpu")
    load = OtherLoad()
    t_start = time.perf_counter()
    data = load_digits_split(0)
    t0 = time.perf_counter()
    model = train(data, seed=0, epochs=args.epochs)
    train_s = time.perf_counter() - t0
    acc = accuracy(model, data.x_test, data.y_test)
    print(f"unmarked DigitsNet: {args.epochs} epochs in {train_s:.1f} s, test accuracy {acc:.3f}", flush=True)
    probe = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64)
    vec = torch.from_numpy(reduce_cpu(probe, model.get_parameter(CARRIER).detach().unsqueeze(0))[0])

    Ts = [int(t) for t in args.Ts.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    rates, cells = [], []
    for T in Ts:
        r = rate_case(vec, T, args.rate_keys, args.loop_keys, CARRIER, seed=T, reps=args.rate_reps)
        rates.append(r)
        print(f"T={T}: nnmark {r['nnmark']['tries_per_s']:.3g}/s, torch batch {r['torch batch']['tries_per_s']:.3g}/s,"
              f" torch loop {r['torch loop']['tries_per_s']:.3g}/s, check {r['check']}", flush=True)
        mine = []
        for a in alphas:
            c = forge_cell(model, CARRIER, T, a, r, args.runs, args.cell_seconds, seed=1000 * T)
            mine.append(c)
            print(f"  alpha={a:g}: {c['status']}" + (f", mean tries {c['mean_tries']:.3g} (expected "
                  f"{c['expected_tries']:.3g}), {c['mean_cpu_s']:.3g} CPU s" if c["status"] == "measured" else
                  f", expected {c['expected_tries']:.3g} tries" if c["status"] == "extrapolated" else ""), flush=True)
        r["search"] = search_rate(r, mine)
        for c in mine:
            if c["status"] != "never":
                c["predicted_wall_s"] = c["expected_tries"] / r["search"]["tries_per_s"]
                c["predicted_cpu_s"] = c["expected_tries"] * r["search"]["cpu_s_per_try"]
        cells += mine
    wall = time.perf_counter() - t_start
    free = nnmark.attacks.forge_key(model, CARRIER, bits=256, alpha=1e-12)  # free bits: one try
    out = {"benchmark": "bench_forge", "meta": {**meta, "wall_s": wall, "other_load_cores": load.cores(wall)},
           "model": {"arch": "DigitsNet", "trained_epochs": args.epochs, "seed": 0, "test_accuracy": acc,
                     "carrier": CARRIER, "reduction": "filter_mean", "N": int(vec.numel()), "marked": False},
           "free_bits": {"bits": 256, "alpha": 1e-12, "found": free.found, "tries": free.tries,
                         "seconds": free.seconds, "matches": free.matches},
           "rates": rates, "cells": cells, "rule": rule_rows([20, 30, 40, 50, 60, 64, 80, 100, 128])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(tables(out))
    print(f"\nfree bits: 256 bits at alpha 1e-12 forged in {free.tries} try ({free.seconds * 1e3:.1f} ms), "
          f"{free.matches}/256 matches")
    print(f"wall {wall:.0f} s; other load {out['meta']['other_load_cores']} cores; JSON: {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
