"""Discovery: every symmetry found, none invented, unknown things block, errors say where."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import (
    ACTIVATIONS,
    ADDS,
    DTYPE,
    FAMILIES,
    FLATTENS,
    RELUS,
    Case,
    ConvUnit,
    GeneratedCNN,
    GeneratedMLP,
    GeneratedResNet,
    Pool,
    ResBlock,
    incidence,
    randomise_,
    rel_change,
    signed_map,
)
from gaugefix import rules, zoo

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10


def discover_and_check(case: Case, seed: int = 0, rules: tuple = ()) -> gaugefix.GaugeStructure:
    """Discover (with the per-call ``rules``), check the count, apply ``random_gauge_(scale=1)``
    and check the outputs."""
    before = case.run()
    s = gaugefix.discover(case.model, *case.inputs, rules=rules)
    assert s.num_generators == case.expected, f"{case}\n{s.summary()}"
    check_maps(s, case.model)
    params = {k: v.clone() for k, v in case.model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    h = gaugefix.random_gauge_(case.model, s, 1.0, generator=gen)
    assert h.shape == (s.num_generators,)
    after = case.run()
    assert rel_change(before, after) <= TOL, f"{case}\n{s.summary()}"
    if s.num_generators:  # the transformation did something
        assert any(not torch.equal(params[k], v) for k, v in case.model.named_parameters())
    return s


def check_maps(s: gaugefix.GaugeStructure, model: nn.Module) -> None:
    """Term maps are in range and broadcast to their parameter; every weight is -1, 0 or 1;
    every generator multiplies some entry and divides another; excluded channels carry no
    generator."""
    named = dict(model.named_parameters())
    multiplied = torch.zeros(s.num_generators, dtype=torch.long)
    divided = torch.zeros(s.num_generators, dtype=torch.long)
    for name, m in s.params.items():
        assert m.shape == tuple(named[name].shape)
        for t in m.terms:
            assert t.index.dtype == torch.int64 and t.index.dim() == len(m.shape)
            full = t.index.expand(m.shape)
            assert int(full.min()) >= -1 and int(full.max()) < s.num_generators
        w = incidence(s, name)
        assert int(w.abs().max()) <= 1
        multiplied += (w > 0).reshape(s.num_generators, -1).sum(1)
        divided += (w < 0).reshape(s.num_generators, -1).sum(1)
    assert bool((multiplied > 0).all()) and bool((divided > 0).all())
    for e in s.excluded:
        assert e.reason and e.channels
        for name, produced in s.produced.items():
            if name.rsplit(".", 1)[0] == e.module:
                assert bool((produced.reshape(-1)[list(e.channels)] == -1).all()), e


# --- generated architectures ---------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_gauge_keeps_outputs_and_count_is_hand_derived(family, data):
    case = data.draw(FAMILIES[family])
    discover_and_check(case, seed=data.draw(st.integers(0, 1000)))


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_euler_identity_for_every_neuron(family, data):
    """``<xi_n, grad L> = 0`` for every discovered neuron and a generic loss: each neuron is a
    symmetry on its own (to first order), not only all of them together."""
    case = data.draw(FAMILIES[family])
    s = gaugefix.discover(case.model, *case.inputs)
    out = case.model(*case.inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    loss = (out * weights).sum() + out.square().sum()
    params = dict(case.model.named_parameters())
    names = list(s.params)
    if not names:
        assert s.num_generators == 0
        return
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    total = torch.zeros(s.num_generators + 1, dtype=DTYPE)
    scale = torch.zeros(s.num_generators + 1, dtype=DTYPE)
    for name, g in zip(names, grads, strict=True):
        if g is None:
            continue
        theta_g = (params[name].detach() * g).reshape(-1)
        w = incidence(s, name).reshape(s.num_generators, -1).to(DTYPE)
        total[:-1] += w @ theta_g
        scale[:-1] += w.abs() @ theta_g.abs()
    bad = total[:-1].abs() > 1e-10 * scale[:-1]
    assert not bool(bad.any()), (torch.nonzero(bad).view(-1), total, scale, case)


# --- fixed representatives -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [("mlp", 64), ("cnn", 56), ("resnet", 48), ("densenet", 12), ("transformer", 25)],
)
def test_zoo_counts(name, expected):
    factory, shape = zoo.EXAMPLES[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomise_(factory(), 0).eval()
        x = torch.randn(2, *shape[1:], dtype=DTYPE)
    discover_and_check(Case(name, model, (x,), expected, name))


def test_mlp_neurons_are_rows_and_next_columns():
    model = zoo.mlp((3, 4, 5, 2)).double()
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    assert s.num_generators == 9
    # neurons are numbered in parameter order: layer 0's units, then layer 2's
    assert s.generator_layers == ["0"] * 4 + ["2"] * 5
    for layer, nxt, width, offset in (("0", "2", 4, 0), ("2", "4", 5, 4)):
        rows = signed_map(s, f"{layer}.weight", 1).expand(width, -1)
        bias = signed_map(s, f"{layer}.bias", 1)
        cols = signed_map(s, f"{nxt}.weight", -1).expand(-1, width)
        for j in range(width):
            assert bool((rows[j] == offset + j).all()) and int(bias[j]) == offset + j
            assert bool((cols[:, j] == offset + j).all())
            slices = s.generator(offset + j)
            assert {n for n, _ in slices.incoming} == {f"{layer}.weight", f"{layer}.bias"}
            assert {n for n, _ in slices.outgoing} == {f"{nxt}.weight"}
    assert signed_map(s, "0.weight", -1) is None  # the input is fixed
    assert "4.bias" not in s.params  # the output is fixed
    assert s.excluded == [gaugefix.Exclusion("4", s.excluded[0].reason, (0, 1))]
    assert "model output" in s.excluded[0].reason


# --- spellings, reuse, control flow --------------------------------------------------------------
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("functional", [False, True])
def test_every_activation_spelling(act, functional):
    widths = [3, 4, 5, 2]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = GeneratedMLP(widths, [act, act], [True, False, True], [functional] * 3)
    model = randomise_(model, 1).eval()
    x = torch.randn(6, 3, dtype=DTYPE)
    discover_and_check(Case("mlp", model, (x,), 9, act))


@pytest.mark.parametrize("flat", FLATTENS)
@pytest.mark.parametrize("pool", ["nn.MaxPool", "F.avg_pool", "nn.AdaptiveMaxPool", "none"])
def test_every_flatten_spelling(flat, pool):
    with torch.random.fork_rng():
        torch.manual_seed(2)
        units = [
            ConvUnit(2, 2, 3, 3, "F.pad", "F.relu", Pool(pool, 2, 2), True),
            ConvUnit(2, 3, 4, 3, "conv", "x.relu", Pool("none", 2, 2), False),
        ]
        with torch.no_grad():
            size = nn.Sequential(*units)(torch.zeros(1, 2, 6, 6)).numel()
        model = GeneratedCNN(2, units, flat, [size, 5, 3])
    model = randomise_(model, 2).eval()
    x = torch.randn(2, 2, 6, 6, dtype=DTYPE)
    discover_and_check(Case("cnn", model, (x,), 3 + 4 + 5, f"{flat} {pool}"))


@pytest.mark.parametrize("add", ADDS)
@pytest.mark.parametrize("relu", RELUS)
@pytest.mark.parametrize("train", [False, True])
def test_every_add_spelling_merges_residual_channels(add, relu, train):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        blocks = [ResBlock(2, 3, 3, 1, False, relu, add), ResBlock(2, 3, 4, 1, False, relu, add)]
        model = GeneratedResNet(2, 2, 3, blocks, "mean", 2)
    model = randomise_(model, 3).train(train)
    x = torch.randn(4, 2, 5, 5, dtype=DTYPE)
    # stream of 3 (stem + block 0), bn1 of both blocks (3 + 4), the projected stream (4)
    discover_and_check(Case("resnet", model, (x,), 3 + 3 + 4 + 4, f"{add} {relu}"))


class Recurrent(nn.Module):
    """One hidden Linear applied ``steps`` times: its rows and columns are the same neurons."""

    def __init__(self, d: int = 3, n: int = 4, steps: int = 3) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(d, n), nn.Linear(n, n), nn.Linear(n, 2)
        self.steps = steps

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        for _ in range(self.steps):
            h = F.relu(self.hidden(h))
        return self.out(h)


class SharedAcrossBranches(nn.Module):
    """``l`` consumes two branches: their channels must scale together (n neurons), and its
    own rows are n more."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.a, self.b, self.l, self.o = (
            nn.Linear(3, n),
            nn.Linear(3, n),
            nn.Linear(n, n),
            nn.Linear(n, 2),
        )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.o(self.act(self.l(self.act(self.a(x))) + self.l(self.act(self.b(x)))))


