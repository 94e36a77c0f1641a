"""Gauge-adapted coordinates, the Gram matrix ``K`` of the orbit generators, and the orthogonal
projections onto the gauge (vertical) directions and their complement (horizontal).

Notation (DESIGN.md section 2): ``g(h)`` multiplies entry ``e`` by ``exp(h_row(e) - h_col(e))``;
the generator of neuron ``n`` is ``xi_n = +theta`` on ``in(n)``, ``-theta`` on ``out(n)``, so a
combination is ``(sum_n c_n xi_n)_e = (c_row(e) - c_col(e)) theta_e`` (a missing side counts 0);
``K_nm = <xi_n, xi_m>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gaugefix.action import check_finite_params
from gaugefix.fixing import _pcg, solve_balance
from gaugefix.moment import PairMasses, scatter_slots
from gaugefix.structure import GaugeStructure


class SingularGramError(ValueError):
    """``K`` is singular: some combination of generators vanishes, so the vertical subspace has
    lower dimension than the number of gauge neurons. ``neurons`` lists the neurons involved."""

    def __init__(self, message: str, neurons: list[int]) -> None:
        super().__init__(message)
        self.neurons = neurons


# -- the group action on plain tensors --------------------------------------------------------


def _extended(h: Tensor, device: torch.device) -> Tensor:
    """``h`` (``[N]``) in float64 on ``device`` with a trailing 0 for the dummy slot ``N``."""
    h = h.to(device=device, dtype=torch.float64)
    return torch.cat([h, h.new_zeros(1)])


def _factors(structure: GaugeStructure, h: Tensor, device: torch.device) -> dict[str, Tensor]:
    """Per parameter, ``h_row - h_col`` (float64, broadcastable to the parameter's shape)."""
    hx = _extended(h, device)
    out = {}
    for m in structure.device_maps(device):
        row = hx[m.rows] if m.rows is not None else hx.new_zeros(())
        col = hx[m.cols] if m.cols is not None else hx.new_zeros(())
        out[m.name] = row - col
    return out


def gauge_tensors(
    tensors: Mapping[str, Tensor], structure: GaugeStructure, log_alpha: Tensor
) -> dict[str, Tensor]:
    """``g(log_alpha) . theta`` out of place: every parameter of ``structure`` in ``tensors``
    multiplied entrywise by ``exp(log_alpha[row] - log_alpha[col])``, computed in float64 and
    rounded once to the tensor's dtype. Returns new tensors for the structure's parameters."""
    bound = structure.bind(dict(tensors))
    if not bound:
        return {}
    device = next(iter(bound.values())).device
    exponents = _factors(structure, log_alpha, device)
    return {
        name: (t.detach().to(torch.float64) * torch.exp(exponents[name])).to(t.dtype)
        for name, t in bound.items()
    }


# -- gauge-adapted coordinates ----------------------------------------------------------------


@dataclass(frozen=True)
class GaugeCoordinates:
    """The factorisation ``theta = g(log_alpha) . theta_bar`` with ``mu(theta_bar) = 0``.

    ``balanced``: a state dict (the model's ``state_dict()`` keys, detached copies) holding the
    minimal-norm representative ``theta_bar`` of the orbit in the gauged parameters and the
    model's own values everywhere else; ``log_alpha``: ``[num_neurons]`` float64, the pure-gauge
    coordinate ``h``; ``dead_neurons``: neurons without a closed orbit (all incoming or all
    outgoing entries zero), whose ``log_alpha`` is 0 and which are left out of the balancing;
    ``max_rel_imbalance``: ``max_n |mu_n(theta_bar)| / S_n`` over the other neurons;
    ``aliases``: state-dict keys of tied parameters -> the name the structure uses for them
    (they always hold the same values as that name).

    Under a gauge transformation ``g(h0)`` of the model, ``balanced`` is unchanged and
    ``log_alpha`` becomes ``log_alpha + h0`` (exactly, when there are no dead neurons).
    """

    balanced: dict[str, Tensor]
    log_alpha: Tensor
    dead_neurons: Tensor
    max_rel_imbalance: float
    structure: GaugeStructure
    aliases: dict[str, str] = field(default_factory=dict)

    def to_state_dict(self) -> dict[str, Tensor]:
        """The inverse map: ``g(log_alpha) . balanced`` as a new state dict (same keys)."""
        out = {k: v.clone() for k, v in self.balanced.items()}
        out.update(gauge_tensors(self.balanced, self.structure, self.log_alpha))
        out.update({k: out[name].clone() for k, name in self.aliases.items()})
        return out


@torch.no_grad()
def gauge_coordinates(
    model: nn.Module,
    structure: GaugeStructure,
    *,
    tol: float = 1e-13,
    max_iter: int = 100,
    allow_dead: bool = False,
) -> GaugeCoordinates:
    """The gauge-adapted coordinates ``(theta_bar, h)`` of ``model``'s parameters, with
    ``theta = g(h) . theta_bar`` and ``mu(theta_bar) = 0`` (DESIGN.md section 2).

    ``theta_bar`` minimises ``||g(h) . theta||^2`` over the orbit; it is found by the same
    float64 Newton solve as :func:`gaugefix.balance_` (:func:`gaugefix.fixing.solve_balance`) to
    ``max_n |mu_n| / S_n <= tol``, on the parameter values: the model is not modified.

    Dead neurons (all incoming or all outgoing entries zero) have no closed orbit and hence no
    coordinate: by default they raise ``ValueError`` naming them. With ``allow_dead=True`` they
    keep ``h = 0``, are listed in ``dead_neurons``, and the round trip is still exact, but
    ``balanced`` is then only invariant under gauges that are 0 on the dead neurons.
    Raises ``RuntimeError`` when the solve does not reach ``tol`` in ``max_iter`` iterations.
    """
    params = structure.bind(model)
    check_finite_params(params)
    solution = solve_balance(params, structure, tol, max_iter)
    dead = solution.dead_neurons
    if dead.numel() and not allow_dead:
        raise ValueError(
            f"{dead.numel()} dead neuron(s) without a closed orbit (all incoming or all "
            f"outgoing entries zero): {_describe(dead.tolist(), structure)}; pass "
            "allow_dead=True to keep them at log_alpha = 0"
        )
    if not solution.converged:
        raise RuntimeError(
            f"balancing stopped at max |mu_n| / S_n = {solution.max_rel_imbalance:.3g} > "
            f"tol = {tol:g} after {solution.iterations} iterations; raise max_iter or tol"
        )
    state = model.state_dict(keep_vars=True)
    missing = [name for name in params if name not in state]
    if missing:
        raise ValueError(f"parameter '{missing[0]}' is not a key of the model's state_dict()")
    owner = {id(t): name for name, t in params.items()}
    aliases = {k: owner[id(v)] for k, v in state.items() if id(v) in owner and owner[id(v)] != k}
    balanced = {k: v.detach().clone() for k, v in state.items()}
    balanced.update(gauge_tensors(params, structure, solution.log_alpha))
    balanced.update({k: balanced[name].clone() for k, name in aliases.items()})
    return GaugeCoordinates(
        balanced=balanced,
        log_alpha=-solution.log_alpha,
        dead_neurons=dead,
        max_rel_imbalance=solution.max_rel_imbalance,
        structure=structure,
        aliases=aliases,
    )


# -- the Gram matrix of the generators --------------------------------------------------------


def _pair_masses(model: nn.Module, structure: GaugeStructure) -> tuple[PairMasses, list[Tensor]]:
    params = structure.bind(model)
    if not params:
        raise ValueError("the structure has no gauged parameters")
    pm = PairMasses(params, structure)
    masses = pm.weighted(torch.zeros(pm.n, dtype=torch.float64, device=pm.device))
    if not math.isfinite(float(pm.total(masses))):  # one check; name the culprit only on error
        check_finite_params(params)
        raise ValueError("the squared parameters overflow float64")
    return pm, masses


def _gram_entries(pm: PairMasses, masses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """COO indices ``[2, nnz]`` and values of ``K = sum_e w_e (e_r - e_c)(e_r - e_c)^T`` before
    coalescing: pairs with ``r == c`` (gauge invariant) and the dummy slot dropped."""
    n = pm.n
    index, values = [], []
    for w, (_, r, c) in zip(masses, pm.terms, strict=True):
        rr, cc = r.expand(w.shape).reshape(-1), c.expand(w.shape).reshape(-1)
        keep = rr != cc
        rr, cc, ww = rr[keep], cc[keep], w.reshape(-1)[keep]
        i = torch.cat([rr, cc, rr, cc])
        j = torch.cat([rr, cc, cc, rr])
        v = torch.cat([ww, ww, -ww, -ww])
        inside = (i < n) & (j < n)
        index.append(torch.stack([i[inside], j[inside]]))
        values.append(v[inside])
    return torch.cat(index, dim=1), torch.cat(values)


@torch.no_grad()
def generators_gram(model: nn.Module, structure: GaugeStructure) -> Tensor:
    """The Gram matrix ``K_nm = <xi_n, xi_m>`` of the orbit generators at ``model``'s parameters:
    a coalesced sparse COO tensor, float64, ``[num_neurons, num_neurons]``, on the model's device.

    ``K_nn = S_n`` (squared mass of the neuron's incoming and outgoing entries, entries whose row
    and column are the same neuron excluded); ``K_nm = -sum theta_e^2`` over the entries with
    ``{row, col} = {n, m}``. Every structural pair is stored, zero masses included.
    """
    n = structure.num_neurons
    if n == 0:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), [], (0, 0)).coalesce()
    pm, masses = _pair_masses(model, structure)
    index, values = _gram_entries(pm, masses)
    return torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()


