"""The stable learning-rate range: per cell and seed, expansion ratios against the references
with the seed-level rule for a claim, the stability maps and the figure comparing continuous
gauge fixing with a balanced start. The definitions are :data:`DEFINITION`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypedDict

import numpy as np
from matplotlib.colors import BoundaryNorm, Normalize
from matplotlib.lines import Line2D

from gaugefix.experiments.cells import (
    HorizonKey,
    MethodKey,
    ReferenceKey,
    Regime,
    Run,
    Runs,
    SeedKey,
    SKey,
    group,
    median,
    number_text,
    s_key,
)
from gaugefix.experiments.engine import (
    DIVERGENCE_FACTOR,
    MECHANISM_METHODS,
    METHODS,
    REFERENCES,
    STABILITY_MARGIN,
    RunResult,
    run_status,
)
from gaugefix.experiments.figures import (
    fmt,
    legend_below,
    method_color,
    methods_in_order,
    plain_log_ticks,
    save,
    subplots,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CONFIDENCE",
    "TAIL",
    "TUNING_SEEDS",
    "BISECTION_BRACKET",
    "SHAM_METHODS",
    "COMPARED",
    "Definition",
    "DEFAULT",
    "SENSITIVITY",
    "DEFINITION",
    "DefinitionKey",
    "RatioStats",
    "StabilitySummary",
    "HorizonRatio",
    "Horizon",
    "ShamCount",
    "VerdictCount",
    "band_top",
    "status",
    "max_stable_lr",
    "max_stable_lr_by_seed",
    "edge_bracket",
    "stable_edges",
    "best_strengths",
    "at_best_strength",
    "on_grid",
    "previously_stable",
    "bootstrap_interval",
    "ratio_stats",
    "seed_ratios",
    "tuned_methods",
    "judged",
    "compared",
    "Table",
    "expansion",
    "grid_bounds",
    "grid_top",
    "pair_ratios",
    "widest_bracket",
    "summarize",
    "horizons",
    "headline",
    "tally",
    "count_verdicts",
    "count_sensitivity",
    "verdicts_text",
    "label",
    "grid_tops",
    "regime_tops",
    "bounded",
    "VERDICT",
    "ratio_text",
    "interval_text",
    "end_text",
    "FULL_DIGITS",
    "TIE_ULPS",
    "verdict_text",
    "render_sensitivity",
    "render",
    "grid_ratio",
    "render_horizons",
    "COLORS",
    "MAX_TICKS",
    "stability_map",
    "BALANCED_START_METHODS",
    "balanced_start_figure",
]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# The bootstrap interval's tail on each side; 1 - 2 * TAIL is exactly 0.95, and TAIL * 10000 is
# exactly 250 (``(1 - 0.95) / 2`` is 0.025000000000000022, whose inverted-CDF quantile of 10000
# means is the 251st smallest, one order statistic above the 2.5th percentile).
TAIL = 0.025
CONFIDENCE = 1.0 - 2 * TAIL
TUNING_SEEDS = 3  # a tuned knob is chosen on seeds 0..TUNING_SEEDS-1, judged on the others
# A seed's stable edge is bisected until the failing rate above it is within this factor of the
# stable one; the bracket's geometric midpoint, the edge, is then within its square root (1.03)
# of every rate in the bracket.
BISECTION_BRACKET = 1.06
# Controls whose held verdicts are false positives: weight decay at small strengths, and plain
# against an independent replica of itself.
SHAM_METHODS = ("weight-decay", "plain-replica")
# The methods some method is compared with besides the references (``Method.compared_with``):
# exact, against its first orbit step moved before the first update and a one-step rescue.
COMPARED = tuple(dict.fromkeys(d.compared_with for d in METHODS.values() if d.compared_with))


class Definition(NamedTuple):
    """When a run counts as diverged (its training loss above ``factor`` times its initial loss
    at some step) and as stable (not diverged, final loss at most ``margin`` times the smaller of
    its initial loss and the constant predictor's)."""

    factor: float
    margin: float

    @property
    def key(self) -> str:
        """``"1000x/0.9"``: the divergence factor and the stability margin."""
        return f"{self.factor:g}x/{self.margin:g}"


DEFAULT = Definition(DIVERGENCE_FACTOR, STABILITY_MARGIN)
# The definitions of the sensitivity table: every divergence factor (none above the engine's,
# where runs are frozen) with every stability margin; DEFAULT among them.
SENSITIVITY = tuple(
    Definition(factor, margin)
    for factor in (2.0, 10.0, DIVERGENCE_FACTOR)
    for margin in (0.5, STABILITY_MARGIN)
)

DEFINITION = (
    f"A run *diverges* when its training loss becomes non-finite or exceeds {DIVERGENCE_FACTOR:g} "
    "times its initial value (each run records its peak loss over its initial loss, so lower "
    "factors can be judged again). It is *stable* when it does not diverge and its final training "
    f"loss is at most {STABILITY_MARGIN:g} times the smaller of its initial loss and the loss of "
    "the best constant predictor (regression: half the targets' variance; classification: the "
    "entropy of the training class frequencies), so a network that collapsed to a constant "
    "predictor is not stable. Each seed trains on its own instance of the task (teacher and "
    "data, or split) from its own initialisation. `max_stable_lr` of a cell (task, regime, "
    "method, s) is the top of its lowest band of stable grid rates: the largest learning rate "
    "such that it and every grid rate from the smallest stable one up to it are stable (lower "
    "rates that did not learn enough within the run's steps are skipped); it is computed for each "
    "seed alone and for all seeds together (a rate counts when every seed ran it and is stable "
    "at it). Each seed's *stable edge* is then bisected in log-lr between the top of its band and "
    f"the failing rate above it, until they are within a factor {BISECTION_BRACKET:g} (fewer "
    "rounds in the quick reproduction: the report gives the widest bracket left); the edge is "
    f"the bracket's geometric midpoint, within a factor {math.sqrt(BISECTION_BRACKET):.2f} of "
    "both its ends (the band's top where nothing above it failed). A method's *expansion ratio* "
    "against a reference (plain, or balanced-init) is computed per seed, `edge(method, seed) / "
    "edge(reference, seed)` (a seed is one instance and initialisation, shared by every method), "
    "and given as its min, median and max over seeds. The verdict is paired: the mean over seeds "
    "of the log-ratio, with a percentile bootstrap 95% interval (the seeds resampled with "
    f"replacement {BOOTSTRAP_RESAMPLES} times, numpy seed {BOOTSTRAP_SEED}), shown as the "
    "interval of the geometric-mean ratio. A claim **held** in a cell when the interval's lower "
    "end is above 1 (log-ratio above 0); it **did not hold** when it is not and no seed's ratio "
    "is a lower bound; it *could not be measured* otherwise (for some seed the reference had no "
    "stable rate or was stable up to the top of the grid, or the method had none among the rates "
    "it ran without having run its grid's lowest, or the lower end is not above 1 with "
    "some ratio only a lower bound). Where the method was stable up to the grid's top the ratio "
    "is a lower bound (≥). Two sham controls calibrate the rule: plain-replica (plain from "
    "another initialisation draw of the same instance, compared with plain: every held verdict "
    "is a false positive) and weight decay at small strengths (not a gauge-fixing method; a real "
    "effect of it would count as a false positive). Methods with a strength grid are shown at "
    "their best strength per regime (the largest summed `max_stable_lr` of seeds 0 to "
    f"{TUNING_SEEDS - 1} together over s, the smallest on ties); their verdicts are judged on "
    "the other seeds only (none: could not be measured). The methods that name a method to be "
    f"compared with ({', '.join(COMPARED)}) are compared with it by the same paired rule, judged "
    "on the other seeds when either side was tuned."
)


DefinitionKey = Annotated[str, "DEFINITION"]  # Definition.key


class RatioStats(TypedDict):
    """A per-seed ratio over the seeds where it is known (:func:`ratio_stats`)."""

    min: float | None
    median: float | None
    max: float | None
    seeds: int
    unknown_seeds: Annotated[int, "seeds the ratio is not known for"]
    lower_bound: Annotated[bool, "some known value is only a lower bound"]
    interval: Annotated[
        list[float] | None, "bootstrap 95% interval of the geometric-mean ratio over seeds"
    ]
    held: Annotated[bool | None, "the claim's verdict: the interval's lower end above 1"]


class StabilitySummary(TypedDict):
    """The stability entries of a regime (:func:`summarize`)."""

    lr_grid: list[float]
    best_strength: Annotated[dict[MethodKey, float], "the strength each method is shown at"]
    max_stable_lr: Annotated[dict[MethodKey, dict[SKey, float]], "every seed together"]
    max_stable_lr_by_seed: Annotated[
        dict[MethodKey, dict[SKey, dict[SeedKey, float]]], "each seed alone, on the grid"
    ]
    max_stable_lr_at_grid_top: Annotated[dict[MethodKey, list[SKey]], "lower bounds"]
    stable_edge_by_seed: Annotated[
        dict[MethodKey, dict[SKey, dict[SeedKey, float]]],
        "each seed's edge, bisected between the grid's rates",
    ]
    edge_bracket: Annotated[
        float | None, "the widest ratio left between a bisected edge and the failing rate above"
    ]
    expansion_ratio: Annotated[
        dict[ReferenceKey, dict[MethodKey, dict[SKey, RatioStats]]],
        "per seed, the method's stable edge over the reference's",
    ]
    max_stable_lr_by_definition: Annotated[
        dict[DefinitionKey, dict[MethodKey, dict[SKey, float]]],
        "every seed together, under each definition of the sensitivity table",
    ]
    verdicts_by_definition: Annotated[
        dict[DefinitionKey, dict[ReferenceKey, dict[MethodKey, dict[SKey, bool | None]]]],
        "the expansion verdicts under each definition of the sensitivity table",
    ]


class HorizonRatio(RatioStats):
    """The stable edge at the long horizon over the short one, per seed (:func:`horizons`)."""

    narrowed: Annotated[bool | None, "the bootstrap interval's upper end below 1"]


class Horizon(TypedDict):
    """One mini-batch optimizer and batch size trained at several step counts."""

    short: Annotated[int, "steps"]
    long: Annotated[int, "steps"]
    methods: dict[MethodKey, HorizonRatio]


class ShamCount(TypedDict):
    """The expansion verdicts of one sham control (:func:`tally`)."""

    verdicts: int
    held: int
    false_positive_rate: Annotated[float | None, "held / verdicts"]


class VerdictCount(TypedDict):
    """How many verdicts are made, and how often each sham control held (:func:`tally`)."""

    verdicts: Annotated[int, "verdicts made (held or not)"]
    held: int
    shams: Annotated[dict[MethodKey, ShamCount], "the sham controls' expansion verdicts"]


def band_top(stable: dict[float, bool]) -> float:
    """The top of the lowest band of stable rates: the largest learning rate such that it and
    every rate from the smallest stable one up to it are stable (0 when none is)."""
    top = 0.0
    for lr in sorted(stable):
        if stable[lr]:
            top = lr
        elif top:
            break
    return top


def status(run: RunResult, definition: Definition = DEFAULT) -> str:
    """A run's status under ``definition``: as stored under :data:`DEFAULT`; otherwise diverged
    where it diverged or its ``peak_loss_ratio`` is not at most the definition's factor (a NaN
    ratio, as the engine counts one, is infinite), else :func:`run_status` at its margin."""
    if definition == DEFAULT:
        return run.status
    if run.status == "diverged" or not run.peak_loss_ratio <= definition.factor:
        return "diverged"
    return run_status(run.initial_loss, run.final_loss, run.constant_loss, definition.margin)


def max_stable_lr(runs: Runs, definition: Definition = DEFAULT) -> float:
    """:func:`band_top` of the grid rates at which every seed of ``runs`` (one cell) ran and is
    stable under ``definition`` (the runs of a bisection, at one seed's rates, left out; a rate
    some seed did not run is not known to be stable)."""
    grid = [r for r in runs if not r.config.bisection]
    seeds = {r.config.seed for r in grid}
    ran: dict[float, set[int]] = defaultdict(set)
    for r in grid:
        ran[r.config.lr].add(r.config.seed)
    stable = _stable_by_rate(grid, definition)
    return band_top({lr: ok and ran[lr] == seeds for lr, ok in stable.items()})


def _stable_by_rate(runs: Runs, definition: Definition = DEFAULT) -> dict[float, bool]:
    """Per learning rate of ``runs``: whether every run at it is stable under ``definition``."""
    stable: dict[float, bool] = {}
    for r in runs:
        stable[r.config.lr] = stable.get(r.config.lr, True) and status(r, definition) == "stable"
    return stable


def max_stable_lr_by_seed(runs: Runs) -> dict[int, float]:
    """:func:`max_stable_lr` of each seed alone (``runs``: one cell)."""
    return {seed: max_stable_lr(rs) for (seed,), rs in group(runs, lambda c: (c.seed,)).items()}


def edge_bracket(runs: Runs, definition: Definition = DEFAULT) -> tuple[float, float | None]:
    """One seed's stable edge in one cell (``runs``: its grid and bisection runs) and the rate
    above it: :func:`band_top` of its rates (a rate run twice is stable where every run there
    is), and the lowest rate above that (not stable; ``None`` where nothing is stable or the
    edge is the highest rate run)."""
    stable = _stable_by_rate(runs, definition)
    edge = band_top(stable)
    above = [lr for lr in stable if lr > edge]
    return edge, min(above) if edge and above else None


def stable_edges(runs: Runs, definition: Definition = DEFAULT) -> dict[int, float]:
    """Each seed's stable edge in one cell: the geometric midpoint ``sqrt(lo hi)`` of its
    :func:`edge_bracket`, or ``lo`` where nothing above it failed (a lower bound) or nothing is
    stable (0)."""
    by_seed = group(runs, lambda c: (c.seed,))
    return {seed: _midpoint(*edge_bracket(rs, definition)) for (seed,), rs in by_seed.items()}


def _midpoint(lo: float, hi: float | None) -> float:
    return lo if hi is None else math.sqrt(lo * hi)


def grid_top(cell: Runs) -> float:
    """The top of one cell's grid, at or above which an edge counts as a lower bound: the least
    over its seeds of each one's highest grid rate (the grid's top in a complete store), so the
    edge of a seed that ran nothing above its band (its highest rate) is one."""
    by_seed = group(on_grid(cell), lambda c: (c.seed,))
    return min(max(r.config.lr for r in rs) for rs in by_seed.values())


def _unreached(cell: Runs) -> frozenset[int]:
    """The seeds of one cell whose lowest grid rate is above the cell's (the least over its
    seeds; none in a complete store): where such a seed has no stable rate, its edge is not
    known to be 0, only to be below the lowest rate it ran."""
    by_seed = group(on_grid(cell), lambda c: (c.seed,))
    lows = {seed: min(r.config.lr for r in rs) for (seed,), rs in by_seed.items()}
    return frozenset(k for k, low in lows.items() if low > min(lows.values()))


def best_strengths(runs: Runs) -> dict[str, float]:
    """Per method, the strength with the largest sum over ``s`` of :func:`max_stable_lr` of the
    tuning seeds (below :data:`TUNING_SEEDS`; summed exactly, the smallest such strength on
    ties), or its one strength; ``ValueError`` where a method of several has no tuning seed.
    ``runs``: one regime's."""
    rates: dict[tuple[str, float], list[float]] = defaultdict(list)
    tuning = [r for r in runs if r.config.seed < TUNING_SEEDS]
    for (method, strength, _), cell in group(tuning, lambda c: (c.method, c.strength, c.s)).items():
        rates[(method, strength)].append(max_stable_lr(cell))
    score = {key: math.fsum(values) for key, values in rates.items()}  # exact ties stay ties
    best: dict[str, float] = {}
    for (method, strength), value in sorted(score.items()):
        if method not in best or value > score[(method, best[method])]:
            best[method] = strength
    for (method,), cell in group(runs, lambda c: (c.method,)).items():
        if method in best:
            continue
        (strength, *others) = {r.config.strength for r in cell}
        if others:
            raise ValueError(
                f"method {method!r} has several strengths but no runs on the tuning seeds "
                f"0..{TUNING_SEEDS - 1}: its strength cannot be chosen"
            )
        best[method] = strength
    return best


def at_best_strength(runs: Sequence[Run]) -> list[Run]:
    """The runs of each method at its :func:`best_strengths` (``runs``: one regime's)."""
    best = best_strengths(runs)
    return [r for r in runs if r.config.strength == best[r.config.method]]


def on_grid(runs: Sequence[Run]) -> list[Run]:
    """The runs of the learning-rate grid (not of a bisection)."""
    return [r for r in runs if not r.config.bisection]


def previously_stable(runs: Runs) -> int:
    """How many of ``runs`` the previous definition called stable (not diverged, final training
    loss below the initial loss) that the current one does not."""
    return sum(r.status == "unstable" and r.final_loss < r.initial_loss for r in runs)


def bootstrap_interval(ratios: Sequence[float]) -> tuple[float, float]:
    """The percentile bootstrap :data:`CONFIDENCE` interval of the geometric mean of paired
    per-seed ratios ``[n]`` (``exp`` of the mean log-ratio), the seeds resampled with
    replacement :data:`BOOTSTRAP_RESAMPLES` times from a fixed numpy seed; its ends are
    resampled means (empirical quantiles, not interpolated), so a ratio of 0 (the method had no
    stable rate) gives an end of 0, never an undefined one. An end whose mean log-ratio is
    within the rounding of its sum (:func:`_tie`) of 0 is exactly 1: log-ratios that cancel
    (``2^(3/16)`` and three ``2^(-1/16)``) are a tie, not a ratio one ulp above or below 1."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.asarray(ratios, dtype=np.float64))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = logs[rng.integers(0, len(logs), (BOOTSTRAP_RESAMPLES, len(logs)))].mean(axis=1)
    ends = np.quantile(means, [TAIL, 1.0 - TAIL], method="inverted_cdf")
    ends[np.abs(ends) <= _tie(logs)] = 0.0
    return float(np.exp(ends[0])), float(np.exp(ends[1]))


# A bound, in units of float64's epsilon, on the rounding of one log-ratio of two bisected edges
# (each a rounded square root of a product of rounded rates) and of its share of a mean of them.
TIE_ULPS = 16


def _tie(logs: np.ndarray) -> float:
    """How far from 0 float64 rounding can move a mean of ``n`` of the log-ratios ``logs`` whose
    exact value is 0: :data:`TIE_ULPS` epsilons per term, of its size and of the sum's
    (``n`` times the largest finite ``|log|``)."""
    finite = np.abs(logs[np.isfinite(logs)])
    n, largest = len(logs), float(finite.max(initial=0.0))
    return TIE_ULPS * float(np.finfo(np.float64).eps) * n * (1.0 + n * largest)


def ratio_stats(
    ratios: dict[int, float | None], bounds: dict[int, bool] | None = None
) -> RatioStats:
    """A per-seed ratio (``None``: not known for that seed; ``bounds``: which known values are
    only lower bounds) as min, median and max over the seeds where it is known, how many seeds
    it is not known for, whether any value is a lower bound, the :func:`bootstrap_interval`
    over the known seeds and the verdict ``held``: ``True`` when every seed is known and the
    interval's lower end is above 1, ``False`` when every seed is known, none is a lower bound
    and the lower end is at most 1, ``None`` otherwise."""
    bounds = bounds or {}
    known = {k: v for k, v in ratios.items() if v is not None}
    values = list(known.values())
    interval = bootstrap_interval(values) if values else None
    held: bool | None = None
    if interval and len(known) == len(ratios):
        if interval[0] > 1.0:
            held = True
        elif not any(bounds.get(k, False) for k in known):
            held = False
    return RatioStats(
        min=min(values) if values else None,
        median=median(values),
        max=max(values) if values else None,
        seeds=len(ratios),
        unknown_seeds=len(ratios) - len(known),
        lower_bound=any(bounds.get(k, False) for k in known),
        interval=list(interval) if interval else None,
        held=held,
    )


def seed_ratios(
    method: dict[int, float],
    reference: dict[int, float],
    method_top: float,
    ref_top: float,
    unreached: frozenset[int] = frozenset(),
) -> RatioStats:
    """:func:`ratio_stats` of the expansion ratio of one cell against a reference (``method``,
    ``reference``: the stable edge per seed; ``*_top``: the top of each one's grid,
    :func:`grid_top` of its cell; ``unreached``: the method's seeds that did not run the bottom
    of its grid, :func:`_unreached`), over the seeds either side ran. A seed's ratio is not known
    where one side did not run it, the reference had no stable rate or was stable up to its
    grid's top, or the method had no stable rate on an unreached seed; a lower bound where the
    method was stable up to its grid's top."""
    ratios: dict[int, float | None] = {}
    bounds: dict[int, bool] = {}
    for seed in sorted(method.keys() | reference.keys()):
        base = reference.get(seed, 0.0)
        known = seed in method and 0.0 < base < ref_top
        known = known and (method[seed] > 0.0 or seed not in unreached)
        ratios[seed] = method[seed] / base if known else None
        bounds[seed] = known and method[seed] >= method_top
    return ratio_stats(ratios, bounds)


def tuned_methods(runs: Runs) -> set[str]:
    """The methods of one regime's ``runs`` run at several strengths."""
    strengths = {(r.config.method, r.config.strength) for r in runs}
    return {m for m, _ in strengths if sum(m == n for n, _ in strengths) > 1}


def judged(method: str, tuned: set[str], seeds: dict[int, float]) -> dict[int, float]:
    """The seeds a method's verdicts are judged on: all, or for a ``tuned`` method those at or
    above :data:`TUNING_SEEDS` (its strength was chosen on the others)."""
    return {k: v for k, v in seeds.items() if method not in tuned or k >= TUNING_SEEDS}


def compared(method: str, ref: str) -> bool:
    """Whether ``method`` is compared with ``ref``: with a reference (:data:`REFERENCES`) every
    other method is, a replica only with the method it replicates; with a method of
    :data:`COMPARED`, the methods that name it (``compared_with``)."""
    if ref not in REFERENCES:
        return METHODS[method].compared_with == ref
    replica_of = METHODS[method].replica_of
    return method != ref and replica_of in (None, ref)


# Per method and s (a key of s_key), a value: one regime's table.
Table = dict[str, dict[str, Any]]


def expansion(
    edges: Table,
    tops: dict[tuple[str, str], float],
    tuned: set[str],
    unreached: dict[tuple[str, str], frozenset[int]],
) -> dict:
    """Per reference (and method of :data:`COMPARED`), method and s, the :func:`seed_ratios`
    of the stable ``edges`` (per method and s, per seed; ``tops`` and ``unreached`` per method
    and s); a comparison with a ``tuned`` method on either side is judged on the seeds its
    strength was not chosen on."""
    return {
        ref: {
            method: pair_ratios(edges, tops, tuned, unreached, method, ref)
            for method in edges
            if compared(method, ref)
        }
        for ref in (*REFERENCES, *COMPARED)
        if ref in edges
    }


def pair_ratios(
    edges: Table,
    tops: dict[tuple[str, str], float],
    tuned: set[str],
    unreached: dict[tuple[str, str], frozenset[int]],
    method: str,
    ref: str,
) -> dict[SKey, RatioStats]:
    """Per s both ran, the :func:`seed_ratios` of ``method`` against ``ref`` (arguments as
    :func:`expansion`'s), judged on the seeds no strength was chosen on where either is
    ``tuned``."""
    side = method if method in tuned else ref
    return {
        s: seed_ratios(
            judged(side, tuned, seeds),
            judged(side, tuned, edges[ref][s]),
            tops[(method, s)],
            tops[(ref, s)],
            unreached[(method, s)],
        )
        for s, seeds in edges[method].items()
        if s in edges[ref]
    }


def grid_bounds(
    cells: dict[tuple[str, float], Runs],
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], frozenset[int]]]:
    """Per method and s (``cells``: runs by method and s), the :func:`grid_top` and the
    :func:`_unreached` seeds of the cell, the bounds every ratio of its edges is judged by."""
    tops = {(m, s_key(s)): grid_top(cell) for (m, s), cell in cells.items()}
    return tops, {(m, s_key(s)): _unreached(cell) for (m, s), cell in cells.items()}


