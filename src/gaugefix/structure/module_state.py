"""What a forward may change on the modules beyond their parameters and buffers: found, saved,
put back.

:func:`reachable` walks what the modules' attributes reach through lists, tuples, sets, deques,
dicts (keys and values), plain objects' attributes and ``__slots__``, what code refers to,
modules that are not submodules and tensors' Python attributes (see :func:`held_now`). The
search for activations stored on the modules
(:meth:`~gaugefix.structure.context.TraceContext.block_stored`) takes all of it;
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
# Objects whose entries are not state a forward keeps: types, Python modules, compiled modules.
_NOT_STATE = (type, types.ModuleType, torch.jit.ScriptModule)
# Code, and what refers to other objects (see :class:`Referred`).
_CODE = (types.FunctionType, functools.partial, types.MethodType, types.BuiltinMethodType)

# The package whose classes hold no activation of the user's model (nn.Module, its layers).
_TORCH = "torch."

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


class Referred(tuple):
    """What code refers to: a closure's cells and a function's defaults, a
    ``functools.partial``'s function and arguments, a bound method's object and function
    (searched, not put back: the attribute holding the code is)."""


class ModuleEntries(dict):
    """The attributes of a module reached from another's attributes (``self.helpers =
    [Cache()]``, a bound method ``self.read = self.cache.read``), but its parameters: name ->
    value."""


def reachable(values: list[Any], seen: set[int]) -> Iterator[tuple[Any, list[Any]]]:
    """The lists, tuples, sets, deques, dicts, plain objects, code, modules and tensors with
    Python attributes reachable from ``values`` through them (a cache object's list of layers,
    each holding its keys; see :func:`held_now`), nearest first, each
    once (a container holding itself ends there), not those in ``seen`` (which gains them),
    each with what it holds now (see :func:`held_now`). Unbounded: a caller that may stop
    early takes as many as it needs."""
    return ((v, contents) for v, contents in _walk(values, seen) if contents)


def reached_tensors(values: list[Any], seen: set[int]) -> Iterator[Tensor]:
    """The tensors among ``values`` and held by what :func:`reachable` finds from them (not
    those in ``seen``, nor through them: ``seen`` gains them), nearest first, each once; all
    of them, however many objects they are reached through."""
    return (v for v, _ in _walk(values, seen) if isinstance(v, Tensor))


def _walk(values: list[Any], seen: set[int]) -> Iterator[tuple[Any, list[Any]]]:
    """Every value but a plain number or string reachable from ``values`` through what
    :func:`held_now` finds, nearest first, each once, not those in ``seen`` (which gains
    them), each with what it holds now."""
    queue = collections.deque(values)
    while queue:
        v = queue.popleft()
        if type(v) in _ATOMS or id(v) in seen:
            continue
        seen.add(id(v))
        contents = held_now(v)
        yield v, contents
        for items in contents:
            queue.extend(items_of(items))


def items_of(items: Any) -> list[Any]:
    """The values in what :func:`held_now` returns: a list's items, a dict's keys and values
    (an activation may be a key), a :class:`Slots` or :class:`ModuleEntries`'s values."""
    if isinstance(items, (Slots, ModuleEntries)):
        return list(items.values())
    return [*items, *items.values()] if isinstance(items, dict) else list(items)


def held_now(v: Any) -> list[Any]:
    """What ``v`` holds now: a list, set, deque or tuple's items (as a list), a dict's entries,
    what code refers to (a :class:`Referred`), a module's attributes (a
    :class:`ModuleEntries`), a tensor's Python attributes, a plain object's attributes (a dict
    of its ``vars``) and its ``__slots__`` entries (a :class:`Slots`); nothing for anything
    else (a number, a type, a Python or compiled module). By ``v``'s own type (a proxy's
    ``__class__`` is not asked)."""
    kind = _kind_of(type(v))
    if kind == "items":
        return [list(v)]
    if kind == "dict":
        return [dict(v)]
    if kind == "code":
        referred = _referred(v)
        return [referred] if referred else []
    if kind == "module":
        return [ModuleEntries((k, x) for k, x in vars(v).items() if k != "_parameters")]
    if kind == "tensor":
        return [dict(vars(v))] if vars(v) else []
    if kind == "none":
        return []
    entries = getattr(v, "__dict__", None)
    contents: list[Any] = [dict(entries)] if isinstance(entries, dict) else []
    slots = _slots_of(type(v))
    return contents + ([Slots((d, slot_value(d, v)) for d in slots)] if slots else [])


@functools.lru_cache(maxsize=_SLOT_CLASSES)
def _kind_of(kind: type) -> str:
    """What :func:`held_now` finds in a value of the class ``kind``: items, dict, code,
    module, tensor, none or object."""
    for bases, name in (
        ((*SEQUENCES, *FROZEN), "items"), (dict, "dict"), (_NOT_STATE, "none"), (_CODE, "code"),
        (nn.Module, "module"), (Tensor, "tensor"),
    ):  # fmt: skip
        if issubclass(kind, bases):
            return name
    return "object"


