"""The ``nnmark`` command.

Exit codes (modelscan's convention, adapted to ownership checks):

- 0: success; for ``verify``, every checkpoint carries the mark (verified)
- 1: the checks ran, and at least one checkpoint does not carry the mark
- 2: error: a key could not be loaded, or a checkpoint could not be checked
     (missing carrier, wrong shape, NaN/Inf, unreadable, unsafe or unknown file)
- 3: ``scan`` and ``manifest`` only: no files found under the paths given
- 4: usage error (bad command line)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ._display import inert, inert_line, markup_safe

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 4


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _error(exc) -> None:
    """``error: ...`` on stderr, the message shown as it is (file names are never markup)."""
    _console(stderr=True).print(f"[red]error:[/red] {markup_safe_lines(exc)}", soft_wrap=True)


def markup_safe_lines(text) -> str:
    """An error message as it is (lines kept), controls escaped, never markup."""
    from rich.markup import escape

    return escape(inert(text))


def _load_keys(paths) -> list:
    """The key files, a permission warning printed as one ``warning:`` line on stderr."""
    from .keys import load_keys_for_cli

    return load_keys_for_cli(paths, lambda line: click.echo(line, err=True))


def _fmt_p(p: float) -> str:
    return "—" if p != p else f"{p:.3g}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnmark")
def cli():
    """nnmark: watermark neural networks and verify the marks with exact p-values.

    \b
    Exit codes: 0 ok (verify: all checkpoints carry the mark), 1 some checkpoint
    does not carry the mark, 2 error (bad key, unreadable or invalid checkpoint),
    4 usage error.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(as_json):
    """What was built: CPU/CUDA kernels, compiler, SIMD path, CUDA archs, threads."""
    import nnmark

    bi = nnmark.build_info()
    if as_json:
        click.echo(json.dumps(bi))
        return
    from rich.table import Table

    t = Table(title="nnmark build", show_header=False)
    for k, v in bi.items():
        t.add_row(k, ", ".join(v) if isinstance(v, list) else str(v))
    _console().print(t)


