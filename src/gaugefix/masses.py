"""The squared parameter masses of stacked copies of a model, evaluated at gauges ``h`` without
touching the parameters: ``F(h) = ||g(h) . theta||^2``, ``S_in(h)``, ``S_out(h)`` and products with
the Gram matrix ``K(h)``, for the Newton and line-search solvers (:mod:`gaugefix.balancing`,
:mod:`gaugefix.coordinates`) and the bounded orbit step (:mod:`gaugefix.soft`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from gaugefix.kernels import reduce_to, trailing_sum_of_squares
from gaugefix.moment import pair_shape, refuse_meta, scatter_add_
from gaugefix.structure import GaugeStructure, PlannedParam

__all__ = ["MassState", "Masses"]

# A group of stacked terms: the slots of every stacked parameter (``[G, a]``) and the sign.
StackedTerms = list[tuple[Tensor, int]]


class Masses:
    """The squared parameter masses of ``R`` stacked copies of a model (float64), arranged for
    evaluation at gauges ``h`` (``[R, N]``) without forming the masses at ``h``.

    Under ``h`` an entry's mass ``theta_e^2`` becomes ``theta_e^2 exp(2 sum_n w_n(e) h_n)``. From
    the masses come the objective ``F(h) = ||g(h) . theta||^2`` (gradient ``2 mu``, Hessian
    ``4 K``), ``S_in`` and ``S_out`` at ``h``, and products with the Gram matrix
    ``K(h) = sum_e u_e w(e) w(e)^T``.

    Entries that agree on every term map share every factor, so their squares are summed first
    (a conv kernel's taps). A parameter whose terms split into two groups varying along disjoint
    dims (a weight's rows and columns) is held as a matrix ``M[i, j]``: its masses at ``h`` are
    ``e_i M_ij f_j`` with ``e``, ``f`` the exponentials of each group's exponent, so row sums are
    ``e * (M f)``, column sums ``f * (M^T e)``, and ``K v`` two more matrix-vector products: each a
    single read of ``M``. Matrices of one shape are stacked and multiplied together (``bmm``).
    Every other parameter is flattened into one list of masses with its terms' slots. ``h`` is
    taken relative to a base gauge that is moved (the masses squared again from the tensors at
    it) when it drifts far, so that the exponentials never overflow.
    """

    REBASE = 30.0  # |h - base| beyond which the masses are squared again at the new base

    def __init__(self, tensors: Mapping[str, Tensor], structure: GaugeStructure) -> None:
        """``tensors``: name -> ``[R, *shape]`` for the structure's parameters (or some of
        them: the masses of that part of the model). They are read again when the base moves,
        and must not change while the masses are in use; ``ValueError`` on the ``meta``
        device."""
        refuse_meta(tensors)
        first = next(iter(tensors.values()))
        self.n = structure.num_generators
        self.sum_over_shards = structure.sum_over_shards
        self.device = first.device
        self.r = first.shape[0]
        self.tensors = {k: v.detach() for k, v in tensors.items()}
        # the parameters held, less those of another part of the model
        self.plan = [p for p in structure.plan(self.device) if p.name in tensors]
        self.base = torch.zeros(self.r, self.n, dtype=torch.float64, device=self.device)
        self._load(moved=False)
        self.structure = structure

    def zero_free(self) -> Tensor:
        """Whether every mass of each copy is non-zero: ``[R]`` bool (one read of the masses
        at the base, so call it before the base moves)."""
        least = [mat.flatten(2).amin(-1).amin(0) for mat, _, _ in self.stacks]
        if self.flat_w.shape[1]:
            least.append(self.flat_w.amin(-1))
        if not least:
            return torch.ones(self.r, dtype=torch.bool, device=self.device)
        return torch.stack(least).amin(0) > 0

    def exponent_rows(self, r: int, free: Tensor) -> sparse.csr_matrix:
        """The exponent vectors ``w(e)`` (rows, ``[M, N]``, integer) of copy ``r``'s entries
        with non-zero mass and a term on a ``free`` generator (``[N]`` bool), at the base
        (repeats within a parameter group dropped)."""
        fx = torch.cat([free, free.new_zeros(1)])
        groups = []
        for mat, rho, gamma in self.stacks:
            rows = _touches(fx, rho)[:, :, None] | _touches(fx, gamma)[:, None, :]
            g, i, j = torch.nonzero((mat[:, r] != 0) & rows, as_tuple=True)
            slots = [s[g, i] for s, _ in rho] + [s[g, j] for s, _ in gamma]
            groups.append((torch.stack(slots, 1), [sg for _, sg in (*rho, *gamma)]))
        if self.flat_slots.numel():
            keep = (self.flat_w[r] != 0) & fx[self.flat_slots].any(0)
            slots, signs = self.flat_slots[:, keep].T, self.flat_signs[:, keep].T
            for pattern in torch.unique(signs, dim=0):
                same = (signs == pattern).all(1)
                groups.append((slots[same], pattern.long().tolist()))
        return sparse.vstack([_rows(s, sg, self.n) for s, sg in groups] or
                             [sparse.csr_matrix((0, self.n))]).tocsr()  # fmt: skip

    def pinned(self, fixed: Tensor) -> Tensor:
        """The generators ``n`` with ``c_n = 0`` for every direction ``c`` (0 on ``fixed``,
        ``[R, N]`` bool) with ``w(e) . c <= 0`` for every entry of non-zero mass: ``[R, N]``
        bool, by propagation to a fixpoint (sound, not always complete). An entry whose terms
        other than ``+v`` (``-v``) all have ``sign_t c_t >= 0`` known gives ``c_v <= 0``
        (``>= 0``); both bounds pin ``v``. One read of the masses per round."""
        known = [torch.cat([fixed, fixed.new_ones(self.r, 1)], 1).clone() for _ in range(2)]
        while True:  # known[0]: c_n <= 0, known[1]: c_n >= 0
            derived = self._bounds(known[0], known[1])
            grown = [k | d for k, d in zip(known, derived, strict=True)]
            if all(bool((g == k).all()) for g, k in zip(grown, known, strict=True)):
                return (known[0] & known[1])[:, : self.n]
            known = grown

    def _bounds(self, upper: Tensor, lower: Tensor) -> tuple[Tensor, Tensor]:
        """One round of :meth:`pinned`: the bounds derived from every entry, ``[R, N + 1]``."""
        new_upper = torch.zeros_like(upper, dtype=torch.float64)
        new_lower = torch.zeros_like(new_upper)
        for mat, rho, gamma in self.stacks:
            bad_r, bad_c = _unknown(upper, lower, rho), _unknown(upper, lower, gamma)
            row_ok = _bmv(mat, (bad_c == 0).to(mat.dtype)) > 0  # [G, R, a]
            col_ok = _bmv_t(mat, (bad_r == 0).to(mat.dtype)) > 0
            _derive_(new_upper, new_lower, upper, lower, rho, bad_r, row_ok)
            _derive_(new_upper, new_lower, upper, lower, gamma, bad_c, col_ok)
        if self.flat_slots.numel():
            signs = self.flat_signs
            bad = _flat_unknown(upper, lower, self.flat_slots, signs)  # [T, R, P]
            total = bad.sum(0)
            for k in range(signs.shape[0]):
                ok = (self.flat_w > 0) & (total - bad[k] == 0)
                slots = self.flat_slots[k]
                scatter_add_(new_upper, slots, (ok & (signs[k] > 0)).to(torch.float64))
                scatter_add_(new_lower, slots, (ok & (signs[k] < 0)).to(torch.float64))
        return new_upper > 0, new_lower > 0

    def _load(self, moved: bool) -> None:
        """The masses at the base gauge (``moved``: other than 0), squared from the tensors
        multiplied by their factors. Masses held at one base and rescaled to the next would keep
        a mass that underflowed on the way at 0 (a neuron with incoming entries ``1e140`` and
        outgoing ones ``1e-140`` is balanced through several bases)."""
        by_shape: dict[tuple, list[tuple]] = {}
        flat: list[tuple[Tensor, list[Tensor], list[int]]] = []
        bx = torch.cat([self.base, self.base.new_zeros(self.r, 1)], dim=1)
        for param in self.plan:
            t = self.tensors[param.name]
            if moved:
                exponent = sum(term.sign * bx[:, term.slots] for term in param.terms)
                t = t.to(torch.float64) * torch.exp(exponent)
            w = _squared(t, (self.r, *pair_shape(param)))
            matrix = _as_matrix(param, w)
            if matrix is None:
                slots = [t.slots.expand(w.shape[1:]).reshape(-1) for t in param.terms]
                flat.append((w.reshape(self.r, -1), slots, [t.sign for t in param.terms]))
            else:
                by_shape.setdefault(matrix[0], []).append(matrix[1:])
        # Stacks of equally shaped matrices: mat [G, R, a, b], per term slots [G, a] / [G, b].
        self.stacks = [_stacked(group) for group in by_shape.values()]
        self.flat_w, self.flat_slots, self.flat_signs = self._flat(flat)

    def _flat(self, flat: list[tuple[Tensor, list[Tensor], list[int]]]) -> tuple[Tensor, ...]:
        """The flattened masses ``[R, P]`` with their terms' slots and signs ``[T, P]`` (shorter
        term lists padded with the dummy slot ``N``, sign +1)."""
        if not flat:
            return (
                torch.zeros(self.r, 0, dtype=torch.float64, device=self.device),
                torch.zeros(0, 0, dtype=torch.long, device=self.device),
                torch.zeros(0, 0, dtype=torch.float64, device=self.device),
            )
        terms = max(len(s) for _, s, _ in flat)
        slots, signs = [], []
        for k in range(terms):
            slots.append(torch.cat([s[k] if k < len(s) else s[0].new_full(s[0].shape, self.n)
                                    for _, s, _ in flat]))  # fmt: skip
            signs.append(torch.cat([torch.full_like(s[0], sg[k] if k < len(s) else 1,
                                                    dtype=torch.float64)
                                    for _, s, sg in flat]))  # fmt: skip
        return torch.cat([w for w, _, _ in flat], dim=1), torch.stack(slots), torch.stack(signs)

    def _extended(self, h: Tensor) -> Tensor:
        """``h - base`` with the dummy slot's 0 appended: ``[R, N + 1]``."""
        return torch.cat([h - self.base, h.new_zeros(self.r, 1)], dim=1)

    def rebase(self, h: Tensor) -> None:
        """Move the base gauge to ``h`` when ``h`` is far from the base: the masses are squared
        again from the tensors at ``h`` (:meth:`_load`)."""
        if self.n == 0 or float((h - self.base).abs().max()) <= self.REBASE:
            return
        self.base = h.clone()
        self._load(moved=True)

    def _flat_exponent(self, hx: Tensor) -> Tensor:
        """``sum_t sign_t h[slot_t]`` for every flat mass: ``[R, P]``."""
        if not self.flat_slots.numel():
            return self.flat_w.new_zeros(self.flat_w.shape)
        return (hx[:, self.flat_slots] * self.flat_signs).sum(1)

    def at(self, h: Tensor, sums: bool = True) -> MassState:
        """The masses at gauge ``h`` (``[R, N]``): ``F`` always, ``(S_in, S_out)`` when
        ``sums``."""
        return MassState(self, h, sums)


