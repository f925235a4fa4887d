"""Int8 quantization through ONNX Runtime, beside pruning and weight sharing.

``ap.quantize(model, x)`` exports the model with adaprune's own exporter
(:func:`~adaprune.export_onnx`, batch dimension left free), prepares the file with
``onnxruntime.quantization.shape_inference.quant_pre_process`` (shape inference and graph
optimisation, as ONNX Runtime recommends before quantizing) and quantizes it with
``onnxruntime.quantization``: ``mode="dynamic"`` (``quantize_dynamic``: int8 weights, activations
quantized at run time from their observed range) or ``mode="static"`` (``quantize_static``, QDQ
format: int8 weights and activations, the activation ranges calibrated (MinMax) on ``calibration``
batches). Weights are per output channel by default. The result, :class:`Quantized`, runs the int8
file in an ONNX Runtime CPU session; the float model is not changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .. import fs
from .._check import as_bool, check_choice, check_inputs, check_module, check_path, describe
from ..errors import AdapruneError, ConfigError, StorageError, TraceError
from ..onnx_export import export_onnx
from ..share.tune import as_pairs
from .result import Quantized, positional, to_numpy

__all__ = ["MODES", "Quantized", "quantize"]

MODES = ("dynamic", "static")


def _onnxruntime() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise ConfigError("quantize needs onnxruntime, the onnx extra: pip install 'adaprune[onnx]'") from exc
    return quantization


def _feeds(calibration: Any, count: int) -> list[dict[str, Any]]:
    """The calibration batches as ONNX Runtime feeds (inputs named as :func:`export_onnx` names them)."""
    feeds = []
    for i, (inputs, _) in enumerate(as_pairs(calibration, "calibration", targets=False)):
        args = positional(inputs, f"calibration batch {i}'s inputs")
        if len(args) != count:
            raise ConfigError(
                f"calibration: batch {i} has {len(args)} input(s) ({describe(inputs)}), the model takes "
                f"{count}; give batches of inputs, or (inputs, targets) pairs, shaped like example_inputs"
            )
        feeds.append({f"input_{k}": to_numpy(a, f"calibration batch {i}'s input {k}") for k, a in enumerate(args)})
    return feeds


def _reader(quantization: Any, feeds: list[dict[str, Any]]) -> Any:
    """A ``CalibrationDataReader`` over ``feeds``."""

    class Batches(quantization.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.index, self.items = 0, feeds

        def get_next(self) -> dict[str, Any] | None:
            if self.index >= len(self.items):
                return None
            self.index += 1
            return self.items[self.index - 1]

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            """Calibrate in strides (ONNX Runtime's strided calibration): only ``feeds[start:end]`` from now on."""
            self.index, self.items = 0, feeds[start_index:end_index]

        def rewind(self) -> None:
            self.index = 0

    return Batches()


def _export(model: Any, example_inputs: Any, target: Path) -> None:
    try:
        export_onnx(model, example_inputs, target, dynamic_batch=True)
    except AdapruneError:
        raise
    except Exception as exc:  # torch's exporter raises many types
        raise TraceError(
            f"quantize: the model could not be exported to ONNX ({type(exc).__name__}: {str(exc)[:300]}); "
            "check that adaprune.export_onnx(model, example_inputs, path, dynamic_batch=True) works on it"
        ) from exc


def quantize(
    model: Any,
    example_inputs: Any,
    *,
    mode: str = "dynamic",
    calibration: Any = None,
    per_channel: bool = True,
    path: str | os.PathLike[str] | None = None,
    threads: int = 1,
) -> Quantized:
    """Quantize ``model`` to int8 with ONNX Runtime, through adaprune's ONNX export.

    Args:
        model: the float ``nn.Module`` (exported in eval mode; it is not changed).
        example_inputs: a tensor, or a tuple of tensors, that ``model`` is called with; the batch
            (first) dimension stays free in the exported file.
        mode: ``"dynamic"`` (int8 weights, activations quantized at run time) or ``"static"`` (int8
            weights and activations, QDQ format, activation ranges calibrated on ``calibration``).
        calibration: for ``mode="static"`` only: an iterable of batches, each inputs or an
            ``(inputs, targets)`` pair (the targets are not used), e.g. a ``DataLoader``.
        per_channel: quantize weights per output channel (else one scale per tensor).
        path: where to write the quantized ``.onnx`` file (its directory must exist); ``None`` writes
            it to a temporary directory removed by :meth:`Quantized.close`.
        threads: ONNX Runtime intra-op threads of the session that runs it.

    Returns:
        A :class:`Quantized` (not an ``nn.Module``): ``q(x)`` returns a tensor; ``q.bytes`` and
        ``q.bytes_float`` are the sizes on disk of the int8 file and of the float export.

    Raises:
        ConfigError: ``mode`` not ``"dynamic"`` / ``"static"``, ``mode="static"`` without
            ``calibration`` (or ``calibration`` with ``mode="dynamic"``), calibration batches that do
            not fit the model's inputs, or onnxruntime not installed (the ``onnx`` extra).
        ArgumentTypeError: an argument of the wrong type.
        TraceError: the model does not run on ``example_inputs`` or does not export to ONNX, or ONNX
            Runtime could not quantize the export.
        StorageError: ``path``'s directory does not exist or cannot be written.
    """
    check_module(model)
    check_inputs(example_inputs)
    mode = check_choice(mode, "mode", MODES, where="quantize")
    per_channel = as_bool(per_channel, "per_channel", where="quantize")
    check_path(path, "path")
    if mode == "static" and calibration is None:
        raise ConfigError(
            "quantize: mode='static' needs calibration=, batches to calibrate the activation ranges on "
            "(e.g. a DataLoader of a few hundred samples); or use mode='dynamic', which needs none"
        )
    if mode == "dynamic" and calibration is not None:
        raise ConfigError(
            "quantize: calibration= is used by mode='static' only; pass mode='static', or drop calibration"
        )
    args = positional(example_inputs, "example_inputs")
    feeds = _feeds(calibration, len(args)) if mode == "static" else []
    target = None if path is None else Path(path)
    if target is not None and not target.parent.is_dir():
        raise StorageError(f"quantize: the directory of {target} does not exist; create {target.parent} first")
    quantization = _onnxruntime()
    work = Path(tempfile.mkdtemp(prefix="adaprune-quantize-"))
    try:
        fp = work / "float.onnx"
        _export(model, args, fp)
        source = work / "prepared.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp), str(source))
        except Exception as exc:  # noqa: BLE001  (optional step: quantize the export as it is)
            warnings.warn(f"quantize: ONNX Runtime's pre-processing failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); quantizing the export without it", stacklevel=2)
            source = fp

        def write(out: Path) -> None:
            if mode == "dynamic":
                quantization.quantize_dynamic(str(source), str(out), per_channel=per_channel,
                                              weight_type=quantization.QuantType.QInt8)
            else:
                quantization.quantize_static(
                    str(source), str(out), _reader(quantization, feeds),
                    quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8,
                )

        out = work / "model.int8.onnx" if target is None else target
        try:
            if target is None:
                write(out)
            else:
                fs.write_atomic(target, lambda tmp: write(Path(tmp)), what="the quantized ONNX model")
        except AdapruneError:
            raise
        except Exception as exc:  # onnxruntime raises many types
            raise TraceError(
                f"quantize: ONNX Runtime could not quantize the exported model ({type(exc).__name__}: "
                f"{str(exc)[:300]}); try mode='dynamic' or per_channel=False"
            ) from exc
        result = Quantized(out, mode, per_channel, fp.stat().st_size, threads=threads,
                           tempdir=work if target is None else None)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if target is not None:
        shutil.rmtree(work, ignore_errors=True)
    else:  # only the int8 file stays in the temporary directory
        for f in work.iterdir():
            if f != out:
                f.unlink(missing_ok=True)
    return result
