"""``GaugeFixing`` over several optimizers, each group's sum of learning rates kept with the
group's parameters: a state records each group's parameter names, so that optimizers of equal
group counts given in another order are refused; a group inserted before the others (or groups
rebuilt over the same parameters) takes no other group's sum; and the gradient check of an
optimizer step waiting for another's is saved with the state."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from test_gauge_fixing_optimizers import (
    ADAMW_LR,
    assert_models_close,
    batch,
    gpt,
    gradients,
    muon_adamw,
    train,
)
from test_gauge_fixing_optimizers3 import (
    LR_A,
    LR_A2,
    LR_ADDED,
    LR_B,
    SCALE,
    held_by_none,
    hooked,
    saved_state,
    three_groups,
)

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)  # parameters not held: their generators left out
    yield
    logging.disable(logging.NOTSET)


def halves(model: torch.nn.Module) -> tuple[O.Optimizer, O.Optimizer]:
    """SGD ``a`` over the first half of the parameters at ``LR_A``, SGD ``b`` over as many
    after them at ``LR_B``: one group each, of equal parameter counts."""
    params = list(model.parameters())
    half = len(params) // 2
    return O.SGD(params[:half], lr=LR_A), O.SGD(params[half : 2 * half], lr=LR_B)


def test_optimizers_of_equal_group_counts_in_another_order_are_refused():
    """Saved over ``[a, b]`` one step into an interval, loaded over ``[b, a]`` (their groups
    of equal parameter counts): one ``ValueError`` line naming the parameters, the hook's state
    as it was (before: it loaded, ``b`` taking ``a``'s sum and ``a`` ``b``'s); in the same
    order it loads and goes on."""
    model, s = gpt()
    a, b = halves(model)
    hook = hooked([a, b], model, s)
    train(model, [a, b], range(1))
    state = json.loads(json.dumps(hook.state_dict()))
    hook.remove()
    assert state["groups"][0] == state["groups"][1]
    hook = hooked([b, a], model, s)
    before = hook.state_dict()
    with pytest.raises(ValueError, match="optimizers in another order") as refused:
        hook.load_state_dict(state)
    assert "\n" not in str(refused.value) and hook.state_dict() == before
    hook.remove()
    hook = hooked([a, b], model, s)
    hook.load_state_dict(state)
    train(model, [a, b], range(1, 2))
    assert hook.state_dict()["lr_sums"] == [LR_A + LR_A, LR_B + LR_B]


def test_a_state_without_parameter_names_still_loads():
    """A state without ``params`` (only the group counts) loads where the counts fit, and
    goes on as one with them."""
    state, model, s, a, b = saved_state()
    old = {k: v for k, v in state.items() if k != "params"}
    hook = hooked([a, b], model, s)
    hook.load_state_dict(old)
    train(model, [a, b], range(1, 2))
    assert hook.state_dict()["lr_sums"] == [LR_A + LR_A, LR_A2 + LR_A2, LR_B + LR_B]


@pytest.mark.parametrize("loaded", [False, True])
def test_a_group_inserted_first_takes_no_other_groups_sum(loaded):
    """One step into an interval (``loaded``: after a state saved there was loaded), a group
    inserted at the front of the first optimizer's groups: its sum starts at its step, every
    other group keeps its own (before: each shifted one group on)."""
    state, model, s, a, b = saved_state()
    hook = hooked([a, b], model, s)
    if loaded:
        hook.load_state_dict(state)
    else:
        train(model, [a, b], range(1))
    a.add_param_group({"params": held_by_none(model), "lr": LR_ADDED})
    a.param_groups.insert(0, a.param_groups.pop())
    train(model, [a, b], range(1, 2))
    sums = [LR_ADDED, LR_A + LR_A, LR_A2 + LR_A2, LR_B + LR_B]
    assert hook.state_dict()["lr_sums"] == sums


def test_groups_rebuilt_over_the_same_parameters_keep_their_sums():
    """One step into an interval the first optimizer's groups are rebuilt (``load_state_dict``
    makes new group objects) and reversed: each keeps its own sum, found by its parameters."""
    model, s = gpt()
    a, b, _ = three_groups(model)
    hook = hooked([a, b], model, s)
    train(model, [a, b], range(1))
    a.load_state_dict(a.state_dict())
    a.param_groups.reverse()
    train(model, [a, b], range(1, 2))
    assert hook.state_dict()["lr_sums"] == [LR_A2 + LR_A2, LR_A + LR_A, LR_B + LR_B]


def waiting_step(model, g, d) -> None:
    """``d`` (fused AdamW) steps under a ``GradScaler`` with an inf in the gradient of a norm
    gain it holds (the scaler makes it skip; the hook's check of its gradients fails)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for opt in (g, d):
        opt.zero_grad()
    scaler.scale(model(batch(0)).square().mean()).backward()
    model.blocks[0].ln1.weight.grad[0] = float("inf")
    scaler.step(d)


def test_a_waiting_steps_failed_gradient_check_is_saved():
    """``every=1``: ``d`` steps with a non-finite gradient and waits for ``g``; a state saved
    there (through JSON) and loaded into a fresh hook skips the orbit step at ``g``'s step as
    the uninterrupted run does (float64, 1e-12; before: the check was lost, the resumed run
    took the orbit step)."""
    runs = []
    for resume in (False, True):
        model, s = gpt()
        g, d = muon_adamw(model)
        d = O.AdamW(d.param_groups[0]["params"], lr=ADAMW_LR, fused=True)
        hook = hooked([g, d], model, s, every=1)
        waiting_step(model, g, d)
        if resume:
            saved = json.loads(json.dumps(hook.state_dict()))
            hook.remove()
            model = copy.deepcopy(model)
            g2, d2 = muon_adamw(model)
            d2 = O.AdamW(d2.param_groups[0]["params"], lr=ADAMW_LR, fused=True)
            g2.load_state_dict(g.state_dict())
            d2.load_state_dict(d.state_dict())
            g, d = g2, d2
            hook = hooked([g, d], model, s, every=1)
            hook.load_state_dict(saved)
        gradients(model, [g, d], 1)
        g.step()
        runs.append((model, (hook.steps, hook.skipped)))
    (model, counts), (resumed, resumed_counts) = runs
    assert counts == resumed_counts == (0, 1)
    assert_models_close(model, resumed)


def test_bad_names_or_gradient_check_are_refused_with_nothing_changed():
    """``params`` not one list per optimizer, or naming other parameters, and an ``open_ok``
    that is not true or false: one ``ValueError`` line, the hook's state as it was."""
    state, model, s, a, b = saved_state()
    hook = hooked([a, b], model, s)
    before = hook.state_dict()
    other = [[["head.weight"]], *state["params"][1:]]
    opened = {**state, "since": 0, "lr_sums": [], "open": [[0, [LR_A, LR_A2]]]}
    for bad in (
        {**state, "params": state["params"][:1]},
        {**state, "params": other},
        {**opened, "open_ok": "yes"},
    ):
        with pytest.raises(ValueError) as refused:
            hook.load_state_dict(bad)
        assert "\n" not in str(refused.value) and hook.state_dict() == before
