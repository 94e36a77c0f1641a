"""A third held-out sweep of discovery over Hugging Face architectures no other test builds:
decoder LMs (JetMoE with its mixture of attention heads and experts as slices ``W[e]`` of one
weight, Bamba, Cohere 2, Helium, OLMo 3, Seed-OSS, HunYuan, dots.llm1 with shared experts,
BioGPT, BitNet with its sub-norms and squared ReLU), encoders (XLM-RoBERTa, ELECTRA, ESM with
rotary), encoder-decoders (UMT5, mBART, Switch Transformers), a two-tower model (SigLIP) and
vision (Swin V2 with cosine attention, MobileNetV1 with ReLU6 and with ReLU).

Built and checked as in ``test_hf_heldout2``: tiny, float64, random weights, discovered on one
example call and exact (1e-10 under a random gauge of scale 2.5, 1e-12 under a gauge of powers
of two) on fresh calls of other shapes with padded masks.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from test_hf_heldout2 import (
    ENC,
    LL,
    LM,
    POW2_TOL,
    RELU,
    S2S,
    SCALE,
    SLIDING,
    SSM,
    TOL,
    VIT,
    build,
    call,
    discovered,
    worst_over,
)
from test_hf_sweep_audit import powers_of_two_gauge_, returned

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
JETMOE = {**LM, "hidden_size": 16, "num_hidden_layers": 2, "num_key_value_heads": 2,
          "kv_channels": 4, "intermediate_size": 8, "num_experts_per_tok": 2,
          "activation_function": "relu", "max_position_embeddings": 64}  # fmt: skip
# name: (model class, config class, config, input kind, generators found when written)
ARCHS = {
    "jetmoe": ("JetMoeForCausalLM", "JetMoeConfig", {**JETMOE, "num_local_experts": 3},
               "ids", 56),  # the example sends no token to the first expert of the MLPs
    "jetmoe-two-of-two": ("JetMoeForCausalLM", "JetMoeConfig",
                          {**JETMOE, "num_local_experts": 2},
                          "ids", 152),  # every token reaches every expert
    "bamba": (
        "BambaForCausalLM", "BambaConfig",
        {**LL, **SSM, "mamba_d_head": 4, "mamba_n_heads": 8, "mamba_n_groups": 1,
         "mamba_chunk_size": 4, "attn_layer_indices": [1], **RELU},
        "ids", 246,
    ),
    "cohere2-relu": ("Cohere2ForCausalLM", "Cohere2Config", {**LL, **RELU, **SLIDING},
                     "ids", 156),
    "helium-relu": ("HeliumForCausalLM", "HeliumConfig", {**LL, **RELU, "head_dim": 4},
                    "ids", 184),
    "olmo3-relu": ("Olmo3ForCausalLM", "Olmo3Config", {**LL, **RELU, **SLIDING}, "ids", 120),
    "seed-oss-relu": ("SeedOssForCausalLM", "SeedOssConfig", {**LL, **RELU, "head_dim": 4},
                      "ids", 184),
    "hunyuan-relu": ("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config",
                     {**LL, **RELU, "head_dim": 4}, "ids", 184),
    "dots1": (
        "Dots1ForCausalLM", "Dots1Config",
        {**LL, "moe_intermediate_size": 8, "n_routed_experts": 3, "num_experts_per_tok": 2,
         "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
         "head_dim": 4, **RELU},
        "ids", 196,
    ),
    "biogpt-relu": ("BioGptForCausalLM", "BioGptConfig", {**ENC, **RELU}, "ids", 176),
    "bitnet": ("BitNetForCausalLM", "BitNetConfig", {**LL, "head_dim": 4}, "ids", 152),
    "xlm-roberta-relu": ("XLMRobertaForMaskedLM", "XLMRobertaConfig",
                         {**ENC, **RELU, "pad_token_id": 1}, "ids", 112),
    "electra-relu": ("ElectraForMaskedLM", "ElectraConfig",
                     {**ENC, **RELU, "embedding_size": 8}, "ids", 120),
    "esm-relu": ("EsmForMaskedLM", "EsmConfig",
                 {**ENC, **RELU, "position_embedding_type": "rotary", "mask_token_id": 1,
                  "pad_token_id": 1}, "ids", 112),
    "umt5-relu": (
        "UMT5ForConditionalGeneration", "UMT5Config",
        {**LM, "num_layers": 2, "num_decoder_layers": 2, "d_model": 16, "d_kv": 4, "d_ff": 24,
         "num_heads": 4, "decoder_start_token_id": 0, "feed_forward_proj": "relu",
         "tie_word_embeddings": False},
        "seq2seq", 448,
    ),
    "mbart-relu": ("MBartForConditionalGeneration", "MBartConfig", S2S, "seq2seq", 448),
    "switch-transformers": (
        "SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
        {**LM, "num_layers": 2, "num_decoder_layers": 2, "d_model": 16, "d_kv": 4, "d_ff": 24,
         "num_heads": 4, "num_experts": 2, "expert_capacity": 64, "decoder_start_token_id": 0,
         "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1},
        "seq2seq", 440,
    ),  # its router casts its own weight to float32 on each call (a write, before the gauge)
    "siglip-relu": (
        "SiglipModel", "SiglipConfig",
        {"text_config": {**ENC, **RELU}, "vision_config": {**VIT, **RELU}},
        "two-tower", 424,
    ),
    "swinv2": (
        "Swinv2ForImageClassification", "Swinv2Config",
        {"image_size": 32, "patch_size": 4, "embed_dim": 8, "depths": [1, 1],
         "num_heads": [2, 2], "window_size": 4, "num_labels": 3, **RELU},
        "vit", 1160,
    ),
    "mobilenet-v1": (
        "MobileNetV1ForImageClassification", "MobileNetV1Config",
        {"num_channels": 3, "image_size": 32, "depth_multiplier": 0.25, "num_labels": 3},
        "image", 0,
    ),  # ReLU6 clamps: no unit is free
    "mobilenet-v1-relu": (
        "MobileNetV1ForImageClassification", "MobileNetV1Config",
        {"num_channels": 3, "image_size": 32, "depth_multiplier": 0.25, "num_labels": 3,
         **RELU},
        "image", 8,
    ),  # every stage's output is returned (hidden states): only the stem's units are free
}  # fmt: skip


def inputs(kind: str, batch: int, length: int, seed: int) -> dict[str, Tensor]:
    """``call`` of ``test_hf_heldout2``, and text with an image for a two-tower model."""
    if kind != "two-tower":
        return call(kind, batch, length, seed)
    return {**call("ids", batch, length, seed), **call("vit", batch, length, seed)}


def assert_exact_on_fresh_inputs(arch: str, archs: dict, inputs: Callable) -> None:
    """``arch`` of ``archs`` discovered on its example keeps at least its recorded generator
    count, and a random gauge (and one of powers of two) of the structure keeps every output on
    the fresh calls ``inputs`` makes within ``TOL`` (``POW2_TOL``)."""
    model, s, calls = discovered(arch, archs, inputs)
    assert s.num_generators >= archs[arch][4], s.summary()  # a drop is lost completeness
    before = [returned(model, c) for c in calls]
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(3))
    change = worst_over(model, calls, before)
    assert change[0] <= TOL, change
    powers = build(arch, archs)
    with torch.no_grad():
        powers(**calls[0])  # as the first model was: called once (casts included) before
    powers_of_two_gauge_(powers, s, seed=11)
    assert worst_over(powers, calls, before)[0] <= POW2_TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_structure_is_exact_on_fresh_inputs(arch):
    assert_exact_on_fresh_inputs(arch, ARCHS, inputs)


# -- an expert the example sends no token to ---------------------------------------------------
def discovered_on_three_rows(cls: type[nn.Module]) -> gaugefix.GaugeStructure:
    """The structure of ``cls`` (``[n, 4]`` -> ``[n, k]``) discovered on 3 rows, after checking
    that it has no generator and that a random gauge leaves the output on 6 fresh rows exactly
    unchanged."""
    torch.manual_seed(0)
    model = cls().to(DTYPE)
    s = gaugefix.discover(model, torch.randn(3, 4, dtype=DTYPE), allow_value_dependent=True)
    assert s.num_generators == 0, s.summary()
    fresh = torch.randn(6, 4, dtype=DTYPE)
    with torch.no_grad():
        before = model(fresh)
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(fresh), before)
    return s


class EmptyExpert(nn.Module):
    """A gain, then two experts ``W[e]`` (``[2, 3, 4]``) on the rows routed to them: the first
    ``n - 3`` rows to expert 0, the rest to expert 1 (JetMoE's ``split`` and ``F.linear(x_e,
    W[e])``). ``[n, 4]`` -> ``[n, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(4))
        self.experts = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.gain
        first = max(h.shape[0] - 3, 0)
        parts = h.split([first, h.shape[0] - first])
        return torch.cat([F.linear(parts[e], self.experts[e]) for e in range(2)])


