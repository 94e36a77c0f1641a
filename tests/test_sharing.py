"""Concurrent sweeps on one store share the work: each run is claimed before it is trained, a
dead claimant's claims are taken over, and every run is trained and written exactly once."""

from __future__ import annotations

import multiprocessing as mp
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gaugefix.experiments.runner as runner
import gaugefix.experiments.workers as workers
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.runner import TaskSpec, run_all
from gaugefix.experiments.store import Claimant, Store


def _configs() -> list[RunConfig]:
    ts = TaskSpec("teacher-student").hash()
    return [
        RunConfig("teacher-student", "plain", "gd", lr, 0.0, s, 0, 0, 3, task_hash=ts)
        for lr in (0.05, 0.1, 0.2, 0.4)
        for s in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    ]


def _spec(config: RunConfig) -> TaskSpec:
    return TaskSpec(config.task)


def _sweep_counting(path: str, counts: str, barrier) -> None:
    """A sweep in another process that records the size of every batch it trains."""
    runner.runs_per_batch = lambda task, config: 4
    real = workers.train_group

    def counted(task, configs, **kwargs):
        with open(counts, "a") as f:
            f.write(f"{len(configs)}\n")
        time.sleep(0.2)  # long enough for the other sweep to want the same batches
        return real(task, configs, **kwargs)

    workers.train_group = counted
    barrier.wait()
    run_all(Store(path), _configs(), _spec)


def test_two_concurrent_sweeps_train_each_run_once(tmp_path: Path):
    path = str(tmp_path / "results.sqlite")
    Store(path)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    counts = [tmp_path / f"counts-{k}.txt" for k in range(2)]
    procs = [ctx.Process(target=_sweep_counting, args=(path, str(c), barrier)) for c in counts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    trained = [int(x) for c in counts if c.exists() for x in c.read_text().split()]
    runs = Store(path).runs()
    assert len(runs) == len(_configs()) == len({r.config.key() for r in runs})
    assert sum(trained) == len(_configs())  # no run trained twice
    assert Store(path).claims() == []


def _claim_and_hang(path: str, started: str) -> None:
    """A sweep that claims its first batch and then hangs in training."""
    runner.runs_per_batch = lambda task, config: 4

    def hang(task, configs, **kwargs):
        Path(started).write_text("training")
        time.sleep(600)

    workers.train_group = hang
    run_all(Store(path), _configs(), _spec)


def test_a_killed_claimants_runs_are_taken_over(tmp_path: Path, monkeypatch):
    path = str(tmp_path / "results.sqlite")
    started = tmp_path / "started"
    Store(path)
    proc = mp.get_context("spawn").Process(target=_claim_and_hang, args=(path, str(started)))
    proc.start()
    for _ in range(1200):
        if started.exists() or not proc.is_alive():
            break
        time.sleep(0.1)
    assert started.exists()
    claims = Store(path).claims()
    assert len(claims) == 4 and {c["pid"] for c in claims} == {proc.pid}
    proc.kill()
    proc.join()
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 4)
    assert run_all(Store(path), _configs(), _spec) == len(_configs())
    runs = Store(path).runs()
    assert len(runs) == len(_configs()) == len({r.config.key() for r in runs})
    assert Store(path).claims() == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_claims_hold_until_their_process_dies_or_their_lease_ends(tmp_path: Path):
    store = Store(tmp_path / "results.sqlite")
    keys = [c.key() for c in _configs()[:3]]
    mine, other = Claimant(store), Claimant(store)
    assert store.claim(keys, mine) == keys
    assert store.claim(keys, mine) == keys  # a claimant may renew its own claim
    assert store.claim(keys[1:], other) is None  # all or none
    assert store.claims()[0]["owner"] == mine.id

    def set_claims(**values) -> None:
        import sqlite3

        db = sqlite3.connect(store.path)
        sets = ", ".join(f"{k} = ?" for k in values)
        db.execute(f"UPDATE claims SET {sets}", tuple(values.values()))
        db.commit()
        db.close()

    set_claims(host="elsewhere", pid=1)
    assert store.claim(keys, other) is None  # another host: alive while the lease runs
    set_claims(expires=time.time() - 1)
    assert store.claim(keys, other) == keys  # lease over: taken over
    set_claims(host=socket.gethostname(), pid=_dead_pid(), expires=time.time() + 600)
    assert store.claim(keys, mine) == keys  # this host, process gone: taken over
    before = store.claims()[0]["expires"]
    store.renew(mine)
    assert store.claims()[0]["expires"] >= before
    store.release(other)
    assert len(store.claims()) == 3
    store.release(mine)
    assert store.claims() == []


def test_a_claimant_releases_its_claims_and_writing_a_run_drops_its_claim(tmp_path: Path):
    from gaugefix.experiments.engine import train_group

    store = Store(tmp_path / "results.sqlite")
    configs = _configs()[:2]
    keys = [c.key() for c in configs]
    with Claimant(store) as claimant:
        assert store.claim(keys, claimant) == keys
        (result, _) = train_group(_spec(configs[0]).load(), configs)
        store.add_run(result, 0.0)
        assert [c["key"] for c in store.claims()] == keys[1:]
        assert store.claim(keys, Claimant(store)) is None
    assert store.claims() == []
    assert store.claim(keys, Claimant(store)) == keys[1:]  # the finished run is not claimed


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_moves_within_a_batch(monkeypatch, tmp_path: Path, jobs: int):
    """Progress is reported per step chunk inside a batch, also from worker processes."""
    seen: list[float] = []
    real = Progress.update

    def update(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.value)

    monkeypatch.setattr(Progress, "update", update)
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 1)  # a batch per worker
    ts = TaskSpec("teacher-student").hash()
    configs = [
        RunConfig("teacher-student", "plain", "gd", lr, 0.0, 0.0, 0, 0, 400, task_hash=ts)
        for lr in (0.01, 0.02)
    ]
    run_all(Store(tmp_path / "results.sqlite"), configs, _spec, jobs)
    inside = [v for v in seen if 0 < v < len(configs)]
    assert len(set(inside)) >= (2 if jobs == 1 else 1)  # moved before the batch finished
    assert seen[-1] == len(configs)
