"""Activations a forward stores on its modules are read by later calls, which the trace never
sees, so ``discover`` treats them as outputs and blocks their factors. The store can be a list
(the control), a deque, a set, a plain object's attribute, a dataclass field or a ``__slots__``
entry, or sit in a dict that holds itself: each must be found, or the hidden units of ``h`` get
generators and a move by them changes the next call's output (float64).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL = torch.float64, 1e-12
D, H, O, N = 5, 6, 3, 4  # input width, hidden channels, output width, batch
SCALE = 1.0  # standard deviation of the random gauge's log-factors


def batch(seed: int) -> Tensor:
    """A float64 input of shape (N, D)."""
    return torch.randn(N, D, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


class Cache:
    """A plain object holding the last hidden activation."""

    def __init__(self) -> None:
        self.h: Tensor | None = None


@dataclasses.dataclass
class State:
    """A dataclass holding the last hidden activation."""

    h: Tensor | None = None


class Slotted:
    """An object with ``__slots__`` holding the last hidden activation (the slot unset at
    first)."""

    __slots__ = ("h",)


class Remembers(nn.Module):
    """``h = relu(l1(x))``, ``out = l2(h)``, plus ``v`` of the ``h`` a previous call stored
    (none on the first call: ``v`` is unused on the traced path); ``x``: (N, D) -> (N, O)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.v = nn.Linear(D, H), nn.Linear(H, O), nn.Linear(H, O)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l1(x))
        out = self.l2(h)
        past = self.last()
        if past is not None:
            out = out + self.v(past)
        self.store(h)
        return out

    def last(self) -> Tensor | None:
        """The stored hidden activation, if any."""
        raise NotImplementedError

    def store(self, h: Tensor) -> None:
        """Keep ``h`` for the next call."""
        raise NotImplementedError


class InList(Remembers):
    """``self.past.append(h)`` with a list: the control, blocked before."""

    def __init__(self) -> None:
        super().__init__()
        self.past: Any = []

    def last(self) -> Tensor | None:
        return self.past[-1] if self.past else None

    def store(self, h: Tensor) -> None:
        self.past.append(h)


class InDeque(InList):
    """``self.past.append(h)`` with a ``collections.deque``."""

    def __init__(self) -> None:
        super().__init__()
        self.past = collections.deque()


class InSet(Remembers):
    """``self.past.add(h)`` with a set (one at a time: cleared before each add)."""

    def __init__(self) -> None:
        super().__init__()
        self.past: set[Tensor] = set()

    def last(self) -> Tensor | None:
        return next(iter(self.past)) if self.past else None

    def store(self, h: Tensor) -> None:
        self.past.clear()
        self.past.add(h)


class InObject(Remembers):
    """``self.cache.h = h`` with a plain object."""

    def __init__(self, holder: Callable[[], Any] = Cache) -> None:
        super().__init__()
        self.cache = holder()

    def last(self) -> Tensor | None:
        return getattr(self.cache, "h", None)

    def store(self, h: Tensor) -> None:
        self.cache.h = h


class InDataclass(InObject):
    """``self.cache.h = h`` with a dataclass."""

    def __init__(self) -> None:
        super().__init__(State)


class InSlots(InObject):
    """``self.cache.h = h`` with an object's ``__slots__`` entry."""

    def __init__(self) -> None:
        super().__init__(Slotted)


class InCycle(Remembers):
    """``self.table["h"] = h`` in a dict that holds itself (``self.table["me"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.table: dict[str, Any] = {}
        self.table["me"] = self.table

    def last(self) -> Tensor | None:
        return self.table.get("h")

    def store(self, h: Tensor) -> None:
        self.table["h"] = h


class DeepInCycle(Remembers):
    """``h`` in a deque inside a plain object inside a list that holds itself and the object."""

    def __init__(self) -> None:
        super().__init__()
        cache = Cache()
        cache.h = collections.deque()
        self.ring: list[Any] = [cache]
        self.ring.append(self.ring)

    def last(self) -> Tensor | None:
        past = self.ring[0].h
        return past[-1] if past else None

    def store(self, h: Tensor) -> None:
        self.ring[0].h.append(h)


SPELLINGS = [InList, InDeque, InSet, InObject, InDataclass, InSlots, InCycle, DeepInCycle]
IDS = ["list", "deque", "set", "object", "dataclass", "slots", "cycle", "deep-cycle"]


def two_calls(model: nn.Module) -> Tensor:
    """The output of the second of two calls on fresh inputs (the first stores ``h``)."""
    with torch.no_grad():
        model(batch(3))
        return model(batch(4))


@pytest.mark.parametrize("make", SPELLINGS, ids=IDS)
def test_a_stored_activation_is_blocked(make: Callable[[], Remembers]) -> None:
    """The hidden units of ``h`` get no generator (before: a deque, set, plain object,
    dataclass or slot was not searched and each of the H units got one, and the gauge moved the
    second call's output; a dict holding itself raised ``RecursionError``); a random gauge
    leaves the second call's output where an untouched twin's is."""
    s = assert_blocked_and_exact(make)
    assert any("stored on module '<root>'" in e.reason for e in s.excluded)


def assert_blocked_and_exact(make: Callable[[], Remembers]) -> gaugefix.GaugeStructure:
    """The structure of ``make()`` on one batch, checked to have no generator and, after a
    random gauge, to leave the second call's output where an untouched twin's is (within
    ``TOL``)."""
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    twin = make()
    s = gaugefix.discover(model, batch(2))
    assert s.num_generators == 0
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(5))
    out, expected = two_calls(model), two_calls(twin)
    assert ((out - expected).norm() / expected.norm()).item() <= TOL
    return s


def test_the_gauge_moves_what_an_unstored_activation_would_change() -> None:
    """The check above can fail: with ``v`` given the hidden units' factors by hand, the
    second call's output moves (the units are gauge freedom only while nothing keeps ``h``)."""
    torch.manual_seed(0)
    model, twin = InDeque(), InDeque()
    twin.load_state_dict(model.state_dict())
    factors = torch.exp(torch.randn(H, dtype=DTYPE, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():  # h -> h * factors, compensated in l2 but not in v
        model.l1.weight.mul_(factors[:, None])
        model.l1.bias.mul_(factors)
        model.l2.weight.div_(factors)
    out, expected = two_calls(model), two_calls(twin)
    assert ((out - expected).norm() / expected.norm()).item() > 1e-3


def on_class() -> Remembers:
    """``type(self).cache = h``: kept on the model's class (a class made for each model, so that
    no other test sees what it keeps)."""

    class OnClass(Remembers):
        def last(self) -> Tensor | None:
            return getattr(type(self), "cache", None)

        def store(self, h: Tensor) -> None:
            type(self).cache = h

    return OnClass()


def in_class_list() -> Remembers:
    """``self.past.append(h)`` with ``past`` a list of the model's class."""

    class InClassList(Remembers):
        past: ClassVar[list[Tensor]] = []

        def last(self) -> Tensor | None:
            return self.past[-1] if self.past else None

        def store(self, h: Tensor) -> None:
            self.past.append(h)

    return InClassList()


@pytest.mark.parametrize("make", [on_class, in_class_list], ids=["class attribute", "class list"])
def test_an_activation_kept_on_the_class_is_blocked(make: Callable[[], Remembers]) -> None:
    """The hidden units of ``h`` get no generator (before: the class was not searched, and each
    of the H units got one)."""
    torch.manual_seed(0)
    s = gaugefix.discover(make(), batch(2))
    assert s.num_generators == 0
    assert any("stored on module '<root>'" in e.reason for e in s.excluded)
