"""relax_: the exact, bounded orbit step h = -rate * mu."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugefix
from architectures import ZOO_ARCHS, gauged_zoo_model
from gaugefix import OrbitSelectionPenalty, imbalance, relax_, zoo
from gaugefix.moment import in_out_sums

ARCHS = ZOO_ARCHS
RATES = [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3]


make = gauged_zoo_model


def sums(model, structure):
    with torch.no_grad():
        return in_out_sums(model, structure)


def mu_norm(model, structure) -> float:
    with torch.no_grad():
        return float(imbalance(model, structure).norm())


def rel(a, b):
    return float((a - b).norm() / b.norm())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ARCHS)
def test_function_kept_and_mu_decreases_monotonically(name):
    """For every rate from 1e-3 to 1e3: outputs move by <= 1e-10 (relative, float64) and
    ||mu|| never increases over repeated steps (up to the rounding of the masses)."""
    base, x, structure = make(name)
    y0 = base(x).detach()
    s_in, s_out = sums(base, structure)
    assert bool(((s_in > 0) & (s_out > 0)).all())  # no dead neuron: ||mu|| is over all neurons
    for rate in RATES:
        model = copy.deepcopy(base)
        norms = [mu_norm(model, structure)]
        for _ in range(8):
            relax_(model, structure, rate)
            norms.append(mu_norm(model, structure))
            assert rel(model(x).detach(), y0) <= 1e-10, rate
        slack = 1e-12 * gaugefix.imbalance_stats(model, structure)["norm_sq"]  # rounding of F
        assert all(b <= a + slack for a, b in zip(norms, norms[1:], strict=False)), (rate, norms)
        assert norms[-1] < norms[0], (rate, norms)


def test_isolated_neurons_balance_in_one_huge_step():
    """A two-layer net has isolated neurons: the step is clamped at the local closed-form balance
    (1/4) log(S_out / S_in), which is the exact balance, so a huge rate lands on mu = 0."""
    model = zoo.mlp((5, 7, 3)).double()
    structure = gaugefix.discover(model, torch.randn(1, 5, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 2.0, generator=torch.Generator().manual_seed(1))
    s_in, s_out = sums(model, structure)
    h = relax_(model, structure, 1e6)
    torch.testing.assert_close(h, 0.25 * torch.log(s_out / s_in), rtol=1e-14, atol=0)
    s_in, s_out = sums(model, structure)
    assert float(((s_in - s_out).abs() / (s_in + s_out)).max()) <= 1e-13


def test_small_rate_is_the_explicit_penalty_step_to_first_order():
    """g(-r mu) . theta = theta - r grad P_1 + O(r^2), with P_1 the functional at strength 1."""
    model, x, structure = make("cnn")
    explicit = copy.deepcopy(model)
    grads = OrbitSelectionPenalty(structure, 1.0).grad(model)
    s_in, s_out = sums(model, structure)
    rate = 1e-6 / float((s_in + s_out).max())
    relax_(model, structure, rate)
    with torch.no_grad():
        for k, p in structure.bind(explicit).items():
            p -= rate * grads[k]
    moved = sum(float((rate * g).square().sum()) for g in grads.values()) ** 0.5
    diff = sum(
        float((a - b).detach().square().sum())
        for a, b in zip(
            structure.bind(model).values(), structure.bind(explicit).values(), strict=True
        )
    )
    assert diff**0.5 <= 1e-5 * moved


def test_per_neuron_rate_and_zero_rate():
    model, x, structure = make("mlp")
    before = snapshot(model)
    h = relax_(model, structure, 0.0)
    assert bool((h == 0).all())
    assert_unchanged(model, before)
    rate = torch.full((structure.num_generators,), 0.01, dtype=torch.float64)
    rate[::2] = 0.0
    h = relax_(model, structure, rate)
    assert bool((h[::2] == 0).all()) and bool((h[1::2] != 0).all())
    y = copy.deepcopy(model)
    model.load_state_dict(before)
    assert rel(y(x).detach(), model(x).detach()) <= 1e-12


def test_dead_neuron_is_left_alone():
    """A neuron whose outgoing weights are all zero has no closed orbit: h stays 0 and its
    incoming weights are not driven to zero, whatever the rate."""
    torch.manual_seed(0)
    model = zoo.mlp((4, 6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0
    w0 = model[0].weight[0].clone()
    h = relax_(model, structure, 1e3)
    assert float(h[0]) == 0.0
    assert torch.equal(model[0].weight[0], w0)
    mu = imbalance(model, structure).detach()
    assert float(mu[1:].abs().max()) <= 1e-12 * float(mu[0].abs())


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_transports_grad_and_optimizer_state(optimizer_name):
    """Each entry moves by a factor f = theta' / theta; .grad and gradient-like buffers are
    divided by f, Adam's second moments by f^2 (float64, to rounding)."""
    model, x, structure = make("mlp")
    params = structure.bind(model)
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    model(x).square().mean().backward()
    opt.step()
    model(x).square().mean().backward()
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = {k: p.grad.clone() for k, p in params.items()}
    states = {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in params.items()}
    relax_(model, structure, 1.0, optimizer=opt)
    for k, p in params.items():
        f = p.detach() / before[k]
        torch.testing.assert_close(p.grad, grads[k] / f, rtol=1e-12, atol=0)
        for s, v in opt.state[p].items():
            if s in ("momentum_buffer", "exp_avg"):
                torch.testing.assert_close(v, states[k][s] / f, rtol=1e-12, atol=0)
            elif s in ("exp_avg_sq", "max_exp_avg_sq"):
                torch.testing.assert_close(v, states[k][s] / f**2, rtol=1e-12, atol=0)
            else:
                assert torch.equal(v, states[k][s])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_mixed_precision(dtype, tol):
    model, x, structure = make("cnn", dtype=dtype)
    y0 = model(x).detach().double()
    mu0 = imbalance(model, structure).detach()
    assert mu0.dtype == torch.float32
    for rate in (1e-2, 1e2):
        relax_(model, structure, rate)
        assert all(p.dtype == dtype for p in model.parameters())
        assert rel(model(x).detach().double(), y0) <= tol
    assert mu_norm(model, structure) < 0.5 * float(mu0.norm())


@pytest.mark.parametrize(
    "rate",
    [
        -1.0,
        float("nan"),
        float("inf"),
        "fast",
        torch.tensor([1.0, 2.0]),
        torch.tensor(float("nan")),
    ],
)
def test_bad_rate_modifies_nothing(rate):
    model, _, structure = make("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="rate"):
        relax_(model, structure, rate)
    negative = -torch.ones(structure.num_generators, dtype=torch.float64)
    with pytest.raises(ValueError, match="rate"):
        relax_(model, structure, negative)
    assert_unchanged(model, before)


def test_structure_of_another_model_modifies_nothing():
    _, _, structure = make("mlp")
    other = zoo.mlp((16, 32, 8, 1)).double()
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not match"):
        relax_(other, structure, 1.0)
    assert_unchanged(other, before)


def test_non_finite_parameters_modify_nothing():
    model, _, structure = make("mlp")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        relax_(model, structure, 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k


def test_model_without_gauge_neurons():
    model = nn.Linear(3, 2)
    structure = gaugefix.discover(model, torch.randn(1, 3))
    assert relax_(model, structure, 1.0).shape == (0,)
