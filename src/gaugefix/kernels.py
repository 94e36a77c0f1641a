"""The gauge computations of a training step in a number of tensor operations that does not grow
with the model (on a GPU), and without copies of the parameters (on the CPU).

Parameters of one shape whose terms have the same signs and shapes (the same layer in every
block of a transformer) form a *group*. A :class:`KernelPlan`, built once per structure and
device, stacks each group's term maps (``[L, *slot_shape]`` for its ``L`` parameters) and
concatenates the flattened maps of all groups into one index. Then

- the squared sums ``S_in``, ``S_out`` (and ``||theta||^2``) are the squares of the parameters
  summed onto each term's slots, laid out in that index's order, and one ``index_add_`` for all
  groups. In the GPU layout (:func:`gpu_layout`) those values are, per group, one stack and one
  square of its parameters (none for a single parameter) and one sum per kind of term, or one
  norm over trailing dims where that is every term's sum (a row norm of each matrix); the
  squares of those norms and of every parameter whose terms name a slot per entry (gains,
  biases) in one ``torch._foreach_mul``, and one ``_chunk_cat``; on the CPU each parameter's
  are written into its slice of one buffer, its squares taken a cache-sized block at a time,
  without a stacked copy (a few operations per parameter, each costing no launch there);
- the action ``g(h)`` and the penalty gradient need, per entry, ``sum_t sign_t x[slots_t]``
  over its parameter's terms (``x = h`` or ``mu``). In the GPU layout these values of every
  group come from one gather over a second index of the plan (:func:`all_term_values`); the
  action takes one ``exp`` of them, and per group their product over the kinds of term made
  into one dense factor ``f`` per parameter, which moves a tensor of power ``p`` (parameters 1,
  gradients -1, Adam's second moment -2) by ``|p|`` ``torch._foreach_mul_`` or
  ``torch._foreach_div_`` over every tensor of a batch of groups at once (a ``torch._foreach_*``
  kernel takes pairs of tensors of any shapes, each pair of one shape: hence dense factors;
  a batch holds the factors of at most as many entries as the largest group has); the penalty
  gradient takes, per group, their dense sum and, per batch of groups, one
  ``torch._foreach_addcmul_``. On the CPU each kind of
  term's factor is computed per group and power, and their product, broadcast over the tensor
  it moves, is formed a block of rows at a time in a reused buffer (a dense factor the size of
  the group for float16 tensors only, :func:`group_factors`).

The number of groups depends on the kinds of layers a model has, not on its depth or width. Every
function accepts stacks of several copies of a model (``batch_dims`` leading dims, as the sweep
engine trains them).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gaugefix.structure import GaugeStructure

__all__ = [
    "Targets",
    "TermGroup",
    "KernelPlan",
    "kernel_plan",
    "cached_on",
    "stacked",
    "reduce_to",
    "trailing_sum_of_squares",
    "flat_cat",
    "generator_sums",
    "paired_generator_sums",
    "stacked_sums",
    "sums_per_parameter",
    "add_squares_",
    "row_blocks",
    "CHUNK",
    "SHORT_RUN",
    "gpu_layout",
    "term_values",
    "per_parameter",
    "factor_dtype",
    "applied_dtype",
    "group_coefficients",
    "group_factors",
    "rescale_",
    "by_row_blocks",
    "mul_by_rows_",
    "factor_product",
    "add_selection_grads_",
    "all_term_values",
    "group_pieces",
    "finite_flag",
    "row_norms",
]

# Per parameter name, the tensors to rescale with it and the power of its factor each takes.
Targets = dict[str, list[tuple[Tensor, int]]]


class TermGroup(NamedTuple):
    """Parameters of one ``shape`` with terms of the same signs and slot shapes: ``slots[t]`` is
    term ``t`` of every parameter stacked, ``[L, *slot_shape]`` (dummy slot ``N`` for none)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    slots: tuple[Tensor, ...]
    signs: tuple[int, ...]


class KernelPlan(NamedTuple):
    """The groups of a structure on a device, and the index of the one ``index_add_`` of
    :func:`generator_sums` into ``[S_in (N), S_out (N), dummy_in, dummy_out, ||theta||^2]``: the
    slots of every term of sign +1 (the dummy slot ``N`` at ``2 N``), then of sign -1 (offset by
    ``N``, the dummy slot at ``2 N + 1``), each flattened in group and term order, then
    ``2 N + 2`` once for each entry of each parameter's first term. ``starts[g]``: where the
    values of each term of group ``g`` begin in that index, then those of its first term's
    copy (parameter ``l``'s follow its ``l`` predecessors'). ``chunkable``: every parameter
    has a dim and an entry (``_chunk_cat`` takes their values, :func:`flat_cat`).

    ``batches``: the groups whose dense factors the GPU layout holds at once, each a few groups
    of at most as many entries as the largest group (:func:`_factor_batches`).

    ``terms`` ``[M, T]`` and ``term_signs`` (float64, the same shape) gather the sums
    ``sum_t sign_t x[slots_t]`` of :func:`term_values` for every group at once
    (:func:`all_term_values`): a row per slot of each group's distinct slot shapes, in group
    order, holding the slots of the terms of that shape (padded with the dummy slot ``N``,
    sign 0); ``shapes[g]``: those slot shapes of group ``g`` (``[L, *slot_shape]``).

    ``zero``: a 0-dim float64 zero and ``pads``: a ``[1]`` zero per float dtype, on the device
    (the value of a ``torch.where`` and the dummy slot appended to ``h``: no operation made
    per step for them, :func:`with_dummy_slot`)."""

    groups: tuple[TermGroup, ...]
    index: Tensor
    starts: tuple[tuple[int, ...], ...]
    chunkable: bool
    terms: Tensor
    term_signs: Tensor
    shapes: tuple[tuple[torch.Size, ...], ...]
    batches: tuple[tuple[int, ...], ...]
    zero: Tensor
    pads: dict[torch.dtype, Tensor]


