"""GaugeFixing's rate when a parameter group's list changes in place, the rate's formula over a
varying schedule, and a state saved anywhere in the interval resuming bit for bit."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import gaugefix
from gaugefix import GaugeFixing
from test_hook_audit2 import quiet_hook  # noqa: F401 (an autouse fixture)
from test_hook_audit3 import close, loss_backward, sgd_step
from test_soft_hook import setup

STRENGTH = 2.0
EVERY = 3
WIDTHS = (6, 12, 12, 2)  # generators 0-11 after linear 0, 12-23 after linear 2
LAYER0 = slice(0, 12)


def _named(model, names):
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def _two_runs(groups):
    """The model and a copy, each with an SGD over ``groups`` (per group its parameter names and
    learning rate); a hook (``every=EVERY``, not balanced) on the first."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opts = [
        torch.optim.SGD([{"params": _named(m, names), "lr": lr} for names, lr in groups])
        for m in (model, ref)
    ]
    hook = GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=EVERY)
    return model, ref, opts, hook, structure, (x, y)


def _step_both(model, ref, opts, data):
    for m, opt in zip((model, ref), opts, strict=True):
        sgd_step(m, opt, *data)


def _rates(structure, sums):
    """``strength * min over the groups touching n of the group's sum of learning rates`` per
    generator ``n``, ``sums`` per group its parameter names and sum (float64 ``[N]``)."""
    rate = torch.full((structure.num_generators,), math.inf, dtype=torch.float64)
    for names, total in sums:
        touched = structure.touching(set(names))
        rate = torch.where(touched, torch.clamp_max(rate, total), rate)
    return STRENGTH * rate


def test_a_parameter_appended_in_place_from_outside_sums_from_its_first_step():
    """The first layer (not held) appended in place to the only group after step 1 of 3: its
    parameters saw 2 steps, so the group's sum restarts: rate ``strength * 2 lr`` (the hook kept
    the group's whole sum, ``3 lr``: a rate of 0.3 instead of 0.2)."""
    lr, rest = 0.05, ["2.weight", "2.bias", "4.weight", "4.bias"]
    model, ref, opts, hook, structure, data = _two_runs([(rest, lr)])
    for k in range(EVERY):
        if k == 1:
            for m, opt in zip((model, ref), opts, strict=True):
                opt.param_groups[0]["params"].extend(_named(m, ["0.weight", "0.bias"]))
        _step_both(model, ref, opts, data)
    gaugefix.relax_(ref, structure, STRENGTH * 2 * lr, optimizer=opts[1])
    assert hook.steps == 1 and hook.left_out == {} and close(model, ref)


def test_a_parameter_moved_between_groups_in_place_takes_the_least_sum():
    """``2.weight`` moved in place from the group at lr 0.02 to the one at 0.05 after step 1 of
    3: its own sum is ``0.02 + 0.05 + 0.05``; the group it joined takes the least sum of the
    optimizer's groups then (0.02), the one it left keeps its own (``3 * 0.02``). Generators
    0-11 (on ``0.*`` and ``2.weight``) relax at ``strength * 0.12`` (the hook: 0.15), 12-23
    (also on ``2.bias``) at ``strength * 0.06``."""
    a, b = ["0.weight", "0.bias", "4.weight", "4.bias"], ["2.weight", "2.bias"]
    model, ref, opts, hook, structure, data = _two_runs([(a, 0.05), (b, 0.02)])
    for k in range(EVERY):
        if k == 1:
            for opt in opts:
                opt.param_groups[0]["params"].append(opt.param_groups[1]["params"].pop(0))
        _step_both(model, ref, opts, data)
    rate = _rates(structure, [(a + ["2.weight"], 0.02 + 0.05 + 0.05), (["2.bias"], 3 * 0.02)])
    assert torch.allclose(rate[LAYER0], torch.full((12,), STRENGTH * 0.12, dtype=torch.float64))
    gaugefix.relax_(ref, structure, rate, optimizer=opts[1])
    assert hook.steps == 1 and close(model, ref)


def test_a_group_that_only_lost_a_parameter_keeps_its_sum():
    """``4.bias`` (no generator's) removed in place from the first group after step 1: the
    parameters left saw every step, so the sums stay ``3 lr`` per group."""
    a, b = ["0.weight", "0.bias", "4.weight", "4.bias"], ["2.weight", "2.bias"]
    model, ref, opts, hook, structure, data = _two_runs([(a, 0.05), (b, 0.02)])
    for k in range(EVERY):
        if k == 1:
            for opt in opts:
                opt.param_groups[0]["params"].pop()
        _step_both(model, ref, opts, data)
    rate = _rates(structure, [(a[:3], 3 * 0.05), (b, 3 * 0.02)])
    gaugefix.relax_(ref, structure, rate, optimizer=opts[1])
    assert hook.steps == 1 and close(model, ref)


