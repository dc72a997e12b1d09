"""Fuzzing the front doors with Hypothesis (issue 13, point 8).

Generated and mutated safetensors headers, torch zip members, Hugging Face shard
indexes, key files and file names. For every folder of generated files:

- ``nnmark.scan`` never raises and gives one row per (file, key) for every regular,
  non-hidden file (a shard named by an index beside it is checked through the index;
  what the scan leaves out is counted in ``summary["left_out"]`` where that exists),
  every status in STATUSES, an exit code in {0, 1, 2, 3};
- ``nnmark.verify`` never raises on any generated file and agrees with the scan's row
  (status and error class);
- the CLI exits 0, 1 or 2 and prints no key secret, no control character from a file
  name and no traceback;
- no pickle code runs (an Evil pickle's marker file never appears);
- nothing hangs: every scan and verify runs under a time bound.

Examples are derandomized (CI sees the same ones every run) and few. To fuzz more
locally: ``NNMARK_FUZZ_EXAMPLES=2000 NNMARK_FUZZ_RANDOM=1 pytest tests/test_fuzz.py``
(random examples; Hypothesis prints the failing one and how to reproduce it).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import struct
import sys
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nnmark  # noqa: E402
from nnmark import cli  # noqa: E402
from nnmark.rows import STATUSES  # noqa: E402
from nnmark.scan import expand_paths  # noqa: E402

from _corpus import PARITY_ARCH, Evil  # noqa: E402

EXAMPLES = int(os.environ.get("NNMARK_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("NNMARK_FUZZ_RANDOM"),
                database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
# Seconds any one scan or verify of a handful of small files may take before it counts as a hang.
HANG_S = 30

CARRIER = "w"
WB = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=24, reduction="flat")
TRIGGER = nnmark.TriggerKey.generate(kind="abstract", n=4, num_classes=10, input_shape=(1, 8, 8))
KEYS_DIR = tempfile.mkdtemp(prefix="nnmark-fuzz-keys-")
WB_PATH = str(WB.save(os.path.join(KEYS_DIR, "wb.key")))
# The secret as a key file stores it (hex) and as bytes: neither may ever be printed.
SECRET_HEX = json.loads(Path(WB_PATH).read_text())["secret"]


def _bounded(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread: its result, or a test failure if it takes longer
    than HANG_S (a hang); exceptions propagate."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish in {HANG_S} s (hang) on {args!r}")
    if "exc" in out:
        raise out["exc"]
    return out["value"]


def _regular_files(folder: Path) -> set[str]:
    """Regular, non-hidden files under folder (hidden folders skipped), absolute."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not f.startswith(".") and os.path.isfile(p) and not os.path.islink(p):
                found.add(os.path.abspath(p))
    return found


def _shards_of_indexes(folder: Path) -> set[str]:
    """Files that a shard index beside them names (their row is the index's)."""
    shards = set()
    for p in _regular_files(folder):
        if p.endswith(".index.json"):
            with contextlib.suppress(nnmark.CheckpointError):
                shards.update(nnmark.checkpoints.index_shards(p))
    return shards


def _event(text: str) -> None:
    """Counts what the examples reached (``--hypothesis-show-statistics``); a no-op outside a fuzz."""
    with contextlib.suppress(hypothesis.errors.InvalidArgument):
        hypothesis.event(text)


