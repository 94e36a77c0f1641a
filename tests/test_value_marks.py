"""Numbers computed from tensor values that Python makes plain (``int(t)``, ``operator.index(t)``,
``float(n)``, ``int(n)``, ``math`` functions) or tensors that give split points and slice bounds
(``h.tensor_split(ends, 1)``, ``h[:, a:b]``): the pieces they shape may be empty on the example
and filled on another input, so discovery must treat them as shaped by values.

Each model is :class:`test_empty_routes.Routed` with the rows sorted by expert and cut, in the
layout ``[channels, tokens]``, by counts computed from the route (a one-hot sum, whose shape
depends on no value); expert 0 is the identity, reached by no row of the example, its empty
piece joined back by ``torch.cat``. Fresh inputs reach every expert; the logits must not change
(1e-10) under a random gauge of scale 2.5.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import gaugefix
from test_empty_routes import (
    DIM,
    DTYPE,
    EXPERTS,
    HIDDEN,
    TOL,
    EmptyChannels,
    Routed,
    change_after_gauge,
)

pytestmark = pytest.mark.usefixtures("single_thread")

REACHED_GENERATORS = 12  # the hidden units of experts 1 and 2


def counts_of(r: Tensor) -> Tensor:
    """How many rows the route ``r`` (``[n]``) sends to each expert: ``[3]``."""
    return (r[:, None] == torch.arange(EXPERTS)).sum(0)


def sizes(counts: Tensor, spelling: str) -> list[int]:
    """The counts read into Python numbers, spelled as ``spelling`` says."""
    spelled = {
        "int(t)": lambda: [int(c) for c in counts],
        "operator.index(t)": lambda: [operator.index(c) for c in counts],
        "int(n)": lambda: [int(v) for v in counts.tolist()],
        "round(float(n))": lambda: [round(float(v)) for v in counts.tolist()],
        "math.floor(math.sqrt(x))": lambda: [
            math.floor(math.sqrt(v) ** 2 + 0.5) for v in counts.double().tolist()
        ],
        "math.isqrt(n)": lambda: [math.isqrt(v * v) for v in counts.tolist()],
    }
    return spelled[spelling]()


class Cut(Routed):
    """The experts applied to the pieces :meth:`cut` makes of ``h[order].T`` (``[4, n]``)."""

    spelling = ""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        order = torch.argsort(r, stable=True)
        pieces = self.cut(h[order].t(), counts_of(r))
        outs = [p if e == 0 else self.w2[e] @ F.relu(self.w1[e] @ p) for e, p in enumerate(pieces)]
        return torch.cat(outs, 1).t()[torch.argsort(order)]

    def cut(self, ht: Tensor, counts: Tensor) -> list[Tensor]:
        return list(ht.split(sizes(counts, self.spelling), 1))


class TensorSplitByTensor(Cut):
    """``h.T.tensor_split(ends, 1)`` at the running sums ``ends`` (a tensor)."""

    def cut(self, ht: Tensor, counts: Tensor) -> list[Tensor]:
        return list(ht.tensor_split(counts.cumsum(0)[:-1], 1))


class TensorSplitByList(Cut):
    """``torch.tensor_split(h.T, ends.tolist(), 1)``."""

    def cut(self, ht: Tensor, counts: Tensor) -> list[Tensor]:
        return list(torch.tensor_split(ht, counts.cumsum(0)[:-1].tolist(), 1))


class SliceByTensors(Cut):
    """``h.T[:, ends[e] : ends[e + 1]]`` with 0-d tensors as the slice bounds."""

    def cut(self, ht: Tensor, counts: Tensor) -> list[Tensor]:
        ends = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return [ht[:, ends[e] : ends[e + 1]] for e in range(EXPERTS)]


@pytest.mark.parametrize(
    "spelling",
    [
        "int(t)",
        "operator.index(t)",
        "int(n)",
        "round(float(n))",
        "math.floor(math.sqrt(x))",
        "math.isqrt(n)",
    ],
)
def test_split_sizes_made_plain_by_python_still_shape_the_pieces(spelling):
    """``int``, ``operator.index`` and ``float`` return plain numbers, and ``math`` functions
    dropped the mark of the numbers read by ``tolist``: before, the split looked constant, its
    empty piece blocked nothing, and 20 generators changed the logits by 5.0 (relative)."""
    torch.manual_seed(1)
    model = type("Split", (Cut,), {"spelling": spelling})().to(DTYPE)
    change, s = change_after_gauge(model)
    assert change <= TOL, s.summary()
    assert s.num_generators == REACHED_GENERATORS, s.summary()


@pytest.mark.parametrize("cls", [TensorSplitByTensor, TensorSplitByList, SliceByTensors])
def test_split_points_and_slice_bounds_given_as_tensors_shape_the_pieces(cls):
    """Before, the pieces of ``tensor_split`` at a tensor of split points and of slices with
    tensor bounds did not count as shaped by values: 17 and 20 generators, changes of 0.10 and
    5.0 (relative). (Split points read by ``tolist`` were marked already.)"""
    torch.manual_seed(1)
    change, s = change_after_gauge(cls().to(DTYPE))
    assert change <= TOL, s.summary()
    assert s.num_generators == REACHED_GENERATORS, s.summary()


def test_a_trace_that_lost_numbers_does_not_taint_the_next():
    """The record that a trace made plain numbers from values is that trace's: the next trace's
    empty slice of channels (constant, ``h[:, :0]``) blocks nothing."""
    torch.manual_seed(1)
    change_after_gauge(type("Split", (Cut,), {"spelling": "int(t)"})().to(DTYPE))
    model = EmptyChannels().to(DTYPE)
    s = gaugefix.discover(model, torch.randn(5, DIM, dtype=DTYPE))
    assert s.num_generators == HIDDEN, s.summary()
