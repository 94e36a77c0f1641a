"""The per-tensor range bound of the float16 orbit step (``gaugefix.action.in_range_by_tensor``):
its exponent bounds are those of ``overflowing`` for every parameter at once, every entry's
exponent lies between them, the bound is never looser than ``overflowing`` nor tighter than the
loose bound ``2 k max|h|`` (``k`` terms per entry) it replaced, it decides moves before
``overflowing`` is needed, and its cached table follows what is moved."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugefix
import gaugefix.action
from gaugefix.action import (
    RANGE_MARGIN,
    exponent_bounds,
    in_range_by_tensor,
    moved_with,
    overflowing,
    range_index,
)
from test_action_audit2 import loose_bound, model_and_input

D = torch.float64
EXACT = 1e-12
MODELS = ["mlp", "cnn", "transformer"]


@functools.cache
def _discovered_once(name: str) -> tuple[torch.nn.Module, gaugefix.GaugeStructure]:
    model, x = model_and_input(name)
    return model, gaugefix.discover(model, x)


def discovered(name: str) -> tuple[torch.nn.Module, gaugefix.GaugeStructure]:
    """A fresh copy of zoo model ``name`` and of its structure (discovered once per name; the
    copies keep tests and hypothesis examples from sharing parameters or cached tables)."""
    return copy.deepcopy(_discovered_once(name))


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
    return model, structure, moved_with(opt, params)


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 3), log_scale=st.floats(-3, 3.5))
def test_the_bound_lies_between_overflowing_and_the_loose_bound(name, seed, log_scale):
    """Float16 models with gradients and Adam's state, ``h`` of every size up to far out of
    range: where the loose bound proves ``g(h)`` in range, so does the per-tensor bound; where
    the per-tensor bound does, ``overflowing`` finds no reason."""
    _, structure, targets = adam_float16(name, seed)
    g = torch.Generator().manual_seed(seed + 10)
    h = math.exp(log_scale) * torch.randn(structure.num_generators, dtype=D, generator=g)
    by_tensor = bool(in_range_by_tensor(targets, structure, h))
    assert by_tensor or not loose_bound(targets, h, structure.most_terms())
    assert not by_tensor or overflowing(targets, structure, h) is None


def test_a_tensor_at_the_limit_is_refused_by_its_own_bound():
    """The float16 MLP with one weight entry at ``60000``: ``h = 0.1`` on a generator that does
    not act on that weight passes (the loose bound, ``2 * 2 * 0.1`` against the entry, does not);
    the same on the generator that grows the entry by ``exp(0.1)`` is refused, as
    ``overflowing`` refuses it."""
    model, structure = discovered("mlp")
    params = structure.bind(model.half())
    n = structure.num_generators
    with torch.no_grad():
        params["0.weight"][0, 0] = 60000.0
    targets = moved_with(None, params)
    units = torch.eye(n, dtype=D)
    on_entry = [float(entry_exponents(structure, "0.weight", units[k])[0, 0]) for k in range(n)]
    grows = on_entry.index(1.0)  # the first hidden neuron's generator: sign +1 on its inputs
    idle = next(k for k in range(n) if not entry_exponents(structure, "0.weight", units[k]).any())
    h = 0.1 * units[idle]
    assert not loose_bound(targets, h, structure.most_terms())
    assert bool(in_range_by_tensor(targets, structure, h))
    assert overflowing(targets, structure, h) is None
    h = 0.1 * units[grows]
    assert not bool(in_range_by_tensor(targets, structure, h))
    assert overflowing(targets, structure, h) is not None


def counted_overflowing(monkeypatch) -> list[int]:
    """Count the calls of ``gaugefix.action.overflowing`` (the exact check) from now on."""
    calls, original = [], overflowing

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(gaugefix.action, "overflowing", counted)
    return calls


def test_a_float64_move_past_the_loose_bound_needs_no_exact_check(monkeypatch):
    """The float64 MLP with ``h = 30`` on one generator: ``2 k max|h| = 120`` exceeded
    ``SAFE_EXPONENT`` (80), so ``apply_gauge_`` asked ``overflowing``; each tensor's own
    exponents are at most 30, so the per-tensor bound proves the move: no exact check, and the
    move is the same (bitwise) as ``rescale_`` of ``g(h)`` on a copy."""
    model, structure = discovered("mlp")
    h = torch.zeros(structure.num_generators, dtype=D)
    h[0] = 30.0
    targets = moved_with(None, structure.bind(model))
    assert not loose_bound(targets, h, structure.most_terms())
    expected = copy.deepcopy(model)
    gaugefix.kernels.rescale_(moved_with(None, structure.bind(expected)), structure, h)
    calls = counted_overflowing(monkeypatch)
    gaugefix.apply_gauge_(model, structure, h)
    assert calls == []
    for name, p in structure.bind(model).items():
        assert torch.equal(p, structure.bind(expected)[name])


def test_a_float16_relax_step_near_the_limit_needs_no_exact_check(monkeypatch):
    """A float16 MLP whose gradient holds, on the parameter the step moves least, an entry with
    log-room between that parameter's own exponent and ``2 k max|h|``: ``relax_`` needed
    ``overflowing`` under the loose bound; the per-tensor bound proves the step, and the step
    (which does not read gradients) is that of a copy without the entry."""
    model, structure = discovered("mlp")
    model = model.half()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    probe = copy.deepcopy(model)
    h = gaugefix.relax_(probe, structure, 0.5)
    bounds = exponent_bounds(structure, h)
    place = int(bounds[:, 1].argmin())  # a gradient (power -1) grows by exp(down)
    down, e = float(bounds[place, 1]), 2 * structure.most_terms() * float(h.abs().max())
    assert down < e
    limit = math.log(torch.finfo(torch.float16).max) - RANGE_MARGIN
    grad = structure.bind(model)[list(structure.params)[place]].grad
    grad.view(-1)[0] = math.exp(limit - (down + e) / 2)
    targets = moved_with(None, structure.bind(model))
    assert not loose_bound(targets, h, structure.most_terms())
    calls = counted_overflowing(monkeypatch)
    moved = gaugefix.relax_(model, structure, 0.5)
    assert calls == [] and torch.equal(moved, h)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_the_table_follows_the_first_adam_step():
    """The bound is asked before Adam's first step (parameters and gradients), then after it,
    when the second moment (power -2) exists: an entry of it at ``60000`` that the move
    multiplies by ``exp(2 * 0.1)`` is refused, as ``overflowing`` refuses it."""
    model, structure = discovered("mlp")
    model = model.half()
    params = structure.bind(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    n = structure.num_generators
    units = torch.eye(n, dtype=D)
    shrinks = next(  # a generator shrinking 0.weight[0, 0]: its second moment grows by 2x
        k for k in range(n) if float(entry_exponents(structure, "0.weight", units[k])[0, 0]) == 1
    )
    h = -0.1 * units[shrinks]
    assert bool(in_range_by_tensor(moved_with(None, params), structure, h))
    opt.step()
    opt.state[params["0.weight"]]["exp_avg_sq"][0, 0] = 60000.0
    targets = moved_with(opt, params)
    assert overflowing(targets, structure, h) is not None
    assert not bool(in_range_by_tensor(targets, structure, h))


def test_the_table_follows_a_change_of_dtype():
    """The MLP in float32 with a weight entry at ``60000`` grown by ``exp(0.1)``: in range;
    after ``model.half()`` (the same parameters, now float16) the same move is refused."""
    model, structure = discovered("mlp")
    model = model.float()
    params = structure.bind(model)
    with torch.no_grad():
        params["0.weight"][0, 0] = 60000.0
    n = structure.num_generators
    units = torch.eye(n, dtype=D)
    grows = next(
        k for k in range(n) if float(entry_exponents(structure, "0.weight", units[k])[0, 0]) == 1
    )
    h = 0.1 * units[grows]
    assert bool(in_range_by_tensor(moved_with(None, params), structure, h))
    model.half()
    targets = moved_with(None, structure.bind(model))
    assert overflowing(targets, structure, h) is not None
    assert not bool(in_range_by_tensor(targets, structure, h))


def test_the_table_follows_which_local_slices_hold_entries():
    """As on a process of FSDP2 whose slice of a parameter is empty, then is not: the bound is
    asked with ``0.weight``'s tensors empty (they do not count), then with ``0.weight`` holding
    an entry at ``60000`` that the move grows by ``exp(0.1)``: refused, as by ``overflowing``;
    every verdict equals that of a table built afresh."""
    model, structure = discovered("mlp")
    params = structure.bind(model.half())
    n = structure.num_generators
    units = torch.eye(n, dtype=D)
    grows = next(
        k for k in range(n) if float(entry_exponents(structure, "0.weight", units[k])[0, 0]) == 1
    )
    h = 0.1 * units[grows]
    targets = moved_with(None, params)
    empty = {**targets, "0.weight": [(params["0.weight"][:0], 1)]}
    assert bool(in_range_by_tensor(empty, structure, h))
    with torch.no_grad():
        params["0.weight"][0, 0] = 60000.0
    assert overflowing(targets, structure, h) is not None
    assert not bool(in_range_by_tensor(targets, structure, h))
    for moved in (empty, targets):
        cached = bool(in_range_by_tensor(moved, structure, h))
        range_index(structure, h.device).tables.clear()
        assert cached == bool(in_range_by_tensor(moved, structure, h))
