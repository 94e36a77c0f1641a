"""``GaugeFixing``'s sums of learning rates followed through parameter groups that change
(rebuilt, empty, tuples, added after a load) and its checkpoints: a resumed run (state_dict,
JSON, load_state_dict into a fresh hook over a restored model and optimizers) goes on as the
uninterrupted one, at every point of a GAN's G, D, D steps; a state that does not fit is
refused in one line with nothing changed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import gaugefix
from test_gauge_fixing_optimizers import assert_models_close, batch, gpt, split
from test_gauge_fixing_optimizers3 import hooked

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
LR_A, LR_B, LR_EMPTY, LR_EMPTY2 = 0.05, 0.02, 0.01, 0.03
MOMENTUM = 0.9
GAN = (0, 1, 1)  # per training step: G, then D twice


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)  # generators of parameters not held: left out
    yield
    logging.disable(logging.NOTSET)


def two(model: torch.nn.Module, empty: int = 0) -> list[O.Optimizer]:
    """SGD with momentum ``a`` over the weight matrices (``LR_A``, then ``empty`` empty groups
    at ``LR_EMPTY``, ``LR_EMPTY2``), SGD with momentum ``b`` over the rest (``LR_B``)."""
    params = dict(model.named_parameters())
    matrices, rest = split(model)
    a = O.SGD([params[n] for n in matrices], lr=LR_A, momentum=MOMENTUM)
    for lr in (LR_EMPTY, LR_EMPTY2)[:empty]:
        a.add_param_group({"params": [], "lr": lr})
    return [a, O.SGD([params[n] for n in rest], lr=LR_B, momentum=MOMENTUM)]


def event(model: torch.nn.Module, opts: list[O.Optimizer], k: int, i: int) -> None:
    """Optimizer ``k``'s step on fresh gradients of batch ``i``."""
    for opt in opts:
        opt.zero_grad()
    model(batch(i)).square().mean().backward()
    opts[k].step()


def events(steps: int, order: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(k, i) for i in range(steps) for k in order]


def test_empty_groups_rebuilt_by_load_state_dict_keep_every_groups_sum():
    """Optimizer ``a`` with its matrices' group at the largest learning rate and two empty
    groups, rebuilt by ``a.load_state_dict`` mid-interval: every group keeps its own sum (before:
    the two empty groups, both of no parameters, were matched to one old group, the other taken
    as removed, and every group of ``a`` fell to the least sum, ``LR_EMPTY``)."""
    model, s = gpt()
    opts = two(model, empty=2)
    hook = hooked(opts, model, s, every=5)
    event(model, opts, 0, 0)
    event(model, opts, 1, 0)
    opts[0].load_state_dict(opts[0].state_dict())
    assert hook.state_dict()["lr_sums"] == [LR_A, LR_EMPTY, LR_EMPTY2, LR_B]
    event(model, opts, 0, 1)
    event(model, opts, 1, 1)
    assert hook.state_dict()["lr_sums"] == [2 * LR_A, 2 * LR_EMPTY, 2 * LR_EMPTY2, 2 * LR_B]


def test_a_group_whose_params_are_a_tuple_is_followed():
    """A group whose ``params`` was replaced by a tuple of the same parameters, and the groups
    then rebuilt: the sums stay each group's."""
    model, s = gpt()
    opts = two(model, empty=1)
    hook = hooked(opts, model, s, every=5)
    event(model, opts, 0, 0)
    event(model, opts, 1, 0)
    opts[0].param_groups[0]["params"] = tuple(opts[0].param_groups[0]["params"])
    opts[0].param_groups[:] = [dict(g) for g in reversed(opts[0].param_groups)]
    assert hook.state_dict()["lr_sums"] == [LR_EMPTY, LR_A, LR_B]


