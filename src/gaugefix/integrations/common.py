"""What the training-framework callbacks share: their options and the statistics they log."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from gaugefix.moment import imbalance_stats
from gaugefix.soft import check_strength
from gaugefix.structure import GaugeStructure
from gaugefix.train.hook import check_every


def check_options(
    strength: float, mode: str, structure: GaugeStructure | None, every: int
) -> float:
    """``strength`` as a float, or ``ValueError`` / ``TypeError`` naming the bad option."""
    strength = check_strength(strength)
    if mode not in ("exact", "penalty"):
        raise ValueError(f"mode must be 'exact' or 'penalty', got {mode!r}")
    check_every(every)
    if structure is not None and not isinstance(structure, GaugeStructure):
        raise TypeError(f"structure must be a GaugeStructure, got {type(structure).__name__}")
    return strength


def prefixed_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure, prefix: str
) -> dict[str, float]:
    """:func:`gaugefix.imbalance_stats` with every key prefixed (``gauge/mu_rel_rms``, ...)."""
    return {prefix + k: v for k, v in imbalance_stats(source, structure).items()}
