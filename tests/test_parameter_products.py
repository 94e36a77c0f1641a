"""Products of two parameters read like a linear map of a learned input.

A Perceiver / Q-Former learned-query block forms its queries from a parameter ``latents [L, d]``
and the query projection ``W [d_out, d]``. ``latents @ W.T`` is ``F.linear(latents, W)``, and so
are ``torch.matmul(latents, W.t())``, ``torch.addmm(b, latents, W.T)``,
``einsum("ld,ed->le", latents, W)`` and the batched ``latents.expand(B, -1, -1) @ W.T``: discovery
reads all of them as it reads ``F.linear``, the table's column ``c`` carrying a factor that
``W``'s column ``c`` divides out and ``W``'s rows producing the query channels, so the
query-key pairs of the attention that reads them are generators. Other spellings (the weight
read against its layout, two roles of one parameter) find no more than the reference, and every
structure is checked exactly: a random gauge keeps the float64 outputs on fresh inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

DTYPE, TOL = torch.float64, 1e-12
WIDTH, LATENTS, IN, SEQ = 6, 3, 4, 5

Queries = Callable[[nn.Module, Tensor, int], Tensor]

# ``q`` from ``latents`` and ``q_proj``'s weight and bias, spelled as F.linear
SPELLINGS: dict[str, Queries] = {
    "F.linear": lambda m, z, b: F.linear(z, m.q.weight, m.q.bias),
    "@ W.T": lambda m, z, b: z @ m.q.weight.T + m.q.bias,
    "matmul W.t()": lambda m, z, b: torch.matmul(z, m.q.weight.t()) + m.q.bias,
    "method matmul": lambda m, z, b: z.matmul(m.q.weight.T) + m.q.bias,
    "mm transpose": lambda m, z, b: torch.mm(z, m.q.weight.transpose(0, 1)) + m.q.bias,
    "addmm": lambda m, z, b: torch.addmm(m.q.bias, z, m.q.weight.T),
    "einsum": lambda m, z, b: torch.einsum("ld,ed->le", z, m.q.weight) + m.q.bias,
    "expand @ W.T": lambda m, z, b: z.expand(b, -1, -1) @ m.q.weight.T + m.q.bias,
    "expand einsum": lambda m, z, b: torch.einsum("bld,ed->ble", z.expand(b, -1, -1), m.q.weight),
}

# spellings that are not F.linear(latents, q_proj.weight): exact, never more generators
OTHERS: dict[str, Queries] = {
    "latents @ W, against its layout": lambda m, z, b: z @ m.q.weight + m.q.bias,
    "(W @ latents.T).T": lambda m, z, b: (m.q.weight @ z.T).T + m.q.bias,
    "W.T @ latents.T, transposed": lambda m, z, b: (m.q.weight.T @ z.T).T,
    "einsum against its layout": lambda m, z, b: torch.einsum("ld,de->le", z, m.q.weight),
    "latents read by its own transpose": lambda m, z, b: m.q(z @ z.T @ z),
    "W also read as a table": lambda m, z, b: (
        z @ m.q.weight.T + F.linear(m.q.weight, m.k.weight)[:LATENTS]
    ),
}


class Pooling(nn.Module):
    """``h = relu(inp x)``; ``q`` from ``latents [L, d]`` in the given spelling;
    ``o(relu(softmax(q k(h)^T) v(h)))``."""

    def __init__(self, queries: Queries) -> None:
        super().__init__()
        self.queries = queries
        self.latents = nn.Parameter(torch.randn(LATENTS, WIDTH))
        self.inp, self.o = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, 2)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        q = self.queries(self, self.latents, x.shape[0])
        attn = torch.softmax(q @ self.k(h).transpose(-1, -2), -1)
        return self.o(F.relu(attn @ self.v(h)))


def pooled(queries: Queries) -> nn.Module:
    torch.manual_seed(0)
    return Pooling(queries).to(DTYPE)


def sequences(batch: int, seed: int, length: int = SEQ) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, IN, dtype=DTYPE, generator=generator)


EXAMPLE, FRESH = sequences(2, 0), [sequences(3, 1), sequences(1, 2, 7)]


def worst_change(model: nn.Module, s: gaugefix.GaugeStructure) -> float:
    """The largest relative change of the outputs on the example and FRESH inputs under a
    random gauge of ``s`` (scale 1)."""
    inputs = [EXAMPLE, *FRESH]
    with torch.no_grad():
        before = [model(x) for x in inputs]
        gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
        return max(rel_change(b, model(x)) for b, x in zip(before, inputs, strict=True))


REFERENCE_STRUCTURE = gaugefix.discover(pooled(SPELLINGS["F.linear"]), EXAMPLE)
REFERENCE = REFERENCE_STRUCTURE.num_generators


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_learned_queries_spelled_as_products_find_what_f_linear_finds(spelling):
    model = pooled(SPELLINGS[spelling])
    s = gaugefix.discover(model, EXAMPLE)
    assert s.num_generators == REFERENCE, s.summary()
    assert s.kind_counts() == REFERENCE_STRUCTURE.kind_counts()
    # the table's columns carry one factor each, for every row, as an embedding table's do
    cols = s.params["latents"].terms[0].index.expand(LATENTS, WIDTH)
    assert bool((cols == cols[:1]).all()) and cols[0].unique().numel() == WIDTH
    assert worst_change(model, s) <= TOL


def test_the_reference_finds_the_query_key_pairs():
    """inp's neurons, the table's columns, the query-key pairs and the value-output channels."""
    assert REFERENCE == 4 * WIDTH


@pytest.mark.parametrize("spelling", list(OTHERS))
def test_other_products_stay_exact_and_find_no_more(spelling):
    model = pooled(OTHERS[spelling])
    s = gaugefix.discover(model, EXAMPLE)
    assert 0 < s.num_generators <= REFERENCE, s.summary()
    assert worst_change(model, s) <= TOL


def test_a_weight_read_as_a_table_elsewhere_is_fixed():
    """``W`` as the weight of ``latents @ W.T`` and as the input of ``F.linear(W, K)``: two
    roles, so ``W`` is fixed and no query-key pair passes through it, as with ``F.linear``."""
    s = gaugefix.discover(pooled(OTHERS["W also read as a table"]), EXAMPLE)
    assert "q.weight" not in s.params
    assert any("two different roles" in e.reason for e in s.excluded), s.excluded
    spelled = pooled(lambda m, z, b: (
        F.linear(z, m.q.weight) + F.linear(m.q.weight, m.k.weight)[:LATENTS]
    ))  # fmt: skip
    assert s.num_generators == gaugefix.discover(spelled, EXAMPLE).num_generators


def test_a_product_with_one_parameter_twice_is_fixed():
    """``latents @ latents.T``: one parameter in two roles of one product, fixed."""
    model = pooled(lambda m, z, b: m.q(z @ z.T @ z))
    s = gaugefix.discover(model, EXAMPLE)
    assert "latents" not in s.params
    assert worst_change(model, s) <= TOL


# --- entries picked by the data ---------------------------------------------------------------
ROWS, OUT, TOKENS = IN, 2, 12

# ``picked(P, idx, h)``: ``[TOKENS, WIDTH]`` from the parameter ``P [ROWS, WIDTH]`` at rows
# ``idx [TOKENS]`` (picked by the data), or from ``h`` itself
PICKED: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "P[idx]": lambda p, i, h: p[i],
    "gather along dim 0": lambda p, i, h: torch.gather(p, 0, i[:, None].expand(-1, WIDTH)),
    "take_along_dim": lambda p, i, h: torch.take_along_dim(p, i[:, None], 0),
    "gather of P.T along dim 1": lambda p, i, h: p.T.gather(1, i[None].expand(WIDTH, -1)).T,
    "index_select of P.T along dim 1": lambda p, i, h: p.T.index_select(1, i).T,
}


class Picking(nn.Module):
    """``o(relu(relu(inp x) + picked(P, argmax x, h)))``: the picked entries added to the hidden
    units."""

    def __init__(self, picked: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.picked = picked
        self.p = nn.Parameter(torch.randn(ROWS, WIDTH))
        self.inp, self.o = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        return self.o(F.relu(h + self.picked(self.p, x.argmax(-1), h)))


def picking(picked: Callable[[Tensor, Tensor, Tensor], Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return Picking(picked).to(DTYPE)


def tokens(n: int, seed: int) -> Tensor:
    return torch.randn(n, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def picked_change(model: nn.Module, s: gaugefix.GaugeStructure) -> float:
    """The largest relative change of the outputs on the example and on fresh tokens (which
    pick other rows) under a random gauge of ``s``."""
    inputs = [tokens(TOKENS, 0), tokens(7, 1), tokens(30, 2)]
    with torch.no_grad():
        before = [model(x) for x in inputs]
        gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
        return max(rel_change(b, model(x)) for b, x in zip(before, inputs, strict=True))


@pytest.mark.parametrize("spelling", list(PICKED))
def test_entries_of_a_parameter_picked_by_the_data_keep_their_columns(spelling):
    """Each picked entry keeps its column, whichever row the data picks: ``P``'s column ``j``
    shares unit ``j``'s factor, as for the rows looked up by ``P[idx]``."""
    model = picking(PICKED[spelling])
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    reference = gaugefix.discover(picking(PICKED["P[idx]"]), tokens(TOKENS, 0))
    assert s.num_generators == reference.num_generators == WIDTH, s.summary()
    assert "p" in s.params
    assert picked_change(model, s) <= TOL


