"""Audit of the verdict statistics of :mod:`gaugefix.experiments.stability`: each function on
small hand-made runs against a hand computation (edges, brackets, lower bounds, unknown seeds,
tuned strengths judged on held-out seeds, horizons, the verdict counts), and the summary's
independence of the order of the runs."""

from __future__ import annotations

import copy
import math
import random

import pytest

from gaugefix.experiments import stability
from gaugefix.experiments.engine import RunConfig, RunResult
from gaugefix.experiments.stability import (
    DEFAULT,
    SENSITIVITY,
    Definition,
    at_best_strength,
    band_top,
    best_strengths,
    count_sensitivity,
    count_verdicts,
    edge_bracket,
    horizons,
    max_stable_lr,
    on_grid,
    ratio_stats,
    seed_ratios,
    stable_edges,
    status,
    summarize,
)

GRID = [2.0**k for k in range(-3, 2)]  # 0.125 .. 2, ratio 2
TOP = GRID[-1]
INITIAL, CONSTANT = 1.0, 1.2  # a run is stable at margin m below m * INITIAL
TOL = 1e-12


def _run(
    method: str,
    lr: float,
    state: str,
    seed: int = 0,
    *,
    s: float = 0.0,
    strength: float = 0.0,
    bisection: int = 0,
    steps: int = 10,
    batch: int = 0,
    final: float | None = None,
    peak: float | None = None,
) -> RunResult:
    """A run ``state`` (stable, unstable or diverged) at ``lr``; ``final`` and ``peak`` as given
    or typical of the state."""
    opt = "sgd" if batch else "gd"
    config = RunConfig(
        "t", method, opt, lr, strength, s, seed, batch, steps, task_hash="h", bisection=bisection
    )
    typical = {"stable": (0.3, 1.0), "unstable": (0.95, 1.0), "diverged": (None, 2e3)}[state]
    final = typical[0] if final is None else final
    peak = typical[1] if peak is None else peak
    at = 3 if state == "diverged" else None
    return RunResult(config, state, INITIAL, CONSTANT, final, *[None] * 5, at, peak)


def _seed(method: str, edge: float, seed: int = 0, rates=GRID, **kw) -> list[RunResult]:
    """One seed's grid runs: stable up to ``edge``, diverged above."""
    return [_run(method, lr, "stable" if lr <= edge else "diverged", seed, **kw) for lr in rates]


def _cell(method: str, edges: list[float], **kw) -> list[RunResult]:
    """One grid run per rate and seed, seed ``k`` stable up to ``edges[k]``."""
    return [r for k, e in enumerate(edges) for r in _seed(method, e, k, **kw)]


def _summary(runs: list[RunResult]) -> stability.StabilitySummary:
    return summarize(runs, at_best_strength(runs))


# -- edges and brackets --------------------------------------------------------------------------
def test_band_top_and_edge_bracket_by_hand():
    assert band_top({}) == 0.0
    assert band_top(dict.fromkeys(GRID, True)) == TOP
    runs = [_run("plain", 0.125, "unstable"), _run("plain", 0.25, "stable")]
    runs += [_run("plain", 0.5, "stable"), _run("plain", 1.0, "diverged")]
    runs += [_run("plain", 2.0, "stable")]  # a second band above: not the lowest
    # bisection: sqrt(1/2) stable, 2^(-1/4) failed
    runs += [_run("plain", 2**-0.5, "stable", bisection=1)]
    runs += [_run("plain", 2**-0.25, "diverged", bisection=2)]
    assert edge_bracket(runs) == (2**-0.5, 2**-0.25)
    assert stable_edges(runs)[0] == pytest.approx(2**-0.375, rel=TOL)
    assert max_stable_lr(runs) == 0.5  # the grid's alone
    none = [_run("plain", lr, "unstable", 1) for lr in GRID]
    assert edge_bracket(none) == (0.0, None) and stable_edges(none) == {1: 0.0}
    assert edge_bracket(_seed("plain", TOP)) == (TOP, None)  # a lower bound: its top


