"""Smoke test of the benchmark suite (``make bench``): every code path at tiny sizes, no
timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    balancing,
    discovery,
    effect,
    gpu,
    memory,
    memory_probe,
    opcount,
    quantization,
    run,
    step,
    sweeps,
)
from benchmarks.baselines import (  # noqa: E402
    coupled_pairs,
    gauss_seidel_balance_,
    gauss_seidel_blocks,
    saul_balance_,
)

import gaugefix  # noqa: E402
from gaugefix import zoo  # noqa: E402


def quiet(_: str) -> None:
    pass


def test_step_overhead_paths():
    rows = step.run(tiny=True, log=quiet)
    assert len(rows) == 3
    for row in rows:
        for mode in step.MODES:
            assert row[mode]["skipped"] == 0
            assert row[mode]["median_s"] > 0


def test_effect_tiny():
    result = effect.run(tiny=True, log=quiet)
    assert set(result["optimizers"]) == set(effect.OPTIMIZERS)
    assert result["max_relative_difference"] >= 0


@pytest.mark.parametrize("method", [gauss_seidel_balance_, saul_balance_])
def test_baselines_reach_the_balance_of_balance_(method):
    """Both baselines solve the same problem: they land on the same balanced point (the
    minimiser is unique) to the tolerance."""
    torch.manual_seed(0)
    model = zoo.mlp((6, 8, 8, 8, 3)).double()
    structure = gaugefix.discover(model, torch.randn(2, 6, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 3.0, generator=torch.Generator().manual_seed(0))
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    result = method(model, structure, tol=1e-12)
    assert result.converged
    assert balancing.mu_rel_max(model, structure) <= 1e-12
    reference = zoo.mlp((6, 8, 8, 8, 3)).double()
    reference.load_state_dict(ours)
    gaugefix.balance_(reference, structure, tol=1e-12)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gauss_seidel_blocks_split_coupled_generators():
    """Blocks never hold two coupled generators: with every generator of an MLP declared one
    "layer", the colouring splits them back into non-coupled blocks covering every one."""
    torch.manual_seed(0)
    model = zoo.mlp((5, 6, 7, 8, 2))
    structure = gaugefix.discover(model, torch.randn(2, 5))
    structure.generator_layers = ["all"] * structure.num_generators
    blocks = gauss_seidel_blocks(structure)
    assert sorted(torch.cat(blocks).tolist()) == list(range(structure.num_generators))
    assert len(blocks) >= 2
    pairs = coupled_pairs(structure, torch.zeros(structure.num_generators, dtype=torch.long))
    assert pairs
    for block in blocks:
        members = set(block.tolist())
        assert not any(r in members and c in members for r, c in pairs)


def test_balancing_discovery_sweeps():
    for row in balancing.run(tiny=True, log=quiet):
        assert all(row[m]["converged"] for m in balancing.METHODS)
    assert all(row["generators"] > 0 for row in discovery.run(tiny=True, log=quiet))
    result = sweeps.run(tiny=True, log=quiet)
    assert result["float64"]["identical"]


@pytest.mark.skipif(not memory.supported(), reason="needs Linux /proc/self/clear_refs")
def test_memory_probe_in_process():
    for case in memory_probe.CASES:
        for mode in memory_probe.MODES:
            out = memory_probe.measure(case, mode, tiny=True)
            assert out["peak"] >= out["rss_before"] > 0


def test_main_writes_results_and_table(tmp_path):
    results = run.main(
        ["--tiny", "--only", "discover,balance", "--threads", "1", "--out", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["targets"] == json.loads(json.dumps(results["targets"]))
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| Item | Measured | Target | Met |")
    assert table == run.render_markdown(saved)
    assert len(saved["targets"]) == 6  # three balancing cases, three discovery cases
    assert "No CUDA GPU" in table or "CUDA:" in table


def test_only_updates_the_results_section_by_section(tmp_path):
    """``--only`` keeps the other sections of an earlier results file and the runs that measured
    them; a run whose sections were all remeasured is dropped."""
    args = ["--tiny", "--threads", "1", "--out", str(tmp_path)]
    run.main([*args, "--only", "discover"])
    first = json.loads((tmp_path / "results.json").read_text())
    merged = run.main([*args, "--only", "balance"])
    assert merged["discover"] == first["discover"]
    assert [r["sections"] for r in merged["runs"]] == [["discover"], ["balance"]]
    assert len(merged["targets"]) == 6
    again = run.main([*args, "--only", "discover"])
    assert [r["sections"] for r in again["runs"]] == [["balance"], ["discover"]]
    table = (tmp_path / "results.md").read_text()
    assert "balance on " in table and "discover on " in table


def test_default_configuration_suppresses_drift_like_a_step_at_every_step():
    """On teacher-student (SGD, mini-batches of 64, from the balanced initialisation), the final
    RMS log-ratio with the default interval, measured just before its next orbit step, is within
    10% of that with an orbit step at every step (the benchmark runs this longer, on three
    optimizers and three seeds)."""
    steps = 20 * effect.EVERY + effect.EVERY - 1
    plain = effect.final_log_ratio("sgd", None, steps, 0)
    every_step = effect.final_log_ratio("sgd", 1, steps, 0)
    default = effect.final_log_ratio("sgd", effect.EVERY, steps, 0)
    assert plain / every_step > 2  # the orbit steps do suppress the drift
    assert abs((plain / default) / (plain / every_step) - 1) <= 0.1


def test_readme_table_is_replaced_between_the_markers():
    readme = f"intro\n{run.TABLE_START}\nold | table\n{run.TABLE_END}\nafter\n"
    out = run.with_table(readme, "| new |\n")
    assert out == f"intro\n{run.TABLE_START}\n| new |\n{run.TABLE_END}\nafter\n"
    assert run.TABLE_START in (ROOT / "README.md").read_text()


def test_quantization_docs_hold_the_stored_run_s_table():
    """docs/quantization.md's table of scores is the one ``--only quant`` wrote from the stored
    results (benchmarks/results.json), not a copy that can fall behind it."""
    quant = json.loads((ROOT / "benchmarks" / "results.json").read_text())["quant"]
    docs = run.QUANT_DOCS.read_text()
    start, end = docs.index(run.QUANT_START), docs.index(run.QUANT_END)
    assert quantization.render(quant) in docs[start:end]


def test_op_counts_and_gpu_sections():
    """The op-count section at tiny sizes (figures and targets in the table), and the CUDA
    section, which records that it was skipped where there is no CUDA device."""
    rows = opcount.run(tiny=True, log=lambda _: None)
    assert [r["layers"] for r in rows] == [2, 3]
    assert rows[0]["exact_added"] == rows[1]["exact_added"] > 0
    table = run.evaluate({"ops": rows})
    assert any("imbalance_stats" in r["what"] and r["target"] == 50 for r in table)
    if not torch.cuda.is_available():
        assert gpu.run(tiny=True, log=lambda _: None) == {"skipped": "no CUDA device"}
