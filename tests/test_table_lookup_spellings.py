"""Whole rows of a table looked up by the data, spelt other ways than ``p[ids]``: ``p[ids, :]``,
``p[ids, ...]``, ``p[(ids,)]``, a 2-D arrangement of the parameter (``p.view(V, D)[ids]``, a
3-D parameter's ``p3.flatten(0, 1)[ids]``, the transpose ``p.T[ids]``, ``p.detach()[ids]``),
and rows given as a Python list (``latents[[2, 0, 1]]``, which torch reads as the tensor of them;
its plain ints may come from a size, ``list(range(T))``, so its rows count as picked by the
data). Each is the same function as the ``F.embedding`` (or tensor index) spelling
and gives its structure (same terms, same numbering), exact in float64 on fresh ids. Indexes
that are not whole rows (masks, two advanced indexes, partial or strided rows, a new dim, a list
of Python bools) fix the table; columns picked by the data (a slice or ``...`` first,
``index_select`` along dim 1) are not read as rows; a float or ``int16`` index is refused as
torch refuses it. A lookup under ``torch.no_grad`` fixes the table: the tracer cannot tell such
a region from a custom autograd function's forward, where code it does not see may read the
rows too.
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
from test_table_lookups import acts_on, change_under_gauge

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL = torch.float64, 1e-10
ROWS, WIDTH, HIDDEN, UNITS, LATENTS, IN = 12, 6, 8, 5, 3, 4

Look = Callable[[Tensor, Tensor], Tensor]


def flat(w: Tensor) -> Tensor:
    """The table ``[ROWS, WIDTH]`` a parameter holds: itself, or a 3-D one's leading dims merged."""
    return w.reshape(-1, w.shape[-1])


def by_index_select(w: Tensor, i: Tensor) -> Tensor:
    return w.index_select(0, i.reshape(-1)).view(*i.shape, w.shape[-1])


