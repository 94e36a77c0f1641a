"""Figures, ``report.md`` and ``summary.json`` from a results store."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from gaugefix.experiments.store import Store  # noqa: E402
from gaugefix.experiments.summary import (  # noqa: E402
    best_strengths,
    by_task,
    drift_lr,
    summarize,
)
from gaugefix.report.analyses import analysis_section, plain_log_ticks  # noqa: E402

STORE_NAME = "results.sqlite"
METHOD_ORDER = ("plain", "penalty", "exact", "weight-decay", "balance")


def render(out_dir: str | Path, quick: bool | None = None) -> dict[str, Any]:
    """Write ``summary.json``, the figures and ``report.md`` into ``out_dir`` from its store;
    returns the summary. ``quick`` defaults to what the store's last reproduction recorded."""
    out = Path(out_dir)
    store = Store(out / STORE_NAME, readonly=True)
    if quick is None:
        quick = bool((store.analysis("meta/quick") or {}).get("quick", False))
    summary = summarize(store, quick)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    sections = [_header(summary, _title(store, summary))]
    for task, task_runs in by_task(store.runs()).items():
        figures = _task_figures(out, store, task, task_runs)
        sections.append(_task_section(task, summary["tasks"][task], figures))
    sections.append(analysis_section(out, store, summary))
    (out / "report.md").write_text("\n\n".join(s for s in sections if s) + "\n")
    return summary


def headline_table(summary: dict[str, Any]) -> str:
    """The table printed at the end of a reproduction: per task and method, the expansion of
    the stable learning-rate range at each initial imbalance and the drift suppression."""
    lines = [
        "| task | method | expansion ratio by s | drift suppression by optimizer |",
        "|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        for method in _methods(t["max_stable_lr"]):
            if method == "plain":
                continue
            exp = t["expansion_ratio"].get(method, {})
            drift = t["drift_suppression"].get(method, {})
            exp_s = ", ".join(f"{s}: {_ratio(t, method, s, v)}" for s, v in exp.items())
            drift_s = ", ".join(f"{o}: {_fmt(v)}" for o, v in drift.items()) or "-"
            lines.append(f"| {task} | {_label(method, t)} | {exp_s} | {drift_s} |")
    return "\n".join(lines)


def _ratio(t: dict[str, Any], method: str, s: str, value: float | None) -> str:
    """An expansion ratio, as a lower bound (``≥``) where the method's range reached the grid's
    top, and ``n/a`` where plain's did (the ratio is then unknown)."""
    top = t.get("max_stable_lr_at_grid_top", {})
    if s in top.get("plain", []):
        return "n/a"
    return ("≥ " if s in top.get(method, []) else "") + _fmt(value)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}"


def _label(method: str, t: dict[str, Any]) -> str:
    strength = t.get("best_strength", {}).get(method)
    return f"{method} ({strength:g})" if strength else method


def _color(method: str) -> str:
    """The same color for a method in every panel and figure."""
    return f"C{METHOD_ORDER.index(method)}" if method in METHOD_ORDER else "k"


def _methods(keys: Any) -> list[str]:
    return sorted(keys, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)


def _title(store: Store, summary: dict[str, Any]) -> str:
    """What made the store's runs: the reproduction (quick or full), sweeps, or both."""
    made_by = store.analysis("meta/made-by")
    if made_by is None:  # stores written before the commands were recorded
        kind = "quick" if summary["quick"] else "full"
        made_by = [f"reproduction ({kind})"] if store.analysis("meta/quick") is not None else []
    parts = [m for m in made_by if m != "sweep"]
    if "sweep" in made_by:
        parts.append("sweeps" if parts else f"sweep of {', '.join(summary['tasks'])}")
    return "gaugefix " + " and ".join(parts) if parts else "gaugefix results"