def _table(cells: dict[tuple[str, float], Runs], value: Any) -> Table:
    """``value(cell)`` per method and s (``cells``: runs by method and s)."""
    out: Table = defaultdict(dict)
    for (method, s), cell in cells.items():
        out[method][s_key(s)] = value(cell)
    return dict(out)


def _seed_keys(table: Table) -> Table:
    """A table of per-seed values with the seeds as JSON keys."""
    return {
        m: {s: {str(k): v for k, v in seeds.items()} for s, seeds in by_s.items()}
        for m, by_s in table.items()
    }


def widest_bracket(cells: dict[tuple[str, float], Runs]) -> float | None:
    """The largest ratio of a seed's :func:`edge_bracket` over every cell and seed that has one."""
    ratios = [
        above / edge
        for cell in cells.values()
        for _, rs in group(cell, lambda c: (c.seed,)).items()
        for edge, above in [edge_bracket(rs)]
        if above is not None
    ]
    return max(ratios) if ratios else None


def summarize(runs: Runs, chosen: Runs) -> StabilitySummary:
    """The stability entries of one regime's summary: ``runs`` are all of its runs (grid and
    bisection), ``chosen`` those at each method's best strength. Ratios compare each seed's
    bisected stable edge; a tuned method's are :func:`judged` on the seeds its strength was not
    chosen on; under each definition of :data:`SENSITIVITY` too."""
    cells = group(chosen, lambda c: (c.method, c.s))
    msl = _table(cells, max_stable_lr)
    tops, unreached = grid_bounds(cells)
    tuned = tuned_methods(runs)
    edges = {d: _table(cells, lambda cell, d=d: stable_edges(cell, d)) for d in SENSITIVITY}
    verdicts = {d: expansion(edges[d], tops, tuned, unreached) for d in SENSITIVITY}
    return StabilitySummary(
        lr_grid=sorted({r.config.lr for r in on_grid(chosen)}),
        best_strength=best_strengths(runs),
        max_stable_lr=msl,
        max_stable_lr_by_seed=_seed_keys(_table(cells, max_stable_lr_by_seed)),
        max_stable_lr_at_grid_top={
            m: [s for s, v in by_s.items() if v >= tops[(m, s)]]
            for m, by_s in msl.items()
            if any(v >= tops[(m, s)] for s, v in by_s.items())
        },
        stable_edge_by_seed=_seed_keys(edges[DEFAULT]),
        edge_bracket=widest_bracket(cells),
        expansion_ratio=verdicts[DEFAULT],
        max_stable_lr_by_definition={
            d.key: _table(cells, lambda cell, d=d: max_stable_lr(cell, d)) for d in SENSITIVITY
        },
        verdicts_by_definition={
            d.key: {
                ref: {m: {s: st["held"] for s, st in by_s.items()} for m, by_s in table.items()}
                for ref, table in verdicts[d].items()
            }
            for d in SENSITIVITY
        },
    )


