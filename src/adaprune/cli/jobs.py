"""What the commands do, on top of the public API: adapt with a report, sensitivity, export.

A CLI run directory holds, besides the controller's ``state.json`` and weights (written by
:func:`adaprune.adapt` after every step, so an interrupted run resumes):

- ``config.yaml``: the validated configuration, with absolute paths (``export`` rebuilds from it);
- ``inputs.safetensors``: the example inputs costs and latency were measured on;
- ``model/``: the pruned model (:func:`adaprune.save`), ``model.onnx``;
- ``report.json``, ``report.html``, ``report.md``, ``plots/``; ``sensitivity.*`` when analysed.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

import adaprune as ap

from .. import fs, report
from ..adapt import AdaptConfig, check_resume, ownership
from ..adapt.rundir import MARK, RUN_FILES, STATE, RunDir
from ..errors import AdapruneError, FileFormatError, shown
from ..task import as_task
from .build import Job, budget, build_job, build_model, import_ref, model_factory
from .config import CliError, RunConfig, dump_config, load_config

CONFIG, INPUTS, MODEL, ONNX, SENS = "config.yaml", "inputs.safetensors", "model", "model.onnx", "sensitivity"


# -- example inputs on disk ------------------------------------------------------------------------
def save_inputs(x: Any, path: Path) -> None:
    from safetensors.torch import save_file

    if isinstance(x, torch.Tensor):
        tensors, kind = {"input": x}, "tensor"
    elif isinstance(x, dict):
        tensors, kind = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}, "dict"
    elif isinstance(x, (tuple, list)):
        tensors, kind = {str(i): v for i, v in enumerate(x) if isinstance(v, torch.Tensor)}, "tuple"
    else:
        raise CliError(f"data: example inputs of type {type(x).__name__} cannot be saved; use tensors")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"kind": kind}
    )


def load_inputs(path: Path) -> Any:
    """The example inputs saved by :func:`save_inputs` (a regular file; its layout is checked)."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise CliError(f"{path} is missing: the run directory was not written by `adaprune adapt`")
    try:
        fs.check_regular(path, what=INPUTS)
        with safe_open(str(path), "pt") as f:
            kind = (f.metadata() or {}).get("kind", "tensor")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, FileFormatError) as exc:
        raise CliError(f"{path}: not a readable safetensors file ({shown(str(exc), 200)})") from None
    if kind == "tensor" and set(tensors) == {"input"}:
        return tensors["input"]
    if kind == "tuple" and set(tensors) == {str(i) for i in range(len(tensors))}:
        return tuple(tensors[str(i)] for i in range(len(tensors)))
    if kind == "dict":
        return tensors
    raise CliError(f"{path}: its layout ({shown(kind)}, keys {shown(sorted(tensors))}) is not one adaprune writes")


# -- progress --------------------------------------------------------------------------------------
def _describe(state: dict[str, Any], metric: str) -> str:
    history = state.get("history", [])
    if not history:
        return "measuring the original model" if not state.get("baseline") else "step 0: pruning"
    last = [h for h in history if h["accepted"]]
    costs = last[-1]["costs"] if last else state.get("original_costs", {})
    base = state.get("original_costs", {})
    macs = f"MACs {costs['macs'] / base['macs']:.0%}" if base.get("macs") else ""
    value = (last[-1]["metrics"] if last else state.get("baseline", {})).get(metric)
    shown = f", {metric} {value:.4f}" if isinstance(value, (int, float)) else ""
    return f"step {len({h['step'] for h in history})}: {macs}{shown} ({len(last)} accepted)"


@contextmanager
def watch(state_file: Path, total: int, metric: str, console: Console) -> Iterator[None]:
    """A progress bar fed by the run's ``state.json`` (the controller writes it after every step)."""
    stop = threading.Event()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("adapt: starting", total=total)

        def poll() -> None:
            while not stop.wait(0.3):
                try:
                    state = fs.read_json(state_file, what="state.json")
                except AdapruneError:
                    continue
                if not isinstance(state, dict):
                    continue
                progress.update(
                    task,
                    completed=min(state.get("step", 0), total),
                    description="adapt: " + _describe(state, metric),
                )

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@contextmanager
def spinner(console: Console, text: str) -> Iterator[None]:
    with console.status(text):
        yield


# -- adapt ---------------------------------------------------------------------------------------
SENS_NAMES = ownership.SENSITIVITY_FILES
REPORT_NAMES = ownership.REPORT_FILES
ADAPT_NAMES = (*RUN_FILES, *ownership.CLI_FILES, *ownership.SAVE_FILES, *REPORT_NAMES, *SENS_NAMES)
"""Every name an ``adaprune adapt`` run writes in its run directory."""


