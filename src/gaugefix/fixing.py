"""Gauge fixing. Hard: :func:`balance_` moves a model to the minimal-norm point of its orbit."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaugefix.action import apply_gauge_, check_finite_params, optimizer_states
from gaugefix.moment import PairMasses
from gaugefix.structure import GaugeStructure


@dataclass(frozen=True)
class BalanceResult:
    """What :func:`balance_` did.

    ``iterations``: outer iterations taken; ``max_rel_imbalance``: ``max_n |mu_n| / S_n`` over
    the neurons with a closed orbit, measured on the model afterwards; ``norm_sq_before`` and
    ``norm_sq_after``: ``||theta||^2`` over the gauged parameters; ``log_alpha``: the gauge
    transformation applied; ``dead_neurons``: neurons with all incoming or all outgoing entries
    zero (no closed orbit; left untouched); ``converged``: whether ``tol`` was reached.
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
    ``4 K``) in float64. While some neuron is far from its local balance, an iteration takes the
    closed-form per-neuron step ``h_n -= log(S_in,n / S_out,n) / 4`` for all neurons at once;
    close to the solution it takes Newton's step ``h -= K^{-1} mu / 2``, solved by
    Jacobi-preconditioned conjugate gradients on the sparse ``K``. Both are safeguarded by a
    backtracking line search on ``F``. Stops when ``max |mu_n| / S_n <= tol``.

    Dead neurons (all incoming or all outgoing entries zero) have no closed orbit: they keep
    ``h = 0`` and are reported. Optimizer state is transported when ``optimizer`` is given.
    Everything is validated first; on error nothing is modified.
    """
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    params = structure.bind(model)
    check_finite_params(params)
    optimizer_states(optimizer, params)
    n = structure.num_neurons
    if n == 0:
        return BalanceResult(
            0, 0.0, 0.0, 0.0, torch.zeros(0), torch.zeros(0, dtype=torch.long), True
        )

    pm = PairMasses(params, structure)
    device = pm.device
    h = torch.zeros(n, dtype=torch.float64, device=device)
    masses = pm.weighted(h)
    s_in, s_out = pm.sums(masses)
    active = (s_in > 0) & (s_out > 0)
    mask = active.to(torch.float64)
    norm_before = float(pm.total(masses))

    iterations = 0
    for iterations in range(max_iter + 1):  # noqa: B007
        s_in, s_out = pm.sums(masses)
        mu, s = s_in - s_out, s_in + s_out
        err = _max_rel(mu, s, active)
        if err <= tol or iterations == max_iter:
            break
        log_ratio = torch.where(active, torch.log(s_in / s_out), torch.zeros_like(s_in))
        if float(log_ratio.abs().max()) > 1.0:
            direction = -0.25 * log_ratio
        else:
            direction = _pcg(
                lambda v, m=masses: pm.gram_matvec(m, v * mask) * mask,
                -0.5 * mu * mask,
                torch.where(active, s, torch.ones_like(s)),
                rtol=min(0.1, err),
            )
        h, masses = _line_search(pm, h, masses, direction, mu)

    apply_gauge_(model, structure, h.to(device), optimizer)
    after = PairMasses(structure.bind(model), structure)
    final = after.weighted(torch.zeros_like(h))
    s_in, s_out = after.sums(final)
    err = _max_rel(s_in - s_out, s_in + s_out, active)
    return BalanceResult(
        iterations=iterations,
        max_rel_imbalance=err,
        norm_sq_before=norm_before,
        norm_sq_after=float(after.total(final)),
        log_alpha=h,
        dead_neurons=torch.nonzero(~active).reshape(-1),
        converged=err <= tol,
    )


def _line_search(
    pm: PairMasses, h: Tensor, masses: list[Tensor], direction: Tensor, mu: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Backtracking (Armijo) on ``F(h + t d)`` from ``t = 1``; ``F`` is convex along the line."""
    f0 = float(pm.total(masses))
    slope = 2 * float(torch.dot(mu, direction))
    t = 1.0
    for _ in range(60):
        trial = h + t * direction
        trial_masses = pm.weighted(trial)
        if float(pm.total(trial_masses)) <= f0 + 1e-4 * t * slope:
            return trial, trial_masses
        t *= 0.5
    return h, masses
