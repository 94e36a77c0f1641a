"""Audit of the smaller analyses (relaxation, dose, adam_split, min_sharpness, sharpness_track)
against independent derivations on tiny float64 models and hand computations on synthetic
values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import gaugefix
from gaugefix.experiments import adam_split, dose, min_sharpness, relaxation, sharpness_track
from gaugefix.experiments.engine import init_direction, min_sharpness_start, task_hash
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.tasks import Task
from gaugefix.soft import orbit_selection_grad
from gaugefix.zoo import mlp

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
_GEN = torch.Generator().manual_seed(7)
X = torch.randn(32, 3, generator=_GEN)
Y = torch.randn(32, 1, generator=_GEN)
# The displacement from the balanced point at which the linearised relaxation is tested: the
# neglected terms are O(|mu| / S) = O(NEAR) relative, rounding O(1e-16 / NEAR).
NEAR = 1e-5
LINEAR_TOL = 1e-9


def _task(widths: tuple[int, ...], near: float | None = None) -> Task:
    """A regression task on 32 points of R^3 with an MLP of ``widths``; with ``near``, the
    network starts at its balanced point moved by ``near * z`` along its orbit (float64)."""

    def make() -> torch.nn.Module:
        model = mlp(widths)
        if near is None:
            return model
        model = model.to(DTYPE)
        structure = gaugefix.discover(model, X[:2].to(DTYPE))
        gaugefix.balance_(model, structure)
        gaugefix.apply_gauge_(model, structure, near * init_direction(structure))
        return model

    return Task("tiny", "regression", X, Y, None, None, make)


def _two_layer_sums(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_n, mu_n)`` ``[hidden]`` of a two-layer ReLU MLP by hand: incoming row and bias
    against outgoing column."""
    first, second = model[0], model[2]
    s_in = first.weight.detach().square().sum(1) + first.bias.detach().square()
    s_out = second.weight.detach().square().sum(0)
    return s_in + s_out, s_in - s_out


# -- relaxation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [(3, 1, 1), (3, 4, 1)])
def test_relaxation_measures_the_predicted_rates_where_the_linearisation_is_exact(widths):
    """Near the balanced point of a two-layer network the penalty-only GD step is
    ``mu <- (I - 2 dt lambda K) mu`` up to O((|mu|/S)^2) (``K = diag(S)`` moves at second
    order), so each mode shrinks by ``1 - dt 2 lambda k_i`` per step: the measured rates equal
    the predicted ``2 lambda k_i`` and the measured norm the predicted one (before, the fitted
    ``-log(1 - dt r)/dt`` was compared with ``r``: a 0.5% error of the Euler step alone)."""
    r = relaxation.relaxation(_task(widths, NEAR), 0.5, 0)
    assert r["predicted_rates"] and r["steps"] > 5
    assert r["max_relative_error"] <= LINEAR_TOL
    assert len(r["measured_norm"]) == r["steps"] + 1
    for m, p in zip(r["measured_norm"], r["predicted_norm"], strict=True):
        assert abs(m - p) <= 0.1 * LINEAR_TOL * m


def test_relaxation_error_vanishes_at_first_order_near_balance_on_a_deep_network():
    """With hidden-to-hidden weights ``K`` moves at first order in ``mu``, so near balance the
    rate error is O(|mu|/S): ten times closer, ten times smaller (before, it stayed at the Euler
    step's 0.5%)."""
    errors = [
        relaxation.relaxation(_task((3, 4, 4, 1), near), 0.5, 0)["max_relative_error"]
        for near in (NEAR, NEAR / 10)
    ]
    assert errors[0] <= 1e-5
    assert errors[1] <= 0.2 * errors[0]


