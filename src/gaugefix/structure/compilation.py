"""Compiling a finished trace into a :class:`GaugeStructure`: the equalities between nodes solved
into components (a signed union-find), the generators among them numbered, oriented and given
their kinds, and the producing channels that are no generators explained."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor, nn

from gaugefix.structure.context import TraceContext, compact
from gaugefix.structure.gauge_structure import GaugeStructure, aliases
from gaugefix.structure.terms import (
    KINDS,
    Exclusion,
    ParamTerms,
    Term,
    cancel_opposite,
    collisions,
    module_of,
    share_components,
)

__all__ = ["compile_structure"]


def _edge_table(ctx: TraceContext) -> tuple[np.ndarray, np.ndarray]:
    """The trace's equalities ``h_a = s h_b`` as one ``[3, e]`` array of rows ``(a, b, s)``, and
    per equality (``[e]``) whether it is a link from gathered positions to the slices they read
    (``TraceContext.slice_links``)."""
    if not ctx.edges:
        return np.zeros((3, 0), np.int64), np.zeros(0, bool)
    lengths = [e.shape[1] for e in ctx.edges]
    links = np.isin(np.arange(len(lengths)), sorted(ctx.slice_links))
    return torch.cat(ctx.edges, dim=1).numpy(), np.repeat(links, lengths)


def _positive_parts(n: int, edges: np.ndarray, links: np.ndarray) -> np.ndarray:
    """The components (``[n]`` labels, numbered in the order of their first nodes) of the ``n``
    nodes under the equalities ``h_a = h_b`` of ``edges`` (``[3, e]`` rows ``(a, b, s)``, ``s =
    1``) other than the ``links`` (``[e]``) from gathered positions to slices: the one pass
    over all nodes that :func:`_signed_components` and :func:`_components_without_slice_links`
    continue on these parts, each with its own remaining equalities."""
    kept = (edges[2] > 0) & ~links
    return _weak_components(edges[0][kept], edges[1][kept], n)  # a row, then a 1-D mask


def _signed_components(
    edges: np.ndarray, links: np.ndarray, part: np.ndarray
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Solve the equalities ``h_a = s h_b`` of ``edges`` (``[3, e]`` rows ``(a, b, s)``; ``links``
    and ``part`` as :func:`_positive_parts` gives them, on ``n = len(part)`` nodes):
    ``(component, sign, conflicted, count)``
    with ``h_node = sign[node] * h_root(component[node])`` for every node (the root: the
    component's first node; components numbered in the order of their roots), and
    ``conflicted[c]`` when some cycle of component ``c`` forces ``h = -h`` (so its coordinate
    is 0).

    On the double cover (nodes ``v+ = v`` and ``v- = v + n``; ``h_a = s h_b`` joins ``a+`` to
    ``b+`` and ``a-`` to ``b-`` for ``s = 1``, ``a+`` to ``b-`` and ``a-`` to ``b+`` for ``s =
    -1``) a component of the equalities is one piece where it is conflicted (``v+`` joined to
    ``v-``) and two sheets otherwise: the nodes whose ``v+`` lies on the root's sheet have sign
    ``+1``, the others ``-1``. All nodes of one whole part (see :func:`_cover_sheets`) have one
    component and sign, so both are found per part: the parts are numbered in the order of
    their first nodes, so a component's first part holds its root."""
    joining = (edges[2] < 0) | links  # the equalities that join parts
    whole, label = _cover_sheets(*(row[joining] for row in edges), part)
    k = len(label) // 2
    plus, minus = label[:k], label[k:]  # the labels of p+ and p- per whole part p
    key = np.minimum(plus, minus)  # one per component
    parts = np.arange(k)
    root = np.full(2 * k, k)
    root[key[::-1]] = parts[::-1]  # the first part of each component
    is_root = root[key] == parts
    number = np.zeros(2 * k, np.int64)
    number[key[is_root]] = np.arange(int(is_root.sum()))
    comp = number[key]
    conflicted = np.zeros(int(is_root.sum()), dtype=bool)
    conflicted[comp[plus == minus]] = True
    sign = np.where(plus == plus[root[key]], 1, -1)
    return (
        torch.from_numpy(comp[whole]),
        torch.from_numpy(sign[whole]),
        torch.from_numpy(conflicted),
        len(conflicted),
    )


