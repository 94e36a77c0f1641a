"""Small defects left open by earlier audits, each with its neighbours: the conditioning
analysis's learning rate, read from one regime's runs; the range check of GaugeFixing's float16
orbit step under FSDP2; zoo.mlp's widths."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

import gaugefix
from gaugefix import zoo
from gaugefix.experiments import conditioning
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import load_task
from runs import run_result
from test_fsdp import run_in_processes

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


# -- 2. GaugeFixing's orbit step on FSDP2-sharded float16 parameters ----------------------------


def run_fsdp_float16() -> None:
    """Under torchrun (two processes): a float16 MLP 2-2-3 sharded per layer along dim 0, so
    process 0 holds the first hidden unit's input row and output rows 0-1, process 1 the second
    unit's input row and output row 2. Every output weight is 6e4; the first unit's inputs are
    6e4 too, the second's 1: balancing grows both units' input rows, the first's past float16's
    largest number (by ``(1.08e10 / 7.2e9)^(1/4) = 1.107`` at the balanced point), so the range
    check fails on process 0 only; prints whether every local slice is bitwise unchanged after
    one orbit step and the hook's counts."""
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = zoo.mlp((2, 2, 3))
    structure = gaugefix.discover(model, torch.randn(1, 2))
    with torch.no_grad():
        model[0].weight[0].fill_(6e4)
        model[0].weight[1].fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.fill_(6e4)
    model.half()
    mesh = init_device_mesh("cpu", (2,))
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fixing = gaugefix.GaugeFixing(opt, model, structure, 1e6, balance_at_start=False, every=1)
    before = [p.to_local().clone() for p in model.parameters()]
    opt.step()
    same = all(
        torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    both = torch.tensor([float(same), fixing.steps, fixing.skipped])
    low, high = both.clone(), both.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:  # one line: every process's outcome, and whether they agree
        outcome = {"same": bool(low[0]), "steps": int(high[1]), "skipped": int(low[2])}
        print(json.dumps({**outcome, "alike": bool(torch.equal(low[1:], high[1:]))}))
    sys.stdout.flush()
    os._exit(0)  # gloo occasionally aborts at interpreter finalization (examples/ddp_train.py)


def test_a_float16_orbit_step_out_of_range_on_one_process_is_skipped_on_every_process():
    """The range check of GaugeFixing's float16 orbit step agrees between the processes (one
    all-reduce): process 1, whose slices the bound does not object to, would otherwise have
    moved them while process 0 skipped the step."""
    result = run_in_processes("import test_leftovers2; test_leftovers2.run_fsdp_float16()")
    assert result == {"same": True, "steps": 0, "skipped": 1, "alike": True}


# -- 3. zoo.mlp's widths --------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [(), (4,), (4, 0, 1), (4, -2, 1), (4, 2.5, 1)])
def test_mlp_widths_that_are_no_network_are_refused(widths):
    """A single width built an empty network and a zero width a layer of no neuron, silently."""
    with pytest.raises(ValueError, match="at least two positive integers"):
        zoo.mlp(widths)
