"""Hand-written attention against the attention rules (``gaugefix.structure.attention``, the
contraction rules of ``affine``) and the model zoo: masks, scales, rotary layouts, QK-norm,
ALiBi, soft-capping, grouped- and multi-query heads in every spelling, head layouts, shared
projections and ``nn.MultiheadAttention``'s options. Each discovered structure must be exact:
a random gauge of scale 2 keeps the float64 outputs, on the example and on a fresh input of
another batch size and length, to 1e-12. Where the pairs are found, their count (derived by
hand) is checked too; the exact symmetries discovery misses are listed at the end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix import zoo

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
SCALE = 2.0
DIM, HEADS, HEAD_DIM = 16, 4, 4  # the model width, query heads, dims per head
PAIRS = HEADS * HEAD_DIM  # query-key pairs (and value-output pairs) of full multi-head attention


def rel_max(before: list[Tensor], after: list[Tensor]) -> float:
    return max(rel_change(b, a) for b, a in zip(before, after, strict=True))


def gauged(model: nn.Module, x: Tensor, fresh: Tensor) -> tuple[gaugefix.GaugeStructure, float]:
    """Discover ``model`` (float64, random weights) on ``x``, apply a random gauge of scale 2 and
    return the structure and the largest relative change of the output on ``x`` and ``fresh``."""
    torch.manual_seed(0)
    model.to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p) + (0.2 if p.dim() == 1 else 0.0))
        before = [model(t) for t in (x, fresh)]
    s = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return s, rel_max(before, [model(t) for t in (x, fresh)])


def inputs() -> tuple[Tensor, Tensor]:
    """An example ``[2, 6, DIM]`` and a fresh input of another batch size and length."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 6, DIM, dtype=DTYPE, generator=g),
            torch.randn(3, 5, DIM, dtype=DTYPE, generator=g))  # fmt: skip


def heads(t: Tensor, n: int, d: int = HEAD_DIM) -> Tensor:
    """``[B, T, n * d] -> [B, n, T, d]``."""
    return t.unflatten(-1, (n, d)).transpose(1, 2)


class Attention(nn.Module):
    """``o(f(q, k, v))`` with ``q = heads(Q x)``, ``k = heads(K x)``, ``v = heads(V x)``
    (biases on all four), ``kv`` value heads and ``k_heads`` key heads (by default ``kv``);
    ``extra(self)`` adds modules ``f`` uses."""

    def __init__(self, f, kv: int = HEADS, k_heads: int | None = None, extra=None) -> None:
        super().__init__()
        self.f, self.kv, self.k_heads = f, kv, k_heads or kv
        self.q, self.o = nn.Linear(DIM, PAIRS), nn.Linear(PAIRS, DIM)
        self.k = nn.Linear(DIM, self.k_heads * HEAD_DIM)
        self.v = nn.Linear(DIM, kv * HEAD_DIM)
        if extra is not None:
            extra(self)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = heads(self.q(x), HEADS), heads(self.k(x), self.k_heads), heads(self.v(x), self.kv)
        return self.o(self.f(self, q, k, v).transpose(1, 2).flatten(2))


def run(f, **options) -> tuple[gaugefix.GaugeStructure, float]:
    return gauged(Attention(f, **options), *inputs())


# --- scores: masks, scales, biases, non-homogeneous maps of invariant scores ------------------
def sdpa(**kw):
    return lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)


def written(scores):
    """``softmax(scores(m, q, k)) @ v``: attention written out."""
    return lambda m, q, k, v: torch.softmax(scores(m, q, k), -1) @ v


def distances(n: int) -> Tensor:
    return (torch.arange(n)[:, None] - torch.arange(n)[None]).abs()


def alibi(q: Tensor, k: Tensor) -> Tensor:
    slopes = 2.0 ** -torch.arange(1, HEADS + 1, dtype=q.dtype)
    return q @ k.mT / math.sqrt(HEAD_DIM) - slopes[:, None, None] * distances(q.shape[-2])


def soft_capped(q: Tensor, k: Tensor, cap: float = 5.0) -> Tensor:
    """Gemma-2's logit soft-capping: not homogeneous, but the scores it reads are invariant."""
    return torch.tanh(q @ k.mT / cap) * cap


