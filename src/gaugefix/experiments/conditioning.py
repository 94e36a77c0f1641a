"""Experiment 5, conditioning: the largest Hessian eigenvalue of the training loss along the orbit
of the initialisation, at its balanced point, and during full-batch GD training. Stored per task
under ``conditioning/TASK``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, TypedDict

import torch

import gaugefix
from gaugefix.diagnostics import sharpness
from gaugefix.experiments.cells import SKey, TaskKey, longest_full_batch, s_key
from gaugefix.experiments.engine import DIVERGENCE_FACTOR, METHODS, REFERENCES, init_direction
from gaugefix.experiments.figures import (
    fmt,
    label,
    legend_below,
    method_color,
    save,
    subplots,
    task_color,
    task_style,
)
from gaugefix.experiments.probes import float64_model, loss64
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.stability import max_stable_lr
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task

__all__ = [
    "KEY",
    "READS_RUNS",
    "VERSION",
    "TRAINED",
    "STRENGTH",
    "Sharpness",
    "SUMMARY",
    "compute",
    "sharpness_init",
    "sharpness_training",
    "summarize",
    "render",
]

KEY = "conditioning"
# compute reads the sweep's runs (the largest stable rate): computed after the sweep
READS_RUNS = True
# The version of what compute gives: raised when a change alters it, so stored values of
# older versions are computed again.
VERSION = 2  # 2: the rate from the longest full-batch GD regime only
# The methods sharpness is followed for, as the sweep defines them (:data:`METHODS`).
TRAINED = (*REFERENCES, "exact")
STRENGTH = 1.0  # of the gauge-fixing methods


class Sharpness(TypedDict):
    """Sharpness at initialisation along the orbit of one task (:func:`sharpness_init`)."""

    by_s: Annotated[dict[SKey, float], "the initialisation moved by s z"]
    balanced: Annotated[float, "at the balanced point of the orbit"]


# The ``conditioning`` entry of ``summary.json`` (:func:`summarize`).
SUMMARY = dict[TaskKey, Sharpness]


def compute(store: Store, task: Task, quick: bool) -> dict[str, Any]:
    """Sharpness along the orbit (s from -2 to 2, in steps of 1 quick, 0.5 full) and during
    100 (quick) or 300 steps of training at plain's largest stable learning rate at s = 1."""
    s_values = [-2.0, -1.0, 0.0, 1.0, 2.0] if quick else [x / 2 for x in range(-4, 5)]
    steps = 100 if quick else 300
    return {
        "init": sharpness_init(task, s_values),
        "train": sharpness_training(task, _largest_stable_lr(store, task), 1.0, steps, steps // 10),
    }


def _value(task: Task, model: torch.nn.Module) -> float:
    x, y, _, _ = task.arrays(torch.float64)
    return float(sharpness(model, task.loss, x, y))


def sharpness_init(task: Task, s_values: list[float]) -> dict[str, Any]:
    """Sharpness of the training loss at initialisation along the orbit ``s z`` (the same
    function for every ``s``), and at the balanced point of that orbit."""
    by_s = {}
    for s in s_values:
        model, structure = float64_model(task)
        gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
        by_s[s_key(s)] = _value(task, model)
    model, structure = float64_model(task)
    gaugefix.balance_(model, structure)
    return {"by_s": by_s, "balanced": _value(task, model)}


def sharpness_training(task: Task, lr: float, s: float, steps: int, every: int) -> dict[str, Any]:
    """Sharpness every ``every`` steps and at the last step of full-batch GD from the
    initialisation moved by ``s z``, for the methods of :data:`TRAINED` as :data:`METHODS`
    defines them (a balanced start by ``balance_``; penalty and exact by
    :class:`gaugefix.GaugeFixing` with the method's ``every``, at strength :data:`STRENGTH`):
    ``{method: [(step, loss, sharpness), ...]}``,
    each curve ending where the run diverged as the sweep says (a loss not finite or above
    :data:`DIVERGENCE_FACTOR` times the initial one), at the step ``"diverged_at"`` gives
    (``{method: step or None}``)."""
    out: dict[str, Any] = {"lr": lr, "s": s, "two_over_lr": 2 / lr, "diverged_at": {}}
    for method in TRAINED:
        definition = METHODS[method]
        model, structure = float64_model(task)
        gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
        if definition.balanced_start:
            gaugefix.balance_(model, structure)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        if definition.fixing is not None:  # GaugeFixing refuses a fixing it does not provide
            gaugefix.GaugeFixing(opt, model, structure, STRENGTH, mode=definition.fixing,
                                 balance_at_start=False, every=definition.every)  # fmt: skip
        curve, diverged_at = [], None
        initial = loss64(task, model).item()
        for step in range(steps + 1):
            loss = loss64(task, model)
            value = loss.item()
            if not (math.isfinite(value) and value <= DIVERGENCE_FACTOR * initial):
                # a NaN, or an infinite initial loss, included
                diverged_at = step
                break
            if step % every == 0 or step == steps:
                curve.append((step, value, _value(task, model)))
            if step == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[method] = curve
        out["diverged_at"][method] = diverged_at
    return out


def _largest_stable_lr(store: Store, task: Task) -> float:
    """The largest learning rate stable for plain full-batch GD at s = 1 on ``task`` in its
    longest full-batch GD regime (:func:`longest_full_batch`, one cell), at the task's instance
    0, so the runs of seed 0; 0.1 without runs."""
    runs = store.runs(task=task.name, seed=0, method="plain", optimizer="gd", batch_size=0, s=1.0)
    if (found := longest_full_batch(runs, TaskSpec(task.name).hash())) is None:
        return 0.1
    return max_stable_lr(found[1]) or 0.1


def summarize(values: dict[str, dict[str, Any]]) -> dict[str, Sharpness]:
    """Sharpness at initialisation by s and at the balanced point, per task."""
    return {
        task: Sharpness(by_s=v["init"]["by_s"], balanced=v["init"]["balanced"])
        for task, v in sorted(values.items())
    }


def render(out: Path, values: dict[str, dict[str, Any]]) -> str:
    fig, axes = subplots(
        1,
        1 + len(values),
        figsize=(4.2 * (1 + len(values)), 3.6),
        squeeze=False,
        layout="constrained",
    )
    lines = []
    for i, (task, v) in enumerate(sorted(values.items())):
        r = v["init"]
        s = [float(k) for k in r["by_s"]]
        sharp = list(r["by_s"].values())
        marker, _ = task_style(i)
        axes[0][0].semilogy(s, sharp, marker, ls="-", color=task_color(i), label=task)
        axes[0][0].axhline(r["balanced"], ls=":", color=task_color(i))
        best = min(r["by_s"], key=r["by_s"].get)
        held = "held" if r["balanced"] <= min(sharp) else "did not hold"
        lines.append(
            f"- {task}: sharpness at initialisation {fmt(min(sharp))} (s = {best}) to "
            f"{fmt(max(sharp))} over s; at the balanced point {fmt(r['balanced'])}. Minimal at "
            f"the balanced point: **{held}**."
        )
    label(axes[0][0], "initial imbalance s", "sharpness at init (dotted: balanced)")
    for j, (task, v) in enumerate(sorted(values.items()), start=1):
        r, ax = v["train"], axes[0][j]
        for method in TRAINED:
            pts = r.get(method, [])
            ax.semilogy(
                [p[0] for p in pts],
                [p[2] for p in pts],
                "o-",
                ms=3,
                label=method,
                color=method_color(method),
            )
            if r.get("diverged_at", {}).get(method) is not None and pts:
                ax.semilogy(pts[-1][0], pts[-1][2], "x", ms=7, color=method_color(method))
        ax.axhline(r["two_over_lr"], color="k", ls="--", lw=1, label="2 / lr")
        ax.set_title(f"{task}, lr = {fmt(r['lr'])}, s = {r['s']:g}", fontsize=9)
        label(ax, "step", "sharpness", legend=None)
        lines.append(
            f"- {task}, full-batch GD at lr {fmt(r['lr'])} from s = {r['s']:g}: "
            f"{_finals(r)}; 2/lr = {fmt(r['two_over_lr'])}."
        )
    handles, labels = axes[0][-1].get_legend_handles_labels()  # below the panels, off the lines
    legend_below(fig, handles, labels)
    name = save(fig, out, "sharpness.png")
    return (
        "## Conditioning\n\nThe largest Hessian eigenvalue of the training loss (Lanczos on "
        "Hessian-vector products), along the orbit of the initialisation and during training.\n\n"
        + "\n".join(lines)
        + f"\n\n![sharpness]({name})"
    )


def _finals(train: dict[str, Any]) -> str:
    """The last sharpness of each method's curve: final where the run finished; where it
    diverged, the step it diverged at (a cross ends its curve; no point where it diverged at
    step 0)."""
    diverged_at = train.get("diverged_at", {})
    finished = [m for m in TRAINED if diverged_at.get(m) is None]
    finals = ", ".join(f"{m} {fmt(_last(train, m))}" for m in finished)
    parts = [f"final sharpness {finals}"] if finished else []
    parts += [
        f"{m} diverged at step {diverged_at[m]}"
        + (
            f" (its last sharpness {fmt(_last(train, m))}, marked by a cross)"
            if train.get(m)
            else ""
        )
        for m in TRAINED
        if m not in finished
    ]
    return "; ".join(parts)


def _last(train: dict[str, Any], method: str) -> float | None:
    """The sharpness at the last point of ``method``'s curve."""
    return train[method][-1][2] if train.get(method) else None
