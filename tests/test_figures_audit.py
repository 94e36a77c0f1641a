"""Audit: the analyses' figures draw the data their analyses store, every stored point visible
where the axes' scales can show it, each series in a color that means one thing in its figure,
and the text beside a figure calls a run diverged where it diverged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

import gaugefix
from gaugefix.experiments import adam_split, conditioning, dose, relaxation, sharpness_track
from gaugefix.experiments.engine import DIVERGENCE_FACTOR, METHODS, init_direction
from gaugefix.experiments.figures import method_color
from gaugefix.experiments.probes import float64_model, loss64
from gaugefix.experiments.tasks import load_task

METHOD_COLORS = {to_rgba(method_color(m)) for m in METHODS}


def _relaxed(predicted: list[float], measured: list[float], start: float) -> dict:
    errors = [abs(m - p) / p for m, p in zip(measured, predicted, strict=True)]
    return {
        "predicted_rates": predicted,
        "measured_rates": measured,
        "times": [0.0, 0.05, 0.1],
        "measured_norm": [start, 0.97 * start, 0.94 * start],
        "predicted_norm": [start, 0.96 * start, 0.93 * start],
        "max_relative_error": max(errors),
        "steps": 30,
        "strength": 1.0,
        "fall": 0.9,
    }


# -- relaxation ---------------------------------------------------------------------------------


def test_relaxation_draws_each_task_in_one_color_that_no_method_has(tmp_path, captured_figures):
    """Panel 1 drew deep-teacher-student in C0 and teacher-student in C1, panel 2 their
    measured and predicted norms in C0, C1, C2, C3: orange was teacher-student on the left and
    deep-teacher-student's prediction on the right (and C0, C1 are plain's and balanced-init's
    colors in every other figure)."""
    values = {"deep": _relaxed([0.2, 1.0], [0.19, 0.9], 2.8),
              "shallow": _relaxed([0.4, 2.0], [0.41, 1.9], 4.1)}  # fmt: skip
    relaxation.render(tmp_path, values)
    (fig,) = captured_figures
    rates, norms = fig.axes[:2]
    for task in values:
        colors = {to_rgba(line.get_color()) for line in rates.lines if line.get_label() == task}
        colors |= {to_rgba(line.get_color()) for line in norms.lines
                   if line.get_label().startswith(f"{task} ")}  # fmt: skip
        assert len(colors) == 1, task
        assert not colors & METHOD_COLORS, task
    per_task = {to_rgba(line.get_color()) for line in rates.lines if line.get_label() in values}
    assert len(per_task) == len(values)


def test_relaxation_shows_a_mode_whose_measured_rate_is_not_positive(tmp_path, captured_figures):
    """A mode that grew (measured rate -0.05) enters the maximum relative error (1.13) but was
    drawn at y = -0.05 on a log axis, where nothing is shown: every mode must be visible and
    the text must say that one grew."""
    predicted, measured = [0.4, 0.6, 1.2], [0.38, -0.05, 1.1]
    values = {"ts": _relaxed(predicted, measured, 4.1)}
    text = relaxation.render(tmp_path, values)
    (fig,) = captured_figures
    ax = fig.axes[0]
    modes = [line.get_xydata() for line in ax.lines if line.get_linestyle() == "None"]
    drawn = np.concatenate(modes)
    assert len(drawn) == len(predicted)
    assert np.isfinite(ax.transData.transform(drawn)).all()
    assert sorted(drawn[:, 0].tolist()) == predicted
    at = {x: y for x, y in drawn.tolist()}
    assert at[0.4] == 0.38 and at[1.2] == 1.1  # positive rates exactly as stored
    assert 0 < at[0.6] < min(m for m in measured if m > 0)  # below them all, on the axis
    assert "1 mode grew" in text


def test_relaxation_summary_keeps_a_zero_error():
    """``max_relative_error`` 0.0 (every rate exactly as predicted) was summarized as ``None``
    (could not be measured): the truthiness test dropped it."""
    assert relaxation.summarize({"a": {"max_relative_error": 0.0}}) == {"max_relative_error": 0.0}
    both = {"a": {"max_relative_error": 0.0}, "b": {"max_relative_error": None}}
    assert relaxation.summarize(both)["max_relative_error"] == 0.0


# -- conditioning -------------------------------------------------------------------------------

TASK = "teacher-student"


@pytest.fixture(scope="module")
def diverging() -> dict:
    """Sharpness during GD at lr 1 from s = 1, 6 steps: plain and exact diverge (the loss
    passes 1e3 times its start by step 2), balanced-init does not."""
    return conditioning.sharpness_training(load_task(TASK), 1.0, 1.0, 6, 2)


def _plain_losses(lr: float, s: float, steps: int) -> list[float]:
    """Plain full-batch GD's training losses at steps 0..steps, by ``torch.optim.SGD``."""
    task = load_task(TASK)
    model, structure = float64_model(task)
    gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps + 1):
        loss = loss64(task, model)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_sharpness_training_stops_where_the_sweep_calls_a_run_diverged(diverging):
    """Plain's curve went on to a loss of 9.8e238 and a sharpness of 1.7e120 at step 6, and
    that sharpness was reported as its "final sharpness"."""
    losses = _plain_losses(1.0, 1.0, 6)
    first = next(t for t, v in enumerate(losses) if v > DIVERGENCE_FACTOR * losses[0])
    for method in conditioning.TRAINED:
        assert all(loss <= DIVERGENCE_FACTOR * losses[0] for _, loss, _ in diverging[method])
    assert diverging["diverged_at"]["plain"] == first
    assert diverging["diverged_at"]["balanced-init"] is None
    assert diverging["exact"][-1][0] < diverging["diverged_at"]["exact"] <= 6


