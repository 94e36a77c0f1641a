"""The exported scale groups where a user runs the model: a structure discovered on plain token
ids keeps the logits, to ``1e-10`` relative in float64, under every group applied alone as a
SmoothQuant/AWQ-style tool applies it (``apply_like_a_tool``, random positive scales) and all of
them at once, on

- attention masks with right and left padding (logits compared where the mask is 1),
- a sequence of 40 tokens (the discovery's has 7),
- a key-value cache: a prompt, then one-token decode steps on the cache it returns,
- ``token_type_ids`` with two segments, where the model takes them;

and so does a structure discovered *with* a padded mask, used without one; a top-2-of-4 routed
mixture of experts discovered on a batch that reaches every expert; and a model whose output
embedding is its input embedding (tied), where the final norm's group into the output
embedding is no longer a gauge and is the one group dropped. The models are the fuzz's tiny
float64 ones (``test_scale_groups_fuzz``); each check is shown to fail on a wrong group.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gaugefix
import test_scale_groups_fuzz as fuzz
from architectures import rel_change
from gaugefix.precision import Float64Throughout
from test_scale_groups_audit import apply_like_a_tool

transformers = pytest.importorskip("transformers")
from transformers.models.auto import modeling_auto  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL = fuzz.DTYPE, fuzz.TOL
PADDED = (3, 9)  # batch, length of the padded batch
LONG = (2, 40)  # a sequence far longer than the discovery's
PROMPT, STEPS = 5, 3  # prompt length, then one-token decode steps on the cache
ROUTED = 2  # experts per token in the routed mixture of experts (of fuzz.EXPERTS)
ROUTING_IDS = (4, 16)  # a batch whose tokens reach every expert
# One of each kind: Conv1D, gated MLP, encoder with token types, MLA, Mamba/attention hybrid.
ARCHS = ["gpt2", "llama", "bert", "deepseek_v2", "jamba"]
MOE_ARCHS = ["qwen2_moe"]
TIED_ARCHS = ["gpt2", "llama", "bert"]
# Attention that sees every token (bert's causal-LM head without is_decoder): a cached decode
# step is no continuation of the prompt there.
BIDIRECTIONAL = {"bert"}

Run = Callable[[nn.Module], Tensor]


def _logits(model: nn.Module, **inputs) -> Tensor:
    with torch.no_grad(), Float64Throughout():
        return model(**inputs).logits


def padding_mask() -> Tensor:
    """Row 0 padded on the right, row 1 on the left, row 2 not padded."""
    mask = torch.ones(PADDED, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, :3] = 0
    return mask


def padded(model: nn.Module) -> Tensor:
    mask = padding_mask()
    out = _logits(model, input_ids=fuzz.token_ids(PADDED, 11), attention_mask=mask)
    return out[mask.bool()]


def longer(model: nn.Module) -> Tensor:
    return _logits(model, input_ids=fuzz.token_ids(LONG, 12))


def decode_ids() -> Tensor:
    return fuzz.token_ids((2, PROMPT + STEPS), 13)


def decoded(model: nn.Module) -> Tensor:
    """The prompt's logits, then each decode step's, run on the cache of the step before."""
    ids = decode_ids()
    with torch.no_grad(), Float64Throughout():
        out = model(input_ids=ids[:, :PROMPT], use_cache=True)
        steps = [out.logits]
        for t in range(PROMPT, PROMPT + STEPS):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


def typed(model: nn.Module) -> Tensor:
    types = torch.zeros(PADDED, dtype=torch.long)
    types[:, 5:] = 1
    return _logits(model, input_ids=fuzz.token_ids(PADDED, 14), token_type_ids=types)


def uses(model: nn.Module, arch: str) -> dict[str, Run]:
    """The uses ``model`` has: a cache where it is a causal LM that attends to earlier tokens
    only, token types where it takes them."""
    runs = {"padded": padded, "longer": longer}
    if arch in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and arch not in BIDIRECTIONAL:
        runs["decoded"] = decoded
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        runs["typed"] = typed
    return runs


def applied(model: nn.Module, groups: list, scales: list[Tensor]) -> nn.Module:
    twin = copy.deepcopy(model)
    for group, s in zip(groups, scales, strict=True):
        apply_like_a_tool(twin, group, s)
    return twin


def worst_change(model: nn.Module, groups: list, runs: dict[str, Run]) -> dict[str, float]:
    """Per use, the largest relative change of the logits over each group applied alone with
    random scales, and all groups applied at once."""
    gen = torch.Generator().manual_seed(7)
    scales = [
        torch.exp(torch.randn(len(g["generators"]), generator=gen, dtype=DTYPE)) for g in groups
    ]
    twins = [applied(model, [g], [s]) for g, s in zip(groups, scales, strict=True)]
    twins.append(applied(model, groups, scales))
    return {
        name: max(rel_change(run(model), run(twin)) for twin in twins) for name, run in runs.items()
    }


def half_balanced(group: dict) -> dict:
    """``group`` with only the first half of its balance modules, none of a group with one
    (a wrong group: the scales its smooth modules divide by are not all multiplied back)."""
    names = sorted(group["balance_channels"])[: len(group["balance_channels"]) // 2]
    return {**group, "balance_channels": {n: group["balance_channels"][n] for n in names}}


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_keep_the_logits_on_masks_long_inputs_caches_and_token_types(arch):
    model = fuzz.build(arch)
    structure = fuzz.discovered(model)
    runs = uses(model, arch)
    assert worst_change(model, structure.scale_groups(), runs) == pytest.approx(
        dict.fromkeys(runs, 0.0), abs=TOL
    )


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in BIDIRECTIONAL])
def test_the_decode_steps_continue_the_prompt(arch):
    """The cached decode is the whole sequence's forward, so the check runs the cache."""
    model = fuzz.build(arch)
    assert "decoded" in uses(model, arch)
    assert rel_change(_logits(model, input_ids=decode_ids()), decoded(model)) <= TOL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_groups_discovered_on_a_padded_mask_keep_the_logits_without_one(arch):
    model = fuzz.build(arch)
    ids = fuzz.token_ids(fuzz.DISCOVERY, 1)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    structure = gaugefix.discover(
        model, input_ids=ids, attention_mask=mask, allow_value_dependent=True
    )
    runs = {
        **uses(model, arch),
        **{
            f"plain {size}": (lambda m, size=size: _logits(m, input_ids=fuzz.token_ids(size, 15)))
            for size in fuzz.CHECKS
        },
    }
    assert worst_change(model, structure.scale_groups(), runs) == pytest.approx(
        dict.fromkeys(runs, 0.0), abs=TOL
    )


