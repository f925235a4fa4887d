"""adapt evaluates no model twice: the working model's metrics are those measured on exactly its weights
(the original's, then each accepted step's); a rolled-back step restores a model already measured and
probed (its probes are not measured again), a probe that leaves the same channels of the same weights as
an earlier one (a step removed only channels that probe masked) is not measured again, and the final
metrics are not measured again."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

import adaprune as ap

torch.manual_seed(0)
X = torch.randn(48, 8)
WIDE = 4 * torch.randn(2048, 8)  # where the model is fingerprinted


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


class Fidelity(ap.Task):
    """Agreement with the original model's outputs; remembers a fingerprint of every model it evaluates."""

    metric, higher_is_better = "fidelity", True

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference
        self.seen: list[str] = []

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            # the model as a function: its outputs on many wide-spread inputs (on a few, channels dead there make
            # distinct models look alike), rounded (a channel masked to zero and the same channel removed give
            # the same model, summed in another order)
            out = torch.round(model(WIDE).double(), decimals=5) + 0.0  # (+ 0.0: no negative zero)
            self.seen.append(hashlib.sha1(out.numpy().tobytes()).hexdigest())
            return {"fidelity": -float(nn.functional.mse_loss(model(X), self.reference))}


def test_no_model_is_evaluated_twice() -> None:
    model = net()
    with torch.no_grad():
        task = Fidelity(model(X))
    res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.3), tolerance=0.005, step=0.5)
    assert any(not h.accepted for h in res.history), "the run should roll a step back (a tighter test)"
    assert len(task.seen) == len(set(task.seen)), "a model was evaluated twice"
    accepted = [h for h in res.history if h.accepted]
    assert res.after == (accepted[-1].metrics if accepted else res.before)


def test_a_rejected_plan_is_never_measured_again(monkeypatch, tmp_path) -> None:
    """An allocation that keeps proposing the plan just rolled back (on the same weights) gets it skipped:
    the step shrinks without measuring it again; a resumed run knows the rejected plans too."""
    from adaprune.adapt.controller import Controller

    real = Controller.allocate
    first: list = []

    def same_plan(self, *args, **kwargs):  # the first proposal, every time
        if not first:
            first.append(real(self, *args, **kwargs))
        return first[0]

    monkeypatch.setattr(Controller, "allocate", same_plan)
    model = net()
    with torch.no_grad():
        task = Fidelity(model(X))
    res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.3), tolerance=0.0, step=0.5, run_dir=tmp_path / "run")
    tried = [h for h in res.history if h.cuts]
    assert len(tried) == 1 and not tried[0].accepted  # measured once, rolled back, never again
    assert len(task.seen) == len(set(task.seen))
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert len(state["rejected"]) == 1 and state["step"] > 1



def test_probes_are_cached_per_weights_lineage_which_recovery_renews(monkeypatch) -> None:
    """The probe cache is keyed by the weights' lineage and the channels a probe leaves: a step that only
    removed channels keeps the lineage (the same channels are the same model), one whose recovery changed
    the surviving weights starts a new one (a probe of the same channels is then another model)."""
    probing = __import__("importlib").import_module("adaprune.adapt.probing")

    class Drifting(Fidelity):
        def finetune(self, model: nn.Module, steps: int) -> None:  # a deterministic change of every weight
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0 + 0.001 * steps)

    lineages: list[int] = []
    real = probing.Prober.run

    def run(self, work, graph, scores, predictor, metrics_now, version, *args, **kwargs):
        lineages.append(version)
        return real(self, work, graph, scores, predictor, metrics_now, version, *args, **kwargs)

    monkeypatch.setattr(probing.Prober, "run", run)
    for task_type, renewed in ((Fidelity, False), (Drifting, True)):
        lineages.clear()
        model = net()
        with torch.no_grad():
            task = task_type(model(X))
        res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.3), tolerance=0.02, step=0.5, finetune_steps=1)
        accepted = sum(h.accepted for h in res.history[:-1])  # (the last step's lineage is not probed)
        assert len(lineages) == len(res.history) >= 2 and accepted >= 1
        if renewed:
            assert lineages == sorted(lineages) and lineages[-1] >= accepted, lineages
        else:
            assert set(lineages) == {0}, lineages