def test_a_rate_run_twice_counts_as_stable_only_when_both_runs_are_in_either_order():
    """A grid run and a bisection run at one rate, one stable and one not: the rate is not known
    to be stable (as max_stable_lr has it for a grid rate some seed failed); the bisected edge
    did what the last run in the list said, so it depended on the order of the store."""
    runs = _seed("plain", 0.5) + [_run("plain", 0.5, "diverged", bisection=1)]
    assert edge_bracket(runs) == edge_bracket(runs[::-1]) == (0.25, 0.5)
    assert stable_edges(runs) == stable_edges(runs[::-1]) == {0: math.sqrt(0.125)}


@pytest.mark.parametrize("definition", SENSITIVITY)
def test_a_run_without_a_finite_final_loss_is_never_stable(definition):
    runs = [
        _run("plain", 0.125, "stable"),
        _run("plain", 0.25, "diverged"),  # final None
        _run("plain", 0.5, "unstable", final=math.nan),
        _run("plain", 1.0, "unstable", final=math.inf),
        _run("plain", 2.0, "unstable", final=0.1, peak=math.inf),
    ]
    assert [status(r, definition) == "stable" for r in runs] == [True] + [False] * 4
    assert edge_bracket(runs, definition) == (0.125, 0.25)


def test_the_sensitivity_definitions_judge_peak_and_final_loss_by_hand():
    assert DEFAULT in SENSITIVITY and len(set(SENSITIVITY)) == 6
    assert {d.key for d in SENSITIVITY} == {
        f"{f:g}x/{m:g}" for f in (2, 10, 1e3) for m in (0.5, 0.9)
    }
    run = _run("plain", 0.1, "stable", final=0.6, peak=5.0)  # at 0.6 of its initial loss
    got = {d.key: status(run, d) for d in SENSITIVITY}
    want = {d.key: "diverged" if d.factor < 5 else "stable" if d.margin > 0.6 else "unstable"
            for d in SENSITIVITY}  # fmt: skip
    assert got == want
    assert status(run, Definition(1e3, 0.9)) == run.status  # the stored status


# -- per-seed ratios ------------------------------------------------------------------------------
def test_a_reference_without_a_stable_rate_or_at_its_top_leaves_the_seed_unknown():
    method = {0: 0.8, 1: 0.8, 2: 0.8}
    stats = seed_ratios(method, {0: 0.0, 1: 0.4, 2: TOP}, TOP, TOP)
    assert (stats["seeds"], stats["unknown_seeds"], stats["held"]) == (3, 2, None)
    assert (stats["min"], stats["median"], stats["max"]) == (2.0, 2.0, 2.0)
    assert stats["interval"] == pytest.approx([2.0, 2.0], rel=TOL)
    assert stats["lower_bound"] is False


def test_lower_bounds_at_the_grid_top_only_ever_block_a_did_not_hold():
    """Three seeds: the bootstrap's lower end is the smallest ratio (1/27 > 2.5%)."""
    ref = {0: 0.5, 1: 0.25, 2: 1.0}
    held = seed_ratios({0: 1.0, 1: 1.0, 2: TOP}, ref, TOP, TOP)
    assert (held["min"], held["median"], held["max"]) == (2.0, 2.0, 4.0)
    assert held["lower_bound"] is True and held["held"] is True
    assert held["interval"][0] == pytest.approx(2.0, rel=TOL)
    unknown = seed_ratios({0: 0.25, 1: 1.0, 2: TOP}, ref, TOP, TOP)
    assert unknown["lower_bound"] is True and unknown["held"] is None
    assert unknown["interval"][0] == pytest.approx(0.5, rel=TOL)
    # the same values with a larger grid: no bound, so the claim did not hold
    exact = seed_ratios({0: 0.25, 1: 1.0, 2: TOP}, ref, 2 * TOP, TOP)
    assert exact["lower_bound"] is False and exact["held"] is False
    # a method with no stable rate on a seed: ratio 0, the lower end 0
    zero = seed_ratios({0: 0.0, 1: 1.0, 2: 1.0}, ref, TOP, TOP)
    assert zero["min"] == 0.0 and zero["interval"][0] == 0.0 and zero["held"] is False


