"""Exact cost of a plan without touching the model: replay it on a weightless (meta) copy.

Parameters and bytes follow from the plan and the tensor shapes. MACs come from
``torch.utils.flop_counter`` run on a meta-device copy of the model with the plan applied; norm
layers, which the flop counter does not count and which are slow to run on meta tensors, are
swapped for identities in that private copy. Models whose forward needs real values (a Hugging Face
attention mask checked with ``.item()``) fall back to a zeroed copy (parameters zeros, not
copied; :func:`~adaprune.meta.zeroed_copy`), and models whose control flow depends on their weights'
values (mixture-of-experts routing) to a full copy. Each fallback is taken only when it counts the
original model exactly as the real model does. The copies are private and thrown away, so removing
channels from them does not check or update Hugging Face configs.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..layers import is_norm
from ..meta import meta_copy, to_meta, zeroed_copy
from ..plan import Plan
from . import Cost, count


def _strip_norms(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if is_norm(child):
                setattr(mod, child_name, nn.Identity())


MODES = ("meta", "zeroed", "copy")
"""How plans are counted, fastest first: on a meta copy, on a zeroed copy (weights zeros, not
copied), on a full copy. The first that counts the unpruned model as the real model does is used."""


class CostPredictor:
    """Predicts the exact cost of plans for one model (results cached per plan)."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self._cache: dict[str, Cost] = {}
        real = count(model, example_inputs, disk=False)
        self.mode = next((m for m in MODES[:-1] if self._counts_exactly(m, real.macs)), MODES[-1])
        self.original = real

    def _counts_exactly(self, mode: str, macs: int) -> bool:
        self.mode = mode
        try:
            return self._macs(Plan()) == macs
        except Exception:  # noqa: BLE001  (data-dependent control flow cannot run on meta tensors ...)
            return False

    @property
    def use_meta(self) -> bool:
        """Whether plans are counted on a meta copy (the fastest way)."""
        return self.mode == "meta"

    def _macs(self, plan: Plan) -> int:
        from ..surgery.hf_config import configs_unchecked
        from ..surgery.remove import remove

        inputs = self.example_inputs
        if self.mode == "meta":
            clone, inputs = meta_copy(self.model), to_meta(inputs)
        elif self.mode == "zeroed":
            clone = zeroed_copy(self.model)
        else:
            clone = copy.deepcopy(self.model)
        with configs_unchecked():
            remove(clone, plan)
        if self.mode == "meta":
            _strip_norms(clone)
        return count(clone, inputs, disk=False).macs

    def __call__(self, plan: Plan) -> Cost:
        key = plan.to_json()
        if key not in self._cache:
            self._cache[key] = Cost(
                macs=self._macs(plan),
                params=plan.predicted_params(self.model),
                bytes=plan.predicted_bytes(self.model),
            )
        return self._cache[key]
