"""``equalize_``'s own open groups: ``"activation"`` holds the groups open on its own terms
(activation ranges and counted weights), which can differ from the norm's; and a callable
objective's L-BFGS reaches the default ``tol`` on a smooth float64 objective."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix.minimize import rescaled
from test_equalize_open import max_gap, smooth
from test_open_orbits import cycle, x_in

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
EXACT = 1e-12  # the function, relative to the largest output
SAME = 1e-9  # the equalized parameters from two points of an orbit, relative
TOL = 1e-10  # equalize_'s default tol


def bias_closed():
    """0 and 1 read each other, ``out`` reads 1, nothing feeds them but ``a.bias[0] = -1``,
    which the ReLU zeroes on every input. For the norm the bias closes the pair (``c0 <= 0``
    from it, ``c0 = c1`` from the loop, ``c1 >= 0`` from ``out``); ``"activation"`` counts no
    bias and sees zero activations on both channels, so for it the pair is open along
    ``(1, 1)``. Generator 2 is an ordinary fed and read channel."""
    model, s = cycle(3, [(0, 1), (1, 0)], fed=[2], read=[1, 2])
    with torch.no_grad():
        model.a.bias[0] = -1.0
    return model, s


def test_activation_holds_a_group_open_on_its_terms_that_the_norm_closes():
    model, s = bias_closed()
    assert gaugefix.balance_(copy.deepcopy(model), s).dead_generators.tolist() == []
    x = x_in()
    with torch.no_grad():
        y = model(x)
    start = copy.deepcopy(model)
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    assert result.dead_generators.tolist() == [0, 1]
    assert bool((result.h[[0, 1]] == 0).all()) and result.converged
    with torch.no_grad():
        assert float((model(x) - y).abs().max()) <= EXACT * float(y.abs().max())
    for seed in range(2):
        h0 = torch.randn(s.num_generators, generator=torch.Generator().manual_seed(seed), dtype=D)
        h0[[0, 1]] = 0.0
        moved = copy.deepcopy(start)
        gaugefix.apply_gauge_(moved, s, h0)
        again = gaugefix.equalize_(moved, s, "activation", calibration=x)
        assert again.dead_generators.tolist() == [0, 1]
        assert max_gap(moved, model) <= SAME


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    return model, gaugefix.discover(model, torch.randn(1, 3, dtype=D))


def test_a_smooth_callable_objective_converges_at_the_default_tolerance():
    """``sum theta^2 + theta^4`` on an MLP: near the minimum L-BFGS's value-based line search
    cannot see a decrease below ``J``'s rounding (``|g|^2 / curvature < eps |J|``, from
    ``|g|`` about ``1e-8``) while the gradient is still exact far below ``tol``."""
    model, s = mlp()
    result = gaugefix.equalize_(model, s, smooth)
    assert result.converged
    h = torch.zeros(s.num_generators, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth(rescaled(s.bind(model), s, h)), h)
    assert float(grad.abs().max()) <= TOL


class _ScaledNorm(nn.Module):
    """``p * LayerNorm(x)`` with ``p`` a 0-dim parameter (a shape with no dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.p = nn.LayerNorm(2, bias=False), nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p * self.norm(x)


def test_activation_open_group_test_takes_a_0_dim_parameter():
    """The open-group test lays each counted weight out as a matrix; a 0-dim one has no dims to
    lay out (it crashed in ``permute``). The gain's generator is balanced, the function kept."""
    torch.manual_seed(0)
    model, x = _ScaledNorm().double(), torch.randn(3, 2, dtype=torch.float64)
    s = gaugefix.discover(model, x)
    with torch.no_grad():
        model.norm.weight.mul_(3.0)
        y = model(x)
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    assert s.num_generators == 1 and result.converged and float(result.h.abs()) > 0.1
    with torch.no_grad():
        assert float((model(x) - y).abs().max()) <= 1e-12 * float(y.abs().max())
