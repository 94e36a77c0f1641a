"""Dose-response: the relaxation strength of the penalty and of the exact step swept over four
decades on full-batch GD from an imbalanced start, each seed's bisected stable edge (relative to
plain's) against the relaxation time of the imbalance relative to the steps plain takes to
diverge at that rate. If continuous relaxation causes stability, both methods follow one
monotone curve. Stored per task under ``dose/TASK``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypedDict

import torch
from scipy.stats import spearmanr

import gaugefix
from gaugefix.diagnostics import relaxation_rates
from gaugefix.experiments.cells import MethodKey, TaskKey, group
from gaugefix.experiments.engine import RunConfig, RunResult, init_direction, train_group
from gaugefix.experiments.figures import fmt, label, method_color, save, subplots, task_style
from gaugefix.experiments.plan import (
    BISECTION_ROUNDS,
    COARSE,
    QUICK_BISECTION_ROUNDS,
    bisection_runs,
    cell_of,
    lr_grid,
)
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.stability import stable_edges
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task

__all__ = [
    "KEY",
    "READS_RUNS",
    "VERSION",
    "S",
    "SWEPT",
    "SHARED_RHO",
    "SHARED_SLACK",
    "Dose",
    "SUMMARY",
    "strengths",
    "compute",
    "slowest_rate",
    "tau_relax",
    "edges",
    "shared_curve",
    "summarize",
    "render",
]

KEY = "dose"
# compute trains and bisects its own runs (never stored) and reads no run of the store:
# computed beside the sweep
READS_RUNS = False
# The version of what compute gives: raised when a change alters it, so stored values of
# older versions are computed again.
VERSION = 3  # 2: every mode of K searched; 3: the lower bounds marked
S = 2.0  # the initial imbalance
SWEPT = ("penalty", "exact")
# One monotone curve is shared when the pooled Spearman correlation of edge ratio against
# tau_relax / t_diverge is at most SHARED_RHO and no more than SHARED_SLACK above (weaker than)
# the weakest of the per-method ones: a second curve would break the pooled ranking.
SHARED_RHO = -0.8
SHARED_SLACK = 0.1
# The grid, as exponents of sqrt(2) (lr_grid), from below plain's edge at s = 2 to above a
# balanced start's (to 1 in the quick run), every COARSE-th (ratio 2) as in the full grid.
LR_RANGE = (-16, 2)
QUICK_LR_RANGE = (-16, 0)


class _Dose(TypedDict):
    steps: int
    seeds: int
    rho: Annotated[
        dict[MethodKey, float | None], "Spearman of edge ratio vs tau ratio, per method, pooled"
    ]
    shared: Annotated[bool | None, "one monotone curve shared by penalty and exact"]
    excluded: Annotated[int, "points without a stable rate or where plain did not diverge there"]


class Dose(_Dose, total=False):
    """One task's ``dose`` entry (:func:`summarize`); ``lower_bounds`` only where some point
    kept is one."""

    lower_bounds: Annotated[int, "points kept whose edge is only a lower bound (the grid's top)"]


SUMMARY = dict[TaskKey, Dose]


def strengths(quick: bool) -> tuple[float, ...]:
    """0.01 to 100: every half decade, or every two decades quick."""
    return (0.01, 1.0, 100.0) if quick else tuple(10 ** (k / 2) for k in range(-4, 5))


def compute(store: Store, task: Task, quick: bool) -> dict[str, Any]:
    """Per seed (1 quick, 5): the edges of plain and of each method and strength
    (:func:`edges`, 100 or 150 steps), whether each is only a lower bound (stable up to the
    grid's top: not bisected), plain's divergence step at each method's edge and the slowest
    relaxation rate at the start."""
    steps, seeds = (100, 1) if quick else (150, 5)
    top = max(_grid(quick))
    points = []
    for seed in range(seeds):
        instance = TaskSpec(task.name).for_seed(seed)
        found, diverged = edges(instance, seed, strengths(quick), steps, quick)
        rate = slowest_rate(*_start(instance.load(), seed))
        for (method, strength), edge in found.items():
            points.append({
                "seed": seed, "method": method, "strength": strength, "edge": edge,
                "plain_edge": found[("plain", 0.0)], "rate": rate,
                "t_diverge": diverged.get((method, strength)), "lower_bound": edge >= top,
            })  # fmt: skip
    return {"steps": steps, "seeds": seeds, "s": S, "points": points}


def slowest_rate(model: torch.nn.Module, structure: gaugefix.GaugeStructure) -> float:
    """The slowest rate ``2 k_i`` (strength 1) of the linearized relaxation
    ``d mu/dt = -2 strength K mu`` at ``model``'s parameters, over the modes of ``K`` carrying
    at least 1% of ``||mu||`` (:func:`gaugefix.relaxation_rates`): the time the imbalance takes
    to relax is the slowest significant mode's. Every mode is computed (dense ``eigh``): the
    slowest significant one can lie inside the spectrum."""
    pred = relaxation_rates(model, structure, 1.0, dense_limit=structure.num_generators)
    mu = gaugefix.imbalance(model, structure).detach()
    c = pred.modes.T @ mu
    return float(pred.rates[c.abs() >= 0.01 * mu.norm()].min())


def _start(task: Task, seed: int) -> tuple[torch.nn.Module, gaugefix.GaugeStructure]:
    """The task's float64 network for ``seed`` moved by ``S z`` along its orbit."""
    model, structure = float64_model(task, seed)
    gaugefix.apply_gauge_(model, structure, S * init_direction(structure))
    return model, structure


def tau_relax(lr: float, strength: float, rate: float) -> float:
    """The relaxation time of the slowest mode in steps: ``1 / (lr * strength * rate)`` (a GD
    step at ``lr`` is time ``lr``, and both the penalty and the exact orbit step relax ``mu``
    as ``mu <- (I - 2 lr strength K) mu`` to first order)."""
    return 1.0 / (lr * strength * rate)


def edges(
    instance: TaskSpec, seed: int, swept: tuple[float, ...], steps: int, quick: bool
) -> tuple[dict[tuple[str, float], float], dict[tuple[str, float], int | None]]:
    """One seed's bisected stable edges of plain and of each method of :data:`SWEPT` at each
    strength of ``swept`` (full-batch GD from ``S z``, the sweep's engine and bisection), and
    plain's divergence step at each method's edge (``None`` where it did not diverge)."""
    task = instance.load()
    lrs = _grid(quick)
    cells = [("plain", 0.0)] + [(m, st) for m in SWEPT for st in swept]

    def config(method: str, strength: float, lr: float, bisection: int = 0) -> RunConfig:
        return RunConfig(task.name, method, "gd", lr, strength, S, seed, 0, steps,
                         task_hash=instance.hash(), bisection=bisection)  # fmt: skip

    runs: list[RunResult] = train_group(task, [config(m, st, lr) for m, st in cells for lr in lrs])
    rounds = QUICK_BISECTION_ROUNDS if quick else BISECTION_ROUNDS
    wanted = {cell_of(r.config) for r in runs}
    while todo := bisection_runs(runs, wanted, rounds):
        runs += train_group(task, todo)
    found = {
        (m, st): stable_edges(rs).get(seed, 0.0)
        for (m, st), rs in group(runs, lambda c: (c.method, c.strength)).items()
    }
    at = [(cell, lr) for cell, lr in found.items() if cell[0] != "plain" and lr > 0]
    plain = train_group(task, [config("plain", 0.0, lr) for _, lr in at]) if at else []
    return found, {cell: r.diverged_at for (cell, _), r in zip(at, plain, strict=True)}


def _grid(quick: bool) -> list[float]:
    """The learning rates of the grid (:data:`LR_RANGE`, quick :data:`QUICK_LR_RANGE`)."""
    return lr_grid(*(QUICK_LR_RANGE if quick else LR_RANGE), COARSE)


def _kept(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of the methods where plain diverged at the method's edge."""
    return [p for p in points if p["method"] != "plain" and p["t_diverge"] and p["plain_edge"]]


def _bounds(points: list[dict[str, Any]]) -> list[bool]:
    """Whether the edge of each of the :func:`_kept` points is only a lower bound (stable up to
    the grid's top; its edge ratio a lower bound, its ``tau_relax`` an upper one); a point
    without the mark (made by hand) is not one."""
    return [p.get("lower_bound", False) for p in _kept(points)]


def _xy(points: list[dict[str, Any]]) -> tuple[list[float], list[float], list[str]]:
    """``tau_relax / t_diverge`` and ``edge / plain's edge`` of the points where plain diverged
    at the method's edge, and their methods."""
    kept = _kept(points)
    x = [tau_relax(p["edge"], p["strength"], p["rate"]) / p["t_diverge"] for p in kept]
    return x, [p["edge"] / p["plain_edge"] for p in kept], [p["method"] for p in kept]


def _of(method: str, x: list[float], y: list[float], methods: list[str]) -> tuple[list, list]:
    """The points of ``method``."""
    mine = [(a, b) for a, b, m in zip(x, y, methods, strict=True) if m == method]
    return [a for a, _ in mine], [b for _, b in mine]


def _rho(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation; ``None`` for fewer than three points or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def shared_curve(x: list[float], y: list[float], methods: list[str]) -> tuple[dict, bool | None]:
    """Spearman's rho of ``y`` against ``x`` per method and pooled (key ``"pooled"``), and
    whether one monotone curve is shared: the pooled rho at most :data:`SHARED_RHO` and within
    :data:`SHARED_SLACK` of the weakest per-method one (``None`` where a rho is not defined)."""
    rho = {m: _rho(*_of(m, x, y, methods)) for m in SWEPT}
    rho["pooled"] = _rho(x, y)
    if any(v is None for v in rho.values()):
        return rho, None
    weakest = max(rho[m] for m in SWEPT)
    return rho, rho["pooled"] <= SHARED_RHO and rho["pooled"] <= weakest + SHARED_SLACK


def summarize(values: dict[str, dict[str, Any]]) -> dict[str, Dose]:
    """Per task: the rank correlations, whether one curve is shared, the points left out and
    the lower bounds among those kept (in the correlations as their values)."""
    out = {}
    for task, v in sorted(values.items()):
        x, y, methods = _xy(v["points"])
        rho, shared = shared_curve(x, y, methods)
        swept = [p for p in v["points"] if p["method"] != "plain"]
        out[task] = Dose(steps=v["steps"], seeds=v["seeds"], rho=rho, shared=shared,
                         excluded=len(swept) - len(x))  # fmt: skip
        if bounds := sum(_bounds(v["points"])):
            out[task]["lower_bounds"] = bounds
    return out


def render(out: Path, values: dict[str, dict[str, Any]]) -> str:
    summary = summarize(values)
    fig, ax = subplots(1, 1, figsize=(5.5, 4), layout="constrained")
    lines = []
    for i, (task, v) in enumerate(sorted(values.items())):
        x, y, methods = _xy(v["points"])
        marker, _ = task_style(i)
        for m in SWEPT:
            ax.loglog(*_of(m, x, y, methods), marker, ms=4, ls="none", color=method_color(m),
                      label=f"{task}: {m}")  # fmt: skip
        _draw_bounds(ax, task, x, y, _bounds(v["points"]))
        e = summary[task]
        judged = {True: "one monotone curve is shared", False: "no shared monotone curve",
                  None: "could not be judged"}[e["shared"]]  # fmt: skip
        rhos = ", ".join(f"{k} {fmt(r)}" for k, r in e["rho"].items())
        swept = sorted({p["strength"] for p in v["points"] if p["method"] != "plain"})
        lines.append(
            f"- {task}, full-batch GD, {e['steps']} steps from s = {v['s']:g}, {e['seeds']} "
            f"seed(s), strengths {', '.join(fmt(st) for st in swept)}: "
            f"Spearman rho {rhos}: **{judged}** ({e['excluded']} points left out: no stable "
            f"rate, or plain did not diverge at the method's edge)"
            + _bounds_text(e.get("lower_bounds", 0))
        )
    label(ax, "tau_relax / t_diverge (plain)", "edge / plain's edge")
    name = save(fig, out, "dose-response.png")
    return (
        "## Dose-response\n\nThe strength of the penalty and of the exact step swept over four "
        "decades; each seed's bisected stable edge over plain's (same seed) against the "
        "relaxation time of the imbalance at that edge, `tau_relax = 1 / (lr * strength * "
        "2 k_min)` steps (`k_min` the smallest eigenvalue of the generators' Gram matrix K "
        "among the modes carrying 1% of the initial imbalance: the linearized relaxation "
        "`mu <- (I - 2 lr strength K) mu`), relative to the step at which plain diverges at "
        f"the same rate. One monotone curve is judged shared when the pooled Spearman rho is "
        f"at most {SHARED_RHO} and within {SHARED_SLACK} of the weaker per-method one.\n\n"
        + "\n".join(lines)
        + f"\n\n![dose-response]({name})"
    )


def _draw_bounds(ax: Any, task: str, x: list, y: list, bounds: list[bool]) -> None:
    """An open triangle around each point whose edge is a lower bound (``bounds``: per point
    of ``x`` and ``y``)."""
    at = [(a, b) for a, b, bound in zip(x, y, bounds, strict=True) if bound]
    if at:
        ax.loglog(*zip(*at, strict=True), "^", ms=9, mfc="none", ls="none", color="0.4",
                  label=f"{task}: lower bound (stable up to the grid's top)")  # fmt: skip


def _bounds_text(count: int) -> str:
    """The end of a task's line: how many of its points kept are lower bounds."""
    if not count:
        return "."
    return (
        f"; {count} of the points kept are lower bounds (stable up to the grid's top, open "
        "triangles: the edge ratio at least, tau_relax at most the value drawn)."
    )
