"""The calibration pass of ``equalize_``'s ``"activation"`` objective: one run of
``model(*calibration)`` in eval mode under a ``TorchFunctionMode`` (:class:`_ChannelMaxima`)
that records, for every call reading one of the given weights ``W`` as a linear map of an input
``x``, ``max |x_j|`` over the batch of each input channel ``j``, keyed by ``(weight name, weight
dim)``: the dim of ``W`` that runs over the channels the call contracts. A weight read by
several calls takes the maximum over all of them. The maxima are float64 ``[C]``; ``[E, C]``,
per matrix, for stacked weights ``[E, ., .]`` read matrix by matrix; ``[out, in/G]``, per kernel
entry, for a convolution of ``G > 1`` groups; ``None`` where every read had an empty input.

The reads it recognises (:data:`PRODUCTS`): ``F.linear``, the convolutions, ``matmul``, ``mm``,
``mv``, ``bmm``, ``dot``, ``vdot``, ``addmm``, ``addmv``, ``baddbmm``, ``multi_dot`` of two
operands, ``grouped_mm``, two-operand ``einsum``, ``inner``, ``tensordot`` with integer or list
``dims``, the projections of ``F.multi_head_attention_forward``, and an elementwise product of
``x`` and ``W`` summed over the one dim of ``W`` it contracts (``(h[:, None] * W).sum(-1)`` is
``h @ W.T``). ``W`` may be the parameter, a transpose or a range of its rows or columns, such a
view expanded along a batch dim, one matrix of stacked weights, a copy of stacked matrices
gathered by a 1-D index tensor, or a copy of the same layout that still equals it.

Not followed (the weight gets no maxima at all, and is listed), for instance: a read through
another view, a tensor computed from the weight (a cast, ``W * scale``, a parametrization,
``torch.cat``), a weight or copy written in place, a batched wrapper of it under ``vmap``, an
``einsum`` or elementwise product contracting it over several dims at once, an attention's
output projection under dropout in training mode. Not seen (no read recorded): a product made
inside another call that dispatches as one (``cdist``, ``F.bilinear``, ``vecdot``, ``addbmm``,
``multi_dot`` of three operands or more), a ``tensordot`` whose ``dims`` is a tensor, a product
passed through another call before its sum.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from gaugefix.errors import first_line
from gaugefix.structure.affine import INNER_DIMS, dot_equation
from gaugefix.structure.trace import compiled_run_eagerly

__all__ = ["activation_ranges"]

CONVS = (F.conv1d, F.conv2d, F.conv3d)  # weights [out, in, *kernel]
OUT_PROJ = 11  # F.multi_head_attention_forward's position of out_proj_weight (out_proj_bias next)
# Its arguments after out_proj_bias, in order.
ATTENTION_KEYWORDS = (
    "training", "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight",
    "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v",
    "average_attn_weights", "is_causal",
)  # fmt: skip
# Gathers of matrices of stacked weights by an index tensor (``W[ids]``: a copy).
GATHERS = (Tensor.__getitem__, torch.index_select, Tensor.index_select)
IN_PLACE = ("__setitem__", "__set__")  # x[i] = v; x.data = v (the other writes end in "_")
# Copies of a tensor's values in its layout.
COPIES = (Tensor.clone, torch.clone, Tensor.contiguous, Tensor.detach, torch.detach)
# Elementwise products, and the sums that make one with a weight a read: (h[:, None] * W).sum(-1).
MULTIPLIES = (
    torch.mul,
    torch.multiply,
    Tensor.mul,
    Tensor.multiply,
    Tensor.__mul__,
    Tensor.__rmul__,
    Tensor.mul_,
    Tensor.multiply_,
    Tensor.__imul__,
)
SUMS = (torch.sum, Tensor.sum, torch.mean, Tensor.mean)  # a mean: a sum scaled


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class _Read(NamedTuple):
    """A call's candidate read: ``weight``'s dim ``weight_dim`` against ``input``'s dim
    ``input_dim``; ``batched``: a product batched over the matrices of a 3-D ``weight``
    (``[E, ., .]``) whose ``input``'s dim 0 runs along them (matrix ``e`` reads slice ``e``);
    ``groups``: a convolution's ``G`` groups (kernel ``[out, in/G, ...]``: input channel ``j``
    read by column ``j mod (in/G)`` of the ``out/G`` rows of group ``j // (in/G)``)."""

    weight: Any
    weight_dim: int
    input: Any
    input_dim: int
    batched: bool = False
    groups: int = 1


