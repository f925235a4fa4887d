"""Joint recovery of all rungs over the shared weights, and per-rung normalisation statistics.

Universally slimmable networks (Yu & Huang, 2019) train every width of one network at once with the
*sandwich rule*: each optimizer step takes the largest width, the smallest and a few random ones in
between, and the smaller widths learn from the largest one's output (*in-place distillation*) rather
than from the labels. Here the widths are the ladder's rungs, the weights are the user's trained model
(not trained from scratch), and each step is:

1. rung 0 (the full model) on one training batch with the task's own loss (:meth:`Task.loss`); its
   output, detached, is the teacher;
2. the smallest rung and one random middle rung (when there is one) on the same batch, each with the
   KL divergence of its logits from the teacher's (a mean squared error for outputs that are not
   logits);
3. one optimizer step (Adam, over the full parameters: every rung's tensors are views of them).

BatchNorm statistics mean different things at different widths, so after training each rung gets its
own, re-estimated on the task's calibration batches (:func:`adaprune.task.recalibrate_bn`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..calls import call_model
from ..errors import ConfigError, NonFiniteError
from ..task import Task, logits_of, recalibrate_bn
from .nested import NestedWidths, norm_buffers


def sandwich(n: int, rng: random.Random) -> list[int]:
    """The rungs one step trains: the largest (0), the smallest (``n - 1``) and one random middle rung."""
    if n == 1:
        return [0]
    middle = [rng.randrange(1, n - 1)] if n > 2 else []
    return [0, n - 1, *middle]


def distillation(student: Any, teacher: torch.Tensor) -> torch.Tensor:
    """In-place distillation: KL(teacher || student) over the last dim for logits, else the mean squared error."""
    out = logits_of(student)
    if out.is_floating_point() and out.dim() >= 2 and out.shape == teacher.shape and out.shape[-1] > 1:
        return nn.functional.kl_div(nn.functional.log_softmax(out, -1), nn.functional.softmax(teacher, -1),
                                    reduction="batchmean")
    return nn.functional.mse_loss(out, teacher)


class _Capture:
    """Keeps the detached output of the model's last forward call (the teacher of the smaller rungs)."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.output = logits_of(output).detach()


Checkpoint = Callable[[int, torch.optim.Optimizer], None]


def joint_recovery(nested: NestedWidths, task: Task, steps: int, lr: float, seed: int = 0, *, start: int = 0,
                   optimizer_state: dict[str, torch.Tensor] | None = None, checkpoint: Checkpoint | None = None,
                   every: int = 0) -> int:
    """Optimizer steps ``start`` to ``steps`` of training every rung at once (the module doc); returns
    the steps taken in all (``start`` included).

    Resuming (``start > 0``): the optimizer's state is ``optimizer_state`` (from
    :func:`adaprune.ladder.run.optimizer_tensors`), the first ``start`` batches are skipped and the
    random middle rungs of the first ``start`` steps drawn again, so the steps that follow are the
    ones an uninterrupted run takes. ``checkpoint(taken, optimizer)`` is called with the model at rung 0
    every ``every`` steps (when ``every > 0``) and after the last step.

    The model ends at rung 0 with its own Parameters (the full ones) and in the training mode it was in.

    Raises:
        ConfigError: the task has no training batches (:meth:`Task.training_batches`).
        NonFiniteError: a loss was NaN or infinite (naming the step and the rung); the steps before stay applied.
    """
    if steps <= start:
        return start
    batches: Iterator[tuple[Any, Any]] | None = task.training_batches()
    if batches is None:
        raise ConfigError(
            "ladder: finetune_steps > 0 needs the task's training batches (task.training_batches(), which "
            "adaprune.ClassificationTask and EmbeddingTask have); give a task with them, or finetune_steps=0"
        )
    model = nested.model
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if optimizer_state:
        from .run import load_optimizer

        load_optimizer(opt, optimizer_state)
    rng = random.Random(seed)
    for _ in range(start):
        sandwich(len(nested), rng)
    capture = _Capture()
    flags = {m: m.training for m in model.modules()}
    taken = start
    try:
        for step, (x, y) in enumerate(itertools.islice(batches, start, steps), start=start):
            opt.zero_grad(set_to_none=True)
            for k in sandwich(len(nested), rng):
                nested.use(k, grad=True).train()
                if k == 0:
                    handle = model.register_forward_hook(capture)
                    try:
                        loss = task.loss(model, x, y)
                    finally:
                        handle.remove()
                    teacher = capture.output
                else:
                    if teacher is None:
                        raise ConfigError("ladder: the task's loss did not run the model (no teacher output)")
                    loss = distillation(call_model(model, x), teacher)
                if not math.isfinite(float(loss.detach())):
                    raise NonFiniteError(f"ladder joint recovery step {step}, rung {k}: the loss is {float(loss.detach())}")
                loss.backward()
            opt.step()
            taken += 1
            if checkpoint is not None and (taken == steps or (every > 0 and taken % every == 0)):
                nested.use(0)
                checkpoint(taken, opt)
    finally:
        nested.use(0)
        for m, f in flags.items():
            m.training = f
        for p in params:
            p.grad = None
    return taken


@torch.no_grad()
def recalibrate_rungs(nested: NestedWidths, batches: list[tuple[Any, Any]]) -> bool:
    """Give every rung its own BatchNorm statistics, re-estimated on ``batches``; False when the model
    has no BatchNorm (nothing to do). The model ends at the rung it was at."""
    names = norm_buffers(nested.model)
    if not names:
        return False
    current = nested.current
    for k in range(len(nested)):
        model = nested.use(k)
        buffers = dict(model.named_buffers(remove_duplicate=False))
        nested.set_norms(k, {n: buffers[n].clone() for n in names})
        model = nested.use(k)  # now on the rung's own copies, which the re-estimate overwrites
        recalibrate_bn(model, batches, max_batches=len(batches))
    nested.use(current)
    return True


__all__ = ["distillation", "joint_recovery", "recalibrate_rungs", "sandwich"]
