"""What the training-framework callbacks share: their options and the statistics they log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from torch import Tensor, nn

from gaugefix.moment import imbalance_stats
from gaugefix.soft import check_strength
from gaugefix.structure import GaugeStructure
from gaugefix.train.hook import Mode, check_mode_every

__all__ = ["CallbackOptions", "prefixed_stats", "set_options"]


class CallbackOptions(TypedDict, total=False):
    """The keyword options every callback takes (default in brackets): ``structure``, the
    :class:`~gaugefix.GaugeStructure` to fix (``None``: discovered by the callback); ``mode``,
    ``"exact"`` or ``"penalty"`` (``"exact"``); ``balance_at_start``, balance when gauge fixing
    starts (``True``); ``prefix`` of the logged statistics' keys (``"gauge/"``); ``every``, the
    optimizer steps between exact orbit steps (:data:`gaugefix.train.hook.EVERY`; penalty mode
    acts at every step and takes only 1). ``mode``, ``balance_at_start`` and ``every`` are
    :class:`gaugefix.GaugeFixing`'s."""

    structure: GaugeStructure | None
    mode: Mode
    balance_at_start: bool
    prefix: str
    every: int | None


def set_options(callback: Any, strength: float, options: CallbackOptions) -> None:
    """Check ``strength`` and ``options`` (``TypeError`` naming an unknown key, ``ValueError`` /
    ``TypeError`` naming a bad value) and set them, defaults filled in, as the callback's
    attributes of the same names."""
    unknown = sorted(set(options) - set(CallbackOptions.__annotations__))
    if unknown:
        raise TypeError(f"{type(callback).__name__} got unknown option(s): {', '.join(unknown)}")
    strength = check_strength(strength)
    structure, mode = options.get("structure"), options.get("mode", "exact")
    every = check_mode_every(mode, options.get("every"))
    if structure is not None and not isinstance(structure, GaugeStructure):
        raise TypeError(f"structure must be a GaugeStructure, got {type(structure).__name__}")
    callback.strength, callback.structure, callback.mode = strength, structure, mode
    callback.balance_at_start = options.get("balance_at_start", True)
    callback.prefix, callback.every = options.get("prefix", "gauge/"), every


def prefixed_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure, prefix: str
) -> dict[str, float]:
    """:func:`gaugefix.imbalance_stats` with every key prefixed (``gauge/mu_rel_rms``, ...)."""
    return {prefix + k: v for k, v in imbalance_stats(source, structure).items()}
