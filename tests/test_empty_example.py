"""Discovery on an example whose batch is empty (``B = 0``).

An empty example shows nothing of how the weights meet the data: every parameter the forward
reads with it is fixed (excluded with the empty-input reason) and no generator is found, for
every architecture alike. Learned queries copied over the batch, ``q_proj(latents.expand(B, -1,
-1))``, read with ``B = 0`` give the same answer instead of failing inside the linear rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix

DTYPE = torch.float64
WIDTH, LATENTS, IN, TOKENS = 6, 3, 4, 5
EMPTY_REASON = "parameter read with an empty input"


class LearnedQueries(nn.Module):
    """``q = q_proj(latents.expand(B, -1, -1))`` attending over ``h = relu(inp x)``, then
    ``o(relu(softmax(q k^T) v))``; with ``bias=False`` the linear maps have no bias."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(LATENTS, WIDTH))
        self.inp, self.o = nn.Linear(IN, WIDTH, bias=bias), nn.Linear(WIDTH, 2, bias=bias)
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(WIDTH, WIDTH, bias=bias) for _ in range(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        q = self.q_proj(self.latents.expand(x.shape[0], -1, -1))
        attn = torch.softmax(q @ self.k_proj(h).transpose(-1, -2), -1)
        return self.o(F.relu(attn @ self.v_proj(h)))


class Embedded(nn.Module):
    """``f(embedding(ids))`` with ``f`` an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, IN)
        self.f = nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))

    def forward(self, ids: Tensor) -> Tensor:
        return self.f(self.e(ids))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, WIDTH, 3), nn.ReLU(), nn.Conv2d(WIDTH, 2, 3))


CASES = {
    "mlp": (mlp, lambda b: torch.randn(b, IN)),
    "conv": (conv, lambda b: torch.randn(b, 2, 6, 6)),
    "embedding": (Embedded, lambda b: torch.randint(0, 10, (b, TOKENS))),
    "learned queries": (LearnedQueries, lambda b: torch.randn(b, TOKENS, IN)),
    "learned queries, no bias": (
        lambda: LearnedQueries(bias=False),
        lambda b: torch.randn(b, TOKENS, IN),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_empty_batch_finds_nothing_and_fixes_every_weight(case):
    """Each model has generators on a batch of 2, none on a batch of 0: every parameter is
    excluded as read with an empty input, and the model and the example are unchanged."""
    make, example = CASES[case]
    torch.manual_seed(0)
    model = make().to(DTYPE)
    x = example(2)
    assert gaugefix.discover(model, x.to(DTYPE) if x.is_floating_point() else x).num_generators
    empty = example(0)
    empty = empty.to(DTYPE) if empty.is_floating_point() else empty
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s = gaugefix.discover(model, empty)
    assert s.num_generators == 0, s.summary()
    assert not s.params, s.summary()
    assert EMPTY_REASON in s.summary()
    assert empty.shape[0] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
