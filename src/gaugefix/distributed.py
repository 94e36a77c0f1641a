"""Gauge fixing of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each process holds a slice of every parameter along one dim (a ``DTensor`` with placement
``Shard(d)`` on a 1-D device mesh). Every quantity the core computes from the parameters is a
sum over entries (``S_in``, ``S_out``, ``||theta||^2``, the masses ``F(h)`` and ``K v``), so each
process computes it over its own slices with the unchanged kernels and one all-reduce completes
it; the action multiplies each slice by its own factors. :class:`ShardStructure` is the structure
of this process's slices: its term maps are sliced like the parameters, and its
:meth:`~ShardStructure.sum_over_shards` all-reduces. Every function taking a model binds it
first (``GaugeStructure.bind``): the core functions (``imbalance``, ``imbalance_stats``,
``balance_``, ``relax_``, ``GaugeFixing``, ``apply_gauge_``) bind with ``sharded=True`` and switch
to the shard structure through :func:`local_view`; for every other function the bind step
refuses ``DTensor`` parameters with a :class:`ShardingError` (:func:`refuse_sharded`). For a
whole model nothing here runs (one dictionary lookup while ``torch.distributed.tensor`` was never
imported).

Every process reaches every decision (a step's size, a line search, skipping a non-finite step)
from the same all-reduced numbers, so all take the same steps and issue the same collectives.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from gaugefix.errors import GaugefixError
from gaugefix.structure import GaugeStructure, ParamTerms, Term

__all__ = [
    "ShardStructure",
    "ShardingError",
    "local_view",
    "refuse_sharded",
    "shard_structure",
    "sharded",
]

# Per structure: the shard structure built for a set of parameters (held weakly).
_shard_structures: weakref.WeakKeyDictionary[GaugeStructure, tuple[tuple, ShardStructure]] = (
    weakref.WeakKeyDictionary()
)

PLACEHOLDER = ""  # the name of the empty parameter a process holding no slice computes with


class ShardingError(GaugefixError, ValueError):
    """Sharded parameters a function cannot compute with, or a sharding it does not support."""


def _dtensor_type() -> type | None:
    """``DTensor``, or ``None`` while ``torch.distributed.tensor`` was never imported (then no
    ``DTensor`` exists, and importing it would cost a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether the first of ``tensors`` is a ``DTensor`` (FSDP2 shards every parameter of a
    module it wraps; :class:`ShardStructure` checks that all are)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(next(iter(tensors), None), dtensor)


def refuse_sharded(tensors: Mapping[str, Tensor]) -> None:
    """:class:`ShardingError` naming the first ``DTensor`` of ``tensors``: for the functions
    that need whole parameters (the caller's name is in the traceback)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    for name, t in tensors.items():
        if isinstance(t, dtensor):
            raise ShardingError(
                f"parameter '{name}' is sharded (an FSDP2 DTensor) and this function needs "
                "whole parameters: call it on an unsharded copy (DTensor.full_tensor())"
            )


class ShardStructure(GaugeStructure):
    """The structure of this process's slices of a sharded model: every parameter with a
    non-empty local slice, with its local shape and each term's index sliced to it (a term
    constant along the sharded dim is kept whole). Sums over its entries are partial:
    :meth:`sum_over_shards` completes them with one all-reduce over the mesh's process group.

    Supported: every parameter a ``DTensor`` with one ``Shard(d)`` placement on the same 1-D
    mesh, sliced as ``torch.chunk`` slices (process ``r`` holds entries ``[r c, (r + 1) c)``
    along ``d`` with ``c = ceil(size / processes)``), which is what ``fully_shard`` does. A
    process holding no slice at all computes with one empty placeholder parameter, so that it
    still takes part in every all-reduce. ``produced`` and ``excluded`` are the whole model's,
    so :meth:`summary` and :meth:`restrict`'s exclusions are those of the whole structure.
    """

    def __init__(self, structure: GaugeStructure, params: Mapping[str, Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        mesh = None
        local: dict[str, ParamTerms] = {}
        for name, p in params.items():
            if not isinstance(p, DTensor):
                raise ShardingError(
                    f"parameter '{name}' is not sharded while others are DTensors: shard every "
                    "parameter the structure acts on (fully_shard the root module)"
                )
            mesh = p.device_mesh if mesh is None else mesh
            placements = tuple(p.placements)
            if p.device_mesh != mesh or mesh.ndim != 1 or not placements[0].is_shard():
                raise ShardingError(
                    f"parameter '{name}' is placed {placements} on a {p.device_mesh.ndim}-D "
                    "mesh; supported: Shard(d) on one 1-D mesh for every parameter (fully_shard)"
                )
            dim = placements[0].dim
            size, processes = p.shape[dim], mesh.size()
            chunk = -(-size // processes)
            start = min(mesh.get_local_rank() * chunk, size)
            shape = tuple(p.to_local().shape)
            if shape[dim] != min(chunk, size - start):
                raise ShardingError(
                    f"parameter '{name}': a local slice of {shape[dim]} along dim {dim} is not "
                    "a torch.chunk slice"
                )
            if 0 in shape:
                continue
            terms = tuple(_sliced(t, dim, start, shape) for t in structure.params[name].terms)
            local[name] = ParamTerms(name, shape, terms)
        if not local:
            local[PLACEHOLDER] = ParamTerms(PLACEHOLDER, (1,), (Term(torch.full((1,), -1), 1),))
        super().__init__(
            structure.num_generators,
            local,
            structure.excluded,
            structure.generator_layers,
            structure.generator_kinds,
            structure.produced,  # the whole model's channels: for summary() and restrict()
            structure.param_order,
            structure.notes,
        )
        self.group = mesh.get_group()
        self._most_terms = structure.most_terms()

    def most_terms(self) -> int:
        """The whole structure's (the bound on a step's size depends on it: every process
        must compute the same)."""
        return self._most_terms

    def sum_over_shards(self, *partial: Tensor) -> tuple[Tensor, ...]:
        """The sums over every process's slices: one all-reduce of all of ``partial``
        (tensors of one dtype and device) together."""
        flat = torch.cat([t.reshape(-1) for t in partial])
        dist.all_reduce(flat, group=self.group)
        return tuple(v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in partial]),
                                                      partial, strict=True))  # fmt: skip


def _sliced(term: Term, dim: int, start: int, shape: tuple[int, ...]) -> Term:
    if term.index.shape[dim] == 1:
        return term
    return Term(term.index.narrow(dim, start, shape[dim]).contiguous(), term.sign)


def shard_structure(structure: GaugeStructure, params: Mapping[str, Tensor]) -> ShardStructure:
    """The :class:`ShardStructure` of ``params`` (bound ``DTensor`` parameters), built once per
    structure and set of parameters."""
    cached = _shard_structures.get(structure)
    if cached is not None:
        refs, shard = cached
        if len(refs) == len(params) and all(
            r() is p for r, p in zip(refs, params.values(), strict=True)
        ):
            return shard
    shard = ShardStructure(structure, params)
    _shard_structures[structure] = (tuple(weakref.ref(p) for p in params.values()), shard)
    return shard


def local_view(
    params: dict[str, Tensor], structure: GaugeStructure
) -> tuple[dict[str, Tensor], GaugeStructure]:
    """``(params, structure)`` as they are for a whole model; for ``DTensor`` parameters, this
    process's slices (aliases: in-place changes reach the parameters; to be used under
    ``no_grad``) and their :class:`ShardStructure`."""
    if not sharded(params.values()):
        return params, structure
    shard = shard_structure(structure, params)
    if PLACEHOLDER in shard.params:
        p = next(iter(params.values()))
        return {PLACEHOLDER: torch.zeros(1, dtype=p.dtype, device=p.device)}, shard
    return {name: params[name].to_local() for name in shard.params}, shard


def local_targets(
    targets: dict[str, list[tuple[Tensor, int]]],
) -> dict[str, list[tuple[Tensor, int]]]:
    """Transport targets (a parameter, its gradient and optimizer state, with powers) with every
    ``DTensor`` replaced by its local slice, checked to be sliced like the parameter."""
    out = {}
    for name, tensors in targets.items():
        local = [(t.to_local() if hasattr(t, "to_local") else t, power) for t, power in tensors]
        shape = local[0][0].shape
        for t, _ in local[1:]:
            if t.shape != shape:
                raise ShardingError(
                    f"the gradient or optimizer state of '{name}' is sliced unlike the "
                    f"parameter ({tuple(t.shape)} vs {tuple(shape)}); cannot transport it"
                )
        out[name] = local
    return out


def everywhere(flag: bool, like: Tensor) -> bool:
    """Whether ``flag`` holds on every process of ``like``'s (a ``DTensor``'s) mesh."""
    value = torch.tensor([0.0 if flag else 1.0], device=like.device)
    dist.all_reduce(value, group=like.device_mesh.get_group())
    return float(value) == 0.0


def add_local_grads_(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """``p.grad += g`` on the local slice of each named ``DTensor`` parameter's gradient."""
    for name, g in grads.items():
        grad = params[name].grad
        if grad is None:
            raise ValueError(f"parameter '{name}' has no gradient to add the penalty's to")
        local = grad.to_local()
        local.add_(g.to(local.dtype))