def _touches(fx: Tensor, terms: StackedTerms) -> Tensor:
    """Whether a row (column) of each stacked matrix has a term on a ``fx`` slot: ``[G, a]``."""
    return torch.stack([fx[slots] for slots, _ in terms]).any(0)


def _unknown(upper: Tensor, lower: Tensor, terms: StackedTerms) -> Tensor:
    """How many terms of each row of a group lack the bound ``sign_t c_t >= 0``: ``[G, R, a]``."""
    return sum(
        (~(lower if sign > 0 else upper)[:, slots]).permute(1, 0, 2).to(torch.int64)
        for slots, sign in terms
    )


def _flat_unknown(upper: Tensor, lower: Tensor, slots: Tensor, signs: Tensor) -> Tensor:
    """Per term of every flat mass, whether it lacks ``sign_t c_t >= 0``: ``[T, R, P]``."""
    known = torch.where(signs[:, None, :] > 0, lower[:, slots].permute(1, 0, 2),
                        upper[:, slots].permute(1, 0, 2))  # fmt: skip
    return (~known).to(torch.int64)


def _derive_(
    new_upper: Tensor,
    new_lower: Tensor,
    upper: Tensor,
    lower: Tensor,
    terms: StackedTerms,
    bad: Tensor,
    ok: Tensor,
) -> None:
    """Bounds on each term's generator from the rows with the other side all known (``ok``)
    and every other term of the row known."""
    for slots, sign in terms:
        own = (~(lower if sign > 0 else upper)[:, slots]).permute(1, 0, 2).to(torch.int64)
        derived = (ok & (bad - own == 0)).to(torch.float64)
        _scatter_group_(new_upper, new_lower, [(slots, sign)], derived)


