"""Calling a model on example inputs: the one convention every part of adaprune follows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` the way ``example_inputs`` says: a dict is keywords, a tuple positional args."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def eval_call(model: nn.Module, example_inputs: Any) -> Any:
    """One forward pass in eval mode without gradients; training flags are restored."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    finally:
        for m, flag in was_training.items():
            m.training = flag