def test_relaxation_predicts_twice_lambda_s_on_a_two_layer_network():
    """On a two-layer ReLU network the generators share no entry, so ``K = diag(S_n)``: the
    predicted rates of the modes carrying 1% of ``||mu||`` are ``2 lambda S_n`` of those units
    (sums by hand)."""
    task, strength = _task((3, 6, 1)), 0.7
    r = relaxation.relaxation(task, strength, 0)
    model, _ = float64_model(task)
    s, mu = _two_layer_sums(model)
    expected = sorted((2 * strength * s[mu.abs() >= 0.01 * mu.norm()]).tolist())
    assert len(r["predicted_rates"]) == len(expected)
    for p, e in zip(sorted(r["predicted_rates"]), expected, strict=True):
        assert abs(p - e) <= 1e-12 * e


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": 0.0}, "strength"),
        ({"fall": 1.0}, "fall"),
        ({"fall": 2.0}, "fall"),
        ({"train_steps": -1}, "train_steps"),
    ],
)
def test_relaxation_refuses_what_it_cannot_measure(kwargs, message):
    """Strength 0 (nothing relaxes: a division by zero before), a fall not in ``(0, 1)`` (at
    ``fall >= 1`` one step was taken and reported as a fit) and a negative number of training
    steps raise one ``ValueError`` naming the argument."""
    args = {"strength": 1.0, "train_steps": 0, "fall": 0.9} | kwargs
    with pytest.raises(ValueError, match=message):
        relaxation.relaxation(_task((3, 2, 1)), args["strength"], args["train_steps"],
                              args["fall"])  # fmt: skip


def test_relaxation_says_when_it_stopped_at_its_step_limit(monkeypatch, tmp_path):
    """A descent stopped by the step limit before ``||mu||`` fell to ``fall`` is not reported
    as having fallen there; the last norm is kept whatever the thinning."""
    monkeypatch.setattr(relaxation, "MAX_STEPS", 3)
    r = relaxation.relaxation(_task((3, 2, 1)), 1.0, 0)
    assert r["steps"] == 3 and r["measured_norm"][-1] > 0.9 * r["measured_norm"][0]
    text = relaxation.render(tmp_path, {"tiny": r})
    assert "until ||mu|| fell to" not in text
    assert "step limit" in text
    assert relaxation._thinned(list(range(7)), 3) == [0, 3, 6]
    assert relaxation._thinned(list(range(8)), 3) == [0, 3, 6, 7]


# -- dose ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [6, 1030])
def test_dose_slowest_rate_is_the_hand_computed_one(hidden):
    """On a two-layer network ``K = diag(S_n)``: the slowest significant rate is
    ``2 min {S_n : |mu_n| >= 1% ||mu||}``, also past ``relaxation_rates``' dense limit of 1024
    generators (before, only its 6 slowest and 6 fastest modes were searched: 1.92 for 0.315)."""
    model, structure = float64_model(_task((3, hidden, 1)))
    s, mu = _two_layer_sums(model)
    expected = float(2 * s[mu.abs() >= 0.01 * mu.norm()].min())
    assert abs(dose.slowest_rate(model, structure) - expected) <= 1e-12 * expected


def _point(seed, method, strength, edge, plain_edge, rate, t_diverge):
    return {"seed": seed, "method": method, "strength": strength, "edge": edge,
            "plain_edge": plain_edge, "rate": rate, "t_diverge": t_diverge}  # fmt: skip


