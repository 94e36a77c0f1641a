"""Slices of parameters picked by an index during a trace (the expert weights of a mixture).

A gather ``W[ids]`` (or ``W[e]``, ``grouped_mm``'s per-expert slices) is recorded as a tensor of
slices of the parameter along its dim 0 (:class:`Gathered`); :class:`GatheredSlices`, a part of
:class:`~gaugefix.structure.context.TraceContext`, records such tensors, turns the nodes a rule
states on them into nodes of the whole parameter, tracks which slices gathers whose rows depend
on the data read (a slice none read is fixed after the trace), and blocks the positions whose
pairing with the slices another input could change.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gaugefix.structure.provenance import placement_of

__all__ = ["Coverage", "Gathered", "GatheredSlices", "gather_pairings"]


class Gathered:
    """A tensor of slices of a parameter (or of an arrangement of one) along its dim 0, with its
    dims permuted: in the *gathered order* ``(*rows.shape, *source.shape[1:])``, position ``i``
    of the leading ``rows.dim()`` dims holds slice ``rows[i]`` of ``source`` (the expert weights
    of a mixture picked per token, ``W[expert_ids]``, or one expert, ``W[e]``), and the tensor
    is that one permuted by ``perm`` (``W[e].t()``: dim ``j`` is dim ``perm[j]`` of the gathered
    order). ``index`` is the tensor the rows were read from when they depend on the data (else
    None)."""

    def __init__(
        self, source: Tensor, rows: Tensor, index: Tensor | None, perm: tuple[int, ...]
    ) -> None:
        self.source, self.rows, self.index, self.perm = source, rows, index, perm
        self.inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))

    def in_gathered_order(self, nodes: Tensor) -> Tensor:
        """Nodes given at the tensor's dims, at the dims of the gathered order."""
        return nodes.permute(self.inverse)

    def in_tensor_order(self, nodes: Tensor) -> Tensor:
        """Nodes given at the dims of the gathered order, at the tensor's dims."""
        return nodes.permute(self.perm)

    def gathered_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """A shape at the tensor's dims, at those of the gathered order (None when it has
        another number of dims than the tensor and the tensor is permuted)."""
        if self.perm == tuple(range(len(self.perm))):
            return tuple(shape)
        return tuple(shape[d] for d in self.inverse) if len(shape) == len(self.perm) else None


class Coverage(NamedTuple):
    """The slices along dim 0 of one arrangement of a parameter (``arrangement``: a view's
    index map, None for the parameter itself; ``shape``: its shape) that gathers whose rows
    depend on the data read (``read [shape[0]]``, bool), named by the first such gather."""

    arrangement: Tensor | None
    shape: torch.Size
    read: Tensor
    where: str


