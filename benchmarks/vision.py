"""Segmentation and detection end to end: adaprune adapt / static uniform vs Torch-Pruning at a MACs budget.

Two setups, on data generated here (offline, deterministic; the same data for every seed):

* ``segmentation``: MONAI's ``create_test_image_2d`` (64x64 noisy discs and their mask), a MONAI
  ``UNet(2-D, channels (16, 32, 64, 128), strides (2, 2, 2), 2 residual units)`` trained by this script
  (Adam, cosine, MONAI ``DiceCELoss``); metric: foreground Dice (``ap.SegmentationTask``).
* ``detection``: ``adaprune.examples.canvas.make_canvases`` (digit glyphs on 64x64 canvases, 1-3 per
  image, 10 classes), torchvision's ``FasterRCNN`` over a four-conv backbone (one feature map, a
  128-wide box head), trained by this script (Adam, cosine, the detector's own loss); metric: COCO mAP
  @[.5:.95] (``ap.DetectionTask``).

Each setup has three splits: train (training and fine-tuning), validation (the only split adapt's
controller sees) and a held-out test split (every reported metric). For every (setup, seed) the dense
base model is trained (cached on disk, keyed by setup, seed and training config), then for every budget
(fraction of the base MACs) every method starts from a copy of it and takes exactly ``--steps`` optimizer
steps in all (the setup's default when not given):

* ``adapt``: ``ap.adapt(..., ap.Budget(macs=b), tolerance=<setup's>, finetune_steps=<inner>)``; every
  optimizer step inside its loop (accepted or rolled back, ``AdaptResult.optimizer_steps``) is deducted
  from the fine-tuning after it.
* ``static``: ``ap.prune(..., budget=ap.Budget(macs=b), allocation="uniform")``, then fine-tuning.
* ``torch-pruning``: Torch-Pruning's MetaPruner with GroupMagnitudeImportance (L2, uniform per layer),
  ``pruning_ratio`` bisected to the least that meets the budget (MACs counted by ``adaprune.count``),
  then fine-tuning. A failure of Torch-Pruning on a model is recorded as the result.

Fine-tuning is the task's own (``task.finetune``: Adam at the task's lr, the same training batches).
Every optimizer step is also counted as torch's optimizers take it; a method whose count differs from the
total is a failed cell, never a result. The layers whose output width is fixed by the task (the UNet's
output conv; the detector's class/box predictors and the RPN's objectness/box convs) are ignored by every
method.

    python benchmarks/vision.py --setups segmentation detection --budgets 2 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bisect_ratio, environment, load, log, save

import adaprune as ap
from adaprune.demo import counting_optimizer_steps

METHODS = ("adapt", "static", "torch-pruning")
CACHE = "/tmp/adaprune-vision-cache"

SETUPS: dict[str, dict[str, Any]] = {
    "segmentation": {
        "size": 64, "n_train": 256, "n_val": 48, "n_test": 128, "batch": 16,
        "base_steps": 480, "base_lr": 3e-3, "ft_lr": 1e-3, "steps": 120,
        "tolerance": 0.02, "adapt_inner": 10, "adapt_iters": 8, "adapt_alternatives": 1, "metric": "dice",
        "model": "MONAI UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), "
                 "strides=(2, 2, 2), num_res_units=2, act='RELU'); "
                 "instance norm (MONAI's default)",
        "data": "MONAI create_test_image_2d(64, 64, num_objs=4, rad_max=12, noise_max=0.3), foreground mask",
    },
    "detection": {
        "size": 64, "n_train": 320, "n_val": 160, "n_test": 160, "batch": 8,
        "base_steps": 800, "base_lr": 2e-3, "ft_lr": 2e-4, "steps": 800, "rpn_nms_thresh": 1.0, "box_score_thresh": 0.0,
        "tolerance": 0.05, "adapt_inner": 50, "adapt_iters": 14, "adapt_alternatives": 1, "metric": "map",
        "model": "torchvision FasterRCNN: backbone conv3x3 16(s2)-32-64(s2)-64 with BN+ReLU, one feature map "
                 "(stride 4), anchors 12/18/24 px, RPN NMS off (IoU 1.0) so that exactly 30 proposals reach the box head "
                 "at test (a fixed MACs count), RoIAlign 4x4, box head 2x128 fc, min/max_size 64, 10 detections per "
                 "image (score threshold 0, so that the output shapes are fixed as adaprune's surgery checks them)",
        "data": "adaprune.examples.canvas.make_canvases(size=64, max_objects=3), glyph splits train/val/test",
        "val_note": "The validation split is as large as the test split: on 64 images (the first run's split) the "
                    "dense model's validation mAP moved by half the tolerance with the images drawn, and adapt's "
                    "judgement followed that noise (seed 2 at 1/4 ended 0.055 below the dense test mAP while its "
                    "validation said +0.001).",
    },
}


# ---------------------------------------------------------------------------------------------- data
def seg_data(spec: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images (N, 1, S, S) and masks (N, 1, S, S) of MONAI's synthetic generator, per split (seeded)."""
    from monai.data import create_test_image_2d

    out = {}
    for k, (split, offset) in enumerate((("train", 0), ("val", 100_000), ("test", 200_000))):
        xs, ys = [], []
        for i in range(spec[f"n_{split}"]):
            im, seg = create_test_image_2d(spec["size"], spec["size"], num_objs=4, rad_max=12, noise_max=0.3,
                                           random_state=np.random.RandomState(offset + i + k))
            xs.append(torch.tensor(im, dtype=torch.float32)[None])
            ys.append(torch.tensor(seg > 0, dtype=torch.long)[None])
        out[split] = (torch.stack(xs), torch.stack(ys))
    return out