def _header(summary: dict[str, Any], title: str) -> str:
    return (
        f"# {title}\n\n"
        f"gaugefix {summary['gaugefix_version']}, torch {summary['torch_version']}; "
        f"{summary['runs']} runs, {summary['seconds']:.0f} s of compute.\n\n"
        "A run *diverges* when its loss becomes non-finite or exceeds 1e3 times its initial "
        "value; it is *stable* when it does not diverge and its final training loss is below "
        "its initial loss. `max_stable_lr` is the largest grid learning rate such that it and "
        "every smaller one are stable for every seed. Methods with a strength grid are shown "
        "at their best strength (largest summed `max_stable_lr` over s). The initial imbalance "
        "s moves PyTorch's default initialisation along its own orbit by `h = s z` "
        "(z a fixed random sign vector): the function at initialisation is identical for every s."
        "\n\n## Headline\n\n" + headline_table(summary)
    )


def _task_figures(out: Path, store: Store, task: str, runs: list[dict]) -> dict[str, str]:
    best = best_strengths(runs)
    chosen = [r for r in runs if r["strength"] == best.get(r["method"])]
    figures = {"stability": _stability_map(out, task, chosen)}
    drift = _drift_curves(out, store, task, chosen)
    if drift:
        figures["drift"] = drift
    return figures


def _stability_map(out: Path, task: str, runs: list[dict]) -> str:
    gd = [r for r in runs if r["optimizer"] == "gd"]
    methods = _methods({r["method"] for r in gd})
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(3.2 * len(methods), 3.6),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    finals = [r["final_loss"] for r in gd if r["final_loss"]]
    norm = LogNorm(min(finals), max(finals)) if finals else None
    for ax, method in zip(axes[0], methods, strict=True):
        cell: dict[tuple[float, float], list[dict]] = defaultdict(list)
        for r in gd:
            if r["method"] == method:
                cell[(r["s"], r["lr"])].append(r)
        xs, ys, cs, dx, dy = [], [], [], [], []
        for (s, lr), rs in cell.items():
            if any(r["status"] == "diverged" for r in rs):
                dx.append(s)
                dy.append(lr)
            else:
                xs.append(s)
                ys.append(lr)
                cs.append(max(min(r["final_loss"] for r in rs), 1e-12))
        sc = ax.scatter(xs, ys, c=cs, norm=norm, cmap="viridis", marker="s", s=40)
        ax.scatter(dx, dy, marker="x", color="crimson", s=25, label="diverged")
        ax.set_yscale("log")
        ax.set_title(method)
        ax.set_xlabel("initial imbalance s")
    axes[0][0].set_ylabel("learning rate (full-batch GD)")
    bar = fig.colorbar(sc, ax=axes[0].tolist(), label="final training loss")
    plain_log_ticks(axes[0][0], bar.ax)
    if any(r["status"] == "diverged" for r in gd):
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    name = f"stability-{task}.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _drift_curves(out: Path, store: Store, task: str, runs: list[dict]) -> str | None:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        cells[(r["method"], r["strength"], r["optimizer"], r["s"])].append(r)
    optimizers = sorted({r["optimizer"] for r in runs})
    panels = [(o, lr) for o in optimizers if (lr := drift_lr(cells, o)) is not None]
    if not panels:
        return None
    fig, axes = plt.subplots(
        2, len(panels), figsize=(3.6 * len(panels), 5.8), squeeze=False, layout="constrained"
    )
    lines = {}  # method -> a line drawn for it, for the figure's one legend
    for j, (opt, lr) in enumerate(panels):
        for method in _methods({r["method"] for r in runs}):
            rs = [
                r
                for r in runs
                if r["method"] == method
                and r["optimizer"] == opt
                and r["s"] == 0.0
                and r["lr"] == lr
                and r["status"] != "diverged"
            ]
            if not rs:
                continue
            curve = store.curves(min(rs, key=lambda r: r["seed"])["id"])
            steps = [p["step"] for p in curve]
            style = {"color": _color(method), "label": method}
            lines[method] = axes[0][j].plot(steps, [p["log_ratio_rms"] for p in curve], **style)[0]
            axes[1][j].plot(steps, [p["mu_rel_max"] for p in curve], **style)
        axes[0][j].set_title(f"{opt}, lr = {lr:.3g}")
        axes[0][j].set_ylabel("RMS log-ratio")
        axes[1][j].set_ylabel("max |mu| / S")
        axes[1][j].set_xlabel("step")
        axes[1][j].set_yscale("log")
    methods = _methods(lines)
    fig.legend([lines[m] for m in methods], methods, loc="outside lower center", ncol=len(methods))
    name = f"drift-{task}.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _claim(held: bool | None) -> str:
    return {True: "held", False: "did not hold", None: "could not be measured"}[held]


