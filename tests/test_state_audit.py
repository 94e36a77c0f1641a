"""Where ``discover`` looks for state a forward keeps on its modules, and what it puts back.

An activation the forward keeps where a later call reads it is an output: its hidden units must
get no generator, or a move by them changes the next call's output. Kept here through code (a
closure, a ``functools.partial``, a bound method), a module that is not a submodule (in a list,
or set into ``__dict__``), a dict's key, or a tensor's Python attribute (a plain tensor, a
buffer, a parameter). And what the forward writes is put back: a plain tensor written through
``.data`` (which keeps its version) or through another attribute in its memory, and a plain
object whose ``__class__`` claims to be a list is left as it is (float64 throughout).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from test_restore_audit import Base
from test_stored_activations import (
    DTYPE,
    H,
    Remembers,
    assert_blocked_and_exact,
    batch,
    two_calls,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class Box:
    """A plain object holding the last hidden activation."""

    def __init__(self) -> None:
        self.h: Tensor | None = None

    def get(self) -> Tensor | None:
        return self.h


class Helper(nn.Module):
    """A module without parameters holding the last hidden activation."""

    def __init__(self) -> None:
        super().__init__()
        self.h: Tensor | None = None


class InClosure(Remembers):
    def last(self) -> Tensor | None:
        return self.hook() if hasattr(self, "hook") else None

    def store(self, h: Tensor) -> None:
        self.hook = lambda: h


class InPartial(InClosure):
    def store(self, h: Tensor) -> None:
        self.hook = functools.partial(torch.clone, h)


class InBoundMethod(Remembers):
    def __init__(self) -> None:
        super().__init__()
        self.read = Box().get  # the box is reached only through the method

    def last(self) -> Tensor | None:
        return self.read()

    def store(self, h: Tensor) -> None:
        self.read.__self__.h = h


class InModuleList(Remembers):
    def __init__(self) -> None:
        super().__init__()
        self.helpers = [Helper()]  # a plain list: not a submodule

    def last(self) -> Tensor | None:
        return self.helpers[0].h

    def store(self, h: Tensor) -> None:
        self.helpers[0].h = h


class InUnregistered(Remembers):
    def __init__(self) -> None:
        super().__init__()
        self.__dict__["helper"] = Helper()  # set past nn.Module.__setattr__

    def last(self) -> Tensor | None:
        return self.__dict__["helper"].h

    def store(self, h: Tensor) -> None:
        self.__dict__["helper"].h = h


class InDictKey(Remembers):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[Tensor, int] = {}

    def last(self) -> Tensor | None:
        return next(iter(self.seen), None)

    def store(self, h: Tensor) -> None:
        self.seen.clear()
        self.seen[h] = 1


class OnTensor(Remembers):
    def __init__(self) -> None:
        super().__init__()
        self.flag = torch.zeros(1, dtype=DTYPE)

    def holder(self) -> Tensor:
        return self.flag

    def last(self) -> Tensor | None:
        return getattr(self.holder(), "cache", None)

    def store(self, h: Tensor) -> None:
        self.holder().cache = h


class OnBuffer(OnTensor):
    def __init__(self) -> None:
        super().__init__()
        del self.flag
        self.register_buffer("flag", torch.zeros(1, dtype=DTYPE))


class OnParameter(OnTensor):
    def holder(self) -> Tensor:
        return self.v.bias


SPELLINGS = [
    InClosure, InPartial, InBoundMethod, InModuleList, InUnregistered, InDictKey, OnTensor,
    OnBuffer, OnParameter,
]  # fmt: skip
IDS = [
    "closure", "partial", "bound-method", "module-in-list", "unregistered-module", "dict-key",
    "tensor-attribute", "buffer-attribute", "parameter-attribute",
]  # fmt: skip


@pytest.mark.parametrize("make", SPELLINGS, ids=IDS)
def test_a_stored_activation_is_blocked(make: Callable[[], Remembers]) -> None:
    """The hidden units of ``h`` get no generator (before: each of the H units got one, and
    the gauge moved the second call's output by 1.13 relative); a random gauge leaves the
    second call's output where an untouched twin's is."""
    assert_blocked_and_exact(make)


@pytest.mark.parametrize("make", SPELLINGS, ids=IDS)
def test_a_stored_activation_is_put_back(make: Callable[[], Remembers]) -> None:
    """After discover the model copies and gives its twin's outputs (before: a tensor's
    Python attribute kept the trace's activation and its autograd graph: ``deepcopy``
    failed)."""
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    twin = make()
    gaugefix.discover(model, batch(2))
    copy.deepcopy(model)
    assert torch.equal(two_calls(model), two_calls(twin))


class WrittenThroughData(Base):
    """A running mean written through ``.data`` (its version does not move), read first."""

    def __init__(self) -> None:
        super().__init__()
        self.state = torch.zeros(H, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        h = self.hidden(x)
        out = self.net[2](h + self.state)
        self.state.data.copy_(h.detach().mean(0))
        return out


class WrittenThroughAlias(Base):
    """Two attributes in one memory: the forward writes ``w``, then reads ``r``."""

    def __init__(self) -> None:
        super().__init__()
        memory = torch.zeros(H, dtype=DTYPE)
        self.w, self.r = memory.detach(), memory

    def forward(self, x: Tensor) -> Tensor:
        h = self.hidden(x)
        self.w.copy_(h.detach().mean(0))
        return self.net[2](h + self.r)


@pytest.mark.parametrize("make", [WrittenThroughData, WrittenThroughAlias], ids=["data", "alias"])
def test_a_plain_tensor_written_is_put_back(make: Callable[[], Base]) -> None:
    """The plain tensor holds its values from before discover (before: ``.data`` kept the
    written values, its version unmoved; the alias was copied after the write through the
    other attribute, and put back last with the written values)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make()
        with torch.no_grad():
            model(batch(1))
        models.append(model)
    model, twin = models
    gaugefix.discover(model, batch(2))
    for name, value in vars(twin).items():
        if isinstance(value, Tensor):
            assert torch.equal(getattr(model, name), value)
    with torch.no_grad():
        assert torch.equal(model(batch(3)), twin(batch(3)))


class ClaimsList:
    """A plain object whose ``__class__`` says it is a list (as a mock made with a list's
    spec does)."""

    def __init__(self) -> None:
        self.n = 0

    @property
    def __class__(self) -> type:  # type: ignore[override]
        return list


class HoldsClaimsList(Base):
    def __init__(self) -> None:
        super().__init__()
        self.odd = ClaimsList()

    def forward(self, x: Tensor) -> Tensor:
        self.odd.n += 1
        return self.net(x)


def test_an_object_claiming_another_class_is_put_back() -> None:
    """Discover runs and puts back its attribute (before: ``TypeError``, put back as a list)."""
    model = HoldsClaimsList()
    s = gaugefix.discover(model, batch(2))
    assert s.num_generators == H
    assert model.odd.n == 0
