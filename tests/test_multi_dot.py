"""``torch.linalg.multi_dot([a, b])`` is ``a @ b`` (a 1-D first operand a row vector, a 1-D
last one a column vector). Oracle: the same model spelled with ``@``. ``discover`` finds the same
structure (generator count and kinds), a random gauge keeps the outputs on fresh inputs (float64,
1e-10), and a longer chain blocks its operands with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
D, H, OUT = 5, 8, 3  # inputs, hidden neurons, outputs
md = torch.linalg.multi_dot


class Chain(nn.Module):
    """``second(relu(first(x)))`` with two weight matrices and a bias, spelled by ``spell``."""

    def __init__(self, spell) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(H, D, generator=gen, dtype=DTYPE))
        self.b1 = nn.Parameter(torch.randn(H, generator=gen, dtype=DTYPE))
        self.w2 = nn.Parameter(torch.randn(OUT, H, generator=gen, dtype=DTYPE))
        self.spell = spell

    def forward(self, x: Tensor) -> Tensor:
        return self.spell(self, x)


# name: (multi_dot spelling, @ spelling, input shape)
CASES = {
    "multi_dot([x, W.T])": (
        lambda m, x: md([torch.relu(md([x, m.w1.T]) + m.b1), m.w2.T]),
        lambda m, x: torch.relu(x @ m.w1.T + m.b1) @ m.w2.T,
        (4, D),
    ),
    "multi_dot([W, x.T]).T": (
        lambda m, x: md([m.w2, torch.relu(md([m.w1, x.T]).T + m.b1).T]).T,
        lambda m, x: (m.w2 @ torch.relu((m.w1 @ x.T).T + m.b1).T).T,
        (4, D),
    ),
    "multi_dot([W, v]): 1-D last": (
        lambda m, x: md([m.w2, torch.relu(md([m.w1, x]) + m.b1)]),
        lambda m, x: m.w2 @ torch.relu(m.w1 @ x + m.b1),
        (D,),
    ),
    "multi_dot([v, W.T]): 1-D first": (
        lambda m, x: md([torch.relu(md([x, m.w1.T]) + m.b1), m.w2.T]),
        lambda m, x: torch.relu(x @ m.w1.T + m.b1) @ m.w2.T,
        (D,),
    ),
    "multi_dot([B, A]): a product of two parameters": (
        lambda m, x: x[..., :OUT] @ md([m.w2, m.w1])[:, :OUT].T,
        lambda m, x: x[..., :OUT] @ (m.w2 @ m.w1)[:, :OUT].T,
        (4, D),
    ),
}


def inputs(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("name", list(CASES))
def test_multi_dot_of_two_is_their_product(name: str) -> None:
    spelled, oracle, shape = CASES[name]
    model, reference = Chain(spelled), Chain(oracle)
    found = gaugefix.discover(model, inputs(shape, 0))
    expected = gaugefix.discover(reference, inputs(shape, 0))
    assert found.num_generators == expected.num_generators > 0
    assert found.kind_counts() == expected.kind_counts()
    fresh = inputs(shape, 1)
    before = model(fresh).detach()
    gaugefix.random_gauge_(model, found, scale=2.0, generator=torch.Generator().manual_seed(3))
    assert rel_change(before, model(fresh).detach()) <= TOL


def test_a_longer_chain_blocks_its_operands() -> None:
    """``multi_dot`` of three picks the order of its inner products itself: not followed."""
    eye = torch.eye(H, dtype=DTYPE)
    spell = lambda m, x: md([torch.relu(md([x, m.w1.T, eye]) + m.b1), m.w2.T])  # noqa: E731
    found = gaugefix.discover(Chain(spell), inputs((4, D), 0))
    assert found.num_generators == 0
    assert any("multi_dot of other than two tensors" in e.reason for e in found.excluded)
