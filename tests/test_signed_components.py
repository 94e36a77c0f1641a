"""The signed union-find of ``compile_structure`` against the plain double cover.

``_signed_components`` solves ``h_a = s h_b`` by first joining the nodes the ``s = 1``
equalities join and then solving the double cover on those parts; the reference here solves the
double cover on all ``2 n`` nodes directly. Both must give the same components (numbered by their
first node), the same signs and the same conflicted components, exactly. The groups of exclusion
reasons, the components without slice links, the gather pairings and the pairs ``union`` records
are checked against plain definitions the same way.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from gaugefix.structure.compilation import (
    _components_without_slice_links,
    _edge_table,
    _groups,
    _positive_parts,
    _signed_components,
)
from gaugefix.structure.context import TraceContext
from gaugefix.structure.gathers import gather_pairings
from gaugefix.structure.terms import share_components


def _reference(n: int, a: np.ndarray, b: np.ndarray, s: np.ndarray):
    """Components, signs and conflicts from the full double cover ``v+ = v``, ``v- = v + n``."""
    flip = np.where(s < 0, n, 0)
    rows, cols = np.concatenate([a, a + n]), np.concatenate([b + flip, b + n - flip])
    cover = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(2 * n, 2 * n))
    label = connected_components(cover, directed=False)[1]
    plus, minus = label[:n], label[n:]
    comp = np.full(n, -1)
    sign = np.zeros(n, np.int64)
    conflicted = []
    for v in range(n):  # nodes in order: the first node of a component is its root
        if comp[v] >= 0:
            continue
        same = (plus == plus[v]) | (minus == plus[v])
        comp[same] = len(conflicted)
        sign[same] = np.where(plus[same] == plus[v], 1, -1)
        conflicted.append(bool(plus[v] == minus[v]))
    return comp, sign, np.array(conflicted, dtype=bool)


@st.composite
def signed_graphs(draw):
    n = draw(st.integers(1, 12))
    count = draw(st.integers(0, 16))
    node = st.integers(0, n - 1)
    edges = draw(st.lists(st.tuples(node, node, st.sampled_from([1, -1])), min_size=count))
    blocks = [torch.tensor(edges, dtype=torch.long).T.reshape(3, -1)] if edges else []
    return n, blocks


def with_slice_links(graph, data) -> tuple[int, list[Tensor], SimpleNamespace]:
    """The graph's edges in blocks of a drawn size, some of them drawn as slice links."""
    n, blocks = graph
    blocks = [c for block in blocks for c in block.split(data.draw(st.integers(1, 4)), dim=1)]
    links = set(data.draw(st.lists(st.integers(0, max(len(blocks) - 1, 0)))) if blocks else set())
    return n, blocks, SimpleNamespace(num_nodes=n, edges=blocks, slice_links=links)


def solved(n: int, edges: np.ndarray, links: np.ndarray) -> tuple[Tensor, Tensor, Tensor, int]:
    return _signed_components(edges, links, _positive_parts(n, edges, links))


@settings(max_examples=300, deadline=None)
@given(signed_graphs(), st.data())
def test_signed_components_match_the_full_double_cover(graph, data):
    """Whichever edges are slice links (the parts leave them out, the cover adds them)."""
    n, blocks, ctx = with_slice_links(graph, data)
    comp, sign, conflicted, count = solved(n, *_edge_table(ctx))
    a, b, s = torch.cat(blocks, 1).numpy() if blocks else np.zeros((3, 0), np.int64)
    want_comp, want_sign, want_conflicted = _reference(n, a, b, s)
    assert comp.tolist() == want_comp.tolist()
    assert conflicted.tolist() == want_conflicted.tolist()
    assert count == len(want_conflicted)
    free = ~torch.from_numpy(want_conflicted)[comp]  # a conflicted component's signs are moot
    assert sign[free].tolist() == torch.from_numpy(want_sign)[free].tolist()


