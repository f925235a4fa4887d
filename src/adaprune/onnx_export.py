"""ONNX export (TorchScript-based exporter), written atomically; below ``cost/``, which times ONNX Runtime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fs
from ._check import as_bool, as_int, check_inputs, check_module, check_path
from .errors import ArgumentTypeError, ConfigError, StorageError, TraceError


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], opset: int = 17, *,
                dynamic_batch: bool = False) -> Path:
    """Export ``model`` to ONNX (TorchScript-based exporter, constant folding on), written atomically.

    Args:
        model: the model to export (put in eval mode for the export; its modes are restored).
        example_inputs: what ``model`` is called with (a tuple is positional arguments, a dict keywords).
        path: the ``.onnx`` file to write; its directory must exist.
        opset: the ONNX opset, in the range torch's TorchScript exporter supports (7 to 20 in torch 2.14).
        dynamic_batch: leave the first dimension of every input free (named ``batch``; the inputs are
            named ``input_0``, ``input_1`` ...), so the file runs on any batch size. Needs
            ``example_inputs`` to be a tensor or a tuple of tensors with at least one dimension.

    Raises:
        ArgumentTypeError: an argument of the wrong type (``model`` not an ``nn.Module``, ``path`` not a
            path, ``opset`` not an integer, ``example_inputs`` ``None``).
        ConfigError: an empty ``path``, an ``opset`` outside the supported range, or
            ``dynamic_batch=True`` with inputs that are not tensors of at least one dimension.
        TraceError: ``model`` fails to run on ``example_inputs``.
        StorageError: the file's directory does not exist or cannot be written.
    """
    try:  # the opsets torch's TorchScript-based exporter supports, as torch states them
        from torch.onnx import _constants

        low, high = int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # a torch that moved them: the range of torch 2.x
        low, high = 7, 20

    check_module(model)
    check_inputs(example_inputs)
    if check_path(path, "path") is None:
        raise ArgumentTypeError("export_onnx: path=None; expected the path (str or pathlib.Path) of the .onnx file")
    if not os.fspath(path):
        raise ConfigError("export_onnx: path='' is empty; give the path of the .onnx file to write")
    opset = as_int(opset, "opset", low=low, high=high, where="export_onnx",
                   hint=f"torch's ONNX exporter writes opsets {low} to {high}; the default is 17")
    target = Path(path)
    if not target.parent.is_dir():
        raise StorageError(
            f"export_onnx: the directory of {target} does not exist; create {target.parent} first"
        )
    if target.is_dir():
        raise StorageError(f"export_onnx: {target} is a directory; give the path of the .onnx file to write")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = example_inputs if isinstance(example_inputs, dict) else None
    if kwargs is not None:
        args = ()
    names: list[str] | None = None
    axes: dict[str, dict[int, str]] | None = None
    if as_bool(dynamic_batch, "dynamic_batch", where="export_onnx"):
        if kwargs is not None or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in args):
            raise ConfigError(
                "export_onnx: dynamic_batch=True needs example_inputs to be a tensor or a tuple of tensors, "
                "each with a batch dimension; pass dynamic_batch=False for other inputs"
            )
        names = [f"input_{i}" for i in range(len(args))]
        axes = {n: {0: "batch"} for n in names}
    flags = {m: m.training for m in model.modules()}
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
        with torch.no_grad():
            try:  # a model that does not run is one line here, not the exporter's dump of its graph
                model(*args, **(kwargs or {}))
            except Warning:
                raise
            except Exception as exc:
                raise TraceError.model_failed(exc) from exc
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants
            # the TorchScript exporter is deprecated upstream but needs no extra dependency (the
            # torch.export-based one needs onnxscript); it exports every model the tests cover
            warnings.simplefilter("ignore", DeprecationWarning)
            fs.write_atomic(
                target,
                lambda tmp: torch.onnx.export(model, args, tmp, kwargs=kwargs, dynamo=False, opset_version=opset,
                                              input_names=names, dynamic_axes=axes),
                what="the ONNX model",
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, f in flags.items():
            m.training = f
    return target
