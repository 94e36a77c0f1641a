"""Analytic predictions and measurements: relaxation rates of the imbalance modes, the exact
one-step change of ``mu`` under gradient descent, and the sharpness (top Hessian eigenvalue) of
the loss by Hessian-vector products."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from gaugefix.action import all_finite
from gaugefix.coordinates import generator_pairing, generators_gram, normalised
from gaugefix.distributed import refuse_sharded, sharded
from gaugefix.errors import check_count, check_number, first_line
from gaugefix.moment import imbalance, in_out_sums
from gaugefix.precision import frozen_randomness
from gaugefix.structure import GaugeStructure

__all__ = [
    "predicted_imbalance_change",
    "relaxation_rates",
    "RelaxationRates",
    "sharpness",
    "SharpnessResult",
]

# -- relaxation of the imbalance modes --------------------------------------------------------

# The shift-invert point of the smallest rates, below 0 by this fraction of K's largest diagonal
# entry: K is positive semi-definite, so K + SHIFT max_n S_n I is positive definite (its LU never
# fails, also where K is singular) and its smallest eigenvalues are K's nearest.
SHIFT = 1e-10
# ARPACK's tolerance for the smallest rates where its full precision does not converge (a
# cluster of rates near 0, as an ill-conditioned K has): shift-invert gives each k - shift to
# this relative precision, so a rate near 0 (k - shift ~ SHIFT max_n S_n) to eps max_n S_n, a
# dense eigh's; Rayleigh-Ritz then refines them, and RESIDUAL checks them.
INVERT_TOL = float(np.finfo(np.float64).eps) / SHIFT
# The largest residual ||K u - k u|| of a sparse eigenpair, relative to the largest rate found:
# above it, the pairs are refused (they are exact to rounding, ~1e-16, where ARPACK converges).
RESIDUAL = 1e-10


@dataclass(frozen=True)
class RelaxationRates:
    """Predicted decay rates of the imbalance modes under soft gauge fixing of strength
    ``lambda``: ``d mu / dt = -2 lambda K mu``, so the component of ``mu`` along an eigenvector
    ``u_i`` of ``K`` decays as ``exp(-rate_i t)`` with ``rate_i = 2 lambda k_i`` (``K`` frozen).

    ``K`` is that of the generators :func:`gaugefix.relax_` moves (``A``: none acting on a
    frozen parameter, none with one side all zero and the other not); the held ones (``F``)
    move no entry, so ``d mu / dt = -2 lambda K P_A mu`` and ``u = (u_A, 0)``, ``u_A`` an
    eigenvector of ``K_AA``, is a left eigenvector: ``<u, mu>`` decays at ``2 lambda k``.

    ``rates``: ``[k]`` float64, ascending; ``modes``: ``[num_generators, k]``, the unit
    eigenvectors (column ``i`` belongs to ``rates[i]``, zero on the held generators);
    ``complete``: whether all ``|A|`` rates are present (else the first half of ``rates`` are
    the smallest, the second half the largest). ``slowest_generator`` /
    ``fastest_generator``: the generator with the largest ``|component|`` in the slowest /
    fastest mode, and ``slowest_layer`` / ``fastest_layer`` the layer producing it (``None``
    without moving generators).
    """

    rates: Tensor
    modes: Tensor
    complete: bool
    slowest_generator: int | None
    fastest_generator: int | None
    slowest_layer: str | None
    fastest_layer: str | None


def _sparse_extremes(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest and ``k`` largest eigenpairs of the sparse ``K`` (``2 k < N``), on the
    CPU as SciPy requires. A generator with ``S_n = 0`` has a zero row of ``K``: an exact zero
    rate with its unit vector as mode (``K = 0``: all of them). The rest come from ``K`` without
    those rows (:func:`_live_extremes`)."""
    from scipy.sparse import coo_matrix

    n = gram.shape[0]
    idx = gram.indices().cpu().numpy()
    mat = coo_matrix((gram.values().cpu().numpy(), (idx[0], idx[1])), shape=gram.shape).tocsc()
    diag = mat.diagonal()
    dead, live = np.flatnonzero(diag == 0), np.flatnonzero(diag > 0)
    low = k - min(k, dead.size)  # the smallest rates that are not a dead generator's
    high = min(k, live.size)
    vals, sub = _live_extremes(mat[live][:, live], low, high)
    zeros = dead[: 2 * k - low - high]
    vecs = np.zeros((n, zeros.size + vals.size))
    vecs[zeros, np.arange(zeros.size)] = 1.0
    vecs[live, zeros.size :] = sub
    vals = np.concatenate([np.zeros(zeros.size), vals])
    order = np.argsort(vals, kind="stable")
    return torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy())


