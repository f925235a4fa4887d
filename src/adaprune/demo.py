"""``make demo``: adaptive pruning end to end on a built-in task, against the static baseline.

The task ships offline: sklearn's handwritten digits (8x8) and a small CNN trained here for a few
seconds. ``adaprune.adapt`` prunes it to half its MACs with at most 1 point of validation accuracy
lost; the static baseline (``adaprune.prune``, uniform ratio found for the same MACs budget) gets the
same number of fine-tuning steps. Both are scored on the held-out test split, with MACs, params and
measured CPU latency (torch eager, 1 thread, batch 32, median of repeats).
"""

from __future__ import annotations

import copy
import os
import time

import torch
from torch import nn

from . import AdaptResult, Budget, ClassificationTask, adapt, count, prune
from .adapt.ownership import REPORT_FILES
from .adapt.rundir import RunDir
from .cost.latency import measure_latency
from .examples.digits import DigitsCNN, DigitsData, load_digits_data, train
from .task import recalibrate_bn


def _test_accuracy(model: nn.Module, data: DigitsData) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def _row(name: str, model: nn.Module, data: DigitsData, x: torch.Tensor, seconds: float) -> list[str]:
    c = count(model, x)
    lat = measure_latency(model, data.x_test[:32], backend="torch", threads=1, repeats=50)
    return [name, f"{_test_accuracy(model, data):.2%}", f"{c.macs / 1e6:.2f}", f"{c.params / 1e3:.1f}",
            f"{lat.median_ms:.3f}", f"{seconds:.1f}"]


COLUMNS = ("model", "test accuracy", "MACs (M)", "params (k)", "latency ms (CPU, 1 thread, bs 32)", "time s")
TITLE = "digits CNN, budget 50% MACs, tolerance 1 point (same fine-tuning steps for both)"


def run(
    seed: int = 0, budget: float = 0.5, tolerance: float = 0.01, run_dir: str | os.PathLike[str] | None = None
) -> tuple[list[list[str]], AdaptResult]:
    """Train, prune both ways, and return the table rows (used by the demo and the README).

    With ``run_dir``, the adapt run's report (``report.html``, ``.md``, ``.json``) is written there.
    """
    out = RunDir(run_dir) if run_dir is not None else None
    if out is not None:
        out.check(restart=True, names=("model.onnx", *REPORT_FILES))  # refused before any work, if it must be
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = load_digits_data(seed)
    base = DigitsCNN(32)
    train(base, data, seed=seed)
    x = data.x_test[:1]
    rows = [_row("unpruned", base, data, x, 0.0)]

    model = copy.deepcopy(base)
    task = ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))
    t0 = time.perf_counter()
    res = adapt(model, x, task, Budget(macs=budget), tolerance=tolerance, ignore=[model.fc], seed=seed)
    rows.append(_row("adaprune.adapt", model, data, x, time.perf_counter() - t0))
    steps = 30 * len(res.history)

    static = copy.deepcopy(base)
    t0 = time.perf_counter()
    prune(static, x, budget=Budget(macs=budget), ignore=[static.fc])
    torch.manual_seed(seed)
    task.finetune(static, steps)
    recalibrate_bn(static, task.calibration())
    rows.append(_row("static prune (uniform)", static, data, x, time.perf_counter() - t0))
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
    console.print(f"adapt: {len(res.history)} steps, {sum(h.accepted for h in res.history)} accepted; "
                  f"validation accuracy {res.before['accuracy']:.2%} -> {res.after['accuracy']:.2%}")
    console.print(f"report: {os.path.join(run_dir, 'report.html')} (also report.md, report.json)")


if __name__ == "__main__":
    main()
