"""The analyses of the reproduction that probe single networks rather than sweep runs: each is a
module implementing :class:`Analysis` (listed in :data:`ANALYSES`), owning its key, its
computation, its summary entry and its report section. A value is stored per task as
``KEY/TASK`` in the store's ``analyses`` table, with the task hash and grid it was computed
for."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from gaugefix.experiments import (
    adam_split,
    conditioning,
    dose,
    min_sharpness,
    relaxation,
    sharpness_track,
)
from gaugefix.experiments.engine import task_hash
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task, load_task
from gaugefix.experiments.workers import InProcess, WorkerProcesses, Workers

__all__ = [
    "ANALYSES",
    "Analysis",
    "beside_sweep",
    "compute",
    "run_analyses",
    "stored",
]

T = TypeVar("T")


@runtime_checkable
class Analysis(Protocol):
    """An analysis: ``KEY`` names its entry in the store (``KEY/TASK``) and in ``summary.json``,
    whose type is ``SUMMARY``; ``compute`` gives the JSON value stored for one task,
    ``summarize`` the summary entry of the values by task, ``render`` the report section (its
    figures written into ``out``). ``READS_RUNS`` says whether ``compute`` reads its ``store``
    (the sweep's runs): the value of one that does not (``False``) cannot depend on the sweep,
    so :func:`beside_sweep` computes it while the sweep runs; one that does (``True``) is
    computed after the sweep and its bisection. This flag alone decides which go early.
    ``VERSION`` is raised whenever a change alters what ``compute`` gives: a stored value of
    another version is computed again."""

    KEY: str
    SUMMARY: Any
    READS_RUNS: bool
    VERSION: int

    def compute(self, store: Store, task: Task, quick: bool) -> dict[str, Any]: ...

    def summarize(self, values: dict[str, dict[str, Any]]) -> Any: ...

    def render(self, out: Path, values: dict[str, dict[str, Any]]) -> str: ...


ANALYSES: tuple[Analysis, ...] = (
    relaxation,
    conditioning,
    min_sharpness,
    sharpness_track,
    dose,
    adam_split,
)


def stored(store: Store, analysis: Analysis) -> dict[str, Any]:
    """The values of ``analysis`` in ``store`` computed by its current ``VERSION``, by task (a
    value of another version, computed by code since changed, is left out until
    :func:`run_analyses` computes it again)."""
    prefix = f"{analysis.KEY}/"
    return {
        k[len(prefix) :]: v
        for k, v in store.analyses().items()
        if k.startswith(prefix) and v.get("made_for", {}).get("version") == analysis.VERSION
    }


def run_analyses(store: Store, quick: bool, workers: Workers | None = None) -> None:
    """Every analysis on teacher-student (also deep-teacher-student in the full run), each
    computed on ``workers`` (default: this process) and stored, with progress, unless the store
    holds it for the same task hash and grid (``"made_for"`` in its value)."""
    todo = _todo(store, quick)
    if todo:
        with Progress(len(todo), unit="analyses") as progress:
            _store(store, _submit(store, quick, todo, workers, progress), progress)


def beside_sweep(store: Store, quick: bool, sweep: Callable[[], T], workers: Workers) -> T:
    """``sweep()`` (training runs into ``store`` on ``workers``), then :func:`run_analyses`,
    except that the analyses that read no run (``READS_RUNS`` false) are submitted to
    ``workers`` before the sweep, so that free workers compute them while the sweep's batches
    queue behind them (where a call is computed in this process, as by
    :class:`~gaugefix.experiments.workers.InProcess` and Ray's workers, at once, with
    progress). The analyses that read runs are submitted after the sweep; every value is stored
    after it (an interrupted sweep stores none) and is the one :func:`run_analyses` stores.
    Returns what ``sweep`` returns."""
    early = _todo(store, quick, reads_runs=False)
    if early and not isinstance(workers, WorkerProcesses):
        # InProcess and Ray's workers compute a call in this process, at once: shown
        with Progress(len(early), unit="analyses") as progress:
            submitted = _submit(store, quick, early, workers, progress)
            progress.update(done=len(early))
    else:  # computed in the worker processes: the sweep's progress follows at once
        submitted = _submit(store, quick, early, workers)
    result = sweep()
    late = _todo(store, quick, reads_runs=True)
    if submitted or late:
        with Progress(len(submitted) + len(late), unit="analyses") as progress:
            submitted |= _submit(store, quick, late, workers, progress)
            _store(store, submitted, progress)
    return result


# An analysis to compute: its store key, its KEY, its task and the "made_for" stored with it.
Todo = tuple[str, str, str, dict[str, Any]]


def _todo(store: Store, quick: bool, reads_runs: bool | None = None) -> list[Todo]:
    """The analyses of :func:`run_analyses` (only those whose ``READS_RUNS`` is ``reads_runs``
    unless it is ``None``) that ``store`` does not hold for the same task hash, grid and
    analysis ``VERSION``, in the order of :data:`ANALYSES`."""
    tasks = ["teacher-student"] if quick else ["teacher-student", "deep-teacher-student"]
    todo = []
    for name in tasks:
        grid = {"task_hash": task_hash(load_task(name)), "quick": quick}
        for analysis in ANALYSES:
            if reads_runs is not None and analysis.READS_RUNS != reads_runs:
                continue
            key = f"{analysis.KEY}/{name}"
            made_for = {**grid, "version": analysis.VERSION}
            if (store.analysis(key) or {}).get("made_for") != made_for:
                todo.append((key, analysis.KEY, name, made_for))
    return todo


def _submit(
    store: Store,
    quick: bool,
    todo: list[Todo],
    workers: Workers | None,
    progress: Progress | None = None,
) -> dict[Future, Todo]:
    """``todo`` submitted to ``workers`` (default: this process, which computes each at once),
    in order, each labelled on ``progress`` as it is submitted: each future with its item."""
    workers = workers or InProcess()
    futures = {}
    for item in todo:
        key, analysis, name, _ = item
        if progress is not None:
            progress.update(label=key)
        futures[workers.call(compute, analysis, name, str(store.path), quick)] = item
    return futures


def _store(store: Store, futures: dict[Future, Todo], progress: Progress) -> None:
    """Store each analysis of ``futures`` (:func:`_submit`) as it completes."""
    for done, future in enumerate(as_completed(futures), 1):
        key, _, _, made_for = futures[future]
        value, seconds = future.result()
        store.put_analysis(key, {**value, "made_for": made_for}, seconds, replace=True)
        progress.update(done=done, label=key)


def compute(key: str, task: str, store_path: str, quick: bool) -> tuple[dict[str, Any], float]:
    """The value of the analysis of :data:`ANALYSES` with ``KEY`` ``key`` on the built-in
    ``task``, read from the store at ``store_path``, and the seconds it took (in any process)."""
    analysis = next(a for a in ANALYSES if a.KEY == key)
    start = time.perf_counter()
    value = analysis.compute(Store(store_path, readonly=True), load_task(task), quick)
    return value, time.perf_counter() - start
