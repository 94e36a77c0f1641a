"""A new user's first steps with the command line: every option and command explains itself in
``--help``, and the mistakes of a first hour (a ``save_pretrained`` folder as ``--weights``, an
example input the model does not take) end in one line that says what to give instead, with
nothing written; the summary a user first prints is the one the README shows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

import gaugefix
from gaugefix.checkpoint import CheckpointError, read_state_dict
from gaugefix.cli import app
from gaugefix.experiments.engine import STRENGTH_METHODS

cli = CliRunner()
COMMANDS = ("inspect", "balance", "reproduce", "sweep", "report")


def _one_line(result, *messages: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for message in messages:
        assert message in result.output, result.output
    return result.output


def test_every_option_of_every_command_has_a_help_text():
    """``sweep --steps`` had none."""
    group = typer.main.get_command(app)
    options = 0
    for name in COMMANDS:
        command = group.commands[name]
        assert command.help, name
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts}"
                options += 1
    assert options > 30  # every command's options were looked at


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_shows_no_markup_of_docstrings(args):
    """The top-level listing showed ``balance``'s help as ``(``gaugefix.equalize_``)``, the
    reStructuredText quotes of its docstring, with a line break in mid-sentence."""
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "``" not in result.output


def _help(command: str, option: str | None = None) -> str:
    """The help text of ``command`` (or of its ``option``), as ``--help`` shows it."""
    found = typer.main.get_command(app).commands[command]
    if option is None:
        return " ".join(found.help.split())
    return next(" ".join(p.help.split()) for p in found.params if option in p.opts)


def test_top_level_help_says_what_balance_does_in_one_paragraph():
    assert _help("balance") == (
        "Balance saved weights (hard gauge fixing), the function unchanged: the minimal-norm "
        "point of their orbit, or with --objective the point gaugefix.equalize_ chooses."
    )
    assert "\n" not in typer.main.get_command(app).commands["balance"].help


def test_reproduce_names_the_paper_not_a_seed_paper():
    """'the seed paper' read as a paper about random seeds."""
    text = _help("reproduce")
    assert "seed paper" not in text
    assert "arXiv 2602.14729" in text


def test_sweep_help_says_the_lists_are_comma_separated():
    for option in ("--method", "--strength", "--lr", "--init-imbalance", "--optimizer"):
        assert _help("sweep", option).startswith("comma-separated"), option
    strengths = ", ".join(STRENGTH_METHODS)
    assert _help("sweep", "--strength") == f"comma-separated strengths of {strengths}"


def test_a_save_pretrained_folder_as_weights_names_the_file_in_it(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(folder)
    assert str(err.value) == (
        f"{folder} is not a regular file (a directory): give the weights file in it: "
        f"{folder / 'model.safetensors'}"
    )


def test_a_sharded_folder_names_its_index_alone(tmp_path):
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path)
    assert str(err.value).endswith(
        f"give the weights file in it: {tmp_path / 'model.safetensors.index.json'}"
    )


def test_a_folder_without_weights_says_what_a_weights_file_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path)
    assert "give a weights file (" in str(err.value) and ".safetensors" in str(err.value)
    assert str(err.value).endswith("none is in it")


def test_balance_on_a_folder_is_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(nn.Linear(2, 2).state_dict(), folder / "weights.pt")
    out = tmp_path / "out.pt"
    result = cli.invoke(
        app, ["balance", "--model", "mlp", "--weights", str(folder), "--out", str(out)]
    )
    _one_line(result, f"give the weights file in it: {folder / 'weights.pt'}")
    assert not out.exists()


def test_an_input_shape_the_model_does_not_take_names_the_option(tmp_path):
    """The tracer's line named the failing op only ('torch.conv2d failed in module '0': ...');
    the model fails on that input without gaugefix too, so the line says which option to fix."""
    result = cli.invoke(app, ["inspect", "gaugefix.zoo:cnn", "--input-shape", "1,1,16,16"])
    _one_line(
        result,
        "torch.conv2d failed in module '0'",
        "the model fails on the example input of shape (1, 1, 16, 16) without gaugefix too: "
        "give the input it takes with --input-shape",
    )
    weights, out = tmp_path / "cnn.pt", tmp_path / "out.pt"
    torch.save(gaugefix.zoo.cnn().state_dict(), weights)
    result = cli.invoke(
        app,
        ["balance", "--model", "gaugefix.zoo:cnn", "--weights", str(weights), "--out", str(out)]
        + ["--input-shape", "1,1,16,16"],
    )
    _one_line(result, "give the input it takes with --input-shape")
    assert not out.exists()


def test_token_ids_beyond_the_vocabulary_name_input_ids_and_vocab():
    result = cli.invoke(
        app, ["inspect", "gaugefix.zoo:GPT", "--input-ids", "1,8", "--vocab", "100000"]
    )
    _one_line(result, "F.embedding failed", "give the input it takes with --input-ids and --vocab")


def test_a_structural_refusal_is_not_blamed_on_the_input(monkeypatch):
    """A forward that runs but is refused (control flow reading its input) keeps its own line."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # `tests.` imports from the root
    result = cli.invoke(app, ["inspect", "tests.test_first_hour:_branchy", "--input-shape", "1,4"])
    output = _one_line(result, "--allow-value-dependent")
    assert "without gaugefix too" not in output


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.relu(h) if h.sum() > 0 else h)


