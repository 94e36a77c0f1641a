"""Verdicts on ties and their words: a paired bootstrap interval whose end is exactly 1 (log-ratios
of bisected edges that cancel) is 1, whichever way float64 rounds their mean, so it neither
holds, narrows nor counts as below 1; and an end written to 3 digits as ``1`` that is not 1 is
written with the digits that show its side of 1."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gaugefix.experiments import sharpness_track, stability
from gaugefix.experiments.engine import RunConfig, RunResult, run_status
from gaugefix.experiments.stability import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    TAIL,
    at_best_strength,
    interval_text,
    ratio_stats,
    summarize,
    verdict_text,
)
from gaugefix.experiments.store import Store
from gaugefix.experiments.summary import task_summary
from gaugefix.report.readme import results_block
from runs import run_result

# A grid of ratio 2^(1/16): a seed stable up to RATES[j] and failing at RATES[j + 1] has the edge
# sqrt(RATES[j] RATES[j + 1]), so two seeds' edges are k sixteenths of an octave apart.
RATES = tuple(0.01 * 2 ** (j / 16) for j in range(64))


def _edge(j: int) -> float:
    return math.sqrt(RATES[j] * RATES[j + 1])


def _seed(method: str, top: int, seed: int) -> list[RunResult]:
    """One seed's grid runs of ``method``, stable up to ``RATES[top]`` and diverged above."""
    return [run_result(method, lr, RATES[top], seed=seed) for lr in RATES]


def _runs(ref: str, bases: list[int], method: str, units: list[int]) -> list[RunResult]:
    """Per seed ``k``: ``ref`` stable up to ``RATES[bases[k]]``, ``method`` ``units[k]`` rates
    above (below where negative)."""
    return [
        r
        for k, (b, u) in enumerate(zip(bases, units, strict=True))
        for r in _seed(ref, b, k) + _seed(method, b + u, k)
    ]


def _stats(bases: list[int], units: list[int]) -> dict:
    """:func:`ratio_stats` of the per-seed ratios ``_edge(bases[k] + units[k]) / _edge(bases[k])``,
    as :func:`~gaugefix.experiments.stability.seed_ratios` divides two edges."""
    pairs = enumerate(zip(bases, units, strict=True))
    return ratio_stats({k: _edge(b + u) / _edge(b) for k, (b, u) in pairs})


def _exact_ends(units: list[int]) -> tuple[int, int]:
    """The bootstrap interval's ends exactly, in sixteenths of an octave times the seed count:
    the sums of the integer log-ratios over the documented resamples, at the order statistics
    the inverted CDF takes (the 250th and the 9750th smallest of 10000)."""
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(
        0, len(units), (BOOTSTRAP_RESAMPLES, len(units))
    )
    sums = np.sort(np.asarray(units)[draws].sum(axis=1))
    k = round(BOOTSTRAP_RESAMPLES * TAIL)
    return int(sums[k - 1]), int(sums[BOOTSTRAP_RESAMPLES - k - 1])


def test_a_tie_that_float_rounding_puts_above_1_does_not_hold():
    """Edges 3, -1, 1, 1 and 2 sixteenths of an octave above plain's: some 2.5%-quantile resample
    (3, -1, -1, -1, ...) has an exact mean log-ratio of 0, whose float64 mean was 2.2e-16, so
    the claim "held" on a lower end of 1.0000000000000002."""
    units, bases = [3, -1, 1, 1, 2], [10, 25, 35, 9, 16]
    assert _exact_ends(units)[0] == 0
    runs = _runs("plain", bases, "exact", units)
    stats = summarize(runs, at_best_strength(runs))["expansion_ratio"]["plain"]["exact"]["0.0"]
    assert stats["interval"][0] == 1.0 and stats["held"] is False
    assert verdict_text(stats).endswith("**did not hold**")


def test_a_tie_that_float_rounding_puts_below_1_is_not_narrower():
    """Edges 1, -3, -3 and -2 sixteenths of an octave from balanced-init's: the upper end is
    exactly 1, was 0.9999999999999998, and the README counted the method as narrower than a
    balanced start (its interval below 1)."""
    units, bases = [1, -3, -3, -2], [12, 16, 8, 27]
    assert _exact_ends(units)[1] == 0
    stats = _stats(bases, units)
    assert stats["interval"][1] == 1.0 and stats["held"] is False
    runs = _runs("balanced-init", bases, "exact", units)
    tasks = {"t": task_summary(runs)}
    got = tasks["t"]["regimes"]["sgd/full/10"]["expansion_ratio"]["balanced-init"]["exact"]
    assert got["0.0"]["interval"][1] == 1.0
    summary = {
        "runs": len(runs),
        "seconds": 60.0,
        "gaugefix_version": "v",
        "torch_version": "tv",
        "dtypes": "float32",
        "tasks": tasks,
        "verdicts": stability.count_verdicts(tasks),
        "sensitivity": stability.count_sensitivity(tasks),
    }
    assert "| exact | - | 0 / 1 | 0 / 1 |" in results_block(summary)