def _product_reads(a: Any, b: Any) -> list[_Read]:
    """The reads of ``a @ b`` (``matmul`` broadcasting; ``mm``, ``mv``, ``bmm`` are cases): a
    weight ``b`` is read along its dim ``-2`` (a vector: its one dim) by ``a``'s dim ``-1``, a
    weight ``a`` along its dim ``-1`` by ``b``'s dim ``-2`` (``-1``: a vector)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or not a.dim() or not b.dim():
        return []
    reads = [_batched(b, max(b.dim() - 2, 0), a, -1)]  # a vector b: along its one dim
    reads.append(_batched(a, a.dim() - 1, b, -2 if b.dim() >= 2 else -1))
    return reads


def _batched(w: Tensor, k: int, x: Tensor, d: int) -> _Read:
    """A product's read; of 3-D ``w`` by ``x`` whose batch dim ``-3`` runs along ``w``'s
    matrices (``bmm``), batched, that dim moved first (a view)."""
    if w.dim() != 3 or x.dim() < 3 or x.shape[-3] == 1:
        return _Read(w, k, x, d)
    return _Read(w, k, x.movedim(-3, 0), d, batched=True)


def _product_call(first: int, a_name: str, b_name: str) -> Any:
    """The reads of a product call whose operands ``a``, ``b`` sit at positions ``first`` and
    ``first + 1`` or go by the keywords ``a_name``, ``b_name``."""

    def reads(args: tuple, kwargs: dict) -> list[_Read]:
        a, b = _arg(args, kwargs, first, a_name), _arg(args, kwargs, first + 1, b_name)
        return _product_reads(a, b)

    return reads


def _chain_reads(args: tuple, kwargs: dict) -> list[_Read]:
    """``multi_dot([a, b])``: the reads of ``a @ b``; a longer chain: none (the inputs of its
    inner products are not seen)."""
    tensors = _arg(args, kwargs, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return []
    return _product_reads(*tensors)


def _linear_reads(args: tuple, kwargs: dict) -> list[_Read]:
    """``F.linear(x, W)``: ``W``'s dim 1 against ``x``'s last dim."""
    return [_Read(_arg(args, kwargs, 1, "weight"), 1, _arg(args, kwargs, 0, "input"), -1)]


def _conv_reads(args: tuple, kwargs: dict) -> list[_Read]:
    """A convolution: the kernel's dim 1 against the channels before the spatial dims, in
    ``groups`` groups."""
    w, groups = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 6, "groups", 1)
    if not isinstance(w, Tensor) or not isinstance(groups, int):
        return []
    return [_Read(w, 1, _arg(args, kwargs, 0, "input"), 1 - w.dim(), groups=groups)]


def _grouped_reads(args: tuple, kwargs: dict) -> list[_Read]:
    """``grouped_mm(x, W, offs=offs)`` of 2-D ``x`` (rows sorted by group, ``offs`` their
    cumulative counts) and stacked ``W`` ``[groups, in, out]``: matrix ``W[g]`` reads its
    group's rows along its dim 0 (rows past ``offs[-1]`` belong to no group); 3-D both and no
    ``offs``: ``bmm``."""
    a, b = _arg(args, kwargs, 0, "mat_a"), _arg(args, kwargs, 1, "mat_b")
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or b.dim() != 3:
        return []
    if offs is None:
        return _product_reads(a, b) if a.dim() == 3 else []
    if a.dim() != 2 or not isinstance(offs, Tensor) or offs.dim() != 1:
        return []
    if offs.numel() != b.shape[0]:
        return []
    ends = offs.tolist()
    return [_Read(b[e], 0, a[(ends[e - 1] if e else 0) : ends[e]], -1) for e in range(len(ends))]


def _einsum_terms(equation: str, dims: tuple[int, int]) -> tuple[list, list, str] | None:
    """The subscripts of a two-operand ``einsum`` (``...`` expanded into one placeholder per
    dim, numbered from the right) and of its output (implicit: the subscripts seen once, in
    order); ``None`` for anything else (a repeated subscript: a diagonal or trace)."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    expanded = []
    for term, n in zip(terms, dims, strict=True):
        head, dots, tail = term.partition("...")
        letters = head + tail
        if not letters.isalpha() and letters or len(set(letters)) != len(letters):
            return None
        if "..." in tail or len(letters) > n or (not dots and len(letters) != n):
            return None
        rest = n - len(letters) if dots else 0
        expanded.append([*head, *(f"..{i}" for i in reversed(range(rest))), *tail])
    if not arrow:
        out = "".join(sorted(c for c in "".join(terms) if c.isalpha() and lhs.count(c) == 1))
    if not out.replace("...", "").isalpha() and out.replace("...", ""):
        return None
    return expanded[0], expanded[1], out


def _einsum_reads(args: tuple, kwargs: dict) -> list[_Read]:
    """``einsum(eq, x, W)`` (either order; :func:`_einsum_read`); nothing for an equation
    with a repeated subscript, or other than two operands."""
    operands = args[1:] if len(args) != 2 or isinstance(args[1], Tensor) else tuple(args[1])
    if not args or not isinstance(args[0], str) or len(operands) != 2 or kwargs:
        return []
    if not all(isinstance(t, Tensor) for t in operands):
        return []
    terms = _einsum_terms(args[0], (operands[0].dim(), operands[1].dim()))
    if terms is None:
        return []
    reads = []
    for i in (0, 1):
        reads += _einsum_read(operands[i], terms[i], operands[1 - i], terms[1 - i], terms[2])
    return reads