# name -> (the parameter's shape, the lookup of rows ``i`` of the table it holds, the reference)
SPELLINGS: dict[str, tuple[tuple[int, ...], Look, Look]] = {
    "p[ids, :]": ((ROWS, WIDTH), lambda w, i: w[i, :], lambda w, i: F.embedding(i, w)),
    "p[ids, ...]": ((ROWS, WIDTH), lambda w, i: w[i, ...], lambda w, i: F.embedding(i, w)),
    "p[(ids,)]": ((ROWS, WIDTH), lambda w, i: w[(i,)], lambda w, i: F.embedding(i, w)),
    "p[ids, :, ...]": ((ROWS, WIDTH), lambda w, i: w[i, :, ...], lambda w, i: w[i]),
    "p.view(V, D)[ids]": (
        (ROWS, WIDTH),
        lambda w, i: w.view(ROWS, WIDTH)[i],
        lambda w, i: F.embedding(i, w),
    ),
    "p.reshape(V, D)[ids, :]": (
        (ROWS, WIDTH),
        lambda w, i: w.reshape(ROWS, WIDTH)[i, :],
        lambda w, i: F.embedding(i, w),
    ),
    "p.detach()[ids]": (
        (ROWS, WIDTH),
        lambda w, i: w.detach()[i],
        lambda w, i: F.embedding(i, w.detach()),
    ),
    "p3.view(V, D)[ids]": (
        (2, ROWS // 2, WIDTH),
        lambda w, i: w.view(ROWS, WIDTH)[i],
        lambda w, i: F.embedding(i, w.view(ROWS, WIDTH)),
    ),
    "p3.flatten(0, 1)[ids]": (
        (2, ROWS // 2, WIDTH),
        lambda w, i: w.flatten(0, 1)[i],
        lambda w, i: F.embedding(i, w.flatten(0, 1)),
    ),
    "p3.reshape(-1, D)[ids, ...]": (
        (2, ROWS // 2, WIDTH),
        lambda w, i: w.reshape(-1, WIDTH)[i, ...],
        lambda w, i: F.embedding(i, w.reshape(-1, WIDTH)),
    ),
    "p3.flatten(0, 1).index_select(0, ids)": (
        (2, ROWS // 2, WIDTH),
        lambda w, i: by_index_select(w.flatten(0, 1), i),
        lambda w, i: F.embedding(i, w.flatten(0, 1)),
    ),
}


class TinyGPT(nn.Module):
    """``x = look(wte, idx) + look(wpe, arange(T))``, ``x + pr(relu(fc(x)))``, read by a head
    (``x @ flat(wte).T`` when tied). ``wte`` and ``wpe`` hold ``[ROWS, WIDTH]`` tables.
    ``[B, T] -> [B, T, ROWS]``."""

    def __init__(self, shape: tuple[int, ...], look: Look, tied: bool) -> None:
        super().__init__()
        self.look, self.tied = look, tied
        self.wte = nn.Parameter(torch.randn(*shape))
        self.wpe = nn.Parameter(torch.randn(*shape))
        self.fc, self.pr = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
        self.head = nn.Linear(WIDTH, ROWS, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.look(self.wte, idx) + self.look(self.wpe, torch.arange(idx.shape[1]))
        x = x + self.pr(F.relu(self.fc(x)))
        return x @ flat(self.wte).T if self.tied else self.head(x)


def gpt(shape: tuple[int, ...], look: Look, tied: bool) -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(shape, look, tied).to(DTYPE)


def tokens(batch: int, length: int, seed: int) -> Tensor:
    return torch.randint(0, ROWS, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_a_lookup_spelt_another_way_has_the_embedding_structure(spelling, tied):
    """Untied: the ``WIDTH`` residual channels and ``fc``'s units, 14 generators (before: 8,
    the tables fixed). Tied: ``wte`` in two roles, as with ``F.embedding``: ``fc``'s units."""
    shape, look, reference = SPELLINGS[spelling]
    model, example = gpt(shape, look, tied), tokens(2, 5, seed=1)
    s = gaugefix.discover(model, example)
    same_structure(s, gaugefix.discover(gpt(shape, reference, tied), example))
    assert s.num_generators == HIDDEN + WIDTH * (not tied), s.summary()
    assert acts_on(s, "wte") == acts_on(s, "wpe") == (not tied)
    fresh = [(tokens(3, n, seed=n),) for n in (1, 4, ROWS)]
    assert change_under_gauge(model, s, (example,), *fresh) <= TOL


class Transposed(nn.Module):
    """``o(relu(a(p.T[ids] + relu(inp(x)))))`` with ``p [WIDTH, ROWS]``: rows of the transpose,
    the columns of ``p``, looked up by the data; ``look`` spells it."""

    def __init__(self, look: Look) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.look = look
        self.p = nn.Parameter(torch.randn(WIDTH, ROWS))
        self.inp, self.a, self.o = (
            nn.Linear(IN, WIDTH),
            nn.Linear(WIDTH, UNITS),
            nn.Linear(UNITS, 2),
        )
        self.to(DTYPE)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.o(F.relu(self.a(self.look(self.p.T, ids) + F.relu(self.inp(x)))))


def ids_and_x(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, dtype=DTYPE, generator=g), torch.randint(0, ROWS, (n,), generator=g)


@pytest.mark.parametrize(
    "look", [lambda w, i: w[i], lambda w, i: w[i, :]], ids=["[ids]", "[ids, :]"]
)
def test_rows_of_a_transposed_table_are_read_as_embedding_of_the_transpose(look):
    """``p.T[ids]`` is ``F.embedding(ids, p.T)``: ``p``'s rows produce the channels."""
    model, example = Transposed(look), ids_and_x(8, 1)
    s = gaugefix.discover(model, *example)
    same_structure(s, gaugefix.discover(Transposed(lambda w, i: F.embedding(i, w)), *example))
    assert acts_on(s, "p") and s.num_generators == UNITS + WIDTH, s.summary()
    fresh = [ids_and_x(n, n) for n in (3, 13)]
    assert change_under_gauge(model, s, example, *fresh) <= TOL


# -- rows at constant places given as a Python list ----------------------------------------------
ORDER = [2, 0, 1]  # every latent, in another order

# name -> the latents ``z [LATENTS, WIDTH]`` in ``ORDER``
REORDERED: dict[str, Callable[[Tensor], Tensor]] = {
    "z[list]": lambda z: z[ORDER],
    "z[list, :]": lambda z: z[ORDER, :],
    "z[(list,)]": lambda z: z[(ORDER,)],
    "z[list, ...]": lambda z: z[ORDER, ...],
}


class Queries(nn.Module):
    """Learned queries ``q(order(z))`` scored against ``relu(inp(x))`` (a product of two
    activations), read by ``o``. ``[B, IN] -> [B, 2]``."""

    def __init__(self, order: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.order = order
        self.z = nn.Parameter(torch.randn(LATENTS, WIDTH))
        self.q, self.inp = nn.Linear(WIDTH, HIDDEN), nn.Linear(IN, HIDDEN)
        self.o = nn.Linear(LATENTS, 2)
        self.to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(F.relu(self.inp(x)) @ F.relu(self.q(self.order(self.z))).T)


@pytest.mark.parametrize("spelling", list(REORDERED))
def test_rows_picked_by_a_list_are_read_as_the_tensor_of_them(spelling):
    """The structure of ``z[tensor(ORDER)]``: ``z``'s columns produce channels that ``q``'s
    columns divide out (before: ``z`` fixed)."""
    model = Queries(REORDERED[spelling])
    example = torch.randn(4, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    s = gaugefix.discover(model, example)
    same_structure(s, gaugefix.discover(Queries(lambda z: z[torch.tensor(ORDER)]), example))
    assert acts_on(s, "z"), s.summary()
    fresh = [(torch.randn(n, IN, dtype=DTYPE),) for n in (1, 7)]
    assert change_under_gauge(model, s, (example,), *fresh) <= TOL


class Reordered(nn.Module):
    """``o(relu(F.linear(x, pick(W), pick(b))))``: a layer's units in another order."""

    def __init__(self, pick: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pick = pick
        self.W, self.b = nn.Parameter(torch.randn(LATENTS, IN)), nn.Parameter(torch.randn(LATENTS))
        self.o = nn.Linear(LATENTS, 2)
        self.to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(F.relu(F.linear(x, self.pick(self.W), self.pick(self.b))))


@pytest.mark.parametrize("spelling", ["z[list]", "z[list, ...]"])
def test_a_weight_read_through_a_list_of_rows_is_fixed(spelling):
    """``W[[2, 0, 1]]`` and ``b[[2, 0, 1]]``: the list may have been computed from a size
    (``list(range(T))[::-1]``), so its rows count as picked by the data, and a weight read
    through rows picked by the data is fixed (read as rows at constant places, the units of a
    reversed range, paired with another weight's rows by a forward range, changed outputs by
    339 on other lengths: tests/test_newest_rules_audit.py)."""
    model = Reordered(REORDERED[spelling])
    example = torch.randn(5, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    s = gaugefix.discover(model, example)
    assert not acts_on(s, "W") and not acts_on(s, "b"), s.summary()
    fresh = (torch.randn(7, IN, dtype=DTYPE),)
    assert change_under_gauge(model, s, (example,), fresh) <= TOL


# -- indexes that are not whole rows: the table is fixed ------------------------------------------
def read(ids: Tensor) -> Tensor:
    """The rows ``ids`` reads, as a mask."""
    return torch.isin(torch.arange(ROWS), ids)


def rotated_rows(table: Tensor, ids: Tensor) -> Tensor:
    """Row ``ids[k]`` with its columns rotated by ``ids[k]``: two advanced indexes."""
    return table[ids[:, None], (ids[:, None] + torch.arange(WIDTH)) % WIDTH]


EVEN = [n % 2 == 0 for n in range(ROWS)]  # a list of Python bools: a mask

# name -> (the pick of a table [ROWS, WIDTH], its width)
NOT_ROWS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], int]] = {
    "bool mask, :": (lambda t, i: t[read(i), :], WIDTH),
    "uint8 mask, ...": (lambda t, i: t[read(i).to(torch.uint8), ...], WIDTH),
    "list of bools": (lambda t, i: t[EVEN], WIDTH),
    "two advanced indexes": (rotated_rows, WIDTH),
    "partial rows": (lambda t, i: t[i, : WIDTH - 2], WIDTH - 2),
    "strided columns": (lambda t, i: t[i, ::2], WIDTH // 2),
    "a new dim": (lambda t, i: t[i, None][:, 0], WIDTH),
}

# name -> (columns of a table [ROWS, WIDTH] picked by the data, transposed; their width)
COLUMNS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], int]] = {
    "a slice first": (lambda t, i: t[:, i % WIDTH].T, ROWS),
    "... first": (lambda t, i: t[..., i % WIDTH].T, ROWS),
    "index_select along dim 1": (lambda t, i: t.index_select(1, i % WIDTH).T, ROWS),
}


class Picked(nn.Module):
    """``o(relu(a(pick(table, ids)))).sum(0) + o(relu(b(relu(inp(x))))).sum(0)``. ``[n, IN],
    [n] -> [2]``."""

    def __init__(self, pick: Callable[[Tensor, Tensor], Tensor], width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pick = pick
        self.table = nn.Parameter(torch.randn(ROWS, WIDTH))
        self.inp, self.b = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, UNITS)
        self.a, self.o = nn.Linear(width, UNITS), nn.Linear(UNITS, 2)
        self.to(DTYPE)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        picked = self.o(F.relu(self.a(self.pick(self.table, ids)))).sum(0)
        return picked + self.o(F.relu(self.b(F.relu(self.inp(x))))).sum(0)


@pytest.mark.parametrize("form", list(NOT_ROWS))
def test_indexes_that_are_not_whole_rows_fix_the_table(form):
    """No generator scales the table; exact on fresh ids."""
    model = Picked(*NOT_ROWS[form])
    example = ids_and_x(ROWS, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uint8 indexing is deprecated
        s = gaugefix.discover(model, *example)
        assert not acts_on(s, "table"), s.summary()
        fresh = [ids_and_x(n, n) for n in (3, ROWS)]
        assert change_under_gauge(model, s, example, *fresh) <= TOL


@pytest.mark.parametrize("form", list(COLUMNS))
def test_columns_picked_by_the_data_are_read_as_torch_reads_them(form):
    """Not rows of the table: not read as a lookup of them; exact on fresh ids (the table's
    rows may produce the picked columns' channels, as a gather along dim 1 reads them)."""
    model = Picked(*COLUMNS[form])
    example = ids_and_x(ROWS, 1)
    s = gaugefix.discover(model, *example)
    fresh = [ids_and_x(n, n) for n in (3, ROWS)]
    assert change_under_gauge(model, s, example, *fresh) <= TOL
    assert not acts_on(s, "table") or s.params["table"].terms[0].index.shape[-1] == 1, s.summary()


# -- index dtypes: torch takes int64 and int32 as rows, uint8 and bool as masks ------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.int16])
def test_an_index_is_read_by_its_dtype_as_torch_reads_it(dtype):
    """``int64``, ``int32``: rows, the embedding's structure; ``uint8``, ``bool``: masks, the
    table fixed; ``int16``: refused by torch, a TracingError naming the op."""
    x, ids = ids_and_x(ROWS, 1)
    index = read(ids).to(dtype) if dtype in (torch.uint8, torch.bool) else ids.to(dtype)
    model = Picked(lambda t, i: t[i], WIDTH)
    if dtype == torch.int16:
        with pytest.raises(gaugefix.TracingError, match="__getitem__"):
            gaugefix.discover(model, x, index)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uint8 indexing is deprecated
        s = gaugefix.discover(model, x, index)
        rows = dtype in (torch.int64, torch.int32)
        assert acts_on(s, "table") == rows, s.summary()
        if rows:
            reference = Picked(lambda t, i: F.embedding(i, t), WIDTH)
            same_structure(s, gaugefix.discover(reference, x, index))
        assert change_under_gauge(model, s, (x, index)) <= TOL


def test_a_float_index_is_refused_as_torch_refuses_it():
    x, ids = ids_and_x(ROWS, 1)
    with pytest.raises(gaugefix.TracingError, match="__getitem__"):
        gaugefix.discover(Picked(lambda t, i: t[i.to(DTYPE), :], WIDTH), x, ids)


# -- lookups under torch.no_grad ------------------------------------------------------------------
def looked_up_without_grad(t: Tensor, i: Tensor) -> Tensor:
    with torch.no_grad():
        return t[i]


class Added(torch.autograd.Function):
    """``h + m.table[ids]``, the sum computed where the tracer does not see it (a stand-in for a
    compiled kernel); the rows are also read by a traced ``F.linear``, kept in ``m.aux``."""

    @staticmethod
    def forward(ctx: object, h: Tensor, ids: Tensor, m: nn.Module) -> Tensor:
        rows = m.table[ids]
        m.aux = F.linear(rows, m.w)
        with torch._C.DisableTorchFunction():
            return h + rows

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple:
        return grad, None, None


class InFunction(nn.Module):
    """``o(relu(a(Added(relu(inp(x)), ids)))) + m.aux``. ``[n, IN], [n] -> [n, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table, self.w = (
            nn.Parameter(torch.randn(ROWS, WIDTH)),
            nn.Parameter(torch.randn(2, WIDTH)),
        )
        self.inp, self.a, self.o = (
            nn.Linear(IN, WIDTH),
            nn.Linear(WIDTH, UNITS),
            nn.Linear(UNITS, 2),
        )
        self.to(DTYPE)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.o(F.relu(self.a(Added.apply(F.relu(self.inp(x)), ids, self)))) + self.aux


@pytest.mark.parametrize(
    "model",
    [lambda: Picked(looked_up_without_grad, WIDTH), InFunction],
    ids=["no_grad", "custom function"],
)
def test_a_lookup_under_no_grad_fixes_the_table(model):
    """The same function as the lookup with autograd on, but inside a custom autograd function's
    forward (where autograd is off too) code the tracer does not see may read the rows: reading
    that lookup as an embedding pairs ``table``'s columns with ``w``'s while the untraced sum
    still scales, 9.0 off. The table is fixed; exact on fresh ids."""
    m = model()
    example = ids_and_x(8, 1)
    s = gaugefix.discover(m, *example)
    assert not acts_on(s, "table"), s.summary()
    assert change_under_gauge(m, s, example, *[ids_and_x(n, n) for n in (3, 13)]) <= TOL
