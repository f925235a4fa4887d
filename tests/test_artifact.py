"""The compressed artifact (``ap.save(..., compress=True)``, :mod:`adaprune.artifact`): bit-identical
round trips of shared / int8 / masked / pruned / tied models, ``disk_bytes``, corruption, no pickle."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import adaprune as ap
from adaprune import artifact
from adaprune.artifact.codec import CodecError, pack_bits, unpack_bits
from adaprune.errors import ConfigError
from adaprune.examples.digits import DigitsCNN
from adaprune.io import META, WEIGHTS, ZWEIGHTS, LoadError, read_meta
from adaprune.quantize.weights import Int8Weight, quantize_weights
from adaprune.share.result import SharedWeight

pytest.importorskip("sklearn")
pytest.importorskip("zstandard")

X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
WEIGHT_FILES = {WEIGHTS, ZWEIGHTS, "model.next.safetensors", "model.next.safetensors.zst"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every test (conftest's)."""


def cnn(seed: int = 0, width: int = 8) -> DigitsCNN:
    """A digits CNN with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    model.train()
    with torch.no_grad():
        model(X * 2 + 0.5)
    return model.eval()


def out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def parts(model: nn.Module) -> dict[str, type]:
    """``"<module>.weight" -> type of its parametrization`` (each chain must be one long)."""
    found = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            chain = list(mod.parametrizations["weight"])
            assert len(chain) == 1
            found[f"{name}.weight" if name else "weight"] = type(chain[0])
    return found


def bake(model: nn.Module) -> None:
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def roundtrip(model: nn.Module, d: Path, factory=lambda: DigitsCNN(8), **kw) -> nn.Module:
    ap.save(model, d, **kw)
    return ap.load(d, factory).eval()


def weight_files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} & WEIGHT_FILES


def rewrite_meta(d: Path, **changes) -> None:
    """Edit adaprune.json as an attacker or a consistent corruption would (hash of the weights updated)."""
    meta = json.loads((d / META).read_text())
    meta["weights_sha256"] = hashlib.sha256((d / ZWEIGHTS).read_bytes()).hexdigest()
    meta["compressed"].update(changes)
    (d / META).write_text(json.dumps(meta))


# -- 1. round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize(("scope", "bits"), [("layer", 1), ("layer", 3), ("layer", 5), ("layer", 8),
                                             ("channel", 1), ("channel", 3), ("channel", 5)])
def test_shared_roundtrip_is_bit_identical(tmp_path, scope, bits):
    model = cnn()
    res = ap.share(model, bits, scope=scope)
    assert res.layers, res.skipped
    want = out(model)
    loaded = roundtrip(model, tmp_path, compress=True)
    shared = {f"{n}.weight" for n in res.layers}
    assert parts(loaded) == dict.fromkeys(shared, SharedWeight)
    assert torch.equal(out(loaded), want)
    for name in res.layers:
        a = model.get_submodule(name).parametrizations["weight"][0]
        b = loaded.get_submodule(name).parametrizations["weight"][0]
        assert torch.equal(a.codebook, b.codebook) and torch.equal(a.indices.long(), b.indices.long())
    meta = read_meta(tmp_path).compressed
    assert meta is not None and meta.shared == sorted(shared) and meta.int8 == []
    assert meta.disk_bytes == (tmp_path / ZWEIGHTS).stat().st_size
    bake(loaded)
    assert parts(loaded) == {} and torch.equal(out(loaded), want)


def test_int8_roundtrip_is_bit_identical(tmp_path):
    model = cnn()
    q = quantize_weights(model)
    want = out(model)
    loaded = roundtrip(model, tmp_path, compress=True)
    assert parts(loaded) == dict.fromkeys((f"{n}.weight" for n in q.layers), Int8Weight)
    assert torch.equal(out(loaded), want)
    fc = loaded.fc.parametrizations["weight"][0]
    assert fc.q.dtype == torch.int8 and torch.equal(fc.q, model.fc.parametrizations["weight"][0].q)
    assert read_meta(tmp_path).compressed.int8 == sorted(f"{n}.weight" for n in q.layers)
    bake(loaded)
    assert torch.equal(out(loaded), want)


def test_mixed_on_a_pruned_model(tmp_path):
    model = cnn()
    pruned = ap.prune(model, X, ratio=0.5, ignore=[model.fc])
    assert pruned.plan.removals and model.features[0].out_channels < 8
    sh = ap.share(model, 2, scope="channel", ignore=["features.7", "features.10", "fc"])
    q = quantize_weights(model, names=["features.7"])
    assert set(sh.layers) == {"features.0", "features.3"} and set(q.layers) == {"features.7"}
    want = out(model)
    ap.save(pruned, tmp_path, compress=True)  # the result carries its plan
    loaded = ap.load(tmp_path, lambda: DigitsCNN(8)).eval()
    assert parts(loaded) == {"features.0.weight": SharedWeight, "features.3.weight": SharedWeight,
                             "features.7.weight": Int8Weight}
    assert loaded.features[0].out_channels == model.features[0].out_channels
    assert torch.equal(out(loaded), want)
    bake(loaded)
    assert torch.equal(out(loaded), want)
    # baked, it saves and loads as a plain model
    again = roundtrip(loaded, tmp_path / "plain", plan=pruned.plan)
    assert parts(again) == {} and torch.equal(out(again), want)


def test_plain_save_of_a_parametrized_model_holds_its_effective_weights(tmp_path):
    model = cnn()
    ap.share(model, 2, ignore=["fc"])
    quantize_weights(model, names=["fc"])
    want = out(model)
    loaded = roundtrip(model, tmp_path)
    assert read_meta(tmp_path).compressed is None and weight_files(tmp_path) == {WEIGHTS}
    assert parts(loaded) == {} and torch.equal(out(loaded), want)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_roundtrip(tmp_path, dtype):
    torch.manual_seed(4)
    model = mlp().to(dtype)
    ap.share(model, 3, ignore=["4"])
    quantize_weights(model, names=["4"])
    x = torch.randn(3, 16, dtype=dtype)
    loaded = roundtrip(model, tmp_path, lambda: mlp().to(dtype), compress=True)
    assert parts(loaded) == {"0.weight": SharedWeight, "2.weight": SharedWeight, "4.weight": Int8Weight}
    assert loaded[0].weight.dtype == dtype and torch.equal(out(loaded, x), out(model, x))


@pytest.mark.parametrize("kind", ["shared", "int8"])
def test_the_model_itself_is_the_layer(tmp_path, kind):
    torch.manual_seed(5)
    model = nn.Embedding(300, 8)
    ap.share(model, 2) if kind == "shared" else quantize_weights(model)
    ids = torch.arange(300)
    loaded = roundtrip(model, tmp_path, lambda: nn.Embedding(300, 8), compress=True)
    assert parts(loaded) == {"weight": SharedWeight if kind == "shared" else Int8Weight}
    assert torch.equal(out(loaded, ids), out(model, ids))
    assert read_meta(tmp_path).model_class == "torch.nn.modules.sparse.Embedding"


# -- 2. tied weights -----------------------------------------------------------------------------
class Tied(nn.Module):
    """An embedding tied to the output layer, and a hidden layer between them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 40, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(ids))))


