"""Groups of live generators without a closed orbit: every generator of the group has both sides
non-zero, yet a combination ``c`` of them scales every entry it touches down (``e_p . c <= 0``
for every entry with non-zero mass, ``< 0`` for some), so ``F(h)`` decreases forever along
``c``. ``balance_`` and ``gauge_coordinates`` report them with the dead generators (``h = 0``).

The models apply one ``Linear`` twice (``loop``), so that its output channel ``j`` shares the
generator of ``a``'s: ``loop.weight[i, j]`` has exponent ``h_i - h_j``, ``a.weight[i]`` ``+h_i``
and ``out.weight[:, j]`` ``-h_j``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import sparse
from torch import Tensor, nn

import gaugefix
from gaugefix.balancing import masses_of, open_generators, solve_balance

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
TOL = 1e-10
EXACT = 1e-12


class Cycle(nn.Module):
    """``out(relu(loop(relu(loop(relu(a(x)))))))`` with ``width`` channels."""

    def __init__(self, width: int, outputs: int = 2) -> None:
        super().__init__()
        self.a, self.loop = nn.Linear(4, width), nn.Linear(width, width)
        self.out = nn.Linear(width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.loop(torch.relu(self.a(x))))
        return self.out(torch.relu(self.loop(h)))


def cycle(width: int, links: list[tuple[int, int]], fed: list[int], read: list[int], outputs=2):
    """Channels linked by ``loop.weight[i, j] = 1`` for ``(i, j)`` in ``links``; ``a`` feeds
    only the channels ``fed``, ``out`` reads only the channels ``read`` (all others zero)."""
    torch.manual_seed(0)
    model = Cycle(width, outputs).to(D)
    s = gaugefix.discover(model, torch.randn(1, 4, dtype=D))
    assert s.num_generators == width
    with torch.no_grad():
        for p in (model.a.weight, model.a.bias, model.loop.weight, model.loop.bias):
            p.zero_()
        model.a.weight[fed] = torch.randn(len(fed), 4, dtype=D)
        for i, j in links:
            model.loop.weight[i, j] = 1.0 + i
        keep = torch.zeros(width, dtype=torch.bool)
        keep[read] = True
        model.out.weight[:, ~keep] = 0.0
    return model, s


def open_pair():
    """Generators 0 and 1 read each other; only 0 is fed, neither is read: open along (-1, -1).
    Generator 2 is an ordinary fed and read channel."""
    return cycle(3, [(0, 1), (1, 0)], fed=[0, 2], read=[2])


def open_triangle():
    """0 -> 1 -> 2 -> 0 (``loop.weight[1, 0]`` etc.), fed at 0, read nowhere: open along
    (-1, -1, -1). Generator 3 ordinary."""
    return cycle(4, [(1, 0), (2, 1), (0, 2)], fed=[0, 3], read=[3])


def closed_triangle():
    """The same triangle, but channel 2 is also read by ``out``: a closed orbit."""
    return cycle(4, [(1, 0), (2, 1), (0, 2)], fed=[0, 3], read=[2, 3])


def x_in() -> Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=D)


def balanced_check(model, s, result, dead: list[int]) -> None:
    """The reported dead generators, ``h = 0`` on them, the rest balanced by hand to ``tol``."""
    assert result.dead_generators.tolist() == dead
    assert bool((result.h[dead] == 0).all())
    assert result.converged and result.mu_rel_max <= TOL
    s_in, s_out = gaugefix.moment.in_out_sums({k: v.detach() for k, v in s.bind(model).items()}, s)
    keep = torch.ones(s.num_generators, dtype=torch.bool)
    keep[dead] = False
    ratio = ((s_in - s_out).abs() / (s_in + s_out))[keep]
    assert float(ratio.max()) <= TOL


@pytest.mark.parametrize(("make", "group"), [(open_pair, [0, 1]), (open_triangle, [0, 1, 2])])
def test_an_open_group_is_reported_kept_at_zero_and_the_rest_balanced(make, group):
    model, s = make()
    s_in, s_out = gaugefix.moment.in_out_sums(dict(s.bind(model)), s)
    assert bool(((s_in > 0) & (s_out > 0))[group].all())  # no single dead generator
    x = x_in()
    y = model(x).detach()
    result = gaugefix.balance_(model, s)
    balanced_check(model, s, result, group)
    assert float((model(x).detach() - y).abs().max()) <= EXACT * float(y.abs().max())


@pytest.mark.parametrize(("make", "group"), [(open_pair, [0, 1]), (open_triangle, [0, 1, 2])])
def test_coordinates_refuse_an_open_group_and_keep_it_at_zero_when_allowed(make, group):
    model, s = make()
    with pytest.raises(ValueError, match="closed orbit"):
        gaugefix.gauge_coordinates(model, s)
    first = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    assert first.converged and first.dead_generators.tolist() == group
    assert bool((first.h[group] == 0).all())
    # invariance under gauges that are 0 on the group (documented for dead generators)
    h0 = torch.zeros(s.num_generators, dtype=D)
    h0[-1] = 1.5
    gaugefix.apply_gauge_(model, s, h0)
    second = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    assert float((second.h - first.h - h0).abs().max()) <= 1e-10


def test_a_closed_group_that_looks_similar_is_balanced_from_any_start():
    model, s = closed_triangle()
    reference = copy.deepcopy(model)
    gaugefix.balance_(reference, s, tol=1e-13, max_iter=100)
    for seed in range(3):
        moved = copy.deepcopy(model)
        h0 = 2.0 * torch.randn(s.num_generators, generator=torch.Generator().manual_seed(seed))
        gaugefix.apply_gauge_(moved, s, h0.to(D))
        result = gaugefix.balance_(moved, s, tol=1e-13, max_iter=100)
        assert result.dead_generators.numel() == 0 and result.converged
        for p, q in zip(moved.parameters(), reference.parameters(), strict=True):
            assert float((p - q).detach().abs().max()) <= 1e-10 * float(q.detach().abs().max())


@pytest.mark.parametrize("value", [0.0, 1e-170])  # a square below float64's range counts as 0
def test_a_group_open_only_because_of_one_zero_weight(value):
    model, s = cycle(4, [(1, 0), (2, 1), (0, 2)], fed=[0, 3], read=[2, 3], outputs=1)
    closed = gaugefix.balance_(copy.deepcopy(model), s)
    assert closed.dead_generators.numel() == 0 and closed.converged
    with torch.no_grad():
        model.out.weight[0, 2] = value  # the group's only reader
    balanced_check(model, s, gaugefix.balance_(model, s), [0, 1, 2])


def test_a_neuron_fed_only_by_a_dead_one_stays_live():
    """Only the minimal set is fixed: with the dead neuron at ``h = 0`` its reader, fed by it
    alone, has a closed orbit (the existing rule for single dead generators)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = model.to(D)
    s = gaugefix.discover(model, torch.randn(1, 3, dtype=D))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1].zero_()
        model[2].weight[1].zero_()  # generator 4 + 1 = 5 ...
        model[2].bias[1].zero_()
        model[2].weight[1, 1] = 2.0  # ... fed by the dead generator 1 only
    balanced_check(model, s, gaugefix.balance_(model, s), [1])


