"""Experiment 4, dissipative relaxation: penalty-only descent on a trained network against the
linear prediction ``d mu/dt = -2 lambda K mu``. Stored per task under ``relaxation/TASK``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, TypedDict

import torch

import gaugefix
from gaugefix.diagnostics import relaxation_rates
from gaugefix.errors import check_count, check_number
from gaugefix.experiments.figures import fmt, label, save, subplots, task_color, task_style
from gaugefix.experiments.probes import float64_model, train_plain
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task
from gaugefix.soft import orbit_selection_grad

__all__ = ["compute", "KEY", "READS_RUNS", "VERSION", "render", "summarize", "SUMMARY"]

KEY = "relaxation"
# compute trains its own network and reads no run of the store: computed beside the sweep
READS_RUNS = False
# The version of what compute gives: raised when a change alters it, so stored values of
# older versions are computed again.
VERSION = 2  # 2: rates read from the per-step factor
MAX_STEPS = 200_000  # the descent stops here if ||mu|| has not fallen to ``fall`` before


class RelaxationSummary(TypedDict):
    """The ``relaxation`` entry of ``summary.json`` (:func:`summarize`)."""

    max_relative_error: Annotated[
        float | None, "of the measured decay rates against 2 lambda k_i, over the tasks"
    ]


SUMMARY = RelaxationSummary


def compute(store: Store, task: Task, quick: bool) -> dict[str, Any]:
    """:func:`relaxation` at strength 1 after 150 (quick) or 500 steps of plain training."""
    return relaxation(task, 1.0, 150 if quick else 500)


def relaxation(task: Task, strength: float, train_steps: int, fall: float = 0.9) -> dict[str, Any]:
    """Penalty-only gradient descent on a trained network against ``d mu/dt = -2 lambda K mu``.

    A plain network is trained (full-batch GD, lr 0.05), then descends ``P`` alone with a step
    ``dt`` that makes the fastest mode's Euler factor ``0.01``, until ``||mu||`` falls to
    ``fall`` times its start (at most :data:`MAX_STEPS` steps). To first order in ``mu`` the
    step is ``mu <- (I - 2 lambda dt K) mu``, so each mode of ``K`` (frozen at the start: it
    moves with the representative) shrinks by ``1 - dt r_i`` per step, ``r_i = 2 lambda k_i``.
    For each mode with at least 1% of ``||mu||`` the measured rate ``(1 - f_i) / dt`` (``f_i``
    the per-step factor of a least-squares fit of ``log |c_i|``) is compared with ``r_i``; the
    predicted norm is that of ``c_i(0) (1 - dt r_i)^step``. Near balance both are exact.
    """
    strength = check_number(strength, "strength", strict=True)
    fall = check_number(fall, "fall", strict=True)
    if fall >= 1:
        raise ValueError(f"fall must be below 1, got {fall!r}")
    check_count(train_steps, "train_steps", minimum=0)
    model, structure = float64_model(task)
    train_plain(task, model, 0.05, train_steps)
    # every mode: the sparse path's extreme modes would leave the middle of the spectrum out
    pred = relaxation_rates(model, structure, strength, dense_limit=structure.num_generators)
    modes = pred.modes
    dt = 0.01 / float(pred.rates.max())
    mu0 = gaugefix.imbalance(model, structure).detach()
    c0 = modes.T @ mu0
    coords, norms = _descend(model, structure, strength, dt, modes, fall)
    times = [k * dt for k in range(len(norms))]
    t = torch.tensor(times, dtype=torch.float64)
    c = torch.stack(coords)  # [T, N]
    significant = c0.abs() >= 0.01 * float(mu0.norm())
    measured, predicted = [], []
    for i in torch.nonzero(significant).reshape(-1).tolist():
        amp = c[:, i].abs()
        keep = amp > 1e-8 * float(mu0.norm())
        slope = _slope(t[keep], torch.log(amp[keep]))  # log of the per-step factor, over dt
        measured.append(-math.expm1(slope * dt) / dt)
        predicted.append(float(pred.rates[i]))
    errors = [abs(m - p) / p for m, p in zip(measured, predicted, strict=True)]
    factor = 1 - dt * pred.rates
    pred_norm = [float((c0 * factor.pow(k)).norm()) for k in range(len(times))]
    every = max(1, len(times) // 200)
    return {
        "task": task.name,
        "strength": strength,
        "dt": dt,
        "steps": len(times) - 1,
        "fall": fall,
        "predicted_rates": predicted,
        "measured_rates": measured,
        "max_relative_error": max(errors) if errors else None,
        "times": _thinned(times, every),
        "measured_norm": _thinned(norms, every),
        "predicted_norm": _thinned(pred_norm, every),
    }


def _descend(
    model: torch.nn.Module,
    structure: gaugefix.GaugeStructure,
    strength: float,
    dt: float,
    modes: torch.Tensor,
    fall: float,
) -> tuple[list[torch.Tensor], list[float]]:
    """Gradient descent on ``P`` alone with step ``dt`` until ``||mu||`` falls to ``fall`` of its
    start (at most :data:`MAX_STEPS` steps): ``mu``'s coordinates in ``modes`` ``[N, N]`` and
    its norm at every step, the start included."""
    mu = gaugefix.imbalance(model, structure).detach()
    coords, norms = [modes.T @ mu], [float(mu.norm())]
    params = structure.bind(model)
    for _ in range(MAX_STEPS):
        with torch.no_grad():
            grads = orbit_selection_grad(params, structure, strength)
            for name, g in grads.items():
                params[name].sub_(dt * g)
        mu = gaugefix.imbalance(model, structure).detach()
        coords.append(modes.T @ mu)
        norms.append(float(mu.norm()))
        if norms[-1] <= fall * norms[0]:
            break
    return coords, norms


def _thinned(values: list[float], every: int) -> list[float]:
    """Every ``every``-th of ``values`` and the last."""
    return values[::every] + ([values[-1]] if (len(values) - 1) % every else [])


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    xm, ym = x.mean(), y.mean()
    return float(((x - xm) * (y - ym)).sum() / (x - xm).square().sum())


def summarize(values: dict[str, dict[str, Any]]) -> RelaxationSummary:
    """The largest relative error of the measured decay rates over the tasks."""
    errors = [e for v in values.values() if (e := v["max_relative_error"]) is not None]
    return RelaxationSummary(max_relative_error=max(errors, default=None))


def render(out: Path, values: dict[str, dict[str, Any]]) -> str:
    fig, axes = subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    lines = []
    floor = _floor(values)
    for i, (task, r) in enumerate(sorted(values.items())):
        color = task_color(i)
        _draw_rates(axes[0], task, r, color, task_style(i)[0], floor)
        axes[1].semilogy(r["times"], r["measured_norm"], color=color, label=f"{task} measured")
        axes[1].semilogy(r["times"], r["predicted_norm"], "--", color=color,
                         label=f"{task} predicted")  # fmt: skip
        grew = sum(m <= 0 for m in r["measured_rates"])
        lines.append(
            f"- {task}: {len(r['predicted_rates'])} modes with at least 1% of the initial "
            f"imbalance, {r['steps']} steps of penalty-only descent (strength {r['strength']}) "
            f"{_until(r)}; maximum relative error of the "
            f"measured decay rates against 2 lambda k_i: **{fmt(r['max_relative_error'])}**."
            + (f" {grew} {'mode' if grew == 1 else 'modes'} grew (measured rate at most 0, "
               "drawn as a downward triangle at the bottom of the left panel)." if grew else "")
        )  # fmt: skip
    rates = [v for r in values.values() for v in r["predicted_rates"]]
    if rates:
        axes[0].plot([min(rates), max(rates)], [min(rates), max(rates)], "k:", lw=1)
    label(axes[0], "predicted rate 2 lambda k_i", "measured rate")
    label(axes[1], "time (step x dt)", "||mu||")
    name = save(fig, out, "relaxation.png")
    return (
        "## Dissipative relaxation\n\nA trained plain network descends the orbit-selection "
        "functional alone; the prediction is "
        "`d mu/dt = -2 lambda K mu` with K frozen at the start (each eigenmode of K decays at "
        "2 lambda k_i; a descent step of length dt shrinks it by 1 - 2 lambda k_i dt, from "
        "which each measured rate is read). K changes as the representative slides along its "
        "orbit, which is where the prediction is expected to drift over a long horizon.\n\n"
        + "\n".join(lines)
        + f"\n\n![relaxation]({name})"
    )


def _until(r: dict[str, Any]) -> str:
    """How the descent ended: ``||mu||`` fell to ``fall`` of its start, or the step limit."""
    norms = r["measured_norm"]
    if r["steps"] < MAX_STEPS or norms[-1] <= r["fall"] * norms[0]:
        return f"until ||mu|| fell to {r['fall']:g} of its start"
    return f"(the step limit, before ||mu|| fell to {r['fall']:g} of its start)"


def _floor(values: dict[str, dict[str, Any]]) -> float:
    """Where a measured rate at most 0 is drawn on the log axis: half the smallest positive
    measured rate (or predicted rate, where none is positive) of every task."""
    measured = [m for r in values.values() for m in r["measured_rates"] if m > 0]
    predicted = [p for r in values.values() for p in r["predicted_rates"]]
    return min(measured or predicted or [1.0]) / 2


def _draw_rates(
    ax: Any, task: str, r: dict[str, Any], color: str, marker: str, floor: float
) -> None:
    """Measured against predicted rates, each mode a point; a mode that grew (measured rate at
    most 0, which a log axis cannot show) as a ``v`` at ``floor``."""
    pairs = list(zip(r["predicted_rates"], r["measured_rates"], strict=True))
    decayed = [(p, m) for p, m in pairs if m > 0]
    grew = [p for p, m in pairs if m <= 0]
    ax.loglog([p for p, _ in decayed], [m for _, m in decayed], marker, ms=3, ls="none",
              color=color, label=task)  # fmt: skip
    if grew:
        ax.loglog(grew, [floor] * len(grew), "v", ms=4, ls="none", color=color)
