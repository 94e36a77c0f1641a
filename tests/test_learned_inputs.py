"""Two spellings whose exact generators discovery finds like those of their equivalents.

Learned queries (Perceiver, Q-Former, attention pooling): a parameter ``latents [L, d]`` read by
a linear map as its input, ``q_proj(latents)``, ``F.linear(latents, W, b)``, maybe copied over
the batch. Like an embedding table feeding a linear map, its column ``c`` carries a factor that
``q_proj``'s column ``c`` divides out, and ``q_proj``'s rows stay free as for a fixed input.

Hand-written top-2 routing: the experts' outputs stacked and picked per token by ``gather`` /
``take_along_dim`` along the expert dim, or the expert weights picked per token in a loop over
the top-k slots. A pick along one dim keeps the other coordinates, so only the expert dim is
united: every expert's units and every summed output channel are generators, as with the
weights gathered per token (the form of Hugging Face's Mixtral). Picks along the channel dim
unite the channels. Every structure is checked exactly: a random gauge keeps the float64
outputs on fresh inputs that route otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

DTYPE, TOL = torch.float64, 1e-10
WIDTH, LATENTS, IN = 6, 3, 4
EXPERTS, UNITS, TOKENS, TOP_K = 4, 5, 40, 2
ROUTED_SEED = 4  # the tiny router of this seed sends the example's tokens to every expert


def gauge_keeps_outputs(model: nn.Module, s: gaugefix.GaugeStructure, *inputs: tuple) -> bool:
    """A random gauge of ``s`` keeps the outputs on every input tuple, to ``TOL``."""
    with torch.no_grad():
        before = [model(*args) for args in inputs]
        gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
        after = [model(*args) for args in inputs]
    return all(rel_change(b, a) <= TOL for b, a in zip(before, after, strict=True))


# --- learned queries ------------------------------------------------------------------------------
class Pooling(nn.Module):
    """``h = relu(inp x)``; ``q = q_proj(latents)`` (in the given spelling); attention of the
    queries over ``h``, ``o(relu(softmax(q k^T) v))``. ``latents [L, d]``: a parameter, a fixed
    buffer or the rows of an embedding table; with ``residual`` added to the attention output."""

    def __init__(self, spelling: str, source: str = "parameter", residual: bool = False) -> None:
        super().__init__()
        self.spelling, self.source, self.residual = spelling, source, residual
        table = torch.randn(LATENTS, WIDTH)
        if source == "buffer":
            self.register_buffer("latents", table)
        elif source == "embedding":
            self.table = nn.Embedding(LATENTS, WIDTH)
        else:
            self.latents = nn.Parameter(table)
        self.inp, self.o = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, 2)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def queries(self, batch: int, ids: Tensor | None) -> Tensor:
        lat = self.table(torch.arange(LATENTS)) if self.source == "embedding" else self.latents
        if self.spelling == "module":
            return self.q_proj(lat)
        if self.spelling == "functional":
            return F.linear(lat, self.q_proj.weight, self.q_proj.bias)
        if self.spelling == "expand":
            return self.q_proj(lat.expand(batch, -1, -1))
        if self.spelling == "picked":  # rows picked by an input
            return self.q_proj(lat[ids])
        return F.linear(lat, self.q_proj.weight, lat[0])  # one parameter as input and bias

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        h = F.relu(self.inp(x))
        q = self.queries(x.shape[0], ids)
        attn = torch.softmax(q @ self.k_proj(h).transpose(-1, -2), -1)
        out = attn @ self.v_proj(h)
        if self.residual:
            out = out + self.latents
        return self.o(F.relu(out))


def pooled(spelling: str, source: str = "parameter", residual: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Pooling(spelling, source, residual).to(DTYPE)


def inputs(batch: int, seed: int) -> Tensor:
    return torch.randn(batch, 5, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


# With the queries fixed: inp's WIDTH neurons, WIDTH query-key pairs, WIDTH value-output
# channels; the learned table adds its WIDTH columns (q_proj's columns divide them out).
FIXED_QUERIES = 3 * WIDTH


@pytest.mark.parametrize("spelling", ["module", "functional", "expand"])
def test_learned_queries_are_read_like_an_embedding_table(spelling):
    for source in ("buffer", "embedding", "parameter"):
        model = pooled(spelling, source)
        s = gaugefix.discover(model, inputs(2, 0))
        assert s.num_generators == FIXED_QUERIES + WIDTH * (source != "buffer"), s.summary()
        assert gauge_keeps_outputs(model, s, (inputs(2, 0),), (inputs(3, 1),), (inputs(1, 2),))
    # the table's columns carry one factor each, which q_proj's columns divide out
    s = gaugefix.discover(pooled(spelling), inputs(2, 0))
    cols = s.params["latents"].terms[0].index.expand(LATENTS, WIDTH)
    assert bool((cols == cols[:1]).all()) and cols[0].unique().numel() == WIDTH


def test_learned_queries_also_added_to_the_attention_output():
    """``out + latents``: the table's column ``c`` shares the value-output factor of channel
    ``c`` (``v_proj``'s row, ``o``'s column), and ``q_proj``'s column divides it out: inp's
    neurons, the query-key pairs and one generator per channel; a fixed buffer there fixes the
    value-output channels."""
    for source, count in (("buffer", 2 * WIDTH), ("parameter", 3 * WIDTH)):
        model = pooled("module", source, residual=True)
        s = gaugefix.discover(model, inputs(2, 0))
        assert s.num_generators == count, s.summary()
        assert gauge_keeps_outputs(model, s, (inputs(2, 0),), (inputs(4, 3),))


def test_rows_picked_by_an_input_read_like_an_embedding_and_two_roles_stay_fixed():
    model = pooled("picked")  # lat[ids]: whole rows looked up, as F.embedding(ids, lat)
    ids = torch.tensor([2, 0, 1, 1])
    s = gaugefix.discover(model, inputs(2, 0), ids)
    assert "latents" in s.params and s.num_generators == FIXED_QUERIES + WIDTH, s.summary()
    other = torch.tensor([0, 0])
    assert gauge_keeps_outputs(model, s, (inputs(2, 0), ids), (inputs(3, 1), other))
    model = pooled("twice")
    s = gaugefix.discover(model, inputs(2, 0))
    assert "latents" not in s.params
    assert any("two roles" in e.reason for e in s.excluded), s.excluded
    assert gauge_keeps_outputs(model, s, (inputs(2, 0),), (inputs(3, 1),))


# --- hand-written top-2 routing -------------------------------------------------------------------
class TopTwo(nn.Module):
    """``h = relu(lin_in x)``; a router's top-2 logits, their softmax the gates; expert ``e``:
    ``down[e] relu(up[e] h)``; ``lin_out(relu(sum_k gate_k expert_{i_k}(h)))``, in the given
    spelling. ``up [E, units, d]``, ``down [E, d, units]``."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.lin_in, self.lin_out = nn.Linear(3, WIDTH), nn.Linear(WIDTH, 2)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.up = nn.Parameter(torch.randn(EXPERTS, UNITS, WIDTH))
        self.down = nn.Parameter(torch.randn(EXPERTS, WIDTH, UNITS))

    def expert(self, h: Tensor, e: int) -> Tensor:
        return F.linear(F.relu(F.linear(h, self.up[e])), self.down[e])

    def stacked(self, h: Tensor) -> Tensor:
        return torch.stack([self.expert(h, e) for e in range(EXPERTS)], dim=1)  # [T, E, d]

    def forward(self, x: Tensor, order: Tensor | None = None) -> Tensor:
        h = F.relu(self.lin_in(x))
        top = self.router(h).topk(TOP_K, dim=-1)
        gate = torch.softmax(top.values, -1)
        if self.spelling == "gather":
            picked = self.stacked(h).gather(1, top.indices.unsqueeze(-1).expand(-1, -1, WIDTH))
            out = (gate.unsqueeze(-1) * picked).sum(1)
        elif self.spelling == "take_along_dim":
            picked = torch.take_along_dim(self.stacked(h), top.indices.unsqueeze(-1), dim=1)
            out = torch.einsum("tk,tkd->td", gate, picked)
        elif self.spelling == "loop":  # the weights of slot k's expert, per token
            out = h.new_zeros(h.shape)
            for k in range(TOP_K):
                idx = top.indices[:, k]
                u = F.relu(torch.bmm(h.unsqueeze(1), self.up.index_select(0, idx).mT))
                out += gate[:, k : k + 1] * torch.bmm(u, self.down[idx].mT).squeeze(1)
        elif self.spelling == "batched":  # as Hugging Face's batched_mm: every slot at once
            idx = top.indices.reshape(-1)
            u = F.relu(torch.bmm(h.repeat_interleave(TOP_K, 0).unsqueeze(1), self.up[idx].mT))
            y = torch.bmm(u, self.down[idx].mT).view(-1, TOP_K, WIDTH)
            out = (gate.unsqueeze(-1) * y).sum(1)
        else:  # channels picked per token by an input
            out = self.stacked(h).gather(2, order.unsqueeze(1).expand(-1, EXPERTS, -1)).sum(1)
        return self.lin_out(F.relu(out))


