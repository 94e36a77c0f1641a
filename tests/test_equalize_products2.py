"""``equalize_(..., "activation")``'s calibration pass follows four more spellings of a matrix
product, each checked against the same model written with ``nn.Linear`` (float64, the same
weights; the equalized parameters equal to ``1e-10``): fused experts gathered by an index tensor
(``W[expert_ids]``, then ``bmm`` or ``einsum``), ``nn.MultiheadAttention``'s output projection
(applied inside ``F.multi_head_attention_forward``), a 2-D weight expanded to ``[B, ., .]`` for
``bmm``, and ``torch.einsum``'s sublist form. A product it cannot follow (a stacked weight
gathered by a 2-D index) records no maxima for that weight and is reported by the result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import randomise_, rel_change
from gaugefix.calibration import activation_ranges
from test_equalize import output
from test_equalize_products import (
    EXACT,
    TOKENS,
    TOL,
    Block,
    D,
    Fused,
    _batch,
    assert_calibrated_as_unfused,
    block,
    equalized,
    mismatch,
    moe,
)

pytestmark = pytest.mark.usefixtures("single_thread")

HEADS = 2


# -- a 2-D weight expanded for bmm; einsum's sublist form ------------------------------------------


def _expanded(h: Tensor, w: Tensor) -> Tensor:
    return torch.bmm(h, w.T.unsqueeze(0).expand(h.shape[0], -1, -1))


def _expanded_first(h: Tensor, w: Tensor) -> Tensor:
    return torch.bmm(w.expand(h.shape[0], -1, -1), h.transpose(1, 2)).transpose(1, 2)


READS = {
    "linear": lambda h, w: F.linear(h, w),
    "expand_bmm": _expanded,
    "expand_bmm_weight_first": _expanded_first,
    "expand_matmul": lambda h, w: h @ w.T.expand(h.shape[0], -1, -1),
    "einsum_sublist": lambda h, w: torch.einsum(h, [0, 1, 2], w, [3, 2], [0, 1, 3]),
    "einsum_sublist_implicit": lambda h, w: torch.einsum(h, [0, 1, 5], w, [3, 5]),
    "einsum_sublist_ellipsis": lambda h, w: torch.einsum(w, [7, 2], h, [..., 2], [..., 7]),
}


class Block2(Block):
    reads = READS


def block2(how: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_(Block2(how).to(torch.float64), seed=1).eval()


@pytest.mark.parametrize("how", [h for h in READS if h != "linear"])
def test_an_expanded_weight_and_an_einsum_sublist_are_calibrated_as_f_linear(how):
    x = _batch(5, 3, D)
    reference, model = block("linear"), block2(how)
    assert float((output(model, (x,)) - output(reference, (x,))).abs().max()) <= EXACT
    expected = activation_ranges(reference, dict(reference.named_parameters()), x)
    got = activation_ranges(model, dict(model.named_parameters()), x)
    assert list(got) == list(expected) == [("w", 1), ("head.weight", 1)]
    assert torch.equal(got["w", 1], expected["w", 1])
    assert torch.allclose(got["head.weight", 1], expected["head.weight", 1], rtol=EXACT, atol=0)
    structure = gaugefix.discover(reference, x)  # the same parameter names and symmetries
    assert gaugefix.discover(model, x).num_generators == structure.num_generators
    got_point = equalized(model, x, structure)
    assert mismatch(got_point, equalized(reference, x, structure)) <= TOL


# -- fused experts gathered by an index tensor ---------------------------------------------------


class Gathered(Fused):
    """:class:`Fused`'s experts applied per token to the matrices gathered by its expert id
    (``W[ids]``, ``[N, ., .]``), as Hugging Face's ``batched_mm`` experts do."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        ids = self.router(h).argmax(-1)
        if self.how == "gather_bmm":  # weight first, the input a column
            hidden = torch.bmm(self.gate_up[ids], h.unsqueeze(-1)).squeeze(-1)
        else:
            hidden = torch.einsum("nd,nfd->nf", h, self.gate_up.index_select(0, ids))
        gate, up = hidden.chunk(2, -1)
        inner = (torch.relu(gate) * up).unsqueeze(1)
        return torch.bmm(inner, self.down[ids].transpose(1, 2)).squeeze(1)


def gathered(how: str) -> tuple[nn.Module, nn.Module]:
    fused, unfused = moe("bmm")
    model = Gathered(how).to(torch.float64).eval()
    model.load_state_dict(fused.state_dict())
    return model, unfused


