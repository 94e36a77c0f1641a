"""What a forward may change on the modules beyond their parameters and buffers: found, saved,
put back.

:func:`reachable` walks what the modules' attributes reach through lists, tuples, sets, deques,
dicts, plain objects' attributes and ``__slots__``. The search for activations stored on the
modules (:meth:`~gaugefix.structure.context.TraceContext.block_stored`) takes all of it;
:func:`saved_attributes` keeps the modules' own attributes and ``__slots__`` entries and what
the nearest :data:`STATE_OBJECTS` objects hold, and :func:`restore_attributes` puts them back
after the trace. The plain tensors reached are copied only when the traced forward hands one to
an op, just before it runs (see :class:`PlainTensors`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import random
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gaugefix.structure.provenance import memory_of, version_of

__all__ = [
    "FROZEN",
    "SEQUENCES",
    "STATE_OBJECTS",
    "UNSET",
    "Attributes",
    "PlainTensors",
    "Slots",
    "held_now",
    "items_of",
    "reachable",
    "reached_tensors",
    "restore_attributes",
    "saved_attributes",
    "slot_value",
    "stored_values",
]

# -- what the modules' attributes reach (stored activations, state put back) ----------------------
# Objects whose entries are not state a forward keeps: code, types, modules, tensors.
_NOT_STATE = (
    nn.Module, Tensor, type, types.ModuleType, types.FunctionType, types.MethodType,
    types.BuiltinFunctionType,
)  # fmt: skip

# Values that hold nothing, left out of the walk's queue (most entries of a large graph).
_ATOMS = frozenset({int, float, complex, bool, str, bytes, type(None)})

# How many classes' ``__slots__`` descriptors are remembered (they do not change).
_SLOT_CLASSES = 1024

# Containers whose items a forward may change in place, and those it cannot.
SEQUENCES = (list, set, collections.deque)
FROZEN = (tuple, frozenset)


class Slots(dict):
    """A plain object's ``__slots__`` entries: slot descriptor -> value (:data:`UNSET` for a
    slot that holds none)."""


UNSET = object()  # what an empty ``__slots__`` entry holds in a :class:`Slots`


def reachable(values: list[Any], seen: set[int]) -> Iterator[tuple[Any, list[Any]]]:
    """The lists, tuples, sets, deques, dicts and plain objects reachable from ``values``
    through them (a cache object's list of layers, each holding its keys), nearest first, each
    once (a container holding itself ends there), not those in ``seen`` (which gains them),
    each with what it holds now (see :func:`held_now`). Unbounded: a caller that may stop
    early takes as many as it needs."""
    queue = collections.deque(values)
    while queue:
        v = queue.popleft()
        if id(v) in seen:
            continue
        contents = held_now(v)
        if not contents:
            continue
        seen.add(id(v))
        yield v, contents
        queue.extend(
            item for items in contents for item in items_of(items) if type(item) not in _ATOMS
        )


def reached_tensors(values: list[Any], seen: set[int]) -> Iterator[Tensor]:
    """The tensors among ``values`` and held by what :func:`reachable` finds from them (not
    through those in ``seen``, which gains them), nearest first; all of them, however many
    objects they are reached through."""
    yield from (v for v in values if isinstance(v, Tensor))
    for _, contents in reachable(values, seen):
        for items in contents:
            yield from (v for v in items_of(items) if isinstance(v, Tensor))


def items_of(items: Any) -> list[Any]:
    """The values in what :func:`held_now` returns: a list's items, a dict's values."""
    return list(items.values()) if isinstance(items, dict) else items


def held_now(v: Any) -> list[Any]:
    """What ``v`` holds now: a list, set, deque or tuple's items (as a list), a dict's entries,
    a plain object's attributes (a dict of its ``vars``) and its ``__slots__`` entries (a
    :class:`Slots`); nothing for anything else (a number, a tensor, a module, code)."""
    if isinstance(v, (*SEQUENCES, *FROZEN)):
        return [list(v)]
    if isinstance(v, dict):
        return [dict(v)]
    if isinstance(v, _NOT_STATE):
        return []
    entries = getattr(v, "__dict__", None)
    contents: list[Any] = [dict(entries)] if isinstance(entries, dict) else []
    slots = _slots_of(type(v))
    return contents + ([Slots((d, slot_value(d, v)) for d in slots)] if slots else [])


@functools.lru_cache(maxsize=_SLOT_CLASSES)
def _slots_of(kind: type) -> tuple[Any, ...]:
    """The ``__slots__`` entries (member descriptors) of the class ``kind`` and its bases."""
    return tuple(
        d for base in kind.__mro__ if "__slots__" in vars(base)
        for d in vars(base).values() if isinstance(d, types.MemberDescriptorType)
    )  # fmt: skip


def slot_value(slot: Any, v: Any) -> Any:
    """What the ``__slots__`` entry ``slot`` (a member descriptor) of ``v`` holds, or
    :data:`UNSET`."""
    try:
        return slot.__get__(v)
    except AttributeError:
        return UNSET


# What torch itself keeps on every module (parameters, buffers, submodules, hooks, the training
# flag): restored by the trace (``trace._model_restored``) where the forward may change it.
_MODULE_STATE = frozenset(vars(nn.Module()))

# How many containers (lists, tuples, sets, deques, dicts) and plain objects reached from the
# modules' attributes are saved and put back at most, those nearest the modules first: a module
# holding a trainer or a dataset reaches far more, and saving them all would cost more than the
# trace. The search for activations stored on the modules (``TraceContext.block_stored``) walks
# them all: one it missed would be read by a later call, like an output.
STATE_OBJECTS = 10_000

# Random generators a module may keep, with how their state is read and written.
_GENERATORS = ((torch.Generator, "get_state", "set_state"), (random.Random, "getstate", "setstate"))


class PlainTensors:
    """The plain tensors (not parameters or buffers, nor in their memory) reached from the
    modules' attributes, each with its version, ``grad_fn`` and memory before the forward
    (``saved``), and a copy of the values of those the traced forward handed to an op, made
    before that op ran (``values``: id -> copy of the tensor's shape). ``waiting``: id ->
    (tensor, its memory), those not handed to an op yet; a tensor the forward never hands to
    an op is never copied."""

    def __init__(self, tensors: Sequence[Tensor] = ()) -> None:
        self.saved = [(t, version_of(t), t.grad_fn, t.data) for t in tensors]
        self.waiting: dict[int, tuple[Tensor, tuple | None]] = {
            id(t): (t, memory_of(t)) for t in tensors
        }
        self.values: dict[int, Tensor] = {}

    def copy_passed(self, tensors: list[Tensor]) -> None:
        """Before an op given ``tensors``: copy the values of those among them not handed to an
        op before (see :func:`restore_attributes`), unless one now holds other memory (pointed
        elsewhere by ``t.set_(h)``, which no torch function reports: no traced op wrote its
        own)."""
        for t in tensors:
            entry = self.waiting.get(id(t))
            if entry is not None and entry[0] is t:
                del self.waiting[id(t)]
                if memory_of(t) == entry[1]:
                    self.values[id(t)] = t.detach().clone()


@dataclasses.dataclass
class Attributes:
    """What a forward may change on the modules beyond their parameters and buffers: each
    module's own attributes (``own``: module, {name: value}), its ``__slots__`` entries and the
    lists, sets, deques, dicts and plain objects reached from them with what they hold
    (``held``, see :func:`_held`), the plain tensors reached (``tensors``, copied as the
    forward hands them to ops: see :class:`PlainTensors`) and the random generators reached
    with their state (``generators``)."""

    own: list[tuple[nn.Module, dict[str, Any]]]
    held: list[tuple[Any, Any]]
    tensors: PlainTensors
    generators: list[tuple[Any, Any]]


def _own_slots(module: nn.Module) -> Slots:
    """The ``__slots__`` entries of ``module``'s class (slot descriptor -> value)."""
    return Slots((d, slot_value(d, module)) for d in _slots_of(type(module)))


def stored_values(module: nn.Module) -> list[Any]:
    """What ``module`` holds besides its parameters and submodules, where a forward may store
    an activation: its attributes (its buffers among them) and its ``__slots__`` entries."""
    state = [v for k, v in vars(module).items() if k not in ("_parameters", "_modules")]
    return state + [v for v in _own_slots(module).values() if v is not UNSET]


def saved_attributes(modules: list[nn.Module]) -> Attributes:
    """The attributes and ``__slots__`` entries the modules' own code keeps (a recurrent state,
    a cache, a flag a first call sets, a list or dict it fills, a random generator), with what
    the containers and plain objects reached from them hold (see :func:`_held`), the plain
    tensors reached (not the parameters and buffers, nor tensors in their memory), uncopied
    (see :class:`PlainTensors`), and the generators' state."""
    own = [(m, {k: v for k, v in vars(m).items() if k not in _MODULE_STATE}) for m in modules]
    slots = [(m, slot) for m in modules if (slot := _own_slots(m))]
    values = [v for _, entries in own + slots for v in entries.values() if v is not UNSET]
    held = slots + _held(values, set())
    reached = {id(v): v for items in [values, *(i for _, i in held)] for v in items_of(items)}
    registered = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values())]
    skipped = {memory_of(t) for t in registered if t is not None} | {None}
    tensors = [t for t in reached.values() if type(t) is Tensor and memory_of(t) not in skipped]
    generators = [
        (g, getattr(g, get)()) for g in reached.values()
        for kind, get, _ in _GENERATORS if isinstance(g, kind)
    ]  # fmt: skip
    return Attributes(own, held, PlainTensors(tensors), generators)


