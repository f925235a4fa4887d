"""Language modeling as a task: perplexity on held-out text (lower is better), fine-tuning on training text.

A causal language model maps token ids to next-token logits: a Hugging Face ``...ForCausalLM`` (its
output's ``.logits``) or any module whose output is a ``(N, T, vocab)`` tensor. Text is given as strings
with a tokenizer (anything called like a Hugging Face tokenizer: ``tokenizer(texts, truncation=True,
max_length=..., padding=True, return_tensors="pt")``), or already as batches: dicts with
``input_ids`` (and ``attention_mask``), or ``(N, T)`` id tensors.

Perplexity is ``exp`` of the mean negative log-likelihood of every next token the attention mask keeps
(padding never counts), over all of the validation batches. It is not a mean over examples, so the task
returns no per-example values: adapt judges its point drop (a validation set of a few thousand tokens
resolves a tolerance of a few percent of the perplexity). ``loss`` (the mean NLL) rises with it and is
smooth, so adapt's probes rank layers by it.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._check import as_float, as_int, check_batches, check_module, clip
from .calls import call_model
from .errors import ConfigError
from .scale.distributed import shard
from .task import Task, adamw_steps, logits_of, optimizer_step


def _batches(data: Any, tokenizer: Any, max_length: int, batch_size: int, name: str) -> list[dict[str, torch.Tensor]]:
    """``data`` as a list of ``{"input_ids", "attention_mask"}`` batches (checked: 2-D integer ids)."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and data and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ConfigError(f"{name} is text: pass tokenizer= (e.g. transformers.AutoTokenizer.from_pretrained(...)), "
                              "or give batches of token ids")
        out = []
        for s in range(0, len(data), batch_size):
            try:
                enc = tokenizer(list(data[s:s + batch_size]), truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
            except Exception as exc:
                raise ConfigError(f"the tokenizer failed on {name}[{s}:{s + batch_size}] ({type(exc).__name__}: "
                                  f"{clip(str(exc))}); a tokenizer with padding needs a pad token (e.g. "
                                  "tokenizer.pad_token = tokenizer.eos_token)") from exc
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out
    check_batches(data, name, "batches of token ids (dicts with input_ids, or (N, T) tensors), or a list of texts",
                  reusable=True)
    out = []
    for i, b in enumerate(data):
        ids = b.get("input_ids") if isinstance(b, dict) else b
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ConfigError(f"{name} batch {i}: expected (N, T) integer token ids (or a dict with input_ids), got "
                              f"{type(ids).__name__}{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}")
        mask = b.get("attention_mask") if isinstance(b, dict) else None
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask})
    if not out:
        raise ConfigError(f"{name} yielded no batches; pass a non-empty list")
    return out


