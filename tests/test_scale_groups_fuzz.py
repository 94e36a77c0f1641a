"""Fuzz of ``structure.scale_groups()`` over the Hugging Face architectures of the installed
``transformers``: every causal-LM and masked-LM model of its auto mappings, built from a tiny
config (no downloads) in float64 with perturbed weights and discovered on token ids.

Each exported group is applied as a SmoothQuant/AWQ-style tool applies it (llm-compressor's
mapping convention, ``apply_like_a_tool``: the smooth modules' ``weight`` and ``bias`` divided
per output channel, the balance modules' ``weight`` multiplied per input channel) with random
positive scales, and must (1) move every parameter exactly as the gauge ``h = -log s`` of its
generators does (``apply_gauge_``), and (2) keep the logits to ``1e-10`` relative on two batch
and sequence sizes other than the discovery's, computed in float64 throughout (a cast to float32
inside, a norm's or a router's, stays float64). Completeness: a generator no group covers whose
action alone is such a tool action (:func:`tool_expressible`) is a missed group.

A representative subset runs by default; ``GAUGEFIX_FUZZ_SCALE_GROUPS=1`` sweeps every model of
the mappings (architectures that do not build from the tiny config, or do not run in float64,
are skipped with the reason; ``pytest -rs`` lists them).
"""

from __future__ import annotations

import copy
import inspect
import json
import os

import pytest
import torch
from torch import Tensor, nn

import gaugefix
import test_scale_groups
from architectures import rel_change
from gaugefix.precision import Float64Throughout
from test_scale_groups_audit import apply_like_a_tool

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
VOCAB = 40
DISCOVERY = (2, 7)  # batch, sequence length of the example token ids
CHECKS = ((3, 9), (1, 5))  # other sizes the logits are compared on
MAX_PARAMETERS = 2_000_000  # a tiny config's model is far smaller
EXPERTS = 4  # experts per MoE layer, every token routed to all of them
# Tiny sizes by config field (any alias a config takes is set).
TINY = {
    "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 24, "head_dim": 4,
    "max_position_embeddings": 64, "embedding_size": 16, "ffn_dim": 24, "moe_intermediate_size": 8,
    "shared_expert_intermediate_size": 8,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS, "top_k": EXPERTS, "moe_topk": EXPERTS, "n_group": 1,
    "topk_group": 1, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
    "decoder_start_token_id": 0, "tie_word_embeddings": False,
    "d_model": 16, "dim_model": 16, "n_embd": 16, "d_ff": 24, "dim_ff": 24, "n_inner": 24,
    "ffn_hidden_size": 24, "d_kv": 4, "dim_head": 4, "kv_channels": 4, "num_layers": 2,
    "n_layer": 2, "num_decoder_layers": 1, "encoder_layers": 1, "decoder_layers": 1,
    "num_heads": 4, "n_head": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 24, "decoder_ffn_dim": 24, "n_positions": 64, "rotary_dim": 2,
}  # fmt: skip
# Multi-head latent attention's sizes (low-rank query and key-value projections, a rotary and a
# plain part of each query/key head, as many key-value heads as query heads), by model type.
MLA = {
    "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
    "v_head_dim": 4, "num_key_value_heads": 4,
}  # fmt: skip
# A hybrid's layers: one linear-attention (or Mamba) layer, then one attention layer.
HYBRID = {"layer_types": ["linear_attention", "full_attention"]}
JAMBA = {"attn_layer_period": 2, "attn_layer_offset": 1}
# Sizes only these types take; set for them alone (``v_head_dim`` or ``layer_types`` set for
# every type would change the configs of types that build without them).
TINY_BY_TYPE = {
    **dict.fromkeys(
        ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "youtu", "minicpm3",
         "sarvam_mla", "longcat_flash", "glm_moe_dsa", "axk1", "axk2"],
        MLA,
    ),
    **dict.fromkeys(["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"], HYBRID),
    "jamba": JAMBA,
}  # fmt: skip
# The representative subset run by default (the full sweep: GAUGEFIX_FUZZ_SCALE_GROUPS=1).
SUBSET = [
    "gpt2", "llama", "bert", "phi", "falcon", "gpt_neox", "qwen2_moe", "opt", "convbert",
    "deepseek_v2", "jamba",
]  # fmt: skip
# Generators a tool could apply that no group covers, by architecture, with the reason (none).
MISSED: dict[str, str] = {}


