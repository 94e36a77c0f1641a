"""Second audit of the reproduction's planning and running (plan.py, runner.run_bisected and
run_all): a store that already holds another grid's runs, refusals before anything is written,
and resumption, on synthetic workers (a run is stable up to a threshold of its cell and seed)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from gaugefix.experiments.engine import RunConfig
from gaugefix.experiments.plan import at_chosen_strengths, cell_of, tuning_first
from gaugefix.experiments.stability import TUNING_SEEDS, at_best_strength, best_strengths
from gaugefix.experiments.store import Store
from test_plan_audit import FakeWorkers, bisected, block_configs, result

ROUNDS = 3
JUDGED = TUNING_SEEDS + 2  # seeds of the sweeps below: the tuning seeds and two judged ones
EARLIER = (0.01, 0.1, 1.0)  # an earlier grid's penalty strengths
LATER = (0.1, 1.0)  # a later grid's, without the earlier one's best
EARLIER_TOP = 1.0  # the earlier grid's highest rate (the later one's is 2)


def top(c: RunConfig) -> float:
    """A seed's stable edge in a cell: strength 0.01 is best, seeds differ."""
    base = {0.0: 0.3, 0.01: 0.8, 0.1: 0.3, 1.0: 0.25}[c.strength]
    return base * (1.0 + 0.07 * c.seed + 0.013 * c.s)


def sweep(store: Store, configs, monkeypatch, stop_after: int | None = None, rounds=ROUNDS):
    """run_bisected with choose_strengths on FakeWorkers; with ``stop_after``, interrupted
    after that many stored runs (KeyboardInterrupt) and resumed."""
    bisected(store, configs, FakeWorkers(top), rounds, monkeypatch, stop_after)


def two_grids(tmp_path: Path, name: str, monkeypatch, stop_after=None) -> Store:
    """A store swept as ``gaugefix sweep`` does (no bisection) with the penalty at EARLIER on
    the tuning seeds alone, at rates up to EARLIER_TOP, then by a reproduction with it at LATER
    on JUDGED seeds (``stop_after``: interrupted, resumed)."""
    store = Store(tmp_path / f"{name}.sqlite")
    earlier = [c for c in block_configs(EARLIER, TUNING_SEEDS) if c.lr <= EARLIER_TOP]
    sweep(store, earlier, monkeypatch, rounds=0)
    sweep(store, block_configs(LATER, JUDGED), monkeypatch, stop_after)
    return store


def outcomes(runs) -> list[tuple]:
    """Each run's key, status and final loss."""
    return [(r.config.key(), r.status, r.final_loss) for r in runs]


def test_judged_seeds_run_at_the_strength_chosen_over_the_store(tmp_path, monkeypatch):
    """The report chooses the penalty's strength over every run of the store (0.01, from the
    earlier grid): the later grid's judged seeds train at it on the later grid's rates (they
    trained no penalty run at all: the penalty had no verdict), and every seed's edge at it is
    bisected; the tuning seeds train no grid run at it (that would change a resumed choice)."""
    store = two_grids(tmp_path, "two", monkeypatch)
    runs = store.runs()
    assert best_strengths(runs)["penalty"] == 0.01
    penalty = [r.config for r in at_best_strength(runs) if r.config.method == "penalty"]
    grid = {(c.lr, c.s) for c in block_configs(LATER, JUDGED) if c.method == "penalty"}
    for seed in range(JUDGED):
        mine = [c for c in penalty if c.seed == seed]
        want = grid if seed >= TUNING_SEEDS else {(lr, s) for lr, s in grid if lr <= EARLIER_TOP}
        assert {(c.lr, c.s) for c in mine if not c.bisection} == want
        assert {c.s for c in mine if c.bisection} == {0.0, 1.0}
    judged = {r.config.strength for r in runs
              if r.config.method == "penalty" and r.config.seed >= TUNING_SEEDS}  # fmt: skip
    assert judged == {0.01}


# the later sweep writes 42 runs on the tuning seeds and plain's others, 24 on the judged seeds at
# the store's strength, then three bisection rounds of 20
@pytest.mark.parametrize("stop_after", [20, 50, 75, 115])
def test_a_resumed_sweep_into_a_store_of_another_grid_stores_what_one_run_does(
    tmp_path, monkeypatch, stop_after
):
    """Interrupted in the grid, among the judged seeds' runs at the store's strength or in a
    bisection round, and resumed: the same runs, each with the same result."""
    whole = two_grids(tmp_path, "whole", monkeypatch).runs()
    resumed = two_grids(tmp_path, "resumed", monkeypatch, stop_after).runs()
    assert sorted(outcomes(resumed)) == sorted(outcomes(whole))


def test_a_choice_is_made_only_among_the_tuning_seeds_runs(tmp_path, monkeypatch):
    """A store whose judged seeds already ran the penalty at another strength (stable far
    higher) chooses as one without them: the judged seeds never choose."""
    configs = block_configs(LATER, JUDGED)
    first, later = tuning_first(configs)
    runs = [result(c, top(c)) for c in first]
    biased = [result(c, 100.0) for c in later if c.strength == 1.0]
    assert at_chosen_strengths(runs + biased, configs) == at_chosen_strengths(runs, configs)
    assert {c.strength for c in at_chosen_strengths(runs, configs) if c.method == "penalty"} == {
        0.1
    }


def bad_judged(configs: list[RunConfig], strength: float, **changes) -> list[RunConfig]:
    """``configs`` with the first judged penalty run at ``strength`` changed by ``changes``."""
    judged = (c.method == "penalty" and c.strength == strength and c.seed >= TUNING_SEEDS
              for c in configs)  # fmt: skip
    i = next(i for i, hit in enumerate(judged) if hit)
    return [*configs[:i], dataclasses.replace(configs[i], **changes), *configs[i + 1 :]]


@pytest.mark.parametrize("strength", LATER)
@pytest.mark.parametrize(
    ("changes", "message"),
    [(dict(lr=math.nan), "lr must be finite"), (dict(dtype="double"), "another name")],
)
def test_a_bad_judged_run_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, strength, changes, message
):
    """A run the sweep cannot train, on a judged seed (trained after the tuning seeds, at the
    chosen strength 0.1, or dropped at 1.0): one ValueError, and the store holds no run and no
    claim (the tuning seeds' runs were written first)."""
    store = Store(tmp_path / "runs.sqlite")
    configs = bad_judged(block_configs(LATER, JUDGED), strength, **changes)
    with pytest.raises(ValueError, match=message):
        sweep(store, configs, monkeypatch)
    assert store.runs() == [] and store.claims() == []


def test_bisection_cells_are_those_of_the_chosen_strength_on_every_seed(tmp_path, monkeypatch):
    """Bisected: every seed's cell of plain and of the penalty at its chosen strength, each
    once per round at most; never a rate already run in that cell."""
    store = Store(tmp_path / "one.sqlite")
    sweep(store, block_configs(LATER, JUDGED), monkeypatch)
    runs = store.runs()
    bisected = {cell_of(r.config) for r in runs if r.config.bisection}
    assert {(c.method, c.strength) for c in bisected} == {("plain", 0.0), ("penalty", 0.1)}
    assert {c.seed for c in bisected} == set(range(JUDGED))
    per_cell = {}
    for r in runs:
        per_cell.setdefault(cell_of(r.config), []).append((r.config.lr, r.config.bisection))
    for rates in per_cell.values():
        assert len({lr for lr, _ in rates}) == len(rates)
        rounds = [b for _, b in rates if b]
        assert sorted(rounds) == list(range(1, len(rounds) + 1))
