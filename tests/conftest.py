"""Shared fixtures: devices, CPU SIMD paths (ISAs), per-test seeds.

- ``DEVICES`` / ``devices``: ["cpu"] plus "cuda" when nnmark was built with CUDA
  kernels *and* torch sees a GPU. ``device`` is the same list as a parametrized
  fixture. CUDA-only tests are marked ``requires_cuda``.
- ``ISAS`` / ``isa``: every CPU SIMD path this CPU supports ("generic" <= "avx2"
  <= "avx512", up to ``nnmark._C_cpu.detected_isa()``); the ``isa`` fixture forces
  one with ``set_isa`` and restores the original afterwards.
- ``backend``: (device, isa) pairs: cpu under every ISA, plus cuda.
- ``cudasim``: when nnmark was built with the CUDA simulator (NNMARK_CUDA_SIM=ON),
  ``device`` and ``backend`` also take the value "cudasim": the test gets "cpu" tensors
  and every op runs the CUDA kernels' code on the simulator (tests/_cudasim.py).
- Seeds: every test starts from seeds derived from its own node id (stable
  across runs, different between tests); ``rng`` is a numpy Generator seeded so.
"""
from __future__ import annotations

import contextlib
import random
import zlib

import numpy as np
import pytest
import torch

import nnmark
from nnmark import _C_cpu

from _cudasim import SIM, use_cuda_sim

CUDA = bool(nnmark.build_info()["cuda"]) and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")

ALL_ISAS = ("generic", "avx2", "avx512")
_DETECTED = _C_cpu.detected_isa()
ISAS = ALL_ISAS[: ALL_ISAS.index(_DETECTED) + 1] if _DETECTED in ALL_ISAS else ("generic",)

# (device, isa) pairs: the CPU under every SIMD path, CUDA once (the ISA does not apply).
BACKENDS = [("cpu", i) for i in ISAS] + ([("cuda", None)] if CUDA else [])
BACKEND_IDS = [f"cpu-{i}" if d == "cpu" else d for d, i in BACKENDS]
# The device fixtures' values: the devices, plus the simulator when built.
SIM_PARAMS = ["cudasim"] if SIM is not None else []


@contextlib.contextmanager
def use_isa(name: str | None):
    """Force the CPU SIMD path ``name`` (None: leave it) and restore the original after."""
    before = _C_cpu.isa()
    if name is not None:
        _C_cpu.set_isa(name)
        assert _C_cpu.isa() == name
    try:
        yield name
    finally:
        _C_cpu.set_isa(before)


@contextlib.contextmanager
def num_threads(n: int):
    """Use ``n`` native CPU threads inside the block, restoring the count after."""
    before = nnmark.get_num_threads()
    nnmark.set_num_threads(n)
    try:
        yield n
    finally:
        nnmark.set_num_threads(before)


def _seed_of(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode("utf-8"))


@pytest.fixture(autouse=True)
def _fixed_seeds(request):
    """Fixed, per-test seeds for python, numpy and torch (CPU and CUDA)."""
    seed = _seed_of(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


@pytest.fixture
def seed(request) -> int:
    return _seed_of(request.node.nodeid)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def devices() -> list[str]:
    return list(DEVICES)


def on_cuda_sim() -> bool:
    """Whether the ops run on the CUDA simulator now (inside a "cudasim" test): big sizes skip it."""
    from nnmark import _ext

    return not isinstance(_ext.cpu, type(_C_cpu))


@contextlib.contextmanager
def _on(device: str):
    """Yields the torch device for ``device``; "cudasim" is "cpu" with the ops on the simulator."""
    if device == "cudasim":
        with use_cuda_sim():
            yield "cpu"
    else:
        yield device


class Gpu:
    """Where a CPU/CUDA parity test runs its CUDA side: a real GPU ("cuda") or the CUDA
    simulator ("cudasim": CPU tensors, the ops run on it inside ``run()``)."""

    def __init__(self, name: str, order: str = "forward", seed: int = 0, module=None):
        self.name, self.order, self.seed, self.module = name, order, seed, module  # module: another simulator build

    def put(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """A copy of ``t`` on the device; with ``offset``, a view ``offset`` elements into a larger
        buffer (so not 16-byte aligned)."""
        dev = "cuda" if self.name == "cuda" else "cpu"
        buf = torch.ones(t.numel() + offset + 3, dtype=t.dtype, device=dev)
        view = buf[offset:offset + t.numel()].view(t.shape)
        view.copy_(t)
        return view

    def run(self):
        if self.name == "cudasim":
            return use_cuda_sim(self.order, self.seed, self.module)
        return contextlib.nullcontext()


GPUS = (["cuda"] if CUDA else []) + SIM_PARAMS


@pytest.fixture(params=GPUS)
def gpu(request) -> Gpu:
    """A real GPU and/or the CUDA simulator (none: the test is skipped)."""
    return Gpu(request.param)


gpu_side = gpu  # the same fixture, for tests whose own variable is named ``gpu``


@pytest.fixture(params=DEVICES + SIM_PARAMS)
def device(request) -> str:
    with _on(request.param) as dev:
        yield dev


@pytest.fixture(params=ISAS)
def isa(request):
    with use_isa(request.param):
        yield request.param


@pytest.fixture(params=BACKENDS + [(s, None) for s in SIM_PARAMS], ids=BACKEND_IDS + SIM_PARAMS)
def backend(request):
    """Yields the device string; on the CPU with the SIMD path forced (and restored after)."""
    dev, name = request.param
    with use_isa(name), _on(dev) as torch_dev:
        yield torch_dev


@pytest.fixture(autouse=True)
def _isa_and_threads_restored():
    """Guard: no test may leave another SIMD path or thread count behind."""
    isa_before, threads_before = _C_cpu.isa(), nnmark.get_num_threads()
    yield
    assert _C_cpu.isa() == isa_before, "a test changed the CPU ISA without restoring it"
    assert nnmark.get_num_threads() == threads_before, "a test changed the thread count without restoring it"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module (the ``ray`` module), shut down after it."""
    ray = pytest.importorskip("ray")
    # A small object store: CI containers often have a small /dev/shm, and rows are small.
    # One logical GPU (Ray does not check for a physical one): the tests see which tasks
    # ask for it.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             configure_logging=False, object_store_memory=128 << 20)
    try:
        yield ray
    finally:
        ray.shutdown()
