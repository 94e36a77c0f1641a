"""A second audit of ``gaugefix.step``: a state is used once (a stale one, whose buffers moved in
place since, is refused before anything changes, also after an update that failed half-way); a
chain refuses as a whole before any part changes the gradients; transformations compose only in
the order gradients -> optimizer -> updates -> parameters; ``exact`` is the applied step plus
``orbit_step_`` at every ``every``-th step with ``strength * (the lrs summed since)``, under
schedules of both changed in place (from 0 too); ``decoupled_penalty``'s step is tangent to the
orbit (in the span of the generators' tangent vectors, the function unchanged to first order);
a float32 tensor learning rate is taken at its value, as torch.optim given that value."""

from __future__ import annotations

import copy

import pytest
import torch

import gaugefix
from gaugefix import step
from test_step_audit import (
    DATA,
    OPTIMIZERS,
    STEPS,
    STRUCTURE,
    close,
    gauged,
    gauged_stack,
    grads_at,
    loss,
    mlp,
    one_copy_grads,
    ones,
    snapshot,
    start,
)

D = torch.float64
LR, STRENGTH = 0.05, 4.0


def params_of(seed: int = 0) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in gauged(seed).named_parameters()}


STATEFUL = {
    "momentum": lambda: step.applied(step.sgd(LR, momentum=0.9)),
    "adam": lambda: step.applied(step.adam(LR)),
    "adamw": lambda: step.applied(step.adamw(LR)),
    "chain": lambda: step.applied(step.chain(step.penalty(STRUCTURE, strength=1.0), step.adam(LR))),
    "exact-sgd": lambda: step.exact(
        step.applied(step.sgd(LR)), STRUCTURE, lr=LR, strength=STRENGTH, every=3
    ),
}


def unchanged(before: list[torch.Tensor], *trees) -> bool:
    after = snapshot(*trees)
    return len(before) == len(after) and all(map(torch.equal, before, after))


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_a_state_given_again_is_refused_before_anything_changes(kind):
    """The state an update was given, given again (its returned state dropped, as two analyses
    did): ``ValueError`` with nothing changed. It used to be taken silently: Adam's bias
    correction stayed at ``t = 1``, momentum restarted from the gradient (its state from ``init``
    given again), exact's count of steps
    since its orbit step never moved (every 3: no orbit step ever)."""
    tx = STATEFUL[kind]()
    params = params_of()
    old = tx.init(params)
    params, _ = tx.update(one_copy_grads(params), old, params)
    grads = one_copy_grads(params)
    before = snapshot(grads, old, params)
    with pytest.raises(ValueError, match="already given to an update"):
        tx.update(grads, old, params)
    assert unchanged(before, grads, old, params)


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_a_deep_copy_taken_before_an_update_branches_as_the_original(kind):
    """``copy.deepcopy`` of a state before its update (adam_split's plain Adam step) is a state
    of its own: its update equals the original's bit for bit."""
    tx = STATEFUL[kind]()
    params = params_of()
    state = tx.init(params)
    for _ in range(4):
        params, state = tx.update(one_copy_grads(params), state, params)
    grads = one_copy_grads(params)
    twin_params, twin_state = copy.deepcopy((params, state))
    twin_params, _ = tx.update({n: g.clone() for n, g in grads.items()}, twin_state, twin_params)
    params, _ = tx.update(grads, state, params)
    assert all(torch.equal(params[n], twin_params[n]) for n in params)


class Boom(Exception):
    pass


def failing() -> step.Transformation:
    def update(updates, state, params):
        raise Boom

    return step.Transformation(lambda params: step.EmptyState(), update)


def test_a_state_left_half_moved_by_a_failed_update_is_refused():
    """An update that fails after Adam moved its moments in place (a later part of the chain
    raised): the state it was given is half-moved, and given again it is refused, not taken as
    if at its step count."""
    params = params_of()
    adam = step.adam(LR)
    state = adam.init(params)
    with pytest.raises(Boom):
        step.chain(adam, failing()).update(one_copy_grads(params), (state, step.EmptyState()),
                                           params)  # fmt: skip
    with pytest.raises(ValueError, match="already given to an update"):
        adam.update(one_copy_grads(params), state, params)


