"""Item 4: the quick reproduction's grid (its runs), batched as the runner batches it, against
the same runs one after another; and batched = one by one in float64.

The batched side trains the whole grid through the runner into a fresh store, the one-by-one
side every run of it alone (:data:`PAIRS` rounds each, alternating); both train in this process
with one intra-op thread, as every sweep worker does (``--threads`` does not apply). Every run is
timed alone, not a sample of them: what a run costs alone depends on its method (hard balancing
at every step costs several times a plain step), on where it diverges (a run stops there: at step
5 of 1000 for the quick grid's largest rates, 0.01 s against 0.65 s) and on what ran before it in
the process, and a sample weighted by method misstated the whole grid's one-by-one time by 12%
and single groups' by 0.68 to 1.49 times. The seconds the stores record give every group's own
speed-up as well.

Float64: a sample, in every group every ``stride``-th run of each method's runs (``stride`` the
greatest common divisor of the group sizes), is trained batched (in the sample's batches) and
one by one. A run whose
final losses differ by more than ``TOLERANCE`` (relative) is trained alone once more from an
initial imbalance larger by ``NUDGE`` (for the methods that start balanced, the same start in
exact arithmetic); when that moves its own final loss by more than ``TOLERANCE`` too, its result
is fixed only up to rounding, and it is reported apart from the runs the identity is claimed for.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import paired, ratio, summary
from gaugefix.experiments import engine, plan, runner
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.store import Store

TOLERANCE = 1e-6
NUDGE = 1e-12
PAIRS = 3  # rounds of each side: one by one, the whole grid takes about three minutes


spec_of = runner.spec_of_run


def groups_of(configs: list[RunConfig]) -> dict[tuple, list[RunConfig]]:
    """The runs of each group, sorted by key."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in sorted(configs, key=lambda c: c.key()):
        groups.setdefault(c.group(), []).append(c)
    return groups


def sample(configs: list[RunConfig]) -> tuple[list[RunConfig], int]:
    """The float64 sample: in every group, every ``stride``-th run of each method's runs (sorted
    by key), starting with the first; and ``stride``, the greatest common divisor of the group
    sizes."""
    groups = groups_of(configs)
    stride = math.gcd(*(len(runs) for runs in groups.values()))
    chosen = []
    for runs in groups.values():
        for method in dict.fromkeys(c.method for c in runs):
            chosen += [c for c in runs if c.method == method][::stride]
    return chosen, stride


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


def _group_label(group: tuple) -> str:
    task, _, optimizer, batch_size, steps, _ = group
    batch = "full batch" if batch_size == 0 else f"batch {batch_size}"
    return f"{task}, {optimizer}, {batch}, {steps} steps"


def _train_into_store(configs: list[RunConfig], batched: bool) -> dict[str, float]:
    """Train ``configs`` through the runner into a fresh store; each run's recorded training
    seconds, by key."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "runs.sqlite")
        runner.run_all(store, configs, spec_of, 1, batched)
        return {row.config.key(): row.record.seconds for row in store.runs()}


def recorded(seconds: dict[str, float], configs: list[RunConfig]) -> float:
    """The seconds ``seconds`` (by key) records for ``configs``."""
    return sum(seconds[c.key()] for c in configs)


def _relative_change(reference: float, other: float) -> float:
    return abs(other - reference) / max(abs(reference), 1e-300)


def identical(configs: list[RunConfig]) -> dict:
    """Train ``configs`` in float64 batched and one by one; compare statuses and final losses,
    and nudge the runs that differ (see the module's docstring)."""
    wide = [dataclasses.replace(c, dtype="float64") for c in configs]
    together = {}
    for batch in runner.batches(wide, spec_of, True):
        tasks = [spec_of(c).load() for c in batch]
        together.update({r.config: r for r in engine.train_group(tasks, batch)})
    same_statuses, fixed, loose = True, [], []
    for c in wide:
        task = spec_of(c).load()
        (alone,) = engine.train_group(task, [c])
        both = together[c]
        same_statuses &= alone.status == both.status
        if (alone.final_loss is None) != (both.final_loss is None):
            same_statuses = False
        if alone.final_loss is None or both.final_loss is None:
            continue
        rel = _relative_change(alone.final_loss, both.final_loss)
        if rel <= TOLERANCE:
            fixed.append(rel)
            continue
        (nudged,) = engine.train_group(task, [dataclasses.replace(c, s=c.s + NUDGE)])
        own = (
            math.inf
            if nudged.final_loss is None
            else _relative_change(alone.final_loss, nudged.final_loss)
        )
        if own <= TOLERANCE:
            fixed.append(rel)
        else:
            loose.append({"run": c.key(), "task": c.task, "method": c.method, "difference": rel,
                          "nudged_change": own})  # fmt: skip
    worst = max(fixed, default=0.0)
    return {
        "runs": len(wide),
        "max_rel_final_loss_difference": worst,
        "same_statuses": same_statuses,
        "identical": same_statuses and worst <= TOLERANCE,
        "rounding_sensitive": loose,
    }


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    if tiny:
        grid, pairs = tiny_grid(), 2
    else:
        grid = [
            c for g in plan.reproduce_grids(quick=True) for c in g.configs(runner.TaskSpec(g.task))
        ]
        pairs = PAIRS
    chosen, stride = sample(grid)
    for c in grid:
        spec_of(c).load()  # load (and cache) every task before timing
    seconds: dict[str, list[dict[str, float]]] = {"batched": [], "one_by_one": []}
    times = paired(
        {
            side: lambda side=side: seconds[side].append(_train_into_store(grid, side == "batched"))
            for side in seconds
        },  # fmt: skip
        pairs,
        warmup=0,
    )
    per_group = []
    for g, runs in groups_of(grid).items():
        alone = sum(recorded(s, runs) for s in seconds["one_by_one"])
        together = sum(recorded(s, runs) for s in seconds["batched"])
        per_group.append({"group": _group_label(g), "runs": len(runs),
                          "batches": len(runner.batches(runs, spec_of, True)),
                          "speedup": alone / together})  # fmt: skip
    same = identical(chosen)
    row = {
        "grid_runs": len(grid),
        "float64_sample_runs": len(chosen),
        "stride": stride,
        "pairs": pairs,
        "batched": summary(times["batched"]),
        "one_by_one": summary(times["one_by_one"]),
        "speedup": ratio(times["one_by_one"], times["batched"]),
        "groups": per_group,
        "float64": same,
    }
    log(
        f"  {len(grid)} runs batched {row['batched']['median_s']:.1f} s; one by one "
        f"{row['one_by_one']['median_s']:.1f} s: "
        f"{row['speedup']:.2f}x"
    )
    for g in per_group:
        log(f"    {g['group']} ({g['runs']} runs): {g['speedup']:.2f}x")
    log(
        f"  float64, {same['runs']} runs: identical {same['identical']} (largest relative "
        f"difference {same['max_rel_final_loss_difference']:.1e}, same statuses "
        f"{same['same_statuses']}); fixed only up to rounding: {len(same['rounding_sensitive'])}"
        + "".join(
            f"\n    {r['method']} on {r['task']}: difference {r['difference']:.1e}, a nudge of "
            f"{NUDGE:g} to its initial imbalance changes it by {r['nudged_change']:.1e}"
            for r in same["rounding_sensitive"]
        )
    )
    return row
