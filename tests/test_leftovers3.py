"""Leftovers of the engine and the dose and sharpness-at-the-edge analyses: a NaN constant loss
judged, the refusals at train time naming their run, min-sharpness-init's start kept per task
(not per label), dose's lower-bound edges marked and a predicted edge without a finite positive
``lambda_max``."""

from __future__ import annotations

import math

import pytest
import torch

from gaugefix.experiments import dose, engine, sharpness_track
from gaugefix.experiments.engine import RunConfig, run_status, train_group
from gaugefix.experiments.plan import COARSE, lr_grid
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.tasks import Task
from gaugefix.zoo import mlp

pytestmark = pytest.mark.usefixtures("single_thread")

TS = "teacher-student"
# float64 per-layer-lr at this s: the squares of the moved parameters are finite, the
# multipliers d_e^-2 are not (measured: refused by scale_by_tensor from about s = 350; the
# squares overflow, refused by _check_masses, from about s = 354).
PER_LAYER_LR_OVERFLOW = 352.0
# The move by s z itself overflows float32 above about s = 88 and float64 above about 709.
MOVE_OVERFLOW = {"float32": 89.0, "float64": 710.0}


def _config(method: str, s: float, dtype: str = "float64", **changes) -> RunConfig:
    values = dict(optimizer="gd", lr=0.1, strength=0.0, s=s, seed=0, batch_size=0, steps=3,
                  dtype=dtype)  # fmt: skip
    values.update(changes)
    return RunConfig(TS, method, task_hash=TaskSpec(TS).for_seed(0).hash(), **values)


# -- 1. run_status and a constant loss that is not a number --------------------------------------


@pytest.mark.parametrize(("initial", "constant"), [(1.0, math.nan), (math.nan, 1.0)])
def test_a_nan_threshold_is_never_stable(initial, constant):
    """``min(1.0, nan)`` is 1.0 (``min`` keeps its first argument when a comparison is false):
    a run with a NaN constant loss was judged against its initial loss alone, "stable"."""
    assert run_status(initial, 0.5, constant) == "unstable"
    assert run_status(initial, None, constant) == "diverged"


def test_run_status_is_symmetric_in_its_two_thresholds():
    for a, b in ((1.0, 2.0), (2.0, 1.0)):
        assert run_status(a, 0.9 * 1.0, b) == "stable"
        assert run_status(a, 0.9 * 1.0 + 1e-12, b) == "unstable"


# -- 2. the train-time refusals name their run ----------------------------------------------------


def _refused(configs: list[RunConfig]) -> str:
    """``train_group``'s refusal of ``configs``; no step was taken."""
    steps: list[int] = []
    with pytest.raises(ValueError) as caught:
        train_group(TaskSpec(TS).for_seed(0).load(), configs, on_step=steps.append)
    assert steps == []
    return str(caught.value)


def test_per_layer_lr_with_overflowing_multipliers_is_refused_naming_the_run():
    """Was: "the factor of '0.weight' must be finite and >= 0 for every copy, got inf"."""
    ok = _config("plain", 0.0)
    text = _refused([ok, _config("per-layer-lr", PER_LAYER_LR_OVERFLOW)])
    assert text.startswith("cannot train the run (teacher-student, per-layer-lr, gd, lr 0.1, ")
    assert f"s = {PER_LAYER_LR_OVERFLOW!r}" in text and "\n" not in text


@pytest.mark.parametrize("dtype", sorted(MOVE_OVERFLOW))
@pytest.mark.parametrize("method", ["plain", "balanced-init", "per-layer-lr"])
def test_an_overflowing_move_is_refused_naming_the_run(method, dtype):
    """Was action.py's "the gauge move would overflow parameter '0.weight' ..." without the
    run."""
    s = MOVE_OVERFLOW[dtype]
    text = _refused([_config("plain", 0.0, dtype), _config(method, s, dtype, seed=1)])
    assert text.startswith(f"cannot train the run (teacher-student, {method}, gd, lr 0.1, seed 1)")
    assert f"s = {s!r}" in text and "overflow" in text and "\n" not in text


# -- 3. min-sharpness-init's start belongs to the task trained, not to its label ---------------

_GEN = torch.Generator().manual_seed(11)
_X = torch.randn(24, 3, generator=_GEN)
_WIDTHS = (3, 5, 1)


def _tiny(shift: float) -> Task:
    y = (_X[:, :1] - shift).relu() + 0.1 * _X[:, 1:2]
    return Task(f"tiny{shift}", "regression", _X, y, None, None, lambda: mlp(_WIDTHS))


def test_min_sharpness_init_of_two_tasks_under_one_label_starts_from_each_ones_point(monkeypatch):
    """train_group trains ``configs[r]`` on ``tasks[r]`` as given, the hash being the caller's
    label: min-sharpness-init's start, kept per process by (hash, seed), was the first task's
    for a second task under the same label."""
    monkeypatch.setattr(engine, "MIN_SHARPNESS_ITERATIONS", 3)
    monkeypatch.setattr(engine, "_SHARPNESS_STARTS", {})
    a, b = _tiny(0.0), _tiny(0.7)
    config = RunConfig("tiny", "min-sharpness-init", "gd", 0.05, 0.0, 1.0, 0, 0, 4, "float64",
                       task_hash="label")  # fmt: skip
    train_group(a, [config])
    (shared,) = train_group(b, [config])
    monkeypatch.setattr(engine, "_SHARPNESS_STARTS", {})
    (alone,) = train_group(b, [config])
    assert [p.loss for p in shared.curves] == [p.loss for p in alone.curves]
    assert shared.final_loss == alone.final_loss


