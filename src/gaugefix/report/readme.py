"""The README's results: a block generated from a full reproduction's ``summary.json``, so that
every number it shows is the summary's (the tests regenerate it and compare).

``python -m gaugefix.report.readme SUMMARY README`` rewrites the block between :data:`START`
and :data:`END` in ``README``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gaugefix.experiments import (
    adam_split,
    dose,
    min_sharpness,
    realistic,
    sharpness_track,
    stability,
)
from gaugefix.experiments.cells import Regime, median_of_every_seed, number_text
from gaugefix.experiments.engine import MECHANISM_METHODS, METHODS
from gaugefix.experiments.figures import fmt
from gaugefix.files import write_text
from gaugefix.report import MARK, mechanism_rows

__all__ = ["START", "END", "results_block", "with_results", "main"]

START = "<!-- results: start -->"
END = "<!-- results: end -->"
# The continuous methods: some gauge fixing during training (not a start, a sham or a mechanism
# probe).
CONTINUOUS = tuple(
    m
    for m, d in METHODS.items()
    if d.fixing not in (None, "weight-decay") and m not in MECHANISM_METHODS
)


def results_block(summary: dict[str, Any]) -> str:
    """The block: scope and verdict counts, the verdicts per method, where continuous fixing beat
    a balanced start, the mechanism, the realistic models and the definitions' sensitivity."""
    parts = [
        _scope(summary),
        _by_method(summary),
        _beat_balanced_start(summary),
        _mechanism(summary),
        _sharpness(summary),
        _adam(summary),
        _realistic(summary),
        _sensitivity(summary),
    ]
    return "\n\n".join(p for p in parts if p)


def _table(caption: str, columns: list[str], rows: list[str]) -> str:
    """``caption``, then a markdown table of ``columns`` and ``rows``; empty without rows."""
    if not rows:
        return ""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    return f"{caption}\n\n{head}\n" + "\n".join(rows)


def _verdicts(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, dict[str, Any]]]:
    """Every expansion verdict: (task, regime key, reference, method, s, its ratio stats)."""
    return [
        (task, key, ref, method, s, st)
        for task, t in summary["tasks"].items()
        for key, g in t["regimes"].items()
        for ref, by_method in g["expansion_ratio"].items()
        for method, by_s in by_method.items()
        for s, st in by_s.items()
    ]


def _scope(summary: dict[str, Any]) -> str:
    seeds = sorted({st["seeds"] for *_, st in _verdicts(summary) if st["seeds"]})
    judged = " to ".join(str(n) for n in dict.fromkeys(seeds[:1] + seeds[-1:]))
    return (
        f"{summary['runs']} runs over {len(summary['tasks'])} tasks, "
        f"{summary['seconds'] / 60:.0f} minutes of compute recorded in the store (gaugefix "
        f"{summary['gaugefix_version']}, torch {summary['torch_version']}, {summary['dtypes']}; "
        f"{judged or 'no'} seeds judged per verdict). "
        + stability.verdicts_text(summary["verdicts"])
    )


def _by_method(summary: dict[str, Any]) -> str:
    """Per method, over every task, regime and s: expansion verdicts held / made against each
    reference, how many against balanced-init had their whole interval below 1 (a balanced
    start was better), drift-suppression verdicts held / made, and late divergences."""
    count: dict[tuple[str, str], list[int]] = {}
    for _, _, ref, method, _, st in _verdicts(summary):
        _tally(count.setdefault((method, ref), [0, 0, 0]), st)
    for g in (g for t in summary["tasks"].values() for g in t["regimes"].values()):
        for method, st in g.get("drift_suppression", {}).items():
            _tally(count.setdefault((method, "drift"), [0, 0, 0]), st)
        for method, (late, alive) in g.get("late_divergences", {}).items():
            c = count.setdefault((method, "late"), [0, 0, 0])
            c[0], c[1] = c[0] + late, c[1] + alive
    rows = [
        f"| {m} | {_held(count.get((m, 'plain')))} | {_held(count.get((m, 'balanced-init')))} | "
        f"{_below(count.get((m, 'balanced-init')))} | {_held(count.get((m, 'drift')))} | "
        f"{_held(count.get((m, 'late')))} |"
        for m in METHODS
        if (m, "plain") in count or (m, "balanced-init") in count
    ]
    return _table(
        "**Verdicts per method** (every task, regime and `s`; made: the verdicts that could be "
        "measured; late divergences: runs that diverged after the first tenth of their steps, of "
        "the runs alive then):",
        [
            "method",
            "wider than plain: held / made",
            "wider than balanced-init: held / made",
            "narrower than balanced-init: interval below 1 / made",
            "less drift than the reference: held / made",
            "late divergences",
        ],
        rows,
    )


