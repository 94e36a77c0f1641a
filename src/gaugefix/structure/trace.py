"""Tracing a model into channel labels.

The model runs once, eagerly, on the example inputs under a ``TorchFunctionMode``. Every
torch-function call (``F.linear``, ``torch.cat``, ``Tensor.view``, ``+``, ...) is handed to the rule
the registry holds for it. Rules work on *labels*: every floating tensor that flows through the
model carries an integer tensor, broadcastable to its shape, naming for each entry the node whose
gauge factor ``a_node`` that entry is multiplied by. Node 0 is the fixed factor 1 (model inputs,
buffers, constants). Rules relate labels by

- ``union(a, b)``: the entries must carry the same factor (residual additions, reused weights);
- ``block(labels, reason)``: the factor must be 1 (non-homogeneous ops, normalisation, outputs);

and give parameters their row labels (the factor their entries are multiplied by) and column labels
(the factor they are divided by). After the trace, connected components of the union graph are the
candidate gauge neurons; a component is a gauge neuron when nothing blocked it and it has both a
producing and a consuming parameter entry.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

Rule = Callable[["TraceContext", tuple, dict, Any], Any]

_RULES: dict[Any, Rule] = {}
_MODULE_RULES: dict[type, Rule] = {}


class TracingError(RuntimeError):
    """The model could not be run on the example inputs; names the op and the module path."""


def register_rule(target: Any, rule: Rule | None = None) -> Any:
    """Register ``rule`` for a function (``F.relu``) or a module type (``MyLayer``).

    A rule is called as ``rule(ctx, args, kwargs, out)`` after the op ran, with ``ctx`` a
    :class:`TraceContext`; it returns the labels of ``out`` (a tensor of labels broadcastable to
    ``out``, or a tuple of them matching a tuple output). For a module type, the module's own
    inner ops are not traced: the rule speaks for the whole call, and ``ctx.module`` is the
    module (so a rule can give its parameters roles with ``ctx.param_rows`` / ``ctx.tie_cols``).
    Usable as a decorator.
    """

    def add(r: Rule) -> Rule:
        if isinstance(target, type) and issubclass(target, nn.Module):
            _MODULE_RULES[target] = r
        else:
            _RULES[target] = r
        return r

    return add if rule is None else add(rule)


def op_name(func: Any) -> str:
    """A readable name for a traced callable: ``F.relu``, ``torch.cat``, ``Tensor.view``."""
    name = getattr(func, "__name__", repr(func))
    owner = getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    if isinstance(func, type):
        return func.__name__
    module = getattr(func, "__module__", None) or ""
    qualname = getattr(func, "__qualname__", name)
    if module == "torch.nn.functional" or module == "torch._C._nn":
        return f"F.{name}"
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    return f"torch.{name}"


def _compact(labels: Tensor) -> Tensor:
    """The smallest tensor that broadcasts back to ``labels``: dims along which it is constant
    shrink to size 1 (a zero stride is read as constant without looking)."""
    for d in range(labels.dim()):
        if labels.shape[d] > 1 and (
            labels.stride(d) == 0 or bool((labels == labels.narrow(d, 0, 1)).all())
        ):
            labels = labels.narrow(d, 0, 1)
    return labels


class TraceContext:
    """The state of one trace: label allocation, the union graph, blocks and parameter labels."""

    def __init__(self, model: nn.Module) -> None:
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self._params = dict(model.named_parameters())
        self.rows: dict[str, Tensor] = {}
        self.producers: set[str] = set()  # parameters whose rows produce output channels
        self.cols: dict[str, Tensor] = {}
        self.num_nodes = 1  # node 0: the fixed factor 1
        self.edges: list[Tensor] = []
        self.marks: list[tuple[Tensor, str]] = []
        self.module_stack: list[str] = []
        self.op = "<forward>"
        self.func: Any = None  # the callable being traced, for rules that re-apply it
        self.module: nn.Module | None = None  # the module a module rule speaks for
        self._labels: dict[int, tuple[Tensor, Tensor]] = {}  # id(tensor) -> (tensor, labels)
        # id(grad_fn) -> (grad_fn, {output_nr: labels of the recorded tensor at that output})
        self._grad_fn_labels: dict[int, tuple[Any, dict[int, Tensor]]] = {}
        self._claimed: set[int] = set()
        # id(exception) -> (exception, innermost module path it was raised in)
        self.failures: dict[int, tuple[BaseException, str]] = {}
        self.used_params: set[str] = set()  # parameters some rule looked at
        self.value_reads: list[str] = []  # tensor values read into Python (possible branching)

    # -- where we are -------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<root>"

    def reason(self, text: str) -> str:
        """``text``, with the op (unless it already names it) and the module path."""
        if self.op in text:
            return f"{text} in '{self.where}'"
        return f"{text} ({self.op} in '{self.where}')"

    # -- labels of tensors ----------------------------------------------------------------------
    def fresh(self, *shape: int) -> Tensor:
        """New nodes, one per entry of ``shape``."""
        n = math.prod(shape)
        out = torch.arange(self.num_nodes, self.num_nodes + n).reshape(shape)
        self.num_nodes += n
        return out

    def is_param(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.param_names

    def claim(self, t: Tensor) -> None:
        """Mark ``t`` as handled by the current rule (unhandled inputs are blocked)."""
        self._claimed.add(id(t))

    def param_name(self, p: Tensor) -> str:
        self.claim(p)
        name = self.param_names[id(p)]
        self.used_params.add(name)
        return name

    def labels(self, t: Tensor) -> Tensor:
        """Labels of an activation, broadcast to ``t.shape``. A parameter used as a plain tensor
        gets its factor fixed to 1, since the rule using it does not know how it scales."""
        self.claim(t)
        if self.is_param(t):
            self.fix(t, self.reason("parameter used as a plain tensor"))
            return torch.zeros((), dtype=torch.long).expand(t.shape)
        fn = t.grad_fn
        if fn is not None and isinstance(fn, torch.autograd.function.BackwardCFunction):
            # The output of a custom autograd function: whatever its forward did (compiled
            # kernels are invisible to the tracer), its inputs are blocked and it is fixed,
            # even when an op inside the forward recorded labels for it.
            self._block_history(fn, self.reason(f"custom autograd function {type(fn).__name__}"))
            return torch.zeros((), dtype=torch.long).expand(t.shape)
        entry = self._labels.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1].expand(t.shape)
        if fn is not None:
            # Computed from traced tensors by code the tracer did not see (a TorchScript or
            # jit-traced module, a compiled extension): block what it consumed.
            self._block_history(fn, self.reason("computed by code the tracer cannot see"))
        return torch.zeros((), dtype=torch.long).expand(t.shape)

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

    def set_labels(self, t: Tensor, labels: Tensor) -> None:
        self._labels[id(t)] = (t, _compact(labels.expand(t.shape)))
        fn = t.grad_fn
        if fn is not None:
            entry = self._grad_fn_labels.get(id(fn))
            if entry is None or entry[0] is not fn:
                entry = self._grad_fn_labels[id(fn)] = (fn, {})
            entry[1][t.output_nr] = self._labels[id(t)][1]

    def along(self, t: Tensor, dim: int) -> Tensor:
        """Per-index labels of ``t`` along ``dim`` (shape ``[t.shape[dim]]``): all entries of one
        slice must carry one factor, so the labels within a slice are united."""
        lab = self.labels(t).movedim(dim, 0)
        lab = _compact(lab).expand(t.shape[dim], *([-1] * (lab.dim() - 1)))
        flat = lab.reshape(lab.shape[0], -1)
        self.union(flat, flat[:, :1])
        return flat[:, 0].clone()

    def leading(self, t: Tensor, k: int) -> Tensor:
        """Labels of ``t`` united over its last ``k`` dims, shaped ``t.shape[:-k] + (1,)*k``; the
        labels of an op that maps each leading slice on its own (pooling, padding, upsampling)."""
        if k == 0:
            return self.labels(t)
        lab = _compact(self.labels(t))
        lead = lab.shape[: lab.dim() - k]
        flat = lab.reshape(*lead, -1)
        self.union(flat, flat[..., :1])
        return flat[..., :1].reshape(*lead, *([1] * k))

    # -- constraints ----------------------------------------------------------------------------
    def union(self, a: Tensor, b: Tensor) -> None:
        """Entries of ``a`` and ``b`` (broadcast together) carry equal factors."""
        a, b = torch.broadcast_tensors(a, b)
        for d in range(a.dim()):
            if a.shape[d] > 1 and a.stride(d) == 0 and b.stride(d) == 0:
                a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
        pair = torch.stack([a.reshape(-1), b.reshape(-1)])
        pair = pair[:, pair[0] != pair[1]]
        if pair.numel():
            self.edges.append(torch.unique(pair, dim=1))

    def block(self, labels: Tensor, reason: str) -> None:
        """The nodes in ``labels`` are fixed to factor 1 (they are not gauge freedom)."""
        nodes = torch.unique(_compact(labels))
        nodes = nodes[nodes != 0]  # node 0 is fixed already; its own reason is generic
        if nodes.numel():
            self.marks.append((nodes, reason))

    # -- parameters -----------------------------------------------------------------------------
    def param_rows(self, p: Tensor, *shape: int) -> Tensor:
        """Row labels of a parameter (the factor its entries are multiplied by), allocated at
        first use with the given (broadcastable) shape and shared by every later use."""
        name = self.param_name(p)
        self.producers.add(name)
        if name not in self.rows:
            self.rows[name] = self.fresh(*shape)
        return self.rows[name]

    def tie_rows(self, p: Tensor, labels: Tensor) -> None:
        """Row labels of a parameter that shares the output channels of another (a bias)."""
        self.producers.add(self.param_name(p))
        self._tie(self.rows, p, labels)

    def tie_cols(self, p: Tensor, labels: Tensor) -> None:
        """Column labels of a parameter (the factor its entries are divided by)."""
        self._tie(self.cols, p, labels)

    def _tie(self, table: dict[str, Tensor], p: Tensor, labels: Tensor) -> None:
        name = self.param_name(p)
        labels = _compact(labels.expand(p.shape))
        if name in table:
            self.union(table[name].expand(p.shape), labels.expand(p.shape))
        else:
            table[name] = labels

    def fix(self, p: Tensor, reason: str) -> None:
        """Fix a parameter's factor to 1: its rows and columns are blocked."""
        name = self.param_name(p)
        node = self.fresh(1)
        self.marks.append((node, reason))
        for table in (self.rows, self.cols):
            if name in table:
                self.union(table[name], node)
            else:
                table[name] = node.reshape([1] * p.dim()) if p.dim() else node.reshape(())

    # -- the generic rule -----------------------------------------------------------------------
    def block_all(self, args: tuple, kwargs: dict, reason: str) -> Tensor:
        """Block every tensor the op consumed; its outputs carry the fixed factor."""
        for t in _tensors((args, kwargs)):
            if t.is_floating_point() or t.is_complex():
                self.block(self.labels(t), reason)
        return torch.zeros((), dtype=torch.long)


