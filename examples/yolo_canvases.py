"""Prune a YOLOv8n detector with adaprune on its own data, then give it back to Ultralytics.

Offline and on the CPU: digit glyphs on canvases are written as a YOLO dataset, YOLOv8n is built
from its yaml (no weights) and trained by Ultralytics' trainer, :func:`adaprune.adapt` prunes it to a
MACs budget judged by Ultralytics' own validator (``ap.YOLOTask``), Ultralytics' trainer recovers
it, its validator scores it and its exporter writes ONNX, which ONNX Runtime runs.

    python examples/yolo_canvases.py                    # about 10 minutes on 2 cores
    python examples/yolo_canvases.py --budget 0.25 --epochs 40 --workdir runs/yolo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import adaprune as ap
from adaprune.examples.canvas import write_yolo_dataset
from adaprune.vision import ultralytics_trainer


def train(net: torch.nn.Module, data: Path, work: Path, name: str, epochs: int, size: int, **extra: object) -> Path:
    """Ultralytics' trainer on ``net`` as it is (pruned or not); returns the best checkpoint."""
    trainer = ultralytics_trainer(net, data, epochs=epochs, imgsz=size, batch=16, workers=0, device="cpu",
                                  amp=False, plots=False, verbose=False, project=str(work), name=name,
                                  exist_ok=True, **extra)
    trainer.train()
    return Path(trainer.best)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/yolo-canvases"))
    p.add_argument("--budget", type=float, default=0.5, help="the fraction of the MACs to keep")
    p.add_argument("--tolerance", type=float, default=0.01, help="mAP@[.5:.95] the pruning may lose")
    p.add_argument("--epochs", type=int, default=20, help="Ultralytics training epochs of the base model")
    p.add_argument("--recovery", type=int, default=5, help="Ultralytics training epochs after pruning")
    p.add_argument("--images", type=int, default=400, help="training canvases (a quarter as many to validate)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--iterations", type=int, default=40, help="adapt's most pruning steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    work = args.workdir.resolve()
    data = write_yolo_dataset(work / "data", train=args.images, val=max(args.images // 4, 8), size=args.size)
    torch.manual_seed(0)
    base = train(DetectionModel("yolov8n.yaml", nc=10, verbose=False), data, work, "base", args.epochs, args.size)
    net = YOLO(str(base)).model.float()

    t0 = time.perf_counter()
    task = ap.YOLOTask(net, data, imgsz=args.size, batch=16, lr=1e-3, project=work / "task")
    x = torch.rand(1, 3, args.size, args.size)
    dense = task.evaluate(net)
    dense_cost = ap.count(net, x)
    result = ap.adapt(net, x, task, ap.Budget(macs=args.budget), tolerance=args.tolerance, finetune_steps=10,
                      max_iterations=args.iterations, seed=0)
    adapt_s = time.perf_counter() - t0
    pruned = task.evaluate(net)

    best = train(net, data, work, "pruned", args.recovery, args.size, lr0=0.002, warmup_epochs=0)
    final = YOLO(str(best))
    val = final.val(data=str(data), imgsz=args.size, batch=16, device="cpu", plots=False, verbose=False,
                    project=str(work), name="val", exist_ok=True)
    onnx_path = final.export(format="onnx", imgsz=args.size, simplify=False)
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path)
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, args.size, args.size), np.float32)})[0]
    cost = ap.count(final.model.float(), x)

    rows = [("dense (Ultralytics-trained)", dense["map"], dense["map_50"], dense_cost.macs, dense_cost.params),
            (f"adapt to {args.budget:g} of the MACs", pruned["map"], pruned["map_50"], cost.macs, cost.params),
            (f"+ {args.recovery} Ultralytics epochs", float(val.box.map), float(val.box.map50), cost.macs, cost.params)]
    print(f"\n{'model':34s} {'mAP':>7s} {'mAP50':>7s} {'MACs':>12s} {'params':>10s}")
    for name, m, m50, macs, params in rows:
        print(f"{name:34s} {m:7.4f} {m50:7.4f} {macs:12,d} {params:10,d}")
    print(f"\nadapt ({adapt_s:.0f} s): {result.message}")
    print(f"ONNX: {onnx_path} runs in ONNX Runtime, output {tuple(out.shape)}")
    return {"dense_map": dense["map"], "pruned_map": pruned["map"], "final_map": float(val.box.map),
            "macs_ratio": cost.macs / dense_cost.macs, "budget_met": float(result.budget_met)}


if __name__ == "__main__":
    main()
