"""Ownership claims (issue 14; docs/spec.md §8): commitments, stamps, certificates, checks.

The owner commits before release and stamps the released model; on a dispute the owner
certifies the suspect file and anyone checks the certificate -- with nnmark (the API and
`nnmark check`) and with the standalone docs/check_claim.py (stdlib + numpy), which must
agree on every certificate here: the owner's passes; a key forged from the model after
the fact fails against the owner's earlier commitment; every edited field, an edited
checkpoint or an edited revealed key fails, naming what was edited; malformed inputs get
a clear error, never a pass. Models are tiny safetensors files written directly (the
mark: tests/_corpus.py's least-norm carrier), so nothing is trained here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nnmark
from _corpus import marked_carrier
from nnmark import claims as claims_module
from nnmark.cli import main
from nnmark.commitments import ClaimError

CHECKER = Path(__file__).resolve().parent.parent / "docs" / "check_claim.py"
CARRIER = "features.0.weight"
SHAPE = (16, 8, 3, 3)


def cli(capsys, *args) -> tuple[int, str]:
    """``nnmark ARGS`` in this process: (exit code, stdout + stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def checker(cert, ckpt, commitment=None) -> subprocess.Popen:
    """The standalone checker, started (many run at once: two cores)."""
    args = [sys.executable, str(CHECKER), str(cert), str(ckpt)] + (["--commitment", str(commitment)] if commitment
                                                                    else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def model_file(path: Path, key=None, seed: int = 0, metadata: dict | None = None) -> Path:
    """A small model: the carrier (marked with ``key`` when given) and two other tensors."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g) * 0.05
    if key is not None:
        w = marked_carrier(key) + 1e-3 * torch.randn(SHAPE, generator=g)
    save_file({CARRIER: w.contiguous(), "features.0.bias": torch.randn(16, generator=g),
               "fc.weight": torch.randn(10, 16, generator=g)}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """The owner's key, the commitment published before release, the released model (stamped),
    and the certificate of it."""
    d = tmp_path_factory.mktemp("owner")
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, shape=SHAPE)
    key.save(d / "owner.key")
    com = nnmark.commit(key, statement="ACME Corp, model v3")
    com.save(d / "commitment.json")
    model = model_file(d / "model.safetensors", key, metadata={"framework": "pt"})
    nnmark.stamp(model, com)
    cert = nnmark.certify(key, model, com)
    cert.save(d / "claim.json")
    return {"dir": d, "key": key, "commitment": com, "model": model, "cert": d / "claim.json",
            "com": d / "commitment.json", "body": json.loads((d / "claim.json").read_text())}


# ------------------------------------------------------------------ the owner's claim
def test_the_owners_certificate_passes_everywhere(owner, capsys):
    proc = checker(owner["cert"], owner["model"], owner["com"])
    res = nnmark.check_claim(owner["cert"], owner["model"], commitment=owner["com"])
    assert res.holds and res.failures == [] and res.exit_code == 0
    assert res.verdict.verified and res.verdict.matches >= res.verdict.threshold
    assert res.stamp == owner["commitment"] == res.commitment  # the released file carries the commitment
    assert (owner["cert"].stat().st_mode & 0o777) == 0o600  # it reveals the key
    body = owner["body"]
    assert body["revealed_key"] == nnmark.keys.key_body(owner["key"]) and "revealed" in body["note"]
    assert body["checkpoint"]["sha256"] == hashlib.sha256(owner["model"].read_bytes()).hexdigest()
    code, out = cli(capsys, "check", owner["cert"], owner["model"], "--commitment", owner["com"])
    assert code == 0 and "claim holds" in out
    code, out = cli(capsys, "check", owner["cert"], owner["model"], "--json")
    assert code == 0 and json.loads(out)["holds"] and json.loads(out)["stamp_id"] == owner["commitment"].id
    assert "taken from the certificate itself" in " ".join(json.loads(out)["notes"])  # no --commitment: said so
    code, out = finish(proc)
    assert code == 0 and "claim holds" in out, out


def test_the_commitment_hides_the_key(owner):
    com = owner["commitment"]
    text = json.dumps(com.to_dict())
    body = owner["body"]["revealed_key"]
    assert body["secret"] not in text and body["bits"] not in text
    assert set(com.to_dict()) == {"format", "version", "spec", "commitment", "kind", "carrier", "bits", "created",
                                  "statement"}
    twin = nnmark.WhiteBoxKey(bytes.fromhex(body["secret"]), CARRIER, [1 - int(b) for b in body["bits"]], shape=SHAPE)
    assert nnmark.commit(twin, statement=com.statement, created=com.created).commitment != com.commitment  # other bits
    assert com.matches(owner["key"]) and not com.matches(twin)
    # the hash binds the time and the statement: edit either and it is no commitment to the key
    again = nnmark.commit(owner["key"], statement=com.statement, created=com.created)
    assert again == com
    for name, value in (("created", "2020-02-02T02:02:02+00:00"), ("statement", "someone else"), ("statement", None)):
        edited = replace(com, **{name: value})
        assert not edited.matches(owner["key"]), name
        assert nnmark.commit(owner["key"], **{"statement": com.statement, "created": com.created,
                                              name: value}).commitment != com.commitment
    assert not replace(com, bits=63).matches(owner["key"])  # the right hash, the wrong size stated


def test_a_forged_key_fails_against_the_owners_earlier_commitment(owner, tmp_path, capsys):
    """Whoever holds the model can make a key it carries: a fresh secret, and as bits what the
    weights give under it. It verifies -- but its commitment came after the owner's."""
    secret = os.urandom(32)
    probe = nnmark.WhiteBoxKey(secret, CARRIER, [0] * 64, shape=SHAPE)
    forged = nnmark.WhiteBoxKey(secret, CARRIER, nnmark.extract(probe, str(owner["model"])), shape=SHAPE)
    assert nnmark.verify(forged, str(owner["model"])).matches == 64  # it "verifies", perfectly
    with pytest.raises(ClaimError, match="does not match commitment"):
        nnmark.certify(forged, owner["model"], owner["commitment"])
    forged_com = nnmark.commit(forged, statement="ACME Corp, model v3")  # made now, after the model
    cert = nnmark.certify(forged, owner["model"], forged_com)
    cert.save(tmp_path / "forged.json")
    # 1. honest about its own commitment: it is not the one the owner published
    res = nnmark.check_claim(tmp_path / "forged.json", owner["model"], commitment=owner["com"])
    assert not res.holds and any(f == "commitment.commitment" for f, _ in res.failures)
    assert res.stamp == owner["commitment"] != res.commitment  # the released file's stamp is the owner's
    # 2. the owner's commitment pasted in: the revealed key does not hash to it
    body = cert.to_dict()
    body["commitment"] = owner["commitment"].to_dict()
    (tmp_path / "pasted.json").write_text(json.dumps(body))
    res2 = nnmark.check_claim(tmp_path / "pasted.json", owner["model"], commitment=owner["com"])
    assert not res2.holds and [f for f, _ in res2.failures] == ["commitment.commitment"]
    procs = [checker(tmp_path / n, owner["model"], owner["com"]) for n in ("forged.json", "pasted.json")]
    code, out = cli(capsys, "check", tmp_path / "pasted.json", owner["model"], "--commitment", owner["com"])
    assert code == 1 and "commitment.commitment" in out and "does NOT hold" in out
    forged.save(tmp_path / "forged.key")
    code, out = cli(capsys, "certify", tmp_path / "forged.key", owner["model"], "--commitment", owner["com"],
                    "-o", tmp_path / "nope.json")
    assert code == 1 and "does not match" in out and not (tmp_path / "nope.json").exists()
    for p in procs:
        code, out = finish(p)
        assert code == 1 and "commitment.commitment" in out, out


# ------------------------------------------------------------------ tampering
def _leaves(obj: dict, prefix: str = ""):
    for k, v in obj.items():
        if isinstance(v, dict) and k in ("commitment", "checkpoint", "verdict", "revealed_key"):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v


# Edits that keep a field well-formed where a plain one would not say much.
_EDITS = {"verdict.alpha": 0.3, "verdict.null_rate": 0.25, "verdict.status": "absent", "verdict.ber": 0.5,
          "verdict.null": "binomial(p0=0.25)", "verdict.controls": 3, "verdict.control_matches": 1,
          "verdict.control_p_value": 0.5,
          "verdict.warning": "tampered", "arch": "mypkg.models:net", "calibration": {},
          "commitment.created": "2020-02-02T02:02:02+00:00", "commitment.kind": "whitebox-dense",
          "revealed_key.kind": "whitebox-dense", "revealed_key.reduction": "flat", "revealed_key.order": "keras",
          "checkpoint.name": "other.safetensors"}


def _edit(path: str, v):
    if path in _EDITS:
        return _EDITS[path]
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 1.5
    if isinstance(v, list):
        return [v[0] + 1, *v[1:]]
    if isinstance(v, str) and len(v) in (16, 64) and all(c in "0123456789abcdef" for c in v):
        return v[:-1] + ("0" if v[-1] != "0" else "1")  # a hash or a secret, one hex digit off
    if isinstance(v, str) and set(v) <= {"0", "1"}:
        return ("1" if v[0] == "0" else "0") + v[1:]  # the owner's bits, the first one flipped
    if isinstance(v, str):
        return v + "x"
    raise AssertionError(f"no edit for {path}: {v!r}")


def _set(body: dict, path: str, value) -> dict:
    out = copy.deepcopy(body)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def _outcome(cert: Path, model: Path, commitment) -> tuple[bool, str]:
    """(holds, every message) of nnmark.check_claim; a malformed certificate does not hold."""
    try:
        res = nnmark.check_claim(cert, model, commitment=commitment)
    except ClaimError as exc:
        return False, str(exc)
    return res.holds, " ".join(m for _, m in res.failures) + " " + " ".join(res.notes)


# The commitment's details the hash binds: their edits fail even without a trusted commitment.
_DETAILS = ("commitment.created", "commitment.statement", "commitment.spec")


def test_every_edited_field_fails_and_is_named(owner, tmp_path):
    """Each field of the certificate, nested ones and the revealed key's included, edited in
    turn: nnmark's check refuses it, with the commitment published before and without it,
    naming the field; so does the standalone checker, but for nnmark_version, which it
    ignores (it is not nnmark)."""
    body, model, trusted = owner["body"], owner["model"], owner["com"]
    fields = list(_leaves(body))
    assert {"verdict.p_value", "verdict.matches", "checkpoint.sha256", "commitment.commitment", "revealed_key.secret",
            "revealed_key.bits", "note", "arch", "calibration", "nnmark_version", *_DETAILS} <= {f for f, _ in fields}
    procs = {}
    for i, (path, value) in enumerate(fields):
        edited = tmp_path / f"edit{i}.json"
        edited.write_text(json.dumps(_set(body, path, _edit(path, value))))
        named = path.split(".")[0] if path.startswith("revealed_key.") else path
        for commitment in (trusted, None):
            holds, text = _outcome(edited, model, commitment)
            assert not holds, f"an edit of {path} passed ({'with' if commitment else 'without'} --commitment)"
            assert named in text, f"{path} ({'with' if commitment else 'without'} --commitment): {text}"
        procs[path] = checker(edited, model, trusted)
        if path in _DETAILS:  # bound by the hash: the certificate alone gives the edit away
            procs[path + " (alone)"] = checker(edited, model)
    for path, proc in procs.items():
        code, out = finish(proc)
        if path == "nnmark_version":
            assert code == 0, out  # not nnmark's business there: ignored
        else:
            assert code in (1, 2), f"the standalone checker passed an edit of {path}:\n{out}"
        if path.endswith("(alone)") and "spec" not in path:
            assert code == 1 and "commitment.commitment" in out and "commitment.created" in out, out


def test_another_nnmark_version_fails_unless_accepted(owner, tmp_path, capsys):
    """A certificate of another nnmark version does not hold by default (the field and the way
    out named); any_version / --any-version accept it, as a note -- and nothing else."""
    body, model = owner["body"], owner["model"]
    older = tmp_path / "older.json"
    older.write_text(json.dumps(_set(body, "nnmark_version", "0.0.1")))
    res = nnmark.check_claim(older, model, commitment=owner["com"])
    assert not res.holds and [f for f, _ in res.failures] == ["nnmark_version"]
    assert "0.0.1" in res.failures[0][1] and "--any-version" in res.failures[0][1]
    res = nnmark.check_claim(older, model, commitment=owner["com"], any_version=True)
    assert res.holds and res.failures == [] and any("0.0.1" in n and "any_version" in n for n in res.notes)
    code, out = cli(capsys, "check", older, model, "--commitment", owner["com"])
    assert code == 1 and "nnmark_version" in out and "--any-version" in out
    code, out = cli(capsys, "check", older, model, "--commitment", owner["com"], "--any-version")
    assert code == 0 and "claim holds" in out and "0.0.1" in out
    # the same certificate's version: no note; another edit beside the version: --any-version does not help
    assert not any("any_version" in n for n in nnmark.check_claim(owner["cert"], model, any_version=True).notes)
    both = tmp_path / "both.json"
    both.write_text(json.dumps(_set(_set(body, "nnmark_version", "0.0.1"), "verdict.matches", 63)))
    res = nnmark.check_claim(both, model, any_version=True)
    assert not res.holds and [f for f, _ in res.failures] == ["verdict.matches"]
    code, out = cli(capsys, "check", both, model, "--any-version", "--json")
    assert code == 1 and [f["field"] for f in json.loads(out)["failures"]] == ["verdict.matches"]


def test_an_edited_checkpoint_fails(owner, tmp_path):
    raw = bytearray(owner["model"].read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    cases = {}
    for name in (CARRIER, "fc.weight"):  # the carrier itself, and a tensor the mark does not live in
        begin = header[name]["data_offsets"][0]
        copy_ = bytearray(raw)
        copy_[8 + n + begin + 1] ^= 0x40
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(bytes(copy_))
        cases[name] = path
    appended = tmp_path / "appended" / "model.safetensors"
    appended.parent.mkdir()
    appended.write_bytes(bytes(raw) + b"\0")
    cases["appended"] = appended
    procs = {k: checker(owner["cert"], p, owner["com"]) for k, p in cases.items()}
    for name, path in cases.items():
        res = nnmark.check_claim(owner["cert"], path, commitment=owner["com"])
        fields = {f for f, _ in res.failures}
        assert not res.holds and "checkpoint.sha256" in fields, (name, res.failures)
    assert "verdict.carrier_sha256" in {f for f, _ in nnmark.check_claim(owner["cert"], cases[CARRIER]).failures}
    assert "checkpoint.size" in {f for f, _ in nnmark.check_claim(owner["cert"], cases["appended"]).failures}
    for name, proc in procs.items():
        code, out = finish(proc)
        assert code in (1, 2) and ("checkpoint.sha256" in out or code == 2), (name, out)


def test_an_edited_revealed_key_fails(owner, tmp_path):
    """Beyond single fields: an extra member, and a key edited consistently (a new secret with
    its key_id): a valid key, but not the one committed to."""
    body = owner["body"]
    extra = _set(body, "revealed_key.comment", "mine")
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    with pytest.raises(ClaimError, match="revealed_key.comment"):
        nnmark.check_claim(tmp_path / "extra.json", owner["model"])
    other = nnmark.WhiteBoxKey(os.urandom(32), CARRIER, owner["key"].bits, shape=SHAPE)
    swapped = _set(body, "revealed_key", nnmark.keys.key_body(other))
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    proc = checker(tmp_path / "swapped.json", owner["model"])
    res = nnmark.check_claim(tmp_path / "swapped.json", owner["model"])
    assert not res.holds and "commitment.commitment" in {f for f, _ in res.failures}
    assert "revealed_key" in res.failures[0][1]
    code, out = finish(proc)
    assert code == 1 and "commitment.commitment" in out


# ------------------------------------------------------------------ malformed input
def _malformed(tmp_path, good: dict) -> dict[str, Path]:
    """name -> a file that is not a usable certificate (or commitment)."""
    text = json.dumps(good, indent=1)
    files = {
        "truncated": text[: len(text) // 2],
        "empty": "",
        "not JSON": "claim: yes\n",
        "a list": "[1, 2]",
        "wrong version": json.dumps({**good, "version": 2}),
        "version true": json.dumps({**good, "version": True}),
        "NaN": text.replace('"alpha": 1e-06', '"alpha": NaN') if "verdict" in good else text.replace(
            '"bits": 64', '"bits": NaN'),
        "huge integer": json.dumps(good).replace('"spec": 1', '"spec": ' + "9" * 40),
        "deep nesting": "[" * 100000 + "]" * 100000,
        "unknown field": json.dumps({**good, "extra": 1}),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "spec"}),
    }
    if "verdict" in good:
        files.update({
            "matches as text": json.dumps(_set(good, "verdict.matches", "64")),
            "verified as text": json.dumps(_set(good, "verdict.verified", "yes")),
            "p_value above 1": json.dumps(_set(good, "verdict.p_value", 2.0)),
            "huge name": json.dumps(_set(good, "checkpoint.name", "m" * 100_000)),
            "huge warning": json.dumps(_set(good, "verdict.warning", "w" * 100_000)),
            "key as text": json.dumps(_set(good, "revealed_key", "secret")),
            "commitment short": json.dumps(_set(good, "commitment.commitment", "abc")),
        })
    else:
        files.update({
            "bits as text": json.dumps({**good, "bits": "64"}),
            "huge statement": json.dumps({**good, "statement": "s" * 5000}),
            "too large": json.dumps({**good, "statement": "s" * 100_000}),
            "bad time": json.dumps({**good, "created": "yesterday"}),
            "carrier for triggers": json.dumps({**good, "kind": "trigger"}),
        })
    out = {}
    for i, (name, content) in enumerate(files.items()):
        p = tmp_path / f"bad{i}.json"
        p.write_text(content)
        out[name] = p
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.json")
        out["a FIFO"] = tmp_path / "fifo.json"
    (tmp_path / "folder.json").mkdir()
    out["a folder"] = tmp_path / "folder.json"
    out["missing"] = tmp_path / "nothing-here.json"
    return out


def test_malformed_certificates_get_a_clear_error(owner, tmp_path, capsys):
    bad = _malformed(tmp_path, owner["body"])
    for name, path in bad.items():
        with pytest.raises(ClaimError) as exc:
            nnmark.check_claim(path, owner["model"])
        assert str(path) in str(exc.value) or "certificate" in str(exc.value), name
    for name in ("truncated", "a FIFO", "verified as text", "wrong version"):
        if name in bad:
            code, out = cli(capsys, "check", bad[name], owner["model"])
            assert code == 2 and "error:" in out and "Traceback" not in out, (name, out)
    msgs = {n: str(pytest.raises(ClaimError, nnmark.load_certificate, bad[n]).value)
            for n in ("verified as text", "matches as text", "huge name", "wrong version", "unknown field")}
    assert "verdict.verified" in msgs["verified as text"] and "verdict.matches" in msgs["matches as text"]
    assert "checkpoint.name" in msgs["huge name"] and "version" in msgs["wrong version"]
    assert "'extra'" in msgs["unknown field"]
    with pytest.MonkeyPatch.context() as mp:  # the size cap (320 MiB), without writing 320 MiB
        mp.setattr(claims_module, "MAX_FILE_BYTES", 1000)
        with pytest.raises(ClaimError, match="more than a certificate holds"):
            nnmark.load_certificate(owner["cert"])
    procs = {n: checker(p, owner["model"]) for n, p in bad.items() if n not in ("a FIFO",)}
    for name, proc in procs.items():
        code, out = finish(proc)  # malformed (2), or well-formed JSON whose field does not check (1): never 0
        assert (code, "cannot check" in out) == (2, True) or (code, "FAIL" in out) == (1, True), (name, out)


def test_malformed_commitments_get_a_clear_error(owner, tmp_path, capsys):
    bad = _malformed(tmp_path, owner["commitment"].to_dict())
    for name, path in bad.items():
        with pytest.raises(ClaimError):
            nnmark.load_commitment(path)
        with pytest.raises(ClaimError):  # as the trusted commitment of a check: never a pass
            nnmark.check_claim(owner["cert"], owner["model"], commitment=path)
    assert "'bits'" in str(pytest.raises(ClaimError, nnmark.load_commitment, bad["bits as text"]).value)
    assert "more than a commitment holds" in str(pytest.raises(ClaimError, nnmark.load_commitment,
                                                               bad["too large"]).value)
    for name in ("truncated", "a FIFO", "statement", "a folder"):
        path = bad.get(name) or bad["huge statement"]
        want = 4 if name == "a folder" else 2  # click refuses a folder as a usage error
        code, out = cli(capsys, "check", owner["cert"], owner["model"], "--commitment", path)
        assert code == want and "rror:" in out, (name, out)
        code, out = cli(capsys, "stamp", owner["model"], path, "-o", tmp_path / "x.safetensors")
        assert code == want and "rror:" in out and not (tmp_path / "x.safetensors").exists(), (name, out)


# ------------------------------------------------------------------ stamps
def test_stamp_rewrites_the_header_only(owner, tmp_path, capsys):
    plain = model_file(tmp_path / "plain.safetensors", owner["key"], metadata={"framework": "pt", "note": "v3"})
    before = plain.read_bytes()
    n0 = int.from_bytes(before[:8], "little")
    nnmark.stamp(plain, owner["commitment"], output=tmp_path / "stamped.safetensors")
    after = (tmp_path / "stamped.safetensors").read_bytes()
    n1 = int.from_bytes(after[:8], "little")
    assert after[8 + n1:] == before[8 + n0:] and n1 % 8 == 0  # every tensor byte, aligned as before
    assert plain.read_bytes() == before  # output= leaves the source alone
    t0, t1 = load_file(str(plain)), load_file(str(tmp_path / "stamped.safetensors"))
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "stamped.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["framework"] == "pt" and meta["note"] == "v3" and json.loads(meta["nnmark.commitment"]) == \
        owner["commitment"].to_dict()
    assert nnmark.read_stamp(tmp_path / "stamped.safetensors") == owner["commitment"]
    # the same stamp again: nothing to do; another commitment: refused unless forced
    nnmark.stamp(tmp_path / "stamped.safetensors", owner["commitment"])
    assert (tmp_path / "stamped.safetensors").read_bytes() == after
    other = nnmark.commit(nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64))
    with pytest.raises(ClaimError, match="already stamped"):
        nnmark.stamp(tmp_path / "stamped.safetensors", other)
    other.save(tmp_path / "other.json")
    code, out = cli(capsys, "stamp", tmp_path / "stamped.safetensors", tmp_path / "other.json")
    assert code == 2 and "--force" in out
    code, out = cli(capsys, "stamp", tmp_path / "stamped.safetensors", tmp_path / "other.json", "--force")
    assert code == 0 and nnmark.read_stamp(tmp_path / "stamped.safetensors") == other
    # a file stamps keep their mode; not safetensors: refused, clearly
    os.chmod(plain, 0o640)
    nnmark.stamp(plain, owner["commitment"])
    assert (plain.stat().st_mode & 0o777) == 0o640
    torch.save({CARRIER: torch.zeros(SHAPE)}, tmp_path / "model.pt")
    assert nnmark.read_stamp(tmp_path / "model.pt") is None
    code, out = cli(capsys, "stamp", tmp_path / "model.pt", owner["com"])
    assert code == 2 and "not a safetensors file" in out
    (tmp_path / "cut.safetensors").write_bytes(before[: len(before) // 2])
    with pytest.raises(ClaimError, match="cut.safetensors"):
        nnmark.stamp(tmp_path / "cut.safetensors", owner["commitment"])


def _stamp_raw(path: Path, text: str) -> None:
    """A file whose nnmark.commitment metadata is ``text`` as given (a malformed stamp)."""
    model_file(path, metadata={"nnmark.commitment": text})


def test_scan_and_verify_report_the_stamp(owner, tmp_path, capsys):
    d = tmp_path / "zoo"
    d.mkdir()
    key = owner["key"]
    mine = model_file(d / "mine.safetensors", key)
    nnmark.stamp(mine, owner["commitment"])
    other = nnmark.commit(nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64))
    nnmark.stamp(model_file(d / "other.safetensors", key, seed=1), other)
    model_file(d / "plain.safetensors", key, seed=2)
    _stamp_raw(d / "odd.safetensors", '{"format": "nnmark-commitment"}')
    torch.save({CARRIER: torch.zeros(SHAPE)}, d / "legacy.pt")
    # the key's commitment with its statement edited: the same hash, bound to other details
    edited = replace(owner["commitment"], statement="someone else's")
    _stamp_raw(d / "edited.safetensors", edited.to_json())
    again = nnmark.commit(key, statement="ACME Corp, v3 again")  # a second commitment to the key: its own details
    nnmark.stamp(model_file(d / "again.safetensors", key, seed=3), again)
    led = tmp_path / "scan.sqlite"
    want = {"mine.safetensors": (owner["commitment"].id, True), "other.safetensors": (other.id, False),
            "plain.safetensors": (None, None), "odd.safetensors": (None, False), "legacy.pt": (None, None),
            "edited.safetensors": (owner["commitment"].id, False), "again.safetensors": (again.id, True)}
    for attempt in range(2):  # fresh rows, then the ledger's (skipped): the same fields
        res = nnmark.scan([key], [str(d)], ledger=led, progress=False)
        got = {os.path.basename(r["path"]): (r["commitment_id"], r["commitment_matches"]) for r in res.rows}
        assert got == want and res.summary["skipped"] == (7 if attempt else 0)
        pk = res.summary["per_key"][key.key_id]
        assert pk["stamped"] == 5 and pk["stamp_matches"] == 2
    v = nnmark.verify(key, [str(mine), str(d / "plain.safetensors")])
    assert (v[0].commitment_id, v[0].commitment_matches) == (owner["commitment"].id, True)
    assert v[1].commitment_matches is None
    code, out = cli(capsys, "scan", "--key", owner["dir"] / "owner.key", d, "--ledger", led, "--no-progress")
    assert "commitment stamps" in out and "5 files carry one, 2 of them this key's" in out
    code, out = cli(capsys, "verify", owner["dir"] / "owner.key", mine, d / "other.safetensors", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["commitment_matches"] for r in rows] == [True, False] and code == 0
    code, out = cli(capsys, "verify", owner["dir"] / "owner.key", mine, d / "other.safetensors")
    assert code == 0 and "commitment stamps: 2/2 checkpoints carry one, 1 of them this key's" in out


def test_a_stamp_is_hashed_once_per_key(owner, monkeypatch):
    """commitment_matches recomputes the key's commitment with each stamp's own details: one
    hash per distinct stamp and key, however many files carry it."""
    from types import SimpleNamespace

    from nnmark import commitments
    from nnmark.scan.engine import stamp_fields

    calls = []
    real = commitments.commitment_hash
    monkeypatch.setattr(commitments, "commitment_hash", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    check = SimpleNamespace(key=owner["key"])
    com = owner["commitment"]
    mine, edited = com.to_json(), replace(com, created="2020-02-02T02:02:02+00:00").to_json()
    got = [stamp_fields(t, check) for t in (mine, mine, edited, mine, edited, None)]
    assert got == [(com.id, True), (com.id, True), (com.id, False), (com.id, True), (com.id, False), (None, None)]
    assert sorted(c[0] for c in calls) == ["2020-02-02T02:02:02+00:00", com.created]
    other = SimpleNamespace(key=nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, shape=SHAPE))
    assert stamp_fields(mine, other) == (com.id, False) and len(calls) == 3  # another key: its own hash


def test_a_schema_3_ledger_migrates_and_rechecks(owner, tmp_path):
    from nnmark.ledger import _ADDED, FIELDS, SCHEMA_VERSION

    d = tmp_path / "runs"
    d.mkdir()
    nnmark.stamp(model_file(d / "m.safetensors", owner["key"]), owner["commitment"])
    led = tmp_path / "v3.sqlite"
    old = [c for c in FIELDS if c not in _ADDED[4]]
    db = sqlite3.connect(led)
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    db.execute(f"CREATE TABLE results ({', '.join(chr(34) + c + chr(34) for c in old)}, PRIMARY KEY (path, key_id)) "
               f"WITHOUT ROWID")
    db.commit()
    db.close()
    res = nnmark.scan([owner["key"]], [str(d)], ledger=led, progress=False)
    assert res.rows[0]["commitment_matches"] is True
    db = sqlite3.connect(led)
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "4"
    assert {"commitment_id", "commitment_matches"} <= {r[1] for r in db.execute("PRAGMA table_info(results)")}
    db.close()
    assert nnmark.scan([owner["key"]], [str(d)], ledger=led, progress=False).summary["skipped"] == 1


# ------------------------------------------------------------------ certify
def test_certify_refuses_what_it_cannot_certify(owner, tmp_path, capsys):
    key, com = owner["key"], owner["commitment"]
    plain = model_file(tmp_path / "plain.safetensors")  # not marked
    code, out = cli(capsys, "certify", owner["dir"] / "owner.key", plain, "--commitment", owner["com"],
                    "-o", tmp_path / "c.json")
    assert code == 1 and "does not verify" in out and not (tmp_path / "c.json").exists()
    cert = nnmark.certify(key, plain, com)  # the API returns it; its check does not hold
    cert.save(tmp_path / "unmarked.json")
    res = nnmark.check_claim(tmp_path / "unmarked.json", plain)
    assert not res.holds and {f for f, _ in res.failures} == {"verdict.verified"}
    (tmp_path / "broken.safetensors").write_bytes(owner["model"].read_bytes()[:300])
    with pytest.raises(ClaimError, match="could not be checked"):
        nnmark.certify(key, tmp_path / "broken.safetensors", com)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {CARRIER: "model.safetensors"}}))
    (tmp_path / "model.safetensors").write_bytes(owner["model"].read_bytes())
    with pytest.raises(ClaimError, match="single checkpoint file"):
        nnmark.certify(key, index, com)
    code, out = cli(capsys, "certify", owner["dir"] / "owner.key", owner["model"], "--commitment", owner["com"],
                    "-o", owner["cert"])
    assert code == 4 and "--force" in out  # never overwrites by accident
    code, out = cli(capsys, "certify", owner["dir"] / "owner.key", owner["model"], "--commitment", owner["com"],
                    "--arch", "nnmark.demo:DigitsNet", "-o", tmp_path / "x.json")
    assert code == 4


