"""Second audit of the sweep's store, runner and executors: progress of a batch that holds runs
already stored, a bisection resumed mid-round batched as an uninterrupted one, one run under two
names of its dtype, a finished batch kept when another fails beside it, learning rates the
summary's keys would merge, and Ray's rows against the local pool's, column by column."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from concurrent.futures import Future

import numpy as np
import pytest

import gaugefix.experiments.runner as runner
import gaugefix.experiments.workers as workers
from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.plan import Block, lr_grid
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.runner import TaskSpec, run_all, run_bisected, spec_of_run
from gaugefix.experiments.store import RESULT_COLUMNS, Store
from gaugefix.experiments.summary import summarize
from gaugefix.experiments.tasks import TaskError
from runs import run_result

TASK = "teacher-student"


def _configs(lrs: tuple[float, ...], seeds: int, steps: int, **changes) -> list[RunConfig]:
    """Plain full-batch GD runs of teacher-student, each seed on its own instance."""
    hashes = {seed: TaskSpec(TASK).for_seed(seed).hash() for seed in range(seeds)}
    return [
        RunConfig(
            TASK, "plain", "gd", lr, 0.0, 0.0, seed, 0, steps, task_hash=hashes[seed], **changes
        )
        for seed in range(seeds)
        for lr in lrs
    ]


def _rows(store: Store) -> dict[str, tuple]:
    """Every stored run by key: every result column and its curve, NaN as a string (so that
    equal rows compare equal)."""

    def same(v: object) -> object:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return {
        r.config.key(): (
            tuple(same(getattr(r, k)) for k in RESULT_COLUMNS),
            tuple(tuple(map(same, p)) for p in store.curves(r.id)),
        )
        for r in store.runs()
    }


def test_progress_counts_only_the_runs_a_batch_adds_to_the_store(tmp_path, monkeypatch):
    """A batch that also holds runs already stored (trained again, so that it is the batch of
    an uninterrupted sweep) credits only its new runs: the progress never shows more runs done
    than the sweep has to do, so its time left is not cut short."""
    configs = _configs((0.05, 0.1), seeds=2, steps=20)  # one batch of 4
    store = Store(tmp_path / "s.sqlite")
    assert run_all(store, [c for c in configs if c.lr == 0.05], spec_of_run) == 2
    seen: list[tuple[int, float]] = []
    real = Progress.update

    def update(self: Progress, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        seen.append((self.total, self.done + sum(self.parts.values())))

    monkeypatch.setattr(Progress, "update", update)
    assert run_all(store, configs, spec_of_run) == 2
    assert {total for total, _ in seen} == {2}
    assert max(shown for _, shown in seen) == pytest.approx(2.0, abs=1e-12), seen


def _record_batches(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list:
    """Record the keys of every batch trained; with ``stop_at``, interrupt the sweep when the
    ``stop_at``-th batch of bisection runs is about to train."""
    trained: list[frozenset[str]] = []
    real = workers.train_batch

    def train(tasks, configs, report=None):
        bisecting = sum(1 for b in trained if any('"bisection": 0' not in k for k in b))
        if stop_at is not None and configs[0].bisection and bisecting + 1 == stop_at:
            raise KeyboardInterrupt
        trained.append(frozenset(c.key() for c in configs))
        return real(tasks, configs, report)

    monkeypatch.setattr(workers, "train_batch", train)
    return trained


def test_a_bisection_resumed_mid_round_trains_the_batches_of_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    """Interrupted after the first batch of its first round of bisection and resumed, a sweep
    trains only batches that the uninterrupted sweep trained (a run's rounding depends on the
    runs beside it in its batch), and stores the same rows to the last bit."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 2)
    configs = _configs(tuple(lr_grid(-8, 8, 4)), seeds=5, steps=30)
    whole = Store(tmp_path / "whole.sqlite")
    with monkeypatch.context() as m:
        uninterrupted = _record_batches(m)
        run_bisected(whole, configs, spec_of_run, rounds=2)
    assert {r.config.bisection for r in whole.runs()} == {0, 1, 2}
    resumed = Store(tmp_path / "resumed.sqlite")
    with monkeypatch.context() as m:
        _record_batches(m, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            run_bisected(resumed, configs, spec_of_run, rounds=2)
    assert 0 < sum(1 for r in resumed.runs() if r.config.bisection) < 5  # stopped mid-round
    with monkeypatch.context() as m:
        again = _record_batches(m)
        run_bisected(resumed, configs, spec_of_run, rounds=2)
    assert again and set(again) <= set(uninterrupted), [sorted(b) for b in again]
    assert _rows(resumed) == _rows(whole)


def test_a_dtype_alias_is_refused_not_stored_as_a_second_run(tmp_path):
    """``dtype="double"`` trains exactly the run ``dtype="float64"`` does; under its own key it
    would be stored (and summarised) twice. It is refused before anything is written."""
    (run,) = _configs((0.1,), seeds=1, steps=3, dtype="float64")
    store = Store(tmp_path / "s.sqlite")
    assert run_all(store, [run], spec_of_run) == 1
    before = _rows(store)
    for alias in ("double", "float"):
        with pytest.raises(ValueError, match=f"dtype {alias!r}, another name of torch.float"):
            run_all(store, [dataclasses.replace(run, dtype=alias)], spec_of_run)
    assert _rows(store) == before and store.claims() == []


class _Failing:
    """Workers of width 2 whose first batch finishes and whose second raises, both at once."""

    width = 2

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def submit(self, specs, configs, report):
        future: Future = Future()
        if self.futures:
            future.set_exception(RuntimeError("a bug in one run"))
        else:
            future.set_result(workers.train_batch([s.load() for s in specs], configs))
        self.futures.append(future)
        return future

    def deliver(self) -> None:
        pass


def test_a_finished_batch_is_stored_when_a_batch_beside_it_fails(tmp_path, monkeypatch):
    """Two batches finish together, one with an error: the other's runs are written before
    the error ends the sweep, so resuming trains only the failed batch again."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 2)
    configs = _configs((0.05, 0.1), seeds=2, steps=5)  # two batches of 2
    pool = _Failing()
    real_wait = workers.wait

    def failing_first(futures, **kwargs):
        done, pending = real_wait(futures, **kwargs)
        return sorted(done, key=lambda f: f is pool.futures[0]), pending  # the failure first

    monkeypatch.setattr(workers, "wait", failing_first)
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(RuntimeError, match="a bug in one run"):
        run_all(store, configs, spec_of_run, workers=pool)
    assert len(store.runs()) == 2 and store.claims() == []


def test_learning_rates_equal_to_six_digits_are_refused_not_merged(tmp_path):
    """The summary keys a learning rate by its first 6 digits: two rates that share them are
    one clear error (before, the later rate's median silently replaced the earlier's)."""
    store = Store(tmp_path / "s.sqlite")
    for lr, loss in ((2**-0.5, 0.2), (0.707107, 0.3)):  # "0.707107" both
        for method in ("plain", "balanced-init"):
            store.add_run(dataclasses.replace(run_result(method, lr, 1.0), final_loss=loss), 1.0)
    with pytest.raises(ValueError, match="equal to 6 digits"):
        summarize(store, False)


_EXECUTORS = textwrap.dedent(
    """
    import json, math, sys
    from gaugefix.experiments.engine import RunConfig
    from gaugefix.experiments.ray_executor import ray_executor
    from gaugefix.experiments.runner import run_bisected, spec_of_run
    from gaugefix.experiments.store import Store
    from gaugefix.experiments.workers import local_workers
    configs = [RunConfig(**c) for c in json.loads(sys.argv[1])]
    for name, workers in (("local", local_workers(2)), ("ray", ray_executor(None, 2))):
        with workers as pool:
            run_bisected(Store(f"{sys.argv[2]}/{name}.sqlite"), configs, spec_of_run, 1,
                         workers=pool)
    """
)


def test_ray_and_the_local_pool_store_the_same_rows_to_the_last_bit(tmp_path):
    """The same plan, grid and a round of bisection, through Ray and through two local worker
    processes: every column of every run (its peak loss ratio and constant loss included) and
    every curve point is the same, under the same keys."""
    pytest.importorskip("ray")
    configs = _configs((0.125, 1.0, 8.0), seeds=2, steps=20) + _configs(
        (0.125, 1.0, 8.0), seeds=2, steps=20, dtype="float64"
    )
    arg = json.dumps([dataclasses.asdict(c) for c in configs])
    done = subprocess.run(
        [sys.executable, "-c", _EXECUTORS, arg, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    local, ray = Store(tmp_path / "local.sqlite"), Store(tmp_path / "ray.sqlite")
    assert any(r.config.bisection for r in local.runs())
    assert _rows(ray) == _rows(local)
    assert len(_rows(local)) == len(local.runs())


def test_a_strength_for_a_method_without_one_is_refused_not_stored_as_a_second_run(tmp_path):
    """Plain at strength 0.5 trains exactly plain at 0 (the engine ignores it); under its own
    key it would be stored twice and plain would look tuned over two strengths. The runner and a
    block refuse it, before anything is written."""
    (run,) = _configs((0.1,), seeds=1, steps=3)
    store = Store(tmp_path / "s.sqlite")
    assert run_all(store, [run], spec_of_run) == 1
    before = _rows(store)
    with pytest.raises(ValueError, match="'plain', which has no strength, the strength 0.5"):
        run_all(store, [dataclasses.replace(run, strength=0.5)], spec_of_run)
    assert _rows(store) == before and store.claims() == []
    with pytest.raises(ValueError, match=r"methods \['balance'\] have no strength"):
        Block({"plain": (0.0,), "balance": (0.0, 0.5)}, "gd", (-2, 2), (0.0,), 1, 10)


def test_a_data_file_changed_during_a_sweep_is_refused_not_stored_under_its_old_hash(
    tmp_path, monkeypatch
):
    """The sweep hashes the data file before it trains; a worker process reads the file when it
    starts. Where the file changed in between, the worker refuses, rather than store runs of
    the new data under the old data's task hash."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 1)  # 2 batches, 2 workers
    x = np.random.default_rng(0).normal(size=(64, 5))
    path = tmp_path / "d.npz"
    np.savez(path, X=x, y=x[:, :1])
    spec = TaskSpec("d", str(path), "regression", (8,))
    configs = [
        RunConfig("d", "plain", "gd", lr, 0.0, 0.0, 0, 0, 3, task_hash=spec.hash())
        for lr in (0.1, 0.2)
    ]
    np.savez(path, X=x, y=2 * x[:, :1])  # the data change after the sweep hashed them
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(TaskError, match=r"the data of task 'd' changed while the sweep ran"):
        run_all(store, configs, lambda c: spec, jobs=2)
    assert store.runs() == [] and store.claims() == []


def test_a_task_error_during_a_sweep_command_is_one_error_line(capsys):
    """The ``sweep`` command's block ends a :class:`TaskError` raised while it trains (a data
    file changed under a worker) with one ``error:`` line and exit status 2, no traceback."""
    import typer

    from gaugefix import cli

    with pytest.raises(typer.Exit) as exit_info, cli._interruptible():
        raise TaskError("the data of task 'd' changed while the sweep ran")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == "error: the data of task 'd' changed while the sweep ran\n"
