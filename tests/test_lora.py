"""LoRA adapters: the rank-channel gauge group of low-rank adapters.

A LoRA adapter adds ``s B (A dropout(x))`` (``A [r, in]``, ``B [out, r]``) to a frozen linear
map. Each rank channel ``k`` is an exact rescaling: row ``k`` of ``A`` times ``a > 0``, column
``k`` of ``B`` times ``1/a``. Discovery must find one generator per rank channel per adapter
(besides the base model's own), on hand-written adapters (a core install) and on the ``peft``
library's (plain, with dropout, rsLoRA and DoRA), and none where the channel is not a symmetry
(a non-homogeneous function between ``A`` and ``B``, ``A`` read elsewhere). Balancing with the
base frozen moves only the adapters, ``GaugeFixing`` trains them with the base bit-identical,
and merging after balancing gives the merged weights merging gives without it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix.precision import Float64Throughout

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
MERGE_TOL = 1e-12
SCALE = 2.5  # random gauges h ~ N(0, 2.5^2): factors up to about e^8
RANK = 3
ALPHA = 6
FROZEN_REASON = "acts on a frozen base weight"
VOCAB = 40
LLAMA = {
    "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "num_hidden_layers": 2,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}  # fmt: skip
GPT2 = {
    "vocab_size": VOCAB, "n_positions": 64, "n_embd": 16, "n_layer": 2, "n_head": 4,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
# arch: (model class, config class, config, LoRA target modules, fan_in_fan_out); GPT-2's
# projections are Conv1D (x @ W + b with W [in, out]), which peft adapts with fan_in_fan_out
ARCHS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", GPT2, ["c_attn", "c_proj", "c_fc"], True),
    "llama": (
        "LlamaForCausalLM", "LlamaConfig", LLAMA,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False,
    ),
}  # fmt: skip
VARIANTS = {
    "plain": {"lora_dropout": 0.0},
    "dropout": {"lora_dropout": 0.1},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


# --- helpers -------------------------------------------------------------------------------------
def adapters(model: nn.Module) -> list[tuple[str, str]]:
    """``(A's parameter name, B's)`` of every adapter: modules named ``...lora_A...`` (peft's
    ``lora_A.default``) or ``...A`` beside a ``...B``."""
    names = dict(model.named_parameters())
    pairs = []
    for name in names:
        for a, b in ((".lora_A.", ".lora_B."), (".A.", ".B.")):
            if a in name and name.replace(a, b) in names:
                pairs.append((name, name.replace(a, b)))
    return pairs


def rank_generators(model: nn.Module, structure: gaugefix.GaugeStructure) -> Tensor:
    """Bool ``[num_generators]``: the generators acting on the adapters alone (on no parameter
    other than an adapter's ``A`` and ``B``)."""
    lora = {n for pair in adapters(model) for n in pair}
    others = set(structure.param_order) - lora
    return structure.touching(lora & set(structure.param_order)) & ~structure.touching(others)


def frozen_subgroup(model: nn.Module, structure: gaugefix.GaugeStructure):
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return structure.restrict(
        ~structure.touching(frozen & set(structure.param_order)), FROZEN_REASON
    )


def outputs(model: nn.Module, *args: Tensor, **kwargs: Tensor) -> Tensor:
    """The model's output (a Hugging Face model's logits) computed in float64 throughout (a
    cast to float32 inside, such as RMSNorm's, stays float64)."""
    with torch.no_grad(), Float64Throughout():
        out = model(*args, **kwargs)
    return getattr(out, "logits", out)


def check_rank_channels(model: nn.Module, structure: gaugefix.GaugeStructure) -> None:
    """A random move of the rank generators multiplies each row ``k`` of every ``A`` by one
    factor and divides column ``k`` of its ``B`` by the same factor, the factors of distinct
    channels being distinct: one generator per rank channel, acting as the symmetry states."""
    rank = rank_generators(model, structure)
    moved = copy.deepcopy(model)
    h = torch.zeros(structure.num_generators, dtype=DTYPE)
    h[rank] = torch.randn(int(rank.sum()), dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    gaugefix.apply_gauge_(moved, structure, h)
    before, after = dict(model.named_parameters()), dict(moved.named_parameters())
    for a, b in adapters(model):
        ra, rb = after[a] / before[a], after[b] / before[b]
        row = ra[:, :1]
        assert torch.allclose(ra, row.expand_as(ra), rtol=TOL, atol=0)
        assert torch.allclose(rb * row.T, torch.ones_like(rb), rtol=TOL, atol=0)
        assert len(set(row.reshape(-1).tolist())) == ra.shape[0]  # one generator per channel
    for name, p in model.named_parameters():
        if all(name not in pair for pair in adapters(model)):
            assert torch.equal(p, after[name]), name


def assert_exact(model: nn.Module, structure, *args: Tensor, **kwargs: Tensor) -> None:
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, structure, SCALE, generator=torch.Generator().manual_seed(0))
    change = rel_change(outputs(model, *args, **kwargs), outputs(moved, *args, **kwargs))
    assert change <= TOL, change


# --- hand-written adapters (no peft) -----------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + s B(A(dropout(x)))`` over a frozen ``base``; ``between`` is applied to
    ``A``'s output (identity for LoRA)."""

    def __init__(self, base: nn.Linear, between: nn.Module | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Linear(base.in_features, RANK, bias=False)
        self.B = nn.Linear(RANK, base.out_features, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.between = between or nn.Identity()
        self.s = ALPHA / RANK

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.s * self.B(self.between(self.A(self.dropout(x))))


class DoRALinear(LoRALinear):
    """DoRA: ``m * (W + s B A) x / ||W + s B A||_row``, with ``B A`` computed as peft does,
    by running the adapter on an identity matrix (``A`` read by a constant input as well)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.m = nn.Parameter(torch.rand(base.out_features) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        eye = torch.eye(self.A.in_features, dtype=x.dtype)
        delta = self.B(self.A(eye)).T
        norm = torch.linalg.norm(self.base.weight + self.s * delta.detach(), dim=1).detach()
        return (self.m / norm) * (self.base(x) + self.s * self.B(self.A(x)))


class DoRAAfter(DoRALinear):
    """DoRA with the adapter run on ``x`` before it is run on the identity matrix."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x) + self.s * self.B(self.A(x))
        eye = torch.eye(self.A.in_features, dtype=x.dtype)
        delta = self.B(self.A(eye)).T
        norm = torch.linalg.norm(self.base.weight + self.s * delta.detach(), dim=1).detach()
        return (self.m / norm) * out


class ReadsA(LoRALinear):
    """An adapter whose ``A`` is also read outside the adapter: its channels leave as an output."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(x), self.A(x)


class Mlp(nn.Module):
    def __init__(self, layer: type = LoRALinear, **kwargs: nn.Module) -> None:
        super().__init__()
        self.fc1 = layer(nn.Linear(6, 8), **kwargs)
        self.fc2 = layer(nn.Linear(8, 4), **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def hand_written(layer: type = LoRALinear, **kwargs: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return Mlp(layer, **kwargs).to(DTYPE).eval()


X = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
FRESH_X = torch.randn(9, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layer", [LoRALinear, DoRALinear, DoRAAfter])
def test_hand_written_adapters_have_one_generator_per_rank_channel(layer):
    model = hand_written(layer)
    structure = gaugefix.discover(model, X)
    assert int(rank_generators(model, structure).sum()) == RANK * len(adapters(model)) == 2 * RANK
    check_rank_channels(model, structure)
    assert_exact(model, structure, FRESH_X)


@pytest.mark.parametrize("layer", [DoRALinear, DoRAAfter])
def test_dora_reading_a_through_an_identity_keeps_its_rank_channels(layer):
    """DoRA's ``B(A(eye))`` reads ``A`` through a constant input: the same role as ``A(x)`` (a
    linear map, its columns then fixed), so the rank channels stay generators."""
    model = hand_written(layer)
    structure = gaugefix.discover(model, X)
    names = {f"{layer}.{p}.weight" for layer in ("fc1", "fc2") for p in ("A", "B")}
    assert not any(".A" in e.module for e in structure.excluded), structure.excluded
    assert int(rank_generators(model, structure).sum()) == 2 * RANK
    assert names <= set(structure.param_order)


def test_no_rank_symmetry_through_a_non_homogeneous_function():
    model = hand_written(between=nn.Tanh())
    structure = gaugefix.discover(model, X)
    assert not bool(rank_generators(model, structure).any())
    assert_exact(model, structure, FRESH_X)


def test_a_relu_between_a_and_b_keeps_the_rank_channels():
    """ReLU is positively homogeneous: ``B relu(a A x) / a = B relu(A x)``."""
    model = hand_written(between=nn.ReLU())
    structure = gaugefix.discover(model, X)
    assert int(rank_generators(model, structure).sum()) == 2 * RANK
    assert_exact(model, structure, FRESH_X)


def test_no_rank_symmetry_when_a_is_read_elsewhere():
    model = nn.Sequential(ReadsA(nn.Linear(6, 4))).to(DTYPE).eval()
    structure = gaugefix.discover(model, X)
    assert not bool(rank_generators(model, structure).any())
    assert "0.A" in {e.module for e in structure.excluded}


def test_hand_written_balance_with_the_base_frozen_moves_only_the_adapters():
    model = hand_written()
    structure = gaugefix.discover(model, X)
    sub = frozen_subgroup(model, structure)
    assert sub.num_generators == 2 * RANK
    gaugefix.random_gauge_(model, sub, SCALE, generator=torch.Generator().manual_seed(4))
    before = copy.deepcopy(model)
    gaugefix.balance_(model, sub)
    assert_balanced(model, before, FRESH_X)


def assert_balanced(model: nn.Module, before: nn.Module, *args: Tensor, **kwargs: Tensor):
    """Only the adapters moved, each rank channel has ``||A_k||^2 = ||B_:,k||^2`` (1e-10), and
    the function is kept."""
    old = {n: p.detach() for n, p in before.named_parameters()}
    new = {n: p.detach() for n, p in model.named_parameters()}
    pairs = adapters(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(new[name], old[name]), name
    assert any(not torch.equal(new[a], old[a]) for a, _ in pairs)
    for a, b in pairs:
        rows, cols = new[a].square().sum(1), new[b].square().sum(0)
        assert float(((rows - cols).abs() / (rows + cols)).max()) <= TOL
    change = rel_change(outputs(before, *args, **kwargs), outputs(model, *args, **kwargs))
    assert change <= TOL, change


# --- the peft library ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


def base_model(arch: str) -> nn.Module:
    import transformers

    model_cls, config_cls, config, _, _ = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**config)
    return getattr(transformers, model_cls)(cfg).to(DTYPE).eval()


def lora_model(peft, arch: str, variant: str = "plain") -> nn.Module:
    """The tiny model with adapters on its attention and MLP projections (random ``B``, so no
    rank channel starts dead), float64, in eval mode."""
    _, _, _, targets, fan_in_fan_out = ARCHS[arch]
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False, **VARIANTS[variant],
    )  # fmt: skip
    torch.manual_seed(1)
    return peft.get_peft_model(base_model(arch), config).to(DTYPE).eval()


IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
FRESH_IDS = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_adapters_have_one_generator_per_rank_channel(peft, arch, variant):
    """Plain LoRA, dropout and rsLoRA: the base model's generators plus ``r`` per adapter. DoRA
    normalises each output row of ``W + s B A`` (a pure scale invariance of the row, no gauge
    neuron) and reads ``W`` twice: its base channels are excluded, its rank channels stay."""
    model = lora_model(peft, arch, variant)
    structure = gaugefix.discover(model, input_ids=IDS)
    count = RANK * len(adapters(model))
    assert count == RANK * (8 if arch == "gpt2" else 14)
    assert int(rank_generators(model, structure).sum()) == count
    if variant != "dora":
        base = gaugefix.discover(base_model(arch), input_ids=IDS)
        assert structure.num_generators == base.num_generators + count
    check_rank_channels(model, structure)
    assert_exact(model, structure, input_ids=FRESH_IDS)


def test_peft_dropout_in_training_mode_is_exact(peft):
    """Dropout is positively homogeneous: with the same mask (the same seed), a gauge keeps the
    training-mode output too."""
    model = lora_model(peft, "llama", "dropout")
    structure = gaugefix.discover(model, input_ids=IDS)
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, structure, SCALE, generator=torch.Generator().manual_seed(0))
    logits = []
    for m in (model, moved):
        m.train()
        torch.manual_seed(7)
        logits.append(outputs(m, input_ids=FRESH_IDS))
    assert rel_change(*logits) <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_balance_with_the_base_frozen_moves_only_the_adapters(peft, arch):
    model = lora_model(peft, arch)
    assert any(not p.requires_grad for p in model.parameters())  # peft froze the base
    structure = gaugefix.discover(model, input_ids=IDS)
    sub = frozen_subgroup(model, structure)
    assert sub.num_generators == RANK * len(adapters(model))
    gaugefix.random_gauge_(model, sub, SCALE, generator=torch.Generator().manual_seed(4))
    before = copy.deepcopy(model)
    result = gaugefix.balance_(model, sub)
    assert result.converged
    assert_balanced(model, before, input_ids=FRESH_IDS)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merging_after_balancing_gives_the_same_merged_weights(peft, arch):
    model = lora_model(peft, arch)
    sub = frozen_subgroup(model, gaugefix.discover(model, input_ids=IDS))
    gaugefix.random_gauge_(model, sub, SCALE, generator=torch.Generator().manual_seed(4))
    balanced = copy.deepcopy(model)
    gaugefix.balance_(balanced, sub)
    plain = model.merge_and_unload().state_dict()
    merged = balanced.merge_and_unload().state_dict()
    assert plain.keys() == merged.keys() and not any("lora" in k for k in plain)
    for key, w in plain.items():
        assert rel_change(w, merged[key]) <= MERGE_TOL, key


def test_gauge_fixing_trains_the_adapters_with_the_base_bit_identical(peft):
    """Exact mode: the base never moves (its generators are left out as frozen) and the
    adapters' imbalance relaxes while the adapters train."""
    model = lora_model(peft, "llama")
    structure = gaugefix.discover(model, input_ids=IDS)
    sub = frozen_subgroup(model, structure)
    gaugefix.random_gauge_(model, sub, 1.0, generator=torch.Generator().manual_seed(4))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = gaugefix.imbalance(model, sub).norm()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-2)
    gaugefix.GaugeFixing(optimizer, model, structure, strength=1.0, balance_at_start=False)
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    assert gaugefix.imbalance(model, sub).norm() < start / 10  # 143 -> 4.3 (without: 143)
