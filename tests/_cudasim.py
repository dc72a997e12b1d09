"""The CUDA simulator (``nnmark._C_cudasim``, docs/cuda_sim.md) as a test backend.

``use_cuda_sim()`` swaps the kernels of ``nnmark._ext.cpu`` for the simulator's (the
CUDA module's calls, with device 0 and stream 0) for the duration of a block: every op
called on CPU tensors inside it runs the CUDA kernels' code on the host. Compute the
CPU reference outside the block.
"""
from __future__ import annotations

import contextlib
import os

from nnmark import _C_cpu, _ext

try:
    from nnmark import _C_cudasim as SIM
except ImportError:  # built only with NNMARK_CUDA_SIM=ON
    SIM = None

# CI builds with NNMARK_CUDA_SIM=ON and keeps it set for the tests: the simulator must be there.
REQUIRED = os.environ.get("NNMARK_CUDA_SIM", "").upper() in ("ON", "1", "TRUE")

# The ops the CUDA module has, called as _C_cpu calls them plus (device, stream).
OPS = ("projection_forward", "projection_backward", "dense_forward", "dense_backward", "trigger_verify",
       "magnitude_select", "magnitude_prune", "channel_stats", "magnitude_select_device")
# Host-only calls of the CUDA module (no device, no stream), which _C_cpu lacks.
HOST_OPS = ("magnitude_select_plan",)


class SimAsCpu:
    """``_C_cpu`` with the CUDA ops of ``module`` (the simulator, or a planted variant) in place of its own."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        if name in OPS:
            op = getattr(self._module, name)
            return lambda *args: op(*args, 0, 0)
        if name in HOST_OPS:
            return getattr(self._module, name)
        return getattr(_C_cpu, name)


@contextlib.contextmanager
def use_cuda_sim(order: str = "forward", seed: int = 0, module=None):
    """Run the ops on the simulator (``module``: another build of it) with threads and blocks in ``order``."""
    module = module or SIM
    assert module is not None, "nnmark was built without the CUDA simulator (NNMARK_CUDA_SIM=ON)"
    module.set_schedule(order, seed)
    before = _ext.cpu
    _ext.cpu = SimAsCpu(module)
    try:
        yield module
    finally:
        _ext.cpu = before
        module.set_schedule("forward", 0)
