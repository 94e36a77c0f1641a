"""``structure.scale_groups()`` beyond the registries' architectures: every exported group is
applied as a SmoothQuant/AWQ-style tool applies a mapping, from module names and module types
alone (divide the smooth module's ``weight`` along its output channels and its ``bias``,
multiply the balance modules' ``weight`` along their input channels), and must keep float64
logits to 1e-10. Groups a tool could not apply that way (fused experts, a layer scale, a
root-level parameter, ``MultiheadAttention``'s packed projection, a depthwise convolution's
input channels) are not exported.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix.precision import Float64Throughout

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10


@torch.no_grad()
def apply_like_a_tool(model: nn.Module, group: dict, scales: Tensor) -> None:
    """Divide each smooth module's ``weight`` (output channels: dim 1 for GPT-2's ``Conv1D``
    and embeddings, else dim 0) and ``bias`` by ``s``; multiply each balance module's ``weight``
    along its input channels (dim 0 for ``Conv1D``, else dim 1) by ``s``. A module without a
    ``weight`` raises, as it does in the tools."""
    modules = dict(model.named_modules())
    s = torch.cat([scales, scales.new_ones(1)])  # position -1: not in the group
    for name, positions in group["smooth_channels"].items():
        module = modules[name]
        transposed = type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding)
        for p in (module.weight, getattr(module, "bias", None)):
            if p is not None:
                shape = [1] * p.dim()
                shape[1 if transposed and p.dim() == 2 else 0] = -1
                p.div_(s[torch.tensor(positions)].view(shape))
    for name, positions in group["balance_channels"].items():
        module = modules[name]
        shape = [1] * module.weight.dim()
        shape[0 if type(module).__name__ == "Conv1D" else 1] = -1
        module.weight.mul_(s[torch.tensor(positions)].view(shape))


def assert_groups_exact(model: nn.Module, run, groups: list):
    """Random positive scales on each group in turn (JSON round trip first) keep the output."""
    groups = json.loads(json.dumps(groups))
    before = run(model)
    gen = torch.Generator().manual_seed(2)
    for group in groups:
        twin = copy.deepcopy(model)
        n = len(group["generators"])
        scales = torch.exp(torch.randn(n, generator=gen, dtype=DTYPE))
        apply_like_a_tool(twin, group, scales)
        assert rel_change(before, run(twin)) <= TOL, group["smooth_layer"]


# -- Hugging Face architectures not in the registries' test ---------------------------------------
COMMON = {"vocab_size": 40, "bos_token_id": 0, "eos_token_id": 0}
LLAMA_LIKE = {
    "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 32,
}  # fmt: skip
MOE = {"num_experts_per_tok": 2, "tie_word_embeddings": False}
ARCHS = {
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**LLAMA_LIKE, "head_dim": 4}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**LLAMA_LIKE, "head_dim": 4}),
    "phi3": (
        "Phi3ForCausalLM", "Phi3Config",
        {**LLAMA_LIKE, "tie_word_embeddings": False, "pad_token_id": 0},
    ),
    "gpt-neox": (
        "GPTNeoXForCausalLM", "GPTNeoXConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
         "num_attention_heads": 4, "max_position_embeddings": 32, "rotary_pct": 0.5},
    ),
    "falcon-mq": (
        "FalconForCausalLM", "FalconConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 4, "multi_query": True},
    ),
    "stablelm": (
        "StableLmForCausalLM", "StableLmConfig",
        {**LLAMA_LIKE, "partial_rotary_factor": 0.5, "use_parallel_residual": True,
         "qk_layernorm": True, "tie_word_embeddings": False},
    ),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {**LLAMA_LIKE, "tie_word_embeddings": False}),
    "cohere": ("CohereForCausalLM", "CohereConfig", LLAMA_LIKE),
    "llama-tied-bias": (
        "LlamaForCausalLM", "LlamaConfig",
        {**LLAMA_LIKE, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
        {**LLAMA_LIKE, **MOE, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12,
         "num_experts": 4},
    ),
    "mixtral": (
        "MixtralForCausalLM", "MixtralConfig", {**LLAMA_LIKE, **MOE, "num_local_experts": 4},
    ),
    "bert": (
        "BertForMaskedLM", "BertConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
         "num_attention_heads": 4, "max_position_embeddings": 32},
    ),
    "t5": (
        "T5ForConditionalGeneration", "T5Config",
        {"num_layers": 1, "num_decoder_layers": 1, "d_model": 16, "d_kv": 4, "d_ff": 24,
         "num_heads": 4, "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0},
    ),
}  # fmt: skip
# Per architecture: groups that must be there (smooth layer, a balance layer), and what must not
# be: a norm-gain group (Gemma's norms multiply by 1 + w, which a division of w does not scale),
# the head (a tied one also embeds), the fused experts (no weight a tool can scale).
EXPECT = {
    "gemma": {"present": [], "absent": "norm"},
    "gemma2": {"present": [], "absent": "norm"},
    "phi3": {"present": [("input_layernorm", "qkv_proj"), ("gate_up_proj", "down_proj")]},
    "llama-tied-bias": {"present": [("input_layernorm", "q_proj")], "absent": "lm_head"},
    "qwen2-moe": {
        "present": [("input_layernorm", "q_proj"), ("shared_expert.up_proj", "down_proj")],
        "absent": "experts",
    },
    "mixtral": {"present": [("input_layernorm", "q_proj")], "absent": "experts"},
}


def perturbed_hf(model_cls: str, config) -> nn.Module:
    """``transformers.<model_cls>(config)`` in float64 and eval mode, every parameter moved off
    its initial value (a norm's gain of 1, a bias of 0 would hide mistakes), seeded."""
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def build(arch: str) -> tuple[nn.Module, dict]:
    model_cls, config_cls, kwargs = ARCHS[arch]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs)
    if "num_experts_per_tok" in kwargs:
        config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = perturbed_hf(model_cls, config)
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    if arch == "t5":
        return model, {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return model, {"input_ids": ids}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_exported_group_applies_by_names_and_keeps_the_logits(arch):
    model, inputs = build(arch)
    moe = "num_experts_per_tok" in ARCHS[arch][2]  # the experts loop reads routing values
    structure = gaugefix.discover(model, **inputs, allow_value_dependent=moe)
    groups = structure.scale_groups()
    assert groups
    modules = dict(model.named_modules())
    for group in groups:  # names a tool can resolve, with the weights it scales
        for name in group["smooth_channels"]:
            assert isinstance(modules[name].weight, Tensor), name
        for name in group["balance_channels"]:
            assert modules[name].weight.dim() >= 2, name
    pairs = [(g["smooth_layer"], b) for g in groups for b in g["balance_layers"]]
    for smooth, balance in EXPECT.get(arch, {}).get("present", []):
        assert any(str(s).endswith(smooth) and b.endswith(balance) for s, b in pairs), pairs
    absent = EXPECT.get(arch, {}).get("absent")
    if absent == "norm":
        assert all(g["kind"] != "norm gain" for g in groups)
    elif absent:
        assert not any(absent in f"{s} {b}" for s, b in pairs), pairs

    def run(m: nn.Module) -> Tensor:
        # float64 throughout: Cohere's LayerNorm (a cast to float32) keeps float64's digits
        with torch.no_grad(), Float64Throughout():
            return m(**inputs).logits

    assert_groups_exact(model, run, groups)


# -- modules a tool cannot scale by name ----------------------------------------------------------
class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x


class LayerScaleBlock(nn.Module):
    """A pre-norm MLP block whose branch is multiplied by a learned per-channel ``gamma``
    (CaiT, ConvNeXt, DINOv2): fc2's rows against ``gamma``, which no tool scales as columns."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 12), nn.Linear(12, 8)
        self.ls, self.head = LayerScale(8), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.ls(self.fc2(F.relu(self.fc1(self.ln(x))))))


class RootGain(nn.Module):
    """A gain owned by the model's root (``g``: no module of that name)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 5)
        self.g = nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.g * F.relu(self.fc1(x)))


