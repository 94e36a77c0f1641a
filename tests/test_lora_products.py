"""Low-rank weights formed as a product of two parameters, ``W = B @ A``.

``B [out, r] @ A [r, in]`` is invariant when rank channel ``k`` multiplies column ``k`` of ``B``
by ``1/a`` and row ``k`` of ``A`` by ``a``; its rows carry ``B``'s row factors and its columns
``A``'s column factors. peft's DoRA forms the weight this way on ``nn.Embedding``
(``(A^T @ B^T)^T``) and ``nn.Conv2d`` (``mm(B.view(-1, r), A.view(r, -1))``), on top of the
adapter's forward ``B(A(x))``: discovery finds one generator per rank channel there, as on
``nn.Linear`` (``B(A(eye))``), on hand-written products (``@``, ``mm``, ``einsum``), and none
where the channel is not a symmetry. Every generator found is exact on fresh inputs (float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_lora import DTYPE, FRESH_IDS, IDS, RANK, TOL, assert_exact, outputs
from test_lora_audit import FRESH_IMAGES, IMAGES, conv_with, llama_with, lora_only

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
FRESH_X = torch.randn(9, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
CONV_RANK = 2  # conv_with's adapters


def rank_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(A, B)`` parameter names of every adapter: peft's ``lora_A``/``lora_B`` and
    ``lora_embedding_A``/``lora_embedding_B``, or a hand-written ``A``/``B``."""
    names = dict(model.named_parameters())
    spellings = (("lora_A.", "lora_B."), ("lora_embedding_A.", "lora_embedding_B."))
    pairs = [(n, n.replace(a, b)) for n in names for a, b in spellings if a in n]
    return pairs + [(n, n[:-1] + "B") for n in names if n.endswith("A") and n[:-1] + "B" in names]


def assert_rank_channels(model: nn.Module, structure: gaugefix.GaugeStructure) -> None:
    """A random move of the generators acting on the adapters alone multiplies row ``k`` of
    each ``A`` (dim 0) by one factor and column ``k`` of its ``B`` (dim 1) by the inverse,
    distinct per channel, and moves nothing else."""
    pairs = rank_pairs(model)
    adapter = {n for pair in pairs for n in pair} & set(structure.param_order)
    rank = structure.touching(adapter) & ~structure.touching(set(structure.param_order) - adapter)
    h = torch.zeros(structure.num_generators, dtype=DTYPE)
    h[rank] = torch.randn(int(rank.sum()), dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, structure, h)
    before, after = dict(model.named_parameters()), dict(moved.named_parameters())
    assert pairs
    for a, b in pairs:
        ra = (after[a] / before[a]).flatten(1)
        rb = (after[b] / before[b]).transpose(0, 1).flatten(1)
        row = ra[:, :1]
        assert torch.allclose(ra, row.expand_as(ra), rtol=TOL, atol=0)
        assert torch.allclose(rb * row, torch.ones_like(rb), rtol=TOL, atol=0)
        assert len(set(row.reshape(-1).tolist())) == ra.shape[0]
    for name, p in model.named_parameters():
        if name not in adapter:
            assert torch.equal(p, after[name]), name


# --- peft's DoRA ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


@pytest.mark.parametrize(
    ("targets", "adapted"),
    [(["embed_tokens"], 1), (["q_proj"], 2), (["embed_tokens", "q_proj", "down_proj"], 5)],
    ids=["embedding", "linear", "embedding_and_linear"],
)
def test_peft_dora_on_embeddings_and_linear_maps_has_one_generator_per_rank_channel(
    peft, targets, adapted
):
    """Before products of parameters were followed: the embedding's rank channels were
    excluded (0 of 3; 12 of 15 found with the linear maps)."""
    model = llama_with(peft, target_modules=targets, use_dora=True)
    structure = gaugefix.discover(model, input_ids=IDS)
    assert lora_only(structure) == RANK * adapted
    assert_rank_channels(model, structure)
    assert_exact(model, structure, input_ids=FRESH_IDS)


def test_peft_dora_on_convolutions_has_one_generator_per_rank_channel(peft):
    """``mm(B.view(-1, r), A.view(r, -1))``: 2 rank channels per adapter (before: 0)."""
    model = conv_with(peft, use_dora=True)
    structure = gaugefix.discover(model, IMAGES)
    assert lora_only(structure) == 2 * CONV_RANK
    assert_rank_channels(model, structure)
    assert_exact(model, structure, FRESH_IMAGES)


def test_peft_dora_balance_with_the_base_frozen_keeps_the_function(peft):
    """``equalize_`` moves the rank channels of the embedding's and the convolutions' DoRA
    adapters to ``||A_k|| = ||B_:,k||`` and keeps the function (1e-10)."""
    for model, args, kwargs in (
        (llama_with(peft, target_modules=["embed_tokens"], use_dora=True), (), {"input_ids": IDS}),
        (conv_with(peft, use_dora=True), (IMAGES,), {}),
    ):
        structure = gaugefix.discover(model, *args, **kwargs)
        before = outputs(model, *args, **kwargs)
        result = gaugefix.equalize_(model, structure, "norm")
        assert result.movable == lora_only(structure) > 0
        assert rel_change(before, outputs(model, *args, **kwargs)) <= TOL
        params = dict(model.named_parameters())
        for a, b in rank_pairs(model):
            rows = params[a].detach().flatten(1).square().sum(1)
            cols = params[b].detach().transpose(0, 1).flatten(1).square().sum(1)
            assert float(((rows - cols).abs() / (rows + cols)).max()) <= 1e-8


