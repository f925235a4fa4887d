"""Tracing leaves nothing behind (hooks, modes, stand-ins) on any path, and TorchScript parts are frozen."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import TraceError
from adaprune.graph import UnsupportedOpWarning, trace


def _clean(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, f"hooks left on {name!r}"
    assert torch._C._len_torch_function_stack() == 0


def _script(module: nn.Module, how: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch
        if how == "script":
            return torch.jit.script(module)
        return torch.jit.trace(module, torch.randn(1, 8, 6, 6))


class WithScripted(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.s = _script(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), how)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.s(self.c1(torch.relu(self.c0(x)))))


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("on_meta", [True, False])
def test_a_torchscript_submodule_is_frozen_with_a_warning_naming_it(how, on_meta):
    torch.manual_seed(0)
    model = WithScripted(how)
    scripted = model.s
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UnsupportedOpWarning, match=r"'s'.*TorchScript.*eager"):
        graph = trace(model, x, on_meta=on_meta)
    _clean(model)
    assert model.s is scripted and model._modules["s"] is scripted
    assert any(f.module == "s" and f.op == "torchscript" for f in graph.frozen)
    # what flows into the scripted module keeps its width; the rest of the model stays prunable
    slots = {(s.tensor, s.dim) for g in graph.groups for s in g.slots}
    assert ("c0.weight", 0) in slots and ("c1.weight", 1) in slots
    assert not {("c1.weight", 0), ("s.0.weight", 0), ("s.0.weight", 1), ("c2.weight", 1)} & slots
    assert not any(tensor.startswith("s.") for tensor, _ in slots)


def test_prune_runs_around_a_scripted_submodule():
    torch.manual_seed(0)
    model = WithScripted("script")
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in model.s.state_dict().items()}
    with pytest.warns(UnsupportedOpWarning, match="'s'"):
        ap.prune(model, x, ratio=0.5)
    _clean(model)
    assert model.c0.out_channels == 4 and model.c1.in_channels == 4 and model.c1.out_channels == 8
    assert all(torch.equal(v, model.s.state_dict()[k]) for k, v in before.items())
    assert model(x).shape == (2, 4, 6, 6)


def test_a_scripted_model_is_refused_with_the_fix():
    model = _script(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()), "script")
    with pytest.raises(TraceError, match=r"TorchScript.*eager nn.Module"):
        trace(model, torch.randn(1, 8, 6, 6))
    _clean(model)


class Failing(nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(self.conv(x))
        raise self.exc


@pytest.mark.parametrize("on_meta", [True, False])
def test_hooks_and_mode_are_removed_when_the_model_raises(on_meta):
    model = Failing(RuntimeError("boom")).train()
    with pytest.raises(TraceError, match="boom"):
        trace(model, torch.randn(1, 3, 6, 6), on_meta=on_meta)
    _clean(model)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("on_meta", [True, False])
def test_hooks_and_mode_are_removed_on_keyboard_interrupt(on_meta):
    model = Failing(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        trace(model, torch.randn(1, 3, 6, 6), on_meta=on_meta)
    _clean(model)


class NoHooks(nn.Module):
    def register_forward_hook(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        raise RuntimeError("this module takes no hooks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_module_refusing_hooks_is_named_and_earlier_hooks_are_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), NoHooks()), nn.Conv2d(4, 2, 3))
    with pytest.raises(TraceError, match=r"'1\.1' \(NoHooks\).*takes no hooks"):
        trace(model, torch.randn(1, 3, 8, 8), on_meta=False)
    _clean(model)
