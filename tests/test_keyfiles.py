"""Key files against a hostile filesystem and hostile contents (issue 13, part 6).

Writing: no planted link or name is ever written through; a FIFO at the target is
refused, never waited on. Loading: a key file others can read warns (or is refused),
like ssh; every field is strictly typed and bounded, and whatever is wrong, the error is
a KeyFileError that never shows the secret. Calibration files: the same for their reader.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark import KeyFileError, KeyPermissionWarning, TriggerKey, WhiteBoxKey, load_key
from nnmark import _keyfile, keys as keys_mod, triggers as triggers_mod
from nnmark.calibration import CalibrationError, fit_beta_binomial, load_calibration, make_calibration

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX links, FIFOs and mode bits")

SECRET = bytes(range(100, 132))


def _secret_shown(text: str, secret: bytes = SECRET) -> bool:
    h = secret.hex()
    return any(part in text.lower() for part in (h, h[:16], h[-16:]))


def _wb_key() -> WhiteBoxKey:
    return WhiteBoxKey(SECRET, "features.0.weight", [0, 1] * 16, "filter_mean", shape=(4, 2, 3, 3))


def _resigned_text(body: dict) -> str:
    """The file text with the checksum recomputed as keys.py does it, so that only the
    reader's strictness (never the checksum) can refuse an edited field."""
    rest = {k: v for k, v in body.items() if k != "checksum"}
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    return json.dumps({**rest, "checksum": digest}, indent=1, sort_keys=True) + "\n"


def _write(path, text: str | bytes, mode: int = 0o600):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    os.chmod(path, mode)
    return path


