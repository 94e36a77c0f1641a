"""The base of every exception gaugefix raises on purpose."""

__all__ = ["GaugefixError"]


class GaugefixError(Exception):
    """A problem gaugefix detected and explained in one line. Each subclass also derives from
    the built-in exception it has always been (``ValueError`` or ``RuntimeError``), so either
    may be caught."""
