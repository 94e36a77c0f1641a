"""Audit of the second input of other sizes that ``balance`` and ``inspect`` check on.

- A token model of fixed batch (a forward that reshapes to one sequence) failed on both the
  longer larger batch and the larger batch, so it was checked on the example input only, and a
  length read where no trace sees it was balanced and written; the second input now falls back
  to the length change alone, and the size is caught.
- A forward that draws (dropout kept in training mode) drew other numbers before and after
  balancing, so ``balance`` refused a correct checkpoint (on the example input and on the second)
  where ``inspect``'s ``verify`` (which resets torch's random state) said the structure holds;
  each compared float64 forward now starts from one seed, torch's random state restored after.
- With ``--allow-value-dependent`` a structure fails on the second input when it takes another
  path (an expert the example routes nothing to), not a size: the refusal said to give an
  example of the sizes you use; it now names the paths too.
- A model whose outputs on the second input are all zero (or hold no floating tensor) cannot show
  a change there, yet ``balance`` printed a change of 0 on it as if it had checked; such a shape
  is now passed over as one the model fails on, and ``balance_state_dict`` refuses such a check
  input, naming its shape.
- A second input that cannot be made (too large for the memory) ended the command with "cannot
  make an example input"; the second input now falls back past it, saying why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from gaugefix import cli as gaugefix_cli
from gaugefix.checkpoint import CheckpointError, balance_state_dict, read_state_dict
from gaugefix.cli import CHECK_LONGER, app
from test_cli_sizes import DIM, HIDDEN, VOCAB, Tokens, _balance, _gauged

pytestmark = pytest.mark.usefixtures("single_thread")

cli = CliRunner()
HERE = "test_cli_sizes_audit"
LENGTH = 7
EXACT = 1e-12  # a float64 balance of an exact structure moves the outputs by rounding alone


class OneSequence(nn.Module):
    """Token ids ``[1, T]`` -> ``head(relu(up(emb)) @ down + 0.5 (T - 7))``: the forward views
    the embeddings as one sequence (it runs at batch 1 only), and the offset is a plain float to
    the trace, 0 at the example's length of 7 only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM, bias=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        x = self.emb(ids).view(length, DIM)
        return self.head(self.down(F.relu(self.up(x))) + 0.5 * (length - LENGTH))


