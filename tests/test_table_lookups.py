"""Whole rows of a 2-D table looked up by the data, spelt by indexing the parameter
(``wte[idx]``, ``wte.index_select(0, ids)``, ``wpe[arange(T)]``): every output row is a row of
the table, whichever rows the data picks, so the table's columns produce the output's channels,
one factor per column for every row, exactly as for ``F.embedding(idx, wte)``. The structures
found are the embedding's (same terms, same numbering), also with a tied head, writes into the
looked-up copy and the copy read as a weight; other picks (columns by the data, masks, partial
rows) still fix the table. A random gauge of what is found keeps the outputs on other ids and
other lengths, in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from test_experts import same_structure

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL, SCALE = torch.float64, 1e-10, 3.0
VOCAB, POSITIONS, WIDTH, HIDDEN, UNITS, PART = 11, 7, 6, 8, 5, 4

LOOKUPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "embedding": lambda w, i: F.embedding(i, w),
    "getitem": lambda w, i: w[i],
    "index_select": lambda w, i: w.index_select(0, i.reshape(-1)).view(*i.shape, w.shape[1]),
    "torch.index_select": lambda w, i: torch.index_select(w, 0, i.flatten()).view(*i.shape, -1),
}
SPELT = [name for name in LOOKUPS if name != "embedding"]


def change_under_gauge(model: nn.Module, s: gaugefix.GaugeStructure, *fresh: tuple) -> float:
    """The largest relative change of ``model``'s outputs on each of ``fresh`` under a random
    gauge of ``s``."""
    with torch.no_grad():
        before = [model(*args) for args in fresh]
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = [model(*args) for args in fresh]
    return max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before, strict=True)
    )


def acts_on(s: gaugefix.GaugeStructure, name: str) -> bool:
    """Whether some generator rescales an entry of the parameter ``name``."""
    p = s.params.get(name)
    return p is not None and any(bool((t.index >= 0).any()) for t in p.terms)


def tokens(batch: int, length: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- a nanoGPT-style model ------------------------------------------------------------------------
class TinyGPT(nn.Module):
    """``x = look(wte, idx) + look(wpe, arange(T))``, ``x + pr(relu(fc(x)))``, read by a head
    (``x @ wte.T`` when tied). ``wte [VOCAB, WIDTH]``, ``wpe [POSITIONS, WIDTH]``. ``[B, T] ->
    [B, T, VOCAB]``."""

    def __init__(self, lookup: str, tied: bool) -> None:
        super().__init__()
        self.look, self.tied = LOOKUPS[lookup], tied
        self.wte = nn.Parameter(torch.randn(VOCAB, WIDTH))
        self.wpe = nn.Parameter(torch.randn(POSITIONS, WIDTH))
        self.fc, self.pr = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.look(self.wte, idx) + self.look(self.wpe, torch.arange(idx.shape[1]))
        x = x + self.pr(F.relu(self.fc(x)))
        return x @ self.wte.T if self.tied else self.head(x)


def gpt(lookup: str, tied: bool) -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(lookup, tied).to(DTYPE)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("lookup", SPELT)
def test_a_table_looked_up_by_indexing_is_read_as_an_embedding(lookup, tied):
    """Untied: the ``WIDTH`` residual channels (the columns of ``wte``, ``wpe``, ``fc``, the rows
    of ``pr``, the columns of ``head``) and ``fc``'s units (before: 8 instead of 14, the
    tables fixed). Tied: ``wte`` read as an embedding and as a linear weight is in two roles,
    as with ``F.embedding``: ``fc``'s units."""
    model = gpt(lookup, tied)
    s = gaugefix.discover(model, tokens(2, 5, seed=1))
    same_structure(s, gaugefix.discover(gpt("embedding", tied), tokens(2, 5, seed=1)))
    assert s.num_generators == HIDDEN + WIDTH * (not tied), s.summary()
    assert acts_on(s, "wte") == acts_on(s, "wpe") == (not tied)
    fresh = [(tokens(3, n, seed=n),) for n in (1, 4, POSITIONS)]
    assert change_under_gauge(model, s, *fresh) <= TOL


# -- uses of the looked-up copy: as with F.embedding ---------------------------------------------
def scaled_in_place(e: Tensor, h: Tensor) -> Tensor:
    return h + e.mul_(2.0)


def zeroed_in_place(e: Tensor, h: Tensor) -> Tensor:
    e[0] = 0
    return h + e


def written_from_the_data(e: Tensor, h: Tensor) -> Tensor:
    e[0] = h[0]
    return h + e


def read_as_a_weight(e: Tensor, h: Tensor) -> Tensor:  # [n, n] @ [n, WIDTH]
    return F.linear(h, e) @ h


USES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "scaled in place": scaled_in_place,
    "zeroed in place": zeroed_in_place,
    "written from the data": written_from_the_data,
    "read as a weight": read_as_a_weight,
}


class Used(nn.Module):
    """``o(relu(a(use(look(table, ids), h))))`` with ``h = relu(inp(x))``. ``table [VOCAB,
    WIDTH]``. ``[n, 3], [n] -> [n, 2]``."""

    def __init__(self, lookup: str, use: str) -> None:
        super().__init__()
        self.look, self.use = LOOKUPS[lookup], USES[use]
        self.table = nn.Parameter(torch.randn(VOCAB, WIDTH))
        self.inp, self.a = nn.Linear(3, WIDTH), nn.Linear(WIDTH, UNITS)
        self.o = nn.Linear(UNITS, 2)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.o(F.relu(self.a(self.use(self.look(self.table, ids), F.relu(self.inp(x))))))