def _einsum_read(w: Tensor, ws: list, x: Tensor, xs: list, out: str) -> list[_Read]:
    """``W``'s read by ``x`` in an ``einsum`` (subscripts ``ws``, ``xs``, output ``out``): along
    the one subscript of ``W`` that ``x`` shares and ``out`` drops; where ``x`` shares another
    one, kept in ``out``, it must be the first of stacked ``W`` (``"ecd,edf->ecf"``: batched
    over its matrices, matrix ``W[e]`` reading ``x``'s slice ``e``). Contracted otherwise
    (several subscripts at once, ``"bij,ijk->bk"``): a read not followed."""
    contracted = [c for c in ws if c in xs and c not in out]
    batch = [c for c in ws if c in xs and c in out]
    if not contracted:
        return []
    if len(contracted) != 1 or any(c.startswith("..") for c in ws):
        return [_Read(w, 0, None, 0)]  # several dims at once: a read not followed
    at = xs.index(contracted[0])
    if not batch:
        return [_Read(w, ws.index(contracted[0]), x, at - len(xs))]
    if batch != [ws[0]] or w.dim() != 3:
        return [_Read(w, 0, None, 0)]
    along = xs.index(batch[0])
    d = at + (at < along) - len(xs)  # once ``along`` is moved first
    return [_Read(w, ws.index(contracted[0]), x.movedim(along, 0), d, batched=True)]


def _dot_reads(a_name: str, b_name: str, inner: bool) -> Any:
    """The reads of ``inner(a, b)`` / ``tensordot(a, b, dims)`` (operands named ``a_name``,
    ``b_name``): those of their ``einsum`` (:func:`~gaugefix.structure.affine.dot_equation`);
    nothing for a form it does not spell. ``out=`` leaves the read as it is (as for ``matmul``)."""

    def reads(args: tuple, kwargs: dict) -> list[_Read]:
        a, b = _arg(args, kwargs, 0, a_name), _arg(args, kwargs, 1, b_name)
        dims = INNER_DIMS if inner else _arg(args, kwargs, 2, "dims", 2)
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            return []
        equation = dot_equation(a.dim(), b.dim(), dims)
        return [] if equation is None else _einsum_reads((equation, a, b), {})

    return reads


