"""How well does each judge of benchmarks/search.py predict a plan's accuracy after fine-tuning?

For each seed and judge, ``ap.search`` runs as benchmarks/search.py runs it (MNIST-1D, accuracy.py's CNN1D(32),
1/8 of the MACs, ``--trials`` evaluations), and then every plan it evaluated is cut and fine-tuned as
search.py fine-tunes its final plans (``--steps`` Adam steps, ``--finetunes`` batch orders, their mean accuracy on
the 1,000 held-out test examples). Reported per seed and judge: Spearman's rank correlation between the judge's
value and the fine-tuned test accuracy over the trials, the test accuracy of the trial the judge ranks first
against the best and the mean of all trials, and the fine-tuning noise (how far two batch orders of the same plan
land apart). A search can only be as good as its judge's ranking: this is where to look before tuning a sampler.

    python benchmarks/search_judges.py --seeds 0 1 --jobs 2      # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from accuracy import BATCH, DATASETS, FT_LR, cached_base
from common import RESULTS, environment, log, save
from search import JUDGES, finetuned, judges, over_seeds

import adaprune as ap


def run(seed: int, args: argparse.Namespace, d: dict[str, torch.Tensor]) -> dict[str, Any]:
    from scipy.stats import spearmanr

    torch.set_num_threads(1)
    base = cached_base(DATASETS["mnist1d"], d, seed, str(RESULTS / "cache" / "accuracy"), "mnist1d")
    x = d["x_val"][:2]
    budget = ap.Budget(macs=args.macs)
    graph = ap.trace(base, x, ignore=[base.fc])
    made = judges(d, args)
    done: dict[str, list[float]] = {}  # plan -> its fine-tuned accuracies (judges' searches share plans)
    out: dict[str, Any] = {}
    for name in args.judges:
        found = ap.search(base, x, made[name](), budget, trials=args.trials, parallel=2, seed=seed, graph=graph)
        rows = []
        for t in found.trials:
            plan = t.plan
            key = plan.to_json()
            if key not in done:
                cut = copy.deepcopy(base)
                ap.remove(cut, plan)
                done[key] = finetuned(cut, d, seed, args)
            kept = [g.size - len(g.removed) for g in plan.groups]
            rows.append({"judge": t.metric, "test": done[key], "widths": kept})
        judged = [r["judge"] for r in rows]
        tests = [statistics.mean(r["test"]) for r in rows]
        first = tests[judged.index(max(judged))]
        noise = (statistics.mean(statistics.variance(r["test"]) for r in rows) ** 0.5  # pooled over the plans
                 if args.finetunes > 1 else None)
        out[name] = {"trials": rows, "spearman": float(spearmanr(judged, tests).statistic), "judged_first": first,
                     "best": max(tests), "mean": statistics.mean(tests), "finetune_noise_sd": noise}
        log(f"seed {seed} {name}: Spearman {out[name]['spearman']:+.3f} over {len(rows)} trials; the judge's first "
            f"{first:.4f}, best {max(tests):.4f}, mean {statistics.mean(tests):.4f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--macs", type=float, default=0.125)
    p.add_argument("--trials", type=int, default=28, help="evaluations of each search (search_28's)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning Adam steps of every trial's plan")
    p.add_argument("--finetunes", type=int, default=2, help="fine-tuning runs per plan (other batch orders)")
    p.add_argument("--judges", nargs="+", choices=list(JUDGES), default=list(JUDGES))
    p.add_argument("--judge-steps", type=int, default=30, help="optimizer steps of the short-tune judge")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once, one thread each")
    p.add_argument("--out", default="search_judges")
    args = p.parse_args()
    torch.set_num_threads(1)
    payload: dict[str, Any] = {"environment": environment(1), "config": {**vars(args), "batch": BATCH, "lr": FT_LR}}
    d = DATASETS["mnist1d"]["data"]()
    payload["seeds"] = over_seeds(run, args, d)
    payload["environment"]["load_average_at_end"] = list(__import__("os").getloadavg())
    log(f"wrote {save(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
