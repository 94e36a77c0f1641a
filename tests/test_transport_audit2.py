"""Second audit of optimizer-state transport: a model trained by several optimizers (disjoint
halves of its parameters, each with its own state) is moved with all of them in one call, and
each one's state is the state built at the moved point; an optimizer listed twice, or an
unknown one in the list, is refused with nothing modified. State kept in another dtype than its
parameter moves by the same powers, to its own dtype's rounding. Averaged copies
(``torch.optim.swa_utils.AveragedModel``) are separate parameters: moved by the same ``h`` they
stay the average of the moved points."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import gaugefix
from test_action_audit2 import assert_close, batches, gauge, model_and_input, step
from test_kernels_audit import assert_unchanged, everything
from test_transport_audit import LATER_LR, LATER_STEPS, accumulate, assert_states_equal, set_lr

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
D = torch.float64
SPLIT = 2  # the first optimizer holds the first SPLIT parameters, the second the rest
# The rounding of state moved in a narrower dtype, in its eps: the factor (a product of a few
# term factors, each rounded) and the product with the entry each round once or twice.
ROUNDINGS = 2.0


def halves(model: nn.Module, lr: float = 0.0) -> list[O.Optimizer]:
    """SGD with momentum over the first ``SPLIT`` parameters, Adam (AMSGrad) over the rest."""
    ps = list(model.parameters())
    return [O.SGD(ps[:SPLIT], lr=lr, momentum=0.9), O.Adam(ps[SPLIT:], lr=lr, amsgrad=True)]


def step_all(model: nn.Module, opts: list[O.Optimizer], x: torch.Tensor) -> None:
    """One loss gradient, then a step of every optimizer."""
    for opt in opts:
        opt.zero_grad()
    out = model(x)
    (out.square().mean() + out.mean()).backward()
    for opt in opts:
        opt.step()


# Each function that moves a model along its orbit, called with a list of optimizers: the ``h``
# it moved by.
MOVERS = {
    "apply_gauge_": lambda model, s, opts: gaugefix.random_gauge_(model, s, 0.5, optimizer=opts),
    "balance_": lambda model, s, opts: gaugefix.balance_(model, s, optimizer=opts).h,
    "equalize_": lambda model, s, opts: gaugefix.equalize_(model, s, optimizer=opts).h,
    "relax_": lambda model, s, opts: gaugefix.relax_(model, s, 0.5, optimizer=opts),
}


@pytest.mark.parametrize("mover", list(MOVERS))
def test_several_optimizers_are_moved_together_to_the_state_at_the_moved_point(mover):
    """Two optimizers over disjoint halves, both passed: each one's state equals the state
    collected at the moved point (one optimizer alone left the other's buffers unmoved and
    had no way to move them), and ``LATER_STEPS`` steps with ``lr > 0`` stay equal."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opts = halves(model)
    for xb in batches(x)[:3]:
        step_all(model, opts, xb)
    moved = copy.deepcopy(model)
    h = MOVERS[mover](model, s, opts)
    assert float(h.abs().max()) > 0.1
    gaugefix.apply_gauge_(moved, s, h)
    fresh = halves(moved)
    for xb in batches(x)[:3]:
        step_all(moved, fresh, xb)
    pairs = list(zip(model.parameters(), moved.parameters(), strict=True))
    for opt, new, part in zip(opts, fresh, (pairs[:SPLIT], pairs[SPLIT:]), strict=True):
        assert_states_equal(opt, new, part, type(opt).__name__)
        set_lr(opt, LATER_LR)
        set_lr(new, LATER_LR)
    for xb in batches(x)[:LATER_STEPS]:
        step_all(model, opts, xb)
        step_all(moved, fresh, xb)
        for p, q in pairs:
            assert_close(p, q, q.detach().abs() + LATER_LR, mover)


