"""Expert weights gathered by expert index and then transposed: Hugging Face DBRX keeps fused
weights ``w1, v1, w2 [experts * ffn, d]``, views them ``[experts, ffn, d]``, picks one expert
``w1.view(...)[e]`` and reads ``x @ w1_e.T``. A pure permutation of whole dims (``.t()``, ``.T``,
``.mT``, ``transpose``, ``permute``, ``swapaxes``, ``movedim``) of such a slice moves every
entry without mixing slices, so each expert's units are generators exactly as when the expert is
written ``F.linear(x, w[e])``. Everything else done to the gathered slice (a reshape or ``view``
that reinterprets its memory or merges the gathered dim with another, a slice of the transposed
tensor along another dim, a gather along the unit dim, ``as_strided``, an in-place write) keeps
blocking, with its reason.

Exactness is checked in float64 on fresh inputs (other token counts, other routing) after a
random gauge of scale 3 (1e-10) and a gauge of powers of two (1e-12). Each near miss is shown to
be genuinely not equivariant: the generators of the transposed spelling, applied to it, change
its outputs; discovery's own structure for it stays exact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import incidence, rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL, POW2_TOL, SCALE = torch.float64, 1e-10, 1e-12, 3.0
CHANGED = 1e-3  # a genuine change of the outputs (the exact ones stay below 1e-10)
EXPERTS, UNITS, WIDTH, TOP_K, IN, OUT = 3, 5, 4, 2, 3, 2
# lin_in's neurons, per expert unit a gate and an up generator (ReLU gate), the summed outputs
COUNT = WIDTH + EXPERTS * UNITS * 2 + WIDTH
EXAMPLE_TOKENS, FRESH = 12, ((5, 1), (17, 2), (9, 3))  # (tokens, seed) of the fresh inputs


def _up(spelling: str, x: Tensor, s: Tensor) -> Tensor:
    """``x @ s^T`` for an expert slice ``s [units, width]``, spelled ``spelling``."""
    return {
        "linear": lambda: F.linear(x, s),
        "t": lambda: x @ s.t(),
        "T": lambda: x.matmul(s.T),
        "mT": lambda: x @ s.mT,
        "transpose": lambda: x @ s.transpose(0, 1),
        "permute": lambda: x @ s.permute(1, 0),
        "swapaxes": lambda: x @ torch.swapaxes(s, 0, 1),
        "movedim": lambda: x @ s.movedim(0, 1),
        "twice": lambda: F.linear(x, s.t().transpose(-1, -2)),
        "contiguous": lambda: x @ s.t().contiguous(),
        "einsum": lambda: torch.einsum("nd,df->nf", x, s.t()),
    }[spelling]()


def _down(spelling: str, x: Tensor, s: Tensor) -> Tensor:
    """``x @ s`` for ``s [units, width]``: as is for ``linear``, else ``x @ (s^T)^T``."""
    return x @ s if spelling == "linear" else _up(spelling, x, s.t())


class FusedExperts(nn.Module):
    """``h = relu(lin_in x)``; a router picks the top-2 of 3 experts per token; expert ``e``
    (a loop over ``arange``, as DBRX's over the experts hit) computes
    ``(relu(h w1_e^T) * (h v1_e^T)) w2_e`` with ``w_e = w.view(experts, units, width)[e]``;
    the weighted outputs are added back per token, ``lin_out(relu(.))``. ``[tokens, 3] ->
    [tokens, 2]``."""

    def __init__(self, spelling: str = "linear") -> None:
        super().__init__()
        self.spelling = spelling
        self.lin_in, self.lin_out = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, OUT)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        for name in ("w1", "v1", "w2"):
            setattr(self, name, nn.Parameter(torch.randn(EXPERTS * UNITS, WIDTH)))

    def expert(self, h: Tensor, e: Tensor) -> Tensor:
        w1, v1, w2 = (w.view(EXPERTS, UNITS, WIDTH)[e] for w in (self.w1, self.v1, self.w2))
        units = F.relu(self.gate(h, w1)) * _up(self.spelling, h, v1)
        return _down(self.spelling, units, w2)

    def gate(self, h: Tensor, w1: Tensor) -> Tensor:
        return _up(self.spelling, h, w1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.lin_in(x))
        weights, top = torch.topk(torch.softmax(self.router(h), dim=-1), TOP_K, dim=-1)
        out = torch.zeros_like(h)
        for e in torch.arange(EXPERTS):
            token, slot = torch.where(top == e)
            states = self.expert(h[token], e) * weights[token, slot, None]
            out.index_add_(0, token, states)
        return self.lin_out(F.relu(out))


class BatchedExperts(FusedExperts):
    """:class:`FusedExperts` with the expert weights gathered per (token, slot) by the routing
    itself, ``w.view(...)[ids]`` (``[pairs, units, width]``, as a batched-mm mixture), and
    multiplied in ``bmm`` after a transpose (or in an ``einsum`` after a permutation that moves
    the gathered dim)."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.lin_in(x))
        weights, top = torch.topk(torch.softmax(self.router(h), dim=-1), TOP_K, dim=-1)
        ids = top.reshape(-1)
        w1, v1, w2 = (w.view(EXPERTS, UNITS, WIDTH)[ids] for w in (self.w1, self.v1, self.w2))
        rows = h.repeat_interleave(TOP_K, dim=0)  # [pairs, width]
        units = F.relu(self.gate(rows, w1)) * self.up(rows, v1)
        out = self.up(units, w2.transpose(1, 2)) if self.spelling != "linear" else (
            torch.bmm(units.unsqueeze(1), w2).squeeze(1))  # fmt: skip
        out = (out.view(-1, TOP_K, WIDTH) * weights.unsqueeze(-1)).sum(1)
        return self.lin_out(F.relu(out))

    def up(self, rows: Tensor, w: Tensor) -> Tensor:
        """Per pair ``p``: ``w[p] @ rows[p]`` (``w [pairs, out, in]``)."""
        if self.spelling == "linear":
            return torch.bmm(w, rows.unsqueeze(-1)).squeeze(-1)
        if self.spelling == "permute":  # the gathered dim moved last: [in, out, pairs]
            return torch.einsum("pi,iop->po", rows, w.permute(2, 1, 0))
        moved = w.mT if self.spelling == "mT" else w.transpose(1, 2)
        return torch.bmm(rows.unsqueeze(1), moved).squeeze(1)

    def gate(self, rows: Tensor, w1: Tensor) -> Tensor:
        return self.up(rows, w1)


def tokens(n: int, seed: int) -> Tensor:
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def built(cls: type, spelling: str) -> nn.Module:
    torch.manual_seed(0)
    return cls(spelling).to(DTYPE)


def fresh_inputs() -> list[Tensor]:
    return [tokens(EXAMPLE_TOKENS, 0)] + [tokens(n, seed) for n, seed in FRESH]


def worst(model: nn.Module, inputs: list[Tensor], before: list[Tensor]) -> float:
    with torch.no_grad():
        return max(rel_change(b, model(x)) for x, b in zip(inputs, before, strict=True))


def powers_of_two_gauge_(model: nn.Module, s: gaugefix.GaugeStructure, seed: int) -> None:
    """The group action with factors ``2^k``, ``k`` in -3..3 per generator (exact in floats)."""
    k = torch.randint(-3, 4, (s.num_generators,), generator=torch.Generator().manual_seed(seed))
    params = s.bind(model)
    with torch.no_grad():
        for name in s.params:
            exponent = torch.tensordot(k.to(DTYPE), incidence(s, name).to(DTYPE), dims=1)
            params[name].mul_(torch.exp2(exponent))


def gauged_change(model: nn.Module, s: gaugefix.GaugeStructure, inputs: list[Tensor]) -> float:
    """The largest relative change of the outputs on ``inputs`` under a random gauge of
    ``SCALE`` of ``s`` (on a copy of ``model``)."""
    with torch.no_grad():
        before = [model(x) for x in inputs]
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, s, SCALE, generator=torch.Generator().manual_seed(7))
    return worst(moved, inputs, before)


