"""The result of :func:`adaprune.quantize`: an int8 ONNX file and an ONNX Runtime session over it."""

from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._check import as_int
from ..errors import ArgumentTypeError, ConfigError, StorageError


def to_numpy(value: Any, name: str) -> np.ndarray:
    """A tensor (or array) as a float32 / integer NumPy array on the CPU."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return np.ascontiguousarray(value.numpy())
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value.astype(np.float32) if value.dtype.kind == "f" else value)
    raise ArgumentTypeError(f"{name} is {type(value).__name__}; expected a torch.Tensor (or a NumPy array)")


def positional(inputs: Any, name: str) -> tuple[Any, ...]:
    """The model's positional inputs: a tensor is one input, a tuple (or list) several."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    if isinstance(inputs, dict):
        raise ArgumentTypeError(
            f"{name} is a dict; the quantized model takes positional inputs (a tensor or a tuple of tensors)"
        )
    return (inputs,)


class Quantized:
    """An int8 model: the quantized ``.onnx`` file and an ONNX Runtime CPU session that runs it.

    ``q(inputs)`` runs it like the model it came from (a tensor, or a tuple of tensors for a model of
    several inputs, any batch size) and returns a ``torch.Tensor`` (a tuple for several outputs), so a
    task's ``evaluate`` can call it in place of the model. It is **not** an ``nn.Module``: it has no
    parameters, no ``eval()``, no ``to()``, no gradients; the float model is left unchanged.

    Attributes:
        path: the quantized ``.onnx`` file.
        mode: ``"dynamic"`` or ``"static"``.
        per_channel: whether weights were quantized per output channel.
        bytes: the size of the quantized file on disk.
        bytes_float: the size of the float ONNX export it was made from.
        threads: ONNX Runtime's intra-op threads.

    When :func:`~adaprune.quantize` was called with ``path=None`` the file lives in a temporary
    directory removed by :meth:`close` (or ``with``, or when the object is garbage collected); a file
    written to a ``path`` of the caller's is kept.
    """

    def __init__(self, path: Path, mode: str, per_channel: bool, bytes_float: int, *, threads: int = 1,
                 tempdir: Path | None = None) -> None:
        self.path = Path(path)
        self.mode = mode
        self.per_channel = per_channel
        self.bytes = self.path.stat().st_size
        self.bytes_float = int(bytes_float)
        self.threads = as_int(threads, "threads", low=1, where="quantize", hint="e.g. threads=1")
        self._tempdir = tempdir
        self._cleanup = (weakref.finalize(self, shutil.rmtree, str(tempdir), True)
                         if tempdir is not None else None)
        self._session: Any = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the temporary file (it can no longer run)."""
        return self._cleanup is not None and not self._cleanup.alive

    @property
    def ratio(self) -> float:
        """``bytes / bytes_float``: the quantized file's size over the float export's."""
        return self.bytes / self.bytes_float if self.bytes_float else float("nan")

    def session(self) -> Any:
        """The ONNX Runtime ``InferenceSession`` (CPU execution provider, ``threads`` intra-op threads)."""
        if self.closed:
            raise StorageError(f"Quantized: {self.path} was removed by close(); quantize the model again")
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(os.fspath(self.path), opts, providers=["CPUExecutionProvider"])
        return self._session

    def __call__(self, inputs: Any) -> Any:
        sess = self.session()
        args = positional(inputs, "inputs")
        names = [i.name for i in sess.get_inputs()]
        if len(args) != len(names):
            raise ConfigError(
                f"Quantized: got {len(args)} input(s), the model takes {len(names)}; pass a tensor, or a "
                "tuple with one tensor per input, as the model was quantized with"
            )
        feed = {n: to_numpy(a, f"inputs[{i}]") for i, (n, a) in enumerate(zip(names, args))}
        outs = [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def close(self) -> None:
        """Drop the session and remove the temporary directory (a no-op for a file at a given ``path``)."""
        self._session = None
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Quantized:  # noqa: PYI034  (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        """One line: mode, weight granularity, the file sizes and their ratio."""
        granularity = "per-channel" if self.per_channel else "per-tensor"
        return (f"int8 {self.mode} quantization ({granularity} weights): {self.bytes:,} bytes, "
                f"{self.ratio:.2f}x the float ONNX export's {self.bytes_float:,}; {self.path}")

    def __repr__(self) -> str:
        return f"Quantized(mode={self.mode!r}, bytes={self.bytes}, bytes_float={self.bytes_float}, path={self.path!r})"
