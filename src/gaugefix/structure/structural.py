"""The built-in rules of structural ops, which apply the op to the labels themselves: reshapes,
permutations, slicing and indexing, concatenation and stacking, repeats, ``gather`` and
complex views. Applied to a parameter, an arrangement of it is a view an affine rule can use
and slices along dim 0 are gathered slices; dims along which the data or a size picks or places
entries unite their labels."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from gaugefix.structure.context import ZERO, Sum, TraceContext, compact
from gaugefix.structure.marks import from_size
from gaugefix.structure.provenance import PLACED_BY_NUMBERS, is_index, nested_tensors
from gaugefix.structure.registry import BUILTIN
from gaugefix.structure.rules import funcs, register_all, tensor_args

__all__ = ["index_width"]


# Arrangements that hold every entry exactly once: applied to a parameter, they give a view of
# it that an affine rule can use (``x @ W.t()``).
_ARRANGEMENTS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "swapdims", "t", "T", "mT", "squeeze", "unsqueeze", "movedim", "moveaxis",
    "ravel", "flip", "roll",
}  # fmt: skip
# Arrangements that only permute whole dims: applied to gathered slices (``W[e].t()``), every
# entry keeps its slice and its place in it.
_PERMUTATIONS = {
    "permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT", "movedim", "moveaxis",
}  # fmt: skip


def _dim_order(func: Any, ndim: int, rest: tuple, options: dict) -> tuple[int, ...]:
    """The permutation ``perm`` with ``func(x, *rest, **options) == x.permute(perm)`` for a
    permuting op ``func`` on ``ndim``-dim tensors: read off its result on a tensor of sizes
    ``2, 3, ...`` (distinct, so each size names its dim) that holds no memory."""
    probe = torch.empty((), device="meta").expand(*range(2, ndim + 2))
    return tuple(size - 2 for size in func(probe, *rest, **options).shape)


def _on_labels(ctx: TraceContext, result: Any, first: Any, *rest: Any, **options: Any) -> Any:
    """Reshaping, slicing, transposing, concatenating: the same op applied to the label tensor
    (each term of a sum) moves every label to where its entry went."""
    out = result
    if any(isinstance(a, torch.dtype) for a in (*rest, *options.values())):
        return ctx.block_all((first,), {}, ctx.reason("reinterprets the bits as another dtype"))
    if options.get("out") is not None:  # re-applied to labels, the op would write into it
        return ctx.block_all((first, *rest), options, ctx.reason("written into out="))
    for t in tensor_args(rest, options):  # shapes or indices given as tensors (view_as, x[i])
        ctx.claim(t)
    if isinstance(first, (list, tuple)):
        parts = [ctx.terms(t) for t in first]
        if any(len(p) > 1 or (p and p[0][1] != 1) for p in parts):
            parts = [Sum.of(ctx.single(p, t.shape)) for p, t in zip(parts, first, strict=True)]
        replaced = [(p[0][0] if p else ZERO.expand(t.shape)).contiguous() for p, t in
                    zip(parts, first, strict=True)]  # fmt: skip
        return ctx.func(replaced, *rest, **options)
    if ctx.is_param(first):
        return _on_param(ctx, out, first, rest, options)
    terms = ctx.terms(first)
    if not terms:
        return ZERO
    dims = _data_indexed_dims(ctx, first, rest, options) + _size_placed_dims(
        ctx, first, rest, options
    )
    dims += _mixed_by_inferred_size(ctx, first, terms, rest, options)
    if dims:  # another input picks other entries along these dims: they must share a factor
        terms = terms.map(lambda nodes: ctx.unite(nodes, dims).expand(first.shape))
    results = [ctx.func(nodes.contiguous(), *rest, **options) for nodes, _ in terms]
    if isinstance(results[0], (tuple, list)):
        return tuple(
            Sum((r[i], s) for r, (_, s) in zip(results, terms, strict=True))
            for i in range(len(results[0]))
        )
    return Sum((r, s) for r, (_, s) in zip(results, terms, strict=True))


def _on_param(ctx: TraceContext, out: Any, p: Tensor, rest: tuple, options: dict) -> Any:
    """:func:`_on_labels` for a parameter ``p`` (or an arrangement of it): slices picked along
    dim 0 (``p[ids]``, ``p.index_select(0, ids)``, ``p[a:b]``, ``p.expand(B, ...)``) are
    recorded as gathered slices, whole-dim arrangements as views of ``p``; the rest blocks.
    Whole rows of a table looked up by the data are read as :func:`F.embedding` reads them
    (see :func:`_looked_up`)."""
    looked_up = _looked_up(ctx, p, rest, options)
    if looked_up is not None:
        ctx.claim(looked_up)
        return ctx.produce(p, 1, p.shape[1]).view(-1)
    index = _slice_index(ctx, p, rest, options)
    if index is not None:
        by_data = ctx.gathers_by_data(torch.as_tensor(index)) or from_size(index)
        index = torch.as_tensor(index)
        ctx.gathered(p, index, index if by_data else None, view=out)
        return None
    if _size_placed_dims(ctx, p, rest, options):
        return ctx.block_all((p,), {}, ctx.reason("parameter arranged by an input's size"))
    picked = _rows_picked(ctx, p, rest, options)
    if picked is not None:
        views = list(out) if isinstance(out, (tuple, list)) else [out]
        for view, rows in zip(views, picked, strict=True):
            ctx.gathered(p, rows, None, view=view)
        return None
    copies = _copies(ctx, p, out)
    if copies is not None:
        ctx.gathered(copies, torch.zeros(out.shape[0], dtype=torch.long), None, view=out)
        return None
    short = ctx.op.rsplit(".", 1)[-1]
    if ctx.is_gathered(p) and short in _PERMUTATIONS and isinstance(out, Tensor):
        ctx.permuted_gather(out, p, _dim_order(ctx.func, p.dim(), rest, options))
        return None
    whole = short in _ARRANGEMENTS or _new_dims_only(short, rest, options)
    if whole and isinstance(out, Tensor):
        index = torch.arange(p.numel()).view(p.shape)
        ctx.view_of_param(out, p, ctx.func(index, *rest, **options).reshape(-1))
        return None
    along = _picked_by_data(ctx, p, out, rest, options)
    if along is not None:
        shape = [1 if d == along else n for d, n in enumerate(p.shape)]
        nodes = ctx.produce(p, *shape)
        return nodes[tuple(slice(0, n) for n in out.shape)].expand(out.shape)
    return ctx.block_all((p,), {}, ctx.reason("parameter sliced or repeated"))


# Where ``gather``, ``index_select`` and ``take_along_dim`` take their index, positionally
# (after the tensor) and by name.
_INDEX_AT = {"gather": (1, "index"), "index_select": (1, "index"), "take_along_dim": (0, "indices")}


def _picked_by_data(
    ctx: TraceContext, p: Tensor, out: Any, rest: tuple, options: dict
) -> int | None:
    """The dim ``d`` when an op on the parameter ``p`` picks its entries along ``d`` by an
    index that depends on the data (``gather(p, d, i)``, ``p.index_select(d, i)``,
    ``take_along_dim(p, i, d)``, ``i`` from ``argmax``, ``topk``...): every output entry is an
    entry of ``p`` at the same coordinates along the other dims, at any place along ``d``. So
    ``p`` produces one factor per coordinate of its other dims, the same along ``d`` (as an
    embedding table's columns, whichever rows are looked up), and the output carries it at
    those coordinates. None for other ops, constant indices, gathered slices and
    ``index_select`` along dim 0, which picks slices (see :func:`_slice_index`)."""
    short = ctx.op.rsplit(".", 1)[-1]
    along = _picked_dim(short, p, rest, options)
    if along is None or ctx.is_gathered(p) or not isinstance(out, Tensor):
        return None
    if short == "index_select" and along == 0:
        return None
    at, name = _INDEX_AT[short]
    index = options.get(name, rest[at] if len(rest) > at else None)
    if not isinstance(index, Tensor) or not ctx.gathers_by_data(index) or out.dim() != p.dim():
        return None
    return along


def _looked_up(ctx: TraceContext, p: Tensor, rest: tuple, options: dict) -> Tensor | None:
    """The index ``i`` when an op on the parameter ``p`` (or an arrangement of it: ``W.view(V,
    D)``, ``W3.flatten(0, 1)``) is the lookup of whole rows of a table ``p [num, dim]`` by the
    data, ``p[i]`` spelt any way (see :func:`_getitem_index`) or ``p.index_select(0, i)``: ``i``
    an integer tensor that picks by the data or was made from a size (``arange(T)``); torch
    takes no other integer dtype than ``int64`` and ``int32``, and masks are no such index. Each
    output row is a row of ``p``, whichever rows ``i`` picks, so ``p``'s columns produce the
    output's channels, one factor per column for every row (read as ``F.embedding(i, p)``,
    also where ``p`` is read another way). Else None: slices of another shape (stacked experts),
    rows at constant places, partial rows (``p[i, :k]``)."""
    if not ctx.is_param(p) or p.dim() != 2:
        return None
    index = _slice_index(ctx, p, rest, options)
    if not isinstance(index, Tensor):
        return None
    return index if ctx.gathers_by_data(index) else None


def _slice_index(ctx: TraceContext, p: Tensor, rest: tuple, options: dict) -> Any:
    """The index ``i`` when an op on the parameter ``p`` is ``p[i]`` (see :func:`_getitem_index`)
    or ``p.index_select(0, i)`` with a 1-D integer tensor ``i`` (the same slices of ``p`` along
    dim 0, in the same order), else None."""
    picked = _getitem_index(ctx, p, rest, options)
    if picked is not None:
        return picked
    if ctx.op.rsplit(".", 1)[-1] != "index_select" or ctx.is_gathered(p) or not p.dim():
        return None
    names = ("dim", "index")
    if set(options) - set(names) or len(rest) + len(options) != len(names):
        return None
    given = dict(zip(names, rest, strict=False)) | options
    dim, index = given.get("dim"), given.get("index")
    if type(dim) is not int or dim % p.dim() != 0 or not isinstance(index, Tensor):
        return None
    integer = not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool)
    return index if integer and index.dim() == 1 else None


def _copies(ctx: TraceContext, p: Tensor, out: Any) -> Tensor | None:
    """The tensor ``s`` with ``out == s[zeros(B)]`` when an op on the parameter ``p`` is an
    ``expand`` that only repeats ``p`` along a new leading dim (``p.expand(B, *p.shape)``:
    ``s = p[None]``) or along its dim 0 of size 1 (``s = p``): ``B`` copies of one weight,
    as a weight shared by a batched product is read. None for any other op or form."""
    short = ctx.op.rsplit(".", 1)[-1]
    if short not in ("expand", "expand_as") or not isinstance(out, Tensor) or not p.dim():
        return None
    if ctx.is_gathered(p) or out.dim() - p.dim() not in (0, 1):
        return None
    if out.dim() == p.dim():
        return p if p.shape[0] == 1 and out.shape[1:] == p.shape[1:] else None
    if out.shape[1:] != p.shape:
        return None
    source = p.unsqueeze(0)
    ctx.view_of_param(source, p, torch.arange(p.numel()))
    return source


def _new_dims_only(short: str, rest: tuple, options: dict) -> bool:
    """Whether an op is ``x[None]``, ``x[:, None]``, ``x[..., None]``: an index of new dims of
    size 1, ``...`` and whole dims only, which moves no entry (as ``unsqueeze``)."""
    if short != "__getitem__" or options or len(rest) != 1:
        return False
    items = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
    return all(
        i is None or i is Ellipsis
        or (isinstance(i, slice) and i.start is None and i.stop is None and i.step is None)
        for i in items
    )  # fmt: skip


for _name in (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "swapdims", "t", "squeeze", "unsqueeze", "__getitem__", "narrow", "select",
    "expand", "expand_as", "repeat", "chunk", "split", "tensor_split", "unbind", "movedim",
    "moveaxis", "flip", "roll", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "ravel", "tile", "repeat_interleave", "index_select", "gather", "take_along_dim",
):  # fmt: skip
    register_all(funcs(_name, modules=(torch, torch.Tensor)), _on_labels)


def _view_as_complex(ctx: TraceContext, result: Any, input: Tensor) -> Any:
    """``view_as_complex(x)``, ``[..., 2] -> [...]``: entry ``x[..., 0] + i x[..., 1]``. A
    positive factor scales it only when it scales both parts alike: the pair carries one
    factor, that of the complex entry (a complex rotary embedding's pair ``(2j, 2j + 1)``)."""
    if ctx.is_param(input):
        return ctx.block_all((input,), {}, ctx.reason("parameter viewed as complex"))
    return ctx.terms(input).map(lambda n: ctx.unite(n.expand(input.shape), [-1]).squeeze(-1))


def _view_as_real(ctx: TraceContext, result: Any, input: Tensor) -> Any:
    """``view_as_real(z)``, ``[...] -> [..., 2]``: both parts of an entry carry its factor."""
    if ctx.is_param(input):
        return ctx.block_all((input,), {}, ctx.reason("parameter viewed as real"))
    return ctx.terms(input).map(lambda n: n.unsqueeze(-1).expand(result.shape))


register_all(funcs("view_as_complex", modules=(torch,)), _view_as_complex)
register_all(funcs("view_as_real", modules=(torch,)), _view_as_real)


def _data_indexed_dims(ctx: TraceContext, x: Tensor, rest: tuple, options: dict) -> list[int]:
    """The dims of ``x`` along which integer or boolean tensor arguments whose values depend on
    the data or on a size, or were made from a size, pick entries (``x[:, order]``,
    ``x.narrow(1, start, n)``, ``x[:, (arange(6) + B) % 6]``, ``x[..., arange(T)]``), and
    along which lists of plain integers do (``x[..., list(range(T))]``: Python's ``range`` and
    ``int`` turn a size into plain integers, which no mark follows): those of each such item of
    ``x[...]``, every dim for other ops (and for an index the parse cannot place). Another input
    picks other entries there, or more of them: ``arange(T)`` holds the same values at the same
    places for every ``T``, but picks more channels for a longer input."""
    data = [t for t in nested_tensors((rest, options)) if is_index(t) and _picks_more(ctx, t)]
    indexed = ctx.op.endswith("__getitem__") and len(rest) == 1
    items = (list(rest[0]) if isinstance(rest[0], tuple) else [rest[0]]) if indexed else []
    listed = [item for item in items if isinstance(item, list)]
    if not data and not listed:
        return []
    along = _picked_dim(ctx.op.rsplit(".", 1)[-1], x, rest, options)
    if along is not None:
        return [along]
    if not indexed or not all(isinstance(n, int) for item in listed for n in item):
        return list(range(x.dim()))  # a list of lists, slices or tensors: read as torch reads it
    if any(not any(t is item for item in items) for t in data):  # nested in a list
        return list(range(x.dim()))
    return _item_dims(x, items, lambda item: isinstance(item, list) or any(item is t for t in data))


def _picks_more(ctx: TraceContext, t: Tensor) -> bool:
    """Whether the index ``t`` may pick other entries, or more of them, for another input: it
    picks by the data, or it was made from a size (``arange(T)``), unless it only repeats a
    tensor made neither way along dims it stretches (``idx.expand(B, 4)``, ``idx[None].expand(B,
    -1)`` of a fixed ``idx``: a view of all of ``idx``, its other dims ``idx``'s own). Such a
    repeat holds ``idx``'s values for every size, repeated along dims its labels repeat along."""
    if not ctx.gathers_by_data(t):  # neither picked by the data nor made from a size
        return False
    if ctx.picks_by_data(t):
        return True
    base = t._base
    if base is None or ctx.gathers_by_data(base) or t.storage_offset() != base.storage_offset():
        return True
    kept = [(n, s) for n, s in zip(t.shape, t.stride(), strict=True) if s and n > 1]
    return kept != [(n, s) for n, s in zip(base.shape, base.stride(), strict=True) if n > 1]


# Ops that pick entries along one dim and keep every other coordinate (``gather(x, d, i)[.., j,
# ..] = x[.., i[.., j, ..], ..]``): where the dim argument is, positionally and by name.
_ALONG_ONE_DIM = {"gather": 0, "index_select": 0, "take_along_dim": 1}


def _picked_dim(short: str, x: Tensor, rest: tuple, options: dict) -> int | None:
    """The one dim of ``x`` along which ``gather``, ``index_select`` or ``take_along_dim``
    pick entries (their other dims keep their coordinates, whatever the index holds); None
    for other ops, a flattened ``take_along_dim`` and a dim that is not a plain int."""
    if short not in _ALONG_ONE_DIM or not x.dim():
        return None
    at = _ALONG_ONE_DIM[short]
    dim = options.get("dim", rest[at] if len(rest) > at else None)
    return dim % x.dim() if type(dim) is int else None


def _item_dims(x: Tensor, items: list[Any], picks: Callable[[Any], bool]) -> list[int]:
    """The dims of ``x`` that the items of the index ``x[items]`` for which ``picks`` holds
    address."""
    widths = [index_width(item) for item in items]
    dims, d = [], 0
    for k, (item, width) in enumerate(zip(items, widths, strict=True)):
        if item is Ellipsis:
            d = x.dim() - sum(w for i, w in zip(items[k + 1 :], widths[k + 1 :], strict=True)
                              if i is not Ellipsis)  # fmt: skip
            continue
        if picks(item):
            dims += range(d, d + width)
        d += width
    return dims


def _size_placed_dims(ctx: TraceContext, x: Tensor, rest: tuple, options: dict) -> list[int]:
    """The dims of ``x`` along which numbers computed from sizes place entries (``h.roll(B,
    1)``, ``h[:, B - 5]``, ``h.narrow(1, 0, B)``): for an input of another shape they place
    other entries there, so the labels along them must be one (along the batch or the sequence
    they are already)."""
    short = ctx.op.rsplit(".", 1)[-1]
    if short not in PLACED_BY_NUMBERS or not x.dim() or not from_size((rest, options)):
        return []
    if short == "__getitem__":
        items = list(rest[0]) if isinstance(rest[0], tuple) else [rest[0]]
        return _item_dims(x, items, from_size)
    if short == "roll":
        dims = options.get("dims", rest[1] if len(rest) > 1 else None)
    elif short in ("narrow", "select"):
        dims = options.get("dim", rest[0] if rest else 0)
    else:  # split, tensor_split, chunk (dim 0 unless given), repeat_interleave (flattened)
        default = None if short == "repeat_interleave" else 0
        dims = options.get("dim", rest[1] if len(rest) > 1 else default)
    if dims is None:  # over the flattened tensor
        return list(range(x.dim()))
    return [d % x.dim() for d in (dims if isinstance(dims, (tuple, list)) else [dims])]


# A product of sizes as a monomial ``coef * prod(sizes of dims)``: ``(coef, dims)`` with the dims
# of a reshape's input whose sizes may change (see :func:`_mixed_by_inferred_size`).
_Monomial = tuple[Fraction, frozenset]


def _times(a: _Monomial, size: int | _Monomial) -> _Monomial:
    b = size if isinstance(size, tuple) else (Fraction(size), frozenset())
    return (a[0] * b[0], a[1] | b[1])


def _boundaries(sizes: list[int | _Monomial]) -> list[_Monomial]:
    """The products of the last ``k`` of ``sizes`` for ``k = 0 .. len(sizes)`` (the strides of
    a contiguous tensor of those sizes, innermost first, then its numel)."""
    out = [(Fraction(1), frozenset())]
    for size in reversed(sizes):
        out.append(_times(out[-1], size))
    return out


def _reshape_spec(rest: tuple, options: dict) -> tuple | None:
    """The shape a ``view``/``reshape`` asks for, when given as ints, plain or computed from
    sizes or values (else None)."""
    spec = options.get("shape", options.get("size", rest[0] if len(rest) == 1 else rest))
    spec = (spec,) if isinstance(spec, int) else spec
    if not isinstance(spec, (tuple, list)):
        return None
    ints = all(isinstance(n, int) and not isinstance(n, bool) for n in spec)
    return tuple(spec) if ints else None


def _mixed_by_inferred_size(
    ctx: TraceContext, x: Tensor, terms: Sum, rest: tuple, options: dict
) -> list[int]:
    """The dims of ``x`` whose labels a ``view``/``reshape`` whose ``-1`` or sizes computed
    from sizes (see :func:`_aligned`) mix with a size: for an input of another size it places
    other channels there (``[B, 6] -> [6, B]``), so the labels along them must be one.

    Dims along which the labels are constant may change size (symbols); the others hold a fixed
    number of channels. Boundaries that are the same product of sizes on both sides cut the
    reshape into groups; a group is safe when its input holds only channels, only symbols, or
    symbols outside ``C`` channels, the output's strides within it being fixed numbers or
    multiples of ``C`` (channel ``= offset mod C``, whatever the sizes). A flatten of the
    trailing dims after one or more kept leading ones is left to what ``torch.flatten`` of
    them gets, and so are channels outside a symbol when the shape holds sizes (the unfolding
    of patches, ``[B, C, H, W] -> [B C H / 2, 2, W / 2, 2]``); a shape the rule cannot read
    (sizes computed from sizes, apart) is left as a shape given by numbers."""
    spec = _reshape_spec(rest, options)
    if ctx.op.rsplit(".", 1)[-1] not in ("view", "reshape") or spec is None or 0 in spec:
        return []
    marked = [from_size(n) for n in spec]
    if spec.count(-1) > 1 or (-1 not in spec and not any(marked)):
        return []
    varying = {d for nodes, _ in terms for d, n in enumerate(compact(nodes).shape) if n > 1}
    sizes = [n if d in varying or (n == 1 and not ctx.ones_in_inputs) else
             (Fraction(1), frozenset([d])) for d, n in enumerate(x.shape)]  # fmt: skip
    if len(varying) == x.dim():
        return []
    kept = len(spec) - 1
    if kept and spec[-1] == -1 and spec[:-1] == tuple(x.shape[:kept]):
        if not any(marked[d] and d in varying for d in range(kept)):
            return []  # x.view(x.shape[0], -1): judged as torch.flatten(x, 1) is
    before = _boundaries(sizes)
    read = _aligned(spec, marked, x.shape, sizes, before[-1])
    if read is not None and not read[0]:
        return []
    after = _boundaries(read[0]) if read is not None else []
    cuts = set(before) & set(after)
    if read is None or (read[1] is not None and not _symbols_only(before, after, cuts, read[1])):
        return []  # not read: left as a shape given by numbers
    low_in, low_out = _lowest_cuts(before, cuts), _lowest_cuts(after, cuts)
    inner_first = list(reversed(range(x.dim())))
    mixed = []
    for low in set(low_in):
        group = [d for d, at in zip(inner_first, low_in, strict=True) if at == low]
        strides = [b for b, at in zip(after, low_out, strict=False) if at == low]
        if not _keeps_channels(low, [sizes[d] for d in group], strides, any(marked)):
            mixed += [d for d in group if d in varying]
    return mixed


def _aligned(
    spec: tuple, marked: list[bool], shape: torch.Size, sizes: list[int | _Monomial],
    numel: _Monomial,
) -> tuple[list[int | _Monomial], int | None] | None:  # fmt: skip
    """The sizes ``spec`` asks for (``marked``: those computed from sizes), and the place
    (innermost first) of an entry that stands for several of them; None when they cannot be
    read. Those that repeat the input's first or last sizes in place (``view(*x.shape[:-1],
    -1, 4)``, with sizes read as plain numbers) are taken as those sizes, a marked one only in
    the place of a symbol. The others computed from sizes, and the ``-1``, must be adjacent:
    they are taken as one size, ``numel`` over the product of the rest (a whole number of
    channels when some are marked). No sizes (``[]``) when there are none: the marked ones are
    the input's own, kept in place, the rest plain."""
    out: list[int | _Monomial] = list(spec)

    def same(k: int) -> bool:  # spec[k] is the input's size in place
        return spec[k] == shape[k] != -1 and (not marked[k] or isinstance(sizes[k], tuple))

    places = min(len(spec), len(shape))
    lead = 0
    while lead < places and same(lead):
        out[lead], lead = sizes[lead], lead + 1
    trail = 1
    while trail <= places - lead and same(-trail):
        out[-trail], trail = sizes[-trail], trail + 1
    unknown = [k for k in range(lead, len(spec) - trail + 1) if spec[k] == -1 or marked[k]]
    given = (Fraction(1), frozenset())
    for k, n in enumerate(out):
        given = given if k in unknown else _times(given, n)
    if not unknown:  # the rest plain numbers: a fixed arrangement
        return [], None
    rest = (numel[0] / given[0], numel[1] - given[1])
    if unknown[-1] - unknown[0] + 1 != len(unknown) or not given[1] <= numel[1]:
        return None
    if any(marked) and rest[0].denominator != 1:
        return None  # a plain number stands for a size (``view(B, 7, -1, 6)``, 7 a length)
    out[unknown[0] : unknown[-1] + 1] = [rest]
    return out, (len(out) - 1 - unknown[0] if len(unknown) > 1 else None)


def _symbols_only(
    before: list[_Monomial], after: list[_Monomial], cuts: set[_Monomial], place: int
) -> bool:
    """Whether the output size at ``place`` (innermost first) that stands for several given
    sizes spans whole input dims that hold only symbols (``[B T, C] -> [B, T, C]``): any split
    of it then keeps the channels where they are."""
    low, high = after[place], after[place + 1]
    if low not in cuts or high not in cuts:
        return False
    first, last = before.index(low), len(before) - 1 - before[::-1].index(high)
    return all(before[k + 1][0] == before[k][0] for k in range(first, last))


def _lowest_cuts(bounds: list[_Monomial], cuts: set[_Monomial]) -> list[_Monomial]:
    """For each size of a shape (innermost first, its stride ``bounds[k]``), the largest cut at
    or below its stride: the group of the reshape it belongs to."""
    low, out = bounds[0], []
    for b in bounds[:-1]:
        low = b if b in cuts else low
        out.append(low)
    return out


def _keeps_channels(
    low: _Monomial, sizes: list[int | _Monomial], strides: list[_Monomial], flat: bool = False
) -> bool:
    """Whether a group of a reshape (input ``sizes`` innermost first, output ``strides``, from
    the cut ``low``) places the same channels at every output index whatever the symbols.
    ``flat``: channels outside a symbol are left to what ``torch.flatten`` of them gets (they
    move along an output dim whose size holds the symbol); only output strides that hold a
    symbol and are no multiple of the channels mix them."""
    channels = math.prod(n for n in sizes if not isinstance(n, tuple))
    symbols = [k for k, n in enumerate(sizes) if isinstance(n, tuple)]
    if channels == 1 or not symbols:
        return True
    if not flat and any(not isinstance(n, tuple) and n > 1 for n in sizes[symbols[0] :]):
        return False  # channels outside a symbol: their stride changes with it
    return all(
        not stride[1] - low[1] or (stride[0] / low[0] / channels).denominator == 1
        for stride in strides
    )


def index_width(item: Any) -> int:
    """How many dims of the indexed tensor one item of an index consumes."""
    if item is None or item is Ellipsis or isinstance(item, bool):
        return 0
    if isinstance(item, Tensor) and item.dtype == torch.bool:
        return item.dim()
    return 1


# Index dtypes that torch reads as masks, not as lists of rows.
_MASKS = (torch.bool, torch.uint8)


def _getitem_index(ctx: TraceContext, p: Tensor, rest: tuple, options: dict) -> Any:
    """The index ``i`` when an op on the parameter ``p`` is ``p[i]`` with an integer or an
    integer tensor ``i`` (slices of ``p`` along dim 0: one expert's weights, or one per token),
    also spelt ``p[i, :]``, ``p[i, ...]``, ``p[(i,)]`` (whole slices along the other dims) or
    with a list of plain integers (``p[[2, 0, 1]]``, which torch reads as the tensor of them),
    else None. Such a list counts as computed from a size: Python's ``range(T)`` and ``int(T)``
    turn a size into plain integers, which no mark follows, so ``list(range(T))`` may name
    other slices for another input (the list's slices are read as slices picked by the data,
    never as slices at constant places)."""
    if not ctx.op.endswith("__getitem__") or options or len(rest) != 1 or ctx.is_gathered(p):
        return None
    items = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
    if not items or not all(i is Ellipsis or _whole(i) for i in items[1:]):
        return None
    i = items[0]
    if isinstance(i, list) and i and all(type(n) is int for n in i):
        index = torch.tensor(i)
        ctx.mark_sized(index)  # values maybe computed from a size (see above)
        return index
    if isinstance(i, Tensor):  # torch reads a uint8 index as a mask, as a bool one
        masked = i.is_floating_point() or i.is_complex() or i.dtype in _MASKS
        return None if masked else i
    return i if isinstance(i, int) and not isinstance(i, bool) else None


def _whole(item: Any) -> bool:
    """Whether an item of an index is ``:``, the whole dim."""
    if not isinstance(item, slice):
        return False
    return item.start is None and item.stop is None and item.step is None


def _rows_picked(ctx: TraceContext, p: Tensor, rest: tuple, options: dict) -> list | None:
    """The rows along dim 0 that each output of an op on the parameter ``p`` holds, when the
    op takes whole slices of ``p`` along dim 0 at places fixed by plain numbers (``p[a:b]``,
    ``p[a:b, ...]``, ``p.narrow(0, a, n)``, ``p.select(0, i)``, ``p.chunk(k)``, ``p.split(s)``,
    ``p.tensor_split(k)``, ``p.unbind()``): an index tensor per output (0-d for a single slice),
    read as slices gathered at constant rows. None for any other op or form."""
    short = ctx.op.rsplit(".", 1)[-1]
    if not p.dim() or ctx.is_gathered(p) or tensor_args(rest, options):
        return None
    every = torch.arange(p.shape[0])
    if short == "__getitem__" and len(rest) == 1 and not options:
        items = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        whole = all(i is Ellipsis or i == slice(None) for i in items[1:])
        first = items[0] if items else None
        return (
            [every[first]] if isinstance(first, slice) and _plain_slice(first) and whole else None
        )
    bound = _bind_dim(short, rest, options)
    if bound is None or bound[0] % p.dim() != 0:
        return None
    args = bound[1]
    if short in ("narrow", "select"):
        return [every.narrow(0, *args)] if short == "narrow" else [every[args[0]]]
    if short == "unbind":
        return list(every.unbind())
    return list(getattr(torch, short)(every, *args))


# The ops that take slices along one dim: (0 when their dim comes first after the tensor, 1 when
# second; how many other arguments they need).
_SLICING = {"narrow": (0, 2), "select": (0, 1), "chunk": (1, 1), "split": (1, 1),
            "tensor_split": (1, 1), "unbind": (0, 0)}  # fmt: skip


def _bind_dim(short: str, rest: tuple, options: dict) -> tuple[int, tuple] | None:
    """``(dim, other arguments)`` of a slicing op (see :data:`_SLICING`) called with plain
    numbers, or None."""
    if short not in _SLICING or set(options) - {"dim"}:
        return None
    at, needed = _SLICING[short]
    if at == 0:  # dim first: narrow(dim, start, length), select(dim, index), unbind(dim)
        dim = options.get("dim", rest[0] if rest else 0)
        args = rest[1:] if rest and "dim" not in options else rest
    else:  # chunk(chunks, dim), split(size, dim), tensor_split(sections, dim)
        dim = options.get("dim", rest[1] if len(rest) > 1 else 0)
        args = rest[:1]
    if not isinstance(dim, int) or len(args) != needed:
        return None
    numbers = [n for a in args for n in (a if isinstance(a, (list, tuple)) else [a])]
    if not all(type(n) is int for n in numbers):  # no tensor, truth value or size
        return None
    return dim, tuple(args)


def _plain_slice(item: slice) -> bool:
    """Whether the bounds and step of ``item`` are plain ints or None (no tensor, no size)."""
    return all(n is None or type(n) is int for n in (item.start, item.stop, item.step))


BUILTIN.add("Tensor.T", _on_labels)
BUILTIN.add("Tensor.mT", _on_labels)