def _cover_sheets(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, part: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The components of the double cover of the equalities ``h_a = s h_b`` (``[e]`` each) and
    of those inside ``part`` (components of other equalities with ``s = 1``, numbered in the
    order of their first nodes), on ``len(part)`` nodes: ``(whole, label)``, the whole part of
    every node (``[n]``: its part joined by these equalities with ``s = 1``, again numbered in
    the order of first nodes) and the labels of ``p+ = p`` and ``p- = p + k`` (``[2 k]``) on
    the ``k`` whole parts. The equalities with ``s = 1`` join ``v+`` to ``w+`` exactly where
    they join ``v-`` to ``w-``: the parts joined by them (whole components of every ``s = 1``
    equality) are found once on the nodes, and the cover is solved on those, joined by the
    others. Every node of a whole part has that part's labels."""
    negative = s < 0
    k = int(part.max()) + 1 if len(part) else 0
    whole = part
    if not negative.all():  # parts joined by these equalities with s = 1
        whole = _weak_components(part[a[~negative]], part[b[~negative]], k)[part]
    k = int(whole.max()) + 1 if len(whole) else 0
    pa, pb = whole[a[negative]], whole[b[negative]]  # p+ = p, p- = p + k
    label = _weak_components(np.concatenate([pa, pa + k]), np.concatenate([pb + k, pb]), 2 * k)
    return whole, label


def _components_without_slice_links(
    edges: np.ndarray, links: np.ndarray, part: np.ndarray
) -> Tensor:
    """The component of every node under the equalities ``edges`` other than the ``links``
    from gathered positions to the slices they read (see
    ``TraceContext.block_mismatched_gathers``), numbered in the order of their first nodes:
    the ``part`` s (see :func:`_positive_parts`, numbered so) joined by the other equalities
    (``s = -1``), whose components are numbered in the order of their first parts."""
    kept = (edges[2] < 0) & ~links
    k = int(part.max()) + 1
    return torch.from_numpy(_weak_components(part[edges[0][kept]], part[edges[1][kept]], k)[part])


# The most nodes a graph's int32 indices can number.
INT32_NODES = int(np.iinfo(np.int32).max)


def _weak_components(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """The connected components of the undirected graph on ``n`` nodes with the edges ``rows[i]
    -- cols[i]`` (``[e]`` each): ``[n]`` int64 labels, numbered in the order of each
    component's first node. Given SciPy int32 indices where they fit (it converts others)."""
    index = np.int32 if n <= INT32_NODES else np.int64
    weights = np.ones(len(rows))  # float64 and compressed: the form SciPy solves on, uncopied
    graph = csr_matrix((weights, (rows.astype(index), cols.astype(index))), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _first_reason(
    ctx: TraceContext, comp: Tensor, count: int, edges: np.ndarray
) -> tuple[Tensor, list[str], Tensor]:
    """Per component, the index into the returned reasons of the first mark that blocked it
    (``len(reasons)`` when none did); node 0 counts as marked with a generic reason."""
    generic = "mixed with a fixed tensor (model input, buffer or constant)"
    reasons = [r for _, r in ctx.marks] + [generic]
    nodes, which = _mark_nodes(ctx)
    first = torch.full((count,), len(reasons)).scatter_reduce(0, comp[nodes], which, reduce="amin")
    return first, reasons, _groups(comp, count, edges)


def _mark_nodes(ctx: TraceContext) -> tuple[Tensor, Tensor]:
    """Every marked node and the index of its mark (``[m]`` each, in the order of the marks),
    node 0 last with the index ``len(ctx.marks)`` (the generic reason)."""
    nodes = torch.cat([m.reshape(-1) for m, _ in ctx.marks] + [torch.zeros(1, dtype=torch.long)])
    which = torch.cat(
        [torch.full((m.numel(),), i) for i, (m, _) in enumerate(ctx.marks)]
        + [torch.tensor([len(ctx.marks)])]
    )
    return nodes, which


def _groups(comp: Tensor, count: int, edges: np.ndarray) -> Tensor:
    """Per node (``[num_nodes]``), the set of joined channels an exclusion's reason speaks of:
    its component, except in node 0's component. That one joins every channel fixed anywhere
    (through node 0, the fixed factor of inputs and constants), so there a node's group is the
    nodes joined to it by the equalities ``edges`` (``[3, e]``) without passing through node 0:
    the components of the graph without node 0's edges, numbered from ``count`` in the order
    of their first nodes. Only node 0's component splits (no equality leaves a component): its
    pieces are found on its own nodes, and numbered among the other components' roots."""
    fixed = (comp == comp[0]).numpy()
    nodes = np.flatnonzero(fixed)  # ascending, node 0 first
    a, b = edges[0], edges[1]
    inside = fixed[a] & (a != 0) & (b != 0)
    local = np.searchsorted(nodes, np.stack([a[inside], b[inside]]))
    piece = _weak_components(local[0], local[1], len(nodes))
    firsts = nodes[_first_occurrences(piece)]  # each piece's first node, ascending
    roots = np.flatnonzero(_first_occurrences(comp.numpy()))  # each component's first node
    below = np.searchsorted(roots, firsts) - (firsts > 0)  # other components' roots before
    group = comp.clone()
    group[torch.from_numpy(nodes)] = torch.from_numpy(count + below + np.arange(len(firsts)))[
        torch.from_numpy(piece)
    ]
    return group


def _first_occurrences(labels: np.ndarray) -> np.ndarray:
    """Whether each entry of ``labels`` (numbered ``0, 1, ...`` in the order of their first
    entries) is its label's first: the labels above every one before it."""
    before = np.maximum.accumulate(labels)
    return labels > np.concatenate([[-1], before[:-1]])


def _mark_keys(ctx: TraceContext, group: Tensor) -> Tensor:
    """Sorted, ``group * (len(ctx.marks) + 1) + mark`` for every mark and group it fixes nodes
    of (node 0's generic reason as mark ``len(ctx.marks)``)."""
    nodes, which = _mark_nodes(ctx)
    return torch.unique(group[nodes] * (len(ctx.marks) + 1) + which)


def _nearest_marks(keys: Tensor, width: int, group: Tensor, start: Tensor) -> Tensor:
    """Per node of ``group`` (its group), from the mark keys (see :func:`_mark_keys`; ``width``:
    the marks with the generic one, which is last), the first mark on its group made at or
    after mark ``start`` (``[k]`` like ``group``: the op nearest after the layer that produced
    the node), else the group's first mark, else the generic reason."""
    found = torch.full(group.shape, width - 1)
    for first in (start, 0):  # the nearest after ``start``, else the first
        at = _sorted_positions(keys, group * width + first).clamp(max=len(keys) - 1)
        hit = (keys[at] // width == group) & (found == width - 1)
        found = torch.where(hit, keys[at] % width, found)
    return found


def _resolved_terms(
    roles: list[tuple[Tensor, int]], comp: Tensor, sign: Tensor
) -> list[tuple[Tensor, int]]:
    """A parameter's role terms as ``(component map, sign)`` with uniform signs: each node's
    sign relative to its component multiplies the term's sign, so a term may split in two."""
    out = []
    for nodes, s in roles:
        c, t = comp[nodes], s * sign[nodes]
        for part in (1, -1):
            picked = torch.where(t == part, c, -1)
            if bool((picked >= 0).any()):
                out.append((compact(picked), part))
    return out


UNBLOCKED = 1 << 40  # the reason index of a component nothing blocks (larger than every real one)
KEY_LIMIT = 1 << 62  # the largest integer key a product of column sizes may reach (int64)


def compile_structure(
    model: nn.Module, ctx: TraceContext, notes: tuple[str, ...] = ()
) -> GaugeStructure:
    """Turn a finished trace into a :class:`GaugeStructure`.

    The nodes' equalities are solved (a signed union-find); a component is a generator when no
    mark fixed it, no cycle of its equalities forces ``h = -h``, no entry would carry it twice
    with one sign (the factor squared), and it both multiplies and divides some parameter
    entries (otherwise ``||theta||^2`` has no minimum along it). Each generator is oriented so
    that the first channel that produces it is multiplied, and generators are numbered by their
    first producing channel in parameter order.
    """
    edges, links = _edge_table(ctx)
    part = _positive_parts(ctx.num_nodes, edges, links)
    comp, sign, conflicted, count = _signed_components(edges, links, part)
    if ctx.slice_links:  # slices picked by rows that depend on the data
        ctx.block_mismatched_gathers(_components_without_slice_links(edges, links, part))
    reason, reasons, group = _blocking_reasons(ctx, comp, conflicted, count, edges)
    names = [n for n, _ in model.named_parameters()]
    producers = [n for n in names if n in ctx.produced]
    oriented = sign * _orientation(ctx, producers, comp, sign, count)[comp]
    resolved: dict[str, list[tuple[Tensor, int]]] = {}
    has_in = torch.zeros(count, dtype=torch.bool)
    has_out = torch.zeros(count, dtype=torch.bool)
    for name in names:
        if ctx.roles.get(name):
            resolved[name] = _resolved_terms(ctx.roles[name], comp, oriented)
            _mark_sides_and_squares(resolved[name], has_in, has_out, reason, len(reasons) - 1)
    valid = (reason == UNBLOCKED) & has_in & has_out
    generator_of = _numbering(ctx, names, producers, comp, resolved, valid, count)
    num = int((generator_of >= 0).sum())
    params = _param_terms(ctx, names, resolved, generator_of)
    layers = [""] * num
    for name in reversed(producers):
        g = generator_of[comp[ctx.produced[name].reshape(-1)]]
        module = module_of(name)
        for n in g[g >= 0].unique().tolist():
            layers[n] = module
    kinds = _kinds(ctx, comp, generator_of, num)
    produced = {name: generator_of[comp[ctx.produced[name].reshape(-1)]] for name in producers}
    sharers = _sharers(ctx, producers, group)
    why = _Why(reason[comp], reasons, group, _mark_keys(ctx, group), sharers)
    exclusions = _exclusions(ctx, producers, comp, valid, why, has_out)
    in_out = _stored_in_out(model) & params.keys()
    types = {name: _class_name(module) for name, module in model.named_modules()}
    return GaugeStructure(
        num,
        params,
        exclusions,
        layers,
        kinds,
        produced,
        names,
        notes,
        in_out,
        aliases(model),
        types,
        {name: ctx.gain_channels[name] for name in producers if name in ctx.gain_channels},
    )


# Where FSDP2 defines the classes it swaps in for a sharded module's (``FSDPLinear``: a subclass
# of ``FSDPModule`` and ``Linear``), which a structure does not record.
SHARDING_CLASSES = "torch.distributed.fsdp"


def _class_name(module: nn.Module) -> str:
    """The name of ``module``'s class, FSDP2's sharded class looked through (``Linear`` for an
    ``FSDPLinear``): a model sharded since, or before, has the same modules."""
    sharded = (c.__module__.startswith(SHARDING_CLASSES) for c in type(module).__mro__)
    return next(c for c, s in zip(type(module).__mro__, sharded, strict=True) if not s).__name__


def _stored_in_out(model: nn.Module) -> frozenset[str]:
    """The ``weight`` s whose module type stores them ``[in, out]``: Hugging Face's ``Conv1D``
    (by its name: transformers is not imported) and embeddings."""
    return frozenset(
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding | nn.EmbeddingBag)
    )


def _blocking_reasons(
    ctx: TraceContext, comp: Tensor, conflicted: Tensor, count: int, edges: np.ndarray
) -> tuple[Tensor, list[str], Tensor]:
    """Per component, the index into ``reasons`` of why it is no generator (:data:`UNBLOCKED`:
    nothing blocks it yet); the last reason is the squared factor, which
    :func:`_mark_sides_and_squares` sets."""
    first_mark, reasons, group = _first_reason(ctx, comp, count, edges)
    reason = torch.where(first_mark == len(reasons), UNBLOCKED, first_mark)
    reasons.append("its log-factor would have to equal its own negative")
    reason[conflicted & (reason == UNBLOCKED)] = len(reasons) - 1
    reasons.append("a parameter entry would scale with the square of its factor")
    return reason, reasons, group


def _orientation(
    ctx: TraceContext, producers: list[str], comp: Tensor, sign: Tensor, count: int
) -> Tensor:
    """Per component, ``+1`` or ``-1``: the flip that makes its first producing channel
    multiplied."""
    flip = torch.zeros(count, dtype=torch.long)
    for name in reversed(producers):
        nodes = ctx.produced[name].reshape(-1).flip(0)
        flip[comp[nodes]] = sign[nodes]
    return torch.where(flip == 0, 1, flip)


def _mark_sides_and_squares(
    terms: list[tuple[Tensor, int]], has_in: Tensor, has_out: Tensor, reason: Tensor, square: int
) -> None:
    """Record which components a parameter's terms multiply (``has_in``) and divide
    (``has_out``) at some entry, where a term of the other sign does not cancel them (an entry
    carrying a component once with each sign does not move), and block (reason ``square``)
    those two terms of one sign name at one entry."""
    for i, (c, s) in enumerate(terms):
        moved = c >= 0
        for c2, s2 in terms:
            if s2 != s and share_components(c, c2):  # else c != c2 wherever c >= 0
                moved = moved & (c != c2)
        (has_in if s > 0 else has_out)[c.expand(moved.shape)[moved]] = True
        for c2, s2 in terms[i + 1 :]:
            if s2 == s and share_components(c, c2):  # else no entry names one twice
                squared = collisions(c, c2)
                reason[squared] = torch.clamp(reason[squared], max=square)


def _numbering(
    ctx: TraceContext,
    names: list[str],
    producers: list[str],
    comp: Tensor,
    resolved: dict[str, list[tuple[Tensor, int]]],
    valid: Tensor,
    count: int,
) -> Tensor:
    """The generator of each component (``[count + 1]``, ``-1``: none; the last is the slot of
    entries with no component): the valid components numbered by their first producing channel
    in parameter order, then by any other entry."""
    produced_comps = [comp[ctx.produced[n].reshape(-1)] for n in producers]
    any_comps = [c.reshape(-1) for n in names for c, _ in resolved.get(n, [])]
    order = torch.cat(produced_comps + any_comps) if any_comps else torch.zeros(0, dtype=torch.long)
    order = order[order >= 0]
    order = order[valid[order]]
    uniq, inverse = torch.unique(order, return_inverse=True)
    first = torch.full((len(uniq),), len(order)).scatter_reduce(
        0, inverse, torch.arange(len(order)), reduce="amin"
    )
    ranked = uniq[torch.argsort(first)]
    generator_of = torch.full((count + 1,), -1)
    generator_of[ranked] = torch.arange(len(ranked))
    return generator_of


def _param_terms(
    ctx: TraceContext,
    names: list[str],
    resolved: dict[str, list[tuple[Tensor, int]]],
    generator_of: Tensor,
) -> dict[str, ParamTerms]:
    """Each parameter some generator acts on, with its terms renumbered to generators
    (multiplying terms first)."""
    params: dict[str, ParamTerms] = {}
    for name in names:
        terms = [(generator_of[c], s) for c, s in resolved.get(name, [])]
        terms = cancel_opposite(terms)
        terms = [(compact(g), s) for g, s in terms if bool((g >= 0).any())]
        terms.sort(key=lambda term: -term[1])  # multiplying terms first, in a fixed order
        if terms:
            shape = tuple(ctx.params[name].shape)
            params[name] = ParamTerms(name, shape, tuple(Term(g.clone(), s) for g, s in terms))
    return params


class _Why(NamedTuple):
    """What explains an exclusion: per node, the index into ``reasons`` of why its component is
    no generator (:data:`UNBLOCKED`: nothing blocks it), its group (see :func:`_groups`), the
    marks on each group (see :func:`_mark_keys`), and the producing modules of each group (see
    :func:`_sharers`)."""

    reason: Tensor
    reasons: list[str]
    group: Tensor
    marks: Tensor
    sharers: tuple[Tensor, list[str]]


def _sharers(ctx: TraceContext, producers: list[str], group: Tensor) -> tuple[Tensor, list[str]]:
    """The producing modules (in parameter order) and, sorted, ``group * len(modules) +
    module`` for every group and module producing some of its channels."""
    modules = list(dict.fromkeys(module_of(name) for name in producers))
    index = {m: i for i, m in enumerate(modules)}
    keys = [
        group[ctx.produced[n].reshape(-1)] * len(modules) + index[module_of(n)] for n in producers
    ]
    return torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long), modules


def _shared_with(sharers: tuple[Tensor, list[str]], group: Tensor, own: Tensor) -> Tensor:
    """Per node of ``group`` (its group), ``[k, 2]``: the first module other than its own
    (``own``, ``[k]``: an index into the modules) that produces channels of the group (an index
    into the modules) and how many do."""
    keys, modules = sharers
    width = len(modules)
    lo = _sorted_positions(keys, group * width)
    total = _sorted_positions(keys, (group + 1) * width) - lo
    at = torch.where(keys[lo] % width == own, lo + 1, lo)
    return torch.stack([keys[at.clamp(max=len(keys) - 1)] % width, total - 1], 1)


def _shared_note(modules: list[str], other: int, count: int) -> str:
    """What an exclusion's reason adds when ``count`` other modules, the first ``other``,
    produce channels joined with the excluded ones ("" when none does)."""
    if count == 0:
        return ""
    more = f" and {count - 1} more layer{'s' if count > 2 else ''}" if count > 1 else ""
    return (
        f"; on channels shared with '{modules[other]}'{more} (outputs joined, e.g. by a "
        "residual sum)"
    )


def _exclusions(
    ctx: TraceContext,
    producers: list[str],
    comp: Tensor,
    valid: Tensor,
    why: _Why,
    has_out: Tensor,
) -> list[Exclusion]:
    """The producing channels that are no generators, grouped by module and reason (for gains
    per column or one for the whole weight: the output channels of their layer), and the
    rows of parameters fixed before they produced any channel. A channel blocked by a mark is
    explained by the first mark on its group at or after the op that produced it (the nearest
    op that blocks it), with the other modules producing channels of that group."""
    unblocked = [
        "not consumed by any parameter (its output is unused)",
        "no producing parameter",
    ]
    excluded: dict[tuple[str, str], set[int]] = {}
    node, owner, channel = _bad_channels(ctx, producers, comp, valid)
    explained = _explained(ctx, producers, comp, why, has_out, node, owner)
    for (p, k, other, count), channels in zip(*_row_groups(explained, channel), strict=True):
        text = why.reasons[k] if k < len(why.reasons) else unblocked[k - len(why.reasons)]
        text += _shared_note(why.sharers[1], other, count)
        if producers[p] in ctx.gain_channels:  # gains of one generator: all output channels
            channels = list(range(ctx.gain_channels[producers[p]]))
        excluded.setdefault((module_of(producers[p]), text), set()).update(channels)
    for name, reason in ctx.fixed.items():  # fixed before producing a channel: its rows
        if name not in ctx.produced:
            rows = ctx.params[name].shape[0] if ctx.params[name].dim() else 1
            excluded.setdefault((module_of(name), reason), set()).update(range(rows))
    return [Exclusion(m, r, tuple(sorted(ch))) for (m, r), ch in excluded.items()]


def _bad_channels(
    ctx: TraceContext, producers: list[str], comp: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Every producing channel that is no generator, producer after producer (``[k]`` each):
    its node, its producer (an index into ``producers``) and its index among that producer's
    channels."""
    if not producers:
        return (torch.zeros(0, dtype=torch.long),) * 3
    nodes = torch.cat([ctx.produced[name].reshape(-1) for name in producers])
    sizes = torch.tensor([ctx.produced[name].numel() for name in producers])
    owner = torch.repeat_interleave(torch.arange(len(producers)), sizes)
    channel = torch.arange(len(nodes)) - (torch.cumsum(sizes, 0) - sizes)[owner]
    bad = ~valid[comp[nodes]]
    return nodes[bad], owner[bad], channel[bad]


def _explained(
    ctx: TraceContext,
    producers: list[str],
    comp: Tensor,
    why: _Why,
    has_out: Tensor,
    node: Tensor,
    owner: Tensor,
) -> Tensor:
    """``[k, 4]``: per excluded channel (its ``node`` and ``owner``, an index into
    ``producers``), its producer, its reason (an index into ``why.reasons``, then the unused
    output and the missing producer; a mark: the nearest one at or after its producer's op),
    the first other module producing channels of its group and how many do."""
    width = len(ctx.marks) + 1
    start = torch.tensor([ctx.produced_at.get(name, 0) for name in producers], dtype=torch.long)
    index = {m: i for i, m in enumerate(why.sharers[1])}
    own = torch.tensor([index[module_of(name)] for name in producers], dtype=torch.long)
    group, r = why.group[node], why.reason[node]
    r = torch.where(r < width, _nearest_marks(why.marks, width, group, start[owner]), r)
    r = torch.where(r != UNBLOCKED, r, len(why.reasons) + has_out[comp[node]].long())
    shared = _shared_with(why.sharers, group, own[owner])
    return torch.cat([owner[:, None], r[:, None], shared], 1)


def _row_groups(rows: Tensor, values: Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """The distinct rows of ``rows`` (``[k, c]``, integers ``>= 0``) in the order of their
    first occurrence and, for each, the ``values`` (``[k]``) at the rows equal to it, in row
    order."""
    if not len(rows):
        return [], []
    ids, span = torch.zeros(len(rows), dtype=torch.long), 1  # equal where the rows agree so far
    for column in rows.T:
        size = int(column.max()) + 1
        if span * size > KEY_LIMIT:  # renumber both densely (below len(rows)): no overflow
            ids, column = (torch.unique(t, return_inverse=True)[1] for t in (ids, column))
            span, size = len(rows), len(rows)
        ids, span = ids * size + column, span * size
    _, ids, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    order = torch.argsort(ids, stable=True)  # by row, then by position
    first = order[counts.cumsum(0) - counts]
    ranked = torch.argsort(first).tolist()  # the distinct rows by first occurrence
    flat, bounds = values[order].tolist(), [0, *counts.cumsum(0).tolist()]
    return rows[first[ranked]].tolist(), [flat[bounds[g] : bounds[g + 1]] for g in ranked]


def _sorted_positions(keys: Tensor, values: Tensor) -> Tensor:
    """Per value (``[k]``), the number of the sorted ``keys`` below it (``torch.searchsorted``,
    through NumPy's, which is faster on the CPU)."""
    return torch.from_numpy(np.searchsorted(keys.numpy(), values.numpy()))


def _kinds(ctx: TraceContext, comp: Tensor, generator_of: Tensor, num: int) -> list[str]:
    """The kind of each generator: the most specific tag any of its nodes carries. A rotary
    pair is a query-key generator spanning dims a rearrangement united (``rotate_half``): a
    union of channels with a permutation of themselves elsewhere (``h + h.flip(1)`` in a CNN)
    is not one."""
    tagged = torch.zeros(num + 1, len(KINDS), dtype=torch.bool)
    tagged[:, KINDS.index("neuron")] = True
    for nodes, kind in ctx.tags:
        g = generator_of[comp[nodes]]
        tagged[torch.where(g < 0, num, g), KINDS.index(kind)] = True
    tagged[:, KINDS.index("rotary pair")] &= tagged[:, KINDS.index("query-key")]
    rank = tagged.to(torch.uint8).argmax(1)  # the first kind tagged
    return [KINDS[r] for r in rank[:num].tolist()]
