#!/usr/bin/env python3
"""Peak memory of ``nnmark.scan`` and ``nnmark.verify`` on hostile checkpoint files (issue 13, point 4).

Each file is small on disk but built to make a reader allocate far more than it holds: a
zero-stride view, a safetensors header of a million entries or of nested empty lists, a
torch zip of many members, a data.pkl that expands 64x when unpickled (stored, or deflated
so that the file is tiny), a storage that claims a huge size, a legacy (non-zip) file.
Every (file, front door) runs in a fresh child process (``python -c``, 1 scan worker) under
a timeout; the child reports its own peak RSS (``VmHWM``: ``ru_maxrss``
would include the parent's, which Linux carries through exec) and the row it got. The
baseline is the same child on a small valid file (the cost of importing torch and nnmark).

Usage:
  PYTHONPATH=python python benchmarks/bench_hostile_memory.py [--only NAME...] [--timeout S]
      [--json benchmarks/results/bench_hostile_memory.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CARRIER = "w"

CHILD = r"""
import json, sys
import nnmark
key = nnmark.load_key(sys.argv[2])
if sys.argv[1] == "scan":
    res = nnmark.scan(key, [sys.argv[3]], progress=False, workers=1)
    rows = res.rows
    out = {"n": len(rows), "status": rows[0]["status"] if rows else None,
           "error_class": rows[0]["error_class"] if rows else None, "exit": res.exit_code}
