"""The imbalance (moment map) ``mu``, its statistics, and the squared masses behind the Gram
matrix ``K`` of the generators.

Generator ``n`` acts on entry ``e`` with weight ``w_n(e)`` in ``{-1, 0, 1}``. Its incoming mass
is ``S_in,n = sum_{w_n(e) = 1} theta_e^2``, its outgoing mass ``S_out,n = sum_{w_n(e) = -1}
theta_e^2``; the imbalance is ``mu_n = S_in,n - S_out,n = sum_e w_n(e) theta_e^2`` and
``K_nn = S_n = S_in,n + S_out,n``. The sums come from :func:`gaugefix.kernels.generator_sums` (a
fixed handful of operations per kind of layer), and every function accepts stacks of several
copies of a model (``batch_dims`` leading dims, as the sweep engine trains them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gaugefix.distributed import local_view, sharded
from gaugefix.kernels import generator_sums, reduce_to, trailing_sum_of_squares
from gaugefix.structure import GaugeStructure, PlannedParam


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_shape(param: PlannedParam) -> tuple[int, ...]:
    """The broadcast shape of a parameter's term maps: entries that agree on every map (a conv
    kernel's taps) share every factor, so their squares can be summed first."""
    shape = [1] * len(param.shape)
    for term in param.terms:
        shape = [max(a, b) for a, b in zip(shape, term.slots.shape, strict=True)]
    return tuple(shape)


def scatter_terms(
    acc_in: Tensor, acc_out: Tensor, param: PlannedParam, values: Tensor, batch: tuple[int, ...]
) -> None:
    """``acc[..., n] += values`` summed over the entries each term names ``n`` at: into
    ``acc_in`` for terms of sign +1, ``acc_out`` for sign -1. ``values``: ``[*batch, *shape]``
    with ``shape`` broadcast-compatible with every term; ``acc_*``: ``[*batch, N + 1]``."""
    for term in param.terms:
        v = reduce_to(values, (*batch, *term.slots.shape)).reshape(*batch, -1)
        (acc_in if term.sign > 0 else acc_out).index_add_(-1, term.slots.reshape(-1), v)


