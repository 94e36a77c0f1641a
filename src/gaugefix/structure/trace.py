"""Tracing a model into linear constraints on gauge factors.

The model runs once, eagerly, on the example inputs under a ``TorchFunctionMode``. Every
torch-function call (``F.linear``, ``torch.cat``, ``Tensor.view``, ``+``, ...) is handed to the rule
the registry holds for it. Rules work on *labels*. Every floating tensor that flows through the
model carries, for each entry, the logarithm of the factor that entry is multiplied by when the
model is rescaled: a signed sum of *node* coordinates. Labels are stored as terms ``(nodes,
sign)``: an integer tensor broadcastable to the tensor's shape, naming one node per entry, and
``+1`` or ``-1``. Almost every tensor has a single term with sign ``+1`` (a plain label tensor);
an elementwise product of two rescaled tensors carries the sum of their terms (a :class:`Sum`).
Node 0 is the fixed coordinate 0 (model inputs, buffers, constants).

Rules relate nodes by

- ``union(a, b)`` / ``union(a, b, -1)``: the entries carry equal / opposite log-factors
  (residual additions, reused weights / the two sides of a bilinear contraction);
- ``block(labels, reason)``: the log-factor must be 0 (non-homogeneous ops, normalisation,
  outputs);

and give parameters *roles*: the log-factor of each parameter entry as a sum of signed terms
(``produce``: fresh nodes the op's output inherits, ``tie``/``consume``: the labels of an
input, negated for a consumer). A parameter used twice must get the same terms twice: its uses
are united term by term, or, when they differ in form, the parameter is fixed.

After the trace, :func:`gaugefix.structure.gauge_structure.compile_structure` solves the
constraints (a signed union-find): each connected component of nodes is one candidate generator,
with every node's sign relative to it; a component is a generator of the rescaling group when
nothing blocked it, its signs are consistent, and it multiplies some parameter entries and divides
others.

This module runs the forward and sorts each call (metadata, value reads, writes, allocations);
the trace's state and labels are :mod:`gaugefix.structure.context`'s, numbers read from sizes and
values are marked by :mod:`gaugefix.structure.marks`, and :mod:`gaugefix.structure.registry` holds
the rules.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gaugefix.errors import first_line
from gaugefix.structure.context import UNCHANGED, ZERO, Sum, TraceContext
from gaugefix.structure.marks import (
    FLOATS_FROM_SIZES,
    SizedInt,
    any_number,
    as_valued,
    from_size,
    from_value,
    lose_sizes,
    lose_values,
    math_marking,
    recorded_floats,
    scan,
    sizes_lost,
    values_lost,
)
from gaugefix.structure.module_state import PlainTensors, restore_attributes, saved_attributes
from gaugefix.structure.provenance import is_index, memory_of, nested_tensors, version_of
from gaugefix.structure.registry import (
    BUILTIN,
    USER,
    Registry,
    Rule,
    TracingError,
    ValueDependentError,
    op_name,
)

__all__ = [
    "compiled_run_eagerly",
    "trace",
]
EMPTY_INPUT = (
    "parameter read with an empty input (the example reaches none of the rows it reads: an "
    "empty batch, or no token routed to an expert): give an example that reaches them"
)


def _empty_beside(tensors: list[Tensor], is_param: Any) -> bool:
    """Whether an op's inputs hold an empty tensor that is not a parameter."""
    return any(t.numel() == 0 and not is_param(t) for t in tensors)


