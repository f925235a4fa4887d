"""``adaprune ladder CONFIG.yaml``: build a ladder, save it, and report it beside independent adapt runs.

The run directory gets ``ladder/`` (:func:`adaprune.save_ladder`: one weights file, per-rung plans and
BatchNorm statistics), ``ladder-report.json`` and ``ladder-report.md`` (per rung: budget, MACs, params,
latency of the live model switched to the rung, metrics; and the independently adapted model at the same budget when
``ladder.compare``), and ``plots/ladder.png`` (the metric against MACs and against measured latency,
one point per rung, the independent models beside them). The build records its stages in the run
directory (:mod:`adaprune.ladder.run`): a killed run continues with ``--resume`` (the independent
models of the comparison are adapted again; they are not part of the build).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from rich.console import Console

import adaprune as ap

from .. import fs, report
from ..adapt.ownership import LADDER_FILES, LADDER_RUN_FILES, LADDER_STATE
from ..adapt.rundir import RunDir
from ..errors import AdapruneError
from ..task import as_task
from .build import build_job
from .config import CliError, RunConfig, dump_config

CONFIG, INPUTS = "config.yaml", "inputs.safetensors"
NAMES = (CONFIG, INPUTS, *LADDER_FILES, *LADDER_RUN_FILES)
"""Every name an ``adaprune ladder`` run writes in its run directory."""


def rung_budgets(cfg: RunConfig) -> list[ap.Budget]:
    """The configured rungs as budgets (backend and threads from the ``budget`` section when given)."""
    extra = {"backend": cfg.budget.backend, "threads": cfg.budget.threads} if cfg.budget else {}
    out = []
    for i, rung in enumerate(cfg.ladder.rungs):
        try:
            out.append(ap.Budget(**rung, **extra))
        except AdapruneError as exc:
            raise CliError(f"ladder.rungs[{i}]: {exc}") from None
    return out


def _latency(model: Any, x: Any, threads: int, repeats: int) -> float | None:
    rows = report.measure(model, x, ["torch"], threads, repeats)
    return rows[0].get("median_ms") if rows else None


def run_ladder(cfg: RunConfig, *, force: bool, console: Console, source: Path | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Build, save and report the ladder (the module doc). Returns the report data."""
    from .jobs import save_inputs, spinner

    if resume and force:
        raise CliError("--resume and --force contradict each other: continue the build, or start it over")
    rd = RunDir(Path(str(cfg.run_dir)))
    protect = [source] if source is not None else []
    rd.check(resume=resume, force=force, names=NAMES, protect=protect, state=LADDER_STATE)
    if (rd.path / "ladder" / "ladder.json").is_file() and not force:
        raise CliError(f"run_dir: {rd.path} already holds a finished ladder; start over with --force (deleting only the "
                       "files adaprune wrote there), or choose another run_dir")
    budgets = rung_budgets(cfg)
    with spinner(console, "building the model, the data and the task"):
        job = build_job(cfg, need_budget=False)
        task = as_task(job.task)
    threads = cfg.budget.threads if cfg.budget else 1
    spec = cfg.ladder
    with rd.open(resume=resume, force=force, names=NAMES, protect=protect, state=LADDER_STATE):
        rd.write(CONFIG, dump_config(cfg).encode("utf-8"), what="the run's config.yaml")
        rd.write(INPUTS, lambda tmp: save_inputs(job.x, Path(tmp)), what="the example inputs")
        original = copy.deepcopy(job.model) if spec.compare else None
        with spinner(console, f"building {len(budgets)} rungs over one set of weights"):
            lad = ap.ladder(job.model, job.x, task, budgets, cfg.tolerance, ignore=cfg.ignore,
                            finetune_steps=spec.finetune_steps, allocation=cfg.adapt_options(), run_dir=rd,
                            resume=resume, checkpoint_every=spec.checkpoint_every)
        ap.save_ladder(lad, rd.subdir("ladder"))
        rows = [{"rung": r.index, "budget": r.budget.bounds if r.budget else None, "costs": r.costs,
                 "metrics": r.metrics, "budget_met": r.budget_met, "drop": r.drop,
                 "within_tolerance": r.within_tolerance, "widths": r.widths, "latency_ms": r.costs.get("latency")}
                for r in lad.rungs]
        independent = []
        if original is not None:
            for i, b in enumerate(budgets, start=1):
                with spinner(console, f"adapting an independent model to rung {i}'s budget"):
                    model = copy.deepcopy(original)
                    res = ap.adapt(model, job.x, task, b, cfg.tolerance, ignore=cfg.ignore, **cfg.adapt_options())
                    task.finetune(model, spec.compare_steps)
                    independent.append({"rung": i, "budget": b.bounds, "costs": ap.count(model, job.x).__dict__,
                                        "metrics": task.evaluate(model), "budget_met": res.budget_met,
                                        "optimizer_steps": res.optimizer_steps + (spec.compare_steps if task.fine_tunes else 0),
                                        "latency_ms": _latency(model, job.x, threads, spec.repeats)})
        data = {"metric": task.metric, "higher_is_better": bool(task.higher_is_better), "tolerance": cfg.tolerance,
                "original": lad.original, "finetune_steps": lad.finetune_steps, "evaluations": lad.evaluations,
                "rungs": rows, "independent": independent, "threads": threads,
                "model": cfg.model.factory, "title": cfg.title or f"adaprune ladder: {cfg.model.factory}"}
        rd.write("ladder-report.json", json.dumps(data, indent=1, default=float).encode("utf-8"),
                 what="the ladder report")
        rd.write("ladder-report.md", markdown(data).encode("utf-8"), what="the ladder report")
        plot(data, rd.subdir("plots") / "ladder.png")
    return data