def prepare(config: Path, run_dir: Path | None) -> RunConfig:
    cfg = load_config(config)
    if run_dir is not None:
        cfg = cfg.model_copy(update={"run_dir": str(run_dir.resolve())})
    return cfg


def _sensitivity(job: Job, console: Console, rd: RunDir) -> Any:
    """Sensitivity of the original model: computed if asked, else read from the run directory."""
    saved = job.run_dir / f"{SENS}.json"
    if job.cfg.report.sensitivity:
        return run_sensitivity(job, console, rd)[0]
    if saved.exists():
        return report.load_sensitivity(saved)
    return None


def run_adapt(
    cfg: RunConfig, *, resume: bool, force: bool, console: Console, source: Path | None = None
) -> dict[str, Any]:
    """Build, measure the original, adapt (resumable), save, export and report. Returns the report data.

    The run directory is checked before anything is built, claimed (marked and locked) before
    anything is written, and a resume is checked against the run's settings and model before
    anything in it changes. ``source`` (the config file) is never written.
    """
    if resume and force:
        raise CliError("--resume and --force contradict each other: continue the run, or start it over")
    rd = RunDir(Path(str(cfg.run_dir)))
    if cfg.warm_start is not None and Path(cfg.warm_start).resolve() == rd.path.resolve():
        raise CliError(f"warm_start is this run's own directory ({rd.path}): pass the previous run's directory and a "
                       "new run_dir for the re-pruned model")
    own_config = source is not None and _same(source, rd.path / CONFIG)  # adapt runs/x/config.yaml --resume
    names = [n for n in ADAPT_NAMES if not (own_config and n == CONFIG)]
    protect = [source] if source is not None else []
    rd.check(resume=resume, force=force, names=names, protect=protect)
    with spinner(console, "building the model, the data and the task"):
        job = build_job(cfg)
        job = replace(job, task=as_task(job.task))  # checked, a protocol task wrapped once (hooks called directly)
        the_budget = budget(cfg)
    options = cfg.adapt_options()
    with rd.open(resume=resume, force=force, names=names, protect=protect):
        if resume and rd.exists():
            check_resume(rd, job.model, the_budget, cfg.tolerance, ignore=cfg.ignore, task=job.task,
                         warm_start=cfg.warm_start, example_inputs=job.x, **options)
        if not own_config:
            rd.write(CONFIG, dump_config(cfg).encode("utf-8"), what="the run's config.yaml")
        rd.write(INPUTS, lambda tmp: save_inputs(job.x, Path(tmp)), what="the example inputs")
        return _adapt_in(rd, job, the_budget, options, resume, console)


def _adapt_in(rd: RunDir, job: Job, the_budget: ap.Budget, options: dict[str, Any], resume: bool,
              console: Console) -> dict[str, Any]:
    cfg, run_dir = job.cfg, rd.path
    spec = cfg.report
    threads = the_budget.threads
    backends = ["torch"] + (["onnxruntime"] if spec.onnx else [])
    sens = _sensitivity(job, console, rd)
    widths_before = report.layer_widths(job.model)
    before: list[dict[str, Any]] = []
    if spec.latency:
        with spinner(console, "measuring the original model's latency"):
            before = report.measure(job.model, job.x, backends, threads, spec.repeats)
    total = int(options.get("max_iterations", AdaptConfig().max_iterations))
    metric = job.task.metric
    with watch(run_dir / STATE, total, metric, console):
        res = ap.adapt(
            job.model, job.x, job.task, the_budget, cfg.tolerance,
            ignore=cfg.ignore, run_dir=rd, resume=resume, warm_start=cfg.warm_start, **options,
        )
    with spinner(console, "saving, exporting and measuring the pruned model"):
        ap.save(res, rd.subdir(MODEL), base=cfg.model.factory)
        onnx = report.export(res.model, job.x, run_dir / ONNX) if spec.onnx else {}
        after = report.measure(res.model, job.x, backends, threads, spec.repeats) if spec.latency else []
    data = report.build(
        res,
        metric=metric,
        higher_is_better=bool(job.task.higher_is_better),
        tolerance=cfg.tolerance,
        criteria=job.task.criteria() if hasattr(job.task, "criteria") else None,
        budget={**cfg.budget.model_dump(exclude_none=True)} if cfg.budget else None,
        widths_before=widths_before,
        widths_after=report.layer_widths(res.model),
        latency=report.latency_pairs(before, after) if spec.latency else None,
        onnx=onnx,
        sensitivity=sens,
        title=cfg.title or f"adaprune: {cfg.model.factory.rpartition(':')[2]} on {cfg.data.kind}",
        model_name=cfg.model.factory,
        warm_source=cfg.warm_start,
        plan_diff=_warm_diff(cfg, res, job.x),
    )
    rd.subdir(report.PLOTS)
    report.write(data, run_dir)
    return data