def test_the_published_tie_is_an_end_of_exactly_1():
    """modular-addition, full-batch Adam, balance against balanced-init at s = 0: per-seed
    edge ratios 2^(1/16), 2^(-5/16), 2^(-2/16), 2^(-5/16) and 1 (the published edges); the
    upper end was 0.9999999999999999."""
    method = [0.08282729019748383, 0.061160753880481256, 0.06669627504230147,
              0.053706853066327435, 0.061160753880481256]  # fmt: skip
    ref = [0.07931568482448333, 0.0759529599987793, 0.07273280367359859,
           0.06669627504230147, 0.061160753880481256]  # fmt: skip
    assert _exact_ends([1, -5, -2, -5, 0])[1] == 0
    stats = ratio_stats({k: m / r for k, (m, r) in enumerate(zip(method, ref, strict=True))})
    assert stats["interval"] == [0.8264503181542118, 1.0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.integers(3, 40)), min_size=1, max_size=7),
)
@example([(3, 10), (-1, 25), (1, 35), (1, 9), (2, 16)])  # ties that rounding moved
@example([(1, 12), (-3, 16), (-3, 8), (-2, 27)])
def test_each_end_is_on_the_side_of_1_of_its_exact_value(seeds):
    """Per-seed ratios of bisected edges a whole number of sixteenths of an octave apart: each
    end of the interval is above, at or below 1 as its exact value (integer sums over the same
    resamples) is, and the verdict is the exact lower end's sign."""
    units, bases = [u for u, _ in seeds], [b for _, b in seeds]
    stats = _stats(bases, units)
    for end, exact in zip(stats["interval"], _exact_ends(units), strict=True):
        assert np.sign(math.log(end)) == np.sign(exact)
    assert stats["held"] is (_exact_ends(units)[0] > 0)


def test_an_end_that_is_not_1_is_never_written_as_1():
    """The published deep-teacher-student full-batch GD verdict of balanced-init against plain at
    s = 0 held on a lower end of 1.0043, written "95% interval [1, 1.16], **held**", the same
    words as a lower end of exactly 1 that does not hold."""
    held = {"interval": [1.0043415672919245, 1.158694309462277], "held": True}
    assert verdict_text(held) == "95% interval [1.004, 1.16], **held**"
    tie = {"interval": [1.0, 1.158694309462277], "held": False}
    assert verdict_text(tie) == "95% interval [1, 1.16], **did not hold**"
    below = {"interval": [0.5, 0.99951], "held": False}
    assert interval_text(below) == "[0.5, 0.9995]"
    assert interval_text({"interval": [1.0000000000000002, 1.25]}) == "[1.0000000000000002, 1.25]"
    assert interval_text({"interval": [0.0, 2.0]}) == "[0, 2]"
    assert interval_text({"interval": None}) == "n/a"


# -- sharpness at the edge: a measured edge, never a lower bound ----------------------------------
SHARP_GRID = (0.1, 0.2, 0.4, 0.8)


class _Task:
    name = "tiny"


class _Spec:
    def __init__(self, name: str):
        self.name = name

    def hash(self) -> str:
        return "h"


def _gd_runs(method: str, top: float, s: float) -> list[RunResult]:
    """Seed 0's full-batch GD runs of ``method`` at ``s``, stable up to ``top``."""
    runs = []
    for lr in SHARP_GRID:
        config = RunConfig("tiny", method, "gd", lr, 0.0, s, 0, 0, 10, task_hash="h")
        final = 0.2 if lr <= top else None
        runs.append(RunResult(config, run_status(1.0, final, 0.5), 1.0, 0.5, final, None, None,
                              None, 0.1, 0.1, None if final else 5,
                              1.0 if final else 2e3))  # fmt: skip
    return runs


def test_sharpness_at_the_edge_leaves_out_an_edge_at_the_grids_top(tmp_path, monkeypatch):
    """Plain at s = 0 is stable at every rate it ran (0.8, the grid's top): its edge is only a
    lower bound, which the table gave as the measured edge and its ratio to the predicted one.
    Exact, failing at 0.4, has the bracket [0.2, 0.4]: tracked at 0.2."""
    monkeypatch.setattr(sharpness_track, "TaskSpec", _Spec)
    store = Store(tmp_path / "results.sqlite")
    for r in _gd_runs("plain", 0.8, 0.0) + _gd_runs("exact", 0.2, 0.0):
        store.add_run(r, 0.0)
    steps, edges = sharpness_track.edges_at_seed_0(store, _Task(), (0.0,))
    assert steps == 10 and edges == {("exact", 0.0): (0.0, 0.2)}
