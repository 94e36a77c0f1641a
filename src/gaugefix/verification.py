"""A numerical check of a gauge structure on other inputs (:func:`verify`).

:func:`gaugefix.discover` traces the forward once, on the example it is given; a few ways of
reading sizes escape the trace (a plain number equal to the batch at the example, a size cached
before discovery, arithmetic on ``float(n)``), and there a generator found exact at the example
moves the outputs at other sizes. :func:`verify` runs the model on the inputs it will see, before
and after a random gauge, and names the generators that move its outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gaugefix.action import all_finite, apply_gauge_
from gaugefix.errors import GaugefixError, first_line
from gaugefix.precision import float64_copy, float64_outputs, frozen_randomness, relative_changes
from gaugefix.structure.gauge_structure import GaugeStructure, check_structure

__all__ = [
    "VERIFY_SCALE",
    "VERIFY_SEED",
    "VERIFY_TOLERANCE",
    "Verification",
    "VerificationError",
    "verify",
]

# The random gauge's ``h ~ N(0, VERIFY_SCALE^2)``: factors ``exp(h)`` of order 1 to 10, which a
# broken generator turns into a relative change of the outputs of order 1, and which stay far
# from float64's overflow even on an entry many generators act on.
VERIFY_SCALE = 1.0
VERIFY_SEED = 0
# The largest relative change of the outputs that counts as none. An exact gauge changes the
# float64 outputs by rounding alone: the unit roundoff 1.1e-16 times the depth and the
# conditioning of the forward, 1e-15 to 1e-13 on the zoo's and Hugging Face's models. A broken
# generator at scale 1 changes them by far more (1e-3 to 1). 1e-9 leaves three decades of margin
# above rounding, and catches breakages down to a billionth of the outputs' scale.
VERIFY_TOLERANCE = 1e-9


class VerificationError(GaugefixError, ValueError):
    """A model or inputs on which a structure cannot be checked (no floating output, outputs
    that are empty, not finite or all zero, outputs that differ between two forwards without a
    gauge, a model on the meta device, a model or an input that cannot be copied); the message
    says why."""


@dataclasses.dataclass(frozen=True, eq=False)
class Verification:
    """What :func:`verify` measured: ``max_change``, the largest relative change
    ``max |f_g(x) - f(x)| / max |f(x)|`` over the floating outputs under a random gauge ``g`` of
    every generator and under its inverse; ``tolerance``, the largest that counts as none;
    ``broken``, a bool tensor ``[num_generators]``, true for the generators found to move the
    outputs (all false when ``ok``). ``structure.restrict(~result.broken, reason)`` keeps the
    others."""

    max_change: float
    tolerance: float
    broken: Tensor

    @property
    def ok(self) -> bool:
        """The outputs kept to ``tolerance`` under a gauge of every generator (NaN fails)."""
        return self.max_change <= self.tolerance


def verify(
    model: nn.Module, structure: GaugeStructure, /, *inputs: Any, **kwargs: Any
) -> Verification:
    """Check ``structure`` numerically on ``model(*inputs, **kwargs)``: inputs of any shape the
    model accepts (other batch sizes, other lengths than the example it was discovered on).

    A float64 copy of ``model``, in its mode (train or eval), runs on the inputs (floating tensors
    in float64) once as it is and once after a random gauge ``h ~ N(0, 1)`` of every generator
    (seeded: :data:`VERIFY_SEED`) and once after its inverse ``-h`` (a generator that breaks only
    for factors above 1, or only below, shows in one of the two), in float64 throughout. Every
    forward starts from the same point: it runs on a fresh deep copy of that copy (parameters,
    buffers such as BatchNorm's statistics, and Python state such as a memo dict, a step counter or
    a list the forward appends to, all as on entry) and on fresh copies of the inputs (tensors
    copied, other values such as a key-value cache object deep-copied), with torch's random state
    reset (the same dropout masks). State outside the model and the inputs (class attributes,
    globals, Python's and NumPy's random state) is not reset: when the outputs move, forwards
    without a gauge before and after the bisection must repeat the first. The model's hooks run
    on the copies and see each forward (a hook object, not a function, is copied with the model).

    A numerical check is a test, not a proof: a change is relative to the largest entry of each
    floating output tensor (entries a billion times smaller may move unseen: return them as a
    tensor of their own), and on the factors ``exp(+-h)`` one draw reaches (a clamp that only a
    factor of 100 reaches passes); a forward that changes only after its third call passes on its
    first three, one that changes within the bisection and back blames more generators, and one
    that reads the model's tensors not through the module it runs on (a closure holding the
    model) or returns outputs kept from an earlier call (a global memo) shows no gauge.

    If the largest relative change of a floating output exceeds :data:`VERIFY_TOLERANCE`, the
    generators responsible are found by bisection: each half of a failing set is gauged on its own
    with the same draw (``h`` restricted to it, and ``-h``). Exact symmetries commute, so a set of
    exact generators is exact and a failing set has a failing half; when neither half fails
    numerically, the whole set is reported (never a generator wrongly kept). A pass costs 3
    forwards (as it is, ``h``, ``-h``), a failure 2 without a gauge and 4 per failing set split:
    at most ``5 + 4 k ceil(log2 N)`` for ``k`` broken among ``N`` (``5 + 4 m``: one in ``2^m``).

    ``model`` (its parameters, buffers, Python attributes and mode), the inputs and torch's
    random state are left as they were, also when it raises. A structure that does not fit
    ``model`` raises :meth:`GaugeStructure.bind`'s ``ValueError``; one without generators is ok
    without a forward; a model on the meta device, inputs that cannot be copied, outputs that
    cannot show a change (none floating, empty, not finite, all zero) or that change without a
    gauge raise :class:`VerificationError`. Typical use, after a discovery on one example:
    ``structure = structure.restrict(~result.broken, "moves the outputs at batch 3")``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    structure = check_structure(structure)
    structure.bind(model)
    n = structure.num_generators
    if n == 0:
        return Verification(0.0, VERIFY_TOLERANCE, torch.zeros(0, dtype=torch.bool))
    if any(t.is_meta for t in _state(model)):
        raise VerificationError("the model is on the meta device: its weights hold no values")
    copied = float64_copy(model, VerificationError, "verify works on a copy")
    device = next((t.device for t in _state(copied)), torch.device("cpu"))
    with frozen_randomness(device) as reset:
        change = _gauged_change(copied, structure, reset, inputs, kwargs)
        largest = change(torch.arange(n))
        ok = largest <= VERIFY_TOLERANCE  # False for NaN
        broken = torch.zeros(n, dtype=torch.bool) if ok else _blamed(change, n)
    return Verification(largest, VERIFY_TOLERANCE, broken)


