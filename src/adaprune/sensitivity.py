"""Sensitivity analysis: the task metric after pruning one group (or one cluster) alone.

For every group — or every cluster of isomorphic groups, e.g. the same block repeated in a stage —
and every ratio, the lowest-importance channels are masked (``torch.nn.utils.parametrize``; no
fine-tuning), the user's ``evaluate(model) -> float`` is called, and the mask is taken off. The
result is a table (and a plot, with the ``report`` extra) of metric against ratio per group: the
input of the adaptive allocator, which prunes less where the metric falls fast.

Results are cached in memory and, with ``cache=path``, in a JSON file keyed by a fingerprint of the
weights, so re-running an analysis on the same model costs nothing.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import fs
from ._check import (
    a_type,
    as_bool,
    as_float,
    brief,
    check_batches,
    check_callable,
    check_inputs,
    check_instance,
    check_module,
    check_path,
    describe,
)
from .allocate import Limits
from .errors import ArgumentTypeError, ConfigError, FileFormatError, NonFiniteError
from .graph import Graph, Group, ignore_items, resolve_ignore, trace
from .importance import Context, get_importance
from .plan import Plan
from .planner import choose
from .scale import get_executor, model_token


@dataclass(frozen=True)
class Row:
    """The metric with ``ratio`` of ``groups``' channels masked."""

    cluster: str
    groups: tuple[str, ...]
    ratio: float
    metric: float


@dataclass
class Sensitivity:
    """Metric per (cluster, ratio), plus the unpruned baseline."""

    baseline: float
    rows: list[Row] = field(default_factory=list)

    def curve(self, cluster: str) -> list[tuple[float, float]]:
        return sorted((r.ratio, r.metric) for r in self.rows if r.cluster == cluster)

    def by_group(self) -> dict[str, list[tuple[float, float]]]:
        """Each group's curve (members of a cluster share their cluster's curve)."""
        out: dict[str, list[tuple[float, float]]] = {}
        for r in self.rows:
            for g in r.groups:
                out.setdefault(g, []).append((r.ratio, r.metric))
        return {g: sorted(v) for g, v in out.items()}

    def to_markdown(self) -> str:
        ratios = sorted({r.ratio for r in self.rows})
        head = "| cluster | groups | " + " | ".join(f"{x:.0%}" for x in ratios) + " |"
        lines = [f"Baseline metric: {self.baseline:.4f}", "", head, "|---|---|" + "---|" * len(ratios)]
        for name in dict.fromkeys(r.cluster for r in self.rows):
            values = dict(self.curve(name))
            n = next(len(r.groups) for r in self.rows if r.cluster == name)
            cells = " | ".join(f"{values[x]:.4f}" if x in values else "" for x in ratios)
            lines.append(f"| {name} | {n} | {cells} |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str], top: int = 12) -> Path:
        """Metric vs ratio for the ``top`` most sensitive clusters; writes a PNG and returns its path."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ConfigError("Sensitivity.plot needs matplotlib: pip install 'adaprune[report]'") from exc
        names = list(dict.fromkeys(r.cluster for r in self.rows))
        names.sort(key=lambda n: min(m for _, m in self.curve(n)))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names[:top]:
            xs, ys = zip(*([(0.0, self.baseline)] + self.curve(n)))
            ax.plot(xs, ys, marker="o", label=n)
        ax.axhline(self.baseline, color="grey", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel("fraction of the group's channels masked")
        ax.set_ylabel("metric")
        ax.set_title("Sensitivity per group (no fine-tuning)")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def clusters(model: nn.Module, groups: Sequence[Group]) -> dict[str, list[Group]]:
    """Groups with the same structure (module kinds, tensor roles, dims and size) share a cluster."""
    out: dict[tuple[Any, ...], list[Group]] = {}
    for g in groups:
        key: list[Any] = [g.size]
        for s in g.slots:
            try:
                kind = type(model.get_submodule(s.module)).__name__
            except AttributeError:
                kind = "?"
            key.append((kind, s.tensor.rpartition(".")[2], s.dim, s.size))
        out.setdefault(tuple(sorted(map(str, key))), []).append(g)
    return {members[0].name + (f" (+{len(members) - 1})" if len(members) > 1 else ""): members
            for members in out.values()}


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes (order-independent): the cache's key
    (:func:`adaprune.scale.model_token`, the name executors give a model)."""
    return model_token(model)


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    ratios: Iterable[float] = (0.25, 0.5, 0.75),
    *,
    importance: Any = "l2",
    ignore: Iterable[nn.Module | str] | None = None,
    calibration: Iterable[tuple[Any, Any]] | None = None,
    cluster: bool = True,
    cache: str | os.PathLike[str] | None = None,
    graph: Graph | None = None,
    executor: Any = None,
) -> Sensitivity:
    """Measure ``evaluate(model)`` with each group (or cluster) alone masked at each ratio.

    The model is left exactly as it was. ``evaluate`` should be quick: it runs
    ``len(clusters) * len(ratios) + 1`` times, and must return one finite number each time.

    ``executor``: where those evaluations run: ``None``/``"local"`` (here, one after another), ``"ray"``
    or an :class:`adaprune.Executor` such as ``RayExecutor(workers=4)`` (each worker holds a copy of the
    model and ``evaluate``, which must then pickle); every evaluation starts from ``torch.manual_seed(0)``,
    so the table is the same wherever it ran.
    """
    check_module(model)
    if graph is None:
        check_inputs(example_inputs)
    else:
        check_instance(graph, Graph, "graph", "an adaprune.Graph (from adaprune.trace) or None")
    check_callable(evaluate, "evaluate", "a callable evaluate(model) -> float (the metric)")
    ratios = _fractions(ratios)
    get_importance(importance)
    ignore = ignore_items(ignore)  # a generator is read once, here
    resolve_ignore(model, ignore)
    if calibration is not None:
        check_batches(calibration, "calibration")
    cluster = as_bool(cluster, "cluster")
    check_path(cache, "cache")
    runner, owned = get_executor(executor)
    try:
        runner.prepare()  # (Ray's workers start while the model is traced and scored)
        graph = graph or trace(model, example_inputs, ignore=ignore)
        scores = get_importance(importance)(model, graph.groups, Context(calibration))
        parts = clusters(model, graph.groups) if cluster else {g.name: [g] for g in graph.groups}
        path = Path(cache) if cache is not None else None
        stored: dict[str, float] = {}
        fp = fingerprint(model)
        if path is not None and (path.exists() or path.is_symlink()):
            stored = _read_cache(path, fp)
        todo: dict[str, Plan] = {} if "baseline" in stored else {"baseline": Plan()}
        for name, members in parts.items():
            for r in ratios:
                key = f"{importance}|{name}|{r}"
                if key not in stored and key not in todo:
                    todo[key] = choose(Graph(members), scores, "uniform", Limits(), r)
        if todo:
            found = runner.map(model, list(todo.values()), evaluate)
            stored.update({key: _number(value) for key, value in zip(todo, found)})
    finally:
        if owned:
            runner.close()
    result = Sensitivity(stored["baseline"])
    for name, members in parts.items():
        for r in ratios:
            key = f"{importance}|{name}|{r}"
            result.rows.append(Row(name, tuple(g.name for g in members), r, stored[key]))
    if path is not None:
        fs.write_json(path, {"fingerprint": fp, "results": stored}, what="the sensitivity cache")
    return result


