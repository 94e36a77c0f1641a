"""examples/ddp_train.py under torchrun: 2 processes (gloo, CPU) with GaugeFixing keep identical
parameters and match one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gaugefix
from gaugefix import zoo
from gaugefix.train.hook import EVERY
from test_fsdp import finish

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_train.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def start(args: list[str], distributed: bool) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [sys.executable, *(launcher if distributed else []), str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not distributed:
        cmd.append("--single")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: ended whole on a timeout
    )  # fmt: skip


@pytest.mark.parametrize(
    "options", [["--mode", "exact"], ["--mode", "penalty", "--optimizer", "adam", "--lr", "0.005"]]
)
def test_ddp_ranks_identical_and_match_single_process(tmp_path, options):
    common = ["--dtype", "float64", "--steps", "25", *options]
    ddp = start([*common, "--save", str(tmp_path / "ddp.pt")], distributed=True)
    single = start([*common, "--save", str(tmp_path / "single.pt")], distributed=False)
    ddp_result, single_result = finish(ddp), finish(single)
    assert ddp_result["world_size"] == 2 and single_result["world_size"] == 1
    assert ddp_result["max_param_diff_across_ranks"] == 0
    # exact mode: an orbit step every EVERY optimizer steps; penalty mode: a gradient at each
    applied = 25 // EVERY if "exact" in options else 25
    assert ddp_result["steps"] == applied and ddp_result["skipped"] == 0
    assert abs(ddp_result["final_loss"] - single_result["final_loss"]) <= 1e-6
    a = torch.load(tmp_path / "ddp.pt")
    b = torch.load(tmp_path / "single.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # The reported statistics are those of the saved model.
    net = zoo.mlp((8, 32, 32, 1)).double()
    net.load_state_dict(a)
    structure = gaugefix.discover(net, torch.randn(1, 8, dtype=torch.float64))
    assert gaugefix.imbalance_stats(net, structure)["mu_norm"] == pytest.approx(
        ddp_result["imbalance_mu_norm"], rel=1e-9
    )
