"""Second audit of the verdict statistics of :mod:`gaugefix.experiments.stability`: each statistic
recomputed by hand from its documented definition (the bootstrap by numpy resampling, edges as
bracket midpoints, lower bounds at a cell's grid top) on stores built with ``run_result``, and
the inputs the first audit did not try (interrupted seeds below the band, horizons of a regime
with several s, peak ratios that are not numbers, a single seed, references never stable)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from gaugefix.experiments.engine import RunResult
from gaugefix.experiments.stability import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    DEFAULT,
    SENSITIVITY,
    TUNING_SEEDS,
    Definition,
    at_best_strength,
    bootstrap_interval,
    horizons,
    ratio_stats,
    stable_edges,
    status,
    summarize,
)
from runs import run_result

LRS = (0.1, 0.2, 0.4, 0.8, 1.6)  # ratio 2
TOL = 1e-12


def _with(run: RunResult, **config) -> RunResult:
    """``run`` with the given configuration fields replaced."""
    return dataclasses.replace(run, config=dataclasses.replace(run.config, **config))


def _seed(method: str, top: float, seed: int, rates=LRS, **config) -> list[RunResult]:
    """One seed's grid runs of ``method``: stable up to ``top``, diverged above."""
    return [_with(run_result(method, lr, top, seed=seed), **config) for lr in rates]


def _cell(method: str, tops: list[float], **config) -> list[RunResult]:
    """One run per rate and seed, seed ``k`` stable up to ``tops[k]``."""
    return [r for k, top in enumerate(tops) for r in _seed(method, top, k, **config)]


def _edge(top: float) -> float:
    """The documented edge of a seed stable up to the grid rate ``top`` and failing at the next:
    the geometric midpoint of the bracket ``[top, 2 top]``."""
    return math.sqrt(top * 2 * top)


def _by_hand(ratios: list[float]) -> tuple[float, float]:
    """The documented interval: ``exp`` of the 2.5th and 97.5th percentiles (inverted CDF: the
    250th and 9750th smallest of 10000) of the means of the log-ratios over the seeds drawn
    with replacement by numpy's generator of seed 0."""
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(
        0, len(logs), (BOOTSTRAP_RESAMPLES, len(logs))
    )
    means = np.sort(logs[draws].mean(axis=1))
    k = round(BOOTSTRAP_RESAMPLES * 0.025)
    return math.exp(means[k - 1]), math.exp(means[BOOTSTRAP_RESAMPLES - k - 1])


# -- the bootstrap ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ratios",
    [
        [1.5, 0.75, 2.0, 2.0, 1.25, 0.9, 3.0],  # ties among seven seeds
        [2.0 ** (k / 3) for k in range(-4, 6)],  # ten seeds
        [1.0 + 2.0**-52, 1.0, 1.0],  # one ulp apart
    ],
)
def test_the_bootstrap_interval_is_the_documented_resampling(ratios):
    low, high = bootstrap_interval(ratios)
    want = _by_hand(ratios)
    assert low == pytest.approx(want[0], rel=TOL) and high == pytest.approx(want[1], rel=TOL)
    stats = ratio_stats(dict(enumerate(ratios)))
    assert stats["held"] is (want[0] > 1.0)
    assert stats["median"] == pytest.approx(float(np.median(ratios)), rel=TOL)


def test_a_single_seed_is_judged_on_its_own_ratio():
    for ratio, held in ((1.25, True), (1.0, False), (0.8, False)):
        stats = ratio_stats({3: ratio})
        assert stats["interval"] == pytest.approx([ratio, ratio], rel=TOL)
        assert (stats["seeds"], stats["held"]) == (1, held)


# -- summaries by hand ----------------------------------------------------------------------------
def _expansion(runs: list[RunResult], method: str, ref: str = "plain") -> dict:
    g = summarize(runs, at_best_strength(runs))
    return g["expansion_ratio"][ref][method]["0.0"]