class _Cache(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    fingerprint: str
    results: dict[str, Annotated[float, Field(allow_inf_nan=False)]]  # (NaN is never cached: it is an error)


def _read_cache(path: Path, fingerprint: str) -> dict[str, float]:
    """The cached results for this model (``{}`` for another model); a damaged cache is a warning and is
    recomputed (and rewritten), since nothing in it is needed."""
    try:
        cache = fs.read_model(_Cache, path, what="the sensitivity cache")
    except FileFormatError as exc:
        warnings.warn(f"ignoring the sensitivity cache: {exc}", stacklevel=3)
        return {}
    return dict(cache.results) if cache.fingerprint == fingerprint else {}


def _fractions(ratios: Any) -> list[float]:
    """``ratios`` as a non-empty list of fractions in [0, 1)."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise ArgumentTypeError(
            f"ratios={brief(ratios)} is {a_type(ratios)}; expected a list of fractions in [0, 1), "
            "e.g. ratios=[0.25, 0.5]"
        )
    out = [as_float(r, f"ratios[{i}]", low=0.0, high=1.0, high_open=True, hint="a fraction of a group's channels")
           for i, r in enumerate(ratios)]
    if not out:
        raise ConfigError("ratios=[]: ratios must hold at least one fraction in [0, 1), e.g. [0.25, 0.5]")
    return out


def _number(value: Any) -> float:
    """What ``evaluate`` returned, as a float: a non-number or NaN/inf names ``evaluate``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"evaluate returned {describe(value)}; it must return one number, the metric"
        )
    if not math.isfinite(value):
        raise NonFiniteError(
            f"evaluate returned {float(value)}; the metric must be finite (check the model and the data "
            "evaluate uses for NaN/inf)"
        )
    return float(value)