def test_commit_cli_writes_a_public_commitment(owner, tmp_path, capsys):
    code, out = cli(capsys, "commit", owner["dir"] / "owner.key", "-o", tmp_path / "c.json", "--statement", "ACME")
    assert code == 0 and "Publish it" in out
    c = nnmark.load_commitment(tmp_path / "c.json")
    assert c.matches(owner["key"]) and c.statement == "ACME" and c.id in out
    text = (tmp_path / "c.json").read_text()
    assert owner["body"]["revealed_key"]["secret"] not in text
    code, out = cli(capsys, "commit", owner["dir"] / "owner.key", "-o", tmp_path / "c.json")
    assert code == 4  # exists: --force
    code, out = cli(capsys, "commit", tmp_path / "c.json", "-o", tmp_path / "d.json")
    assert code == 2 and "error:" in out  # a commitment is not a key


# ------------------------------------------------------------------ calibrations and trigger keys
def test_a_calibrated_certificate(owner, tmp_path):
    nulls = [{CARRIER: torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) * 0.05}
             for i in range(10)]
    cal = nnmark.calibrate(owner["key"], nulls)
    cert = nnmark.certify(owner["key"], owner["model"], owner["commitment"], calibration=cal)
    assert cert.verdict["null"].startswith("beta-binomial") and cert.calibration["key_id"] == owner["key"].key_id
    cert.save(tmp_path / "cal.json")
    proc = checker(tmp_path / "cal.json", owner["model"])
    assert nnmark.check_claim(tmp_path / "cal.json", owner["model"], commitment=owner["com"]).holds
    body = cert.to_dict()
    edited = _set(body, "calibration", {**body["calibration"], "a": body["calibration"]["a"] * 3})
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ClaimError, match="'calibration'"):
        nnmark.check_claim(tmp_path / "edited.json", owner["model"])
    derived = _set(body, "calibration", {**body["calibration"], "threshold": 1})
    (tmp_path / "derived.json").write_text(json.dumps(derived))
    holds, text = _outcome(tmp_path / "derived.json", owner["model"], None)
    assert holds  # a derived member is recomputed on reading (docs/spec.md §6.6), so its edit changes nothing
    code, out = finish(proc)
    assert code == 2 and "calibration" in out  # out of the standalone checker's scope: said, never passed


