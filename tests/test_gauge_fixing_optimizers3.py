"""``GaugeFixing`` over several optimizers, each group's sum of learning rates kept with its own
optimizer: a state records each optimizer's group count (optimizers in another order are
refused, a state saved without the counts loads only where that is unambiguous), a group added
after loading or between two optimizers' steps takes no other group's sum, and the gradients of
every optimizer step of a training step (one optimizer stepping twice, as a GAN's
discriminator) are checked before the orbit step."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import gaugefix
from test_gauge_fixing_optimizers import (
    ADAMW_LR,
    STRENGTH,
    assert_models_close,
    batch,
    gpt,
    gradients,
    muon_adamw,
    split,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
D = torch.float64
LR_A, LR_A2, LR_B, LR_ADDED = 0.01, 0.004, 0.002, 0.05
EVERY = 3
SCALE = 2.0**12


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)  # parameters not held yet: their generators left out
    yield
    logging.disable(logging.NOTSET)


def three_groups(model: torch.nn.Module) -> tuple[O.Optimizer, O.Optimizer, list]:
    """SGD ``a`` with two groups of weight matrices (the MLP's at ``LR_A``, the attention's
    output projection at ``LR_A2``), SGD ``b`` with the rest (``LR_B``), and the weight matrix
    neither holds yet (the attention's input projection)."""
    params = dict(model.named_parameters())
    matrices, rest = split(model)
    a = O.SGD([params[n] for n in matrices[2:]], lr=LR_A)
    a.add_param_group({"params": [params[matrices[1]]], "lr": LR_A2})
    b = O.SGD([params[n] for n in rest], lr=LR_B)
    return a, b, held_by_none(model)


def held_by_none(model: torch.nn.Module) -> list:
    """The weight matrix :func:`three_groups` leaves to neither optimizer."""
    return [dict(model.named_parameters())[split(model)[0][0]]]


def hooked(opts: list, model, s, every: int = EVERY) -> gaugefix.GaugeFixing:
    return gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=every, balance_at_start=False)


def saved_state() -> tuple[dict, torch.nn.Module, gaugefix.GaugeStructure, O.Optimizer, ...]:
    """The state of a hook over ``[a, b]`` one step into an interval of ``EVERY``, removed."""
    model, s = gpt()
    a, b, _ = three_groups(model)
    hook = hooked([a, b], model, s)
    train(model, [a, b], range(1))
    state = hook.state_dict()
    hook.remove()
    return state, model, s, a, b


def test_a_state_records_each_optimizers_groups_parameter_counts():
    state, model, *_ = saved_state()
    matrices, rest = split(model)
    assert state["groups"] == [[len(matrices) - 2, 1], [len(rest)]]
    assert state["lr_sums"] == [LR_A, LR_A2, LR_B]


@pytest.mark.parametrize(
    "case, match",
    [
        ("another order", "optimizer 0 with groups of"),
        ("no counts", "does not record which optimizer"),
        ("another number", "covers 2 optimizers"),
    ],
)
def test_a_state_that_does_not_fit_the_optimizers_is_refused_with_nothing_changed(case, match):
    """Optimizers in another order with as many groups in all, a state saved without the group
    counts for several optimizers (which sums are whose is unknown) and a state of another
    number of optimizers: one ``ValueError`` line, the hook's state as it was."""
    state, model, s, a, b = saved_state()
    if case == "no counts":
        state, opts = {k: v for k, v in state.items() if k != "groups"}, [a, b]
    elif case == "another order":
        opts = [b, a]
    else:  # one optimizer with as many groups
        a.add_param_group({"params": held_by_none(model), "lr": LR_ADDED})
        opts = [a]
    hook = hooked(opts, model, s)
    before = hook.state_dict()
    with pytest.raises(ValueError, match=match) as refused:
        hook.load_state_dict(state)
    assert "\n" not in str(refused.value) and hook.state_dict() == before


def test_a_state_without_counts_loads_where_unambiguous():
    """Saved without the group counts: at an orbit step (no sums) over several optimizers, or
    with sums over one, it loads; a resumed interval goes on as before."""
    state, model, s, a, b = saved_state()
    empty = {"steps": 1, "skipped": 0, "since": 0, "lr_sums": []}
    hook = hooked([a, b], model, s)
    hook.load_state_dict(empty)
    matrices, rest = split(model)
    now = {k: v for k, v in hook.state_dict().items() if k != "params"}  # names: their own test
    assert now == {**empty, "groups": [[len(matrices) - 2, 1], [len(rest)]]}
    hook.remove()
    one = hooked([a], model, s)
    one.load_state_dict({**empty, "since": 1, "lr_sums": [LR_A]})
    train(model, [a], range(1), order=(0,))
    assert one.state_dict()["lr_sums"] == [LR_A + LR_A, LR_A2]


def test_a_group_added_after_loading_keeps_each_optimizers_sums():
    """A group added to the first optimizer after a state was loaded, before any step: its sum
    starts at its step, and the second optimizer keeps its own (not shifted onto it)."""
    state, model, s, a, b = saved_state()
    hook = hooked([a, b], model, s)
    hook.load_state_dict(state)
    a.add_param_group({"params": held_by_none(model), "lr": LR_ADDED})
    train(model, [a, b], range(1, 2))
    assert hook.state_dict()["lr_sums"] == [LR_A + LR_A, LR_A2 + LR_A2, LR_ADDED, LR_B + LR_B]
    assert list(map(len, hook.state_dict()["groups"])) == [3, 1]


