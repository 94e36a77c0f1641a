"""The results store: run keys that cover the data and model, stores of the previous format,
and one-line errors for every store, results directory or structure file that cannot be used."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gaugefix import GaugeStructure
from gaugefix.cli import app
from gaugefix.experiments import engine
from gaugefix.experiments.store import Store, StoreError
from gaugefix.experiments.tasks import load_task

cli = CliRunner()


def _data(path: Path, rows: int, features: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=x, y=(x[:, 0] > 0).astype(np.int64))  # labels or regression targets
    return path


def _sweep(data: Path, out: Path, *extra: str) -> str:
    args = ["sweep", "--data", str(data), "--method", "plain,exact", "--lr", "0.05,0.1"]
    result = cli.invoke(app, [*args, "--steps", "3", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_sweeps_of_other_data_or_models_are_new_runs_kept_apart(tmp_path):
    a = _data(tmp_path / "a" / "reg.npz", 40, 3, 0)
    b = _data(tmp_path / "b" / "reg.npz", 30, 5, 1)
    out = tmp_path / "out"
    assert "4 new runs" in _sweep(a, out)
    assert "4 new runs" in _sweep(b, out)  # same file name, other data
    assert "4 new runs" in _sweep(a, out, "--hidden", "8,8")  # same data, other model
    assert "4 new runs" in _sweep(a, out, "--task-type", "classification")
    assert "0 new runs" in _sweep(a, out)
    copy = tmp_path / "c" / "reg.npz"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    assert "0 new runs" in _sweep(copy, out)  # the same content elsewhere is the same task
    runs = Store(out / "results.sqlite").runs()
    hashes = {r.config.task_hash for r in runs}
    assert len(runs) == 16 and len(hashes) == 4 and {r.config.task for r in runs} == {"reg"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {f"reg@{h[:8]}" for h in hashes}
    assert {t["task_hash"] for t in summary["tasks"].values()} == {h[:8] for h in hashes}
    report = (out / "report.md").read_text()
    assert all(f"## reg@{h[:8]}" in report for h in hashes)


def test_task_hash_covers_data_kind_model_and_definitions(tmp_path, monkeypatch):
    path = _data(tmp_path / "reg.npz", 20, 3, 0)
    base = engine.task_hash(load_task("reg", str(path), "regression", (8,)))
    assert engine.task_hash(load_task("other", str(path), "regression", (8,))) == base
    assert engine.task_hash(load_task("reg", str(path), "regression", (9,))) != base
    assert engine.task_hash(load_task("reg", str(path), "classification", (8,))) != base
    arrays = dict(np.load(path))
    arrays["X"][3, 1] += 1e-3
    np.savez(tmp_path / "nudged.npz", **arrays)
    assert engine.task_hash(load_task("reg", str(tmp_path / "nudged.npz"), None, (8,))) != base
    monkeypatch.setattr(engine, "DEFINITIONS", engine.DEFINITIONS + 1)
    assert engine.task_hash(load_task("reg", str(path), "regression", (8,))) != base


def _earlier_format(out: Path, data: Path, version: int) -> None:
    """A store as an earlier gaugefix wrote it (converted from a current store): format 3 had no
    peak loss ratio nor bisection round; format 2 neither the constant predictor's loss; format
    1 (``user_version`` 0) neither the task hash."""
    _sweep(data, out)
    db = sqlite3.connect(out / "results.sqlite")
    db.execute("UPDATE runs SET gaugefix_version = '0.1.0'")
    for run_id, key in db.execute("SELECT id, key FROM runs").fetchall():
        old = {k: v for k, v in json.loads(key).items() if k != "bisection"}
        db.execute("UPDATE runs SET key = ? WHERE id = ?", (json.dumps(old), run_id))
    db.execute("ALTER TABLE runs DROP COLUMN bisection")
    db.execute("ALTER TABLE runs DROP COLUMN peak_loss_ratio")
    if version < 3:
        db.execute("ALTER TABLE runs DROP COLUMN constant_loss")
    if version == 1:
        for run_id, key in db.execute("SELECT id, key FROM runs").fetchall():
            old = {k: v for k, v in json.loads(key).items() if k != "task_hash"}
            db.execute("UPDATE runs SET key = ? WHERE id = ?", (json.dumps(old), run_id))
        db.execute("ALTER TABLE runs DROP COLUMN task_hash")
    db.execute(f"PRAGMA user_version = {version if version > 1 else 0}")
    db.commit()
    db.close()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("command", ["report", "sweep"])
def test_a_store_of_an_earlier_format_is_one_line_saying_what_to_do(tmp_path, version, command):
    data = _data(tmp_path / "reg.npz", 40, 3, 0)
    out = tmp_path / "out"
    _earlier_format(out, data, version)
    before = _files(out)
    args = {
        "report": ["report", str(out)],
        "sweep": ["sweep", "--data", str(data), "--steps", "3", "--out", str(out)],
    }[command]
    result = cli.invoke(app, args)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {out / 'results.sqlite'} was written by gaugefix 0.1.0 in ")
    assert f"store format {version}," in line and "new results directory" in line
    assert _files(out) == before


def _corrupt(path: Path) -> None:
    Store(path)
    raw = bytearray(path.read_bytes())
    raw[100:4096] = b"\xa5" * (4096 - 100)  # the page of the schema
    path.write_bytes(bytes(raw))


def _foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (x TEXT)")
    db.commit()
    db.close()


def _foreign_same_tables(path: Path) -> None:
    """Another program's database whose tables have a store's names and format number."""
    db = sqlite3.connect(path)
    for table in ("runs", "curves", "analyses"):
        db.execute(f"CREATE TABLE {table} (x TEXT)")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: p.write_text("not a database " * 100),
            "is not a readable gaugefix results store",
        ),
        (_corrupt, "is not a readable gaugefix results store"),
        (_foreign, "is an SQLite file but not a gaugefix results store"),
        (_foreign_same_tables, "not a gaugefix results store (no column runs.key, runs.task,"),
    ],
)
@pytest.mark.parametrize("command", ["report", "sweep", "reproduce"])
def test_a_bad_store_is_one_line_exit_2_and_unchanged(tmp_path, make, message, command):
    out = tmp_path / "out"
    out.mkdir()
    make(out / "results.sqlite")
    before = _files(out)
    args = {
        "report": ["report", str(out)],
        "sweep": ["sweep", "--task", "teacher-student", "--out", str(out)],
        "reproduce": ["reproduce", "--quick", "--out", str(out)],
    }[command]
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {out / 'results.sqlite'}") and message in line
    assert _files(out) == before


def test_bad_results_directories_are_one_line_exit_2(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    directory = tmp_path / "dir"
    (directory / "results.sqlite").mkdir(parents=True)
    for out, message in (
        (a_file, f"error: {a_file} is a file, not a results directory"),
        (a_file / "sub", f"error: cannot create the results directory {a_file / 'sub'}: Not a"),
        (directory, f"error: cannot open {directory / 'results.sqlite'}: it is a directory"),
    ):
        result = cli.invoke(app, ["sweep", "--task", "teacher-student", "--out", str(out)])
        assert result.exit_code == 2
        (line,) = result.output.strip().splitlines()
        assert line.startswith(message), line
    assert a_file.read_text() == "mine"
    assert [p.name for p in directory.iterdir()] == ["results.sqlite"]
    result = cli.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error: no store at" in result.output


def test_store_errors_name_the_file(tmp_path):
    path = tmp_path / "x.sqlite"
    path.write_bytes(b"\x00" * 10 + b"junk" * 300)
    with pytest.raises(StoreError, match=str(path)):
        Store(path)
    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "missing.sqlite", readonly=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{bad", "is not a saved GaugeStructure (not JSON"),
        ("[1, 2]", "not a saved GaugeStructure (a list, not a dict)"),
        ('{"format": "gaugefix.GaugeStructure/1", "params": [{}]}', "a malformed saved"),
        ('{"format": "other"}', "not a saved GaugeStructure (format 'other')"),
        ('{"format": "gaugefix.GaugeStructure/2"}', "a malformed saved"),
        (
            '{"format": "gaugefix.GaugeStructure/2", "num_generators": 1, "params": [{"name":'
            ' "w", "shape": [2], "terms": [{"sign": 1, "index": {"shape": [2], "data": [0, 5]}}'
            ']}], "produced": {}, "excluded": [], "layers": [], "generator_layers": [],'
            ' "generator_kinds": [], "param_order": []}',
            "outside",
        ),
    ],
)
def test_loading_a_malformed_structure_file_is_a_value_error_naming_it(tmp_path, text, message):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)) as err:
        GaugeStructure.load(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_inspect_a_factory_that_needs_arguments_is_one_line():
    result = cli.invoke(app, ["inspect", "torch.nn:Linear", "--input-shape", "1,3"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: calling 'torch.nn:Linear' failed (TypeError")
    assert "without arguments" in line


def test_analyses_are_recomputed_for_another_grid_or_task_hash(tmp_path, monkeypatch):
    from gaugefix.experiments import analyses

    calls: list[str] = []

    def fake(key: str):
        def compute(store, task, quick):
            calls.append(f"{key}/{task.name}")
            return {"task": task.name}

        return compute

    for analysis in analyses.ANALYSES:
        monkeypatch.setattr(analysis, "compute", fake(analysis.KEY))
    store = Store(tmp_path / "results.sqlite")
    analyses.run_analyses(store, quick=True)
    n = len(analyses.ANALYSES)
    assert sorted(calls) == sorted(f"{a.KEY}/teacher-student" for a in analyses.ANALYSES)
    analyses.run_analyses(store, quick=True)
    assert len(calls) == n  # stored for this grid and task: reused
    analyses.run_analyses(store, quick=False)  # the full grid: recomputed, and the deep task
    assert len(calls) == 3 * n and calls[n:].count("relaxation/teacher-student") == 1
    assert analyses.stored(store, analyses.ANALYSES[0]).keys() == {
        "teacher-student",
        "deep-teacher-student",
    }
    monkeypatch.setattr(engine, "DEFINITIONS", engine.DEFINITIONS + 1)
    analyses.run_analyses(store, quick=False)  # other definitions: other task hashes
    assert len(calls) == 5 * n


def _fake_analyses(monkeypatch, events: list) -> None:
    """Every analysis's ``compute`` replaced by one that records its call in ``events``."""
    from gaugefix.experiments import analyses

    def fake(key: str):
        def compute(store, task, quick):
            events.append(("compute", key))
            return {"task": task.name, "key": key, "quick": quick}

        return compute

    for analysis in analyses.ANALYSES:
        monkeypatch.setattr(analysis, "compute", fake(analysis.KEY))


