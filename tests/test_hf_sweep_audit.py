"""The rescaling group of Hugging Face architectures the other tests do not build, in float64
from tiny configs with random weights: encoder-decoders (T5, BART, Whisper), latent attention
(DeepSeek-V3), state-space and hybrid models (Mamba-2, Jamba, Qwen3-Next, LFM2), attention
variants (ALiBi, soft-capping, differential attention, clipped QKV with QK-LayerNorm), a
squared-ReLU MLP (Arcee), vision (BEiT, Swin, ConvNeXt-V2, SegFormer, DINOv2-SwiGLU), speech
(wav2vec 2.0), a two-tower model (CLIP) and models with float32 attention scores (GPT-Neo,
ModernBERT).

Discovered on a call that returns the hidden states and attention maps, every tensor the model
returns, computed in float64 throughout (a cast to float32 inside stays float64), must stay
within 1e-10 under a random gauge, balancing, ``equalize_(model, s, "range")``
and each exported scale group applied by names. A returned cache object is not among the
outputs discovery fixes (docs/generators.md): the structure's notes name it. The forward's
writes into the example inputs (a cache it appends to) stay off the caller's.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import incidence, rel_change
from gaugefix.precision import Float64Throughout
from test_scale_groups_audit import apply_like_a_tool, perturbed_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
VOCAB = 40
LM = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}
LLAMA_LIKE = {
    **LM, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 32, "num_hidden_layers": 2,
    "tie_word_embeddings": False,
}  # fmt: skip
SEQ2SEQ = {
    **LM, "encoder_layers": 1, "decoder_layers": 1, "d_model": 16, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 24, "decoder_ffn_dim": 24,
    "decoder_start_token_id": 0,
}  # fmt: skip
VIT = {
    "image_size": 32, "num_channels": 3, "patch_size": 8, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 24,
}  # fmt: skip
ENCODER = {**LM, "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24,
           "num_attention_heads": 4, "max_position_embeddings": 32}  # fmt: skip
WAV = {
    **LM, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
    "intermediate_size": 24, "conv_dim": [8, 8], "conv_stride": [5, 2], "conv_kernel": [10, 3],
    "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2,
}  # fmt: skip
# name: (model class, config class, config, inputs)
ARCHS = {
    "t5-gated": (
        "T5ForConditionalGeneration", "T5Config",
        {**LM, "num_layers": 1, "num_decoder_layers": 1, "d_model": 16, "d_kv": 4, "d_ff": 24,
         "num_heads": 4, "decoder_start_token_id": 0, "feed_forward_proj": "gated-gelu",
         "tie_word_embeddings": False},
        "seq2seq",
    ),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             {**SEQ2SEQ, "max_position_embeddings": 32}, "seq2seq"),
    "whisper": (
        "WhisperForConditionalGeneration", "WhisperConfig",
        {**SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 8, "max_target_positions": 16,
         "pad_token_id": 0, "suppress_tokens": None, "begin_suppress_tokens": None},
        "speech2text",
    ),
    "deepseek-v3": (
        "DeepseekV3ForCausalLM", "DeepseekV3Config",
        {**LLAMA_LIKE, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 8, "n_shared_experts": 1, "first_k_dense_replace": 0,
         "q_lora_rank": 8, "kv_lora_rank": 8, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2,
         "v_head_dim": 4, "n_group": 1, "topk_group": 1},
        "ids",
    ),
    "jamba": (
        "JambaForCausalLM", "JambaConfig",
        {**LLAMA_LIKE, "num_experts": 2, "num_experts_per_tok": 1, "expert_layer_period": 2,
         "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
         "mamba_d_state": 4, "mamba_d_conv": 2, "mamba_expand": 2, "use_mamba_kernels": False},
        "ids",
    ),
    "mamba2": (
        "Mamba2ForCausalLM", "Mamba2Config",
        {**LM, "hidden_size": 16, "num_hidden_layers": 2, "state_size": 4, "expand": 2,
         "conv_kernel": 2, "num_heads": 4, "head_dim": 8, "n_groups": 1, "pad_token_id": 0,
         "chunk_size": 4},
        "ids",
    ),
    "qwen3-next": (
        "Qwen3NextForCausalLM", "Qwen3NextConfig",
        {**LLAMA_LIKE, "num_experts_per_tok": 2, "num_experts": 4, "moe_intermediate_size": 8,
         "shared_expert_intermediate_size": 8, "head_dim": 4, "linear_num_value_heads": 2,
         "linear_num_key_heads": 2, "linear_key_head_dim": 4, "linear_value_head_dim": 4,
         "linear_conv_kernel_dim": 2, "layer_types": ["linear_attention", "full_attention"]},
        "ids",
    ),
    "lfm2": (
        "Lfm2ForCausalLM", "Lfm2Config",
        {**LLAMA_LIKE, "pad_token_id": 0, "layer_types": ["conv", "full_attention"],
         "block_auto_adjust_ff_dim": False, "conv_L_cache": 3},
        "ids",
    ),
    "gemma2-softcap": (
        "Gemma2ForCausalLM", "Gemma2Config",
        {**LLAMA_LIKE, "head_dim": 4, "sliding_window": 4, "attn_logit_softcapping": 0.5,
         "final_logit_softcapping": 0.5},
        "ids",
    ),
    "diffllama": ("DiffLlamaForCausalLM", "DiffLlamaConfig", LLAMA_LIKE, "ids"),
    "falcon-alibi": (
        "FalconForCausalLM", "FalconConfig",
        {**LM, "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 4,
         "alibi": True, "multi_query": False, "parallel_attn": False},
        "ids",
    ),
    "mpt-clipped-qk-ln": (
        "MptForCausalLM", "MptConfig",
        {**LM, "n_layers": 2, "d_model": 16, "n_heads": 4, "max_seq_len": 32,
         "expansion_ratio": 2, "attn_config": {"clip_qkv": 0.05, "qk_ln": True}},
        "ids",
    ),  # the clamp is active: |qkv| > 0.05
    "arcee-relu2": ("ArceeForCausalLM", "ArceeConfig", LLAMA_LIKE, "ids"),
    "beit": (
        "BeitForImageClassification", "BeitConfig",
        {**VIT, "use_relative_position_bias": True, "layer_scale_init_value": 0.1,
         "use_mean_pooling": True},
        "image",
    ),
    "dinov2-swiglu": (
        "Dinov2ForImageClassification", "Dinov2Config",
        {**VIT, "mlp_ratio": 2, "use_swiglu_ffn": True}, "image",
    ),
    "swin": (
        "SwinForImageClassification", "SwinConfig",
        {"image_size": 32, "num_channels": 3, "patch_size": 4, "embed_dim": 8, "depths": [1, 1],
         "num_heads": [2, 2], "window_size": 4, "mlp_ratio": 2.0},
        "image",
    ),
    "convnextv2": (
        "ConvNextV2ForImageClassification", "ConvNextV2Config",
        {"num_channels": 3, "hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
        "image",
    ),
    "segformer": (
        "SegformerForImageClassification", "SegformerConfig",
        {"num_channels": 3, "num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1],
         "hidden_sizes": [8, 16], "num_attention_heads": [1, 2], "mlp_ratios": [2, 2],
         "decoder_hidden_size": 16},
        "image",
    ),
    "wav2vec2": ("Wav2Vec2ForCTC", "Wav2Vec2Config", WAV, "audio"),
    "clip": (
        "CLIPModel", "CLIPConfig",
        {"text_config": {**ENCODER, "projection_dim": 8},
         "vision_config": {**VIT, "projection_dim": 8}, "projection_dim": 8},
        "text+image",
    ),
    # float32 inside (rotary embeddings, attention scores), float64 in ``returned``
    "gpt-neo": (
        "GPTNeoForCausalLM", "GPTNeoConfig",
        {**LM, "num_layers": 2, "hidden_size": 16, "num_heads": 4, "window_size": 4,
         "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 32},
        "ids",
    ),
    "modernbert": (
        "ModernBertForMaskedLM", "ModernBertConfig",
        {**ENCODER, "global_attn_every_n_layers": 1, "local_attention": 4, "pad_token_id": 0},
        "ids",
    ),
}  # fmt: skip
LLAMA = ("LlamaForCausalLM", "LlamaConfig", LLAMA_LIKE, "ids")


def build(spec: tuple) -> tuple[nn.Module, dict]:
    """A float64 eval-mode model of ``spec`` with perturbed weights (no accidental balance) and
    its example inputs; skipped when this ``transformers`` has no such model."""
    model_cls, config_cls, kwargs, kind = spec
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**copy.deepcopy(kwargs))
    config._attn_implementation = "eager"  # returns the attention maps
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    return perturbed_hf(model_cls, config), example_inputs(kind)


def example_inputs(kind: str) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    image = torch.randn(2, 3, 32, 32, generator=gen, dtype=DTYPE)
    return {
        "ids": {"input_ids": ids},
        "seq2seq": {"input_ids": ids, "decoder_input_ids": ids[:, :5]},
        "speech2text": {"input_features": torch.randn(1, 8, 16, generator=gen, dtype=DTYPE),
                        "decoder_input_ids": ids[:1, :5]},
        "image": {"pixel_values": image},
        "audio": {"input_values": torch.randn(2, 400, generator=gen, dtype=DTYPE)},
        "text+image": {"input_ids": ids, "pixel_values": image},
    }[kind]  # fmt: skip


def richest_call(model: nn.Module, inputs: dict) -> dict:
    """``inputs`` with the hidden states and attention maps asked for, as far as the model's
    forward accepts them."""
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {
        k: True
        for k in ("output_hidden_states", "output_attentions")
        if k in params or takes_kwargs
    }
    for dropped in ((), ("output_attentions",), tuple(extra)):
        call = {**inputs, **{k: v for k, v in extra.items() if k not in dropped}}
        try:
            with torch.no_grad():
                model(**call)
            return call
        except (TypeError, ValueError, NotImplementedError):
            continue
    return inputs


def returned(model: nn.Module, call: dict) -> dict[str, Tensor]:
    """Every floating tensor the model returns, by path (nested outputs, tuples of hidden
    states and attention maps; a cache object is not searched, as in discovery), computed in
    float64 throughout: a cast to float32 inside (a norm, a softmax, a rotary embedding) stays
    float64, so comparisons resolve float64's digits rather than float32's."""
    with torch.no_grad(), Float64Throughout():
        out = model(**call)
    found: dict[str, Tensor] = {}

    def walk(tree, path: str) -> None:
        if isinstance(tree, Tensor):
            if tree.is_floating_point():
                found[path] = tree.detach().clone()
        elif isinstance(tree, dict):
            for k, v in tree.items():
                walk(v, f"{path}.{k}")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                walk(v, f"{path}.{i}")

    walk(out, "out")
    return found


def worst_change(before: dict[str, Tensor], after: dict[str, Tensor]) -> tuple[float, str]:
    assert before.keys() == after.keys()
    return max(((rel_change(b, after[k]), k) for k, b in before.items()), default=(0.0, ""))


def test_returned_keeps_float64_digits_through_a_float32_cast():
    """``LlamaRMSNorm`` casts its input to float32 and back: ``returned`` computes it in float64
    (``w x / sqrt(mean(x^2) + eps)`` to float64's rounding), so the exactness checks see a change
    below float32's resolution."""
    eps = 1e-6
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(16, eps=eps).to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16, dtype=DTYPE))
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    exact = norm.weight.detach() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert rel_change(exact, returned(norm, {"hidden_states": x})["out"]) <= 1e-14


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_returned_tensor_is_kept_by_gauge_balance_equalize_and_groups(arch):
    model, inputs = build(ARCHS[arch])
    call = richest_call(model, inputs)
    before = returned(model, call)
    assert any(".hidden_states." in k or "encoder_hidden_states" in k for k in before), before
    moe = "num_experts_per_tok" in ARCHS[arch][2]  # the eager experts loop reads the routing
    s = gaugefix.discover(model, **call, allow_value_dependent=moe)
    assert s.num_generators > 0
    gen = torch.Generator().manual_seed(0)
    gaugefix.random_gauge_(model, s, 1.0, generator=gen)
    assert worst_change(before, returned(model, call))[0] <= TOL
    gaugefix.random_gauge_(model, s, 3.0, generator=gen)
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= TOL, result
    assert worst_change(before, returned(model, call))[0] <= TOL
    gaugefix.random_gauge_(model, s, 1.0, generator=gen)
    assert gaugefix.equalize_(model, s, "range").converged
    assert worst_change(before, returned(model, call))[0] <= TOL
    for group in json.loads(json.dumps(s.scale_groups())):  # as a tool reads them, cumulated
        scales = torch.exp(torch.randn(len(group["generators"]), generator=gen, dtype=DTYPE))
        apply_like_a_tool(model, group, scales)
        assert worst_change(before, returned(model, call))[0] <= TOL, group["smooth_layer"]