@pytest.mark.parametrize("kind", ["momentum", "adam", "adamw", "exact-sgd"])
def test_a_refused_update_leaves_a_state_that_goes_on_as_if_never_tried(kind):
    """Gradients that do not fit are refused; the same state then steps on bit for bit as a run
    that never saw them (the refusal spent nothing)."""
    tx = STATEFUL[kind]()
    runs = []
    for tried in (False, True):
        params = params_of()
        state = tx.init(params)
        for t in range(7):
            if tried and t == 4:
                bad = ones(params, **{"0.bias": torch.ones(9, dtype=D)})
                with pytest.raises(ValueError, match="^the gradient of '0.bias'"):
                    tx.update(bad, state, params)
            params, state = tx.update(one_copy_grads(params), state, params)
        runs.append(params)
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.parametrize(
    "first,bad_state,match",
    [(lambda: step.weight_decay(strength=0.1), "other", "^the optimizer state"),
     (lambda: step.penalty(STRUCTURE, strength=1.0), "other", "^the optimizer state"),
     (lambda: step.penalty(STRUCTURE, strength=1.0), "given", "already given to an update")],
)  # fmt: skip
def test_a_chain_refuses_as_a_whole_before_a_part_changes_the_gradients(first, bad_state, match):
    """A chain whose optimizer refuses its state (one made for other parameters, or one already
    given to an update): ``ValueError`` with the gradients as given. The gradient
    transformation before it used to add its term to them in place first (a retry added it
    twice)."""
    params = params_of()
    tx = step.chain(first(), step.adam(LR))
    if bad_state == "other":
        state = tx.init({**params, "z": torch.ones(2, dtype=D)})
    else:
        state = tx.init(params)
        tx.update(one_copy_grads(params), state, params)
    grads = one_copy_grads(params)
    before = snapshot(grads, state, params)
    with pytest.raises(ValueError, match=match):
        tx.update(grads, state, params)
    assert unchanged(before, grads, state, params)


# -- composition order --------------------------------------------------------------------------


WRONG_ORDER = {
    "penalty after the optimizer": lambda: step.chain(step.sgd(LR),
                                                      step.penalty(STRUCTURE, strength=1.0)),
    "weight decay after the optimizer": lambda: step.chain(step.adam(LR),
                                                           step.weight_decay(strength=0.1)),
    "decoupled penalty before it": lambda: step.chain(
        step.decoupled_penalty(STRUCTURE, lr=LR, strength=1.0), step.sgd(LR)),
    "two optimizers": lambda: step.chain(step.sgd(LR), step.adam(LR)),
    "scale before the optimizer": lambda: step.chain(
        step.scale_by_tensor(lambda p: {}), step.sgd(LR)),
    "gradients applied": lambda: step.applied(step.penalty(STRUCTURE, strength=1.0)),
    "applied twice": lambda: step.applied(step.applied(step.sgd(LR))),
    "exact of updates": lambda: step.exact(step.sgd(LR), STRUCTURE, lr=LR, strength=1.0),
    "an applied step chained": lambda: step.chain(step.applied(step.sgd(LR)),
                                                  step.scale_by_tensor(lambda p: {})),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WRONG_ORDER))
def test_transformations_out_of_order_are_refused_when_built(case):
    """Each transformation states what it takes and gives (gradients, updates, parameters); one
    that takes what the one before does not give is refused when composed. They used to be
    taken: a penalty after SGD added ``+strength grad P`` to the parameters (ascent, at rate
    ``strength``, not ``lr strength``); ``exact(sgd(...))`` moved the updates by the orbit step,
    never the parameters."""
    with pytest.raises(ValueError, match="takes|gives"):
        WRONG_ORDER[case]()