def markdown(data: dict[str, Any]) -> str:
    m = data["metric"]
    lines = [f"# {data['title']}", "",
             (f"One set of weights, {len(data['rungs'])} rungs; joint recovery: {data['finetune_steps']} optimizer steps; "
             f"{data['evaluations']} evaluations. Original {m}: {data['original'].get(m, float('nan')):.4f}."), "",
             f"| rung | budget | MACs | params | latency (ms) | {m} | drop | budget met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rungs"]:
        lat = f"{r['latency_ms']:.2f}" if r["latency_ms"] is not None else "-"
        lines.append(f"| {r['rung']} | {r['budget'] or 'full'} | {r['costs']['macs']:,.0f} | {r['costs']['params']:,.0f} | "
                     f"{lat} | {r['metrics'][m]:.4f} | {r['drop']:+.4f} | {r['budget_met']} |")
    if data["independent"]:
        lines += ["", "Independently adapted models at the same budgets:", "",
                  f"| rung | budget | MACs | latency (ms) | {m} | optimizer steps | budget met |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["independent"]:
            lat = f"{r['latency_ms']:.2f}" if r["latency_ms"] is not None else "-"
            lines.append(f"| {r['rung']} | {r['budget']} | {r['costs']['macs']:,.0f} | {lat} | {r['metrics'][m]:.4f} | "
                         f"{r['optimizer_steps']} | {r['budget_met']} |")
    lines += ["", "![the metric against MACs and latency](plots/ladder.png)", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = data["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, x_of, label in ((axes[0], lambda r: r["costs"]["macs"], "MACs"),
                            (axes[1], lambda r: r["latency_ms"], "latency (ms, torch)")):
        for rows, style, name in ((data["rungs"], "o-", "ladder (one set of weights)"),
                                  (data["independent"], "s", "independent adapt")):
            pts = [(x_of(r), r["metrics"][m]) for r in rows if x_of(r) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        for r in data["rungs"]:
            if x_of(r) is not None:
                ax.annotate(str(r["rung"]), (x_of(r), r["metrics"][m]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(m)
        ax.legend(fontsize=8)
    fig.suptitle(data["title"], fontsize=10)
    fig.tight_layout()
    fs.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), what="plots/ladder.png")
    plt.close(fig)


__all__ = ["NAMES", "run_ladder"]