class LanguageModelingTask(Task):
    """Perplexity of a causal language model on ``val`` (lower is better); fine-tuning on ``train``.

    Args:
        val: held-out text (a list of strings, with ``tokenizer``) or batches of token ids.
        train: training text or batches, for :meth:`finetune`, :meth:`calibration` (the first
            ``calibration_batches``: what ``sparsify(importance="sparsegpt", calibration=...)`` and data-driven
            criteria read) and :meth:`training_batches`; None: the task does not fine-tune and has no
            calibration batches.
        tokenizer: turns text into ids (needed when ``val`` or ``train`` is text).
        max_length: texts are truncated to this many tokens.
        batch_size: texts per batch.
        lr, weight_decay: AdamW's for :meth:`finetune`.
    """

    metric = "perplexity"
    higher_is_better = False

    def __init__(self, val: Any, train: Any = None, *, tokenizer: Any = None, max_length: int = 128,
                 batch_size: int = 8, lr: float = 5e-5, weight_decay: float = 0.0, calibration_batches: int = 4) -> None:
        self.max_length = as_int(max_length, "max_length", low=2)
        self.batch_size = as_int(batch_size, "batch_size", low=1)
        self.lr = as_float(lr, "lr", low=0.0, low_open=True, hint="the fine-tune learning rate, e.g. 5e-5")
        self.weight_decay = as_float(weight_decay, "weight_decay", low=0.0, hint="AdamW's weight decay, e.g. 0")
        self.calibration_batches = as_int(calibration_batches, "calibration_batches", low=1)
        self.val = _batches(val, tokenizer, self.max_length, self.batch_size, "val")
        self.train = None if train is None else _batches(train, tokenizer, self.max_length, self.batch_size, "train")
        self._cursor = 0

    # -- measuring --------------------------------------------------------------------------------
    def _nll(self, model: nn.Module, batch: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, int]:
        """Summed next-token negative log-likelihood of one batch (a tensor with grad, if enabled) and
        the number of tokens it covers."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        device = next((p.device for p in model.parameters()), ids.device)
        ids, mask = ids.to(device), mask.to(device)
        try:
            logits = logits_of(call_model(model, {"input_ids": ids, "attention_mask": mask}
                                          if _takes_mask(model) else ids))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"the model failed on {where} ({type(exc).__name__}: {clip(str(exc))}); a language "
                              "model takes input_ids (and attention_mask) and returns next-token logits") from exc
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ConfigError(f"{where}: the model's logits are {tuple(logits.shape)}; expected (N, T, vocab) for "
                              f"input_ids {tuple(ids.shape)}")
        if int(ids.max()) >= logits.shape[-1] or int(ids.min()) < 0:
            raise ConfigError(f"{where}: token ids run from {int(ids.min())} to {int(ids.max())}, outside the model's "
                              f"{logits.shape[-1]} logits: the tokenizer and the model's vocabulary do not match")
        keep = mask[:, 1:].bool()
        nll = nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")
        return nll, int(keep.sum())

    def _measure(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        check_module(model)
        flags = {m: m.training for m in model.modules()}
        model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for i, b in enumerate(batches):
                    nll, n = self._nll(model, b, f"val batch {i}")
                    total, count = total + float(nll), count + n
        finally:
            for m, f in flags.items():
                m.training = f
        if count == 0:
            raise ConfigError("the validation batches hold no next token to predict (every text is one token long, "
                              "or the attention masks are empty)")
        mean = total / count
        return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean, "tokens": float(count)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``perplexity``, ``loss`` (mean next-token NLL) and ``tokens`` on the validation batches."""
        return self._measure(model, self.val)

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        """The same on the first ``ceil(fraction * batches)`` validation batches."""
        if fraction >= 1.0:
            return self.evaluate(model)
        return self._measure(model, self.val[:max(1, math.ceil(fraction * len(self.val)))])

    # -- training ---------------------------------------------------------------------------------
    @property
    def fine_tunes(self) -> bool:
        return self.train is not None

    def _train(self, what: str) -> list[dict[str, torch.Tensor]]:
        if self.train is None:
            raise ConfigError(f"LanguageModelingTask.{what} reads training text: pass train= (texts or batches)")
        return self.train

    def calibration(self) -> list[tuple[Any, Any]] | None:
        """The first ``calibration_batches`` training batches as ``(inputs, input_ids)``; None without train."""
        if self.train is None:
            return None
        return [(b, b["input_ids"]) for b in self.train[:self.calibration_batches]]

    def training_batches(self) -> Iterator[tuple[Any, Any]] | None:
        if self.train is None:
            return None
        return ((b, b["input_ids"]) for b in itertools.cycle(self.train))

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        """Mean next-token NLL of batch ``x`` (a dict with input_ids, or an ids tensor; ``y`` is not read)."""
        batch = x if isinstance(x, dict) else {"input_ids": x, "attention_mask": torch.ones_like(x)}
        nll, n = self._nll(model, {"input_ids": batch["input_ids"],
                                   "attention_mask": batch.get("attention_mask", torch.ones_like(batch["input_ids"]))},
                           "a training batch")
        return nll / max(n, 1)

    def finetune(self, model: nn.Module, steps: int) -> None:
        """``steps`` AdamW steps on the training batches (cycling, in train mode; a NaN loss names its step)."""
        check_module(model)
        steps = as_int(steps, "steps", low=0, hint="the number of optimizer steps")
        if steps == 0:
            return
        train = self._train("finetune")

        def step(opt: torch.optim.Optimizer, n: int) -> None:
            i = self._cursor % len(train)
            self._cursor += 1
            optimizer_step(model, opt, lambda: self.loss(model, shard(train[i]), None),
                           f"finetune step {n} (train batch {i})", self.lr)

        adamw_steps(model, steps, self.lr, self.weight_decay, step)


def _takes_mask(model: nn.Module) -> bool:
    """Whether ``model``'s forward accepts ``attention_mask`` (Hugging Face models do)."""
    return _takes_mask_of(type(model).forward)


@functools.cache
def _takes_mask_of(forward: Any) -> bool:  # (once per model class, not per batch)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


__all__ = ["LanguageModelingTask"]
