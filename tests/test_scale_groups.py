"""``structure.scale_groups()`` against the quantization tools' hand-written mapping registries.

For each architecture (tiny Hugging Face configs, float64): every registry mapping that is an
exact symmetry is found as a group (same smooth layer, same balance layers); the mappings that
are not exact are listed below with the reason, found by no group, and shown to change the
logits when applied by module names; the exact groups the registries leave out are listed too;
and random scales applied to every exported group, by module names alone, keep the logits
(computed in float64 throughout) to 1e-10.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

import gaugefix
from architectures import rel_change
from gaugefix.cli import app
from gaugefix.precision import Float64Throughout
from gaugefix.zoo import EXAMPLES

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10

# -- the registries, copied from the projects' published mapping files ----------------------------
# llm-compressor, src/llmcompressor/modifiers/awq/mappings.py: _default_mappings (registered for
# LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
LLMC_DEFAULT = [
    ("re:.*input_layernorm$", ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    ("re:.*v_proj$", ["re:.*o_proj$"]),
    ("re:.*post_attention_layernorm$", ["re:.*gate_proj$", "re:.*up_proj$"]),
    ("re:.*up_proj$", ["re:.*down_proj$"]),
]
# llm-compressor, src/llmcompressor/modifiers/awq/mappings.py: _bloom_mappings (BloomForCausalLM)
LLMC_BLOOM = [
    ("re:.*input_layernorm$", ["re:.*query_key_value$"]),
    ("re:.*post_attention_layernorm$", ["re:.*dense_h_to_4h$"]),
    ("re:.*gelu_impl$", ["re:.*dense_4h_to_h$"]),
]
# AutoAWQ, awq/models/opt.py: OptAWQForCausalLM.get_layers_for_scaling
AUTOAWQ_OPT = [
    ("re:.*self_attn_layer_norm$", ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    ("re:.*v_proj$", ["re:.*out_proj$"]),
    ("re:.*final_layer_norm$", ["re:.*fc1$"]),
    ("re:.*fc1$", ["re:.*fc2$"]),
]
# AutoAWQ, awq/models/falcon.py: the branch for the original decoder (Falcon 7B)
AUTOAWQ_FALCON_7B = [
    ("re:.*input_layernorm$", ["re:.*mlp.dense_h_to_4h$", "re:.*query_key_value$"]),
]
# AutoAWQ, awq/models/falcon.py: the branch for the new decoder architecture (Falcon 40B)
AUTOAWQ_FALCON_40B = [
    ("re:.*ln_attn$", ["re:.*query_key_value$"]),
    ("re:.*ln_mlp$", ["re:.*mlp.dense_h_to_4h$"]),
]
# AutoAWQ, awq/models/phi.py: PhiAWQForCausalLM.get_layers_for_scaling
AUTOAWQ_PHI = [
    ("re:.*input_layernorm$", ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    ("re:.*v_proj$", ["re:.*dense$"]),
    ("re:.*input_layernorm$", ["re:.*mlp.fc1$"]),
    ("re:.*mlp.fc1$", ["re:.*mlp.fc2$"]),
]
# AutoAWQ, awq/models/gpt_bigcode.py (GPT-2's module names; no registry lists GPT-2 itself)
AUTOAWQ_GPT_BIGCODE = [
    ("re:.*ln_1$", ["re:.*attn.c_attn$"]),
    ("re:.*ln_2$", ["re:.*mlp.c_fc$"]),
    ("re:.*mlp.act$", ["re:.*mlp.c_proj$"]),
]

# Registry mappings that are not exact symmetries of the weights (by position in the list), and
# why.
GELU = "a GELU is not homogeneous: the tools insert a scaling module into the model"
SPLIT = (
    "the norm also feeds the other mapping's layers, which this one leaves unscaled (the exact "
    "group scales q, k, v and fc1 together)"
)
NOT_EXACT = {
    ("bloom", 2): GELU,
    ("gpt2", 2): GELU,
    ("phi", 0): SPLIT,
    ("phi", 2): SPLIT,
    ("phi", 3): "fc1 feeds a GELU: scaling its rows changes the function",
}
# Exact groups (smooth layer, balance layers) the registries leave out, per block or model.
LEFT_OUT = {
    "llama": {("model.norm", ("lm_head",))},
    "mistral": {("model.norm", ("lm_head",))},
    "qwen2": {("model.norm", ("lm_head",))},
    "bloom": {("h.0.self_attention.query_key_value", ("h.0.self_attention.dense",))},
    "gpt2": {("h.0.attn.c_attn", ("h.0.attn.c_proj",))},
    "opt": set(),
    "falcon-7b": {("h.0.self_attention.query_key_value", ("h.0.self_attention.dense",))},
    "falcon-40b": {("h.0.self_attention.query_key_value", ("h.0.self_attention.dense",))},
    "phi": {
        ("model.final_layernorm", ("lm_head",)),
        (
            "model.layers.0.input_layernorm",
            tuple(
                f"model.layers.0.{m}"
                for m in ("mlp.fc1", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")
            ),
        ),  # fmt: skip
    },
}

COMMON = {"vocab_size": 40, "bos_token_id": 0, "eos_token_id": 0}
LLAMA_LIKE = {
    "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": False,
}  # fmt: skip
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", LLAMA_LIKE, LLMC_DEFAULT),
    "mistral": ("MistralForCausalLM", "MistralConfig", LLAMA_LIKE, LLMC_DEFAULT),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", LLAMA_LIKE, LLMC_DEFAULT),
    "bloom": (
        "BloomForCausalLM", "BloomConfig", {"n_layer": 1, "hidden_size": 16, "n_head": 4},
        LLMC_BLOOM,
    ),
    "opt": (
        "OPTForCausalLM", "OPTConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "ffn_dim": 32, "num_attention_heads": 4,
         "max_position_embeddings": 32, "word_embed_proj_dim": 16},
        AUTOAWQ_OPT,
    ),
    "falcon-7b": (
        "FalconForCausalLM", "FalconConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 4},
        AUTOAWQ_FALCON_7B,
    ),
    "falcon-40b": (
        "FalconForCausalLM", "FalconConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 4,
         "new_decoder_architecture": True, "num_kv_heads": 2},
        AUTOAWQ_FALCON_40B,
    ),
    "phi": (
        "PhiForCausalLM", "PhiConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
         "num_attention_heads": 4, "max_position_embeddings": 32},
        AUTOAWQ_PHI,
    ),
    "gpt2": (
        "GPT2LMHeadModel", "GPT2Config", {"n_layer": 1, "n_embd": 16, "n_head": 4,
                                          "n_positions": 16},
        AUTOAWQ_GPT_BIGCODE,
    ),
}  # fmt: skip


def build(arch: str) -> tuple[nn.Module, Tensor]:
    model_cls, config_cls, kwargs, _ = ARCHS[arch]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(DTYPE).eval()
    with torch.no_grad():  # weights of different scales, so that no balance is accidental
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    """The model's logits on ``ids``, computed in float64 throughout (a norm's cast to float32
    stays float64)."""
    with torch.no_grad(), Float64Throughout():
        return model(ids).logits


def resolve(model: nn.Module, pattern: str) -> list[str]:
    """The modules of the (one) decoder block whose names match a registry pattern (``re:``
    regex): the registries list a block's mappings."""
    (block,) = [n for n, _ in model.named_modules() if re.fullmatch(r".*\.(layers|h)\.0", n)]
    names = [n for n, _ in model.named_modules() if n.startswith(block + ".")]
    return [n for n in names if re.fullmatch(pattern.removeprefix("re:"), n)]