def horizons(runs: Runs) -> dict[HorizonKey, Horizon]:
    """Per mini-batch optimizer and batch size with runs at several step counts (s = 0): each
    method's per-seed stable edge at the longest horizon over that at the shortest (each
    regime at its best strength, chosen over every s), :func:`seed_ratios` with the short
    horizon as the reference: a seed's ratio is not known where the short horizon had no stable
    rate or was stable up to its grid's top (or the long one had no stable rate on a seed that
    did not run its grid's lowest rate), and a lower bound where the long one was. A method
    tuned at either horizon is :func:`judged` on the seeds its strengths were not chosen on. The
    range *narrowed* when the upper end of the ratio's bootstrap interval is below 1 (every seed
    known, none a lower bound), and did not when it is at least 1 (every seed known)."""
    out: dict[HorizonKey, Horizon] = {}
    mini = [r for r in runs if r.config.batch_size]
    for (opt, batch), rs in group(mini, lambda c: (c.optimizer, c.batch_size)).items():
        steps = sorted({r.config.steps for r in rs if r.config.s == 0.0})
        if len(steps) < 2:
            continue
        ends = [[r for r in rs if r.config.steps == n] for n in (steps[0], steps[-1])]
        tuned = tuned_methods(ends[0]) | tuned_methods(ends[1])
        short, long = (_horizon_edges(at_best_strength(e)) for e in ends)
        entry: dict[MethodKey, HorizonRatio] = {}
        for method in sorted(short.keys() & long.keys()):
            (base, short_top, _), (edge, long_top, unreached) = short[method], long[method]
            stats = seed_ratios(
                judged(method, tuned, edge),
                judged(method, tuned, base),
                long_top,
                short_top,
                unreached,
            )
            entry[method] = HorizonRatio(**stats, narrowed=_narrowed(stats))
        out[f"{opt}/{batch}"] = Horizon(short=steps[0], long=steps[-1], methods=entry)
    return out


