"""``adaprune diff RUN_A RUN_B``: compare the plans of two adapt runs of one model.

Each run directory's plan is its ``state.json`` (the last accepted step; a run still going or stopped
compares too). The dense model is rebuilt from RUN_A's ``config.yaml`` as ``export`` rebuilds it
(code the config names is imported only with ``--trust-config``, or give ``--factory``), without weights:
the groups and the costs depend on the architecture only. Costs are counted on RUN_A's example inputs
(``inputs.safetensors``). RUN_B's config must name the same model (factory and kwargs). Modules either
run ignored stay cuttable unless both ignored them, so each plan maps whole.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .. import fs
from ..updates import PlanDiff, diff, plan_of
from .config import CliError, RunConfig, load_config

FORMATS = {".md": "markdown", ".html": "html", ".htm": "html"}


def _config(run_dir: Path, what: str) -> RunConfig:
    from .jobs import CONFIG

    if not run_dir.is_dir():
        state = "is not a directory" if run_dir.exists() else "does not exist"
        raise CliError(f"{what}: {run_dir} {state}; pass the run_dir of an `adaprune adapt` run")
    if not (run_dir / CONFIG).is_file():
        raise CliError(f"{what}: {run_dir} has no {CONFIG}; pass the run_dir of an `adaprune adapt` run")
    return load_config(run_dir / CONFIG)


def _model(cfg: RunConfig) -> str:
    spec = cfg.model
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(spec.kwargs.items()))
    hf = f" via {spec.hf_auto}" if spec.hf_auto != type(spec).model_fields["hf_auto"].default else ""
    return f"{spec.factory}({kwargs}){hf}"


def _names(run_a: Path, run_b: Path) -> tuple[str, str]:
    a, b = run_a.resolve(), run_b.resolve()
    if a.name and b.name and a.name != b.name:
        return a.name, b.name
    return str(run_a), (str(run_b) if str(run_a) != str(run_b) else f"{run_b} (B)")


def run_diff(run_a: Path, run_b: Path, *, factory: str | None, trust: bool, out: Path | None,
             console: Console) -> PlanDiff:
    """The diff of the two runs' plans on the dense model of RUN_A's config; written to ``out`` if given."""
    from .jobs import INPUTS, dense_builder, load_inputs, spinner

    form = None
    if out is not None:
        form = FORMATS.get(out.suffix.lower())
        if form is None:
            raise CliError(f"--out: {out} must end in .md (Markdown) or .html (a standalone page)")
        if out.is_dir():
            raise CliError(f"--out: {out} is a directory; give a file name ending in .md or .html")
    cfg_a, cfg_b = _config(run_a, "RUN_A"), _config(run_b, "RUN_B")
    model_a, model_b = _model(cfg_a), _model(cfg_b)
    if model_a != model_b:
        raise CliError(f"RUN_B: {run_b} was made for another model ({model_b}) than RUN_A {run_a} ({model_a}); "
                       "diff compares two runs of one model")
    plan_a, plan_b = plan_of(run_a, "RUN_A"), plan_of(run_b, "RUN_B")
    build = dense_builder(cfg_a, factory, trust)
    x = load_inputs(run_a / INPUTS)
    ignore = [n for n in cfg_a.ignore if n in cfg_b.ignore]
    with spinner(console, "rebuilding the model and comparing the plans"):
        found = diff(plan_a, plan_b, build(), x, ignore=ignore, names=_names(run_a, run_b))
    if out is not None:
        text = found.markdown() if form == "markdown" else found.html()
        fs.write_atomic(out, text.encode("utf-8"), what="the diff")
    return found


__all__ = ["run_diff"]
