"""The README's results block is generated from the published full run's summary.json: every
number in it is the summary's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gaugefix.experiments import stability
from gaugefix.experiments.engine import RunConfig, RunResult
from gaugefix.experiments.summary import task_summary
from gaugefix.report.readme import END, START, results_block, with_results

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "figures" / "full-summary.json"


def test_the_readmes_results_are_the_published_summarys():
    """Regenerating the block from docs/figures/full-summary.json leaves the README as it is
    (``python -m gaugefix.report.readme docs/figures/full-summary.json README.md`` rewrites it)."""
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme
    assert with_results(readme, json.loads(PUBLISHED.read_text())) == readme


def _run(method: str, lr: float, seed: int, stable: bool) -> RunResult:
    config = RunConfig("t", method, "gd", lr, 0.0, 0.0, seed, 0, 10, task_hash="h")
    final, diverged_at, peak = (0.5, None, 1.0) if stable else (None, 3, 2e3)
    status = "stable" if stable else "diverged"
    return RunResult(
        config, status, 1.0, 1.0, final, None, None, None, 1.0, None, diverged_at, peak
    )


def _summary(edges: dict[str, float], seeds: int = 4) -> dict:
    """A summary of one task whose methods are stable exactly up to their ``edges``."""
    lrs = (0.1, 0.2, 0.4, 0.8, 1.6)
    runs = [
        _run(m, lr, seed, lr <= edge) for m, edge in edges.items() for lr in lrs
        for seed in range(seeds)
    ]  # fmt: skip
    tasks = {"t": task_summary(runs)}
    return {
        "runs": len(runs),
        "seconds": 600.0,
        "gaugefix_version": "v",
        "dtypes": "float32",
        "torch_version": "tv",
        "tasks": tasks,
        "verdicts": stability.count_verdicts(tasks),
        "sensitivity": stability.count_sensitivity(tasks),
    }


def test_a_continuous_method_that_beats_a_balanced_start_is_listed_with_its_interval():
    block = results_block(_summary({"plain": 0.1, "balanced-init": 0.2, "exact": 0.4}))
    assert "| t | full-batch gd, 10 steps | exact | 0 | 2 | [2, 2] |" in block
    assert "1 of the 1 verdicts" in block
    assert "| exact | 1 / 1 | 1 / 1 | 0 / 1 |" in block  # vs plain; vs balanced-init; below
    assert "10 minutes of compute" in block and "4 seeds judged" in block


def test_a_method_a_balanced_start_beats_is_counted_below_not_listed():
    block = results_block(_summary({"plain": 0.1, "balanced-init": 0.4, "exact": 0.2}))
    assert "0 of the 1 verdicts" in block and "| t |" not in block
    assert "| exact | 1 / 1 | 0 / 1 | 1 / 1 |" in block


def test_only_the_block_is_rewritten():
    summary = _summary({"plain": 0.1, "balanced-init": 0.2})
    text = f"before\n{START}\nold numbers\n{END}\nafter\n"
    out = with_results(text, summary)
    assert out == f"before\n{START}\n{results_block(summary)}\n{END}\nafter\n"
    assert with_results(out, summary) == out


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="results: start"):
        with_results("no block here\n", _summary({"plain": 0.1}))
