"""SegmentationTask (MONAI UNet on MONAI's synthetic images) and DetectionTask (a torchvision Faster
R-CNN on digit canvases): metrics by torchmetrics, checked against known answers; fine-tuning with the
model's own loss; adapt end to end; bad input named."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError

monai = pytest.importorskip("monai")
pytest.importorskip("torchmetrics")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test (conftest's)."""


def blobs(n: int, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's synthetic 2-D images: noisy discs on a background, the mask of the discs."""
    from monai.data import create_test_image_2d

    xs, ys = [], []
    for i in range(n):
        im, seg = create_test_image_2d(size, size, num_objs=4, rad_max=10, noise_max=0.3,
                                       random_state=np.random.RandomState(seed * 1000 + i))
        xs.append(torch.tensor(im, dtype=torch.float32)[None])
        ys.append(torch.tensor(seg > 0, dtype=torch.long))
    return torch.stack(xs), torch.stack(ys)


def unet(dims: int = 2) -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


@pytest.fixture(scope="module")
def seg(one_thread_module):
    x, y = blobs(40)
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    val = [(x[24:32], y[24:32]), (x[32:40], y[32:40])]
    task = ap.SegmentationTask(train, val, lr=1e-2)
    model = unet()
    task.finetune(model, 80)
    return model.eval(), task, x, y


class Oracle(nn.Module):
    """Returns logits that are the given masks (perfect) or all background, as a dict at 'out'."""

    def __init__(self, masks: torch.Tensor, perfect: bool) -> None:
        super().__init__()
        self.masks, self.perfect = masks, perfect
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.masks[: x.shape[0]] if self.perfect else torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long)
        return {"out": nn.functional.one_hot(m, 2).movedim(-1, 1).float() * 10 * self.scale}


def test_segmentation_metrics_are_torchmetrics_on_known_answers():
    x, y = blobs(4)
    task = ap.SegmentationTask([(x, y)], [(x, y)])
    perfect = task.evaluate(Oracle(y, True))
    assert perfect["dice"] == perfect["miou"] == 1.0 and perfect["loss"] < 1e-3
    empty = task.evaluate(Oracle(y, False))
    assert empty["dice"] == empty["miou"] == 0.0  # foreground never found (background not counted)
    both = ap.SegmentationTask([(x, y)], [(x, y)], include_background=True, metric="miou").evaluate(Oracle(y, False))
    assert 0.0 < both["miou"] < 1.0 and 0.0 < both["dice"] < 1.0


def test_segmentation_per_image_values_average_to_the_metric_and_finetuning_learns(seg):
    model, task, _, _ = seg
    metrics, values = task.evaluate_examples(model)
    assert values is not None and values.shape == (16,)
    assert abs(float(values.mean()) - metrics["dice"]) < 1e-9
    assert metrics["dice"] > 0.85, metrics  # trained from 0.2 (untrained) by the task's own fine-tuning
    assert set(metrics) == {"dice", "miou", "loss"}


def test_adapt_prunes_a_monai_unet_within_dice_tolerance_and_it_runs_in_the_sliding_window_inferer(seg):
    from monai.inferers import SlidingWindowInferer

    model, task, x, _ = seg
    before = task.evaluate(model)["dice"]
    res = ap.adapt(copy.deepcopy(model), x[:2], task, ap.Budget(macs=0.5), tolerance=0.05, finetune_steps=20,
                   max_iterations=6)
    assert res.budget_met, res.summary()
    after = task.evaluate(res.model)["dice"]
    assert after >= before - 0.05 - 1e-9, (before, after)
    inferer = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=4, overlap=0.25)
    with torch.no_grad():
        out = inferer(x[:2], res.model.eval())
    assert out.shape == (2, 2, 48, 48)
    windowed = ap.SegmentationTask(task.train_loader, task.val_loader, inferer=inferer).evaluate(res.model)
    assert windowed["dice"] > 0.7, windowed


def test_segmentation_in_3d_with_a_one_channel_output():
    from monai.data import create_test_image_3d
    from monai.networks.nets import UNet

    im, sg = create_test_image_3d(24, 24, 24, num_objs=3, rad_max=6, random_state=np.random.RandomState(0))
    x = torch.tensor(im, dtype=torch.float32)[None, None]
    y = torch.tensor(sg > 0, dtype=torch.long)[None, None]  # MONAI's (N, 1, D, H, W) masks
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0)
    task = ap.SegmentationTask([(x, y)], [(x, y)], lr=1e-2)
    task.finetune(net, 30)
    metrics, values = task.evaluate_examples(net)
    assert values is not None and values.shape == (1,) and metrics["dice"] > 0.5, metrics


