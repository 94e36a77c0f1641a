"""Property-based fuzzing of discovery for wrong symmetries.

A strategy draws small float64 models from a grammar of the ops people use (linear maps,
convolutions, homogeneous and non-homogeneous activations, residual sums, concatenation, splits,
gated products, normalisations, pooling, reshapes, indexing, reductions, attention, embeddings,
weight tying...). For each, every generator ``discover`` finds must be an exact symmetry: a
random gauge ``h`` (scale 1 to 3) and then ``balance_`` keep the outputs to 1e-10 (relative) on
the example input and on fresh inputs of its shape. Discovery may refuse only with a
:class:`gaugefix.GaugefixError`. ``GAUGEFIX_FUZZ_EXAMPLES`` raises the example count locally.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
BATCH = 3
FRESH_INPUTS = 2
MAX_OPS = 5
VOCAB = 7
EXAMPLES = int(os.environ.get("GAUGEFIX_FUZZ_EXAMPLES", "500"))
CHANNEL_DIM = {"vec": 1, "seq": 2, "sig": 1, "img": 1}

widths = st.integers(2, 6)


class Op(nn.Module):
    """One step ``h -> fn(self, h)`` of a generated model; ``children`` are its modules and
    parameters, ``desc`` says what it computes."""

    def __init__(self, desc: str, fn: Callable[..., Tensor], **children: object) -> None:
        super().__init__()
        self.desc, self.fn = desc, fn
        for name, child in children.items():
            setattr(self, name, child)

    def forward(self, h: Tensor) -> Tensor:
        return self.fn(self, h)

    def extra_repr(self) -> str:
        return self.desc


class Program(nn.Module):
    """The generated model: its steps applied in turn."""

    def __init__(self, steps: list[Op]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, h: Tensor) -> Tensor:
        for step in self.steps:
            h = step(h)
        return h


# --- the grammar ---------------------------------------------------------------------------------
def _mask(h: Tensor, d: int) -> Tensor:
    """A constant boolean mask over dim ``d`` of ``h`` (even channels)."""
    shape = [1] * h.dim()
    shape[d] = h.shape[d]
    return (torch.arange(h.shape[d]) % 2 == 0).view(shape)


ACTIVATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "relu": lambda h, d: F.relu(h),
    "leaky_relu": lambda h, d: F.leaky_relu(h, 0.2),
    "elu": lambda h, d: F.elu(h),
    "gelu": lambda h, d: F.gelu(h),
    "sigmoid": lambda h, d: torch.sigmoid(h),
    "tanh": lambda h, d: torch.tanh(h),
    "abs": lambda h, d: h.abs(),
    "softplus": lambda h, d: F.softplus(h),
    "hardtanh": lambda h, d: F.hardtanh(h),
    "relu6": lambda h, d: F.relu6(h),
    "silu": lambda h, d: F.silu(h),
    "clamp0": lambda h, d: h.clamp(min=0),
    "clamp_pm1": lambda h, d: torch.clamp(h, -1.0, 1.0),
    "clamp_max": lambda h, d: h.clamp(max=0.5),
    "neg": lambda h, d: -h,
    "times": lambda h, d: 2.5 * h,
    "divide": lambda h, d: h / 3.0,
    "square": lambda h, d: h * h,
    "dropout_eval": lambda h, d: F.dropout(h, 0.5, training=False),
    "where_leaky": lambda h, d: torch.where(h > 0, h, 0.1 * h),
    "where_mask": lambda h, d: torch.where(_mask(h, d), h, 0.0),
    "where_value": lambda h, d: torch.where(_mask(h, d), h, 1.0),
    "masked_fill": lambda h, d: h.masked_fill(_mask(h, d), -1.0),
    "max_zero": lambda h, d: torch.maximum(h, torch.zeros_like(h)),
    "plus_one": lambda h, d: h + 1.0,
    "identity": lambda h, d: h,
}


def shape_of(op: Op, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape of ``op`` on an input of ``shape`` (None when it does not apply)."""
    try:
        with torch.no_grad():
            out = op.to(DTYPE)(torch.randn(shape, dtype=DTYPE))
    except (RuntimeError, ValueError, IndexError):
        return None
    return tuple(out.shape)


