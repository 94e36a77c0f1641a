"""A callable objective of the rescaled parameters, minimised over the gauge ``h`` (one
log-scale per generator; entry ``e`` becomes ``theta_e(h) = exp(sum_n w_n(e) h_n) theta_e``) by
L-BFGS with a strong Wolfe line search, float64 ``h``, finished with approximate Wolfe steps
where that search stalls at ``J``'s rounding; and :func:`sharpness_objective`, the Hessian's top
eigenvalue as such an objective (used by :func:`gaugefix.equalize_`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gaugefix.diagnostics import sharpness
from gaugefix.structure import GaugeStructure

__all__ = [
    "LBFGS_HISTORY",
    "Objective",
    "rescaled",
    "minimize_objective",
    "sharpness_objective",
]

LBFGS_HISTORY = 20  # curvature pairs L-BFGS keeps
# The line search that finishes a stalled L-BFGS (:func:`_approximate_wolfe`): Wolfe's sufficient
# decrease and curvature constants (torch's), Hager and Zhang's approximate-Wolfe decrease
# ``delta``, the rounding of ``J`` relative to ``|J|`` within which a value counts as no increase
# (ROUNDING_ULPS machine epsilons of the coarsest dtype among the objective's value and the
# rescaled parameters: a float32 model's ``J`` carries float32 rounding), the most trials per step.
WOLFE_DECREASE, WOLFE_CURVATURE, APPROXIMATE_DECREASE = 1e-4, 0.9, 0.1
ROUNDING_ULPS = 64
LINE_TRIALS = 30
# The finishing L-BFGS stops after a step moving no ``h_n`` by more than SMALLEST_STEP machine
# epsilons: below the rounding of the rescaled entries, as where the objective's values and
# gradient carry float32 or bfloat16 rounding and ``tol`` is out of reach.
SMALLEST_STEP = 1 / 8
# Convergence also asks the quasi-Newton step to the stationary point, ``-H^-1 g``, to move no
# ``h_n`` by more than MOVE_TOL (a relative change of about 1% in a scale): where ``J`` decreases
# without a minimum, its gradient decays with ``J`` and that step stays of order one. A probe of
# length PROBE_STEP along ``-g`` measures the curvature there (:func:`_settled`).
MOVE_TOL, PROBE_STEP = 1e-2, 1e-3

Objective = Callable[[dict[str, Tensor]], Tensor]
_ValueAndGrad = Callable[[Tensor], tuple[Tensor, Tensor]]


def rescaled(
    params: Mapping[str, Tensor], structure: GaugeStructure, h: Tensor
) -> dict[str, Tensor]:
    """``theta(h)`` for the structure's parameters, differentiable in ``h`` (``[N]``,
    float64): each entry times ``exp(sum_n w_n(e) h_n)``, in the parameter's dtype."""
    hx = torch.cat([h, h.new_zeros(1)])
    out = {}
    for p in structure.plan(h.device):
        t = params[p.name].detach()
        exponent = sum(term.sign * hx[term.slots] for term in p.terms)
        out[p.name] = t * torch.exp(exponent).to(t.dtype)
    return out


def minimize_objective(
    objective: Objective, model: nn.Module, structure: GaugeStructure, tol: float, max_iter: int
) -> tuple[Tensor, int, float, float, bool]:
    """Minimise ``J(h) = objective(theta(h))`` over ``h`` by L-BFGS with a strong Wolfe line
    search, from ``h = 0``, until ``max |dJ/dh_n| <= tol`` or ``max_iter`` iterations; where that
    line search stalls first (:func:`_polish`), L-BFGS goes on with the approximate Wolfe
    conditions. ``objective`` gets every parameter of ``model`` by name (the structure's ones
    rescaled, the others copies) and returns a scalar differentiable in the rescaled ones (one
    that does not depend on them, reading the model's own parameters instead, is refused).
    Returns ``(h, iterations, J(0), J(h), converged)``, ``converged`` as :func:`_settled`
    decides."""
    params = structure.bind(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}

    def value(h: Tensor) -> Tensor:
        j = objective({**base, **rescaled(params, structure, h)})
        if not isinstance(j, Tensor) or not j.is_floating_point() or j.numel() != 1:
            raise ValueError("the objective must return a real floating-point scalar tensor")
        if not bool(torch.isfinite(j).all()):
            raise ValueError("the objective must return a finite value")
        if h.requires_grad and h.numel() and j.grad_fn is None:
            raise ValueError(
                "the objective must be differentiable in the rescaled parameters it is given"
            )
        return j.reshape(())

    def value_and_grad(h: Tensor) -> tuple[Tensor, Tensor]:
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():  # also when equalize_ is called under torch.no_grad()
            j = value(h).to(torch.float64)
        if not h.numel():
            return j.detach(), torch.zeros_like(h)
        # autograd.grad, not backward: nothing accumulates into the ``.grad`` of the model's
        # parameters, which an objective may read besides its argument
        (grad,) = torch.autograd.grad(j, h, allow_unused=True)
        if grad is None:
            raise ValueError(
                "the objective must be differentiable in the rescaled parameters it is given"
            )
        return j.detach(), grad

    h = torch.zeros(structure.num_generators, dtype=torch.float64, requires_grad=True)
    first = value(h.detach())
    before, eps = float(first), resolution([first.dtype, *(p.dtype for p in params.values())])
    opt = torch.optim.LBFGS(
        [h], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
        history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        j, h.grad = value_and_grad(h)
        return j

    if max_iter > 0 and structure.num_generators:
        opt.step(closure)
    iterations = opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0)
    left = max_iter - iterations
    h, more, after, grad, pairs = _polish(value_and_grad, h.detach(), tol, left, eps)
    converged = _settled(value_and_grad, h, grad, pairs, tol)
    return h, iterations + more, before, float(after), converged