else:
    v = nnmark.verify(key, sys.argv[3])
    out = {"n": 1, "status": v.status, "error_class": v.error_class}
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited through exec)
out["maxrss_kb"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps(out))
"""


def _st(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _torch_zip_members(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _rewrite_zip(path: Path, members, extra=(), pkl: bytes | None = None, deflate_pkl: bool = False) -> None:
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        for info, data in members:
            if pkl is not None and info.filename.endswith("data.pkl"):
                data = pkl
                info = zipfile.ZipInfo(info.filename)
                info.compress_type = zipfile.ZIP_DEFLATED if deflate_pkl else zipfile.ZIP_STORED
            z.writestr(info, data)
        for name, data in extra:
            z.writestr(name, data)
    tmp.replace(path)


def _list_pickle(n: int) -> bytes:
    """A pickle of {"w": tensor, "junk": [[], [], ... n empty lists]}: ~1 byte per list in the
    file, 64 bytes per list once loaded."""
    buf = io.BytesIO()
    buf.write(b"\x80\x02]")  # PROTO 2, EMPTY_LIST
    chunk = b"(" + b"]" * 1000 + b"e"  # MARK, 1000 x EMPTY_LIST, APPENDS
    for _ in range(n // 1000):
        buf.write(chunk)
    buf.write(b".")
    return buf.getvalue()


def make_files(d: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, what it is)}."""
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    p = d / "baseline.safetensors"
    save_file({CARRIER: torch.randn(64)}, str(p))
    files["baseline"] = (p, "a valid 64-element safetensors file (the cost of the imports)")

    p = d / "zip_expanded.pt"
    torch.save({CARRIER: torch.zeros(1).expand(1 << 30)}, p)
    files["zip_expanded"] = (p, "torch zip, carrier a zero-stride view of 2^30 float32 (4 GiB) over 4 bytes")

    p = d / "legacy_expanded.pt"
    torch.save({CARRIER: torch.zeros(1).expand(1 << 30)}, p, _use_new_zipfile_serialization=False)
    files["legacy_expanded"] = (p, "legacy torch file, the same zero-stride view")

    n = 1_000_000
    header = {f"t{i:07d}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    header[CARRIER] = {"dtype": "F32", "shape": [64], "data_offsets": [4 * n, 4 * n + 256]}
    p = d / "st_1e6_entries.safetensors"
    _st(p, header, b"\0" * (4 * n + 256))
    files["st_1e6_entries"] = (p, "safetensors, 1,000,001 header entries (61 MB header)")

    lists = b"[" + b",".join([b"[]"] * 10_000_000) + b"]"  # 30 MB of JSON, ~21x once parsed
    raw = (b'{"' + CARRIER.encode() + b'":{"dtype":"F32","shape":[64],"data_offsets":[0,256],"x":' + lists + b"}}")
    p = d / "st_empty_lists.safetensors"
    _st(p, raw, b"\0" * 256)
    files["st_empty_lists"] = (p, "safetensors, an extra field holding 10M empty lists (30 MB header)")

    base = d / "_small.pt"
    torch.save({CARRIER: torch.randn(64)}, base)
    members = _torch_zip_members(base)

    p = d / "zip_200k_members.pt"
    prefix = members[0][0].filename.split("/")[0]
    _rewrite_zip(p, members, extra=[(f"{prefix}/extra/{i}", b"") for i in range(200_000)])
    files["zip_200k_members"] = (p, "torch zip, a valid state dict plus 200,000 empty members")

    # data.pkl replaced by a pickle of 30M empty lists (stored: a 30 MB file; deflated: tiny)
    for deflate in (False, True):
        p = d / f"zip_pkl_lists{'_deflated' if deflate else ''}.pt"
        p.write_bytes(base.read_bytes())
        _rewrite_zip(p, members, pkl=_list_pickle(30_000_000), deflate_pkl=deflate)
        files[p.stem] = (p, f"torch zip, data.pkl = 30M empty lists (30 MB{', deflated' if deflate else ''}), "
                            f"~2 GB once unpickled")

    p = d / "zip_nested.pt"
    p.write_bytes(base.read_bytes())
    _rewrite_zip(p, members, pkl=b"\x80\x02" + b"]" * 1_000_000 + b"a" * 999_999 + b".")
    files["zip_nested"] = (p, "torch zip, data.pkl = 1,000,000 nested lists")

    # A storage that claims 2^34 bytes of data in a 4-byte data member.
    sd = {CARRIER: torch.zeros(1)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    p = d / "zip_huge_storage.pt"
    p.write_bytes(buf.getvalue())
    ms = _torch_zip_members(p)
    pkl = next(data for i, data in ms if i.filename.endswith("data.pkl"))
    # the storage's element count (the persistent id's last field) and the tensor's size: 1 -> 2^30
    pkl2 = pkl.replace(b"cpuq\x06K\x01t", b"cpuq\x06J\x00\x00\x00\x40t").replace(
        b"K\x00K\x01\x85q\x08", b"K\x00J\x00\x00\x00\x40\x85q\x08")
    _rewrite_zip(p, ms, pkl=pkl2)
    files["zip_huge_storage"] = (p, "torch zip, a storage declared 2^30 floats (4 GiB) with 4 bytes of data"
                                     + ("" if pkl2 != pkl else " [rewrite FAILED: the file is valid]"))

    # A legacy file whose main pickle is 30M empty lists (the format's header pickles, then it).
    p = d / "legacy_pkl_lists.pt"
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    p.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                  + pickle.dumps(sys_info, protocol=2) + _list_pickle(30_000_000) + pickle.dumps([], protocol=2))
    files["legacy_pkl_lists"] = (p, "legacy torch file, its pickle = 30M empty lists (30 MB)")

    p = d / "legacy_big.pt"
    torch.save({CARRIER: torch.randn(64), "other": torch.randn(8 << 20)}, p, _use_new_zipfile_serialization=False)
    files["legacy_big"] = (p, "legacy torch file of 32 MB (read whole: bounded by its size)")
    base.unlink()
    return files


def run_child(mode: str, key: str, path: Path, timeout: float) -> dict:
    try:
        cp = subprocess.run([sys.executable, "-c", CHILD, mode, key, str(path)], capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT"}
    if cp.returncode != 0:
        return {"status": f"CRASH rc={cp.returncode}", "tail": cp.stderr.strip().splitlines()[-1:]}
    return json.loads(cp.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_hostile_memory.json"))
    args = ap.parse_args()
    import nnmark

    with tempfile.TemporaryDirectory(prefix="nnmark-hostile-mem-") as tmp:
        d = Path(tmp)
        key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32, reduction="flat")
        key_path = d / "k.key"
        key.save(key_path)
        files = make_files(d / "files")
        results = {}
        print(f"{'case':<26} {'file':>10}  {'scan MB':>8} {'verify MB':>9}  row")
        for name, (p, what) in files.items():
            if args.only and name not in args.only and name != "baseline":
                continue
            r = {"what": what, "file_bytes": p.stat().st_size}
            for mode in ("scan", "verify"):
                r[mode] = run_child(mode, str(key_path), p, args.timeout)
            results[name] = r

            def mb(x):
                return f"{x['maxrss_kb'] / 1024:,.0f}" if "maxrss_kb" in x else x["status"]

            row = f"{r['scan'].get('status')}/{r['scan'].get('error_class')}"
            if (r["verify"].get("status"), r["verify"].get("error_class")) != \
                    (r["scan"].get("status"), r["scan"].get("error_class")):
                row += f" (verify: {r['verify'].get('status')}/{r['verify'].get('error_class')})"
            print(f"{name:<26} {r['file_bytes']:>10,}  {mb(r['scan']):>8} {mb(r['verify']):>9}  {row}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