@pytest.mark.parametrize("pool", ["threads", "in-process"])
def test_reproduce_submits_the_analyses_that_read_no_run_before_the_sweep(
    tmp_path, monkeypatch, pool
):
    from concurrent.futures import ThreadPoolExecutor

    from gaugefix.experiments import analyses
    from gaugefix.experiments.workers import InProcess

    events: list = []
    _fake_analyses(monkeypatch, events)

    class Threads:  # stands in for the worker processes: futures that complete later
        width = 2

        def __init__(self) -> None:
            self.pool = ThreadPoolExecutor(2)

        def call(self, fn, *args):
            events.append(("submit", args[0]))
            return self.pool.submit(fn, *args)

    class Recorded(InProcess):
        def call(self, fn, *args):
            events.append(("submit", args[0]))
            return super().call(fn, *args)

    workers = Threads() if pool == "threads" else Recorded()
    store = Store(tmp_path / "results.sqlite")
    put = store.put_analysis
    puts: list[str] = []
    monkeypatch.setattr(
        store, "put_analysis", lambda key, *a, **k: (puts.append(key), put(key, *a, **k))
    )

    before: list[int] = []  # analyses stored when the sweep runs

    def sweep():
        events.append(("sweep",))
        before.append(len(store.analyses()))
        return 7

    assert analyses.beside_sweep(store, True, sweep, workers) == 7
    assert before == [0]  # none stored before the sweep ends
    at = events.index(("sweep",))
    submitted = [e[1] for e in events if e[0] == "submit"]
    early = [e[1] for e in events[:at] if e[0] == "submit"]
    assert early == ["relaxation", "min-sharpness", "dose"]  # their compute reads no run
    assert early == [a.KEY for a in analyses.ANALYSES if not a.READS_RUNS]
    assert submitted[len(early) :] == [a.KEY for a in analyses.ANALYSES if a.READS_RUNS]
    assert sorted(puts) == sorted(f"{a.KEY}/teacher-student" for a in analyses.ANALYSES)
    if pool == "in-process":  # computed at once, before the sweep
        assert [e[1] for e in events[:at] if e[0] == "compute"] == early

    # the same values as run_analyses stores, all at once after the sweep
    reference = Store(tmp_path / "reference.sqlite")
    analyses.run_analyses(reference, quick=True)
    assert store.analyses() == reference.analyses()

    # up to date: the sweep runs again, no analysis is submitted
    events.clear()
    assert analyses.beside_sweep(store, True, sweep, workers) == 7
    assert events == [("sweep",)]
    assert len(puts) == len(analyses.ANALYSES)