def _node_level(n: int, a: np.ndarray, b: np.ndarray, s: np.ndarray, part: np.ndarray):
    """Components, signs and conflicts read off the cover's labels node by node: ``v+`` and
    ``v-`` of every node, its root the first node with either label."""
    negative = s < 0
    k = int(part.max()) + 1 if n else 0
    whole = _plain_components(k, part[a[~negative]], part[b[~negative]])[part] if n else part
    k = int(whole.max()) + 1 if n else 0
    pa, pb = whole[a[negative]], whole[b[negative]]
    label = _plain_components(2 * k, np.r_[pa, pa + k], np.r_[pb + k, pb])
    plus, minus = label[whole], label[whole + k]
    comp, sign, conflicted = np.full(n, -1), np.ones(n, np.int64), []
    for v in range(n):
        if comp[v] < 0:
            same = (plus == plus[v]) | (plus == minus[v])
            comp[same] = len(conflicted)
            sign[same] = np.where(plus[same] == plus[v], 1, -1)
            conflicted.append(bool(plus[v] == minus[v]))
    return comp, sign, conflicted


@settings(max_examples=300, deadline=None)
@given(signed_graphs(), st.data())
def test_signed_components_per_part_match_the_labels_node_by_node(graph, data):
    """``_signed_components`` finds components and signs per whole part and reads them at the
    nodes: equal to reading them node by node, signs of conflicted components (all 1) too."""
    n, blocks, ctx = with_slice_links(graph, data)
    edges, links = _edge_table(ctx)
    part = _positive_parts(n, edges, links)
    comp, sign, conflicted, count = _signed_components(edges, links, part)
    joining = (edges[2] < 0) | links
    want_comp, want_sign, want_conflicted = _node_level(n, *(r[joining] for r in edges), part)
    assert comp.tolist() == want_comp.tolist()
    assert sign.tolist() == want_sign.tolist()
    assert conflicted.tolist() == want_conflicted
    assert count == len(want_conflicted)


def test_signed_components_solve_a_chain_with_a_negative_link_and_a_conflict():
    # h1 = h0, h2 = -h1, h3 = h2; h4 = -h5 and h5 = h4 (h4 = -h4: conflicted); h6 alone
    edges = torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 5, 4], [1, -1, 1, -1, 1]])
    comp, sign, conflicted, count = solved(7, edges.numpy(), np.zeros(5, bool))
    assert comp.tolist() == [0, 0, 0, 0, 1, 1, 2]
    assert sign[:4].tolist() == [1, 1, -1, -1]
    assert conflicted.tolist() == [False, True, False]
    assert count == 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-1, 9), min_size=1, max_size=12),
    st.lists(st.integers(-1, 9), min_size=1, max_size=12),
)
def test_share_components_is_a_common_component_of_the_two_maps(x, y):
    a, b = torch.tensor(x)[:, None], torch.tensor(y)[None, :]
    want = bool(set(x) & set(y) - {-1})
    assert share_components(a, b) is want
    assert share_components(b, a) is want


def _plain_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@settings(max_examples=300, deadline=None)
@given(signed_graphs(), st.data())
def test_groups_and_slice_links_match_components_of_the_whole_graph(graph, data):
    """The groups of ``_groups`` (components in node 0's component split on its own nodes and
    numbered among the other components' roots) equal the components of the whole graph without
    node 0's edges, numbered from ``count`` there; the components without the slice links
    (picked by block) equal those of the graph without them."""
    n, blocks, ctx = with_slice_links(graph, data)
    edges, is_link = _edge_table(ctx)
    comp, _, _, count = solved(n, edges, is_link)
    a, b, _ = edges
    off_zero = (a != 0) & (b != 0)
    sub = torch.from_numpy(_plain_components(n, a[off_zero], b[off_zero]))
    want = torch.where(comp == comp[0], count + sub, comp)
    assert _groups(comp, count, edges).tolist() == want.tolist()
    kept = [e for i, e in enumerate(blocks) if i not in ctx.slice_links]
    a, b, _ = torch.cat(kept, 1).numpy() if kept else np.zeros((3, 0), np.int64)
    without = _components_without_slice_links(edges, is_link, _positive_parts(n, edges, is_link))
    assert without.tolist() == _plain_components(n, a, b).tolist()