def test_dose_summary_is_the_hand_computed_one_in_any_order():
    """``x = 1 / (edge strength rate) / t_diverge``, ``y = edge / plain's edge``; a point
    without a stable rate, where plain did not diverge or without a plain edge is left out
    and counted; the summary does not depend on the order of the points."""
    points = [
        _point(0, "plain", 0.0, 0.1, 0.1, 2.0, None),
        _point(0, "penalty", 1.0, 0.2, 0.1, 2.0, 10),
        _point(0, "penalty", 10.0, 0.4, 0.1, 2.0, 5),
        _point(0, "penalty", 100.0, 0.8, 0.1, 2.0, 2),
        _point(0, "exact", 1.0, 0.3, 0.1, 2.0, 8),
        _point(0, "exact", 10.0, 0.5, 0.1, 2.0, 6),
        _point(0, "exact", 100.0, 0.9, 0.1, 2.0, 3),
        _point(0, "exact", 0.01, 0.0, 0.1, 2.0, None),  # no stable rate
        _point(1, "penalty", 1.0, 0.2, 0.1, 3.0, None),  # plain did not diverge
        _point(2, "exact", 1.0, 0.2, 0.0, 3.0, 7),  # plain had no stable rate
    ]
    x, y, methods = dose._xy(points)
    kept = points[1:7]
    assert methods == [p["method"] for p in kept]
    for a, b, p in zip(x, y, kept, strict=True):
        hand = 1 / (p["edge"] * p["strength"] * p["rate"]) / p["t_diverge"]
        assert abs(a - hand) <= 1e-15 * hand and b == p["edge"] / 0.1
    value = {"steps": 10, "seeds": 3, "s": 2.0, "points": points}
    summary = dose.summarize({"t": value})["t"]
    assert summary["excluded"] == 3
    for m in dose.SWEPT:
        xs = [a for a, mm in zip(x, methods, strict=True) if mm == m]
        ys = [b for b, mm in zip(y, methods, strict=True) if mm == m]
        assert summary["rho"][m] == pytest.approx(_spearman(xs, ys), abs=1e-12)
    assert summary["rho"]["pooled"] == pytest.approx(_spearman(x, y), abs=1e-12)
    shuffled = {"t": {**value, "points": points[::-1]}}
    assert dose.summarize(shuffled) == dose.summarize({"t": value})


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho of distinct values by hand: Pearson's of the ranks."""
    rx = torch.tensor(x).argsort().argsort().to(DTYPE)
    ry = torch.tensor(y).argsort().argsort().to(DTYPE)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


# -- adam_split ---------------------------------------------------------------------------------


def test_adam_split_decay_rate_by_hand():
    """``-log(r_k / r_0) / k`` over the first ``k`` steps (fewer where the run ended sooner);
    ``None`` for a run that took no step, and where the RMS log-ratio reached 0 (an exactly
    balanced network: ``log 0`` raised before) or started there."""
    assert adam_split.decay_rate({"log_ratio": [2.0, 1.0, 0.5]}, 2) == pytest.approx(math.log(2))
    assert adam_split.decay_rate({"log_ratio": [2.0, 1.0, 0.5]}, 5) == pytest.approx(math.log(2))
    assert adam_split.decay_rate({"log_ratio": [2.0, 1.0, 0.5]}, 1) == pytest.approx(math.log(2))
    assert adam_split.decay_rate({"log_ratio": [2.0]}, 3) is None
    assert adam_split.decay_rate({"log_ratio": [2.0, 0.0]}, 1) is None
    assert adam_split.decay_rate({"log_ratio": [0.0, 0.0]}, 1) is None


def _linear_decays(base: float, slopes: dict[str, float]):
    """A stand-in for :func:`adam_split.trajectory` whose RMS log-ratio decays at exactly
    ``base + slopes[method] * strength`` per step."""

    def trajectory(task, method, strength, lr, steps, measure=True):
        rate = base + slopes[method] * strength
        return {"log_ratio": [math.exp(-rate * t) for t in range(steps)]}

    return trajectory


@pytest.mark.parametrize("base", [0.01, -0.05])
def test_adam_split_matching_lands_on_the_strength_of_a_linear_decay(monkeypatch, base):
    """Where the decay is linear in the strength the secant through plain's decay and the
    pilot's gives the strength whose decay is the penalty's at once, ``(target - base) / slope``;
    also where that target decay is exactly 0 (before, a target of 0 returned the pilot)."""
    slopes = {"plain": 0.0, "penalty": 0.5, "decoupled-penalty": 0.02, "exact": 0.1}
    monkeypatch.setattr(adam_split, "trajectory", _linear_decays(base, slopes))
    got = adam_split.matched_strengths(_task((3, 4, 1)), 1e-3, 10)
    target = base + slopes["penalty"] * adam_split.PENALTY_STRENGTH
    assert got["penalty"] == adam_split.PENALTY_STRENGTH
    for m in ("decoupled-penalty", "exact"):
        expected = (target - base) / slopes[m]
        assert abs(got[m] - expected) <= 1e-9 * expected


