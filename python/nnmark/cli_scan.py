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
from ._display import inert, inert_line
from .stats import STATUSES

EXIT_USAGE = 4
_SHOWN_PROBLEMS = 20


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


# What each reason a walk leaves a path out means, and what to do about it.
_LEFT_OUT = {
    "hidden": ("hidden (a name starting with '.')", "--include-hidden checks them"),
    "unlisted_folder": ("folders that could not be listed", "check their permissions"),
    "loop": ("links that loop back into a folder they are in", "not followed"),
    "outside": ("links to targets outside the folder given", "not followed; name a target itself to check it"),
    "too_long": ("paths longer than the system allows", "scan a folder nearer them"),
    "duplicate": ("files or folders reached again through another path", "a link or a hard link: each checked "
                  "once, under its first path"),
    "excluded": ("matched --exclude", None),
}
_SHOWN_LEFT_OUT = 3


def _short(name: str, keep: int = 80) -> str:
    """A name of at most about 2 * keep characters: a path longer than the system allows
    would fill the screen."""
    return name if len(name) <= 2 * keep + 5 else f"{name[:keep]}[...]{name[-keep:]}"


def _left_out_lines(counts: dict, examples: dict) -> list[str]:
    """One line per reason a walk left something out: the count, a few names (inert),
    and how to include them."""
    lines = []
    for reason, n in counts.items():
        what, hint = _LEFT_OUT.get(reason, (reason, None))
        names = [_short(inert_line(p)) for p in examples.get(reason, [])[:_SHOWN_LEFT_OUT]]
        shown = ", ".join(names) + (", ..." if n > len(names) else "")
        lines.append(f"left out: {n} {what}: {shown}" + (f" ({hint})" if hint else ""))
    return lines


@click.command("scan")
@click.argument("paths", nargs=-1, required=True)
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A key file (white-box, DeepSigns or trigger); repeat for several keys. One row per (file, key).")
@click.option("--ledger", "ledger", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite ledger of results (created if missing; a re-run skips unchanged files). "
                   "Default: $NNMARK_LEDGER, else ./nnmark-ledger.sqlite.")
