"""Idioms discovery blocked needlessly, and their near misses that must stay blocked.

A ReLU is written in many ways besides ``F.relu``: ``torch.maximum(h, zeros)``, ``torch.max(h,
zeros)``, ``h.clamp(min=zeros)``, ``torch.where(h > 0, h, torch.tensor(0.))``, ``F.threshold(h,
0, 0)``, ``F.hardtanh(h, 0, inf)``; a leaky ReLU as ``torch.maximum(h, 0.2 * h)``. Each is exact
only against a constant exactly 0 (made in the forward from numbers and shapes: ``zeros``,
``zeros_like``, ``full(..., 0)``, ``tensor(0.)``, casts and views of them), never against a
parameter, a buffer, data, or ``1e-6``. Every structure found must be exact: a random gauge of
scale 2 keeps the float64 outputs to 1e-12, and each accepted idiom keeps the 6 hidden neurons.

Also: a parameter used both as a gain and as a bias, squared ReLU, dropout in training, the
structural ops on hidden channels, attention (causal, grouped-query, ``nn.MultiheadAttention``),
and mixtures of experts written by hand (top-k routing renormalised after the top-k, a shared
expert, a router that reads rescaled channels) and from Hugging Face configs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
SCALE = 2.0
HIDDEN = 6
INF = math.inf


class Hidden(nn.Module):
    """``head(f(self, l1(x)))``: ``l1``'s ``HIDDEN`` units through the activation ``f``, which
    may read the parameters ``a`` (per channel, positive) and ``z`` (zeros), the buffer ``zero``
    (zeros), or the input ``x`` (as ``self.x``)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.LazyLinear(2)
        self.a = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.z = nn.Parameter(torch.zeros(HIDDEN))
        self.register_buffer("zero", torch.zeros(HIDDEN))

    def forward(self, x: Tensor) -> Tensor:
        self.x = x
        y = self.f(self, self.l1(x))
        del self.x
        return self.head(y.reshape(x.shape[0], -1))


