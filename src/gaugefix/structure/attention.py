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

from gaugefix.structure.context import ZERO, TraceContext
from gaugefix.structure.registry import BUILTIN
from gaugefix.structure.rules import distinct_params

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
    """``F.scaled_dot_product_attention(q [..., Hq, L, E], k [..., Hk, S, E], v [..., Hv, S,
    Ev])``, with ``attn_mask``, ``is_causal``, ``scale``, ``dropout_p`` and ``enable_gqa``; the
    leading dims broadcast as in ``matmul`` (``k`` and ``v`` may have fewer, or one head for all
    the query heads), and so do the labels."""
    q, k, v = query, key, value
    if any(ctx.is_param(t) for t in (q, k, v)):
        return ctx.block_all((q, k, v), {}, ctx.reason("attention over a parameter"))
    _fixed_mask(ctx, attn_mask)
    if isinstance(scale, Tensor):
        return ctx.block_all((q, k, v, scale), {}, ctx.reason("attention scale given as a tensor"))
    lq, lk, lv = (ctx.labels(t) for t in (q, k, v))
    if enable_gqa:  # grouped-query attention: keys and values each repeated to the query heads
        heads = q.shape[-3] if q.dim() >= 3 else 0
        if min(k.dim(), v.dim()) < 3 or not heads or any(heads % t.shape[-3] for t in (k, v)):
            return ctx.block_all((q, k, v), {}, ctx.reason("query and key heads do not match"))
        lk, lv = (n.repeat_interleave(heads // t.shape[-3], -3) for n, t in ((lk, k), (lv, v)))
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
    and the output carries the output projection's rows. ``bias_k`` and ``bias_v``, appended to
    the projected keys and values, carry their rows' factors; the zero key and value of
    ``add_zero_attn`` carry any factor (``q . 0 = 0``, a zero value adds nothing); fixed
    ``static_k``, ``static_v`` block."""
    bound = _MHA.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["static_k"] is not None or a["static_v"] is not None:
        return ctx.block_all(args, kwargs, ctx.reason("attention with fixed keys or values"))
    for key in ("key_padding_mask", "attn_mask"):
        _fixed_mask(ctx, a[key])
    weights = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    params = [a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"], a["bias_k"], a["bias_v"]]
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
    for bias, rows in ((a["bias_k"], rk), (a["bias_v"], rv)):  # an extra key and value [1, 1, E]
        if bias is not None:
            ctx.tie(bias, rows.view(1, 1, -1))
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