def _live_extremes(mat: Any, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``low`` smallest and ``high`` largest eigenpairs (``low + high <= m``) of the sparse
    ``[m, m]`` positive semi-definite ``mat`` with a positive diagonal: by a dense ``eigh`` when
    ARPACK cannot take them, else by ``eigsh`` from a seeded random start (shift-invert just
    below 0 for the smallest, a sparse LU of the positive definite ``mat + SHIFT max_n S_n I``;
    plain Lanczos for the largest), refined by Rayleigh-Ritz on the span of both: orthonormal
    modes (also where the two ends share a repeated rate), rates to rounding. ``ValueError``
    (naming the dense path) where ARPACK does not converge or a residual exceeds
    :data:`RESIDUAL`."""
    from scipy.sparse.linalg import ArpackError, eigsh

    m = mat.shape[0]
    if low + high >= m - 1:
        vals, vecs = np.linalg.eigh(mat.toarray())
        keep = np.r_[0:low, m - high : m]
        return vals[keep], vecs[:, keep]
    # a random start (seeded): a symmetric one (all ones) meets a repeated eigenvalue's
    # eigenspace, e.g. several dead generators' zero rates, in one direction only
    v0 = np.random.default_rng(0).standard_normal(m)
    top = float(mat.diagonal().max())
    try:
        ends = [eigsh(mat, high, which="LA", v0=v0)[1]]
        if low:
            ends.append(_smallest(mat, low, -SHIFT * top, v0))
    except ArpackError as err:
        raise ValueError(
            f"ARPACK found no extreme rates of K ({first_line(err)}; K's diagonal spans "
            f"{float(mat.diagonal().min()):.3g} to {top:.3g}): take all rates by the dense path "
            f"(k=None, dense_limit >= {m})"
        ) from None
    basis = np.linalg.qr(np.concatenate(ends, axis=1))[0]
    small = basis.T @ (mat @ basis)
    vals, vecs = np.linalg.eigh((small + small.T) / 2)
    vecs = basis @ vecs
    _check_residuals(mat, vals, vecs, m)
    return vals, vecs


def _smallest(mat: Any, low: int, shift: float, v0: np.ndarray) -> np.ndarray:
    """The modes of the ``low`` smallest eigenvalues of ``mat`` by shift-invert at ``shift``:
    to ARPACK's full precision, or where that does not converge (a cluster of rates near 0, as
    an ill-conditioned ``K`` has) to :data:`INVERT_TOL`."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    try:
        return eigsh(mat, low, sigma=shift, which="LM", v0=v0)[1]
    except ArpackNoConvergence:
        return eigsh(mat, low, sigma=shift, which="LM", v0=v0, tol=INVERT_TOL)[1]


def _check_residuals(mat: Any, vals: np.ndarray, vecs: np.ndarray, m: int) -> None:
    """``ValueError`` unless each pair's residual ``||K u - k u||`` (each within that of an
    eigenvalue of ``K``) is at most :data:`RESIDUAL` times the largest ``|k|``."""
    residual = np.linalg.norm(mat @ vecs - vecs * vals, axis=0).max()
    if residual > RESIDUAL * np.abs(vals).max():
        raise ValueError(
            f"ARPACK's extreme rates of K are not exact (residual {residual:.3g} of the largest "
            f"{np.abs(vals).max():.3g}): take all rates by the dense path (k=None, dense_limit "
            f">= {m})"
        )