# The attribute of a structure that caches its plans by device: on the structure itself rather
# than in a module-level weak dict, so that torch.compile guards on the structure's own dict and
# not on the position of a key in a global one that garbage collection can shrink.
_PLANS_ATTR = "_kernel_plans"


class _Plans(dict):
    """What a structure caches by device (its kernel plans, its range indices): a cache,
    pickled (and deep-copied) empty, as ``GaugeStructure`` pickles its own plans: their tensors
    lie on devices the unpickling process may lack."""

    def __reduce__(self) -> tuple:
        return _Plans, ()


def cached_on(
    structure: GaugeStructure,
    attr: str,
    device: torch.device | str,
    build: Callable[[torch.device], Any],
) -> Any:
    """``build(device)``, built once per ``structure`` and device, then cached in the
    structure's attribute ``attr`` (a :class:`_Plans`)."""
    device = torch.device(device)
    per_device = getattr(structure, attr, None)
    if per_device is None:
        per_device = _Plans()
        setattr(structure, attr, per_device)
    if device not in per_device:
        per_device[device] = build(device)
    return per_device[device]


def kernel_plan(structure: GaugeStructure, device: torch.device | str) -> KernelPlan:
    """The :class:`KernelPlan` of ``structure`` on ``device`` (built once, then cached)."""
    return cached_on(structure, _PLANS_ATTR, device, lambda d: _built_plan(structure, d))


def _built_plan(structure: GaugeStructure, device: torch.device) -> KernelPlan:
    """:func:`kernel_plan`, built: the structure's parameters grouped by layout."""
    by_layout: dict[tuple, list] = {}
    for param in structure.plan(device):
        layout = (param.shape, tuple((t.sign, tuple(t.slots.shape)) for t in param.terms))
        by_layout.setdefault(layout, []).append(param)
    groups = tuple(
        TermGroup(
            tuple(p.name for p in params),
            shape,
            tuple(torch.stack([p.terms[k].slots for p in params]) for k in range(len(terms))),
            tuple(sign for sign, _ in terms),
        )
        for (shape, terms), params in by_layout.items()
    )
    chunkable = all(len(g.shape) and math.prod(g.shape) for g in groups)
    index, starts = _sums_index(groups, structure.num_generators)
    terms, signs, shapes = _terms_index(groups, structure.num_generators, device)
    pads = {dtype: torch.zeros(1, dtype=dtype, device=device) for dtype in PAD_DTYPES}
    return KernelPlan(
        groups, index, starts, bool(chunkable), terms, signs, shapes, _factor_batches(groups),
        torch.zeros((), dtype=torch.float64, device=device), pads,
    )  # fmt: skip


# The dtypes of the coefficients given a dummy slot (:func:`with_dummy_slot`): ``h`` in float64,
# ``mu`` in its accumulation dtype.
PAD_DTYPES = (torch.float32, torch.float64)


def with_dummy_slot(x: Tensor, plan: KernelPlan) -> Tensor:
    """``x`` (``[*batch, N]``) with a 0 appended along its last dim (the dummy slot ``N``):
    ``[*batch, N + 1]``, one ``cat`` with the plan's zero where ``x`` has no batch dims."""
    pad = plan.pads.get(x.dtype) if x.dim() == 1 and x.device == plan.zero.device else None
    if pad is None:
        pad = x.new_zeros(*x.shape[:-1], 1)
    return torch.cat([x, pad], dim=-1)


def _terms_index(
    groups: tuple[TermGroup, ...], n: int, device: torch.device
) -> tuple[Tensor, Tensor, tuple]:
    """``terms``, ``term_signs`` and ``shapes`` of :class:`KernelPlan`."""
    by_shape = [_terms_by_shape(group) for group in groups]
    width = max((len(ts) for shapes in by_shape for ts in shapes.values()), default=1)
    rows, signs = [torch.zeros(0, width, dtype=torch.long, device=device)], []
    for shapes in by_shape:
        for terms in shapes.values():
            slots = [slots.reshape(-1) for slots, _ in terms]
            slots += [torch.full_like(slots[0], n)] * (width - len(terms))
            rows.append(torch.stack(slots, -1))
            sign = [float(sign) for _, sign in terms] + [0.0] * (width - len(terms))
            signs.append(torch.tensor(sign, dtype=torch.float64).expand(slots[0].numel(), -1))
    signs = torch.cat(signs) if signs else torch.zeros(0, width, dtype=torch.float64)
    shapes = tuple(tuple(s) for s in by_shape)
    return torch.cat(rows), signs.to(device), shapes


def _factor_batches(groups: tuple[TermGroup, ...]) -> tuple[tuple[int, ...], ...]:
    """The groups in batches of at most as many entries as the largest group has (first fit,
    largest first): the GPU layout moves a batch's tensors with one ``torch._foreach_*`` call
    per pass, holding only its dense factors, as much memory as the largest group's."""
    sizes = [len(g.names) * math.prod(g.shape) for g in groups]
    budget = max(sizes, default=0)
    batches: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: -sizes[g]):
        fits = next((b for b, left in enumerate(room) if sizes[g] <= left), None)
        if fits is None:
            batches.append([])
            room.append(budget)
            fits = len(batches) - 1
        batches[fits].append(g)
        room[fits] -= sizes[g]
    return tuple(tuple(sorted(b)) for b in batches)