@click.option("--alpha", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Significance level: verified iff p_value <= alpha.")
@click.option("--arch", default=None, metavar="MODULE:FACTORY",
              help="Trigger and DeepSigns keys: the function that builds the model (e.g. mypkg.models:resnet18 "
                   "or file.py:make).")
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
@click.option("--include-hidden", is_flag=True,
              help="Check files and folders whose name starts with '.' too (by default they are left out, "
                   "and counted).")
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
             include_hidden, null_rate, calibrations, no_progress, ray_address):
    """Verify KEYs in every checkpoint under PATHS (files, folders recursively, globs).

    Formats are sniffed from their first bytes: safetensors (only the carrier's
    bytes are read), Hugging Face sharded checkpoints (only the shard holding the
    carrier), torch zip and legacy files (torch.load(weights_only=True); Lightning
    .ckpt included). Nothing in a checkpoint is ever executed. Every (file, key)
    gets one row in the ledger, with status ok, absent, corrupt, unsafe,
    unsupported, io_error, invalid or error; a bad file never stops the scan.
    With --ray the same scan runs as Ray tasks on a cluster that sees the same
    paths (checkpoints and key files), and its rows land in the same ledger.

    Every file under PATHS gets rows, or the summary says, by reason, what was
    left out: hidden names (starting with '.'; --include-hidden checks them),
    folders that could not be listed, links that loop, links inside a folder
    to targets outside the folder given (not followed; a path named here is
    followed as given), paths too long; and, without changing the exit code,
    files reached twice (checked once) and --exclude matches.

    \b
    Exit codes (modelscan's convention):
      0  every checkpoint carries every key's mark
      1  the checks ran; some checkpoint does not carry a mark
         (or differs from --manifest)
      2  some checkpoint could not be checked (a status other than ok),
         or some file or folder under PATHS was left out (hidden, unlisted,
         a loop, a link leaving the folder, a path too long),
         or a key / the ledger / the manifest / the Ray cluster could not be used
      3  no files found under PATHS (and nothing left out)
      4  usage error (bad command line)
    """
    import nnmark

    from .ledger import default_ledger_path

    err = _console(stderr=True)
    try:
        from .keys import load_keys_for_cli  # a permission warning: one "warning:" line on stderr

        loaded = load_keys_for_cli(keys, lambda line: click.echo(line, err=True))
    except nnmark.KeyFileError as exc:
        err.print(f"error: {inert(exc)}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    if any(isinstance(k, (nnmark.TriggerKey, nnmark.DeepSignsKey)) for k in loaded) and arch is None:
        raise click.UsageError("trigger and DeepSigns keys run the model: pass --arch MODULE:FACTORY")
    ledger_path = ledger if ledger is not None else default_ledger_path()
    out = sys.stdout if as_json else None
    # Ray workers read the key files themselves: keys never travel, their paths do.
    scan_keys = [str(k) for k in keys] if ray_address is not None else loaded
    try:
        res = nnmark.scan(scan_keys, [str(p) for p in paths], ledger=ledger_path, alpha=alpha, arch=arch,
                          device=device, workers=workers, batch_size=batch_size, json_out=out,
                          progress=not no_progress, manifest=manifest, rescan=rescan, null_rate=null_rate,
                          exclude=exclude, include_hidden=include_hidden, keep_rows=False, ray=ray_address,
                          calibration=[str(c) for c in calibrations] or None)
    except (ValueError, ImportError, ConnectionError) as exc:
        # a ledger of another schema, a hostile or read-only ledger, a malformed manifest, an
        # --arch that fails to import, --ray without ray installed or without a cluster there
        err.print(f"error: {inert(exc)}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    _summary(res, loaded, _console(stderr=as_json))
    if res.summary.get("fatal"):  # the ledger failed mid-scan (a full disk): the scan stopped
        err.print(f"error: {inert(res.summary['fatal'])}", markup=False, soft_wrap=True)
    sys.exit(res.exit_code)


def _summary(res, keys, con) -> None:
    from rich.table import Table

    s = res.summary
    left_out = _left_out_lines(s.get("left_out", {}), s.get("left_out_examples", {}))
    if s["files"] == 0:
        con.print("no files found under the given paths" if not left_out else "no files checked",
                  markup=False, soft_wrap=True)
        for line in left_out:
            con.print(line, markup=False, style="yellow", soft_wrap=True)
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
    for line in left_out:
        con.print(line, markup=False, style="yellow", soft_wrap=True)
    for r in res.problems[:_SHOWN_PROBLEMS]:
        con.print(f"{inert_line(r['path'])}: {r['status']} ({inert_line(r['error_class'])}): "
                  f"{inert_line(r['error_message'])}", markup=False, soft_wrap=True)
    more = s["errors"] - min(len(res.problems), _SHOWN_PROBLEMS)
    if more > 0:
        con.print(f"... and {more} more: nnmark ledger export --status STATUS", markup=False, soft_wrap=True)
    for kid, c in s["per_key"].items():  # ownership commitments stamped into the files (nnmark stamp)
        if c.get("stamped"):
            con.print(f"commitment stamps (key {kid}): {c['stamped']} files carry one, {c['stamp_matches']} of them "
                      f"this key's commitment", markup=False, soft_wrap=True)
    for kid, text in s.get("warnings", {}).items():
        con.print(f"warning (key {kid}): {inert(text)}", markup=False, style="yellow", soft_wrap=True)
    rate = f"{s['files_per_s']:,.0f} files/s, {s['mb_per_s']:,.1f} MB/s" if s["scanned"] else "nothing new to read"
    con.print(f"scanned {s['scanned']} files, skipped {s['skipped']} unchanged (ledger), read {_mb(s['bytes_read'])} "
              f"in {s['seconds']:.2f} s ({rate}); ledger: {inert_line(s['ledger'])}", markup=False, soft_wrap=True)


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
    The ledger is opened read-only. Rows are exported as the file holds them: their
    ``mac`` column lets a scan with the key tell whether one was edited.
    Exit codes: 0 exported, 2 the ledger is missing, unreadable or not an nnmark ledger,
    4 usage error.
    """
    import sqlite3

    from .ledger import default_ledger_path, export_ledger

    if ledger_file is not None and ledger is not None and ledger_file != ledger:
        raise click.UsageError(f"two ledgers given: {str(ledger_file)!r} and --ledger {str(ledger)!r}")
    path = ledger_file or ledger or default_ledger_path()
    try:
        if output == "-":
            n = export_ledger(path, sys.stdout, fmt or "jsonl", status)
        else:
            n = export_ledger(path, output, fmt, status)
    except (ValueError, OSError, sqlite3.Error) as exc:
        _console(stderr=True).print(f"error: {inert(exc)}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    if output != "-":
        _console(stderr=True).print(f"wrote {n} rows to {inert_line(output)}", markup=False, soft_wrap=True)


@click.command("manifest")
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Manifest file to write, or - for stdout.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files whose name or path matches; repeatable.")
@click.option("--include-hidden", is_flag=True,
              help="List files and folders whose name starts with '.' too (by default they are left out, "
                   "and counted).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def manifest_cmd(paths, output, exclude, include_hidden, no_progress):
    """Write the whole-file sha256 of every file under PATHS (sha256sum format).

    Neither safetensors nor torch files checksum their data; this reads every
    byte, on purpose, so that `nnmark scan --manifest FILE` (or `sha256sum -c`)
    can flag files that changed since. Shards of sharded checkpoints are listed
    one by one. Files are walked as `nnmark scan` walks them; names are written
    as their bytes, as sha256sum does. Exit codes: 0 written, 2 some file could
    not be read (it is left out, with a warning) or something under PATHS was
    left out (hidden, unlisted, a loop, a link leaving the folder, a path too
    long: each reason is said, with a count), 3 no files found, 4 usage error.
    """
    from .scan import walk_paths, write_manifest

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
        expansion = walk_paths(list(paths), exclude, include_hidden)
        n, failed = write_manifest(expansion, target, progress=tick if bar else None)
    except OSError as exc:
        err.print(f"error: {inert(exc)}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    finally:
        if bar is not None:
            bar.stop()
    for line in _left_out_lines(expansion.counts(), expansion.examples()):
        err.print(line, markup=False, style="yellow", soft_wrap=True)
    if n == 0 and not failed and not expansion.not_checked:
        err.print("no files found under the given paths", markup=False, soft_wrap=True)
        sys.exit(EXIT_NO_FILES)
    if output != "-":
        err.print(f"wrote {n} sha256 lines to {inert_line(output)}", markup=False, soft_wrap=True)
    if failed or expansion.not_checked:
        sys.exit(EXIT_ERROR)


def register(group: click.Group) -> None:
    """Adds ``scan``, ``ledger`` and ``manifest`` to the ``nnmark`` command group."""
    group.add_command(scan_cmd)
    group.add_command(ledger_group)
    group.add_command(manifest_cmd)


__all__ = ["register", "scan_cmd", "ledger_group", "manifest_cmd"]
