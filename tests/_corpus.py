"""Checkpoints for tests: writers for every format, every kind of damage, and the parity
corpus that every front door (verify, scan local and on Ray, calibrate, the CLI) must
answer alike."""
from __future__ import annotations

import json
import os
import shlex
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ["safetensors", "torch-zip", "torch-legacy", "lightning", "module-prefix"]


class Evil:
    """Unpickling this runs a shell command (it must never run)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(self.target)}",))


def write(path, sd, fmt):
    """``sd`` saved at ``path`` as one of :data:`FORMATS`."""
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


def write_sharded(d, sd, shard_of, torch_shards: bool = False):
    """A Hugging Face sharded checkpoint in folder d: shard_of(name) -> shard index."""
    d = Path(d)
    d.mkdir(exist_ok=True)
    shards: dict[int, dict] = {}
    for k, v in sd.items():
        shards.setdefault(shard_of(k), {})[k] = v
    n = len(shards)
    wm = {}
    for i, part in sorted(shards.items()):
        if torch_shards:
            name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(part, d / name)
        else:
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, str(d / name))
        wm.update({k: name for k in part})
    index = d / ("pytorch_model.bin.index.json" if torch_shards else "model.safetensors.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return str(index)


def _cut(path, keep):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:keep(raw)])


def bad_cases(tmp_path, sd, carrier):
    """(file, expected status, expected error class) for each kind of damage to a file
    holding ``sd`` (which has ``carrier``)."""
    tmp_path = Path(tmp_path)
    cases = []
    p = write(tmp_path / "trunc_data.safetensors", sd, "safetensors")
    n = struct.unpack("<Q", open(p, "rb").read(8))[0]
    begin = json.loads(open(p, "rb").read(8 + n)[8:])[carrier]["data_offsets"][0]
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
    hdr = json.dumps({carrier: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 12)
    cases.append((str(p), "corrupt", "BadHeader"))
    p = tmp_path / "lying.safetensors"
    hdr = json.dumps({carrier: {"dtype": "F32", "shape": list(sd[carrier].shape), "data_offsets": [0, 100]}}).encode()
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
    torch.save({"module." + carrier: torch.ones(2, 2), "model." + carrier: torch.ones(2, 2)}, p)
    cases.append((str(p), "invalid", "AmbiguousCarrier"))
    cases.append((str(tmp_path / "missing.pt"), "io_error", "FileNotFoundError"))
    return cases


# ---------------------------------------------------------------------------------- parity
PARITY_CARRIER = "features.2.weight"  # nnmark.demo.DigitsNet's second conv: [32, 16, 3, 3]
PARITY_ARCH = "nnmark.demo:DigitsNet"


def parity_keys():
    """A white-box key on the carrier (its shape recorded), a flat white-box key on the
    last linear layer, and an abstract trigger key for DigitsNet's 1x8x8 inputs."""
    import nnmark

    return (nnmark.WhiteBoxKey.generate(carrier=PARITY_CARRIER, bits=64, shape=(32, 16, 3, 3)),
            nnmark.WhiteBoxKey.generate(carrier="classifier.3.weight", bits=32, reduction="flat"),
            nnmark.TriggerKey.generate(kind="abstract", n=30, num_classes=10, input_shape=(1, 8, 8)))


def marked_carrier(key) -> torch.Tensor:
    """A carrier that carries ``key`` without training: every filter equal to v, the
    least-norm v with X.v = the owner's bits as +-1."""
    from nnmark._reference import torch_projection_matrix

    shape = key.shape
    n = shape[1] * shape[2] * shape[3]
    x = torch_projection_matrix(key.subkey(), key.num_bits, 0, n, dtype=torch.float64)
    v = torch.linalg.lstsq(x, 2.0 * key.bits.double() - 1.0, driver="gelsd").solution
    return v.float().reshape(1, *shape[1:]).expand(shape).contiguous()


def parity_models(key, seed: int = 0):
    """(marked, plain) DigitsNet models: the marked one's carrier replaced by :func:`marked_carrier`."""
    from nnmark.demo import DigitsNet

    torch.manual_seed(seed)
    marked, plain = DigitsNet(), DigitsNet()
    with torch.no_grad():
        marked.features[2].weight.copy_(marked_carrier(key) + 1e-3 * torch.randn(32, 16, 3, 3))
    return marked.eval(), plain.eval()


