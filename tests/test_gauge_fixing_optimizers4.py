"""``GaugeFixing`` over several optimizers, each step's learning rates kept with the groups that
took them: groups reordered between two optimizers' steps keep their sums (in mid-interval and
at an orbit step), and a state saved while one optimizer's step waits for another's (a GAN's G
stepping before D) records it, so that the resumed run goes on as the uninterrupted one."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import gaugefix
from test_gauge_fixing_optimizers import (
    STRENGTH,
    assert_models_close,
    batch,
    gpt,
    gradients,
    muon_adamw,
    train,
)
from test_gauge_fixing_optimizers3 import LR_A, LR_A2, LR_B, hooked, rates, three_groups

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)  # parameters not held: their generators left out
    yield
    logging.disable(logging.NOTSET)


def test_groups_reordered_between_two_optimizers_steps_keep_their_sums():
    """One step into an interval, the first optimizer steps, its two groups are reversed, the
    second steps: each group's sum is its own learning rate twice (the step's learning rates
    were those of the groups in the order at the step)."""
    model, s = gpt()
    a, b, _ = three_groups(model)
    hook = hooked([a, b], model, s)
    train(model, [a, b], range(1))
    gradients(model, [a, b], 1)
    a.step()
    a.param_groups.reverse()
    b.step()
    assert hook.state_dict()["lr_sums"] == [LR_A2 + LR_A2, LR_A + LR_A, LR_B + LR_B]


LR_MLP, LR_ATTN, LR_REST = 0.01, 0.004, 0.05


def by_block(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """SGD ``a`` with two groups, the MLP's parameters at ``LR_MLP`` and the attention's at
    ``LR_ATTN`` (each group holding whole generators, so a group's rate shows), and SGD ``b``
    with the rest at ``LR_REST``."""
    groups: dict[str, list] = {"fc": [], "attn": [], "rest": []}
    for name, p in model.named_parameters():
        key = "fc" if ".fc." in name or ".out." in name else "attn" if ".attn." in name else "rest"
        groups[key].append(p)
    a = torch.optim.SGD(groups["fc"], lr=LR_MLP)
    a.add_param_group({"params": groups["attn"], "lr": LR_ATTN})
    return a, torch.optim.SGD(groups["rest"], lr=LR_REST)


def test_groups_reordered_between_two_optimizers_steps_at_an_orbit_step():
    """``every=1``: the first optimizer steps, its two groups are reversed, the second steps:
    the orbit step equals ``relax_`` with each generator at ``STRENGTH * min(lr)`` of the
    groups its parameters sit in (1e-12)."""
    model, s = gpt()
    ref = copy.deepcopy(model)
    names = {p: n for n, p in model.named_parameters()}
    runs = []
    for m in (model, ref):
        a, b = by_block(m)
        gradients(m, [a, b], 0)
        runs.append((a, b, hooked([a, b], m, s, every=1) if m is model else None))
        a.step()
        a.param_groups.reverse()
        b.step()
    (a, b, hook), (ra, rb, _) = runs
    assert (hook.steps, hook.skipped) == (1, 0)
    lr = {g["lr"]: [names[p] for p in g["params"]] for g in [*a.param_groups, *b.param_groups]}
    rate = rates(hook.active, lr)
    assert set(rate.unique().tolist()) >= {STRENGTH * LR_MLP, STRENGTH * LR_ATTN}
    h = gaugefix.relax_(ref, hook.active, rate, optimizer=[ra, rb])
    assert float(h.abs().max()) > 1e-3
    assert_models_close(model, ref)


def gan_steps(model, g, d, steps: range) -> None:
    """Training steps of a GAN-like loop: ``g`` steps, then ``d`` twice, each after its own
    backward pass (the training step the hook sees spans two of these)."""
    for i in steps:
        for k, opt in enumerate((g, d, d)):
            g.zero_grad()
            d.zero_grad()
            model(batch(3 * i + k)).square().mean().backward()
            opt.step()


@pytest.mark.parametrize("every", [1, 2])
def test_a_state_saved_while_an_optimizer_waits_for_another_resumes_exactly(every):
    """``g`` then ``d`` twice per training step: after a step ``d``'s second step waits for
    ``g``'s next one; a state saved there (through JSON) and loaded into a fresh hook continues
    as the uninterrupted run does (1e-12; before: the waiting step was lost, 2.5e-5 off)."""
    runs = []
    for resume in (False, True):
        model, s = gpt()
        g, d = muon_adamw(model)
        hook = hooked([g, d], model, s, every=every)
        gan_steps(model, g, d, range(1))
        if resume:
            saved = json.loads(json.dumps(hook.state_dict()))
            hook.remove()
            fresh = copy.deepcopy(model)
            g2, d2 = muon_adamw(fresh)
            g2.load_state_dict(g.state_dict())
            d2.load_state_dict(d.state_dict())
            model, g, d = fresh, g2, d2
            hook = hooked([g, d], model, s, every=every)
            hook.load_state_dict(saved)
        gan_steps(model, g, d, range(1, 4))
        runs.append((model, hook.state_dict()))
    (model, state), (resumed, resumed_state) = runs
    assert resumed_state == state and state["steps"] == 4 // every
    assert_models_close(model, resumed)
    assert [i for i, _ in saved["open"]] == [1]  # d waited for g


def test_an_open_step_that_does_not_fit_the_optimizers_is_refused_with_nothing_changed():
    """``open`` naming an optimizer the hook does not have, one twice, or learning rates not one
    per group: one ``ValueError`` line, the hook's state as it was."""
    model, s = gpt()
    g, d = muon_adamw(model)
    hook = hooked([g, d], model, s)
    before = hook.state_dict()
    for open_ in ([[2, [0.1]]], [[1, [0.1]], [1, [0.1]]], [[0, [0.1, 0.2]]], [["0", [0.1]]]):
        with pytest.raises(ValueError) as refused:
            hook.load_state_dict({**before, "open": open_})
        assert "\n" not in str(refused.value) and hook.state_dict() == before