def in_out_sums(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> tuple[Tensor, Tensor]:
    """``(S_in, S_out)``, each ``[num_generators]``: the squared masses every generator
    multiplies and divides in ``source`` (a model, or name -> tensor)."""
    tensors = structure.bind(source)
    first = next(iter(tensors.values()), None)
    dtype = accumulation_dtype(first.dtype) if first is not None else torch.float64
    s_in, s_out, _ = generator_sums(tensors, structure, dtype)
    n = structure.num_generators
    return s_in[:n], s_out[:n]


def imbalance(source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure) -> Tensor:
    """The imbalance ``mu``, shape ``[num_generators]``: ``mu_n = sum_e w_n(e) theta_e^2``.

    ``source`` is a model or a mapping from parameter names to tensors (so ``imbalance(grads, s)``
    is ``mu(g)``). Accumulated in float64 for float64 tensors and in float32 otherwise.
    Differentiable when the tensors require grad. For FSDP2-sharded (``DTensor``) tensors every
    process returns the whole ``mu``: its slices' sums, completed by one all-reduce (not
    differentiable then).
    """
    params = structure.bind(source, sharded=True)
    if not sharded(params.values()):
        s_in, s_out = in_out_sums(params, structure)
        return s_in - s_out
    with torch.no_grad():  # the all-reduce completing the sums is not differentiable
        s_in, s_out = in_out_sums(*local_view(params, structure))
    return s_in - s_out


STAT_NAMES = (
    "mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "mu_norm", "norm_sq",
    "dead_generators", "nonfinite_generators",
)  # fmt: skip


def stats_from_sums(s_in: Tensor, s_out: Tensor, norm_sq: Tensor) -> Tensor:
    """The statistics of :func:`imbalance_stats`, in the order of :data:`STAT_NAMES`, from
    ``S_in``, ``S_out`` (``[*batch, N]``) and ``||theta||^2`` (``[*batch]``): ``[*batch, 8]``.
    A generator with a non-finite sum makes the ratio statistics non-finite (never healthy)."""
    mu, s = s_in - s_out, s_in + s_out
    bad = ~torch.isfinite(s)
    rel = torch.where((s > 0) | bad, mu.abs() / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
    alive = (s_in > 0) & (s_out > 0)
    log_ratio = torch.where(alive | bad, 0.5 * torch.log(s_in / s_out).abs(), 0.0)
    n_rel = ((s > 0) | bad).sum(-1).clamp_min(1)
    n_alive = (alive | bad).sum(-1).clamp_min(1)
    empty = s.shape[-1] == 0
    return torch.stack(
        [
            (rel.square().sum(-1) / n_rel).sqrt(),
            norm_sq.new_zeros(norm_sq.shape) if empty else rel.amax(-1),
            (log_ratio.square().sum(-1) / n_alive).sqrt(),
            norm_sq.new_zeros(norm_sq.shape) if empty else log_ratio.amax(-1),
            torch.linalg.vector_norm(mu, dim=-1),
            norm_sq,
            (~alive & ~bad).sum(-1).to(s.dtype),
            bad.sum(-1).to(s.dtype),
        ],
        dim=-1,
    )


@torch.no_grad()
def imbalance_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> dict[str, float]:
    """Cheap imbalance statistics for logging, as Python floats.

    With ``mu = S_in - S_out`` and ``S = S_in + S_out`` (:func:`in_out_sums`):

    - ``mu_rel_rms``, ``mu_rel_max``: RMS and maximum of ``|mu_n| / S_n`` over the generators
      with ``S_n > 0`` (0 for a balanced one, 1 for one whose incoming or outgoing side is zero);
    - ``log_ratio_rms``, ``log_ratio_max``: RMS and maximum of ``|0.5 log(S_in,n / S_out,n)|``
      (the gauge distance to the generator's local balance, up to a factor 2) over the
      generators with both sides non-zero;
    - ``mu_norm``: ``||mu||_2``; ``norm_sq``: ``||theta||^2`` over the parameters the structure
      acts on; ``dead_generators``: how many have an empty (all-zero) side;
    ``nonfinite_generators``: how many have a NaN or infinite entry (the four ratio statistics
    are then NaN or infinite, so a diverged model never looks healthy).

    A fixed handful of vectorised operations, whatever the depth, and a single
    device-to-host transfer (one batched ``.tolist()``).
    """
    params = structure.bind(source, sharded=True)
    if not params:
        return dict.fromkeys(STAT_NAMES, 0.0)
    params, structure = local_view(params, structure)  # this process's slices under FSDP2
    dtype = accumulation_dtype(next(iter(params.values())).dtype)
    s_in, s_out, norm_sq = generator_sums(params, structure, dtype)
    n = structure.num_generators
    values = stats_from_sums(s_in[:n], s_out[:n], norm_sq)
    return dict(zip(STAT_NAMES, values.tolist(), strict=True))


# -- squared masses at a gauge: F(h), mu(h) and K(h) v without touching the parameters -----------


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
    taken relative to a base gauge that is moved (the masses rescaled) when it drifts far, so
    that the exponentials never overflow.
    """

    REBASE = 30.0  # |h - base| beyond which the masses are rescaled to the new base

    def __init__(self, tensors: Mapping[str, Tensor], structure: GaugeStructure) -> None:
        """``tensors``: name -> ``[R, *shape]`` for the structure's parameters (or some of
        them: the masses of that part of the model)."""
        first = next(iter(tensors.values()))
        self.n = n = structure.num_generators
        self.sum_over_shards = structure.sum_over_shards
        self.device = first.device
        self.r = r = first.shape[0]
        by_shape: dict[tuple, list[tuple]] = {}
        flat: list[tuple[Tensor, list[Tensor], list[int]]] = []
        for param in structure.plan(self.device):
            if param.name not in tensors:  # masses of a part of the model
                continue
            t = tensors[param.name].detach()
            shape = pair_shape(param)
            sq = trailing_sum_of_squares(t, (r, *shape), torch.float64)
            if sq is None:
                sq = t.square() if t.dtype == torch.float64 else t.to(torch.float64).square_()
            w = reduce_to(sq, (r, *shape))
            split = _two_groups(param)
            if split is not None:
                (a_dims, a_terms), (b_dims, b_terms) = split
                rest = [d for d in range(len(shape)) if d not in a_dims and d not in b_dims]
                perm = [0, *(d + 1 for d in (*a_dims, *b_dims, *rest))]
                rows = math.prod(shape[d] for d in a_dims)
                cols = math.prod(shape[d] for d in b_dims)
                mat = w.permute(*perm).reshape(r, rows, cols)
                rho = [(_flat_over(t.slots, a_dims, shape), t.sign) for t in a_terms]
                gamma = [(_flat_over(t.slots, b_dims, shape), t.sign) for t in b_terms]
                key = (rows, cols, tuple(s for _, s in rho), tuple(s for _, s in gamma))
                by_shape.setdefault(key, []).append((mat, rho, gamma))
                continue
            slots = [t.slots.expand(shape).reshape(-1) for t in param.terms]
            flat.append((w.reshape(r, -1), slots, [t.sign for t in param.terms]))
        # Stacks of equally shaped matrices: mat [G, R, a, b], per term slots [G, a] / [G, b].
        self.stacks = []
        for group in by_shape.values():
            mats = torch.stack([m for m, _, _ in group])
            rho = [(torch.stack([g[1][k][0] for g in group]), group[0][1][k][1])
                   for k in range(len(group[0][1]))]  # fmt: skip
            gamma = [(torch.stack([g[2][k][0] for g in group]), group[0][2][k][1])
                     for k in range(len(group[0][2]))]  # fmt: skip
            self.stacks.append((mats, rho, gamma))
        terms = max((len(s) for _, s, _ in flat), default=0)
        if flat:
            self.flat_w = torch.cat([w for w, _, _ in flat], dim=1)
            # [T, P] slots and signs, shorter term lists padded with the dummy slot
            self.flat_slots = torch.stack(
                [
                    torch.cat(
                        [s[k] if k < len(s) else torch.full_like(s[0], n) for _, s, _ in flat]
                    )  # fmt: skip
                    for k in range(terms)
                ]
            )
            self.flat_signs = torch.stack(
                [
                    torch.cat(
                        [
                            torch.full_like(s[0], sg[k] if k < len(s) else 1, dtype=torch.float64)
                            for _, s, sg in flat
                        ]
                    )
                    for k in range(terms)
                ]
            )
        else:
            self.flat_w = torch.zeros(r, 0, dtype=torch.float64, device=self.device)
            self.flat_slots = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            self.flat_signs = torch.zeros(0, 0, dtype=torch.float64, device=self.device)
        self.base = torch.zeros(r, n, dtype=torch.float64, device=self.device)

    def _extended(self, h: Tensor) -> Tensor:
        """``h - base`` with the dummy slot's 0 appended: ``[R, N + 1]``."""
        return torch.cat([h - self.base, h.new_zeros(self.r, 1)], dim=1)

    def rebase(self, h: Tensor) -> None:
        """Rescale the stored masses to the base gauge ``h`` when ``h`` is far from the base."""
        if self.n == 0 or float((h - self.base).abs().max()) <= self.REBASE:
            return
        hx = self._extended(h)
        self.stacks = [
            (mat * _group_exp(hx, rho)[:, :, :, None] * _group_exp(hx, gamma)[:, :, None, :],
             rho, gamma)
            for mat, rho, gamma in self.stacks
        ]  # fmt: skip
        self.flat_w = self.flat_w * torch.exp(2 * self._flat_exponent(hx))
        self.base = h.clone()

    def _flat_exponent(self, hx: Tensor) -> Tensor:
        """``sum_t sign_t h[slot_t]`` for every flat mass: ``[R, P]``."""
        if not self.flat_slots.numel():
            return self.flat_w.new_zeros(self.flat_w.shape)
        return (hx[:, self.flat_slots] * self.flat_signs).sum(1)

    def at(self, h: Tensor, sums: bool = True) -> MassState:
        """The masses at gauge ``h`` (``[R, N]``): ``F`` always, ``(S_in, S_out)`` when
        ``sums``."""
        return MassState(self, h, sums)


def _flat_over(slots: Tensor, dims: list[int], shape: tuple[int, ...]) -> Tensor:
    """A term's slots over the given dims of ``shape`` (it varies along no other), flattened in
    the order of ``dims``."""
    target = [shape[d] if d in dims else 1 for d in range(len(shape))]
    others = [d for d in range(len(shape)) if d not in dims]
    return slots.expand(target).permute(*dims, *others).reshape(-1)


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


def _group_exp(hx: Tensor, terms: list[tuple[Tensor, int]]) -> Tensor:
    """``exp(2 sum_t sign_t h[slots_t])`` for a group of stacked terms: ``[G, R, a]``."""
    x = sum(sign * hx[:, slots].permute(1, 0, 2) for slots, sign in terms)
    return torch.exp(2 * x)


def _group_scatter(out: Tensor, terms: list[tuple[Tensor, int]], values: Tensor) -> None:
    """``out[:, slots] += sign * values`` for every term of a group (``values``: ``[G, R, a]``)."""
    for slots, sign in terms:
        v = values.permute(1, 0, 2).reshape(values.shape[1], -1)
        out.index_add_(1, slots.reshape(-1), v * sign)


def _bmv(mat: Tensor, v: Tensor) -> Tensor:
    """``[G, R, a, b] @ [G, R, b] -> [G, R, a]``."""
    g, r, a, b = mat.shape
    return torch.bmm(mat.reshape(g * r, a, b), v.reshape(g * r, b, 1)).view(g, r, a)


def _bmv_t(mat: Tensor, v: Tensor) -> Tensor:
    """``[G, R, a, b]^T @ [G, R, a] -> [G, R, b]`` (one matrix at a time: a transposed
    ``bmm`` is slower than the loop)."""
    g, r, a, b = mat.shape
    flat, vv = mat.reshape(g * r, a, b), v.reshape(g * r, a)
    return torch.stack([m.T @ x for m, x in zip(flat, vv, strict=True)]).view(g, r, b)


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
            for terms, values in ((rho, rs), (gamma, cs)):
                for slots, sign in terms:
                    v = values.permute(1, 0, 2).reshape(m.r, -1)
                    (s_in if sign > 0 else s_out).index_add_(1, slots.reshape(-1), v)
        for k in range(m.flat_slots.shape[0]):
            positive = m.flat_signs[k] > 0
            s_in.index_add_(1, m.flat_slots[k], self.u * positive)
            s_out.index_add_(1, m.flat_slots[k], self.u * ~positive)
        s_in, s_out = m.sum_over_shards(s_in, s_out)
        self.s_in, self.s_out = s_in[:, : m.n], s_out[:, : m.n]
        return self

    def gram_matvec(self, v: Tensor) -> Tensor:
        """``K v`` at this gauge for ``v`` ``[R, N]`` (after :meth:`complete`)."""
        m = self.masses
        assert self.col_sums is not None
        vx = torch.cat([v, v.new_zeros(m.r, 1)], dim=1)
        out = torch.zeros(m.r, m.n + 1, dtype=torch.float64, device=m.device)
        for (mat, rho, gamma), e, f, rs, cs in zip(
            m.stacks, self.row_exp, self.col_exp, self.row_sums, self.col_sums, strict=True
        ):
            alpha = sum(sign * vx[:, slots].permute(1, 0, 2) for slots, sign in rho)
            beta = sum(sign * vx[:, slots].permute(1, 0, 2) for slots, sign in gamma)
            to_rows = alpha * rs + e * _bmv(mat, f * beta)
            to_cols = beta * cs + f * _bmv_t(mat, e * alpha)
            _group_scatter(out, rho, to_rows)
            _group_scatter(out, gamma, to_cols)
        if m.flat_slots.numel():
            a = (vx[:, m.flat_slots] * m.flat_signs).sum(1)
            t = self.u * a
            for k in range(m.flat_slots.shape[0]):
                out.index_add_(1, m.flat_slots[k], t * m.flat_signs[k])
        return m.sum_over_shards(out)[0][:, : m.n]
