"""``gaugefix inspect``."""

from __future__ import annotations

import sys

import pytest
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


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_module_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the command imports modules of the current directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "gaugefix_test_broken_module.py").write_text("raise RuntimeError('at import')\n")
    for target, message in (
        (".:f", "cannot load '.:f': the 'package' argument is required"),
        (":f", "cannot load ':f': Empty module name"),
        ("gaugefix_test_broken_module:f", "cannot load 'gaugefix_test_broken_module:f': at import"),
    ):
        _one_line(cli.invoke(app, ["inspect", target, "--input-shape", "1,3"]), message)
        _one_line(
            cli.invoke(app, ["balance", "--model", target, "--weights", "w.pt", "--out", "o.pt"]),
            message,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gaugefix_test_broken_module.py"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["mlp", "--input-shape", "100000,100000,100000"], "shape (100000, 100000, 100000): "),
        (["mlp", "--input-shape", "99999999999999999999"], "shape (99999999999999999999,): "),
        (
            ["gaugefix.zoo:GPT", "--input-ids", "1,16", "--vocab", "99999999999999999999"],
            "shape (1, 16): ",
        ),
    ],
)
def test_an_example_input_that_cannot_be_made_is_one_line(args, message):
    _one_line(cli.invoke(app, ["inspect", *args]), f"cannot make an example input of {message}")
