"""The segmentation/detection section of docs/benchmarks.md, from benchmarks/results/vision.json (see vision.py)."""

from __future__ import annotations

import statistics
from typing import Any

NAMES = {"adapt": "adaprune adapt", "static": "static uniform (`ap.prune`)",
         "torch-pruning": "Torch-Pruning (MetaPruner, L2 magnitude)"}
METRIC_NAMES = {"dice": "Dice (foreground)", "map": "mAP@[.5:.95]", "map_50": "mAP@.5"}


def _pm(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _setup_lines(name: str, cfg: dict[str, Any], runs: list[dict[str, Any]], bases: list[dict[str, Any]]) -> list[str]:
    mk = cfg["metric"]
    tol = cfg["tolerance"]
    seeds = sorted({b["seed"] for b in bases})
    dense = {b["seed"]: b["test"][mk] for b in bases}
    base_macs = sorted({b["macs"] for b in bases})
    spreads = [b["val_spread"] for b in bases if b.get("val_spread") is not None]
    steps = sorted({r["optimizer_steps_counted"] for r in runs if "optimizer_steps_counted" in r})
    lines = [f"### {name.capitalize()}", "",
             (f"Data: {cfg['data']}; {cfg['n_train']} training, {cfg['n_val']} validation (the only split adapt's "
              f"controller sees) and {cfg['n_test']} held-out test images (every number below). Model: {cfg['model']}; "
              f"{base_macs[0] / 1e6:.1f} M MACs"
              + (f" (to {base_macs[-1] / 1e6:.1f} M)" if len(base_macs) > 1 else "")
              + f", trained by the script for {cfg['base_steps']} Adam steps (batch {cfg['batch']}, lr {cfg['base_lr']}, "
              f"cosine). Metric: test {METRIC_NAMES.get(mk, mk)}; dense model {_pm(list(dense.values()), 4)} "
              f"(mean ± std over seeds {seeds}). Every method takes "
              + (f"{steps[0]} optimizer steps in all" if len(steps) == 1 else
                 f"**differing** optimizer step counts {steps}")
              + f" (Adam, lr {cfg['ft_lr']}; adapt's {cfg['adapt_inner']} per tried step, at most "
              f"{cfg['adapt_iters']} steps, deducted from its fine-tuning after). adapt's tolerance: {tol} "
              f"absolute {METRIC_NAMES.get(mk, mk)} on the validation split."
              + (f" {cfg['val_note']}" if cfg.get("val_note") else "")
              + (f" Bootstrap standard deviation of the dense model's validation {METRIC_NAMES.get(mk, mk)} over its "
                 f"images (40 resamples): {_pm(spreads, 3)} over the seeds." if spreads else "")), "",
             (f"| MACs budget | method | test {mk} | Δ vs dense | before fine-tuning | MACs ratio | budget met | "
              "optimizer steps | wall s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in runs}):
        for method, label in NAMES.items():
            rs = [r for r in runs if r["budget"] == budget and r["method"] == method]
            if not rs:
                continue
            ok = [r for r in rs if "test" in r]
            errors = sorted({r["error"].split(":")[0] for r in rs if "error" in r})
            if not ok:
                lines.append(f"| 1/{budget} | {label} | failed ({', '.join(errors)}) | – | – | – | 0/{len(rs)} | – | – |")
                continue
            vals = [r["test"][mk] for r in ok]
            deltas = [r["test"][mk] - dense[r["seed"]] for r in ok]
            st = sorted({r["optimizer_steps_counted"] for r in ok})
            note = f" ({len(rs) - len(ok)} failed: {', '.join(errors)})" if len(ok) < len(rs) else ""
            lines.append(
                f"| 1/{budget} | {label} | {_pm(vals, 4)}{note} | {_pm(deltas, 4)} | "
                f"{_pm([r['test_before_finetune'][mk] for r in ok], 4)} | {_pm([r['macs_ratio'] for r in ok], 3)} | "
                f"{sum(r['budget_met'] for r in ok)}/{len(rs)} | {'/'.join(map(str, st))} | "
                f"{_pm([r['wall_s'] for r in ok], 0)} |")
    lines.append("")
    verdicts = []
    for budget in sorted({r["budget"] for r in runs}):
        rs = [r for r in runs if r["budget"] == budget and r["method"] == "adapt"]
        if not rs:
            continue
        ok = [r for r in rs if "test" in r]
        within = [r for r in ok if r["budget_met"] and r["test"][mk] >= dense[r["seed"]] - tol - 1e-9]
        short = [f"seed {r['seed']}: {r['test'][mk]:.4f} against the dense {dense[r['seed']]:.4f}, "
                 f"{dense[r['seed']] - r['test'][mk]:.4f} lower (on validation, where adapt judged, "
                 f"{r['val_before'] - r['val_after']:+.4f}); static uniform on that seed "
                 + next((f"{q['test'][mk]:.4f}" for q in runs if q["method"] == "static" and q["budget"] == budget
                         and q["seed"] == r["seed"] and "test" in q), "–")
                 for r in ok if r["budget_met"] and r not in within]
        short += [f"seed {r['seed']} stopped at {r['macs_ratio']:.3f} of the MACs, test {mk} {r['test'][mk]:.4f} "
                  f"({dense[r['seed']] - r['test'][mk]:.4f} below the dense); static uniform at the budget on that seed "
                  + next((f"{q['test'][mk]:.4f} ({dense[r['seed']] - q['test'][mk]:.4f} below"
                          + (", beyond the tolerance)" if dense[r['seed']] - q['test'][mk] > tol else ")")
                          for q in runs if q["method"] == "static" and q["budget"] == budget
                          and q["seed"] == r["seed"] and "test" in q), "–")
                  for r in ok if not r["budget_met"]]
        verdicts.append(f"1/{budget}: {len(within)}/{len(rs)} seeds met the budget within {tol} of the dense "
                        f"test {mk}" + (" (met)" if len(within) == len(rs) else " (**not met**")
                        + (f"; {'; '.join(short)})" if short else ")" if len(within) < len(rs) else ""))
    if verdicts:
        lines += ["adapt on held-out data: " + "; ".join(verdicts) + ".", ""]
    missed = sorted({f"1/{r['budget']}: {r['adapt_message']}" for r in runs
                     if r["method"] == "adapt" and "test" in r and not r["budget_met"]})
    if missed:
        lines += ["Where adapt stopped short of the budget, it said: " + "; ".join(f"“{m}”" for m in missed) + ".", ""]
    return lines


def vision_section(payload: dict[str, Any]) -> list[str]:
    cfg = payload["config"]["setups"]
    lines = ["## Segmentation and detection end to end (`benchmarks/vision.py`)", "",
             ("Each setup's dense model is trained by the script per seed; each method then starts from a copy of it, "
              "prunes to the MACs budget (MACs counted by `adaprune.count` at the model's input size) and is "
              "fine-tuned so that every method takes the same number of optimizer steps (counted as torch's "
              "optimizers take them). Torch-Pruning's `pruning_ratio` is bisected to the least that meets the "
              "budget. The layers whose output width the task fixes are kept by every method. Mean ± standard "
              "deviation over seeds; Δ is against the same seed's dense model; 'before fine-tuning' is the test "
              "metric right after pruning (adapt: after its own loop)."), ""]
    if payload.get("config", {}).get("overrides"):
        lines += [f"Settings overridden for this run: `{' '.join(payload['config']['overrides'])}`.", ""]
    for name in ("segmentation", "detection"):
        runs = [r for r in payload["runs"] if r["setup"] == name]
        bases = [b for b in payload["bases"] if b["setup"] == name]
        if runs and bases:
            lines += _setup_lines(name, cfg[name], runs, bases)
    return lines
