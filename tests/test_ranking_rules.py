"""Ops that order entries along a dim: ``argmax``/``argmin``/``argsort``, ``kthvalue``,
``median``/``nanmedian``, ``mode``, ``msort``, ``cummax``/``cummin``.

A positive factor common to the entries compared keeps their order, so discovery unites them:
the places returned are the same under the gauge, and the values carry the factor. Compared
along the tokens (``dim=0``) every channel keeps its own generator; compared along the channels
(or over every entry) the channels share one. Every structure is checked exactly: a random gauge
keeps the float64 outputs on fresh inputs (which rank other entries first), and the counts equal
those of the same function spelled with ``topk``, ``sort`` or ``max``. The models read the op's
result on a path of its own (places weigh ``h`` by a function of them, values feed a layer of
their own), so nothing after the op unites the entries it compares.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

DTYPE, TOL = torch.float64, 1e-10
WIDTH, IN, TOKENS = 6, 4, 9
SLOPE = 0.1
# a structure that leaves the compared entries apart changes the outputs by far more than this
MOVED = 1e-3
# generators when the tokens are compared (each channel of ``inp`` and each channel the gain
# ``p`` produces) and when the channels are (those ``p`` produces united; ``p`` divides out
# ``inp``'s factors, which keep their generators)
ALONG_TOKENS, ALONG_CHANNELS = 2 * WIDTH, WIDTH + 1

Ranking = Callable[[Tensor, Tensor], Tensor]


class Ranked(nn.Module):
    """``o(relu(h)) + v(relu(f(h, p)))`` with ``h = leaky_relu(inp(x)) * p``: ``p`` a gain of
    ``h``'s channels, ``f(h, p)`` broadcastable against ``h [tokens, WIDTH]`` (no ties among the
    entries of ``h``, unlike ReLU's zeros, so a wrong factor reorders them)."""

    def __init__(self, f: Ranking) -> None:
        super().__init__()
        self.f = f
        self.inp = nn.Linear(IN, WIDTH)
        self.o, self.v = nn.Linear(WIDTH, 2), nn.Linear(WIDTH, 2)
        self.p = nn.Parameter(torch.rand(WIDTH) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.inp(x), SLOPE) * self.p
        r = self.f(h, self.p).expand(len(x), WIDTH)
        return self.o(torch.relu(h)) + self.v(torch.relu(r))


def ranked(f: Ranking) -> nn.Module:
    torch.manual_seed(0)
    return Ranked(f).to(DTYPE)


