"""One engine: the same source gives the same answer through every front door.

One corpus -- every format, every kind of damage the reader tests make, the two files
on which ``verify`` and ``scan`` once disagreed (a Hugging Face shard index; a finite
carrier whose filter_mean overflows float32), plus modules and state dicts in memory --
checked through ``nnmark.verify``, ``nnmark.scan`` (local and Ray), ``nnmark.calibrate``
and the CLI's ``verify --json`` / ``scan --json``: identical status, error class,
matches and p-value for every (source, key).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import nnmark
from nnmark.cli import main
from nnmark.rows import FIELDS, TIMING_FIELDS

from _corpus import PARITY_ARCH, parity_corpus, parity_keys

# bytes_read counts every key's reads of a file: a scan with three keys reads more of a
# file than a verify with one.
_PER_CALL = set(TIMING_FIELDS) | {"bytes_read", "skipped"}
_VERDICT = ("status", "error_class", "verified", "matches", "p_value", "threshold", "ber")


def _same(row):
    return {k: v for k, v in row.items() if k not in _PER_CALL}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    keys = parity_keys()
    key_dir = tmp_path_factory.mktemp("parity-keys")
    key_files = []
    for i, k in enumerate(keys):
        key_files.append(str(k.save(key_dir / f"k{i}.key")))
    memory, what = parity_corpus(root, keys)
    scan = nnmark.scan(list(keys), [str(root)], arch=PARITY_ARCH, progress=False)
    files = sorted({r["path"] for r in scan.rows})
    rows = {(r["path"], r["key_id"]): r for r in scan.rows}
    assert len(rows) == len(scan.rows) == len(files) * len(keys)  # one row per (file, key)
    return root, keys, key_files, memory, what, files, rows, scan


def test_the_corpus_covers_every_status_and_the_two_old_disagreements(corpus):
    root, keys, _, _, what, files, rows, _ = corpus
    assert {os.path.relpath(f, root) for f in files} == set(what) - {"bad/missing.pt"}
    statuses = {r["status"] for r in rows.values()}
    # every status a file can earn ("error" is nnmark's own failure: no file may cause it;
    # tests/test_hostile.py forces one)
    assert statuses == set(nnmark.rows.STATUSES) - {"error"}
    wb = keys[0].key_id
    hf = rows[(str(root / "hf" / "model.safetensors.index.json"), wb)]
    assert (hf["status"], hf["format"], hf["verified"]) == ("ok", "hf-sharded", True)
    over = rows[(str(root / "overflow.safetensors"), wb)]
    assert (over["status"], over["error_class"]) == ("invalid", "ProjectionOverflow")
    marked = [r for (p, k), r in rows.items() if k == wb and os.path.basename(p).startswith("marked")]
    assert len(marked) == 8 and all(r["verified"] for r in marked)  # 5 formats + 3 dtypes
    assert not any(r["verified"] for (p, k), r in rows.items() if "plain" in os.path.basename(p))


@pytest.mark.parametrize("which", [0, 1, 2], ids=["whitebox", "whitebox-flat", "trigger"])
def test_verify_equals_scan_for_every_file(corpus, which):
    root, keys, _, _, _, files, rows, _ = corpus
    key = keys[which]
    verdicts = nnmark.verify(key, files, arch=PARITY_ARCH)
    for path, v in zip(files, verdicts):
        assert _same(v.to_dict()) == _same(rows[(path, key.key_id)]), path
    one = nnmark.verify(key, str(root / "hf" / "model.safetensors.index.json"), arch=PARITY_ARCH)
    assert one.status == "ok" and one.format == "hf-sharded"


@pytest.mark.parametrize("which", [0, 1, 2], ids=["whitebox", "whitebox-flat", "trigger"])
def test_calibrate_equals_scan(corpus, which):
    _, keys, _, _, _, files, rows, _ = corpus
    key = keys[which]
    good = [p for p in files if rows[(p, key.key_id)]["status"] == "ok"]
    cal = nnmark.calibrate(key, good, arch=PARITY_ARCH)
    want = [rows[(p, key.key_id)] for p in good]
    assert [round(r * cal.n) for r in cal.rates] == [r["matches"] for r in want]
    assert cal.p_values == [r["p_value"] for r in want]
    assert cal.counts == [r["matches"] for r in want]
    assert cal.nominal_threshold == want[0]["threshold"] and cal.false_positives == sum(r["verified"] for r in want)
    for p in files:  # a model that cannot be checked is named with the scan's status and class
        r = rows[(p, key.key_id)]
        if r["status"] != "ok":
            with pytest.raises(ValueError) as exc:  # among enough good ones: the bad one is named
                nnmark.calibrate(key, [p] + good[:9], arch=PARITY_ARCH)
            assert f"{r['status']} ({r['error_class']})" in str(exc.value), p


@pytest.mark.parametrize("which", [0, 1, 2], ids=["whitebox", "whitebox-flat", "trigger"])
def test_sources_in_memory_equal_the_same_sources_on_disk(corpus, tmp_path, which):
    _, keys, _, memory, _, _, _, _ = corpus
    key = keys[which]
    objs = [obj for _, obj in memory]
    in_memory = nnmark.verify(key, objs, arch=PARITY_ARCH)
    assert [v.path for v in in_memory][:2] == ["<module 0>", "<module 1>"]
    on_disk, disk_index = [], {}
    for i, (label, obj) in enumerate(memory):
        sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        if isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            p = tmp_path / f"m{i}.pt"
            torch.save({k: v.detach() for k, v in sd.items()}, p)
            disk_index[i] = len(on_disk)
            on_disk.append(str(p))
    from_files = nnmark.verify(key, on_disk, arch=PARITY_ARCH)
    for i, j in disk_index.items():
        a, b = in_memory[i], from_files[j]
        assert [getattr(a, f) for f in _VERDICT if f not in ("p_value", "ber")] == \
            [getattr(b, f) for f in _VERDICT if f not in ("p_value", "ber")], memory[i][0]
        assert (a.p_value == b.p_value or (a.status != "ok" and b.status != "ok")), memory[i][0]
    by_label = dict(zip([label for label, _ in memory], in_memory))
    assert by_label["<module marked>"].verified is (which == 0)
    assert by_label["<state_dict empty>"].error_class == "NoStateDict"
    assert by_label["<int 42>"].error_class == "UnsupportedSource"
    assert by_label["<module nan>"].status == ("invalid" if which == 0 else "ok")
    tensor = by_label["<tensor carrier>"]
    if which == 2:  # a bare tensor cannot be run
        assert (tensor.status, tensor.error_class) == ("unsupported", "NotAModel")
    elif which == 0:
        assert tensor.verified and tensor.matches == by_label["<state_dict marked>"].matches
    ok = [obj for (label, obj), v in zip(memory, in_memory) if v.status == "ok"]
    ok = (ok * 10)[:max(10, len(ok))]  # calibrate needs 10 models: the same ones again will do here
    cal = nnmark.calibrate(key, ok, arch=PARITY_ARCH)
    want = [v.p_value for v in in_memory if v.status == "ok"]
    assert cal.p_values == (want * 10)[:len(ok)]


def test_cli_verify_json_equals_scan_json(corpus, tmp_path, capsys):
    root, keys, key_files, _, _, files, _, _ = corpus
    objs = {}
    for cmd in ("verify", "scan"):
        args = [cmd, key_files[0], *files] if cmd == "verify" else \
            [cmd, "--key", key_files[0], str(root), "--ledger", str(tmp_path / "l.sqlite"), "--no-progress"]
        with pytest.raises(SystemExit) as exc:
            main(args + ["--json"])
        assert exc.value.code == 2  # the damaged files
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert all(list(o) == list(FIELDS) + ["skipped"] for o in out)  # one shape
        objs[cmd] = {o["path"]: {k: v for k, v in o.items() if k not in TIMING_FIELDS} for o in out}
    assert objs["verify"] == objs["scan"]


def test_ray_scan_equals_local_scan(corpus, ray_local, tmp_path):
    root, _, key_files, _, _, _, _, local = corpus
    # device="cpu": the test cluster has a logical GPU, which trigger scans would otherwise take
    on_ray = nnmark.scan(key_files, [str(root)], arch=PARITY_ARCH, device="cpu", progress=False, ray="auto",
                         batch_size=16, ledger=tmp_path / "ray.sqlite")
    assert [_same(r) for r in on_ray.rows] == [_same(r) for r in local.rows]