def _attention_reads(args: tuple, kwargs: dict) -> list[_Read]:
    """``F.multi_head_attention_forward``: the input projections it applies with ``F.linear``
    inside (query, key, value through the rows of ``in_proj_weight``, or through their own
    weights) and the output projection (:func:`_attended`)."""
    inputs = [_arg(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value"))]
    if _arg(args, kwargs, 17, "use_separate_proj_weight", False):
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        weights = [_arg(args, kwargs, 18 + i, name) for i, name in enumerate(names)]
    else:
        weights = [_arg(args, kwargs, 5, "in_proj_weight")] * 3
    out = _arg(args, kwargs, OUT_PROJ, "out_proj_weight")
    reads = [_Read(w, 1, x, -1) for w, x in zip(weights, inputs, strict=True)]
    return [*reads, _Read(out, 1, _attended(args, kwargs), -1)]


def _attended(args: tuple, kwargs: dict) -> Tensor | None:
    """The input of ``F.multi_head_attention_forward``'s output projection (the heads'
    attended values, ``[..., E]``): the same call with the projection ``I`` and no bias, exact
    (``x I = x``); ``None`` (not followed) where dropout draws random masks."""
    if _arg(args, kwargs, 13, "training", True) and _arg(args, kwargs, 10, "dropout_p", 0.0):
        return None
    w = _arg(args, kwargs, OUT_PROJ, "out_proj_weight")
    if not isinstance(w, Tensor) or w.dim() != 2:
        return None
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    rest = {"out_proj_weight": eye, "out_proj_bias": None}
    head = args[:OUT_PROJ]
    tail = dict(zip(ATTENTION_KEYWORDS, args[OUT_PROJ + 2 :], strict=False))
    return F.multi_head_attention_forward(*head, **{**tail, **kwargs, **rest})[0]


# The calls read as linear maps of their input's channels, each with the function giving its
# reads ``(weight, weight dim, input, input dim)``; looked up by identity (a function dispatched
# to the mode need not be hashable).
_MATMUL = _product_call(0, "input", "other")
PRODUCTS: tuple[tuple[Any, Any], ...] = (
    (F.linear, _linear_reads),
    *((conv, _conv_reads) for conv in CONVS),
    *((f, _MATMUL) for f in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.linalg.matmul)),
    *((f, _product_call(0, "input", "mat2")) for f in (torch.mm, Tensor.mm, torch.bmm, Tensor.bmm)),
    *((f, _product_call(0, "input", "vec")) for f in (torch.mv, Tensor.mv)),
    *((f, _product_call(0, "input", "tensor")) for f in (torch.dot, Tensor.dot)),
    *((f, _product_call(0, "input", "other")) for f in (torch.vdot, Tensor.vdot)),  # conj: |.| same
    (torch.linalg.multi_dot, _chain_reads),
    *((f, _product_call(1, "mat1", "mat2")) for f in (torch.addmm, Tensor.addmm)),  # (input, a, b)
    *((f, _product_call(1, "mat", "vec")) for f in (torch.addmv, Tensor.addmv)),
    *((f, _product_call(1, "batch1", "batch2")) for f in (torch.baddbmm, Tensor.baddbmm)),
    *((f, _grouped_reads) for f in (getattr(F, "grouped_mm", None), torch._grouped_mm) if f),
    (torch.einsum, _einsum_reads),
    *((f, _dot_reads("input", "other", True)) for f in (torch.inner, Tensor.inner)),
    (torch.tensordot, _dot_reads("a", "b", False)),
    (F.multi_head_attention_forward, _attention_reads),
)


def _operands(func: Any, args: tuple, kwargs: dict) -> list[_Read]:
    """A call's candidate reads (:class:`_Read`): the weight's dim and the input's dim that the
    call contracts (:data:`PRODUCTS`)."""
    reads = next((reads for f, reads in PRODUCTS if f is func), None)
    return [] if reads is None else reads(args, kwargs)


def _view_dim(w: Tensor, k: int, p: Tensor) -> int | None:
    """The dim of 2-D ``p`` that 2-D ``w``'s dim ``k`` runs over whole and in order, where
    ``w`` is a transpose or a range of rows or columns of ``p`` (``chunk``, ``split``,
    ``narrow``, ``W[a:b]``, ``W.T``), read off strides and storage offsets."""
    other, shift = 1 - k, w.storage_offset() - p.storage_offset()
    for j in (1, 0):
        step, span = p.stride(1 - j), p.shape[1 - j]
        if w.shape[k] != p.shape[j] or (w.shape[k] > 1 and w.stride(k) != p.stride(j)):
            continue
        if (w.shape[other] > 1 and w.stride(other) != step) or step <= 0 or shift % step:
            continue
        if 0 <= shift // step and shift // step + w.shape[other] <= span:
            return j
    return None


def _stacked_dim(w: Tensor, k: int, p: Tensor) -> int | None:
    """The dim of contiguous 3-D ``p`` (stacked matrices, ``[experts, a, b]``) that ``w``'s
    dim ``k`` runs over: ``w`` is ``p`` or ``p.mT``, or a 2-D view (:func:`_view_dim`) of one
    matrix ``p[e]``."""
    shift = w.storage_offset() - p.storage_offset()
    if w.dim() == 3 and not shift and w.shape[0] == p.shape[0] and w.stride(0) == p.stride(0):
        same = w.shape == p.shape and w.stride() == p.stride()
        swapped = w.mT.shape == p.shape and w.mT.stride() == p.stride()
        return k if same else (3 - k if swapped and k else None)
    if w.dim() != 2 or not 0 <= shift < p.numel():
        return None
    dim = _view_dim(w, k, p[shift // p.stride(0)])
    return None if dim is None else dim + 1


def _weight_dim(w: Tensor, k: int, p: Tensor) -> int | None:
    """The dim of ``p`` that ``w``'s dim ``k`` runs over whole and in order, where ``w`` is
    ``p``, a 2-D view of 2-D ``p`` (:func:`_view_dim`) or one expanded to ``[B, ., .]`` (stride
    0 along ``B``: ``bmm`` of a shared matrix) or to ``[1, ., .]`` (``W.T[None]``), or of
    stacked 3-D ``p`` (:func:`_stacked_dim`), read off strides and storage offsets; ``None``
    for any other view."""
    if w is p:
        return k if k < p.dim() else None  # a 1-D weight of F.linear: no channel dim
    if w.dtype != p.dtype:
        return None
    if w.dim() == 2 and p.dim() == 2:
        return _view_dim(w, k, p)
    if w.dim() == 3 and p.dim() == 2 and (w.stride(0) == 0 or w.shape[0] == 1) and k:
        return _weight_dim(w[0], k - 1, p)  # expanded to [B, ., .], or [1, ., .]: one matrix
    if p.dim() == 3 and p.is_contiguous():
        return _stacked_dim(w, k, p)
    return None


def _wrapped(x: Tensor) -> bool:
    """Whether ``x`` is a per-sample wrapper of a ``torch.func`` transform (``vmap``)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _unwrapped(x: Tensor) -> Tensor:
    """The plain tensor under ``torch.func`` wrappers (``vmap``'s batched tensors), each
    level's batch dim kept (the whole batch)."""
    while _wrapped(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _batch_max(a: Tensor) -> Tensor:
    """Per-sample maxima ``a`` (a ``vmap`` wrapper, or plain) reduced over every level's
    batch dim: the plain maxima over the whole batch."""
    while _wrapped(a):
        dim = torch._C._functorch.maybe_get_bdim(a)
        a = torch._C._functorch.get_unwrapped(a)
        a = a.amax(dim) if dim >= 0 else a
    return a


def _written(func: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a call writes into: its ``out=``, or the first argument of an in-place call
    (``add_``, ``t_``, ``copy_``, ``x += v``, ``x[i] = v``, ``x.data = v``)."""
    if kwargs.get("out") is not None:
        return _tensors((kwargs["out"],), {})
    name = getattr(func, "__name__", "")
    in_place = name.endswith("_") and not name.startswith("__") or name in IN_PLACE
    return [args[0]] if in_place and args and isinstance(args[0], Tensor) else []


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a call's arguments (in lists and tuples too)."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return [t for t in leaves if isinstance(t, Tensor)]


class _ChannelMaxima(TorchFunctionMode):
    """Records, for every linear call (:func:`_operands`) whose weight is one of ``weights``
    or a view of one (:func:`_weight_dim`), or of a copy of stacked matrices gathered by an
    index tensor (:meth:`_gather`), ``max |x_j|`` of its input per channel (float64 ``[C]``;
    ``[E, C]``, per matrix, where a call reads matrices of stacked 3-D weights ``[E, ., .]``;
    ``[out, in/G]``, per kernel entry, for a convolution of ``G > 1`` groups), keyed by
    ``(weight name, weight dim)``: the maximum over every such call (``None``: only empty
    inputs); a call under ``vmap`` of a weight not batched, over the whole batch.
    ``unfollowed``: the weights read in a way it cannot map to their dims (a tensor computed
    from them, :meth:`_derive`; one written in place, :meth:`_overwritten`; a batched wrapper
    of them under ``vmap``). ``static``: the model's other parameters and buffers, and the
    constants the pass computes from them or from no tensor (not from the calibration
    inputs)."""

    def __init__(self, weights: Mapping[str, Tensor], static: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.weights = {id(t): (name, t) for name, t in weights.items()}
        self.maxima: dict[tuple[str, int], Tensor | None] = {}
        self.gathered: dict[int, tuple[str, Tensor, Tensor, int]] = {}
        self.derived: dict[int, tuple[tuple[str, ...], Tensor]] = {}
        self.static = {id(t) for t in static}
        self.constants: list[Tensor] = []  # made in the pass from no tensor: static too
        self.originals = set(self.weights)
        self.unfollowed: set[str] = set()
        self.copies: dict[int, tuple[Tensor, Tensor]] = {}  # a copy and its first source
        self.products: dict[int, tuple] = {}  # a live product's (weight, input, versions)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = _tensors(args, kwargs)
        for t in _written(func, args, kwargs):
            self._overwritten(t, tensors)
        if any(func is f for f in GATHERS):
            self._gather(func, args, kwargs, out)
        if isinstance(out, Tensor):
            self._derive(func, tensors, out)
        if any(func is f for f in MULTIPLIES):
            self._multiplied(func, args, kwargs, out)
        elif any(func is f for f in SUMS):
            self._summed(func, args, kwargs, out)
        for read in _operands(func, args, kwargs):
            w, x = read.weight, read.input
            if isinstance(w, Tensor) and (x is None or _wrapped(w) or self._tracked(x)):
                self._source(_unwrapped(w), 0, mapped=False)  # not followed
            elif all(isinstance(t, Tensor) for t in (w, read.input)):
                self._record(*read)
        return out

    def _entry(self, t: Any) -> tuple[tuple[str, ...], Tensor] | None:
        """The names of the tracked tensor (weight, gathered copy, tensor computed from weights)
        that ``t`` is or is a view of, and that tensor; ``None`` for any other tensor (an
        activation)."""
        for u in (t, t._base) if isinstance(t, Tensor) else ():
            if u is not None and id(u) in self.derived:
                return self.derived[id(u)]
            for table in (self.weights, self.gathered):
                if u is not None and id(u) in table:
                    return (table[id(u)][0],), table[id(u)][1]
        return None

    def _tracked(self, t: Any) -> tuple[str, ...]:
        """The names of the weights that ``t`` is, or is a view of (:meth:`_entry`); none for
        an activation."""
        entry = self._entry(t)
        return () if entry is None else entry[0]

    def _multiplied(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Keeps ``x * W`` (either order), of an activation ``x`` and a tracked ``W`` (or a view
        of one) of 2 dims or more, while the product lives, for :meth:`_summed`, with the
        version counters of ``x`` and of the product (a later write to either is seen there).
        Written into ``x`` (``h.mul_(W)``) or ``out=``, or of ``W`` batched by ``vmap``: kept
        without ``x`` (its values are gone, or its dims are not ``W``'s)."""
        pair = (_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other"))
        if not all(isinstance(t, Tensor) for t in (*pair, out)):
            return
        w, x = pair if self._tracked(_unwrapped(pair[0])) else pair[::-1]
        written = bool(_written(func, args, kwargs))
        if self._tracked(_unwrapped(x)) or id(x) in self.static:
            return
        entry = self._entry(_unwrapped(w))
        if entry is None or entry[1].dim() < 2 or self._tracked(out) and not written:
            return
        self._keep(out, w, None if written or _wrapped(w) else x, x)

    def _keep(self, out: Tensor, w: Tensor, x: Tensor | None, source: Tensor) -> None:
        """Keeps ``out``, a product of ``W`` and ``x`` (``None``: not kept), with the version
        counters of ``x``'s ``source`` and of ``out``, while ``out`` lives."""
        entry = (w, x, _unwrapped(source)._version, _unwrapped(out)._version)
        if id(out) not in self.products:
            weakref.finalize(out, self.products.pop, id(out), None)
        self.products[id(out)] = (*self.products.get(id(out), ()), entry)

    def _summed(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """``(x * W).sum(dims)`` (or ``mean``) of a kept product (:meth:`_multiplied`): each of
        its weights' read (:meth:`_summed_read`) over the summed dims (all of them: ``dim``
        omitted or empty; a name: all of the weight's); summed over none of the weight's
        varying dims, ``out`` is kept as a product too (:meth:`_carried`)."""
        p = _arg(args, kwargs, 0, "input")
        n, dims = p.dim(), _arg(args, kwargs, 1, "dim")
        dims = [dims] if isinstance(dims, int) else dims or range(n)
        named = not all(isinstance(i, int) and -n <= i < n for i in dims)
        mean = func is torch.mean or func is Tensor.mean
        reduced = (mean, bool(_arg(args, kwargs, 2, "keepdim", False)), out)
        for entry in self.products.get(id(p), ()):
            over = self._summed_read(p, None if named else {j % n for j in dims}, *entry)
            if not over and not named and isinstance(out, Tensor):
                self._carried(p, {j % n for j in dims}, reduced, *entry)

    def _carried(
        self,
        p: Tensor,
        dims: set[int],
        reduced: tuple[bool, bool, Tensor],
        w: Tensor,
        x: Any,
        *versions: int,
    ) -> None:
        """Product ``p`` of ``x`` and ``W`` summed (averaged: ``mean``) over ``dims``, along
        none of which ``W`` varies, into ``out`` (``reduced``: ``mean``, ``keepdim``, ``out``):
        the product of ``W`` (those dims dropped unless ``keepdim``) and of ``x`` summed
        (averaged) over them, expanded first along those it is broadcast along
        (``(h[:, None, :] * W).sum(0)`` is ``h.sum(0)[None, :] * W``); kept for a later sum,
        ``x`` not kept where it is not (written since, or :meth:`_multiplied` kept none)."""
        (mean, keep, out), fresh = reduced, x is not None
        fresh = fresh and (_unwrapped(x)._version, _unwrapped(p)._version) == versions
        n, start = p.dim(), p.dim() - w.dim()
        ws = w if keep else w[tuple(0 if i in dims else slice(None) for i in range(start, n))]
        if not fresh:
            self._keep(out, ws, None, out)
            return
        xs = x.reshape((1,) * (n - x.dim()) + tuple(x.shape))
        xs = xs.expand([p.shape[i] if i in dims else xs.shape[i] for i in range(n)])
        xs = (Tensor.mean if mean else Tensor.sum)(xs, sorted(dims), keepdim=keep)
        self._keep(out, ws, xs, xs)

    def _summed_read(
        self, p: Tensor, dims: set[int] | None, w: Tensor, x: Tensor | None, xv: int, pv: int
    ) -> bool:
        """Product ``p`` of ``x`` and ``W`` summed over ``dims`` (``None``: all of ``W``'s),
        ``W``'s dims broadcast against the product's from the right. Over none of the dims
        along which ``W`` varies (size over 1, stride not 0): no read (``h * gamma`` summed
        over tokens). Over exactly one, along which ``x`` runs too, ``x`` broadcast along
        ``W``'s other varying dims, neither ``x`` nor the product written since: ``W``'s read
        along that dim (``(h[:, None, :] * W).sum(-1)`` is ``h @ W.T``), recorded as
        :meth:`_record` records it, ``W`` stripped of its broadcast dims (a row or column
        ``[C]`` as ``[1, C]``). Any other sum over its varying dims: not followed. Whether
        the sum is over any of them."""
        n, start = p.dim(), p.dim() - w.dim()
        varying = [i for i in range(start, n) if w.shape[i - start] > 1 and w.stride(i - start)]
        over = [i for i in varying if dims is None or i in dims]
        if not over:
            return False
        s = over[0]
        fresh = x is not None and (_unwrapped(x)._version, _unwrapped(p)._version) == (xv, pv)
        along = fresh and x.dim() >= n - s and x.shape[s - n] == p.shape[s]  # x runs along s
        alone = fresh and all(x.dim() < n - i or x.shape[i - n] == 1 for i in varying if i != s)
        if len(over) > 1 or not along or not alone:
            self.unfollowed.update(self._tracked(_unwrapped(w)))
            return True
        core = w[tuple(slice(None) if i in varying else 0 for i in range(start, n))]
        k = varying.index(s)
        core, k = (core[None], 1) if core.dim() == 1 else (core, k)
        source = self._source(core, k)
        if source is not None and source[2] is None:
            self.unfollowed.add(source[0])
        elif source is not None:
            self._record(core, k, x, s - n)
        return True

    def _overwritten(self, t: Tensor, tensors: list[Tensor]) -> None:
        """``t`` (or the tensor it is a view of) written in place by a call of ``tensors``: a
        weight itself is not followed; a copy (of a weight, of a gathered copy) no longer
        stands for its source (its values, shape or strides changed), its reads not followed;
        a constant written from weights is computed from them, from an activation (``out=``
        of ``h * W``, ``copy_(h)``) is an activation."""
        tables = (self.weights, self.gathered, self.derived)
        base = t if t._base is None or any(id(t) in table for table in tables) else t._base
        names = self._tracked(t)
        active = any(not self._tracked(u) and id(u) not in self.static for u in tensors)
        if not names and id(base) in self.static and active:
            self.static.discard(id(base))
        elif not names and id(base) in self.static:
            names = tuple(dict.fromkeys(n for u in tensors for n in self._tracked(u)))
            if names:
                self.static.discard(id(base))
                self.derived[id(base)] = (names, base)
        elif id(base) in self.originals:
            self.unfollowed.update(names)
        elif names:
            self.weights.pop(id(base), None)
            self.gathered.pop(id(base), None)
            self.derived[id(base)] = (names, base)

    def _derive(self, func: Any, tensors: list[Tensor], out: Tensor) -> None:
        """Tracks ``out``, computed by ``func`` from ``tensors`` (its arguments' tensors):
        from none, or constants only (``torch.ones``, ``arange``), a constant; from tracked
        weights and the model's other parameters, buffers and constants only (not from the
        inputs), a copy of the same layout (:data:`COPIES`) of a weight or gathered copy stands
        for it, and anything else but a view (``W * scale``, a parametrization, ``torch.cat``)
        is derived, its reads not followed."""
        if self._tracked(out):
            return
        names = [self._tracked(t) for t in tensors]
        if any(not n and id(t) not in self.static for n, t in zip(names, tensors, strict=True)):
            return
        if not any(names):  # from constants only: a constant
            self.static.add(id(out))
            self.constants.append(out)
            return
        src = tensors[0]
        same = out.shape == src.shape and out.stride() == src.stride() and out.dtype == src.dtype
        if any(func is f for f in COPIES) and same and id(src) in self.weights:
            self.weights[id(out)] = (names[0][0], out)
        elif any(func is f for f in COPIES) and same and id(src) in self.gathered:
            self.gathered[id(out)] = (names[0][0], out, *self.gathered[id(src)][2:])
        else:
            self.derived[id(out)] = (tuple(dict.fromkeys(n for ns in names for n in ns)), out)
            return
        self.copies[id(out)] = (out, self.copies.get(id(src), (None, src))[1])

    def _stale(self, t: Tensor) -> bool:
        """Whether copy ``t`` no longer equals its source in value and layout (written by a
        call the pass does not see: ``set_``, a write to its storage)."""
        if id(t) not in self.copies:
            return False
        src = self.copies[id(t)][1]
        layout = t.shape == src.shape and t.stride() == src.stride() and t.dtype == src.dtype
        return not layout or not torch.equal(t, src)

    def _gather(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """``W[ids]`` / ``index_select(W, 0, ids)`` of stacked 3-D ``W`` by a 1-D index (or
        mask): a copy ``[N, ., .]`` whose matrix ``n`` is ``W[ids[n]]``, kept to map its reads
        to ``W``'s matrices; any other index tensor on ``W``: not followed."""
        src = args[0] if args else kwargs.get("input")
        name, p = self.weights.get(id(src), (None, None))
        if p is None or p.dim() != 3 or not isinstance(out, Tensor) or out._base is p:
            return
        if func is Tensor.__getitem__:
            index = args[1] if len(args) > 1 else None
            ids = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        else:
            dim, ids = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "index")
            ids = ids if dim in (0, -3) else None
        if isinstance(ids, Tensor) and ids.dtype == torch.bool and ids.dim() == 1:
            ids = ids.nonzero()[:, 0]
        if (
            not isinstance(ids, Tensor)
            or ids.dim() != 1
            or ids.is_floating_point()
            or out.dim() != 3
        ):
            self.unfollowed.add(name)
            return
        self.gathered[id(out)] = (name, out, ids.to(torch.long), p.shape[0])

    def _source(self, w: Tensor, k: int, mapped: bool = True) -> tuple[Any, ...] | None:
        """``(name, the tensor w is a view of, the dim w's dim k runs over, the gathered ids or
        None, the matrices gathered from)`` for a ``w`` that is tracked (``None`` if not); a
        matrix (2 dims or more) whose dim ``k`` is not mapped (or ``mapped`` false: a read not
        followed) marks its weight not followed."""
        tables = (self.weights, self.gathered, self.derived)
        base = w if any(id(w) in table for table in tables) else w._base
        if id(base) in self.derived or self._stale(base):  # none followed
            self.unfollowed.update(self._tracked(base) if w.dim() >= 2 else ())
            return None
        if id(base) in self.gathered:
            name, p, ids, experts = self.gathered[id(base)]
            dim = _stacked_dim(w, k, p) if mapped else None
        else:
            name, p = self.weights.get(id(base), (None, None))
            ids, experts = None, None
            dim = _weight_dim(w, k, p) if mapped and p is not None else None
        if name is None:
            return None
        if dim is None and w.dim() >= 2:
            self.unfollowed.add(name)
        return (name, p, dim, ids, experts)

    def _record(
        self, w: Tensor, k: int, x: Tensor, d: int, batched: bool = False, groups: int = 1
    ) -> None:
        """Records ``max |x_j|`` along ``x``'s dim ``d`` for ``w``'s dim ``k``. A vector view
        of a matrix (a row ``W[0]``, a column ``W[:, 0]``) is read as that matrix's ``[1, C]``
        view (``W[:1]``); a vector weight itself has no channel dim."""
        if w.dim() == 1:
            if w._base is None or w._base.dim() < 2:
                return
            w, k = w[None], 1
        source = self._source(w, k)
        if source is None or source[2] is None:
            return
        name, p, dim, ids, experts = source
        if groups != 1 and (dim != 1 or w.shape != p.shape):  # grouped: the kernel itself only
            self.unfollowed.add(name)
            return
        if x.dim() < -d or x.shape[d] != groups * p.shape[dim]:
            return
        key = (name, dim)
        old = self.maxima.setdefault(key, None)
        if not x.numel():  # e.g. an expert no token was routed to
            return
        a = x.detach().abs().movedim(d, -1)
        if groups != 1:  # entry [o, c] reads channel (o // (out/G)) * in/G + c: [out, in/G]
            a = a.reshape(-1, a.shape[-1]).amax(0).view(groups, -1)
            a = a.repeat_interleave(p.shape[0] // groups, dim=0)
        elif batched and p.dim() == 3:  # dim 0 along the matrices: [E, C]
            a = a.reshape(a.shape[0], -1, a.shape[-1]).amax(1)
        else:
            a = _per_slice(a.reshape(-1, a.shape[-1]).amax(0), w, p)
        a = _batch_max(a).to(torch.float64)  # under vmap: over the whole batch
        if ids is not None:  # the gathered copy's matrices [N, C] to the weight's [E, C]
            rows = a.expand(ids.shape[0], -1) if a.dim() == 1 else a
            at = ids[:, None].expand(-1, a.shape[-1])
            a = a.new_zeros(experts, a.shape[-1]).scatter_reduce_(0, at, rows, "amax")
        self.maxima[key] = a if old is None else torch.maximum(old, a)


def _per_slice(a: Tensor, w: Tensor, p: Tensor) -> Tensor:
    """A read's channel maxima ``a`` (``[C]``) as recorded for ``p``: where ``w`` is one matrix
    ``p[e]`` of stacked 3-D ``p``, row ``e`` of ``[E, C]`` (the other rows 0: no input)."""
    if p.dim() != 3 or w.dim() != 2:
        return a
    out = a.new_zeros(p.shape[0], a.shape[0])
    out[(w.storage_offset() - p.storage_offset()) // p.stride(0)] = a
    return out


def activation_ranges(
    model: nn.Module, weights: Mapping[str, Tensor], calibration: Tensor | tuple[Tensor, ...]
) -> dict[tuple[str, int], Tensor | None]:
    """``max |x_j|`` over the calibration batch of the input channels of every linear call
    reading one of ``weights`` (by name) or a view of one (:class:`_ChannelMaxima`), from one
    pass of ``model(*calibration)`` in eval mode (the training flags are restored; nothing
    else is touched). A weight also read in a way the pass cannot follow has no maxima (a
    ``UserWarning`` names it)."""
    return _calibrated(model, weights, calibration)[0]


@torch.no_grad()
def _calibrated(
    model: nn.Module, weights: Mapping[str, Tensor], calibration: Tensor | tuple[Tensor, ...]
) -> tuple[dict[tuple[str, int], Tensor | None], tuple[str, ...]]:
    """:func:`activation_ranges` and the weights it left without maxima (in ``weights``'
    order), read in a way the pass cannot follow."""
    modes = {m: m.training for m in model.modules()}
    args = calibration if isinstance(calibration, tuple) else (calibration,)
    seen = _ChannelMaxima(weights, [*model.parameters(), *model.buffers()])
    try:
        model.eval()
        with compiled_run_eagerly(), seen:  # the pass sees the Python a compiled forward runs
            model(*args)
    except Exception as err:  # whatever the model raises on it (an assert on the length)
        raise ValueError(
            f"the model does not run on the calibration batch ({type(err).__name__}: "
            f"{first_line(err)}); nothing was modified"
        ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    if any(a is not None and not bool(torch.isfinite(a).all()) for a in seen.maxima.values()):
        raise ValueError("the calibration batch gives non-finite activations; nothing was modified")
    left = tuple(name for name in weights if name in seen.unfollowed)
    _warn_uncalibrated(left, "a view, a copy or a tensor computed from it, a vmap")
    return {key: a for key, a in seen.maxima.items() if key[0] not in left}, left


def _warn_uncalibrated(names: tuple[str, ...], why: str) -> None:
    """The ``UserWarning`` naming the weights whose channels fall back to ``"range"``."""
    if names:
        warnings.warn(
            f"the calibration pass cannot follow how {', '.join(names)} ({why}) is read; "
            "their channels are balanced as 'range' does",
            stacklevel=4,
        )
