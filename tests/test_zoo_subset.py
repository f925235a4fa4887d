"""Models people use, a representative subset: prune, save, load, identical outputs; ONNX export.

The full sweep over every torchvision classification model and the HF architectures is a benchmark
(``benchmarks/zoo.py`` -> ``docs/zoo.md``), not a test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import adaprune as ap
from adaprune.errors import PlanError, PlanMismatchError
from adaprune.io import LoadError


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


def _tv(name):
    def build():
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None)

    return build


def _swin():
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], num_classes=10)


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                             mlp_dim=128, num_classes=10)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=3))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _image(size):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _text():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _head(model):
    for name in ("fc", "classifier", "head", "lm_head"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            return mod
        if isinstance(mod, nn.Sequential) and isinstance(mod[-1], nn.Linear):
            return mod[-1]
    return model.heads.head


CASES = {
    "resnet18": (_tv("resnet18"), lambda: _image(64)),
    "mobilenet_v2": (_tv("mobilenet_v2"), lambda: _image(64)),
    "shufflenet_v2_x1_0": (_tv("shufflenet_v2_x1_0"), lambda: _image(64)),
    "tiny_swin": (_swin, lambda: _image(32)),
    "tiny_vit": (_vit, lambda: _image(32)),
    "tiny_bert": (_bert, _text),
    "tiny_llama_gqa": (_llama, _text),
}


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", list(CASES))
def test_prune_save_load_gives_identical_outputs(name, tmp_path: Path):
    build, inputs = CASES[name]
    model, x = build().eval(), inputs()
    shape = _logits(model, x).shape
    res = ap.prune(model, x, ratio=0.5, ignore=[_head(model)])
    assert res.after.macs < res.before.macs
    y = _logits(model, x)
    assert y.shape == shape
    ap.save(res, tmp_path / "out", base=name)
    assert sorted(os.listdir(tmp_path / "out")) == ["adaprune.json", "model.safetensors", "plan.json"]
    loaded = ap.load(tmp_path / "out", build)
    assert torch.equal(_logits(loaded, x), y)
    assert sum(p.numel() for p in loaded.parameters()) == res.after.params


def test_llama_gqa_keeps_query_heads_per_kv_head_and_generates():
    model, x = _llama().eval(), _text()
    ap.prune(model, x, ratio=0.5, ignore=[model.lm_head])
    for layer in model.model.layers:
        attn = layer.self_attn
        q_heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = attn.k_proj.out_features // attn.head_dim
        assert q_heads == kv_heads * attn.num_key_value_groups
        assert attn.v_proj.out_features == attn.k_proj.out_features
    out = model.generate(x["input_ids"][:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_saved_metadata_has_versions_and_per_layer_sizes(tmp_path: Path):
    import json

    model, x = _llama().eval(), _text()
    res = ap.prune(model, x, ratio=0.5, ignore=[model.lm_head])
    ap.save(res, tmp_path, base="llama-config")
    meta = json.loads((tmp_path / "adaprune.json").read_text())
    assert meta["base_model"] == "llama-config" and "torch" in meta["versions"]
    layer = meta["layers"]["model.layers.0.self_attn"]
    attn = model.model.layers[0].self_attn
    assert layer["num_attention_heads"] == attn.q_proj.out_features // attn.head_dim


@pytest.fixture
def saved(tmp_path: Path):
    model, x = _tv("resnet18")().eval(), _image(64)
    ap.save(ap.prune(model, x, ratio=0.5, ignore=[model.fc]), tmp_path)
    return tmp_path


def test_truncated_weights_are_rejected(saved: Path):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated or corrupted"):
        ap.load(saved, _tv("resnet18"))


def test_corrupted_plan_is_rejected(saved: Path):
    (saved / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match=r"plan\.json does not match the hash .* corrupted"):  # its hash is recorded
        ap.load(saved, _tv("resnet18"))


def test_wrong_architecture_is_rejected(saved: Path):
    with pytest.raises(PlanMismatchError):
        ap.load(saved, _tv("mobilenet_v2"))
    with pytest.raises(PlanMismatchError):
        ap.load(saved, _tv("resnet34"))


def test_missing_metadata_is_rejected(saved: Path):
    (saved / "adaprune.json").unlink()
    with pytest.raises(LoadError, match="missing"):
        ap.load(saved, _tv("resnet18"))


def _onnx_matches(model, x, path):
    import onnxruntime as ort

    ap.export_onnx(model, x, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = list(x.values()) if isinstance(x, dict) else [x]
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), tensors)}
    got = sess.run(None, feed)[0]
    want = _logits(model, x).numpy()
    return got.shape == want.shape and abs(got - want).max() < 1e-4


def test_onnx_export_of_a_pruned_cnn_matches(tmp_path: Path):
    model, x = _tv("resnet18")().eval(), _image(64)
    ap.prune(model, x, ratio=0.5, ignore=[model.fc])
    assert _onnx_matches(model, x, tmp_path / "cnn.onnx")


def test_onnx_export_of_a_pruned_transformer_matches(tmp_path: Path):
    model, x = _vit().eval(), _image(32)
    ap.prune(model, x, ratio=0.5, ignore=[model.heads.head])
    assert _onnx_matches(model, x, tmp_path / "vit.onnx")


class _AuxNet(nn.Module):
    """A train-only auxiliary head (like GoogLeNet's): it must be traced and sliced too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.aux = nn.Conv2d(16, 4, 1)
        self.body = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        out = self.fc(self.body(h).mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((2, 3))
        return out


@pytest.mark.parametrize("on_meta", [True, False])
def test_train_only_branches_are_traced_without_side_effects(on_meta):
    torch.manual_seed(0)
    model, x = _AuxNet(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = ap.trace(model, x, ignore=[model.fc, model.aux], on_meta=on_meta)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    stem = next(g for g in graph.groups if any(s.tensor == "stem.0.weight" and s.dim == 0 for s in g.slots))
    assert any(s.tensor == "aux.weight" and s.dim == 1 for s in stem.slots)


def test_googlenet_with_aux_heads_trains_after_pruning():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    x = torch.randn(2, 3, 64, 64)
    ap.prune(model, x, ratio=0.5, ignore=[model.fc, model.aux1.fc2, model.aux2.fc2])
    model.train()
    out = model(x)
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 1000)


def test_swin_prunes_its_attention_with_the_residual_width():
    """torchvision's Swin sizes heads as C // num_heads with C read from the input: the residual
    width and the head size must shrink together, which the size-provenance coupling provides."""
    model, x = _swin().eval(), _image(32)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert not res.frozen
    assert res.after.macs < 0.4 * res.before.macs
    attn = model.features[1][0].attn
    assert attn.qkv.out_features == 3 * attn.proj.in_features
    assert attn.proj.in_features == model.features[1][0].norm1.normalized_shape[0]


def test_hf_swin_position_bias_traced_with_real_index_values(monkeypatch):
    """HF Swin reads its relative position bias table through an index buffer. The meta-device run has
    no index values, so the trace must fall back to the real model (it once read garbage indices on
    meta and froze the attention heads of every stage)."""
    from transformers import SwinConfig, SwinForImageClassification

    monkeypatch.delenv("ADAPRUNE_STRICT_TRACE")  # strict mode would hide the failure by raising on meta
    torch.manual_seed(0)
    model = SwinForImageClassification(SwinConfig(
        image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
        window_size=4, num_labels=5)).eval()
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    graph = ap.trace(model, x, ignore=[model.classifier])
    assert not graph.frozen, graph.frozen