def _scaled_params(model: nn.Module, structure: GaugeStructure) -> tuple[dict[str, Tensor], int]:
    """The gauged parameters times ``2^-e`` and ``e``, the binary exponent of their largest
    ``|entry|``, which becomes one in ``[1/2, 1)`` (:func:`gaugefix.coordinates.normalised` at
    every scale): ``K(theta) = 4^e K(2^-e theta)`` exactly, ``K`` at this scale keeps its digits
    where ``K(theta)`` would leave float64's normal range (weights below ``1e-154`` or above
    ``1e154``), and ARPACK's convergence test, which has an absolute floor, is the same at every
    scale. Weights that are not real floating point (complex: their imaginary parts would be
    dropped), ``meta`` or not finite are refused (:func:`_check_floats`)."""
    params = structure.bind(model)
    _check_floats(params, "parameter")
    return normalised(params, beyond=0)


def _rate_factor(strength: float, e: int, top: float) -> float:
    """``2 strength 4^e``: the rates are this times the eigenvalues of ``K(2^-e theta)``, the
    largest ``top`` in magnitude. ``ValueError`` where nonzero rates leave float64's normal
    range: past its largest number, or below its smallest normal one (``2.2e-308``), where
    their rounding exceeds the eigensolver's (``eps`` of the largest rate)."""
    if strength == 0.0 or top == 0.0:
        return 0.0
    mantissa, exponent = math.frexp(strength)
    exponent += 1 + 2 * e
    factor = math.ldexp(mantissa, exponent) if exponent <= 1024 else math.inf  # no overflow
    tiny, huge = sys.float_info.min, sys.float_info.max
    if not (factor >= tiny and tiny <= factor * top <= huge):
        power = math.log2(strength) + 1 + 2 * e + math.log2(top)
        raise ValueError(
            f"the relaxation rates 2 * strength * K at strength {strength:g} (the largest "
            f"about 2^{power:.0f}) cannot be given to float64's precision: they, or the "
            "factor 2 * strength on K, leave its normal range (2^-1022 to 2^1024)"
        )
    return factor


# How many of the smallest and of the largest rates relaxation_rates finds by default when the
# model has too many generators for a dense eigendecomposition.
EXTREME_RATES = 6


@torch.no_grad()
def relaxation_rates(
    model: nn.Module,
    structure: GaugeStructure,
    strength: float,
    *,
    k: int | None = None,
    dense_limit: int = 1024,
) -> RelaxationRates:
    """The eigenvalues of ``2 * strength * K`` (``K`` the Gram matrix of the generators at the
    model's parameters, :func:`gaugefix.generators_gram`): the predicted decay rates of the
    imbalance modes under soft gauge fixing, with the slowest and fastest modes located by layer.

    Generators :func:`gaugefix.relax_` holds (acting on a parameter with
    ``requires_grad=False``, or with one side all zero and the other not) are left out: ``K``
    is the Gram matrix of the others, the modes are zero on the held rows (see
    :class:`RelaxationRates`; all held: no rates). With ``k=None`` and ``|A| <= dense_limit``
    (``|A|`` the generators left), all rates by a dense ``eigh`` on the model's device.
    Otherwise (or with an explicit ``k``), the ``k`` smallest and ``k`` largest (``k``
    defaults to :data:`EXTREME_RATES`) by SciPy's ``eigsh`` on a CPU copy of the sparse ``K``;
    when ``2 k >= |A|`` the dense path is used instead. There, a dead
    generator (``S_n = 0``) has its exact zero rate and unit mode, and the modes found are
    refined together by Rayleigh-Ritz: orthonormal, rates to rounding. A zero rate means a
    mode that does not relax (a singular ``K``: see :func:`gaugefix.project`). ``K`` is formed
    from the weights scaled by a power of two (exact: ``K(c theta) = c^2 K(theta)``), so the
    rates are the same to rounding at every scale of the weights. ``ValueError`` for
    weights that are not finite or not real floating point (complex, sparse, ``meta``), for
    rates that leave float64's normal range (weights near ``1e-155`` at strength 1), and where
    ARPACK does not find the extreme rates exactly.
    """
    strength = check_number(strength, "strength")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    if isinstance(dense_limit, bool) or not isinstance(dense_limit, int) or dense_limit < 0:
        raise ValueError(f"dense_limit must be an integer >= 0, got {dense_limit!r}")
    n = structure.num_generators
    empty = torch.zeros(0, dtype=torch.float64)
    if n == 0:
        return RelaxationRates(empty, empty.reshape(0, 0), True, None, None, None, None)
    scaled, e = _scaled_params(model, structure)
    gram = generators_gram(scaled, structure)  # type: ignore[arg-type]  # K(theta) / 4^e
    index = _relaxing(model, structure).nonzero().squeeze(1).to(gram.device)
    if index.numel() == 0:
        return RelaxationRates(empty, empty.reshape(n, 0), True, None, None, None, None)
    gram = gram.index_select(0, index).index_select(1, index).coalesce()  # K_AA
    vals, sub, complete = _spectrum(gram, k, dense_limit)
    vecs = sub.new_zeros(n, sub.shape[1])
    vecs[index] = sub  # zero on the held generators: left eigenvectors of K diag(A)
    slow = int(index[sub[:, 0].abs().argmax()])
    fast = int(index[sub[:, -1].abs().argmax()])
    return RelaxationRates(
        rates=_rate_factor(strength, e, float(vals.abs().max())) * vals,
        modes=vecs,
        complete=complete,
        slowest_generator=slow,
        fastest_generator=fast,
        slowest_layer=structure.generator_layers[slow],
        fastest_layer=structure.generator_layers[fast],
    )


