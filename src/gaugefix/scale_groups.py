"""Scale groups: the exact rescaling group of a model, in the form SmoothQuant/AWQ-style tools
take it (llm-compressor's mapping convention: a *smooth* layer whose output channels are divided
by ``s`` and the *balance* layers whose input channels are multiplied by ``s``).

A generator ``n`` is such a scaling when every entry it multiplies lies on channels its modules
produce, in a form a tool scales by module name (a norm's gain, a bias, the rows of a ``weight``;
the columns of a 2-D one, stored transposed as GPT-2's ``Conv1D`` and embeddings do), and every
entry it divides lies on the input channels of the modules reading them (the columns of a
``weight`` of 2 or more dims; the rows of a 2-D one, ``Conv1D``) and not on channels those
modules produce. With ``h_n = -log s_n`` it is the tools' transformation exactly. Generators
with the same smooth and balance modules form one group. A generator multiplying a whole tensor
by one factor (a term of one entry, as on a word embedding read through shifted copies of
itself) acts alike on every channel of the tensor: its group maps each channel to it. It is a
group only where no other generator scales its smooth layer's output, as a tool gives each
channel one scale. A 2-D weight counts only on the dims
its module's type stores its channels on (``structure.in_out``: ``Conv1D`` and embeddings
``[in, out]``, every other module ``[out, in]``), as tools apply groups by module type: a weight
read against its type (``x @ linear.weight``) leaves its groups out. Query-key and rotary pairs
(they divide another layer's output rows) are no such scaling, nor are generators touching a
parameter not named ``weight`` or ``bias`` (fused experts, ``MultiheadAttention``'s
``in_proj_weight``, a layer scale ``gamma``), one of the model's root, or a depthwise
convolution's input channels (its kernel's dim 0): a tool could not apply them by module name.
Nor are generators a parameter of their smooth layer does not scale (a depthwise convolution
on a residual stream: its kernel carries the channel's factor and its inverse), nor those the
one channel map a tool divides a smooth layer's ``weight`` and ``bias`` by cannot express (the
map is read off those two: a bias added to other channels or in another order, two generators
on one channel), nor those of one group that divide one input channel together (``head(a * b)``
with ``a``, ``b`` two channels of one layer): a tool gives a channel one scale, not a product.
Module names are those of the model inside its ``DistributedDataParallel``, ``DataParallel`` and
``torch.compile`` wrappers (what ``discover`` traces). Nor are the generators of a tensor held
by several modules (``ln2.bias = ln1.bias``, :attr:`GaugeStructure.aliases`): a tool reaching it
by each module's name would scale it twice (a structure saved before aliases were recorded
cannot tell).
A structure traced on one path that left parameters unused (experts no example token was
routed to) has no groups to give: a group would leave the unused readers of its channels
unscaled, and change the outputs of inputs that reach them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gaugefix.structure.gauge_structure import UNUSED_NOTE, PlannedParam
from gaugefix.structure.terms import module_of

__all__ = ["scale_groups"]

# The parameters of a module a tool scales by the module's name (with its channels).
SCALED_LEAVES = ("weight", "bias")
# The most channels, over all layers, whose maps are built at lengths only declared shapes give
# (no term spans them, no layer produces that many): 2**24, 128 MiB as one int64 map.
UNSTORED_CHANNELS = 1 << 24

if TYPE_CHECKING:
    from gaugefix.structure import GaugeStructure


def _sides(structure: GaugeStructure) -> tuple[list[str], Tensor, Tensor, Tensor, dict, dict]:
    """The modules, and per generator which modules multiply it (``smooth``, ``[M, N]``),
    which divide it on input channels (``balance``, ``[M, N]``), and whether any entry it
    acts on is neither (``other``, ``[N]``); plus the column map ``(module, channels)`` of
    every dividing term (the generator of each input channel) and, per module, the generator
    of each output channel a tool divides (:func:`_output_map`)."""
    n = structure.num_generators
    modules = sorted({module_of(name) for name in structure.params})
    row = {m: i for i, m in enumerate(modules)}
    smooth = torch.zeros(len(modules), n + 1, dtype=torch.bool)
    balance = torch.zeros_like(smooth)
    other = torch.zeros(n + 1, dtype=torch.bool)
    columns: dict[str, list[Tensor]] = {}
    outputs: dict[str, list[Tensor]] = {}
    owns = torch.zeros(len(modules), n + 1, dtype=torch.bool)  # the channels it produces
    for name, index in structure.produced.items():
        if module_of(name) in row:
            owns[row[module_of(name)], index[index >= 0]] = True
    tied = structure.aliases or {}  # held by several modules: a tool would scale it twice
    plan = structure.plan(torch.device("cpu"))
    unstored = _unstored_modules(structure, plan)
    for param in plan:
        module = row[module_of(param.name)]
        own = owns[module]
        in_out = param.name in structure.in_out
        if modules[module] in unstored:
            for term in param.terms:
                other[term.slots.reshape(-1)] = True
            continue
        for term in param.terms:
            if param.name in tied:
                other[term.slots.reshape(-1)] = True
            slots = term.slots.reshape(-1)
            scalable = _scalable(param.name, param.shape, term.slots.shape, term.sign > 0, in_out)
            if term.sign > 0:
                smooth[module, slots] = True
                other[slots[~own[slots]] if scalable else slots] = True  # not its own channels
            elif scalable and not bool(own[slots].any()):
                balance[module, slots] = True
                dim = 0 if in_out and len(param.shape) == 2 else 1
                columns.setdefault(modules[module], []).append(
                    _channel_slots(term.slots, param.shape[dim])
                )
            else:
                other[slots] = True
        if _tool_scaled(param.name):
            _output_map(param, in_out, n, outputs.setdefault(modules[module], []), other)
    for name in structure.param_order:  # a tool divides every weight and bias of a smooth layer
        if module_of(name) in row and _tool_scaled(name) and not _channels_of(structure, name):
            other |= smooth[row[module_of(name)]]
    maps = {m: found[0] for m, found in outputs.items() if found}
    return modules, smooth[:, :n], balance[:, :n], other[:n], columns, maps


def _unstored_modules(structure: GaugeStructure, plan: list[PlannedParam]) -> set[str]:
    """The modules to leave out because their channel maps (the output channels of a
    ``weight`` or ``bias``, the input channels a term one entry long divides) would be built
    at lengths the file does not store: no term spans them and no layer produces that many
    channels (a concatenation of a layer's shifted copies, read by one whole-tensor term, has
    such a length). Up to :data:`UNSTORED_CHANNELS` of them in all are built; beyond, every
    module with one is left out, so that a small file declaring a huge shape does not make
    maps of that size (its groups would name every one of those channels)."""
    sizes = {len(index) for index in structure.produced.values()}
    for param in plan:
        sizes.update(n for term in param.terms for n in term.slots.shape)
    unstored: dict[str, int] = {}
    for param in plan:
        shape, in_out = param.shape, param.name in structure.in_out
        if not shape or not _tool_scaled(param.name):
            continue
        two_d = in_out and len(shape) == 2
        divided = len(shape) > 1 and any(
            t.sign < 0 and _scalable(param.name, shape, t.slots.shape, False, in_out)
            for t in param.terms
        )
        dims = (1 if two_d else 0,) + ((0 if two_d else 1,) if divided else ())
        lengths = [shape[d] for d in dims if shape[d] not in sizes]
        if lengths:
            module = module_of(param.name)
            unstored[module] = unstored.get(module, 0) + sum(lengths)
    return set(unstored) if sum(unstored.values()) > UNSTORED_CHANNELS else set()


def _output_map(param: PlannedParam, in_out: bool, n: int, found: list, other: Tensor) -> None:
    """Append to ``found`` (its module's maps so far) the generator of each output channel
    of ``param`` (a ``weight`` or ``bias``; ``n``: none), from the terms multiplying it
    there. A tool divides each of a module's weight and bias by one map: mark ``other`` the
    generators of channels carrying two of them, and those on which this map and the module's
    first differ."""
    shape = param.shape
    if not shape:  # no output channels: left out below
        return
    dim = 1 if in_out and len(shape) == 2 else 0
    terms = [
        t.slots.reshape(-1)
        for t in param.terms
        if t.sign > 0 and _scalable(param.name, shape, t.slots.shape, True, in_out)
    ]
    wholes = [t for t in terms if len(t) != shape[dim]]  # one factor on the whole tensor
    terms = [t for t in terms if len(t) == shape[dim]]
    stacked = torch.stack([torch.full((shape[dim],), n), *terms])  # [1 + terms, channels]
    clash = (stacked < n).sum(0) > 1
    other[stacked[:, clash]] = True
    whole = torch.cat(wholes) if wholes else stacked.new_zeros(0)
    gens = _with_whole(stacked.amin(0), whole, n, other)
    first = found[0] if found else gens
    if first.shape != gens.shape:
        other[first] = other[gens] = True
    else:
        differ = first != gens
        other[first[differ]] = other[gens[differ]] = True
    found.append(gens)


def _with_whole(gens: Tensor, wholes: Tensor, n: int, other: Tensor) -> Tensor:
    """The generator of each output channel (``gens``, ``[channels]``; ``n``: none), with the
    generators ``wholes`` multiplying the whole tensor by one factor: one such generator on a
    tensor no other generator scales is that of every channel; any other is marked ``other``
    (a channel would carry two factors)."""
    wholes = wholes[wholes < n]
    if len(wholes) == 1 and not bool((gens < n).any()):
        return wholes.expand(len(gens)).clone()
    other[wholes] = True
    return gens


def _channel_slots(slots: Tensor, channels: int) -> Tensor:
    """The generator slot of each of ``channels`` channels of a term (``slots``, spanning them,
    or one slot for the whole tensor)."""
    flat = slots.reshape(-1)
    return flat.expand(channels).clone() if flat.numel() == 1 else flat


def _channels_of(structure: GaugeStructure, name: str) -> bool:
    """Whether parameter ``name`` has output channels a generator acts on (it is in the
    structure, and not a scalar)."""
    return name in structure.params and bool(structure.params[name].shape)


def _tool_scaled(name: str) -> bool:
    """Whether a tool scales parameter ``name`` with its module's output channels."""
    return name.rpartition(".")[2] in SCALED_LEAVES


def _scalable(
    name: str, shape: tuple[int, ...], index: tuple[int, ...], out: bool, in_out: bool
) -> bool:
    """Whether a term (index shape ``index``) of parameter ``name`` lies on the output
    (``out``) or input channels a tool scales by module name: a gain, a bias or a ``weight``'s
    rows (out), a ``weight``'s columns (in); for a 2-D ``weight`` the other way round where its
    module stores it ``[in, out]`` (``in_out``); the term spans that whole dim and no other, or
    is one factor on the whole tensor (every channel scaled alike)."""
    module, _, leaf = name.rpartition(".")
    vector = len(shape) == 1  # a gain or a bias: output channels only
    if not module or not shape or leaf not in SCALED_LEAVES or (vector and not out):
        return False
    if leaf == "bias" and not vector:
        return False
    dims = ([1] if out else [0]) if in_out and len(shape) == 2 else [0] if out else [1]
    if all(k == 1 for k in index):
        return True
    return any(
        index[d] == shape[d] and all(k == 1 for i, k in enumerate(index) if i != d) for d in dims
    )


def scale_groups(structure: GaugeStructure) -> list[dict[str, Any]]:
    """The smoothing groups of ``structure``, as plain data (JSON-ready), in the order of their
    first generator. Each: ``smooth_layer`` (the module whose output channels are divided; a
    list when several produce them, e.g. through a residual sum), ``balance_layers`` (the
    modules whose input channels are multiplied), ``kind`` (the generators' kind),
    ``generators`` (their indices in the structure), and ``smooth_channels`` /
    ``balance_channels``: per module, for each output / input channel, the position in
    ``generators`` of the generator that scales it (``-1``: none of this group; a generator
    scaling a whole tensor by one factor is named on each of its channels). Raises
    ``ValueError`` for a structure whose traced path left parameters unused."""
    _refuse_unused(structure)
    modules, smooth, balance, other, columns, maps = _sides(structure)
    n = structure.num_generators
    smoothing = smooth.any(0) & balance.any(0) & ~other
    chosen = torch.nonzero(smoothing).reshape(-1)
    if not chosen.numel():
        return []
    signature = torch.cat([smooth, balance])[:, chosen].T
    _, group_of = torch.unique(signature, dim=0, return_inverse=True)
    first = torch.full((int(group_of.max()) + 1,), n).scatter_reduce(0, group_of, chosen, "amin")
    groups = []
    for g in torch.argsort(first).tolist():
        members = _one_per_channel(chosen[group_of == g], balance, columns, modules, n)
        if not members.numel():
            continue
        position = torch.full((n + 1,), -1, dtype=torch.long)
        position[members] = torch.arange(len(members))
        smooth_names = [modules[i] for i in torch.nonzero(smooth[:, members[0]]).reshape(-1)]
        balance_names = [modules[i] for i in torch.nonzero(balance[:, members[0]]).reshape(-1)]
        groups.append(
            {
                "smooth_layer": smooth_names[0] if len(smooth_names) == 1 else smooth_names,
                "balance_layers": balance_names,
                "kind": structure.generator_kinds[int(members[0])],
                "generators": members.tolist(),
                "smooth_channels": {m: _positions(position, maps[m]) for m in smooth_names},
                "balance_channels": {m: _positions(position, *columns[m]) for m in balance_names},
            }
        )
    return groups


def _refuse_unused(structure: GaugeStructure) -> None:
    """Refuse a structure whose (value-dependent) trace did not use every parameter: what reads
    a group's channels off that path is unknown, so no group is exact for every input."""
    for note in structure.notes:
        unused = note.partition(UNUSED_NOTE)[2]
        if unused:
            raise ValueError(
                f"the structure was traced on one path, which left parameters unused ({unused}): "
                "a scale group would leave them unscaled; discover it on inputs whose path uses "
                "every parameter (for a mixture of experts, tokens routed to every expert), or "
                "remove parameters no path uses"
            )


def _one_per_channel(
    members: Tensor, balance: Tensor, columns: dict, modules: list[str], n: int
) -> Tensor:
    """``members`` less the generators that divide an input channel of a balance module
    together with another member (a product of two of the group's channels read as one, as
    ``a * b`` of one layer's halves is): a tool gives each channel one scale, so their group
    would scale it by one factor where the structure multiplies two."""
    named = torch.zeros(n + 1, dtype=torch.bool)
    named[members] = True
    shared = torch.zeros(n + 1, dtype=torch.bool)
    for i in torch.nonzero(balance[:, members[0]]).reshape(-1).tolist():
        maps = torch.stack(columns[modules[i]])  # [terms, channels]
        together = named[maps].sum(0) >= 2
        shared[maps[:, together]] = True
    return members[~shared[members]]


def _positions(position: Tensor, *maps: Tensor) -> list[int]:
    """Per channel, the group position of the generator one of ``maps`` names there."""
    found = torch.stack([position[m] for m in maps]).amax(0)
    return found.tolist()
