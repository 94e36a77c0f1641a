"""Mixtures of experts: Hugging Face Mixtral, Qwen2-MoE (with its shared expert) and OLMoE from
tiny configs, under each ``experts_implementation`` (``batched_mm``: expert weights gathered per
token, ``bmm``; ``grouped_mm``: tokens sorted by expert, ``torch._grouped_mm``; ``eager``: a loop
over the experts hit), and a loop over experts of our own.

The router is a linear map of the normed hidden state whose softmax / top-k sees unchanged logits
under the gauge, and each expert's units rescale exactly whatever the routing, so every expert's
units are generators. Counts are derived by hand below; the exact properties (a random gauge keeps
the outputs, balancing to 1e-10, the gradient-step and penalty identities) in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_transformers import DTYPE, TOL, build, check_exact, outputs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

# grouped_mm has no float64 kernel on CPU: its models run in float32, where a random gauge
# changes the outputs by rounding (about 1e-7 relative) and no more
FLOAT32_TOL = 1e-5
LAYERS, WIDTH, HEADS, KV_HEADS, VOCAB = 2, 64, 4, 2, 100
HEAD_DIM = WIDTH // HEADS
COMMON = dict(
    num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=False,
    max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip
EXPERTS, TOP_K = 4, 2


def mixtral(impl: str) -> nn.Module:
    config = transformers.MixtralConfig(
        intermediate_size=128, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        experts_implementation=impl, **COMMON,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def qwen2_moe(impl: str) -> nn.Module:
    config = transformers.Qwen2MoeConfig(
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, intermediate_size=96, experts_implementation=impl,
        **COMMON,
    )  # fmt: skip
    return transformers.Qwen2MoeForCausalLM(config)


def olmoe(impl: str) -> nn.Module:
    config = transformers.OlmoeConfig(
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=32,
        experts_implementation=impl, **COMMON,
    )  # fmt: skip
    return transformers.OlmoeForCausalLM(config)


# Per layer, with rotary embeddings and grouped-query attention: one query-key generator per
# rotated pair of a key head, KV_HEADS * HEAD_DIM / 2 = 16; value-output KV_HEADS * HEAD_DIM = 32;
# the two RMSNorm gains, 2 * WIDTH = 128 (the post-attention norm feeds the router and every
# expert); the SiLU-gated experts, one up/down generator per unit of every expert (the gate rows
# feed the SiLU). The final norm's WIDTH gains (the head is untied).
PER_LAYER = HEAD_DIM // 2 * KV_HEADS + HEAD_DIM * KV_HEADS + 2 * WIDTH
COUNTS = {
    # 16 + 32 + 128 + 4 * 128 = 688 per layer: 2 * 688 + 64 = 1440
    "mixtral": LAYERS * (PER_LAYER + EXPERTS * 128) + WIDTH,
    # the shared expert (SiLU-gated MLP, 48 units) adds its 48 up/down units; its sigmoid gate
    # scales its output by an invariant number: 2 * (176 + 128 + 48) + 64 = 768
    "qwen2_moe": LAYERS * (PER_LAYER + EXPERTS * 32 + 48) + WIDTH,
    # OLMoE normalises the whole query and key projections (q_norm, k_norm): their gains take
    # the place of the projections' rows in the rotary pairs: 2 * (176 + 128) + 64 = 672
    "olmoe": LAYERS * (PER_LAYER + EXPERTS * 32) + WIDTH,
}
FACTORIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "olmoe": olmoe}
assert COUNTS["mixtral"] == 1440


def ids(seq: int = 16, seed: int = 0) -> Tensor:
    """Token ids that route to every expert of the tiny models (2 x 16 tokens, top-2 of 4)."""
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def same_structure(a: gaugefix.GaugeStructure, b: gaugefix.GaugeStructure) -> None:
    """The two structures act on every parameter entry alike (same terms, same numbering)."""
    assert a.num_generators == b.num_generators
    assert a.params.keys() == b.params.keys()
    for name, p in a.params.items():
        q = b.params[name]
        assert len(p.terms) == len(q.terms), name
        for s, t in zip(p.terms, q.terms, strict=True):
            assert s.sign == t.sign, name
            assert torch.equal(s.index.expand(p.shape), t.index.expand(q.shape)), name


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_batched_experts_float64(arch):
    model = build(lambda: FACTORIES[arch]("batched_mm"))
    s = check_exact(model, (ids(),))
    assert s.num_generators == COUNTS[arch], s.summary()
    experts = [n for n in s.params if n.endswith("experts.gate_up_proj")]
    assert len(experts) == LAYERS
    for name in experts:  # every expert's up rows carry their own generator
        up_rows = s.params[name].terms[0].index.expand(s.params[name].shape)[:, -1, 0]
        assert up_rows.unique().numel() == EXPERTS


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_grouped_experts_float32_find_the_batched_structure(arch):
    torch.manual_seed(0)
    model = FACTORIES[arch]("grouped_mm").float().eval()
    s = gaugefix.discover(model, ids())
    torch.manual_seed(0)
    same_structure(s, gaugefix.discover(FACTORIES[arch]("batched_mm").double().eval(), ids()))
    before = outputs(model, (ids(),))
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, outputs(model, (ids(),))) <= FLOAT32_TOL


def test_eager_expert_loop_names_the_line_and_with_the_opt_in_finds_every_expert():
    model = build(lambda: mixtral("eager"))
    # the loop runs over the experts the routing hit, read from the data
    with pytest.raises(gaugefix.ValueDependentError) as err:
        gaugefix.discover(model, ids())
    assert "modeling_mixtral.py:" in str(err.value)
    assert "`if expert_idx == self.num_experts:`" in str(err.value)
    assert "'model.layers.0.mlp.experts'" in str(err.value)
    s = gaugefix.discover(model, ids(), allow_value_dependent=True)
    same_structure(s, gaugefix.discover(build(lambda: mixtral("batched_mm")), ids()))
    before = outputs(model, (ids(),))
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
    assert rel_change(before, outputs(model, (ids(),))) <= TOL


@pytest.mark.parametrize("impl", ["batched_mm", "eager"])
def test_experts_an_input_does_not_reach_are_fixed_and_the_gauge_holds_for_other_inputs(impl):
    """One token reaches 2 of the 4 experts: the others are read only by other inputs, so the
    expert weights are fixed (with the reason), and the structure holds for every input."""
    model = build(lambda: mixtral(impl))
    one = ids(seq=1)[:1]
    s = gaugefix.discover(model, one, allow_value_dependent=impl == "eager")
    assert not any("experts" in name for name in s.params)
    reasons = [e.reason for e in s.excluded if e.module == "model.layers.0.mlp.experts"]
    assert any("of 'model.layers.0.mlp.experts.gate_up_proj' (dim 0)" in r for r in reasons)
    long = ids(seq=24, seed=3)
    before = outputs(model, (long,))
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(2))
    assert rel_change(before, outputs(model, (long,))) <= TOL


def test_gauge_fixing_trains_the_tiny_mixtral():
    model = build(lambda: mixtral("batched_mm"))
    x = ids()
    s = gaugefix.discover(model, x)
    before = outputs(model, (x,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hook = gaugefix.GaugeFixing(opt, model, s, strength=10.0, every=1)
    # balancing at the start keeps the function and reaches mu = 0
    assert rel_change(before, outputs(model, (x,))) <= TOL
    assert float(gaugefix.imbalance_stats(model, s)["mu_rel_max"]) <= TOL
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logits = model(x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert hook.active.num_generators == COUNTS["mixtral"]


class LoopedExperts(nn.Module):
    """``x -> relu(lin_in x) -> sum_e down[e] relu(up[e] h) -> lin_out``, the experts in a
    Python loop whose ``if`` compares the loop counter (a tensor from ``arange``)."""

    def __init__(self, experts: int = 3, width: int = 5, units: int = 3) -> None:
        super().__init__()
        self.lin_in, self.lin_out = nn.Linear(4, width), nn.Linear(width, 2)
        self.up = nn.Parameter(torch.randn(experts, units, width))
        self.down = nn.Parameter(torch.randn(experts, width, units))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.lin_in(x))
        out = torch.zeros_like(h)
        for e in torch.arange(self.up.shape[0]):
            units = F.relu(F.linear(h, self.up[e]))
            if e == self.up.shape[0] - 1:  # control flow over the loop counter, not over data
                units = 2 * units
            out = out + F.linear(units, self.down[e])
        return self.lin_out(F.relu(out))


def test_a_loop_over_arange_is_accepted_without_the_opt_in():
    torch.manual_seed(0)
    model = LoopedExperts().to(DTYPE)
    x = torch.randn(6, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    # lin_in's 5 neurons, 3 experts x 3 units, the 5 summed output channels
    assert s.num_generators == 5 + 3 * 3 + 5
    assert not s.notes
    before = model(x)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, model(x)) <= TOL
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= TOL
    assert rel_change(before, model(x)) <= TOL
