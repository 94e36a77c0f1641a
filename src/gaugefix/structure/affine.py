"""Rules for affine ops: linear maps, convolutions, norm layers, matrix products, embeddings.

A weight *produces* the channels of its output (fresh factors multiply its output rows, and its
bias carries the same factors) and *consumes* the channels of its input (its input columns are
divided by their factors). A contraction of two rescaled activations (``q @ k.transpose(-2,
-1)``) requires opposite factors along the contracted dim (one query-key generator per pair of
dims) and gives an invariant result; with one operand fixed (attention weights ``P @ v``) the
other's factors pass through.
"""

from __future__ import annotations

import string
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gaugefix.structure.rules import (
    arg,
    funcs,
    reduce_onto,
    register_all,
    scalar,
    tensor_args,
)
from gaugefix.structure.trace import ZERO, Sum, TraceContext, compact, register_rule


def _params_or_block(ctx: TraceContext, args: tuple, kwargs: dict, *params: Any) -> bool:
    """Whether all the given (non-None) weights are parameters; blocks everything if not."""
    if all(p is None or ctx.is_param(p) for p in params):
        return True
    ctx.block_all(args, kwargs, ctx.reason("weight is not a parameter of the model"))
    return False


# --- linear layers and convolutions ------------------------------------------------------------
def _linear(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not _params_or_block(ctx, args, kwargs, w, b) or ctx.is_param(x):
        return ctx.block_all(args, kwargs, ctx.reason("linear map of a parameter"))
    cols = ctx.along_terms(x, -1)
    rows = ctx.produce(w, w.shape[0], 1)
    ctx.consume(w, cols.map(lambda c: c.view(1, -1)))
    if b is not None:
        ctx.tie(b, rows.view(-1))
    return rows.view(-1)


register_rule(F.linear, _linear)


def _conv(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    if not _params_or_block(ctx, args, kwargs, w, b) or ctx.is_param(x):
        return ctx.block_all(args, kwargs, ctx.reason("convolution of a parameter"))
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


def _conv_transpose(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """A transposed convolution's weight is ``[in, out / groups, *kernel]``: dim 0 consumes
    the input channels, dim 1 (within each group) produces the output channels."""
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    if not _params_or_block(ctx, args, kwargs, w, b) or ctx.is_param(x):
        return ctx.block_all(args, kwargs, ctx.reason("transposed convolution of a parameter"))
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


# --- norm layers ---------------------------------------------------------------------------------
def _norm(w_pos: int, b_pos: int | None, per_channel: bool) -> Any:
    """Norm layers: their input is normalised (its scale is lost, so it is blocked) and their
    affine weight and bias produce the output channels (per channel, dim 1, for batch, group
    and instance norm; per entry of the normalised trailing shape for layer and RMS norm, whose
    weights are norm gains)."""

    def rule(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
        x = args[0]
        w = arg(args, kwargs, w_pos, "weight")
        b = None if b_pos is None else arg(args, kwargs, b_pos, "bias")
        ctx.block(ctx.terms(x), ctx.reason(f"normalised by {ctx.op}"))
        for t in tensor_args(args, kwargs):  # running statistics are buffers
            if t is not w and t is not b and t is not x:
                ctx.block(ctx.terms(t), ctx.reason(f"statistics of {ctx.op}"))
        if w is None:
            if b is not None:
                ctx.block_all((b,), {}, ctx.reason(f"bias without weight in {ctx.op}"))
            return ZERO
        if not _params_or_block(ctx, args, kwargs, w, b):
            return ZERO
        rows = ctx.produce(w, *w.shape)
        if b is not None:
            ctx.tie(b, rows)
        if per_channel:
            return rows.view(-1, *([1] * (x.dim() - 2)))
        ctx.tag(rows, "norm gain")
        return rows

    return rule


register_rule(F.batch_norm, _norm(3, 4, per_channel=True))
register_rule(F.instance_norm, _norm(3, 4, per_channel=True))
register_rule(F.group_norm, _norm(2, 3, per_channel=True))
register_rule(F.layer_norm, _norm(2, 3, per_channel=False))
register_rule(F.rms_norm, _norm(2, None, per_channel=False))


# --- embeddings ----------------------------------------------------------------------------------
def _embedding(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Tensor:
    """``F.embedding(ids, W)``: the output holds rows of ``W``, so ``W``'s columns produce the
    output's channels (the same factor for every row)."""
    ids, w = args[0], arg(args, kwargs, 1, "weight")
    if isinstance(ids, Tensor):
        ctx.claim(ids)
    if not ctx.is_param(w) or arg(args, kwargs, 3, "max_norm") is not None:
        return ctx.block_all(args, kwargs, ctx.reason("embedding renormalised or not a parameter"))
    return ctx.produce(w, 1, w.shape[1]).view(-1)


register_rule(F.embedding, _embedding)


# --- matrix products ------------------------------------------------------------------------------
def _unite(ctx: TraceContext, nodes: Tensor, dim: int) -> Tensor:
    """``nodes`` united along ``dim`` (kept with size 1)."""
    nodes = compact(nodes)
    if nodes.shape[dim] > 1:
        ctx.union(nodes, nodes.narrow(dim, 0, 1))
        nodes = nodes.narrow(dim, 0, 1)
    return nodes


def contract(ctx: TraceContext, a: Tensor, b: Tensor, out: Tensor) -> Any:
    """The labels of ``a @ b`` (matmul semantics: vectors, matrices, broadcast batches).

    A parameter matrix produces and consumes like a linear layer (``x @ W`` with ``W [in,
    out]``, ``W @ x`` with ``W [out, in]``). Between two activations: when one is fixed, the
    other's labels pass, united along the contracted dim (the attention-weighted sum ``P @ v``
    passes value dims: value-output generators); otherwise the contracted dim pairs opposite
    factors (``q @ k^T``: query-key generators) and the result is invariant.
    """
    if ctx.is_param(a) and ctx.is_param(b):
        return ctx.block_all((a, b), {}, ctx.reason("product of two parameters"))
    vec_a, vec_b = a.dim() == 1, b.dim() == 1
    if ctx.is_param(b):
        if b.dim() != 2:
            return ctx.block_all((a, b), {}, ctx.reason("batched parameter in a product"))
        cols = ctx.along_terms(a, -1)
        ctx.consume(b, cols.map(lambda c: c.view(-1, 1)))
        rows = ctx.produce(b, 1, b.shape[1]).view(-1)
        return rows
    if ctx.is_param(a):
        if a.dim() != 2:
            return ctx.block_all((a, b), {}, ctx.reason("batched parameter in a product"))
        cols = ctx.along_terms(b, 0 if vec_b else -2)
        ctx.consume(a, cols.map(lambda c: c.view(1, -1)))
        rows = ctx.produce(a, a.shape[0], 1)
        return rows.view(-1) if vec_b else rows
    la = ctx.terms(a).map(lambda n: n.unsqueeze(0) if vec_a else n)
    lb = ctx.terms(b).map(lambda n: n.unsqueeze(-1) if vec_b else n)
    if not la or not lb:
        if not la and not lb:
            return ZERO
        if not la:  # linear in b: united over the contracted dim
            labels = lb.map(lambda n: _unite(ctx, n, -2))
        else:
            labels = la.map(lambda n: _unite(ctx, n, -1))
        ctx.tag(labels, "value-output")
        if vec_a:
            labels = labels.map(lambda n: n.squeeze(-2))
        if vec_b:
            labels = labels.map(lambda n: n.squeeze(-1))
        return labels
    shape_a = (1, *a.shape) if vec_a else tuple(a.shape)
    shape_b = (*b.shape, 1) if vec_b else tuple(b.shape)
    qa = _unite(ctx, ctx.single(la, torch.Size(shape_a)), -2)  # [..., 1, k]
    qb = _unite(ctx, ctx.single(lb, torch.Size(shape_b)), -1).transpose(-1, -2)  # [..., 1, k]
    ctx.union(qa, qb, -1)
    ctx.tag(qa, "query-key")
    ctx.tag(qb, "query-key")
    return ZERO


def _matmul(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    a, b = args[0], arg(args, kwargs, 1, "other", arg(args, kwargs, 1, "mat2"))
    if ctx.op.endswith("__rmatmul__"):
        a, b = b, a
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return ctx.block_all(args, kwargs, ctx.reason("product with a non-tensor"))
    return contract(ctx, a, b, out)


register_all(funcs("matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "mv"), _matmul)


def _addmm(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``beta * input + alpha * (mat1 @ mat2)`` (``addmm``, ``baddbmm``, ``addmv``): the product's
    labels, with ``input`` added like a bias (a parameter there carries the product's factors,
    as in Hugging Face's ``Conv1D``)."""
    bias, a, b = args[0], arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
    if b is None:
        b = arg(args, kwargs, 2, "batch2", arg(args, kwargs, 2, "vec"))
    if a is None:
        a = arg(args, kwargs, 1, "batch1")
    for key in ("beta", "alpha"):
        if not scalar(kwargs.get(key, 1)):
            return ctx.block_all(args, kwargs, ctx.reason(f"{key} is not a number"))
    labels = ctx.single(Sum.of(contract(ctx, a, b, out)), out.shape)
    if isinstance(bias, Tensor):
        if ctx.is_param(bias):
            ctx.tie(bias, reduce_onto(ctx, labels, tuple(bias.shape)))
        else:
            ctx.union(ctx.labels(bias).expand(out.shape), labels)
    return labels


register_all(funcs("addmm", "baddbmm", "addmv"), _addmm)


# --- einsum --------------------------------------------------------------------------------------
def _einsum(ctx: TraceContext, args: tuple, kwargs: dict, out: Any) -> Any:
    """``torch.einsum`` of one or two activations (parameters block): letters summed away
    must share a factor; between two rescaled operands the contracted letters pair opposite
    factors and the result is invariant; with one fixed operand the other's labels pass."""
    equation, operands = args[0], list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not 1 <= len(operands) <= 2:
        return ctx.block_all(args, kwargs, ctx.reason("einsum of more than two operands"))
    if any(ctx.is_param(t) for t in operands):
        return ctx.block_all(args, kwargs, ctx.reason("einsum with a parameter"))
    parsed = _parse_einsum(equation, [t.dim() for t in operands])
    if parsed is None:
        return ctx.block_all(args, kwargs, ctx.reason("einsum with a repeated letter"))
    inputs, output = parsed
    labels = [ctx.single(ctx.terms(t), t.shape) for t in operands]
    fixed = [ctx.is_fixed(t) for t in operands]

    def unite_over(nodes: Tensor, letters: str, keep: str) -> tuple[Tensor, str]:
        """Unite ``nodes`` over the letters not in ``keep``; returns them over ``keep``'s
        letters present, in ``keep`` order."""
        nodes = compact(nodes)
        for d, letter in enumerate(letters):
            if letter not in keep:
                nodes = _unite(ctx, nodes, d)
        present = [c for c in keep if c in letters]
        perm = [letters.index(c) for c in present] + [
            d for d, c in enumerate(letters) if c not in keep
        ]
        nodes = nodes.permute(*perm)
        return nodes.reshape(nodes.shape[: len(present)]), "".join(present)

    def arranged(nodes: Tensor, letters: str) -> Tensor:
        """Nodes over ``letters`` (a subsequence of the output's) placed on the output."""
        shape = [nodes.shape[letters.index(c)] if c in letters else 1 for c in output]
        return nodes.reshape(shape)

    if len(operands) == 1 or fixed[0] or fixed[1]:
        if len(operands) == 2 and fixed[0] and fixed[1]:
            return ZERO
        i = 0 if len(operands) == 1 or fixed[1] else 1
        nodes, letters = unite_over(labels[i], inputs[i], output)
        if len(operands) == 2:
            ctx.tag(nodes, "value-output")
        return arranged(nodes, letters)
    shared = "".join(c for c in inputs[0] if c in inputs[1])
    na, la = unite_over(labels[0], inputs[0], shared)
    nb, lb = unite_over(labels[1], inputs[1], shared)
    contracted = [c for c in shared if c not in output]
    if not contracted:
        return ctx.block_all(args, kwargs, ctx.reason("einsum product without a contraction"))
    ctx.union(na, nb.permute(*[lb.index(c) for c in la]), -1)
    ctx.tag(na, "query-key")
    ctx.tag(nb, "query-key")
    return ZERO


def _parse_einsum(equation: str, dims: list[int]) -> tuple[list[str], str] | None:
    """Per operand its letters and the output's letters, with ``...`` spelled out by fresh
    capital letters; ``None`` when an operand repeats a letter (a diagonal)."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(dims):
        return None
    ellipsis = max((d - len(s.replace("...", "")) for s, d in zip(specs, dims, strict=True)),
                   default=0)  # fmt: skip
    extra = string.ascii_uppercase[:ellipsis]
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
