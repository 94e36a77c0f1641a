"""The built-in rules of tensors made in the forward and written into: zeros, fills and literals
(a fresh factor per zero entry), accumulation (``index_add_``, ``scatter_add``,
``index_put_(accumulate=True)``), assignment into fresh memory (``copy_``, ``t[...] = x``,
``index_put_``) and zeroing (``fill_``, ``index_fill``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gaugefix.structure.context import UNCHANGED, ZERO, TraceContext
from gaugefix.structure.marks import from_size
from gaugefix.structure.provenance import is_index, nested_tensors
from gaugefix.structure.rules import (
    blocker,
    constant,
    funcs,
    masked_fill,
    register_all,
    scalar,
    tensor_args,
)
from gaugefix.structure.structural import index_width

__all__: list[str] = []


# --- accumulating into a tensor ----------------------------------------------------------------
def _zeros(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> Any:
    """A tensor of zeros (``zeros``, ``zeros_like``, ``new_zeros``): zero times any factor is
    zero, so each entry carries a fresh factor of its own, free to take whatever is later
    written into it (an accumulator of expert outputs)."""
    for t in tensor_args(args, kwargs):
        ctx.claim(t)
    if not isinstance(result, Tensor) or not result.is_floating_point():
        return ZERO
    ctx.mark_zero(result)
    return ctx.fresh(*result.shape)


def _filled(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> Any:
    """``full(size, v)``, ``full_like(x, v)``, ``x.new_full(size, v)`` with a number ``v``
    (``x`` gives a shape and dtype, none of its values): zeros when ``v = 0``, else a constant
    of the fixed factor. A fill value given as a tensor blocks."""
    shaped = ctx.op.rsplit(".", 1)[-1] in ("full_like", "new_full")
    if tensor_args(args[1:] if shaped else args, kwargs):
        return blocker(ctx, result, *args, **kwargs)
    values = args[2:] if ctx.op.endswith("new_full") else args[1:]
    if bool((result == 0).all()) and not from_size((values, kwargs.get("fill_value"))):
        return _zeros(ctx, result, *args)
    return _literal(ctx, result, *args, **kwargs)


def _literal(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> Any:
    """``tensor(data)``, ``as_tensor``, ``scalar_tensor``, ``x.new_tensor(data)`` from numbers
    (``x`` gives a dtype and device): a constant of the fixed factor, a constant 0 when its
    entries are (see :meth:`TraceContext.zero_source`). Data given as tensors blocks."""
    own = ctx.op.rsplit(".", 1)[-1] in ("new_tensor", "full_like", "new_full")
    if tensor_args(args[1:] if own else args, kwargs):
        return blocker(ctx, result, *args, **kwargs)
    for t in tensor_args(args[:1]):
        ctx.claim(t)
    sized = from_size((args, kwargs))  # 0 at the example's shape only
    if isinstance(result, Tensor) and not sized and bool((result == 0).all()):
        ctx.mark_zero(result)
    return ZERO


register_all(funcs("zeros", "zeros_like", "new_zeros"), _zeros)
register_all(funcs("full", "full_like", "new_full"), _filled)
register_all(funcs("tensor", "as_tensor", "scalar_tensor", "new_tensor"), _literal)


def _index_add(
    ctx: TraceContext, result: Any, input: Tensor, dim: int, index: Tensor, source: Tensor, *,
    alpha: Any = 1,
) -> Any:  # fmt: skip
    """``input.index_add_(dim, index, source)``: slice ``i`` of ``source`` is added to slice
    ``index[i]`` of ``input``, so they carry one factor (the outputs of the experts of a
    mixture summed back into the token stream)."""
    if not scalar(alpha) or ctx.is_param(input) or ctx.is_param(source):
        return ctx.block_all((input, source), {}, ctx.reason("index_add of this form"))
    ctx.claim(index)
    labels, written = _written_along(ctx, input, source, index, dim)
    ctx.union(labels.index_select(dim, index.cpu()), written)
    return labels


def _written_along(
    ctx: TraceContext, input: Tensor, source: Tensor, index: Tensor, dim: int
) -> tuple[Tensor, Tensor]:
    """The labels of ``input`` and of ``source`` written into it at ``index`` along ``dim``;
    when the index depends on the data, another input writes elsewhere along ``dim``, so the
    labels of each are united along it."""
    labels = ctx.labels(input).expand(input.shape)
    written = ctx.labels(source).expand(source.shape)
    if ctx.picks_by_data(index):
        labels = ctx.unite(labels, [dim]).expand(input.shape)
        written = ctx.unite(written, [dim]).expand(source.shape)
    return labels, written


def _scatter_add(
    ctx: TraceContext, result: Any, input: Tensor, dim: int, index: Tensor, src: Tensor
) -> Any:
    """``input.scatter_add(dim, index, src)``: ``src[i][j]`` is added to ``input[index[i][j]][j]``
    (for ``dim=0``), so the two carry one factor."""
    if ctx.is_param(input) or ctx.is_param(src):
        return ctx.block_all((input, src), {}, ctx.reason("scatter_add of this form"))
    ctx.claim(index)
    labels, written = _written_along(ctx, input, src, index, dim)
    written = written[tuple(slice(0, n) for n in index.shape)]
    ctx.union(labels.gather(dim, index.cpu()), written)
    return labels


def _scatter_reduce(
    ctx: TraceContext, result: Any, input: Tensor, dim: int, index: Tensor, src: Tensor,
    reduce: str, *, include_self: bool = True,
) -> Any:  # fmt: skip
    """``input.scatter_reduce(dim, index, src, reduce)``: with ``reduce`` ``"sum"`` or
    ``"mean"`` (linear, with coefficients given by the index alone) the entries that meet carry
    one factor, as in :func:`_scatter_add` (without ``include_self`` the entries written lose
    their old values: uniting them too only constrains more). Other reductions block."""
    if reduce not in _LINEAR_REDUCTIONS:
        return blocker(ctx, result, input, dim, index, src)
    return _scatter_add(ctx, result, input, dim, index, src)


_LINEAR_REDUCTIONS = ("sum", "mean")
register_all(funcs("scatter_reduce", "scatter_reduce_"), _scatter_reduce)
register_all(funcs("index_add", "index_add_"), _index_add)
register_all(funcs("scatter_add", "scatter_add_"), _scatter_add)


# --- assignment into tensors allocated in the forward ---------------------------------------
def _copy(
    ctx: TraceContext, result: Any, input: Tensor, src: Any, non_blocking: bool = False
) -> Any:
    """``dst.copy_(src)``: ``dst``'s entries take ``src``'s values (broadcast). Into memory
    allocated in the forward (``empty``, ``zeros``), they take its labels (see
    :meth:`TraceContext.overwrite`: keys assembled by ``k.new_empty(...)[..., :d].copy_(k_nope)``
    are a concatenation); any other destination blocks both."""
    if not isinstance(src, Tensor):
        return blocker(ctx, result, input, src)
    return _overwrite(ctx, input, lambda at: at, ctx.labels(src), (src,))


def _setitem(ctx: TraceContext, result: Any, input: Tensor, index: Any, value: Any) -> Any:
    """``dst[index] = value``: like :func:`_copy` into ``dst[index]``; a number written
    carries the fixed factor. An index that depends on the data blocks, except a boolean mask
    writing 0 (see :func:`_zeroes_by_mask`)."""
    if _zeroes_by_mask(ctx, input, index, value):
        masked_fill(ctx, result, input, index, value)
        return UNCHANGED
    labels = ctx.labels(value) if isinstance(value, Tensor) else ZERO
    return _overwrite(ctx, input, _indexed(index), labels, (index, value))


def _index_put(
    ctx: TraceContext, result: Any, input: Tensor, indices: Any, values: Tensor,
    accumulate: bool = False,
) -> Any:  # fmt: skip
    """``dst.index_put_(indices, values)``: ``dst[indices] = values`` (with ``accumulate``,
    ``+=``: see :func:`_accumulate`)."""
    if not isinstance(indices, (tuple, list)) or any(i is None for i in indices):
        return blocker(ctx, result, input, indices, values)
    if accumulate:
        return _accumulate(ctx, result, input, tuple(indices), values)
    if len(indices) == 1 and _zeroes_by_mask(ctx, input, indices[0], values):
        masked_fill(ctx, result, input, indices[0], values)
        return UNCHANGED
    return _overwrite(ctx, input, _indexed(tuple(indices)), ctx.labels(values), (indices, values))


def _accumulate(
    ctx: TraceContext, result: Any, dst: Tensor, indices: tuple, values: Any
) -> Any:  # fmt: skip
    """``dst[indices] += values`` (``index_put(..., accumulate=True)``): each entry written and
    the values added into it carry one factor, like the operands of a residual sum (adding 0
    keeps every label). When an index depends on the data (or on a size), another input adds
    elsewhere along the indexed dims, so the labels are united along them."""
    if ctx.is_param(dst) or ctx.is_param(values) or not isinstance(values, Tensor):
        return blocker(ctx, result, dst, indices, values)
    for t in nested_tensors(indices):
        ctx.claim(t)
    if _is_zero(ctx, values):
        return _zeroed(ctx, dst, values) if result is dst else ctx.terms(dst)
    labels = ctx.labels(dst).expand(dst.shape)
    region = labels[_on_cpu(indices)]
    added = ctx.labels(values).expand(region.shape)
    if any(ctx.picks_by_data(t) for t in nested_tensors(indices)) or from_size(indices):
        indexed = sum(index_width(i) for i in indices)
        labels = ctx.unite(labels, range(indexed)).expand(dst.shape)
        region = labels[_on_cpu(indices)]
        lead = region.dim() - (dst.dim() - indexed)
        added = ctx.unite(added, range(lead)).expand(region.shape)
    ctx.union(region, added)
    return labels


def _index_put_copy(
    ctx: TraceContext, result: Any, input: Tensor, indices: Any, values: Any,
    accumulate: bool = False,
) -> Any:  # fmt: skip
    """``x.index_put(indices, values)``: a copy of ``x`` with ``values`` written (with
    ``accumulate``, added: see :func:`_accumulate`) at ``indices``; 0 written into an
    activation keeps its labels (see :func:`_zeroed`). Other writes block."""
    valid = isinstance(indices, (tuple, list)) and all(i is not None for i in indices)
    if valid and accumulate:
        return _accumulate(ctx, result, input, tuple(indices), values)
    if not valid or ctx.is_param(input) or not _is_zero(ctx, values):
        return blocker(ctx, result, input, indices, values)
    for t in nested_tensors(indices):
        ctx.claim(t)
    _zeroed(ctx, input, values)
    return ctx.terms(input)


def _zeroes_by_mask(ctx: TraceContext, dst: Tensor, index: Any, value: Any) -> bool:
    """Whether ``dst[index] = value`` is ``dst.masked_fill_(index, 0)``: ``index`` one boolean
    mask and ``value`` exactly 0 (a number, or a tensor the trace proves 0), into an activation.
    Zeroing entries commutes with every positive factor, so ``dst`` keeps its labels; the mask,
    not floating, carries none (see :func:`masked_fill`). Any other value is a write."""
    zero = constant(value) or ctx.zero_source(value) is not None
    mask = isinstance(index, Tensor) and index.dtype == torch.bool
    return zero and mask and not ctx.is_param(dst)


def _indexed(index: Any) -> Any:
    """``at[index]``, with the index's tensors on the CPU (where labels are)."""
    return lambda at: at[_on_cpu(index)]


