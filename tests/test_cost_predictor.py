"""The cost predictor counts a plan's MACs on a private copy, fastest first (meta, zeroed, full copy),
and every way gives the MACs the really pruned model has.

- a model that runs on meta tensors is counted on a meta copy;
- a Hugging Face BERT (its attention mask is checked with ``.item()``, which meta tensors refuse) and a
  model branching on its input's values are counted on a zeroed copy (weights zeros, not copied);
- a model whose control flow reads its weights' values is counted on a full copy (a zeroed copy
  would take the other branch);
- the private copies neither check nor mark Hugging Face configs, and a real prune afterwards still
  updates its config.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprune as ap
from adaprune.cost.predict import CostPredictor


def pruned_macs(model: nn.Module, x: object, plan: ap.Plan) -> int:
    real = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a pruned BERT's config cannot state every size: not what is tested
        ap.apply_plan(real, plan, x)
    return ap.count(real, x).macs


def plans(model: nn.Module, x: object, ignore: list[str]) -> list[ap.Plan]:
    out = []
    for macs in (0.35, 0.6, 0.85):
        trial = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(ap.prune(trial, x, budget=ap.Budget(macs=macs), allocation="uniform",
                                ignore=[trial.get_submodule(n) for n in ignore]).plan)
    return out


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


class InputBranch(Mlp):
    """Runs ``b`` only when the input's sum is positive (``.item()`` on the input: no meta run)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        if x.sum().item() > 0:
            h = F.relu(self.b(h))
        return self.head(h)


class WeightBranch(Mlp):
    """Runs ``b`` only when a flag parameter is exactly all ones: a zeroed copy's flag is not."""

    def __init__(self) -> None:
        super().__init__()
        self.flag = nn.Parameter(torch.ones(256), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        if bool((self.flag == 1.0).all()):
            h = F.relu(self.b(h))
        return self.head(h)


@pytest.mark.parametrize(("cls", "mode"), [(Mlp, "meta"), (InputBranch, "zeroed"), (WeightBranch, "copy")])
def test_the_fastest_exact_way_is_chosen_and_counts_what_the_pruned_model_has(cls: type[Mlp], mode: str) -> None:
    torch.manual_seed(0)
    model, x = cls().eval(), torch.rand(4, 8) + 0.1
    predictor = CostPredictor(model, x)
    assert predictor.mode == mode
    assert predictor.original.macs == ap.count(model, x).macs
    for plan in plans(model, x, ["head"]):
        assert plan.removals
        assert predictor(plan).macs == pruned_macs(model, x, plan)


def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return model, x


def test_bert_is_counted_on_an_zeroed_copy_without_touching_configs() -> None:
    model, x = bert()
    config = model.config.to_dict()
    predictor = CostPredictor(model, x)
    assert predictor.mode == "zeroed"  # meta tensors refuse the attention mask's .item()
    cases = plans(model, x, ["pooler"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnsaveableConfigWarning from the private copies
        predicted = [predictor(plan).macs for plan in cases]
    assert model.config.to_dict() == config
    assert predicted == [pruned_macs(model, x, plan) for plan in cases]
    assert len(set(predicted)) == 3
    # outside the predictor, a removal still writes the new sizes into the config (or marks it)
    real = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap.apply_plan(real, cases[0], x)
    assert real.config.to_dict() != config
