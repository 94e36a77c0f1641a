"""The mechanism analyses: the decoupled penalty's step is vertical (the in-Adam penalty's is
not), the horizontal component on a known case, the dose-response's relaxation time where the
linear prediction is exact, sharpness tracking against ``gaugefix.sharpness``, and the shared
curve rule (float64 throughout)."""

from __future__ import annotations

import copy

import pytest
import torch

import gaugefix
from gaugefix import step
from gaugefix.experiments import adam_split, dose, sharpness_track
from gaugefix.experiments.engine import RunConfig, init_direction, task_hash, train_group
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.tasks import load_task
from gaugefix.soft import orbit_selection_grad
from test_step import ARCHS, data, loss_of

DTYPE = torch.float64


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _output_change(model, x, direction: dict, eps: float) -> float:
    """``||f(theta + eps v) - f(theta)||`` (the model left as it was)."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(eps * direction[n])
        return float((moved(x) - model(x)).norm())


def _grads(model, x, y) -> dict[str, torch.Tensor]:
    """The loss gradient by parameter name."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_of(model, x, y), list(params.values()))
    return dict(zip(params, grads, strict=True))


def _vertical_step(model, structure) -> dict[str, torch.Tensor]:
    """What :func:`step.decoupled_penalty` adds to a zero update at lr 1, strength 1."""
    params = _params(model)
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    added, _ = step.decoupled_penalty(structure, lr=1.0, strength=1.0).update(
        zeros, step.EmptyState(), params
    )
    return added


def _adam_difference(model, structure, x, y) -> dict[str, torch.Tensor]:
    """Adam's update with the penalty's gradient (strength 1) added to the loss gradient minus
    Adam's update without it, after three plain Adam steps (so the state is not trivial)."""
    params = dict(model.named_parameters())
    adam = step.adam(0.01)
    state = adam.init(_params(model))
    for _ in range(4):
        grads = _grads(model, x, y)
        plain_state = copy.deepcopy(state)
        plain, _ = adam.update({n: g.clone() for n, g in grads.items()}, plain_state, params)
        penalised = step.penalty(structure, strength=1.0).update(grads, step.EmptyState(), params)
        with_penalty, state = adam.update(penalised[0], state, params)
    return {n: with_penalty[n] - plain[n] for n in params}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_decoupled_step_is_vertical_and_the_in_adam_penalty_is_not(arch):
    """The decoupled penalty's step lies in the span of the generators (its horizontal
    projection vanishes to 1e-12) and changes the outputs at second order (halving the step
    quarters the change); what the penalty adds to Adam's update has a horizontal part and
    changes the outputs at first order (halving the step halves the change)."""
    build, shape = ARCHS[arch]
    model = build(0)
    x, y = data(shape)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.apply_gauge_(model, structure, 0.5 * init_direction(structure))
    vertical = _vertical_step(model, structure)
    horizontal = gaugefix.project(vertical, model, structure, onto="horizontal")
    size = torch.cat([v.flatten() for v in vertical.values()]).norm()
    assert size > 0
    assert torch.cat([h.flatten() for h in horizontal.values()]).norm() <= 1e-12 * size
    eps = 1e-4 / float(size)
    ratio = _output_change(model, x, vertical, eps) / _output_change(model, x, vertical, eps / 2)
    assert abs(ratio - 4.0) < 0.05
    added = _adam_difference(model, structure, x, y)
    part = gaugefix.project(added, model, structure, onto="horizontal")
    assert torch.cat([h.flatten() for h in part.values()]).norm() > 1e-3 * _size(added)
    eps = 1e-4 / _size(added)
    ratio = _output_change(model, x, added, eps) / _output_change(model, x, added, eps / 2)
    assert abs(ratio - 2.0) < 0.05


def _size(vectors: dict) -> float:
    return float(torch.cat([v.flatten() for v in vectors.values()]).norm())


