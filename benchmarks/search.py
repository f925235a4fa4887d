"""Search allocator against the sensitivity allocator at an equal number of candidate evaluations.

MNIST-1D (generated locally by the ``mnist1d`` package), accuracy.py's CNN1D(32) trained as accuracy.py trains
it, one base model per seed. At ``--macs`` of the MACs (default 1/8), three allocations of the same budget:

- ``uniform``: every group cut by the same ratio (``ap.prune``, allocation ``uniform``); no evaluations.
- ``sensitivity``: ``ap.sensitivity`` (every cluster at ``--ratios``, by default 0.25/0.5/0.75: E = clusters x
  ratios + 1 evaluations),
  then ``ap.allocate_from_sensitivity``.
- ``search``: ``ap.search`` with ``trials=E`` (Optuna TPE, ``parallel=2``), the same E evaluations.
- ``netadapt``: ``ap.search(method="netadapt")`` with ``trials=E``: NetAdapt's greedy path, E // clusters steps to
  the budget, one candidate per cluster a step (``gamma`` 3, the default, not tuned here): clusters x (E // clusters)
  evaluations, at most E.

Both evaluate candidates the same way: the masked model's (no fine-tuning) cross-entropy on the 500 validation
examples, negated; the ``+bn`` rows do the same after re-estimating the candidate's BatchNorm statistics on 8
training batches (``adaprune.search.Recalibrated``, adaptive BatchNorm as EagleEye evaluates candidates), again
the same function for both allocators; the ``+tuned`` rows judge each candidate after ``--judge-steps`` Adam steps
on the masked model (``adaprune.search.Tuned``, NetAdapt's short-term fine-tune; weights put back after). Every plan is then cut and fine-tuned with the same ``--steps`` Adam steps (lr 1e-3, batches
of 64, the same seed; with ``--finetunes K``, K such runs with other batch orders, the same K for every plan, and
their mean accuracy is the plan's), and judged on the 1,000 held-out test examples, which nothing before saw.
The summary pairs each judge's search and sensitivity plans on the same base models: the mean difference in
test accuracy, its Student-t 95% interval over the seeds, and wins/ties/losses.

    python benchmarks/search.py                      # seeds 0 1 2 (a few minutes)
    python benchmarks/search.py --seeds 0 1 2 3 4 5 6 7 8 9 --jobs 2 --judges tuned --judge-steps 150
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from accuracy import BATCH, DATASETS, FT_LR, accuracy, cached_base, loader
from common import RESULTS, environment, log, save

import adaprune as ap
from adaprune.search import Recalibrated, Tuned

JUDGES = {"masked": "", "bn": "+bn", "tuned": "+tuned"}
"""``--judges`` names and the suffix of their rows' method names."""
METHODS = {"tpe": "search", "netadapt": "netadapt"}
"""``--methods`` (``ap.search``'s ``method``) and their rows' method names."""


class ValScore:
    """Minus the mean cross-entropy on the validation split (higher is better); picklable."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __call__(self, model: nn.Module) -> float:
        model.eval()
        return -float(nn.functional.cross_entropy(model(self.x), self.y))


def judges(d: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """``--judges`` name -> a function making that judge: minus the validation cross-entropy of the masked
    candidate, after re-estimating its BatchNorm statistics on 8 training batches, or after ``--judge-steps``
    Adam steps on it (the training loader shuffles with the global generator each evaluation seeds)."""
    score = ValScore(d["x_val"], d["y_val"])
    calib = [(d["x_train"][i:i + BATCH], d["y_train"][i:i + BATCH]) for i in range(0, 8 * BATCH, BATCH)]
    tuning = ap.ClassificationTask(loader(d["x_train"], d["y_train"], True, 123), loader(d["x_val"], d["y_val"], False, 0),
                                   lr=FT_LR)
    return {"masked": lambda: score, "bn": lambda: Recalibrated(score, calib),
            "tuned": lambda: Tuned(score, tuning, args.judge_steps)}


def finetuned(model: nn.Module, d: dict[str, torch.Tensor], seed: int, args: argparse.Namespace) -> list[float]:
    """Test accuracy of a copy of the cut ``model`` after each of the ``--finetunes`` fine-tuning runs: the same K
    runs (batch orders, seeds) for every plan."""
    out = []
    for k in range(args.finetunes):
        tuned = copy.deepcopy(model)
        task = ap.ClassificationTask(loader(d["x_train"], d["y_train"], True, seed + 1000 + 17 * k),
                                     loader(d["x_val"], d["y_val"], False, 0), lr=FT_LR)
        torch.manual_seed(seed + 7 + 17 * k)
        task.finetune(tuned, args.steps)
        out.append(accuracy(tuned, d["x_test"], d["y_test"]))
    return out


def over_seeds(run: Any, args: argparse.Namespace, d: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{seed: run(seed, args, d)}`` for ``args.seeds``, ``args.jobs`` seeds at once in spawned processes of one
    torch thread each (every seed is independent of the others, so the results do not change)."""
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            done = list(pool.map(run, args.seeds, [args] * len(args.seeds), [d] * len(args.seeds)))
    else:
        done = [run(s, args, d) for s in args.seeds]
    return {str(s): out for s, out in zip(args.seeds, done)}