def _relaxing(model: nn.Module, structure: GaugeStructure) -> Tensor:
    """Bool ``[num_generators]``: the generators :func:`gaugefix.relax_` moves, those acting on
    no parameter with ``requires_grad=False`` whose orbit is closed or dead (``S_in`` and
    ``S_out`` both positive or both 0, summed as ``relax_`` sums them). The others are held."""
    params = structure.bind(model)
    frozen = structure.touching([name for name, p in params.items() if not p.requires_grad])
    s_in, s_out = in_out_sums(params, structure)
    return ~frozen & ((s_in == 0) == (s_out == 0)).cpu()


def _spectrum(gram: Tensor, k: int | None, dense_limit: int) -> tuple[Tensor, Tensor, bool]:
    """The ascending eigenvalues ``[j]`` and unit eigenvectors ``[m, j]`` of the sparse
    ``[m, m]`` ``gram`` and whether they are all ``m``: dense where ``k`` is ``None`` and
    ``m <= dense_limit`` or ``2 k >= m``, else the ``k`` smallest and largest
    (:func:`_sparse_extremes`)."""
    m = gram.shape[0]
    if 2 * (k or EXTREME_RATES) >= m or (k is None and m <= dense_limit):
        vals, vecs = torch.linalg.eigh(gram.to_dense())
        return vals, vecs, True
    vals, vecs = _sparse_extremes(gram, k or EXTREME_RATES)
    return vals.to(gram.device), vecs.to(gram.device), False


# -- the exact one-step change of the imbalance -----------------------------------------------