@pytest.mark.parametrize("how", ["gather_bmm", "gather_einsum"])
def test_gathered_experts_are_calibrated_as_unfused_ones(how):
    """Matrix ``e`` has the maxima of the tokens whose gathered copy is ``W[e]``."""
    x = _batch(TOKENS, D)
    model, unfused = gathered(how)
    assert_calibrated_as_unfused(model, unfused, x)
    structure = gaugefix.discover(gathered("gather_bmm")[0], x)  # also index_select's
    result = gaugefix.equalize_(model, structure, "activation", calibration=x)
    assert result.converged and result.uncalibrated == ()
    equalized(unfused, x, gaugefix.discover(unfused, x), alpha=0.5)
    for e, expert in enumerate(unfused.experts):
        assert rel_change(expert.gate_up.weight.detach(), model.gate_up[e].detach()) <= TOL
        assert rel_change(expert.down.weight.detach(), model.down[e].detach()) <= TOL
    assert rel_change(unfused.norm.weight.detach(), model.norm.weight.detach()) <= TOL


class PairGathered(Fused):
    """Experts gathered by a 2-D index (``W[ids[:, None]]``: ``[N, 1, ., .]``), a product
    batched over two dims: not followed."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        ids = self.router(h).argmax(-1)[:, None]
        hidden = (self.gate_up[ids] @ h[:, None, :, None]).squeeze(-1).squeeze(1)
        gate, up = hidden.chunk(2, -1)
        return torch.einsum("nh,ndh->nd", torch.relu(gate) * up, self.down[ids[:, 0]])


def test_a_gather_not_followed_is_reported_and_records_nothing():
    x = _batch(TOKENS, D)
    fused, _ = moe("bmm")
    model = PairGathered("pairs").to(torch.float64).eval()
    model.load_state_dict(fused.state_dict())
    with pytest.warns(UserWarning, match="gate_up"):
        got = activation_ranges(model, dict(model.named_parameters()), x)
    assert ("gate_up", 2) not in got and ("down", 2) in got
    before = output(model, (x,))
    with pytest.warns(UserWarning, match="gate_up"):
        result = gaugefix.equalize_(model, gaugefix.discover(model, x), "activation", calibration=x)
    assert result.uncalibrated == ("gate_up",)
    assert rel_change(before, output(model, (x,))) <= TOL


# -- nn.MultiheadAttention's output projection ----------------------------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attention = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.attention(h, h, h, need_weights=False)[0]


class Explicit(nn.Module):
    """:class:`Attention` with ``nn.Linear`` projections and scaled dot-product attention."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (
            p(h).unflatten(-1, (HEADS, -1)).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).flatten(-2))


def attention_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = randomise_(Attention(), seed=1).eval()
    reference = Explicit().to(torch.float64).eval()
    with torch.no_grad():
        reference.norm.load_state_dict(model.norm.state_dict())
        for p, w, b in zip(
            (reference.q, reference.k, reference.v),
            model.attention.in_proj_weight.chunk(3),
            model.attention.in_proj_bias.chunk(3),
            strict=True,
        ):
            p.weight.copy_(w)
            p.bias.copy_(b)
        reference.out.load_state_dict(model.attention.out_proj.state_dict())
    return model, reference


def test_multi_head_attention_output_projection_is_calibrated_as_a_linear():
    x = _batch(2, 5, D)
    model, reference = attention_pair()
    assert float((output(model, (x,)) - output(reference, (x,))).abs().max()) <= EXACT
    got = activation_ranges(model, dict(model.named_parameters()), x)
    expected = activation_ranges(reference, dict(reference.named_parameters()), x)
    assert torch.allclose(
        got["attention.out_proj.weight", 1], expected["out.weight", 1], rtol=EXACT, atol=0
    )
    equalized(model, x, gaugefix.discover(model, x), alpha=0.5)
    equalized(reference, x, gaugefix.discover(reference, x), alpha=0.5)
    q, k, v = model.attention.in_proj_weight.detach().chunk(3)
    for got_w, ref in ((q, reference.q), (k, reference.k), (v, reference.v)):
        assert rel_change(ref.weight.detach(), got_w) <= TOL
    out = model.attention.out_proj.weight.detach()
    assert rel_change(reference.out.weight.detach(), out) <= TOL
