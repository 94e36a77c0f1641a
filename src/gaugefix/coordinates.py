"""Gauge-adapted coordinates, the Gram matrix ``K`` of the orbit generators, and the orthogonal
projections onto the gauge (vertical) directions and their complement (horizontal).

Notation: ``g(h)`` multiplies entry ``e`` by ``exp(sum_n w_n(e) h_n)``; the generator of ``n`` is
the tangent vector ``xi_n(e) = w_n(e) theta_e``, so a combination is
``(sum_n c_n xi_n)_e = (sum_n w_n(e) c_n) theta_e``; ``K_nm = <xi_n, xi_m> =
sum_e w_n(e) w_m(e) theta_e^2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gaugefix.action import all_finite, check_finite_params, check_h
from gaugefix.balancing import (
    SAFE_EXPONENT,
    TINY,
    check_tolerances,
    check_types,
    masses_of,
    max_rel,
    normalised,
    pcg,
    scale_exponent,
    scaled,
    solved_in_range,
    times_power_of_two,
)
from gaugefix.errors import GaugefixError, check_number
from gaugefix.kernels import generator_sums, reduce_to, row_norms
from gaugefix.masses import MassState
from gaugefix.moment import pair_shape, scatter_terms_
from gaugefix.soft import generator_combination
from gaugefix.structure import GaugeStructure

__all__ = [
    "gauge_coordinates",
    "gauge_tensors",
    "GaugeCoordinates",
    "generators_gram",
    "project",
    "SingularGramError",
]

# The prime modulo which the rank of the integer pattern Gram matrix is taken: its entries and
# their products stay below 2^62, inside int64.
PRIME = 2**31 - 1
# The most restarts of conjugate gradients on the residual in :func:`gram_solve`.
GRAM_RESTARTS = 100
# The most steps of iterative refinement of ``Pi_V v`` on the tangent residual in :func:`project`.
REFINEMENTS = 4
# Relative error of ``g(-h) . g(h) . theta`` from float64 arithmetic alone (a few ulps of the
# exponentials and products), beyond the one unit in the last place of the dtype's rounding.
ROUND_TRIP = 64 * torch.finfo(torch.float64).eps


class SingularGramError(GaugefixError, ValueError):
    """``K`` is singular: some combination of generators vanishes, so the vertical subspace has
    lower dimension than the number of generators. ``generators`` lists those involved."""

    def __init__(self, message: str, generators: list[int]) -> None:
        super().__init__(message)
        self.generators = generators


# -- the group action on plain tensors --------------------------------------------------------


def exponents(structure: GaugeStructure, h: Tensor, device: torch.device) -> dict[str, Tensor]:
    """Per parameter, ``sum_n w_n(e) h_n`` (float64, broadcastable to the parameter's shape)."""
    h = h.to(device=device, dtype=torch.float64)
    hx = torch.cat([h, h.new_zeros(1)])
    return {
        p.name: sum((t.sign * hx[t.slots] for t in p.terms), hx.new_zeros(()))
        for p in structure.plan(device)
    }


def gauge_tensors(
    tensors: Mapping[str, Tensor], structure: GaugeStructure, h: Tensor
) -> dict[str, Tensor]:
    """``g(h) . theta`` out of place: every parameter of ``structure`` in ``tensors`` multiplied
    entrywise by ``exp(sum_n w_n(e) h_n)``, computed in float64 and rounded once to the tensor's
    dtype. Returns new tensors for the structure's parameters. ``h`` must be a finite floating
    tensor ``[num_generators]``, and ``ValueError`` names a finite tensor that ``g(h)`` would
    overflow in its dtype."""
    check_h(h, structure)
    bound = structure.bind(dict(tensors))
    if not bound:
        return {}
    device = next(iter(bound.values())).device
    x = exponents(structure, h, device)
    out = {
        name: (t.detach().to(torch.float64) * torch.exp(x[name])).to(t.dtype)
        for name, t in bound.items()
    }
    if not all_finite(list(out.values())):  # one check; name the culprit only on error
        for name, t in bound.items():
            if all_finite([t]) and not all_finite([out[name]]):
                raise ValueError(f"g(h) overflows '{name}' in {t.dtype}")
    return out


# -- gauge-adapted coordinates ----------------------------------------------------------------


@dataclass(frozen=True)
class GaugeCoordinates:
    """The factorisation ``theta = g(h) . theta_bar`` with ``mu(theta_bar) = 0``.

    ``balanced``: a state dict (the model's ``state_dict()`` keys, detached copies) holding the
    minimal-norm representative ``theta_bar`` of the orbit in the parameters the structure acts
    on and the model's own values everywhere else; ``h``: ``[num_generators]`` float64, the
    pure-gauge coordinate; ``dead_generators``: generators without a closed orbit (all incoming
    or all outgoing entries zero), whose ``h`` is 0 and which are left out of the balancing;
    ``mu_rel_max``: ``max_n |mu_n(theta_bar)| / S_n`` over the other generators, measured on
    ``balanced`` in float64 (so it carries the rounding of ``balanced`` to the parameters'
    dtype: about ``1e-7`` for a float32 model); ``converged``: whether the float64 solve reached
    ``tol``, with every live generator's squared mass at least float64's smallest normal
    number over ``tol`` at the solve's scale (when not, ``theta = g(h) . balanced``
    still holds; only ``mu(balanced) = 0`` is approximate);
    ``aliases``: state-dict keys of tied parameters -> the name the structure uses for them
    (they always hold the same values as that name).

    Under a gauge transformation ``g(h0)`` of the model, ``balanced`` is unchanged and ``h``
    becomes ``h + h0`` (exactly, when there are no dead generators).
    """

    balanced: dict[str, Tensor]
    h: Tensor
    dead_generators: Tensor
    mu_rel_max: float
    converged: bool
    structure: GaugeStructure
    aliases: dict[str, str] = field(default_factory=dict)

    def to_state_dict(self) -> dict[str, Tensor]:
        """The inverse map: ``g(h) . balanced`` as a new state dict (same keys)."""
        out = {k: v.clone() for k, v in self.balanced.items()}
        out.update(gauge_tensors(self.balanced, self.structure, self.h))
        out.update({k: out[name].clone() for k, name in self.aliases.items()})
        return out


@torch.no_grad()
def gauge_coordinates(
    model: nn.Module,
    structure: GaugeStructure,
    *,
    allow_dead: bool = False,
    tol: float = 1e-13,
    max_iter: int = 100,
) -> GaugeCoordinates:
    """The gauge-adapted coordinates ``(theta_bar, h)`` of ``model``'s parameters, with
    ``theta = g(h) . theta_bar`` and ``mu(theta_bar) = 0``.

    ``theta_bar`` minimises ``||g(h) . theta||^2`` over the orbit; it is found by the same
    float64 Newton solve as :func:`gaugefix.balance_` (:func:`gaugefix.balancing.solve_balance`)
    to ``max_n |mu_n| / S_n <= tol``, on the parameter values: the model is not modified.

    Dead generators (all incoming or all outgoing entries zero) have no closed orbit and hence no
    coordinate: by default they raise ``ValueError`` naming them. With ``allow_dead=True`` they
    keep ``h = 0``, are listed in ``dead_generators``, and the round trip is still exact, but
    ``balanced`` is then only invariant under gauges that are 0 on the dead generators.
    Live generators with a stabiliser (a combination of them moves no entry: ``K`` is
    singular on them, see :func:`gaugefix.project`) make ``h`` non-unique: they raise
    :class:`SingularGramError` naming them. A ``balanced`` that the parameters' dtype cannot hold
    (entries taken below its smallest normal number, so that ``to_state_dict()`` would not give
    them back to one unit in the last place) raises ``ValueError`` naming the parameter.
    Not reaching ``tol`` in ``max_iter`` iterations is no error (the rule of every Newton solve
    in gaugefix, :func:`gaugefix.balance_` included): ``converged`` is then false.
    """
    check_tolerances(tol, max_iter)
    check_types(model, structure)
    params = structure.bind(model)
    h, live, converged, e = _solved(params, structure, tol, max_iter)
    dead = torch.nonzero(~live).reshape(-1)
    if dead.numel() and not allow_dead:
        raise ValueError(
            f"{dead.numel()} dead generator(s) without a closed orbit (all incoming or all "
            "outgoing entries zero, alone or as a group whose other entries all point one way): "
            f"{_describe(dead.tolist(), structure)}; pass "
            "allow_dead=True to keep them at h = 0"
        )
    if structure.num_generators:
        _refuse_stabiliser(scaled(params, e) if e else params, structure, live)
    balanced, aliases = _balanced_state(model, params, structure, h)
    mu_rel_max, resolved = _measured(balanced, structure, live, tol, e)
    return GaugeCoordinates(
        balanced=balanced,
        h=-h,
        dead_generators=dead,
        mu_rel_max=mu_rel_max,
        converged=converged and resolved,
        structure=structure,
        aliases=aliases,
    )


def _solved(
    params: dict[str, Tensor], structure: GaugeStructure, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, bool, int]:
    """``(h, live, converged, e)`` of the balancing Newton solve on the bound ``params`` times
    ``2^-e``, the power of two :func:`gaugefix.balance_` takes (``h`` does not scale;
    :func:`gaugefix.balancing.solved_in_range`): the gauge ``[N]`` to the minimal-norm point,
    which generators have a closed orbit, and whether ``tol`` was reached (no generators:
    nothing to solve, the parameters checked finite)."""
    if not structure.num_generators:
        check_finite_params(params)
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), True, 0
    e = scale_exponent(params, to=SAFE_EXPONENT)
    solution, e = solved_in_range(params, structure, tol, max_iter, e)
    return solution.h[0], solution.live[0], bool(solution.converged[0]), e


