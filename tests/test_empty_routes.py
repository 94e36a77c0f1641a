"""Discovery on an example that routes no token to an expert: the trace sees nothing of the
rows an input that reaches the expert fills, so every generator it admits must stay exact on
such inputs. Each model routes the rows of ``x`` (``[n, 4]``) to three experts by the integer
input ``r`` (``[n]``); the example sends no row to expert 0, the fresh input rows to every
expert, and the logits must not change (1e-10) under a random gauge of scale 2.5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
SCALE = 2.5
DIM, HIDDEN, EXPERTS = 4, 6, 3


class Routed(nn.Module):
    """A gain, experts 1 and 2 (``W2[e] relu(W1[e] h)``, ``W1``: ``[3, 6, 4]``, ``W2``:
    ``[3, 4, 6]``) and a readout; :meth:`mix` places each expert's rows of ``h = x * gain``
    by the route ``r``. ``[n, 4], [n] -> [n, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(DIM))
        self.w1 = nn.Parameter(torch.randn(EXPERTS, HIDDEN, DIM))
        self.w2 = nn.Parameter(torch.randn(EXPERTS, DIM, HIDDEN))
        self.out = nn.Linear(DIM, 2)

    def expert(self, e: int, h: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(h, self.w1[e])), self.w2[e])

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        return self.out(self.mix(x * self.gain, r))


class IdentityByMask(Routed):
    """Expert 0 is the identity, written back by a boolean mask: ``y[m] = h[m]``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            m = r == e
            y[m] = h[m] if e == 0 else self.expert(e, h[m])
        return y


class IdentityTokensLast(Routed):
    """:class:`IdentityByMask` in the layout ``[channels, tokens]``: ``y[:, m] = h.T[:, m]``,
    the empty rows of expert 0 are its last dim."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        ht = h.t()
        y = torch.zeros_like(ht)
        for e in range(EXPERTS):
            m = r == e
            y[:, m] = ht[:, m] if e == 0 else self.w2[e] @ F.relu(self.w1[e] @ ht[:, m])
        return y.t()


class SplitTokensLast(Routed):
    """The rows sorted by expert and split, in the layout ``[channels, tokens]``, by counts
    read into Python: ``h.T.split(counts.tolist(), 1)``; expert 0 is the identity, its piece
    ``[4, 0]`` is empty along its last dim, joined back by ``torch.cat``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        order = torch.argsort(r, stable=True)
        counts = torch.bincount(r, minlength=EXPERTS).tolist()
        pieces = h[order].t().split(counts, dim=1)
        outs = [p if e == 0 else self.w2[e] @ F.relu(self.w1[e] @ p) for e, p in enumerate(pieces)]
        return torch.cat(outs, 1).t()[torch.argsort(order)]


class SliceTokensLast(Routed):
    """:class:`SplitTokensLast` with the pieces sliced by the counts' running sums read into
    Python: ``h.T[:, ends[e - 1] : ends[e]]``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        order = torch.argsort(r, stable=True)
        ends = [0, *torch.bincount(r, minlength=EXPERTS).cumsum(0).tolist()]
        ht = h[order].t()
        pieces = [ht[:, ends[e] : ends[e + 1]] for e in range(EXPERTS)]
        outs = [p if e == 0 else self.w2[e] @ F.relu(self.w1[e] @ p) for e, p in enumerate(pieces)]
        return torch.cat(outs, 1).t()[torch.argsort(order)]


class PaddedBatches(Routed):
    """Each expert's rows padded into one buffer ``[3, n, 4]`` (``buf[e, :n_e] = h[idx]``),
    every expert applied to its batch by ``bmm``, the rows gathered back."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        buf = h.new_zeros(EXPERTS, h.shape[0], DIM)
        picks = [torch.where(r == e)[0] for e in range(EXPERTS)]
        for e, idx in enumerate(picks):
            buf[e, : idx.numel()] = h[idx]
        hidden = F.relu(torch.bmm(buf, self.w1.transpose(1, 2)))
        z = torch.bmm(hidden, self.w2.transpose(1, 2))
        y = torch.zeros_like(h)
        for e, idx in enumerate(picks):
            y[idx] = z[e, : idx.numel()]
        return y


class LinearExperts(Routed):
    """Experts as ``nn.Linear -> ReLU -> nn.Linear`` modules with biases, their rows added
    back by ``index_add_``."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))
            for _ in range(EXPERTS)
        )

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            idx = torch.where(r == e)[0]
            y.index_add_(0, idx, self.experts[e](h[idx]))
        return y


def routes(n: int, empty: int | None, seed: int) -> Tensor:
    """A route ``[n]`` to the experts, every one reached except ``empty``."""
    reached = torch.tensor([e for e in range(EXPERTS) if e != empty])
    pick = torch.randint(len(reached), (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([reached, reached[pick]])[:n]


def change_after_gauge(model: Routed) -> tuple[float, gaugefix.GaugeStructure]:
    """Discover on an example that reaches no row of expert 0, apply a random gauge, and return
    the relative change of the logits on fresh inputs that reach every expert."""
    x = torch.randn(8, DIM, dtype=DTYPE)
    s = gaugefix.discover(model, x, routes(8, 0, seed=0), allow_value_dependent=True)
    fresh = (torch.randn(40, DIM, dtype=DTYPE), routes(40, None, seed=1))
    with torch.no_grad():
        before = model(*fresh)
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(*fresh) - before).abs().max() / before.abs().max()), s


@pytest.mark.parametrize(
    ("cls", "generators"),
    [
        (IdentityByMask, 12),
        (IdentityTokensLast, 12),
        (SplitTokensLast, 12),
        (SliceTokensLast, 12),
        (PaddedBatches, 18),
        (LinearExperts, 12),
    ],
)
def test_an_example_that_reaches_no_token_of_an_expert_gives_exact_generators(cls, generators):
    """Before, the rows of expert 0 written into a non-empty tensor (``y[m] = h[m]``,
    ``buf[e, :0] = h[idx]``) or joined after a fixed ``nn.Linear`` (``index_add_``) blocked
    nothing: the gain's channels (compensated by experts 1 and 2 only) or the output channels
    of experts 1 and 2 (compensated by the readout) were generators, and a fresh input that
    reaches expert 0 changed the logits by 0.77, 0.77, 2.1 and 19 (relative). The empty piece
    of a split or slice by counts read from the route (its last dim empty, like an empty
    slice of channels) blocked nothing either: 20 generators, a change of 5.0. The neurons of the
    reached experts remain generators."""
    torch.manual_seed(1)
    change, s = change_after_gauge(cls().to(DTYPE))
    assert change <= TOL, s.summary()
    assert s.num_generators == generators, s.summary()


class EmptyChannels(nn.Module):
    """An empty slice of channels joined along them (a rotary embedding's pass-through part
    when every channel rotates): ``cat([h[:, :0], h, h[:, 6:]], 1)``. ``[n, 4] -> [n, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        return self.b(torch.cat([h[:, :0], h, h[:, HIDDEN:]], 1))


def test_an_empty_slice_of_channels_blocks_nothing():
    """The empty pieces hold no rows another input fills: every hidden unit is a generator."""
    torch.manual_seed(0)
    model = EmptyChannels().to(DTYPE)
    s = gaugefix.discover(model, torch.randn(5, DIM, dtype=DTYPE))
    assert s.num_generators == HIDDEN, s.summary()
