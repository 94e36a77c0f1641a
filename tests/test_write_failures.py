"""Commands whose output cannot be written: one ``error:`` line naming the file, exit code 2, and
no partial file left (``balance``: tests/test_checkpoint.py)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from faults import full_disk, listing, read_only
from gaugefix.cli import app
from gaugefix.experiments.store import Store, StoreError

cli = CliRunner()


def _one_line_error(result, *messages: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.output
    assert all(m in result.stderr for m in messages), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _sweep(out: Path, data: Path, *args: str):
    grid = ["--steps", "10", "--lr", "0.1", "--out", str(out), *args]
    return cli.invoke(app, ["sweep", "--data", str(data), *grid])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small regression set."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    x = np.random.default_rng(0).normal(size=(32, 3))
    np.savez(path, X=x, y=x[:, :1] ** 2)
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory, data) -> Path:
    """A results directory with a store, its report and figures."""
    out = tmp_path_factory.mktemp("results") / "out"
    result = _sweep(out, data, "--hidden", "8")
    assert result.exit_code == 0, result.output
    return out


def test_report_into_a_read_only_directory(results, tmp_path, monkeypatch):
    out = shutil.copytree(results, tmp_path / "out")
    before = listing(out)
    read_only(monkeypatch, out)
    result = cli.invoke(app, ["report", str(out)])
    # the figures come first, summary.json and report.md last
    _one_line_error(result, f"cannot write {out}/stability-", ".png: Read-only file system")
    assert listing(out) == before


@pytest.mark.parametrize("command", ["report", "sweep"])
def test_a_report_md_that_is_a_directory_is_refused_before_anything_is_written(
    results, tmp_path, data, command
):
    out = shutil.copytree(results, tmp_path / "out")
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    (out / "summary.json").write_text("the previous summary")
    before = listing(out)
    args = {"report": ["report", str(out)], "sweep": ["sweep", "--data", str(data)]}[command]
    grid = ["--steps", "11", "--hidden", "8", "--out", str(out)] if command == "sweep" else []
    result = cli.invoke(app, [*args, *grid])
    _one_line_error(result, f"cannot write {out / 'report.md'}: it is a directory")
    assert listing(out) == before  # no run trained into the store, no summary or figure


def test_a_previous_report_that_is_not_utf8_is_replaced(results, tmp_path):
    out = shutil.copytree(results, tmp_path / "out")
    (out / "old.png").write_bytes(b"a figure only the previous report showed")
    (out / "report.md").write_bytes(b"\xff\xfe\x00 ![old](old.png)")
    result = cli.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text() == (results / "report.md").read_text()
    assert not (out / "old.png").exists()


def test_sweep_on_a_full_disk_leaves_no_partial_figure(tmp_path, monkeypatch, data):
    out = tmp_path / "out"
    full_disk(monkeypatch, out, "*.png*")  # the disk fills at the first figure
    result = _sweep(out, data, "--hidden", "8")
    _one_line_error(result, f"cannot write {out}/stability-", ".png: No space left on device")
    assert not [name for name in listing(out) if ".png" in name]
    assert len(Store(out / "results.sqlite").runs()) == 1  # the run itself is stored


def test_sweep_into_a_full_store(results, tmp_path, monkeypatch, data):
    out = shutil.copytree(results, tmp_path / "out")
    with sqlite3.connect(out / "results.sqlite") as db:
        db.execute("VACUUM")  # no free pages: the next run needs a new one
    before = listing(out)
    real = Store._connect

    def full(self: Store) -> sqlite3.Connection:  # SQLite's own "database or disk is full"
        db = real(self)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        return db

    monkeypatch.setattr(Store, "_connect", full)
    result = _sweep(out, data, "--hidden", "8", "--seeds", "20")
    _one_line_error(result, f"cannot write {out / 'results.sqlite'}: database or disk is full")
    assert listing(out) == before


def test_sweep_into_a_read_only_store_says_read_only(results, tmp_path, monkeypatch, data):
    out = shutil.copytree(results, tmp_path / "out")
    before = listing(out)
    real = sqlite3.connect

    def read_only_file(path, *args, **kwargs):  # SQLite opens a file it may not write read-only
        if Path(path) == out / "results.sqlite":
            path, kwargs = f"{Path(path).resolve().as_uri()}?mode=ro", {**kwargs, "uri": True}
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_file)
    result = _sweep(out, data, "--hidden", "8", "--seeds", "2")
    _one_line_error(result, f"cannot write {out / 'results.sqlite'}: it is read-only")
    assert "not a readable" not in result.stderr
    assert listing(out) == before


def test_a_read_only_store_is_refused_when_opened(results, tmp_path, monkeypatch):
    """Before any work is done for it (reproduce computes analyses before its first write)."""
    out = shutil.copytree(results, tmp_path / "out")
    before = listing(out)
    real = sqlite3.connect

    def read_only_file(path, *args, **kwargs):  # as SQLite opens a file it may not write
        path, kwargs = f"{Path(path).resolve().as_uri()}?mode=ro", {**kwargs, "uri": True}
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_file)
    with pytest.raises(StoreError, match="results.sqlite: it is read-only"):
        Store(out / "results.sqlite")
    assert listing(out) == before


def test_inspect_save_that_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    before = listing(tmp_path)
    for path, why in (
        (tmp_path / "a-dir", "it is a directory"),
        (tmp_path / "a-file" / "s.json", "Not a directory"),
        (tmp_path / "ro" / "s.json", "Read-only file system"),
    ):
        result = cli.invoke(app, ["inspect", "mlp", "--save", str(path)])
        _one_line_error(result, f"cannot write {path}: {why}")
    assert listing(tmp_path) == before