def test_seeds_missing_on_either_side_are_unknown():
    method = {0: 1.0, 1: 1.0, 2: 1.0}
    fewer_ref = seed_ratios(method, {0: 0.5, 1: 0.5}, TOP, TOP)
    fewer_method = seed_ratios({0: 1.0, 1: 1.0}, {0: 0.5, 1: 0.5, 2: 0.5}, TOP, TOP)
    for stats in (fewer_ref, fewer_method):
        assert (stats["seeds"], stats["unknown_seeds"], stats["held"]) == (3, 1, None)
        assert stats["interval"] == pytest.approx([2.0, 2.0], rel=TOL)
    assert ratio_stats({})["held"] is None and ratio_stats({})["seeds"] == 0


def test_a_reference_seed_that_did_not_run_the_grids_top_is_not_an_edge():
    """Plain's seed 1 ran 0.125 and 0.25 only (an interrupted store), stable at both: its edge
    0.25 is a lower bound (nothing above it ran), so its ratio is not known; counted as a
    measured edge, the claim held on a ratio that may be below 1."""
    runs = _seed("plain", 0.125) + _seed("plain", TOP, 1, rates=GRID[:2])
    runs += _cell("balance", [1.0, 1.0])
    stats = _summary(runs)["expansion_ratio"]["plain"]["balance"]["0.0"]
    assert stats["unknown_seeds"] == 1 and stats["held"] is None
    assert stats["median"] == pytest.approx(8.0, rel=TOL)  # seed 0: sqrt(2) / sqrt(1/32)


def test_a_method_seed_that_did_not_run_the_grids_top_is_a_lower_bound():
    runs = _cell("plain", [0.25, 0.25])
    runs += _seed("balance", 0.25) + _seed("balance", TOP, 1, rates=GRID[:2])
    g = _summary(runs)
    stats = g["expansion_ratio"]["plain"]["balance"]["0.0"]
    assert stats["lower_bound"] is True and stats["held"] is None  # not "did not hold"
    assert stats["min"] == pytest.approx(0.25 / math.sqrt(0.125), rel=TOL)
    # every seed stable at every rate all of them ran: a lower bound of the cell too
    assert g["max_stable_lr"]["balance"]["0.0"] == 0.25
    assert g["max_stable_lr_at_grid_top"] == {"balance": ["0.0"]}


def test_a_bisection_run_above_the_grids_top_keeps_the_edge_a_lower_bound():
    above = [_run("plain", 2 * TOP, "diverged", 1, bisection=1)]
    assert edge_bracket(_seed("plain", TOP, 1) + above) == (TOP, 2 * TOP)
    runs = _cell("balanced-init", [0.25, 0.25]) + _cell("plain", [0.125, TOP]) + above
    g = _summary(runs)["expansion_ratio"]
    # plain as the method: seed 1's edge sqrt(8) is above the grid's top, a lower bound; seed 0's
    # ratio 1/2 then cannot say "did not hold"
    as_method = g["balanced-init"]["plain"]["0.0"]
    assert as_method["lower_bound"] is True and as_method["held"] is None
    assert [as_method["min"], as_method["max"]] == pytest.approx([0.5, 8.0], rel=TOL)
    # plain as the reference: seed 1's ratio is not known
    as_ref = g["plain"]["balanced-init"]["0.0"]
    assert (as_ref["unknown_seeds"], as_ref["held"]) == (1, None)
    # a stable bisection run above the top: the edge is that rate, not known either
    runs = _cell("plain", [0.25, TOP]) + [_run("plain", 2 * TOP, "stable", 1, bisection=1)]
    assert stable_edges(runs)[1] == 2 * TOP
    runs += _cell("balance", [0.5, 0.5])
    stats = _summary(runs)["expansion_ratio"]["plain"]["balance"]["0.0"]
    assert (stats["unknown_seeds"], stats["held"]) == (1, None)