def test_segmentation_bad_input_is_named():
    x, y = blobs(2)
    task = ap.SegmentationTask([(x, y)], [(x, y[:, :10])])
    with pytest.raises(ConfigError, match="val_loader batch 0: targets"):
        task.evaluate(unet())
    with pytest.raises(ConfigError, match="'out'"):
        ap.SegmentationTask([(x, y)], [(x, y)]).evaluate(_Dict())
    with pytest.raises(ConfigError, match="metric"):
        ap.SegmentationTask([(x, y)], [(x, y)], metric="accuracy")


class _Dict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits_here": x}


# ----------------------------------------------------------------------------------------- detection
def tiny_detector(classes: int = 11) -> nn.Module:
    """torchvision's Faster R-CNN on a three-layer backbone: small enough for a test."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
    )
    backbone.out_channels = 32
    anchors = AnchorGenerator(sizes=((12, 18, 24),), aspect_ratios=((0.75, 1.0),))
    return FasterRCNN(backbone, num_classes=classes, rpn_anchor_generator=anchors, min_size=96, max_size=96,
                      box_detections_per_img=20, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
                      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, box_batch_size_per_image=32)


@pytest.fixture(scope="module")
def canvases(one_thread_module):
    pytest.importorskip("pycocotools")
    from adaprune.examples.canvas import make_canvases

    return make_canvases(16, "train"), make_canvases(8, "val")


class Truth(nn.Module):
    """Predicts the targets themselves, score 1: mAP 1."""

    def __init__(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.truth = {id(i): t for i, t in zip(images, targets, strict=True)}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
                for t in (self.truth[id(i)] for i in images)]


def test_canvases_are_deterministic_with_boxes_around_the_ink(canvases):
    from adaprune.examples.canvas import make_canvases

    train, _ = canvases
    again = make_canvases(16, "train")
    assert all(torch.equal(a, b) for a, b in zip(train.images, again.images, strict=True))
    for img, t in zip(train.images, train.targets, strict=True):
        assert img.shape == (3, 96, 96) and 1 <= len(t["labels"]) <= 3
        assert bool((t["labels"] >= 1).all() and (t["labels"] <= 10).all())
        for x0, y0, x1, y1 in t["boxes"].tolist():
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert float(img[:, int(y0):int(y1), int(x0):int(x1)].max()) > 0.2  # ink inside


def test_detection_map_is_one_for_the_truth_and_the_loss_trains(canvases):
    train, val = canvases
    truth = ap.DetectionTask(val.batches(4), val.batches(4), loss=lambda m, x, y: torch.zeros(()))
    metrics = truth.evaluate(Truth(val.images, val.targets))
    assert metrics["map"] == metrics["map_50"] == 1.0
    model = tiny_detector()
    task = ap.DetectionTask(train.batches(4), val.batches(4), lr=1e-3)
    before = task.evaluate(model)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    again = task.evaluate(model)
    assert again == before  # the validation loss runs in train mode: seeded, its statistics put back
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())
    task.finetune(model, 30)
    after, values = task.evaluate_examples(model)
    assert values is None and set(after) == {"map", "map_50", "map_75", "mar_100", "loss"}
    assert after["loss"] < before["loss"], (before, after)
    # calibration batches hold the images as model(images)'s one argument: BatchNorm recalibration
    # (which calls the model on them) and the loss both take them
    from adaprune.task import recalibrate_bn

    batches = task.calibration()
    assert len(batches) == 4 and isinstance(batches[0][0], tuple) and len(batches[0][0]) == 1
    assert recalibrate_bn(model, batches)
    assert task.loss(model, *batches[0]).dim() == 0


def test_detection_bad_input_is_named(canvases):
    train, val = canvases
    with pytest.raises(ConfigError, match="one dict with 'boxes'"):
        ap.DetectionTask(train.batches(4), val.batches(4), predict=lambda m, x: [1] * len(x)).evaluate(tiny_detector())
    bad = [(val.images[:2], [{"boxes": torch.zeros(1, 4)}] * 2)]
    with pytest.raises(ConfigError, match="val_loader batch 0: targets"):
        ap.DetectionTask(train.batches(4), bad).evaluate(tiny_detector())
    with pytest.raises(ConfigError, match="metric"):
        ap.DetectionTask(train.batches(4), val.batches(4), metric="accuracy")


def test_pruned_instance_norms_state_their_new_width_and_a_failed_prune_restores_them():
    """MONAI's UNet normalises with weightless InstanceNorm: nothing of theirs is cut, but their
    num_features must follow (torch warns on every forward otherwise), and roll back with the model."""
    import warnings

    from adaprune.surgery import remove

    net, x = unet(), torch.randn(2, 1, 32, 32)
    widths = {n: m.num_features for n, m in net.named_modules() if isinstance(m, nn.InstanceNorm2d)}
    plan = ap.prune(copy.deepcopy(net), x, ratio=0.5).plan
    with pytest.raises(ap.errors.SurgeryError):
        remove(net, plan, lambda: net(x), [(2, 3, 32, 32)])  # a wrong expected shape: rolled back
    assert widths == {n: m.num_features for n, m in net.named_modules() if isinstance(m, nn.InstanceNorm2d)}
    ap.prune(net, x, ratio=0.5)
    seen: dict[str, int] = {}
    for n, m in net.named_modules():
        if isinstance(m, nn.InstanceNorm2d):
            m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = net(x)
    assert out.shape == (2, 2, 32, 32)
    after = {n: m.num_features for n, m in net.named_modules() if isinstance(m, nn.InstanceNorm2d)}
    assert after == seen and any(after[n] < widths[n] for n in widths), (after, seen, widths)


def fpn_detector() -> nn.Module:
    """Faster R-CNN over a two-level FPN with multi-scale RoIAlign (as torchvision's FPN detectors)."""
    from collections import OrderedDict

    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
            self.fpn = FeaturePyramidNetwork([16, 24], 32)
            self.out_channels = 32

        def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
            a = self.c1(x)
            return self.fpn(OrderedDict([("0", a), ("1", self.c2(a))]))

    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((1.0,), (1.0,)))
    return FasterRCNN(Backbone(), num_classes=11, rpn_anchor_generator=anchors, min_size=64, max_size=64,
                      box_roi_pool=MultiScaleRoIAlign(["0", "1"], 7, 2), box_score_thresh=0.0,
                      box_detections_per_img=10, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


def test_the_fpn_channels_of_a_detector_prune_through_multiscale_roi_align():
    """RoIAlign keeps channels, and MultiScaleRoIAlign gathers the levels by slice assignment into a
    buffer sized by the features' channels: the FPN width and the box head's input shrink together,
    and the pruned head computes what the original computes with those channels masked."""
    model = fpn_detector().eval()
    original = copy.deepcopy(model)
    x = [torch.rand(3, 64, 64)]
    res = ap.prune(model, (x,), ratio=0.5)
    width = model.backbone.fpn.layer_blocks[0][0].out_channels
    assert width < 32 and model.roi_heads.box_head.fc6.in_features == width * 7 * 7
    assert not [f for f in res.frozen if "roi_pool" in f.module or f.op == "__setitem__"]
    proposals = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 8.0, 60.0, 50.0], [0.0, 0.0, 63.0, 63.0]])]

    def boxes_features(m: nn.Module) -> torch.Tensor:
        images, _ = m.transform(x)
        with torch.no_grad():
            features = m.backbone(images.tensors)
            pooled = m.roi_heads.box_roi_pool(features, proposals, images.image_sizes)
            return m.roi_heads.box_predictor(m.roi_heads.box_head(pooled))[0]

    handle = ap.mask(original, res.plan)
    try:
        torch.testing.assert_close(boxes_features(original), boxes_features(model), rtol=1e-4, atol=1e-5)
    finally:
        handle.undo()
    with torch.no_grad():
        out = model(x)
    assert set(out[0]) == {"boxes", "scores", "labels"}


class Detects(nn.Module):
    """Scores per position; those above 0 are the output, so how many depends on the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.score = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(self.body(x)).flatten()
        return s[s > 0].unsqueeze(1).expand(-1, 4)


def test_an_output_whose_count_depends_on_the_weights_passes_the_check_after_surgery():
    """A detector's detections per image change with its weights: the check after surgery accepts a
    different first dim, and nothing else."""
    from adaprune.surgery.remove import shapes_agree

    torch.manual_seed(0)
    model, x = Detects().eval(), torch.rand(1, 3, 8, 8)
    before = model(x).shape
    res = ap.prune(model, x, ratio=0.5)
    after = model(x).shape
    assert not res.plan.is_empty and before[0] != after[0] and before[1:] == after[1:]
    assert shapes_agree([(5, 4), (3,)], [(9, 4), (7,)])
    assert not shapes_agree([(5, 3)], [(5, 4)]) and not shapes_agree([(5, 4)], [(5, 4, 1)])
    assert not shapes_agree([(5, 4)], [(5, 4), (2,)])
