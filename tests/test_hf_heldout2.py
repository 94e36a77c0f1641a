"""A second held-out sweep of discovery over Hugging Face architectures the other tests do not
build: decoder LMs (Gemma 3, Llama 4 with chunked attention and experts, GLM-4, Granite and its
mixture, StarCoder2, GPTBigCode, GPT-J, Persimmon, Nemotron, PhiMoE, GPT-OSS with attention
sinks and a clamped SwiGLU, SmolLM3, EXAONE 4, ERNIE 4.5), state-space and hybrid models
(Mamba, Zamba2 with its shared block, RecurrentGemma, Falcon-H1), vision (ResNet, RegNet,
MobileNetV2, ConvNeXt, DeiT, ViT-MAE, MobileViT), encoders (RoBERTa, DeBERTa-v2, ALBERT with
shared layers, DistilBERT, Funnel, MPNet, HuBERT) and encoder-decoders (Pegasus, Marian).

Each model is built tiny in float64 with random weights and discovered on one example call
(hidden states and attention maps returned). The structure must then be exact on FRESH calls:
other batch sizes and lengths, padded attention masks, other image sizes, other audio lengths.
Every floating tensor the model returns must stay within 1e-10 under a random gauge of scale
2.5 (factors up to ``e^8``), and exactly (1e-12) under a gauge of powers of two. The outputs are
computed in float64 throughout (``returned``): the casts to float32 some of these models make
inside (GPT-J's attention, ERNIE's and Llama 4's rotary, Mamba's scan, RMSNorms), which the
gauge passes, stay float64, so a change below float32's resolution shows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from test_hf_sweep_audit import powers_of_two_gauge_, returned, richest_call, worst_change
from test_scale_groups_audit import perturbed_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
POW2_TOL = 1e-12
SCALE = 2.5
VOCAB = 40
LM = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
LL = {
    **LM, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "num_hidden_layers": 2,
    "tie_word_embeddings": False,
}  # fmt: skip
RELU = {"hidden_act": "relu"}  # ReLU-gated units: two generators per unit
ENC = {**LM, "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
       "num_attention_heads": 4, "max_position_embeddings": 64}  # fmt: skip
S2S = {
    **LM, "encoder_layers": 2, "decoder_layers": 2, "d_model": 16, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 24, "decoder_ffn_dim": 24,
    "decoder_start_token_id": 0, "max_position_embeddings": 64, "activation_function": "relu",
}  # fmt: skip
VIT = {"image_size": 32, "num_channels": 3, "patch_size": 8, "hidden_size": 16,
       "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24}  # fmt: skip
SSM = {"mamba_d_state": 4, "mamba_d_conv": 2, "mamba_expand": 2, "use_mamba_kernels": False}
SLIDING = {"head_dim": 4, "sliding_window": 4,
           "layer_types": ["sliding_attention", "full_attention"]}  # fmt: skip
# name: (model class, config class, config, input kind, generators found when written)
ARCHS = {
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**LL, **SLIDING}, "ids", 64),
    "llama4": (
        "Llama4ForCausalLM", "Llama4TextConfig",
        {**LL, "head_dim": 4, "num_local_experts": 2, "num_experts_per_tok": 1,
         "intermediate_size_mlp": 24, "interleave_moe_layer_step": 2, "no_rope_layers": [1, 0],
         "attention_chunk_size": 4},
        "ids", 184,
    ),  # the queries and keys of its rotary layer are normalised (L2 norm with an eps)
    "llama4-no-qk-norm": (
        "Llama4ForCausalLM", "Llama4TextConfig",
        {**LL, "head_dim": 4, "num_local_experts": 2, "num_experts_per_tok": 1,
         "intermediate_size_mlp": 24, "interleave_moe_layer_step": 2, "no_rope_layers": [1, 0],
         "attention_chunk_size": 4, "use_qk_norm": False},
        "ids", 188,
    ),  # its complex rotary pairs (view_as_complex) are generators
    "glm4-relu": ("Glm4ForCausalLM", "Glm4Config", {**LL, **RELU, "head_dim": 4}, "ids", 188),
    "granite-relu": (
        "GraniteForCausalLM", "GraniteConfig",
        {**LL, **RELU, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
         "attention_multiplier": 0.3, "logits_scaling": 3.0},
        "ids", 184,
    ),
    "granitemoe": (
        "GraniteMoeForCausalLM", "GraniteMoeConfig",
        {**LL, "num_local_experts": 3, "num_experts_per_tok": 2, "embedding_multiplier": 2.0,
         "residual_multiplier": 0.5},
        "ids", 232,
    ),
    "starcoder2-relu": ("Starcoder2ForCausalLM", "Starcoder2Config",
                        {**LL, **RELU, "sliding_window": 4}, "ids", 136),  # fmt: skip
    "gptbigcode-mqa-relu": (
        "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
        {**LM, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64, "multi_query": True,
         "activation_function": "relu"},
        "ids", 208,
    ),
    "gptj": (
        "GPTJForCausalLM", "GPTJConfig",
        {**LM, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 2,
         "n_inner": 24, "activation_function": "relu"},
        "ids", 136,
    ),
    "persimmon-qk-ln": (
        "PersimmonForCausalLM", "PersimmonConfig",
        {**LL, "num_key_value_heads": 4, "qk_layernorm": True, "partial_rotary_factor": 0.5},
        "ids", 102,
    ),
    "nemotron": ("NemotronForCausalLM", "NemotronConfig",
                 {**LL, "head_dim": 4, "partial_rotary_factor": 0.5}, "ids", 28),  # fmt: skip
    "phimoe-relu": ("PhimoeForCausalLM", "PhimoeConfig",
                    {**LL, **RELU, "num_local_experts": 3, "num_experts_per_tok": 2},
                    "ids", 376),  # fmt: skip
    "zamba2-shared": (
        "Zamba2ForCausalLM", "Zamba2Config",
        {**LL, **SSM, "mamba_headdim": 4, "n_mamba_heads": 8, "num_mem_blocks": 1,
         "layers_block_type": ["hybrid", "hybrid"], "hybrid_layer_ids": [0, 1],
         "use_mem_rope": True, "adapter_rank": 4, "chunk_size": 4},
        "ids", 408,
    ),  # one shared attention block applied by both layers, with per-layer adapters; 296 when
    # written, 408 (16 rotary pairs, 32 value-output, 192 norm gains, 168 neurons) measured
    # with transformers 5.25.0 and torch 2.13.0, exact: 9.5e-16 under the gauge of scale 2.5
    "recurrentgemma": (
        "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig",
        {**LL, "lru_width": 16, "attention_window_size": 4, "conv1d_width": 2,
         "block_types": ["recurrent", "attention"], "head_dim": 4, "num_key_value_heads": 1,
         "partial_rotary_factor": 0.5},
        "ids", 31,
    ),
    "falcon-h1": (
        "FalconH1ForCausalLM", "FalconH1Config",
        {**LL, **SSM, "mamba_d_head": 4, "mamba_n_heads": 8, "mamba_n_groups": 1,
         "mamba_chunk_size": 4, "head_dim": 4, "mamba_d_ssm": 32},
        "ids", 216,
    ),
    "gpt-oss": (
        "GptOssForCausalLM", "GptOssConfig",
        {**LL, **SLIDING, "num_local_experts": 3, "num_experts_per_tok": 2}, "ids", 88,
    ),
    "smollm3-relu": ("SmolLM3ForCausalLM", "SmolLM3Config",
                     {**LL, **RELU, "no_rope_layers": [1, 0]}, "ids", 188),  # fmt: skip
    "exaone4-relu": ("Exaone4ForCausalLM", "Exaone4Config", {**LL, **RELU, **SLIDING},
                     "ids", 118),  # fmt: skip
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5Config",
                 {**LL, "head_dim": 4, "use_bias": True}, "ids", 136),  # fmt: skip
    "mamba": (
        "MambaForCausalLM", "MambaConfig",
        {**LM, "hidden_size": 16, "num_hidden_layers": 2, "state_size": 4, "expand": 2,
         "conv_kernel": 2, "use_mambapy": False},
        "ids", 106,
    ),  # its scan contracts the input-dependent B and C over the state: a query-key pair
    "resnet": (
        "ResNetForImageClassification", "ResNetConfig",
        {"num_channels": 3, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
         "layer_type": "bottleneck", "num_labels": 3},
        "image", 12,
    ),  # the residual stream is returned (hidden states): only the bottleneck units are free
    "regnet": (
        "RegNetForImageClassification", "RegNetConfig",
        {"num_channels": 3, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
         "groups_width": 4, "num_labels": 3},
        "image", 52,
    ),
    "convnext-relu": (
        "ConvNextForImageClassification", "ConvNextConfig",
        {"num_channels": 3, "hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2,
         "num_labels": 3, "layer_scale_init_value": 0.1, **RELU},
        "image", 168,
    ),
    "deit-relu": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {**VIT, **RELU},
                  "vit", 192),  # fmt: skip
    "vit-mae": ("ViTMAEModel", "ViTMAEConfig", {**VIT, "mask_ratio": 0.25}, "mae", 128),
    "mobilevit": (
        "MobileViTForImageClassification", "MobileViTConfig",
        {"num_channels": 3, "image_size": 32, "patch_size": 2, "hidden_sizes": [16, 16, 16],
         "neck_hidden_sizes": [8, 8, 8, 8, 8, 8, 16], "num_attention_heads": 2,
         "num_labels": 3},
        "image", 648,
    ),
    "roberta-relu": ("RobertaForMaskedLM", "RobertaConfig",
                     {**ENC, **RELU, "pad_token_id": 1}, "ids", 112),  # fmt: skip
    "deberta-v2": (
        "DebertaV2ForMaskedLM", "DebertaV2Config",
        {**ENC, "relative_attention": True, "position_buckets": 8,
         "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16},
        "ids", 64,
    ),
    "albert-shared": ("AlbertForMaskedLM", "AlbertConfig",
                      {**ENC, **RELU, "embedding_size": 8}, "ids", 64),  # fmt: skip
    "distilbert-relu": (
        "DistilBertForMaskedLM", "DistilBertConfig",
        {**LM, "dim": 16, "n_layers": 2, "n_heads": 4, "hidden_dim": 24,
         "max_position_embeddings": 64, "activation": "relu"},
        "ids", 112,
    ),
    "funnel-relu": (
        "FunnelForMaskedLM", "FunnelConfig",
        {**LM, **RELU, "block_sizes": [1, 1], "d_model": 16, "n_head": 4, "d_head": 4,
         "d_inner": 24, "num_decoder_layers": 1},
        "ids", 168,
    ),  # pools its queries between blocks (and cannot run on fewer than 3 tokens)
    "mpnet": ("MPNetForMaskedLM", "MPNetConfig", {**ENC, "pad_token_id": 1}, "ids", 64),
    "pegasus-relu": ("PegasusForConditionalGeneration", "PegasusConfig", S2S, "seq2seq", 448),
    "marian-relu": ("MarianMTModel", "MarianConfig", {**S2S, "decoder_vocab_size": VOCAB},
                    "seq2seq", 288),  # fmt: skip
    "hubert": (
        "HubertForCTC", "HubertConfig",
        {**LM, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 24, "conv_dim": [8, 8], "conv_stride": [5, 2],
         "conv_kernel": [10, 3], "num_conv_pos_embeddings": 4,
         "num_conv_pos_embedding_groups": 2},
        "audio", 72,
    ),
}  # fmt: skip


def build(arch: str, archs: dict[str, tuple] = ARCHS) -> nn.Module:
    """The float64 eval-mode model of ``arch`` (a key of ``archs``, laid out as ``ARCHS``)
    with perturbed weights; skipped when this ``transformers`` has no such model."""
    model_cls, config_cls, kwargs, _, _ = archs[arch]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**copy.deepcopy(kwargs))
    for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if c is not None:  # a two-tower model's sub-configs too
            c._attn_implementation = "eager"  # returns the attention maps
            c._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    return perturbed_hf(model_cls, config)


def call(kind: str, batch: int, length: int, seed: int) -> dict[str, Tensor]:
    """One input of ``kind``: token ids of ``[batch, length]`` with the last 3 tokens of the
    first row padded away (when the call is a fresh one of more than one row and 3 tokens),
    an image whose side grows with ``length``, or audio whose length does."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if seed and batch > 1 and length > 3:
        mask[0, -3:] = 0
    side = 16 + 4 * length
    pixels = torch.randn(batch, 3, side, side, generator=gen, dtype=DTYPE)
    fixed_size = torch.randn(batch, 3, 32, 32, generator=gen, dtype=DTYPE)
    return {
        "ids": {"input_ids": ids, "attention_mask": mask},
        "seq2seq": {"input_ids": ids, "attention_mask": mask,
                    "decoder_input_ids": ids[:, : max(1, length - 3)]},
        "image": {"pixel_values": pixels},
        "vit": {"pixel_values": fixed_size},
        # ViT-MAE masks patches at random: the noise it sorts is an input here
        "mae": {"pixel_values": fixed_size,
                "noise": torch.rand(batch, 16, generator=gen, dtype=DTYPE)},
        "audio": {"input_values": torch.randn(batch, 320 + 40 * length, generator=gen,
                                              dtype=DTYPE)},
    }[kind]  # fmt: skip