def check_folder(folder: Path, keys=(WB,), arch=None, verify_each: bool = True, evil_marker: Path | None = None):
    """The invariants of a scan (and a verify of each file) of a folder of generated files."""
    keys = list(keys)
    res = _bounded(nnmark.scan, keys, str(folder), workers=2, progress=False, arch=arch)
    assert res.exit_code in (0, 1, 2, 3)
    rows = res.rows
    assert all(r["status"] in STATUSES for r in rows)
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    # one row per (file, key), never two
    for p, rs in by_path.items():
        assert sorted(r["key_id"] for r in rs) == sorted(k.key_id for k in keys), (p, rs)
        for r in rs:
            _event(f"row {r['status']}/{r['error_class']}")
    files = _regular_files(folder)
    left_out = sum((res.summary.get("left_out") or {}).values()) if isinstance(res.summary.get("left_out"), dict) \
        else 0
    missing = files - set(by_path) - _shards_of_indexes(folder)
    assert len(missing) <= left_out, f"files without a row: {sorted(missing)}"
    if not files and not by_path:  # nothing found (3), or only what was left out, said so (2)
        assert res.exit_code == (2 if left_out else 3), (res.exit_code, res.summary.get("left_out"))
    if any(r["status"] != "ok" for r in rows):
        assert res.exit_code == 2
    if verify_each:
        for p, rs in by_path.items():
            for key, r in zip(keys, sorted(rs, key=lambda r: [k.key_id for k in keys].index(r["key_id"]))):
                v = _bounded(nnmark.verify, key, p, arch=arch)
                assert v.status in STATUSES
                assert (v.status, v.error_class) == (r["status"], r["error_class"]), (p, r["error_message"],
                                                                                      v.detail)
                if v.status != "ok":
                    assert not v.verified
    if evil_marker is not None:
        assert not evil_marker.exists(), "pickle code ran"
    return res


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``nnmark.cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_clean_output(text: str) -> None:
    assert SECRET_HEX not in text and SECRET_HEX.upper() not in text
    assert "Traceback (most recent call last)" not in text
    # no control character other than newlines (a raw ESC from a file name, a BEL, a CSI...)
    bad = [c for c in text if (ord(c) < 32 and c not in "\n") or 0x7f <= ord(c) < 0xa0]
    assert not bad, f"control characters in the output: {bad[:5]!r}"



# ------------------------------------------------------------------ (a) safetensors headers
DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F6_E2M3",
          "F6_E3M2", "F4", "C64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]
BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "C64": 64, "I64": 64, "I32": 32, "I16": 16, "U64": 64,
        "U32": 32, "U16": 16, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
NAMES = st.one_of(st.sampled_from([CARRIER, "module." + CARRIER, "model." + CARRIER, "b", "__metadata__", "",
                                   "w\x00", "\ud800", "[/x]", "\x1b[31mw"]), st.text(max_size=12))
DIMS = st.one_of(st.integers(0, 16), st.sampled_from([-1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64, 10 ** 30]),
                 st.booleans(), st.floats(allow_nan=True), st.none(), st.text(max_size=3))
JSON_ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                                  st.floats(allow_nan=False), st.text(max_size=8)),
                        lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c,
                                                                                     max_size=3)), max_leaves=8)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@st.composite
