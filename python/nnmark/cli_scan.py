"""``nnmark scan``, ``nnmark ledger export`` and ``nnmark manifest``.

Registered on the main ``nnmark`` group by :func:`register` (called at the
bottom of :mod:`nnmark.cli`). This module does not import :mod:`nnmark.cli`,
so ``python -m nnmark.cli`` and the ``nnmark`` script see the same commands.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .scan import EXIT_ERROR, EXIT_FINDINGS, EXIT_NO_FILES, EXIT_OK  # noqa: F401 - documented below
from .stats import STATUSES

EXIT_USAGE = 4
_SHOWN_PROBLEMS = 20


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


@click.command("scan")
@click.argument("paths", nargs=-1, required=True)
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A key file (white-box or trigger); repeat for several keys. One row per (file, key).")
@click.option("--ledger", "ledger", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite ledger of results (created if missing; a re-run skips unchanged files). "
                   "Default: $NNMARK_LEDGER, else ./nnmark-ledger.sqlite.")
@click.option("--alpha", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Significance level: verified iff p_value <= alpha.")
@click.option("--arch", default=None, metavar="MODULE:FACTORY",
              help="Trigger keys: the function that builds the model (e.g. mypkg.models:resnet18 or file.py:make).")
@click.option("--device", default=None, help="Where carriers are projected and trigger models run, e.g. cuda.")
@click.option("--workers", default=None, type=click.IntRange(1), help="Loader threads (default: CPU count, 2 to 8).")
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Files per batch: one native call per key and carrier shape, one ledger transaction "
                   "(default 256; with --ray, files per Ray task, default 100).")
@click.option("--json", "as_json", is_flag=True,
              help="Stream one JSON object per (file, key) on stdout, the row `nnmark verify --json` prints "
                   "(the summary then goes to stderr).")
@click.option("--manifest", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file from `nnmark manifest`: read and hash every file whole (none skipped) and flag "
                   "those that changed.")
@click.option("--rescan", is_flag=True, help="Check every file again, even those the ledger has unchanged.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files whose name or path matches; repeatable.")
@click.option("--null-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Chance match rate under the null (default 1/2 per bit, 1/classes per trigger).")
@click.option("--calibration", "calibrations", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A calibration from `nnmark calibrate -o` of one of the keys (matched by key_id); repeatable.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Run the scan as Ray tasks (pip install \"nnmark[ray]\"): 'auto' joins the running cluster "
                   "(RAY_ADDRESS or `ray start`), else starts Ray here; or a cluster address such as "
                   "ray://head:10001. Workers read the checkpoints and the key files at these same paths; "
                   "rows land in this ledger.")
def scan_cmd(paths, keys, ledger, alpha, arch, device, workers, batch_size, as_json, manifest, rescan, exclude,
             null_rate, calibrations, no_progress, ray_address):
    """Verify KEYs in every checkpoint under PATHS (files, folders recursively, globs).

    Formats are sniffed from their first bytes: safetensors (only the carrier's
    bytes are read), Hugging Face sharded checkpoints (only the shard holding the
    carrier), torch zip and legacy files (torch.load(weights_only=True); Lightning
    .ckpt included). Nothing in a checkpoint is ever executed. Every (file, key)
    gets one row in the ledger, with status ok, absent, corrupt, unsafe,
    unsupported, io_error, invalid or error; a bad file never stops the scan.
    With --ray the same scan runs as Ray tasks on a cluster that sees the same
    paths (checkpoints and key files), and its rows land in the same ledger.

    \b
    Exit codes (modelscan's convention):
      0  every checkpoint carries every key's mark
      1  the checks ran; some checkpoint does not carry a mark
         (or differs from --manifest)
      2  some checkpoint could not be checked (a status other than ok),
         or a key / the ledger / the manifest / the Ray cluster could not be used
      3  no files found under PATHS
      4  usage error (bad command line)
    """
    import nnmark

    from .ledger import default_ledger_path

    err = _console(stderr=True)
    try:
        from .keys import load_keys_for_cli  # a permission warning: one "warning:" line on stderr

        loaded = load_keys_for_cli(keys, lambda line: click.echo(line, err=True))
    except nnmark.KeyFileError as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    if any(isinstance(k, nnmark.TriggerKey) for k in loaded) and arch is None:
        raise click.UsageError("a trigger key runs the model: pass --arch MODULE:FACTORY")
    ledger_path = ledger if ledger is not None else default_ledger_path()
    out = sys.stdout if as_json else None
    # Ray workers read the key files themselves: keys never travel, their paths do.
    scan_keys = [str(k) for k in keys] if ray_address is not None else loaded
    try:
        res = nnmark.scan(scan_keys, [str(p) for p in paths], ledger=ledger_path, alpha=alpha, arch=arch,
                          device=device, workers=workers, batch_size=batch_size, json_out=out,
                          progress=not no_progress, manifest=manifest, rescan=rescan, null_rate=null_rate,
                          exclude=exclude, keep_rows=False, ray=ray_address,
                          calibration=[str(c) for c in calibrations] or None)
    except (ValueError, ImportError, ConnectionError) as exc:
        # a ledger of another schema, a malformed manifest, an --arch that fails to import,
        # --ray without ray installed or without a cluster at the address
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    _summary(res, loaded, _console(stderr=as_json))
    sys.exit(res.exit_code)


def _summary(res, keys, con) -> None:
    from rich.table import Table

    s = res.summary
    if s["files"] == 0:
        con.print("no files found under the given paths", markup=False, soft_wrap=True)
        return
    t = Table(title=f"nnmark scan — {s['files']} files, alpha {s['alpha']:g}")
    for col in ("key", "verified", "not verified", "errors"):
        t.add_column(col, justify="left" if col == "key" else "right")
    for kid, c in s["per_key"].items():
        t.add_row(kid, f"[green]{c['verified']}[/green]", str(c["not_verified"]),
                  f"[red]{c['errors']}[/red]" if c["errors"] else "0")
    con.print(t)
    counts = ", ".join(f"{st} {s['status'][st]}" for st in STATUSES if s["status"].get(st))
    changed = s["changed"]
    if changed:
        counts += f"; {changed} file{'s' if changed > 1 else ''} changed against the manifest"
    con.print(f"rows by status: {counts}", markup=False, soft_wrap=True)
    for r in res.problems[:_SHOWN_PROBLEMS]:
        con.print(f"{r['path']}: {r['status']} ({r['error_class']}): {r['error_message']}", markup=False, soft_wrap=True)
    more = s["errors"] - min(len(res.problems), _SHOWN_PROBLEMS)
    if more > 0:
        con.print(f"... and {more} more: nnmark ledger export --status STATUS", markup=False, soft_wrap=True)
    for kid, text in s.get("warnings", {}).items():
        con.print(f"warning (key {kid}): {text}", markup=False, style="yellow", soft_wrap=True)
    rate = f"{s['files_per_s']:,.0f} files/s, {s['mb_per_s']:,.1f} MB/s" if s["scanned"] else "nothing new to read"
    con.print(f"scanned {s['scanned']} files, skipped {s['skipped']} unchanged (ledger), read {_mb(s['bytes_read'])} "
              f"in {s['seconds']:.2f} s ({rate}); ledger: {s['ledger']}", markup=False, soft_wrap=True)


@click.group("ledger")
def ledger_group():
    """Work with a scan ledger (the SQLite file `nnmark scan` writes)."""


@ledger_group.command("export")
@click.argument("ledger_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ledger", "ledger", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Ledger file (default: $NNMARK_LEDGER, else ./nnmark-ledger.sqlite).")
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Output file, or - for stdout.")
@click.option("--format", "fmt", default=None, type=click.Choice(["jsonl", "csv"]),
              help="Default: csv for a .csv output file, else JSON Lines.")
@click.option("--status", default=None, type=click.Choice(list(STATUSES)), help="Only rows with this status.")
def ledger_export(ledger_file, ledger, output, fmt, status):
    """Export every ledger row as JSON Lines (one object per row) or CSV (one header line).

    The ledger is LEDGER_FILE, or --ledger (the same thing), else the default.
    Exit codes: 0 exported, 2 the ledger is missing or not an nnmark ledger, 4 usage error.
    """
    from .ledger import default_ledger_path, export_ledger

    if ledger_file is not None and ledger is not None and ledger_file != ledger:
        raise click.UsageError(f"two ledgers given: {str(ledger_file)!r} and --ledger {str(ledger)!r}")
    path = ledger_file or ledger or default_ledger_path()
    try:
        if output == "-":
            n = export_ledger(path, sys.stdout, fmt or "jsonl", status)
        else:
            n = export_ledger(path, output, fmt, status)
    except (ValueError, OSError) as exc:
        _console(stderr=True).print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    if output != "-":
        _console(stderr=True).print(f"wrote {n} rows to {output}", markup=False, soft_wrap=True)


@click.command("manifest")
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Manifest file to write, or - for stdout.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files whose name or path matches; repeatable.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def manifest_cmd(paths, output, exclude, no_progress):
    """Write the whole-file sha256 of every file under PATHS (sha256sum format).

    Neither safetensors nor torch files checksum their data; this reads every
    byte, on purpose, so that `nnmark scan --manifest FILE` (or `sha256sum -c`)
    can flag files that changed since. Shards of sharded checkpoints are listed
    one by one. Exit codes: 0 written, 2 some file could not be read (it is left
    out, with a warning), 3 no files found, 4 usage error.
    """
    from .scan import write_manifest

    err = _console(stderr=True)
    bar = None
    if not no_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("manifest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err)
        bar.start()
        task = bar.add_task("manifest", total=None)

    def tick(done, total):
        bar.update(task, completed=done, total=total)

    try:
        target = sys.stdout if output == "-" else output
        n, failed = write_manifest([str(p) for p in paths], target, exclude=exclude, progress=tick if bar else None)
    except OSError as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    finally:
        if bar is not None:
            bar.stop()
    if n == 0 and not failed:
        err.print("no files found under the given paths", markup=False, soft_wrap=True)
        sys.exit(EXIT_NO_FILES)
    if output != "-":
        err.print(f"wrote {n} sha256 lines to {output}", markup=False, soft_wrap=True)
    if failed:
        sys.exit(EXIT_ERROR)


def register(group: click.Group) -> None:
    """Adds ``scan``, ``ledger`` and ``manifest`` to the ``nnmark`` command group."""
    group.add_command(scan_cmd)
    group.add_command(ledger_group)
    group.add_command(manifest_cmd)


__all__ = ["register", "scan_cmd", "ledger_group", "manifest_cmd"]
