"""Scale drift: how far each method lets the network wander from balance (the final RMS
log-ratio against the reference's, at the reference's largest stable rate, s = 0), how many runs
diverge late (after the first tenth of their steps, as drift accumulates), and the figure of the
imbalance over the steps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, TypedDict

from gaugefix.experiments import figures
from gaugefix.experiments.cells import MethodKey, Regime, Runs, reference
from gaugefix.experiments.figures import fmt, methods_in_order
from gaugefix.experiments.stability import (
    RatioStats,
    max_stable_lr,
    ratio_stats,
    ratio_text,
    verdict_text,
)
from gaugefix.experiments.store import Store, StoredRun

__all__ = ["DEFINITION", "DriftSummary", "figure", "render", "summarize"]

DEFINITION = (
    "*Drift suppression*: per seed, the final RMS log-ratio of the reference (plain, or "
    "balanced-init where a regime has no plain) over the method's, at the reference's largest "
    "learning rate stable for every seed, s = 0; median [min, max] over seeds, claim (2) held "
    "when the paired bootstrap interval's lower end is above 1, as for expansion ratios. A "
    "*late divergence* is a run that diverged after the first tenth of its steps."
)


class _LateDivergences(TypedDict):
    late_divergences: Annotated[
        dict[MethodKey, list[int]], "[late, alive after the first tenth of the steps]"
    ]


class DriftSummary(_LateDivergences, total=False):
    """The drift entries of a regime (:func:`summarize`); the suppression only where the
    reference has a stable rate at s = 0."""

    drift_reference: Annotated[str, "the method compared with: plain, else balanced-init"]
    drift_lr: float
    drift_suppression: Annotated[
        dict[MethodKey, RatioStats],
        "per seed, the reference's final RMS log-ratio over the method's",
    ]


def drift_lr(runs: Runs) -> float | None:
    """The learning rate of the drift comparison (``runs``: one regime's at best strength)."""
    ref = reference(runs)
    if ref is None:
        return None
    lr = max_stable_lr([r for r in runs if r.config.method == ref and r.config.s == 0.0])
    return lr or None


def late_divergences(runs: Runs) -> dict[str, list[int]]:
    """Per method: ``[late, alive]``, the runs that diverged after the first tenth of their
    steps and the runs still alive at that point."""
    out: dict[str, list[int]] = {}
    for r in runs:
        tenth = r.config.steps // 10
        alive = r.diverged_at is None or r.diverged_at > tenth
        counts = out.setdefault(r.config.method, [0, 0])
        counts[0] += alive and r.diverged_at is not None
        counts[1] += alive
    return dict(sorted(out.items()))


def summarize(runs: Runs) -> DriftSummary:
    """The drift entries of one regime's summary (``runs`` at each method's best strength):
    the late divergences and, where the reference has a stable rate at s = 0, the drift
    suppression of every other method as per-seed ratios (:func:`ratio_stats`)."""
    out = DriftSummary(late_divergences=late_divergences(runs))
    lr = drift_lr(runs)
    if lr is None:
        return out
    ref = reference(runs)
    final: dict[str, dict[int, float | None]] = defaultdict(dict)
    for r in runs:
        if r.config.s == 0.0 and r.config.lr == lr:
            final[r.config.method][r.config.seed] = r.log_ratio_rms
    suppression = {}
    for method in sorted(set(final) - {ref}):
        ratios = {
            seed: base / value if base is not None and value else None
            for seed, base in final[ref].items()
            for value in [final[method].get(seed)]
        }
        suppression[method] = ratio_stats(ratios)
    out.update(drift_reference=ref, drift_lr=lr, drift_suppression=suppression)
    return out


def render(entry: dict[str, Any], label: Any) -> str:
    """The drift paragraph of one regime (``label(method)``: a method with its strength)."""
    parts = []
    if entry.get("drift_suppression"):  # some method besides the reference
        ref = entry["drift_reference"]
        suppression = entry["drift_suppression"]
        lines = [
            f"- {label(m)}: {ratio_text(suppression[m])}, {verdict_text(suppression[m])}"
            for m in methods_in_order(suppression)
        ]
        parts.append(
            f"**Scale drift** (per-seed ratio of the final RMS log-ratio, {ref}'s / the "
            f"method's, at lr {fmt(entry['drift_lr'])}, s = 0: median [min, max] over seeds; "
            f"claim (2), less drift than {ref}, held only if the paired bootstrap interval lies "
            "above 1):\n\n" + "\n".join(lines)
        )
    late = entry["late_divergences"]
    if any(k for k, _ in late.values()):
        parts.append(
            "**Late divergences** (runs that diverged after the first tenth of their steps, of "
            "those alive then): "
            + ", ".join(f"{label(m)} {late[m][0]} of {late[m][1]}" for m in methods_in_order(late))
            + "."
        )
    else:
        parts.append("**Late divergences**: none.")
    return "\n\n".join(parts)


def figure(
    out: Path, store: Store, task: str, regimes: dict[Regime, tuple[dict, list[StoredRun]]]
) -> str | None:
    """RMS log-ratio and ``max |mu| / S`` over the steps at each regime's drift learning rate,
    s = 0, the regime's first seed (a method whose run of that seed diverged is not drawn);
    one panel per regime, one color per method, one legend, titled by the task."""
    panels = [(g, entry, runs) for g, (entry, runs) in regimes.items() if "drift_lr" in entry]
    if not panels:
        return None
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, grid = figures.subplots(
        2 * rows, cols, figsize=(3.6 * cols, 5.4 * rows), squeeze=False, layout="constrained"
    )
    for k in range(len(panels), rows * cols):  # the unused places of the last row
        grid[2 * (k // cols)][k % cols].set_visible(False)
        grid[2 * (k // cols) + 1][k % cols].set_visible(False)
    lines = {}  # method -> a line drawn for it, for the figure's one legend
    for k, (regime, entry, runs) in enumerate(panels):
        top, bottom = grid[2 * (k // cols)][k % cols], grid[2 * (k // cols) + 1][k % cols]
        lr = entry["drift_lr"]
        at = [r for r in runs if r.config.s == 0.0 and r.config.lr == lr]
        first = min(r.config.seed for r in at)
        for method in methods_in_order({r.config.method for r in at}):
            rs = [
                r
                for r in at
                if r.config.method == method and r.config.seed == first and r.status != "diverged"
            ]
            if not rs:
                continue
            curve = store.curves(rs[0].id)
            steps = [p.step for p in curve]
            style = {"color": figures.method_color(method), "label": method}
            lines[method] = top.plot(steps, [p.log_ratio_rms for p in curve], **style)[0]
            bottom.plot(steps, [p.mu_rel_max for p in curve], **style)
        top.set_title(f"{regime.label}\nlr = {fmt(lr)}, seed {first}", fontsize=9)
        top.set_ylabel("RMS log-ratio")
        bottom.set_ylabel("max |mu| / S")
        bottom.set_xlabel("step")
        bottom.set_yscale("log")
        figures.plain_log_ticks(bottom)
    fig.suptitle(f"{task}: scale drift, s = 0", fontsize=10)
    methods = methods_in_order(lines)
    figures.legend_below(fig, [lines[m] for m in methods], methods)
    return figures.save(fig, out, f"drift-{task}.png")
