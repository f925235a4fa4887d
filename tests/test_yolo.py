"""YOLOTask: an Ultralytics YOLO model on its data.yaml (digit canvases written in YOLO format), with
Ultralytics' own dataloaders, loss and validator; a pruned YOLO trained by Ultralytics' trainer,
validated by its validator and exported to ONNX; bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adaprune as ap
from adaprune.errors import ConfigError

pytest.importorskip("ultralytics")
pytest.importorskip("torchmetrics")

SIZE = 64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test (conftest's)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from adaprune.examples.canvas import write_yolo_dataset

    return write_yolo_dataset(tmp_path_factory.mktemp("canvases"), train=32, val=16, size=SIZE)


def yolo(cfg: str = "yolov8n.yaml", nc: int = 10):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel(cfg, nc=nc, verbose=False)


def test_the_dataset_is_in_yolo_format(data):
    root = data.parent
    assert sorted(p.name for p in (root / "images").iterdir()) == ["train", "val"]
    assert len(list((root / "images" / "train").glob("*.png"))) == 32
    rows = [r.split() for r in (root / "labels" / "val" / "00000.txt").read_text().splitlines()]
    assert rows and all(len(r) == 5 and 0 <= int(r[0]) <= 9 for r in rows)
    assert all(0.0 < float(v) <= 1.0 for r in rows for v in r[1:])


def test_yolo_task_reports_ultralytics_metrics_and_its_own_loss_trains(data, tmp_path):
    net = yolo()
    task = ap.YOLOTask(net, data, imgsz=SIZE, batch=8, lr=1e-3, project=tmp_path)
    assert task.kind == "detect" and task.metric == "map"
    before = task.evaluate(net)
    assert {"map", "map_50", "precision", "recall", "fitness", "loss"} <= set(before)
    assert all(0.0 <= before[k] <= 1.0 for k in ("map", "map_50", "precision", "recall"))
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    for p in net.parameters():
        p.requires_grad_(False)  # as Ultralytics loads a checkpoint
    task.finetune(net, 12)
    assert any(not torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in net.parameters())  # the flags are put back
    dfl = [k for k in weights if ".dfl." in k]
    assert dfl and all(torch.equal(weights[k], net.state_dict()[k]) for k in dfl)  # fixed, as in Ultralytics
    after = task.evaluate(net)
    assert after["loss"] < before["loss"]  # Ultralytics' loss, on the validation images
    x, batch = task.calibration()[0]
    assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert task.loss(net, x, batch).dim() == 0


def test_a_pruned_yolo_is_trained_validated_and_exported_by_ultralytics(data, tmp_path):
    """(adapt with YOLOTask on the way there: tests/test_app_examples.py runs examples/yolo_canvases.py)"""
    from ultralytics import YOLO

    from adaprune.vision.yolo import ultralytics_trainer

    net = yolo()
    x = torch.rand(1, 3, SIZE, SIZE)
    before = ap.count(net, x).macs
    ap.prune(net, x, budget=ap.Budget(macs=0.5))
    assert ap.count(net, x).macs <= 0.5 * before
    trainer = ultralytics_trainer(net, data, epochs=1, imgsz=SIZE, batch=8, workers=0, plots=False, device="cpu",
                                  project=str(tmp_path), name="train", exist_ok=True, amp=False, verbose=False)
    trainer.train()
    assert trainer.best.exists() and "metrics/mAP50-95(B)" in trainer.metrics
    trained = YOLO(str(trainer.best))
    assert ap.count(trained.model.float(), x).macs == ap.count(net, x).macs  # still the pruned widths
    metrics = trained.val(data=str(data), imgsz=SIZE, batch=8, plots=False, device="cpu", project=str(tmp_path),
                          name="val", exist_ok=True, verbose=False)
    assert 0.0 <= metrics.box.map <= 1.0
    path = trained.export(format="onnx", imgsz=SIZE, simplify=False)
    import onnxruntime as ort

    session = ort.InferenceSession(path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    exported = YOLO(str(trainer.best)).model.float().eval()
    exported.fuse()
    with torch.no_grad():
        want = exported(x)[0].numpy()
    assert got.shape == want.shape == (1, 4 + 10, 84)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_pruned_c2f_blocks_split_as_they_chunk():
    """The ONNX export switches C2f to forward_split, which uses the block's ``c``: surgery keeps it."""
    from ultralytics.nn.modules.block import C2f

    net = yolo().eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    ap.prune(net, x, ratio=0.5)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in net.named_modules() if isinstance(m, C2f)]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()
        blocks = dict(net.named_modules())
        assert inputs
        for name, inp in inputs.items():
            block = blocks[name]
            assert block.c == block.cv1.conv.out_channels // 2 < 256
            assert torch.equal(block.forward(inp), block.forward_split(inp))


def test_yolo_task_bad_input_is_named(data, tmp_path):
    with pytest.raises(ConfigError, match="predicts 80 classes.*has 10.*nc=10"):
        ap.YOLOTask(yolo(nc=80), data, imgsz=SIZE, project=tmp_path)
    with pytest.raises(ConfigError, match="expected an Ultralytics YOLO object"):
        ap.YOLOTask(torch.nn.Linear(2, 2), data, project=tmp_path)
    with pytest.raises(ConfigError, match="could not set up data="):
        ap.YOLOTask(yolo(), tmp_path / "missing.yaml", imgsz=SIZE, project=tmp_path)
    with pytest.raises(ConfigError, match="metric"):
        ap.YOLOTask(yolo(), data, imgsz=SIZE, metric="mAP", project=tmp_path)
    with pytest.raises(ConfigError, match="Ultralytics batch dict"):
        ap.YOLOTask(yolo(), data, imgsz=SIZE, project=tmp_path).loss(yolo(), torch.rand(1, 3, SIZE, SIZE), [1])