def assert_exact(model: nn.Module, s: gaugefix.GaugeStructure, inputs: list[Tensor]) -> None:
    assert gauged_change(model, s, inputs) <= TOL
    with torch.no_grad():
        before = [model(x) for x in inputs]
    powers = copy.deepcopy(model)
    powers_of_two_gauge_(powers, s, seed=11)
    assert worst(powers, inputs, before) <= POW2_TOL


def discovered(model: nn.Module) -> gaugefix.GaugeStructure:
    return gaugefix.discover(model, tokens(EXAMPLE_TOKENS, 0))


def same_action(a: gaugefix.GaugeStructure, b: gaugefix.GaugeStructure) -> None:
    """The two structures give every parameter entry the same terms (same numbering)."""
    assert a.num_generators == b.num_generators and a.params.keys() == b.params.keys()
    for name in a.params:
        assert torch.equal(incidence(a, name), incidence(b, name)), name


# -- (a) the permutations keep every expert's units, (b) exactly ----------------------------------
LOOP_SPELLINGS = ["t", "T", "mT", "transpose", "permute", "swapaxes", "movedim", "twice",
                  "contiguous", "einsum"]  # fmt: skip


@pytest.mark.parametrize("cls", [FusedExperts, BatchedExperts])
def test_the_linear_spelling_has_every_experts_units(cls):
    model = built(cls, "linear")
    s = discovered(model)
    assert s.num_generators == COUNT, s.summary()
    assert_exact(model, s, fresh_inputs())


