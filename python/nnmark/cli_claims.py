"""``nnmark commit``, ``nnmark stamp``, ``nnmark certify`` and ``nnmark check``: ownership
claims (:mod:`nnmark.claims`, docs/spec.md §8).

Registered on the main ``nnmark`` group by :func:`register` (called at the bottom of
:mod:`nnmark.cli`); this module does not import :mod:`nnmark.cli`.

Exit codes: 0 done (``check``: the claim holds); 1 the claim does not hold (``certify``:
the key does not match the commitment, or the mark does not verify: nothing written);
2 error (a key, commitment, certificate or checkpoint that cannot be used); 4 usage.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._display import inert, inert_line

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 4


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _say(text: str, stderr: bool = False, style: str | None = None) -> None:
    _console(stderr).print(inert(text), markup=False, soft_wrap=True, style=style)


def _fail(text: str, code: int = EXIT_ERROR):
    _say(f"error: {text}", stderr=True)
    sys.exit(code)


def _load_key(path: Path):
    from .keys import KeyFileError, load_keys_for_cli

    try:
        return load_keys_for_cli([path], lambda line: click.echo(line, err=True))[0]
    except KeyFileError as exc:
        _fail(str(exc))


def _refuse_overwrite(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise click.UsageError(f"{inert_line(path)} exists; pass --force to overwrite it")


@click.command("commit")
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Commitment file to write (JSON; nothing secret in it: publish it).")
@click.option("--statement", default=None, help="An owner statement to publish with it, e.g. 'ACME Corp, model v3'.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def commit_cmd(key, output, statement, force):
    """Commit to KEY before you release a model: write a public commitment.

    The commitment is the SHA-256 of the key's canonical bytes (its secret included, so
    it reveals nothing about the bits) with a creation time and your statement (both
    bound by the hash), and states the key's kind, carrier and number of bits. Publish
    it before the release -- stamp it into the released model (nnmark stamp), post it,
    have it timestamped: its `created` time is your own word and proves nothing; where
    and when you published it does.
    """
    from .commitments import ClaimError, commit

    _refuse_overwrite(output, force)
    k = _load_key(key)
    try:
        c = commit(k, statement=statement)
        c.save(output)
    except (ClaimError, ValueError, OSError) as exc:
        _fail(str(exc))
    _say(f"wrote {output}: {c.describe()}. Publish it before you release the model, e.g. "
         f"nnmark stamp MODEL.safetensors {output}")


@click.command("stamp")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("commitment", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the stamped model here (default: MODEL itself, replaced).")
@click.option("--force", is_flag=True, help="Replace a stamp of another commitment.")
def stamp_cmd(model, commitment, output, force):
    """Write COMMITMENT into MODEL's safetensors metadata (entry nnmark.commitment).

    Only the header changes: every tensor keeps its bytes. `nnmark scan` and
    `nnmark verify` then report the stamp (commitment_id, commitment_matches).
    """
    from .commitments import ClaimError, load_commitment, stamp

    if output is not None:
        _refuse_overwrite(output, False)
    try:
        c = load_commitment(commitment)
        out = stamp(model, c, output=output, force=force)
    except ClaimError as exc:
        _fail(str(exc))
    _say(f"stamped {out} with {c.describe()}")


@click.command("certify")
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--commitment", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The commitment to KEY you published before the suspect model existed.")
@click.option("--calibration", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A calibration of KEY (nnmark calibrate -o): the null of the verdict, included whole.")
@click.option("--alpha", default=1e-6, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Significance level of the verdict.")
@click.option("--null-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Chance match rate under the null (default 1/2 per bit, 1/classes per trigger).")
@click.option("--arch", default=None, metavar="MODULE:FACTORY",
              help="Trigger keys: the function that builds the model (recorded: a verifier passes the same).")
@click.option("--device", default=None, help="Where carriers are projected / models run, e.g. cuda.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Certificate to write (mode 0600: it reveals KEY).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def certify_cmd(key, checkpoint, commitment, calibration, alpha, null_rate, arch, device, output, force):
    """Certify KEY's mark in CHECKPOINT for a third party (on a dispute).

    The certificate holds the checkpoint's whole-file sha256, the commitment, the
    verdict (matches, bits, p-value, alpha, the null) and KEY itself: it is revealed
    for the check, so whoever holds the certificate can verify and remove the mark.
    Anyone checks it with `nnmark check CERTIFICATE CHECKPOINT --commitment C`.
    Exit 0 written (the mark verifies), 1 KEY does not match the commitment or the
    mark does not verify (nothing written), 2 error, 4 usage.
    """
    from .calibration import CalibrationError
    from .claims import certify
    from .commitments import ClaimError, load_commitment

    _refuse_overwrite(output, force)
    if calibration is not None and null_rate is not None:
        raise click.UsageError("--calibration and --null-rate both set the null: give one")
    k = _load_key(key)
    if k.file_kind == "trigger" and arch is None:
        raise click.UsageError("a trigger key runs the model: pass --arch MODULE:FACTORY")
    if k.file_kind != "trigger" and arch is not None:
        raise click.UsageError("--arch is for trigger keys; a white-box key reads the carrier's weights")
    try:
        com = load_commitment(commitment)
    except ClaimError as exc:
        _fail(str(exc))
    if not com.matches(k):
        _fail(f"{key} does not match {com.describe()}: certify with the key that was committed to "
              f"(nothing written)", EXIT_FINDINGS)
    try:
        cert = certify(k, checkpoint, com, alpha=alpha, null_rate=null_rate, calibration=calibration, arch=arch,
                       device=device)
    except (ClaimError, CalibrationError, ValueError, OSError) as exc:
        _fail(str(exc))
    v = cert.verdict
    what = f"{v['matches']}/{v['bits']} {'triggers' if k.file_kind == 'trigger' else 'bits'}"
    if not v["verified"]:
        _fail(f"the mark of {key} does not verify in {checkpoint} ({what}, p-value {v['p_value']:.3g} > alpha "
              f"{v['alpha']:g}): nothing to certify (nothing written)", EXIT_FINDINGS)
    try:
        cert.save(output)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}")
    _say(f"wrote {output}: {checkpoint} carries the mark of key {k.key_id} ({what}, p-value {v['p_value']:.3g} <= "
         f"alpha {v['alpha']:g}, {v['null']}), {com.describe()}. It reveals the key: give it only to whoever "
         f"settles the claim; they run: nnmark check {output} {checkpoint.name} --commitment {commitment.name}")


@click.command("check")
@click.argument("certificate", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--commitment", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The commitment you trust, e.g. the one the owner published before the dispute: the "
                   "certificate's must be it.")
@click.option("--arch", default=None, metavar="MODULE:FACTORY",
              help="Trigger keys: the model factory the certificate names (never imported from the certificate).")
@click.option("--device", default=None, help="Where carriers are projected / models run, e.g. cuda.")
@click.option("--any-version", is_flag=True,
              help="Accept a certificate made by another nnmark version: this one re-derives the verdict (noted).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_cmd(certificate, checkpoint, commitment, arch, device, any_version, as_json):
    """Check an ownership CERTIFICATE against CHECKPOINT: re-derive all of it.

    The revealed key, with the commitment's created time, statement and spec, must hash
    to the certificate's commitment (and that must be --commitment, when given),
    CHECKPOINT must have the certificate's size and sha256, the mark must verify, and
    every verdict field must come out as the certificate says. The certificate must have
    been made by this nnmark version, unless --any-version. Each field that does not
    hold is named. A commitment stamped into CHECKPOINT is reported. Exit 0 the claim
    holds, 1 it does not, 2 the certificate, commitment or checkpoint cannot be used
    (malformed, unreadable), 4 usage.
    """
    from .claims import check_claim, load_certificate
    from .commitments import ClaimError, load_commitment

    try:
        cert = load_certificate(certificate)
        trusted = load_commitment(commitment) if commitment is not None else None
    except ClaimError as exc:
        _fail(str(exc))
    trigger = cert.revealed_key.get("kind") == "trigger"
    if trigger and arch is None:
        raise click.UsageError(f"the certificate is about a trigger key: pass --arch "
                               f"{inert_line(cert.arch or 'MODULE:FACTORY')} (the certificate's factory)")
    if not trigger and arch is not None:
        raise click.UsageError("--arch is for trigger keys; this certificate is about a white-box key")
    try:
        res = check_claim(cert, checkpoint, commitment=trusted, arch=arch, device=device, any_version=any_version)
    except ClaimError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"holds": res.holds, "failures": [{"field": f, "message": m} for f, m in res.failures],
                               "notes": res.notes, "commitment_id": res.commitment.id if res.commitment else None,
                               "stamp_id": res.stamp.id if res.stamp else None}))
        sys.exit(res.exit_code)
    v = res.verdict
    if res.holds:
        what = f"{v.matches}/{v.bits} {'triggers' if trigger else 'bits'}"
        _say(f"claim holds: the revealed key {v.key_id} matches {res.commitment.describe()}"
             f"{' (the one you gave)' if trusted is not None else ''}; {checkpoint} is the certified file "
             f"(sha256 {cert.checkpoint['sha256'][:16]}...) and carries the mark: {what}, p-value {v.p_value:.3g} <= "
             f"alpha {v.alpha:g} ({v.null})", style="green")
    else:
        _say(f"claim does NOT hold: {len(res.failures)} check{'s' if len(res.failures) > 1 else ''} failed",
             style="red")
        for _, msg in res.failures:
            _say(f"  {msg}")
    for note in res.notes:
        _say(f"note: {note}", style="yellow")
    sys.exit(res.exit_code)


def register(group: click.Group) -> None:
    """Adds ``commit``, ``stamp``, ``certify`` and ``check`` to the ``nnmark`` command group."""
    for cmd in (commit_cmd, stamp_cmd, certify_cmd, check_cmd):
        group.add_command(cmd)


__all__ = ["register", "commit_cmd", "stamp_cmd", "certify_cmd", "check_cmd"]
