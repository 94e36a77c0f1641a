"""The grids of ``gaugefix reproduce``: which runs each experiment needs, quick and full."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from gaugefix.experiments.engine import RunConfig


def lr_grid(low_exp: int, high_exp: int) -> list[float]:
    """``2^(k/2)`` for ``k`` from ``low_exp`` to ``high_exp``: a log grid with ratio sqrt(2)."""
    return [2 ** (k / 2) for k in range(low_exp, high_exp + 1)]


# Learning-rate ranges of the drift experiment per optimizer (exponents of sqrt(2)), wide enough
# to bracket the largest rate stable for plain training at s = 0.
DRIFT_RANGE = {"sgd": (-9, 2), "momentum": (-13, -2), "adam": (-16, -5)}


@dataclass(frozen=True)
class TaskGrid:
    """The runs of one task: methods with their strengths, initial imbalances, seeds, steps and
    the full-batch learning-rate range; and the drift experiment's optimizers (mini-batch, at
    ``s = 0``) with their learning-rate ranges, for ``drift_methods``."""

    task: str
    methods: dict[str, tuple[float, ...]]
    s: tuple[float, ...]
    seeds: int
    steps: int
    lr_range: tuple[int, int]
    drift: dict[str, tuple[int, int]] = field(default_factory=dict)
    drift_methods: tuple[str, ...] = ()
    batch_size: int = 64  # mini-batch size of the drift runs

    def configs(self, task_hash: str) -> list[RunConfig]:
        """The runs, for the task whose :func:`~gaugefix.experiments.engine.task_hash` is given."""
        out = []
        for method, strengths in self.methods.items():
            for strength, seed in product(strengths, range(self.seeds)):
                for lr, s in product(lr_grid(*self.lr_range), self.s):
                    out.append(
                        RunConfig(
                            self.task,
                            method,
                            "gd",
                            lr,
                            strength,
                            s,
                            seed,
                            0,
                            self.steps,
                            task_hash=task_hash,
                        )
                    )
                if method not in self.drift_methods:
                    continue
                for opt, bounds in self.drift.items():
                    for lr in lr_grid(*bounds):
                        out.append(
                            RunConfig(
                                self.task,
                                method,
                                opt,
                                lr,
                                strength,
                                0.0,
                                seed,
                                self.batch_size,
                                self.steps,
                                task_hash=task_hash,
                            )
                        )
        return out


FULL_METHODS = {
    "plain": (0.0,),
    "penalty": (0.01, 0.1, 1.0),
    "exact": (0.1, 1.0, 10.0),
    "weight-decay": (1e-3, 1e-2),
    "balance": (0.0,),
}
SMALL_METHODS = {
    "plain": (0.0,),
    "penalty": (0.01, 0.1),
    "exact": (1.0,),
    "weight-decay": (1e-3,),
    "balance": (0.0,),
}
ONE_STRENGTH = {
    "plain": (0.0,),
    "penalty": (0.1,),
    "exact": (1.0,),
    "weight-decay": (1e-3,),
    "balance": (0.0,),
}
QUICK_DRIFT = {"sgd": (-6, 1), "momentum": (-10, -3), "adam": (-16, -9)}


def reproduce_grids(quick: bool) -> list[TaskGrid]:
    """The grids of the reproduction. Quick: smaller grids that still exercise every experiment
    in a few minutes on two cores; full: 3 seeds per cell, sized for about 45 minutes."""
    if quick:
        return [
            TaskGrid(
                "teacher-student",
                SMALL_METHODS,
                (0.0, 1.0, 2.0),
                1,
                100,
                (-18, 3),
                QUICK_DRIFT,
                ("plain", "exact", "penalty"),
            ),
            TaskGrid("digits", {"plain": (0.0,), "exact": (1.0,)}, (0.0, 1.0), 1, 40, (-2, 4)),
        ]
    return [
        TaskGrid(
            "teacher-student",
            FULL_METHODS,
            (0.0, 1.0, 2.0),
            3,
            150,
            (-16, 3),
            DRIFT_RANGE,
            tuple(FULL_METHODS),
        ),
        TaskGrid("deep-teacher-student", SMALL_METHODS, (0.0, 1.0, 2.0), 3, 150, (-16, 5)),
        TaskGrid("digits", ONE_STRENGTH, (0.0, 1.0), 3, 50, (-6, 5)),
        TaskGrid("digits-cnn", ONE_STRENGTH, (0.0, 1.0), 3, 50, (-6, 5)),
    ]
