"""How stored runs are grouped into tasks, regimes and cells for ``summary.json``: runs that must
stay apart are never merged into one cell (other dtypes, colliding task keys, one run twice), and
a cell's median is over the seeds it claims."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gaugefix.report as report
from gaugefix.cli import app
from gaugefix.experiments import quality, stability
from gaugefix.experiments.cells import by_regime, by_task, median, s_key
from gaugefix.experiments.engine import RunResult
from gaugefix.experiments.store import Store
from gaugefix.experiments.summary import summarize, task_summary
from runs import run_result

LRS = (0.1, 0.2, 0.4, 0.8, 1.6)
SEEDS = (0, 1)
# Each dtype's stable top per method: balance doubles plain's range in float32, halves it in
# float64, so a merged cell's verdict is neither dtype's.
TOPS = {"float32": {"plain": 0.2, "balance": 0.4}, "float64": {"plain": 0.8, "balance": 0.1}}


def _with(run: RunResult, **config) -> RunResult:
    """``run`` with the given configuration fields replaced."""
    return dataclasses.replace(run, config=dataclasses.replace(run.config, **config))


def _runs(dtype: str) -> list[RunResult]:
    """One full-batch regime of plain and balance, two seeds, trained in ``dtype``."""
    return [
        _with(run_result(method, lr, top, seed=seed), dtype=dtype)
        for method, top in TOPS[dtype].items()
        for lr in LRS
        for seed in SEEDS
    ]


def _store(path: Path, runs: list[RunResult]) -> Store:
    store = Store(path / "results.sqlite")
    for r in runs:
        store.add_run(r, 1.0)
    return store


# -- dtypes ----------------------------------------------------------------------------------------
def test_runs_of_two_dtypes_in_one_regime_are_refused_naming_both():
    """float32 and float64 runs of one cell were one cell: the expansion verdict (0.125, not
    held) was neither float32's (2.0, held) nor float64's."""
    with pytest.raises(ValueError, match=r"'t'.*sgd/full/10.*float32, float64"):
        task_summary(_runs("float32") + _runs("float64"))


def test_a_store_of_two_dtypes_is_refused_before_anything_is_written(tmp_path):
    _store(tmp_path, _runs("float64") + _runs("float32"))
    with pytest.raises(ValueError, match="float32, float64"):
        report.render(tmp_path, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]


def test_one_dtype_other_than_float32_keeps_the_summary_keys(tmp_path):
    """A store of float64 runs alone is summarised as a float32 one is: the same keys, and its
    own numbers (the regime's verdict is float64's)."""
    ones = summarize(_store(tmp_path, _runs("float64")), quick=True)
    regime = ones["tasks"]["t"]["regimes"]["sgd/full/10"]
    assert regime["max_stable_lr"] == {"plain": {"0.0": 0.8}, "balance": {"0.0": 0.1}}
    ratio = regime["expansion_ratio"]["plain"]["balance"]["0.0"]
    assert abs(ratio["median"] - math.sqrt(0.1 * 0.2) / math.sqrt(0.8 * 1.6)) <= 1e-12
    assert ratio["held"] is False


def test_two_tasks_of_two_dtypes_are_each_summarised(tmp_path):
    runs = _runs("float32") + [_with(r, task="u") for r in _runs("float64")]
    tasks = summarize(_store(tmp_path, runs), quick=True)["tasks"]
    assert tasks["t"]["regimes"]["sgd/full/10"]["max_stable_lr"]["plain"] == {"0.0": 0.2}
    assert tasks["u"]["regimes"]["sgd/full/10"]["max_stable_lr"]["plain"] == {"0.0": 0.8}


def test_gaugefix_report_refuses_two_dtypes_in_one_line(tmp_path):
    _store(tmp_path, _runs("float32") + _runs("float64"))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output and "float64" in result.output


# -- task keys and duplicate rows ------------------------------------------------------------------
def test_task_keys_that_collide_are_refused():
    """A task named ``t@11111111`` (a data file's name) and version ``11111111`` of a task ``t``
    with two versions were both keyed ``t@11111111`` and merged."""
    runs = _runs("float32")
    named = [_with(r, task="t@11111111", task_hash="11111111aaaaaaaa") for r in runs]
    old = [_with(r, task_hash="11111111bbbbbbbb") for r in runs]
    new = [_with(r, task_hash="22222222bbbbbbbb") for r in runs]
    with pytest.raises(ValueError, match="t@11111111"):
        by_task(named + old + new)
    assert list(by_task(named + new)) == ["t", "t@11111111"]  # no collision: kept


def test_one_run_given_twice_is_refused():
    """A run twice in one regime weighted its seed twice in the medians: balance's test loss
    over seeds 0 (0.2) and 1 (0.4) was 0.4, not 0.3."""
    runs = [
        run_result(m, 0.1, 0.4, seed=s, test_loss=0.2 * (s + 1))
        for m in ("plain", "balance")
        for s in SEEDS
    ]
    medians = task_summary(runs)["regimes"]["sgd/full/10"]["final_test_loss"]["medians"]
    assert medians["balance"]["0.1"] == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match="twice"):
        task_summary([*runs, runs[-1]])
    with pytest.raises(ValueError, match="twice"):
        by_regime([*runs, runs[0]])


# -- medians over seeds ----------------------------------------------------------------------------
def test_a_median_with_nan_is_nan_wherever_the_nan_is():
    """``statistics.median`` sorts, and NaN does not order: 0.3, NaN or 0.4 by position."""
    for values in ([math.nan, 0.3, 0.4], [0.3, math.nan, 0.4], [0.3, 0.4, math.nan]):
        assert math.isnan(median(values))
    assert median([None, 0.3, 0.4]) == pytest.approx(0.35, abs=1e-12)


def _seeds_with_test_loss(missing: float | None) -> list[RunResult]:
    """plain and balance on three seeds at two rates, all stable; balance's seed 2 at 0.1 has
    the test loss ``missing`` (``None``: a NaN read back from a store)."""
    runs = []
    for method in ("plain", "balance"):
        for seed in (0, 1, 2):
            for lr in (0.1, 0.2):
                r = run_result(method, lr, 0.4, seed=seed, test_loss=0.1 * (seed + 1))
                if (method, seed, lr) == ("balance", 2, 0.1):
                    r = dataclasses.replace(r, test_loss=missing)
                runs.append(r)
    return runs


@pytest.mark.parametrize("missing", [None, math.nan])
def test_a_metric_some_seed_lacks_has_no_median(missing):
    """balance's median test loss at 0.1 was over seeds 0 and 1 (0.15) against plain's over
    0, 1 and 2 (0.2): not paired. Now that rate is left out of balance's test loss."""
    medians = quality.summarize(_seeds_with_test_loss(missing))["final_test_loss"]["medians"]
    assert medians["balance"] == {"0.2": pytest.approx(0.2, abs=1e-12)}
    assert medians["plain"] == {"0.1": pytest.approx(0.2, abs=1e-12), "0.2": pytest.approx(0.2)}


def test_a_stored_nan_test_loss_leaves_its_rate_out(tmp_path):
    summary = summarize(_store(tmp_path, _seeds_with_test_loss(math.nan)), quick=True)
    regime = summary["tasks"]["t"]["regimes"]["sgd/full/10"]
    assert list(regime["final_test_loss"]["medians"]["balance"]) == ["0.2"]
    assert list(regime["final_train_loss"]["medians"]["balance"]) == ["0.1", "0.2"]


# -- stability's cells ----------------------------------------------------------------------------
def test_a_rate_some_seed_did_not_run_is_not_stable_for_every_seed():
    """0.4, run by seed 0 alone, counted as stable for every seed (seed 1's own edge: 0.2)."""
    runs = [run_result("plain", lr, 0.4, seed=0) for lr in (0.1, 0.2, 0.4)]
    runs += [run_result("plain", lr, 0.2, seed=1) for lr in (0.1, 0.2)]
    assert stability.max_stable_lr(runs) == 0.2


def test_a_method_without_tuning_seeds_is_summarised_or_refused_clearly():
    """A method run on seeds >= TUNING_SEEDS alone had no best strength: KeyError. With one
    strength there is nothing to choose; with two it cannot be chosen: one clear error."""
    runs = [run_result("plain", lr, 0.2, seed=s) for lr in (0.1, 0.2, 0.4) for s in SEEDS]
    late = [run_result("balance", lr, 0.2, seed=stability.TUNING_SEEDS) for lr in (0.1, 0.2)]
    assert stability.best_strengths(runs + late)["balance"] == 0.0
    assert "balance" in task_summary(runs + late)["regimes"]["sgd/full/10"]["max_stable_lr"]
    strong = [_with(r, strength=1.0) for r in late]
    with pytest.raises(ValueError, match="'balance' has several strengths"):
        task_summary(runs + late + strong)


def test_s_keys_of_adjacent_floats_stay_apart():
    """``s_key`` is the float's shortest repr: no two initial imbalances share a key (unlike
    ``lr_key``, 6 digits, which ``quality.summarize`` refuses on a collision)."""
    s = 1.5
    assert s_key(math.nextafter(s, 2.0)) != s_key(s)
    assert float(s_key(math.nextafter(s, 2.0))) == math.nextafter(s, 2.0)


# -- the realistic tasks' tuned rate and adam_split's rate -----------------------------------------
def test_a_nan_validation_loss_leaves_its_rate_out_of_the_best_rate():
    """statistics.median over [0.5, nan] gave an answer that depended on where the NaN stood,
    so a rate where a seed's validation loss was NaN could be chosen as the best."""
    from gaugefix.experiments import realistic

    runs = [run_result("plain", 0.1, 1.0, seed=s, test_loss=0.5) for s in range(3)]
    runs += [run_result("plain", 0.2, 1.0, seed=s, test_loss=0.1) for s in range(2)]
    runs.append(run_result("plain", 0.2, 1.0, seed=2, test_loss=math.nan))  # median [.1, .1, nan]
    assert realistic.best_lr(runs) == 0.1


def test_adam_splits_rate_is_plains_edge_in_the_longest_full_batch_regime(tmp_path):
    """Plain's full-batch Adam runs of every regime were pooled: a rate stable over 40 steps but
    not over 150 counted against the 150-step regime's edge, and the rate was no regime's."""
    from gaugefix.experiments import adam_split
    from gaugefix.experiments.runner import TaskSpec
    from gaugefix.experiments.tasks import load_task

    task_hash = TaskSpec("teacher-student").hash()
    runs = [
        _with(run_result("plain", lr, top, steps=steps), task="teacher-student",
              task_hash=task_hash, optimizer="adam", s=adam_split.S)
        for steps, top in ((40, 0.2), (150, 0.4))
        for lr in (0.1, 0.2, 0.4, 0.8)
    ]  # fmt: skip
    assert adam_split._plain_adam_edge(_store(tmp_path, runs), load_task("teacher-student")) == 0.4


def test_the_summary_and_the_readme_block_name_the_runs_dtype(tmp_path):
    """The README block said float32 whatever the runs were trained in."""
    from gaugefix.report.readme import results_block

    summary = summarize(_store(tmp_path, _runs("float64")), quick=True)
    assert summary["dtypes"] == "float64"
    assert "torch tv, float64; " in results_block({**summary, "torch_version": "tv"})


def test_a_task_named_like_a_version_of_a_realistic_one_is_not_realistic():
    """A data file named ``char-gpt@x`` was summarised as the realistic char-gpt; a version of
    char-gpt (keyed ``char-gpt@VERSION`` beside another) still is."""
    from gaugefix.experiments import realistic

    named = [_with(r, task="char-gpt@x") for r in _runs("float32")]
    assert realistic.summarize(named) == {}
    versions = [
        _with(r, task="char-gpt", task_hash=h)
        for h in ("11111111aaaaaaaa", "22222222aaaaaaaa")
        for r in _runs("float32")
    ]
    assert sorted(realistic.summarize(versions)) == ["char-gpt@11111111", "char-gpt@22222222"]


def _balanced(method: str, lr: float, seed: int, change: float | None) -> RunResult:
    """A run stable up to lr 0.1 whose output changed by ``change`` when balanced."""
    return dataclasses.replace(run_result(method, lr, 0.1, seed=seed), balance_change=change)


def test_the_expressivity_check_counts_the_finished_plain_networks_it_could_not_measure(tmp_path):
    """A NaN output change of a plain network that finished training (stored as ``None``) is
    counted and makes the claim not measured, instead of leaving the network out of "at most";
    a diverged plain network and a network of another method are not counted."""
    store = Store(tmp_path / "results.sqlite")
    runs = [
        _balanced("plain", 0.1, 0, 1e-15),
        _balanced("plain", 0.1, 1, math.nan),
        _balanced("plain", 0.4, 0, None),
        _balanced("balance", 0.1, 0, None),
    ]
    for r in runs:
        store.add_run(r, 1.0)
    entry = quality.summarize_task(store.runs())
    assert entry == {"balance_function_change": 1e-15, "balance_unmeasured": 1}
    assert quality.render_task(entry) == (
        "**Expressivity**: 1 plain network that finished training has no finite output change "
        "when balanced by `balance_`; the networks measured changed by at most 1e-15 (relative, "
        "float64): claim (3), the representable functions are identical, **could not be "
        "measured**."
    )
    none = {"balance_function_change": None, "balance_unmeasured": 2}
    assert quality.render_task(none) == (
        "**Expressivity**: 2 plain networks that finished training have no finite output change "
        "when balanced by `balance_`: claim (3), the representable functions are identical, "
        "**could not be measured**."
    )
    every = quality.summarize_task(runs[:1])
    assert every == {"balance_function_change": 1e-15, "balance_unmeasured": 0}
    assert quality.render_task(every).endswith(
        "at most 1e-15 (relative, float64): claim (3), "
        "the representable functions are identical, **held**."
    )
