"""Audit of the reproduction's planning (plan.py) and of runner.run_bisected's use of it: grids,
learning rates, bisection plans and strengths chosen on the tuning seeds, on synthetic stores
and synthetic workers (a run is stable up to a threshold of its cell and seed)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter, defaultdict
from concurrent.futures import Future
from decimal import Decimal, localcontext
from pathlib import Path

import pytest

import gaugefix.experiments.runner as runner
from gaugefix.experiments.cells import lr_key
from gaugefix.experiments.engine import RunConfig, RunResult
from gaugefix.experiments.plan import (
    BISECTION_ROUNDS,
    COARSE,
    QUICK_BISECTION_ROUNDS,
    Block,
    at_chosen_strengths,
    bisection_round,
    bisection_runs,
    cell_of,
    lr_grid,
    reproduce_grids,
    tuning_first,
)
from gaugefix.experiments.stability import BISECTION_BRACKET, TUNING_SEEDS, edge_bracket
from gaugefix.experiments.store import Store
from runs import run_result

VERSION = "aaaaaaaa"
OTHER_VERSION = "bbbbbbbb"
RATIO_2 = lr_grid(-8, 2, COARSE)  # 2^-4 .. 2^1, ratio 2
SQRT_2 = lr_grid(-4, 2)  # ratio sqrt(2)
BATCH = 7  # runs a batch of FakeWorkers holds
ULPS = 4  # how far a bisected rate may be from 2^x after its products and square roots


def task_hash(seed: int, version: str = VERSION) -> str:
    return f"{version}{seed:08d}"


class FakeSpec:
    """A task spec whose instances hash as :func:`task_hash` (nothing is loaded)."""

    def __init__(self, name: str, seed: int = 0, version: str = VERSION) -> None:
        self.name, self.seed, self.version = name, seed, version

    def for_seed(self, seed: int) -> FakeSpec:
        return FakeSpec(self.name, seed, self.version)

    def hash(self) -> str:
        return task_hash(self.seed, self.version)

    def load(self) -> FakeSpec:
        return self

    def data_shapes(self) -> tuple:
        return ()


def config(method="plain", lr=1.0, strength=0.0, s=0.0, seed=0, version=VERSION, **kw):
    return RunConfig("t", method, "gd", lr, strength, s, seed, 0, 10,
                     task_hash=task_hash(seed, version), **kw)  # fmt: skip


def result(c: RunConfig, top: float) -> RunResult:
    """A run of ``c``: stable when its rate is at most ``top``, diverged above."""
    return dataclasses.replace(run_result(c.method, c.lr, top, seed=c.seed), config=c)


def threshold(c: RunConfig) -> float:
    """A seed's synthetic stable edge in a cell: strength 0.1 is best, seeds differ."""
    base = {0.0: 0.3, 0.01: 0.2, 0.1: 0.5, 1.0: 0.25}[c.strength]
    return base * (1.0 + 0.07 * c.seed + 0.013 * c.s)


def simulate(runs: list[RunResult], cells: set, rounds: int, top) -> list[RunResult]:
    """``runs`` and every bisection round planned from them, trained by ``top``."""
    runs = list(runs)
    while todo := bisection_runs(runs, cells, rounds):
        _check_proposals(runs, todo)
        runs += [result(c, top(c)) for c in todo]
    return runs


def _check_proposals(runs: list[RunResult], todo: list[RunConfig]) -> None:
    """Each proposal is new, strictly inside its seed's bracket and of the next round."""
    for c in todo:
        mine = [r for r in runs if cell_of(r.config) == cell_of(c)]
        edge, above = edge_bracket(mine)
        assert above is not None and edge < c.lr < above
        assert c.lr not in {r.config.lr for r in mine}
        assert c.bisection == max(r.config.bisection for r in mine) + 1


def grid_runs(grid: list[float], tops: dict[int, float], **kw) -> list[RunResult]:
    return [
        result(config(lr=lr, seed=seed, **kw), top) for seed, top in tops.items() for lr in grid
    ]