def _plain_pairings(comp, count, uses):
    """Per component, whether its (component, key) pairs name one key, and whether every
    (component, use entry) pair holds all positions of the use: counted over sorted pairs."""
    comps, keys, cells, sizes, offset = [], [], [], [], 0
    for nodes, key in uses:
        flat = nodes.reshape(key.numel(), -1)
        positions, entries = flat.shape
        comps.append(comp[flat].reshape(-1))
        keys.append(key.unsqueeze(1).expand(positions, entries).reshape(-1))
        cells.append(offset + torch.arange(entries).expand(positions, entries).reshape(-1))
        sizes.append(torch.full((positions * entries,), positions))
        offset += entries
    c, key, cell, size = (torch.cat(x) for x in (comps, keys, cells, sizes))
    span = int(key.max()) + 1
    one_key = torch.bincount(torch.unique(c * span + key) // span, minlength=count) == 1
    groups, inverse = torch.unique(c * offset + cell, return_inverse=True)
    members = torch.bincount(inverse, minlength=len(groups))
    group_size = torch.zeros(len(groups), dtype=torch.long).scatter_(0, inverse, size)
    every = torch.ones(count, dtype=torch.bool)
    every[groups[members < group_size] // offset] = False
    return one_key, every


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_gather_pairings_match_counting_sorted_pairs(data):
    count = data.draw(st.integers(1, 6))
    uses = []
    for _ in range(data.draw(st.integers(1, 3))):  # [positions, *entries], entries >= 1
        positions = data.draw(st.integers(1, 5))
        shape = (positions, *data.draw(st.lists(st.integers(1, 3), max_size=2)))
        size = int(np.prod(shape))
        nodes = data.draw(st.lists(st.integers(0, 11), min_size=size, max_size=size))
        key = data.draw(st.lists(st.integers(0, 4), min_size=positions, max_size=positions))
        uses.append((torch.tensor(nodes).reshape(shape), torch.tensor(key)))
    comp = torch.tensor(data.draw(st.lists(st.integers(0, count - 1), min_size=12, max_size=12)))
    got = gather_pairings(comp, count, uses)
    want = _plain_pairings(comp, count, uses)
    assert got[0].tolist() == want[0].tolist()
    assert got[1].tolist() == want[1].tolist()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_union_records_each_pair_once_with_or_without_sorting(data):
    """``union`` skips sorting the pairs where one side names each node once (its nodes are
    strictly increasing): the equalities recorded are the distinct pairs either way, and a
    pair with node 0 blocks its other node."""
    size = data.draw(st.integers(1, 8))
    nodes = st.lists(st.integers(0, 9), min_size=size, max_size=size)
    a, b = torch.tensor(data.draw(nodes)), torch.tensor(data.draw(nodes))
    if data.draw(st.booleans()):  # one side strictly increasing (fresh nodes)
        side = torch.arange(size) + data.draw(st.integers(0, 2))
        a, b = (side, b) if data.draw(st.booleans()) else (a, side)
    sign = data.draw(st.sampled_from([1, -1]))
    ctx = TraceContext(torch.nn.Linear(1, 1), ())
    ctx.num_nodes, ctx.op = 12, "op"
    ctx.union(a, b, sign)
    pairs = {(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True) if sign < 0 or x != y}
    recorded = torch.cat(ctx.edges, 1).T.tolist() if ctx.edges else []
    assert sorted(map(tuple, recorded)) == sorted((x, y, sign) for x, y in pairs)
    zero = {y if x == 0 else x for x, y in pairs if 0 in (x, y)} - {0}
    assert {v for m, _ in ctx.marks for v in m.tolist()} == zero
