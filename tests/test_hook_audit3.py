"""Third audit of GaugeFixing: float64 runs against hand-written loops (``optimizer.step()``
then ``gaugefix.relax_`` at the documented rate, or the penalty's gradient added before the
step) under schedulers, tensor learning rates, closures, gradient accumulation, loss scaling,
parameters moved between groups, freezing and thawing, two hooks on one model, and remove()."""

from __future__ import annotations

import copy

import pytest
import torch

import gaugefix
from gaugefix import GaugeFixing
from test_hook_audit2 import quiet_hook  # noqa: F401 (an autouse fixture)
from test_soft_hook import setup

TOL = 1e-12
STRENGTH = 2.0
WIDTHS = (6, 12, 12, 12, 2)  # three hidden layers of 12: generators 0-11, 12-23, 24-35


def loss_backward(model, x, y, parts=1):
    """The squared error's gradient, accumulated over ``parts`` micro-batches."""
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        ((model(xs) - ys).square().mean() / parts).backward()


def sgd_step(model, opt, x, y):
    opt.zero_grad()
    loss_backward(model, x, y)
    opt.step()


def close(model, ref) -> bool:
    """Every parameter within ``TOL`` relative of the reference's."""
    pairs = zip(model.parameters(), ref.parameters(), strict=True)
    with torch.no_grad():
        return all(float((p - q).norm()) <= TOL * float(q.norm()) for p, q in pairs)


def lr_sum(total, opt):
    """``total`` plus this step's learning rate of each group (a new list)."""
    lrs = [g["lr"] for g in opt.param_groups]
    return [a + b for a, b in zip(total + [0.0] * (len(lrs) - len(total)), lrs, strict=True)]


# -- schedulers, tensor lr, closures, accumulation: exact mode against step-then-relax_ ----------
def sgd_step_lr(ps):
    opt = torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)


def sgd_maximize_one_cycle(ps):
    opt = torch.optim.SGD(ps, lr=0.05, momentum=0.9, maximize=True, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=12)


def adam_amsgrad_one_cycle(ps):
    opt = torch.optim.Adam(ps, lr=0.01, amsgrad=True, foreach=True)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.03, total_steps=12)


def adamw_tensor_lr(ps):
    lr = torch.tensor(0.02, dtype=torch.float64)
    return torch.optim.AdamW(ps, lr=lr, foreach=False), None


OPTIMIZERS = {
    "sgd_nesterov_wd_step_lr": sgd_step_lr,
    "sgd_maximize_one_cycle": sgd_maximize_one_cycle,
    "adam_amsgrad_one_cycle": adam_amsgrad_one_cycle,
    "adamw_tensor_lr": adamw_tensor_lr,
}


def schedule(opt, sched):
    """The scheduler's step, or a tensor lr decayed in place."""
    if sched is not None:
        sched.step()
    else:
        opt.param_groups[0]["lr"].mul_(0.8)


def hooked_step(model, opt, x, y, k):
    """Step ``k``: a closure returning ``None`` on even steps (gradients accumulated over two
    micro-batches), zeroed with ``set_to_none=False`` and a plain step on odd ones; step 4 has
    no gradients at all."""
    if k == 4:
        opt.zero_grad()
        opt.step()
    elif k % 2 == 0:

        def closure():
            opt.zero_grad()
            loss_backward(model, x, y, parts=2)

        assert opt.step(closure) is None
    else:
        opt.zero_grad(set_to_none=False)
        loss_backward(model, x, y)
        opt.step()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_exact_mode_equals_step_then_relax_at_the_summed_rate(opt_name):
    """Twelve steps, orbit steps every 3: after each step the hooked model equals a hand loop
    (``optimizer.step()``, then every third step ``relax_`` at ``strength * (the sum of the
    learning rates since the last one)``, then the scheduler) to 1e-12."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opt, sched = OPTIMIZERS[opt_name](list(model.parameters()))
    ref_opt, ref_sched = OPTIMIZERS[opt_name](list(ref.parameters()))
    hook = GaugeFixing(opt, model, structure, STRENGTH, balance_at_start=False, every=3)
    total = []
    for k in range(12):
        hooked_step(model, opt, x, y, k)
        hooked_step(ref, ref_opt, x, y, k)
        total = lr_sum(total, ref_opt)
        if k % 3 == 2:
            gaugefix.relax_(ref, structure, STRENGTH * total[0], optimizer=ref_opt)
            total = []
        schedule(opt, sched)
        schedule(ref_opt, ref_sched)
        assert close(model, ref), k
    assert (hook.steps, hook.skipped) == (4, 0)


def test_penalty_mode_equals_adding_the_penalty_gradient_under_one_cycle():
    """Penalty mode with Adam (AMSGrad) under OneCycleLR, closures and accumulation: each step
    equals a hand loop adding ``OrbitSelectionPenalty.add_grad_`` before ``step()`` (1e-12)."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opt, sched = adam_amsgrad_one_cycle(list(model.parameters()))
    ref_opt, ref_sched = adam_amsgrad_one_cycle(list(ref.parameters()))
    GaugeFixing(opt, model, structure, STRENGTH, mode="penalty", balance_at_start=False)
    penalty = gaugefix.OrbitSelectionPenalty(structure, STRENGTH)
    for k in range(8):
        hooked_step(model, opt, x, y, k)
        ref_opt.zero_grad()
        if k != 4:
            loss_backward(ref, x, y, parts=2 if k % 2 == 0 else 1)
        penalty.add_grad_(ref)
        ref_opt.step()
        sched.step()
        ref_sched.step()
        assert close(model, ref), k


