"""adaprune.json records the pruned sizes of every module the plan cut and the modules above it, for any
architecture (derived from the plan, not from layer names), plus heads and FFN widths as configs name
them, also for BERT (whose attention says attention_head_size and whose FFN is 'intermediate.dense')."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

import adaprune as ap


def test_bert_records_heads_and_ffn_width(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ap.prune(model, {"input_ids": ids}, ratio=0.5)
        ap.save(res, tmp_path)
    layers = json.loads((tmp_path / "adaprune.json").read_text())["layers"]
    attn = model.encoder.layer[0].attention.self
    assert layers["encoder.layer.0.attention.self"]["num_attention_heads"] == attn.num_attention_heads
    assert layers["encoder.layer.0.attention.self"]["all_head_size"] == attn.query.out_features
    ffn = model.encoder.layer[0].intermediate.dense
    assert layers["encoder.layer.0.intermediate.dense"]["out_features"] == ffn.out_features < 64


def test_any_module_the_plan_cut_is_recorded(tmp_path: Path) -> None:
    class Block(nn.Module):  # a custom module with its own size attribute, updated by nothing adaprune knows
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.width = nn.Conv2d(3, 16, 3), 16

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).relu()

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(1, 3, 8, 8)
    model(x)
    res = ap.prune(model, x, ratio=0.5)
    ap.save(res, tmp_path)
    layers = json.loads((tmp_path / "adaprune.json").read_text())["layers"]
    assert layers["0.conv"] == {"in_channels": 3, "out_channels": 8, "groups": 1}
    assert layers["0"] == {"width": 16}  # recorded as the module holds it (no fixer updated it)
    assert layers["2"]["in_features"] == model[2].in_features