def _outputs(tree: Any, unsearched: set[str]) -> Iterator[Tensor]:
    """The tensors of a model's output, in nested tuples, lists, sets, dicts and dataclasses; the
    type names of other objects in it (a cache) go to ``unsearched``. An iterator (a generator)
    is refused: its tensors are computed after the traced forward."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (list, tuple, dict, set, frozenset)):
        for item in tree.values() if isinstance(tree, dict) else tree:
            yield from _outputs(item, unsearched)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for field in dataclasses.fields(tree):
            yield from _outputs(getattr(tree, field.name), unsearched)
    elif isinstance(tree, Iterator):
        raise TracingError(
            f"the model returned an iterator ({type(tree).__name__}): what it yields is "
            "computed after the forward, where discovery cannot trace it"
        )
    elif not isinstance(tree, (type(None), bool, int, float, complex, str, bytes)):
        unsearched.add(type(tree).__name__)


def _input_tensors(tree: Any, seen: set[int] | None = None) -> Iterator[Tensor]:
    """The tensors of the example inputs wherever they are nested: in tuples, lists, sets,
    mappings (``UserDict``), dataclasses and the attributes of other objects (a batch object, a
    cache), each object searched once. Modules, classes and functions are not data."""
    seen = set() if seen is None else seen
    if id(tree) in seen or isinstance(tree, (nn.Module, type)) or inspect.isroutine(tree):
        return
    seen.add(id(tree))
    if isinstance(tree, Tensor):
        yield tree
        return
    if isinstance(tree, Mapping):
        items: Iterable[Any] = tree.values()
    elif isinstance(tree, (list, tuple, set, frozenset)):
        items = tree
    else:
        items = getattr(tree, "__dict__", {}).values()
    for item in items:
        yield from _input_tensors(item, seen)


# Ops that read only metadata (shapes, dtypes, devices): safe to ignore.
_METADATA = {
    "size", "dim", "ndimension", "shape", "dtype", "device", "numel", "nelement", "stride",
    "is_contiguous", "is_floating_point", "is_complex", "requires_grad", "is_cuda", "layout",
    "__len__", "ndim", "storage_offset", "element_size", "grad_fn", "is_leaf", "get_device",
    "names", "is_sparse", "is_quantized", "is_meta", "data_ptr", "__hash__", "__repr__",
    "dim_order", "output_nr", "_version", "is_nested", "is_mkldnn", "nbytes", "itemsize",
}  # fmt: skip
# Ops that hand tensor values to Python, where control flow may depend on them (and any other
# op that returns a Python number or truth value computed from a tensor, see ``_reads_value``).
_VALUE_READS = {
    "__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy", "__complex__",
    "__array__", "__dlpack__", "__format__", "__contains__", "is_nonzero", "equal", "allclose",
}  # fmt: skip
# Value reads whose numbers are marked (:class:`ValuedInt`); ``int(x)``, ``operator.index(x)``
# and ``float(x)`` must return plain numbers (see :func:`lose_values`).
_VALUED = {"item", "tolist"}
# Value reads of whether an entry is nonzero, which positive factors keep (``if h.sum():``).
_NONZERO_READS = {"__bool__", "is_nonzero"}
# Value reads that hand over the tensor's memory itself, which untraced code may then write.
_ESCAPES = {"numpy", "__array__", "__dlpack__"}
# Ops that read a shape into Python (metadata, or ``unbind``: how many times ``for v in x``
# iterates): a value read when the shape depends on values (``len(x.nonzero())``).
_SHAPE_READS = {"size", "shape", "numel", "nelement", "__len__", "stride", "unbind"}
# Reads of sizes into Python numbers, marked when they may differ for another input.
_SIZES = {"size", "shape", "numel", "nelement"}
# Ops whose numbers give only a shape: the values they make from a size do not depend on it.
_SIZED_SHAPES = {
    "zeros", "ones", "empty", "new_zeros", "new_ones", "new_empty", "expand", "broadcast_to",
    "repeat", "tile",
}  # fmt: skip
# Ops whose output's shape depends on their input's values.
_DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
# Ops writing into (or out of place, shaped like) their first argument: a data-dependent shape
# of the others does not reach the output's shape.
_WRITES_INTO = {
    "index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_",
    "index_copy", "index_copy_", "scatter", "scatter_", "masked_scatter", "masked_scatter_",
}  # fmt: skip
# Ops that draw random numbers: their values differ from call to call (an index drawn by
# ``randperm`` picks other entries next time), but reading them into Python is not a read of
# the data.
_RANDOM = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
    "bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "poisson", "uniform_",
    "random_", "exponential_", "geometric_", "cauchy_", "log_normal_",
}  # fmt: skip
# Casts and arrangements of their first argument (the others give only a shape or dtype):
# applied to a constant 0, they give a constant 0.
_KEEPS_ZERO = {
    "to", "type", "type_as", "double", "float", "half", "bfloat16", "cpu", "cuda", "contiguous",
    "clone", "detach", "expand", "expand_as", "broadcast_to", "view", "view_as", "reshape",
    "reshape_as", "unsqueeze", "squeeze", "flatten", "t", "transpose", "permute", "__getitem__",
    "narrow", "select", "repeat",
}  # fmt: skip
# Ops whose output depends only on the input's shape: the output carries the fixed factor.
# (Zeros are not among them: a zero entry may carry any factor, see ``rules._zeros``.)
_SHAPE_ONLY = {"ones_like", "empty_like", "new_ones", "new_empty", "empty"}
# Allocations of memory whose values do not matter (garbage until written, or zeros, which carry
# any factor): assignment into them replaces labels (see TraceContext.overwrite).
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "zeros", "zeros_like", "new_zeros"}
# Ops that overwrite entries of their first argument without reading them (when their rule says
# so; they read it otherwise, and their rule then blocks).
_OVERWRITES = {"copy_", "__setitem__", "index_put_"}


def _may_write(short: str, kwargs: dict) -> bool:
    """Whether an op may write into its arguments: in place (``add_``, ``x += y``,
    ``x[i] = y``), re-pointing (``p.data = t``) or through ``out=``."""
    in_place = short.endswith("_") and not short.startswith("__")
    return in_place or short in ("__setitem__", "__set__") or "out" in kwargs


def _written(call: tuple) -> list[Tensor]:
    """The tensors an op that may write (see :func:`_may_write`) writes into, given its
    ``(args, kwargs)``: its first argument or ``out=``, and the tensors they are views of
    (``i[0] = T - 1``, ``i.narrow(0, 0, 1).fill_(T - 1)`` write ``i``)."""
    args, kwargs = call
    targets = [t for t in (args[0] if args else None, kwargs.get("out")) if isinstance(t, Tensor)]
    return targets + [t._base for t in targets if t._base is not None]


def _reads_value(short: str, out: Any) -> bool:
    """Whether an op returned a Python number or truth value (``torch.equal``), other than the
    flags of ``is_*`` properties (``x.is_cpu``)."""
    number = isinstance(out, (bool, int, float, complex))
    return number and not short.startswith(("is_", "_is_", "has_"))


def _valued_by_size(short: str, args: tuple, kwargs: dict) -> bool:
    """Whether an op makes values from a number computed from a size (``arange(6) + B``,
    ``tensor([B - 5])``, ``full(..., B)``), not only a shape or a length: ``zeros(B)``,
    ``expand(B, 6)``, ``repeat(B)`` and ``arange(B)`` hold the same values at the same places
    for every ``B``."""
    if short in _SIZED_SHAPES:
        return False
    if short in ("full", "new_full"):
        return from_size(kwargs.get("fill_value", args[-1] if args else None))
    if short == "arange":
        values = (args[0], args[2:]) if len(args) > 1 else ()
        return from_size((values, kwargs.get("start"), kwargs.get("step")))
    return from_size((args, kwargs))


# Ops whose result tells a size without a mark: name -> the place of the dim (None: every dim).
# ``unbind`` along dim 0 is left alone: iterating a tensor unbinds it, and unpacking a dim of
# constant size (``a, b = pair``) is common.
_COUNTS = {"stride": None, "unbind": 1, "split": 2}

# Ops that make a tensor of the Python numbers they are given: name -> the place of the numbers.
_FROM_NUMBERS = {"tensor": 0, "as_tensor": 0, "asarray": 0, "new_tensor": 1}


def _of_numbers(short: str, args: tuple, kwargs: dict) -> bool:
    """Whether an op makes a tensor of Python numbers (``torch.tensor(list(range(T)))``,
    ``torch.as_tensor([2, 0, 1])``, nested lists too) or of a NumPy array: ``range(T)``,
    ``int(T)`` and ``np.arange(T)`` make plain numbers from a size, which no mark follows, so
    the values count as computed from a size (an index of them may pick other entries for
    another input, as ``arange(T)`` reads more)."""
    place = _FROM_NUMBERS.get(short)
    if place is None:
        return False
    data = args[place] if len(args) > place else kwargs.get("data", kwargs.get("obj"))
    return isinstance(data, (np.ndarray, np.generic)) or any_number(data, _is_number)


def _is_number(x: Any) -> bool:
    """Whether ``x`` is a Python number other than a truth value."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _slice_tensors(tree: Any) -> Iterator[Tensor]:
    """The tensors given as bounds of slices (``h[:, a:b]``) in nested tuples and lists."""
    if isinstance(tree, slice):
        yield from (t for t in (tree.start, tree.stop, tree.step) if isinstance(t, Tensor))
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _slice_tensors(item)