@torch.no_grad()
def predicted_imbalance_change(
    model: nn.Module,
    grads: Mapping[str, Tensor],
    structure: GaugeStructure,
    lr: float,
    weight_decay: float = 0.0,
) -> Tensor:
    """The change ``mu(theta') - mu(theta)`` (``[num_generators]``) under the gradient-descent step
    ``theta' = (1 - lr * wd) theta - lr * g`` from the model's current parameters ``theta``:

        ``(1 - lr * wd)^2 mu(theta) + lr^2 mu(g) - mu(theta) - 2 lr (1 - lr wd) <xi_n, g>``,

    exact for any ``g``. The cross term vanishes when ``g`` is the gradient of a gauge-invariant
    loss (Euler identity), but not for a ``g`` that includes the penalty's gradient
    ``strength K mu`` (as ``.grad`` holds under ``GaugeFixing``'s penalty mode): there it is the
    first-order relaxation ``-2 lr strength K mu``, so it is always computed (``DTensor``
    parameters, which it refuses, get the formula without it: exact for an invariant loss
    only). ``grads`` maps parameter names to ``g`` (without weight decay; e.g. ``{n: p.grad for
    n, p in model.named_parameters()}``). The step is exactly what ``torch.optim.SGD(lr=lr,
    weight_decay=wd)`` without momentum does (coupled L2 ``g + wd theta``), and also SGD with
    decoupled decay. With momentum or Adam the actual change differs: the difference is the
    scale drift the optimizer adds. Gauged parameters that are frozen (``requires_grad=False``)
    or whose gradient is ``None`` (the loss does not reach them) stay in place, as SGD leaves
    them (no step, no decay): their ``theta`` and ``g`` drop out of all terms (``DTensor``
    parameters are then refused with a ``ShardingError``). Accumulated like
    :func:`gaugefix.imbalance` (float64 for float64 tensors). Weights or ``grads`` that are not
    real floating point, not dense (a sparse gradient), on the ``meta`` device or not finite are
    refused (``ValueError`` naming the first), as are ``lr`` and ``weight_decay`` whose
    coefficients ``(1 - lr wd)^2`` or ``lr^2`` leave float64's range.
    """
    lr = check_number(lr, "lr")
    weight_decay = check_number(weight_decay, "weight_decay")
    decay, square, cross = _step_coefficients(lr, weight_decay)
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a mapping name -> tensor, got {type(grads).__name__}")
    absent = [n for n in structure.params if not isinstance(grads.get(n, ...), Tensor | None)]
    if absent:
        raise ValueError(
            f"grads: no tensor for the gauged parameter '{absent[0]}' (got "
            f"{type(grads.get(absent[0])).__name__}); give None for one the loss does not reach"
        )
    params = structure.bind(model, sharded=True)
    _check_floats(params, "parameter")
    still = {n for n, p in params.items() if not p.requires_grad or grads[n] is None}
    grads = {**grads, **{n: torch.zeros_like(params[n]) for n in params if grads[n] is None}}
    _check_floats(structure.bind(grads, sharded=True), "grads:")
    if not still and sharded(params.values()):
        mu = imbalance(model, structure)
        mu_g = imbalance(grads, structure)
        return decay * mu + square * mu_g.to(mu.dtype)
    return _held_change(params, grads, still, structure, (decay, square, cross))


def _step_coefficients(lr: float, weight_decay: float) -> tuple[float, float, float]:
    """``((1 - lr wd)^2 - 1, lr^2, 2 lr (1 - lr wd))``, the coefficients of ``mu(theta)``,
    ``mu(g)`` and ``-<xi_n, g>`` in the change; a one-line ``ValueError`` where one overflows."""
    shrink = 1.0 - lr * weight_decay
    coefficients = (shrink * shrink - 1.0, lr * lr, 2.0 * lr * shrink)
    if not all(math.isfinite(c) for c in coefficients):
        raise ValueError(
            f"the step's coefficients (1 - lr * weight_decay)^2 and lr^2 at lr {lr:g}, "
            f"weight_decay {weight_decay:g} leave float64's range"
        )
    return coefficients


def _held_change(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    still: set[str],
    structure: GaugeStructure,
    coefficients: tuple[float, float, float],
) -> Tensor:
    """:func:`predicted_imbalance_change` where SGD leaves the gauged parameters ``still`` in
    place (none: a plain step), over the entries that move (``theta``, ``g`` zeroed on the
    others), the cross term ``-2 lr shrink <xi_n, g>`` included (needs whole tensors:
    ``ShardingError`` for ``DTensor`` s). ``coefficients``: :func:`_step_coefficients`."""
    refuse_sharded(params)
    decay, square, cross = coefficients
    theta = {n: torch.zeros_like(p) if n in still else p.detach() for n, p in params.items()}
    g = {n: torch.zeros_like(grads[n]) if n in still else grads[n] for n in params}
    mu = imbalance(theta, structure)
    pairing = generator_pairing(theta, g, structure).to(mu.dtype)
    mu_g = imbalance(g, structure).to(mu.dtype)
    return decay * mu + square * mu_g - cross * pairing


