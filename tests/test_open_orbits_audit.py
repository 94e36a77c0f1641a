"""Audit of the open-group test (:func:`gaugefix.balancing.closed_orbits`) against an independent
oracle: a dense linear programme on the exponents of the entries with non-zero mass. ``F`` has a
minimiser with the generators ``fixed`` held at 0 iff no direction ``c`` (0 on ``fixed``) has
``W c <= 0`` with some entry ``< 0``."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from scipy import optimize, sparse
from torch import nn

import gaugefix
from gaugefix.balancing import open_generators

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
EXACT = 1e-12
SHIFT = 1e-9
STRICT = 0.5  # the LP's count of strictly shrinkable entries is an integer


def shrinkable(w: np.ndarray, fixed: np.ndarray) -> bool:
    """Whether some ``c`` (0 on ``fixed``) has ``w c <= 0`` with an entry ``< 0``."""
    m = w.shape[0]
    if m == 0:
        return False
    free = np.flatnonzero(~fixed)
    a = np.hstack([w[:, free], np.eye(m)])
    cost = np.r_[np.zeros(free.size), -np.ones(m)]
    bounds = [(None, None)] * free.size + [(0, 1)] * m
    res = optimize.linprog(cost, A_ub=a, b_ub=np.zeros(m), bounds=bounds, method="highs")
    assert res.success
    return -res.fun > STRICT


def random_rows(rng: np.random.Generator, n: int, graph: bool) -> np.ndarray:
    """Rows ``e_v - e_u`` (a side may be missing) or, not ``graph``, up to 3 signed terms."""
    rows = np.zeros((int(rng.integers(0, 14)), n))
    for row in rows:
        if graph:
            a, b = rng.integers(0, n, 2)
            kind = rng.integers(0, 3)
            row[a] += 1 if kind != 1 else -1
            row[b] -= 1 if kind == 2 else 0
        else:
            for t in rng.integers(0, n, int(rng.integers(1, 4))):
                row[t] += rng.choice([-1, 1])
    return rows


def components_held(w: np.ndarray, held: np.ndarray) -> int:
    """How many strong components of the edge graph (fixed node ``n``) ``held`` meets."""
    m, n = w.shape
    head, tail = np.full(m, n), np.full(m, n)
    for i, row in enumerate(w):
        head[i] = next(iter(np.flatnonzero(row > 0)), n)
        tail[i] = next(iter(np.flatnonzero(row < 0)), n)
    graph = sparse.csr_matrix((np.ones(m), (tail, head)), shape=(n + 1, n + 1))
    _, label = sparse.csgraph.connected_components(graph, connection="strong")
    return len(set(label[:n][held].tolist()))


def least_size(w: np.ndarray) -> int:
    """The size of a least set to hold for a minimiser (brute force)."""
    n = w.shape[1]
    for k in range(n + 1):
        for sub in itertools.combinations(range(n), k):
            fixed = np.zeros(n, dtype=bool)
            fixed[list(sub)] = True
            if not shrinkable(w, fixed):
                return k
    raise AssertionError("holding every generator leaves no direction")


@pytest.mark.parametrize("graph", [True, False])
def test_the_held_set_leaves_a_minimiser_and_is_least_in_components_on_graphs(graph):
    """Sound on every draw; on two-term rows one generator per held strong component is a least
    set (the held set is the union of those components, the least such union)."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        n = int(rng.integers(1, 7))
        w = random_rows(rng, n, graph)
        held = open_generators(sparse.csr_matrix(w.reshape(-1, n)), np.ones(n, dtype=bool))
        assert not shrinkable(w.reshape(-1, n), held)
        if graph:
            assert components_held(w.reshape(-1, n), held) == least_size(w.reshape(-1, n))


class GatedLoop(nn.Module):
    """A gated block applied twice (its output channels are its input's): the down
    projection's columns carry two generators, so the linear programme decides."""

    def __init__(self, width: int = 3, hidden: int = 2) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, width), nn.Linear(width, 2)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.block(torch.relu(self.a(x)))))
        return self.out(torch.relu(y))


def exponents(model: nn.Module, s) -> np.ndarray:
    """``W`` ``[E, N]`` of the entries with non-zero mass, read off the group action."""
    ones = {k: torch.ones(s.params[k].shape, dtype=D) for k in s.params}
    cols = []
    for n in range(s.num_generators):
        h = torch.zeros(s.num_generators, dtype=D)
        h[n] = 1.0
        out = gaugefix.coordinates.gauge_tensors(ones, s, h)
        cols.append(torch.cat([out[k].log().reshape(-1) for k in s.params]))
    bound = s.bind(model)
    mass = torch.cat([bound[k].detach().pow(2).reshape(-1) for k in s.params])
    return torch.stack(cols, 1).round()[mass > 0].numpy()


@pytest.mark.parametrize("seed", range(8))
def test_gated_loops_pruned_at_random_balance_to_a_start_free_point(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GatedLoop().to(D)
    x = torch.randn(5, 3, dtype=D, generator=gen)
    s = gaugefix.discover(model, x[:1])
    with torch.no_grad():
        for p in model.parameters():
            p[torch.rand(p.shape, generator=gen) < 0.5] = 0.0
    y = model(x).detach()
    first = copy.deepcopy(model)
    result = gaugefix.balance_(first, s, tol=1e-13, max_iter=200)
    dead = result.dead_generators.tolist()
    assert result.converged
    assert float((first(x) - y).abs().max()) <= EXACT * float(y.abs().max().clamp_min(1))
    held = np.zeros(s.num_generators, dtype=bool)
    held[dead] = True
    assert not shrinkable(exponents(model, s), held)
    h0 = torch.randn(s.num_generators, dtype=D, generator=gen)
    h0[dead] = 0.0
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h0)
    again = gaugefix.balance_(moved, s, tol=1e-13, max_iter=200)
    assert again.dead_generators.tolist() == dead and again.converged
    assert float((again.h + h0 - result.h).abs().max()) <= SHIFT