def experts_reached(model: nn.Module, ids: Tensor) -> set[tuple[int, int]]:
    """``(layer, expert)`` of every expert among some token's top :data:`ROUTED`."""
    with torch.no_grad(), Float64Throughout():
        routers = model(input_ids=ids, output_router_logits=True).router_logits
    return {
        (layer, int(e))
        for layer, r in enumerate(routers)
        for e in r.topk(ROUTED, dim=-1).indices.unique()
    }


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routed_experts_groups_keep_the_logits(arch, monkeypatch):
    for key in ("num_experts_per_tok", "top_k", "moe_topk"):
        monkeypatch.setitem(fuzz.TINY, key, ROUTED)
    model = fuzz.build(arch)
    assert model.config.num_experts_per_tok == ROUTED
    ids = fuzz.token_ids(ROUTING_IDS, 22)
    layers = model.config.num_hidden_layers
    assert experts_reached(model, ids) == {
        (i, e) for i in range(layers) for e in range(fuzz.EXPERTS)
    }
    structure = gaugefix.discover(model, input_ids=ids, allow_value_dependent=True)
    runs = {
        **uses(model, arch),
        "fresh": lambda m: _logits(m, input_ids=fuzz.token_ids((3, 11), 23)),
    }
    assert worst_change(model, structure.scale_groups(), runs) == pytest.approx(
        dict.fromkeys(runs, 0.0), abs=TOL
    )


def output_embedding_name(model: nn.Module) -> str:
    out = model.get_output_embeddings()
    return next(name for name, m in model.named_modules() if m is out)


def _key(group: dict) -> tuple:
    return group["smooth_layer"], tuple(group["balance_layers"])


@pytest.mark.parametrize("arch", TIED_ARCHS)
def test_tied_embeddings_drop_the_output_embeddings_group_alone(arch, monkeypatch):
    untied = fuzz.build(arch)
    untied_groups = fuzz.discovered(untied).scale_groups()
    monkeypatch.setitem(fuzz.TINY, "tie_word_embeddings", True)
    model = fuzz.build(arch)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    groups = fuzz.discovered(model).scale_groups()
    head = output_embedding_name(model)
    into_head = [g for g in untied_groups if head in g["balance_layers"]]
    assert len(into_head) == 1
    assert sorted(map(_key, groups)) == sorted(_key(g) for g in untied_groups if g not in into_head)
    runs = {
        **uses(model, arch),
        "discovery": lambda m: _logits(m, input_ids=fuzz.token_ids(fuzz.DISCOVERY, 1)),
    }
    assert worst_change(model, groups, runs) == pytest.approx(dict.fromkeys(runs, 0.0), abs=TOL)
    # the dropped group is no gauge of the tied model: its scales move the embeddings too
    assert min(worst_change(model, into_head, runs).values()) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_checks_tell_a_group_applied_to_half_its_balance_modules(arch):
    model = fuzz.build(arch)
    structure = fuzz.discovered(model)
    group = max(structure.scale_groups(), key=lambda g: len(g["balance_channels"]))
    runs = uses(model, arch)
    assert min(worst_change(model, [half_balanced(group)], runs).values()) > 1e-3
