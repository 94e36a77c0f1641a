"""Rules for affine ops: linear maps, convolutions, norm layers, matrix products, embeddings.

A weight *produces* the channels of its output (fresh factors multiply its output rows, and its
bias carries the same factors) and *consumes* the channels of its input (its input columns are
divided by their factors). A contraction of two rescaled activations (``q @ k.transpose(-2,
-1)``) requires opposite factors along the contracted dim (one query-key generator per pair of
dims) and gives an invariant result; with one operand fixed (attention weights ``P @ v``) the
other's factors pass through.
"""

from __future__ import annotations

import inspect
import string
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.context import WEIGHT_NORM_DIRECTION, ZERO, Sum, TraceContext
from gaugefix.structure.registry import BUILTIN
from gaugefix.structure.rules import (
    distinct_params,
    funcs,
    reduce_onto,
    register_all,
    scalar,
    tensor_args,
)
from gaugefix.structure.trace import EMPTY_INPUT

__all__: list[str] = []


def _params_or_block(ctx: TraceContext, x: Any, *params: Any) -> bool:
    """Whether all the given (non-None) weights are parameters, each a different one; blocks
    everything if not."""
    if not all(p is None or ctx.is_param(p) for p in params):
        reason = "weight is not a parameter of the model"
    elif not distinct_params(ctx, *params):
        reason = "one parameter in two roles of the op"
    else:
        return True
    ctx.block_all((x, *params), {}, ctx.reason(reason))
    return False