def _rows(slots: Tensor, signs: list[int], n: int) -> sparse.csr_matrix:
    """The distinct rows ``sum_t sign_t e_{slots[:, t]}`` (the dummy slot ``n`` dropped) of
    entries with term slots ``slots`` (``[E, T]``): ``[M, n]``."""
    unique = np.unique(slots.cpu().numpy(), axis=0)
    m, t = unique.shape
    rows = np.repeat(np.arange(m), t)
    values = np.tile(np.asarray(signs, dtype=np.float64), m)
    out = sparse.csr_matrix((values, (rows, unique.reshape(-1))), shape=(m, n + 1))
    out.sum_duplicates()
    out.eliminate_zeros()
    return out[:, :n]


def _squared(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t^2`` in float64 summed down to ``shape`` (``[R, *pair_shape]``)."""
    sq = trailing_sum_of_squares(t, shape, torch.float64)
    if sq is None:
        sq = t.square() if t.dtype == torch.float64 else t.to(torch.float64).square_()
    return reduce_to(sq, shape)


def _as_matrix(param: PlannedParam, w: Tensor) -> tuple | None:
    """``(key, M [R, a, b], rho, gamma)``: the masses ``w`` (``[R, *pair_shape]``) of a
    parameter whose terms split into two groups along disjoint dims, as a matrix with the row
    group's terms ``rho`` and the column group's ``gamma`` (slots flattened like the rows and
    columns); ``key`` says which matrices stack. ``None`` for any other parameter."""
    split = _two_groups(param)
    if split is None:
        return None
    (a_dims, a_terms), (b_dims, b_terms) = split
    shape = w.shape[1:]
    rest = [d for d in range(len(shape)) if d not in a_dims and d not in b_dims]
    perm = [0, *(d + 1 for d in (*a_dims, *b_dims, *rest))]
    rows = math.prod(shape[d] for d in a_dims)
    cols = math.prod(shape[d] for d in b_dims)
    mat = w.permute(*perm).reshape(w.shape[0], rows, cols)
    rho = [(_flat_over(t.slots, a_dims, shape), t.sign) for t in a_terms]
    gamma = [(_flat_over(t.slots, b_dims, shape), t.sign) for t in b_terms]
    key = (rows, cols, tuple(s for _, s in rho), tuple(s for _, s in gamma))
    return key, mat, rho, gamma


def _stacked(group: list[tuple]) -> tuple[Tensor, StackedTerms, StackedTerms]:
    """Equally shaped ``(M, rho, gamma)`` stacked: ``M`` ``[G, R, a, b]``, slots ``[G, a]``."""
    mats = torch.stack([m for m, _, _ in group])
    rho = [(torch.stack([g[1][k][0] for g in group]), group[0][1][k][1])
           for k in range(len(group[0][1]))]  # fmt: skip
    gamma = [(torch.stack([g[2][k][0] for g in group]), group[0][2][k][1])
             for k in range(len(group[0][2]))]  # fmt: skip
    return mats, rho, gamma


def _flat_over(slots: Tensor, dims: list[int], shape: tuple[int, ...]) -> Tensor:
    """A term's slots over the given dims of ``shape`` (it varies along no other), flattened in
    the order of ``dims``."""
    target = [shape[d] if d in dims else 1 for d in range(len(shape))]
    others = [d for d in range(len(shape)) if d not in dims]
    return slots.expand(target).permute([*dims, *others]).reshape(-1)


def _two_groups(param: PlannedParam) -> tuple | None:
    """The terms of a parameter split into two non-empty groups that vary along disjoint dims
    (``((dims_a, terms_a), (dims_b, terms_b))``), or ``None``."""
    varying = [{d for d, k in enumerate(t.slots.shape) if k > 1} for t in param.terms]
    if len(param.terms) < 2 or any(not v for v in varying):
        return None
    a_dims, a_terms = set(varying[0]), [0]
    changed = True
    while changed:
        changed = False
        for i, v in enumerate(varying):
            if i not in a_terms and v & a_dims:
                a_dims |= v
                a_terms.append(i)
                changed = True
    b_terms = [i for i in range(len(param.terms)) if i not in a_terms]
    if not b_terms:
        return None
    b_dims = set().union(*(varying[i] for i in b_terms))
    return (
        (sorted(a_dims), [param.terms[i] for i in sorted(a_terms)]),
        (sorted(b_dims), [param.terms[i] for i in b_terms]),
    )


def _group_exp(hx: Tensor, terms: StackedTerms) -> Tensor:
    """``exp(2 sum_t sign_t h[slots_t])`` for a group of stacked terms: ``[G, R, a]``."""
    x = sum(sign * hx[:, slots].permute(1, 0, 2) for slots, sign in terms)
    return torch.exp(2 * x)


def _scatter_group_(
    positive: Tensor, negative: Tensor, terms: StackedTerms, values: Tensor
) -> None:
    """``positive[:, slots] += values`` for every term of sign +1 of a group of stacked terms,
    ``negative`` for sign -1 (``values``: ``[G, R, a]``; the sums ``[R, N + 1]``)."""
    v = values.permute(1, 0, 2)
    for slots, sign in terms:
        scatter_add_(positive if sign > 0 else negative, slots, v)


def _bmv(mat: Tensor, v: Tensor) -> Tensor:
    """``[G, R, a, b] @ [G, R, b] -> [G, R, a]``."""
    g, r, a, b = mat.shape
    return torch.bmm(mat.reshape(g * r, a, b), v.reshape(g * r, b, 1)).view(g, r, a)


def _bmv_t(mat: Tensor, v: Tensor) -> Tensor:
    """``[G, R, a, b]^T @ [G, R, a] -> [G, R, b]``, as row vectors times the matrices (a
    ``bmm`` of the transposed matrices is several times slower)."""
    g, r, a, b = mat.shape
    return torch.bmm(v.reshape(g * r, 1, a), mat.reshape(g * r, a, b)).view(g, r, b)


class MassState:
    """:class:`Masses` evaluated at gauges ``h`` (``[R, N]``): ``total`` (``F``, ``[R]``), and
    after :meth:`complete` (or ``sums=True``) ``s_in`` and ``s_out`` (``[R, N]``), and
    :meth:`gram_matvec`."""

    def __init__(self, masses: Masses, h: Tensor, sums: bool) -> None:
        self.masses = masses
        self.h = h
        hx = masses._extended(h)
        self.hx = hx
        self.row_exp = [_group_exp(hx, rho) for _, rho, _ in masses.stacks]
        self.col_exp = [_group_exp(hx, gamma) for _, _, gamma in masses.stacks]
        self.row_sums = [
            e * _bmv(mat, f)
            for (mat, _, _), e, f in zip(masses.stacks, self.row_exp, self.col_exp, strict=True)
        ]
        self.col_sums: list[Tensor] | None = None
        self.u = masses.flat_w * torch.exp(2 * masses._flat_exponent(hx))
        parts = [x.sum(-1).sum(0) for x in self.row_sums] + [self.u.sum(-1)]
        (self.total,) = masses.sum_over_shards(torch.stack(parts).sum(0))
        self.s_in = self.s_out = None
        if sums:
            self.complete()

    def complete(self) -> MassState:
        """Compute ``(S_in, S_out)`` (one more read of each matrix)."""
        if self.s_in is not None:
            return self
        m = self.masses
        self.col_sums = [
            f * _bmv_t(mat, e)
            for (mat, _, _), e, f in zip(m.stacks, self.row_exp, self.col_exp, strict=True)
        ]
        s_in = torch.zeros(m.r, m.n + 1, dtype=torch.float64, device=m.device)
        s_out = torch.zeros_like(s_in)
        for (_, rho, gamma), rs, cs in zip(m.stacks, self.row_sums, self.col_sums, strict=True):
            _scatter_group_(s_in, s_out, rho, rs)
            _scatter_group_(s_in, s_out, gamma, cs)
        if m.flat_slots.numel():
            positive = m.flat_signs > 0
            scatter_add_(s_in, m.flat_slots, self.u[:, None, :] * positive)
            scatter_add_(s_out, m.flat_slots, self.u[:, None, :] * ~positive)
        s_in, s_out = m.sum_over_shards(s_in, s_out)
        self.s_in, self.s_out = s_in[:, : m.n], s_out[:, : m.n]
        return self

    def gram_matvec(self, v: Tensor) -> Tensor:
        """``K v`` at this gauge for ``v`` ``[R, N]`` (after :meth:`complete`)."""
        m = self.masses
        assert self.col_sums is not None
        vx = torch.cat([v, v.new_zeros(m.r, 1)], dim=1)
        out = torch.zeros(m.r, m.n + 1, dtype=torch.float64, device=m.device)
        negative = torch.zeros_like(out)
        for (mat, rho, gamma), e, f, rs, cs in zip(
            m.stacks, self.row_exp, self.col_exp, self.row_sums, self.col_sums, strict=True
        ):
            alpha = sum(sign * vx[:, slots].permute(1, 0, 2) for slots, sign in rho)
            beta = sum(sign * vx[:, slots].permute(1, 0, 2) for slots, sign in gamma)
            _scatter_group_(out, negative, rho, alpha * rs + e * _bmv(mat, f * beta))
            _scatter_group_(out, negative, gamma, beta * cs + f * _bmv_t(mat, e * alpha))
        out -= negative
        if m.flat_slots.numel():
            a = (vx[:, m.flat_slots] * m.flat_signs).sum(1)
            scatter_add_(out, m.flat_slots, (self.u * a)[:, None, :] * m.flat_signs)
        return m.sum_over_shards(out)[0][:, : m.n]
