"""The CUDA simulator (docs/cuda_sim.md): built when asked, faithful under every schedule,
errors recoverable, and able to catch bugs -- variants of the real kernels with a planted
off-by-one and a planted missing barrier fail the CPU/CUDA parity tests."""
from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import nnmark
import test_pruning as pruning_tests
import test_trigger_op as trigger_tests
from _cudasim import REQUIRED, SIM, use_cuda_sim
from conftest import Gpu
from nnmark import ops

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_simulator_is_built_when_asked():
    # CI builds with NNMARK_CUDA_SIM=ON and keeps it in the environment of the tests.
    if not REQUIRED:
        pytest.skip("NNMARK_CUDA_SIM is not ON")
    assert SIM is not None, "NNMARK_CUDA_SIM=ON but nnmark._C_cudasim is missing: rebuild with it"
    assert SIM.simulated is True


needs_sim = pytest.mark.skipif(SIM is None, reason="built without the CUDA simulator (NNMARK_CUDA_SIM=ON)")
ORDERS = [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)]
ORDER_IDS = [f"{o}{s}" if o == "shuffle" else o for o, s in ORDERS]


# ---------------------------------------------------------------- every op, every schedule
@needs_sim
@pytest.mark.parametrize("order,seed", ORDERS, ids=ORDER_IDS)
def test_select_and_prune_under_every_schedule(order, seed):
    ts = pruning_tests._mixed(11, [40_000, 17, 33_333], [torch.float32, torch.float64], ties=True)
    pruning_tests.cuda_matches_cpu(Gpu("cudasim", order, seed), ts, [1, 20_000, 36_000, 73_350], offset=1)


@needs_sim
@pytest.mark.parametrize("order,seed", ORDERS, ids=ORDER_IDS)
def test_other_ops_under_every_schedule(order, seed):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 3000, generator=g, dtype=torch.float64)
    gp = torch.randn(2, 300, generator=g, dtype=torch.float64)
    X = torch.randn(70, 3000, generator=g, dtype=torch.float64)
    x = torch.randn(5, 300, 17, generator=g)
    y = torch.randint(0, 17, (300,), generator=g)
    act = torch.randn(6, 40, 9, 9, generator=g).half()
    want = (ops.keyed_projection(w, (5, 6), 300), ops.keyed_projection_transpose(gp, (5, 6), 3000),
            ops.dense_projection(w, X), ops.trigger_verify(x, y), ops.channel_stats(act),
            ops.channel_stats(act.contiguous(memory_format=torch.channels_last)))
    with use_cuda_sim(order, seed):
        got = (ops.keyed_projection(w, (5, 6), 300), ops.keyed_projection_transpose(gp, (5, 6), 3000),
               ops.dense_projection(w, X), ops.trigger_verify(x, y), ops.channel_stats(act),
               ops.channel_stats(act.contiguous(memory_format=torch.channels_last)))
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert all(torch.equal(got[3][k], want[3][k]) for k in ("hits", "margin", "p_value"))
    for (gs, gpos), (ws, wpos) in zip(got[4:], want[4:]):
        assert torch.equal(gpos, wpos)
        torch.testing.assert_close(gs, ws, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- errors
@needs_sim
def test_an_out_of_memory_error_is_cleared_and_the_next_call_works():
    x = torch.randn(3, 50, 10)
    y = torch.randint(0, 10, (50,))
    want = ops.trigger_verify(x, y)
    with use_cuda_sim() as sim:
        sim.fail_next_mallocs(1)
        with pytest.raises(RuntimeError, match="out of memory"):
            ops.trigger_verify(x, y)
        # the failed cudaMallocAsync left CUDA's last error set: the check cleared it, so the
        # next launch's cudaGetLastError() is clean
        got = ops.trigger_verify(x, y)
        assert sim.live_allocations() == 0
    assert torch.equal(got["hits"], want["hits"]) and torch.equal(got["margin"], want["margin"])


@needs_sim
def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="order must be"):
        SIM.set_schedule("sideways", 0)


