"""Trigger-set inference across many checkpoints of one architecture.

One model instance is built from the factory and kept; each checkpoint's
tensors are copied into it in place and the (fixed) trigger batch is run
through it, for its output (or, with ``layer=``, a hidden layer's: DeepSigns).
On CUDA the forward is captured once as a CUDA graph and replayed after each
copy, since the parameters keep their addresses. The next
checkpoint is read from disk on a background thread while the current one
runs, and only those two are held in memory at a time. The built model (and its
captured graph) is kept for the next call with the same architecture, device,
input dtype and shape (see :func:`clear_runner_cache`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .carriers import WRAPPER_PREFIXES
from .checkpoints import CheckpointError, check_tensor, error_of, open_checkpoint, state_dict_of

Factory = Callable[[], torch.nn.Module]


def load_factory(spec) -> Factory:
    """A model factory from a callable or a ``"package.module:function"`` / ``"file.py:function"`` string."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"arch must be a callable or 'module:function' (or 'file.py:function'), got {spec!r}")
    mod_name, fn_name = spec.split(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"arch file {mod_name!r} does not exist")
        loader_spec = importlib.util.spec_from_file_location(f"nnmark_arch_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[loader_spec.name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file failed to run: say which and why
            sys.modules.pop(loader_spec.name, None)
            raise ValueError(f"arch file {mod_name!r} failed to load: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:
            raise ValueError(f"cannot import arch module {mod_name!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"arch {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn


# Tensors a checkpoint may lack: torch's load_state_dict fills them in, and an eval
# forward never reads them.
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)


def align_state_dict(sd: Mapping[str, torch.Tensor], expected: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``sd`` a model with parameter/buffer names ``expected`` needs, with
    wrapper prefixes (module., model., _orig_mod.) removed where that makes them match.
    Reads exactly those tensors of a lazy state dict. CheckpointError(invalid) if some
    are missing."""
    required = {k for k in expected if not k.endswith(_OPTIONAL_SUFFIXES)}
    for prefix in ("", *WRAPPER_PREFIXES):
        names = {k[len(prefix):]: k for k in sd.keys() if k.startswith(prefix)}
        if set(names) >= required:
            return {k: sd[names[k]] for k in expected if k in names}
    missing = sorted(required - set(sd.keys()))
    raise CheckpointError("invalid", "ArchitectureMismatch", f"checkpoint does not fit the architecture: "
                                                             f"{len(missing)} tensors missing, e.g. {missing[:3]}")


def find_layer(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The submodule of ``model`` named ``layer`` (as ``named_modules`` names it; wrapper
    prefixes such as ``module.`` tolerated); CheckpointError(invalid, MissingLayer) if none."""
    from .carriers import find_name

    modules = dict(model.named_modules())
    try:
        return modules[find_name(modules, layer)]
    except (KeyError, ValueError) as exc:
        msg = str(exc.args[0] if exc.args else exc).replace("carrier", "layer").replace("tensors", "modules")
        raise CheckpointError("invalid", "MissingLayer", f"the model has no layer {layer!r}: {msg}") from None


class _LayerTap:
    """Keeps the output of one submodule on each forward: ``[B, M]``, flattened in C order."""

    def __init__(self, model: torch.nn.Module, layer: str):
        self.layer = layer
        self.out: torch.Tensor | None = None
        self.handle = find_layer(model, layer).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise CheckpointError("invalid", "InferenceError", f"layer {self.layer!r} returns "
                                                               f"{type(output).__name__}, not a tensor")
        self.out = output.reshape(output.shape[0], -1) if output.dim() > 1 else output.reshape(-1, 1)

    def take(self) -> torch.Tensor:
        out, self.out = self.out, None
        if out is None:
            raise CheckpointError("invalid", "InferenceError", f"layer {self.layer!r} did not run in the forward pass")
        return out


class TriggerRunner:
    """Runs one fixed input batch through many checkpoints of one architecture: the
    model's output, or with ``layer`` that submodule's output ``[B, M]``."""

    def __init__(self, factory: Factory, x: torch.Tensor, device=None, cuda_graph: bool | None = None,
                 layer: str | None = None):
        device = torch.device(device) if device is not None else x.device
        self.model = load_factory(factory)().to(device).eval()
        self.tap = _LayerTap(self.model, layer) if layer is not None else None
        self.x = x.to(device, copy=True)  # its own: set_input writes into it
        self.device = device
        # What a checkpoint holds: parameters and persistent buffers (not persistent=False ones).
        self.tensors = dict(self.model.state_dict(keep_vars=True))
        self.names = list(self.tensors)
        self.graph = None
        self.out: torch.Tensor | None = None
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (cuDNN autotuning, lazy init) outside the capture
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._forward()  # with a layer: its output, which each replay rewrites
        self.graph = graph

    def _forward(self) -> torch.Tensor:
        out = self.model(self.x)
        return out if self.tap is None else self.tap.take()

    def align(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of ``sd`` this model needs (read now, if ``sd`` is lazy), checked
        against the model's shapes; CheckpointError(invalid) if they do not fit."""
        aligned = align_state_dict(sd, self.names)
        for name, src in aligned.items():
            src = check_tensor("<checkpoint>", name, src)
            dst = self.tensors[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError("invalid", "ArchitectureMismatch", f"tensor {name!r} has shape "
                                                                         f"{list(src.shape)}, the architecture has "
                                                                         f"{list(dst.shape)}")
            if not src.is_floating_point() and dst.is_floating_point():
                raise CheckpointError("invalid", "WrongDtype", f"tensor {name!r} has dtype {src.dtype}, "
                                                               f"expected floating point")
        return aligned

    @torch.no_grad()
    def set_input(self, x: torch.Tensor) -> None:
        """Copies a new batch of the same shape and dtype into the model's input, in place
        (a captured graph reads it where it is)."""
        if tuple(x.shape) != tuple(self.x.shape) or x.dtype != self.x.dtype:
            raise ValueError(f"the input must keep shape {list(self.x.shape)} and dtype {self.x.dtype}, got "
                             f"{list(x.shape)} {x.dtype}")
        self.x.copy_(x)

    @torch.no_grad()
    def load(self, sd: Mapping[str, torch.Tensor], aligned: bool = False) -> None:
        """Copies a checkpoint's tensors into the model in place (addresses unchanged), in
        one batched copy. ``aligned``: ``sd`` is what :meth:`align` returned (not checked again)."""
        items = (sd if aligned else self.align(sd)).items()
        dsts = [self.tensors[name] for name, _ in items]
        srcs = [src for _, src in items]
        if not dsts:
            return
        if self.device.type == "cuda" and all(s.device.type == "cpu" for s in srcs):
            srcs = _staged(srcs, dsts)
        torch._foreach_copy_(dsts, srcs, non_blocking=True)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """The model's output on the batch, ``[B, C]`` (a fresh tensor)."""
        if self.graph is not None:
            self.graph.replay()
            return self.out.clone()
        return self._forward()


def _staged(srcs: list[torch.Tensor], dsts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host tensors moved to the device of ``dsts`` in one host-to-device copy per dtype:
    packed into pinned memory (torch's pinned allocator keeps the block until the copy is
    done), as views of the copy, in ``dsts``' dtypes."""
    out: list[torch.Tensor | None] = [None] * len(srcs)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, d in enumerate(dsts):
        by_dtype.setdefault(d.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        flat = torch.empty(sum(dsts[i].numel() for i in idx), dtype=dtype, pin_memory=True)
        at = 0
        for i in idx:
            n = dsts[i].numel()
            flat[at:at + n].view(dsts[i].shape).copy_(srcs[i])
            at += n
        dev = flat.to(dsts[idx[0]].device, non_blocking=True)
        at = 0
        for i in idx:
            n = dsts[i].numel()
            out[i] = dev[at:at + n].view(dsts[i].shape)
            at += n
    return out


# Built runners kept across calls of trigger_logits, most recently used last: building
# the model and capturing its CUDA graph costs far more than a checkpoint's forward.
# A runner is taken out while a call uses it, so concurrent calls never share one.
_RUNNERS: OrderedDict = OrderedDict()
_RUNNERS_LOCK = threading.Lock()
_MAX_RUNNERS = 4


def clear_runner_cache() -> None:
    """Drops the models (and CUDA graphs) :func:`trigger_logits` keeps for later calls."""
    with _RUNNERS_LOCK:
        _RUNNERS.clear()


def _runner_key(factory, x: torch.Tensor, device, cuda_graph, layer):
    """(arch, device, input dtype, input shape, cuda_graph, layer), or None when the arch
    cannot be a dictionary key. A string arch is keyed by the string: a file changed
    between calls is not read again until clear_runner_cache()."""
    dev = torch.device(device) if device is not None else x.device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (factory, str(dev), x.dtype, tuple(x.shape), cuda_graph, layer)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _take_runner(key, factory, x, device, cuda_graph, layer) -> TriggerRunner:
    runner = None
    if key is not None:
        with _RUNNERS_LOCK:
            runner = _RUNNERS.pop(key, None)
    if runner is None:
        return TriggerRunner(factory, x, device, cuda_graph, layer=layer)
    runner.set_input(x)
    return runner


def _keep_runner(key, runner: TriggerRunner) -> None:
    if key is None:
        return
    with _RUNNERS_LOCK:
        _RUNNERS[key] = runner
        _RUNNERS.move_to_end(key)
        while len(_RUNNERS) > _MAX_RUNNERS:
            _RUNNERS.popitem(last=False)


# What a failing device says: these end the run instead of marking one checkpoint
# invalid (after an out-of-memory error every later checkpoint may fail the same way,
# and after a device fault every later CUDA call does).
_DEVICE_ERROR_TEXT = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS",
                      "device-side assert", "out of memory", "HIP error")


def is_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the device failing (out of memory, a fault), not the checkpoint."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: CUDA errors raise it
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _DEVICE_ERROR_TEXT)


def _prepare(source, runner: TriggerRunner | None):
    """A source made ready to run, on the read-ahead thread: a module, or the tensors the
    model needs (read here: from files, or from a lazy state dict), or the
    CheckpointError that prevents it."""
    try:
        if isinstance(source, torch.nn.Module):
            return source
        if isinstance(runner, CheckpointError):
            return runner
        if isinstance(source, (str, os.PathLike)):
            with open_checkpoint(source) as ck:
                return runner.align(ck.state_dict())
        if isinstance(source, Mapping):
            return runner.align(state_dict_of(source, "<state dict>"))  # unwraps {"state_dict": ...} as files do
        return CheckpointError("unsupported", "UnsupportedSource", f"a source must be a module, a state dict or a "
                                                                   f"checkpoint path, got {type(source).__name__}")
    except Exception as exc:  # noqa: BLE001 - one source's problem, reported in its row
        if is_device_error(exc):
            raise
        return error_of(exc, os.fspath(source) if isinstance(source, (str, os.PathLike)) else None)


@torch.no_grad()
def _run_module(model: torch.nn.Module, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Runs a user's module in eval mode on its own device, leaving its mode (every
    submodule's) as found; with ``layer``, returns that submodule's output ``[B, M]``."""
    dev = next((t.device for t in model.parameters()), x.device)
    modes = [(m, m.training) for m in model.modules()]
    tap = _LayerTap(model, layer) if layer is not None else None
    try:
        out = model.eval()(x.to(dev))
        return out if tap is None else tap.take()
    finally:
        if tap is not None:
            tap.handle.remove()
        for m, mode in modes:
            m.training = mode


def trigger_logits(factory, sources: Sequence, x: torch.Tensor, device=None, cuda_graph: bool | None = None,
                   progress: Callable[[int], None] | None = None, layer: str | None = None,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Runs ``x`` through every source; returns ``(logits [K, B, C], errors)``.

    ``errors[k]`` is None, or the CheckpointError that kept source k from running
    (its logits row is then NaN). Memory: the model, one checkpoint being run and
    one being read ahead. ``layer``: return that submodule's output ``[B, M]`` (flattened)
    instead of the logits; ``reduce``: applied to each source's output before it is kept
    (e.g. class means of the activations: ``[K, *reduce(out).shape]`` is returned).
    """
    sources = list(sources)
    needs_arch = [s for s in sources if not isinstance(s, torch.nn.Module)]
    runner: TriggerRunner | CheckpointError | None = None
    key = None
    if needs_arch:
        try:
            key = _runner_key(factory, x, device, cuda_graph, layer)
            runner = _take_runner(key, factory, x, device, cuda_graph, layer)
        except CheckpointError as exc:  # e.g. the architecture has no such layer: every file's row says so
            runner = exc
    errors: list[CheckpointError | None] = [None] * len(sources)
    rows: list[torch.Tensor | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_prepare, sources[0], runner) if sources else None
        for k in range(len(sources)):
            item = pending.result()
            pending = pool.submit(_prepare, sources[k + 1], runner) if k + 1 < len(sources) else None
            try:
                if isinstance(item, CheckpointError):
                    raise item
                if isinstance(item, torch.nn.Module):
                    out = _run_module(item, x, layer).float()
                else:
                    runner.load(item, aligned=True)
                    out = runner.logits().float()
                rows[k] = out if reduce is None else reduce(out)
            except CheckpointError as exc:
                errors[k] = exc
            except RuntimeError as exc:  # e.g. a dtype the architecture cannot take
                if is_device_error(exc):  # the device, not this checkpoint: fail the run loudly
                    raise
                errors[k] = CheckpointError("invalid", "InferenceError", f"running the checkpoint failed: "
                                                                         f"{str(exc).splitlines()[0]}")
            if progress is not None:
                progress(k + 1)
    if isinstance(runner, TriggerRunner):  # the run went through: keep the model for the next call
        _keep_runner(key, runner)
    shape = next((r.shape for r in rows if r is not None), None)
    if shape is None:
        return None, errors
    dev = next(r.device for r in rows if r is not None)
    out = torch.full((len(sources), *shape), float("nan"), device=dev)
    for k, r in enumerate(rows):
        if r is not None:
            if r.shape != shape:
                errors[k] = CheckpointError("invalid", "InferenceError", f"output shape {list(r.shape)} differs "
                                                                         f"from {list(shape)}")
                continue
            out[k] = r
    return out, errors
