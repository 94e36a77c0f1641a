"""The op-rule registry's built-in rules for entrywise, structural and reducing ops.

Each rule states how one op transforms log-factors (see :mod:`gaugefix.structure.trace`):

- *pass-through* ops (ReLU-like, pooling, reshaping, concatenation) move labels along;
- addition makes its operands' labels equal (a residual connection merges channels);
- a product of two rescaled tensors carries the sum of their labels; a parameter times a tensor
  produces its output channels (an RMSNorm gain written by hand, LayerScale);
- assignment into a tensor allocated in the forward (``t[..., a:b] = x``, ``copy_``,
  ``index_put_``) gives the entries written the labels of ``x``, like a concatenation;
- everything else blocks: its inputs keep factor 1. Ops not registered here block by default.

The affine ops (linear maps, convolutions, norms, matrix products, embeddings) are in
:mod:`gaugefix.structure.affine`, attention in :mod:`gaugefix.structure.attention`. Every rule
takes ``(ctx, result, ...)`` followed by the op's own parameters, bound by name. Users add rules
for their own functions or module types with :func:`register_rule` (or per ``discover`` call);
:func:`elementwise` and :func:`blocker` are ready-made rules.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.context import UNCHANGED, ZERO, Sum, TraceContext, compact
from gaugefix.structure.marks import from_size
from gaugefix.structure.provenance import PLACED_BY_NUMBERS, is_index, nested_tensors
from gaugefix.structure.registry import BUILTIN

__all__ = [
    "blocker",
    "distinct_params",
    "elementwise",
    "funcs",
    "reduce_onto",
    "register_all",
    "scalar",
    "tensor_args",
]


def tensor_args(*values: Any) -> list[Tensor]:
    """The tensors among ``values`` (dicts contribute their values)."""
    flat = [v for x in values for v in (x.values() if isinstance(x, dict) else
            x if isinstance(x, (list, tuple)) else [x])]  # fmt: skip
    return [t for t in flat if isinstance(t, Tensor)]


def funcs(*names: str, modules: tuple = (torch, torch.Tensor, F)) -> list[Any]:
    """The callables spelled ``name`` in torch, on Tensor and in torch.nn.functional."""
    found = []
    for name in names:
        for mod in modules:
            f = getattr(mod, name, None)
            if callable(f) and f not in found:
                found.append(f)
    return found


def register_all(callables: list[Any], rule: Any) -> None:
    """Make ``rule`` the built-in rule of each callable."""
    for f in callables:
        BUILTIN.add(f, rule)


def scalar(x: Any) -> bool:
    """Whether ``x`` is a number (``2``, ``0.5``, ``1j``, ``True``, ``np.float32(2)``), not a
    tensor."""
    return isinstance(x, numbers.Number)


def constant(x: Any, values: tuple = (0,)) -> bool:
    """Whether ``x`` is a number among ``values`` that no size gave: one computed from a size
    (``x.shape[0] - 5``, see :class:`~gaugefix.structure.marks.SizedInt`) may equal it at the
    example's shape only."""
    return scalar(x) and x in values and not from_size(x)


def block_other_tensors(ctx: TraceContext, tensors: list[Tensor], what: str) -> None:
    """Fix the parameters and block the labels of tensors that must not be rescaled."""
    for t in tensors:
        if ctx.is_param(t):
            ctx.fix(t, ctx.reason(f"parameter used as {what}"))
        else:
            ctx.block(ctx.terms(t), ctx.reason(what))


def distinct_params(ctx: TraceContext, *tensors: Any) -> bool:
    """Whether the parameters among ``tensors`` (an op's arguments) are different parameters.
    The roles one op gives a parameter add up (a weight's rows and columns), so a parameter in
    two roles of one op (``F.linear(x, W, W[0])``) would carry the sum of both roles' factors."""
    names = [ctx.param_name(t) for t in tensors if ctx.is_param(t)]
    return len(set(names)) == len(names)