def _blamed(change: Callable[[Tensor], float], n: int) -> Tensor:
    """The bool tensor ``[n]`` of the generators that bisection finds to move the outputs, all
    ``n`` of which together do, ``change`` as :func:`_gauged_change`'s; a forward without a
    gauge before the bisection and one after it must repeat the first
    (:class:`VerificationError`)."""
    _check_reproducible(change(torch.arange(0)), "before")
    broken = torch.zeros(n, dtype=torch.bool)
    for found in _bisected(lambda s: not change(s) <= VERIFY_TOLERANCE, torch.arange(n)):
        broken[found] = True
    _check_reproducible(change(torch.arange(0)), "after")
    return broken


def _check_reproducible(repeated: float, when: str) -> None:
    """:class:`VerificationError` when ``repeated``, the relative change of the outputs between
    the first forward and one without a gauge ``when`` (``"before"`` or ``"after"``) the
    bisection, exceeds :data:`VERIFY_TOLERANCE`: then a change under a gauge does not tell which
    generators move them."""
    if not repeated <= VERIFY_TOLERANCE:
        raise VerificationError(
            f"two forwards without a gauge, the first and one {when} the bisection, give "
            f"outputs that differ by {repeated:.3g} (relative): the forward depends on state "
            f"that verify does not reset (class attributes, globals, Python's or NumPy's random "
            f"numbers, a hook's closure), so a gauge's change cannot be told from it"
        )


