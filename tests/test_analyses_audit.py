"""The reproduction's statistics and text say what was measured: horizons judged like every
other verdict (lower bounds kept, tuned strengths held out), lower bounds marked in every table
that shows an edge, a drift figure of the seed it names, captions that match the numbers,
plans that cannot train a cell twice or not at all, and user test data checked as the training
data are."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import numpy as np
import pytest

from gaugefix.experiments import drift, realistic, stability
from gaugefix.experiments.cells import by_regime
from gaugefix.experiments.engine import RunConfig, RunResult, run_status
from gaugefix.experiments.plan import Block, lr_grid, reproduce_grids
from gaugefix.experiments.sharpness_track import EdgeSharpness
from gaugefix.experiments.store import Store
from gaugefix.experiments.summary import schema_markdown, task_summary
from gaugefix.experiments.tasks import TaskError, npz_task
from gaugefix.report.readme import results_block

ROOT = Path(__file__).resolve().parents[1]
GRID = (0.1, 0.2, 0.4, 0.8)
# A summary without runs, as the README's block reads it.
EMPTY = {
    "runs": 0,
    "seconds": 0.0,
    "gaugefix_version": "v",
    "dtypes": "float32",
    "torch_version": "t",
    "tasks": {},
    "verdicts": {"verdicts": 0, "held": 0, "shams": {}},
}


def _mini(
    method: str, steps: int, tops: list[float], strength: float = 0.0, grid: tuple = GRID
) -> list[RunResult]:
    """Mini-batch SGD runs at s = 0 on ``grid``, seed ``k`` stable up to ``tops[k]`` (loss
    0.2 of an initial 1, constant 0.5) and diverged above."""
    runs = []
    for seed, top in enumerate(tops):
        for lr in grid:
            config = RunConfig("t", method, "sgd", lr, strength, 0.0, seed, 64, steps,
                               task_hash="h")  # fmt: skip
            final = 0.2 if lr <= top else None
            ok = final is not None
            runs.append(RunResult(config, run_status(1.0, final, 0.5), 1.0, 0.5, final,
                                  None, None, None, 0.1, 0.1, None if ok else 5,
                                  1.0 if ok else 2e3))  # fmt: skip
    return runs


# -- horizons -----------------------------------------------------------------------------------


def test_a_long_horizon_stable_to_its_grid_top_is_a_lower_bound_not_a_narrowing():
    """At the long horizon both seeds were stable up to its window's top (0.2), below their
    short-horizon edges: the ratios are lower bounds, so the range cannot be said to narrow.
    It was reported as an exact ratio 0.354 that **narrowed**."""
    runs = _mini("balanced-init", 10, [0.4, 0.4])
    runs += _mini("balanced-init", 100, [0.8, 0.8], grid=(0.05, 0.1, 0.2))
    h = stability.horizons(runs)["sgd/64"]["methods"]["balanced-init"]
    assert h["median"] == pytest.approx(0.2 / math.sqrt(0.4 * 0.8), rel=1e-12)
    assert h["lower_bound"] is True
    assert h["narrowed"] is None
    text = stability.render_horizons(stability.horizons(runs))
    assert "- balanced-init: ≥ 0.354, **could not be measured**" in text


def test_a_horizon_of_a_tuned_method_is_judged_on_the_seeds_its_strength_was_not_chosen_on():
    """balanced-exact ran at two strengths on seeds 0-2, at the chosen one on seed 3: the
    ratio of edges, the criterion the strength was chosen by, is judged on seed 3 alone, as
    every other verdict of a tuned method (it kept its range there: did not narrow). Judged on
    the tuning seeds too, it **narrowed**."""
    runs = []
    for steps, tops in ((10, [0.4] * 4), (100, [0.2, 0.2, 0.2, 0.4])):
        runs += _mini("balanced-exact", steps, tops, strength=1.0)
        runs += _mini("balanced-exact", steps, [0.1] * 3, strength=0.1)  # tuning seeds only
    h = stability.horizons(runs)["sgd/64"]["methods"]["balanced-exact"]
    assert (h["seeds"], h["unknown_seeds"], h["min"], h["max"]) == (1, 0, 1.0, 1.0)
    assert h["narrowed"] is False


def test_the_horizon_paragraph_names_what_it_compares_and_its_rule():
    runs = _mini("balanced-init", 10, [0.4, 0.4]) + _mini("balanced-init", 100, [0.2, 0.1])
    text = stability.render_horizons(stability.horizons(runs))
    assert "bisected stable edge at 100 steps over that at 10 steps" in text
    assert "`max_stable_lr`" not in text and "for every seed" not in text
    assert "bootstrap interval" in text and "**narrowed**" in text


# -- lower bounds in the tables -----------------------------------------------------------------


def test_a_seed_stable_to_the_grid_top_is_marked_in_the_per_seed_tables(tmp_path):
    """Seed 1 of exact was stable up to the grid's top (0.8): its grid rate and its edge are
    lower bounds, shown with ``≥`` like the all-seed value is; they were shown bare."""
    runs = _mini("plain", 10, [0.2, 0.4]) + _mini("exact", 10, [0.4, 0.8])
    regime, regime_runs = next(iter(by_regime(runs).items()))
    entry = task_summary(runs)["regimes"][regime.key]
    text = stability.render(tmp_path, "t", regime, entry, stability.on_grid(regime_runs))
    assert "| exact | 0.4 (0.4, ≥ 0.8) |" in text  # max_stable_lr, then each seed's
    assert f"| exact | ({0.4 * math.sqrt(2):.3g}, ≥ 0.8) |" in text  # bisected edges
    assert f"| plain | ({0.2 * math.sqrt(2):.3g}, {0.4 * math.sqrt(2):.3g}) |" in text


def _realistic_summary() -> dict:
    runs = [
        RunResult(
            RunConfig("char-gpt", "penalty", "adamw", lr, 1.0, 0.0, seed, 16, 10, task_hash="h"),
            "stable",
            2.0,
            2.0,
            1.0,
            1.5 + lr,
            None,
            None,
            None,
            None,
            None,
            1.0,
        )  # fmt: skip
        for lr in (0.0625, 0.125)
        for seed in (0, 1, 2)
    ]
    return {
        **EMPTY,
        "tasks": {"char-gpt": task_summary(runs)},
        "realistic": realistic.summarize(runs),
    }


def test_a_realistic_edge_at_the_grid_top_is_a_lower_bound_in_report_and_readme():
    """Every seed stable up to the window's top (0.125): the edges and their median are lower
    bounds (the README showed `0.125 (0.125, 0.125, 0.125)` for char-gpt's penalty)."""
    summary = _realistic_summary()
    row = "| penalty | 1 | ≥ 0.125 (≥ 0.125, ≥ 0.125, ≥ 0.125) | 0.0625 |"
    assert row in results_block(summary)
    assert row in realistic.render(summary["realistic"], summary["tasks"])


def test_a_median_is_a_lower_bound_only_where_raising_a_bound_would_raise_it():
    methods = {"plain": [{"strength": 0.0, "best_lr": None, "val_loss_by_seed": {},
                          "stable_edge_by_seed": {"0": 0.1, "1": 0.12, "2": 0.125}}]}  # fmt: skip
    assert "| plain |  | 0.12 (0.1, 0.12, ≥ 0.125) |" in realistic.table(methods, 0.125)
    methods["plain"][0]["stable_edge_by_seed"]["3"] = 0.125  # the upper middle is a bound
    assert "| plain |  | ≥ 0.122 (0.1, 0.12, ≥ 0.125, ≥ 0.125) |" in realistic.table(methods, 0.125)


# -- the drift figure ---------------------------------------------------------------------------


class _Curves:
    """A store's curves, recording which runs were drawn."""

    def __init__(self, store: Store) -> None:
        self.store, self.drawn = store, []

    def curves(self, run_id: int) -> list:
        self.drawn.append(run_id)
        return self.store.curves(run_id)


def test_the_drift_figure_draws_the_seed_it_names_for_every_method(tmp_path):
    """balance diverged on seed 0 at the drift rate: it is left out, not drawn from seed 1
    beside the other methods' seed 0 under a title that says "first seed"."""
    store = Store(tmp_path / "results.sqlite")
    for seed in (0, 1):
        for method, top in (("plain", 0.2), ("balance", 0.1 if seed == 0 else 0.4)):
            for r in _mini(method, 10, [0.0] * seed + [top], grid=(0.1, 0.2, 0.4))[-3:]:
                store.add_run(r, 0.0)
    runs = store.runs()
    regimes = {g: (drift.summarize(rs), rs) for g, rs in by_regime(runs).items()}
    recorder = _Curves(store)
    assert drift.figure(tmp_path, recorder, "t", regimes)
    seeds = {r.id: r.config.seed for r in runs}
    assert [seeds[i] for i in recorder.drawn] == [0]  # plain's seed 0 alone


# -- captions and schema ------------------------------------------------------------------------


def test_the_readmes_adam_caption_says_sqrt_v_is_read_at_the_last_step():
    """``v_inflation`` is the ratio at the last step both runs reached, not a mean over the
    steps as the caption said."""
    entry = {"strength": {"penalty": 0.1}, "horizontal": {"penalty": 0.05},
             "step_inflation": {"penalty": 1.1}, "v_inflation": {"penalty": 2.0}}  # fmt: skip
    block = results_block({**EMPTY, "adam_split": {"t": entry}})
    caption = next(line for line in block.splitlines() if line.startswith("**Adam, separated"))
    assert "at the last step" in caption and "sqrt(v): the mean over the steps" not in caption


def test_the_schema_says_the_measured_edge_is_the_stable_end_of_the_bracket():
    """sharpness_track trains at, and records, ``lo`` (a stable rate), not the midpoint the
    rest of the summary calls the stable edge."""
    hint = typing.get_type_hints(EdgeSharpness, include_extras=True)["measured_edge"]
    meaning = hint.__metadata__[0]
    assert "stable end" in meaning
    docs = (ROOT / "docs" / "experiments.md").read_text()
    assert schema_markdown() in docs


# -- plans --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"methods": {"plain": (0.0, 0.0)}},  # a strength twice: every run twice
        {"methods": {}},
        {"methods": {"plian": (0.0,)}},
        {"s": (0.0, 0.0)},
        {"s": ()},
        {"lr_range": (2, -2)},  # no rate
        {"lr_stride": 0},
        {"steps": 0},
        {"seeds": 0},
        {"batch_size": -1},
        {"floors": {1.0: -4}},  # an s the block does not run
        {"floors": {0.0: 6}},  # above the window: no run at s = 0
    ],
)
def test_an_inconsistent_block_is_refused(change):
    block = {"methods": {"plain": (0.0,)}, "optimizer": "gd", "lr_range": (-4, 2),
             "s": (0.0,), "seeds": 2, "steps": 10}  # fmt: skip
    Block(**block)  # consistent
    with pytest.raises(ValueError, match="^(inconsistent block|no learning-rate grid)"):
        Block(**{**block, **change})


