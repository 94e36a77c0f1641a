"""LoRA support and the constant-input linear rule, audited.

A linear map of a fixed input (``F.linear(c, W)`` with ``c`` a constant) gives ``W``'s columns
the factor 0, so a weight read by a constant and by a rescaled input is one role: its columns
fixed, its rows free. A learned query run through the same projection as the data (DETR,
Perceiver), an embedding of a fixed grid, ``nn.Linear`` on ``torch.ones``: each keeps the
projection's output channels, in either order of the two reads, with or without a bias, with
2-d or 3-d constants; every one of them is exact. On ``peft`` models: several adapters (the
inactive one is not read, no generator acts on it, and balancing with the base frozen leaves
it valid), LoRA on embeddings and convolutions, ``lora_bias``, ``"all-linear"``, merged
adapters, adapters starting at ``B = 0`` under ``GaugeFixing``, and a compiled model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_lora import (
    DTYPE,
    FRESH_IDS,
    IDS,
    SCALE,
    TOL,
    assert_exact,
    base_model,
    frozen_subgroup,
    outputs,
)

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH = 6
QUERIES = 4
RANK = 3
ALPHA = 6
BASE_GENERATORS = 152  # the tiny Llama of test_lora
X = torch.randn(5, WIDTH, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
FRESH_X = torch.randn(9, WIDTH, dtype=DTYPE, generator=torch.Generator().manual_seed(3))


# --- the constant-input rule on models without adapters -------------------------------------
def constant(kind: str, three_d: bool) -> Tensor:
    """A fixed input of the projection: random learned-looking queries, ``ones``, or a sine
    grid (a time embedding's), ``[QUERIES, WIDTH]`` or ``[2, QUERIES, WIDTH]``."""
    if kind == "queries":
        c = torch.randn(QUERIES, WIDTH, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    elif kind == "ones":
        c = torch.ones(QUERIES, WIDTH, dtype=DTYPE)
    else:
        c = torch.sin(torch.linspace(0, 3, QUERIES * WIDTH, dtype=DTYPE)).view(QUERIES, WIDTH)
    return c.expand(2, QUERIES, WIDTH).clone() if three_d else c


class SharedProjection(nn.Module):
    """``proj`` reads a fixed input ``c`` (a buffer) and the rescaled hidden ``h``; the two
    results are summed (``y + q``), so ``proj``'s rows carry one factor in both."""

    def __init__(self, kind: str, data_first: bool, bias: bool, three_d: bool) -> None:
        super().__init__()
        self.data_first = data_first
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH, bias=bias)
        self.out = nn.Linear(WIDTH, 3)
        self.register_buffer("c", constant(kind, three_d))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        if self.data_first:
            y, q = self.proj(h), self.proj(self.c)
        else:
            q, y = self.proj(self.c), self.proj(h)
        if q.dim() == 3:
            q = q.mean(0)
        return self.out(torch.relu(y.unsqueeze(1) + q.unsqueeze(0)).sum(1))


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("data_first", [False, True])
@pytest.mark.parametrize("kind", ["queries", "ones", "grid"])
def test_a_projection_of_a_constant_and_of_the_data_keeps_its_rows(kind, data_first, bias, three_d):
    """One generator per output channel of ``proj`` (its columns, and so ``inp``'s channels,
    fixed by the constant read; before the rule: none, ``proj`` fixed by two roles), exact on
    fresh inputs."""
    torch.manual_seed(0)
    model = SharedProjection(kind, data_first, bias, three_d).to(DTYPE).eval()
    structure = gaugefix.discover(model, X)
    assert structure.num_generators == WIDTH
    assert bool(structure.touching({"proj.weight", "out.weight"}).all())
    assert not bool(structure.touching({"inp.weight"}).any())
    assert_exact(model, structure, FRESH_X)


class SharedWithParameter(nn.Module):
    """A learned query (a parameter) read through an arrangement (``expand``) by the same
    projection as the data."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(QUERIES, WIDTH))
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        q = self.proj(self.query.unsqueeze(0).expand(2, QUERIES, WIDTH)).mean(0)
        y = self.proj(torch.relu(self.inp(x)))
        return self.out(torch.relu(y.unsqueeze(1) + q.unsqueeze(0)).sum(1))


def test_a_learned_query_parameter_through_the_data_projection_is_exact():
    """``proj``'s output channels, and its input channels: the query, read like an embedding
    table, produces them, and so does ``inp``, their factors one since ``proj`` divides both."""
    torch.manual_seed(0)
    model = SharedWithParameter().to(DTYPE).eval()
    structure = gaugefix.discover(model, X)
    assert structure.num_generators == 2 * WIDTH
    assert_exact(model, structure, FRESH_X)


# --- peft features -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


def llama_with(peft, **config) -> nn.Module:
    options = {"r": RANK, "lora_alpha": ALPHA, "init_lora_weights": False, **config}
    torch.manual_seed(1)
    return peft.get_peft_model(base_model("llama"), peft.LoraConfig(**options)).to(DTYPE).eval()


def same_function(model: nn.Module, moved: nn.Module) -> bool:
    """Whether two Llama models give the same logits (1e-10) on fresh ids."""
    change = rel_change(outputs(model, input_ids=FRESH_IDS), outputs(moved, input_ids=FRESH_IDS))
    return change <= TOL


def lora_only(structure: gaugefix.GaugeStructure) -> int:
    """How many generators act on adapter parameters alone."""
    lora = {n for n in structure.param_order if ".lora_" in n}
    return int((structure.touching(lora) & ~structure.touching(set(structure.param_order) - lora))
               .sum())  # fmt: skip


@pytest.mark.parametrize(
    ("config", "adapted"),
    [
        ({"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}, 4),
        ({"target_modules": ["q_proj", "v_proj", "down_proj"], "lora_bias": True}, 6),
        ({"target_modules": "all-linear"}, 14),
        ({"target_modules": ["embed_tokens", "q_proj"]}, 3),
    ],
    ids=["modules_to_save", "lora_bias", "all_linear", "embedding"],
)
def test_peft_options_keep_one_generator_per_rank_channel(peft, config, adapted):
    """The base model's generators plus ``r`` per adapted module, exact; ``modules_to_save``'s
    frozen original is not read, and no generator moves it."""
    model = llama_with(peft, **config)
    structure = gaugefix.discover(model, input_ids=IDS)
    assert lora_only(structure) == RANK * adapted
    assert structure.num_generators == BASE_GENERATORS + RANK * adapted
    assert_exact(model, structure, input_ids=FRESH_IDS)
    original = {n for n in structure.param_order if "original_module" in n}
    assert not bool(structure.touching(original).any())


IMAGES = torch.randn(2, 3, 5, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
FRESH_IMAGES = torch.randn(3, 3, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))


def conv_with(peft, **config) -> nn.Module:
    """A small convolutional net with adapters (rank 2) on both convolutions."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).to(DTYPE)
    options = {"r": 2, "lora_alpha": 4, "target_modules": ["0", "2"], "init_lora_weights": False}
    return peft.get_peft_model(net, peft.LoraConfig(**options, **config)).eval()


def test_lora_on_convolutions_has_one_generator_per_rank_channel(peft):
    model = conv_with(peft)
    structure = gaugefix.discover(model, IMAGES)
    assert lora_only(structure) == 2 * 2
    assert structure.num_generators == 8 + 2 * 2  # the 8 hidden channels, and the rank ones
    assert_exact(model, structure, FRESH_IMAGES)


@pytest.mark.parametrize("layer", ["embedding", "conv"])
def test_dora_on_embeddings_and_convolutions_keeps_its_rank_channels(peft, layer):
    """peft's DoRA on ``nn.Embedding`` and ``nn.Conv2d`` forms ``B A`` as a product of the two
    weights (``matmul``, ``mm``): invariant under the rank channels, which stay generators
    (``r`` per adapter), exact."""
    if layer == "embedding":
        model = llama_with(peft, target_modules=["embed_tokens"], use_dora=True)
        structure = gaugefix.discover(model, input_ids=IDS)
        assert_exact(model, structure, input_ids=FRESH_IDS)
    else:
        model = conv_with(peft, use_dora=True)
        structure = gaugefix.discover(model, IMAGES)
        assert_exact(model, structure, FRESH_IMAGES)
    assert lora_only(structure) == (RANK if layer == "embedding" else 2 * 2)


def test_an_inactive_adapter_is_not_moved_and_stays_valid(peft):
    """A second adapter, inactive in the trace: no generator acts on it; ``equalize_`` and a
    random move of the rank generators (the base frozen) leave it in place, and switching to it
    after them computes what it did before."""
    model = llama_with(peft, target_modules=["q_proj", "v_proj"])
    config = {"r": 2, "lora_alpha": 4, "init_lora_weights": False}
    model.add_adapter("second", peft.LoraConfig(target_modules=["q_proj", "v_proj"], **config))
    model.set_adapter("default")
    model.to(DTYPE)
    structure = gaugefix.discover(model, input_ids=IDS)
    second = {n for n in structure.param_order if ".second." in n}
    assert len(second) == 8 and not bool(structure.touching(second).any())
    moved = copy.deepcopy(model)
    sub = frozen_subgroup(moved, structure)
    gaugefix.random_gauge_(moved, sub, SCALE, generator=torch.Generator().manual_seed(4))
    gaugefix.equalize_(moved, structure, "norm")
    for name, p in moved.named_parameters():
        if name in second:
            assert torch.equal(p, dict(model.named_parameters())[name]), name
    assert same_function(model, moved)
    for m in (model, moved):
        m.set_adapter("second")
    assert same_function(model, moved)


def test_merged_adapters_are_not_read_and_unmerging_keeps_the_function(peft):
    """Merged, the adapters are not read (no rank generator); a gauge of the merged model is
    exact, and unmerging after it keeps the function (``W' - s B A + s B A = W'``)."""
    model = llama_with(peft, target_modules=["q_proj", "v_proj"])
    model.merge_adapter()
    structure = gaugefix.discover(model, input_ids=IDS)
    assert lora_only(structure) == 0 and structure.num_generators == BASE_GENERATORS
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, structure, SCALE, generator=torch.Generator().manual_seed(0))
    assert same_function(model, moved)
    for m in (model, moved):
        m.unmerge_adapter()
    assert same_function(model, moved)


