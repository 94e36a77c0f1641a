"""The pieces a ``GaugeStructure`` is made of: the kinds of generators, the signed terms of a
parameter, the exclusions; and how two terms of one parameter meet (the generators both name at
some entry, and the cancellation of opposite signs there)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BROADCAST_FACTOR",
    "cancel_opposite",
    "collisions",
    "Exclusion",
    "KINDS",
    "module_of",
    "ParamTerms",
    "share_components",
    "Term",
]


# The kinds of generators, from the most specific (a generator carrying several tags is shown
# as the first of them).
KINDS = ("rotary pair", "query-key", "value-output", "gated unit", "norm gain", "neuron")


class Exclusion(NamedTuple):
    """Channels of a producing module that are not generators, and why; for a parameter fixed
    before it produced any channel (read by an op discovery does not handle), the indices
    along its dim 0, with the op that fixed it. A reason names the first op at or after the
    module's own that blocks the channels or channels joined with them (the nearest blocking
    op downstream: a residual stream's projection names the norm that next reads the stream),
    and, when other modules produce channels joined with them, the first of those and how
    many more."""

    module: str
    reason: str
    channels: tuple[int, ...]


class Term(NamedTuple):
    """One signed term of a parameter's rescaling: the entries with ``index[e] = n`` are
    multiplied by ``a_n ** sign`` (``-1``: no generator). ``index``: int64 with the parameter's
    number of dims, broadcastable to its shape (size 1 along dims it does not vary with)."""

    index: Tensor
    sign: int


@dataclass(frozen=True)
class ParamTerms:
    """The terms of one parameter (``shape`` is the parameter's)."""

    name: str
    shape: tuple[int, ...]
    terms: tuple[Term, ...]


def module_of(param_name: str) -> str:
    """The module path of a parameter name (``"fc1.weight"`` -> ``"fc1"``)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


# The most entries, per entry of two maps of one parameter, of the table they broadcast to that
# is compared whole when looking for a generator both name at one entry.
BROADCAST_FACTOR = 4


def collisions(a: Tensor, b: Tensor) -> Tensor:
    """The components two maps of one parameter both name at some entry. The maps meet at an
    entry exactly where their coordinates along the dims both vary on (``shared``) agree; their
    broadcast table is compared where it has at most :data:`BROADCAST_FACTOR` times the maps'
    entries, else (a table up to the product of the maps' sizes) the components some
    coordinate along ``shared`` carries in both maps are found on the maps' own entries."""
    shared = [d for d in range(a.dim()) if a.shape[d] > 1 and b.shape[d] > 1]
    if not shared:  # every pair of values meets at some entry
        common = torch.from_numpy(np.intersect1d(a.unique().numpy(), b.unique().numpy()))
        return common[common >= 0]
    if math.prod(torch.broadcast_shapes(a.shape, b.shape)) <= BROADCAST_FACTOR * (
        a.numel() + b.numel()
    ):
        x, y = torch.broadcast_tensors(a, b)
        common = x[x == y].unique()
        return common[common >= 0]
    rows_a, rows_b = _by_coordinate(a, shared), _by_coordinate(b, shared)
    values, rank = torch.cat([rows_a[1], rows_b[1]]).unique(return_inverse=True)
    width = max(len(values), 1)
    keys_a = (rows_a[0] * width + rank[: len(rows_a[1])]).unique()
    keys_b = (rows_b[0] * width + rank[len(rows_a[1]) :]).unique()
    at = torch.searchsorted(keys_a, keys_b).clamp(max=max(len(keys_a) - 1, 0))
    both = keys_b[keys_a[at] == keys_b] if len(keys_a) else keys_b[:0]
    return values[both % width].unique()


def _by_coordinate(m: Tensor, shared: list[int]) -> tuple[Tensor, Tensor]:
    """The entries of a map naming a component, as (flat coordinate along the ``shared`` dims,
    component) pairs: two ``[k]`` int64 tensors, ``k`` at most ``m.numel()``."""
    rest = [d for d in range(m.dim()) if d not in shared]
    flat = m.permute(shared + rest).reshape(math.prod(m.shape[d] for d in shared), -1)
    coordinate, column = torch.nonzero(flat >= 0, as_tuple=True)
    return coordinate, flat[coordinate, column]


def share_components(c: Tensor, c2: Tensor) -> bool:
    """Whether two terms' component maps (compact, ``-1`` for none) name a component in common:
    only then can an entry carry one component with both signs. Compared on the maps' own
    entries through a table of the components ``c`` names, so that terms along different dims
    are never broadcast to the parameter's shape."""
    a, b = c[c >= 0], c2[c2 >= 0]
    if not len(a) or not len(b):
        return False
    seen = torch.zeros(int(a.max()) + 1, dtype=torch.bool)
    seen[a] = True
    return bool(seen[b[b < len(seen)]].any())


def cancel_opposite(terms: list[tuple[Tensor, int]]) -> list[tuple[Tensor, int]]:
    """Where two terms of opposite signs name the same generator at one entry (a layer applied
    to its own output), the entry is invariant under it: both terms drop it there."""
    terms = list(terms)
    for i in range(len(terms)):
        for j in range(i + 1, len(terms)):
            (a, sa), (b, sb) = terms[i], terms[j]
            if sa == sb or not share_components(a, b) or not collisions(a, b).numel():
                continue
            x, y = torch.broadcast_tensors(a, b)
            same = (x == y) & (x >= 0)
            terms[i] = (torch.where(same, -1, x), sa)
            terms[j] = (torch.where(same, -1, y), sb)
    return terms
