"""The op-rule registry of the tracer: which rule handles which torch function.

A rule is a function ``rule(ctx, out, *args, **kwargs)`` called after the op ran, with the
trace's :class:`~gaugefix.structure.context.TraceContext`; it relates the labels of the op's
inputs and output. The built-in registry holds the rules of :mod:`gaugefix.structure.rules`,
:mod:`~gaugefix.structure.structural`, :mod:`~gaugefix.structure.writes`,
:mod:`~gaugefix.structure.affine` and :mod:`~gaugefix.structure.attention`; the user's
(:func:`register_rule`) is consulted first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from gaugefix.errors import GaugefixError

__all__ = [
    "BUILTIN",
    "register_rule",
    "TracingError",
    "unregister_rule",
    "ValueDependentError",
]


class TracingError(GaugefixError, RuntimeError):
    """The model could not be run on the example inputs; names the op and the module path."""


class ValueDependentError(TracingError):
    """The forward read a tensor that depends on the inputs or the weights into Python, so its
    control flow may differ on other inputs; names the op, the module and the source line."""


class Rule(NamedTuple):
    """A rule and its signature, read once: it is called as ``fn(ctx, result, *args,
    **kwargs)`` with the op's own arguments bound to its parameters by name."""

    fn: Callable[..., Any]
    signature: inspect.Signature


class Registry:
    """Rules for ops (a callable such as ``F.relu``, or a name such as ``"Tensor.T"`` for an
    attribute) and for module types."""

    def __init__(self) -> None:
        self.ops: dict[Any, Rule] = {}
        self.modules: dict[type, Rule] = {}

    def add(self, target: Any, fn: Callable[..., Any]) -> None:
        rule = Rule(fn, _rule_signature(fn))
        if isinstance(target, nn.Module):  # callable, yet a trace looks modules up by type
            raise TypeError(
                f"a rule for a module is for its type ({type(target).__name__}), not an instance"
            )
        if isinstance(target, type) and issubclass(target, nn.Module):
            self.modules[target] = rule
        elif callable(target) or isinstance(target, str):
            self.ops[target] = rule
        else:
            raise TypeError(f"a rule is for a callable or an nn.Module type, not {target!r}")

    def remove(self, target: Any) -> None:
        table = self.modules if isinstance(target, type) and target in self.modules else self.ops
        if target not in table:
            raise KeyError(f"no rule registered for {target!r}")
        del table[target]

    def copy(self) -> Registry:
        """The rules registered now, apart from later registrations."""
        out = Registry()
        out.ops, out.modules = dict(self.ops), dict(self.modules)
        return out


def _rule_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature, checked to take the trace context and the op's result first."""
    if not callable(fn):
        raise TypeError(f"a rule must be callable, not {fn!r}")
    signature = inspect.signature(fn)
    try:
        signature.bind_partial(None, None)
    except TypeError:
        raise TypeError(f"rule {fn.__name__} must take (ctx, result, ...)") from None
    return signature


BUILTIN = Registry()  # the rules of gaugefix.structure.rules, structural, writes, affine, attention
USER = Registry()  # rules registered by the user for every discover call


def register_rule(target: Any, rule: Callable[..., Any] | None = None) -> Any:
    """Register ``rule`` for every later :func:`discover` call, for a function (``F.relu``) or a
    module type (``MyLayer``, and its subclasses that keep its ``forward``); it takes precedence
    over a built-in rule for the same target until :func:`unregister_rule`. Usable as a
    decorator.

    A rule is called as ``rule(ctx, result, *args, **kwargs)`` after the op ran: ``ctx`` is the
    :class:`TraceContext`, ``result`` the op's output, and the op's arguments are bound to the
    rule's own parameters by name (a call its signature does not accept blocks every input).
    It returns the labels of ``result`` (a tensor of nodes broadcastable to it, a :class:`Sum`,
    or a tuple of them matching a tuple output). For a module type, the module's inner ops are
    not traced: the rule speaks for the whole call, with ``ctx.module`` the module (so it can
    give its parameters roles with ``ctx.produce`` / ``ctx.consume``).
    """

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        USER.add(target, fn)
        return fn

    return add if rule is None else add(rule)


def unregister_rule(target: Any) -> None:
    """Remove the rule :func:`register_rule` registered for ``target`` (a built-in rule for it,
    if any, applies again)."""
    USER.remove(target)


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
