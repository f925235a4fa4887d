"""One process of benchmarks/scaleout.py's DDP phase (run alone or under torchrun): prune a cached model to half
its MACs (uniform L2), fine-tune it with ``ClassificationTask.finetune`` (data-parallel under torchrun) and write
the time and the validation accuracy (BatchNorm statistics re-estimated first) to OUT/rank{rank}.json.

    python _ddp_worker.py WEIGHTS MODEL SIZE STEPS THREADS OUT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from torch.utils.data import DataLoader, TensorDataset

import adaprune as ap
from adaprune.scale import distributed


def main() -> None:
    weights, name, size, steps, threads, out = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    distributed.join()
    rank, world = distributed.world()
    from safetensors.torch import load_file
    from scaleout import digits
    from torchvision import models

    from adaprune.task import recalibrate_bn

    xt, yt, xv, yv = digits(int(size))
    model = getattr(models, name)(num_classes=10)
    model.load_state_dict(load_file(weights))
    head = model.fc if hasattr(model, "fc") else model.classifier[-1]
    ap.prune(model, xv[:2], budget=ap.Budget(macs=0.5), ignore=[head])  # (the same cut on every process)
    task = ap.ClassificationTask(DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True),
                                 DataLoader(TensorDataset(xv, yv), batch_size=128), lr=1e-3)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    task.finetune(model, int(steps))
    seconds = time.perf_counter() - t0
    # BatchNorm statistics re-estimated on the training images, as adapt's recovery does (MobileNetV3's momentum
    # of 0.01 leaves them far from the pruned, fine-tuned weights)
    recalibrate_bn(model, [(xt[i:i + 64], None) for i in range(0, len(yt), 64)], max_batches=len(yt))
    record = {"rank": rank, "world": world, "threads": int(threads), "seconds": seconds, **task.evaluate(model)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
