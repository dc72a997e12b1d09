"""What a scan walks (issue 13): every file under the paths gets a row or a named
exclusion; walks and globs never loop, never visit one file twice; shard indexes,
manifests and special files never hang a scan."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import nnmark
from nnmark.checkpoints import CheckpointError, index_shards
from nnmark.cli import main
from nnmark.scan import NOT_CHECKED, expand_paths, load_manifest, walk_paths, write_manifest
from nnmark.scan import paths as paths_mod
from nnmark.scan.manifest import integrity

CARRIER = "conv.weight"
SHAPE = (8, 3, 3, 3)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LIMIT_S = 60  # a regression that hangs fails here instead of stopping the suite


@pytest.fixture(scope="module")
def key_and_w():
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32, reduction="filter_mean", shape=SHAPE)
    torch.manual_seed(0)
    w = (0.1 * torch.randn(SHAPE)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(200):  # a carrier that carries the bits with margin (a stand-in for training)
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(key.project(w), key.bits.float(), reduction="sum")
        loss.backward()
        opt.step()
        if loss.item() < 1e-2:
            break
    w = w.detach()
    assert nnmark.verify(key, w).verified
    return key, w


def _bounded(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread: its result, or a failure when it has not finished in LIMIT_S."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LIMIT_S)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not finish in {LIMIT_S} s (blocked?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _save(w, path):
    save_file({CARRIER: w}, str(path))
    return str(path)


def _plain(path):
    """A checkpoint without the carrier (its row: absent)."""
    save_file({"other.weight": torch.randn(3)}, str(path))
    return str(path)


def _scan(key, paths, **kw):
    return _bounded(nnmark.scan, key, paths, ledger=None, progress=False, workers=2, **kw)


def _by_name(res):
    return {os.path.basename(r["path"]): r for r in res.rows}


# ------------------------------------------------------------------ loops, duplicates
def test_glob_through_a_symlink_loop_ends_with_one_row_per_real_file(tmp_path, key_and_w):
    key, w = key_and_w
    root = tmp_path / "root"
    (root / "a" / "deep").mkdir(parents=True)
    _save(w, root / "a" / "x.safetensors")
    _save(w, root / "a" / "deep" / "y.safetensors")
    os.symlink("..", root / "a" / "up")  # root/a/up -> root: ** through it would never end
    os.symlink("../..", root / "a" / "deep" / "top")
    os.symlink("a", root / "b")  # a second way into a: its files are duplicates
    for pattern in (str(root / "**" / "*.safetensors"), str(root / "**"), str(root)):
        exp = _bounded(walk_paths, [pattern])
        assert sorted(exp.files) == [str(root / "a" / "deep" / "y.safetensors"), str(root / "a" / "x.safetensors")]
        assert sorted(exp.left_out["loop"]) == [str(root / "a" / "deep" / "top"), str(root / "a" / "up")]
        assert exp.left_out["duplicate"] == [str(root / "b")]
    res = _scan(key, [str(root / "**" / "*.safetensors")])
    assert sorted(_by_name(res)) == ["x.safetensors", "y.safetensors"]
    assert all(r["verified"] for r in res.rows)
    assert res.summary["left_out"] == {"loop": 2, "duplicate": 1}
    assert res.exit_code == 2  # every file checked verified, but two links were not followed


def test_self_link_and_link_cycle(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    os.symlink("self", tmp_path / "self")
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    for pattern in (str(tmp_path), str(tmp_path / "*"), str(tmp_path / "**" / "*")):
        exp = _bounded(walk_paths, pattern)
        assert exp.files == [str(tmp_path / "m.pt")]
        assert sorted(exp.left_out["loop"]) == [str(tmp_path / n) for n in ("a", "b", "self")]


def test_a_file_reached_twice_gets_one_row_under_its_first_path(tmp_path, key_and_w):
    key, w = key_and_w
    _save(w, tmp_path / "b.safetensors")
    os.symlink("b.safetensors", tmp_path / "a.safetensors")  # sorts first: its path wins
    os.link(tmp_path / "b.safetensors", tmp_path / "c.safetensors")  # a hard link
    (tmp_path / "z").mkdir()
    _save(w, tmp_path / "z" / "m.safetensors")
    os.symlink("z", tmp_path / "l")  # l sorts before z: the files are found under l/
    exp = walk_paths([str(tmp_path), str(tmp_path / "b.safetensors")])  # overlapping arguments too
    assert exp.files == [str(tmp_path / "a.safetensors"), str(tmp_path / "l" / "m.safetensors")]
    assert exp.left_out == {"duplicate": [str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors"),
                                          str(tmp_path / "z")]}
    assert exp.not_checked == 0
    res = _scan(key, [str(tmp_path)])
    assert len(res.rows) == 2 and all(r["verified"] for r in res.rows)
    assert res.summary["left_out"] == {"duplicate": 3}
    assert res.exit_code == 0  # a duplicate was checked, under its first path


# ------------------------------------------------------------------ what is left out, and the exit code
def test_hidden_outside_and_unlisted_are_counted_and_exit_2(tmp_path, key_and_w, monkeypatch):
    key, w = key_and_w
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "locked").mkdir(parents=True)
    (root / ".cache").mkdir()
    elsewhere.mkdir()
    _save(w, root / "m.safetensors")
    _save(w, root / ".hidden.safetensors")
    _save(w, root / ".cache" / "c.safetensors")
    _save(w, root / "locked" / "l.safetensors")
    _save(w, elsewhere / "e.safetensors")
    os.symlink(elsewhere / "e.safetensors", root / "e.safetensors")  # a link to a file outside
    os.symlink(elsewhere, root / "ext")  # a link to a folder outside
    os.symlink("/dev/zero", root / "zero")
    locked = str(root / "locked")
    if IS_ROOT:  # root lists any folder: refuse this one the way the kernel would
        real = os.scandir

        def deny(path="."):
            if os.fspath(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(os, "scandir", deny)
    else:
        os.chmod(locked, 0)
    try:
        res = _scan(key, [str(root)])
        assert list(_by_name(res)) == ["m.safetensors"] and res.rows[0]["verified"]
        s = res.summary
        assert s["left_out"] == {"hidden": 2, "unlisted_folder": 1, "outside": 3}
        assert s["left_out_examples"]["hidden"] == [str(root / ".cache"), str(root / ".hidden.safetensors")]
        assert s["left_out_examples"]["unlisted_folder"] == [locked]
        assert s["left_out_examples"]["outside"] == [str(root / n) for n in ("e.safetensors", "ext", "zero")]
        assert res.exit_code == 2  # the one file checked verified; not everything was checked
        # hidden files are checked when asked for; an --exclude pattern silences a reason
        res = _scan(key, [str(root)], include_hidden=True, exclude=["*/locked", "ext", "zero", "e.safetensors"])
        assert sorted(_by_name(res)) == [".hidden.safetensors", "c.safetensors", "m.safetensors"]
        assert res.summary["left_out"] == {"excluded": 4} and res.exit_code == 0
        # a link named on the command line is followed as given
        res = _scan(key, [str(root / "ext"), str(root / "e.safetensors")])
        assert [r["path"] for r in res.rows] == [str(root / "ext" / "e.safetensors")]
        assert res.summary["left_out"] == {"duplicate": 1} and res.exit_code == 0
    finally:
        if not IS_ROOT:
            os.chmod(locked, 0o755)


def test_nothing_found_is_exit_3_but_only_hidden_is_exit_2(tmp_path, key_and_w):
    key, w = key_and_w
    (tmp_path / "empty").mkdir()
    (tmp_path / "dots").mkdir()
    _save(w, tmp_path / "dots" / ".m.safetensors")
    assert _scan(key, [str(tmp_path / "empty")]).exit_code == 3
    assert _scan(key, [str(tmp_path / "empty" / "*.pt")]).exit_code == 3
    res = _scan(key, [str(tmp_path / "dots")])
    assert res.summary["files"] == 0 and res.summary["left_out"] == {"hidden": 1} and res.exit_code == 2
    res = _scan(key, [str(tmp_path / "dots")], exclude=[".m.*"])
    assert res.summary["left_out"] == {"excluded": 1} and res.exit_code == 3
    # a glob's dot names follow glob's rule: '*' skips them (and says so), '.*' asks for them
    assert walk_paths(str(tmp_path / "dots" / "*")).left_out == {"hidden": [str(tmp_path / "dots" / ".m.safetensors")]}
    assert walk_paths(str(tmp_path / "dots" / ".*")).files == [str(tmp_path / "dots" / ".m.safetensors")]


def _deep_dir(top, depth: int, name_len: int = 200) -> str:
    """A chain of folders whose path is longer than PATH_MAX (made relative to
    descriptors: no absolute path that long can be used), with a file at the end."""
    fd = os.open(top, os.O_RDONLY)
    parts = []
    try:
        for i in range(depth):
            name = f"{i:03d}" + "d" * (name_len - 3)
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            parts.append(name)
        os.close(os.open("m.pt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return os.path.join(str(top), *parts)


def test_paths_longer_than_the_system_allows_are_counted(tmp_path, key_and_w):
    key, w = key_and_w
    limit = os.pathconf(str(tmp_path), "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    (tmp_path / "t").mkdir()
    deep = _deep_dir(tmp_path / "t", depth=limit // 200 + 2)
    _save(w, tmp_path / "t" / "m.safetensors")
    try:
        res = _scan(key, [str(tmp_path / "t")])
        assert [os.path.basename(r["path"]) for r in res.rows] == ["m.safetensors"]
        assert res.summary["left_out"] == {"too_long": 1}
        assert len(res.summary["left_out_examples"]["too_long"][0]) >= limit
        assert deep.startswith(res.summary["left_out_examples"]["too_long"][0])
        assert res.exit_code == 2
    finally:
        shutil.rmtree(tmp_path / "t")  # (rmtree works relative to descriptors: long paths are fine)


# ------------------------------------------------------------------ shard indexes
def _index(folder, weight_map: dict, name="model.safetensors.index.json"):
    p = folder / name
    p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(p)


def test_an_index_that_lists_itself_hides_nothing(tmp_path, key_and_w):
    key, w = key_and_w
    _plain(tmp_path / "other.safetensors")
    marked = _save(w, tmp_path / "marked.safetensors")
    idx = _index(tmp_path, {"a": "model.safetensors.index.json", CARRIER: "marked.safetensors"})
    with pytest.raises(CheckpointError, match="lists itself"):
        index_shards(idx)
    res = _scan(key, [str(tmp_path)])
    by = _by_name(res)
    assert (by["model.safetensors.index.json"]["status"], by["model.safetensors.index.json"]["error_class"]) == \
        ("corrupt", "BadIndex")
    assert by["marked.safetensors"]["verified"] and by["marked.safetensors"]["path"] == marked
    assert set(by) == {"model.safetensors.index.json", "marked.safetensors", "other.safetensors"}
    # another index as a shard, and a shard linked to the index itself: refused alike
    _index(tmp_path, {CARRIER: "model.safetensors.index.json"}, name="b.index.json")
    os.symlink("model.safetensors.index.json", tmp_path / "alias.safetensors")
    _index(tmp_path, {CARRIER: "alias.safetensors"}, name="c.index.json")
    for name in ("b.index.json", "c.index.json"):
        with pytest.raises(CheckpointError) as exc:
            index_shards(str(tmp_path / name))
        assert exc.value.error_class == "BadIndex"
    # a valid index still stands for its shards
    hf = tmp_path / "hf"
    hf.mkdir()
    _save(w, hf / "s1.safetensors")
    _plain(hf / "s2.safetensors")
    _index(hf, {CARRIER: "s1.safetensors"})
    assert expand_paths(str(hf)) == [str(hf / "model.safetensors.index.json"), str(hf / "s2.safetensors")]


def test_a_shard_linked_outside_the_folder_is_refused(tmp_path, key_and_w):
    key, w = key_and_w
    hf, elsewhere = tmp_path / "hf", tmp_path / "elsewhere"
    hf.mkdir()
    elsewhere.mkdir()
    _save(w, elsewhere / "marked.safetensors")
    os.symlink(elsewhere / "marked.safetensors", hf / "model-00001.safetensors")
    _plain(hf / "model-00002.safetensors")
    idx = _index(hf, {CARRIER: "model-00001.safetensors", "b": "model-00002.safetensors"})
    v = nnmark.verify(key, idx)
    assert (v.status, v.error_class) == ("corrupt", "BadIndex") and not v.verified
    assert "outside" in v.error_message
    res = _scan(key, [str(hf)])
    by = _by_name(res)
    assert (by["model.safetensors.index.json"]["status"], by["model.safetensors.index.json"]["error_class"]) == \
        ("corrupt", "BadIndex")
    assert "model-00002.safetensors" in by  # the index is refused: its shards get their own rows
    assert res.summary["left_out"] == {"outside": 1} and res.exit_code == 2
    # a link to a file inside the folder is a shard like any other
    os.remove(hf / "model-00001.safetensors")
    (hf / "blobs").mkdir()
    _save(w, hf / "blobs" / "b1")
    os.symlink("blobs/b1", hf / "model-00001.safetensors")
    assert nnmark.verify(key, idx).verified


def test_fifos_as_index_and_as_shard_never_block(tmp_path, key_and_w):
    key, w = key_and_w
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.mkfifo(a / "model.safetensors.index.json")  # opening it for reading would wait for a writer
    _save(w, a / "model-00001.safetensors")
    os.mkfifo(b / "model-00002.safetensors")
    _save(w, b / "model-00001.safetensors")
    idx = _index(b, {CARRIER: "model-00001.safetensors", "x": "model-00002.safetensors"})
    res = _scan(key, [str(a), str(b)])
    got = {os.path.relpath(r["path"], tmp_path): (r["status"], r["error_class"]) for r in res.rows}
    assert got == {"a/model-00001.safetensors": ("ok", None),
                   "a/model.safetensors.index.json": ("unsupported", "NotARegularFile"),
                   "b/model-00001.safetensors": ("ok", None),
                   "b/model-00002.safetensors": ("unsupported", "NotARegularFile"),
                   "b/model.safetensors.index.json": ("corrupt", "BadIndex")}
    assert _bounded(nnmark.verify, key, idx).error_class == "BadIndex"
    with pytest.raises(CheckpointError):
        _bounded(index_shards, str(a / "model.safetensors.index.json"))


# ------------------------------------------------------------------ manifests
def test_manifest_never_blocks_on_fifos_or_devices(tmp_path, key_and_w):
    key, w = key_and_w
    d = tmp_path / "d"
    d.mkdir()
    _save(w, d / "m.safetensors")
    os.mkfifo(d / "pipe")
    os.symlink("/dev/zero", tmp_path / "zero")  # named explicitly: followed, and refused at once
    os.symlink("/dev/urandom", d / "random")  # inside the folder: a link leaving it
    man = tmp_path / "man.sha256"
    n, failed = _bounded(write_manifest, [str(d), str(tmp_path / "zero")], man)
    assert n == 1 and sorted(failed) == [str(d / "pipe"), str(tmp_path / "zero")]
    assert set(load_manifest(man)) == {str(d / "m.safetensors")}
    res = _scan(key, [str(d)], manifest=str(man))
    by = _by_name(res)
    assert by["m.safetensors"]["integrity"] == "ok" and by["pipe"]["error_class"] == "NotARegularFile"
    # the CLI: the link leaving the folder is said, and makes the exit code 2
    code, _, err = _cli(["manifest", "--no-progress", d, "-o", tmp_path / "m2.sha256"])
    assert code == 2 and "left out: 1 links to targets outside the folder given" in err.decode()
    # a manifest that is a FIFO or a device is refused, not read
    for bad in (d / "pipe", tmp_path / "zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            _bounded(load_manifest, bad)
    with pytest.raises(ValueError, match="not a regular file"):
        _scan(key, [str(d / "m.safetensors")], manifest=str(d / "pipe"))


def test_load_manifest_caps_its_size(tmp_path, monkeypatch):
    from nnmark.scan import manifest as manifest_mod

    p = tmp_path / "big.sha256"
    p.write_bytes(b"0" * 64 + b"  x\n" * 100)
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", 200)
    with pytest.raises(ValueError, match="more than the 200"):
        load_manifest(p)


def _cli(args):
    """(exit code, stdout bytes, stderr bytes) of ``nnmark ARGS``, run here (bounded in time)."""
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="surrogateescape", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        _bounded(main, [str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout, sys.stderr = saved
    stdout.flush()
    stderr.flush()
    return code, out.getvalue(), err.getvalue()


def test_names_that_are_not_utf8_round_trip_through_the_manifest(tmp_path, key_and_w):
    key, w = key_and_w
    d = tmp_path / "d"
    d.mkdir()
    odd = os.fsdecode(b"m\xff\xfe.safetensors")  # not UTF-8: surrogate escapes
    _save(w, os.path.join(d, odd))
    _save(w, d / "back\\slash\nnew\rline.safetensors")
    os.mkfifo(os.path.join(d, os.fsdecode(b"pipe\xff\x1b[31m")))  # its warning shows the name inert
    man = tmp_path / "man.sha256"
    code, _, err = _cli(["manifest", "--no-progress", d, "-o", man])
    assert code == 2, err  # the pipe could not be read
    assert b"\x1b" not in err and b"pipe\\xff\\x1b[31m" in err
    raw = man.read_bytes()
    assert b"m\xff\xfe.safetensors" in raw  # the name's own bytes, as sha256sum writes it
    got = load_manifest(man)
    names = [os.path.join(d, odd), str(d / "back\\slash\nnew\rline.safetensors")]
    assert got == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in names}
    if shutil.which("sha256sum"):  # the format is sha256sum's own
        check = subprocess.run(["sha256sum", "-c", man.name], cwd=tmp_path, capture_output=True, timeout=LIMIT_S)
        assert check.returncode == 0, check.stdout + check.stderr
    # to stdout, the same bytes
    code, out, _ = _cli(["manifest", "--no-progress", os.path.join(d, odd)])
    assert code == 0 and os.fsencode(os.path.join(d, odd)) in out
    # what a scan checks against it: the file is listed, under the same name
    assert integrity(os.path.join(d, odd), False, got)[0] == "ok"


# ------------------------------------------------------------------ the CLI says what was left out
def test_cli_scan_names_what_was_left_out(tmp_path, key_and_w, capsys):
    key, w = key_and_w
    kf = tmp_path / "owner.key"
    key.save(kf)
    d = tmp_path / "d"
    d.mkdir()
    _save(w, d / "m.safetensors")
    _save(w, d / ".\x1b]0;pwned\x07[red].safetensors")  # a hidden name with escapes and markup
    base = ["scan", "--key", kf, "--ledger", tmp_path / "l.sqlite", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in base + [d]])
    out = capsys.readouterr().out
    assert exc.value.code == 2
    line = next(x for x in out.splitlines() if x.startswith("left out:"))
    assert "1 hidden" in line and "--include-hidden" in line and "\\x1b]0;pwned\\x07[red]" in line
    assert "\x1b" not in out and "\x07" not in out
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in base + ["--include-hidden", "--rescan", d]])
    assert exc.value.code == 0 and "left out" not in capsys.readouterr().out


def test_not_checked_reasons_are_the_ones_that_change_the_exit_code():
    assert set(NOT_CHECKED) == {"hidden", "unlisted_folder", "loop", "outside", "too_long"}
    assert set(paths_mod.LEFT_OUT_REASONS) - set(NOT_CHECKED) == {"duplicate", "excluded"}
