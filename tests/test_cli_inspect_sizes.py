"""``gaugefix inspect`` checks the structure on the second input of other sizes ``balance`` uses.

The structure is discovered on the example input alone, and a forward may read the input's
sizes where no trace sees it (``SizeOffset``: ``0.5 * (B - 5)`` is a plain ``0.0`` at the
example's batch of 5, so the hidden ReLU units look rescalable, and at any other batch the
constant breaks the rescaling). ``inspect`` printed and saved such a structure, and its scale
groups, as if it held at every size; it now runs ``gaugefix.verify`` on an input one sample
larger (for token ids, a few tokens longer), says whether the structure holds there, and
``--save`` and ``--scale-groups`` refuse, writing nothing, when it does not.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import gaugefix
from gaugefix.cli import CHECK_LONGER, app
from gaugefix.verification import VERIFY_TOLERANCE
from gaugefix.zoo import mlp
from test_cli_sizes import BATCH, HERE, HIDDEN, LENGTH, VOCAB

pytestmark = pytest.mark.usefixtures("single_thread")

cli = CliRunner()
EXACT = 1e-12  # a float64 gauge of an exact structure moves the outputs by rounding alone
HOLDS = re.compile(
    rf"^structure holds on a second input of shape (\(.*\)): a random gauge moves each output "
    rf"by at most {VERIFY_TOLERANCE:.0e} of its max$"
)


def _inspect(*args: str):
    torch.manual_seed(0)  # the factory's weights
    return cli.invoke(app, ["inspect", *args])


def _held(text: str) -> str:
    """The shape in the one line of ``text`` saying that the structure holds."""
    found = [m for m in map(HOLDS.match, text.splitlines()) if m]
    assert len(found) == 1, text
    return found[0][1]


def test_a_size_the_trace_cannot_see_is_said_in_the_summary():
    result = _inspect(f"{HERE}:SizeOffset", "--input-shape", f"{BATCH},4")
    assert result.exit_code == 0, result.output
    assert "does not hold" not in result.stdout  # the summary alone
    said = [line for line in result.stderr.splitlines() if "does not hold" in line]
    assert len(said) == 1, result.output
    assert f"second input of shape ({BATCH + 1}, 4)" in said[0]
    assert f"{HIDDEN} of {HIDDEN} generators move the outputs there" in said[0]
    assert "structure.restrict(" in said[0] and "sizes you use" in said[0]
    assert "structure holds" not in result.output


@pytest.mark.parametrize("groups", [False, True])
def test_a_structure_that_moves_the_outputs_elsewhere_is_not_written(tmp_path, groups):
    save = tmp_path / "new" / "structure.json"
    extra = ["--scale-groups"] if groups else []
    result = _inspect(
        f"{HERE}:SizeOffset", "--input-shape", f"{BATCH},4", "--save", str(save), *extra
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert f"does not hold on a second input of shape ({BATCH + 1}, 4)" in errors[0]
    assert errors[0].endswith("nothing written")
    assert result.stdout == ""  # no summary, no scale groups
    assert not save.exists() and not save.parent.exists()


def test_scale_groups_of_a_structure_that_moves_the_outputs_elsewhere_are_refused():
    result = _inspect(f"{HERE}:SizeOffset", "--input-shape", f"{BATCH},4", "--scale-groups")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "error: the structure does not hold" in result.stderr


def test_an_ordinary_mlp_holds_and_is_saved(tmp_path):
    save = tmp_path / "mlp.json"
    result = _inspect("mlp", "--save", str(save))
    assert result.exit_code == 0, result.output
    assert _held(result.stderr) == "(2, 16)"
    structure = gaugefix.GaugeStructure.load(save)
    torch.manual_seed(0)  # the command's weights
    checked = gaugefix.verify(mlp().eval(), structure, torch.randn(2, 16, dtype=torch.float64))
    assert structure.num_generators > 0 and checked.max_change <= EXACT


def test_scale_groups_stay_json_and_the_check_goes_to_stderr(tmp_path):
    save = tmp_path / "mlp.json"
    result = _inspect("mlp", "--scale-groups", "--save", str(save))
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)
    assert isinstance(groups, list) and groups
    assert _held(result.stderr) == "(2, 16)"
    assert save.exists()


def test_a_token_model_holds_on_a_longer_and_larger_batch():
    result = _inspect(f"{HERE}:Tokens", "--input-ids", "2,5", "--vocab", str(VOCAB))
    assert result.exit_code == 0, result.output
    assert _held(result.stderr) == f"(3, {5 + CHECK_LONGER})"


def test_a_model_of_fixed_length_is_checked_on_the_batch_change():
    ids = ["--input-ids", f"2,{LENGTH}", "--vocab", str(VOCAB)]
    result = _inspect(f"{HERE}:fixed_length", *ids)
    assert result.exit_code == 0, result.output
    assert f"the model fails on shape (3, {LENGTH + CHECK_LONGER})" in result.stderr
    assert _held(result.stderr) == f"(3, {LENGTH})"


def test_a_model_of_fixed_batch_says_no_other_size_was_checked(tmp_path):
    save = tmp_path / "fixed.json"
    result = _inspect(f"{HERE}:FixedBatch", "--input-shape", "1,4", "--save", str(save))
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "no input of other sizes" in line]
    assert len(said) == 1 and "the model fails on shape (2, 4)" in said[0], result.output
    assert "structure holds" not in result.output and "example input only" not in result.output
    assert save.exists()
