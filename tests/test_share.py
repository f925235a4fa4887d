"""ap.share: k-means weight sharing on the real digits CNN (and torchvision's resnet18)."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import adaprune as ap
from adaprune.errors import ArgumentTypeError, ConfigError
from adaprune.examples.digits import DigitsCNN, load_digits_data, train
from adaprune.importance.data import taylor_elements

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test (conftest's)."""


@pytest.fixture(scope="module")
def digits():
    """A digits CNN of width 8 trained 3 epochs (seed 0), its data, and its dense validation accuracy."""
    torch.set_num_threads(1)
    data = load_digits_data(0)
    torch.manual_seed(0)
    model = DigitsCNN(8)
    train(model, data, epochs=3)
    return model, data, accuracy(model, data)


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.x_val).argmax(1) == data.y_val).float().mean())


def train_loss(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.x_train), data.y_train))


def fresh(digits) -> nn.Module:
    return copy.deepcopy(digits[0])


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def calibration(data, size: int = 128) -> list:
    return [(data.x_train[i : i + size], data.y_train[i : i + size]) for i in range(0, len(data.y_train), size)]


def test_four_bits_keep_accuracy_with_sixteen_values_per_layer(digits):
    """One codebook per layer: at most 16 values each. Measured (seed 0): 94.2% -> 91.1%; the first conv
    (72 weights, a BatchNorm after it) loses most of that, so the bound here is 4 points; per channel
    (next tests) stays within about a point."""
    model, data, dense = fresh(digits), digits[1], digits[2]
    res = ap.share(model, bits=4)
    assert set(res.layers) == set(layers(model)) and not res.skipped
    for name, mod in layers(model).items():
        assert parametrize.is_parametrized(mod, "weight"), name
        values = torch.unique(mod.weight.detach())
        assert 4 < values.numel() <= 16, name
        assert res.layers[name].centroids == values.numel() and res.layers[name].bits == 4
        assert 0 < res.layers[name].error < 0.2
    assert dense - accuracy(model, data) <= 0.04, (accuracy(model, data), dense)
    assert "4 bits" in res.summary() and "features.3" in res.summary()


def test_two_bits_lose_more_than_four(digits):
    data, dense = digits[1], digits[2]
    four, two = fresh(digits), fresh(digits)
    r4, r2 = ap.share(four, bits=4), ap.share(two, bits=2)
    for name in r4.layers:
        assert r2.layers[name].error > r4.layers[name].error, name
        assert torch.unique(layers(two)[name].weight.detach()).numel() <= 4
    assert dense - accuracy(two, data) > dense - accuracy(four, data) + 0.05


def test_per_channel_codebooks_keep_accuracy_within_a_point(digits):
    model, data, dense = fresh(digits), digits[1], digits[2]
    by_layer = ap.share(fresh(digits), bits=4).layers
    res = ap.share(model, bits=4, scope="channel")
    assert "left exact" in res.skipped["features.0"]  # 9 weights per channel: kept as they are
    assert torch.equal(model.features[0].weight, digits[0].features[0].weight)
    assert set(res.layers) == set(layers(model)) - {"features.0"}
    wider = 0
    for name in res.layers:
        w = layers(model)[name].weight.detach()
        assert res.layers[name].groups == w.shape[0]
        for row in w.reshape(w.shape[0], -1):
            assert torch.unique(row).numel() <= 16, name
        wider += torch.unique(w).numel() > 16
        assert res.layers[name].error < by_layer[name].error, name
    assert wider >= 3  # the channels' codebooks differ: more than 16 values per layer
    assert dense - accuracy(model, data) <= 0.015, (accuracy(model, data), dense)


def test_importance_weighted_kmeans_lowers_weighted_error(digits):
    data = digits[1]
    cal = calibration(data)
    probe = fresh(digits)
    imp = taylor_elements(probe, cal, nn.functional.cross_entropy)
    plain, weighted = fresh(digits), fresh(digits)
    ap.share(plain, bits=2)
    res = ap.share(weighted, bits=2, calibration=cal)

    def weighted_error(model: nn.Module, name: str) -> float:
        mod = layers(model)[name]
        orig = mod.parametrizations["weight"].original.detach().double()
        return float((imp[f"{name}.weight"] * (mod.weight.detach().double() - orig) ** 2).sum())

    better = 0
    for name in layers(probe):
        a, b = weighted_error(weighted, name), weighted_error(plain, name)
        assert a <= b * 1.0001, name
        better += a < 0.99 * b
        w = layers(weighted)[name].parametrizations["weight"].original.detach().double()
        rel = math.sqrt(a / float((imp[f"{name}.weight"] * w**2).sum()))
        assert res.layers[name].weighted_error == pytest.approx(rel, rel=1e-6)
    assert better >= 3


def test_calibration_without_targets(digits):
    model = fresh(digits)
    res = ap.share(model, bits=2, calibration=[digits[1].x_train[:256]])
    assert all(s.weighted_error is not None for s in res.layers.values())
    plain = fresh(digits)
    ap.share(plain, bits=2)
    assert not torch.equal(model.features[3].weight, plain.features[3].weight)  # the weights changed the fit


def test_undo_restores_bit_identical_weights(digits):
    model = fresh(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.named_parameters())
    res = ap.share(model, bits=3, scope="channel")
    assert res.active and any(parametrize.is_parametrized(m) for m in model.modules())
    res.undo()
    assert not res.active and not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    res.undo()  # twice is harmless


