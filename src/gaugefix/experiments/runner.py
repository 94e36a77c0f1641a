"""Executing a list of runs into a store: deterministic batches, resumption, claims shared with
other processes, progress, workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import cache, lru_cache

import torch

from gaugefix.experiments.engine import STRENGTH_METHODS, RunConfig, check_runs, task_hash
from gaugefix.experiments.plan import (
    at_chosen_strengths,
    bisection_round,
    cell_of,
    tuning_first,
)
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.stability import TUNING_SEEDS
from gaugefix.experiments.store import Claimant, Store
from gaugefix.experiments.tasks import Task, load_task
from gaugefix.experiments.workers import Workers, execute, local_workers

__all__ = [
    "ACTIVATION_BUDGET",
    "WORK_BUDGET",
    "WORK_RATE",
    "TaskSpec",
    "spec_of_run",
    "TASK_CACHE",
    "activations",
    "run_work",
    "runs_per_batch",
    "estimated_seconds",
    "batches",
    "POLL",
    "run_all",
    "run_bisected",
]

ACTIVATION_BUDGET = 6e7  # floats of activations one batch may hold at once
# Floats of activations one batch may compute over all its steps, which bounds the work an
# interruption loses: about 20 s of one core (WORK_BUDGET / WORK_RATE). Smaller batches cost more
# per run: teacher-student's 210 full-batch runs of 100 steps took 9.2 s of CPU as one batch,
# 10.0 s as three (this budget makes two).
WORK_BUDGET = 2e9
# Floats of activations one worker computes per second: the quick grid's groups, batched, on one
# core of the 2-core development machine ran at 4e7 (mini-batch Adam) to 3e8 (teacher-student,
# full batch) per second; an estimate of time, good to a factor of about three.
WORK_RATE = 1e8


@dataclass(frozen=True)
class TaskSpec:
    """How to load a task in any process: a built-in name and its instance, or a data file with
    its options (one instance)."""

    name: str
    data: str | None = None
    kind: str | None = None
    hidden: tuple[int, ...] = (128,)
    instance: int = 0

    def load(self) -> Task:
        return _load(self)

    def for_seed(self, seed: int) -> TaskSpec:
        """The task the runs of ``seed`` train on: a built-in task's instance ``seed``, or the
        user's data (the same for every seed)."""
        return self if self.data is not None else replace(self, instance=seed)

    def hash(self) -> str:
        """The task hash of this instance (computed once): the first 8 hex digits of
        :func:`gaugefix.experiments.engine.task_hash` of instance 0, shared by every instance
        (they name the task's version: data, model and definitions), then 8 of this one's."""
        return _hash(self)


def spec_of_run(config: RunConfig) -> TaskSpec:
    """The built-in task instance a run of the reproduction trains on (its seed's)."""
    return TaskSpec(config.task).for_seed(config.seed)


TASK_CACHE = 64  # task instances a process keeps loaded (a reproduction's seeds of a few tasks)


@lru_cache(maxsize=TASK_CACHE)
def _load(spec: TaskSpec) -> Task:
    return load_task(spec.name, spec.data, spec.kind, spec.hidden, spec.instance)


# Every instance's hash is kept (16 characters each): a sweep hashes each seed's instance
# several times, and with more seeds than TASK_CACHE a bounded cache loaded it each time.
@cache
def _hash(spec: TaskSpec) -> str:
    return task_hash(replace(spec, instance=0).load())[:8] + task_hash(spec.load())[:8]