class Dropped(nn.Module):
    """A ReLU MLP with dropout on its hidden units in training mode, also in eval mode: the
    hidden units' rescaling commutes with the mask, so the structure holds for each draw."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.dropout(F.relu(self.l1(x)), 0.5, training=True))


def one_sequence() -> nn.Module:
    torch.manual_seed(0)
    return OneSequence()


IDS = ["--input-ids", f"1,{LENGTH}", "--vocab", str(VOCAB)]


def test_a_fixed_batch_token_model_is_checked_on_a_longer_input(tmp_path):
    tensors = _gauged(one_sequence(), torch.randint(VOCAB, (1, LENGTH)))
    result, before, src, out = _balance(tmp_path, f"{HERE}:one_sequence", tensors, *IDS)
    assert result.exit_code == 2, result.output
    assert "the second input keeps the example's batch: the model fails on shape (2, 7)" in (
        result.stdout
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    shape = f"(1, {LENGTH + CHECK_LONGER})"
    assert len(errors) == 1 and f"on the second input of shape {shape}" in errors[0], result.output
    assert not out.exists() and src.read_bytes() == before


def test_inspect_refuses_to_save_the_structure_of_a_fixed_batch_token_model(tmp_path):
    save = tmp_path / "s.json"
    result = cli.invoke(app, ["inspect", f"{HERE}:one_sequence", *IDS, "--save", str(save)])
    assert result.exit_code == 2, result.output
    shape = f"(1, {LENGTH + CHECK_LONGER})"
    assert f"does not hold on a second input of shape {shape}" in result.stderr, result.output
    assert not save.exists()


def test_a_forward_that_draws_is_balanced_and_written(tmp_path):
    torch.manual_seed(0)
    tensors = {k: v.float() for k, v in _gauged(Dropped(), torch.randn(5, 4)).items()}
    result, _, _, out = _balance(tmp_path, f"{HERE}:Dropped", tensors, "--input-shape", "5,4")
    assert result.exit_code == 0, result.output
    assert "largest output change on a second input of shape (6, 4)" in result.stdout
    assert read_state_dict(out).tensors.keys() == tensors.keys()


def test_balance_state_dict_keeps_a_forward_that_draws_and_the_random_state():
    torch.manual_seed(0)
    x, checks = torch.randn(5, 4), [torch.randn(6, 4)]
    tensors, model = _gauged(Dropped(), x), Dropped()
    state = torch.get_rng_state()
    _, report = balance_state_dict(model, tensors, x, checks=checks)
    assert torch.equal(torch.get_rng_state(), state)
    assert report.exact_relative <= EXACT and report.check_exact_relative <= EXACT
    assert report.before["norm_sq"] > report.after["norm_sq"]


class Routed(nn.Module):
    """A ReLU layer, then each sample to the one of 3 ReLU experts its router scores highest, in
    a Python loop over the experts chosen (value-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.router = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 3, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 5), nn.ReLU(), nn.Linear(5, 2)) for _ in range(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        choice, out = self.router(h).argmax(-1), x.new_zeros(x.shape[0], 2)
        for e in choice.unique().tolist():
            out[choice == e] = self.experts[e](h[choice == e])
        return out


def routed() -> nn.Module:
    torch.manual_seed(0)
    return Routed()


def test_a_structure_that_fails_on_another_path_says_so(tmp_path):
    """The second input routes to an expert the example does not: the refusal names the paths
    (not only the sizes) as what the example input must cover."""
    save = tmp_path / "s.json"
    args = ["inspect", f"{HERE}:routed", "--input-shape", "1,4", "--allow-value-dependent"]
    result = cli.invoke(app, [*args, "--save", str(save)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not hold on a second input of shape (2, 4)" in errors[0]
    assert "with --allow-value-dependent, taking the paths yours take" in errors[0], result.output
    assert not save.exists()


ZERO_BATCH = 5  # the batch at which ZeroElsewhere's outputs are not zeroed


class ZeroElsewhere(nn.Module):
    """A ReLU MLP ``[B, 4] -> [B, 2]`` whose outputs are multiplied by ``B == 5`` (all zero at
    any other batch); ``ints``: at another batch the output is the argmax instead (no floating
    tensor)."""

    def __init__(self, ints: bool = False) -> None:
        super().__init__()
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)
        self.ints = ints

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(F.relu(self.l1(x)))
        if self.ints and x.shape[0] != ZERO_BATCH:
            return out.argmax(-1)
        return out * float(x.shape[0] == ZERO_BATCH)


class TokensZeroElsewhere(nn.Module):
    """Token ids ``[B, T]`` -> embedding, a ReLU MLP, logits, all zero at a batch other than 1."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up, self.head = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(F.relu(self.up(self.emb(ids)))) * float(ids.shape[0] == 1)


def no_floats_elsewhere() -> nn.Module:
    return ZeroElsewhere(ints=True)


def tokens_zero_elsewhere() -> nn.Module:
    torch.manual_seed(0)
    return TokensZeroElsewhere()


ZEROS = "the model's outputs on shape (6, 4) are all zero"


@pytest.mark.parametrize(
    "factory, said",
    [("ZeroElsewhere", ZEROS), ("no_floats_elsewhere", "hold no floating tensor")],
)
def test_a_second_input_whose_outputs_are_all_zero_is_not_called_checked(tmp_path, factory, said):
    torch.manual_seed(0)
    model = gaugefix_cli._load_model(f"{HERE}:{factory}")[0]
    tensors = _gauged(model, torch.randn(ZERO_BATCH, 4))
    result, _, _, out = _balance(tmp_path, f"{HERE}:{factory}", tensors, "--input-shape", "5,4")
    assert result.exit_code == 0, result.output
    assert "second input of shape" not in result.output
    lines = [line for line in result.output.splitlines() if "example input only" in line]
    assert len(lines) == 1 and said in lines[0] and "(6, 4)" in lines[0], result.output
    assert "cannot show a change" in lines[0]
    assert read_state_dict(out).tensors.keys() == tensors.keys()


def test_inspect_passes_over_a_second_input_whose_outputs_are_all_zero():
    result = cli.invoke(app, ["inspect", f"{HERE}:ZeroElsewhere", "--input-shape", "5,4"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "other sizes" in line]
    assert len(lines) == 1 and ZEROS in lines[0], result.output
    assert "structure not checked" not in result.stderr


def test_a_token_model_zero_at_a_larger_batch_is_checked_on_a_longer_input(tmp_path):
    tensors = _gauged(tokens_zero_elsewhere(), torch.randint(VOCAB, (1, LENGTH)))
    result, _, _, out = _balance(tmp_path, f"{HERE}:tokens_zero_elsewhere", tensors, *IDS)
    assert result.exit_code == 0, result.output
    longer = f"(1, {LENGTH + CHECK_LONGER})"
    assert f"largest output change on a second input of shape {longer}" in result.stdout
    kept = "the second input keeps the example's batch: the model's outputs on shape (2, 7) are"
    assert kept in result.stdout and "all zero" in result.stdout, result.output
    assert out.exists()


@pytest.mark.parametrize("factory", [ZeroElsewhere, no_floats_elsewhere])
def test_balance_state_dict_refuses_a_check_input_whose_outputs_show_nothing(factory):
    torch.manual_seed(0)
    x = torch.randn(ZERO_BATCH, 4, dtype=torch.float64)
    tensors = _gauged(factory(), x)
    with pytest.raises(CheckpointError, match=r"check input of shape \(6, 4\)"):
        balance_state_dict(factory(), tensors, x, checks=[torch.randn(ZERO_BATCH + 1, 4)])
    _, report = balance_state_dict(factory(), tensors, x)  # the example input alone shows
    assert report.exact_relative <= EXACT and report.within_tolerance


def _undrawable(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
    """``cli._drawn`` fails for ``shape`` as for one too large for the memory."""
    drawn = gaugefix_cli._drawn

    def failing(wanted, *args, **kwargs):
        return drawn((100_000,) * 3 if tuple(wanted) == shape else wanted, *args, **kwargs)

    monkeypatch.setattr(gaugefix_cli, "_drawn", failing)


def test_a_second_input_that_cannot_be_made_falls_back(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tensors = _gauged(Dropped(), torch.randn(5, 4))
    _undrawable(monkeypatch, (6, 4))
    result, _, _, out = _balance(tmp_path, f"{HERE}:Dropped", tensors, "--input-shape", "5,4")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "example input only" in line]
    assert len(lines) == 1 and "an input of shape (6, 4) cannot be made" in lines[0], result.output
    assert "cannot make an example input" not in result.output
    assert read_state_dict(out).tensors.keys() == tensors.keys()


def test_a_longer_token_input_that_cannot_be_made_keeps_the_length(tmp_path, monkeypatch):
    tensors = _gauged(Tokens(), torch.randint(VOCAB, (2, 5)))
    _undrawable(monkeypatch, (3, 5 + CHECK_LONGER))
    ids = ["--input-ids", "2,5", "--vocab", str(VOCAB)]
    result, _, _, out = _balance(tmp_path, f"{HERE}:Tokens", tensors, *ids)
    assert result.exit_code == 0, result.output
    assert "largest output change on a second input of shape (3, 5)" in result.stdout
    kept = f"the second input keeps the example's length: an input of shape (3, {5 + CHECK_LONGER})"
    assert f"{kept} cannot be made" in result.stdout, result.output
    assert out.exists()
