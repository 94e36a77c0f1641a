"""Two spellings of weights read per batch entry that discovery follows as their equivalents.

Experts gathered per (token, slot) pair by ``W.index_select(0, ids)`` (or
``torch.index_select(W, 0, ids)``, ``dim=-3``, keywords) are the slices ``W[ids]``: the same
entries in the same order, so every expert's units are generators exactly as with ``W[ids]``,
also when the example leaves an expert empty. A 2-D weight shared by a batched product
(``bmm(h, W.T.unsqueeze(0).expand(B, -1, -1))``, ``W.expand(B, -1, -1)``,
``W[None].expand(...)``) is ``B`` copies of one slice, ``W[None][zeros(B)]``: its units are
generators as with ``F.linear(h, W)``. Other forms keep blocking: ``index_select`` along another
dim or with a 0-d index, an ``expand`` along a dim other than a new leading one or of two new
dims, and expanded copies summed or cloned and written. Gathered rows read as the input of a
linear layer (a table looked up by ``W[ids]``) are a fixed input: the layer's units remain.

Exactness is checked in float64 on fresh inputs (other sizes, other routing) after a random
gauge of scale 3 (1e-10).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from test_experts import same_structure

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL, SCALE = torch.float64, 1e-10, 3.0
IN, WIDTH, UNITS, EXPERTS, TOP_K, OUT = 3, 4, 5, 3, 2, 2
# lin_in's units (the router is linear in them), every expert's units, the experts' summed
# outputs (read by a ReLU and the readout)
EXPERT_COUNT = WIDTH + EXPERTS * UNITS + WIDTH
SHARED_COUNT = WIDTH + UNITS  # the hidden units of ``a`` and of the shared weight ``w``


def change_under_gauge(model: nn.Module, s: gaugefix.GaugeStructure, fresh: tuple) -> float:
    """The relative change of ``model``'s outputs on ``fresh`` under a random gauge of ``s``."""
    with torch.no_grad():
        before = model(*fresh)
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(*fresh) - before).abs().max() / before.abs().max())


def acts_on(s: gaugefix.GaugeStructure, name: str) -> bool:
    """Whether some generator rescales an entry of the parameter ``name``."""
    p = s.params.get(name)
    return p is not None and any(bool((t.index >= 0).any()) for t in p.terms)


# -- experts gathered per (token, slot) pair ------------------------------------------------------

PICKS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "getitem": lambda w, ids: w[ids],
    "index_select": lambda w, ids: w.index_select(0, ids),
    "torch.index_select": lambda w, ids: torch.index_select(w, 0, ids),
    "negative dim": lambda w, ids: w.index_select(-3, ids),
    "keywords": lambda w, ids: torch.index_select(w, dim=0, index=ids),
}