class Flagged(nn.Module):
    """Python control flow on attributes and shapes, never on values."""

    def __init__(self, extra: bool, blocks: int) -> None:
        super().__init__()
        self.extra = extra
        self.first = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(blocks))
        self.side = nn.Linear(4, 4)
        self.last = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.flatten(0, 1)
        h = torch.relu(self.first(x))
        for i, block in enumerate(self.blocks):
            h = block(h).relu() if i % 2 == 0 else F.leaky_relu(block(h), 0.3)
        if self.extra:
            h = h + self.side(h).abs()
        return self.last(h)


@pytest.mark.parametrize(
    "model, expected",
    [
        (Recurrent(), 4),
        (Recurrent(steps=0), 4),  # `hidden` unused: not part of the structure
        (SharedAcrossBranches(), 8),
        (Flagged(False, 0), 4),
        (Flagged(False, 3), 16),
        # h + |side(h)|: side's rows merge with h's channels, side's columns consume them
        (Flagged(True, 2), 12),
    ],
    ids=["recurrent", "recurrent-0", "shared-branches", "flag-off-0", "flag-off-3", "flag-on-2"],
)
@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_reused_modules_and_control_flow(model, expected, batch):
    model = randomise_(copy.deepcopy(model), 4).eval()
    x = torch.randn(*batch, 3, dtype=DTYPE)
    discover_and_check(Case("reuse", model, (x,), expected, type(model).__name__))


# --- blockers ------------------------------------------------------------------------------------
class IdentityView(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class ReturnsInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class ClampInside(torch.autograd.Function):
    """Looks like ReLU inside; its gradient is a straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g


class CompiledKernel(torch.autograd.Function):
    """A forward that fills a fresh buffer with a kernel the tracer cannot see (a compiled
    extension; here a torch op with torch-function handling disabled)."""

    @staticmethod
    def forward(ctx, x, like):
        out = torch.empty_like(x) if like else torch.empty(x.shape, dtype=x.dtype)
        with torch._C.DisableTorchFunction():
            torch.tanh(x, out=out)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class Fn(nn.Module):
    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)


class Cumulative(nn.Module):
    """An unknown op (linear, even, but not in the registry)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cumsum(x, dim=-1)


class Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.a(x)) * torch.relu(self.b(x))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.gate(x))


def _grouped_norm(x: Tensor) -> Tensor:
    return F.group_norm(x, 2)


