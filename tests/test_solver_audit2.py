"""Second audit of ``balance_`` and ``equalize_`` on pathological float64 models: weights
spanning ``1e+150`` to ``1e-150``, and subnormal entries. The ``"range"`` residual is
recomputed here from the weights: for an MLP ``Linear -> ReLU -> ... -> Linear`` hidden neuron
``j`` of layer ``k`` has ``R_in = max_i |W_k[j, i]|`` and ``R_out = max_i |W_{k+1}[i, j]|``
(biases are not counted) and ``delta = (log R_out - log R_in) / 2``.

``range``'s tie-break (the minimiser of ``J_p = sum_e |theta_e|^p``, ``p = 4``) is computed on
``p``-th powers, which underflow float64 for entries ``2^-255`` below the largest: those
generators were taken for open groups, held at ``h = 0`` and left out of the reported residual
(all of them on the ``1e+150`` model: ``converged`` with a residual of 345 on the weights).
And ``range`` reported its residual before over the generators it holds, after without them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from test_solver_audit import WIDTHS, Cycle, linears, mlp

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
TOL = 1e-10
EXACT = 1e-10  # function, relative (float64)


def hand_logs(model: nn.Sequential) -> tuple[Tensor, Tensor]:
    """``(log R_in, log R_out)`` of every hidden neuron (``[N]`` each, float64)."""
    lins = linears(model)
    r_in = [m.weight.detach().abs().amax(1).log() for m in lins[:-1]]
    r_out = [m.weight.detach().abs().amax(0).log() for m in lins[1:]]
    return torch.cat(r_in), torch.cat(r_out)


def hand_deltas(model: nn.Sequential) -> Tensor:
    """``delta_n`` of every hidden neuron (``[N]``, float64), from the weights."""
    log_in, log_out = hand_logs(model)
    return (log_out - log_in) / 2


def residual_rounding(model: nn.Sequential) -> float:
    """A few ulps of the largest log-range the residual is computed from."""
    largest = float(torch.cat(hand_logs(model)).abs().max())
    return 64 * torch.finfo(D).eps * (1 + largest)


def extreme(seed: int = 0) -> nn.Sequential:
    """The first layer times ``1e150``, the second times ``1e-150``: squares still in float64,
    fourth powers not."""
    model = mlp(WIDTHS, seed)
    with torch.no_grad():
        model[0].weight.mul_(1e150)
        model[0].bias.mul_(1e150)
        model[2].weight.mul_(1e-150)
    return model


def subnormal_row(seed: int = 0) -> nn.Sequential:
    """Hidden neuron 0 of the second layer (generator 6) reads its inputs through the least
    subnormal ``5e-324``: alive, its incoming range ``1e+323`` below its outgoing one."""
    model = mlp(WIDTHS, seed)
    with torch.no_grad():
        model[2].weight[0, :] = 5e-324
    return model


def check_range(model: nn.Sequential) -> gaugefix.EqualizeResult:
    """``equalize_(model, s, "range")`` with its function, reported residuals and convergence
    checked against the weights."""
    s = gaugefix.discover(model, torch.randn(1, WIDTHS[0], dtype=D))
    x = torch.randn(64, WIDTHS[0], dtype=D)
    with torch.no_grad():
        y0 = model(x)
    before = float(hand_deltas(model).abs().max())
    result = gaugefix.equalize_(model, s, "range", tol=TOL)
    with torch.no_grad():
        y1 = model(x)
    assert bool(torch.isfinite(y1).all())
    assert float((y1 - y0).abs().max() / y0.abs().max()) <= EXACT
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    after = float(hand_deltas(model).abs().max())
    assert result.objective_before == pytest.approx(before, abs=residual_rounding(model))
    assert result.objective_after == pytest.approx(after, abs=residual_rounding(model))
    assert result.converged and after <= TOL
    assert result.dead_generators.numel() == 0
    return result


def test_range_balances_weights_1e150_apart():
    """Before: every generator held and reported dead, ``objective_after`` 0 and converged on
    an unmoved model whose residual is 345.6."""
    check_range(extreme())


def test_range_balances_a_neuron_read_through_subnormal_weights():
    """Before: generator 6 held and reported dead, and ``objective_before`` (371.7) counted it
    where ``objective_after`` (1e-16) did not; its residual stayed 371.7 on the weights."""
    check_range(subnormal_row())


def test_range_tie_break_is_start_free_on_weights_1e150_apart():
    """Every point of an orbit equalizes to the same parameters, as on ordinary models. (Not
    on the subnormal row: a gauge rounds its entries to multiples of ``5e-324``, off the
    orbit.)"""
    a, b = extreme(), extreme()
    s = gaugefix.discover(b, torch.randn(1, WIDTHS[0], dtype=D))
    gaugefix.random_gauge_(b, s, 2.0, generator=torch.Generator().manual_seed(5))
    check_range(a)
    check_range(b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("make", [extreme, subnormal_row])
def test_balance_keeps_extreme_models_exact(make):
    """``balance_`` on the same models: ``mu = 0`` by hand, the function kept."""
    model = make()
    s = gaugefix.discover(model, torch.randn(1, WIDTHS[0], dtype=D))
    x = torch.randn(64, WIDTHS[0], dtype=D)
    with torch.no_grad():
        y0 = model(x)
    result = gaugefix.balance_(model, s, tol=TOL)
    with torch.no_grad():
        y1 = model(x)
    assert float((y1 - y0).abs().max() / y0.abs().max()) <= EXACT
    lins = linears(model)
    s_in = torch.cat(
        [m.weight.detach().square().sum(1) + m.bias.detach().square() for m in lins[:-1]]
    )
    s_out = torch.cat([m.weight.detach().square().sum(0) for m in lins[1:]])
    rel = float(((s_in - s_out).abs() / (s_in + s_out)).max())
    assert result.converged and rel <= 10 * TOL and math.isfinite(result.norm_sq_after)
    assert result.dead_generators.numel() == 0


def open_pair() -> Cycle:
    """Channels 0 and 1 read each other, only 0 is fed and neither is read: an open group
    (along ``(-1, -1, 0)`` every entry they carry shrinks). Channel 2 is ordinary."""
    torch.manual_seed(0)
    model = Cycle().to(D)
    with torch.no_grad():
        for p in (model.a.bias, model.loop.weight, model.loop.bias):
            p.zero_()
        model.a.weight[1] = 0.0
        model.loop.weight[0, 1], model.loop.weight[1, 0] = 1.0, 50.0
        model.out.weight[:, :2] = 0.0
    return model


def cycle_deltas(model: Cycle) -> Tensor:
    """``delta_j`` of the three channels, from the weights (``R_in`` over ``a``'s row and
    ``loop``'s row, ``R_out`` over ``loop``'s and ``out``'s columns)."""
    a, loop, out = (m.weight.detach().abs() for m in (model.a, model.loop, model.out))
    r_in = torch.maximum(a.amax(1), loop.amax(1))
    r_out = torch.maximum(loop.amax(0), out.amax(0))
    return (r_out.log() - r_in.log()) / 2


def test_range_reports_both_residuals_over_the_generators_it_balances():
    """``objective_before`` and ``objective_after`` are ``max |delta_n|`` over the same
    generators, those not held (as ``"activation"`` reports them). Before: ``before`` counted
    the held open group (1.956, generators 0 and 1) where ``after`` did not; generator 2's
    residual was 0.453."""
    model = open_pair()
    s = gaugefix.discover(model, torch.randn(1, 4, dtype=D))
    before = cycle_deltas(model)
    x = torch.randn(16, 4, dtype=D)
    with torch.no_grad():
        y0 = model(x)
    result = gaugefix.equalize_(model, s, "range")
    assert result.dead_generators.tolist() == [0, 1] and result.converged
    with torch.no_grad():
        assert float((model(x) - y0).abs().max() / y0.abs().max()) <= EXACT
    after = cycle_deltas(model)
    rounding = 64 * torch.finfo(D).eps * 4
    assert result.objective_before == pytest.approx(float(before[2].abs()), abs=rounding)
    assert result.objective_after == pytest.approx(float(after[2].abs()), abs=rounding)
    assert torch.equal(after[:2], before[:2])