def test_the_rate_is_the_least_over_groups_of_each_groups_sum_of_learning_rates():
    """Three groups whose learning rates change at every step (crossing schedules): generator
    ``n`` relaxes at ``strength * min_g sum_t lr_g(t)`` over the groups ``g`` holding a
    parameter it acts on and the steps ``t`` of the interval (``min`` taken after the sum:
    0.10 for generators 0-11, 0.09 for 12-23; ``sum_t min_g`` would give 0.03 and 0.05)."""
    names = [["0.weight", "0.bias"], ["2.weight", "2.bias"], ["4.weight", "4.bias"]]
    schedule = [[0.08, 0.01, 0.01], [0.01, 0.05, 0.06], [0.02, 0.02, 0.05]]  # per group
    groups = [(n, lrs[0]) for n, lrs in zip(names, schedule, strict=True)]
    model, ref, opts, hook, structure, data = _two_runs(groups)
    for k in range(EVERY):
        for opt in opts:
            for group, lrs in zip(opt.param_groups, schedule, strict=True):
                group["lr"] = lrs[k]
        _step_both(model, ref, opts, data)
    sums = [(n, sum(lrs)) for n, lrs in zip(names, schedule, strict=True)]
    rate = _rates(structure, sums)
    expected = torch.tensor([STRENGTH * 0.10] * 12 + [STRENGTH * 0.09] * 12, dtype=torch.float64)
    assert torch.allclose(rate, expected, rtol=1e-14, atol=0)
    moved = gaugefix.relax_(ref, structure, rate, optimizer=opts[1])
    assert hook.steps == 1 and close(model, ref) and bool(moved.abs().min() > 0)


# -- a state saved anywhere in the interval ----------------------------------------------------
OPT_NAMES = (["0.weight", "0.bias", "2.weight"], ["2.bias", "4.weight", "4.bias"])
TRAINING_STEPS = 2 * EVERY + 1


def _build(state=None):
    """The model, two SGDs with momentum over ``OPT_NAMES`` (learning rates that change at
    every step) and a hook over both; from ``state`` (model, optimizers, hook) when given. A
    pre-step hook registered after the hook's replaces a non-finite gradient by 0 (as a fused
    step that ``GradScaler`` skips: the hook sees it, the parameters do not)."""
    model, x, y, structure = setup(WIDTHS)
    opts = [torch.optim.SGD(_named(model, n), lr=0.01, momentum=0.9) for n in OPT_NAMES]
    if state is not None:
        model.load_state_dict(state["model"])
        for opt, saved in zip(opts, state["opts"], strict=True):
            opt.load_state_dict(saved)
    hook = GaugeFixing(opts, model, structure, STRENGTH, balance_at_start=False, every=EVERY)
    if state is not None:
        hook.load_state_dict(json.loads(state["hook"]))
    for opt in opts:
        opt.register_step_pre_hook(_finite_grads)
    return model, opts, hook, (x, y)


def _finite_grads(optimizer, *_) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad.nan_to_num_(0.0, 0.0, 0.0)


def _run(run, start, stop, bad):
    """Optimizer steps ``start`` to ``stop`` (two per training step, the first optimizer's
    first), the gradient of ``0.weight`` made infinite at optimizer step ``bad``."""
    model, opts, _, (x, y) = run
    for i in range(start, stop):
        opt = opts[i % 2]
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 + i % 5)
        opt.zero_grad()
        loss_backward(model, x, y)
        if i == bad:
            model[0].weight.grad[0, 0] = math.inf
        opt.step()


# Optimizer step i is the first optimizer's when i is even, of training step i // 2; training
# steps 2 and 5 take the orbit steps.
@pytest.mark.parametrize("bad", [None, 2, 4])
def test_a_state_saved_at_any_optimizer_step_resumes_bit_for_bit(bad):
    """Saved after every optimizer step of two intervals (a JSON round trip) and loaded into a
    fresh model, optimizers and hook, the run ends bit for bit as the uninterrupted one, with
    the same counts; an infinite gradient the hook sees at the first optimizer's step (whose
    step then waits for the second's) in a training step without an orbit step, in one of
    the two with one, or none."""
    total = 2 * TRAINING_STEPS
    whole = _build()
    _run(whole, 0, total, bad)
    assert (whole[2].steps, whole[2].skipped) == ((1, 1) if bad == 4 else (2, 0))
    for cut in range(1, total):
        first = _build()
        _run(first, 0, cut, bad)
        model, opts, hook, _ = first
        state = {
            "model": copy.deepcopy(model.state_dict()),
            "opts": [copy.deepcopy(opt.state_dict()) for opt in opts],
            "hook": json.dumps(hook.state_dict()),
        }
        resumed = _build(state)
        _run(resumed, cut, total, bad)
        pairs = zip(resumed[0].parameters(), whole[0].parameters(), strict=True)
        assert all(torch.equal(p, q) for p, q in pairs), cut
        assert (resumed[2].steps, resumed[2].skipped) == (whole[2].steps, whole[2].skipped), cut


def test_a_state_saved_after_an_in_place_move_resumes_as_the_run():
    """``2.weight`` moved in place between the groups after step 1 of 3 and a state saved right
    then (before the next step) and loaded into a fresh model, optimizer and hook: the orbit
    step is the uninterrupted run's, bit for bit (the saved sums follow the move)."""
    a, b = ["0.weight", "0.bias", "4.weight", "4.bias"], ["2.weight", "2.bias"]
    runs = [_two_runs([(a, 0.05), (b, 0.02)]) for _ in range(2)]
    for run in runs:
        model, _, opts, _, _, data = run
        sgd_step(model, opts[0], *data)
        group = opts[0].param_groups
        group[0]["params"].append(group[1]["params"].pop(0))
    model, _, opts, hook, structure, data = runs[1]
    fresh, _, fresh_opts, fresh_hook, _, _ = _two_runs([(a + ["2.weight"], 0.05), (b[1:], 0.02)])
    fresh.load_state_dict(model.state_dict())
    fresh_opts[0].load_state_dict(opts[0].state_dict())
    fresh_hook.load_state_dict(json.loads(json.dumps(hook.state_dict())))
    for _ in range(EVERY - 1):
        sgd_step(runs[0][0], runs[0][2][0], *data)
        sgd_step(fresh, fresh_opts[0], *data)
    assert runs[0][3].steps == fresh_hook.steps == 1
    pairs = zip(fresh.parameters(), runs[0][0].parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
