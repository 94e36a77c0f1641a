"""Fourth audit of ``gauge_coordinates``, against ``balance_`` on a copy: the same balanced point
(``1e-10`` of each parameter's largest entry), the same ``h`` up to sign, the same dead
generators and open groups, ``g(h) . balanced`` the parameters entrywise to ``1e-12``; on random
gauges of random models (hypothesis), pruned models, open groups, frozen parameters; then entries
near float64's underflow and overflow, and bad input (one line, the model unchanged).

Regressions (each failed before its fix): a live neuron ``1e140`` or ``1e150`` above the rest
(``gauge_coordinates`` normalised the largest entry to ``[1/2, 1)``, where the balanced point's
smallest squares underflow: ``converged`` false, ``mu_rel_max = 1``, ``h`` 43 off, while
``balance_`` converged to ``3e-14``); a ``structure`` or ``model`` of the wrong type
(``AttributeError``); ``balance_`` outside float64's squares (unscaled: digits lost, live
generators dead, overflow refused), claiming convergence beyond ``tol`` where a live ``S_n`` is
subnormal, and a structure of the wrong type (``AttributeError``)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gaugefix as gf
from architectures import assert_same_bits, snapshot
from gaugefix import zoo
from test_coordinates_audit2 import MODELS, built
from test_open_orbits import closed_triangle, open_pair, open_triangle
from test_open_orbits_audit import GatedLoop

pytestmark = pytest.mark.usefixtures("single_thread")

DT = torch.float64
TOL = 1e-13  # both solves' tolerance
EXACT = 1e-10  # balanced against balance_'s point, of each parameter's largest |entry|
ROUND_TRIP = 1e-12  # g(h) . balanced against the parameters, entrywise relative
MAX_ITER = 100


def balanced_pair(model: nn.Module, s: gf.GaugeStructure):
    """``(coordinates, balance_ result, balance_'s model)``; ``model`` checked unchanged."""
    state = snapshot(model)
    coords = gf.gauge_coordinates(model, s, allow_dead=True, tol=TOL, max_iter=MAX_ITER)
    assert_same_bits(model, state)
    twin = copy.deepcopy(model)
    result = gf.balance_(twin, s, tol=TOL, max_iter=MAX_ITER)
    return coords, result, twin


def check_agree(model: nn.Module, s: gf.GaugeStructure) -> None:
    """The round trip, and ``gauge_coordinates`` is ``balance_``: point, ``h``, dead set,
    convergence."""
    coords, result, twin = balanced_pair(model, s)
    back = coords.to_state_dict()
    for k, t in model.state_dict().items():
        if t.is_floating_point():
            gap = (back[k] - t).abs()
            assert bool((gap <= ROUND_TRIP * t.abs()).all()), (k, float(gap.max()))
    assert coords.dead_generators.tolist() == result.dead_generators.tolist()
    assert coords.converged == result.converged
    assert bool(((coords.h + result.h).abs() <= EXACT).all())
    moved = twin.state_dict()
    for k in s.params:
        size = float(moved[k].abs().max())
        assert float((coords.balanced[k] - moved[k]).abs().max()) <= EXACT * size, k


def pruned_gated_loop(seed: int) -> tuple[nn.Module, gf.GaugeStructure]:
    """``GatedLoop`` with half its entries zeroed at random: dead generators and open groups
    decided by the linear programme."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GatedLoop().to(DT)
    s = gf.discover(model, torch.randn(1, 3, dtype=DT, generator=gen))
    with torch.no_grad():
        for p in model.parameters():
            p[torch.rand(p.shape, generator=gen) < 0.5] = 0.0
    return model, s


def cnn() -> tuple[nn.Module, gf.GaugeStructure]:
    torch.manual_seed(0)
    model = zoo.cnn().double().eval()
    return model, gf.discover(model, torch.randn(1, 3, 16, 16, dtype=DT))


def damage_(model: nn.Module, gen: torch.Generator, zeros: float, frozen: bool) -> None:
    """Zero a fraction ``zeros`` of every parameter's entries; freeze one parameter."""
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p[torch.rand(p.shape, generator=gen) < zeros] = 0.0
    if frozen:
        params[int(torch.randint(len(params), (1,), generator=gen))].requires_grad_(False)


# -- (a), (b): random models and gauges -------------------------------------------------------
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(MODELS)),
    seed=st.integers(0, 2**16),
    gauge=st.sampled_from([0.5, 2.0, 4.0]),
    zeros=st.sampled_from([0.0, 0.0, 0.2, 0.5]),
    frozen=st.booleans(),
)
def test_coordinates_are_balance_on_random_gauges_of_damaged_models(
    name, seed, gauge, zeros, frozen
):
    model, s = built(name, seed % 97, gauge)
    damage_(model, torch.Generator().manual_seed(seed), zeros, frozen)
    check_agree(model, s)


@pytest.mark.parametrize(
    "make",
    [open_pair, open_triangle, closed_triangle, cnn]
    + [lambda seed=seed: pruned_gated_loop(seed) for seed in range(6)],
    ids=["open_pair", "open_triangle", "closed_triangle", "cnn"]
    + [f"gated_loop{seed}" for seed in range(6)],
)
def test_open_groups_dead_neurons_and_convolutions_agree_with_balance(make):
    model, s = make()
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(3))
    check_agree(model, s)


# -- (c): entries near float64's underflow and overflow ---------------------------------------
def scaled_neuron(factor: float, whole: float = 1.0) -> tuple[nn.Module, gf.GaugeStructure]:
    """The MLP of ``built("mlp")`` times ``whole``, its neuron 1 (in and out) times ``factor``."""
    model, s = built("mlp")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(whole)
        for t in (model[0].weight[1], model[0].bias[1:2], model[2].weight[:, 1]):
            t.mul_(factor)
    return model, s


