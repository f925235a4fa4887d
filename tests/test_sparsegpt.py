"""SparseGPT (``sparsify(importance="sparsegpt")``): the OBS update makes up for what a mask zeroes, so at
high sparsity and at 2:4 it keeps far more of a trained model than magnitude or Wanda; the layer's
input rows reproduce the layer (Linear, Conv1d, Conv2d); the update lives in a parametrization that
undoes exactly; bad input is named and leaves the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError
from adaprune.examples.digits import load_digits_data
from adaprune.surgery.sparsegpt import prune_layer, rows_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    d = load_digits_data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        i = torch.randint(0, len(d.y_train), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(d.x_train[i]), d.y_train[i]).backward()
        opt.step()
    calib = [(d.x_train[i:i + 128], d.y_train[i:i + 128]) for i in range(0, 512, 128)]
    return model.eval(), d, calib


def accuracy(model: nn.Module, d) -> float:
    with torch.no_grad():
        return float((model(d.x_test).argmax(1) == d.y_test).float().mean())


@pytest.mark.parametrize("kw", [{"sparsity": 0.7}, {"pattern": "2:4"}])
def test_sparsegpt_keeps_a_trained_model_where_magnitude_and_wanda_lose_it(digits_mlp, kw):
    base, d, calib = digits_mlp
    dense = accuracy(base, d)
    got = {}
    for importance in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        res = ap.sparsify(model, importance=importance, calibration=calib, **kw)
        assert res.overall == pytest.approx(0.7 if "sparsity" in kw else 0.5, abs=0.01)
        got[importance] = accuracy(model, d)
    assert got["sparsegpt"] >= dense - 0.02, got
    assert got["sparsegpt"] >= max(got["magnitude"], got["wanda"]) + 0.015, got


def correlated(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5  # correlated, of unequal scales, as activations are
    return torch.randn(n, cols, generator=g) @ mix * torch.randn(cols, generator=g).exp()


def test_the_update_lowers_the_layers_output_error_below_its_own_mask_alone_and_below_magnitude():
    x = correlated(512, 40, 0)
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    h = x.T.double() @ x.double() / len(x)
    new, keep = prune_layer(w, h, sparsity=0.6)
    assert float(1 - keep.mean()) == pytest.approx(0.6, abs=0.01)
    assert torch.all(new[keep == 0] == 0)

    def err(v: torch.Tensor) -> float:
        return float(((x @ w.T - x @ v.T) ** 2).mean())

    magnitude = torch.ones_like(w).flatten()
    magnitude[torch.argsort(w.abs().flatten())[:int(0.6 * w.numel())]] = 0
    assert err(new) < 0.9 * err(w * keep)  # the update helps beyond the mask it chose
    assert err(new) < 0.6 * err(w * magnitude.view_as(w))


def test_n_m_holds_in_every_group_and_every_row():
    x = correlated(256, 32, 2)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    new, keep = prune_layer(w, x.T.double() @ x.double(), pattern=(2, 4))
    assert torch.all(keep.view(8, 8, 4).sum(-1) == 2)
    assert torch.all(new[keep == 0] == 0)


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 3, padding=1, stride=2, dilation=1),
                                  nn.Conv2d(3, 5, (3, 2), padding=(1, 0), stride=(1, 2), dilation=(2, 1)),
                                  nn.Linear(7, 5)])
def test_the_input_rows_reproduce_the_layer(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9) if isinstance(conv, nn.Conv1d) else (
        torch.randn(2, 3, 9, 8) if isinstance(conv, nn.Conv2d) else torch.randn(2, 4, 7))
    with torch.no_grad():
        out = conv(x) - (conv.bias.view(-1, *[1] * (x.dim() - 2)) if not isinstance(conv, nn.Linear) else conv.bias)
        rows = rows_of(conv, x) @ conv.weight.reshape(conv.weight.shape[0], -1).double().T
    expect = out.movedim(-1 if isinstance(conv, nn.Linear) else 1, -1).reshape(-1, 5).double()
    assert torch.allclose(rows, expect, atol=1e-5)


def test_the_update_is_undone_exactly_and_baked_in_as_it_runs(digits_mlp):
    base, d, calib = digits_mlp
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ap.sparsify(model, importance="sparsegpt", calibration=calib, sparsity=0.5)
    with torch.no_grad():
        masked = model(d.x_test)
    model[1].parametrizations.weight.original.grad = None
    nn.functional.cross_entropy(model(d.x_test[:8]), d.y_test[:8]).backward()
    assert model[1].parametrizations.weight.original.grad is not None  # fine-tuning reaches the weights
    res.masking.materialize()
    with torch.no_grad():
        assert torch.allclose(model(d.x_test), masked)
    assert float((model[3].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)

    again = copy.deepcopy(base)
    ap.sparsify(again, importance="sparsegpt", calibration=calib, sparsity=0.5).masking.undo()
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())


def test_dead_inputs_and_unsupported_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 6))
    x = torch.randn(32, 4, 4, 4)
    x[:, 1] = 0  # the conv's second channel is dead ...
    res = ap.sparsify(model, importance="sparsegpt", calibration=[(x, None)], sparsity=0.5)
    assert "grouped" in res.skipped["0"]
    assert torch.isfinite(model[2].weight).all() and res.sparsity["2"] == pytest.approx(0.5)


def test_bad_input_is_named_and_changes_nothing(digits_mlp):
    base, _, calib = digits_mlp
    model = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="scope='layer'"):
        ap.sparsify(model, importance="sparsegpt", calibration=calib, sparsity=0.5, scope="global")
    with pytest.raises(ConfigError, match="sparsegpt.*calibration"):
        ap.sparsify(model, importance="sparsegpt", sparsity=0.5)
    bad = calib[:2] + [(torch.randn(4, 3), None)]  # the third batch cannot run: found at the first layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="batch 2"):
        ap.sparsify(model, importance="sparsegpt", calibration=bad, sparsity=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


# -- OWL: per-block fractions from each block's outliers (a layer outside a stack is its own block) ----------------
def outlier_net() -> tuple[nn.Module, list]:
    """Three equal layers; the middle one's inputs carry a few huge channels (outlier features)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight[:3] *= 40.0  # three of the middle layer's input channels are outliers
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(64, 32, generator=g), None) for _ in range(2)]