def _warm_diff(cfg: RunConfig, res: Any, x: Any) -> dict[str, Any] | None:
    """A warm-started run: the previous plan against this run's, on the model's architecture (built again
    from the config, without weights: the diff needs its structure only). None without a warm start; a
    diff that fails is said in the result's warnings, not fatal (the run is done)."""
    if cfg.warm_start is None:
        return None
    from ..updates import diff

    try:
        dense = dense_builder(cfg, None, True)()  # the config's own factory: it built the model this run pruned
        return diff(cfg.warm_start, res.plan, dense, x, ignore=cfg.ignore, names=("previous", "this run")).to_dict()
    except ap.errors.AdapruneError as exc:
        res.warnings.append(f"the plan diff against the warm start failed: {exc}")
        return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def summary(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The machine-readable result of a run (``--json``)."""
    history = data["history"]
    return {
        "run_dir": str(run_dir),
        "status": data["status"],
        "budget_met": data["budget_met"],
        "message": data["message"],
        "metric": data["metric"],
        "before": data["before"],
        "after": data["after"],
        "costs_before": data["costs_before"],
        "costs_after": data["costs_after"],
        "latency": data["latency"],
        "steps": len({h["step"] for h in history}),  # (with alternatives, several sizes tried in a step)
        "sizes_tried": len(history),
        "accepted": sum(1 for h in history if h["accepted"]),
        "optimizer_steps": data.get("optimizer_steps"),  # fine-tuning steps spent, rolled-back steps included
        "report": {
            k: str(run_dir / v) for k, v in (("json", report.JSON), ("html", report.HTML), ("md", report.MD))
        },
    }


# -- sensitivity -----------------------------------------------------------------------------------
def run_sensitivity(job: Job, console: Console, rd: RunDir | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Sensitivity of ``job.model``; writes ``sensitivity.{json,md,png}`` into the run directory (claimed
    and locked here unless the caller holds it)."""
    if rd is None or not rd.is_open:
        # resume=True: a run already here is neither refused nor reset; only the sensitivity files are written
        with RunDir(job.run_dir).open(resume=True, names=SENS_NAMES) as own:
            return run_sensitivity(job, console, own)
    spec = job.cfg.sensitivity
    task = as_task(job.task)  # (the same object when run_adapt already made it a Task)
    metric = task.metric
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("sensitivity: evaluations", total=None)

        def evaluate(model: torch.nn.Module) -> float:
            value = float(task.evaluate(model)[metric])
            progress.advance(bar)
            return value

        calibration = task.calibration()  # None: the task has no calibration batches
        sens = ap.sensitivity(
            job.model,
            job.x,
            evaluate,
            spec.ratios,
            importance=spec.importance,
            ignore=job.cfg.ignore,
            calibration=calibration,
            cluster=spec.cluster,
            cache=rd.path / f"{SENS}-cache.json",
        )
    data = {
        "metric": metric,
        "baseline": sens.baseline,
        "rows": [
            {"cluster": r.cluster, "groups": list(r.groups), "ratio": r.ratio, "metric": r.metric}
            for r in sens.rows
        ],
    }
    paths = {
        "json": rd.write(f"{SENS}.json", json.dumps(data, indent=1).encode("utf-8")),
        "md": rd.write(f"{SENS}.md", f"# Sensitivity ({metric})\n\n{sens.to_markdown()}\n".encode()),
        "png": rd.write(f"{SENS}.png", lambda tmp: sens.plot(tmp)),
    }
    return data, paths


def sensitivity_job(cfg: RunConfig) -> Job:
    RunDir(Path(str(cfg.run_dir))).check(resume=True)
    return build_job(cfg, need_budget=False)


# -- report / export -------------------------------------------------------------------------------
def _open_existing(run_dir: Path, names: tuple[str, ...]) -> RunDir:
    """Claim an existing run directory to add files to it (a run in it is neither refused nor reset)."""
    if not any((run_dir / n).exists() for n in (MARK, STATE, report.JSON)):
        raise CliError(
            f"{run_dir}: neither {MARK}, {STATE} nor {report.JSON} is there; pass the run_dir of an "
            "`adaprune adapt` run"
        )
    return RunDir(run_dir).open(resume=True, names=names)


def rerender(run_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Re-render the reports from ``report.json``, or from ``state.json`` for an unfinished run.

    Only data is read (validated against its schema); nothing named in the directory is imported."""
    if not (run_dir / report.JSON).exists() and not (run_dir / STATE).exists():
        raise CliError(
            f"{run_dir}: neither report.json nor state.json is there; pass the run_dir of an adapt run"
        )
    with _open_existing(run_dir, REPORT_NAMES) as rd:
        rd.subdir(report.PLOTS)
        sens_file = run_dir / f"{SENS}.json"
        if (run_dir / report.JSON).exists():
            data = report.load(run_dir)
            if data.get("sensitivity") is None and sens_file.exists():  # analysed after the run
                data["sensitivity"] = report.load_sensitivity(sens_file)
                return data, report.write(data, run_dir)
            return data, report.render(data, run_dir)
        state = rd.load()
        cfg_file = run_dir / CONFIG
        extra: dict[str, Any] = {}
        if cfg_file.exists():
            cfg = load_config(cfg_file)
            extra = {
                "tolerance": cfg.tolerance,
                "model_name": cfg.model.factory,
                "budget": cfg.budget.model_dump(exclude_none=True) if cfg.budget else None,
            }
        if sens_file.exists():
            extra["sensitivity"] = report.load_sensitivity(sens_file)
        data = report.from_state(asdict(state), title=f"adaprune run {run_dir.name}", **extra)
        return data, report.write(data, run_dir)


def export_factory(cfg: RunConfig, factory: str | None, trust: bool) -> Any:
    """The model factory for ``export``: the caller's (``--factory``, called with the config's
    ``model.kwargs``), else the config's own only if it names no code or the caller trusts it."""
    if factory is None:
        return model_factory(cfg, trusted=trust)
    if not re.fullmatch(r"[^:\s]+:[A-Za-z_][\w.]*", factory):
        raise CliError(f"--factory: {shown(factory)} is not of the form 'package.module:name' or 'file.py:name'")
    fn = import_ref(factory, "--factory")
    if not callable(fn):
        raise CliError(f"--factory: {shown(factory)} is a {type(fn).__name__}, not a function or class")
    kwargs = dict(cfg.model.kwargs)
    return lambda: fn(**kwargs)


def dense_builder(cfg: RunConfig, factory: str | None, trust: bool) -> Callable[[], torch.nn.Module]:
    """Builds the unpruned architecture of a run directory's config (no weights: ``export`` loads the pruned
    ones, ``diff`` needs only the structure), from ``--factory`` or the config's own factory when allowed
    (:func:`export_factory`); checked by :func:`build_model`."""
    make = export_factory(cfg, factory, trust)
    return lambda: build_model(cfg, make, weights=False, label=factory)


def run_export(
    run_dir: Path, threads: int, repeats: int, console: Console, *, factory: str | None = None,
    trust: bool = False,
) -> dict[str, Any]:
    """Rebuild the pruned model from the run directory, export it to ONNX and time both runtimes."""
    cfg_file = run_dir / CONFIG
    if not cfg_file.exists():
        raise CliError(f"{run_dir}: {CONFIG} is missing; pass the run_dir of a finished `adaprune adapt` run")
    with _open_existing(run_dir, (ONNX, *REPORT_NAMES)) as rd:
        rd.subdir(report.PLOTS)
        state = rd.load() if rd.exists() else None
        if state is None or not state.done or not (run_dir / MODEL).is_dir():
            raise CliError(f"{run_dir}: the adapt run did not finish (no {MODEL}/); resume it first")
        cfg = load_config(cfg_file)
        build = dense_builder(cfg, factory, trust)
        x = load_inputs(run_dir / INPUTS)
        with spinner(console, "loading the pruned model"):
            try:
                model = ap.load(run_dir / MODEL, build)
            except ap.errors.AdapruneError as exc:
                raise CliError(f"{run_dir / MODEL}: {exc}") from None
        with spinner(console, "exporting to ONNX and measuring latency"):
            onnx = report.export(model, x, run_dir / ONNX)
            if onnx.get("error"):
                raise CliError(f"ONNX export failed: {onnx['error']}", code=1)
            rows = report.measure(model, x, ("torch", "onnxruntime"), threads, repeats)
        result = {"onnx": str(run_dir / ONNX), "bytes": onnx["bytes"], "latency": rows}
        if (run_dir / report.JSON).exists():
            data = report.load(run_dir)
            data["onnx"] = onnx
            data["exported_latency"] = rows
            report.write(data, run_dir)
    return result