def test_the_documented_orders_and_unlabelled_parts_compose():
    """gradients -> optimizer -> updates -> applied -> exact, and a transformation made elsewhere
    (``Transformation(init, update)``, e.g. the sweep engine's) anywhere."""
    own = step.Transformation(lambda params: step.EmptyState(), lambda u, s, p: (u, s))
    tx = step.exact(
        step.applied(step.chain(own, step.weight_decay(strength=0.1),
                                step.penalty(STRUCTURE, strength=1.0), own, step.adamw(LR), own,
                                step.decoupled_penalty(STRUCTURE, lr=LR, strength=1.0),
                                step.scale_by_tensor(lambda p: {}), own)),
        STRUCTURE, lr=LR, strength=1.0,
    )  # fmt: skip
    assert (tx.takes, tx.gives) == (None, "parameters")  # it starts with one not stated
    plain = step.chain(step.weight_decay(strength=0.1), step.adam(LR), own)
    assert (plain.takes, plain.gives) == ("gradients", None)
    params = params_of()
    state = tx.init(params)
    params, state = tx.update(one_copy_grads(params), state, params)
    assert state.inner[4].step == 1


# -- exact: its every, its rate summed over steps, schedules changed in place ------------------


def test_exact_is_the_step_then_orbit_steps_at_the_summed_rate_under_schedules():
    """``exact(applied(adam(lr)), every=4)`` with a tensor lr and a tensor strength both changed
    in place between steps (strength 0 when built, raised later: a warm-up) equals, bit for bit,
    the applied step alone plus ``orbit_step_`` after every 4th step at ``strength *`` (the lrs
    summed since the last one). A strength tensor that was 0 when built used to never act."""
    lr, strength = torch.tensor(LR, dtype=D), torch.tensor(0.0, dtype=D)
    schedule = [(LR * 0.9**t, 0.0 if t < 6 else 3.0 + t) for t in range(STEPS)]
    every = 4
    tx = step.exact(step.applied(step.adam(lr)), STRUCTURE, lr=lr, strength=strength, every=every)
    inner = step.applied(step.adam(lr))
    params, ref = params_of(), params_of()
    state, ref_state = tx.init(params), inner.init(ref)
    since, orbit_steps = 0.0, 0
    for t, (a, s) in enumerate(schedule):
        lr.fill_(a)
        strength.fill_(s)
        params, state = tx.update(one_copy_grads(params), state, params)
        ref, ref_state = inner.update(one_copy_grads(ref), ref_state, ref)
        since += a
        if (t + 1) % every == 0:
            rate = torch.tensor(s * since, dtype=D)
            step.orbit_step_(ref, ref_state, STRUCTURE, rate)
            since, orbit_steps = 0.0, orbit_steps + (s > 0)
        assert all(torch.equal(params[n], ref[n]) for n in params), t
        assert state.orbit.since == (t + 1) % every
    assert orbit_steps == 4
    mu_plain = gaugefix.imbalance(dict(inner_run()), STRUCTURE).norm()
    assert gaugefix.imbalance(params, STRUCTURE).norm() < 0.5 * mu_plain  # the orbit steps acted


def inner_run() -> dict[str, torch.Tensor]:
    """Adam alone at the schedule's lrs (no orbit step)."""
    lr = torch.tensor(LR, dtype=D)
    tx = step.applied(step.adam(lr))
    params = params_of()
    state = tx.init(params)
    for t in range(STEPS):
        lr.fill_(LR * 0.9**t)
        params, state = tx.update(one_copy_grads(params), state, params)
    return params


# -- decoupled_penalty: a vertical step ---------------------------------------------------------