def _branchy() -> nn.Module:
    return _Branchy()


def test_summary_rows_without_notes_end_at_their_count():
    """A hidden layer's row ended in two spaces (its empty notes), so the README could not show
    the summary it prints: a ``# prints:`` line has no trailing spaces."""
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    lines = gaugefix.discover(model, torch.randn(1, 16)).summary().splitlines()
    assert lines[2:4] == ["0            64          64", "2            64          64"]
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize(
    "hidden, total",
    [
        (1, "1 generator (1 neuron) over 3 parameters; 1 producing channel excluded"),
        (2, "2 generators (2 neuron) over 3 parameters; 2 producing channels excluded"),
    ],
)
def test_summary_total_counts_in_the_singular_and_plural(hidden, total):
    """The total said "1 producing channels excluded" (and "1 generators")."""
    model = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
    assert gaugefix.discover(model, torch.randn(2, 3)).summary().splitlines()[-1] == total


def test_report_without_a_store_says_which_command_makes_one(tmp_path):
    out = tmp_path / "results"
    result = cli.invoke(app, ["report", str(out)])
    _one_line(
        result,
        f"error: no store at {out / 'results.sqlite'}: `gaugefix sweep --out {out}` or "
        f"`gaugefix reproduce --out {out}` makes one",
    )
    assert not out.exists()


def _gpt2() -> nn.Module:
    """A GPT-2 of 2 blocks of width 16 and 50 tokens (transformers)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_another_models_weights_say_so_in_one_line(tmp_path, monkeypatch):
    """An MLP's weights for a transformers GPT-2 read '0.bias, 0.weight, 2.bias and 1 more not
    in the model (named as transformers' conversion of the checkpoint layout names them)'."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    weights, out = tmp_path / "net.pt", tmp_path / "out.pt"
    torch.save(gaugefix.zoo.mlp().state_dict(), weights)
    names = len(_gpt2().state_dict())
    result = cli.invoke(
        app,
        ["balance", "--model", "tests.test_first_hour:_gpt2", "--weights", str(weights)]
        + ["--out", str(out), "--input-ids", "1,8", "--vocab", "50"],
    )
    _one_line(
        result,
        "the file may hold another model's weights: 6 of its 6 names are not in the model "
        "(0.bias, 0.weight, 2.bias and 3 more), ",
        f"and {names} of the model's {names} are missing from it (transformer.wte.weight, ",
    )
    assert not out.exists()


def test_a_built_in_model_with_another_models_weights_says_so(tmp_path):
    weights, out = tmp_path / "cnn.pt", tmp_path / "out.pt"
    torch.save(gaugefix.zoo.cnn().state_dict(), weights)
    result = cli.invoke(
        app, ["balance", "--model", "mlp", "--weights", str(weights), "--out", str(out)]
    )
    _one_line(result, "the file may hold another model's weights: ", " names are not in the model")
    assert not out.exists()


def test_a_file_lacking_most_of_the_models_names_says_so():
    """One layer's weights of three read '2.weight, 2.bias, 4.weight and 1 more missing'."""
    from gaugefix.checkpoint import balance_state_dict

    model = gaugefix.zoo.mlp()
    state = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    with pytest.raises(CheckpointError) as err:
        balance_state_dict(model, state, torch.zeros(1, 16))
    assert str(err.value) == (
        "the weights do not fit the model, and the file may hold another model's weights: 0 of "
        "its 2 names are not in the model, and 4 of the model's 6 are missing from it (2.weight, "
        "2.bias, 4.weight and 1 more)"
    )


def test_one_name_amiss_keeps_the_conversion_wording():
    """A save_pretrained checkpoint with one name too many is not another model's."""
    from gaugefix.checkpoint import balance_state_dict

    model = _gpt2()
    state = {**model.state_dict(), "transformer.nonsense.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError) as err:
        balance_state_dict(model, state, torch.zeros(1, 8, dtype=torch.int64))
    assert str(err.value) == (
        "the weights do not fit the model: transformer.nonsense.weight not in the model (named "
        "as transformers' conversion of the checkpoint layout names them)"
    )


def test_inspect_of_a_causal_lm_prints_no_note_on_a_cache_it_did_not_ask_for(monkeypatch):
    """``inspect`` called a transformers causal LM with its default ``use_cache=True`` and printed
    a note that the output holds a ``DynamicCache``; the structure is the same without it."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers before 5 returns caches as tuples, which are outputs")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    result = cli.invoke(
        app, ["inspect", "tests.test_first_hour:_gpt2", "--input-ids", "1,8", "--vocab", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "DynamicCache" not in result.output and "note:" not in result.output
    ids = torch.randint(50, (1, 8), generator=torch.Generator().manual_seed(0))
    cached = gaugefix.discover(_gpt2().eval(), ids)
    assert any("DynamicCache" in note for note in cached.notes)  # the note is true there
    summary = "\n".join(line for line in cached.summary().splitlines() if "note:" not in line)
    assert result.stdout.splitlines()[1:] == summary.splitlines()
    uncached = gaugefix.discover(_gpt2().eval(), ids, use_cache=False)
    assert {**cached.to_dict(), "notes": []} == {**uncached.to_dict(), "notes": []}