# --- the grids


@pytest.mark.parametrize("quick", [True, False])
def test_grids_have_one_key_per_run_and_every_seed_in_every_cell(quick: bool):
    """No two runs of a grid share a key, and every cell (all but lr and seed) has the same
    learning rates on every seed of its block."""
    for grid in reproduce_grids(quick):
        configs = grid.configs(FakeSpec(grid.task))
        assert len({c.key() for c in configs}) == len(configs)
        rates: dict[RunConfig, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))
        for c in configs:
            rates[dataclasses.replace(c, lr=0.0, seed=0, task_hash="")][c.seed].add(c.lr)
        seeds = {b.seeds for b in grid.blocks}
        for by_seed in rates.values():
            assert sorted(by_seed) == list(range(len(by_seed))) and len(by_seed) in seeds
            assert len({frozenset(v) for v in by_seed.values()}) == 1


def _power(k: int) -> float:
    """``2^(k/2)`` correctly rounded to float64."""
    with localcontext() as ctx:
        ctx.prec = 60
        return float((Decimal(2) ** k).sqrt())


@pytest.mark.parametrize("quick", [True, False])
def test_grid_rates_are_correctly_rounded_powers_of_sqrt_2(quick: bool):
    """Every grid rate is ``2^(k/2)`` rounded once (no drift: equal rates of two blocks are
    equal floats), on its block's stride."""
    for grid in reproduce_grids(quick):
        for block in grid.blocks:
            low, high = block.lr_range
            want = [_power(k) for k in range(low, high + 1, block.lr_stride)]
            assert lr_grid(low, high, block.lr_stride) == want
            assert want[-1] == _power(high)


def _reachable(grid: list[float], rounds: int) -> list[RunResult]:
    """Bisections of one cell to ``rounds`` rounds ending in every sub-interval of every gap of
    ``grid``: one seed per end (its threshold just above that sub-interval's low end)."""
    tops = {}
    for i, (lo, hi) in enumerate(zip(grid, grid[1:], strict=False)):
        for j in range(2**rounds):
            tops[i * 2**rounds + j] = lo * (hi / lo) ** ((j + 0.5) / 2**rounds)
    runs = grid_runs(grid, tops)
    seeds = {cell_of(r.config) for r in runs}
    return simulate(runs, seeds, rounds, lambda c: tops[c.seed])


@pytest.mark.parametrize(("grid", "rounds"), [(RATIO_2, BISECTION_ROUNDS), (SQRT_2, 3)])
def test_bisected_rates_are_one_float_per_power_and_distinct_to_6_digits(grid, rounds):
    """Every rate a bisection reaches is one float, whichever seed reached it, within a few
    ulps of its power of 2, and no two of them or of the grid share a 6-digit ``lr_key``."""
    runs = _reachable(grid, rounds)
    by_power: dict[int, set[float]] = defaultdict(set)
    for r in runs:
        by_power[round(math.log2(r.config.lr) * 2 ** (rounds + 1))].add(r.config.lr)
    assert len(by_power) == (len(grid) - 1) * 2**rounds + 1
    for p, lrs in by_power.items():
        (lr,) = lrs
        assert abs(lr - 2 ** (p / 2 ** (rounds + 1))) <= ULPS * math.ulp(lr)
    keys = Counter(lr_key(lr) for lrs in by_power.values() for lr in lrs)
    assert max(keys.values()) == 1


def test_a_block_refuses_a_window_whose_top_is_off_its_stride():
    """A window ``(low, high)`` whose ``high - low`` is no multiple of the stride would silently
    end a step below ``2^(high/2)`` (a method stable there read as stable to the top)."""
    with pytest.raises(ValueError, match="stride"):
        Block({"plain": (0.0,)}, "gd", (-5, 0), (0.0,), 1, 10, lr_stride=2)
    assert Block({"plain": (0.0,)}, "gd", (-6, 0), (0.0,), 1, 10, lr_stride=2)


# --- bisection


