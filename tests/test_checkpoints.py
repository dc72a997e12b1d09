"""Reading suspect checkpoint files: formats, broken files, hostile pickles."""
from __future__ import annotations

import os
import shlex
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark.checkpoints import CheckpointError, load_state_dict, open_checkpoint, read_tensor, sniff


@pytest.fixture
def sd():
    return {
        "features.0.weight": torch.randn(16, 1, 3, 3),
        "features.3.weight": torch.randn(32, 16, 3, 3),
        "features.3.bias": torch.randn(32),
        "fc.weight": torch.randn(10, 128, dtype=torch.float64),
    }


def _write(path, sd, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "torch-zip":
        torch.save(sd, path)
    elif fmt == "torch-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "lightning":  # a Lightning-like checkpoint: the weights under "state_dict", prefixed
        torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {"model." + k: v for k, v in sd.items()},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
                    "hyper_parameters": {"width": 16}}, path)
    else:  # pragma: no cover
        raise AssertionError(fmt)
    return path


FORMATS = ["safetensors", "torch-zip", "torch-legacy", "lightning"]
SNIFFED = {"safetensors": "safetensors", "torch-zip": "torch-zip", "torch-legacy": "torch-legacy",
           "lightning": "torch-zip"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_load(tmp_path, sd, fmt):
    path = _write(tmp_path / f"m.{fmt}", sd, fmt)
    assert sniff(path) == SNIFFED[fmt]
    loaded = load_state_dict(path)
    prefix = "model." if fmt == "lightning" else ""
    assert sorted(loaded.keys()) == sorted(prefix + k for k in sd)
    assert len(loaded) == len(sd)
    for k, v in sd.items():
        got = loaded[prefix + k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v)
        # read_tensor finds the tensor by its bare name (wrapper prefixes tolerated)
        assert torch.equal(read_tensor(path, k), v)
    assert torch.equal(read_tensor(str(path), "features.3.weight"), sd["features.3.weight"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_carrier_is_absent(tmp_path, sd, fmt):
    path = _write(tmp_path / f"m.{fmt}", sd, fmt)
    with pytest.raises(CheckpointError, match=r"features\.4\.weight.*not found") as exc:
        read_tensor(path, "features.4.weight")
    assert exc.value.status == "absent"
    assert "features.3.weight" in str(exc.value)  # a close name is suggested


def test_ambiguous_carrier_is_invalid(tmp_path):
    path = tmp_path / "amb.pt"
    torch.save({"module.fc.weight": torch.ones(2, 2), "model.fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="ambiguous") as exc:
        read_tensor(path, "fc.weight")
    assert exc.value.status == "invalid"


def test_safetensors_is_lazy_and_read_only(tmp_path, sd):
    path = _write(tmp_path / "m.safetensors", sd, "safetensors")
    with open_checkpoint(path) as ck:
        view = ck.state_dict()
        assert set(iter(view)) == set(sd) and "fc.weight" in view
        before = ck.bytes_read
        with pytest.raises(KeyError):
            view["nope"]
        with pytest.raises(TypeError):
            view["fc.weight"] = torch.ones(1)  # a Mapping, not a dict
        assert ck.bytes_read == before  # nothing read until a tensor is asked for
        assert torch.equal(view["fc.weight"], sd["fc.weight"])
        # that tensor, and only it (its start may have come with the first read of the file)
        assert before < ck.bytes_read <= before + sd["fc.weight"].numel() * 8
    assert sorted(load_state_dict(path)) == sorted(sd)  # load_state_dict: every tensor, as a dict


def test_empty_file_is_corrupt(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert sniff(path) == "empty"
    with pytest.raises(CheckpointError, match="empty") as exc:
        load_state_dict(path)
    assert exc.value.status == "corrupt"
    with pytest.raises(CheckpointError) as exc:
        read_tensor(path, "fc.weight")
    assert exc.value.status == "corrupt"


@pytest.mark.parametrize("content", [b"hello, this is not a checkpoint at all\n" * 20, b"\x00" * 3,
                                     bytes(range(256)) * 4, b"{}"])
def test_garbage_is_unsupported(tmp_path, content):
    path = tmp_path / "garbage.bin"
    path.write_bytes(content)
    assert sniff(path) == "unknown"
    with pytest.raises(CheckpointError, match="neither safetensors nor a torch checkpoint|not a checkpoint") as exc:
        load_state_dict(path)
    assert exc.value.status == "unsupported"


def test_random_bytes_never_crash(tmp_path, rng):
    """Random files give a CheckpointError with a known status, never another exception."""
    for i in range(20):
        path = tmp_path / f"r{i}.bin"
        path.write_bytes(rng.bytes(int(rng.integers(1, 4000))))
        with pytest.raises(CheckpointError) as exc:
            load_state_dict(path)
        assert exc.value.status in ("corrupt", "unsupported")


def test_no_tensors_is_unsupported(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"epoch": 3, "lr": 0.1, "names": ["a", "b"]}, path)
    with pytest.raises(CheckpointError, match="no state dict of tensors") as exc:
        load_state_dict(path)
    assert exc.value.status == "unsupported"


def test_truncated_safetensors_is_corrupt(tmp_path, sd):
    path = _write(tmp_path / "m.safetensors", sd, "safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, data cut
    assert sniff(path) == "safetensors"
    with pytest.raises(CheckpointError) as exc:
        read_tensor(path, "features.3.weight")
    assert exc.value.status == "corrupt"


def test_safetensors_truncated_in_its_header_is_corrupt(tmp_path, sd):
    """Cut inside the JSON header: still recognisably a (broken) safetensors file."""
    path = _write(tmp_path / "m.safetensors", sd, "safetensors")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len > 40
    path.write_bytes(raw[: 8 + header_len // 2])
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    assert exc.value.status == "corrupt", f"status {exc.value.status!r}: {exc.value}"


def test_truncated_legacy_torch_is_corrupt(tmp_path, sd):
    path = _write(tmp_path / "m.pt", sd, "torch-legacy")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    assert exc.value.status == "corrupt"


@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_zip_is_corrupt(tmp_path, sd, fraction):
    path = _write(tmp_path / "m.pt", sd, "torch-zip")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    assert sniff(path) == "torch-zip"
    assert not zipfile.is_zipfile(path)  # the central directory is gone: the file is damaged
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    assert exc.value.status == "corrupt", f"status {exc.value.status!r}: {exc.value}"


def test_missing_file_is_io_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read") as exc:
        load_state_dict(tmp_path / "nope.pt")
    assert exc.value.status == "io_error"


# ---------------------------------------------------------------------------- hostile pickles
class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(self.target)}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_unsafe(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"features.3.weight": torch.ones(4, 4, 3, 3), "payload": _Evil(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    assert exc.value.status == "unsafe"
    msg = str(exc.value)
    # pickle records os.system under its implementing module (posix on Linux, nt on Windows)
    assert "system" in msg and any(f"{m}.system" in msg for m in ("os", "posix", "nt")), msg
    with pytest.raises(CheckpointError) as exc:
        read_tensor(path, "features.3.weight")
    assert exc.value.status == "unsafe"
    # verification reports it as a failed row, without running the payload
    key = nnmark.WhiteBoxKey(b"\x07" * 32, "features.3.weight", [0, 1] * 32)
    v = nnmark.verify(key, path)
    assert v.status == "unsafe" and not v.verified
    assert not marker.exists(), "loading the checkpoint ran its payload"


def test_malicious_pickle_message_names_os_system(tmp_path):
    """The brief asks that the refusal name os.system -- the name a user knows the call by."""
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Evil(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError, match=r"\bos\.system\b") as exc:
        load_state_dict(path)
    assert exc.value.status == "unsafe"
    assert not (tmp_path / "pwned").exists()


def test_custom_class_is_unsafe(tmp_path):
    """Any non-allow-listed global is refused, not only os.system."""
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.ones(2), "rng": np.random.default_rng(0)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    assert exc.value.status == "unsafe" and "numpy" in str(exc.value)


def test_tensors_that_cannot_be_checked_get_a_row(tmp_path):
    """A repeating view (a few bytes on disk, gigabytes once copied), meta and sparse tensors,
    entries that are not tensors, FP8 carriers with and without NaN: each gets its verdict
    row, nothing aborts."""
    key = nnmark.WhiteBoxKey(b"\x05" * 32, "w", [0, 1] * 16, reduction="flat")
    torch.save({"w": torch.zeros(1).expand(10 ** 8), "b": torch.ones(2)}, tmp_path / "expanded.pt")
    w8 = torch.linspace(-2, 2, 100).to(torch.float8_e4m3fn)
    w8nan = w8.clone()
    w8nan.view(torch.uint8)[3] = 0x7F  # NaN in e4m3fn
    save_file({"w": w8}, str(tmp_path / "f8.safetensors"))
    sources = [str(tmp_path / "expanded.pt"), {"w": torch.empty(100, device="meta")},
               {"w": torch.randn(100).to_sparse()}, {"w": [1, 2], "b": torch.ones(1)}, str(tmp_path / "f8.safetensors"),
               {"w": w8}, {"w": w8nan}]
    got = [(v.status, v.error_class) for v in nnmark.verify(key, sources)]
    assert got == [("invalid", "ExpandedTensor"), ("invalid", "UnsupportedTensor"), ("invalid", "UnsupportedTensor"),
                   ("invalid", "NotATensor"), ("ok", None), ("ok", None), ("invalid", "NonFinite")]


def test_a_key_file_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "owner.key")
    with pytest.raises(nnmark.KeyFileError, match="not a regular file"):
        nnmark.load_key(tmp_path / "owner.key")
