"""A ready task for encoders: keep a pruned model's embeddings close to the unpruned model's.

:class:`EmbeddingTask` needs no labels. Its metric is the similarity between the model's embedding of
every validation example and the unpruned model's (the teacher's, kept by :meth:`EmbeddingTask.set_teacher`);
fine-tuning distils the teacher's embeddings into the model (1 - cosine, or mean squared error).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._check import (
    as_float,
    as_int,
    check_batches,
    check_callable,
    check_choice,
    check_module,
    clip,
    describe,
)
from .calls import call_model
from .errors import ConfigError
from .scale.distributed import shard
from .task import Task, adamw_steps, optimizer_step

Embed = Callable[[Any, Any], torch.Tensor]

_EMBED_FIX = "pass embed=fn(output, batch) -> a (N, D) tensor that reads this output"


def default_embed(output: Any, batch: Any) -> torch.Tensor:
    """One embedding per example from a model's output: a ``(N, D)`` tensor is used as it is; a
    ``(N, T, D)`` tensor, or an output's ``last_hidden_state`` (Hugging Face models), is averaged over
    the tokens that ``batch["attention_mask"]`` keeps (over every token when ``batch`` has no mask), as
    sentence-transformers' mean pooling does. Anything else raises :class:`~adaprune.errors.ConfigError`
    naming ``embed=``."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, Mapping):
        hidden = output.get("last_hidden_state")
    hidden = output if hidden is None else hidden
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ConfigError(
            f"the model's output is {describe(output)}; the default embedding needs a (N, D) or (N, T, D) float "
            f"tensor or an output with .last_hidden_state: {_EMBED_FIX}"
        )
    if hidden.dim() == 2:
        return hidden
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return hidden.mean(1)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ConfigError(
            f"the batch's attention_mask is {describe(mask)}; mean pooling needs one value per token, "
            f"shape {tuple(hidden.shape[:2])} (N, T) like the hidden states {tuple(hidden.shape)}: {_EMBED_FIX}"
        )
    weights = mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@dataclass(frozen=True, eq=False)
class TeacherTargets:
    """The targets of a calibration batch: the teacher's ``embedding`` of ``inputs`` (the batch itself,
    kept so that :meth:`EmbeddingTask.loss_fn` can pool the model's output over its attention mask)."""

    embedding: torch.Tensor
    inputs: Any


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine in float64: exactly 1.0 for two equal rows (sqrt(s * s) == s in IEEE arithmetic)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(-1)
    return (dot / ((a * a).sum(-1) * (b * b).sum(-1)).sqrt().clamp_min(1e-12)).clamp(-1.0, 1.0)


