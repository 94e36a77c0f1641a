"""Fourth audit of GaugeFixing: optimizers that maximize (penalty mode must still descend the
penalty) and low-precision parameters under many orbit steps (the function kept to the dtype's
rounding, not a random walk of roundings)."""

from __future__ import annotations

import copy

import pytest
import torch

import gaugefix
from gaugefix import GaugeFixing, zoo
from test_hook_audit2 import quiet_hook  # noqa: F401 (an autouse fixture)
from test_soft_hook import setup

TOL = 1e-12
STRENGTH = 2.0
LR = 0.01


def mixed_groups(model, maximize):
    """Two groups (the first three parameters, the rest) with their own ``maximize`` flags."""
    ps = list(model.parameters())
    return [
        {"params": ps[:3], "maximize": maximize[0]},
        {"params": ps[3:], "maximize": maximize[1]},
    ]


MAXIMIZING = {
    "sgd": lambda ps, maximize: torch.optim.SGD(ps, lr=LR, momentum=0.9, maximize=maximize),
    "adam": lambda ps, maximize: torch.optim.Adam(ps, lr=LR, maximize=maximize),
}


@pytest.mark.parametrize("maximize", [(True, True), (True, False)])
def test_penalty_mode_descends_the_penalty_when_the_optimizer_maximizes(maximize):
    """``maximize=True`` ascends the loss; the penalty's gradient must still be descended: the
    hooked run maximizing ``loss`` equals, to 1e-12, a plain SGD run minimizing ``-loss + P`` in
    the maximizing group (``loss + P`` in the other)."""
    model, x, y, structure = setup()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(mixed_groups(model, maximize), lr=LR, momentum=0.9)
    hook = GaugeFixing(opt, model, structure, STRENGTH, mode="penalty", balance_at_start=False)
    ref_ps = list(ref.parameters())
    sign_of = [-1.0 if maximize[0] else 1.0] * 3 + [-1.0 if maximize[1] else 1.0] * 3
    ref_opt = torch.optim.SGD(ref_ps, lr=LR, momentum=0.9)
    for _ in range(8):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        ref_opt.zero_grad()
        loss = (ref(x) - y).square().mean()
        grads = torch.autograd.grad(loss, ref_ps)
        penalty = gaugefix.OrbitSelectionPenalty(structure, STRENGTH).grad(ref)
        names = [n for n, _ in ref.named_parameters()]
        for p, g, s, n in zip(ref_ps, grads, sign_of, names, strict=True):
            p.grad = s * g + penalty.get(n, torch.zeros_like(p))
        ref_opt.step()
    assert hook.steps == 8
    for p, q in zip(model.parameters(), ref_ps, strict=True):
        assert float((p - q).norm()) <= TOL * float(q.norm())


@pytest.mark.parametrize("opt_name", list(MAXIMIZING))
def test_a_maximizing_optimizer_relaxes_the_imbalance_in_penalty_mode(opt_name):
    """With a zero loss gradient, penalty mode under ``maximize=True`` moves the model exactly
    as under minimization (ascending ``P`` made SGD diverge to NaN and raised Adam's ``||mu||``
    from 39 to 50 in 20 steps)."""
    model, x, _, structure = setup()
    runs = []
    for maximize in (True, False):
        run = copy.deepcopy(model)
        opt = MAXIMIZING[opt_name](run.parameters(), maximize)
        GaugeFixing(opt, run, structure, 1.0, mode="penalty", balance_at_start=False)
        for _ in range(20):
            opt.zero_grad()
            (0 * run(x).sum()).backward()
            opt.step()
        runs.append(run)
    before = gaugefix.imbalance_stats(model, structure)["mu_norm"]
    assert gaugefix.imbalance_stats(runs[0], structure)["mu_norm"] < 0.9 * before
    for p, q in zip(*(run.parameters() for run in runs), strict=True):
        assert torch.equal(p, q)


