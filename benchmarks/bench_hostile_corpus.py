#!/usr/bin/env python3
"""A red-team corpus against the CLI (issue 13): every door, every hostile file, bounded.

Builds ~90 hostile things under ROOT -- FIFOs (as a checkpoint, an index, a shard, a key, a
manifest, a ledger, a calibration), links to /dev/zero and /dev/urandom, directory loops,
links leaving the folder, hidden names, a path beyond PATH_MAX, names with escape
sequences, C1 controls, bidi overrides, undecodable bytes, newlines and rich markup, FP8
carriers with NaN, sparse/meta/complex/bool/int/0-d/expanded tensors, list-valued entries,
malicious pickles (zip and legacy, protocol 2 and 4), safetensors headers that are huge,
deeply nested, non-JSON, with NaN, duplicate names, 1.2M entries, 2^63 lengths, negative
offsets, a sparse 8 GiB file, a deflated pickle bomb, indexes that list each other, /proc,
a folder, 200,000 shards; key files that are FIFOs, /dev/zero, nested 200,000 deep,
"version": true, float bits, n = 10^12, a 10^18-element input shape, a 5,000-digit
integer, NUL bytes, UTF-16 -- then runs `nnmark scan` (table, JSON, re-run, glob, with a
trigger key too), `nnmark manifest`, `scan --manifest`, and `nnmark verify` of every file
and with every key, each in its own process under a time bound.

Checked for every run: it ends within its bound (no hang); exit code 0, 1 or 2 as the case
allows (2 wherever something could not be checked); no traceback; no key secret; no
control character on the terminal; no pickle code ran (a marker file never appears); peak
RSS under 1.5 GB (the imports of torch and nnmark take ~300 MB).

Usage:
  python benchmarks/bench_hostile_corpus.py ROOT [--json benchmarks/results/bench_hostile_corpus.json]
(ROOT: an empty folder on a filesystem that allows FIFOs and sparse files.)
"""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile

import torch
from safetensors.torch import save_file

import nnmark

import argparse

ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("root", help="an empty folder: the corpus is built there")
ap.add_argument("--json", default=None, help="write every run's result here")
args = ap.parse_args()
root = os.path.abspath(args.root)
json_out = os.path.abspath(args.json) if args.json else None
os.makedirs(root, exist_ok=True)
C = os.path.join(root, "corpus")
os.makedirs(C, exist_ok=True)
MARK = os.path.join(root, "PWNED")
CARRIER = "conv.weight"
key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=32, reduction="filter_mean", shape=(8, 3, 3, 3))
kp = str(key.save(os.path.join(root, "owner.key")))
SECRET = json.load(open(kp))["secret"]
tkey = nnmark.TriggerKey.generate(kind="abstract", n=8, num_classes=10, input_shape=(1, 8, 8))
tkp = str(tkey.save(os.path.join(root, "trig.key")))
w = torch.randn(8, 3, 3, 3) * 0.1


def P(*a):
    return os.path.join(C, *a)


def st_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(name, data: bytes):
    with open(P(name), "wb") as f:
        f.write(data)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


class Evil2:
    def __reduce__(self):
        return (eval, (f"open({MARK!r}, 'w')",))


# --- ordinary good file
save_file({CARRIER: w}, P("good.safetensors"))
# --- specials
os.mkfifo(P("fifo.safetensors"))
os.mkfifo(P("plainfifo"))
os.symlink("/dev/zero", P("zero.safetensors"))
os.symlink("/dev/urandom", P("urandom.pt"))
os.symlink("/dev/null", P("null.bin"))
os.makedirs(P("dirlike.safetensors"))
os.symlink("nowhere/at/all", P("dangling.safetensors"))
os.symlink("self_loop", P("self_loop"))
# FIFO as index and index naming a FIFO / a directory / traversal / /proc
os.makedirs(P("hf_fifo_index"))
os.mkfifo(P("hf_fifo_index", "model.safetensors.index.json"))
os.makedirs(P("hf_fifo_shard"))
os.mkfifo(P("hf_fifo_shard", "s1.safetensors"))
json.dump({"weight_map": {CARRIER: "s1.safetensors"}}, open(P("hf_fifo_shard", "model.safetensors.index.json"), "w"))
os.makedirs(P("hf_proc"))
json.dump({"weight_map": {CARRIER: "../../../../../proc/self/mem"}}, open(P("hf_proc", "model.safetensors.index.json"), "w"))
os.makedirs(P("hf_dir"))
os.makedirs(P("hf_dir", "s1.safetensors"))
json.dump({"weight_map": {CARRIER: "s1.safetensors"}}, open(P("hf_dir", "model.safetensors.index.json"), "w"))
os.makedirs(P("hf_many"))
json.dump({"weight_map": {f"t{i}": f"s{i}.safetensors" for i in range(200_000)} | {CARRIER: "s.safetensors"}},
          open(P("hf_many", "model.safetensors.index.json"), "w"))