@torch.no_grad()
def scale_by_names(model: nn.Module, group: dict, scales: Tensor) -> None:
    """What a SmoothQuant/AWQ-style tool does with a group, from module names and channel maps
    alone: divide the smooth layer's output channels by ``s``, multiply the balance layers'
    input channels by ``s``."""
    modules = dict(model.named_modules())
    s = torch.cat([scales, scales.new_ones(1)])  # position -1: not in the group
    for name, positions in group["smooth_channels"].items():
        module = modules[name]
        for pname, p in module.named_parameters(recurse=False):
            dim = 1 if type(module).__name__ == "Conv1D" and pname == "weight" else 0
            shape = [1] * p.dim()
            shape[dim] = -1
            p.div_(s[torch.tensor(positions)].view(shape))
    for name, positions in group["balance_channels"].items():
        module = modules[name]
        dim = 0 if type(module).__name__ == "Conv1D" else 1
        shape = [1, 1]
        shape[dim] = -1
        module.weight.mul_(s[torch.tensor(positions)].view(shape))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_registry_mappings_are_found_or_shown_not_exact(arch):
    model, ids = build(arch)
    structure = gaugefix.discover(model, ids)
    groups = structure.scale_groups()
    found = {
        (g["smooth_layer"], tuple(sorted(g["balance_layers"])))
        for g in groups
        if isinstance(g["smooth_layer"], str)
    }
    listed = set()
    for i, (smooth, balance) in enumerate(ARCHS[arch][3]):
        smooth_names = resolve(model, smooth)
        assert len(smooth_names) == 1, (smooth, smooth_names)
        key = (smooth_names[0], tuple(sorted(n for b in balance for n in resolve(model, b))))
        listed.add(key)
        if (arch, i) in NOT_EXACT:
            assert key not in found, (arch, key, NOT_EXACT[arch, i])
            _assert_not_exact(model, ids, key)
        else:
            assert key in found, (arch, key, sorted(found))
    left_out = {(s, b) for s, b in found if (s, b) not in listed}
    expected = {(_full(model, s), tuple(_full(model, x) for x in b)) for s, b in LEFT_OUT[arch]}
    assert left_out == expected, (arch, sorted(left_out))


