"""The realistic tasks (a character-level GPT on the standard library's source, a residual CNN
on the digits): local deterministic data, complete gauge structures, training in the engine, and
their summary entry (each method's stable edges and validation loss at its best-tuned rate)."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import gaugefix
from gaugefix.experiments import realistic
from gaugefix.experiments.engine import RunConfig, RunResult, task_hash, train_group
from gaugefix.experiments.plan import REALISTIC_METHODS, reproduce_grids
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.tasks import (
    BUILTIN,
    CONTEXT,
    CORPUS_FILES,
    REALISTIC,
    VALIDATION_WINDOWS,
    WINDOWS,
)


def _offline(*args, **kwargs):
    raise AssertionError("a task tried to open a network connection")


@pytest.mark.parametrize("name", REALISTIC)
def test_realistic_data_are_local_and_deterministic(name, monkeypatch):
    """Loading an instance twice, with sockets disabled, gives the same arrays and task hash;
    another instance is another split of the same data."""
    monkeypatch.setattr(socket, "socket", _offline)
    first, again, other = BUILTIN[name](0), BUILTIN[name](0), BUILTIN[name](1)
    assert task_hash(first) == task_hash(again)
    assert task_hash(first) != task_hash(other)
    for a, b in zip(first.arrays(torch.float32), again.arrays(torch.float32), strict=True):
        assert torch.equal(a, b)
    pooled = [torch.cat([t.x, t.x_test]).sort(0).values for t in (first, other)]
    assert torch.equal(*pooled) and not torch.equal(first.x, other.x)


def test_char_gpt_reads_the_fixed_files_as_consecutive_windows():
    """char-gpt's windows are the corpus files' bytes in sorted order, cut into WINDOWS windows
    of CONTEXT + 1; each position is labelled with the next byte; VALIDATION_WINDOWS held out."""
    task = BUILTIN["char-gpt"](0)
    root = Path(os.__file__).parent
    text = b"".join((root / n).read_bytes() for n in sorted(CORPUS_FILES))
    assert len(text) >= WINDOWS * (CONTEXT + 1)
    expected = torch.tensor(list(text[: WINDOWS * (CONTEXT + 1)])).view(WINDOWS, CONTEXT + 1)
    inputs = torch.cat([task.x, task.x_test])
    labels = torch.cat([task.y, task.y_test])
    assert len(task.x_test) == VALIDATION_WINDOWS and task.x.shape[1] == CONTEXT
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    windows = torch.cat([inputs, labels[:, -1:]], 1)
    assert torch.equal(windows.sort(0).values, expected.sort(0).values)


def _expected_generators(name: str) -> int:
    """Every rescaling symmetry of the model, counted by hand. GPT, per block: dim query-key
    pairs, dim value-output pairs, two LayerNorm gains of dim, hidden ReLU neurons; plus the
    final LayerNorm's dim. Residual CNN: width residual-stream channels (one scale shared by the
    stem, every block's output conv and their readers, as relu(a z) = a relu(z)) and width
    hidden channels per block."""
    if name == "char-gpt":
        dim, hidden, layers = 64, 256, 2
        return layers * (4 * dim + hidden) + dim
    width, blocks = 16, 2
    return width * (1 + blocks)


@pytest.mark.parametrize("name", REALISTIC)
def test_realistic_gauge_structures_are_complete_and_exact(name):
    """discover finds every generator, and a random gauge transformation of the default
    initialisation (float64) keeps the outputs to 1e-10 while moving the parameters far."""
    task = BUILTIN[name](0)
    torch.manual_seed(0)
    model = task.make_model().to(torch.float64)
    x = task.arrays(torch.float64)[0][:8]
    structure = gaugefix.discover(model, x[:2])
    assert structure.num_generators == _expected_generators(name)
    with torch.no_grad():
        before = model(x)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gaugefix.random_gauge_(model, structure, 1.0, generator=torch.Generator().manual_seed(1))
    moved = max(
        float((p.detach() - params[n]).norm() / params[n].norm())
        for n, p in model.named_parameters()
    )
    assert moved > 0.5
    with torch.no_grad():
        after = model(x)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-10


@pytest.mark.parametrize(
    ("name", "optimizer"), [("char-gpt", "adamw"), ("residual-cnn", "momentum")]
)
def test_realistic_tasks_train_in_the_engine(name, optimizer):
    """Four mini-batch steps of the realistic methods: every run reports its validation loss
    and accuracy; exact-every-10 has not yet acted (it equals plain), balance has; the task's
    loss is the mean cross-entropy over every position (GPT)."""
    task = BUILTIN[name](0)
    methods = [("plain", 0.0), ("exact-every-10", 1.0), ("penalty", 0.1), ("balance", 0.0)]
    configs = [
        RunConfig(name, m, optimizer, 1e-3, st, 0.0, 0, 8, 4, task_hash="test") for m, st in methods
    ]
    plain, every_10, _, balance = train_group(task, configs)
    for r in (plain, every_10, balance):
        assert r.test_loss is not None and 0.0 <= r.test_accuracy <= 1.0
    assert every_10.final_loss == plain.final_loss and balance.final_loss != plain.final_loss
    torch.manual_seed(0)
    with torch.no_grad():
        out = task.make_model()(task.x[:3])
    flat = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), task.y[:3].reshape(-1))
    assert torch.allclose(task.loss(out, task.y[:3]), flat)


def _run(
    method: str, strength: float, lr: float, seed: int, test_loss: float | None, bisection: int = 0
) -> RunResult:
    config = RunConfig("residual-cnn", method, "momentum", lr, strength, 0.0, seed, 64, 10,
                       task_hash="h", bisection=bisection)  # fmt: skip
    diverged = test_loss is None
    return RunResult(
        config,
        "diverged" if diverged else "stable",
        2.3,
        2.3,
        None if diverged else 1.0,
        test_loss,
        None,
        None,
        None,
        None,
        3 if diverged else None,
        2e3 if diverged else 1.0,
    )


def test_realistic_summary_tunes_the_rate_on_the_validation_loss():
    """Per method and strength: each seed's stable edge (bisection included), the grid rate with
    the lowest median validation loss among those where no seed diverged, the losses there."""
    runs = [
        _run("plain", 0.0, 0.1, 0, 0.9),
        _run("plain", 0.0, 0.1, 1, 0.8),
        _run("plain", 0.0, 0.2, 0, 0.5),
        _run("plain", 0.0, 0.2, 1, 0.7),
        _run("plain", 0.0, 0.4, 0, 0.1),  # the lowest loss, but seed 1 diverged at 0.4
        _run("plain", 0.0, 0.4, 1, None),
        _run("plain", 0.0, 0.28, 1, 0.6, bisection=1),  # seed 1's bracket, not a tuning rate
        _run("penalty", 0.1, 0.1, 0, 0.4),
        _run("penalty", 1.0, 0.1, 0, None),
    ]
    entry = realistic.summarize(runs)
    methods = entry["residual-cnn"]["momentum/64/10"]
    (plain,) = methods["plain"]
    assert plain == {
        "strength": 0.0,
        "stable_edge_by_seed": {"0": 0.4, "1": pytest.approx(math.sqrt(0.28 * 0.4), rel=1e-12)},
        "best_lr": 0.2,
        "val_loss_by_seed": {"0": 0.5, "1": 0.7},
        "val_loss": 0.6,
    }
    assert [t["strength"] for t in methods["penalty"]] == [0.1, 1.0]
    assert methods["penalty"][1]["best_lr"] is None and methods["penalty"][1]["val_loss"] is None
    tasks = {"residual-cnn": {"regimes": {"momentum/64/10": {"lr_grid": [0.1, 0.8]}}}}
    text = realistic.render(entry, tasks)
    assert "| plain |  | 0.367 (0.4, 0.335) | 0.2 | 0.6 (0.5, 0.7) |" in text
    assert "| penalty | 1 | 0 (0) | n/a | n/a |" in text
    digits = replace(runs[0], config=replace(runs[0].config, task="digits"))
    assert realistic.summarize([digits]) == {}  # not a realistic task: no entry


def test_realistic_grids_run_every_method_at_the_default_initialisation():
    """The full grid trains the realistic tasks mini-batch at s = 0 with three seeds, every
    realistic method (the penalty at two strengths); no other task runs exact-every-10."""
    grids = {g.task: g for g in reproduce_grids(False)}
    for name in REALISTIC:
        configs = grids[name].configs(TaskSpec(name))
        assert {c.s for c in configs} == {0.0} and {c.seed for c in configs} == {0, 1, 2}
        assert all(c.batch_size > 0 for c in configs)
        runs = {(c.method, c.strength) for c in configs}
        assert runs == {(m, st) for m, strengths in REALISTIC_METHODS.items() for st in strengths}
        assert {m for m, _ in runs} >= {"plain", "balanced-init", "exact-every-10", "balance"}
        assert {st for m, st in runs if m == "penalty"} == {0.1, 1.0}
    for name, grid in grids.items():
        if name not in REALISTIC:
            assert all(m != "exact-every-10" for b in grid.blocks for m in b.methods)