@pytest.mark.parametrize("spelling", LOOP_SPELLINGS)
def test_a_transposed_expert_slice_is_the_linear_spelling(spelling):
    model = built(FusedExperts, spelling)
    s = discovered(model)
    assert s.num_generators == COUNT, s.summary()
    assert not [e for e in s.excluded if "rearranged" in e.reason]
    same_action(s, discovered(built(FusedExperts, "linear")))
    assert_exact(model, s, fresh_inputs())


@pytest.mark.parametrize("spelling", ["transpose", "mT", "permute"])
def test_slices_gathered_per_token_then_transposed_keep_every_experts_units(spelling):
    model = built(BatchedExperts, spelling)
    s = discovered(model)
    assert s.num_generators == COUNT, s.summary()
    same_action(s, discovered(built(BatchedExperts, "linear")))
    assert_exact(model, s, fresh_inputs())


# -- near misses: not a pure permutation of whole dims, so they block ----------------------------
ROLL = torch.arange(UNITS).roll(1)


def _written(write: Callable[[Tensor], object]) -> Callable[[Tensor, Tensor], Tensor]:
    """``h @ m`` with ``m`` a transposed copy of the slice written in place by ``write``."""

    def gate(h: Tensor, s: Tensor) -> Tensor:
        m = s.clone().t()
        write(m)
        return h @ m

    return gate


def _without_grad(write: Callable[..., Tensor], *args: object) -> Tensor:
    with torch.no_grad():
        return write(*args)


def _base_written(h: Tensor, s: Tensor) -> Tensor:
    """The copy written in place after its transpose was taken; the transpose read after."""
    copied = s.clone()
    m = copied.t()
    copied.add_(0.5)
    return h @ m


def _view_written(h: Tensor, s: Tensor) -> Tensor:
    """A transpose of the copy written in place; the copy transposed again and read after."""
    copied = s.clone()
    copied.t().clamp_(max=0.2)
    return h @ copied.T


# name: (``h @ M`` for the expert slice ``s [units, width]`` of the gate, whether the
# generators of the transposed spelling change the outputs)
LOOP_NEAR_MISSES = {
    "view": (lambda h, s: h @ s.view(WIDTH, UNITS), True),  # reinterprets the memory
    "reshape": (lambda h, s: h @ s.reshape(WIDTH, UNITS), True),
    "flip": (lambda h, s: h @ s.t().flip(1), True),  # units reversed
    "roll": (lambda h, s: h @ s.t().roll(1, 1), True),
    "unit-slices": (lambda h, s: h @ torch.cat([s.t()[:, 1:], s.t()[:, :1]], 1), True),
    "unit-gather": (lambda h, s: h @ s.t()[:, ROLL], True),  # gathered along the unit dim
    "index-select": (lambda h, s: h @ s.t().index_select(1, ROLL), True),
    "width-slice": (lambda h, s: h[:, 1:] @ s.t()[1:], False),  # equivariant, not recognised
    "as-strided": (lambda h, s: h @ s.as_strided((WIDTH, UNITS), (UNITS, 1)), True),
    "as-strided-transpose": (lambda h, s: h @ s.as_strided((WIDTH, UNITS), (1, WIDTH)), False),
    "add_": (_written(lambda m: m.add_(0.5)), True),
    "clamp_": (_written(lambda m: m.clamp_(max=0.2)), True),
    "fill_": (_written(lambda m: m.fill_(0.3)), True),
    "setitem": (_written(lambda m: m.__setitem__(0, 1.0)), True),
    "copy_": (_written(lambda m: m.copy_(torch.ones_like(m))), True),
    "no-grad": (_written(lambda m: _without_grad(m.add_, 0.5)), True),
    "data": (_written(lambda m: m.data.add_(0.5)), True),
    "base-written": (_base_written, True),
    "view-written": (_view_written, True),
    "plus-constant": (lambda h, s: h @ (s.t() + 0.5), True),
}


def _near_miss(cls: type, gate: Callable[[Tensor, Tensor], Tensor]) -> nn.Module:
    """``cls`` spelled with transposes, its gate weights read by ``gate``."""

    class NearMiss(cls):
        def gate(self, h: Tensor, w1: Tensor) -> Tensor:
            return gate(h, w1)

    return built(NearMiss, "transpose")


