"""Gauge fixing of models sharded with FSDP2 (``fully_shard``), 2 gloo processes on CPU, in
float64: the gauge functions on the slices equal those on the whole model (tests/fsdp_worker.py),
and examples/fsdp_train.py trains like one process on the global batch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gaugefix.train.hook import EVERY
from processes import descendants, processes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp_train.py"
WORKER = ROOT / "tests" / "fsdp_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

TOL = 1e-12  # relative; measured: below 1e-15 everywhere


def start(script: Path, args: list[str], distributed: bool) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [sys.executable, *(launcher if distributed else []), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: ended whole on a timeout
    )  # fmt: skip


def kill(proc: subprocess.Popen) -> None:
    """End ``proc``'s process group and those of its descendants: torchrun's workers each run in
    a session of their own (torch's elastic agent starts them so), which would outlive its group
    and hold the output pipes open."""
    for pid in [proc.pid, *descendants(proc.pid, processes())]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def run_in_processes(code: str) -> dict:
    """The JSON of the last line ``code`` prints, run by two processes under torchrun from the
    tests' folder (so that it can import test modules)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [sys.executable, *launcher, "--no-python", sys.executable, "-c", code]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT / "tests", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    return finish(proc)


TIMEOUT = 300  # seconds a launch may take before it is killed and the test fails


def finish(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except BaseException as exc:  # a timeout (ranks waiting in different collectives), Ctrl-C
        kill(proc)
        out, err = proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        pytest.fail(f"no result within {TIMEOUT} s (killed)\n{out}\n{err[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def worker() -> dict:
    return finish(start(WORKER, [], distributed=True))


@pytest.mark.parametrize("model", ["one_row", "cnn", "resnet", "gpt"])
def test_gauge_functions_on_slices_equal_the_whole_model(worker, model):
    """imbalance_stats, apply_gauge_, relax_ (a step taken at once and one found by the bounded
    search) and balance_, with gradients and momentum transported, on an MLP whose parameters
    each have one row (the second process holds no slice), a CNN, a ResNet (BatchNorm) and a
    GPT (uneven slices: vocabulary 11 over 2 processes)."""
    result = worker[model]
    assert result["generators"] > 0
    assert result["placeholders"] == [False, model == "one_row"]
    assert result["most_terms_equal"]
    for key in (
        "stats", "apply_gauge_", "relax_0.001_h", "relax_0.001", "relax_1000_h", "relax_1000",
        "balance_", "balance_h", "balance_norms",
    ):  # fmt: skip
        assert result[key] <= TOL, key
    assert result["imbalance"] <= TOL
    assert result["summary_equal"] and result["restrict_excluded_equal"]
    assert result["balance_fields_equal"]
    assert result["balance_mu_rel_max"] <= 1e-10
    # GaugeFixing: per step one all-reduce of the generator sums and one of the gradients'
    # finiteness (a flag), however many parameters
    for mode in ("exact", "penalty"):
        assert result[f"steps_{mode}"] == 1
        assert result[f"all_reduces_per_step_{mode}"] == 2


def test_bad_input_on_slices(worker):
    bad = worker["bad_input"]
    # a NaN in rank 1's slice: the same error on both ranks, nothing modified
    assert (
        bad["nan_messages"]
        == ["parameter '2.weight' contains NaN or inf; nothing was modified"] * 2
    )
    assert bad["nan_unchanged"]
    # refused before anything changes: sharded in part, replicated
    for case in ("partial_stats", "partial_hook"):
        assert "is not sharded although the model uses fully_shard" in bad[case]
        assert "call reshard() on each FSDPModule" in bad[case]
    assert "placed (Replicate(),)" in bad["replicated_balance"]


@pytest.mark.parametrize(
    "function",
    [
        "penalty", "penalty_grad", "gauge_coordinates", "project", "generators_gram", "equalize_",
        "sharpness",
    ],
)  # fmt: skip
def test_functions_needing_whole_parameters_refuse_shards(worker, function):
    """One line naming the sharded parameter; parameters and gradients unchanged (checked in
    the worker)."""
    message = worker["bad_input"][f"whole_only_{function}"]
    assert message is not None and "\n" not in message
    assert "is sharded (an FSDP2 DTensor)" in message and "'0.weight'" in message


@pytest.mark.parametrize(
    "options",
    [
        ["--mode", "exact", "--optimizer", "adam", "--lr", "0.005"],
        ["--mode", "penalty", "--optimizer", "sgd"],
    ],
)
def test_fsdp_training_matches_one_process(tmp_path, options):
    """25 steps from a random gauge (balanced at the start): the gathered parameters and
    optimizer state equal those of one process on the global batch, to float64 rounding."""
    common = ["--dtype", "float64", "--steps", "25", *options]
    sharded = start(EXAMPLE, [*common, "--save", str(tmp_path / "fsdp.pt")], distributed=True)
    single = start(EXAMPLE, [*common, "--single", "--save", str(tmp_path / "one.pt")], False)
    a, b = finish(sharded), finish(single)
    assert a["world_size"] == 2 and b["world_size"] == 1
    # exact mode: an orbit step every EVERY optimizer steps; penalty mode: a gradient at each
    applied = 25 // EVERY if "exact" in options else 25
    assert a["steps"] == applied and a["skipped"] == 0
    assert abs(a["final_loss"] - b["final_loss"]) <= TOL * b["final_loss"]
    saved_a, saved_b = torch.load(tmp_path / "fsdp.pt"), torch.load(tmp_path / "one.pt")
    for part in ("params", "state"):
        assert saved_a[part].keys() == saved_b[part].keys() and saved_b[part]
        for key, value in saved_b[part].items():
            diff = (saved_a[part][key] - value).abs().max()
            assert float(diff) <= TOL * float(value.abs().max()), key
    # the statistics computed on the slices are those of the gathered model
    for key, value in a.items():
        if key.startswith("imbalance_"):
            assert value == pytest.approx(a[f"gathered_{key}"], rel=TOL, abs=1e-300), key
