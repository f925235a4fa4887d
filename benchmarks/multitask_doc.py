"""The multi-task section of docs/benchmarks.md, from benchmarks/results/multitask.json (see multitask.py)."""

from __future__ import annotations

import statistics
from typing import Any

NAMES = {"multi": "multi-task adapt", "digit": "adapt guided by digit only", "ink": "adapt guided by ink only",
         "uniform": "static uniform"}


def _pm(values: list[float], digits: int) -> str:
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) / len(values) ** 0.5:.{digits}f}"


def multitask_section(payload: dict[str, Any]) -> list[str]:
    cfg, runs = payload["config"], payload["runs"]
    tol = cfg["tolerance"]
    seeds = sorted({r["seed"] for r in runs})
    conv = cfg.get("model", "mlp") == "conv"
    ink = "ink pixel error" if conv else "ink MSE"
    model = (("A convolutional two-head network on sklearn digits with Gaussian noise 0.1 added to the images "
              f"(`--model conv`, `ConvTwoHead`): two 3x3 convolutions of {cfg['width']} channels at 8x8 feed both a "
              "segmentation head, which marks where the clean digit has ink (pixels above 0.5; test per-pixel error, "
              f"lower is better, tolerance {tol['ink']} absolute), and, after 2x2 max-pooling, two 3x3 convolutions "
              f"of {4 * cfg['width']} channels feeding the digit classifier (test accuracy, higher is better, tolerance {tol['digit']}). "
              "The two tasks need the layers differently, so an allocation has something uniform can miss. "
              f"adapt judges steps at `confidence={cfg.get('confidence', 0.9)}`. ")
             if conv else
             ("A two-head MLP on sklearn digits (trunk width "
              f"{cfg['width']}): the digit (test accuracy, higher is better, tolerance {tol['digit']}) and a regression "
              "target derived from the image, the top half's ink minus the bottom half's (test MSE, lower is better, "
              f"tolerance {tol['ink']} absolute; the unpruned model's is about 0.002). "))
    title = "one convolutional trunk, classification and segmentation" if conv else "one trunk, two tasks"
    lines = [f"## Multi-task pruning: {title} (`benchmarks/multitask.py{' --model conv' if conv else ''}`)", "",
             (model + "Every model takes "
              f"{cfg['steps']} optimizer steps in all (adapt's own {cfg['inner_steps']} per step included; Adam, lr "
              "1e-3): multi-task adapt and static uniform are then fine-tuned on both tasks (one batch of each per "
              "step), single-task-guided adapt on its own task only, "
              + ("with the rate decayed to 0 over the remaining steps (cosine) and " if cfg.get("final") == "cosine"
                 else "at that rate, ") +
              "every method's batch order drawn from the seed. Mean ± standard error over seeds "
              f"{seeds}; 'within' counts the seeds whose test metric moved by at most the task's tolerance from the "
              "unpruned model's; 'met' the seeds whose run met the MACs budget."), "",
             ("Optimizer steps per run: " + ", ".join(sorted({str(r["optimizer_steps"]) for r in runs}))
              + " (the same for every run)." if len({r["optimizer_steps"] for r in runs}) == 1 else
              "**Optimizer steps differ between runs**: " + ", ".join(sorted({str(r["optimizer_steps"]) for r in runs}))
              + "."), "",
             f"| MACs | method | budget met | digit accuracy | digit within | {ink} | ink within |",
             "|---|---|---|---|---|---|---|"]
    for budget in cfg["budgets"]:
        for method, label in NAMES.items():
            rs = [r for r in runs if r["budget"] == budget and r["method"] == method]
            if not rs:
                continue
            lines.append(
                f"| {budget} | {label} | {sum(r['budget_met'] for r in rs)}/{len(rs)} | "
                f"{_pm([r['test']['digit'] * 100 for r in rs], 2)} | {sum(r['within']['digit'] for r in rs)}/{len(rs)} | "
                f"{_pm([r['test']['ink'] for r in rs], 4)} | {sum(r['within']['ink'] for r in rs)}/{len(rs)} |")
    base = [r["unpruned"] for r in runs if r["method"] == "multi" and r["budget"] == cfg["budgets"][0]]
    lines += ["", (f"Unpruned: digit accuracy {_pm([b['digit'] * 100 for b in base], 2)}, {ink} "
              f"{_pm([b['ink'] for b in base], 4)}."), ""]
    sp = payload.get("specialize", [])
    if sp:
        lines += [("`ap.specialize`: one adapt run per task at the same MACs budget (then fine-tuned on its own task "
                   f"to {cfg['steps']} steps in all), each measured on its own task, against the multi-task model "
                   "above. Storage: the specialised models kept separately, against the union of the weight "
                   "positions they keep (from the overlap of their plans): what storing the shared weights once "
                   "would save at best, since each model is fine-tuned on its own and their values at a shared "
                   "position differ."), "",
                  ("| MACs | budget met | digit: specialised | digit: shared | ink: specialised | ink: shared | "
                  "storage saved by sharing, at best |"), "|---|---|---|---|---|---|---|"]
        for budget in cfg["budgets"]:
            rs = [r for r in sp if r["budget"] == budget]
            met = sum(all(r["budget_met"].values()) for r in rs)
            lines.append(
                f"| {budget} | {met}/{len(rs)} | {_pm([r['own']['digit'] * 100 for r in rs], 2)} | "
                f"{_pm([r['shared']['digit'] * 100 for r in rs], 2)} | {_pm([r['own']['ink'] for r in rs], 4)} | "
                f"{_pm([r['shared']['ink'] for r in rs], 4)} | {_pm([r['overlap']['saving'] * 100 for r in rs], 1)}% |")
    return lines
