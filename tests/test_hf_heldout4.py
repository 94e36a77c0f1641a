"""A fourth held-out sweep of discovery over Hugging Face architectures no other test builds:
mixtures of experts routed in new ways (NLLB-MoE's top-2 router in an encoder-decoder,
LongCat-Flash with identity "zero" experts, MiniMax with lightning linear attention, LFM2-MoE
with a sigmoid router and an expert bias, Doge with product-key experts read from embeddings,
ERNIE 4.5 MoE with a shared expert, Granite-MoE-Hybrid with Mamba 2 layers), state-space
models (Falcon-Mamba with norms on its scan's inputs, Nemotron-H), custom units (Apertus's
xIELU, FNet's Fourier mixing), encoder-decoders (LED with Longformer attention, Speech2Text),
audio encoders (WavLM with gated relative positions, AST, Wav2Vec2-Conformer with rotary) and
vision (DINOv3 with rotary and registers, FocalNet's focal modulation, SwiftFormer's additive
attention, Hiera's mask-unit attention).

Built and checked as in ``test_hf_heldout2``: tiny, float64, random weights, discovered on one
example call and exact (1e-10 under a random gauge of scale 2.5, 1e-12 under a gauge of powers
of two) on fresh calls of other shapes with padded masks. In MiniMax, LFM2-MoE and
Granite-MoE-Hybrid the example sends no token to some experts and the fresh calls do
(``test_the_example_leaves_experts_empty_that_fresh_calls_fill``): discovery fixes what it did
not see those experts read.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from test_hf_heldout2 import (
    DTYPE,
    ENC,
    EXAMPLE,
    FRESH,
    LL,
    LM,
    RELU,
    S2S,
    SSM,
    build,
    call,
)
from test_hf_heldout3 import assert_exact_on_fresh_inputs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

WAV = {**LM, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
       "intermediate_size": 24, "conv_dim": [8, 8], "conv_stride": [5, 2],
       "conv_kernel": [10, 3], "num_conv_pos_embeddings": 4,
       "num_conv_pos_embedding_groups": 2, **RELU}  # fmt: skip
MEL_BINS = 16  # AST's spectrogram: a fixed number of frames and of mel bins
FEATURES = 8  # Speech2Text's filter-bank features per frame
# name: (model class, config class, config, input kind, generators found when written)
ARCHS = {
    "nllb-moe": (
        "NllbMoeForConditionalGeneration", "NllbMoeConfig",
        {**S2S, "num_experts": 8, "expert_capacity": 64, "encoder_sparse_step": 2,
         "decoder_sparse_step": 2},
        "seq2seq", 464,
    ),  # its router casts its own weight to float32 on each call (a write, before the gauge);
    # this transformers one-hot encodes the router's one-hot mask, so experts 0 and 1 run only
    "longcat-flash": (
        "LongcatFlashForCausalLM", "LongcatFlashConfig",
        {**LM, "hidden_size": 16, "num_layers": 1, "num_attention_heads": 4,
         "ffn_hidden_size": 24, "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
         "qk_rope_head_dim": 4, "head_dim": 4, "v_head_dim": 4, "moe_topk": 2,
         "n_routed_experts": 4, "zero_expert_num": 2, "expert_ffn_hidden_size": 8,
         "max_position_embeddings": 64},
        "ids", 228,
    ),  # two attentions and two MLPs per layer, MLA, experts that return their input
    "minimax": (
        "MiniMaxForCausalLM", "MiniMaxConfig",
        {**LL, "head_dim": 4, "num_local_experts": 8, "num_experts_per_tok": 1,
         "layer_types": ["linear_attention", "full_attention"], "block_size": 4},
        "ids", 28,
    ),  # SiLU experts and RMSNorms fix most channels; the unseen experts fix the residual
    "lfm2-moe": (
        "Lfm2MoeForCausalLM", "Lfm2MoeConfig",
        {**LM, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 8,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_dense_layers": 1, "num_experts_per_tok": 2, "num_experts": 8,
         "layer_types": ["conv", "full_attention"], "max_position_embeddings": 64,
         "tie_word_embeddings": False},
        "ids", 114,
    ),
    "doge-moe": (
        "DogeForCausalLM", "DogeConfig",
        {**LL, "num_key_value_heads": 4, "is_moe": True, "num_experts": 16,
         "num_experts_per_tok": 2, "keep_window_size": 4},
        "ids", 148,
    ),  # product keys (topk over two halves) pick expert rows of two embeddings
    "ernie4_5-moe": (
        "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig",
        {**LL, "head_dim": 4, "moe_intermediate_size": 8, "moe_num_experts": 3, "moe_k": 2,
         "moe_num_shared_experts": 1, "moe_layer_start_index": 1},
        "ids", 144,
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
        {**LL, **SSM, "mamba_d_head": 4, "mamba_n_heads": 8, "mamba_n_groups": 1,
         "mamba_chunk_size": 4, "layer_types": ["mamba", "attention"],
         "num_local_experts": 8, "num_experts_per_tok": 1, "shared_intermediate_size": 8},
        "ids", 136,
    ),  # experts as slices of one weight, split by the number of tokens each receives
    "falcon-mamba": (
        "FalconMambaForCausalLM", "FalconMambaConfig",
        {**LM, "hidden_size": 16, "num_hidden_layers": 2, "state_size": 4, "expand": 2,
         "conv_kernel": 2, "use_mambapy": False},
        "ids", 96,
    ),  # RMS norms without gains on the scan's B, C and dt: their channels are fixed
    "nemotron-h": (
        "NemotronHForCausalLM", "NemotronHConfig",
        {**LL, "head_dim": 4, "ssm_state_size": 4, "mamba_num_heads": 8, "mamba_head_dim": 4,
         "n_groups": 1, "conv_kernel": 2, "chunk_size": 4, "hybrid_override_pattern": "M*-",
         "num_hidden_layers": 3, "mlp_hidden_act": "relu2"},
        "ids", 136,
    ),  # Mamba 2, attention and squared-ReLU MLP layers
    "apertus": ("ApertusForCausalLM", "ApertusConfig", {**LL, "head_dim": 4}, "ids", 84),
    # xIELU adds a learned multiple of its input to a non-homogeneous term: units fixed
    "fnet-relu": (
        "FNetForMaskedLM", "FNetConfig",
        {**ENC, **RELU, "pad_token_id": 1, "use_tpu_fourier_optimizations": False},
        "ids", 64,
    ),  # the 2D Fourier transform mixes channels: what reaches it is fixed
    "led-relu": (
        "LEDForConditionalGeneration", "LEDConfig",
        {**{k: v for k, v in S2S.items() if k != "max_position_embeddings"},
         "max_encoder_position_embeddings": 64, "max_decoder_position_embeddings": 64,
         "attention_window": [4, 4]},
        "seq2seq", 224,
    ),  # Longformer's banded attention (as_strided, pad) fixes its queries, keys and values
    "speech2text-relu": (
        "Speech2TextForConditionalGeneration", "Speech2TextConfig",
        {**S2S, "input_feat_per_channel": FEATURES, "input_channels": 1,
         "num_conv_layers": 2, "conv_channels": 16, "conv_kernel_sizes": [5, 5],
         "max_source_positions": 64, "max_target_positions": 64},
        "features", 448,
    ),
    "wavlm-relu": (
        "WavLMForCTC", "WavLMConfig",
        {**WAV, "num_buckets": 8, "max_bucket_distance": 16},
        "audio", 56,
    ),
    "ast-relu": (
        "ASTForAudioClassification", "ASTConfig",
        {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 24, "patch_size": 4, "frequency_stride": 4, "time_stride": 4,
         "max_length": MEL_BINS, "num_mel_bins": MEL_BINS, "num_labels": 3, **RELU},
        "spectrogram", 192,
    ),
    "wav2vec2-conformer-relu": (
        "Wav2Vec2ConformerForCTC", "Wav2Vec2ConformerConfig",
        {**WAV, "position_embeddings_type": "rotary", "conv_depthwise_kernel_size": 3},
        "audio", 328,
    ),
    "dinov3-vit-relu": (
        "DINOv3ViTModel", "DINOv3ViTConfig",
        {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 24, "num_register_tokens": 2,
         "layerscale_value": 0.5, **RELU},
        "vit", 224,
    ),
    "focalnet-relu": (
        "FocalNetForImageClassification", "FocalNetConfig",
        {"image_size": 32, "patch_size": 4, "embed_dim": 8, "depths": [1, 1],
         "focal_levels": [2, 2], "focal_windows": [3, 3], "num_labels": 3, **RELU},
        "vit", 234,
    ),  # its modulation's GELUs (not set by hidden_act) fix the channels they read
    "swiftformer-relu": (
        "SwiftFormerForImageClassification", "SwiftFormerConfig",
        {"image_size": 32, "depths": [1, 1, 1, 1], "embed_dims": [8, 8, 16, 16],
         "num_labels": 3, **RELU},
        "image", 452,
    ),  # its additive attention L2-normalises the queries and keys: they are fixed
    "hiera-relu": (
        "HieraForImageClassification", "HieraConfig",
        {"image_size": [32, 32], "embed_dim": 8, "patch_size": [3, 3], "patch_stride": [2, 2],
         "patch_padding": [1, 1], "depths": [1, 1], "num_heads": [1, 2], "num_query_pool": 1,
         "query_stride": [2, 2], "masked_unit_size": [4, 4],
         "masked_unit_attention": [True, False], "num_labels": 3, **RELU},
        "vit", 200,
    ),
}  # fmt: skip


def inputs(kind: str, batch: int, length: int, seed: int) -> dict[str, Tensor]:
    """``call`` of ``test_hf_heldout2``, a spectrogram ``[batch, MEL_BINS, MEL_BINS]``, or
    filter-bank features ``[batch, frames, FEATURES]`` (frames growing with ``length``) with
    decoder ids."""
    gen = torch.Generator().manual_seed(100 + seed)
    if kind == "spectrogram":
        return {"input_values": torch.randn(batch, MEL_BINS, MEL_BINS, generator=gen,
                                            dtype=DTYPE)}  # fmt: skip
    if kind == "features":
        frames = torch.randn(batch, 8 + 4 * length, FEATURES, generator=gen, dtype=DTYPE)
        ids = call("ids", batch, length, seed)["input_ids"]
        return {"input_features": frames, "decoder_input_ids": ids[:, : max(1, length - 3)]}
    return call(kind, batch, length, seed)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_structure_is_exact_on_fresh_inputs(arch):
    assert_exact_on_fresh_inputs(arch, ARCHS, inputs)


# -- experts the example reaches with no token -----------------------------------------------
def experts_reached(model: nn.Module, kwargs: dict) -> dict[str, set[int]]:
    """The experts each ``*Experts`` module of ``model`` runs on ``kwargs``: read from its
    second argument, the routed indices ``[tokens, k]`` or the number of tokens per expert."""
    reached: dict[str, set[int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            routed = args[1]
            if isinstance(routed, Tensor):
                reached.setdefault(name, set()).update(routed.flatten().tolist())
            else:
                reached.setdefault(name, set()).update(e for e, n in enumerate(routed) if n)

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if type(m).__name__.endswith("Experts")]  # fmt: skip
    with torch.no_grad():
        model(**kwargs)
    for h in hooks:
        h.remove()
    return reached


@pytest.mark.parametrize("arch", ["minimax", "lfm2-moe", "granitemoehybrid"])
def test_the_example_leaves_experts_empty_that_fresh_calls_fill(arch):
    """The sweep's check above covers experts the example does not reach: some expert of each
    of these models runs on a fresh call and on no token of the example, and discovery says
    so in its notes."""
    model = build(arch, ARCHS)
    kind = ARCHS[arch][3]
    seen = experts_reached(model, inputs(kind, *EXAMPLE))
    fresh: dict[str, set[int]] = {}
    for shape in FRESH:
        for name, reached in experts_reached(model, inputs(kind, *shape)).items():
            fresh.setdefault(name, set()).update(reached)
    assert any(fresh[name] - seen.get(name, set()) for name in fresh), (seen, fresh)
    s = gaugefix.discover(model, **inputs(kind, *EXAMPLE), allow_value_dependent=True)
    assert "the example input reads none of them" in s.summary()