def float_mask(n: int) -> Tensor:
    return torch.linspace(-1, 1, n * n, dtype=DTYPE).view(n, n).sin()


SCORES = {
    "sdpa": sdpa(),
    "sdpa, additive float mask": lambda m, q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=float_mask(q.shape[-2])
    ),
    "sdpa, boolean mask": lambda m, q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=distances(q.shape[-2]) % 3 != 1
    ),
    "sdpa, sliding window": lambda m, q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=distances(q.shape[-2]) <= 2
    ),
    "sdpa, is_causal": sdpa(is_causal=True),
    "sdpa, scale=": sdpa(scale=0.37),
    "sdpa, dropout_p=0 in eval": lambda m, q, k, v: F.scaled_dot_product_attention(
        q, k, v, dropout_p=0.3 if m.training else 0.0
    ),
    "softmax(q k^T / sqrt(d)) v": written(lambda m, q, k: q @ k.mT / math.sqrt(HEAD_DIM)),
    "einsum": lambda m, q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v
    ),
    "baddbmm with a fixed bias": lambda m, q, k, v: torch.bmm(
        torch.baddbmm(
            float_mask(q.shape[-2]).expand(q.shape[0] * HEADS, -1, -1),
            q.flatten(0, 1),
            k.flatten(0, 1).mT,
            alpha=0.5,
        ).softmax(-1),
        v.flatten(0, 1),
    ).view(q.shape),  # fmt: skip
    "causal masked_fill(-inf)": written(
        lambda m, q, k: (q @ k.mT).masked_fill(distances(q.shape[-2]).triu(1) > 0, float("-inf"))
    ),
    "ALiBi": written(lambda m, q, k: alibi(q, k)),
    "soft-capped logits": written(lambda m, q, k: soft_capped(q, k)),
    "dropout in eval": lambda m, q, k, v: (
        F.dropout(torch.softmax(q @ k.mT, -1), 0.3, training=m.training) @ v
    ),
    "relu scores": written(lambda m, q, k: F.relu(q @ k.mT)),
}


@pytest.mark.parametrize("f", list(SCORES.values()), ids=list(SCORES))
def test_scores_keep_every_pair(f):
    """``q`` and ``k`` carry their projections' biases: ``q_i -> a q_i`` with the bias, ``k_i ->
    k_i / a`` with its bias, leave every score, and so every mask, scale, ALiBi slope, cap and
    softmax, unchanged."""
    s, change = run(f)
    assert change <= TOL, s.summary()
    assert s.kind_counts() == {"query-key": PAIRS, "value-output": PAIRS}, s.summary()


# --- rotary embeddings ------------------------------------------------------------------------
def angles(n: int, pairs: int) -> Tensor:
    return torch.arange(n, dtype=DTYPE)[:, None] * 0.7 ** torch.arange(pairs, dtype=DTYPE)