class GatheredSlices:
    """The part of :class:`~gaugefix.structure.context.TraceContext` that records gathered
    slices of parameters (its tables ``_gathers``, ``_holders``, ``slice_links``, ``coverage``
    and ``empty_slices``)."""

    def is_gathered(self, t: Any) -> bool:
        """Whether ``t`` holds slices of a parameter picked by index (``W[expert_ids]``)."""
        entry = self._gathers.get(id(t))
        return entry is not None and entry[0] is t

    def holds_every_slice(self, t: Tensor) -> bool:
        """Whether the gathered slices ``t`` hold every slice of their parameter, picked by an
        index that is the same for every input (``latents.expand(B, -1, -1)``: ``B`` copies)."""
        gathered = self._gathers[id(t)][1]
        read = torch.zeros(gathered.source.shape[0], dtype=torch.bool)
        read[gathered.rows.reshape(-1)] = True
        return gathered.index is None and bool(read.all())

    def gathered(
        self, source: Tensor, rows: Tensor, index: Tensor | None, view: Tensor | None = None
    ) -> Tensor:
        """Record ``view`` (by default a stand-in of no memory) as slices ``rows`` of the
        parameter ``source`` along dim 0 and return it. ``index`` is the tensor the rows are
        read from when it depends on the data (else None). Such rows are recorded in
        :attr:`coverage`, per arrangement of the parameter: a slice no traced row read is used
        for other inputs, so after the trace such a parameter is fixed unless every slice of
        every arrangement gathered was read. Slices of gathered slices (a nested gather) picked
        by the data fix it."""
        name = self.param_name(source)
        rows = rows.detach().long().cpu()
        if view is None:
            shape = (*rows.shape, *source.shape[1:])
            view = torch.empty((), dtype=source.dtype).expand(shape)
        perm = tuple(range(rows.dim() + source.dim() - 1))
        self._gathers[id(view)] = (view, Gathered(source, rows, index, perm))
        self._arranged[id(view)] = (view, placement_of(view))
        if index is not None and self.is_gathered(source):  # slices of which slices?
            self.fix(source, self.reason("slices of gathered slices picked by the data"))
        elif index is not None:
            self._cover(name, source, rows)
        return view

    def _cover(self, name: str, source: Tensor, rows: Tensor) -> None:
        """Record in :attr:`coverage` that ``rows`` of ``source`` (the parameter ``name`` or an
        arrangement of it: ``W.view(...)``, ``W.transpose(0, 1)``) were read along its dim 0;
        rows of one arrangement add up, those of different arrangements do not (a slice along
        one dim read does not say which slices along another were)."""
        arrangement = self._param_and_index(source)[1]
        uses = self.coverage.setdefault(name, [])
        same = [
            use for use in uses
            if use.shape == source.shape and (use.arrangement is None) == (arrangement is None)
            and (arrangement is None or torch.equal(use.arrangement, arrangement))
        ]  # fmt: skip
        if not same:
            read = torch.zeros(source.shape[0], dtype=torch.bool)
            same = [Coverage(arrangement, source.shape, read, self.reason("gathered"))]
            uses.append(same[0])
        same[0].read[rows.reshape(-1)] = True

    def _produce_gathered(self, p: Tensor, shape: tuple[int, ...]) -> Tensor:
        """:meth:`produce` on gathered slices, with ``shape`` per position (at the dims of the
        gathered order): fresh nodes per slice of the whole parameter, read at the gathered rows
        (positions holding one slice share its nodes)."""
        gathered = self._gathers[id(p)][1]
        lead = gathered.rows.dim()
        holder = self.fresh(gathered.source.shape[0], *shape[lead:])
        self.claim(p)
        name, on_param = self._on_param(gathered.source, holder)
        self._pending.setdefault(name, []).append((on_param, 1))
        self.produced.setdefault(name, on_param)
        self.produced_at.setdefault(name, len(self.marks))
        at_rows = holder[gathered.rows]
        if gathered.index is None:
            return at_rows
        positions = self._positions(gathered, at_rows.shape)
        self.slice_links.add(len(self.edges))
        self.union(at_rows, positions)
        return positions

    def _positions(self, gathered: Gathered, shape: torch.Size) -> Tensor:
        """Fresh nodes of ``shape`` (gathered positions first) for slices picked by rows that
        depend on the data, recorded with the entry of the index tensor each position read
        (see :meth:`block_mismatched_gathers`). The caller links them to the slices' nodes by
        an edge listed in :attr:`slice_links`."""
        index = gathered.index
        if index.shape == gathered.rows.shape:  # W[index]: the storage element read
            size = index.untyped_storage().nbytes() // index.element_size()
            elements = torch.arange(size).as_strided(
                index.shape, index.stride(), index.storage_offset()
            )
        else:  # grouped_mm: position s of tokens sorted by the offsets
            elements = torch.arange(gathered.rows.numel()).view(gathered.rows.shape)
        positions = self.fresh(*shape)
        storage = (index.untyped_storage().data_ptr(), index._version)  # not written since
        key = (storage, self.param_name(gathered.source))
        self._holders.append((positions, elements.reshape(-1), key, self.reason("gathered")))
        return positions

    def block_mismatched_gathers(self, comp: Tensor) -> None:
        """Block the gathered positions whose pairing another input could change. ``comp`` are
        the components of the equalities without the links from positions to slices: two
        positions in one component are made to carry one factor by the model itself, and
        on the slices they read only when they read them through one entry of one index
        tensor (its storage, not written in between: the tensor or a view of it), whatever the
        data. A component is kept when its positions all read one such entry (one token's
        expert, paired with itself) and it holds no channel of a parameter (see
        :meth:`_holds_channels`), or when it holds every position of each gather use and entry
        it touches (every slice then carries the factor, and the pairing does not matter).
        Otherwise (two routers, or positions that do not line up) it is blocked."""
        ptrs = [key[0] for _, _, key, _ in self._holders]
        index_of = {ptr: k for k, ptr in enumerate(dict.fromkeys(ptrs))}
        reach = max(int(element.max()) for _, element, _, _ in self._holders) + 1
        uses = [
            (nodes, index_of[ptr] * reach + element)  # one entry of one index
            for (nodes, element, _, _), ptr in zip(self._holders, ptrs, strict=True)
        ]
        count = int(comp.max()) + 1
        one_element, every_position = gather_pairings(comp, count, uses)
        one_element &= ~self._holds_channels(comp, count)
        self._block_pairings(comp, ~(one_element | every_position))

    def _holds_channels(self, comp: Tensor, count: int) -> Tensor:
        """Per component (of ``count``), whether it holds a node of a parameter's role other
        than slices picked by the data (which meet their positions only through the slice
        links): a channel that every input pairs with the same positions. Positions that meet
        such a channel without covering every position of their use (``h + b[ids]``, unit ``j``
        of ``h`` meets bias entry ``ids[j]``) are paired with it by the data's values."""
        held = torch.zeros(count, dtype=torch.bool)
        for terms in self.roles.values():
            for nodes, _ in terms or ():
                held[comp[nodes.reshape(-1)]] = True
        held[comp[0]] = False  # the fixed factor
        return held

    def _block_pairings(self, comp: Tensor, bad: Tensor) -> None:
        """Block the nodes of every recorded gather use in a component marked ``bad``, naming
        the parameters whose slices that component pairs."""
        if not bool(bad.any()):  # no use to look up
            return
        hit = [bad[comp[holder]] for holder, _, _, _ in self._holders]
        for (holder, _, (_, name), where), mine in zip(self._holders, hit, strict=True):
            if not bool(mine.any()):
                continue
            shared = set(comp[holder[mine]].tolist())
            partners = sorted({
                other for (h, _, (_, other), _), theirs in zip(self._holders, hit, strict=True)
                if other != name and bool(theirs.any())
                and not shared.isdisjoint(comp[h[theirs]].tolist())
            })  # fmt: skip
            with_ = " and ".join(f"'{n}'" for n in [name, *partners])
            self.block(holder[mine], (
                f"slices of {with_} picked by data-dependent indices that can pair them "
                f"differently for another input (different index tensors, or rows that do not "
                f"line up), {where}"))  # fmt: skip

    def fix_slice(self, p: Tensor, reason: str) -> None:
        """Fix, after the trace, the entries of the parameter behind the view ``p`` (a slice
        ``W[e]`` of experts' weights ``[E, out, in]``, along every dim) that ``p`` holds: an
        op read them with an empty input, so the trace saw nothing of how they meet the data.
        A view that holds every entry fixes the parameter now."""
        name, index = self._held_entries(p)
        numel = self.params[name].numel()
        mask, _ = self.empty_slices.setdefault(name, (torch.zeros(numel, dtype=torch.bool), reason))
        mask[slice(None) if index is None else index] = True
        if bool(mask.all()):
            del self.empty_slices[name]
            self.fix(self.params[name], reason)

    def _held_entries(self, p: Tensor) -> tuple[str, Tensor | None]:
        """The parameter behind ``p`` and the flat indices of the entries ``p`` holds: a view's
        index map (``W.t()``), the entries of the rows of slices at constant rows (``W[e]``,
        ``W[a:b]``, ``W.unbind()``); None for all (the parameter, or slices the data picks)."""
        self.claim(p)
        entry = self._gathers.get(id(p))
        if entry is None or entry[0] is not p:
            return self._param_and_index(p)
        gathered = entry[1]
        name, index = self._param_and_index(gathered.source)
        if gathered.index is not None:
            return name, None
        row = gathered.source[0].numel() if gathered.source.dim() else 1
        rows = gathered.rows.reshape(-1, 1) * row + torch.arange(row)
        return name, rows.reshape(-1) if index is None else index.reshape(-1)[rows.reshape(-1)]

    def fix_empty_slices(self) -> None:
        """After the trace: every term of the role of a parameter with slices read with an
        empty input (see :meth:`fix_slice`) is blocked on those entries, so they carry factor 1
        and the other slices keep their generators; a parameter with no role left is fixed."""
        for name, (mask, reason) in self.empty_slices.items():
            role = self.roles.get(name)
            if role is None:
                self.fix(self.params[name], reason)
                continue
            shape = self.params[name].shape
            why = f"{reason} (a slice of parameter '{name}')"
            for nodes, _ in role:
                self.block(nodes.expand(shape).reshape(-1)[mask], why)

    def fix_partly_read(self) -> None:
        """Fix every parameter gathered by data-dependent rows of which some slice was never
        read: other inputs read it, and the trace cannot say how it would scale there."""
        for name, uses in self.coverage.items():
            for use in uses:
                if bool(use.read.all()):
                    continue
                missing = torch.nonzero(~use.read).reshape(-1).tolist()
                dim = "dim 0" if use.arrangement is None else (
                    f"dim 0 of it arranged as {list(use.shape)}")  # fmt: skip
                self.fix(self.params[name], (
                    f"slices {missing} of '{name}' ({dim}) are picked by the data and the "
                    f"example input reads none of them, {use.where}: give an input that "
                    "reaches every slice (every expert)"))  # fmt: skip

    def permuted_gather(self, out: Tensor, gathered: Tensor, perm: tuple[int, ...]) -> None:
        """Record ``out = gathered.permute(perm)`` (``W[e].t()``, ``W[ids].transpose(1, 2)``,
        or ``perm`` the identity for a copy) as the same slices in another order of dims: every
        entry keeps its slice and its place in it."""
        self.claim(gathered)
        g = self._gathers[id(gathered)][1]
        perm = tuple(g.perm[d] for d in perm)
        self._gathers[id(out)] = (out, Gathered(g.source, g.rows, g.index, perm))
        self._arranged[id(out)] = (out, placement_of(out))


def gather_pairings(
    comp: Tensor, count: int, uses: list[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Per component of ``comp`` (``count`` of them), over the gather uses ``uses`` (each: the
    nodes of its positions, ``[positions, *entries]``, and per position the key of the index
    entry it read, ``[positions]``, ``>= 0``): whether its positions read exactly one key, and
    whether it holds, for every use and entry it touches, the entry at every position of the use
    (an entry is split when its positions lie in several components). Per component, the lowest
    and highest key read are compared, and each entry's column is checked for one component."""
    lowest = torch.full((count,), torch.iinfo(torch.long).max)
    highest = torch.full((count,), -1)
    every_position = torch.ones(count, dtype=torch.bool)
    for nodes, key in uses:
        c = comp[nodes.reshape(key.numel(), -1)]  # [positions, entries]
        read = key.unsqueeze(1).expand(c.shape).reshape(-1)
        lowest.scatter_reduce_(0, c.reshape(-1), read, reduce="amin")
        highest.scatter_reduce_(0, c.reshape(-1), read, reduce="amax")
        split = (c != c[:1]).any(0)  # entries whose positions lie in several components
        every_position[c[:, split].reshape(-1)] = False
    return lowest == highest, every_position