def activations(task: Task) -> int:
    """Floats of one run's activations on ``task``'s whole training set."""
    model = task.make_model()
    floats = 0

    def count(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal floats
        floats += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    with torch.no_grad():
        model(task.x)
    for h in handles:
        h.remove()
    return max(floats, 1)


def run_work(task: Task, config: RunConfig, floats: int) -> float:
    """Floats of activations a run of ``config`` computes over its steps, given ``floats`` =
    :func:`activations` of ``task``: an estimate of its compute."""
    n = len(task.x)
    share = min(config.batch_size, n) / n if config.batch_size else 1.0
    return floats * share * config.steps


def runs_per_batch(task: Task, config: RunConfig) -> int:
    """How many runs of ``config``'s group one batch holds: as many as fit both the activation
    budget (memory held at once) and the work budget (compute an interruption may lose)."""
    floats = activations(task)
    memory = ACTIVATION_BUDGET // floats
    work = WORK_BUDGET // max(run_work(task, config, floats), 1.0)
    return max(1, int(min(memory, work)))


def estimated_seconds(task: Task, config: RunConfig, runs: int, workers: int) -> float:
    """About how long ``runs`` runs like ``config`` take on ``workers`` workers."""
    return runs * run_work(task, config, activations(task)) / WORK_RATE / max(workers, 1)


def batches(
    configs: list[RunConfig], spec_of: Callable[[RunConfig], TaskSpec], batched: bool = True
) -> list[list[RunConfig]]:
    """Split ``configs`` into batches: runs of one group whose task instances have data of
    equal shapes (:meth:`Task.data_shapes`), in a fixed order, as few batches of at most
    :func:`runs_per_batch` runs as a group needs, of equal sizes (up to one run; one run per
    batch when ``batched`` is false). The split depends only on the configs,
    never on what a store already holds, so a resumed sweep computes exactly what an
    uninterrupted one does."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in sorted(set(configs), key=lambda c: c.key()):
        groups.setdefault((c.group(), spec_of(c).load().data_shapes()), []).append(c)
    out = []
    for group in groups.values():
        most = runs_per_batch(spec_of(group[0]).load(), group[0]) if batched else 1
        size = -(-len(group) // -(-len(group) // most))  # as few batches, of equal sizes
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    return out


POLL = 2.0  # seconds between looks at runs that other processes hold


def run_all(
    store: Store,
    configs: list[RunConfig],
    spec_of: Callable[[RunConfig], TaskSpec],
    jobs: int = 1,
    batched: bool = True,
    workers: Workers | None = None,
) -> int:
    """Train every config the store does not hold yet and write each finished run in its own
    transaction, as its batch's results arrive from ``workers`` (default: this process, or
    ``jobs`` worker processes but never more than batches); returns the number of runs this
    call wrote.

    Each batch is claimed in the store just before it is trained (:meth:`Store.claim`), so
    processes sweeping one store share the work and each run is trained and written once: a
    batch another live process holds is skipped, and waited for at the end; one whose claimant
    died (or stopped renewing its lease) is taken over. A run the engine cannot train
    (:func:`~gaugefix.experiments.engine.run_problem`) or whose task hash is not its task's is
    a ``ValueError`` before anything is trained or written, as is one that trains as another
    key does (a dtype given by another name than torch's own, ``"double"`` for ``"float64"``;
    a strength for a method without one)."""
    _check(configs, spec_of)
    keys = {c.key() for c in configs} - store.finished_keys()
    pending = [b for b in batches(configs, spec_of, batched) if any(c.key() in keys for c in b)]
    written = 0
    with ExitStack() as stack:
        progress = stack.enter_context(Progress(len(keys)))
        claimant = stack.enter_context(Claimant(store))
        if workers is None:
            workers = stack.enter_context(local_workers(min(jobs, len(pending))))
        while pending:
            taken: list[int] = []  # per batch given to the workers, the runs it adds
            todo = _claimed(store, claimant, pending, taken)

            def on_fraction(i: int, f: float, taken: list = taken) -> None:
                progress.update(part=i, amount=f * taken[i])

            for i, results, seconds in execute(workers, todo, spec_of, on_fraction):
                for r in results:
                    written += store.add_run(r, seconds / len(results))
                progress.update(len(keys & store.finished_keys()), part=i, amount=0.0)
            waiting = bool(pending) and not taken
            label = _waiting_for(store, pending) if waiting else ""
            progress.update(len(keys & store.finished_keys()), label=label)
            if waiting:
                time.sleep(POLL)
    return written


def _check(configs: list[RunConfig], spec_of: Callable[[RunConfig], TaskSpec]) -> None:
    """``ValueError`` naming the first of ``configs`` that is no run of its key: one the engine
    cannot train, one of another task hash than its task's, and one that trains as another key
    does (a strength other than 0 for a method without one, a dtype not named as torch names
    it)."""
    check_runs(configs)
    for c in configs:
        if c.task_hash != spec_of(c).hash():
            raise ValueError(
                f"a run of task {c.task!r} has task hash {c.task_hash}, but the task loads with "
                f"hash {spec_of(c).hash()}"
            )
        if c.method not in STRENGTH_METHODS and c.strength != 0.0:
            raise ValueError(
                f"a run of task {c.task!r} gives method {c.method!r}, which has no strength, "
                f"the strength {c.strength!r}: give 0 (a run has one key)"
            )
        name = str(getattr(torch, c.dtype)).removeprefix("torch.")
        if name != c.dtype:
            raise ValueError(
                f"a run of task {c.task!r} has dtype {c.dtype!r}, another name of torch.{name}: "
                f"give it as {name!r} (a run has one key)"
            )


def run_bisected(
    store: Store,
    configs: list[RunConfig],
    spec_of: Callable[[RunConfig], TaskSpec],
    rounds: int,
    jobs: int = 1,
    workers: Workers | None = None,
    choose_strengths: bool = False,
) -> int:
    """:func:`run_all` of ``configs``, then up to ``rounds`` rounds of bisection of each seed's
    stable edge in their cells (:func:`~gaugefix.experiments.plan.bisection_round`), each round
    planned from the store and trained whole, so an interrupted sweep resumes where it stopped,
    in the batches of an uninterrupted one; returns the number of runs written. With
    ``choose_strengths``, a method run at several strengths is run at all of them on the tuning
    seeds first, then on the other seeds, and bisected, only at the strength they chose over
    the store (:func:`~gaugefix.experiments.plan.tuning_first`, :func:`at_chosen_strengths`);
    where its regime has no other seed, every strength is bisected. Every run of ``configs`` is
    checked as :func:`run_all` checks it before anything is trained or written."""
    _check(configs, spec_of)
    first = tuning_first(configs)[0] if choose_strengths else configs
    written = run_all(store, first, spec_of, jobs, workers=workers)
    if choose_strengths:
        configs = at_chosen_strengths(store.runs(), configs)
        # not the tuning seeds' runs at a strength of an earlier grid: they would change the
        # choice of a resumed sweep (their cells are bisected from the runs stored)
        trained = set(first)
        chosen = [c for c in configs if c not in trained and c.seed >= TUNING_SEEDS]
        written += run_all(store, chosen, spec_of, jobs, workers=workers)
    cells = {cell_of(c) for c in configs}
    while todo := bisection_round(store.runs(), cells, rounds):
        written += run_all(store, todo, spec_of, jobs, workers=workers)
    return written


def _waiting_for(store: Store, pending: list[list[RunConfig]]) -> str:
    """What a sweep that can claim none of the ``pending`` batches waits for."""
    keys = {c.key() for batch in pending for c in batch} - store.finished_keys()
    holders = sorted({f"pid {c['pid']} on {c['host']}" for c in store.claims() if c["key"] in keys})
    by = f" ({', '.join(holders)})" if holders else ""
    return f"waiting for {len(keys)} runs that another sweep is training{by}"


def _claimed(
    store: Store, claimant: Claimant, pending: list[list[RunConfig]], taken: list
) -> Iterator[list[RunConfig]]:
    """One pass over ``pending``, claiming each batch as it is asked for: a claimed batch is
    yielded (and the number of its runs not stored, which it adds, appended to ``taken``), a
    finished one dropped, one another live process holds left in ``pending`` for a later
    pass."""
    i = 0
    while i < len(pending):
        claimed = store.claim([c.key() for c in pending[i]], claimant)
        if claimed is None:
            i += 1
            continue
        batch = pending.pop(i)
        if claimed:
            taken.append(len(claimed))
            yield batch