@cli.command()
@click.option("--carrier", required=True, help="State-dict name of the carrier weight, e.g. features.3.weight.")
@click.option("--bits", default=256, show_default=True, type=click.IntRange(1), help="Number of bits T.")
@click.option("--reduction", default="filter_mean", show_default=True, type=click.Choice(["filter_mean", "flat"]))
@click.option("--message", default=None, help="Derive the owner's bits from this text (else random).")
@click.option("--shape", default=None, help="Expected carrier shape, e.g. 64,64,3,3 (reports wrong shapes).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Key file to write (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def keygen(carrier, bits, reduction, message, shape, output, force):
    """Generate a white-box key (a fresh 32-byte secret) and save it with mode 0600."""
    import nnmark

    if output.exists() and not force:
        raise click.UsageError(f"{output} exists; pass --force to overwrite it")
    shp = None
    if shape:
        try:
            shp = tuple(int(s) for s in shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise click.BadParameter(f"expected sizes like 64,64,3,3, got {shape!r}", param_hint="--shape") from None
    try:
        key = nnmark.WhiteBoxKey.generate(carrier=carrier, bits=bits, reduction=reduction, message=message, shape=shp)
        key.save(output)  # refuses to overwrite a file that is not a key file, even with --force
    except (ValueError, OSError) as exc:
        _error(exc)
        sys.exit(EXIT_ERROR)
    click.echo(f"wrote {output} (key_id {key.key_id}, carrier {carrier}, {bits} bits, {reduction}); keep it secret")


@cli.command()
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--alpha", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Significance level: verified iff p_value <= alpha.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per checkpoint on stdout: the row `nnmark scan --json` prints for it.")
@click.option("--arch", default=None, metavar="MODULE:FACTORY",
              help="Trigger and DeepSigns keys: the function that builds the model (e.g. mypkg.models:resnet18 "
                   "or file.py:make).")
@click.option("--null-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Chance match rate under the null (default 1/2 per bit, 1/classes per trigger).")
@click.option("--calibration", "calibration", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A calibration of KEY from `nnmark calibrate -o`: p-values from the beta-binomial fitted on "
                   "unmarked models.")
@click.option("--device", default=None, help="Where carriers are projected / models run, e.g. cuda (default: cpu).")
def verify(key, checkpoints, alpha, as_json, arch, null_rate, calibration, device):
    """Verify KEY's watermark in each CHECKPOINT (safetensors, .pt/.pth/.ckpt; loaded safely).

    Checkpoints are read with safetensors or torch.load(weights_only=True) only:
    nothing in them is ever executed. White-box keys check all carriers in one
    batched call; trigger keys (--arch) run the trigger set through each checkpoint.
    For white-box keys a warning says when the bits and alpha are within reach of a
    search for a forged key (fewer than 2^50 expected tries; README: Which alpha to demand).
    """
    import nnmark

    try:
        k = _load_keys([key])[0]
    except nnmark.KeyFileError as exc:
        _error(exc)
        sys.exit(EXIT_ERROR)
    if isinstance(k, (nnmark.TriggerKey, nnmark.DeepSignsKey)) and arch is None:
        raise click.UsageError(f"a {'DeepSigns' if isinstance(k, nnmark.DeepSignsKey) else 'trigger'} key runs the "
                               f"model: pass --arch MODULE:FACTORY")
    if calibration is not None and null_rate is not None:
        raise click.UsageError("--calibration and --null-rate both set the null: give one")
    start = time.perf_counter()
    try:
        cal = nnmark.load_calibration(calibration) if calibration is not None else None
        verdicts = nnmark.verify(k, [str(p) for p in checkpoints], alpha=alpha, arch=arch, null_rate=null_rate,
                                 calibration=cal, device=device)
    except ValueError as exc:  # e.g. an --arch that cannot be imported, a calibration of another key
        _error(exc)
        sys.exit(EXIT_ERROR)
    elapsed = time.perf_counter() - start
    if as_json:
        from .rows import row_json

        for v in verdicts:
            click.echo(json.dumps(row_json(v.to_dict())))
    else:
        from rich.table import Table

        n = verdicts[0].bits
        what = "triggers" if isinstance(k, nnmark.TriggerKey) else "bits"
        t = Table(title=f"nnmark verify — key {k.key_id}, {n} {what}, alpha {alpha:g}")
        t.add_column("checkpoint", overflow="fold")
        t.add_column("verified")
        for col in ("matches", "BER", "p-value"):
            t.add_column(col, justify="right")
        t.add_column("status")
        problems = []
        for p, v in zip(checkpoints, verdicts):
            ok = v.status == "ok"
            mark = "[green]yes[/green]" if v.verified else ("no" if ok else "[red]—[/red]")
            t.add_row(markup_safe(p), mark, f"{v.matches}/{v.bits}" if ok else "—", f"{v.ber:.3f}" if ok else "—",
                      _fmt_p(v.p_value), v.status if ok else f"[red]{v.status}[/red]")
            if not ok:
                problems.append(f"{inert_line(p)}: {v.status} ({inert_line(v.error_class)}): {inert_line(v.detail)}")
        con = _console()
        con.print(t)
        for line in problems:
            con.print(line, markup=False)
        n_ok = sum(v.verified for v in verdicts)
        v0 = verdicts[0]
        stamped = [v for v in verdicts if v.commitment_matches is not None]
        if stamped:  # ownership commitments stamped into the files (nnmark stamp)
            mine = sum(bool(v.commitment_matches) for v in stamped)
            con.print(f"commitment stamps: {len(stamped)}/{len(verdicts)} checkpoints carry one, {mine} of them "
                      f"this key's commitment", markup=False)
        tested = " and each model's controls (the larger p-value counts)" if v0.controls else ""
        con.print(f"{n_ok}/{len(verdicts)} verified (threshold {v0.threshold}/{n} matching {what} under "
                  f"{v0.null}{tested}) in {elapsed:.2f} s", markup=False)
        if v0.warning:
            con.print(f"warning: {inert(v0.warning)}", markup=False, style="yellow", soft_wrap=True)
        if not isinstance(k, nnmark.TriggerKey):  # white-box: could a key search reach this verdict?
            from .stats import forge_warning

            forged = forge_warning(n, alpha, threshold=v0.threshold)
            if forged:
                con.print(f"warning: {inert(forged)}", markup=False, style="yellow", soft_wrap=True)
    if any(v.status != "ok" for v in verdicts):
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_OK if all(v.verified for v in verdicts) else EXIT_FINDINGS)


