"""``summary.json``: the headline numbers, computed from whatever a store holds.

Runs are grouped by task (:func:`~gaugefix.experiments.cells.by_task`) and, within a task, by
regime (optimizer, batch size, steps). Every regime is summarised alike by the run sections
(:mod:`~gaugefix.experiments.stability`, :mod:`~gaugefix.experiments.drift`,
:mod:`~gaugefix.experiments.quality`), each at every method's best strength in that regime; the
realistic tasks also by :mod:`~gaugefix.experiments.realistic`, at every strength; each
analysis of :data:`~gaugefix.experiments.analyses.ANALYSES` adds its entry under its key.

The file's schema is the typed records below (:class:`Summary` and what it holds), each
section's written by the section; :func:`schema_markdown` renders it for the documentation.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, TypedDict

import torch

from gaugefix.experiments import drift, quality, realistic, stability
from gaugefix.experiments.analyses import ANALYSES, stored
from gaugefix.experiments.cells import (
    HorizonKey,
    RegimeKey,
    Runs,
    TaskKey,
    by_regime,
    by_task,
    median,
    task_version,
)
from gaugefix.experiments.engine import STABILITY_MARGIN
from gaugefix.experiments.store import Store

__all__ = ["RegimeSummary", "Summary", "TaskSummary", "schema_markdown", "summarize"]


class RegimeSummary(stability.StabilitySummary, drift.DriftSummary, quality.QualitySummary):
    """One regime of a task: every section's entries, at each method's best strength."""


class TaskSummary(quality.TaskQuality):
    """One task: its regimes and what is measured across them."""

    task_hash: Annotated[str, "its version: the first 8 hex digits of its instances' task hashes"]
    constant_loss: Annotated[
        float, "the loss of the best constant predictor, median over the task's instances"
    ]
    previously_stable: Annotated[int, "as the file's, for this task"]
    regimes: Annotated[dict[RegimeKey, RegimeSummary], 'optimizer/batch/steps: "gd/full/150"']
    horizons: dict[HorizonKey, stability.Horizon]


class _RunsSummary(TypedDict):
    gaugefix_version: Annotated[str, "the versions that trained the runs, sorted, comma-separated"]
    torch_version: Annotated[str, "as gaugefix_version"]
    dtypes: Annotated[str, "the dtypes the runs were trained in, sorted, comma-separated"]
    quick: bool
    seconds: Annotated[float, "compute time recorded in the store"]
    runs: int
    stability_margin: float
    previously_stable: Annotated[
        int, "runs the previous definition called stable that this one does not"
    ]
    tasks: Annotated[dict[TaskKey, TaskSummary], "NAME@HASH where a name has several hashes"]
    verdicts: Annotated[stability.VerdictCount, "how many verdicts; the sham controls' rates"]
    sensitivity: Annotated[
        dict[stability.DefinitionKey, stability.VerdictCount],
        "the headline (full-batch) regimes' expansion verdicts under each definition",
    ]


class _RealisticSummary(TypedDict, total=False):
    realistic: Annotated[
        realistic.Realistic,
        "where the store holds runs of the realistic tasks: per method, one entry per strength",
    ]


# Each analysis's entry, under its key where the store holds its values.
_AnalysisSummaries = TypedDict(  # type: ignore[misc]
    "_AnalysisSummaries", {a.KEY: a.SUMMARY for a in ANALYSES}, total=False
)


class Summary(_RunsSummary, _RealisticSummary, _AnalysisSummaries):
    """The file: the runs of every task, the realistic tasks' tuned entries, then each analysis
    under its key."""


def task_summary(runs: Runs) -> TaskSummary:
    """The ``tasks[TASK]`` entry of ``summary.json`` for one task's runs."""
    regimes = {}
    for regime, regime_runs in by_regime(runs).items():
        chosen = stability.at_best_strength(regime_runs)
        grid = stability.on_grid(chosen)
        regimes[regime.key] = RegimeSummary(
            **stability.summarize(regime_runs, chosen),
            **drift.summarize(grid),
            **quality.summarize(grid),
        )
    return TaskSummary(
        task_hash=task_version(runs[0].config.task_hash),
        constant_loss=median(list({r.config.task_hash: r.constant_loss for r in runs}.values())),
        previously_stable=stability.previously_stable(stability.on_grid(runs)),
        regimes=regimes,
        horizons=stability.horizons(runs),
        **quality.summarize_task(runs),
    )