L2 = 5 + 7  # neurons of the sandwich below when l2's 6 are blocked
# (name, middle module, hand count, {module: text expected in the reason of its exclusion})
BLOCKERS = [
    ("GELU", nn.GELU(), L2, {"l2": "F.gelu in 'mid'"}),
    ("F.gelu", Fn(F.gelu), L2, {"l2": "F.gelu"}),
    ("SiLU", nn.SiLU(), L2, {"l2": "F.silu"}),
    ("tanh", Fn(torch.tanh), L2, {"l2": "torch.tanh"}),
    ("Tanh", nn.Tanh(), L2, {"l2": "tanh"}),
    ("sigmoid", Fn(torch.sigmoid), L2, {"l2": "torch.sigmoid"}),
    ("x.sigmoid", Fn(lambda x: x.sigmoid()), L2, {"l2": "sigmoid"}),
    ("ReLU6", nn.ReLU6(), L2, {"l2": "hardtanh"}),
    ("F.relu6", Fn(F.relu6), L2, {"l2": "relu6"}),
    ("Hardtanh", nn.Hardtanh(), L2, {"l2": "hardtanh"}),
    ("Softmax", nn.Softmax(dim=-1), L2, {"l2": "F.softmax"}),
    ("torch.softmax", Fn(lambda x: torch.softmax(x, -1)), L2, {"l2": "softmax"}),
    ("clamp(0, 6)", Fn(lambda x: x.clamp(0, 6)), L2, {"l2": "clamp"}),
    ("clamp(min=1)", Fn(lambda x: torch.clamp(x, min=1.0)), L2, {"l2": "clamp"}),
    ("relu(x) + 1", Fn(lambda x: F.relu(x) + 1), L2, {"l2": "nonzero constant"}),
    # normalisation over the rescaled channels: l2 is blocked, the norm's affine part produces
    ("LayerNorm", nn.LayerNorm(6), L2 + 6, {"l2": "normalised by F.layer_norm"}),
    ("LayerNorm(no affine)", nn.LayerNorm(6, elementwise_affine=False), L2, {"l2": "normalised"}),
    ("RMSNorm", nn.RMSNorm(6), L2 + 6, {"l2": "normalised by F.rms_norm"}),
    ("F.group_norm", Fn(_grouped_norm), L2, {"l2": "normalised by F.group_norm"}),
    ("BatchNorm(no affine)", nn.BatchNorm1d(6, affine=False), L2, {"l2": "F.batch_norm"}),
    ("F.normalize", Fn(F.normalize), L2, {"l2": "F.normalize"}),
    ("x * x", Fn(lambda x: x * x), L2, {"l2": "square of its factor"}),
    ("x ** 2", Fn(lambda x: x**2), L2, {"l2": "pow"}),
    # x * sigmoid(gate(x)): x is consumed by the gate (compensated), so the gate's output does
    # not change and x passes; the gate's rows are blocked by the sigmoid
    ("gating", Gated(), L2 + 6, {"mid.gate": "torch.sigmoid"}),
    ("unknown op", Cumulative(), L2, {"l2": "unknown op torch.cumsum in 'mid'"}),
    # a comparison with 0 is a sign test, homogeneous (tests/test_rules_audit.py); not with 0.5
    (
        "threshold",
        Fn(lambda x: torch.where(x > 0.5, x, 0.0)),
        L2,
        {"l2": "homogeneous: Tensor.gt"},
    ),
    ("integer cast", Fn(lambda x: x.to(torch.long).to(x.dtype)), L2, {"l2": "non-floating"}),
    ("bit reinterpretation", Fn(lambda x: x.view(torch.int64).view(x.dtype)), L2, {"l2": "bits"}),
    ("custom identity view", Fn(IdentityView.apply), L2, {"l2": "autograd"}),
    ("custom returns input", Fn(ReturnsInput.apply), L2, {"l2": "autograd"}),
    ("custom clamp inside", Fn(ClampInside.apply), L2, {"l2": "autograd"}),
]


class Sandwich(nn.Module):
    """l1 -> relu -> l2 -> mid -> l3 -> relu -> l4: 5 + 6 + 7 neurons when ``mid`` is
    homogeneous; a blocker removes l2's 6."""

    def __init__(self, mid: nn.Module) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 6)
        self.mid = mid
        self.l3, self.l4 = nn.Linear(6, 7), nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.l2(F.relu(self.l1(x)))
        return self.l4(F.relu(self.l3(self.mid(x))))


@pytest.mark.parametrize(
    "mid, expected, reasons", [b[1:] for b in BLOCKERS], ids=[b[0] for b in BLOCKERS]
)
def test_blockers_block_with_a_reason(mid, expected, reasons):
    torch.manual_seed(5)
    model = randomise_(Sandwich(copy.deepcopy(mid)), 5).eval()
    x = torch.randn(7, 4, dtype=DTYPE)
    s = discover_and_check(Case("blocker", model, (x,), expected, str(reasons)))
    for module, text in reasons.items():
        why = [e for e in s.excluded if e.module == module]
        width = model.get_submodule(module).out_features
        assert sorted(c for e in why for c in e.channels) == list(range(width)), s.excluded
        assert any(text in e.reason for e in why), (text, why)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(6) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


# Homogeneous, channel-preserving middles: l2's 6 neurons survive (the controls of the above).
# (name, middle, tolerance of the output check: a float32 round trip rounds, so it is exact only
# to float32 precision)
PASS_THROUGH = [
    ("nn.ReLU", nn.ReLU(), TOL),
    ("x.T.T", Fn(lambda x: x.T.T), TOL),
    ("x.mT.mT", Fn(lambda x: x.mT.mT), TOL),
    ("x.data", Fn(lambda x: x.data.relu()), TOL),
    ("flip", Fn(lambda x: x.flip(-1)), TOL),
    ("roll", Fn(lambda x: torch.roll(x, 2, dims=-1)), TOL),
    ("split-cat", Fn(lambda x: torch.cat(x.split([2, 4], dim=-1)[::-1], dim=-1)), TOL),
    ("unsqueeze-squeeze", Fn(lambda x: x.unsqueeze(1).relu().squeeze(1)), TOL),
    ("permute", Fn(lambda x: x.unsqueeze(0).permute(1, 0, 2).reshape(x.shape)), TOL),
    ("scalar mul/div", Fn(lambda x: torch.div(x * 2.0, 3)), TOL),
    ("buffer multiplier", Scaled(), TOL),
    ("-x", Fn(lambda x: -x), TOL),
    ("x - 0", Fn(lambda x: x - 0), TOL),
    ("sum([x, x])", Fn(lambda x: sum([x, x])), TOL),
    ("x + x.abs()", Fn(lambda x: x + x.abs()), TOL),
    ("clamp(min=0)", Fn(lambda x: x.clamp(min=0)), TOL),
    ("in-place relu_", Fn(lambda x: x.clone().relu_()), TOL),
    ("in-place mul_", Fn(lambda x: x.clone().mul_(3.0)), TOL),
    ("float32 round trip", Fn(lambda x: x.float().double()), 1e-6),
]