@cli.command()
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("null_checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--alpha", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--arch", default=None, metavar="MODULE:FACTORY", help="Trigger and DeepSigns keys: the model factory.")
@click.option("--null-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="The nominal chance rate to compare with (default 1/2 per bit, 1/classes per trigger).")
@click.option("--device", default=None, help="Where carriers are projected / models run, e.g. cuda (default: cpu).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the calibration here (JSON, no secret in it) for `verify/scan --calibration`.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def calibrate(key, null_checkpoints, alpha, arch, null_rate, device, output, as_json):
    """Measure KEY's match counts on independent unmarked NULL_CHECKPOINTS (at least 10)
    and fit their null: a beta-binomial, whose p-values `verify --calibration` uses.

    Also reports the nominal null's threshold and how many null models reach it (its
    empirical false-positive rate). Exit 0 written, 2 a key, a model or the output could
    not be used, 4 usage error.
    """
    import nnmark

    try:
        k = _load_keys([key])[0]
        cal = nnmark.calibrate(k, [str(p) for p in null_checkpoints], alpha=alpha, arch=arch, null_rate=null_rate,
                               device=device)
        if output is not None:
            cal.save(output)
    except (nnmark.KeyFileError, ValueError, OSError) as exc:
        _error(exc)
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(cal.to_dict()))
        return
    con = _console()
    what = "triggers" if isinstance(k, nnmark.TriggerKey) else "bits"
    con.print(f"{cal.n_models} null models, {cal.n} {what}: mean match rate {cal.null_rate:.4f} (max "
              f"{cal.max_rate:.4f}; nominal chance {cal.null_rate_used:.4f}); fitted null {cal.describe()}, "
              f"dispersion {cal.dispersion:.3g} (0: binomial)", markup=False, soft_wrap=True)
    con.print(f"at alpha {alpha:g}: calibrated threshold {cal.threshold}/{cal.n}; nominal threshold "
              f"{cal.nominal_threshold}/{cal.n}, reached by {cal.false_positives} of the null models (empirical FPR "
              f"{cal.false_positive_rate:.4g})", markup=False, soft_wrap=True)
    extra = cal.extrapolation(alpha)
    if extra:
        con.print(f"note: {extra}", markup=False, style="yellow", soft_wrap=True)
    if output is not None:
        con.print(f"wrote {inert_line(output)}: verify with --calibration {inert_line(output)}", markup=False)


def _load_data(spec: str, seed: int):
    """``digits`` (the bundled split) or a safetensors file with x_test, y_test (x_train, y_train optional)."""
    if spec == "digits":
        from .demo import load_digits_split

        d = load_digits_split(seed)
        return (d.x_train, d.y_train), (d.x_test, d.y_test)
    path = Path(spec)
    if not path.is_file():
        raise click.BadParameter(f"{spec!r} is neither 'digits' nor an existing safetensors file", param_hint="--data")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as exc:  # not safetensors, truncated, bad header
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"--data {spec!r} is not a readable safetensors file: {why}") from None
    if "x_test" not in tensors or "y_test" not in tensors:
        raise ValueError(f"--data {spec!r} must hold tensors x_test and y_test (and x_train, y_train for the "
                         f"training attacks); it has {sorted(tensors) or 'none of them'}")
    if ("x_train" in tensors) != ("y_train" in tensors):
        raise ValueError(f"--data {spec!r}: x_train and y_train come together; it has only one of them")
    train = (tensors["x_train"], tensors["y_train"]) if "x_train" in tensors else None
    return train, (tensors["x_test"], tensors["y_test"])


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--arch", required=True, metavar="MODULE:FACTORY",
              help="The function that builds the model the checkpoint is loaded into (e.g. nnmark.demo:DigitsNet).")
