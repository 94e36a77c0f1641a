"""Finding the rescaling group of a model: tracing, the op-rule registry and ``GaugeStructure``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from gaugefix.structure import rules
from gaugefix.structure.compilation import compile_structure
from gaugefix.structure.context import Sum, TraceContext
from gaugefix.structure.gauge_structure import (
    UNUSED_NOTE,
    GaugeStructure,
    GeneratorEntries,
    PlannedParam,
    PlannedTerm,
    unwrap_model,
)
from gaugefix.structure.registry import (
    TracingError,
    ValueDependentError,
    register_rule,
    unregister_rule,
)
from gaugefix.structure.terms import KINDS, Exclusion, ParamTerms, Term
from gaugefix.structure.trace import trace


def discover(
    model: nn.Module,
    /,
    *example_inputs: Any,
    allow_value_dependent: bool = False,
    rules: Iterable[tuple[Any, Callable[..., Any]]] = (),
    **example_kwargs: Any,
) -> GaugeStructure:
    """The rescaling group of ``model``: every diagonal positive rescaling symmetry found by
    running it once on the example inputs and applying the op-rule registry.

    The model is not modified (BatchNorm statistics and the random state are restored), nor are
    the example inputs (the forward runs on a copy of them). Channels that are not generators
    are listed in ``structure.excluded`` with the reason.

    The outputs, which every generator keeps, are the tensors the forward returns (in tuples,
    lists, dicts and dataclasses) and those it stores on the model's modules. Other objects it
    returns are not searched: a Hugging Face ``DynamicCache``'s keys and values change under the
    gauge, and ``notes`` names such objects (a cache made before a gauge move must not be used
    after it).

    A forward that reads a tensor depending on its inputs or weights into Python (``if
    x.sum() > 0:``) raises :class:`ValueDependentError`: the trace sees one path, and inputs that
    take another may not be symmetric under what was found there. ``allow_value_dependent=True``
    accepts it for a path that is the same for every input; the structure then covers the
    parameters the traced path used, and its ``notes`` (and summary) say so.

    ``rules``: ``(target, rule)`` pairs (see :func:`register_rule`) for this call only; they take
    precedence over globally registered and built-in rules.

    A model with a parameter or buffer on the ``meta`` device is refused (``ValueError``): the
    trace reads values and memory (which tensors share it), which meta tensors lack. So is a
    model sharded with FSDP2's ``fully_shard`` or holding a ``DTensor``
    (:class:`~gaugefix.distributed.ShardingError`): the trace follows whole parameters, and
    each process holds slices. Discover on the unsharded model, then shard it; the structure
    binds the sharded model (the parameter names do not change).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"discover expects an nn.Module, got {type(model).__name__}")
    if not isinstance(allow_value_dependent, bool):
        raise TypeError(f"allow_value_dependent must be a bool, got {allow_value_dependent!r}")
    if isinstance(rules, dict | str) or not isinstance(rules, Iterable):
        raise TypeError(f"rules must be a list of (target, rule) pairs, got {type(rules).__name__}")
    model = unwrap_model(model)  # DDP, DataParallel, torch.compile: the model they wrap
    _refuse_meta(model)
    _refuse_sharded(model)
    ctx = trace(model, example_inputs, example_kwargs, allow_value_dependent, rules)
    return compile_structure(model, ctx, _notes(ctx))


def _refuse_meta(model: nn.Module) -> None:
    """``ValueError`` naming the first parameter or buffer on the ``meta`` device: the trace
    reads values and memory (which tensors share it, zeros made in the forward, rows picked by
    the data), which meta tensors do not have, so a structure found there may be wrong."""
    for kind, named in (("parameter", model.named_parameters), ("buffer", model.named_buffers)):
        for name, t in named():
            if t.is_meta:
                raise ValueError(
                    f"{kind} '{name}' is on the meta device (it holds no data), and discovery "
                    "reads values and memory: discover on the materialized model "
                    "(model.to_empty(device=...) and load or initialize its weights)"
                )


def _refuse_sharded(model: nn.Module) -> None:
    """:class:`~gaugefix.distributed.ShardingError` for a model using ``fully_shard`` or
    holding a ``DTensor`` (naming the first): the trace follows whole parameters, and the
    forward of a sharded model computes with gathered copies or slices of them, where it finds
    none (an empty structure)."""
    # a local import: gaugefix.distributed imports this module
    from gaugefix.distributed import ShardingError, sharded, uses_fully_shard

    tensors = [("parameter", *named) for named in model.named_parameters()]
    tensors += [("buffer", *named) for named in model.named_buffers()]
    first = next((f"{kind} '{name}'" for kind, name, t in tensors if sharded((t,))), None)
    if first is None and not uses_fully_shard(model):
        return
    raise ShardingError(
        f"{first or 'the model'} is sharded ({'by fully_shard' if first is None else 'a DTensor'}"
        "), and discovery traces whole parameters: discover the structure on the unsharded "
        "model, then shard it; the structure binds the sharded model"
    )


def _notes(ctx: TraceContext) -> tuple[str, ...]:
    """The caveats of a trace: the value reads it accepted, and the output's objects it did not
    search."""
    notes = []
    if ctx.value_reads:
        unused = [n for n in ctx.params if n not in ctx.used_params]
        notes.append(
            f"traced one path: the forward read {len(ctx.value_reads)} tensor value(s) into "
            f"Python (first: {ctx.value_reads[0]}); exact only for inputs that take this path"
            + (f"; {UNUSED_NOTE}{', '.join(unused)}" if unused else "")
        )
    if ctx.unsearched:
        notes.append(
            f"the output holds objects not searched ({', '.join(sorted(ctx.unsearched))}): "
            "tensors they hold (a cache's keys and values) may change under the gauge, so one "
            "made before a gauge move must not be used after it"
        )
    return tuple(notes)


__all__ = [
    "KINDS",
    "Exclusion",
    "GaugeStructure",
    "GeneratorEntries",
    "ParamTerms",
    "PlannedParam",
    "PlannedTerm",
    "Sum",
    "Term",
    "TraceContext",
    "TracingError",
    "ValueDependentError",
    "discover",
    "register_rule",
    "rules",
    "unregister_rule",
]
