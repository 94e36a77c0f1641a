"""The start of min-sharpness-init, recorded: per seed, the largest Hessian eigenvalue of the
training loss at the initialisation as given, at its balanced point and at the point of its orbit
:func:`~gaugefix.experiments.engine.min_sharpness_start` finds (the sweep's runs of
``min-sharpness-init`` start there), with the change of the network's outputs. Stored per task
under ``min-sharpness/TASK``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypedDict

import torch

import gaugefix
from gaugefix.diagnostics import sharpness
from gaugefix.experiments.cells import SeedKey, TaskKey
from gaugefix.experiments.engine import min_sharpness_start
from gaugefix.experiments.figures import fmt
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task

__all__ = ["KEY", "READS_RUNS", "VERSION", "SEEDS", "QUICK_SEEDS", "SharpnessStartRecord",
           "SUMMARY", "compute", "record", "summarize", "render"]  # fmt: skip

KEY = "min-sharpness"
# compute starts from its own networks and reads no run of the store: computed beside the sweep
READS_RUNS = False
# The version of what compute gives: raised when a change alters it, so stored values of
# older versions are computed again.
VERSION = 1
SEEDS = 3  # seeds recorded in the full reproduction (each on its own task instance)
QUICK_SEEDS = 1


class SharpnessStartRecord(TypedDict):
    """One seed's start of min-sharpness-init (:func:`record`)."""

    given: Annotated[float, "lambda_max at the initialisation as given (s = 0)"]
    balanced: Annotated[float, "lambda_max at its balanced point, where the L-BFGS starts"]
    found: Annotated[float, "lambda_max at the point min-sharpness-init starts from"]
    iterations: Annotated[int, "L-BFGS iterations"]
    converged: Annotated[bool, "the L-BFGS reached its gradient tolerance"]
    function_change: Annotated[
        float, "largest change of the outputs on the training inputs over their largest size"
    ]


# The ``min-sharpness`` entry of ``summary.json`` (:func:`summarize`).
SUMMARY = dict[TaskKey, dict[SeedKey, SharpnessStartRecord]]


def record(task: Task, hash_: str, seed: int) -> SharpnessStartRecord:
    """The start of min-sharpness-init for ``seed`` on ``task`` (the instance of hash
    ``hash_``), in float64: lambda_max as given, balanced and found, and how much the outputs
    moved from the initialisation as given to the point found."""
    model, structure = float64_model(task, seed)
    x, y, _, _ = task.arrays(torch.float64)
    start = min_sharpness_start(task, structure, hash_, seed)
    before = model(x).detach()
    given = sharpness(model, task.loss, x, y).value
    gaugefix.apply_gauge_(model, structure, start.h)
    after = model(x).detach()
    return SharpnessStartRecord(
        given=given,
        balanced=start.balanced,
        found=start.found,
        iterations=start.iterations,
        converged=start.converged,
        function_change=float((after - before).abs().max() / before.abs().max()),
    )


def compute(store: Store, task: Task, quick: bool) -> dict[str, Any]:
    """:func:`record` for seeds ``0..`` :data:`SEEDS` (:data:`QUICK_SEEDS` quick), each on its
    own task instance as the sweep's runs of that seed."""
    out = {}
    for seed in range(QUICK_SEEDS if quick else SEEDS):
        spec = TaskSpec(task.name).for_seed(seed)
        out[str(seed)] = record(spec.load(), spec.hash(), seed)
    return {"seeds": out}


def summarize(values: dict[str, dict[str, Any]]) -> dict[str, dict[str, SharpnessStartRecord]]:
    """Per task, each seed's record."""
    return {task: v["seeds"] for task, v in sorted(values.items())}


def render(out: Path, values: dict[str, dict[str, Any]]) -> str:
    """The section: one table row per task and seed."""
    rows = [
        "| task | seed | as given | balanced | found | L-BFGS iterations | output change |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, seeds in summarize(values).items():
        for seed, r in seeds.items():
            its = f"{r['iterations']}" + ("" if r["converged"] else " (not converged)")
            rows.append(
                f"| {task} | {seed} | {fmt(r['given'])} | {fmt(r['balanced'])} | "
                f"{fmt(r['found'])} | {its} | {r['function_change']:.1e} |"
            )
    return (
        "## The start of min-sharpness-init\n\nThe largest Hessian eigenvalue of the training "
        "loss (Lanczos, float64) at the initialisation as given (s = 0), at its balanced point "
        "and at the point of its orbit that min-sharpness-init starts from (L-BFGS on the "
        "gauge from the balanced point), and the largest change of the outputs over their "
        "largest size (the gauge keeps the function: rounding only).\n\n" + "\n".join(rows)
    )
