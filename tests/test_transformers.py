"""The rescaling group of attention models, gated MLPs and norm gains, in float64: generator
counts derived by hand, and the exact properties every generator must have — a random gauge
keeps the outputs, balancing reaches ``max |mu| / S <= 1e-10`` and keeps them, one gradient step
changes ``mu`` by exactly ``lr^2 mu(g)``, and the penalty's gradient is vertical.

The models: a GPT of our own (written-out attention and ``scaled_dot_product_attention``, tied
and untied head), ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` (pre- and post-norm, ReLU and
GELU), ``nn.MultiheadAttention`` (packed and separate projections), and Hugging Face GPT-2, Llama
and BERT built from small configs with random weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import incidence, rel_change
from gaugefix import zoo
from gaugefix.precision import Float64Throughout

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10


def outputs(model: nn.Module, inputs: tuple) -> Tensor:
    """The model's output tensor (``logits`` / ``last_hidden_state`` of a Hugging Face output,
    the first element of a tuple), computed in float64 throughout when the model is float64 (a
    cast to float32 inside, a norm's or a softmax's, stays float64)."""
    with torch.no_grad(), throughout(model):
        out = model(*inputs)
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, tuple) else out


def check_exact(model: nn.Module, inputs: tuple, seed: int = 0) -> gaugefix.GaugeStructure:
    """Discover, then check every exact property of the group on ``model`` (float64, eval)."""
    s = gaugefix.discover(model, *inputs)
    before = outputs(model, inputs)
    # a random gauge transformation keeps the function
    gen = torch.Generator().manual_seed(seed)
    gaugefix.random_gauge_(model, s, 1.0, generator=gen)
    assert rel_change(before, outputs(model, inputs)) <= TOL
    # balancing from far off balance reaches mu = 0 and keeps the function
    gaugefix.random_gauge_(model, s, 3.0, generator=gen)
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= TOL, result
    assert rel_change(before, outputs(model, inputs)) <= TOL
    if s.num_generators == 0:
        return s
    gaugefix.random_gauge_(model, s, 1.0, generator=gen)
    # one gradient step: mu' - mu = lr^2 mu(g), the cross term vanishing by the Euler identity
    params = s.bind(model)
    out = outputs_with_grad(model, inputs)
    weights = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    loss = (out * weights).sum() + out.square().sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    lr = 1e-2
    mu = gaugefix.imbalance(params, s).detach()
    stepped = {k: v.detach() - lr * grads[k] for k, v in params.items()}
    change = gaugefix.imbalance(stepped, s) - mu
    predicted = lr**2 * gaugefix.imbalance(grads, s)
    scale = gaugefix.moment.in_out_sums(params, s)
    size = (scale[0] + scale[1]).detach() + lr**2 * sum(g.square().sum() for g in grads.values())
    assert float(((change - predicted).abs() / size).max()) <= TOL
    # the penalty's gradient is vertical: no horizontal component
    penalty = gaugefix.OrbitSelectionPenalty(s, 1.0).grad(model)
    horizontal = gaugefix.project(penalty, model, s, onto="horizontal")
    norm = math.sqrt(sum(float(g.square().sum()) for g in penalty.values()))
    assert math.sqrt(sum(float(h.square().sum()) for h in horizontal.values())) <= 1e-9 * norm
    return s


def throughout(model: nn.Module) -> AbstractContextManager:
    """``Float64Throughout`` for a float64 model; nothing for another dtype."""
    float64 = all(p.dtype == torch.float64 for p in model.parameters())
    return Float64Throughout() if float64 else nullcontext()


def outputs_with_grad(model: nn.Module, inputs: tuple) -> Tensor:
    with throughout(model):
        out = model(*inputs)
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, tuple) else out


def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = factory().to(DTYPE).eval()
    with torch.no_grad():  # weights of different scales, so that no balance is accidental
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# -- a GPT of our own ----------------------------------------------------------------------------
@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "written-out"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gpt(sdpa, tied):
    dim, layers, hidden = 16, 2, 24
    model = build(lambda: zoo.GPT(50, dim, 4, layers, hidden, 16, sdpa=sdpa, tied=tied))
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    s = check_exact(model, (ids,))
    # per block: dim query-key, dim value-output, 2 dim norm gains, hidden ReLU neurons; the
    # final LayerNorm's gains only when the head does not reuse the embedding
    assert s.num_generators == layers * (4 * dim + hidden) + (0 if tied else dim)
    assert s.kind_counts() == {
        "query-key": layers * dim,
        "value-output": layers * dim,
        "norm gain": layers * 2 * dim + (0 if tied else dim),
        "neuron": layers * hidden,
    }
    if tied:
        assert any("two different roles" in e.reason for e in s.excluded)


def test_query_key_generator_pairs_query_and_key_rows_of_one_head():
    model = build(lambda: zoo.GPT(30, 8, 2, 1, 8, 8))
    s = gaugefix.discover(model, torch.randint(0, 30, (1, 5)))
    qk = [n for n, k in enumerate(s.generator_kinds) if k == "query-key"]
    w = incidence(s, "blocks.0.attn.qkv.weight")  # [N, 24, 8]: rows 0-7 q, 8-15 k, 16-23 v
    for i, n in enumerate(qk):
        rows = w[n].ne(0).any(1).nonzero().reshape(-1).tolist()
        assert rows == [i, 8 + i]
        assert bool((w[n, i] == 1).all()) and bool((w[n, 8 + i] == -1).all())
    summary = s.summary()
    assert "8 query-key" in summary and "8 value-output" in summary


# -- torch.nn attention modules --------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, act: str, norm_first: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, ff, dropout=0.0, activation=act, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_transformer_encoder_layer(norm_first, act):
    d, ff = 8, 12
    model = build(lambda: Encoder(d, 2, ff, act, norm_first))
    x = torch.randn(2, 5, d, dtype=DTYPE)
    s = check_exact(model, (x,))
    relu = ff if act == "relu" else 0
    # post-norm: query-key d, value-output d, norm2's gains (consumed by the head) d; norm1's
    # output joins the stream that norm2 normalises. Pre-norm: both norms' gains, the stream
    # (the fixed input plus the branches) has none.
    assert s.num_generators == (3 * d if not norm_first else 4 * d) + relu
    assert s.kind_counts()["query-key"] == d and s.kind_counts()["value-output"] == d


class Decoder(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, norm_first: bool) -> None:
        super().__init__()
        self.memory = nn.Linear(dim, dim)
        self.layer = nn.TransformerDecoderLayer(
            dim, heads, ff, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, tgt: Tensor, src: Tensor) -> Tensor:
        return self.head(self.layer(tgt, F.relu(self.memory(src))))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_decoder_layer(norm_first):
    d, ff = 8, 12
    model = build(lambda: Decoder(d, 2, ff, norm_first))
    tgt, src = torch.randn(2, 4, d, dtype=DTYPE), torch.randn(2, 6, d, dtype=DTYPE)
    s = check_exact(model, (tgt, src))
    # both attentions: query-key and value-output d each; the memory's d ReLU neurons
    # (consumed by the cross-attention's key and value rows); ff ReLU neurons; the norms whose
    # output is not normalised again: norm3 (post-norm), all three (pre-norm)
    assert s.num_generators == 4 * d + d + ff + (d if not norm_first else 3 * d)
    assert s.kind_counts()["query-key"] == 2 * d


class Attention(nn.Module):
    """``nn.MultiheadAttention`` between ReLU features of one input (self-attention, packed
    weights) or of three inputs of other widths (separate weights)."""

    def __init__(self, dim: int, kdim: int, vdim: int, batch_first: bool, need_weights: bool):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(3, dim), nn.Linear(3, kdim), nn.Linear(3, vdim)
        self.attn = nn.MultiheadAttention(
            dim, 2, kdim=kdim, vdim=vdim, batch_first=batch_first, bias=True
        )
        self.separate = kdim != dim
        self.batch_first, self.need_weights = batch_first, need_weights
        self.head = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        q = F.relu(self.q(x))
        k, v = (F.relu(self.k(x)), F.relu(self.v(x))) if self.separate else (q, q)
        out, weights = self.attn(q, k, v, need_weights=self.need_weights)
        if self.need_weights:
            out = out * weights.mean()  # the weights are invariant: a fixed multiplier
        return self.head(out)


@pytest.mark.parametrize("separate", [False, True], ids=["packed", "separate"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention(separate, batch_first, need_weights):
    d, kd, vd = 6, 4, 5
    kdim, vdim = (kd, vd) if separate else (d, d)
    model = build(lambda: Attention(d, kdim, vdim, batch_first, need_weights))
    x = torch.randn(2, 5, 3, dtype=DTYPE)
    s = check_exact(model, (x,))
    # the inputs' ReLU neurons, query-key d, value-output d, the output projection's rows d
    inputs = d + kd + vd if separate else d
    assert s.num_generators == inputs + 3 * d


# -- Hugging Face models (random weights from small configs, nothing downloaded) ------------------
transformers = pytest.importorskip("transformers")


def gpt2(act: str, attention: str) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, n_positions=16, vocab_size=40,
        activation_function=act, attn_implementation=attention,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("act", ["relu", "gelu_new"])
def test_hugging_face_gpt2(act, attention):
    model = build(lambda: gpt2(act, attention))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    s = check_exact(model, (ids,))
    d, layers = 16, 2
    # Conv1D (addmm) projections; per block query-key d, value-output d, ln_1 and ln_2 gains;
    # the ReLU MLP's 4 d neurons; the tied head fixes the final norm's gains
    per_block = 4 * d + (4 * d if act == "relu" else 0)
    assert s.num_generators == layers * per_block
    assert s.kind_counts()["query-key"] == layers * d


def llama(act: str, tied: bool) -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=24, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=40, hidden_act=act, tie_word_embeddings=tied,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("tied", [False, True])
def test_hugging_face_llama(act, tied):
    model = build(lambda: llama(act, tied))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    s = check_exact(model, (ids,))
    d, head_dim, kv_heads, inter = 16, 4, 2, 24
    # rotary embeddings tie query dims i and i + head_dim / 2: one query-key generator per
    # rotated pair of a key head (grouped-query attention ties the query heads sharing it);
    # value-output per key/value dim; RMSNorm gains (input, post-attention, and the final one
    # unless the head is tied); the MLP: with a SiLU gate the up/down neurons, with a ReLU gate
    # two generators per unit (gate and up)
    counts = {
        "rotary pair": kv_heads * head_dim // 2,
        "value-output": kv_heads * head_dim,
        "norm gain": 2 * d + (0 if tied else d),
    }
    counts["gated unit" if act == "relu" else "neuron"] = 2 * inter if act == "relu" else inter
    assert s.kind_counts() == {k: v for k, v in counts.items() if v}


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_hugging_face_bert(act):
    config = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=24, num_attention_heads=4,
        vocab_size=40, hidden_act=act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = build(lambda: transformers.BertModel(config))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    s = check_exact(model, (ids,))
    # post-norm: every stream is normalised; query-key and value-output d each, and the ReLU
    # intermediate units (consumed by the output dense layer)
    assert s.num_generators == 2 * 16 + (24 if act == "relu" else 0)


# -- the rules one spelling at a time --------------------------------------------------------------
class Spelled(nn.Module):
    """``out(f(relu(a(x)), relu(b(x))))``: two ReLU feature maps of width 6 combined by ``f``,
    then a linear head."""

    def __init__(self, f: Callable, width: int = 6, out_width: int = 6) -> None:
        super().__init__()
        self.f = f
        self.a, self.b = nn.Linear(4, width), nn.Linear(4, width)
        self.out = nn.Linear(out_width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.f(self, F.relu(self.a(x)), F.relu(self.b(x))))


def _scores_then_values(m: Spelled, q: Tensor, k: Tensor, spelling: str) -> Tensor:
    q, k = q.view(2, 5, 2, 3).transpose(1, 2), k.view(2, 5, 2, 3).transpose(1, 2)
    if spelling == "matmul":
        s = q @ k.transpose(-2, -1)
    elif spelling == "einsum":
        s = torch.einsum("bhid,bhjd->bhij", q, k)
    else:
        s = torch.bmm(q.reshape(4, 5, 3), k.reshape(4, 5, 3).transpose(1, 2)).view(2, 2, 5, 5)
    p = torch.where(torch.ones(5, 5, dtype=torch.bool).tril(), s, -1e9).softmax(-1)
    v = q  # the values: q's factors pass through the attention weights
    return (p @ v).transpose(1, 2).reshape(2, 5, 6)


@pytest.mark.parametrize("spelling", ["matmul", "einsum", "bmm"])
def test_bilinear_scores_pair_opposite_factors(spelling):
    """``softmax(q k^T) q``: query dim i and key dim i carry opposite factors, and the values
    (here q again) pass theirs to the head: a's 6 and b's 6 rows tie into 6 generators."""
    model = build(lambda: Spelled(lambda m, q, k: _scores_then_values(m, q, k, spelling)))
    x = torch.randn(2, 5, 4, dtype=DTYPE)
    s = check_exact(model, (x,))
    assert s.num_generators == 6
    w = incidence(s, "b.weight")
    assert bool((w <= 0).all())  # b (the keys) is divided by each pair's factor


class GQA(nn.Module):
    """Written-out grouped-query attention: 4 query heads share 2 key/value heads through
    ``repeat_interleave`` (or ``expand``), with rotary embeddings ``x cos + rotate_half(x) sin``."""

    def __init__(self, expand: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 16), nn.Linear(5, 8), nn.Linear(5, 8)
        self.o = nn.Linear(16, 3)
        self.expand = expand
        angles = torch.arange(6.0)[:, None] * torch.tensor([1.0, 0.3])[None, :]
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1))
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1))

    def rotate(self, x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + turned * self.sin

    def repeat(self, x: Tensor) -> Tensor:
        if self.expand:
            b, h, t, d = x.shape
            return x[:, :, None].expand(b, h, 2, t, d).reshape(b, 2 * h, t, d)
        return x.repeat_interleave(2, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.rotate(self.q(x).view(b, t, 4, 4).transpose(1, 2))
        k = self.repeat(self.rotate(self.k(x).view(b, t, 2, 4).transpose(1, 2)))
        v = self.repeat(self.v(x).view(b, t, 2, 4).transpose(1, 2))
        y = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("expand", [False, True], ids=["repeat_interleave", "expand"])
def test_grouped_query_attention_with_rotary_embeddings(expand):
    model = build(lambda: GQA(expand))
    s = check_exact(model, (torch.randn(2, 6, 5, dtype=DTYPE),))
    # 2 key heads x 2 rotated pairs (each tying its 2 query heads); 2 x 4 value dims
    assert s.kind_counts() == {"rotary pair": 4, "value-output": 8}
    w = incidence(s, "q.weight")
    for n in range(4):  # a rotary pair spans 2 dims in each of its 2 query heads
        assert int((w[n] != 0).any(1).sum()) == 4


def test_sdpa_with_enable_gqa_mask_and_scale():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(5, 8), nn.Linear(5, 4), nn.Linear(5, 4)
            self.o = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            b, t, _ = x.shape
            q = self.q(x).view(b, t, 4, 2).transpose(1, 2)
            k = self.k(x).view(b, t, 2, 2).transpose(1, 2)
            v = self.v(x).view(b, t, 2, 2).transpose(1, 2)
            mask = torch.zeros(t, t, dtype=x.dtype).masked_fill(torch.ones(t, t).triu(1) > 0, -5.0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7, enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(b, t, 8))

    s = check_exact(build(M), (torch.randn(2, 6, 5, dtype=DTYPE),))
    assert s.kind_counts() == {"query-key": 4, "value-output": 4}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``."""

    def __init__(self, act: Callable) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize(
    "act, kinds",
    [(F.relu, {"gated unit": 12}), (F.silu, {"neuron": 6}), (F.gelu, {"neuron": 6})],
    ids=["relu", "silu", "gelu"],
)
def test_gated_units(act, kinds):
    s = check_exact(build(lambda: GatedMLP(act)), (torch.randn(5, 4, dtype=DTYPE),))
    assert s.kind_counts() == kinds
    if act is F.relu:  # the down projection's columns carry both the gate and the up factor
        assert sorted(t.sign for t in s.params["down.weight"].terms) == [-1, -1]