def safetensors_files(draw) -> bytes:
    """Bytes of a safetensors file: a generated header (valid or not) and data, then maybe damaged."""
    pairs = []  # (name, entry as JSON text): kept as text so names can repeat
    pos = 0
    valid = draw(st.booleans())  # half the files start valid (the carrier is then read), then maybe one flaw
    for i in range(draw(st.integers(0 if not valid else 1, 4))):
        if valid:
            name = CARRIER if i == 0 else draw(st.sampled_from(["b", "c.weight", "module.x"]))
            dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"] if i == 0 else DTYPES))
            shape = draw(st.sampled_from([[32], [4, 8], [2, 4, 4]])) if i == 0 else \
                draw(st.lists(st.integers(0, 6), max_size=3).filter(lambda s: 2 * _prod(s) % 2 == 0))
        else:
            name = draw(NAMES)
            dtype = draw(st.one_of(st.sampled_from(DTYPES), st.sampled_from(["F128", "", "f32"]), JSON_ANY))
            if draw(st.booleans()):
                shape = draw(st.lists(st.integers(0, 6), max_size=3))
            else:
                shape = draw(st.one_of(st.lists(DIMS, max_size=3), JSON_ANY))
        n = 0
        if isinstance(dtype, str) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            n = _prod(shape) * BITS.get(dtype, 8) // 8
        offsets = [pos, pos + n] if valid else \
            draw(st.one_of(st.just([pos, pos + n]), st.just([pos + n, pos]),
                           st.lists(st.one_of(st.integers(-5, 2 ** 65), st.booleans(), st.floats()), max_size=3),
                           JSON_ANY))
        if offsets == [pos, pos + n]:
            pos += n
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if not valid:
            for field in draw(st.sets(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
                del entry[field]
        if draw(st.integers(0, 3)) == 0:
            entry["extra"] = draw(JSON_ANY)
        text = json.dumps(entry)
        if not valid and draw(st.integers(0, 9)) == 0:  # a structural field twice
            text = text[:-1] + ', "dtype": "F32"}'
        if not valid and draw(st.integers(0, 9)) == 0:
            text = draw(JSON_ANY).__repr__() if draw(st.booleans()) else json.dumps(draw(JSON_ANY))
        pairs.append((name, text))
    meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                          *([] if valid else [JSON_ANY])))
    if meta is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", json.dumps(meta)))
    header = ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}").encode("utf-8", "surrogatepass")
    header += b" " * draw(st.integers(0, 9))  # padding the writer may add
    # A header may claim terabytes (a dimension of 2^40): the data written stops at 1 MiB,
    # so the file is then truncated, which is one more flaw to survive.
    data = bytes(draw(st.binary(min_size=pos, max_size=pos))) if pos < 1024 else os.urandom(min(pos, 1 << 20))
    length = len(header) if valid else draw(st.one_of(st.just(len(header)), st.integers(0, 2 ** 64 - 1),
                                                      st.integers(max(0, len(header) - 3), len(header) + 3)))
    raw = struct.pack("<Q", length) + header + data
    how = draw(st.sampled_from(["keep", "keep", "keep", "trail", "cut", "flip"]))
    if how == "trail":
        raw += draw(st.binary(min_size=1, max_size=16))
    elif how == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    return raw


@FUZZ
@given(st.lists(safetensors_files(), min_size=1, max_size=4))
def test_fuzz_safetensors_headers(files):
    with tempfile.TemporaryDirectory() as d:
        for i, raw in enumerate(files):
            Path(d, f"f{i}.safetensors").write_bytes(raw)
        check_folder(Path(d))


