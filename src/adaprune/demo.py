"""``make demo``: adaptive pruning end to end on a built-in task, against the static baseline.

The task ships offline: sklearn's handwritten digits (8x8) and a small CNN trained here for a few
seconds. ``adaprune.adapt`` prunes it to half its MACs with at most 2 points of validation accuracy
lost; the static baseline (``adaprune.prune``, uniform ratio found for the same MACs budget) then gets
exactly as many fine-tuning optimizer steps as adapt spent (every step it tried, accepted or rolled
back), from the same task: the same training split and fine-tuning loop, the same seed, the same
BatchNorm recalibration. Both are scored on the held-out test split, with MACs, params and measured
CPU latency (torch eager, 1 thread, batch 32, median of repeats). The optimizer steps in the table are
counted as torch's optimizers take them, not assumed.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import AdaptResult, Budget, ClassificationTask, adapt, count, prune
from .adapt.ownership import REPORT_FILES
from .adapt.rundir import RunDir
from .cost.latency import measure_latency
from .errors import AdapruneError
from .examples.digits import DigitsCNN, DigitsData, load_digits_data, train
from .task import recalibrate_bn


def _test_accuracy(model: nn.Module, data: DigitsData) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def _row(name: str, model: nn.Module, data: DigitsData, x: torch.Tensor, steps: int | None,
         seconds: float | None) -> list[str]:
    """A table row; ``steps`` and ``seconds`` are None for the unpruned model (no pruning, no fine-tuning)."""
    c = count(model, x)
    lat = measure_latency(model, data.x_test[:32], backend="torch", threads=1, repeats=50)
    return [name, f"{_test_accuracy(model, data):.2%}", f"{c.macs / 1e6:.2f}", f"{c.params / 1e3:.1f}",
            f"{lat.median_ms:.3f}", "–" if steps is None else str(steps), "–" if seconds is None else f"{seconds:.1f}"]


COLUMNS = ("model", "test accuracy", "MACs (M)", "params (k)", "latency ms (CPU, 1 thread, bs 32)",
           "optimizer steps", "time s")
STEPS = COLUMNS.index("optimizer steps")
TITLE = "digits CNN, budget 50% MACs, tolerance 2 points (the same optimizer steps for both)"


@dataclass
class StepCount:
    """Optimizer steps counted inside a :func:`counting_optimizer_steps` block."""

    steps: int = 0


@contextmanager
def counting_optimizer_steps() -> Iterator[StepCount]:
    """Count every optimizer step any ``torch.optim`` optimizer takes inside the block (torch's global
    step hook, removed on exit)."""
    counted = StepCount()

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        counted.steps += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield counted
    finally:
        handle.remove()


def baseline_steps(result: AdaptResult, after: int = 0) -> int:
    """The optimizer steps the static baseline gets: exactly those adapt spent, inside its loop (every
    recovery fine-tune, accepted and rolled back: ``result.optimizer_steps``) and ``after`` it (the
    demo fine-tunes nothing after adapt returns)."""
    return result.optimizer_steps + after


def run(
    seed: int = 0,
    budget: float = 0.5,
    tolerance: float = 0.02,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    width: int = 32,
    epochs: int = 15,
    **options: Any,
) -> tuple[list[list[str]], AdaptResult]:
    """Train, prune both ways, and return the table rows (used by the demo and the README).

    With ``run_dir``, the adapt run's report (``report.html``, ``.md``, ``.json``) is written there.
    ``width`` and ``epochs`` size the CNN and its training; ``options`` go to :func:`adaprune.adapt`
    (e.g. ``finetune_steps``, ``max_iterations``). Raises :class:`~adaprune.errors.AdapruneError` if
    the two methods were not given the same number of optimizer steps.
    """
    out = RunDir(run_dir) if run_dir is not None else None
    if out is not None:
        out.check(restart=True, names=("model.onnx", *REPORT_FILES))  # refused before any work, if it must be
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = load_digits_data(seed)
    base = DigitsCNN(width)
    train(base, data, epochs=epochs, seed=seed)
    x = data.x_test[:1]
    rows = [_row("unpruned", base, data, x, None, None)]

    model = copy.deepcopy(base)
    task = ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))
    t0 = time.perf_counter()
    with counting_optimizer_steps() as spent:
        res = adapt(model, x, task, Budget(macs=budget), tolerance=tolerance, ignore=[model.fc], seed=seed,
                    **options)
    rows.append(_row("adaprune.adapt", model, data, x, spent.steps, time.perf_counter() - t0))

    static = copy.deepcopy(base)
    t0 = time.perf_counter()
    prune(static, x, budget=Budget(macs=budget), ignore=[static.fc])
    torch.manual_seed(seed)
    with counting_optimizer_steps() as given:
        task.finetune(static, baseline_steps(res))
    recalibrate_bn(static, task.calibration())
    rows.append(_row("static prune (uniform)", static, data, x, given.steps, time.perf_counter() - t0))
    if given.steps != spent.steps:
        raise AdapruneError(
            f"the comparison is not fair: adapt took {spent.steps} optimizer steps (its result says "
            f"{res.optimizer_steps}), the static baseline {given.steps}"
        )
    if out is not None:
        from . import report, sensitivity

        sens = sensitivity(base, x, lambda m: task.evaluate(m)["accuracy"], ignore=[base.fc])
        # the demo's previous outputs are replaced; files adaprune did not write are never touched
        with out.open(restart=True, names=("model.onnx", *REPORT_FILES)):
            out.subdir(report.PLOTS)
            data_ = report.collect(res, base, x, latency_inputs=data.x_test[:32],
                                   onnx_path=out.path / "model.onnx", metric=task.metric,
                                   tolerance=tolerance, budget=Budget(macs=budget), sensitivity=sens,
                                   title="adaprune demo: digits CNN, 50% of MACs",
                                   model_name="adaprune.examples.digits:DigitsCNN",
                                   comparison={"title": TITLE, "columns": list(COLUMNS), "rows": rows})
            report.write(data_, out.path)
    return rows, res


def main(run_dir: str | os.PathLike[str] = "runs/demo") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("Training a small CNN on sklearn digits, then pruning it to 50% of its MACs ...")
    rows, res = run(run_dir=run_dir)
    table = Table(title=TITLE)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(res.message)
    console.print(f"adapt: {len(res.history)} steps, {sum(h.accepted for h in res.history)} accepted, "
                  f"{res.optimizer_steps} optimizer steps (the static baseline got as many); "
                  f"validation accuracy {res.before['accuracy']:.2%} -> {res.after['accuracy']:.2%}")
    console.print(f"report: {os.path.join(run_dir, 'report.html')} (also report.md, report.json)")


if __name__ == "__main__":
    main()