def _balanced_state(
    model: nn.Module, params: dict[str, Tensor], structure: GaugeStructure, h: Tensor
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(balanced, aliases)``: a copy of ``model``'s state dict with ``g(h)`` applied to the
    bound ``params`` (checked to round-trip, :func:`_refuse_lossy`), and the state-dict keys that
    name a parameter under another key (tied weights) -> that key."""
    state = model.state_dict(keep_vars=True)
    missing = [name for name in params if name not in state]
    if missing:
        raise ValueError(f"parameter '{missing[0]}' is not a key of the model's state_dict()")
    owner = {id(t): name for name, t in params.items()}
    aliases = {k: owner[id(v)] for k, v in state.items() if id(v) in owner and owner[id(v)] != k}
    balanced = {k: v.detach().clone() for k, v in state.items()}
    balanced.update(gauge_tensors(params, structure, h))
    _refuse_lossy(params, balanced, structure, h)
    balanced.update({k: balanced[name].clone() for k, name in aliases.items()})
    return balanced, aliases


def _refuse_stabiliser(params: dict[str, Tensor], structure: GaugeStructure, live: Tensor) -> None:
    """:class:`SingularGramError` naming the live generators that span a null space of ``K``
    restricted to them: a combination ``c`` of them moves no entry (``g(t c) . theta = theta``),
    so ``h`` is not unique along it."""
    entries = _entry_masses(params, structure)
    loose = _loose(entries, structure.num_generators, next(iter(params.values())).device)
    loose = loose[live.to(loose.device)[loose]]
    if _singular(entries, structure.num_generators, loose):
        raise SingularGramError(
            f"generator(s) {_describe(loose.tolist(), structure)} have a stabiliser: some "
            "combination of them moves no entry (their entries are shared only among "
            "themselves, K is singular), so the coordinate h is not unique",
            loose.tolist(),
        )


def _refuse_lossy(
    params: Mapping[str, Tensor],
    balanced: Mapping[str, Tensor],
    structure: GaugeStructure,
    h: Tensor,
) -> None:
    """``ValueError`` naming the first parameter that ``g(-h) . balanced`` does not give back
    to within one unit in the last place of its dtype (plus :data:`ROUND_TRIP` relative, the
    float64 arithmetic): ``balanced`` took entries below the dtype's smallest normal number,
    where its rounding is absolute (a float16 weight of ``1e-4`` divided by ``1e4`` is 0)."""
    back = gauge_tensors({name: balanced[name] for name in params}, structure, -h)
    far = {}
    for name, t in params.items():
        t64, size = t.detach().to(torch.float64), t.detach().abs()
        ulp = torch.nextafter(size, size.new_full((), math.inf)).to(torch.float64) - t64.abs()
        far[name] = (
            (back[name].to(torch.float64) - t64).abs() > ulp + ROUND_TRIP * t64.abs()
        ).any()
    if not far or not bool(torch.stack(list(far.values())).any()):  # one host read
        return
    name = next(name for name, flag in far.items() if bool(flag))
    raise ValueError(
        f"the balanced point cannot be held in {params[name].dtype}: it takes entries of "
        f"'{name}' below the dtype's smallest normal number, where they would not round-trip "
        "(a wider dtype holds them)"
    )


def _measured(
    balanced: Mapping[str, Tensor], structure: GaugeStructure, live: Tensor, tol: float, e: int
) -> tuple[float, bool]:
    """``(max_n |mu_n| / S_n, resolved)`` of ``balanced`` over the ``live`` generators,
    accumulated in float64 (the solve's own value leaves out the rounding of ``balanced`` to
    the parameters' dtype: about ``1e-7`` in float32, ``1e-2`` in bfloat16); ``resolved``:
    every live ``S_n`` at the solve's scale (``balanced`` times ``2^-e``) is at least
    :data:`TINY` ``/ tol``. Below that the squares are subnormal, and ``mu_n`` lacks the digits
    to meet ``tol``."""
    if not structure.num_generators:
        return 0.0, True
    bound = structure.bind(dict(balanced))
    s_in, s_out, _ = generator_sums(scaled(bound, e) if e else bound, structure, torch.float64)
    live = live.to(s_in.device)
    stats = torch.stack(
        [max_rel(s_in - s_out, s_in + s_out, live), (live & (s_in + s_out < TINY / tol)).any()]
    ).tolist()  # one host read
    return stats[0], not stats[1]


# -- the Gram matrix of the generators --------------------------------------------------------


def _masses_at_zero(params: dict[str, Tensor], structure: GaugeStructure) -> MassState:
    """The squared masses of the bound ``params`` (one copy) evaluated at ``h = 0``, with their
    sums."""
    if not params:
        raise ValueError("the structure acts on no parameters")
    masses = masses_of(params, structure)
    state = masses.at(torch.zeros(1, masses.n, dtype=torch.float64, device=masses.device))
    if not math.isfinite(float(state.total[0])):  # one check; name the culprit only on error
        check_finite_params(params)
        raise ValueError("the squared parameters overflow float64")
    return state


def _entry_masses(params: dict[str, Tensor], structure: GaugeStructure) -> list[tuple]:
    """Per parameter, the squared masses of its distinct entries (entries that agree on every
    term map summed) flattened, with each term's flattened slots and sign."""
    out = []
    for param in structure.plan(next(iter(params.values())).device):
        shape = pair_shape(param)
        w = reduce_to(params[param.name].detach().to(torch.float64).square(), shape).reshape(-1)
        out.append((w, [(t.slots.expand(shape).reshape(-1), t.sign) for t in param.terms]))
    return out


@torch.no_grad()
def generators_gram(model: nn.Module, structure: GaugeStructure) -> Tensor:
    """The Gram matrix ``K_nm = <xi_n, xi_m> = sum_e w_n(e) w_m(e) theta_e^2`` of the orbit
    generators at ``model``'s parameters: a coalesced sparse COO tensor, float64,
    ``[num_generators, num_generators]``, on the model's device.

    ``K_nn = S_n`` (the squared mass of the generator's incoming and outgoing entries);
    off the diagonal, entries that two generators act on add ``+theta_e^2`` when they act with
    the same sign and ``-theta_e^2`` with opposite signs. Every structural pair is stored, zero
    masses included.
    """
    if structure.num_generators == 0:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), [], (0, 0)).coalesce()
    return _gram(structure.bind(model), structure)