def _versions(recorded: list[str], current: str) -> str:
    """The versions that trained the runs (``recorded``, one per run), sorted and joined; the
    ``current`` one for a store without runs."""
    return ", ".join(sorted(set(recorded))) or current


def summarize(store: Store, quick: bool) -> Summary:
    """``summary.json``: the headline numbers of everything in the store."""
    from gaugefix import __version__

    runs = store.runs()
    tasks = {task: task_summary(rs) for task, rs in by_task(runs).items()}
    summary = Summary(
        gaugefix_version=_versions([r.record.gaugefix_version for r in runs], __version__),
        torch_version=_versions([r.record.torch_version for r in runs], str(torch.__version__)),
        dtypes=", ".join(sorted({r.config.dtype for r in runs})),
        quick=quick,
        seconds=round(store.seconds(), 3),
        runs=len(runs),
        stability_margin=STABILITY_MARGIN,
        previously_stable=stability.previously_stable(stability.on_grid(runs)),
        tasks=tasks,
        verdicts=stability.count_verdicts(tasks),
        sensitivity=stability.count_sensitivity(tasks),
    )
    if tuned := realistic.summarize(runs):
        summary["realistic"] = tuned
    for analysis in ANALYSES:
        values = stored(store, analysis)
        if values:
            summary[analysis.KEY] = analysis.summarize(values)  # type: ignore[literal-required]
    return summary


# -- the schema, for the documentation -------------------------------------------------------------
_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _type_text(tp: Any) -> str:
    """A type as the schema writes it: ``{METHOD: [number, ...]}``, a record by its name."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:  # a key's placeholder, or a field's description
        return args[1] if args[0] is str and args[1].isupper() else _type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if origin is list:
        return f"[{_type_text(args[0])}, ...]"
    if origin is dict:
        return "{" + f"{_type_text(args[0])}: {_type_text(args[1])}" + "}"
    if typing.is_typeddict(tp):
        return f"`{tp.__name__}`"
    return _JSON_NAMES[tp]


def _records(tp: Any, found: dict[str, Any]) -> dict[str, Any]:
    """Every record reachable from ``tp``, by name, in the order first met."""
    if typing.is_typeddict(tp) and tp.__name__ not in found:
        found[tp.__name__] = tp
    if typing.is_typeddict(tp):
        children = typing.get_type_hints(tp, include_extras=True).values()
    else:
        children = typing.get_args(tp)
    for child in children:
        if isinstance(child, type) or typing.get_origin(child) is not None:
            _records(child, found)
    return found


def _plain(docstring: str | None) -> str:
    """A docstring as one line of Markdown: reST roles and literals as code."""
    text = re.sub(r":\w+:`~?([\w.]+)`", r"`\1`", " ".join((docstring or "").split()))
    return text.replace("``", "`")


def _record_table(tp: Any) -> str:
    """One record as a table: each key, its type and what it means (optional keys marked)."""
    rows = [f"**`{tp.__name__}`**: {_plain(tp.__doc__)}", "", "| key | value | meaning |"]
    rows.append("|---|---|---|")
    for key, hint in typing.get_type_hints(tp, include_extras=True).items():
        meaning = [] if key in tp.__required_keys__ else ["optional"]
        if typing.get_origin(hint) is Annotated and not typing.get_args(hint)[1].isupper():
            meaning.append(typing.get_args(hint)[1])
        rows.append(f"| `{key}` | {_type_text(hint)} | {'; '.join(meaning)} |")
    return "\n".join(rows)


def schema_markdown() -> str:
    """The schema of ``summary.json`` as Markdown tables, one per record, from :class:`Summary`."""
    return "\n\n".join(_record_table(tp) for tp in _records(Summary, {}).values()) + "\n"
