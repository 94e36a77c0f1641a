"""The group action ``g(h) . theta`` and the transport of optimizer state.

``g(h)`` multiplies each parameter entry by ``exp(sum_n w_n(e) h_n)`` (one log-scale ``h_n`` per
generator), in place, so that references held by optimizers stay valid. It is exact up to
rounding and composes additively: ``g(h1) g(h2) = g(h1 + h2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gaugefix.distributed import (
    OPTIMIZER,
    agreed,
    everywhere,
    first_dtensor,
    local_targets,
    local_view,
    on_every_process,
    optimizer_passed,
    refuse_gathered,
    sharded,
)
from gaugefix.errors import check_number
from gaugefix.kernels import (
    Targets,
    applied_dtype,
    cached_on,
    factor_dtype,
    finite_flag,
    kernel_plan,
    rescale_,
)
from gaugefix.moment import refuse_meta
from gaugefix.structure import GaugeStructure

__all__ = [
    "all_finite",
    "apply_gauge_",
    "check_transport",
    "check_finite_params",
    "check_h",
    "finite_on_device",
    "gauge_params_",
    "move_",
    "moved_with",
    "optimizer_states",
    "optimizers",
    "random_gauge_",
    "refuse_shared_memory",
    "refuse_unmoved_settings",
    "refuse_unmovable",
    "untransportable_state",
]

# Optimizer state entries by how they scale when the parameter entry is multiplied by ``f``:
# gradient-like buffers by ``1/f``, squared-gradient buffers by ``1/f^2``.
GRAD_LIKE = ("momentum_buffer", "exp_avg")
SQUARED = ("exp_avg_sq", "max_exp_avg_sq")
# Numbers no gauge changes, left as they are: the step count, and NAdam's product of its
# momentum coefficients.
COUNTS = ("step", "mu_product")
# How each state entry moves when its parameter entry is multiplied by ``f``, by key: the power
# of ``f`` (-1: gradient-like, -2: squared-gradient), 0 for a count (left as it is).
# Adagrad's and RMSprop's buffers: the sum of squared gradients (power -2), RMSprop's average of
# squared gradients (-2) and, centered, of gradients (-1).
ACCUMULATED = {"sum": -2, "square_avg": -2, "grad_avg": -1}
POWERS = {
    **dict.fromkeys(GRAD_LIKE, -1),
    **dict.fromkeys(SQUARED, -2),
    **dict.fromkeys(COUNTS, 0),
    **ACCUMULATED,
}
_NUMBERS = (int, float)  # what a count may be besides a tensor of one entry
# The optimizers whose state moves exactly with a rescaling (the state built from the same loss
# gradients at the moved point), by their exact ``torch.optim`` class (a subclass may change what
# a key means), each with the keys it may hold. Any other optimizer holding state, and any other
# key, is refused, and so is a setting of :data:`UNMOVED_SETTINGS`: Adamax's eps sits inside its
# state, Adadelta's deltas hold eps, ASGD averages iterates, Rprop's step sizes have no single
# right move, Adafactor's moments are factored and L-BFGS's history is flat.
_MOMENTS = ("step", "exp_avg", "exp_avg_sq")
TRANSPORTABLE = {
    "SGD": ("momentum_buffer",),
    "Muon": ("momentum_buffer",),
    "Adam": (*_MOMENTS, "max_exp_avg_sq"),
    "AdamW": (*_MOMENTS, "max_exp_avg_sq"),
    "NAdam": (*_MOMENTS, "mu_product"),
    "RAdam": _MOMENTS,
    "SparseAdam": _MOMENTS,
    "Adagrad": ("step", "sum"),
    "RMSprop": ("step", "square_avg", "grad_avg"),
}
# The settings of a parameter group under which an optimizer of :data:`TRANSPORTABLE` makes state
# that no rescaling moves exactly, by class name: the setting (refused unless 0), the state it
# puts out of reach, and why.
UNMOVED_SETTINGS = {
    "Adagrad": (
        "initial_accumulator_value",
        "sum",
        "the sum of squared gradients starts at that constant, which does not scale",
    ),
    "RMSprop": (
        "momentum",
        "momentum_buffer",
        "it sums g / (sqrt(v) + eps), which no power of the factor moves (eps does not scale)",
    ),
}
# Optimizers whose per-parameter state, made at their first step, no gauge move transports (see
# :func:`optimizer_states`), by class name, with that state (a subclass counts): torch.optim's,
# transformers' Adafactor and torchao's low-bit Adam and AdamW; torch's own Adagrad and RMSprop
# (not a subclass, which may read its settings otherwise) are taken under the settings whose
# state moves (:data:`UNMOVED_SETTINGS`).
UNTRANSPORTABLE_STATE = {
    "Adagrad": "sum", "Adamax": "exp_inf", "RMSprop": "square_avg", "Adadelta": "square_avg",
    "Rprop": "prev and step_size", "ASGD": "ax", "Adafactor": "factored second moments",
    "LBFGS": "direction and history",
    **dict.fromkeys(
        ("Adam4bit", "Adam8bit", "AdamFp8", "AdamW4bit", "AdamW8bit", "AdamWFp8"),
        "quantized moments",
    ),
}  # fmt: skip
# Settings that torch reads from the optimizer's defaults, whatever the group's, when it makes
# the state: Adagrad fills a new ``sum`` with its defaults' ``initial_accumulator_value``.
_FROM_DEFAULTS = ("initial_accumulator_value",)
# What moves a parameter's optimizer state: no optimizer, one, or a list or tuple of them (a
# model trained by several, each over some of its parameters).
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None
# The dtypes of a gauge ``h`` (float8 has no norm to check it with).
H_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How close (relative) to its dtype's largest number a moved entry, or a product of the factors
# moving it, may come, and such a product to the smallest normal number: their rounding (a few
# float32 ulps) must not carry it over. A moved entry keeps a further margin for the roundings of
# its factor and of the partial products (:func:`_entry_margin`).
OVERFLOW_MARGIN = 1e-5


def finite_on_device(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: whether every entry of every tensor is finite
    (:func:`gaugefix.kernels.finite_flag`), without a host read; for ``DTensor`` s (FSDP2) each
    process checks its slices and all agree (one all-reduce)."""
    if sharded(tensors):
        local = finite_flag([t.to_local() if hasattr(t, "to_local") else t for t in tensors])
        return on_every_process(local, first_dtensor(tensors))
    return finite_flag(tensors)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (:func:`finite_on_device`), with one host
    read."""
    return not tensors or bool(finite_on_device(tensors))


def check_finite_params(params: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first parameter on the ``meta`` device (no data), not a
    floating-point tensor (:func:`refuse_quantized`), or with a NaN or infinite entry."""
    refuse_meta(params)
    refuse_quantized(params)
    if all_finite(list(params.values())):
        return
    for name, p in params.items():
        if not all_finite([p]):
            raise ValueError(f"parameter '{name}' contains NaN or inf; nothing was modified")


