"""Model updates: map a plan onto an updated model (:func:`map_plan`), warm-start ``adapt`` from a previous
run, check a deployed pruned model against its updated dense parent, and diff two plans."""

from __future__ import annotations

from ..adapt.previous import plan_of
from ..mapping import MappedPlan, map_plan
from .check import DriftReport, check
from .diff import GroupDiff, PlanDiff, diff

__all__ = ["DriftReport", "GroupDiff", "MappedPlan", "PlanDiff", "check", "diff", "map_plan", "plan_of"]