save_file({CARRIER: w}, P("hf_many", "s.safetensors"))
os.makedirs(P("hf_deep"))
write("hf_deep/model.safetensors.index.json", b'{"weight_map":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
# mutual indexes
os.makedirs(P("hf_mutual"))
json.dump({"weight_map": {CARRIER: "pytorch_model.bin.index.json"}}, open(P("hf_mutual", "model.safetensors.index.json"), "w"))
json.dump({"weight_map": {CARRIER: "model.safetensors.index.json"}}, open(P("hf_mutual", "pytorch_model.bin.index.json"), "w"))
# --- loops, links outside, hidden, long names, odd names
os.makedirs(P("loop", "a"))
os.symlink("..", P("loop", "a", "up"))
os.symlink(P("loop"), P("loop", "a", "abs_up"))
save_file({CARRIER: w}, P("loop", "a", "inloop.safetensors"))
outside = os.path.join(root, "outside")
os.makedirs(outside, exist_ok=True)
save_file({CARRIER: w}, os.path.join(outside, "marked.safetensors"))
os.symlink(outside, P("link_out"))
os.symlink(os.path.join(outside, "marked.safetensors"), P("file_link_out.safetensors"))
os.makedirs(P(".hiddendir"))
save_file({CARRIER: w}, P(".hiddendir", "m.safetensors"))
save_file({CARRIER: w}, P(".hidden.safetensors"))
deep = C
for i in range(40):
    deep = os.path.join(deep, "d" * 120)
    try:
        os.mkdir(deep)
    except OSError:
        break
try:
    fd = os.open(C, os.O_RDONLY)
    # make a long path by chdir-ing down
    cur = C
    rel = []
    for i in range(40):
        rel.append("e" * 200)
    os.chdir(C)
    for r in rel:
        os.mkdir(r)
        os.chdir(r)
    save_file({CARRIER: w}, "/tmp/_rt_deep.safetensors")
    with open("deep.safetensors", "wb") as f:
        f.write(open("/tmp/_rt_deep.safetensors", "rb").read())
    os.chdir(root)
except OSError as exc:
    print("long path:", exc)
for name in [b"esc\x1b]0;OWNED\x07.safetensors", b"\x9b31mC1.pt", b"rtl\xe2\x80\xaetxt.pt", b"bad\xff\xfe.safetensors",
             b"[bold]x.pt", b"nl\nname.safetensors", b"-rf", b"%n%s.pt", b"\xed\xa0\x80surrogate.pt"]:
    with open(os.path.join(os.fsencode(C), name), "wb") as f:
        save_file({CARRIER: w}, "/tmp/_rt_tmp.safetensors")
        f.write(open("/tmp/_rt_tmp.safetensors", "rb").read())
os.makedirs(P("["), exist_ok=True)
save_file({CARRIER: w}, P("[", "x].pt"))
# hard link (one row)
os.link(P("good.safetensors"), P("hardlink.safetensors"))
# --- tensors
sd8 = {CARRIER: w.to(torch.float8_e4m3fn)}
sd8[CARRIER].view(torch.uint8).view(-1)[3] = 0x7F  # NaN in e4m3fn
save_file(sd8, P("f8nan.safetensors"))
save_file({CARRIER: w.to(torch.float8_e5m2)}, P("f8e5.safetensors"))
torch.save({CARRIER: w.to(torch.float8_e4m3fn)}, P("f8.pt"))
torch.save({CARRIER: w.to_sparse()}, P("sparse_coo.pt"))
torch.save({CARRIER: w.reshape(8, 27).to_sparse_csr()}, P("sparse_csr.pt"))
torch.save({CARRIER: torch.empty(8, 3, 3, 3, device="meta")}, P("meta.pt"))
torch.save({CARRIER: [1.0, 2.0]}, P("list.pt"))
torch.save({CARRIER: torch.zeros(1).expand(1 << 31)}, P("expanded.pt"))
torch.save({CARRIER: torch.zeros(1, 1, 1, 1).expand(8, 3, 3, 3)}, P("expanded_shape.pt"))
torch.save({CARRIER: torch.complex(w, w)}, P("complex.pt"))
torch.save({CARRIER: w > 0}, P("bool.pt"))
torch.save({CARRIER: (w * 100).to(torch.int32)}, P("int.pt"))
torch.save({CARRIER: torch.tensor(1.0)}, P("scalar.pt"))
torch.save({CARRIER: w.to(torch.float64) * 1e308 * 10}, P("inf64.pt"))
torch.save({CARRIER: w.to(torch.bfloat16)}, P("bf16.pt"))
torch.save({"state_dict": {CARRIER: w}, "epoch": 3}, P("lightning.ckpt"))
torch.save({"module." + CARRIER: w, CARRIER: w}, P("ambiguous.pt"))
torch.save([w], P("toplist.pt"))
torch.save(w, P("bare_tensor.pt"))
torch.save({CARRIER: w}, P("legacy.pt"), _use_new_zipfile_serialization=False)
torch.save({CARRIER: w.t() if w.dim() == 2 else w.permute(3, 2, 1, 0)}, P("permuted.pt"))
nested = {}
cur = nested
for i in range(5000):
    cur["x"] = {}
    cur = cur["x"]
try:
    torch.save({CARRIER: w, "deep": nested}, P("deepdict.pt"))
except RecursionError:
    pass
# --- pickles
for i, E in enumerate([Evil, Evil2]):
    with open(P(f"evil{i}.pt"), "wb") as f:
        pickle.dump({CARRIER: E()}, f)
    buf = io.BytesIO()
    torch.save({CARRIER: w, "x": E()}, buf)
    write(f"evilzip{i}.pt", buf.getvalue())
write("evil_raw.pkl", b"cos\nsystem\n(S'touch " + MARK.encode() + b"'\ntR.")
# --- safetensors headers
write("hugelen.safetensors", struct.pack("<Q", 2 ** 63) + b"{}")
write("deepjson.safetensors", st_bytes(b"[" * 100_000 + b"]" * 100_000))
write("deepjson2.safetensors", st_bytes(b'{"a":' * 50_000 + b"1" + b"}" * 50_000))
write("negoff.safetensors", st_bytes({CARRIER: {"dtype": "F32", "shape": [8, 3, 3, 3], "data_offsets": [-4, 860]}}, bytes(864)))
write("bigshape.safetensors", st_bytes({CARRIER: {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 0]}}))
write("zeroshape.safetensors", st_bytes({CARRIER: {"dtype": "F32", "shape": [0, 3, 3, 3], "data_offsets": [0, 0]}}))
write("dupkeys.safetensors", st_bytes(b'{"conv.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"conv.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)))
write("nonjson.safetensors", st_bytes(b"\xff\xfe" * 10))
write("nanjson.safetensors", st_bytes(b'{"conv.weight":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', bytes(4)))
write("bigint.safetensors", st_bytes(b'{"conv.weight":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', bytes(4)))
many = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(1_200_000)}
write("many_entries.safetensors", st_bytes(many, bytes(1_200_000)))
write("empty.safetensors", b"")
write("seven.safetensors", b"\x01\x02\x03\x04\x05\x06\x07")
write("zipbomb.pt", b"PK\x05\x06" + b"\x00" * 6 + b"\xff\xff" + b"\x00" * 10)
# zip with 64 MiB deflated data.pkl of zeros
buf = io.BytesIO()
torch.save({CARRIER: w}, buf)
zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
out = io.BytesIO()
with zipfile.ZipFile(out, "w") as z:
    for info in zin.infolist():
        data = zin.read(info)
        if info.filename.endswith("data.pkl"):
            data = b"\x80\x02]" + b"(" + b"]" * (50_000_000) + b"e."
            z.writestr(info.filename, data, zipfile.ZIP_DEFLATED)
        else:
            z.writestr(info.filename, data)
write("deflated_bomb.pt", out.getvalue())
# sparse file of 8 GiB whose header claims the carrier at its end
hdr = json.dumps({CARRIER: {"dtype": "F32", "shape": [8, 3, 3, 3], "data_offsets": [(8 << 30) - 864, 8 << 30]},
                  "pad": {"dtype": "U8", "shape": [(8 << 30) - 864], "data_offsets": [0, (8 << 30) - 864]}}).encode()
with open(P("sparse8g.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(hdr)) + hdr)
    f.truncate(8 + len(hdr) + (8 << 30))
# --- hostile keys, manifests, ledgers, calibrations (given as arguments, not in the corpus)
K = os.path.join(root, "keys")
os.makedirs(K, exist_ok=True)
os.mkfifo(os.path.join(K, "fifo.key"))
os.symlink("/dev/zero", os.path.join(K, "zero.key"))
body = json.load(open(kp))
bad_keys = {
    "deep.key": b"[" * 200_000 + b"]" * 200_000,
    "version_true.key": json.dumps(dict(body, version=True)).encode(),
    "bits_float.key": json.dumps(dict(body, bits=[0.5] * 32)).encode(),
    "huge_n.key": json.dumps(dict(json.load(open(tkp)), n=10 ** 12)).encode(),
    "huge_shape.key": json.dumps(dict(json.load(open(tkp)), input_shape=[10 ** 6, 10 ** 6, 10 ** 6])).encode(),
    "bigint.key": json.dumps(dict(body, version=10 ** 5000 if False else 1)).encode().replace(b'"version": 1', b'"version": ' + b"9" * 5000),
    "nul.key": b"\x00" * 100,
    "utf16.key": json.dumps(body).encode("utf-16"),
}
for n, b in bad_keys.items():
    p = os.path.join(K, n)
    with open(p, "wb") as f:
        f.write(b)
    os.chmod(p, 0o600)
os.mkfifo(os.path.join(root, "fifo.manifest"))
os.mkfifo(os.path.join(root, "fifo.ledger"))
os.symlink("/dev/zero", os.path.join(root, "zero.manifest"))
os.mkfifo(os.path.join(root, "fifo.cal.json"))

# ------------------------------------------------------------------ run
NN = [sys.executable, "-c", "import sys; from nnmark.cli import main; main(sys.argv[1:])"]
WRAP = ("import resource, subprocess, sys, time\n"
        "t=time.time(); p=subprocess.Popen(sys.argv[1:]); p.wait()\n"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print('@@RSS', r.ru_maxrss // 1024, 'MB', round(time.time()-t, 1), 's rc', p.returncode, file=sys.stderr)\n"
        "sys.exit(p.returncode)\n")
problems = []
results = []


def run(argv, timeout=120, expect=(0, 1, 2), label=None):
    t = time.time()
    try:
        cp = subprocess.run([sys.executable, "-c", WRAP, *NN, *argv], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        problems.append(f"HANG {label or argv}")
        results.append({"run": label or str(argv), "problems": ["hang"]})
        print("HANG", label or argv)
        return None
    out = cp.stdout.decode("utf-8", "replace") + cp.stderr.decode("utf-8", "replace")
    rss = [l for l in out.splitlines() if l.startswith("@@RSS")]
    info = rss[-1] if rss else "?"
    bad = []
    if cp.returncode not in expect:
        bad.append(f"rc={cp.returncode}")
    if "Traceback" in out:
        bad.append("traceback")
    if SECRET in out:
        bad.append("SECRET")
    ctrl = [c for c in out if (ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) < 0xA0]
    if ctrl:
        bad.append(f"control chars {ctrl[:3]!r}")
    if os.path.exists(MARK):
        bad.append("PICKLE CODE RAN")
    mb = int(info.split()[1]) if rss else 0
    if mb > 1500:
        bad.append(f"memory {mb} MB")
    label = label or " ".join(map(str, argv))[:90]
    print(f"{label:90s} {info} {' '.join(bad)}")
    results.append({"run": label, "exit_code": cp.returncode, "peak_rss_mb": mb,
                    "seconds": float(info.split()[3]) if rss else None, "problems": bad})
    if bad:
        problems.append(f"{label}: {bad}\n{out[-3000:]}")
    return cp, out


ledger = os.path.join(root, "l.sqlite")
r = run(["scan", C, "--key", kp, "--ledger", ledger, "--no-progress", "--json"], timeout=600, expect=(2,), label="scan json")
if r:
    rows = [json.loads(l) for l in r[0].stdout.decode().splitlines() if l.startswith("{")]
    paths = {x["path"] for x in rows}
    print(f"  {len(rows)} rows; statuses:", sorted({(x['status'], x['error_class']) for x in rows}))
    print("  summary tail:", r[1].splitlines()[-12:])
r = run(["scan", C, "--key", kp, "--key", tkp, "--arch", "nnmark.demo:DigitsNet", "--ledger", ledger + "2", "--no-progress"],
        timeout=600, expect=(2,), label="scan wb+trigger table")
r = run(["scan", C, "--key", kp, "--ledger", ledger, "--no-progress"], timeout=600, expect=(2,), label="rescan")
r = run(["scan", C + "/**", "--key", kp, "--ledger", ledger + "3", "--no-progress"], timeout=600, expect=(2,), label="glob **")
r = run(["manifest", C, "-o", os.path.join(root, "m.sha256")], timeout=600, expect=(2,), label="manifest")
r = run(["scan", C, "--key", kp, "--ledger", ledger + "4", "--manifest", os.path.join(root, "m.sha256"), "--no-progress"],
        timeout=600, expect=(2,), label="scan --manifest")
for m in ("fifo.manifest", "zero.manifest"):
    run(["scan", P("good.safetensors"), "--key", kp, "--ledger", ledger + "5", "--manifest", os.path.join(root, m),
         "--no-progress"], timeout=60, expect=(2, 4), label=f"scan --manifest {m}")
run(["scan", P("good.safetensors"), "--key", kp, "--ledger", os.path.join(root, "fifo.ledger"), "--no-progress"],
    timeout=60, expect=(2, 4), label="scan --ledger fifo")
run(["verify", kp, P("good.safetensors"), "--calibration", os.path.join(root, "fifo.cal.json")], timeout=60,
    expect=(2, 4), label="verify --calibration fifo")
for n in sorted(os.listdir(K)):
    run(["verify", os.path.join(K, n), P("good.safetensors")], timeout=60, expect=(2, 4), label=f"verify key {n}")
    run(["scan", P("good.safetensors"), "--key", os.path.join(K, n), "--ledger", ledger + "6", "--no-progress"],
        timeout=60, expect=(2, 4), label=f"scan key {n}")
for n in sorted(os.listdir(os.fsencode(C))):
    p = os.path.join(os.fsencode(C), n)
    if os.path.isdir(p) and not os.path.islink(p):
        continue
    run(["verify", kp, os.fsdecode(p)], timeout=60, label=f"verify {n!r}")
for n in ("hf_fifo_index", "hf_fifo_shard", "hf_proc", "hf_dir", "hf_many", "hf_deep", "hf_mutual"):
    for f in sorted(os.listdir(P(n))):
        run(["verify", kp, P(n, f)], timeout=60, label=f"verify {n}/{f}")
# Every entry under the corpus (not following links) has a row, or is counted as left out.
res = nnmark.scan(key, [C], progress=False)
have = {os.fsencode(r["path"]) for r in res.rows}
entries = []
for d, dirs, files in os.walk(os.fsencode(C)):
    entries += [os.path.join(d, f) for f in files]
    entries += [os.path.join(d, x) for x in dirs if os.path.islink(os.path.join(d, x))]
    dirs[:] = [x for x in dirs if not x.startswith(b".")]  # a hidden folder is one exclusion
shards = set()
for r in res.rows:
    if r["format"] == "hf-sharded":
        shards |= {os.fsencode(x) for x in nnmark.checkpoints.index_shards(r["path"])}
missing = [e for e in entries if e not in have and e not in shards]
left_out = sum(res.summary["left_out"].values())
print(f"entries {len(entries)}, rows {len(have)}, left out {left_out} {dict(res.summary['left_out'])}, "
      f"without a row {len(missing)}")
if len(missing) > left_out:
    problems.append(f"files without a row or an exclusion: {missing}")

worst = max(results, key=lambda r: r.get("peak_rss_mb") or 0)
print(f"\n{len(results)} runs; worst peak RSS {worst.get('peak_rss_mb')} MB ({worst['run']}); "
      f"slowest {max(r.get('seconds') or 0 for r in results):.1f} s; problems: {len(problems)}")
for p in problems:
    print("-" * 70)
    print(p)
if json_out:
    with open(json_out, "w") as f:
        json.dump({"runs": results, "problems": problems}, f, indent=1)
sys.exit(1 if problems else 0)