def test_an_optimizer_listed_twice_is_refused_and_changes_nothing():
    """Listed twice, its state would move twice (by ``1/f^2`` instead of ``1/f``)."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = O.SGD(model.parameters(), lr=0.0, momentum=0.9)
    step(model, opt, x)
    before = everything(model, opt)
    with pytest.raises(ValueError, match="more than once") as info:
        gaugefix.apply_gauge_(model, s, gauge(s), [opt, opt])
    assert "\n" not in str(info.value)
    assert_unchanged(before, everything(model, opt))


@pytest.mark.parametrize("bad", ["adagrad", "not an optimizer"])
def test_a_list_with_an_untransportable_entry_is_refused_and_changes_nothing(bad):
    """One optimizer of the list whose state cannot move (Adagrad with an initial accumulator
    value), or an entry that is not an optimizer: refused, neither optimizer nor the model
    modified."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    ps = list(model.parameters())
    sgd = O.SGD(ps[:SPLIT], lr=0.1, momentum=0.9)
    adagrad = O.Adagrad(ps[SPLIT:], lr=0.1, initial_accumulator_value=0.1)
    other = adagrad if bad == "adagrad" else "sgd"
    step_all(model, [sgd] + ([other] if bad == "adagrad" else []), x)
    before = everything(model, sgd) + (everything(model, other) if bad == "adagrad" else [])
    error = ValueError if bad == "adagrad" else TypeError
    with pytest.raises(error, match="cannot transport|must be a torch.optim.Optimizer"):
        gaugefix.random_gauge_(model, s, 0.5, optimizer=[sgd, other])
    after = everything(model, sgd) + (everything(model, other) if bad == "adagrad" else [])
    assert_unchanged(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_in_another_dtype_than_its_parameter_moves_by_the_same_powers(dtype):
    """Adam's moments kept in ``dtype`` for float64 parameters: each moves by ``1/f`` and
    ``1/f^2`` (to ``ROUNDINGS`` of ``dtype``'s eps, the spacing of its subnormals below its
    normal range) and keeps ``dtype``; the step count stays."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = O.Adam(model.parameters(), lr=0.01, amsgrad=True)
    step(model, opt, x)
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            state[key] = state[key].to(dtype)
    start = {p: (p.detach().clone(), copy.deepcopy(opt.state[p])) for p in model.parameters()}
    gaugefix.apply_gauge_(model, s, gauge(s, scale=2.0), opt)
    powers = {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal
    for p, (p0, s0) in start.items():
        f = p.detach() / p0
        assert torch.equal(opt.state[p]["step"], s0["step"])
        for key, power in powers.items():
            want = s0[key].to(D) * f**power
            assert opt.state[p][key].dtype == dtype
            bound = ROUNDINGS * eps * (want.abs() + tiny)
            assert bool(((opt.state[p][key].to(D) - want).abs() <= bound).all()), key


def test_an_averaged_copy_moved_by_the_same_h_stays_the_average_of_the_moved_points():
    """The action is linear for a fixed ``h``: moving ``AveragedModel``'s copy by the ``h``
    that moved the model keeps it the average of the moved points (to float64 rounding), and
    its function unchanged; it is never moved by the model's move itself."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = O.SGD(model.parameters(), lr=LATER_LR, momentum=0.9)
    averaged = AveragedModel(model)
    for xb in batches(x)[:2]:
        step(model, opt, xb)
        averaged.update_parameters(model)
    plain = copy.deepcopy(averaged.module)
    y = averaged(x).detach()
    h = gauge(s)
    gaugefix.apply_gauge_(model, s, h, opt)
    for p, q in zip(averaged.module.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)  # the model's move leaves the averaged copy as it was
    gaugefix.apply_gauge_(averaged.module, s, h)
    assert_close(averaged(x), y, y.abs(), "function")
    moved_plain = copy.deepcopy(plain)
    gaugefix.apply_gauge_(moved_plain, s, h)
    accumulate(model, opt, batches(x)[2:3])
    averaged.update_parameters(model)
    n = 3.0  # points averaged
    for p, q, m in zip(
        averaged.module.parameters(), moved_plain.parameters(), model.parameters(), strict=True
    ):
        want = q.detach() * (n - 1) / n + m.detach() / n
        assert_close(p, want, want.abs(), "average")