# -- 4. dose: an edge stable up to the grid's top is a lower bound --------------------------------


def test_dose_marks_an_edge_at_the_grid_top_as_a_lower_bound(monkeypatch):
    """compute with the edges given: the point at the quick grid's top is a lower bound, the
    others (a bisected midpoint below it, no stable rate) are not."""
    top = max(lr_grid(*dose.QUICK_LR_RANGE, COARSE))
    found = {("plain", 0.0): top / 8, ("penalty", 1.0): top, ("exact", 1.0): top / 3,
             ("exact", 100.0): 0.0}  # fmt: skip
    diverged = {("penalty", 1.0): 3, ("exact", 1.0): 5}
    monkeypatch.setattr(dose, "edges", lambda *_: (found, diverged))
    monkeypatch.setattr(dose, "_start", lambda *_: (None, None))
    monkeypatch.setattr(dose, "slowest_rate", lambda *_: 0.25)
    value = dose.compute(None, TaskSpec(TS).load(), True)
    marks = {(p["method"], p["strength"]): p["lower_bound"] for p in value["points"]}
    assert marks == {cell: edge >= top for cell, edge in found.items()}
    assert sum(marks.values()) == 1


def _dose_value(bounds: set[int]) -> dict:
    """Two seeds' points of both methods; the points of index ``bounds`` lower bounds."""
    points = []
    for seed in (0, 1):
        points.append({"seed": seed, "method": "plain", "strength": 0.0, "edge": 0.01,
                       "plain_edge": 0.01, "rate": 0.3, "t_diverge": None,
                       "lower_bound": False})  # fmt: skip
        for k, (method, strength) in enumerate((("penalty", 0.1), ("exact", 1.0),
                                                ("penalty", 10.0), ("exact", 10.0))):  # fmt: skip
            points.append({"seed": seed, "method": method, "strength": strength,
                           "edge": 0.02 * (k + 1 + seed), "plain_edge": 0.01, "rate": 0.3,
                           "t_diverge": 4 + k + seed,
                           "lower_bound": len(points) in bounds})  # fmt: skip
    return {"steps": 10, "seeds": 2, "s": 2.0, "points": points}


def test_dose_summary_counts_its_lower_bounds_and_keeps_its_numbers():
    plain = dose.summarize({"t": _dose_value(set())})["t"]
    value = _dose_value({2, 8})
    marked = dose.summarize({"t": value})["t"]
    assert "lower_bounds" not in plain and marked.pop("lower_bounds") == 2
    assert marked == plain


def test_dose_figure_and_text_mark_the_lower_bounds(tmp_path, captured_figures):
    value = _dose_value({2, 8})
    text = dose.render(tmp_path, {"t": value})
    (fig,) = captured_figures
    (ax,) = fig.axes
    bounds = [p for p in value["points"] if p["lower_bound"]]
    want = [(dose.tau_relax(p["edge"], p["strength"], p["rate"]) / p["t_diverge"],
             p["edge"] / p["plain_edge"]) for p in bounds]  # fmt: skip
    (line,) = [x for x in ax.lines if "lower bound" in x.get_label()]
    assert sorted(map(tuple, line.get_xydata().tolist())) == sorted(want)
    assert "2 of the points kept are lower bounds" in text


# -- 5. sharpness at the edge without a finite positive lambda_max at step 0 ---------------------


def _edge_value(top: float) -> dict:
    curve = [(0, 1.0, top), (4, 0.5, 2.0)]
    entry = {"strength": 0.0, "edge": 0.1, "curve": curve, "finished": True}
    return {"t": {"steps": 4, "every": 4, "methods": {"plain": {"1.0": entry}}}}


@pytest.mark.parametrize(("top", "predicted"), [(math.inf, 0.0), (0.0, None), (-3.0, None)])
def test_a_predicted_edge_needs_a_finite_positive_lambda_max(tmp_path, top, predicted):
    """``2 / lambda_max(0)``: 0 for an infinite ``lambda_max`` (render divided by it), none for
    0 (``summarize`` divided by it) or a negative one (a negative edge was reported)."""
    values = _edge_value(top)
    assert sharpness_track.summarize(values)["t"]["plain"]["1.0"]["predicted_edge"] == predicted
    text = sharpness_track.render(tmp_path, values)
    shown = "0" if predicted == 0.0 else "n/a"
    assert f"predicted 2/lambda_max(0) {shown} (measured/predicted n/a)" in text


def test_a_predicted_edge_of_a_positive_lambda_max_is_two_over_it(tmp_path):
    values = _edge_value(8.0)
    assert sharpness_track.summarize(values)["t"]["plain"]["1.0"]["predicted_edge"] == 2 / 8.0
    assert "(measured/predicted 0.4)" in sharpness_track.render(tmp_path, values)
