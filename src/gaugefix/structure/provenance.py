"""Where the values and the memory of the tensors of a trace come from.

Free functions name a tensor's memory (:func:`memory_of`), its write count (:func:`version_of`)
and where its entries are (``placement_of``). :class:`Provenance`, a part of
:class:`~gaugefix.structure.context.TraceContext`, records which tensors depend on the inputs or
weights, on chance, on sizes, which hold a constant 0 made in the forward, and which memory the
forward allocated (:class:`_Fresh`) and which of its elements a traced op read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gaugefix.structure.marks import from_size

if TYPE_CHECKING:
    from gaugefix.structure.context import Sum

__all__ = [
    "PLACED_BY_NUMBERS",
    "Provenance",
    "by_memory",
    "is_index",
    "memory_of",
    "nested_tensors",
    "placement_of",
    "version_of",
]


class _Fresh:
    """Memory allocated in this forward by ``empty`` or ``zeros`` (or their ``_like`` and
    ``new_`` forms): its storage, kept so that its address is not reused, and per storage
    element (``[elements]``) whether a traced op read it (see :meth:`TraceContext.overwrite`)."""

    def __init__(self, t: Tensor) -> None:
        self.storage = t.untyped_storage()
        self.pointer, self.nbytes = self.storage.data_ptr(), self.storage.nbytes()
        self.element_size = t.element_size()
        self.read = torch.zeros(self.nbytes // self.element_size, dtype=torch.bool)

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` is in this memory, still where it was allocated, as entries of its
        size."""
        same = self.storage.data_ptr() == self.pointer and self.storage.nbytes() == self.nbytes
        return same and t.element_size() == self.element_size

    def elements(self, t: Tensor) -> Tensor:
        """The storage element of each entry of ``t`` (a tensor in this memory), ``t.shape``."""
        every = torch.arange(self.read.numel())
        return every.as_strided(t.shape, t.stride(), t.storage_offset())