IDS = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_tied_weights_roundtrip(tmp_path, compress, shared):
    torch.manual_seed(3)
    model = Tied()
    if shared:
        res = ap.share(model, 3)
        assert set(res.layers) == {"mid"} and "tied" in res.skipped["emb"]
    want = out(model, IDS)
    loaded = roundtrip(model, tmp_path, Tied, compress=compress)
    assert loaded.out.weight is loaded.emb.weight
    assert torch.equal(out(loaded, IDS), want)
    assert parts(loaded) == ({"mid.weight": SharedWeight} if shared and compress else {})
    if compress:  # the tied matrix is stored once
        assert artifact.disk_bytes(model) < artifact.disk_bytes(nn.ModuleList([nn.Embedding(40, 16), nn.Linear(16, 40)]))


# -- 3. sparsified ----------------------------------------------------------------------------
def test_sparsified_model_roundtrips_and_compresses(tmp_path):
    model = cnn()
    dense_disk = artifact.disk_bytes(model)
    ap.sparsify(model, sparsity=0.8)
    want = out(model)
    loaded = roundtrip(model, tmp_path, compress=True)
    assert torch.equal(out(loaded), want)
    assert float((loaded.features[10].weight == 0).float().mean()) >= 0.79
    disk = (tmp_path / ZWEIGHTS).stat().st_size
    assert disk == artifact.disk_bytes(model) < 0.6 * artifact.float_bytes(model)
    assert disk < 0.6 * dense_disk