def run(seed: int, args: argparse.Namespace, d: dict[str, torch.Tensor]) -> dict[str, Any]:
    spec = DATASETS["mnist1d"]
    base = cached_base(spec, d, seed, str(RESULTS / "cache" / "accuracy"), "mnist1d")
    x = d["x_val"][:2]
    score = ValScore(d["x_val"], d["y_val"])
    budget = ap.Budget(macs=args.macs)
    graph = ap.trace(base, x, ignore=[base.fc])
    out: dict[str, Any] = {"dense_test_accuracy": accuracy(base, d["x_test"], d["y_test"])}
    plans: dict[str, tuple[ap.Plan, int, float]] = {}
    repeats: dict[str, int] = {}  # sampled candidates that repeated an evaluated plan (told, not evaluated)
    made = judges(d, args)
    for suffix, judge in ((JUDGES[j], made[j]()) for j in args.judges):
        t0 = time.perf_counter()
        table = ap.sensitivity(base, x, judge, ratios=args.ratios, graph=graph)
        evaluations = len(table.rows) + 1
        plans["sensitivity" + suffix] = (ap.allocate_from_sensitivity(base, x, table, budget, graph=graph),
                                         evaluations, time.perf_counter() - t0)
        for method in args.methods:
            t0 = time.perf_counter()
            found = ap.search(base, x, judge, budget, trials=evaluations, method=method, parallel=2, seed=seed,
                              graph=graph)
            plans[METHODS[method] + suffix] = (found.plan, found.evaluations, time.perf_counter() - t0)
            repeats[METHODS[method] + suffix] = found.repeats
    uniform = copy.deepcopy(base)
    t0 = time.perf_counter()
    res = ap.prune(uniform, x, budget=budget, allocation="uniform", ignore=[uniform.fc])
    plans["uniform"] = (res.plan, 0, time.perf_counter() - t0)
    for name, (plan, evals, seconds) in plans.items():
        model = copy.deepcopy(base)
        ap.remove(model, plan)
        macs = ap.count(model, x).macs / ap.count(base, x).macs
        with torch.no_grad():
            before = score(model)
        tuned = finetuned(model, d, seed, args)
        out[name] = {"evaluations": evals, "repeats": repeats.get(name, 0), "allocation_s": seconds, "macs": macs,
                     "budget_met": macs <= args.macs,
                     "val_score_before_finetune": before,
                     "test_accuracy": statistics.mean(tuned), "test_accuracy_per_finetune": tuned,
                     "widths": [m.out_channels for m in model.modules() if isinstance(m, nn.Conv1d)]}
        log(f"seed {seed} {name}: {evals} evaluations, MACs {macs:.3f}, val score {before:.3f}, test accuracy "
            f"{out[name]['test_accuracy']:.4f}, widths {out[name]['widths']}")
    return out


def paired(seeds: dict[str, Any], order: list[int], a: str, b: str) -> dict[str, Any]:
    """``a``'s test accuracy minus ``b``'s on the same base models: mean, Student-t 95% interval, wins/ties/losses."""
    diffs = [seeds[str(s)][a]["test_accuracy"] - seeds[str(s)][b]["test_accuracy"] for s in order]
    mean = statistics.mean(diffs)
    half = 0.0
    if len(diffs) > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"diffs": diffs, "mean": mean, "low": mean - half, "high": mean + half,
            "wins": sum(x > 1e-6 for x in diffs), "ties": sum(abs(x) <= 1e-6 for x in diffs),
            "losses": sum(x < -1e-6 for x in diffs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--macs", type=float, default=0.125)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning Adam steps after each allocation")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="the sensitivity table's ratios (the evaluations of both allocators: clusters x ratios + 1)")
    p.add_argument("--judge-steps", type=int, default=30, help="optimizer steps of the short-tune judge")
    p.add_argument("--judges", nargs="+", choices=list(JUDGES), default=list(JUDGES),
                   help="how candidates are judged, for both allocators alike (each adds a sensitivity and a search row)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="ap.search methods (each adds a row per judge, paired with sensitivity under that judge)")
    p.add_argument("--finetunes", type=int, default=1,
                   help="fine-tuning runs per plan (other batch orders); a plan's test accuracy is their mean")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run in this many processes at once, one torch thread each (results do not change)")
    p.add_argument("--out", default="search")
    args = p.parse_args()
    torch.set_num_threads(1)
    payload: dict[str, Any] = {"environment": environment(1), "config": {**vars(args), "batch": BATCH, "lr": FT_LR}}
    d = DATASETS["mnist1d"]["data"]()
    payload["seeds"] = over_seeds(run, args, d)
    summary = {}
    rows = ["sensitivity"] + [METHODS[m] for m in args.methods]
    for name in ["uniform"] + [m + JUDGES[j] for j in args.judges for m in rows]:
        accs = [payload["seeds"][str(s)][name]["test_accuracy"] for s in args.seeds]
        summary[name] = {"mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "per_seed": accs}
        log(f"{name}: test accuracy {summary[name]['mean']:.4f} ± {summary[name]['sd']:.4f}")
    payload["summary"] = summary
    for m in args.methods:  # "paired" (TPE) keeps its earlier name; "paired_netadapt" ...
        key = "paired" if m == "tpe" else f"paired_{m}"
        payload[key] = {JUDGES[j]: paired(payload["seeds"], args.seeds, METHODS[m] + JUDGES[j], "sensitivity" + JUDGES[j])
                        for j in args.judges}
        for judge, pr in payload[key].items():
            log(f"{METHODS[m]}{judge} - sensitivity{judge}: {pr['mean']:+.4f} (95% CI {pr['low']:+.4f} .. "
                f"{pr['high']:+.4f}), wins/ties/losses {pr['wins']}/{pr['ties']}/{pr['losses']}")
    payload["environment"]["load_average_at_end"] = list(__import__("os").getloadavg())
    log(f"wrote {save(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