# picks that mix the units: one factor for all of them, exact
MIXED: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "h ranked by topk, gathered": lambda p, i, h: torch.gather(h, 1, h.topk(WIDTH, 1).indices),
    "h sorted": lambda p, i, h: h.sort(1, descending=True).values,
    "h in a random order": lambda p, i, h: h[:, torch.randperm(WIDTH)],
    "h flattened, picked by the data": lambda p, i, h: h.reshape(-1)[
        (h.reshape(-1) > 0).long().cumsum(0) % h.numel()
    ].view(h.shape),
    "P gathered along its columns": lambda p, i, h: torch.gather(
        p, 1, i[:ROWS, None].expand(-1, WIDTH) % WIDTH
    ).sum(0),
}


@pytest.mark.parametrize("spelling", list(MIXED))
def test_picks_along_the_units_unite_them(spelling):
    """A pick along the units' dim (by ``topk``'s places, the data or a random draw) may move
    any unit anywhere: the units share one factor (and ``P``, read along its columns, carries
    it too). Nothing more is found; the structure is exact."""
    model = picking(MIXED[spelling])
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert s.num_generators == 1, s.summary()
    if spelling != "h in a random order":  # the forward draws another order each call
        assert picked_change(model, s) <= TOL


def test_topk_values_scale_with_the_units():
    """``topk`` of units sharing one factor keeps their order: its values carry the factor,
    and the picks it returns are the same under the gauge."""
    model = picking(lambda p, i, h: h + h.topk(2, 1).values.sum(1, keepdim=True))
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert s.num_generators == 1, s.summary()
    assert picked_change(model, s) <= TOL