@st.composite
def channel_map(draw, kind: str, shape: tuple[int, ...], out: int, keep: bool = False) -> Op:
    """A producer/consumer of channels: ``nn.Linear`` on the channel dim, or a convolution
    (groups, depthwise, padding, stride; ``keep``: the spatial size is kept)."""
    c, bias = shape[CHANNEL_DIM[kind]], draw(st.booleans())
    if kind in ("vec", "seq"):
        lin = nn.Linear(c, out, bias=bias)
        return Op(f"Linear({c},{out},bias={bias})", lambda s, h: s.m(h), m=lin)
    groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0 and out % g == 0]))
    k = draw(st.sampled_from([1, 3]))
    stride = 1 if keep else draw(st.sampled_from([1, 2]))
    pad = k // 2 if keep else draw(st.sampled_from([0, k // 2]))
    conv = (nn.Conv1d if kind == "sig" else nn.Conv2d)(
        c, out, k, stride, pad, groups=groups, bias=bias
    )
    return Op(
        f"{type(conv).__name__}({c},{out},k={k},s={stride},p={pad},g={groups},bias={bias})",
        lambda s, h: s.m(h),
        m=conv,
    )


@st.composite
def activation(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """A named activation, or PReLU / an ``nn.Dropout`` in eval mode."""
    d = CHANNEL_DIM[kind]
    name = draw(st.sampled_from([*ACTIVATIONS, "prelu", "prelu_channels", "Dropout"]))
    if name == "prelu":
        return Op("PReLU()", lambda s, h: s.m(h), m=nn.PReLU())
    if name == "prelu_channels":
        return Op(f"PReLU({shape[1]})", lambda s, h: s.m(h), m=nn.PReLU(shape[1]))
    if name == "Dropout":
        return Op("Dropout(eval)", lambda s, h: s.m(h), m=nn.Dropout(0.3).eval())
    fn = ACTIVATIONS[name]
    return Op(name, lambda s, h: fn(h, d))


@st.composite
def residual(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """``h + f(h)``: ``f`` a two-layer block, one map, or an activation."""
    c, form = shape[CHANNEL_DIM[kind]], draw(st.sampled_from(["block", "map", "act"]))
    if form == "act":
        act = draw(activation(kind, shape))
        return Op(f"h + {act.desc}(h)", lambda s, h: h + s.a(h), a=act)
    if form == "map":
        m = draw(channel_map(kind, shape, c, keep=True))
        return Op(f"h + {m.desc}(h)", lambda s, h: h + s.m(h), m=m)
    mid = draw(widths)
    m1 = draw(channel_map(kind, shape, mid, keep=True))
    act = draw(activation(kind, shape))
    m2 = draw(
        channel_map(
            kind,
            shape[:1] + (mid,) + shape[2:] if kind != "seq" else shape[:2] + (mid,),
            c,
            keep=True,
        )
    )
    return Op(
        f"h + {m2.desc}({act.desc}({m1.desc}(h)))",
        lambda s, h: h + s.m2(s.a(s.m1(h))),
        m1=m1,
        a=act,
        m2=m2,
    )


@st.composite
def concat(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """``cat([f(h), g(h)])`` along the channel dim, ``g`` a map or the identity."""
    d = CHANNEL_DIM[kind]
    f = draw(channel_map(kind, shape, draw(widths), keep=True))
    if draw(st.booleans()):
        return Op(f"cat[{f.desc}(h), h]", lambda s, h: torch.cat([s.f(h), h], d), f=f)
    g = draw(channel_map(kind, shape, draw(widths), keep=True))
    return Op(
        f"cat[{f.desc}(h), {g.desc}(h)]", lambda s, h: torch.cat([s.f(h), s.g(h)], d), f=f, g=g
    )


SPLIT_COMBINE: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "a*b": lambda a, b, d: a * b,
    "a+b": lambda a, b, d: a + b,
    "a-b": lambda a, b, d: a - b,
    "max(a,b)": lambda a, b, d: torch.maximum(a, b),
    "torch.max(a,b)": lambda a, b, d: torch.max(a, b),
    "cat[b,a]": lambda a, b, d: torch.cat([b, a], d),
    "a*sigmoid(b)": lambda a, b, d: a * torch.sigmoid(b),
    "relu(a)*b": lambda a, b, d: F.relu(a) * b,
    "a/b": lambda a, b, d: a / b,
    "stack": lambda a, b, d: torch.stack([a, b], -1).sum(-1),
}


@st.composite
def split(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """``a, b = h.chunk(2)`` (or ``split``) along the channel dim, then combined."""
    d, c = CHANNEL_DIM[kind], shape[CHANNEL_DIM[kind]]
    if c < 2:
        return Op("cat[h, h]", lambda s, h: torch.cat([h, h], d))
    if c % 2:
        k = draw(st.integers(1, c - 1))
        return Op(
            f"split[{k}] -> cat[b,a]", lambda s, h: torch.cat(h.split([k, c - k], d)[::-1], d)
        )
    name = draw(st.sampled_from(sorted(SPLIT_COMBINE)))
    fn = SPLIT_COMBINE[name]
    return Op(f"chunk -> {name}", lambda s, h: fn(*h.chunk(2, d), d))


@st.composite
def gated(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """``down(act(gate(h)) * up(h))`` (SwiGLU style)."""
    c, mid = shape[CHANNEL_DIM[kind]], draw(widths)
    gate, up = (draw(channel_map(kind, shape, mid, keep=True)) for _ in range(2))
    act = draw(st.sampled_from(["relu", "silu", "gelu", "identity", "abs", "leaky_relu"]))
    inner = shape[:1] + (mid,) + shape[2:] if kind != "seq" else shape[:2] + (mid,)
    down = draw(channel_map(kind, inner, c, keep=True))
    fn = ACTIVATIONS[act]
    d = CHANNEL_DIM[kind]
    return Op(
        f"{down.desc}({act}({gate.desc}) * {up.desc})",
        lambda s, h: s.down(fn(s.gate(h), d) * s.up(h)),
        gate=gate,
        up=up,
        down=down,
    )


class HandRMSNorm(nn.Module):
    """``weight * h / sqrt(mean(h^2) + eps)`` over the channel dim ``d``, written by hand."""

    def __init__(self, c: int, d: int, ndim: int) -> None:
        super().__init__()
        shape = [1] * (ndim - 1)
        shape[d - 1] = c
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(shape))
        self.d = d

    def forward(self, h: Tensor) -> Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(self.d, keepdim=True) + 1e-6))


@st.composite
def norm(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """LayerNorm / RMSNorm (module or by hand) / BatchNorm (eval or train) / GroupNorm."""
    d, c, last = CHANNEL_DIM[kind], shape[CHANNEL_DIM[kind]], shape[-1]
    names = ["layer", "rms", "hand_rms"] + (["batch", "group"] if kind != "seq" else [])
    name = draw(st.sampled_from(names))
    affine = draw(st.booleans())
    if name == "layer":
        m = nn.LayerNorm(last, elementwise_affine=affine, bias=draw(st.booleans()))
    elif name == "rms":
        m = nn.RMSNorm(last, elementwise_affine=affine)
    elif name == "hand_rms":
        m = HandRMSNorm(c, d, len(shape))
    elif name == "group":
        m = nn.GroupNorm(
            draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0])), c, affine=affine
        )
    else:
        m = (nn.BatchNorm2d if kind == "img" else nn.BatchNorm1d)(c, affine=affine)
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.train(draw(st.booleans()))
    randomise_params(m)
    return Op(f"{m!r} train={m.training}", lambda s, h: s.m(h), m=m)


REDUCTIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "h - mean": lambda h, d: h - h.mean(d, keepdim=True),
    "h / norm": lambda h, d: h / h.norm(dim=d, keepdim=True),
    "h / (sum|h| + 1)": lambda h, d: h / (h.abs().sum(d, keepdim=True) + 1.0),
    "h * amax": lambda h, d: h * h.amax(d, keepdim=True),
    "h + sum": lambda h, d: h + h.sum(d, keepdim=True),
    "h * sum(relu)": lambda h, d: h.sum(d, keepdim=True).expand_as(h) + F.relu(h),
    "h - amax": lambda h, d: h - h.amax(d, keepdim=True),
    "h / amax|h|": lambda h, d: h / h.abs().amax(d, keepdim=True),
    "softmax": lambda h, d: torch.softmax(h, d),
    "h * softmax(h)": lambda h, d: h * torch.softmax(h, d),
    "h / max.values": lambda h, d: h / h.max(d, keepdim=True).values,
}


@st.composite
def reduction(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """A reduction over the channel dim combined with ``h``."""
    name = draw(st.sampled_from(sorted(REDUCTIONS)))
    fn, d = REDUCTIONS[name], CHANNEL_DIM[kind]
    return Op(name, lambda s, h: fn(h, d))


@st.composite
def indexing(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """Slices, permutations and repeated picks of channels."""
    d, c = CHANNEL_DIM[kind], shape[CHANNEL_DIM[kind]]
    form = draw(st.sampled_from(["narrow", "perm", "repeat", "getitem", "select"]))
    if form == "narrow":
        k = draw(st.integers(1, c))
        return Op(f"narrow[:{k}]", lambda s, h: h.narrow(d, 0, k))
    if form == "select":
        i = draw(st.integers(0, c - 1))
        return Op(f"h + h[{i}]", lambda s, h: h + h.select(d, i).unsqueeze(d))
    idx = (
        draw(st.permutations(range(c)))
        if form == "perm"
        else draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=6))
    )
    index = torch.tensor(idx)
    if form == "getitem":
        return Op(f"h[..., {idx}]", lambda s, h: h.movedim(d, -1)[..., idx].movedim(-1, d))
    return Op(f"index_select{idx}", lambda s, h: h.index_select(d, index))