# ---------------------------------------------------------------- planted bugs
class Planted:
    """A kernel source with one bug planted, built on the simulator through tests/cudasim_c_api.cpp
    and loaded with ctypes; it answers the calls of the ops it has, as _C_cudasim does."""

    def __init__(self, lib_path: pathlib.Path):
        self.lib = ctypes.CDLL(str(lib_path))

    def _call(self, fn, *args):
        err = ctypes.create_string_buffer(1024)
        if fn(*args, err, 1024) != 0:
            raise RuntimeError(err.value.decode())

    def set_schedule(self, order, seed):
        self.lib.planted_set_schedule(["forward", "reverse", "shuffle"].index(order), ctypes.c_ulonglong(seed))

    @staticmethod
    def _list(ptrs, sizes, dtypes):
        n = len(ptrs)
        return ((ctypes.c_void_p * n)(*ptrs), (ctypes.c_int64 * n)(*sizes), (ctypes.c_int * n)(*dtypes),
                ctypes.c_int64(n))

    def magnitude_select(self, ptrs, sizes, dtypes, k, device, stream):
        thr, below, equal = ctypes.c_double(), ctypes.c_int64(), ctypes.c_int64()
        self._call(self.lib.planted_magnitude_select, *self._list(ptrs, sizes, dtypes), ctypes.c_int64(k),
                   ctypes.byref(thr), ctypes.byref(below), ctypes.byref(equal))
        return thr.value, below.value, equal.value

    def magnitude_prune(self, ptrs, sizes, dtypes, k, threshold, below, equal, device, stream):
        self._call(self.lib.planted_magnitude_prune, *self._list(ptrs, sizes, dtypes), ctypes.c_int64(k),
                   ctypes.c_double(threshold), ctypes.c_int64(below), ctypes.c_int64(equal))

    def trigger_verify(self, logits, dtype, labels, K, B, C, rate, hits, margin, p_value, device, stream):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._call(self.lib.planted_trigger_verify, p(logits), ctypes.c_int(dtype), p(labels), i64(K), i64(B),
                   i64(C), ctypes.c_double(rate), p(hits), p(margin), p(p_value))

    def __getattr__(self, name):  # the ops it has no variant of
        return getattr(SIM, name)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build_planted(tmp: pathlib.Path, source: str, old: str, new: str) -> Planted:
    """csrc/cuda/<source> with `old` replaced by `new` (which must occur exactly once)."""
    text = (ROOT / "csrc" / "cuda" / source).read_text()
    assert text.count(old) == 1, f"the planted bug's pattern no longer occurs once in {source}: update the test"
    src = tmp / ("planted_" + source.replace(".cu", ".cpp"))
    src.write_text(text.replace(old, new))
    lib = tmp / "planted.so"
    which = "PLANTED_SELECT" if source.startswith("magnitude") else "PLANTED_TRIGGER"
    cmd = [*_compiler().split(), "-std=c++17", f"-D{which}", "-O1", "-shared", "-fPIC", "-fvisibility=hidden",
           "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc' / 'cudasim' / 'include'}", f"-I{ROOT / 'csrc'}",
           str(src), str(ROOT / "csrc" / "cudasim" / "sim.cpp"), str(ROOT / "csrc" / "ops" / "checks.cpp"),
           str(ROOT / "tests" / "cudasim_c_api.cpp"), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return Planted(lib)


needs_build = pytest.mark.skipif(SIM is None or _compiler() is None or not (ROOT / "csrc" / "cudasim").is_dir(),
                                 reason="needs the simulator, a C++ compiler and the source tree")


@pytest.fixture(scope="module")
def planted_off_by_one(tmp_path_factory):
    # the last row of every tile of 256 triggers is left out of the hit count and the margin
    return build_planted(tmp_path_factory.mktemp("obo"), "trigger_verify_cuda.cu",
                         "for (int r = 0; r < rows; ++r) {", "for (int r = 0; r < rows - 1; ++r) {")


@pytest.fixture(scope="module")
def planted_no_barrier(tmp_path_factory):
    # block_exclusive_scan without the barrier between warp 0's scan of the warp totals and
    # the other warps reading them: a race a GPU may or may not show; the simulator does
    return build_planted(tmp_path_factory.mktemp("race"), "magnitude_select_cuda.cu",
                         "    if (lane < warps) warp_incl[lane] = w;\n  }\n  __syncthreads();\n",
                         "    if (lane < warps) warp_incl[lane] = w;\n  }\n")


@needs_build
def test_a_planted_off_by_one_fails_the_parity_test(planted_off_by_one):
    with pytest.raises(AssertionError):
        trigger_tests.test_cpu_cuda_parity(Gpu("cudasim", module=planted_off_by_one), torch.float32)
    # the unplanted simulator passes the same test
    trigger_tests.test_cpu_cuda_parity(Gpu("cudasim"), torch.float32)


@needs_build
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_planted_missing_barrier_fails_the_parity_test(planted_no_barrier, order):
    args = ([torch.float32], [16384, 16385, 0, 5], True)
    # a wrong bucket fails the comparison, or the host's check that rank k was kept
    with pytest.raises((AssertionError, RuntimeError), match="select lost rank|assert"):
        pruning_tests.test_cuda_select_and_prune_equal_cpu(Gpu("cudasim", order, module=planted_no_barrier), *args)
    pruning_tests.test_cuda_select_and_prune_equal_cpu(Gpu("cudasim", order), *args)