# -- 4. disk_bytes through count -----------------------------------------------------------------
def test_count_disk_bytes_is_the_saved_file(tmp_path):
    model = cnn()
    dense = ap.count(model, X)
    assert dense.disk_bytes is not None and dense.disk_bytes < artifact.float_bytes(model) * 1.05
    ap.share(model, 2)
    cost = ap.count(model, X)
    ap.save(model, tmp_path, compress=True)
    assert cost.disk_bytes == (tmp_path / ZWEIGHTS).stat().st_size == read_meta(tmp_path).compressed.disk_bytes
    assert cost.disk_bytes < dense.disk_bytes / 4
    no_disk = ap.count(model, X, disk=False)
    assert no_disk.disk_bytes is None and no_disk == cost  # equality ignores disk_bytes
    assert (cost.macs, cost.params, cost.bytes) == (no_disk.macs, no_disk.params, no_disk.bytes)
    assert ap.Cost(1, 2, 3, disk_bytes=4) == ap.Cost(1, 2, 3, disk_bytes=5) != ap.Cost(1, 2, 4, disk_bytes=4)
    assert hash(ap.Cost(1, 2, 3, disk_bytes=4)) == hash(ap.Cost(1, 2, 3))


def test_artifact_is_deterministic(tmp_path):
    model = cnn()
    ap.share(model, 3, ignore=["fc"])
    quantize_weights(model, names=["fc"])
    sizes = {artifact.disk_bytes(model) for _ in range(5)}
    assert len(sizes) == 1
    ap.save(model, tmp_path / "a", compress=True)
    ap.save(model, tmp_path / "b", compress=True)
    assert (tmp_path / "a" / ZWEIGHTS).read_bytes() == (tmp_path / "b" / ZWEIGHTS).read_bytes()
    assert artifact.blob(model)[0] == (tmp_path / "a" / ZWEIGHTS).read_bytes()


def test_float_bytes_is_the_plain_file(tmp_path):
    model = cnn()
    ap.share(model, 2)
    ap.save(model, tmp_path)
    assert artifact.float_bytes(model) == (tmp_path / WEIGHTS).stat().st_size == artifact.float_bytes(cnn())
    assert artifact.disk_bytes(nn.ReLU()) > 0 and ap.count(nn.ReLU(), X).disk_bytes == artifact.disk_bytes(nn.ReLU())


def test_level_is_recorded_and_matters(tmp_path):
    model = cnn()
    ap.share(model, 4)
    ap.save(model, tmp_path / "l1", compress=True, level=1)
    ap.save(model, tmp_path / "l19", compress=True, level=19)
    assert read_meta(tmp_path / "l1").compressed.level == 1
    assert (tmp_path / "l19" / ZWEIGHTS).stat().st_size == artifact.disk_bytes(model, level=19)
    assert torch.equal(out(ap.load(tmp_path / "l1", lambda: DigitsCNN(8))), out(model))


# -- 5. corruption and no pickle -----------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> tuple[Path, nn.Module]:
    model = cnn()
    ap.share(model, 3, ignore=["fc"])
    quantize_weights(model, names=["fc"])
    ap.save(model, tmp_path / "s", compress=True)
    return tmp_path / "s", model


def load_fails(d: Path, *words: str) -> str:
    with pytest.raises(LoadError) as info:
        ap.load(d, lambda: DigitsCNN(8))
    msg = str(info.value)
    assert all(w in msg for w in words), msg
    return msg


