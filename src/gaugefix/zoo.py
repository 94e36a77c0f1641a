"""Small built-in example models, one per architecture family, with example input shapes.

``gaugefix inspect NAME`` accepts these names; the tests use them as fixed representatives of each
family. Every model is plain PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CausalSelfAttention",
    "cnn",
    "DenseBlock",
    "EXAMPLES",
    "GPT",
    "GPTBlock",
    "mlp",
    "ResNet",
    "resnet18",
    "TransformerBlock",
]


def mlp(widths: tuple[int, ...] = (16, 32, 32, 1), bias: bool = True) -> nn.Sequential:
    """``widths[0] -> ... -> widths[-1]`` with ReLU between the linear layers; ``ValueError``
    unless there are at least two widths, each a positive integer."""
    if len(widths) < 2 or not all(hasattr(w, "__index__") and w >= 1 for w in widths):
        raise ValueError(f"mlp widths must be at least two positive integers, got {widths!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b, bias=bias))
    return nn.Sequential(*layers)


def cnn(channels: int = 3, classes: int = 10) -> nn.Sequential:
    """Conv-ReLU-pool twice, flatten, a hidden linear layer: for 3x16x16 inputs."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, plus the shortcut (a 1x1 conv and BN when
    the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a stem, ``len(blocks)`` stages of basic blocks, global average
    pooling and a linear classifier. ``resnet18()`` is the ResNet-18 of the benchmarks."""

    def __init__(self, blocks: tuple[int, ...] = (1, 1), width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, 2 if (i and not j) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), 64, classes)


class DenseBlock(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input along channels."""

    def __init__(self, cin: int = 4, growth: int = 4, layers: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin + i * growth, growth, 3, padding=1) for i in range(layers)
        )
        self.head = nn.Linear(cin + layers * growth, classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.cat([x, F.relu(conv(x))], dim=1)
        return self.head(x.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """An attention-free transformer block: a token-mixing MLP with GELU and a channel ReLU
    feed-forward, each behind LayerNorm and inside a residual connection."""

    def __init__(self, tokens: int = 6, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mix1 = nn.Linear(tokens, hidden)
        self.mix2 = nn.Linear(hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, hidden)
        self.ff2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # x: [batch, tokens, dim]
        y = self.norm1(x).transpose(1, 2)
        x = x + self.mix2(F.gelu(self.mix1(y))).transpose(1, 2)
        return x + self.ff2(F.relu(self.ff1(self.norm2(x))))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused query-key-value projection, written out
    (``q @ k^T``, a causal mask, softmax, ``P @ v``) or through
    ``F.scaled_dot_product_attention`` (``sdpa=True``)."""

    def __init__(self, dim: int, heads: int, context: int, sdpa: bool) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"dim={dim} must be divisible by a positive number of heads={heads}")
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("causal", torch.ones(context, context).tril().bool(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [batch, tokens, dim]
        b, t, c = x.shape
        q, k, v = (
            y.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for y in self.qkv(x).split(c, dim=2)
        )
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
            scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class GPTBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with a ReLU
    MLP."""

    def __init__(self, dim: int, heads: int, hidden: int, context: int, sdpa: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, context, sdpa)
        self.fc, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.relu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT-style language model on token ids ``[batch, tokens]``: token and learned
    position embeddings, ``layers`` pre-norm blocks (MLP width ``hidden``, ``4 * dim`` by
    default), a final LayerNorm and a linear head over the vocabulary (sharing the token
    embedding's weight when ``tied``). Sizes that are not positive (``layers`` below 0) raise
    ``ValueError``.

    Its rescaling group, per block: ``dim`` query-key pairs, ``dim`` value-output pairs, two
    LayerNorm gains of ``dim`` channels and ``hidden`` ReLU neurons; plus the final LayerNorm's
    ``dim`` gains when the head is not tied (a tied head uses the embedding weight in a second
    role, which fixes it). The residual stream itself is normalised, so it has none."""

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        hidden: int | None = None,
        context: int = 64,
        sdpa: bool = True,
        tied: bool = False,
    ) -> None:
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        sizes = {"vocab": vocab, "dim": dim, "hidden": hidden, "context": context}
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1] + [f"layers={layers}"] * (layers < 0)
        if bad:
            raise ValueError(f"GPT sizes must be positive (layers: at least 0): {', '.join(bad)}")
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            GPTBlock(dim, heads, hidden, context, sdpa) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:  # ids: [batch, tokens] -> logits
        if ids.shape[1] > self.wpe.num_embeddings:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed the context of {self.wpe.num_embeddings}"
            )
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


EXAMPLES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (1, 16)),
    "cnn": (cnn, (1, 3, 16, 16)),
    "resnet": (ResNet, (1, 3, 16, 16)),
    "resnet18": (resnet18, (1, 3, 32, 32)),
    "densenet": (DenseBlock, (1, 4, 8, 8)),
    "transformer": (TransformerBlock, (1, 6, 8)),
}