def _gram(params: dict[str, Tensor], structure: GaugeStructure) -> Tensor:
    """:func:`generators_gram` of the bound ``params`` (``num_generators > 0``)."""
    n = structure.num_generators
    _masses_at_zero(params, structure)  # validates finiteness
    index, values = [], []
    for w, terms in _entry_masses(params, structure):
        for slots_a, sign_a in terms:
            for slots_b, sign_b in terms:
                inside = (slots_a < n) & (slots_b < n)
                index.append(torch.stack([slots_a[inside], slots_b[inside]]))
                values.append(sign_a * sign_b * w[inside])
    return torch.sparse_coo_tensor(
        torch.cat(index, dim=1), torch.cat(values), (n, n), check_invariants=False
    ).coalesce()


def ungrounded_generators(model: nn.Module, structure: GaugeStructure) -> Tensor:
    """The generators that may span a null space of ``K`` (int64, sorted; empty when ``K`` is
    non-singular).

    ``c`` is in the null space of ``K`` exactly when ``sum_n w_n(e) c_n = 0`` on every entry of
    positive mass. An entry that names only one generator whose coefficient is not yet known to
    be 0 forces it to 0 (it is *grounded*); propagated to a fixpoint, one vectorised pass per
    step. A generator left ungrounded has entries that are all zero, or entries it shares only
    with other ungrounded generators; that (small) set is returned when the integer matrix of
    its weights ``w_n(e)`` over the entries of positive mass is rank deficient
    (:func:`_singular`): the sizes of the entries do not enter. Masses are read at the
    parameters scaled by a power of two (:func:`normalised`): a null space does not scale.
    """
    return _ungrounded(normalised(structure.bind(model))[0], structure)