EXAMPLE = (2, 4, 0)  # batch, length, seed of the call discovery sees
FRESH = ((3, 11, 1), (2, 17, 2), (1, 3, 3))  # other shapes, padded masks


def discovered(
    arch: str, archs: dict[str, tuple] = ARCHS, inputs: Callable[..., dict] = call
) -> tuple[nn.Module, gaugefix.GaugeStructure, list[dict]]:
    """The model of ``arch`` (a key of ``archs``), its structure discovered on the example call,
    and the calls to check (``inputs``, laid out as ``call``): the example and the fresh ones,
    each returning what the example returns."""
    model = build(arch, archs)
    kind = archs[arch][3]
    example = richest_call(model, inputs(kind, *EXAMPLE))
    extra = {k: v for k, v in example.items() if k.startswith("output_")}
    calls = [example] + [{**inputs(kind, *shape), **extra} for shape in FRESH]
    # a mask enters the scores only; Hugging Face reads it to choose how (docs/generators.md)
    s = gaugefix.discover(model, **example, allow_value_dependent=True)
    return model, s, calls


def worst_over(model: nn.Module, calls: list[dict], before: list[dict]) -> tuple[float, str]:
    return max(worst_change(b, returned(model, c)) for c, b in zip(calls, before, strict=True))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_structure_is_exact_on_fresh_inputs(arch):
    model, s, calls = discovered(arch)
    assert s.num_generators >= ARCHS[arch][4], s.summary()  # a drop is lost completeness
    before = [returned(model, c) for c in calls]
    assert any(".hidden_states." in k or "last_hidden_state" in k for k in before[0])
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(3))
    change = worst_over(model, calls, before)
    assert change[0] <= TOL, change
    powers = build(arch)
    powers_of_two_gauge_(powers, s, seed=11)
    assert worst_over(powers, calls, before)[0] <= POW2_TOL