def half_split(x: Tensor) -> Tensor:
    """``x cos + rotate_half(x) sin`` (Llama, GPT-NeoX): dim ``i`` pairs with ``i + d/2``."""
    a = angles(x.shape[-2], x.shape[-1] // 2).repeat(1, 2)
    x1, x2 = x.chunk(2, -1)
    return x * a.cos() + torch.cat([-x2, x1], -1) * a.sin()


def interleaved(x: Tensor) -> Tensor:
    """GPT-J's rotary layout: dim ``2j`` pairs with ``2j + 1``."""
    a = angles(x.shape[-2], x.shape[-1] // 2).repeat_interleave(2, -1)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
    return x * a.cos() + rotated * a.sin()


def partial(x: Tensor) -> Tensor:
    """Rotary on the first half of the head dims only (GPT-NeoX's ``rotary_pct``)."""
    r = HEAD_DIM // 2
    return torch.cat([half_split(x[..., :r]), x[..., r:]], -1)


def complex_rotary(x: Tensor) -> Tensor:
    """Meta's Llama: ``view_as_real(view_as_complex(x) * freqs_cis)``."""
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    a = angles(x.shape[-2], x.shape[-1] // 2)
    return torch.view_as_real(z * torch.polar(torch.ones_like(a), a)).flatten(-2)


def rope(rotary, keys: bool = True):
    return lambda m, q, k, v: F.scaled_dot_product_attention(rotary(q), rotary(k) if keys else k, v)


ROTARY = {  # f, query-key generators (a rotated pair of dims is one)
    "half-split": (rope(half_split), PAIRS // 2),
    "interleaved": (rope(interleaved), PAIRS // 2),
    "partial": (rope(partial), PAIRS // 4 + PAIRS // 2),
    "complex": (rope(complex_rotary), PAIRS // 2),
    "queries only": (rope(half_split, keys=False), PAIRS // 2),
    "half-split queries, interleaved keys": (
        lambda m, q, k, v: F.scaled_dot_product_attention(half_split(q), interleaved(k), v),
        HEADS,  # the pairs {i, i + 2} and {2j, 2j + 1} join all four dims of a head
    ),
}


@pytest.mark.parametrize("f, pairs", list(ROTARY.values()), ids=list(ROTARY))
def test_rotary_pairs(f, pairs):
    s, change = run(f)
    assert change <= TOL, s.summary()
    counts = s.kind_counts()
    assert counts.get("query-key", 0) + counts.get("rotary pair", 0) == pairs, s.summary()
    assert counts["value-output"] == PAIRS, s.summary()


# --- normalised queries and keys --------------------------------------------------------------
def qk_norm(kind: str):
    def extra(m: nn.Module) -> None:
        norm = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}[kind]
        m.q_norm, m.k_norm = norm(HEAD_DIM, eps=1e-6), norm(HEAD_DIM, eps=1e-6)

    return extra


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_qk_norm_pairs_the_gains_not_the_projections(kind):
    """A norm per head kills the projections' scaling; the query norm's gain ``i`` (shared by
    the heads) pairs with the key norm's gain ``i``."""
    f = lambda m, q, k, v: F.scaled_dot_product_attention(m.q_norm(q), m.k_norm(k), v)  # noqa: E731
    s, change = run(f, extra=qk_norm(kind))
    assert change <= TOL, s.summary()
    assert s.kind_counts() == {"query-key": HEAD_DIM, "value-output": PAIRS}, s.summary()


# --- grouped-query and multi-query attention --------------------------------------------------
def repeat_kv(t: Tensor, n: int) -> Tensor:
    """Hugging Face's ``repeat_kv``: expand and reshape, head ``h`` reads head ``h // n``."""
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def grouped(spell):
    def f(m, q, k, v):
        return spell(q, k, v, HEADS // k.shape[1], HEADS // v.shape[1])

    return f


GQA = {
    "repeat_interleave": grouped(lambda q, k, v, nk, nv: F.scaled_dot_product_attention(
        q, k.repeat_interleave(nk, 1), v.repeat_interleave(nv, 1))),
    "expand+reshape": grouped(lambda q, k, v, nk, nv: F.scaled_dot_product_attention(
        q, repeat_kv(k, nk), repeat_kv(v, nv))),
    "repeat (tiled heads)": grouped(lambda q, k, v, nk, nv: F.scaled_dot_product_attention(
        q, k.repeat(1, nk, 1, 1), v.repeat(1, nv, 1, 1))),
    "written out, expand+reshape": grouped(lambda q, k, v, nk, nv: torch.softmax(
        q @ repeat_kv(k, nk).mT, -1) @ repeat_kv(v, nv)),
    "enable_gqa": sdpa(enable_gqa=True),
}  # fmt: skip


@pytest.mark.parametrize("kv", [2, 1], ids=["grouped", "multi-query"])
@pytest.mark.parametrize("f", list(GQA.values()), ids=list(GQA))
def test_grouped_query_heads_share_their_pairs(f, kv):
    s, change = run(f, kv=kv)
    assert change <= TOL, s.summary()
    assert s.kind_counts() == {"query-key": kv * HEAD_DIM, "value-output": kv * HEAD_DIM}


@pytest.mark.parametrize(
    "f",
    [written(lambda m, q, k: q @ k.mT), sdpa()],
    ids=["written out", "sdpa"],
)
def test_one_key_value_head_broadcast_over_the_query_heads(f):
    """Multi-query attention by broadcasting ``k, v [B, 1, S, d]`` (no ``enable_gqa``): sdpa
    broadcasts like ``matmul``. Its rule blocked every head count but the query's."""
    s, change = run(f, kv=1)
    assert change <= TOL, s.summary()
    assert s.kind_counts() == {"query-key": HEAD_DIM, "value-output": HEAD_DIM}, s.summary()


@pytest.mark.parametrize("k_heads, v_heads", [(2, 1), (1, 2), (4, 2), (2, 4), (4, 1), (1, 4)])
def test_enable_gqa_with_different_key_and_value_heads(k_heads, v_heads):
    """``enable_gqa`` repeats keys and values each by its own ratio to the query heads. The rule
    repeated the values by the keys' ratio: discovery failed on the value labels' shape
    ("the model's forward failed ... expanded size of the tensor (4) must match ... (8)")."""
    s, change = run(sdpa(enable_gqa=True), kv=v_heads, k_heads=k_heads)
    assert change <= TOL, s.summary()
    counts = {"query-key": k_heads * HEAD_DIM, "value-output": v_heads * HEAD_DIM}
    assert s.kind_counts() == counts, s.summary()


# --- head layouts -----------------------------------------------------------------------------
SPLITS = {
    "view+transpose": lambda t: t.view(*t.shape[:2], HEADS, HEAD_DIM).transpose(1, 2),
    "unflatten+permute": lambda t: t.unflatten(-1, (HEADS, HEAD_DIM)).permute(0, 2, 1, 3),
    "head-minor (d h)": lambda t: t.view(*t.shape[:2], HEAD_DIM, HEADS).permute(0, 3, 1, 2),
    "reshape+movedim": lambda t: t.reshape(*t.shape[:2], HEADS, HEAD_DIM).movedim(2, 1),
}
MERGES = {
    "transpose+reshape": lambda y: y.transpose(1, 2).reshape(*y.shape[::2], -1),
    "permuted (d h)": lambda y: y.permute(0, 2, 3, 1).flatten(2),
    "contiguous view": lambda y: y.permute(0, 2, 1, 3).contiguous().view(*y.shape[::2], -1),
}


class Layout(nn.Module):
    """A fused ``qkv`` projection split into heads by ``split``, attention (sdpa or ``bmm``),
    and the heads merged by ``merge`` for the output projection."""

    def __init__(self, split, merge, bmm: bool) -> None:
        super().__init__()
        self.split, self.merge, self.bmm = split, merge, bmm
        self.qkv, self.o = nn.Linear(DIM, 3 * PAIRS), nn.Linear(PAIRS, DIM)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, -1))
        if not self.bmm:
            return self.o(self.merge(F.scaled_dot_product_attention(q, k, v)))
        p = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)).softmax(-1)
        return self.o(self.merge(torch.bmm(p, v.flatten(0, 1)).view(q.shape)))


@pytest.mark.parametrize("bmm", [False, True], ids=["sdpa", "bmm"])
@pytest.mark.parametrize("merge", list(MERGES.values()), ids=list(MERGES))
@pytest.mark.parametrize("split", list(SPLITS.values()), ids=list(SPLITS))
def test_head_layouts(split, merge, bmm):
    s, change = gauged(Layout(split, merge, bmm), *inputs())
    assert change <= TOL, s.summary()
    assert s.kind_counts() == {"query-key": PAIRS, "value-output": PAIRS}, s.summary()


# --- shared tensors ---------------------------------------------------------------------------
SHARED = {  # f, kind counts
    "sdpa(q, q, v)": (lambda m, q, k, v: F.scaled_dot_product_attention(q, q, v),
                      {"value-output": PAIRS}),
    "softmax(q q^T) v": (written(lambda m, q, k: q @ q.mT), {"value-output": PAIRS}),
    "sdpa(q, k, k)": (lambda m, q, k, v: F.scaled_dot_product_attention(q, k, k),
                      {"query-key": PAIRS}),
    "sdpa(q, k, q)": (lambda m, q, k, v: F.scaled_dot_product_attention(q, k, q),
                      {"query-key": PAIRS}),
}  # fmt: skip


@pytest.mark.parametrize("f, counts", list(SHARED.values()), ids=list(SHARED))
def test_one_tensor_in_two_roles_of_attention(f, counts):
    """``q q^T`` scales by ``a^2``: a query paired with itself is no generator. A key used as
    the values passes its own factor to the output."""
    s, change = run(f)
    assert change <= TOL, s.summary()
    assert s.kind_counts() == counts, s.summary()


class SharedValue(nn.Module):
    """Two attentions (their own queries and keys) over one value projection, the output
    projection reading both results side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.q1, self.k1, self.q2, self.k2 = (nn.Linear(DIM, PAIRS) for _ in range(4))
        self.v, self.o = nn.Linear(DIM, PAIRS), nn.Linear(2 * PAIRS, DIM)

    def forward(self, x: Tensor) -> Tensor:
        v = heads(self.v(x), HEADS)
        y1 = F.scaled_dot_product_attention(heads(self.q1(x), HEADS), heads(self.k1(x), HEADS), v)
        y2 = torch.softmax(heads(self.q2(x), HEADS) @ heads(self.k2(x), HEADS).mT, -1) @ v
        return self.o(torch.cat([y1, y2], -1).transpose(1, 2).flatten(2))


def test_a_value_projection_shared_by_two_attentions():
    s, change = gauged(SharedValue(), *inputs())
    assert change <= TOL, s.summary()
    assert s.kind_counts() == {"query-key": 2 * PAIRS, "value-output": PAIRS}, s.summary()


# --- nn.MultiheadAttention and F.multi_head_attention_forward ---------------------------------
class MHA(nn.Module):
    """``post(mha(a, b, b))`` (or ``mha(a, a, a)`` with ``self_attention``) with ``a, b`` ReLU
    units of ``x``: the out projection's rows are neurons read by ``post``."""

    def __init__(self, self_attention: bool = True, call=None, **options) -> None:
        super().__init__()
        self.self_attention, self.call = self_attention, call or (lambda x: {})
        self.pre_a, self.pre_b = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True, **options)
        self.post = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.pre_a(x))
        b = a if self.self_attention else F.relu(self.pre_b(x))
        return self.post(self.mha(a, b, b, **self.call(x))[0])


NEURONS = DIM  # per layer: pre_a (and pre_b in cross-attention), the out projection


def padding(x: Tensor) -> dict:
    """The last two keys of every sequence masked out."""
    return {"key_padding_mask": (torch.arange(x.shape[1]) >= x.shape[1] - 2).expand(x.shape[:2])}


MHA_CASES = {
    "self": (MHA(), {}),
    "cross": (MHA(False), {"neuron": 3 * NEURONS}),
    "no bias": (MHA(bias=False), {}),
    "boolean padding mask": (MHA(call=padding), {}),
    "add_zero_attn": (MHA(add_zero_attn=True), {}),
    "add_bias_kv": (MHA(add_bias_kv=True), {}),
    "add_bias_kv, cross": (MHA(False, add_bias_kv=True, add_zero_attn=True),
                           {"neuron": 3 * NEURONS}),
}  # fmt: skip


@pytest.mark.parametrize("model, counts", list(MHA_CASES.values()), ids=list(MHA_CASES))
def test_multihead_attention(model, counts):
    """``add_zero_attn`` appends a zero key and value (``q . 0 = 0``, a zero value adds
    nothing): exact under every pair. ``add_bias_kv`` appends ``bias_k`` to the keys and
    ``bias_v`` to the values: ``bias_k[i]`` scales with key row ``i``, ``bias_v[i]`` with value
    row ``i``. Both blocked the whole attention (its inputs' neurons too)."""
    s, change = gauged(model, *inputs())
    assert change <= TOL, s.summary()
    expected = {"query-key": PAIRS, "value-output": PAIRS, "neuron": 2 * NEURONS} | counts
    assert s.kind_counts() == expected, s.summary()


def test_static_keys_still_block():
    """``static_k`` replaces the key projection by a fixed tensor: the queries cannot scale."""

    class Static(MHA):
        def forward(self, x: Tensor) -> Tensor:
            a = F.relu(self.pre_a(x)).transpose(0, 1)
            m = self.mha
            static = torch.ones(a.shape[1] * HEADS, 3, HEAD_DIM, dtype=a.dtype)
            y, _ = F.multi_head_attention_forward(
                a, a, a, DIM, HEADS, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
                m.out_proj.weight, m.out_proj.bias, static_k=static, static_v=static,
            )  # fmt: skip
            return self.post(y.transpose(0, 1))

    x, fresh = inputs()
    s, change = gauged(Static(), x, fresh)
    assert change <= TOL, s.summary()
    assert "query-key" not in s.kind_counts(), s.summary()


# --- the zoo ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sdpa_", [True, False], ids=["sdpa", "written out"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zoo_gpt_has_the_documented_group(sdpa_, tied):
    """``zoo.GPT``'s docstring: per block ``dim`` query-key and value-output pairs, two norm
    gains of ``dim`` and ``hidden`` neurons, plus the final norm's gains when untied."""
    dim, layers, hidden = 8, 2, 12
    model = zoo.GPT(vocab=11, dim=dim, heads=2, layers=layers, hidden=hidden, context=9,
                    sdpa=sdpa_, tied=tied)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    s, change = gauged(model, torch.randint(0, 11, (2, 7), generator=g),
                       torch.randint(0, 11, (3, 9), generator=g))  # fmt: skip
    assert change <= TOL, s.summary()
    expected = {
        "query-key": layers * dim,
        "value-output": layers * dim,
        "norm gain": 2 * layers * dim + (0 if tied else dim),
        "neuron": layers * hidden,
    }
    assert s.kind_counts() == expected, s.summary()  # fmt: skip


@pytest.mark.parametrize(
    "options, message",
    [({"dim": 30, "heads": 4}, "divisible"), ({"heads": 0}, "heads")],
)
def test_zoo_gpt_refuses_heads_that_do_not_divide_the_width(options, message):
    """``GPT(dim=30, heads=4)`` was built and failed in its first forward with PyTorch's
    "shape '[1, 8, 4, 7]' is invalid for input of size 240"."""
    with pytest.raises(ValueError, match=message):
        zoo.GPT(**options)


def test_zoo_gpt_refuses_more_tokens_than_its_context():
    """Its position embedding has ``context`` rows: 9 tokens on ``context=8`` failed with
    "index out of range in self"."""
    model = zoo.GPT(vocab=11, dim=8, heads=2, layers=1, context=8)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- exact symmetries discovery misses (exactness only) ---------------------------------------
MISSED = {
    # q . k spelled as a product and a sum: the product carries both factors, which the softmax
    # then blocks
    "(q * k).sum(-1)": written(lambda m, q, k: (q[..., :, None, :] * k[..., None, :, :]).sum(-1)),
    "linalg.vecdot": written(
        lambda m, q, k: torch.linalg.vecdot(q[..., :, None, :], k[..., None, :, :])
    ),
    # linear attention q (k^T v): one factor per head for q, and one for k against v
    "q @ (k^T @ v)": lambda m, q, k, v: q @ (k.mT @ v),
    # learned queries (Perceiver latents): "attention over a parameter" blocks
    "sdpa over learned queries": lambda m, q, k, v: F.scaled_dot_product_attention(
        m.latents.expand(q.shape[0], -1, -1, -1), k, v
    )[..., :1, :].expand(v.shape[0], -1, q.shape[2], -1),
    "learned queries @ k^T": lambda m, q, k, v: (torch.softmax(m.latents @ k.mT, -1) @ v)[
        ..., :1, :
    ].expand(-1, -1, q.shape[2], -1),
}


def _latents(m: nn.Module) -> None:
    m.latents = nn.Parameter(torch.randn(1, HEADS, 3, HEAD_DIM))


@pytest.mark.parametrize("f", list(MISSED.values()), ids=list(MISSED))
def test_missed_symmetries_stay_exact(f):
    s, change = run(f, extra=_latents)
    assert change <= TOL, s.summary()
