"""An adversarial audit of two reading rules: a parameter read by a linear map as its input
(learned queries ``q_proj(latents)``: its columns produce channels, as an embedding table's do),
and ``gather`` / ``index_select`` / ``take_along_dim`` picked by the data, which unite the labels
along the picked dim only.

Every model is float64. Its structure is discovered on one example, and a random gauge of it
(scale 1) must keep the outputs, to 1e-10 relative, on the example and on FRESH inputs (other
batch sizes, other lengths, other routings). The parameter is also read in a second way in most
models (added, normalised, multiplied, read by a second map, transposed, sliced, permuted,
repeated, tied to another module's weight, given to ``matmul`` / ``einsum`` / ``bmm`` / ``conv``
instead of ``F.linear``); routing indices come from a rescaled activation (``topk``, ``argmax``,
``sort``, ``bucketize``, comparisons, rounding), from the weights, or from the picked tensor
itself. Where the parameter keeps a generator of its own, the test says so, so that a rule that
fixes everything does not pass unnoticed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

DTYPE, TOL = torch.float64, 1e-10
WIDTH, LATENTS, IN, SEQ = 6, 3, 4, 5
EXPERTS, UNITS, TOKENS, TOP_K = 4, 5, 40, 2


def worst_change(model: nn.Module, s: gaugefix.GaugeStructure, inputs: list[tuple]) -> float:
    """The largest relative change of the outputs, over ``inputs``, that a random gauge of ``s``
    (scale 1) makes on a copy of ``model``."""
    gauged = copy.deepcopy(model)
    with torch.no_grad():
        gaugefix.random_gauge_(gauged, s, 1.0, generator=torch.Generator().manual_seed(0))
        return max(rel_change(model(*args), gauged(*args)) for args in inputs)


PERMUTED = torch.tensor([2, 0, 1])  # every row, in another order


# --- learned queries read in a second way ---------------------------------------------------------
Queries = Callable[["Pooling", Tensor, Tensor, int], Tensor]


def _fixed(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


# spelling -> (queries of the parameter ``z [L, d]``, the hidden state ``h [B, S, d]`` and the
# batch size, whether the parameter keeps generators of its own)
QUERIES: dict[str, tuple[Queries, bool]] = {
    "added to its queries": (lambda m, z, h, b: m.q(z) + z, True),
    "normalised": (lambda m, z, h, b: m.q(z) + F.layer_norm(z, (WIDTH,)), False),
    "squared": (lambda m, z, h, b: m.q(z**2), False),
    "times a parameter": (lambda m, z, h, b: m.q(z * m.vec), False),
    "times the hidden state": (lambda m, z, h, b: m.q(z * h.mean(0)[:LATENTS]), True),
    "plus the hidden state": (lambda m, z, h, b: m.q(z + h.mean(0)[:LATENTS]), True),
    "read by two maps, summed": (lambda m, z, h, b: m.q(z) + m.q2(z), True),
    "read by two maps, multiplied": (lambda m, z, h, b: m.q(z) * m.q2(z), True),
    "read as queries and keys": (lambda m, z, h, b: m.q(z) + m.k(z), True),
    "times its norm": (lambda m, z, h, b: m.q(z) * z.norm(), False),
    "plus its row sums": (lambda m, z, h, b: m.q(z) + z.sum(-1, keepdim=True), False),
    "also a weight": (lambda m, z, h, b: m.q(z) + F.linear(m.w2[:LATENTS, :LATENTS], z.T), True),
    "its own weight": (lambda m, z, h, b: F.linear(z, z.T @ z), False),
    "input and weight of one map": (lambda m, z, h, b: F.linear(z, z) @ m.w2[:LATENTS], False),
    "input and bias of one map": (lambda m, z, h, b: F.linear(z, m.w2, z[0]), False),
    "a weight read as an input": (
        lambda m, z, h, b: m.q(z) + F.linear(m.q.weight, m.k.weight)[:LATENTS], False
    ),
    "a bias read as an input": (lambda m, z, h, b: m.q(z) + F.linear(m.q.bias, m.k.weight), True),
    "read through two maps": (lambda m, z, h, b: m.q(m.k(z)), True),
    "normalised after the map": (lambda m, z, h, b: F.normalize(m.q(z), dim=-1), True),
    "normalised before the map": (lambda m, z, h, b: m.q(F.normalize(z, dim=0)), False),
    "matmul": (lambda m, z, h, b: z @ m.q.weight.T + m.q.bias, True),
    "mm": (lambda m, z, h, b: torch.mm(z, m.q.weight.T), True),
    "addmm": (lambda m, z, h, b: torch.addmm(m.q.bias, z, m.q.weight.T), True),
    "einsum": (lambda m, z, h, b: torch.einsum("ld,od->lo", z, m.q.weight), True),
    "expanded then matmul": (lambda m, z, h, b: z.expand(b, -1, -1) @ m.q.weight.T, True),
    "bmm": (
        lambda m, z, h, b: torch.bmm(z.expand(b, -1, -1), m.q.weight.T.expand(b, -1, -1)),
        False,
    ),
    "conv1d": (
        lambda m, z, h, b: F.conv1d(z.T[None], m.q.weight[..., None]).squeeze(0).T,
        False,
    ),
    "a vector": (lambda m, z, h, b: m.q(m.vec).expand(LATENTS, WIDTH), False),
    "a vector also added": (lambda m, z, h, b: m.q(m.vec).expand(LATENTS, WIDTH) + m.vec, False),
    "expanded over two dims": (lambda m, z, h, b: m.q(z.expand(2, b, -1, -1))[0], False),
    "expanded, then times itself": (lambda m, z, h, b: m.q(z.expand(b, -1, -1)) * z, False),
    "expanded, written in place": (lambda m, z, h, b: m.q(_written(z, b)), False),
    "rows in another order (list)": (lambda m, z, h, b: m.q(z[[2, 0, 1]]), True),
    "rows in another order (tensor)": (lambda m, z, h, b: m.q(z[PERMUTED]), True),
    "rows in another order, plus": (lambda m, z, h, b: m.q(z[PERMUTED]) + z, True),
    "rows in another order, times": (lambda m, z, h, b: m.q(z[PERMUTED]) * z, False),
    "rows repeated": (lambda m, z, h, b: m.q(z.repeat(2, 1))[:LATENTS], False),
    "every other row": (lambda m, z, h, b: m.q(z[::2]), False),
    "rows up to a size": (lambda m, z, h, b: m.q(z[: h.shape[1] - 3]), False),
    "columns flipped": (lambda m, z, h, b: m.q(z.flip(1)), True),
    "columns rolled": (lambda m, z, h, b: m.q(z.roll(1, 1)), True),
    "regrouped columns": (lambda m, z, h, b: m.q(z.view(LATENTS, 2, -1).flatten(1)), True),
    "entries mixed by a view": (
        lambda m, z, h, b: F.linear(z.view(2 * LATENTS, -1), _fixed(1, WIDTH, WIDTH // 2))
        .view(LATENTS, -1)[:, :WIDTH],
        False,
    ),
    "columns concatenated twice": (
        lambda m, z, h, b: F.linear(torch.cat([z, z], 1), _fixed(2, WIDTH, 2 * WIDTH)),
        False,
    ),
    "stacked with itself last": (
        lambda m, z, h, b: F.linear(torch.stack([z, z], -1), m.q.weight[:, :2]).sum(1),
        False,
    ),
    "entries copied along a new last dim": (
        lambda m, z, h, b: F.linear(z[..., None].expand(-1, -1, 2), m.q.weight[:, :2]).sum(1),
        False,
    ),
    "copies moved last": (
        lambda m, z, h, b: F.linear(z.expand(WIDTH, -1, -1).permute(1, 2, 0), m.q.weight).sum(1),
        True,
    ),
    "columns interleaved twice": (
        lambda m, z, h, b: F.linear(z.repeat_interleave(2, 1), torch.ones(WIDTH, 2 * WIDTH,
                                                                              dtype=DTYPE)),
        False,
    ),
    "overlapping windows": (
        lambda m, z, h, b: F.linear(z.unfold(0, 2, 1), _fixed(3, WIDTH, 2))[:, 0],
        False,
    ),
    "windows over strides": (
        lambda m, z, h, b: F.linear(z.as_strided((LATENTS - 1, WIDTH + 1), (WIDTH, 1)),
                                      _fixed(4, WIDTH, WIDTH + 1)),
        False,
    ),
    "transposed": (lambda m, z, h, b: m.rowmix(z.T).T, True),
    "transposed, plus": (lambda m, z, h, b: m.rowmix(z.T).T + z, True),
    "transposed and not": (lambda m, z, h, b: m.rowmix(z.T).T * m.q(z), True),
    "expanded, transposed": (lambda m, z, h, b: m.rowmix(z.expand(b, -1, -1).mT).mT, True),
    "transposed, expanded": (lambda m, z, h, b: m.rowmix(z.T.expand(b, -1, -1)).mT, True),
    "permuted rows, transposed": (lambda m, z, h, b: m.rowmix(z[PERMUTED].T).T, True),
    "read through .data, plus": (lambda m, z, h, b: m.q(z) + z.data, True),
    "detached, plus": (lambda m, z, h, b: m.q(z.detach()) + z, True),
    "gathered by the data": (
        lambda m, z, h, b: m.q(torch.gather(z.expand(b, -1, -1), 1, _data_rows(h))),
        False,
    ),
    "sorted": (lambda m, z, h, b: m.q(z.sort(0).values), False),
    "multi-head attention": (
        lambda m, z, h, b: m.mha(z.expand(b, -1, -1), h, h, need_weights=False)[0], False
    ),
}  # fmt: skip


def _signs(h: Tensor) -> Tensor:
    """Rows ``[L]`` of a table picked by the signs of ``h``'s sums."""
    return (h.sum((0, 2))[:LATENTS] > 0).long()