def ungrounded_neurons(pm: PairMasses, masses: list[Tensor]) -> Tensor:
    """The neurons spanning the null space of ``K`` (int64, sorted).

    ``K`` is the Laplacian of the graph whose nodes are the neurons plus a ground node (the
    missing side of an entry) and whose edges are the entries of positive mass between distinct
    nodes, with the ground's row and column removed. It is singular exactly when a connected
    component does not reach the ground: a neuron whose entries are all zero or all gauge
    invariant, or a group of neurons coupled only among themselves. Found by propagating
    reachability from the ground, one vectorised pass per graph step.
    """
    n = pm.n
    reached = torch.zeros(n + 1, dtype=torch.bool, device=pm.device)
    reached[n] = True
    edges = []
    for w, (_, r, c) in zip(masses, pm.terms, strict=True):
        rr, cc = r.expand(w.shape).reshape(-1), c.expand(w.shape).reshape(-1)
        keep = (w.reshape(-1) > 0) & (rr != cc)
        edges.append((rr[keep], cc[keep]))
    count = 1
    while True:
        step = torch.zeros(n + 1, dtype=torch.float64, device=pm.device)
        for rr, cc in edges:
            step.index_add_(0, rr, reached[cc].to(torch.float64))
            step.index_add_(0, cc, reached[rr].to(torch.float64))
        reached |= step > 0
        new_count = int(reached.sum())
        if new_count == count:
            break
        count = new_count
    return torch.nonzero(~reached[:n]).reshape(-1)


