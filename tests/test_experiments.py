"""The reproduction pipeline: engine, store, resumption, bad input, the quick run's summary."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gaugefix.cli
import gaugefix.experiments.engine as engine
import gaugefix.experiments.runner as runner
from gaugefix.cli import app
from gaugefix.experiments.engine import RunConfig, RunResult, train_group
from gaugefix.experiments.plan import Block, lr_grid
from gaugefix.experiments.runner import TaskSpec, run_all, run_bisected, spec_of_run
from gaugefix.experiments.stability import BISECTION_BRACKET, TUNING_SEEDS
from gaugefix.experiments.store import Store
from gaugefix.experiments.summary import Summary, summarize
from gaugefix.experiments.tasks import load_task
from schema import problems

cli = CliRunner()
TS = TaskSpec("teacher-student").hash()


def _grid(dtype: str = "float32", steps: int = 15) -> list[RunConfig]:
    return [
        RunConfig("teacher-student", m, "gd", lr, st, s, seed, 0, steps, dtype, task_hash=TS)
        for m, st in (("plain", 0.0), ("exact", 1.0), ("penalty", 0.1), ("balance", 0.0))
        for lr in (0.1, 0.4, 3.2)
        for s in (0.0, 1.0)
        for seed in (0, 1)
    ]


def test_batched_runs_equal_one_by_one_in_float64():
    configs = _grid("float64")
    task = load_task("teacher-student")
    together = {r.config: r for r in train_group(task, configs)}
    for c in configs[::5]:
        (alone,) = train_group(task, [c])
        both = together[c]
        assert alone.status == both.status
        if alone.final_loss is not None:
            assert math.isclose(alone.final_loss, both.final_loss, rel_tol=1e-6)


_RSS_AFTER_FREE = """
import platform, resource, sys, torch
import gaugefix.experiments.workers as workers
if sys.argv[1] == "keep":
    workers.keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