@pytest.mark.parametrize(
    "mid, tol", [p[1:] for p in PASS_THROUGH], ids=[p[0] for p in PASS_THROUGH]
)
def test_homogeneous_middles_pass(mid, tol):
    model = randomise_(Sandwich(copy.deepcopy(mid)), 5).eval()
    x = torch.randn(7, 4, dtype=DTYPE)
    case = Case("pass", model, (x,), 18, "")
    before = case.run()
    s = gaugefix.discover(model, x)
    assert s.num_generators == 18, s.summary()
    assert not [e for e in s.excluded if e.module == "l2"]
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, case.run()) <= tol


class Scratch(nn.Module):
    """Writes a rescaled tensor into a view of a fixed buffer: the base must not stay fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l3, self.l4 = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        out = torch.ones_like(h)
        out[:, :3].mul_(h[:, :3])  # in place, through a view
        return self.l3(out) + self.l4(h)


def test_in_place_write_through_a_view_blocks():
    torch.manual_seed(6)
    model = randomise_(Scratch(), 6).eval()
    # channels 0-2 are written into the fixed scratch tensor: blocked; 3, 4 stay neurons
    s = discover_and_check(Case("view", model, (torch.randn(5, 4, dtype=DTYPE),), 2, "view"))
    assert [e.channels for e in s.excluded if e.module == "l1"] == [(0, 1, 2)]


class Branches(nn.Module):
    """h = relu(l1(x)); out = l3(f(h)) + l4(h): l4 consumes h, so a wrong pass-through through
    ``f`` would make l1's channels neurons and change the output."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = Fn(f)
        self.l1, self.l3, self.l4 = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        return self.l3(self.f(h)) + self.l4(h)


@pytest.mark.parametrize(
    "f",
    [
        lambda h: h.to(torch.long).to(h.dtype),
        lambda h: h.to(torch.int32).double(),
        lambda h: h.to(torch.bool).to(h.dtype),
        lambda h: h.view(torch.int64).view(h.dtype),
        lambda h: torch.where(h > 1, h, 0.0),
        lambda h: h.round(),
        lambda h: CompiledKernel.apply(h, True),
        lambda h: CompiledKernel.apply(h.detach(), True),
        lambda h: CompiledKernel.apply(h, False),
    ],
    ids=[
        "to(long)",
        "to(int32)",
        "to(bool)",
        "view(int64)",
        "threshold 1",
        "round",
        "hidden kernel into empty_like",
        "hidden kernel, detached input",
        "hidden kernel into torch.empty",
    ],
)
def test_lossy_or_hidden_computations_block_even_when_the_channel_is_consumed_elsewhere(f):
    torch.manual_seed(10)
    model = randomise_(Branches(f), 10).eval()
    discover_and_check(Case("lossy", model, (torch.randn(9, 4, dtype=DTYPE) * 3,), 0, "lossy"))


# Ops on [batch, 6] activations, homogeneous or not, structural or not: a random chain of them
# sits between two layers whose channels are also consumed elsewhere, so any wrong pass-through
# shows as a changed output.
CHAIN_OPS = {
    "relu": F.relu,
    "abs": torch.abs,
    "neg": lambda x: -x,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "x * 2": lambda x: x * 2,
    "x / 3": lambda x: x / 3,
    "x + 1": lambda x: x + 1,
    "centre": lambda x: x - x.mean(-1, keepdim=True),
    "x * x": lambda x: x * x,
    "flip": lambda x: x.flip(-1),
    "roll": lambda x: x.roll(1, -1),
    "cumsum": lambda x: x.cumsum(-1),
    "softmax": lambda x: x.softmax(-1),
    "amax": lambda x: x.amax(-1, keepdim=True).expand_as(x),
    "sum": lambda x: x.sum(-1, keepdim=True).expand_as(x),
    "sort": lambda x: x.sort(-1)[0],
    "clamp(min=0)": lambda x: x.clamp(min=0),
    "clamp(max=1)": lambda x: x.clamp(max=1),
    "max_pool over channels": lambda x: F.max_pool1d(x.unsqueeze(1), 3, 1, 1).squeeze(1),
    "avg_pool over channels": lambda x: F.avg_pool1d(x.unsqueeze(1), 3, 1, 1).squeeze(1),
    "zero pad, slice": lambda x: F.pad(x, (1, 1))[:, 1:-1],
    "one pad, slice": lambda x: F.pad(x, (1, 1), value=1.0)[:, 1:-1],
    "split, cat": lambda x: torch.cat(x.split(3, -1)[::-1], -1),
    "where": lambda x: torch.where(x > 0, x, x * 0.1),
    "x + flip": lambda x: x + x.flip(-1),
    "x * flip": lambda x: x * x.flip(-1),
    "view, relu": lambda x: x.view(-1, 2, 3).relu().view(-1, 6),
    "transpose": lambda x: x.view(-1, 2, 3).transpose(1, 2).reshape(-1, 6),
    "maximum": lambda x: torch.maximum(x, x.flip(-1)),
    "in place": lambda x: x.clone().mul_(2).add_(x),
    "layer_norm": lambda x: F.layer_norm(x, (6,)),
    "matmul": lambda x: x @ torch.ones(6, 6, dtype=x.dtype),
    "index": lambda x: x[:, [5, 4, 3, 2, 1, 0]],
    "masked_fill": lambda x: x.masked_fill(torch.arange(6) > 3, 0.0),
    "times std": lambda x: x * x.std(),
    "into a view": lambda x: (lambda o: (o[:, :3].mul_(x[:, :3]), o)[1])(torch.ones_like(x)),
    "stack, sum": lambda x: torch.stack([x, x.flip(-1)]).sum(0),
    "constant weights": lambda x: x * torch.linspace(1, 2, 6, dtype=x.dtype),
    "x * sigmoid(x)": lambda x: x * torch.sigmoid(x),
    "detach": lambda x: x.detach() * 2,
    "to(long)": lambda x: x.to(torch.long).to(x.dtype),
    "batch centre": lambda x: x - x.mean(0),
    "first row": lambda x: x[:1].expand_as(x),
    "outer sum": lambda x: (x.unsqueeze(1) + x.unsqueeze(2)).sum(1),
}