def tangents(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The generators' tangent vectors ``xi_n = w_n * theta`` at ``params``, ``[E, N]`` (entries
    of all parameters flattened in order): ``w_n(e)`` read off the factor ``exp(w_n(e))`` by which
    ``g(e_n)`` scales entry ``e``."""
    model = mlp(0)
    columns = []
    for n in range(STRUCTURE.num_generators):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        h = torch.zeros(STRUCTURE.num_generators, dtype=D)
        h[n] = 1.0
        gaugefix.apply_gauge_(model, STRUCTURE, h)
        moved = dict(model.named_parameters())
        w = torch.cat([(moved[k].detach() / params[k]).log().flatten() for k in params])
        columns.append(w * torch.cat([params[k].flatten() for k in params]))
    return torch.stack(columns, 1)


def test_decoupled_penalty_step_is_tangent_to_the_orbit_alone_and_stacked():
    """The vertical step ``decoupled_penalty`` adds (to zero updates) is ``sum_n c_n xi_n`` over
    the generators' tangent vectors with ``c = -lr strength mu`` exactly (float64, 1e-12; the
    projection test is test_mechanism's), leaves the network's output unchanged to first order
    (its directional derivative along the step, by ``torch.func.jvp``, at rounding level), and
    each stacked copy (per-copy lr and strength) gets the step it gets alone, bit for bit."""
    lrs, strengths = [0.05, 0.0, 0.2], [4.0, 2.0, 0.5]
    stack = gauged_stack(3)
    per_copy = {"lr": torch.tensor(lrs, dtype=D), "strength": torch.tensor(strengths, dtype=D)}
    tx = step.decoupled_penalty(STRUCTURE, **per_copy, batch_dims=1)
    model = mlp(0)
    zeros = {n: torch.zeros_like(v) for n, v in stack.items()}
    stacked, _ = tx.update(zeros, step.EmptyState(), stack)
    for r in range(3):
        params = {n: v[r] for n, v in stack.items()}
        v, _ = step.decoupled_penalty(STRUCTURE, lr=lrs[r], strength=strengths[r]).update(
            {n: torch.zeros_like(p) for n, p in params.items()}, step.EmptyState(), params
        )
        assert all(torch.equal(v[n], stacked[n][r]) for n in v)
        flat = torch.cat([v[n].flatten() for n in params])
        xi = tangents(params)
        mu = gaugefix.imbalance(params, STRUCTURE)
        close(flat, xi @ (-lrs[r] * strengths[r] * mu))
        assert flat.norm() > 1e-3 or not lrs[r]  # a step that moves
        _, derivative = torch.func.jvp(
            lambda p: torch.func.functional_call(model, p, (DATA,)), (params,), (v,)
        )
        scale = torch.func.functional_call(model, params, (DATA,)).abs().max() * flat.norm()
        assert derivative.abs().max() <= 1e-13 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_per_copy_lr_and_strength_on_two_devices_are_refused_when_built():
    """A per-copy lr on the GPU and a per-copy strength on the CPU: ``ValueError`` when built
    (they used to meet at the orbit step, a RuntimeError after the optimizer step moved the
    parameters)."""
    lr, strength = torch.ones(2, dtype=D, device="cuda"), torch.ones(2, dtype=D)
    inner = step.applied(step.sgd(lr))
    for build in (
        lambda: step.exact(inner, STRUCTURE, lr=lr, strength=strength, batch_dims=1),
        lambda: step.decoupled_penalty(STRUCTURE, lr=lr, strength=strength, batch_dims=1),
    ):
        with pytest.raises(ValueError, match="^lr and strength must be on one device"):
            build()


# -- tensor learning rates of another dtype -----------------------------------------------------


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_float32_tensor_lr_is_taken_at_its_value_over_20_steps(kind):
    """Stacked copies with a float32 lr ``[3]`` for float64 parameters (scheduled in place in
    float32): each copy is torch.optim given that lr's value as a number at every step. (Given
    the float32 tensor itself, torch.optim.Adam computes ``lr / c1`` in float32, 5e-8 off.)"""
    lrs = [0.05, 0.02, 0.1]
    references = []
    for r, a in enumerate(lrs):
        lr = torch.tensor(a, dtype=torch.float32)
        params = {n: v.requires_grad_(True) for n, v in start(r).items()}
        opt = OPTIMIZERS[kind][0](list(params.values()), float(lr))
        trajectory = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss(params).backward()
            opt.step()
            trajectory.append({n: v.detach().clone() for n, v in params.items()})
            lr.mul_(0.9)
            opt.param_groups[0]["lr"] = float(lr)
        references.append(trajectory)
    lr = torch.tensor(lrs, dtype=torch.float32)
    stack = {n: torch.stack([start(r)[n] for r in range(3)]) for n in start(0)}
    tx = step.applied(OPTIMIZERS[kind][1](lr))
    state = tx.init(stack)
    for t in range(STEPS):
        each = [grads_at({n: v[r] for n, v in stack.items()}) for r in range(3)]
        stack, state = tx.update({n: torch.stack([g[n] for g in each]) for n in stack}, state,
                                 stack)  # fmt: skip
        for r in range(3):
            for n in stack:
                close(stack[n][r], references[r][t][n])
        lr.mul_(0.9)
