"""Hypothesis strategies for small random networks (and matching example inputs).

A strategy draws a :class:`NetCase`: plain data (family, a spec of tuples, a seed) that rebuilds
the same network with the same weights every time :meth:`NetCase.build` is called. Hypothesis
prints the case when a property fails, and the case is a complete reproduction::

    net, x = NetCase("residual", (("stem", 8), ...), seed=3).build()

Families (all small: widths 4-24, images 3x8x8, sequences of 6 tokens, batch 2):

- ``conv``: Conv2d (+BatchNorm2d) + ReLU chains, optional max/avg pooling; global-pool or
  flatten -> Linear heads.
- ``residual``: two-conv blocks with an identity or 1x1-conv shortcut combined by add/sub/mul.
- ``concat``: Inception-like ``torch.cat`` of branches, DenseNet-like ``cat([x, f(x)])``,
  ``chunk`` (GLU-like gating, swapped re-concat) and ``split`` of channels.
- ``depthwise``: depthwise convs (multiplier 1 or 2) and grouped convs (groups 2/4).
- ``mlp``: Linear + activation, optionally LayerNorm.
- ``attention``: ``nn.MultiheadAttention`` (batch_first True/False), optional LayerNorms, FFN,
  residual connections.

Every network has its classifier as ``net.head`` (pass ``ignore=[net.head]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

N_OUT = 5
BATCH = 2
IMG = 8
SEQ = 6

FAMILIES = ("conv", "residual", "concat", "depthwise", "mlp", "attention")


# ---------------------------------------------------------------------------------------------
# the case: plain data that rebuilds one network
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetCase:
    family: str
    spec: tuple
    seed: int

    def build(self) -> tuple[nn.Module, Any]:
        """A fresh network (eval mode, seeded weights and BN statistics) and its example input."""
        torch.manual_seed(self.seed)
        net = BUILDERS[self.family](self.spec)
        randomize_norms(net)
        net.eval()
        x = make_input(self.family, self.spec)
        return net, x


def make_input(family: str, spec: tuple) -> torch.Tensor:
    if family == "mlp":
        return torch.randn(BATCH, dict(spec)["in"])
    if family == "attention":
        s = dict(spec)
        if s["batch_first"]:
            return torch.randn(BATCH, SEQ, s["in"])
        return torch.randn(SEQ, BATCH, s["in"])
    return torch.randn(BATCH, 3, IMG, IMG)


def randomize_norms(net: nn.Module) -> None:
    """Non-trivial BN running statistics and norm affine parameters (defaults are 0/1)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bn: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
class ImageHead(nn.Module):
    """Global average pool -> Linear, or flatten (C*h*w features) -> Linear."""

    def __init__(self, kind: str, channels: int, spatial: int) -> None:
        super().__init__()
        self.kind = kind
        feats = channels if kind == "gap" else channels * spatial * spatial
        self.fc = nn.Linear(feats, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gap":
            x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# (1) conv chains
# ---------------------------------------------------------------------------------------------
class ConvChain(nn.Module):
    """spec: layers = ((width, kernel, bn, pool), ...), head = "gap" | "flatten"."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        s = dict(spec)
        self.body = nn.ModuleList()
        self.pools: list[str] = []
        cin, size = 3, IMG
        for width, k, bn, pool in s["layers"]:
            self.body.append(conv_bn(cin, width, k, bn=bn))
            self.pools.append(pool)
            if pool != "none":
                size //= 2
            cin = width
        self.head = ImageHead(s["head"], cin, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, pool in zip(self.body, self.pools):
            x = torch.relu(layer(x))
            if pool == "max":
                x = nn.functional.max_pool2d(x, 2)
            elif pool == "avg":
                x = nn.functional.avg_pool2d(x, 2)
        return self.head(x)


@st.composite
def conv_specs(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(1, 3))
    layers, pools = [], 0
    for _ in range(n):
        pool = draw(st.sampled_from(["none", "max", "avg"])) if pools < 2 else "none"
        pools += pool != "none"
        layers.append((draw(st.integers(4, 24)), draw(st.sampled_from([1, 3])), draw(st.booleans()), pool))
    head = draw(st.sampled_from(["gap", "flatten"]))
    return (("layers", tuple(layers)), ("head", head))


# ---------------------------------------------------------------------------------------------
# (2) residual blocks
# ---------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, op: str) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if shortcut == "conv" else None
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        s = x if self.shortcut is None else self.shortcut(x)
        if self.op == "add":
            y = y + s
        elif self.op == "sub":
            y = y - s
        else:
            y = y * s
        return torch.relu(y)


class ResNet(nn.Module):
    """spec: stem = width, blocks = ((width, stride, shortcut, op), ...), head."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        s = dict(spec)
        self.stem = conv_bn(3, s["stem"], 3)
        cin, size = s["stem"], IMG
        blocks = []
        for width, stride, shortcut, op in s["blocks"]:
            blocks.append(ResBlock(cin, width, stride, shortcut, op))
            cin, size = width, size // stride
        self.blocks = nn.Sequential(*blocks)
        self.head = ImageHead(s["head"], cin, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))))


