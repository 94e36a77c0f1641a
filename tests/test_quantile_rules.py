"""``quantile``/``nanquantile`` and ``aminmax``: order statistics (or convex combinations of two)
of the entries along a dim, or of every entry.

A positive factor common to the entries compared keeps their order (and their NaNs), so
discovery unites them and the values carry the factor: compared along the tokens (``dim=0``)
every channel keeps its own generator; compared along the channels (or over every entry) the
channels share one. Every structure is checked exactly: a random gauge keeps the float64 outputs
on fresh inputs (other token counts, which move the levels between other order statistics), and
the counts equal those of the same function spelled with ``kthvalue``, ``median``, ``max`` or
``min``. Levels given as a tensor add a leading dim, which the models read level by level.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_ranking_rules import (
    ALONG_CHANNELS,
    ALONG_TOKENS,
    DTYPE,
    TOKENS,
    TOL,
    WIDTH,
    Ranking,
    assert_apart_moves,
    assert_united_exactly,
    ranked,
    tokens,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def change(model: nn.Module, s: gaugefix.GaugeStructure) -> float:
    """The largest relative change of the outputs on the example and on fresh tokens under a
    random gauge of ``s``."""
    inputs = [tokens(TOKENS, 0), tokens(7, 1), tokens(30, 2), tokens(2, 3)]
    with torch.no_grad():
        before = [model(x) for x in inputs]
        assert all(bool(b.isfinite().all()) for b in before)  # a NaN would hide a change
        gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
        return max(rel_change(b, model(x)) for b, x in zip(before, inputs, strict=True))


def levels(*q: float) -> Tensor:
    return torch.tensor(q, dtype=DTYPE)


def positive(h: Tensor) -> Tensor:
    """``h`` with its entries that are not positive made NaN (times ``0 / 0``)."""
    kept = (h > 0).to(h.dtype)
    return h * (kept / kept)


# (the op's spelling, the same function spelled with kthvalue, median, max or min, the count)
CASES: dict[str, tuple[Ranking, Ranking, int]] = {
    "quantile over the tokens, keepdim": (
        lambda h, p: h.quantile(0.3, 0, keepdim=True),
        lambda h, p: h.kthvalue(3, 0, keepdim=True).values,
        ALONG_TOKENS,
    ),
    "torch.quantile over the tokens, lower, keywords": (
        lambda h, p: torch.quantile(h, 0.5, dim=-2, interpolation="lower"),
        lambda h, p: h.kthvalue(5, 0).values,
        ALONG_TOKENS,
    ),
    "quantile, levels as a tensor, over the tokens": (
        lambda h, p: h.quantile(levels(0.1, 0.6, 0.9), 0)[2] - h.quantile(levels(0.1, 0.6), 0)[0],
        lambda h, p: h.kthvalue(8, 0).values - h.kthvalue(2, 0).values,
        ALONG_TOKENS,
    ),
    "quantile, a 0-d level, over the channels": (
        lambda h, p: h.quantile(torch.tensor(0.7, dtype=DTYPE), 1)[:, None],
        lambda h, p: h.kthvalue(4, 1).values[:, None],
        ALONG_CHANNELS,
    ),
    "quantile, levels as a tensor, over the channels, keepdim": (
        lambda h, p: torch.quantile(h, levels(0.2, 0.8), 1, True)[1],
        lambda h, p: h.kthvalue(5, 1, True).values,
        ALONG_CHANNELS,
    ),
    "quantile, higher, over the channels": (
        lambda h, p: h.quantile(0.4, -1, True, interpolation="higher"),
        lambda h, p: h.kthvalue(4, -1, True).values,
        ALONG_CHANNELS,
    ),
    "quantile, midpoint, over the channels": (
        lambda h, p: h.quantile(0.5, 1, interpolation="midpoint")[:, None],
        lambda h, p: h.median(1, True).values,
        ALONG_CHANNELS,
    ),
    "quantile, nearest, of every entry": (
        lambda h, p: h.quantile(0.8, interpolation="nearest"),
        lambda h, p: h.median(),
        ALONG_CHANNELS,
    ),
    "quantile, levels as a tensor, of every entry, keepdim": (
        lambda h, p: torch.quantile(h, levels(0.25, 0.75), keepdim=True).sum(0),
        lambda h, p: h.median().expand(1, 1),
        ALONG_CHANNELS,
    ),
    "nanquantile over the tokens, with NaNs": (
        lambda h, p: positive(h).nanquantile(0.6, 0, True).nansum(0, True),
        lambda h, p: positive(h).nanmedian(0, True).values.nansum(0, True),
        ALONG_TOKENS,
    ),
    "torch.nanquantile over the channels, levels as a tensor, with NaNs": (
        lambda h, p: torch.nanquantile(positive(h), levels(0.3, 0.9), dim=1)[1, :, None].nansum(
            1, True
        ),
        lambda h, p: positive(h).nanmedian(1, True).values.nansum(1, True),
        ALONG_CHANNELS,
    ),
    "nanquantile of every entry, no NaN": (
        lambda h, p: h.nanquantile(0.75, interpolation="lower"),
        lambda h, p: h.nanmedian(),
        ALONG_CHANNELS,
    ),
    "aminmax over the tokens, max": (
        lambda h, p: torch.aminmax(h, dim=0, keepdim=True).max,
        lambda h, p: h.max(0, True).values,
        ALONG_TOKENS,
    ),
    "aminmax over the tokens, unpacked": (
        lambda h, p: (lambda lo, hi: hi - 2 * lo)(*h.aminmax(dim=0)),
        lambda h, p: h.max(0).values - 2 * h.min(0).values,
        ALONG_TOKENS,
    ),
    "aminmax over the channels, min": (
        lambda h, p: -h.aminmax(dim=-1).min[:, None],
        lambda h, p: -h.min(-1, True).values,
        ALONG_CHANNELS,
    ),
    "aminmax of every entry": (
        lambda h, p: torch.aminmax(h)[1] - torch.aminmax(h).min,
        lambda h, p: h.max() - h.min(),
        ALONG_CHANNELS,
    ),
    "aminmax of every entry, keepdim": (
        lambda h, p: -h.aminmax(keepdim=True)[0],
        lambda h, p: -h.amin((0, 1), keepdim=True),
        ALONG_CHANNELS,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_order_statistics_unite_the_compared_entries_exactly(case):
    """The op unites the entries it compares (each channel's tokens, or the channels): as many
    generators as the ``kthvalue``/``median``/``max``/``min`` spelling, and a random gauge keeps
    the outputs."""
    assert_united_exactly(*CASES[case], change)


# ops over the channels: a structure with one factor per channel reorders them
ACROSS = [case for case, (_, _, expected) in CASES.items() if expected == ALONG_CHANNELS]


@pytest.mark.parametrize("case", ACROSS)
def test_channels_with_different_factors_would_be_reordered(case):
    """The generators of the model without the op (one per channel) change its outputs: the
    channels compared must be united, not passed on with their own factors."""
    assert_apart_moves(CASES[case][0], change)


# a parameter compared, or used as levels: it is fixed
PARAMETERS: dict[str, Ranking] = {
    "quantile of a parameter": lambda h, p: h * p.quantile(0.5),
    "nanquantile of a parameter, levels as a tensor": lambda h, p: (
        h * p.nanquantile(levels(0.5))[0]
    ),
    "aminmax of a parameter": lambda h, p: h * torch.aminmax(p, dim=0).max,
    "levels the parameter times 1/4": lambda h, p: h.quantile(p * 0.25, 0).sum(0),
}


@pytest.mark.parametrize("case", list(PARAMETERS))
def test_a_parameter_compared_is_fixed(case):
    model = ranked(PARAMETERS[case])
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert "p" not in s.params, s.summary()
    assert change(model, s) <= TOL


def quantile_out(h: Tensor, p: Tensor) -> Tensor:
    buf = torch.empty(WIDTH, dtype=DTYPE)
    with torch.no_grad():  # out= refuses tensors that require grad
        torch.quantile(h, 0.5, 0, out=buf)
    return buf


def aminmax_out(h: Tensor, p: Tensor) -> Tensor:
    lo, hi = torch.empty(WIDTH, dtype=DTYPE), torch.empty(WIDTH, dtype=DTYPE)
    with torch.no_grad():
        torch.aminmax(h, dim=0, out=(lo, hi))
    return hi


# a dim given as a tensor and out=: they block what the op compares
BLOCKED: dict[str, Ranking] = {
    "quantile, dim as a tensor": lambda h, p: h.quantile(0.5, torch.tensor(0)),
    "aminmax, dim as a tensor": lambda h, p: h.aminmax(dim=torch.tensor(0)).max,
    "quantile(out=)": quantile_out,
    "aminmax(out=)": aminmax_out,
}


@pytest.mark.parametrize("case", list(BLOCKED))
def test_tensor_dims_and_out_block(case):
    """The channels ``p`` produces are excluded; ``p`` divides out ``inp``'s factors, which keep
    their generators."""
    model = ranked(BLOCKED[case])
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert s.num_generators == WIDTH and bool((s.produced["p"] == -1).all()), s.summary()
    assert change(model, s) <= TOL


def test_levels_read_from_the_activations_are_kept():
    """Levels read from channels 0 and 1 of ``h`` (small enough to stay in [0, 1]) move with
    their factors: those two channels are excluded, and the outputs are kept."""

    def f(h: Tensor, p: Tensor) -> Tensor:
        return h.nanquantile(h[0, :2].abs() * 1e-3, 0, interpolation="higher").sum(0)

    model = ranked(f)
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert s.num_generators == ALONG_TOKENS - 2, s.summary()
    assert "quantile level" in s.summary()
    assert change(model, s) <= TOL
