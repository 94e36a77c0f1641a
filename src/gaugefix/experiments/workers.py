"""Where a sweep's batches of runs are trained: in this process, in local worker processes, or
on a Ray cluster (:mod:`gaugefix.experiments.ray_executor`), all driven by one loop over futures
(:func:`execute`) and trained by one function (:func:`train_batch`), with one intra-op thread."""

from __future__ import annotations

import ctypes
import itertools
import os
import platform
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import lru_cache, partial
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gaugefix.errors import GaugefixError
from gaugefix.experiments.engine import RunConfig, RunResult, train_group
from gaugefix.experiments.tasks import Task, TaskError

__all__ = [
    "cores",
    "execute",
    "in_this_process",
    "local_workers",
    "PARENT_POLL",
    "train_batch",
    "Trained",
    "WorkerDied",
    "Workers",
]

if TYPE_CHECKING:
    from gaugefix.experiments.runner import TaskSpec


class WorkerDied(GaugefixError, RuntimeError):
    """A local worker process ended (killed, or out of memory): the batch it trained, and any
    given to its pool later, cannot finish."""


_DIED = (
    "a worker process died (killed, or out of memory?); finished runs are stored; run the "
    "same command to resume"
)


REPORT_EVERY = 0.5  # seconds between a worker's progress reports, and between looks at them
PARENT_POLL = 1.0  # seconds between a worker's looks at whether its parent still lives
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal sent when the parent dies

# glibc's mallopt parameters (malloc.h) and the size below which freed memory stays in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30

# A batch's result: its runs and the seconds it took.
Trained = tuple[list[RunResult], float]


