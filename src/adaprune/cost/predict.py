"""Exact cost of a plan without touching the model: replay it on a weightless (meta) copy.

Parameters and bytes follow from the plan and the tensor shapes. MACs come from
``torch.utils.flop_counter`` run on a meta-device copy of the model with the plan applied; norm
layers, which the flop counter does not count and which are slow to run on meta tensors, are
swapped for identities in that private copy. Models whose forward needs real values (data-dependent
control flow) fall back to a real copy.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..layers import is_norm
from ..meta import meta_copy, to_meta
from ..plan import Plan
from . import Cost, count


def _strip_norms(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if is_norm(child):
                setattr(mod, child_name, nn.Identity())


class CostPredictor:
    """Predicts the exact cost of plans for one model (results cached per plan)."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self._cache: dict[str, Cost] = {}
        real = count(model, example_inputs)
        self.use_meta = True
        try:
            meta = self._macs(Plan())
        except Exception:  # noqa: BLE001  (data-dependent control flow cannot run on meta tensors)
            meta = -1
        self.use_meta = meta == real.macs
        self.original = real

    def _macs(self, plan: Plan) -> int:
        from ..surgery.remove import remove

        if self.use_meta:
            clone = meta_copy(self.model)
            remove(clone, plan)
            _strip_norms(clone)
            return count(clone, to_meta(self.example_inputs)).macs
        clone = copy.deepcopy(self.model)
        remove(clone, plan)
        return count(clone, self.example_inputs).macs

    def __call__(self, plan: Plan) -> Cost:
        key = plan.to_json()
        if key not in self._cache:
            self._cache[key] = Cost(
                macs=self._macs(plan),
                params=plan.predicted_params(self.model),
                bytes=plan.predicted_bytes(self.model),
            )
        return self._cache[key]