def architectures() -> list[str]:
    """Every model type of the causal-LM and masked-LM auto mappings, or the subset."""
    every = sorted(
        set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        | set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    )
    if os.environ.get("GAUGEFIX_FUZZ_SCALE_GROUPS"):
        return every
    return [a for a in SUBSET if a in every]


def tiny_config(model_type: str):
    """The config of ``model_type`` with the :data:`TINY` sizes (and its own
    :data:`TINY_BY_TYPE` ones) it takes, by field or alias."""
    config_cls = transformers.CONFIG_MAPPING[model_type]
    fields = inspect.signature(config_cls.__init__).parameters
    aliases = getattr(config_cls, "attribute_map", {})
    kwargs = {}
    for key, value in {**TINY, **TINY_BY_TYPE.get(model_type, {})}.items():
        name = key if key in fields else aliases.get(key)
        if name in fields:
            kwargs[name] = value
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    return config


def build(model_type: str) -> nn.Module:
    """A float64 eval-mode model of ``model_type`` (causal LM, else masked LM) with every
    parameter moved off its initial value; skipped with the reason when it does not build."""
    mapping = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type not in mapping:
        mapping = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    cls_name = mapping[model_type]
    cls_name = cls_name[0] if isinstance(cls_name, (list, tuple)) else cls_name
    torch.manual_seed(0)
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):  # sized first: a config that kept its full sizes is skipped
            size = sum(p.numel() for p in getattr(transformers, cls_name)(config).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"{size} parameters: the tiny sizes did not take")
        model = getattr(transformers, cls_name)(config).to(DTYPE).eval()
    except Exception as error:  # noqa: BLE001 - any failure to build is a skip with its reason
        pytest.skip(f"{cls_name} does not build from a tiny config: {_short(error)}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def token_ids(size: tuple[int, int], seed: int) -> Tensor:
    return torch.randint(1, VOCAB, size, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    """The model's logits on ``ids``, computed in float64 throughout."""
    with torch.no_grad(), Float64Throughout():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


def discovered(model: nn.Module) -> gaugefix.GaugeStructure:
    """The structure on the discovery ids; skipped when the model does not run in float64 on
    them, or ``discover`` refuses it (a clear error, not a wrong group)."""
    ids = token_ids(DISCOVERY, 1)
    try:
        logits(model, ids)
        for size, seed in zip(CHECKS, (2, 3), strict=True):
            logits(model, token_ids(size, seed))
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"does not run in float64 on token ids: {_short(error)}")
    try:
        return gaugefix.discover(model, input_ids=ids, allow_value_dependent=True)
    except gaugefix.GaugefixError as error:
        pytest.skip(f"discover refuses it: {_short(error)}")


def gauge_of(structure: gaugefix.GaugeStructure, group: dict, scales: Tensor) -> Tensor:
    """``h = -log s`` on the group's generators, 0 elsewhere (``[num_generators]``)."""
    h = torch.zeros(structure.num_generators, dtype=DTYPE)
    h[torch.tensor(group["generators"])] = -scales.log()
    return h


def params_apart(a: nn.Module, b: nn.Module) -> tuple[float, str]:
    """The largest relative difference of one parameter of ``a`` and ``b``, and its name."""
    other = dict(b.named_parameters())
    return max(
        (
            (rel_change(p.detach(), other[n].detach()), n)
            for n, p in a.named_parameters()
            if p.numel()
        ),
        default=(0.0, ""),
    )


def group_changes(model: nn.Module, structure, group: dict, scales: Tensor) -> tuple:
    """The tool's action of ``group`` against the gauge's: their parameters' largest relative
    difference, and the logits' relative change on each of :data:`CHECKS`."""
    tool, gauge = copy.deepcopy(model), copy.deepcopy(model)
    apply_like_a_tool(tool, group, scales)
    gaugefix.apply_gauge_(gauge, structure, gauge_of(structure, group, scales))
    changes = [
        rel_change(logits(model, token_ids(size, seed)), logits(tool, token_ids(size, seed)))
        for size, seed in zip(CHECKS, (2, 3), strict=True)
    ]
    return params_apart(tool, gauge), changes


@pytest.mark.parametrize("arch", architectures())
def test_every_exported_group_is_the_gauge_and_keeps_the_logits(arch):
    model = build(arch)
    structure = discovered(model)
    try:
        groups = json.loads(json.dumps(structure.scale_groups()))
    except ValueError as error:  # a structure whose traced path left parameters unused
        pytest.skip(f"scale_groups refuses it: {_short(error)}")
    gen = torch.Generator().manual_seed(5)
    for group in groups:
        n = len(group["generators"])
        for scales in (
            torch.exp(torch.randn(n, generator=gen, dtype=DTYPE)),
            2.0 ** torch.randint(-3, 4, (n,), generator=gen).to(DTYPE),  # exact in every format
        ):
            (apart, name), changes = group_changes(model, structure, group, scales)
            assert apart <= TOL, (group["smooth_layer"], group["balance_layers"], name, apart)
            assert max(changes) <= TOL, (group["smooth_layer"], changes)


# -- completeness ---------------------------------------------------------------------------------
def _transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding)