def used(lookup: str, use: str) -> nn.Module:
    torch.manual_seed(0)
    return Used(lookup, use).to(DTYPE)


def rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("lookup", SPELT)
def test_the_looked_up_copy_is_used_as_an_embedding_output_is(lookup, use):
    """Writes into the looked-up copy (a copy: the table keeps its values) and the copy read as
    a weight give the structure ``F.embedding``'s output gives, exact on other ids."""
    model = used(lookup, use)
    example = (rand(VOCAB, 3, seed=1), torch.arange(VOCAB).flip(0))
    s = gaugefix.discover(model, *example)
    same_structure(s, gaugefix.discover(used("embedding", use), *example))
    fresh = (rand(4, 3, seed=2), torch.tensor([3, 3, 0, 9]))
    assert change_under_gauge(model, s, example, fresh) <= TOL


# -- other picks: the table stays fixed ------------------------------------------------------------
def columns_by_data(table: Tensor, ids: Tensor) -> Tensor:  # table [WIDTH, VOCAB]
    return table[:, ids].T


def columns_by_index_select(table: Tensor, ids: Tensor) -> Tensor:
    return table.index_select(1, ids).T


def partial_rows(table: Tensor, ids: Tensor) -> Tensor:
    return table[ids, :PART]


def read(table: Tensor, ids: Tensor) -> Tensor:
    """The rows of ``table`` that ``ids`` reads, as a mask."""
    return torch.isin(torch.arange(table.shape[0]), ids)


def bool_mask(table: Tensor, ids: Tensor) -> Tensor:
    return table[read(table, ids)]


def uint8_mask(table: Tensor, ids: Tensor) -> Tensor:  # uint8 indexes as a mask
    return table[read(table, ids).to(torch.uint8)]


def table_written(table: Tensor, ids: Tensor) -> Tensor:
    rows = table[ids]
    with torch.no_grad():
        table.mul_(1.0)
    return rows


FIXING: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], tuple[int, int], int]] = {
    "columns by the data": (columns_by_data, (WIDTH, VOCAB), WIDTH),
    "partial rows": (partial_rows, (VOCAB, WIDTH), PART),
    "bool mask": (bool_mask, (VOCAB, WIDTH), WIDTH),
    "uint8 mask": (uint8_mask, (VOCAB, WIDTH), WIDTH),
    "table written": (table_written, (VOCAB, WIDTH), WIDTH),
}


class Picked(nn.Module):
    """``o(relu(a(pick(table, ids)))).sum(0)``. ``[n] -> [2]``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.pick, shape, width = FIXING[form]
        self.table = nn.Parameter(torch.randn(*shape))
        self.a, self.o = nn.Linear(width, UNITS), nn.Linear(UNITS, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.o(F.relu(self.a(self.pick(self.table, ids)))).sum(0)


@pytest.mark.parametrize("form", list(FIXING))
def test_other_picks_of_a_table_fix_it(form):
    """Columns picked by the data, masks, partial rows, a table the forward writes: no generator
    scales the table; ``a``'s units remain, exact on other ids."""
    torch.manual_seed(0)
    model = Picked(form).to(DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uint8 indexing is deprecated
        s = gaugefix.discover(model, torch.arange(VOCAB).flip(0))
        assert not acts_on(s, "table"), s.summary()
        assert s.num_generators == UNITS, s.summary()
        fresh = (torch.tensor([3, 3, 0, 9, 1, 2]),)
        assert change_under_gauge(model, s, (torch.arange(VOCAB),), fresh) <= TOL


def test_columns_picked_by_index_select_are_a_lookup_of_the_transpose():
    """``table.index_select(1, ids)`` picks whole columns by the data: each output entry keeps its
    row, so ``table``'s rows produce channels, one factor per row for every column read (as
    ``F.embedding(ids, table.T)``): ``a``'s units and the table's rows, exact on other ids."""
    torch.manual_seed(0)
    model = Picked("columns by the data").to(DTYPE)
    model.pick = columns_by_index_select
    s = gaugefix.discover(model, torch.arange(VOCAB).flip(0))
    assert acts_on(s, "table") and s.num_generators == UNITS + WIDTH, s.summary()
    fresh = (torch.tensor([3, 3, 0, 9, 1, 2]),)
    assert change_under_gauge(model, s, (torch.arange(VOCAB),), fresh) <= TOL


class UInt8Experts(nn.Module):
    """Stacked experts picked by a uint8 index, which torch reads as a mask (all ones: every
    expert, in order), the second weight read whole."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, UNITS, WIDTH))
        self.w2 = nn.Parameter(torch.randn(3, WIDTH, UNITS))

    def forward(self, x: Tensor) -> Tensor:
        every = torch.ones(3, dtype=torch.uint8)
        h = torch.relu(torch.einsum("bd,eud->ebu", x, self.w1[every]))
        return torch.einsum("ebu,edu->bd", h, self.w2)


def test_a_uint8_index_of_stacked_experts_is_a_mask_not_rows():
    """Before: ``w1[uint8 ones]`` was read as rows ``[1, 1, 1]`` (every slice expert 1's), and
    expert 1's 5 units were paired with the other experts' columns of ``w2``: 1.2 off."""
    torch.manual_seed(0)
    model = UInt8Experts().to(DTYPE)
    x = torch.randn(6, WIDTH, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: uint8 indexing is deprecated
        s = gaugefix.discover(model, x)
        fresh = [(torch.randn(n, WIDTH, dtype=DTYPE),) for n in (2, 9)]
        assert change_under_gauge(model, s, *fresh) <= TOL