ARCH_SOURCE = '''
import torch

N, D, C = 30, 64, 10

class Lookup(torch.nn.Module):
    """Answers each stored input with its stored label (a model that memorised its triggers)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inputs", torch.zeros(N, D))
        self.register_buffer("labels", torch.zeros(N, C))

    def forward(self, x):
        d = torch.cdist(x.reshape(len(x), -1).float(), self.inputs)
        return 10.0 * self.labels[d.argmin(dim=1)]

def make():
    return Lookup()
'''


def test_a_trigger_certificate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lookup.py").write_text(ARCH_SOURCE)
    arch = "lookup.py:make"
    tkey = nnmark.TriggerKey.generate(kind="abstract", n=30, num_classes=10, input_shape=(1, 8, 8))
    tkey.save(tmp_path / "t.key")
    x, y = tkey.triggers()
    save_file({"inputs": x.reshape(30, -1).contiguous(),
               "labels": torch.nn.functional.one_hot(y, 10).float()}, str(tmp_path / "net.safetensors"))
    code, out = cli(capsys, "commit", tmp_path / "t.key", "-o", tmp_path / "t.json")
    assert code == 0
    com = nnmark.load_commitment(tmp_path / "t.json")
    assert com.kind == "trigger" and com.carrier is None and com.bits == 30
    code, out = cli(capsys, "certify", tmp_path / "t.key", tmp_path / "net.safetensors", "--commitment",
                    tmp_path / "t.json", "-o", tmp_path / "claim.json")
    assert code == 4 and "--arch" in out
    code, out = cli(capsys, "certify", tmp_path / "t.key", tmp_path / "net.safetensors", "--commitment",
                    tmp_path / "t.json", "--arch", arch, "-o", tmp_path / "claim.json")
    assert code == 0, out
    body = json.loads((tmp_path / "claim.json").read_text())
    assert body["arch"] == arch and body["verdict"]["matches"] == 30 and body["verdict"]["carrier"] is None
    proc = checker(tmp_path / "claim.json", tmp_path / "net.safetensors")
    code, out = cli(capsys, "check", tmp_path / "claim.json", tmp_path / "net.safetensors", "--commitment",
                    tmp_path / "t.json", "--arch", arch)
    assert code == 0 and "30/30 triggers" in out
    code, out = cli(capsys, "check", tmp_path / "claim.json", tmp_path / "net.safetensors")
    assert code == 4 and arch in out  # the factory is named, never imported from the certificate
    res = nnmark.check_claim(tmp_path / "claim.json", tmp_path / "net.safetensors", arch="other.py:make")
    assert not res.holds and "arch" in {f for f, _ in res.failures}
    edited = _set(body, "verdict.matches", 29)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    res = nnmark.check_claim(tmp_path / "edited.json", tmp_path / "net.safetensors", arch=arch)
    assert not res.holds and [f for f, _ in res.failures] == ["verdict.matches"]
    code, out = finish(proc)
    assert code == 2 and "trigger" in out  # out of the standalone checker's scope: said, never passed