def test_every_seed_a_lower_bound_holds_or_cannot_be_measured():
    plain = _cell("plain", [0.2, 0.2, 0.4])
    high = _expansion(plain + _cell("balance", [1.6] * 3), "balance")
    ratios = [1.6 / _edge(0.2), 1.6 / _edge(0.2), 1.6 / _edge(0.4)]
    assert high["lower_bound"] is True and high["held"] is True
    assert high["interval"] == pytest.approx(list(_by_hand(ratios)), rel=TOL)
    # the same lower bounds over a reference whose edges are larger: the true ratios may be
    # anything above these, so the claim is not refused
    wide = _cell("plain", [1.6] * 3, rates=(*LRS, 3.2, 6.4))
    low = _expansion(wide + _cell("balance", [1.6] * 3), "balance")
    assert low["lower_bound"] is True and low["held"] is None
    assert low["max"] == pytest.approx(1.6 / _edge(1.6), rel=TOL)


def test_a_reference_never_stable_measures_nothing():
    runs = _cell("plain", [0.05] * 3) + _cell("balance", [0.4] * 3)
    stats = _expansion(runs, "balance")
    assert (stats["seeds"], stats["unknown_seeds"], stats["held"]) == (3, 3, None)
    assert stats["interval"] is None and stats["median"] is None


def test_an_interrupted_method_seed_without_a_stable_rate_is_not_a_ratio_of_zero():
    """Balance's seed 2 ran only the grid's top rate (diverged) before the store was stopped:
    it has no stable rate among the rates it ran, but its edge may be anywhere below 1.6. Taken
    as a known ratio 0, the claim "did not hold" though the two known seeds are at 4."""
    runs = _cell("plain", [0.2] * 3) + _cell("balance", [0.8] * 2) + _seed("balance", 0.8, 2)[-1:]
    stats = _expansion(runs, "balance")
    assert (stats["unknown_seeds"], stats["held"]) == (1, None)
    assert stats["min"] == pytest.approx(_edge(0.8) / _edge(0.2), rel=TOL)
    # the same seed having run the whole grid without a stable rate: a known ratio 0
    runs = runs[:-1] + _seed("balance", 0.05, 2)
    stats = _expansion(runs, "balance")
    assert (stats["unknown_seeds"], stats["min"], stats["held"]) == (0, 0.0, False)


def test_an_interrupted_long_horizon_seed_without_a_stable_rate_did_not_narrow_it():
    """The long horizon's seed 1 ran only the top rate: its ratio 0 made the range narrow."""

    def mini(steps: int, tops: list[float]) -> list[RunResult]:
        return _cell("balance", tops, steps=steps, batch_size=64)

    runs = mini(10, [0.8, 0.8]) + mini(100, [0.4]) + _seed("balance", 0.4, 1, steps=100,
                                                          batch_size=64)[-1:]  # fmt: skip
    h = horizons(runs)["sgd/64"]["methods"]["balance"]
    assert (h["seeds"], h["unknown_seeds"], h["narrowed"]) == (2, 1, None)
    assert h["max"] == pytest.approx(0.5, rel=TOL)


def test_a_horizon_is_at_the_regimes_best_strength_over_every_s():
    """At s = 0 strength 0.1 is the better; summed over s = 0 and 1, strength 1.0 is, so the
    regime (and its summary) shows 1.0. The horizon took the strength s = 0 alone chose."""

    def mini(steps: int, strength: float, s: float, tops: list[float]) -> list[RunResult]:
        return _cell("balanced-exact", tops, steps=steps, batch_size=64, strength=strength, s=s)

    runs = []
    for steps, held_out in ((10, [0.8]), (100, [0.2])):
        runs += mini(steps, 0.1, 0.0, [0.4] * TUNING_SEEDS) + mini(steps, 0.1, 1.0, [0.1] * 3)
        runs += mini(steps, 1.0, 0.0, [0.2] * TUNING_SEEDS + held_out)
        runs += mini(steps, 1.0, 1.0, [1.6] * 3)
    short = [r for r in runs if r.config.steps == 10]
    assert summarize(short, at_best_strength(short))["best_strength"]["balanced-exact"] == 1.0
    h = horizons(runs)["sgd/64"]["methods"]["balanced-exact"]
    # judged on seed 3 alone, at strength 1.0: sqrt(0.2 * 0.4) / sqrt(0.8 * 1.6)
    assert (h["seeds"], h["unknown_seeds"]) == (1, 0)
    assert h["median"] == pytest.approx(_edge(0.2) / _edge(0.8), rel=TOL)
    assert h["narrowed"] is True


