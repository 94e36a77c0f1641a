"""A gauge move rounds each moved entry as its product rounds (a subnormal moved below half
the smallest subnormal becomes 0, as in any product); an all-frozen ``equalize_`` reports the
objective held."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gaugefix

# The smallest subnormal of each dtype (the entries a factor below 1/2 rounds to 0).
SMALLEST = {torch.float64: 5e-324, torch.float32: 1e-45}


def smallest(dtype: torch.dtype) -> float:
    """:data:`SMALLEST` as ``dtype`` holds it (float32's is ``2^-149``)."""
    return torch.tensor(SMALLEST[dtype], dtype=dtype).item()


def chain(dtype: torch.dtype) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    """A 3-4-2 ReLU chain without biases in ``dtype``, and its structure (one generator per
    hidden neuron: generator 0 scales row 0 of ``0.weight`` and column 0 of ``2.weight``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    model = model.to(dtype)
    structure = gaugefix.discover(model, torch.randn(5, 3, dtype=dtype))
    assert structure.num_generators == 4
    return model, structure


def lopsided(dtype: torch.dtype) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    """:func:`chain` with hidden neuron 0 reading ``[1, d, 1]`` (``d`` the smallest subnormal)
    and written out by ``1e-3``: every balance moves its row down by about ``0.03``."""
    model, structure = chain(dtype)
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, SMALLEST[dtype], 1.0], dtype=dtype)
        model[2].weight[:, 0] = 1e-3
    return model, structure


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def down(structure: gaugefix.GaugeStructure, factor: float) -> torch.Tensor:
    """``h`` moving hidden neuron 0 by ``factor`` (its row times it, its column divided)."""
    h = torch.zeros(structure.num_generators, dtype=torch.float64)
    h[0] = math.log(factor)
    return h


@pytest.mark.parametrize("dtype", list(SMALLEST))
def test_a_subnormal_row_moved_below_half_rounds_to_zero_as_the_product_does(dtype):
    """A moved entry is the product rounded to its dtype: ``d * 0.4`` lies below half the
    smallest subnormal ``d``, and rounds to 0 (no refusal: it is the correctly rounded value)."""
    model, structure = chain(dtype)
    with torch.no_grad():
        model[0].weight[0] = SMALLEST[dtype]
    gaugefix.apply_gauge_(model, structure, down(structure, 0.4))
    want = (torch.full((3,), smallest(dtype), dtype=torch.float64) * 0.4).to(dtype)
    assert torch.equal(model[0].weight[0], want) and bool((want == 0).all())


@pytest.mark.parametrize("dtype", list(SMALLEST))
@pytest.mark.parametrize("factor", [0.6, 3.0])
def test_a_subnormal_row_moved_by_a_factor_above_half_keeps_its_entries(dtype, factor):
    """A factor above 1/2 keeps a subnormal nonzero (moved as the per-entry product rounds
    it)."""
    model, structure = chain(dtype)
    with torch.no_grad():
        model[0].weight[0] = SMALLEST[dtype]
    gaugefix.apply_gauge_(model, structure, down(structure, factor))
    want = torch.full((3,), smallest(dtype), dtype=torch.float64) * factor
    assert torch.equal(model[0].weight[0], want.to(dtype))
    assert bool((model[0].weight[0] != 0).all())


@pytest.mark.parametrize("dtype", list(SMALLEST))
def test_an_entry_moved_into_the_subnormal_range_but_not_to_zero_is_moved(dtype):
    """A normal entry moved below the normal range is the rounded product."""
    model, structure = chain(dtype)
    tiny = torch.finfo(dtype).tiny
    with torch.no_grad():
        model[0].weight[0, 1] = tiny
    factor = 2.0**-10
    gaugefix.apply_gauge_(model, structure, down(structure, factor))
    assert model[0].weight[0, 1].item() == tiny * factor != 0


@pytest.mark.parametrize("dtype", list(SMALLEST))
def test_every_move_rounds_a_subnormal_entry_as_its_product(dtype):
    """balance_, equalize_ ("range") and relax_ move the row ``[1, d, 1]`` down by about 0.03
    (``d`` the smallest subnormal): its middle entry rounds to 0, the others are balanced."""
    calls = {
        "balance_": lambda m, s: gaugefix.balance_(m, s),
        "equalize_": lambda m, s: gaugefix.equalize_(m, s, "range"),
        "relax_": lambda m, s: gaugefix.relax_(m, s, 1e6),
    }
    for name, call in calls.items():
        model, structure = lopsided(dtype)
        call(model, structure)
        row = model[0].weight[0]
        assert row[1].item() == 0.0 and 0 < row[0].item() < 0.1, name


def test_gradients_and_optimizer_state_may_round_to_zero():
    """A subnormal gradient moved by a factor above 2 (power -1) rounds to 0 too."""
    model, structure = chain(torch.float64)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.grad[0] = SMALLEST[torch.float64]
    gaugefix.apply_gauge_(model, structure, down(structure, 4.0))
    assert bool((model[0].weight.grad[0] == 0).all())


def frozen_chain() -> tuple[nn.Module, gaugefix.GaugeStructure, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, structure, x


def test_all_frozen_norm_reports_the_norm_held():
    """Before: objective_before = objective_after = 0.0 (the empty sum over no moved
    parameter), where the norm over the parameters the structure acts on is 2.0095."""
    model, structure, _ = frozen_chain()
    want = sum(
        float(p.square().sum()) for p in structure.bind(model).values()
    )  # every parameter the structure acts on, frozen
    before = snapshot(model)
    result = gaugefix.equalize_(model, structure, "norm")
    assert_unchanged(model, before)
    assert math.isclose(result.objective_before, want, rel_tol=1e-14)
    assert result.objective_after == result.objective_before
    assert result.movable == 0


def test_partly_frozen_norm_counts_the_frozen_parameters_too():
    """Generators touching only unfrozen parameters move; the norm is over every parameter
    the structure acts on (the frozen last layer's squares included, unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)
    ).double()
    structure = gaugefix.discover(model, torch.randn(8, 3, dtype=torch.float64))
    model[4].weight.requires_grad_(False)
    want = sum(float(p.detach().square().sum()) for p in structure.bind(model).values())
    result = gaugefix.equalize_(model, structure, "norm")
    assert math.isclose(result.objective_before, want, rel_tol=1e-14)
    after = sum(float(p.detach().square().sum()) for p in structure.bind(model).values())
    assert math.isclose(result.objective_after, after, rel_tol=1e-12)
    assert result.movable == 4


@pytest.mark.parametrize("objective", ["range", "activation"])
def test_all_frozen_max_balance_says_nothing_was_movable(objective):
    model, structure, x = frozen_chain()
    before = snapshot(model)
    kw = {"calibration": x} if objective == "activation" else {}
    result = gaugefix.equalize_(model, structure, objective, **kw)
    assert_unchanged(model, before)
    assert result.movable == 0 and result.objective_before == result.objective_after == 0.0
    assert torch.equal(result.dead_generators, torch.arange(structure.num_generators))


def test_range_counting_no_weight_the_generators_touch_says_nothing_was_movable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    structure = gaugefix.discover(model, torch.randn(8, 3, dtype=torch.float64))
    result = gaugefix.equalize_(model, structure, "range", weights=["0.bias"])
    assert result.movable == 0 and not bool(result.h.any())


class MyRMSprop(torch.optim.RMSprop):
    """A subclass: it may read its settings otherwise, so its state is not taken."""


class MyAdam(torch.optim.Adam):
    """A subclass of Adam: refused only once it holds state (at the first orbit step)."""


def test_exact_mode_refuses_optimizers_by_one_decision():
    """torch's RMSprop is taken (momentum 0), a subclass of it refused at construction naming
    its base, a subclass of Adam not (as before the decision moved)."""
    model, structure = chain(torch.float64)
    gaugefix.GaugeFixing(torch.optim.RMSprop(model.parameters()), model, structure, 1.0, every=1)
    with pytest.raises(ValueError, match=r"state \(square_avg\) of RMSprop, made at its first"):
        gaugefix.GaugeFixing(MyRMSprop(model.parameters()), model, structure, 1.0, every=1)
    gaugefix.GaugeFixing(MyAdam(model.parameters()), model, structure, 1.0, every=1)