def _data_shaped(
    ctx: TraceContext, short: str, call: tuple, tensors: list[Tensor], out: Any,
    maybe_marked: bool,
) -> bool:  # fmt: skip
    """Whether the shape of an op's output depends on values that may differ for another
    input (``x.nonzero()``, ``x[mask]``, ``h.split(counts.tolist(), 1)``, ``h[:, a:b]`` and
    ``h.tensor_split(ends, 1)`` for tensors ``a``, ``b``, ``ends`` computed from the inputs, and
    what is computed from them). Once the trace made a plain number from values (``int(t)``,
    see :func:`values_lost`), every op given a Python number counts. ``call``: the op's
    ``(args, kwargs)``; ``maybe_marked``: ``False`` when :func:`scan` found no slice and no
    number that may be marked in it."""
    args = call[0]
    bounds = [t for t in _slice_tensors(args) if ctx.is_tainted(t)] if maybe_marked else []
    if short == "tensor_split" and len(args) > 1 and isinstance(args[1], Tensor):
        bounds += [args[1]] if ctx.is_tainted(args[1]) else []
    lost = values_lost() and any_number(call, _is_number)
    valued = maybe_marked and from_value(call)
    if any(map(ctx.is_shaped, tensors)) or valued or bounds or lost:
        in_place = any(t is out for t in tensors)
        return not in_place and short not in _WRITES_INTO
    if short in _DATA_SHAPED or (short == "where" and len(args) == 1):
        return any(map(ctx.is_tainted, tensors))
    if short == "__getitem__":  # a boolean mask
        masks = (t for t in tensors if t.dtype == torch.bool and t is not args[0])
        return any(map(ctx.is_tainted, masks))
    if short == "repeat_interleave":  # repeats given as a tensor
        return any(ctx.is_tainted(t) for t in tensors if is_index(t))
    return False