def _ungrounded(params: dict[str, Tensor], structure: GaugeStructure) -> Tensor:
    """:func:`ungrounded_generators` of the bound ``params``."""
    entries = _entry_masses(params, structure)
    loose = _loose(entries, structure.num_generators, next(iter(params.values())).device)
    return loose if _singular(entries, structure.num_generators, loose) else loose[:0]


def _loose(entries: list[tuple], n: int, device: torch.device) -> Tensor:
    """The generators left ungrounded (int64, sorted, on ``device``) by the propagation of
    :func:`ungrounded_generators` over :func:`_entry_masses`'s ``entries``."""
    grounded = torch.zeros(n + 1, dtype=torch.bool, device=device)
    grounded[n] = True
    kept = [[slots[w > 0] for slots, _ in terms] for w, terms in entries]
    while True:
        before = int(grounded.sum())
        for slots in kept:
            open_count = sum((~grounded[s]).to(torch.long) for s in slots)
            for s in slots:
                grounded[s[(open_count == 1) & ~grounded[s]]] = True
        if int(grounded.sum()) == before:
            break
    return torch.nonzero(~grounded[:n]).reshape(-1)


def _singular(entries: list[tuple], n: int, generators: Tensor) -> bool:
    """Whether ``K`` restricted to ``generators`` (the other generators vanish in every null
    vector of ``K``) is singular: exactly when the integer matrix ``M`` of their weights
    ``w_n(e)`` over the entries of positive mass has a null vector, that is when the pattern
    Gram matrix ``M^T M`` has rank below ``len(generators)``, whatever the sizes of the
    entries. The rank is taken modulo :data:`PRIME`: never above the rational rank, so a full
    rank proves ``K`` non-singular."""
    if not generators.numel():
        return False
    gram = _pattern_gram(entries, n, generators)
    return rank_modulo_prime(gram.cpu()) < generators.numel()


