"""``adaprune specialize CONFIG.yaml``: one model per task of the ``tasks:`` section, and their overlap.

The run directory holds one adapt run directory per task (``<task>/``: resumable, with the pruned
model in ``<task>/model/``), the overlap report (``overlap.json``, ``overlap.md``, ``overlap.html``:
per group the channels each task keeps and their Jaccard overlap, and storage shared against
separate) and ``specialize.json`` (per task: metrics before and after, costs, whether the budget was
met).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

import adaprune as ap

from .. import fs
from ..errors import AdapruneError
from ..multitask import MultiTask
from ..specialize import SUMMARY
from .build import budget, build_job
from .config import CliError, RunConfig


def run_specialize(cfg: RunConfig, *, resume: bool, force: bool, console: Console) -> dict[str, Any]:
    """Adapt one copy of the model per task, save each, write the overlap report. Returns the summary."""
    from .jobs import spinner

    if cfg.tasks is None:
        raise CliError("specialize needs a tasks: section (each task with its factory and its tolerance)")
    the_budget = budget(cfg)
    with spinner(console, "building the model, the data and the tasks"):
        job = build_job(cfg)
    multi = job.task
    assert isinstance(multi, MultiTask)
    root = Path(str(cfg.run_dir))
    try:
        with spinner(console, f"adapting one model per task ({', '.join(multi.tasks)})"):
            out = ap.specialize(job.model, job.x, multi.members, the_budget, dict(multi.tolerance), ignore=cfg.ignore,
                                run_dir=root, resume=resume, force=force, **cfg.adapt_options())
    except AdapruneError as exc:
        raise CliError(str(exc)) from None
    for name, res in out.results.items():
        ap.save(res, root / name / "model", base=cfg.model.factory)
    data = {"budget": cfg.budget.model_dump(exclude_none=True) if cfg.budget else None,
            "tasks": {name: {"metric": multi.tasks[name].metric, "higher_is_better": bool(multi.tasks[name].higher_is_better),
                             "tolerance": multi.tolerance[name], "before": res.before, "after": res.after,
                             "costs_before": res.costs_before, "costs_after": res.costs_after,
                             "budget_met": res.budget_met, "message": res.message}
                      for name, res in out.results.items()},
            "overlap": out.overlap.to_dict()}
    fs.write_atomic(root / SUMMARY, json.dumps(data, indent=1, default=float).encode("utf-8"), what="the summary")
    return data


__all__ = ["SUMMARY", "run_specialize"]
