"""Third audit of ``structure.scale_groups()`` and ``equalize_``, on Hugging Face families and
options the earlier files leave out: partial rotary embeddings with parallel residuals
(GPT-NeoX/Pythia, StableLM with its per-head query/key LayerNorms), query/key norms after the
projections (OLMo2, Cohere's), norms whose gain is ``1 + w`` (Gemma3, Nemotron's
``LayerNorm1P``: no gain group) and Gemma4's plain gains with its per-layer inputs, Granite's
multipliers, Starcoder2, tied heads, and ``equalize_`` on every family here and on the earlier
files' Gemma, Phi3, GPT-J, MPT, Qwen3 and MoE models (tiny configs, random weights, float64
throughout).

The oracle is written from the exported JSON alone: divide each smooth module's ``weight`` along
its output channels (dim 1 for ``Conv1D`` and embeddings, else dim 0) and its ``bias`` by random
positive scales, multiply each balance module's ``weight`` along its input channels (dim 0 for
``Conv1D``, else dim 1), and compare the logits on token ids of another shape than the
discovery's (1e-10 relative), group by group and all groups at once.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix.precision import Float64Throughout
from test_scale_groups_audit2 import apply_from_json  # a tool's action of an exported group

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
VOCAB = 40
COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
          "tie_word_embeddings": False}  # fmt: skip
LLAMA_LIKE = {
    "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 32, "head_dim": 4,
}  # fmt: skip
MOE = {**LLAMA_LIKE, "num_experts_per_tok": 4, "moe_intermediate_size": 8}
NEOX = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
        "num_attention_heads": 4, "max_position_embeddings": 32, "rotary_pct": 0.25}  # fmt: skip
# family: (model class, config class, config)
ARCHS = {
    "gpt-neox parallel": ("GPTNeoXForCausalLM", "GPTNeoXConfig", NEOX),
    "gpt-neox sequential": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                            {**NEOX, "use_parallel_residual": False}),
    "stablelm qk-norm parallel": ("StableLmForCausalLM", "StableLmConfig",
                                  {**LLAMA_LIKE, "qk_layernorm": True,
                                   "use_parallel_residual": True, "partial_rotary_factor": 0.25,
                                   "use_qkv_bias": True}),
    "stablelm qk-norm sequential": ("StableLmForCausalLM", "StableLmConfig",
                                    {**LLAMA_LIKE, "qk_layernorm": True,
                                     "partial_rotary_factor": 0.5}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", LLAMA_LIKE),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", LLAMA_LIKE),
    "cohere qk-norm, tied": ("CohereForCausalLM", "CohereConfig",
                             {**LLAMA_LIKE, "use_qk_norm": True, "tie_word_embeddings": True,
                              "logit_scale": 0.5}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", LLAMA_LIKE),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", LLAMA_LIKE),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**LLAMA_LIKE, "sliding_window": 4}),
    "gemma4 (plain gains, per-layer inputs)": (
        "Gemma4ForCausalLM", "Gemma4TextConfig",
        {**LLAMA_LIKE, "sliding_window": 4, "global_head_dim": 4,
         "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 4}),
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", {**LLAMA_LIKE, "hidden_act": "relu2"}),
    "granite": ("GraniteForCausalLM", "GraniteConfig",
                {**LLAMA_LIKE, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                 "attention_multiplier": 0.3, "logits_scaling": 2.0}),
    "granite tied": ("GraniteForCausalLM", "GraniteConfig",
                     {**LLAMA_LIKE, "embedding_multiplier": 3.0, "tie_word_embeddings": True}),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config",
                   {**LLAMA_LIKE, "hidden_act": "gelu_pytorch_tanh"}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", LLAMA_LIKE),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**LLAMA_LIKE, "partial_rotary_factor": 0.5}),
    "gpt-j": ("GPTJForCausalLM", "GPTJConfig",
              {"n_layer": 2, "n_embd": 16, "n_head": 4, "rotary_dim": 2, "n_positions": 32}),
    "mpt": ("MptForCausalLM", "MptConfig",
            {"n_layers": 2, "d_model": 16, "n_heads": 4, "max_seq_len": 32}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {**MOE, "num_local_experts": 4}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 12}),
}  # fmt: skip


# Families whose norms compute ``x * (1 + w)`` (or a LayerNorm's ``(1 + w)``, Nemotron's and
# Gemma's per-head q/k norms): scaling ``w`` is no scaling of the gain, so no norm-gain group.
OFFSET_GAINS = {"gemma", "gemma2", "gemma3", "nemotron"}
# A (smooth layer, balance layer) pair, by name suffix, every family with plain gains exports.
FINAL = ("model.norm", "lm_head")
EXPECTED = {
    "gpt-neox parallel": ("layers.1.post_attention_layernorm", "mlp.dense_h_to_4h"),
    "gpt-neox sequential": ("layers.1.post_attention_layernorm", "mlp.dense_h_to_4h"),
    "stablelm qk-norm parallel": ("layers.1.input_layernorm", "mlp.up_proj"),
    "stablelm qk-norm sequential": ("layers.1.input_layernorm", "self_attn.q_proj"),
    "olmo2": FINAL,
    "cohere qk-norm, tied": ("layers.1.input_layernorm", "mlp.gate_proj"),
    "gemma4 (plain gains, per-layer inputs)": ("pre_feedforward_layernorm", "mlp.gate_proj"),
    "granite": FINAL,
    "granite tied": ("post_attention_layernorm", "mlp.up_proj"),
    "starcoder2": ("post_attention_layernorm", "mlp.c_fc"),
    "qwen3": FINAL,
    "phi3": ("post_attention_layernorm", "mlp.gate_up_proj"),
    "gpt-j": ("transformer.h.1.ln_1", "mlp.fc_in"),
    "mpt": ("norm_2", "ffn.up_proj"),
    "mixtral": FINAL,
    "qwen2-moe": ("shared_expert.up_proj", "shared_expert.down_proj"),
}


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    """The model's logits on ``ids``, computed in float64 throughout."""
    with torch.no_grad(), Float64Throughout():
        return model(input_ids=ids).logits


