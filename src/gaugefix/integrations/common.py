"""What the training-framework callbacks share: their options and the statistics they log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gaugefix.distributed import check_same_structure
from gaugefix.moment import imbalance_stats
from gaugefix.soft import check_strength
from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import check_structure
from gaugefix.train.hook import GaugeFixing, Mode, check_mode_every, options_repr

# Why a generator is left out of the statistics of several hooks (one per optimizer).
UNACTED_REASON = "acted on by none of the gauge-fixing hooks (frozen parameters)"

__all__ = [
    "acted_structure",
    "callback_repr",
    "CallbackOptions",
    "check_structure_agrees",
    "prefixed_stats",
    "set_options",
]


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
    if structure is not None:
        check_structure(structure)
    callback.strength, callback.structure, callback.mode = strength, structure, mode
    callback.balance_at_start = options.get("balance_at_start", True)
    callback.prefix, callback.every = options.get("prefix", "gauge/"), every


def callback_repr(callback: Any) -> str:
    """A callback's repr: its class, :class:`gaugefix.GaugeFixing`'s options (as its repr words
    them) and the number of generators of its structure (``None`` until one is discovered)."""
    structure = callback.structure
    size = None if structure is None else structure.num_generators
    options = options_repr(callback.mode, callback.strength, callback.every)
    return f"{type(callback).__name__}({options}, generators={size})"


def acted_structure(structure: GaugeStructure, hooks: list[GaugeFixing]) -> GaugeStructure:
    """The generators of ``structure`` that the ``hooks`` (all on ``structure``) act on now,
    whose imbalance the callbacks log: one hook's :attr:`~gaugefix.GaugeFixing.active`
    (:meth:`~gaugefix.GaugeFixing.acted`, the generators touching frozen parameters left out);
    of several (one per optimizer) the generators any of them acts on; with none attached, or
    none left out, ``structure`` itself."""
    if not hooks:
        return structure
    acted = [hook.acted() for hook in hooks]
    if len(acted) == 1:
        return acted[0][0]
    keep = torch.stack([mask for _, mask in acted]).any(0)
    return structure if bool(keep.all()) else structure.restrict(keep, UNACTED_REASON)


def prefixed_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure, prefix: str
) -> dict[str, float]:
    """:func:`gaugefix.imbalance_stats` with every key prefixed (``gauge/mu_rel_rms``, ...); the
    callbacks pass :func:`acted_structure`."""
    return {prefix + k: v for k, v in imbalance_stats(source, structure).items()}


def check_structure_agrees(structure: GaugeStructure, device: torch.device) -> None:
    """In a run of several processes (``torch.distributed`` initialized), a
    :class:`~gaugefix.ShardingError` on every process unless all hold the same structure (one
    all-reduce over the default group, ``device`` that of its backend's tensors): a structure
    discovered on each process's own batch may differ (a mixture of experts), and replicas
    fixed by different groups drift apart."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        check_same_structure(structure, None, device)