def refuse_quantized(params: dict[str, Tensor]) -> None:
    """``ValueError`` naming the first parameter that is not a floating-point tensor: an integer
    one, or a tensor subclass other than FSDP2's ``DTensor``, such as torchao's quantized
    weights. Rescaling needs its real entries: move along the orbit before quantizing."""
    for name, p in params.items():
        plain = type(p) in (Tensor, nn.Parameter) or sharded([p])
        if not (plain and p.dtype.is_floating_point):
            kind = p.dtype if plain else type(p).__name__
            raise ValueError(
                f"parameter '{name}' is {kind}, not a floating-point tensor: rescale before "
                "quantizing; nothing was modified"
            )


def check_h(h: Tensor, structure: GaugeStructure, params: dict[str, Tensor] | None = None) -> None:
    """``ValueError`` unless ``h`` is a finite floating tensor ``[num_generators]``; for
    ``DTensor`` ``params`` (FSDP2), on every process unless all hold the same ``h``
    (:func:`gaugefix.distributed.agreed`)."""
    n = structure.num_generators
    agreed(params or {}, {"h": n}, lambda: _check_h(h, structure), lambda _: (h,))


def _check_h(h: Tensor, structure: GaugeStructure) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"h must be a tensor, got {type(h).__name__}")
    if tuple(h.shape) != (structure.num_generators,):
        raise ValueError(
            f"h must have shape ({structure.num_generators},) (one entry per generator), "
            f"got {tuple(h.shape)}"
        )
    if h.is_meta or h.dtype not in H_DTYPES or not all_finite([h]):
        raise ValueError("h must be a finite floating-point tensor (float16 to float64) with data")


def optimizer_states(
    optimizer: torch.optim.Optimizer | None, params: dict[str, Tensor]
) -> dict[str, dict]:
    """The optimizer state of each parameter, checked to be transportable: the optimizer is one
    of :data:`TRANSPORTABLE` (exactly that class) and each entry one of its keys, a buffer
    shaped like its parameter (or ``None``) or a count holding one number. Another optimizer
    holding any state while it holds one of ``params`` is refused, wherever it keeps that state
    (L-BFGS keeps its flat history on its first parameter, gauged or not)."""
    powers = _state_powers(optimizer, params)
    out = {}
    for name, p in params.items() if powers else ():
        state = optimizer.state.get(p)
        if state:
            _moved_state(optimizer, powers, name, p, state)
            out[name] = state
    return out