def _check_floats(tensors: Mapping[str, Tensor], what: str) -> None:
    """A one-line ``ValueError`` naming the first of ``tensors`` that is not real floating point
    (complex included), not dense (a sparse gradient), on the ``meta`` device (no data), or
    holds NaN or inf (one host read when all are finite)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{what} '{name}' must be a floating-point tensor, got {t.dtype}")
        if t.layout != torch.strided:
            raise ValueError(f"{what} '{name}' must be a dense tensor, got layout {t.layout}")
        if t.is_meta:
            raise ValueError(
                f"{what} '{name}' is on the meta device (it holds no data): materialize it first"
            )
    if not all_finite(list(tensors.values())):
        bad = next(name for name, t in tensors.items() if not all_finite([t]))
        raise ValueError(f"{what} '{bad}' contains NaN or inf")


# -- sharpness --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharpnessResult:
    """The largest (algebraic) eigenvalue ``value`` of the Hessian of the loss with respect to
    all parameters that require grad, and its unit eigenvector ``vector`` (name -> tensor).

    ``iterations``: Hessian-vector products used (the last one measures ``residual``);
    ``residual``: ``||H v - value v||``, computed by that product, so it includes the products'
    rounding (for symmetric ``H`` some eigenvalue lies within ``residual`` of ``value``, to the
    rounding of one product); ``converged``: ``residual <= tol * |value|``. ``float(result)`` is
    ``value``.
    """

    value: float
    vector: dict[str, Tensor]
    iterations: int
    residual: float
    converged: bool

    def __float__(self) -> float:
        return self.value


# The thick restart keeps this fraction of a full cycle's Ritz vectors (the top ones, at least
# one): Wu & Simon's thick-restart Lanczos (SIAM J. Matrix Anal. Appl. 22, 2000), the symmetric
# Krylov-Schur restart. What is kept costs no products and keeps the cluster's directions.
KEPT_FRACTION = 0.5


def _lanczos_top(
    matvec: Callable[[Tensor], Tensor], start: Tensor, iters: int, tol: float, krylov_dim: int
) -> tuple[float, Tensor, int, float]:
    """Largest (algebraic) eigenpair of a symmetric operator on ``[n]`` vectors by thick-restart
    Lanczos with full reorthogonalisation, in a basis of at most ``krylov_dim`` vectors: each
    full cycle is restarted from its top :data:`KEPT_FRACTION` Ritz vectors and the Lanczos
    residual vector (exactly so: the projected matrix becomes ``diag(theta)`` bordered by
    ``beta y_last``), until Lanczos' residual estimate is at most ``tol * |value|`` or ``iters``
    products are spent. A cycle that finds an invariant subspace restarts from its top Ritz
    vector alone. Returns ``(value, unit vector, products, residual)`` with
    ``residual = ||H x - value x||`` measured by one more product: the estimate leaves out the
    products' rounding (a float32 MLP: estimate 4e-15, the value 3e-8 from the top eigenvalue)."""
    size = min(krylov_dim, start.numel())
    basis = start.new_empty(size, start.numel())
    basis[0] = start / torch.linalg.vector_norm(start)
    projected = torch.zeros(size, size, dtype=torch.float64)
    used, kept = 0, 0
    while True:
        full = min(size, kept + iters - used)
        length, beta, w = _lanczos_steps(matvec, basis, projected, kept, full)
        used += length - kept
        evals, evecs = torch.linalg.eigh(projected[:length, :length])
        value = float(evals[-1])
        if beta * abs(float(evecs[-1, -1])) <= tol * abs(value) or used >= iters:
            break
        if w is None:  # an invariant subspace: nothing to extend it with
            basis[0] = _ritz_vector(evecs[:, -1], basis[:length])
            projected.zero_()
            kept = 0
            continue
        kept = max(1, int(KEPT_FRACTION * size))  # < size, as here size < n
        _thick_restart(basis, projected, (evals[-kept:], evecs[:, -kept:]), w / beta, beta)
    x = _ritz_vector(evecs[:, -1], basis[:length])
    residual = _finite_norm(matvec(x) - value * x)
    return value, x, used + 1, residual


