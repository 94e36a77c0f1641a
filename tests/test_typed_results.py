"""Typed results end to end: runs read back from the store as typed records, ``summary.json``
produced from typed records whose schema is the one the documentation shows, the analyses'
declared interface and the method names."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
from pathlib import Path

import pytest

from gaugefix.experiments import plan
from gaugefix.experiments.analyses import ANALYSES, Analysis
from gaugefix.experiments.engine import METHODS
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Record, Store, StoredRun
from gaugefix.experiments.summary import Summary, schema_markdown, summarize
from runs import run_result as _run
from schema import problems

DOCS = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"


def _store(tmp_path: Path) -> Store:
    """Full-batch and mini-batch runs of two methods and two seeds, the mini-batch ones at two
    step counts: every section of a regime, and a horizon, has something to summarise."""
    store = Store(tmp_path / "results.sqlite")
    for method, top in (("plain", 0.2), ("balance", 0.4)):
        for lr in (0.1, 0.2, 0.4, 0.8):
            for seed in (0, 1):
                store.add_run(_run(method, lr, top, seed=seed), 1.0)
                store.add_run(_run(method, lr, top, 10, 4, seed), 1.0)
                store.add_run(_run(method, lr, top / 2, 100, 4, seed), 1.0)
    return store


def test_the_documented_schema_is_the_generated_one():
    docs = DOCS.read_text()
    block = re.search(
        r"<!-- summary schema:[^\n]*-->\n(.*)<!-- end of the summary schema -->", docs, re.S
    )
    assert block is not None
    assert block.group(1) == schema_markdown(), "regenerate with summary.schema_markdown()"


def test_the_published_full_run_summary_conforms_to_the_records():
    """docs/figures/full-summary.json, the full run the README reports, is of today's records
    exactly (no key missing, none extra)."""
    published = json.loads((DOCS.parent / "figures" / "full-summary.json").read_text())
    assert problems(published, Summary) == []


def test_a_summary_conforms_to_its_records(tmp_path):
    summary = summarize(_store(tmp_path), quick=True)
    assert problems(summary, Summary) == []
    regime = summary["tasks"]["t"]["regimes"]["sgd/4/10"]
    for key in ("drift_suppression", "final_train_loss", "final_test_loss", "test_accuracy"):
        assert key in regime  # the optional parts were checked too
    assert summary["tasks"]["t"]["horizons"]["sgd/4"]["methods"]["balance"]["narrowed"] is True


def test_the_check_finds_what_departs_from_the_records(tmp_path):
    summary = summarize(_store(tmp_path), quick=True)
    regime = ("tasks", "t", "regimes", "sgd/4/10")

    def changed(edit) -> list[str]:
        bad = copy.deepcopy(summary)
        edit(_at(bad, regime))
        return problems(bad, Summary)

    assert changed(lambda g: g.pop("lr_grid")) == [
        "$.tasks.t.regimes.sgd/4/10: RegimeSummary lacks 'lr_grid'"
    ]
    assert "has no 'extra'" in changed(lambda g: g.update(extra=1))[0]
    assert "is not float" in changed(lambda g: g["max_stable_lr"]["plain"].update({"0.0": 1}))[0]
    assert changed(lambda g: g["expansion_ratio"]["plain"]["balance"]["0.0"].update(held="yes"))


def _at(value: dict, path: tuple) -> dict:
    for key in path:
        value = value[key]
    return value


def test_runs_read_back_as_the_results_written(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    written = [_run("plain", 0.1, 0.2, seed=1), _run("balance", 0.8, 0.4)]
    nan_start = dataclasses.replace(_run("plain", 0.4, 0.2), initial_loss=math.nan)
    for r in [*written, nan_start]:
        store.add_run(r, 2.5)
    back = store.runs()
    assert all(isinstance(r, StoredRun) for r in back)
    for r, w in zip(back, written, strict=False):
        assert dataclasses.replace(r, curves=w.curves) == StoredRun(
            **{f.name: getattr(w, f.name) for f in dataclasses.fields(w)}, id=r.id, record=r.record
        )
        assert store.curves(r.id) == w.curves
        assert isinstance(r.record, Record) and r.record.seconds == 2.5
    assert math.isnan(back[2].initial_loss)
    assert [r.config for r in store.runs(method="plain")] == [written[0].config, nan_start.config]
    with pytest.raises(ValueError, match=r"not \['status'\]"):
        store.runs(status="stable")


def test_every_analysis_implements_the_declared_interface():
    assert all(isinstance(a, Analysis) for a in ANALYSES)
    assert len({a.KEY for a in ANALYSES}) == len(ANALYSES)
    incomplete = types.SimpleNamespace(KEY="x", SUMMARY=dict, compute=None, summarize=None)
    assert not isinstance(incomplete, Analysis)


def test_the_grids_name_only_defined_methods_with_the_replica_wherever_plain_is():
    full = plan.reproduce_grids(quick=False)
    for grid in (*plan.reproduce_grids(quick=True), *full):
        configs = grid.configs(TaskSpec(grid.task))
        assert {c.method for c in configs} <= set(METHODS)
        for block in grid.blocks if grid in full else ():  # the quick one's not everywhere
            assert ("plain" in block.methods) == ("plain-replica" in block.methods)
        # each seed trains on its own instance of the task
        hashes = {c.seed: c.task_hash for c in configs}
        assert len(set(hashes.values())) == len(hashes)


def test_the_summary_names_the_versions_that_trained_the_runs(tmp_path):
    """Not those of the gaugefix that renders it: a store's runs keep their record."""
    import sqlite3

    store = _store(tmp_path)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET gaugefix_version = '0.0.9', torch_version = '2.0.0'")
        db.execute("UPDATE runs SET gaugefix_version = '0.0.8' WHERE seed = 1")
    summary = summarize(store, quick=False)
    assert summary["gaugefix_version"] == "0.0.8, 0.0.9"
    assert summary["torch_version"] == "2.0.0"
