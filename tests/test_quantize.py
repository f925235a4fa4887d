"""ap.quantize: int8 through ONNX Runtime (dynamic and static), on the trained digits CNN."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError, TraceError
from adaprune.examples.digits import DigitsCNN, load_digits_data, train

pytest.importorskip("onnxruntime")
torch.set_num_threads(1)


@functools.lru_cache(maxsize=1)
def trained() -> tuple[nn.Module, object, torch.Tensor]:
    """The digits CNN after 3 epochs, its data and its float validation logits."""
    torch.manual_seed(0)
    data = load_digits_data(0)
    model = DigitsCNN(8)
    train(model, data, epochs=3)
    with torch.no_grad():
        ref = model(data.x_val)
    return model, data, ref


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


# measured on this model: max |int8 - float| logit 0.25 (dynamic), 0.68 (static), logits up to ~8
@pytest.mark.parametrize(("mode", "tolerance"), [("dynamic", 0.6), ("static", 1.5)])
def test_int8_keeps_the_digits_accuracy_within_one_point(mode: str, tolerance: float) -> None:
    model, data, ref = trained()
    calibration = data.loader("train") if mode == "static" else None
    with ap.quantize(model, data.x_val[:4], mode=mode, calibration=calibration) as q:
        assert not isinstance(q, nn.Module) and q.mode == mode
        out = q(data.x_val)  # a batch size other than the example's
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape
        assert abs(accuracy(out, data.y_val) - accuracy(ref, data.y_val)) <= 0.01
        err = float((out - ref).abs().max())
        assert 0 < err < tolerance  # quantized (not the float file), yet close
        assert 0 < q.bytes < q.bytes_float and str(q.bytes) in q.summary().replace(",", "")


def test_weights_dominated_model_file_shrinks_to_about_a_quarter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    x = torch.rand(8, 1, 8, 8)
    for mode in ("dynamic", "static"):
        target = tmp_path / f"{mode}.onnx"
        q = ap.quantize(mlp, x, mode=mode, calibration=[x, (x, None)] if mode == "static" else None, path=target)
        assert q.path == target and q.bytes == target.stat().st_size
        assert q.bytes <= 0.35 * q.bytes_float, q.summary()  # measured 0.27 (dynamic), 0.29 (static)
        q.close()
        assert target.exists()  # a file at the caller's path is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic.onnx", "static.onnx"]  # no leftovers


def test_close_removes_the_temporary_files() -> None:
    model, data, _ = trained()
    q = ap.quantize(model, data.x_val[:2])
    folder = q.path.parent
    assert q.path.is_file() and [p.name for p in folder.iterdir()] == [q.path.name]
    q(data.x_val[:3])
    q.close()
    assert not folder.exists() and q.closed
    with pytest.raises(ap.errors.StorageError, match="close"):
        q(data.x_val[:3])


def test_it_is_not_a_module() -> None:
    model, data, _ = trained()
    with ap.quantize(model, data.x_val[:2]) as q:
        assert not hasattr(q, "eval") and not hasattr(q, "to") and not hasattr(q, "parameters")


def test_static_without_calibration_and_bad_mode_raise() -> None:
    model, data, _ = trained()
    with pytest.raises(ConfigError, match="mode='static' needs calibration="):
        ap.quantize(model, data.x_val[:2], mode="static")
    with pytest.raises(ConfigError, match=r"mode.*'int4'.*'dynamic', 'static'"):
        ap.quantize(model, data.x_val[:2], mode="int4")
    with pytest.raises(ConfigError, match="calibration= is used by mode='static' only"):
        ap.quantize(model, data.x_val[:2], calibration=[data.x_val[:2]])


def test_a_model_that_does_not_run_raises_a_trace_error() -> None:
    with pytest.raises(TraceError, match="failed to run"):
        ap.quantize(nn.Linear(3, 2), torch.randn(2, 5))


def test_resnet18_quantizes_dynamically_and_keeps_its_output_shape() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10)
    with ap.quantize(net, torch.randn(1, 3, 64, 64)) as q:
        assert q(torch.randn(2, 3, 64, 64)).shape == (2, 10)
        assert q.bytes < 0.35 * q.bytes_float


def test_the_calibration_reader_serves_strides_when_onnx_runtime_asks_for_them():
    from onnxruntime import quantization

    from adaprune.quantize import _reader

    feeds = [{"input_0": i} for i in range(4)]
    reader = _reader(quantization, feeds)
    assert [reader.get_next() for _ in range(5)] == [*feeds, None] and len(reader) == 4
    reader.set_range(1, 3)  # ONNX Runtime's strided calibration: only these batches
    assert [reader.get_next() for _ in range(3)] == [feeds[1], feeds[2], None]
