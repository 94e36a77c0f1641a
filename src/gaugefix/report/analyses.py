"""Figures and paragraphs of experiments 4 (relaxation) and 5 (conditioning)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from gaugefix.experiments.store import Store


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def plain_log_ticks(*axes: Any) -> None:
    """Tick labels of log axes as plain numbers (``4.1``, not ``4.1 x 10^0``); over more than
    a decade, minor ticks are labelled at 2, 3 and 5 times a power of ten only (2 and 5 over
    more than two)."""

    def minor(axis: Any) -> FuncFormatter:
        def label(v: float, _: Any) -> str:
            low, high = axis.get_view_interval()
            keep = (2, 3, 5) if high <= 100 * low else (2, 5)
            mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
            return "" if high > 10 * low and mantissa not in keep else f"{v:g}"

        return FuncFormatter(label)

    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(minor(axis))


def analysis_section(out: Path, store: Store, summary: dict[str, Any]) -> str:
    analyses = store.analyses()
    parts = []
    relax = {k.split("/", 1)[1]: v for k, v in analyses.items() if k.startswith("relaxation/")}
    if relax:
        parts.append(_relaxation(out, relax))
    init = {k.split("/", 1)[1]: v for k, v in analyses.items() if k.startswith("sharpness-init/")}
    train = {k.split("/", 1)[1]: v for k, v in analyses.items() if k.startswith("sharpness-train/")}
    if init or train:
        parts.append(_conditioning(out, init, train))
    return "\n\n".join(parts)


def _relaxation(out: Path, relax: dict[str, Any]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    lines = []
    for task, r in sorted(relax.items()):
        axes[0].loglog(r["predicted_rates"], r["measured_rates"], "o", ms=3, label=task)
        axes[1].semilogy(r["times"], r["measured_norm"], label=f"{task} measured")
        axes[1].semilogy(r["times"], r["predicted_norm"], "--", label=f"{task} predicted")
        err = r["max_relative_error"]
        lines.append(
            f"- {task}: {len(r['predicted_rates'])} modes with at least 1% of the initial "
            f"imbalance, {r['steps']} steps of penalty-only descent (strength {r['strength']}) "
            f"until ||mu|| fell to {r['fall']:g} of its start; maximum relative error of the "
            f"measured decay rates against 2 lambda k_i: **{_fmt(err)}**."
        )
    lo = min(min(r["predicted_rates"]) for r in relax.values() if r["predicted_rates"])
    hi = max(max(r["predicted_rates"]) for r in relax.values() if r["predicted_rates"])
    axes[0].plot([lo, hi], [lo, hi], "k:", lw=1)
    axes[0].set_xlabel("predicted rate 2 lambda k_i")
    axes[0].set_ylabel("measured rate")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("time (step x dt)")
    axes[1].set_ylabel("||mu||")
    axes[1].legend(fontsize=7)
    plain_log_ticks(axes[0], axes[1])
    fig.savefig(out / "relaxation.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return (
        "## Dissipative relaxation\n\nA trained plain network descends the orbit-selection "
        "functional alone; the prediction is "
        "`d mu/dt = -2 lambda K mu` with K frozen at the start (each eigenmode of K decays at "
        "2 lambda k_i). K changes as the representative slides along its orbit, which is where "
        "the prediction is expected to drift over a long horizon.\n\n"
        + "\n".join(lines)
        + "\n\n![relaxation](relaxation.png)"
    )


def _conditioning(out: Path, init: dict[str, Any], train: dict[str, Any]) -> str:
    fig, axes = plt.subplots(
        1,
        1 + len(train),
        figsize=(4.2 * (1 + len(train)), 3.6),
        squeeze=False,
        layout="constrained",
    )
    lines = []
    for task, r in sorted(init.items()):
        s = [float(k) for k in r["by_s"]]
        v = list(r["by_s"].values())
        axes[0][0].semilogy(s, v, "o-", label=task)
        axes[0][0].axhline(r["balanced"], ls=":", color=axes[0][0].lines[-1].get_color())
        best = min(r["by_s"], key=r["by_s"].get)
        held = r["balanced"] <= min(v)
        lines.append(
            f"- {task}: sharpness at initialisation {_fmt(min(v))} (s = {best}) to {_fmt(max(v))}"
            f" over s; at the balanced point {_fmt(r['balanced'])}. Minimal at the balanced "
            f"point: **{'held' if held else 'did not hold'}**."
        )
    axes[0][0].set_xlabel("initial imbalance s")
    axes[0][0].set_ylabel("sharpness at init (dotted: balanced)")
    axes[0][0].legend(fontsize=7)
    for j, (task, r) in enumerate(sorted(train.items()), start=1):
        ax = axes[0][j]
        for method in ("plain", "exact"):
            pts = r.get(method, [])
            ax.semilogy([p[0] for p in pts], [p[2] for p in pts], "o-", ms=3, label=method)
        ax.axhline(r["two_over_lr"], color="k", ls="--", lw=1, label="2 / lr")
        ax.set_title(f"{task}, lr = {r['lr']:.3g}, s = {r['s']}")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        ax.legend(fontsize=7)
        plain_log_ticks(ax)
        finals = {m: (r[m][-1][2] if r.get(m) else None) for m in ("plain", "exact")}
        lines.append(
            f"- {task}, full-batch GD at lr {r['lr']:.3g} from s = {r['s']}: final sharpness "
            f"plain {_fmt(finals['plain'])}, exact {_fmt(finals['exact'])}; 2/lr = "
            f"{_fmt(r['two_over_lr'])}."
        )
    fig.savefig(out / "sharpness.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return (
        "## Conditioning\n\nThe largest Hessian eigenvalue of the training loss (Lanczos on "
        "Hessian-vector products), along the orbit of the initialisation and during training.\n\n"
        + "\n".join(lines)
        + "\n\n![sharpness](sharpness.png)"
    )