@st.composite
def residual_specs(draw: st.DrawFn) -> tuple:
    stem = draw(st.integers(4, 16))
    cin, blocks, strided = stem, [], False
    for _ in range(draw(st.integers(1, 3))):
        width = draw(st.one_of(st.just(cin), st.integers(4, 16)))
        stride = draw(st.sampled_from([1, 2])) if not strided else 1
        strided |= stride == 2
        if width != cin or stride != 1:
            shortcut = "conv"
        else:
            shortcut = draw(st.sampled_from(["identity", "conv"]))
        blocks.append((width, stride, shortcut, draw(st.sampled_from(["add", "sub", "mul"]))))
        cin = width
    return (("stem", stem), ("blocks", tuple(blocks)), ("head", draw(st.sampled_from(["gap", "flatten"]))))


# ---------------------------------------------------------------------------------------------
# (3) concat / chunk / split
# ---------------------------------------------------------------------------------------------
class Inception(nn.Module):
    """Branches of different widths and kernels concatenated along channels."""

    def __init__(self, cin: int, branches: tuple) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(cin, w, k) for w, k in branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.cat([b(x) for b in self.branches], dim=1))


class Dense(nn.Module):
    """DenseNet-like: the input concatenated with a new feature map."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.conv = conv_bn(cin, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.relu(self.conv(x))], 1)


class Chunk(nn.Module):
    """conv to 2*w channels, chunk in two; gate (a * sigmoid(b)), sum, or swap-and-concat."""

    def __init__(self, cin: int, width: int, mode: str) -> None:
        super().__init__()
        self.conv = conv_bn(cin, 2 * width, 1)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        if self.mode == "gate":
            return a * torch.sigmoid(b)
        if self.mode == "sum":
            return torch.relu(a + b)
        return torch.relu(torch.cat([b, a], dim=1))


class Split(nn.Module):
    """conv, ``torch.split`` of channels (equal or unequal sizes), a conv per piece, then cat."""

    def __init__(self, cin: int, sizes: tuple, width: int) -> None:
        super().__init__()
        self.conv = conv_bn(cin, sum(sizes), 1)
        self.sizes = list(sizes)
        self.pieces = nn.ModuleList(conv_bn(s, width, 3) for s in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Tensor.split: torch.split (torch.functional.split) is covered by its own test
        parts = torch.relu(self.conv(x)).split(self.sizes, dim=1)
        return torch.relu(torch.cat([p(t) for p, t in zip(self.pieces, parts)], dim=1))


def _concat_out(cin: int, block: tuple) -> int:
    kind = block[0]
    if kind == "inception":
        return sum(w for w, _ in block[1])
    if kind == "dense":
        return cin + block[1]
    if kind == "chunk":
        return 2 * block[1] if block[2] == "swap" else block[1]
    return len(block[1]) * block[2]  # split


class ConcatNet(nn.Module):
    """spec: stem = width, blocks = (("inception", ((w, k), ...)) | ("dense", growth) |
    ("chunk", width, mode) | ("split", sizes, width), ...), head."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        s = dict(spec)
        self.stem = conv_bn(3, s["stem"], 3)
        cin = s["stem"]
        blocks: list[nn.Module] = []
        for block in s["blocks"]:
            kind = block[0]
            if kind == "inception":
                blocks.append(Inception(cin, block[1]))
            elif kind == "dense":
                blocks.append(Dense(cin, block[1]))
            elif kind == "chunk":
                blocks.append(Chunk(cin, block[1], block[2]))
            else:
                blocks.append(Split(cin, block[1], block[2]))
            cin = _concat_out(cin, block)
        self.blocks = nn.Sequential(*blocks)
        self.head = ImageHead(s["head"], cin, IMG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))))


