"""Running a forward in float64 throughout: a float64 model whose forward casts to a coarser
floating dtype (a norm that computes in float32, a softmax with ``dtype=torch.float32``) keeps
float64's digits there, so a comparison of its outputs resolves float64's rounding rather than
float32's."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gaugefix.errors import first_line

__all__ = [
    "FLOAT64_EXPERTS",
    "Float64Throughout",
    "NO_FLOAT64_EXPERTS",
    "float64_copy",
    "float64_outputs",
    "float_outputs",
    "frozen_randomness",
    "relative_changes",
]


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


def float_outputs(out: Any) -> list[Tensor]:
    """The floating (and complex) tensors in a model's output, in mappings, lists, tuples and
    dataclasses: those :func:`gaugefix.discover` keeps (a cache object such as a Hugging Face
    ``DynamicCache`` is not searched, by either; a cache returned as tuples of tensors is an
    output to both)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):
        return float_outputs(list(out.values()))
    if isinstance(out, list | tuple):
        return [t for v in out for t in float_outputs(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return float_outputs([getattr(out, f.name) for f in dataclasses.fields(out)])
    return []


def float64_outputs(model: nn.Module, /, *args: Any, **kwargs: Any) -> list[Tensor]:
    """The floating outputs of the float64 ``model`` on ``args``, ``kwargs``, computed in
    float64 throughout (:class:`Float64Throughout`), without gradients."""
    with torch.no_grad(), Float64Throughout():
        return [t.detach().clone() for t in float_outputs(model(*args, **kwargs))]


@contextmanager
def frozen_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield ``reset()``, which restores the global random state (CPU, and ``device`` if it is a
    CUDA device) to its value on entry; the state is restored on exit as well. Calling
    ``reset()`` before each evaluation gives every evaluation the same dropout masks."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def reset() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    try:
        yield reset
    finally:
        reset()


def relative_changes(a: list[Tensor], b: list[Tensor]) -> tuple[float, ...]:
    """``max |a_i - b_i| / max |b_i|`` for each output tensor ``b_i`` (0 for an empty one,
    ``inf`` for a change of an all-zero one, NaN for a NaN difference)."""
    changes = []
    for u, v in zip(a, b, strict=True):
        change = float((u - v).abs().max()) if u.numel() else 0.0
        scale = float(v.abs().max()) if v.numel() else 0.0
        changes.append(change / scale if scale else change * math.inf if change else 0.0)
    return tuple(changes)


def float64_copy(model: nn.Module, error: type[Exception], purpose: str) -> nn.Module:
    """A float64 copy of ``model`` in the same mode (train or eval), its experts on float64
    kernels (:func:`_float64_experts`); ``error`` when it cannot be copied
    (``torch.nn.utils.weight_norm``'s modules cannot), its message ending in ``purpose``
    (what works on the copy)."""
    try:
        copied = copy.deepcopy(model)
    except Exception as err:  # whatever a module's __deepcopy__ raises
        raise error(
            f"cannot copy the model ({type(err).__name__}: {first_line(err)}); {purpose}"
        ) from None
    copied = copied.to(torch.float64)
    _float64_experts(copied, error)
    return copied


# Hugging Face experts implementations with no float64 kernel (``torch._grouped_mm`` takes
# float32, bfloat16 and float16), and the one the float64 copy runs instead: the same experts
# (each token's top-k experts, their outputs summed with the routing weights) with ``bmm``, and,
# unlike the ``eager`` loop, without reading the routing into Python.
NO_FLOAT64_EXPERTS = ("grouped_mm",)
FLOAT64_EXPERTS = "batched_mm"


def _float64_experts(model: nn.Module, error: type[Exception]) -> None:
    """Switch each Hugging Face model in the float64 copy ``model`` whose experts run on
    :data:`NO_FLOAT64_EXPERTS` to :data:`FLOAT64_EXPERTS` (its configuration is the copy's);
    ``error`` when transformers refuses the switch."""
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_experts_implementation", None)
        if implementation in NO_FLOAT64_EXPERTS and hasattr(module, "set_experts_implementation"):
            try:
                module.set_experts_implementation(FLOAT64_EXPERTS)
            except Exception as err:  # whatever transformers raises for a model it cannot switch
                raise error(
                    f"the experts of {type(module).__name__} run on {implementation}, which has "
                    f"no float64 kernel, and cannot be switched to {FLOAT64_EXPERTS}: "
                    f"{first_line(err)}"
                ) from None
