"""The ``adaprune`` command line (Typer + Rich). Thin: every command calls the public API.

Exit status: 0 done, 1 a failure inside the run, 2 a usage or configuration error (one line, no
traceback), 130 interrupted (Ctrl-C; an adapt run directory stays resumable with ``--resume``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .config import CliError

app = typer.Typer(
    name="adaprune",
    help="Adaptive structured pruning for PyTorch: prune toward a budget while the task's metric holds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="a YAML run configuration")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="override the config's run_dir")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


@contextmanager
def _errors(source: Path | None = None) -> Iterator[None]:
    """User-fixable errors become one line on stderr and exit status 2 (1 for failures during a run).

    Messages about a config file start with its name (``source``).
    """
    from ..errors import AdapruneError, ConfigError, FileFormatError, RunDirError

    def named(message: str) -> str:
        return message if source is None or message.startswith(str(source)) else f"{source}: {message}"

    try:
        yield
    except CliError as exc:
        raise _fail(named(str(exc)), exc.code) from None
    except (ConfigError, RunDirError) as exc:
        raise _fail(named(str(exc)), 2) from None
    except FileFormatError as exc:  # a file given or found is damaged or of the wrong kind
        raise _fail(str(exc), 2) from None
    except AdapruneError as exc:
        raise _fail(f"{type(exc).__name__}: {exc}", 1) from None


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt even where the process was started with it ignored (a background
    job of a non-interactive shell), so ``kill -INT`` stops a run as cleanly as Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _err_console() -> Console:
    return Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from .._version import __version__

        typer.echo(f"adaprune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Adaptive structured pruning for PyTorch."""