def _tensors(tree: Any) -> Iterator[Tensor]:
    leaves, _ = tree_flatten(tree)
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            yield leaf


# Ops that read only metadata (shapes, dtypes, devices): safe to ignore.
_METADATA = {
    "size", "dim", "ndimension", "shape", "dtype", "device", "numel", "nelement", "stride",
    "is_contiguous", "is_floating_point", "is_complex", "requires_grad", "is_cuda", "layout",
    "__len__", "ndim", "storage_offset", "element_size", "grad_fn", "is_leaf", "get_device",
    "names", "is_sparse", "is_quantized", "is_meta", "data_ptr", "__format__", "__hash__",
    "__repr__", "dim_order", "output_nr", "_version", "is_nested", "is_mkldnn",
}  # fmt: skip
# Ops that hand tensor values to Python, where control flow may depend on them.
_VALUE_READS = {"__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy"}
# Ops whose output depends only on the input's shape: the output carries the fixed factor.
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones", "new_empty"}


class _Tracer(TorchFunctionMode):
    def __init__(self, ctx: TraceContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.suppress = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.suppress:
            return func(*args, **kwargs)
        ctx = self.ctx
        name = op_name(func)
        ctx.op = name
        inputs = {id(t) for t in _tensors((args, kwargs))}
        try:
            out = func(*args, **kwargs)
        except TracingError:
            raise
        except Exception as err:
            raise TracingError(f"{name} failed in module '{ctx.where}': {err}") from err
        short = name.rsplit(".", 1)[-1]
        if short in _METADATA:
            return out
        if short in _VALUE_READS:
            ctx.value_reads.append(ctx.reason(f"{name} read a tensor value"))
        if not torch.is_grad_enabled():
            # Inside a custom autograd function's forward (or any no-grad region) even a
            # shape-only op blocks its input: ``out = torch.empty_like(x)`` followed by a
            # compiled kernel the tracer cannot see is how such forwards are written.
            reason = ctx.reason("op run with autograd disabled (custom autograd function?)")
            self.record(out, ctx.block_all(args, kwargs, reason), inputs)
            return out
        if short in _SHAPE_ONLY:
            self.record(out, torch.zeros((), dtype=torch.long), inputs)
            return out
        rule = _RULES.get(func)
        if rule is None and getattr(func, "__name__", None) == "__get__":  # x.data, x.T
            rule = _RULES.get(name)
        ctx._claimed = set()
        ctx.func = func
        if rule is None:
            labels = ctx.block_all(args, kwargs, ctx.reason(f"unknown op {name}"))
        else:
            labels = rule(ctx, args, kwargs, out)
        self._block_unclaimed(args, kwargs)
        self.record(out, labels, inputs)
        return out

    def _block_unclaimed(self, args: tuple, kwargs: dict) -> None:
        """A safety net: tensors a rule did not look at are blocked."""
        ctx = self.ctx
        for t in _tensors((args, kwargs)):
            if id(t) not in ctx._claimed and (t.is_floating_point() or t.is_complex()):
                ctx.block(ctx.labels(t), ctx.reason("input not handled by the op's rule"))

    def record(self, out: Any, labels: Any, inputs: set[int] | frozenset = frozenset()) -> None:
        """Give the op's output its labels. ``inputs``: ids of the op's tensor arguments.

        An output that is one of the inputs was written in place (``x.mul_(y)``, ``out=``):
        views and bases sharing its memory keep its old labels, so old and new labels are united.
        A non-floating output (a cast to an integer type) cannot carry labels: the labels the
        rule gave it are blocked, since its values depend on the scale of its input.
        """
        ctx = self.ctx
        if isinstance(out, Tensor):
            lab = labels if isinstance(labels, Tensor) else torch.zeros((), dtype=torch.long)
            if out.is_floating_point() or out.is_complex():
                if id(out) in inputs:
                    ctx.union(ctx.labels(out), lab)
                ctx.set_labels(out, lab)
            elif bool((lab != 0).any()):
                ctx.block(lab, ctx.reason("converted to a non-floating dtype"))
        elif isinstance(out, (tuple, list)):
            if not isinstance(labels, (tuple, list)):
                labels = [labels] * len(out)
            for o, lab in zip(out, labels, strict=True):
                self.record(o, lab, inputs)


@contextlib.contextmanager
def _module_hooks(model: nn.Module, tracer: _Tracer) -> Iterator[None]:
    """Keep the module path current and hand registered module types to their rules."""
    ctx = tracer.ctx
    handles = []

    def pre(name: str, rule: Rule | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx.module_stack.append(name)
            if rule is not None:
                tracer.suppress += 1

        return hook

    def post(name: str, rule: Rule | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            # With always_call, this also runs while an exception leaves the module's forward:
            # remember the innermost module it came from before the path is popped.
            exc = sys.exc_info()[1]
            raised = exc is not None and out is None
            if raised and id(exc) not in ctx.failures:
                ctx.failures[id(exc)] = (exc, name)
            # The rule runs while the tracer is still suppressed: its own tensor operations on
            # labels must not be traced. Inside a module that has a rule itself, the outer rule
            # speaks for the whole call, so inner rules are skipped.
            if rule is not None and tracer.suppress == 1 and not raised:
                ctx.op = type(module).__name__
                ctx.module = module
                ctx._claimed = set()
                labels = rule(ctx, args, kwargs, out)
                ctx.module = None
                tracer._block_unclaimed(args, kwargs)
                tracer.record(out, labels, {id(t) for t in _tensors((args, kwargs))})
            if rule is not None:
                tracer.suppress -= 1
            ctx.module_stack.pop()

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue  # takes no hooks; what it computes is invisible and blocked (see labels)
        rule = next((r for t, r in _MODULE_RULES.items() if type(module) is t), None)
        label = name or "<root>"
        handles.append(module.register_forward_pre_hook(pre(label, rule), with_kwargs=True))
        handles.append(
            module.register_forward_hook(post(label, rule), with_kwargs=True, always_call=True)
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trace(model: nn.Module, args: tuple, kwargs: dict) -> TraceContext:
    """Run ``model(*args, **kwargs)`` once under the tracer and return the filled context.

    The model is left as it was: buffers (BatchNorm running statistics) are restored, the global
    random state is not advanced, and ``requires_grad`` flags are put back.
    """
    ctx = TraceContext(model)
    tracer = _Tracer(ctx)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    devices = list({t.device for t in _tensors((args, kwargs))} | {b.device for b, _ in buffers})
    cuda = [d for d in devices if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            for p, _ in flags:
                if p.is_floating_point():
                    p.requires_grad_(True)
            with _module_hooks(model, tracer), tracer:
                try:
                    out = model(*args, **kwargs)
                except TracingError:
                    raise
                except Exception as err:
                    exc, where = ctx.failures.get(id(err), (None, ctx.where))
                    raise TracingError(
                        f"the model's forward failed in module "
                        f"'{where if exc is err else ctx.where}' (last op {ctx.op}): {err}"
                    ) from err
            for t in _tensors(out):
                if t.is_floating_point() or t.is_complex():
                    ctx.block(ctx.labels(t), "model output (rescaling it changes the function)")
        _warn_if_path_dependent(ctx)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, flag in flags:
            p.requires_grad_(flag)
    return ctx


def _warn_if_path_dependent(ctx: TraceContext) -> None:
    """One trace sees one path through the forward. When the forward read tensor values into
    Python and some parameters were not used, other inputs may take another path through those
    parameters, which may consume neurons found here without compensating them."""
    if not ctx.value_reads:
        return
    unused = [n for n in ctx._params if n not in ctx.used_params]
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        warnings.warn(
            f"discover: the forward read tensor values into Python ({ctx.value_reads[0]}) and "
            f"did not use the parameters {shown}. If its control flow depends on those values, "
            "inputs that take another path may not be symmetric under the structure found; "
            "it is exact only for the path traced.",
            stacklevel=3,
        )
