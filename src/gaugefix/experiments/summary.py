"""The headline numbers, computed from whatever a store holds.

Definitions (the issue's, kept verbatim in the report):

- a run *diverges* when its loss becomes non-finite or exceeds ``1e3`` times its initial value;
  it is *stable* when it does not diverge and its final training loss is below its initial loss;
- ``max_stable_lr(method, s)``: the largest grid learning rate such that it and every smaller
  grid rate are stable for every seed (0 when the smallest is not);
- ``expansion_ratio = max_stable_lr(method, s) / max_stable_lr(plain, s)``, ``None`` where
  plain's is 0 or plain was stable up to the grid's top (its range, so the ratio, is unknown);
- ``drift_suppression = final RMS log-ratio (plain) / final RMS log-ratio (method)`` at the
  largest learning rate stable for ``plain`` (``s = 0``), per optimizer;
- methods with a strength grid are reported at their *best strength*: the one with the largest
  sum over ``s`` of ``max_stable_lr`` (the smallest such strength on ties);
- ``max_stable_lr_at_grid_top`` lists, per method, the ``s`` where every grid rate was stable:
  there ``max_stable_lr`` is only a lower bound.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from gaugefix.experiments.store import Store

Runs = list[dict[str, Any]]


def s_key(s: float) -> str:
    """An initial imbalance as a JSON key: ``"0.0"``, ``"1.5"``."""
    return str(float(s))


def lr_key(lr: float) -> str:
    """A learning rate as a JSON key, to 6 significant digits: ``"0.353553"``."""
    return f"{lr:.6g}"


def max_stable_lr(runs: Runs) -> float:
    """The largest learning rate such that it and every smaller one are stable for all seeds."""
    by_lr: dict[float, list[bool]] = defaultdict(list)
    for r in runs:
        by_lr[r["lr"]].append(r["status"] == "stable")
    best = 0.0
    for lr in sorted(by_lr):
        if not all(by_lr[lr]):
            break
        best = lr
    return best


def by_task(runs: Runs) -> dict[str, Runs]:
    """The runs of each task, keyed by its name; when runs of one name have several task hashes
    (other data, model or experiment definitions) each hash is its own task, keyed
    ``NAME@HASH`` (the hash's first 8 digits), so they are never mixed."""
    hashes: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        hashes[r["task"]].add(r.get("task_hash", ""))
    out: dict[str, Runs] = defaultdict(list)
    for r in runs:
        several = len(hashes[r["task"]]) > 1
        out[f"{r['task']}@{r.get('task_hash', '')[:8]}" if several else r["task"]].append(r)
    return dict(sorted(out.items()))


def _cells(runs: Runs) -> dict[tuple, Runs]:
    cells: dict[tuple, Runs] = defaultdict(list)
    for r in runs:
        cells[(r["method"], r["strength"], r["optimizer"], r["s"])].append(r)
    return cells


def best_strengths(runs: Runs) -> dict[str, float]:
    """Per method, the strength with the largest summed ``max_stable_lr`` over ``s`` (gd)."""
    score: dict[tuple[str, float], float] = defaultdict(float)
    for (method, strength, opt, _), cell in _cells(runs).items():
        if opt == "gd":
            score[(method, strength)] += max_stable_lr(cell)
    best: dict[str, float] = {}
    for (method, strength), value in sorted(score.items()):
        if method not in best or value > score[(method, best[method])]:
            best[method] = strength
    return best


def task_summary(runs: Runs) -> dict[str, Any]:
    """The summary of one task's runs (the ``tasks[TASK]`` entry of ``summary.json``)."""
    best = best_strengths(runs)
    chosen = [r for r in runs if r["strength"] == best.get(r["method"])]
    cells = _cells(chosen)
    msl: dict[str, dict[str, float]] = defaultdict(dict)
    at_top: dict[str, list[str]] = defaultdict(list)
    for (method, _, opt, s), cell in sorted(cells.items()):
        if opt == "gd":
            msl[method][s_key(s)] = max_stable_lr(cell)
            if msl[method][s_key(s)] == max(r["lr"] for r in cell):
                at_top[method].append(s_key(s))
    expansion: dict[str, dict[str, float | None]] = defaultdict(dict)
    for method, by_s in msl.items():
        for s, value in by_s.items():
            base = msl.get("plain", {}).get(s)
            known = base and s not in at_top.get("plain", [])  # else plain's range is unbounded
            expansion[method][s] = value / base if known else None
    out: dict[str, Any] = {
        "task_hash": runs[0].get("task_hash"),
        "max_stable_lr": dict(msl),
        "expansion_ratio": dict(expansion),
        "drift_suppression": _drift(cells),
        "final_train_loss": _expressivity(chosen, "final_loss"),
        "best_strength": best,
        "max_stable_lr_at_grid_top": dict(at_top),
        "balance_function_change": max(
            (r["balance_change"] for r in runs if r["balance_change"] is not None), default=None
        ),
    }
    for key, column in (("final_test_loss", "test_loss"), ("test_accuracy", "test_accuracy")):
        values = _expressivity(chosen, column)
        if any(values.values()):  # left out without a test split (or, accuracy, classes)
            out[key] = values
    return out


def drift_lr(cells: dict[tuple, Runs], optimizer: str) -> float | None:
    """The learning rate of the drift comparison: the largest stable for ``plain`` at s = 0."""
    plain = cells.get(("plain", 0.0, optimizer, 0.0))
    lr = max_stable_lr(plain) if plain else 0.0
    return lr or None


def _drift(cells: dict[tuple, Runs]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = defaultdict(dict)
    optimizers = sorted({opt for (_, _, opt, _) in cells})
    for opt in optimizers:
        lr = drift_lr(cells, opt)
        if lr is None:
            continue
        base = _median(
            [r["log_ratio_rms"] for r in cells[("plain", 0.0, opt, 0.0)] if r["lr"] == lr]
        )
        for (method, _, o, s), cell in cells.items():
            if o != opt or s != 0.0 or method == "plain":
                continue
            value = _median([r["log_ratio_rms"] for r in cell if r["lr"] == lr])
            out[method][opt] = base / value if base is not None and value else None
    return dict(out)


def _expressivity(runs: Runs, column: str) -> dict[str, dict[str, float]]:
    """Median over seeds of ``column`` at s = 0 (gd), for every learning rate stable (all seeds)
    for both ``plain`` and the method."""
    cells = _cells(runs)
    stable: dict[str, set[float]] = {}
    for (method, _, opt, s), cell in cells.items():
        if opt == "gd" and s == 0.0:
            by_lr: dict[float, list[bool]] = defaultdict(list)
            for r in cell:
                by_lr[r["lr"]].append(r["status"] == "stable")
            stable[method] = {lr for lr, ok in by_lr.items() if all(ok)}
    out: dict[str, dict[str, float]] = {}
    for (method, _, opt, s), cell in sorted(cells.items()):
        if opt != "gd" or s != 0.0:
            continue
        common = stable.get(method, set()) & stable.get("plain", set())
        values = {}
        for lr in sorted(common):
            v = _median([r[column] for r in cell if r["lr"] == lr])
            if v is not None:
                values[lr_key(lr)] = v
        out[method] = values
    return out


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


def summarize(store: Store, quick: bool) -> dict[str, Any]:
    """``summary.json``: the headline numbers of everything in the store."""
    import torch

    from gaugefix import __version__

    runs = store.runs()
    analyses = store.analyses()
    relaxation = [v for k, v in analyses.items() if k.startswith("relaxation/")]
    sharp = sorted(  # teacher-student first: the task the summary's sharpness speaks for
        (k != "sharpness-init/teacher-student", k, v)
        for k, v in analyses.items()
        if k.startswith("sharpness-init/")
    )
    sharp = [v for _, _, v in sharp]
    summary: dict[str, Any] = {
        "gaugefix_version": __version__,
        "torch_version": torch.__version__,
        "quick": quick,
        "seconds": round(store.seconds(), 3),
        "runs": len(runs),
        "tasks": {task: task_summary(rs) for task, rs in by_task(runs).items()},
    }
    if relaxation:
        summary["relaxation"] = {
            "max_relative_error": max(v["max_relative_error"] for v in relaxation)
        }
    if sharp:
        summary["sharpness_vs_imbalance"] = sharp[0]["by_s"]
    return summary
