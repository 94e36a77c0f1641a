"""The sweep's executors under faults: a worker that dies (``os._exit``, SIGKILL) mid-batch or
while idle, a run that raises, runs that diverge to NaN, Ctrl-C in the parent, two sweeps on one
store, and the local and Ray executors storing the same rows, bit for bit. After each fault the
store holds no run twice, no claim, and only rows an uninterrupted sweep stores; the same call
resumes it to exactly the uninterrupted store."""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

import gaugefix.experiments.runner as runner
import gaugefix.experiments.workers as workers
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.runner import TaskSpec, run_all
from gaugefix.experiments.store import RECORD_COLUMNS, Store
from gaugefix.experiments.workers import WorkerDied
from processes import all_end, descendants, processes
from test_workers import _configs, _spec

STEPS, SEEDS = 30, 6  # 12 runs of one group
PER_BATCH = 3  # runs per batch under BUDGET: 4 batches, more than two workers hold at once
BUDGET = 1.2e7  # floats of activations: 3 runs of 30 steps of teacher-student
STRIKE = 5  # the step at which an injected fault strikes
# What differs between two stores of the same runs: the row id and the record of the writing.
UNCOMPARED = {"id", *RECORD_COLUMNS}


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(runner, "WORK_BUDGET", BUDGET)


@pytest.fixture(scope="module")
def configs() -> list[RunConfig]:
    return _configs(STEPS, SEEDS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, configs) -> dict:
    """The rows of the sweep trained whole in this process."""
    path = tmp_path_factory.mktemp("reference") / "s.sqlite"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runner, "WORK_BUDGET", BUDGET)
        assert runner.runs_per_batch(_spec(configs[0]).load(), configs[0]) == PER_BATCH
        assert run_all(Store(path), configs, _spec) == len(configs)
    return _rows(path)


def _exact(value: object) -> object:
    """A stored value with its float64 bits (``float.hex``), so equal means bit for bit."""
    return value.hex() if isinstance(value, float) else value


def _rows(path: Path) -> dict[str, tuple]:
    """Every stored run by key: its columns (but the id and record) and its curve, exactly; no
    key twice."""
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        runs = db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        out = {}
        for run in runs:
            curve = db.execute(
                "SELECT * FROM curves WHERE run_id = ? ORDER BY step", (run["id"],)
            ).fetchall()
            columns = tuple((k, _exact(run[k])) for k in run.keys() if k not in UNCOMPARED)
            points = tuple(tuple(_exact(v) for v in tuple(p)[1:]) for p in curve)
            out[run["key"]] = (columns, points)
    finally:
        db.close()
    assert len(out) == len(runs), "a run stored twice"
    return out


def _consistent(path: Path, reference: dict) -> int:
    """Check a store left by a fault: no claim, each row exactly the reference's; its runs."""
    assert Store(path).claims() == []
    rows = _rows(path)
    assert all(rows[k] == reference[k] for k in rows)
    return len(rows)


def _resumes(path: Path, configs: list[RunConfig], reference: dict, jobs: int = 2) -> None:
    """Resuming writes exactly the runs missing, and the store is then the reference."""
    kept = _consistent(path, reference)
    assert run_all(Store(path), configs, _spec, jobs) == len(configs) - kept
    assert _rows(path) == reference


@dataclass(frozen=True)
class Faulty(TaskSpec):
    """A built-in task whose training, in a worker process, meets ``fault`` at step
    :data:`STRIKE` of the first batch to get there (the one that creates the file ``marker``)."""

    fault: str = ""
    marker: str = ""

    def load(self):
        task = super().load()
        if multiprocessing.parent_process() is not None:
            _arm(self.fault, self.marker)
        return task


def _arm(fault: str, marker: str) -> None:
    """Make this process's ``train_batch`` train through a ``train_group`` that meets
    ``fault`` once among all processes (the one that creates ``marker``)."""
    real = workers.train_group
    if getattr(real, "armed", False):
        return

    def train_group(tasks, configs, on_step=None, **kwargs):
        def step(k: int) -> None:
            if k == STRIKE and _first(marker):
                _strike(fault)
            if on_step is not None:
                on_step(k)

        return real(tasks, configs, on_step=step, **kwargs)

    train_group.armed = True
    workers.train_group = train_group


