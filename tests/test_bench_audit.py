"""Audit of the benchmark suite: its comparisons are fair (both sides sampled, warmed and
planned alike) and the README's table is what ``benchmarks/run.py`` renders from the stored
results."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import balancing, baselines, gpu, opcount, run, sweeps  # noqa: E402

import gaugefix  # noqa: E402
from gaugefix import zoo  # noqa: E402
from gaugefix.experiments import plan, runner  # noqa: E402

RESULTS = json.loads((ROOT / "benchmarks" / "results.json").read_text())


def test_the_readme_and_results_md_hold_what_run_renders_from_results_json():
    table = run.render_markdown(RESULTS)
    assert (ROOT / "benchmarks" / "results.md").read_text() == table
    readme = (ROOT / "README.md").read_text()
    assert run.with_table(readme, table) == readme


def test_the_stored_targets_are_those_evaluate_decides():
    """Every "Met" in the table is decided by the rule ``evaluate`` states, on the stored
    figures."""
    assert json.loads(json.dumps(run.evaluate(RESULTS))) == RESULTS["targets"]


@pytest.fixture(scope="module")
def quick_grid():
    return [c for g in plan.reproduce_grids(quick=True) for c in g.configs(runner.TaskSpec(g.task))]


def test_the_float64_sample_stands_for_every_method_of_every_group(quick_grid):
    """The float64 identity is checked on a run of every method of every group (a group's runs
    cycle through 3 or 12 methods: every 6th run alone would be one or a few of them)."""
    chosen, _ = sweeps.sample(quick_grid)
    assert {(c.group(), c.method) for c in chosen} == {(c.group(), c.method) for c in quick_grid}
    assert len(chosen) <= len(quick_grid) // 5  # still a sample


def test_the_one_by_one_side_trains_every_run_of_the_grid(monkeypatch):
    """The speed-up is timed on every run alone, not estimated from a sample: a run's cost
    alone depends on where it diverges (the sample drew the teacher-student groups' runs at
    the rate 2, which stop at step 5, each standing for three that trained 1000 steps)."""
    trained: dict[bool, list] = {True: [], False: []}

    def train(configs, batched):
        trained[batched].append(list(configs))
        return {c.key(): 1.0 for c in configs}

    monkeypatch.setattr(sweeps, "_train_into_store", train)
    monkeypatch.setattr(sweeps, "identical", lambda configs: {
        "runs": 0, "identical": True, "max_rel_final_loss_difference": 0.0,
        "same_statuses": True, "rounding_sensitive": []})  # fmt: skip
    result = sweeps.run(tiny=True, log=lambda line: None)
    grid = sweeps.tiny_grid()
    assert trained[False] == trained[True] == [grid] * result["pairs"]
    assert all(g["speedup"] == 1.0 for g in result["groups"])


def test_gauss_seidel_builds_its_blocks_once_per_structure(monkeypatch):
    """The blocks depend on the structure alone: like balance_'s plans they are built once, not
    in every timed call (0.18 of the 0.88 s of a Gauss-Seidel call on the GPT 6 x 384)."""
    calls = []
    blocks = baselines.gauss_seidel_blocks
    monkeypatch.setattr(baselines, "gauss_seidel_blocks", lambda s: calls.append(s) or blocks(s))
    torch.manual_seed(0)
    model = zoo.mlp((6, 8, 8, 3)).double()
    structure = gaugefix.discover(model, torch.randn(2, 6, dtype=torch.float64))
    for seed in range(3):
        gaugefix.random_gauge_(model, structure, 3.0, generator=torch.Generator().manual_seed(seed))
        assert baselines.gauss_seidel_balance_(model, structure, tol=1e-12).converged
        assert balancing.mu_rel_max(model, structure) <= 1e-12
    assert len(calls) == 1


def test_every_balancing_side_is_warmed_alike(monkeypatch):
    """Each method runs once untimed before the timed rounds (only balance_ was warmed: the
    baselines' first timed call was up to 1.5x their later ones)."""
    calls: collections.Counter = collections.Counter()
    methods = {
        name: lambda m, s, name=name, f=f: calls.update([name]) or f(m, s)
        for name, f in balancing.METHODS.items()
    }
    monkeypatch.setattr(balancing, "METHODS", methods)
    case = balancing.cases(tiny=True)[0]
    row = balancing._run_case(case, lambda _: None)
    assert all(row[name]["converged"] for name in methods)
    assert set(calls.values()) == {case.pairs + 1}


def test_adamw_s_operations_are_counted_as_a_gpu_runs_it():
    """The reference of item 8, AdamW's own step, is counted in the layout a GPU takes (foreach,
    torch's default for CUDA tensors), as the kernels are: its operations do not grow with depth.
    Counted in its CPU layout (a loop over the parameters) it held 1482 operations on GPT-2 small
    where a GPU dispatches 12, and an orbit step adding 267 passed as "at most AdamW's step"."""
    made = {n: zoo.GPT(32, 16, 2, n, 32, opcount.TOKENS) for n in (2, 3)}
    rows = {n: opcount.counts(model, 32) for n, model in made.items()}
    assert rows[2]["plain_step"] == rows[3]["plain_step"] <= 20
    assert rows[2]["exact_added"] == rows[3]["exact_added"] > rows[3]["plain_step"]


def test_the_gpu_sides_take_turns_in_a_rotating_order(monkeypatch):
    """Item 9's rounds rotate which side goes first (the suite's rule), after the warm-up calls,
    and its figures are medians of per-round ratios."""
    order: list[str] = []
    monkeypatch.setattr(gpu, "_seconds", lambda fn, repeat: fn() or 1.0)
    sides = {name: lambda name=name: order.append(name) for name in "abc"}
    times = gpu.rounds(sides)
    timed = order[gpu.WARMUP * len(sides) :]
    firsts = [timed[i * len(sides)] for i in range(gpu.ROUNDS)]
    assert set(firsts) == set(sides)
    assert all(len(t) == gpu.ROUNDS for t in times.values())
