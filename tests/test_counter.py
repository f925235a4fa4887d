"""adaprune's MAC counter (cost/counter.py) gives exactly what torch's FlopCounterMode gives, on the
kinds of models adaprune prunes, with the same settings (attention's math path, the RNN formulas)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import adaprune as ap
from adaprune.calls import call_model
from adaprune.cost import _RNN_FLOPS
from adaprune.cost.counter import MacCounter


def torch_macs(model: nn.Module, x) -> int:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(
            display=False, custom_mapping=_RNN_FLOPS
        ) as c:
            call_model(model.eval(), x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return c.get_total_flops() // 2


class Mixed(nn.Module):
    """Convolutions (grouped, transposed, 1-d), matmuls, einsum, attention, a recurrent layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.t = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c1 = nn.Conv1d(4, 6, 3)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.w = nn.Parameter(torch.randn(10, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.t(F.relu(self.g(self.c(x))))  # (B, 4, 16, 16)
        s = self.c1(h.flatten(2)[..., :32]).transpose(1, 2)  # (B, 30, 6)
        a, _ = self.mha(s, s, s)
        q = F.scaled_dot_product_attention(a.unsqueeze(1), a.unsqueeze(1), a.unsqueeze(1)).squeeze(1)
        r, _ = self.lstm(q)
        e = torch.einsum("bld,de->ble", r, self.w)
        return torch.bmm(e, e.transpose(1, 2)).mean((1, 2)) + (r[:, 0] @ self.w).sum(-1)


def _models():
    import torchvision
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100))
    ids = torch.randint(0, 100, (2, 12))
    return {
        "mixed": (Mixed(), torch.randn(2, 3, 8, 8)),
        "resnet18": (torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32)),
        "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small(num_classes=10), torch.randn(1, 3, 32, 32)),
        "bert": (bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
        "gru": (nn.GRU(4, 6, num_layers=2), torch.randn(5, 2, 4)),
    }


@pytest.mark.parametrize("name", ["mixed", "resnet18", "mobilenet_v3_small", "bert", "gru"])
def test_same_macs_as_torchs_flop_counter(name: str) -> None:
    model, x = _models()[name]
    macs = ap.count(model, x).macs
    assert macs > 0 and macs == torch_macs(model, x)


def test_a_higher_order_op_is_counted_by_torchs_counter() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: self.a(t), lambda t: self.b(t) * 2, (x,))

    model, x = Branchy(), torch.randn(3, 4)
    counter = MacCounter()
    with pytest.raises(Exception) as info, torch.no_grad(), counter:  # torch may wrap NeedsTorchCounter
        model(x)
    assert counter.met_higher_order_op or type(info.value).__module__.startswith("torch._dynamo")
    assert ap.count(model, x).macs == torch_macs(model, x) > 0


def test_counting_does_not_import_torch_dynamo() -> None:
    """A dispatch mode's __torch_dispatch__ is wrapped in torch._dynamo.disable by default, importing
    torch._dynamo (about 1.5 s) on the first op counted in a process; the counter opts out."""
    import subprocess
    import sys

    code = ("import sys, torch, adaprune as ap\n"
            "ap.prune(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), "
            "torch.randn(2, 4), ratio=0.5)\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "False"