@pytest.mark.parametrize(("grid", "rounds"), [(RATIO_2, BISECTION_ROUNDS), (SQRT_2, 3)])
def test_bisection_stops_at_the_bracket_in_the_documented_rounds(grid, rounds):
    """From ratio 2 four rounds, from sqrt(2) three, end every bracket within
    BISECTION_BRACKET (one round fewer does not); nothing is asked for after."""
    runs = _reachable(grid, rounds)
    by_seed = defaultdict(list)
    for r in runs:
        by_seed[r.config.seed].append(r)
    for rs in by_seed.values():
        edge, above = edge_bracket(rs)
        assert above / edge <= BISECTION_BRACKET < (above / edge) ** 2
        assert max(r.config.bisection for r in rs) == rounds
    cells = {cell_of(r.config) for r in runs}
    assert bisection_runs(runs, cells, rounds + 5) == []


def test_quick_bisection_does_one_round_to_2_to_the_quarter():
    """The quick reproduction's round from its sqrt(2) grid leaves a bracket of 2^(1/4)."""
    tops = {0: 0.3, 1: 0.7}
    runs = grid_runs(SQRT_2, tops)
    runs = simulate(
        runs, {cell_of(r.config) for r in runs}, QUICK_BISECTION_ROUNDS, lambda c: tops[c.seed]
    )
    for seed in tops:
        edge, above = edge_bracket([r for r in runs if r.config.seed == seed])
        assert abs(above / edge - 2**0.25) < 1e-12


def test_no_stable_rate_or_stable_at_the_top_is_not_bisected():
    """A seed with no stable rate (edge 0) and one stable up to the grid's top (a lower bound)
    ask for no run; a seed beside them is bisected."""
    runs = grid_runs(RATIO_2, {0: 0.0, 1: math.inf, 2: 0.3})
    cells = {cell_of(r.config) for r in runs}
    todo = bisection_runs(runs, cells, BISECTION_ROUNDS)
    assert [(c.seed, c.bisection) for c in todo] == [(2, 1)]
    assert todo[0].lr == math.sqrt(0.25 * 0.5)


def test_a_bisection_plan_does_not_depend_on_the_order_of_the_runs():
    """The same runs in any order plan the same runs, in the same order."""
    tops = {seed: 0.1 + 0.2 * seed for seed in range(5)} | {5: math.inf}
    runs = grid_runs(RATIO_2, tops)
    cells = {cell_of(r.config) for r in runs}
    runs = simulate(runs, cells, 2, lambda c: tops[c.seed])
    want = bisection_runs(runs, cells, BISECTION_ROUNDS)
    assert len(want) == len(tops) - 1  # the last seed is stable up to the top
    for k in range(5):
        shuffled = runs[:]
        random.Random(k).shuffle(shuffled)
        assert bisection_runs(shuffled, cells, BISECTION_ROUNDS) == want
        assert bisection_round(shuffled, cells, BISECTION_ROUNDS) == want


def test_runs_of_another_task_version_and_other_cells_change_no_plan():
    """Runs of another version of the task (same name, cells and seeds, other stability) and
    of cells not asked for are read by no plan, and never bisected."""
    tops = {0: 0.3, 1: 0.6}
    mine = grid_runs(RATIO_2, tops)
    cells = {cell_of(r.config) for r in mine}
    foreign = grid_runs(RATIO_2, {0: 1.1, 1: 0.07}, version=OTHER_VERSION)
    foreign += grid_runs(RATIO_2, {0: 0.4}, s=1.0)
    for rounds in range(1, BISECTION_ROUNDS + 1):
        alone = simulate(mine, cells, rounds, lambda c: tops[c.seed])
        both = simulate(mine + foreign, cells, rounds, lambda c: tops[c.seed])
        assert sorted(r.config.key() for r in both) == sorted(
            r.config.key() for r in alone + foreign
        )


