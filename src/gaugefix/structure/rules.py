"""The op-rule registry's built-in rules for entrywise, structural and reducing ops.

Each rule states how one op transforms log-factors (see :mod:`gaugefix.structure.trace`):

- *pass-through* ops (ReLU-like, pooling, reshaping, concatenation) move labels along;
- addition makes its operands' labels equal (a residual connection merges channels);
- a product of two rescaled tensors carries the sum of their labels; a parameter times a tensor
  produces its output channels (an RMSNorm gain written by hand, LayerScale);
- everything else blocks: its inputs keep factor 1. Ops not registered here block by default.

The affine ops (linear maps, convolutions, norms, matrix products, embeddings) are in
:mod:`gaugefix.structure.affine`, attention in :mod:`gaugefix.structure.attention`. Users add
rules for their own functions or module types with :func:`register_rule`; the helpers
:func:`elementwise` and :func:`blocker` are ready-made rules.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.trace import ZERO, Sum, TraceContext, compact, register_rule


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` (positional) or ``name`` (keyword) of an op."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def tensor_args(args: tuple, kwargs: dict) -> list[Tensor]:
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, Tensor)]


def funcs(*names: str, modules: tuple = (torch, torch.Tensor, F)) -> list[Any]:
    """The callables spelled ``name`` in torch, on Tensor and in torch.nn.functional."""
    found = []
    for name in names:
        for mod in modules:
            f = getattr(mod, name, None)
            if f is not None and f not in found:
                found.append(f)
    return found


def register_all(callables: list[Any], rule: Any) -> None:
    for f in callables:
        register_rule(f, rule)


def scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def block_other_tensors(ctx: TraceContext, tensors: list[Tensor], what: str) -> None:
    """Fix the parameters and block the labels of tensors that must not be rescaled."""
    for t in tensors:
        if ctx.is_param(t):
            ctx.fix(t, ctx.reason(f"parameter used as {what}"))
        else:
            ctx.block(ctx.terms(t), ctx.reason(what))


def reduce_onto(ctx: TraceContext, nodes: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Nodes of a tensor broadcast against a smaller operand of ``shape`` (right-aligned):
    united along the dims where ``shape`` broadcasts, giving nodes of ``shape``."""
    lead = nodes.dim() - len(shape)
    nodes = compact(nodes)
    if lead > 0:
        flat = nodes.reshape(-1, *nodes.shape[lead:])
        ctx.union(flat, flat[:1])
        nodes = flat[0]
    for d, size in enumerate(shape):
        if size == 1 and nodes.shape[d] > 1:
            ctx.union(nodes, nodes.narrow(d, 0, 1))
            nodes = nodes.narrow(d, 0, 1)
    return nodes.expand(shape)


