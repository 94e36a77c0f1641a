"""``equalize_(..., "activation")``'s calibration pass sees a counted weight's linear calls however
they are spelled: a matrix product with its operands passed by keyword, and a forward compiled
by ``torch.compile`` (run eagerly for the pass, so that its slices of a fused weight are seen as
they are uncompiled). A call inside a ``vmap`` records nothing (its inputs are per-sample
wrappers) and does not fail. Oracle: the same block written with ``F.linear`` (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import randomise_, rel_change
from gaugefix.calibration import activation_ranges
from test_equalize import output

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
D, OUT = 6, 4
SPELLINGS = ("linear", "matmul_other", "mm_mat2")


class Block(nn.Module):
    """A LayerNorm, a fused weight ``W`` (``[2 OUT, D]``) split by ``chunk`` into two maps of
    the normed input, their product, and a head; ``how`` spells the two maps' calls."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(2 * OUT, D))
        self.head = nn.Linear(OUT, 2)

    def read(self, h: Tensor, w: Tensor) -> Tensor:
        if self.how == "matmul_other":
            return torch.matmul(h, other=w.T)
        if self.how == "mm_mat2":
            return torch.mm(input=h.reshape(-1, D), mat2=w.T).reshape(*h.shape[:-1], -1)
        return F.linear(h, w)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        gate, up = self.w.chunk(2)
        return self.head(torch.relu(self.read(h, gate)) * self.read(h, up))


def block(how: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_(Block(how).to(DTYPE), seed=1).eval()


def batch() -> Tensor:
    return 3 * torch.randn(5, 3, D, dtype=DTYPE, generator=torch.Generator().manual_seed(2))


def equalized(model: nn.Module, structure: gaugefix.GaugeStructure) -> nn.Module:
    x = batch()
    before = output(model, (x,))
    result = gaugefix.equalize_(model, structure, "activation", calibration=x, alpha=0.8)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    return model


def mismatch(model: nn.Module, reference: nn.Module) -> float:
    expected = reference.state_dict()
    return max(rel_change(expected[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", SPELLINGS[1:])
def test_matrix_products_spelled_otherwise_are_calibrated_as_f_linear(how):
    """Keyword operands (``torch.matmul``'s ``other``, ``torch.mm``'s ``input`` and ``mat2``)
    read the weight as ``F.linear`` does: the same ``"activation"`` point."""
    reference = block("linear")
    equalized(reference, gaugefix.discover(reference, batch()))
    model = block(how)
    equalized(model, gaugefix.discover(model, batch()))
    assert mismatch(model, reference) <= TOL


@pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="compiled code runs eagerly from torch 2.6"
)
def test_a_compiled_forward_is_calibrated_as_the_uncompiled_one():
    """``model.compile()``: the pass sees the slices of the fused weight (under Dynamo their
    views are not the parameter's) and ends at the uncompiled model's point."""
    reference = block("linear")
    structure = gaugefix.discover(reference, batch())
    equalized(reference, structure)
    model = block("linear")
    model.compile(backend="eager")
    equalized(model, structure)
    assert mismatch(model, reference) <= TOL


class Mapped(nn.Module):
    """``F.linear`` on the weight of ``fc``, per sample under ``torch.vmap``, then ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, OUT)

    def forward(self, x: Tensor) -> Tensor:
        per_sample = torch.vmap(lambda row: F.linear(row, self.fc.weight))(x)
        return self.fc(x) + per_sample


def test_a_call_under_vmap_records_nothing_and_does_not_fail():
    """The ``vmap``ped call's input is a per-sample wrapper: only ``fc``'s own call counts."""
    torch.manual_seed(0)
    model = Mapped().to(DTYPE).eval()
    x = batch()[0]
    ranges = activation_ranges(model, {"fc.weight": model.fc.weight}, x)
    assert list(ranges) == [("fc.weight", 1)]
    assert torch.equal(ranges["fc.weight", 1], x.abs().amax(0))