def _horizon_edges(chosen: Runs) -> dict[str, tuple[dict[int, float], float, frozenset[int]]]:
    """Per method of one horizon's runs at its best strength, at s = 0: each seed's stable edge,
    the top of the method's grid and its :func:`_unreached` seeds."""
    at_zero = [r for r in chosen if r.config.s == 0.0]
    return {
        m: (stable_edges(cell), grid_top(cell), _unreached(cell))
        for (m,), cell in group(at_zero, lambda c: (c.method,)).items()
    }


def _narrowed(stats: RatioStats) -> bool | None:
    """Whether a horizon's range narrowed: ``True`` when the bootstrap interval's upper end is
    below 1 and no ratio is a lower bound, ``False`` when it is at least 1, ``None`` where some
    seed is unknown (or a lower bound keeps the upper end from being known)."""
    if not stats["interval"] or stats["unknown_seeds"]:
        return None
    if stats["interval"][1] >= 1.0:
        return False
    return None if stats["lower_bound"] else True


def headline(regime: Regime) -> bool:
    """Whether a regime is one of the headline's: the stability experiment's (full batch)."""
    return regime.batch_size == 0


def tally(expansion: list[tuple[str, bool | None]], others: list[bool | None]) -> VerdictCount:
    """The verdicts made (not ``None``) of the ``(method, verdict)`` pairs of ``expansion`` and
    of ``others``, how many held, and each sham control's (:data:`SHAM_METHODS`) expansion
    verdicts, whose held share estimates the rule's false-positive rate."""
    known = [v for _, v in expansion if v is not None] + [v for v in others if v is not None]
    shams = {}
    for sham in SHAM_METHODS:
        mine = [v for m, v in expansion if m == sham and v is not None]
        if mine:
            shams[sham] = ShamCount(
                verdicts=len(mine), held=sum(mine), false_positive_rate=sum(mine) / len(mine)
            )
    return VerdictCount(verdicts=len(known), held=sum(known), shams=shams)


