"""Model updates: warm-started re-adaptation against adapt from scratch, over a sequence of updates.

The data is MNIST-1D (generated locally, as in ``benchmarks/accuracy.py``, with its CNN1D) or sklearn's
digits (with ``adaprune.examples.digits.DigitsCNN``); both ship offline. The sequence, per seed:

- v0: the CNN trained on classes 0-5 (a 6-way head), then adapted to ``--budget`` of its MACs: the
  deployed model;
- v1: the dense model updated for classes 0-7 (its head grown to 8 outputs, the old rows kept, then
  fine-tuned on the new training data); v2: classes 0-9; v3: new data of the same kind (MNIST-1D: 5,000
  fresh samples from its generator with another seed; digits: another split); v4: shifted data (MNIST-1D
  generated again with more noise, ``--corr-noise`` / ``--iid-noise`` instead of 0.25 / 0.02; digits
  moved one pixel right and down plus ``--noise`` standard deviations of Gaussian noise). Every update
  fine-tunes the previous dense model.

For every update, two runs on a copy of the updated dense model, with the same budget, tolerance, task
(its training and validation data) and options: (a) ``ap.adapt(..., warm_start=deployed)``, where
``deployed`` is the previous update's warm-started result (v0: the first run), and (b) ``ap.adapt`` from
scratch. Per run: wall time, steps, task evaluations, optimizer steps, MACs fraction, test accuracy
(held out), the warm start's outcome, and the overlap of the two plans (channel-weighted Jaccard of the
kept channels, per group from :func:`adaprune.diff`).

    python benchmarks/updates.py            # 3 seeds, writes benchmarks/results/updates.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A
from common import environment, log, save

import adaprune as ap
from adaprune.examples.digits import DigitsCNN, DigitsData

Data = dict[str, torch.Tensor]

STAGES: list[tuple[str, int, str]] = [("classes 0-5", 6, "base"), ("classes 0-7", 8, "base"), ("classes 0-9", 10, "base"),
                                      ("new data, classes 0-9", 10, "fresh"), ("shifted data, classes 0-9", 10, "shifted")]
"""(name, classes, which data) of the base model and of each update."""


def stage_data(d: Data, classes: int, seed: int) -> DigitsData:
    """The examples of the first ``classes`` classes."""
    out = {}
    for split in ("train", "val", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        keep = y < classes
        out[f"x_{split}"], out[f"y_{split}"] = x[keep], y[keep]
    return DigitsData(**out)


def mnist1d_fresh(args: argparse.Namespace, noisier: bool = False) -> Data:
    """MNIST-1D from its own generator with another seed (same sizes and splits as ``accuracy.mnist1d_data``);
    ``noisier``: with ``--corr-noise`` / ``--iid-noise``."""
    from mnist1d.data import get_dataset_args, make_dataset

    spec = get_dataset_args()
    spec.seed = 4242
    if noisier:
        spec.corr_noise_scale, spec.iid_noise_scale = args.corr_noise, args.iid_noise
    d = make_dataset(spec)
    x, y = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y"], dtype=torch.long)
    xt, yt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y_test"], dtype=torch.long)
    return {"x_train": x[:-500], "y_train": y[:-500], "x_val": x[-500:], "y_val": y[-500:], "x_test": xt, "y_test": yt}


def digits_fresh(args: argparse.Namespace) -> Data:
    """Another split of the digits (other training images)."""
    from adaprune.examples.digits import load_digits_data

    d = load_digits_data(seed=1)
    return {k: getattr(d, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}


def digits_shifted(args: argparse.Namespace) -> Data:
    """The digits moved one pixel right and down, plus Gaussian noise of ``--noise`` standard deviations."""
    d = A.digits_data()
    g = torch.Generator().manual_seed(77)
    scale = args.noise * float(d["x_train"].std())
    return {k: torch.roll(v, (1, 1), (2, 3)) + scale * torch.randn(v.shape, generator=g) if k.startswith("x_") else v
            for k, v in d.items()}


DATASETS: dict[str, tuple[dict[str, Any], Any]] = {
    "mnist1d": ({"base": lambda a: A.mnist1d_data(), "fresh": mnist1d_fresh,
                 "shifted": lambda a: mnist1d_fresh(a, noisier=True)}, lambda width, classes: A.CNN1D(width, classes)),
    "digits": ({"base": lambda a: A.digits_data(), "fresh": digits_fresh, "shifted": digits_shifted},
               lambda width, classes: DigitsCNN(width, classes)),
}
"""name -> ({which data: its maker}, the model of a width and a number of classes)."""


def grown(model: nn.Module, classes: int) -> nn.Module:
    """``model`` with its classifier grown to ``classes`` outputs (the old rows kept, new rows initialised)."""
    out = copy.deepcopy(model)
    old = out.fc
    if old.out_features == classes:
        return out
    fc = nn.Linear(old.in_features, classes)
    with torch.no_grad():
        fc.weight[:old.out_features] = old.weight
        fc.bias[:old.out_features] = old.bias
    out.fc = fc
    return out


def fit(model: nn.Module, d: DigitsData, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    """Adam with a cosine schedule over ``epochs`` (trained to convergence, so that what pruning loses is
    not hidden by what extra fine-tuning gains)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for xb, yb in d.loader("train", shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model: nn.Module, d: DigitsData) -> float:
    with torch.no_grad():
        return 100.0 * float((model(d.x_test).argmax(1) == d.y_test).float().mean())


def task_of(d: DigitsData, seed: int, lr: float) -> ap.ClassificationTask:
    torch.manual_seed(seed)
    return ap.ClassificationTask(d.loader("train", shuffle=True), d.loader("val", batch_size=512), lr=lr)


