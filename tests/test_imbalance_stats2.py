"""imbalance_stats against balance_: the open groups of live generators (both sides non-zero, no
closed orbit together) that balance_ holds at h = 0 and ``dead_count`` leaves out (documented: it
counts all-zero sides only)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import gaugefix as gf
from test_solver_audit import Cycle

D = torch.float64


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