# --- pass-through ----------------------------------------------------------------------------
def elementwise(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Sum:
    """A positively homogeneous op acting entry by entry on its first argument (ReLU, abs,
    dropout): the output carries the input's labels. Other tensor arguments must be fixed (for
    example a PReLU slope)."""
    labels = ctx.terms(args[0])
    block_other_tensors(ctx, tensor_args(args[1:], kwargs), "extra tensor of a homogeneous op")
    return labels


def blocker(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """An op that is not positively homogeneous: its inputs keep factor 1."""
    return ctx.block_all(args, kwargs, ctx.reason(f"not positively homogeneous: {ctx.op}"))


register_all(
    funcs(
        "relu", "relu_", "abs", "abs_", "absolute", "neg", "negative", "positive", "__abs__",
        "__neg__", "__pos__", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
        "leaky_relu", "leaky_relu_", "prelu",
    ),
    elementwise,
)  # fmt: skip


def value_preserving(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """Copies and casts (``contiguous``, ``to``, ``float``, ``detach``...): the output carries
    the input's labels; applied to a parameter, the output is the same parameter."""
    x = args[0]
    if ctx.is_param(x) and isinstance(out, Tensor) and out.shape == x.shape:
        block_other_tensors(ctx, tensor_args(args[1:], kwargs), "extra tensor of a cast")
        if out is not x:
            ctx.view_of_param(out, x, torch.arange(x.numel()))
        return None
    return elementwise(ctx, args, kwargs, out)


register_all(
    funcs(
        "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "cpu",
        "cuda", "type_as",
    ),
    value_preserving,
)  # fmt: skip
register_rule("Tensor.data", value_preserving)


def _clamp(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    lo = arg(args, kwargs, 1, "min")
    hi = arg(args, kwargs, 2, "max")
    if isinstance(lo, (int, float)) and lo == 0 and hi is None:  # clamp(min=0) is ReLU
        return ctx.terms(args[0])
    return blocker(ctx, args, kwargs, out)


register_all(funcs("clamp", "clamp_", "clip", "clamp_min", "clamp_min_"), _clamp)


# --- sums and products -------------------------------------------------------------------------
def _add(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``a + b`` (and ``-``): both operands must carry one factor per entry, which they then
    share (a residual connection merges the channels of its operands into one generator). A
    parameter added to a tensor (a separate bias, a learned position embedding) carries that
    tensor's factors. Two operands that are rearrangements of each other (``x * cos +
    rotate_half(x) * sin``) tie the channels they swap: one rotary-pair generator each."""
    a, b = args[0], arg(args, kwargs, 1, "other")
    for t in tensor_args(args[2:], kwargs):
        if t is not b:
            ctx.block(ctx.terms(t), ctx.reason("extra tensor of an addition"))
    if not isinstance(a, Tensor):
        a, b = b, a
    if scalar(b):
        if b != 0:
            return ctx.block_all(args, kwargs, ctx.reason("a nonzero constant is added"))
        return ctx.terms(a)
    if ctx.is_param(a) and ctx.is_param(b):
        return ctx.block_all(args, kwargs, ctx.reason("sum of two parameters"))
    if ctx.is_param(a):
        a, b = b, a
    shape = tuple(out.shape)
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
register_rule(operator.add, _add)
_DIVISIONS = {"div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"}


def _mul(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
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
    a, b = args[0], arg(args, kwargs, 1, "other")
    divide = ctx.op.rsplit(".", 1)[-1] in _DIVISIONS
    if divide and (arg(args, kwargs, 2, "rounding_mode") is not None or not isinstance(a, Tensor)):
        return ctx.block_all(args, kwargs, ctx.reason("division with rounding or of a number"))
    if not isinstance(a, Tensor):
        a, b = b, a
    if isinstance(b, Tensor) and ctx.is_param(b):
        if ctx.is_param(a) or divide:
            return ctx.block_all(args, kwargs, ctx.reason("product with two parameters"))
        a, b = b, a
    if ctx.is_param(a):
        if scalar(b):
            if out.shape == a.shape and out is not a:
                ctx.view_of_param(out, a, torch.arange(a.numel()))
                return None
            return ctx.block_all(args, kwargs, ctx.reason("parameter broadcast by a number"))
        if divide:
            return ctx.block_all(args, kwargs, ctx.reason("parameter divided by a tensor"))
        return _gain(ctx, a, b, out)
    if scalar(b) or ctx.is_fixed(b):
        if isinstance(b, Tensor):
            ctx.claim(b)
        return ctx.terms(a)
    if divide:
        return ctx.block_all(args, kwargs, ctx.reason("division by a rescaled tensor"))
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


def _where(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``torch.where(cond, a, b)``: the output takes entries of either operand, so they must
    carry one factor; selecting against a fixed value (a mask value) fixes the other operand,
    except against zero (zeroing entries is homogeneous)."""
    if len(args) + len(kwargs) < 3:
        return ctx.block_all(args, kwargs, ctx.reason("where with one argument"))
    cond, a, b = args[0], arg(args, kwargs, 1, "input"), arg(args, kwargs, 2, "other")
    if isinstance(cond, Tensor):
        if cond.is_floating_point():
            ctx.block(ctx.terms(cond), ctx.reason("condition of a where"))
        ctx.claim(cond)
    return _select(ctx, a, b, out)


def _select(ctx: TraceContext, a: Any, b: Any, out: Any) -> Any:
    if isinstance(b, Tensor) and not isinstance(a, Tensor):
        a, b = b, a
    if not isinstance(a, Tensor):
        return ZERO
    if scalar(b) and b == 0:
        return ctx.terms(a)
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


def _masked_fill(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``x.masked_fill(mask, value)``: like ``where(mask, value, x)``."""
    x, mask, value = args[0], arg(args, kwargs, 1, "mask"), arg(args, kwargs, 2, "value")
    if isinstance(mask, Tensor):
        ctx.claim(mask)
    return _select(ctx, x, value, out)


register_all(funcs("where"), _where)
register_all(funcs("masked_fill", "masked_fill_"), _masked_fill)


# --- structural ops: apply the op to the labels themselves ----------------------------------
# Arrangements that hold every entry exactly once: applied to a parameter, they give a view of
# it that an affine rule can use (``x @ W.t()``).
_ARRANGEMENTS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "swapdims", "t", "T", "mT", "squeeze", "unsqueeze", "movedim", "moveaxis",
    "ravel", "flip", "roll",
}  # fmt: skip


def _on_labels(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """Reshaping, slicing, transposing, concatenating: the same op applied to the label tensor
    (each term of a sum) moves every label to where its entry went."""
    if any(isinstance(a, torch.dtype) for a in list(args) + list(kwargs.values())):
        return ctx.block_all(args, kwargs, ctx.reason("reinterprets the bits as another dtype"))
    first = args[0]
    for t in list(args[1:]) + list(kwargs.values()):  # shapes given as tensors (view_as)
        if isinstance(t, Tensor):
            ctx.claim(t)
    if isinstance(first, (list, tuple)):
        parts = [ctx.terms(t) for t in first]
        if any(len(p) > 1 or (p and p[0][1] != 1) for p in parts):
            parts = [Sum.of(ctx.single(p, t.shape)) for p, t in zip(parts, first, strict=True)]
        replaced = [(p[0][0] if p else ZERO.expand(t.shape)).contiguous() for p, t in
                    zip(parts, first, strict=True)]  # fmt: skip
        return ctx.func(replaced, *args[1:], **kwargs)
    if ctx.is_param(first):
        if ctx.op.rsplit(".", 1)[-1] in _ARRANGEMENTS and isinstance(out, Tensor):
            index = torch.arange(first.numel()).view(first.shape)
            ctx.view_of_param(out, first, ctx.func(index, *args[1:], **kwargs).reshape(-1))
            return None
        return ctx.block_all(args[:1], {}, ctx.reason("parameter sliced or repeated"))
    terms = ctx.terms(first)
    if not terms:
        return ZERO
    results = [ctx.func(nodes.contiguous(), *args[1:], **kwargs) for nodes, _ in terms]
    if isinstance(results[0], (tuple, list)):
        return tuple(
            Sum((r[i], s) for r, (_, s) in zip(results, terms, strict=True))
            for i in range(len(results[0]))
        )
    return Sum((r, s) for r, (_, s) in zip(results, terms, strict=True))


for _name in (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "swapdims", "t", "squeeze", "unsqueeze", "__getitem__", "narrow", "select",
    "expand", "expand_as", "repeat", "chunk", "split", "tensor_split", "unbind", "movedim",
    "moveaxis", "flip", "roll", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "ravel", "tile", "repeat_interleave",
):  # fmt: skip
    register_all(funcs(_name, modules=(torch, torch.Tensor)), _on_labels)
register_rule("Tensor.T", _on_labels)
register_rule("Tensor.mT", _on_labels)


def _reduce(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``sum``/``mean``/``amax`` over some dims: linear (or max-homogeneous) when the reduced
    entries share a factor, which the rule then enforces (term by term)."""
    x = args[0]
    dim = arg(args, kwargs, 1, "dim")
    keepdim = bool(arg(args, kwargs, 2, "keepdim", False))
    if not isinstance(dim, (int, list, tuple)) or (isinstance(dim, (list, tuple)) and not dim):
        dims = list(range(x.dim()))
    else:
        dims = [d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)]
    kept = [d for d in range(x.dim()) if d not in dims]

    def reduce(nodes: Tensor) -> Tensor:
        lab = nodes.expand(x.shape).permute(*kept, *dims)
        lab = lab.reshape(*[x.shape[d] for d in kept], -1)
        ctx.union(lab, lab[..., :1])
        lab = lab[..., 0]
        if keepdim:
            for d in sorted(dims):
                lab = lab.unsqueeze(d)
        return lab

    if ctx.is_param(x):
        return ctx.block_all(args[:1], {}, ctx.reason("parameter reduced"))
    labels = ctx.terms(x).map(reduce)
    if isinstance(out, tuple):  # max(dim) returns (values, indices)
        return (labels, None)
    return labels


register_all(funcs("sum", "mean", "amax", "amin", "nansum"), _reduce)


def _reduce_max(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    if isinstance(arg(args, kwargs, 1, "other"), Tensor):  # torch.max(a, b): not a reduction
        return blocker(ctx, args, kwargs, out)
    return _reduce(ctx, args, kwargs, out)


register_all(funcs("max", "min"), _reduce_max)


# --- channel-preserving maps of each leading slice (pooling, padding, upsampling) ------------
def _leading(k_of: Any) -> Any:
    def rule(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
        x = args[0]
        if ctx.is_param(x):
            return ctx.block_all(args, kwargs, ctx.reason("parameter pooled"))
        labels = ctx.leading(x, k_of(x, args, kwargs))
        block_other_tensors(ctx, tensor_args(args[1:], kwargs), "extra tensor of a pooling op")
        if isinstance(out, tuple):  # (values, indices)
            return (labels, None)
        return labels

    return rule


def _pool_dims(n: int) -> Any:
    return _leading(lambda x, a, k: n)


for _n in (1, 2, 3):
    for _name in (f"max_pool{_n}d", f"avg_pool{_n}d", f"adaptive_avg_pool{_n}d",
                  f"adaptive_max_pool{_n}d", f"max_pool{_n}d_with_indices",
                  f"adaptive_max_pool{_n}d_with_indices"):  # fmt: skip
        register_all(funcs(_name, modules=(torch, F, torch._C._nn)), _pool_dims(_n))

register_rule(F.interpolate, _leading(lambda x, a, k: x.dim() - 2))
register_rule(F.upsample, _leading(lambda x, a, k: x.dim() - 2))


def _pad(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    pad = arg(args, kwargs, 1, "pad")
    mode = arg(args, kwargs, 2, "mode", "constant")
    value = arg(args, kwargs, 3, "value", None)
    if mode == "constant" and value not in (None, 0, 0.0):
        return blocker(ctx, args, kwargs, out)
    if ctx.is_param(args[0]):
        return ctx.block_all(args, kwargs, ctx.reason("parameter padded"))
    return ctx.leading(args[0], len(pad) // 2)


register_rule(F.pad, _pad)


# --- known blockers (they would block anyway; listing them gives a clearer reason) -----------
register_all(
    funcs(
        "gelu", "silu", "tanh", "sigmoid", "relu6", "hardtanh", "softmax", "log_softmax", "elu",
        "selu", "celu", "softplus", "mish", "hardswish", "hardsigmoid", "exp", "log", "sqrt",
        "rsqrt", "pow", "square", "sin", "cos", "glu", "logsigmoid", "softsign", "tanhshrink",
        "hardshrink", "softshrink", "threshold", "rrelu", "alpha_dropout",
        "feature_alpha_dropout", "local_response_norm", "normalize", "erf", "sign", "lp_pool1d",
        "lp_pool2d", "__pow__",
    ),
    blocker,
)  # fmt: skip

# The affine and attention rules register themselves on import.
from gaugefix.structure import affine, attention  # noqa: E402, F401