# -- rotary embeddings written with complex numbers (Llama 4, Meta's reference Llama) ------------
class ComplexRotary(nn.Module):
    """Attention whose rotary embedding multiplies the query and key pairs ``(2i, 2i + 1)``,
    viewed as complex numbers, by ``e^{i t theta_i}``: ``view_as_complex``, a product with a
    constant, ``view_as_real``. ``[batch, tokens, dim]`` -> ``[batch, tokens, dim]``."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def rotate(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        pairs = x.view(b, t, self.heads, self.head_dim // 2, 2)
        theta = 10.0 ** -torch.arange(self.head_dim // 2, dtype=x.dtype)
        angles = torch.arange(t, dtype=x.dtype)[:, None] * theta
        turn = torch.polar(torch.ones_like(angles), angles)[:, None, :]
        return torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k = (self.rotate(f(x)).view(b, t, self.heads, -1).transpose(1, 2) for f in
                (self.q, self.k))  # fmt: skip
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d))


def test_complex_rotary_pairs_are_query_key_generators():
    """Multiplying the pair ``(2i, 2i + 1)`` of a query head by ``a`` and that of the key head
    by ``1/a`` scales the complex query entry by ``a`` and the key's by ``1/a``: the rotation
    (a product with a constant) keeps the factors, so every score is unchanged. One generator
    per pair and head (2 heads x 2 pairs), and one per value dimension."""
    torch.manual_seed(0)
    model = ComplexRotary().to(DTYPE)
    x = torch.randn(2, 5, 8, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    assert s.num_generators == 4 + 8, s.summary()
    fresh = torch.randn(3, 9, 8, dtype=DTYPE)
    with torch.no_grad():
        before = model(fresh)
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert worst_change({"y": before}, {"y": model(fresh)})[0] <= TOL
