"""``gaugefix inspect``."""

from __future__ import annotations

from typer.testing import CliRunner

import gaugefix
from gaugefix.cli import app

cli = CliRunner()


def test_inspect_builtin_example_prints_the_summary():
    result = cli.invoke(app, ["inspect", "resnet"])
    assert result.exit_code == 0, result.output
    assert "48 generators (48 neuron)" in result.output
    assert "normalised by F.batch_norm" in result.output


def test_inspect_factory_with_input_shape_and_save(tmp_path):
    path = tmp_path / "structure.json"
    result = cli.invoke(
        app, ["inspect", "gaugefix.zoo:cnn", "--input-shape", "1,3,16,16", "--save", str(path)]
    )
    assert result.exit_code == 0, result.output
    loaded = gaugefix.GaugeStructure.load(path)
    assert loaded.num_generators == 56
    assert f"{loaded.num_generators} generators" in result.output


def test_inspect_errors_are_one_line_with_exit_2():
    wrong = cli.invoke(app, ["inspect", "gaugefix.zoo:cnn", "--input-shape", "1,1,16,16"])
    assert wrong.exit_code == 2
    assert "torch.conv2d failed in module '0'" in wrong.output
    for args, message in (
        (["inspect", "nope"], "unknown model 'nope'"),
        (["inspect", "gaugefix.zoo:missing", "--input-shape", "1,3"], "cannot load"),
        (["inspect", "gaugefix.zoo:cnn"], "--input-shape is required"),
        (["inspect", "mlp", "--input-shape", "1,x"], "comma-separated integers"),
    ):
        result = cli.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
