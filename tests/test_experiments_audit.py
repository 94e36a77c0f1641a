"""The store and the report under a hostile user: results read back as written, a report
after a writer was killed midway, a sweep writing while a report is made, a report that fails
halfway, and non-finite numbers in ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import gaugefix.report as report
from faults import full_disk, listing
from gaugefix.cli import app
from gaugefix.experiments.engine import CurvePoint, RunResult
from gaugefix.experiments.store import Store, StoreError
from runs import run_result

cli = CliRunner()


def _run(task: str, lr: float, seed: int = 0, test_loss: float | None = 0.3) -> RunResult:
    """A run of ``task`` stable up to lr 0.1 and diverged above."""
    return run_result("plain", lr, 0.1, seed=seed, task=task, test_loss=test_loss)


def _store(out: Path, runs: list[RunResult]) -> Store:
    store = Store(out / "results.sqlite")
    for r in runs:
        store.add_run(r, 1.0)
    return store


def _same(a: object, b: object) -> bool:
    """Equal, a NaN equal to a NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_nan_inf_and_none_results_read_back_as_written(tmp_path):
    """Every value reads back as written, but for a NaN in a field that may be ``None``, which
    reads back as ``None`` (not measured: SQLite stores a NaN as ``NULL``)."""
    written = dataclasses.replace(
        _run("NaN", 0.1),  # a task (a data file) called NaN keeps its name
        test_loss=math.nan,
        accuracy=math.inf,
        test_accuracy=None,
        log_ratio_rms=-math.inf,
        mu_rel_max=math.nan,
        balance_change=math.nan,
        initial_loss=math.nan,
        curves=[CurvePoint(0, math.inf, math.nan, -math.inf)],
    )
    store = _store(tmp_path, [written])
    (back,) = store.runs()
    unmeasured = {"test_loss", "mu_rel_max", "balance_change"}  # may be None: NaN reads as None
    for field in dataclasses.fields(RunResult):
        if field.name in unmeasured:
            assert getattr(back, field.name) is None, field.name
        elif field.name != "curves":
            assert _same(getattr(back, field.name), getattr(written, field.name)), field.name
    assert repr(store.curves(back.id)) == repr(written.curves)


# A writer that dies (as a SIGKILL would end it) in the middle of a large transaction: its journal
# is left hot, and the database file holds pages of the transaction it never committed.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("PRAGMA cache_size = 1")  # the transaction spills into the database file
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM curves")
    db.execute("DELETE FROM runs")
    for i in range(500):
        db.execute(
            "INSERT INTO analyses VALUES (?, ?, 0, 'x', 'y', 'z')", (f"junk/{i}", "v" * 4000)
        )
    os._exit(9)
    """
)


def _killed_midway(out: Path) -> None:
    path = out / "results.sqlite"
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], check=False)
    assert (out / "results.sqlite-journal").exists()


def test_a_report_after_a_writer_was_killed_midway_reads_the_last_commit(tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "out"
    runs = [_run("t", lr, seed) for lr in (0.1, 0.2) for seed in (0, 1)]
    _store(whole, runs)
    _store(out, runs)
    assert cli.invoke(app, ["report", str(whole)]).exit_code == 0
    _killed_midway(out)
    result = cli.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text() == (whole / "report.md").read_text()
    assert len(Store(out / "results.sqlite", readonly=True).runs()) == len(runs)


def test_a_killed_writer_s_store_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _store(out, [_run("t", 0.1)])
    _killed_midway(out)
    before = listing(out)
    real = sqlite3.connect

    def read_only_file(path, *args, **kwargs):  # as SQLite opens a file it may not write
        if not str(path).startswith("file:") and str(path) != ":memory:":
            path, kwargs = f"{Path(path).resolve().as_uri()}?mode=ro", {**kwargs, "uri": True}
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_file)
    result = cli.invoke(app, ["report", str(out)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: cannot read {out / 'results.sqlite'}: a process writing it")
    assert listing(out) == before


def test_a_report_reads_one_state_of_a_store_another_sweep_writes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _store(out, [_run("t", lr) for lr in (0.1, 0.2)])
    real = report.summarize

    def meanwhile(store: Store, quick: bool) -> dict:  # another sweep writes another task
        summary = real(store, quick)
        Store(out / "results.sqlite").add_run(_run("u", 0.1), 1.0)
        return summary

    monkeypatch.setattr(report, "summarize", meanwhile)
    summary = report.render(out)
    assert set(summary["tasks"]) == {"t"} and summary["runs"] == 2
    assert json.loads((out / "summary.json").read_text())["runs"] == 2
    text = (out / "report.md").read_text()
    assert "## t" in text and "## u" not in text and "2 runs" in text
    monkeypatch.setattr(report, "summarize", real)
    assert set(report.render(out)["tasks"]) == {"t", "u"}  # the next report has it


def test_a_report_that_fails_halfway_leaves_summary_and_report_as_they_were(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _store(out, [_run("t", lr) for lr in (0.1, 0.2)])
    report.render(out)
    _store(out, [_run("t", lr, seed=1) for lr in (0.1, 0.2)])  # a later sweep's runs
    before = {name: (out / name).read_bytes() for name in ("summary.json", "report.md")}
    full_disk(monkeypatch, out, "*.png*")  # the disk fills at the first figure
    with pytest.raises(OSError, match="No space left on device"):
        report.render(out)
    assert {name: (out / name).read_bytes() for name in before} == before


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_json_with_null_for_what_is_not_finite(tmp_path):
    out = tmp_path / "out"
    runs = [_run("t", lr, seed, test_loss=math.inf) for lr in (0.1, 0.2) for seed in (0, 1)]
    _store(out, [*runs, *(dataclasses.replace(r, config=dataclasses.replace(
        r.config, method="balanced-init")) for r in runs)])  # fmt: skip
    summary = report.render(out)
    medians = summary["tasks"]["t"]["regimes"]["sgd/full/10"]["final_test_loss"]["medians"]
    assert medians["plain"]["0.1"] == math.inf  # the number the report was made from
    written = _strict((out / "summary.json").read_text())
    regime = written["tasks"]["t"]["regimes"]["sgd/full/10"]
    assert regime["final_test_loss"]["medians"]["plain"]["0.1"] is None


def test_a_snapshot_is_never_written(tmp_path):
    store = _store(tmp_path, [_run("t", 0.1)]).snapshot()
    with pytest.raises(StoreError, match="read-only"):
        store.add_run(_run("t", 0.2), 1.0)
    assert len(store.runs()) == 1
    assert len(store.snapshot().runs()) == len(store.runs()) == 1  # a copy of a copy


def test_a_sweep_into_a_non_ascii_directory_with_uri_characters(tmp_path):
    data = tmp_path / "données.npz"
    x = np.random.default_rng(0).normal(size=(24, 3))
    np.savez(data, X=x, y=x[:, :1] ** 2)
    out = tmp_path / "résultats ü ?#%20"
    args = ["sweep", "--data", str(data), "--hidden", "8", "--steps", "3", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert cli.invoke(app, ["report", str(out)]).exit_code == 0
    assert len(Store(out / "results.sqlite", readonly=True).runs()) == 1
    shutil.rmtree(out)