def test_fuzz_safetensors_valid_file_passes_the_generator_sanity_check(tmp_path):
    """The harness itself: a valid file from the same writer gets an ok row (so the fuzz
    reaches the carrier read, not only the header checks)."""
    hdr = json.dumps({CARRIER: {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}).encode()
    (tmp_path / "ok.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + torch.randn(32).numpy().tobytes())
    res = check_folder(tmp_path)
    assert [r["status"] for r in res.rows] == ["ok"]


# ------------------------------------------------------------------ (b) torch zip members
def _torch_bytes(legacy: bool = False, evil: Path | None = None, view: bool = False) -> bytes:
    g = torch.Generator().manual_seed(0)
    sd = {CARRIER: torch.randn(32, generator=g), "b": torch.randn(3, generator=g)}
    if view:
        sd["v"] = sd[CARRIER][:4]  # a view sharing the carrier's storage
    if evil is not None:
        sd["payload"] = Evil(evil)
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


MEMBER_NAMES = st.one_of(st.sampled_from(["archive/data.pkl", "archive/byteorder", "archive/version",
                                          "archive/data/0", "archive/data/1", "archive/data/99", "../x",
                                          "/abs/data.pkl", "archive/.data/serialization_id", "other/data.pkl",
                                          "archive/data/0/../../data.pkl", "a\x1b[31m/data.pkl"]),
                         st.text(max_size=12).map(lambda s: "archive/" + s))


def _mutate(draw, raw: bytes) -> bytes:
    if not raw:
        return raw
    how = draw(st.sampled_from(["flip", "cut", "insert", "keep"]))
    i = draw(st.integers(0, 1 << 24)) % len(raw)  # not bounded by len(raw): that varies (deflate, random ids)
    if how == "flip":
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if how == "cut":
        return raw[:i]
    if how == "insert":
        return raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
    return raw


@st.composite
def torch_files(draw, evil_marker: Path) -> bytes:
    """Bytes of a torch file: a real one whose zip members are dropped, renamed, replaced,
    mutated or added to (or a legacy one, mutated)."""
    kind = draw(st.sampled_from(["zip", "zip", "zip", "evil", "legacy"]))
    raw = _torch_bytes(legacy=kind == "legacy", evil=evil_marker if kind == "evil" else None,
                       view=draw(st.booleans()))
    if kind == "legacy":
        return _mutate(draw, raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "rename", "replace", "mutate", "add", "byteorder", "version"]))
        j = draw(st.integers(0, len(members) - 1)) if members else 0
        if op == "drop" and members:
            members.pop(j)
        elif op == "rename" and members:
            members[j] = (draw(MEMBER_NAMES), members[j][1])
        elif op == "replace" and members:
            members[j] = (members[j][0], draw(st.binary(max_size=64)))
        elif op == "mutate" and members:
            members[j] = (members[j][0], _mutate(draw, members[j][1]))
        elif op == "add":
            members.append((draw(MEMBER_NAMES), draw(st.binary(max_size=32))))
        elif op in ("byteorder", "version"):
            value = draw(st.sampled_from([b"big", b"little", b"", b"middle", b"3", b"999999", b"-1", b"\xff"]))
            members = [(n, value if n.endswith("/" + op) else b) for n, b in members]
    out = io.BytesIO()
    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # duplicates are the point
    compress = zipfile.ZIP_DEFLATED if draw(st.integers(0, 4)) == 0 else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=compress) as z:
        for name, data in members:
            with contextlib.suppress(ValueError):  # a name zipfile itself refuses
                z.writestr(name, data)
    raw = out.getvalue()
    return _mutate(draw, raw) if draw(st.integers(0, 3)) == 0 else raw


_EVIL_DIR = Path(tempfile.mkdtemp(prefix="nnmark-fuzz-evil-"))
EVIL_MARKER = _EVIL_DIR / "pwned"


@FUZZ
@given(st.lists(torch_files(EVIL_MARKER), min_size=1, max_size=3))
def test_fuzz_torch_zip_members(files):
    with tempfile.TemporaryDirectory() as d:
        for i, raw in enumerate(files):
            Path(d, f"f{i}.pt").write_bytes(raw)
        # a trigger key too: it loads every tensor of the file (the state dict path)
        check_folder(Path(d), keys=(WB, TRIGGER), arch=PARITY_ARCH, evil_marker=EVIL_MARKER)


# ------------------------------------------------------------------ (c) Hugging Face shard indexes
SHARD_NAMES = st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors", "s1.pt", "missing.safetensors",
                                         "model.safetensors.index.json", "..", "../s1.safetensors", ".",
                                         "/etc/passwd", "", "sub/s1.safetensors", "./s1.safetensors",
                                         "s1.safetensors\x00", ".hidden.safetensors"]),
                        st.text(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))


@st.composite
def indexes(draw) -> bytes:
    wm = draw(st.one_of(st.dictionaries(st.one_of(st.just(CARRIER), st.just("b"), st.text(max_size=6)), SHARD_NAMES,
                                        max_size=4), JSON_ANY))
    body = draw(st.one_of(st.just({"metadata": {"total_size": 0}, "weight_map": wm}), st.just({"weight_map": wm}),
                          JSON_ANY))
    raw = json.dumps(body).encode()
    return _mutate(draw, raw) if draw(st.integers(0, 4)) == 0 else raw


@FUZZ
@given(st.lists(indexes(), min_size=1, max_size=2), st.booleans())
def test_fuzz_shard_indexes(index_bodies, shards_present):
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        if shards_present:
            save_file({CARRIER: torch.randn(32)}, os.path.join(d, "s1.safetensors"))
            save_file({"b": torch.randn(3)}, os.path.join(d, "s2.safetensors"))
            torch.save({CARRIER: torch.randn(32)}, os.path.join(d, "s1.pt"))
            os.mkdir(os.path.join(d, "sub"))
            save_file({CARRIER: torch.randn(32)}, os.path.join(d, "sub", "s1.safetensors"))
        names = ["model.safetensors.index.json", "pytorch_model.bin.index.json"]
        for name, raw in zip(names, index_bodies):
            Path(d, name).write_bytes(raw)
        check_folder(Path(d))