# -- tuned strengths ------------------------------------------------------------------------------
def test_best_strength_breaks_an_exact_tie_towards_the_smaller_strength():
    """Two strengths with the same max_stable_lr values at the three s in another order: their
    sums are equal, but summed left to right in floating point 1.0's came out one ulp larger."""
    grid = [2.0 ** (k / 2) for k in (-14, -13, -12)]
    lo, hi = grid[0], grid[1]
    runs = []
    for strength, tops in ((0.1, (lo, hi, hi)), (1.0, (hi, hi, lo))):
        for s, top in zip((0.0, 1.0, 2.0), tops, strict=True):
            runs += _cell("exact", [top] * 3, rates=grid, s=s, strength=strength)
    assert best_strengths(runs)["exact"] == 0.1


def _tuned_regime(tuning_edge: float = 0.5) -> list[RunResult]:
    """Six seeds; exact at 0.1 and 1.0 (1.0 the better on seeds 0-2); plain; balance-after-
    step-1, compared with exact too; balance, not tuned."""
    runs = _cell("plain", [0.25] * 6)
    runs += _cell("exact", [0.25] * 6, strength=0.1)
    runs += _cell("exact", [tuning_edge] * 3 + [0.5, 1.0, 0.25], strength=1.0)
    runs += _cell("balance-after-step-1", [1.0] * 6)
    runs += _cell("balance", [0.5] * 3 + [1.0] * 3)
    return runs


def test_a_tuned_method_is_judged_on_the_seeds_its_strength_was_not_chosen_on():
    g = _summary(_tuned_regime())
    assert g["best_strength"]["exact"] == 1.0
    exact = g["expansion_ratio"]["plain"]["exact"]["0.0"]
    # seeds 3-5: edges sqrt(1/2 * 1), sqrt(1 * 2), sqrt(1/4 * 1/2) over plain's sqrt(1/32)
    assert exact["seeds"] == 3
    assert [exact[k] for k in ("min", "median", "max")] == pytest.approx([1.0, 2.0, 4.0], rel=TOL)
    assert exact["held"] is False  # the smallest of three is the lower end: 1
    # a comparison with the tuned method as the reference: its held-out seeds too
    after = g["expansion_ratio"]["exact"]["balance-after-step-1"]["0.0"]
    assert after["seeds"] == 3
    assert [after[k] for k in ("min", "max")] == pytest.approx([1.0, 4.0], rel=TOL)
    balance = g["expansion_ratio"]["plain"]["balance"]["0.0"]
    assert balance["seeds"] == 6 and balance["min"] == pytest.approx(2.0, rel=TOL)
    # the tuning seeds do not reach the verdicts: better tuning seeds, same verdicts
    other = _summary(_tuned_regime(tuning_edge=TOP))
    assert other["best_strength"] == g["best_strength"]
    for ref in ("plain", "exact"):
        tuned = {m: v for m, v in g["expansion_ratio"][ref].items() if m != "balance"}
        assert tuned == {m: other["expansion_ratio"][ref][m] for m in tuned}


def test_a_tuned_horizon_is_judged_on_the_held_out_seeds():
    def mini(steps: int, strength: float, edges: list[float]) -> list[RunResult]:
        return _cell("balanced-exact", edges, steps=steps, batch=64, strength=strength)

    runs = mini(10, 0.1, [0.25] * 5) + mini(10, 1.0, [1.0, 1.0, 1.0, 0.5, 0.5])
    runs += mini(100, 0.1, [0.125] * 5) + mini(100, 1.0, [TOP, TOP, TOP, 0.25, 0.5])
    h = horizons(runs)["sgd/64"]["methods"]["balanced-exact"]
    # seeds 3, 4: sqrt(1/8) / sqrt(1/2) = 1/2 and 1
    assert h["seeds"] == 2 and h["unknown_seeds"] == 0 and h["lower_bound"] is False
    assert [h["min"], h["max"]] == pytest.approx([0.5, 1.0], rel=TOL)
    assert h["narrowed"] is False  # the upper end is 1
    # a long horizon stable to its top on a held-out seed: a lower bound, could not narrow
    runs = runs[: -len(GRID)] + _seed("balanced-exact", TOP, 4, steps=100, batch=64, strength=1.0)
    h = horizons(runs)["sgd/64"]["methods"]["balanced-exact"]
    assert h["lower_bound"] is True and h["narrowed"] is False


