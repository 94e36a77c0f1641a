"""The tracer's per-call checks cost nothing where there is nothing to find: a ``math`` function
given plain ints (``math.gcd`` in ``Fraction`` arithmetic, ``math.prod(shape)``) returns its
result without searching its arguments for marks, while one given a size read from an input
still marks its result (``math.gcd(B, 4)`` may differ for another batch)."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

import gaugefix

marks_module = sys.modules["gaugefix.structure.marks"]
CALLS = 50  # math calls on plain numbers per forward


SEEN: list = []  # the types MathInForward's forward got from math.gcd of the batch


class MathInForward(nn.Module):
    """A linear layer whose forward calls ``math`` functions ``calls`` times on plain ints and
    once on a size of its input (the type of that result kept in ``seen``)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, dtype=torch.float64)
        self.calls = calls

    def forward(self, x: Tensor) -> Tensor:
        for k in range(self.calls):
            math.gcd(12 + k, 18)
            math.prod((2, k + 1))
        SEEN.append(type(math.gcd(x.shape[0], 4)))  # not on the model: discover restores it
        return self.fc(x)


def _scans(model: nn.Module, monkeypatch) -> int:
    """How many times discovery searches arguments for numbers computed from sizes."""
    count = [0]
    search = marks_module.from_size

    def counted(x):
        count[0] += 1
        return search(x)

    monkeypatch.setattr(marks_module, "from_size", counted)
    gaugefix.discover(model, torch.randn(6, 4, dtype=torch.float64))
    monkeypatch.setattr(marks_module, "from_size", search)
    return count[0]


def test_math_on_plain_ints_is_not_searched(monkeypatch):
    # before the fast path: each of the 2 * CALLS calls searched its arguments (100 scans more)
    assert _scans(MathInForward(CALLS), monkeypatch) == _scans(MathInForward(0), monkeypatch)


def test_math_on_a_size_is_still_marked():
    model = MathInForward(CALLS)
    SEEN.clear()
    structure = gaugefix.discover(model, torch.randn(6, 4, dtype=torch.float64))
    assert SEEN == [marks_module.SizedInt]  # 6 is the batch: gcd(6, 4) is marked
    assert type(math.gcd(6, 4)) is int  # outside a trace: the original function
    assert structure.num_generators == 0  # the output layer's units are not hidden