def _referred(v: Any) -> Referred:
    """What the code ``v`` refers to (see :class:`Referred`)."""
    if isinstance(v, types.FunctionType):
        cells = []
        for cell in v.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                continue
        return Referred((*cells, *(v.__defaults__ or ()), *(v.__kwdefaults__ or {}).values()))
    if isinstance(v, functools.partial):
        return Referred((v.func, *v.args, *v.keywords.values()))
    if isinstance(v, types.MethodType):
        return Referred((v.__self__, v.__func__))
    return Referred((v.__self__,))  # a builtin method: ``self.push = self.past.append``


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
    (``saved``), and a copy of the values of those the traced forward handed to an op, or a
    tensor in their memory, made before that op ran (``values``: id -> copy of the tensor's
    shape). ``waiting``: memory (the tensor's id where it has none) -> the tensors in it not
    copied yet; a tensor whose memory the forward never hands to an op is never copied."""

    def __init__(self, tensors: Sequence[Tensor] = ()) -> None:
        self.saved = [(t, version_of(t), t.grad_fn, t.data) for t in tensors]
        self.waiting: dict[Any, list[Tensor]] = {}
        for t in tensors:
            self.waiting.setdefault(_memory_key(t), []).append(t)
        self.values: dict[int, Tensor] = {}

    def copy_passed(self, tensors: list[Tensor]) -> None:
        """Before an op given ``tensors``: copy the values of the plain tensors not copied yet
        in their memory (themselves, or another attribute or view in it, through which the op
        may write them: ``self.b = self.a.detach()``; see :func:`restore_attributes`), unless
        one now holds other memory (pointed elsewhere by ``t.set_(h)``, which no torch function
        reports: no traced op wrote its own)."""
        for key in {_memory_key(t) for t in tensors}:
            for t in self.waiting.pop(key, ()):
                if _memory_key(t) == key:
                    self.values[id(t)] = t.detach().clone()


def _memory_key(t: Tensor) -> Any:
    """The memory ``t`` is in (see :func:`memory_of`), or its id where it has none."""
    memory = memory_of(t)
    return id(t) if memory is None else memory


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
    an activation: its attributes (its buffers among them), its ``__slots__`` entries, its
    parameters' Python attributes (``self.weight.cache = h``) and the attributes of its class
    and their bases outside torch (``type(self).cache = h``, a list at class level)."""
    state = [v for k, v in vars(module).items() if k not in ("_parameters", "_modules")]
    attached = [vars(p) for p in module._parameters.values() if p is not None and vars(p)]
    slots = [v for v in _own_slots(module).values() if v is not UNSET]
    return state + attached + slots + list(_class_values(type(module)))


@functools.lru_cache(maxsize=_SLOT_CLASSES)
def _class_values(kind: type) -> tuple[Any, ...]:
    """The attributes of the class ``kind`` and its bases that torch does not define (their
    code included: a method's defaults and closure)."""
    own = [base for base in kind.__mro__ if not base.__module__.startswith(_TORCH)]
    return tuple(v for base in own if base is not object for v in vars(base).values())


def saved_attributes(modules: list[nn.Module]) -> Attributes:
    """The attributes and ``__slots__`` entries the modules' own code keeps (a recurrent state,
    a cache, a flag a first call sets, a list or dict it fills, a random generator), with what
    the containers and plain objects reached from them hold (see :func:`_held`), the plain
    tensors reached (not the parameters and buffers, nor tensors in their memory), uncopied
    (see :class:`PlainTensors`), the Python attributes of the tensors reached, parameters and
    buffers (``self.buf.cache = h``) and the generators' state."""
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
    attached = {id(t): t for t in [*registered, *reached.values()] if isinstance(t, Tensor)}
    held += [(t, dict(vars(t))) for t in attached.values()]
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
        values = plain.values.get(id(t))  # written through ``t.data`` keeps its version
        unchanged = version_of(t) == version and memory_of(t) == memory_of(memory)
        if values is None and unchanged and t.grad_fn is grad_fn:
            continue
        if t.grad_fn is not grad_fn and t._base is None:  # written from an activation
            t.detach_()
        if memory_of(t) != memory_of(memory):
            t.data = memory
        if values is not None:
            with torch.inference_mode(t.is_inference()), torch.no_grad():
                t.copy_(values)


def _put_back(container: Any, items: Any) -> None:
    """Make ``container`` (a list, set, deque, dict or plain object) hold ``items`` again (see
    :func:`held_now`), where what it holds is not the same objects. By ``container``'s own
    type, as :func:`held_now` (a proxy's ``__class__`` is not asked)."""
    if issubclass(type(container), FROZEN) or isinstance(items, Referred):
        return  # its items are the same objects (their own contents are put back)
    if isinstance(items, ModuleEntries):
        now = vars(container)
        for key in [k for k in now if k not in items and k != "_parameters"]:
            del now[key]
        now.update(items)
        return
    if isinstance(items, Slots):
        for slot, value in items.items():
            if slot_value(slot, container) is not value:
                slot.__delete__(container) if value is UNSET else slot.__set__(container, value)
        return
    if type(items) is list:  # a list, set or deque's items
        if not _same(list(container), items):
            container.clear()
            is_set = issubclass(type(container), set)
            container.update(items) if is_set else container.extend(items)
        return
    entries = container if _kind_of(type(container)) == "dict" else vars(container)
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
