"""A failed or interrupted call leaves the model as it was (the issue's family 3).

Each test failed before: ``prune(refit=True)`` committed its cut before the refit raised,
``KeyboardInterrupt`` during surgery left a half-pruned model, and ``adapt`` applied its result to the
user's model before the final evaluation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError
from small_nets import Net

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def make() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def fingerprint(model: nn.Module) -> dict[str, tuple[int, tuple[int, ...], torch.Tensor]]:
    """Identity, shape and values of every tensor, and the modules' size attributes."""
    out = {n: (id(t), tuple(t.shape), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    out.update({f"{n}.attrs": (0, (), torch.tensor([getattr(m, a, -1) for a in ("in_channels", "out_channels",
                                                                                "in_features", "out_features",
                                                                                "num_features")]))
                for n, m in model.named_modules()})
    return out


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after.keys() == before.keys()
    for name, (ident, shape, values) in before.items():
        assert after[name][0] == ident, f"{name} is another object"
        assert after[name][1] == shape, name
        assert torch.equal(after[name][2], values), name


def test_prune_refit_with_a_bad_calibration_batch_changes_nothing():
    model = make()
    before = fingerprint(model)
    bad = [(torch.randn(2, 5, 8, 8), torch.zeros(2, dtype=torch.long))]  # 5 channels, the model takes 3
    with pytest.raises(ConfigError, match="calibration batch 0"):
        ap.prune(model, X, ratio=0.5, ignore=[model.head], refit=True, calibration=bad)
    assert_unchanged(model, before)


def test_an_interrupt_during_the_surgery_check_restores_the_model():
    model = make()
    before = fingerprint(model)
    plan = ap.prune(make(), X, ratio=0.5, ignore=["head"]).plan

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ap.remove(model, plan, check=interrupted)
    assert_unchanged(model, before)


def test_an_interrupt_after_the_cut_inside_prune_restores_the_model(monkeypatch):
    from adaprune import api

    model = make()
    before = fingerprint(model)
    calls = []

    def counted_call(*args, **kwargs):  # the check's counting pass on the cut model
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "counted_call", counted_call)
    with pytest.raises(KeyboardInterrupt):
        ap.prune(model, X, ratio=0.5, ignore=[model.head])
    assert calls
    assert_unchanged(model, before)


def test_release_mode_rollback_is_exact_even_after_an_in_place_change_of_the_new_weights():
    from adaprune.surgery.remove import removal

    model = make()
    before = fingerprint(model)
    plan = ap.prune(make(), X, ratio=0.5, ignore=["head"]).plan
    with pytest.raises(RuntimeError, match="late failure"), removal(model, plan, release=True):
        model.c2.weight.data = torch.zeros_like(model.c2.weight)  # the body may assign new storage
        raise RuntimeError("late failure")
    assert_unchanged(model, before)


class Task:
    metric, higher_is_better = "score", True

    def __init__(self, fail_after: int | None = None, interrupt: bool = False) -> None:
        self.calls, self.fail_after, self.interrupt = 0, fail_after, interrupt

    def evaluate(self, model):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            if self.interrupt:
                raise KeyboardInterrupt
            raise RuntimeError("evaluation failed")
        with torch.no_grad():
            return {"score": float(-model(X).abs().mean())}

    def finetune(self, model, steps):  # every value changes, the layers no cut touches included
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)


def test_adapt_measures_the_result_before_touching_the_model():
    model = make()
    before = fingerprint(model)
    probe = Task()
    ap.adapt(copy.deepcopy(model), X, probe, ap.Budget(macs=0.7), tolerance=0.9, ignore=["head"],
             max_iterations=2, reconstruct=False)
    for interrupt in (False, True):  # the run's very last evaluation fails / is interrupted
        task = Task(fail_after=probe.calls - 1, interrupt=interrupt)
        with pytest.raises(KeyboardInterrupt if interrupt else RuntimeError):
            ap.adapt(model, X, task, ap.Budget(macs=0.7), tolerance=0.9, ignore=["head"], max_iterations=2,
                     reconstruct=False)
        assert_unchanged(model, before)


def test_an_interrupt_while_adapt_applies_its_result_restores_the_model(monkeypatch):
    import contextlib
    import sys

    adapt_module = sys.modules["adaprune.adapt"]
    model = make()
    before = fingerprint(model)
    real = adapt_module.removal

    def removal(*args, **kwargs):  # the result is cut into the model, then an interrupt arrives
        with real(*args, **kwargs) as cut:
            yield cut
            raise KeyboardInterrupt

    monkeypatch.setattr(adapt_module, "removal", contextlib.contextmanager(removal))
    with pytest.raises(KeyboardInterrupt):
        ap.adapt(model, X, Task(), ap.Budget(macs=0.7), tolerance=0.9, ignore=["head"], max_iterations=2,
                 reconstruct=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"model": "net"}, "model"), ({"plan": {"removals": {}}}, "plan"), ({"check": 3}, "check"),
     ({"expected_shapes": "(1, 4)"}, "expected_shapes"), ({"commit": "no"}, "commit"), ({"release": 2}, "release")],
)
def test_remove_checks_its_arguments_before_cutting(kwargs, field):
    from adaprune.errors import ArgumentTypeError

    model = make()
    before = fingerprint(model)
    plan = ap.prune(make(), X, ratio=0.5, ignore=["head"]).plan
    args = {"model": model, "plan": plan, **kwargs}
    with pytest.raises(ArgumentTypeError, match=field):
        ap.remove(args.pop("model"), args.pop("plan"), **args)
    assert_unchanged(model, before)
