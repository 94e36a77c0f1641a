"""Timing helpers: every figure is a ratio of two sides measured side by side in one process,
alternating which side goes first, summarised by the median over pairs."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call, and its result."""
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def paired(
    sides: dict[str, Callable[[], Any]],
    pairs: int,
    warmup: int = 1,
    prepare: Callable[[str], None] | None = None,
    clock: Callable[[Callable[[], Any]], tuple[float, Any]] = timed,
) -> dict[str, list[float]]:
    """Time every side ``pairs`` times, in rounds: each round runs every side once, the order
    rotating from round to round so that no side always goes first. ``prepare(name)`` runs
    untimed before each call (e.g. restoring a model); ``clock(fn)`` times one (default
    :func:`timed`). Returns name -> seconds per round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            if prepare is not None:
                prepare(name)
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(pairs):
        k = i % len(names)
        order = names[k:] + names[:k]
        for name in order:
            if prepare is not None:
                prepare(name)
            seconds, _ = clock(sides[name])
            times[name].append(seconds)
    return times


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of ``numerator[i] / denominator[i]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


def summary(times: list[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds."""
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times)}