def _state(model: nn.Module) -> list[Tensor]:
    """The parameters and buffers of ``model``, each storage once."""
    return [*model.parameters(), *model.buffers()]


def _float64_inputs(value: Any) -> Any:
    """A fresh copy of ``value``: the tensors in it (in tuples, lists and mappings) copied,
    floating ones in float64; other values deep-copied (a cache object a forward appends to),
    :class:`VerificationError` for one that cannot be."""
    if isinstance(value, Tensor):
        dtype = torch.float64 if value.is_floating_point() else value.dtype
        return value.detach().to(dtype, copy=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_float64_inputs(v) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_float64_inputs(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _float64_inputs(v) for k, v in value.items()}
    try:
        return copy.deepcopy(value)
    except Exception as err:  # whatever an object's __deepcopy__ raises
        raise VerificationError(
            f"cannot copy an input of type {type(value).__name__} ({type(err).__name__}: "
            f"{first_line(err)}); each forward of verify runs on a fresh copy of the inputs"
        ) from None


def _gauged_change(
    model: nn.Module,
    structure: GaugeStructure,
    reset: Callable[[], None],
    inputs: tuple,
    kwargs: dict,
) -> Callable[[Tensor], float]:
    """``change(members)``: the largest relative change of the float64 ``model``'s floating
    outputs under the random gauge ``h`` of the generators ``members`` (an index tensor; one draw
    for every call, restricted to ``members``, the others 0) and under its inverse ``-h`` (a
    generator that breaks only for factors above 1, or only below, shows in one of the two); no
    members: under no gauge (a second forward). Each forward runs on a fresh deep copy of
    ``model`` (its tensors and its Python state as on entry) and of the inputs, the random state
    reset before it. :class:`VerificationError` when the outputs on entry cannot show a change."""
    device = next((t.device for t in _state(model)), torch.device("cpu"))
    draws = torch.Generator().manual_seed(VERIFY_SEED)
    drawn = VERIFY_SCALE * torch.randn(
        structure.num_generators, generator=draws, dtype=torch.float64
    )

    def forward(h: Tensor | None) -> list[Tensor]:
        fresh = copy.deepcopy(model)
        if h is not None:
            apply_gauge_(fresh, structure, h.to(device))
        args, named = _float64_inputs(inputs), _float64_inputs(kwargs)
        reset()
        return float64_outputs(fresh, *args, **named)

    reference = _checked_reference(forward(None))

    def change(members: Tensor) -> float:
        gauges: tuple[Tensor | None, ...] = (None,)
        if members.numel():
            h = torch.zeros_like(drawn)
            h[members] = drawn[members]
            gauges = (h, -h)
        changes = [c for g in gauges for c in relative_changes(forward(g), reference)]
        return math.nan if any(math.isnan(c) for c in changes) else max(changes, default=0.0)

    return change


def _checked_reference(outputs: list[Tensor]) -> list[Tensor]:
    """``outputs``, or :class:`VerificationError` when they cannot show a change: none, on the
    meta device, empty, not finite (a NaN hides any change), or all zero."""
    if not outputs:
        raise VerificationError("the model's output on the inputs holds no floating tensor")
    if any(t.is_meta for t in outputs):
        raise VerificationError("the model's outputs on the inputs are on the meta device")
    if all(t.numel() == 0 for t in outputs):
        raise VerificationError("the model's outputs on the inputs are empty")
    if not all_finite(outputs):
        raise VerificationError("the model's output on the inputs is not finite")
    if all(not bool(t.any()) for t in outputs):
        raise VerificationError(
            "the model's outputs on the inputs are all zero: they cannot show whether a gauge "
            "changes them; give inputs on which they are not"
        )
    return outputs


def _bisected(fails: Callable[[Tensor], bool], members: Tensor) -> list[Tensor]:
    """The generators of the failing set ``members`` (an index tensor) that fail: each half
    that ``fails`` is searched in turn; a single generator, or a set neither of whose halves
    fails, is returned whole."""
    if members.numel() == 1:
        return [members]
    halves = [half for half in members.tensor_split(2) if fails(half)]
    if not halves:
        return [members]
    return [found for half in halves for found in _bisected(fails, half)]
