"""``summary.json``: the headline numbers, computed from whatever a store holds.

Runs are grouped by task (:func:`~gaugefix.experiments.cells.by_task`) and, within a task, by
regime (optimizer, batch size, steps). Every regime is summarised alike by the run sections
(:mod:`~gaugefix.experiments.stability`, :mod:`~gaugefix.experiments.drift`,
:mod:`~gaugefix.experiments.quality`), each at every method's best strength in that regime; each
analysis of :data:`~gaugefix.experiments.analyses.ANALYSES` adds its entry under its key.
"""

from __future__ import annotations

from typing import Any

import torch

from gaugefix.experiments import drift, quality, stability
from gaugefix.experiments.analyses import ANALYSES, stored
from gaugefix.experiments.cells import Runs, by_regime, by_task
from gaugefix.experiments.engine import STABILITY_MARGIN
from gaugefix.experiments.store import Store


def task_summary(runs: Runs) -> dict[str, Any]:
    """The ``tasks[TASK]`` entry of ``summary.json`` for one task's runs."""
    regimes = {}
    for regime, regime_runs in by_regime(runs).items():
        chosen = stability.at_best_strength(regime_runs)
        regimes[regime.key] = {
            **stability.summarize(regime_runs, chosen),
            **drift.summarize(chosen),
            **quality.summarize(chosen),
        }
    return {
        "task_hash": runs[0].config.task_hash,
        "constant_loss": runs[0].constant_loss,
        "previously_stable": stability.previously_stable(runs),
        "regimes": regimes,
        "horizons": stability.horizons(runs),
        **quality.summarize_task(runs),
    }


def summarize(store: Store, quick: bool) -> dict[str, Any]:
    """``summary.json``: the headline numbers of everything in the store."""
    from gaugefix import __version__

    runs = store.runs()
    summary: dict[str, Any] = {
        "gaugefix_version": __version__,
        "torch_version": torch.__version__,
        "quick": quick,
        "seconds": round(store.seconds(), 3),
        "runs": len(runs),
        "stability_margin": STABILITY_MARGIN,
        "previously_stable": stability.previously_stable(runs),
        "tasks": {task: task_summary(rs) for task, rs in by_task(runs).items()},
    }
    for analysis in ANALYSES:
        values = stored(store, analysis)
        if values:
            summary[analysis.KEY] = analysis.summarize(values)
    return summary