# --- hand-written products ---------------------------------------------------------------------
SPELLINGS = {
    "matmul": lambda b, a: b @ a,
    "mm": lambda b, a: torch.mm(b, a),
    "transposed": lambda b, a: (a.T @ b.T).T,
    "einsum": lambda b, a: torch.einsum("ok,ki->oi", b, a),
    "einsum_swapped": lambda b, a: torch.einsum("ki,ok->oi", a, b),
}


class LowRank(nn.Module):
    """``F.linear(x, product(B, A))`` with ``B [out, r]``, ``A [r, in]``; ``lora`` also runs
    the factors on ``x`` (``B(A(x))``, before the product when ``lora_first``)."""

    def __init__(self, product, lora: bool = False, lora_first: bool = False) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(RANK, 6))
        self.B = nn.Parameter(torch.randn(4, RANK))
        self.product, self.lora, self.lora_first = product, lora, lora_first

    def forward(self, x: Tensor) -> Tensor:
        side = F.linear(F.linear(x, self.A), self.B) if self.lora and self.lora_first else 0
        out = F.linear(x, self.product(self.B, self.A))
        if self.lora and not self.lora_first:
            side = F.linear(F.linear(x, self.A), self.B)
        return out + side


def low_rank(product, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return LowRank(product, **kwargs).to(DTYPE).eval()


@pytest.mark.parametrize("lora", [None, "first", "after"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_a_hand_written_product_has_one_generator_per_rank_channel(spelling, lora):
    """``W = B @ A`` in five spellings, alone or beside ``B(A(x))`` (before or after it): one
    generator per rank channel (before: none), exact."""
    model = low_rank(SPELLINGS[spelling], lora=lora is not None, lora_first=lora == "first")
    structure = gaugefix.discover(model, X)
    assert structure.num_generators == RANK
    assert_rank_channels(model, structure)
    assert_exact(model, structure, FRESH_X)


class Outer(nn.Module):
    """``C(relu(Q @ (B @ A)))`` with ``Q [7, 4]`` a fixed buffer (learned-looking queries):
    the product's columns carry ``A``'s column factors into ``C``'s columns, its rows ``B``'s
    row factors (united, as ``Q`` sums over them)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(RANK, 5))
        self.B = nn.Parameter(torch.randn(4, RANK))
        self.C = nn.Linear(5, 2)
        self.register_buffer("Q", torch.randn(7, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.C(torch.relu(self.Q @ (self.B @ self.A))).sum(0) * x[:, :2]


def test_the_product_is_equivariant_in_its_outer_channels():
    """``A``'s 5 column channels (each scales a column of ``A`` and divides ``C``'s column),
    one for ``B``'s rows together, and the 3 rank channels (before: none), exact."""
    torch.manual_seed(0)
    model = Outer().to(DTYPE).eval()
    structure = gaugefix.discover(model, X)
    assert structure.num_generators == 5 + 1 + RANK
    assert bool(structure.touching({"C.weight"}).any())
    assert_rank_channels(model, structure)
    assert_exact(model, structure, FRESH_X)


# --- products that are not (or not only) a rank channel ------------------------------------------
NOT_RANK = {
    "tanh between A and B elsewhere": lambda m, x: (
        F.linear(x, m.B @ m.A) + torch.tanh(x @ m.A.T) @ m.B.T
    ),
    "a Gram matrix, one parameter twice": lambda m, x: F.linear(x, m.A.T @ m.A)[:, :4],
    "k kept in the output": lambda m, x: torch.einsum("ok,ki->oik", m.B, m.A).sum(-1) @ x.T,
    "A summed alone": lambda m, x: torch.einsum("ok,ki->o", m.B, m.A) * x[:, :4],
    "A shifted before the product": lambda m, x: F.linear(x, m.B @ (m.A + 1.0)),
    "B read as a plain tensor too": lambda m, x: F.linear(x, m.B @ m.A) + m.B.sum(1),
    "a batch of products": lambda m, x: (
        (m.B.expand(2, 4, RANK) @ m.A.expand(2, RANK, 6)).sum(0) @ x.T
    ),
}


class NotRank(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(RANK, 6))
        self.B = nn.Parameter(torch.randn(4, RANK))
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(self, x)


@pytest.mark.parametrize("op", list(NOT_RANK.values()), ids=list(NOT_RANK))
def test_products_that_are_not_rank_channels_are_excluded(op):
    """A function between ``A`` and ``B`` that is not positively homogeneous in ``k``, one
    parameter in both roles, ``k`` not summed away, a letter summed over one factor alone, a
    shift, a plain read, a batch: no generator, with the reasons recorded."""
    torch.manual_seed(0)
    model = NotRank(op).to(DTYPE).eval()
    structure = gaugefix.discover(model, X)
    assert structure.num_generators == 0
    assert {e.module for e in structure.excluded} & {"A", "B"}
    assert_exact(model, structure, FRESH_X)
