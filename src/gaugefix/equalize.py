"""Orbit selection by objective: :func:`equalize_` moves a model along its gauge orbit (the
function unchanged) to the point that minimises a chosen objective.

Under ``h`` (one log-scale per generator) entry ``e`` becomes ``theta_e(h) = exp(sum_n w_n(e)
h_n) theta_e``. The objectives:

- ``"norm"``: ``||theta(h)||^2``, minimised by :func:`gaugefix.balance_` (``mu = 0``).
- ``"range"``: for every generator ``n``, the largest ``|entry|`` it multiplies equals the
  largest ``|entry|`` it divides, over the counted weights: ``R_in,n(h) = R_out,n(h)``. This is
  the ``p -> infinity`` limit of the stationarity of ``sum_e |theta_e(h)|^p``, and on a chain of
  two layers Nagel et al.'s cross-layer equalization, ``r1_i / s_i = r2_i s_i``. A norm's gain
  counts as the layer producing its channels (``W1 = diag(gain)``); biases are not counted.
- ``"activation"``: for every generator that scales a channel ``j`` of an input that a linear
  map reads, ``alpha log A_n(h) = (1 - alpha) log B_n(h)`` with ``A`` the largest ``|x_j|`` over
  a calibration batch and ``B`` the largest ``|entry|`` of the readers' columns (and of the
  other weights reading the channel, fused experts: :func:`_absorbing`): SmoothQuant's
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``h_j = -log s_j``. The other generators
  (query-key pairs: no linear map reads their channels) are balanced as ``"range"`` does.
- a callable ``J(params) -> scalar``: minimised over ``h`` through the differentiable rescaled
  parameters (:mod:`gaugefix.minimize`); :func:`gaugefix.sharpness_objective` is one.

``range`` and ``activation`` are max-balances ``delta_n = (1 - alpha) log R_out,n - alpha log
R_in,n = 0`` (``alpha = 1/2`` for ``range``), solved by the same method
(:func:`solve_max_balance`): Newton steps on the balances, which are linear in ``h`` while each
side's maximum stays on the entry attaining it (a sparse system over the generators); where
that system is singular, every live generator moves at once by its own ``delta_n`` (exact in
one step for generators that share no counted entry: the two-layer chain, a norm feeding one
linear), divided by the most generators one counted entry carries when that does not lower the
residual. Where generators share counted entries the max-balances can form a set; ``range``
then starts the solve from the unique minimiser of the strictly convex
``J_p(h) = sum_e |theta_e(h)|^p`` (``p = RANGE_P``), whose stationarity (equal incoming and
outgoing ``p``-masses) tends to the max-balance as ``p -> infinity``: the tie-break, so that
every point of an orbit equalizes to the same parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from gaugefix.action import Optimizers, check_finite_params, check_transport, move_
from gaugefix.balancing import (
    balance_,
    check_tolerances,
    closed_orbits,
    masses_of,
    open_generators,
    solve_balance,
)
from gaugefix.calibration import _calibrated, _warn_uncalibrated
from gaugefix.distributed import refuse_gathered
from gaugefix.masses import Masses, _flat_over, _rows, _two_groups
from gaugefix.minimize import Objective, minimize_objective
from gaugefix.moment import pair_shape
from gaugefix.soft import FROZEN_REASON
from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import PlannedParam, PlannedTerm

__all__ = [
    "OBJECTIVES",
    "DEFAULT_ALPHA",
    "RANGE_P",
    "RESIDUAL_ROUNDING",
    "EqualizeResult",
    "RangeSource",
    "log_abs",
    "Sides",
    "side_ranges",
    "damping",
    "Step",
    "balance_step",
    "newton_step",
    "Solved",
    "solve_max_balance",
    "p_balance",
    "range_balance",
    "range_sources",
    "Reader",
    "readers",
    "activation_balance",
    "objective_name",
    "counted_weights",
    "unfrozen",
    "closed_generators",
    "equalize_",
]

OBJECTIVES = ("range", "activation", "norm")
DEFAULT_ALPHA = 0.5  # "activation"'s exponent: SmoothQuant's default migration strength
RANGE_P = 4  # the p-balance that picks range's point where max-balances are not unique
# The rounding of a max-balance residual, relative to the largest magnitude it is summed from: a
# step lowering it by less is not progress.
RESIDUAL_ROUNDING = 64 * torch.finfo(torch.float64).eps
OPEN_REASON = "no closed orbit (dead, or in an open group)"


@dataclass(frozen=True)
class EqualizeResult:
    """What :func:`equalize_` did.

    ``objective``: its name (``"callable"`` for a user's); ``objective_before`` /
    ``objective_after``: for ``"norm"`` ``||theta||^2``, for ``"range"`` and ``"activation"``
    the largest balance residual ``max_n |delta_n|`` over the generators not held (0 at the
    solution; what ``tol`` bounds),
    for a callable its value; ``iterations``; ``h`` (``[num_generators]``, float64): the gauge
    applied (0 on generators left out); ``dead_generators``: the generators the objective does
    not see on both sides, those in an open group (of its own terms; of the norm's for a
    callable), and those touching a frozen parameter, left at ``h = 0``; ``converged``;
    ``uncalibrated``: for ``"activation"``, every counted weight whose channels it balanced as
    ``"range"`` does for want of calibration ranges: read in a way the pass cannot follow (a
    view, a copy or a computed tensor it cannot map to their dims, a batched wrapper under
    ``vmap``, an ``einsum`` over several of their dims), or a matrix of which it sees no read
    while a generator dividing its columns gets ranges from no other read.
    The norm is over every parameter the structure acts on, frozen ones included (unchanged);
    a residual is over no generator, 0, when every generator is held (:attr:`movable` 0).
    """

    objective: str
    objective_before: float
    objective_after: float
    iterations: int
    h: Tensor
    dead_generators: Tensor
    converged: bool
    uncalibrated: tuple[str, ...] = ()

    @property
    def movable(self) -> int:
        """How many generators the objective could move (those not in ``dead_generators``):
        0 when nothing was movable."""
        return len(self.h) - len(self.dead_generators)


class RangeSource(NamedTuple):
    """Magnitudes whose maxima an objective balances: ``log_magnitude`` (float64, broadcastable
    with every term's slots), the entry's log-factor ``sum sign * h[slots]`` over ``exponent``,
    and the ``counted`` terms: the maximum over the entries each names lands on its generator's
    incoming side (sign ``+1``) or outgoing side (sign ``-1``)."""

    log_magnitude: Tensor
    exponent: tuple[PlannedTerm, ...]
    counted: tuple[PlannedTerm, ...]


# -- the max-balances: range and activation --------------------------------------------------------


def _amax_to(values: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The maximum of ``values`` over the dims where ``shape`` has size 1 (kept)."""
    dims = [d for d, s in enumerate(shape) if s == 1 and values.shape[d] > 1]
    return values.amax(dims, keepdim=True) if dims else values


def log_abs(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``log max |t|`` (float64) over the entries that agree on every term map (``shape``: the
    broadcast shape of the maps; a conv kernel's taps are reduced first)."""
    return _amax_to(t.detach().abs(), shape).to(torch.float64).log()


class Sides(NamedTuple):
    """Per generator (``[N]``, float64): the log of the largest magnitude it multiplies
    (``log_in``) and divides (``log_out``) among the counted entries (``-inf``: none); and, at
    one entry attaining each, every generator on it (``in_slots`` / ``out_slots``, ``[N, K]``;
    ``N``: none) with its weight ``w_m(e)`` there (``in_signs`` / ``out_signs``)."""

    log_in: Tensor
    log_out: Tensor
    in_slots: Tensor
    in_signs: Tensor
    out_slots: Tensor
    out_signs: Tensor


def _exponent(source: RangeSource, hx: Tensor) -> Tensor:
    """``log |theta_e(h)|`` of a source's entries (``hx``: ``h`` and the dummy slot's 0); the
    source's ``log_magnitude`` has its terms' broadcast shape, so one buffer holds the sum."""
    shifts = [term.sign * hx[term.slots] for term in source.exponent]
    if not shifts:
        return source.log_magnitude
    e = source.log_magnitude + shifts[0]
    for shift in shifts[1:]:
        e.add_(shift)
    return e


def _maxima(
    source: RangeSource, e: Tensor, term: PlannedTerm, n: int, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per group of entries that ``term`` maps to one slot (flat, ``[G]``): the largest ``e``
    and the slot; and every exponent term's slot and sign at the entry attaining it (``[G,
    k]``, padded with the dummy slot ``n`` and sign 0)."""
    shape = torch.broadcast_shapes(e.shape, term.slots.shape)
    reduced = [d for d, s in enumerate(term.slots.shape) if s == 1 and shape[d] > 1]
    kept = [d for d in range(len(shape)) if d not in reduced]
    if len(reduced) == 1:  # along one dim: no copy
        values, at = e.expand(shape).max(reduced[0])
    else:
        full = e.expand(shape).permute(kept + reduced)
        values, at = full.reshape(*full.shape[: len(kept)], -1).max(-1)
    where = [at] * len(shape)  # the attaining entry's index along every dim
    for i, d in enumerate(kept):
        where[d] = torch.arange(shape[d], device=e.device).view(
            [shape[d] if j == i else 1 for j in range(len(kept))]
        )
    for d in reversed(reduced):
        where[d], at = at % shape[d], at // shape[d]
    at_entry = [t.slots.expand(shape)[tuple(where)].reshape(-1) for t in (term, *source.exponent)]
    slots = torch.stack(at_entry[1:], 1)
    signs = torch.tensor([t.sign for t in source.exponent], device=e.device)
    pad = k - slots.shape[1]
    return (
        values.reshape(-1),
        at_entry[0],
        torch.nn.functional.pad(slots, (0, pad), value=n),
        torch.nn.functional.pad(signs, (0, pad)).expand(slots.shape[0], k),
    )


def _winners(groups: list[tuple[Tensor, ...]], n: int, k: int, device: Any) -> tuple[Tensor, ...]:
    """One side of :class:`Sides` from the groups' maxima (:func:`_maxima`): per generator the
    largest value of its groups, and the terms at the first group attaining it."""
    log = torch.full((n + 1,), -math.inf, dtype=torch.float64, device=device)
    slots = torch.full((n + 1, k), n, dtype=torch.long, device=device)
    signs = torch.zeros((n + 1, k), dtype=torch.long, device=device)
    if groups:
        values, own, at_slots, at_signs = (torch.cat(x) for x in zip(*groups, strict=True))
        log.scatter_reduce_(0, own, values, "amax")
        count = values.numel()
        attaining = torch.where(values == log[own], torch.arange(count, device=device), count)
        first = torch.full((n + 1,), count, device=device).scatter_reduce_(
            0, own, attaining, "amin"
        )
        found = first < count
        slots[found], signs[found] = at_slots[first[found]], at_signs[first[found]]
    return log[:n], slots[:n], signs[:n]


def side_ranges(sources: list[RangeSource], h: Tensor) -> Sides:
    """The :class:`Sides` of the sources' counted entries at ``h`` (``[N]``)."""
    n = h.shape[0]
    k = max([1, *(len(s.exponent) for s in sources)])
    hx = torch.cat([h, h.new_zeros(1)])
    groups: dict[bool, list[tuple[Tensor, ...]]] = {True: [], False: []}
    for source in sources:
        e = _exponent(source, hx)
        for term in source.counted:
            groups[term.sign > 0].append(_maxima(source, e, term, n, k))
    log_in, in_slots, in_signs = _winners(groups[True], n, k, h.device)
    log_out, out_slots, out_signs = _winners(groups[False], n, k, h.device)
    return Sides(log_in, log_out, in_slots, in_signs, out_slots, out_signs)


def damping(sources: list[RangeSource], live: Tensor) -> int:
    """The most live generators one source entry carries (at least 1): the step divisor that
    keeps the parallel update from overshooting where generators share entries."""
    named = torch.cat([live, live.new_zeros(1)])
    counts = [sum(bool(named[t.slots].any()) for t in s.exponent) for s in sources]
    return max([1, *counts])


class Step(NamedTuple):
    """The state of a max-balance at ``h``: every live generator's closed-form balance
    ``delta_n = (1 - alpha_n) log R_out,n - alpha_n log R_in,n`` (0 on the others), the residual
    ``max |delta_n|``, which generators are live (both sides non-empty: the same at every
    ``h``), ``alpha`` per generator, the :class:`Sides`, and ``rounding``: a bound on the
    rounding of the residual, :data:`RESIDUAL_ROUNDING` times the largest magnitude its terms
    are summed from (``1 + max |log R| + k max |h|``, ``k`` the most terms of a source)."""

    delta: Tensor
    residual: float
    live: Tensor
    alpha: Tensor
    sides: Sides
    rounding: float


def balance_step(sources: list[RangeSource], h: Tensor, alpha: float | Tensor) -> Step:
    """The :class:`Step` at ``h``."""
    sides = side_ranges(sources, h)
    a = torch.as_tensor(alpha, dtype=torch.float64, device=h.device).expand(h.shape)
    live = torch.isfinite(sides.log_in) & torch.isfinite(sides.log_out)
    delta = torch.where(live, (1 - a) * sides.log_out - a * sides.log_in, 0.0)
    if not h.numel():
        return Step(delta, 0.0, live, a, sides, 0.0)
    logs = torch.where(live, torch.maximum(sides.log_in.abs(), sides.log_out.abs()), 0.0)
    terms = max([1, *(len(s.exponent) for s in sources)])
    residual, size, shift = torch.stack([delta.abs().max(), logs.max(), h.abs().max()]).tolist()
    return Step(delta, residual, live, a, sides, RESIDUAL_ROUNDING * (1 + size + terms * shift))


def _lowers(trial: Step, at: Step) -> bool:
    """Whether ``trial``'s residual is below ``at``'s by more than either's rounding."""
    return trial.residual < at.residual - max(at.rounding, trial.rounding)


def newton_step(at: Step) -> Tensor | None:
    """The step that zeroes every live ``delta_n`` if each side's maximum stays on the entry
    attaining it now, where ``delta`` is linear in ``h``: ``d delta_n / d h_m = (1 - alpha_n)
    w_m(e_out,n) - alpha_n w_m(e_in,n)`` (diagonal ``-1``; the other generators on those two
    entries off it), a sparse system solved exactly; ``None`` where it is singular."""
    n, live = at.delta.shape[0], at.live.cpu()
    if not bool(live.any()):
        return None
    s, a = at.sides, at.alpha.cpu()
    k = s.in_slots.shape[1]
    rows = torch.arange(n).repeat_interleave(k).repeat(2)
    cols = torch.cat([s.in_slots.cpu().reshape(-1), s.out_slots.cpu().reshape(-1)])
    coef = torch.cat([-a[:, None] * s.in_signs.cpu(), (1 - a)[:, None] * s.out_signs.cpu()])
    alive = torch.cat([live, live.new_zeros(1)])
    keep = alive[rows] & alive[cols] & (coef.reshape(-1) != 0)
    number = torch.cumsum(live, 0) - 1
    size = int(live.sum())
    jacobian = csr_matrix(
        (coef.reshape(-1)[keep].numpy(), (number[rows[keep]].numpy(), number[cols[keep]].numpy())),
        shape=(size, size),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a singular system: the caller falls back
        x = torch.from_numpy(np.atleast_1d(spsolve(jacobian, -at.delta.cpu()[live].numpy())))
    if not bool(torch.isfinite(x).all()):
        return None
    step = torch.zeros(n, dtype=torch.float64)
    step[live] = x
    return step.to(at.delta.device)


class Solved(NamedTuple):
    """A max-balance's gauge ``h`` (``[N]``, float64), iterations, residual before and after,
    live generators and convergence."""

    h: Tensor
    iterations: int
    before: float
    after: float
    live: Tensor
    converged: bool


@torch.no_grad()
def solve_max_balance(
    sources: list[RangeSource],
    start: Tensor,
    alpha: float | Tensor,
    tol: float,
    max_iter: int,
) -> Solved:
    """The gauge ``h``, from ``start``, where every live generator satisfies ``alpha log
    R_in,n(h) = (1 - alpha) log R_out,n(h)`` (``alpha``: one number, or one per generator).

    Each iteration tries :func:`newton_step` (the balances linearised at the entries attaining
    the maxima), then the parallel closed-form step ``h + delta`` (every generator to its own
    balance: exact when its counted entries carry no other generator), and takes the first
    that lowers the residual ``max |delta_n|`` by more than its rounding (``Step.rounding``: a
    step that only flips the sign of a shared ``delta``, as the gate and up generators of one
    gated unit do, must not be taken for progress); when neither does (generators sharing
    entries overshoot together), ``delta`` divided by :func:`damping`. Stops when the residual
    is at most ``tol``."""
    h = start
    at = balance_step(sources, h, alpha)
    first, iterations, divisor = at.residual, 0, 0
    while at.residual > tol and iterations < max_iter:
        iterations += 1
        for step in (newton_step(at), at.delta):
            trial = None if step is None else balance_step(sources, h + step, alpha)
            if trial is not None and _lowers(trial, at):
                h, at = h + step, trial
                break
        else:
            divisor = divisor or damping(sources, at.live)
            h = h + at.delta / divisor
            at = balance_step(sources, h, alpha)
    return Solved(h, iterations, first, at.residual, at.live, at.residual <= tol)


def p_balance(
    params: Mapping[str, Tensor], structure: GaugeStructure, counted: set[str], p: float,
    tol: float, max_iter: int, start: Tensor | None = None,
) -> tuple[Tensor, int, bool, Tensor]:  # fmt: skip
    """The minimiser ``h`` (``[N]``, float64) of ``J_p(h) = sum_e |theta_e(h)|^p`` over the
    counted weights, ``(h, iterations, converged, closed)``:
    :func:`gaugefix.balancing.solve_balance`'s Newton solve on the masses ``|theta_e / M|^(p/2)``
    (``M``: the largest counted ``|entry|``), whose squares are the ``p``-th powers, at
    ``h' = p h / 2``; ``closed`` (bool ``[N]``): the generators with a closed orbit of ``J_p``
    (0 in ``h`` elsewhere: :func:`gaugefix.balancing.closed_orbits`). With ``start`` (``[N]``)
    the masses are those of ``theta(start)`` and ``h`` is ``start`` plus the step: the same
    minimiser, whose ``p``-th powers underflow less from a start nearer it (an entry
    ``2^-255`` below ``M`` has a zero mass)."""
    powers = _powers(params, structure, counted, p, start)
    solution = solve_balance(Masses(powers, structure), tol, max_iter)
    converged = bool(solution.converged[0])
    h = solution.h[0] * (2 / p)
    return h if start is None else start + h, solution.iterations, converged, solution.live[0]


def _powers(
    params: Mapping[str, Tensor], structure: GaugeStructure, counted: set[str], p: float,
    start: Tensor | None,
) -> dict[str, Tensor]:  # fmt: skip
    """``|theta_e(start) / M|^(p/2)`` of the counted weights (float64, ``[1, *shape]``; ``M``:
    the largest; ``start`` ``None``: ``h = 0``)."""
    if start is None:
        top = max(float(params[name].detach().abs().max()) for name in counted)
        return {
            name: (params[name].detach().to(torch.float64).abs() / top).pow(p / 2).unsqueeze(0)
            for name in counted
        }
    hx = torch.cat([start, start.new_zeros(1)])
    logs = {
        q.name: sum(
            (t.sign * hx[t.slots] for t in q.terms),
            params[q.name].detach().to(torch.float64).abs().log(),
        )
        for q in structure.plan(start.device)
        if q.name in counted
    }
    top = max(float(t.max()) for t in logs.values())
    return {name: (t - top).mul(p / 2).exp().unsqueeze(0) for name, t in logs.items()}


def range_balance(
    params: Mapping[str, Tensor],
    structure: GaugeStructure,
    counted: set[str],
    tol: float,
    max_iter: int,
) -> Solved:
    """``"range"``: the max-balance with ``alpha = 1/2``. Where live generators share counted
    entries its solutions can form a set; the iteration then starts from the ``p``-balance at
    ``p = RANGE_P`` (:func:`p_balance`: unique, the minimiser of a strictly convex function),
    which picks the point (up to the iteration's stopping tolerance); the two share the
    ``max_iter`` iterations. Elsewhere the solution is unique and the iteration starts from
    ``h = 0``. Live generators without a closed orbit of the ``p``-balance (open groups: a
    combination of them shrinks every counted entry it touches, so the max-balances have no
    solution or a flat set of them there) are held at ``h = 0`` and not live; with at most one
    live generator per counted entry there are none. Where the ``p``-th powers underflow (an
    entry ``2^-255`` below the largest) and lose a generator that is in no open group of the
    counted zero pattern (:func:`_open_groups`), the max-balance runs from ``h = 0`` first and
    the ``p``-balance again from its point, where fewer powers underflow. The residual before
    is over the generators not held, as the one after."""
    sources = list(range_sources(params, structure, counted).values())
    h = torch.zeros(structure.num_generators, dtype=torch.float64, device=_device(params))
    at = balance_step(sources, h, 0.5)
    if damping(sources, at.live) == 1:
        return solve_max_balance(sources, h, 0.5, tol, max_iter)
    picked, newton, converged, closed = p_balance(
        params, structure, counted, RANGE_P, tol, max_iter
    )
    n = structure.num_generators
    held = at.live & ~closed.to(at.live.device)
    if bool(held.any()) and bool((held & ~(opened := _open_groups(sources, n, h.device))).any()):
        # Powers that underflowed, not open groups: the p-balance again from a max-balance.
        held = opened
        first = solve_max_balance(_held_out(sources, held, n), h, 0.5, tol, max_iter - newton)
        picked, more, converged, _ = p_balance(
            params, structure, counted, RANGE_P, tol, max_iter - newton - first.iterations, first.h
        )
        newton += first.iterations + more
    sources = _held_out(sources, held, n)
    done = solve_max_balance(sources, picked, 0.5, tol, max_iter - newton)
    return done._replace(
        iterations=newton + done.iterations,
        before=balance_step(sources, h, 0.5).residual if bool(held.any()) else at.residual,
        converged=converged and done.converged,
    )


def range_sources(
    params: Mapping[str, Tensor], structure: GaugeStructure, counted: set[str]
) -> dict[str, RangeSource]:
    """Every counted weight by name, with all its terms counted on their sides."""
    return {
        p.name: RangeSource(log_abs(params[p.name], pair_shape(p)), p.terms, p.terms)
        for p in structure.plan(_device(params))
        if p.name in counted
    }


def _held_out(sources: list[RangeSource], held: Tensor, n: int) -> list[RangeSource]:
    """``sources`` counting no term of a generator in ``held`` (bool ``[n]``)."""
    if not bool(held.any()):
        return sources
    return [source._replace(counted=_without(source.counted, held, n)) for source in sources]


def _without(terms: tuple[PlannedTerm, ...], excluded: Tensor, n: int) -> tuple[PlannedTerm, ...]:
    """``terms`` naming no generator in ``excluded`` (bool ``[n]``): the dummy slot there."""
    named = torch.cat([excluded, excluded.new_zeros(1)])
    return tuple(PlannedTerm(torch.where(named[t.slots], n, t.slots), t.sign) for t in terms)


def _device(params: Mapping[str, Tensor]) -> torch.device:
    first = next(iter(params.values()), None)
    return first.device if first is not None else torch.device("cpu")


class Reader(NamedTuple):
    """A counted weight read as a linear map over its input's channels: its parameter name, the
    weight dim that runs over those channels, and the weight's terms that vary along that dim
    (its columns)."""

    weight: str
    weight_dim: int
    columns: tuple[PlannedTerm, ...]


def _unseen(
    weights: Mapping[str, RangeSource], ranges: Mapping[tuple[str, int], Tensor | None],
    params: Mapping[str, Tensor], read: Tensor, order: list[str],
) -> tuple[str, ...]:  # fmt: skip
    """The counted matrices and kernels (2 dims or more; in ``order``) of which the calibration
    pass recorded no read at all (not even of empty inputs), with a generator dividing their
    columns (:func:`_absorbing`) that no recorded read gives activation ranges (``read``:
    bool ``[N]``): those channels fall back to ``"range"`` for want of a read it sees."""
    recorded = {name for name, _ in ranges}
    falls = torch.cat([~read, read.new_zeros(1)])  # the dummy slot: no generator
    return tuple(
        name
        for name in order
        if name not in recorded
        and params[name].dim() >= 2
        and any(bool(falls[t.slots].any()) for t in _absorbing(weights[name].counted))
    )


def readers(
    structure: GaugeStructure,
    read: Mapping[tuple[str, int], Tensor | None],
    order: list[str],
    device: Any,
) -> list[Reader]:
    """The reads ``(weight, dim)`` of the calibration pass (with their maxima) that are channel
    scalings of the input: the weight is counted (``order``: the counted names, in the order
    to list them), has terms varying along ``dim`` only (its columns; or along ``dim`` and
    dim 0 where the maxima are per matrix, ``[E, C]``, or per row of a grouped kernel,
    ``[out, in/G]``) and none varying along ``dim`` and another dim."""
    plans = {p.name: p for p in structure.plan(device)}
    rank = {name: i for i, name in enumerate(order)}
    out = []
    for weight, wdim in sorted(
        (r for r in read if r[0] in rank and r[0] in plans), key=lambda r: (rank[r[0]], r[1])
    ):
        maxima = read[weight, wdim]
        allowed = ({wdim}, {0, wdim}) if maxima is not None and maxima.dim() == 2 else ({wdim},)
        varying = [_varying(t) for t in plans[weight].terms]
        if any(wdim in v and v not in allowed for v in varying):
            continue
        terms = zip(plans[weight].terms, varying, strict=True)
        columns = tuple(t for t, v in terms if v in allowed)
        if columns:
            out.append(Reader(weight, wdim, columns))
    return out


def activation_balance(
    model: nn.Module,
    params: Mapping[str, Tensor],
    structure: GaugeStructure,
    counted: set[str],
    calibration: Tensor | tuple[Tensor, ...],
    alpha: float,
) -> tuple[list[RangeSource], Tensor, tuple[str, ...]]:
    """The sources and per-generator ``alpha`` of ``"activation"``, and the counted weights
    whose channels fall back to ``"range"`` for want of maxima
    (:func:`~gaugefix.calibration.activation_ranges`: reads not followed; :func:`_unseen`: no
    read seen), each named by a warning. Per reader:
    its input's channel ranges on the incoming side of the generators that scale them (the
    channel carries ``-1`` times the column exponent; none where the calibration pass gave it
    no input), its weight's columns on the outgoing side of the generators dividing them, with
    the :func:`_absorbing` terms of the other weights (fused experts, a router with its own
    ``forward``: ``s_j`` multiplies them too); these generators balance the two with
    ``alpha``. The others (query-key pairs: no linear map reads their
    channels; a channel identically zero on the batch, or read through zero columns only) are
    weight-range balanced as ``"range"`` does (``alpha = 1/2``). Each weight is one source
    (read once per pass)."""
    device = _device(params)
    ranges, left = _calibrated(model, {w: params[w] for w in counted}, calibration)
    weights = range_sources(params, structure, counted)
    order = [name for name, _ in model.named_parameters() if name in counted]
    order += [name for name in weights if name not in order]  # names a wrapper changes
    channels, divided = [], {}
    for r in readers(structure, ranges, order, device):
        divided[r.weight] = divided.get(r.weight, ()) + tuple(t for t in r.columns if t.sign < 0)
        if ranges[r.weight, r.weight_dim] is None:  # empty inputs only: its columns only
            continue
        maxima = ranges[r.weight, r.weight_dim]
        shape = [1] * params[r.weight].dim()
        shape[r.weight_dim] = maxima.shape[-1]
        shape[0] = maxima.shape[0] if maxima.dim() == 2 else shape[0]  # per matrix: [E, C]
        scaled = tuple(PlannedTerm(t.slots, -t.sign) for t in r.columns)
        act = maxima.to(device).log().view(shape)
        channels.append(RangeSource(act, scaled, tuple(t for t in scaled if t.sign > 0)))
    for name, source in weights.items():  # the other weights reading the channels
        if name not in divided and (terms := _absorbing(source.counted)):
            divided[name] = terms
    n = structure.num_generators
    read_sources = channels + [weights[w]._replace(counted=c) for w, c in divided.items()]
    sides = side_ranges(read_sources, torch.zeros(n, dtype=torch.float64, device=device))
    read = torch.isfinite(sides.log_in) & torch.isfinite(sides.log_out)
    unseen = [w for w in _unseen(weights, ranges, params, read, order) if w not in left]
    _warn_uncalibrated(tuple(unseen), "it sees no call read it")
    left = tuple(w for w in order if w in left or w in unseen)
    channels = [c._replace(counted=_without(c.counted, ~read, n)) for c in channels]
    for name, source in weights.items():
        mine = divided.get(name, ())
        rest = tuple(t for t in source.counted if not any(t is d for d in mine))
        weights[name] = source._replace(counted=mine + _without(rest, read, n))
    coefficient = torch.full((n,), 0.5, dtype=torch.float64, device=device)
    return channels + list(weights.values()), coefficient.masked_fill_(read, alpha), left


def _varying(term: PlannedTerm) -> set[int]:
    """The dims along which a term's generators vary."""
    return {d for d, k in enumerate(term.slots.shape) if k > 1}


def _absorbing(terms: tuple[PlannedTerm, ...]) -> tuple[PlannedTerm, ...]:
    """A weight's dividing terms on dims its multiplying terms do not vary along: the entries
    it reads channels through (its columns; a fused expert's ``[experts, out, in]`` dim 2),
    which a channel scale ``s_j`` multiplies whether or not the calibration pass sees them."""
    produced = set().union(*(_varying(t) for t in terms if t.sign > 0))
    return tuple(t for t in terms if t.sign < 0 and _varying(t) and not _varying(t) & produced)


# -- open groups of a max-balance ------------------------------------------------------------------


class _Support(NamedTuple):
    """A source's entries as a matrix (:class:`gaugefix.masses.Masses`' layout): its exponent
    terms along the rows and the columns (``(slots, sign)``, slots ``[a]`` / ``[b]``; one column
    where the terms do not split in two), its counted terms placed likewise, the matrix's
    ``size`` ``(a, b)``, and which entries are non-zero (bool ``[a, b]``; ``None``: all)."""

    rows: list[tuple[Tensor, int]]
    cols: list[tuple[Tensor, int]]
    counted_rows: list[tuple[Tensor, int]]
    counted_cols: list[tuple[Tensor, int]]
    size: tuple[int, int]
    nonzero: Tensor | None


def _support(source: RangeSource) -> _Support:
    """The :class:`_Support` of a source (one read of its magnitudes)."""
    terms = source.exponent
    magnitude = source.log_magnitude
    shape = tuple(torch.broadcast_shapes(magnitude.shape, *(t.slots.shape for t in terms)))
    split = _two_groups(PlannedParam("", shape, terms))
    a_dims = split[0][0] if split else list(range(len(shape)))
    b_dims = split[1][0] if split else []
    size = (math.prod(shape[d] for d in a_dims), math.prod(shape[d] for d in b_dims))
    nonzero = None  # the magnitudes' logs are finite or -inf (zero): -inf is the least
    if magnitude.numel() and not bool(magnitude.amin() > -math.inf):
        rest = [d for d in range(len(shape)) if d not in a_dims and d not in b_dims]
        nonzero = torch.isfinite(magnitude).expand(shape).permute([*a_dims, *b_dims, *rest])
        nonzero = nonzero.reshape(size)
    placed: list[list[tuple[Tensor, int]]] = [[], [], [], []]
    for i, group in enumerate((terms, source.counted)):
        for t in group:
            along_rows = _varying(t) <= set(a_dims)
            dims = a_dims if along_rows else b_dims
            placed[2 * i + (not along_rows)].append((_flat_over(t.slots, dims, shape), t.sign))
    return _Support(*placed, size, nonzero)


def _counted_sides(supports: list[_Support], n: int, device: Any) -> tuple[Tensor, Tensor]:
    """Per generator (bool ``[n + 1]``, the dummy slot last): whether some non-zero counted
    entry lands on its incoming side, and on its outgoing side."""
    sides = torch.zeros(2, n + 1, dtype=torch.bool, device=device)
    for s in supports:
        for dim, terms in ((1, s.counted_rows), (0, s.counted_cols)):
            for slots, sign in terms:
                at = slots if s.nonzero is None else slots[s.nonzero.any(dim)]
                sides[int(sign < 0), at] = True
    return sides[0], sides[1]


def _relevant(support: _Support, live: Tensor) -> Tensor | None:
    """The non-zero entries counted on a live generator's side (float ``[a, b]``, ``live``:
    ``[n + 1]``), ``None`` where that is every entry."""
    flags = [torch.zeros(k, dtype=torch.bool, device=live.device) for k in support.size]
    for flag, terms in zip(flags, (support.counted_rows, support.counted_cols), strict=True):
        for slots, _ in terms:
            flag |= live[slots]
    if support.nonzero is None and any(bool(flag.all()) for flag in flags):
        return None
    entries = flags[0][:, None] | flags[1][None, :]
    if support.nonzero is not None:
        entries &= support.nonzero
    return None if bool(entries.all()) else entries.to(torch.float32)


def _good(known: list[Tensor], slots: Tensor, sign: int) -> Tensor:
    """Whether ``sign c_slot >= 0`` is known (``known``: ``[c <= 0, c >= 0]``, ``[n + 1]``)."""
    return known[int(sign > 0)][slots]


def _derive_(
    support: _Support, matrix: Tensor | None, known: list[Tensor], new: list[Tensor]
) -> None:
    """One source's bounds for :func:`_pinned`: an entry whose terms other than ``+v`` (``-v``)
    all have ``sign c >= 0`` known gives ``c_v <= 0`` (``>= 0``); ``matrix``: its entries
    (float ``[a, b]``), ``None`` for all of them."""
    a, b = support.size
    bad = []
    for terms, size in ((support.rows, a), (support.cols, b)):
        count = torch.zeros(size, dtype=torch.int64, device=known[0].device)
        for slots, sign in terms:
            count += ~_good(known, slots, sign)
        bad.append(count)
    done = [(count == 0) for count in bad]
    if matrix is None:
        ok = [done[1].any().expand(a), done[0].any().expand(b)]
    else:
        ok = [matrix @ done[1].to(matrix.dtype) > 0, done[0].to(matrix.dtype) @ matrix > 0]
    for terms, count, fine in ((support.rows, bad[0], ok[0]), (support.cols, bad[1], ok[1])):
        for slots, sign in terms:
            own = (~_good(known, slots, sign)).to(torch.int64)
            new[int(sign < 0)][slots[fine & (count == own)]] = True


def _pinned(supports: list[_Support], matrices: list[Tensor | None], live: Tensor) -> Tensor:
    """The generators ``v`` (bool ``[n + 1]``) with ``c_v = 0`` for every direction ``c`` (0 off
    ``live``) with ``w(e) . c <= 0`` on every entry that ``matrices`` keeps, by propagation to
    a fixpoint (:meth:`gaugefix.masses.Masses.pinned`'s rule: sound, not always complete)."""
    known = [~live, ~live]  # c <= 0, c >= 0
    while True:
        new = [k.clone() for k in known]
        for support, matrix in zip(supports, matrices, strict=True):
            _derive_(support, matrix, known, new)
        if all(torch.equal(k, m) for k, m in zip(known, new, strict=True)):
            return known[0] & known[1]
        known = new


def _open_rows(
    supports: list[_Support], matrices: list[Tensor | None], loose: Tensor, n: int
) -> sparse.csr_matrix:
    """The distinct exponent rows ``w(e)`` (``[M, n]``) of the kept entries with a term on a
    ``loose`` generator (bool ``[n + 1]``)."""
    blocks = [sparse.csr_matrix((0, n))]
    for s, matrix in zip(supports, matrices, strict=True):
        rows, cols = (torch.zeros(k, dtype=torch.bool, device=loose.device) for k in s.size)
        for slots, _ in s.rows:
            rows |= loose[slots]
        for slots, _ in s.cols:
            cols |= loose[slots]
        if not bool(rows.any() or cols.any()):
            continue
        kept = torch.ones(s.size, dtype=torch.bool, device=loose.device)
        kept = kept if matrix is None else matrix > 0
        i, j = torch.nonzero(kept & (rows[:, None] | cols[None, :]), as_tuple=True)
        slots = torch.stack([t[i] for t, _ in s.rows] + [t[j] for t, _ in s.cols], 1)
        blocks.append(_rows(slots, [sign for _, sign in (*s.rows, *s.cols)], n))
    return sparse.vstack(blocks).tocsr()


def _open_groups(sources: list[RangeSource], n: int, device: Any) -> Tensor:
    """The live generators of a max-balance (a non-zero counted entry on each side) in open
    groups on its counted entries (bool ``[n]``): a direction ``c`` on them with ``w(e) . c <=
    0`` on every non-zero entry counted on a live generator's side, ``< 0`` on one, shrinks all
    the maxima it moves, so the balances have no solution or a set of them along ``c``. The
    generators :func:`_pinned` leaves free go to :func:`gaugefix.balancing.open_generators`."""
    supports = [_support(source) for source in sources]
    has_in, has_out = _counted_sides(supports, n, device)
    live = has_in & has_out
    live[n] = False
    matrices = [_relevant(support, live) for support in supports]
    loose = live & ~_pinned(supports, matrices, live)
    if not bool(loose.any()):
        return loose[:n]
    found = open_generators(_open_rows(supports, matrices, loose, n), loose[:n].cpu().numpy())
    return torch.as_tensor(found, device=device)


# -- the entry point -------------------------------------------------------------------------------


def objective_name(
    objective: str | Objective, calibration: Any, alpha: float | None, weights: Any
) -> str:
    """The objective's name (``"callable"`` for a user's), the arguments checked against it."""
    if callable(objective):
        name = "callable"
    elif isinstance(objective, str) and objective in OBJECTIVES:
        name = objective
    else:
        raise ValueError(
            f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)} or a callable"
        )
    if alpha is not None and name != "activation":
        raise ValueError(f"alpha is the exponent of 'activation' only, not of {name!r}")
    number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if alpha is not None and not (number and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if (calibration is None) == (name == "activation"):
        raise ValueError("calibration (example inputs) is needed by, and only by, 'activation'")
    if name == "activation":
        args = calibration if isinstance(calibration, tuple) else (calibration,)
        if not args or not all(isinstance(a, Tensor) for a in args):
            raise ValueError("calibration must be a tensor or a tuple of tensors")
        if any(a.numel() == 0 for a in args):
            raise ValueError("the calibration batch is empty")
        if any(a.is_meta for a in args):
            raise ValueError("the calibration batch is on the meta device (it holds no data)")
    if weights is not None and name in ("norm", "callable"):
        raise ValueError(f"weights selects what 'range' and 'activation' count, not {name!r}")
    return name


def counted_weights(structure: GaugeStructure, weights: Iterable[str] | None) -> set[str]:
    """The parameters the objective counts: by default every weight matrix and kernel
    (``dim >= 2``) the structure acts on and every gain (the other parameters, biases
    excepted); else the named ones, each checked to be one the structure acts on."""
    if weights is None:
        return {
            name
            for name, p in structure.params.items()
            if len(p.shape) >= 2 or not name.endswith("bias")
        }
    if not isinstance(weights, Iterable):
        raise TypeError(f"weights must be parameter names, got {type(weights).__name__}")
    names = [weights] if isinstance(weights, str) else list(weights)
    unknown = [n for n in names if n not in structure.params]
    if unknown or not names:
        raise ValueError(
            f"weights must name parameters the structure acts on; not: {unknown or names}"
        )
    return set(names)


def unfrozen(
    structure: GaugeStructure, params: Mapping[str, Tensor]
) -> tuple[GaugeStructure, Tensor]:
    """The subgroup of the generators touching no parameter with ``requires_grad=False``, and
    which generators it keeps (bool ``[N]``)."""
    keep = ~structure.touching({name for name, p in params.items() if not p.requires_grad})
    return (structure if bool(keep.all()) else structure.restrict(keep, FROZEN_REASON)), keep


def closed_generators(params: Mapping[str, Tensor], structure: GaugeStructure) -> Tensor:
    """The generators (bool ``[N]``) with a closed orbit of the norm (both sides non-zero, in
    no open group: :func:`gaugefix.balancing.closed_orbits`), the ones a callable may move."""
    if not structure.num_generators:
        return torch.zeros(0, dtype=torch.bool)
    masses = masses_of({name: params[name] for name in structure.params}, structure)
    state = masses.at(torch.zeros(1, masses.n, dtype=torch.float64, device=masses.device))
    return closed_orbits(masses, state)[0].cpu()


def equalize_(
    model: nn.Module,
    structure: GaugeStructure,
    objective: str | Objective = "range",
    *,
    calibration: Tensor | tuple[Tensor, ...] | None = None,
    alpha: float | None = None,
    weights: Iterable[str] | None = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    optimizer: Optimizers = None,
) -> EqualizeResult:
    """Move ``model`` in place along its gauge orbit (function unchanged) to the point that
    minimises ``objective``: ``"range"`` (data-free weight-range equalization), ``"activation"``
    (SmoothQuant-style, with ``calibration`` inputs and exponent ``alpha``, by default
    :data:`DEFAULT_ALPHA`, given for no other), ``"norm"`` (:func:`gaugefix.balance_`), or a
    callable of the rescaled parameters (by L-BFGS; see the module docstring for each).

    ``weights``: the parameters ``range`` and ``activation`` count (default: every weight matrix,
    kernel and gain the structure acts on; biases are rescaled but not counted). Generators
    touching a frozen parameter (``requires_grad=False``) never move. Optimizer state is
    transported as :func:`gaugefix.apply_gauge_` does. Everything is validated first (and the
    calibration pass runs) before anything is modified; on error nothing is.
    """
    name = objective_name(objective, calibration, alpha, weights)
    check_tolerances(tol, max_iter)
    params = structure.bind(model)
    refuse_gathered(model, params)  # FSDP2 parameters gathered now: a change would be lost
    check_finite_params(params)
    check_transport(optimizer, params)
    active, keep = unfrozen(structure, params)
    left: tuple[str, ...] = ()
    if name == "norm":
        held = sum(_norm_sq(params[n]) for n in structure.params if n not in active.params)
        return _balanced(model, active, keep, tol, max_iter, optimizer, held)
    if name == "callable":
        live = closed_generators(params, active)
        inner = active if bool(live.all()) else active.restrict(live, OPEN_REASON)
        moved, iterations, before, after, converged = minimize_objective(
            objective, model, inner, tol, max_iter
        )
        h = torch.zeros(active.num_generators, dtype=torch.float64)
        h[live] = moved.cpu()
    else:
        counted = counted_weights(structure, weights) & set(active.params)
        if name == "range":
            solved = range_balance(params, active, counted, tol, max_iter)
        else:
            exponent = DEFAULT_ALPHA if alpha is None else alpha
            solved, left = _activation_solve(
                model, params, active, counted, calibration, exponent, tol, max_iter
            )
        h, iterations, before, after, live, converged = solved
    full = torch.zeros(structure.num_generators, dtype=torch.float64)
    full[keep] = h.cpu()
    move_(params, structure, full, optimizer)
    alive = torch.zeros(structure.num_generators, dtype=torch.bool)
    alive[keep] = live.cpu()
    dead = torch.nonzero(~alive).reshape(-1)
    return EqualizeResult(name, before, after, iterations, full, dead, converged, left)


def _norm_sq(t: Tensor) -> float:
    """``||t||^2`` in float64."""
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64) ** 2)


def _activation_solve(
    model: nn.Module, params: Mapping[str, Tensor], structure: GaugeStructure, counted: set[str],
    calibration: Tensor | tuple[Tensor, ...], alpha: float, tol: float, max_iter: int,
) -> tuple[Solved, tuple[str, ...]]:  # fmt: skip
    """``"activation"``: the max-balance of :func:`activation_balance`'s sources from ``h = 0``,
    with the generators in open groups on them (:func:`_open_groups`) held at ``h = 0`` (their
    counted terms dropped: not live)."""
    sources, coefficient, left = activation_balance(
        model, params, structure, counted, calibration, alpha
    )
    n, device = structure.num_generators, _device(params)
    held = _open_groups(sources, n, device)
    if bool(held.any()):
        sources = [source._replace(counted=_without(source.counted, held, n)) for source in sources]
    start = torch.zeros(n, dtype=torch.float64, device=device)
    return solve_max_balance(sources, start, coefficient, tol, max_iter), left


def _balanced(
    model: nn.Module,
    active: GaugeStructure,
    keep: Tensor,
    tol: float,
    max_iter: int,
    optimizer: Optimizers,
    held: float,
) -> EqualizeResult:
    """``"norm"``: :func:`gaugefix.balance_` on the generators ``keep`` selects (``active``),
    reported on all of them; ``held``: ``||theta||^2`` of the parameters only the others act on
    (they do not move), added to the norm before and after."""
    done = balance_(model, active, tol, max_iter, optimizer)
    full = torch.zeros(keep.shape[0], dtype=torch.float64)
    full[keep] = done.h.cpu()
    kept = torch.nonzero(keep).reshape(-1)
    dead = torch.cat([torch.nonzero(~keep).reshape(-1), kept[done.dead_generators.cpu()]])
    return EqualizeResult(
        "norm", done.norm_sq_before + held, done.norm_sq_after + held, done.iterations, full,
        dead.sort().values, done.converged,
    )  # fmt: skip
