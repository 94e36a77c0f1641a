"""Soft gauge fixing: the orbit-selection functional ``P = (strength / 4) sum_n mu_n^2``
(:class:`OrbitSelectionPenalty`) and its exact, decoupled orbit step (:func:`relax_`).

``grad P = strength * sum_n mu_n xi_n`` with ``xi_n(e) = w_n(e) theta_e``, i.e. for an entry
``dP/dtheta_e = strength * (sum_n w_n(e) mu_n) * theta_e``: a signed, per-entry "weight decay"
along the generators, vertical, so it never changes the function to first order. The exact step
replaces the explicit step ``theta_e -= rate (sum_n w_n(e) mu_n) theta_e`` by the group action
``g(-rate * mu)`` it is the first-order expansion of, which keeps the function to rounding.
Both are written once for stacks of copies (``batch_dims``), as the sweep engine trains them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gaugefix.action import (
    Optimizers,
    all_finite,
    check_finite_params,
    check_transport,
    gauge_params_,
    move_,
    moved_with,
    provably_in_range,
)
from gaugefix.balancing import log_ratio
from gaugefix.distributed import (
    OPTIMIZER,
    add_local_grads_,
    agreed,
    local_view,
    optimizer_passed,
    refuse_gathered,
)
from gaugefix.errors import check_number
from gaugefix.kernels import (
    add_selection_grads_,
    generator_sums,
    kernel_plan,
    paired_generator_sums,
    row_norms,
    stacked,
    term_values,
)
from gaugefix.masses import Masses
from gaugefix.moment import accumulation_dtype, accumulation_dtype_of, imbalance
from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import check_structure

__all__ = [
    "add_orbit_selection_grad_",
    "check_rate",
    "check_strength",
    "check_entries",
    "orbit_selection_grad",
    "generator_combination",
    "orbit_step",
    "OrbitSelectionPenalty",
    "relax_",
    "relax_unchecked_",
]

# The most halvings of the rate in the bounded orbit step: 2^-64 of any rate moves nothing.
HALVINGS = 64
# The dead band of an orbit step on 16-bit parameters, in units of the resolution ``eps`` of the
# coarsest parameter dtype: a generator with ``|h_n| <= DEAD_BAND * eps`` does not move. Each
# moved entry costs a rounding whether or not the move helps (at most ``eps / 2`` relative;
# bfloat16 two, its factor's and its own: ``eps``); a step of over ``2 eps`` moves it by at least
# twice that. Below it the roundings of bfloat16 and float16 steps add up to a change of the
# function (1000 steps from an unbalanced MLP: 0.49 and 0.36 without the band, 1.7e-2 and 4.8e-3
# with it). Float32 and float64 steps are not cut (their steps that small are few: 1000 float32
# steps of real progress change the same MLP by 2.2e-5).
DEAD_BAND = 2.0
BANDED_EPS = torch.finfo(torch.float32).eps  # dtypes coarser than this get the dead band
# What the per-generator flags relax_ checks to agree between processes (FSDP2) stand for.
FROZEN = "which parameters are frozen (requires_grad=False: their generators keep h = 0)"
# Why a generator is left out of the penalty and the orbit step (add_grad_, GaugeFixing).
FROZEN_REASON = "touching a parameter with requires_grad=False"


def check_strength(value: float, name: str = "strength") -> float:
    """``value`` as a float, or ``ValueError`` unless it is a finite real number ``>= 0``."""
    return check_number(value, name)


def check_entries(value: Tensor, name: str, per: str) -> Tensor:
    """``value``, or ``ValueError`` unless every entry (one ``per`` generator or copy) is finite
    and ``>= 0`` (one host read)."""
    bad = value[~(torch.isfinite(value) & (value >= 0))]
    if bad.numel():
        raise ValueError(f"{name} must be finite and >= 0 for every {per}, got {bad[0].item()}")
    return value


def check_rate(rate: float | Tensor, structure: GaugeStructure) -> float | Tensor:
    """A scalar rate as a float, or a per-generator rate ``[num_generators]`` as a float64
    tensor; ``ValueError`` for a bool, complex or ``meta`` (no data) tensor."""
    if isinstance(rate, Tensor) and (rate.is_meta or rate.is_complex() or rate.dtype == torch.bool):
        raise ValueError(
            f"rate must be a real number with data, got a {rate.dtype} {rate.device} tensor"
        )
    if not isinstance(rate, Tensor) or rate.dim() == 0:
        return check_strength(rate.item() if isinstance(rate, Tensor) else rate, "rate")
    if tuple(rate.shape) != (structure.num_generators,) or not rate.is_floating_point():
        raise ValueError(
            f"a per-generator rate must be a floating tensor of shape "
            f"({structure.num_generators},), got {rate.dtype} {tuple(rate.shape)}"
        )
    return check_entries(rate.detach(), "rate", "generator").to(torch.float64)


# -- the penalty's gradient ---------------------------------------------------------------------


def generator_combination(
    tensors: Mapping[str, Tensor], structure: GaugeStructure, c: Tensor, batch_dims: int = 0
) -> dict[str, Tensor]:
    """``sum_n c_n xi_n`` with ``xi_n(e) = w_n(e) theta_e``: ``(sum_n w_n(e) c_n) theta_e`` for
    every entry of the bound ``tensors`` (``[*batch, *shape]``), given per-generator
    coefficients ``c`` (``[*batch, N]``); the gradient of ``P`` when ``c = strength * mu``.
    Computed in ``c``'s dtype, returned in each tensor's; a few operations per group of equally
    shaped parameters (:mod:`gaugefix.kernels`), returned in the order of ``tensors``.
    Differentiable when grad mode is on (the penalty's double backward). ``ValueError`` unless
    ``c`` has one coefficient per generator (its slot ``N`` is the zero of unmoved entries)."""
    if c.shape[-1:] != (structure.num_generators,):
        raise ValueError(
            f"c must end in one coefficient per generator ({structure.num_generators}), got "
            f"shape {tuple(c.shape)}"
        )
    cx = torch.cat([c, c.new_zeros(*c.shape[:-1], 1)], dim=-1)
    out = {}
    for group in kernel_plan(structure, c.device).groups:
        x = stacked([tensors[name] for name in group.names], batch_dims)
        coefficients = functools.reduce(torch.add, term_values(cx, group, 1.0))
        grads = (coefficients * x.to(c.dtype)).to(x.dtype)
        out.update(zip(group.names, grads.unbind(batch_dims), strict=True))
    return {name: out[name] for name in tensors if name in out}  # in the order of ``tensors``


def orbit_selection_grad(
    source: nn.Module | dict[str, Tensor], structure: GaugeStructure, strength: float
) -> dict[str, Tensor]:
    """``grad P`` for ``P = (strength / 4) sum_n mu_n^2``, as parameter name -> tensor.

    Closed form, one pass over the parameters: ``dP/dtheta_e = strength (sum_n w_n(e) mu_n)
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
        return generator_combination(tensors, structure, strength * mu)


@torch.no_grad()
def add_orbit_selection_grad_(
    params: dict[str, Tensor], structure: GaugeStructure, strength: float, grads_ok: Tensor
) -> bool:
    """``p.grad += dP/dp`` (:func:`orbit_selection_grad`, ``strength`` already checked) for the
    bound ``params``, fused: ``mu`` and the finiteness of the parameters come from one pass of
    squared sums, and the gradients of each group of equally shaped parameters take one
    ``torch._foreach_addcmul_``. Returns ``False``, adding nothing, when ``grads_ok`` (a 0-dim
    bool tensor: the gradients are finite) is false or the squared sums are not finite: a
    parameter has a NaN or infinite entry, or finite entries whose squares overflow the
    accumulation dtype (as the exact orbit step, :func:`relax_unchecked_`; ``mu`` would be
    ``inf - inf``); the decision is the one host read."""
    if not params:
        return bool(grads_ok)
    dtype = accumulation_dtype(params)
    tensors, local = local_view(params, structure)  # this process's slices under FSDP2
    s_in, s_out, norm_sq = generator_sums(tensors, local, dtype)
    if not (grads_ok & (norm_sq < math.inf)).tolist():  # a sum of squares: NaN compares false
        return False
    mu = (s_in - s_out) * strength
    if local is not structure:  # FSDP2: the gradient of each local slice, added to its grad's
        grads = generator_combination(tensors, local, mu)
        add_local_grads_(params, {name: g for name, g in grads.items() if name in params})
        return True
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    add_selection_grads_({name: p.grad for name, p in params.items()}, params, structure, mu)
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
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        """The closed form; under ``create_graph=True`` (grad mode on) ``mu`` is recomputed
        with autograd, so the gradient is itself differentiable (Hessian-vector products)."""
        mu, *params = ctx.saved_tensors
        tensors = dict(zip(ctx.structure.params, params, strict=True))
        if torch.is_grad_enabled():
            mu = imbalance(tensors, ctx.structure)
        scale = grad_output.to(mu.dtype) * ctx.strength
        grads = generator_combination(tensors, ctx.structure, scale * mu)
        return (None, None, *grads.values())


class OrbitSelectionPenalty:
    """The soft gauge-fixing (orbit-selection) functional ``P = (strength / 4) sum_n mu_n^2``.

    ``penalty(model)`` (or ``penalty(model_or_dict)``) returns ``P`` as a 0-dim tensor in the
    accumulation dtype (float64 for float64 parameters, float32 otherwise), to be added to the
    training loss. Its backward is the closed form ``dP/dtheta_e = strength (sum_n w_n(e) mu_n)
    theta_e`` (one pass over the parameters, no autograd graph over the entries); the gradient
    is vertical, so adding ``P`` to a loss relaxes the imbalance modes
    (``d mu / dt = -2 strength K mu`` under gradient flow) without changing the function to first
    order. ``grad(model)`` returns that gradient as name -> tensor, and ``add_grad_(model)``
    adds it to the parameters' ``.grad``, leaving frozen parameters alone (see :meth:`add_grad_`).
    """

    def __init__(self, structure: GaugeStructure, strength: float) -> None:
        self.structure = check_structure(structure)
        self.strength = check_strength(strength)
        self._active: tuple[frozenset[str], GaugeStructure] = (frozenset(), structure)

    def __repr__(self) -> str:
        return (
            f"OrbitSelectionPenalty(strength={self.strength}, "
            f"generators={self.structure.num_generators})"
        )

    def __call__(self, model: nn.Module | dict[str, Tensor]) -> Tensor:
        return self.penalty(model)

    def penalty(self, model: nn.Module | dict[str, Tensor]) -> Tensor:
        """``P`` at the parameters of ``model``: a differentiable 0-dim tensor."""
        tensors = self.structure.bind(model)
        if not tensors:
            return torch.zeros((), dtype=torch.float64)
        # Build the cached plan outside the autograd.Function (torch.compile friendly).
        self.structure.plan(next(iter(tensors.values())).device)
        return _OrbitSelection.apply(self.structure, self.strength, *tensors.values())

    def grad(self, model: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
        """``grad P`` as parameter name -> tensor (see :func:`orbit_selection_grad`)."""
        return orbit_selection_grad(model, self.structure, self.strength)

    @torch.no_grad()
    def add_grad_(self, model: nn.Module) -> None:
        """``p.grad += dP/dp`` for every parameter the structure acts on (``.grad`` is created
        where it is ``None``), as :class:`gaugefix.GaugeFixing`'s penalty mode adds it: frozen
        parameters (``requires_grad=False``) are left alone, ``.grad`` included, and ``P`` is
        that of the generators touching none of them (the others keep ``h = 0``).
        ``ValueError``, nothing added, where a parameter is not finite (or its square
        overflows the dtype it is summed in)."""
        params = self.structure.bind(model)
        active = self._unfrozen(frozenset(n for n, p in params.items() if not p.requires_grad))
        params = active.bind(params)
        if not add_orbit_selection_grad_(params, active, self.strength, torch.tensor(True)):
            raise ValueError(
                "the parameters are not finite (or their squares overflow the dtype they are "
                "summed in): no penalty gradient was added"
            )

    def _unfrozen(self, frozen: frozenset[str]) -> GaugeStructure:
        """The structure of the generators touching none of the ``frozen`` parameters (the
        last one built, kept while the frozen set stays the same)."""
        if not frozen:
            return self.structure
        if self._active[0] != frozen:
            keep = ~self.structure.touching(frozen)
            self._active = (frozen, self.structure.restrict(keep, FROZEN_REASON))
        return self._active[1]


# -- the exact orbit step -------------------------------------------------------------------------


@torch.no_grad()
def relax_(
    model: nn.Module,
    structure: GaugeStructure,
    rate: float | Tensor,
    optimizer: Optimizers = None,
) -> Tensor:
    """One exact, bounded step along the gauge orbits: ``apply_gauge_(model, g(h))`` with
    ``h = -rate * mu``, and return ``h`` (float64, ``[num_generators]``).

    This is the decoupled form of soft gauge fixing: the explicit penalty step
    ``theta_e -= rate (sum_n w_n(e) mu_n) theta_e`` is the first-order expansion of
    ``g(-rate mu)``, and applying the group action instead leaves the function unchanged to
    rounding for any ``rate`` (a float, or one rate per generator as a ``[num_generators]``
    tensor). Since ``h`` is a descent direction of ``F(h) = ||g(h) theta||^2`` (gradient
    ``2 mu``), the step relaxes the imbalance; it is bounded so that it never overshoots:

    - each ``h_n`` is clamped between 0 and the generator's local closed-form balance
      ``(1/4) log(S_out,n / S_in,n)`` (exact for an isolated generator: a huge rate balances it
      in one step);
    - generators couple through shared entries, so the step is then accepted only if neither
      ``||mu||`` (over the generators with a closed orbit) nor ``F`` increases; otherwise the
      rate is halved and the clamp recomputed (for a small enough rate the step is the unclamped
      ``-rate mu``, along which both strictly decrease). If no halving helps, nothing moves;
    - on bfloat16 or float16 parameters, a generator with ``|h_n| <= DEAD_BAND * eps`` (``eps``
      of the coarsest parameter dtype) then keeps ``h_n = 0``: its move would cost more
      roundings than it gains (``F`` and ``||mu||`` then hold to that resolution).

    Generators with an all-zero incoming or outgoing side have no closed orbit, and generators
    acting on a parameter with ``requires_grad=False`` are frozen (as in
    :class:`gaugefix.GaugeFixing`): both keep ``h = 0``, so frozen parameters, their ``.grad``
    and optimizer state stay bit-identical. Trial steps are evaluated in float64 on the squared
    masses, without touching the model. ``.grad`` and, when ``optimizer`` is given, its state
    are transported. Everything is validated first; on error nothing is modified, also where the
    squares of finite parameters overflow the dtype they are summed in (float32 entries above
    about ``1.8e19``) or the step would take a parameter, gradient or optimizer state out of its
    dtype's range (:func:`gaugefix.action.overflowing`: a float16 weight past ``65504``).
    """
    params = structure.bind(model, sharded=True)
    refuse_gathered(model, params)
    n = structure.num_generators
    frozen = structure.touching({name for name, p in params.items() if not p.requires_grad})
    checked = agreed(
        params,
        {"rate": n + 1, FROZEN: n, OPTIMIZER: 1},
        lambda: _checked_rate(rate, structure, optimizer, params),
        lambda r: (_rate_numbers(r, n), frozen, optimizer_passed(optimizer)),
    )
    check_finite_params(params)
    if not params or n == 0:
        return torch.zeros(n, dtype=torch.float64)
    tensors, local = local_view(params, structure)  # this process's slices under FSDP2
    h, finite = orbit_step(tensors, local, _unfrozen_rate(checked, frozen))
    if not bool(finite):
        raise ValueError(
            "the squared parameters overflow the dtype they are summed in (float32 entries "
            "above about 1.8e19); nothing was modified"
        )
    move_(params, structure, h, optimizer)  # refused where h would leave a dtype's range
    return h


def _checked_rate(
    rate: float | Tensor,
    structure: GaugeStructure,
    optimizer: Optimizers,
    params: dict[str, Tensor],
) -> float | Tensor:
    """``rate`` checked (:func:`check_rate`); ``ValueError`` also unless ``optimizer``'s
    state can move with ``params`` (:func:`gaugefix.action.check_transport`)."""
    checked = check_rate(rate, structure)
    check_transport(optimizer, params)
    return checked


def _unfrozen_rate(rate: float | Tensor, frozen: Tensor) -> Tensor:
    """A checked ``rate`` as float64: as it is where no generator is ``frozen`` (bool ``[N]``:
    acting on a parameter with ``requires_grad=False``), else per generator (``[N]``) with 0
    for the frozen ones."""
    rates = torch.as_tensor(rate, dtype=torch.float64)
    if not bool(frozen.any()):
        return rates
    rates = rates.expand(len(frozen))
    return rates.masked_fill(frozen.to(rates.device), 0.0)


def _rate_numbers(rate: float | Tensor, n: int) -> Tensor:
    """A checked rate as numbers: whether it is per generator, and its value for each of the
    ``n`` generators."""
    each = torch.as_tensor(rate, dtype=torch.float64).expand(n)
    return torch.cat([torch.tensor([float(isinstance(rate, Tensor))]), each.cpu()])


@torch.no_grad()
def relax_unchecked_(
    structure: GaugeStructure,
    params: dict[str, Tensor],
    rate: float | Tensor,
    optimizer: Optimizers,
    check_range: bool = False,
    ok: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The step of :func:`relax_` for callers that validated everything but the finiteness of
    the parameters: ``params`` bound to ``structure``, ``rate`` from :func:`check_rate` (or a
    0-dim tensor, 0 where the step must not move); ``ok`` (a 0-dim bool tensor, when given):
    nothing moves unless it holds. Unlike :func:`relax_` it moves generators
    acting on a parameter with ``requires_grad=False`` and checks the range of the moved
    tensors only with ``check_range`` (float16 models: the per-tensor bound of
    :func:`gaugefix.action.provably_in_range`, on the device), by which
    :class:`gaugefix.GaugeFixing` passes a structure restricted to unfrozen generators.
    Returns ``(h, moved)``: the step and a 0-dim bool tensor, false when a parameter has a NaN
    or infinite entry (found from the squared sums the step needs anyway, which overflow for
    float32 entries above about ``1.8e19`` too) or, with ``check_range``, when the bound does
    not prove the step in range, and then ``h = 0``: nothing moves. Decided on the device: at
    most one host read (whether the cheap bound of :func:`orbit_step` holds)."""
    n = structure.num_generators
    if not params or n == 0:
        finite = torch.tensor(all_finite(list(params.values())))
        return torch.zeros(n, dtype=torch.float64), finite if ok is None else finite & ok
    tensors, local = local_view(params, structure)  # this process's slices under FSDP2
    h, moved = orbit_step(tensors, local, rate, ok=ok)
    if check_range:
        moved = moved & provably_in_range(moved_with(optimizer, params), local, h, params)
        h = torch.where(moved, h, 0.0)
    gauge_params_(params, local, h, optimizer)
    return h, moved


def orbit_step(
    tensors: Mapping[str, Tensor],
    structure: GaugeStructure,
    rate: Tensor | float,
    batch_dims: int = 0,
    ok: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(h, finite)``: the bounded step of :func:`relax_` for every copy of a stack
    (``[*batch, N]``; ``rate``: a number per copy ``[*batch]`` or per generator ``[*batch, N]``,
    or a float for every copy, applied as a number), and whether each copy's squared sums are
    finite and ``ok`` (a 0-dim bool tensor, when given) holds (a copy where not gets ``h = 0``).

    A copy with a uniform rate takes ``h = -rate * mu`` at once when a cheap bound proves that
    the bounded search would accept it. With ``d = -rate mu`` (live generators), ``k`` the most
    generators one entry carries, ``delta = max_e |sum_n w_n(e) d_n| <= k rate max|mu|`` and
    ``||K|| <= k max_n S_n`` (Gershgorin), the condition ``c = k rate max_n S_n exp(2 delta) <=
    1`` gives ``F(d) <= F(0) - 2 rate ||mu||^2 (1 - c)`` and ``mu(d) = (I - 2 rate Kbar) mu``
    with ``0 <= 2 rate Kbar <= c I`` (``Kbar``: the mean of ``K`` along the segment), so neither
    ``F`` nor ``||mu||`` increases; and ``rate S_n <= 1/2`` keeps ``-rate mu_n`` inside the
    clamp at the local balance (``|log(S_out / S_in)| / 4 >= |mu_n| / (2 S_n)``). Required here
    with margin 2, ``c <= 1/2``. That costs one pass over the parameters (their squares,
    accumulated like :func:`imbalance`: the relative rounding of ``mu`` then moves ``h`` by at
    most ``rate * 1e-7 * S <= 3e-8``, below a float32 entry's rounding). Every other copy is
    searched on the float64 masses (:func:`bounded_orbit_step`). Last, ``h`` is cut to the dead
    band of :func:`relax_` (on the device, no host read).
    """
    n = structure.num_generators
    batch = tuple(next(iter(tensors.values())).shape[:batch_dims])
    dtypes = {t.dtype for t in tensors.values()}  # the sums' dtype and the dead band's, one pass
    dtype = accumulation_dtype_of(dtypes)
    sides, norm_sq = paired_generator_sums(tensors, structure, dtype, batch_dims, torch.float64)
    zero = kernel_plan(structure, sides.device).zero  # a device constant: no operation per step
    finite = norm_sq < math.inf  # a sum of squares: NaN compares false
    finite = finite if ok is None else finite & ok
    live = sides.amin(-2) > 0  # NaN propagates, and compares false
    s_in, s_out = torch.where(live[..., None, :], sides, zero).unbind(-2)  # 0 where not live
    mu = s_in - s_out
    h, rate, per_generator = _first_step(rate, mu, batch, batch_dims)
    k = max(2, structure.most_terms())
    searched = finite & h.any(-1)  # NaN counts as nonzero, as -0.0 does not
    if not per_generator:
        s_max = (s_in + s_out).amax(-1) if n else mu.new_zeros(batch)
        mu_max = torch.linalg.vector_norm(mu, math.inf, -1)  # max |mu_n|
        bound = k * rate * s_max * torch.exp(2 * k * rate * mu_max)
        searched = searched & (bound > 0.5)
    h = torch.where(finite[..., None] if batch else finite, h, zero)
    if not bool(searched.any() if batch else searched):
        return _dead_band(h, dtypes), finite
    pick = torch.nonzero(searched.reshape(-1)).reshape(-1)
    stack = {
        name: t.detach().reshape(-1, *t.shape[batch_dims:])[pick] for name, t in tensors.items()
    }
    if not isinstance(rate, Tensor):
        rate = torch.full(batch, rate, dtype=torch.float64, device=mu.device)
    rates = rate.reshape(-1, *rate.shape[len(batch) :])[pick]
    found = bounded_orbit_step(Masses(stack, structure), rates)
    flat = h.reshape(-1, n).clone()
    flat[pick] = found
    return _dead_band(flat.view(*batch, n), dtypes), finite


def _first_step(
    rate: Tensor | float, mu: Tensor, batch: tuple[int, ...], batch_dims: int
) -> tuple[Tensor, Tensor | float, bool]:
    """``(h, rate, per_generator)`` for :func:`orbit_step`: the step ``h = -rate mu``
    (``[*batch, N]``) and the rate it took, a float as it is (one rate for every copy:
    multiplied as a number, no tensor made for it), a tensor in float64 on ``mu``'s device,
    expanded to the ``batch`` dims."""
    if not isinstance(rate, Tensor):
        return mu * -float(rate), float(rate), False
    rate = rate.to(device=mu.device, dtype=torch.float64)
    if batch:
        rate = rate.expand(*batch, *rate.shape[batch_dims:])
    per_generator = rate.dim() > len(batch)
    return mu * -(rate[..., None] if batch and not per_generator else rate), rate, per_generator


def _dead_band(h: Tensor, dtypes: Collection[torch.dtype]) -> Tensor:
    """``h`` (``[*batch, N]``) with every ``|h_n| <= DEAD_BAND * eps`` set to 0, ``eps`` the
    resolution (``finfo.eps``) of the coarsest of the parameters' ``dtypes`` where that is
    coarser than float32's (``h`` itself otherwise): no host read."""
    eps = max(torch.finfo(dtype).eps for dtype in dtypes)
    return h if eps <= BANDED_EPS else torch.where(h.abs() > DEAD_BAND * eps, h, 0.0)


def bounded_orbit_step(masses: Masses, rate: Tensor) -> Tensor:
    """The step ``h`` (``[R, N]``) of :func:`relax_` for every copy held by ``masses`` by the
    bounded search (``rate``: ``[R]`` or ``[R, N]``): each ``h_n = -rate mu_n`` clamped between 0
    and the local balance; a copy whose step would raise ``||mu||`` or ``F`` halves its rate
    and tries again (:data:`HALVINGS` times at most, then it does not move). Scale-safe:
    ``||mu||`` by :func:`gaugefix.kernels.row_norms` (``mu`` of parameters below ``1e-77`` or
    above ``1e77`` squares to 0 or inf), the local balance finite for sides over ``1e308``
    apart (else the clamp is lost and no halving brings ``rate * mu`` back)."""
    state = masses.at(torch.zeros(masses.r, masses.n, dtype=torch.float64, device=masses.device))
    live = (state.s_in > 0) & (state.s_out > 0)
    mu = torch.where(live, state.s_in - state.s_out, 0.0)
    local = torch.where(live, 0.25 * log_ratio(state.s_out, state.s_in), 0.0)
    low, high = local.clamp(max=0.0), local.clamp(min=0.0)
    mu_norm, f0 = row_norms(mu), state.total
    rate = rate.to(torch.float64)
    rate = rate if rate.dim() == 2 else rate[:, None]
    scale = torch.ones(masses.r, 1, dtype=torch.float64, device=masses.device)
    done = (mu_norm == 0) | (rate == 0).all(1) | ~torch.isfinite(f0)
    h = torch.zeros_like(mu)
    for _ in range(HALVINGS):
        trial = torch.minimum(torch.maximum(-scale * rate * mu, low), high)
        at = masses.at(trial)
        t_norm = row_norms(torch.where(live, at.s_in - at.s_out, 0.0))
        ok = ~done & (t_norm <= mu_norm) & (at.total <= f0)
        h = torch.where(ok[:, None], trial, h)
        done = done | ok
        if bool(done.all()):
            break
        scale = torch.where(done[:, None], scale, 0.5 * scale)
    return h
