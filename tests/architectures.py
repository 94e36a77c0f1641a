"""Generated architectures for the property tests, with their gauge neurons counted by hand.

Every strategy draws a :class:`Case`: a float64 model (in train or eval mode), example inputs and
``expected``, the number of independent neuron-wise rescaling symmetries of that model derived
by hand from the drawn widths (the formula is in each builder's docstring). The rules behind the
counts:

- a hidden channel is a gauge neuron when something produces it (rows of a Linear/Conv, or the
  affine gamma/beta of a norm layer) and parameters consume it (columns), with only positively
  homogeneous, channel-preserving ops in between;
- the model's output is fixed, and so is its input;
- a residual addition merges its operands' channels into one neuron per channel;
- the input of BatchNorm (train and eval: running statistics are never touched), GroupNorm and
  LayerNorm is normalised, so the producer before it has no gauge freedom; the norm's own affine
  parameters produce the neurons instead (none when it has no affine parameters);
- a channel that nothing consumes is no gauge neuron.

The models spell the same op in different ways (modules, ``F.*``, ``torch.*``, tensor methods,
operators), reuse modules, and use Python control flow that does not depend on tensor values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from gaugefix import zoo

DTYPE = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: 9, 2: 6, 3: 4}  # input size per spatial dim


class Case:
    """One generated model with example inputs and the hand-derived number of gauge neurons."""

    def __init__(
        self, family: str, model: nn.Module, inputs: tuple, expected: int, description: str
    ) -> None:
        self.family, self.model, self.inputs = family, model, inputs
        self.expected, self.description = expected, description

    def __repr__(self) -> str:
        return f"Case({self.family}: {self.description}; expected={self.expected})"

    def run(self) -> Tensor:
        """The model's output on the example inputs (no autograd)."""
        with torch.no_grad():
            return self.model(*self.inputs)


def rel_change(before: Tensor, after: Tensor) -> float:
    """``max |after - before| / max |before|`` (0 when both are identically zero)."""
    return float((after - before).abs().max()) / max(float(before.abs().max()), 1e-300)


ZOO_ARCHS = ["mlp", "cnn", "resnet", "densenet", "transformer"]


def gauged_zoo_model(
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    gauge: float = 0.7,
    gauge_seed: int | None = None,
) -> tuple[nn.Module, Tensor, gaugefix.GaugeStructure]:
    """A zoo model in eval mode, an example input and its structure, moved off balance by
    ``random_gauge_(gauge)`` drawn from ``gauge_seed`` (default ``seed``)."""
    torch.manual_seed(seed)
    factory, shape = zoo.EXAMPLES[name]
    model = factory().to(dtype).eval()
    x = torch.randn(2, *shape[1:], dtype=dtype)
    structure = gaugefix.discover(model, x)
    gen = torch.Generator().manual_seed(seed if gauge_seed is None else gauge_seed)
    gaugefix.random_gauge_(model, structure, gauge, generator=gen)
    return model, x, structure


