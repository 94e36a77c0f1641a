"""Runs as the store returns them (:class:`~gaugefix.experiments.engine.RunResult`), grouped into
tasks, regimes and cells."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

from gaugefix.experiments.engine import REFERENCES, RunConfig, RunResult, task_version

__all__ = [
    "by_regime",
    "by_task",
    "group",
    "HorizonKey",
    "longest_full_batch",
    "lr_key",
    "LrKey",
    "median",
    "median_of_every_seed",
    "MethodKey",
    "reference",
    "ReferenceKey",
    "Regime",
    "RegimeKey",
    "Run",
    "Runs",
    "s_key",
    "number_text",
    "SeedKey",
    "SKey",
    "TaskKey",
]

Runs = Sequence[RunResult]
# Runs as given: a store's runs keep their row ids through the grouping.
Run = TypeVar("Run", bound=RunResult)

# The keys of the maps of ``summary.json``, named as its schema writes them.
TaskKey = Annotated[str, "TASK"]
RegimeKey = Annotated[str, "REGIME"]  # Regime.key
MethodKey = Annotated[str, "METHOD"]
ReferenceKey = Annotated[str, "REFERENCE"]
SKey = Annotated[str, "S"]  # s_key
LrKey = Annotated[str, "LR"]  # lr_key
SeedKey = Annotated[str, "SEED"]
HorizonKey = Annotated[str, "OPTIMIZER/BATCH"]


def s_key(s: float) -> str:
    """An initial imbalance as a JSON key: ``"0.0"``, ``"1.5"``."""
    return str(float(s))


def number_text(x: str | float) -> str:
    """A value of a run's configuration (an initial imbalance, or its :func:`s_key`; a strength)
    as the tables print it: ``0``, ``1.5``, to 6 significant digits where they give it back,
    else in full (``0.1234567``), so that every printed value is the summary's and two never
    share one label."""
    text = f"{float(x):g}"
    return text if float(text) == float(x) else repr(float(x))


def lr_key(lr: float) -> str:
    """A learning rate as a JSON key, to 6 significant digits: ``"0.353553"``."""
    return f"{lr:.6g}"


@dataclass(frozen=True)
class Regime:
    """How a group of runs was trained: optimizer, batch size (0: full batch) and steps."""

    optimizer: str
    batch_size: int
    steps: int

    @staticmethod
    def of(config: RunConfig) -> Regime:
        return Regime(config.optimizer, config.batch_size, config.steps)

    @staticmethod
    def parse(key: str) -> Regime:
        optimizer, batch, steps = key.split("/")
        return Regime(optimizer, 0 if batch == "full" else int(batch), int(steps))

    @property
    def key(self) -> str:
        """``"gd/full/150"``, ``"adam/64/1500"``: optimizer, batch size, steps."""
        return f"{self.optimizer}/{self.batch_size or 'full'}/{self.steps}"

    @property
    def label(self) -> str:
        """``"full-batch gd, 150 steps"``, ``"adam, batch 64, 1500 steps"``."""
        if self.batch_size:
            return f"{self.optimizer}, batch {self.batch_size}, {self.steps} steps"
        return f"full-batch {self.optimizer}, {self.steps} steps"

    @property
    def slug(self) -> str:
        return self.key.replace("/", "-")


def reference(runs: Runs) -> str | None:
    """The reference of a regime's comparisons at s = 0: plain, else balanced-init."""
    present = {r.config.method for r in runs if r.config.s == 0.0}
    return next((m for m in REFERENCES if m in present), None)


def by_task(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs of each task, keyed by its name; when runs of one name have several
    :func:`task_version` (other data, model or experiment definitions) each version is its own
    task, keyed ``NAME@VERSION``, so they are never mixed; ``ValueError`` where two tasks would
    have one key (a task named ``t@VERSION`` beside a version of ``t``)."""
    versions: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        versions[r.config.task].add(task_version(r.config.task_hash))
    out: dict[str, list[Run]] = defaultdict(list)
    keyed: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for r in runs:
        version = task_version(r.config.task_hash)
        key = f"{r.config.task}@{version}" if len(versions[r.config.task]) > 1 else r.config.task
        out[key].append(r)
        keyed[key].add((r.config.task, version))
    for key, tasks in keyed.items():
        if len(tasks) > 1:
            named = ", ".join(f"{name!r} version {version}" for name, version in sorted(tasks))
            raise ValueError(f"the runs of {named} would all be summarised as task {key!r}")
    return dict(sorted(out.items()))


def by_regime(runs: Sequence[Run]) -> dict[Regime, list[Run]]:
    """The runs of each regime (``runs``: one task's), full-batch ones first, then by optimizer
    and steps. ``ValueError`` where a regime's runs have several dtypes (their cells would mix
    them) or hold one run twice (its seed would count twice)."""
    out: dict[Regime, list[Run]] = defaultdict(list)
    for r in runs:
        out[Regime.of(r.config)].append(r)
    for regime, rs in out.items():
        _check_regime(regime, rs)
    return dict(sorted(out.items(), key=lambda kv: (kv[0].batch_size > 0, kv[0].steps, kv[0].key)))


def _check_regime(regime: Regime, runs: Runs) -> None:
    """``ValueError`` where one regime's ``runs`` have several dtypes or one run twice."""
    tasks = ", ".join(repr(t) for t in sorted({r.config.task for r in runs}))
    dtypes = sorted({r.config.dtype for r in runs})
    if len(dtypes) > 1:
        raise ValueError(
            f"the runs of task {tasks}, regime {regime.key}, have the dtypes {', '.join(dtypes)}: "
            "a summary compares runs of one dtype; keep each dtype's runs in a store of its own"
        )
    if len({r.config for r in runs}) < len(runs):
        raise ValueError(f"the runs of task {tasks}, regime {regime.key}, hold a run twice")


def longest_full_batch(runs: Sequence[Run], task_hash: str) -> tuple[Regime, list[Run]] | None:
    """The regime with the most steps among ``runs`` (one task's full-batch runs of one
    optimizer) of the task version of ``task_hash``, and its runs; ``None`` when there are
    none."""
    version = task_version(task_hash)
    regimes = by_regime([r for r in runs if task_version(r.config.task_hash) == version])
    if not regimes:
        return None
    regime = max(regimes, key=lambda r: r.steps)
    return regime, regimes[regime]


def group(runs: Sequence[Run], key: Callable[[RunConfig], tuple]) -> dict[tuple, list[Run]]:
    """``runs`` grouped by ``key`` of their configuration, in sorted order of the keys."""
    out: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        out[key(r.config)].append(r)
    return dict(sorted(out.items()))


def median(values: list[float | None]) -> float | None:
    """The median of the values that are not ``None`` (``None`` when none is); NaN where one is
    NaN (it has no place in the order, and sorting past it would depend on where it stands)."""
    known = [v for v in values if v is not None]
    if any(math.isnan(v) for v in known):
        return math.nan
    return statistics.median(known) if known else None


def median_of_every_seed(values: list[float | None]) -> float | None:
    """The median of a cell's values, one per seed; ``None`` where some seed has none or NaN (a
    median over the other seeds would not pair with one over all of them)."""
    if any(v is None or math.isnan(v) for v in values):
        return None
    return statistics.median(values)