def ids(size: tuple[int, int], seed: int) -> Tensor:
    return torch.randint(1, VOCAB, size, generator=torch.Generator().manual_seed(seed))


DISCOVERY, FRESH = ids((2, 7), 1), ids((3, 9), 2)


@pytest.fixture(scope="module", params=list(ARCHS))
def discovered(request) -> tuple[str, nn.Module, gaugefix.GaugeStructure]:
    """The family's tiny float64 model, every parameter moved off its initial value, and its
    structure (discovered once per family)."""
    arch = request.param
    model_cls, config_cls, kwargs = ARCHS[arch]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**{**COMMON, **kwargs})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    moe = "num_experts_per_tok" in kwargs
    structure = gaugefix.discover(model, input_ids=DISCOVERY, allow_value_dependent=moe)
    return arch, model, structure


def test_every_exported_group_keeps_the_logits(discovered):
    arch, model, structure = discovered
    groups = json.loads(json.dumps(structure.scale_groups()))
    before, together = logits(model, FRESH), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    each = {}
    for group in groups:
        scales = torch.exp(torch.randn(len(group["generators"]), generator=gen, dtype=DTYPE))
        twin = copy.deepcopy(model)
        apply_from_json(twin, group, scales)
        apply_from_json(together, group, scales)
        each[str(group["smooth_layer"])] = rel_change(before, logits(twin, FRESH))
    assert groups
    pairs = [(str(g["smooth_layer"]), g["balance_layers"]) for g in groups]
    if arch in EXPECTED:
        smooth, balance = EXPECTED[arch]
        assert any(a.endswith(smooth) and any(b.endswith(balance) for b in bs) for a, bs in pairs)
    if arch in OFFSET_GAINS:
        assert not any(g["kind"] == "norm gain" for g in groups), pairs
    assert max(each.values()) <= TOL, each
    assert rel_change(before, logits(together, FRESH)) <= TOL


@pytest.mark.parametrize("objective", ["range", "activation"])
def test_equalize_keeps_the_logits(discovered, objective):
    _, model, structure = discovered
    model = copy.deepcopy(model)
    before = logits(model, FRESH)
    calibration = DISCOVERY if objective == "activation" else None
    result = gaugefix.equalize_(model, structure, objective, calibration=calibration)
    assert result.converged and result.objective_after < result.objective_before
    assert float(result.h.abs().max()) > 0.1  # it moved the model
    assert rel_change(before, logits(model, FRESH)) <= TOL


class DeadOnThisPath(nn.Module):
    """A LayerNorm -> Linear -> ReLU -> Linear whose forward reads a value into a branch (one
    path traced) and keeps a head bias no path uses (as BERT's untied ``cls.predictions.bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(4), nn.Linear(4, 8), nn.Linear(8, 2)
        self.dead = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(self.norm(x))
        return self.down(torch.relu(h) if bool(h.sum() > -1e9) else h)


def test_a_parameter_unused_on_the_traced_path_refuses_the_groups_with_advice_for_any_model():
    """The refusal names the unused parameter and says what to do for any model (before: its
    only advice was to route tokens to every expert, which fits mixtures alone)."""
    model = DeadOnThisPath().double()
    s = gaugefix.discover(model, torch.randn(5, 4, dtype=torch.float64), allow_value_dependent=True)
    with pytest.raises(ValueError, match=r"unused \(dead\).*remove parameters no path uses"):
        s.scale_groups()
