"""Small defects left open by earlier audits, each with its neighbours: the conditioning
analysis's learning rate, read from one regime's runs."""

from __future__ import annotations

import dataclasses

from gaugefix.experiments import conditioning
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import load_task
from runs import run_result

TASK = "teacher-student"


def _plain_gd(lr: float, top: float, steps: int, seed: int = 0):
    """A plain full-batch GD run of ``TASK`` at s = 1, stable up to ``top``."""
    run = run_result("plain", lr, top, steps=steps, seed=seed)
    config = dataclasses.replace(
        run.config, task=TASK, optimizer="gd", s=1.0, task_hash=TaskSpec(TASK).hash()
    )
    return dataclasses.replace(run, config=config)


def test_the_conditioning_rate_is_the_longest_full_batch_regimes(tmp_path):
    """Plain GD runs 150 steps at 0.1 and 0.2 (both stable) and 20 steps at 0.1 to 0.4 (all
    stable): the rate is the 150-step regime's 0.2, not 0.4, a rate it never ran (the runs of
    both regimes were taken as one cell)."""
    store = Store(tmp_path / "runs.db")
    for lr in (0.1, 0.2):
        store.add_run(_plain_gd(lr, 1.0, 150), 1.0)
    for lr in (0.1, 0.2, 0.4):
        store.add_run(_plain_gd(lr, 1.0, 20), 1.0)
    store.add_run(_plain_gd(0.4, 1.0, 150, seed=1), 1.0)  # another seed's rate: not seed 0's
    assert conditioning._largest_stable_lr(store, load_task(TASK)) == 0.2
