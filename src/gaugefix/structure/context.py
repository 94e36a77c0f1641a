"""The state of one trace: labels, nodes, constraints and parameter roles.

Every floating tensor that flows through the traced model carries, for each entry, the logarithm
of the factor that entry is multiplied by when the model is rescaled: a signed sum of *node*
coordinates (a :class:`Sum` of terms ``(nodes, sign)``, ``nodes`` an integer tensor broadcastable
to the tensor's shape; node 0 is the fixed coordinate 0). :class:`TraceContext` allocates the
nodes, records the constraints the rules state between them (``union``, ``block``), the terms of
each parameter entry (``produce``, ``tie``, ``consume``), and what is known of each tensor: which
arrangement of which parameter it holds (a view, a cast, slices gathered by an index), and which
memory the forward allocated and wrote. Its records of gathered slices are
:mod:`gaugefix.structure.gathers`'s, those of where values and memory come from
:mod:`gaugefix.structure.provenance`'s.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gaugefix.errors import first_line
from gaugefix.structure.gathers import Coverage, Gathered, GatheredSlices
from gaugefix.structure.marks import SizedInt
from gaugefix.structure.module_state import reached_tensors, stored_values
from gaugefix.structure.provenance import (
    Provenance,
    by_memory,
    memory_of,
    nested_tensors,
    placement_of,
    version_of,
)
from gaugefix.structure.registry import (
    Registry,
    Rule,
    TracingError,
)

__all__ = [
    "compact",
    "Sum",
    "TraceContext",
    "UNCHANGED",
    "ZERO",
]


def compact(labels: Tensor) -> Tensor:
    """The smallest tensor that broadcasts back to ``labels``: dims along which it is constant
    shrink to size 1 (a zero stride is read as constant without looking)."""
    for d in range(labels.dim()):
        if labels.shape[d] > 1 and (
            labels.stride(d) == 0 or torch.equal(labels, labels.narrow(d, 0, 1).expand_as(labels))
        ):
            labels = labels.narrow(d, 0, 1)
    return labels


ZERO = torch.zeros((), dtype=torch.long)
# A rule's answer for an op that returned its input itself, unchanged (``p.contiguous()`` of a
# contiguous ``p``, ``p.to(p.dtype)``): the output keeps its labels; it was not written.
UNCHANGED = object()


class Sum(tuple):
    """Labels that are a signed sum of terms: a tuple of ``(nodes, sign)`` pairs, each ``nodes``
    broadcastable to the tensor. The empty sum is the fixed log-factor 0."""

    def map(self, fn: Callable[[Tensor], Tensor]) -> Sum:
        """The same terms with ``fn`` applied to every node tensor (reshaping, slicing...)."""
        return Sum((fn(nodes), sign) for nodes, sign in self)

    def negated(self) -> Sum:
        return Sum((nodes, -sign) for nodes, sign in self)

    @staticmethod
    def of(labels: Tensor | Sum | None) -> Sum:
        if labels is None:
            return Sum()
        if isinstance(labels, Sum):
            return labels
        return Sum([(labels, 1)])


class _ParamView:
    """A tensor that holds the entries of one parameter in another arrangement (``W.t()``,
    ``W.view(...)``, ``W.float()``): ``index[i]`` is the flat index of the parameter entry at
    position ``i`` of the view (every parameter entry exactly once), or, for a gain broadcast
    over a tensor it multiplies (``_weight_norm``'s ``w = g v / ||v||`` with ``v`` fixed), the
    entry of the gain that multiplies position ``i`` (every entry at least once)."""

    def __init__(self, param: Tensor, index: Tensor) -> None:
        self.param, self.index = param, index


class TraceContext(GatheredSlices, Provenance):
    """The state of one trace: node allocation, constraints, parameter roles and tags."""

    def __init__(self, model: nn.Module, registries: tuple[Registry, ...]) -> None:
        self.registries = registries  # consulted in order: per call, the user's, built-in
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())
        # memory (see memory_of) -> the parameters in it: a tensor there that is not one of them
        # (a buffer, an attribute or a constant aliasing a parameter) changes with them.
        self._param_memory = by_memory(list(self.params.values()))
        # id -> (tensor, placement): the parameters as the forward began and their arrangements
        # as they were made; one placed otherwise after the forward was written (see
        # fix_written). The parameters a traced op was about to write, by id, with their memory
        # and values, to put back after the trace (see save_written).
        self._arranged = {id(p): (p, placement_of(p)) for p in self.params.values()}
        self.saved: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        # Committed roles: name -> the terms of each parameter entry's log-factor, or None once
        # the parameter is fixed (every entry carries 0).
        self.roles: dict[str, list[tuple[Tensor, int]] | None] = {}
        self._pending: dict[str, list[tuple[Tensor, int]]] = {}
        # name -> the nodes of the channels a parameter produces (for reports and orientation).
        self.produced: dict[str, Tensor] = {}
        self.produced_at: dict[str, int] = {}  # name -> the number of marks when it first produced
        # name -> the channels a gain produces where its produced nodes are its gains instead
        self.gain_channels: dict[str, int] = {}
        self.num_nodes = 1  # node 0: the fixed coordinate 0
        self.edges: list[Tensor] = []  # [3, k]: node a, node b, sign (a = sign * b)
        self.marks: list[tuple[Tensor, str]] = []  # (nodes fixed to 0, reason)
        self.tags: list[tuple[Tensor, str]] = []  # (nodes, kind of generator they belong to)
        self.module_stack: list[str] = []
        self.op = "<forward>"
        self.func: Any = None  # the callable being traced, for rules that re-apply it
        self.module: nn.Module | None = None  # the module a module rule speaks for
        # id(tensor) -> (tensor, labels, where its entries were then: see placement_of)
        self._labels: dict[int, tuple[Tensor, Sum, tuple]] = {}
        # storage address -> the tensors in it that carry labels (id -> tensor)
        self._in_memory: dict[tuple, dict[int, Tensor]] = {}
        # id(grad_fn) -> (grad_fn, {output_nr: labels of the recorded tensor at that output})
        self._grad_fn_labels: dict[int, tuple[Any, dict[int, Sum]]] = {}
        self._views: dict[int, tuple[Tensor, _ParamView]] = {}
        self._gathers: dict[int, tuple[Tensor, Gathered]] = {}
        # Per use of slices picked by data-dependent rows: its nodes per position, the index's
        # storage element each position read, ((that storage, version), parameter), the op.
        self._holders: list[tuple[Tensor, Tensor, tuple[tuple[int, int], str], str]] = []
        self.slice_links: set[int] = set()  # indices into edges: links of positions to slices
        # name -> per arrangement, its slices read by gathers whose rows depend on the data
        self.coverage: dict[str, list[Coverage]] = {}
        self._claimed: set[int] = set()
        self._init_provenance()
        # id(exception) -> (exception, innermost module path it was raised in)
        self.failures: dict[int, tuple[BaseException, str]] = {}
        self.used_params: set[str] = set()  # parameters some rule looked at
        self.fixed: dict[str, str] = {}  # name -> why the parameter was first fixed
        self.multiplied: set[str] = set()  # parameters read by a product of two parameters
        # name -> (its entries in slices read with an empty input, why): see fix_slice
        self.empty_slices: dict[str, tuple[Tensor, str]] = {}
        self.value_reads: list[str] = []  # input- or weight-dependent values read into Python
        self.shape_reads: list[str] = []  # and shapes that depend on them (after the trace, last)
        self.unsearched: set[str] = set()  # types of the output's objects not searched (a cache)

    # -- rules ----------------------------------------------------------------------------------
    def rule_for_op(self, func: Any, name: str) -> Rule | None:
        """The first registry's rule for ``func`` (an attribute such as ``x.T`` by its name)."""
        key = name if getattr(func, "__name__", None) == "__get__" else func
        return next((r.ops[key] for r in self.registries if key in r.ops), None)

    def rule_for_module(self, module: nn.Module) -> Rule | None:
        """The rule for the nearest class in ``module``'s MRO that has one, provided ``module``
        runs that class's ``forward`` (a subclass that overrides it is traced through)."""
        for cls in type(module).__mro__:
            rule = next((r.modules[cls] for r in self.registries if cls in r.modules), None)
            if rule is not None:
                return rule if type(module).forward is cls.forward else None
        return None

    def apply(self, rule: Rule, args: tuple, kwargs: dict, result: Any) -> Any:
        """Run ``rule`` on an op's arguments bound by name; a call its signature does not take
        blocks every input. A rule that fails raises :class:`TracingError` naming it (not
        mistaken for the model's own error: a ``TypeError`` inside ``a * b`` would read as
        "unsupported operand")."""
        try:
            return rule.fn(self, result, *args, **kwargs)
        except TracingError:
            raise
        except Exception as err:
            if isinstance(err, TypeError):
                try:  # only now (rarely): was it the call that did not bind?
                    rule.signature.bind(self, result, *args, **kwargs)
                except TypeError:
                    reason = self.reason(f"call its rule does not take: {err}")
                    return self.block_all(args, kwargs, reason)
            name = getattr(rule.fn, "__qualname__", repr(rule.fn))
            raise TracingError(
                f"the rule {name} for {self.op} failed in module '{self.where}': "
                f"{type(err).__name__}: {first_line(err)}"
            ) from err

    # -- where we are -------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<root>"

    def reason(self, text: str) -> str:
        """``text``, with the op (unless it already names it) and the module path."""
        if self.op in text:
            return f"{text} in '{self.where}'"
        return f"{text} ({self.op} in '{self.where}')"

    # -- nodes ----------------------------------------------------------------------------------
    def fresh(self, *shape: int) -> Tensor:
        """New nodes, one per entry of ``shape``."""
        n = math.prod(shape)
        out = torch.arange(self.num_nodes, self.num_nodes + n).reshape(shape)
        self.num_nodes += n
        return out

    def union(self, a: Tensor, b: Tensor, sign: int = 1) -> None:
        """Entries of ``a`` and ``b`` (node tensors, broadcast together) carry equal
        (``sign=1``) or opposite (``sign=-1``) log-factors."""
        a, b = torch.broadcast_tensors(a, b)
        for d in range(a.dim()):
            if a.shape[d] > 1 and a.stride(d) == 0 and b.stride(d) == 0:
                a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
        a, b = a.reshape(-1), b.reshape(-1)
        if sign == 1:
            keep = a != b
            if not bool(keep.all()):  # else every pair is kept (fresh nodes on one side)
                a, b = a[keep], b[keep]
        if a.numel():
            if not (_increasing(a) or _increasing(b)):  # else every pair is there once
                pair = torch.unique(a * self.num_nodes + b)  # each pair once (a, b < num_nodes)
                a, b = pair // self.num_nodes, pair % self.num_nodes
            self.edges.append(torch.stack([a, b, torch.full_like(a, sign)]))
            fixed = (a == 0) | (b == 0)  # named as the reason of the nodes joined to node 0
            if bool(fixed.any()):
                self.block(torch.cat([a[fixed], b[fixed]]), self.reason(_MIXED))

    def block(self, labels: Tensor | Sum, reason: str) -> None:
        """The nodes in ``labels`` are fixed to 0 (they are not gauge freedom)."""
        for nodes, _ in Sum.of(labels):
            nodes = torch.unique(compact(nodes))
            nodes = nodes[nodes != 0]  # node 0 is fixed already; its own reason is generic
            if nodes.numel():
                self.marks.append((nodes, reason))

    def tag(self, labels: Tensor | Sum, kind: str) -> None:
        """Record that the generators of these nodes are of ``kind`` (for the summary)."""
        for nodes, _ in Sum.of(labels):
            nodes = torch.unique(compact(nodes))
            nodes = nodes[nodes != 0]
            if nodes.numel():
                self.tags.append((nodes, kind))

    # -- labels of tensors ----------------------------------------------------------------------
    def is_param(self, t: Any) -> bool:
        """Whether ``t`` is a parameter of the model or an arrangement of one (``W.t()``)."""
        if not isinstance(t, Tensor):
            return False
        if id(t) in self.param_names or self.is_gathered(t):
            return True
        entry = self._views.get(id(t))
        return entry is not None and entry[0] is t

    def transpose_of(self, t: Tensor) -> Tensor | None:
        """The 2-d parameter ``W`` when ``t`` is its transpose (``W.T``, ``W.t()``,
        ``W.transpose(0, 1)``: entry ``[i, j]`` of ``t`` is ``W[j, i]``); None otherwise."""
        entry = self._views.get(id(t))
        if entry is None or entry[0] is not t or t.dim() != 2:
            return None
        param, index = entry[1].param, entry[1].index
        if param.dim() != 2 or tuple(t.shape) != tuple(param.shape)[::-1]:
            return None
        transposed = torch.arange(param.numel(), device=index.device).view(param.shape).t()
        return param if torch.equal(index.reshape(-1), transposed.reshape(-1)) else None

    def has_pending(self) -> bool:
        """Whether the current op gave some parameter a role not yet committed."""
        return bool(self._pending)

    def fix_pending(self, reason: str) -> None:
        """Fix every parameter the current op gave a role not yet committed."""
        for name in list(self._pending):
            self.fix(self.params[name], reason)

    def sizes_read(self, t: Tensor, out: Any, dim: Any = None) -> Any:
        """``out``, sizes of ``t`` read into Python (``t.shape``, ``t.size(d)``, ``t.numel()``),
        marked (:class:`SizedInt`) for an input of the example (every dim) and for a tensor
        made from the inputs that the rescaling acts on (it carries labels) along the dims its
        labels are constant along: such dims (the batch, the sequence) may have other sizes for
        another input. Dims along which labels vary hold channels, sized by the parameters, and
        so does a dim of size 1 (one channel) unless an input of the example has a dim of size
        1: then it may be a batch or a sequence of 1, and is marked; the sizes of other tensors
        (a rotary table, a mask made from the inputs) are plain: their channel counts slice
        rescaled channels (``q[..., : cos.shape[-1]]``). ``dim``: the dim ``t.size(dim)``
        read."""
        if id(t) not in self._tainted or self.is_param(t):
            return out
        entry = self._labels.get(id(t))
        terms = entry[1] if entry is not None and entry[0] is t else ()
        if not terms and self._inputs.get(id(t)) is not t:
            return out
        varying = {d for nodes, _ in terms for d, n in enumerate(nodes.shape) if n > 1}
        if terms and not self._ones_in_inputs:
            varying.update(d for d, n in enumerate(t.shape) if n == 1)
        if isinstance(out, torch.Size):
            return torch.Size(n if d in varying else SizedInt(n) for d, n in enumerate(out))
        if isinstance(out, bool) or not isinstance(out, int):
            return out
        if dim is None:  # numel: constant when every dim holds channels
            return SizedInt(out) if len(varying) < t.dim() else out
        if not isinstance(dim, int) or (t.dim() and dim % t.dim() in varying):
            return out
        return SizedInt(out)

    def read_zero(self, zero: Tensor, labels: Tensor | Sum) -> Tensor | Sum:
        """``labels`` pass an op because ``zero`` (see :meth:`zero_source`) is 0; returns
        them. They are blocked after the trace if that zero is kept on a module."""
        self.claim(zero)
        self._zero_reads.append((self._zeros[id(zero)][2], Sum.of(labels)))
        return labels

    def read_value(self, what: str, shape: bool = False, scaled: Iterable[Tensor] = ()) -> None:
        """Record that the forward read ``what`` of a tensor derived from the inputs or weights
        into Python (its control flow may depend on it); reads of values are listed before
        reads of shapes that depend on values (``shape=True``). ``scaled``: the tensors whose
        values were read: a number read from an entry that carries a log-factor ``l`` is
        ``exp(l)`` times what it was, and the trace cannot follow it (a branch taken, a factor
        of the outputs, a number kept for the next call), so their labels are blocked and a
        parameter among them is fixed."""
        read = self.reason(f"{self.op} read {what}")
        line = _source_line()
        reads = self.shape_reads if shape else self.value_reads
        reads.append(f"{read}, derived from the input or weights, at {line}")
        reason = f"{read} into Python at {line}"
        for t in scaled:
            if self.is_param(t):
                self.fix(t, reason)
            else:
                self.block(self.terms(t), reason)

    def clear_claims(self) -> None:
        """Start an op: no tensor is handled by its rule yet (see :meth:`claim`)."""
        self._claimed = set()

    def claim(self, t: Tensor) -> None:
        """Mark ``t`` as handled by the current rule (unhandled inputs are blocked)."""
        self._claimed.add(id(t))

    def is_claimed(self, t: Tensor) -> bool:
        """Whether the current rule handled ``t`` (see :meth:`claim`)."""
        return id(t) in self._claimed

    def _param_and_index(self, p: Tensor) -> tuple[str, Tensor | None]:
        """The parameter name behind ``p`` and, for a view, its index map."""
        self.claim(p)
        if self.is_gathered(p):
            return self.param_name(self._gathers[id(p)][1].source), None
        name = self.param_names.get(id(p))
        if name is not None:
            self.used_params.add(name)
            return name, None
        view = self._views[id(p)][1]
        name = self.param_names[id(view.param)]
        self.used_params.add(name)
        return name, view.index

    def param_name(self, p: Tensor) -> str:
        """The name of the parameter ``p`` is (or is an arrangement of)."""
        return self._param_and_index(p)[0]

    def terms(self, t: Tensor) -> Sum:
        """The labels of an activation as a :class:`Sum` (one term in the common case).
        A parameter used as a plain tensor is fixed, since the rule using it does not know how
        it scales."""
        self.claim(t)
        if self.is_param(t):
            self.fix(t, self.reason("parameter used as a plain tensor"))
            return Sum()
        fn = t.grad_fn
        if fn is not None and isinstance(fn, torch.autograd.function.BackwardCFunction):
            # The output of a custom autograd function: whatever its forward did (compiled
            # kernels are invisible to the tracer), its inputs are blocked and it is fixed,
            # even when an op inside the forward recorded labels for it.
            self._block_history(fn, self.reason(f"custom autograd function {type(fn).__name__}"))
            return Sum()
        entry = self._labels.get(id(t))
        old = entry[1] if entry is not None and entry[0] is t else None
        if old is not None and entry[2] == placement_of(t):
            return old.map(lambda nodes: nodes.expand(t.shape))
        self._untraced(t, old)
        return Sum()

    def _untraced(self, t: Tensor, old: Sum | None) -> None:
        """``t`` holds entries no traced op gave it: computed by code the tracer does not see
        (a TorchScript or jit-traced module, a compiled extension), or, with ``old`` labels, made
        to hold other memory or written since (``t.set_(other)``, an in-place op under
        ``torch._C.DisableTorchFunction``: no torch function reports them). What it
        consumed (found through the autograd graph) is blocked, and so are its old labels and
        those of the traced tensors in its memory (``h.detach().as_subclass(Tensor)`` has no
        history); ``t`` is fixed from now on. A parameter whose memory ``t`` shares (a buffer or
        constant aliasing it, which a gauge rescales in place with it) is fixed."""
        memory = memory_of(t)
        if memory in self._fresh:  # read or written unseen: no overwrite replaces labels there
            self._fresh[memory].read.fill_(True)
        for p in self._param_memory.get(memory, ()):  # scaled with the parameter in place
            self.fix(p, self.reason("read through a tensor that shares its memory"))
        if old is None:
            reason = self.reason("computed by code the tracer cannot see")
        else:
            reason = self.reason("re-pointed or written by an untraced op (Tensor.set_?)")
            self.block(old, reason)
            self._labels[id(t)] = (t, Sum(), placement_of(t))
        if t.grad_fn is not None:
            self._block_history(t.grad_fn, reason)
        for other in self._in_memory.get(memory, {}).values():
            if other is not t:
                self.block(self._labels[id(other)][1], reason)

    def versions(self, tensors: list[Tensor]) -> list[int | None]:
        """Before an op: the traced tensors among its inputs that were written or re-pointed
        since their last traced op (their version or memory changed) are untraced. Returns the
        versions of ``tensors`` (see :meth:`written`)."""
        for t in tensors:
            entry = self._labels.get(id(t))
            if entry is not None and entry[0] is t and entry[2] != placement_of(t):
                self._untraced(t, entry[1])
        return [version_of(t) for t in tensors]

    def written(self, tensors: list[Tensor], versions: list[int | None]) -> None:
        """After an op that wrote some of its inputs in place (their version changed from
        ``versions``): the traced tensors in their memory keep their labels (the op's rule
        speaks for the write), recorded at their new version."""
        for t, before in zip(tensors, versions, strict=True):
            if before is None or version_of(t) == before:
                continue
            if memory_of(t) in self._zero_memory:  # a constant 0 no more
                self._zero_written.add(memory_of(t))
            for other in self._in_memory.get(memory_of(t), {}).values():
                held, labels, placement = self._labels[id(other)]
                now = placement_of(other)
                if placement[:-1] == now[:-1]:  # the same memory, shape and strides
                    self._labels[id(other)] = (held, labels, now)

    def escaped(self, t: Tensor) -> None:
        """``t``'s memory was handed to code the tracer cannot see (``t.numpy()``), which may
        write into it: the labels of ``t`` and of every traced tensor in that memory are
        blocked, and a parameter there is fixed."""
        reason = self.reason("memory handed to code the tracer cannot see")
        if self.is_param(t):
            self.fix(t, reason)
        memory = memory_of(t)
        if memory is None:
            return
        if memory in self._fresh:
            self._fresh[memory].read.fill_(True)
        for other in self._in_memory.get(memory, {}).values():  # t itself, its views, bases
            self.block(self._labels[id(other)][1], reason)
        for p in self._param_memory.get(memory, ()):
            self.fix(p, reason)

    def labels(self, t: Tensor) -> Tensor:
        """The labels of an activation as one node tensor, broadcast to ``t.shape``. Labels
        that are a sum of several terms (a product of rescaled tensors) are blocked here: rules
        that can carry such sums use :meth:`terms`."""
        return self.single(self.terms(t), t.shape)

    def single(self, labels: Sum, shape: torch.Size) -> Tensor:
        """``labels`` as one node tensor of ``shape``; a sum of several terms (or of one with
        sign -1) is blocked and replaced by the fixed 0."""
        if not labels:
            return ZERO.expand(shape)
        if len(labels) == 1 and labels[0][1] == 1:
            return labels[0][0].expand(shape)
        self.block(labels, self.reason("product of rescaled tensors used by an op that needs one"))
        return ZERO.expand(shape)

    def is_fixed(self, t: Tensor) -> bool:
        """Whether every entry of the activation ``t`` carries the fixed log-factor 0 now
        (a parameter counts as not fixed)."""
        if self.is_param(t):
            return False
        return all(bool((compact(nodes) == 0).all()) for nodes, _ in self.terms(t))

    def _block_history(self, fn: Any, reason: str) -> None:
        """Block everything an untraced computation (a custom autograd function, a scripted
        module) consumed: walk its autograd graph back to the nodes of labelled tensors, whose
        labels are blocked, and to parameters, which are fixed."""
        stack: list[Any] = [fn]
        seen: set[Any] = {id(fn)}
        while stack:
            node = stack.pop()
            for nxt, nr in getattr(node, "next_functions", ()):
                if nxt is None or (id(nxt), nr) in seen:
                    continue
                seen.add((id(nxt), nr))
                variable = getattr(nxt, "variable", None)
                if variable is not None:  # a leaf
                    if self.is_param(variable):
                        self.fix(variable, reason)
                    continue
                entry = self._grad_fn_labels.get(id(nxt))
                if entry is not None and entry[0] is nxt and nr in entry[1]:
                    self.block(entry[1][nr], reason)  # the labelled tensor it read
                elif id(nxt) not in seen:
                    seen.add(id(nxt))
                    stack.append(nxt)  # an untraced intermediate: look further back

    def set_labels(self, t: Tensor, labels: Tensor | Sum) -> None:
        shape = t.shape
        labels = Sum.of(labels).map(lambda nodes: compact(nodes.expand(shape)))
        labels = Sum(term for term in labels if bool((term[0] != 0).any()))
        self._labels[id(t)] = (t, labels, placement_of(t))
        memory = memory_of(t)
        if memory is not None:
            self._in_memory.setdefault(memory, {})[id(t)] = t
        fn = t.grad_fn
        if fn is not None:
            entry = self._grad_fn_labels.get(id(fn))
            if entry is None or entry[0] is not fn:
                entry = self._grad_fn_labels[id(fn)] = (fn, {})
            entry[1][t.output_nr] = labels

    def unite(self, nodes: Tensor, dims: Iterable[int]) -> Tensor:
        """``nodes`` with the entries along each of ``dims`` united: those dims kept with size 1
        (a tensor of nodes, compacted first)."""
        nodes = compact(nodes)
        for d in dims:
            if nodes.shape[d] > 1:
                self.union(nodes, nodes.narrow(d, 0, 1))
                nodes = nodes.narrow(d, 0, 1)
        return nodes

    def along(self, t: Tensor, dim: int) -> Tensor:
        """Per-index labels of ``t`` along ``dim`` (shape ``[t.shape[dim]]``): all entries of one
        slice must carry one factor, so the labels within a slice are united."""
        return self._along(self.labels(t), t.shape, dim)

    def along_terms(self, t: Tensor, dim: int) -> Sum:
        """:meth:`along` for every term of ``t``'s labels: a :class:`Sum` of ``[t.shape[dim]]``
        node tensors."""
        return self.terms(t).map(lambda nodes: self._along(nodes, t.shape, dim))

    def _along(self, nodes: Tensor, shape: torch.Size, dim: int) -> Tensor:
        dim = dim % len(shape)
        others = [d for d in range(len(shape)) if d != dim]
        lab = self.unite(nodes.expand(shape), others)
        return lab.expand(*lab.shape[:dim], shape[dim], *lab.shape[dim + 1 :]).reshape(-1).clone()

    def leading(self, t: Tensor, k: int) -> Sum:
        """Labels of ``t`` united over its last ``k`` dims, shaped ``t.shape[:-k] + (1,)*k``
        (every term): the labels of an op that maps each leading slice on its own (pooling,
        padding, upsampling)."""
        trailing = range(t.dim() - k, t.dim())
        return self.terms(t).map(lambda nodes: self.unite(nodes.expand(t.shape), trailing))

    # -- fresh memory: assignment into tensors allocated in the forward ------------------------

    def _current(self, t: Tensor) -> Tensor | None:
        """The labels of ``t`` as one node tensor of its shape, when they are current (recorded
        at its present placement) and a single term with sign +1; else None."""
        entry = self._labels.get(id(t))
        if entry is None or entry[0] is not t or entry[2] != placement_of(t):
            return None
        if not entry[1]:
            return ZERO.expand(t.shape)
        nodes, sign = entry[1][0]
        return nodes.expand(t.shape) if len(entry[1]) == 1 and sign == 1 else None

    def overwrite(self, dst: Tensor, region: Callable[[Tensor], Tensor], labels: Tensor) -> bool:
        """An op just wrote values carrying ``labels`` (nodes broadcastable to the region) into
        the entries ``region(positions of dst)`` of ``dst``. When ``dst`` is in fresh memory,
        every tensor in that memory is placed independently of the data (a view placed by it
        carries labels united along the dims it moves along) and has current single-term
        labels, and no entry is written twice, the entries of that region in every tensor of
        the memory take ``labels`` (replacing: the old values are gone); entries some op read
        before are blocked, old and new labels (that reader saw the old value). Returns whether
        it did so; False changes nothing."""
        fresh = self._fresh_of(dst)
        if fresh is None:
            return False
        peers = list(self._in_memory.get(memory_of(dst), {}).values())
        held = [self._current(p) if fresh.holds(p) else None for p in peers]
        if all(p is not dst for p in peers) or any(h is None for h in held):
            return False
        if any(self._placed.get(id(p)) is p for p in peers):
            return False
        elements = region(fresh.elements(dst))
        new = _fit(labels, elements.shape).reshape(-1)
        elements = elements.reshape(-1)
        if torch.unique(elements).numel() != elements.numel():
            return False  # which write lands is not defined
        read = fresh.read[elements]
        if bool(read.any()):
            reason = self.reason("entries of a tensor allocated in the forward read, then written")
            stale = torch.zeros_like(fresh.read)
            stale[elements[read]] = True
            self.block(new[read], reason)
            for p, old in zip(peers, held, strict=True):
                self.block(old[stale[fresh.elements(p)]], reason)
        at = torch.full(fresh.read.shape, -1, dtype=torch.long)
        at[elements] = new
        for p, old in zip(peers, held, strict=True):
            mine = at[fresh.elements(p)]
            self.set_labels(p, torch.where(mine >= 0, mine, old))
        return True

    def block_stored(self, model: nn.Module) -> None:
        """Activations the forward stored on the model's modules are read after it like
        outputs: their labels, and those of the traced tensors in their memory, are blocked.
        Stored: reached from a module's attributes other than its parameters and submodules
        (``self.cache = h``, a buffer replaced by one or re-pointed at one's memory,
        ``buf.set_(h)``) through lists, tuples, sets, deques, dicts, plain objects' attributes
        and ``__slots__`` (``self.past.append(h)``, ``self.cache.h = h``), what code refers to
        (``self.hook = lambda: h``), modules that are not submodules and tensors' Python
        attributes (see :func:`~gaugefix.structure.module_state.held_now`), each object once
        (a container holding itself ends there) and all of them: one missed would be read by
        a later call the trace never sees."""
        seen: set[int] = set()  # an object two modules reach is searched for the first
        for name, module in model.named_modules():
            for t in reached_tensors(stored_values(module), seen):
                reason = f"stored on module '{name or '<root>'}' by the forward (an output)"
                entry = self._labels.get(id(t))
                if entry is not None and entry[0] is t:
                    self.block(entry[1], reason)
                for other in self._in_memory.get(memory_of(t), {}).values():
                    self.block(self._labels[id(other)][1], reason)
                for made_from, labels in self._zero_reads:  # a later call may change it
                    if memory_of(t) in made_from:
                        self.block(labels, f"{reason}, read as a constant 0")

    # -- parameter roles --------------------------------------------------------------------------
    def _on_param(self, p: Tensor, nodes: Tensor) -> tuple[str, Tensor]:
        """``nodes`` given at the shape of ``p`` (a parameter or a view of one), as a node
        tensor broadcastable to the parameter's own shape."""
        if self.is_gathered(p):
            return self._on_gathered(p, nodes)
        name, index = self._param_and_index(p)
        if index is None:
            return name, compact(nodes.expand(p.shape))
        shape, flat = self.params[name].shape, nodes.expand(p.shape).reshape(-1)
        if index.numel() == math.prod(shape):  # a rearrangement: every entry once
            full = torch.empty(index.numel(), dtype=torch.long)
            full[index.reshape(-1)] = flat
            return name, compact(full.view(shape))
        # a broadcast gain: the positions one entry multiplies carry its factor, united
        holder = self.fresh(*shape)
        self.union(holder.reshape(-1)[index.reshape(-1)], flat)
        return name, compact(holder)

    def _broadcast(self, p: Tensor) -> bool:
        """Whether ``p`` is a gain broadcast over a tensor (see :class:`_ParamView`)."""
        entry = self._views.get(id(p))
        view = entry[1] if entry is not None and entry[0] is p else None
        return view is not None and view.index.numel() != view.param.numel()

    def _per_gain(self, name: str, on_param: Tensor) -> Tensor:
        """Nodes given on parameter ``name``, one per entry (one for a 0-d parameter): the
        channels a broadcast gain produces, per gain. A gain has one dim of size above 1 at
        most, at any place (``weight_norm(dim=1)`` on a transposed convolution puts it on the
        output channels, dim 1 of the weight), so its entries are its gains in order."""
        return on_param.expand(self.params[name].shape).reshape(-1)

    def _on_gathered(self, p: Tensor, nodes: Tensor) -> tuple[str, Tensor]:
        """``nodes`` given on gathered slices, as nodes of the whole parameter: one node per
        entry of the source (at the compact shape of ``nodes``), united with the nodes of every
        position that holds it."""
        self.claim(p)
        gathered = self._gathers[id(p)][1]
        nodes = gathered.in_gathered_order(compact(nodes.expand(p.shape)))
        lead = gathered.rows.dim()
        rest = nodes.shape[lead:]
        flat = nodes.expand((*gathered.rows.shape, *rest)).reshape(-1, *rest)  # maybe 0-d
        holder = self.fresh(gathered.source.shape[0], *rest)
        at_rows = holder[gathered.rows.reshape(-1)]
        if gathered.index is not None:  # through nodes per position, linked to the slices
            positions = self._positions(gathered, at_rows.shape)
            self.union(positions, flat)
            flat = positions
            self.slice_links.add(len(self.edges))
        self.union(at_rows, flat)
        return self._on_param(gathered.source, holder)

    def produce(
        self, p: Tensor, *shape: int, arrange: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Fresh nodes, one per channel ``p`` produces (``shape`` broadcastable to ``p``, or
        placed on ``p`` by ``arrange``), that multiply ``p``'s entries: the op's output carries
        them on those channels. Returns the nodes."""
        held, gathered = self._gathers.get(id(p), (None, None))
        if held is p and arrange is None:
            in_order = gathered.gathered_shape(shape)
            if in_order is not None and in_order[: gathered.rows.dim()] == gathered.rows.shape:
                return gathered.in_tensor_order(self._produce_gathered(p, in_order))
        nodes = self.fresh(*shape)
        name, on_param = self._on_param(p, nodes if arrange is None else arrange(nodes))
        self._pending.setdefault(name, []).append((on_param, 1))
        self.produced.setdefault(
            name, self._per_gain(name, on_param) if self._broadcast(p) else nodes
        )
        if self._broadcast(p) and len(self.produced[name]) != nodes.numel():
            self.gain_channels.setdefault(name, nodes.numel())
        self.produced_at.setdefault(name, len(self.marks))
        return nodes

    def tie(self, p: Tensor, labels: Tensor | Sum, sign: int = 1) -> None:
        """``p``'s entries carry ``labels`` (broadcastable to ``p``) times ``sign``: a bias
        tied to its layer's output channels (``sign=1``)."""
        for nodes, s in Sum.of(labels):
            name, on_param = self._on_param(p, nodes)
            self._pending.setdefault(name, []).append((on_param, s * sign))
        if not Sum.of(labels):
            self._pending.setdefault(self.param_name(p), [])

    def consume(self, p: Tensor, labels: Tensor | Sum) -> None:
        """``p``'s entries are divided by the factors of ``labels``: ``p`` consumes the channels
        of an input (the columns of a weight)."""
        self.tie(p, labels, -1)

    def fix(self, p: Tensor, reason: str) -> None:
        """Fix a parameter: every entry carries factor 1, so whatever its uses tied to it is
        blocked."""
        name = self.param_name(p)
        if f"'{name}'" not in reason:
            reason = f"{reason} (parameter '{name}')"
        self.fixed.setdefault(name, reason)
        for nodes, _ in (self.roles.get(name) or []) + self._pending.pop(name, []):
            self.block(nodes, reason)
        self.roles[name] = None

    def fix_written(self) -> None:
        """After the trace: a parameter the forward wrote or re-pointed (its version or memory
        changed, also by an op no torch function reports, under ``DisableTorchFunction``) does
        not hold the rescaled values on the next call, and an arrangement of one written after it
        was made (``w = W.clone()``, then written) no longer holds the parameter's: the
        parameter is fixed."""
        for t, placement in self._arranged.values():
            if placement_of(t) != placement:
                self.fix(t, "written or re-pointed in place by the forward")

    def save_written(self, tensors: list[Tensor]) -> None:
        """Before an op that may write into or re-point ``tensors``: keep the memory and the
        values of the parameters among them or in their memory (once each), for the trace to
        put back."""
        for t in tensors:
            for p in (*self._param_memory.get(memory_of(t), ()), t):
                if id(p) in self.param_names and id(p) not in self.saved:
                    self.saved[id(p)] = (p, p.data, p.detach().clone())

    def commit_roles(self) -> None:
        """Close the roles the current op gave its parameters: a first use defines them; a
        later use of the same form (the same number of terms with the same signs, in whatever
        order the rules state them, or so once the terms all on node 0, which only state the
        factor 0, are left out) is united with it term by term; a use of another form fixes the
        parameter."""
        pending, self._pending = self._pending, {}
        for name, terms in pending.items():
            # multiplying terms first: the order a rule states them in is not part of the form
            terms = sorted(terms, key=lambda term: -term[1])
            if name not in self.roles:
                self.roles[name] = terms
                continue
            before = self.roles[name]
            if before is None:
                why = f"parameter '{name}' is fixed by another use"
                why = f"{why}: {self.fixed[name]}" if name in self.fixed else why
                for nodes, _ in terms:
                    self.block(nodes, why)
                continue
            aligned = self._by_place(name, before, terms) if name in self.multiplied else None
            if aligned is None:
                aligned = _same_form(before, terms)
            if aligned is None:
                aligned = _same_form(_unfixed(before), _unfixed(terms))
            if aligned is not None:
                for (a, s), (b, t) in aligned:
                    shape = self.params[name].shape
                    self.union(a.expand(shape), b.expand(shape), s * t)
                continue
            reason = self.reason(f"parameter '{name}' used in two different roles")
            for nodes, _ in before + terms:
                self.block(nodes, reason)
            self.roles[name] = None

    def _by_place(self, name: str, before: list, terms: list) -> list | None:
        """Two uses of a parameter that a product of two parameters reads (``B @ A`` and
        ``B(h)``), paired term by term by the dims of the parameter each term varies along,
        whatever the signs (``s a = t b`` is ``a = s t b``); a term with no partner is fixed to
        0 (the other use has no such factor). Both sums are then equal. None when a term could
        pair with two."""
        shape = self.params[name].shape
        sides = [_unfixed(before), _unfixed(terms)]
        dims = [[{d for d, n in enumerate(compact(t.expand(shape)).shape) if n > 1}
                 for t, _ in side] for side in sides]  # fmt: skip
        match = torch.tensor([[bool(d & e) or d == e == set() for e in dims[1]] for d in dims[0]],
                             dtype=torch.bool).reshape(len(dims[0]), len(dims[1]))  # fmt: skip
        if bool((match.sum(0) > 1).any() or (match.sum(1) > 1).any()):
            return None
        why = self.reason(f"parameter '{name}' read by a product with a factor another use lacks")
        for side, paired in ((sides[0], match.any(1)), (sides[1], match.any(0))):
            for (nodes, _), kept in zip(side, paired.tolist(), strict=True):
                if not kept:
                    self.block(nodes, why)
        return [(sides[0][i], sides[1][j]) for i, j in match.nonzero().tolist()]

    def view_of_param(self, out: Tensor, param_like: Tensor, index: Tensor) -> None:
        """Record ``out`` as an arrangement of the parameter behind ``param_like``: entry ``i``
        of ``out`` is entry ``index[i]`` (flat) of ``param_like``."""
        if self.is_gathered(param_like):
            self.fix(param_like, self.reason("gathered parameter slices rearranged"))
            return
        name, base = self._param_and_index(param_like)
        param = self.params[name]
        if base is not None:
            index = base.reshape(-1)[index]
        self._views[id(out)] = (out, _ParamView(param, index))
        self._arranged[id(out)] = (out, placement_of(out))

    # -- the generic rule -----------------------------------------------------------------------
    def block_all(self, args: tuple, kwargs: dict, reason: str) -> Tensor:
        """Block every tensor the op consumed; its outputs carry the fixed factor."""
        for t in nested_tensors((args, kwargs)):
            if t.is_floating_point() or t.is_complex():
                if self.is_param(t):
                    self.fix(t, reason)
                else:
                    self.block(self.terms(t), reason)
        return ZERO


def _increasing(nodes: Tensor) -> bool:
    """Whether the 1-d ``nodes`` are strictly increasing (so no node is named twice)."""
    return bool((nodes[1:] > nodes[:-1]).all())


_MIXED = "mixed with a fixed tensor"


# the reason fixing the direction v of a weight norm w = g v / ||v||: the summary reads it
WEIGHT_NORM_DIRECTION = "direction of a weight norm (its scale is divided out)"
_LIBRARY = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _source_line() -> str:
    """``file:line (`code`)`` of the innermost frame outside torch and gaugefix: the line of the
    model's code that made the current call."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY):
        frame = frame.f_back
    if frame is None:
        return "<unknown line>"
    info = inspect.getframeinfo(frame, context=1)
    code = (info.code_context or [""])[0].strip()
    return f"{info.filename}:{info.lineno} (`{code}`)"


def _same_form(before: list, terms: list) -> list | None:
    """The term pairs of two uses of a parameter of the same form (as many terms, with the same
    signs, in order), or None."""
    if len(before) != len(terms) or any(a[1] != b[1] for a, b in zip(before, terms, strict=True)):
        return None
    return list(zip(before, terms, strict=True))


def _unfixed(terms: list) -> list:
    """The terms not all on node 0: a term on node 0 (the columns of a linear map of a fixed
    input, ``A(eye)``) only states the factor 0, so a use is also of the form without it."""
    return [term for term in terms if bool((term[0] != 0).any())]


def _fit(labels: Tensor, shape: torch.Size) -> Tensor:
    """``labels`` of a value written into a region of ``shape``, broadcast to it as the write
    does (leading dims of size 1 beyond the region's dropped)."""
    while labels.dim() > len(shape) and labels.shape[0] == 1:
        labels = labels[0]
    return labels.expand(shape)