def _task_section(task: str, t: dict[str, Any], figures: dict[str, str]) -> str:
    parts = [f"## {task}"]
    if "@" in task:
        parts.append(
            f"Runs of task hash `{t['task_hash']}`: the store holds runs of this task name with "
            "other data, another model or other experiment definitions, reported separately."
        )
    msl = t["max_stable_lr"]
    rows = [
        "| method | " + " | ".join(f"s = {s}" for s in msl.get("plain", {})) + " |",
        "|---|" + "---|" * len(msl.get("plain", {})),
    ]
    top = t.get("max_stable_lr_at_grid_top", {})
    for method in _methods(msl):
        cells = [
            ("≥ " if s in top.get(method, []) else "") + _fmt(msl[method].get(s))
            for s in msl.get("plain", {})
        ]
        rows.append(f"| {_label(method, t)} | " + " | ".join(cells) + " |")
    parts.append(
        "**Stable learning-rate regime** (max stable lr, full-batch GD; ≥: every grid rate was "
        "stable, so the value is a lower bound):\n\n" + "\n".join(rows)
    )
    for method in _methods(t["expansion_ratio"]):
        if method == "plain":
            continue
        ratios = t["expansion_ratio"][method]
        values = [v for v in ratios.values() if v is not None]
        held = (min(values) > 1.0) if values else None
        if top.get("plain"):  # plain's own range is only bounded below: no verdict
            held = None
        parts.append(
            f"- {_label(method, t)}: expansion ratio "
            + ", ".join(f"{_ratio(t, method, s, v)} at s = {s}" for s, v in ratios.items())
            + f". Claim (1), a wider stable range at every s: **{_claim(held)}**."
        )
    parts.append(f"![stability]({figures['stability']})")
    drift = t["drift_suppression"]
    if drift:
        lines = []
        for method in _methods(drift):
            values = [v for v in drift[method].values() if v is not None]
            held = (min(values) > 1.0) if values else None
            lines.append(
                f"- {_label(method, t)}: "
                + ", ".join(f"{o}: {_fmt(v)}" for o, v in drift[method].items())
                + f". Claim (2), less scale drift than plain: **{_claim(held)}**."
            )
        parts.append(
            "**Scale drift** (final RMS log-ratio of plain / method, at the largest "
            "lr stable for plain, s = 0):\n\n" + "\n".join(lines)
        )
        if "drift" in figures:
            parts.append(f"![drift]({figures['drift']})")
    change = t.get("balance_function_change")
    loss = t["final_train_loss"]
    lines = []
    for method in _methods(loss):
        if method == "plain" or not loss[method]:
            continue
        pairs = [(lr, v, loss.get("plain", {}).get(lr)) for lr, v in loss[method].items()]
        ratios = [v / p for _, v, p in pairs if p]
        lines.append(
            f"- {_label(method, t)}: final training loss / plain's, over the {len(ratios)} "
            f"learning rates stable for both: {_fmt(min(ratios))} to {_fmt(max(ratios))}"
            if ratios
            else f"- {_label(method, t)}: no learning rate stable for both"
        )
    held = None if change is None else change <= 1e-10
    parts.append(
        "**Expressivity**: `balance_` applied to every trained plain network changed its "
        f"outputs by at most {_fmt(change)} (relative, float64): claim (3), the representable "
        f"functions are identical, **{_claim(held)}**.\n\n" + "\n".join(lines)
    )
    return "\n\n".join(parts)