def _lanczos_steps(
    matvec: Callable[[Tensor], Tensor], basis: Tensor, projected: Tensor, first: int, full: int
) -> tuple[int, float, Tensor | None]:
    """Lanczos steps on ``basis[first:full]`` (rows orthonormal, ``basis[first]`` given), filling
    rows ``first + 1 ...`` and the tridiagonal part of ``projected = basis H basis^T``; stops at
    an invariant subspace. Returns ``(length, beta, w)``: the basis rows in use and the residual
    ``w`` (``[n]``) of the last step, ``H basis[length - 1]`` minus its projection, with its
    norm ``beta``; ``w`` is ``None`` where it is rounding noise (an invariant subspace)."""
    eps = torch.finfo(basis.dtype).eps
    j = first  # < full
    while True:
        w = matvec(basis[j])
        w_norm = _finite_norm(w)
        projected[j, j] = float(torch.dot(w, basis[j]))
        for _ in range(2):  # classical Gram-Schmidt, twice: full reorthogonalisation
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        # An invariant subspace is found when what is left of H v is rounding noise (or when
        # the basis spans all n dimensions).
        if j + 1 == basis.shape[1] or beta <= 10 * math.sqrt(j + 1) * eps * w_norm:
            return j + 1, beta, None
        if j + 1 == full:
            return j + 1, beta, w
        projected[j, j + 1] = projected[j + 1, j] = beta
        basis[j + 1] = w / beta
        j += 1


def _ritz_vector(coefficients: Tensor, basis: Tensor) -> Tensor:
    """The unit vector ``coefficients @ basis`` (``[length]`` float64 times ``[length, n]``)."""
    x = coefficients.to(basis.dtype).to(basis.device) @ basis
    return x / torch.linalg.vector_norm(x)


def _thick_restart(
    basis: Tensor, projected: Tensor, ritz: tuple[Tensor, Tensor], next_row: Tensor, beta: float
) -> None:
    """In place: ``basis[:k] = Y^T basis`` for the ``k`` kept Ritz pairs ``ritz = (theta [k],
    Y [size, k])`` of a full basis, ``basis[k] = next_row`` (the unit residual direction), and
    ``projected`` = ``diag(theta)`` bordered by ``beta Y[-1]`` in row and column ``k``: as
    ``H basis^T Y = basis^T Y diag(theta) + beta next_row^T Y[-1]``. Column block by column
    block, so the only extra memory is about one ``[n]`` vector."""
    theta, vectors = ritz
    k = theta.numel()
    rotation = vectors.T.to(basis.dtype).to(basis.device)
    block = -(-basis.shape[1] // k)
    for begin in range(0, basis.shape[1], block):
        columns = basis[:, begin : begin + block]
        columns[:k] = rotation @ columns
    basis[k] = next_row
    projected.zero_()
    projected[:k, :k] = torch.diag(theta)
    projected[:k, k] = projected[k, :k] = beta * vectors[-1]


def _finite_norm(w: Tensor) -> float:
    """``||w||`` of a Hessian-vector product (or a residual), or ``ValueError`` if not finite."""
    norm = float(torch.linalg.vector_norm(w))
    if not math.isfinite(norm):
        raise ValueError(
            "a Hessian-vector product is not finite: NaN or inf in the loss, its inputs "
            "or targets, or an overflow"
        )
    return norm


# The seeds torch.Generator.manual_seed takes: [low, high).
SEED_RANGE = (-(2**63), 2**64)


def _check_lanczos(iters: int, tol: float, krylov_dim: int, seed: int) -> None:
    """``ValueError`` unless :func:`sharpness`'s Lanczos settings are usable."""
    check_count(iters, "iters")
    if check_count(krylov_dim, "krylov_dim") < 2:  # one vector per cycle never moves
        raise ValueError(f"krylov_dim must be an integer >= 2, got {krylov_dim!r}")
    check_number(tol, "tol", strict=True)
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed < high:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, checked: some, of one real floating dtype, finite, none
    sharded."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no parameters that require grad")
    refuse_sharded(named)
    dtypes = {p.dtype for p in named.values()}
    if len(dtypes) > 1:
        raise ValueError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")
    _check_floats(named, "parameter")
    return named


