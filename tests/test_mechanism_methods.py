"""The methods that test the mechanism of continuous gauge fixing, each against its definition
computed by hand with the library's public pieces (float64): exact-first, balance-after-step-1,
per-layer-lr and min-sharpness-init; and each trained in a group as alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix.experiments import engine, min_sharpness
from gaugefix.experiments.engine import (
    MECHANISM_METHODS,
    MOMENTUM,
    Method,
    RunConfig,
    init_direction,
    per_layer_lr_multipliers,
    task_hash,
    train_group,
)
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.tasks import load_task
from gaugefix.kernels import rescale_
from gaugefix.step import state_targets

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
STEPS, LR, S = 12, 0.05, 1.0
FEW_ITERATIONS = 5


def _engine_curve(method: str, optimizer: str, strength: float = 0.0) -> list[tuple]:
    """The engine's (loss, RMS log-ratio) at every step of one float64 teacher-student run."""
    task = load_task("teacher-student")
    config = RunConfig("teacher-student", method, optimizer, LR, strength, S, 0, 0, STEPS,
                       "float64", task_hash=task_hash(task))  # fmt: skip
    (result,) = train_group(task, [config], record_every=1)
    return [(p.loss, p.log_ratio_rms) for p in result.curves]


def _by_hand(optimizer_of, before_first=None, after_first=None) -> list[tuple]:
    """The same run by hand: the seed's model moved by ``s z``, ``before_first(model,
    structure)`` at step 0, a torch.optim optimizer, ``after_first(model, structure, opt)``
    after the first step."""
    task = load_task("teacher-student")
    torch.manual_seed(0)
    model = task.make_model().to(DTYPE)
    x, y, _, _ = task.arrays(DTYPE)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.apply_gauge_(model, structure, S * init_direction(structure))
    if before_first is not None:
        before_first(model, structure)
    opt = optimizer_of(model, structure)
    curve = []
    for step in range(STEPS + 1):
        loss = task.loss(model(x), y)
        curve.append(
            (float(loss.detach()), gaugefix.imbalance_stats(model, structure)["log_ratio_rms"])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0 and after_first is not None:
            after_first(model, structure, opt)
    return curve


def _assert_equal(ours: list[tuple], theirs: list[tuple], floor: float = 0.0) -> None:
    assert len(ours) == len(theirs) == STEPS + 1
    for (loss, ratio), (ref_loss, ref_ratio) in zip(ours, theirs, strict=True):
        assert abs(loss - ref_loss) <= 1e-10 * ref_loss
        assert abs(ratio - ref_ratio) <= 1e-10 * ref_ratio + floor


def test_exact_first_takes_the_orbit_step_before_the_first_update():
    """exact-first: relax_ at the rate of one step (lr * strength) before anything, then
    GaugeFixing's exact step after every optimizer step; exact itself starts as given."""
    strength = 4.0

    def hooked(model, structure):
        opt = torch.optim.SGD(model.parameters(), LR)
        gaugefix.GaugeFixing(opt, model, structure, strength, mode="exact", every=1,
                             balance_at_start=False)  # fmt: skip
        return opt

    first = _engine_curve("exact-first", "gd", strength)
    _assert_equal(
        first, _by_hand(hooked, before_first=lambda m, st: gaugefix.relax_(m, st, LR * strength))
    )
    exact = _engine_curve("exact", "gd", strength)
    _assert_equal(exact, _by_hand(hooked))
    assert first[0][0] == pytest.approx(exact[0][0], rel=1e-12)  # the same function at step 0
    assert first[0][1] < 0.99 * exact[0][1]  # ... already relaxed by one orbit step


def test_balance_after_step_1_is_balance_after_the_first_step_then_plain():
    """With momentum: the buffers are transported by the one balancing, and nothing after."""

    def sgd(model, structure):
        return torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM)

    ours = _engine_curve("balance-after-step-1", "momentum")
    balanced = lambda m, st, opt: gaugefix.balance_(m, st, optimizer=opt)  # noqa: E731
    _assert_equal(ours, _by_hand(sgd, after_first=balanced), floor=1e-15)
    assert ours[1][1] <= 1e-10 < ours[-1][1]  # balanced after step 1, drifting after


def _two_layer() -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    return model, gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))


def test_per_layer_lr_multipliers_equal_the_hand_derivation():
    """Two layers: hidden unit j is balanced by h_j = log(out_j / in_j) / 2 (in_j, out_j: the
    norms of its incoming row with its bias and of its outgoing column), so d^-2 is in_j / out_j
    on the first layer and out_j / in_j on the second: c_T is their mean, 1 on the last bias
    and for a run not selected."""
    model, structure = _two_layer()
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    ins = (w1.square().sum(1) + b1.square()).sqrt().detach()
    outs = w2.square().sum(0).sqrt().detach()
    stack = {n: torch.stack([p.detach(), 2 * p.detach()]) for n, p in model.named_parameters()}
    got = per_layer_lr_multipliers(structure, stack, torch.tensor([True, False]))
    hand = {"0.weight": (ins / outs).mean(), "0.bias": (ins / outs).mean(),
            "2.weight": (outs / ins).mean(), "2.bias": torch.tensor(1.0, dtype=DTYPE)}  # fmt: skip
    for name, value in hand.items():
        assert abs(float(got[name][0]) - float(value)) <= 1e-12 * float(value), name
        assert float(got[name][1]) == 1.0


