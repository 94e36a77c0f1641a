"""The identity of a stored run: its task hash covers the model's initialisation (PyTorch's
default or a task's own scheme, its dtypes) and the hyperparameters of its modules, not only
their ``repr``, so a resumed sweep never reuses runs of another initialisation; a store written
under the earlier hash is trained anew beside its old runs, which stay apart."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from gaugefix.cli import app
from gaugefix.experiments import engine
from gaugefix.experiments.cells import by_task
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import BUILTIN, MODULUS, LastTokenGPT, Task, he_mlp, load_task
from gaugefix.zoo import mlp

cli = CliRunner()
DEEP_WIDTHS = (64, *[64] * 6, 10)  # deep-mlp-digits' model


def _with_model(task: Task, make_model) -> Task:
    """``task`` with another model factory (its data unchanged)."""
    return dataclasses.replace(task, make_model=make_model)


def test_a_changed_default_initialisation_changes_the_task_hash(monkeypatch):
    """PyTorch's default initialisation of ``nn.Linear`` changed (as between torch releases):
    the same architecture and data start elsewhere, so their runs are other runs."""
    task = BUILTIN["teacher-student"](0)
    before = engine.task_hash(task)
    original = nn.Linear.reset_parameters

    def doubled(self: nn.Linear) -> None:
        original(self)
        with torch.no_grad():
            self.weight.mul_(2.0)

    monkeypatch.setattr(nn.Linear, "reset_parameters", doubled)
    assert engine.task_hash(task) != before


def test_an_initialisation_scheme_changes_the_task_hash():
    """deep-mlp-digits' He initialisation against PyTorch's default on the same MLP (one
    ``repr``): two tasks; the same scheme again is the same task."""
    task = BUILTIN["deep-mlp-digits"](0)
    assert repr(mlp(DEEP_WIDTHS)) == repr(he_mlp(DEEP_WIDTHS))
    same = _with_model(task, lambda: he_mlp(DEEP_WIDTHS))
    assert engine.task_hash(same) == engine.task_hash(task)
    assert engine.task_hash(_with_model(task, lambda: mlp(DEEP_WIDTHS))) != engine.task_hash(task)


def test_the_models_dtype_changes_the_task_hash():
    """A model initialised in float64 (other numbers than float32's) is another task."""
    task = BUILTIN["teacher-student"](0)
    wide = _with_model(task, lambda: task.make_model().to(torch.float64))
    narrow = _with_model(task, lambda: task.make_model().to(torch.float64).to(torch.float32))
    assert engine.task_hash(wide) != engine.task_hash(task)
    assert engine.task_hash(narrow) == engine.task_hash(task)


def test_a_hyperparameter_outside_repr_changes_the_task_hash():
    """modular-addition's transformer with 8 heads instead of 4: the same ``repr`` and the same
    parameter shapes and initial values, another function."""
    task = BUILTIN["modular-addition"](0)
    args = (MODULUS + 1, 32, 4, 128, 3)
    same = _with_model(task, lambda: LastTokenGPT(*args))
    eight = _with_model(task, lambda: LastTokenGPT(MODULUS + 1, 32, 8, 128, 3))
    assert repr(eight.make_model()) == repr(task.make_model())
    assert engine.task_hash(same) == engine.task_hash(task)
    assert engine.task_hash(eight) != engine.task_hash(task)


def test_the_task_hash_leaves_the_callers_random_state_and_ignores_it():
    """The hash draws the initialisation from a fixed seed in a forked generator: the same
    under any global seed, which it leaves as it was."""
    task = BUILTIN["teacher-student"](1)
    hashes = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        hashes.append(engine.task_hash(task))
        assert torch.equal(torch.get_rng_state(), state)
    assert hashes[0] == hashes[1]


def _legacy_task_hash(task: Task) -> str:
    """The task hash as gaugefix computed it before it covered the initialisation (data, loss
    kind, the model's ``repr`` and the definitions)."""
    digest = hashlib.sha256(f"{engine.DEFINITIONS}|{task.kind}|".encode())
    with torch.random.fork_rng(devices=[]):
        digest.update(repr(task.make_model()).encode())
    engine.data_identity(task, digest)
    return digest.hexdigest()[:16]


def _sweep(data: Path, out: Path) -> str:
    args = ["sweep", "--data", str(data), "--method", "plain,exact", "--lr", "0.05,0.1"]
    result = cli.invoke(app, [*args, "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def _to_legacy(path: Path, current: str, legacy: str) -> None:
    """The store's runs rewritten as a gaugefix of the earlier hash wrote them."""
    db = sqlite3.connect(path)
    with db:
        for rid, key in db.execute("SELECT id, key FROM runs").fetchall():
            config = json.loads(key)
            assert config["task_hash"] == current
            config["task_hash"] = legacy
            new_key = json.dumps(config, sort_keys=True)
            db.execute(
                "UPDATE runs SET key = ?, task_hash = ? WHERE id = ?", (new_key, legacy, rid)
            )
    db.close()


def test_a_store_of_the_earlier_hash_is_trained_anew_and_kept_apart(tmp_path):
    """A store whose runs carry the earlier hash of the same data and model: a sweep trains
    every run again (none is reused), the old runs stay as they were, and the summary and the
    report keep the two versions apart as ``NAME@VERSION`` without error."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    data = tmp_path / "reg.npz"
    np.savez(data, X=x, y=x[:, :1] ** 2)
    current = TaskSpec("reg", str(data), "regression").hash()
    old = _legacy_task_hash(load_task("reg", str(data), "regression"))[:8]
    legacy = old + old  # a run's hash: the version (instance 0's) and its instance's, here one
    assert current[:8] != old
    out = tmp_path / "out"
    assert "4 new runs" in _sweep(data, out)
    store_path = out / "results.sqlite"
    before = {r.config.key(): r.final_loss for r in Store(store_path).runs()}
    _to_legacy(store_path, current, legacy)
    assert "4 new runs" in _sweep(data, out)
    runs = Store(store_path).runs()
    assert sorted(r.config.task_hash for r in runs) == [current] * 4 + [legacy] * 4
    trained = {r.config.key(): r.final_loss for r in runs if r.config.task_hash == current}
    assert trained == before
    tasks = by_task(runs)
    assert set(tasks) == {f"reg@{current[:8]}", f"reg@{legacy[:8]}"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == set(tasks)
    report = (out / "report.md").read_text()
    assert f"## reg@{current[:8]}" in report and f"## reg@{legacy[:8]}" in report
