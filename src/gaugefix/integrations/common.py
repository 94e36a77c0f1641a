"""What the training-framework callbacks share: their options and the statistics they log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from gaugefix.moment import imbalance_stats
from gaugefix.soft import check_strength
from gaugefix.structure import GaugeStructure
from gaugefix.train.hook import Mode, check_every

__all__ = ["prefixed_stats", "set_options"]


def set_options(
    callback: Any,
    strength: float,
    structure: GaugeStructure | None,
    mode: Mode,
    balance_at_start: bool,
    prefix: str,
    every: int,
) -> None:
    """Check the options every callback takes (``ValueError`` / ``TypeError`` naming a bad
    one) and set them as the callback's attributes of the same names."""
    strength = check_strength(strength)
    if mode not in ("exact", "penalty"):
        raise ValueError(f"mode must be 'exact' or 'penalty', got {mode!r}")
    check_every(every)
    if structure is not None and not isinstance(structure, GaugeStructure):
        raise TypeError(f"structure must be a GaugeStructure, got {type(structure).__name__}")
    callback.strength, callback.structure, callback.mode = strength, structure, mode
    callback.balance_at_start, callback.prefix, callback.every = balance_at_start, prefix, every


def prefixed_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure, prefix: str
) -> dict[str, float]:
    """:func:`gaugefix.imbalance_stats` with every key prefixed (``gauge/mu_rel_rms``, ...)."""
    return {prefix + k: v for k, v in imbalance_stats(source, structure).items()}
