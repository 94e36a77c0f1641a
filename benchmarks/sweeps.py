"""Item 4: the quick reproduction's grid (runs only) batched against the same runs one after
another, and identical results in float64.

Running the whole grid one run after another would take too long for the suite, so a fixed
subset is timed on both sides: every ``STRIDE``-th run of every group of the grid (task,
optimizer, batch size, steps; at least one run per group), so the groups keep their
proportions. The batched side trains the subset as the runner batches it (one batch per group
here), so its batches are ``STRIDE`` times smaller than the full grid's.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import paired, ratio, summary
from gaugefix.experiments import engine, plan, runner
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.store import Store

STRIDE = 8


def spec_of(config: RunConfig) -> runner.TaskSpec:
    return runner.TaskSpec(config.task)


def subset(configs: list[RunConfig], stride: int) -> list[RunConfig]:
    """Every ``stride``-th run of every group (sorted by key), starting with the first."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in sorted(configs, key=lambda c: c.key()):
        groups.setdefault(c.group(), []).append(c)
    return [c for runs in groups.values() for c in runs[::stride]]


def tiny_grid() -> list[RunConfig]:
    """A few short runs of two groups, for the smoke test."""
    runs = []
    for optimizer, batch in (("gd", 0), ("sgd", 16)):
        for lr in (0.01, 0.1):
            for method, strength in (("plain", 0.0), ("exact", 1.0), ("penalty", 0.1)):
                runs.append(
                    RunConfig(
                        "teacher-student",
                        method,
                        optimizer,
                        lr,
                        strength,
                        1.0,
                        0,
                        batch,
                        5,
                        task_hash=runner.TaskSpec("teacher-student").hash(),
                    )
                )
    return runs


def _run_into_store(configs: list[RunConfig], batched: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runner.run_all(Store(Path(tmp) / "runs.sqlite"), configs, spec_of, 1, batched)


def identical(configs: list[RunConfig]) -> dict:
    """Train ``configs`` in float64 batched and one by one; compare statuses and final losses."""
    wide = [dataclasses.replace(c, dtype="float64") for c in configs]
    together = {}
    for batch in runner.batches(wide, spec_of, True):
        together.update({r.config: r for r in engine.train_group(spec_of(batch[0]).load(), batch)})
    worst, statuses_equal = 0.0, True
    for c in wide:
        (alone,) = engine.train_group(spec_of(c).load(), [c])
        both = together[c]
        statuses_equal &= alone.status == both.status
        if alone.final_loss is not None and both.final_loss is not None:
            rel = abs(alone.final_loss - both.final_loss) / max(abs(alone.final_loss), 1e-300)
            worst = max(worst, rel)
        elif (alone.final_loss is None) != (both.final_loss is None):
            statuses_equal = False
    return {
        "runs": len(wide),
        "max_rel_final_loss_difference": worst,
        "same_statuses": statuses_equal,
        "identical": statuses_equal and worst <= 1e-6,
    }


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    if tiny:
        grid, chosen, pairs = tiny_grid(), tiny_grid(), 2
    else:
        grid = [
            c
            for g in plan.reproduce_grids(quick=True)
            for c in g.configs(runner.TaskSpec(g.task).hash())
        ]
        chosen, pairs = subset(grid, STRIDE), 5
    for c in chosen:
        spec_of(c).load()  # load (and cache) every task before timing
    times = paired(
        {
            "batched": lambda: _run_into_store(chosen, True),
            "sequential": lambda: _run_into_store(chosen, False),
        },
        pairs,
        warmup=0,
    )
    same = identical(chosen)
    batches = runner.batches(chosen, spec_of, True)
    row = {
        "grid_runs": len(grid),
        "timed_runs": len(chosen),
        "batches": [len(b) for b in batches],
        "pairs": pairs,
        "batched": summary(times["batched"]),
        "sequential": summary(times["sequential"]),
        "batched_per_run_s": summary(times["batched"])["median_s"] / len(chosen),
        "sequential_per_run_s": summary(times["sequential"])["median_s"] / len(chosen),
        "speedup": ratio(times["sequential"], times["batched"]),
        "float64": same,
    }
    log(
        f"  {len(chosen)} of {len(grid)} runs: batched {row['batched']['median_s']:.1f} s, "
        f"one by one {row['sequential']['median_s']:.1f} s: {row['speedup']:.2f}x; float64 "
        f"identical: {same['identical']} (max rel. difference "
        f"{same['max_rel_final_loss_difference']:.1e}, same statuses {same['same_statuses']})"
    )
    return row
