"""The checkpoint reader's formats: sniffing by magic bytes, lazy carrier reads per format, errors with a status and a class."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from nnmark import checkpoints
from nnmark.checkpoints import CheckpointError, open_file, read_carrier, sniff, sniff_head, tensor_sha256

CARRIER = "features.3.weight"


@pytest.fixture
def sd():
    g = torch.Generator().manual_seed(1)
    return {"features.0.weight": torch.randn(8, 1, 3, 3, generator=g), CARRIER: torch.randn(16, 8, 3, 3, generator=g),
            "features.3.bias": torch.randn(16, generator=g), "fc.weight": torch.randn(10, 32, generator=g),
            "steps": torch.tensor([3], dtype=torch.int64)}


def write(path, sd, fmt):
    path = str(path)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif fmt == "torch-zip":
        torch.save(sd, path)
    elif fmt == "torch-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "lightning":
        torch.save({"epoch": 1, "state_dict": {"model." + k: v for k, v in sd.items()},
                    "optimizer_states": [{"param_groups": [{"lr": 0.1}]}]}, path)
    elif fmt == "module-prefix":
        save_file({"module." + k: v.contiguous() for k, v in sd.items()}, path)
    else:  # pragma: no cover
        raise AssertionError(fmt)
    return path


def write_sharded(d, sd, shard_of):
    """A Hugging Face sharded checkpoint in folder d: shard_of(name) -> shard index."""
    d.mkdir(exist_ok=True)
    shards: dict[int, dict] = {}
    for k, v in sd.items():
        shards.setdefault(shard_of(k), {})[k] = v
    n = len(shards)
    wm = {}
    for i, part in sorted(shards.items()):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in part.items()}, str(d / name))
        wm.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return str(d / "model.safetensors.index.json")


FORMATS = ["safetensors", "torch-zip", "torch-legacy", "lightning", "module-prefix"]
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


class _Evil:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(self.target)}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_unsafe_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({CARRIER: torch.ones(4, 4, 3, 3), "payload": _Evil(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as exc:
        read_carrier(path, CARRIER)
    assert (exc.value.status, exc.value.error_class) == ("unsafe", "UnsafePickle")
    assert "os.system" in str(exc.value)
    assert not marker.exists(), "loading the checkpoint ran its payload"


def _cut(path, keep):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:keep(raw)])


def _bad_cases(tmp_path, sd):
    """(file, expected status, expected error class) for each kind of damage."""
    cases = []
    p = write(tmp_path / "trunc_data.safetensors", sd, "safetensors")
    n = struct.unpack("<Q", open(p, "rb").read(8))[0]
    begin = json.loads(open(p, "rb").read(8 + n)[8:])[CARRIER]["data_offsets"][0]
    _cut(p, lambda raw: 8 + n + begin + 10)  # header intact, the carrier's data cut
    cases.append((p, "corrupt", "TruncatedFile"))
    p = write(tmp_path / "trunc_header.safetensors", sd, "safetensors")
    _cut(p, lambda raw: 8 + struct.unpack("<Q", raw[:8])[0] // 2)
    cases.append((p, "corrupt", "TruncatedFile"))
    p = tmp_path / "bad_json.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 64)
    cases.append((str(p), "corrupt", "BadHeader"))
    p = write(tmp_path / "padded.safetensors", sd, "safetensors")
    with open(p, "ab") as f:
        f.write(b"\0" * 16)
    cases.append((p, "corrupt", "TrailingBytes"))
    p = tmp_path / "overlap.safetensors"
    hdr = json.dumps({CARRIER: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 12)
    cases.append((str(p), "corrupt", "BadHeader"))
    p = tmp_path / "lying.safetensors"
    hdr = json.dumps({CARRIER: {"dtype": "F32", "shape": [16, 8, 3, 3], "data_offsets": [0, 100]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 100)
    cases.append((str(p), "corrupt", "BadHeader"))
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    cases.append((str(p), "corrupt", "EmptyFile"))
    p = tmp_path / "garbage.bin"
    p.write_bytes(bytes(range(256)) * 8)
    cases.append((str(p), "unsupported", "UnknownFormat"))
    p = tmp_path / "keras.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    cases.append((str(p), "unsupported", "UnsupportedFormat"))
    p = tmp_path / "other.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    cases.append((str(p), "unsupported", "NotTorchZip"))
    p = write(tmp_path / "trunc.pt", sd, "torch-zip")
    _cut(p, lambda raw: len(raw) // 2)
    cases.append((p, "corrupt", None))
    p = write(tmp_path / "trunc_legacy.pt", sd, "torch-legacy")
    _cut(p, lambda raw: len(raw) // 2)
    cases.append((p, "corrupt", None))
    p = tmp_path / "config.pt"
    torch.save({"epoch": 3, "lr": 0.1}, p)
    cases.append((str(p), "unsupported", "NoStateDict"))
    p = write(tmp_path / "other_net.safetensors", {"fc.weight": torch.ones(2, 2)}, "safetensors")
    cases.append((p, "absent", "MissingCarrier"))
    p = tmp_path / "amb.pt"
    torch.save({"module." + CARRIER: torch.ones(2, 2), "model." + CARRIER: torch.ones(2, 2)}, p)
    cases.append((str(p), "invalid", "AmbiguousCarrier"))
    cases.append((str(tmp_path / "missing.pt"), "io_error", "FileNotFoundError"))
    return cases


def test_every_damage_has_a_status_and_a_class(tmp_path, sd):
    cases = _bad_cases(tmp_path, sd)
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