def det_data(spec: dict[str, Any]) -> dict[str, Any]:
    from adaprune.examples.canvas import make_canvases

    return {split: make_canvases(spec[f"n_{split}"], split, size=spec["size"], seed=0)
            for split in ("train", "val", "test")}


def train_batches(setup: str, data: dict[str, Any], batch: int, seed: int) -> list[tuple[Any, Any]]:
    """The training split in batches, shuffled once by ``seed``."""
    if setup == "segmentation":
        x, y = data["train"]
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        return [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, len(x), batch)]
    c = data["train"]
    perm = torch.randperm(len(c), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(torch.stack([c.images[j] for j in perm[i:i + batch]]), [c.targets[j] for j in perm[i:i + batch]])
            for i in range(0, len(perm), batch)]


def split_batches(setup: str, data: dict[str, Any], split: str, batch: int) -> list[tuple[Any, Any]]:
    if setup == "segmentation":
        x, y = data[split]
        return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    # images as one (N, 3, H, W) tensor: a list would be spread into positional arguments by adaprune's
    # calibration (model(*images)), which torchvision's detectors do not take
    return [(torch.stack(x), y) for x, y in data[split].batches(batch)]


# --------------------------------------------------------------------------------------------- models
def unet() -> nn.Module:
    from monai.networks.nets import UNet

    # act="RELU": with MONAI's default PReLU (one shared weight) Torch-Pruning 1.6 cannot map the skip
    # connections' concatenations (TypeError in update_concat_index_mapping), so no comparison would be possible
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=2, act="RELU")


def detector(size: int, rpn_nms_thresh: float, box_score_thresh: float) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    def block(i: int, o: int, s: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    backbone = nn.Sequential(*block(3, 16, 2), *block(16, 32, 1), *block(32, 64, 2), *block(64, 64, 1))
    backbone.out_channels = 64
    anchors = AnchorGenerator(sizes=((12, 18, 24),), aspect_ratios=((1.0,),))
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=4, sampling_ratio=2)
    return FasterRCNN(backbone, rpn_anchor_generator=anchors, box_roi_pool=pool,
                      box_head=TwoMLPHead(64 * 4 * 4, 128), box_predictor=FastRCNNPredictor(128, 11),
                      min_size=size, max_size=size, box_detections_per_img=10, rpn_pre_nms_top_n_train=200,
                      rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                      box_batch_size_per_image=32, rpn_nms_thresh=rpn_nms_thresh,
                      box_score_thresh=box_score_thresh)