def _channel_vector(w: Tensor, dim: int) -> Tensor | None:
    """``w`` (integer exponents) as one vector along ``dim``, or None where it varies along
    another dim."""
    first = w.select(dim, 0) if w.dim() > 1 else None
    vector = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    if first is not None and not (vector == vector[:, :1]).all():
        return None
    return vector[:, 0]


def tool_expressible(model: nn.Module, exponents: dict[str, Tensor]) -> bool:
    """Whether the generator with per-parameter exponents ``exponents`` (``w_n(e)``, by
    parameter name) is a tool's action: ``+1`` only on output channels of modules' ``weight``
    and ``bias``, the same on each of a module's two, ``-1`` only on input channels of a
    ``weight`` of 2 or more dims (not a grouped convolution), both sides present, no tensor
    held by two modules."""
    modules = dict(model.named_modules())
    holders: dict[int, int] = {}
    for module in modules.values():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    outs: dict[str, dict[str, Tensor]] = {}
    balanced = False
    for name, w in exponents.items():
        if not w.any():
            continue
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner) if owner else None
        param = getattr(module, leaf, None) if module is not None else None
        if leaf not in ("weight", "bias") or param is None or holders[id(param)] > 1:
            return False
        if w.ge(0).all():
            dim = 1 if _transposed(module) and w.dim() == 2 else 0
            vector = _channel_vector(w, dim)
            if vector is None or vector.gt(1).any():
                return False
            outs.setdefault(owner, {})[leaf] = vector
        elif w.le(0).all():
            if leaf != "weight" or w.dim() < 2 or getattr(module, "groups", 1) != 1:
                return False
            vector = _channel_vector(w, 0 if type(module).__name__ == "Conv1D" else 1)
            if vector is None or vector.lt(-1).any() or owner in outs:
                return False
            balanced = True
        else:
            return False
    return balanced and bool(outs) and all(_divides_all(modules[m], f) for m, f in outs.items())


def _divides_all(module: nn.Module, found: dict[str, Tensor]) -> bool:
    """A tool divides the ``weight`` of a smooth module, and its ``bias``, by one channel map."""
    if not isinstance(getattr(module, "weight", None), Tensor):
        return False
    leaves = [leaf for leaf in ("weight", "bias") if getattr(module, leaf, None) is not None]
    vectors = [found.get(leaf) for leaf in leaves]
    return all(v is not None for v in vectors) and all(
        v.shape == vectors[0].shape and bool((v == vectors[0]).all()) for v in vectors
    )