@torch.no_grad()
def powers_of_two_gauge_(model: nn.Module, s: gaugefix.GaugeStructure, seed: int) -> None:
    """The group action with factors ``2^k`` (``k`` in -3..3 per generator): exact in every
    floating format, so a model that rounds to float32 inside sees exactly the same numbers."""
    k = torch.randint(-3, 4, (s.num_generators,), generator=torch.Generator().manual_seed(seed))
    params = s.bind(model)
    for name in s.params:
        exponent = torch.tensordot(k.to(DTYPE), incidence(s, name).to(DTYPE), dims=1)
        params[name].mul_(torch.exp2(exponent))


@pytest.mark.parametrize("arch", ["gpt-neo", "modernbert"])
def test_attention_scores_computed_in_float32_keep_their_generators(arch):
    """GPT-Neo and ModernBERT compute their attention scores in float32 (a cast the gauge
    passes): their query-key (or rotary) pairs are generators, which the exactness test above
    checks in float64 throughout."""
    model, inputs = build(ARCHS[arch])
    s = gaugefix.discover(model, **richest_call(model, inputs))
    assert s.kind_counts().get("query-key", 0) + s.kind_counts().get("rotary pair", 0) > 0


# -- caches ---------------------------------------------------------------------------------------
def cache_kwarg(model: nn.Module) -> str:
    """The name the forward takes a cache by (``cache`` in transformers 5, else
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    return out.get("cache", out.get("past_key_values"))


@pytest.mark.parametrize("arch", ["llama", "deepseek-v3"])
def test_a_decoding_step_that_reads_a_cache_fixes_what_the_cache_holds(arch):
    """The cached keys and values of the earlier tokens are example inputs (fixed): the query-key
    and value-output pairs that would rescale them are not generators, and a random gauge keeps
    the step's logits with that same cache. DeepSeek-V3 caches the normed latent before its
    ``kv_b_proj`` (and its rotary keys): its value-output pairs and the query-key pairs of its
    keys' non-rotary dims (made from the latent after the cache) stay generators."""
    model, inputs = build(LLAMA if arch == "llama" else ARCHS[arch])
    ids = inputs["input_ids"]
    with torch.no_grad():
        cache = returned_cache(model(input_ids=ids[:, :5], use_cache=True))
    step = {"input_ids": ids[:, 5:], cache_kwarg(model): cache}
    before = returned(model, copy.deepcopy(step))
    s = gaugefix.discover(model, **copy.deepcopy(step), allow_value_dependent=True)
    kinds = s.kind_counts()
    assert "rotary pair" not in kinds
    assert ("value-output" in kinds) == ("query-key" in kinds) == (arch == "deepseek-v3"), kinds
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert worst_change(before, returned(model, copy.deepcopy(step)))[0] <= TOL


