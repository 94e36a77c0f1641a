"""``equalize_`` on models with dead generators and open groups (no closed orbit: a combination
of the group's generators shrinks every entry it touches). Every objective holds them at
``h = 0`` and reports them, keeps the function, and equalizes every point of an orbit (a gauge
that is 0 on the held generators) to the same parameters."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import optimize, sparse
from torch import Tensor, nn

import gaugefix
from gaugefix import balancing
from test_open_orbits import cycle, open_pair, open_triangle, x_in

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
EXACT = 1e-12  # the function, relative to the largest output
SAME = 1e-9  # the equalized parameters from two points of an orbit, relative


def open_cycle():
    """``tests/test_solver_audit.py``'s model: 0 and 1 read each other, only 0 is fed, neither
    is read; 2 is fed by nothing (dead alone)."""
    return cycle(3, [(0, 1), (1, 0)], fed=[0], read=[2])


MODELS = {"pair": open_pair, "triangle": open_triangle, "cycle": open_cycle}


def smooth(params: dict[str, Tensor]) -> Tensor:
    """A strictly convex callable objective: the sum of squares and fourth powers."""
    return sum((p.to(D) ** 2 + p.to(D) ** 4).sum() for p in params.values())


def run(make, objective):
    """The model, its structure, the keyword arguments, and the norm's dead generators."""
    model, s = make()
    kwargs = {"calibration": x_in()} if objective == "activation" else {}
    dead = gaugefix.balance_(copy.deepcopy(model), s).dead_generators.tolist()
    return model, s, kwargs, dead


def max_gap(a: nn.Module, b: nn.Module) -> float:
    top = max(float(q.detach().abs().max()) for q in b.parameters())
    gaps = [
        float((p - q).detach().abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    ]
    return max(gaps) / top


@pytest.mark.parametrize(
    "objective",
    ["range", "activation", smooth],
    ids=["range", "activation", "callable"],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_open_groups_are_held_reported_and_the_result_is_the_orbits(name, objective):
    model, s, kwargs, dead = run(MODELS[name], objective)
    x = x_in()
    with torch.no_grad():
        y = model(x)
    start = copy.deepcopy(model)
    result = gaugefix.equalize_(model, s, objective, **kwargs)
    held = result.dead_generators.tolist()
    assert set(dead) <= set(held), (dead, held)
    assert bool((result.h[held] == 0).all())
    assert result.converged
    with torch.no_grad():
        assert float((model(x) - y).abs().max()) <= EXACT * float(y.abs().max())
    for seed in range(2):
        h0 = torch.randn(s.num_generators, generator=torch.Generator().manual_seed(seed), dtype=D)
        h0[held] = 0.0
        moved = copy.deepcopy(start)
        gaugefix.apply_gauge_(moved, s, h0)
        again = gaugefix.equalize_(moved, s, objective, **kwargs)
        assert again.dead_generators.tolist() == held
        assert max_gap(moved, model) <= SAME


def test_a_callable_objective_holds_a_single_dead_generator():
    """A hidden neuron with no incoming weight: the callable minimises nothing along it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    s = gaugefix.discover(model, torch.randn(1, 3, dtype=D))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1].zero_()
    result = gaugefix.equalize_(model, s, smooth)
    assert result.dead_generators.tolist() == [1]
    assert result.h[1] == 0 and result.converged


def squared(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).mean()


def test_sharpness_refuses_the_zero_entries_of_an_open_group_and_changes_nothing():
    """An open group needs zero entries, which the top eigenvector loads on here: a clear
    refusal (the sharpness gradient cannot pass through them), the model untouched."""
    model, s = open_pair()
    x = x_in()
    target = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=D)
    objective = gaugefix.sharpness_objective(model, squared, (x,), target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="exactly zero entries"):
        gaugefix.equalize_(model, s, objective, tol=1e-6, max_iter=50)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_failing_linear_programme_holds_the_unresolved_generators(monkeypatch):
    """HiGHS failing must not count the generators it did not resolve as closed."""
    rows = sparse.csr_matrix(np.asarray([[1, -1, -1], [-1, 1, 0], [0, 1, -1]], dtype=np.float64))

    def failed(*args, **kwargs):
        return optimize.OptimizeResult(success=False, status=4, message="numerical difficulties")

    monkeypatch.setattr(optimize, "linprog", failed)
    with pytest.warns(RuntimeWarning, match="linear programme"):
        held = balancing._recession_supports(rows)
    assert held.tolist() == [True, True, True]
