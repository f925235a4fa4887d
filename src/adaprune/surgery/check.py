"""The surgery check: a cut is kept only if the cut model still runs and returns outputs of the same
shapes. ``find_broken`` names the groups whose cut breaks the model (sizes that live in the code, not in
the tensors); ``apply_plan`` replays a plan on a model, checked when inputs are given."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .._check import check_inputs, check_module, check_plan
from ..calls import eval_call
from ..errors import SurgeryError, TraceError
from ..graph import Frozen, Graph
from ..plan import Plan, plan_from_choice
from .remove import output_shapes, removal, remove


def find_broken(
    model: nn.Module, plan: Plan, graph: Graph, example_inputs: Any, commit: bool = False,
    expected: list[tuple[int, ...]] | None = None, then: Callable[[], None] | None = None,
    run: Callable[[], Any] | None = None,
) -> list[Frozen]:
    """Groups whose cut in ``plan`` breaks the model when applied (dry runs; the model is unchanged).

    Some sizes live in the code rather than in the tensors (``x.split(self.n_embd)``,
    ``view(B, 512, -1)``): tracing cannot see them, a forward pass after surgery can. The whole plan
    is tried first; if it fails, each group with a cut is tried alone (a plan cutting one group: that
    group), and the ones that break the model are returned so the caller keeps them whole. With ``commit=True`` a plan that passes as a
    whole stays applied, after ``then()`` ran on the cut model inside the same transaction (if it
    raises, the model is restored and the exception propagates). ``expected``: the model's output
    shapes, when the caller already has them. ``run``: the check's forward pass (default: one eval-mode,
    no-grad call of the model on ``example_inputs``; ``prune`` counts the cut model in the same pass).
    """
    if run is None:
        run = functools.partial(eval_call, model, example_inputs)
    if expected is None:
        expected = output_shapes(run())

    try:
        with removal(model, plan, check=run, expected_shapes=expected) as applied:
            if not commit:
                applied.rollback()
            elif then is not None:
                then()
        return []
    except SurgeryError as first:
        cut = [g for g in plan.groups if g.removed]
        if not cut:  # nothing was cut: the model itself fails
            raise
        if len(cut) == 1:  # the one group cut is the one that breaks it
            return [_broken(cut[0].name, first)]
        error = first
    frozen = []
    for g in cut:
        try:
            remove(model, plan_from_choice(graph, {g.name: list(g.removed)}), run, expected, commit=False)
        except SurgeryError as exc:
            frozen.append(_broken(g.name, exc))
    if not frozen:
        raise error
    return frozen


def _broken(group: str, exc: SurgeryError) -> Frozen:
    reason = str(exc.__cause__ or exc).split("; the model was restored")[0]
    return Frozen(group, "surgery check", f"pruning this group breaks the model: {reason}")


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Any = None) -> nn.Module:
    """Replay ``plan`` on ``model`` (e.g. a fresh copy): physical removal, checked when inputs are given.

    Raises:
        TraceError: ``model`` does not run on ``example_inputs`` (before anything is cut).
        PlanMismatchError: ``plan`` does not fit ``model``.
        SurgeryError: the cut model fails the check; it was restored.
    """
    check_module(model)
    check_plan(plan)
    if example_inputs is not None:
        check_inputs(example_inputs)
    if example_inputs is None:
        remove(model, plan)
    else:
        try:
            expected = output_shapes(eval_call(model, example_inputs))
        except Warning:
            raise
        except Exception as exc:  # the model as given does not run: nothing was cut yet
            raise TraceError.model_failed(exc) from exc
        remove(model, plan, check=lambda: eval_call(model, example_inputs), expected_shapes=expected)
    return model
