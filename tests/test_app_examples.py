"""The YOLO and MONAI examples under examples/ run end to end (at toy sizes): adapt meets the MACs
budget, and the YOLO one comes back from Ultralytics' trainer, validator and ONNX export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test (conftest's)."""


def test_the_monai_example_prunes_to_the_budget_and_segments_through_the_sliding_window():
    pytest.importorskip("monai")
    out = example("monai_segmentation").main(["--images", "32", "--steps", "40", "--iterations", "3",
                                              "--threads", "1"])
    assert out["budget_met"] == 1.0 and out["macs_ratio"] <= 0.5
    assert 0.3 < out["dense_dice"] <= 1.0 and 0.0 <= out["pruned_dice"] <= 1.0


def test_the_yolo_example_goes_through_ultralytics_and_onnx_runtime(tmp_path):
    pytest.importorskip("ultralytics")
    pytest.importorskip("onnxruntime")
    out = example("yolo_canvases").main(["--workdir", str(tmp_path), "--epochs", "1", "--recovery", "1",
                                         "--images", "16", "--size", "64", "--iterations", "2", "--threads", "1"])
    assert out["budget_met"] == 1.0 and out["macs_ratio"] <= 0.5
    assert (tmp_path / "pruned" / "weights" / "best.onnx").exists()
