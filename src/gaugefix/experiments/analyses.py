"""The analyses of the reproduction that probe single networks rather than sweep runs: each is a
module implementing :class:`Analysis` (listed in :data:`ANALYSES`), owning its key, its
computation, its summary entry and its report section. A value is stored per task as
``KEY/TASK`` in the store's ``analyses`` table, with the task hash and grid it was computed
for."""

from __future__ import annotations

import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
from gaugefix.experiments.workers import InProcess, Workers

__all__ = ["ANALYSES", "Analysis", "compute", "run_analyses", "stored"]


@runtime_checkable
class Analysis(Protocol):
    """An analysis: ``KEY`` names its entry in the store (``KEY/TASK``) and in ``summary.json``,
    whose type is ``SUMMARY``; ``compute`` gives the JSON value stored for one task,
    ``summarize`` the summary entry of the values by task, ``render`` the report section (its
    figures written into ``out``)."""

    KEY: str
    SUMMARY: Any

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
    """The values of ``analysis`` in ``store``, by task."""
    prefix = f"{analysis.KEY}/"
    return {k[len(prefix) :]: v for k, v in store.analyses().items() if k.startswith(prefix)}


def run_analyses(store: Store, quick: bool, workers: Workers | None = None) -> None:
    """Every analysis on teacher-student (also deep-teacher-student in the full run), each
    computed on ``workers`` (default: this process) and stored, with progress, unless the store
    holds it for the same task hash and grid (``"made_for"`` in its value)."""
    tasks = ["teacher-student"] if quick else ["teacher-student", "deep-teacher-student"]
    todo = []
    for name in tasks:
        made_for = {"task_hash": task_hash(load_task(name)), "quick": quick}
        for analysis in ANALYSES:
            key = f"{analysis.KEY}/{name}"
            if (store.analysis(key) or {}).get("made_for") != made_for:
                todo.append((key, analysis.KEY, name, made_for))
    if not todo:
        return
    workers = workers or InProcess()
    with Progress(len(todo), unit="analyses") as progress:
        futures = {}
        for key, analysis, name, made_for in todo:
            progress.update(label=key)
            futures[workers.call(compute, analysis, name, str(store.path), quick)] = key, made_for
        for done, future in enumerate(as_completed(futures), 1):
            key, made_for = futures[future]
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