def randomise_(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for norm-layer affine parameters and running statistics (the defaults
    1 and 0 would hide mistakes), deterministic in ``seed``; converts to float64."""
    gen = torch.Generator().manual_seed(seed)
    model.to(DTYPE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=DTYPE))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=DTYPE))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=DTYPE) - 0.5)
    return model


def _inputs(seed: int, *shape: int) -> tuple[Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(*shape, generator=gen, dtype=DTYPE),)


def _build(factory: Callable[[], nn.Module], seed: int, train: bool) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory()
    return randomise_(model, seed).train(train)


# --- spellings ---------------------------------------------------------------------------------
# Positively homogeneous activations, by spelling. Module spellings are created per use site,
# except "shared ReLU", a single module reused at every site that draws it.
ACTIVATIONS = (
    "nn.ReLU", "shared ReLU", "F.relu", "torch.relu", "x.relu", "x.relu_", "clamp(min=0)",
    "nn.LeakyReLU", "F.leaky_relu", "nn.PReLU(1)", "nn.PReLU(C)", "torch.abs", "x.abs",
    "nn.Identity", "nn.Dropout", "F.dropout", "none",
)  # fmt: skip
ADDS = ("+", "torch.add", "operator.add", "x.add", "+=")
FLATTENS = ("torch.flatten", "x.view", "x.reshape", "nn.Flatten", "x.flatten")
RELUS = ("nn.ReLU", "F.relu", "torch.relu", "x.relu")


class Activation(nn.Module):
    """One positively homogeneous activation in a given spelling (a module, so that module
    spellings are submodules and the model's ``named_modules`` shows them)."""

    def __init__(self, kind: str, channels: int, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.inner: nn.Module | None = None
        if kind == "nn.ReLU":
            self.inner = nn.ReLU()
        elif kind == "nn.LeakyReLU":
            self.inner = nn.LeakyReLU(0.1)
        elif kind == "nn.PReLU(1)":
            self.inner = nn.PReLU(1)
        elif kind == "nn.PReLU(C)":
            self.inner = nn.PReLU(channels)
        elif kind == "nn.Identity":
            self.inner = nn.Identity()
        elif kind == "nn.Dropout":
            self.inner = nn.Dropout(0.3)
        elif kind == "shared ReLU" and shared is None:
            self.inner = nn.ReLU()
        self.shared = [shared]  # a list, so the shared module is not registered twice

    def forward(self, x: Tensor) -> Tensor:
        k = self.kind
        if self.inner is not None:
            return self.inner(x)
        if k == "shared ReLU":
            return self.shared[0](x)
        if k == "F.relu":
            return F.relu(x)
        if k == "torch.relu":
            return torch.relu(x)
        if k == "x.relu":
            return x.relu()
        if k == "x.relu_":
            return x.clone().relu_()
        if k == "clamp(min=0)":
            return torch.clamp(x, min=0)
        if k == "F.leaky_relu":
            return F.leaky_relu(x, 0.2)
        if k == "torch.abs":
            return torch.abs(x)
        if k == "x.abs":
            return x.abs()
        if k == "F.dropout":
            return F.dropout(x, 0.5, training=self.training)
        assert k == "none", k
        return x


def add(kind: str, a: Tensor, b: Tensor) -> Tensor:
    if kind == "+":
        return a + b
    if kind == "torch.add":
        return torch.add(a, b)
    if kind == "operator.add":
        return operator.add(a, b)
    if kind == "x.add":
        return a.add(b)
    assert kind == "+=", kind
    a = a.clone()
    a += b
    return a


def flatten(kind: str, x: Tensor, module: nn.Module) -> Tensor:
    if kind == "torch.flatten":
        return torch.flatten(x, 1)
    if kind == "x.view":
        return x.view(x.size(0), -1)
    if kind == "x.reshape":
        return x.reshape(x.shape[0], -1)
    if kind == "x.flatten":
        return x.flatten(1)
    assert kind == "nn.Flatten", kind
    return module(x)


# --- MLPs ----------------------------------------------------------------------------------------
class GeneratedMLP(nn.Module):
    """``widths[0] -> ... -> widths[-1]``; hidden layer ``i`` is followed by ``acts[i]``. Some
    layers are called as ``F.linear(x, layer.weight, layer.bias)``."""

    def __init__(
        self, widths: list[int], acts: list[str], biases: list[bool], functional: list[bool]
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias)
            for a, b, bias in zip(widths[:-1], widths[1:], biases, strict=True)
        )
        self.shared_relu = nn.ReLU()
        self.acts = nn.ModuleList(
            Activation(k, w, self.shared_relu) for k, w in zip(acts, widths[1:-1], strict=True)
        )
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if i:
                x = self.acts[i - 1](x)
            if self.functional[i]:
                x = F.linear(x, layer.weight, layer.bias)
            else:
                x = layer(x)
        return x


@st.composite
def mlps(draw, min_depth: int = 1, max_depth: int = 8, max_width: int = 6) -> Case:
    """MLPs of ``depth`` linear layers. Hand count: the sum of the hidden widths (every hidden
    unit is produced by a row of one layer and consumed by a column of the next; the input and
    the output are fixed)."""
    depth = draw(st.integers(min_depth, max_depth))
    widths = draw(st.lists(st.integers(1, max_width), min_size=depth + 1, max_size=depth + 1))
    lead = draw(st.sampled_from([(8,), (2, 4)]))  # extra leading dims are shared by Linear
    # per-channel PReLU reads dim 1 as the channel dim: only for [batch, features] inputs
    kinds = [a for a in ACTIVATIONS if len(lead) == 1 or a != "nn.PReLU(C)"]
    acts = draw(st.lists(st.sampled_from(kinds), min_size=depth - 1, max_size=depth - 1))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    functional = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    seed = draw(st.integers(0, 2**16))
    model = _build(lambda: GeneratedMLP(widths, acts, biases, functional), seed, train=False)
    return Case(
        "mlp",
        model,
        _inputs(seed, *lead, widths[0]),
        sum(widths[1:-1]),
        f"widths={widths} acts={acts} biases={biases} functional={functional} lead={lead}",
    )


# --- CNNs ----------------------------------------------------------------------------------------
POOLS = ("none", "nn.MaxPool", "F.max_pool", "nn.AvgPool", "F.avg_pool", "nn.AdaptiveAvgPool",
         "F.adaptive_avg_pool", "nn.AdaptiveMaxPool", "F.adaptive_max_pool")  # fmt: skip


class Pool(nn.Module):
    def __init__(self, kind: str, dim: int, size: int) -> None:
        super().__init__()
        self.kind, self.dim, self.size = kind, dim, size
        self.inner: nn.Module | None = None
        if kind == "nn.MaxPool":
            self.inner = getattr(nn, f"MaxPool{dim}d")(2)
        elif kind == "nn.AvgPool":
            self.inner = getattr(nn, f"AvgPool{dim}d")(2)
        elif kind == "nn.AdaptiveAvgPool":
            self.inner = getattr(nn, f"AdaptiveAvgPool{dim}d")(size)
        elif kind == "nn.AdaptiveMaxPool":
            self.inner = getattr(nn, f"AdaptiveMaxPool{dim}d")(size)

    def forward(self, x: Tensor) -> Tensor:
        if self.inner is not None:
            return self.inner(x)
        d = self.dim
        if self.kind == "F.max_pool":
            return getattr(F, f"max_pool{d}d")(x, 2)
        if self.kind == "F.avg_pool":
            return getattr(F, f"avg_pool{d}d")(x, 2, padding=1, count_include_pad=True)
        if self.kind == "F.adaptive_avg_pool":
            return getattr(F, f"adaptive_avg_pool{d}d")(x, self.size)
        if self.kind == "F.adaptive_max_pool":
            return getattr(F, f"adaptive_max_pool{d}d")(x, self.size)
        return x


def pooled_size(kind: str, n: int, size: int) -> int:
    if kind in ("nn.MaxPool", "F.max_pool", "nn.AvgPool"):
        return n // 2
    if kind == "F.avg_pool":
        return (n + 2 - 2) // 2 + 1
    if "Adaptive" in kind or "adaptive" in kind:
        return size
    return n


class ConvUnit(nn.Module):
    """[zero padding] conv, activation, pooling."""

    def __init__(
        self, dim: int, cin: int, cout: int, k: int, pad: str, act: str, pool: Pool, bias: bool
    ) -> None:
        super().__init__()
        self.dim, self.k, self.pad = dim, k, pad
        self.conv = CONV[dim](cin, cout, k, padding=k // 2 if pad == "conv" else 0, bias=bias)
        self.act = Activation(act, cout)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if self.pad == "F.pad":
            x = F.pad(x, [self.k // 2] * (2 * self.dim))
        return self.pool(self.act(self.conv(x)))


class GeneratedCNN(nn.Module):
    def __init__(self, dim: int, units: list[ConvUnit], flat: str, head: list[int]) -> None:
        super().__init__()
        self.dim = dim
        self.units = nn.Sequential(*units)
        self.flat = flat
        self.head = nn.ModuleList(nn.Linear(a, b) for a, b in zip(head[:-1], head[1:], strict=True))
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == self.dim + 1:  # shape-based control flow: accept unbatched input
            x = x.unsqueeze(0)
        x = flatten(self.flat, self.units(x), self.flatten)
        for i, layer in enumerate(self.head):
            x = layer(self.relu(x) if i else x)
        return x


@st.composite
def cnns(draw) -> Case:
    """Convolutions (1d/2d/3d) with zero padding, homogeneous activations and pooling, then a
    flatten and a Linear head. Hand count: the sum of the conv channels and of the hidden
    widths of the head (every conv channel reaches the next layer's columns through pooling and
    the flatten, which maps one channel to many features)."""
    dim = draw(st.sampled_from([1, 2, 3]))
    size = SPATIAL[dim]
    cin = draw(st.integers(1, 3))
    units, c, channels = [], cin, []
    for _ in range(draw(st.integers(1, 3))):
        cout = draw(st.integers(1, 5))
        k = draw(st.sampled_from([1, 3]))
        pad = draw(st.sampled_from(["conv", "F.pad", "none"] if size >= k else ["conv", "F.pad"]))
        n = size if pad != "none" else size - k + 1
        kinds = [p for p in POOLS if n >= 2 or p in ("none",) or "daptive" in p]
        pool = draw(st.sampled_from(kinds))
        out = draw(st.integers(1, min(2, n)))
        bias = draw(st.booleans())
        act = draw(st.sampled_from(ACTIVATIONS[:-4] + ("none",)))
        units.append((c, cout, k, pad, act, pool, out, bias))
        size, c = pooled_size(pool, n, out), cout
        channels.append(cout)
    flat = draw(st.sampled_from(FLATTENS))
    hidden = draw(st.lists(st.integers(1, 5), max_size=2))
    classes = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    features = c * size**dim
    head = [features, *hidden, classes]

    def factory() -> nn.Module:
        mods = [
            ConvUnit(dim, ci, co, k, pad, act, Pool(pool, dim, out), bias)
            for ci, co, k, pad, act, pool, out, bias in units
        ]
        return GeneratedCNN(dim, mods, flat, head)

    model = _build(factory, seed, train=False)
    batch = draw(st.sampled_from([(), (2,)]))
    return Case(
        "cnn",
        model,
        _inputs(seed, *batch, cin, *[SPATIAL[dim]] * dim),
        sum(channels) + sum(hidden),
        f"dim={dim} cin={cin} units={units} flat={flat} head={head} batch={batch}",
    )


# --- ResNets -------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut (1x1 conv and BN when projecting), then ReLU."""

    def __init__(
        self, dim: int, cin: int, cout: int, stride: int, proj: bool, relu: str, add: str
    ) -> None:
        super().__init__()
        conv, bn = CONV[dim], BATCHNORM[dim]
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.project = proj or stride != 1 or cin != cout
        if self.project:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))
        self.relu = Activation(relu, cout)
        self.add = add

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut(x) if self.project else x  # `if self.flag`
        return self.relu(add(self.add, out, skip))  # the activation module is reused


class GeneratedResNet(nn.Module):
    def __init__(
        self, dim: int, cin: int, width: int, blocks: list[ResBlock], head: str, classes: int
    ) -> None:
        super().__init__()
        self.dim = dim
        self.stem = nn.Sequential(
            CONV[dim](cin, width, 3, padding=1), BATCHNORM[dim](width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.fc = nn.Linear(blocks[-1].bn2.num_features if blocks else width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        dims = tuple(range(2, 2 + self.dim))
        if self.head == "mean":
            x = x.mean(dim=dims)
        elif self.head == "amax":
            x = x.amax(dim=dims)
        else:
            pool = F.adaptive_avg_pool3d if x.dim() == 5 else F.adaptive_avg_pool2d
            x = torch.flatten(pool(x if x.dim() > 3 else x.unsqueeze(-1), 1), 1)
        return self.fc(x)


@st.composite
def resnets(draw) -> Case:
    """A stem (conv-BN-ReLU) and residual blocks, BatchNorm in train or eval mode, identity or
    projection shortcuts, then global pooling and a Linear. Hand count: ``width`` (the residual
    stream out of the stem, merged with every identity block's second BN) + the ``cout`` of every
    block (its first BN) + the ``cout`` of every projecting block (its second BN and shortcut BN
    start a new stream, merged by the addition). Convolutions feeding a BN have no freedom."""
    dim = draw(st.sampled_from([1, 2, 3]))
    cin = draw(st.integers(1, 3))
    width = draw(st.integers(1, 4))
    specs, c, size = [], width, SPATIAL[dim]
    for _ in range(draw(st.integers(1, 3))):
        cout = draw(st.sampled_from([c, c, c + 1, 2 * c]))
        stride = draw(st.sampled_from([1, 2])) if size >= 4 else 1
        proj = draw(st.booleans())
        specs.append(
            (c, cout, stride, proj, draw(st.sampled_from(RELUS)), draw(st.sampled_from(ADDS)))
        )
        c, size = cout, (size - 1) // stride + 1
    head = draw(st.sampled_from(["mean", "amax", "adaptive"]))
    train = draw(st.booleans())
    classes = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))

    def factory() -> nn.Module:
        blocks = [ResBlock(dim, *spec) for spec in specs]
        return GeneratedResNet(dim, cin, width, blocks, head, classes)

    model = _build(factory, seed, train)
    projecting = [
        cout for ci, cout, stride, proj, _, _ in specs if proj or stride != 1 or ci != cout
    ]
    expected = width + sum(s[1] for s in specs) + sum(projecting)
    return Case(
        "resnet",
        model,
        _inputs(seed, 3, cin, *[SPATIAL[dim]] * dim),
        expected,
        f"dim={dim} cin={cin} width={width} blocks={specs} head={head} train={train}",
    )


# --- DenseNets -----------------------------------------------------------------------------------
class GeneratedDenseNet(nn.Module):
    """A stem conv (+ReLU), then ``layers`` dense layers whose outputs are concatenated to their
    input along channels; a head that keeps the first ``C - cut`` channels (channel slicing),
    averages over space and applies a Linear.

    ``pre_bn=False``: a layer is ``relu(conv(x))``. ``pre_bn=True`` (DenseNet-BC style): a layer
    is ``conv(relu(bn(x)))``, so every feature that a later layer reads is normalised."""

    def __init__(
        self, cin: int, c0: int, growth: int, layers: int, pre_bn: bool, cat: str, cut: int
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, c0, 3, padding=1)
        self.pre_bn = pre_bn
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(c0 + i * growth) if pre_bn else nn.Identity() for i in range(layers)
        )
        self.convs = nn.ModuleList(
            nn.Conv2d(c0 + i * growth, growth, 3, padding=1) for i in range(layers)
        )
        self.cat, self.keep = cat, c0 + layers * growth - cut
        self.head = nn.Linear(self.keep, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        for norm, conv in zip(self.norms, self.convs, strict=True):
            out = conv(F.relu(norm(x))) if self.pre_bn else conv(x).relu()
            if self.cat == "torch.cat":
                x = torch.cat([x, out], dim=1)
            elif self.cat == "torch.concat":
                x = torch.concat((x, out), 1)
            else:
                x = torch.cat([x, out], dim=-3)
        if self.keep % 2:
            x = x[:, : self.keep]
        else:
            x = x.narrow(1, 0, self.keep)
        return self.head(x.mean(dim=(2, 3)))


@st.composite
def densenets(draw) -> Case:
    """Hand count. Plain (``relu(conv(x))``): ``c0 + layers * growth - cut`` (the stem's and
    every layer's channels, except the last ``cut`` channels, which the head's slice drops and
    nothing else reads). Pre-BN: ``sum_j (c0 + j * growth)`` (every BN's channels, consumed by
    its conv) ``+ growth - cut`` (the last layer's channels reach only the head; every earlier
    output and the stem are normalised by a later BN)."""
    cin = draw(st.integers(1, 3))
    c0 = draw(st.integers(1, 3))
    growth = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 3))
    pre_bn = draw(st.booleans())
    cat = draw(st.sampled_from(["torch.cat", "torch.concat", "cat(dim=-3)"]))
    cut = draw(st.integers(0, growth))
    train = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    model = _build(
        lambda: GeneratedDenseNet(cin, c0, growth, layers, pre_bn, cat, cut), seed, train
    )
    if pre_bn:
        expected = sum(c0 + j * growth for j in range(layers)) + growth - cut
    else:
        expected = c0 + layers * growth - cut
    return Case(
        "densenet",
        model,
        _inputs(seed, 3, cin, 5, 5),
        expected,
        f"cin={cin} c0={c0} growth={growth} layers={layers} pre_bn={pre_bn} cat={cat} "
        f"cut={cut} train={train}",
    )


# --- grouped and depthwise convolutions ---------------------------------------------------------
class GeneratedGrouped(nn.Module):
    """conv -> act -> grouped conv -> [GroupNorm] -> act -> depthwise conv (channel multiplier
    ``mult``) -> act -> adaptive pooling -> flatten -> Linear."""

    def __init__(
        self, dim: int, cin: int, c1: int, c2: int, groups: int, mult: int, norm: str, act: str
    ) -> None:
        super().__init__()
        conv = CONV[dim]
        self.conv0 = conv(cin, c1, 3, padding=1)
        self.grouped = conv(c1, c2, 3, padding=1, groups=groups, bias=norm == "none")
        self.norm = (
            nn.Identity()
            if norm == "none"
            else nn.GroupNorm(groups, c2, affine=norm == "GroupNorm")
        )
        self.depthwise = conv(c2, c2 * mult, 3, padding=1, groups=c2)
        self.act = Activation(act, 0)
        self.pool = getattr(nn, f"AdaptiveAvgPool{dim}d")(1)
        self.fc = nn.Linear(c2 * mult, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv0(x))
        x = self.act(self.norm(self.grouped(x)))
        x = self.act(self.depthwise(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@st.composite
def grouped(draw) -> Case:
    """Hand count: ``c1`` (first conv) + ``c2`` (the grouped conv, or the GroupNorm's affine
    part that replaces it as producer; 0 when the GroupNorm has no affine part) + ``c2 * mult``
    (depthwise). Each output channel of a grouped conv is a row of its own, consumed by its
    group's columns in the next conv."""
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 3))
    c1 = groups * draw(st.integers(1, 2))
    c2 = groups * draw(st.integers(1, 2))
    mult = draw(st.integers(1, 2))
    cin = draw(st.integers(1, 3))
    norm = draw(st.sampled_from(["none", "GroupNorm", "GroupNorm(affine=False)"]))
    act = draw(st.sampled_from(["nn.ReLU", "x.relu", "nn.LeakyReLU", "torch.abs"]))
    seed = draw(st.integers(0, 2**16))
    model = _build(lambda: GeneratedGrouped(dim, cin, c1, c2, groups, mult, norm, act), seed, False)
    expected = c1 + (0 if norm == "GroupNorm(affine=False)" else c2) + c2 * mult
    return Case(
        "grouped",
        model,
        _inputs(seed, 2, cin, *[min(SPATIAL[dim], 4)] * dim),
        expected,
        f"dim={dim} cin={cin} c1={c1} c2={c2} groups={groups} mult={mult} norm={norm} act={act}",
    )


# --- transformer block ---------------------------------------------------------------------------
@st.composite
def transformers(draw) -> Case:
    """``depth`` stacked :class:`gaugefix.zoo.TransformerBlock` (LayerNorm, GELU token mixer,
    ReLU feed-forward, two residual additions onto the fixed input stream). Hand count per
    block: ``1 + dim + hidden``: the first LayerNorm's affine channels are consumed by the
    token-mixing Linear, which sums over tokens separately for every channel, so they can only
    scale together (one neuron); the second LayerNorm's ``dim`` channels are consumed by the
    feed-forward's first Linear; its ``hidden`` ReLU units by the second. The GELU blocks the
    mixer's hidden units and the residual additions tie both branches' outputs to the input."""
    tokens = draw(st.integers(2, 5))
    dim = draw(st.integers(2, 6))
    hidden = draw(st.integers(1, 8))
    depth = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    model = _build(
        lambda: nn.Sequential(*[zoo.TransformerBlock(tokens, dim, hidden) for _ in range(depth)]),
        seed,
        False,
    )
    return Case(
        "transformer",
        model,
        _inputs(seed, 2, tokens, dim),
        depth * (1 + dim + hidden),
        f"tokens={tokens} dim={dim} hidden={hidden} depth={depth}",
    )


FAMILIES: dict[str, st.SearchStrategy[Case]] = {
    "mlp": mlps(),
    "cnn": cnns(),
    "resnet": resnets(),
    "densenet": densenets(),
    "grouped": grouped(),
    "transformer": transformers(),
}
any_case = st.one_of(*FAMILIES.values())


def deep_mlp(depth: int = 20, width: int = 4, seed: int = 0) -> Case:
    """A deep ReLU MLP with biases: ``(depth - 1) * width`` gauge neurons."""
    widths = [width] * (depth + 1)
    acts = ["nn.ReLU"] * (depth - 1)
    model = _build(lambda: GeneratedMLP(widths, acts, [True] * depth, [False] * depth), seed, False)
    return Case("mlp", model, _inputs(seed, 5, width), (depth - 1) * width, f"depth={depth}")


# --- plain references, one generator at a time (from GaugeStructure.generator) -------------------


def entries(idx: tuple) -> tuple:
    """The parameter entries one index of :meth:`GaugeStructure.generator` stands for."""
    return tuple(slice(None) if i is None else i for i in idx)


def signed_map(s: gaugefix.GaugeStructure, name: str, sign: int) -> Tensor | None:
    """The generator map of the one term of ``name`` with ``sign`` (``None`` without one)."""
    p = s.params.get(name)
    terms = [t.index for t in (p.terms if p is not None else ()) if t.sign == sign]
    assert len(terms) <= 1, (name, sign, terms)
    return terms[0] if terms else None


def incidence(s: gaugefix.GaugeStructure, name: str) -> Tensor:
    """The weights ``w_n(e)``, ``[num_generators, *shape]`` (dense; for small models)."""
    p = s.params[name]
    out = torch.zeros(s.num_generators + 1, *p.shape, dtype=torch.long)
    for t in p.terms:
        idx = t.index.expand(p.shape) % (s.num_generators + 1)
        out.scatter_add_(0, idx.unsqueeze(0), torch.full_like(idx, t.sign).unsqueeze(0))
    return out[:-1]


def reference_action(s: gaugefix.GaugeStructure, params: dict[str, Tensor], h: Tensor) -> None:
    """``g(h)`` generator by generator: multiply what generator n multiplies by
    ``exp(h_n)``, divide what it divides by it."""
    for n in range(s.num_generators):
        slices = s.generator(n)
        for name, idx in slices.incoming:
            params[name][entries(idx)] *= math.exp(float(h[n]))
        for name, idx in slices.outgoing:
            params[name][entries(idx)] /= math.exp(float(h[n]))


def reference_sides(
    s: gaugefix.GaugeStructure, tensors: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(sum_in theta^2, sum_out theta^2)`` per generator, one generator at a time."""
    s_in = torch.zeros(s.num_generators, dtype=DTYPE)
    s_out = torch.zeros(s.num_generators, dtype=DTYPE)
    for n in range(s.num_generators):
        slices = s.generator(n)
        for name, idx in slices.incoming:
            s_in[n] += tensors[name][entries(idx)].double().square().sum()
        for name, idx in slices.outgoing:
            s_out[n] += tensors[name][entries(idx)].double().square().sum()
    return s_in, s_out


def reference_imbalance(s: gaugefix.GaugeStructure, tensors: dict[str, Tensor]) -> Tensor:
    """``mu_n = sum_in theta^2 - sum_out theta^2``."""
    s_in, s_out = reference_sides(s, tensors)
    return s_in - s_out


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_bits(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Bit-for-bit equality of the whole state dict (NaN included)."""
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in now.items():
        a, b = v.detach(), saved[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if a.is_floating_point():  # the bits, as the integers of the same width
            bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
            a, b = a.view(bits), b.view(bits)
        assert torch.equal(a, b), k


def reference_sq_norms(s: gaugefix.GaugeStructure, tensors: dict[str, Tensor]) -> Tensor:
    """``S_n = sum_in theta^2 + sum_out theta^2`` (the scale of mu_n)."""
    s_in, s_out = reference_sides(s, tensors)
    return s_in + s_out


def term_counts(s: gaugefix.GaugeStructure) -> dict[str, tuple[Tensor, Tensor]]:
    """Per parameter, how many terms of sign +1 and -1 name generator ``n`` at entry ``e``: two
    float64 tensors ``[N, *shape]`` (their difference is ``w_n(e)``)."""
    n = s.num_generators
    out = {}
    for p in s.params.values():
        counts = torch.zeros(2, n + 1, *p.shape, dtype=DTYPE)
        for t in p.terms:
            index = torch.where(t.index < 0, n, t.index).expand(p.shape).unsqueeze(0)
            counts[int(t.sign < 0)].scatter_add_(0, index, torch.ones(index.shape, dtype=DTYPE))
        out[p.name] = (counts[0, :n], counts[1, :n])
    return out