# -- order, idempotence, counts -------------------------------------------------------------------
def _messy_regime() -> list[RunResult]:
    """Tuned methods, bisection runs, a seed missing on one side, a reference with no stable
    rate at s = 1, a method stable to the top."""
    runs = _tuned_regime()
    runs += _cell("plain", [0.0] + [0.5] * 5, s=1.0) + _cell("balance", [1.0] * 5, s=1.0)
    runs += _cell("balanced-init", [TOP] * 6)
    runs += [_run("plain", 2**-1.5, "stable", k, bisection=1) for k in range(6)]
    runs += [_run("balance", 2**-0.5, "diverged", 3, bisection=1)]
    return runs


def test_the_summary_does_not_depend_on_the_order_of_the_runs_and_is_idempotent():
    runs = _messy_regime()
    first = _summary(runs)
    shuffled = runs[:]
    random.Random(0).shuffle(shuffled)
    assert _summary(shuffled) == first
    assert _summary(runs) == first  # again, from the same list, unchanged by the first call
    chosen = at_best_strength(runs)
    assert at_best_strength(chosen) == chosen and on_grid(on_grid(runs)) == on_grid(runs)
    assert len(on_grid(runs)) == len(runs) - 7


def _counted_tasks() -> dict:
    keys = [d.key for d in SENSITIVITY]

    def cells(held: dict) -> dict:
        return {ref: {m: {s: {"held": v} for s, v in by_s.items()} for m, by_s in by_m.items()}
                for ref, by_m in held.items()}  # fmt: skip

    full = {
        "plain": {
            "balance": {"0.0": True, "1.0": None},
            "weight-decay": {"0.0": True, "1.0": False},
            "plain-replica": {"0.0": False},
        },
        "balanced-init": {"weight-decay": {"0.0": None}},
    }
    mini = {"plain": {"exact": {"0.0": False}, "weight-decay": {"0.0": True}}}
    by_def = {k: {"plain": {"weight-decay": {"0.0": i % 2 == 0}, "exact": {"0.0": None}}}
              for i, k in enumerate(keys)}  # fmt: skip
    return {
        "t": {
            "regimes": {
                "gd/full/10": {
                    "expansion_ratio": cells(full),
                    "drift_suppression": {"balance": {"held": True}, "exact": {"held": None}},
                    "verdicts_by_definition": by_def,
                },
                "sgd/64/10": {
                    "expansion_ratio": cells(mini),
                    "verdicts_by_definition": dict.fromkeys(keys, mini),
                },
            },
            "horizons": {"sgd/64": {"methods": {"a": {"narrowed": True}, "b": {"narrowed": None}}}},
        }
    }


def test_the_verdict_counts_by_hand():
    tasks = _counted_tasks()
    before = copy.deepcopy(tasks)
    # expansion: 4 made in the full-batch regime (2 held), 2 in the mini-batch one (1 held);
    # one drift verdict and one horizon, both held
    assert count_verdicts(tasks) == {
        "verdicts": 8,
        "held": 5,
        "shams": {
            "weight-decay": {"verdicts": 3, "held": 2, "false_positive_rate": 2 / 3},
            "plain-replica": {"verdicts": 1, "held": 0, "false_positive_rate": 0.0},
        },
    }
    # the full-batch regime alone: weight decay's one verdict, held under every other definition
    counts = count_sensitivity(tasks)
    for i, d in enumerate(SENSITIVITY):
        held = int(i % 2 == 0)
        sham = {"verdicts": 1, "held": held, "false_positive_rate": float(held)}
        assert counts[d.key] == {"verdicts": 1, "held": held, "shams": {"weight-decay": sham}}
    assert count_verdicts(tasks) == count_verdicts(before) and tasks == before