def test_copies_are_told_apart():
    """``solve_balance`` on two stacked copies: the group is open in one only."""
    opened, s = open_triangle()
    closed, _ = closed_triangle()
    params = [s.bind(m) for m in (opened, closed)]
    tensors = {k: torch.stack([p[k].detach() for p in params]) for k in params[0]}
    solution = solve_balance(gaugefix.masses.Masses(tensors, s))
    assert solution.live.tolist() == [[False, False, False, True], [True] * 4]
    assert bool(solution.converged.all())
    assert bool((solution.h[0, :3] == 0).all())
    alone = solve_balance(masses_of(s.bind(closed), s))
    assert float((alone.h[0] - solution.h[1]).abs().max()) <= 1e-12


def rows_of(dense: list[list[int]]):
    return sparse.csr_matrix(np.asarray(dense, dtype=np.float64))


def test_entries_with_more_than_two_terms_go_through_the_linear_programme():
    """``e_0 - e_1 - e_2`` (an entry read through two generators): ``c = (t, 0, t)`` moves no
    entry (a stabiliser, no open group) until the entry ``-e_2`` makes ``t > 0`` shrink it."""
    closed = [[0, 1, 0], [0, -1, 0], [1, -1, -1], [-1, 0, 1]]
    live = np.ones(3, dtype=bool)
    assert open_generators(rows_of(closed), live).tolist() == [False] * 3
    opened = open_generators(rows_of([*closed, [0, 0, -1]]), live)
    assert opened.tolist() == [True, False, True]


def test_graph_rows_fix_only_sources_and_sinks_not_stabilisers():
    """Edges ``0 -> 1 -> 2`` from the fixed node (``+e_0``) with ``1 -> fixed``: 2 is a sink
    (open), 0 and 1 lie on a cycle through the fixed node; 3 <-> 4 is isolated (a stabiliser)."""
    rows = [[1, 0, 0, 0, 0], [-1, 1, 0, 0, 0], [0, -1, 1, 0, 0], [0, -1, 0, 0, 0],
            [0, 0, 0, 1, -1], [0, 0, 0, -1, 1]]  # fmt: skip
    found = open_generators(rows_of(rows), np.ones(5, dtype=bool))
    assert found.tolist() == [False, False, True, False, False]