def _pairs(ratios: dict[str, dict[str, dict[str, Any]]], held: Any) -> list[tuple[str, Any]]:
    """``(method, held(cell))`` for every reference, method and s of a regime's ratios."""
    return [
        (m, held(v))
        for cells in ratios.values()
        for m, by_s in cells.items()
        for v in by_s.values()
    ]


def count_verdicts(tasks: dict[str, Any]) -> VerdictCount:
    """:func:`tally` over the ``tasks`` entries of a summary: every expansion-ratio and
    drift-suppression verdict and every horizon's ``narrowed``."""
    expansion: list[tuple[str, bool | None]] = []
    others: list[bool | None] = []
    for t in tasks.values():
        for g in t["regimes"].values():
            expansion += _pairs(g["expansion_ratio"], lambda st: st["held"])
            others += [st["held"] for st in g.get("drift_suppression", {}).values()]
        for h in t["horizons"].values():
            others += [st["narrowed"] for st in h["methods"].values()]
    return tally(expansion, others)


def count_sensitivity(tasks: dict[str, Any]) -> dict[DefinitionKey, VerdictCount]:
    """Per definition of :data:`SENSITIVITY`, :func:`tally` of the expansion verdicts of the
    :func:`headline` regimes."""
    regimes = [
        g for t in tasks.values() for key, g in t["regimes"].items() if headline(Regime.parse(key))
    ]
    return {
        d.key: tally(
            [p for g in regimes for p in _pairs(g["verdicts_by_definition"][d.key], lambda v: v)],
            [],
        )
        for d in SENSITIVITY
    }