# --- linear layers and convolutions ------------------------------------------------------------
def _linear(
    ctx: TraceContext, result: Any, input: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``F.linear(x, W [out, in] or [in], b)``: ``W``'s rows produce the output's last dim (a
    1-d ``W`` one output entry), its columns consume ``x``'s; ``b``, broadcast to the output,
    carries the factors of the rows it is added to."""
    x, w, b = input, weight, bias
    if not _params_or_block(ctx, x, w, b):
        return ZERO
    if not distinct_params(ctx, x, w, b):
        return ctx.block_all((x, w, b), {}, ctx.reason("one parameter in two roles of the op"))
    if not x.numel():  # no row read (``latents.expand(0, -1, -1)``): nothing shown, all fixed
        return ctx.block_all((x, w, b), {}, ctx.reason(EMPTY_INPUT))
    # a fixed input (a constant such as ``eye``) states its factor 0 as a term on node 0: the
    # use keeps the form of a linear map, so a weight read by it and by a rescaled input as
    # well is one role, with the columns fixed
    cols = _table_columns(ctx, x) or ctx.along_terms(x, -1) or Sum.of(ZERO.expand(x.shape[-1]))
    rows = ctx.produce(w, *w.shape[:-1], 1).view(w.shape[:-1])
    ctx.consume(w, cols.map(lambda c: c.view(*([1] * (w.dim() - 1)), -1)))
    if b is not None:
        ctx.tie(b, reduce_onto(ctx, rows.expand(result.shape), tuple(b.shape)))
    return rows


BUILTIN.add(F.linear, _linear)


def _table_columns(ctx: TraceContext, x: Tensor) -> Sum:
    """The factors of a parameter ``x [..., in]`` read by a linear map as its input (learned
    queries ``F.linear(latents, W)``, maybe copied over a batch, ``latents.expand(B, -1,
    -1)``): like an embedding table, its columns produce the channels of its last dim, one
    factor per column for every row. Empty for an activation, and for slices picked by an index
    (which fix the parameter, as a plain tensor)."""
    if not ctx.is_param(x) or (ctx.is_gathered(x) and not ctx.holds_every_slice(x)):
        return Sum()
    return Sum.of(ctx.produce(x, *([1] * (x.dim() - 1)), x.shape[-1]).view(-1))


def _conv(
    ctx: TraceContext, result: Any, input: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
) -> Tensor:  # fmt: skip
    x, w, b = input, weight, bias
    if not _params_or_block(ctx, x, w, b) or (ctx.is_param(x) and not ctx.is_gathered(x)):
        return ctx.block_all((x, w, b), {}, ctx.reason("convolution of a parameter"))
    spatial = w.dim() - 2
    cin = ctx.along_terms(x, x.dim() - spatial - 1)
    c_out, c_in_g = w.shape[0], w.shape[1]
    group = torch.arange(c_out) // (c_out // groups)
    gather = group[:, None] * c_in_g + torch.arange(c_in_g)[None, :]
    ctx.consume(w, cin.map(lambda c: c[gather].view(c_out, c_in_g, *([1] * spatial))))
    rows = ctx.produce(w, c_out, *([1] * (w.dim() - 1)))
    if b is not None:
        ctx.tie(b, rows.view(-1))
    return rows.view(c_out, *([1] * spatial))


register_all(funcs("conv1d", "conv2d", "conv3d", modules=(torch, F)), _conv)


def _conv_transpose(
    ctx: TraceContext, result: Any, input: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride: Any = 1, padding: Any = 0, output_padding: Any = 0, groups: int = 1,
    dilation: Any = 1,
) -> Tensor:  # fmt: skip
    """A transposed convolution's weight is ``[in, out / groups, *kernel]``: dim 0 consumes
    the input channels, dim 1 (within each group) produces the output channels."""
    x, w, b = input, weight, bias
    if not _params_or_block(ctx, x, w, b) or (ctx.is_param(x) and not ctx.is_gathered(x)):
        return ctx.block_all((x, w, b), {}, ctx.reason("transposed convolution of a parameter"))
    spatial = w.dim() - 2
    c_in, c_out_g = w.shape[0], w.shape[1]
    c_out = c_out_g * groups
    cin = ctx.along_terms(x, x.dim() - spatial - 1)
    ctx.consume(w, cin.map(lambda c: c.view(c_in, 1, *([1] * spatial))))
    group = torch.arange(c_in) // (c_in // groups)
    out_of = group[:, None] * c_out_g + torch.arange(c_out_g)[None, :]
    rows = ctx.produce(
        w, c_out, arrange=lambda nodes: nodes[out_of].view(c_in, c_out_g, *([1] * spatial))
    )
    if b is not None:
        ctx.tie(b, rows)
    return rows.view(c_out, *([1] * spatial))


register_all(
    funcs("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", modules=(torch, F)),
    _conv_transpose,
)


# --- weights computed from parameters -----------------------------------------------------------
WHOLE_TENSOR = -1  # torch._weight_norm's dim for one norm of all of v (and one gain g)


def _weight_norm_gain_shape(v: Tensor, dim: Any) -> tuple[int, ...] | None:
    """The shape of the gain ``g`` in ``torch._weight_norm(v, g, dim)``: ``v.shape[dim]`` at
    ``dim`` and 1 elsewhere (one gain per slice along ``dim``), ``()`` for one norm of all of
    ``v`` (``dim = -1``); None for a dim whose slices are not read that way (another negative
    dim) or a 0-d ``v``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or v.dim() == 0:
        return None
    if dim == WHOLE_TENSOR:
        return ()
    if not 0 <= dim < v.dim():
        return None
    return tuple(n if d == dim else 1 for d, n in enumerate(v.shape))


def _weight_norm(ctx: TraceContext, result: Any, v: Tensor, g: Tensor, dim: Any = 0) -> Any:
    """``torch._weight_norm(v, g, dim)``: ``w = g v / ||v||`` (norms of the slices of ``v``
    along ``dim``, or of all of ``v``), the forward of ``weight_norm`` (the parametrization and
    the hook). ``w`` is ``g`` broadcast times a tensor that only ``v`` sets, so rescaling an
    entry of ``g`` rescales the entries of ``w`` it multiplies, and nothing else: ``w`` is
    recorded as an arrangement of ``g`` that names each gain at every entry it multiplies (the
    op using ``w`` gives those entries one factor). ``v`` is fixed: rescaling its slices
    changes nothing (a redundancy of the parametrization, not a symmetry of the function)."""
    shape = _weight_norm_gain_shape(v, dim)
    if (
        shape is None or not ctx.is_param(g) or ctx.is_gathered(g)
        or not distinct_params(ctx, v, g) or not isinstance(result, Tensor)
        or result.shape != v.shape or (tuple(g.shape) != shape if shape else g.numel() != 1)
    ):  # fmt: skip
        return ctx.block_all((v, g), {}, ctx.reason("weight norm of another form"))
    ctx.block_all((v,), {}, ctx.reason(WEIGHT_NORM_DIRECTION))
    index = torch.arange(g.numel()).view(g.shape).expand(v.shape)
    ctx.view_of_param(result, g, index.reshape(-1))
    return None


BUILTIN.add(torch._weight_norm, _weight_norm)


# --- norm layers ---------------------------------------------------------------------------------
def _norm(signature: inspect.Signature, per_channel: bool) -> Any:
    """The rule of a norm layer op: its input is normalised (its scale is lost, so it is
    blocked) and its affine weight and bias produce the output channels (per channel, dim 1, for
    batch, group and instance norm; per entry of the normalised trailing shape for layer and RMS
    norm, whose weights are norm gains). Arguments are bound to the op's own ``signature``."""

    def rule(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> Tensor:
        bound = signature.bind(*args, **kwargs).arguments
        x, w, b = bound["input"], bound.get("weight"), bound.get("bias")
        ctx.block(ctx.terms(x), ctx.reason(f"normalised by {ctx.op}"))
        for t in tensor_args(bound):  # running statistics are buffers
            if t is not w and t is not b and t is not x:
                ctx.block(ctx.terms(t), ctx.reason(f"statistics of {ctx.op}"))
        if w is None:
            if b is not None:
                ctx.block_all((b,), {}, ctx.reason(f"bias without weight in {ctx.op}"))
            return ZERO
        if not _params_or_block(ctx, x, w, b):
            return ZERO
        rows = ctx.produce(w, *w.shape)
        if b is not None:
            ctx.tie(b, rows)
        if per_channel:
            return rows.view(-1, *([1] * (x.dim() - 2)))
        ctx.tag(rows, "norm gain")
        return rows

    return rule


def _aten_signature(name: str) -> inspect.Signature | None:
    """The Python signature of ``torch.<name>``, a builtin without one, read from the schema
    of its only ATen overload besides ``out`` (``torch.batch_norm(input, weight, bias,
    running_mean, ...)`` orders its arguments unlike ``F.batch_norm``); None if it has several
    (a call with ``out=`` does not bind: it blocks)."""
    packet = getattr(torch.ops.aten, name)
    if "default" not in packet.overloads() or set(packet.overloads()) - {"default", "out"}:
        return None  # an ``out`` overload differs only by keyword-only outputs
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    empty = inspect.Parameter.empty
    return inspect.Signature([
        inspect.Parameter(a.name, kinds[a.kwarg_only],
                          default=a.default_value if a.has_default_value() else empty)
        for a in packet.default._schema.arguments
    ])  # fmt: skip


# The norm ops (per channel or not), spelled in torch.nn.functional and in torch; each
# spelling binds its arguments to its own signature.
_NORMS = {"batch_norm": True, "instance_norm": True, "group_norm": True,
          "layer_norm": False, "rms_norm": False}  # fmt: skip
for _name, _per_channel in _NORMS.items():
    BUILTIN.add(getattr(F, _name), _norm(inspect.signature(getattr(F, _name)), _per_channel))
    _signature = _aten_signature(_name) if hasattr(torch, _name) else None
    if _signature is not None:
        BUILTIN.add(getattr(torch, _name), _norm(_signature, _per_channel))


def _with_statistics(rule: Any) -> Any:
    """The rule of ``torch.native_layer_norm`` (``native_batch_norm``, ``native_group_norm``):
    ``(output, mean, inverse standard deviation)``. The norm's rule blocks the input, so the
    statistics of the input carry the fixed factor."""

    def native(ctx: TraceContext, result: Any, *args: Any, **kwargs: Any) -> tuple:
        return (rule(ctx, result, *args, **kwargs), ZERO, ZERO)

    return native


for _name, _per_channel in _NORMS.items():
    _signature = _aten_signature(f"native_{_name}") if hasattr(torch, f"native_{_name}") else None
    if _signature is not None:
        BUILTIN.add(
            getattr(torch, f"native_{_name}"), _with_statistics(_norm(_signature, _per_channel))
        )


# --- embeddings ----------------------------------------------------------------------------------
def _embedding(
    ctx: TraceContext, result: Any, input: Tensor, weight: Tensor, padding_idx: Any = None,
    max_norm: Any = None, *rest: Any, **options: Any,
) -> Tensor:  # fmt: skip
    """``F.embedding(ids, W)``: the output holds rows of ``W``, so ``W``'s columns produce the
    output's channels (the same factor for every row)."""
    ctx.claim(input)
    if not ctx.is_param(weight) or max_norm is not None:
        reason = ctx.reason("embedding renormalised or not a parameter")
        return ctx.block_all((weight,), {}, reason)
    return ctx.produce(weight, 1, weight.shape[1]).view(-1)


BUILTIN.add(F.embedding, _embedding)


def _embedding_bag(
    ctx: TraceContext, result: Any, input: Tensor, weight: Tensor, offsets: Any = None,
    max_norm: Any = None, norm_type: Any = 2, scale_grad_by_freq: Any = False,
    mode: Any = "mean", sparse: Any = False, per_sample_weights: Any = None,
    include_last_offset: Any = False, padding_idx: Any = None,
) -> Tensor:  # fmt: skip
    """``F.embedding_bag(ids, W [num, dim], offsets)``: each output row is the sum, mean or
    maximum of rows of ``W`` (a sum weighted by fixed ``per_sample_weights``), so ``W``'s
    columns produce the output's channels, as for :func:`F.embedding`. Weights that carry a
    factor, rows renormalised in place (``max_norm``) and the table passed first (the legacy
    order, which the op swaps) block."""
    weights = per_sample_weights
    if input.is_floating_point():
        reason = ctx.reason("embedding_bag with the table passed first")
        return ctx.block_all((input, weight, weights), {}, reason)
    if weights is not None and not ctx.is_fixed(weights):
        reason = ctx.reason("bag of rows weighted by a rescaled tensor")
        return ctx.block_all((weight, weights), {}, reason)
    if isinstance(offsets, Tensor):
        ctx.claim(offsets)
    return _embedding(ctx, result, input, weight, None, max_norm)


BUILTIN.add(F.embedding_bag, _embedding_bag)


# --- matrix products ------------------------------------------------------------------------------
def contract(ctx: TraceContext, a: Tensor, b: Tensor, out: Tensor) -> Any:
    """The labels of ``a @ b`` (matmul semantics: vectors, matrices, broadcast batches).

    A parameter matrix produces and consumes like a linear layer (``x @ W`` with ``W [in,
    out]``, ``W @ x`` with ``W [out, in]``); a batch of parameter matrices (expert weights
    gathered per token, ``W[expert_ids] @ x``, ``x`` maybe broadcast over the top-k) does so
    batch entry by batch entry (a parameter broadcast over ``x``'s batch blocks). Between two
    activations: when one is fixed, the other's labels pass, united along the contracted dim
    (the attention-weighted sum ``P @ v`` passes value dims: value-output generators); otherwise
    the contracted dim pairs opposite factors (``q @ k^T``: query-key generators) and the result
    is invariant. Two parameter matrices: see :func:`product_of_parameters`.
    """
    vec_a, vec_b = a.dim() == 1, b.dim() == 1
    if ctx.is_param(a) and ctx.transpose_of(b) is not None:  # F.linear(a, W) spelled a @ W.T
        ctx.claim(b)
        return _linear(ctx, out, a, ctx.transpose_of(b))
    if ctx.is_param(a) and ctx.is_param(b):
        if a.dim() > 2 or b.dim() > 2:
            return ctx.block_all((a, b), {}, ctx.reason("batched product of two parameters"))
        rows, cols = ("", "k") if vec_a else ("m", "mk"), ("", "k") if vec_b else ("n", "kn")
        return product_of_parameters(ctx, f"{rows[1]},{cols[1]}->{rows[0]}{cols[0]}", a, b)
    if ctx.is_param(a) or ctx.is_param(b):
        w, x = (a, b) if ctx.is_param(a) else (b, a)
        batch = w.shape[:-2]
        if w.dim() > 2 and torch.broadcast_shapes(batch, x.shape[:-2]) != batch:
            return ctx.block_all((a, b), {}, ctx.reason("batched parameter broadcast in a product"))
        batch = string.ascii_uppercase[: max(a.dim() - 1 + vec_a, b.dim() - 1 + vec_b) - 1]
        spec_a = batch[len(batch) - a.dim() + 2 - vec_a :] + ("k" if vec_a else "mk")
        spec_b = batch[len(batch) - b.dim() + 2 - vec_b :] + ("k" if vec_b else "kn")
        equation = f"{spec_a},{spec_b}->{batch}{'' if vec_a else 'm'}{'' if vec_b else 'n'}"
        return einsum_with_parameter(ctx, equation, a, b)
    la = ctx.terms(a).map(lambda n: n.unsqueeze(0) if vec_a else n)
    lb = ctx.terms(b).map(lambda n: n.unsqueeze(-1) if vec_b else n)
    if not la or not lb:
        if not la and not lb:
            return ZERO
        if not la:  # linear in b: united over the contracted dim
            labels = lb.map(lambda n: ctx.unite(n, [-2]))
        else:
            labels = la.map(lambda n: ctx.unite(n, [-1]))
        ctx.tag(labels, "value-output")
        if vec_a:
            labels = labels.map(lambda n: n.squeeze(-2))
        if vec_b:
            labels = labels.map(lambda n: n.squeeze(-1))
        return labels
    shape_a = (1, *a.shape) if vec_a else tuple(a.shape)
    shape_b = (*b.shape, 1) if vec_b else tuple(b.shape)
    qa = ctx.unite(ctx.single(la, torch.Size(shape_a)), [-2])  # [..., 1, k]
    qb = ctx.unite(ctx.single(lb, torch.Size(shape_b)), [-1]).transpose(-1, -2)  # [..., 1, k]
    ctx.union(qa, qb, -1)
    ctx.tag(qa, "query-key")
    ctx.tag(qb, "query-key")
    return ZERO


def _matmul(
    ctx: TraceContext, result: Any, input: Any, other: Any = None, *, mat2: Any = None,
    vec: Any = None,
) -> Any:  # fmt: skip
    a, b = input, next((t for t in (other, mat2, vec) if t is not None), None)
    if ctx.op.endswith("__rmatmul__"):
        a, b = b, a
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return ctx.block_all(tensor_args(a, b), {}, ctx.reason("product with a non-tensor"))
    return contract(ctx, a, b, result)


register_all(funcs("matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "mv"), _matmul)
register_all(funcs("matmul", modules=(torch.linalg,)), _matmul)


def _multi_dot(ctx: TraceContext, result: Any, tensors: Any, *, out: Any = None) -> Any:
    """``linalg.multi_dot([a, b])``: ``a @ b`` (a 1-D first operand a row vector, a 1-D last
    one a column vector, as ``matmul`` reads them). A longer chain blocks its operands: the
    products it forms inside, in an order it picks, are not seen."""
    pair = isinstance(tensors, (list, tuple)) and len(tensors) == 2 and out is None
    if not (pair and all(isinstance(t, Tensor) for t in tensors)):
        why = ctx.reason("multi_dot of other than two tensors, or with out=")
        return ctx.block_all(tensor_args(tensors, out), {}, why)
    return contract(ctx, *tensors, result)


register_all(funcs("multi_dot", modules=(torch.linalg,)), _multi_dot)


def _addmm(
    ctx: TraceContext, result: Any, input: Tensor, mat1: Any = None, mat2: Any = None, *,
    beta: Any = 1, alpha: Any = 1, batch1: Any = None, batch2: Any = None, mat: Any = None,
    vec: Any = None,
) -> Any:  # fmt: skip
    """``beta * input + alpha * (mat1 @ mat2)`` (``addmm``, ``baddbmm(input, batch1, batch2)``,
    ``addmv(input, mat, vec)``, the operands positional or named): the product's labels, with
    ``input`` added like a bias (a parameter there carries the product's factors, as in Hugging
    Face's ``Conv1D``; a constant 0, such as ``zeros``, any factor)."""
    bias = input
    a = next((t for t in (mat1, batch1, mat) if t is not None), None)
    b = next((t for t in (mat2, batch2, vec) if t is not None), None)
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return ctx.block_all(tensor_args(bias, a, b), {}, ctx.reason("product with a non-tensor"))
    if not (scalar(beta) and scalar(alpha)):
        return ctx.block_all((bias, a, b), {}, ctx.reason("beta or alpha is not a number"))
    if not distinct_params(ctx, bias, a, b):
        return ctx.block_all((bias, a, b), {}, ctx.reason("one parameter in two roles of the op"))
    labels = ctx.single(Sum.of(contract(ctx, a, b, result)), result.shape)
    if ctx.is_param(bias):
        ctx.tie(bias, reduce_onto(ctx, labels, tuple(bias.shape)))
    elif ctx.zero_source(bias) is not None:
        return ctx.read_zero(bias, labels)
    else:
        ctx.union(ctx.labels(bias).expand(result.shape), labels)
    return labels


register_all(funcs("addmm", "baddbmm", "addmv"), _addmm)


def _grouped_mm(
    ctx: TraceContext, result: Any, mat_a: Tensor, mat_b: Tensor, *, offs: Tensor | None = None,
    bias: Any = None, out_dtype: Any = None,
) -> Any:  # fmt: skip
    """``grouped_mm(x [S, k], W [E, k, n], offs)``: rows ``offs[e-1]:offs[e]`` of ``x`` are
    multiplied by ``W[e]`` (the experts of a mixture, tokens sorted by expert): the same as
    ``W[group] @ x`` row by row, with ``group`` read off the offsets."""
    if offs is None or bias is not None or mat_a.dim() != 2 or not ctx.is_param(mat_b):
        return ctx.block_all((mat_a, mat_b, bias), {}, ctx.reason("grouped_mm of this form"))
    ctx.claim(offs)
    groups = torch.bucketize(torch.arange(mat_a.shape[0]), offs.long().cpu(), right=True)
    if bool((groups >= mat_b.shape[0]).any()):  # rows past the last offset are left unwritten
        return ctx.block_all((mat_a, mat_b), {}, ctx.reason("grouped_mm with rows past offs"))
    weights = ctx.gathered(mat_b, groups, offs if ctx.picks_by_data(offs) else None)
    return einsum_with_parameter(ctx, "sk,skn->sn", mat_a, weights)


for _name in ("_grouped_mm", "grouped_mm"):
    register_all(funcs(_name, modules=(torch, F)), _grouped_mm)


# --- einsum --------------------------------------------------------------------------------------
def _einsum(ctx: TraceContext, result: Any, equation: Any, *operands: Any) -> Any:
    """``torch.einsum`` of one or two activations, or of an activation and a parameter (a
    linear map: ``"bi,oi->bo"``, ``"...i,oi->...o"``, ``"bsh,hd->bsd"``): letters summed away
    must share a factor; between two rescaled activations the contracted letters pair opposite
    factors and the result is invariant; with one fixed operand the other's labels pass."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or not 1 <= len(operands) <= 2:
        return ctx.block_all(operands, {}, ctx.reason("einsum of more than two operands"))
    parsed = _parse_einsum(equation, [t.dim() for t in operands])
    if parsed is None:
        return ctx.block_all(operands, {}, ctx.reason("einsum with a repeated letter"))
    inputs, output = parsed
    if any(ctx.is_param(t) for t in operands):
        if len(operands) == 1:
            return ctx.block_all(operands, {}, ctx.reason("einsum of a parameter alone"))
        spelled = f"{inputs[0]},{inputs[1]}->{output}"
        if all(ctx.is_param(t) for t in operands) and _reads_as_linear(*inputs, output):
            return _linear(ctx, result, *operands)  # "ld,ed->le": F.linear(latents, W)
        if all(ctx.is_param(t) for t in operands):
            return product_of_parameters(ctx, spelled, *operands)
        return einsum_with_parameter(ctx, spelled, *operands)
    labels = [ctx.single(ctx.terms(t), t.shape) for t in operands]
    fixed = [ctx.is_fixed(t) for t in operands]
    if len(operands) == 1 or fixed[0] or fixed[1]:
        if len(operands) == 2 and fixed[0] and fixed[1]:
            return ZERO
        i = 0 if len(operands) == 1 or fixed[1] else 1
        nodes, letters = _unite_over(ctx, labels[i], inputs[i], output)
        if len(operands) == 2:
            ctx.tag(nodes, "value-output")
        return _arranged(nodes, letters, output)
    shared = "".join(c for c in inputs[0] if c in inputs[1])
    na, la = _unite_over(ctx, labels[0], inputs[0], shared)
    nb, lb = _unite_over(ctx, labels[1], inputs[1], shared)
    if not any(c not in output for c in shared):
        return ctx.block_all(operands, {}, ctx.reason("einsum product without a contraction"))
    ctx.union(na, nb.permute(*[lb.index(c) for c in la]), -1)
    ctx.tag(na, "query-key")
    ctx.tag(nb, "query-key")
    return ZERO


def _reads_as_linear(first: str, second: str, output: str) -> bool:
    """Whether ``einsum(first, second -> output)`` is ``F.linear(a, b)``: ``b`` a matrix
    ``[out, in]`` contracted over its last letter with ``a``'s last, the output ``a``'s other
    letters followed by ``b``'s first (``"ld,ed->le"``, ``"bld,ed->ble"``)."""
    return (
        len(second) == 2 and first[-1:] == second[1] and second[0] not in first
        and output == first[:-1] + second[0]
    )  # fmt: skip


def einsum_with_parameter(ctx: TraceContext, equation: str, a: Tensor, b: Tensor) -> Any:
    """The labels of ``einsum(equation, a, b)`` (letters spelled out, no ``...``) where one
    operand is a parameter ``W`` and the other an activation ``x``: ``W``'s letters shared with
    ``x`` are consumed (``x``'s factors, united over ``x``'s other letters), its letters only in
    the output are produced (fresh factors per index, and per index of the letters all three
    share: a batch of matrices). A letter of ``W`` summed away without ``x`` blocks."""
    lhs, output = equation.split("->")
    specs = lhs.split(",")
    (w, lw), (x, lx) = ((a, specs[0]), (b, specs[1])) if ctx.is_param(a) else (
        (b, specs[1]), (a, specs[0]))  # fmt: skip
    if any(c not in lx and c not in output for c in lw):
        return ctx.block_all((a, b), {}, ctx.reason("parameter summed over in an einsum"))
    consumed = ctx.terms(x).map(
        lambda nodes: _unite_over(ctx, nodes.expand(x.shape), lx, lw)[0]
    )  # over the letters of lw present in lx, in lw order
    present = "".join(c for c in lw if c in lx)
    # a letter of size 1 in W broadcasts against x: x's factors are united along it
    ctx.consume(w, consumed.map(lambda n: reduce_onto(ctx, _arranged(n, present, lw), w.shape)))
    shape = [w.shape[d] if c in output else 1 for d, c in enumerate(lw)]
    nodes = ctx.produce(w, *shape)
    kept = "".join(c for c in output if c in lw)  # in the output's order, maybe not W's
    return _arranged(_unite_over(ctx, nodes, lw, kept)[0], kept, output)


def product_of_parameters(ctx: TraceContext, equation: str, p: Tensor, q: Tensor) -> Any:
    """The labels of ``einsum(equation, P, Q)`` (letters spelled out) of two parameters: a
    low-rank weight ``B @ A``. Each contracted index ``k`` (a letter of both, not in the output)
    is a channel: ``P``'s entries at ``k`` are divided by its factor and ``Q``'s multiplied, so
    the product is invariant. ``P``'s letters only in the output carry fresh factors (``P``
    produces them) and ``Q``'s their inverses (``Q`` consumes them): the product's entry
    ``[i, j]`` carries ``a_i - b_j``. Letters of both kept in the output (a batch of products),
    letters summed over one operand alone, no contraction, and one parameter twice block."""
    lhs, output = equation.split("->")
    lp, lq = lhs.split(",")
    shared = "".join(c for c in lp if c in lq)
    alone = [c for c in lp + lq if c not in shared and c not in output]
    if (
        not shared or alone or any(c in output for c in shared) or ctx.is_gathered(p)
        or ctx.is_gathered(q) or not distinct_params(ctx, p, q)
    ):  # fmt: skip
        return ctx.block_all((p, q), {}, ctx.reason("product of two parameters of this form"))
    size = dict(zip(lp + lq, (*p.shape, *q.shape), strict=True))
    kept_p = "".join(c for c in lp if c in output)
    kept_q = "".join(c for c in lq if c in output)
    rows = ctx.produce(p, *[size[c] if c in kept_p else 1 for c in lp])
    channels = ctx.produce(q, *[size[c] if c in shared else 1 for c in lq])
    channels = channels.reshape([size[c] for c in lq if c in shared])
    ctx.consume(p, _placed(channels, "".join(c for c in lq if c in shared), lp))
    cols = ctx.fresh(*[size[c] for c in kept_q])
    ctx.consume(q, _placed(cols, kept_q, lq))
    ctx.multiplied.update((ctx.param_name(p), ctx.param_name(q)))
    rows = rows.reshape([size[c] for c in kept_p])
    return Sum([(_placed(rows, kept_p, output), 1), (_placed(cols, kept_q, output), -1)])


def _placed(nodes: Tensor, letters: str, target: str) -> Tensor:
    """Nodes over ``letters`` (one dim each) on ``target``'s dims: size 1 at its other letters."""
    present = [c for c in target if c in letters]
    nodes = nodes.permute(*[letters.index(c) for c in present]) if present else nodes
    return nodes.reshape([nodes.shape[present.index(c)] if c in present else 1 for c in target])


def _unite_over(ctx: TraceContext, nodes: Tensor, letters: str, keep: str) -> tuple[Tensor, str]:
    """``nodes`` (over ``letters``) united over the letters not in ``keep``; returns them over
    ``keep``'s letters present, in ``keep`` order, and those letters."""
    nodes = ctx.unite(nodes, [d for d, c in enumerate(letters) if c not in keep])
    present = "".join(c for c in keep if c in letters)
    perm = [letters.index(c) for c in present] + [d for d, c in enumerate(letters) if c not in keep]
    nodes = nodes.permute(*perm)
    return nodes.reshape(nodes.shape[: len(present)]), present


def _arranged(nodes: Tensor, letters: str, target: str) -> Tensor:
    """Nodes over ``letters`` (a subsequence of ``target``'s) placed on ``target``'s dims."""
    shape = [nodes.shape[letters.index(c)] if c in letters else 1 for c in target]
    return nodes.reshape(shape)


def _parse_einsum(equation: str, dims: list[int]) -> tuple[list[str], str] | None:
    """Per operand its letters and the output's letters, with ``...`` spelled out by letters the
    equation does not use; ``None`` when an operand repeats a letter (a diagonal)."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(dims):
        return None
    ellipsis = max((d - len(s.replace("...", "")) for s, d in zip(specs, dims, strict=True)),
                   default=0)  # fmt: skip
    extra = "".join(c for c in string.ascii_letters if c not in equation)[:ellipsis]
    inputs = []
    for s, d in zip(specs, dims, strict=True):
        k = d - len(s.replace("...", ""))
        s = s.replace("...", extra[ellipsis - k :] if k else "")
        if len(set(s)) != len(s) or len(s) != d:
            return None
        inputs.append(s)
    if "->" in equation:
        output = rhs.replace("...", extra)
    else:
        counts = "".join(inputs)
        output = extra + "".join(sorted(c for c in set(counts) - set(extra)
                                        if counts.count(c) == 1))  # fmt: skip
    return inputs, output


register_all(funcs("einsum"), _einsum)


# --- inner and tensordot: einsums ----------------------------------------------------------------
INNER_DIMS = ([-1], [-1])  # inner(a, b): the last dim of each
LETTERS = string.ascii_letters


def dot_equation(a_dims: int, b_dims: int, dims: Any) -> str | None:
    """The ``einsum`` equation of ``tensordot(a, b, dims)`` for operands of ``a_dims`` and
    ``b_dims`` dims: ``dims=k`` contracts ``a``'s last ``k`` dims with ``b``'s first ``k``;
    ``dims=([i, ...], [j, ...])`` (lists or tuples, negative dims counted from the end) pairs
    ``a``'s dim ``i`` with ``b``'s dim ``j``; the output runs over ``a``'s other dims in order,
    then ``b``'s. ``inner(a, b)`` is ``dims=([-1], [-1])``. ``None`` for anything else: dims
    given as a tensor, out of range or repeated, a scalar operand, more than 52 letters."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        if not 0 <= dims <= min(a_dims, b_dims):
            return None
        dims = (list(range(a_dims - dims, a_dims)), list(range(dims)))
    if not isinstance(dims, (list, tuple)) or len(dims) != 2 or not a_dims or not b_dims:
        return None
    pairs = []
    for side, n in zip(dims, (a_dims, b_dims), strict=True):
        ok = isinstance(side, (list, tuple)) and all(
            isinstance(d, int) and not isinstance(d, bool) and -n <= d < n for d in side
        )
        if not ok or len({d % n for d in side}) != len(side):
            return None
        pairs.append([d % n for d in side])
    if len(pairs[0]) != len(pairs[1]) or a_dims + b_dims - len(pairs[0]) > len(LETTERS):
        return None
    a_spec, paired = LETTERS[:a_dims], dict(zip(pairs[1], pairs[0], strict=True))
    free = iter(LETTERS[a_dims:])  # b's own dims: the letters after a's
    b_spec = "".join(a_spec[paired[j]] if j in paired else next(free) for j in range(b_dims))
    kept = [c for c in a_spec if c not in b_spec] + [c for c in b_spec if c not in a_spec]
    return f"{a_spec},{b_spec}->{''.join(kept)}"


def _dot(ctx: TraceContext, result: Any, a: Any, b: Any, dims: Any, out: Any) -> Any:
    """``tensordot(a, b, dims)`` as ``einsum`` (:func:`dot_equation`, :func:`_einsum`)."""
    ok = isinstance(a, Tensor) and isinstance(b, Tensor) and out is None
    equation = dot_equation(a.dim(), b.dim(), dims) if ok else None
    if equation is None:
        return ctx.block_all(tensor_args(a, b, out), {}, ctx.reason("tensordot of this form"))
    return _einsum(ctx, result, equation, a, b)


def _inner(ctx: TraceContext, result: Any, input: Any, other: Any, *, out: Any = None) -> Any:
    return _dot(ctx, result, input, other, INNER_DIMS, out)


def _tensordot(ctx: TraceContext, result: Any, a: Any, b: Any, dims: Any = 2, out: Any = None):
    return _dot(ctx, result, a, b, dims, out)


register_all(funcs("inner"), _inner)
register_all(funcs("tensordot"), _tensordot)
