"""The orbit-selection functional P = (strength / 4) sum_n mu_n^2 and its closed-form gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

import gaugefix
from architectures import ZOO_ARCHS, gauged_zoo_model
from gaugefix import OrbitSelectionPenalty, imbalance, zoo
from gaugefix.soft import orbit_selection_grad

ARCHS = ZOO_ARCHS


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, gauge: float = 0.7):
    return gauged_zoo_model(name, seed, dtype, gauge, gauge_seed=seed + 1)


def autograd_grads(model, structure, strength):
    """Autograd's gradient of the same formula, through the differentiable ``imbalance``."""
    params = structure.bind(model)
    mu = imbalance(model, structure)
    value = strength / 4 * mu.square().sum()
    return value, dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True))


@pytest.mark.parametrize("name", ARCHS)
def test_custom_gradient_equals_autograd(name):
    model, _, structure = make(name)
    strength = 0.37
    penalty = OrbitSelectionPenalty(structure, strength)
    value, expected = autograd_grads(model, structure, strength)
    p = penalty(model)
    assert p.dtype == torch.float64 and p.dim() == 0
    assert abs(float(p.detach()) - float(value.detach())) <= 1e-14 * float(value.detach())
    params = structure.bind(model)
    got = torch.autograd.grad(p, list(params.values()))
    for (pname, e), g in zip(expected.items(), got, strict=True):
        rel = float((g - e).norm() / e.norm().clamp_min(1e-300))
        assert rel <= 1e-12, (pname, rel)
    # The same closed form, without autograd: grad() and orbit_selection_grad().
    for pname, g in penalty.grad(model).items():
        assert torch.allclose(g, expected[pname], rtol=1e-12, atol=0)
    assert orbit_selection_grad(model, structure, strength).keys() == expected.keys()


def test_backward_scales_with_upstream_gradient_and_accumulates():
    model, _, structure = make("mlp")
    penalty = OrbitSelectionPenalty(structure, 0.5)
    expected = penalty.grad(model)
    (3.0 * penalty(model)).backward()
    (-1.0 * penalty(model)).backward()
    for name, p in structure.bind(model).items():
        torch.testing.assert_close(p.grad, 2.0 * expected[name], rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_penalty_gradient_is_vertical(name):
    """The JVP of the outputs along grad P is <= 1e-10 of the JVP along a random direction of the
    same norm: grad P = strength * sum_n mu_n xi_n lies in the gauge directions."""
    model, x, structure = make(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = OrbitSelectionPenalty(structure, 1.0).grad(model)
    v = {k: grads.get(k, torch.zeros_like(p)) for k, p in params.items()}
    norm = math.sqrt(sum(float(t.square().sum()) for t in v.values()))
    assert norm > 1e-3  # off balance: the penalty gradient is sizeable
    gen = torch.Generator().manual_seed(3)
    r = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    r_norm = math.sqrt(sum(float(t.square().sum()) for t in r.values()))
    r = {k: t * (norm / r_norm) for k, t in r.items()}

    def f(p):
        return functional_call(model, p, (x,))

    _, along_grad = jvp(f, (params,), (v,))
    _, along_random = jvp(f, (params,), (r,))
    assert float(along_grad.norm()) <= 1e-10 * float(along_random.norm())


def test_loss_gradient_is_orthogonal_to_penalty_gradient():
    """Euler identity <xi_n, grad L> = 0, so <grad P, grad L> = 0 for any invariant loss."""
    model, x, structure = make("cnn")
    loss = model(x).square().sum()
    params = structure.bind(model)
    g_loss = torch.autograd.grad(loss, list(params.values()))
    g_pen = OrbitSelectionPenalty(structure, 1.0).grad(model)
    dot = sum(float((a * g_pen[k]).sum()) for k, a in zip(params, g_loss, strict=True))
    scale = math.sqrt(sum(float(a.square().sum()) for a in g_loss)) * math.sqrt(
        sum(float(b.square().sum()) for b in g_pen.values())
    )
    assert abs(dot) <= 1e-12 * scale


def test_add_grad_adds_to_existing_and_creates_missing():
    model, x, structure = make("mlp")
    penalty = OrbitSelectionPenalty(structure, 0.2)
    expected = penalty.grad(model)
    params = structure.bind(model)
    first = next(iter(params))
    model(x).sum().backward()
    loss_grads = {k: p.grad.clone() for k, p in params.items()}
    params[first].grad = None
    penalty.add_grad_(model)
    for k, p in params.items():
        base = 0.0 if k == first else loss_grads[k]
        torch.testing.assert_close(p.grad, base + expected[k], rtol=1e-14, atol=0)


def test_zero_at_balance_and_zero_strength():
    model, _, structure = make("mlp")
    gaugefix.balance_(model, structure)
    p = OrbitSelectionPenalty(structure, 1.0)(model)
    assert float(p.detach()) <= 1e-18
    assert float(OrbitSelectionPenalty(structure, 0.0)(model).detach()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mixed_precision(dtype):
    """mu is accumulated in float32 or better; gradients come back in the parameter dtype."""
    ref, x, structure = make("mlp", dtype=torch.float64)
    model = zoo.mlp().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    penalty = OrbitSelectionPenalty(structure, 0.3)
    value = penalty(model)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Reference: float64 evaluation at the same (rounded) parameters.
    rounded = zoo.mlp().double()
    rounded.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    expected_value = OrbitSelectionPenalty(structure, 0.3)(rounded)
    assert math.isclose(float(value.detach()), float(expected_value.detach()), rel_tol=1e-5)
    value.backward()
    expected = penalty.grad(rounded)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for k, p in structure.bind(model).items():
        assert p.grad.dtype == dtype
        rel = float((p.grad.double() - expected[k]).norm() / expected[k].norm())
        assert rel <= tol, (k, rel)


def test_model_without_gauge_neurons():
    model = nn.Linear(3, 2).double()
    structure = gaugefix.discover(model, torch.randn(1, 3, dtype=torch.float64))
    assert structure.num_generators == 0
    penalty = OrbitSelectionPenalty(structure, 1.0)
    assert float(penalty(model)) == 0.0
    assert penalty.grad(model) == {}


@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf"), -float("inf"), True, "1"])
def test_bad_strength(strength):
    _, _, structure = make("mlp")
    with pytest.raises(ValueError, match="strength"):
        OrbitSelectionPenalty(structure, strength)
    with pytest.raises(ValueError, match="strength"):
        orbit_selection_grad(zoo.mlp(), structure, strength)


def test_structure_of_another_model():
    _, _, structure = make("mlp")
    other = zoo.mlp((16, 32, 8, 1)).double()
    penalty = OrbitSelectionPenalty(structure, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        penalty(other)
    with pytest.raises(ValueError, match="does not match"):
        penalty.grad(other)
    with pytest.raises(TypeError):
        OrbitSelectionPenalty("not a structure", 1.0)