# -- tangent projections ----------------------------------------------------------------------


def generator_pairing(
    params: Mapping[str, Tensor], vectors: Mapping[str, Tensor], structure: GaugeStructure
) -> Tensor:
    """``b_n = <xi_n, v> = sum_{in(n)} theta_e v_e - sum_{out(n)} theta_e v_e``, ``[N]``, float64
    (entries whose row and column are the same neuron cancel)."""
    first = next(iter(params.values()))
    b = torch.zeros(structure.num_neurons + 1, dtype=torch.float64, device=first.device)
    for m in structure.device_maps(first.device):
        prod = params[m.name].detach().to(torch.float64) * vectors[m.name].to(torch.float64)
        if m.rows is not None:
            scatter_slots(b, m.rows, prod)
        if m.cols is not None:
            scatter_slots(b, m.cols, prod, -1.0)
    return b[: structure.num_neurons]


def generator_combination(
    params: Mapping[str, Tensor], structure: GaugeStructure, coefficients: Tensor
) -> dict[str, Tensor]:
    """``sum_n c_n xi_n`` as name -> float64 tensor: ``(c_row(e) - c_col(e)) theta_e``."""
    first = next(iter(params.values()))
    exponents = _factors(structure, coefficients, first.device)
    return {name: params[name].detach().to(torch.float64) * f for name, f in exponents.items()}


def _describe(neurons: list[int], structure: GaugeStructure, limit: int = 10) -> str:
    shown = ", ".join(f"{n} (layer '{structure.neuron_layers[n]}')" for n in neurons[:limit])
    return shown + (f" and {len(neurons) - limit} more" if len(neurons) > limit else "")


def gram_solve(
    pm: PairMasses,
    masses: list[Tensor],
    b: Tensor,
    structure: GaugeStructure,
    rtol: float = 1e-13,
) -> Tensor:
    """``c = K^{-1} b`` by Jacobi-preconditioned conjugate gradients on the matrix-free ``K``,
    restarted on the residual until the backward error is small:
    ``||b - K c|| <= rtol (||b|| + ||K|| ||c||)`` with ``||K|| <= 2 max_n S_n`` (so ``c`` solves
    a system within relative ``rtol`` of this one; its forward error is at most about
    ``2 rtol cond(K)``).

    Raises :class:`SingularGramError` naming the neurons when ``K`` is singular (checked exactly,
    by :func:`ungrounded_neurons`), and ``RuntimeError`` when the tolerance is not reached.
    """
    bad = ungrounded_neurons(pm, masses)
    if bad.numel():
        raise SingularGramError(
            f"the Gram matrix K of the generators is singular: neuron(s) "
            f"{_describe(bad.tolist(), structure)} have no weight outside the gauge "
            "group (their entries are all zero, or all gauge invariant, or couple them only "
            "among themselves), so their generators are linearly dependent",
            bad.tolist(),
        )
    s_in, s_out = pm.sums(masses)
    diag = s_in + s_out
    k_norm = 2 * float(diag.max())  # ||K||_2 <= max_n (K_nn + sum_m |K_nm|) <= 2 max_n S_n
    b_norm = float(torch.linalg.vector_norm(b))
    c = torch.zeros_like(b)
    residual = b.clone()
    for _ in range(100):
        scale = b_norm + k_norm * float(torch.linalg.vector_norm(c))
        rel = float(torch.linalg.vector_norm(residual)) / max(scale, 1e-300)
        if rel <= rtol:
            return c
        c = c + _pcg(lambda v: pm.gram_matvec(masses, v), residual, diag, rtol=rtol)
        residual = b - pm.gram_matvec(masses, c)
    raise RuntimeError(
        f"the solve with K stopped at a backward error of {rel:.3g} > rtol = {rtol:g}; "
        "K is too ill-conditioned for this tolerance"
    )