def _on_cpu(index: Any) -> Any:
    if isinstance(index, Tensor):
        return index.cpu()
    if isinstance(index, (tuple, list)):
        return type(index)(_on_cpu(i) for i in index)
    return index


def _overwrite(
    ctx: TraceContext, dst: Tensor, region: Any, labels: Tensor, rest: tuple
) -> Any:  # fmt: skip
    """Write ``labels`` into ``region`` of ``dst`` when the trace can (see
    :meth:`TraceContext.overwrite`: fresh memory, and no index that depends on the data);
    else block everything the op touched."""
    ctx.claim(dst)
    indices = [t for t in nested_tensors(rest[:-1]) if is_index(t)]
    for t in indices:
        ctx.claim(t)
    by_data = any(ctx.picks_by_data(t) for t in indices) or from_size(rest[:-1])
    if not by_data and ctx.overwrite(dst, region, labels):
        return UNCHANGED
    if _is_zero(ctx, rest[-1]) and not ctx.is_param(dst):
        return _zeroed(ctx, dst, rest[-1])
    return ctx.block_all(
        (dst, *rest),
        {},
        ctx.reason("written in place (not into fresh memory, or where the data says)"),
    )


def _is_zero(ctx: TraceContext, value: Any) -> bool:
    """Whether ``value`` is exactly 0: the number 0 (no size gave it) or a tensor the trace
    proves 0 (see :meth:`TraceContext.zero_source`)."""
    return constant(value) or ctx.zero_source(value) is not None


