"""Running a forward in float64 throughout: a float64 model whose forward casts to a coarser
floating dtype (a norm that computes in float32, a softmax with ``dtype=torch.float32``) keeps
float64's digits there, so a comparison of its outputs resolves float64's rounding rather than
float32's."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Float64Throughout"]


def _narrower_float(value: object) -> bool:
    """``value`` is a floating dtype coarser than float64 (float32, float16, bfloat16, float8)."""
    return (
        isinstance(value, torch.dtype)
        and value.is_floating_point
        and torch.finfo(value).bits < torch.finfo(torch.float64).bits
    )


# Casts to a floating dtype coarser than float64, which the mode runs to float64 instead: the
# methods that name their dtype (the ones whose positional dtype or tensor is rewritten too, a
# ``.type`` string by its suffix) and those that imply one.
DTYPE_CASTS = (Tensor.to, Tensor.type)
IMPLIED_CASTS = (Tensor.float, Tensor.half, Tensor.bfloat16)
NARROWER_TYPE_NAMES = ("FloatTensor", "HalfTensor", "BFloat16Tensor")
# Functions whose ``dtype`` reinterprets bits rather than converts values: left as they are.
REINTERPRETING = (Tensor.view, torch.frombuffer)


def _widened(value: object) -> tuple:
    """A positional argument of a cast, as the arguments that make its target dtype float64: a
    dtype, a tensor whose dtype ``.to`` would take (as its device and float64) or a ``.type``
    name; others as they are."""
    if _narrower_float(value):
        return (torch.float64,)
    if isinstance(value, Tensor) and _narrower_float(value.dtype):
        return (value.device, torch.float64)
    if isinstance(value, str) and value.endswith(NARROWER_TYPE_NAMES):
        return (value.rsplit(".", 1)[0] + ".DoubleTensor",)
    return (value,)


class Float64Throughout(TorchFunctionMode):
    """Runs a forward in float64 throughout: a cast to a floating dtype coarser than float64
    (``.to(torch.float32)``, ``.to(device, dtype)``, ``.to(dtype=...)``, ``.float()``,
    ``.half()``, ``.bfloat16()``, ``.type(...)``) casts to float64, and a ``dtype=`` keyword
    naming one (a ``softmax``'s, a factory's; not a bit view's) names float64. A norm that
    computes in float32 (``LlamaRMSNorm``) then keeps float64's digits. Used as a context
    manager (``with Float64Throughout(): model(x)``); torch function modes are per thread and
    last for the ``with`` block."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if _narrower_float(kwargs.get("dtype")) and func not in REINTERPRETING:
            kwargs["dtype"] = torch.float64
        if func in IMPLIED_CASTS:
            func = Tensor.double
        elif func in DTYPE_CASTS:
            args = (args[0], *[w for a in args[1:] for w in _widened(a)])
        return func(*args, **kwargs)
