"""Gauge fixing. Hard: :func:`balance_` moves a model to the minimal-norm point of its orbit.
Soft: :class:`OrbitSelectionPenalty` (the functional ``(strength / 4) sum_n mu_n^2``) and
:func:`relax_` (its exact, decoupled orbit step)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gaugefix.action import (
    all_finite,
    apply_gauge_,
    apply_gauge_unchecked_,
    check_finite_params,
    check_log_alpha,
    dense_inner,
    optimizer_states,
)
from gaugefix.moment import (
    MassMatrices,
    MassState,
    PairMasses,
    accumulation_dtype,
    imbalance,
    leading_chunks,
    slot_sums,
)
from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import DeviceMap

# Relative size of a change of F(h) below which its rounding hides it.
_RESOLUTION = 1e-12


@dataclass(frozen=True)
class BalanceResult:
    """What :func:`balance_` did.

    ``iterations``: outer iterations taken; ``max_rel_imbalance``: ``max_n |mu_n| / S_n`` over
    the neurons with a closed orbit, measured on the model afterwards; ``norm_sq_before`` and
    ``norm_sq_after``: ``||theta||^2`` over the gauged parameters; ``log_alpha``: the gauge
    transformation applied; ``dead_neurons``: neurons with all incoming or all outgoing entries
    zero (no closed orbit; left untouched); ``converged``: whether the float64 solve reached
    ``tol`` (the imbalance measured afterwards also carries the parameters' rounding: about
    ``1e-7`` for a float32 model).
    """

    iterations: int
    max_rel_imbalance: float
    norm_sq_before: float
    norm_sq_after: float
    log_alpha: Tensor
    dead_neurons: Tensor
    converged: bool


def _max_rel(mu: Tensor, s: Tensor, active: Tensor) -> float:
    if not bool(active.any()):
        return 0.0
    return float((mu.abs()[active] / s[active]).max())


def _pcg(matvec: Callable[[Tensor], Tensor], b: Tensor, diag: Tensor, rtol: float) -> Tensor:
    """Conjugate gradients with the Jacobi preconditioner for ``A x = b``, ``A`` symmetric
    positive definite on the support of ``b``."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r / diag
    p = z.clone()
    rz = torch.dot(r, z)
    stop = rtol * float(torch.linalg.vector_norm(b))
    for _ in range(max(50, 4 * int(math.sqrt(b.numel())))):
        if float(torch.linalg.vector_norm(r)) <= stop:
            break
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if curvature <= 0:
            break
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * ap
        z = r / diag
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


@dataclass(frozen=True)
class BalanceSolution:
    """The minimiser of ``F(h) = ||g(h) . theta||^2`` found by :func:`solve_balance`.

    ``log_alpha`` (``[num_neurons]``, float64): the gauge ``h`` with ``mu(g(h) . theta) = 0``
    on the neurons with a closed orbit (0 on dead neurons); ``iterations``: outer iterations;
    ``max_rel_imbalance``: ``max_n |mu_n| / S_n`` at ``g(h) . theta`` over the live neurons,
    computed in float64 from the pair masses; ``norm_sq_before`` / ``norm_sq_after``: ``F(0)`` and
    ``F(h)``; ``dead_neurons``: indices of the neurons with all incoming or all outgoing entries
    zero (no closed orbit); ``converged``: whether ``max_rel_imbalance <= tol``.
    """

    log_alpha: Tensor
    iterations: int
    max_rel_imbalance: float
    norm_sq_before: float
    norm_sq_after: float
    dead_neurons: Tensor
    converged: bool
    same_neuron: bool = False  # whether some entry's row and column are the same neuron


def _check_tolerances(tol: float, max_iter: int) -> None:
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")