@st.composite
def concat_specs(draw: st.DrawFn) -> tuple:
    stem = draw(st.integers(4, 12))
    cin, blocks = stem, []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["inception", "dense", "chunk", "split"]))
        if kind == "inception":
            n = draw(st.integers(2, 3))
            block: tuple = (
                kind,
                tuple((draw(st.integers(2, 8)), draw(st.sampled_from([1, 3]))) for _ in range(n)),
            )
        elif kind == "dense":
            block = (kind, draw(st.integers(2, 8)))
        elif kind == "chunk":
            block = (kind, draw(st.integers(2, 10)), draw(st.sampled_from(["gate", "sum", "swap"])))
        else:
            n = draw(st.integers(2, 3))
            if draw(st.booleans()):
                sizes = (draw(st.integers(2, 6)),) * n
            else:
                sizes = tuple(draw(st.integers(2, 6)) for _ in range(n))
            block = (kind, sizes, draw(st.integers(2, 8)))
        blocks.append(block)
        cin = _concat_out(cin, block)
        if cin > 24:
            break
    return (("stem", stem), ("blocks", tuple(blocks)), ("head", "gap"))


# ---------------------------------------------------------------------------------------------
# (4) depthwise and grouped convs
# ---------------------------------------------------------------------------------------------
class DWBlock(nn.Module):
    """Depthwise conv (channel multiplier m) + BN + ReLU + pointwise conv."""

    def __init__(self, cin: int, mult: int, cout: int) -> None:
        super().__init__()
        self.dw = conv_bn(cin, cin * mult, 3, groups=cin)
        self.pw = conv_bn(cin * mult, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pw(torch.relu(self.dw(x))))


class GroupedBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.conv = conv_bn(cin, cout, 3, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class DepthwiseNet(nn.Module):
    """spec: stem = width, blocks = (("dw", mult, cout) | ("grouped", groups, cout), ...), head."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        s = dict(spec)
        self.stem = conv_bn(3, s["stem"], 3)
        cin = s["stem"]
        blocks: list[nn.Module] = []
        for kind, a, cout in s["blocks"]:
            blocks.append(DWBlock(cin, a, cout) if kind == "dw" else GroupedBlock(cin, cout, a))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ImageHead(s["head"], cin, IMG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))))


@st.composite
def depthwise_specs(draw: st.DrawFn) -> tuple:
    stem = draw(st.sampled_from([4, 8, 12, 16]))
    cin, blocks = stem, []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            mult = draw(st.sampled_from([1, 2])) if cin <= 12 else 1
            blocks.append(("dw", mult, draw(st.sampled_from([4, 8, 12, 16]))))
        else:
            g = draw(st.sampled_from([2, 4]))
            blocks.append(("grouped", g, draw(st.sampled_from([4, 8, 12, 16]))))
        cin = blocks[-1][2]
    return (("stem", stem), ("blocks", tuple(blocks)), ("head", draw(st.sampled_from(["gap", "flatten"]))))


# ---------------------------------------------------------------------------------------------
# (5) MLPs
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """spec: in = features, layers = ((width, layernorm, act), ...)."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        s = dict(spec)
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.acts: list[str] = []
        cin = s["in"]
        for width, ln, act in s["layers"]:
            self.layers.append(nn.Linear(cin, width))
            self.norms.append(nn.LayerNorm(width) if ln else nn.Identity())
            self.acts.append(act)
            cin = width
        self.head = nn.Linear(cin, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, norm, act in zip(self.layers, self.norms, self.acts):
            x = norm(lin(x))
            x = torch.relu(x) if act == "relu" else nn.functional.gelu(x)
        return self.head(x)


@st.composite
def mlp_specs(draw: st.DrawFn) -> tuple:
    layers = tuple(
        (draw(st.integers(4, 24)), draw(st.booleans()), draw(st.sampled_from(["relu", "gelu"])))
        for _ in range(draw(st.integers(1, 3)))
    )
    return (("in", draw(st.integers(4, 16))), ("layers", layers))


# ---------------------------------------------------------------------------------------------
# (6) attention
# ---------------------------------------------------------------------------------------------
class AttnBlock(nn.Module):
    """x + MHA(LN(x)); x + FFN(LN(x)) (LayerNorms optional)."""

    def __init__(
        self, dim: int, heads: int, hidden: int, batch_first: bool, ln: bool, need_weights: bool
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class AttentionNet(nn.Module):
    """spec: in, heads, head_dim, batch_first, ln, need_weights, hidden = (ffn widths per block),
    pool = "mean" | "none"."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        s = dict(spec)
        dim = s["heads"] * s["head_dim"]
        self.batch_first = s["batch_first"]
        self.pool = s["pool"]
        self.embed = nn.Linear(s["in"], dim)
        self.blocks = nn.ModuleList(
            AttnBlock(dim, s["heads"], h, s["batch_first"], s["ln"], s["need_weights"]) for h in s["hidden"]
        )
        self.head = nn.Linear(dim, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        if self.pool == "mean":
            x = x.mean(dim=1 if self.batch_first else 0)
        return self.head(x)


@st.composite
def attention_specs(draw: st.DrawFn) -> tuple:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([d for d in (2, 4, 6) if heads * d <= 24]))
    hidden = tuple(draw(st.integers(4, 24)) for _ in range(draw(st.integers(1, 2))))
    return (
        ("in", draw(st.integers(4, 12))),
        ("heads", heads),
        ("head_dim", head_dim),
        ("batch_first", draw(st.booleans())),
        ("ln", draw(st.booleans())),
        ("need_weights", draw(st.booleans())),
        ("hidden", hidden),
        ("pool", draw(st.sampled_from(["mean", "none"]))),
    )


# ---------------------------------------------------------------------------------------------
# registry and public strategies
# ---------------------------------------------------------------------------------------------
BUILDERS = {
    "conv": ConvChain,
    "residual": ResNet,
    "concat": ConcatNet,
    "depthwise": DepthwiseNet,
    "mlp": MLP,
    "attention": AttentionNet,
}

SPECS = {
    "conv": conv_specs,
    "residual": residual_specs,
    "concat": concat_specs,
    "depthwise": depthwise_specs,
    "mlp": mlp_specs,
    "attention": attention_specs,
}

seeds = st.integers(0, 2**16)


def net_cases(family: str | None = None) -> st.SearchStrategy[NetCase]:
    """Cases of one family, or of any family when ``family`` is None."""
    if family is None:
        return st.one_of([net_cases(f) for f in FAMILIES])
    return st.builds(NetCase, st.just(family), SPECS[family](), seeds)


ratios = st.floats(0.0, 0.9, exclude_max=True, allow_nan=False)
