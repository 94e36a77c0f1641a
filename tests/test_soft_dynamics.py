"""Dissipative relaxation: under gradient flow on P = (strength / 4) sum mu^2,
d mu / dt = -2 strength K mu, measured with penalty-only gradient descent at a tiny step.

For a two-layer net every hidden neuron is isolated, K = diag(S), and the flow is
d mu_n / dt = -2 strength S_n mu_n. S_n is not constant along it (dS_n / dt = -2 strength mu_n^2),
but S_in,n * S_out,n is, so S_n = sqrt(mu_n^2 + a_n^2) with a_n = 2 sqrt(S_in,n S_out,n). Hence:
- near balance (|mu| << S) S_n is constant to second order and
  mu_n(t) = mu_n(0) exp(-2 strength S_n t) holds to well within 1%;
- far from balance the exact solution is |mu_n(t)| = 2 a r / (1 - r^2),
  r(t) = r(0) exp(-2 strength a t), r(0) = |mu_n(0)| / (a + S_n(0)).
"""

from __future__ import annotations

import math

import torch

import gaugefix
from gaugefix import OrbitSelectionPenalty, zoo
from gaugefix.balancing import masses_of
from gaugefix.moment import in_out_sums

STRENGTH = 2.0


def two_layer(h_scale: float, seed: int = 0):
    """A balanced 3-6-2 ReLU net with S_n spread over [1, 1.5], then moved off balance by a
    gauge of magnitude about ``h_scale`` per neuron."""
    torch.manual_seed(seed)
    model = zoo.mlp((3, 6, 2)).double()
    structure = gaugefix.discover(model, torch.randn(1, 3, dtype=torch.float64))
    assert structure.num_generators == 6
    gaugefix.balance_(model, structure, tol=1e-14)
    s_in, s_out = in_out_sums(model, structure)
    target = torch.linspace(1.0, 1.5, 6, dtype=torch.float64)
    c = torch.sqrt(target / (s_in + s_out))
    with torch.no_grad():  # not a gauge: rescales each neuron's in and out sides alike
        model[0].weight.mul_(c[:, None])
        model[0].bias.mul_(c)
        model[2].weight.mul_(c[None, :])
    gen = torch.Generator().manual_seed(seed)
    signs = torch.tensor([1.0, -1.0] * 3, dtype=torch.float64)
    h = h_scale * signs * (0.5 + torch.rand(6, generator=gen, dtype=torch.float64))
    gaugefix.apply_gauge_(model, structure, h)
    return model, structure


def penalty_descent(model, structure, step: float, steps: int, every: int):
    """Plain SGD on P alone; yields (t, S_in, S_out) every ``every`` steps, starting at t = 0."""
    penalty = OrbitSelectionPenalty(structure, STRENGTH)
    opt = torch.optim.SGD(model.parameters(), lr=step)
    for k in range(steps + 1):
        if k % every == 0:
            with torch.no_grad():
                yield k * step, *in_out_sums(model, structure)
        opt.zero_grad()
        penalty(model).backward()
        opt.step()


def test_two_layer_near_balance_matches_exponential_decay():
    """mu_n(t) = mu_n(0) exp(-2 strength S_n t) within 1% until every mu_n fell 10x."""
    model, structure = two_layer(0.02)
    s_in, s_out = in_out_sums(model, structure)
    mu0, s0 = (s_in - s_out).detach(), (s_in + s_out).detach()
    assert float((mu0.abs() / s0).max()) < 0.07 and float((mu0.abs() / s0).min()) > 0.01
    step = 5e-4 / (STRENGTH * float(s0.max()))
    horizon = 1.05 * math.log(10) / (2 * STRENGTH * float(s0.min()))
    every = 25
    steps = every * math.ceil(horizon / (step * every))
    worst = 0.0
    for t, s_in, s_out in penalty_descent(model, structure, step, steps, every):
        predicted = mu0 * torch.exp(-2 * STRENGTH * s0 * t)
        worst = max(worst, float(((s_in - s_out) - predicted).abs().div(predicted.abs()).max()))
    assert worst <= 0.01
    assert bool(((s_in - s_out).abs() <= mu0.abs() / 10).all())