def test_the_horizontal_fraction_of_a_known_update():
    """The loss gradient is horizontal (the loss is invariant along the orbit) and the decoupled
    step vertical, so with ``u_plain = g`` and ``u = g + 0.3 g + 5 v`` the horizontal fraction
    is 0.3, and 0 for ``u = g + v``; the model is left at its parameters."""
    build, shape = ARCHS["mlp"]
    model = build(0)
    x, y = data(shape)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.apply_gauge_(model, structure, 0.5 * init_direction(structure))
    at = {n: p.unsqueeze(0) for n, p in _params(model).items()}
    g = _grads(model, x, y)
    v = _vertical_step(model, structure)
    plain = {n: g[n].unsqueeze(0) for n in g}
    u = {n: (1.3 * g[n] + 5 * v[n]).unsqueeze(0) for n in g}
    assert abs(adam_split.horizontal_fraction(model, structure, at, u, plain) - 0.3) < 1e-10
    u = {n: (g[n] + v[n]).unsqueeze(0) for n in g}
    assert adam_split.horizontal_fraction(model, structure, at, u, plain) < 1e-12
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), at[n][0])


def test_an_engine_decoupled_penalty_run_is_adam_then_the_vertical_step():
    """A sweep run of ``decoupled-penalty`` follows ``torch.optim.Adam`` on the loss alone with
    ``-lr * strength * grad P`` added to each step, on that run alone (float64, 1e-10)."""
    task = load_task("teacher-student")
    lr, strength, s, steps = 0.01, 3.0, 1.0, 8
    config = RunConfig("teacher-student", "decoupled-penalty", "adam", lr, strength, s, 0, 0,
                       steps, "float64", task_hash=task_hash(task))  # fmt: skip
    (result,) = train_group(task, [config])
    model, structure = float64_model(task)
    gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
    x, y, _, _ = task.arrays(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        vertical = orbit_selection_grad(model, structure, strength)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(lr * vertical.get(n, torch.zeros_like(p)))
    final = float(task.loss(model(x), y).detach())
    assert abs(result.final_loss - final) <= 1e-10 * final
    stats = gaugefix.imbalance_stats(model, structure)
    assert abs(result.log_ratio_rms - stats["log_ratio_rms"]) <= 1e-10 * stats["log_ratio_rms"]


def test_the_relaxation_time_is_the_measured_one_where_the_linear_prediction_is_exact():
    """Near the balanced point (``mu`` of order 1e-8) the exact orbit step relaxes ``mu`` as
    ``(I - 2 lr strength K) mu``; started along the slowest mode of ``K``, ``||mu||`` falls by
    ``1 - 1 / tau_relax`` per step, ``tau_relax`` from :func:`dose.slowest_rate` (1e-5)."""
    model, structure = float64_model(load_task("teacher-student"))
    gaugefix.balance_(model, structure)
    pred = gaugefix.relaxation_rates(model, structure, 1.0)
    slowest = pred.modes[:, pred.rates.argmin()]
    gaugefix.apply_gauge_(model, structure, 1e-8 * slowest / float(pred.rates.min()))
    lr, strength = 0.01, 2.0
    tau = dose.tau_relax(lr, strength, dose.slowest_rate(model, structure))
    params = dict(model.named_parameters())
    orbit = step.exact(step.applied(step.sgd(0.0)), structure, lr=lr, strength=strength, every=1)
    state = orbit.init(params)
    mu0 = float(gaugefix.imbalance(model, structure).norm())
    steps = 5
    for _ in range(steps):
        zeros = {n: torch.zeros_like(p) for n, p in params.items()}
        params, state = orbit.update(zeros, state, params)
    measured = float(gaugefix.imbalance(model, structure).norm()) / mu0
    assert tau > 1.0
    assert abs(measured - (1 - 1 / tau) ** steps) <= 1e-5 * measured


def test_sharpness_tracking_matches_gaugefix_sharpness():
    """:func:`sharpness_track.tracked` of plain and of balanced-init equals
    ``gaugefix.sharpness`` of the same network trained by ``torch.optim.SGD`` (1e-9)."""
    task = load_task("teacher-student")
    x, y, _, _ = task.arrays(DTYPE)
    lr, s = 0.05, 1.0
    for method in ("plain", "balanced-init"):
        curve = sharpness_track.tracked(task, method, 0.0, lr, s, 4, 2)
        model, structure = float64_model(task)
        gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
        if method == "balanced-init":
            gaugefix.balance_(model, structure)
        opt = torch.optim.SGD(model.parameters(), lr)
        expected = []
        for t in range(5):
            loss = task.loss(model(x), y)
            if t % 2 == 0:
                expected.append((t, loss.item(), float(gaugefix.sharpness(model, task.loss, x, y))))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert [p[0] for p in curve] == [0, 2, 4]
        for (_, loss, value), (_, ref_loss, ref) in zip(curve, expected, strict=True):
            assert abs(loss - ref_loss) <= 1e-12 * ref_loss
            assert abs(value - ref) <= 1e-9 * ref


def test_one_curve_is_shared_when_pooling_keeps_the_ranking():
    """Both methods on one decreasing curve: shared; the same shapes offset by a factor 100 in
    x (two curves): the pooled ranking breaks and the rule says so."""
    x = [0.1, 0.3, 1.0, 3.0, 10.0, 0.2, 0.5, 2.0, 5.0, 20.0]
    y = [1 / (1 + v) for v in x]
    methods = ["penalty"] * 5 + ["exact"] * 5
    rho, shared = dose.shared_curve(x, y, methods)
    assert shared is True and rho["pooled"] == pytest.approx(-1.0)
    offset = [v * (100 if m == "exact" else 1) for v, m in zip(x, methods, strict=True)]
    rho, shared = dose.shared_curve(offset, y, methods)
    assert shared is False and rho["penalty"] == rho["exact"] == pytest.approx(-1.0)
    assert dose.shared_curve(x[:2], y[:2], methods[:2])[1] is None


def _held(value: bool | None) -> dict:
    return {"min": 1.2, "median": 1.2, "max": 1.2, "seeds": 3, "unknown_seeds": 0,
            "lower_bound": False, "interval": [1.1, 1.3], "held": value}  # fmt: skip


def test_the_report_says_when_only_the_in_adam_penalty_helps():
    """The Adam section names the case where the penalty inside Adam held against a reference
    and the decoupled penalty did not (every verdict of it known), and only that case."""
    only = {"penalty/plain": {"0.0": _held(True)}, "decoupled-penalty/plain": {"0.0": _held(False)}}
    assert "**Only the in-Adam penalty helps**" in adam_split._sweep_text("ts", only)
    both = {**only, "decoupled-penalty/balanced-init": {"0.0": _held(True)}}
    assert "Only the in-Adam" not in adam_split._sweep_text("ts", both)
    unknown = {**only, "decoupled-penalty/plain": {"0.0": _held(None)}}
    assert "could not be measured everywhere" in adam_split._sweep_text("ts", unknown)
    neither = {
        "penalty/plain": {"0.0": _held(False)},
        "decoupled-penalty/plain": {"0.0": _held(False)},
    }
    assert "Neither" in adam_split._sweep_text("ts", neither)


def _sweep_of(pen: list[bool | None], dec: list[bool | None]) -> dict:
    """A sweep with the given verdicts of each penalty against plain, one per s."""
    sweep = {"penalty/plain": pen, "decoupled-penalty/plain": dec}
    return {
        pair: {f"{s:.1f}": _held(v) for s, v in enumerate(vs)} for pair, vs in sweep.items() if vs
    }


NONE_HELD = "Neither the in-Adam nor the decoupled penalty held against a reference"


@pytest.mark.parametrize(
    ("pen", "dec", "verdict"),
    [
        ([False, False], [False], NONE_HELD),
        (
            [None, None],
            [None],
            "Whether the in-Adam or the decoupled penalty held against a reference could not be "
            "measured",
        ),
        (
            [False, None],
            [False],
            NONE_HELD + " where measured (1 of the 3 verdicts could not be measured)",
        ),
        (
            [False],
            [],
            "The in-Adam penalty did not hold against a reference; whether the decoupled one "
            "helps could not be measured",
        ),
        (
            [None],
            [False, None],
            "The decoupled penalty did not hold against a reference where measured (1 of the 2 "
            "verdicts could not be measured); whether the in-Adam one helps could not be measured",
        ),
    ],
)
def test_the_sweep_says_which_verdicts_were_not_measured_where_neither_penalty_held(
    pen, dec, verdict
):
    """Where no penalty held, the sentence says "neither held" only of measured verdicts: a
    penalty with no measured verdict is said not measured, and unmeasured verdicts are counted."""
    assert adam_split._sweep_text("ts", _sweep_of(pen, dec)).endswith(f". {verdict}.")
