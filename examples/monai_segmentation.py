"""Prune a MONAI UNet with adaprune, judged by Dice on held-out images, and run it in MONAI's
sliding-window inferer.

Offline and on the CPU: MONAI's synthetic generator draws noisy discs and their masks
(``monai.data.create_test_image_2d``); a MONAI UNet learns to segment them with MONAI's DiceCE loss;
:func:`adaprune.adapt` prunes it to a MACs budget within a Dice tolerance (``ap.SegmentationTask``,
Dice by torchmetrics); the pruned UNet then segments larger images patch by patch in MONAI's
``SlidingWindowInferer``.

    python examples/monai_segmentation.py                # a few minutes on 2 cores
    python examples/monai_segmentation.py --budget 0.25 --tolerance 0.03
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import adaprune as ap


def discs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic images ``(n, 1, size, size)`` and their foreground masks ``(n, size, size)``."""
    from monai.data import create_test_image_2d

    xs, ys = [], []
    for i in range(n):
        image, mask = create_test_image_2d(size, size, num_objs=5, rad_max=size // 6, noise_max=0.4,
                                           random_state=np.random.RandomState(seed * 100_000 + i))
        xs.append(torch.tensor(image, dtype=torch.float32)[None])
        ys.append(torch.tensor(mask > 0, dtype=torch.long))
    return torch.stack(xs), torch.stack(ys)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.5, help="the fraction of the MACs to keep")
    p.add_argument("--tolerance", type=float, default=0.02, help="Dice the pruning may lose (absolute)")
    p.add_argument("--images", type=int, default=160, help="training images (a quarter as many to validate)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps to train the UNet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=40, help="adapt's most pruning steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from monai.inferers import SlidingWindowInferer
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    n_val = max(args.images // 4, 8)
    train_x, train_y = discs(args.images, args.size, seed=0)
    val_x, val_y = discs(n_val, args.size, seed=1)
    test_x, test_y = discs(n_val, 2 * args.size, seed=2)  # held out, and twice as large: patch by patch
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    task = ap.SegmentationTask(batches(train_x, train_y, 16), batches(val_x, val_y, 16), metric="dice",
                               loss=lambda logits, y: loss(logits, y[:, None]), lr=3e-3)
    inferer = SlidingWindowInferer(roi_size=(args.size, args.size), sw_batch_size=4, overlap=0.25)
    test = ap.SegmentationTask(batches(train_x, train_y, 16), batches(test_x, test_y, 8), metric="dice",
                               inferer=inferer)

    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=2)
    task.finetune(unet, args.steps)
    x = train_x[:1]
    dense = {"val": task.evaluate(unet)["dice"], "test": test.evaluate(unet)["dice"], **vars(ap.count(unet, x))}

    t0 = time.perf_counter()
    result = ap.adapt(unet, x, task, ap.Budget(macs=args.budget), tolerance=args.tolerance, finetune_steps=20,
                      max_iterations=args.iterations, seed=0)
    adapt_s = time.perf_counter() - t0
    pruned = {"val": task.evaluate(unet)["dice"], "test": test.evaluate(unet)["dice"], **vars(ap.count(unet, x))}

    print(f"\n{'UNet':22s} {'val Dice':>9s} {'test Dice':>10s} {'MACs':>12s} {'params':>9s}")
    for name, row in (("dense", dense), (f"adapt to {args.budget:g} MACs", pruned)):
        print(f"{name:22s} {row['val']:9.4f} {row['test']:10.4f} {row['macs']:12,d} {row['params']:9,d}")
    print(f"\nadapt ({adapt_s:.0f} s): {result.message}")
    print(f"test Dice on {2 * args.size}x{2 * args.size} images through MONAI's SlidingWindowInferer "
          f"({args.size}x{args.size} patches)")
    return {"dense_dice": dense["test"], "pruned_dice": pruned["test"], "macs_ratio": pruned["macs"] / dense["macs"],
            "budget_met": float(result.budget_met)}


if __name__ == "__main__":
    main()
