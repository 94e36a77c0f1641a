"""``report.md``, its figures and ``summary.json`` from a results store."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from gaugefix.experiments import drift, quality, realistic, stability
from gaugefix.experiments.analyses import ANALYSES, stored
from gaugefix.experiments.cells import Regime, Runs, by_regime, by_task, group, number_text
from gaugefix.experiments.engine import MECHANISM_METHODS, METHODS, REFERENCES
from gaugefix.experiments.figures import fmt, methods_in_order
from gaugefix.experiments.store import Store, StoredRun
from gaugefix.experiments.summary import summarize
from gaugefix.experiments.tasks import REALISTIC
from gaugefix.files import output_target, write_text

__all__ = [
    "check_outputs",
    "figures_shown",
    "headline_table",
    "mechanism_rows",
    "mechanism_table",
    "render",
    "summary_json",
    "MARK",
    "STORE_NAME",
]

STORE_NAME = "results.sqlite"
MARK = {True: "✓", False: "✗", None: "?"}
FIGURE = re.compile(r"!\[[^\]]*\]\(([^()/\\]+\.png)\)")  # a figure link to a file next to it
OUTPUTS = ("summary.json", "report.md")  # the files every report writes, besides its figures


def render(out_dir: str | Path, quick: bool | None = None) -> dict[str, Any]:
    """Write the figures, then ``summary.json`` and ``report.md``, into ``out_dir`` from one
    state of its store (:meth:`Store.snapshot`), each file whole or not at all, and remove the
    figures that only the previous ``report.md`` showed (no other file); returns the summary.
    ``quick`` defaults to what the store's last reproduction recorded.
    :class:`~gaugefix.files.OutputError` names a file that cannot be written."""
    out = Path(out_dir)
    store = Store(out / STORE_NAME, readonly=True).snapshot()  # one state, whoever writes
    check_outputs(out)
    previous = out / "report.md"
    shown_before = _figures_of(previous)
    if quick is None:
        quick = bool((store.analysis("meta/quick") or {}).get("quick", False))
    summary = summarize(store, quick)
    sections = [_header(summary, _title(store, summary)), mechanism_table(summary)]
    runs = store.runs()
    tops = _realistic_tops(runs)
    sections.append(realistic.render(summary.get("realistic", {}), summary["tasks"], tops))
    for task, task_runs in by_task(runs).items():
        sections.append(_task_section(out, store, task, summary["tasks"][task], task_runs))
    for analysis in ANALYSES:
        values = stored(store, analysis)
        if values:
            sections.append(analysis.render(out, values))
    text = "\n\n".join(s for s in sections if s) + "\n"
    stale = shown_before - figures_shown(text)
    # the two files last, one after the other: a failure before leaves both as they were
    write_text(out / "summary.json", summary_json(summary))
    write_text(previous, text)
    for name in stale:  # figures only the previous report showed (another task name, say)
        (out / name).unlink(missing_ok=True)
    return summary


def _realistic_tops(runs: Runs) -> dict[str, dict[str, realistic.CellTops]]:
    """Per realistic task and regime, the grid top of each method and strength at s = 0 (the
    cells of :func:`realistic.summarize`), the rule of :func:`stability.grid_tops`."""
    return {
        task: {
            regime.key: {
                cell: stability.grid_top(rs)
                for cell, rs in group(
                    [r for r in regime_runs if r.config.s == 0.0], lambda c: (c.method, c.strength)
                ).items()
            }
            for regime, regime_runs in by_regime(task_runs).items()
        }
        for task, task_runs in by_task(runs).items()
        if task_runs[0].config.task in REALISTIC  # its name, not its key (NAME@VERSION)
    }


def summary_json(summary: dict[str, Any]) -> str:
    """``summary.json``'s text: strict JSON, where a number that is not finite (which
    ``report.md`` shows as n/a) is ``null``."""
    return json.dumps(_finite(summary), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite, at any depth, replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def check_outputs(out_dir: str | Path) -> None:
    """:class:`~gaugefix.files.OutputError` when ``summary.json`` or ``report.md`` in
    ``out_dir`` can never be written (a directory, a device): checked before anything is
    computed or written for a report."""
    for name in OUTPUTS:
        output_target(Path(out_dir) / name)


def _figures_of(report: Path) -> set[str]:
    """The figures a report file shows (none when it is missing or cannot be read; its bytes
    need not be UTF-8: a figure's name is ASCII)."""
    try:
        return figures_shown(report.read_text(errors="replace"))
    except OSError:
        return set()


def figures_shown(report: str) -> set[str]:
    """The figure files a report shows: ``![...](NAME.png)`` in its own directory."""
    return set(FIGURE.findall(report))


def _cells(ratios: dict[str, dict[str, Any]]) -> str:
    """``0: 2 [1.41, 2] ✓; 1: ...``: per s, the seed ratios and the verdict's mark."""
    return "; ".join(
        f"{number_text(s)}: {stability.ratio_text(st)} {MARK[st['held']]}"
        for s, st in sorted(ratios.items(), key=lambda kv: float(kv[0]))
    )


def headline_table(summary: dict[str, Any]) -> str:
    """The table printed at the end of a reproduction: per task, regime and method, the
    expansion of the stable learning-rate range against each reference at each initial
    imbalance (median [min, max] over seeds, and whether the claim held) and the drift
    suppression."""
    lines = [
        "| task | regime | method | vs plain, by s | vs balanced-init, by s | drift suppression |",
        "|---|---|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        for key, g in t["regimes"].items():
            ratios = g["expansion_ratio"]
            for method in methods_in_order(g["max_stable_lr"]):
                cells = [
                    _cells(ratios[ref][method]) if method in ratios.get(ref, {}) else "-"
                    for ref in REFERENCES
                ]
                if cells == ["-", "-"]:
                    continue
                drift_stats = g.get("drift_suppression", {}).get(method)
                drift_cell = (
                    f"{stability.ratio_text(drift_stats)} {MARK[drift_stats['held']]}"
                    if drift_stats
                    else "-"
                )
                lines.append(
                    f"| {task} | {Regime.parse(key).label} | {stability.label(method, g)} | "
                    f"{cells[0]} | {cells[1]} | {drift_cell} |"
                )
    if len(lines) == 2:
        return _no_comparison(summary)
    lines.append(
        "\nA ratio is the median [min, max] over seeds of the per-seed ratio of the bisected "
        "stable edges; "
        "✓ held (the paired bootstrap 95% interval of the geometric-mean ratio above 1), ✗ did "
        "not hold, ? could not be measured. " + stability.verdicts_text(summary["verdicts"])
    )
    return "\n".join(lines)


def _no_comparison(summary: dict[str, Any]) -> str:
    """Why the headline has no row: only references ran, or no reference beside the others."""
    methods = {
        m
        for t in summary["tasks"].values()
        for g in t["regimes"].values()
        for m in g["max_stable_lr"]
    }
    if methods <= set(REFERENCES):
        return (
            "No comparison: the runs hold no method besides the references (plain, "
            "balanced-init) in any regime."
        )
    return (
        "No comparison: no regime holds a reference (plain, balanced-init) at an initial "
        "imbalance where another method ran."
    )


def mechanism_rows(summary: dict[str, Any]) -> list[str]:
    """Table rows ``| task | regime | comparison | by s |``: per task and regime, each method of
    :data:`~gaugefix.experiments.engine.MECHANISM_METHODS` against each method it is compared
    with (the references, and for exact-first and balance-after-step-1 exact)."""
    rows = []
    for task, t in summary["tasks"].items():
        for key, g in t["regimes"].items():
            ratios = g["expansion_ratio"]
            for method in MECHANISM_METHODS:
                for ref in (r for r in ratios if method in ratios[r]):
                    rows.append(
                        f"| {task} | {Regime.parse(key).label} | {stability.label(method, g)} vs "
                        f"{stability.label(ref, g)} | {_cells(ratios[ref][method])} |"
                    )
    return rows


def mechanism_table(summary: dict[str, Any]) -> str:
    """The mechanism section: :func:`mechanism_rows` under their explanation; empty without
    such runs."""
    rows = mechanism_rows(summary)
    if not rows:
        return ""
    return (
        "## The mechanism\n\nWhether continuous gauge fixing acts through the first steps or "
        "through relaxation, and whether its effect is a preconditioner or a sharper start: "
        "exact-first (the exact orbit step also before the first update) and "
        "balance-after-step-1 (balanced once, after the first step, then plain) against exact "
        "(a ratio near 1 for both: continuous fixing only rescues the first steps); "
        "per-layer-lr (the balanced point's learning rates, one per tensor, without a gauge "
        "move) and min-sharpness-init (a start at the orbit's least sharp point) against plain "
        "and balanced-init. Per s: the per-seed ratio of the bisected stable edges, median "
        "[min, max], and the paired verdict (✓ held, ✗ did not hold, ? could not be "
        "measured).\n\n| task | regime | comparison | by s |\n|---|---|---|---|\n" + "\n".join(rows)
    )


def _title(store: Store, summary: dict[str, Any]) -> str:
    """What made the store's runs: the reproduction (quick or full), sweeps, or both."""
    made_by = store.analysis("meta/made-by") or []
    parts = [m for m in made_by if m != "sweep"]
    if "sweep" in made_by:
        parts.append("sweeps" if parts else f"sweep of {', '.join(summary['tasks'])}")
    return "gaugefix " + " and ".join(parts) if parts else "gaugefix results"


def _header(summary: dict[str, Any], title: str) -> str:
    methods = "\n".join(f"- `{name}`: {m.definition}." for name, m in METHODS.items())
    return (
        f"# {title}\n\n"
        f"gaugefix {summary['gaugefix_version']}, torch {summary['torch_version']}; "
        f"{summary['runs']} runs, {summary['seconds']:.0f} s of compute.\n\n"
        f"## Definitions\n\n{stability.DEFINITION}\n\n{drift.DEFINITION}\n\n"
        f"The previous definition (stable: not diverged and the final training loss below the "
        f"initial loss) called **{summary['previously_stable']}** of these runs stable that this "
        "one does not.\n\n"
        "The initial imbalance s moves the model's initialisation (PyTorch's default; He for "
        "deep-mlp-digits) along its own orbit by `h = s z` (z a fixed random sign vector): the "
        "function at initialisation is identical for every s, only the gauge differs. A regime "
        "is an optimizer, a batch size (full: full batch) and a number of steps.\n\n"
        f"**Methods** (strength: penalty, exact-step or weight-decay strength):\n\n{methods}"
        "\n\n## Headline\n\n"
        + headline_table(summary)
        + "\n\n"
        + stability.render_sensitivity(summary, MARK)
    )


def _task_section(
    out: Path, store: Store, task: str, t: dict[str, Any], runs: list[StoredRun]
) -> str:
    parts = [f"## {task}"]
    if "@" in task:
        parts.append(
            f"Runs of task version `{t['task_hash']}`: the store holds runs of this task name with "
            "other data, another model or other experiment definitions, reported separately."
        )
    parts.append(
        f"Loss of the best constant predictor (median over the task's instances): "
        f"{fmt(t['constant_loss'])}. Runs the previous "
        f"stability definition called stable that this one does not: {t['previously_stable']}."
    )
    regimes: dict[Regime, tuple[dict, list[StoredRun]]] = {}
    tops: dict[Regime, stability.Table] = {}
    for regime, regime_runs in by_regime(runs).items():
        entry = t["regimes"][regime.key]
        chosen = stability.on_grid(stability.at_best_strength(regime_runs))
        regimes[regime] = (entry, chosen)
        tops[regime] = stability.grid_tops(chosen)

        def label(method: str, entry: dict = entry) -> str:
            return stability.label(method, entry)

        parts.append(f"### {regime.label}")
        parts.append(stability.render(out, task, regime, entry, chosen))
        parts.append(drift.render(entry, label))
        parts.append(quality.render(entry, label))
    parts.append(stability.render_horizons(t["horizons"]))
    figure = stability.balanced_start_figure(
        out, task, {g: e for g, (e, _) in regimes.items()}, tops
    )
    if figure:
        parts.append(
            "### Continuous gauge fixing against a balanced start\n\nEach seed's bisected "
            "stable edge per method, regime and initial imbalance (faint lines: the grid's "
            f"rates).\n\n![continuous fixing against a balanced start]({figure})"
        )
    figure = drift.figure(out, store, task, regimes)
    if figure:
        parts.append(
            "### Scale drift over the steps\n\nEach regime's first seed at its drift learning "
            "rate, s = 0 (a method whose run diverged there is not drawn).\n\n"
            f"![drift]({figure})"
        )
    parts.append(quality.render_task(t))
    return "\n\n".join(p for p in parts if p)