def assert_blocked_and_exact(model: nn.Module, cls: type, changes: bool) -> None:
    """Discovery fixes the gate weights ``w1`` with a reason and its structure is exact; with
    ``changes``, the generators of the plain transposed spelling change the outputs."""
    s = discovered(model)
    assert "w1" not in s.params and s.num_generators < COUNT, s.summary()
    assert any("'w1'" in e.reason for e in s.excluded), s.summary()
    assert_exact(model, s, fresh_inputs())
    if changes:
        naive = discovered(built(cls, "transpose"))
        assert naive.num_generators == COUNT
        assert gauged_change(model, naive, fresh_inputs()) > CHANGED


@pytest.mark.parametrize("name", list(LOOP_NEAR_MISSES))
def test_a_near_miss_of_a_transposed_expert_slice_blocks(name):
    gate, changes = LOOP_NEAR_MISSES[name]
    assert_blocked_and_exact(_near_miss(FusedExperts, gate), FusedExperts, changes)


# name: (``rows @ M`` per pair for the gathered gate weights ``w [pairs, units, width]``,
# whether the transposed spelling's generators change the outputs)
BATCHED_NEAR_MISSES = {
    "reshape": (lambda w: w.reshape(-1, WIDTH, UNITS), True),  # within each slice
    "merge": (lambda w: w.transpose(0, 1).reshape(-1, WIDTH, UNITS), True),  # across slices
    "merge-and-split-back": (  # equivariant (it is the transpose), not recognised
        lambda w: w.flatten(0, 1).t().reshape(WIDTH, -1, UNITS).transpose(0, 1),
        False,
    ),
    "unit-gather": (lambda w: w.transpose(1, 2)[:, :, ROLL], True),
    "pairs-reversed": (lambda w: w.transpose(1, 2).flip(0), True),  # another pair's slice
    "unsqueeze": (lambda w: w.transpose(1, 2).unsqueeze(0)[0], False),
    "add_": (lambda w: w.transpose(1, 2).add_(0.5), True),
}


@pytest.mark.parametrize("name", list(BATCHED_NEAR_MISSES))
def test_a_near_miss_of_slices_gathered_per_token_blocks(name):
    arrange, changes = BATCHED_NEAR_MISSES[name]

    def gate(rows: Tensor, w: Tensor) -> Tensor:
        return torch.bmm(rows.unsqueeze(1), arrange(w)).squeeze(1)

    assert_blocked_and_exact(_near_miss(BatchedExperts, gate), BatchedExperts, changes)


# -- Hugging Face DBRX ------------------------------------------------------------------------
D_MODEL, FFN, HF_EXPERTS, KV_HEADS, HEADS = 16, 8, 3, 2, 4