def _tally(c: list[int], st: dict[str, Any]) -> None:
    """Add a verdict to ``[held, made, interval below 1]`` (an end that is not finite, ``null``
    in ``summary.json``, is not below 1)."""
    upper = st["interval"][1] if st["held"] is not None else None
    c[0] += st["held"] is True
    c[1] += st["held"] is not None
    c[2] += upper is not None and upper < 1


def _held(c: list[int] | None) -> str:
    return f"{c[0]} / {c[1]}" if c else "-"


def _below(c: list[int] | None) -> str:
    return f"{c[2]} / {c[1]}" if c else "-"


def _beat_balanced_start(summary: dict[str, Any]) -> str:
    """Every verdict where a continuous method held against balanced-init."""
    made = [
        v
        for v in _verdicts(summary)
        if v[2] == "balanced-init" and v[3] in CONTINUOUS and v[5]["held"] is not None
    ]
    rows = [
        f"| {task} | {Regime.parse(key).label} | "
        f"{stability.label(method, summary['tasks'][task]['regimes'][key])} | {number_text(s)} | "
        f"{stability.ratio_text(st)} | {stability.interval_text(st)} |"
        for task, key, _, method, s, st in made
        if st["held"]
    ]
    head = (
        f"**Where continuous gauge fixing beat a balanced start**: {len(rows)} of the {len(made)} "
        f"verdicts of {', '.join(CONTINUOUS)} against balanced-init held"
    )
    caption = head + (
        " (ratio of stable edges: median [seed min, max]; the paired bootstrap 95% interval of "
        "the geometric-mean ratio):"
    )
    columns = ["task", "regime", "method (strength)", "s", "ratio", "95% interval"]
    return _table(caption, columns, rows) or head + "."


def _mechanism(summary: dict[str, Any]) -> str:
    rows = mechanism_rows(summary)
    lines = [
        f"- dose-response on {task} ({d['seeds']} seeds, {d['steps']} steps, s = {dose.S:g}): "
        "Spearman of edge ratio against relaxation time over plain's divergence time: "
        + ", ".join(f"{m} {fmt(r)}" for m, r in d["rho"].items())
        + f"; {d['excluded']} points left out; one monotone curve shared (pooled rho at most "
        f"{dose.SHARED_RHO:g} and at most {dose.SHARED_SLACK:g} above the weaker method's): "
        f"{MARK[d['shared']]}"
        for task, d in summary.get(dose.KEY, {}).items()
    ]
    starts = summary.get(min_sharpness.KEY, {})
    lines += [
        f"- lambda_max at initialisation on {task} (median of {len(by_seed)} seeds): "
        f"PyTorch's default {fmt(_median(by_seed, 'given'))}, balanced point "
        f"{fmt(_median(by_seed, 'balanced'))}, min-sharpness start {fmt(_median(by_seed, 'found'))}"
        for task, by_seed in starts.items()
    ]
    caption = (
        "**The mechanism** (exact-first and balance-after-step-1 against exact: near 1 means "
        "continuous fixing only rescues the first steps; per-layer-lr, the balanced point's "
        "learning rates without a gauge move, and min-sharpness-init against the references; "
        f"{MARK[True]} held: the paired 95% interval above 1, {MARK[False]} did not hold, which "
        f"is not narrower, {MARK[None]} could not be measured):"
    )
    table = _table(caption, ["task", "regime", "comparison", "by s: ratio, verdict"], rows)
    return "\n\n".join(p for p in (table or (caption if lines else ""), "\n".join(lines)) if p)


def _median(by_seed: dict[str, dict[str, Any]], key: str) -> float | None:
    """The median over seeds of ``key``; ``None`` where some seed's is unknown (``null`` in
    ``summary.json``: not finite), as a median over the others would not be over every seed."""
    return median_of_every_seed([r[key] for r in by_seed.values()])