def reduce_onto(ctx: TraceContext, nodes: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Nodes of a tensor broadcast against a smaller operand of ``shape`` (right-aligned):
    united along the dims where ``shape`` broadcasts, giving nodes of ``shape``."""
    lead = nodes.dim() - len(shape)
    broadcast = [lead + d for d, size in enumerate(shape) if size == 1]
    nodes = ctx.unite(nodes, [*range(lead), *broadcast])
    return nodes.reshape(nodes.shape[lead:]).expand(shape)


# --- pass-through ----------------------------------------------------------------------------
def elementwise(ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any) -> Sum:
    """A positively homogeneous op acting entry by entry on its first argument (ReLU, abs,
    dropout): the output carries the input's labels. Other tensor arguments must be fixed (for
    example a PReLU slope)."""
    labels = ctx.terms(input)
    block_other_tensors(ctx, tensor_args(rest, options), "extra tensor of a homogeneous op")
    if result is input:  # returned as it is (dropout in eval mode) or changed in place (relu_)
        return UNCHANGED  # its labels, even a product's, hold
    return labels


def blocker(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> Tensor:
    """An op that is not positively homogeneous: its inputs keep factor 1."""
    return ctx.block_all(args, kwargs, ctx.reason(f"not positively homogeneous: {ctx.op}"))


register_all(
    funcs(
        "relu", "relu_", "abs", "abs_", "absolute", "neg", "negative", "positive", "__abs__",
        "__neg__", "__pos__", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
        "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_",
    ),
    elementwise,
)  # fmt: skip


def _alpha_dropout(
    ctx: TraceContext, result: Any, input: Tensor, p: Any = 0.5, training: bool = False,
    inplace: bool = False,
) -> Any:  # fmt: skip
    """Alpha dropout: the identity in evaluation (or with ``p = 0``); in training it adds a
    constant to the dropped entries, which is not homogeneous."""
    if training and not constant(p):
        return blocker(ctx, result, input, p)
    return elementwise(ctx, result, input)


register_all(funcs("alpha_dropout", "feature_alpha_dropout"), _alpha_dropout)


def value_preserving(
    ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any
) -> Any:
    """Copies and casts (``contiguous``, ``to``, ``float``, ``type``, ``detach``...): the output
    carries the input's labels; applied to a parameter, the output is the same parameter. A tensor
    among the other arguments gives only a dtype or device (``x.to(y)``, ``x.type_as(y)``),
    none of its values. A cast to an integer or boolean dtype truncates: applied to a parameter,
    it fixes it (an activation's labels are blocked when it is recorded)."""
    for t in tensor_args(rest, options):
        ctx.claim(t)
    if not isinstance(result, Tensor):  # x.type(): the name of its type
        ctx.claim(input)
        return None
    if ctx.is_param(input) and result.shape == input.shape:
        if result is input:  # the parameter itself, not written
            ctx.claim(input)
            return UNCHANGED
        if not (result.is_floating_point() or result.is_complex()):  # truncated: not linear
            return ctx.block_all((input,), {}, ctx.reason("parameter cast to a non-floating dtype"))
        if ctx.is_gathered(input):  # a copy of gathered slices holds the same slices
            ctx.permuted_gather(result, input, tuple(range(input.dim())))
            return None
        ctx.view_of_param(result, input, torch.arange(input.numel()))
        return None
    return elementwise(ctx, result, input)


register_all(
    funcs(
        "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "cpu",
        "cuda", "type_as", "type",
    ),
    value_preserving,
)  # fmt: skip
BUILTIN.add("Tensor.data", value_preserving)


# --- extrema: maximum, minimum, clamps (ReLU written as max(h, 0)) ----------------------------
_UNMOVED = (0, math.inf, -math.inf)  # the numbers a positive factor leaves as they are


def _extremum(ctx: TraceContext, result: Any, input: Any, other: Any) -> Any:
    """``maximum(x, y)`` (``minimum``, ``fmax``, ``fmin``, ``max(x, y)``): ``max(a x, a y) = a
    max(x, y)`` for ``a > 0``, so both operands carry one factor, and so does the result;
    against a constant exactly 0 (made in the forward from numbers and shapes, see
    :meth:`TraceContext.zero_source`) the other operand's factors pass (``max(h, 0)`` is
    ReLU). A parameter, a buffer, data or any other value fixes the other operand."""
    if not (isinstance(input, Tensor) and isinstance(other, Tensor)):
        return blocker(ctx, result, input, other)
    for x, zero in ((input, other), (other, input)):
        if ctx.zero_source(zero) is not None and not ctx.is_param(x):
            return ctx.read_zero(zero, ctx.terms(x))
    labels = ctx.labels(input).expand(result.shape)
    ctx.union(labels, ctx.labels(other).expand(result.shape))
    return labels


def _clamp(ctx: TraceContext, result: Any, input: Tensor, min: Any = None, max: Any = None) -> Any:
    """``clamp(x, min, max) = minimum(maximum(x, min), max)``: each bound is None, a number a
    positive factor leaves as it is (0, +-inf), a constant exactly 0, or a tensor carrying the
    factors of ``x`` (then united with them)."""
    moved = [b for b in (min, max) if scalar(b) and not constant(b, _UNMOVED)]
    if moved or ctx.is_param(input):
        return blocker(ctx, result, input, min, max)
    labels = ctx.terms(input)
    for bound in (min, max):
        if ctx.zero_source(bound) is not None:
            ctx.read_zero(bound, labels)
        elif isinstance(bound, Tensor):
            labels = ctx.labels(input).expand(result.shape)
            ctx.union(labels, ctx.labels(bound).expand(result.shape))
    return labels


def _clamp_max(ctx: TraceContext, result: Any, input: Tensor, max: Any) -> Any:
    return _clamp(ctx, result, input, None, max)


def _hardtanh(
    ctx: TraceContext, result: Any, input: Tensor, min_val: Any = -1.0, max_val: Any = 1.0,
    inplace: bool = False,
) -> Any:  # fmt: skip
    """``hardtanh(x, min_val, max_val)`` is ``clamp``: homogeneous with bounds 0 and +-inf."""
    return _clamp(ctx, result, input, min_val, max_val)


def _threshold(
    ctx: TraceContext, result: Any, input: Tensor, threshold: Any, value: Any,
    inplace: bool = False,
) -> Any:  # fmt: skip
    """``threshold(x, t, v)``: ``x`` where ``x > t``, else ``v``; ReLU when ``t = v = 0``, not
    homogeneous otherwise."""
    if constant(threshold) and constant(value):
        return elementwise(ctx, result, input)
    return blocker(ctx, result, input)


register_all(funcs("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"), _clamp)
register_all(funcs("clamp_max", "clamp_max_"), _clamp_max)
register_all(funcs("hardtanh", "hardtanh_"), _hardtanh)
register_all(funcs("threshold", "threshold_", "_threshold"), _threshold)
register_all(funcs("maximum", "minimum", "fmax", "fmin"), _extremum)


# --- sums and products -------------------------------------------------------------------------
def _add(ctx: TraceContext, result: Any, input: Any, other: Any, *rest: Any, **options: Any) -> Any:
    """``a + b`` (and ``-``): both operands must carry one factor per entry, which they then
    share (a residual connection merges the channels of its operands into one generator). A
    parameter added to a tensor (a separate bias, a learned position embedding) carries that
    tensor's factors. Two operands that are rearrangements of each other (``x * cos +
    rotate_half(x) * sin``) tie the channels they swap: one rotary-pair generator each."""
    a, b = input, other
    for t in tensor_args(rest, options):
        if t is not b:
            ctx.block(ctx.terms(t), ctx.reason("extra tensor of an addition"))
    if not isinstance(a, Tensor):
        a, b = b, a
    if scalar(b):
        if not constant(b):
            return ctx.block_all((a,), {}, ctx.reason("a nonzero constant is added"))
        return ctx.terms(a)
    if ctx.is_param(a) and ctx.is_param(b):
        return ctx.block_all((a, b), {}, ctx.reason("sum of two parameters"))
    if ctx.is_param(a):
        a, b = b, a
    shape = tuple(result.shape)
    la = ctx.labels(a).expand(shape)
    if ctx.is_param(b):
        ctx.tie(b, reduce_onto(ctx, la, tuple(b.shape)))
        return la
    lb = ctx.labels(b).expand(shape)
    ca, cb = compact(la), compact(lb)
    if not torch.equal(ca, cb) and torch.equal(ca.unique(), cb.unique()) and ca.numel() > 1:
        ctx.tag(ca, "rotary pair")
    ctx.union(la, lb)
    return la


register_all(
    funcs("add", "add_", "sub", "sub_", "subtract", "__add__", "__radd__", "__iadd__",
          "__sub__", "__isub__"),
    _add,
)  # fmt: skip
BUILTIN.add(operator.add, _add)
_DIVISIONS = {"div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"}


def _mul(ctx: TraceContext, result: Any, input: Any, other: Any, rounding_mode: Any = None) -> Any:
    """``a * b`` and ``a / b``.

    - By a number or a fixed tensor: linear, the labels pass (a parameter scaled by a
      number stays that parameter).
    - A parameter times a tensor: the parameter produces the output channels (fresh factors)
      and consumes the tensor's: a per-channel gain, like a diagonal linear layer (an RMSNorm or
      LayerNorm gain written as ``weight * x_hat``, LayerScale ``gamma * x``).
    - Two rescaled tensors: the product carries the sum of their labels (a ReLU-gated unit
      ``relu(x W_g) * (x W_u)``: its consumer divides by both factors).
    Division by anything rescaled blocks.
    """
    a, b, out = input, other, result
    divide = ctx.op.rsplit(".", 1)[-1] in _DIVISIONS
    if divide and (rounding_mode is not None or not isinstance(a, Tensor)):
        return ctx.block_all((a, b), {}, ctx.reason("division with rounding or of a number"))
    if not isinstance(a, Tensor):
        a, b = b, a
    if isinstance(b, Tensor) and ctx.is_param(b):
        if ctx.is_param(a) or divide:
            return ctx.block_all((a, b), {}, ctx.reason("product with two parameters"))
        a, b = b, a
    if ctx.is_param(a):
        if scalar(b):
            if out.shape == a.shape and out is not a:
                ctx.view_of_param(out, a, torch.arange(a.numel()))
                return None
            return ctx.block_all((a,), {}, ctx.reason("parameter broadcast by a number"))
        if divide:
            return ctx.block_all((a, b), {}, ctx.reason("parameter divided by a tensor"))
        return _gain(ctx, a, b, out)
    if scalar(b) or ctx.is_fixed(b):
        if isinstance(b, Tensor):
            ctx.claim(b)
        return ctx.terms(a)
    if divide:
        return ctx.block_all((a, b), {}, ctx.reason("division by a rescaled tensor"))
    if ctx.is_fixed(a):
        ctx.claim(a)
        return ctx.terms(b)
    la, lb = ctx.terms(a), ctx.terms(b)
    ctx.tag(la, "gated unit")
    ctx.tag(lb, "gated unit")
    return Sum(la + lb)


def _gain(ctx: TraceContext, p: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """``p * x`` with a parameter ``p``: ``p`` produces fresh factors at its own shape and
    consumes ``x``'s factors reduced onto that shape."""
    shape = tuple(p.shape)
    if len(shape) > out.dim():
        return ctx.block_all((p, x), {}, ctx.reason("parameter with more dims than its product"))
    consumed = ctx.terms(x).map(lambda nodes: reduce_onto(ctx, nodes.expand(out.shape), shape))
    nodes = ctx.produce(p, *shape)
    ctx.consume(p, consumed)
    ctx.tag(nodes, "norm gain")
    return nodes


register_all(funcs("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"), _mul)
register_all(funcs(*_DIVISIONS), _mul)


def _where(ctx: TraceContext, result: Any, condition: Tensor, input: Any, other: Any) -> Any:
    """``torch.where(cond, a, b)``: the output takes entries of either operand, so they must
    carry one factor; selecting against a fixed value (a mask value) fixes the other operand,
    except against zero (zeroing entries is homogeneous). (``where(cond)`` alone gives index
    tensors and does not bind: it blocks.)"""
    if condition.is_floating_point():
        ctx.block(ctx.terms(condition), ctx.reason("condition of a where"))
    ctx.claim(condition)
    return _select(ctx, input, other, result)


def _select(ctx: TraceContext, a: Any, b: Any, out: Any) -> Any:
    if isinstance(b, Tensor) and not isinstance(a, Tensor):
        a, b = b, a
    if not isinstance(a, Tensor):
        return ZERO
    if ctx.zero_source(a) is not None:
        a, b = b, a
    if constant(b):
        return ctx.terms(a)
    if ctx.zero_source(b) is not None and isinstance(a, Tensor) and not ctx.is_param(a):
        return ctx.read_zero(b, ctx.terms(a))
    if not isinstance(a, Tensor):
        return ZERO
    if ctx.is_param(a) or (isinstance(b, Tensor) and ctx.is_param(b)):
        return ctx.block_all((a, b), {}, ctx.reason("parameter selected by a mask"))
    la = ctx.labels(a).expand(out.shape)
    if isinstance(b, Tensor) and not ctx.is_fixed(b):
        ctx.union(la, ctx.labels(b).expand(out.shape))
        return la
    if isinstance(b, Tensor):
        ctx.claim(b)
    ctx.block(la, ctx.reason("selected against a fixed value"))
    return la


def _masked_fill(ctx: TraceContext, result: Any, input: Tensor, mask: Tensor, value: Any) -> Any:
    """``x.masked_fill(mask, value)``: like ``where(mask, value, x)``."""
    ctx.claim(mask)
    return _select(ctx, input, value, result)


register_all(funcs("where"), _where)
register_all(funcs("masked_fill", "masked_fill_"), _masked_fill)


def _sign_test(ctx: TraceContext, result: Any, input: Any, other: Any = None) -> Any:
    """``x > 0`` (and ``>=``, ``<``, ``<=``, ``==``, ``!=`` against the number 0), ``sign(x)``:
    a positive factor keeps the sign of every entry, so the output is the same under every
    gauge (a mask of fixed log-factor 0) and ``x`` is not constrained. Against anything else a
    factor moves entries across the threshold: it blocks."""
    unary = ctx.op.rsplit(".", 1)[-1] in _SIGNS
    if isinstance(input, Tensor) and (unary or constant(other)):
        ctx.claim(input)
        return ZERO
    return blocker(ctx, result, input, other)


_SIGNS = ("sign", "sgn", "signbit")
_COMPARISONS = (
    "gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less", "less_equal",
    "not_equal", "__gt__", "__ge__", "__lt__", "__le__", "__eq__", "__ne__",
)  # fmt: skip
register_all(funcs(*_COMPARISONS, *_SIGNS), _sign_test)


# --- structural ops: apply the op to the labels themselves ----------------------------------
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
    widths = [_index_width(item) for item in items]
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


def _index_width(item: Any) -> int:
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


def _reduce(
    ctx: TraceContext, result: Any, input: Tensor, dim: Any = None, keepdim: bool = False,
    **options: Any,
) -> Any:  # fmt: skip
    """``sum``/``mean``/``amax`` over some dims: linear (or max-homogeneous) when the reduced
    entries share a factor, which the rule then enforces (term by term). ``dtype`` is the only
    option taken."""
    x = input
    if set(options) - {"dtype"} or isinstance(dim, Tensor):
        return blocker(ctx, result, input, dim, **options)
    if not isinstance(dim, (int, list, tuple)) or (isinstance(dim, (list, tuple)) and not dim):
        dims = list(range(x.dim()))
    else:  # a 0-d tensor takes dim 0 or -1 and has no dim to reduce
        dims = [d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)] if x.dim() else []

    def reduce(nodes: Tensor) -> Tensor:
        lab = ctx.unite(nodes.expand(x.shape), dims)
        return lab if keepdim else lab.squeeze(dims) if dims else lab

    if ctx.is_param(x):
        return ctx.block_all((x,), {}, ctx.reason("parameter reduced"))
    labels = ctx.terms(x).map(reduce)
    if isinstance(result, tuple):  # max(dim) returns (values, indices)
        return (labels, None)
    return labels


register_all(funcs("sum", "mean", "amax", "amin", "nansum"), _reduce)


def _reduce_max(ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any) -> Any:
    other = options.get("other", rest[0] if rest else None)
    if isinstance(other, Tensor):  # torch.max(a, b): not a reduction
        if len(rest) + len(options) != 1:
            return blocker(ctx, result, input, *rest, **options)
        return _extremum(ctx, result, input, other)
    return _reduce(ctx, result, input, *rest, **options)


register_all(funcs("max", "min"), _reduce_max)

# The arguments of the ops that rank entries along one dim, after the tensor, in order.
_RANKING = {"topk": ("k", "dim", "largest", "sorted"), "sort": ("dim", "descending", "stable")}


def _statistics(
    ctx: TraceContext, input: Tensor, dim: int | None, keepdim: bool, shape: torch.Size
) -> Sum:  # fmt: skip
    """The labels of order statistics of ``input`` (sorted entries, or convex combinations) along
    ``dim`` (every entry when None), of the output's ``shape``: the entries compared united, a
    reduced dim kept with size 1 when ``keepdim``, broadcast against leading dims of ``shape``
    (one per level of a ``quantile``)."""
    dims = list(range(input.dim())) if dim is None else [dim % input.dim()] if input.dim() else []

    def united(nodes: Tensor) -> Tensor:
        lab = ctx.unite(nodes.expand(input.shape), dims)
        return (lab if keepdim or not dims else lab.squeeze(dims)).expand(shape)

    return ctx.terms(input).map(united)


def _ranked(ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any) -> Any:
    """``topk(x, k, dim)`` and ``sort(x, dim)``: the entries along ``dim`` in the order of their
    values, and their places. A positive factor common to the entries along ``dim`` keeps their
    order, so they are united: the values carry that factor, the places (picked by the data)
    none. A parameter ranked, and a dim that is not a plain int, block."""
    names = _RANKING[ctx.op.rsplit(".", 1)[-1]]
    given = dict(zip(names, rest, strict=False)) | options
    dim = given.get("dim", -1)
    if (
        len(rest) > len(names) or set(given) - set(names) or type(dim) is not int
        or ctx.is_param(input) or not isinstance(result, tuple)
    ):  # fmt: skip
        return blocker(ctx, result, input, *rest, **options)
    return (_statistics(ctx, input, dim, True, result[0].shape), None)


register_all(funcs("topk", "sort"), _ranked)

# The ops that order the entries along one dim and return places or order statistics: their
# arguments after the tensor, in order; the dim when none is given (None: every entry, as if
# flattened); whether their values keep the input's shape (a cumulative extremum, a sort).
_ORDERED = {
    "argmax": (("dim", "keepdim"), None, False), "argmin": (("dim", "keepdim"), None, False),
    "argsort": (("dim", "descending", "stable"), -1, True), "msort": ((), 0, True),
    "kthvalue": (("k", "dim", "keepdim"), -1, False), "mode": (("dim", "keepdim"), -1, False),
    "median": (("dim", "keepdim"), None, False), "nanmedian": (("dim", "keepdim"), None, False),
    "cummax": (("dim",), 0, True), "cummin": (("dim",), 0, True),
}  # fmt: skip
# Those of them that return places only.
_PLACES = {"argmax", "argmin", "argsort"}


def _ordered(ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any) -> Any:
    """``argmax``/``argmin``/``argsort``, ``kthvalue``, ``median``/``nanmedian``, ``mode``,
    ``msort`` and ``cummax``/``cummin`` along ``dim`` (every entry when an ``argmax``,
    ``argmin`` or ``median`` takes none): a positive factor common to the entries compared
    keeps their order, ties included, so they are united. The places returned are then the same
    under the gauge and carry no factor; the values (an order statistic, a running extremum, a
    sorted copy) are entries of the input and carry that factor. A parameter compared, a dim
    that is not a plain int and any other argument block."""
    short = ctx.op.rsplit(".", 1)[-1]
    names, default, kept = _ORDERED[short]
    given = dict(zip(names, rest, strict=False)) | options
    dim = given.get("dim", default)
    if (
        len(rest) > len(names) or set(given) - set(names) or not isinstance(input, Tensor)
        or not (dim is None or type(dim) is int) or ctx.is_param(input)
    ):  # fmt: skip
        return blocker(ctx, result, input, *rest, **options)
    values = result[0] if isinstance(result, tuple) else result
    shape = input.shape if kept else values.shape
    labels = _statistics(ctx, input, dim, kept or values.dim() == input.dim(), shape)
    if short in _PLACES:
        return None
    return (labels, None) if isinstance(result, tuple) else labels


register_all(funcs(*_ORDERED), _ordered)

# The interpolations of ``quantile``/``nanquantile``: each a convex combination of the two order
# statistics next to the level, with weights set by the level and the number of entries (not NaN).
_INTERPOLATIONS = {"linear", "lower", "higher", "midpoint", "nearest"}


def _quantile(
    ctx: TraceContext, result: Any, input: Tensor, q: Any, dim: Any = None, keepdim: bool = False,
    *, interpolation: str = "linear", **options: Any,
) -> Any:  # fmt: skip
    """``quantile``/``nanquantile(x, q, dim)``: along ``dim`` (every entry when None), for each
    level in ``q``, a convex combination ``(1 - w) x_(k) + w x_(k+1)`` of two order statistics
    whose ``k`` and ``w`` depend on the level and on how many entries (not NaN) there are. A
    positive factor common to the entries compared keeps their order and their NaNs, so they are
    united and the output carries their factor. The levels must keep their values: a tensor ``q``
    is blocked (a parameter fixed). A parameter compared, a dim that is not a plain int, an
    unknown interpolation and any other argument (``out=``) block."""
    if (
        options or not isinstance(input, Tensor) or not (dim is None or type(dim) is int)
        or interpolation not in _INTERPOLATIONS or ctx.is_param(input)
    ):  # fmt: skip
        return blocker(ctx, result, input, q, dim, keepdim, **options)
    block_other_tensors(ctx, tensor_args(q), "quantile level")
    return _statistics(ctx, input, dim, keepdim, result.shape)


register_all(funcs("quantile", "nanquantile"), _quantile)


def _aminmax(ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any) -> Any:
    """``aminmax(x, dim=, keepdim=)``: the smallest and the largest entry along ``dim`` (every
    entry when None). A positive factor common to the entries compared keeps their order, so
    they are united and both values carry their factor. A parameter compared, a dim that is not
    a plain int and any other argument (``out=``) block."""
    dim, keepdim = options.get("dim"), options.get("keepdim", False)
    if (
        rest or set(options) - {"dim", "keepdim"} or not isinstance(input, Tensor)
        or not (dim is None or type(dim) is int) or ctx.is_param(input)
    ):  # fmt: skip
        return blocker(ctx, result, input, *rest, **options)
    labels = _statistics(ctx, input, dim, keepdim, result[0].shape)
    return (labels, labels)


register_all(funcs("aminmax"), _aminmax)


# --- channel-preserving maps of each leading slice (pooling, padding, upsampling) ------------
def _leading(k_of: Any) -> Any:
    """The rule of an op mapping each leading slice of its input on its own, over the last
    ``k_of(input)`` dims."""

    def rule(ctx: TraceContext, result: Any, input: Tensor, *rest: Any, **options: Any) -> Any:
        if ctx.is_param(input):
            return ctx.block_all((input,), {}, ctx.reason("parameter pooled"))
        labels = ctx.leading(input, k_of(input))
        block_other_tensors(ctx, tensor_args(rest, options), "extra tensor of a pooling op")
        if isinstance(result, tuple):  # (values, indices)
            return (labels, None)
        return labels

    return rule


def _pool_dims(n: int) -> Any:
    return _leading(lambda x: n)


for _n in (1, 2, 3):
    for _name in (f"max_pool{_n}d", f"avg_pool{_n}d", f"adaptive_avg_pool{_n}d",
                  f"adaptive_max_pool{_n}d", f"max_pool{_n}d_with_indices",
                  f"adaptive_max_pool{_n}d_with_indices"):  # fmt: skip
        register_all(funcs(_name, modules=(torch, F, torch._C._nn)), _pool_dims(_n))

BUILTIN.add(F.interpolate, _leading(lambda x: x.dim() - 2))
BUILTIN.add(F.upsample, _leading(lambda x: x.dim() - 2))


def _pad(
    ctx: TraceContext, result: Any, input: Tensor, pad: Any, mode: str = "constant",
    value: Any = None,
) -> Any:  # fmt: skip
    if mode == "constant" and value is not None and not constant(value):
        return blocker(ctx, result, input)
    if ctx.is_param(input):
        return ctx.block_all((input,), {}, ctx.reason("parameter padded"))
    return ctx.leading(input, len(pad) // 2)


BUILTIN.add(F.pad, _pad)


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
        _masked_fill(ctx, result, input, index, value)
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
        _masked_fill(ctx, result, input, indices[0], values)
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
        indexed = sum(_index_width(i) for i in indices)
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
    not floating, carries none (see :func:`_masked_fill`). Any other value is a write."""
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


# --- known blockers (they would block anyway; listing them gives a clearer reason) -----------
register_all(
    funcs(
        "gelu", "silu", "tanh", "sigmoid", "relu6", "softmax", "log_softmax", "elu", "selu",
        "celu", "softplus", "mish", "hardswish", "hardsigmoid", "exp", "log", "sqrt", "rsqrt",
        "pow", "square", "sin", "cos", "glu", "logsigmoid", "softsign", "tanhshrink",
        "hardshrink", "softshrink", "local_response_norm", "normalize", "erf", "lp_pool1d",
        "lp_pool2d", "__pow__",
    ),
    blocker,
)  # fmt: skip

# The affine and attention rules register themselves on import.
from gaugefix.structure import affine, attention  # noqa: E402, F401
