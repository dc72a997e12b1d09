#!/usr/bin/env python3
"""White-box penalty overhead: a ResNet-18 training step on CPU with and without the mark.

The model is a ResNet-18 defined here (BasicBlock [2, 2, 2, 2], 11.69M parameters at
1000 classes; torchvision is not needed), float32, trained with SGD (momentum 0.9,
weight decay 5e-4) on a small pool of fixed random batches. The mark is the Uchida
paper's setting: carrier layer1.0.conv1.weight (a 64x64x3x3 conv), 256 bits,
reduction filter_mean (N = 576), strength 0.01. One training step is

  forward, cross-entropy, zero_grad, backward, optimizer.step()

and the three sides differ only in how the penalty joins it:

  plain          the step as is
  PenaltyHook    nnmark.PenaltyHook(model, key, strength=0.01).attach(opt): a step
                 pre-hook adds d(penalty)/d(carrier) to the carrier's .grad
  loss+penalty   loss = CE + Embedding.penalty(model), the Hugging Face adapter's way

The sides run in the same process on the same model and optimizer, interleaved step
by step (A B C A B C ..., the order rotated at every step; the hook is attached for
its side's steps only): --warmup steps of each side first, then --rounds rounds of
--steps timed steps per side, so that a slow spell of a shared machine hits all sides
alike. Per side and round the median step time is taken; reported are the median over
rounds and the spread (min-max), and the overhead of each penalised side against plain
as the median over rounds of the paired ratio (side / plain in the same round) - 1.
Each round also times the penalty alone (Uchida.penalty forward + backward, and the
hook's own work, Embedding.add_penalty_grad), median of --pen-reps calls: on a noisy
machine the step-to-step noise can exceed the true overhead, and penalty / step is
then the robust figure. (Under concurrent load both inflate: torch's OpenMP regions,
also those of the penalty's small ops such as the filter mean, wait whole scheduler
slices, milliseconds, for a descheduled worker; measure on a quiet machine.)

Check (before timing, at one model state): the carrier's gradient with the hook
(read inside optimizer.step(), after the hook ran) and with the penalty in the loss
each equal the plain gradient plus d(penalty)/d(carrier) computed directly
(allclose); after timing, the hook has run at every one of its steps.

Two more cases (--cases): "compiled" times torch.compile(fullgraph=True) of forward + loss
with and without Uchida.penalty in the loss (backward and step eager; graph breaks counted
with torch._dynamo.explain); "sharded" runs FSDP2 (fully_shard per BasicBlock and the root)
in 2 processes over gloo on the CPU, with and without PenaltyHook, and reports the bytes
the mark communicates per step (nnmark.sharded.COMM: one all-reduce of T floats).

Usage:
  python benchmarks/bench_penalty.py                     # batch 32x3x112x112, 5 rounds x 10 steps
  python benchmarks/bench_penalty.py --quick             # smoke run: tiny batch, few steps
  python benchmarks/bench_penalty.py --batch 16 --image 224 --rounds 8 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, fmt_time, run_meta  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "bench_penalty.json"
SECRET = bytes(range(32))  # a fixed, public benchmark key: results are reproducible
MESSAGE = "nnmark bench"
CARRIER = "layer1.0.conv1.weight"
CARRIER_SHAPE = (64, 64, 3, 3)
BITS = 256
STRENGTH = 0.01
TARGET = 0.05  # from the issue: the penalty adds <= 5 % to a training step
BATCH_POOL = 4  # distinct batches, cycled: the model cannot simply memorise one batch
SIDES = ("plain", "PenaltyHook", "loss+penalty")
# Check: max |g_side - g_plain - g_penalty| <= CHECK_TOL * max |g_penalty| + a few float32
# ulps of the plain gradient (g_side rounds g_plain + g_penalty once; |g_plain| can be
# ~1000x |g_penalty|). Without the penalty the error would be max |g_penalty| itself.
CHECK_TOL = 1e-4
F32_EPS = 2.0 ** -23


# ================================================================== model
def resnet18(num_classes: int):
    """The standard ResNet-18 (He et al. 2016; torchvision's layout and parameter names)."""
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
                setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet18()


# ================================================================== helpers
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _pct(x: float) -> str:
    return f"{x * 100:+.2f} %"


# ================================================================== benchmark
def run(args, console) -> dict:
    import torch
    import torch.nn.functional as F

    import nnmark
    from nnmark.integrations.core import Embedding

    torch.manual_seed(0)
    model = resnet18(args.classes)
    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.image, args.image, generator=gen),
                torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(BATCH_POOL)]

    key = nnmark.WhiteBoxKey(SECRET, CARRIER, nnmark.message_bits(MESSAGE, BITS), reduction="filter_mean",
                             shape=CARRIER_SHAPE)
    uchida = nnmark.Uchida(key, strength=STRENGTH)
    hook = nnmark.PenaltyHook(model, key, strength=STRENGTH)  # attached only during its own steps
    emb_loss = Embedding(key, strength=STRENGTH)   # side loss+penalty
    emb_direct = Embedding(key, strength=STRENGTH)  # the hook's work timed alone (its own step count)
    w = uchida.parameter(model)

    def step(i: int, in_loss: bool) -> None:
        x, y = batches[i % BATCH_POOL]
        loss = F.cross_entropy(model(x), y)
        if in_loss:
            loss = loss + emb_loss.penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # ---- check: each penalised side's carrier gradient = plain + d(penalty)/dw
    def plain_grad():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
        return w.grad.detach().clone()

    g_plain = plain_grad()
    g_plain_again = plain_grad()  # the same computation twice: the floor of float noise
    g_pen = torch.autograd.grad(uchida.penalty(model), w)[0]
    opt.zero_grad(set_to_none=True)
    (F.cross_entropy(model(batches[0][0]), batches[0][1]) + emb_loss.penalty(model)).backward()
    g_loss = w.grad.detach().clone()
    seen = {}
    hook.attach(opt)
    # Registered after the hook's, so it runs after it: the gradient the step will use.
    spy = opt.register_step_pre_hook(lambda o, a, k: seen.__setitem__("g", w.grad.detach().clone()))
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    spy.remove()
    hook.remove()
    scale = float(g_pen.abs().max())
    g_max = float(g_plain.abs().max())
    want = g_plain.double() + g_pen.double()
    check = {
        "grad_plain_max_abs": g_max,
        "grad_penalty_max_abs": scale,
        "plain_repeat_err_rel": float((g_plain_again - g_plain).abs().max()) / scale,
        "hook_err_rel": float((seen["g"].double() - want).abs().max()) / scale,
        "loss_err_rel": float((g_loss.double() - want).abs().max()) / scale,
        "tolerance_rel": CHECK_TOL + 4 * F32_EPS * g_max / scale,
    }
    hook_steps0 = hook.steps  # 1: the check's step
    if not (scale > 0 and check["tolerance_rel"] < 0.1):
        raise AssertionError("the penalty's gradient is too small next to the task's for the check to tell "
                             f"whether it was added: {check}")
    check["ok"] = (check["hook_err_rel"] <= check["tolerance_rel"] and check["loss_err_rel"] <= check["tolerance_rel"]
                   and hook_steps0 == 1)
    if not check["ok"]:
        raise AssertionError(f"the penalised gradients do not equal plain + d(penalty)/dw: {check}")

    # ---- timing
    samples: dict[str, list[list[float]]] = {s: [] for s in SIDES}
    pen_fb: list[float] = []   # per round: median of Uchida.penalty forward + backward
    pen_hook: list[float] = []  # per round: median of Embedding.add_penalty_grad
    hook_steps_expected = hook_steps0

    def one_step(side: str, i: int) -> float:
        """One timed step of ``side`` on batch i; the hook is attached for its steps only."""
        nonlocal hook_steps_expected
        if side == "PenaltyHook":
            hook.attach(opt)
            hook_steps_expected += 1
        try:
            t0 = time.perf_counter()
            step(i, side == "loss+penalty")
            return time.perf_counter() - t0
        finally:
            if side == "PenaltyHook":
                hook.remove()

    def penalty_alone(reps: int) -> tuple[float, float]:
        fb, hk = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.autograd.grad(uchida.penalty(model), w)
            fb.append(time.perf_counter() - t0)
        for _ in range(reps):
            t0 = time.perf_counter()
            emb_direct.add_penalty_grad(model, opt)
            hk.append(time.perf_counter() - t0)
        return statistics.median(fb), statistics.median(hk)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("warm-up", total=args.rounds + 1)
        for i in range(args.warmup):
            for side in SIDES:
                one_step(side, i)
        penalty_alone(max(3, args.pen_reps // 10))
        prog.advance(task)
        for r in range(args.rounds):
            prog.update(task, description=f"round {r + 1}/{args.rounds}")
            for side in SIDES:
                samples[side].append([])
            # Step by step, A B C A B C ..., the order rotated each time: a slow spell of
            # the machine (seconds) hits all sides alike instead of one side's block.
            for i in range(args.steps):
                k = (i + r) % 3
                for side in SIDES[k:] + SIDES[:k]:
                    samples[side][-1].append(one_step(side, i))
            fb, hk = penalty_alone(args.pen_reps)
            pen_fb.append(fb)
            pen_hook.append(hk)
            med = {s: statistics.median(samples[s][-1]) for s in SIDES}
            prog.console.print(f"round {r + 1}: " + ", ".join(f"{s} {fmt_time(med[s])}" for s in SIDES)
                               + f"; penalty fwd+bwd {fmt_time(fb)}, hook work {fmt_time(hk)}")
            prog.advance(task)
    check["hook_ran_every_step"] = hook.steps == hook_steps_expected
    if not check["hook_ran_every_step"]:
        raise AssertionError(f"the hook ran {hook.steps} times, expected {hook_steps_expected}")

    # ---- statistics
    rounds_med = {s: [statistics.median(t) for t in samples[s]] for s in SIDES}
    sides = {}
    for s in SIDES:
        all_steps = [t for blk in samples[s] for t in blk]
        q = statistics.quantiles(all_steps, n=4) if len(all_steps) >= 2 else [all_steps[0]] * 3
        sides[s] = {"per_step_s": _spread(rounds_med[s]), "round_medians_s": rounds_med[s],
                    "all_steps_iqr_over_median": (q[2] - q[0]) / statistics.median(all_steps),
                    "times_s": [[round(t, 6) for t in blk] for blk in samples[s]]}
    plain = rounds_med["plain"]
    for s in SIDES[1:]:
        sides[s]["overhead_vs_plain"] = _spread([b / a - 1 for a, b in zip(plain, rounds_med[s])])
    step_plain = sides["plain"]["per_step_s"]["median"]
    direct = {"penalty_fwd_bwd_s": _spread(pen_fb), "hook_work_s": _spread(pen_hook), "reps_per_round": args.pen_reps}
    direct["penalty_fwd_bwd_over_step"] = direct["penalty_fwd_bwd_s"]["median"] / step_plain
    direct["hook_work_over_step"] = direct["hook_work_s"]["median"] / step_plain
    with torch.no_grad():
        ber = uchida.ber(model)
    return {"model": {"name": "ResNet-18", "params": n_params, "classes": args.classes,
                      "input": [args.batch, 3, args.image, args.image], "dtype": "float32",
                      "optimizer": f"SGD(lr={args.lr}, momentum=0.9, weight_decay=5e-4)"},
            "mark": {"carrier": CARRIER, "shape": list(CARRIER_SHAPE), "bits": BITS, "reduction": "filter_mean",
                     "strength": STRENGTH, "key_id": key.key_id, "ber_after": ber},
            "threads": {"torch": torch.get_num_threads(), "nnmark": nnmark.get_num_threads()},
            "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
            "check": check, "sides": sides, "penalty_alone": direct}


def _targets(res: dict) -> list[dict]:
    out = []
    for s in SIDES[1:]:
        v = res["sides"][s]["overhead_vs_plain"]["median"]
        out.append({"target": f"{s}: step overhead vs plain <= {TARGET * 100:.0f} % (median over rounds)",
                    "value": round(v, 5), "met": v <= TARGET})
    v = res["penalty_alone"]["hook_work_over_step"]
    out.append({"target": f"hook work alone / plain step <= {TARGET * 100:.0f} % (robust to step noise)",
                "value": round(v, 6), "met": v <= TARGET})
    return out


def _markdown(res: dict, meta: dict, targets: list[dict]) -> str:
    m, th, sd, pa = res["model"], res["threads"], res["sides"], res["penalty_alone"]
    inp = "×".join(map(str, m["input"]))
    lines = [
        "## bench_penalty (CPU)",
        "",
        f"White-box penalty overhead on a ResNet-18 training step ({m['params'] / 1e6:.2f}M parameters, "
        f"{m['classes']} classes, input {inp}, float32, {m['optimizer']}); mark: `{CARRIER}` "
        f"(64×64×3×3), {BITS} bits, filter_mean, strength {STRENGTH}.",
        "",
        f"- **Machine:** `{meta['cpu_model']}`, {meta['cpu_count']} vCPUs; threads: torch {th['torch']}, "
        f"nnmark {th['nnmark']}; torch {meta['torch_version']}; Python {meta['python']}.",
        f"- **Date:** {meta['date_utc'][:10]}, {meta['date_utc'][11:16]} UTC; wall time {meta['wall_s']:.0f} s; "
        f"CPU used by other processes meanwhile: {meta['other_processes_cores_avg']:.2f} cores on average.",
        f"- **Command:** `{meta['command']}`; {res['rounds']} rounds × {res['steps_per_round']} steps per side "
        f"(after {res['warmup_steps']} warm-up steps each), interleaved step by step.",
        "",
        "| side | per step (median over rounds) | min – max over rounds | overhead vs plain (median) "
        "| min – max over rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in SIDES:
        p = sd[s]["per_step_s"]
        o = sd[s].get("overhead_vs_plain")
        ov = (f"**{_pct(o['median'])}** | {_pct(o['min'])} – {_pct(o['max'])}" if o else "– | –")
        name = {"plain": "plain", "PenaltyHook": "`PenaltyHook` (step pre-hook)",
                "loss+penalty": "`loss + penalty` (HF adapter's way)"}[s]
        lines.append(f"| {name} | {fmt_time(p['median'])} | {fmt_time(p['min'])} – {fmt_time(p['max'])} | {ov} |")
    f, h = pa["penalty_fwd_bwd_s"], pa["hook_work_s"]
    lines += [
        "",
        f"Penalty alone (median over rounds of the median of {pa['reps_per_round']} calls): "
        f"`Uchida.penalty` forward + backward **{fmt_time(f['median'])}** "
        f"({pa['penalty_fwd_bwd_over_step'] * 100:.3f} % of a plain step); the hook's work "
        f"(`add_penalty_grad`) **{fmt_time(h['median'])}** ({pa['hook_work_over_step'] * 100:.3f} %).",
        f"Step-to-step noise: IQR / median of the plain steps = "
        f"{sd['plain']['all_steps_iqr_over_median'] * 100:.1f} %.",
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
    ]
    for tg in targets:
        lines.append(f"| {tg['target']} | {tg['value'] * 100:.3f} % | {'met' if tg['met'] else 'NOT met'} |")
    return "\n".join(lines)


# ================================================================== compiled and sharded cases
def _interleaved(fns: dict, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Per side, the median step time of each round; sides interleaved step by step (order rotated)."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            fns[n](i)
    med: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        t: dict[str, list[float]] = {n: [] for n in names}
        for i in range(steps):
            k = (i + r) % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[n](i)
                t[n].append(time.perf_counter() - t0)
        for n in names:
            med[n].append(statistics.median(t[n]))
    return med


def _case_stats(med: dict[str, list[float]], base: str) -> dict:
    out = {n: {"per_step_s": _spread(v)} for n, v in med.items()}
    for n in med:
        if n != base:
            out[n]["overhead_vs_plain"] = _spread([b / a - 1 for a, b in zip(med[base], med[n])])
    return out


def _key():
    import nnmark

    return nnmark.WhiteBoxKey(SECRET, CARRIER, nnmark.message_bits(MESSAGE, BITS), reduction="filter_mean",
                              shape=CARRIER_SHAPE)


def run_compiled(args, console) -> dict:
    """torch.compile(fullgraph=True) of the forward + loss, with and without the penalty in
    the loss; backward and the optimizer step eager. Graph breaks counted by dynamo.explain."""
    import torch
    import torch.nn.functional as F

    import nnmark

    torch.manual_seed(0)
    model = resnet18(args.classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.image, args.image, generator=gen),
                torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(BATCH_POOL)]
    uchida = nnmark.Uchida(_key(), strength=STRENGTH)

    def plain(x, y):
        return F.cross_entropy(model(x), y)

    def penalised(x, y):
        return F.cross_entropy(model(x), y) + uchida.penalty(model)

    torch._dynamo.reset()
    breaks = torch._dynamo.explain(penalised)(*batches[0]).graph_break_count
    compiled = {"compiled": torch.compile(plain, fullgraph=True, backend=args.compile_backend),
                "compiled+penalty": torch.compile(penalised, fullgraph=True, backend=args.compile_backend)}
    t0 = time.perf_counter()
    with torch.no_grad():
        eager_loss = float(penalised(*batches[0]))
        compiled_loss = float(compiled["compiled+penalty"](*batches[0]))
    console.print(f"compiled ({args.compile_backend}) in {time.perf_counter() - t0:.0f} s; graph breaks {breaks}")

    def stepper(fn):
        def one(i: int) -> None:
            x, y = batches[i % BATCH_POOL]
            loss = fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return one

    med = _interleaved({n: stepper(f) for n, f in compiled.items()}, args.rounds, args.steps, args.warmup)
    return {"backend": args.compile_backend, "graph_breaks": breaks, "loss_eager": eager_loss,
            "loss_compiled": compiled_loss, "sides": _case_stats(med, "compiled")}


def _sharded_worker(rank: int, world: int, init_file: str, args, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    import nnmark
    from nnmark import sharded

    torch.set_num_threads(args.sharded_threads)
    nnmark.set_num_threads(args.sharded_threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = resnet18(args.classes).train()
        for m in model.modules():
            if type(m).__name__ == "BasicBlock":
                fully_shard(m)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        hook = nnmark.PenaltyHook(model, _key(), strength=STRENGTH)
        gen = torch.Generator().manual_seed(1 + rank)
        batches = [(torch.randn(args.batch, 3, args.image, args.image, generator=gen),
                    torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(BATCH_POOL)]
        hook_steps = 0

        def one(i: int, with_hook: bool) -> None:
            nonlocal hook_steps
            if with_hook:
                hook.attach(opt)
                hook_steps += 1
            try:
                x, y = batches[i % BATCH_POOL]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            finally:
                hook.remove()

        sent0 = dict(sharded.COMM)
        med = _interleaved({"FSDP2": lambda i: one(i, False), "FSDP2+PenaltyHook": lambda i: one(i, True)},
                           args.rounds, args.steps, args.warmup)
        sent = {k: sharded.COMM[k] - sent0[k] for k in sent0}
        local = model.get_parameter(CARRIER).to_local()
        res = {"world": world, "threads_per_rank": args.sharded_threads, "sides": _case_stats(med, "FSDP2"),
               "hook_steps": hook_steps, "mark_all_reduces_per_step": sent["all_reduces"] / hook_steps,
               "mark_bytes_per_step": sent["bytes"] / hook_steps, "carrier_shard_shape": list(local.shape),
               "carrier_bytes_whole": 4 * int(torch.tensor(CARRIER_SHAPE).prod())}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_sharded(args, console) -> dict:
    """FSDP2 (fully_shard per BasicBlock and the root) over gloo on the CPU, 2 processes: the
    step with and without PenaltyHook, and the bytes the mark communicates per step."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sharded.json")
        mp.spawn(_sharded_worker, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2, join=True)
        with open(out) as f:
            return json.load(f)


def _print_cases(console, res: dict) -> None:
    from rich.table import Table

    for case, title in (("compiled", "torch.compile(fullgraph=True) step"), ("sharded", "FSDP2 step, 2 ranks")):
        if case not in res:
            continue
        c = res[case]
        t = Table(title=title)
        for col in ("side", "per step\n(median of rounds)", "overhead vs plain\n(median)", "min - max"):
            t.add_column(col, justify="right")
        for side, v in c["sides"].items():
            o = v.get("overhead_vs_plain")
            t.add_row(side, fmt_time(v["per_step_s"]["median"]), _pct(o["median"]) if o else "-",
                      f"{_pct(o['min'])} - {_pct(o['max'])}" if o else "-")
        console.print(t)
    if "compiled" in res:
        c = res["compiled"]
        console.print(f"compiled: graph breaks {c['graph_breaks']}; loss eager {c['loss_eager']:.6f}, compiled "
                      f"{c['loss_compiled']:.6f}")
    if "sharded" in res:
        c = res["sharded"]
        console.print(f"sharded: the mark sends {c['mark_bytes_per_step']:.0f} bytes in "
                      f"{c['mark_all_reduces_per_step']:.0f} all-reduce per step (T = {BITS} floats); carrier "
                      f"shard {c['carrier_shard_shape']} of {list(CARRIER_SHAPE)} ({c['carrier_bytes_whole']} bytes "
                      f"whole, never gathered by the mark)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 4x3x32x32, 2 rounds x 3 steps")
    ap.add_argument("--batch", type=_positive_int, default=None, help="images per step (default 32; quick 4)")
    ap.add_argument("--image", type=_positive_int, default=None, help="image side in pixels (default 112; quick 32)")
    ap.add_argument("--classes", type=_positive_int, default=1000, help="output classes (default 1000: 11.69M params)")
    ap.add_argument("--rounds", type=_positive_int, default=None, help="rounds (default 5; quick 2)")
    ap.add_argument("--steps", type=_positive_int, default=None,
                    help="timed steps per side per round (default 10; quick 3)")
    ap.add_argument("--warmup", type=_positive_int, default=None, help="warm-up steps per side (default 3; quick 1)")
    ap.add_argument("--pen-reps", type=_positive_int, default=None,
                    help="calls per round when timing the penalty alone (default 200; quick 20)")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="set torch and nnmark threads (default: all cores)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    ap.add_argument("--cases", default="eager,compiled,sharded",
                    help="comma-separated: eager (the three sides above), compiled (torch.compile fullgraph), "
                         "sharded (FSDP2, 2 processes over gloo); default all")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--sharded-threads", type=_positive_int, default=1, help="threads per rank, sharded case")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - {"eager", "compiled", "sharded"})
    if bad or not cases:
        ap.error(f"--cases takes eager, compiled, sharded; got {args.cases!r}")
    q = args.quick
    args.batch = args.batch or (4 if q else 32)
    args.image = args.image or (32 if q else 112)
    args.rounds = args.rounds or (2 if q else 5)
    args.steps = args.steps or (3 if q else 10)
    args.warmup = args.warmup or (1 if q else 3)
    args.pen_reps = args.pen_reps or (20 if q else 200)
    if not (args.lr > 0 and args.lr < float("inf")):
        ap.error(f"--lr must be a positive finite number, got {args.lr}")

    import torch
    from rich.console import Console
    from rich.table import Table

    import nnmark

    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the tables
        console = Console(width=160)
    if args.threads:
        torch.set_num_threads(args.threads)
        nnmark.set_num_threads(args.threads)
    meta = run_meta("cpu")
    t_start = time.perf_counter()
    load = OtherLoad()
    if "eager" not in cases:  # only the new cases
        res = {}
        if "compiled" in cases:
            res["compiled"] = run_compiled(args, console)
        if "sharded" in cases:
            res["sharded"] = run_sharded(args, console)
        _print_cases(console, res)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_penalty", "meta": meta, **res}, f, indent=1)
        console.print(f"JSON: {args.json}")
        return 0
    res = run(args, console)
    if "compiled" in cases:
        res["compiled"] = run_compiled(args, console)
    if "sharded" in cases:
        res["sharded"] = run_sharded(args, console)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["other_processes_cores_avg"] = load.cores(meta["wall_s"])
    targets = _targets(res)

    m, th, sd, pa, ck = res["model"], res["threads"], res["sides"], res["penalty_alone"], res["check"]
    bi = meta["nnmark_build_info"]
    console.print(f"[bold]bench_penalty[/bold] {meta['date_utc']}  {meta['cpu_model']}, {meta['cpu_count']} cores, "
                  f"cpu_isa={bi['cpu_isa']}, torch {meta['torch_version']}, threads: torch {th['torch']}, "
                  f"nnmark {th['nnmark']}; nnmark from {meta['nnmark_path']}")
    t1 = Table(title=f"ResNet-18 training step ({m['params'] / 1e6:.2f}M params, {m['classes']} classes, input "
                     f"{'x'.join(map(str, m['input']))}, CPU float32, {th['torch']} threads); {res['rounds']} rounds "
                     f"x {res['steps_per_round']} steps per side")
    for col in ("side", "per step\n(median of rounds)", "min - max\nover rounds", "overhead vs plain\n(median)",
                "overhead\nmin - max"):
        t1.add_column(col, justify="right")
    for s in SIDES:
        p, o = sd[s]["per_step_s"], sd[s].get("overhead_vs_plain")
        t1.add_row(s, fmt_time(p["median"]), f"{fmt_time(p['min'])} - {fmt_time(p['max'])}",
                   _pct(o["median"]) if o else "-", f"{_pct(o['min'])} - {_pct(o['max'])}" if o else "-")
    t2 = Table(title=f"Penalty alone ({BITS} bits on {CARRIER}, N = 576; median of rounds, "
                     f"each the median of {pa['reps_per_round']} calls)")
    for col in ("what", "time", "min - max\nover rounds", "/ plain step"):
        t2.add_column(col, justify="right")
    for label, k, r in (("Uchida.penalty fwd+bwd", "penalty_fwd_bwd_s", "penalty_fwd_bwd_over_step"),
                        ("hook work (add_penalty_grad)", "hook_work_s", "hook_work_over_step")):
        t2.add_row(label, fmt_time(pa[k]["median"]), f"{fmt_time(pa[k]['min'])} - {fmt_time(pa[k]['max'])}",
                   f"{pa[r] * 100:.3f} %")
    console.print(t1)
    console.print(t2)
    console.print(f"check: carrier grad with the hook / with the penalty in the loss = plain + d(penalty)/dw, "
                  f"max err / max|d(penalty)/dw| = {ck['hook_err_rel']:.1e} / {ck['loss_err_rel']:.1e} "
                  f"(ok <= {ck['tolerance_rel']:.1e}; plain vs plain again {ck['plain_repeat_err_rel']:.1e}; "
                  f"max|grad| plain {ck['grad_plain_max_abs']:.2e}, penalty {ck['grad_penalty_max_abs']:.2e}); "
                  f"hook ran at every one of its steps: {ck['hook_ran_every_step']}; BER after the run "
                  f"{res['mark']['ber_after']:.3f}")
    console.print(f"step-to-step noise: IQR / median of the plain steps = "
                  f"{sd['plain']['all_steps_iqr_over_median'] * 100:.1f} %; on a shared machine it can exceed the "
                  f"true overhead, which the penalty-alone time / step time bounds robustly")
    for tg in targets:
        met = {True: "[green]met[/green]", False: "[red]NOT met[/red]"}[tg["met"]]
        console.print(f"target {tg['target']}: {met} (value {tg['value'] * 100:.3f} %)")
    noise = sd["plain"]["all_steps_iqr_over_median"]
    if noise > TARGET:
        console.print(f"[yellow]the step-to-step noise ({noise * 100:.1f} %) exceeds the {TARGET * 100:.0f} % target: "
                      "the step-overhead verdicts cannot resolve it here; the penalty-alone figure can[/yellow]")
    console.print(f"wall time {meta['wall_s']:.0f} s; load average start {meta['loadavg_start'][0]:.2f}, "
                  f"end {meta['loadavg_end'][0]:.2f}; CPU used by other processes meanwhile: "
                  f"{meta['other_processes_cores_avg']:.2f} cores on average")
    _print_cases(console, res)
    console.print("\nmarkdown for benchmarks/RESULTS.md:\n")
    console.print(_markdown(res, meta, targets), markup=False, highlight=False, soft_wrap=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "bench_penalty", "meta": meta, **res, "targets": targets}, f, indent=1)
    console.print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