def _zeroed(ctx: TraceContext, dst: Tensor, value: Any) -> Any:
    """0 written in place into entries of the activation ``dst`` at positions given by numbers,
    slices or index tensors (none of them floating, so none carries a factor): ``a 0 = 0`` for
    every factor ``a``, so zeroing commutes with the rescaling and ``dst`` keeps its labels.
    Positions computed from the rescaled values are the same under the gauge: they were blocked
    where they were computed (``x > 1``), or the entries compared were united (``argmax``,
    ``topk``)."""
    ctx.claim(dst)
    if isinstance(value, Tensor):
        ctx.read_zero(value, ctx.terms(dst))
    return UNCHANGED


def _fill(ctx: TraceContext, result: Any, input: Tensor, value: Any = 0) -> Any:
    """``x.fill_(v)`` (``x.zero_()``): writing 0 into an activation keeps its labels (see
    :func:`_zeroed`); any other value blocks."""
    if ctx.is_param(input) or not _is_zero(ctx, value):
        return blocker(ctx, result, input, value)
    return _zeroed(ctx, input, value)


def _index_fill(
    ctx: TraceContext, result: Any, input: Tensor, dim: Any, index: Tensor, value: Any
) -> Any:  # fmt: skip
    """``x.index_fill(dim, index, v)``: ``x`` with the slices ``index`` along ``dim`` set to
    ``v``; with ``v`` exactly 0 and an activation ``x``, the output carries ``x``'s labels (see
    :func:`_zeroed`). Any other value blocks."""
    if ctx.is_param(input) or not _is_zero(ctx, value) or not isinstance(dim, int):
        return blocker(ctx, result, input, dim, index, value)
    ctx.claim(index)
    kept = _zeroed(ctx, input, value)
    return kept if result is input else ctx.terms(input)


register_all(funcs("fill_", "zero_", modules=(torch, torch.Tensor)), _fill)
register_all(funcs("index_fill", "index_fill_"), _index_fill)
register_all(funcs("copy_", modules=(torch.Tensor,)), _copy)
register_all(funcs("__setitem__", modules=(torch.Tensor,)), _setitem)
register_all(funcs("index_put_", modules=(torch, torch.Tensor)), _index_put)
register_all(funcs("index_put", modules=(torch, torch.Tensor)), _index_put_copy)