def test_the_conditioning_text_calls_a_diverged_run_diverged(tmp_path, diverging):
    init = {"by_s": {"-1.0": 31.0, "0.0": 9.3, "1.0": 34.0}, "balanced": 2.9}
    text = conditioning.render(tmp_path, {TASK: {"init": init, "train": diverging}})
    at = diverging["diverged_at"]
    assert f"plain diverged at step {at['plain']}" in text
    assert f"exact diverged at step {at['exact']}" in text
    final = diverging["balanced-init"][-1][2]
    assert f"final sharpness balanced-init {final:.3g}" in text


def test_the_orbit_panel_uses_no_methods_color(tmp_path, captured_figures):
    """The orbit panel drew its tasks in C0 and C1 beside panels (and a legend below them) in
    which C0 is plain and C1 balanced-init."""
    init = {"by_s": {"-1.0": 31.0, "0.0": 9.3, "1.0": 34.0}, "balanced": 2.9}
    train = {"lr": 0.09, "s": 1.0, "two_over_lr": 2 / 0.09}
    train |= {m: [(0, 0.1, 3.0), (4, 0.1, 2.0)] for m in conditioning.TRAINED}
    values = {"a": {"init": init, "train": train}, "b": {"init": init, "train": train}}
    conditioning.render(tmp_path, values)
    (fig,) = captured_figures
    orbit = fig.axes[0]
    colors = [to_rgba(line.get_color()) for line in orbit.lines]
    assert len(colors) == 2 * len(values) and not set(colors) & METHOD_COLORS
    assert len(set(colors)) == len(values)  # each task its own, its dotted line the same


# -- sharpness at the edge ----------------------------------------------------------------------


def test_tracking_stops_where_the_sweep_calls_a_run_diverged():
    """Tracked at lr 4, plain's loss passed 5e8 times its start at step 2 and that step's
    lambda_max (5.4e4) was kept as a point of the curve."""
    curve = sharpness_track.tracked(load_task(TASK), "plain", 0.0, 4.0, 1.0, 4, 2)
    initial = curve[0][1]
    assert [p[0] for p in curve] == [0]
    assert all(loss <= DIVERGENCE_FACTOR * initial for _, loss, _ in curve)