def routed(spelling: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(ROUTED_SEED)
    model = TopTwo(spelling).to(DTYPE)
    x = torch.randn(TOKENS, 3, dtype=DTYPE)
    hit = model.router(F.relu(model.lin_in(x))).topk(TOP_K, dim=-1).indices
    assert all(torch.bincount(hit[:, k], minlength=EXPERTS).all() for k in range(TOP_K))
    return model, x


def tokens(n: int, seed: int) -> Tensor:
    return torch.randn(n, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


# lin_in's neurons, every expert's units, the summed output channels (the router's logits meet
# topk, which blocks them)
ROUTED = WIDTH + EXPERTS * UNITS + WIDTH


@pytest.mark.parametrize("spelling", ["gather", "take_along_dim", "loop", "batched"])
def test_hand_written_top_two_routing_finds_what_gathered_weights_find(spelling):
    model, x = routed(spelling)
    s = gaugefix.discover(model, x)
    assert s.num_generators == ROUTED, s.summary()
    down = s.params["down"].terms[0].index.expand(EXPERTS, WIDTH, UNITS)[:, :, 0]
    assert down.unique().numel() == WIDTH and bool((down == down[:1]).all())
    assert gauge_keeps_outputs(model, s, (x,), (tokens(7, 1),), (tokens(1, 2),))


def test_channels_picked_by_an_input_share_one_factor():
    model, x = routed("channels")
    order = torch.stack([torch.randperm(WIDTH, generator=torch.Generator().manual_seed(t))
                         for t in range(TOKENS)])  # fmt: skip
    s = gaugefix.discover(model, x, order)
    # the summed output's channels are picked by the data: one generator for all of them
    assert s.num_generators == WIDTH + EXPERTS * UNITS + 1, s.summary()
    other = torch.arange(WIDTH).flip(0).expand(5, WIDTH)
    assert gauge_keeps_outputs(model, s, (x, order), (tokens(5, 3), other))


class PickedChannels(nn.Module):
    """``b`` applied to ``h = relu(a x)`` with channels picked by an input ``order``: from the
    activation (``h.index_select(-1, order)``) or from the weight's columns."""

    def __init__(self, from_weight: bool) -> None:
        super().__init__()
        self.from_weight = from_weight
        self.a, self.b = nn.Linear(3, WIDTH), nn.Linear(WIDTH, 2)

    def forward(self, x: Tensor, order: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        if self.from_weight:
            return F.linear(h, self.b.weight.index_select(1, order), self.b.bias)
        return self.b(h.index_select(-1, order))


@pytest.mark.parametrize("from_weight", [False, True])
def test_channels_an_input_picks_are_united_or_fixed(from_weight):
    torch.manual_seed(0)
    model = PickedChannels(from_weight).to(DTYPE)
    order = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(0))
    s = gaugefix.discover(model, tokens(5, 0), order)
    # one factor for all of a's channels; none when the weight's columns are picked (it is fixed)
    assert s.num_generators == (0 if from_weight else 1), s.summary()
    other = torch.arange(WIDTH).flip(0)
    assert gauge_keeps_outputs(model, s, (tokens(5, 0), order), (tokens(4, 1), other))
