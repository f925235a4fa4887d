"""A pruned transformers model's config states its new sizes, or saving it through HF fails loudly.

Tiny configs, random init, seeded; each model is built with ``from_config`` as a user would.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import adaprune as ap
from adaprune.errors import AdapruneError, ConfigError
from adaprune.plan import Plan
from adaprune.surgery.hf_config import UnsaveableConfig, UnsaveableConfigError, UnsaveableConfigWarning
from adaprune.surgery.remove import removal, remove

transformers = pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

HEAD = 16  # every tiny config below: hidden 64, 4 heads of 16, 2 layers


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _decoder(kind):
    torch.manual_seed(0)
    sizes = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**sizes)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _llama():
    return _decoder("llama")


def _qwen2():
    return _decoder("qwen2")


def _mistral():
    return _decoder("mistral")


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _text():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _round_trip(model, path: Path, auto):
    """save_pretrained + from_pretrained give the same outputs as the pruned model."""
    x = _text()
    model.save_pretrained(path)
    reloaded = auto.from_pretrained(path).eval()
    torch.testing.assert_close(_logits(reloaded, x), _logits(model, x))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    return reloaded


def _span(ids, size=HEAD):
    return tuple(i for h in ids for i in range(h * size, (h + 1) * size))


def _ffn_plan(model, cuts):
    """Remove the last ``cuts[layer]`` FFN neurons of each layer."""
    removals = {}
    for i, n in cuts.items():
        idx = tuple(range(128 - n, 128))
        if hasattr(model, "bert"):
            p = f"bert.encoder.layer.{i}."
            removals.update({p + "intermediate.dense.weight": {0: idx}, p + "intermediate.dense.bias": {0: idx},
                             p + "output.dense.weight": {1: idx}})
        else:
            p = f"model.layers.{i}.mlp."
            removals.update({p + "gate_proj.weight": {0: idx}, p + "up_proj.weight": {0: idx},
                             p + "down_proj.weight": {1: idx}})
    return Plan(removals)


def _bert_heads_plan(cuts):
    """Remove the last ``cuts[layer]`` attention heads of each BERT layer (hidden width kept)."""
    removals = {}
    for i, n in cuts.items():
        idx = _span(range(4 - n, 4))
        p = f"bert.encoder.layer.{i}.attention."
        for proj in ("query", "key", "value"):
            removals[f"{p}self.{proj}.weight"] = {0: idx}
            removals[f"{p}self.{proj}.bias"] = {0: idx}
        removals[f"{p}output.dense.weight"] = {1: idx}
    return Plan(removals)


def _kv_heads_plan(model, cuts):
    """Remove the last ``cuts[layer]`` KV heads (and their query heads) of each decoder layer."""
    removals = {}
    for i, n in cuts.items():
        kv = range(2 - n, 2)
        q = [2 * j + r for j in kv for r in range(2)]
        p = f"model.layers.{i}.self_attn."
        removals[p + "q_proj.weight"] = {0: _span(q)}
        removals[p + "o_proj.weight"] = {1: _span(q)}
        for proj in ("k_proj", "v_proj"):
            removals[f"{p}{proj}.weight"] = {0: _span(kv)}
        if model.model.layers[i].self_attn.q_proj.bias is not None:
            removals[p + "q_proj.bias"] = {0: _span(q)}
            removals[p + "k_proj.bias"] = {0: _span(kv)}
            removals[p + "v_proj.bias"] = {0: _span(kv)}
    return Plan(removals)


def _merge(*plans):
    out = {}
    for p in plans:
        out.update(p.removals)
    return Plan(out)


# -- what the config can state: it states it, and HF's round trip reproduces the model ------------------


def test_bert_prune_states_new_sizes_and_round_trips(tmp_path: Path):
    model = _bert()
    ap.prune(model, _text(), ratio=0.5, ignore=[model.classifier])
    layer = model.bert.encoder.layer[0]
    assert model.config.hidden_size == model.bert.embeddings.word_embeddings.embedding_dim == 32
    assert model.config.intermediate_size == layer.intermediate.dense.out_features == 64
    assert model.config.num_attention_heads == layer.attention.self.num_attention_heads == 2
    assert type(model.config) is BertConfig
    _round_trip(model, tmp_path, AutoModelForSequenceClassification)


def test_bert_ffn_pruned_uniformly_round_trips(tmp_path: Path):
    model = _bert()
    ap.apply_plan(model, _ffn_plan(model, {0: 40, 1: 40}), _text())
    assert (model.config.intermediate_size, model.config.hidden_size, model.config.num_attention_heads) == (88, 64, 4)
    reloaded = _round_trip(model, tmp_path, AutoModelForSequenceClassification)
    assert reloaded.config.intermediate_size == 88


@pytest.mark.parametrize("build", [_llama, _qwen2, _mistral], ids=["llama", "qwen2", "mistral"])
def test_decoder_prune_states_new_sizes_and_round_trips(build, tmp_path: Path):
    model = build()
    ap.prune(model, _text(), ratio=0.5, ignore=[model.lm_head])
    cfg = model.config
    attn = model.model.layers[0].self_attn
    assert cfg.num_attention_heads == attn.q_proj.out_features // attn.head_dim == 2
    assert cfg.num_key_value_heads == attn.k_proj.out_features // attn.head_dim == 1
    assert cfg.intermediate_size == model.model.layers[0].mlp.down_proj.in_features == 64
    assert cfg.hidden_size == model.model.embed_tokens.embedding_dim
    _round_trip(model, tmp_path, AutoModelForCausalLM)


@pytest.mark.parametrize("build", [_llama, _qwen2, _mistral], ids=["llama", "qwen2", "mistral"])
def test_decoder_heads_and_ffn_pruned_at_full_width_round_trip(build, tmp_path: Path):
    """Heads go, the residual width stays: the config must state head_dim explicitly (Qwen2 has no field
    for it and would otherwise derive hidden_size / num_attention_heads = 32)."""
    model = build()
    ap.apply_plan(model, _merge(_kv_heads_plan(model, {0: 1, 1: 1}), _ffn_plan(model, {0: 32, 1: 32})), _text())
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, HEAD)
    assert (cfg.hidden_size, cfg.intermediate_size) == (64, 96)
    reloaded = _round_trip(model, tmp_path, AutoModelForCausalLM)
    assert reloaded.model.layers[1].self_attn.head_dim == HEAD


def test_gpt2_prune_states_n_inner_and_round_trips(tmp_path: Path):
    model = _gpt2()
    ap.prune(model, _text(), ratio=0.5, ignore=[model.lm_head])
    cfg = model.config
    assert cfg.n_inner == model.transformer.h[0].mlp.c_fc.nf
    assert cfg.n_embd == model.transformer.wte.embedding_dim
    _round_trip(model, tmp_path, AutoModelForCausalLM)


# -- what it cannot state: save_pretrained fails loudly, with the reason and the fix ----------------------


def _assert_refused(model, path: Path, *fragments):
    with pytest.raises(UnsaveableConfigError) as info:
        model.save_pretrained(path)
    msg = str(info.value)
    assert "\n" not in msg
    for text in (*fragments, "adaprune.save(", "adaprune.load("):
        assert text in msg, msg
    assert not path.exists() or os.listdir(path) == []  # no checkpoint, nothing that reloads random weights
    return msg


def test_non_uniform_ffn_refuses_save_pretrained(tmp_path: Path):
    model = _llama()
    plan = _merge(_kv_heads_plan(model, {0: 1, 1: 1}), _ffn_plan(model, {0: 64, 1: 32}))
    with pytest.warns(UnsaveableConfigWarning, match="layer 0: 64 FFN neurons, layer 1: 96 FFN neurons"):
        ap.apply_plan(model, plan, _text())
    cfg = model.config
    assert isinstance(cfg, LlamaConfig) and isinstance(cfg, UnsaveableConfig)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)  # what it can state, it states
    assert cfg.intermediate_size == 128
    _assert_refused(model, tmp_path / "out", "layer 0: 64 FFN neurons, layer 1: 96 FFN neurons")
    with pytest.raises(UnsaveableConfigError):
        cfg.save_pretrained(tmp_path / "cfg")
    assert issubclass(UnsaveableConfigError, ConfigError) and issubclass(UnsaveableConfigError, AdapruneError)


def test_bert_heads_refuse_save_pretrained(tmp_path: Path):
    """BERT derives the head size as hidden_size / num_attention_heads: 3 heads of 16 at width 64 cannot
    be stated (transformers 5 has no pruned_heads any more)."""
    model = _bert()
    with pytest.warns(UnsaveableConfigWarning):
        ap.apply_plan(model, _bert_heads_plan({0: 1, 1: 1}), _text())
    assert model.config.num_attention_heads == 4 and isinstance(model.config, BertConfig)
    _assert_refused(model, tmp_path / "out", "num_attention_heads=3")


def test_bert_heads_differing_per_layer_name_the_layers(tmp_path: Path):
    model = _bert()
    with pytest.warns(UnsaveableConfigWarning):
        ap.apply_plan(model, _bert_heads_plan({0: 1, 1: 2}), _text())
    _assert_refused(model, tmp_path / "out", "layer 0: 3 heads, layer 1: 2 heads")


def test_dry_run_and_rollback_leave_the_config_as_it_was():
    model = _llama()
    before = model.config.to_dict()
    for plan in (_ffn_plan(model, {0: 32, 1: 32}), _ffn_plan(model, {0: 64, 1: 32})):
        remove(model, plan, commit=False)
        assert type(model.config) is LlamaConfig and model.config.to_dict() == before
        with pytest.raises(RuntimeError, match="body failed"), removal(model, plan):
            raise RuntimeError("body failed")
        assert type(model.config) is LlamaConfig and model.config.to_dict() == before
        with removal(model, plan) as cut:
            cut.rollback()
        assert type(model.config) is LlamaConfig and model.config.to_dict() == before


def test_unsaveable_model_deepcopies_and_pickles(tmp_path: Path):
    model = _bert()
    with pytest.warns(UnsaveableConfigWarning):
        ap.apply_plan(model, _ffn_plan(model, {0: 64, 1: 32}))
    x = _text()
    y = _logits(model, x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]
    for i, other in enumerate(copies):
        assert isinstance(other.config, BertConfig) and isinstance(other.config, UnsaveableConfig)
        assert other.config.to_dict() == model.config.to_dict()
        assert other.bert.encoder.layer[0].attention.self.config is other.config  # still one shared object
        torch.testing.assert_close(_logits(other, x), y)
        _assert_refused(other, tmp_path / f"copy{i}", "layer 0: 64 FFN neurons, layer 1: 96 FFN neurons")


def test_adaprune_load_states_the_new_sizes(tmp_path: Path):
    model, x = _llama(), _text()
    res = ap.prune(model, x, ratio=0.5, ignore=[model.lm_head])
    ap.save(res, tmp_path / "ap")
    loaded = ap.load(tmp_path / "ap", _llama)
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 1, 64)
    assert cfg.to_dict() == model.config.to_dict()
    torch.testing.assert_close(_logits(loaded.eval(), x), _logits(model, x))


def test_adaprune_save_and_load_keep_a_non_uniform_model(tmp_path: Path):
    model = _llama()
    with pytest.warns(UnsaveableConfigWarning):
        ap.apply_plan(model, _ffn_plan(model, {0: 64, 1: 32}))
    # as a result (model + plan): io.save takes a bare model's `.model` attribute for a result's, and an HF
    # CausalLM has one (its LlamaModel)
    ap.save(SimpleNamespace(model=model, plan=_ffn_plan(model, {0: 64, 1: 32})), tmp_path)
    with pytest.warns(UnsaveableConfigWarning):
        loaded = ap.load(tmp_path, _llama)
    assert isinstance(loaded.config, UnsaveableConfig)
    torch.testing.assert_close(_logits(loaded.eval(), _text()), _logits(model, _text()))


def test_without_transformers_nothing_is_imported():
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import adaprune as ap\n"
        "from adaprune.surgery import hf_config\n"
        "torch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "ap.prune(m, torch.randn(2, 4), ratio=0.5)\n"
        "assert m[0].out_features == 4\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_later_cut_that_evens_the_layers_makes_the_config_saveable_again(tmp_path: Path):
    model = _llama()
    with pytest.warns(UnsaveableConfigWarning):
        ap.apply_plan(model, _ffn_plan(model, {0: 64, 1: 32}))
    assert isinstance(model.config, UnsaveableConfig)
    p = "model.layers.1.mlp."
    idx = tuple(range(64, 96))  # layer 1 is 96 wide now: cut it to layer 0's 64
    ap.apply_plan(model, Plan({p + "gate_proj.weight": {0: idx}, p + "up_proj.weight": {0: idx},
                               p + "down_proj.weight": {1: idx}}))
    assert type(model.config) is LlamaConfig and model.config.intermediate_size == 64
    _round_trip(model, tmp_path, AutoModelForCausalLM)


def test_layer_descriptions_group_layers_by_size():
    from adaprune.surgery.hf_config import describe

    sizes = {f"model.layers.{i}.self_attn": {"heads": h} for i, h in enumerate([9, 10, 9, 9, 1])}
    assert describe(sizes, "heads") == "layers 0, 2-3: 9 heads; layer 1: 10 heads; layer 4: 1 head"
    assert describe({"a.0.x": {"heads": 9}, "a.1.x": {"heads": 10}}, "heads") == "layer 0: 9 heads, layer 1: 10 heads"
