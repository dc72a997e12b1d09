"""The scan's fast paths give the answers of the plain ones: the numpy batch reduction
(every float dtype, both element orders, both reductions) against key.reduce and
nnmark.verify, and the cache of parsed safetensors headers against damaged files that
share a cached header."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark.checkpoints import CheckpointError, open_file
from nnmark.scan import local
from nnmark.whitebox import reduce_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction,order", [("filter_mean", "torch"), ("filter_mean", "keras"), ("flat", "torch")])
def test_numpy_batch_reduction_matches_key_reduce(dtype, reduction, order):
    shape = (6, 5, 3, 2)
    if order == "keras":
        key = nnmark.DenseKey(torch.randn(32, 30).sign(), "w", torch.randint(0, 2, (32,)), reduction=reduction,
                              order="keras")
    else:
        key = nnmark.WhiteBoxKey.generate(carrier="w", bits=32, reduction=reduction)
    batch = torch.randn(7, *shape).to(dtype)
    got = reduce_cpu(key, batch)
    ref = key.reduce(batch.to(torch.float64 if dtype == torch.float64 else torch.float32), batched=True)
    assert got.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    assert got.shape == tuple(ref.shape) and got.flags.c_contiguous
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-7)
    # float8 has no numpy dtype: the caller falls back to torch
    if hasattr(torch, "float8_e4m3fn"):
        assert reduce_cpu(key, batch.to(torch.float32).to(torch.float8_e4m3fn)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scan_verdicts_equal_verify_for_every_dtype(tmp_path, dtype):
    key = nnmark.WhiteBoxKey.generate(carrier="conv.weight", bits=64)
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(6):
        p = tmp_path / f"m{i}.safetensors"
        save_file({"conv.weight": torch.randn(16, 8, 3, 3, generator=g).to(dtype)}, str(p))
        paths.append(str(p))
    rows = nnmark.scan(key, [str(tmp_path)], progress=False).rows
    for r, v in zip(rows, nnmark.verify(key, paths)):
        assert r["status"] == "ok" and (r["matches"], r["p_value"], r["verified"]) == (v.matches, v.p_value,
                                                                                         v.verified)


def _damaged_twins(tmp_path):
    """Files that share one header byte for byte: intact, cut short, padded."""
    sd = {"a": torch.randn(64, 8), "b": torch.randn(32)}
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    raw = good.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-4])
    (tmp_path / "long.safetensors").write_bytes(raw + b"\0" * 4)
    return good, raw


def test_cached_header_still_checks_each_file(tmp_path):
    good, raw = _damaged_twins(tmp_path)
    for _ in range(2):  # the second round finds the header in the cache
        with open_file(str(good)) as ck:
            assert ck.carrier("a").tensor.shape == (64, 8)
        with pytest.raises(CheckpointError) as exc:
            open_file(str(tmp_path / "short.safetensors"))
        assert exc.value.error_class == "TruncatedFile"
        with pytest.raises(CheckpointError) as exc:
            open_file(str(tmp_path / "long.safetensors"))
        assert exc.value.error_class == "TrailingBytes"
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert header["a"]["dtype"] == "F32"


def test_the_header_cache_is_bounded(tmp_path, monkeypatch):
    import nnmark.checkpoints as fm

    monkeypatch.setattr(fm, "_LAYOUTS", {})
    monkeypatch.setattr(fm, "_LAYOUT_CACHE_SIZE", 4)
    for i in range(10):  # ten different headers
        p = tmp_path / f"m{i}.safetensors"
        save_file({f"t{i}": torch.zeros(i + 1)}, str(p))
        with open_file(str(p)) as ck:
            assert ck.names() == [f"t{i}"]
    assert 0 < len(fm._LAYOUTS) <= 4


def test_deferred_hash_is_the_hash_of_the_bytes_read(tmp_path):
    w = torch.randn(16, 8, 3, 3)
    p = tmp_path / "m.safetensors"
    save_file({"conv.weight": w}, str(p))
    key = nnmark.WhiteBoxKey.generate(carrier="conv.weight", bits=32)
    (row,) = nnmark.scan(key, [str(p)], progress=False).rows
    assert row["carrier_sha256"] == hashlib.sha256(w.numpy().tobytes()).hexdigest()
    assert os.path.getsize(p) == row["size"]


def test_a_batch_hashed_at_once_gives_each_carrier_its_own_hash(tmp_path):
    # Runs of one length (4 side by side, then 2, then 1) and of several lengths and dtypes,
    # in one batch: every row still gets the hash of its own carrier's bytes.
    key = nnmark.WhiteBoxKey.generate(carrier="conv.weight", bits=32)
    g = torch.Generator().manual_seed(5)
    want = {}
    shapes = [(16, 8, 3, 3)] * 7 + [(16, 8, 1, 1)] * 2 + [(16, 8, 3, 3)] + [(16, 4, 3, 3)] * 5
    for i, shape in enumerate(shapes):
        w = torch.randn(*shape, generator=g).to(torch.float16 if i % 6 == 5 else torch.float32)
        p = tmp_path / f"m{i:02d}.safetensors"
        save_file({"conv.weight": w}, str(p))
        want[str(p)] = hashlib.sha256(w.numpy().tobytes()).hexdigest()
    rows = nnmark.scan(key, [str(tmp_path)], progress=False, workers=1).rows
    assert {r["path"]: r["carrier_sha256"] for r in rows} == want
    assert [r["status"] for r in rows] == ["ok"] * len(shapes)


def test_sha256_hex_many_matches_hashlib(isa):
    from nnmark import _C_cpu

    rng = np.random.default_rng(0)
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 36864):  # padding cases around block ends
        for run in range(1, 10):  # groups of four side by side, of two, one alone
            bufs = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(run)]
            assert _C_cpu.sha256_hex_many(bufs) == [hashlib.sha256(b).hexdigest() for b in bufs], (n, run)
    rows = rng.integers(0, 256, (6, 200), dtype=np.uint8)
    mixed = [b"", bytes(70), bytearray(b"x" * 70), memoryview(bytes(range(200))), rows[0], rows[3], b"abc",
             *rows[1:3]]
    assert _C_cpu.sha256_hex_many(mixed) == [hashlib.sha256(b).hexdigest() for b in mixed]
    assert _C_cpu.sha256_hex_many([]) == []
    with pytest.raises(ValueError, match="contiguous"):
        _C_cpu.sha256_hex_many([rows[:, ::2]])
    with pytest.raises(TypeError):
        _C_cpu.sha256_hex_many([b"ok", 3])


def _seen_by_each_batch(monkeypatch, probe) -> list:
    """What probe() returns as each loader batch of a scan starts (a list filled as they run)."""
    seen = []
    real = local.run_batch

    def spy(*a, **k):
        seen.append(probe())
        return real(*a, **k)

    monkeypatch.setattr(local, "run_batch", spy)
    return seen


def test_switch_interval_is_lowered_during_a_scan_and_restored(tmp_path, monkeypatch):
    import sys

    key = nnmark.WhiteBoxKey.generate(carrier="conv.weight", bits=32)
    for i in range(4):
        save_file({"conv.weight": torch.randn(8, 4, 3, 3)}, str(tmp_path / f"m{i}.safetensors"))
    seen = _seen_by_each_batch(monkeypatch, sys.getswitchinterval)
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        nnmark.scan(key, [str(tmp_path)], progress=False, workers=2)
        assert seen and all(abs(s - local.SCAN_SWITCH_INTERVAL) < 1e-6 for s in seen)
        assert abs(sys.getswitchinterval() - 0.004) < 1e-6
        # nested (as two scans on two threads): only the last one out restores it
        with local.quick_switching():
            with local.quick_switching():
                pass
            assert abs(sys.getswitchinterval() - local.SCAN_SWITCH_INTERVAL) < 1e-6
        assert abs(sys.getswitchinterval() - 0.004) < 1e-6
        seen.clear()
        nnmark.scan(key, [str(tmp_path)], progress=False, workers=1)  # one loader: nothing to hand over
        assert seen and all(abs(s - 0.004) < 1e-6 for s in seen)
    finally:
        sys.setswitchinterval(before)


def test_scan_freezes_the_heap_only_while_it_runs(tmp_path, monkeypatch):
    """A scan keeps the heap that was there before it out of the cyclic collector (a full
    collection walks all of torch's objects holding the GIL), gives it back afterwards, and
    leaves a process that froze objects itself (a pre-fork server) as it was."""
    import gc

    key = nnmark.WhiteBoxKey.generate("w", bits=32, reduction="flat")
    save_file({"w": torch.randn(64)}, str(tmp_path / "a.safetensors"))
    seen = _seen_by_each_batch(monkeypatch, gc.get_freeze_count)
    assert gc.get_freeze_count() == 0
    nnmark.scan(key, [str(tmp_path)], progress=False, workers=2)
    assert seen and all(n > 1000 for n in seen)
    assert gc.get_freeze_count() == 0
    with local.frozen_heap():  # nested, as two scans on two threads: the last one out unfreezes
        with local.frozen_heap():
            pass
        assert gc.get_freeze_count() > 1000
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the process's own frozen objects
    try:
        mine = gc.get_freeze_count()
        seen.clear()
        nnmark.scan(key, [str(tmp_path)], progress=False, workers=2)
        assert seen == [mine] and gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()