def _over(a: float | None, b: float | None) -> float | None:
    """``a / b``; ``None`` where either is unknown or ``b`` is 0."""
    return None if a is None or b is None or b == 0 else a / b


def _sharpness(summary: dict[str, Any]) -> str:
    rows = [
        f"| {task} | {number_text(s)} | {method} | {fmt(e['predicted_edge'])} | "
        f"{fmt(e['measured_edge'])} | {fmt(_over(e['measured_edge'], e['predicted_edge']))} |"
        for task, by_method in summary.get(sharpness_track.KEY, {}).items()
        for method, by_s in by_method.items()
        for s, e in sorted(by_s.items(), key=lambda kv: float(kv[0]))
    ]
    return _table(
        "**Sharpness at the edge** (seed 0, full-batch GD; measured edge: its largest stable "
        "rate, the stable end of its bisected bracket; gradient descent on a quadratic is "
        "stable below 2/lambda_max):",
        [
            "task",
            "s",
            "method",
            "predicted 2/lambda_max(0)",
            "measured edge",
            "measured / predicted",
        ],
        rows,
    )


def _adam(summary: dict[str, Any]) -> str:
    rows = [
        f"| {task} | {m} | {fmt(e['strength'][m])} | {fmt(e['horizontal'][m])} | "
        f"{fmt(e['step_inflation'][m])} | {fmt(e['v_inflation'][m])} |"
        for task, e in summary.get(adam_split.KEY, {}).items()
        for m in e["strength"]
    ]
    return _table(
        f"**Adam, separated** (full-batch Adam from s = {adam_split.S:g}; horizontal: the part "
        "of what the fixing adds to Adam's update that changes the function at first order, "
        "relative to Adam's update; step: the mean over the steps of the step taken over "
        "Adam's update alone from the same state; sqrt(v): the mean of sqrt(v) over plain's "
        "run's, at the last step both reached):",
        ["task", "fixing", "strength", "horizontal", "step", "sqrt(v)"],
        rows,
    )


def _realistic(summary: dict[str, Any]) -> str:
    """The realistic tables, each edge marked against :func:`realistic.grid_top` (the summary
    has no runs; in the complete store of a full reproduction it is each cell's grid top)."""
    tables = [
        f"*{task}, {Regime.parse(key).label}*\n\n"
        + realistic.table(methods, realistic.grid_top(summary["tasks"], task, key))
        for task, regimes in summary.get("realistic", {}).items()
        for key, methods in regimes.items()
    ]
    if not tables:
        return ""
    return "**Realistic models at PyTorch's default initialisation**\n\n" + "\n\n".join(tables)


def _sensitivity(summary: dict[str, Any]) -> str:
    rows = [
        f"| {key} | {c['held']} / {c['verdicts']} | "
        + " | ".join(
            f"{s['held']} / {s['verdicts']}" if (s := c["shams"].get(m)) else "-"
            for m in stability.SHAM_METHODS
        )
        + " |"
        for key, c in summary.get("sensitivity", {}).items()
    ]
    return _table(
        "**Sensitivity to the definitions** (the full-batch regimes' expansion verdicts, held / "
        "made, with a run diverged above 2, 10 or 1000 times its initial loss and stable at "
        "margin 0.5 or 0.9):",
        ["definition", "all verdicts", *(f"sham {m}" for m in stability.SHAM_METHODS)],
        rows,
    )


def with_results(readme: str, summary: dict[str, Any]) -> str:
    """``readme`` with the text between :data:`START` and :data:`END` replaced by
    :func:`results_block`; ``ValueError`` when the markers are missing."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {START} ... {END} block")
    return readme[: start + len(START)] + "\n" + results_block(summary) + "\n" + readme[end:]


def main(argv: list[str]) -> None:
    """``SUMMARY README``: rewrite the README's results block from the summary."""
    summary_path, readme_path = (Path(a) for a in argv)
    summary = json.loads(summary_path.read_text())
    write_text(readme_path, with_results(readme_path.read_text(), summary))


if __name__ == "__main__":
    main(sys.argv[1:])