def test_the_edge_text_says_when_a_tracked_run_diverged(tmp_path):
    """A curve that ends before the last step it would record (step 8 of 9, every 2) ended by
    divergence; the text gave its last point as if the run had finished."""
    ended = {"strength": 0.0, "edge": 0.1, "curve": [(0, 1.0, 20.0), (2, 1.0, 18.0)],
             "finished": False}  # fmt: skip
    whole = {"strength": 0.0, "edge": 0.1, "curve": [(k, 1.0, 20.0) for k in range(0, 9, 2)],
             "finished": True}  # fmt: skip
    values = {TASK: {"steps": 9, "every": 2, "methods": {"plain": {"0.0": ended},
                                                          "exact": {"0.0": whole}}}}  # fmt: skip
    text = sharpness_track.render(tmp_path, values)
    (plain,) = [line for line in text.splitlines() if ", plain:" in line]
    (exact,) = [line for line in text.splitlines() if ", exact:" in line]
    assert "diverged before step 4" in plain
    assert "diverged" not in exact and "at step 8." in exact


# -- Adam, separated; dose-response: each series is its stored data -----------------------------


def _curve(n: int, scale: float, horizontal: list[float | None]) -> dict:
    return {
        "loss": [1.0] * n,
        "log_ratio": [scale * 0.9**k for k in range(n)],
        "step": [1.0 + scale] * n,
        "plain_step": [1.0] * n,
        "horizontal": horizontal,
        "sqrt_v": [scale * (1 + k) for k in range(n)],
    }


def _split() -> dict:
    curves = {
        "plain": _curve(4, 1.0, [None] * 4),
        "penalty": _curve(4, 2.0, [0.1, 0.2, 0.3, 0.2]),
        "decoupled-penalty": _curve(4, 3.0, [0.0, 2e-16, 5e-18, None]),
        "exact": _curve(3, 4.0, [0.01, 0.02, 0.03]),  # ended a step early
    }
    return {"lr": 0.1, "steps": 4, "match_steps": 2,
            "strength": {"penalty": 0.1, "decoupled-penalty": 0.2, "exact": 0.3},
            "decay_rate": {m: 0.01 for m in curves}, "curves": curves, "sweep": {}}  # fmt: skip


def test_the_adam_figure_draws_each_methods_stored_curves(tmp_path, captured_figures):
    """Per method, in its color: the RMS log-ratio, the horizontal fraction and sqrt(v) over
    plain's, at steps 0, 1, ... as stored (the ratio over the steps both reached)."""
    value = _split()
    adam_split.render(tmp_path, {TASK: value})
    (fig,) = captured_figures
    plain_v = value["curves"]["plain"]["sqrt_v"]
    for method, c in value["curves"].items():
        want = [c["log_ratio"]]
        if method != "plain":
            h = [np.nan if v is None else max(v, adam_split.HORIZONTAL_FLOOR)
                 for v in c["horizontal"]]  # fmt: skip
            want += [h, [a / b for a, b in zip(c["sqrt_v"], plain_v, strict=False)]]
        for ax, ys in zip(fig.axes, want, strict=False):
            (line,) = [x for x in ax.lines if x.get_label() == f"{TASK}: {method}"]
            assert to_rgba(line.get_color()) == to_rgba(method_color(method))
            np.testing.assert_array_equal(line.get_xydata(), np.c_[np.arange(len(ys)), ys])


def test_the_adam_text_says_which_horizontal_fractions_are_drawn_at_the_floor(tmp_path):
    """The decoupled penalty's horizontal fractions 0 and 5e-18 were drawn at 1e-17 on the log
    axis without a word: a reader took the floor for a measured value."""
    text = adam_split.render(tmp_path, {TASK: _split()})
    assert f"{TASK}, decoupled-penalty: 2 horizontal fractions below 1e-17" in text


