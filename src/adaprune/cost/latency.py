"""Latency measured on the backend the model will run on.

Backends are registered classes (:data:`BACKENDS`): ``torch`` (eager, CPU), ``onnxruntime`` (CPU
execution provider; the model is exported with ``torch.onnx.export``) and ``cuda`` (eager on the GPU,
synchronised). Every measurement uses
warm-up runs, a fixed number of threads, and reports the median of the repeats, with the backend,
threads and batch size it was taken under.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .._registry import Registry
from ..errors import ConfigError, shown


@dataclass(frozen=True)
class Latency:
    """A latency and the conditions it was measured under.

    ``median_ms`` is the steady-state time of one pass: the passes are timed in consecutive blocks
    (:func:`quiet_median`) and the lowest block median is kept. Load from elsewhere on the machine only
    ever adds time and comes and goes in bursts; a plain median over all passes moves with a burst that
    covers half of them, which made a budget's ratio depend on when the original model was timed.
    ``p90_ms`` is over all passes (it shows the disturbance the median leaves out)."""

    median_ms: float
    p90_ms: float
    backend: str
    threads: int
    batch_size: int
    repeats: int


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def batch_size_of(example_inputs: Any) -> int:
    for t in tree_flatten(example_inputs)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


def _time(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def onnx_session(model: nn.Module, example_inputs: Any, threads: int) -> tuple[Any, dict[str, Any]]:
    """Export ``model`` to ONNX (in memory) and open an ONNX Runtime CPU session with ``threads``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("backend='onnxruntime' needs the onnx extra: pip install 'adaprune[onnx]'") from exc
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = example_inputs if isinstance(example_inputs, dict) else None
    if kwargs is not None:
        args = ()
    from ..onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        with contextlib.redirect_stdout(io.StringIO()):
            export_onnx(model, example_inputs, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    tensors = [t for t in tree_flatten(kwargs if kwargs is not None else args)[0] if isinstance(t, torch.Tensor)]
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), tensors)}
    return sess, feed


class Backend(ABC):
    """A place latency is measured: one registered class per backend (:data:`BACKENDS`).

    ``timings`` returns the milliseconds of ``repeats`` forward passes (after ``warmup`` ones) of the
    model on the inputs, with ``threads`` threads. Register a new backend with
    ``@BACKENDS.register("name")``; :class:`~adaprune.Budget`, the command line's config and
    :func:`measure_latency` accept it from then on.
    """

    @abstractmethod
    def timings(self, model: nn.Module, example_inputs: Any, threads: int, warmup: int, repeats: int) -> list[float]:
        """Milliseconds per forward pass, ``repeats`` of them."""


BACKENDS: Registry[type[Backend]] = Registry("latency backend")


def _eager(model: nn.Module, example_inputs: Any, device: torch.device, threads: int, warmup: int, repeats: int,
           sync: Callable[[], None]) -> list[float]:
    from ..calls import call_model

    inputs = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example_inputs)
    first = next(iter(model.parameters()), None)
    if first is not None and first.device != device:
        raise ConfigError(f"move the model to {device} before measuring latency there")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _threads(threads), torch.inference_mode():
            return _time(lambda: call_model(model, inputs), warmup, repeats, sync)
    finally:
        for m, f in flags.items():
            m.training = f


@BACKENDS.register("torch")
class TorchCPU(Backend):
    """PyTorch eager on the CPU."""

    def timings(self, model: nn.Module, example_inputs: Any, threads: int, warmup: int, repeats: int) -> list[float]:
        return _eager(model, example_inputs, torch.device("cpu"), threads, warmup, repeats, lambda: None)


@BACKENDS.register("cuda")
class TorchCUDA(Backend):
    """PyTorch eager on the GPU, synchronised around every pass."""

    def timings(self, model: nn.Module, example_inputs: Any, threads: int, warmup: int, repeats: int) -> list[float]:
        if not torch.cuda.is_available():
            raise ConfigError("backend='cuda' but no CUDA device is available")
        return _eager(model, example_inputs, torch.device("cuda"), threads, warmup, repeats, torch.cuda.synchronize)


@BACKENDS.register("onnxruntime")
class OnnxRuntimeCPU(Backend):
    """ONNX Runtime's CPU execution provider (the model exported with ``torch.onnx.export``)."""

    def timings(self, model: nn.Module, example_inputs: Any, threads: int, warmup: int, repeats: int) -> list[float]:
        sess, feed = onnx_session(model, example_inputs, threads)
        return _time(lambda: sess.run(None, feed), warmup, repeats, lambda: None)


BLOCKS = 5
"""How many consecutive blocks :func:`quiet_median` splits the timed passes into."""


def quiet_median(times: list[float], blocks: int = BLOCKS) -> float:
    """The lowest median of ``blocks`` consecutive blocks of ``times`` (in the order they were measured;
    the plain median when there are fewer than ``3 * blocks`` of them)."""
    if len(times) < 3 * blocks:
        return statistics.median(times)
    size = len(times) // blocks
    return min(statistics.median(times[i * size:(i + 1) * size]) for i in range(blocks))


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    backend: str = "torch",
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
) -> Latency:
    """Latency of one forward pass on ``example_inputs`` (its batch size is the batch size): the least
    disturbed block median of ``repeats`` timed passes (:class:`Latency`)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ConfigError(f"backend={shown(backend)} is not one of {', '.join(BACKENDS.names())}")
    if threads < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("threads and repeats must be >= 1 and warmup >= 0")
    raw = BACKENDS.get(backend)().timings(model, example_inputs, threads, warmup, repeats)
    times = sorted(raw)
    return Latency(
        median_ms=quiet_median(raw),
        p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        backend=backend,
        threads=threads,
        batch_size=batch_size_of(example_inputs),
        repeats=repeats,
    )
