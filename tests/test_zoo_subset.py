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
    with pytest.raises(PlanError, match="not valid JSON"):
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