def _first(marker: str) -> bool:
    """Whether this call created the file ``marker`` (true once among all processes)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _strike(fault: str) -> None:
    if fault == "exit":
        os._exit(3)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError("an injected fault")


def _faulty(fault: str, marker: Path):
    def spec_of(config: RunConfig) -> TaskSpec:
        return Faulty(config.task, fault=fault, marker=str(marker)).for_seed(config.seed)

    return spec_of


def _workers() -> set[int]:
    """The processes this one started, but multiprocessing's resource tracker (which stays)."""
    pids = descendants(os.getpid(), processes())
    return {p for p in pids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()}


def _no_workers_left() -> None:
    """Every worker process this one started has ended."""
    deadline = time.monotonic() + 15
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers() == set()


@pytest.mark.parametrize("fault", ["exit", "kill"])
def test_a_worker_that_dies_mid_batch_is_workerdied_and_resumes(
    tmp_path, configs, reference, fault
):
    path = tmp_path / "s.sqlite"
    with pytest.raises(WorkerDied, match="a worker process died "):
        run_all(Store(path), configs, _faulty(fault, tmp_path / "struck"), jobs=2)
    assert (tmp_path / "struck").exists()
    _no_workers_left()
    assert _consistent(path, reference) < len(configs)
    _resumes(path, configs, reference)


