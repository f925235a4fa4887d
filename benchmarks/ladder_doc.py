"""The runtime-ladder section of docs/benchmarks.md, from benchmarks/results/ladder.json (see ladder.py)."""

from __future__ import annotations

import statistics
from typing import Any


def _pm(values: list[float]) -> str:
    """Mean ± standard error, in percent."""
    m = statistics.fmean(values) * 100
    if len(values) < 2:
        return f"{m:.2f}"
    return f"{m:.2f} ± {statistics.stdev(values) / len(values) ** 0.5 * 100:.2f}"


def ladder_section(payload: dict[str, Any]) -> list[str]:
    runs = payload.get("runs", [])
    cfg = payload.get("config", {})
    lines = ["## Runtime ladder: nested widths from one set of weights (`benchmarks/ladder.py`)", ""]
    if runs:
        steps = sorted({r["independent"][0]["steps"] for r in runs})
        lines += [
            (f"Each rung of ONE `ap.ladder` (rungs at {', '.join(str(b) for b in cfg.get('budgets', []))} of the "
             "MACs) against an independent `ap.adapt` run at the same budget (the accuracy benchmark's `adapt`: "
             f"distillation, {cfg.get('recovery')} epochs of fine-tuning = {', '.join(map(str, steps))} optimizer steps "
             "per run). The ladder's joint recovery takes as many optimizer steps as the independent runs "
             "together (each step trains up to three rungs: full, smallest and one in between). Test accuracy in "
             f"percent, mean ± standard error over seeds {sorted({r['seed'] for r in runs})}; the ladder's "
             "accuracy is measured on the live model switched in place (`use(k)`), and equals its exported copy "
             "in every run: " + ("yes" if all(x["acc"] == x["acc_exported"] for r in runs for x in r["ladder"]) else
                                 "**no**") + "."), "",
            "| dataset | rung | budget | MACs | independent adapt | ladder | ladder − adapt |",
            "|---|---|---|---|---|---|---|"]
        for ds in sorted({r["dataset"] for r in runs}):
            rs = [r for r in runs if r["dataset"] == ds]
            lines.append(f"| {ds} | 0 (full) | 1 | 1.000 | | {_pm([r['ladder'][0]['acc'] for r in rs])} | |")
            for i in range(len(rs[0]["independent"])):
                ind = [r["independent"][i]["acc"] for r in rs]
                lad = [r["ladder"][i + 1]["acc"] for r in rs]
                macs = statistics.fmean(r["ladder"][i + 1]["macs_ratio"] for r in rs)
                met = all(r["ladder"][i + 1]["budget_met"] for r in rs)
                diff = statistics.fmean(a - b for a, b in zip(lad, ind)) * 100
                lines.append(f"| {ds} | {i + 1} | {rs[0]['independent'][i]['budget']} | {macs:.3f}{'' if met else ' (missed)'}"
                             f" | {_pm(ind)} | {_pm(lad)} | {diff:+.2f} |")
        ratio = max(r["param_bytes_ladder"] / r["param_bytes_full"] for r in runs)
        stats = max(r["norm_stat_bytes"] for r in runs)
        lines += ["", (f"One set of weights: the ladder's parameters are {ratio:.3f}x the full model's bytes at "
                       f"every rung (views), plus at most {stats:,} bytes of per-rung BatchNorm statistics."), ""]
    trace = payload.get("trace")
    if trace:
        q = ", ".join(f"{v:.2f}" for v in trace["quiet_ms"])
        lines += [
            (f"Governor under load: batch of {trace['batch']} test inputs, {trace.get('threads', '?')} torch thread(s); "
             f"phases of {trace['phase_s']:.0f} s with {', '.join(map(str, trace['phases']))} CPU-busy processes, "
             "the same trace replayed for every policy; deadline "
             f"{trace['deadline_ms']:.2f} ms ({trace['deadline_ms'] / trace['quiet_ms'][0]:.2f}x the full model's quiet "
             "latency); quiet latency per "
             f"rung {q} ms. Mean accuracy: the test accuracy of the rung each call ran."), "",
            "| policy | calls | deadline misses | misses by busy processes | mean test accuracy | calls per rung |",
            "|---|---|---|---|---|---|"]
        for name, p in trace["policies"].items():
            by = p.get("miss_rate_by_busy", {})
            by_text = ", ".join(f"{n}: {v:.1%}" for n, v in by.items() if v is not None)
            lines.append(f"| {name} | {p['calls']} | {p['miss_rate']:.1%} | {by_text} | {p['mean_acc'] * 100:.2f} | "
                         f"{p['per_rung_calls']} |")
        lines += ["", "![latency of every call over the trace, by rung](ladder_governor.png)", ""]
    sw = payload.get("switch_us")
    if sw:
        lines += ["Switching the live model between rungs (`use(k)`, mean over 400 switches):", "",
                  "| model | µs per switch |", "|---|---|"]
        lines += [f"| {name} | {us:.0f} |" for name, us in sw.items()]
    return lines
