"""Audit of what the reproduction trains on and measures: each built-in task instance's data and
initialisation are a function of (task, seed) alone (fresh process, hash seed, threads, the
caller's default dtype), the documented splits, one clear error where this Python lacks
char-gpt's text, probes that leave the caller's random state alone, and the quality and
realistic summaries comparing medians over the same seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gaugefix.experiments import quality, realistic, tasks
from gaugefix.experiments.engine import RunConfig, RunResult, task_hash
from gaugefix.experiments.probes import float64_model
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.tasks import BUILTIN, MODULUS, TaskError, load_task

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "figures" / "full-summary.json"
INSTANCES = (0, 1)
OTHER_HASH_SEED = "4242"  # PYTHONHASHSEED of the fresh process

_HASHES = """
import json, torch
torch.set_num_threads(1)
from gaugefix.experiments.engine import task_hash
from gaugefix.experiments.tasks import BUILTIN
print(json.dumps({n: [task_hash(f(k)) for k in %r] for n, f in BUILTIN.items()}))
"""


def _hashes() -> dict[str, list[str]]:
    return {n: [task_hash(f(k)) for k in INSTANCES] for n, f in BUILTIN.items()}


def test_every_instance_is_the_same_in_a_fresh_process_with_other_hash_seed_and_threads():
    """Each built-in instance's task hash (its data, model and definitions) is the same in a
    fresh process under another PYTHONHASHSEED and one thread as here under two."""
    env = {**os.environ, "PYTHONHASHSEED": OTHER_HASH_SEED}
    out = subprocess.run(
        [sys.executable, "-c", _HASHES % (INSTANCES,)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = _hashes()
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.stdout) == here


# The teacher-student tasks' targets are float32 matrix products, whose last bits depend on the
# CPU's kernels: the published run's were computed on an AMD EPYC (an Intel Xeon rounds them
# otherwise, another task version there).
TEACHERS = ("teacher-student", "deep-teacher-student")
PUBLISHED_CPU = "AuthenticAMD"


def _cpu_vendor() -> str:
    """The CPU's vendor (``/proc/cpuinfo``'s ``vendor_id``), empty where it is not known."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":")[1].strip() for line in lines if line.startswith("vendor_id")), "")


def test_the_published_run_is_of_todays_task_versions():
    """docs/figures/full-summary.json is keyed by the task versions the tasks give today
    (char-gpt's text is this Python's: compared on the 3.11 it was published with; the
    teachers' targets this CPU's products: compared on the vendor they were published with)."""
    published = {n: t["task_hash"] for n, t in json.loads(PUBLISHED.read_text())["tasks"].items()}
    names = [n for n in BUILTIN if n != "char-gpt" or sys.version_info[:2] == (3, 11)]
    names = [n for n in names if n not in TEACHERS or _cpu_vendor() == PUBLISHED_CPU]
    assert {n: TaskSpec(n).hash()[:8] for n in names} == {n: published[n] for n in names}


