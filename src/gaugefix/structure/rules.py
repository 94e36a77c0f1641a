"""The op-rule registry's built-in rules.

Each rule states how one op transforms gauge factors (see :mod:`gaugefix.structure.trace`):

- *producers* (linear, convolutions, the affine part of norms) give their output channels the
  row labels of their weight and bias;
- *consumers* (the same linear maps, seen from their input) tie their weight's columns to the
  labels of the input channels;
- *pass-through* ops (ReLU-like, pooling, reshaping, concatenation, addition) move labels along;
- everything else blocks: its inputs keep factor 1. Ops not registered here block by default.

Users add rules for their own functions or module types with :func:`register_rule`; the helpers
:func:`elementwise` and :func:`blocker` are ready-made rules.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.trace import TraceContext, register_rule


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _tensor_args(args: tuple, kwargs: dict) -> list[Tensor]:
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, Tensor)]


def _funcs(*names: str, modules: tuple = (torch, torch.Tensor, F)) -> list[Any]:
    """The callables spelled ``name`` in torch, on Tensor and in torch.nn.functional."""
    found = []
    for name in names:
        for mod in modules:
            f = getattr(mod, name, None)
            if f is not None and f not in found:
                found.append(f)
    return found


def _register(funcs: list[Any], rule: Any) -> None:
    for f in funcs:
        register_rule(f, rule)


# --- pass-through ----------------------------------------------------------------------------
def elementwise(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """A positively homogeneous op acting entry by entry on its first argument (ReLU, abs,
    dropout, dtype casts): the output carries the input's labels. Other tensor arguments must be
    fixed (for example a PReLU slope)."""
    labels = ctx.labels(args[0])
    for t in _tensor_args(args[1:], kwargs):
        if ctx.is_param(t):
            ctx.fix(t, ctx.reason("dimensionless parameter of a homogeneous op"))
        else:
            ctx.block(ctx.labels(t), ctx.reason("extra tensor of a homogeneous op"))
    return labels


def blocker(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """An op that is not positively homogeneous: its inputs keep factor 1."""
    return ctx.block_all(args, kwargs, ctx.reason(f"not positively homogeneous: {ctx.op}"))


_register(
    _funcs(
        "relu", "relu_", "abs", "abs_", "absolute", "neg", "negative", "positive", "__abs__",
        "__neg__", "__pos__", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
        "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "cpu",
        "cuda", "leaky_relu", "leaky_relu_", "prelu",
    ),
    elementwise,
)  # fmt: skip
register_rule("Tensor.data", elementwise)


def _clamp(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    lo = _arg(args, kwargs, 1, "min")
    hi = _arg(args, kwargs, 2, "max")
    if isinstance(lo, (int, float)) and lo == 0 and hi is None:  # clamp(min=0) is ReLU
        return ctx.labels(args[0])
    return blocker(ctx, args, kwargs, out)


_register(_funcs("clamp", "clamp_", "clip", "clamp_min", "clamp_min_"), _clamp)


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fixed_operand(ctx: TraceContext, t: Any) -> bool:
    """Whether a multiplier is a fixed tensor (all entries carry factor 1)."""
    if ctx.is_param(t):
        ctx.fix(t, ctx.reason("parameter used as a multiplier"))
        return True
    return bool((ctx.labels(t) == 0).all())


def _mul(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """``x * c`` and ``x / c``: linear when ``c`` is a number or a fixed tensor."""
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if ctx.op.rsplit(".", 1)[-1] in _DIVISIONS:
        if _arg(args, kwargs, 2, "rounding_mode") is None and isinstance(a, Tensor):
            if _scalar(b) or (isinstance(b, Tensor) and _fixed_operand(ctx, b)):
                return ctx.labels(a)
        return ctx.block_all(args, kwargs, ctx.reason("division by a rescaled tensor"))
    if not isinstance(a, Tensor):
        a, b = b, a
    if _scalar(b) or (isinstance(b, Tensor) and _fixed_operand(ctx, b)):
        return ctx.labels(a)
    if isinstance(b, Tensor) and _fixed_operand(ctx, a):
        return ctx.labels(b)
    return ctx.block_all(args, kwargs, ctx.reason("product of two rescaled tensors"))


_DIVISIONS = {"div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"}
_register(_funcs("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"), _mul)
_register(_funcs("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"), _mul)


def _add(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """``a + b`` (and ``-``): both operands must carry one factor per entry, which they then
    share (a residual connection merges the channels of its operands into one gauge neuron)."""
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if not isinstance(a, Tensor):
        a, b = b, a
    if _scalar(b):
        if b != 0:
            return ctx.block_all(args, kwargs, ctx.reason("a nonzero constant is added"))
        return ctx.labels(a)
    la, lb = ctx.labels(a), ctx.labels(b)
    ctx.union(la, lb)
    return torch.broadcast_tensors(la, lb)[0]


_register(
    _funcs("add", "add_", "sub", "sub_", "subtract", "__add__", "__radd__", "__iadd__",
           "__sub__", "__isub__"),
    _add,
)  # fmt: skip
register_rule(operator.add, _add)


# --- structural ops: apply the op to the labels themselves ----------------------------------
def _on_labels(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """Reshaping, slicing, transposing, concatenating: the same op applied to the label tensor
    moves every label to where its entry went."""
    if any(isinstance(a, torch.dtype) for a in list(args) + list(kwargs.values())):
        return ctx.block_all(args, kwargs, ctx.reason("reinterprets the bits as another dtype"))
    first = args[0]
    if isinstance(first, (list, tuple)):
        replaced = [ctx.labels(t).contiguous() for t in first]
    else:
        replaced = ctx.labels(first).contiguous()
    for t in list(args[1:]) + list(kwargs.values()):  # shapes given as tensors (view_as)
        if isinstance(t, Tensor):
            ctx.claim(t)
    return ctx.func(replaced, *args[1:], **kwargs)


for _name in (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "swapaxes", "swapdims", "t", "squeeze", "unsqueeze", "__getitem__", "narrow", "select",
    "expand", "expand_as", "repeat", "chunk", "split", "tensor_split", "unbind", "movedim",
    "moveaxis", "flip", "roll", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "ravel", "tile", "repeat_interleave",
):  # fmt: skip
    _register(_funcs(_name, modules=(torch, torch.Tensor)), _on_labels)
register_rule("Tensor.T", _on_labels)
register_rule("Tensor.mT", _on_labels)


def _reduce(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``sum``/``mean``/``amax`` over some dims: linear (or max-homogeneous) when the reduced
    entries share a factor, which the rule then enforces."""
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    if not isinstance(dim, (int, list, tuple)) or (isinstance(dim, (list, tuple)) and not dim):
        dims = list(range(x.dim()))
    else:
        dims = [d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)]
    kept = [d for d in range(x.dim()) if d not in dims]
    lab = ctx.labels(x).permute(*kept, *dims)
    lab = lab.reshape(*[x.shape[d] for d in kept], -1)
    ctx.union(lab, lab[..., :1])
    lab = lab[..., 0]
    if keepdim:
        for d in sorted(dims):
            lab = lab.unsqueeze(d)
    if isinstance(out, tuple):  # max(dim) returns (values, indices)
        return (lab, None)
    return lab