class Chain(nn.Module):
    def __init__(self, ops: list[str]) -> None:
        super().__init__()
        self.ops = ops
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 6)
        self.l3, self.l4 = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        g = self.l2(F.relu(self.l1(x)))
        h = g
        for op in self.ops:
            h = CHAIN_OPS[op](h)
        return self.l3(h) + self.l4(F.relu(g))


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.sampled_from(sorted(CHAIN_OPS)), min_size=1, max_size=3))
def test_random_op_chains_never_change_the_function(ops):
    torch.manual_seed(11)
    model = randomise_(Chain(ops), 11).eval()
    x = 2 * torch.randn(7, 4, dtype=DTYPE)
    with torch.no_grad():
        before = model(x)
    s = gaugefix.discover(model, x)
    assert s.num_generators >= 6  # l1's channels are never affected
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_change(before, model(x)) <= TOL, s.summary()


class GeluTimesTwo(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x) * 2


def _scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but models still use it
        return torch.jit.script(GeluTimesTwo())


def _jit_traced():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(GeluTimesTwo(), torch.randn(3, 5))


def _scripted_with_parameters():
    torch.manual_seed(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(nn.Sequential(nn.Linear(5, 5), nn.GELU())).double()


@pytest.mark.parametrize(
    "make", [_scripted, _jit_traced, _scripted_with_parameters], ids=["script", "trace", "params"]
)
def test_compiled_submodules_block_what_they_consume(make):
    """TorchScript runs its ops where the tracer cannot see them: what such a module reads is
    blocked (found through the autograd graph), never passed through."""

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make()
            self.l1, self.l3, self.l4 = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.l1(x))
            return self.l3(self.inner(h)) + self.l4(h)

    model = randomise_(Host(), 12).eval()
    s = discover_and_check(Case("jit", model, (torch.randn(7, 4, dtype=DTYPE),), 0, "jit"))
    assert any("cannot see" in e.reason for e in s.excluded if e.module == "l1")


class Halves(nn.Module):
    """``chunk`` makes one autograd node with two outputs; hidden code reads only the first."""

    def __init__(self, hidden) -> None:
        super().__init__()
        self.hidden = hidden
        self.l1, self.l3, self.l4 = nn.Linear(4, 6), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = F.relu(self.l1(x)).chunk(2, dim=-1)
        return self.l3(self.hidden(a)) + self.l4(b)


@pytest.mark.parametrize(
    "hidden", [Fn(ReturnsInput.apply), _scripted()], ids=["custom function", "script"]
)
def test_hidden_code_on_one_output_of_a_multi_output_op(hidden):
    model = randomise_(Halves(hidden), 13).eval()
    # the first half is blocked; the second half (l1's channels 3-5) stays gauge freedom
    s = discover_and_check(Case("chunk", model, (torch.randn(7, 4, dtype=DTYPE),), 3, "chunk"))
    assert [e.channels for e in s.excluded if e.module == "l1"] == [(0, 1, 2)]


class MyReLU(nn.Module):
    """A user's ReLU, spelled with ops the registry does not pass through."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.heaviside(x, x.new_zeros(()))


class Ghost(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


def test_user_rule_for_a_module_type():
    torch.manual_seed(7)
    model = randomise_(Sandwich(MyReLU()), 7).eval()
    x = torch.randn(7, 4, dtype=DTYPE)
    s = discover_and_check(Case("user", model, (x,), 12, "unregistered"))
    assert any("unknown op" in e.reason and "'mid'" in e.reason for e in s.excluded)
    discover_and_check(Case("user", model, (x,), 18, "ruled"), rules=[(MyReLU, rules.elementwise)])


def test_user_blocker():
    torch.manual_seed(8)
    model = randomise_(Sandwich(Ghost()), 8).eval()
    x = torch.randn(7, 4, dtype=DTYPE)
    discover_and_check(Case("user", model, (x,), 18, "relu inside"))

    def ghost_rule(ctx, result, x):
        return rules.blocker(ctx, result, x)

    s = discover_and_check(Case("user", model, (x,), 12, "blocker"), rules=[(Ghost, ghost_rule)])
    assert any("Ghost" in e.reason for e in s.excluded if e.module == "l2")


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MyReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.abs())


def test_outer_module_rule_speaks_for_inner_modules():
    torch.manual_seed(9)
    model = randomise_(Sandwich(Outer()), 9).eval()
    x = torch.randn(7, 4, dtype=DTYPE)
    # MyReLU's blocker is not consulted: Outer's rule covers it
    ruled = [(Outer, rules.elementwise), (MyReLU, rules.blocker)]
    discover_and_check(Case("user", model, (x,), 18, "outer rule"), rules=ruled)


# --- bad input -----------------------------------------------------------------------------------
class Inner(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.view(7, -1)


class Raises(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise KeyError("no such feature")


@pytest.mark.parametrize(
    "model, x, texts",
    [
        (zoo.mlp((16, 8, 1)), torch.randn(2, 5), ["F.linear", "'0'", "16x8"]),
        (
            nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Inner())),
            torch.randn(3, 4),
            ["Tensor.view", "'1.1'", "invalid"],
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Raises())),
            torch.randn(3, 4),
            ["'1.1'", "F.relu", "no such feature"],
        ),
        (zoo.cnn(), torch.randn(1, 3, 8, 8), ["F.linear", "'7'"]),
    ],
    ids=["wrong-width", "bad-view", "python-error", "wrong-spatial-size"],
)
def test_tracing_errors_name_the_op_and_module(model, x, texts):
    model = model.double()
    model.get_submodule("0").weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(gaugefix.TracingError) as err:
        gaugefix.discover(model, x.double())
    for text in texts:
        assert text in str(err.value)
    cause = err.value.__cause__  # the model's own error, chained and quoted
    assert cause is not None and not isinstance(cause, gaugefix.TracingError)
    assert str(cause) in str(err.value)
    assert not model.get_submodule("0").weight.requires_grad  # flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_discover_leaves_statistics_flags_and_random_state_alone():
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(27, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2),
    ).double().train()  # fmt: skip
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 2, 5, 5, dtype=DTYPE)
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    s = gaugefix.discover(model, x)
    assert s.num_generators == 3 + 4
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert int(model[1].num_batches_tracked) == 0


class ValueBranch(nn.Module):
    """Data-dependent control flow: the other branch's parameters are not seen by one trace."""

    def __init__(self, read) -> None:
        super().__init__()
        self.read = read
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        return self.l2(h) if self.read(x) else self.l3(torch.tanh(h))