def test_adam_split_summary_is_the_hand_computed_one():
    """Per fixing: the mean of the horizontal fractions measured (``None`` left out), the mean
    of ``|u| / |u_plain|`` over its steps, and ``sqrt(v)`` over plain's at the last step both
    reached (the shorter run's)."""
    plain = {"sqrt_v": [1.0, 2.0, 4.0, 8.0], "step": [1.0] * 4, "plain_step": [1.0] * 4,
             "horizontal": [0.0] * 4, "log_ratio": [1.0] * 4}  # fmt: skip
    curves = {"plain": plain}
    curves["penalty"] = {**plain, "sqrt_v": [1.0, 3.0], "step": [2.0, 3.0],
                         "plain_step": [1.0, 2.0], "horizontal": [0.1, None]}  # fmt: skip
    curves["decoupled-penalty"] = {**plain, "sqrt_v": [2.0, 2.0, 2.0, 2.0, 2.0],
                                   "horizontal": [None, None]}  # fmt: skip
    curves["exact"] = {**plain, "sqrt_v": [], "step": [], "plain_step": []}
    value = {"lr": 0.01, "strength": {}, "decay_rate": {}, "curves": curves, "sweep": {}}
    e = adam_split.summarize({"t": value})["t"]
    assert e["horizontal"] == {"penalty": 0.1, "decoupled-penalty": None, "exact": 0.0}
    assert e["step_inflation"]["penalty"] == pytest.approx((2.0 + 1.5) / 2)
    assert e["step_inflation"]["exact"] is None
    assert e["v_inflation"] == {"penalty": 1.5, "decoupled-penalty": 0.25, "exact": None}


def _adam_update(g, m, v, t, lr):
    """``torch.optim.Adam``'s update (defaults) from moments ``m``, ``v`` before step ``t``."""
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return -lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)


def test_adam_split_trajectory_of_the_penalty_against_torch_adam():
    """The in-Adam penalty's trajectory against ``torch.optim.Adam`` on ``L + P`` by hand: the
    loss, the RMS log-ratio before each step, ``|u| / lr``, ``|u_plain| / lr`` (Adam's update
    of the loss gradient alone from the same moments) and the mean ``sqrt(v)`` (1e-10)."""
    task, strength, lr, steps = _task((3, 4, 1)), 0.3, 0.01, 4
    curve = adam_split.trajectory(task, "penalty", strength, lr, steps, measure=False)
    model, structure = float64_model(task)
    gaugefix.apply_gauge_(model, structure, adam_split.S * init_direction(structure))
    x, y, _, _ = task.arrays(DTYPE)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr)
    for t in range(steps):
        loss = task.loss(model(x), y)
        stats = gaugefix.imbalance_stats(model, structure)
        opt.zero_grad()
        loss.backward()
        plain = {n: p.grad.clone() for n, p in params.items()}
        for n, g in orbit_selection_grad(model, structure, strength).items():
            params[n].grad.add_(g)
        moments = {n: opt.state.get(p, {}) for n, p in params.items()}
        u_plain = [
            _adam_update(plain[n], s.get("exp_avg", 0.0), s.get("exp_avg_sq", 0.0), t + 1, lr)
            for n, s in moments.items()
        ]
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        u = torch.cat([(p.detach() - before[n]).flatten() for n, p in params.items()])
        sqrt_v = torch.cat([opt.state[p]["exp_avg_sq"].sqrt().flatten() for p in params.values()])
        want = {"loss": loss.item(), "log_ratio": stats["log_ratio_rms"], "step": u.norm() / lr,
                "plain_step": torch.cat([v.flatten() for v in u_plain]).norm() / lr,
                "sqrt_v": sqrt_v.mean()}  # fmt: skip
        for key, value in want.items():
            assert abs(curve[key][t] - float(value)) <= 1e-10 * abs(float(value)), key
    assert curve["horizontal"] == []


# -- sharpness_track ----------------------------------------------------------------------------


def moved_start(task: Task, method: str, s: float, seed: int = 0):
    """The float64 network of ``seed`` moved by ``s z``, balanced for a balanced start, and
    its structure: where the sweep starts ``method``."""
    model, structure = float64_model(task, seed)
    gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
    if method == "balanced-init":
        gaugefix.balance_(model, structure)
    return model, structure