def parity_corpus(root, keys):
    """Files under ``root`` (every format, every kind of damage, the two files on which
    verify and scan once disagreed) and sources in memory. Returns (in-memory sources as
    (label, object) pairs, {file name: what it is})."""
    root = Path(root)
    marked, plain = parity_models(keys[0])
    msd = {k: v.detach().clone() for k, v in marked.state_dict().items()}
    psd = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    what = {}
    for fmt in FORMATS:
        for name, sd in (("marked", msd), ("plain", psd)):
            write(root / f"{name}_{fmt}.ckpt", sd, fmt)
            what[f"{name}_{fmt}.ckpt"] = fmt
    # A Hugging Face shard index: the carrier in the second shard (scan said ok, verify unsupported).
    write_sharded(root / "hf", msd, lambda k: 1 if k.startswith("features.2") else 0)
    what["hf/model.safetensors.index.json"] = "hf-sharded"
    write_sharded(root / "hf_bin", psd, lambda k: 1 if k.startswith("classifier") else 0, torch_shards=True)
    what["hf_bin/pytorch_model.bin.index.json"] = "hf-sharded (torch shards)"
    # A finite carrier whose filter_mean overflows float32 (scan said invalid, verify ok on inf).
    write(root / "overflow.safetensors", {**psd, PARITY_CARRIER: torch.full((32, 16, 3, 3), 3e38)}, "safetensors")
    what["overflow.safetensors"] = "overflow"
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        write(root / f"marked_{str(dtype)[6:]}.safetensors", {k: v.to(dtype) for k, v in msd.items()}, "safetensors")
        what[f"marked_{str(dtype)[6:]}.safetensors"] = str(dtype)
    nan = {**msd, PARITY_CARRIER: msd[PARITY_CARRIER].clone()}
    nan[PARITY_CARRIER][3, 2, 1, 1] = float("nan")
    write(root / "nan.safetensors", nan, "safetensors")
    what["nan.safetensors"] = "NaN"
    write(root / "inf.pt", {**msd, PARITY_CARRIER: torch.full((32, 16, 3, 3), float("inf"))}, "torch-zip")
    what["inf.pt"] = "Inf"
    write(root / "int_carrier.safetensors", {**psd, PARITY_CARRIER: torch.ones(32, 16, 3, 3, dtype=torch.int64)},
          "safetensors")
    what["int_carrier.safetensors"] = "int carrier"
    write(root / "wrong_shape.safetensors", {**psd, PARITY_CARRIER: torch.randn(8, 16, 3, 3)}, "safetensors")
    what["wrong_shape.safetensors"] = "wrong shape"
    for legacy in (False, True):
        name = f"evil_{'legacy' if legacy else 'zip'}.pt"
        torch.save({**psd, "payload": Evil(root.parent / f"{root.name}-pwned")}, root / name,
                   _use_new_zipfile_serialization=not legacy)
        what[name] = "malicious pickle"
    (root / "bad").mkdir()
    for p, status, cls in bad_cases(root / "bad", psd, PARITY_CARRIER):
        if os.path.exists(p):
            what[os.path.relpath(p, root)] = f"damaged: {status} {cls}"
    os.mkfifo(root / "pipe")
    what["pipe"] = "FIFO"
    os.symlink(root / "gone", root / "dangling.pt")
    what["dangling.pt"] = "dangling symlink"
    wrapped = {"state_dict": {"model." + k: v for k, v in msd.items()}, "epoch": 3}
    nan_model, _ = parity_models(keys[0], seed=1)
    with torch.no_grad():
        nan_model.features[2].weight[0, 0, 0, 0] = float("nan")
    memory = [("<module marked>", marked), ("<module plain>", plain), ("<state_dict marked>", msd),
              ("<state_dict plain>", psd), ("<state_dict prefixed>", {"module." + k: v for k, v in msd.items()}),
              ("<state_dict lightning>", wrapped), ("<tensor carrier>", msd[PARITY_CARRIER]),
              ("<module nan>", nan_model), ("<state_dict empty>", {}), ("<int 42>", 42)]
    return memory, what


__all__ = ["FORMATS", "Evil", "write", "write_sharded", "bad_cases", "PARITY_CARRIER", "PARITY_ARCH", "parity_keys",
           "marked_carrier", "parity_models", "parity_corpus"]