def test_a_worker_that_died_idle_is_workerdied_and_writes_nothing(tmp_path, configs):
    """A worker killed between batches (by the out-of-memory killer, say): the next batch or
    call is refused with the same one-line error as one killed mid-batch."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    with workers.local_workers(2) as pool:
        worker = pool.call(os.getpid).result()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while worker in processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the pool has seen it die
        with pytest.raises(WorkerDied):
            run_all(store, configs, _spec, workers=pool)
        with pytest.raises(WorkerDied):
            pool.call(os.getpid).result()
    assert store.runs() == [] and store.claims() == []


def test_a_run_that_raises_in_a_worker_is_raised_and_retried_on_resume(
    tmp_path, configs, reference
):
    path = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="an injected fault"):
        run_all(Store(path), configs, _faulty("raise", tmp_path / "struck"), jobs=2)
    _no_workers_left()
    assert _consistent(path, reference) < len(configs)
    _resumes(path, configs, reference)


def test_a_run_that_raises_in_this_process_restores_its_threads(
    tmp_path, configs, reference, monkeypatch
):
    path = tmp_path / "s.sqlite"
    real, calls = workers.train_group, []

    def train_group(tasks, batch, **kwargs):
        calls.append(torch.get_num_threads())
        if len(calls) == 2:
            raise ValueError("an injected fault")
        return real(tasks, batch, **kwargs)

    monkeypatch.setattr(workers, "train_group", train_group)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="an injected fault"):
            run_all(Store(path), configs, _spec)
        assert calls == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert _consistent(path, reference) == PER_BATCH
    monkeypatch.undo()
    _resumes(path, configs, reference, jobs=1)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, runs: int) -> None:
    """Ctrl-C in the parent once ``runs`` runs are done."""
    real = Progress.update

    def update(self: Progress, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        if self.done >= runs:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", update)


def test_ctrl_c_in_the_parent_ends_the_workers_and_resumes(tmp_path, configs, reference):
    path = tmp_path / "s.sqlite"
    with pytest.MonkeyPatch.context() as m:
        _interrupt_after(m, PER_BATCH)
        with pytest.raises(KeyboardInterrupt):
            run_all(Store(path), configs, _spec, jobs=2)
    _no_workers_left()
    assert PER_BATCH <= _consistent(path, reference) < len(configs)
    _resumes(path, configs, reference)


def test_runs_that_diverge_are_stored_once_alike_by_one_worker_and_two(tmp_path):
    """Runs at rates where the loss overflows: their non-finite values (an infinite peak ratio,
    ``NULL`` where not measured) are the same with one worker and with two, and a resumed sweep
    trains none again."""
    configs = [replace(c, lr=lr) for c in _configs(STEPS, 2)[:2] for lr in (1e3, 1e30)]
    stores = {jobs: tmp_path / f"{jobs}.sqlite" for jobs in (1, 2)}
    for jobs, path in stores.items():
        assert run_all(Store(path), configs, _spec, jobs) == len(configs)
        assert run_all(Store(path), configs, _spec, jobs) == 0
    one, two = _rows(stores[1]), _rows(stores[2])
    assert one == two and len(one) == len(configs)
    runs = Store(stores[1]).runs()
    assert all(r.status == "diverged" and r.final_loss is None for r in runs)
    assert sum(r.peak_loss_ratio == math.inf for r in runs) == 2


def test_a_run_that_returns_nan_is_stored_once_and_reads_back_nan(tmp_path, configs, monkeypatch):
    real = workers.train_group

    def train_group(tasks, batch, **kwargs):
        return [replace(r, initial_loss=math.nan) for r in real(tasks, batch, **kwargs)]

    monkeypatch.setattr(workers, "train_group", train_group)
    store = Store(tmp_path / "s.sqlite")
    assert run_all(store, configs[:PER_BATCH], _spec) == PER_BATCH
    assert run_all(store, configs[:PER_BATCH], _spec) == 0
    runs = store.runs()
    assert len(runs) == PER_BATCH and all(math.isnan(r.initial_loss) for r in runs)


def test_one_worker_and_two_store_the_same_rows_and_progress_counts_the_runs(
    tmp_path, configs, reference, monkeypatch
):
    """Two workers: never more batches in flight (nor claimed) than workers, every batch's
    progress counted once, the rows bit for bit those of one worker."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    seen = _watch_progress(monkeypatch)
    with workers.local_workers(2) as pool:
        counting = _Counting(pool, store)
        assert run_all(store, configs, _spec, workers=counting) == len(configs)
    assert _rows(path) == reference
    assert counting.submitted == len(configs) // PER_BATCH
    assert max(counting.in_flight) == 2 and max(counting.claimed) <= 2 * PER_BATCH
    done = [d for d, _ in seen]
    assert done[-1] == len(configs) and done == sorted(done)
    values = [v for _, v in seen]
    assert values == sorted(values) and values[-1] == len(configs)


def _watch_progress(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float]]:
    """Each update of a sweep's progress: its runs done and its value (done and the fractions
    of the batches in flight)."""
    real, seen = Progress.update, []

    def update(self: Progress, done=None, *args, **kwargs) -> None:
        real(self, done, *args, **kwargs)
        seen.append((self.done, self.value))

    monkeypatch.setattr(Progress, "update", update)
    return seen


class _Counting:
    """Workers that count, at each submitted batch, the batches in flight and the runs claimed."""

    def __init__(self, inner, store: Store) -> None:
        self.inner, self.store, self.width = inner, store, inner.width
        self.futures, self.in_flight, self.claimed, self.submitted = [], [], [], 0

    def submit(self, specs, configs, report):
        future = self.inner.submit(specs, configs, report)
        self.futures.append(future)
        self.submitted += 1
        self.in_flight.append(sum(not f.done() for f in self.futures))
        self.claimed.append(len(self.store.claims()))
        return future

    def deliver(self) -> None:
        self.inner.deliver()

    def call(self, fn, *args):
        return self.inner.call(fn, *args)