def exponents_of(model: nn.Module, structure, n: int) -> dict[str, Tensor]:
    """``w_n(e)`` of every parameter, read off ``apply_gauge_`` of ``h = e_n`` on ones."""
    ones = copy.deepcopy(model)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    h = torch.zeros(structure.num_generators, dtype=DTYPE)
    h[n] = 1.0
    gaugefix.apply_gauge_(ones, structure, h)
    return {name: p.detach().log().round().long() for name, p in ones.named_parameters()}


def missed(model: nn.Module, structure, groups: list) -> list[int]:
    """The generators no group covers whose action alone a tool could apply."""
    covered = {n for g in groups for n in g["generators"]}
    return [
        n
        for n in range(structure.num_generators)
        if n not in covered and tool_expressible(model, exponents_of(model, structure, n))
    ]


SAMPLED = 24  # covered generators whose tool action is checked, per architecture


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=MISSED[a]))
        if a in MISSED
        else a
        for a in architectures()
    ],
)
def test_groups_cover_every_generator_a_tool_could_apply(arch):
    """No generator outside the groups is a tool's action alone (none missed), and every
    sampled one inside is (the check can tell them apart)."""
    model = build(arch)
    structure = discovered(model)
    try:
        groups = structure.scale_groups()
    except ValueError as error:
        pytest.skip(f"scale_groups refuses it: {_short(error)}")
    covered = sorted({n for g in groups for n in g["generators"]})
    sample = covered[:: max(1, len(covered) // SAMPLED)]
    assert all(tool_expressible(model, exponents_of(model, structure, n)) for n in sample)
    assert missed(model, structure, groups) == []


class NormedEmbedding(nn.Module):
    """Token ids -> ``LlamaRMSNorm`` of their embeddings (which casts to float32 and back), as
    a causal LM's output: ``[batch, tokens]`` -> logits ``[batch, tokens, 16]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(16, eps=1e-6)

    def forward(self, input_ids: Tensor) -> CausalLMOutput:
        return CausalLMOutput(logits=self.norm(self.embed(input_ids)))


@pytest.mark.parametrize("helper", ["fuzz", "registries"])
def test_logits_keep_float64_digits_through_a_float32_cast(helper):
    """The logits both scale-group tests compare are computed in float64 throughout: the
    norm's float32 cast keeps float64's digits (``x / sqrt(mean(x^2) + eps)``)."""
    torch.manual_seed(0)
    model = NormedEmbedding().to(DTYPE).eval()
    ids = token_ids(CHECKS[0], 2)
    x = model.embed.weight.detach()[ids]
    exact = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    run = logits if helper == "fuzz" else test_scale_groups.logits
    assert rel_change(exact, run(model, ids)) <= 1e-14


def test_the_checks_tell_a_wrong_group():
    """A group whose balance channels are permuted (a wrong map) moves parameters off the
    gauge and changes the logits; so does a smooth module's generator left out."""
    model = build("llama")
    structure = discovered(model)
    group = next(
        g for g in structure.scale_groups() if g["balance_layers"][0].endswith("down_proj")
    )
    scales = torch.exp(torch.randn(len(group["generators"]), dtype=DTYPE))
    permuted = copy.deepcopy(group)
    for name, positions in permuted["balance_channels"].items():
        permuted["balance_channels"][name] = positions[::-1]
    (apart, _), changes = group_changes(model, structure, permuted, scales)
    assert apart > 1e-3 and min(changes) > 1e-3
    exps = exponents_of(model, structure, group["generators"][0])
    assert tool_expressible(model, exps)
    exps.pop(next(name for name, w in exps.items() if w.gt(0).any()))  # its smooth side lost
    assert not tool_expressible(model, exps)
