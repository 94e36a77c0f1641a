"""Small walls of the command line and the training callbacks: ``inspect --model`` as ``balance``
takes it, the directories an output's write makes named in the summary, the weights the
calibration pass could not follow named in ``balance --objective activation``'s summary, and
the callbacks' ``repr``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import gaugefix
from gaugefix.cli import app
from gaugefix.zoo import mlp
from test_equalize_products import D, moe
from test_equalize_products2 import PairGathered

cli = CliRunner()
TOKENS = 16  # rows of the example input of the mixture below


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def small_mlp() -> nn.Module:
    return mlp((5, 7, 9, 3))


# -- inspect --model ------------------------------------------------------------------------------


def test_inspect_takes_the_model_as_an_option_as_balance_does():
    """``inspect --model`` failed with typer's generic usage error ("No such option")."""
    positional = cli.invoke(app, ["inspect", "test_cli_walls:small_mlp", "--input-shape", "1,5"])
    option = cli.invoke(
        app, ["inspect", "--model", "test_cli_walls:small_mlp", "--input-shape", "1,5"]
    )
    assert positional.exit_code == 0 and option.exit_code == 0, option.output
    assert option.output == positional.output
    assert "16 generators (16 neuron)" in option.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["mlp", "--model", "resnet"], "give the model once"),
        ([], "give the model"),
        (["--save", "x.json"], "give the model"),
    ],
    ids=["both", "neither", "neither-with-options"],
)
def test_inspect_with_the_model_twice_or_not_at_all_is_one_line(
    tmp_path, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["inspect", *args])
    _one_line(result, message)
    assert list(tmp_path.iterdir()) == []


# -- directories made for an output --------------------------------------------------------------


def test_balance_says_which_directories_it_made_for_out(tmp_path):
    """A missing parent of ``--out`` was made without a word."""
    src = tmp_path / "in.pt"
    torch.save(small_mlp().state_dict(), src)
    out = tmp_path / "new" / "deeper" / "out.pt"
    args = ["--model", "test_cli_walls:small_mlp", "--weights", str(src), "--out", str(out)]
    result = cli.invoke(app, ["balance", *args, "--input-shape", "1,5"])
    assert result.exit_code == 0, result.output
    made = f"{tmp_path / 'new'}, {tmp_path / 'new' / 'deeper'}"
    assert f"balanced weights written to {out} (torch, float32); made {made}" in result.output
    assert out.is_file()
    again = cli.invoke(app, ["balance", *args, "--input-shape", "1,5"])
    assert again.exit_code == 0 and "made" not in again.output, again.output


def test_inspect_says_which_directory_it_made_for_save(tmp_path):
    out = tmp_path / "new" / "structure.json"
    result = cli.invoke(app, ["inspect", "mlp", "--save", str(out)])
    assert result.exit_code == 0, result.output
    assert f"structure written to {out}; made {tmp_path / 'new'}\n" in result.output
    assert gaugefix.GaugeStructure.load(out).num_generators > 0


# -- weights the calibration pass could not follow ------------------------------------------------


def pair_gathered() -> nn.Module:
    """A mixture whose fused ``gate_up`` is gathered by a 2-D index: a read the calibration pass
    sees but cannot map to its dims (its channels fall back to ``"range"``)."""
    fused, _ = moe("bmm")
    model = PairGathered("pairs").to(torch.float64).eval()
    model.load_state_dict(fused.state_dict())
    return model


def test_balance_activation_names_the_uncalibrated_weights(tmp_path):
    """Only a Python warning said that ``gate_up`` fell back to ``"range"``; the summary did
    not."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(pair_gathered().state_dict(), src)
    args = ["--model", "test_cli_walls:pair_gathered", "--weights", str(src), "--out", str(out)]
    with pytest.warns(UserWarning, match="gate_up"):  # the Python warning stays as it was
        result = cli.invoke(
            app, ["balance", *args, "--input-shape", f"{TOKENS},{D}", "--objective", "activation"]
        )
    assert result.exit_code == 0, result.output
    line = (
        "activation: 1 weight the calibration pass cannot follow, its channels balanced as "
        "range does: gate_up\n"
    )
    assert line in result.output
    assert out.is_file()


def test_balance_activation_lists_a_few_uncalibrated_names_and_counts_the_rest():
    from gaugefix import cli as command

    names = tuple(f"w{i}" for i in range(command.SHOWN_NAMES + 2))
    assert command._uncalibrated_line(names) == (
        f"activation: {len(names)} weights the calibration pass cannot follow, their channels "
        f"balanced as range does: {', '.join(names[: command.SHOWN_NAMES])} and 2 more"
    )
    assert command._uncalibrated_line(()) is None


def test_balance_activation_says_nothing_when_every_weight_is_calibrated(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(small_mlp().state_dict(), src)
    args = ["--model", "test_cli_walls:small_mlp", "--weights", str(src), "--out", str(out)]
    result = cli.invoke(
        app, ["balance", *args, "--input-shape", "4,5", "--objective", "activation"]
    )
    assert result.exit_code == 0, result.output
    assert "cannot follow" not in result.output


# -- the callbacks' repr --------------------------------------------------------------------------


def _structure() -> gaugefix.GaugeStructure:
    return gaugefix.discover(small_mlp(), torch.randn(1, 5))


def test_the_lightning_callback_shows_its_options_and_structure():
    """Its repr was the default ``<...GaugeFixingCallback object at 0x...>``."""
    pytest.importorskip("lightning.pytorch")
    from gaugefix.integrations.lightning import GaugeFixingCallback

    structure = _structure()
    given = GaugeFixingCallback(strength=0.5, structure=structure, every=3)
    assert repr(given) == (
        f"GaugeFixingCallback(mode='exact', strength=0.5, every=3, "
        f"generators={structure.num_generators})"
    )
    later = GaugeFixingCallback(strength=2.0, mode="penalty")
    assert repr(later) == (
        "GaugeFixingCallback(mode='penalty', strength=2.0, every=1, generators=None)"
    )


def test_the_trainer_callback_shows_its_options_and_structure(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gaugefix.integrations.transformers import GaugeFixingCallback

    model = small_mlp()
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = transformers.Trainer(model, args)
    structure = _structure()
    callback = GaugeFixingCallback(trainer, 1.0, structure=structure)
    every = gaugefix.train.hook.EVERY
    assert repr(callback) == (
        f"GaugeFixingCallback(mode='exact', strength=1.0, every={every}, "
        f"generators={structure.num_generators})"
    )


def test_gauge_fixing_and_the_callbacks_word_their_options_alike():
    """One wording of mode, strength and every: :class:`gaugefix.GaugeFixing`'s."""
    from gaugefix.train.hook import options_repr

    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = gaugefix.GaugeFixing(optimizer, model, _structure(), 0.5, every=4)
    try:
        assert repr(hook).startswith(f"GaugeFixing({options_repr('exact', 0.5, 4)}, ")
        assert options_repr("exact", 0.5, 4) == "mode='exact', strength=0.5, every=4"
    finally:
        hook.remove()