def test_an_expert_reached_by_no_token_fixes_its_parameter():
    """On 3 rows expert 0 reads an empty input: the trace sees nothing of how its columns meet
    the gain's channels, so scaling the gain and only expert 1's columns, exact on the example,
    changes expert 0's output on 6 rows. The experts' weight is fixed, and the gain with it."""
    assert "empty input" in discovered_on_three_rows(EmptyExpert).summary()


class EmptyExpertModules(nn.Module):
    """:class:`EmptyExpert` with the experts as ``nn.Linear`` modules (with biases) on row
    slices ``h[:n - 3]``, ``h[n - 3:]``. ``[n, 4]`` -> ``[n, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(4))
        self.experts = nn.ModuleList(nn.Linear(4, 3) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.gain
        first = max(h.shape[0] - 3, 0)
        return torch.cat([self.experts[0](h[:first]), self.experts[1](h[first:])])


def test_an_expert_module_reached_by_no_token_fixes_its_parameters():
    """The empty slice ``h[:0]`` carries no channels of ``h``: the gain's channels it is cut
    from are blocked (they meet expert 0's fixed weight on other inputs), and the linear's
    rule is not run on the empty rows (its bias has no row to tie)."""
    discovered_on_three_rows(EmptyExpertModules)


class IdentityExpert(nn.Module):
    """A parameter-free expert (the identity) on the rows ``h[:n - 3]`` and a linear one on
    the rest, joined by ``torch.cat``. ``[n, 4]`` -> ``[n, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(4))
        self.expert = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.gain
        first = max(h.shape[0] - 3, 0)
        return torch.cat([h[:first], self.expert(h[first:])])


def test_rows_no_token_reaches_joined_into_the_output_block_their_channels():
    """On 3 rows the identity expert's rows are empty: on 6 rows they carry the gain's factors
    into the output. The gain's channels are blocked."""
    discovered_on_three_rows(IdentityExpert)
