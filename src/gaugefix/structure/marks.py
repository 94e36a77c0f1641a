"""Numbers computed from sizes and from values, marked during a trace.

A Python number read from a tensor's shape (``x.shape[0]``) may differ for another input, and
one read from its values (``x.max().item()``) may differ for other data. During a trace such
numbers are returned as subclasses of ``int``/``float`` that carry a mark through arithmetic
(:class:`SizedInt`, :class:`ValuedInt`, ...), and ``math`` functions given marked numbers mark
their results, so that rules can tell a constant from a number that follows the input.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []


# -- numbers computed from sizes ---------------------------------------------------------------
# The floats ``float(n)`` returned for marked numbers ``n`` during a trace (an exact float cannot
# carry a mark: it is recorded by identity, and kept alive until the trace ends): id -> float,
# per thread (a trace is its thread's, as the torch function mode is), None outside a trace.
FLOATS_FROM_SIZES = threading.local()


def recorded_floats() -> dict[int, float] | None:
    """This thread's floats recorded as computed from sizes; None outside a trace."""
    return getattr(FLOATS_FROM_SIZES, "floats", None)


def lose_values() -> None:
    """Record that this thread's trace made a plain number from tensor values (``int(t)``,
    ``operator.index(t)``, ``float(x.item())``): a number whose later uses no mark follows."""
    lost = getattr(FLOATS_FROM_SIZES, "values_lost", None)
    if lost is not None:
        lost[0] = True


def values_lost() -> bool:
    """Whether this thread's trace made a plain number from tensor values (see
    :func:`lose_values`): any Python number an op gets may then have been computed from
    them."""
    lost = getattr(FLOATS_FROM_SIZES, "values_lost", None)
    return bool(lost and lost[0])


def lose_sizes() -> None:
    """Record that this thread's trace made a plain number from a size (``int(T)``, ``int(T /
    2)``): a number whose later uses no mark follows (``q[int(T) - 1]``)."""
    lost = getattr(FLOATS_FROM_SIZES, "sizes_lost", None)
    if lost is not None:
        lost[0] = True


def sizes_lost() -> bool:
    """Whether this thread's trace made a plain number from a size (see :func:`lose_sizes`):
    any Python number an op gets may then have been computed from one."""
    lost = getattr(FLOATS_FROM_SIZES, "sizes_lost", None)
    return bool(lost and lost[0])


class _FromSize:
    """A Python number computed during the trace from a size that may differ for another input
    (the batch or sequence length, ``x.shape[0]``): Python arithmetic on it keeps the mark,
    like ``torch.SymInt``, so a rule can tell ``B - 5`` (0 at the example only) from the
    constant 0. ``float(n)`` gives an exact float recorded by identity; arithmetic on that float
    loses the mark, and so does a float on the left of a marked int (``0.5 * B``). ``int(n)``
    must return a plain int, which no mark follows: it records that this thread's trace lost
    track of numbers computed from sizes (see :func:`sizes_lost`)."""

    __slots__ = ()

    def __int__(self) -> int:
        lose_sizes()
        return int.__int__(self) if isinstance(self, int) else float.__int__(self)

    def __float__(self) -> float:
        out = int.__float__(self) if isinstance(self, int) else float.__float__(self)
        floats = recorded_floats()
        if floats is not None:
            floats[id(out)] = out
        return out


def _losing(name: str) -> Callable[..., Any]:
    """The method ``name`` of a number computed from a size that gives something no mark
    follows (a string, bytes): it records that this thread's trace lost track of
    numbers computed from sizes (see :func:`sizes_lost`), so that ``int(str(T)) - 1`` or
    ``int.from_bytes(T.to_bytes(2))`` give numbers that count as computed from a size."""

    def method(self: Any, *args: Any) -> Any:
        lose_sizes()
        return getattr(int if isinstance(self, int) else float, name)(self, *args)

    method.__name__ = name
    return method


# The methods of a number that give what no mark follows: strings (``str(T)``, ``f"{T}"``),
# bytes, and ``T.__index__()`` called by name (Python itself reads an int subclass's value
# without it). Hashes and comparisons are left alone: models key caches by sizes
# (``functools.lru_cache``) and compare them in checks and branches (``T > 1``) all the time,
# and every later number counting as computed from a size would cost them generators.
_LOSING_METHODS = ("__str__", "__repr__", "__format__", "__index__", "to_bytes")


