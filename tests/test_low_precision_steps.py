"""Exact-mode orbit steps in low precision: the dead band of ``gaugefix.soft.orbit_step`` (a
generator whose step is within a few of its dtype's roundings of 0 does not move, in
``GaugeFixing``, ``relax_`` and ``gaugefix.step`` alike) and the float16 range check."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import gaugefix
from gaugefix import GaugeFixing
from gaugefix.action import moved_with, overflowing
from gaugefix.masses import Masses
from gaugefix.soft import DEAD_BAND, bounded_orbit_step, orbit_step
from gaugefix.step import orbit_step_
from test_hook_audit2 import quiet_hook  # noqa: F401 (an autouse fixture)
from test_hook_audit4 import unbalanced

SETTLE = 1000  # orbit steps after which the unbalanced models below have settled
MORE = 100


def settled(dtype, strength, lr):
    """The unbalanced MLP in ``dtype`` after ``SETTLE`` hooked orbit steps, with its optimizer,
    hook and structure."""
    model, _, structure = unbalanced(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    hook = GaugeFixing(opt, model, structure, strength, balance_at_start=False, every=1)
    for _ in range(SETTLE):
        opt.step()
    return model, opt, hook, structure


SETTLING = [(torch.bfloat16, 5.0, 0.1), (torch.float16, 0.05, 0.01)]  # (dtype, strength, lr)


@pytest.mark.parametrize("dtype,strength,lr", SETTLING)
def test_settled_low_precision_orbit_steps_move_nothing(dtype, strength, lr):
    """Once every generator's step is inside the dead band, more orbit steps leave every entry
    bit-identical (they are counted as taken). Before the dead band bfloat16 moved entries by
    an ulp at every step, and the function drifted by 0.49 in 1000."""
    model, opt, hook, _ = settled(dtype, strength, lr)
    before = copy.deepcopy(model)
    for _ in range(MORE):
        opt.step()
    assert (hook.steps, hook.skipped) == (SETTLE + MORE, 0)
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_optax_style_step_has_the_same_dead_band():
    """``gaugefix.step``'s orbit step (the sweep engine's) on the settled bfloat16 model at the
    hook's rate moves nothing either, and its ``h`` is 0 or above the band."""
    model, _, _, structure = settled(torch.bfloat16, 5.0, 0.1)
    params = structure.bind(model)
    before = {name: p.clone() for name, p in params.items()}
    rate = torch.tensor(0.5, dtype=torch.float64)
    h, _ = orbit_step(params, structure, rate)
    band = DEAD_BAND * torch.finfo(torch.bfloat16).eps
    assert bool(((h == 0) | (h.abs() > band)).all())
    orbit_step_(params, None, structure, rate)
    for name, p in params.items():
        assert torch.equal(p, before[name])


def test_float64_steps_above_the_band_are_the_bounded_step_unchanged():
    """float64, a step searched by halvings and one taken at once: ``orbit_step`` returns the
    bounded step (:func:`bounded_orbit_step`) and ``-rate * mu`` bit for bit."""
    model, _, structure = unbalanced(torch.float64)
    params = structure.bind(model)
    stack = {name: p.detach()[None] for name, p in params.items()}  # one copy
    for rate in (1.0, 1e-6):
        r = torch.tensor(rate, dtype=torch.float64)
        h, finite = orbit_step(params, structure, r)
        assert bool(finite) and bool((h.abs() > DEAD_BAND * 2.0**-52).all())
        if rate == 1.0:
            assert torch.equal(h, bounded_orbit_step(Masses(stack, structure), r[None])[0])
        else:
            assert torch.equal(h, -r * gaugefix.imbalance(params, structure))


def test_relax_leaves_generators_inside_the_band_alone():
    """``relax_`` on a bfloat16 model: every generator it moves has ``|h_n|`` above the band,
    and some inside it keep ``h_n = 0`` though their imbalance is not 0."""
    model, _, _, structure = settled(torch.bfloat16, 5.0, 0.1)
    mu = gaugefix.imbalance(structure.bind(model), structure)
    h = gaugefix.relax_(model, structure, 0.5)
    band = DEAD_BAND * torch.finfo(torch.bfloat16).eps
    assert bool(((h == 0) | (h.abs() > band)).all())
    assert bool(((h == 0) & (mu != 0)).any())


def test_float16_orbit_steps_act_where_the_exact_range_check_passes():
    """Unbalanced float16, exact mode at rate 5e-3: ``relax_`` at the rate keeps every entry in
    range, so the hook's orbit steps must act (not all be skipped). The cheap bound alone
    (``2 * terms * max|h|`` against every tensor's largest entry, 17) refused all 20."""
    model, _, structure = unbalanced(torch.float16)
    gaugefix.relax_(copy.deepcopy(model), structure, 5e-3)  # the exact check passes
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    hook = GaugeFixing(opt, model, structure, 5.0, balance_at_start=False, every=1)
    for _ in range(20):
        opt.step()
    assert hook.skipped < 20


def test_a_float16_orbit_step_that_would_overflow_is_skipped():
    """The unbalanced float16 MLP with SGD momentum, one buffer entry at ``65000`` where the
    step divides by its smallest factor (``exp(-x)`` with ``x < -0.0078``: past ``65504``): the
    exact check (``overflowing``) refuses the step, and the hook skips it, every parameter and
    buffer bit-identical."""
    model, _, structure = unbalanced(torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    hook = GaugeFixing(opt, model, structure, 5.0, balance_at_start=False, every=1)
    params = structure.bind(model)
    h = orbit_step(params, structure, torch.tensor(5e-3, dtype=torch.float64))[0].detach()
    lows = {name: exponents(structure, name, h) for name in params}
    name = min(lows, key=lambda name: float(lows[name].amin()))
    assert float(lows[name].amin()) < -2 * math.log(65504 / 65000)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    buffer = opt.state[params[name]]["momentum_buffer"]
    buffer.view(-1)[int(lows[name].argmin())] = 65000.0
    targets = moved_with(opt, params)
    assert overflowing(targets, structure, h) is not None
    before = [p.clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.step()
    assert (hook.steps, hook.skipped) == (0, 1)
    for p, q, b in zip(model.parameters(), before, buffers, strict=True):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["momentum_buffer"], b)


def exponents(structure, name, h):
    """``sum_t sign_t h[slot_t(e)]`` for every entry of parameter ``name`` (float64)."""
    hx = torch.cat([h, h.new_zeros(1)])
    param = next(p for p in structure.plan("cpu") if p.name == name)
    return sum(term.sign * hx[term.slots] for term in param.terms).expand(param.shape)


def test_float32_steps_below_the_band_width_still_move():
    """Float32 and float64 steps are not cut: a float32 step whose every ``|h_n|`` is below
    ``DEAD_BAND * eps(float32)`` moves every generator, by ``-rate mu`` (``mu`` accumulated in
    float32) as without the band (the reproduction's float32 runs compute what they did)."""
    model, _, structure = unbalanced(torch.float32)
    params = structure.bind(model)
    mu = gaugefix.imbalance(model, structure)
    rate = torch.tensor(1e-9 / float(mu.abs().max()), dtype=torch.float64)
    h, _ = orbit_step(params, structure, rate)
    band = DEAD_BAND * torch.finfo(torch.float32).eps
    assert bool((h != 0).all()) and float(h.abs().max()) <= band
    expected = -rate * mu.detach().to(torch.float64)
    assert float((h - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