def moved_with(optimizer: Optimizers, params: dict[str, Tensor]) -> Targets:
    """Each parameter (power 1) with what moves with it, read as it is now: its ``.grad`` and
    the gradient-like buffers (power -1) and squared-gradient buffers (power -2) of each of
    ``optimizer`` (:func:`optimizers`), checked as :func:`optimizer_states` checks them, in one
    pass over the parameters. For ``DTensor`` parameters (FSDP2), their local slices: to be
    rescaled with the structure of :func:`gaugefix.distributed.local_view`."""
    powers_of = [(opt, _state_powers(opt, params)) for opt in optimizers(optimizer)]
    # By identity: a tensor's hash is a Python call, an int's is not.
    states = [
        ({id(p): s for p, s in o.state.items()}, o, powers) for o, powers in powers_of if powers
    ]
    targets: Targets = {}
    for name, p in params.items():
        grad = p.grad
        out = [(p, 1)] if grad is None else [(p, 1), (grad, -1)]
        for by_id, opt, powers in states:
            if state := by_id.get(id(p)):
                out += _moved_state(opt, powers, name, p, state)
        targets[name] = out
    return local_targets(targets) if sharded(params.values()) else targets


def optimizers(optimizer: Optimizers) -> tuple[torch.optim.Optimizer, ...]:
    """``optimizer`` as a tuple: none, one, or those of a list or tuple (``TypeError`` for an
    entry that is not a ``torch.optim.Optimizer``, ``ValueError`` for one listed twice, whose
    state would move twice)."""
    if optimizer is None:
        return ()
    listed = tuple(optimizer) if isinstance(optimizer, (list, tuple)) else (optimizer,)
    for opt in listed:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(opt)}")
    if len({id(opt) for opt in listed}) < len(listed):
        raise ValueError(
            "an optimizer is listed more than once: its state would move more than once; "
            "nothing was modified"
        )
    return listed


def _state_powers(
    optimizer: torch.optim.Optimizer | None, params: dict[str, Tensor]
) -> dict[str, int] | None:
    """The :data:`POWERS` of the state keys :data:`TRANSPORTABLE` allows ``optimizer``, or
    ``None`` when no state moves: no optimizer, or another that holds none of ``params``'s
    (``TypeError`` for a non-optimizer, ``ValueError`` for another holding state)."""
    if optimizer is None:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    keys = _transportable_keys(optimizer)
    if keys is None:
        _refuse_unknown(optimizer, params)
        return None
    refuse_unmoved_settings(optimizer, params)
    return {key: POWERS[key] for key in keys}


def refuse_unmoved_settings(
    optimizer: torch.optim.Optimizer, params: dict[str, Tensor], made: bool = True
) -> None:
    """``ValueError`` naming the setting when a parameter group of ``optimizer`` that holds one
    of ``params`` (with state, when ``made``; else whether or not its state is made yet) has a
    setting of :data:`UNMOVED_SETTINGS` other than 0."""
    setting = UNMOVED_SETTINGS.get(type(optimizer).__name__)
    if setting is None:
        return
    key, state_key, why = setting
    ids = {id(p) for p in params.values()}
    for group in optimizer.param_groups:
        value = _setting_value(optimizer, group, key)
        held = (id(p) in ids and (optimizer.state.get(p) or not made) for p in group["params"])
        if value != 0 and any(held):
            raise ValueError(
                f"cannot transport optimizer state '{state_key}' of {type(optimizer).__name__} "
                f"with {key}={value}: {why}; only {key}=0 moves exactly; nothing was modified"
            )


def untransportable_state(
    optimizer: torch.optim.Optimizer, params: dict[str, Tensor]
) -> tuple[str, str] | None:
    """Before ``optimizer`` makes its state: the class (of its own or a base) and the state of
    :data:`UNTRANSPORTABLE_STATE` it will make, which no gauge move transports, or ``None``;
    for torch's own class of :data:`TRANSPORTABLE`, ``ValueError`` for a setting whose state
    does not move (:func:`refuse_unmoved_settings`, whether or not that state is made yet)."""
    if _transportable_keys(optimizer) is not None:
        refuse_unmoved_settings(optimizer, params, made=False)
        return None
    for cls in type(optimizer).__mro__:
        state = UNTRANSPORTABLE_STATE.get(cls.__name__)
        if state is not None:
            return cls.__name__, state
    return None


def _setting_value(optimizer: torch.optim.Optimizer, group: dict, key: str) -> object:
    """Setting ``key`` of ``group``, or, for a setting of :data:`_FROM_DEFAULTS` that is 0 there,
    of the optimizer's defaults."""
    value = group.get(key, 0)
    return optimizer.defaults.get(key, 0) if value == 0 and key in _FROM_DEFAULTS else value


def _moved_state(
    optimizer: torch.optim.Optimizer,
    powers: dict[str, int],
    name: str,
    p: Tensor,
    state: dict,
) -> list[tuple[Tensor, int]]:
    """The buffers of parameter ``p``'s ``state`` that move with it, with their powers, in the
    state's order; ``ValueError`` (:func:`_check_entry`) unless each entry is one of
    ``powers``' keys, a buffer shaped like ``p`` (or ``None``) or a count of one number."""
    out = []
    shape = p.shape
    for key, value in state.items():
        power = powers.get(key)
        if power and isinstance(value, Tensor) and value.shape == shape:
            out.append((value, power))
        elif power == 0 and _one_number(value) or power and value is None:
            continue
        else:
            _check_entry(optimizer, tuple(powers), name, p, key, value)
    return out


