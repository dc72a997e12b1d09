"""Trigger-set inference across many checkpoints of one architecture.

One model instance is built from the factory and kept; each checkpoint's
tensors are copied into it in place and the (fixed) trigger batch is run
through it. On CUDA the forward is captured once as a CUDA graph and replayed
after each copy, since the parameters keep their addresses. The next
checkpoint is read from disk on a background thread while the current one
runs, and only those two are held in memory at a time.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .carriers import WRAPPER_PREFIXES
from .checkpoints import CheckpointError, state_dict_of, load_state_dict

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


def _align(sd: Mapping[str, torch.Tensor], expected: Sequence[str]) -> dict[str, torch.Tensor]:
    """The state dict with wrapper prefixes (module., model., _orig_mod.) removed where that makes it match."""
    required = {k for k in expected if not k.endswith(_OPTIONAL_SUFFIXES)}
    for prefix in ("", *WRAPPER_PREFIXES):
        names = {k[len(prefix):]: k for k in sd.keys() if k.startswith(prefix)}
        if set(names) >= required:
            return {k: sd[names[k]] for k in expected if k in names}
    missing = sorted(required - set(sd.keys()))
    raise CheckpointError("invalid", f"checkpoint does not fit the architecture: {len(missing)} tensors missing, "
                                     f"e.g. {missing[:3]}")


class TriggerRunner:
    """Runs one fixed input batch through many checkpoints of one architecture."""

    def __init__(self, factory: Factory, x: torch.Tensor, device=None, cuda_graph: bool | None = None):
        device = torch.device(device) if device is not None else x.device
        self.model = load_factory(factory)().to(device).eval()
        self.x = x.to(device)
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
                self.model(self.x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.model(self.x)
        self.graph = graph

    @torch.no_grad()
    def load(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Copies a checkpoint's tensors into the model in place (addresses unchanged)."""
        aligned = _align(sd, self.names)
        for name, src in aligned.items():
            dst = self.tensors[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError("invalid", f"tensor {name!r} has shape {list(src.shape)}, "
                                                 f"the architecture has {list(dst.shape)}")
            if not src.is_floating_point() and dst.is_floating_point():
                raise CheckpointError("invalid", f"tensor {name!r} has dtype {src.dtype}, expected floating point")
            with torch.no_grad():
                dst.copy_(src, non_blocking=True)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """The model's output on the batch, ``[B, C]`` (a fresh tensor)."""
        if self.graph is not None:
            self.graph.replay()
            return self.out.clone()
        return self.model(self.x)


def _read(source):
    """A source made ready to run, on the prefetch thread: a module, a state dict of
    tensors (files read whole here), or the CheckpointError that prevents it."""
    try:
        if isinstance(source, torch.nn.Module):
            return source
        if isinstance(source, (str, os.PathLike)):
            sd = load_state_dict(source)
            return {k: sd[k] for k in sd.keys()}  # materialise lazy safetensors views here
        if isinstance(source, Mapping):
            return state_dict_of(source, "<state dict>")  # unwraps {"state_dict": ...} as files do
        return CheckpointError("unsupported", f"a source must be a module, a state dict or a checkpoint path, "
                                              f"got {type(source).__name__}")
    except CheckpointError as exc:
        return exc


@torch.no_grad()
def _run_module(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs a user's module in eval mode on its own device, leaving its mode as found."""
    dev = next((t.device for t in model.parameters()), x.device)
    was_training = model.training
    try:
        return model.eval()(x.to(dev))
    finally:
        model.train(was_training)


def trigger_logits(factory, sources: Sequence, x: torch.Tensor, device=None, cuda_graph: bool | None = None,
                   progress: Callable[[int], None] | None = None):
    """Runs ``x`` through every source; returns ``(logits [K, B, C], errors)``.

    ``errors[k]`` is None, or the CheckpointError that kept source k from running
    (its logits row is then NaN). Memory: the model, one checkpoint being run and
    one being read ahead.
    """
    sources = list(sources)
    needs_arch = [s for s in sources if not isinstance(s, torch.nn.Module)]
    runner = TriggerRunner(factory, x, device, cuda_graph) if needs_arch else None
    errors: list[CheckpointError | None] = [None] * len(sources)
    rows: list[torch.Tensor | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read, sources[0]) if sources else None
        for k in range(len(sources)):
            item = pending.result()
            pending = pool.submit(_read, sources[k + 1]) if k + 1 < len(sources) else None
            try:
                if isinstance(item, CheckpointError):
                    raise item
                if isinstance(item, torch.nn.Module):
                    rows[k] = _run_module(item, x).float()
                else:
                    runner.load(item)
                    rows[k] = runner.logits().float()
            except CheckpointError as exc:
                errors[k] = exc
            except RuntimeError as exc:  # e.g. a dtype the architecture cannot take
                errors[k] = CheckpointError("invalid", f"running the checkpoint failed: {str(exc).splitlines()[0]}")
            if progress is not None:
                progress(k + 1)
    shape = next((r.shape for r in rows if r is not None), None)
    if shape is None:
        return None, errors
    dev = next(r.device for r in rows if r is not None)
    out = torch.full((len(sources), *shape), float("nan"), device=dev)
    for k, r in enumerate(rows):
        if r is not None:
            if r.shape != shape:
                errors[k] = CheckpointError("invalid", f"output shape {list(r.shape)} differs from {list(shape)}")
                continue
            out[k] = r
    return out, errors
