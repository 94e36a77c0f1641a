"""Transport of Adagrad's and RMSprop's state: Adagrad's ``sum`` (``sum_t g_t^2`` when
``initial_accumulator_value = 0``) moves by ``1/f^2``, RMSprop's ``square_avg`` (an average of
``g^2``) by ``1/f^2`` and its centered ``grad_avg`` (an average of ``g``) by ``1/f``. After
``apply_gauge_``, ``balance_`` or a ``GaugeFixing`` orbit step the state equals, to 1e-12 in
float64, the state built from the same loss gradients at the moved point (plain, foreach and
fused). Adagrad with ``initial_accumulator_value != 0`` (a constant that does not scale) and
RMSprop with ``momentum > 0`` (a buffer of ``g / (sqrt(v) + eps)``) are refused in one line
naming the setting, model and optimizer bit for bit as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from gaugefix import GaugeFixing
from test_action_audit2 import assert_close, batches, loss_of, model_and_input, step
from test_kernels_audit import assert_unchanged, everything
from test_soft_hook import setup, train_step
from test_transport_audit import LATER_LR, LATER_STEPS, accumulate, assert_states_equal, set_lr

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
ACCUMULATED = 3  # steps at lr = 0 before the move
HOOK_LR = 0.05  # the learning rate under GaugeFixing (an orbit step moves by about it)
MOVED = 0.1  # the least max |h| (or max |log f|) of a move worth checking


def adagrad(**kw):
    return lambda ps, lr: O.Adagrad(ps, lr=lr, **kw)


def rmsprop(**kw):
    return lambda ps, lr: O.RMSprop(ps, lr=lr, alpha=0.7, **kw)


# Each newly transported setting: a function of (parameters, lr) making the optimizer.
TRANSPORTED = {
    "adagrad": adagrad(foreach=False),
    "adagrad-foreach-lr-decay": adagrad(foreach=True, lr_decay=0.1),
    "adagrad-fused-maximize": adagrad(fused=True, maximize=True),
    "rmsprop": rmsprop(foreach=False),
    "rmsprop-foreach": rmsprop(foreach=True),
    "rmsprop-centered": rmsprop(centered=True, foreach=False),
    "rmsprop-centered-foreach-maximize": rmsprop(centered=True, foreach=True, maximize=True),
}
MOVERS = {
    "apply_gauge_": lambda model, s, opt: gaugefix.random_gauge_(model, s, 0.5, optimizer=opt),
    "balance_": lambda model, s, opt: gaugefix.balance_(model, s, optimizer=opt).h,
}


@pytest.mark.parametrize("mover", list(MOVERS))
@pytest.mark.parametrize("opt_name", list(TRANSPORTED))
def test_moved_state_is_the_state_built_at_the_moved_point(opt_name, mover):
    """State collected at ``theta`` and moved with it equals the state collected from the same
    batches at ``g(h) . theta``; then ``LATER_STEPS`` steps with ``lr > 0`` stay equal."""
    make = TRANSPORTED[opt_name]
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = make(list(model.parameters()), 0.0)
    accumulate(model, opt, batches(x)[:ACCUMULATED])
    moved = copy.deepcopy(model)
    h = MOVERS[mover](model, s, opt)
    assert float(h.abs().max()) > MOVED
    gaugefix.apply_gauge_(moved, s, h)
    fresh = make(list(moved.parameters()), 0.0)
    accumulate(moved, fresh, batches(x)[:ACCUMULATED])
    pairs = list(zip(model.parameters(), moved.parameters(), strict=True))
    assert_states_equal(opt, fresh, pairs, opt_name)
    set_lr(opt, LATER_LR)
    set_lr(fresh, LATER_LR)
    for k in range(LATER_STEPS):
        step(model, opt, batches(x)[k])
        step(moved, fresh, batches(x)[k])
        for p, q in pairs:
            assert_close(p, q, q.detach().abs() + LATER_LR, (opt_name, mover, k))
    assert_states_equal(opt, fresh, pairs, opt_name)


@pytest.mark.parametrize("opt_name", list(TRANSPORTED))
def test_an_exact_orbit_step_moves_the_state_to_the_state_built_at_the_moved_point(opt_name):
    """``GaugeFixing`` in exact mode (one orbit step after the second optimizer step, by ``f``
    entrywise): the state equals the state built from the same batches at the points of the
    trajectory without the hook, each moved by ``f``."""
    make = TRANSPORTED[opt_name]
    model, x, y, structure = setup()
    plain = copy.deepcopy(model)
    opt, ref = make(list(model.parameters()), HOOK_LR), make(list(plain.parameters()), HOOK_LR)
    hook = GaugeFixing(opt, model, structure, 4.0, balance_at_start=False, every=2)
    points = []
    for _ in range(2):
        points.append([q.detach().clone() for q in plain.parameters()])
        train_step(model, opt, x, y)
        train_step(plain, ref, x, y)
    assert hook.steps == 1
    apart = zip(model.parameters(), plain.parameters(), strict=True)
    factors = [(p / q).detach() for p, q in apart]
    assert max(float(f.log().abs().max()) for f in factors) > MOVED
    at = copy.deepcopy(plain)
    fresh = make(list(at.parameters()), HOOK_LR)
    for point in points:
        with torch.no_grad():
            for c, theta, f in zip(at.parameters(), point, factors, strict=True):
                c.copy_(theta * f)
        train_step(at, fresh, x, y)
    pairs = list(zip(model.parameters(), at.parameters(), strict=True))
    assert_states_equal(opt, fresh, pairs, opt_name)


def _groups(ps: list[Tensor], **kw) -> list[dict]:
    """The first two parameters in a plain group, the rest in a group with settings ``kw``."""
    return [{"params": ps[:2]}, {"params": ps[2:], **kw}]


def _momentum_turned_off(ps: list[Tensor], lr: float) -> O.Optimizer:
    """RMSprop whose momentum was set to 0 after it made its ``momentum_buffer``s."""
    opt = O.RMSprop(ps, lr=lr, momentum=0.9)
    opt.register_step_post_hook(lambda o, *_: [g.update(momentum=0.0) for g in o.param_groups])
    return opt


# Settings whose state no rescaling moves: (parameters, lr) -> optimizer, and the setting named.
REFUSED = {
    "adagrad-initial": (adagrad(initial_accumulator_value=0.1), "initial_accumulator_value"),
    "adagrad-initial-fused-lr-decay": (
        adagrad(initial_accumulator_value=0.5, fused=True, lr_decay=0.1),
        "initial_accumulator_value",
    ),
    # torch fills a new sum with the defaults' value, whatever the group's
    "adagrad-initial-in-defaults-only": (
        lambda ps, lr: O.Adagrad(
            [{"params": ps, "initial_accumulator_value": 0.0}], lr=lr, initial_accumulator_value=0.1
        ),
        "initial_accumulator_value",
    ),
    "rmsprop-momentum": (rmsprop(momentum=0.9), "momentum"),
    "rmsprop-centered-momentum-foreach": (
        rmsprop(centered=True, momentum=0.5, foreach=True),
        "momentum",
    ),
    "rmsprop-momentum-one-group": (
        lambda ps, lr: O.RMSprop(_groups(ps, momentum=0.9), lr=lr),
        "momentum",
    ),
    "rmsprop-momentum-turned-off": (_momentum_turned_off, "momentum"),
}
REFUSING = {
    **MOVERS,
    "GaugeFixing": lambda model, s, opt: GaugeFixing(opt, model, s, 1.0, every=1),
}


@pytest.mark.parametrize("caller", list(REFUSING))
@pytest.mark.parametrize("opt_name", list(REFUSED))
def test_settings_whose_state_does_not_move_are_refused_and_change_nothing(opt_name, caller):
    """After a step (the state made), one line naming the setting; model, gradients and state
    bit for bit as they were, and no hook attached."""
    make, setting = REFUSED[opt_name]
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = make(list(model.parameters()), 0.1)
    step(model, opt, x)
    before, hooks = everything(model, opt), len(opt._optimizer_step_post_hooks)
    named = f"cannot transport optimizer state .*{setting}(=| other than 0)"
    with pytest.raises(ValueError, match=named) as info:
        REFUSING[caller](model, s, opt)
    assert "\n" not in str(info.value)
    assert_unchanged(before, everything(model, opt))
    assert not opt._optimizer_step_pre_hooks and len(opt._optimizer_step_post_hooks) == hooks


def test_rmsprop_with_momentum_is_refused_in_exact_mode_before_its_first_step():
    """Its ``momentum_buffer`` is made at its first step: exact mode refuses the setting at
    construction; penalty mode, which moves no state, takes it."""
    model, x, y, structure = setup()
    opt = O.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(ValueError, match="'momentum_buffer' of RMSprop with momentum=0.9"):
        GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=1)
    assert not opt.state and not opt._optimizer_step_post_hooks
    GaugeFixing(opt, model, structure, 1.0, mode="penalty", balance_at_start=False).remove()


def test_a_setting_only_in_a_group_holding_no_moved_parameter_is_not_refused():
    """RMSprop with momentum in a group over a tensor outside the model: the model's group moves
    to the state built at the moved point, the other group's state stays as it was."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    outside = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def make(ps: list[Tensor]) -> O.Optimizer:
        return O.RMSprop([{"params": ps}, {"params": [outside], "momentum": 0.9}], lr=0.0)

    opt = make(list(model.parameters()))
    for xb in batches(x)[:ACCUMULATED]:
        opt.zero_grad()
        loss_of(model, xb).backward()
        outside.grad = xb[0, :3].clone()
        opt.step()
    assert opt.state[outside]["momentum_buffer"].abs().max() > 0
    kept = [v.clone() for v in opt.state[outside].values()]
    moved = copy.deepcopy(model)
    h = gaugefix.random_gauge_(model, s, 0.5, optimizer=opt)
    gaugefix.apply_gauge_(moved, s, h)
    fresh = O.RMSprop(moved.parameters(), lr=0.0)
    accumulate(moved, fresh, batches(x)[:ACCUMULATED])
    pairs = list(zip(model.parameters(), moved.parameters(), strict=True))
    assert_states_equal(opt, fresh, pairs, "rmsprop")
    assert_unchanged(kept, list(opt.state[outside].values()))