def test_bake_gives_a_plain_module_with_the_same_outputs(digits):
    model, x = fresh(digits), digits[1].x_val
    keys = list(model.state_dict())
    res = ap.share(model, bits=4)
    with torch.no_grad():
        shared = model(x)
    res.bake()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(type(m).__name__ in {"DigitsCNN", "Sequential"} or type(m).__module__.startswith("torch.nn")
               for m in model.modules())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), shared, rtol=0, atol=1e-6)
    for mod in layers(model).values():
        assert isinstance(mod.weight, nn.Parameter) and torch.unique(mod.weight.detach()).numel() <= 16


def test_finetuning_codebooks_helps_at_two_bits(digits):
    data = digits[1]
    base, tuned = fresh(digits), fresh(digits)
    ap.share(base, bits=2)
    stats = {k: v.clone() for k, v in tuned.state_dict().items() if "running" in k}
    res = ap.share(tuned, bits=2, finetune=(data.loader("train", batch_size=64), 60, 3e-3))
    assert res.finetuned
    assert train_loss(tuned, data) < train_loss(base, data) - 0.05
    assert accuracy(tuned, data) >= accuracy(base, data)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in stats.items())  # BN stats untouched
    for name, mod in layers(tuned).items():
        assert torch.unique(mod.weight.detach()).numel() <= 4, name
        assert torch.equal(mod.parametrizations["weight"][0].indices, layers(base)[name].parametrizations["weight"][0].indices)
        assert mod.parametrizations["weight"][0].codebook.grad is None
    assert all(p.grad is None for p in tuned.parameters())


def test_storage_is_an_eighth_at_four_bits(digits):
    model = fresh(digits)
    res = ap.share(model, bits=4)
    numel = {n: m.weight.numel() for n, m in layers(model).items()}
    assert res.bytes_before == 4 * sum(numel.values())
    assert res.bytes_after == sum(-(-(n * 4 + 16 * 32) // 8) for n in numel.values())
    assert 0.125 < res.ratio < 0.14
    assert res.layers["features.10"].bits_after == numel["features.10"] * 4 + 16 * 32
    idx = layers(model)["fc"].parametrizations["weight"][0].indices
    assert idx.dtype == torch.uint8 and idx.shape == (10, 32)
    assert isinstance(res.codebooks()["fc"], nn.Parameter) and res.codebooks()["fc"].shape == (1, 16)


def test_ignored_and_exact_layers_are_not_shared(digits):
    model = fresh(digits)
    res = ap.share(model, bits=4, ignore=[model.fc, "features.0"])
    assert set(res.skipped) == {"fc", "features.0"}
    assert not parametrize.is_parametrized(model.fc) and not parametrize.is_parametrized(model.features[0])
    assert parametrize.is_parametrized(model.features[3])
    assert not any(parametrize.is_parametrized(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    few = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    with torch.no_grad():
        few[0].weight.copy_(torch.tensor([-1.0, 0.0, 2.0]).repeat(10)[: 30].reshape(5, 6))
    res = ap.share(few, bits=2)
    assert "no more than 4 distinct" in res.skipped["0"] and "1" in res.layers
    assert not parametrize.is_parametrized(few[0])


def test_interrupted_sharing_leaves_the_model_as_it_was(digits):
    model = fresh(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def stop(m, codebooks):
        assert len(codebooks) == 5 and parametrize.is_parametrized(m.fc)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ap.share(model, bits=4, finetune=stop)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"bits": 0}, ConfigError, "bits=0"),
        ({"bits": 9}, ConfigError, "bits=9"),
        ({"bits": 4.0}, ArgumentTypeError, "bits=4.0"),
        ({"bits": True}, ArgumentTypeError, "bits=True"),
        ({"scope": "row"}, ConfigError, "scope='row'"),
        ({"scope": 1}, ArgumentTypeError, "scope=1"),
        ({"finetune": (None, 10, 1e-3)}, ArgumentTypeError, "finetune batches"),
        ({"finetune": ([(1, 2)], -1, 1e-3)}, ConfigError, "finetune steps"),
        ({"finetune": ([(1, 2)], 5, 0.0)}, ConfigError, "finetune lr"),
        ({"finetune": 3}, ArgumentTypeError, "finetune=3"),
        ({"calibration": "data"}, ArgumentTypeError, "calibration"),
        ({"ignore": ["nope"]}, ConfigError, "nope"),
    ],
)
def test_bad_arguments_raise_typed_errors(digits, kwargs, error, words):
    model = fresh(digits)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        ap.share(model, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_a_non_module_and_missing_sklearn_raise_typed_errors(digits, monkeypatch):
    with pytest.raises(ArgumentTypeError, match="not its state_dict"):
        ap.share(digits[0].state_dict())
    with pytest.raises(ArgumentTypeError, match="instance"):
        ap.share(DigitsCNN)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    model = fresh(digits)
    with pytest.raises(ConfigError, match=r"adaprune\[share\]"):
        ap.share(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_resnet18_shares_and_keeps_its_output_shape():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    res = ap.share(model, bits=4)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(res.layers) == len(convs) == 21 and not res.skipped
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert torch.unique(model.layer4[1].conv2.weight.detach()).numel() <= 16
    assert 0.125 < res.ratio < 0.126
