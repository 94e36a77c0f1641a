"""Expert weights gathered per token by data-dependent rows, ``W[rows]``: a generator may pair
units of slices only when every input pairs them the same way. The same index tensor (or a view
of it) for both weights pairs expert ``e`` with itself: per-expert generators. Two different
indices (two routers) pair the experts as the example happens to route, so those units are
blocked, and a random gauge of what is found keeps the outputs for any routing, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

DTYPE, TOL = torch.float64, 1e-10
EXPERTS, WIDTH, UNITS, TOKENS = 3, 4, 3, 6


class TwoGathers(nn.Module):
    """``x -> relu(lin_in x) = h``; token ``t``: ``relu(h up[first[t]]) down[second[t]]``;
    then ``lin_out(relu(.))``. ``up [experts, width, units]``, ``down [experts, units, width]``.
    With ``reverse``, token ``t``'s units go on through the down weights of token ``T - 1 - t``."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        self.reverse = reverse
        self.lin_in, self.lin_out = nn.Linear(3, WIDTH), nn.Linear(WIDTH, 2)
        self.up = nn.Parameter(torch.randn(EXPERTS, WIDTH, UNITS))
        self.down = nn.Parameter(torch.randn(EXPERTS, UNITS, WIDTH))

    def forward(self, x: Tensor, first: Tensor, second: Tensor) -> Tensor:
        h = F.relu(self.lin_in(x)).unsqueeze(1)  # [tokens, 1, width]
        units = F.relu(torch.bmm(h, self.up[first]))
        if self.reverse:
            units = units.flip(0)
        out = torch.bmm(units, self.down[second]).squeeze(1)
        return self.lin_out(F.relu(out))


def routed(x: Tensor, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` with every expert hit: ``first[t] = t mod experts``, ``second = first + shift``."""
    first = torch.arange(x.shape[0]) % EXPERTS
    return x, first, (first + shift) % EXPERTS


def gauge_keeps_outputs(model: nn.Module, s: gaugefix.GaugeStructure, *inputs: tuple) -> bool:
    before = [model(*args) for args in inputs]
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    return all(rel_change(b, model(*args)) <= TOL for b, args in zip(before, inputs, strict=True))


def test_two_indices_pairing_experts_by_the_example_routing_are_blocked():
    torch.manual_seed(0)
    model = TwoGathers().to(DTYPE)
    x = torch.randn(TOKENS, 3, dtype=DTYPE)
    s = gaugefix.discover(model, *routed(x, shift=1))  # pairs up[e] with down[e + 1]
    assert s.num_generators == WIDTH + WIDTH  # lin_in's neurons, the summed output channels
    reasons = [e.reason for e in s.excluded]
    assert any("'up' and 'down'" in r and "bmm" in r for r in reasons), reasons
    other = torch.randn(TOKENS, 3, dtype=DTYPE)
    assert gauge_keeps_outputs(model, s, routed(x, 1), routed(other, 0), routed(other, 2))


@pytest.mark.parametrize("second", ["same", "view", "expand"])
def test_one_index_for_both_weights_keeps_every_experts_units(second):
    torch.manual_seed(0)
    model = TwoGathers().to(DTYPE)
    x = torch.randn(TOKENS, 3, dtype=DTYPE)
    first = torch.arange(TOKENS) % EXPERTS
    arranged = {
        "same": first,
        "view": first.view(TOKENS, 1).view(-1),
        "expand": first.unsqueeze(0).expand(2, TOKENS)[1],
    }[second]
    s = gaugefix.discover(model, x, first, arranged)
    assert s.num_generators == WIDTH + EXPERTS * UNITS + WIDTH
    other = torch.randn(TOKENS, 3, dtype=DTYPE)
    reversed_ = (2 - first, 2 - first)
    assert gauge_keeps_outputs(model, s, (x, first, first), (other, *reversed_))


def test_one_index_with_positions_that_do_not_line_up_is_blocked():
    """Token ``t``'s up units meet the down weights token ``T - 1 - t`` picked: the example pairs
    expert 1 with itself (tokens 1 and 4), which another routing does not."""
    torch.manual_seed(0)
    model = TwoGathers(reverse=True).to(DTYPE)
    x = torch.randn(TOKENS, 3, dtype=DTYPE)
    first = torch.arange(TOKENS) % EXPERTS
    s = gaugefix.discover(model, x, first, first)
    assert s.num_generators == WIDTH + WIDTH
    other = torch.randn(TOKENS, 3, dtype=DTYPE)
    shuffled = torch.tensor([1, 0, 2, 2, 1, 0])
    assert gauge_keeps_outputs(model, s, (x, first, first), (other, shuffled, shuffled))


class ShiftedInPlace(TwoGathers):
    """:class:`TwoGathers` whose down weights are picked after the index is shifted in place:
    ``first + 1`` in the same storage."""

    def forward(self, x: Tensor, first: Tensor, second: Tensor) -> Tensor:
        h = F.relu(self.lin_in(x)).unsqueeze(1)
        units = F.relu(torch.bmm(h, self.up[first]))
        first.add_(1).remainder_(EXPERTS)
        return self.lin_out(F.relu(torch.bmm(units, self.down[first]).squeeze(1)))


def test_one_index_written_in_place_between_the_gathers_is_blocked():
    torch.manual_seed(0)
    model = ShiftedInPlace().to(DTYPE)
    x = torch.randn(TOKENS, 3, dtype=DTYPE)
    s = gaugefix.discover(model, x, torch.arange(TOKENS) % EXPERTS, None)
    assert s.num_generators == WIDTH + WIDTH
    other = torch.randn(TOKENS, 3, dtype=DTYPE)
    routing = torch.tensor([1, 0, 2, 2, 1, 0])  # the model shifts its index: a fresh one a call
    before = [model(inputs, routing.clone(), None) for inputs in (x, other)]
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    after = [model(inputs, routing.clone(), None) for inputs in (x, other)]
    assert all(rel_change(b, a) <= TOL for b, a in zip(before, after, strict=True))