@pytest.mark.parametrize("swapped", [False, True])
def test_two_optimizers_of_one_group_each_in_another_order_are_refused(swapped):
    """Muon and AdamW (one group each, of different parameter counts) saved as ``[muon, adamw]``
    one step into an interval: loaded as ``[adamw, muon]`` (a GAN's G and D given the other way
    round), one ``ValueError`` line and the hook's state as it was; in the same order it loads."""
    model, s = gpt()
    muon, adamw = muon_adamw(model)
    assert len(muon.param_groups[0]["params"]) != len(adamw.param_groups[0]["params"])
    hook = hooked([muon, adamw], model, s)
    train(model, [muon, adamw], range(1))
    state = hook.state_dict()
    hook.remove()
    assert state["since"] == 1 and len(state["lr_sums"]) == 2
    hook = hooked([adamw, muon] if swapped else [muon, adamw], model, s)
    before = hook.state_dict()
    if not swapped:
        hook.load_state_dict(state)
        assert hook.state_dict() == state
        return
    with pytest.raises(ValueError, match="optimizer 0 with groups of") as refused:
        hook.load_state_dict(state)
    assert "\n" not in str(refused.value) and hook.state_dict() == before


def rates(active: gaugefix.GaugeStructure, lrs: dict[float, list[str]]) -> torch.Tensor:
    """Per generator of ``active``, ``STRENGTH * min(lr)`` over the parameters it touches
    (``lrs``: each rate's parameter names)."""
    rate = torch.full((active.num_generators,), torch.inf, dtype=D)
    for lr, names in lrs.items():
        rate = torch.where(active.touching(set(names)), torch.clamp(rate, max=lr), rate)
    return STRENGTH * rate


@pytest.mark.parametrize("change", ["added", "removed"])
def test_a_group_changed_between_two_optimizers_steps_takes_no_other_groups_sum(change):
    """At an orbit step (``every=1``), a group added to (removed from) the first optimizer after
    it stepped and before the second did: the added group's generators do not move (its sum
    starts at its first step), the removed group's optimizer takes the least of its sums, the
    second optimizer its own; the orbit step equals ``relax_`` at those rates (1e-12)."""
    model, s = gpt()
    ref = copy.deepcopy(model)
    names = {p: n for n, p in model.named_parameters()}
    runs = []
    for m in (model, ref):
        a, b, new = three_groups(m)
        gradients(m, [a, b], 0)
        runs.append((a, b, new, hooked([a, b], m, s, every=1) if m is model else None))
        a.step()
        if change == "added":
            a.add_param_group({"params": new, "lr": LR_ADDED})
        else:
            a.param_groups.pop()
        b.step()
    (a, b, new, hook), (ra, rb, *_) = runs
    assert (hook.steps, hook.skipped) == (1, 0)
    first = [names[p] for g in a.param_groups[:1] for p in g["params"]]
    second = [names[p] for p in b.param_groups[0]["params"]]
    lr = {LR_A: first, LR_B: second, 0.0: [names[p] for p in new]}
    if change == "removed":
        lr = {LR_A2: first, LR_B: second}
    h = gaugefix.relax_(ref, hook.active, rates(hook.active, lr), optimizer=[ra, rb])
    assert float(h.abs().max()) > 1e-3
    assert_models_close(model, ref)


def gan_step(model, d, g, scaler, i: int, inf: int | None, gauged: torch.Tensor) -> None:
    """A GAN-like training step under ``scaler``: ``d`` (fused AdamW) steps twice, each after
    its own backward pass (``inf``: the one whose gradient of ``gauged`` gets an inf, which the
    scaler makes ``d`` skip), then ``g`` (Muon)."""
    for k, opt in enumerate((d, d, g)):
        for o in (d, g):
            o.zero_grad()
        scaler.scale(model(batch(i + k)).square().mean()).backward()
        if k == inf:
            gauged.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("inf", [None, 0, 1])
def test_every_steps_gradients_are_checked_before_the_orbit_step(inf):
    """An inf in the gradients of either of ``d``'s two steps (the second one a scaler skips,
    the parameters staying finite) skips that training step's orbit step, as an inf in the
    gradients of a single optimizer's step does; none: it is taken."""
    model, s = gpt()
    g, d = muon_adamw(model)
    d = O.AdamW(d.param_groups[0]["params"], lr=ADAMW_LR, fused=True)
    hook = hooked([g, d], model, s, every=1)
    gauged = model.blocks[0].ln1.weight  # a norm gain d holds, which the orbit step moves
    assert any(p is gauged for p in hook.params.values())
    assert any(p is gauged for p in d.param_groups[0]["params"])
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    gan_step(model, d, g, scaler, 0, None, gauged)
    gan_step(model, d, g, scaler, 3, inf, gauged)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert (hook.steps, hook.skipped) == ((2, 0) if inf is None else (1, 1))


@pytest.mark.parametrize("replace", [False, True])
def test_groups_reordered_mid_interval_keep_their_sums(replace):
    """The first optimizer's two groups reordered in place, or its ``param_groups`` replaced by
    the reordered list, one step into an interval: each group keeps its own sum."""
    model, s = gpt()
    a, b, _ = three_groups(model)
    hook = hooked([a, b], model, s)
    train(model, [a, b], range(1))
    if replace:
        a.param_groups = a.param_groups[::-1]
    else:
        a.param_groups.reverse()
    train(model, [a, b], range(1, 2))
    assert hook.state_dict()["lr_sums"] == [LR_A2 + LR_A2, LR_A + LR_A, LR_B + LR_B]
