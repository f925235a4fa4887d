"""Shared by the allocation and ladder tests: a digits task that makes one layer artificially sensitive."""

from __future__ import annotations

import torch

import adaprune as ap


class SensitiveLayer:
    """A digits classification task whose ``loss`` (what the controller's probes measure) rises by
    ``penalty`` times the fraction of ``layer``'s output channels that are zero or gone (removed, or
    masked by a probe). Accuracy (what accepts or rolls back a step) is the real one, so only the
    allocation sees the injected harm."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, task: ap.ClassificationTask, layer: str, width: int, penalty: float = 10.0) -> None:
        self.task, self.layer, self.width, self.penalty = task, layer, width, penalty

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        out = self.task.evaluate(model)
        weight = model.get_submodule(self.layer).weight.detach()
        alive = int((weight.flatten(1).abs().sum(1) > 0).sum())
        return {**out, "loss": out["loss"] + self.penalty * (1.0 - alive / self.width)}

    def finetune(self, model: torch.nn.Module, steps: int) -> None:
        self.task.finetune(model, steps)

    def calibration(self) -> list:
        return self.task.calibration()