def _held(values: list[Any], seen: set[int]) -> list[tuple[Any, Any]]:
    """The lists, sets, deques, dicts and plain objects reachable from ``values`` (see
    :func:`reachable`), nearest first, not those in ``seen`` (which gains them), each with what
    it holds now (an object with both ``__dict__`` and ``__slots__`` appears twice); until
    ``seen`` holds :data:`STATE_OBJECTS`."""
    walk = reachable(values, seen)
    nearest = itertools.islice(walk, max(STATE_OBJECTS - len(seen), 0))
    return [(v, items) for v, contents in nearest for items in contents]


def restore_attributes(saved: Attributes) -> None:
    """Put back what :func:`saved_attributes` saved: an attribute the forward set holds its
    earlier value again, one it added is removed, a ``__slots__`` entry, a container or plain
    object reached from them (a cache object's lists) holds its earlier items or entries, a
    plain tensor written in place its earlier values (and no autograd history), a generator its
    earlier state. A tensor the forward stores (``self.state = h``,
    ``self.cache.keys.append(k)``, ``self.state.copy_(h)``) would otherwise keep the trace's
    autograd graph, and with it the activations, alive (``copy.deepcopy`` of the model then
    fails); a flag set on a first call would no longer match its parameters, which are
    restored."""
    for module, own in saved.own:
        now = vars(module)
        for key in [k for k in now if k not in own and k not in _MODULE_STATE]:
            del now[key]
        now.update(own)
    for container, items in saved.held:
        _put_back(container, items)
    _restore_tensors(saved.tensors)
    for g, state in saved.generators:
        setter = next(s for kind, _, s in _GENERATORS if isinstance(g, kind))
        getattr(g, setter)(state)