def verdicts_text(count: dict[str, Any]) -> str:
    """The sentence that reports how many verdicts were made and the sham controls' rates."""
    made = f"The report makes {count['verdicts']} verdicts, {count['held']} of them held."
    if not count["shams"]:
        return f"{made} No sham control ({', '.join(SHAM_METHODS)}) made an expansion verdict."
    rates = [
        f"{m} held in {c['held']} of its {c['verdicts']} expansion verdicts "
        f"({c['false_positive_rate']:.0%})"
        for m, c in count["shams"].items()
    ]
    return (
        f"{made} The sham controls, whose held share estimates the rule's false-positive rate: "
        f"{'; '.join(rates)}."
    )


# -- rendering ------------------------------------------------------------------------------------
def label(method: str, regime: dict[str, Any]) -> str:
    """A method with its best strength in the regime: ``exact (0.1)``."""
    strength = regime.get("best_strength", {}).get(method)
    return f"{method} ({number_text(strength)})" if strength else method


VERDICT = {True: "held", False: "did not hold", None: "could not be measured"}


def ratio_text(stats: dict[str, Any]) -> str:
    """``2 [1.41, 2.83]``: the median and the seed range of an expansion ratio (``≥`` for a
    lower bound)."""
    if stats["median"] is None:
        return "n/a"
    bound = "≥ " if stats["lower_bound"] else ""
    if stats["min"] == stats["max"]:
        return f"{bound}{fmt(stats['median'])}"
    return f"{bound}{fmt(stats['median'])} [{fmt(stats['min'])}, {fmt(stats['max'])}]"


def interval_text(stats: dict[str, Any]) -> str:
    """``[1.41, 2.52]``: the bootstrap interval of an expansion ratio (``n/a`` without one), each
    end on its side of 1 as written (:func:`end_text`)."""
    interval = stats["interval"]
    return f"[{end_text(interval[0])}, {end_text(interval[1])}]" if interval else "n/a"


def end_text(end: float | None) -> str:
    """An interval's end as :func:`fmt` writes it, with more digits where that would write 1 for
    an end that is not 1 (``1.004``, not ``1``, for the lower end of a claim that held, whose
    rule is an end above 1)."""
    text, digits = fmt(end), 3
    while text == "1" and end != 1.0 and digits < FULL_DIGITS:
        digits += 1
        text = fmt(end, digits)
    return text


FULL_DIGITS = 17  # significant digits that write every float64 as itself


def verdict_text(stats: dict[str, Any]) -> str:
    """``95% interval [1.41, 2.52], **held**``: the bootstrap interval and the verdict."""
    shown = f"95% interval {interval_text(stats)}, " if stats["interval"] else ""
    return f"{shown}**{VERDICT[stats['held']]}**"


def render_sensitivity(summary: dict[str, Any], mark: dict[bool | None, str]) -> str:
    """The sensitivity table: per :func:`headline` regime, method and reference, the expansion
    verdicts (one ``mark`` per s) under each definition of :data:`SENSITIVITY`, then each
    definition's count of verdicts held and the sham controls'."""
    keys = [d.key for d in SENSITIVITY]
    rows = []
    for task, t in summary["tasks"].items():
        for key, g in t["regimes"].items():
            by_def = g["verdicts_by_definition"]
            if not headline(Regime.parse(key)):
                continue
            for ref, cells in by_def[DEFAULT.key].items():
                for method in methods_in_order(cells):
                    marks = [
                        "".join(
                            mark[v]
                            for _, v in sorted(
                                by_def[k][ref][method].items(), key=lambda kv: float(kv[0])
                            )
                        )
                        for k in keys
                    ]
                    name = f"{task} | {Regime.parse(key).label} | {label(method, g)} vs {ref}"
                    rows.append(f"| {name} | " + " | ".join(marks) + " |")
    if not rows:
        return ""
    counts = summary["sensitivity"]
    rows.append(
        "| all | | held / made | "
        + " | ".join(f"{counts[k]['held']} / {counts[k]['verdicts']}" for k in keys)
        + " |"
    )
    for sham in SHAM_METHODS:
        shams = [counts[k]["shams"].get(sham) for k in keys]
        cells = [f"{c['held']} / {c['verdicts']}" if c else "-" for c in shams]
        rows.append(f"| all | | sham {sham} held / made | " + " | ".join(cells) + " |")
    return (
        "**Sensitivity to the definitions** (the expansion verdicts of the full-batch regimes, one "
        "mark per s in increasing order, with a run diverged above 2, 10 or 1000 times its "
        "initial loss and stable at margin 0.5 or 0.9; 1000x/0.9 is the definition used "
        "everywhere else):\n\n"
        "| task | regime | comparison | " + " | ".join(keys) + " |\n"
        "|---|---|---|" + "---|" * len(keys) + "\n" + "\n".join(rows)
    )


def grid_tops(runs: Runs) -> Table:
    """Per method and s, :func:`grid_top` of the cell (``runs``: one regime's at each method's
    best strength, the summary's cells): a seed's rate or edge at or above it is a lower bound."""
    return _table(group(runs, lambda c: (c.method, c.s)), grid_top)


def regime_tops(entry: dict[str, Any]) -> Table:
    """Per method and s of one regime's summary ``entry``, the regime's highest grid rate: what
    a summary alone knows, equal to :func:`grid_tops` in a complete store (where every cell ran
    the regime's whole grid), above some cell's in an interrupted one."""
    top = max(entry["lr_grid"])
    return {m: dict.fromkeys(by_s, top) for m, by_s in entry["stable_edge_by_seed"].items()}


