"""The grids of ``gaugefix reproduce``: which runs each experiment needs, quick and full."""

from __future__ import annotations

from dataclasses import dataclass

from gaugefix.experiments.engine import RunConfig


def lr_grid(low_exp: int, high_exp: int) -> list[float]:
    """``2^(k/2)`` for ``k`` from ``low_exp`` to ``high_exp``: a log grid with ratio sqrt(2)."""
    return [2 ** (k / 2) for k in range(low_exp, high_exp + 1)]


# Learning-rate ranges per optimizer (exponents of sqrt(2)), wide enough to bracket the largest
# stable rate of every method at every initial imbalance in the grids below.
LR_RANGE = {"gd": (-16, 5), "sgd": (-16, 5), "momentum": (-20, 0), "adam": (-26, -4)}


@dataclass(frozen=True)
class TaskGrid:
    """The runs of one task: methods with their strengths, initial imbalances, seeds, steps,
    and the optimizers of the drift experiment (run at ``s = 0``)."""

    task: str
    methods: dict[str, tuple[float, ...]]
    s: tuple[float, ...]
    seeds: int
    steps: int
    lr_range: tuple[int, int]
    drift_optimizers: tuple[str, ...] = ()
    batch_size: int = 64  # mini-batch size of the "sgd", "momentum" and "adam" runs

    def configs(self) -> list[RunConfig]:
        out = []
        for method, strengths in self.methods.items():
            for strength in strengths:
                for seed in range(self.seeds):
                    for lr in lr_grid(*self.lr_range):
                        for s in self.s:
                            out.append(self._config(method, "gd", lr, strength, s, seed, 0))
                    for opt in self.drift_optimizers:
                        for lr in lr_grid(*LR_RANGE[opt]):
                            out.append(
                                self._config(method, opt, lr, strength, 0.0, seed, self.batch_size)
                            )
        return out

    def _config(
        self, method: str, opt: str, lr: float, strength: float, s: float, seed: int, batch: int
    ) -> RunConfig:
        return RunConfig(self.task, method, opt, lr, strength, s, seed, batch, self.steps)


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


def reproduce_grids(quick: bool) -> list[TaskGrid]:
    """The grids of the reproduction. Quick: smaller grids that still exercise every experiment
    in a few minutes on two cores; full: at least 3 seeds per cell."""
    if quick:
        return [
            TaskGrid(
                "teacher-student",
                SMALL_METHODS,
                (0.0, 1.0, 2.0),
                1,
                150,
                (-12, 4),
                ("sgd", "momentum", "adam"),
            ),
            TaskGrid("digits", {"plain": (0.0,), "exact": (1.0,)}, (0.0, 1.0), 1, 40, (-2, 4)),
        ]
    return [
        TaskGrid(
            "teacher-student",
            FULL_METHODS,
            (0.0, 0.5, 1.0, 1.5, 2.0),
            3,
            300,
            (-16, 5),
            ("sgd", "momentum", "adam"),
        ),
        TaskGrid(
            "deep-teacher-student",
            SMALL_METHODS,
            (0.0, 1.0, 2.0),
            3,
            300,
            (-16, 5),
            ("sgd", "momentum", "adam"),
        ),
        TaskGrid("digits", SMALL_METHODS, (0.0, 1.0, 2.0), 3, 100, (-8, 5)),
        TaskGrid("digits-cnn", SMALL_METHODS, (0.0, 1.0, 2.0), 3, 100, (-8, 5)),
    ]
