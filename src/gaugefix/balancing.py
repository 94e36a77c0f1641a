"""Hard gauge fixing: :func:`balance_` moves a model to the minimal-norm point of its orbit.

Along the orbit, ``F(h) = ||g(h) . theta||^2 = sum_e theta_e^2 exp(2 sum_n w_n(e) h_n)`` is a
sum of exponentials of linear forms: strictly convex on the generators with a closed orbit, with
gradient ``2 mu`` and Hessian ``4 K`` at ``g(h) . theta``. Its minimiser, where ``mu = 0``, is the
balanced representative of the orbit. :func:`solve_balance` finds it for ``R`` stacked copies of
a model at once (the library calls it with ``R = 1``, the sweep engine with one copy per run).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy import optimize, sparse
from torch import Tensor, nn

from gaugefix.action import (
    Optimizers,
    check_finite_params,
    check_transport,
    move_,
    refuse_quantized,
)
from gaugefix.distributed import (
    OPTIMIZER,
    agreed,
    first_dtensor,
    local_view,
    mesh_group,
    optimizer_passed,
    refuse_gathered,
    sharded,
)
from gaugefix.errors import check_number
from gaugefix.kernels import generator_sums, row_norms
from gaugefix.masses import Masses, MassState
from gaugefix.moment import refuse_meta
from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import check_structure

__all__ = [
    "balance_",
    "BalanceResult",
    "check_tolerances",
    "check_types",
    "log_ratio",
    "masses_of",
    "normalised",
    "pcg",
    "scale_exponent",
    "scaled",
    "solve_balance",
    "solve_model",
    "solved_in_range",
    "times_power_of_two",
]

# Relative size of a change of F(h) below which its rounding hides it.
RESOLUTION = 1e-12
# The line search's sufficient decrease (Armijo): a step t is accepted when
# F(h + t d) <= F(h) + ARMIJO * t * slope.
ARMIJO = 1e-4
# |log(S_out,n / S_in,n)| beyond which a generator is far from its balance (|mu_n| / S_n above
# tanh(1/2) = 0.46): a step whose change of F is below F's rounding is still doubled while such
# generators approach their balance.
FAR_LOG_RATIO = 1.0
# The most halvings (and doublings) of a line search's step: 2^-60 is far below float64's
# resolution of a step of 1.
LINE_SEARCH_TRIALS = 60
# Conjugate gradients on N generators stop after at most max(CG_MIN_ITERATIONS,
# CG_ITERATIONS_PER_ROOT * sqrt(N)) iterations (Newton's outer iterations continue from an
# inexact solve).
CG_MIN_ITERATIONS = 50
CG_ITERATIONS_PER_ROOT = 4
# Binary exponents of the largest |entry| beyond which the parameters are brought by a power of
# two to [1/2, 1) (projections) or to just below 2^256 (the balancing solve, of balance_ and
# gauge_coordinates alike, and downward only where the squares overflow: its balanced point can
# take entries far below the largest, and 2^256 leaves them the most room) before their
# squares are taken: squares of entries near 2^256 or 2^-256 are near 2^512 and 2^-512, far
# inside float64's normal range (2^-1022 to 2^1024).
SAFE_EXPONENT = 256
# float64's smallest normal number: squares below it keep fewer digits than the format.
TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class BalanceResult:
    """What :func:`balance_` did.

    The solve, and the measurements below, are on float64 copies of the parameters times a
    power of two ``2^-e`` (exact; ``h`` and the ratios do not scale) where the largest
    ``|entry|`` is below ``2^-256`` or its squares overflow float64 (:func:`solved_in_range`);
    ``e = 0`` otherwise.

    ``iterations``: outer iterations taken; ``mu_rel_max``: ``max_n |mu_n| / S_n`` over
    the generators with a closed orbit, measured on the model afterwards (``imbalance_stats``'
    ``mu_rel_max`` without the dead generators, which count 1 there); ``norm_sq_before`` and
    ``norm_sq_after``: ``||theta||^2`` over the parameters the structure acts on (equal when
    nothing moved; ``inf`` or 0 beyond float64); ``h``: the gauge transformation applied;
    ``dead_generators``: generators with all incoming or all outgoing entries zero, alone or as
    a group (no closed orbit, :func:`closed_orbits`; left untouched; an entry whose square
    underflows float64 at the solve's scale, below about ``1.5e-162 2^e``, counts as zero);
    ``converged``: whether the float64 solve reached ``tol`` with every live ``S_n`` at least
    :data:`TINY` ``/ tol`` (smaller, their squares are subnormal and ``mu_n`` lacks the digits
    to meet ``tol``); the imbalance measured afterwards also carries the parameters' rounding:
    about ``1e-7`` for a float32 model.
    """

    iterations: int
    mu_rel_max: float
    norm_sq_before: float
    norm_sq_after: float
    h: Tensor
    dead_generators: Tensor
    converged: bool


@dataclass(frozen=True)
class BalanceSolution:
    """The minimisers of ``F(h)`` found by :func:`solve_balance` for ``R`` copies.

    ``h`` (``[R, N]``, float64): ``mu(g(h) . theta) = 0`` on the generators with a closed orbit
    (0 on dead ones); ``iterations``: outer iterations (the most any copy took);
    ``mu_rel_max`` (``[R]``): ``max_n |mu_n| / S_n`` at ``g(h) . theta`` over the live
    generators, in float64 from the masses; ``norm_sq_before`` / ``norm_sq_after`` (``[R]``):
    ``F(0)`` and ``F(h)``; ``live`` (``[R, N]`` bool): the generators with a closed orbit (both
    sides non-zero and in no open group, :func:`closed_orbits`);
    ``converged`` (``[R]``): whether ``mu_rel_max <= tol``.
    """

    h: Tensor
    iterations: int
    mu_rel_max: Tensor
    norm_sq_before: Tensor
    norm_sq_after: Tensor
    live: Tensor
    converged: Tensor


def check_tolerances(tol: float, max_iter: int) -> None:
    """``ValueError`` unless ``tol`` is a finite number ``> 0`` and ``max_iter`` an integer
    ``>= 0`` (NumPy's too; not a bool)."""
    check_number(tol, "tol", strict=True)
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")


def check_types(model: nn.Module, structure: GaugeStructure) -> None:
    """``TypeError`` for a ``model`` that is not an ``nn.Module`` or a ``structure`` that is
    not a :class:`GaugeStructure`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_structure(structure)


def times_power_of_two(t: Tensor, k: int) -> Tensor:
    """``t 2^k`` (``|k| <= 2200``) as a new tensor, in three factors that float64 holds: exact
    wherever the result is a normal number (the factors take it there monotonically)."""
    third = int(k / 3)  # toward 0: every factor moves t the same way
    return t * 2.0**third * 2.0**third * 2.0 ** (k - 2 * third)


def scale_exponent(
    params: Mapping[str, Tensor],
    beyond: int = SAFE_EXPONENT,
    to: int = 0,
    like: Tensor | None = None,
) -> int:
    """The ``e`` of :func:`normalised`: the binary exponent of the largest ``|entry|`` less
    ``to`` when it is beyond ``+-beyond``, else 0 (0 too for no entries or a non-finite one).
    With a ``DTensor`` ``like`` (``params`` its processes' slices), the largest over its mesh
    (one all-reduce). One host read; ``ValueError`` on the ``meta`` device."""
    refuse_meta(params)
    values = [p.detach() for p in params.values() if p.numel()]
    top = torch.zeros(1, dtype=torch.float64, device=like.device if like is not None else None)
    if values:  # per tensor its least and largest entry: no copy (the fastest on CPU)
        ends = [torch.stack(torch.aminmax(p)).to(torch.float64) for p in values]
        top = torch.cat(ends).abs().amax().reshape(1)
    if like is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=mesh_group(like))
    largest = float(top[0])
    top_exponent = math.frexp(largest)[1] if math.isfinite(largest) else 0
    return top_exponent - to if abs(top_exponent) > beyond else 0


def scaled(params: Mapping[str, Tensor], e: int) -> dict[str, Tensor]:
    """Float64 copies of ``params`` times ``2^-e``."""
    return {k: times_power_of_two(p.detach().to(torch.float64), -e) for k, p in params.items()}


def normalised(
    params: dict[str, Tensor], beyond: int = SAFE_EXPONENT, to: int = 0
) -> tuple[dict[str, Tensor], int]:
    """``(params 2^-e, e)``: float64 copies scaled so that the largest ``|entry|`` lies in
    ``[2^(to - 1), 2^to)`` when its binary exponent is beyond ``beyond`` (by default
    :data:`SAFE_EXPONENT`: their squares would leave float64's normal range), else
    ``(params, 0)``. ``K(theta) = 4^e K(2^-e theta)``
    exactly; ``h``, the ratios ``mu_n / S_n`` and ``Pi_V`` do not scale. Non-finite entries
    are left to the callers' checks; ``ValueError`` on the ``meta`` device."""
    e = scale_exponent(params, beyond, to)
    return (scaled(params, e), e) if e else (params, 0)


def max_rel(mu: Tensor, s: Tensor, live: Tensor) -> Tensor:
    """``max |mu_n| / S_n`` over the live generators of each copy (0 without any): ``[R]``."""
    ratio = torch.where(live, mu.abs() / torch.where(live, s, 1.0), 0.0)
    return ratio.amax(-1) if ratio.shape[-1] else ratio.new_zeros(ratio.shape[:-1])


def pcg(matvec: Callable[[Tensor], Tensor], b: Tensor, diag: Tensor, rtol: Tensor) -> Tensor:
    """Jacobi-preconditioned conjugate gradients for ``A_r x_r = b_r`` (``[R, N]``), every copy
    at once, ``A`` symmetric positive definite on the support of ``b``; a copy stops updating
    once its residual is below ``rtol_r ||b_r||``."""
    x = torch.zeros_like(b)
    res = b.clone()
    z = res / diag
    p = z.clone()
    rz = (res * z).sum(1)
    stop = rtol * row_norms(b)
    for _ in range(max(CG_MIN_ITERATIONS, CG_ITERATIONS_PER_ROOT * math.isqrt(b.shape[1]))):
        live = row_norms(res) > stop
        if not bool(live.any()):
            break
        ap = matvec(p)
        curvature = (p * ap).sum(1)
        live = live & (curvature > 0)
        alpha = torch.where(live, rz / torch.where(live, curvature, 1.0), 0.0)
        x = x + alpha[:, None] * p
        res = res - alpha[:, None] * ap
        z = res / diag
        rz_new = (res * z).sum(1)
        beta = torch.where(live, rz_new / torch.where(rz == 0, 1.0, rz), 0.0)
        p = z + beta[:, None] * p
        rz = torch.where(live, rz_new, rz)
    return x


@torch.no_grad()
def solve_balance(masses: Masses, tol: float = 1e-10, max_iter: int = 50) -> BalanceSolution:
    """The gauges ``h`` (``[R, N]``) that balance every copy held by ``masses``: the minimiser
    of ``F(h)`` over the generators with a closed orbit, in float64, without touching the
    parameters.

    Far from the minimiser, every live generator of a copy moves at once to its own balance,
    ``h_n += log(S_out,n / S_in,n) / 4`` (Saul's parallel update: exact for generators that
    share no entry, and it removes the large local imbalances of a random gauge in one pass,
    where Newton's method on the exponentials needs many line-search steps), for as long as that
    halves ``F`` or the imbalance. Then Newton's direction ``-K^{-1} mu / 2``, by
    Jacobi-preconditioned conjugate gradients on the matrix-free ``K``, with a line search on
    ``F`` (:func:`_line_search`). Stops when ``max |mu_n| / S_n <= tol`` for every copy; a copy
    that converged (or whose masses are not finite) stops moving. Dead generators keep ``h = 0``.
    """
    r, n = masses.r, masses.n
    h = torch.zeros(r, n, dtype=torch.float64, device=masses.device)
    state = masses.at(h)
    live = closed_orbits(masses, state)
    mask = live.to(torch.float64)
    before = state.total
    finite = torch.isfinite(before)
    closed_form = finite.clone()
    iterations, err = 0, torch.full((r,), math.nan, dtype=torch.float64, device=masses.device)
    for iterations in range(max_iter + 1):  # noqa: B007
        state.complete()
        mu, s = state.s_in - state.s_out, state.s_in + state.s_out
        err = torch.where(finite, max_rel(mu, s, live), math.nan)
        moving = finite & (err > tol)
        if not bool(moving.any()) or iterations == max_iter:
            break
        newton = moving & ~closed_form
        if bool((closed_form & moving).any()):
            state, took = _closed_form_step(masses, state, live, err, closed_form & moving)
            closed_form = took
            newton = moving & ~took
            if not bool(newton.any()):
                continue
            mu, s = state.s_in - state.s_out, state.s_in + state.s_out
        direction = pcg(
            lambda v, st=state: st.gram_matvec(v * mask) * mask,
            -0.5 * mu * mask * newton[:, None],
            torch.where(live, s, torch.ones_like(s)),
            # Superlinear forcing, but no tighter than the last step needs: the imbalance
            # after the step is about rtol * err (plus err^2).
            rtol=torch.clamp(torch.maximum(err, 0.1 * tol / err), max=0.1),
        )
        state = _line_search(masses, state, direction, mu, live, newton)
    return BalanceSolution(
        h=state.h,
        iterations=iterations,
        mu_rel_max=err,
        norm_sq_before=before,
        norm_sq_after=state.total,
        live=live,
        converged=err <= tol,
    )


# Relative change of ``F`` within rounding. Near the balance a closed-form step lowers ``F`` by
# about ``err^2`` relative, so ``f1 < f0`` would be decided by rounding, differently for sums
# added in another order (over FSDP slices); the step's decision, and the iteration count, are
# then the same on slices and on the whole model.
F_ROUNDING = 64 * torch.finfo(torch.float64).eps


def log_ratio(a: Tensor, b: Tensor) -> Tensor:
    """``log(a / b)`` for positive ``a``, ``b``; where the ratio is not a normal positive number
    (sides over ``1e308`` apart: a side of subnormal squares) the difference of the logs, which
    loses ``|log a|`` ulps near a ratio of 1 and so is not used everywhere."""
    ratio = a / b
    exact = (ratio >= torch.finfo(ratio.dtype).tiny) & (ratio < math.inf)
    return torch.where(exact, torch.log(ratio), torch.log(a) - torch.log(b))


# Open groups of a zero-free structure, by structure: ``[N]`` bool (the verdict depends on the
# structure alone when no mass is zero).
_ZERO_FREE_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# |c_n| above which a recession direction found by linear programming moves generator n.
MOVES = 1e-9


def closed_orbits(masses: Masses, state: MassState) -> Tensor:
    """The generators with a closed orbit (``[R, N]`` bool): both sides non-zero at ``state``
    (the masses at the base, before any step), less the generators of open groups: the minimal
    sets that must stay at ``h = 0`` for ``F`` to have a minimiser over the rest
    (:func:`open_generators`, on the generators :meth:`Masses.pinned` leaves free). A copy
    without a zero mass takes the structure's verdict (computed once). Skipped on FSDP slices
    (both sides non-zero only)."""
    live = (state.s_in > 0) & (state.s_out > 0)
    if masses.sum_over_shards.__func__ is not GaugeStructure.sum_over_shards or not masses.n:
        return live
    whole = len(masses.plan) == len(masses.structure.params)
    cached = whole and masses.structure in _ZERO_FREE_OPEN
    free = (masses.zero_free() & live.all(1)).tolist() if whole else [False] * masses.r
    if cached and all(free):
        return live & ~_ZERO_FREE_OPEN[masses.structure].to(live.device)
    loose = ~masses.pinned(~live) & live
    out = live.clone()
    for r in torch.nonzero(loose.any(1)).reshape(-1).tolist():
        found = open_generators(masses.exponent_rows(r, loose[r]), loose[r].cpu().numpy())
        out[r] &= ~torch.as_tensor(found, device=live.device)
    if whole and free[0]:
        _ZERO_FREE_OPEN[masses.structure] = ~out[0] & live[0]
    return out


def open_generators(rows: sparse.csr_matrix, live: np.ndarray) -> np.ndarray:
    """The live generators (``[N]`` bool) to hold at ``h = 0``, with the others not ``live``,
    for ``F(h) = sum_e u_e exp(2 w(e) . h)`` over the rest to have a minimiser: none exactly
    when no direction ``c`` has ``w(e) . c <= 0`` for every row, ``< 0`` for one (``rows``:
    ``[M, N]``, the entries with non-zero mass)."""
    rows = rows[:, live]
    rows.eliminate_zeros()
    index = np.flatnonzero(live)
    if (
        rows.nnz
        and np.abs(rows.data).max() == 1
        and (rows > 0).sum(1).max() <= 1
        and ((rows < 0).sum(1).max() <= 1)
    ):
        moved = _source_and_sink_components(rows)
    else:
        moved = _recession_supports(rows)
    out = np.zeros(live.shape, dtype=bool)
    out[index[moved]] = True
    return out


def _source_and_sink_components(rows: sparse.csr_matrix) -> np.ndarray:
    """Rows ``e_v - e_u`` (edges ``u -> v``; a missing side is the fixed node ``N``): the strong
    components other than the fixed node's with edges leaving them but none entering, or the
    reverse. Together they are the unique minimal set whose fixing puts every other component
    (but isolated ones: a stabiliser) on a cycle through the fixed node."""
    m, n = rows.shape
    coo = rows.tocoo()
    head, tail = np.full(m, n), np.full(m, n)
    head[coo.row[coo.data > 0]] = coo.col[coo.data > 0]
    tail[coo.row[coo.data < 0]] = coo.col[coo.data < 0]
    graph = sparse.csr_matrix((np.ones(m), (tail, head)), shape=(n + 1, n + 1))
    _, label = sparse.csgraph.connected_components(graph, directed=True, connection="strong")
    cross = label[tail] != label[head]
    entered = np.zeros(label.max() + 1, dtype=bool)
    left = np.zeros_like(entered)
    entered[label[head[cross]]] = True
    left[label[tail[cross]]] = True
    open_component = entered ^ left
    open_component[label[n]] = False
    return open_component[label[:n]]


def _recession_supports(rows: sparse.csr_matrix) -> np.ndarray:
    """General rows: while a linear programme finds a direction ``c`` with ``rows c + s <= 0``,
    ``0 <= s <= 1``, ``sum s`` maximal and positive, the generators it moves are held fixed
    (a set with no minimiser on it, not always the least one). Where HiGHS fails, every
    generator not yet resolved is held too (never counted closed unproven), with a
    ``RuntimeWarning``."""
    m, n = rows.shape
    moved = np.zeros(n, dtype=bool)
    while m and not moved.all():
        free = np.flatnonzero(~moved)
        a = sparse.hstack([rows[:, free], sparse.identity(m)]).tocsr()
        cost = np.concatenate([np.zeros(free.size), -np.ones(m)])
        bounds = [(None, None)] * free.size + [(0.0, 1.0)] * m
        result = optimize.linprog(cost, A_ub=a, b_ub=np.zeros(m), bounds=bounds, method="highs")
        if not result.success:
            warnings.warn(
                f"the linear programme for open groups failed ({result.message}); its "
                f"{free.size} unresolved generators are held at h = 0",
                RuntimeWarning,
                stacklevel=2,
            )
            moved[free] = True
            break
        if -result.fun < 0.5:
            break
        moves = np.abs(result.x[: free.size]) > MOVES
        if not moves.any():
            break
        moved[free[moves]] = True
    return moved


def _closed_form_step(
    masses: Masses, state: MassState, live: Tensor, err: Tensor, runs: Tensor
) -> tuple[MassState, Tensor]:
    """Saul's parallel update for the selected copies (``runs``: ``[R]`` bool): kept where it
    halves ``F``, or does not increase it (beyond :data:`F_ROUNDING`) and halves
    ``max |mu_n| / S_n``. Returns the state at the new gauges and the copies that took the step
    (the others then switch to Newton)."""
    step = torch.where(live & runs[:, None], 0.25 * log_ratio(state.s_out, state.s_in), 0.0)
    trial = masses.at(state.h + step)
    mu, s = trial.s_in - trial.s_out, trial.s_in + trial.s_out
    f0, f1 = state.total, trial.total
    grows = f1 > f0 * (1 + F_ROUNDING)
    took = runs & ((f1 <= 0.5 * f0) | ~grows & (max_rel(mu, s, live) <= 0.5 * err))
    if bool((took == runs).all()):  # the trial is at every copy's new gauge
        return _rebased(masses, trial).complete(), took
    if not bool(took.any()):
        return state, took
    h = torch.where(took[:, None], trial.h, state.h)
    return _rebased(masses, masses.at(h)).complete(), took


def _line_search(
    masses: Masses, state: MassState, direction: Tensor, mu: Tensor, live: Tensor, runs: Tensor
) -> MassState:
    """Backtracking (Armijo) on ``F(h + t d)`` from ``t = 1`` for the selected copies; ``F`` is
    convex along each line. Each trial costs one read of the masses.

    What an accepted step guarantees: its decrease of ``F`` satisfies Armijo's condition, or,
    where the predicted decrease ``-t slope`` lies below ``F``'s rounding (:data:`RESOLUTION`
    of ``F``, so ``F`` cannot tell), it decreases one of three measures of the imbalance over
    the live generators, each zero exactly at the balance: ``||mu||``, ``||mu / S||`` (which
    sees generators whose ``|mu_n|`` lie below the rounding of ``||mu||``, about
    ``eps max_m S_m``), or, for a stretched step whose ``F`` does not grow,
    ``||log(S_out / S_in)||``. A copy for which no trial does either stays where it is.

    Three extensions of the plain search serve that guarantee. A full step accepted with a
    clearly resolved decrease is doubled while ``F`` keeps decreasing with Armijo holding (far
    from the minimiser one exponential term dominates ``F`` and Newton's step only divides it by
    ``e``; near it ``F(2) ~ F(0)`` stops the doubling at once). A step whose decrease is
    unresolvable is judged by ``||mu||`` and ``||mu / S||``. A full step accepted unresolved
    while some live generators are far from their balance (``|log(S_out,n / S_in,n)| >``
    :data:`FAR_LOG_RATIO`: masses far below ``F``'s rounding, which Newton moves by about
    ``1/2`` per iteration) has its components on those generators doubled
    (:func:`_stretched`).
    """
    h, f0 = state.h, state.total
    slope = 2 * (mu * direction).sum(1)
    mu_norm = row_norms(torch.where(live, mu, 0.0))
    rel_norm = _relative_norm(mu, state.s_in + state.s_out, live)
    t = torch.ones_like(f0)
    accepted = torch.zeros_like(runs)
    settled = ~runs | ~torch.isfinite(f0) | (slope == 0)
    far = _far(state, live) & (~settled & (-slope <= RESOLUTION * f0))[:, None]
    trial = state
    for attempt in range(LINE_SEARCH_TRIALS):
        trial = masses.at(h + t[:, None] * direction, sums=False)
        f_trial = trial.total
        ok = ~settled & (f_trial <= f0 + ARMIJO * t * slope)
        if attempt == 0 and bool(ok.any()):
            trial, t, f_trial = _doubled(masses, h, direction, t, trial, f0, slope, ok)
        unresolved = ~settled & ~ok & (-t * slope <= RESOLUTION * f0)
        if bool(unresolved.any()):
            trial.complete()
            mu_trial = trial.s_in - trial.s_out
            norm = row_norms(torch.where(live, mu_trial, 0.0))
            rel = _relative_norm(mu_trial, trial.s_in + trial.s_out, live)
            ok = ok | unresolved & ((norm < mu_norm) | (rel < rel_norm))
        accepted |= ok
        settled |= ok
        if attempt == 0 and bool((far & ok[:, None]).any()):
            trial, direction = _stretched(masses, h, direction, trial, far & ok[:, None], live)
        if bool(settled.all()):
            break
        t = torch.where(settled, t, 0.5 * t)
    t = torch.where(accepted, t, 0.0)
    if masses.r == 1:  # the last trial is at the accepted point, or nothing moved
        return _rebased(masses, trial if bool(accepted.all()) else state)
    return _rebased(masses, masses.at(h + t[:, None] * direction, sums=False))


def _far(state: MassState, live: Tensor) -> Tensor:
    """The live generators (``[R, N]`` bool) whose sides differ by more than
    :data:`FAR_LOG_RATIO`: ``|log(S_out,n / S_in,n)|`` above it."""
    return live & (log_ratio(state.s_out, state.s_in).abs() > FAR_LOG_RATIO)


def _log_norm(state: MassState, live: Tensor) -> Tensor:
    """``||log(S_out / S_in)||`` over the live generators of each copy: ``[R]``."""
    return row_norms(torch.where(live, log_ratio(state.s_out, state.s_in), 0.0))


def _stretched(
    masses: Masses, h: Tensor, direction: Tensor, trial: MassState, far: Tensor, live: Tensor
) -> tuple[MassState, Tensor]:
    """The full steps ``h + d`` accepted where their change of ``F`` is below its rounding,
    with the components of ``d`` on the generators far from their balance (``far``:
    ``[R, N]``; their masses lie far below ``F``'s rounding, and Newton moves each by about
    ``1/2`` per step) doubled while ``F`` does not grow and ``||log(S_out / S_in)||`` over the
    live generators keeps decreasing: ``(state, d')`` at the longest accepted steps ``h + d'``."""
    f_trial, measure = trial.total, _log_norm(trial.complete(), live)
    growing = far.any(1)
    scale = torch.ones_like(f_trial)
    for _ in range(LINE_SEARCH_TRIALS):
        longer_scale = torch.where(growing, 2 * scale, scale)
        longer = masses.at(h + torch.where(far, longer_scale[:, None] * direction, direction))
        longer_measure = _log_norm(longer, live)
        better = growing & (longer.total <= f_trial) & (longer_measure < measure)
        if not bool(better.any()):
            break
        scale = torch.where(better, longer_scale, scale)
        measure = torch.where(better, longer_measure, measure)
        f_trial = torch.where(better, longer.total, f_trial)
        stretched = torch.where(far, scale[:, None] * direction, direction)
        trial = longer if bool((better == growing).all()) else masses.at(h + stretched)
        growing = better
    return trial, torch.where(far, scale[:, None] * direction, direction)


def _relative_norm(mu: Tensor, s: Tensor, live: Tensor) -> Tensor:
    """``||mu / S||`` over the live generators of each copy: ``[R]``."""
    return row_norms(torch.where(live, mu / torch.where(live, s, 1.0), 0.0))


def _doubled(
    masses: Masses,
    h: Tensor,
    direction: Tensor,
    t: Tensor,
    trial: MassState,
    f0: Tensor,
    slope: Tensor,
    ok: Tensor,
) -> tuple[MassState, Tensor, Tensor]:
    """The full steps accepted at once with a clearly resolved decrease, doubled while ``F``
    keeps decreasing with Armijo holding: ``(state, t, F)`` at the longest accepted steps."""
    f_trial = trial.total
    growing = ok & (f0 - f_trial > 1e3 * RESOLUTION * f0)
    for _ in range(LINE_SEARCH_TRIALS):
        if not bool(growing.any()):
            break
        longer_t = torch.where(growing, 2 * t, t)
        longer = masses.at(h + longer_t[:, None] * direction, sums=False)
        armijo = longer.total <= f0 + ARMIJO * longer_t * slope
        better = growing & (longer.total < f_trial) & armijo
        if not bool(better.any()):
            break
        t = torch.where(better, longer_t, t)
        f_trial = torch.where(better, longer.total, f_trial)
        if bool((better == growing).all()):
            trial = longer
        else:
            trial = masses.at(h + t[:, None] * direction, sums=False)
        growing = better
    return trial, t, f_trial


def _rebased(masses: Masses, state: MassState) -> MassState:
    """``state``, re-evaluated after moving the base of ``masses`` when ``h`` drifted far."""
    base = masses.base
    masses.rebase(state.h)
    return state if masses.base is base else masses.at(state.h, sums=False)


def masses_of(params: Mapping[str, Tensor], structure: GaugeStructure) -> Masses:
    """The masses of one model's bound parameters (a stack of one copy)."""
    return Masses({k: v.detach().unsqueeze(0) for k, v in params.items()}, structure)


def solve_model(
    params: dict[str, Tensor], structure: GaugeStructure, tol: float, max_iter: int
) -> BalanceSolution:
    """:func:`solve_balance` for one model's bound ``params`` (``DTensor`` s: on this process's
    slices), checked (:func:`_check_solved`). Not reaching ``tol`` is no error: ``converged``
    says it (the one failure policy of the Newton solves)."""
    tensors, local = local_view(params, structure)  # this process's slices under FSDP2
    solution = solve_balance(masses_of(tensors, local), tol, max_iter)
    _check_solved(solution, params)
    return solution


def _check_solved(solution: BalanceSolution, params: dict[str, Tensor]) -> None:
    """``ValueError`` naming the first parameter with a NaN or infinite entry, or when the
    squares overflow float64 (``F(0)`` is not finite)."""
    if not math.isfinite(float(solution.norm_sq_before[0])):  # NaN/inf (or a float64 overflow)
        check_finite_params(params)
        raise ValueError("the squared parameters overflow float64; nothing was modified")


def solved_in_range(
    params: dict[str, Tensor], structure: GaugeStructure, tol: float, max_iter: int, e: int
) -> tuple[BalanceSolution, int]:
    """``(solution, e')``: :func:`solve_balance` on the bound ``params`` (this process's
    slices) times ``2^-e'`` (``h`` does not scale), where ``e`` (:func:`scale_exponent`) brings
    the largest ``|entry|`` just below ``2^256``. Scaled up (``e < 0``) always; scaled down
    (``e' = e > 0``) only when the squares overflow float64 unscaled (up to about ``2^512``
    they fit, and scaling would underflow the squares of entries far below the largest): then
    a generator lost to that underflow is refused (:func:`_refuse_lost`). Checked as
    :func:`solve_model`."""
    tensors, local = local_view(params, structure)
    used = min(e, 0)
    solution = solve_balance(
        masses_of(scaled(tensors, used) if used else tensors, local), tol, max_iter
    )
    if e > 0 and not math.isfinite(float(solution.norm_sq_before[0])):
        check_finite_params(params)  # a NaN or inf entry: refused, naming it
        used = e
        solution = solve_balance(masses_of(scaled(tensors, e), local), tol, max_iter)
        _refuse_lost(tensors, local, solution.live[0])
    _check_solved(solution, params)
    return solution, used


def _refuse_lost(tensors: dict[str, Tensor], structure: GaugeStructure, live: Tensor) -> None:
    """``ValueError`` when a generator that is dead at the solve's scale (``live``: ``[N]``,
    the parameters brought down by a power of two, their squares overflowing float64) has a
    closed orbit on the parameters' zero pattern: its entries' squares underflow there only
    because of the scaling."""
    if bool(live.all()):
        return
    pattern = masses_of({k: (t != 0).to(torch.float64) for k, t in tensors.items()}, structure)
    closed = closed_orbits(pattern, pattern.at(torch.zeros_like(live, dtype=torch.float64)[None]))
    lost = torch.nonzero(closed[0] & ~live.to(closed.device)).reshape(-1).tolist()
    if lost:
        raise ValueError(
            f"the squared parameters overflow float64, and scaled to where they do not, the "
            f"squares of {len(lost)} live generator(s) (first {lost[:10]}) underflow: entries "
            f"too far below the largest; nothing was modified"
        )


def _unscaled(norm_sq: float, exponent: int) -> float:
    """``norm_sq 4^exponent`` (``inf`` beyond float64)."""
    try:
        return math.ldexp(norm_sq, 2 * exponent)
    except OverflowError:
        return math.inf


def _result(
    solution: BalanceSolution,
    tensors: dict[str, Tensor],
    structure: GaugeStructure,
    exponent: int,
    tol: float,
) -> BalanceResult:
    """The :class:`BalanceResult` of ``solution`` applied to the bound ``tensors`` (this
    process's slices), measured on them times ``2^-exponent`` in float64, as solved: ``converged``
    also needs every live ``S_n`` at least :data:`TINY` ``/ tol`` (below, the squares are
    subnormal and ``mu_n`` lacks the digits to meet ``tol``)."""
    s_in, s_out, norm_after = generator_sums(
        scaled(tensors, exponent) if exponent else tensors, structure, torch.float64
    )
    h, live = solution.h[0], solution.live[0]
    # an unmoved model's ||theta||^2 is one sum: the solve's F(0) adds the squares in another
    # order, whose rounding can exceed what F decreased by near the balance
    norm_before = torch.where(h.any(), solution.norm_sq_before[0], norm_after)
    s = s_in + s_out
    unresolved = (live & (s < TINY / tol)).any()
    stats = torch.stack(
        [max_rel(s_in - s_out, s, live), unresolved, norm_before, norm_after]
    ).tolist()  # one host read
    return BalanceResult(
        iterations=solution.iterations,
        mu_rel_max=stats[0],
        norm_sq_before=_unscaled(stats[2], exponent),
        norm_sq_after=_unscaled(stats[3], exponent),
        h=h,
        dead_generators=torch.nonzero(~live).reshape(-1),
        converged=bool(solution.converged[0]) and not stats[1],
    )


@torch.no_grad()
def balance_(
    model: nn.Module,
    structure: GaugeStructure,
    tol: float = 1e-10,
    max_iter: int = 50,
    optimizer: Optimizers = None,
) -> BalanceResult:
    """Move ``model`` in place to the minimal-norm point of its gauge orbit, where ``mu = 0``.

    Minimises the strictly convex ``F(h) = ||g(h) . theta||^2`` (gradient ``2 mu``, Hessian
    ``4 K``) in float64 by Newton's method, ``h -= t K^{-1} mu / 2``, with ``K`` solved by
    Jacobi-preconditioned conjugate gradients and the step ``t`` found by a line search on ``F``
    (see :func:`solve_balance`). Stops when ``max |mu_n| / S_n <= tol``. Parameters whose
    largest ``|entry|`` is below ``2^-256``, or whose squares overflow float64, are solved on
    copies scaled by a power of two to just below ``2^256`` (as :func:`gaugefix.gauge_coordinates`
    does; ``h`` does not scale), and ``h`` is applied to the parameters; scaled down, a
    generator whose entries' squares underflow only there is refused.

    Dead generators (all incoming or all outgoing entries zero, alone or as a group,
    :func:`closed_orbits`) have no closed orbit: they keep ``h = 0`` and are reported.
    Gradients in ``.grad`` and, when ``optimizer`` is given, its
    state are transported (as :func:`gaugefix.apply_gauge_` does). Everything is validated
    first; on error nothing is modified (a solution whose factors could overflow a moved
    tensor's dtype or underflow their own, :func:`gaugefix.action.overflowing`, is refused).
    Not reaching ``tol`` within ``max_iter`` iterations is no error (the rule of every Newton
    solve in gaugefix): the step found is applied and ``converged`` is false. Parameters with
    ``requires_grad=False`` move like the others (``mu = 0`` needs them); ``equalize_`` with the
    ``"norm"`` objective leaves the generators touching them alone.
    """
    check_types(model, structure)
    params = structure.bind(model, sharded=True)
    refuse_gathered(model, params)
    refuse_quantized(params)  # the finite check waits for the solve: it reads every entry
    agreed(
        params,
        {"tol or max_iter": 2, OPTIMIZER: 1},
        lambda: (check_tolerances(tol, max_iter), check_transport(optimizer, params)),
        lambda _: (torch.tensor([tol, max_iter], dtype=torch.float64), optimizer_passed(optimizer)),
    )
    n = structure.num_generators
    if n == 0:
        check_finite_params(params)
        empty = torch.zeros(0, dtype=torch.long)
        return BalanceResult(0, 0.0, 0.0, 0.0, torch.zeros(0, dtype=torch.float64), empty, True)
    tensors, local = local_view(params, structure)
    like = first_dtensor(list(params.values())) if sharded(params.values()) else None
    e = scale_exponent(tensors, to=SAFE_EXPONENT, like=like)
    solution, e = solved_in_range(params, structure, tol, max_iter, e)
    move_(params, structure, solution.h[0], optimizer)
    return _result(solution, tensors, local, e, tol)