def make_model(setup: str, spec: dict[str, Any]) -> nn.Module:
    return unet() if setup == "segmentation" else detector(spec["size"], spec["rpn_nms_thresh"], spec["box_score_thresh"])


def fixed_layers(setup: str, model: nn.Module) -> list[nn.Module]:
    """The layers whose output width the task fixes (kept by every method)."""
    if setup == "segmentation":
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        return [convs[-1]]  # the last conv: the 2 class logits
    return [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor.cls_score,
            model.roi_heads.box_predictor.bbox_pred]


def dice_ce() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def make_task(setup: str, spec: dict[str, Any], data: dict[str, Any], split: str, seed: int) -> Any:
    tr = train_batches(setup, data, spec["batch"], seed)
    ev = split_batches(setup, data, split, 16)
    if setup == "segmentation":
        return ap.SegmentationTask(tr, ev, metric="dice", loss=dice_ce(), lr=spec["ft_lr"])
    return ap.DetectionTask(tr, ev, metric="map", lr=spec["ft_lr"])


def train_loss(setup: str, model: nn.Module, x: Any, y: Any, loss: nn.Module | None) -> torch.Tensor:
    if setup == "segmentation":
        return loss(model(x), y)
    return sum(model(x, y).values())


def train_base(setup: str, spec: dict[str, Any], data: dict[str, Any], seed: int) -> nn.Module:
    """Adam with a cosine schedule for ``base_steps`` steps, a fresh shuffle of the training split per epoch."""
    torch.manual_seed(seed)
    model = make_model(setup, spec)
    opt = torch.optim.Adam(model.parameters(), lr=spec["base_lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec["base_steps"])
    loss = dice_ce() if setup == "segmentation" else None
    model.train()
    step, epoch = 0, 0
    while step < spec["base_steps"]:
        for x, y in train_batches(setup, data, spec["batch"], seed * 1000 + epoch):
            if step == spec["base_steps"]:
                break
            opt.zero_grad()
            train_loss(setup, model, x, y, loss).backward()
            opt.step()
            sched.step()
            step += 1
        epoch += 1
    return model.eval()


def cached_base(setup: str, spec: dict[str, Any], data: dict[str, Any], seed: int, cache: str) -> tuple[nn.Module, bool]:
    """The dense base model: from ``cache`` (keyed by setup, seed and the setup's config), else trained."""
    trained = {k: spec.get(k) for k in ("size", "n_train", "batch", "base_steps", "base_lr", "rpn_nms_thresh", "model")}
    key = hashlib.sha1(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache or "/nonexistent") / f"{setup}-seed{seed}-{key}.pt"
    if cache and path.exists():
        model = make_model(setup, spec)
        model.load_state_dict(torch.load(path))
        return model.eval(), True
    model = train_base(setup, spec, data, seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, False


# ------------------------------------------------------------------------------------------- methods
def macs(model: nn.Module, x: Any) -> int:
    model.eval()
    return int(ap.count(model, x, disk=False).macs)


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else m.out_features
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def tp_prune(model: nn.Module, x: Any, ratio: float, ignored: list[nn.Module]) -> nn.Module:
    import torch_pruning as tp

    model.eval()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=False, ignored_layers=ignored,
                                  max_pruning_ratio=0.95)
    pruner.step()
    return model


def tp_to_budget(setup: str, base: nn.Module, x: Any, budget: float, steps: int = 10) -> tuple[nn.Module, float, int]:
    """Bisection on pruning_ratio: the least ratio whose pruned model has MACs <= budget * base MACs."""
    target = budget * macs(base, x)

    def at(r: float) -> tuple[nn.Module, int]:
        m = copy.deepcopy(base)
        m = tp_prune(m, x, r, fixed_layers(setup, m))
        try:
            return m, macs(m, x)
        except Exception as exc:  # Torch-Pruning's model is broken: say so
            raise RuntimeError(f"the model Torch-Pruning pruned (pruning_ratio {r:.3f}) does not run: {exc}") from exc

    return bisect_ratio(at, target, 0.95, steps)


def test_metrics(task: Any, model: nn.Module) -> dict[str, float]:
    return {k: round(v, 6) for k, v in task.evaluate(model).items()}


def map_spread(model: nn.Module, data: dict[str, Any], split: str, resamples: int = 40) -> float:
    """The standard deviation of ``model``'s mAP@[.5:.95] on ``split`` over bootstrap resamples of its images
    (how much the metric the controller judges by moves with which images happen to be in the split)."""
    from torchmetrics.detection import MeanAveragePrecision

    preds: list[Any] = []
    targets: list[Any] = []
    model.eval()
    with torch.no_grad():
        for xb, yb in split_batches("detection", data, split, 16):
            preds += model(xb)
            targets += yb
    rng = np.random.default_rng(0)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(preds), len(preds))
        m = MeanAveragePrecision()
        m.update([preds[i] for i in idx], [targets[i] for i in idx])
        values.append(float(m.compute()["map"]))
    return float(np.std(values))


def run_method(setup: str, spec: dict[str, Any], method: str, base: nn.Module, x: Any, data: dict[str, Any],
               budget: float, total: int, seed: int, test: Any) -> dict[str, Any]:
    task = make_task(setup, spec, data, "val", seed + 1000)
    with counting_optimizer_steps() as counted:
        rec = _run_method(setup, spec, method, copy.deepcopy(base), x, task, budget, total, seed, test)
    if counted.steps != rec["steps_total"] or rec["steps_total"] != total:
        raise RuntimeError(f"{method} took {counted.steps} optimizer steps, {rec['steps_total']} by its own "
                           f"account; every method must take exactly {total}")
    rec["optimizer_steps_counted"] = counted.steps
    model = rec.pop("model")
    m, base_m = macs(model, x), macs(base, x)
    rec.update(macs=m, macs_ratio=m / base_m, budget_met=m <= budget * base_m + 1e-9,
               params=int(ap.count(model, x, disk=False).params), widths=widths(model))
    return rec


def _run_method(setup: str, spec: dict[str, Any], method: str, model: nn.Module, x: Any, task: Any,
                budget: float, total: int, seed: int, test: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    inner = 0
    if method == "adapt":
        res = ap.adapt(model, x, task, ap.Budget(macs=budget), tolerance=spec["tolerance"],
                       ignore=fixed_layers(setup, model), finetune_steps=spec["adapt_inner"],
                       max_iterations=spec["adapt_iters"], alternatives=spec.get("adapt_alternatives", 1), seed=seed)
        model = res.model
        inner = res.optimizer_steps
        rec.update(adapt_steps=len({h.step for h in res.history}), adapt_tried=len(res.history),
                   adapt_accepted=sum(r.accepted for r in res.history),
                   adapt_budget_met=res.budget_met, adapt_message=res.message, adapt_evaluations=res.evaluations,
                   val_before=res.before.get(spec["metric"]), val_after=res.after.get(spec["metric"]),
                   adapt_history=[{"step": h.step, "step_size": round(h.step_size, 4), "accepted": h.accepted,
                                   "unused": h.unused, "reason": h.reason[:160],
                                   "metric": round(h.metrics.get(spec["metric"], float("nan")), 4),
                                   "macs": round(h.costs.get("macs", float("nan")), 4)} for h in res.history])
    elif method == "static":
        ap.prune(model, x, budget=ap.Budget(macs=budget), allocation="uniform", ignore=fixed_layers(setup, model))
    else:
        model, ratio, tries = tp_to_budget(setup, model, x, budget)
        rec.update(tp_pruning_ratio=ratio, tp_bisection_tries=tries)
    prune_s = time.perf_counter() - t0
    rec["test_before_finetune"] = test_metrics(test, model)
    post = max(total - inner, 0)
    torch.manual_seed(seed + 7)
    t1 = time.perf_counter()
    task.finetune(model, post)
    ft_s = time.perf_counter() - t1
    rec.update(test=test_metrics(test, model), model=model, steps_inside=inner, steps_after=post,
               steps_total=inner + post, prune_s=prune_s, finetune_s=ft_s, wall_s=prune_s + ft_s)
    return rec


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--budgets", nargs="+", type=int, default=[2, 4], help="denominators: 4 means 1/4 of the MACs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--set", nargs="*", default=[], metavar="SETUP.KEY=VALUE",
                   help="override a setup's config (e.g. detection.base_steps=200 segmentation.steps=60), "
                        "for trial runs; recorded in the results")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="vision")
    p.add_argument("--cache", default=CACHE, help="directory of trained base models ('' for none)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results instead of extending them")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    setups = copy.deepcopy(SETUPS)
    for item in args.set:
        key, value = item.split("=", 1)
        setup, field = key.split(".", 1)
        if setup not in setups or field not in setups[setup]:
            p.error(f"--set {item}: no such setting")
        setups[setup][field] = type(setups[setup][field])(json.loads(value))
    for name in args.setups:
        s = setups[name]
        inside = s["adapt_inner"] * s["adapt_iters"] * s["adapt_alternatives"]  # (each size tried recovers)
        if "adapt" in args.methods and inside > s["steps"]:
            p.error(f"{name}: adapt may take {inside} optimizer steps inside its loop, "
                    f"more than the {s['steps']} every method gets")

    payload = (None if args.fresh else load(args.out)) or {"runs": [], "bases": []}
    payload["environment"] = environment(args.threads)
    payload["config"] = {"setups": setups, "overrides": args.set, "methods": list(METHODS)}
    grids = payload.setdefault("grids_run", [])
    grids.append({"setups": args.setups, "budgets": args.budgets, "seeds": args.seeds, "methods": args.methods,
                  "started": time.strftime("%H:%M:%S")})
    done = {(r["setup"], r["seed"], r["budget"], r["method"]) for r in payload["runs"]}

    for name in args.setups:
        spec = setups[name]
        t = time.perf_counter()
        data = seg_data(spec) if name == "segmentation" else det_data(spec)
        x = data["val"][0][:1] if name == "segmentation" else data["val"].images[0][None]
        log(f"{name}: data in {time.perf_counter() - t:.1f}s")
        for seed in args.seeds:
            t = time.perf_counter()
            base, cached = cached_base(name, spec, data, seed, args.cache)
            train_s = time.perf_counter() - t
            test = make_task(name, spec, data, "test", seed)
            dense = test_metrics(test, base)
            dense_val = test_metrics(make_task(name, spec, data, "val", seed), base)
            log(f"{name} seed {seed}: dense test {spec['metric']} {dense[spec['metric']]:.4f} "
                f"({'cached' if cached else f'trained in {train_s:.0f}s'})")
            payload["bases"] = [b for b in payload["bases"] if (b["setup"], b["seed"]) != (name, seed)]
            payload["bases"].append({"setup": name, "seed": seed, "test": dense, "val": dense_val,
                                     "macs": macs(base, x), "params": int(ap.count(base, x, disk=False).params),
                                     "widths": widths(base), "train_s": None if cached else train_s,
                                     "val_spread": map_spread(base, data, "val") if name == "detection" else None})
            save(args.out, payload)
            for b in args.budgets:
                for method in args.methods:
                    key = (name, seed, b, method)
                    if key in done:
                        continue
                    try:
                        r = run_method(name, spec, method, base, x, data, 1.0 / b, spec["steps"], seed, test)
                    except Exception as exc:  # noqa: BLE001 - a failed method is a result
                        r = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                    r.update(setup=name, seed=seed, budget=b, method=method, metric=spec["metric"],
                             dense=dense[spec["metric"]])
                    payload["runs"] = [q for q in payload["runs"]
                                       if (q["setup"], q["seed"], q["budget"], q["method"]) != key]
                    payload["runs"].append(r)
                    save(args.out, payload)
                    mk = spec["metric"]
                    log(f"{name} s{seed} 1/{b} {method:13s} "
                        + (f"{mk} {r['test'][mk]:.4f} (pre-ft {r['test_before_finetune'][mk]:.4f}, dense "
                           f"{dense[mk]:.4f}) macs {r['macs_ratio']:.3f} met {r['budget_met']} steps "
                           f"{r['steps_inside']}+{r['steps_after']} {r['wall_s']:.0f}s" if "test" in r else r["error"]))
    grids[-1]["finished"] = time.strftime("%H:%M:%S")
    save(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