def _terms_by_shape(group: TermGroup) -> dict[torch.Size, list[tuple[Tensor, int]]]:
    """The terms of ``group`` by slot shape (``[L, *slot_shape]``), in order of first use."""
    out: dict[torch.Size, list[tuple[Tensor, int]]] = {}
    for slots, sign in zip(group.slots, group.signs, strict=True):
        out.setdefault(slots.shape, []).append((slots, sign))
    return out


def _sums_index(groups: tuple[TermGroup, ...], n: int) -> tuple[Tensor, tuple]:
    """The index of :class:`KernelPlan` and the starts of its segments."""
    device = groups[0].slots[0].device if groups else torch.device("cpu")
    pieces = [torch.zeros(0, dtype=torch.long, device=device)]
    starts: list[list[int]] = [[0] * (len(g.slots) + 1) for g in groups]
    at = 0
    for sign in (+1, -1):
        for g, group in enumerate(groups):
            for k, slots in enumerate(group.slots):
                if group.signs[k] != sign:
                    continue
                flat = slots.reshape(-1) + (0 if sign > 0 else n)
                dummy = 2 * n if sign > 0 else 2 * n + 1
                pieces.append(torch.where(flat == (n if sign > 0 else 2 * n), dummy, flat))
                starts[g][k], at = at, at + flat.numel()
    for g, group in enumerate(groups):
        pieces.append(torch.full((group.slots[0].numel(),), 2 * n + 2, device=device))
        starts[g][-1], at = at, at + group.slots[0].numel()
    return torch.cat(pieces), tuple(tuple(row) for row in starts)


def stacked(tensors: list[Tensor], dim: int) -> Tensor:
    """``tensors`` (of one shape) stacked along ``dim``; a single one as a view."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim)


def reduce_to(values: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Sum ``values`` over the dims where ``shape`` has size 1 (keeping them), giving ``shape``
    (zeros along a dim of ``values`` of size 0).

    The dims are summed a run of adjacent ones at a time, the outermost run first: a sum over
    leading entries with contiguous rows is one vectorised pass, and a short innermost run (a
    conv's taps) is then summed on the smaller result (summed first, it would be several times
    slower)."""
    dims = [d for d, s in enumerate(shape) if s == 1 and values.shape[d] != 1]
    while dims:
        k = 1
        while k < len(dims) and all(values.shape[d] == 1 for d in range(dims[k - 1] + 1, dims[k])):
            k += 1
        values = values.sum(dims[:k], keepdim=True)
        dims = dims[k:]
    return values


# Entries in a trailing run of dims below which an operation along it (a norm over it, or a
# product broadcast along it) is slower than on a contiguous operand (a conv's taps).
SHORT_RUN = 64


