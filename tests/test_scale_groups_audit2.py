"""Second audit of ``structure.scale_groups()`` and of the zoo models it is shown on.

The oracle is written here from the exported JSON alone: for each group, divide every smooth
module's ``weight`` (output channels: dim 1 for Hugging Face's ``Conv1D`` and embeddings, else
dim 0) and ``bias`` by random positive scales, multiply every balance module's ``weight`` along
its input channels (dim 0 for ``Conv1D``, else dim 1), and compare float64 outputs on fresh
inputs of another shape than the discovery's (1e-10), group by group and all groups at once.
Covered here and not in the earlier files: modules whose ``bias`` (or another parameter) is not
scaled with their ``weight`` rows, Hugging Face families with fused or multi-query attention,
shared layers, post-norm and projected heads, the zoo's models, restricted and reloaded
structures, frozen parameters and wrapped models.
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
from gaugefix import zoo
from gaugefix.precision import Float64Throughout

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10


def _transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its 2-D weight ``[in, out]`` (``Conv1D``, embeddings)."""
    return type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding)


@torch.no_grad()
def apply_from_json(model: nn.Module, group: dict, scales: Tensor) -> None:
    """A SmoothQuant/AWQ-style tool's action of ``group`` (plain JSON data) with ``scales``
    (``[len(generators)]``): smooth modules' weight and bias divided per output channel,
    balance modules' weight multiplied per input channel (position ``-1``: factor 1)."""
    modules = dict(model.named_modules())
    s = torch.cat([scales, scales.new_ones(1)])
    for name, positions in group["smooth_channels"].items():
        module = modules[name]
        for leaf in ("weight", "bias"):
            p = getattr(module, leaf, None)
            if p is not None:
                shape = [1] * p.dim()
                shape[1 if _transposed(module) and p.dim() == 2 else 0] = -1
                p.div_(s[torch.tensor(positions)].view(shape))
    for name, positions in group["balance_channels"].items():
        module = modules[name]
        shape = [1] * module.weight.dim()
        shape[0 if _transposed(module) else 1] = -1
        module.weight.mul_(s[torch.tensor(positions)].view(shape))


def changes(model: nn.Module, run, groups: list) -> tuple[list[float], float]:
    """The relative output change of each group applied alone with random scales (after a
    JSON round trip), and of all of them applied together."""
    groups = json.loads(json.dumps(groups))
    before, together = run(model), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    each = []
    for group in groups:
        scales = torch.exp(torch.randn(len(group["generators"]), generator=gen, dtype=DTYPE))
        twin = copy.deepcopy(model)
        apply_from_json(twin, group, scales)
        apply_from_json(together, group, scales)
        each.append(rel_change(before, run(twin)))
    return each, rel_change(before, run(together))


