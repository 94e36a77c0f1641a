"""Regressions found by an audit of ``equalize_`` and of balancing saved weights: calibration
inputs without a batch dim, and checkpoints whose storage sharing differs from the model's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix.checkpoint import (
    CheckpointError,
    StateDictFile,
    balance_state_dict,
    read_state_dict,
    write_state_dict,
)
from test_checkpoint import TokenModel, gauged

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64


@pytest.mark.parametrize("dims", [1, 2])
def test_activation_reads_the_channels_of_an_unbatched_convolution_input(dims):
    """A convolution takes an input without a batch dim too (``[C, *spatial]``): its channels
    are then dim 0, not 1. With every spatial size equal to the channel count a wrong dim is
    read silently; the calibration must give the same point with or without the batch dim."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 4, 1), nn.ReLU(), conv(4, 2, 1)).to(DTYPE).eval()
    x = torch.randn(1, 3, *[4] * dims, dtype=DTYPE)
    x = x * torch.tensor([1.0, 5.0, 0.2], dtype=DTYPE).view(1, 3, *[1] * dims)
    structure = gaugefix.discover(model, x)
    batched, unbatched = model, copy.deepcopy(model)
    gaugefix.equalize_(batched, structure, "activation", calibration=x)
    result = gaugefix.equalize_(unbatched, structure, "activation", calibration=x[0])
    assert result.converged
    for p, q in zip(batched.parameters(), unbatched.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-12, atol=0)
    with torch.no_grad():  # alpha = 1/2: each channel's range equals its readers' columns
        act = torch.relu(unbatched[0](x[0])).abs().amax(tuple(range(1, dims + 1)))
    col = unbatched[2].weight.detach().abs().amax((0, *range(2, dims + 2)))
    assert torch.allclose(act, col, rtol=1e-12, atol=0)


class Untied(TokenModel):
    """:class:`TokenModel` with its own head, not the embedding (``tie_word_embeddings=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.head.weight = nn.Parameter(self.emb.weight.detach().clone())


@pytest.mark.parametrize("objective", ["norm", "activation"])  # both move the head
def test_a_file_that_ties_what_the_model_does_not_is_written_untied(tmp_path, objective):
    """A PyTorch file saved from a tied model holds the embedding and the head in one storage;
    loaded into a model that unties them, they balance to different values, and both are
    written (they used to be written as one, which changed the function and was refused)."""
    tied = gauged(TokenModel, (2, 5), vocab=11)
    src = tmp_path / "tied.pt"
    torch.save(tied.state_dict(), src)
    state = read_state_dict(src)
    emb, head = state.tensors["emb.weight"], state.tensors["head.weight"]
    assert emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    ids = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(0))
    calibration = ids if objective == "activation" else None
    written, report = balance_state_dict(Untied(), state.tensors, ids, objective, calibration)
    assert report.within_tolerance, report
    assert not torch.equal(written["emb.weight"], written["head.weight"])
    out = tmp_path / "out.pt"
    write_state_dict(StateDictFile(written, state.format, state.metadata), out)
    model = Untied().double()
    model.load_state_dict(read_state_dict(out).tensors)
    reference = Untied().double()
    reference.load_state_dict(state.tensors)
    fresh = torch.randint(11, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = reference(fresh), model(fresh)
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-12


class EmptyBuffers(nn.Module):
    """An MLP with two empty buffers of different dtypes (placeholders), which share no
    storage: an empty tensor's storage has address 0 whatever the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("cache", torch.zeros(0, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_empty_tensors_are_not_taken_for_tied_ones():
    state = {k: v.clone() for k, v in EmptyBuffers().state_dict().items()}
    x = torch.randn(2, 4)
    written, report = balance_state_dict(EmptyBuffers(), state, x, "range")
    assert report.within_tolerance
    assert {k: v.dtype for k, v in written.items()} == {k: v.dtype for k, v in state.items()}
    del state["cache"]  # not tied to the mask: missing, not filled in from it
    with pytest.raises(CheckpointError, match="cache missing"):
        balance_state_dict(EmptyBuffers(), state, x)
