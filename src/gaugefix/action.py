"""The group action ``g(h) . theta`` and the transport of optimizer state.

``g(h)`` multiplies each parameter entry by ``exp(h_row - h_col)`` (a missing side counts as 0),
in place, so that references held by optimizers stay valid. It is exact up to rounding and
composes additively: ``g(h1) g(h2) = g(h1 + h2)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gaugefix.moment import leading_chunks
from gaugefix.structure import GaugeStructure

# Optimizer state entries by how they scale when the parameter entry is multiplied by ``f``:
# gradient-like buffers by ``1/f``, squared-gradient buffers by ``1/f^2``.
GRAD_LIKE = ("momentum_buffer", "exp_avg")
SQUARED = ("exp_avg_sq", "max_exp_avg_sq")


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host sync.

    A sum is finite when every entry is (NaN and inf propagate), so one sum per tensor decides
    the common case in a single pass without a boolean temporary; only a non-finite sum (an
    overflow, or a non-finite entry) is checked entry by entry."""
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([t.detach().sum() for t in tensors])).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_finite_params(params: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first parameter with a NaN or infinite entry."""
    if all_finite(list(params.values())):
        return
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter '{name}' contains NaN or inf; nothing was modified")


def check_log_alpha(log_alpha: Tensor, structure: GaugeStructure) -> None:
    if not isinstance(log_alpha, Tensor):
        raise TypeError(f"log_alpha must be a tensor, got {type(log_alpha).__name__}")
    if tuple(log_alpha.shape) != (structure.num_neurons,):
        raise ValueError(
            f"log_alpha must have shape ({structure.num_neurons},) (one entry per gauge neuron), "
            f"got {tuple(log_alpha.shape)}"
        )
    if not log_alpha.is_floating_point() or not bool(torch.isfinite(log_alpha).all()):
        raise ValueError("log_alpha must be a finite floating-point tensor")


def optimizer_states(
    optimizer: torch.optim.Optimizer | None, params: dict[str, Tensor]
) -> dict[str, dict]:
    """The optimizer state of each gauged parameter, checked to be transportable: every tensor
    entry shaped like its parameter must be a known gradient-like or squared buffer."""
    if optimizer is None:
        return {}
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    out = {}
    for name, p in params.items():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if (
                isinstance(value, Tensor)
                and value.shape == p.shape
                and key not in (GRAD_LIKE + SQUARED)
            ):
                raise ValueError(
                    f"cannot transport optimizer state '{key}' of {type(optimizer).__name__} "
                    f"for parameter '{name}'; supported: {GRAD_LIKE + SQUARED}"
                )
        out[name] = state
    return out


@torch.no_grad()
def apply_gauge_(
    model: nn.Module,
    structure: GaugeStructure,
    log_alpha: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Apply ``g(log_alpha)`` to ``model`` in place: every entry is multiplied by
    ``exp(log_alpha[row] - log_alpha[col])``. ``log_alpha`` has shape ``[num_neurons]``.

    Gradients in ``.grad`` and, when ``optimizer`` is given, its state are transported: gradient
    -like buffers (SGD momentum, Adam ``exp_avg``) scale by the inverse factor, Adam's second
    moments by its square. Everything is validated first; on error nothing is modified.
    """
    params = structure.bind(model)
    check_log_alpha(log_alpha, structure)
    check_finite_params(params)
    states = optimizer_states(optimizer, params)
    if not params:
        return
    apply_gauge_unchecked_(params, structure, log_alpha, states)


@torch.no_grad()
def apply_gauge_unchecked_(
    params: dict[str, Tensor],
    structure: GaugeStructure,
    log_alpha: Tensor,
    states: dict[str, dict],
) -> None:
    """:func:`apply_gauge_` for callers that validated everything: ``params`` bound to
    ``structure`` (non-empty), ``log_alpha`` finite, ``states`` from :func:`optimizer_states`."""
    device = next(iter(params.values())).device
    h = torch.cat(
        [
            log_alpha.to(device=device, dtype=torch.float64),
            log_alpha.new_zeros(1, dtype=torch.float64, device=device),
        ]
    )
    for m in structure.device_maps(device):
        p = params[m.name]
        row = None if m.rows is None else h[m.rows]
        col = None if m.cols is None else h[m.cols]
        targets = [(p, 1)] + ([(p.grad, -1)] if p.grad is not None else [])
        for key, value in states.get(m.name, {}).items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                targets.append((value, -1 if key in GRAD_LIKE else -2))
        factors = {
            power: (
                None if row is None else dense_inner(torch.exp(power * row).to(p.dtype), p.shape),
                None if col is None else dense_inner(torch.exp(-power * col).to(p.dtype), p.shape),
            )
            for power in {power for _, power in targets}
        }
        blocks = None
        if row is not None and col is not None:
            blocks = leading_chunks(p, m.rows, m.cols)
        if blocks is None:
            for t, power in targets:
                for f in factors[power]:
                    if f is not None:
                        t.mul_(f if f.dtype == t.dtype else f.to(t.dtype))
            continue
        # Both sides on a large tensor: block by block, so that the second product reads
        # the entries from cache.
        for block in blocks:
            for t, power in targets:
                fr, fc = factors[power]
                t[block].mul_(fr[block] if fr.shape[0] > 1 else fr).mul_(fc)


def dense_inner(factor: Tensor, shape: torch.Size) -> Tensor:
    """``factor`` (broadcastable to ``shape``) materialised over its trailing size-1 dims when
    they span fewer than 64 entries of ``shape`` (a conv's kernel taps): an elementwise product
    with a factor broadcast along a short innermost block runs several times slower than with
    a contiguous one. Small: at most 64 times ``factor``'s own size."""
    k = factor.dim()
    while k > 0 and factor.shape[k - 1] == 1:
        k -= 1
    if k == 0 or k == factor.dim() or factor.dim() != len(shape):
        return factor
    inner = shape[k:]
    if inner.numel() >= 64 or inner.numel() == 1:
        return factor
    return factor.expand(*factor.shape[:k], *inner).contiguous()


def random_gauge_(
    model: nn.Module,
    structure: GaugeStructure,
    scale: float,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """Apply a random gauge transformation ``log_alpha ~ N(0, scale^2)`` (float64, one entry per
    neuron, drawn on the generator's device) and return ``log_alpha``."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    log_alpha = scale * torch.randn(
        structure.num_neurons, generator=generator, dtype=torch.float64, device=device
    )
    apply_gauge_(model, structure, log_alpha, optimizer)
    return log_alpha
