"""Executing a list of runs into a store: deterministic batches, resumption, claims shared with
other processes, progress, workers."""

from __future__ import annotations

import ctypes
import platform
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache, partial
from multiprocessing import get_context
from typing import Any

import torch

from gaugefix.experiments.engine import RunConfig, RunResult, task_hash, train_group
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.store import Claimant, Store
from gaugefix.experiments.tasks import Task, load_task

ACTIVATION_BUDGET = 6e7  # floats of activations one batch may hold

# glibc's mallopt parameters (malloc.h) and the size below which freed memory stays in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


@lru_cache(maxsize=1)
def keep_freed_memory() -> None:
    """Let this process keep the memory it frees, for reuse (glibc only; elsewhere nothing).

    By default glibc maps every block above a small threshold afresh and unmaps it when freed,
    and returns free memory at the top of its heap to the system, so each step of a batch
    page-faults its activations in anew. A process that trains holds the same set of tensors
    from step to step: raising both thresholds to 1 GiB makes the batched steps of the quick
    reproduction about three times faster per run (measured in ``benchmarks/``), at the price of
    a resident size that does not shrink between batches."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)


@dataclass(frozen=True)
class TaskSpec:
    """How to load a task in any process: a built-in name, or a data file with its options."""

    name: str
    data: str | None = None
    kind: str | None = None
    hidden: tuple[int, ...] = (128,)

    def load(self) -> Task:
        return _load(self)

    def hash(self) -> str:
        """:func:`gaugefix.experiments.engine.task_hash` of the task (computed once)."""
        return _hash(self)


@lru_cache(maxsize=8)
def _load(spec: TaskSpec) -> Task:
    return load_task(spec.name, spec.data, spec.kind, spec.hidden)


@lru_cache(maxsize=8)
def _hash(spec: TaskSpec) -> str:
    return task_hash(spec.load())


def members_per_batch(task: Task) -> int:
    """How many runs of ``task`` one batch holds: the activation budget over one run's
    activations on the full training set."""
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
    return max(1, int(ACTIVATION_BUDGET // max(floats, 1)))


def batches(
    configs: list[RunConfig], spec_of: Callable[[RunConfig], TaskSpec], batched: bool = True
) -> list[list[RunConfig]]:
    """Split ``configs`` into batches: runs of one group, in a fixed order, at most
    :func:`members_per_batch` each (one run per batch when ``batched`` is false). The split
    depends only on the configs, never on what a store already holds, so a resumed sweep
    computes exactly what an uninterrupted one does."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in sorted(set(configs), key=lambda c: c.key()):
        groups.setdefault(c.group(), []).append(c)
    out = []
    for group in groups.values():
        size = members_per_batch(spec_of(group[0]).load()) if batched else 1
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    return out


