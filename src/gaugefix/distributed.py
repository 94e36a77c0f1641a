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
from the same all-reduced numbers, so all take the same steps and issue the same collectives;
the arguments deciding a move (``h``, a rate, tolerances, whether an optimizer is passed,
which generators a freeze keeps still) are checked to agree (:func:`agreed`), and so is the
structure, once per shard structure (:func:`check_same_structure`, which a process holding
slices it cannot compute with reaches before it raises, so that every process raises).
A model using ``fully_shard`` whose parameters are not all ``DTensor`` s (a module left unsharded
or a parameter in ``ignored_params``, or parameters FSDP2 holds gathered after a forward) is
refused (:func:`refuse_gathered`), and so is a mesh of several dims (HSDP), before any
collective (:func:`mesh_group`).
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gaugefix.errors import GaugefixError
from gaugefix.structure import GaugeStructure, GeneratorEntries, ParamTerms, Term

__all__ = [
    "ShardStructure",
    "ShardingError",
    "agreed",
    "check_same_structure",
    "first_dtensor",
    "local_view",
    "optimizer_passed",
    "refuse_gathered",
    "refuse_sharded",
    "shard_structure",
    "sharded",
    "structure_fingerprint",
    "uses_fully_shard",
]

# Per structure: the shard structure built for a set of parameters (held weakly).
_shard_structures: weakref.WeakKeyDictionary[GaugeStructure, tuple[tuple, ShardStructure]] = (
    weakref.WeakKeyDictionary()
)

T = TypeVar("T")
PLACEHOLDER = ""  # the name of the empty parameter a process holding no slice computes with
FINGERPRINT = 4  # numbers in a structure's fingerprint
FINGERPRINT_BYTES = 6  # bytes of the hash in each (below 2^48: exact in float64)
OPTIMIZER = "whether an optimizer is passed"  # a part of the numbers :func:`agreed` compares


class ShardingError(GaugefixError, ValueError):
    """Sharded parameters a function cannot compute with, or a sharding it does not support."""