x = torch.ones(2**26)  # 256 MiB
del x
print(platform.libc_ver()[0], (rss() - before) / 2**20)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_keeps_a_freed_block_resident(mode):
    out = subprocess.run(
        [sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[0] != "glibc":
        pytest.skip("keep_freed_memory acts on glibc only")
    kept_mib = float(out[1])
    assert kept_mib > 200 if mode == "keep" else kept_mib < 50


def test_divergent_members_are_masked_without_stopping_others():
    task = load_task("teacher-student")
    configs = [
        RunConfig("teacher-student", "plain", "gd", lr, 0.0, 0.0, 0, 0, 30, task_hash=TS)
        for lr in (0.1, 100.0)
    ]
    ok, bad = train_group(task, configs)
    assert bad.status == "diverged" and bad.diverged_at is not None
    assert ok.status == "stable" and ok.final_loss < ok.initial_loss
    (alone,) = train_group(task, configs[:1])
    assert alone.final_loss == pytest.approx(ok.final_loss, rel=1e-5)
    # the peak loss ratio: the diverged run's went past the divergence factor, the stable run's
    # is its largest recorded loss over its initial one (full batch: 1 at step 0 at least)
    assert bad.peak_loss_ratio > 1e3
    recorded = max(p.loss for p in ok.curves) / ok.initial_loss
    assert 1.0 <= recorded <= ok.peak_loss_ratio < 1e3


@pytest.mark.parametrize("scale", [1e3, math.inf])
def test_a_final_loss_past_the_divergence_factor_is_a_divergence_at_the_last_step(scale):
    """The final loss on the whole training set is judged as each step's loss is: a run whose
    final loss is beyond ``DIVERGENCE_FACTOR`` times its initial loss, or not finite, while its
    every step's loss was within (a mini-batch can miss the examples that blow up), diverged at
    the last step (it was stored diverged at no step, and counted as alive by drift), with
    that loss in its peak ratio."""
    task = load_task("teacher-student")
    config = RunConfig("teacher-student", "plain", "gd", 0.1, 0.0, 0.0, 0, 0, 30, task_hash=TS)
    group, stack = engine._started(task, [config])
    initial = engine._full_loss(group.data, group.template)(stack)
    blown = {name: p * scale if name.endswith("weight") else p for name, p in stack.items()}
    ok = torch.ones(1, dtype=torch.bool)
    (run,) = engine._results(
        group.data, [config], group.template, blown, initial, ok, [None], torch.ones(1),
        [[]], group.structure,
    )  # fmt: skip
    assert run.status == "diverged" and run.final_loss is None and run.diverged_at == 30
    assert run.peak_loss_ratio > engine.DIVERGENCE_FACTOR
    (kept,) = engine._results(
        group.data, [config], group.template, stack, initial, ok, [None], torch.ones(1),
        [[]], group.structure,
    )  # fmt: skip
    assert kept.diverged_at is None and kept.final_loss == pytest.approx(float(initial[0]))
    assert kept.peak_loss_ratio == 1.0


def test_each_seed_trains_on_its_own_task_instance():
    """A built-in task's seeds are independent instances (teacher, data, split), each with its
    own task hash sharing the task's version; user data have one instance."""
    specs = [TaskSpec("teacher-student").for_seed(k) for k in range(3)]
    tasks = [spec.load() for spec in specs]
    assert not torch.equal(tasks[0].x, tasks[1].x) and not torch.equal(tasks[1].y, tasks[2].y)
    hashes = {spec.hash() for spec in specs}
    assert len(hashes) == 3 and {h[:8] for h in hashes} == {TS[:8]}
    assert specs[0].hash() == TS
    digits = [TaskSpec("digits").for_seed(k).load() for k in (0, 1)]
    assert not torch.equal(digits[0].y, digits[1].y)  # another split of the same images
    assert sorted(torch.cat([digits[0].y, digits[0].y_test]).tolist()) == sorted(
        torch.cat([digits[1].y, digits[1].y_test]).tolist()
    )
    user = TaskSpec("data", "d.npz", "regression")
    assert user.for_seed(5) == user


_SAME_FIELDS = ("status", "diverged_at", "constant_loss", "accuracy", "test_accuracy")
_CLOSE_FIELDS = ("initial_loss", "final_loss", "test_loss", "log_ratio_rms", "mu_rel_max",
                 "peak_loss_ratio")  # fmt: skip


def _assert_same_run(a: RunResult, b: RunResult) -> None:
    """Two results of one run agree: statuses and counts exactly, numbers to 1e-12 relative
    (the balance change, itself relative and 0 in exact arithmetic, to 1e-12)."""
    for name in _SAME_FIELDS:
        assert getattr(a, name) == getattr(b, name), name
    for name in _CLOSE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert abs(x - y) <= 1e-12 * abs(x), (name, x, y)
    assert (a.balance_change is None) == (b.balance_change is None)
    if a.balance_change is not None:
        assert abs(a.balance_change - b.balance_change) <= 1e-12
    assert [p.step for p in a.curves] == [p.step for p in b.curves]
    for p, q in zip(a.curves, b.curves, strict=True):
        assert torch.allclose(torch.tensor(p), torch.tensor(q), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    ("task", "optimizer", "batch_size", "lrs", "seeds"),
    [
        ("teacher-student", "gd", 0, (0.1, 100.0), 3),  # regression, a run diverges
        ("teacher-student", "sgd", 16, (0.1,), 3),  # each run's batches from its own instance
        ("modular-addition", "adam", 0, (0.003,), 2),  # token ids, classification, a test split
    ],
)
def test_a_group_mixing_instances_equals_their_runs_apart(task, optimizer, batch_size, lrs, seeds):
    """Runs of several seeds (task instances) trained as one group give, in float64, what each
    gives in a group of its own instance's runs only (as batches were before) and alone."""
    specs = [TaskSpec(task).for_seed(seed) for seed in range(seeds)]
    configs = [
        RunConfig(task, m, optimizer, lr, st, 1.0, seed, batch_size, 3, "float64", task_hash=h)
        for m, st in (("plain", 0.0), ("exact", 1.0))
        for lr in lrs
        for seed, h in enumerate(spec.hash() for spec in specs)
    ]
    assert len(runner.batches(configs, runner.spec_of_run)) == 1  # one group, one batch
    together = train_group([specs[c.seed].load() for c in configs], configs)
    assert len({r.initial_loss for r in together}) == seeds  # each seed's instance and draw
    for seed, spec in enumerate(specs):
        own = [c for c in configs if c.seed == seed]
        for c, mine in zip(own, train_group(spec.load(), own), strict=True):
            _assert_same_run(together[configs.index(c)], mine)
    (alone,) = train_group(specs[-1].load(), configs[-1:])
    _assert_same_run(together[-1], alone)


def test_batches_hold_a_groups_seeds_in_equal_sizes(monkeypatch):
    """A group spans every seed's instance; it is split into as few batches of at most
    ``runs_per_batch`` runs as it needs, of equal sizes; other optimizers are other groups."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 7)
    hashes = [TaskSpec("teacher-student").for_seed(seed).hash() for seed in range(3)]
    configs = [
        RunConfig("teacher-student", "plain", opt, lr, 0.0, 0.0, seed, 0, 2, task_hash=h)
        for opt in ("gd", "adam")
        for seed, h in enumerate(hashes)
        for lr in (0.1, 0.2, 0.3, 0.4, 0.5)
    ]
    batches = runner.batches(configs, runner.spec_of_run)
    assert [len(b) for b in batches] == [5] * 6
    assert all(len({c.optimizer for c in b}) == 1 for b in batches)
    assert max(len({c.seed for c in b}) for b in batches) > 1


def test_runs_on_data_of_other_shapes_are_not_trained_together():
    ts, digits = load_task("teacher-student"), load_task("digits")
    configs = [
        RunConfig("teacher-student", "plain", "gd", 0.1, 0.0, 0.0, seed, 0, 2, task_hash=TS)
        for seed in (0, 1)
    ]
    with pytest.raises(ValueError, match="data of one kind and shape"):
        train_group([ts, digits], configs)
    with pytest.raises(ValueError, match="a task per run"):
        train_group([ts], configs)


def test_the_replica_is_plain_from_another_draw_of_the_same_instance():
    task = load_task("teacher-student")
    configs = [
        RunConfig("teacher-student", m, "gd", 0.1, 0.0, 0.0, seed, 0, 5, "float64", task_hash=TS)
        for m, seed in (("plain", 0), ("plain-replica", 0), ("plain", 1))
    ]
    plain, replica, other_seed = train_group(task, configs)
    assert plain.initial_loss != replica.initial_loss != other_seed.initial_loss
    (again,) = train_group(task, configs[1:2])  # the draw is fixed by the seed
    assert again.final_loss == pytest.approx(replica.final_loss, rel=1e-12)


def test_initial_imbalance_keeps_the_function():
    task = load_task("teacher-student")
    configs = [
        RunConfig("teacher-student", "plain", "gd", 0.01, 0.0, s, 0, 0, 1, "float64", task_hash=TS)
        for s in (0.0, 1.0, 2.0)
    ]
    results = train_group(task, configs)
    initial = [r.initial_loss for r in results]
    assert max(initial) - min(initial) <= 1e-12 * initial[0]
    assert results[2].curves[0].log_ratio_rms > results[0].curves[0].log_ratio_rms


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real = Store.add_run
    count = {"n": 0}

    def add_run(self: Store, result: RunResult, seconds: float) -> bool:
        if count["n"] >= n:
            raise KeyboardInterrupt
        count["n"] += 1
        return real(self, result, seconds)

    monkeypatch.setattr(Store, "add_run", add_run)


def _without_seconds(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "seconds"}


def test_interrupted_sweep_resumes_to_the_same_store(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 7)
    configs = _grid()
    spec = lambda c: TaskSpec(c.task)  # noqa: E731
    whole = Store(tmp_path / "whole.sqlite")
    run_all(whole, configs, spec)
    with monkeypatch.context() as m:
        _interrupt_after(m, 10)
        resumed = Store(tmp_path / "resumed.sqlite")
        with pytest.raises(KeyboardInterrupt):
            run_all(resumed, configs, spec)
    assert len(resumed.runs()) == 10
    assert run_all(resumed, configs, spec) == len(configs) - 10
    assert run_all(resumed, configs, spec) == 0  # nothing is duplicated
    assert len(resumed.runs()) == len(whole.runs()) == len(configs)
    assert _without_seconds(summarize(resumed, False)) == _without_seconds(summarize(whole, False))


def _write_runs(path: str, offset: int) -> None:
    store = Store(path)
    task = load_task("teacher-student")
    configs = [
        RunConfig(
            "teacher-student", "plain", "gd", 0.1 + offset + i, 0.0, 0.0, 0, 0, 2, task_hash=TS
        )
        for i in range(5)
    ]
    for r in train_group(task, configs):
        store.add_run(r, 0.0)


def test_a_blocks_floor_raises_the_low_end_of_its_window_at_its_s_only():
    """A floor at one initial imbalance leaves out the grid's rates below it there; the other
    imbalances keep the whole window, on the same stride."""
    floors = {0.0: -2}
    block = Block({"plain": (0.0,)}, "gd", (-8, 4), (0.0, 1.0), 1, 10, lr_stride=2, floors=floors)
    lrs = defaultdict(list)
    for c in block.configs(TaskSpec("teacher-student")):
        lrs[c.s].append(c.lr)
    assert sorted(lrs[1.0]) == lr_grid(-8, 4, 2)
    assert sorted(lrs[0.0]) == [2**k for k in (-1, 0, 1, 2)]


def test_strengths_are_chosen_on_the_tuning_seeds_before_the_others_train(
    tmp_path: Path, monkeypatch
):
    """With ``choose_strengths`` a method with several strengths runs at all of them on the
    tuning seeds only; the other seeds train, and every seed is bisected, at the strength the
    summary reports as chosen; a method with one strength runs on every seed as without it."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 8)
    lrs = [2**k for k in range(-3, 3)]
    configs = [
        RunConfig("teacher-student", m, "gd", lr, st, 1.0, seed, 0, 20,
                  task_hash=TaskSpec("teacher-student").for_seed(seed).hash())
        for m, strengths in (("plain", (0.0,)), ("exact", (0.1, 10.0)))
        for st in strengths
        for lr in lrs
        for seed in range(TUNING_SEEDS + 2)
    ]  # fmt: skip
    store = Store(tmp_path / "runs.sqlite")
    run_bisected(store, configs, spec_of_run, rounds=1, choose_strengths=True)
    runs = store.runs()
    regime = summarize(store, False)["tasks"]["teacher-student"]["regimes"]["gd/full/20"]
    chosen = regime["best_strength"]["exact"]
    trained = {(r.config.method, r.config.strength, r.config.seed) for r in runs}
    later = range(TUNING_SEEDS, TUNING_SEEDS + 2)
    assert trained == (
        {("plain", 0.0, seed) for seed in range(TUNING_SEEDS + 2)}
        | {("exact", st, seed) for st in (0.1, 10.0) for seed in range(TUNING_SEEDS)}
        | {("exact", chosen, seed) for seed in later}
    )
    bisected = {(r.config.method, r.config.strength) for r in runs if r.config.bisection}
    assert bisected and bisected <= {("plain", 0.0), ("exact", chosen)}
    assert sum(1 for r in runs if not r.config.bisection) == len(lrs) * (
        (TUNING_SEEDS + 2) + 2 * TUNING_SEEDS + 2
    )


def test_an_interrupted_bisection_resumes_to_the_same_store(tmp_path: Path, monkeypatch):
    """Bisection rounds are planned from the store: interrupted in its first round and
    resumed, a reproduction writes the runs an uninterrupted one does, and every seed's edge is
    bracketed tighter than the grid's."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: 4)
    configs = [
        RunConfig("teacher-student", "plain", "gd", 2 ** (k / 2), 0.0, s, 0, 0, 40, task_hash=TS)
        for k in range(-10, 2)
        for s in (0.0, 1.0)
    ]
    spec = lambda c: TaskSpec(c.task)  # noqa: E731
    whole = Store(tmp_path / "whole.sqlite")
    assert run_bisected(whole, configs, spec, rounds=3) > len(configs)
    rounds = sorted({r.config.bisection for r in whole.runs()})
    assert rounds[0] == 0 and rounds[-1] <= 3 and len(rounds) > 1
    with monkeypatch.context() as m:
        _interrupt_after(m, len(configs) + 1)
        resumed = Store(tmp_path / "resumed.sqlite")
        with pytest.raises(KeyboardInterrupt):
            run_bisected(resumed, configs, spec, rounds=3)
    run_bisected(resumed, configs, spec, rounds=3)
    assert {r.config.key() for r in resumed.runs()} == {r.config.key() for r in whole.runs()}
    regime = summarize(whole, False)["tasks"]["teacher-student"]["regimes"]["gd/full/40"]
    # three rounds from a sqrt(2) grid: 2^(1/16), within the bracket the bisection aims for
    assert 1.0 < regime["edge_bracket"] <= 2 ** (1 / 16) * (1 + 1e-12) < BISECTION_BRACKET
    for s, edges in regime["stable_edge_by_seed"]["plain"].items():
        grid = regime["max_stable_lr_by_seed"]["plain"][s]["0"]
        assert grid <= edges["0"] < grid * 2**0.5


def test_two_writers_share_a_store(tmp_path: Path):
    path = str(tmp_path / "shared.sqlite")
    Store(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_runs, args=(path, k * 10)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    runs = Store(path).runs()
    assert len(runs) == 10 and len({r.config.key() for r in runs}) == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "unknown task"),
        (["--task", "teacher-student", "--method", "plain,magic"], "unknown method"),
        (["--task", "teacher-student", "--optimizer", "lbfgs"], "unknown optimizer"),
        (
            ["--task", "teacher-student", "--method", "per-layer-lr", "--optimizer", "gd,adam"],
            "per-layer-lr is defined for gd, sgd, momentum, not adam",
        ),
        (["--task", "teacher-student", "--lr", "0.1,-1"], "--lr must be > 0"),
        (["--task", "teacher-student", "--lr", "0.1,abc"], "--lr must be"),
        (["--task", "teacher-student", "--strength", "nan"], "--strength must be finite"),
        (["--task", "teacher-student", "--init-imbalance", "inf"], "must be finite"),
        (["--data", "missing.npz"], "does not exist"),
        ([], "exactly one of --task and --data"),
        (["--task", "teacher-student", "--seeds", "99999999999999999999"], "'--seeds'"),
        (["--task", "teacher-student", "--batch-size", "99999999999999999999"], "'--batch-size'"),
    ],
)
def test_bad_sweep_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = cli.invoke(app, ["sweep", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_a_store_of_300_seeds_sweeps_and_reports(tmp_path: Path):
    """More seeds than the stability map's colormap has colors (256)."""
    out = tmp_path / "out"
    grid = ["--task", "teacher-student", "--steps", "2", "--seeds", "300", "--out", str(out)]
    for args in (["sweep", *grid], ["sweep", *grid], ["report", str(out)]):
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert len(Store(out / "results.sqlite").runs()) == 300


def test_hashing_more_instances_than_the_task_cache_loads_each_once(monkeypatch):
    """A sweep hashes each seed's instance several times (plan, check, store): with more seeds
    than ``TASK_CACHE`` the hashes are still computed once, so every instance loads once."""
    loads = []

    def counted(*args):
        loads.append(args[-1])
        return load_task(*args)

    monkeypatch.setattr(runner, "load_task", counted)
    runner._hash.cache_clear()
    runner._load.cache_clear()
    seeds = range(runner.TASK_CACHE + 1)
    first = [TaskSpec("teacher-student").for_seed(s).hash() for s in seeds]
    assert [TaskSpec("teacher-student").for_seed(s).hash() for s in seeds] == first
    assert sorted(loads) == list(seeds)


@pytest.mark.parametrize(
    "args, size",
    [(["--seeds", "1000000"], "1,000,000 runs,"), (["--steps", "100000000"], "1 run,")],
)
def test_an_absurd_grid_is_refused_before_anything_runs(tmp_path, args, size):
    out = tmp_path / "out"
    result = cli.invoke(app, ["sweep", "--task", "teacher-student", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: the grid has {size} estimated to take about ")
    assert "--allow-large" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_allow_large_runs_a_grid_beyond_the_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(gaugefix.cli, "LARGE_RUNS", 1)
    out = tmp_path / "out"
    grid = ["sweep", "--task", "teacher-student", "--seeds", "2", "--steps", "2", "--out", str(out)]
    refused = cli.invoke(app, grid)
    assert refused.exit_code == 2 and "the grid has 2 runs" in refused.output
    assert not out.exists()
    result = cli.invoke(app, [*grid, "--allow-large"])
    assert result.exit_code == 0, result.output
    assert len(Store(out / "results.sqlite").runs()) == 2


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"X": np.zeros((4, 3))}, "no array 'y'"),
        ({"X": np.zeros((4, 3)), "y": np.zeros(5)}, "y has 5 rows but its X has 4"),
        ({"X": np.full((4, 3), np.nan), "y": np.zeros(4)}, "X must be finite, but it holds 12 NaN"),
        (
            {"X": np.array([[np.nan, np.inf], [0, -np.inf]]), "y": np.zeros(2)},
            "X must be finite, but it holds 1 NaN value and 2 infinite values",
        ),
        (
            {
                "X": np.zeros((4, 3)),
                "y": np.zeros(4),
                "X_test": np.zeros((2, 3)),
                "y_test": [1, np.nan],
            },
            "y_test must be finite, but it holds 1 NaN value",
        ),
        ({"X": np.zeros((4, 3)), "y": np.zeros(4), "X_test": np.zeros((2, 3))}, "both X_test"),
        ({"X": np.zeros(4), "y": np.zeros(4)}, "2-d array"),
    ],
)
def test_malformed_data_file(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    out = tmp_path / "out"
    result = cli.invoke(app, ["sweep", "--data", str(path), "--out", str(out)])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "hidden, message",
    [
        ("2.5", "--hidden must be comma-separated integers, got '2.5'"),
        ("1e30", "--hidden must be comma-separated integers, got '1e30'"),
        ("1000000000000", "cannot run the model of task 'data': "),  # far beyond the memory
    ],
)
def test_hidden_widths_that_are_no_model_are_one_line(tmp_path, hidden, message):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros((4, 3)), y=np.arange(4.0))
    out = tmp_path / "out"
    result = cli.invoke(app, ["sweep", "--data", str(path), "--hidden", hidden, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_user_data_sweep(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5))
    path = tmp_path / "mydata.npz"
    np.savez(path, X=x, y=(x[:, 0] > 0).astype(np.int64))
    out = tmp_path / "out"
    result = cli.invoke(
        app,
        [
            "sweep",
            "--data",
            str(path),
            "--task-type",
            "classification",
            "--hidden",
            "8,8",
            "--method",
            "plain,exact",
            "--lr",
            "0.1,0.2",
            "--steps",
            "10",
            "--seeds",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == 8
    assert set(summary["tasks"]) == {"mydata"}
    assert (out / "report.md").is_file()


def _check_schema(summary: dict) -> None:
    assert problems(summary, Summary) == []
    assert summary["runs"] > 0
    for t in summary["tasks"].values():
        assert t["constant_loss"] > 0
        for g in t["regimes"].values():
            for method, by_s in g["max_stable_lr"].items():
                assert set(g["max_stable_lr_by_seed"][method]) == set(by_s)
            for medians in g.get("final_train_loss", {}).get("medians", {}).values():
                assert all(float(lr) > 0 for lr in medians)
        assert t["balance_function_change"] is None or t["balance_function_change"] <= 1e-10
    assert isinstance(summary["relaxation"]["max_relative_error"], float)
    assert summary["conditioning"]["teacher-student"]["by_s"]
    split = summary["adam_split"]["teacher-student"]
    assert split["horizontal"]["decoupled-penalty"] < 1e-10 < split["horizontal"]["penalty"]
    assert "decoupled-penalty/penalty" in split["sweep"]
    assert summary["sharpness_track"]["teacher-student"]["plain"]["2.0"]["predicted_edge"] > 0
    assert set(summary["dose"]["teacher-student"]["rho"]) == {"penalty", "exact", "pooled"}


def test_quick_reproduction(quick_copy):
    out, output = quick_copy  # the session's ``reproduce --quick --jobs 2`` (exit code 0)
    summary = json.loads((out / "summary.json").read_text())
    _check_schema(summary)
    assert summary["quick"] is True
    assert set(summary["tasks"]) == {
        "teacher-student",
        "digits",
        "modular-addition",
        "char-gpt",
        "residual-cnn",
    }
    tuned = summary["realistic"]
    assert set(tuned) == {"char-gpt", "residual-cnn"}
    assert set(tuned["char-gpt"]["adamw/16/24"]) == {"plain", "exact-every-10"}
    assert set(tuned["residual-cnn"]["momentum/64/30"]) == {"plain", "exact-every-10"}
    regimes = summary["tasks"]["teacher-student"]["regimes"]
    assert {"gd/full/100", "adam/full/100", "sgd/64/100", "sgd/64/1000"} <= set(regimes)
    assert "sgd/64" in summary["tasks"]["teacher-student"]["horizons"]
    report = (out / "report.md").read_text()
    assert report.startswith("# gaugefix reproduction (quick)\n")
    assert "### char-gpt: adamw, batch 16, 24 steps" in report
    for figure in (
        "stability-teacher-student-gd-full-100.png",
        "stability-teacher-student-adam-full-100.png",
        "stability-modular-addition-adam-full-100.png",
        "balanced-start-teacher-student.png",
        "drift-teacher-student.png",
        "relaxation.png",
        "sharpness.png",
        "sharpness-at-edge.png",
        "dose-response.png",
        "adam-split.png",
    ):
        assert f"({figure})" in report and (out / figure).is_file()
    assert "| task | regime | method |" in output
    # re-running skips every finished run and reproduces the summary
    again = cli.invoke(app, ["reproduce", "--quick", "--out", str(out)])
    assert again.exit_code == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert _without_seconds(resumed) == _without_seconds(summary)
    rendered = cli.invoke(app, ["report", str(out)])
    assert rendered.exit_code == 0
    assert _without_seconds(json.loads((out / "summary.json").read_text())) == _without_seconds(
        summary
    )


def test_the_conditioning_analysis_finds_plains_edge_on_instance_0(tmp_path: Path):
    from gaugefix.experiments.conditioning import _largest_stable_lr

    task = load_task("teacher-student")
    configs = [
        RunConfig("teacher-student", "plain", "gd", lr, 0.0, 1.0, 0, 0, 40, task_hash=TS)
        for lr in (0.02, 0.04, 1e4)
    ]
    store = Store(tmp_path / "s.sqlite")
    for r in train_group(task, configs):
        store.add_run(r, 0.0)
    assert [r.status for r in store.runs()] == ["stable", "stable", "diverged"]
    assert _largest_stable_lr(store, task) == 0.04
    assert _largest_stable_lr(Store(tmp_path / "empty.sqlite"), task) == 0.1