class Experts(nn.Module):
    """A norm read by a router and by experts stored as one 3-D tensor per side."""

    def __init__(self, experts: int = 3, width: int = 8, hidden: int = 6) -> None:
        super().__init__()
        self.ln, self.router = nn.LayerNorm(width), nn.Linear(width, experts)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, width))
        self.w_out = nn.Parameter(torch.randn(experts, width, hidden))

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln(x)
        p = torch.softmax(self.router(x), -1)
        hidden = F.relu(torch.einsum("bd,ehd->beh", x, self.w_in))
        return torch.einsum("beh,edh,be->bd", hidden, self.w_out, p)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.head = nn.LayerNorm(8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        return self.head(x + self.attn(h, h, h, need_weights=False)[0])


class Depthwise(nn.Module):
    """A convolution read by a depthwise one, whose kernel holds its input channels on dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.dw = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, groups=6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dw(F.relu(self.conv(x))).mean((2, 3)))


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RoutedExperts(nn.Module):
    """A top-2 mixture of three SwiGLU experts (``nn.Linear`` modules) after a norm; the router
    reads the normed input (``router_reads_norm``) or the raw one."""

    def __init__(self, router_reads_norm: bool) -> None:
        super().__init__()
        self.norm, self.gate = nn.LayerNorm(8), nn.Linear(8, 3, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(3))
        self.head, self.router_reads_norm = nn.Linear(8, 5), router_reads_norm

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        logits = self.gate(h if self.router_reads_norm else x)
        top, idx = logits.topk(2, -1)
        w = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
        return self.head(x + sum(w[..., e : e + 1] * ex(h) for e, ex in enumerate(self.experts)))


def discover_groups(model: nn.Module, x: Tensor) -> tuple[nn.Module, list]:
    model = model.to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, gaugefix.discover(model, x).scale_groups()


def run_on(x: Tensor):
    def run(model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model(x)

    return run


VECTORS = torch.randn(4, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
UNSCALABLE = {  # model, input, the groups left (smooth layer, balance layers)
    "layer scale": (
        LayerScaleBlock, VECTORS,
        [("ln", ["fc1"]), ("fc1", ["fc2"])],
    ),
    "root gain": (RootGain, VECTORS, []),
    "3-D experts": (Experts, VECTORS, []),
    "MultiheadAttention": (Attention, VECTORS.view(2, 2, 8), []),
    "depthwise": (
        Depthwise, torch.randn(2, 3, 7, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(3)),
        [("dw", ["fc"])],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(UNSCALABLE))
def test_groups_a_tool_cannot_scale_by_name_are_left_out(case):
    factory, x, expected = UNSCALABLE[case]
    torch.manual_seed(0)
    model, groups = discover_groups(factory(), x)
    found = [(g["smooth_layer"], g["balance_layers"]) for g in groups]
    assert sorted(found) == sorted(expected)
    assert_groups_exact(model, run_on(x), groups)


@pytest.mark.parametrize("router_reads_norm", [True, False])
def test_a_router_reading_the_norm_is_balanced_with_the_experts(router_reads_norm):
    torch.manual_seed(0)
    model, groups = discover_groups(RoutedExperts(router_reads_norm), VECTORS)
    (norm,) = [g for g in groups if g["smooth_layer"] == "norm"]
    experts = [f"experts.{e}.{w}" for e in range(3) for w in ("w1", "w3")]
    assert norm["balance_layers"] == experts + (["gate"] if router_reads_norm else [])
    assert_groups_exact(model, run_on(VECTORS), groups)