class Provenance:
    """The part of :class:`~gaugefix.structure.context.TraceContext` that records where tensors'
    values come from (the inputs, chance, sizes, zeros made in the forward) and the memory
    allocated in the forward."""

    def _init_provenance(self) -> None:
        """The tables of where tensors' values come from: the inputs, chance, zeros made in the
        forward, memory allocated in it."""
        # Tensors whose values depend on the model's inputs or parameters (id -> tensor), whose
        # values are drawn at random, and whose shape depends on values of the former.
        self._tainted: dict[int, Tensor] = {}
        self._inputs: dict[int, Tensor] = {}  # the example's tensors themselves
        # Whether an input of the example has a dim of size 1 (a batch or a sequence of 1?).
        self._ones_in_inputs = False
        self._random: dict[int, Tensor] = {}
        # Tensors whose values were computed from a number computed from a size (``(arange(6)
        # + B) % 6``): an index among them picks other entries for another input.
        self._sized: dict[int, Tensor] = {}
        self._shaped: dict[int, Tensor] = {}
        # Tensors made by an op given a number computed from a size (``arange(B)``), and
        # what is computed from them: an index among them reads more rows for another input.
        self._size_made: dict[int, Tensor] = {}
        # Tensors made in the forward to hold exactly 0 (``zeros``, ``tensor(0.)``, casts and
        # views of them): id -> (tensor, its placement then, the memory of every zero it was
        # made from); the labels that passed an op because an operand was such a zero, with
        # those memories; the memories, and those a traced op wrote into since (a view,
        # ``z.data``, ``out=``: a version counter of its own): no longer a constant 0.
        self._zeros: dict[int, tuple[Tensor, tuple, frozenset]] = {}
        self._zero_reads: list[tuple[frozenset, Sum]] = []
        self._zero_memory: set[tuple | None] = set()
        self._zero_written: set[tuple | None] = set()
        # Memory allocated in this forward (see _Fresh); views of it placed by data (narrow).
        self._fresh: dict[tuple, _Fresh] = {}
        self._placed: dict[int, Tensor] = {}

    def mark_input(self, t: Tensor) -> None:
        """Record ``t`` as a tensor of the example: its values are the inputs'."""
        self._tainted[id(t)] = self._inputs[id(t)] = t
        self._ones_in_inputs = self._ones_in_inputs or 1 in t.shape

    @property
    def ones_in_inputs(self) -> bool:
        """Whether an input of the example has a dim of size 1 (a batch or a sequence of 1?)."""
        return self._ones_in_inputs

    def mark_sized(self, t: Tensor) -> None:
        """Record that the values of ``t`` may have been computed from a size (see
        :meth:`is_sized`)."""
        self._sized[id(t)] = t

    def record_provenance(self, out: Any, flags: tuple[bool, bool, bool, bool, bool]) -> None:
        """Record each tensor in an op's output ``out`` in the tables ``flags`` say, in this
        order: values that depend on the inputs or weights, random values, values computed from
        a size (:meth:`is_sized`), made from a size (:meth:`is_size_made`), a shape that depends
        on values (:meth:`is_shaped`)."""
        provenance = (self._tainted, self._random, self._sized, self._size_made, self._shaped)
        tables = [table for table, on in zip(provenance, flags, strict=True) if on]
        for t in nested_tensors(out) if tables else ():
            for table in tables:
                table[id(t)] = t

    def depends_on_inputs(self, t: Tensor) -> bool:
        """Whether the values of ``t`` depend on the model's inputs or parameters (see
        :meth:`is_tainted`, which also counts random draws)."""
        return id(t) in self._tainted or id(t) in self.param_names

    def is_random(self, t: Tensor) -> bool:
        """Whether the values of ``t`` depend on a random draw."""
        return id(t) in self._random

    def is_sized(self, t: Tensor) -> bool:
        """Whether the values of ``t`` were computed from a number computed from a size
        (``(arange(6) + B) % 6``)."""
        return self._sized.get(id(t)) is t

    def is_size_made(self, t: Tensor) -> bool:
        """Whether ``t`` was made by an op given a number computed from a size (``arange(B)``),
        or computed from such a tensor."""
        return self._size_made.get(id(t)) is t

    def is_shaped(self, t: Tensor) -> bool:
        """Whether the shape of ``t`` depends on values that may differ for another input."""
        return self._shaped.get(id(t)) is t

    def is_tainted(self, t: Tensor) -> bool:
        """Whether the values of ``t`` may differ for another call: they depend on the model's
        inputs or parameters, or on a random draw."""
        return id(t) in self._tainted or id(t) in self.param_names or id(t) in self._random

    def picks_by_data(self, t: Tensor) -> bool:
        """Whether the index ``t`` may pick other entries for another input: it is tainted (see
        :meth:`is_tainted`), or its values were computed from a size, or so is a tensor it is a
        view of (written after the view was made: ``v = i[:4]; i[0] = T - 1``)."""
        held = (t,) if t._base is None else (t, t._base)
        return any(self.is_tainted(u) or self._sized.get(id(u)) is u for u in held)

    def gathers_by_data(self, t: Tensor) -> bool:
        """Whether the index ``t`` of a gather may read other rows for another input: it picks
        by the data (see :meth:`picks_by_data`), or it was made from a size (``arange(B)`` holds
        the same values at the same places for every ``B``, but more of them)."""
        return self.picks_by_data(t) or self._size_made.get(id(t)) is t

    def mark_zero(self, t: Tensor, made_from: frozenset = frozenset()) -> None:
        """Record that ``t`` was made in the forward to hold exactly 0 (from the zeros whose
        memory is in ``made_from``)."""
        self._zeros[id(t)] = (t, placement_of(t), made_from | {memory_of(t)})
        self._zero_memory.add(memory_of(t))

    def zero_source(self, t: Any) -> frozenset | None:
        """The memories ``t`` was made from when it is a constant exactly 0: made in the forward
        as zeros from numbers and shapes, none of them written since (by any tensor in their
        memory), and all 0 now; else None."""
        entry = self._zeros.get(id(t)) if isinstance(t, Tensor) else None
        if entry is None or entry[0] is not t or entry[1] != placement_of(t):
            return None
        if not entry[2].isdisjoint(self._zero_written):
            return None
        return entry[2] if not bool((t != 0).any()) else None

    def block_rewritten_zeros(self) -> None:
        """After the trace: labels that passed an op because a constant 0 was read are blocked
        when the memory of that zero (or of a zero it was made from) was written after the read
        (``floor += 0.5`` on a zero kept in a global or a closure for a later call)."""
        changed = set(self._zero_written)
        for t, placement, _ in self._zeros.values():
            if placement_of(t) != placement:  # an in-place op the tracer did not see
                changed.add(memory_of(t))
        for made_from, labels in self._zero_reads:
            if not made_from.isdisjoint(changed):
                self.block(
                    labels,
                    "a constant 0 read by the forward was written after the read "
                    "(kept for a later call?)",
                )

    # -- fresh memory: allocations and the elements read ----------------------------------
    def mark_fresh(self, t: Tensor) -> None:
        """Record that ``t`` was just allocated in the forward (``empty``, ``zeros``...): its
        memory holds values no traced op gave (garbage, or zeros), read by nobody yet."""
        memory = memory_of(t) if t.is_floating_point() or t.is_complex() else None
        if memory is not None:
            self._fresh[memory] = _Fresh(t)

    def _fresh_of(self, t: Tensor) -> _Fresh | None:
        fresh = self._fresh.get(memory_of(t)) if self._fresh else None
        return fresh if fresh is not None and fresh.holds(t) else None

    def note_reads(
        self, tensors: list[Tensor], out: Any, written: Tensor | None, numbers: Any = ()
    ) -> None:
        """Before an op's rule: record the elements of fresh memory its inputs read. An output
        in an input's memory that is none of the inputs (a view: ``t[..., :d]``, ``t.T``) reads
        nothing; it is placed by the data when an index tensor that depends on the data
        positioned it or its input, or a number computed from a size did (``numbers``: the op's
        arguments; see :data:`PLACED_BY_NUMBERS`); a view as another dtype reads every element.
        ``written``: the destination an overwrite rule speaks for (not read)."""
        if not self._fresh:
            return
        made = [o for o in nested_tensors(out) if all(o is not t for t in tensors)]
        for t in tensors:
            fresh = None if t is written else self._fresh_of(t)
            if fresh is None:
                continue
            views = [o for o in made if memory_of(o) == memory_of(t)]
            if not views:
                fresh.read[fresh.elements(t).reshape(-1)] = True
            for o in views:
                if o.element_size() != fresh.element_size or o.dtype != t.dtype:
                    fresh.read.fill_(True)
                placed = any(is_index(i) and self.picks_by_data(i) for i in tensors)
                placed = placed or (
                    self.op.rsplit(".", 1)[-1] in PLACED_BY_NUMBERS and from_size(numbers)
                )
                if placed or self._placed.get(id(t)) is t:
                    self._placed[id(o)] = o