def _pattern_gram(entries: list[tuple], n: int, generators: Tensor) -> Tensor:
    """``M^T M``, int64 ``[k, k]`` for the ``k`` ``generators``: ``sum_e w(e) w(e)^T`` over the
    distinct entries of positive mass of :func:`_entry_masses`'s ``entries``, restricted to
    ``generators``."""
    k, device = generators.numel(), generators.device
    local = torch.full((n + 1,), k, dtype=torch.long, device=device)
    local[generators.to(device)] = torch.arange(k, device=device)
    gram = torch.zeros(k * k, dtype=torch.int64, device=device)
    for w, terms in entries:
        slots = [(local[s], sign) for s, sign in terms]
        for a, sign_a in slots:
            for b, sign_b in slots:
                inside = (w > 0) & (a < k) & (b < k)
                pair = a[inside] * k + b[inside]
                gram.index_add_(0, pair, torch.full_like(pair, int(sign_a * sign_b)))
    return gram.reshape(k, k)


def rank_modulo_prime(matrix: Tensor) -> int:
    """The rank over the integers modulo :data:`PRIME` of an int64 ``[m, k]`` matrix by
    Gaussian elimination (one vectorised update of the rows the pivot column meets, per
    column): at most its rank over the rationals (equal unless the prime divides all its
    largest non-zero minors)."""
    m = matrix.remainder(PRIME)
    free = torch.ones(m.shape[0], dtype=torch.bool)
    for col in range(m.shape[1]):
        hits = torch.nonzero((m[:, col] != 0) & free).reshape(-1)
        if not hits.numel():
            continue
        pivot, rest = int(hits[0]), hits[1:]
        free[pivot] = False
        m[pivot] = m[pivot] * pow(int(m[pivot, col]), PRIME - 2, PRIME) % PRIME
        m[rest] = (m[rest] - m[rest, col : col + 1] * m[pivot]) % PRIME
    return int((~free).sum())