def _written(lat: Tensor, batch: int) -> Tensor:
    copies = lat.expand(batch, -1, -1).clone()
    copies[:, 0] = 0.5
    return copies


def _data_rows(h: Tensor) -> Tensor:
    """Rows ``[B, L, d]`` picked per batch entry and query by the values of ``h``."""
    picked = (h[:, :LATENTS] > 0.3).long().cumsum(1).clamp(max=LATENTS - 1)
    return picked[..., :1].expand(-1, -1, WIDTH)


class Pooling(nn.Module):
    """``h = relu(inp x)``; queries ``q`` of ``latents [L, d]`` (in the given spelling);
    ``o(relu(softmax(q k(h)^T) v(h)))``. ``tie``: ``latents`` is another module's weight."""

    def __init__(self, queries: Queries, tie: str = "", frozen: bool = False) -> None:
        super().__init__()
        self.queries = queries
        self.latents = nn.Parameter(torch.randn(LATENTS, WIDTH), requires_grad=not frozen)
        self.vec = nn.Parameter(torch.randn(WIDTH))
        self.w2 = nn.Parameter(torch.randn(WIDTH, WIDTH))
        self.inp, self.o = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, 2)
        self.q, self.k, self.v, self.q2 = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.rowmix, self.head = nn.Linear(LATENTS, LATENTS), nn.Linear(WIDTH, LATENTS)
        self.table = nn.Embedding(LATENTS, WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        if tie == "head":
            self.latents = self.head.weight
        elif tie == "table":
            self.latents = self.table.weight

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        q = self.queries(self, self.latents, h, x.shape[0])
        attn = torch.softmax(q @ self.k(h).transpose(-1, -2), -1)
        return self.o(F.relu(attn @ self.v(h)))


def pooled(queries: Queries, tie: str = "", frozen: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Pooling(queries, tie, frozen).to(DTYPE)


def sequences(batch: int, seed: int, length: int = SEQ) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, IN, dtype=DTYPE, generator=generator)


FRESH = [(sequences(2, 0),), (sequences(3, 1),), (sequences(1, 2, 7),)]


@pytest.mark.parametrize("spelling", list(QUERIES))
def test_learned_queries_read_in_a_second_way_keep_the_outputs(spelling):
    queries, own = QUERIES[spelling]
    model = pooled(queries)
    s = gaugefix.discover(model, *FRESH[0])
    assert s.num_generators > 0
    assert ("latents" in s.params) == own, s.summary()
    assert worst_change(model, s, FRESH) <= TOL


@pytest.mark.parametrize(
    ("tie", "frozen", "queries", "own"),
    [
        ("", True, lambda m, z, h, b: m.q(z), True),  # requires_grad=False: still a weight
        ("head", False, lambda m, z, h, b: m.q(z) * m.head(h).mean(1)[0][:, None], False),
        ("table", False, lambda m, z, h, b: m.q(z) + m.table(_signs(h)), True),
    ],
)  # fmt: skip
def test_learned_queries_tied_or_frozen_keep_the_outputs(tie, frozen, queries, own):
    model = pooled(queries, tie, frozen)
    s = gaugefix.discover(model, *FRESH[0])
    assert s.num_generators > 0 and ("latents" in s.params) == own, s.summary()
    assert worst_change(model, s, FRESH) <= TOL


# --- picks by the data ----------------------------------------------------------------------------
Route = Callable[["Experts", Tensor], Tensor]


class Experts(nn.Module):
    """``h = relu(lin_in x)``; expert ``e``: ``down[e] relu(up[e] h)``, stacked ``[T, E, d]``;
    ``lin_out(relu(route(h)))`` for a routing ``route`` that picks among the stacked outputs."""

    def __init__(self, route: Route) -> None:
        super().__init__()
        self.route = route
        self.lin_in, self.lin_out = nn.Linear(3, WIDTH), nn.Linear(WIDTH, 2)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.up = nn.Parameter(torch.randn(EXPERTS, UNITS, WIDTH))
        self.down = nn.Parameter(torch.randn(EXPERTS, WIDTH, UNITS))
        self.u_out = nn.Linear(TOP_K, WIDTH)

    def units(self, h: Tensor) -> Tensor:
        """``[T, E, units]``: every expert's units, each carrying factors of its own."""
        return torch.stack([F.relu(F.linear(h, self.up[e])) for e in range(EXPERTS)], 1)

    def stacked(self, h: Tensor) -> Tensor:
        units = self.units(h)
        return torch.stack([F.linear(units[:, e], self.down[e]) for e in range(EXPERTS)], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin_out(F.relu(self.route(self, F.relu(self.lin_in(x)))))


def _top(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The softmax of the top-k logits ``[T, k, 1]`` and their indices ``[T, k]``."""
    top = logits.topk(TOP_K, -1)
    return top.values.softmax(-1)[..., None], top.indices


Pick = Callable[[Tensor, Tensor], Tensor]


def _mixed(m: Experts, h: Tensor, logits: Tensor, pick: Pick) -> Tensor:
    """``sum_k gate_k pick(stacked, indices)_k``: the top-k of ``logits`` mixed."""
    gates, idx = _top(logits)
    return (gates * pick(m.stacked(h), idx)).sum(1)


def spread(idx: Tensor) -> Tensor:
    """Indices ``[T, k]`` spread over the channels, ``[T, k, d]``."""
    return idx[..., None].expand(-1, -1, WIDTH)


def hidden_logits(h: Tensor) -> Tensor:
    """Routing logits that are a slice of the rescaled hidden state itself."""
    return h[:, :EXPERTS]


def _picked_by(index: Callable[[Tensor], Tensor]) -> Route:
    """One expert per token, picked by ``index(h)`` ``[T, 1]`` (a routing made of ``h``)."""
    return lambda m, h: torch.gather(m.stacked(h), 1, spread(index(h))).sum(1)


def _self_routed(m: Experts, h: Tensor) -> Tensor:
    stacked = m.stacked(h)
    idx = stacked[..., 0].topk(TOP_K, -1).indices  # routed by the experts' own outputs
    return torch.take_along_dim(stacked, idx[..., None], 1).sum(1)


def _channels_by_value(m: Experts, h: Tensor) -> Tensor:
    out = m.stacked(h).sum(1)
    idx = out.topk(3, -1).indices
    return torch.zeros_like(out).scatter(1, idx, torch.gather(out, 1, idx))


def _scattered(m: Experts, h: Tensor, add: bool) -> Tensor:
    stacked, (_, idx) = m.stacked(h), _top(m.router(h))
    spread = idx[..., None].expand(-1, -1, WIDTH)
    zeros = torch.zeros_like(stacked)
    picked = stacked[:, :TOP_K]
    out = zeros.scatter_add(1, spread, picked) if add else zeros.scatter(1, spread, picked)
    return out.sum(1)


def _units_by_value(m: Experts, h: Tensor) -> Tensor:
    units = m.units(h)[:, 0]  # [T, units]
    return m.u_out(torch.gather(units, 1, units.topk(TOP_K, -1).indices))


BOUNDS = torch.tensor([0.3, 0.8, 1.5], dtype=DTYPE)

ROUTES: dict[str, Route] = {
    "gather by keyword, negative dim": lambda m, h: _mixed(
        m, h, m.router(h), lambda s, i: torch.gather(s, dim=-2, index=spread(i))),
    "Tensor.gather": lambda m, h: _mixed(m, h, m.router(h), lambda s, i: s.gather(-2, spread(i))),
    "take_along_dim, broadcast index": lambda m, h: _mixed(
        m, h, m.router(h), lambda s, i: torch.take_along_dim(s, i[..., None], dim=1)),
    "Tensor.take_along_dim by keyword": lambda m, h: _mixed(
        m, h, m.router(h), lambda s, i: s.take_along_dim(i[..., None], dim=-2)),
    "take_along_dim, x broadcast": lambda m, h: _mixed(
        m, h, m.router(h),
        lambda s, i: torch.take_along_dim(s.sum(0, keepdim=True), i[..., None], dim=1)),
    "gather, index narrower than x": lambda m, h: F.pad(_mixed(
        m, h, m.router(h), lambda s, i: torch.gather(s, 1, spread(i)[..., :-2])), (0, 2)),
    "gather along a dim of size 1": lambda m, h: _mixed(
        m, h, m.router(h), lambda s, i: torch.gather(s[:, :1], 1, spread(i) * 0)),
    "gather, then flattened": lambda m, h: _mixed(
        m, h, m.router(h), lambda s, i: torch.gather(s, 1, spread(i))).reshape(-1, WIDTH),
    "logits: the hidden state": lambda m, h: _mixed(
        m, h, hidden_logits(h), lambda s, i: torch.gather(s, 1, spread(i))),
    "argmax of the hidden state": _picked_by(lambda h: hidden_logits(h).argmax(-1, keepdim=True)),
    "argsort of the hidden state": _picked_by(lambda h: hidden_logits(h).argsort(-1)[:, :1]),
    "max of the hidden state": _picked_by(lambda h: hidden_logits(h).max(-1, keepdim=True).indices),
    "smallest of the hidden state": _picked_by(
        lambda h: hidden_logits(h).topk(1, -1, largest=False).indices),
    "kthvalue of the hidden state": _picked_by(
        lambda h: hidden_logits(h).kthvalue(2, -1, keepdim=True).indices),
    "bucketize of the hidden state": _picked_by(
        lambda h: torch.bucketize(h[:, :1].contiguous(), BOUNDS)),
    "thresholds of the hidden state": _picked_by(
        lambda h: (h[:, :1] > 0.5).long() + (h[:, 1:2] > 0.2).long()),
    "two channels compared": _picked_by(lambda h: (h[:, :1] > h[:, 1:2]).long()),
    "rounded hidden state": _picked_by(lambda h: h[:, :1].round().long().clamp(0, EXPERTS - 1)),
    "index_select by the hidden state": lambda m, h: m.stacked(h).index_select(
        1, hidden_logits(h).sum(0).argmax().view(1)).sum(1),
    "routed by the experts' outputs": _self_routed,
    "channels picked by their values": _channels_by_value,
    "units picked by their values": _units_by_value,
    "scatter_add": lambda m, h: _scattered(m, h, add=True),
    "scatter": lambda m, h: _scattered(m, h, add=False),
    "channels picked by the weights": lambda m, h: torch.gather(
        m.stacked(h).sum(1), 1, m.lin_in.weight.argmax(0).expand(h.shape[0], -1)).repeat(1, 2),
}  # fmt: skip


def tokens(n: int, seed: int) -> Tensor:
    return torch.randn(n, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("route", list(ROUTES))
def test_picks_by_the_data_keep_the_outputs_for_other_routings(route):
    torch.manual_seed(0)
    model = Experts(ROUTES[route]).to(DTYPE)
    s = gaugefix.discover(model, tokens(TOKENS, 0))
    assert s.num_generators > 0, s.summary()
    assert worst_change(model, s, [(tokens(TOKENS, 0),), (tokens(7, 1),), (tokens(13, 2),)]) <= TOL