def test_an_analysis_declares_whether_it_reads_the_sweep():
    """``READS_RUNS`` is false exactly where ``compute`` never reads its store (the sweep's
    runs), so only analyses independent of the sweep are computed beside it."""
    import dis

    from gaugefix.experiments import analyses

    def reads_store(fn) -> bool:  # loads its local (or enclosed) variable "store"
        variables = ("FAST", "DEREF", "CLOSURE")
        loads = [i for i in dis.get_instructions(fn) if any(v in i.opname for v in variables)]
        return any(
            "store" in (i.argval if isinstance(i.argval, tuple) else (i.argval,)) for i in loads
        )

    for analysis in analyses.ANALYSES:
        assert isinstance(analysis, analyses.Analysis)
        assert analysis.READS_RUNS is reads_store(analysis.compute), analysis.KEY


def test_a_stored_analysis_of_another_version_is_computed_again(tmp_path: Path, monkeypatch):
    """A value stored for the task hash and grid, by an analysis whose ``VERSION`` has since
    been raised, is computed again (a fix to ``compute`` replaces the stored values)."""
    from gaugefix.experiments import analyses, relaxation

    store = Store(tmp_path / "runs.sqlite")
    for key, _, _, made_for in analyses._todo(store, True):
        store.put_analysis(key, {"made_for": made_for}, 0.0, replace=True)
    assert analyses._todo(store, True) == []
    monkeypatch.setattr(relaxation, "VERSION", relaxation.VERSION + 1)
    assert [todo[0] for todo in analyses._todo(store, True)] == ["relaxation/teacher-student"]