def _init(task: tasks.Task, seed: int) -> list[torch.Tensor]:
    """The task model's parameters at PyTorch's initialisation for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [p.detach().clone() for p in task.make_model().parameters()]


@pytest.mark.parametrize("name", list(BUILTIN))
def test_data_and_initialisation_do_not_depend_on_the_default_dtype(name):
    """A process whose default dtype is float64 gets the same data, task hash and seeded
    initialisation (float32, as the runs are keyed): the run key does not hold the default
    dtype, so another initialisation under one key would mix runs."""
    task = BUILTIN[name](1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        other = BUILTIN[name](1)
        other_init = _init(other, 3)
    finally:
        torch.set_default_dtype(default)
    assert task_hash(other) == task_hash(task)
    for a, b in zip(other.arrays(torch.float32), task.arrays(torch.float32), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    init = _init(task, 3)
    assert all(
        a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(other_init, init, strict=True)
    )


def _pooled(task: tasks.Task) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([task.x, task.x_test]), torch.cat([task.y, task.y_test])


def test_the_splits_are_the_documented_sizes_and_disjoint():
    """teacher-student: 512 / 512 of 16 features, one target, the deep student on the same
    data; digits: 1347 / 450 of the 1797 images, pixels / 16; modular addition: 1404 / 1405 of
    the 2809 pairs, labelled (a + b) mod 53; no input in both splits."""
    sizes = {"teacher-student": (512, 512), "deep-teacher-student": (512, 512),
             "digits": (1347, 450), "modular-addition": (1404, 1405),
             "char-gpt": (256, 64)}  # fmt: skip
    for name, (n_train, n_test) in sizes.items():
        task = load_task(name, instance=2)
        assert (len(task.x), len(task.x_test)) == (n_train, n_test), name
        x = _pooled(task)[0].flatten(1)
        assert len(torch.unique(x, dim=0)) == n_train + n_test, name
    ts, deep = (
        load_task("teacher-student", instance=2),
        load_task("deep-teacher-student", instance=2),
    )
    assert ts.x.shape[1] == 16 and ts.y.shape[1] == 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(ts.arrays(torch.float32), deep.arrays(torch.float32), strict=True)
    )
    x, _ = _pooled(load_task("digits", instance=2))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and torch.equal(x * 16, (x * 16).round())
    x, y = _pooled(load_task("modular-addition", instance=2))
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % MODULUS) and bool((x[:, 2] == MODULUS).all())


def test_char_gpt_without_its_files_in_this_python_is_one_task_error(monkeypatch):
    """A Python without one of CORPUS_FILES that the text needs (3.14 moved _compression.py;
    this name sorts first) or with too little of their text gives a TaskError naming the
    problem, not a traceback."""
    monkeypatch.setattr(tasks, "CORPUS_FILES", ("__absent__.py", *tasks.CORPUS_FILES))
    with pytest.raises(TaskError, match="__absent__.py"):
        load_task("char-gpt")
    monkeypatch.undo()
    monkeypatch.setattr(tasks, "WINDOWS", 10**6)
    with pytest.raises(TaskError, match="bytes"):
        load_task("char-gpt")


def test_float64_model_leaves_the_callers_random_state_as_it_was():
    task = load_task("teacher-student")
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    float64_model(task, 3)
    assert torch.equal(torch.rand(4), expected)


def _run(method: str, lr: float, seed: int, loss: float, status: str = "stable") -> RunResult:
    config = RunConfig("digits", method, "gd", lr, 0.0, 0.0, seed, 0, 50, task_hash="h")
    return RunResult(config, status, 2.3, 2.3, loss, loss, 0.9, 0.9, None, None, None, 1.0)


def test_quality_compares_a_method_and_the_reference_on_the_same_seeds():
    """Plain on seeds 0..4 and balanced-init on 0..2 with equal losses on their common seeds:
    a median over 0..2 against one over 0..4 (ratio 2 here) is no comparison; at a rate where
    both ran the same seeds the medians are compared."""
    losses = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.01, 4: 0.01}
    runs = [_run("plain", 0.1, k, v) for k, v in losses.items()]
    runs += [_run("balanced-init", 0.1, k, losses[k]) for k in range(3)]
    runs += [_run(m, 0.2, k, losses[k]) for m in ("plain", "balanced-init") for k in range(3)]
    medians = quality.summarize(runs)["final_train_loss"]["medians"]
    assert medians["plain"] == {"0.1": 0.1, "0.2": 0.2}
    assert medians["balanced-init"] == {"0.2": 0.2}


def _realistic(lr: float, seed: int, test_loss: float) -> RunResult:
    config = RunConfig("residual-cnn", "plain", "momentum", lr, 0.0, 0.0, seed, 64, 10,
                       task_hash="h")  # fmt: skip
    return RunResult(config, "stable", 2.3, 2.3, 1.0, test_loss, None, None, None, None, None, 1.0)


def test_the_best_tuned_rate_is_one_every_seed_of_the_cell_ran():
    """A rate that only seed 0 ran (the others' runs not in the store) is not tuned on: its
    median is of one seed, the others' of three."""
    runs = [_realistic(0.1, k, 0.5) for k in range(3)] + [_realistic(0.2, 0, 0.1)]
    assert realistic.best_lr(runs) == 0.1
    assert realistic.tuned(runs)["val_loss_by_seed"] == {"0": 0.5, "1": 0.5, "2": 0.5}
