"""examples/balance_quantize.py: the numbers it reports are the ones its files give."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import gaugefix
from gaugefix.experiments.tasks import load_task
from gaugefix.zoo import mlp

ROOT = Path(__file__).resolve().parents[1]


def _int8_error(tensors: dict[str, torch.Tensor]) -> float:
    """Relative test-logit error of per-tensor symmetric int8 weights, computed afresh."""
    task = load_task("digits")
    x = task.x_test.double()

    def logits(state: dict[str, torch.Tensor]) -> torch.Tensor:
        model = mlp((64, 256, 10)).double()
        model.load_state_dict({k: v.double() for k, v in state.items()})
        with torch.no_grad():
            return model(x)

    quantized = {}
    for name, t in tensors.items():
        if name.endswith("weight"):
            step = t.double().abs().max() / 127
            t = torch.clamp(torch.round(t.double() / step), -127, 127) * step
        quantized[name] = t
    exact = logits(tensors)
    return float(torch.linalg.norm(logits(quantized) - exact) / torch.linalg.norm(exact))


def test_reported_numbers_match_the_written_files(tmp_path):
    script = ROOT / "examples" / "balance_quantize.py"
    cmd = [sys.executable, str(script), "--seeds", "1", "--steps", "40", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["s"], r["seed"]) for r in report["rows"]] == [(0.0, 0), (1.0, 0)]
    structure = gaugefix.discover(mlp((64, 256, 10)).double(), torch.randn(1, 64).double())
    for row in report["rows"]:
        trained = load_file(tmp_path / f"trained-s{row['s']:g}-seed0.safetensors")
        balanced = load_file(tmp_path / f"balanced-s{row['s']:g}-seed0.safetensors")
        assert all(t.dtype == torch.float32 for t in balanced.values())
        stats = {k: v.double() for k, v in balanced.items()}
        assert gaugefix.imbalance_stats(stats, structure)["mu_rel_max"] <= 1e-5
        assert row["balanced_float32_output_change"] <= 1e-5
        for kind, state in (("trained", trained), ("balanced", balanced)):
            reported = row[kind]["int8_output_error"]
            assert math.isclose(reported, _int8_error(state), rel_tol=1e-9), (kind, reported)
            assert 0 < reported < 0.1