def tokens(n: int, seed: int) -> Tensor:
    return torch.randn(n, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def change(model: nn.Module, s: gaugefix.GaugeStructure) -> float:
    """The largest relative change of the outputs on the example and on fresh tokens under a
    random gauge of ``s``."""
    inputs = [tokens(TOKENS, 0), tokens(7, 1), tokens(30, 2)]
    with torch.no_grad():
        before = [model(x) for x in inputs]
        gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
        return max(rel_change(b, model(x)) for b, x in zip(before, inputs, strict=True))


def weighed(h: Tensor, places: Tensor) -> Tensor:
    """``h`` times a function of the places (no factor): other places, other outputs."""
    return h * places.to(h.dtype).cos()


# (the op's spelling, the same function spelled with topk, sort or max, the expected count)
CASES: dict[str, tuple[Ranking, Ranking, int]] = {
    "argmax over the tokens": (
        lambda h, p: weighed(h, h.argmax(0, keepdim=True)),
        lambda h, p: weighed(h, h.topk(1, 0).indices),
        ALONG_TOKENS,
    ),
    "torch.argmax positional, no keepdim": (
        lambda h, p: weighed(h, torch.argmax(h, 0)),
        lambda h, p: weighed(h, h.max(0).indices),
        ALONG_TOKENS,
    ),
    "argmax over the channels, keyword dim": (
        lambda h, p: weighed(h, torch.argmax(h, dim=-1, keepdim=True)),
        lambda h, p: weighed(h, h.topk(1, -1).indices),
        ALONG_CHANNELS,
    ),
    "argmax over every entry": (
        lambda h, p: weighed(h, h.argmax()),
        lambda h, p: weighed(h, h.reshape(-1).topk(1).indices),
        ALONG_CHANNELS,
    ),
    "argmin over the tokens": (
        lambda h, p: weighed(h, h.argmin(dim=0, keepdim=True)),
        lambda h, p: weighed(h, h.topk(1, 0, largest=False).indices),
        ALONG_TOKENS,
    ),
    "argmin over every entry, keepdim": (
        lambda h, p: weighed(h, torch.argmin(h, keepdim=True)),
        lambda h, p: weighed(h, h.reshape(-1).topk(1, largest=False).indices),
        ALONG_CHANNELS,
    ),
    "argsort over the tokens": (
        lambda h, p: weighed(h, h.argsort(0, descending=True)),
        lambda h, p: weighed(h, h.sort(0, descending=True).indices),
        ALONG_TOKENS,
    ),
    "torch.argsort stable over the channels": (
        lambda h, p: weighed(h, torch.argsort(h, stable=True, dim=-1)),
        lambda h, p: weighed(h, h.sort(dim=-1, stable=True).indices),
        ALONG_CHANNELS,
    ),
    "msort": (lambda h, p: h.msort(), lambda h, p: h.sort(0).values, ALONG_TOKENS),
    "torch.msort": (lambda h, p: torch.msort(h), lambda h, p: h.sort(0).values, ALONG_TOKENS),
    "kthvalue values over the tokens": (
        lambda h, p: h.kthvalue(2, 0, keepdim=True).values,
        lambda h, p: h.topk(2, 0, largest=False).values[1:],
        ALONG_TOKENS,
    ),
    "kthvalue places over the tokens": (
        lambda h, p: weighed(h, torch.kthvalue(h, 2, dim=0, keepdim=True).indices),
        lambda h, p: weighed(h, h.topk(2, 0, largest=False).indices[1:]),
        ALONG_TOKENS,
    ),
    "kthvalue over the channels, default dim": (
        lambda h, p: h.kthvalue(2).values[:, None],
        lambda h, p: h.topk(2, -1, largest=False).values[:, 1:],
        ALONG_CHANNELS,
    ),
    "median over the tokens": (
        lambda h, p: h.median(0, keepdim=True).values,
        lambda h, p: h.sort(0).values[(len(h) - 1) // 2],
        ALONG_TOKENS,
    ),
    "median places over the channels": (
        lambda h, p: weighed(h, torch.median(h, -1, True).indices),
        lambda h, p: weighed(h, h.sort(-1).indices[:, (WIDTH - 1) // 2, None]),
        ALONG_CHANNELS,
    ),
    "median of every entry": (
        lambda h, p: h.median(),
        lambda h, p: h.reshape(-1).sort().values[(h.numel() - 1) // 2],
        ALONG_CHANNELS,
    ),
    "nanmedian over the tokens": (
        lambda h, p: torch.nanmedian(h, dim=-2).values,
        lambda h, p: h.sort(0).values[(len(h) - 1) // 2],
        ALONG_TOKENS,
    ),
    "nanmedian of every entry": (
        lambda h, p: h.nanmedian(),
        lambda h, p: h.reshape(-1).sort().values[(h.numel() - 1) // 2],
        ALONG_CHANNELS,
    ),
    "mode over the tokens": (
        lambda h, p: h.mode(0, True).values,
        lambda h, p: h.topk(1, 0, largest=False).values,
        ALONG_TOKENS,
    ),
    "mode places over the channels": (
        lambda h, p: weighed(h, torch.mode(h, dim=1, keepdim=True).indices),
        lambda h, p: weighed(h, h.topk(1, 1, largest=False).indices),
        ALONG_CHANNELS,
    ),
    "cummax over the tokens": (
        lambda h, p: h.cummax(0).values,
        lambda h, p: h.sort(0).values,
        ALONG_TOKENS,
    ),
    "cummax over the channels": (
        lambda h, p: torch.cummax(h, dim=-1).values,
        lambda h, p: h.sort(1).values,
        ALONG_CHANNELS,
    ),
    "cummax places over the channels": (
        lambda h, p: weighed(h, h.cummax(1).indices),
        lambda h, p: weighed(h, h.sort(1).indices),
        ALONG_CHANNELS,
    ),
    "cummin over the tokens": (
        lambda h, p: torch.cummin(h, 0)[0],
        lambda h, p: h.sort(0).values,
        ALONG_TOKENS,
    ),
    "cummin places over the channels": (
        lambda h, p: weighed(h, h.cummin(dim=1).indices),
        lambda h, p: weighed(h, h.sort(1).indices),
        ALONG_CHANNELS,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ranking_unites_the_compared_entries_exactly(case):
    """The op unites the entries it compares (each channel's tokens, or the channels): as many
    generators as the ``topk``/``sort``/``max`` spelling, and a random gauge keeps the
    outputs."""
    assert_united_exactly(*CASES[case], change)


def assert_united_exactly(
    spelled: Ranking, reference: Ranking, expected: int, change: Callable
) -> None:
    """``spelled`` and its ``reference`` spelling give ``expected`` generators, and a random
    gauge of them keeps ``spelled``'s outputs (``change``) to :data:`TOL`."""
    model = ranked(spelled)
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    ref = gaugefix.discover(ranked(reference), tokens(TOKENS, 0))
    assert s.num_generators == ref.num_generators == expected, s.summary()
    assert change(model, s) <= TOL


# ops over the channels: a structure with one factor per channel reorders them
ACROSS = [case for case, (_, _, expected) in CASES.items() if expected == ALONG_CHANNELS]


@pytest.mark.parametrize("case", ACROSS)
def test_channels_with_different_factors_would_be_reordered(case):
    """The generators of the model without the op (one per channel) change its outputs: the
    channels compared must be united, not passed on with their own factors."""
    assert_apart_moves(CASES[case][0], change)


def assert_apart_moves(spelled: Ranking, change: Callable) -> None:
    """The structure of the model without the op (one factor per channel) changes
    ``spelled``'s outputs by more than :data:`MOVED`."""
    apart = gaugefix.discover(ranked(lambda h, p: h), tokens(TOKENS, 0))
    assert apart.num_generators == ALONG_TOKENS
    assert change(ranked(spelled), apart) > MOVED


# a parameter compared: it is fixed
PARAMETERS: dict[str, Ranking] = {
    "argmax of a parameter": lambda h, p: weighed(h, p.argmax()),
    "argsort of a parameter": lambda h, p: weighed(h, p.argsort()),
    "kthvalue of a parameter": lambda h, p: weighed(h, p.kthvalue(2).indices),
    "cummax of a parameter": lambda h, p: p.cummax(0).values,
    "median of a parameter": lambda h, p: p.median(),
}


@pytest.mark.parametrize("case", list(PARAMETERS))
def test_a_parameter_compared_is_fixed(case):
    model = ranked(PARAMETERS[case])
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert "p" not in s.params, s.summary()
    assert change(model, s) <= TOL


# dims the rules do not read as a plain int: they block what the op compares
BLOCKED: dict[str, Ranking] = {
    "cummax": lambda h, p: h.cummax(torch.tensor(0)).values,
    "argmax": lambda h, p: weighed(h, h.argmax(torch.tensor(0), keepdim=True)),
    "median": lambda h, p: torch.median(h, torch.tensor(0), True).values,
}


@pytest.mark.parametrize("case", list(BLOCKED))
def test_a_dim_given_as_a_tensor_blocks(case):
    """The channels ``p`` produces are excluded; ``p`` divides out ``inp``'s factors, which keep
    their generators."""
    model = ranked(BLOCKED[case])
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert s.num_generators == WIDTH and bool((s.produced["p"] == -1).all()), s.summary()
    assert change(model, s) <= TOL
