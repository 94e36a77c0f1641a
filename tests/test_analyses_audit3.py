"""Audit of scale drift, conditioning and sharpness at the edge against independent float64
recomputations on a tiny two-layer network (``torch.optim.SGD`` by hand, the imbalance from the
weights by hand, ``lambda_max`` from the dense Hessian), the figures against the numbers their
analyses return, and runs that diverge at any step."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

import gaugefix
from gaugefix.experiments import conditioning, drift, sharpness_track
from gaugefix.experiments.analyses import stored
from gaugefix.experiments.cells import by_regime
from gaugefix.experiments.engine import RunConfig, task_hash, train_group
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.stability import at_best_strength, on_grid
from gaugefix.experiments.store import Store
from gaugefix.experiments.summary import summarize, task_summary
from gaugefix.experiments.tasks import Task
from gaugefix.soft import orbit_selection_grad
from gaugefix.zoo import mlp
from test_analyses_audit2 import _dense_top, moved_start

DTYPE = torch.float64
_GEN = torch.Generator().manual_seed(7)
X = torch.randn(32, 3, generator=_GEN)
Y = torch.randn(32, 1, generator=_GEN)
WIDTHS = (3, 4, 1)
TINY = Task("tiny", "regression", X, Y, None, None, lambda: mlp(WIDTHS))
NAN = X.clone()
NAN[0, 0] = math.nan
NAN_TASK = Task("tiny-nan", "regression", NAN, Y, None, None, lambda: mlp(WIDTHS))
HUGE = 1e36  # data and every weight scaled by it: a finite network whose float64 loss is inf


def _huge() -> torch.nn.Module:
    model = mlp((3, 4, 4, 4, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(HUGE)
    return model


INF_TASK = Task("tiny-inf", "regression", X * HUGE, Y, None, None, _huge)
# Plain full-batch GD on TINY from s = 1 at this rate: the loss passes 1e3 times its start at
# step 7 (measured by ``tracked`` with every = 1: its curve ends at step 6).
DIVERGING_LR, DIVERGES_AT = 3.0, 7
RECOMPUTED = 1e-10  # a recomputation by other code: rounding of a few steps apart
EIGEN = 1e-8  # Lanczos against the dense Hessian's eigvalsh


def _imbalance(model: torch.nn.Module) -> tuple[float, float]:
    """RMS of ``0.5 log(S_in / S_out)`` and ``max |mu_n| / S_n`` over the hidden units of a
    two-layer ReLU MLP by hand: ``S_in`` its incoming row and bias, ``S_out`` its outgoing
    column."""
    first, second = model[0], model[2]
    s_in = first.weight.detach().square().sum(1) + first.bias.detach().square()
    s_out = second.weight.detach().square().sum(0)
    log_ratio = 0.5 * (s_in / s_out).log()
    return float(log_ratio.square().mean().sqrt()), float(
        ((s_in - s_out) / (s_in + s_out)).abs().max()
    )


def _sgd(task: Task, method: str, strength: float, lr: float, s: float, seed: int = 0):
    """The float64 network of ``seed`` moved by ``s z`` (balanced for a balanced start) and a
    function taking one step of the sweep's ``method`` by hand: ``torch.optim.SGD`` on the
    loss, the penalty's gradient added, or ``relax_`` at ``strength * lr`` after the step."""
    model, structure = moved_start(task, method, s, seed)
    x, y, _, _ = task.arrays(DTYPE)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr)

    def step() -> None:
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if method == "penalty":
            for n, g in orbit_selection_grad(model, structure, strength).items():
                params[n].grad.add_(g)
        opt.step()
        if method == "exact":
            gaugefix.relax_(model, structure, strength * lr)

    return model, step


# -- sharpness at the edge: a run that diverges after the last multiple of `every` ---------------