# -- tangent projections ----------------------------------------------------------------------


def generator_pairing(
    params: Mapping[str, Tensor], vectors: Mapping[str, Tensor], structure: GaugeStructure
) -> Tensor:
    """``b_n = <xi_n, v> = sum_e w_n(e) theta_e v_e``, ``[N]``, float64."""
    first = next(iter(params.values()))
    n = structure.num_generators
    b_in = torch.zeros(n + 1, dtype=torch.float64, device=first.device)
    b_out = torch.zeros_like(b_in)
    for param in structure.plan(first.device):
        v = vectors[param.name].to(device=first.device, dtype=torch.float64)
        prod = params[param.name].detach().to(torch.float64) * v
        scatter_terms_(b_in, b_out, param, prod, ())
    return (b_in - b_out)[:n]


def _describe(generators: list[int], structure: GaugeStructure, limit: int = 10) -> str:
    shown = ", ".join(
        f"{n} ({structure.generator_kinds[n]} of layer '{structure.generator_layers[n]}')"
        for n in generators[:limit]
    )
    return shown + (f" and {len(generators) - limit} more" if len(generators) > limit else "")


def gram_solve(
    model: nn.Module, structure: GaugeStructure, b: Tensor, rtol: float = 1e-13
) -> Tensor:
    """``c = K^{-1} b`` by Jacobi-preconditioned conjugate gradients on the matrix-free ``K``,
    restarted on the residual until the backward error is small:
    ``||b - K c|| <= rtol (||b|| + ||K|| ||c||)`` with ``||K|| <= k max_n S_n`` (``k`` the most
    generators one entry carries; so ``c`` solves a system within relative ``rtol`` of this one;
    its forward error is at most about ``k rtol cond(K)``).

    Raises :class:`SingularGramError` naming the generators when ``K`` is singular (checked by
    :func:`ungrounded_generators`), and ``RuntimeError`` when the tolerance is not reached.
    Solved at the parameters scaled by ``2^-e`` (:func:`normalised`): ``c = 4^-e K'^{-1} b``.
    """
    params, e = normalised(structure.bind(model))
    return times_power_of_two(_gram_solve(params, structure, b, rtol), -2 * e)


def _gram_solve(
    params: dict[str, Tensor], structure: GaugeStructure, b: Tensor, rtol: float
) -> Tensor:
    """:func:`gram_solve` with ``K`` of the bound ``params``."""
    return _scaled_cg(_checked_gram(params, structure), structure, b, rtol)


def _checked_gram(params: dict[str, Tensor], structure: GaugeStructure) -> MassState:
    """The masses of the bound ``params`` at ``h = 0`` (the matrix-free ``K``), after
    :class:`SingularGramError` for a singular ``K`` (:func:`ungrounded_generators`)."""
    state = _masses_at_zero(params, structure)
    bad = _ungrounded(params, structure)
    if bad.numel():
        raise SingularGramError(
            f"the Gram matrix K of the generators is singular: generator(s) "
            f"{_describe(bad.tolist(), structure)} have no weight outside the gauge group "
            "(their entries are all zero, or shared only among themselves in a way that "
            "cancels), so their generators are linearly dependent",
            bad.tolist(),
        )
    return state


