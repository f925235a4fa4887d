"""Accuracy at a MACs budget: adaprune adapt / static vs Torch-Pruning (uniform L2, global Taylor, global LAMP).

For every (dataset, seed): train a dense base model, then for every budget (fraction of the base
model's MACs) and every recovery length (fine-tuning epochs), each method starts from a copy of the
same base model, prunes to the budget and gets the same total number of fine-tuning optimizer steps:

    total_steps = recovery_epochs * steps_per_epoch        (steps_per_epoch = batches in the train set)

* static / Torch-Pruning methods: prune once, then ``total_steps`` steps of fine-tuning. ``static_refit``
  is ``static`` followed by ``ap.reconstruct`` (``prune(refit=True)``) on the task's 4 calibration batches.
* adapt: ``--adapt-inner-steps`` optimizer steps inside every step it tries (accepted or rolled back,
  both count; default 0: inside the loop, recovery is least-squares reconstruction of the layers that
  lost inputs plus BatchNorm recalibration, forward passes on 4 calibration batches of training data,
  no optimizer step), at most ``adapt_iters`` steps; whatever it did not spend (``AdaptResult.optimizer_steps``,
  as adapt counted them) is given as fine-tuning after it returns. A grid whose adapt could spend more than
  the smallest ``total_steps`` inside its loop is refused before anything runs. ``adapt`` distils from the dense model while fine-tuning (adaprune's
  ``ClassificationTask(distill=True)``: same optimizer, same steps, loss blended with the teacher's
  soft targets); ``adapt_ce`` is the same without distillation (plain cross-entropy, like the others).

All fine-tuning is the same loop (``ClassificationTask.finetune``: Adam, same lr, same batches). Every
optimizer step a method takes (inside adapt's loop and after) is also counted as torch's optimizers take
it (``optimizer_steps_counted`` in the results); a method whose count differs from ``total_steps`` is a
failed cell, never a result.
Torch-Pruning's ``pruning_ratio`` is found by bisection so that the pruned model's MACs (counted with
``adaprune.count``) meet the budget, the least pruning that meets it. Accuracy is on the held-out test
split; adapt's controller sees only the validation split.

    python benchmarks/accuracy.py --datasets mnist1d digits --budgets 8 16 --seeds 0 1 2 --recovery 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bisect_ratio, environment, load, log, save

import adaprune as ap
from adaprune.demo import counting_optimizer_steps

METHODS = ("adapt", "adapt_ce", "static", "static_refit", "tp_l2", "tp_taylor", "tp_lamp")
FT_LR = 1e-3
BATCH = 64


# ---------------------------------------------------------------------------------------------- data
class CNN1D(nn.Module):
    """A small 1-D CNN for MNIST-1D (input (N, 1, 40)): four conv-BN-ReLU blocks, GAP, linear head."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, 2 * w, 5, padding=2), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.Conv1d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm1d(4 * w), nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.fc = nn.Linear(4 * w * 10, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def mnist1d_data() -> dict[str, torch.Tensor]:
    """MNIST-1D generated locally (default args: 5,000 samples, seed 42, 4,000 train / 1,000 test).

    The last 500 training samples are the validation split (the adaptive controller's metric)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d["y"], dtype=torch.long)
    xt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    yt = torch.tensor(d["y_test"], dtype=torch.long)
    return {"x_train": x[:-500], "y_train": y[:-500], "x_val": x[-500:], "y_val": y[-500:],
            "x_test": xt, "y_test": yt}


def digits_data() -> dict[str, torch.Tensor]:
    from adaprune.examples.digits import load_digits_data

    d = load_digits_data(seed=0)
    return {k: getattr(d, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}


DATASETS: dict[str, dict[str, Any]] = {
    "mnist1d": {"data": mnist1d_data, "model": lambda: CNN1D(32), "epochs": 30, "lr": 3e-3,
                "model_desc": "CNN1D(width=32): conv5(32)-conv5(64)-pool-conv3(64)-conv3(128)-pool, BN+ReLU, "
                              "flatten, linear"},
    "digits": {"data": digits_data, "model": lambda: _digits_model(), "epochs": 20, "lr": 3e-3,
               "model_desc": "adaprune.examples.digits.DigitsCNN(width=32)"},
}


def _digits_model() -> nn.Module:
    from adaprune.examples.digits import DigitsCNN

    return DigitsCNN(32)


def loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH,
                                       shuffle=shuffle, generator=g if shuffle else None)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_base(spec: dict[str, Any], d: dict[str, torch.Tensor], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = spec["model"]()
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec["epochs"])
    dl = loader(d["x_train"], d["y_train"], True, seed)
    for _ in range(spec["epochs"]):
        model.train()
        for xb, yb in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def cached_base(spec: dict[str, Any], d: dict[str, torch.Tensor], seed: int, cache: str, ds: str) -> nn.Module:
    """The dense base model of ``ds`` and ``seed``: from ``cache`` when an earlier invocation kept it (the same
    deterministic training), else trained here (and kept there when ``cache`` is set)."""
    path = Path(cache or "/nonexistent") / f"{ds}-seed{seed}.pt"
    if cache and path.exists():
        base = spec["model"]()
        base.load_state_dict(torch.load(path))
        return base.eval()
    base = train_base(spec, d, seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), path)
    return base


# ------------------------------------------------------------------------------------------- methods
def macs(model: nn.Module, x: torch.Tensor) -> int:
    return int(ap.count(model, x).macs)


def tp_prune(model: nn.Module, x: torch.Tensor, kind: str, ratio: float, calib: list[Any]) -> nn.Module:
    """Torch-Pruning 1.6: MetaPruner (= BasePruner) with the importance of ``kind``, one step."""
    import torch_pruning as tp

    if kind == "tp_l2":
        imp, glob = tp.importance.GroupMagnitudeImportance(p=2), False
    elif kind == "tp_taylor":
        imp, glob = tp.importance.GroupTaylorImportance(), True
    elif kind == "tp_lamp":
        imp, glob = tp.importance.LAMPImportance(p=2), True
    else:
        raise ValueError(kind)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, global_pruning=glob,
                                  ignored_layers=[model.fc], max_pruning_ratio=0.95)
    if kind == "tp_taylor":  # gradients of the loss on a few training batches, as TP's examples do
        model.eval()
        model.zero_grad()
        for xb, yb in calib:
            nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def tp_to_budget(base: nn.Module, x: torch.Tensor, kind: str, budget: float, calib: list[Any],
                 steps: int = 12) -> tuple[nn.Module, float, int]:
    """Bisection on pruning_ratio: the least ratio whose pruned model has MACs <= budget * base MACs."""
    target = budget * macs(base, x)

    def at(r: float) -> tuple[nn.Module, int]:
        m = tp_prune(copy.deepcopy(base), x, kind, r, calib)
        return m, macs(m, x)

    return bisect_ratio(at, target, 0.95, steps)


def run_method(method: str, base: nn.Module, x: torch.Tensor, d: dict[str, torch.Tensor], budget: float,
               total_steps: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    task = ap.ClassificationTask(loader(d["x_train"], d["y_train"], True, seed + 1000),
                                 loader(d["x_val"], d["y_val"], False, 0), lr=FT_LR, distill=method == "adapt")
    calib = [(d["x_train"][i:i + BATCH], d["y_train"][i:i + BATCH]) for i in range(0, 4 * BATCH, BATCH)]
    with counting_optimizer_steps() as counted:
        rec = _run_method(method, copy.deepcopy(base), x, d, task, calib, budget, total_steps, seed, args)
    if counted.steps != rec["finetune_steps_total"] or rec["finetune_steps_total"] != total_steps:
        raise RuntimeError(f"{method} took {counted.steps} optimizer steps, {rec['finetune_steps_total']} "
                           f"by its own account; every method must take exactly {total_steps}")
    rec["optimizer_steps_counted"] = counted.steps
    m = macs(rec.pop("model"), x)
    base_m = macs(base, x)
    rec.update(macs=m, macs_ratio=m / base_m, budget_met=m <= budget * base_m + 1e-9)
    return rec


def _run_method(method: str, model: nn.Module, x: torch.Tensor, d: dict[str, torch.Tensor],
                task: ap.ClassificationTask, calib: list[Any], budget: float, total_steps: int, seed: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """Prune ``model`` with ``method``, then fine-tune whatever of ``total_steps`` it did not spend."""
    rec: dict[str, Any] = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    inner = 0
    if method in ("adapt", "adapt_ce"):
        fs = args.adapt_inner_steps
        res = ap.adapt(model, x, task, ap.Budget(macs=budget), tolerance=args.tolerance, ignore=[model.fc],
                       finetune_steps=fs, max_iterations=args.adapt_iters, seed=seed, **args.adapt_options)
        inner = res.optimizer_steps  # counted by adapt: every step it tried, accepted or rolled back
        rec.update(adapt_steps=len(res.history), adapt_accepted=sum(r.accepted for r in res.history),
                   adapt_finetune_steps_per_step=fs, adapt_message=res.message)
    elif method == "static":
        ap.prune(model, x, budget=ap.Budget(macs=budget), allocation="uniform", ignore=[model.fc])
    elif method == "static_refit":  # the same prune, then least-squares reconstruction on the calibration batches
        ap.prune(model, x, budget=ap.Budget(macs=budget), allocation="uniform", ignore=[model.fc],
                 calibration=task.calibration(), refit=True)
    else:
        model, ratio, tries = tp_to_budget(model, x, method, budget, calib)
        rec.update(tp_pruning_ratio=ratio, tp_bisection_tries=tries)
    prune_s = time.perf_counter() - t0
    rec["acc_before_finetune"] = accuracy(model, d["x_test"], d["y_test"])
    post = max(total_steps - inner, 0)
    torch.manual_seed(seed + 7)
    t1 = time.perf_counter()
    task.finetune(model, post)
    ft_s = time.perf_counter() - t1
    rec.update(acc=accuracy(model, d["x_test"], d["y_test"]), model=model, finetune_steps_inside=inner,
               finetune_steps_after=post, finetune_steps_total=inner + post, prune_s=prune_s, finetune_s=ft_s,
               wall_s=prune_s + ft_s, params=int(ap.count(model, x).params),
               widths=[mod.out_channels for mod in model.modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d))])
    return rec


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=sorted(DATASETS))
    p.add_argument("--budgets", nargs="+", type=int, default=[2, 4, 8, 16],
                   help="denominators: 8 means 1/8 of the base model's MACs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--recovery", nargs="+", type=int, default=[2, 10], help="fine-tuning epochs")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tolerance", type=float, default=0.5, help="adapt's tolerance (accuracy drop)")
    p.add_argument("--adapt-iters", type=int, default=10, help="adapt's max_iterations")
    p.add_argument("--adapt-inner-steps", type=int, default=0,
                   help="fine-tuning steps inside each adapt step (counted in the total)")
    p.add_argument("--adapt-options", type=json.loads, default={},
                   help='more adapt options as JSON, e.g. \'{"probe_ratio": 0.5}\' (recorded in the results)')
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="accuracy")
    p.add_argument("--cache", default="", help="keep trained base models in this directory and reuse them "
                   "(keyed by dataset and seed only: clear it when the model or training changes)")
    p.add_argument("--redo", action="store_true", help="measure this grid's cells again (replacing them)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results instead of extending them")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    old = None if args.fresh else load(args.out)
    payload = old or {"runs": [], "bases": []}
    payload["environment"] = environment(args.threads)
    payload["config"] = {"finetune_lr": FT_LR, "batch_size": BATCH, "adapt_tolerance": args.tolerance,
                         "adapt_max_iterations": args.adapt_iters,
                         "adapt_inner_finetune_steps": args.adapt_inner_steps, "adapt_options": args.adapt_options,
                         "datasets": {k: {"model": v["model_desc"], "base_epochs": v["epochs"], "base_lr": v["lr"]}
                                      for k, v in DATASETS.items()}}
    grids = payload.setdefault("grids_run", [])
    grids.append({"datasets": args.datasets, "budgets": args.budgets, "seeds": args.seeds,
                  "recovery": args.recovery, "methods": args.methods, "started": time.strftime("%H:%M:%S")})
    done = set() if args.redo else {(r["dataset"], r["seed"], r["budget"], r["recovery"], r["method"])
                                    for r in payload["runs"]}

    for ds in args.datasets:
        spec = DATASETS[ds]
        d = spec["data"]()
        x = d["x_train"][:1]
        steps_per_epoch = math.ceil(len(d["y_train"]) / BATCH)
        most_inside = args.adapt_inner_steps * args.adapt_iters
        if any(m.startswith("adapt") for m in args.methods) and most_inside > min(args.recovery) * steps_per_epoch:
            p.error(f"adapt may spend up to {most_inside} optimizer steps inside its loop (--adapt-inner-steps x "
                    f"--adapt-iters), more than the {min(args.recovery) * steps_per_epoch} every method gets on "
                    f"{ds} with {min(args.recovery)} recovery epochs: lower them, or raise --recovery")
        for seed in args.seeds:
            t = time.perf_counter()
            base = cached_base(spec, d, seed, args.cache, ds)
            base_acc = accuracy(base, d["x_test"], d["y_test"])
            log(f"{ds} seed {seed}: dense test acc {base_acc:.4f} ({time.perf_counter() - t:.1f}s)")
            payload["bases"] = [b for b in payload["bases"] if (b["dataset"], b["seed"]) != (ds, seed)]
            payload["bases"].append({"dataset": ds, "seed": seed, "acc": base_acc, "macs": macs(base, x),
                                     "params": int(ap.count(base, x).params),
                                     "widths": [mod.out_channels for mod in base.modules()
                                                if isinstance(mod, (nn.Conv1d, nn.Conv2d))],
                                     "train_s": time.perf_counter() - t, "steps_per_epoch": steps_per_epoch,
                                     "n_train": len(d["y_train"]), "n_val": len(d["y_val"]),
                                     "n_test": len(d["y_test"])})
            for rec_ep in args.recovery:
                for b in args.budgets:
                    for method in args.methods:
                        key = (ds, seed, b, rec_ep, method)
                        if key in done:
                            continue
                        try:
                            r = run_method(method, base, x, d, 1.0 / b, rec_ep * steps_per_epoch, seed, args)
                        except Exception as exc:  # noqa: BLE001 - a failed method is a result
                            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                        r.update(dataset=ds, seed=seed, budget=b, recovery=rec_ep, method=method,
                                 dense_acc=base_acc)
                        payload["runs"] = [q for q in payload["runs"]
                                           if (q["dataset"], q["seed"], q["budget"], q["recovery"], q["method"]) != key]
                        payload["runs"].append(r)
                        save(args.out, payload)
                        log(f"{ds} s{seed} 1/{b} rec{rec_ep} {method:10s} "
                            + (f"acc {r['acc']:.4f} (pre-ft {r['acc_before_finetune']:.4f}) "
                               f"macs {r['macs_ratio']:.4f} met {r['budget_met']} {r['wall_s']:.1f}s"
                               if "acc" in r else r["error"]))
    grids[-1]["finished"] = time.strftime("%H:%M:%S")
    save(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