def test_owl_spares_the_layer_with_outliers_and_keeps_the_overall_sparsity():
    from adaprune.importance import Context, default_loss
    from adaprune.surgery.sparse import OWL_SPREAD, _targets, owl_sparsities

    model, calib = outlier_net()
    fractions = owl_sparsities(model, _targets(model, set()), Context(calib, default_loss), 0.6)
    assert fractions["1"] == min(fractions.values()) < 0.6 - OWL_SPREAD / 2
    assert max(fractions.values()) - min(fractions.values()) == pytest.approx(2 * OWL_SPREAD)
    assert sum(fractions.values()) / 3 == pytest.approx(0.6)  # equal layers: the plain mean
    for importance in ("magnitude", "sparsegpt"):
        m = copy.deepcopy(model)
        res = ap.sparsify(m, importance=importance, calibration=calib, sparsity=0.6, scope="owl")
        assert res.overall == pytest.approx(0.6, abs=0.01)
        assert res.sparsity["1"] == pytest.approx(fractions["1"], abs=1 / 32)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """A stem, three residual blocks in a ModuleList, a head: a transformer's shape in small."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = nn.Linear(32, 32), nn.ModuleList(Block() for _ in range(3)), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_owl_gives_a_block_of_the_stack_one_sparsity_for_all_its_layers():
    """As Yin et al. weigh a transformer layer by all its linear layers' scores, pooled: a block whose layers'
    scores are mostly small beside a few large ones (its second layer scaled down, its first reading outlier
    channels) has the largest outlier share and is spared as a whole, both its layers alike; layers outside the
    stack are units of their own."""
    from adaprune.importance import Context, default_loss
    from adaprune.surgery.sparse import _targets, owl_sparsities, owl_units

    torch.manual_seed(0)
    model = Stack()
    with torch.no_grad():
        model.blocks[0].fc2.weight[:3] *= 40.0  # block 1 reads three outlier channels of the residual stream
        model.blocks[1].fc2.weight.mul_(0.02)  # ... and passes them on scaled down
    layers = _targets(model, set())
    assert owl_units(model, layers) == {"stem": ["stem"], "blocks.0": ["blocks.0.fc1", "blocks.0.fc2"],
                                        "blocks.1": ["blocks.1.fc1", "blocks.1.fc2"],
                                        "blocks.2": ["blocks.2.fc1", "blocks.2.fc2"], "head": ["head"]}
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(64, 32, generator=g), None) for _ in range(2)]
    fractions = owl_sparsities(model, layers, Context(calib, default_loss), 0.6)
    assert fractions["blocks.1.fc1"] == fractions["blocks.1.fc2"] < fractions["blocks.2.fc1"]
    assert fractions["blocks.0.fc1"] == fractions["blocks.0.fc2"] and fractions["blocks.2.fc1"] == fractions["blocks.2.fc2"]
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    assert sum(fractions[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.6)


def test_owl_on_a_stack_end_to_end_and_a_layer_the_data_never_reaches():
    from adaprune.importance import Context, default_loss
    from adaprune.surgery.sparse import _targets, owl_sparsities

    torch.manual_seed(0)
    model = Stack()
    with torch.no_grad():
        model.blocks[0].fc2.weight[:3] *= 40.0
        model.blocks[1].fc2.weight.mul_(0.02)
    model.blocks[2].spare = nn.Linear(32, 32)  # in block 2, never called: scored |w|, not pooled with the others
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(64, 32, generator=g), None) for _ in range(2)]
    fractions = owl_sparsities(model, _targets(model, set()), Context(calib, default_loss), 0.6)
    assert fractions["blocks.2.fc1"] == fractions["blocks.2.fc2"] != fractions["blocks.2.spare"]
    res = ap.sparsify(model, importance="wanda", calibration=calib, sparsity=0.6, scope="owl")
    assert res.overall == pytest.approx(0.6, abs=0.01)
    assert res.sparsity["blocks.1.fc1"] == pytest.approx(res.sparsity["blocks.1.fc2"], abs=1 / 32)
    assert res.sparsity["blocks.1.fc1"] < res.sparsity["blocks.2.fc1"]


def test_owl_needs_data_and_a_fraction():
    model, calib = outlier_net()
    with pytest.raises(ConfigError, match="scope='owl'.*calibration"):
        ap.sparsify(model, sparsity=0.5, scope="owl")
    with pytest.raises(ConfigError, match="scope='owl'.*N:M"):
        ap.sparsify(model, pattern="2:4", scope="owl", calibration=calib)


def test_layers_that_read_one_tensor_share_a_pass_and_get_what_passes_of_their_own_give(monkeypatch):
    """A LLaMA block's q, k and v read one normed hidden state, its gate and up another: 4 calibration passes
    per block instead of 7, and the same pruned weights as one pass per layer."""
    pytest.importorskip("transformers")
    import adaprune.surgery.sparsegpt as sg
    from adaprune.examples.textlm import tiny_llama

    model = tiny_llama(50)
    g = torch.Generator().manual_seed(0)
    calib = [({"input_ids": torch.randint(0, 50, (4, 12), generator=g)}, None) for _ in range(2)]
    passes = []
    model.register_forward_pre_hook(lambda m, a, k: passes.append(1), with_kwargs=True)

    def run(one_per_layer: bool) -> dict[str, torch.Tensor]:
        passes.clear()
        m = copy.deepcopy(model)
        if one_per_layer:  # the reference: every layer its own pass
            real = sg.hessians
            monkeypatch.setattr(sg, "hessians", lambda model, name, later, batches: real(model, name, [], batches))
        ap.sparsify(m, importance="sparsegpt", calibration=calib, sparsity=0.5,
                    blockwise=False).masking.materialize()  # (passes of the whole model, counted)
        monkeypatch.undo()
        return {k: v.clone() for k, v in m.state_dict().items()}, len(passes)

    shared, shared_passes = run(False)
    alone, alone_passes = run(True)
    assert all(torch.equal(shared[k], alone[k]) for k in alone)
    layers = 2 * 7 + 1  # 7 Linear per block and the output layer
    assert alone_passes == 2 * layers and shared_passes == 2 * (2 * 4 + 1)