# The start of the RuntimeError torch raises where a forward-mode derivative writes into a zero
# tangent (F.mse_loss's, reduction "mean", in torch 2.13).
ZERO_TANGENT = "ZeroTensors are immutable"


def _hessian_product(loss_at: Callable[[Tensor], Tensor], flat: Tensor, v: Tensor) -> Tensor:
    """``H v``, ``H`` the Hessian of ``loss_at`` at ``flat``, by forward-over-reverse
    differentiation; ``ValueError`` where an operation lacks a forward-mode derivative, or
    has one that fails (torch's for ``F.mse_loss`` with ``reduction="mean"`` writes into a
    zero tangent)."""
    try:
        return jvp(grad(loss_at), (flat,), (v,))[1]
    except NotImplementedError as err:  # no fallback: double backward can be wrong
        raise ValueError(
            "a Hessian-vector product needs forward-mode differentiation (jvp of grad), which "
            f"an operation of the model or loss lacks ({first_line(err)})"
        ) from None
    except RuntimeError as err:
        if not str(err).startswith(ZERO_TANGENT):
            raise
        raise ValueError(
            "torch's forward-mode derivative of an operation of the model or loss failed "
            f"({first_line(err)}); F.mse_loss with reduction='mean' does: write the loss as "
            "F.mse_loss(output, target, reduction='sum') / output.numel() or "
            "((output - target) ** 2).mean()"
        ) from None


def sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor | tuple[Any, ...],
    targets: Any,
    *,
    iters: int = 200,
    tol: float = 1e-6,
    krylov_dim: int = 20,
    seed: int = 0,
) -> SharpnessResult:
    """The sharpness of ``loss = loss_fn(model(*inputs), targets)``: the largest eigenvalue of
    its Hessian with respect to every parameter that requires grad, at the current parameters.

    Hessian-vector products by forward-over-reverse differentiation (``torch.func.jvp`` of
    ``torch.func.grad`` of a ``functional_call``), so no Hessian is ever formed; the eigenvalue
    by thick-restart Lanczos (:func:`_lanczos_top`) from a seeded random start, stopping when the
    residual estimate is at most ``tol * |value|`` or after ``iters`` products; one more product
    measures the returned ``residual``, rounding included. Memory: about
    ``krylov_dim + 4`` copies of the parameter vector (in the parameters' dtype) besides the
    products' own activations. In float32 the residual cannot go much below ``1e-6 |value|``.

    The model is not modified: parameters, ``.grad`` and buffers stay as they were (buffers are
    copied, so a BatchNorm in training mode uses batch statistics and updates only the copies),
    and the global random state is restored; every product reuses the same random state, so
    dropout masks are the same in all of them. The loss is evaluated in the model's current
    mode (``train()`` / ``eval()``). Parameters that are not finite or not real floating point
    (complex), a ``seed`` ``torch.Generator`` does not take, an operation without a
    forward-mode derivative (``weight_norm``'s kernel), or a non-finite Hessian-vector product
    raise ``ValueError``.
    """
    _check_lanczos(iters, tol, krylov_dim, seed)
    named = _trainable(model)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    shapes = [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    with frozen_randomness(flat.device) as reset:

        def loss_at(vector: Tensor) -> Tensor:
            pieces = vector.split(sizes)
            params = {n: t.view(s) for n, t, s in zip(named, pieces, shapes, strict=True)}
            state = {**{n: b.clone() for n, b in buffers.items()}, **params}
            reset()
            return loss_fn(functional_call(model, state, args), targets)

        hvp = functools.partial(_hessian_product, loss_at, flat)
        generator = torch.Generator(device=flat.device).manual_seed(seed)
        start = torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device)
        value, vector, used, residual = _lanczos_top(hvp, start, iters, tol, krylov_dim)

    pieces = vector.split(sizes)
    return SharpnessResult(
        value=value,
        vector={n: t.view(s).clone() for n, t, s in zip(named, pieces, shapes, strict=True)},
        iterations=used,
        residual=residual,
        converged=residual <= tol * abs(value),
    )