@click.option("--key", "keys", required=True, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A key file (white-box or trigger); repeat for several marks.")
@click.option("--data", "data_spec", required=True, metavar="DATA",
              help="'digits' (the bundled scikit-learn digits split) or a safetensors file with x_test, y_test "
                   "(clean accuracy) and x_train, y_train (the attacker's data for the training attacks).")
@click.option("--attack", "attack_specs", multiple=True, metavar="NAME[:S1,S2,...]",
              help="An attack and its strengths; repeat for several (default: the full grid). Names: "
                   "prune_global, prune_layer, fine_prune, ftal, ftll, rtll, rtal, overwrite, quantize, noise, "
                   "permute, permute+realign (white-box: the attacker holds the weights); distill, distill_probs "
                   "(query budget), evasion (false-alarm rate) (black-box: the attacker only queries the model; "
                   "not in the full grid).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Write robustness.json and one PNG per attack here.")
@click.option("--alpha", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seeds every attack (and the digits split).")
@click.option("--device", default=None, help="Run the attacks there, e.g. cuda (default: where the model is built).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as one JSON object.")
def robustness(checkpoint, arch, keys, data_spec, attack_specs, out_dir, alpha, seed, device, as_json):
    """Attack CHECKPOINT with a grid of attacks × strengths and verify every mark after each.

    Each attack runs on a fresh copy of the model; the table shows, per attack and
    strength, whether each mark still verifies (p-value, BER or trigger hits) and the
    attacked model's clean accuracy. The checkpoint is read safely (safetensors or
    torch.load(weights_only=True)). Exit 0 when every mark verifies on the unattacked
    model, 1 when one does not, 2 on an unreadable key, checkpoint or data file,
    4 on a bad command line (unknown attack, bad strength).
    """
    import torch

    import nnmark

    from .checkpoints import open_checkpoint
    from .inference import align_state_dict, load_factory
    from .robustness import normalise_grid, parse_attack, robustness_report

    grid = None
    if attack_specs:
        try:
            grid = [parse_attack(s) for s in attack_specs]
            normalise_grid(grid)  # repeated names, empty lists: before any work is done
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--attack") from None
    con_err = _console(stderr=True)

    def err(msg: str) -> None:  # one unwrapped line, so paths and messages stay whole
        con_err.print(f"[red]error:[/red] {markup_safe(msg)}", soft_wrap=True)

    try:
        marks = _load_keys(keys)
    except nnmark.KeyFileError as exc:
        err(str(exc))
        sys.exit(EXIT_ERROR)
    try:
        train, test = _load_data(data_spec, seed)
        model = load_factory(arch)()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--arch {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
        expected = list(model.state_dict().keys())
        with open_checkpoint(checkpoint) as ck:
            sd = align_state_dict(ck.state_dict(), expected)
        model.load_state_dict(sd, strict=False)  # align_state_dict checked every required tensor is there
        model.eval()
    except nnmark.CheckpointError as exc:
        err(f"{checkpoint}: {exc.status} ({exc.error_class}): {exc}")
        sys.exit(EXIT_ERROR)
    except (ValueError, TypeError, RuntimeError) as exc:  # bad --arch, bad data file, shapes that do not fit
        err(str(exc).splitlines()[0])
        sys.exit(EXIT_ERROR)
    try:
        report = robustness_report(model, marks, train=train, test=test, attacks=grid, out_dir=out_dir, alpha=alpha,
                                   seed=seed, device=device, progress=True)
    except (ValueError, TypeError) as exc:  # e.g. data that does not fit the model
        err(str(exc))
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        con = _console()
        con.print(report.table(title=f"nnmark robustness — {markup_safe(checkpoint.name)}, alpha {alpha:g}, seed {seed}"))
        for line in report.notes():
            con.print(line, markup=False, soft_wrap=True)
        dist = report.distribution_table()
        con.print(dist)
        for line in dist.notes():
            con.print(line, markup=False, soft_wrap=True)
        if out_dir is not None:
            con.print(f"report: {inert_line(report.json_path)} and {len(report.plots)} plots in {inert_line(out_dir)}/",
                      markup=False)
    base = report.baseline["marks"]
    sys.exit(EXIT_OK if all(m["verified"] for m in base.values()) else EXIT_FINDINGS)


@cli.command()
@click.option("--out", "out_dir", default="nnmark-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the key, the models and demo.json.")
@click.option("--unmarked", default=10, show_default=True, type=click.IntRange(1), help="Independently trained unmarked models to check (the null), besides the twin.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--bits", default=64, show_default=True, type=click.IntRange(20))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--robustness/--no-robustness", default=True, show_default=True,
              help="Then attack the marked model (pruning, fine-pruning, FTAL, overwriting, quantization, "
                   "permutation with and without realignment, model extraction, evasion) and write the report "
                   "to OUT/robustness/.")
@click.option("--full-grid", is_flag=True,
              help="Attack with every attack at its default strengths and extraction at more query budgets "
                   "(several minutes) instead of the demo's small grid.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def demo(out_dir, unmarked, epochs, bits, seed, robustness, full_grid, as_json):
    """End-to-end demo on scikit-learn's bundled digits: embed four marks (Uchida, DeepSigns,
    abstract triggers, frontier stitching), verify marked and unmarked models, then attack the
    marked one (the robustness report and its distribution table)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .demo import jsonable, run_demo

    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_console(stderr=True), transient=True, disable=as_json) as prog:
        task = prog.add_task("starting", total=None)
        res = run_demo(out_dir, unmarked=unmarked, epochs=epochs, bits=bits, seed=seed,
                       robustness=("full" if full_grid else True) if robustness else False,
                       progress=lambda m: prog.update(task, description=m))
    elapsed = time.perf_counter() - start
    ok = res["ok"]
    if as_json:
        click.echo(json.dumps(jsonable({**res, "seconds": elapsed, "ok": ok})))
        sys.exit(EXIT_OK if ok else EXIT_FINDINGS)
    from rich import box
    from rich.table import Table

    con = _console()
    t = Table(title=f"nnmark demo — digits CNN with four marks: Uchida ({bits} bits in {res['carrier']}), "
                    f"DeepSigns ({bits} bits in {res['deepsigns_layer']}'s activations), {res['triggers']} abstract "
                    f"triggers, {res['frontier']} frontier-stitching triggers")
    t.box, t.pad_edge, t.collapse_padding = box.SIMPLE_HEAD, False, True  # fits 80 columns

    def cell(matches, p):
        return f"{matches} " + ("—" if p is None else "0" if p == 0 else f"{p:.0e}")

    r0 = res["rows"][0]
    for col in ("model", "acc.", f"Uchida /{bits}", f"DeepSigns /{bits}", f"triggers /{r0['trigger_n']}",
                f"frontier /{res['frontier']}", "verified"):
        t.add_column(col, justify="left" if col in ("model", "marks") else "right", no_wrap=True)
    for r in res["rows"]:
        names = [n for n, k in (("U", "verified"), ("D", "deepsigns_verified"), ("T", "trigger_verified"),
                                ("F", "frontier_verified")) if r.get(k)]
        front = ("—" if "frontier_matches" not in r else
                 cell(f"{r['frontier_matches']}/{r['frontier_held_back']}", r["frontier_p_value"]))
        t.add_row(r["model"], f"{100 * r['accuracy']:.1f}", cell(r["matches"], r["p_value"]),
                  cell(r["deepsigns_matches"], r["deepsigns_p_value"]), cell(r["trigger_matches"], r["trigger_p_value"]),
                  front, f"[green]{' '.join(names)}[/green]" if names else "no")
    con.print(t)
    con.print("cells: matches and p-value (frontier: triggers/held-back answered right); marks verified: U Uchida, "
              "D DeepSigns, T triggers, F frontier. "
              f"p <= {res['alpha']:g} verifies. Uchida and DeepSigns: exact binomial over the bits, "
              f"{r0['threshold']}/{bits} and {r0['deepsigns_threshold']}/{bits} needed; abstract triggers: exact "
              f"binomial at 1/10, {r0['trigger_threshold']}/{r0['trigger_n']} needed; frontier: Fisher's exact "
              f"test of the {res['frontier']} triggers against as many held-back adversaries")
    marks = [("Uchida", ""), ("DeepSigns", "deepsigns_"), ("triggers", "trigger_"), ("frontier", "frontier_")]
    con.print("marked model: " + ", ".join(f"{n} {'VERIFIED' if res[f'marked_{k}verified'] else 'NOT verified'}"
                                           for n, k in marks if res[f"marked_{k}verified"] is not None)
              + "; unmarked models verified: " + ", ".join(f"{res[f'unmarked_{k}verified']}/{res['unmarked_total']} "
                                                           f"{n}" for n, k in marks)
              + f"; accuracy cost of the marks: {100 * res['accuracy_drop']:+.1f} points")
    if "robustness" in res:
        from .robustness import RobustnessReport

        rep = RobustnessReport.from_dict(res["robustness"])
        con.print(rep.table(title=f"robustness of the marked model — attacks on copies, alpha {res['alpha']:g}"))
        for line in rep.notes():
            con.print(line, markup=False, soft_wrap=True)
        dist = rep.distribution_table()
        con.print(dist)
        for line in dist.notes():
            con.print(line, markup=False, soft_wrap=True)
        con.print(f"robustness report: {out_dir}/robustness/robustness.json and {len(rep.plots)} plots "
                  f"(p-value, BER and accuracy against attack strength; distribution.png: the table above)")
    con.print(f"keys, models and demo.json in {out_dir}/ — try: nnmark verify {out_dir}/owner.key {out_dir}/*.safetensors"
              f"  or  nnmark verify {out_dir}/frontier.key {out_dir}/*.safetensors --arch nnmark.demo:DigitsNet")
    con.print(f"done in {elapsed:.1f} s")
    sys.exit(EXIT_OK if ok else EXIT_FINDINGS)


def main(argv=None):
    """Entry point: click's usage errors exit with 4 (not click's default 2)."""
    import warnings

    # torch's own advice while it reads a suspect file ("Detected pickle protocol 4", "sparse
    # CSR is in beta") is about the file, not for the user: each file's row says what matters.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
    try:
        rv = cli.main(args=argv, prog_name="nnmark", standalone_mode=False)
    except click.exceptions.UsageError as exc:  # includes BadParameter, NoSuchOption
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - a crash must not exit 1 ("checked, not marked")
        import traceback

        click.echo(inert(traceback.format_exc()), err=True, nl=False)
        click.echo(inert_line(f"error: nnmark failed unexpectedly: {type(exc).__name__}: {exc}"), err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


from .cli_scan import register as _register_scan  # noqa: E402 - scan, ledger, manifest (issue 5)
from .cli_claims import register as _register_claims  # noqa: E402 - commit, stamp, certify, check (issue 14)
_register_scan(cli)
_register_claims(cli)


if __name__ == "__main__":
    main()
