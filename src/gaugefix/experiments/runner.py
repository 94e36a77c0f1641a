"""Executing a list of runs into a store: deterministic batches, resumption, progress, workers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context

import torch

from gaugefix.experiments.engine import RunConfig, RunResult, task_hash, train_group
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import Task, load_task

ACTIVATION_BUDGET = 6e7  # floats of activations one batch may hold


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


def _train(spec: TaskSpec, configs: list[RunConfig], threads: int) -> tuple[list[RunResult], float]:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    results = train_group(spec.load(), configs)
    return results, time.perf_counter() - start


class Progress:
    """Runs done and time left: a tqdm bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, every: float = 15.0) -> None:
        self.total, self.done, self.every = total, 0, every
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="run", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            print(
                f"[gaugefix] {self.done}/{self.total} runs, {elapsed:.0f} s elapsed, "
                f"~{left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_all(
    store: Store,
    configs: list[RunConfig],
    spec_of: Callable[[RunConfig], TaskSpec],
    jobs: int = 1,
    batched: bool = True,
) -> int:
    """Train every config the store does not hold yet and write each finished run in its own
    transaction. Returns the number of runs written."""
    for c in configs:
        if c.task_hash != spec_of(c).hash():
            raise ValueError(
                f"a run of task {c.task!r} has task hash {c.task_hash}, but the task loads with "
                f"hash {spec_of(c).hash()}"
            )
    finished = store.finished_keys()
    todo = [
        b for b in batches(configs, spec_of, batched) if any(c.key() not in finished for c in b)
    ]
    progress = Progress(sum(len(b) for b in todo))
    written = 0
    try:
        for results, seconds in _execute(todo, spec_of, jobs):
            for r in results:
                if r.config.key() not in finished:
                    written += store.add_run(r, seconds / len(results))
            progress.update(len(results))
    finally:
        progress.close()
    return written


def _execute(
    todo: list[list[RunConfig]], spec_of: Callable[[RunConfig], TaskSpec], jobs: int
) -> Iterator[tuple[list[RunResult], float]]:
    cores = torch.get_num_threads()
    if jobs <= 1:
        for batch in todo:
            yield _train(spec_of(batch[0]), batch, cores)
        return
    threads = max(1, cores // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_train, spec_of(b[0]), b, threads) for b in todo]
        for f in futures:
            yield f.result()