# -- parameters moved between groups -------------------------------------------------------------
def test_a_parameter_moved_to_a_new_group_relaxes_at_that_groups_rate():
    """One group at lr 0.05; after the first orbit step the last weight is moved to a group of
    its own at lr 0.001. The next orbit step relaxes the last hidden layer's generators at
    ``strength * min(2 * 0.05, 2 * 0.001)``, as ``rate()`` says. (The hook kept the groups it
    read before: ``rate()`` stayed 0.1 and those generators relaxed 50 times too fast.)"""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref)]
    hook = GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=2)
    for k in range(4):
        if k == 2:
            for opt in opts:
                last = opt.param_groups[0]["params"].pop(6)  # 6.weight
                opt.add_param_group({"params": [last], "lr": 0.001})
        for m, opt in zip((model, ref), opts, strict=True):
            opt.zero_grad()
            loss_backward(m, x, y)
            opt.step()
        if k == 1:
            gaugefix.relax_(ref, structure, STRENGTH * 0.1, optimizer=opts[1])
    rates = torch.full((structure.num_generators,), STRENGTH * 0.1, dtype=torch.float64)
    rates[24:] = STRENGTH * 0.002
    assert torch.equal(hook.rate(), rates / 2)
    gaugefix.relax_(ref, structure, rates, optimizer=opts[1])
    assert close(model, ref) and hook.steps == 2


def test_a_group_merged_into_another_mid_interval_relaxes_at_the_least_sum():
    """Two groups (lr 0.05 and 0.02), every 3; after step 1 the second group's parameters are
    moved into the first and the second group deleted. The steps go on (the hook raised
    ``zip() argument 2 is shorter than argument 1`` after every later optimizer step, which had
    moved the parameters), and the orbit step relaxes at ``strength * (min(0.05, 0.02) + 0.05
    + 0.05)``: the least of the removed sums, never faster than a parameter's own rates."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opts = []
    for m in (model, ref):
        ps = list(m.parameters())
        opts.append(torch.optim.SGD([{"params": ps[:4]}, {"params": ps[4:], "lr": 0.02}], lr=0.05))
    hook = GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=3)
    for k in range(3):
        if k == 1:
            for opt in opts:
                opt.param_groups[0]["params"].extend(opt.param_groups.pop()["params"])
        for m, opt in zip((model, ref), opts, strict=True):
            sgd_step(m, opt, x, y)
    gaugefix.relax_(ref, structure, STRENGTH * ((0.02 + 0.05) + 0.05), optimizer=opts[1])
    assert close(model, ref) and hook.state_dict() == {
        "steps": 1, "skipped": 0, "since": 0, "lr_sums": []
    }  # fmt: skip


def test_parameters_swapped_into_a_frozen_group_are_never_moved():
    """Groups of one parameter each, the second at ``lr=0`` (frozen); the first layer's and the
    last layer's weights swap groups (the group sizes stay). The newly frozen first weight must
    stay bit for bit, and the last, now training, be acted on. (The hook kept its old map of
    the groups: the frozen weight moved by 0.079.)"""
    model, x, y, structure = setup(WIDTHS)
    ps = list(model.parameters())
    opt = torch.optim.SGD([{"params": ps[:6]}, {"params": ps[6:7], "lr": 0.0}], lr=0.05)
    hook = GaugeFixing(opt, model, structure, STRENGTH, balance_at_start=False, every=1)
    opt.zero_grad()
    loss_backward(model, x, y)
    opt.step()
    first, second = opt.param_groups
    first["params"][0], second["params"][0] = second["params"][0], first["params"][0]
    frozen = ps[0].detach().clone()
    opt.zero_grad()
    loss_backward(model, x, y)
    opt.step()
    assert torch.equal(ps[0], frozen)
    assert hook.active.num_generators == 24 and hook.steps == 2


# -- freezing and thawing, two hooks, remove() ---------------------------------------------------
def test_a_weight_frozen_and_thawed_mid_run_equals_relax_on_the_subgroup():
    """Every 2 steps, the first weight frozen (``requires_grad=False``) for steps 2-4 and thawed
    after: each orbit step equals ``relax_`` on the generators touching no frozen parameter
    (all of them once thawed), the frozen weight bit for bit unchanged while frozen."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (model, ref)]
    GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=2)
    sub = structure.restrict(~structure.touching({"0.weight"}), "frozen")
    for k in range(8):
        for m in (model, ref):
            m[0].weight.requires_grad_(not 2 <= k <= 4)
        frozen = model[0].weight.detach().clone()
        for m, opt in zip((model, ref), opts, strict=True):
            sgd_step(m, opt, x, y)
        if k % 2 == 1:
            active = sub if 2 <= k <= 4 else structure
            gaugefix.relax_(ref, active, STRENGTH * 0.02, optimizer=opts[1])
        assert close(model, ref), k
        assert not 2 <= k <= 4 or torch.equal(model[0].weight, frozen)


