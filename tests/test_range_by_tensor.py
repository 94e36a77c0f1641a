"""The per-tensor range bound of the float16 orbit step (``gaugefix.action.in_range_by_tensor``):
its exponent bounds are those of ``overflowing`` for every parameter at once, every entry's
exponent lies between them, and the bound is never looser than ``overflowing`` nor tighter than
the cheap bound ``in_range_bound``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugefix
from gaugefix.action import (
    exponent_bounds,
    in_range_bound,
    in_range_by_tensor,
    optimizer_states,
    overflowing,
    transport_targets,
)
from test_action_audit2 import model_and_input

D = torch.float64
EXACT = 1e-12
MODELS = ["mlp", "cnn", "transformer"]


def discovered(name: str) -> tuple[torch.nn.Module, gaugefix.GaugeStructure]:
    model, x = model_and_input(name)
    return model, gaugefix.discover(model, x)


def entry_exponents(structure, name: str, h: torch.Tensor) -> torch.Tensor:
    """``sum_t sign_t h[slot_t(e)]`` for every entry of parameter ``name`` (float64, dummy
    slot 0), term by term from the structure's own maps."""
    hx = torch.cat([h, h.new_zeros(1)])
    param = next(p for p in structure.plan("cpu") if p.name == name)
    total = torch.zeros(param.shape, dtype=D)
    for term in param.terms:
        total = total + term.sign * hx[term.slots]
    return total


def term_sums(structure, name: str, h: torch.Tensor) -> tuple[float, float]:
    """``overflowing``'s sums of each term's largest exponent, up and down (power 1)."""
    hx = torch.cat([h, h.new_zeros(1)])
    param = next(p for p in structure.plan("cpu") if p.name == name)
    xs = [term.sign * hx[term.slots] for term in param.terms]
    return sum(float(x.amax().clamp_min(0)) for x in xs), sum(
        float((-x).amax().clamp_min(0)) for x in xs
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exponent_bounds_are_overflowings_sums_and_bound_every_entry(name, seed):
    """Per parameter ``(U, D)`` equal ``overflowing``'s per-term sums to 1e-12, every entry's
    exponent lies in ``[-D, U]``, and where the terms vary along different dims (an MLP's
    weights: rows and columns) the largest and smallest entries' exponents reach them."""
    model, structure = discovered(name)
    h = torch.randn(
        structure.num_generators, dtype=D, generator=torch.Generator().manual_seed(seed)
    )
    bounds = exponent_bounds(structure, h)
    assert bounds.shape == (len(structure.params), 2) and bounds.dtype == D
    for k, name_k in enumerate(structure.params):
        up, down = bounds[k].tolist()
        expected = term_sums(structure, name_k, h)
        assert abs(up - expected[0]) <= EXACT * (1 + expected[0])
        assert abs(down - expected[1]) <= EXACT * (1 + expected[1])
        x = entry_exponents(structure, name_k, h)
        assert float(x.amax()) <= up + EXACT and float(x.amin()) >= -down - EXACT
        if name == "mlp" and x.dim() == 2:
            assert abs(float(x.amax().clamp_min(0)) - up) <= EXACT * (1 + up)
            assert abs(float((-x).amax().clamp_min(0)) - down) <= EXACT * (1 + down)


def adam_float16(name: str, seed: int) -> tuple[torch.nn.Module, gaugefix.GaugeStructure, dict]:
    """A float16 zoo model with Adam's state after one step, its structure and targets."""
    model, structure = discovered(name)
    model = model.half()
    params = structure.bind(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).half()
    opt.step()
    return model, structure, transport_targets(params, optimizer_states(opt, params))


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 3), log_scale=st.floats(-3, 3.5))
def test_the_bound_lies_between_overflowing_and_the_cheap_bound(name, seed, log_scale):
    """Float16 models with gradients and Adam's state, ``h`` of every size up to far out of
    range: where the cheap bound proves ``g(h)`` in range, so does the per-tensor bound; where
    the per-tensor bound does, ``overflowing`` finds no reason."""
    _, structure, targets = adam_float16(name, seed)
    g = torch.Generator().manual_seed(seed + 10)
    h = math.exp(log_scale) * torch.randn(structure.num_generators, dtype=D, generator=g)
    by_tensor = bool(in_range_by_tensor(targets, structure, h))
    assert by_tensor or not bool(in_range_bound(targets, h, structure.most_terms()))
    assert not by_tensor or overflowing(targets, structure, h) is None


def test_a_tensor_at_the_limit_is_refused_by_its_own_bound():
    """The float16 MLP with one weight entry at ``60000``: ``h = 0.1`` on a generator that does
    not act on that weight passes (the cheap bound, ``2 * 2 * 0.1`` against the entry, does not);
    the same on the generator that grows the entry by ``exp(0.1)`` is refused, as
    ``overflowing`` refuses it."""
    model, structure = discovered("mlp")
    params = structure.bind(model.half())
    n = structure.num_generators
    with torch.no_grad():
        params["0.weight"][0, 0] = 60000.0
    targets = transport_targets(params, {})
    units = torch.eye(n, dtype=D)
    on_entry = [float(entry_exponents(structure, "0.weight", units[k])[0, 0]) for k in range(n)]
    grows = on_entry.index(1.0)  # the first hidden neuron's generator: sign +1 on its inputs
    idle = next(k for k in range(n) if not entry_exponents(structure, "0.weight", units[k]).any())
    h = 0.1 * units[idle]
    assert not bool(in_range_bound(targets, h, structure.most_terms()))
    assert bool(in_range_by_tensor(targets, structure, h))
    assert overflowing(targets, structure, h) is None
    h = 0.1 * units[grows]
    assert not bool(in_range_by_tensor(targets, structure, h))
    assert overflowing(targets, structure, h) is not None