class BatchedExperts(nn.Module):
    """``h = relu(lin_in x)``; each token goes to its top-2 of 3 experts (as Hugging Face's
    ``batched_mm`` experts): per (token, slot) pair the expert matrices ``w1 [3, 5, 4]``,
    ``w2 [3, 4, 5]`` are gathered by ``pick``, ``y = w2_e relu(w1_e h)`` by ``bmm`` and
    ``einsum``, weighted by the softmax of the top-2 logits and summed per token;
    ``lin_out(relu(y))``. A route ``r [n]`` given sends each token to expert ``r`` alone.
    ``[n, 3] (, [n]) -> [n, 2]``."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.pick = PICKS[spelling]
        self.lin_in, self.lin_out = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, OUT)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(EXPERTS, UNITS, WIDTH))
        self.w2 = nn.Parameter(torch.randn(EXPERTS, WIDTH, UNITS))

    def forward(self, x: Tensor, r: Tensor | None = None) -> Tensor:
        h = torch.relu(self.lin_in(x))
        if r is None:
            top, ids = self.router(h).topk(TOP_K, dim=-1)
            weights = torch.softmax(top, -1).reshape(-1, 1)
        else:
            ids, weights = r[:, None], torch.ones(r.shape[0], 1, dtype=h.dtype)
        k, flat = ids.shape[1], ids.reshape(-1)
        hs = h.repeat_interleave(k, dim=0)
        a = torch.relu(torch.bmm(self.pick(self.w1, flat), hs.unsqueeze(-1)).squeeze(-1))
        y = torch.einsum("su,sdu->sd", a, self.pick(self.w2, flat)) * weights
        return self.lin_out(torch.relu(y.view(-1, k, WIDTH).sum(1)))


def experts(spelling: str) -> nn.Module:
    torch.manual_seed(0)
    return BatchedExperts(spelling).to(DTYPE)


def routes(n: int, empty: int | None, seed: int) -> Tensor:
    """A route ``[n]`` to the experts, every one reached except ``empty``."""
    reached = torch.tensor([e for e in range(EXPERTS) if e != empty])
    pick = torch.randint(len(reached), (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([reached, reached[pick]])[:n]


def tokens(n: int, seed: int) -> Tensor:
    return torch.randn(n, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spelling", [s for s in PICKS if s != "getitem"])
def test_experts_gathered_by_index_select_are_those_gathered_by_indexing(spelling):
    """Before, ``index_select`` on the stacked weights blocked them (``parameter sliced or
    repeated``) and with them every unit they read and wrote: 1 generator instead of 23."""
    model, reference = experts(spelling), experts("getitem")
    s = gaugefix.discover(model, tokens(40, 1))
    same_structure(s, gaugefix.discover(reference, tokens(40, 1)))
    assert s.num_generators == EXPERT_COUNT, s.summary()
    assert acts_on(s, "w1") and acts_on(s, "w2")
    assert change_under_gauge(model, s, (tokens(33, 2),)) <= TOL


@pytest.mark.parametrize("spelling", list(PICKS))
def test_an_example_that_reaches_no_token_of_an_expert_gives_what_indexing_gives(spelling):
    """The example routes no token to expert 0, the fresh input reaches every expert: as for
    ``W[ids]``, the stacked weights are fixed (the trace sees no use of expert 0's slices) with
    the reason that names the missing expert, and what is left stays exact."""
    model, reference = experts(spelling), experts("getitem")
    example = (tokens(12, 1), routes(12, 0, seed=0))
    s = gaugefix.discover(model, *example, allow_value_dependent=True)
    same_structure(s, gaugefix.discover(reference, *example, allow_value_dependent=True))
    assert not acts_on(s, "w1") and not acts_on(s, "w2")
    assert "give an input that reaches every slice (every expert)" in s.summary()
    assert change_under_gauge(model, s, (tokens(40, 3), routes(40, None, seed=1))) <= TOL
    full = (tokens(12, 1), routes(12, None, seed=0))  # every expert reached: all units
    s = gaugefix.discover(model, *full, allow_value_dependent=True)
    assert s.num_generators == EXPERT_COUNT, s.summary()
    assert change_under_gauge(model, s, (tokens(40, 3), routes(40, None, seed=1))) <= TOL


# -- a 2-D weight shared by a batched product -----------------------------------------------------

SHARED: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "linear": lambda h, w: F.linear(h, w),
    "bmm of W.T.unsqueeze(0).expand": lambda h, w: torch.bmm(
        h, w.T.unsqueeze(0).expand(h.shape[0], -1, -1)
    ),
    "W.expand": lambda h, w: torch.bmm(w.expand(h.shape[0], -1, -1), h.mT).mT,
    "W[None].expand": lambda h, w: torch.bmm(h, w[None].expand(h.shape[0], UNITS, WIDTH).mT),
    "matmul of W.T": lambda h, w: torch.matmul(h, w.T),
    "matmul of W.T.expand": lambda h, w: torch.matmul(h, w.T.expand(h.shape[0], WIDTH, UNITS)),
    "einsum of W.expand_as": lambda h, w: torch.einsum(
        "bnd,bud->bnu", h, w.expand_as(torch.empty(h.shape[0], UNITS, WIDTH))
    ),
}
NOT_FOLLOWED: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "copies summed": lambda h, w: F.linear(h, w.expand(h.shape[0], UNITS, WIDTH).sum(0)),
    "copies written": lambda h, w: torch.bmm(h, _written(w.expand(h.shape[0], -1, -1)).mT),
    "expanded along dim 1": lambda h, w: torch.einsum(
        "bnd,ubd->bnu", h, w[:, None].expand(UNITS, h.shape[0], WIDTH)
    ),
    "two new dims": lambda h, w: torch.einsum(
        "bnd,cbud->bnu", h, w.expand(1, h.shape[0], UNITS, WIDTH)
    ),
}


def _written(copies: Tensor) -> Tensor:
    """A copy of ``copies`` with its first copy overwritten by zeros."""
    out = copies.clone()
    out[0] = 0
    return out


class Shared(nn.Module):
    """``z = product(relu(a x), w)`` with ``w [5, 4]`` read by the product as ``F.linear``
    reads its weight; ``b(relu(z))``. ``[B, n, 3] -> [B, n, 2]``."""

    def __init__(self, product: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.product = product
        self.a, self.b = nn.Linear(IN, WIDTH), nn.Linear(UNITS, OUT)
        self.w = nn.Parameter(torch.randn(UNITS, WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.product(torch.relu(self.a(x)), self.w)))


def shared(product: Callable[[Tensor, Tensor], Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return Shared(product).to(DTYPE)


def batch(b: int, n: int, seed: int) -> Tensor:
    return torch.randn(b, n, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spelling", [s for s in SHARED if s != "linear"])
def test_a_weight_shared_by_a_batched_product_is_read_as_by_a_linear_layer(spelling):
    """Before, the ``expand`` of the weight blocked it and the units it read: 1 generator
    instead of 9 (``matmul`` of ``W.T`` broadcast by matmul itself was followed already)."""
    model = shared(SHARED[spelling])
    s = gaugefix.discover(model, batch(2, 6, 1))
    same_structure(s, gaugefix.discover(shared(SHARED["linear"]), batch(2, 6, 1)))
    assert s.num_generators == SHARED_COUNT, s.summary()
    assert change_under_gauge(model, s, (batch(3, 7, 2),)) <= TOL


@pytest.mark.parametrize("spelling", list(NOT_FOLLOWED))
def test_other_expands_of_a_weight_keep_blocking_it(spelling):
    model = shared(NOT_FOLLOWED[spelling])
    s = gaugefix.discover(model, batch(2, 6, 1))
    assert not acts_on(s, "w"), s.summary()
    assert s.num_generators < SHARED_COUNT
    assert change_under_gauge(model, s, (batch(3, 7, 2),)) <= TOL


STACKED_NOT_FOLLOWED: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "along dim 1": lambda w, ids: w.index_select(1, torch.arange(w.shape[1]))[ids],
    "along dim 2": lambda w, ids: w.index_select(2, torch.arange(w.shape[2]))[ids],
    "a 0-d index per token": lambda w, ids: torch.cat([w.index_select(0, e) for e in ids]),
    "of gathered slices": lambda w, ids: w[ids].index_select(0, torch.arange(ids.shape[0])),
}


@pytest.mark.parametrize("spelling", list(STACKED_NOT_FOLLOWED))
def test_other_index_selects_of_stacked_weights_keep_blocking_them(spelling, monkeypatch):
    monkeypatch.setitem(PICKS, "other", STACKED_NOT_FOLLOWED[spelling])
    model = experts("other")
    s = gaugefix.discover(model, tokens(40, 1), allow_value_dependent=True)
    assert not acts_on(s, "w1") and not acts_on(s, "w2"), s.summary()
    assert change_under_gauge(model, s, (tokens(33, 2),)) <= TOL


class Picked(nn.Module):
    """Channels of an activation picked by an index computed from the data, by
    ``index_select`` or by indexing: ``lin_out(h[:, idx])``. ``[n, 3] -> [n, 2]``."""

    def __init__(self, select: bool) -> None:
        super().__init__()
        self.select = select
        self.lin_in, self.lin_out = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.lin_in(x))
        idx = (h[0] > 0).long().cumsum(0) % WIDTH
        return self.lin_out(h.index_select(1, idx) if self.select else h[:, idx])


def test_index_select_of_an_activation_by_the_data_is_indexing_by_it():
    """Channels picked by the data unite their factors either way (one generator left)."""
    torch.manual_seed(0)
    model = Picked(True).to(DTYPE)
    s = gaugefix.discover(model, tokens(8, 1), allow_value_dependent=True)
    torch.manual_seed(0)
    reference = Picked(False).to(DTYPE)
    same_structure(s, gaugefix.discover(reference, tokens(8, 1), allow_value_dependent=True))
    assert s.num_generators < WIDTH
    assert change_under_gauge(model, s, (tokens(9, 2),)) <= TOL


class Lookup(nn.Module):
    """Rows of a table ``[10, 4]`` looked up by token id (``table[ids]`` or
    ``table.index_select(0, ids)``), read as the input of ``a``: ``b(relu(a(rows)))``.
    ``[n] -> [n, 2]``."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.pick = PICKS[spelling]
        self.table = nn.Parameter(torch.randn(10, WIDTH))
        self.a, self.b = nn.Linear(WIDTH, UNITS), nn.Linear(UNITS, OUT)

    def forward(self, ids: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(self.pick(self.table, ids))))


@pytest.mark.parametrize("spelling", ["getitem", "index_select"])
def test_gathered_rows_read_as_a_linear_input_are_an_embedding(spelling):
    """Rows gathered from a table and fed to a linear layer are read as ``F.embedding``
    reads them: the table's columns (which ``a``'s columns divide out) and ``a``'s units."""
    torch.manual_seed(0)
    model = Lookup(spelling).to(DTYPE)
    s = gaugefix.discover(model, torch.arange(10))
    assert s.num_generators == WIDTH + UNITS, s.summary()
    assert acts_on(s, "table")
    assert change_under_gauge(model, s, (torch.tensor([3, 3, 9, 0, 1]),)) <= TOL