@pytest.mark.parametrize("factor", [1e100, 1e140, 1e150, 1e-140, 1e-170, 1e-230, 1e-300])
def test_a_neuron_far_from_the_rest_is_balanced_as_balance_does(factor):
    """Neuron 1 at ``1e-300`` to ``1e150`` of the rest: both solve it or both hold it dead
    (its squares underflow below ``1e-162``). Before the fix, from ``1e140`` up
    ``gauge_coordinates`` brought the largest entry to ``[1/2, 1)``, where the balanced point's
    smallest squares underflow: ``converged`` false with ``mu_rel_max = 1`` and ``h`` 43 off
    (``35`` at ``1e150``), ``balanced`` ``7e18`` of a parameter's largest entry off."""
    check_agree(*scaled_neuron(factor))


@pytest.mark.parametrize("whole", [1e-100, 1e100, 1e150])
def test_a_scaled_model_with_its_squares_in_range_agrees(whole):
    check_agree(*scaled_neuron(1.0, whole))


def one_entry(value: float) -> tuple[nn.Module, gf.GaugeStructure]:
    """The MLP of ``built("mlp")`` with ``2.weight[0, 0] = value``."""
    model, s = built("mlp")
    with torch.no_grad():
        model[2].weight[0, 0] = value
    return model, s


@pytest.mark.parametrize(
    "make",
    [
        lambda: scaled_neuron(1.0, 1e-160),
        lambda: scaled_neuron(1.0, 1e-200),
        lambda: scaled_neuron(1.0, 1e-300),
        lambda: scaled_neuron(1.0, 1e160),
        lambda: scaled_neuron(1.0, 1e300),
        lambda: scaled_neuron(1e-120, 1e-100),
        lambda: one_entry(1e160),
        lambda: one_entry(1e200),
    ],
    ids=[
        "1e-160",
        "1e-200",
        "1e-300",
        "1e160",
        "1e300",
        "neuron1e-220",
        "entry1e160",
        "entry1e200",
    ],
)
def test_models_beyond_float64s_squares_agree_with_balance(make):
    model, s = make()
    coords = gf.gauge_coordinates(model, s, tol=TOL, max_iter=MAX_ITER)
    assert coords.converged and coords.mu_rel_max <= TOL  # solved, so balance_ is the xfail
    check_agree(model, s)


@pytest.mark.parametrize("factor", [1e-156, 1e-158])
def test_balance_claims_convergence_only_within_tol(factor):
    model, s = scaled_neuron(factor)
    coords, result, _ = balanced_pair(model, s)
    assert not coords.converged
    assert not result.converged or result.mu_rel_max <= TOL


@pytest.mark.parametrize("value", [1e300, 1e250])
def test_one_entry_near_overflow_is_refused_by_both(value):
    """One weight of ``1e300`` (``1e250``) among entries near 1: its square overflows float64,
    and scaled to where it does not, the other entries' squares underflow. Both refuse it
    naming both (``gauge_coordinates`` with ``allow_dead`` too: the generators are live, not
    dead), one line, nothing changed."""
    model, s = one_entry(value)
    state = snapshot(model)
    with pytest.raises(ValueError, match="overflow float64.*underflow") as balance_error:
        gf.balance_(model, s)
    with pytest.raises(ValueError, match="overflow float64.*underflow") as coords_error:
        gf.gauge_coordinates(model, s, allow_dead=True)
    assert "\n" not in str(balance_error.value) + str(coords_error.value)
    assert_same_bits(model, state)


# -- (d): bad input ----------------------------------------------------------------------------
BAD = [
    ({"tol": 0.0}, ValueError, "tol must be"),
    ({"tol": float("nan")}, ValueError, "tol must be"),
    ({"tol": "1e-10"}, ValueError, "tol must be"),
    ({"max_iter": -1}, ValueError, "max_iter must be"),
    ({"max_iter": 1.5}, ValueError, "max_iter must be"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_tolerances_are_one_line_for_both(kwargs, error, match):
    model, s = built("gpt")
    state = snapshot(model)
    for call in (gf.gauge_coordinates, gf.balance_):
        with pytest.raises(error, match=match) as info:
            call(model, s, **kwargs)
        assert "\n" not in str(info.value)
        assert_same_bits(model, state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_one_line_for_both(bad):
    model, s = built("gated")
    with torch.no_grad():
        model.down.weight[0, 1] = bad
    state = snapshot(model)
    for call in (gf.gauge_coordinates, gf.balance_):
        with pytest.raises(ValueError, match="'down.weight' contains NaN or inf"):
            call(model, s)
        assert_same_bits(model, state)


def test_a_structure_of_another_model_or_of_no_model_is_refused():
    """Before the fix ``structure=None`` was ``AttributeError: 'NoneType' object has no
    attribute 'bind'``, and a dict of tensors as the model ``AttributeError`` on
    ``state_dict``."""
    model, s = built("mlp")
    _, other = built("gated")
    state = snapshot(model)
    with pytest.raises(ValueError, match="structure does not match"):
        gf.gauge_coordinates(model, other)
    with pytest.raises(TypeError, match="structure must be a GaugeStructure, got NoneType"):
        gf.gauge_coordinates(model, None)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        gf.gauge_coordinates(dict(model.named_parameters()), s)
    assert_same_bits(model, state)


def test_balance_refuses_a_structure_of_no_model_clearly():
    model, s = built("mlp")
    with pytest.raises((TypeError, ValueError)):
        gf.balance_(model, None)