def trailing_sum_of_squares(t: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """``t.square()`` in ``dtype`` summed over the trailing dims where ``shape`` (the broadcast
    shape of the maps, batch dims included) has size 1 (kept with size 1), in one pass without a
    squared temporary (a norm, then squared); ``None`` where :func:`_trailing_norm` is."""
    norm = _trailing_norm(t, shape, dtype)
    return None if norm is None else norm.square_()


def _trailing_norm(t: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """The 2-norm of ``t`` in ``dtype`` over the trailing dims where ``shape`` has size 1 (kept
    with size 1), the square root of :func:`trailing_sum_of_squares`; ``None`` when those dims
    hold fewer than :data:`SHORT_RUN` entries, or a gradient is recorded (a norm's backward is
    undefined at 0), or ``t`` is not contiguous."""
    if torch.is_grad_enabled() and t.requires_grad or not t.is_contiguous():
        return None
    lead = t.dim()
    while lead > 0 and shape[lead - 1] == 1:
        lead -= 1
    if t.shape[lead:].numel() < SHORT_RUN:
        return None
    trailing = tuple(range(lead, t.dim()))
    return torch.linalg.vector_norm(t, dim=trailing, keepdim=True, dtype=dtype)


def _squares(x: Tensor, norm: Tensor | None, dtype: torch.dtype, fresh: bool) -> Tensor:
    """``x.square()`` in ``dtype``, or ``norm`` squared in place where :func:`_trailing_norm`
    gave one (``x``'s squares summed over trailing dims); in place when ``x`` is a temporary and
    no gradient is recorded."""
    if norm is not None:
        return norm.square_()
    fresh = fresh or x.dtype != dtype
    x = x.to(dtype)
    recorded = torch.is_grad_enabled() and x.requires_grad
    return x.square_() if fresh and not recorded else x.square()


def flat_cat(values: list[Tensor], batch_dims: int, chunkable: bool) -> Tensor:
    """``values`` (``[*batch, ...]``) each flattened past the batch dims and concatenated:
    ``[*batch, P]``. One ``_chunk_cat`` (and a view) when ``chunkable`` (each value has a dim
    and an entry past the batch dims, and there are copies); it has no derivative, so with a
    gradient recorded (or else) a view of each and ``cat``."""
    recorded = torch.is_grad_enabled() and any(v.requires_grad for v in values)
    if recorded or not chunkable or not values[0].numel():
        flat = [v.reshape(*v.shape[:batch_dims], v.shape[batch_dims:].numel()) for v in values]
        return torch.cat(flat, -1)
    return torch._chunk_cat(values, batch_dims, 1).squeeze(batch_dims)


def _entry_names(
    tensors: Mapping[str, Tensor], plan: KernelPlan, dtype: torch.dtype
) -> frozenset[str]:
    """The parameters in a group whose terms each name a slot per entry (a norm's gain, a bias):
    nothing to reduce, so their squares are taken without stacking, in the one
    ``torch._foreach_mul`` of :func:`stacked_sums`. Empty when they are not in ``dtype`` already
    or a gradient is recorded."""
    names = [
        name
        for group in plan.groups
        if all(tuple(s.shape[1:]) == group.shape for s in group.slots)
        for name in group.names
    ]
    ts = [tensors[name] for name in names]
    if not ts or any(t.dtype != dtype for t in ts):
        return frozenset()
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return frozenset()
    return frozenset(names)


def generator_sums(
    tensors: Mapping[str, Tensor],
    structure: GaugeStructure,
    dtype: torch.dtype,
    batch_dims: int = 0,
    result_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(S_in, S_out, ||theta||^2)`` of bound ``tensors`` accumulated in ``dtype``: the sums
    ``[*batch, N]`` and the squared norm ``[*batch]``, which is finite exactly when every entry
    is (barring overflow); all three cast to ``result_dtype`` (when given) in one operation,
    once summed over the shards. Differentiable when the tensors require grad. The squares summed
    onto each term's slots come from stacks (:func:`stacked_sums`) in the GPU layout, when a
    gradient is recorded or under ``torch.compile`` (which fuses them), otherwise parameter by
    parameter (:func:`sums_per_parameter`); both then take one ``index_add_``."""
    n = structure.num_generators
    sums = _sums_buffer(tensors, structure, dtype, batch_dims, result_dtype)
    s_in, s_out, _, total = sums.split([n, n, 2, 1], -1)
    return s_in, s_out, total.squeeze(-1)


def paired_generator_sums(
    tensors: Mapping[str, Tensor],
    structure: GaugeStructure,
    dtype: torch.dtype,
    batch_dims: int = 0,
    result_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(S, ||theta||^2)``: the sums of :func:`generator_sums` with ``S_in`` and ``S_out`` as
    one view ``S`` ``[*batch, 2, N]`` (``S[..., 0, :] = S_in``), an operation on both at once
    (a ``torch.where``) then being one."""
    n = structure.num_generators
    sums = _sums_buffer(tensors, structure, dtype, batch_dims, result_dtype)
    pair, total = sums.split([2 * n, 3], -1)
    return pair.unflatten(-1, (2, n)), total[..., -1]


def _sums_buffer(
    tensors: Mapping[str, Tensor],
    structure: GaugeStructure,
    dtype: torch.dtype,
    batch_dims: int,
    result_dtype: torch.dtype | None,
) -> Tensor:
    """The buffer ``[*batch, S_in (N), S_out (N), dummy_in, dummy_out, ||theta||^2]`` of
    :func:`generator_sums`, summed over the shards and cast to ``result_dtype``."""
    n = structure.num_generators
    first = next(iter(tensors.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    batch = tuple(first.shape[:batch_dims]) if first is not None else ()
    plan = kernel_plan(structure, device)
    sums = torch.zeros(*batch, 2 * n + 3, dtype=dtype, device=device)
    if plan.groups:
        recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())
        if gpu_layout(device) or recorded or torch.compiler.is_compiling():
            values = stacked_sums(tensors, plan, dtype, batch_dims)
        else:
            values = sums_per_parameter(tensors, plan, dtype, batch)
        sums.index_add_(-1, plan.index, values)
    (sums,) = structure.sum_over_shards(sums)
    return sums if result_dtype is None else sums.to(result_dtype)


def stacked_sums(
    tensors: Mapping[str, Tensor], plan: KernelPlan, dtype: torch.dtype, batch_dims: int
) -> Tensor:
    """The values of the ``index_add_`` of :func:`generator_sums` (``[*batch, len(index)]``)
    from stacks: per group, one stack and square of its parameters and one sum per slot shape,
    or one norm over trailing dims; the squares of those norms and of the per-entry parameters
    (:func:`_entry_names`) in one ``torch._foreach_mul``; then one ``_chunk_cat``; a number of
    operations that does not grow with depth. Differentiable."""
    entries = _entry_names(tensors, plan, dtype)
    roots: list[Tensor] = []  # the tensors whose squares are values: squared in one call
    per_group = []
    for group in plan.groups:
        if group.names[0] in entries:  # per entry: the squares of each parameter in turn
            values = [tensors[name] for name in group.names]
            roots += values
            per_group.append([values] * len(group.signs))
            continue
        sums, norm = _group_sums(tensors, group, dtype, batch_dims)
        roots += sums[:1] if norm else []
        per_group.append([[values] for values in sums])
    squares = (
        dict(zip(map(id, roots), torch._foreach_mul(roots, roots), strict=True)) if roots else {}
    )
    reduced: dict[int, list[Tensor]] = {+1: [], -1: []}
    firsts = []  # every entry lands in its parameter's first term: these sum to ||theta||^2
    for group, per_term in zip(plan.groups, per_group, strict=True):
        per_term = [[squares.get(id(v), v) for v in values] for values in per_term]
        for values, sign in zip(per_term, group.signs, strict=True):
            reduced[sign] += values
        firsts += per_term[0]
    return flat_cat(reduced[1] + reduced[-1] + firsts, batch_dims, plan.chunkable)


@functools.lru_cache(maxsize=4096)  # a function of a group's slot shapes, asked at every step
def _broadcast(shapes: tuple[torch.Size, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` of ``shapes`` (a Python call of tens of microseconds)."""
    return torch.broadcast_shapes(*shapes)


def _group_sums(
    tensors: Mapping[str, Tensor], group: TermGroup, dtype: torch.dtype, batch_dims: int
) -> tuple[list[Tensor], bool]:
    """Per term of ``group``, the squares of its parameters stacked (``[*batch, L, *shape]``; a
    single one as it is) summed onto the term's slot shape; terms of one slot shape share a sum.
    Where every term's sum is one norm over trailing dims (:func:`_trailing_norm`), that norm
    for each term and ``True``: the caller squares it. The stack is freed on return, before the
    next group's is made."""
    one = len(group.names) == 1
    x = [tensors[name] for name in group.names]
    x = x[0] if one else torch.stack(x, batch_dims)
    lead = tuple(x.shape[: batch_dims + (0 if one else 1)])
    shapes = [(*lead, *slots.shape[1:]) for slots in group.slots]
    pair = (*lead, *_broadcast(tuple(slots.shape[1:] for slots in group.slots)))
    norm = _trailing_norm(x, pair, dtype)
    if norm is not None and all(shape == norm.shape for shape in shapes):
        return [norm] * len(shapes), True
    sq = _squares(x, norm, dtype, not one)
    by_shape: dict[tuple[int, ...], Tensor] = {}
    for shape in shapes:
        if shape not in by_shape:
            by_shape[shape] = reduce_to(sq, shape)
    return [by_shape[shape] for shape in shapes], False


def sums_per_parameter(
    tensors: Mapping[str, Tensor], plan: KernelPlan, dtype: torch.dtype, batch: tuple[int, ...]
) -> Tensor:
    """The values of :func:`stacked_sums`, written parameter by parameter into slices of one
    buffer (:func:`add_squares_`): no stack nor squared copy of the parameters, a number of
    operations that grows with their number (cheap on the CPU, where an operation costs no
    launch). Not differentiable."""
    flat = torch.zeros(*batch, plan.index.numel(), dtype=dtype, device=plan.index.device)
    for group, starts in zip(plan.groups, plan.starts, strict=True):
        shapes = [tuple(slots.shape[1:]) for slots in group.slots]
        shapes.append(shapes[0])  # the first term's copy, summed into ||theta||^2
        sizes = [math.prod(shape) for shape in shapes]
        for k, name in enumerate(group.names):
            outs = [
                flat[..., a + k * m : a + (k + 1) * m].view((*batch, *shape))
                for a, m, shape in zip(starts, sizes, shapes, strict=True)
            ]
            add_squares_(tensors[name], outs[:-1], dtype)
            outs[-1].copy_(outs[0])
    return flat


CHUNK = 1 << 18  # squares held at once by add_squares_: 1 MiB of float32, which stays in cache
# Entries from which a temporary is taken from the reused buffer: a smaller one is allocated
# faster than the buffer is sliced.
SCRATCH_MIN = 1 << 14
_scratch = threading.local()  # per thread: {(device, dtype): a buffer of CHUNK entries}


def _square(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.square()`` in ``dtype``, written into a per-thread buffer reused from call to call
    when ``x`` has at most :data:`CHUNK` entries (valid until the next call): a fresh
    allocation at each call would be handed back to the system and faulted in again page by
    page, which costs more than the squaring."""
    if x.numel() > CHUNK:
        return x.to(dtype).square()
    out = _scratch_buffer(x.device, dtype, x.shape)
    return torch.mul(x, x, out=out) if x.dtype == dtype else out.copy_(x).square_()


def _scratch_buffer(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """A view of ``shape`` (at most :data:`CHUNK` entries) into this thread's buffer of
    ``dtype`` on ``device``."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (device, dtype)
    if key not in buffers:
        buffers[key] = torch.empty(CHUNK, dtype=dtype, device=device)
    return buffers[key][: math.prod(shape)].view(shape)


def row_blocks(x: Tensor, shapes: list[tuple[int, ...]]) -> list[slice] | None:
    """Blocks of rows (dim 0) of about :data:`CHUNK` entries of a larger ``x`` whose sum
    ``shapes`` each vary along dim 0 only or not along it: a block's squares then sum onto
    its own rows of the ones and add onto the others. ``None`` otherwise."""
    if x.numel() <= CHUNK or x.dim() < 2:
        return None
    if any(shape[0] > 1 and math.prod(shape[1:]) > 1 for shape in shapes):
        return None
    step = max(1, CHUNK // (x.numel() // x.shape[0]))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def add_squares_(x: Tensor, outs: list[Tensor], dtype: torch.dtype) -> None:
    """``out += x.square()`` in ``dtype``, summed onto ``out``'s shape (broadcast-compatible
    with ``x``'s), for every ``out`` of ``outs``, reading ``x`` once: summed over the trailing
    dims no ``out`` varies along in one pass where that is cheap (a norm), otherwise squared
    into a reused buffer block by block of rows (:func:`row_blocks`), which stays in cache while
    each ``out`` reads it."""
    shapes = [tuple(out.shape) for out in outs]
    pair = torch.broadcast_shapes(*shapes)
    trailing = trailing_sum_of_squares(x, pair, dtype)
    blocks = None if trailing is not None else row_blocks(x, shapes)
    for block in blocks or [...]:  # every row (also of a 0-dim tensor)
        sq = trailing if trailing is not None else _square(x[block], dtype)
        by_shape: dict[torch.Size, Tensor] = {}  # outs of one shape share a sum
        for out in outs:
            target = out[block] if blocks and out.shape[0] > 1 else out
            if target.shape not in by_shape:
                by_shape[target.shape] = reduce_to(sq, target.shape)
            target.add_(by_shape[target.shape])


def gpu_layout(device: torch.device) -> bool:
    """Whether the kernels take their GPU layout on ``device``, where every operation is a kernel
    launch: the squared sums from stacks of each group's parameters (:func:`stacked_sums`), and
    per-entry factors made dense over each parameter's shape (a ``torch._foreach_*`` call is one
    kernel only over tensors of equal shapes, so one dense factor per parameter moves every
    tensor in one pass). On the CPU, where an operation costs no launch and such a call loops
    over its tensors anyway, the sums are taken parameter by parameter (no stacked copy of the
    parameters, :func:`sums_per_parameter`) and the terms' factors are broadcast (their product
    formed a block of rows at a time, :func:`mul_by_rows_`)."""
    return device.type != "cpu"


def term_values(cx: Tensor, group: TermGroup, scale: float) -> list[Tensor]:
    """``scale * sum_t sign_t cx[..., slots_t]`` over the terms of each slot shape of the group
    (terms of one shape share every later pass): ``[*batch, L, *slot_shape]`` per shape
    (``cx``: ``[*batch, N + 1]``, its dummy slot 0)."""
    by_shape: dict[torch.Size, Tensor] = {}
    for slots, sign in zip(group.slots, group.signs, strict=True):
        x, before = cx[..., slots], by_shape.get(slots.shape)
        if before is None:
            by_shape[slots.shape] = x * (scale * sign)
        else:
            by_shape[slots.shape] = torch.add(before, x, alpha=scale * sign)
    return list(by_shape.values())


def all_term_values(x: Tensor, plan: KernelPlan) -> Tensor:
    """The values of :func:`term_values` at scale 1 for every group of ``plan`` at once, in the
    order of ``plan.terms``' rows: ``[*batch, M]`` (``x``: ``[*batch, N + 1]``, its dummy slot
    0); one gather, one product and one sum."""
    return (x[..., plan.terms] * plan.term_signs).sum(-1)


def group_pieces(values: Tensor, plan: KernelPlan) -> list[list[Tensor]]:
    """Per group of ``plan``, views of ``values`` (``[*batch, M]``, as :func:`all_term_values`
    lays them out) for each of its slot shapes: ``[*batch, L, *slot_shape]``."""
    sizes = [shape.numel() for shapes in plan.shapes for shape in shapes]
    pieces = iter(values.split(sizes, -1))
    batch = values.shape[:-1]
    return [[next(pieces).view(*batch, *shape) for shape in shapes] for shapes in plan.shapes]


def per_parameter(
    values: Tensor, group: TermGroup, batch_dims: int, dense: bool
) -> tuple[Tensor, ...]:
    """``values`` ``[*batch, L, *slot_shape]`` split into one view ``[*batch, *shape]`` per
    parameter of the group, made dense (contiguous) over each parameter's shape when ``dense``
    (see :func:`gpu_layout`), otherwise only over a trailing run of fewer than
    :data:`SHORT_RUN` entries it would be broadcast along."""
    shape = tuple(values.shape[batch_dims + 1 :])
    k = len(shape)
    while k > 0 and shape[k - 1] == 1:
        k -= 1
    inner = math.prod(group.shape[k:])
    full = (*values.shape[: batch_dims + 1], *shape[:k], *group.shape[k:])
    spread = dense or 0 < k < len(shape) and 1 < inner < SHORT_RUN
    if spread and (values.shape != full or not values.is_contiguous()):
        values = values.expand(full).contiguous()
    return values.unbind(batch_dims)


def group_coefficients(
    cx: Tensor, group: TermGroup, dtype: torch.dtype, batch_dims: int = 0
) -> list[tuple[Tensor, ...]]:
    """``sum_t sign_t cx[..., slots_t]`` for every entry of the group's parameters as one
    broadcast coefficient per slot shape, per parameter (:func:`per_parameter`) in ``dtype``, to
    be summed (``cx``: ``[*batch, N + 1]``, dummy slot 0): the CPU layout."""
    terms = term_values(cx, group, 1.0)
    return [per_parameter(t.to(dtype), group, batch_dims, False) for t in terms]


FACTOR_BITS = 32  # the fewest bits of the dtype factors are formed in (float32)


@functools.cache  # a function of the dtype alone, asked once per moved tensor and step
def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the factors that move tensors of ``dtype`` are formed in: float32 for float16
    and bfloat16 (their product over the terms is then rounded once; in float16 a term's factor
    ``exp(12)`` would also overflow where its product with the entry does not), ``dtype``
    otherwise."""
    return torch.float32 if torch.finfo(dtype).bits < FACTOR_BITS else dtype  # no aten op


@functools.cache  # a function of the dtype alone, asked once per moved tensor and step
def applied_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the factor a tensor of ``dtype`` is multiplied by: float32 for float16 (the
    factor can exceed its range where the product with the entry does not; each entry is then
    rounded once), ``dtype`` otherwise (for bfloat16, the float32 product rounded once to it)."""
    narrow = torch.finfo(dtype).tiny > torch.finfo(torch.float32).tiny
    return torch.float32 if narrow else dtype


def group_factors(
    hx: Tensor, group: TermGroup, power: int, dtype: torch.dtype, batch_dims: int = 0
) -> list[tuple[Tensor, ...]]:
    """``exp(power * sum_t sign_t hx[..., slots_t])`` for every entry of the group's
    parameters as each term's factor (``exp`` in float64 on the term's own slots, rounded to
    :func:`factor_dtype`), per parameter (:func:`per_parameter`), to be multiplied together
    (:func:`mul_by_rows_`); for float16 their product, made dense in float32 (which the
    entries are then multiplied by, rounded once)."""
    factors = [torch.exp(x).to(factor_dtype(dtype)) for x in term_values(hx, group, float(power))]
    dense = applied_dtype(dtype) != dtype
    if dense:
        factors = [functools.reduce(torch.mul, factors)]
    return [per_parameter(f, group, batch_dims, dense) for f in factors]


@torch.no_grad()
def rescale_(targets: Targets, structure: GaugeStructure, h: Tensor, batch_dims: int = 0) -> None:
    """The action without validation: every tensor listed for parameter ``name`` is multiplied
    by ``exp(power * sum_n w_n(e) h_n)``. ``h``: ``[*batch, N]`` (finite), the tensors
    ``[*batch, *shape]``; with ``batch_dims`` leading dims, copy ``b`` of a stack moves by
    ``h[b]``. Per group, power and dtype (a factor rounded to another tensor's dtype would not be
    exact), the factors of :func:`group_factors`: in the GPU layout each applied with one
    ``torch._foreach_mul_`` over every tensor of that power and dtype, on the CPU tensor by
    tensor (:func:`mul_by_rows_`)."""
    first = next(iter(targets.values()))[0][0]
    device = first.device
    h = h.to(device=device, dtype=torch.float64)
    plan = kernel_plan(structure, device)
    hx = with_dummy_slot(h, plan)
    if gpu_layout(device):
        _rescale_dense_(targets, plan, hx, batch_dims)
        return
    for group in plan.groups:
        by_power: dict[tuple[int, torch.dtype], list[tuple[int, Tensor]]] = {}
        for k, name in enumerate(group.names):
            for t, power in targets.get(name, ()):
                by_power.setdefault((power, t.dtype), []).append((k, t))
        for (power, dtype), moved in by_power.items():
            factors = group_factors(hx, group, power, dtype, batch_dims)
            for k, t in moved:
                mul_by_rows_(t, [per_param[k] for per_param in factors])


def _rescale_dense_(targets: Targets, plan: KernelPlan, hx: Tensor, batch_dims: int) -> None:
    """:func:`rescale_` in the GPU layout: the factors ``exp(sum_t sign_t hx[slots_t])`` of
    every group from one gather (:func:`all_term_values`) and one ``exp`` in float64, rounded
    once to each :func:`factor_dtype` the tensors need; then per group their product, rounded
    to each :func:`applied_dtype` (the groups of one of ``plan.batches`` at a time), made into
    one dense factor ``f`` per parameter, and every tensor of the batch moved by
    :func:`_move_`."""
    exps = torch.exp(all_term_values(hx, plan))
    pieces: dict[torch.dtype, list[list[Tensor]]] = {}  # per factor dtype, as group_pieces
    for batch in plan.batches:
        moves: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # by power
        for g in batch:
            group = plan.groups[g]
            mine = [targets.get(name, ()) for name in group.names]
            factors = {}
            for dtype in {t.dtype for tensors in mine for t, _ in tensors}:
                wide, applied = factor_dtype(dtype), applied_dtype(dtype)
                if wide not in pieces:
                    pieces[wide] = group_pieces(exps.to(wide), plan)
                product = factor_product(pieces[wide][g], applied)
                factors[applied] = per_parameter(product, group, batch_dims, True)
            for k, tensors in enumerate(mine):
                for t, p in tensors:
                    ts, fs = moves.setdefault(p, ([], []))
                    ts.append(t)
                    fs.append(factors[applied_dtype(t.dtype)][k])
        _move_(moves)


def _move_(moves: dict[int, tuple[list[Tensor], list[Tensor]]]) -> None:
    """Every tensor of ``moves[p]`` (power ``p``) multiplied by its factor (of its shape) ``p``
    times, or divided ``-p`` times, in place: the ``i``-th time (``i = 1, 2, ...``) every one of
    ``p >= i`` in one ``torch._foreach_mul_`` and every one of ``p <= -i`` in one
    ``torch._foreach_div_`` (one kernel over tensors of any shapes, each of its factor's)."""
    for i in range(1, max(map(abs, moves), default=0) + 1):
        for apply, sign in ((torch._foreach_mul_, 1), (torch._foreach_div_, -1)):
            now = [moves[p] for p in moves if sign * p >= i]
            if now:
                apply([t for ts, _ in now for t in ts], [f for _, fs in now for f in fs])


def by_row_blocks(t: Tensor, factors: list[Tensor]) -> Iterator[tuple[Any, list[Tensor]]]:
    """``(block, restricted)``: the rows ``block`` of ``t`` and the ``factors`` (broadcast over
    ``t``) restricted to them; several factors on a large ``t`` block by block of rows
    (:func:`row_blocks`), so that each block stays in cache while they act on it; otherwise
    ``block`` is every row."""
    blocks = row_blocks(t, [tuple(f.shape) for f in factors]) if len(factors) > 1 else None
    for block in blocks or [...]:  # every row (also of a 0-dim tensor)
        yield block, [f[block] if blocks and f.shape[0] > 1 else f for f in factors]


def mul_by_rows_(t: Tensor, factors: list[Tensor]) -> None:
    """``t *= f_1 f_2 ...`` in place for the factors (broadcast over ``t``): their product taken
    first (:func:`factor_product`), block by block of rows (:func:`by_row_blocks`), so that
    each entry is multiplied once (multiplied by each factor in turn, an entry could leave its
    dtype's range on the way: a float32 ``1e-20`` moved by ``exp(-60)``, then by ``exp(60)``,
    became 0)."""
    applied = applied_dtype(t.dtype)
    for block, local in by_row_blocks(t, factors):
        t[block].mul_(factor_product(local, applied, scratch=True))


def factor_product(factors: list[Tensor], dtype: torch.dtype, scratch: bool = False) -> Tensor:
    """The product of broadcast ``factors`` (of equal ranks), multiplied from the left in their
    dtype and the last multiplication written in ``dtype`` (one rounding to it); with
    ``scratch``, a product of :data:`SCRATCH_MIN` to :data:`CHUNK` entries goes into a
    per-thread buffer reused from call to call (:func:`_square`), valid until the next call."""
    if len(factors) == 1:
        return factors[0].to(dtype)
    first, last = functools.reduce(torch.mul, factors[:-1]), factors[-1]
    if not scratch and first.dtype == dtype:  # no buffer to size (the GPU layout's case)
        return torch.mul(first, last)
    shape = torch.broadcast_shapes(first.shape, last.shape)  # 0 where a size is 0, not 1
    if scratch and SCRATCH_MIN <= math.prod(shape) <= CHUNK:
        out = _scratch_buffer(first.device, dtype, shape)
    else:
        out = None if first.dtype == dtype else first.new_empty(shape, dtype=dtype)
    return torch.mul(first, last, out=out)


@torch.no_grad()
def add_selection_grads_(
    grads: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    structure: GaugeStructure,
    mu: Tensor,
    batch_dims: int = 0,
) -> None:
    """``grads[name] += (sum_n w_n(e) mu_n) * theta_e`` in place for every entry of the bound
    ``params`` (``[*batch, *shape]``), given the coefficients ``mu`` (``[*batch, N]``, a
    strength included): the gradient of ``P``, the coefficients in the widest dtype of each
    group's parameters. In the GPU layout the coefficients of every group come from one gather
    (:func:`all_term_values`), and the dense ones of a batch of groups take one
    ``torch._foreach_addcmul_``; on the CPU parameter by parameter, block by block of rows
    (:func:`by_row_blocks`)."""
    plan = kernel_plan(structure, mu.device)
    cx = with_dummy_slot(mu, plan)  # the dummy slot N
    if gpu_layout(cx.device):
        _add_selection_grads_dense_(grads, params, plan, cx, batch_dims)
        return
    for group in plan.groups:
        ps, gs = [params[name] for name in group.names], [grads[name] for name in group.names]
        dtype = functools.reduce(torch.promote_types, {p.dtype for p in ps})
        coefficients = group_coefficients(cx, group, dtype, batch_dims)
        for k, (grad, x) in enumerate(zip(gs, ps, strict=True)):
            cs = [per_param[k] for per_param in coefficients]
            for block, local in by_row_blocks(grad, cs):
                for c in local:
                    grad[block].addcmul_(x[block], c)


def _add_selection_grads_dense_(
    grads: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    plan: KernelPlan,
    cx: Tensor,
    batch_dims: int,
) -> None:
    """:func:`add_selection_grads_` in the GPU layout: the coefficients of every group from
    one gather (:func:`all_term_values`), each group's summed into one dense coefficient per
    parameter, and one ``torch._foreach_addcmul_`` per batch of groups (``plan.batches``)."""
    values = all_term_values(cx, plan)
    pieces: dict[torch.dtype, list[list[Tensor]]] = {}  # per dtype, as group_pieces
    for batch in plan.batches:
        gs, ps, cs = [], [], []
        for g in batch:
            group = plan.groups[g]
            mine = [params[name] for name in group.names]
            dtype = functools.reduce(torch.promote_types, {p.dtype for p in mine})
            if dtype not in pieces:
                pieces[dtype] = group_pieces(values.to(dtype), plan)
            total = functools.reduce(torch.add, pieces[dtype][g])
            cs += per_parameter(total, group, batch_dims, True)
            gs += [grads[name] for name in group.names]
            ps += mine
        torch._foreach_addcmul_(gs, ps, cs)


def finite_flag(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: whether every entry of every tensor is
    finite, from the largest ``|entry|`` of each (the max norm: a 2-norm overflows for finite
    entries above about ``1e154`` in float64 and ``1e19`` in float32; NaN propagates): each
    below ``inf`` (a norm is not negative, and NaN compares false). Four operations whatever
    the number of tensors, and no host read."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return (torch.stack(torch._foreach_norm(tensors, math.inf)) < math.inf).all()


def row_norms(x: Tensor) -> Tensor:
    """The 2-norm over the last dim of ``x`` (``[*batch, N]``), computed on ``x`` divided by its
    largest absolute entry: ``torch.linalg.vector_norm`` squares the entries as they are, so
    its result is 0 for entries below about ``1e-154`` and ``inf`` above about ``1e154`` in
    float64 (``1e-19`` and ``1e19`` in float32). 0 for an empty or all-zero row, NaN for a row
    holding NaN, ``inf`` for one holding inf and no NaN (as ``vector_norm``)."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    scale = x.detach().abs().amax(-1, keepdim=True)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(x / scale, dim=-1) * scale.squeeze(-1)
