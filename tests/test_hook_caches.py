"""What GaugeFixing keeps from step to step (which group holds each parameter, which generators
are frozen, whether a moved parameter is float16, the relaxation rate) follows every change
made mid-run: parameters swapped or appended in place, frozen, cast, groups whose learning
rates change or are loaded from a state dict."""

from __future__ import annotations

from unittest import mock

import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, zoo
from gaugefix.train import hook as hook_module

WIDTHS = (4, 6, 6, 2)  # neurons 0-5 after linear 0, 6-11 after linear 1
LR = 0.05
STRENGTH = 2.0


def _setup(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = zoo.mlp(WIDTHS).to(dtype)
    x = torch.randn(16, WIDTHS[0], dtype=dtype)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, 0.8, generator=torch.Generator().manual_seed(1))
    return model, x, structure


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_a_parameter_swapped_into_a_zero_lr_group_in_place_is_frozen():
    model, x, structure = _setup()
    last = _linears(model)[-1].weight
    spare = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # no part of the structure
    opt = torch.optim.SGD([{"params": list(model.parameters())}, {"params": [spare], "lr": 0}], LR)
    hook = GaugeFixing(opt, model, structure, STRENGTH, every=1)
    _train(model, opt, x, 2)
    assert hook.left_out == {}
    held = opt.param_groups[0]["params"]
    i = next(i for i, p in enumerate(held) if p is last)
    held[i], opt.param_groups[1]["params"][0] = spare, last  # the same group sizes
    saved = last.detach().clone()
    _train(model, opt, x, 2)
    assert hook.left_out == {"touching a parameter whose optimizer group has lr=0": 6}
    assert torch.equal(last, saved)


def test_a_parameter_appended_in_place_and_one_frozen_are_followed():
    model, x, structure = _setup()
    first = _linears(model)[0]
    later = list(first.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if all(p is not q for q in later)], LR)
    hook = GaugeFixing(opt, model, structure, STRENGTH, every=1)
    _train(model, opt, x, 2)
    assert hook.left_out == {"touching a parameter the optimizer does not hold": 6}
    opt.param_groups[0]["params"].extend(later)  # the same list, longer
    _train(model, opt, x, 1)
    assert hook.left_out == {} and hook.active.num_generators == 12
    last = _linears(model)[-1].weight
    last.requires_grad_(False)
    saved = last.detach().clone()
    _train(model, opt, x, 2)
    assert hook.left_out == {"touching a parameter with requires_grad=False": 6}
    assert torch.equal(last, saved)


def test_a_model_cast_to_float16_mid_run_gets_the_range_check():
    model, x, structure = _setup(torch.float32)
    opt = torch.optim.SGD(model.parameters(), LR)
    GaugeFixing(opt, model, structure, STRENGTH, every=1)
    checked = []
    real = hook_module.relax_unchecked_

    def spy(*args, **kwargs):
        checked.append(kwargs["check_range"])
        return real(*args, **kwargs)

    with mock.patch.object(hook_module, "relax_unchecked_", spy):
        _train(model, opt, x, 1)
        model.half()  # the same parameters, in float16
        _train(model, opt, x.half(), 1)
    assert checked == [False, True]


def _rates(opt: torch.optim.Optimizer, model: nn.Module, structure, lrs: tuple[float, ...]):
    """The rate of a hook made now on a copy of ``opt``'s groups at ``lrs``: from scratch."""
    groups = [
        {"params": g["params"], "lr": lr} for g, lr in zip(opt.param_groups, lrs, strict=True)
    ]
    fresh = torch.optim.SGD(groups, LR)
    with GaugeFixing(fresh, model, structure, STRENGTH, balance_at_start=False) as hook:
        return hook.rate()


def test_the_rate_follows_learning_rates_changed_and_loaded():
    model, x, structure = _setup()
    first, second = _linears(model)[0], _linears(model)[1:]
    rest = [p for m in second for p in m.parameters()]
    opt = torch.optim.SGD([{"params": list(first.parameters())}, {"params": rest}], LR)
    hook = GaugeFixing(opt, model, structure, STRENGTH, every=1)
    _train(model, opt, x, 1)
    assert hook.rate() == STRENGTH * LR
    saved = opt.state_dict()
    for lrs in ((LR, 3 * LR), (2 * LR, 3 * LR), (LR, LR)):
        for group, lr in zip(opt.param_groups, lrs, strict=True):
            group["lr"] = lr
        expected = _rates(opt, model, structure, lrs)
        assert torch.equal(torch.as_tensor(hook.rate()), torch.as_tensor(expected))
    saved["param_groups"][1]["lr"] = 4 * LR
    opt.load_state_dict(saved)
    expected = _rates(opt, model, structure, (LR, 4 * LR))
    assert torch.equal(torch.as_tensor(hook.rate()), torch.as_tensor(expected))
    _train(model, opt, x, 1)
    assert isinstance(hook.rate(), torch.Tensor)
