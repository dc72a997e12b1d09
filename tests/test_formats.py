"""The checkpoint reader's formats: sniffing by magic bytes, lazy carrier reads per format, errors with a status and a class."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from nnmark import checkpoints
from nnmark.checkpoints import CheckpointError, open_file, read_carrier, sniff, sniff_head, tensor_sha256

from _corpus import FORMATS, Evil, bad_cases, write, write_sharded

CARRIER = "features.3.weight"


@pytest.fixture
def sd():
    g = torch.Generator().manual_seed(1)
    return {"features.0.weight": torch.randn(8, 1, 3, 3, generator=g), CARRIER: torch.randn(16, 8, 3, 3, generator=g),
            "features.3.bias": torch.randn(16, generator=g), "fc.weight": torch.randn(10, 32, generator=g),
            "steps": torch.tensor([3], dtype=torch.int64)}


SNIFFED = {"safetensors": "safetensors", "torch-zip": "torch-zip", "torch-legacy": "torch-legacy",
           "lightning": "torch-zip", "module-prefix": "safetensors"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_carrier_and_digest(tmp_path, sd, fmt):
    path = write(tmp_path / f"m.{fmt}", sd, fmt)
    assert sniff(path) == SNIFFED[fmt]
    c = read_carrier(path, CARRIER)
    assert torch.equal(c.tensor, sd[CARRIER]) and c.tensor.dtype == torch.float32
    assert c.name == {"lightning": "model.", "module-prefix": "module."}.get(fmt, "") + CARRIER
    # the digest is over the tensor's C-order bytes: the same in every format
    assert c.sha256 == hashlib.sha256(sd[CARRIER].numpy().tobytes()).hexdigest() == tensor_sha256(sd[CARRIER])
    assert c.nbytes == sd[CARRIER].numel() * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_dtypes(tmp_path, dtype):
    w = torch.randn(4, 3, 3, 3).to(dtype)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    c = read_carrier(tmp_path / "m.safetensors", "w")
    assert c.tensor.dtype == dtype and torch.equal(c.tensor, w)
    assert c.sha256 == tensor_sha256(w)


def test_safetensors_reads_only_header_and_carrier(tmp_path, sd, monkeypatch):
    """Lazy: a 4 MB tensor beside the carrier is never read; reads stay within
    header + carrier + the first HEAD_BYTES."""
    big = {**sd, "big.weight": torch.randn(1024, 1024)}
    path = write(tmp_path / "m.safetensors", big, "safetensors")
    ranges = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, off):
        out = real_pread(fd, n, off)
        ranges.append((off, off + len(out)))
        return out

    def preadv(fd, bufs, off):
        n = real_preadv(fd, bufs, off)
        ranges.append((off, off + n))
        return n

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    with open_file(path) as ck:
        c = ck.carrier(CARRIER)
        read = ck.bytes_read
    assert torch.equal(c.tensor, sd[CARRIER])
    n = struct.unpack("<Q", open(path, "rb").read(8))[0]
    header = json.loads(open(path, "rb").read(8 + n)[8:])
    b, e = header["big.weight"]["data_offsets"]
    big_range = (8 + n + b, 8 + n + e)
    assert ranges[0] == (0, checkpoints.HEAD_BYTES)  # one small first read: length, header, a little more
    assert all(hi <= big_range[0] or lo >= big_range[1] for lo, hi in ranges[1:]), (ranges, big_range)
    assert read == sum(hi - lo for lo, hi in ranges)
    assert read <= 8 + n + c.nbytes + checkpoints.HEAD_BYTES
    assert os.path.getsize(path) > 4_000_000 > 20 * read


def test_hf_sharded_opens_only_the_carrier_shard(tmp_path, sd, monkeypatch):
    index = write_sharded(tmp_path / "hf", sd, lambda k: 1 if k == CARRIER else 0)
    assert sniff(index) == "hf-sharded"
    opened = []
    real = checkpoints.open_file

    def spy(path):
        opened.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(checkpoints, "open_file", spy)
    ck = real(index)
    assert ck.format == "hf-sharded"
    shard_sizes = sum(os.path.getsize(tmp_path / "hf" / f) for f in os.listdir(tmp_path / "hf"))
    assert ck.size == shard_sizes  # the identity covers the index and every shard
    with ck:
        c = ck.carrier(CARRIER)
    assert torch.equal(c.tensor, sd[CARRIER]) and c.sha256 == tensor_sha256(sd[CARRIER])
    assert opened == ["model-00002-of-00002.safetensors"]
    assert checkpoints.index_shards(index) == [str(tmp_path / "hf" / f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]


def test_hf_sharded_torch_shards(tmp_path, sd):
    """pytorch_model.bin.index.json: torch shards, loaded weights_only like any torch file."""
    d = tmp_path / "hf"
    d.mkdir()
    torch.save({k: v for k, v in sd.items() if k != CARRIER}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({CARRIER: sd[CARRIER]}, d / "pytorch_model-00002-of-00002.bin")
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in sd if k != CARRIER}
    wm[CARRIER] = "pytorch_model-00002-of-00002.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    c = read_carrier(d / "pytorch_model.bin.index.json", "module." + CARRIER)
    assert torch.equal(c.tensor, sd[CARRIER]) and c.name == CARRIER


def test_hf_sharded_defects(tmp_path, sd):
    index = write_sharded(tmp_path / "hf", sd, lambda k: 1 if k == CARRIER else 0)
    os.remove(tmp_path / "hf" / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError) as exc:
        open_file(index)
    assert (exc.value.status, exc.value.error_class) == ("corrupt", "MissingShard")
    (tmp_path / "evil").mkdir()
    evil = tmp_path / "evil" / "model.safetensors.index.json"
    evil.write_text(json.dumps({"weight_map": {CARRIER: "../hf/model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError) as exc:
        open_file(str(evil))
    assert (exc.value.status, exc.value.error_class) == ("corrupt", "BadIndex")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 4}))
    assert sniff(cfg) == "unknown"
    with pytest.raises(CheckpointError) as exc:
        open_file(str(cfg))
    assert exc.value.status == "unsupported"


def test_torch_files_load_weights_only_and_mapped(tmp_path, sd, monkeypatch):
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    z = write(tmp_path / "z.pt", sd, "torch-zip")
    leg = write(tmp_path / "l.pt", sd, "torch-legacy")
    for p in (z, leg):
        with open_file(p) as ck:
            assert torch.equal(ck.carrier(CARRIER).tensor, sd[CARRIER])
            assert 0 < ck.bytes_read <= os.path.getsize(p)
    assert [c.get("weights_only") for c in calls] == [True, True]
    assert [c.get("mmap") for c in calls] == [True, False]  # the legacy format cannot be mapped


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_unsafe_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({CARRIER: torch.ones(4, 4, 3, 3), "payload": Evil(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as exc:
        read_carrier(path, CARRIER)
    assert (exc.value.status, exc.value.error_class) == ("unsafe", "UnsafePickle")
    assert "os.system" in str(exc.value)
    assert not marker.exists(), "loading the checkpoint ran its payload"


def test_every_damage_has_a_status_and_a_class(tmp_path, sd):
    cases = bad_cases(tmp_path, sd, CARRIER)
    assert len(cases) >= 13
    for path, status, cls in cases:
        with pytest.raises(CheckpointError) as exc:
            read_carrier(path, CARRIER)
        assert exc.value.status == status, (path, exc.value.status, str(exc.value))
        if cls is not None:
            assert exc.value.error_class == cls, (path, exc.value.error_class, str(exc.value))
        assert os.path.basename(path) in str(exc.value)  # the message names the file


def test_unreadable_file_is_io_error(tmp_path, sd, monkeypatch):
    path = write(tmp_path / "m.safetensors", sd, "safetensors")
    real = os.open

    def deny(p, *a, **kw):
        if os.fspath(p) == path:
            raise PermissionError(13, "Permission denied", p)
        return real(p, *a, **kw)

    monkeypatch.setattr(os, "open", deny)  # chmod 000 does not stop root: deny the open itself
    with pytest.raises(CheckpointError) as exc:
        read_carrier(path, CARRIER)
    assert (exc.value.status, exc.value.error_class) == ("io_error", "PermissionError")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads chmod-000 files")
def test_chmod_000_is_io_error(tmp_path, sd):
    path = write(tmp_path / "m.safetensors", sd, "safetensors")
    os.chmod(path, 0)
    try:
        with pytest.raises(CheckpointError) as exc:
            read_carrier(path, CARRIER)
        assert (exc.value.status, exc.value.error_class) == ("io_error", "PermissionError")
    finally:
        os.chmod(path, 0o600)


def test_validator_runs_before_the_carrier_is_read(tmp_path, sd, monkeypatch):
    path = write(tmp_path / "m.safetensors", sd, "safetensors")
    seen = []

    def validate(name, shape, dtype):
        seen.append((name, shape, dtype))
        raise CheckpointError("invalid", "WrongShape", "no")

    def no_read(*a):  # pragma: no cover - must not be reached
        raise AssertionError("the carrier was read although validation failed")

    monkeypatch.setattr(os, "preadv", no_read)
    with open_file(path) as ck:
        with pytest.raises(CheckpointError, match="no"):
            ck.carrier(CARRIER, validate)
        with pytest.raises(CheckpointError):
            ck.carrier("steps", validate)  # integer tensors reach the validator with dtype None
    assert seen == [(CARRIER, (16, 8, 3, 3), torch.float32), ("steps", (1,), None)]


def test_sniff_head():
    assert sniff_head(b"") == "empty"
    assert sniff_head(b"PK\x03\x04rest") == "torch-zip"
    assert sniff_head(struct.pack("<Q", 20) + b"{") == "safetensors"
    assert sniff_head(b"\x80\x02\x8a\x0a") == "torch-legacy"
    assert sniff_head(b'  {"weight_map": {}}') == "json"
    assert sniff_head(b"hello") == "unknown"


def test_state_dict_view_hashes_what_it_reads(tmp_path, sd):
    path = write(tmp_path / "m.safetensors", sd, "safetensors")
    with open_file(path) as ck:
        view = ck.state_dict()
        assert set(view) == set(sd) and view.sha256 is None
        assert torch.equal(view["fc.weight"], sd["fc.weight"])
        assert torch.equal(view[CARRIER], sd[CARRIER])
        first = view.sha256
    with open_file(write(tmp_path / "m.pt", sd, "torch-zip")) as ck:
        view = ck.state_dict()
        view[CARRIER], view["fc.weight"]  # another order, another format: the same digest
        assert view.sha256 == first


def test_file_sha256(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(3 * checkpoints.HASH_CHUNK + 17)
    p.write_bytes(data)
    assert checkpoints.file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_header_larger_than_the_first_read(tmp_path):
    """A ResNet-50-sized header (hundreds of tensors) needs a second read, of the header only."""
    sd = {f"layer{i}.block.conv.weight": torch.full((2,), float(i)) for i in range(400)}
    sd[CARRIER] = torch.randn(16, 8, 3, 3)
    path = write(tmp_path / "m.safetensors", sd, "safetensors")
    n = struct.unpack("<Q", open(path, "rb").read(8))[0]
    assert 8 + n > checkpoints.HEAD_BYTES
    with open_file(path) as ck:
        c = ck.carrier(CARRIER)
        assert torch.equal(c.tensor, sd[CARRIER])
        assert ck.bytes_read == 8 + n + c.nbytes  # the header once, the carrier once
        assert torch.equal(ck.carrier("layer7.block.conv.weight").tensor, sd["layer7.block.conv.weight"])


def _st_file(path, header: bytes, data: bytes) -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


_W = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def _differential_cases(tmp_path):
    """(name, file): headers on the edge of what the safetensors format allows."""
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    cases = [
        ("metadata_not_strings", _st_file(tmp_path / "a", j({"__metadata__": {"a": 1}, "w": _W}), bytes(16))),
        ("metadata_nested", _st_file(tmp_path / "b", j({"__metadata__": {"a": {"b": "c"}}, "w": _W}), bytes(16))),
        ("metadata_list", _st_file(tmp_path / "c", j({"__metadata__": ["a"], "w": _W}), bytes(16))),
        ("metadata_ok", _st_file(tmp_path / "d", j({"__metadata__": {"format": "pt"}, "w": _W}), bytes(16))),
        ("metadata_twice", _st_file(tmp_path / "e", b'{"__metadata__": {"a": "b"}, "__metadata__": {"a": "c"}, "w": '
                                    + j(_W) + b"}", bytes(16))),
        ("name_twice", _st_file(tmp_path / "f", b'{"w": ' + j(_W) + b', "w": ' + j(_W) + b"}", bytes(16))),
        ("name_twice_last_wins", _st_file(tmp_path / "f2", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": '
                                          b'[0, 8]}, "w": ' + j(_W) + b"}", bytes(16))),
        ("field_twice", _st_file(tmp_path / "f3", b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [4], '
                                 b'"data_offsets": [0, 16]}}', bytes(16))),
        ("metadata_key_twice", _st_file(tmp_path / "f4", b'{"__metadata__": {"a": "b", "a": "c"}, "w": ' + j(_W)
                                        + b"}", bytes(16))),
        ("extra_field", _st_file(tmp_path / "f5", j({"w": {**_W, "x": 1}}), bytes(16))),
        ("offsets_three", _st_file(tmp_path / "f6", j({"w": {**_W, "data_offsets": [0, 16, 16]}}), bytes(16))),
        ("float_offset", _st_file(tmp_path / "f7", j({"w": {**_W, "data_offsets": [0, 16.0]}}), bytes(16))),
        ("metadata_null", _st_file(tmp_path / "f8", j({"__metadata__": None, "w": _W}), bytes(16))),
        ("nan_in_metadata", _st_file(tmp_path / "g", b'{"__metadata__": {"a": NaN}, "w": ' + j(_W) + b"}",
                                     bytes(16))),
        ("lone_surrogate_name", _st_file(tmp_path / "h", b'{"\\ud800": ' + j(_W) + b"}", bytes(16))),
        ("leading_space", _st_file(tmp_path / "i", b"  " + j({"w": _W}), bytes(16))),
        ("f8_e8m0_beside", _st_file(tmp_path / "k", j({"w": _W, "s": {"dtype": "F8_E8M0", "shape": [4],
                                                                      "data_offsets": [16, 20]}}), bytes(20))),
        ("c64_beside", _st_file(tmp_path / "l", j({"w": _W, "z": {"dtype": "C64", "shape": [1],
                                                                  "data_offsets": [16, 24]}}), bytes(24))),
        ("f4_odd_count", _st_file(tmp_path / "m", j({"w": _W, "q": {"dtype": "F4", "shape": [3],
                                                                    "data_offsets": [16, 18]}}), bytes(18))),
        ("f4_even_count", _st_file(tmp_path / "n", j({"w": _W, "q": {"dtype": "F4", "shape": [4],
                                                                     "data_offsets": [16, 18]}}), bytes(18))),
        ("unknown_dtype", _st_file(tmp_path / "o", j({"w": _W, "q": {"dtype": "C128", "shape": [1],
                                                                     "data_offsets": [16, 32]}}), bytes(32))),
        ("shape_not_list", _st_file(tmp_path / "p", j({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}),
                                    bytes(16))),
        ("zero_size_huge_dims", _st_file(tmp_path / "q", j({"w": _W, "e": {"dtype": "F32", "shape": [0, 2 ** 63],
                                                                           "data_offsets": [16, 16]}}), bytes(16))),
    ]
    big = j({"w": _W}).ljust(100_000_001)  # one byte over the library's header cap
    cases.append(("header_over_cap", _st_file(tmp_path / "r", big, bytes(16))))
    return cases


def test_the_reader_refuses_what_safetensors_refuses_and_reads_what_it_reads(tmp_path):
    """The hand parser keeps the scan's byte budget (the safetensors API maps whole files:
    benchmarks/RESULTS.md); it must still agree with the library on every file: refuse what
    the library refuses, read what it reads."""
    from safetensors import safe_open

    for name, path in _differential_cases(tmp_path):
        try:
            with safe_open(path, "numpy") as f:
                f.get_tensor("w")
            library = True
        except Exception:  # noqa: BLE001 - SafetensorError, or an error of the numpy framework
            library = False
        try:
            with open_file(path) as ck:
                got = ck.carrier("w").tensor
            ours = True
            assert got.shape == (4,) and not got.any(), name
        except CheckpointError as exc:
            ours = False
            assert exc.status in ("corrupt", "unsupported"), (name, exc.status, str(exc))
        assert ours == library, f"{name}: safetensors {'reads' if library else 'refuses'} it, nnmark " \
                                f"{'reads' if ours else 'refuses'} it"


# ------------------------------------------------------------------ bounded memory (issue 13)
def _st_with_entries(path, n: int, meta: bool = False) -> str:
    hdr = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    if meta:
        hdr["__metadata__"] = {"format": "pt"}
    raw = json.dumps(hdr).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(4 * n))
    return str(path)


def test_safetensors_header_over_the_byte_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "HEADER_LIMIT_BYTES", 4096)
    monkeypatch.setattr(checkpoints, "_LAYOUTS", {})
    p = _st_with_entries(tmp_path / "big.safetensors", 100)  # a ~6 kB header
    reads = []
    real = os.pread
    monkeypatch.setattr(checkpoints.os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    with pytest.raises(CheckpointError) as e:
        open_file(p)
    assert (e.value.status, e.value.error_class) == ("unsupported", "HeaderTooLarge")
    n = struct.unpack("<Q", open(p, "rb").read(8))[0]
    assert f"{n} bytes" in str(e.value) and "4096" in str(e.value)
    assert sum(reads) <= checkpoints.HEAD_BYTES  # the first read only: the rest of the header is not read
    with open_file(_st_with_entries(tmp_path / "small.safetensors", 10)) as ck:
        assert len(ck.names()) == 10


def test_safetensors_header_with_too_many_entries_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "MAX_HEADER_ENTRIES", 5)
    monkeypatch.setattr(checkpoints, "_LAYOUTS", {})
    with pytest.raises(CheckpointError) as e:
        open_file(_st_with_entries(tmp_path / "six.safetensors", 6))
    assert (e.value.status, e.value.error_class) == ("unsupported", "HeaderTooLarge")
    assert "6 entries" in str(e.value) and "limit of 5" in str(e.value)
    with open_file(_st_with_entries(tmp_path / "five.safetensors", 5, meta=True)) as ck:  # __metadata__ is no tensor
        assert ck.names() == [f"t{i}" for i in range(5)]
        assert ck.carrier("t4").nbytes == 4


def _torch_zip(path, pickle_bytes: bytes | None = None, deflate: bool = False, extra: int = 0) -> str:
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    prefix = members[0][0].split("/")[0]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            if pickle_bytes is not None and name.endswith("data.pkl"):
                z.writestr(name, pickle_bytes, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
            else:
                z.writestr(name, data)
        for i in range(extra):
            z.writestr(f"{prefix}/extra/{i}", b"")
    return str(path)


def test_torch_zip_pickle_over_the_limit_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    # a deflated pickle of a few kB that would unpack to 4 MB of empty lists (~256 MB unpickled)
    bomb = b"\x80\x02]" + (b"(" + b"]" * 1000 + b"e") * 4000 + b"."
    p = _torch_zip(tmp_path / "bomb.pt", bomb, deflate=True)
    assert os.path.getsize(p) < 100_000
    monkeypatch.setattr(checkpoints, "MAX_PICKLE_BYTES", 1 << 20)
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CheckpointError) as e:
        open_file(p)
    assert (e.value.status, e.value.error_class) == ("unsupported", "PickleTooLarge")
    assert f"{len(bomb)} bytes" in str(e.value) and str(1 << 20) in str(e.value)


def test_torch_zip_with_too_many_members_is_refused(tmp_path, monkeypatch):
    p = _torch_zip(tmp_path / "many.pt", extra=40)
    fd = os.open(p, os.O_RDONLY)
    try:
        import zipfile

        assert checkpoints._zip_entries(fd, os.path.getsize(p)) == len(zipfile.ZipFile(p).infolist())
    finally:
        os.close(fd)
    with open_file(p) as ck:  # under the limit: read as usual
        assert ck.carrier("w").tensor.tolist() == [1.0] * 4
    monkeypatch.setattr(checkpoints, "MAX_ZIP_MEMBERS", 20)
    with pytest.raises(CheckpointError) as e:
        open_file(p)
    assert (e.value.status, e.value.error_class) == ("unsupported", "TooManyMembers")
    assert "limit of 20" in str(e.value)


def test_hostile_files_stay_far_below_the_memory_they_used_to_take(tmp_path):
    """Peak RSS of a fresh process that scans and verifies a zero-stride view (4.5 / 7.6 GB
    before issue 13) and a deflated pickle bomb (2.4 GB): both refused, under 1 GB."""
    import subprocess
    import sys

    import nnmark

    view = tmp_path / "view.pt"
    torch.save({"w": torch.zeros(1).expand(1 << 30)}, view)
    bomb = _torch_zip(tmp_path / "bomb.pt", b"\x80\x02]" + (b"(" + b"]" * 1000 + b"e") * 30_000 + b".", deflate=True)
    key = nnmark.WhiteBoxKey.generate(carrier="w", bits=32, reduction="flat")
    kp = key.save(tmp_path / "k.key")
    code = ("import sys, json, nnmark\n"
            "k = nnmark.load_key(sys.argv[1])\n"
            "rows = nnmark.scan(k, sys.argv[2:], progress=False, workers=1).rows\n"
            "v = [nnmark.verify(k, p) for p in sys.argv[2:]]\n"
            "hwm = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
            "print(json.dumps([[r['status'], r['error_class']] for r in rows] + [[x.status, x.error_class] for x in v]"
            " + [hwm]))\n")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (VmHWM)")
    cp = subprocess.run([sys.executable, "-c", code, str(kp), str(view), bomb], capture_output=True, text=True,
                        timeout=300)
    assert cp.returncode == 0, cp.stderr
    *rows, hwm_kb = json.loads(cp.stdout.strip().splitlines()[-1])
    assert rows == [["invalid", "ExpandedTensor"], ["unsupported", "PickleTooLarge"]] * 2
    assert hwm_kb < 1 << 20, f"peak RSS {hwm_kb / 1024:.0f} MB"


def test_legacy_pickle_with_too_many_opcodes_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    import pickle

    bomb = b"\x80\x02]" + (b"(" + b"]" * 1000 + b"e") * 20 + b"."
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    p = tmp_path / "bomb.pt"
    p.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                  + pickle.dumps(sys_info, protocol=2) + bomb + pickle.dumps([], protocol=2))
    monkeypatch.setattr(checkpoints, "MAX_PICKLE_OPS", 10_000)
    real_load = checkpoints.torch.load
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CheckpointError) as e:
        open_file(p)
    assert (e.value.status, e.value.error_class) == ("unsupported", "PickleTooLarge")
    assert "10000" in str(e.value)
    monkeypatch.setattr(checkpoints.torch, "load", real_load)
    legit = tmp_path / "legit.pt"
    torch.save({f"l{i}.weight": torch.ones(2) for i in range(100)}, legit, _use_new_zipfile_serialization=False)
    with open_file(legit) as ck:  # ~31 opcodes per tensor: far under the limit
        assert ck.carrier("l99.weight").tensor.tolist() == [1.0, 1.0]