def placement_of(t: Tensor) -> tuple:
    """Where the entries of ``t`` are and how often they were written: its memory, shape,
    strides and version. ``t.set_(other)`` and in-place ops under
    ``torch._C.DisableTorchFunction``, which no torch function reports, change them without a
    traced op."""
    try:
        return (t.data_ptr(), t.shape, t.stride(), t._version)
    except (RuntimeError, NotImplementedError):  # no memory that can be read (see memory_of)
        return (None, t.shape)


def version_of(t: Tensor) -> int | None:
    """How many times ``t``'s memory was written in place (None when not counted)."""
    try:
        return t._version
    except (RuntimeError, NotImplementedError):
        return None


def memory_of(t: Tensor) -> tuple | None:
    """The memory ``t``'s entries are in (shared by its views), with their offset; None when
    it has none that can be read (a sparse, nested or meta tensor, one batched by ``vmap``)."""
    try:
        storage = t.untyped_storage()
        pointer = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device, pointer) if pointer and storage.nbytes() else None


def by_memory(tensors: list[Tensor]) -> dict[tuple, list[Tensor]]:
    """The tensors by the memory they are in (see :func:`memory_of`; none without one)."""
    out: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        out.setdefault(memory_of(t), []).append(t)
    out.pop(None, None)
    return out


def is_index(t: Tensor) -> bool:
    """Whether ``t`` holds integers or truth values (an index, a mask), not floating values."""
    return not (t.is_floating_point() or t.is_complex())


def nested_tensors(tree: Any) -> Iterator[Tensor]:
    """The tensors in nested tuples, lists and dicts (a model output, an op's arguments)."""
    if isinstance(tree, Tensor):
        yield tree
        return
    if isinstance(tree, dict):
        tree = tree.values()
    elif not isinstance(tree, (list, tuple)):
        return
    for item in tree:  # a tensor or a number without a nested generator: most items
        if isinstance(item, Tensor):
            yield item
        elif isinstance(item, (list, tuple, dict)):
            yield from nested_tensors(item)


# Ops whose numbers place entries along a dim: shifts, indices, slice bounds, split points,
# repeat counts. Numbers given to other ops (``view``, ``expand``, ``zeros``, ``interpolate``)
# give only shapes.
PLACED_BY_NUMBERS = {
    "roll", "narrow", "select", "__getitem__", "split", "tensor_split", "chunk",
    "repeat_interleave",
}  # fmt: skip