def run(dense: nn.Module, d: DigitsData, args: argparse.Namespace, seed: int, warm: Any = None) -> tuple[Any, dict[str, Any]]:
    model = copy.deepcopy(dense)
    task = task_of(d, seed, args.lr)
    start = time.perf_counter()
    res = ap.adapt(model, d.x_test[:1], task, ap.Budget(macs=args.budget), args.tolerance, ignore=["fc"],
                   finetune_steps=args.finetune_steps, seed=seed, warm_start=warm,
                   **({} if warm is None or args.warm_finetune_steps is None else {"warm_finetune_steps": args.warm_finetune_steps}))
    wall = time.perf_counter() - start
    row = {"wall_s": round(wall, 2), "steps": len(res.history), "evaluations": res.evaluations,
           "optimizer_steps": res.optimizer_steps, "budget_met": res.budget_met,
           "macs": round(res.costs_after["macs"] / res.costs_before["macs"], 4), "test_acc": round(accuracy(model, d), 2),
           "val_before": res.before.get("accuracy"), "val_after": res.after.get("accuracy")}
    if res.warm_start is not None:
        w = res.warm_start
        row["warm"] = {"outcome": w["outcome"], "tries": w["tries"], "restored": w["restored"],
                       "dropped": len(w["dropped"])}
    return res, row


def overlap(dense: nn.Module, a: Any, b: Any, x: torch.Tensor) -> float:
    """Channel-weighted Jaccard of the channels the two plans keep (over the groups either cuts)."""
    from adaprune.specialize import overlap as plan_overlap

    found = plan_overlap(dense, x, {"warm": a.plan, "scratch": b.plan}, ignore=["fc"])
    sizes = [g.size for g in found.groups]
    return round(sum(g.jaccard * g.size for g in found.groups) / max(sum(sizes), 1), 4)


def one_seed(seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    makers, make_model = DATASETS[args.dataset]
    data = {which: make(args) for which, make in makers.items()}
    rows = []
    dense: nn.Module | None = None
    deployed = None
    for k, (name, classes, which) in enumerate(STAGES):
        d = stage_data(data[which], classes, seed)
        if dense is None:
            torch.manual_seed(seed)
            dense = fit(make_model(args.width, classes), d, args.epochs, seed)
        else:
            torch.manual_seed(1000 * seed + k)  # the new head rows: the same whatever ran before
            dense = fit(grown(dense, classes), d, args.update_epochs, seed + k, lr=args.update_lr)
        row: dict[str, Any] = {"seed": seed, "update": k, "stage": name, "dense_test_acc": round(accuracy(dense, d), 2)}
        scratch, row["scratch"] = run(dense, d, args, seed)
        log(f"seed {seed} v{k} {name}: dense {row['dense_test_acc']}, scratch {row['scratch']}")
        if deployed is not None:
            warm, row["warm"] = run(dense, d, args, seed, warm=deployed)
            row["overlap"] = overlap(dense, warm, scratch, d.x_test[:1])
            log(f"    warm {row['warm']} overlap {row['overlap']}")
            deployed = warm
        else:
            deployed = scratch
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for k in sorted({r["update"] for r in rows if "warm" in r}):
        at = [r for r in rows if r["update"] == k]

        def mean(f: Any, at: list[dict[str, Any]] = at) -> float:
            return statistics.fmean(f(r) for r in at)
        out.append({"update": k, "stage": at[0]["stage"], "seeds": len(at),
                    "scratch_acc": round(mean(lambda r: r["scratch"]["test_acc"]), 2),
                    "warm_acc": round(mean(lambda r: r["warm"]["test_acc"]), 2),
                    "acc_gap": round(mean(lambda r: r["warm"]["test_acc"] - r["scratch"]["test_acc"]), 2),
                    "scratch_wall_s": round(mean(lambda r: r["scratch"]["wall_s"]), 2),
                    "warm_wall_s": round(mean(lambda r: r["warm"]["wall_s"]), 2),
                    "wall_ratio": round(mean(lambda r: r["warm"]["wall_s"] / r["scratch"]["wall_s"]), 3),
                    "budget_met": f"{sum(r['warm']['budget_met'] for r in at)}/{len(at)} warm, "
                                  f"{sum(r['scratch']['budget_met'] for r in at)}/{len(at)} scratch",
                    "warm_outcomes": [r["warm"]["warm"]["outcome"] for r in at],
                    "overlap": round(mean(lambda r: r["overlap"]), 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist1d")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, default=0.1, help="digits: the shifted update's noise, in standard deviations")
    p.add_argument("--corr-noise", type=float, default=0.3, help="MNIST-1D: the shifted update's correlated noise")
    p.add_argument("--iid-noise", type=float, default=0.03, help="MNIST-1D: the shifted update's iid noise")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the dense model's MACs")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--finetune-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-4, help="the task's fine-tuning learning rate (Adam)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the base model")
    p.add_argument("--update-epochs", type=int, default=15, help="fine-tuning epochs of each update")
    p.add_argument("--update-lr", type=float, default=1e-3, help="the updates' initial learning rate")
    p.add_argument("--warm-finetune-steps", type=int, default=None,
                   help="the warm step's recovery (default: adapt's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="updates")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment(args.threads), "args": vars(args), "rows": []}
    for seed in args.seeds:
        payload["rows"] += one_seed(seed, args)
        payload["summary"] = summary(payload["rows"])
        save(args.out, payload)
    for s in payload["summary"]:
        log(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
