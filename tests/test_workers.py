"""Where batches are trained: worker processes that end with their parent, SIGTERM like Ctrl-C,
one thread per worker, work lost to a kill bounded by a batch, a waiting sweep that says so."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import gaugefix.cli
import gaugefix.experiments.runner as runner
import gaugefix.experiments.workers as workers
from gaugefix.cli import app
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.runner import TaskSpec, run_all
from gaugefix.experiments.store import Claimant, Store
from gaugefix.experiments.summary import summarize
from gaugefix.report import STORE_NAME
from processes import all_end, descendants, processes

cli = CliRunner()
GAUGEFIX = [sys.executable, "-c", "from gaugefix.cli import app; app()"]
# Two groups (two batches, one per worker) of long runs: killed long before they finish.
LONG = ["--task", "teacher-student", "--optimizer", "gd,sgd", "--steps", "100000"]
INTERRUPTED = "interrupted: finished runs are stored; run the same command to resume"


def _spec(config: RunConfig) -> TaskSpec:
    """The task instance of the run's seed, as ``sweep`` trains it."""
    return TaskSpec(config.task).for_seed(config.seed)


def _configs(steps: int, seeds: int) -> list[RunConfig]:
    """Plain runs at two rates per seed, each seed on its instance (one group)."""
    ts = {seed: TaskSpec("teacher-student").for_seed(seed).hash() for seed in range(seeds)}
    return [
        RunConfig(
            "teacher-student", "plain", "gd", lr, 0.0, 0.0, seed, 0, steps, task_hash=ts[seed]
        )
        for lr in (0.05, 0.1)
        for seed in range(seeds)
    ]


def _stored(path: Path, table: str = "runs") -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0
    finally:
        db.close()