class _Tracer(TorchFunctionMode):
    def __init__(self, ctx: TraceContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.suppress = 0  # inside how many module calls a rule speaks for
        self._empty_from: dict[int, tuple[Tensor, list[Tensor]]] = {}  # empty out: inputs
        self._unknown_empty: dict[int, Tensor] = {}  # empty outs of unknown inputs
        self.versions: list[list[int | None]] = []  # of the outermost such call's inputs
        # The plain tensors the modules' attributes reach, copied as ops are given them.
        self.plain = PlainTensors()

    def enter_rule(self, args: tuple, kwargs: dict) -> None:
        """A module call a rule speaks for begins: the ops inside it are not traced. For the
        outermost one, its inputs are checked and their versions kept (see
        :meth:`TraceContext.written`)."""
        if self.suppress == 0:
            self.versions.append(self.ctx.versions(list(nested_tensors((args, kwargs)))))
        self.suppress += 1

    def leave_rule(self) -> None:
        """A module call a rule speaks for ends."""
        self.suppress -= 1
        if self.suppress == 0:
            self.versions.pop()

    def apply_module_rule(
        self, module: nn.Module, rule: Rule, args: tuple, kwargs: dict, out: Any
    ) -> None:
        """Apply ``rule`` to the outermost module call it speaks for, which just returned
        ``out``; what the call wrote into its inputs in place is the rule's to describe."""
        ctx = self.ctx
        tensors = list(nested_tensors((args, kwargs)))
        versions = self.versions[-1]
        ctx.written(tensors, versions)
        ctx.note_reads(tensors, None, None)
        ctx.op = type(module).__name__
        ctx.module = module
        ctx.clear_claims()
        labels = ctx.apply(rule, args, kwargs, out)
        ctx.module = None
        self._block_unclaimed(tensors)
        self._fix_read_with_empty(tensors)
        written = [t for t, v in zip(tensors, versions, strict=True) if version_of(t) != v]
        self._note_empty(tensors, (out, written))
        self._block_filled(tensors, (out, written))
        ctx.commit_roles()
        self.record(out, labels, {id(t) for t in tensors})

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        short = name.rsplit(".", 1)[-1]
        ctx = self.ctx
        tensors: list[Tensor] = []
        maybe_marked = scan((args, kwargs), tensors) or sizes_lost()
        if self.plain.waiting:
            self.plain.copy_passed(tensors)
        if _may_write(short, kwargs):
            ctx.save_written(tensors)
        if self.suppress:
            return func(*args, **kwargs)
        ctx.op = name
        if any(t.is_nested for t in tensors):
            raise TracingError(
                f"{name} in module '{ctx.where}' got a nested tensor (torch.nested), which "
                "discovery cannot trace: give a padded example input"
            )
        inputs = {id(t) for t in tensors}
        out = self._run(name, func, args, kwargs, tensors)
        if short in _SHAPE_READS and any(map(ctx.is_shaped, tensors)):
            ctx.read_value("the shape of a tensor whose shape depends on values", shape=True)
        if (short in _SIZES or short == "__len__") and args and isinstance(args[0], Tensor):
            return self._sizes_read(short, args, kwargs, out)
        if short in _COUNTS and args and isinstance(args[0], Tensor):
            self._counted(short, args, kwargs)
        if short in _METADATA:
            return out
        written = args[0] if short in _OVERWRITES and args else None
        if short not in _SHAPE_ONLY and short not in _ALLOCATIONS:
            ctx.note_reads(tensors, out, written, (args, kwargs))
        tainted = any(map(ctx.depends_on_inputs, tensors))
        self._mark(short, (args, kwargs), tensors, out, (tainted, maybe_marked))
        if short in _VALUE_READS or _reads_value(short, out):
            return self._value_read(short, tensors, out, tainted)
        if not torch.is_grad_enabled():
            # Inside a custom autograd function's forward (or any no-grad region) even a
            # shape-only op blocks its input: ``out = torch.empty_like(x)`` followed by a
            # compiled kernel the tracer cannot see is how such forwards are written.
            reason = ctx.reason("op run with autograd disabled (custom autograd function?)")
            self.record(out, ctx.block_all(args, kwargs, reason), inputs)
            return out
        if short in _SHAPE_ONLY:
            self.record(out, ZERO, inputs)  # garbage of empty: the fixed factor until written
            if short in _ALLOCATIONS:
                self._allocated(out, kwargs, inputs)
            return out
        self._apply_rule(func, name, args, kwargs, out, tensors)
        if short in _ALLOCATIONS:
            self._allocated(out, kwargs, inputs)
        return out

    def _value_read(self, short: str, tensors: list[Tensor], out: Any, tainted: bool) -> Any:
        """``out``, values an op read into Python (``x.item()``, ``x.tolist()``, ``bool(x)``):
        marked as computed from values (see :class:`ValuedInt`) when a tensor read depends on
        the inputs or weights; when one was made from a size instead (``arange(T).tolist()``,
        ``int(torch.tensor(T) - 1)``), the plain numbers record that the trace lost track of
        sizes (see :func:`lose_sizes`); a truth value does not (a branch on a size is not
        caught, and Hugging Face's masks test ``arange``-made positions on every call).
        The floating tensors read carry the factors of their labels into the numbers read, so
        those labels are blocked (see :meth:`TraceContext.read_value`), unless only whether an
        entry is nonzero is read; integer and boolean tensors (routes, masks) carry none."""
        ctx = self.ctx
        if short in _ESCAPES:
            for t in tensors:
                ctx.escaped(t)
        if not tainted and not isinstance(out, bool) and any(map(ctx.gathers_by_data, tensors)):
            lose_sizes()
        if tainted:
            scaled = [t for t in tensors if t.is_floating_point() or t.is_complex()]
            ctx.read_value("a tensor value", scaled=() if short in _NONZERO_READS else scaled)
            if short not in _VALUED and not isinstance(out, bool):
                lose_values()
        return as_valued(out) if tainted and short in _VALUED else out

    def _sizes_read(self, short: str, args: tuple, kwargs: dict, out: Any) -> Any:
        """The sizes an op read into Python, marked where they may differ for another input
        (see :meth:`TraceContext.sizes_read`). ``len(t)`` returns a plain int whatever
        ``Tensor.__len__`` returns: when the length may differ, the trace lost track of a
        number computed from a size (see :func:`lose_sizes`)."""
        if short == "__len__":
            if isinstance(self.ctx.sizes_read(args[0], out, 0), SizedInt):
                lose_sizes()
            return out
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        return self.ctx.sizes_read(args[0], out, dim)

    def _counted(self, short: str, args: tuple, kwargs: dict) -> None:
        """Record that the trace made plain numbers from a size (see :func:`lose_sizes`) when
        the op tells a size that may differ for another input without a mark: a stride
        (``x.stride(0)`` of ``[B, T, D]`` is ``T D``) or a count of pieces (``len(x.unbind(1))``,
        ``enumerate(x.split(1, 1))``)."""
        t, place = args[0], _COUNTS[short]
        pieces = kwargs.get("split_size", kwargs.get("split_size_or_sections"))
        if short == "split" and not isinstance(args[1] if len(args) > 1 else pieces, int):
            return  # pieces of the sizes listed: as many for every input
        if place is None:
            read = self.ctx.sizes_read(t, t.numel())
        else:
            dim = args[place] if len(args) > place else kwargs.get("dim", 0)
            if not isinstance(dim, int) or not t.dim() or (short == "unbind" and not dim % t.dim()):
                return
            read = self.ctx.sizes_read(t, t.shape[dim], dim)
        if isinstance(read, SizedInt):
            lose_sizes()

    def _apply_rule(
        self, func: Any, name: str, args: tuple, kwargs: dict, out: Any, tensors: list[Tensor]
    ) -> None:
        """Label ``out`` by the op's rule (an unknown op blocks everything it touched), block
        the tensors the rule did not claim and commit the roles it gave the parameters."""
        ctx = self.ctx
        rule = ctx.rule_for_op(func, name)
        ctx.clear_claims()
        ctx.func = func
        if rule is None:
            labels = ctx.block_all(args, kwargs, ctx.reason(f"unknown op {name}"))
        elif _empty_beside(tensors, ctx.is_param) and any(map(ctx.is_param, tensors)):
            labels = self._block_empty_read(tensors)
        else:
            labels = ctx.apply(rule, args, kwargs, out)
        self._block_unclaimed(tensors)
        self._fix_read_with_empty(tensors)
        short = name.rsplit(".", 1)[-1]
        written = args[0] if args and _may_write(short, kwargs) else None
        self._note_empty(tensors, (out, written, kwargs.get("out")))
        self._block_filled(tensors, (out, written, kwargs.get("out")))
        ctx.commit_roles()
        self.record(out, labels, {id(t) for t in tensors})

    def _run(self, name: str, func: Any, args: tuple, kwargs: dict, tensors: list[Tensor]) -> Any:
        """``func(*args, **kwargs)``, a failure raised as a :class:`TracingError` naming the op
        and the module; the writes it made into ``tensors`` recorded."""
        versions = self.ctx.versions(tensors)
        try:
            out = func(*args, **kwargs)
        except TracingError:
            raise
        except Exception as err:
            message = f"{name} failed in module '{self.ctx.where}': {first_line(err)}"
            raise TracingError(message) from err
        self.ctx.written(tensors, versions)
        return out

    def _allocated(self, out: Any, kwargs: dict, inputs: set[int]) -> None:
        """Record an allocation's new tensor (not one written through ``out=``) as fresh."""
        if isinstance(out, Tensor) and "out" not in kwargs and id(out) not in inputs:
            self.ctx.mark_fresh(out)

    def _mark(
        self, short: str, call: tuple, tensors: list[Tensor], out: Any, flags: tuple[bool, bool]
    ) -> None:
        """Record the outputs whose values depend on the inputs or weights, are random, were
        computed from a size, or have a shape that depends on values. ``call``: the op's
        ``(args, kwargs)``; ``flags``: whether an input is tainted, and whether the arguments
        may hold a marked number (see :func:`scan`: when not, no number was computed from a
        size or from values)."""
        ctx, args = self.ctx, call[0]
        tainted, maybe_marked = flags
        random = short in _RANDOM or any(map(ctx.is_random, tensors))
        made = maybe_marked and from_size(call)  # what _valued_by_size reads is in the call
        sized = any(map(ctx.is_sized, tensors)) or _of_numbers(short, *call)
        sized = sized or (made and _valued_by_size(short, *call))
        made = made or any(map(ctx.is_size_made, tensors))
        shaped = _data_shaped(ctx, short, call, tensors, out, maybe_marked)
        ctx.record_provenance(out, (tainted, random, sized, made, shaped))
        if _may_write(short, call[1]):  # the values written: the memory written holds them now
            ctx.record_provenance(_written(call), (tainted, random, sized, made, False))
        if short in _KEEPS_ZERO and isinstance(out, Tensor) and args:
            made_from = ctx.zero_source(args[0])
            if made_from is not None:
                ctx.mark_zero(out, made_from)

    def _fix_read_with_empty(self, tensors: list[Tensor]) -> None:
        """An op that meets the parameters it uses with an empty tensor (the rows of an expert
        no token of the example reaches) shows nothing of how their channels meet the data on
        an input that fills it: every parameter the op gave a role is fixed, and the channels
        of the activations the empty tensor was cut from are blocked."""
        ctx = self.ctx
        if not _empty_beside(tensors, ctx.is_param):  # the common case first: nothing empty
            return
        if not (ctx.has_pending() or any(map(ctx.is_param, tensors))):
            return
        reason = ctx.reason(EMPTY_INPUT)
        ctx.fix_pending(reason)
        for t in tensors:
            entry = self._empty_from.get(id(t))
            for source in entry[1] if entry is not None and entry[0] is t else ():
                ctx.block(ctx.terms(source), reason)

    def _block_empty_read(self, tensors: list[Tensor]) -> Tensor:
        """Instead of an op's rule, for an op that meets parameters with an empty tensor: the
        slices of parameters it read (``W[e]``) are fixed (see :meth:`TraceContext.fix_slice`),
        the other parameters fixed, the activations blocked; the output carries the fixed
        factor. An empty input whose activations the trace does not know (see
        :meth:`_unknown_origin`) fixes every parameter the op read, as its channels cannot be
        blocked."""
        ctx = self.ctx
        reason = ctx.reason(EMPTY_INPUT)
        if any(map(self._unknown_origin, tensors)):
            return ctx.block_all(tuple(tensors), {}, reason)
        rest = []
        for t in tensors:
            if ctx.is_param(t) and id(t) not in ctx.param_names:
                ctx.fix_slice(t, reason)
            else:
                rest.append(t)
        return ctx.block_all(tuple(rest), {}, reason)

    def _block_filled(self, tensors: list[Tensor], out: Any) -> None:
        """An op that joins an empty tensor of rows (channels kept: its last dim is not empty,
        or its shape depends on values, ``h.T[:, mask]``) into a non-empty output
        (``torch.cat`` of experts, one of them reached by no token) or writes it into a
        non-empty tensor (``y[mask] = x[mask]``, ``buf[e, :n] = x[idx]``) puts rows there that
        another input fills, with factors the trace never saw: those of the channels it was
        cut from, or 1 where it passed a fixed parameter (an expert's ``nn.Linear``). Those
        channels and every channel the op joins them with are blocked. ``out``: what the op
        returned and the tensors it wrote into."""
        if not self._empty_from:  # no empty tensor was made yet: none to join
            return
        if not any(t.numel() for t in nested_tensors(out)):
            return
        ctx = self.ctx
        sources: list[Tensor] = []
        for t in tensors:
            entry = self._empty_from.get(id(t))
            rows = t.ndim and (t.shape[-1] or ctx.is_shaped(t))
            if entry is not None and entry[0] is t and rows:
                sources += entry[1]
        if not sources:
            return
        reason = ctx.reason(
            "rows no input of the example reaches (an expert no token reaches) joined into "
            "the output"
        )
        joined = [t for t in tensors if t.numel() and not ctx.is_param(t)]
        for source in sources + joined:
            ctx.block(ctx.terms(source), reason)

    def _note_empty(self, tensors: list[Tensor], out: Any) -> None:
        """Keep, for each empty tensor an op returns or writes into (``x[:0]``, a split's empty
        chunk, ``buf[:] = x[idx]``), the non-empty activations it was cut from (with those it
        held): rows of them that another input fills. ``out``: what the op returned and the
        tensors it wrote into."""
        empty = [t for t in nested_tensors(out) if t.numel() == 0]
        if not empty:
            return
        sources: list[Tensor] = []
        for t in tensors:
            entry = self._empty_from.get(id(t))
            if entry is not None and entry[0] is t:
                sources += entry[1]
            elif t.numel() and not self.ctx.is_param(t):
                sources.append(t)
        unknown = any(map(self._unknown_origin, tensors))
        for t in empty:
            self._empty_from[id(t)] = (t, sources)
            if unknown or not sources:
                self._unknown_empty[id(t)] = t

    def _unknown_origin(self, t: Tensor) -> bool:
        """Whether ``t`` is an empty activation the trace knows no non-empty activation it
        was cut from: allocated empty and written in place (``buf = torch.empty(n, d)``,
        ``buf[:] = h[idx]``), a graph input, or made from such a tensor. Another input fills
        its rows with factors of channels the trace cannot name."""
        if t.numel() or not (t.is_floating_point() or t.is_complex()) or self.ctx.is_param(t):
            return False
        entry = self._empty_from.get(id(t))
        return entry is None or entry[0] is not t or self._unknown_empty.get(id(t)) is t

    def _block_unclaimed(self, tensors: list[Tensor]) -> None:
        """A safety net: the tensors among an op's arguments its rule did not look at are
        blocked."""
        ctx = self.ctx
        for t in tensors:
            if not ctx.is_claimed(t) and (t.is_floating_point() or t.is_complex()):
                reason = ctx.reason("input not handled by the op's rule")
                if ctx.is_param(t):
                    ctx.fix(t, reason)
                else:
                    ctx.block(ctx.terms(t), reason)

    def record(self, out: Any, labels: Any, inputs: set[int] | frozenset = frozenset()) -> None:
        """Give the op's output its labels. ``inputs``: ids of the op's tensor arguments.

        An output that is one of the inputs was written in place (``x.mul_(y)``, ``out=``):
        views and bases sharing its memory keep its old labels, so old and new labels are united.
        A non-floating output (a cast to an integer type) cannot carry labels: the labels the
        rule gave it are blocked, since its values depend on the scale of its input. An output
        a rule recorded as an arrangement of a parameter keeps that record instead.
        """
        ctx = self.ctx
        if labels is UNCHANGED:
            return
        if isinstance(out, Tensor):
            if ctx.is_param(out) and id(out) not in inputs:
                return
            lab = Sum.of(labels if isinstance(labels, (Tensor, Sum)) else None)
            if out.is_floating_point() or out.is_complex():
                if id(out) in inputs:
                    new = ctx.single(lab, out.shape)
                    ctx.union(ctx.labels(out), new)
                    lab = Sum.of(new)
                ctx.set_labels(out, lab)
            elif any(bool((nodes != 0).any()) for nodes, _ in lab):
                ctx.block(lab, ctx.reason("converted to a non-floating dtype"))
        elif isinstance(out, (tuple, list)):
            if not isinstance(labels, (tuple, list)) or isinstance(labels, Sum):
                labels = [labels] * len(out)
            for o, lab in zip(out, labels, strict=True):
                self.record(o, lab, inputs)


@contextlib.contextmanager
def _module_hooks(model: nn.Module, tracer: _Tracer) -> Iterator[None]:
    """Keep the module path current and hand registered module types to their rules."""
    ctx = tracer.ctx
    handles = []
    calls: list[nn.Module] = []  # the module of each entry of ctx.module_stack

    def pre(name: str, rule: Rule | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx.module_stack.append(name)
            calls.append(module)
            if rule is not None:
                tracer.enter_rule(args, kwargs)

        return hook

    def post(name: str, rule: Rule | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            # With always_call, this also runs while an exception leaves the module's forward:
            # remember the innermost module it came from before the path is popped.
            exc = sys.exc_info()[1]
            raised = exc is not None and out is None
            if raised and id(exc) not in ctx.failures:
                ctx.failures[id(exc)] = (exc, name)
            if not calls or calls[-1] is not module:
                return  # a pre-hook before ours raised: this call was never entered
            calls.pop()
            # The rule runs while the tracer is still suppressed: its own tensor operations on
            # labels must not be traced. Inside a module that has a rule itself, the outer rule
            # speaks for the whole call, so inner rules are skipped.
            if rule is not None and tracer.suppress == 1 and not raised:
                tracer.apply_module_rule(module, rule, args, kwargs, out)
            if rule is not None:
                tracer.leave_rule()
            ctx.module_stack.pop()

        return hook

    # A module's rule speaks for what its forward returned: its post hook runs before the
    # model's own forward hooks (prepend), which are then traced. Global forward hooks run before
    # every module's own, while the tracer is suppressed: with any, modules are traced through.
    global_hooks = bool(nn.modules.module._global_forward_hooks)
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue  # takes no hooks; what it computes is invisible and blocked (see labels)
        rule = None if global_hooks else ctx.rule_for_module(module)
        label = name or "<root>"
        handles.append(module.register_forward_pre_hook(pre(label, rule), with_kwargs=True))
        handles.append(
            module.register_forward_hook(
                post(label, rule), with_kwargs=True, always_call=True, prepend=rule is not None
            )
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _model_restored(
    model: nn.Module,
    devices: set[torch.device],
    written: dict[int, tuple[Tensor, Tensor, Tensor]],
) -> Iterator[PlainTensors]:
    """Gradients enabled, every floating parameter requiring grad and holding no gradient (a
    forward may call ``backward``) inside; afterwards the buffers (BatchNorm running
    statistics, and which tensor each module holds as one: the forward may replace them),
    the parameters the trace saw written (``written``: parameter, its memory and values;
    filled while inside), ``requires_grad`` flags, gradients and the global random state
    (also of the CUDA ``devices`` and those of the buffers) are as they were, and so are the
    modules' own attributes (see :func:`~gaugefix.structure.module_state.saved_attributes`).
    Yields the plain tensors they reach, for the tracer to copy as ops are given them."""
    modules = [m for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
    attributes = saved_attributes(modules)
    registered = [(m, dict(m._buffers)) for m in modules]  # a script module keeps its own
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    cuda = [d for d in devices | {b.device for b, _ in buffers} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            for p, _, _ in flags:
                p.grad = None
                if p.is_floating_point():
                    p.requires_grad_(True)
            yield attributes.tensors
    finally:
        restore_attributes(attributes)
        for module, held in registered:
            module._buffers.clear()
            module._buffers.update(held)
        for b, _ in buffers:
            if b.grad_fn is not None and b._base is None:  # written from an activation
                b.detach_()
        with torch.inference_mode():  # writes buffers created in inference mode too
            for b, saved in buffers:
                b.copy_(saved)
        with torch.no_grad():
            for p, memory, saved in written.values():
                p.data = memory  # its own memory again, if the forward re-pointed it
                p.copy_(saved)
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad


def _refuse_unusable(model: nn.Module) -> None:
    """Raise :class:`TracingError` for a parameter or buffer the trace cannot run with: one not
    initialized yet (a lazy module never run), or a parameter made under
    ``torch.inference_mode`` (autograd, which the trace relies on, cannot record it)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if nn.parameter.is_lazy(t):
                raise TracingError(
                    f"{kind} '{name}' is not initialized (a lazy module): run the model once "
                    "on an input before discover"
                )
            if kind == "parameter" and t.is_inference():
                raise TracingError(
                    f"parameter '{name}' was created under torch.inference_mode, where autograd "
                    "(which discovery needs) cannot record it: build the model outside it"
                )


def compiled_run_eagerly() -> contextlib.AbstractContextManager:
    """Code compiled by ``torch.compile`` runs its original Python, eagerly, where the tracer
    (or another function mode, such as ``equalize_``'s calibration) sees each op (Dynamo would
    otherwise compile the mode's own bookkeeping, or fail on it); a no-op before torch 2.6."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _inputs_copied(model: nn.Module, inputs: Any) -> Any:
    """A deep copy of the example ``inputs`` for the trace to run on, so that what the forward
    writes into them (a cache it appends to, an in-place scaling) stays off the caller's; the
    model's modules, parameters and buffers, and input tensors sharing memory with them, stay
    themselves. Inputs ``copy.deepcopy`` cannot copy are used as they are."""
    own = [*model.modules(), *model.parameters(), *model.buffers()]
    memory = {memory_of(t) for t in own if isinstance(t, Tensor)} - {None}
    kept = [t for t in _input_tensors(inputs) if memory_of(t) in memory]
    memo = {id(x): x for x in (*own, *kept)}
    try:
        return copy.deepcopy(inputs, memo)
    except Exception:  # e.g. a non-leaf tensor, a lock: the forward runs on the caller's
        return inputs


@contextlib.contextmanager
def _sizes_forgotten(model: nn.Module) -> Iterator[None]:
    """Record this thread's floats computed from sizes while the forward runs; when it ends,
    forget them (the marked numbers the forward stored on the model's modules are gone with
    the attributes :func:`_model_restored` puts back: the marks are the trace's, see
    :class:`SizedInt`)."""
    local = FLOATS_FROM_SIZES
    earlier = (
        recorded_floats(),
        getattr(local, "values_lost", None),
        getattr(local, "sizes_lost", None),
    )
    local.floats, local.values_lost, local.sizes_lost = {}, [False], [False]
    try:
        yield
    finally:
        local.floats, local.values_lost, local.sizes_lost = earlier


def _forward(model: nn.Module, args: tuple, kwargs: dict, ctx: TraceContext) -> Any:
    """``model(*args, **kwargs)``; an exception from the forward becomes a
    :class:`TracingError` naming the module and op where it happened."""
    try:
        return model(*args, **kwargs)
    except TracingError:
        raise
    except Exception as err:
        exc, where = ctx.failures.get(id(err), (None, ctx.where))
        raise TracingError(
            f"the model's forward failed in module "
            f"'{where if exc is err else ctx.where}' (last op {ctx.op}): {first_line(err)}"
        ) from err


def _block_outputs(ctx: TraceContext, out: Any) -> None:
    """Fix or block the model's floating outputs: rescaling them changes the function."""
    for t in _outputs(out, ctx.unsearched):
        if t.is_floating_point() or t.is_complex():
            reason = "model output (rescaling it changes the function)"
            if ctx.is_param(t):
                ctx.fix(t, reason)
            else:
                ctx.block(ctx.terms(t), reason)


def trace(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    allow_value_dependent: bool = False,
    rules: Iterable[tuple[Any, Callable[..., Any]]] = (),
) -> TraceContext:
    """Run ``model(*args, **kwargs)`` once under the tracer and return the filled context.

    Raises :class:`ValueDependentError` when the forward read into Python a tensor value that
    depends on the inputs or the parameters (``if x.sum() > 0:``): a trace sees one path through
    the forward, and other inputs may take another, on which the structure found here can be
    wrong. ``allow_value_dependent=True`` accepts such a forward for users who know the path is
    fixed; the reads are then listed in ``ctx.value_reads``. ``rules``: ``(target, rule)``
    pairs that apply to this trace only, before those of :func:`register_rule` and the built-in
    ones.

    The model is left as it was: buffers (BatchNorm running statistics) are restored, the global
    random state is not advanced, and ``requires_grad`` flags and gradients are put back; the
    forward runs on a deep copy of the inputs where they can be copied, so that they are left
    as they were too.
    """
    _refuse_unusable(model)
    per_call = Registry()
    for pair in rules:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"rules must be (target, rule) pairs, got {pair!r}")
        per_call.add(*pair)
    # The user's rules as they are when the trace starts: one (un)registered meanwhile, from
    # another thread or a rule, does not apply to some of the trace's ops and not others.
    ctx = TraceContext(model, (per_call, USER.copy(), BUILTIN))
    for p in ctx.params.values():  # a factor exp(h) cannot be stored in their entries
        if not p.is_floating_point():
            ctx.fix(p, f"an integer or bool parameter ({p.dtype}) cannot be rescaled")
    tracer = _Tracer(ctx)
    args, kwargs = _inputs_copied(model, (args, kwargs))
    for t in _input_tensors((args, kwargs)):
        ctx.mark_input(t)
    inputs = {t.device for t in _input_tensors((args, kwargs))}
    with _model_restored(model, inputs, ctx.saved) as tracer.plain, compiled_run_eagerly():
        with _module_hooks(model, tracer), tracer, _sizes_forgotten(model), math_marking():
            out = _forward(model, args, kwargs, ctx)
        ctx.fix_written()
        ctx.fix_partly_read()
        ctx.fix_empty_slices()
        ctx.value_reads += ctx.shape_reads
        _block_outputs(ctx, out)
        ctx.block_stored(model)
        ctx.block_rewritten_zeros()
    if ctx.value_reads and not allow_value_dependent:
        raise ValueDependentError(
            f"the forward's control flow may depend on its input or weights: "
            f"{ctx.value_reads[0]}; a trace sees one path, and the rescaling found on it can "
            "change the outputs of inputs that take another. Pass allow_value_dependent=True "
            "if that path is the same for every input"
        )
    return ctx
