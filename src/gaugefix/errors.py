"""The base of every exception gaugefix raises on purpose, the check of number arguments, and
the one line of an exception that gaugefix quotes."""

from __future__ import annotations

import math
import numbers
import reprlib

__all__ = ["GaugefixError", "check_count", "check_number", "first_line"]


class GaugefixError(Exception):
    """A problem gaugefix detected and explained in one line. Each subclass also derives from
    the built-in exception it has always been (``ValueError`` or ``RuntimeError``), so either
    may be caught."""


def check_number(value: object, name: str, minimum: float = 0.0, *, strict: bool = False) -> float:
    """``value`` as a float, or a one-line ``ValueError`` unless it is a finite real number (not
    a bool) ``>= minimum`` (``> minimum`` when ``strict``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    x = float(value) if ok else math.nan  # type: ignore[arg-type]
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {shown(value)}")
    return x


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """``value``, or a one-line ``ValueError`` unless it is an integer ``>= minimum`` (not a
    bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {shown(value)}")
    return value


def shown(value: object) -> str:
    """``repr(value)``, or for a value nested too deeply for it (a corrupted state read from a
    file) its first levels (``reprlib``)."""
    try:
        return repr(value)
    except RecursionError:
        return reprlib.repr(value)


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when the message is empty): what a
    one-line error quotes of an exception from elsewhere."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
