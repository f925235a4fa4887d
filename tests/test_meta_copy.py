"""The weightless copy used by tracing and cost prediction: a deep copy with parameters on meta."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from adaprune.cost.predict import meta_copy


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_meta_copy_is_an_independent_deep_copy():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[3].weight = shared.weight  # a tie across modules
    model[3].extra = {"note": [1, 2]}  # a plain attribute: deep-copied
    parametrize.register_parametrization(model[4], "weight", _Double())  # custom deepcopy: still handled
    seen = []
    model[1].register_forward_hook(lambda *a: seen.append(1))
    clone = meta_copy(model)
    assert clone[0] is clone[2] and clone[0] is not shared
    assert clone[3].weight is clone[0].weight and clone[0].weight.is_meta
    assert clone[3].extra == {"note": [1, 2]} and clone[3].extra is not model[3].extra
    assert all(t.is_meta for t in clone.state_dict().values())
    assert not any(t.is_meta for t in model.state_dict().values())
    clone[0].register_forward_pre_hook(lambda *a: None)  # hooks on the copy stay on the copy
    assert not model[0]._forward_pre_hooks and len(clone[1]._forward_hooks) == 1
    assert clone[1]._forward_hooks is not model[1]._forward_hooks
    out = clone(torch.randn(2, 4, device="meta"))
    assert out.shape == (2, 4) and seen == [1]  # the copied hook ran (it is the same function)
    assert parametrize.is_parametrized(clone[4], "weight")