def bounded(value: float, top: float) -> str:
    """A stable rate or edge, ``≥`` before it where it is at or above its grid's ``top`` (a
    lower bound)."""
    return f"≥ {fmt(value)}" if value >= top else fmt(value)


def _rates_table(entry: dict[str, Any], overall: Table | None, seeds: Table, tops: Table) -> str:
    """Per method and s: ``overall`` (all seeds together; none: left out), then each seed's
    value in brackets (``≥``: stable up to its cell's grid top, ``tops``, a lower bound)."""
    top = entry["max_stable_lr_at_grid_top"]
    s_values = sorted({s for cells in seeds.values() for s in cells}, key=float)
    rows = [
        "| method | " + " | ".join(f"s = {s}" for s in s_values) + " |",
        "|---|" + "---|" * len(s_values),
    ]
    for method in methods_in_order(seeds):
        cells = []
        for s in s_values:
            if s not in seeds[method]:
                cells.append("")
                continue
            per_seed = ", ".join(bounded(v, tops[method][s]) for v in seeds[method][s].values())
            bound = "≥ " if s in top.get(method, []) else ""
            shown = f"{bound}{fmt(overall[method][s])} " if overall else ""
            cells.append(f"{shown}({per_seed})")
        rows.append(f"| {label(method, entry)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def render(out: Path, task: str, regime: Regime, entry: dict[str, Any], runs: Runs) -> str:
    """The stability paragraphs of one regime, with its stability map (``runs``: the grid's
    runs at each method's best strength, whose :func:`grid_tops` mark the lower bounds)."""
    bracket = entry["edge_bracket"]
    tops = grid_tops(runs)
    within = f"to within a factor {fmt(bracket)}" if bracket else "(none had a bracket)"
    parts = [
        "**Stable learning rates** (`max_stable_lr` for every seed together, then for each seed "
        "alone in brackets; ≥: stable up to the grid's top, a lower bound):\n\n"
        + _rates_table(entry, entry["max_stable_lr"], entry["max_stable_lr_by_seed"], tops),
        f"**Bisected stable edges** (each seed's, bisected in log-lr {within}; the ratios "
        "below compare these):\n\n" + _rates_table(entry, None, entry["stable_edge_by_seed"], tops),
    ]
    for ref, by_method in entry["expansion_ratio"].items():
        lines = []
        for method in methods_in_order(by_method):
            cells = by_method[method]
            lines.append(
                f"- {label(method, entry)}: "
                + "; ".join(
                    f"s = {s}: {ratio_text(st)}, {verdict_text(st)}"
                    for s, st in sorted(cells.items(), key=lambda kv: float(kv[0]))
                )
            )
        if not lines:  # no method besides the reference in this regime
            continue
        names = {"plain": "plain", "balanced-init": "a balanced start (balanced-init)"}
        what = names.get(ref, f"`{label(ref, entry)}`")
        parts.append(
            f"**Expansion against {what}** (per-seed ratio of the bisected stable edges: median "
            "[min, max] over seeds; a wider range held only if the paired bootstrap interval "
            "of the geometric-mean ratio lies above 1):\n\n" + "\n".join(lines)
        )
    name = stability_map(out, task, regime, runs)
    parts.append(f"![stability map, {regime.label}]({name})")
    return "\n\n".join(parts)


def _edges(values: list[float]) -> np.ndarray:
    """Cell edges of a log grid: geometric midpoints, extended by half a step at the ends."""
    v = np.log(np.asarray(values))
    step = np.diff(v).min() if len(v) > 1 else np.log(2.0)
    mids = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[v[0] - step / 2], mids, [v[-1] + step / 2]]))


def grid_ratio(lrs: list[float]) -> float | None:
    """The smallest ratio of neighbouring grid rates (the grid's resolution)."""
    lrs = sorted(set(lrs))
    return min(b / a for a, b in zip(lrs[:-1], lrs[1:], strict=True)) if len(lrs) > 1 else None


def render_horizons(entry: dict[str, Any]) -> str:
    """The paragraph on the stable range over a longer horizon (``entry``: :func:`horizons`)."""
    parts = []
    for key, h in entry.items():
        opt, batch = key.split("/")
        word = {True: "narrowed", False: "did not narrow", None: "could not be measured"}
        lines = [
            f"- {m}: {ratio_text(st)}, **{word[st['narrowed']]}**"
            for m, st in ((m, h["methods"][m]) for m in methods_in_order(h["methods"]))
        ]
        parts.append(
            f"**Over a longer horizon** ({opt}, batch {batch}, s = 0): per seed, the bisected "
            f"stable edge at {h['long']} steps over that at {h['short']} steps (each horizon at "
            "the method's best strength; a method tuned at either is judged on the seeds its "
            "strength was not chosen on), median [min, max] (≥: a lower bound); the range "
            "narrowed only if the paired bootstrap interval of the geometric-mean ratio lies "
            "below 1:\n\n" + "\n".join(lines)
        )
    return "\n\n".join(parts)


COLORS = 256  # colors of the stability map's colormap
MAX_TICKS = 10  # most seed counts labelled on its color bar


def _color_scale(seeds: int) -> tuple[Normalize, np.ndarray]:
    """The color scale of a fraction of ``seeds`` seeds (one color per count while the colormap
    has enough colors, continuous beyond) and the counts its color bar labels."""
    counts = np.unique(np.linspace(0, seeds, min(seeds, MAX_TICKS) + 1).round().astype(int))
    if seeds + 1 > COLORS:
        return Normalize(0.0, 1.0), counts
    edges = np.linspace(-0.5 / seeds, 1 + 0.5 / seeds, seeds + 2)
    return BoundaryNorm(edges, COLORS), counts


def _map_panel(ax: Any, runs: Runs, s_values: list[float], lrs: list[float], norm: Any) -> Any:
    """One method's panel of the stability map: the fraction of seeds stable per s and grid
    rate, crosses where some seed diverged; returns the color mesh."""
    frac = np.full((len(lrs), len(s_values)), np.nan)
    crosses = []
    for (s, lr), cell in group(runs, lambda c: (c.s, c.lr)).items():
        i, j = lrs.index(lr), s_values.index(s)
        frac[i, j] = np.mean([r.status == "stable" for r in cell])
        if any(r.status == "diverged" for r in cell):
            crosses.append((j, lr))
    y_edges = _edges(lrs)
    x_edges = np.arange(len(s_values) + 1) - 0.5
    mesh = ax.pcolormesh(
        x_edges, y_edges, frac, cmap="viridis", norm=norm, edgecolors="white", linewidth=0.3
    )
    if crosses:
        ax.scatter(*zip(*crosses, strict=True), marker="x", color="crimson", s=12, lw=0.8)
    ax.set_yscale("log")
    ax.set_ylim(y_edges[0], y_edges[-1])
    ax.set_xticks(range(len(s_values)), [f"{s:g}" for s in s_values])
    return mesh