def dbrx(act: str) -> nn.Module:
    """A tiny float64 ``DbrxForCausalLM`` (2 layers, 3 experts of 8 units, top-2), perturbed.
    ``clip_qkv`` is infinite: the clamp's bounds are then +-inf, which a gauge leaves as they are
    (this version's ``clamp(min=None, max=None)`` fails for ``None``)."""
    transformers = pytest.importorskip("transformers")
    from test_scale_groups_audit import perturbed_hf

    config = transformers.DbrxConfig(
        d_model=D_MODEL, n_heads=HEADS, n_layers=2, max_seq_len=64, vocab_size=40,
        attn_config={"kv_n_heads": KV_HEADS, "clip_qkv": float("inf")},
        ffn_config={"ffn_hidden_size": FFN, "moe_num_experts": HF_EXPERTS, "moe_top_k": 2,
                    "ffn_act_fn": {"name": act}},
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    if not hasattr(config.attn_config, "rope_theta"):  # read by the attention's __init__
        config.attn_config.rope_theta = config.rope_parameters["rope_theta"]
    config._attn_implementation = "eager"
    return perturbed_hf("DbrxForCausalLM", config)


# Per layer: norm_1's and norm_2's gains (norm_2 feeds the router and the experts' w1, v1),
# Wqkv's rotary pairs (one per rotated pair of a key head) and value-output pairs, and per
# expert unit an up/down generator (v1 row, w2 row), plus a gate one with a ReLU. norm_f's gains
# are fixed: the last hidden state, which the example call returns, is after it. Before the
# transposed slices were recognised, every expert's w1 and v1 were fixed (and norm_2 with
# them): 56 generators for either activation.
ATTENTION = 2 * D_MODEL + (D_MODEL // HEADS) // 2 * KV_HEADS + D_MODEL // HEADS * KV_HEADS
DBRX_COUNTS = {
    "relu": 2 * (ATTENTION + HF_EXPERTS * FFN * 2),
    "silu": 2 * (ATTENTION + HF_EXPERTS * FFN),
}
assert DBRX_COUNTS["relu"] == 184


@pytest.mark.parametrize("act", list(DBRX_COUNTS))
def test_dbrx_keeps_every_experts_units_exactly_on_fresh_inputs(act):
    from test_hf_heldout2 import EXAMPLE, call
    from test_hf_heldout2 import FRESH as HF_FRESH
    from test_hf_sweep_audit import powers_of_two_gauge_ as hf_powers_of_two_gauge_
    from test_hf_sweep_audit import returned, richest_call, worst_change

    def change(model: nn.Module) -> float:
        pairs = zip(calls, before, strict=True)
        return max(worst_change(b, returned(model, c))[0] for c, b in pairs)

    model = dbrx(act)
    example = richest_call(model, call("ids", *EXAMPLE))
    extra = {k: v for k, v in example.items() if k.startswith("output_")}
    calls = [example] + [{**call("ids", *shape), **extra} for shape in HF_FRESH]
    s = gaugefix.discover(model, **example, allow_value_dependent=True)  # the experts hit
    assert s.num_generators == DBRX_COUNTS[act], s.summary()
    assert not [e for e in s.excluded if "rearranged" in e.reason], s.summary()
    before = [returned(model, c) for c in calls]
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(3))
    assert change(model) <= TOL
    powers = dbrx(act)
    hf_powers_of_two_gauge_(powers, s, seed=11)
    assert change(powers) <= POW2_TOL


# -- one parameter gathered along two different dims ---------------------------------------------
class TwoArrangements(nn.Module):
    """``h = relu(lin x)``; token ``t``: ``u = relu(w[a_t] h)``, ``z = w.transpose(0, 1)[b_t] u``
    (slices of ``w [3, 3, 3]`` along dim 0, then along dim 1); ``out(relu(z))``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, 3))
        self.lin, self.out = nn.Linear(2, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        h = F.relu(self.lin(x))
        u = F.relu(torch.bmm(self.w[a], h.unsqueeze(-1)).squeeze(-1))
        z = torch.bmm(self.w.transpose(0, 1)[b], u.unsqueeze(-1)).squeeze(-1)
        return self.out(F.relu(z))


def test_slices_read_along_one_dim_do_not_cover_those_unread_along_another():
    """The example reads only ``w[0]`` along dim 0 and every slice along dim 1: the slices
    ``w[1], w[2]`` are read by other inputs, so ``w`` is fixed (naming them). Counting the
    slices read per dim 0 of each arrangement took the dim-1 reads for dim-0 ones, and the
    structure then changed other inputs' outputs by 5e-4."""
    torch.manual_seed(0)
    model = TwoArrangements().to(DTYPE)
    x = tokens(6, 0)[:, :2]
    example = (x, torch.zeros(6, dtype=torch.long), torch.arange(6) % 3)
    s = gaugefix.discover(model, *example)
    assert "w" not in s.params, s.summary()
    assert any("slices [1, 2] of 'w' (dim 0)" in e.reason for e in s.excluded), s.summary()
    other = (x, torch.arange(6) % 3, torch.tensor([2, 2, 1, 0, 0, 0]))
    with torch.no_grad():
        before = [model(*example), model(*other)]
        gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
        after = [model(*example), model(*other)]
    assert max(rel_change(b, a) for b, a in zip(before, after, strict=True)) <= TOL


def test_grouped_mm_of_gathered_slices_at_offsets_from_the_data_fixes_the_weight():
    """``_grouped_mm(h, w[pick].transpose(1, 2), offs)`` with ``offs`` from the data: which
    slices of ``w`` the groups read is not recorded per slice, so ``w`` is fixed (float32: the
    CPU kernel has no float64)."""

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Parameter(torch.randn(3, 4, 8))
            self.lin_in, self.lin_out = nn.Linear(3, 8), nn.Linear(4, 2)

        def forward(self, x: Tensor, pick: Tensor, sizes: Tensor) -> Tensor:
            offs = torch.cumsum(sizes, 0, dtype=torch.int32)
            h = F.relu(self.lin_in(x))
            up = self.up[pick].transpose(1, 2)
            return self.lin_out(F.relu(torch._grouped_mm(h, up, offs=offs)))

    torch.manual_seed(0)
    model = Grouped()
    s = gaugefix.discover(model, torch.randn(6, 3), torch.tensor([2, 0, 1]), torch.tensor([2] * 3))
    assert "up" not in s.params, s.summary()
    assert any("slices of gathered slices" in e.reason for e in s.excluded), s.summary()