def _computed(monkeypatch, steps: int, every: int, lr: float, task: Task = TINY) -> dict:
    """``sharpness_track.compute`` on ``task`` for plain at ``lr`` from s = 1 over ``steps``
    tracked every ``every`` steps (the edges and the points per run given, not read from a
    sweep)."""
    edges = {("plain", 1.0): (0.0, lr)}
    monkeypatch.setattr(sharpness_track, "edges_at_seed_0", lambda *_: (steps, edges))
    monkeypatch.setattr(sharpness_track, "POINTS", {True: steps // every + 1})
    value = sharpness_track.compute(None, task, True)
    assert value["every"] == every
    return {task.name: value}


def test_the_edge_text_calls_a_run_that_diverged_after_its_last_point_diverged(
    monkeypatch, tmp_path
):
    """Plain diverges at step 7; tracked every 3 steps for 7 steps, its curve ends at step 6,
    the last multiple of 3, and the text called the run finished ("at step 6.")."""
    model, step = _sgd(TINY, "plain", 0.0, DIVERGING_LR, 1.0)
    losses = []
    for _ in range(DIVERGES_AT + 1):
        losses.append(float(TINY.loss(model(X.to(DTYPE)), Y.to(DTYPE))))
        step()
    assert max(losses[:-1]) <= 1e3 * losses[0] < losses[-1]  # diverged at step 7, not before
    values = _computed(monkeypatch, DIVERGES_AT, 3, DIVERGING_LR)
    curve = values["tiny"]["methods"]["plain"]["1.0"]["curve"]
    assert [p[0] for p in curve] == [0, 3, 6]
    text = sharpness_track.render(tmp_path, values)
    (line,) = [x for x in text.splitlines() if ", plain:" in x]
    assert "at step 6 (the run diverged before step 7" in line


def test_a_finished_tracked_run_ends_at_its_last_step_as_the_dense_recomputation(
    monkeypatch, tmp_path
):
    """A run that finished ends at its last step (10, not the last multiple of ``every``, 9):
    its final sharpness is the network's after every step, against an independent run and the
    dense Hessian; the text does not call it diverged."""
    steps, every, lr = 10, 3, 0.1
    values = _computed(monkeypatch, steps, every, lr)
    curve = values["tiny"]["methods"]["plain"]["1.0"]["curve"]
    model, step = _sgd(TINY, "plain", 0.0, lr, 1.0)
    for _ in range(steps):
        step()
    assert [p[0] for p in curve] == [0, 3, 6, 9, 10]
    assert abs(curve[-1][2] - _dense_top(TINY, model)) <= EIGEN * curve[-1][2]
    summary = sharpness_track.summarize(values)["tiny"]["plain"]["1.0"]
    assert summary["final_sharpness"] == curve[-1][2]
    text = sharpness_track.render(tmp_path, values)
    assert "diverged" not in text and "at step 10." in text


def test_a_run_not_finite_at_step_0_is_reported_not_a_crash(
    monkeypatch, tmp_path, captured_figures
):
    """NaN in the data: the curve is empty. The figure's summary left it out and ``render``
    then raised ``KeyError`` looking it up (and ``pts[-1]`` an ``IndexError``)."""
    values = _computed(monkeypatch, 4, 2, 0.1, NAN_TASK)
    assert values["tiny-nan"]["methods"]["plain"]["1.0"]["curve"] == []
    values["tiny"] = _computed(monkeypatch, 4, 2, 0.1)["tiny"]
    text = sharpness_track.render(tmp_path, values)
    (line,) = [x for x in text.splitlines() if "tiny-nan, s = 1, plain:" in x]
    assert "diverged at step 0" in line and "lambda_max" not in line
    (fig,) = captured_figures
    assert [ax.get_title() for ax in fig.axes] == ["tiny, s = 1", "tiny-nan, s = 1"]
    assert [x.get_label() for x in fig.axes[0].lines][0] == "plain (lr 0.1)"
    assert not fig.axes[1].lines


def test_an_infinite_initial_loss_diverges_at_step_0_as_in_the_sweep():
    """The sweep calls a run whose initial loss is infinite diverged at step 0; tracking and
    conditioning took ``inf <= 1e3 * inf`` for a loss in bounds and raised ``ValueError`` in
    Lanczos ("a Hessian-vector product is not finite")."""
    model, _ = float64_model(INF_TASK)
    assert math.isinf(INF_TASK.loss(model(INF_TASK.arrays(DTYPE)[0]), INF_TASK.arrays(DTYPE)[1]))
    config = RunConfig("tiny-inf", "plain", "gd", 0.1, 0.0, 0.0, 0, 0, 4, "float64",
                       task_hash=task_hash(INF_TASK))  # fmt: skip
    (run,) = train_group(INF_TASK, [config])
    assert run.diverged_at == 0
    assert sharpness_track.tracked(INF_TASK, "plain", 0.0, 0.1, 0.0, 4, 2) == []
    r = conditioning.sharpness_training(INF_TASK, 0.1, 0.0, 4, 2)
    assert r["diverged_at"] == {m: 0 for m in conditioning.TRAINED}
    assert all(r[m] == [] for m in conditioning.TRAINED)


# -- conditioning against the dense Hessian and an independent run ------------------------------


def test_sharpness_along_the_orbit_is_the_dense_hessians():
    """``by_s`` and ``balanced`` against ``eigvalsh`` of the dense Hessian at the
    initialisation moved by ``s z`` and at its balanced point."""
    s_values = [-1.0, 0.0, 0.5, 2.0]
    r = conditioning.sharpness_init(TINY, s_values)
    for s in s_values:
        model, _ = _sgd(TINY, "plain", 0.0, 0.1, s)
        dense = _dense_top(TINY, model)
        assert abs(r["by_s"][str(s)] - dense) <= EIGEN * dense
    model, structure = float64_model(TINY)
    gaugefix.balance_(model, structure)
    dense = _dense_top(TINY, model)
    assert abs(r["balanced"] - dense) <= EIGEN * dense


@pytest.mark.parametrize("steps", [6, 7])
def test_sharpness_training_against_an_independent_run_and_the_dense_hessian(steps):
    """Each method of ``TRAINED`` against ``torch.optim.SGD`` by hand (``relax_`` after each
    step for exact): losses to 1e-10, ``lambda_max`` to 1e-8, every 3 steps and at the last
    step (7 is no multiple of 3: the final sharpness was step 6's)."""
    lr, s, every = 0.1, 1.0, 3
    r = conditioning.sharpness_training(TINY, lr, s, steps, every)
    for method in conditioning.TRAINED:
        strength = conditioning.STRENGTH if method == "exact" else 0.0
        model, step = _sgd(TINY, method, strength, lr, s)
        expected = []
        for t in range(steps + 1):
            if t % every == 0 or t == steps:
                loss = float(TINY.loss(model(TINY.arrays(DTYPE)[0]), TINY.arrays(DTYPE)[1]))
                expected.append((t, loss, _dense_top(TINY, model)))
            if t < steps:
                step()
        assert r["diverged_at"][method] is None
        assert [p[0] for p in r[method]] == [p[0] for p in expected], method
        for (_, loss, top), (_, want_loss, want_top) in zip(r[method], expected, strict=True):
            assert abs(loss - want_loss) <= RECOMPUTED * want_loss
            assert abs(top - want_top) <= EIGEN * want_top


def test_the_conditioning_text_draws_no_cross_it_promises(tmp_path, captured_figures):
    """Every run not finite at step 0 (NaN in the data): no point to mark, yet the text said
    "its last sharpness n/a, marked by a cross"."""
    train = conditioning.sharpness_training(NAN_TASK, 0.1, 1.0, 4, 2)
    assert train["diverged_at"] == {m: 0 for m in conditioning.TRAINED}
    init = {"by_s": {"0.0": 3.0, "1.0": 4.0}, "balanced": 2.0}
    text = conditioning.render(tmp_path, {"tiny": {"init": init, "train": train}})
    (fig,) = captured_figures
    assert not [x for x in fig.axes[1].lines if x.get_marker() == "x"]
    assert "cross" not in text
    for method in conditioning.TRAINED:
        assert f"{method} diverged at step 0" in text


# -- scale drift: the engine's runs against the imbalance recomputed by hand --------------------

DRIFT_STEPS = 20
DRIFT_GRID = (0.25, 0.5, 1.0, 4.0)
DRIFT_METHODS = {"plain": 0.0, "penalty": 1.0, "exact": 1.0}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def drift_store(tmp_path_factory) -> Store:
    """The engine's float64 full-batch GD runs of :data:`DRIFT_METHODS` on TINY, s = 0, seeds
    0-2, on :data:`DRIFT_GRID`, every step recorded, in a store."""
    hashed = task_hash(TINY)
    configs = [
        RunConfig(
            "tiny", m, "gd", lr, strength, 0.0, seed, 0, DRIFT_STEPS, "float64", task_hash=hashed
        )
        for m, strength in DRIFT_METHODS.items()
        for lr in DRIFT_GRID
        for seed in SEEDS
    ]
    store = Store(tmp_path_factory.mktemp("drift") / "results.sqlite")
    for result in train_group(TINY, configs, record_every=1):
        store.add_run(result, 0.0)
    return store


def _regime(store: Store) -> tuple:
    (regime, runs), = by_regime(store.runs()).items()  # fmt: skip
    return regime, on_grid(at_best_strength(runs))


def test_drift_suppression_is_the_ratio_of_the_imbalance_recomputed_by_hand(drift_store):
    """``drift_lr`` is the largest grid rate at which plain is stable for every seed; per seed
    the ratio is plain's final RMS log-ratio over the method's, each recomputed from an
    independent ``torch.optim.SGD`` run by hand (1e-10); the median over the seeds reported."""
    regime, runs = _regime(drift_store)
    entry = task_summary(drift_store.runs())["regimes"][regime.key]
    stable = [lr for lr in DRIFT_GRID
              if all(r.status == "stable" for r in runs
                     if r.config.method == "plain" and r.config.lr == lr)]  # fmt: skip
    assert entry["drift_reference"] == "plain" and entry["drift_lr"] == max(stable)
    lr = entry["drift_lr"]
    final = {}
    for method, strength in DRIFT_METHODS.items():
        for seed in SEEDS:
            model, step = _sgd(TINY, method, strength, lr, 0.0, seed)
            for _ in range(DRIFT_STEPS):
                step()
            final[method, seed] = _imbalance(model)[0]
    for method in ("penalty", "exact"):
        ratios = [final["plain", k] / final[method, k] for k in SEEDS]
        got = entry["drift_suppression"][method]
        assert got["seeds"] == len(SEEDS) and got["unknown_seeds"] == 0
        for value, want in zip((got["min"], got["median"], got["max"]),
                               (min(ratios), statistics.median(ratios), max(ratios)),
                               strict=True):  # fmt: skip
            assert abs(value - want) <= RECOMPUTED * want, method


def test_the_drift_figure_draws_the_curves_recomputed_by_hand(
    drift_store, tmp_path, captured_figures
):
    """Per method, the first seed's RMS log-ratio (top) and ``max |mu| / S`` (bottom) at every
    recorded step, as stored and as recomputed from an independent run by hand (1e-10)."""
    regime, runs = _regime(drift_store)
    entry = task_summary(drift_store.runs())["regimes"][regime.key]
    assert drift.figure(tmp_path, drift_store, "tiny", {regime: (entry, runs)})
    (fig,) = captured_figures
    top, bottom = fig.axes[:2]
    lr = entry["drift_lr"]
    assert top.get_title() == f"{regime.label}\nlr = {lr:g}, seed 0"
    for method, strength in DRIFT_METHODS.items():
        (run,) = [
            r for r in runs if (r.config.method, r.config.lr, r.config.seed) == (method, lr, 0)
        ]
        model, step = _sgd(TINY, method, strength, lr, 0.0, 0)
        want = []
        for t in range(DRIFT_STEPS + 1):
            want.append((t, *_imbalance(model)))
            if t < DRIFT_STEPS:
                step()
        curve = drift_store.curves(run.id)
        for ax, k, field in ((top, 1, "log_ratio_rms"), (bottom, 2, "mu_rel_max")):
            (line,) = [x for x in ax.lines if x.get_label() == method]
            drawn = line.get_xydata()
            np.testing.assert_array_equal(drawn, [(p.step, getattr(p, field)) for p in curve])
            hand = [(w[0], w[k]) for w in want]
            np.testing.assert_allclose(drawn, hand, rtol=RECOMPUTED, atol=0)


# -- analysis values of another VERSION ---------------------------------------------------------


def test_a_value_of_an_older_version_is_not_reported_as_current(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    value = {"steps": 10, "every": 5, "methods": {},
             "made_for": {"task_hash": "h", "quick": True, "version": 1}}  # fmt: skip
    assert sharpness_track.VERSION != 1
    store.put_analysis("sharpness_track/teacher-student", value, 0.0)
    assert not stored(store, sharpness_track)
    assert "sharpness_track" not in summarize(store, quick=True)
    current = {**value, "made_for": {**value["made_for"], "version": sharpness_track.VERSION}}
    store.put_analysis("sharpness_track/teacher-student", current, 0.0, replace=True)
    assert stored(store, sharpness_track) == {"teacher-student": current}