def _training(out: Path, args: list[str]) -> subprocess.Popen:
    """``gaugefix sweep ARGS --out OUT``, returned once both its workers train a batch."""
    proc = subprocess.Popen(
        [*GAUGEFIX, "sweep", *args, "--jobs", "2", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while _stored(out / STORE_NAME, "claims") < 2 or len(descendants(proc.pid, processes())) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_workers_end_when_the_sweep_is_killed(tmp_path):
    out = tmp_path / "out"
    proc = _training(out, LONG)
    with all_end(proc.pid, within=15) as seen:
        time.sleep(0.5)  # the watcher has seen every worker
        proc.kill()
        proc.wait(60)
    assert len(seen) >= 2


def test_sigterm_ends_a_sweep_with_one_line_and_a_consistent_store(tmp_path):
    out = tmp_path / "out"
    args = ["--task", "teacher-student", "--optimizer", "gd,sgd", "--steps", "1000"]
    proc = _training(out, args)
    with all_end(proc.pid, within=15):
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert [line for line in err.splitlines() if not line.startswith("[gaugefix]")] == [INTERRUPTED]
    store = Store(out / STORE_NAME)
    assert store.claims() == [] and len(store.runs()) < 2
    result = cli.invoke(app, ["sweep", *args, "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(Store(out / STORE_NAME).runs()) == 2


_ORPHAN = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
_WATCHING = "import sys; import gaugefix.experiments.workers as w; w.watch_parent(int(sys.argv[1]))"


def test_the_watch_on_the_parent_ends_a_process_without_the_kernels_signal():
    """The portable fallback alone (no prctl): the watching thread's loop ends the process."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, _WATCHING], stdout=subprocess.PIPE, text=True
    )
    with all_end(parent.pid, within=3 * workers.PARENT_POLL + 5) as seen:
        child = int(parent.stdout.readline())
        time.sleep(0.5)
        assert child in processes()
        parent.kill()
        parent.wait()
    assert child in seen


def test_a_batch_trains_with_one_thread_and_the_default_is_a_worker_per_core(tmp_path, monkeypatch):
    threads = []
    real = workers.train_group

    def counting(task, configs, **kwargs):
        threads.append(torch.get_num_threads())
        return real(task, configs, **kwargs)

    monkeypatch.setattr(workers, "train_group", counting)
    torch.set_num_threads(2)
    run_all(Store(tmp_path / "s.sqlite"), _configs(2, 1), _spec)
    assert threads == [1] and torch.get_num_threads() == 2  # restored after the batch
    widths = []

    def local_workers(jobs):
        widths.append(jobs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "local_workers", local_workers)
    monkeypatch.setattr(gaugefix.cli, "cores", lambda: 3)
    grid = ["--task", "teacher-student", "--optimizer", "gd,sgd,momentum,adam", "--steps", "2"]
    result = cli.invoke(app, ["sweep", *grid, "--out", str(tmp_path / "out")])
    assert result.exit_code == 130
    assert widths == [3]  # 3 cores: 3 workers for 4 batches
    assert "one per core" in cli.invoke(app, ["sweep", "--help"]).output


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, runs: float) -> list[float]:
    """Interrupt the sweep once its progress shows ``runs`` runs; returns the progress then."""
    real = Progress.update
    at: list[float] = []

    def update(self: Progress, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        if self.value >= runs and not at:
            at.append(self.value)
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", update)
    return at


def test_an_interruption_loses_at_most_the_batch_in_progress(tmp_path, monkeypatch):
    configs = _configs(100, 12)  # 24 runs
    monkeypatch.setattr(runner, "WORK_BUDGET", 4e7)  # 3 runs of 100 steps of teacher-student
    assert runner.runs_per_batch(_spec(configs[0]).load(), configs[0]) == 3
    whole = Store(tmp_path / "whole.sqlite")
    run_all(whole, configs, _spec)
    resumed = Store(tmp_path / "resumed.sqlite")
    with monkeypatch.context() as m:
        at = _interrupt_at(m, len(configs) / 2)
        with pytest.raises(KeyboardInterrupt):
            run_all(resumed, configs, _spec)
    kept = len(resumed.runs())
    assert at and at[0] - 3 <= kept <= at[0]  # what the progress showed, but the batch running
    assert resumed.claims() == []
    assert run_all(resumed, configs, _spec) == len(configs) - kept
    a, b = summarize(resumed, False), summarize(whole, False)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def _results(store: Store) -> dict[str, tuple]:
    fields = ("status", "initial_loss", "final_loss", "log_ratio_rms", "mu_rel_max")
    return {r.config.key(): tuple(getattr(r, f) for f in fields) for r in store.runs()}


def test_a_sweep_killed_midway_keeps_its_finished_batches_and_resumes(tmp_path):
    """With the default work budget a batch of 2000 steps of teacher-student holds up to 7 runs;
    the 8 runs of 4 seeds (one group) make 2 batches of 4."""
    configs = _configs(2000, 4)  # 8 runs: 2 batches of 4
    assert runner.runs_per_batch(_spec(configs[0]).load(), configs[0]) == 7
    args = ["--task", "teacher-student", "--lr", "0.05,0.1", "--seeds", "4", "--steps", "2000"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*GAUGEFIX, "sweep", *args, "--jobs", "1", "--out", str(out)])
    deadline = time.monotonic() + 300
    while _stored(out / STORE_NAME) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    before = _stored(out / STORE_NAME)
    assert 0 < before < len(configs), "the sweep was not killed midway"
    result = cli.invoke(app, ["sweep", *args, "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(configs) - before} new runs" in result.output
    whole = Store(tmp_path / "whole.sqlite")
    run_all(whole, configs, _spec)
    assert _results(Store(out / STORE_NAME)) == _results(whole)


def test_a_waiting_sweep_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    configs = _configs(2, 2)
    store = Store(tmp_path / "s.sqlite")
    lines = []
    real = Progress._show

    def show(self: Progress, force: bool) -> None:
        lines.append(self.label)
        real(self, force)
        if len(lines) == 3:  # the other sweep finishes (or dies): its claims go
            other.__exit__(None, None, None)

    monkeypatch.setattr(Progress, "_show", show)
    monkeypatch.setattr(runner, "POLL", 0.05)
    other = Claimant(store).__enter__()
    assert store.claim([c.key() for c in configs], other)
    assert run_all(store, configs, _spec) == len(configs)
    waiting = f"waiting for 4 runs that another sweep is training (pid {os.getpid()} on "
    assert any(label.startswith(waiting) for label in lines), lines


def test_call_computes_on_the_worker_processes_with_one_thread():
    """The reproduction's analyses go to the workers that trained its runs: ``call`` runs a
    function there, with one intra-op thread; in this process, it hands back what it raised."""
    with workers.local_workers(2) as pool:
        assert pool.call(torch.get_num_threads).result() == 1
        assert pool.call(os.getpid).result() != os.getpid()
    here = workers.InProcess()
    assert here.call(os.getpid).result() == os.getpid()
    with pytest.raises(ZeroDivisionError):
        here.call(divmod, 1, 0).result()


def _a_worker(root: int) -> int:
    """A worker process of the sweep ``root`` (not multiprocessing's resource tracker)."""
    for pid in sorted(descendants(root, processes())):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"resource_tracker" not in cmdline:
            return pid
    raise AssertionError("no worker process")


def test_a_worker_killed_by_the_system_ends_the_sweep_with_one_line(tmp_path):
    """A worker ended by a SIGKILL (as the out-of-memory killer ends it): one line, exit status
    2, the claims released, and the same command resumes."""
    out = tmp_path / "out"
    args = ["--task", "teacher-student", "--optimizer", "gd,sgd", "--steps", "1000"]
    proc = _training(out, args)
    with all_end(proc.pid, within=15):
        os.kill(_a_worker(proc.pid), signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("[gaugefix]")]
    assert len(lines) == 1 and "a worker process died (killed" in lines[0], err
    assert Store(out / STORE_NAME).claims() == []
    result = cli.invoke(app, ["sweep", *args, "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(Store(out / STORE_NAME).runs()) == 2
