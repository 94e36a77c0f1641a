"""One training step, optax-style: small transformations that compose, over parameter dicts.

A :class:`Transformation` is a pair of functions: ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``, with ``state`` a ``NamedTuple``. The
gradient transformations (:func:`penalty`, :func:`weight_decay`) return the gradients they were
given with a term added; the optimizers (:func:`sgd`, :func:`adam`, :func:`adamw`) return the
change to the parameters, ``-lr * direction``, to which :func:`decoupled_penalty` adds a vertical
step; :func:`chain` composes them and :func:`applied` adds the result to the parameters and
returns them. :func:`exact` wraps such a step with the exact orbit step of soft gauge fixing:
every ``every``-th step, the group action ``g(h)``, ``h`` the bounded step of
:func:`gaugefix.relax_` at ``rate = strength * (the sum of the learning rates since the last
one)``, applied to the parameters and to the optimizer's state (gradient-like buffers by the
inverse factor, squared ones by its square), so the function the step produced is kept to
rounding.

Parameters are ``name -> [*batch, *shape]`` with ``batch_dims`` leading dims: several copies of a
model (the sweep engine's runs) step at once, each with its own ``lr`` and ``strength`` (tensors
``[*batch]``). Like ``torch.optim``, the step works in place: the gradients a gradient
transformation is given are overwritten, :func:`applied` moves the parameters, and the optimizer
buffers (momentum, Adam's moments) move in place while the step counts are in the state ``update``
returns. A state is therefore used once: pass the state an update returns to the next; a state given
again (its buffers have moved since: Adam's bias correction would restart at ``t = 1``, momentum
from the gradient given an ``init`` state, ``exact``'s count of steps never reach ``every``) is a
``ValueError``; ``copy.deepcopy`` a state before its update to branch. Constants default to
``torch.optim``'s, and :func:`sgd`, :func:`adam` and :func:`adamw` follow ``torch.optim.SGD``,
``torch.optim.Adam`` and ``torch.optim.AdamW`` (no Nesterov, no AMSGrad; weight decay only in
AdamW's decoupled form) operation by operation, to rounding (``torch.optim`` adds ``alpha g`` in one
kernel; a few ulps over 20 float64 steps). Each transformation says what it takes and gives
(gradients -> optimizer -> updates -> :func:`applied` -> parameters), and :func:`chain`,
:func:`applied` and :func:`exact` refuse them out of order. Bad input (a constant ``torch.optim``
refuses, a learning rate or strength that is not finite and ``>= 0``, gradients, state or per-copy
tensors that do not fit the parameters, a used state) is a ``ValueError``, when a transformation is
built or before an update (a whole chain) changes anything; a tensor ``lr`` or ``strength`` changed
in place later is not checked again (no host read per step).
:class:`gaugefix.GaugeFixing` runs the same penalty gradient and the same orbit step around a
``torch.optim`` optimizer.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gaugefix.action import GRAD_LIKE, SQUARED
from gaugefix.errors import check_number
from gaugefix.kernels import Targets, add_selection_grads_, generator_sums, rescale_
from gaugefix.moment import accumulation_dtype
from gaugefix.soft import check_entries, orbit_step
from gaugefix.structure import GaugeStructure

__all__ = [
    "Params",
    "Scalar",
    "MOMENTUM",
    "BETAS",
    "EPS",
    "EVERY",
    "GRADIENTS",
    "UPDATES",
    "PARAMETERS",
    "Transformation",
    "Update",
    "Token",
    "EmptyState",
    "SgdState",
    "AdamState",
    "OrbitState",
    "ExactState",
    "ScaleState",
    "check_every",
    "check_scalar",
    "check_betas",
    "check_update",
    "per_entry",
    "penalty",
    "weight_decay",
    "sgd",
    "adam",
    "ADAMW_WEIGHT_DECAY",
    "adamw",
    "decoupled_penalty",
    "chain",
    "apply_updates_",
    "applied",
    "advance",
    "state_targets",
    "orbit_step_",
    "exact",
    "scale_by_tensor",
]

Params = dict[str, Tensor]
# A learning rate or strength: one number, or one per copy (``[*batch]``).
Scalar = float | Tensor
# ``torch.optim``'s defaults.
MOMENTUM = 0.0
BETAS = (0.9, 0.999)
EPS = 1e-8
# The default interval of exact orbit steps, in optimizer steps.
EVERY = 10


# What an update is given and returns first: gradients, updates or the moved parameters.
GRADIENTS, UPDATES, PARAMETERS = "gradients", "updates", "parameters"


class Transformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``;
    ``takes`` and ``gives``: what ``update`` is given and returns first (:data:`GRADIENTS`,
    :data:`UPDATES` or :data:`PARAMETERS`; ``None``: not stated)."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]
    takes: str | None = None
    gives: str | None = None


class Update(NamedTuple):
    """An ``update`` in two halves: ``check(grads, state, params)`` raises the ``ValueError``
    for bad input before anything changes, ``apply`` (same arguments) is the update unchecked.
    Calling it runs both; :func:`chain` runs every part's ``check`` before any ``apply``."""

    check: Callable[[Params, Any, Params], None]
    apply: Callable[[Params, Any, Params], tuple[Params, Any]]

    def __call__(self, grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        self.check(grads, state, params)
        return self.apply(grads, state, params)


def _halves(update: Callable) -> tuple[Callable | None, Callable]:
    """``(check, apply)`` of an :class:`Update`; ``(None, update)`` for another function."""
    return (update.check, update.apply) if isinstance(update, Update) else (None, update)


class Token:
    """One use of a state whose buffers move in place: an update spends the token of the state
    it is given, so that state, given again, is refused (its buffers have moved since)."""

    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = False


STALE = (
    "this optimizer state was already given to an update (its buffers have moved in place "
    "since): pass the state the last update returned"
)


def check_fresh(state: Any) -> None:
    """``ValueError`` if the :class:`Token` of ``state`` is spent (``None``: a state rebuilt by
    its fields, never checked)."""
    if state.token is not None and state.token.spent:
        raise ValueError(STALE)


def spend(state: Any) -> Token:
    """Spends the token of ``state`` (just before its buffers move) and returns a new one."""
    if state.token is not None:
        state.token.spent = True
    return Token()


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


class SgdState(NamedTuple):
    """``torch.optim.SGD``'s momentum buffers (``None`` before the first step or without
    momentum), and the state's :class:`Token`."""

    momentum_buffer: Params | None
    token: Token | None = None


class AdamState(NamedTuple):
    """``torch.optim.Adam``'s step count and moment estimates, and the state's
    :class:`Token`."""

    step: int
    exp_avg: Params
    exp_avg_sq: Params
    token: Token | None = None


class OrbitState(NamedTuple):
    """Where the exact orbit step stands: ``since`` optimizer steps since the last orbit step,
    and the sum of their learning rates (``None`` for none; a number, a tensor ``[*batch]``,
    or a tuple with one per parameter group)."""

    since: int = 0
    lr_sum: Any = None


class ExactState(NamedTuple):
    """The state of the wrapped step and of its orbit steps, and the state's :class:`Token`."""

    inner: Any
    orbit: OrbitState
    token: Token | None = None


class ScaleState(NamedTuple):
    """Each parameter's factor of its updates (a number per copy, ``[*batch]``), by name."""

    factors: Params


def check_every(every: int) -> None:
    """``ValueError`` unless ``every`` (optimizer steps between exact orbit steps) is an
    integer ``>= 1``."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")


def check_scalar(value: Scalar, name: str, batch_dims: int | None = None) -> Scalar:
    """``value`` (a number, or a floating tensor with one per copy), or ``ValueError`` unless it
    is finite and ``>= 0`` (every entry of a tensor: one host read) and, given ``batch_dims``, a
    tensor is 0-dim or has ``batch_dims`` dims."""
    if not isinstance(value, Tensor):
        return check_number(value, name)
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if batch_dims is not None and value.dim() not in (0, batch_dims):
        raise ValueError(
            f"{name} must be a number, a 0-dim tensor or one per copy ({batch_dims} dims), got "
            f"shape {tuple(value.shape)}"
        )
    return check_entries(value, name, "copy")


def _check_same_copies(**values: Scalar) -> None:
    """``ValueError`` unless the per-copy tensors among ``values`` (not 0-dim) have one shape
    and are on one device (they are multiplied together)."""
    per_copy = [v for v in values.values() if isinstance(v, Tensor) and v.dim()]
    shapes, devices = {tuple(v.shape) for v in per_copy}, {v.device for v in per_copy}
    if len(shapes) > 1:
        raise ValueError(f"{' and '.join(values)} must have one per copy, got shapes {shapes}")
    if len(devices) > 1:
        raise ValueError(f"{' and '.join(values)} must be on one device, got {devices}")


def check_betas(betas: tuple[float, float]) -> tuple[float, float]:
    """``betas`` as floats, or ``ValueError`` unless it is a pair of numbers in ``[0, 1)``
    (``torch.optim.Adam``'s condition)."""
    pair = isinstance(betas, tuple | list) and len(betas) == 2
    if not pair or not all(
        isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _describe(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}"


def check_update(
    grads: Params,
    params: Params,
    per_copy: dict[str, Scalar] | None = None,
    state: dict[str, Params | None] | None = None,
) -> None:
    """``ValueError`` (before anything changes) unless ``params`` are floating, ``grads`` and
    the optimizer ``state``'s buffers (field -> dict or ``None``) have their names and each
    tensor its parameter's shape, dtype and device, and each tensor of ``per_copy`` (name ->
    ``[*batch]``) is the shape of every parameter's leading dims. Metadata only: no host read."""
    named = {("the gradients are", "the gradient"): grads}
    for field, buffers in (state or {}).items():
        if buffers is not None:
            named[(f"the optimizer state ({field}) is", f"the optimizer state ({field})")] = buffers
    for (whole, _), tensors in named.items():
        if tensors.keys() != params.keys():
            extra, missing = sorted(tensors.keys() - params), sorted(params.keys() - tensors)
            raise ValueError(f"{whole} for other parameters: {extra} more, {missing} missing")
    for name, p in params.items():
        if not p.is_floating_point():
            raise ValueError(f"parameter {name!r} must be floating-point, got {p.dtype}")
        for (_, one), tensors in named.items():
            t = tensors[name]
            if (t.shape, t.dtype, t.device) != (p.shape, p.dtype, p.device):
                raise ValueError(
                    f"{one} of {name!r} is {_describe(t)}, the parameter {_describe(p)}"
                )
        for key, v in (per_copy or {}).items():
            if isinstance(v, Tensor) and p.shape[: v.dim()] != v.shape:
                raise ValueError(
                    f"{key} of shape {tuple(v.shape)} (one per copy) does not fit parameter "
                    f"{name!r} of shape {tuple(p.shape)}, whose leading dims are the copies"
                )


def per_entry(value: Scalar, like: Tensor) -> Scalar:
    """A number as it is; a tensor ``[*batch]`` in ``like``'s dtype, shaped to broadcast over
    the trailing dims of ``like`` (``[*batch, *shape]``)."""
    if not isinstance(value, Tensor):
        return value
    value = value.to(device=like.device, dtype=like.dtype)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


# -- gradient transformations -------------------------------------------------------------------


def penalty(structure: GaugeStructure, *, strength: Scalar, batch_dims: int = 0) -> Transformation:
    """Adds ``grad P`` of ``P = (strength / 4) sum_n mu_n^2`` to the gradients:
    ``strength (sum_n w_n(e) mu_n) theta_e`` for every entry, ``mu`` accumulated like
    :func:`gaugefix.imbalance` (:class:`gaugefix.OrbitSelectionPenalty`'s gradient)."""
    strength = check_scalar(strength, "strength", batch_dims)

    def check(grads: Params, state: EmptyState, params: Params) -> None:
        check_update(grads, params, {"strength": strength})

    @torch.no_grad()
    def apply(grads: Params, state: EmptyState, params: Params) -> tuple[Params, EmptyState]:
        dtype = accumulation_dtype(params)
        s_in, s_out, _ = generator_sums(params, structure, dtype, batch_dims)
        mu = (s_in - s_out) * per_entry(strength, s_in)
        add_selection_grads_(grads, params, structure, mu, batch_dims)
        return grads, state

    return Transformation(lambda params: EmptyState(), Update(check, apply), GRADIENTS, GRADIENTS)


def weight_decay(*, strength: Scalar) -> Transformation:
    """Adds ``strength * theta`` to the gradients (L2 regularisation, ``torch.optim``'s
    ``weight_decay``)."""
    strength = check_scalar(strength, "strength")

    def check(grads: Params, state: EmptyState, params: Params) -> None:
        check_update(grads, params, {"strength": strength})

    @torch.no_grad()
    def apply(grads: Params, state: EmptyState, params: Params) -> tuple[Params, EmptyState]:
        for name, g in grads.items():
            g.add_(per_entry(strength, g) * params[name])
        return grads, state

    return Transformation(lambda params: EmptyState(), Update(check, apply), GRADIENTS, GRADIENTS)


def sgd(lr: Scalar, *, momentum: float = MOMENTUM) -> Transformation:
    """``torch.optim.SGD``: the update ``-lr * b`` with ``b = g`` or, with momentum (a finite
    number ``>= 0``), the buffer ``b <- momentum * b + g`` (``b = g`` at the first step). ``lr``
    is read at every step."""
    lr, momentum = check_scalar(lr, "lr"), check_number(momentum, "momentum")

    def init(params: Params) -> SgdState:
        check_update(params, params)
        return SgdState(None, Token())

    def check(grads: Params, state: SgdState, params: Params) -> None:
        check_update(grads, params, {"lr": lr}, {"momentum_buffer": state.momentum_buffer})
        check_fresh(state)

    @torch.no_grad()
    def apply(grads: Params, state: SgdState, params: Params) -> tuple[Params, SgdState]:
        token, buffers = spend(state), state.momentum_buffer
        if momentum and buffers is None:
            buffers = {name: g.clone() for name, g in grads.items()}
        elif momentum:
            for name, g in grads.items():
                buffers[name].mul_(momentum).add_(g)
        directions = buffers if momentum else grads
        updates = {n: d * -per_entry(lr, d) for n, d in directions.items()}
        return updates, SgdState(buffers, token)

    return Transformation(init, Update(check, apply), GRADIENTS, UPDATES)


def adam(lr: Scalar, *, betas: tuple[float, float] = BETAS, eps: float = EPS) -> Transformation:
    """``torch.optim.Adam``: ``m <- lerp(m, g, 1 - beta1)``, ``v <- beta2 v + (1 - beta2) g^2``
    and the update ``-(lr / c1) m / (sqrt(v) / sqrt(c2) + eps)`` with ``c_i = 1 - beta_i^t``
    at step ``t`` (betas in ``[0, 1)``, ``eps`` a finite number ``>= 0``). ``lr`` is read at every
    step. The moments move in place and the step count in the returned state: a state given
    again (its returned state dropped) is refused."""
    lr, (beta1, beta2), eps = check_scalar(lr, "lr"), check_betas(betas), check_number(eps, "eps")

    def init(params: Params) -> AdamState:
        check_update(params, params)
        zeros = {n: torch.zeros_like(p) for n, p in params.items()}
        return AdamState(0, zeros, {n: torch.zeros_like(p) for n, p in params.items()}, Token())

    def check(grads: Params, state: AdamState, params: Params) -> None:
        moments = {"exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}
        check_update(grads, params, {"lr": lr}, moments)
        check_fresh(state)

    @torch.no_grad()
    def apply(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        token, t = spend(state), state.step + 1
        c1, c2 = 1 - beta1**t, 1 - beta2**t
        updates = {}
        for name, g in grads.items():
            m, v = state.exp_avg[name], state.exp_avg_sq[name]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / c2**0.5).add_(eps)
            updates[name] = m / denom * -(per_entry(lr, g) / c1)
        return updates, AdamState(t, state.exp_avg, state.exp_avg_sq, token)

    return Transformation(init, Update(check, apply), GRADIENTS, UPDATES)


ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default


def adamw(
    lr: Scalar,
    *,
    betas: tuple[float, float] = BETAS,
    eps: float = EPS,
    weight_decay: float = ADAMW_WEIGHT_DECAY,
) -> Transformation:
    """``torch.optim.AdamW``: :func:`adam`'s update plus the decoupled weight decay
    ``-lr * weight_decay * theta`` (the parameters shrink by ``1 - lr * weight_decay`` before
    Adam's step; the gradient Adam sees has no decay term; ``weight_decay`` a finite number
    ``>= 0``). ``lr`` is read at every step."""
    inner = adam(lr, betas=betas, eps=eps)
    weight_decay = check_number(weight_decay, "weight_decay")

    check, adam_apply = inner.update

    @torch.no_grad()
    def apply(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        updates, state = adam_apply(grads, state, params)
        for name, u in updates.items():
            u.sub_(per_entry(lr, u) * weight_decay * params[name])
        return updates, state

    return inner._replace(update=Update(check, apply))


def decoupled_penalty(
    structure: GaugeStructure, *, lr: Scalar, strength: Scalar, batch_dims: int = 0
) -> Transformation:
    """After an optimizer (chained behind it, on its updates): adds ``-lr * strength * grad P``
    of ``P = (1 / 4) sum_n mu_n^2`` at the step's parameters, i.e. ``-lr strength sum_n mu_n
    xi_n`` with ``xi_n(e) = w_n(e) theta_e`` the generators' tangent vectors. The step is
    vertical (tangent to the orbit: the function is unchanged to first order) and taken at the
    rate ``lr * strength`` outside the optimizer's preconditioner, as AdamW decouples weight
    decay; to first order it relaxes ``mu`` as the exact orbit step :func:`exact` at the same
    rate (``mu <- (I - 2 lr strength K) mu``). ``lr`` is read at every step."""
    lr, strength = (
        check_scalar(lr, "lr", batch_dims),
        check_scalar(strength, "strength", batch_dims),
    )
    _check_same_copies(lr=lr, strength=strength)

    def check(updates: Params, state: EmptyState, params: Params) -> None:
        check_update(updates, params, {"lr": lr, "strength": strength})

    @torch.no_grad()
    def apply(updates: Params, state: EmptyState, params: Params) -> tuple[Params, EmptyState]:
        dtype = accumulation_dtype(params)
        s_in, s_out, _ = generator_sums(params, structure, dtype, batch_dims)
        mu = (s_in - s_out) * -per_entry(lr * strength, s_in)
        add_selection_grads_(updates, params, structure, mu, batch_dims)
        return updates, state

    return Transformation(lambda params: EmptyState(), Update(check, apply), UPDATES, UPDATES)


def _stages(transformations: tuple[Transformation, ...], what: str) -> tuple[str | None, ...]:
    """``(takes, gives)`` of ``transformations`` one after the other, or ``ValueError`` where
    one takes what the one before does not give (a stage not stated matches any)."""
    takes = given = transformations[0].takes if transformations else None
    for i, t in enumerate(transformations):
        if given is not None and t.takes is not None and t.takes != given:
            raise ValueError(
                f"{what}: transformation {i} takes {t.takes}, the one before gives {given} "
                f"(the order is gradients -> optimizer -> updates)"
            )
        given = t.gives
    return takes, given


def chain(*transformations: Transformation) -> Transformation:
    """The transformations one after the other; the state is the tuple of their states. Every
    :class:`Update`'s ``check`` passes before any transformation changes anything (one made
    elsewhere, with a plain ``update``, checks what it checks when reached); ``ValueError`` when
    built for transformations out of order (one that takes what the one before does not give: a
    gradient transformation after an optimizer, two optimizers, ...)."""
    takes, gives = _stages(transformations, "chain")
    halves = [_halves(t.update) for t in transformations]

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transformations)

    def check(grads: Params, state: tuple, params: Params) -> None:
        if not isinstance(state, tuple) or len(state) != len(halves):
            raise ValueError(f"a chain of {len(halves)} takes a tuple of as many states")
        for (part, _), s in zip(halves, state, strict=True):
            if part is not None:
                part(grads, s, params)

    def apply(grads: Params, state: tuple, params: Params) -> tuple[Params, tuple]:
        states = []
        for (_, part), s in zip(halves, state, strict=True):
            grads, s = part(grads, s, params)
            states.append(s)
        return grads, tuple(states)

    return Transformation(init, Update(check, apply), takes, gives)


# -- steps: the parameters moved ------------------------------------------------------------------


@torch.no_grad()
def apply_updates_(params: Params, updates: Params) -> None:
    """``params += updates``, in place."""
    names = list(updates)
    torch._foreach_add_([params[n] for n in names], [updates[n] for n in names])


def _requires(t: Transformation, gives: str, what: str) -> None:
    """``ValueError`` unless ``t`` gives ``gives`` (or does not say what it gives)."""
    if t.gives not in (None, gives):
        raise ValueError(f"{what} takes a transformation that gives {gives}, not {t.gives}")


def applied(optimizer: Transformation) -> Transformation:
    """The step of ``optimizer`` (one that gives updates): its updates added to the parameters
    in place; ``update`` returns the parameters."""
    _requires(optimizer, UPDATES, "applied")
    check, inner = _halves(optimizer.update)

    def apply(grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        updates, state = inner(grads, state, params)
        apply_updates_(params, updates)
        return params, state

    update = apply if check is None else Update(check, apply)
    return Transformation(optimizer.init, update, optimizer.takes, PARAMETERS)


def advance(state: OrbitState, lr: Any, every: int) -> tuple[Any, OrbitState]:
    """One optimizer step at learning rate ``lr`` (a number, a tensor ``[*batch]`` or a tuple
    with one per parameter group): ``(lr_sum, state)``, ``lr_sum`` the sum of the learning rates
    since the last orbit step when one is due now (every ``every``-th step), else ``None``."""
    total = _plus(state.lr_sum, lr)
    if state.since + 1 < every:
        return None, OrbitState(state.since + 1, total)
    return total, OrbitState()


def _plus(total: Any, lr: Any) -> Any:
    """``total + lr``, a new object (never ``lr`` itself: a tensor lr may change in place);
    ``None`` and a parameter group added since count as 0."""
    if isinstance(lr, tuple):
        total = tuple(total or ())
        total += (0.0,) * (len(lr) - len(total))
        return tuple(a + b for a, b in zip(total, lr, strict=True))
    return (0.0 if total is None else total) + lr


def state_targets(params: Params, state: Any) -> Targets:
    """Each parameter (power 1) with the optimizer buffers of ``state`` (a state of this module,
    nested in tuples) that move with it: gradient-like ones (``momentum_buffer``, ``exp_avg``)
    by the inverse factor (power -1), squared ones (``exp_avg_sq``) by its square (-2)."""
    targets: Targets = {name: [(p, 1)] for name, p in params.items()}
    for key, buffers in _buffers(state):
        for name, b in buffers.items():
            targets[name].append((b, -1 if key in GRAD_LIKE else -2))
    return targets


def _buffers(state: Any) -> Iterator[tuple[str, Params]]:
    fields = getattr(state, "_fields", ())
    for i, value in enumerate(state if isinstance(state, tuple) else ()):
        key = fields[i] if fields else ""
        if key in GRAD_LIKE + SQUARED and isinstance(value, dict):
            yield key, value
        elif isinstance(value, tuple):
            yield from _buffers(value)


@torch.no_grad()
def orbit_step_(
    params: Params, state: Any, structure: GaugeStructure, rate: Tensor, batch_dims: int = 0
) -> None:
    """The exact orbit step in place: ``g(h)``, ``h`` the bounded step of
    :func:`gaugefix.relax_` at ``rate`` (float64, a number per copy ``[*batch]``), applied to
    ``params`` and transported to the optimizer buffers of ``state`` (a state of this module, or
    ``None``). The function is unchanged to rounding."""
    h, _ = orbit_step(params, structure, rate, batch_dims)
    rescale_(state_targets(params, state), structure, h, batch_dims)


def exact(
    step: Transformation,
    structure: GaugeStructure,
    *,
    lr: Scalar,
    strength: Scalar,
    every: int = EVERY,
    batch_dims: int = 0,
) -> Transformation:
    """``step`` (one that gives the parameters, such as :func:`applied`), then, after every
    ``every``-th step, the exact orbit step: ``g(h)`` with ``h`` the bounded step of
    :func:`gaugefix.relax_` at ``rate = strength * (the sum of lr over the steps since the last
    one)`` (per copy; a tensor ``lr`` or ``strength`` is read at every step), applied to the
    parameters and transported to the step's optimizer buffers. An optimizer step changes ``mu``
    by ``O(lr^2)``, so one orbit step every ``every`` steps at the summed rate acts like one at
    each, at ``1 / every`` of the cost. A copy whose squared sums are not finite, or whose ``lr``
    is 0 at the orbit step (frozen, as the sweep freezes a diverged run), does not move; a
    number ``strength`` 0 never acts."""
    check_every(every)
    _requires(step, PARAMETERS, "exact")
    lr, strength = (
        check_scalar(lr, "lr", batch_dims),
        check_scalar(strength, "strength", batch_dims),
    )
    _check_same_copies(lr=lr, strength=strength)
    acts = isinstance(strength, Tensor) or strength > 0

    def init(params: Params) -> ExactState:
        return ExactState(step.init(params), OrbitState(), Token())

    inner_check, inner_apply = _halves(step.update)

    def check(grads: Params, state: ExactState, params: Params) -> None:
        check_update(grads, params, {"lr": lr, "strength": strength})
        check_fresh(state)
        if inner_check is not None:
            inner_check(grads, state.inner, params)

    @torch.no_grad()
    def apply(grads: Params, state: ExactState, params: Params) -> tuple[Params, ExactState]:
        params, inner = inner_apply(grads, state.inner, params)
        token = spend(state)
        lr_sum, orbit = advance(state.orbit, lr, every)
        if acts and lr_sum is not None and structure.num_generators:
            rate = torch.as_tensor(strength * lr_sum, dtype=torch.float64)
            rate = torch.where(torch.as_tensor(lr, device=rate.device) > 0, rate, 0.0)
            orbit_step_(params, inner, structure, rate, batch_dims)
        return params, ExactState(inner, orbit, token)

    return Transformation(init, Update(check, apply), step.takes, PARAMETERS)


def scale_by_tensor(factors: Callable[[Params], Params]) -> Transformation:
    """Multiplies the updates of each parameter by its tensor's factor, ``factors(params)``
    computed once at ``init`` (a number per copy, ``[*batch]``, by name; a parameter without
    one keeps its updates): per-tensor learning-rate multipliers, as ``torch.optim`` parameter
    groups of their own learning rates give for SGD (with or without momentum). ``ValueError``
    at ``init`` for a factor that is not finite and ``>= 0`` or does not fit its parameter."""

    def init(params: Params) -> ScaleState:
        given = factors(params)
        for name, factor in given.items():
            label = f"the factor of {name!r}"
            if name not in params:
                raise ValueError(f"{label} is for no parameter")
            one = {name: params[name]}
            check_update(one, one, {label: check_scalar(factor, label)})
        return ScaleState(given)

    @torch.no_grad()
    def update(updates: Params, state: ScaleState, params: Params) -> tuple[Params, ScaleState]:
        scaled = {
            n: u * per_entry(state.factors[n], u) if n in state.factors else u
            for n, u in updates.items()
        }
        return scaled, state

    return Transformation(init, update, UPDATES, UPDATES)
