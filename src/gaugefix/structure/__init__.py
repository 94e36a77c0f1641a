"""Finding the gauge group of a model: tracing, the op-rule registry and ``GaugeStructure``."""

from __future__ import annotations

from typing import Any

from torch import nn

from gaugefix.structure import rules
from gaugefix.structure.gauge_structure import (
    Exclusion,
    GaugeStructure,
    NeuronSlices,
    ParamMap,
    compile_structure,
)
from gaugefix.structure.trace import TraceContext, TracingError, register_rule, trace


def discover(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> GaugeStructure:
    """The gauge group of ``model``: every neuron-wise positive rescaling symmetry found by
    running it once on the example inputs and applying the op-rule registry.

    The model is not modified (BatchNorm statistics and the random state are restored). Channels
    that are not gauge neurons are listed in ``structure.excluded`` with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"discover expects an nn.Module, got {type(model).__name__}")
    return compile_structure(model, trace(model, example_inputs, example_kwargs))


__all__ = [
    "Exclusion",
    "GaugeStructure",
    "NeuronSlices",
    "ParamMap",
    "TraceContext",
    "TracingError",
    "discover",
    "register_rule",
    "rules",
]