def stability_map(out: Path, task: str, regime: Regime, runs: Runs) -> str:
    """Per method (at its best strength), the fraction of seeds stable at each initial imbalance
    and grid learning rate (one cell per grid point, so the grid's resolution shows), crosses
    where some seed diverged, blank where a method did not run (a window's floor at some s); at
    most four panels a row. The runs of a bisection, at one seed's rates, are left out."""
    runs = on_grid(runs)
    methods = methods_in_order({r.config.method for r in runs})
    s_values = sorted({r.config.s for r in runs})
    lrs = sorted({r.config.lr for r in runs})
    seeds = len({r.config.seed for r in runs})
    cols = min(len(methods), 4)
    rows = -(-len(methods) // cols)
    width = max(1.0 + 0.6 * len(s_values), 2.2)
    fig, axes = subplots(
        rows,
        cols,
        figsize=(width * cols + 1.2, 3.2 * rows + 0.5),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    norm, counts = _color_scale(seeds)
    ratio = grid_ratio(lrs)
    mesh = None
    for k, ax in enumerate(axes.flat):
        if k >= len(methods):
            ax.set_visible(False)
            continue
        method = methods[k]
        mine = [r for r in runs if r.config.method == method]
        mesh = _map_panel(ax, mine, s_values, lrs, norm)
        strength = mine[0].config.strength
        ax.set_title(f"{method} ({strength:g})" if strength else method, fontsize=9)
        if k + cols >= len(methods):  # no panel below
            ax.set_xlabel("initial imbalance s")
        if k % cols == 0:
            ax.set_ylabel(f"lr (grid ratio {fmt(ratio)})" if ratio else "lr")
    plain_log_ticks(*axes[:, 0])  # after every set_yscale of the shared axis
    bar = fig.colorbar(mesh, ax=axes.ravel().tolist(), label=f"seeds stable (of {seeds})")
    bar.set_ticks(counts / seeds, labels=[str(k) for k in counts])
    cells = {(r.config.method, r.config.s, r.config.lr) for r in runs}
    gaps = len(cells) < len(methods) * len(s_values) * len(lrs)
    note = "x: some seed diverged" + ("; white: not run" if gaps else "")
    fig.suptitle(f"{task}: {regime.label} ({note})", fontsize=10)
    return save(fig, out, f"stability-{task}-{regime.slug}.png")


# The methods of the figure against a balanced start: every method that fixes the gauge, with
# its balanced start and the references (weight decay, which does not, replicas and the
# mechanism's methods, reported in their own section, left out).
BALANCED_START_METHODS = tuple(
    m
    for m, d in METHODS.items()
    if d.fixing != "weight-decay" and not d.replica_of and m not in MECHANISM_METHODS
)


def _edges_panel(ax: Any, regime: Regime, entry: dict[str, Any], tops: Table) -> list[str]:
    """One regime's panel of :func:`balanced_start_figure` (``tops``: per method and s, the
    grid top of the cell); returns the methods drawn."""
    by_seed = entry["stable_edge_by_seed"]
    methods = [m for m in BALANCED_START_METHODS if m in by_seed]
    s_values = sorted({s for m in methods for s in by_seed[m]}, key=float)
    positive = [v for m in methods for c in by_seed[m].values() for v in c.values() if v > 0]
    floor = min(positive) / 2 if positive else 1e-3
    for lr in entry["lr_grid"]:
        ax.axhline(lr, color="0.9", lw=0.6, zorder=0)
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        for j, s in enumerate(s_values):
            if s not in by_seed[method]:  # not run at this s
                continue
            cell, top = list(by_seed[method][s].values()), tops[method][s]
            x = j - 0.4 + width * (m + 0.5)
            xs = [x + width * 0.25 * (i - (len(cell) - 1) / 2) for i in range(len(cell))]
            ys = [v if v > 0 else floor for v in cell]
            marks = ["v" if v == 0 else "^" if v >= top else "o" for v in cell]
            for xi, yi, mark in zip(xs, ys, marks, strict=True):
                ax.scatter(xi, yi, marker=mark, s=14, color=method_color(method), zorder=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(s_values)), [f"{float(s):g}" for s in s_values])
    ax.set_xlabel("initial imbalance s")
    ax.set_title(regime.label, fontsize=9)
    plain_log_ticks(ax)
    return methods


def balanced_start_figure(
    out: Path,
    task: str,
    regimes: dict[Regime, dict[str, Any]],
    tops: dict[Regime, Table] | None = None,
) -> str | None:
    """Continuous gauge fixing against a balanced start: per regime with a ``balanced-init``
    reference, each seed's bisected stable edge per method and initial imbalance (the grid's
    rates as faint lines; a downward triangle: no stable rate; an upward one: stable up to its
    cell's grid top, a lower bound). ``tops``: per regime, :func:`grid_tops` (none: a summary
    alone, :func:`regime_tops`)."""
    panels = [
        (regime, entry)
        for regime, entry in regimes.items()
        if "balanced-init" in entry["stable_edge_by_seed"]
    ]
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = subplots(
        rows, cols, figsize=(4.2 * cols, 3.4 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    shown: dict[str, Any] = {}
    for ax, (regime, entry) in zip(axes.flat, panels, strict=False):
        top = tops[regime] if tops is not None else regime_tops(entry)
        for method in _edges_panel(ax, regime, entry, top):
            shown[method] = Line2D([], [], marker="o", ls="", color=method_color(method))
    for row in axes:
        row[0].set_ylabel("stable edge, per seed")
    handles = [shown[m] for m in methods_in_order(shown)]
    handles += [Line2D([], [], marker=m, ls="", color="0.4") for m in ("v", "^")]
    legend_below(
        fig, handles, [*methods_in_order(shown), "no stable rate", "stable to the grid's top"]
    )
    title = f"{task}: continuous gauge fixing against a balanced start"
    fig.suptitle(title, fontsize=10, wrap=True)  # a one-panel figure is narrower than it
    return save(fig, out, f"balanced-start-{task}.png")
