"""Sharpness at the edge: for each method of the headline regime (full-batch GD) and each
initial imbalance, the largest Hessian eigenvalue of the training loss every few steps of
training at the method's measured (bisected) stable edge, and the edge ``2 / lambda_max(0)``
that the quadratic model of gradient descent predicts from the start against the measured
one. Stored per task under ``sharpness_track/TASK``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, TypedDict

import torch

import gaugefix
from gaugefix.diagnostics import sharpness
from gaugefix.experiments import stability
from gaugefix.experiments.cells import MethodKey, SKey, TaskKey, group, longest_full_batch, s_key
from gaugefix.experiments.engine import (
    DIVERGENCE_FACTOR,
    METHODS,
    RunConfig,
    balance_runs_,
    group_step,
    init_direction,
    task_hash,
)
from gaugefix.experiments.figures import fmt, label, method_color, save, subplots
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task
from gaugefix.step import check_every

__all__ = [
    "KEY",
    "READS_RUNS",
    "VERSION",
    "TRACKED",
    "EdgeSharpness",
    "SUMMARY",
    "compute",
    "edges_at_seed_0",
    "tracked",
    "summarize",
    "render",
]

KEY = "sharpness_track"
# compute reads the sweep's runs (the edges at seed 0): computed after the sweep
READS_RUNS = True
# The version of what compute gives: raised when a change alters it, so stored values of
# older versions are computed again.
VERSION = 4  # 2: the step's state kept between steps; 3: the last step tracked too; 4: no edge
# stable up to the grid's top (a lower bound, not a measured edge)
TRACKED = ("plain", "balanced-init", "penalty", "exact")  # methods followed, where they were run
POINTS = {True: 2, False: 11}  # sharpness evaluations per run, quick and full


class EdgeSharpness(TypedDict):
    """One method at one initial imbalance (:func:`summarize`)."""

    strength: float
    measured_edge: Annotated[
        float, "seed 0's largest stable rate: the stable end of its bisected bracket"
    ]
    predicted_edge: Annotated[
        float | None, "2 / lambda_max at step 0 (none where lambda_max is not > 0)"
    ]
    final_sharpness: Annotated[float | None, "lambda_max at the last step tracked"]


SUMMARY = dict[TaskKey, dict[MethodKey, dict[SKey, EdgeSharpness]]]


def compute(store: Store, task: Task, quick: bool) -> dict[str, Any]:
    """:func:`tracked` at each edge of :func:`edges_at_seed_0` (s = 0 and 2 quick; 0, 1, 2),
    at :data:`POINTS` evaluations over the regime's steps, and whether the run finished (its
    curve reaches the last step)."""
    steps, edges = edges_at_seed_0(store, task, (0.0, 2.0) if quick else (0.0, 1.0, 2.0))
    every = max(1, steps // (POINTS[quick] - 1))
    out: dict[str, Any] = {"steps": steps, "every": every, "methods": {}}
    done: dict[tuple, list] = {}
    for (method, s), (strength, edge) in sorted(edges.items()):
        # a balanced start without fixing trains the same network from every s of one orbit
        same = METHODS[method].balanced_start and METHODS[method].fixing is None
        key = (method, strength, edge, None if same else s)
        curve = done[key] = done.get(key) or tracked(task, method, strength, edge, s, steps, every)
        out["methods"].setdefault(method, {})[s_key(s)] = {
            "strength": strength,
            "edge": edge,
            "curve": curve,
            "finished": bool(curve) and curve[-1][0] == steps,
        }
    return out


def edges_at_seed_0(
    store: Store, task: Task, s_values: tuple[float, ...]
) -> tuple[int, dict[tuple[str, float], tuple[float, float]]]:
    """The steps of the task's full-batch GD regime (its longest) and, per method of
    :data:`TRACKED` and ``s``, its best strength and seed 0's largest stable rate, the low end
    of its bisected bracket (where it has one: a seed with no stable rate, or stable up to the
    highest rate it ran, whose edge is only a lower bound, is left out)."""
    runs = store.runs(task=task.name, optimizer="gd", batch_size=0)
    if (found := longest_full_batch(runs, TaskSpec(task.name).hash())) is None:
        return 0, {}
    regime, regime_runs = found
    chosen = [r for r in stability.at_best_strength(regime_runs) if r.config.seed == 0]
    out = {}
    for (method, s), cell in group(chosen, lambda c: (c.method, c.s)).items():
        edge, above = stability.edge_bracket(cell)
        if method in TRACKED and s in s_values and above is not None:
            out[(method, s)] = (cell[0].config.strength, edge)
    return regime.steps, out


def tracked(
    task: Task, method: str, strength: float, lr: float, s: float, steps: int, every: int
) -> list[tuple[int, float, float]]:
    """``(step, loss, lambda_max)`` every ``every`` steps and at the last step of full-batch GD
    at ``lr`` on the task's float64 network (seed 0) from the initialisation moved by ``s z``,
    each step the sweep's for ``method`` at ``strength`` (:func:`group_step`; a balanced start by
    :func:`balance_runs_`); ``lambda_max`` by :func:`gaugefix.sharpness`. Ends where the run
    diverged as the sweep says: a loss not finite or above :data:`DIVERGENCE_FACTOR` times the
    initial one, so the curve of a run that finished ends at ``steps``, of one that diverged
    before (empty where it was not finite at step 0). ``every``: an integer ``>= 1`` (else
    ``ValueError``)."""
    check_every(every)
    model, structure = float64_model(task)
    gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
    x, y, _, _ = task.arrays(torch.float64)
    stack = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()}  # views of model
    if METHODS[method].balanced_start:
        balance_runs_(structure, stack, torch.tensor([True]), None)
    config = RunConfig(task.name, method, "gd", lr, strength, s, 0, 0, steps, "float64",
                       task_hash=task_hash(task))  # fmt: skip
    step_fn = group_step(
        structure, [config], "gd", torch.tensor([lr], dtype=torch.float64), torch.tensor([True])
    )
    state = step_fn.init(stack)
    curve = []
    initial = task.loss(model(x), y).item()
    for step in range(steps + 1):
        loss = task.loss(model(x), y)
        value = loss.item()
        if not (math.isfinite(value) and value <= DIVERGENCE_FACTOR * initial):
            break  # a NaN, or an infinite initial loss, included
        if step % every == 0 or step == steps:
            curve.append((step, value, float(sharpness(model, task.loss, x, y))))
        if step == steps:
            break
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            _, state = step_fn.update(
                {n: g.unsqueeze(0) for n, g in zip(stack, grads, strict=True)}, state, stack
            )
    return curve


def _predicted_edge(top: float) -> float | None:
    """The edge of gradient descent on the quadratic model of Hessian top eigenvalue ``top``:
    ``2 / top`` (0 for an infinite ``top``); ``None`` where ``top`` is not ``> 0`` (no step
    rate is predicted: every rate is stable, or none)."""
    return 2 / top if top > 0 else None


def _ratio(measured: float, predicted: float | None) -> float | None:
    """``measured / predicted``; ``None`` where no positive edge is predicted."""
    return measured / predicted if predicted else None


def summarize(values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task, method and s: the strength, the measured and predicted edges and the last
    sharpness tracked."""
    return {
        task: {
            method: {
                s: EdgeSharpness(
                    strength=r["strength"],
                    measured_edge=r["edge"],
                    predicted_edge=_predicted_edge(r["curve"][0][2]),
                    final_sharpness=r["curve"][-1][2],
                )
                for s, r in by_s.items()
                if r["curve"]
            }
            for method, by_s in v["methods"].items()
        }
        for task, v in sorted(values.items())
    }