def _full(model: nn.Module, suffix: str) -> str:
    (name,) = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    return name


def _assert_not_exact(model: nn.Module, ids: Tensor, key: tuple[str, tuple[str, ...]]) -> None:
    """Scaling the mapping's modules by names (when the smooth layer has parameters) changes
    the logits far beyond rounding."""
    modules = dict(model.named_modules())
    smooth = modules[key[0]]
    if not list(smooth.parameters(recurse=False)):
        return  # an activation module: the tools insert a scaling module, no weight moves
    width = modules[key[1][0]].weight.shape[0 if type(modules[key[1][0]]).__name__ == "Conv1D"
                                              else 1]  # fmt: skip
    group = {
        "smooth_channels": {key[0]: list(range(width))},
        "balance_channels": {name: list(range(width)) for name in key[1]},
    }
    twin = copy.deepcopy(model)
    before = logits(twin, ids)
    scale_by_names(twin, group, torch.exp(torch.randn(width, dtype=DTYPE)))
    assert rel_change(before, logits(twin, ids)) > 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_random_scales_on_every_exported_group_keep_the_logits(arch):
    model, ids = build(arch)
    structure = gaugefix.discover(model, ids)
    groups = json.loads(json.dumps(structure.scale_groups()))  # what a tool reads
    assert groups
    before = logits(model, ids)
    gen = torch.Generator().manual_seed(2)
    for group in groups:
        scales = torch.exp(torch.randn(len(group["generators"]), generator=gen, dtype=DTYPE))
        scale_by_names(model, group, scales)
        assert rel_change(before, logits(model, ids)) <= TOL, group["smooth_layer"]


def test_no_groups_without_smoothing_generators():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    structure = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    assert structure.scale_groups() == []


def test_inspect_prints_the_scale_groups_as_json():
    result = CliRunner().invoke(app, ["inspect", "transformer", "--scale-groups"])
    assert result.exit_code == 0, result.output
    factory, shape = EXAMPLES["transformer"]
    expected = gaugefix.discover(factory().eval(), torch.randn(shape)).scale_groups()
    assert json.loads(result.stdout) == expected and expected
    assert ("norm2", ["ff1"]) in [(g["smooth_layer"], g["balance_layers"]) for g in expected]


def test_inspect_scale_groups_with_save_keeps_stdout_json(tmp_path):
    """``--save`` says where it wrote the structure on stderr: stdout stays one JSON document."""
    path = tmp_path / "structure.json"
    result = CliRunner().invoke(app, ["inspect", "mlp", "--scale-groups", "--save", str(path)])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), list) and path.exists()
    assert f"structure written to {path}" in result.stderr