def test_the_dose_figure_draws_every_kept_point_of_every_seed(tmp_path, captured_figures):
    """Each method's points are its kept (seed, strength) points, x = tau_relax / t_diverge,
    y = edge / plain's edge, in its color; a point without plain's divergence is left out."""
    points = []
    for seed, plain in ((0, 0.01), (1, 0.02)):
        for k, (method, strength) in enumerate((("penalty", 0.1), ("exact", 1.0),
                                                ("penalty", 10.0))):  # fmt: skip
            points.append({"seed": seed, "method": method, "strength": strength,
                           "edge": 0.05 * (k + 1), "plain_edge": plain, "rate": 0.3 + seed,
                           "t_diverge": None if (seed, k) == (1, 2) else 5 + k})  # fmt: skip
        points.append({"seed": seed, "method": "plain", "strength": 0.0, "edge": plain,
                       "plain_edge": plain, "rate": 0.3 + seed, "t_diverge": None})  # fmt: skip
    text = dose.render(tmp_path, {TASK: {"steps": 10, "seeds": 2, "s": 2.0, "points": points}})
    (fig,) = captured_figures
    (ax,) = fig.axes
    for method in dose.SWEPT:
        kept = [p for p in points if p["method"] == method and p["t_diverge"]]
        want = [(1 / (p["edge"] * p["strength"] * p["rate"]) / p["t_diverge"],
                 p["edge"] / p["plain_edge"]) for p in kept]  # fmt: skip
        (line,) = [x for x in ax.lines if x.get_label() == f"{TASK}: {method}"]
        assert to_rgba(line.get_color()) == to_rgba(method_color(method))
        np.testing.assert_allclose(line.get_xydata(), want, rtol=1e-15, atol=0)
    assert "(1 points left out" in text


def test_the_edge_figure_draws_each_methods_curve_and_its_two_over_lr(tmp_path, captured_figures):
    """One panel per s in increasing order; per method its stored (step, lambda_max) and a
    dotted line at 2 / its edge, in its color."""

    def entry(edge: float, top: float) -> dict:
        curve = [(0, 1.0, top), (5, 0.5, top / 2)]
        return {"strength": 1.0, "edge": edge, "curve": curve, "finished": True}

    methods = {"plain": {"2.0": entry(0.1, 30.0), "0.0": entry(0.2, 9.0)},
               "exact": {"2.0": entry(0.4, 30.0)}}  # fmt: skip
    sharpness_track.render(tmp_path, {TASK: {"steps": 5, "every": 5, "methods": methods}})
    (fig,) = captured_figures
    assert [ax.get_title() for ax in fig.axes] == [f"{TASK}, s = 0", f"{TASK}, s = 2"]
    for ax, s in zip(fig.axes, ("0.0", "2.0"), strict=True):
        for method, by_s in methods.items():
            drawn = [x for x in ax.lines if x.get_label().startswith(f"{method} (")]
            if s not in by_s:
                assert not drawn
                continue
            (line,) = drawn
            assert to_rgba(line.get_color()) == to_rgba(method_color(method))
            want = [(p[0], p[2]) for p in by_s[s]["curve"]]
            np.testing.assert_array_equal(line.get_xydata(), want)
            dotted = [x for x in ax.lines if x.get_linestyle() == ":"
                      and to_rgba(x.get_color()) == to_rgba(method_color(method))]  # fmt: skip
            assert [x.get_ydata()[0] for x in dotted] == [2 / by_s[s]["edge"]]


def test_the_orbit_panel_draws_the_stored_sharpness_by_s(tmp_path, captured_figures):
    init = {"by_s": {"-1.0": 31.0, "0.0": 9.3, "1.0": 34.0}, "balanced": 2.9}
    train = {"lr": 0.09, "s": 1.0, "two_over_lr": 2 / 0.09}
    train |= {m: [(0, 0.1, 3.0), (4, 0.1, 2.0)] for m in conditioning.TRAINED}
    conditioning.render(tmp_path, {TASK: {"init": init, "train": train}})
    (fig,) = captured_figures
    curve, balanced = fig.axes[0].lines
    np.testing.assert_array_equal(curve.get_xydata(), [(-1.0, 31.0), (0.0, 9.3), (1.0, 34.0)])
    assert list(balanced.get_ydata()) == [2.9, 2.9]
    for method in conditioning.TRAINED:
        (line,) = [x for x in fig.axes[1].lines if x.get_label() == method]
        np.testing.assert_array_equal(line.get_xydata(), [(0, 3.0), (4, 2.0)])