def _restore_tensors(plain: PlainTensors) -> None:
    """Give each plain tensor its memory back (re-pointed by ``t.data = h``, ``t.set_(h)``),
    without the autograd history the forward gave it, and, where the forward handed it to an
    op, its earlier values (one never handed to a traced op was not written by one)."""
    for t, version, grad_fn, memory in plain.saved:
        if version_of(t) == version and t.grad_fn is grad_fn and memory_of(t) == memory_of(memory):
            continue
        if t.grad_fn is not grad_fn and t._base is None:  # written from an activation
            t.detach_()
        if memory_of(t) != memory_of(memory):
            t.data = memory
        values = plain.values.get(id(t))
        if values is not None:
            with torch.inference_mode(t.is_inference()), torch.no_grad():
                t.copy_(values)


def _put_back(container: Any, items: Any) -> None:
    """Make ``container`` (a list, set, deque, dict or plain object) hold ``items`` again (see
    :func:`held_now`), where what it holds is not the same objects."""
    if isinstance(container, FROZEN):
        return  # its items are the same objects (their own contents are put back)
    if isinstance(items, Slots):
        for slot, value in items.items():
            if slot_value(slot, container) is not value:
                slot.__delete__(container) if value is UNSET else slot.__set__(container, value)
        return
    if isinstance(container, SEQUENCES):
        if not _same(list(container), items):
            container.clear()
            container.update(items) if isinstance(container, set) else container.extend(items)
        return
    entries = container if isinstance(container, dict) else vars(container)
    if not _same(list(entries.items()), list(items.items())):
        entries.clear()
        entries.update(items)


def _same(now: list[Any], before: list[Any]) -> bool:
    """Whether the lists ``now`` and ``before`` hold the same objects (pairs compared item by
    item), by identity: tensors have no plain equality."""
    if len(now) != len(before):
        return False
    return all(
        a is b or (isinstance(a, tuple) and all(x is y for x, y in zip(a, b, strict=True)))
        for a, b in zip(now, before, strict=True)
    )
