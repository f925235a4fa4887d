"""Recovery after a cut, and its measurement: the task's fine-tuning, BatchNorm recalibration, and the
least-squares refit kept only when the task's metric says it helps (a base of
:class:`~adaprune.adapt.controller.Controller`, which supplies ``cfg``, ``task``, ``criteria`` and
``evaluate``)."""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from ..errors import NonFiniteError, shown
from ..plan import Plan
from ..scale.distributed import sync_model
from ..surgery import reconstruct
from ..task import Criterion, Task, recalibrate_bn
from .bookkeeping import non_finite_metrics, non_finite_weights
from .config import AdaptConfig
from .noise import paired_interval

Examples = dict[str, torch.Tensor]
"""Per criterion name, a model's per-example values of that criterion's metric."""


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Recovery(ABC):
    """What a step does after its cut, and how the cut model is measured."""

    cfg: AdaptConfig
    task: Task
    criteria: list[Criterion]

    @abstractmethod
    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Examples]:
        """The model's metrics and per-example values (the controller's :meth:`Controller.evaluate`)."""

    def recovery_steps(self, steps: int | None = None) -> int:
        """The optimizer steps one recovery asks of the task: ``steps`` (by default ``finetune_steps``)
        when the task fine-tunes (``task.fine_tunes``: it has its own ``finetune``), else 0. Every step
        the controller tries (accepted or rolled back) spends them."""
        return (self.cfg.finetune_steps if steps is None else steps) if self.task.fine_tunes else 0

    def warm_steps(self, size: float) -> int:
        """The optimizer steps of a warm start's recovery after cutting ``size`` of the binding cost:
        ``warm_finetune_steps``, by default ``finetune_steps`` for each of the fewest ordinary steps that
        could cut as much (``ceil(size / max_step)``): the warm step cuts at once what a run from scratch
        cuts in several steps, each followed by its recovery."""
        if self.cfg.warm_finetune_steps is not None:
            return self.cfg.warm_finetune_steps
        return self.cfg.finetune_steps * max(1, math.ceil(size / self.cfg.max_step - 1e-9))

    def recover(self, work: nn.Module, step: int, steps: int | None = None) -> int:
        """Fine-tune (the task's ``finetune``), then recalibrate BatchNorm; returns the optimizer steps
        asked of the task (a fine-tune that failed part-way may have taken fewer)."""
        torch.manual_seed(self.cfg.seed * 100_003 + step)
        steps = self.recovery_steps(steps)
        if steps > 0:
            self.task.finetune(work, steps)
            sync_model(work)  # under torchrun: rank 0's weights and statistics everywhere (each saw its own slices)
        self.recalibrate(work)
        return steps

    def recalibrate(self, work: nn.Module) -> None:
        """Adaptive BatchNorm: the running statistics of the pruned model, on the calibration batches."""
        batches = self.task.calibration()  # None: the task has no calibration batches
        if batches is not None:
            recalibrate_bn(work, batches)

    def refits(self, work: nn.Module) -> bool:
        """Whether this step tries least-squares reconstruction: ``reconstruct`` when set, else (None) for
        models with BatchNorm, where the measurements in docs/benchmarks.md show it helps; not for
        LayerNorm transformers, where it lowered the task's metric."""
        if self.cfg.reconstruct is not None:
            return self.cfg.reconstruct
        return has_batchnorm(work)

    def worse(self, fitted: tuple[dict[str, float], Examples], plain: tuple[dict[str, float], Examples]) -> bool:
        """Whether the refit model measurably lowers the task's metric below the plain cut: with per-example
        values, the upper end of the paired interval of the refit's gain is below 0; without, its metric is
        lower. A refit within noise of the plain cut is kept: later steps refit toward this step's model, and
        dropping refits on noise compounded (MNIST-1D CNN at 1/16 of the MACs, seed 0: validation accuracy
        0.834 with refits dropped on noise, 0.916 with them kept)."""
        (a, fa), (b, fb) = fitted, plain
        for c in self.criteria:  # several tasks: worse when any of them is measurably worse
            sign = 1.0 if c.higher_is_better else -1.0
            va, vb = fa.get(c.name), fb.get(c.name)
            if va is not None and vb is not None and va.numel() == vb.numel() and self.cfg.confidence > 0:
                if paired_interval(vb, va, sign, self.cfg.confidence).low > 0:  # plain minus refit: the refit's loss
                    return True
            elif sign * (a[c.metric] - b[c.metric]) < 0:
                return True
        return False

    def measure(self, work: nn.Module, snapshot: nn.Module, plan: Plan, step: int,
                steps: int | None = None) -> tuple[dict[str, float], Examples, str, str]:
        """Reconstruct (kept only if it helps), recover and evaluate the cut model. Returns its (finite)
        metrics, its per-example values, what failed when something came out NaN or inf (fine-tuning
        diverged; else ``""``) and what the reconstruction did (``""`` when not tried).

        Reconstruction is judged by the task: the cut model is evaluated as it is and refitted (both
        after BatchNorm recalibration), and the refit is kept only when its metric is better. Without
        fine-tuning the kept one's evaluation is the step's; with it, the kept one is fine-tuned and
        evaluated again."""
        # seeded here, not only at the step's start: every evaluation before it (a DataLoader draws a seed from
        # torch's generator whenever it is iterated) moves the generator, and a resumed run serves fewer probes
        # from its cache than the run it continues, so it would draw other refit batches
        torch.manual_seed(self.cfg.seed * 100_003 + step + 700_001)
        batches = self.task.calibration() if self.refits(work) else None
        refit = ""
        metrics: dict[str, float] = {}
        values: Examples = {}
        doing = "recovery"
        try:
            if batches is not None:
                # the refit is fitted on the cut model as it is, BatchNorm statistics included: a later layer's
                # fit assumes the normalisation the earlier refit layers were fitted to reproduce
                trial = copy.deepcopy(work)
                reconstruct(trial, snapshot, batches, plan.removals, ridge=self.cfg.reconstruct_ridge)
                self.recalibrate(trial)
                self.recalibrate(work)
                doing = "task.evaluate"
                plain = self.evaluate(work)
                doing = "recovery"
                doing = "task.evaluate"
                fitted = self.evaluate(trial)
                doing = "recovery"
                key = self.task.metric
                kept = math.isfinite(fitted[0][key]) and (not math.isfinite(plain[0][key])
                                                          or not self.worse(fitted, plain))
                if kept:
                    work.load_state_dict(trial.state_dict())
                refit = (f"refit {'kept' if kept else 'dropped'} ({key} {plain[0][key]:.4f} without, "
                         f"{fitted[0][key]:.4f} with)")
                if self.recovery_steps(steps) == 0:
                    metrics, values = fitted if kept else plain
                    return self.finished(work, metrics, values, refit)
            self.recover(work, step, steps)
            doing = "task.evaluate"
            metrics, values = self.evaluate(work)
        except NonFiniteError as exc:
            return {}, {}, f"{doing} failed ({type(exc).__name__}: {shown(str(exc), 200)})", refit
        return self.finished(work, metrics, values, refit)

    @staticmethod
    def finished(work: nn.Module, metrics: dict[str, float], values: Examples,
                 refit: str) -> tuple[dict[str, float], Examples, str, str]:
        bad = non_finite_weights(work)
        if bad:
            return {}, {}, f"non-finite weights after recovery: {bad}", refit
        bad = non_finite_metrics(metrics)
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        return finite, values, f"non-finite metrics after the step: {bad}" if bad else "", refit

    def as_cut(self, work: nn.Module, steps: int | None) -> bool:
        """Whether a step's model is exactly its cut (no recovery, no refit, no BatchNorm statistics
        renewed), so the same channels masked on the same weights is the same model."""
        if self.recovery_steps(steps) > 0:
            return False
        # a refit or a BatchNorm recalibration changes the model, where the task has calibration batches
        return not (self.refits(work) or has_batchnorm(work)) or self.task.calibration() is None


__all__ = ["Examples", "Recovery", "has_batchnorm"]