READS = [
    lambda x: x.sum() > -1e9,
    lambda x: x.sum().item() > -1e9,
    lambda x: float(x.mean()) > -1e9,
]


@pytest.mark.parametrize("read", READS, ids=["bool", "item", "float"])
def test_value_dependent_branches_are_refused_by_default(read):
    """One trace sees one branch: a rescaling found there changes the outputs of inputs that
    take the other, so discovery refuses, naming the op and the module."""
    model = ValueBranch(read).double()
    x = torch.randn(5, 3, dtype=DTYPE)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(gaugefix.ValueDependentError, match=r"read a tensor value in '<root>'"):
        gaugefix.discover(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("read", READS, ids=["bool", "item", "float"])
def test_value_dependent_opt_in_covers_the_traced_path_and_says_so(read):
    model = ValueBranch(read).double()
    x = torch.randn(5, 3, dtype=DTYPE)
    s = gaugefix.discover(model, x, allow_value_dependent=True)
    assert s.num_generators == 4  # exact for the path traced
    assert "l3" not in {name.split(".")[0] for name in s.params}
    assert "l3.weight, l3.bias" in s.notes[0] and "exact only for inputs" in s.notes[0]
    assert "note: traced one path" in s.summary()
    # the structure is exact on the traced path ...
    before = model(x)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, model(x)) <= TOL


def test_the_value_dependent_failure_the_refusal_prevents():
    """Without the refusal: l1's channels are neurons on the traced branch, and inputs on the
    other branch (through l3, never traced) change when the structure is applied."""
    model = ValueBranch(lambda x: x.sum() > 0).double()
    x = torch.randn(5, 3, dtype=DTYPE).abs()
    s = gaugefix.discover(model, x, allow_value_dependent=True)
    other = -x  # takes the untraced branch
    before = model(other)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, model(other)) > 1e-3


# Reads of values that do not go through ``bool()``/``item()``: a Python bool or number computed
# from a tensor, or the shape of a tensor whose shape depends on values (how many entries a
# mask selects, how often a loop over them runs).
HIDDEN_READS = {
    "torch.equal": lambda x: not torch.equal(x, x + 1),
    "torch.allclose": lambda x: torch.allclose(x, x),
    "is_nonzero": lambda x: torch.is_nonzero(x.sum() > -1e9),
    "in": lambda x: 1e9 not in x,
    "complex": lambda x: complex(x.sum()).real > -1e9,
    "numpy array": lambda x: np.asarray(x.detach()).max() > -1e9,
    "format": lambda x: f"{x.sum():.3f}" != "",
    "len(nonzero)": lambda x: len((x > 1e9).nonzero()) == 0,
    "masked numel": lambda x: x[x > 1e9].numel() == 0,
    "unique size": lambda x: torch.unique(x > 0).size(0) > 0,
    "where shape": lambda x: torch.where(x > 1e9)[0].shape[0] == 0,
    "loop over nonzero": lambda x: not any(True for _ in (x > 1e9).nonzero()),
}


@pytest.mark.parametrize("read", list(HIDDEN_READS.values()), ids=list(HIDDEN_READS))
def test_hidden_value_reads_are_refused(read):
    model = ValueBranch(read).double()
    x = torch.randn(5, 3, dtype=DTYPE)
    assert read(x)  # the example takes the l2 branch
    with pytest.raises(gaugefix.ValueDependentError, match=r" read .* in '<root>'"):
        gaugefix.discover(model, x)
    s = gaugefix.discover(model, x, allow_value_dependent=True)
    assert s.num_generators == 4 and "exact only for inputs" in s.notes[0]


class Picked(nn.Module):
    """relu(l1(x)) with its channels rearranged by an index that depends on the data (or is
    drawn at random): another input puts another channel where the consumer l3 reads."""

    def __init__(self, pick) -> None:
        super().__init__()
        self.pick = pick
        self.l1, self.l2, self.l3 = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        order = self.l2(x)[0].argsort()
        return self.l3(self.pick(h, order))


