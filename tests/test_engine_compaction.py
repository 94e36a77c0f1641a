"""The engine's compaction: a group that drops its diverged runs from the computation gives every
run exactly the result it gives when they are computed (masked) until the group stops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gaugefix.experiments import engine
from gaugefix.experiments.engine import RunConfig, RunResult, train_group
from gaugefix.experiments.runner import TaskSpec

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 25
# (method, strength): every fixing the engine has, hard fixing for one step and for all,
# per-layer learning rates (not for Adam), exact steps every step and every 10th.
METHODS = (
    ("plain", 0.0),
    ("balanced-init", 0.0),
    ("penalty", 0.1),
    ("decoupled-penalty", 0.1),
    ("exact", 1.0),
    ("exact-first", 1.0),
    ("exact-every-10", 1.0),
    ("weight-decay", 1e-3),
    ("balance", 0.0),
    ("balance-after-step-1", 0.0),
    ("per-layer-lr", 0.0),
)
# Learning rates from stable to diverging at the first step, so that runs diverge at several
# steps (Adam's at the first or never) and every method has runs that outlive the compactions
# (checked below).
GROUPS = [
    ("gd", 0, (0.05, 0.1, 0.2, 0.5, 0.9, 1.2)),
    ("momentum", 16, (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)),
    ("adam", 0, (0.02, 0.1, 0.2, 0.25, 0.3, 0.4)),
    ("sgd", 16, (0.05, 0.1, 0.2, 0.4, 0.6, 0.7)),
]


def _group(optimizer: str, batch_size: int, lrs: tuple[float, ...]) -> tuple[list, list]:
    """A group on two instances of teacher-student (seed = the lr's parity), in float64."""
    specs = [TaskSpec("teacher-student").for_seed(k) for k in (0, 1)]
    tasks = [spec.load() for spec in specs]
    configs = [
        RunConfig(
            "teacher-student",
            m,
            optimizer,
            lr,
            st,
            1.0,
            i % 2,
            batch_size,
            STEPS,
            "float64",
            task_hash=specs[i % 2].hash(),
        )
        for m, st in METHODS
        if optimizer in engine.PER_LAYER_LR_OPTIMIZERS or m != "per-layer-lr"
        for i, lr in enumerate(lrs)
    ]
    return [tasks[c.seed] for c in configs], configs


def _fields(result: RunResult) -> str:
    """Every field of a result, curves included, as text: equal texts are equal floats (``repr``
    round-trips), with NaN equal to NaN."""
    return repr(dataclasses.asdict(result))


@pytest.mark.parametrize(("optimizer", "batch_size", "lrs"), GROUPS)
def test_compaction_gives_every_run_the_result_of_the_masked_group(
    monkeypatch, optimizer, batch_size, lrs
):
    """Float64 and float32 alike give bitwise the same results (checked when this was written):
    each run's rows are computed by the same operations, batched over fewer rows. Compared
    exactly here, in float64."""
    tasks, configs = _group(optimizer, batch_size, lrs)
    compactions: list[tuple[int, int]] = []
    compacted = engine._compacted

    def counted(group, rows, final):
        compactions.append((int(rows.active.sum()), len(rows.runs)))
        return compacted(group, rows, final)

    monkeypatch.setattr(engine, "_compacted", counted)
    dropping = train_group(tasks, configs, record_every=1)
    assert compactions, "the group must compact at least once"
    assert all(kept <= engine.COMPACT_FRACTION * rows for kept, rows in compactions)
    after = {r.config.method for r in dropping if r.diverged_at is None}
    assert after == {c.method for c in configs}, "every method outlives the compactions"
    several = 2 if optimizer == "adam" else 3
    assert len({r.diverged_at for r in dropping}) >= several, "runs diverge at several steps"

    monkeypatch.setattr(engine, "COMPACT_FRACTION", -1.0)  # never compacts
    compactions.clear()
    masked = train_group(tasks, configs, record_every=1)
    assert not compactions
    for a, b in zip(dropping, masked, strict=True):
        assert _fields(a) == _fields(b), a.config


def test_a_compaction_keeps_the_runs_in_the_order_of_the_configs(monkeypatch):
    """Runs that diverge at once between runs that do not: the survivors' rows are cut out of
    the middle of the batch, and every result comes back at its config's place."""
    spec = TaskSpec("teacher-student")
    task = spec.load()
    configs = [
        RunConfig(
            "teacher-student",
            "plain",
            "gd",
            lr,
            0.0,
            0.0,
            seed,
            0,
            10,
            "float64",
            task_hash=spec.hash(),
        )
        for seed, lr in enumerate((100.0, 0.1, 100.0, 100.0, 0.2, 100.0))
    ]
    dropping = train_group(task, configs)
    assert [r.config for r in dropping] == configs
    assert [r.status == "diverged" for r in dropping] == [c.lr == 100.0 for c in configs]
    monkeypatch.setattr(engine, "COMPACT_FRACTION", -1.0)
    masked = train_group(task, configs)
    assert [_fields(a) for a in dropping] == [_fields(b) for b in masked]


def test_a_step_state_without_a_rule_is_refused():
    with pytest.raises(TypeError, match="no rule"):
        engine._state_rows(object(), torch.tensor([0]))
