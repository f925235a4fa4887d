"""Multi-task pruning on one shared trunk: multi-task adapt against single-task-guided adapt and static
uniform pruning, then one specialised model per task against the shared one.

The model (``adaprune.examples.multihead``): an MLP trunk on sklearn digits feeding a classifier (the
digit: accuracy, higher is better) and a regression head (the top half's ink minus the bottom half's,
derived from the image: mean squared error, lower is better), trained on both. With ``--model conv``: a
convolutional trunk (``ConvTwoHead``) whose 8x8 layers feed a segmentation head (the clean digit's ink mask
from the noisy image: per-pixel error, lower is better) and whose pooled layers feed the classifier, so the
two tasks need the layers differently:

    python benchmarks/multitask.py --model conv --tol-ink 0.01 --confidence 0.5 --out multitask_conv

Part 1, at each budget (fractions of the MACs) and seed:

- ``multi``: ``ap.adapt`` with ``ap.MultiTask({digit, ink}, tolerance=...)``;
- ``digit`` / ``ink``: ``ap.adapt`` guided by that task alone (its tolerance);
- ``uniform``: ``ap.prune(allocation="uniform")``, static;

then every model is fine-tuned until it has taken ``--steps`` optimizer steps in all (adapt's own steps
included): ``multi`` and ``uniform`` on both tasks (``MultiTask.finetune``: one batch of each per step,
the sum of the losses), ``digit`` and ``ink`` on their own task's loss, as a user who prunes for that
task alone would; all with Adam from lr 1e-3, the batch order drawn from the seed (``--final cosine``, the
default: the rate decayed to 0 over the remaining steps; ``constant``: held). Then each is measured on the
held-out test split. A task is "within tolerance" when its test metric moved by
at most its tolerance from the unpruned model's, in its own direction.

Part 2, at each budget: ``ap.specialize`` (one adapt run per task) against the ``multi`` model, each
specialised model then fine-tuned on its own task's loss to the same total steps; each is measured on
its own task. The overlap of the specialised plans (storage shared vs separate) is recorded.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import environment, save

import adaprune as ap
from adaprune.examples import multihead

METHODS = ("multi", "digit", "ink", "uniform")
# per --model: its trained base, its tasks, and the output layers kept whole
MODELS = {"mlp": (lambda seed, a: multihead.trained(seed, a.width, a.epochs, anneal=a.anneal), multihead.tasks,
                  ["cls", "reg.2"]),
          "conv": (lambda seed, a: multihead.trained_conv(seed, a.width, a.epochs), multihead.conv_tasks,
                   ["cls.2", "seg.2"])}
ARGS: argparse.Namespace  # (set by main: which model's tasks)


def tasks(data: dict[str, Any], split: str = "v") -> dict[str, Any]:
    return MODELS[ARGS.model][1](data, split)


def test_metrics(model: torch.nn.Module, data: dict[str, Any]) -> dict[str, float]:
    return {n: t.evaluate(model)[t.metric] for n, t in tasks(data, "t").items()}


def within(base: dict[str, float], now: dict[str, float], tol: dict[str, float]) -> dict[str, bool]:
    return {"digit": base["digit"] - now["digit"] <= tol["digit"], "ink": now["ink"] - base["ink"] <= tol["ink"]}


def ignored() -> list[str]:
    return list(MODELS[ARGS.model][2])


def recover(model: torch.nn.Module, task: Any, steps: int, seed: int, schedule: str) -> None:
    """The final fine-tuning, the same recipe for every method: ``steps`` Adam steps at lr 1e-3 on ``task``'s loss
    and training batches (a MultiTask: one batch of each task per step, the sum of the losses), the rate held
    (``constant``) or decayed to 0 over the steps (``cosine``); the batch order is drawn from ``seed`` (the same
    draws for every method; a MultiTask takes them in turn, one task's shuffle after the other's)."""
    torch.manual_seed(seed)
    if schedule == "constant":
        task.finetune(model, steps)
        return
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    flags = {m: m.training for m in model.modules()}  # (each module's mode put back, as the tasks' finetune does)
    model.train()
    try:
        for x, y in itertools.islice(task.training_batches(), steps):
            opt.zero_grad()
            task.loss(model, x, y).backward()
            opt.step()
            sched.step()
    finally:
        for m, f in flags.items():
            m.training = f


def run_method(method: str, base: torch.nn.Module, data: dict[str, Any], budget: float, tol: dict[str, float],
               args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = copy.deepcopy(base)
    x = data["xv"][:1]
    t0 = time.perf_counter()
    inner, met, evaluations = 0, True, 0
    if method == "uniform":
        ap.prune(model, x, budget=ap.Budget(macs=budget), allocation="uniform", ignore=ignored())
    else:
        val = tasks(data)
        task = ap.MultiTask(val, tol) if method == "multi" else val[method]
        res = ap.adapt(model, x, task, ap.Budget(macs=budget), tolerance=tol.get(method, 0.0),
                       ignore=ignored(), finetune_steps=args.inner_steps, max_iterations=args.iterations,
                       seed=args.seed_offset, confidence=args.confidence)
        inner, met, evaluations = res.optimizer_steps, res.budget_met, res.evaluations
    rest = max(args.steps - inner, 0)
    # guided by one task: recovered on that task, as its user would; the others on both
    recover(model, tasks(data)[method] if method in ("digit", "ink") else ap.MultiTask(tasks(data), tol), rest, seed,
            args.final)
    return model, {"method": method, "budget": budget, "budget_met": met, "evaluations": evaluations,
                   "macs": ap.count(model, x).macs, "optimizer_steps": inner + rest, "adapt_steps": inner,
                   "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--model", choices=sorted(MODELS), default="mlp",
                   help="mlp: the MLP trunk with the ink regression; conv: the convolutional trunk with the ink mask")
    p.add_argument("--confidence", type=float, default=0.9, help="adapt's confidence (0: the point drop)")
    p.add_argument("--width", type=int, default=None,
                   help="mlp: the trunk's width (default 128); conv: the 8x8 layers' channels (default 32; the deep ones 4x)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of the unpruned model")
    p.add_argument("--anneal", action="store_true", help="train the unpruned model with a cosine-decayed rate")
    p.add_argument("--tol-digit", type=float, default=0.02, help="accuracy drop allowed (absolute)")
    p.add_argument("--tol-ink", type=float, default=0.02,
                   help="rise of the ink task's metric allowed (absolute; MLP: MSE, unpruned ~0.002; conv: pixel error)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps every model takes in all")
    p.add_argument("--inner-steps", type=int, default=40, help="adapt's fine-tuning steps per step")
    p.add_argument("--final", choices=["cosine", "constant"], default="cosine",
                   help="the final fine-tuning's rate: decayed to 0 over its steps, or held at 1e-3")
    p.add_argument("--iterations", type=int, default=15, help="adapt's max_iterations")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--out", default="multitask")
    args = p.parse_args()
    global ARGS
    ARGS = args
    if args.width is None:
        args.width = {"mlp": 128, "conv": 32}[args.model]
    if args.inner_steps * args.iterations > args.steps:
        raise SystemExit(f"adapt could take {args.inner_steps} x {args.iterations} optimizer steps inside its loop, more "
                         f"than the {args.steps} every method gets: lower --inner-steps or --iterations")
    torch.set_num_threads(1)
    tol = {"digit": args.tol_digit, "ink": args.tol_ink}
    payload: dict[str, Any] = {"environment": environment(1), "config": {**vars(args), "tolerance": tol}, "runs": [],
                               "specialize": []}
    for seed in args.seeds:
        base, data = MODELS[args.model][0](seed, args)
        ref = test_metrics(base, data)
        for budget in args.budgets:
            shared = None
            for method in METHODS:
                model, rec = run_method(method, base, data, budget, tol, args, seed)
                now = test_metrics(model, data)
                rec.update(seed=seed, test=now, unpruned=ref, within=within(ref, now, tol))
                payload["runs"].append(rec)
                print(f"seed {seed} budget {budget} {method:8s} met {rec['budget_met']!s:5} macs {rec['macs']:>6} "
                      f"digit {now['digit']:.4f} ink {now['ink']:.4f} within {rec['within']} {rec['seconds']:.1f}s",
                      flush=True)
                if method == "multi":
                    shared = now
            t0 = time.perf_counter()
            sp = ap.specialize(base, data["xv"][:1], tasks(data), ap.Budget(macs=budget), tol, ignore=ignored(),
                               finetune_steps=args.inner_steps, max_iterations=args.iterations,
                               confidence=args.confidence)
            own = {}
            for name, m in sp.models.items():
                recover(m, tasks(data)[name], max(args.steps - sp.results[name].optimizer_steps, 0), seed, args.final)
                own[name] = test_metrics(m, data)[name]
            assert shared is not None
            payload["specialize"].append({
                "seed": seed, "budget": budget, "own": own, "shared": shared, "unpruned": ref,
                "budget_met": {n: r.budget_met for n, r in sp.results.items()},
                "macs": {n: ap.count(m, data["xv"][:1]).macs for n, m in sp.models.items()},
                "overlap": sp.overlap.to_dict(), "seconds": time.perf_counter() - t0})
            print(f"seed {seed} budget {budget} specialised {own} shared {shared} "
                  f"storage saving {sp.overlap.saving:.1%}", flush=True)
    payload["environment"]["load_average_at_end"] = list(__import__("os").getloadavg())
    print(f"wrote {save(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