def test_truncated_file(saved):
    d, _ = saved
    f = d / ZWEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    load_fails(d, "truncated")
    rewrite_meta(d)  # the hash fits now: the recorded size still tells
    load_fails(d, "truncated")
    rewrite_meta(d, disk_bytes=len(data) // 2)  # and past that, zstd
    assert "decompress" in load_fails(d, "corrupted")


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_flipped_byte(saved, where):
    d, _ = saved
    f = d / ZWEIGHTS
    data = bytearray(f.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    f.write_bytes(bytes(data))
    load_fails(d, "corrupted")
    rewrite_meta(d)  # a consistent corruption: the codec itself must notice, never load a wrong model
    with pytest.raises(LoadError, match="corrupt"):
        ap.load(d, lambda: DigitsCNN(8))


def test_weights_of_another_save(saved, tmp_path):
    d, _ = saved
    other = cnn(seed=5)
    ap.share(other, 2)
    ap.save(other, tmp_path / "other", compress=True)
    (d / ZWEIGHTS).write_bytes((tmp_path / "other" / ZWEIGHTS).read_bytes())
    load_fails(d, "hash")
    size = (d / ZWEIGHTS).stat().st_size
    rewrite_meta(d, disk_bytes=size)  # the hash and size fit: the raw size recorded does not
    assert "were saved" in load_fails(d, "bytes")


def test_blob_with_another_plan(saved, tmp_path):
    d, _ = saved
    pruned = cnn()
    res = ap.prune(pruned, X, ratio=0.5, ignore=[pruned.fc])
    ap.save(res, tmp_path / "p", compress=True)
    raw = read_meta(tmp_path / "p").compressed.raw_bytes
    (d / ZWEIGHTS).write_bytes((tmp_path / "p" / ZWEIGHTS).read_bytes())
    rewrite_meta(d, disk_bytes=(d / ZWEIGHTS).stat().st_size, raw_bytes=raw)
    assert "another plan" in load_fails(d, "plan")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "adaprune"}', ""])
def test_garbage_metadata(saved, text):
    d, _ = saved
    (d / META).write_text(text)
    assert load_fails(d)


def test_load_never_unpickles(saved, monkeypatch):
    d, model = saved

    def refuse(*_a, **_k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = ap.load(d, lambda: DigitsCNN(8))
    assert torch.equal(out(loaded), out(model))
    assert set(parts(loaded).values()) == {SharedWeight, Int8Weight}


# -- 6. bit packing ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_bits_roundtrip(bits, data):
    n = data.draw(st.integers(0, 300), label="n")
    values = torch.tensor(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)),
                          dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), values)
    assert torch.equal(pack_bits(values.to(torch.int16).reshape(-1, 1), bits), packed)  # any integer dtype / shape
    with pytest.raises(CodecError, match="bytes"):
        unpack_bits(torch.cat([packed, torch.zeros(1, dtype=torch.uint8)]), bits, n)
    if packed.numel():
        with pytest.raises(CodecError, match="bytes"):
            unpack_bits(packed[:-1], bits, n)


def test_pack_bits_is_dense():
    values = torch.arange(8, dtype=torch.uint8)
    assert pack_bits(values, 3).tolist() == [0b10001000, 0b11000110, 0b11111010]  # little-endian, 3 bits each
    assert pack_bits(torch.ones(9, dtype=torch.uint8), 1).tolist() == [255, 1]


# -- 7. replacing one format by the other --------------------------------------------------------
def test_plain_and_compressed_replace_each_other(tmp_path):
    first, second = cnn(0), cnn(1)
    ap.share(second, 3)
    for model, compress, files in [(first, False, {WEIGHTS}), (second, True, {ZWEIGHTS}),
                                   (second, True, {ZWEIGHTS}), (first, False, {WEIGHTS}),
                                   (second, True, {ZWEIGHTS})]:
        loaded = roundtrip(model, tmp_path, compress=compress)
        assert weight_files(tmp_path) == files
        assert (read_meta(tmp_path).compressed is not None) == compress
        assert torch.equal(out(loaded), out(model))


# -- 8. arguments --------------------------------------------------------------------------------
def test_level_needs_compress(tmp_path):
    with pytest.raises(ConfigError, match="compress"):
        ap.save(cnn(), tmp_path, level=5)
    assert not (tmp_path / META).exists()
    for level in (0, 23):
        with pytest.raises(ConfigError):
            ap.save(cnn(), tmp_path, compress=True, level=level)


def test_saving_does_not_change_the_model(tmp_path):
    model = cnn()
    ap.share(model, 2, scope="channel")
    before = copy.deepcopy(model.state_dict())
    ap.save(model, tmp_path, compress=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.features[0].parametrizations["weight"][0].indices.dtype == torch.uint8
