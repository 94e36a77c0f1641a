"""The tensors GaugeFixing checks for NaN and inf at every step (the ``.grad`` of the parameters
it acts on) are kept from step to step with the parameters it acts on, and follow every change
of those: a parameter frozen or unfrozen mid-run by ``requires_grad``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, zoo

WIDTHS = (4, 6, 6, 2)  # 6 generators after linear 0 and 6 after linear 1
LR = 0.05
STRENGTH = 2.0


def _setup() -> tuple[nn.Module, torch.Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = zoo.mlp(WIDTHS).to(torch.float64)
    x = torch.randn(16, WIDTHS[0], dtype=torch.float64)
    return model, x, gaugefix.discover(model, x)


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, nan: nn.Parameter | None = None
) -> None:
    """One optimizer step with the gradients of the loss, ``nan``'s ``.grad`` all NaN."""
    opt.zero_grad()
    model(x).square().mean().backward()
    if nan is not None:
        nan.grad = torch.full_like(nan, torch.nan)
    opt.step()


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_a_nan_gradient_of_a_parameter_frozen_mid_run_does_not_skip(mode):
    model, x, structure = _setup()
    first = model[0].weight
    opt = torch.optim.SGD(model.parameters(), LR)
    hook = GaugeFixing(opt, model, structure, STRENGTH, mode, balance_at_start=False, every=1)
    _step(model, opt, x)
    first.requires_grad_(False)  # its 6 generators are left out: its gradient is not checked
    _step(model, opt, x, first)
    assert hook.left_out == {gaugefix.soft.FROZEN_REASON: 6}
    assert (hook.steps, hook.skipped) == (2, 0)


def test_a_nan_gradient_of_a_parameter_unfrozen_mid_run_skips():
    model, x, structure = _setup()
    first = model[0].weight
    first.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), LR)
    hook = GaugeFixing(opt, model, structure, STRENGTH, "penalty", balance_at_start=False)
    _step(model, opt, x)
    assert (hook.steps, hook.skipped) == (1, 0)
    first.requires_grad_(True)  # acted on again: its gradient is checked
    _step(model, opt, x, first)
    assert hook.left_out == {}
    assert (hook.steps, hook.skipped) == (1, 1)