def cores() -> int:
    """The CPUs this process may run on: the default number of worker processes."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def train_batch(
    tasks: list[Task], configs: list[RunConfig], report: Callable[[float], None] | None = None
) -> Trained:
    """Train one batch (runs of one group, run ``r`` on ``tasks[r]``) with one intra-op thread,
    so that workers side by side never oversubscribe the cores; ``report(f)`` gets the fraction
    of its steps done."""
    keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    steps = configs[0].steps + 1
    on_step = None if report is None else lambda step: report((step + 1) / steps)
    try:
        results = train_group(tasks, configs, on_step=on_step)
    finally:
        torch.set_num_threads(threads)
    return results, time.perf_counter() - start


class Workers(Protocol):
    """Trains batches, ``width`` at a time: :meth:`submit` returns a future of
    :func:`train_batch`'s result (``specs``: each run's task); :meth:`deliver` passes the
    progress reports that arrived (fractions of a batch's steps) to the ``report`` of batches
    still running; :meth:`call` returns a future of ``fn(*args)`` (a module-level function,
    run with one intra-op thread where the workers are processes)."""

    width: int

    def submit(
        self, specs: list[TaskSpec], configs: list[RunConfig], report: Callable[[float], None]
    ) -> Future[Trained]: ...

    def deliver(self) -> None: ...

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]: ...


def in_this_process(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """A future of ``fn(*args)``, computed now in this process (its exception, if it raises)."""
    future: Future[Any] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as err:  # noqa: BLE001 - handed to whoever reads the future
        future.set_exception(err)
    return future


def _call_in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker process, with one intra-op thread (as :func:`train_batch`)."""
    keep_freed_memory()
    torch.set_num_threads(1)
    return fn(*args)


def execute(
    workers: Workers,
    todo: Iterator[list[RunConfig]],
    spec_of: Callable[[RunConfig], TaskSpec],
    on_fraction: Callable[[int, float], None],
) -> Iterator[tuple[int, list[RunResult], float]]:
    """Train the batches of ``todo`` on ``workers``, asking for the next one only when a worker
    is free (so each is claimed in the store just before it is trained); yields ``(index,
    results, seconds)`` as batches finish and reports ``on_fraction(index, fraction of its
    steps done)`` meanwhile."""
    running: dict[Future[Trained], int] = {}
    batches = enumerate(todo)
    more = True
    while running or more:
        while more and len(running) < workers.width:
            item = next(batches, None)
            if item is None:
                more = False
            else:
                i, batch = item
                specs = [spec_of(c) for c in batch]
                running[workers.submit(specs, batch, partial(on_fraction, i))] = i
        finished, _ = wait(running, timeout=REPORT_EVERY, return_when=FIRST_COMPLETED)
        workers.deliver()
        # the batches that trained first, so that they are written before an error ends the loop
        for future in sorted(finished, key=lambda f: f.exception() is not None):
            trained = future.result()
            yield (running.pop(future), *trained)


class InProcess:
    """Trains each batch in this process, as it is submitted."""

    width = 1

    def submit(
        self, specs: list[TaskSpec], configs: list[RunConfig], report: Callable[[float], None]
    ) -> Future[Trained]:
        return in_this_process(train_batch, [spec.load() for spec in specs], configs, report)

    def deliver(self) -> None:
        """Nothing to pass on: :meth:`submit` reports as it trains."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return in_this_process(fn, *args)


class WorkerProcesses:
    """``width`` spawned worker processes, each ending when this process dies (whatever the
    signal, SIGKILL included) and ignoring Ctrl-C (this process ends them). Leaving the
    ``with`` block on an exception (an interrupt, SIGTERM turned into one, an error) ends the
    workers at once: the batches they were training are abandoned, never written."""

    def __init__(self, width: int) -> None:
        ctx = get_context("spawn")
        self.width = width
        self.reports = ctx.Queue()
        self.pool = ProcessPoolExecutor(
            width, mp_context=ctx, initializer=_start_worker, initargs=(os.getpid(), self.reports)
        )
        self.tokens = itertools.count()
        self.running: dict[int, tuple[Future[Trained], Callable[[float], None]]] = {}

    def submit(
        self, specs: list[TaskSpec], configs: list[RunConfig], report: Callable[[float], None]
    ) -> Future[Trained]:
        token = next(self.tokens)
        future = self._submit(_train_in_worker, specs, configs, token)
        self.running[token] = (future, report)
        return future

    def deliver(self) -> None:
        while True:
            try:
                token, fraction = self.reports.get_nowait()
            except queue.Empty:
                break
            future, report = self.running.get(token, (None, None))
            if future is not None and not future.done():  # a late report is dropped
                report(fraction)
        self.running = {t: fr for t, fr in self.running.items() if not fr[0].done()}

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._submit(_call_in_worker, fn, *args)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """A future of ``fn(*args)`` on a worker: a :class:`WorkerDied` where a worker process
        died, while this call ran or before it was made (the pool is then unusable)."""
        try:
            with _ctrl_c_held():  # where the pool starts a worker process
                future = self.pool.submit(fn, *args)
        except BrokenProcessPool:
            raise WorkerDied(_DIED) from None
        relay: Future[Any] = Future()
        future.add_done_callback(partial(_relay, relay))
        return relay

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            # ProcessPoolExecutor has no public way to stop a running call before Python 3.14
            for process in list((self.pool._processes or {}).values()):
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reports.close()
        self.reports.join_thread()


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold back SIGINT from this thread for the block: a process it starts meanwhile inherits
    the held signal, so a terminal's Ctrl-C (sent to the whole process group) cannot interrupt
    a worker's imports before its initializer ignores it; this process gets it after the block.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _relay(relay: Future[Any], done: Future[Any]) -> None:
    """Give ``relay`` the outcome of the pool's future ``done``: its result, its exception (a
    broken pool's as :class:`WorkerDied`), or its cancellation."""
    if done.cancelled():
        relay.cancel()
    elif isinstance(done.exception(), BrokenProcessPool):
        relay.set_exception(WorkerDied(_DIED))
    elif done.exception() is not None:
        relay.set_exception(done.exception())
    else:
        relay.set_result(done.result())


@contextmanager
def local_workers(jobs: int) -> Iterator[Workers]:
    """This process for ``jobs <= 1``, else ``jobs`` worker processes, for the block."""
    if jobs <= 1:
        yield InProcess()
        return
    with WorkerProcesses(jobs) as workers:
        yield workers


_REPORTS: Any = None  # a worker process's queue of (token, fraction of its batch's steps done)


def _start_worker(parent: int, reports: Any) -> None:
    global _REPORTS
    _REPORTS = reports
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends us
    exit_with_parent(parent)


def exit_with_parent(parent: int) -> None:
    """End this process as soon as its parent, process ``parent``, dies: the kernel's
    parent-death signal on Linux, and everywhere a thread that watches the parent's id (which
    also covers a parent that died before the signal was asked for)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()


def watch_parent(parent: int) -> None:
    """End this process once its parent is no longer process ``parent`` (never returns)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os._exit(1)


def _train_in_worker(specs: list[TaskSpec], configs: list[RunConfig], token: int) -> Trained:
    """:func:`train_batch` in a worker process, sending its fractions (at most one per
    :data:`REPORT_EVERY` seconds) to the parent; a :class:`TaskError` where a data file this
    process read is no longer the one the runs' task hash was taken of (it changed on disk)."""
    for spec, config in zip(specs, configs, strict=True):
        if spec.data is not None and spec.hash() != config.task_hash:
            raise TaskError(
                f"the data of task {config.task!r} changed while the sweep ran ({spec.data} now "
                f"has task hash {spec.hash()}, its runs {config.task_hash}); no run is stored "
                "under the hash of other data: run the command again for the new data"
            )
    last = 0.0

    def send(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= REPORT_EVERY:
            last = now
            _REPORTS.put((token, fraction))

    return train_batch([spec.load() for spec in specs], configs, send)
