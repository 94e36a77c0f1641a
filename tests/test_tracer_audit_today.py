"""Adversarial audit of the tracer's newest changes: indexes written in place after they were
made (``i[0] = T - 1``, ``i.narrow(0, 0, 1).fill_(T - 1)``, ``i[0] = x.argmax()``), then
expanded or read through a view made before the write, and what ``discover`` leaves on a model
whose forward stores tensors in nested state (a cache object holding a list, a dict of lists).
Each structure is discovered on one example, moved by a random gauge and compared on fresh
inputs of other lengths, exactly in float64.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL, SCALE = torch.float64, 1e-10, 2.0
D, H = 5, 6  # input width, hidden channels
# a fixed order of the hidden channels, made before the trace (``torch.tensor`` of Python
# numbers inside the forward counts as picked by the data: the numbers may come from a size)
ORDER = torch.tensor([3, 0, 5, 1, 4, 2])


class Model(nn.Module):
    """``pr(h) + (take(h, T, x) * w[:width]).sum(-1)`` for ``h = relu(fc(x))``, ``x [2, T, D]``: the
    hidden channels ``take`` picks, each weighted by its own entry of ``w``."""

    def __init__(self, take: Callable[[Tensor, int, Tensor], Tensor], width: int = H) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc = nn.Parameter(torch.randn(H, D, generator=gen, dtype=DTYPE))
        self.pr = nn.Parameter(torch.randn(D, H, generator=gen, dtype=DTYPE))
        self.w = nn.Parameter(torch.randn(H, generator=gen, dtype=DTYPE))
        self.take, self.width = take, width  # the number of channels ``take`` picks

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(F.linear(x, self.fc))
        picked = self.take(h, x.shape[1], x)
        return F.linear(h, self.pr) + (picked * self.w[: self.width]).sum(-1, keepdim=True)


def inputs(seed: int) -> Tensor:
    """``[2, T, D]``: ``T = 6`` for the example (seed 0), 2 to 6 for the others."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6 if seed == 0 else 2 + seed % 5, D, generator=gen, dtype=DTYPE)


def largest_change(model: nn.Module) -> float:
    """The largest relative change of ``model``'s outputs on fresh inputs under a random gauge
    of the structure discovered on one example."""
    s = gaugefix.discover(model, inputs(0))
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, s, SCALE, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        for seed in range(1, 9):
            before, after = model(inputs(seed)), moved(inputs(seed))
            worst = max(worst, float((after - before).abs().max() / before.abs().max()))
    return worst


def order() -> Tensor:
    return ORDER.clone()


def first_set(i: Tensor, value: Any) -> Tensor:
    i[0] = value
    return i


def spread(i: Tensor, h: Tensor) -> Tensor:
    return i.expand(*h.shape[:-1], len(i))


def written_after_expand(h: Tensor, t: int, _: Tensor) -> Tensor:
    i = order()
    e = spread(i, h)
    i[0] = t - 1
    return h.gather(-1, e)


def view_written_after(h: Tensor, t: int, _: Tensor) -> Tensor:
    i = order()
    v = i[:4]
    i[0] = t - 1
    return h[..., v]


def filled_through_a_view(h: Tensor, t: int, _: Tensor) -> Tensor:
    i = order()
    i.narrow(0, 0, 1).fill_(t - 1)
    return h[..., i]


def added_through_out(h: Tensor, t: int, _: Tensor) -> Tensor:
    i = order()
    torch.add(i[:1], t - 3, out=i[:1])
    return h[..., i % H]


def plus_first(h: Tensor, t: int, _: Tensor) -> Tensor:
    i = order()
    i[0] += t - 3
    return h[..., i % H]


def copied_first(h: Tensor, t: int, _: Tensor) -> Tensor:
    i = order()
    i[:1].copy_(torch.tensor([t - 1]))
    return h[..., i]


# an index of fixed channels whose entries a forward then writes from the length or the data:
# it picks other channels for another input
WRITTEN: dict[str, Callable[[Tensor, int, Tensor], Tensor]] = {
    "i[0] = T - 1; h[..., i]": lambda h, t, x: h[..., first_set(order(), t - 1)],
    "i[0] = T - 1; index_select(h, -1, i)": lambda h, t, x: h.index_select(
        -1, first_set(order(), t - 1)
    ),
    "i[0] = tensor(T - 1); h[..., i]": lambda h, t, x: h[
        ..., first_set(order(), torch.tensor(t - 1))
    ],
    "i[0] = x.argmax(); h[..., i]": lambda h, t, x: h[
        ..., first_set(order(), x[0, 0].abs().argmax())
    ],
    "i[0] += T - 3; h[..., i % H]": plus_first,
    "i[:1].copy_(tensor([T - 1])); h[..., i]": copied_first,
    "e = i.expand(...); i[0] = T - 1; gather(h, -1, e)": written_after_expand,
    "v = i[:4]; i[0] = T - 1; h[..., v]": view_written_after,
    "i.narrow(0, 0, 1).fill_(T - 1); h[..., i]": filled_through_a_view,
    "add(i[:1], T - 3, out=i[:1]); h[..., i % H]": added_through_out,
}