def _marked(value: Any, sized: bool = True, valued: bool = False) -> Any:
    """``value`` (a number, or a pair of them from ``divmod``) marked as computed from a size
    (``sized``) and from values read from a tensor (``valued``, see :class:`_FromValue`)."""
    if isinstance(value, tuple):
        return tuple(_marked(v, sized, valued) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (sized or valued):
        return value
    return _MARKED[sized, valued][isinstance(value, float)](value)


def _arithmetic(name: str) -> Callable[..., Any]:
    """The marked version of the number method ``name`` (an int with a float computes as a
    float); a number computed from values keeps that mark."""

    def method(self: Any, *args: Any) -> Any:
        base = int if isinstance(self, int) else float
        out = getattr(base, name)(self, *args)
        if out is NotImplemented and base is int and hasattr(float, name):
            out = getattr(float, name)(int.__float__(self), *args)
        sized = isinstance(self, _FromSize) or from_size(args)
        return out if out is NotImplemented else _marked(out, sized, from_value((self, args)))

    method.__name__ = name
    return method


_NUMBER_METHODS = (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
    "__rfloordiv__", "__truediv__", "__rtruediv__", "__mod__", "__rmod__", "__pow__", "__rpow__",
    "__neg__", "__pos__", "__abs__", "__divmod__", "__rdivmod__", "__round__", "__trunc__",
    "__floor__", "__ceil__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__", "__and__",
    "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__invert__", "bit_length",
    "conjugate", "as_integer_ratio",
)  # fmt: skip


class SizedInt(_FromSize, int):
    """An int computed from a size (see :class:`_FromSize`); its ``numerator`` and ``real``
    are itself, marked (``fractions.Fraction(T)`` reads them)."""

    @property
    def numerator(self) -> SizedInt:
        return self

    real = numerator


class SizedFloat(_FromSize, float):
    """A float computed from a size (see :class:`_FromSize`)."""


class _FromValue:
    """A Python number computed from values of a tensor that depends on the inputs or weights
    (``counts.tolist()``, ``x.sum().item()``): it may differ for another input, as a size does,
    and so may the shape of a tensor made from it (the pieces of ``h.split(counts, 1)``).
    ``int(n)`` and ``float(n)`` must return plain numbers, which no mark follows: they record
    that this thread's trace lost track of such numbers (see :func:`values_lost`)."""

    __slots__ = ()

    def __int__(self) -> int:
        lose_values()
        if isinstance(self, _FromSize):
            return _FromSize.__int__(self)
        return int.__int__(self) if isinstance(self, int) else float.__int__(self)

    def __float__(self) -> float:
        lose_values()
        if isinstance(self, _FromSize):
            return _FromSize.__float__(self)
        return int.__float__(self) if isinstance(self, int) else float.__float__(self)


class ValuedInt(_FromValue, int):
    """An int computed from tensor values (see :class:`_FromValue`)."""

    __slots__ = ()


class ValuedFloat(_FromValue, float):
    """A float computed from tensor values (see :class:`_FromValue`)."""

    __slots__ = ()


class SizedValuedInt(ValuedInt, SizedInt):
    """An int computed from a size and from tensor values."""


class SizedValuedFloat(ValuedFloat, SizedFloat):
    """A float computed from a size and from tensor values."""


# the classes of marked numbers, (int, float), by (from a size, from values)
_MARKED = {
    (True, False): (SizedInt, SizedFloat),
    (False, True): (ValuedInt, ValuedFloat),
    (True, True): (SizedValuedInt, SizedValuedFloat),
}
_MARKS = (_FromSize, _FromValue)


def any_number(x: Any, marked: Callable[[Any], bool]) -> bool:
    """Whether ``marked`` holds for the Python number ``x`` or one in nested tuples, lists,
    slices and dicts."""
    if x is None or isinstance(x, Tensor):  # no number (the most common leaves, first)
        return False
    if isinstance(x, slice):
        return any_number((x.start, x.stop, x.step), marked)
    if isinstance(x, (tuple, list)):
        for v in x:
            if any_number(v, marked):
                return True
        return False
    if isinstance(x, dict):
        return any_number(list(x.values()), marked)
    return marked(x)


# The leaves of an op's arguments that may hold a marked number: marked numbers themselves,
# floats (a float computed from a size is recorded by identity, see :func:`_sized_number`) and
# slices (their bounds). No other leaf (a plain int, ``None``, a dtype) carries a mark.
_MAYBE_MARKED = (float, slice, *_MARKS)


def scan(tree: Any, tensors: list[Tensor]) -> bool:
    """One walk over nested tuples, lists and dicts (an op's ``(args, kwargs)``): appends the
    tensors in them to ``tensors`` in the order of ``nested_tensors`` and returns whether a leaf
    may hold a marked number (see :data:`_MAYBE_MARKED`). When it returns ``False``,
    :func:`from_value` is ``False`` on every part of ``tree``, so is :func:`from_size` unless
    the trace lost track of sizes (see :func:`sizes_lost`), and no slice is in it."""
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return False
    if isinstance(tree, dict):
        tree = tree.values()
    elif not isinstance(tree, (list, tuple)):
        return isinstance(tree, _MAYBE_MARKED)
    maybe = False
    for item in tree:  # a tensor, None or a plain int: most items
        if isinstance(item, Tensor):
            tensors.append(item)
        elif item is not None and type(item) is not int:
            maybe = scan(item, tensors) or maybe
    return maybe


def from_value(x: Any) -> bool:
    """Whether the Python number ``x`` (or one in nested tuples, lists, slices and dicts) was
    computed from tensor values during the trace (see :class:`_FromValue`)."""
    return any_number(x, lambda v: isinstance(v, _FromValue))


def as_valued(out: Any) -> Any:
    """``out``, a number or nested lists of numbers read from a tensor, marked as computed
    from its values."""
    if isinstance(out, list):
        return [as_valued(v) for v in out]
    return _marked(out, sized=False, valued=True)


for _int, _float in _MARKED.values():
    for _cls, _base in ((_int, int), (_float, float)):
        for _method in _NUMBER_METHODS:
            if hasattr(_base, _method):
                setattr(_cls, _method, _arithmetic(_method))
for _cls, _base in ((SizedInt, int), (SizedFloat, float)):
    for _method in _LOSING_METHODS:
        if hasattr(_base, _method):
            setattr(_cls, _method, _losing(_method))


def from_size(x: Any) -> bool:
    """Whether the Python number ``x`` (or one in nested tuples, lists, slices and dicts) was
    computed from a size during the trace."""
    return any_number(x, _sized_number)


def _sized_number(x: Any) -> bool:
    """Whether the Python number ``x`` was computed from a size (marked, or a float recorded
    as such), or may have been: once the trace made a plain number from a size (see
    :func:`sizes_lost`), every number but a truth value counts."""
    if isinstance(x, _FromSize):
        return True
    if isinstance(x, (int, float)) and not isinstance(x, bool) and sizes_lost():
        return True
    if isinstance(x, float):
        floats = recorded_floats()
        return floats is not None and floats.get(id(x)) is x
    return False


# ``math`` functions convert their arguments to C numbers, which no mark survives: while a trace
# runs, those named here mark their results when an argument is marked (``math.sqrt(B)``).
_MATH_FUNCTIONS = (
    "sqrt", "cbrt", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "pow", "fabs",
    "fmod", "remainder", "copysign", "hypot", "dist", "prod", "fsum", "ldexp", "frexp", "modf",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh",
    "acosh", "atanh", "erf", "erfc", "gamma", "lgamma", "degrees", "radians", "isqrt", "gcd",
    "lcm", "comb", "perm", "factorial", "trunc", "floor", "ceil",
)  # fmt: skip
_MATH_LOCK = threading.Lock()
_MATH_ORIGINALS: dict[str, Any] = {}  # the functions replaced while traces run
_MATH_TRACES = [0]  # how many traces run (in any thread)


def _math_of_size(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``math`` function ``fn`` with its result marked when, in this thread's trace, one of
    its arguments was computed from a size or from tensor values; ``fn`` itself otherwise."""

    @functools.wraps(fn)
    def marked(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if recorded_floats() is None or _plain_ints(args, kwargs):
            return out
        return _marked(out, from_size((args, kwargs)), from_value((args, kwargs)))

    return marked


def _plain_ints(args: tuple, kwargs: dict) -> bool:
    """Whether a call's arguments are all plain ints or tuples of them (``math.gcd`` in
    ``Fraction`` arithmetic, ``math.prod(shape)``), which carry no mark: no subclass, and no
    float recorded by identity."""
    return not kwargs and all(
        type(a) is int or (type(a) in _SHAPES and all(type(n) is int for n in a)) for a in args
    )


_SHAPES = (tuple, torch.Size)  # ``math.prod(shape)``


@contextlib.contextmanager
def math_marking() -> Iterator[None]:
    """Replace the functions of :data:`_MATH_FUNCTIONS` in ``math`` by :func:`_math_of_size`
    while a trace runs; other threads' calls return what the originals return."""
    with _MATH_LOCK:
        if not _MATH_TRACES[0]:
            _MATH_ORIGINALS.update(
                (n, getattr(math, n)) for n in _MATH_FUNCTIONS if hasattr(math, n)
            )
            for name, fn in _MATH_ORIGINALS.items():
                setattr(math, name, _math_of_size(fn))
        _MATH_TRACES[0] += 1
    try:
        yield
    finally:
        with _MATH_LOCK:
            _MATH_TRACES[0] -= 1
            if not _MATH_TRACES[0]:
                for name, fn in _MATH_ORIGINALS.items():
                    setattr(math, name, fn)