_register(_funcs("sum", "mean", "amax", "amin", "nansum"), _reduce)


def _reduce_max(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    if isinstance(_arg(args, kwargs, 1, "other"), Tensor):  # torch.max(a, b): not a reduction
        return blocker(ctx, args, kwargs, out)
    return _reduce(ctx, args, kwargs, out)


_register(_funcs("max", "min"), _reduce_max)


# --- channel-preserving maps of each leading slice (pooling, padding, upsampling) ------------
def _leading(k_of: Any) -> Any:
    def rule(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
        x = args[0]
        k = k_of(x, args, kwargs)
        lab = ctx.leading(x, k)
        for t in _tensor_args(args[1:], kwargs):
            ctx.block(ctx.labels(t), ctx.reason("extra tensor of a pooling op"))
        if isinstance(out, tuple):  # (values, indices)
            return (lab, None)
        return lab

    return rule


def _pool_dims(n: int) -> Any:
    return _leading(lambda x, a, k: n)


for _n in (1, 2, 3):
    for _name in (f"max_pool{_n}d", f"avg_pool{_n}d", f"adaptive_avg_pool{_n}d",
                  f"adaptive_max_pool{_n}d", f"max_pool{_n}d_with_indices",
                  f"adaptive_max_pool{_n}d_with_indices"):  # fmt: skip
        _register(_funcs(_name, modules=(torch, F, torch._C._nn)), _pool_dims(_n))

register_rule(F.interpolate, _leading(lambda x, a, k: x.dim() - 2))
register_rule(F.upsample, _leading(lambda x, a, k: x.dim() - 2))


def _pad(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    pad = _arg(args, kwargs, 1, "pad")
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3, "value", None)
    if mode == "constant" and value not in (None, 0, 0.0):
        return blocker(ctx, args, kwargs, out)
    return ctx.leading(args[0], len(pad) // 2)


register_rule(F.pad, _pad)


# --- producers and consumers -----------------------------------------------------------------
def _affine_or_block(ctx: TraceContext, args: tuple, kwargs: dict, out: Any, *params: Any) -> bool:
    """Whether all the given (non-None) weights are real parameters; blocks everything if not."""
    if all(p is None or ctx.is_param(p) for p in params):
        return True
    ctx.block_all(args, kwargs, ctx.reason("weight is not a parameter of the model"))
    return False


def _linear(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not _affine_or_block(ctx, args, kwargs, out, w, b):
        return torch.zeros((), dtype=torch.long)
    cols = ctx.along(x, -1)
    rows = ctx.param_rows(w, w.shape[0], 1)
    ctx.tie_cols(w, cols.view(1, -1))
    if b is not None:
        ctx.tie_rows(b, rows.view(-1))
    return rows.view(-1)


register_rule(F.linear, _linear)


def _conv(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    groups = _arg(args, kwargs, 6, "groups", 1)
    if not _affine_or_block(ctx, args, kwargs, out, w, b):
        return torch.zeros((), dtype=torch.long)
    spatial = w.dim() - 2
    cin = ctx.along(x, x.dim() - spatial - 1)
    c_out, c_in_g = w.shape[0], w.shape[1]
    group = torch.arange(c_out) // (c_out // groups)
    col = cin[group[:, None] * c_in_g + torch.arange(c_in_g)[None, :]]
    ctx.tie_cols(w, col.view(c_out, c_in_g, *([1] * spatial)))
    rows = ctx.param_rows(w, c_out, *([1] * (w.dim() - 1)))
    if b is not None:
        ctx.tie_rows(b, rows.view(-1))
    return rows.view(c_out, *([1] * spatial))


_register(_funcs("conv1d", "conv2d", "conv3d", modules=(torch, F)), _conv)


def _norm(w_pos: int, b_pos: int | None, per_channel: bool) -> Any:
    """Norm layers: their input is normalised (its scale is lost, so it is blocked) and their
    affine weight and bias produce the output channels (per channel, dim 1, for batch and group
    norm; per entry of the normalised trailing shape for layer and RMS norm)."""

    def rule(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
        x = args[0]
        w = _arg(args, kwargs, w_pos, "weight")
        b = None if b_pos is None else _arg(args, kwargs, b_pos, "bias")
        ctx.block(ctx.labels(x), ctx.reason(f"normalised by {ctx.op}"))
        for t in _tensor_args(args, kwargs):  # running statistics are buffers
            if t is not w and t is not b and t is not x:
                ctx.block(ctx.labels(t), ctx.reason(f"statistics of {ctx.op}"))
        if w is None:
            if b is not None:
                ctx.block(ctx.labels(b), ctx.reason(f"bias without weight in {ctx.op}"))
            return torch.zeros((), dtype=torch.long)
        if not _affine_or_block(ctx, args, kwargs, out, w, b):
            return torch.zeros((), dtype=torch.long)
        rows = ctx.param_rows(w, *w.shape)
        if b is not None:
            ctx.tie_rows(b, rows)
        return rows.view(-1, *([1] * (x.dim() - 2))) if per_channel else rows

    return rule


register_rule(F.batch_norm, _norm(3, 4, per_channel=True))
register_rule(F.group_norm, _norm(2, 3, per_channel=True))
register_rule(F.layer_norm, _norm(2, 3, per_channel=False))
register_rule(F.rms_norm, _norm(2, None, per_channel=False))


# --- known blockers (they would block anyway; listing them gives a clearer reason) -----------
_register(
    _funcs(
        "gelu", "silu", "tanh", "sigmoid", "relu6", "hardtanh", "softmax", "log_softmax", "elu",
        "selu", "celu", "softplus", "mish", "hardswish", "hardsigmoid", "exp", "log", "sqrt",
        "pow", "square", "sin", "cos", "glu", "logsigmoid", "softsign", "tanhshrink",
        "hardshrink", "softshrink", "threshold", "rrelu", "alpha_dropout",
        "feature_alpha_dropout", "instance_norm", "local_response_norm", "normalize", "erf",
        "sign", "matmul", "mm", "bmm", "einsum", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "embedding", "lp_pool1d", "lp_pool2d", "__pow__", "__matmul__",
    ),
    blocker,
)  # fmt: skip