# ------------------------------------------------------------------ (d) key files
def _key_bodies() -> list[dict]:
    dense = nnmark.DenseKey.generate(carrier=CARRIER, bits=8, reduction="flat", shape=(16,)) \
        if hasattr(nnmark.DenseKey, "generate") else None
    out = [json.loads(Path(WB_PATH).read_text()), json.loads(Path(TRIGGER.save(os.path.join(KEYS_DIR, "t.key")))
                                                           .read_text())]
    if dense is not None:
        out.append(json.loads(Path(dense.save(os.path.join(KEYS_DIR, "d.key"))).read_text()))
    return out


KEY_BODIES = _key_bodies()


def _reseal(body: dict) -> None:
    """Recompute the integrity field so the mutation reaches the field checks (tolerant of
    how the key module computes it)."""
    from nnmark import keys

    for name in ("_checksum", "_mac", "_integrity"):
        fn = getattr(keys, name, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                body["checksum"] = fn(body)
            return




@st.composite
def key_files(draw) -> bytes:
    body = dict(draw(st.sampled_from(KEY_BODIES)))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(sorted(body) + ["extra"]))
        op = draw(st.sampled_from(["set", "set", "delete"]))
        if op == "delete":
            body.pop(field, None)
        else:
            body[field] = draw(st.one_of(JSON_ANY, st.sampled_from([True, 1.5, -1, 0, 10 ** 12, 2 ** 64, "", [],
                                                                    [10 ** 9, 10 ** 9], "0" * 64, "ff" * 31]),
                                         st.lists(st.integers(-2, 2 ** 40), max_size=4)))
    if draw(st.booleans()):
        _reseal(body)
    raw = json.dumps(body).encode()
    return _mutate(draw, raw) if draw(st.integers(0, 4)) == 0 else raw


@FUZZ
@given(key_files())
def test_fuzz_key_files(raw):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d, "k.key")
        p.write_bytes(raw)
        os.chmod(p, 0o600)
        try:
            key = _bounded(nnmark.load_key, p)
        except nnmark.KeyFileError as exc:
            _event("KeyFileError")
            msg = str(exc)
            for body in KEY_BODIES:  # a message never shows a secret, even a damaged key's
                secret = body.get("secret")
                if isinstance(secret, str) and len(secret) >= 32:
                    assert secret[:24] not in msg and secret[-24:] not in msg
            return
        _event("loaded")
        assert key.key_id  # anything else: a usable key


# ------------------------------------------------------------------ (e) file names
_BYTE_NAMES = [b"caf\xff.safetensors", b"\xc3\x28.pt", b"\xed\xa0\x80.pt", b"\x80\x81\x82"]
FILE_NAMES = st.one_of(
    st.sampled_from(["[b]x[/b].safetensors", "[bold red]x[/bold red].pt", "\x1b[31mred\x1b[0m.safetensors",
                     "\x1b]0;pwned\x07.pt", "a\nb.pt", "tab\there.pt", "\x9b31m.pt", "x\u202etxt.pt",
                     "bell\x07.pt", "back\\slash.pt", "sp ace .pt", "模型.safetensors", "e\u0301.pt",
                     "x" * 250 + ".pt", "%s%n{}.pt", "-rf.pt", "--key.pt", "\x7f.pt"]),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\x00"), min_size=1, max_size=40),
    st.sampled_from(_BYTE_NAMES).map(os.fsdecode),
    st.binary(min_size=1, max_size=30).filter(lambda b: b"/" not in b and b"\0" not in b).map(os.fsdecode),
).filter(lambda n: n not in (".", "..") and len(os.fsencode(n)) <= 255)



