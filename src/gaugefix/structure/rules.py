"""The op-rule registry's built-in rules for entrywise, structural and reducing ops.

Each rule states how one op transforms log-factors (see :mod:`gaugefix.structure.trace`):

- *pass-through* ops (ReLU-like, pooling, reshaping, concatenation) move labels along;
- addition makes its operands' labels equal (a residual connection merges channels);
- a product of two rescaled tensors carries the sum of their labels; a parameter times a tensor
  produces its output channels (an RMSNorm gain written by hand, LayerScale);
- assignment into a tensor allocated in the forward (``t[..., a:b] = x``, ``copy_``,
  ``index_put_``) gives the entries written the labels of ``x``, like a concatenation;
- everything else blocks: its inputs keep factor 1. Ops not registered here block by default.

The structural ops (reshaping, slicing, indexing, concatenation) are in
:mod:`gaugefix.structure.structural`, the writes into tensors made in the forward in
:mod:`gaugefix.structure.writes`, the affine ops (linear maps, convolutions, norms, matrix
products, embeddings) in :mod:`gaugefix.structure.affine`, attention in
:mod:`gaugefix.structure.attention`. Every rule
takes ``(ctx, result, ...)`` followed by the op's own parameters, bound by name. Users add rules
for their own functions or module types with :func:`register_rule` (or per ``discover`` call);
:func:`elementwise` and :func:`blocker` are ready-made rules.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.context import UNCHANGED, ZERO, Sum, TraceContext, compact
from gaugefix.structure.marks import from_size
from gaugefix.structure.registry import BUILTIN

__all__ = [
    "block_other_tensors",
    "blocker",
    "constant",
    "distinct_params",
    "elementwise",
    "funcs",
    "masked_fill",
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


def masked_fill(ctx: TraceContext, result: Any, input: Tensor, mask: Tensor, value: Any) -> Any:
    """``x.masked_fill(mask, value)``: like ``where(mask, value, x)``."""
    ctx.claim(mask)
    return _select(ctx, input, value, result)


register_all(funcs("where"), _where)
register_all(funcs("masked_fill", "masked_fill_"), masked_fill)


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


# --- reductions and order statistics ----------------------------------------------------------
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

# The structural, writing, affine and attention rules register themselves on import.
from gaugefix.structure import affine, attention, structural, writes  # noqa: E402, F401