def test_a_seeds_rates_spelled_one_ulp_apart_change_no_verdict():
    """Seed 1 of balance ran each grid rate one ulp above the others' spelling: its edge moves
    by an ulp, its top is still the grid's (no lower bound) and the verdict stays."""
    up = tuple(math.nextafter(lr, 2.0) for lr in LRS)
    plain = _cell("plain", [0.2, 0.2, 0.4])
    same = _expansion(plain + _cell("balance", [0.8, 0.8, 0.8]), "balance")
    spelled = _cell("balance", [0.8]) + _seed("balance", up[3], 1, rates=up)
    spelled += _seed("balance", 0.8, 2)
    moved = _expansion(plain + spelled, "balance")
    assert moved["held"] is same["held"] is True
    assert moved["interval"] == pytest.approx(same["interval"], rel=TOL)
    assert moved["lower_bound"] is same["lower_bound"] is False


def test_an_edge_under_another_margin_reads_the_bisection_runs_by_hand():
    """Grid 0.1 and 0.2 stable, 0.4 diverged; bisection: 0.2 sqrt(2) stable at margin 0.9 only
    (final 0.3 of initial 1, constant 0.5), then 0.2 2^(3/4) diverged."""
    mid, upper = 0.2 * 2**0.5, 0.2 * 2**0.75
    runs = _seed("plain", 0.2, 0)
    runs += [_with(dataclasses.replace(run_result("plain", mid, 1.0), final_loss=0.3), bisection=1)]
    runs += [_with(run_result("plain", upper, 0.2), bisection=2)]
    loose, strict = Definition(1e3, 0.9), Definition(1e3, 0.5)
    assert status(runs[-2], loose) == "stable" and status(runs[-2], strict) == "unstable"
    assert stable_edges(runs, loose)[0] == pytest.approx(math.sqrt(mid * upper), rel=TOL)
    assert stable_edges(runs, strict)[0] == pytest.approx(math.sqrt(0.2 * mid), rel=TOL)
    assert stable_edges(runs)[0] == stable_edges(runs, loose)[0]


# -- definitions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("definition", [d for d in SENSITIVITY if d != DEFAULT])
def test_a_peak_ratio_that_is_not_a_number_is_not_within_a_lower_factor(definition):
    """A stored run stable under the default definition with a peak ratio that is NaN (NULL in
    a store): its peak is not known to be within any factor, as the engine counts a NaN ratio
    as infinite; it was stable under every definition."""
    run = dataclasses.replace(run_result("plain", 0.1, 1.0), peak_loss_ratio=math.nan)
    assert status(run) == "stable" and status(run, definition) == "diverged"


def test_another_margin_judges_the_stored_losses_by_hand():
    """Final loss 0.2 of initial 1 and constant 0.5: stable at margin m where 0.2 <= m * 0.5."""
    run = run_result("plain", 0.1, 1.0)
    for margin in (0.3, 0.4, 0.45, 0.5, 0.9):
        want = "stable" if 0.2 <= margin * 0.5 else "unstable"
        assert status(run, Definition(1e3, margin)) == want


# -- callers outside this module ------------------------------------------------------------------
class _Runs:
    """A store that holds ``runs`` (``sweep_verdicts`` asks it for one task's Adam runs)."""

    def __init__(self, runs: list[RunResult]) -> None:
        self._runs = runs

    def runs(self, **_: object) -> list[RunResult]:
        return self._runs


def test_adam_splits_sweep_verdicts_leave_an_interrupted_seed_unknown():
    from gaugefix.experiments import adam_split
    from gaugefix.experiments.runner import TaskSpec

    spec = TaskSpec("teacher-student")
    config = {"optimizer": "adam", "task": spec.name, "task_hash": spec.hash()}
    runs = _cell("plain", [0.2] * 3, **config) + _cell("penalty", [0.8] * 2, strength=0.1, **config)
    runs += _seed("penalty", 0.8, 2, strength=0.1, **config)[-1:]
    stats = adam_split.sweep_verdicts(_Runs(runs), spec)["penalty/plain"]["0.0"]
    assert (stats["unknown_seeds"], stats["held"]) == (1, None)