_SWEEP = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    import gaugefix.experiments.runner as runner
    from gaugefix.experiments.runner import run_all
    from gaugefix.experiments.store import Store
    from test_workers import _configs, _spec
    runner.WORK_BUDGET = float(sys.argv[3])
    sys.stdin.readline()  # both start together
    print(run_all(Store(sys.argv[1]), _configs(int(sys.argv[4]), int(sys.argv[5])), _spec))
    """
)


def test_two_sweeps_on_one_store_train_each_run_once(tmp_path, configs, reference):
    path = tmp_path / "s.sqlite"
    Store(path)
    here = str(Path(__file__).parent)
    args = [str(path), here, str(BUDGET), str(STEPS), str(SEEDS)]
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-c", _SWEEP, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for sweep in sweeps:
        sweep.stdin.write("go\n")
        sweep.stdin.flush()
    written = []
    for sweep in sweeps:
        out, err = sweep.communicate(timeout=300)
        assert sweep.returncode == 0, err[-3000:]
        written.append(int(out))
    assert sum(written) == len(configs)
    assert _rows(path) == reference and Store(path).claims() == []


_RAY = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    import gaugefix.experiments.runner as runner
    from gaugefix.experiments.ray_executor import ray_executor
    from gaugefix.experiments.runner import run_all
    from gaugefix.experiments.store import Store
    from test_workers import _configs, _spec
    runner.WORK_BUDGET = float(sys.argv[3])
    configs = _configs(int(sys.argv[4]), int(sys.argv[5]))
    with ray_executor(None, 2) as workers:
        assert workers.width == 2
        submit, submitted = workers.submit, []
        workers.submit = lambda *a: submitted.append(1) or submit(*a)
        written = run_all(Store(sys.argv[1]), configs, _spec, workers=workers)
        print(len(submitted), len(workers.refs))
        print(written)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_stores_the_rows_of_the_local_executor_bit_for_bit(tmp_path, configs, reference):
    """Ray (a local instance of 2 CPUs, in a subprocess: this one never imports Ray), keeping
    no reference to a finished task (each held its batch's results in Ray's object store)."""
    path = tmp_path / "s.sqlite"
    args = [str(path), str(Path(__file__).parent), str(BUDGET), str(STEPS), str(SEEDS)]
    driver = subprocess.Popen(
        [sys.executable, "-c", _RAY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with all_end(driver.pid):
        out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    *_, counts, written = out.strip().splitlines()
    assert int(written) == len(configs)
    assert _rows(path) == reference
    # the finished tasks' references are dropped (Ray frees their results): those kept are at
    # most the tasks in flight when the last one was submitted, and that one
    submitted, kept = map(int, counts.split())
    assert kept <= 3 < submitted


GAUGEFIX = [sys.executable, "-c", "from gaugefix.cli import app; app()"]
INTERRUPTED = "interrupted: finished runs are stored; run the same command to resume"
# Seconds from a worker's loading of torch's library to the Ctrl-C: it imports torch's Python
# modules meanwhile (more than a second of the 2-core machine's; most of it after this).
IMPORTING = 0.3


@pytest.mark.parametrize("attempt", [1, 2])  # the Ctrl-C meets a worker's imports by chance
def test_ctrl_c_at_a_terminal_while_the_workers_start_is_one_line(tmp_path, attempt):
    """A terminal's Ctrl-C reaches the whole foreground process group: workers still starting
    (importing, before they could ignore it) print no traceback of their own."""
    args = ["--task", "teacher-student", "--optimizer", "gd,sgd", "--steps", "1000"]
    sweep = subprocess.Popen(
        [*GAUGEFIX, "sweep", *args, "--jobs", "2", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    with all_end(sweep.pid):
        deadline = time.monotonic() + 120
        while not _started(sweep.pid) and time.monotonic() < deadline:
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.01)
        time.sleep(IMPORTING)
        os.killpg(sweep.pid, signal.SIGINT)
        _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, err
    assert [line for line in err.splitlines() if not line.startswith("[gaugefix]")] == [INTERRUPTED]


def _started(root: int) -> bool:
    """Whether a worker process of the sweep ``root`` imports torch (started, not yet able to
    ignore Ctrl-C, which it does once its imports are done)."""
    for pid in descendants(root, processes()):
        try:
            maps = Path(f"/proc/{pid}/maps").read_bytes()
        except OSError:
            continue
        if b"libtorch" in maps:
            return True
    return False