def test_two_layer_far_from_balance_matches_exact_solution():
    """With |mu| / S up to ~0.9 the fixed-S exponential is far off, but the exact solution of
    d mu/dt = -2 strength S mu with the conserved S_in * S_out, and the exponential integrated
    with the current S_n, both hold within 1% until every mu_n fell 10x."""
    model, structure = two_layer(0.6)
    s_in, s_out = (t.detach() for t in in_out_sums(model, structure))
    mu0, s0 = s_in - s_out, s_in + s_out
    a = 2 * torch.sqrt(s_in * s_out)
    assert float((mu0.abs() / s0).max()) > 0.8
    r0 = mu0.abs() / (a + s0)
    step = 2e-4 / (STRENGTH * float(s0.max()))
    horizon = math.log(10) / (2 * STRENGTH * float(a.min()))
    every = 25
    steps = every * math.ceil(horizon / (step * every))
    integral = torch.zeros_like(mu0)  # int_0^t S_n, by the trapezoid rule on the samples
    prev_s, prev_t = s0, 0.0
    worst_exact = worst_integrated = worst_fixed = 0.0
    for t, s_in, s_out in penalty_descent(model, structure, step, steps, every):
        mu, s = s_in - s_out, s_in + s_out
        integral += 0.5 * (prev_s + s) * (t - prev_t)
        prev_s, prev_t = s, t
        r = r0 * torch.exp(-2 * STRENGTH * a * t)
        exact = torch.sign(mu0) * 2 * a * r / (1 - r**2)
        integrated = mu0 * torch.exp(-2 * STRENGTH * integral)
        fixed = mu0 * torch.exp(-2 * STRENGTH * s0 * t)
        worst_exact = max(worst_exact, float(((mu - exact) / exact).abs().max()))
        worst_integrated = max(worst_integrated, float(((mu - integrated) / mu).abs().max()))
        worst_fixed = max(worst_fixed, float(((mu - fixed) / mu).abs().max()))
    assert worst_exact <= 0.01
    assert worst_integrated <= 0.01
    assert worst_fixed > 0.1  # S_n(0) overstates the rate: the near-balance formula needs |mu| << S
    assert bool((mu.abs() <= mu0.abs() / 10).all())


def test_coupled_network_rate_is_minus_2_strength_K_mu():
    """In a deeper net neurons couple through shared weights; the instantaneous rate of change
    of mu along -grad P is -2 strength K mu, K the (non-diagonal) Gram matrix of generators."""
    torch.manual_seed(1)
    model = zoo.mlp((4, 5, 5, 2)).double()
    structure = gaugefix.discover(model, torch.randn(1, 4, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 0.5, generator=torch.Generator().manual_seed(2))
    params = structure.bind(model)
    state = masses_of(params, structure).at(
        torch.zeros(1, structure.num_generators, dtype=torch.float64)
    )
    s_in, s_out = state.s_in[0], state.s_out[0]
    mu = s_in - s_out
    k_mu = state.gram_matvec(mu[None])[0]
    assert float((k_mu - (s_in + s_out) * mu).norm()) > 0.1 * float(k_mu.norm())  # coupled
    grads = OrbitSelectionPenalty(structure, STRENGTH).grad(model)
    eta = 1e-6

    def mu_at(sign: float):
        moved = {k: p.detach() - sign * eta * grads[k] for k, p in params.items()}
        a, b = in_out_sums(moved, structure)
        return a - b

    rate = (mu_at(1.0) - mu_at(-1.0)) / (2 * eta)
    expected = -2 * STRENGTH * k_mu
    assert float((rate - expected).norm()) <= 1e-7 * float(expected.norm())
