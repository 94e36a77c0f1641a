"""``gaugefix balance`` and ``gaugefix inspect`` as a new user first calls them: a language
model given a float example input is told to give token ids, and an output whose name says the
other format than the weights read is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import gaugefix
from gaugefix.cli import app

cli = CliRunner()
HERE = "test_cli_user"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def test_token_model_given_float_input_is_told_to_give_token_ids() -> None:
    result = cli.invoke(app, ["inspect", "gaugefix.zoo:GPT", "--input-shape", "1,16"])
    assert result.exit_code == 2
    assert "give the input it takes with --input-ids 1,16 and --vocab" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_float_model_given_wrong_shape_is_still_told_input_shape() -> None:
    result = cli.invoke(app, ["inspect", f"{HERE}:mlp", "--input-shape", "1,4"])
    assert result.exit_code == 2
    assert result.output.strip().endswith("give the input it takes with --input-shape")


@pytest.mark.parametrize("source", ["w.pt", "w.bin", "w"])
def test_torch_weights_to_a_safetensors_name_are_refused(tmp_path: Path, source: str) -> None:
    src = tmp_path / source
    torch.save(mlp().state_dict(), src)
    args = ["balance", "--model", f"{HERE}:mlp", "--weights", str(src), "--out"]
    result = cli.invoke(app, [*args, str(tmp_path / "out.safetensors"), "--input-shape", "1,5"])
    assert result.exit_code == 2
    assert "its name says safetensors, but the weights read are torch" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [source]


def test_output_named_as_its_format_is_written(tmp_path: Path) -> None:
    src, out = tmp_path / "w.pt", tmp_path / "out.bin"
    torch.save(mlp().state_dict(), src)
    args = ["balance", "--model", f"{HERE}:mlp", "--weights", str(src), "--out", str(out)]
    result = cli.invoke(app, [*args, "--input-shape", "1,5"])
    assert result.exit_code == 0, result.output
    assert set(torch.load(out, weights_only=True)) == set(mlp().state_dict())


def test_summary_calls_the_key_side_of_attention_pairs_paired_not_joined() -> None:
    model = gaugefix.zoo.GPT(vocab=16, dim=8, heads=2, layers=1)
    structure = gaugefix.discover(model, torch.randint(0, 16, (1, 6)))
    keyed = [i for i, kind in enumerate(structure.generator_kinds) if kind == "query-key"]
    assert structure._shared_note(keyed) == (
        f"{len(keyed)} paired against 'blocks.0.attn.qkv' (the divided side of attention pairs)"
    )
    residual = [i for i, kind in enumerate(structure.generator_kinds) if kind == "neuron"]
    assert "(outputs joined, e.g. by a residual sum)" in structure._shared_note(residual)
