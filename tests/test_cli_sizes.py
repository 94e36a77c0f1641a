"""``gaugefix balance`` checks the written weights on a second input of other sizes.

The structure is discovered on the example input alone, and a forward may read the input's
sizes in a way no trace sees (docs/generators.md): ``0.5 * (B - 5)`` is a plain ``0.0`` at a
batch of 5, so the hidden ReLU units look rescalable, while at any other batch the constant
breaks the rescaling. Balanced on the example only, such a checkpoint was written and reported
within tolerance; the command now also compares the outputs on an input one sample larger (and,
for token ids, a few tokens longer) and refuses to write when they move. A model of fixed sizes
falls back to the batch change only, or says that the example alone was checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

import gaugefix
from gaugefix.checkpoint import balance_state_dict, read_state_dict
from gaugefix.cli import CHECK_LONGER, app
from gaugefix.zoo import mlp

pytestmark = pytest.mark.usefixtures("single_thread")

cli = CliRunner()
HERE = "test_cli_sizes"
BATCH, HIDDEN, VOCAB, DIM, LENGTH = 5, 6, 11, 6, 7


class SizeOffset(nn.Module):
    """``head(relu(l1(x)) + 0.5 * (B - 5))``: the offset is a plain float to the trace (a float
    on the left of the size), 0 at the example's batch of 5 only."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.l1(x)) + 0.5 * (x.shape[0] - BATCH))


class FixedBatch(nn.Module):
    """A ReLU MLP whose forward reshapes to a batch of one: it runs at batch 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.l1(x)).view(1, HIDDEN))


class Tokens(nn.Module):
    """Token ids ``[B, T]`` -> an embedding, a ReLU MLP in a residual, logits; with
    ``length``, learned positions for exactly that many tokens (a model of fixed length)."""

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up, self.down = nn.Linear(DIM, 8), nn.Linear(8, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.pos = nn.Parameter(torch.randn(length, DIM)) if length else None

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids) if self.pos is None else self.emb(ids) + self.pos
        return self.head(x + self.down(F.relu(self.up(x))))


def fixed_length() -> nn.Module:
    return Tokens(LENGTH)


def _gauged(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The float64 state dict of ``model`` moved along its orbit by a random gauge of log-scale
    1.5 (far from balanced, the same function)."""
    torch.manual_seed(0)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    gaugefix.random_gauge_(
        model, gaugefix.discover(model, x), 1.5, torch.Generator().manual_seed(1)
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _balance(tmp_path, model: str, tensors: dict[str, Tensor], *input_args: str):
    """``gaugefix balance`` of ``tensors`` saved to a file; the result, the file's bytes before
    the command, the file and the output path."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(tensors, src)
    before = src.read_bytes()
    args = ["balance", "--model", model, "--weights", str(src), "--out", str(out), *input_args]
    return cli.invoke(app, args), before, src, out


def test_a_size_the_trace_cannot_see_is_refused_and_nothing_written(tmp_path):
    torch.manual_seed(0)
    tensors = _gauged(SizeOffset(), torch.randn(BATCH, 4))
    result, before, src, out = _balance(
        tmp_path, f"{HERE}:SizeOffset", tensors, "--input-shape", "5,4"
    )
    assert result.exit_code == 2, result.output
    # the example input alone shows nothing: its change is float64's rounding
    assert "largest output change on the example input" in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "on the second input of shape (6, 4)" in errors[0], result.output
    assert "nothing written" in errors[0]
    assert not out.exists()
    assert src.read_bytes() == before


def test_an_ordinary_mlp_balances_and_reports_the_second_input(tmp_path):
    tensors = {k: v.float() for k, v in _gauged(mlp(), torch.randn(1, 16)).items()}
    result, _, _, out = _balance(tmp_path, "mlp", tensors)
    assert result.exit_code == 0, result.output
    assert "largest output change on a second input of shape (2, 16)" in result.output
    assert "checked on the example input only" not in result.output
    assert out.exists()


def test_a_token_model_is_checked_on_a_longer_and_larger_batch(tmp_path):
    tensors = _gauged(Tokens(), torch.randint(VOCAB, (2, 5)))
    result, _, _, out = _balance(
        tmp_path, f"{HERE}:Tokens", tensors, "--input-ids", "2,5", "--vocab", str(VOCAB)
    )
    assert result.exit_code == 0, result.output
    assert f"second input of shape (3, {5 + CHECK_LONGER})" in result.output
    assert out.exists()


def test_a_model_of_fixed_length_falls_back_to_the_batch_change(tmp_path):
    ids = torch.randint(VOCAB, (2, LENGTH))
    tensors = _gauged(fixed_length(), ids)
    result, _, _, out = _balance(
        tmp_path, f"{HERE}:fixed_length", tensors, "--input-ids", f"2,{LENGTH}", "--vocab",
        str(VOCAB),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"second input of shape (3, {LENGTH})" in result.output
    assert f"the model fails on shape (3, {LENGTH + CHECK_LONGER})" in result.output
    assert out.exists()


def test_a_model_of_fixed_batch_says_it_was_checked_on_the_example_only(tmp_path):
    tensors = _gauged(FixedBatch(), torch.randn(1, 4))
    result, _, _, out = _balance(tmp_path, f"{HERE}:FixedBatch", tensors, "--input-shape", "1,4")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "example input only" in line]
    assert len(said) == 1 and "the model fails on shape (2, 4)" in said[0], result.output
    assert "second input of shape" not in result.output
    assert read_state_dict(out).tensors.keys() == tensors.keys()


def test_balance_state_dict_measures_the_change_on_check_inputs():
    x, checks = torch.randn(1, 16), [torch.randn(3, 16), torch.randn(7, 16, dtype=torch.float64)]
    tensors = _gauged(mlp(), x)
    _, report = balance_state_dict(mlp(), tensors, x, checks=checks)
    assert report.check_shapes == ((3, 16), (7, 16))
    assert len(report.per_check_exact) == 2 and all(len(c) == 1 for c in report.per_check_exact)
    assert 0 <= report.check_exact_relative <= 1e-12
    assert report.per_check_change == report.per_check_exact  # float64: no rounding
    assert report.within_tolerance


def test_balance_state_dict_catches_the_size_on_a_check_input():
    x = torch.randn(BATCH, 4, dtype=torch.float64)
    tensors = _gauged(SizeOffset(), x)
    _, alone = balance_state_dict(SizeOffset(), tensors, x)
    assert alone.within_tolerance and alone.check_shapes == ()  # the example shows nothing
    _, report = balance_state_dict(SizeOffset(), tensors, x, checks=[torch.randn(BATCH + 1, 4)])
    assert report.exact_relative <= 1e-12 < 1e-3 < report.check_exact_relative
    assert not report.kept_in_float64 and not report.within_tolerance


def test_a_check_input_the_model_fails_on_is_one_error():
    x = torch.randn(1, 4)
    with pytest.raises(gaugefix.checkpoint.CheckpointError, match=r"check input of shape \(2, 4\)"):
        balance_state_dict(FixedBatch(), FixedBatch().state_dict(), x, checks=[torch.randn(2, 4)])