def _train(
    spec: TaskSpec, configs: list[RunConfig], threads: int, on_fraction: Callable[[float], None]
) -> tuple[list[RunResult], float]:
    """Train one batch; ``on_fraction(f)`` gets the fraction of its steps done."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    steps = configs[0].steps + 1
    task = spec.load()
    results = train_group(task, configs, on_step=lambda step: on_fraction((step + 1) / steps))
    return results, time.perf_counter() - start


POLL = 2.0  # seconds between looks at runs that other processes hold


# Trains the batches of runs an iterator hands out (given how to load each run's task, the
# worker count and where to report the fraction of a batch's steps done), asking for the next
# batch only when it can start it, and yields ``(index, results, seconds)`` as batches finish.
Executor = Callable[
    [Iterator[list[RunConfig]], Callable[[RunConfig], TaskSpec], int, Callable[[int, float], None]],
    Iterator[tuple[int, list[RunResult], float]],
]


def run_all(
    store: Store,
    configs: list[RunConfig],
    spec_of: Callable[[RunConfig], TaskSpec],
    jobs: int = 1,
    batched: bool = True,
    execute: Executor | None = None,
) -> int:
    """Train every config the store does not hold yet and write each finished run in its own
    transaction, as its batch's results arrive from ``execute`` (default: this process, or
    ``jobs`` worker processes); returns the number of runs this call wrote.

    Each batch is claimed in the store just before it is trained (:meth:`Store.claim`), so
    processes sweeping one store share the work and each run is trained and written once: a
    batch another live process holds is skipped, and waited for at the end; one whose claimant
    died (or stopped renewing its lease) is taken over."""
    for c in configs:
        if c.task_hash != spec_of(c).hash():
            raise ValueError(
                f"a run of task {c.task!r} has task hash {c.task_hash}, but the task loads with "
                f"hash {spec_of(c).hash()}"
            )
    keys = {c.key() for c in configs} - store.finished_keys()
    pending = [b for b in batches(configs, spec_of, batched) if any(c.key() in keys for c in b)]
    progress = Progress(len(keys))
    written = 0
    try:
        with Claimant(store) as claimant:
            while pending:
                taken: list[list[RunConfig]] = []
                todo = _claimed(store, claimant, pending, taken)
                for i, results, seconds in (execute or _execute)(
                    todo,
                    spec_of,
                    jobs,
                    lambda i, f, taken=taken: progress.update(part=i, amount=f * len(taken[i])),
                ):
                    for r in results:
                        written += store.add_run(r, seconds / len(results))
                    progress.update(len(keys & store.finished_keys()), part=i, amount=0.0)
                if pending and not taken:
                    time.sleep(POLL)
                    progress.update(len(keys & store.finished_keys()))
    finally:
        progress.close()
    return written


def _claimed(
    store: Store, claimant: Claimant, pending: list[list[RunConfig]], taken: list
) -> Iterator[list[RunConfig]]:
    """One pass over ``pending``, claiming each batch as it is asked for: a claimed batch is
    yielded (and appended to ``taken``), a finished one dropped, one another live process holds
    left in ``pending`` for a later pass."""
    i = 0
    while i < len(pending):
        claimed = store.claim([c.key() for c in pending[i]], claimant)
        if claimed is None:
            i += 1
            continue
        batch = pending.pop(i)
        if claimed:
            taken.append(batch)
            yield batch


def _execute(
    todo: Iterator[list[RunConfig]],
    spec_of: Callable[[RunConfig], TaskSpec],
    jobs: int,
    on_fraction: Callable[[int, float], None],
) -> Iterator[tuple[int, list[RunResult], float]]:
    """Train the batches of ``todo``, taking the next one only when a worker is free (so each is
    claimed just before it is trained); yields ``(index, results, seconds)`` as batches finish
    and reports ``on_fraction(index, fraction of its steps done)`` meanwhile."""
    cores = torch.get_num_threads()
    if jobs <= 1:
        for i, batch in enumerate(todo):
            yield (i, *_train(spec_of(batch[0]), batch, cores, partial(on_fraction, i)))
        return
    threads = max(1, cores // jobs)
    ctx = get_context("spawn")
    fractions = ctx.Queue()
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_set_queue, initargs=(fractions,)
    ) as pool:
        running: dict[Future, int] = {}
        batches_left = enumerate(todo)
        more, finished_indices = True, set()
        while running or more:
            while more and len(running) < jobs:
                item = next(batches_left, None)
                if item is None:
                    more = False
                else:
                    i, batch = item
                    running[pool.submit(_train_queued, spec_of(batch[0]), batch, threads, i)] = i
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            while True:
                try:
                    i, fraction = fractions.get_nowait()
                except queue.Empty:
                    break
                if i not in finished_indices:  # a late report of a finished batch is dropped
                    on_fraction(i, fraction)
            for future in finished:
                finished_indices.add(running[future])
                yield (running.pop(future), *future.result())


_QUEUE: Any = None  # a worker process's queue of (batch index, fraction of its steps done)


def _set_queue(q: Any) -> None:
    global _QUEUE
    _QUEUE = q


def _train_queued(
    spec: TaskSpec, configs: list[RunConfig], threads: int, index: int
) -> tuple[list[RunResult], float]:
    """:func:`_train` in a worker, sending its fractions (at most two a second) to the queue."""
    last = 0.0

    def send(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 0.5:
            last = now
            _QUEUE.put((index, fraction))

    return _train(spec, configs, threads, send)