def run(
    order: tuple[int, ...],
    steps: int,
    every: int,
    save_at: int | None,
    *,
    each: bool = False,
    late: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Train over ``events(steps, order)``; at event ``save_at`` (``None``: never) save the
    model, the optimizers and the hook (through JSON) and go on with fresh ones restored from
    them (``late``: the optimizers' states loaded after the hook's, which rebuilds their
    groups); ``each``: call ``state_dict`` after every event. The model and the last state."""
    model, s = gpt()
    opts = two(model)
    hook = gaugefix.GaugeFixing(opts, model, s, 20.0, every=every, balance_at_start=True)
    for j, (k, i) in enumerate(events(steps, order)):
        if j == save_at:
            saved = json.loads(json.dumps(hook.state_dict()))
            weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
            moments = [opt.state_dict() for opt in opts]
            hook.remove()
            model, _ = gpt()
            model.load_state_dict(weights)
            opts = two(model)
            hook = gaugefix.GaugeFixing(opts, model, s, 20.0, every=every, balance_at_start=False)
            if late:
                hook.load_state_dict(saved)
            for opt, moment in zip(opts, moments, strict=True):
                opt.load_state_dict(moment)
            if not late:
                hook.load_state_dict(saved)
        event(model, opts, k, i)
        if each:
            hook.state_dict()
    return model, hook.state_dict()


@pytest.mark.parametrize(
    ("every", "order", "late"),
    [(1, (0, 1), False), (3, (0, 1), False), (1, GAN, False), (3, GAN, False), (3, GAN, True)],
)
def test_a_resumed_run_goes_on_as_the_uninterrupted_one_at_every_point(every, order, late):
    """Saved after each optimizer step of four training steps (a GAN's G, D, D included) and
    resumed (the optimizers' states loaded before or after the hook's): the parameters and the
    final state are those of the uninterrupted run."""
    steps = 4
    reference, state = run(order, steps, every, None)
    assert state["steps"] > 0
    for save_at in range(1, steps * len(order)):
        model, resumed = run(order, steps, every, save_at, late=late)
        assert_models_close(model, reference, 1e-12)
        assert resumed == state


def test_state_dict_at_every_step_changes_nothing():
    """Calling ``state_dict`` after every optimizer step leaves the run bit-identical."""
    reference, state = run(GAN, 4, 3, None)
    model, each = run(GAN, 4, 3, None, each=True)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert each == state


def test_one_optimizers_state_has_the_keys_it_had():
    """One optimizer: the state holds the four keys of before (no ``groups``, ``params`` or
    ``open``), mid-interval too."""
    model, s = gpt()
    opt = O.SGD(model.parameters(), lr=LR_A)
    hook = hooked(opt, model, s, every=3)
    event(model, [opt], 0, 0)
    state = hook.state_dict()
    assert set(state) == {"steps", "skipped", "since", "lr_sums"}
    assert state == {"steps": 0, "skipped": 0, "since": 1, "lr_sums": [LR_A]}


def mid_interval() -> tuple[dict, torch.nn.Module, gaugefix.GaugeStructure, list]:
    """A state saved over ``two`` between G's and D's steps, one training step in."""
    model, s = gpt()
    opts = two(model)
    hook = hooked(opts, model, s, every=3)
    for k, i in [(0, 0), (1, 0), (0, 1)]:
        event(model, opts, k, i)
    state = json.loads(json.dumps(hook.state_dict()))
    hook.remove()
    return state, model, s, opts


def test_a_state_of_the_previous_version_loads_and_goes_on():
    """Without ``params`` and ``open_ok`` (as the previous version wrote it): it loads, and the
    sums go on from it."""
    state, model, s, opts = mid_interval()
    assert state["open"] and len(state["params"]) == 2
    del state["params"]
    state.pop("open_ok", None)
    hook = hooked(opts, model, s, every=3)
    hook.load_state_dict(state)
    event(model, opts, 1, 1)
    assert hook.state_dict()["lr_sums"] == [2 * LR_A, 2 * LR_B]


class Wrapper(torch.nn.Module):
    """A module holding another (its parameters under ``inner.``): a rename, not a wrapper
    that ``unwrap_model`` looks through."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_model_wrapped_after_saving_loads_and_one_renamed_is_refused():
    """The model wrapped in ``DataParallel`` (``module.``) or as ``torch.compile`` does
    (``_orig_mod.``) after saving: the names are those of the model inside, and it loads; the
    parameters renamed (held one level down): refused in one line, nothing changed."""
    state, model, s, opts = mid_interval()
    compiled = torch.nn.Module()
    compiled._orig_mod = model
    for wrapped in (torch.nn.DataParallel(model), compiled):
        hook = hooked(opts, wrapped, s, every=3)
        hook.load_state_dict(state)
        assert hook.state_dict()["params"] == state["params"]
        hook.remove()
    hook = hooked(opts, model, s, every=3)
    hook.model = Wrapper(model)  # the names the state records differ from the model's now
    before = hook.state_dict()
    with pytest.raises(ValueError, match="does not fit optimizer 0.*parameters renamed") as err:
        hook.load_state_dict(state)
    assert "\n" not in str(err.value) and hook.state_dict() == before


def test_a_state_with_params_over_one_optimizer_is_checked():
    """A state over one optimizer given ``params`` (one optimizer's names): the names it
    gives are checked; others are refused."""
    model, s = gpt()
    opt = O.SGD(model.parameters(), lr=LR_A)
    hook = hooked(opt, model, s, every=3)
    event(model, [opt], 0, 0)
    state = hook.state_dict()
    names = [[[n for n, _ in model.named_parameters()]]]
    hook.load_state_dict({**state, "params": names})
    with pytest.raises(ValueError, match="does not fit optimizer 0"):
        hook.load_state_dict({**state, "params": [[names[0][0][::-1]]]})
    assert hook.state_dict() == state


def test_a_group_added_after_loading_sums_from_its_first_step():
    """``add_param_group`` on ``a`` after the state loaded (the group holding a parameter
    moved out of ``b``'s) while ``a``'s step waits for ``b``'s: the old groups keep their
    sums, the new one, which did not take ``a``'s step, sums nothing yet."""
    state, model, s, opts = mid_interval()
    hook = hooked(opts, model, s, every=3)
    hook.load_state_dict(state)
    moved = opts[1].param_groups[0]["params"].pop()
    opts[0].add_param_group({"params": [moved], "lr": LR_EMPTY})
    event(model, opts, 1, 1)
    assert hook.state_dict()["lr_sums"] == [2 * LR_A, 0.0, 2 * LR_B]


def test_a_scheduler_changing_lr_mid_interval_and_a_zero_lr_group_are_summed():
    """``b``'s learning rate halved by a scheduler after each of its steps and a group of
    ``a`` at ``lr=0`` added after a load: each sum is its group's learning rates at its steps."""
    model, s = gpt()
    opts = two(model, empty=1)
    opts[0].param_groups[1]["lr"] = 0.0
    schedule = O.lr_scheduler.StepLR(opts[1], step_size=1, gamma=0.5)
    hook = hooked(opts, model, s, every=4)
    for i in range(3):
        event(model, opts, 0, i)
        event(model, opts, 1, i)
        schedule.step()
    a_sum, b_sum = 0.0, 0.0
    for k in range(3):  # in the order the steps summed them
        a_sum, b_sum = a_sum + LR_A, b_sum + LR_B * 0.5**k
    assert hook.state_dict()["lr_sums"] == [a_sum, 0.0, b_sum]


def single(model: torch.nn.Module) -> O.Optimizer:
    """SGD with momentum over every parameter but the position embedding, which is frozen
    (``requires_grad=False``): its generators are left out."""
    model.get_parameter(next(n for n, _ in model.named_parameters() if "wpe" in n)).requires_grad_(
        False
    )
    return O.SGD([p for p in model.parameters() if p.requires_grad], lr=LR_A, momentum=MOMENTUM)


def run_single(mode: str, every: int, steps: int, save_at: int | None) -> tuple:
    """One optimizer (``single``) in ``mode`` over ``steps`` steps, saved and resumed from
    fresh objects before step ``save_at``: the model and the last state."""
    model, s = gpt()
    opt = single(model)
    hook = gaugefix.GaugeFixing(opt, model, s, 20.0, mode=mode, every=every)
    for i in range(steps):
        if i == save_at:
            saved = json.loads(json.dumps(hook.state_dict()))
            weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
            moment = opt.state_dict()
            hook.remove()
            model, _ = gpt()
            model.load_state_dict(weights)
            opt = single(model)
            opt.load_state_dict(moment)
            hook = gaugefix.GaugeFixing(
                opt, model, s, 20.0, mode=mode, every=every, balance_at_start=False
            )
            hook.load_state_dict(saved)
        event(model, [opt], 0, i)
    return model, hook.state_dict()


@pytest.mark.parametrize(("mode", "every"), [("exact", 1), ("exact", 3), ("penalty", 1)])
def test_one_optimizer_with_a_frozen_parameter_resumes_as_uninterrupted(mode, every):
    """Exact mode (every 1 and 3) and penalty mode, one optimizer, a frozen parameter: resumed
    at every step, the parameters and the state are those of the uninterrupted run."""
    steps = 4
    reference, state = run_single(mode, every, steps, None)
    assert state["steps"] > 0
    for save_at in range(1, steps):
        model, resumed = run_single(mode, every, steps, save_at)
        assert_models_close(model, reference, 1e-12)
        assert resumed == state