def _in_thread(fn, timeout: float = 20.0):
    """Runs fn in a thread: (finished, result or exception). A hang shows as finished=False."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out["value"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("value")


# ------------------------------------------------------------------------------ writing
def test_a_link_planted_at_the_old_temporary_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the attacker's file\n")
    target = tmp_path / "owner.key"
    os.symlink(victim, tmp_path / f"owner.key.tmp{os.getpid()}")  # nnmark's old, predictable name
    _wb_key().save(target)
    assert victim.read_text() == "the attacker's file\n"
    assert not target.is_symlink() and os.stat(target).st_mode & 0o777 == 0o600
    assert load_key(target) == _wb_key()
    # nothing left beside the key but the planted link (which nnmark never touched)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim.txt", "owner.key",
                                                                 f"owner.key.tmp{os.getpid()}"])


def test_a_link_at_the_target_is_replaced_never_followed(tmp_path):
    key = _wb_key()
    # a link to a key file (so the overwrite check passes): the link itself is replaced
    elsewhere = tmp_path / "elsewhere.key"
    other = WhiteBoxKey.generate(carrier="x.weight", bits=32)
    other.save(elsewhere)
    before = elsewhere.read_bytes()
    target = tmp_path / "owner.key"
    os.symlink(elsewhere, target)
    key.save(target)
    assert not target.is_symlink() and load_key(target) == key
    assert elsewhere.read_bytes() == before and not _secret_shown(before.decode())
    # a link to a file that is not a key: refused, the file untouched
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    link = tmp_path / "link.key"
    os.symlink(victim, link)
    with pytest.raises(FileExistsError, match="not an nnmark key file"):
        key.save(link)
    assert victim.read_text() == "precious\n" and link.is_symlink()
    # a dangling link: replaced by the key file, nothing created where it pointed
    dangling = tmp_path / "dangling.key"
    os.symlink(tmp_path / "nowhere" / "x", dangling)
    key.save(dangling)
    assert not dangling.is_symlink() and load_key(dangling) == key
    assert not (tmp_path / "nowhere").exists()


def test_trigger_export_replaces_a_link_at_the_target(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x")
    link = tmp_path / "triggers.safetensors"
    os.symlink(victim, link)
    TriggerKey(SECRET, n=4).export(link)
    assert victim.read_bytes() == b"x" and not link.is_symlink() and os.stat(link).st_mode & 0o777 == 0o600


def test_a_taken_temporary_name_is_skipped_and_never_written(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("v\n")
    planted = tmp_path / ".planted.tmp"
    os.symlink(victim, planted)
    names = iter([planted, tmp_path / ".fresh.tmp"])
    monkeypatch.setattr(_keyfile, "temp_name", lambda path: next(names))
    _wb_key().save(tmp_path / "k.key")
    assert victim.read_text() == "v\n" and planted.is_symlink()
    assert load_key(tmp_path / "k.key") == _wb_key()
    # every name taken: an error, the target keeps what it held
    monkeypatch.setattr(_keyfile, "temp_name", lambda path: planted)
    before = (tmp_path / "k.key").read_bytes()
    with pytest.raises(FileExistsError, match="temporary file"):
        WhiteBoxKey.generate(carrier="y.weight", bits=32).save(tmp_path / "k.key")
    assert (tmp_path / "k.key").read_bytes() == before and victim.read_text() == "v\n"


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path, monkeypatch):
    target = _wb_key().save(tmp_path / "k.key")
    before = target.read_bytes()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_keyfile.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        WhiteBoxKey.generate(carrier="y.weight", bits=32).save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_a_fifo_at_the_target_or_the_key_path_does_not_hang(tmp_path):
    fifo = tmp_path / "owner.key"
    os.mkfifo(fifo)
    done, got = _in_thread(lambda: _wb_key().save(fifo))
    assert done, "key.save blocked on a FIFO"
    assert isinstance(got, FileExistsError) and "FIFO" in str(got)
    done, got = _in_thread(lambda: load_key(fifo))
    assert done, "load_key blocked on a FIFO"
    assert isinstance(got, KeyFileError) and "not a regular file" in str(got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.key"]


def test_overwriting_a_large_trigger_key_file(tmp_path):
    """The overwrite check reads the whole file (not its first 64 KiB): a trigger key with
    samples larger than that is still recognised as a key file."""
    rng = np.random.default_rng(0)
    samples = torch.from_numpy(rng.random((40, 1, 32, 32)).astype(np.float32))
    key = TriggerKey.generate(kind="content", samples=samples, target=1)
    path = key.save(tmp_path / "t.key")
    assert path.stat().st_size > 1 << 16
    again = TriggerKey.generate(kind="content", samples=samples, target=2)
    again.save(path)
    assert load_key(path) == again


# ----------------------------------------------------------------------------- permissions
@pytest.fixture
def exposed(tmp_path, monkeypatch):
    monkeypatch.delenv(keys_mod.PERMISSIONS_ENV, raising=False)
    path = _wb_key().save(tmp_path / "owner.key")
    os.chmod(path, 0o644)
    return path


def test_a_key_file_others_can_read_loads_with_a_warning(exposed):
    assert issubclass(KeyPermissionWarning, UserWarning) and nnmark.KeyPermissionWarning is KeyPermissionWarning
    with pytest.warns(KeyPermissionWarning) as rec:
        key = load_key(exposed)
    assert key == _wb_key()
    msg = str(rec[0].message)
    assert str(exposed) in msg and "0644" in msg and f"chmod 600 {exposed}" in msg and "read" in msg
    assert not _secret_shown(msg)
    os.chmod(exposed, 0o620)  # writable by the group only
    with pytest.warns(KeyPermissionWarning, match="0620.*change"):
        load_key(exposed)


def test_permission_modes_refuse_and_ignore(exposed):
    with pytest.raises(KeyFileError, match="0644.*chmod 600"):
        load_key(exposed, permissions="refuse")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert load_key(exposed, permissions="ignore") == _wb_key()
    assert not rec
    os.chmod(exposed, 0o600)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert load_key(exposed, permissions="refuse") == _wb_key()
    assert not rec
    with pytest.raises(ValueError, match="permissions must be one of"):
        load_key(exposed, permissions="lenient")


def test_permission_mode_from_the_environment(exposed, monkeypatch):
    monkeypatch.setenv("NNMARK_KEY_PERMISSIONS", "refuse")
    with pytest.raises(KeyFileError, match="refused"):
        load_key(exposed)
    with pytest.warns(KeyPermissionWarning):  # an explicit argument wins
        load_key(exposed, permissions="warn")
    monkeypatch.setenv("NNMARK_KEY_PERMISSIONS", "ignore")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_key(exposed)
    assert not rec
    monkeypatch.setenv("NNMARK_KEY_PERMISSIONS", "sometimes")
    with pytest.raises(KeyFileError, match="NNMARK_KEY_PERMISSIONS"):
        load_key(exposed)


def test_the_cli_helper_prints_one_inert_line_per_file(tmp_path, monkeypatch):
    monkeypatch.delenv(keys_mod.PERMISSIONS_ENV, raising=False)
    path = _wb_key().save(tmp_path / "own\x1b]0;x\x07er.key")
    os.chmod(path, 0o640)
    lines: list[str] = []
    got = keys_mod.load_keys_for_cli([path, path], lines.append)
    assert got == [_wb_key(), _wb_key()]
    assert len(lines) == 1 and lines[0].startswith("warning: key file") and "chmod 600" in lines[0]
    assert "\x1b" not in lines[0] and "\\x1b" in lines[0]


def _run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "NNMARK_KEY_PERMISSIONS"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "nnmark.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_verify_with_an_exposed_key_warns_once_and_still_works(tmp_path):
    key = WhiteBoxKey.generate(carrier="w", bits=32, reduction="flat")
    path = key.save(tmp_path / "owner.key")
    os.chmod(path, 0o644)
    save_file({"w": torch.randn(64)}, str(tmp_path / "m.safetensors"))
    r = _run_cli("verify", path, tmp_path / "m.safetensors")
    assert r.returncode == 1, r.stderr  # checked, not marked: the warning did not stop it
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and str(path) in warned[0] and "0644" in warned[0] and "chmod 600" in warned[0]
    assert "Traceback" not in r.stderr and "m.safetensors" in r.stdout
    # refused through the environment: an error, exit 2 (in-process: a second interpreter is slow)
    from click.testing import CliRunner

    from nnmark.cli import cli

    r = CliRunner().invoke(cli, ["verify", str(path), str(tmp_path / "m.safetensors")],
                           env={"NNMARK_KEY_PERMISSIONS": "refuse"})
    assert r.exit_code == 2 and "refused" in r.output and "chmod 600" in r.output


# --------------------------------------------------------------------------- strict fields
def _saved_body(key) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return json.loads(key.save(os.path.join(d, "k.key")).read_text())


def _dense_key():
    rng = np.random.default_rng(1)
    return nnmark.DenseKey(rng.standard_normal((32, 12)), "w", [1, 0] * 16, "flat", matrix_layout="TN")


def _trigger_key():
    rng = np.random.default_rng(2)
    return TriggerKey(SECRET, kind="content", samples=rng.random((6, 1, 4, 4)), target=1, mean=0.5, std=0.25)


CASES = [
    # (key maker, field, value, what the error names)
    ("wb", "version", True, "version True"),
    ("wb", "version", 1.0, "version 1.0"),
    ("wb", "num_bits", 32.0, "num_bits"),
    ("wb", "num_bits", True, "num_bits"),
    ("wb", "num_bits", 10 ** 12, "num_bits"),
    ("wb", "bits", "\u0661" + "0" * 31, "bits"),  # ARABIC-INDIC DIGIT ONE: int() reads it as 1
    ("wb", "bits", "01" * 15 + "0 ", "bits"),
    ("wb", "bits", [0, 1] * 16, "bits"),
    ("wb", "secret", SECRET.hex()[:-1] + " ", "secret"),
    ("wb", "secret", " " + SECRET.hex(), "secret"),
    ("wb", "secret", SECRET.hex() + "00", "secret"),
    ("wb", "secret", 12, "secret"),
    ("wb", "carrier", "", "carrier"),
    ("wb", "carrier", "w" * 5000, "carrier"),
    ("wb", "carrier", "features.\ud800.weight", "carrier"),
    ("wb", "carrier", ["features.0.weight"], "carrier"),
    ("wb", "reduction", ["flat"], "reduction"),
    ("wb", "reduction", "mean", "reduction"),
    ("wb", "shape", [True, 2, 3, 3], "shape"),
    ("wb", "shape", [4.0, 2, 3, 3], "shape"),
    ("wb", "shape", "4233", "shape"),
    ("wb", "shape", [1] * 17, "shape"),
    ("wb", "shape", [2 ** 30, 2 ** 30], "shape"),
    ("wb", "kind", ["whitebox"], "kind"),
    ("wb", "kind", {"x": 1}, "kind"),
    ("dense", "matrix_shape", [32, 10 ** 12], "matrix"),
    ("dense", "matrix_shape", [True, 12], "matrix_shape"),
    ("dense", "matrix_shape", [32.0, 12], "matrix_shape"),
    ("dense", "matrix_shape", [32], "matrix_shape"),
    ("dense", "matrix", "*" * 512, "matrix"),
    ("dense", "matrix", 7, "matrix"),
    ("dense", "order", ["torch"], "order"),
    ("trigger", "n", 10 ** 12, "'n'"),
    ("trigger", "n", 6.0, "'n'"),
    ("trigger", "num_classes", 10 ** 9, "num_classes"),
    ("trigger", "num_classes", True, "num_classes"),
    ("trigger", "input_shape", [1, 100000, 100000], "input_shape"),
    ("trigger", "input_shape", [True, 4, 4], "input_shape"),
    ("trigger", "input_shape", [1, 4, 4.0], "input_shape"),
    ("trigger", "samples_shape", [6.0, 1, 4, 4], "samples_shape"),
    ("trigger", "samples", "AAAA", "samples"),
    ("trigger", "value_range", [0, True], "value_range"),
    ("trigger", "value_range", [0, 1, 2], "value_range"),
    ("trigger", "mean", [[0.5]], "mean"),
    ("trigger", "mean", "0.5", "mean"),
    ("trigger", "std", [0.0], "std"),
    ("trigger", "noise_std", True, "noise_std"),
    ("trigger", "target", 1.0, "target"),
    ("trigger", "target", True, "target"),
    ("trigger", "trigger_kind", ["content"], "trigger_kind"),
    ("trigger", "secret", SECRET.hex().upper()[:-2] + "ZZ", "secret"),
]
MAKERS = {"wb": _wb_key, "dense": _dense_key, "trigger": _trigger_key}


@pytest.mark.parametrize("maker,field,value,names", CASES,
                         ids=[f"{m}-{f}-{i}" for i, (m, f, _, _) in enumerate(CASES)])
def test_strict_fields_with_a_recomputed_checksum(tmp_path, maker, field, value, names):
    body = _saved_body(MAKERS[maker]())
    body[field] = value
    path = _write(tmp_path / "k.key", _resigned_text(body))
    with pytest.raises(KeyFileError) as err:
        load_key(path)
    msg = str(err.value)
    assert "checksum" not in msg  # the strictness refused it, not the checksum
    assert names in msg, msg
    assert str(path) in msg and not _secret_shown(msg)


def test_the_controls_of_the_strict_cases_load(tmp_path):
    """Without the edit, each key reads back, and an uppercase secret reads as the same key."""
    for make in MAKERS.values():
        body = _saved_body(make())
        back = load_key(_write(tmp_path / "k.key", _resigned_text(body)))
        again = _saved_body(back)  # the same fields again (only the time of writing differs)
        assert type(back) is type(make()) and back.key_id == make().key_id
        assert again == {**body, "created": again["created"], "checksum": again["checksum"]}
    body = _saved_body(_wb_key())
    body["secret"] = body["secret"].upper()
    assert load_key(_write(tmp_path / "k.key", _resigned_text(body))) == _wb_key()


@pytest.mark.parametrize("text,names", [
    ('"n": 1e999', "float64"),
    ('"n": 1' + "0" * 60, "digits"),
    ('"noise_std": NaN', "NaN"),
    ('"noise_std": -Infinity', "Infinity"),
    ('"extra": 1e999', "float64"),  # even in a member nnmark ignores
])
def test_numbers_that_are_not_json_or_beyond_float64(tmp_path, text, names):
    body = _saved_body(_trigger_key())
    name = text.split(":")[0].strip('"')
    body[name] = "PLACEHOLDER"
    raw = _resigned_text(body).replace(f'"{name}": "PLACEHOLDER"', text)
    assert text in raw
    with pytest.raises(KeyFileError, match=names) as err:
        load_key(_write(tmp_path / "k.key", raw))
    assert "checksum" not in str(err.value) and not _secret_shown(str(err.value))


def test_deep_nesting_is_a_key_file_error(tmp_path):
    depth = 200_000
    raw = '{"format": "nnmark-key", "version": 1, "x": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(KeyFileError):
        load_key(_write(tmp_path / "k.key", raw))
    raw = '{"format": "nnmark-key", "version": 1, "x": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    with pytest.raises(KeyFileError):
        load_key(_write(tmp_path / "k.key", raw))


WEIRD = [None, True, False, 0, -1, 1.5, 2 ** 62, "", "x", "\u0661", [], [None], [[1]], {}, {"a": [1]}]


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_any_value_in_any_field_loads_or_is_a_key_file_error(tmp_path, maker):
    """load_key raises nothing but KeyFileError, whatever a (re-checksummed) field holds."""
    body = _saved_body(MAKERS[maker]())
    path = tmp_path / "k.key"
    for field in sorted(set(body) - {"checksum"}):
        for value in WEIRD:
            _write(path, _resigned_text({**body, field: value}))
            try:
                load_key(path)
            except KeyFileError as exc:
                assert not _secret_shown(str(exc)), (field, value)
            # anything else fails the test with its traceback


def test_making_keys_beyond_the_limits_is_a_value_error():
    with pytest.raises(ValueError, match="n must be <="):
        TriggerKey(SECRET, n=10 ** 12)
    with pytest.raises(ValueError, match="n must be <="):
        TriggerKey.generate(n=10 ** 12)
    with pytest.raises(ValueError, match="elements per input"):
        TriggerKey(SECRET, input_shape=(3, 100_000, 100_000))
    with pytest.raises(ValueError, match="values, more than"):  # each part allowed, together too many
        TriggerKey.generate(n=triggers_mod.MAX_TRIGGERS, input_shape=(3, 64, 64))
    with pytest.raises(ValueError, match="num_classes must be <="):
        TriggerKey(SECRET, num_classes=10 ** 9)
    with pytest.raises(ValueError, match="bits"):
        WhiteBoxKey.generate(bits=keys_mod.MAX_BITS + 1)
    with pytest.raises(ValueError, match="shape"):
        WhiteBoxKey(SECRET, "w", [0, 1] * 16, shape=(True, 3))
    assert len(TriggerKey(SECRET, n=1000, input_shape=(3, 32, 32))) == 1000  # real sizes pass


def test_checksum_message_does_not_claim_tamper_proofing(tmp_path):
    path = _wb_key().save(tmp_path / "k.key")
    text = path.read_text()
    i = text.index('"bits": "') + len('"bits": "')
    path.write_text(text[:i] + ("1" if text[i] == "0" else "0") + text[i + 1:])
    with pytest.raises(KeyFileError, match="changed since it was written") as err:
        load_key(path)
    assert "tamper" not in str(err.value)


# ------------------------------------------------------------------------------ calibrations
def _calibration(tmp_path):
    counts = [14, 18, 15, 16, 17, 13, 16, 19, 15, 17]
    a, b = fit_beta_binomial(counts, 32, 0.5)
    cal = make_calibration("0123456789abcdef", "whitebox", 32, counts, a, b, 1e-6, 0.5)
    return cal, json.loads(cal.save(tmp_path / "c.json").read_text())


def test_calibration_files_fifo_links_and_strict_types(tmp_path):
    cal, body = _calibration(tmp_path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    done, got = _in_thread(lambda: load_calibration(fifo))
    assert done and isinstance(got, CalibrationError) and "not a regular file" in str(got)
    # a link at the target is replaced, what it pointed to untouched
    victim = tmp_path / "victim.txt"
    victim.write_text("v\n")
    link = tmp_path / "link.json"
    os.symlink(victim, link)
    cal.save(link)
    assert victim.read_text() == "v\n" and not link.is_symlink() and load_calibration(link).a == cal.a
    path = tmp_path / "bad.json"
    for field, value in [("version", True), ("n", 10 ** 9), ("n", 32.0), ("n_models", True), ("counts", [True] * 10),
                         ("kind", ["whitebox"]), ("created", {"a": 1}), ("a", "1.0")]:
        path.write_text(json.dumps({**body, field: value}))
        with pytest.raises(CalibrationError):
            load_calibration(path)
    text = json.dumps(body)
    a = f'"a": {json.dumps(body["a"])}'
    assert a in text
    for raw in [text.replace(a, '"a": NaN'), text.replace(a, '"a": 1e999'),
                '{"format": "nnmark-calibration", "x": ' + "[" * 200_000 + "]" * 200_000 + "}"]:
        path.write_text(raw)
        with pytest.raises(CalibrationError):
            load_calibration(path)
