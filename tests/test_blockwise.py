"""Block-by-block calibration (adaprune.surgery.blockwise) and in-place sparsity (sparsify(inplace=True))."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError

pytest.importorskip("transformers")


def llama():
    from adaprune.examples.textlm import tiny_llama

    return tiny_llama(50)


def calib(n: int = 3, vocab: int = 50):
    g = torch.Generator().manual_seed(0)
    return [({"input_ids": torch.randint(0, vocab, (4, 12), generator=g)}, None) for _ in range(n)]


def bert():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def spill_dir(tmp_path, monkeypatch):
    """A temporary directory of this test's own for the originals sparsify(inplace=True) keeps on disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def spilled(where: Path) -> set[str]:
    return {p.name for p in where.glob("adaprune-originals-*")}


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_block_by_block_gives_the_weights_of_whole_model_passes(pattern):
    model = llama()
    kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    out = {}
    for blockwise in (False, True):
        m = copy.deepcopy(model)
        ap.sparsify(m, importance="sparsegpt", calibration=calib(), blockwise=blockwise, **kw).masking.materialize()
        out[blockwise] = weights(m)
    assert all(torch.allclose(out[True][k], out[False][k], atol=1e-6) for k in out[False])
    changed = [k for k in out[True] if "layers.1" in k and not torch.equal(out[True][k], model.state_dict()[k])]
    assert changed  # (the second block was pruned too)


def test_block_by_block_runs_the_whole_model_once_per_batch_and_once_to_check_the_chain():
    model = llama()
    passes = []
    model.register_forward_pre_hook(lambda m, a, k: passes.append(1), with_kwargs=True)
    batches = calib(3)
    ap.sparsify(model, importance="sparsegpt", calibration=batches, sparsity=0.5, ignore=["lm_head"])
    assert len(passes) == 1 + len(batches)
    passes.clear()
    ap.sparsify(copy.deepcopy(model), importance="sparsegpt", calibration=batches, sparsity=0.5,
                ignore=["lm_head"], blockwise=False)
    assert len(passes) == len(batches) * 2 * 4  # four passes per block of two, each over every batch


def test_wanda_block_by_block_scores_later_blocks_on_the_pruned_earlier_ones():
    """The first block sees the dense model's inputs either way; the second sees the pruned first block's
    outputs only block by block (as the Wanda authors' code does)."""
    model = llama()
    masks = {}
    for blockwise in (False, True):
        m = copy.deepcopy(model)
        res = ap.sparsify(m, importance="wanda", calibration=calib(), sparsity=0.5, blockwise=blockwise)
        res.masking.materialize()
        masks[blockwise] = {k: v == 0 for k, v in weights(m).items() if k.endswith("proj.weight")}
    first = [k for k in masks[True] if ".layers.0." in k]
    second = [k for k in masks[True] if ".layers.1." in k]
    assert all(torch.equal(masks[True][k], masks[False][k]) for k in first)
    assert any(not torch.equal(masks[True][k], masks[False][k]) for k in second)


def test_bert_encoder_layers_with_an_attention_mask_chain():
    model = bert()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    batches = [({"input_ids": ids, "attention_mask": mask}, None)] * 2
    out = {}
    for blockwise in (False, True):
        m = copy.deepcopy(model)
        ap.sparsify(m, importance="sparsegpt", calibration=batches, sparsity=0.5, blockwise=blockwise,
                    ignore=["pooler.dense"]).masking.materialize()
        out[blockwise] = weights(m)
    assert all(torch.allclose(out[True][k], out[False][k], atol=1e-6) for k in out[False])


@pytest.mark.parametrize("importance", ["magnitude", "wanda", "sparsegpt"])
def test_in_place_gives_the_materialized_weights_and_keeps_no_copy(importance, spill_dir, monkeypatch):
    import adaprune.surgery.sequential as seq

    made = []
    real = seq.Originals.keep
    monkeypatch.setattr(seq.Originals, "keep", lambda self, n, w: (made.append(self.dir), real(self, n, w)))
    model = llama()
    ref = copy.deepcopy(model)
    res_ref = ap.sparsify(ref, importance=importance, calibration=calib(), sparsity=0.5)
    res_ref.masking.materialize()
    made.clear()  # (the reference kept its originals in memory)
    res = ap.sparsify(model, importance=importance, calibration=calib(), sparsity=0.5, inplace=True)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    got, want = weights(model), weights(ref)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert res.sparsity == pytest.approx(res_ref.sparsity)
    assert made and all(d is not None and d.parent == spill_dir for d in made)  # kept on disk ...
    assert spilled(spill_dir) == set()  # ... and gone
    with pytest.raises(ConfigError, match="inplace=True"):
        res.masking.undo()


def test_a_failure_half_way_puts_every_original_back_and_removes_the_copies(monkeypatch, spill_dir):
    import adaprune.surgery.sparsegpt as sg

    model = llama()
    original = weights(model)
    real, calls = sg.prune_layer, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 9:  # in the second block
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(sg, "prune_layer", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ap.sparsify(model, importance="sparsegpt", calibration=calib(), sparsity=0.5, inplace=True)
    assert all(torch.equal(v, original[k]) for k, v in weights(model).items())
    assert spilled(spill_dir) == set()


class Parallel(nn.Module):
    """A ModuleList whose members read the same input: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(3))

    def forward(self, x):
        return sum(h(x) for h in self.heads)


def test_a_module_list_that_is_not_a_chain_is_run_whole_or_refused():
    torch.manual_seed(0)
    model = Parallel()
    batches = [(torch.randn(16, 8), None) for _ in range(2)]
    auto, whole = copy.deepcopy(model), copy.deepcopy(model)
    ap.sparsify(auto, importance="sparsegpt", calibration=batches, sparsity=0.5).masking.materialize()
    ap.sparsify(whole, importance="sparsegpt", calibration=batches, sparsity=0.5,
                blockwise=False).masking.materialize()
    assert all(torch.equal(a, b) for a, b in zip(weights(auto).values(), weights(whole).values()))
    with pytest.raises(ConfigError, match="heads: block 1 does not read block 0's output"):
        ap.sparsify(copy.deepcopy(model), importance="sparsegpt", calibration=batches, sparsity=0.5, blockwise=True)


def test_bad_options_are_refused_with_the_model_unchanged():
    model = llama()
    original = weights(model)
    with pytest.raises(ConfigError, match="blockwise='yes'"):
        ap.sparsify(model, sparsity=0.5, blockwise="yes")
    with pytest.raises(ConfigError, match="needs the whole model"):
        ap.sparsify(model, importance="wanda", scope="global", sparsity=0.5, calibration=calib(), blockwise=True)
    with pytest.raises(ConfigError, match="no decoder stack"):
        ap.sparsify(nn.Sequential(nn.Linear(4, 4)), importance="wanda", sparsity=0.5, blockwise=True,
                    calibration=[(torch.randn(2, 4), None)])
    assert all(torch.equal(v, original[k]) for k, v in weights(model).items())


def test_global_scope_in_place_bakes_its_masks_in():
    model = llama()
    ref = copy.deepcopy(model)
    ap.sparsify(ref, importance="magnitude", scope="global", sparsity=0.5).masking.materialize()
    res = ap.sparsify(model, importance="magnitude", scope="global", sparsity=0.5, inplace=True)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(weights(model).values(), weights(ref).values()))
    assert res.overall == pytest.approx(0.5, abs=0.01)