class EmbeddingTask(Task):
    """Distillation for encoders (a sentence-embedding BERT ...): how close the model's embeddings stay
    to the unpruned model's on ``val_loader``, and fine-tuning that pulls them back on ``train_loader``.

    Batches are the model's inputs only, no labels: whatever :func:`adaprune.calls.call_model` accepts
    (a tensor, a tuple of positional inputs, or a dict of keyword inputs such as a tokenizer's
    ``{"input_ids": ..., "attention_mask": ...}``). An ``(inputs, targets)`` pair is a tuple, hence read
    as two positional inputs.

    Args:
        train_loader: batches to fine-tune and calibrate on (read many times: a list or a DataLoader,
            not a generator).
        val_loader: batches the metric is measured on (read many times; the same examples in the same
            order on every pass, since the teacher's embeddings of them are computed once).
        embed: ``embed(output, batch) -> (N, D) tensor``, one embedding per example from the model's
            output and the batch it was given. Default: :func:`default_embed` (mean pooling over the
            attention mask, or a ``(N, D)`` output as it is).
        score: ``"cosine"`` (metric: the mean cosine similarity to the teacher's embeddings; fine-tune
            loss: 1 - cosine) or ``"mse"`` (metric: minus the mean squared error; loss: the error).
        lr, weight_decay: AdamW's learning rate (> 0) and weight decay (>= 0) for :meth:`finetune`.
        calibration_batches: how many training batches :meth:`calibration` hands out (>= 1).

    :meth:`set_teacher` must be given the unpruned model before anything is measured. ``adapt`` calls it
    only after it has evaluated the original model, so call ``task.set_teacher(model)`` yourself before
    ``adapt(model, x, task, ...)``; adapt's own later call with the same weights does no work.

    :meth:`calibration` hands out ``(inputs, TeacherTargets)`` pairs. Gradient-based importance criteria
    (``"taylor"``) call ``loss(output, targets)`` on them, and the default loss wants class indices:
    pass ``adapt(..., loss=task.loss_fn)``, the distillation loss on a model's output.
    """

    metric = "similarity"
    higher_is_better = True

    def __init__(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        *,
        embed: Embed | None = None,
        score: str = "cosine",
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        calibration_batches: int = 4,
    ) -> None:
        expected = "batches of model inputs (no targets)"
        self.train_loader = check_batches(train_loader, "train_loader", expected, reusable=True)
        self.val_loader = check_batches(val_loader, "val_loader", expected, reusable=True)
        if embed is not None:
            check_callable(embed, "embed", "None or a function embed(output, batch) -> (N, D) tensor")
        self.embed: Embed = default_embed if embed is None else embed
        self.score = check_choice(score, "score", ("cosine", "mse"))
        self.lr = as_float(lr, "lr", low=0.0, low_open=True, hint="the fine-tune learning rate, e.g. 5e-5")
        self.weight_decay = as_float(weight_decay, "weight_decay", low=0.0, hint="AdamW's weight decay, e.g. 0")
        self.calibration_batches = as_int(calibration_batches, "calibration_batches", low=1)
        self.teacher: nn.Module | None = None
        self._val: list[torch.Tensor] = []  # the teacher's embedding of every val batch
        self._calibration: list[tuple[Any, TeacherTargets]] | None = None

    # -- the teacher -------------------------------------------------------------------------
    def set_teacher(self, model: nn.Module) -> None:
        """Keep a frozen copy of ``model`` (the unpruned one) and its embeddings of every val batch.
        A second call with a model of the same weights keeps what it has (nothing is recomputed)."""
        check_module(model)
        if self.teacher is not None and _same_weights(self.teacher, model):
            return
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            val = [self._embed(teacher, x, f"val_loader batch {i} (teacher)") for i, x in enumerate(self.val_loader)]
        if not val:
            raise ConfigError("val_loader yielded no batches: the metric is measured on it; pass a non-empty one")
        self.teacher, self._val, self._calibration = teacher, val, None

    def _teacher(self, what: str) -> nn.Module:
        if self.teacher is None:
            raise ConfigError(
                f"EmbeddingTask.{what} before set_teacher: call task.set_teacher(model) with the unpruned model "
                "first (the metric and the loss compare with its embeddings); adapt(...) evaluates the original "
                "model before it calls set_teacher, so call it yourself before adapt"
            )
        return self.teacher

    # -- embeddings and losses -----------------------------------------------------------------
    def _embed(self, model: nn.Module, x: Any, where: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """The model's embedding of a batch, checked: a float (N, D) tensor (shaped as ``like`` if given)."""
        try:
            output = call_model(model, x)
        except (ConfigError, Warning, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            raise ConfigError(
                f"the model failed on {where} ({type(exc).__name__}: {clip(str(exc))}); "
                "check that the batch is what model(...) accepts (batches are inputs only)"
            ) from exc
        return self._check(self.embed(output, x), where, like)

    def _check(self, emb: Any, where: str, like: torch.Tensor | None) -> torch.Tensor:
        bad = not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not emb.is_floating_point()
        if bad or (like is not None and tuple(emb.shape) != tuple(like.shape)):
            want = f"{tuple(like.shape)} like the teacher's" if like is not None else "(N, D) float"
            raise ConfigError(f"{where}: the embedding is {describe(emb)}; expected a {want} tensor ({_EMBED_FIX})")
        return emb

    def _distance(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The distillation loss: mean 1 - cosine, or the mean squared error."""
        target = target.to(device=emb.device, dtype=emb.dtype)
        if self.score == "cosine":
            return (1.0 - nn.functional.cosine_similarity(emb, target, dim=-1)).mean()
        return nn.functional.mse_loss(emb, target)

    def loss_fn(self, output: Any, targets: Any) -> torch.Tensor:
        """The distillation loss of a model's ``output`` (a scalar tensor), for ``adapt(loss=task.loss_fn)``.
        ``targets``: a :class:`TeacherTargets` (what :meth:`calibration` gives; the output is pooled over
        its inputs' attention mask) or the teacher's ``(N, D)`` embedding (pooled over every token)."""
        if isinstance(targets, TeacherTargets):
            target, batch = targets.embedding, targets.inputs
        elif isinstance(targets, torch.Tensor):
            target, batch = targets, None
        else:
            raise ConfigError(
                f"EmbeddingTask.loss_fn: targets are {describe(targets)}; expected the TeacherTargets of "
                "task.calibration() or the teacher's (N, D) embedding"
            )
        emb = self._check(self.embed(output, batch), "loss_fn", target)
        return self._distance(emb, target)

    def loss(self, model: nn.Module, x: Any, y: Any = None) -> torch.Tensor:
        """The distillation loss of ``model`` on inputs ``x``; ``y`` is a :class:`TeacherTargets`, the
        teacher's embedding of ``x``, or None (the teacher is run on ``x``)."""
        target = y.embedding if isinstance(y, TeacherTargets) else y
        if target is None:
            with torch.no_grad():
                target = self._embed(self._teacher("loss"), x, "the batch given to loss() (teacher)")
        if not isinstance(target, torch.Tensor):
            raise ConfigError(f"EmbeddingTask.loss: y is {describe(y)}; expected TeacherTargets, a tensor or None")
        return self._distance(self._embed(model, x, "the batch given to loss()", target), target)

    # -- the hooks -----------------------------------------------------------------------------
    def calibration(self) -> list[tuple[Any, TeacherTargets]]:
        """The first ``calibration_batches`` training batches as ``(inputs, TeacherTargets)`` pairs
        (computed once per teacher; an empty ``train_loader`` raises)."""
        teacher = self._teacher("calibration()")
        if self._calibration is None:
            out = []
            with torch.no_grad():
                for i, x in enumerate(itertools.islice(iter(self.train_loader), self.calibration_batches)):
                    out.append((x, TeacherTargets(self._embed(teacher, x, f"train_loader batch {i} (teacher)"), x)))
            if not out:
                raise ConfigError(_EMPTY_TRAIN)
            self._calibration = out
        return list(self._calibration)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """``{"similarity", "loss"}`` on ``val_loader`` and every example's similarity to the teacher's
        embedding (float64): its cosine (``score="cosine"``), or minus its mean squared error over the
        embedding's dimensions (``"mse"``). ``similarity`` is these values' mean, ``loss`` 1 - it or -it."""
        return self._measure(model, None)

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        """``{"similarity", "loss"}`` on the first ``ceil(fraction * batches)`` batches of ``val_loader``
        (the same examples on every call: its passes repeat, as the teacher's embeddings require)."""
        if fraction >= 1.0:
            return self.evaluate(model)
        self._teacher("evaluate_part()")
        return self._measure(model, max(1, math.ceil(fraction * len(self._val))))[0]

    def _measure(self, model: nn.Module, batches: int | None) -> tuple[dict[str, float], torch.Tensor]:
        """The metrics and per-example values on the first ``batches`` validation batches (None: all)."""
        check_module(model)
        self._teacher("evaluate()")
        flags = {m: m.training for m in model.modules()}
        model.eval()
        values: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for i, x in enumerate(itertools.islice(self.val_loader, batches)):
                    if i >= len(self._val):
                        raise ConfigError(_CHANGED.format(f"more than {len(self._val)}"))
                    t = self._val[i]
                    emb = self._embed(model, x, f"val_loader batch {i}", t).double()
                    t = t.to(emb.device).double()
                    values.append(_cosine(emb, t) if self.score == "cosine" else -((emb - t) ** 2).mean(-1))
        finally:
            for m, f in flags.items():
                m.training = f
        if len(values) != (len(self._val) if batches is None else min(batches, len(self._val))):
            raise ConfigError(_CHANGED.format(len(values)))
        per = torch.cat([v.cpu() for v in values])
        mean = float(per.mean())
        return {"similarity": mean, "loss": 1.0 - mean if self.score == "cosine" else -mean}, per

    def training_batches(self) -> Iterator[tuple[Any, Any]]:
        """The training batches as ``(inputs, None)`` (:meth:`loss` runs the teacher on them), cycling."""
        return ((x, None) for _, x in self._batches())

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """(index within the pass, inputs) over the training batches, cycling."""
        while True:
            empty = True
            for i, x in enumerate(self.train_loader):
                empty = False
                yield i, x
            if empty:
                raise ConfigError(_EMPTY_TRAIN)

    def finetune(self, model: nn.Module, steps: int) -> None:
        """``steps`` AdamW steps distilling the teacher's embeddings (training batches cycling, train mode).

        A step that fails changes nothing (the buffers its forward pass updated are put back); the steps
        before it stay applied. A NaN or infinite loss raises :class:`~adaprune.errors.NonFiniteError`
        naming the step.
        """
        check_module(model)
        steps = as_int(steps, "steps", low=0, hint="the number of optimizer steps")
        if steps == 0:
            return
        teacher = self._teacher("finetune()")
        batches = self._batches()

        def step(opt: torch.optim.Optimizer, n: int) -> None:
            i, x = next(batches)
            self._step(model, teacher, opt, n, x, f"train_loader batch {i}")

        adamw_steps(model, steps, self.lr, self.weight_decay, step)

    def _step(self, model: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, step: int, x: Any,
              where: str) -> None:
        """One optimizer step (on this process's slice of the batch under torchrun); if it fails, the buffers
        its forward pass changed are restored."""
        x = shard(x)

        def loss() -> torch.Tensor:
            with torch.no_grad():
                target = self._embed(teacher, x, f"{where} (teacher)")
            return self._distance(self._embed(model, x, where, target), target)

        optimizer_step(model, opt, loss, f"finetune step {step} ({where})", self.lr)


_EMPTY_TRAIN = "train_loader yielded no batches: fine-tuning and calibration read it; pass a non-empty one"
_CHANGED = (
    "val_loader yielded {} batches, not the ones set_teacher embedded; it must give the same batches on every "
    "pass (no shuffling)"
)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models are of one class with equal state dicts (same names, shapes and values)."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k]) for k in sa
    )