def _scaled_cg(state: MassState, structure: GaugeStructure, b: Tensor, rtol: float) -> Tensor:
    """``K^{-1} b`` by :func:`_restarted_cg` on ``b`` rescaled to norm ``max_n S_n``."""
    # K^{-1} is linear: solved for b rescaled to the norm max_n S_n of K's diagonal, so that
    # c and conjugate gradients' products neither overflow nor underflow for any scale of b
    b_norm, s_max = float(row_norms(b)), float((state.s_in + state.s_out).max())
    if b_norm == 0:
        return torch.zeros_like(b)
    return _restarted_cg(state, structure, b / b_norm * s_max, rtol) * (b_norm / s_max)


def _restarted_cg(state: MassState, structure: GaugeStructure, b: Tensor, rtol: float) -> Tensor:
    """The restarts of :func:`gram_solve` (``b`` of norm about ``max_n S_n``)."""
    diag = (state.s_in + state.s_out)[0]
    k = max(2, structure.most_terms())
    k_norm = k * float(diag.max())  # Gershgorin: ||K||_2 <= max_n sum_m |K_nm| <= k max_n S_n

    def matvec(v: Tensor) -> Tensor:
        return state.gram_matvec(v[None])[0]

    b_norm = float(row_norms(b))
    c = torch.zeros_like(b)
    residual = b.clone()
    rel = math.inf
    for _ in range(GRAM_RESTARTS):
        scale = b_norm + k_norm * float(row_norms(c))
        rel = float(row_norms(residual)) / scale
        if rel <= rtol:
            return c
        rtols = torch.full((1,), rtol, dtype=torch.float64, device=b.device)
        step = pcg(state.gram_matvec, residual[None], diag[None], rtols)
        c = c + step[0]
        residual = b - matvec(c)
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
        if not vectors[name].is_floating_point():  # the projection would be rounded to it
            raise ValueError(
                f"vectors: '{name}' is {vectors[name].dtype}, expected a real floating dtype"
            )


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
    relative residual ``rtol`` and refined on the tangent residual ``v - Pi_V v``
    (:func:`_refined_vertical`); ``Pi_H v = v - Pi_V v``, computed in float64. ``vectors`` must
    hold every parameter of ``structure``; it may also hold other parameters of the model (their
    vertical component is 0, so ``Pi_H`` returns them unchanged). Returns a new dict with the
    same keys, each tensor in its input's dtype and device. Names that are not parameters of the
    model, shapes that differ, a gauged parameter's vector that is not of a real floating dtype
    or holds NaN/inf raise ``ValueError`` naming the parameter (other parameters pass through
    unchecked), and so does a projection that its vector's dtype cannot hold; ``rtol`` must lie
    in ``(0, 1)``; a singular ``K`` raises :class:`SingularGramError` naming the generators.
    """
    if onto not in ("vertical", "horizontal"):
        raise ValueError(f"onto must be 'vertical' or 'horizontal', got {onto!r}")
    _check_rtol(rtol)
    _check_vectors(vectors, model, structure)
    if structure.num_generators == 0:
        return {k: _untouched(v, onto) for k, v in vectors.items()}
    params = structure.bind(model)
    check_finite_params(params)
    device = next(iter(params.values())).device
    bad = _non_finite(vectors, structure.params, device)
    if bad is not None:  # also on an entry no generator acts on, never reaching <xi_n, v>
        raise ValueError(f"vectors: '{bad}' contains NaN or inf")
    params, _ = normalised(params)  # the span of the xi_n, hence Pi_V, does not scale
    b = generator_pairing(params, vectors, structure)
    if not all_finite([b]):
        raise ValueError("vectors: <xi_n, v> overflows float64")
    out = _assembled(vectors, _refined_vertical(params, vectors, structure, b, rtol), onto)
    bad = _non_finite(out, structure.params, device)
    if bad is not None:
        raise ValueError(f"the projection of '{bad}' overflows its dtype {vectors[bad].dtype}")
    return out


def _refined_vertical(
    params: dict[str, Tensor],
    vectors: Mapping[str, Tensor],
    structure: GaugeStructure,
    b: Tensor,
    rtol: float,
) -> dict[str, Tensor]:
    """``Pi_V v = sum_n c_n xi_n`` (float64, per gauged name) with ``K c = b = <xi, v>``,
    refined on the residual taken from the tangents themselves: ``c += K^{-1} <xi, v - Pi_V v>``.
    Its rounding is about ``eps ||xi|| ||v||``, where ``b - K c`` carries ``eps ||K|| ||c||``,
    which is ``cond(xi)`` times larger for nearly parallel generators (``K = xi xi^T`` squares
    their conditioning). Stops when a correction is at most ``rtol`` of ``Pi_V v``, no longer
    halves (the rounding floor, about ``eps cond(xi)``), or after :data:`REFINEMENTS` steps."""
    theta = {name: p.detach().to(torch.float64) for name, p in params.items()}
    state = _checked_gram(params, structure)
    c = _scaled_cg(state, structure, b, rtol)
    vertical = generator_combination(theta, structure, c)
    previous = math.inf
    for _ in range(REFINEMENTS):
        c = c + _scaled_cg(
            state, structure, _residual_pairing(theta, vectors, vertical, structure), rtol
        )
        before, vertical = vertical, generator_combination(theta, structure, c)
        sizes = [_norm(vertical[name] - before[name] for name in theta), _norm(vertical.values())]
        change, size = torch.stack(sizes).tolist()  # one host read
        if change <= rtol * size or change > previous / 2:
            break
        previous = change
    return vertical


def _residual_pairing(
    theta: dict[str, Tensor],
    vectors: Mapping[str, Tensor],
    vertical: Mapping[str, Tensor],
    structure: GaugeStructure,
) -> Tensor:
    """``<xi_n, v - Pi_V v>``, ``[N]`` float64, from the tangents at ``theta`` (float64)."""
    residual = {
        name: vectors[name].to(device=p.device, dtype=torch.float64) - vertical[name]
        for name, p in theta.items()
    }
    return generator_pairing(theta, residual, structure)


def _norm(tensors: Iterable[Tensor]) -> Tensor:
    """The 2-norm of the concatenated ``tensors`` (float64, 0-dim), by
    :func:`gaugefix.kernels.row_norms` per tensor (each reduced as it comes): tiny and huge
    entries keep it finite."""
    return row_norms(torch.stack([row_norms(t.reshape(-1)) for t in tensors]))


def _assembled(
    vectors: Mapping[str, Tensor], vertical: Mapping[str, Tensor], onto: str
) -> dict[str, Tensor]:
    """``Pi_V v`` (``vertical``, float64) or ``v - Pi_V v`` per name of ``vectors``, rounded
    to each vector's dtype on its device; 0 or ``v`` where no generator acts."""
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


def _non_finite(
    tensors: Mapping[str, Tensor], names: Iterable[str], device: torch.device
) -> str | None:
    """The first of ``names`` whose tensor holds NaN or inf, ``None`` when none (one host read
    then; the tensors may be on other devices than ``device``)."""
    names = [name for name in names if tensors[name].numel()]
    if not names:
        return None
    largest = torch._foreach_norm([tensors[name] for name in names], math.inf)  # NaN propagates
    if bool(torch.stack([torch.isfinite(m).to(device) for m in largest]).all()):
        return None
    return next(name for name in names if not all_finite([tensors[name]]))


def _untouched(v: Tensor, onto: str) -> Tensor:
    """The projection of a parameter no generator touches: 0 vertically, itself horizontally."""
    return torch.zeros_like(v) if onto == "vertical" else v.clone()


def _check_rtol(rtol: float) -> None:
    """``rtol`` in ``(0, 1)``: from 1 on, ``c = 0`` meets the backward error bound unsolved."""
    if check_number(rtol, "rtol", strict=True) >= 1:
        raise ValueError(f"rtol must be a finite number in (0, 1), got {rtol!r}")
