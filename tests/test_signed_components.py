"""The signed union-find of ``compile_structure`` against the plain double cover.

``_signed_components`` solves ``h_a = s h_b`` by first joining the nodes the ``s = 1``
equalities join and then solving the double cover on those parts; the reference here solves the
double cover on all ``2 n`` nodes directly. Both must give the same components (numbered by their
first node), the same signs and the same conflicted components, exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from gaugefix.structure.gauge_structure import _share_components, _signed_components


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


@settings(max_examples=300, deadline=None)
@given(signed_graphs())
def test_signed_components_match_the_full_double_cover(graph):
    n, blocks = graph
    ctx = SimpleNamespace(num_nodes=n, edges=blocks)
    comp, sign, conflicted, count = _signed_components(ctx)
    a, b, s = blocks[0].numpy() if blocks else np.zeros((3, 0), np.int64)
    want_comp, want_sign, want_conflicted = _reference(n, a, b, s)
    assert comp.tolist() == want_comp.tolist()
    assert conflicted.tolist() == want_conflicted.tolist()
    assert count == len(want_conflicted)
    free = ~torch.from_numpy(want_conflicted)[comp]  # a conflicted component's signs are moot
    assert sign[free].tolist() == torch.from_numpy(want_sign)[free].tolist()


def test_signed_components_solve_a_chain_with_a_negative_link_and_a_conflict():
    # h1 = h0, h2 = -h1, h3 = h2; h4 = -h5 and h5 = h4 (h4 = -h4: conflicted); h6 alone
    edges = torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 5, 4], [1, -1, 1, -1, 1]])
    comp, sign, conflicted, count = _signed_components(SimpleNamespace(num_nodes=7, edges=[edges]))
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
    assert _share_components(a, b) is want
    assert _share_components(b, a) is want
