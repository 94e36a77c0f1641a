"""GaugeFixing with frozen parameters: neurons touching them are left out, frozen parameters stay
bit-identical, the other neurons are gauge-fixed, and changes of what is frozen are followed."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, zoo
from gaugefix.moment import in_out_sums

WIDTHS = (6, 12, 12, 12, 2)  # neurons 0-11, 12-23, 24-35 after linears 0, 1, 2
NOT_HELD = "touching a parameter the optimizer does not hold"
NO_GRAD = "touching a parameter with requires_grad=False"
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = zoo.mlp(WIDTHS).to(torch.float64)
    x = torch.randn(32, WIDTHS[0], dtype=torch.float64)
    y = torch.randn(32, WIDTHS[-1], dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, 0.8, generator=torch.Generator().manual_seed(1))
    return model, x, y, structure


def _train(model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def _lin(model: nn.Module, i: int) -> nn.Linear:
    return [m for m in model if isinstance(m, nn.Linear)][i]


# Each case: what is frozen and how, and the neurons that touch it (so are left out).
# "drop": not given to the optimizer and requires_grad=False; "nograd": in the optimizer with
# requires_grad=False; "unheld": not given to the optimizer, requires_grad left True.
CASES = {
    "first layer": ({"0.weight": "drop", "0.bias": "drop"}, {NOT_HELD: 12}, range(0, 12)),
    "last layer": ({"6.weight": "drop", "6.bias": "drop"}, {NOT_HELD: 12}, range(24, 36)),
    "first layer in the optimizer": (
        {"0.weight": "nograd", "0.bias": "nograd"},
        {NO_GRAD: 12},
        range(0, 12),
    ),
    "partially frozen": (
        {"2.weight": "nograd", "4.bias": "unheld"},
        {NOT_HELD: 12, NO_GRAD: 24},  # 4.bias touches 24-35, 2.weight 0-11 and 12-23
        range(0, 36),
    ),
    "one bias": ({"2.bias": "nograd"}, {NO_GRAD: 12}, range(12, 24)),
}


def _freeze(model: nn.Module, how: dict[str, str]) -> list[nn.Parameter]:
    """Apply ``how``; return the parameters to give the optimizer."""
    named = dict(model.named_parameters())
    for name, kind in how.items():
        if kind in ("drop", "nograd"):
            named[name].requires_grad_(False)
    return [p for n, p in named.items() if how.get(n) not in ("drop", "unheld")]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_frozen_parameters_stay_bit_identical(case, opt_name, mode, caplog):
    how, left_out, dropped = CASES[case]
    model, x, y, structure = _setup()
    opt = OPTIMIZERS[opt_name](_freeze(model, how))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        out_before = model(x)
    with caplog.at_level(logging.WARNING, logger="gaugefix"):
        hook = GaugeFixing(opt, model, structure, strength=2.0, mode=mode, every=1)
        _train(model, opt, x, y, 5)
    for name, p in model.named_parameters():
        if name in how:
            assert torch.equal(p, before[name]), name
            assert p.grad is None or how[name] == "unheld", name
    assert hook.left_out == left_out
    assert hook.active.num_generators == structure.num_generators - len(dropped)
    records = [r for r in caplog.records if r.name.startswith("gaugefix")]
    assert len(records) == 1 and f"{hook.active.num_generators} of 36" in records[0].getMessage()
    # The kept neurons were balanced at the start, without changing the function.
    check, _, _, _ = _setup()
    _freeze(check, how)
    GaugeFixing(
        OPTIMIZERS[opt_name](_freeze(check, how)), check, structure, 2.0, mode=mode, every=1
    )
    kept = torch.ones(structure.num_generators, dtype=torch.bool)
    kept[list(dropped)] = False
    with torch.no_grad():
        mu = gaugefix.imbalance(check, structure)
        s_in, s_out = in_out_sums(check, structure)
        torch.testing.assert_close(check(x), out_before, rtol=1e-12, atol=1e-12)
    if bool(kept.any()):
        assert float((mu[kept].abs() / (s_in + s_out)[kept]).max()) <= 1e-10
    if len(dropped):
        assert float(mu[~kept].abs().max()) > 1e-3  # the random gauge is still there


def test_parameters_added_later_and_requires_grad_changes_are_followed(caplog):
    model, x, y, structure = _setup()
    first, last = _lin(model, 0), _lin(model, 3)
    later = list(first.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if all(p is not q for q in later)], 0.05)
    with caplog.at_level(logging.WARNING, logger="gaugefix"):
        hook = GaugeFixing(opt, model, structure, strength=2.0, every=1)
        saved = [p.detach().clone() for p in later]
        _train(model, opt, x, y, 3)
        assert hook.left_out == {NOT_HELD: 12}
        assert all(torch.equal(p, q) for p, q in zip(later, saved, strict=True))

        opt.add_param_group({"params": later, "lr": 0.05})
        mu_before = gaugefix.imbalance(model, structure)[:12].detach().norm()
        _train(model, opt, x, y, 3)
        assert hook.left_out == {} and hook.active.num_generators == 36
        assert float(gaugefix.imbalance(model, structure)[:12].detach().norm()) < float(mu_before)

        last.weight.requires_grad_(False)
        saved = last.weight.detach().clone()
        _train(model, opt, x, y, 3)
        assert hook.left_out == {NO_GRAD: 12}
        assert torch.equal(last.weight, saved)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("gaugefix")]
    assert len(messages) == 2  # once per change that leaves neurons out
    assert "24 of 36" in messages[0] and "24 of 36" in messages[1]


def test_nothing_left_out_logs_nothing(caplog):
    model, x, y, structure = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.DEBUG, logger="gaugefix"):
        hook = GaugeFixing(opt, model, structure, strength=2.0, every=1)
    assert hook.left_out == {} and not caplog.records


ZERO_LR = "touching a parameter whose optimizer group has lr=0"


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_group_with_zero_lr_is_frozen_at_start_and_later(mode, caplog):
    """A parameter group with lr=0 stays bit-identical through the start balancing and the
    later steps (issue 18, item 9: balancing used to move it by a relative 0.92); the neurons
    touching it are left out, and the group is followed when its lr becomes non-zero."""
    model, x, y, structure = _setup()
    first = [_lin(model, 0).weight, _lin(model, 0).bias]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest, "lr": 0.05}])
    before = [p.detach().clone() for p in first]
    with caplog.at_level(logging.WARNING, logger="gaugefix.train.hook"):
        hook = GaugeFixing(opt, model, structure, 0.5, mode=mode, every=1)
    assert hook.left_out == {ZERO_LR: 12}
    assert ZERO_LR in caplog.text
    _train(model, opt, x, y, 3)
    for p, b in zip(first, before, strict=True):
        assert torch.equal(p.detach(), b)
    assert hook.steps == 3
    opt.param_groups[0]["lr"] = 0.05
    _train(model, opt, x, y, 1)
    assert hook.left_out == {}


def test_warmup_from_zero_lr_does_not_freeze(caplog):
    """A scheduler whose warmup starts at lr=0 (Hugging Face's default linear warmup) does not
    freeze anything: the start balancing balances every neuron, keeping the function (float64,
    1e-10), with no warning. A group created with lr=0 under a scheduler (its initial_lr is 0)
    is frozen as before and stays bit-identical."""
    model, x, y, structure = _setup()
    first = [_lin(model, 0).weight, _lin(model, 0).bias]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = torch.optim.SGD([{"params": first, "lr": 0.05}, {"params": rest, "lr": 0.05}])
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 4))
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    y0 = model(x).detach()
    with caplog.at_level(logging.WARNING, logger="gaugefix.train.hook"):
        hook = GaugeFixing(opt, model, structure, 0.5)
    assert hook.left_out == {} and not caplog.text
    assert float((model(x).detach() - y0).norm() / y0.norm()) <= 1e-10
    assert hook.stats()["mu_rel_max"] <= 1e-9
    hook.remove()

    model, x, y, structure = _setup()
    first = [_lin(model, 0).weight, _lin(model, 0).bias]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest, "lr": 0.05}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    before = [p.detach().clone() for p in first]
    hook = GaugeFixing(opt, model, structure, 0.5, every=1)
    for _ in range(3):
        _train(model, opt, x, y, 1)
        scheduler.step()
    assert hook.left_out == {ZERO_LR: 12} and hook.steps == 3
    assert all(torch.equal(p.detach(), b) for p, b in zip(first, before, strict=True))