def resolution(dtypes: list[torch.dtype]) -> float:
    """The machine epsilon of the coarsest of ``dtypes`` (``2^-52`` float64, ``2^-23``
    float32, ``2^-7`` bfloat16): the relative rounding of ``J`` and of the rescaled entries."""
    return max(torch.finfo(dtype).eps for dtype in dtypes)


def _settled(
    value_and_grad: _ValueAndGrad, h: Tensor, g: Tensor, pairs: list[tuple[Tensor, Tensor]],
    tol: float,
) -> bool:  # fmt: skip
    """Whether ``h`` (``[N]``) is a minimum to ``tol``: ``max |g_n| <= tol``, a positive
    curvature along ``-g`` (one probe of length :data:`PROBE_STEP`, the newest curvature pair
    after the finishing L-BFGS's ``pairs``), and the quasi-Newton step ``-H^-1 g`` of those
    pairs moving no ``h_n`` by more than :data:`MOVE_TOL`. (torch's L-BFGS keeps no pair of
    ``s.y <= 1e-10``, so its pairs can be stale where ``J`` flattens, and are not used.)"""
    if not g.numel() or not bool(g.any()):
        return True
    if float(g.abs().max()) > tol:
        return False
    s = g * (-PROBE_STEP / float(g.abs().max()))
    y = value_and_grad(h + s)[1] - g
    if not float(s @ y) > 0:
        return False
    return float(_two_loop(g, [*pairs[1 - LBFGS_HISTORY :], (s, y)]).abs().max()) <= MOVE_TOL