def test_gd_from_the_balanced_point_is_gd_preconditioned_by_d_minus_2():
    """The derivation behind per-layer-lr: one GD step from the balanced point D theta, mapped
    back by D^-1, is theta - lr D^-2 grad L(theta)."""
    model, structure = _two_layer()
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.randn(8, 2, dtype=DTYPE)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = torch.autograd.grad((model(x) - y).square().mean(), list(model.parameters()))
    h = gaugefix.balance_(model, structure).h
    d_sq = {n: torch.ones_like(p) for n, p in theta.items()}  # D^-2, entry by entry
    rescale_(state_targets(d_sq, None), structure, -2 * h)
    lr = 0.1
    (model(x) - y).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    gaugefix.apply_gauge_(model, structure, -h)  # back to the original coordinates
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        expected = theta[name] - lr * d_sq[name] * g
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-13), name


def test_per_layer_lr_runs_are_sgd_with_one_learning_rate_per_tensor():
    """The engine's per-layer-lr under momentum: torch.optim.SGD with a parameter group per
    tensor at lr * c_T, c_T from the initialisation (no gauge move)."""

    def grouped(model, structure):
        stack = {n: p.detach()[None] for n, p in model.named_parameters()}
        c = per_layer_lr_multipliers(structure, stack, torch.tensor([True]))
        groups = [{"params": [p], "lr": LR * float(c[n][0])} for n, p in model.named_parameters()]
        assert len({g["lr"] for g in groups}) > 2  # the multipliers differ
        return torch.optim.SGD(groups, LR, momentum=MOMENTUM)

    _assert_equal(_engine_curve("per-layer-lr", "momentum"), _by_hand(grouped))


@pytest.fixture
def few_iterations(monkeypatch):
    """min-sharpness-init's L-BFGS cut to a few iterations (for time), its results computed
    afresh and not kept beyond the test."""
    monkeypatch.setattr(engine, "MIN_SHARPNESS_ITERATIONS", FEW_ITERATIONS)
    monkeypatch.setattr(engine, "_SHARPNESS_STARTS", {})


def test_min_sharpness_init_lowers_lambda_max_and_keeps_the_function(few_iterations):
    spec = TaskSpec("teacher-student")
    r = min_sharpness.record(spec.load(), spec.hash(), 0)
    assert r["iterations"] <= FEW_ITERATIONS
    assert r["found"] < r["balanced"] and r["found"] < r["given"]
    assert r["function_change"] <= 1e-10
    # the engine's runs start there from every s: the same function, the same trajectory
    task = spec.load()
    configs = [RunConfig("teacher-student", "min-sharpness-init", "gd", LR, 0.0, s, 0, 0, 5,
                         "float64", task_hash=spec.hash()) for s in (0.0, 2.0)]  # fmt: skip
    plain = RunConfig("teacher-student", "plain", "gd", LR, 0.0, 0.0, 0, 0, 5, "float64",
                      task_hash=spec.hash())  # fmt: skip
    at_0, at_2, given = train_group(task, [*configs, plain], record_every=1)
    assert abs(at_0.initial_loss - given.initial_loss) <= 1e-12 * given.initial_loss
    for a, b in zip(at_0.curves, at_2.curves, strict=True):
        assert abs(a.loss - b.loss) <= 1e-10 * b.loss
        assert abs(a.log_ratio_rms - b.log_ratio_rms) <= 1e-9 * b.log_ratio_rms


def test_the_mechanism_methods_trained_in_a_group_equal_each_alone(few_iterations):
    task = load_task("teacher-student")
    methods = {**dict.fromkeys(MECHANISM_METHODS, 0.0), "exact-first": 1.0, "exact": 1.0,
               "balance": 0.0}  # fmt: skip
    configs = [RunConfig("teacher-student", m, "momentum", LR, st, S, 0, 0, STEPS, "float64",
                         task_hash=task_hash(task)) for m, st in methods.items()]  # fmt: skip
    together = train_group(task, configs)
    for c, both in zip(configs, together, strict=True):
        (alone,) = train_group(task, [c])
        assert abs(both.final_loss - alone.final_loss) <= 1e-12 * alone.final_loss, c.method
        assert abs(both.log_ratio_rms - alone.log_ratio_rms) <= (
            1e-12 * alone.log_ratio_rms + 1e-15
        ), c.method
    assert len({round(r.final_loss, 8) for r in together}) == len(configs)


def test_per_layer_lr_is_refused_under_adam_and_a_start_needs_its_fixing():
    task = load_task("teacher-student")
    config = RunConfig("teacher-student", "per-layer-lr", "adam", LR, 0.0, S, 0, 0, 2,
                       task_hash=task_hash(task))  # fmt: skip
    with pytest.raises(ValueError, match="per-layer-lr is defined for gd, sgd, momentum"):
        train_group(task, [config])
    with pytest.raises(ValueError, match="fixing 'exact'"):
        Method(False, None, "x", start="orbit-step")
    with pytest.raises(ValueError, match="hard fixing"):
        Method(False, "exact", "x", until=1)
