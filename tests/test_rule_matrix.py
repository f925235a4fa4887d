"""Every graph rule name has a traced example (issue 12): the registry-driven rule matrix.

For each name in ``adaprune.graph.registry.RULES`` the catalogue (``op_catalogue.py``) holds a small
model whose forward runs that op on prunable channels. Each case checks that tracing hands a call of
*exactly that name* to the registered rule (the rule is wrapped to record it), then prunes at ratio 0.5:
the model still runs with unchanged output shapes, what the catalogue says prunes does prune (and
what pins by design does not), no cut needed rescuing by the check after surgery, and where the cut
channels are exact, the pruned model computes what the original computes with them masked (which
catches a wrong coupling, not only a crash). A new rule name without an example, or an example for a
name no longer registered, fails ``test_catalogue_covers_every_rule``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import adaprune as ap
import adaprune.graph.rules  # registers every rule
from adaprune.graph import UnsupportedOpWarning
from adaprune.graph.registry import RULES, op_name
from op_catalogue import ALIASED, CATALOGUE, DEAD, Example

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _strict_trace(monkeypatch):
    """A rule that raises fails the test instead of freezing the channels it touches."""
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


def _run(model: torch.nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _case(name: str) -> Any:
    ex = CATALOGUE[name]
    marks = [pytest.mark.xfail(strict=True, reason=ex.xfail)] if ex.xfail else []
    return pytest.param(name, id=name, marks=marks)


# --------------------------------------------------------------------------------------------------
# the catalogue matches the registry
# --------------------------------------------------------------------------------------------------


def test_catalogue_covers_every_rule() -> None:
    missing = sorted(set(RULES) - set(CATALOGUE))
    stale = sorted(set(CATALOGUE) - set(RULES))
    assert not missing, f"rule names without an example in tests/op_catalogue.py: {missing}"
    assert not stale, f"examples for names no rule is registered under: {stale}"
    assert len(RULES) > 500  # the registry was filled (a registration that silently fails shows here)


_HOMES = (torch, torch.Tensor, F, torch._C._nn, torch._VF)


def test_dead_names_have_no_torch_callable() -> None:
    """The names exercised through stand-ins: no torch callable is named so, or the one that is
    (``Tensor.__add__``) dispatches under another name. If torch gains one, give it a real example."""
    assert DEAD == {n for n, ex in CATALOGUE.items() if ex.synthetic}
    named = []
    for name in sorted(DEAD):
        for home in _HOMES:
            fn = getattr(home, name, None)
            if fn is not None and name not in ALIASED:
                named.append(f"{getattr(home, '__name__', home)}.{name}")
    assert not named, f"torch has these now; replace their stand-ins with real calls: {named}"


class _Record(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(op_name(func))
        return func(*args, **(kwargs or {}))


def _alias_call(name: str) -> Any:
    if name.startswith("upsample"):
        return lambda: getattr(F, name)(torch.rand(1, 2, 3, 3), scale_factor=2)
    a = torch.rand(3, 3)
    args: tuple[Any, ...] = () if name in ("__abs__", "__neg__", "__pos__") else (torch.rand(3, 3),)
    if name in ("__rand__", "__ror__", "__rxor__"):
        a, args = a > 0.5, (True,)
    return lambda: getattr(torch.Tensor, name)(a, *args)


@pytest.mark.parametrize("name", sorted(ALIASED))
def test_aliased_names_dispatch_under_another_name(name: str) -> None:
    """``Tensor.__add__`` (recorded as ``add``), ``F.upsample`` (calls ``interpolate``) and the like never
    reach the rule registered under their own name; the matrix reaches those rules with stand-ins."""
    call = _alias_call(name)
    rec = _Record()
    with rec, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # F.upsample is deprecated
        call()
    assert rec.names and name not in rec.names, rec.names


def _callables() -> list[Any]:
    """(where, name) for every torch / Tensor / functional callable named like a rule."""
    out = []
    for where, home in (("torch", torch), ("torch.Tensor", torch.Tensor), ("F", F)):
        for name in sorted(RULES):
            if name.startswith("__") and home is not torch.Tensor:
                continue  # a module's own dunders (object.__eq__ ...)
            if callable(getattr(home, name, None)):
                out.append(pytest.param(where, name, id=f"{where}.{name}"))
    return out


@pytest.mark.parametrize(("where", "name"), _callables())
def test_torch_callables_named_like_a_rule_reach_a_rule(where: str, name: str) -> None:
    """Calling ``torch.<name>`` / ``Tensor.<name>`` / ``F.<name>`` must reach some rule: the name it is
    normalised to (itself, or an alias such as ``Tensor.__abs__`` -> ``abs``) is registered."""
    home = {"torch": torch, "torch.Tensor": torch.Tensor, "F": F}[where]
    assert op_name(getattr(home, name)) in RULES, op_name(getattr(home, name))


# --------------------------------------------------------------------------------------------------
# one case per rule name
# --------------------------------------------------------------------------------------------------


def _warns(ex: Example) -> contextlib.AbstractContextManager[Any]:
    return pytest.warns(UnsupportedOpWarning) if ex.warns else contextlib.nullcontext()


@pytest.mark.parametrize("name", [_case(n) for n in sorted(CATALOGUE)])
def test_rule(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = CATALOGUE[name]
    model, x = ex.build()
    rule = RULES[name]
    seen: list[str] = []

    def spy(state: Any, call: Any) -> None:
        seen.append(call.name)
        rule(state, call)

    monkeypatch.setitem(RULES, name, spy)
    with ex.context():
        original = copy.deepcopy(model)
        y0 = _run(model, x)
        with _warns(ex):
            ap.trace(model, x)
        assert seen, f"tracing the example never handed a call of {name!r} to its rule"
        with _warns(ex):
            res = ap.prune(model, x, ratio=0.5)
        y1 = _run(model, x)

    assert y1.shape == y0.shape, f"{name}: the output shape changed from {tuple(y0.shape)} to {tuple(y1.shape)}"
    assert torch.isfinite(y1).all()
    rescued = [f.reason for f in res.frozen if f.op == "surgery check"]
    assert not rescued, f"{name}: the trace coupled channels whose cut breaks the model: {rescued}"
    if not ex.prunes:
        assert res.plan.is_empty, f"{name}: expected the op to pin the channels, but the plan cuts some"
        return
    assert not res.plan.is_empty, f"{name}: nothing was pruned: {res.reason}"
    assert res.after.params < res.before.params
    dim = 1 if isinstance(model.stem, (torch.nn.Embedding, torch.nn.EmbeddingBag)) else 0
    assert model.stem.weight.shape[dim] < original.stem.weight.shape[dim], "the stem's channels were not cut"
    cut = [g.name for g in res.plan.groups if g.removed]
    if ex.exact and all(res.graph.group(g).exact for g in cut):
        # removing channels and zeroing them give the same outputs when nothing spans them
        with ex.context():
            handle = ap.mask(original, res.plan)
            try:
                ym = _run(original, x)
            finally:
                handle.undo()
        torch.testing.assert_close(y1, ym, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: pruned != masked: {m}")