def _one_number(value: object) -> bool:
    """Whether a count holds one number (a Python number or a tensor of one entry)."""
    return value.numel() == 1 if isinstance(value, Tensor) else isinstance(value, _NUMBERS)


def _transportable_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...] | None:
    """The state keys :data:`TRANSPORTABLE` allows ``optimizer`` (``None``: not its class)."""
    cls = type(optimizer)
    keys = TRANSPORTABLE.get(cls.__name__)
    return keys if keys is not None and cls is getattr(torch.optim, cls.__name__, None) else None


def _refuse_unknown(optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> None:
    """``ValueError`` naming a state key when ``optimizer``, not of :data:`TRANSPORTABLE`,
    holds state and one of ``params``."""
    state = next((s for s in optimizer.state.values() if s), None)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if state is None or not any(id(p) in held for p in params.values()):
        return
    key = next((k for k in state if k not in POWERS), next(iter(state)))
    raise ValueError(
        f"cannot transport optimizer state '{key}' of {type(optimizer).__name__} (keys "
        f"{list(state)}): only the state of torch.optim's {', '.join(TRANSPORTABLE)} (not "
        "subclasses) is known to move with a rescaling; nothing was modified"
    )


def _check_entry(
    optimizer: torch.optim.Optimizer,
    keys: tuple[str, ...],
    name: str,
    p: Tensor,
    key: object,
    value: object,
) -> None:
    """``ValueError`` unless state entry ``key`` of parameter ``name`` is one of ``keys``: a
    buffer shaped like ``p`` (or ``None``), or a count of one number."""
    setting, state_key, reason = UNMOVED_SETTINGS.get(type(optimizer).__name__, (None,) * 3)
    if key == state_key and key not in keys:  # made before the setting was turned off
        why = f"made with {setting} other than 0: {reason}"
    elif key not in keys:
        why = f"not a state {type(optimizer).__name__} makes ({', '.join(keys)})"
    elif key in COUNTS:
        why = None if _one_number(value) else "a count that does not hold one number"
    else:
        like = value is None or (isinstance(value, Tensor) and value.shape == p.shape)
        why = None if like else "a buffer not shaped like its parameter"
    if why is not None:
        raise ValueError(
            f"cannot transport optimizer state '{key}' of {type(optimizer).__name__} for "
            f"parameter '{name}': {why}; nothing was modified"
        )


def gauge_params_(
    params: dict[str, Tensor],
    structure: GaugeStructure,
    h: Tensor,
    optimizer: Optimizers,
) -> None:
    """``g(h)`` on validated ``params`` (bound to ``structure``, or this process's slices and
    their local structure under FSDP2) with what moves with them: ``.grad`` and ``optimizer``'s
    state (:func:`moved_with`), checked by :func:`check_transport` (not here: the hot path
    of :class:`gaugefix.GaugeFixing` checks once)."""
    rescale_(moved_with(optimizer, params), structure, h)


def check_transport(optimizer: Optimizers, params: dict[str, Tensor]) -> None:
    """``ValueError`` before anything moves unless ``params`` and what moves with them can be
    moved in place: they hold data (not on the ``meta`` device), ``optimizer``'s state is
    transportable (:func:`optimizer_states`), every tensor :func:`moved_with` lists can
    be written in place (:func:`refuse_unmovable`) and no two of them share memory
    (:func:`refuse_shared_memory`)."""
    refuse_meta(params)
    targets = moved_with(optimizer, params)
    refuse_unmovable(targets)
    refuse_shared_memory(targets)


def refuse_unmovable(targets: Targets) -> None:
    """``ValueError`` naming the parameter when a tensor to be moved in place cannot be (the
    move would fail halfway): one that is not strided (a sparse gradient of
    ``nn.Embedding(sparse=True)``), an inference tensor outside ``torch.inference_mode``, or
    optimizer state on another device than its parameter."""
    inference = not torch.is_inference_mode_enabled()
    for name, tensors in targets.items():
        for t, _ in tensors:
            if t.device != tensors[0][0].device:
                raise ValueError(
                    f"the optimizer state of parameter '{name}' is on {t.device}, the parameter "
                    f"on {tensors[0][0].device}: they cannot move together; nothing was modified"
                )
            if t.layout != torch.strided:
                raise ValueError(
                    f"parameter '{name}' (or its gradient or optimizer state) is {t.layout}, "
                    "not strided: it cannot be moved in place (zero a sparse gradient first); "
                    "nothing was modified"
                )
            if inference and t.is_inference():
                raise ValueError(
                    f"parameter '{name}' (or its gradient or optimizer state) is an inference "
                    "tensor: move it inside torch.inference_mode(), or clone it first; nothing "
                    "was modified"
                )


def _refuse_overflow(params: dict[str, Tensor], reason: str | None) -> None:
    """``ValueError`` when :func:`overflowing` gave a ``reason``; for ``DTensor`` s (FSDP2) on
    every process when it did on one."""
    if sharded(params.values()):
        if everywhere(reason is None, first_dtensor(list(params.values()))):
            return
        reason = reason or "the gauge move would overflow a parameter on another process"
    elif reason is None:
        return
    raise ValueError(f"{reason}; nothing was modified")


def overflowing(targets: Targets, structure: GaugeStructure, h: Tensor) -> str | None:
    """Why ``g(h)`` could take the first such parameter's tensors out of range (one line), or
    ``None`` (an overflow is named before an underflow). An entry ``e`` of a tensor moved with
    power ``p`` is multiplied by the product of each term's factor ``exp(p x_t(e))``, formed in
    :func:`gaugefix.kernels.factor_dtype` and rounded to :func:`gaugefix.kernels.applied_dtype`.
    With ``up(e) = sum_t max(p x_t(e), 0)`` and ``down(e) = sum_t max(-p x_t(e), 0)`` every
    product of its factors lies between ``exp(-down)`` and ``exp(up)``: both within the normal
    range of those dtypes (below it a factor loses digits or becomes 0 where the moved entry
    need not; an all-zero tensor is not refused for it), and every moved entry at most
    ``|theta_e| exp(up)`` below its dtype's largest number by the roundings on the way
    (:func:`_entry_margin`). ``max_e up(e)`` is bounded by the
    sum of each term's largest exponent (equal where the terms vary along different dims: rows
    and columns), and ``down`` alike, without a temporary the size of the tensor; then one pass
    over each tensor (its largest entry), and a float64 pass entry by entry where those bounds
    do not decide."""
    device = next(iter(targets.values()))[0][0].device
    h = h.to(device=device, dtype=torch.float64)
    hx = torch.cat([h, h.new_zeros(1)])
    underflow = None  # reported only when nothing overflows
    for param in structure.plan(device):
        for t, power in targets.get(param.name, ()):
            if not t.numel():
                continue
            exponents = [power * term.sign * hx[term.slots] for term in param.terms]
            highest = sum(float(x.amax().clamp_min(0)) for x in exponents)
            lowest = sum(float(x.amin().clamp_max(0)) for x in exponents)
            low, high = _factor_range(t.dtype)
            if high - highest <= OVERFLOW_MARGIN:
                return _overflow(param.name)
            top = float(torch.linalg.vector_norm(t.detach(), math.inf))
            if top == 0:
                continue
            if lowest - low <= OVERFLOW_MARGIN:
                underflow = underflow or param.name
            margin = _entry_margin(t.dtype, power)
            if _log_max(t.dtype) - math.log(top) - highest > margin:
                continue
            ups = [x.clamp_min(0) for x in exponents]
            peak = float(t.detach().abs().to(torch.float64).log_().add_(sum(ups)).amax())
            if _log_max(t.dtype) - peak <= margin:
                return _overflow(param.name)
    if underflow is None:
        return None
    return (
        f"the factors moving parameter '{underflow}' (or its gradient or optimizer state) would "
        "underflow the dtype they are formed in"
    )


def _overflow(name: str) -> str:
    return (
        f"the gauge move would overflow parameter '{name}' (or its gradient or optimizer "
        "state) in its dtype"
    )


def _factor_range(dtype: torch.dtype) -> tuple[float, float]:
    """``log`` of the smallest normal and of the largest finite number that both the dtype the
    factors moving tensors of ``dtype`` are formed in and the one they are applied in hold."""
    formed, applied = factor_dtype(dtype), applied_dtype(dtype)
    low = max(math.log(torch.finfo(d).tiny) for d in (formed, applied))
    return low, min(_log_max(formed), _log_max(applied))


def _entry_margin(dtype: torch.dtype, power: int) -> float:
    """How far (in log) below ``dtype``'s largest number an entry times its exact factor must
    stay when moved with ``power``: :data:`OVERFLOW_MARGIN`, the rounding of the factor ``f`` to
    :func:`gaugefix.kernels.applied_dtype`, which the GPU layout applies ``|power|`` times
    (``log(1 + eps)`` each: a bfloat16 factor ``exp(0.0039)`` is ``1.0078``, which took a
    bfloat16 entry ``0.39%`` below its largest to inf), and the roundings to ``dtype`` between
    them (a float16 second moment ``17488 / f / f``, ``65502.6`` exactly, became inf)."""
    applied, own = (math.log1p(torch.finfo(d).eps) for d in (applied_dtype(dtype), dtype))
    return OVERFLOW_MARGIN + abs(power) * applied + (abs(power) - 1) * own


def _log_max(dtype: torch.dtype) -> float:
    """``log`` of ``dtype``'s largest finite number."""
    return math.log(torch.finfo(dtype).max)


def _span(t: Tensor) -> tuple[str, int, int, int]:
    """``(device, storage address, first byte, end byte)`` of the memory ``t`` reads."""
    size = t.element_size()
    start = t.storage_offset() * size
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (str(t.device), t.untyped_storage().data_ptr(), start, start + (last + 1) * size)


def _self_disjoint(t: Tensor) -> bool:
    """Whether ``t``'s entries provably lie in distinct memory: along its dims ordered by stride,
    each stride reaches past the extent of the dims before it (not so for an expanded dim)."""
    extent = 1
    for stride, n in sorted((s, n) for n, s in zip(t.shape, t.stride(), strict=True) if n > 1):
        if stride < extent:
            return False
        extent += (n - 1) * stride
    return True


def _share_bytes(tensors: list[Tensor]) -> bool:
    """Whether two entries of ``tensors`` (views of one storage) share a byte: every entry's
    bytes counted, in units of the largest size dividing every entry's size and offset."""
    spans = [_span(t) for t in tensors]
    low, high = min(s[2] for s in spans), max(s[3] for s in spans)
    unit = math.gcd(*(t.element_size() for t in tensors), *(s[2] - low for s in spans))
    units = torch.arange((high - low) // unit)
    index = []
    for t, (_, _, start, _) in zip(tensors, spans, strict=True):
        k = t.element_size() // unit
        strides = (*(s * k for s in t.stride()), 1)
        index.append(units.as_strided((*t.shape, k), strides, (start - low) // unit).reshape(-1))
    return bool(torch.bincount(torch.cat(index)).max() > 1)


def refuse_shared_memory(targets: Targets) -> None:
    """``ValueError`` naming the parameters when two tensors to be moved in place (parameters,
    gradients, optimizer state) share memory, or entries of one do (an expanded tensor): a
    move would scale the shared entries twice, or fail halfway. Views of one flat buffer that
    do not overlap pass; an exact check only where their byte ranges meet."""
    items = [(name, t) for name, ts in targets.items() for t, _ in ts if t.numel()]
    spans = sorted((_span(t), i) for i, (_, t) in enumerate(items))
    clusters: list[list[int]] = []
    end: tuple = ()
    for (device, address, start, stop), i in spans:
        if end and end[:2] == (device, address) and start < end[2]:
            clusters[-1].append(i)
            end = (device, address, max(stop, end[2]))
        else:
            clusters.append([i])
            end = (device, address, stop)
    for cluster in clusters:
        tensors = [items[i][1] for i in cluster]
        if (len(tensors) == 1 and _self_disjoint(tensors[0])) or not _share_bytes(tensors):
            continue
        names = sorted({items[i][0] for i in cluster})
        raise ValueError(
            f"parameters {names} (or their gradients or optimizer state) share memory: a gauge "
            "move in place would scale shared entries more than once; nothing was modified"
        )


@torch.no_grad()
def apply_gauge_(
    model: nn.Module,
    structure: GaugeStructure,
    h: Tensor,
    optimizer: Optimizers = None,
) -> None:
    """Apply ``g(h)`` to ``model`` in place: every entry is multiplied by
    ``exp(sum_n w_n(e) h_n)``. ``h`` has shape ``[num_generators]``.

    Gradients in ``.grad`` (of frozen parameters too) and, when ``optimizer`` is given, its state
    are transported (each one's, for a list or tuple of optimizers: pass every optimizer that
    holds a moved parameter, as the state of any other stays where it was; averaged copies such
    as ``AveragedModel``'s are not moved): gradient-like buffers (SGD and Muon momentum, Adam
    ``exp_avg``, RMSprop's centered ``grad_avg``) scale by the inverse factor, second moments
    (Adam ``exp_avg_sq``, Adagrad ``sum``, RMSprop ``square_avg``) by its square, counts stay.
    For SGD, Adam, AdamW, NAdam, RAdam, Muon, Adagrad and RMSprop that is the state built from
    the same loss gradients at the moved point; with L2 weight decay coupled into the gradient
    (SGD with momentum, Adam, Adagrad, RMSprop, NAdam or RAdam without
    ``decoupled_weight_decay``) the buffers also hold ``wd * theta`` and are moved as gradients
    all the same, not rebuilt. SparseAdam's moments move like Adam's. Adagrad with
    ``initial_accumulator_value != 0`` and RMSprop with ``momentum > 0``, in a group holding a
    moved parameter, are refused (:func:`refuse_unmoved_settings`), as is any other optimizer
    holding state (Adamax, L-BFGS, ..., subclasses and optimizers of other packages) and any
    state key these do not make (:func:`optimizer_states`). Everything is validated first; on
    error nothing is modified: an ``h`` whose factors could overflow a moved tensor's dtype, or
    fall below the normal range of the dtype they are formed in, is refused
    (:func:`overflowing`). A moved entry is the product rounded to its dtype: one whose exact
    value lies below half the smallest subnormal rounds to 0, as any product does.
    """
    params = structure.bind(model, sharded=True)
    refuse_gathered(model, params)
    check_finite_params(params)
    move_(params, structure, h, optimizer)  # checks h and the optimizer first


def move_(
    params: dict[str, Tensor],
    structure: GaugeStructure,
    h: Tensor,
    optimizer: Optimizers,
) -> None:
    """``g(h)`` on bound ``params`` and what moves with them (:func:`gauge_params_`, on this
    process's slices under FSDP2), for callers that validated the parameters: ``ValueError``
    before anything moves unless ``h`` is one finite number per generator, ``optimizer``'s
    state can move (:func:`check_transport`) and ``h`` keeps every moved tensor in its dtype's
    range: proved by the per-tensor bound (:func:`provably_in_range`), else decided by
    :func:`overflowing`; for ``DTensor`` s each process bounds its slices and all agree (one
    all-reduce), and where one does not prove it every process runs :func:`overflowing`. For
    ``DTensor`` s every process must hold the same ``h`` and pass optimizers or not alike
    (:func:`gaugefix.distributed.agreed`: one all-reduce)."""
    agreed(
        params,
        {"h": structure.num_generators, OPTIMIZER: 1},
        lambda: (_check_h(h, structure), check_transport(optimizer, params)),
        lambda _: (h, optimizer_passed(optimizer)),
    )
    if not params:
        return
    h = h.to(next(iter(params.values())).device)
    _, local = local_view(params, structure)
    targets = moved_with(optimizer, params)
    if not bool(provably_in_range(targets, local, h, params)):  # one host read
        _refuse_overflow(params, overflowing(targets, local, h))
    rescale_(targets, local, h)


# The largest |log| of a factor that float32 holds as a normal number with room (exp(+-87.3)).
SAFE_EXPONENT = 80.0
# How far (in log) below its dtype's largest number a moved entry must stay to pass the bound of
# in_range_by_tensor (else overflowing decides): more than overflowing's largest margin, a
# bfloat16 second moment's (three roundings of log(1 + 2^-7), :func:`_entry_margin`).
RANGE_MARGIN = 3e-2
# How many tables of in_range_by_tensor (one per signature of the moved tensors) a range index
# keeps before it forgets them all: a training loop meets one or two (before and after the
# optimizer makes its state).
_TABLES_KEPT = 8


def provably_in_range(
    targets: Targets,
    structure: GaugeStructure,
    h: Tensor,
    params: dict[str, Tensor] | None = None,
) -> Tensor:
    """:func:`in_range_by_tensor` (a 0-dim bool tensor on the device, no host read). With
    ``DTensor`` ``params`` (FSDP2), whose local slices ``targets`` and ``structure`` are,
    whether it holds on every process (one all-reduce): every process gets the same answer."""
    fits = in_range_by_tensor(targets, structure, h)
    if params is not None and sharded(params.values()):
        fits = on_every_process(fits, first_dtensor(list(params.values())))
    return fits


class RangeIndex(NamedTuple):
    """Where the rows of a :class:`gaugefix.kernels.KernelPlan`'s ``terms`` (``[M, T]``) belong:
    ``segments`` (``[M]``) numbers each row's parameter and slot shape (a segment: the slots of
    that parameter's terms of that shape, every slot once), ``owners`` (``[S]``) the parameter of
    each segment, by its place in the structure (``places``: name -> place). ``tables``: the
    :class:`RangeTable` of each signature of moved tensors met so far."""

    segments: Tensor
    owners: Tensor
    places: dict[str, int]
    tables: dict[tuple, RangeTable]


class RangeTable(NamedTuple):
    """What :func:`in_range_by_tensor` needs of ``K`` moved tensors besides their entries:
    ``sides`` (``[K, 2]`` long) the places in the flattened ``[P, 2]`` exponent bounds of the
    tensor's up and down exponents, ``powers`` (``[K, 1]`` float64) ``|p|``, ``limits``
    (``[K]`` float64) ``log`` of its dtype's largest number less ``RANGE_MARGIN``."""

    sides: Tensor
    powers: Tensor
    limits: Tensor


# The attribute of a structure that caches its range indices by device (as its kernel plans).
_RANGE_ATTR = "_range_indices"


def range_index(structure: GaugeStructure, device: torch.device | str) -> RangeIndex:
    """The :class:`RangeIndex` of ``structure``'s kernel plan on ``device`` (built once, then
    cached on the structure)."""
    return cached_on(structure, _RANGE_ATTR, device, lambda d: _built_index(structure, d))


def _built_index(structure: GaugeStructure, device: torch.device) -> RangeIndex:
    """:func:`range_index`, built from the kernel plan's groups."""
    plan = kernel_plan(structure, device)
    places = {name: k for k, name in enumerate(structure.params)}
    owners, sizes = [], []
    for group, shapes in zip(plan.groups, plan.shapes, strict=True):
        for shape in shapes:  # [L, *slot_shape]: parameter l's rows follow its predecessors'
            owners += [places[name] for name in group.names]
            sizes += [math.prod(shape[1:])] * len(group.names)
    owners_t = torch.tensor(owners, dtype=torch.long, device=device)
    counts = torch.tensor(sizes, dtype=torch.long, device=device)
    segments = torch.repeat_interleave(torch.arange(len(owners), device=device), counts)
    return RangeIndex(segments, owners_t, places, {})


def exponent_bounds(structure: GaugeStructure, h: Tensor) -> Tensor:
    """``[P, 2]`` float64, per parameter of ``structure`` (in its order): ``U = sum_t max_e
    max(sign_t h[slot_t(e)], 0)`` and ``D`` the same of ``-sign_t h``, sums over its terms of
    their largest exponents, so that ``-D <= sum_t sign_t h[slot_t(e)] <= U`` for every entry
    ``e`` (with ``h = 0`` on the dummy slot); an entry moved with power ``p`` then takes a
    factor between ``exp(-|p| D)`` and ``exp(|p| U)`` for ``p > 0`` (``U`` and ``D`` swapped
    for ``p < 0``), and so does every product of its terms' factors. The sums of
    :func:`overflowing`, for every parameter at once: one gather over the plan's ``terms``, one
    segment maximum and one segment sum, no host read."""
    index = range_index(structure, h.device)
    plan = kernel_plan(structure, h.device)
    hx = torch.cat([h.to(torch.float64), h.new_zeros(1, dtype=torch.float64)])
    x = hx[plan.terms] * plan.term_signs  # [M, T]: each term's exponent at each slot
    x = torch.cat([x, -x], dim=-1)
    width = plan.terms.shape[-1]
    peaks = x.new_zeros(len(index.owners), 2 * width)  # from 0: the terms' maxima clamped at 0
    peaks.scatter_reduce_(0, index.segments[:, None].expand_as(x), x, reduce="amax")
    sides = peaks.view(-1, 2, width).sum(-1)  # [S, 2]
    out = x.new_zeros(len(index.places), 2)
    return out.index_add_(0, index.owners, sides)


def in_range_by_tensor(targets: Targets, structure: GaugeStructure, h: Tensor) -> Tensor:
    """A 0-dim bool tensor, without a host read: whether a per-tensor bound that implies
    :func:`overflowing`'s proves that ``g(h)`` keeps every target in range. A tensor moved with
    power ``p`` with its parameter (of ``structure``; others do not move) takes factors within
    ``exp(-down)`` and ``exp(up)`` (:func:`exponent_bounds`): both ``<= SAFE_EXPONENT`` keeps
    every factor and partial product normal in float32 (factors are formed and applied in
    float32 or wider, or in bfloat16, whose range is float32's), and its largest entry times
    ``exp(up)`` must stay below its dtype's largest number by ``RANGE_MARGIN`` (in log). With
    ``k`` terms per entry at most, ``up, down <= 2 k max|h|``; exact for a tensor's largest
    entry where its terms vary along different dims and peak at it. The table of the tensors'
    places, powers and dtypes is built once per signature (:class:`RangeTable`)."""
    index = range_index(structure, h.device)
    tensors, signature = [], []
    for name, moved in targets.items():
        place = index.places.get(name)
        for t, power in moved if place is not None else ():
            if t.numel():
                tensors.append(t)
                signature.append((place, power, t.dtype))
    if not tensors:
        return torch.tensor(True, device=h.device)
    table = _range_table(index, tuple(signature), h.device)
    bounds = exponent_bounds(structure, h).reshape(-1)
    exps = table.powers * bounds[table.sides]  # [K, 2]: up, down
    tops = torch.stack(torch._foreach_norm(tensors, math.inf)).to(bounds.device, torch.float64)
    room = table.limits - tops.log()
    return (exps.amax() <= SAFE_EXPONENT) & (room > exps[:, 0]).all()


def _range_table(index: RangeIndex, signature: tuple, device: torch.device) -> RangeTable:
    """The :class:`RangeTable` of moved tensors by their ``(place, power, dtype)``, cached in
    ``index`` by that signature (which alone decides it)."""
    table = index.tables.get(signature)
    if table is None:
        if len(index.tables) >= _TABLES_KEPT:
            index.tables.clear()
        sides = [(2 * k + int(p < 0), 2 * k + int(p > 0)) for k, p, _ in signature]
        limits = [_log_max(dtype) - RANGE_MARGIN for _, _, dtype in signature]
        table = index.tables[signature] = RangeTable(
            torch.tensor(sides, dtype=torch.long, device=device),
            torch.tensor([[abs(p)] for _, p, _ in signature], dtype=torch.float64, device=device),
            torch.tensor(limits, dtype=torch.float64, device=device),
        )
    return table


def random_gauge_(
    model: nn.Module,
    structure: GaugeStructure,
    scale: float,
    generator: torch.Generator | None = None,
    optimizer: Optimizers = None,
) -> Tensor:
    """Apply a random gauge transformation ``h ~ N(0, scale^2)`` (float64, one entry per
    generator, drawn on the generator's device) and return ``h``. Under FSDP2 every process
    must draw the same ``h`` (a ``generator`` seeded alike): else ``ShardingError``. A refused
    move leaves the generator (torch's global one when none is given) as it was."""
    check_number(scale, "scale")
    source = generator if generator is not None else torch.default_generator
    state = source.get_state()
    h = scale * torch.randn(
        structure.num_generators, generator=source, dtype=torch.float64, device=source.device
    )
    try:
        apply_gauge_(model, structure, h, optimizer)
    except Exception:
        source.set_state(state)
        raise
    return h