def _check_vectors(
    vectors: Mapping[str, Tensor], model: nn.Module, structure: GaugeStructure
) -> None:
    if not isinstance(vectors, Mapping):
        raise TypeError(f"vectors must be a mapping name -> tensor, got {type(vectors).__name__}")
    named = dict(model.named_parameters())
    for name, v in vectors.items():
        if name not in named:
            raise ValueError(f"vectors: '{name}' is not a parameter of the model")
        if not isinstance(v, Tensor) or v.shape != named[name].shape:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"vectors: '{name}' has shape {shape}, expected {tuple(named[name].shape)}"
            )
    for name in structure.params:
        if name not in vectors:
            raise ValueError(f"vectors: no entry for the gauged parameter '{name}'")


@torch.no_grad()
def project(
    vectors: Mapping[str, Tensor],
    model: nn.Module,
    structure: GaugeStructure,
    onto: Literal["vertical", "horizontal"] = "vertical",
    *,
    rtol: float = 1e-13,
) -> dict[str, Tensor]:
    """The Euclidean orthogonal projection of the tangent vector ``v`` (``vectors``: name ->
    tensor) at ``model``'s parameters onto the gauge directions ``V = span{xi_n}``
    (``onto="vertical"``) or onto their orthogonal complement ``H`` (``"horizontal"``).

    ``Pi_V v = sum_n c_n xi_n`` with ``K c = (<xi_n, v>)_n``, solved by :func:`gram_solve` to a
    relative residual ``rtol``; ``Pi_H v = v - Pi_V v``, computed in float64. ``vectors`` must
    hold every parameter of ``structure``; it may also hold other parameters of the model (their
    vertical component is 0, so ``Pi_H`` returns them unchanged). Returns a new dict with the
    same keys, each tensor in its input's dtype and device. Names that are not parameters of the
    model, shapes that differ, or NaN/inf in a gauged parameter's vector raise ``ValueError``
    naming the parameter (other parameters pass through unchecked); a singular ``K`` raises
    :class:`SingularGramError` naming the neurons.
    """
    if onto not in ("vertical", "horizontal"):
        raise ValueError(f"onto must be 'vertical' or 'horizontal', got {onto!r}")
    _check_rtol(rtol)
    _check_vectors(vectors, model, structure)
    if structure.num_neurons == 0:
        return {k: _untouched(v, onto) for k, v in vectors.items()}
    pm, masses = _pair_masses(model, structure)
    params = structure.bind(model)
    b = generator_pairing(params, vectors, structure)
    if not bool(torch.isfinite(b).all()):  # one check; name the culprit only on error
        _name_non_finite(vectors, structure)
    c = gram_solve(pm, masses, b, structure, rtol)
    vertical = generator_combination(params, structure, c)
    out = {}
    for name, v in vectors.items():
        if name not in vertical:
            out[name] = _untouched(v, onto)
            continue
        part = vertical[name].to(v.device)
        if onto == "horizontal":
            part = v.to(torch.float64) - part
        out[name] = part.to(v.dtype)
    return out


def _name_non_finite(vectors: Mapping[str, Tensor], structure: GaugeStructure) -> None:
    for name in structure.params:
        if not bool(torch.isfinite(vectors[name]).all()):
            raise ValueError(f"vectors: '{name}' contains NaN or inf")
    raise ValueError("vectors: <xi_n, v> overflows float64")


def _untouched(v: Tensor, onto: str) -> Tensor:
    """The projection of a parameter no generator touches: 0 vertically, itself horizontally."""
    return torch.zeros_like(v) if onto == "vertical" else v.clone()


def _check_rtol(rtol: float) -> None:
    if not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol <= 0:
        raise ValueError(f"rtol must be a finite number > 0, got {rtol!r}")
