"""The realistic tasks (:data:`~gaugefix.experiments.tasks.REALISTIC`): per regime, method and
strength, at PyTorch's default initialisation (s = 0), each seed's bisected stable edge and the
validation loss at the method's best-tuned learning rate."""

from __future__ import annotations

import math
import statistics
from typing import Annotated, Any, TypedDict

from gaugefix.experiments.cells import (
    MethodKey,
    Regime,
    RegimeKey,
    Runs,
    SeedKey,
    TaskKey,
    by_regime,
    by_task,
    group,
    median,
    median_of_every_seed,
    number_text,
)
from gaugefix.experiments.figures import fmt, methods_in_order
from gaugefix.experiments.stability import bounded, on_grid, stable_edges
from gaugefix.experiments.tasks import REALISTIC

__all__ = [
    "DEFINITION",
    "Tuned",
    "Realistic",
    "CellTops",
    "best_lr",
    "tuned",
    "summarize",
    "table",
    "grid_top",
    "render",
]

DEFINITION = (
    "Per method and strength, at s = 0: each seed's bisected stable edge (as defined above), and "
    "the validation loss (the loss on the task's held-out split) at the method's *best-tuned* "
    "learning rate: the grid rate with the lowest median validation loss over the seeds, among "
    "the rates at which every seed ran and none diverged (the smaller rate on ties). The rate "
    "is tuned on the same seeds whose losses are reported, alike for every method, so the "
    "losses are each method's best on these seeds, not held-out estimates."
)


class Tuned(TypedDict):
    """One method at one strength in one regime of a realistic task, s = 0 (:func:`tuned`)."""

    strength: float
    stable_edge_by_seed: Annotated[dict[SeedKey, float], "each seed's bisected stable edge"]
    best_lr: Annotated[
        float | None,
        "the grid rate with the lowest median validation loss over seeds (none diverged)",
    ]
    val_loss_by_seed: Annotated[dict[SeedKey, float], "each seed's validation loss at best_lr"]
    val_loss: Annotated[float | None, "their median"]


# Per realistic task and regime, each method's entries, one per strength it was run at.
Realistic = dict[TaskKey, dict[RegimeKey, dict[MethodKey, list[Tuned]]]]
# Per method and strength of one regime, the grid top of its cell (at s = 0): an edge at or
# above it is a lower bound.
CellTops = dict[tuple[MethodKey, float], float]


def best_lr(cell: Runs) -> float | None:
    """The grid rate of ``cell`` (one method and strength, s = 0) with the lowest median
    validation loss over seeds, among the rates where every seed of the cell ran and has one
    (none diverged, none NaN); the smaller on ties; ``None`` where no rate qualifies."""
    grid = on_grid(cell)
    seeds = {r.config.seed for r in grid}
    losses = {
        lr: [r.test_loss for r in rs]
        for (lr,), rs in group(grid, lambda c: (c.lr,)).items()
        if {r.config.seed for r in rs} == seeds
    }
    medians = {lr: median_of_every_seed(v) for lr, v in losses.items()}
    finished = {lr: m for lr, m in medians.items() if m is not None}
    return min(finished, key=lambda lr: (finished[lr], lr)) if finished else None


def tuned(cell: Runs) -> Tuned:
    """The :class:`Tuned` entry of one method at one strength (``cell``: its runs at s = 0,
    grid and bisection)."""
    lr = best_lr(cell)
    at_best = {
        str(r.config.seed): r.test_loss
        for r in sorted(on_grid(cell), key=lambda r: r.config.seed)  # in seed order, as the edges
        if r.config.lr == lr and r.test_loss is not None
    }
    return Tuned(
        strength=cell[0].config.strength,
        stable_edge_by_seed={str(k): v for k, v in stable_edges(cell).items()},
        best_lr=lr,
        val_loss_by_seed=at_best,
        val_loss=median(list(at_best.values())),
    )


def summarize(runs: Runs) -> Realistic:
    """The ``realistic`` entry of ``summary.json``: :func:`tuned` for every method and strength
    of every regime of the realistic tasks among ``runs`` (at s = 0)."""
    out: Realistic = {}
    for task, task_runs in by_task(runs).items():
        if task_runs[0].config.task not in REALISTIC:  # its name, not its key (NAME@VERSION)
            continue
        out[task] = {}
        for regime, regime_runs in by_regime(task_runs).items():
            at_zero = [r for r in regime_runs if r.config.s == 0.0]
            cells = group(at_zero, lambda c: (c.method, c.strength))
            entry: dict[str, list[Tuned]] = {}
            for (method, _), cell in cells.items():
                entry.setdefault(method, []).append(tuned(cell))
            out[task][regime.key] = entry
    return out


def _seeds_text(values: dict[str, float], top: float = math.inf) -> str:
    """``0.012 (0.011, 0.012, 0.013)``: the median, then each seed's value; ``≥`` before a
    value at the grid's ``top`` (a lower bound), and before the median where the upper of its
    middle values is one (raising it would raise the median)."""
    if not values:
        return "n/a"
    shown = ", ".join(bounded(v, top) for v in values.values())
    middle = sorted(values.values())[len(values) // 2]
    bound = "≥ " if middle >= top else ""
    return f"{bound}{fmt(statistics.median(values.values()))} ({shown})"


def table(methods: dict[str, list[Tuned]], top: float | CellTops = math.inf) -> str:
    """One regime's table: per method and strength, the stable edge (``≥``: stable up to the
    grid's ``top``, one for the regime or per method and strength, a lower bound; none marked
    without it), the best-tuned learning rate and the validation loss there (medians, then each
    seed's)."""
    rows = [
        "| method | strength | stable edge: median (per seed) | best-tuned lr | "
        "validation loss: median (per seed) |",
        "|---|---|---|---|---|",
    ]
    for method in methods_in_order(methods):
        for t in methods[method]:
            strength = number_text(t["strength"]) if t["strength"] else ""
            cell_top = top[(method, t["strength"])] if isinstance(top, dict) else top
            rows.append(
                f"| {method} | {strength} | {_seeds_text(t['stable_edge_by_seed'], cell_top)} | "
                f"{fmt(t['best_lr'])} | {_seeds_text(t['val_loss_by_seed'])} |"
            )
    return "\n".join(rows)


def grid_top(tasks: dict[str, Any], task: str, key: str) -> float:
    """The highest grid rate of a task's regime in the summary's ``tasks`` (an edge there is a
    lower bound): what a summary alone knows, each cell's grid top in a complete store (where
    every cell ran the regime's whole grid), above some cell's in an interrupted one."""
    return max(tasks[task]["regimes"][key]["lr_grid"])


def render(
    entry: dict[str, Any],
    tasks: dict[str, Any],
    tops: dict[TaskKey, dict[RegimeKey, CellTops]] | None = None,
) -> str:
    """The report's section on the realistic tasks (``entry``: the summary's ``realistic``;
    ``tasks``: its ``tasks``; ``tops``: per task and regime, each cell's grid top, which marks
    the lower bounds; none: a summary alone, each regime's :func:`grid_top`)."""
    if not entry:
        return ""
    parts = [f"## Realistic models at PyTorch's default initialisation\n\n{DEFINITION}"]
    for task, regimes in entry.items():
        for key, methods in regimes.items():
            top = tops[task][key] if tops is not None else grid_top(tasks, task, key)
            parts.append(f"### {task}: {Regime.parse(key).label}\n\n" + table(methods, top))
    parts.append(
        "The verdicts on these edges (each method against plain and against balanced-init, at "
        "its best strength) are in each task's section below."
    )
    return "\n\n".join(parts)
