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
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from gaugefix.checkpoint import balance_state_dict, read_state_dict
from gaugefix.cli import CHECK_LONGER, app
from test_cli_sizes import DIM, HIDDEN, VOCAB, _balance, _gauged

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
