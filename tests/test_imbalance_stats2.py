"""imbalance_stats against balance_: float32 statistics in float32's range, and the open groups of
live generators (both sides non-zero, no closed orbit together) that balance_ holds at h = 0 and
``dead_count`` leaves out (documented: it counts all-zero sides only). Float32 statistics out of
float32's range are test_soft_audit2's strict xfail."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import gaugefix as gf
from gaugefix import zoo

D = torch.float64


def float32_mlp(scale: float) -> tuple[nn.Module, gf.GaugeStructure]:
    """A float32 ReLU MLP (3-8-8-2) off balance (a random gauge), every entry times ``scale``."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 8, 8, 2)).float()
    s = gf.discover(model, torch.randn(1, 3))
    gf.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model, s


def test_float32_stats_in_range_agree_with_a_float64_copy():
    """The control: at scale 1 float32 sums give float64's statistics to float32 rounding."""
    model, s = float32_mlp(1.0)
    stats = gf.imbalance_stats(model, s)
    wide = gf.imbalance_stats(copy.deepcopy(model).double(), s)
    assert stats["dead_count"] == wide["dead_count"] == 0
    assert abs(stats["mu_rel_max"] - wide["mu_rel_max"]) <= 1e-6
    assert wide["mu_rel_max"] > 0.1  # off balance: the comparison can fail


class Cycle(nn.Module):
    """``out(relu(loop(relu(loop(relu(a(x)))))))``: ``loop.weight[i, j]`` has exponent
    ``h_i - h_j``, ``a.weight[i]`` ``+h_i``, ``out.weight[:, j]`` ``-h_j``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.loop, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.loop(torch.relu(self.a(x))))
        return self.out(torch.relu(self.loop(h)))


def open_pair() -> tuple[nn.Module, gf.GaugeStructure]:
    """Generators 0 and 1 read each other, only 0 is fed and neither is read: both sides of each
    non-zero, but ``h = (-t, -t)`` lowers every mass they touch (an open group). Generator 2 is
    fed and read (closed), and off balance."""
    torch.manual_seed(0)
    model = Cycle().to(D)
    s = gf.discover(model, torch.randn(1, 4, dtype=D))
    with torch.no_grad():
        for p in (model.a.weight, model.a.bias, model.loop.weight, model.loop.bias):
            p.zero_()
        model.a.weight[[0, 2]] = torch.randn(2, 4, dtype=D)
        model.a.weight[2] *= 5.0
        model.loop.weight[0, 1], model.loop.weight[1, 0] = 1.0, 2.0
        model.out.weight[:, :2] = 0.0
    return model, s


def test_open_pair_is_live_and_held_by_balance():
    """The setting: no generator has an all-zero side (imbalance_stats counts none dead), yet
    balance_ holds 0 and 1."""
    model, s = open_pair()
    s_in, s_out = gf.moment.in_out_sums(model, s)
    assert bool((torch.minimum(s_in, s_out) > 0).all())
    assert gf.imbalance_stats(model, s)["dead_count"] == 0
    result = gf.balance_(copy.deepcopy(model), s)
    assert result.dead_generators.tolist() == [0, 1] and result.converged