@st.composite
def tied(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """One shape-keeping map applied twice: ``m(act(m(h)))``."""
    c = shape[CHANNEL_DIM[kind]]
    m, act = draw(channel_map(kind, shape, c, keep=True)), draw(activation(kind, shape))
    return Op(f"tied {m.desc}({act.desc}({m.desc}))", lambda s, h: s.m(s.a(s.m(h))), m=m, a=act)


@st.composite
def param_scale(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """A parameter times, plus or divided into ``h``: scalar, per channel (LayerScale)."""
    d, c = CHANNEL_DIM[kind], shape[CHANNEL_DIM[kind]]
    pshape = [1] * (len(shape) - 1)
    pshape[d - 1] = c
    p = nn.Parameter(1 + 0.3 * torch.randn(draw(st.sampled_from([(), tuple(pshape)]))))
    form = draw(st.sampled_from(["p*h", "h*p", "h/p", "h+p", "p*h*p", "p*relu(h)+h"]))
    fns = {
        "p*h": lambda s, h: s.p * h,
        "h*p": lambda s, h: h * s.p,
        "h/p": lambda s, h: h / s.p,
        "h+p": lambda s, h: h + s.p,
        "p*h*p": lambda s, h: s.p * h * s.p,
        "p*relu(h)+h": lambda s, h: s.p * F.relu(h) + h,
    }
    return Op(f"{form} p{tuple(p.shape)}", fns[form], p=p)


@st.composite
def branch_max(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """``maximum(f(h), g(h))`` of two maps of equal width."""
    out = draw(widths)
    f, g = (draw(channel_map(kind, shape, out, keep=True)) for _ in range(2))
    return Op(f"maximum({f.desc}, {g.desc})", lambda s, h: torch.maximum(s.f(h), s.g(h)), f=f, g=g)


@st.composite
def attention(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """Self-attention over a sequence: SDPA or written out, causal or not, optional residual."""
    c = shape[2]
    heads = draw(st.sampled_from([n for n in (1, 2, 3) if c % n == 0]))
    sdpa, causal, res = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    qkv = nn.ModuleList(nn.Linear(c, c, bias=draw(st.booleans())) for _ in range(4))

    def fn(s: Op, h: Tensor) -> Tensor:
        b, t, _ = h.shape
        q, k, v = (m(h).view(b, t, heads, -1).transpose(1, 2) for m in s.m[:3])
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if causal:
                scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
            o = torch.softmax(scores, -1) @ v
        o = s.m[3](o.transpose(1, 2).reshape(b, t, c))
        return h + o if res else o

    return Op(f"attention(heads={heads}, sdpa={sdpa}, causal={causal}, res={res})", fn, m=qkv)


POOLS = {
    "max": lambda h, n: (F.max_pool1d, F.max_pool2d)[n - 1](h, 2, ceil_mode=True),
    "avg": lambda h, n: (F.avg_pool1d, F.avg_pool2d)[n - 1](h, 2, padding=1),
    "adaptive_avg": lambda h, n: (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)[n - 1](h, 2),
    "adaptive_max": lambda h, n: (F.adaptive_max_pool1d, F.adaptive_max_pool2d)[n - 1](h, 1),
}


@st.composite
def reshape(draw, kind: str, shape: tuple[int, ...]) -> tuple[Op, str]:
    """Pooling, flattening, views and transposes that change the layout."""
    c = shape[CHANNEL_DIM[kind]]
    forms = {
        "vec": ["unsqueeze_seq", "unsqueeze_sig"] + (["view_seq"] if c % 2 == 0 else []),
        "seq": ["flatten", "mean_t", "amax_t", "sum_t", "transpose"],
        "sig": ["flatten", "pool", "transpose"],
        "img": ["flatten", "pool", "permute_linear", "pool_flatten"],
    }[kind]
    form = draw(st.sampled_from(forms))
    if form == "pool":
        name = draw(st.sampled_from(sorted(POOLS)))
        fn, n = POOLS[name], len(shape) - 2
        return Op(f"{name}_pool", lambda s, h: fn(h, n)), kind
    if form == "permute_linear":
        lin = nn.Linear(c, draw(widths))
        return Op(
            "permute->Linear->permute",
            lambda s, h: s.m(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
            m=lin,
        ), kind
    table = {
        "unsqueeze_seq": (lambda s, h: h.unsqueeze(1), "seq"),
        "unsqueeze_sig": (lambda s, h: h.unsqueeze(-1), "sig"),
        "view_seq": (lambda s, h: h.view(h.shape[0], 2, -1), "seq"),
        "flatten": (lambda s, h: h.flatten(1), "vec"),
        "mean_t": (lambda s, h: h.mean(1), "vec"),
        "amax_t": (lambda s, h: h.amax(1), "vec"),
        "sum_t": (lambda s, h: h.sum(1), "vec"),
        "transpose": (lambda s, h: h.transpose(1, 2), "sig" if kind == "seq" else "seq"),
        "pool_flatten": (lambda s, h: F.adaptive_avg_pool2d(h, 1).reshape(h.shape[0], -1), "vec"),
    }
    fn, new = table[form]
    return Op(form, fn), new


def _narrowed(h: Tensor, d: int, k: int) -> tuple:
    """The index of the first ``k`` entries of dim ``d`` of ``h``."""
    return tuple(slice(0, k) if i == d else slice(None) for i in range(h.dim()))


@st.composite
def inplace(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """In-place writes: on a copy, on a view of one, through ``+=`` and ``__setitem__``."""
    d, c = CHANNEL_DIM[kind], shape[CHANNEL_DIM[kind]]
    k = draw(st.integers(1, c))
    m = draw(channel_map(kind, shape, c, keep=True))
    p = nn.Parameter(1 + 0.3 * torch.randn(k, *([1] * (len(shape) - d - 1))))
    fns = {
        "relu_": lambda s, h: s.m(h).relu_(),
        "view.mul_(2)": lambda s, h: _written(s.m(h), lambda v: v.mul_(2.0), d, k),
        "view.mul_(p)": lambda s, h: _written(s.m(h), lambda v: v.mul_(s.p), d, k),
        "view.abs_()": lambda s, h: _written(s.m(h), lambda v: v.abs_(), d, k),
        "view.sigmoid_()": lambda s, h: _written(s.m(h), lambda v: v.sigmoid_(), d, k),
        "view.add_(1)": lambda s, h: _written(s.m(h), lambda v: v.add_(1.0), d, k),
        "view.add_(h)": lambda s, h: _written(
            s.m(h), lambda v: v.add_(h[_narrowed(h, d, k)]), d, k
        ),
        "view.clamp_(min=0)": lambda s, h: _written(s.m(h), lambda v: v.clamp_(min=0), d, k),
        "view.copy_(h)": lambda s, h: _written(
            s.m(h), lambda v: v.copy_(h[_narrowed(h, d, k)]), d, k
        ),
        "setitem 0": lambda s, h: _set(s.m(h), d, k, 0.0),
        "setitem h": lambda s, h: _set(s.m(h), d, k, h[_narrowed(h, d, k)]),
        "+= h": lambda s, h: _iadd(s.m(h), h),
        "view kept, base mul_(2)": lambda s, h: _view_then_write(s.m(h), d, k),
        "h.mul_(p) then cat": lambda s, h: _scale_then_cat(s.m(h), s.p, d, k),
    }
    form = draw(st.sampled_from(sorted(fns)))
    return Op(f"{m.desc} -> {form} [:{k}]", fns[form], m=m, p=p)


def _written(g: Tensor, write: Callable[[Tensor], Tensor], d: int, k: int) -> Tensor:
    g = g.clone()
    write(g[_narrowed(g, d, k)])
    return g


def _set(g: Tensor, d: int, k: int, value: Tensor | float) -> Tensor:
    g = g.clone()
    g[_narrowed(g, d, k)] = value
    return g


def _iadd(g: Tensor, h: Tensor) -> Tensor:
    g += h
    return g


def _view_then_write(g: Tensor, d: int, k: int) -> Tensor:
    view = g[_narrowed(g, d, k)]
    g.mul_(2.0)
    return torch.cat([view, g], d)


def _scale_then_cat(g: Tensor, p: Tensor, d: int, k: int) -> Tensor:
    view = g[_narrowed(g, d, k)]
    view.mul_(p)
    return torch.cat([view, g], d)


@st.composite
def param_views(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """A weight in other spellings and reused: ``x @ W.t()``, ``x @ W``, einsum, ``-W``,
    ``W.flip(0)``, ``2 * W``, a tied pair ``W`` / ``W.t()``, expert slices ``W[0]``, ``W[1]``."""
    c, out = shape[-1], draw(widths)
    w = nn.Parameter(torch.randn(out, c) / math.sqrt(c))
    e = nn.Parameter(torch.randn(2, c, c) / math.sqrt(c))
    fns = {
        "x @ W.t()": lambda s, h: h @ s.w.t(),
        "x @ W.T": lambda s, h: h @ s.w.T,
        "matmul(x, W.mT)": lambda s, h: torch.matmul(h, s.w.mT),
        "einsum": lambda s, h: torch.einsum("...i,oi->...o", h, s.w),
        "linear(-W)": lambda s, h: F.linear(h, -s.w),
        "linear(W.flip(0))": lambda s, h: F.linear(h, s.w.flip(0)),
        "linear(2 * W)": lambda s, h: F.linear(h, 2 * s.w),
        "linear(W.data)": lambda s, h: F.linear(h, s.w.data),
        "tied W, W.t()": lambda s, h: F.linear(F.relu(F.linear(h, s.w)), s.w.t()),
        "tied linear, einsum": lambda s, h: torch.einsum("...o,oi->...i", F.relu(h @ s.w.t()), s.w),
        "experts W[0], W[1]": lambda s, h: F.linear(F.relu(F.linear(h, s.e[0])), s.e[1]),
        "expert W[0] twice": lambda s, h: F.linear(F.relu(F.linear(h, s.e[0])), s.e[0]),
        "W and W[0] as bias": lambda s, h: F.linear(h, s.e[0], s.e[1][0]),
        "addmm": lambda s, h: torch.addmm(s.e[1][0], h.reshape(-1, c), s.w.t()).reshape(
            *h.shape[:-1], -1
        ),
    }
    form = draw(st.sampled_from(sorted(fns)))
    return Op(form, fns[form], w=w, e=e)


@st.composite
def modules(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """Library modules: MultiheadAttention, TransformerEncoderLayer, ConvTranspose,
    InstanceNorm, a shared Linear in two branches, a model returning a stored activation."""
    c = shape[CHANNEL_DIM[kind]]
    if kind == "seq":
        heads = draw(st.sampled_from([n for n in (1, 2) if c % n == 0]))
        if draw(st.booleans()):
            mha = nn.MultiheadAttention(c, heads, batch_first=True, bias=draw(st.booleans()))
            return Op(f"MultiheadAttention({c},{heads})", lambda s, h: s.m(h, h, h)[0], m=mha)
        layer = nn.TransformerEncoderLayer(
            c,
            heads,
            2 * c,
            0.0,
            batch_first=True,
            norm_first=draw(st.booleans()),
            activation=draw(st.sampled_from(["relu", "gelu"])),
        )
        return Op(f"TransformerEncoderLayer({c},{heads})", lambda s, h: s.m(h), m=layer)
    if kind in ("sig", "img"):
        n = len(shape) - 2
        form = draw(st.sampled_from(["convT", "instance", "interpolate", "pad"]))
        if form == "convT":
            m = (nn.ConvTranspose1d, nn.ConvTranspose2d)[n - 1](c, draw(widths), 2, stride=2)
        elif form == "instance":
            m = (nn.InstanceNorm1d, nn.InstanceNorm2d)[n - 1](c, affine=draw(st.booleans()))
        elif form == "interpolate":
            mode = draw(st.sampled_from(["nearest", "linear" if n == 1 else "bilinear"]))
            return Op(
                f"interpolate({mode})", lambda s, h: F.interpolate(h, scale_factor=2, mode=mode)
            )
        else:
            mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
            return Op(f"pad({mode})", lambda s, h: F.pad(h, (1, 1) * n, mode=mode))
        return Op(repr(m), lambda s, h: s.m(h), m=m)
    lin = nn.Linear(c, c)
    return Op(
        "shared Linear in two branches", lambda s, h: torch.cat([s.m(h), s.m(F.relu(h))], -1), m=lin
    )


MISC: dict[str, Callable[[Tensor, int], Tensor]] = {
    "cumsum": lambda h, d: h.cumsum(d),
    "logsumexp": lambda h, d: h - h.logsumexp(d, keepdim=True),
    "std": lambda h, d: h / (h.std(d, keepdim=True) + 1.0),
    "sort": lambda h, d: h.sort(d).values,
    "topk": lambda h, d: h.topk(1, d).values.expand_as(h) + h,
    "gather argmax": lambda h, d: h.gather(d, h.abs().argmax(d, keepdim=True)).expand_as(h) + h,
    "h > 0.5 mask": lambda h, d: h * (h > 0.5),
    "where h > 0.5": lambda h, d: torch.where(h > 0.5, h, 0.0),
    "sign * h": lambda h, d: h.sign() * h,
    "flip": lambda h, d: h.flip(d) + h,
    "roll": lambda h, d: h.roll(1, d),
    "repeat_interleave": lambda h, d: h.repeat_interleave(2, d),
    "expand+sum": lambda h, d: h.unsqueeze(0).expand(2, *h.shape).sum(0),
    "tile": lambda h, d: (
        torch.cat([h, h], d) + h.repeat(*[2 if i == d else 1 for i in range(h.dim())])
    ),
    "unbind stack": lambda h, d: torch.stack(h.unbind(d)[::-1], d),
    "normalize": lambda h, d: F.normalize(h, dim=d),
    "vector_norm": lambda h, d: h / torch.linalg.vector_norm(h, dim=d, keepdim=True),
    "einsum gram": lambda h, d: (
        torch.einsum("bi,bj->bij", h.flatten(1), h.flatten(1)).sum(-1).view_as(h)
    ),
    "max(dim) values": lambda h, d: h - h.max(d, keepdim=True)[0],
    "h.T": lambda h, d: h.flatten(1).T.T.view_as(h),
    "pow(1)": lambda h, d: h.pow(1),
    "h ** 2": lambda h, d: h**2,
    "rsub": lambda h, d: 1.0 - h,
    "rdiv": lambda h, d: 1.0 / (h.abs() + 1.0),
    "addcmul": lambda h, d: torch.addcmul(h, h, h, value=0.5),
    "lerp": lambda h, d: torch.lerp(h, 2 * h, 0.3),
}


@st.composite
def misc(draw, kind: str, shape: tuple[int, ...]) -> Op:
    """Less common entrywise, sorting, scanning and rearranging ops along the channel dim."""
    name = draw(st.sampled_from(sorted(MISC)))
    fn, d = MISC[name], CHANNEL_DIM[kind]
    return Op(name, lambda s, h: fn(h, d))


BUILDERS = {
    "activation": activation,
    "residual": residual,
    "concat": concat,
    "split": split,
    "gated": gated,
    "norm": norm,
    "reduction": reduction,
    "indexing": indexing,
    "tied": tied,
    "param_scale": param_scale,
    "branch_max": branch_max,
    "inplace": inplace,
    "param_views": param_views,
    "modules": modules,
    "misc": misc,
}


def randomise_params(module: nn.Module) -> None:
    """Away from the 1/0 initialisation of norm gains, so that every entry matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p))


@st.composite
def step(draw, kind: str, shape: tuple[int, ...]) -> tuple[Op, str]:
    """One step of the grammar that applies to ``kind`` and ``shape``."""
    choices = [*BUILDERS, "reshape", "map"] + (["attention"] if kind == "seq" else [])
    name = draw(st.sampled_from(choices))
    if name == "reshape":
        return draw(reshape(kind, shape))
    if name == "attention":
        return draw(attention(kind, shape)), kind
    if name == "map":
        return draw(channel_map(kind, shape, draw(widths))), kind
    return draw(BUILDERS[name](kind, shape)), kind


@st.composite
def programs(draw) -> tuple[nn.Module, Callable[[int], Tensor], str]:
    """A model, a maker of its inputs (by seed: 0 is the example input), and its description.
    The initial weights come from torch's global generator, seeded from the draw (hypothesis
    seeds only Python's ``random``): an example replays and shrinks."""
    torch.manual_seed(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["vec", "seq", "sig", "img", "ids"]))
    integer, c = kind == "ids", draw(widths)
    steps: list[Op] = []
    if kind == "ids":
        t = draw(st.integers(2, 4))
        shape, kind, in_shape = (BATCH, t, c), "seq", (BATCH, t)
        steps.append(Op(f"Embedding({VOCAB},{c})", lambda s, h: s.m(h), m=nn.Embedding(VOCAB, c)))
    else:
        size = draw(st.integers(2, 5))
        in_shape = {
            "vec": (BATCH, c),
            "seq": (BATCH, size, c),
            "sig": (BATCH, c, size),
            "img": (BATCH, c, size, size),
        }[kind]
        shape = in_shape
    for _ in range(draw(st.integers(1, MAX_OPS))):
        op, new_kind = draw(step(kind, shape))
        new_shape = shape_of(op, shape)
        if new_shape is None or min(new_shape) < 1 or new_shape[CHANNEL_DIM[new_kind]] > 12:
            continue
        steps.append(op)
        shape, kind = new_shape, new_kind
    steps.extend(draw(head(kind, shape, steps)))
    model = Program(steps).to(DTYPE).eval()
    for op in steps:
        if "train=True" in op.desc:  # a BatchNorm in training mode
            op.m.train()
    randomise_all(model)

    def make(seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        if integer:
            return torch.randint(0, VOCAB, in_shape, generator=g)
        return torch.randn(in_shape, generator=g, dtype=DTYPE)

    return model, make, "\n".join(s.desc for s in steps)


def randomise_all(model: nn.Module) -> None:
    """Random weights of scale ~1 (gains and biases away from 1 and 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1])))


@st.composite
def head(draw, kind: str, shape: tuple[int, ...], steps: list[Op]) -> list[Op]:
    """The end: nothing, a flattening output Linear, or logits tied to the input embedding."""
    forms = ["none", "linear"]
    if steps and steps[0].desc.startswith("Embedding") and kind == "seq":
        forms.append("tied_logits")
    form = draw(st.sampled_from(forms))
    if form == "none":
        return []
    if form == "tied_logits":
        emb = steps[0].m
        c = shape[2]
        lin = nn.Linear(c, emb.embedding_dim, bias=False)
        return [Op("tied logits", lambda s, h: F.linear(s.m(h), emb.weight), m=lin)]
    n = math.prod(shape[1:])
    return [Op(f"flatten->Linear({n},2)", lambda s, h: s.m(h.flatten(1)), m=nn.Linear(n, 2))]


# --- the property ------------------------------------------------------------------------------
def outputs(model: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
    with torch.no_grad():
        return [model(x).clone() for x in inputs]


def rel_change(before: list[Tensor], after: list[Tensor]) -> float:
    """The largest change of an output entry relative to the largest output entry."""
    worst = 0.0
    for b, a in zip(before, after, strict=True):
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = float((a - b).abs().max()) if b.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def check_symmetry(
    model: nn.Module, make: Callable[[int], Tensor], h_scale: float = 2.0, rules: tuple = ()
) -> gaugefix.GaugeStructure | None:
    """Discover ``model`` (with the per-call ``rules``; None when it is refused); a random gauge
    of scale ``h_scale`` and then ``balance_`` keep the outputs on the example input and on
    fresh ones."""
    try:
        s = gaugefix.discover(model, make(0), rules=rules)
    except gaugefix.GaugefixError:
        return None
    inputs = [make(seed) for seed in range(FRESH_INPUTS + 1)]
    before = outputs(model, inputs)
    if not math.isfinite(rel_change(before, before)):
        return s
    gen = torch.Generator().manual_seed(1)
    h = h_scale * torch.randn(s.num_generators, dtype=DTYPE, generator=gen)
    gaugefix.apply_gauge_(model, s, h)
    moved = rel_change(before, outputs(model, inputs))
    assert moved <= TOL, f"random gauge changed the outputs by {moved:.3g}\n{s.summary()}"
    gaugefix.balance_(model, s)
    balanced = rel_change(before, outputs(model, inputs))
    assert balanced <= TOL, f"balance_ changed the outputs by {balanced:.3g}\n{s.summary()}"
    return s


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=programs(), h_scale=st.floats(1.0, 3.0))
def test_discovered_generators_are_symmetries(program, h_scale: float) -> None:
    model, make, desc = program
    note(desc)
    check_symmetry(model, make, h_scale)


# --- the check can fail; regressions -------------------------------------------------------------
def vec_inputs(seed: int) -> Tensor:
    """Example (seed 0) and fresh inputs ``[5, 4]``."""
    return torch.randn(5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


class TwoSpellings(nn.Module):
    """``c``'s weight read by ``F.linear`` and by ``h @ W.t()`` (one layer, two spellings): the
    hidden units of ``a`` and of both uses of ``c`` are 12 generators."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.o = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        g = F.relu(self.c(h)) + F.relu(h @ self.c.weight.t() + self.c.bias)
        return self.o(g)


def test_a_wrong_rule_is_caught() -> None:
    """The property fails for a wrong symmetry: ``tanh`` declared homogeneous."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with pytest.raises(AssertionError, match="random gauge changed"):
        check_symmetry(model, vec_inputs, rules=((torch.tanh, gaugefix.rules.elementwise),))


def test_one_weight_in_two_spellings_keeps_its_generators() -> None:
    """``F.linear`` states a weight's terms producing first, a matrix product consuming first:
    the same role, united term by term (it was fixed as two roles: 0 generators)."""
    torch.manual_seed(0)
    s = check_symmetry(TwoSpellings().to(DTYPE), vec_inputs)
    assert s is not None and s.num_generators == 12