def _polish(
    value_and_grad: _ValueAndGrad, h: Tensor, tol: float, budget: int, eps: float
) -> tuple[Tensor, int, Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """L-BFGS from ``h`` (``[N]``) whose steps :func:`_approximate_wolfe` takes (values
    rounded to ``eps``, :func:`resolution`), until ``max |dJ/dh_n| <= tol``, ``budget``
    iterations, no step, or a step moving no ``h_n`` by more than :data:`SMALLEST_STEP` ``eps``:
    ``(h, iterations, J(h), dJ/dh, curvature pairs)``.
    torch's strong Wolfe search decides by values alone and stalls where the decrease a step
    promises (``|g|^2 / curvature``) is below ``J``'s rounding, though ``g`` is still exact."""
    j, g = value_and_grad(h)
    pairs: list[tuple[Tensor, Tensor]] = []
    for iteration in range(budget):
        if not g.numel() or float(g.abs().max()) <= tol:
            return h, iteration, j, g, pairs
        d = -_two_loop(g, pairs)  # without pairs -g, scaled as torch's first step
        d = d if pairs else d / max(1.0, float(g.abs().sum()))
        step = _approximate_wolfe(value_and_grad, h, d, j, g, ROUNDING_ULPS * eps)
        if step is None:
            return h, iteration, j, g, pairs
        t, j_new, g_new = step
        s, y = t * d, g_new - g
        if float(s @ y) > 0:
            pairs = [*pairs[1 - LBFGS_HISTORY :], (s, y)]
        h, j, g = h + s, j_new, g_new
        if float(s.abs().max()) <= SMALLEST_STEP * eps:
            return h, iteration + 1, j, g, pairs
    return h, budget, j, g, pairs


def _two_loop(g: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """L-BFGS's two-loop recursion: the inverse-Hessian estimate of the curvature pairs ``(s,
    y)`` (oldest first), scaled by the newest pair's ``s.y / y.y``, times ``g``."""
    q, coefficients = g.clone(), []
    for s, y in reversed(pairs):
        a = (s @ q) / (y @ s)
        coefficients.append(a)
        q -= a * y
    if pairs:
        s, y = pairs[-1]
        q *= (s @ y) / (y @ y)
    for (s, y), a in zip(pairs, reversed(coefficients), strict=True):
        q += (a - (y @ q) / (y @ s)) * s
    return q


def _approximate_wolfe(
    value_and_grad: _ValueAndGrad, h: Tensor, d: Tensor, j0: Tensor, g0: Tensor, rounding: float
) -> tuple[float, Tensor, Tensor] | None:
    """A step ``t`` along ``d`` meeting Wolfe's conditions on ``phi(t) = J(h + t d)`` or Hager
    and Zhang's approximate ones (``phi(t) <= phi(0) + rounding |phi(0)|``, ``(2 delta -
    1) phi'(0) >= phi'(t) >= c2 phi'(0)``: the decrease read off the exact derivative where the
    values differ by less than their rounding), with ``(phi(t), grad)``. Trials from ``t = 1``,
    doubled until a trial ends the descent, then secant steps on ``phi'`` inside the bracket;
    ``None`` when ``d`` is no descent direction or no trial of :data:`LINE_TRIALS` is taken."""
    slope0, value0 = float(g0 @ d), float(j0)
    if not slope0 < 0:
        return None
    lo, hi, t = (0.0, slope0), None, 1.0
    for _ in range(LINE_TRIALS):
        j, g = value_and_grad(h + t * d)
        slope, value = float(g @ d), float(j)
        level = value <= value0 + rounding * abs(value0)
        armijo = value <= value0 + WOLFE_DECREASE * t * slope0
        flat = slope >= WOLFE_CURVATURE * slope0
        if flat and (armijo or (level and slope <= (2 * APPROXIMATE_DECREASE - 1) * slope0)):
            return t, j, g
        if level and not flat:
            lo = (t, slope)
        else:
            hi = (t, slope)
        if hi is None:
            t *= 2
            continue
        width = hi[0] - lo[0]
        secant = lo[0] - lo[1] * width / (hi[1] - lo[1]) if hi[1] > lo[1] else math.nan
        inside = lo[0] + 0.1 * width <= secant <= hi[0] - 0.1 * width
        t = secant if inside else lo[0] + width / 2
    return None


def sharpness_objective(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor | tuple[Any, ...],
    targets: Any,
    **lanczos: Any,
) -> Objective:
    """The objective ``J(h) = lambda_max`` of the Hessian of ``loss_fn(model(*inputs),
    targets)`` (see :func:`gaugefix.sharpness`, which ``lanczos`` is passed to), for
    :func:`equalize_`.

    Along the orbit the Hessian moves by a diagonal congruence, ``H(D theta) = D^-1 H D^-1``
    with ``D = diag(exp(sum_n w_n h_n))``, so with ``v`` the unit top eigenvector
    ``dJ/dh_n = -2 lambda_max sum_e w_n(e) v_e^2`` (envelope theorem): the moment map of the
    eigenvector. The returned scalar has the value ``lambda_max`` and, through each rescaled
    entry ``theta_e``, the gradient ``-2 lambda_max v_e^2 / theta_e``, which gives exactly that
    derivative in ``h``. The maximum eigenvalue is not differentiable where it is degenerate.
    Each evaluation copies ``model`` as it is then (buffers such as BatchNorm's running
    statistics, train/eval mode, which parameters require grad) and gives the copy ``params``.
    """

    def objective(params: dict[str, Tensor]) -> Tensor:
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in probe.named_parameters():
                p.copy_(params[name])
        top = sharpness(probe, loss_fn, inputs, targets, **lanczos)
        out = torch.tensor(top.value, dtype=torch.float64)
        for name, t in params.items():
            if not t.requires_grad or name not in top.vector:
                continue
            theta, v_sq = t.detach().to(torch.float64), top.vector[name].to(torch.float64) ** 2
            if bool(((theta == 0) & (v_sq > 0)).any()):
                raise ValueError(
                    f"'{name}' has exactly zero entries the top eigenvector loads on: the "
                    "sharpness gradient cannot pass through them"
                )
            grad = -2 * top.value * v_sq / torch.where(theta == 0, 1.0, theta)
            out = out + (grad * (t.to(torch.float64) - theta)).sum()
        return out

    return objective