# the same index left as it was, or written with constants: channels at constant places
FIXED: dict[str, Callable[[Tensor, int, Tensor], Tensor]] = {
    "h[..., i]": lambda h, t, x: h[..., order()],
    "i[0] = 2; h[..., i]": lambda h, t, x: h[..., first_set(order(), 2)],
    "gather(h, -1, i.expand(...))": lambda h, t, x: h.gather(-1, spread(order(), h)),
}


@pytest.mark.parametrize("name", list(WRITTEN))
def test_an_index_written_from_a_size_or_the_data_picks_by_the_data(name: str) -> None:
    """A write into an index (``i[0] = T - 1``, also through a view of it, or into its memory
    after an expanded view was made) makes the channels it picks depend on the input: read as
    picked by the data (read as channels at constant places before: 3.86 relative change on
    other lengths for an entry written from the length, 0.105 for one written from an
    ``argmax`` or by ``+= T - 3``)."""
    width = 4 if name.startswith("v = i[:4]") else H
    assert largest_change(Model(WRITTEN[name], width)) < TOL


@pytest.mark.parametrize("name", list(FIXED))
def test_an_index_of_constants_keeps_its_channels(name: str) -> None:
    """Written with constants, or not at all, the index picks the same channels for every
    input: those channels keep their own factors (more generators than the written ones)."""
    model = Model(FIXED[name])
    assert largest_change(model) < TOL
    written = gaugefix.discover(Model(WRITTEN["i[0] = T - 1; h[..., i]"]), inputs(0))
    assert gaugefix.discover(model, inputs(0)).num_generators > written.num_generators


# -- what discover leaves on a model whose forward stores tensors in nested state ------------------
class Cache:
    """A cache object: the tensors a forward keeps, in a list attribute."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []


class Caching(nn.Module):
    """An MLP whose forward appends its hidden activation to ``store`` (``holder(h)``)."""

    def __init__(self, nested: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 3)).double()
        self.nested = nested
        self.cache = Cache()
        self.store: dict[str, list[Tensor]] = {"keys": []}
        self.layers = [Cache()]

    def forward(self, x: Tensor) -> Tensor:
        h = self.net[1](self.net[0](x))
        held = {
            "cache": self.cache.keys,
            "store": self.store["keys"],
            "layers": self.layers[0].keys,
        }
        held[self.nested].append(h)
        return self.net[2](h)


@pytest.mark.parametrize("nested", ["cache", "store", "layers"])
def test_discover_leaves_nested_state_as_it_was(nested: str) -> None:
    """A tensor the forward stores in a cache object's list, a dict's list or a list of
    objects (how a Hugging Face ``DynamicCache`` kept on a module holds its layers) is gone
    after ``discover``: it would keep the trace's autograd graph, and ``copy.deepcopy`` of the
    model (which ``verify`` makes) failed (only the module's own lists and dicts were put back)."""
    model = Caching(nested)
    x = torch.randn(4, D, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # one entry before
    s = gaugefix.discover(model, x)
    assert len(model.cache.keys) + len(model.store["keys"]) + len(model.layers[0].keys) == 1
    copy.deepcopy(model)
    assert gaugefix.verify(model, s, x).max_change < TOL


class DynamicCaching(nn.Module):
    """An MLP whose forward writes its hidden activation into a Hugging Face ``DynamicCache``
    it keeps as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        self.net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 3)).double()
        self.cache = transformers.DynamicCache()

    def forward(self, x: Tensor) -> Tensor:
        h = self.net[1](self.net[0](x))
        self.cache.update(h[None, None], h[None, None], 0)
        return self.net[2](h)


def test_discover_leaves_a_kept_dynamic_cache_as_it_was() -> None:
    """The cache holds what it held before ``discover`` (one call's 4 positions, not 8), and
    the model can be copied and verified (``copy.deepcopy`` failed on the trace's tensors)."""
    model = DynamicCaching()
    x = torch.randn(4, D, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    s = gaugefix.discover(model, x)
    assert model.cache.get_seq_length() == len(x)
    copy.deepcopy(model)
    assert gaugefix.verify(model, s, x).max_change < TOL


class Slotted(nn.Module):
    """A module keeping its last output in a ``__slots__`` entry instead of its ``__dict__``."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(D, 3).double()
        object.__setattr__(self, "last", None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        object.__setattr__(self, "last", out)
        return out


def test_discover_leaves_a_slot_as_it_was() -> None:
    """A slot is not in the module's ``vars``: after ``discover`` it held the trace's output
    (with its autograd graph), not the earlier ``None``."""
    model = Slotted()
    gaugefix.discover(model, torch.randn(4, D, dtype=DTYPE))
    assert model.last is None


def test_the_state_walk_stops_at_its_budget() -> None:
    """A module holding a trainer or a dataset reaches far more objects than any cache: the walk
    saves at most ``STATE_OBJECTS`` of them (a list of 3 * STATE_OBJECTS dicts: not all)."""
    state = sys.modules["gaugefix.structure.module_state"]
    many = [{"k": k} for k in range(3 * state.STATE_OBJECTS)]
    held = state._held([many], set())
    assert 0 < len(held) <= state.STATE_OBJECTS