def test_an_interrupted_round_is_planned_again_whole():
    """A round interrupted after any of its runs is planned as the whole round (its stored runs
    with its missing ones, none of the next round), so it is batched as uninterrupted."""
    tops = {seed: 0.1 + 0.11 * seed for seed in range(5)}
    runs = grid_runs(RATIO_2, tops)
    cells = {cell_of(r.config) for r in runs}
    top = lambda c: tops[c.seed]  # noqa: E731
    while whole := bisection_round(runs, cells, BISECTION_ROUNDS):
        for n in range(len(whole)):
            stored = runs + [result(c, top(c)) for c in whole[:n]]
            assert sorted(bisection_round(stored, cells, BISECTION_ROUNDS), key=RunConfig.key) == (
                sorted(whole, key=RunConfig.key)
            )
        runs += [result(c, top(c)) for c in whole]


# --- strengths chosen on the tuning seeds, and run_bisected


class FakeWorkers:
    """Workers that "train" a run as :func:`result` at ``top(config)``, recording batches."""

    width = 1

    def __init__(self, top) -> None:
        self.top, self.batches = top, []

    def submit(self, specs, configs, report) -> Future:
        self.batches.append(tuple(c.key() for c in configs))
        future: Future = Future()
        future.set_result(([result(c, self.top(c)) for c in configs], 0.0))
        return future

    def deliver(self) -> None:
        pass


def spec_of(c: RunConfig) -> FakeSpec:
    return FakeSpec(c.task, c.seed, c.task_hash[:8])


def block_configs(strengths: tuple[float, ...], seeds: int) -> list[RunConfig]:
    """Plain and the penalty at ``strengths`` on a ratio-2 grid, two values of s."""
    block = Block({"plain": (0.0,), "penalty": strengths}, "gd", (-8, 2), (0.0, 1.0), seeds, 10,
                  lr_stride=COARSE)  # fmt: skip
    return [dataclasses.replace(c, task="t") for c in block.configs(FakeSpec("t"))]


def sweep(tmp_path: Path, name: str, configs, monkeypatch, interrupt_after=None):
    """run_bisected with choose_strengths on FakeWorkers (interrupted after ``interrupt_after``
    stored runs, then resumed); the store and the workers' batches."""
    store = Store(tmp_path / f"{name}.sqlite")
    workers = FakeWorkers(threshold)
    bisected(store, configs, workers, 3, monkeypatch, interrupt_after)
    return store, workers.batches


def bisected(store: Store, configs, workers, rounds: int, monkeypatch, interrupt_after=None):
    """run_bisected with choose_strengths on ``workers`` into ``store``, interrupted after
    ``interrupt_after`` stored runs (KeyboardInterrupt) and resumed when given."""
    monkeypatch.setattr(runner, "runs_per_batch", lambda task, config: BATCH)
    if interrupt_after is not None:
        real, count = Store.add_run, [0]

        def add_run(self, r, seconds):
            if count[0] >= interrupt_after:
                raise KeyboardInterrupt
            count[0] += 1
            return real(self, r, seconds)

        with monkeypatch.context() as m:
            m.setattr(Store, "add_run", add_run)
            with pytest.raises(KeyboardInterrupt):
                runner.run_bisected(store, configs, spec_of, rounds, workers=workers,
                                    choose_strengths=True)  # fmt: skip
    runner.run_bisected(store, configs, spec_of, rounds, workers=workers, choose_strengths=True)


def test_the_other_seeds_train_and_are_bisected_only_at_the_chosen_strength(tmp_path, monkeypatch):
    """A method at several strengths: every strength on the tuning seeds, only the chosen one
    (0.1, the best of the thresholds) on the others, and only it bisected."""
    configs = tuned_configs()
    first, later = tuning_first(configs)
    assert {c.seed for c in later} == {TUNING_SEEDS, TUNING_SEEDS + 1}
    assert {c.method for c in later} == {"penalty"}
    store, _ = sweep(tmp_path, "s", configs, monkeypatch)
    runs = store.runs()
    trained = {(r.config.method, r.config.strength, r.config.seed) for r in runs}
    others = range(TUNING_SEEDS, TUNING_SEEDS + 2)
    assert {(m, st) for m, st, seed in trained if seed in others} == {
        ("plain", 0.0),
        ("penalty", 0.1),
    }
    bisected = {
        (r.config.method, r.config.strength, r.config.seed) for r in runs if r.config.bisection
    }
    assert bisected == {(m, st, seed) for m, st in (("plain", 0.0), ("penalty", 0.1))
                        for seed in range(TUNING_SEEDS + 2)}  # fmt: skip


