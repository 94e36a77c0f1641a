"""What a user reads: report figures, titles, summary values, progress and ``--help``."""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import gaugefix.report as report
from gaugefix.cli import app
from gaugefix.experiments import conditioning, drift, relaxation, stability
from gaugefix.experiments.cells import Regime, by_regime
from gaugefix.experiments.conditioning import sharpness_training
from gaugefix.experiments.engine import METHODS, OPTIMIZERS, RunConfig, RunResult
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.summary import task_summary
from gaugefix.experiments.tasks import BUILTIN, load_task
from gaugefix.zoo import EXAMPLES

cli = CliRunner()


def _run(method: str, lr: float, status: str, s: float = 0.0, seed: int = 0) -> RunResult:
    config = RunConfig("t", method, "gd", lr, 0.0, s, seed, 0, 10, task_hash="h")
    diverged = status == "diverged"
    final = None if diverged else 0.5
    return RunResult(
        config,
        status,
        1.0,
        1.0,
        final,
        None,
        None,
        None,
        1.0,
        None,
        3 if diverged else None,
        2e3 if diverged else 1.0,
    )


def test_expansion_ratio_is_unknown_where_the_reference_reached_the_grid_top():
    """Plain stable up to the grid's top at s = 1: its range, so every ratio there, is
    unknown; at s = 0 the ratio is known, and a lower bound where exact reached the top: 0.4
    over plain's edge, the midpoint 0.2 sqrt(2) of its bracket."""
    runs = [_run("plain", lr, "stable" if lr < 0.4 else "diverged") for lr in (0.1, 0.2, 0.4)]
    runs += [_run("exact", lr, "stable") for lr in (0.1, 0.2, 0.4)]
    runs += [_run(m, lr, "stable", s=1.0) for m in ("plain", "exact") for lr in (0.1, 0.2, 0.4)]
    t = task_summary(runs)
    ratios = t["regimes"]["gd/full/10"]["expansion_ratio"]["plain"]["exact"]
    root2 = pytest.approx(math.sqrt(2), rel=1e-12)
    assert ratios["0.0"] == {
        "min": root2,
        "median": root2,
        "max": root2,
        "seeds": 1,
        "unknown_seeds": 0,
        "lower_bound": True,
        "interval": [root2, root2],
        "held": True,
    }
    assert ratios["1.0"]["median"] is None and ratios["1.0"]["unknown_seeds"] == 1
    assert ratios["1.0"]["held"] is None
    g = t["regimes"]["gd/full/10"]
    assert "final_test_loss" not in g and "test_accuracy" not in g  # no test split
    summary = {"tasks": {"t": t}, "verdicts": stability.count_verdicts({"t": t})}
    table = report.headline_table(summary)
    assert "| t | full-batch gd, 10 steps | exact | 0: ≥ 1.41 ✓; 1: n/a ? | - |" in table
    # the expansion at s = 0 held; the drift suppression (equal drift: ratio 1) did not
    assert "The report makes 2 verdicts, 1 of them held." in table
    assert "No sham control (weight-decay, plain-replica) made an expansion verdict." in table


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _assert_labels_clear(fig) -> None:
    """No axis label of ``fig`` overlaps a tick label, and no label or tick label of one axes
    reaches into another axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    def ticks(ax) -> list:
        return [
            t.get_window_extent(renderer)
            for axis in (ax.xaxis, ax.yaxis)
            for t in axis.get_ticklabels(which="both")
            if t.get_visible() and t.get_text()
        ]

    for ax in fig.axes:
        labels = [
            (label.get_text(), label.get_window_extent(renderer))
            for label in (ax.xaxis.label, ax.yaxis.label)
            if label.get_text()
        ]
        for text, box in labels:
            assert not any(_overlaps(box, t) for t in ticks(ax)), text
        texts = labels + [("tick label", t) for t in ticks(ax)]
        for other in fig.axes:
            if other is not ax:
                frame = other.get_window_extent(renderer)
                for text, box in texts:
                    assert not _overlaps(box, frame), text


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    """A small sweep with every method and two optimizers, and the analyses of the quick run."""
    out = tmp_path_factory.mktemp("results")
    for optimizer in ("gd", "adam"):  # per-layer-lr is not defined for Adam
        methods = [m for m in METHODS if optimizer == "gd" or not METHODS[m].per_layer_lr]
        args = ["sweep", "--task", "teacher-student", "--method", ",".join(methods)]
        args += ["--optimizer", optimizer, "--lr", "0.01,0.05", "--steps", "5", "--out", str(out)]
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
    return out


def test_sweep_report_is_titled_by_what_made_it(quick_results: Path):
    text = (quick_results / "report.md").read_text()
    assert text.startswith("# gaugefix sweep of teacher-student\n")
    assert "reproduction" not in text.splitlines()[0]


def test_drift_figure_has_one_legend_with_every_method(quick_results, captured_figures):
    from gaugefix.experiments.store import Store

    captured = captured_figures
    store = Store(quick_results / "results.sqlite", readonly=True)
    regimes = {}
    for regime, runs in by_regime(store.runs()).items():
        chosen = stability.at_best_strength(runs)
        regimes[regime] = (drift.summarize(chosen), chosen)
    assert drift.figure(quick_results, store, "teacher-student", regimes)
    (fig,) = captured
    assert fig.get_suptitle().startswith("teacher-student: scale drift")
    (legend,) = fig.legends
    # every method with a run at s = 0 and its regime's drift rate that did not diverge (at 30
    # times plain's rate on the first layer, per-layer-lr can), in the order of METHODS
    drawn = {
        r.config.method
        for entry, runs in regimes.values()
        for r in runs
        if r.config.s == 0.0 and r.config.lr == entry.get("drift_lr") and r.status != "diverged"
    }
    assert len(drawn) >= len(METHODS) - 1
    assert [t.get_text() for t in legend.get_texts()] == [m for m in METHODS if m in drawn]
    assert all(ax.get_legend() is None for ax in fig.axes)
    # one color per method in every panel
    colors: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colors.setdefault(line.get_label(), set()).add(line.get_color())
    assert all(len(c) == 1 for c in colors.values()) and len(colors) == len(drawn)
    _assert_labels_clear(fig)


def test_analysis_figures_keep_axis_labels_clear_of_tick_labels(tmp_path, captured_figures):
    task = load_task("teacher-student")
    captured = captured_figures
    relaxed = {
        "predicted_rates": [0.39, 0.6, 1.2],
        "measured_rates": [0.38, 0.58, 1.1],
        "times": [0.0, 0.05, 0.1, 0.15],
        "measured_norm": [4.12, 3.97, 3.83, 3.69],
        "predicted_norm": [4.12, 3.96, 3.81, 3.67],
        "max_relative_error": 0.07,
        "steps": 30,
        "strength": 1.0,
        "fall": 0.9,
    }
    relaxation.render(tmp_path, {"teacher-student": relaxed})
    init = {"by_s": {"-1.0": 31.0, "0.0": 9.3, "1.0": 34.0}, "balanced": 2.9}
    train = sharpness_training(task, 0.09, 1.0, 4, 2)
    conditioning.render(tmp_path, {"teacher-student": {"init": init, "train": train}})
    assert len(captured) == 2
    for fig in captured:
        _assert_labels_clear(fig)


def test_sharpness_legend_leaves_the_two_over_lr_line_clear(tmp_path, captured_figures):
    captured = captured_figures
    init = {"by_s": {"-1.0": 31.0, "0.0": 9.3, "1.0": 34.0}, "balanced": 2.9}
    # 2/lr = 22 lies among the sharpness curves, where a legend in the panel would fall
    curves = {"plain": (31, 30, 10, 4.9), "balanced-init": (3, 3, 3, 3), "exact": (31, 31, 2, 1.8)}
    train = {"lr": 0.09, "s": 1.0, "two_over_lr": 2 / 0.09}
    train |= {m: [(4 * i, 0.1, v) for i, v in enumerate(c)] for m, c in curves.items()}
    conditioning.render(tmp_path, {"teacher-student": {"init": init, "train": train}})
    (fig,) = captured
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    panels = [ax for ax in fig.axes if any(line.get_label() == "2 / lr" for line in ax.lines)]
    assert panels and legends
    for ax in panels:
        frame = ax.get_window_extent(renderer)
        assert not any(_overlaps(frame, legend.get_window_extent(renderer)) for legend in legends)
    labels = [text.get_text() for legend in legends for text in legend.get_texts()]
    assert {"plain", "balanced-init", "exact", "2 / lr"} <= set(labels)


def _empty_parts(text: str) -> list[str]:
    """Headings with nothing under them before the next heading of the same or a higher level,
    lead-ins (``**...**...:``) followed by nothing, and tables without rows."""
    blocks = [b.strip() for b in text.split("\n\n")] + [""]
    empty = []
    for k, block in enumerate(blocks[:-1]):
        following = blocks[k + 1]
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            nested = following.startswith("#" * (level + 1))
            if not following or (following.startswith("#") and not nested):
                empty.append(block)
        elif block.startswith("**") and block.endswith(":"):
            if not following or following.startswith(("#", "**", "![")):
                empty.append(block)
        if block.startswith("|") and block.splitlines()[-1].startswith("|---"):
            empty.append(block)
    return empty


def test_a_report_of_plain_runs_only_has_no_empty_section(tmp_path):
    out = tmp_path / "plain"
    args = ["sweep", "--task", "teacher-student", "--lr", "0.05,0.1", "--steps", "20"]
    result = cli.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "drift-teacher-student.png" in text  # plain's drift, with nothing to compare
    assert _empty_parts(text) == []
    assert "No comparison: the runs hold no method besides the references" in text


def test_the_quick_results_report_has_no_empty_section(quick_results):
    assert _empty_parts((quick_results / "report.md").read_text()) == []


def test_empty_parts_are_found():
    text = "# a\n\n## b\n\n**lead**:\n\n\n\n![x](x.png)\n\n| h |\n|---|\n\n## c\n\ntext\n"
    assert _empty_parts(text) == ["**lead**:", "| h |\n|---|"]  # "## b" holds the lead-in


def test_a_report_removes_the_figures_only_its_previous_report_showed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3))
    np.savez(tmp_path / "d.npz", X=x, y=x[:, :1] ** 2)
    out = tmp_path / "out"
    args = ["sweep", "--data", str(tmp_path / "d.npz"), "--steps", "10", "--out", str(out)]
    assert cli.invoke(app, [*args, "--hidden", "8"]).exit_code == 0
    first = report.figures_shown((out / "report.md").read_text())
    assert "stability-d-gd-full-10.png" in first
    mine = {"notes.png", "stability-mine.png", "drift-d-old.png"}  # a user's files
    for name in mine:
        (out / name).write_bytes(b"mine")
    result = cli.invoke(app, [*args, "--hidden", "16"])  # another task hash: names get @HASH
    assert result.exit_code == 0, result.output
    shown = report.figures_shown((out / "report.md").read_text())
    assert shown and not shown & first and all("@" in name for name in shown)
    assert {p.name for p in out.glob("*.png")} == shown | mine
    assert all((out / name).read_bytes() == b"mine" for name in mine)


def test_stability_figure_keeps_labels_clear(quick_results, captured_figures):
    from gaugefix.experiments.store import Store

    captured = captured_figures
    runs = Store(quick_results / "results.sqlite", readonly=True).runs()
    for regime, regime_runs in by_regime(runs).items():
        chosen = stability.at_best_strength(regime_runs)
        stability.stability_map(quick_results, "teacher-student", regime, chosen)
    assert len(captured) == 2  # gd and adam
    for fig in captured:
        _assert_labels_clear(fig)


def test_a_stability_map_says_where_a_method_did_not_run(quick_results, captured_figures):
    """A map whose methods ran at every s and rate has no blank cell to explain; with a rate
    one method did not run (as a window's floor leaves out) its title says white is not run."""
    from gaugefix.experiments.store import Store

    captured = captured_figures
    runs = Store(quick_results / "results.sqlite", readonly=True).runs()
    regime, regime_runs = next(iter(by_regime(runs).items()))
    chosen = stability.at_best_strength(regime_runs)
    lowest, method = min((r.config.lr, r.config.method) for r in chosen)
    floored = [r for r in chosen if (r.config.lr, r.config.method) != (lowest, method)]
    stability.stability_map(quick_results, "teacher-student", regime, chosen)
    stability.stability_map(quick_results, "teacher-student", regime, floored)
    whole, gapped = (fig.get_suptitle() for fig in captured)
    assert "not run" not in whole and gapped.endswith("(x: some seed diverged; white: not run)")


def test_balanced_start_figure_keeps_labels_clear(quick_results, captured_figures):
    from gaugefix.experiments.store import Store

    captured = captured_figures
    t = task_summary(Store(quick_results / "results.sqlite", readonly=True).runs())
    regimes = {Regime.parse(k): g for k, g in t["regimes"].items()}
    assert stability.balanced_start_figure(quick_results, "teacher-student", regimes)
    (fig,) = captured
    _assert_labels_clear(fig)


def test_sharpness_training_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # torch scripts its forward-mode decompositions on the first jvp of a process and warns
        # that torch.jit.script is deprecated: torch's own warning, not gaugefix's.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
        sharpness_training(load_task("teacher-student"), 0.05, 1.0, 2, 1)


def test_user_data_without_a_test_split_reports_no_test_metric(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    np.savez(tmp_path / "plain.npz", X=x, y=(x[:, 0] > 0).astype(np.int64))
    np.savez(
        tmp_path / "split.npz",
        X=x[:30],
        y=(x[:30, 0] > 0).astype(np.int64),
        X_test=x[30:],
        y_test=(x[30:, 0] > 0).astype(np.int64),
    )
    for name, tested in (("plain", False), ("split", True)):
        out = tmp_path / name
        args = ["sweep", "--data", str(tmp_path / f"{name}.npz"), "--task-type"]
        args += ["classification", "--steps", "60", "--lr", "0.5", "--out", str(out)]
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
        t = json.loads((out / "summary.json").read_text())["tasks"][name]
        g = t["regimes"]["gd/full/60"]
        assert g["max_stable_lr"]["plain"] == {"0.0": 0.5}
        assert ("final_test_loss" in g) == tested and ("test_accuracy" in g) == tested
        from gaugefix.experiments.store import Store

        (run,) = Store(out / "results.sqlite").runs()
        assert (run.test_loss is not None) == tested
        assert (run.test_accuracy is not None) == tested


def test_plain_progress_lines_keep_coming_while_nothing_is_reported(capsys):
    progress = Progress(3, unit="analyses", every=0.05)
    progress.update(done=1, label="relaxation/teacher-student")
    lines: list[str] = []
    for _ in range(600):  # until the ticker printed twice (at most 30 s)
        lines += capsys.readouterr().err.splitlines()
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    progress.close()
    assert len(lines) >= 2
    assert all(
        line.startswith("[gaugefix] relaxation/teacher-student: 1/3 analyses") for line in lines
    )


@pytest.mark.parametrize(
    "command, names",
    [
        ("sweep", [*BUILTIN, *METHODS, *OPTIMIZERS]),
        ("reproduce", [*BUILTIN, *METHODS, *OPTIMIZERS]),
        ("inspect", list(EXAMPLES)),
    ],
)
def test_help_lists_the_built_in_choices(command, names):
    result = cli.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


def test_every_method_has_a_color_of_its_own():
    from matplotlib.colors import to_hex

    from gaugefix.experiments.engine import METHODS
    from gaugefix.experiments.figures import method_color

    colors = {to_hex(method_color(m)) for m in METHODS}
    assert len(colors) == len(METHODS)
    assert method_color("no such method") == "k"


@pytest.mark.parametrize("panels", [1, 4])
def test_a_figure_s_legend_fits_its_width(panels):
    """Below a one-panel figure the legend wraps into rows within the figure's width (it ran
    past both edges in one row of 8); below a wide one it keeps one row of 8."""
    from gaugefix.experiments.figures import LEGEND_COLUMNS, legend_below, subplots

    fig, axes = subplots(1, panels, figsize=(3.6 * panels, 3), squeeze=False, layout="constrained")
    labels = [f"method-number-{k}" for k in range(LEGEND_COLUMNS)]
    handles = [axes[0][0].plot([0, 1], [k, k])[0] for k in range(len(labels))]
    legend_below(fig, handles, labels)
    (legend,) = fig.legends
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).width <= fig.bbox.width
    assert (legend._ncols < LEGEND_COLUMNS) == (panels == 1)