def _dense_top(task: Task, model: torch.nn.Module) -> float:
    """The largest eigenvalue of the dense Hessian of the training loss (``eigvalsh``)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    x, y, _, _ = task.arrays(DTYPE)

    def loss(v: torch.Tensor) -> torch.Tensor:
        pieces = v.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return task.loss(functional_call(model, params, (x,)), y)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


@pytest.mark.parametrize(
    ("method", "strength"),
    [("plain", 0.0), ("balanced-init", 0.0), ("penalty", 0.5), ("exact", 0.5),
     ("exact-every-10", 0.5)],
)  # fmt: skip
def test_sharpness_track_against_a_dense_hessian_of_an_independent_run(method, strength):
    """``tracked`` against ``torch.optim.SGD`` (with the penalty's gradient added, or
    ``relax_`` at ``strength`` times the learning rates since the last orbit step) and the top
    eigenvalue of the dense Hessian: losses to 1e-12, ``lambda_max`` to 1e-9 (before, the
    step's state was dropped, so exact-every-10 never took its orbit step)."""
    task, lr, s, steps, every = _task((3, 4, 1)), 0.1, 1.0, 12, 3
    curve = sharpness_track.tracked(task, method, strength, lr, s, steps, every)
    model, structure = moved_start(task, method, s)
    x, y, _, _ = task.arrays(DTYPE)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr)
    interval = 10 if method == "exact-every-10" else 1
    expected = []
    for t in range(steps + 1):
        loss = task.loss(model(x), y)
        if t % every == 0:
            expected.append((t, loss.item(), _dense_top(task, model)))
        opt.zero_grad()
        loss.backward()
        for n, g in (orbit_selection_grad(model, structure, strength) if method == "penalty"
                     else {}).items():  # fmt: skip
            params[n].grad.add_(g)
        opt.step()
        if method.startswith("exact") and (t + 1) % interval == 0:
            gaugefix.relax_(model, structure, strength * lr * interval)
    assert [p[0] for p in curve] == [p[0] for p in expected]
    for (_, loss, top), (_, ref_loss, ref_top) in zip(curve, expected, strict=True):
        assert abs(loss - ref_loss) <= 1e-12 * ref_loss
        assert abs(top - ref_top) <= 1e-9 * ref_top


# -- min_sharpness ------------------------------------------------------------------------------


def test_min_sharpness_record_is_on_the_orbit_and_not_sharper_than_its_start():
    """The recorded start against an independent check: the point ``h`` moves the
    initialisation to keeps the outputs (1e-12), its dense-Hessian ``lambda_max`` is the one
    recorded as found and is at most the balanced point's, where the L-BFGS started; the
    recorded as-given and balanced values are the dense ones (1e-9)."""
    task = _task((3, 4, 1))
    r = min_sharpness.record(task, task_hash(task), 0)
    model, structure = float64_model(task)
    x, _, _, _ = task.arrays(DTYPE)
    before = model(x).detach()
    given = _dense_top(task, model)
    start = min_sharpness_start(task, structure, task_hash(task), 0)
    gaugefix.apply_gauge_(model, structure, start.h)
    found = _dense_top(task, model)
    assert float((model(x).detach() - before).abs().max()) <= 1e-12 * float(before.abs().max())
    assert r["function_change"] <= 1e-12
    gaugefix.balance_(model, structure)
    balanced = _dense_top(task, model)
    for recorded, dense in ((r["given"], given), (r["balanced"], balanced), (r["found"], found)):
        assert abs(recorded - dense) <= 1e-9 * dense
    assert found <= balanced


@pytest.mark.parametrize("every", [0, -1, True, 1.5])
def test_sharpness_track_refuses_an_interval_that_is_no_positive_integer(every):
    """``every=0`` raised ZeroDivisionError (``step % every``) after the model was built."""
    with pytest.raises(ValueError, match="every"):
        sharpness_track.tracked(_task((3, 4, 1)), "plain", 0.0, 0.1, 0.0, 4, every)