def test_without_seeds_to_judge_on_every_strength_is_bisected(tmp_path, monkeypatch):
    """Where a regime has only the tuning seeds (the realistic tasks' three), no strength is
    chosen before training: the report gives every strength's bisected edge, so every strength
    is bisected (the non-chosen penalty strength kept its grid bracket, sqrt(2) wide)."""
    configs = block_configs((0.1, 1.0), TUNING_SEEDS)
    assert tuning_first(configs) == (configs, [])
    assert at_chosen_strengths([], configs) == configs
    store, _ = sweep(tmp_path, "r", configs, monkeypatch)
    bisected = {(r.config.method, r.config.strength) for r in store.runs() if r.config.bisection}
    assert bisected == {("plain", 0.0), ("penalty", 0.1), ("penalty", 1.0)}


def test_the_realistic_grids_bisect_every_strength():
    """The full realistic grids: no run is deferred and none dropped before bisection."""
    for grid in reproduce_grids(False)[-2:]:
        configs = grid.configs(FakeSpec(grid.task))
        assert grid.task in ("char-gpt", "residual-cnn")
        assert tuning_first(configs) == (configs, [])
        assert at_chosen_strengths([], configs) == configs


def test_another_task_versions_runs_do_not_choose_the_strength():
    """Tuning runs of another version of the task, where strength 1 is best, leave the choice
    to this version's (0.1)."""
    configs = block_configs((0.01, 0.1, 1.0), TUNING_SEEDS + 1)
    first, _ = tuning_first(configs)
    mine = [result(c, threshold(c)) for c in first]
    other = [
        result(dataclasses.replace(c, task_hash=OTHER_VERSION + c.task_hash[8:]),
               10.0 if c.strength == 1.0 else 0.01)
        for c in first
    ]  # fmt: skip
    for runs in (mine, mine + other, other + mine):
        chosen = {(c.method, c.strength) for c in at_chosen_strengths(runs, configs)}
        assert chosen == {("plain", 0.0), ("penalty", 0.1)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[str], list[tuple[str, ...]]]:
    """The keys stored and the batches trained by an uninterrupted sweep of the tuned block."""
    with pytest.MonkeyPatch.context() as m:
        store, batches = sweep(tmp_path_factory.mktemp("whole"), "whole", tuned_configs(), m)
    return sorted(r.config.key() for r in store.runs()), batches


def tuned_configs() -> list[RunConfig]:  # noqa: N802
    return block_configs((0.01, 0.1, 1.0), TUNING_SEEDS + 2)


# 168 tuning runs, 24 on the other seeds, three rounds of 20: every phase is interrupted
PHASES = {0: 192, 1: 20, 2: 20, 3: 20}


@pytest.mark.parametrize("interrupt_after", [0, 170, 195, 230])
def test_a_resumed_sweep_plans_and_batches_as_an_uninterrupted_one(
    tmp_path, monkeypatch, uninterrupted, interrupt_after
):
    """Interrupted in the tuning runs, the other seeds' or a bisection round and resumed, a
    sweep stores the same runs, and every batch it trains is one of the uninterrupted one's."""
    keys, batches = uninterrupted
    assert Counter(json.loads(k)["bisection"] for k in keys) == PHASES
    resumed, again = sweep(tmp_path, "resumed", tuned_configs(), monkeypatch, interrupt_after)
    assert sorted(r.config.key() for r in resumed.runs()) == keys
    assert set(again) <= set(batches)