def test_two_hooks_on_two_optimizers_of_one_model_equal_relax_on_their_subgroups():
    """The first two layers in one SGD (lr 0.05, every 2), the last two in an Adam (lr 0.01,
    every 3): each hook acts on the generators whose parameters its optimizer holds (the first
    and the last hidden layer; the middle one, touching both, by neither), equal to ``relax_``
    on those subgroups by hand."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    halves = []
    for m in (model, ref):
        ps = list(m.parameters())
        halves.append((torch.optim.SGD(ps[:4], lr=0.05), torch.optim.Adam(ps[4:], lr=0.01)))
    hooks = [
        GaugeFixing(opt, model, structure, STRENGTH, balance_at_start=False, every=every)
        for opt, every in zip(halves[0], (2, 3), strict=True)
    ]
    assert [hook.active.num_generators for hook in hooks] == [12, 12]
    keep = torch.arange(structure.num_generators)
    subs = [structure.restrict(keep < 12, "a"), structure.restrict(keep >= 24, "b")]
    for k in range(6):
        for m, pair in zip((model, ref), halves, strict=True):
            for opt in pair:
                opt.zero_grad()
            loss_backward(m, x, y)
            for opt in pair:
                opt.step()
        for sub, opt, every, lr in zip(subs, halves[1], (2, 3), (0.05, 0.01), strict=True):
            if k % every == every - 1:
                gaugefix.relax_(ref, sub, STRENGTH * every * lr, optimizer=opt)
        assert close(model, ref), k
    assert [hook.steps for hook in hooks] == [3, 2]


def test_remove_mid_interval_stops_the_hook_and_a_new_one_starts_afresh():
    """``remove()`` one step into an interval of 3: the next steps are plain SGD bit for bit;
    a hook attached again (``balance_at_start=False``) takes its first orbit step 3 steps
    later, at the learning rates summed since it was attached; loading the first hook's state
    instead resumes the interval where it stood."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref)]
    first = GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=3)
    for k in range(8):
        if k == 1:
            first.remove()
        if k == 3:
            GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=3)
        for m, opt in zip((model, ref), opts, strict=True):
            sgd_step(m, opt, x, y)
        if k == 5:
            gaugefix.relax_(ref, structure, STRENGTH * 3 * 0.05, optimizer=opts[1])
        assert close(model, ref), k
    resumed = copy.deepcopy(model)
    opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(opts[0].state_dict())
    hook = GaugeFixing(opt, resumed, structure, STRENGTH, balance_at_start=False, every=3)
    hook.load_state_dict(first.state_dict())  # one step into its interval
    for m, o in ((resumed, opt), (ref, opts[1]), (resumed, opt), (ref, opts[1])):
        sgd_step(m, o, x, y)
    gaugefix.relax_(ref, structure, STRENGTH * 3 * 0.05, optimizer=opts[1])
    assert close(resumed, ref) and hook.state_dict()["steps"] == 1


# -- a GradScaler skipping a step inside an interval ---------------------------------------------
def test_a_step_a_grad_scaler_skips_mid_interval_is_not_counted():
    """Adam (not fused) under a scaler of 2^10, every 3, an inf in the loss at step 1: the scaler
    skips that step (no ``optimizer.step()``), so the orbit steps come after the 3rd and 6th
    steps taken (steps 3 and 6 of 7), at the sums of their learning rates; equal to a hand loop
    to 1e-12."""
    model, x, y, structure = setup(WIDTHS)
    ref = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, foreach=False) for m in (model, ref)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in opts]
    hook = GaugeFixing(opts[0], model, structure, STRENGTH, balance_at_start=False, every=3)
    for k in range(7):
        for m, opt, scaler in zip((model, ref), opts, scalers, strict=True):
            opt.zero_grad()
            loss = (m(x) - y).square().mean() * (float("inf") if k == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if k in (3, 6):
            gaugefix.relax_(ref, structure, STRENGTH * 3 * 0.01, optimizer=opts[1])
        assert close(model, ref), k
    assert (hook.steps, hook.skipped, hook.state_dict()["since"]) == (2, 0, 0)