def _dtensor_type() -> type | None:
    """``DTensor``, or ``None`` while ``torch.distributed.tensor`` was never imported (then no
    ``DTensor`` exists, and importing it would cost a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (:class:`ShardStructure` then checks that
    all are, so that a model sharded in part is refused whichever parameter comes first)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(issubclass(k, dtensor) for k in set(map(type, tensors)))


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


def first_dtensor(tensors: list[Tensor]) -> Tensor:
    """The first ``DTensor`` of ``tensors`` (whose mesh the collectives use)."""
    return next(t for t in tensors if hasattr(t, "device_mesh"))


def uses_fully_shard(model: nn.Module | Mapping[str, Tensor]) -> bool:
    """Whether ``model`` is a module that ``fully_shard`` was applied to, or one of its
    submodules (one dictionary lookup while ``torch.distributed.fsdp`` was never imported)."""
    kind = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    modules = model.modules() if kind is not None and isinstance(model, nn.Module) else ()
    return any(isinstance(m, kind) for m in modules)


def refuse_gathered(model: nn.Module | Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """:class:`ShardingError` naming the first of ``params`` (bound to ``model``) that is not a
    ``DTensor`` while ``model`` uses ``fully_shard``: for the functions that compute on slices.
    Such a parameter belongs to a module left unsharded, or FSDP2 holds it gathered (after a
    forward, the root module's and those with ``reshard_after_forward=False``): a copy, in the
    forward's dtype under a mixed-precision policy, whose changes are lost when FSDP2
    reshards."""
    if not uses_fully_shard(model):
        return
    dtensor = _dtensor_type()
    for name, p in params.items():
        if dtensor is None or not isinstance(p, dtensor):
            raise not_sharded(name, "although the model uses fully_shard")


def not_sharded(name: str, context: str) -> ShardingError:
    """The error for a parameter that is not a ``DTensor`` where it must be, with its causes."""
    return ShardingError(
        f"parameter '{name}' is not sharded {context}: its module was not sharded, it is one "
        "of fully_shard's ignored_params, or FSDP2 holds it gathered after a forward (the root "
        "module's, reshard_after_forward=False), where a change would be lost; fully_shard "
        "every module holding parameters, and call reshard() on each FSDPModule of the model first"
    )


def unsupported_placement(where: str, p: Tensor) -> ShardingError:
    """The error for a ``DTensor`` ``p`` (named by ``where``) placed otherwise than the
    ``Shard(d)`` on one 1-D mesh that :class:`ShardStructure` supports."""
    return ShardingError(
        f"{where} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; supported: "
        "Shard(d) on one 1-D mesh for every parameter (fully_shard)"
    )


def mesh_group(like: Tensor) -> dist.ProcessGroup:
    """The process group of ``like``'s (a ``DTensor``'s) mesh; :class:`ShardingError` for a
    mesh of several dims (HSDP), which has no single group, before any collective."""
    if like.device_mesh.ndim != 1:
        raise unsupported_placement("a parameter", like)
    return like.device_mesh.get_group()


def agreed(
    params: Mapping[str, Tensor],
    parts: Mapping[str, int],
    check: Callable[[], T],
    numbers: Callable[[T], Sequence[Tensor]],
) -> T:
    """The result of ``check()``, which validates the arguments (raising ``TypeError`` or
    ``ValueError``) and returns something. For ``DTensor`` ``params`` (FSDP2) every process
    raises unless all found their arguments valid and the same: ``numbers(result)``, a tensor
    for each of ``parts`` (what it stands for, named in the error -> its number of entries),
    compared with one all-reduce, so that none moves its slices (or their optimizer state) by
    another gauge or skips collectives the others issue; a process whose ``check`` raised
    re-raises its own error."""
    if not sharded(params.values()):
        return check()
    like = first_dtensor(list(params.values()))
    try:
        result = check()
    except (TypeError, ValueError):
        _compare(None, parts, like)
        raise
    _compare(numbers(result), parts, like)
    return result


def optimizer_passed(optimizer: object) -> Tensor:
    """``[1]``: whether an optimizer is passed (its state then moves with the parameters): the
    part :data:`OPTIMIZER` of the numbers :func:`agreed` compares."""
    return torch.tensor([float(optimizer is not None)])


def _compare(numbers: Sequence[Tensor] | None, parts: Mapping[str, int], like: Tensor) -> None:
    """:class:`ShardingError` unless every process of ``like``'s mesh holds the same
    ``numbers`` (one tensor per part; ``None``: this process's arguments were invalid, it
    raises its own error), naming the first part that differs."""
    device = like.device
    flat = None
    if numbers is not None:
        flat = torch.cat([t.detach().to(device, torch.float64).reshape(-1) for t in numbers])
    differ = _differences(flat, sum(parts.values()), mesh_group(like), device)
    if numbers is None or not any(differ):
        return
    what = " or ".join(parts)
    if not differ[0]:
        ends = itertools.accumulate(parts.values())  # the first part whose prefix differs
        what = next(name for name, end in zip(parts, ends, strict=True) if any(differ[1 : end + 1]))
    invalid = " (invalid on another process, which raised its own error)" if differ[0] else ""
    raise ShardingError(
        f"{what} differs between the processes sharing the model's slices{invalid}: every "
        "process must pass the same; nothing was modified"
    )


def _differences(
    numbers: Tensor | None, size: int, group: dist.ProcessGroup | None, device: torch.device
) -> list[bool]:
    """Per entry, whether the ``size`` ``numbers`` differ between the processes of ``group``,
    after a first entry: whether a process holds ``None`` (differing from every value). One
    all-reduce of their maximum and minimum, one host read."""
    local = torch.zeros(size + 1, dtype=torch.float64, device=device)
    if numbers is None:
        local[0] = 1.0
    else:
        local[1:] = numbers.to(device=device, dtype=torch.float64).reshape(-1)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both.chunk(2)
    return (high != -low).tolist()


def structure_fingerprint(structure: GaugeStructure) -> Tensor:
    """Float64 ``[FINGERPRINT]``: a hash of the group ``structure`` stands for (its number of
    generators, and per parameter its name, shape and signed term index maps), each number an
    integer below ``2^48`` (exact in float64)."""
    digest = hashlib.sha256(str(structure.num_generators).encode())
    for name, param in structure.params.items():
        digest.update(f"|{name}{tuple(param.shape)}".encode())
        for term in param.terms:
            digest.update(f"|{term.sign}{tuple(term.index.shape)}".encode())
            digest.update(term.index.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    raw = digest.digest()
    chunks = [raw[i : i + FINGERPRINT_BYTES] for i in range(0, len(raw), FINGERPRINT_BYTES)]
    values = [int.from_bytes(c, "big") for c in chunks[:FINGERPRINT]]
    return torch.tensor(values, dtype=torch.float64)


def check_same_structure(
    structure: GaugeStructure,
    group: dist.ProcessGroup | None,
    device: torch.device,
    error: ShardingError | None = None,
) -> None:
    """:class:`ShardingError` on every process of ``group`` (``None``: the default group)
    unless all hold the same structure (:func:`structure_fingerprint`, one all-reduce): a
    process with another numbering of the generators, or another group (a mixture of experts
    discovered on each process's own batch), would move its parameters by another gauge.
    ``error``: this process's own reason to refuse (slices it cannot compute with), raised
    after the all-reduce, where every other process raises too."""
    numbers = None if error is not None else structure_fingerprint(structure)
    differ = _differences(numbers, FINGERPRINT, group, device)
    if error is not None:
        raise error
    if differ[0]:
        raise ShardingError(
            "another process holds slices of the parameters that are not fully_shard's "
            "(torch.chunk slices along one dim), and raised naming them; nothing was modified"
        )
    if any(differ):
        raise ShardingError(
            "the gauge structure differs between the processes (discovered on each one's own "
            "data? a batch that reached other experts gives another group; or, in GaugeFixing, "
            "parameters frozen on some processes only): discover it once, on the same input, "
            "give every process that structure and freeze alike; nothing was modified"
        )


def _fields(structure: GaugeStructure, params: dict[str, ParamTerms]) -> tuple:
    """The constructor arguments of a :class:`GaugeStructure` with ``structure``'s data and
    ``params`` for its parameters' terms."""
    s = structure
    return (s.num_generators, params, s.excluded, s.generator_layers, s.generator_kinds,
            s.produced, s.param_order, s.notes, s.in_out, s.aliases, s.module_types,
            s.gain_channels)  # fmt: skip


class ShardStructure(GaugeStructure):
    """The structure of this process's slices of a sharded model: every parameter with a
    non-empty local slice, with its local shape and each term's index sliced to it (a term
    constant along the sharded dim is kept whole). Sums over its entries are partial:
    :meth:`sum_over_shards` completes them with one all-reduce over the mesh's process group.

    Supported: every parameter a ``DTensor`` with one ``Shard(d)`` placement on the same 1-D
    mesh, sliced as ``torch.chunk`` slices (process ``r`` holds entries ``[r c, (r + 1) c)``
    along ``d`` with ``c = ceil(size / processes)``), which is what ``fully_shard`` does. A
    process holding no slice at all computes with one empty placeholder parameter, so that it
    still takes part in every all-reduce. The inspection methods (:meth:`generator`,
    :meth:`summary`, :meth:`scale_groups`, :meth:`touching`), :meth:`restrict` and
    :meth:`to_dict` (:meth:`save`) are those of the whole structure (``whole``), the same on
    every process.
    Slices that are not ``torch.chunk``'s (``DTensor.from_local`` given other local shapes) are
    refused on every process: by the process holding them after the all-reduce of the
    structure check, which the others then refuse too.
    """

    def __init__(self, structure: GaugeStructure, params: Mapping[str, Tensor]) -> None:
        first = _first_placement(params)
        mesh, local, error = first.device_mesh, {}, None
        for name, p in params.items():
            dim = p.placements[0].dim
            size, processes = p.shape[dim], mesh.size()
            chunk = -(-size // processes)
            start = min(mesh.get_local_rank() * chunk, size)
            shape = tuple(p.to_local().shape)
            if shape[dim] != min(chunk, size - start):  # raised after the structure check
                error = error or ShardingError(
                    f"parameter '{name}': a local slice of {shape[dim]} along dim {dim} is not "
                    "a torch.chunk slice"
                )
            elif 0 not in shape:
                terms = tuple(_sliced(t, dim, start, shape) for t in structure.params[name].terms)
                local[name] = ParamTerms(name, shape, terms)
        if not local:
            local[PLACEHOLDER] = ParamTerms(PLACEHOLDER, (1,), (Term(torch.full((1,), -1), 1),))
        # the whole model's channels (``produced``) kept: for summary() and restrict()
        super().__init__(*_fields(structure, local))
        self.group = mesh.get_group()
        self._most_terms = structure.most_terms()
        # The whole structure's data in a new object: the cache keyed by ``structure`` holds
        # this one, which must not keep ``structure`` alive.
        self.whole = GaugeStructure(*_fields(structure, structure.params))
        check_same_structure(structure, self.group, first.device, error)

    def generator(self, n: int) -> GeneratorEntries:
        """The whole structure's entries of generator ``n`` (indices into whole parameters)."""
        return self.whole.generator(n)

    def summary(self) -> str:
        """The whole structure's summary."""
        return self.whole.summary()

    def scale_groups(self) -> list[dict]:
        """The whole structure's scale groups."""
        return self.whole.scale_groups()

    def touching(self, names: Collection[str]) -> Tensor:
        """The generators acting on the named parameters anywhere, not only on this process's
        slices (the whole structure's)."""
        return self.whole.touching(names)

    def restrict(self, keep: Tensor, reason: str) -> GaugeStructure:
        """The whole structure's restriction (:meth:`GaugeStructure.restrict`): a structure of
        the whole model, to bind to the sharded model like any other."""
        return self.whole.restrict(keep, reason)

    def to_dict(self) -> dict:
        """The whole structure's plain data (a saved structure is the whole model's)."""
        return self.whole.to_dict()

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


def _first_placement(params: Mapping[str, Tensor]) -> Tensor:
    """The first of ``params``, once all are checked to be ``DTensor`` s with one ``Shard(d)``
    placement on the same 1-D mesh (:class:`ShardingError` else: their placements are the same
    on every process, so all raise, before any collective)."""
    from torch.distributed.tensor import DTensor

    first = None
    for name, p in params.items():
        if not isinstance(p, DTensor):
            raise not_sharded(name, "while others are DTensors")
        first = p if first is None else first
        mesh, placements = first.device_mesh, tuple(p.placements)
        if p.device_mesh != mesh or mesh.ndim != 1 or not placements[0].is_shard():
            raise unsupported_placement(f"parameter '{name}'", p)
    return first


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


def on_every_process(flag: Tensor, like: Tensor) -> Tensor:
    """A 0-dim bool tensor on ``flag``'s device: whether the 0-dim bool ``flag`` holds on every
    process of ``like``'s (a ``DTensor``'s) mesh; one all-reduce, no host read."""
    value = flag.to(torch.float32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=mesh_group(like))
    return value[0] > 0


def everywhere(flag: bool, like: Tensor) -> bool:
    """Whether ``flag`` holds on every process of ``like``'s (a ``DTensor``'s) mesh."""
    return bool(on_every_process(torch.tensor(flag, device=like.device), like))


def add_local_grads_(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """``p.grad += g`` on the local slice of each named ``DTensor`` parameter's gradient; a
    parameter of ``params`` without a gradient gets a zero one first (on every process, also
    one holding no slice of it), as on a whole model."""
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for name, g in grads.items():
        local = params[name].grad.to_local()
        local.add_(g.to(local.dtype))