def _print_summary(data: dict[str, Any], run_dir: Path) -> None:
    from ..report.render import summary_table

    console = Console()
    head, rows = summary_table(data)
    table = Table(title=data["title"])
    for col in head:
        table.add_column(col, justify="left" if col == head[0] else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(data["message"])
    from ..report.render import warm_text

    for line in warm_text(data):
        console.print(line, markup=False, highlight=False)
    steps = data["history"]
    taken = len({h["step"] for h in steps})  # (with alternatives, several sizes tried in a step)
    tried = "" if taken == len(steps) else f" ({len(steps)} sizes tried)"
    console.print(f"{taken} steps{tried}, {sum(1 for h in steps if h['accepted'])} accepted")
    console.print(f"report: {run_dir / 'report.html'} (also report.md, report.json)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="the run directory for the reports")] = Path("runs/demo"),
) -> None:
    """Run the built-in job: a digits CNN pruned to half its MACs, adapt against the static baseline."""
    from ..demo import main as demo_main

    with _errors():
        demo_main(out)


@app.command()
def adapt(
    config: ConfigArg,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in run_dir")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="start over in a run_dir that holds a run (deleting only files adaprune wrote there), or "
            "use a directory that is not a run directory (writing only names that are free)",
        ),
    ] = False,
    run_dir: RunDirOpt = None,
    warm_start: Annotated[
        Path | None,
        typer.Option("--warm-start", help="start from a previous run's plan (its run directory, a saved model "
                     "directory or a plan JSON file): for an updated model (overrides the config's warm_start)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune the configured model in measured steps until the budget is met or the tolerance binds.

    CONFIG sections: model, data, budget, tolerance, ignore, run_dir, options, task (or tasks), warm_start,
    sensitivity, report.

    model.factory: 'pkg.module:fn', 'file.py:fn', 'torchvision:resnet18' or an HF config class.

    data.kind: digits | npz | imagefolder | callable.  budget: macs, params, bytes, energy, latency.

    The run directory is saved after every step: after Ctrl-C, --resume continues the run.
    """
    from .jobs import prepare, run_adapt, summary

    with _errors(config):
        cfg = prepare(config, run_dir)
        if warm_start is not None:
            if not warm_start.exists():
                raise CliError(f"--warm-start {warm_start}: no such file or directory (pass a previous run's directory, "
                               "a directory adaprune.save wrote, or a plan JSON file)")
            cfg = cfg.model_copy(update={"warm_start": str(warm_start.resolve())})
        try:
            with _interruptible():
                data = run_adapt(cfg, resume=resume, force=force, console=_err_console(), source=config)
        except KeyboardInterrupt:
            if (Path(str(cfg.run_dir)) / "state.json").is_file():
                note = (
                    f"interrupted: {cfg.run_dir} keeps the state after the last finished step; continue "
                    f"with: adaprune adapt {config} --resume"
                )
            else:
                note = "interrupted before the first step was saved; nothing to resume"
            typer.echo(note, err=True)
            raise typer.Exit(130) from None
    out = Path(str(cfg.run_dir))
    if as_json:
        typer.echo(json.dumps(summary(data, out), indent=1))
    else:
        _print_summary(data, out)


@app.command()
def ladder(
    config: ConfigArg,
    resume: Annotated[bool, typer.Option("--resume", help="continue the build in run_dir")] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="start over in a run_dir that holds a run (deleting only files adaprune wrote "
                                     "there), or use a directory that is not a run directory"),
    ] = False,
    run_dir: RunDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a ladder of nested widths over one set of weights, save it, and report every rung.

    CONFIG sections: those of adapt, and ladder (rungs, finetune_steps, compare, compare_steps, repeats).

    Writes ladder/ (weights, per-rung plans and BatchNorm statistics), ladder-report.md/.json and
    plots/ladder.png (the metric against MACs and latency, beside independently adapted models).

    The build is saved after each rung's allocation and every ladder.checkpoint_every recovery steps:
    after Ctrl-C, --resume continues it.
    """
    from ..adapt.ownership import LADDER_STATE
    from .jobs import prepare
    from .ladder_job import run_ladder

    with _errors(config):
        cfg = prepare(config, run_dir)
        try:
            with _interruptible():
                data = run_ladder(cfg, resume=resume, force=force, console=_err_console(), source=config)
        except KeyboardInterrupt:
            if (Path(str(cfg.run_dir)) / LADDER_STATE).is_file():
                note = (f"interrupted: {cfg.run_dir} keeps the build's last saved stage; continue with: "
                        f"adaprune ladder {config} --resume")
            else:
                note = "interrupted before the build's first stage was saved; nothing to resume"
            typer.echo(note, err=True)
            raise typer.Exit(130) from None
    out = Path(str(cfg.run_dir))
    if as_json:
        typer.echo(json.dumps({"run_dir": str(out), **{k: data[k] for k in ("metric", "original", "rungs",
                                                                              "independent")}}, indent=1, default=float))
        return
    table = Table(title=f"ladder: {len(data['rungs'])} rungs over one set of weights ({out})")
    for col in ("rung", "MACs", "latency ms", data["metric"], "budget met"):
        table.add_column(col, justify="right")
    for r in data["rungs"]:
        lat = f"{r['latency_ms']:.2f}" if r["latency_ms"] is not None else "-"
        table.add_row(str(r["rung"]), f"{r['costs']['macs']:,.0f}", lat, f"{r['metrics'][data['metric']]:.4f}",
                      str(r["budget_met"]))
    Console().print(table)
    Console().print(f"wrote {out / 'ladder'}, {out / 'ladder-report.md'}, {out / 'plots' / 'ladder.png'}")


@app.command()
def specialize(
    config: ConfigArg,
    resume: Annotated[bool, typer.Option("--resume", help="continue every task's run in run_dir")] = False,
    force: Annotated[bool, typer.Option("--force", help="start every task's run over (deleting only files "
                                                       "adaprune wrote)")] = False,
    run_dir: RunDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One pruned model per task of the tasks: section (each within its own tolerance, the same budget), and
    what they share.

    Writes <task>/ (each task's adapt run, its model in <task>/model/), overlap.json/.md/.html (per group the
    channels each task keeps and their overlap; storage shared against separate) and specialize.json.
    """
    from .jobs import prepare
    from .specialize_job import run_specialize

    with _errors(config):
        cfg = prepare(config, run_dir)
        data = run_specialize(cfg, resume=resume, force=force, console=_err_console())
    out = Path(str(cfg.run_dir))
    if as_json:
        typer.echo(json.dumps({"run_dir": str(out), **data}, indent=1, default=float))
        return
    table = Table(title=f"one model per task ({out})")
    for col in ("task", "metric", "before", "after", "MACs after / before", "budget met"):
        table.add_column(col, justify="right")
    for name, t in data["tasks"].items():
        m = t["metric"]
        table.add_row(name, m, f"{t['before'][m]:.4f}", f"{t['after'][m]:.4f}",
                      f"{t['costs_after']['macs'] / max(t['costs_before']['macs'], 1.0):.1%}", str(t["budget_met"]))
    Console().print(table)
    o = data["overlap"]
    Console().print(f"storage: {o['params_separate']:,} parameters as separate models, {o['params_shared']:,} with shared "
                    f"weights stored once ({o['saving']:.1%} less); overlap report: {out / 'overlap.html'}")


@app.command()
def sensitivity(config: ConfigArg, run_dir: RunDirOpt = None, as_json: JsonOpt = False) -> None:
    """Measure the metric with each group (cluster) alone pruned at each ratio; writes a table and a plot."""
    from .jobs import prepare, run_sensitivity, sensitivity_job

    with _errors(config):
        cfg = prepare(config, run_dir)
        console = _err_console()
        with console.status("building the model, the data and the task"):
            job = sensitivity_job(cfg)
        data, paths = run_sensitivity(job, console)
    if as_json:
        typer.echo(json.dumps({**data, "files": {k: str(v) for k, v in paths.items()}}, indent=1))
        return
    curves: dict[str, dict[float, float]] = {}
    for r in data["rows"]:
        curves.setdefault(r["cluster"], {})[r["ratio"]] = r["metric"]
    ratios = sorted({r["ratio"] for r in data["rows"]})
    table = Table(title=f"{data['metric']} with one cluster masked (unpruned {data['baseline']:.4f})")
    table.add_column("cluster")
    for x in ratios:
        table.add_column(f"{x:.0%}", justify="right")
    for name, c in curves.items():
        table.add_row(name, *(f"{c[x]:.4f}" if x in c else "" for x in ratios))
    Console().print(table)
    Console().print(f"wrote {paths['md']}, {paths['png']}, {paths['json']}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="the run directory of an adapt run")],
    as_json: JsonOpt = False,
) -> None:
    """Re-render report.html and report.md from the run directory's report.json (or state.json)."""
    from .jobs import rerender, summary

    with _errors():
        if not run_dir.is_dir():
            what = "is not a directory" if run_dir.exists() else "does not exist"
            raise CliError(f"{run_dir} {what}; pass the run_dir of an adapt run")
        data, paths = rerender(run_dir)
    if as_json:
        typer.echo(json.dumps(summary(data, run_dir), indent=1))
    else:
        typer.echo(f"wrote {paths['html']} and {paths['md']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="the run directory of a finished adapt run")],
    onnx: Annotated[bool, typer.Option("--onnx", help="export to ONNX (run_dir/model.onnx)")] = False,
    threads: Annotated[int, typer.Option(min=1, help="threads for the latency measurements")] = 1,
    repeats: Annotated[int, typer.Option(min=1, help="timed repeats per measurement")] = 50,
    factory: Annotated[
        str | None,
        typer.Option(
            "--factory",
            help="'module:function' or 'file.py:function' building the unpruned model (called with the "
            "config's model.kwargs); default: the run's config, if it names no code",
        ),
    ] = None,
    trust_config: Annotated[
        bool,
        typer.Option(
            "--trust-config",
            help="build the model with the code the run directory's config.yaml names (only for run "
            "directories you made or trust: importing it runs it)",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the pruned model of a run and compare ONNX Runtime and PyTorch latency.

    The model is rebuilt from the run directory's data. Code named in its config.yaml (a model
    factory other than a torchvision name or a transformers config class) is not imported unless you
    pass --trust-config, or pass your own --factory.
    """
    from .jobs import run_export

    with _errors():
        if not onnx:
            raise CliError("choose a format: pass --onnx (the only export format so far)")
        if not run_dir.is_dir():
            what = "is not a directory" if run_dir.exists() else "does not exist"
            raise CliError(f"{run_dir} {what}; pass the run_dir of an adapt run")
        result = run_export(run_dir, threads, repeats, _err_console(), factory=factory, trust=trust_config)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    table = Table(title=f"{result['onnx']} ({result['bytes'] / 1e6:.2f} MB)")
    for col in ("backend", "threads", "batch", "median ms", "p90 ms"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in result["latency"]:
        if "error" in r:
            table.add_row(r["backend"], str(r["threads"]), "", "not measured", r["error"][:60])
        else:
            table.add_row(
                r["backend"],
                str(r["threads"]),
                str(r["batch_size"]),
                f"{r['median_ms']:.3f}",
                f"{r['p90_ms']:.3f}",
            )
    Console().print(table)


@app.command()
def diff(
    run_a: Annotated[Path, typer.Argument(help="the run directory of an adapt run (its config rebuilds the model)")],
    run_b: Annotated[Path, typer.Argument(help="the run directory of another adapt run of the same model")],
    out: Annotated[
        Path | None, typer.Option("--out", help="also write the diff to FILE.md (Markdown) or FILE.html (a page)")
    ] = None,
    factory: Annotated[
        str | None,
        typer.Option(
            "--factory",
            help="'module:function' or 'file.py:function' building the unpruned model (called with RUN_A's "
            "config's model.kwargs); default: RUN_A's config, if it names no code",
        ),
    ] = None,
    trust_config: Annotated[
        bool,
        typer.Option(
            "--trust-config",
            help="build the model with the code RUN_A's config.yaml names (only for run directories you made "
            "or trust: importing it runs it)",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare the plans of two adapt runs of one model: per group, the channels both keep, those only one
    keeps, and what each set costs (MACs, parameters).

    The dense model is rebuilt from RUN_A's config.yaml (as export does) and costs are counted on RUN_A's example
    inputs; RUN_B's config must name the same model.
    """
    from rich.text import Text

    from .diff_job import run_diff

    with _errors():
        found = run_diff(run_a, run_b, factory=factory, trust=trust_config, out=out, console=_err_console())
    if as_json:
        typer.echo(json.dumps({"run_a": str(run_a), "run_b": str(run_b), "out": None if out is None else str(out),
                               **found.to_dict()}, indent=1))
        return
    a, b = found.names
    table = Table(title=Text(f"plan diff: {a} against {b}"))
    for col in ("group", "channels", "kept by both", f"only {a}", f"only {b}", "Jaccard", f"MACs only {a}",
                f"MACs only {b}"):  # the group's name wraps rather than being cut short
        table.add_column(Text(col), justify="left" if col == "group" else "right",
                         overflow="fold" if col == "group" else "ellipsis", min_width=12 if col == "group" else None)
    for g in [*found.groups, found.total]:
        table.add_row(Text(g.group), f"{g.size:,}", f"{g.both:,}", f"{g.only_a:,}", f"{g.only_b:,}",
                      f"{g.jaccard:.2f}", f"{g.cost_only_a['macs']:,}", f"{g.cost_only_b['macs']:,}")
    console = Console()
    console.print(table)
    console.print(found.summary(), markup=False, highlight=False)
    for line in found.dropped:
        console.print(f"not mapped: {line}", markup=False, highlight=False)
    if out is not None:
        console.print(f"wrote {out}", markup=False, highlight=False)


def _zoo_script() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        script = root / "benchmarks" / "zoo.py"
        if script.is_file():
            return script
    return None


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
)
def zoo(ctx: typer.Context) -> None:
    """Run the model-zoo sweep (benchmarks/zoo.py of a source checkout); arguments pass through."""
    script = _zoo_script()
    if script is None:
        raise _fail(
            "benchmarks/zoo.py is not here: the zoo sweep ships with the source checkout, not the "
            "package; run this command from a clone of the adaprune repository",
            2,
        )
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        code = subprocess.call([sys.executable, str(script), *ctx.args], env=env)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)
