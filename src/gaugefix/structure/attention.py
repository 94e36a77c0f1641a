"""Rules for attention: ``F.scaled_dot_product_attention`` and
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.Transformer*Layer``).

Within a head, the scores ``q . k`` are unchanged when query dim ``i`` is multiplied by ``a`` and
key dim ``i`` divided by it (a query-key generator per pair of dims); the softmax of invariant
scores is invariant, and the output is linear in the values, so a value dim passes its factor
to the output (with the output projection that consumes it: a value-output generator). A key and
value head shared by several query heads (grouped-query attention) ties their dims.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.rules import distinct_params
from gaugefix.structure.trace import BUILTIN, ZERO, TraceContext

__all__: list[str] = []


def _fixed_mask(ctx: TraceContext, mask: Any) -> None:
    if isinstance(mask, Tensor):
        if mask.is_floating_point():
            ctx.block(ctx.terms(mask), ctx.reason("attention mask (added to invariant scores)"))
        ctx.claim(mask)


def _sdpa(
    ctx: TraceContext, result: Any, query: Tensor, key: Tensor, value: Tensor,
    attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
    enable_gqa: bool = False,
) -> Any:  # fmt: skip
    """``F.scaled_dot_product_attention(q [..., Hq, L, E], k [..., Hk, S, E], v [..., Hk, S,
    Ev])``, with ``attn_mask``, ``is_causal``, ``scale``, ``dropout_p`` and ``enable_gqa``; the
    leading dims broadcast (``k`` and ``v`` may have fewer)."""
    q, k, v = query, key, value
    if any(ctx.is_param(t) for t in (q, k, v)):
        return ctx.block_all((q, k, v), {}, ctx.reason("attention over a parameter"))
    _fixed_mask(ctx, attn_mask)
    if isinstance(scale, Tensor):
        return ctx.block_all((q, k, v, scale), {}, ctx.reason("attention scale given as a tensor"))
    heads = q.shape[-3] if q.dim() >= 3 else 1
    kv_heads = k.shape[-3] if k.dim() >= 3 else 1
    lq, lk, lv = (ctx.labels(t) for t in (q, k, v))
    if heads != kv_heads:  # grouped-query attention: each key/value head serves a group
        if not enable_gqa or heads % kv_heads:
            return ctx.block_all((q, k, v), {}, ctx.reason("query and key heads do not match"))
        lk = lk.repeat_interleave(heads // kv_heads, dim=-3)
        lv = lv.repeat_interleave(heads // kv_heads, dim=-3)
    qn, kn, vn = (ctx.unite(n, [-2]) for n in (lq, lk, lv))  # the sequence dims (of any rank)
    ctx.union(qn, kn, -1)
    ctx.tag(qn, "query-key")
    ctx.tag(kn, "query-key")
    ctx.tag(vn, "value-output")
    return vn


BUILTIN.add(F.scaled_dot_product_attention, _sdpa)
if hasattr(torch, "scaled_dot_product_attention"):
    BUILTIN.add(torch.scaled_dot_product_attention, _sdpa)


_MHA = inspect.signature(F.multi_head_attention_forward)


def _mha(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> Any:
    """``F.multi_head_attention_forward``: ``query [L, (N,) E]`` attends to ``key``/``value``
    through the packed ``in_proj_weight [3E, E]`` (rows ``[0:E]`` queries, ``[E:2E]`` keys,
    ``[2E:3E]`` values) or separate ``q/k/v_proj_weight``, then ``out_proj_weight``. Query row
    ``i`` pairs with key row ``i`` (heads are contiguous blocks of rows), value row ``i`` with
    output-projection column ``i``; the inputs' channels are consumed by the projections' columns
    and the output carries the output projection's rows."""
    bound = _MHA.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if (
        any(a[k] is not None for k in ("bias_k", "bias_v", "static_k", "static_v"))
        or a["add_zero_attn"]
    ):
        return ctx.block_all(args, kwargs, ctx.reason("attention with extra key/value entries"))
    for key in ("key_padding_mask", "attn_mask"):
        _fixed_mask(ctx, a[key])
    weights = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    params = [a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"]]
    params += [a[w] for w in weights] if a["use_separate_proj_weight"] else [a["in_proj_weight"]]
    if any(p is not None and not ctx.is_param(p) for p in params) or a["out_proj_weight"] is None:
        return ctx.block_all(args, kwargs, ctx.reason("attention weight is not a parameter"))
    if not distinct_params(ctx, *params):  # the roles of one parameter would add up
        return ctx.block_all(args, kwargs, ctx.reason("one parameter in two roles of the op"))
    if any(ctx.is_param(a[t]) for t in ("query", "key", "value")):
        return ctx.block_all(args, kwargs, ctx.reason("attention over a parameter"))
    embed = a["out_proj_weight"].shape[0]
    inputs = [ctx.along(a[t], -1) for t in ("query", "key", "value")]
    if a["use_separate_proj_weight"]:
        rows = []
        for w, cols in zip((a[w] for w in weights), inputs, strict=True):
            rows.append(ctx.produce(w, embed, 1).view(-1))
            ctx.consume(w, cols.view(1, -1))
        rq, rk, rv = rows
    else:
        w = a["in_proj_weight"]
        r = ctx.produce(w, 3 * embed, 1).view(-1)
        rq, rk, rv = r[:embed], r[embed : 2 * embed], r[2 * embed :]
        if a["query"] is a["key"] and a["key"] is a["value"]:
            ctx.consume(w, inputs[0].view(1, -1))
        else:
            ctx.consume(w, torch.cat([c.view(1, -1).expand(embed, -1) for c in inputs]))
    if a["in_proj_bias"] is not None:
        ctx.tie(a["in_proj_bias"], torch.cat([rq, rk, rv]))
    ctx.union(rq, rk, -1)
    ctx.tag(rq, "query-key")
    ctx.tag(rk, "query-key")
    ctx.tag(rv, "value-output")
    ctx.consume(a["out_proj_weight"], rv.view(1, -1))
    ro = ctx.produce(a["out_proj_weight"], embed, 1).view(-1)
    if a["out_proj_bias"] is not None:
        ctx.tie(a["out_proj_bias"], ro)
    return (ro, ZERO)


BUILTIN.add(F.multi_head_attention_forward, _mha)