class HandNorms(nn.Module):
    """An RMSNorm written by hand (``weight * x_hat``), LayerScale ``gamma * branch``, a
    separate ``x + bias`` and ``x @ W.t()`` / ``x @ W`` products with parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.weight = nn.Parameter(torch.rand(6) + 0.5)
        self.w1 = nn.Parameter(torch.randn(7, 6))  # used as x @ w1.t()
        self.bias = nn.Parameter(torch.randn(7))
        self.w2 = nn.Parameter(torch.randn(7, 6))  # used as x @ w2 (a Conv1D weight)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h_hat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = F.relu(self.weight * h_hat @ self.w1.t() + self.bias)
        return self.head(h + self.gamma * (y @ self.w2))


def test_hand_written_norm_layerscale_bias_and_transposed_weights():
    s = check_exact(build(HandNorms), (torch.randn(5, 4, dtype=DTYPE),))
    # the RMSNorm gain (6), w1's rows with the separate bias and ReLU (7), w2's columns
    # divided by gamma's factors (6: LayerScale), inp's rows tied to the normalised stream
    # and to the head's input: blocked by the norm
    assert s.num_generators == 6 + 7 + 6
    assert [t.sign for t in s.params["bias"].terms] == [1]
    # gamma's own output joins the normalised stream: only its division by w2's factors stays
    assert [t.sign for t in s.params["gamma"].terms] == [-1]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_convolutions_and_instance_norm(dims, groups):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    up = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    model = build(
        lambda: nn.Sequential(
            conv(2, 4, 3, padding=1), nn.ReLU(), up(4, 6, 2, stride=2, groups=groups), nn.ReLU(),
            up(6, 4, 3, padding=1), norm(4, affine=True), nn.ReLU(), conv(4, 2, 1),
        )
    )  # fmt: skip
    x = torch.randn(2, 2, *([3] * dims), dtype=DTYPE)
    s = check_exact(model, (x,))
    # the first conv's 4, the grouped transposed conv's 6, the instance norm's affine 4 (the
    # second transposed conv feeds the norm: blocked)
    assert s.num_generators == 4 + 6 + 4


def test_reused_weight_in_two_roles_is_fixed():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.fc = nn.Linear(6, 6)

        def forward(self, ids: Tensor) -> Tensor:
            h = F.relu(self.fc(self.emb(ids)))
            return h @ self.emb.weight.t()  # the output layer reuses the embedding

    s = check_exact(build(Tied), (torch.randint(0, 10, (3, 4)),))
    assert "emb.weight" not in s.params and s.num_generators == 0
    assert any("two different roles" in e.reason for e in s.excluded)


def test_adding_a_gated_product_to_a_stream_blocks_with_a_reason():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            gated = F.relu(self.a(x)) * F.relu(self.b(x))
            return self.head(F.relu(self.c(x)) + gated)

    s = check_exact(build(M), (torch.randn(5, 4, dtype=DTYPE),))
    # c's factor would have to equal the sum of a's and b's: not an equality of two
    # factors, so all three are fixed
    assert s.num_generators == 0
    reasons = {e.module: e.reason for e in s.excluded}
    assert "product of rescaled tensors" in reasons["a"] and "Tensor.add in" in reasons["a"]
    assert reasons["b"] == reasons["a"]


# -- one numerical core: the sweep engine's kernels equal the library's, run by run ---------------
def test_engine_kernels_equal_the_library_per_run():
    from gaugefix.experiments import engine

    torch.manual_seed(0)
    template = zoo.GPT(20, 8, 2, 1, 12, 8).to(DTYPE).eval()
    ids = torch.randint(0, 20, (1, 6))
    s = gaugefix.discover(template, ids)
    models = [build(lambda: zoo.GPT(20, 8, 2, 1, 12, 8), seed) for seed in range(3)]
    for i, m in enumerate(models):
        gaugefix.random_gauge_(m, s, 1.5, generator=torch.Generator().manual_seed(i))
    stack = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in s.params
    }
    log_ratio, rel = engine.run_stats(s, stack)
    strength = torch.tensor([0.5, 1.0, 2.0], dtype=DTYPE)
    grads = engine.penalty_grads(s, stack, strength)
    rates = torch.tensor([1e-3, 1e-1, 10.0], dtype=DTYPE)
    steps, _ = gaugefix.soft.orbit_step(stack, s, rates, batch_dims=1)
    balanced = engine.balanced_gauges(s, stack)
    for r, m in enumerate(models):
        stats = gaugefix.imbalance_stats(m, s)
        assert abs(stats["log_ratio_rms"] - float(log_ratio[r])) <= 1e-12 * stats["log_ratio_rms"]
        assert abs(stats["mu_rel_max"] - float(rel[r])) <= 1e-12 * stats["mu_rel_max"]
        single = gaugefix.soft.orbit_selection_grad(m, s, float(strength[r]))
        for name, g in single.items():
            torch.testing.assert_close(grads[name][r], g, rtol=1e-12, atol=0)
        one = copy.deepcopy(m)
        h = gaugefix.relax_(one, s, float(rates[r]))
        torch.testing.assert_close(steps[r], h, rtol=1e-12, atol=1e-15)
        result = gaugefix.balance_(copy.deepcopy(m), s)
        torch.testing.assert_close(balanced[r], result.h, rtol=1e-9, atol=1e-9)