def render(out: Path, values: dict[str, dict[str, Any]]) -> str:
    summary = summarize(values)
    panels = [(task, s) for task, v in sorted(values.items()) for s in _s_values(v)]
    if not panels:
        return ""
    fig, axes = subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False,
                         layout="constrained")  # fmt: skip
    lines = []
    for ax, (task, s) in zip(axes[0], panels, strict=True):
        for method, by_s in values[task]["methods"].items():
            if s in by_s:
                e = summary[task].get(method, {}).get(s)  # none for an empty curve
                lines.append(
                    _draw(ax, values[task], method, by_s[s], e, f"- {task}, s = {float(s):g}")
                )
        ax.set_title(f"{task}, s = {float(s):g}", fontsize=9)
        label(ax, "step", "lambda_max (dotted: 2 / lr)", legend=6)
    name = save(fig, out, "sharpness-at-edge.png")
    return (
        "## Sharpness at the edge\n\nEach method trained by full-batch GD at its own measured "
        "edge (seed 0's largest stable rate, the stable end of its bisected bracket; each at "
        "its best strength), the largest Hessian "
        "eigenvalue of the training loss tracked (Lanczos). Gradient descent on a quadratic "
        "is stable below 2/lambda_max, so the edge predicted from the start is "
        "2/lambda_max(0); a method whose measured edge is far above it survives a start "
        "sharper than its rate allows (the sharpness must fall during training).\n\n"
        + "\n".join(lines)
        + f"\n\n![sharpness at the edge]({name})"
    )


def _draw(
    ax: Any,
    value: dict[str, Any],
    method: str,
    r: dict[str, Any],
    e: EdgeSharpness | None,
    head: str,
) -> str:
    """Draw one method's entry ``r`` of ``value`` on ``ax``: its curve, 2 / its edge dotted and
    a cross where the run diverged; returns its line of the text (starting with ``head``), with
    ``e``, its summary (``None`` for an empty curve)."""
    pts = r["curve"]
    if not pts:  # the loss was not finite, or diverged, at step 0: nothing to draw
        return f"{head}, {method}: measured edge {fmt(r['edge'])}; the run diverged at step 0."
    color = method_color(method)
    ax.semilogy([p[0] for p in pts], [p[2] for p in pts], "o-", ms=3, color=color,
                label=f"{method} (lr {fmt(r['edge'])})")  # fmt: skip
    ax.axhline(2 / r["edge"], color=color, ls=":", lw=1)
    ended = _ended(value, r)
    if ended:  # the run diverged: a cross ends its curve
        ax.semilogy(pts[-1][0], pts[-1][2], "x", ms=7, color=color)
    return (
        f"{head}, {method}: measured edge {fmt(e['measured_edge'])}, "
        f"predicted 2/lambda_max(0) {fmt(e['predicted_edge'])} (measured/predicted "
        f"{fmt(_ratio(e['measured_edge'], e['predicted_edge']))}); lambda_max "
        f"{fmt(pts[0][2])} at step 0, {fmt(e['final_sharpness'])} at step {pts[-1][0]}"
        + ended
        + "."
    )


def _ended(value: dict[str, Any], r: dict[str, Any]) -> str:
    """Where the run of the entry ``r`` of ``value`` diverged (``r["finished"]`` false), said
    so, with the step its curve would have gone on to."""
    if r["finished"]:
        return ""
    last = r["curve"][-1][0]
    return (
        f" (the run diverged before step {min(last + value['every'], value['steps'])}; "
        "a cross ends its curve)"
    )


def _s_values(value: dict[str, Any]) -> list[str]:
    return sorted({s for by_s in value["methods"].values() for s in by_s}, key=float)