def test_a_returned_cache_is_named_in_the_notes_and_changes_under_the_gauge():
    """A returned cache is not searched (docs/generators.md): the keys and values it holds
    change under the gauge (so one made before a move must not be reused after it), and the
    structure's notes say so."""
    model, inputs = build(LLAMA)
    with torch.no_grad():
        cache = returned_cache(model(**inputs, use_cache=True))
    held = [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]
    s = gaugefix.discover(model, **inputs, use_cache=True)
    assert any(type(cache).__name__ in note and "not searched" in note for note in s.notes)
    assert not gaugefix.discover(model, **inputs, use_cache=False).notes
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = returned_cache(model(**inputs, use_cache=True))
    after = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert max(rel_change(b, a) for b, a in zip(held, after, strict=True)) > 1e-3


@pytest.mark.parametrize("case", ["cache grows", "inputs_embeds scaled"])
def test_discover_leaves_its_example_inputs_as_they_were(case):
    if case == "cache grows":
        model, inputs = build(LLAMA)
        ids = inputs["input_ids"]
        with torch.no_grad():
            cache = returned_cache(model(input_ids=ids[:, :5], use_cache=True))
        gaugefix.discover(
            model, input_ids=ids[:, 5:], **{cache_kwarg(model): cache}, allow_value_dependent=True
        )
        assert cache.get_seq_length() == 5
    else:
        model, inputs = build(
            ("CTRLLMHeadModel", "CTRLConfig",
             {**LM, "n_layer": 1, "n_embd": 16, "n_head": 4, "dff": 24, "n_positions": 32}, "ids")
        )  # fmt: skip
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
        held = embeds.clone()
        gaugefix.discover(model, inputs_embeds=embeds)
        assert torch.equal(embeds, held)