# -- low precision: orbit steps at the dtype's rounding ----------------------------------------
DRIFT_STEPS = 1000
# The function's relative change allowed after the orbit steps: a few roundings of each entry in
# the dtype (one orbit step of the unbalanced bfloat16 model changes it by 6e-3).
FUNCTION_TOL = {torch.bfloat16: 2.0**-5, torch.float16: 2.0**-7, torch.float32: 2.0**-17}
# (dtype, strength, lr): the measured change after 1000 orbit steps in the reason.
DRIFTING = [
    (torch.bfloat16, 5.0, 0.1),
    (torch.float16, 0.05, 0.01),
    pytest.param(
        torch.float32, 5.0, 0.01,
        marks=pytest.mark.xfail(
            strict=True,
            reason="every orbit step rounds each moved entry again: with the dead band of "
            "gaugefix.soft.orbit_step (16-bit dtypes, |h_n| <= 2 eps) bfloat16 and float16 "
            "settle (1000 steps: 1.7e-2 and 4.8e-3), but float32's steps are genuine "
            "progress (mu 0.09 -> 5e-5 over the 1000 steps, as in float64), far above its "
            "resolution, and their roundings changed the function by 1.5e-5 (float64: 1e-15)",
        ),
    ),
]  # fmt: skip


def unbalanced(dtype=torch.bfloat16):
    """A ReLU MLP off balance by a random gauge, in ``dtype``; its inputs (float64) and
    structure."""
    torch.manual_seed(0)
    model = zoo.mlp((6, 32, 32, 2)).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, 0.8, generator=torch.Generator().manual_seed(1))
    return model.to(dtype), x, structure


def output64(model, x):
    """The model's output evaluated in float64 (its low-precision entries are exact there)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x)


@pytest.mark.parametrize("dtype,strength,lr", DRIFTING)
def test_orbit_steps_keep_the_function_to_the_dtypes_precision(dtype, strength, lr):
    """Orbit steps alone (SGD without gradients: only the hook moves the model), every step,
    from an unbalanced model: after the first one, 1000 more change the function (measured in
    float64) by at most a few roundings in the parameters' dtype."""
    model, x, structure = unbalanced(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    hook = GaugeFixing(opt, model, structure, strength, balance_at_start=False, every=1)
    opt.step()
    start = output64(model, x)
    for _ in range(DRIFT_STEPS):
        opt.step()
    assert (hook.steps, hook.skipped) == (DRIFT_STEPS + 1, 0)
    drift = float((output64(model, x) - start).norm() / start.norm())
    assert drift <= FUNCTION_TOL[dtype]


def test_float64_orbit_steps_keep_the_function_to_rounding():
    """The control of the test above: in float64 the same 1000 orbit steps (bfloat16's
    strength and lr) keep the function to 1e-12."""
    model, x, structure = unbalanced(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    GaugeFixing(opt, model, structure, 5.0, balance_at_start=False, every=1)
    opt.step()
    start = output64(model, x)
    for _ in range(DRIFT_STEPS):
        opt.step()
    assert float((output64(model, x) - start).norm() / start.norm()) <= TOL


def test_bfloat16_orbit_steps_that_round_to_nothing_are_counted_and_move_nothing():
    """A balanced bfloat16 model: each orbit step's factors round to 1, so the parameters stay
    bit-identical, and ``steps`` counts the orbit steps taken (as documented), not entries moved."""
    model, x, structure = unbalanced(torch.float64)
    gaugefix.balance_(model, structure)
    model = model.to(torch.bfloat16)
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = GaugeFixing(opt, model, structure, 5.0, balance_at_start=False, every=1)
    for _ in range(50):
        opt.step()
    assert (hook.steps, hook.skipped) == (50, 0)
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q)


# -- L-BFGS (closure evaluated several times per step) -------------------------------------------
def test_lbfgs_penalty_mode_adds_the_penalty_gradient_at_every_closure_evaluation():
    """L-BFGS without a line search in penalty mode (5 closure evaluations per step) equals, to
    1e-12, L-BFGS whose closure adds ``grad P`` itself; each optimizer step counts once."""
    model, x, y, structure = setup()
    ref = copy.deepcopy(model)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    ref_opt = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=5)
    hook = GaugeFixing(opt, model, structure, STRENGTH, mode="penalty", balance_at_start=False)
    penalty = gaugefix.OrbitSelectionPenalty(structure, STRENGTH)

    def closure(net, optimizer, add_penalty):
        def evaluate():
            optimizer.zero_grad()
            loss = (net(x) - y).square().mean()
            loss.backward()
            if add_penalty:
                penalty.add_grad_(net)
            return loss

        return evaluate

    for _ in range(4):
        opt.step(closure(model, opt, False))
        ref_opt.step(closure(ref, ref_opt, True))
    assert (hook.steps, hook.skipped) == (4, 0)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert float((p - q).detach().norm()) <= TOL * float(q.detach().norm())