def train_from_b_zero(peft, strength: float | None) -> tuple[nn.Module, dict, Tensor]:
    """Eight AdamW steps of the adapters from ``B = 0`` (with ``GaugeFixing`` at ``strength``
    unless None): the model, the base weights before, and the rank channels' final imbalance."""
    model = llama_with(peft, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    structure = gaugefix.discover(model, input_ids=IDS)
    assert lora_only(structure) == 4 * RANK
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if strength is not None:
        gaugefix.GaugeFixing(optimizer, model, structure, strength=strength, every=1)
    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    return model, base, gaugefix.imbalance(model, frozen_subgroup(model, structure)).norm()


def test_gauge_fixing_from_b_zero(peft):
    """``init_lora_weights=True`` (``B = 0``): the rank channels are found, dead at the start
    (``||B_:,k|| = 0``); ``GaugeFixing`` (balancing at the start included) trains from there
    with the base bit-identical and every parameter finite, and the imbalance of the rank
    channels ends far below that of the same training without it."""
    model, base, fixed = train_from_b_zero(peft, 1000.0)
    _, _, free = train_from_b_zero(peft, None)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert fixed < free * 1e-3  # 6.2e-17 against 1.5


def test_a_compiled_peft_model_has_the_structure_of_the_model(peft):
    model = llama_with(peft, target_modules=["q_proj", "v_proj"])
    plain = gaugefix.discover(model, input_ids=IDS)
    compiled = gaugefix.discover(torch.compile(model), input_ids=IDS)
    assert compiled.param_order == plain.param_order
    assert compiled.num_generators == plain.num_generators == BASE_GENERATORS + 4 * RANK
    assert_exact(model, compiled, input_ids=FRESH_IDS)