def test_an_empty_learning_rate_grid_is_refused():
    assert lr_grid(-2, 2, 2) == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="no learning-rate grid"):
        lr_grid(2, -2)


class _Spec:
    """A task spec whose instances share one hash: configurations without loading data."""

    def __init__(self, name: str) -> None:
        self.name = name

    def for_seed(self, seed: int) -> _Spec:
        return self

    def hash(self) -> str:
        return "h"


@pytest.mark.parametrize("quick", [True, False])
def test_the_reproductions_grids_train_every_run_once(quick):
    for grid in reproduce_grids(quick):
        configs = [json.dumps(vars(c), sort_keys=True) for c in grid.configs(_Spec(grid.task))]
        assert configs and len(set(configs)) == len(configs), grid.task


# -- user data ----------------------------------------------------------------------------------


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, X=np.ones((6, 3)), X_test=np.ones((2, 3)), **arrays)
    return path


@pytest.mark.parametrize(
    ("kind", "y", "y_test", "message"),
    [
        # test labels were cast to integers: 0.5 and 2.7 scored as classes 0 and 2
        ("classification", [0, 1, 2, 0, 1, 2], [0.5, 2.7], "labels y_test must be"),
        ("classification", [0, 1, 2, 0, 1, 2], [-1, 2], "labels y_test must be"),
        ("classification", [0, 1, 2, 0, 1, 2], [[0], [2]], "labels y_test must be"),
        # a reshape's RuntimeError, reported as a model that cannot run
        ("regression", np.zeros((6, 2)), np.zeros(2), "y_test has shape"),
        ("regression", np.zeros((6, 2)), np.zeros((2, 3)), "y_test has shape"),
        ("regression", np.zeros((6, 2, 2)), np.zeros((2, 2, 2)), "targets y must be 1-d or 2-d"),
    ],
)
def test_test_targets_are_checked_like_the_training_ones(tmp_path, kind, y, y_test, message):
    path = _npz(tmp_path, y=np.asarray(y), y_test=np.asarray(y_test))
    with pytest.raises(TaskError, match=message):
        npz_task(path, kind, (4,))


def test_an_empty_test_split_is_refused(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.ones((6, 3)), y=np.arange(6) % 2, X_test=np.ones((0, 3)),
             y_test=np.zeros(0, dtype=int))  # fmt: skip
    with pytest.raises(TaskError, match="X_test at least 1"):
        npz_task(path, "classification", (4,))


def test_consistent_test_targets_are_accepted(tmp_path):
    task = npz_task(_npz(tmp_path, y=np.arange(6.0), y_test=np.zeros((2, 1))), "regression", (4,))
    assert task.y.shape == (6, 1) and task.y_test.shape == (2, 1)
    labels = _npz(tmp_path, y=np.arange(6) % 3, y_test=np.array([0, 3]))
    assert npz_task(labels, "classification", (4,)).y_test.tolist() == [0, 3]