def seeded(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with the random state fixed (dropout draws the same mask every call)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        return model(x)


def gauged(model: nn.Module, x: Tensor) -> tuple[gaugefix.GaugeStructure, float]:
    """Discover ``model`` (float64), apply a random gauge of scale 2 and return the structure and
    the largest relative change of the output, on ``x`` and on two fresh inputs."""
    model.to(DTYPE)
    seeded(model, x)  # materialise the lazy head
    fresh = [2 * torch.randn(x.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(s))
             for s in (11, 12)]  # fmt: skip
    before = [seeded(model, t) for t in (x, *fresh)]
    s = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    after = [seeded(model, t) for t in (x, *fresh)]
    return s, max(rel_change(b, a) for b, a in zip(before, after, strict=True))


def hidden(f) -> tuple[gaugefix.GaugeStructure, float]:
    torch.manual_seed(0)
    return gauged(Hidden(f), 2 * torch.randn(5, 4, dtype=DTYPE))


def reasons(s: gaugefix.GaugeStructure) -> str:
    return " | ".join(e.reason for e in s.excluded)


def _zeros(h: Tensor) -> Tensor:
    return torch.zeros(h.shape[-1], dtype=h.dtype)


# --- extrema, clamps and selections against a constant exactly 0 -------------------------------
RELU_SPELLINGS = {
    "maximum(h, zeros_like(h))": lambda m, h: torch.maximum(h, torch.zeros_like(h)),
    "maximum(h, tensor(0.))": lambda m, h: torch.maximum(h, torch.tensor(0.0, dtype=h.dtype)),
    "maximum(zeros(6), h)": lambda m, h: torch.maximum(_zeros(h), h),
    "maximum(h, h.new_zeros(()))": lambda m, h: torch.maximum(h, h.new_zeros(())),
    "maximum(h, zeros(1).to(h))": lambda m, h: torch.maximum(h, torch.zeros(1).to(h)),
    "maximum(h, full_like(h, 0.))": lambda m, h: torch.maximum(h, torch.full_like(h, 0.0)),
    "maximum(h, as_tensor(0.))": lambda m, h: torch.maximum(h, torch.as_tensor(0.0).double()),
    "maximum(h, zeros(1, 6).expand(5, 6))": lambda m, h: torch.maximum(
        h, torch.zeros(1, 6, dtype=h.dtype).expand(5, 6)
    ),
    "-minimum(-h, zeros)": lambda m, h: -torch.minimum(-h, _zeros(h)),
    "minimum(h, zeros)": lambda m, h: torch.minimum(h, _zeros(h)),
    "torch.max(h, zeros_like(h))": lambda m, h: torch.max(h, torch.zeros_like(h)),
    "h.max(zeros)": lambda m, h: h.max(_zeros(h)),
    "torch.min(h, other=zeros)": lambda m, h: torch.min(h, other=_zeros(h)),
    "fmax(h, zeros)": lambda m, h: torch.fmax(h, _zeros(h)),
    "fmin(h, zeros)": lambda m, h: torch.fmin(h, _zeros(h)),
    "maximum(h, 0.2 h)": lambda m, h: torch.maximum(h, 0.2 * h),
    "minimum(h, -h)": lambda m, h: torch.minimum(h, -h),
    "clamp(h, min=zeros)": lambda m, h: h.clamp(min=_zeros(h)),
    "clamp_min(h, zeros)": lambda m, h: torch.clamp_min(h, _zeros(h)),
    "clamp(h, max=0)": lambda m, h: h.clamp(max=0),
    "clamp_max(h, 0.)": lambda m, h: h.clamp_max(0.0),
    "clamp(h, 0, inf)": lambda m, h: h.clamp(0, INF),
    "clamp(h, min=-h, max=2h)": lambda m, h: h.clamp(min=-h.abs(), max=2 * h.abs()),
    "where(h > 0, h, tensor(0.))": lambda m, h: torch.where(h > 0, h, torch.tensor(0.0).to(h)),
    "where(h < 0, zeros, h)": lambda m, h: torch.where(h < 0, _zeros(h), h),
    "threshold(h, 0, 0)": lambda m, h: F.threshold(h, 0.0, 0.0),
    "nn.Threshold(0, 0)": lambda m, h: nn.Threshold(0, 0)(h),
    "threshold_(h, 0, 0)": lambda m, h: torch.threshold_(h.clone(), 0.0, 0.0),
    "hardtanh(h, 0, inf)": lambda m, h: F.hardtanh(h, 0.0, INF),
    "rrelu (eval)": lambda m, h: F.rrelu(h, training=False),
    "rrelu (training)": lambda m, h: F.rrelu(h, training=True),
    "alpha_dropout (eval)": lambda m, h: F.alpha_dropout(F.relu(h), 0.5, training=False),
}


@pytest.mark.parametrize("f", list(RELU_SPELLINGS.values()), ids=list(RELU_SPELLINGS))
def test_relu_spellings_keep_the_hidden_generators(f):
    s, change = hidden(f)
    assert s.num_generators == HIDDEN, s.summary()
    assert change <= TOL, s.summary()


def _written_zeros(h: Tensor) -> Tensor:
    z = _zeros(h)
    z[0] = 1.0
    return z


NEAR_MISSES = {  # not a constant exactly 0: the hidden channels must be blocked
    "maximum(h, full_like(h, 1e-6))": lambda m, h: torch.maximum(h, torch.full_like(h, 1e-6)),
    "maximum(h, tensor(1e-6))": lambda m, h: torch.maximum(h, torch.tensor(1e-6).to(h)),
    "maximum(h, zeros + 1e-6)": lambda m, h: torch.maximum(h, _zeros(h) + 1e-6),
    "maximum(h, parameter)": lambda m, h: torch.maximum(h, m.a),
    "maximum(h, zero parameter)": lambda m, h: torch.maximum(h, m.z),
    "maximum(h, zero parameter * 1)": lambda m, h: torch.maximum(h, m.z * 1.0),
    "maximum(h, zero buffer)": lambda m, h: torch.maximum(h, m.zero),
    "maximum(h, zero buffer.clone())": lambda m, h: torch.maximum(h, m.zero.clone()),
    "maximum(h, zero buffer * 0)": lambda m, h: torch.maximum(h, m.zero * 0),
    "maximum(h, 0 * x.sum())": lambda m, h: torch.maximum(h, 0 * m.x.sum()),
    "maximum(h, ones)": lambda m, h: torch.maximum(h, torch.ones_like(h)),
    "maximum(h, x[:, :1])": lambda m, h: torch.maximum(h, m.x[:, :1]),
    "clamp(h, min=1e-6)": lambda m, h: h.clamp(min=1e-6),
    "clamp(h, min=tensor(1e-6))": lambda m, h: h.clamp(min=torch.tensor(1e-6).to(h)),
    "clamp(h, 0, 6)": lambda m, h: h.clamp(0, 6),
    "clamp(h, min=parameter)": lambda m, h: h.clamp(min=m.z),
    "where(h > 0, h, tensor(0.1))": lambda m, h: torch.where(h > 0, h, torch.tensor(0.1).to(h)),
    "threshold(h, 0.1, 0)": lambda m, h: F.threshold(h, 0.1, 0.0),
    "threshold(h, 0, 1)": lambda m, h: F.threshold(h, 0.0, 1.0),
    "hardshrink(h, 0.5)": lambda m, h: F.hardshrink(h, 0.5),
    "nn.Hardshrink()": lambda m, h: nn.Hardshrink()(h),
    "relu6": lambda m, h: F.relu6(h),
    "hardtanh(h)": lambda m, h: F.hardtanh(h),
    "hardtanh(h, 0, 6)": lambda m, h: F.hardtanh(h, 0.0, 6.0),
    "gelu": lambda m, h: F.gelu(h),
    "silu": lambda m, h: F.silu(h),
    "alpha_dropout (training)": lambda m, h: F.alpha_dropout(F.relu(h), 0.5, training=True),
    # homogeneous of degree 2: the consumer's column would need the factor 1/a^2, which no
    # generator (weights in {-1, 0, 1}) gives
    "relu(h) ** 2": lambda m, h: F.relu(h) ** 2,
    "relu(h).square()": lambda m, h: F.relu(h).square(),
    "relu(h) * relu(h)": lambda m, h: F.relu(h) * F.relu(h),
}


@pytest.mark.parametrize("f", list(NEAR_MISSES.values()), ids=list(NEAR_MISSES))
def test_near_misses_block_the_hidden_channels(f):
    s, change = hidden(f)
    assert s.num_generators == 0, s.summary()
    assert change <= TOL, s.summary()


def test_zeros_written_in_one_entry_keep_the_others():
    """``zeros(6)`` with entry 0 set to 1: channel 0 is ``max(h_0, 1)``, not homogeneous, and
    blocks; channels 1-5 are ReLUs against 0 (the unwritten zeros carry any factor)."""
    s, change = hidden(lambda m, h: torch.maximum(h, _written_zeros(h)))
    assert s.num_generators == HIDDEN - 1, s.summary()
    assert change <= TOL, s.summary()


class LazyFloor(nn.Module):
    """``head(maximum(l1(x), floor))`` where ``floor`` is made as zeros in the first forward,
    kept on the module and raised after every call: zero when traced, not on later calls."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)
        self.floor: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.floor is None:
            self.floor = torch.zeros(HIDDEN, dtype=x.dtype)
        y = torch.maximum(self.l1(x), self.floor)
        self.floor += 0.5
        return self.head(y)


def test_a_zero_kept_on_the_module_and_raised_later_blocks():
    torch.manual_seed(0)
    model = LazyFloor().to(DTYPE)
    x = torch.randn(5, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    assert s.num_generators == 0, s.summary()
    assert "stored on module" in reasons(s)
    before = model(x)
    model.floor -= 0.5  # the call above raised it
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    assert rel_change(before, model(x)) <= TOL


# --- a parameter used both as a gain and as a bias ------------------------------------------
class GainAndBias(nn.Module):
    """``p`` scales ``h`` (a gain) and is added to ``l3(x)`` (a bias). A gain produces fresh
    factors ``f`` and divides those of ``h``: ``p``'s factor is ``f - h`` there and ``l3``'s
    rows' ``g`` as a bias. With ``h`` normalised (factor 0) the two roles agree (``f = g``: one
    generator per channel, with ``l3``'s rows); with ``h`` rescaled ``f = g + h`` relates three
    factors, which no generator states: ``p`` is fixed, and its uses blocked."""

    def __init__(self, normalised: bool, bias_first: bool) -> None:
        super().__init__()
        self.normalised, self.bias_first = normalised, bias_first
        self.l1, self.l3 = nn.Linear(4, HIDDEN), nn.Linear(4, HIDDEN)
        self.l4, self.l5 = nn.Linear(HIDDEN, 2), nn.Linear(HIDDEN, 2)
        self.p = nn.Parameter(torch.rand(HIDDEN) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(x)
        h = F.layer_norm(h, h.shape[-1:]) if self.normalised else F.relu(h)
        g = self.l3(x) + self.p if self.bias_first else None
        y = h * self.p
        g = self.l3(x) + self.p if g is None else g
        return self.l4(F.relu(y)) + self.l5(F.relu(g))


@pytest.mark.parametrize("bias_first", [False, True], ids=["gain first", "bias first"])
@pytest.mark.parametrize("normalised", [True, False], ids=["normalised h", "rescaled h"])
def test_a_parameter_used_as_a_gain_and_as_a_bias(normalised, bias_first):
    torch.manual_seed(0)
    s, change = gauged(GainAndBias(normalised, bias_first), torch.randn(5, 4, dtype=DTYPE))
    assert change <= TOL, s.summary()
    if normalised:  # p's gain generator, with l3's rows
        assert s.num_generators == HIDDEN and "p" in s.params, s.summary()
    else:
        assert s.num_generators == 0 and "two different roles" in reasons(s), s.summary()


# --- structural ops, dropout, attention: guards --------------------------------------------
STRUCTURAL = {
    "cat": (lambda m, h: torch.cat([F.relu(h), F.relu(-h)], -1), HIDDEN),
    "stack": (lambda m, h: torch.stack([F.relu(h), 2 * F.relu(h)], 1), HIDDEN),
    "split, reversed": (lambda m, h: torch.cat(F.relu(h).split(2, -1)[::-1], -1), HIDDEN),
    "chunk": (lambda m, h: F.relu(h).chunk(2, -1)[0], HIDDEN // 2),
    "view, permute, merge": (
        lambda m, h: F.relu(h).view(-1, 2, 3).permute(0, 2, 1).reshape(-1, HIDDEN),
        HIDDEN,
    ),
    "einsum bij->bji": (
        lambda m, h: torch.einsum("bij->bji", F.relu(h).view(-1, 2, 3)).flatten(1),
        HIDDEN,
    ),
    "einsum sum over i": (lambda m, h: torch.einsum("bij->bj", F.relu(h).view(-1, 2, 3)), 3),
    "dropout (training)": (lambda m, h: F.dropout(F.relu(h), 0.5, training=True), HIDDEN),
    "dropout2d (training)": (
        lambda m, h: F.dropout2d(F.relu(h)[..., None, None], 0.5, training=True).flatten(1),
        HIDDEN,
    ),
    "relu_ on a slice": (lambda m, h: torch.cat([h[:, :3].relu_(), h[:, 3:].abs()], 1), HIDDEN),
}


@pytest.mark.parametrize("f, count", list(STRUCTURAL.values()), ids=list(STRUCTURAL))
def test_structural_ops_keep_their_generators(f, count):
    s, change = hidden(f)
    assert s.num_generators == count, s.summary()
    assert change <= TOL, s.summary()


class Attention(nn.Module):
    """Self-attention of ``x [B, L, 8]``: causal ``scaled_dot_product_attention`` with 4 query
    heads over 2 key/value heads (``enable_gqa``), or ``nn.MultiheadAttention`` (2 heads)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.LazyLinear(2)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "mha":
            return self.head(self.mha(x, x, x, need_weights=False)[0])
        b, n = x.shape[:2]
        q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
        k, v = (f(x).view(b, n, 2, 2).transpose(1, 2) for f in (self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.head(y.transpose(1, 2).reshape(b, n, 8))


@pytest.mark.parametrize("kind, kinds", [
    ("gqa", {"query-key": 4, "value-output": 4}),
    ("mha", {"query-key": 8, "value-output": 8, "neuron": 8}),  # the out projection's rows
])  # fmt: skip
def test_attention_finds_its_pairs(kind, kinds):
    torch.manual_seed(0)
    s, change = gauged(Attention(kind), torch.randn(2, 5, 8, dtype=DTYPE))
    assert s.kind_counts() == kinds, s.summary()
    assert change <= TOL, s.summary()


# --- mixtures of experts written by hand ------------------------------------------------------
EXPERTS, TOP_K, WIDTH, UNITS, SHARED = 4, 2, 8, 5, 6


class TopK(nn.Module):
    """``h = relu(inp(x))``; a router picks the top-2 of 4 experts per token and renormalises
    their probabilities after the top-k; each expert is ``down[e] relu(up[e] h)`` (weights
    gathered per token), plus a shared expert; ``out(relu(y))``. ``router`` says what the
    logits read: ``"linear"`` a linear map of ``h`` cast with ``.type`` (DeepSeek), its
    columns divided as every consumer's (the logits do not change); ``"channels"`` the first 4
    channels of ``h`` themselves, which the softmax then blocks."""

    def __init__(self, router: str) -> None:
        super().__init__()
        self.route = router
        self.inp, self.out = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 2)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.up = nn.Parameter(torch.randn(EXPERTS, UNITS, WIDTH))
        self.down = nn.Parameter(torch.randn(EXPERTS, WIDTH, UNITS))
        self.shared_up, self.shared_down = nn.Linear(WIDTH, SHARED), nn.Linear(SHARED, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))  # [T, WIDTH]
        if self.route == "linear":
            logits = self.router(h).type(torch.float32).type(h.dtype)
        else:
            logits = h[:, :EXPERTS]
        weights, chosen = logits.softmax(-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        units = F.relu(self.up[chosen] @ h[:, None, :, None])  # [T, k, UNITS, 1]
        y = (self.down[chosen] @ units)[..., 0]  # [T, k, WIDTH]
        y = (weights[..., None] * y).sum(1) + self.shared_down(F.relu(self.shared_up(h)))
        return self.out(F.relu(y))


@pytest.mark.parametrize("router, blocked", [("linear", 0), ("channels", EXPERTS)])
def test_a_top_k_mixture_with_a_shared_expert_is_exact(router, blocked):
    """Every expert's units and the shared expert's are generators, with ``h``'s neurons (less
    those the router's softmax reads) and ``y``'s channels, exactly on fresh inputs too."""
    torch.manual_seed(0)
    s, change = gauged(TopK(router), torch.randn(32, 4, dtype=DTYPE))
    assert change <= TOL, s.summary()
    assert s.num_generators == WIDTH - blocked + EXPERTS * UNITS + SHARED + WIDTH, s.summary()
    up_rows = s.params["up"].terms[0].index.expand(EXPERTS, UNITS, WIDTH)[..., 0]
    assert up_rows.unique().numel() == EXPERTS * UNITS