def _content(kind: str) -> bytes | None:
    if kind == "ok":
        from safetensors.torch import save

        return save({CARRIER: torch.randn(32)})
    if kind == "torch":
        return _torch_bytes()
    if kind == "junk":
        return b"\x00junk\x1b[31m"
    return b""


@FUZZ
@given(st.lists(st.tuples(FILE_NAMES, st.sampled_from(["ok", "torch", "junk", "empty"])), min_size=1, max_size=4,
                unique_by=lambda t: os.fsencode(t[0])), st.booleans(), st.one_of(st.none(), FILE_NAMES))
def test_fuzz_file_names_scan_and_cli(named, with_fifo, folder):
    with tempfile.TemporaryDirectory() as d:
        if folder is not None and not folder.startswith("."):  # a folder of its own name: "[" + "/x].pt"...
            with contextlib.suppress(OSError):
                os.mkdir(os.path.join(d, folder))
                d = os.path.join(d, folder)
        for name, kind in named:
            try:
                Path(d, name).write_bytes(_content(kind))
            except OSError:  # a name this filesystem refuses
                pass
        if with_fifo:
            os.mkfifo(os.path.join(d, "\x1b[31mpipe"))
        check_folder(Path(d), verify_each=False)
        ledger = os.path.join(tempfile.mkdtemp(prefix="nnmark-fuzz-ledger-"), "l.sqlite")
        code, out, err = run_cli(["scan", d, "--key", WB_PATH, "--ledger", ledger, "--no-progress"])
        assert code in (0, 1, 2, 3), (code, out, err)
        assert_clean_output(out + err)
        files = sorted(expand_paths(d))[:2]
        if files:
            code, out, err = run_cli(["verify", WB_PATH, *files])
            assert code in (0, 1, 2), (code, out, err)
            assert_clean_output(out + err)
        code, out, err = run_cli(["scan", d, "--key", WB_PATH, "--ledger", ledger, "--no-progress", "--json"])
        assert code in (0, 1, 2, 3)
        assert SECRET_HEX not in out + err and "Traceback" not in out + err
        for line in out.splitlines():  # JSON rows: escapes, never a raw control character
            json.loads(line)
            assert "\x1b" not in line


def test_cli_in_a_subprocess_prints_names_inert(tmp_path):
    """The installed entry point (not in-process): hostile names, a FIFO, an Evil pickle."""
    import subprocess

    (tmp_path / "[").mkdir()
    for name in ("\x1b[31mred.safetensors", "[/x].pt", "ok.safetensors"):  # "[/x]": rich's closing tag
        (tmp_path / name).write_bytes(_content("ok"))
    (tmp_path / os.fsdecode(b"caf\xff.pt")).write_bytes(_torch_bytes())
    (tmp_path / "evil.pt").write_bytes(_torch_bytes(evil=tmp_path.parent / "pwned-sub"))
    os.mkfifo(tmp_path / "pipe")
    env = {**os.environ, "COLUMNS": "200"}
    cp = subprocess.run([sys.executable, "-m", "nnmark", "scan", str(tmp_path), "--key", WB_PATH, "--ledger",
                         str(tmp_path.parent / "l.sqlite"), "--no-progress"], capture_output=True, env=env,
                        timeout=120)
    text = cp.stdout.decode("utf-8", "replace") + cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 2, text  # the evil file, the FIFO and the junk are rows that could not be checked
    assert_clean_output(text)
    assert not (tmp_path.parent / "pwned-sub").exists()
    # verify's table lists every file: the name is shown, escaped
    cp = subprocess.run([sys.executable, "-m", "nnmark", "verify", WB_PATH, str(tmp_path / "\x1b[31mred.safetensors"),
                         str(tmp_path / "[/x].pt")], capture_output=True, env=env, timeout=120)
    text = cp.stdout.decode("utf-8", "replace") + cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 1, text  # checked, not marked
    assert_clean_output(text)
    assert re.search(r"\\x1b\[31mred", text) and "[/x].pt" in text, text
