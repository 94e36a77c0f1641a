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
from scipy import optimize, sparse
from torch import Tensor, nn

from gaugefix.action import check_finite_params, check_transport, move_
from gaugefix.distributed import OPTIMIZER, agreed, local_view, optimizer_passed, refuse_gathered
from gaugefix.errors import check_number
from gaugefix.kernels import generator_sums, row_norms
from gaugefix.masses import Masses, MassState
from gaugefix.structure import GaugeStructure

__all__ = [
    "balance_",
    "BalanceResult",
    "check_tolerances",
    "log_ratio",
    "masses_of",
    "pcg",
    "solve_balance",
    "solve_model",
]

# Relative size of a change of F(h) below which its rounding hides it.
RESOLUTION = 1e-12
# The line search's sufficient decrease (Armijo): a step t is accepted when
# F(h + t d) <= F(h) + ARMIJO * t * slope.
ARMIJO = 1e-4
# The most halvings (and doublings) of a line search's step: 2^-60 is far below float64's
# resolution of a step of 1.
LINE_SEARCH_TRIALS = 60
# Conjugate gradients on N generators stop after at most max(CG_MIN_ITERATIONS,
# CG_ITERATIONS_PER_ROOT * sqrt(N)) iterations (Newton's outer iterations continue from an
# inexact solve).
CG_MIN_ITERATIONS = 50
CG_ITERATIONS_PER_ROOT = 4


@dataclass(frozen=True)
class BalanceResult:
    """What :func:`balance_` did.

    ``iterations``: outer iterations taken; ``mu_rel_max``: ``max_n |mu_n| / S_n`` over
    the generators with a closed orbit, measured on the model afterwards (``imbalance_stats``'
    ``mu_rel_max`` without the dead generators, which count 1 there); ``norm_sq_before`` and
    ``norm_sq_after``: ``||theta||^2`` over the parameters the structure acts on (equal when
    nothing moved); ``h``: the gauge transformation applied; ``dead_generators``:
    generators with all incoming or all outgoing entries zero, alone or as a group (no closed
    orbit, :func:`closed_orbits`; left untouched; an entry below about ``1.5e-162``, whose
    square underflows float64, counts as zero);
    ``converged``: whether the float64 solve reached ``tol`` (the imbalance measured afterwards
    also carries the parameters' rounding: about ``1e-7`` for a float32 model).
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
    convex along each line.

    When the full step is accepted with a clearly resolved decrease, the step is doubled while
    ``F`` keeps decreasing (Armijo still holding): far from the minimiser a single exponential
    term dominates ``F`` and Newton's full step only divides it by ``e``; near the minimiser
    ``F`` is quadratic, ``F(2) ~ F(0)``, and one extra evaluation stops the doubling.

    Close to the minimiser the decrease of ``F`` (second order in ``mu``) falls below the
    rounding of ``F`` itself; a step whose predicted decrease is unresolvable is accepted when it
    reduces ``||mu||`` over the live generators instead. Copies that accept no step stay where
    they are. Each trial costs one read of the masses.
    """
    h, f0 = state.h, state.total
    slope = 2 * (mu * direction).sum(1)
    mu_norm = row_norms(torch.where(live, mu, 0.0))
    t = torch.ones_like(f0)
    accepted = torch.zeros_like(runs)
    settled = ~runs | ~torch.isfinite(f0) | (slope == 0)
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
            norm = row_norms(torch.where(live, trial.s_in - trial.s_out, 0.0))
            ok = ok | unresolved & (norm < mu_norm)
        accepted |= ok
        settled |= ok
        if bool(settled.all()):
            break
        t = torch.where(settled, t, 0.5 * t)
    t = torch.where(accepted, t, 0.0)
    if masses.r == 1:  # the last trial is at the accepted point, or nothing moved
        return _rebased(masses, trial if bool(accepted.all()) else state)
    return _rebased(masses, masses.at(h + t[:, None] * direction, sums=False))


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
    slices), checked: ``ValueError`` naming the first parameter with a NaN or infinite entry, or
    when the squares overflow float64. Not reaching ``tol`` is no error: ``converged`` says it
    (the one failure policy of the Newton solves)."""
    tensors, local = local_view(params, structure)  # this process's slices under FSDP2
    solution = solve_balance(masses_of(tensors, local), tol, max_iter)
    if not math.isfinite(float(solution.norm_sq_before[0])):  # NaN/inf (or a float64 overflow)
        check_finite_params(params)
        raise ValueError("the squared parameters overflow float64; nothing was modified")
    return solution


@torch.no_grad()
def balance_(
    model: nn.Module,
    structure: GaugeStructure,
    tol: float = 1e-10,
    max_iter: int = 50,
    optimizer: torch.optim.Optimizer | None = None,
) -> BalanceResult:
    """Move ``model`` in place to the minimal-norm point of its gauge orbit, where ``mu = 0``.

    Minimises the strictly convex ``F(h) = ||g(h) . theta||^2`` (gradient ``2 mu``, Hessian
    ``4 K``) in float64 by Newton's method, ``h -= t K^{-1} mu / 2``, with ``K`` solved by
    Jacobi-preconditioned conjugate gradients and the step ``t`` found by a line search on ``F``
    (see :func:`solve_balance`). Stops when ``max |mu_n| / S_n <= tol``.

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
    params = structure.bind(model, sharded=True)
    refuse_gathered(model, params)
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
    solution = solve_model(params, structure, tol, max_iter)
    tensors, local = local_view(params, structure)
    h = solution.h[0]
    move_(params, structure, h, optimizer)
    s_in, s_out, norm_after = generator_sums(tensors, local, torch.float64)
    # an unmoved model's ||theta||^2 is one sum: the solve's F(0) adds the squares in another
    # order, whose rounding can exceed what F decreased by near the balance
    norm_before = solution.norm_sq_before[0] if bool(h.any()) else norm_after
    live = solution.live[0]
    err = max_rel(s_in - s_out, s_in + s_out, live)
    return BalanceResult(
        iterations=solution.iterations,
        mu_rel_max=float(err),
        norm_sq_before=float(norm_before),
        norm_sq_after=float(norm_after),
        h=h,
        dead_generators=torch.nonzero(~live).reshape(-1),
        converged=bool(solution.converged[0]),
    )