PICKS = {
    "h[:, order]": (lambda h, o: h[:, o], 1),
    "h[..., order]": (lambda h, o: h[..., o], 1),
    "h[:, mask]": (lambda h, o: h[:, o < 3].sum(-1, keepdim=True).expand(-1, 6), 1),
    "narrow": (lambda h, o: h.narrow(1, (o[0] > 2).long() * 3, 3).repeat(1, 2), 1),
    "index_add": (lambda h, o: h.new_zeros(6, h.shape[0]).index_add(0, o, h.T).T, 1),
    "scatter_add": (lambda h, o: torch.zeros_like(h).scatter_add(1, o.expand_as(h), h), 1),
    "randperm": (lambda h, o: h[:, torch.randperm(6)], 1),
    "rows only": (lambda h, o: h[(o % h.shape[0])[: h.shape[0]]], 6),  # tokens: free
}


@pytest.mark.parametrize("pick, expected", list(PICKS.values()), ids=list(PICKS))
def test_channels_picked_by_data_dependent_indices_share_one_factor(pick, expected):
    torch.manual_seed(13)
    model = Picked(pick).double()
    x = torch.randn(6, 3, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    assert s.num_generators == expected, s.summary()
    others = [torch.randn(6, 3, dtype=DTYPE) * k for k in (1.0, -3.0, 10.0)]
    before = []
    for k, other in enumerate(others):
        torch.manual_seed(k)
        before.append(model(other))
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(0))
    for k, other in enumerate(others):
        torch.manual_seed(k)
        assert rel_change(before[k], model(other)) <= TOL, s.summary()


def test_value_reads_of_constants_and_buffers_are_not_value_dependent():
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.register_buffer("enabled", torch.tensor(1.0))

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.l1(x))
            if bool(self.enabled > 0) and torch.tensor(3).item() == 3:
                h = h * 2.0
            return self.l2(h)

    s = gaugefix.discover(Constant().double(), torch.randn(5, 3, dtype=DTYPE))
    assert s.num_generators == 4 and s.notes == ()


def test_value_reads_of_the_input_are_refused_even_with_every_parameter_used():
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            assert bool(torch.isfinite(x).all())
            return self.l2(F.relu(self.l1(x)))

    with pytest.raises(gaugefix.ValueDependentError):
        gaugefix.discover(Checked().double(), torch.randn(5, 3, dtype=DTYPE))
    s = gaugefix.discover(
        Checked().double(), torch.randn(5, 3, dtype=DTYPE), allow_value_dependent=True
    )
    assert s.num_generators == 4 and "parameters not used" not in s.notes[0]


def test_discover_rejects_non_modules():
    with pytest.raises(TypeError):
        gaugefix.discover(lambda x: x, torch.randn(2))


def assert_generators_and_exact(model: nn.Module, expected: int) -> None:
    """``model`` (input width 3), discovered on 4 normal inputs, has ``expected`` generators,
    and a random gauge of it keeps its function on 9 others to ``TOL``."""
    s = gaugefix.discover(model, torch.randn(4, 3, dtype=DTYPE))
    assert s.num_generators == expected, s.summary()
    other = torch.randn(9, 3, dtype=DTYPE)
    before = model(other)
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, model(other)) <= TOL


class CastWeight(nn.Module):
    """relu(x W1^T + b1) W2^T + b2 with W1 passed through a cast or copy first."""

    def __init__(self, cast) -> None:
        super().__init__()
        self.cast = cast
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(F.linear(x, self.cast(self.l1.weight), self.l1.bias))
        return self.l2(h)


CASTS = {
    "contiguous": lambda w: w.contiguous(),
    "to its dtype": lambda w: w.to(w.dtype),
    "double": lambda w: w.double(),
    "type_as": lambda w: w.type_as(w),
    "clone": lambda w: w.clone(),
}


@pytest.mark.parametrize("cast", list(CASTS.values()), ids=list(CASTS))
def test_a_cast_that_returns_the_parameter_itself_keeps_its_generators(cast):
    """``W.contiguous()`` of a contiguous ``W`` (or a cast to its own dtype) returns ``W``
    itself; it is not a write into ``W``, which used to fix it (0 generators instead of 6)."""
    torch.manual_seed(0)
    assert_generators_and_exact(CastWeight(cast).double(), 6)


class DtypeOf(nn.Module):
    """A ReLU MLP whose second hidden layer is cast to the dtype of the first (``g.to(h)``,
    ``g.type_as(h)``): ``h`` gives a dtype, none of its values."""

    def __init__(self, cast) -> None:
        super().__init__()
        self.cast = cast
        self.l1, self.l2, self.l3 = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        return self.l3(self.cast(F.relu(self.l2(h)), h))


@pytest.mark.parametrize("cast", [Tensor.to, Tensor.type_as], ids=["to", "type_as"])
def test_a_tensor_that_only_gives_a_dtype_keeps_its_generators(cast):
    """It used to be blocked as an operand of the cast (6 of the 12 generators lost)."""
    torch.manual_seed(0)
    assert_generators_and_exact(DtypeOf(cast).double(), 12)


# --- aliasing, hooks and outputs ---------------------------------------------------------------
def _floats(out) -> list[Tensor]:
    """The floating tensors of an output, in nested tuples, lists, dicts and dataclasses."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    items = out.values() if isinstance(out, dict) else out
    return (
        [t for item in items for t in _floats(item)] if isinstance(out, (list, tuple, dict)) else []
    )


def gauged_change(model: nn.Module, s: gaugefix.GaugeStructure, read, x: Tensor) -> float:
    """The largest relative change of any floating tensor ``read(model, x)`` gives, on ``x`` (not
    the example input), after ``random_gauge_(scale=2)`` on a copy of ``model``."""
    gauged = copy.deepcopy(model)
    gaugefix.random_gauge_(gauged, s, 2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = zip(_floats(read(model, x)), _floats(read(gauged, x)), strict=True)
        return max(rel_change(a, b) for a, b in pairs)


class Repointed(nn.Module):
    """``repoint(h, g)`` gives a tensor holding ``g``'s entries through an op no torch function
    reports (``set_``, ``as_subclass``); l3 reads it, l4 reads ``g``: passing ``h``'s stale
    labels (or none) to l3 would leave l2's factor in the output."""

    def __init__(self, repoint) -> None:
        super().__init__()
        self.repoint = repoint
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(4, 6), nn.Linear(6, 6),
                                              nn.Linear(6, 2), nn.Linear(6, 2))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        g = F.relu(self.l2(h))
        return self.l3(self.repoint(h, g)) + self.l4(g)