@torch.no_grad()
def solve_balance(
    tensors: Mapping[str, Tensor],
    structure: GaugeStructure,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> BalanceSolution:
    """The gauge ``h`` that balances ``tensors`` (name -> tensor, bound to ``structure``),
    without modifying them: the minimiser of the strictly convex ``F(h) = ||g(h) . theta||^2``
    (gradient ``2 mu``, Hessian ``4 K``) over the neurons with a closed orbit, in float64.

    Every iteration takes Newton's direction ``-K^{-1} mu / 2``, solved by Jacobi-preconditioned
    conjugate gradients on the sparse ``K``, with a line search on ``F`` that backtracks from the
    full step, or doubles it while ``F`` keeps decreasing (far from the minimiser one exponential
    term dominates ``F`` and the full step only divides it by ``e``), and accepts a decrease of
    ``||mu||`` once the decrease of ``F`` is below rounding. (Closed-form per-neuron steps
    ``h_n -= log(S_in,n / S_out,n) / 4`` for all neurons at once converge like diffusion along a
    deep chain: dozens of iterations for a 20-layer network.) Stops when
    ``max |mu_n| / S_n <= tol``. Dead neurons keep ``h = 0``.
    """
    _check_tolerances(tol, max_iter)
    tensors = structure.bind(dict(tensors))
    n = structure.num_neurons
    if n == 0 or not tensors:
        empty = torch.zeros(n, dtype=torch.float64)
        return BalanceSolution(empty, 0, 0.0, 0.0, 0.0, torch.zeros(0, dtype=torch.long), True)

    mm = MassMatrices(tensors, structure)
    h = torch.zeros(n, dtype=torch.float64, device=mm.device)
    state = mm.at(h)
    active = (state.s_in > 0) & (state.s_out > 0)
    mask = active.to(torch.float64)
    norm_before = float(state.total)
    if not math.isfinite(norm_before):  # non-finite entries: nothing to solve
        return BalanceSolution(
            torch.zeros_like(h),
            0,
            math.nan,
            norm_before,
            norm_before,
            torch.nonzero(~active).reshape(-1),
            False,
            mm.same_neuron,
        )

    iterations, err = 0, 0.0
    closed_form = True  # closed-form per-neuron steps while they pay
    for iterations in range(max_iter + 1):  # noqa: B007
        state.complete()
        mu, s = state.s_in - state.s_out, state.s_in + state.s_out
        err = _max_rel(mu, s, active)
        if err <= tol or iterations == max_iter:
            break
        if closed_form:
            trial = _closed_form_step(mm, state, active, err)
            if trial is not None:
                state, h = trial, trial.h
                continue
            closed_form = False
        direction = _pcg(
            lambda v, st=state: st.gram_matvec(v * mask) * mask,
            -0.5 * mu * mask,
            torch.where(active, s, torch.ones_like(s)),
            # Superlinear forcing, but no tighter than the last step needs: the imbalance
            # after the step is about rtol * err (plus err^2).
            rtol=min(0.1, max(err, 0.1 * tol / err)),
        )
        state = _line_search(mm, state, direction, mu, active)
        h = state.h

    return BalanceSolution(
        log_alpha=h,
        iterations=iterations,
        max_rel_imbalance=err,
        norm_sq_before=norm_before,
        norm_sq_after=float(state.total),
        dead_neurons=torch.nonzero(~active).reshape(-1),
        converged=err <= tol,
        same_neuron=mm.same_neuron,
    )


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

    Dead neurons (all incoming or all outgoing entries zero) have no closed orbit: they keep
    ``h = 0`` and are reported. Optimizer state is transported when ``optimizer`` is given.
    Everything is validated first; on error nothing is modified.
    """
    _check_tolerances(tol, max_iter)
    params = structure.bind(model)
    if structure.num_neurons == 0:
        check_finite_params(params)
    optimizer_states(optimizer, params)
    n = structure.num_neurons
    if n == 0:
        return BalanceResult(
            0, 0.0, 0.0, 0.0, torch.zeros(0), torch.zeros(0, dtype=torch.long), True
        )

    solution = solve_balance(params, structure, tol, max_iter)
    if not math.isfinite(solution.norm_sq_before):  # NaN/inf entries (or a float64 overflow)
        check_finite_params(params)
    h = solution.log_alpha
    check_log_alpha(h, structure)
    apply_gauge_unchecked_(params, structure, h, optimizer_states(optimizer, params))
    s_in, s_out, norm_after = _measured_sums(params, structure, solution.same_neuron)
    active = torch.ones(n, dtype=torch.bool, device=h.device)
    active[solution.dead_neurons] = False
    err = _max_rel(s_in - s_out, s_in + s_out, active)
    return BalanceResult(
        iterations=solution.iterations,
        max_rel_imbalance=err,
        norm_sq_before=solution.norm_sq_before,
        norm_sq_after=float(norm_after),
        log_alpha=h,
        dead_neurons=solution.dead_neurons,
        converged=solution.converged,
    )


def _closed_form_step(
    mm: MassMatrices, state: MassState, active: Tensor, err: float
) -> MassState | None:
    """Every live neuron at once to its own balance, ``h_n += log(S_out,n / S_in,n) / 4``
    (Saul's parallel update): exact for neurons that couple to no other, and far from the
    minimiser it removes the large local imbalances of a random gauge in one pass, where
    Newton's method on the exponentials needs many line-search steps. Returns the new state
    when it at least halves ``F``, or decreases it and halves ``max |mu_n| / S_n``; ``None``
    once it no longer pays (it converges only linearly on coupled neurons, like diffusion)."""
    step = torch.where(active, 0.25 * torch.log(state.s_out / state.s_in), 0.0)
    trial = mm.at(state.h + step)
    mu, s = trial.s_in - trial.s_out, trial.s_in + trial.s_out
    f0, f1 = float(state.total), float(trial.total)
    if not (f1 <= 0.5 * f0 or f1 < f0 and _max_rel(mu, s, active) <= 0.5 * err):
        return None
    return _rebased(mm, trial).complete()


def _measured_sums(
    params: dict[str, Tensor], structure: GaugeStructure, same_neuron: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(S_in, S_out, ||theta||^2)`` of the parameters now, in float64, entries whose row and
    column are the same neuron counting in neither side (one pass of squared sums; the pair
    masses only when such entries exist)."""
    if same_neuron:
        pm = PairMasses(params, structure)
        masses = pm.weighted(torch.zeros(pm.n, dtype=torch.float64, device=pm.device))
        return *pm.sums(masses), pm.total(masses)
    s_in, s_out, total = slot_sums(params, structure, torch.float64)
    n = structure.num_neurons
    return s_in[:n], s_out[:n], total


def _line_search(
    mm: MassMatrices,
    state: MassState,
    direction: Tensor,
    mu: Tensor,
    active: Tensor,
) -> MassState:
    """Backtracking (Armijo) on ``F(h + t d)`` from ``t = 1``; ``F`` is convex along the line.

    When the full step is accepted with a clearly resolved decrease, the step is doubled while
    ``F`` keeps decreasing (Armijo still holding): far from the minimiser a single exponential
    term dominates ``F`` and Newton's full step only divides it by ``e``; near the minimiser
    ``F`` is quadratic, ``F(2) ~ F(0)``, and one extra evaluation stops the doubling.

    Close to the minimiser the decrease of ``F`` (second order in ``mu``) falls below the
    rounding of ``F`` itself; a step whose predicted decrease is unresolvable is accepted when it
    reduces ``||mu||`` over the ``active`` (live) neurons instead. Returns the state at the
    accepted point (the same one when no step is accepted); each trial costs one read of the
    masses.
    """
    h = state.h
    f0 = float(state.total)
    slope = 2 * float(torch.dot(mu, direction))
    mu_norm = float(torch.linalg.vector_norm(mu[active]))
    t = 1.0
    for _ in range(60):
        trial = mm.at(h + t * direction, sums=False)
        f_trial = float(trial.total)
        if f_trial <= f0 + 1e-4 * t * slope:
            doublings = 60 if t == 1.0 else 0  # only a full step is extended
            while doublings and f0 - f_trial > 1e3 * _RESOLUTION * f0:
                longer = mm.at(h + 2 * t * direction, sums=False)
                f_longer = float(longer.total)
                if not (f_longer < f_trial and f_longer <= f0 + 2e-4 * t * slope):
                    break
                t, trial, f_trial = 2 * t, longer, f_longer
                doublings -= 1
            return _rebased(mm, trial)
        if -t * slope <= _RESOLUTION * f0:
            trial.complete()
            if float(torch.linalg.vector_norm((trial.s_in - trial.s_out)[active])) < mu_norm:
                return _rebased(mm, trial)
        t *= 0.5
    return state


def _rebased(mm: MassMatrices, state: MassState) -> MassState:
    """``state``, re-evaluated after moving the base of ``mm`` when ``h`` drifted far from it."""
    base = mm.base
    mm.rebase(state.h)
    return state if mm.base is base else mm.at(state.h, sums=False)


# -- soft gauge fixing ---------------------------------------------------------------------------


def check_strength(value: float, name: str = "strength") -> float:
    """``value`` as a float, or ``ValueError`` unless it is a finite real number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_rate(rate: float | Tensor, structure: GaugeStructure) -> float | Tensor:
    """A scalar rate as a float, or a per-neuron rate ``[num_neurons]`` as a float64 tensor."""
    if not isinstance(rate, Tensor) or rate.dim() == 0:
        return check_strength(float(rate) if isinstance(rate, Tensor) else rate, "rate")
    if tuple(rate.shape) != (structure.num_neurons,) or not rate.is_floating_point():
        raise ValueError(
            f"a per-neuron rate must be a floating tensor of shape ({structure.num_neurons},), "
            f"got {rate.dtype} {tuple(rate.shape)}"
        )
    if not bool(torch.isfinite(rate).all()) or bool((rate < 0).any()):
        raise ValueError("rate must be finite and >= 0 for every neuron")
    return rate.detach().to(torch.float64)


def _closed_form_grads(
    tensors: list[Tensor], maps: list[DeviceMap], mu: Tensor, scale: float | Tensor
) -> list[Tensor]:
    """``scale * (mu_row - mu_col) * theta_e`` for every entry of every tensor (a missing side
    counts as 0), computed in ``mu``'s dtype and returned in each tensor's dtype."""
    mux = torch.cat([mu, mu.new_zeros(1)])
    out = []
    for t, m in zip(tensors, maps, strict=True):
        factor = mux[m.rows] if m.rows is not None else mu.new_zeros(())
        if m.cols is not None:
            factor = factor - mux[m.cols]
        out.append((scale * factor * t.to(mu.dtype)).to(t.dtype))
    return out


def orbit_selection_grad(
    source: nn.Module | dict[str, Tensor], structure: GaugeStructure, strength: float
) -> dict[str, Tensor]:
    """``grad P`` for ``P = (strength / 4) sum_n mu_n^2``, as parameter name -> tensor.

    Closed form, one pass over the parameters: ``dP/dtheta_e = strength (mu_row - mu_col)
    theta_e``, i.e. ``strength * sum_n mu_n xi_n`` (vertical: it never changes the function to
    first order). ``mu`` is accumulated in float32 or better; each gradient has its parameter's
    dtype. Not differentiable (computed under ``no_grad``).
    """
    strength = check_strength(strength)
    with torch.no_grad():
        tensors = structure.bind(source)
        if not tensors:
            return {}
        mu = imbalance(tensors, structure)
        device = mu.device
        grads = _closed_form_grads(
            list(tensors.values()), structure.device_maps(device), mu, strength
        )
    return dict(zip(tensors, grads, strict=True))


@torch.no_grad()
def add_orbit_selection_grad_(
    params: dict[str, Tensor], structure: GaugeStructure, strength: float, names: set[str]
) -> bool:
    """``p.grad += dP/dp`` (:func:`orbit_selection_grad`, ``strength`` already checked) for the
    bound ``params`` named in ``names``, fused: ``mu`` and the finiteness of the parameters
    come from one pass of squared sums, and each gradient is one ``addcmul_``. Returns
    ``False``, adding nothing, when a parameter has a NaN or infinite entry."""
    if not params:
        return True
    n = structure.num_neurons
    dtype = accumulation_dtype(next(iter(params.values())).dtype)
    s_in, s_out, _ = slot_sums(params, structure, dtype)
    finite = bool(torch.isfinite(s_in).all() & torch.isfinite(s_out).all())
    if not finite and not all_finite(list(params.values())):
        return False
    mu = s_in[:n] - s_out[:n]
    mux = torch.cat([mu, mu.new_zeros(1)])
    for m in structure.device_maps(mu.device):
        if m.name not in names:
            continue
        p = params[m.name]
        same_dtype = p.grad is not None and p.grad.dtype == p.dtype == mu.dtype
        blocks = leading_chunks(p, m.rows, m.cols) if m.rows is not None else None
        if same_dtype and blocks is not None and m.cols is not None:
            # Both sides on a large tensor: block by block, the row and the column terms
            # added separately, without a full-size factor.
            row, col = strength * mux[m.rows], -strength * mux[m.cols]
            for block in blocks:
                g, q = p.grad[block], p[block]
                g.addcmul_(q, row[block] if row.shape[0] > 1 else row).addcmul_(q, col)
            continue
        factor = mux[m.rows] if m.rows is not None else mu.new_zeros(())
        if m.cols is not None:
            factor = factor - mux[m.cols]
        factor = strength * factor
        if same_dtype:
            p.grad.addcmul_(p, dense_inner(factor, p.shape))
            continue
        g = (factor * p.to(mu.dtype)).to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g.to(p.grad.dtype))
    return True


class _OrbitSelection(torch.autograd.Function):
    """``P(theta) = (strength / 4) sum_n mu_n(theta)^2`` with the closed-form backward."""

    @staticmethod
    def forward(ctx: Any, structure: GaugeStructure, strength: float, *params: Tensor) -> Tensor:
        tensors = dict(zip(structure.params, params, strict=True))
        mu = imbalance(tensors, structure)
        ctx.structure, ctx.strength = structure, strength
        ctx.save_for_backward(mu, *params)
        return (strength / 4) * mu.square().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        mu, *params = ctx.saved_tensors
        maps = ctx.structure.device_maps(mu.device)
        scale = grad_output.to(mu.dtype) * ctx.strength
        return (None, None, *_closed_form_grads(params, maps, mu, scale))


class OrbitSelectionPenalty:
    """The soft gauge-fixing (orbit-selection) functional ``P = (strength / 4) sum_n mu_n^2``.

    ``penalty(model)`` (or ``penalty(model_or_dict)``) returns ``P`` as a 0-dim tensor in the
    accumulation dtype (float64 for float64 parameters, float32 otherwise), to be added to the
    training loss. Its backward is the closed form ``dP/dtheta_e = strength (mu_row - mu_col)
    theta_e`` (one pass over the parameters, no autograd graph over the entries); the gradient
    is vertical, so adding ``P`` to a loss relaxes the imbalance modes
    (``d mu / dt = -2 strength K mu`` under gradient flow) without changing the function to first
    order. ``grad(model)`` returns that gradient as name -> tensor, and ``add_grad_(model)``
    adds it to the parameters' ``.grad``.
    """

    def __init__(self, structure: GaugeStructure, strength: float) -> None:
        if not isinstance(structure, GaugeStructure):
            raise TypeError(f"structure must be a GaugeStructure, got {type(structure).__name__}")
        self.structure = structure
        self.strength = check_strength(strength)

    def __repr__(self) -> str:
        return (
            f"OrbitSelectionPenalty(strength={self.strength}, neurons={self.structure.num_neurons})"
        )

    def __call__(self, model: nn.Module | dict[str, Tensor]) -> Tensor:
        return self.penalty(model)

    def penalty(self, model: nn.Module | dict[str, Tensor]) -> Tensor:
        """``P`` at the parameters of ``model``: a differentiable 0-dim tensor."""
        tensors = self.structure.bind(model)
        if not tensors:
            return torch.zeros((), dtype=torch.float64)
        # Build the cached index maps outside the autograd.Function (torch.compile friendly).
        self.structure.device_maps(next(iter(tensors.values())).device)
        return _OrbitSelection.apply(self.structure, self.strength, *tensors.values())

    def grad(self, model: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
        """``grad P`` as parameter name -> tensor (see :func:`orbit_selection_grad`)."""
        return orbit_selection_grad(model, self.structure, self.strength)

    @torch.no_grad()
    def add_grad_(self, model: nn.Module) -> None:
        """``p.grad += dP/dp`` for every parameter the structure touches (``.grad`` is created
        where it is ``None``)."""
        params = self.structure.bind(model)
        for name, g in self.grad(params).items():
            p = params[name]
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g.to(p.grad.dtype))


@torch.no_grad()
def relax_(
    model: nn.Module,
    structure: GaugeStructure,
    rate: float | Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """One exact, bounded step along the gauge orbits: ``apply_gauge_(model, g(h))`` with
    ``h = -rate * mu``, and return ``h`` (float64, ``[num_neurons]``).

    This is the decoupled form of soft gauge fixing: the explicit penalty step
    ``theta_e -= rate (mu_row - mu_col) theta_e`` is the first-order expansion of ``g(-rate mu)``,
    and applying the group action instead leaves the function unchanged to rounding for any
    ``rate`` (a float, or one rate per neuron as a ``[num_neurons]`` tensor). Since ``h`` is
    a descent direction of ``F(h) = ||g(h) theta||^2`` (gradient ``2 mu``), the step relaxes the
    imbalance; it is bounded so that it never overshoots:

    - each ``h_n`` is clamped between 0 and the neuron's local closed-form balance
      ``(1/4) log(S_out,n / S_in,n)`` (exact for an isolated neuron: a huge rate balances it in
      one step);
    - neurons couple through shared entries, so the step is then accepted only if neither
      ``||mu||`` (over the neurons with a closed orbit) nor ``F`` increases; otherwise the rate
      is halved and the clamp recomputed (for a small enough rate the step is the unclamped
      ``-rate mu``, along which both strictly decrease). If no halving helps, nothing moves.

    Neurons with an all-zero incoming or outgoing side have no closed orbit and keep ``h = 0``.
    Trial steps are evaluated in float64 on the squared masses, without touching the model.
    ``.grad`` and, when ``optimizer`` is given, its state are transported. Everything is
    validated first; on error nothing is modified.
    """
    params = structure.bind(model)
    rate = _check_rate(rate, structure)
    check_finite_params(params)
    optimizer_states(optimizer, params)
    return relax_unchecked_(model, structure, params, rate, optimizer)


@torch.no_grad()
def relax_unchecked_(
    model: nn.Module,
    structure: GaugeStructure,
    params: dict[str, Tensor],
    rate: float | Tensor,
    optimizer: torch.optim.Optimizer | None,
) -> Tensor | None:
    """The step of :func:`relax_` for callers that validated everything but the finiteness of
    the parameters: ``params = structure.bind(model)``, ``rate`` from ``_check_rate``. Returns
    ``None``, modifying nothing, when a parameter has a NaN or infinite entry (found from the
    squared sums the step needs anyway); otherwise the step ``h``."""
    n = structure.num_neurons
    if not params or n == 0:
        finite = all_finite(list(params.values()))
        return torch.zeros(n, dtype=torch.float64) if finite else None
    if isinstance(rate, Tensor):
        if not all_finite(list(params.values())):
            return None
        optimizer_states(optimizer, params)
        return _searched_orbit_step_(model, structure, params, rate, optimizer)
    h, moves, finite = _certified_orbit_step(params, structure, rate)
    if not finite and not all_finite(list(params.values())):
        return None
    states = optimizer_states(optimizer, params)
    if h is None:
        return _searched_orbit_step_(model, structure, params, rate, optimizer)
    if moves:
        apply_gauge_unchecked_(params, structure, h, states)
    return h


def _searched_orbit_step_(
    model: nn.Module,
    structure: GaugeStructure,
    params: dict[str, Tensor],
    rate: float | Tensor,
    optimizer: torch.optim.Optimizer | None,
) -> Tensor:
    """The step of :func:`relax_` by the bounded search on the float64 pair masses."""
    h = _bounded_orbit_step(PairMasses(params, structure), rate)
    if bool((h != 0).any()):
        apply_gauge_(model, structure, h, optimizer)
    return h


def _certified_orbit_step(
    params: dict[str, Tensor], structure: GaugeStructure, rate: float
) -> tuple[Tensor | None, bool, bool]:
    """``(h, moves, finite)``: the step of :func:`relax_` for a scalar ``rate`` when a cheap
    bound proves that the bounded search would accept ``h = -rate * mu`` at once (else
    ``None``), whether it moves anything, and whether the squared sums are finite (they are
    when every parameter entry is, barring overflow; ``h`` is ``None`` when they are not).

    With ``d = -rate mu`` (live neurons), ``delta = max_e |d_r - d_c| <= 2 rate max|mu|`` and
    ``||K|| <= 2 max_n S_n`` (Gershgorin), the condition ``c = 2 rate max_n S_n
    exp(2 delta) <= 1`` gives ``F(d) <= F(0) - 2 rate ||mu||^2 (1 - c)`` and
    ``mu(d) = (I - 2 rate Kbar) mu`` with ``0 <= 2 rate Kbar <= c I`` (``Kbar``: the mean of
    ``K`` along the segment), so neither ``F`` nor ``||mu||`` increases; and
    ``rate S_n <= 1/2`` keeps ``-rate mu_n`` inside the clamp at the local balance
    (``|log(S_out / S_in)| / 4 >= |mu_n| / (2 S_n)``). Required here with margin 2,
    ``c <= 1/2``. This costs one pass over the parameters (their squares, accumulated like
    :func:`imbalance`: the relative rounding of ``mu`` then moves ``h`` by at most
    ``rate * 1e-7 * S <= 3e-8``, below a float32 entry's rounding) instead of the float64 trial
    evaluations."""
    n = structure.num_neurons
    dtype = accumulation_dtype(next(iter(params.values())).dtype)
    s_in, s_out, _ = slot_sums(params, structure, dtype)
    s_in, s_out = s_in.to(torch.float64), s_out.to(torch.float64)
    finite = torch.isfinite(s_in).all() & torch.isfinite(s_out).all()
    s_in, s_out = s_in[:n], s_out[:n]
    active = (s_in > 0) & (s_out > 0)
    mu = torch.where(active, s_in - s_out, 0.0)
    s_max = torch.where(active, s_in + s_out, 0.0).max()
    bound = 2 * rate * s_max * torch.exp(4 * rate * mu.abs().max())
    h = -rate * mu
    finite, ok, moves = torch.stack([finite, bound <= 0.5, (h != 0).any()]).tolist()
    return (h if finite and ok else None), bool(moves), bool(finite)


def _masses_at(pm: PairMasses, h: Tensor) -> list[Tensor]:
    """The pair masses at gauge ``h``, ``w exp(2 h_r) exp(-2 h_c)``: two broadcast products per
    parameter instead of one exponential per entry."""
    up = torch.cat([torch.exp(2 * h), h.new_ones(1)])
    down = torch.cat([torch.exp(-2 * h), h.new_ones(1)])
    return [w * up[r] * down[c] for w, r, c in pm.terms]


def _bounded_orbit_step(pm: PairMasses, rate: float | Tensor) -> Tensor:
    """The step ``h`` of :func:`relax_` at the masses ``pm`` (float64, ``[n]``)."""
    zero = torch.zeros(pm.n, dtype=torch.float64, device=pm.device)
    masses = [w for w, _, _ in pm.terms]
    s_in, s_out = pm.sums(masses)
    active = (s_in > 0) & (s_out > 0)
    mu = torch.where(active, s_in - s_out, 0.0)
    if isinstance(rate, Tensor):
        rate = rate.to(pm.device)
    local = torch.where(active, 0.25 * torch.log(s_out / s_in), 0.0)
    low, high = local.clamp(max=0.0), local.clamp(min=0.0)
    mu_norm, f0 = torch.linalg.vector_norm(mu), pm.total(masses)
    if float(mu_norm) == 0.0:
        return zero
    scale = 1.0
    for _ in range(64):
        h = torch.clamp(-scale * rate * mu, low, high)
        trial = _masses_at(pm, h)
        t_in, t_out = pm.sums(trial)
        t_norm = torch.linalg.vector_norm(torch.where(active, t_in - t_out, 0.0))
        if bool((t_norm <= mu_norm) & (pm.total(trial) <= f0)):
            return h
        scale *= 0.5
    return zero