def assert_exact(model: nn.Module, run, groups: list) -> None:
    each, together = changes(model, run, groups)
    assert max(each, default=0.0) <= TOL and together <= TOL, (each, together)


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` in float64 and eval mode, every parameter moved off its initial value."""
    torch.manual_seed(0)
    model = model.to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def on(x: Tensor):
    def run(model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model(x)

    return run


def pairs(groups: list) -> list[tuple]:
    return [(g["smooth_layer"], g["balance_layers"]) for g in groups]


VECTORS = torch.randn(5, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
FRESH = torch.randn(7, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(4))


# -- smooth modules whose weight and bias a tool divides together ---------------------------------
class TwoWeights(nn.Module):
    """A module with a ``proj`` ``[6, 8]`` registered before its ``weight`` ``[6, 8]`` and
    ``bias``: both read the input, a tool scales only ``weight`` and ``bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(6, 8))
        self.weight, self.bias = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.linear(x, self.proj), F.linear(x, self.weight, self.bias)


class ReadsTwoWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m, self.head, self.head2 = TwoWeights(), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.m(x)
        return self.head(F.relu(b)) + self.head2(F.relu(a))


class BiasElsewhere(nn.Module):
    """``m``'s rows make ReLU neurons; its ``bias`` is added to ``a``'s channels instead."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.m = nn.Linear(8, 6), nn.Linear(8, 6)
        self.h1, self.h2 = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(F.linear(x, self.m.weight))
        return self.h1(y) + self.h2(F.relu(self.a(x) + self.m.bias))


class FlippedBias(nn.Module):
    """``m``'s bias added in reverse order: channel ``j`` gets ``bias[5 - j]``."""

    def __init__(self) -> None:
        super().__init__()
        self.m, self.h = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(F.relu(F.linear(x, self.m.weight) + self.m.bias.flip(0)))


SPLIT_PARAMS = {  # model, the groups that must remain (smooth layer, balance layers)
    "weight after another parameter": (ReadsTwoWeights, [("m", ["head"])]),
    "bias on other channels": (BiasElsewhere, []),
    "bias in another order": (FlippedBias, []),
}


@pytest.mark.parametrize("case", list(SPLIT_PARAMS))
def test_a_smooth_module_divides_its_weight_and_bias_on_the_channels_the_group_scales(case):
    """A tool divides a smooth module's ``weight`` rows and ``bias`` by the channel map. The
    map was read off the module's first producing parameter (``proj``: 6 entries of -1, the
    rows left unscaled, 1.8 relative change), and a ``bias`` the generator does not multiply on
    those channels was divided with the rows (0.55 and 1.1)."""
    factory, expected = SPLIT_PARAMS[case]
    model = perturbed(factory())
    groups = gaugefix.discover(model, VECTORS).scale_groups()
    assert pairs(groups) == expected
    assert_exact(model, on(FRESH), groups)


class SharedBias(nn.Module):
    """Two LayerNorms sharing one ``bias`` tensor (``ln2.bias = ln1.bias``), summed."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.ln2.bias = self.ln1.bias
        self.p, self.h = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(self.ln1(x) + self.ln2(self.p(x)))


def test_a_tensor_shared_by_two_smooth_modules_is_not_divided_twice():
    """A tool dividing both modules divided the shared bias twice (0.23 relative change): its
    generators now give no group (the structure records ln2.bias as ln1.bias's alias)."""
    model = perturbed(SharedBias())
    groups = gaugefix.discover(model, VECTORS).scale_groups()
    assert_exact(model, on(FRESH), groups)


class EmbeddedStream(nn.Module):
    """Token and position embeddings summed into an unnormalised residual stream with a ReLU
    MLP, read by a head: the stream's group has both embeddings (``[in, out]``) and the MLP's
    output layer as smooth layers."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, 6), nn.Embedding(9, 6)
        self.fc1, self.fc2, self.head = nn.Linear(6, 10), nn.Linear(10, 6), nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(x + self.fc2(F.relu(self.fc1(x))))


def test_embeddings_writing_a_residual_stream_are_smooth_layers():
    model = perturbed(EmbeddedStream())
    g = torch.Generator().manual_seed(1)
    groups = gaugefix.discover(model, torch.randint(0, 11, (2, 5), generator=g)).scale_groups()
    assert pairs(groups) == [(["fc2", "pos", "tok"], ["fc1", "head"]), ("fc1", ["fc2"])]
    assert_exact(model, on(torch.randint(0, 11, (3, 8), generator=g)), groups)


class Trigram(nn.Module):
    """MobileBERT's trigram input: the embedded sequence shifted by -1, 0 and +1 concatenated
    on channels, then projected. The structure scales the whole ``tok`` output by one factor
    (a term of index shape ``(1, 1)``) against every column of ``proj``; ``embed``: ``tok`` is
    an embedding of ids, else a ``Linear`` with bias of vectors."""

    def __init__(self, embed: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 4) if embed else nn.Linear(8, 4)
        self.proj, self.head = nn.Linear(12, 6), nn.Linear(6, 11)

    def forward(self, x: Tensor) -> Tensor:
        x = self.tok(x)
        ahead, behind = F.pad(x[:, 1:], [0, 0, 0, 1]), F.pad(x[:, :-1], [0, 0, 1, 0])
        return self.head(F.relu(self.proj(torch.cat([ahead, x, behind], dim=2))))


@pytest.mark.parametrize("embed", [True, False])
def test_one_factor_on_a_whole_tensor_is_a_group_with_every_channel_on_it(embed):
    """Before, the whole-tensor generator gave no group (only ``proj -> head``)."""
    model = perturbed(Trigram(embed))
    g = torch.Generator().manual_seed(1)
    if embed:
        x, fresh = (torch.randint(0, 11, size, generator=g) for size in ((2, 5), (3, 8)))
    else:
        x, fresh = (torch.randn(*size, 8, generator=g, dtype=DTYPE) for size in ((2, 5), (3, 8)))
    structure = gaugefix.discover(model, x)
    groups = structure.scale_groups()
    assert pairs(groups) == [("tok", ["proj"]), ("proj", ["head"])]
    assert groups[0]["smooth_channels"] == {"tok": [0] * 4}
    assert groups[0]["balance_channels"] == {"proj": [0] * 12}
    assert_exact(model, on(fresh), groups)
    scales = torch.tensor([1.7], dtype=DTYPE)
    tool, gauge = copy.deepcopy(model), copy.deepcopy(model)
    apply_from_json(tool, json.loads(json.dumps(groups[0])), scales)
    h = torch.zeros(structure.num_generators, dtype=DTYPE)
    h[groups[0]["generators"]] = -scales.log()
    gaugefix.apply_gauge_(gauge, structure, h)
    for (name, a), b in zip(tool.named_parameters(), gauge.parameters(), strict=True):
        assert rel_change(a.detach(), b.detach()) <= TOL, name


# -- Hugging Face families beyond the earlier files -----------------------------------------------
COMMON = {"vocab_size": 40, "bos_token_id": 0, "eos_token_id": 0}
LLAMA_LIKE = {
    "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "max_position_embeddings": 32,
}  # fmt: skip
# family: (model class, config class, config, a (smooth layer, balance layer) pair that must be
# exported, by name suffix)
HF = {
    "gpt-j": ("GPTJForCausalLM", "GPTJConfig",
              {"n_layer": 1, "n_embd": 16, "n_head": 4, "rotary_dim": 2, "n_positions": 32},
              ("ln_1", "mlp.fc_in")),
    "codegen (fused qkv, mp_num layout)": (
        "CodeGenForCausalLM", "CodeGenConfig",
        {"n_layer": 1, "n_embd": 16, "n_head": 4, "rotary_dim": 2, "n_positions": 32, "n_ctx": 32},
        ("attn.qkv_proj", "attn.out_proj")),
    "gpt-bigcode (multi-query, fused Linear)": (
        "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
        {"n_layer": 1, "n_embd": 16, "n_head": 4, "n_positions": 32, "multi_query": True,
         "activation_function": "relu"},
        ("attn.c_attn", "attn.c_proj")),
    "llama (one kv head, biases, relu)": (
        "LlamaForCausalLM", "LlamaConfig",
        {**LLAMA_LIKE, "num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True,
         "tie_word_embeddings": False, "hidden_act": "relu"},
        ("mlp.gate_proj", "mlp.down_proj")),
    "mpt (LayerNorm without bias)": (
        "MptForCausalLM", "MptConfig",
        {"n_layers": 1, "d_model": 16, "n_heads": 4, "max_seq_len": 32, "no_bias": True},
        ("norm_1", "attn.Wqkv")),
    "opt (post-norm, projected head)": (
        "OPTForCausalLM", "OPTConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "ffn_dim": 32, "num_attention_heads": 4,
         "max_position_embeddings": 32, "word_embed_proj_dim": 8, "do_layer_norm_before": False},
        ("final_layer_norm", "project_out")),
    "albert (one layer shared by two)": (
        "AlbertForMaskedLM", "AlbertConfig",
        {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
         "num_attention_heads": 4, "embedding_size": 8, "max_position_embeddings": 32,
         "hidden_act": "relu"},
        ("albert_layers.0.ffn", "albert_layers.0.ffn_output")),
    "t5 (relu, tied)": (
        "T5ForConditionalGeneration", "T5Config",
        {"num_layers": 1, "num_decoder_layers": 1, "d_model": 16, "d_kv": 4, "d_ff": 24,
         "num_heads": 4, "decoder_start_token_id": 0},
        ("DenseReluDense.wi", "DenseReluDense.wo")),
    "falcon (biases, alibi, sequential)": (
        "FalconForCausalLM", "FalconConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 4, "bias": True,
         "alibi": True, "parallel_attn": False},
        ("post_attention_layernorm", "mlp.dense_h_to_4h")),
    "persimmon (qk-norm, fused qkv with bias)": (
        "PersimmonForCausalLM", "PersimmonConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24,
         "num_attention_heads": 4, "max_position_embeddings": 32, "qk_layernorm": True},
        ("self_attn.query_key_value", "self_attn.dense")),
    "gpt-2 (untied, relu)": (
        "GPT2LMHeadModel", "GPT2Config",
        {"n_layer": 1, "n_embd": 16, "n_head": 4, "n_positions": 16, "tie_word_embeddings": False,
         "activation_function": "relu", "scale_attn_by_inverse_layer_idx": True},
        ("transformer.ln_f", "lm_head")),
    "mobilebert (bottlenecks)": (
        "MobileBertForMaskedLM", "MobileBertConfig",
        {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24,
         "num_attention_heads": 4, "embedding_size": 8, "intra_bottleneck_size": 8,
         "true_hidden_size": 8, "max_position_embeddings": 32, "num_feedforward_networks": 2},
        ("ffn.0.intermediate.dense", "ffn.0.output.dense")),
}  # fmt: skip


@pytest.mark.parametrize("family", list(HF))
def test_every_exported_group_of_more_families_keeps_the_logits(family):
    transformers = pytest.importorskip("transformers")
    model_cls, config_cls, kwargs, (smooth, balance) = HF[family]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs)
    model = perturbed(getattr(transformers, model_cls)(config))
    g = torch.Generator().manual_seed(1)
    ids, fresh = (
        torch.randint(1, 40, (2, 7), generator=g),
        torch.randint(1, 40, (3, 9), generator=g),
    )
    if family.startswith("t5"):
        structure = gaugefix.discover(model, input_ids=ids, decoder_input_ids=ids[:, :5])

        def run(m: nn.Module) -> Tensor:
            with torch.no_grad(), Float64Throughout():
                return m(input_ids=fresh, decoder_input_ids=fresh[:, :4]).logits
    else:
        structure = gaugefix.discover(model, input_ids=ids)

        def run(m: nn.Module) -> Tensor:
            with torch.no_grad(), Float64Throughout():
                return m(input_ids=fresh).logits

    groups = structure.scale_groups()
    assert any(
        str(s).endswith(smooth) and any(b.endswith(balance) for b in bs) for s, bs in pairs(groups)
    ), pairs(groups)
    assert not any(g["kind"] in ("query-key", "rotary pair") for g in groups)
    assert_exact(model, run, groups)


# -- the zoo --------------------------------------------------------------------------------------
def _gpt_groups(layers: int, tied: bool) -> list[tuple]:
    """``zoo.GPT``'s groups: per block the two norms against their readers, the values against
    the output projection, the ReLU neurons against the MLP's output; the final norm against
    the head when untied. Query-key pairs are no scaling."""
    blocks = [
        (f"blocks.{i}.{s}", [f"blocks.{i}.{b}"])
        for i in range(layers)
        for s, b in (("ln1", "attn.qkv"), ("ln2", "fc"), ("attn.qkv", "attn.proj"), ("fc", "out"))
    ]
    return blocks + ([] if tied else [("ln_f", ["head"])])


RESIDUAL = (["stages.0.bn2", "stem.1"], ["stages.0.conv1", "stages.1.conv1", "stages.1.shortcut.0"])
ZOO_GROUPS = {  # EXAMPLES name: the groups (smooth layer, balance layers)
    "mlp": [("0", ["2"]), ("2", ["4"])],
    "cnn": [("0", ["3"]), ("3", ["7"]), ("7", ["9"])],
    "resnet": [
        RESIDUAL, ("stages.0.bn1", ["stages.0.conv2"]), ("stages.1.bn1", ["stages.1.conv2"]),
        (["stages.1.bn2", "stages.1.shortcut.1"], ["fc"]),
    ],
    "densenet": [("convs.0", ["convs.1", "convs.2", "head"]), ("convs.1", ["convs.2", "head"]),
                 ("convs.2", ["head"])],
    # norm1 feeds a token mixer (mix1 reads its tokens): only one factor on its whole output
    "transformer": [("norm1", ["mix1"]), ("norm2", ["ff1"]), ("ff1", ["ff2"])],
}  # fmt: skip


@pytest.mark.parametrize("name", list(ZOO_GROUPS))
def test_zoo_examples_have_their_groups_on_their_documented_input_shape(name):
    factory, shape = zoo.EXAMPLES[name]
    model = perturbed(factory())
    groups = gaugefix.discover(model, torch.randn(shape, dtype=DTYPE)).scale_groups()
    assert sorted(pairs(groups), key=str) == sorted(ZOO_GROUPS[name], key=str)
    fresh = torch.randn((3, *shape[1:]), dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    assert_exact(model, on(fresh), groups)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "written out"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zoo_gpt_groups(tied, sdpa):
    model = perturbed(zoo.GPT(vocab=11, dim=8, heads=2, layers=2, hidden=12, context=9,
                              sdpa=sdpa, tied=tied))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    structure = gaugefix.discover(model, torch.randint(0, 11, (2, 7), generator=g))
    groups = structure.scale_groups()
    assert sorted(pairs(groups), key=str) == sorted(_gpt_groups(2, tied), key=str)
    assert_exact(model, on(torch.randint(0, 11, (3, 9), generator=g)), groups)


def test_zoo_examples_run_on_their_documented_shapes():
    """Every example accepts its listed input shape; the CNN's flatten matches 3x16x16."""
    for name, (factory, shape) in zoo.EXAMPLES.items():
        out = factory().eval()(torch.randn(shape))
        assert out.shape[0] == shape[0] and out.isfinite().all(), name
    assert zoo.resnet18().fc.in_features == 512
    assert sum(isinstance(m, zoo.BasicBlock) for m in zoo.resnet18().modules()) == 8


# -- restricted, reloaded, frozen, wrapped --------------------------------------------------------
def _llama() -> tuple[nn.Module, Tensor, Tensor]:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**COMMON, **LLAMA_LIKE, num_key_value_heads=2,
                                      tie_word_embeddings=False, hidden_act="relu")  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (2, 7), generator=g)
    return perturbed(transformers.LlamaForCausalLM(config)), ids, torch.randint(1, 40, (3, 9))


def _logits(fresh: Tensor):
    def run(model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model(fresh).logits

    return run


@pytest.mark.parametrize("seed", range(3))
def test_groups_of_a_restricted_structure_are_subsets_and_exact(seed):
    model, ids, fresh = _llama()
    structure = gaugefix.discover(model, ids)
    keep = torch.rand(structure.num_generators, generator=torch.Generator().manual_seed(seed))
    keep = keep < 0.5
    restricted = structure.restrict(keep, "audit")
    old = torch.nonzero(keep).reshape(-1)  # restricted index -> original index
    full = {n: pairs([g])[0] for g in structure.scale_groups() for n in g["generators"]}
    groups = restricted.scale_groups()
    assert groups
    for group in groups:
        for n in group["generators"]:
            assert full[int(old[n])] == pairs([group])[0]
    assert_exact(model, _logits(fresh), groups)


def test_groups_survive_save_and_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(**COMMON, n_layer=1, n_embd=16, n_head=4, n_positions=16)
    model = perturbed(transformers.GPT2LMHeadModel(config))
    structure = gaugefix.discover(model, torch.randint(1, 40, (2, 7)))
    structure.save(tmp_path / "s.json")
    loaded = gaugefix.GaugeStructure.load(tmp_path / "s.json").scale_groups()
    assert loaded == structure.scale_groups() and any("c_attn" in str(g) for g in loaded)


def test_frozen_parameters_change_no_group():
    """A tool scales frozen weights as any other: ``requires_grad`` changes no group."""
    model, ids, fresh = _llama()
    expected = gaugefix.discover(model, ids).scale_groups()
    model.model.layers[0].self_attn.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    groups = gaugefix.discover(model, ids).scale_groups()
    assert groups == expected
    assert_exact(model, _logits(fresh), groups)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_wrapped_model_has_the_inner_models_names(wrap):
    """``discover`` looks through ``torch.compile`` and ``DataParallel``: the groups name the
    modules of the model inside (no ``_orig_mod.`` or ``module.`` prefix)."""
    model = perturbed(zoo.mlp((4, 6, 5, 3)))
    x = torch.randn(3, 4, dtype=DTYPE)
    groups = gaugefix.discover(wrap(model), x).scale_groups()
    assert groups == gaugefix.discover(model, x).scale_groups()
    assert pairs(groups) == [("0", ["2"]), ("2", ["4"])]


@pytest.mark.parametrize(
    "options",
    [{"hidden": 0}, {"vocab": 0}, {"context": 0}, {"layers": -1}, {"dim": 0, "heads": 1}],
    ids=["hidden=0", "vocab=0", "context=0", "layers=-1", "dim=0"],
)
def test_zoo_gpt_refuses_sizes_that_are_not_positive(options):
    """``GPT(hidden=0)`` built an MLP of ``4 * dim`` (``hidden or 4 * dim``), ``layers=-1`` a
    GPT without blocks, ``dim=0`` and ``context=0`` empty layers, all without a word."""
    with pytest.raises(ValueError, match=next(iter(options))):
        zoo.GPT(**options)