@pytest.mark.parametrize(
    "repoint",
    [
        lambda h, g: h.set_(g),
        lambda h, g: torch.zeros_like(h).set_(g.detach()),
        lambda h, g: h.detach().set_(g.detach()),
        lambda h, g: g.detach().as_subclass(Tensor),
    ],
    ids=["h.set_(g)", "zeros.set_(g.detach())", "h.detach().set_(g.detach())", "as_subclass"],
)
def test_tensors_re_pointed_by_untraced_ops_block(repoint):
    torch.manual_seed(20)
    model = randomise_(Repointed(repoint), 20).eval()
    s = gaugefix.discover(model, torch.randn(5, 4, dtype=DTYPE))
    assert gauged_change(model, s, nn.Module.__call__, 3 * torch.randn(8, 4, dtype=DTYPE)) <= TOL
    assert "l2" not in s.generator_layers, s.summary()


@pytest.mark.parametrize("scope", ["module", "global"])
def test_forward_hooks_of_a_module_with_a_rule_are_traced(scope):
    """A rule speaks for what the module's forward returned; a forward hook that changes the
    output (+1 here) must not be covered by it."""
    torch.manual_seed(21)
    model = randomise_(Sandwich(MyReLU()), 21).eval()
    hook = lambda module, args, out: out + 1.0 if isinstance(module, MyReLU) else None  # noqa: E731
    if scope == "module":
        handle = model.mid.register_forward_hook(hook)
    else:
        handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        s = gaugefix.discover(
            model, torch.randn(7, 4, dtype=DTYPE), rules=[(MyReLU, rules.elementwise)]
        )
        assert s.num_generators == 12, s.summary()  # l2's 6 channels feed the hook's + 1
        assert (
            gauged_change(model, s, nn.Module.__call__, 3 * torch.randn(9, 4, dtype=DTYPE)) <= TOL
        )
    finally:
        handle.remove()


@dataclasses.dataclass
class WithHidden:
    logits: Tensor
    hidden: Tensor


class Exposes(nn.Module):
    """Returns its logits and exposes its hidden layer ``h``: in a dataclass, stored on the
    module, or lazily through a generator."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor):
        h = F.relu(self.l1(x))
        logits = self.l3(F.relu(self.l2(h)))
        if self.how == "dataclass":
            return WithHidden(logits, h)
        if self.how == "generator":
            return (t for t in (logits, h))
        self.hidden = h.detach()
        return logits


@pytest.mark.parametrize("how", ["dataclass", "stored on the module"])
def test_hidden_states_in_dataclasses_or_stored_on_modules_are_outputs(how):
    torch.manual_seed(22)
    model = randomise_(Exposes(how), 22).eval()
    s = gaugefix.discover(model, torch.randn(5, 4, dtype=DTYPE))
    read = lambda m, x: (m(x), getattr(m, "hidden", None))  # noqa: E731
    assert gauged_change(model, s, read, 3 * torch.randn(8, 4, dtype=DTYPE)) <= TOL
    assert s.num_generators == 6, s.summary()  # l2's channels; l1's are the hidden output


def test_a_generator_output_is_refused():
    model = Exposes("generator").double()
    with pytest.raises(gaugefix.TracingError, match="iterator"):
        gaugefix.discover(model, torch.randn(5, 4, dtype=DTYPE))


@pytest.mark.parametrize(
    "number", [np.float32(2.0), np.int64(3), True], ids=["np.float32", "np.int64", "bool"]
)
def test_numbers_of_every_python_type_scale_and_shift(number):
    """``h * c`` passes the labels and ``h + c`` (c != 0) blocks for any number ``c``, not just
    int and float (these crashed the tracer)."""
    torch.manual_seed(23)
    scaled = Branches(lambda h: h * number)
    shifted = Branches(lambda h: h + number)
    x = torch.randn(9, 4, dtype=DTYPE)
    for model, expected in ((scaled, 5), (shifted, 0)):
        model = randomise_(model, 23).eval()
        s = gaugefix.discover(model, x)
        assert s.num_generators == expected, s.summary()
        assert (
            gauged_change(model, s, nn.Module.__call__, 3 * torch.randn(6, 4, dtype=DTYPE)) <= TOL
        )


class GatedThrough(nn.Module):
    """``d(op(relu(g(x)) * u(x)))``: a gated unit whose product passes through an op that
    returns its input itself (dropout in eval mode, ``contiguous``) or changes it in place."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.g, self.u, self.d = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.d(self.op(F.relu(self.g(x)) * self.u(x)))


THROUGH = {
    "dropout in eval mode": lambda h: F.dropout(h, 0.1, training=False),
    "contiguous": lambda h: h.contiguous(),
    "relu_": lambda h: F.relu_(h.clone()),
}


@pytest.mark.parametrize("op", list(THROUGH.values()), ids=list(THROUGH))
def test_a_product_returned_as_it_is_keeps_its_generators(op):
    """The product carries two terms per entry; an op that returns it unchanged used to be
    taken for a write needing one term, which blocked them (0 generators instead of 12; the
    gated units of T5's gated-relu and gated-gelu feed-forwards)."""
    torch.manual_seed(0)
    assert_generators_and_exact(GatedThrough(op).double(), 12)
