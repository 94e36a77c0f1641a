"""``gauge_coordinates`` on models moved far along their orbit: a balanced model (an MLP, a gated
unit, a tied weight, ``zoo.GPT`` with and without tied embeddings, and an MLP whose balanced
point itself spans ``2^660``) moved by a known gauge ``g(h0)`` of up to ``2^500`` per generator,
or a chain of layers moved so that the entries span ``2^900``. The coordinates must return
``h0`` (``1e-10`` of ``max(1, |h0|)``) and the balanced model (``1e-10`` of each parameter's
largest entry), converged with no dead generator, and agree with ``balance_`` on a copy.

Regressions (each failed before the fix): ``gauge_coordinates`` scaled every model whose largest
entry exceeds ``2^256`` down to just below ``2^256`` (``balance_`` only where the squares
overflow float64), so a neuron moved by ``2^400`` to ``2^510`` had the squares of its small side
underflow there: reported dead with ``h`` ``277`` (at ``2^400``) to ``347`` (at ``2^500``) off and
``converged`` true, where ``balance_`` solves it to ``1e-14``; and a neuron moved by ``2^600``,
which ``balance_`` refuses (its squares overflow, and scaled they underflow), came back dead
with ``h`` ``416`` off instead of refused. And the wide MLP with one output-side neuron moved by
``2^-133`` (or ``2^-183``) stalled at ``max |mu_n| / S_n = 1.2e-9`` (``h`` ``6.1e-10`` off,
``converged`` false, with ``max_iter`` 1000 too): near the balance its line search accepted
steps by ``||mu||``, whose rounding on the generators with ``S_n`` near ``2^216`` hides the
imbalance of those near ``2^-112``; steps are now also accepted by ``||mu / S||``. And the wide
MLP with one of its neurons 1 to 4 moved by ``2^-165`` to ``2^-163`` came back with ``converged``
false after 100 iterations (``h`` 46 to 59 off; 201 to 204 iterations to converge): its masses
near ``1e-33`` lie far below the rounding of ``F ~ 1e66``, so the line search never doubled
Newton's step of ``1/2`` on it; such far generators' steps are now doubled while
``||log(S_out / S_in)||`` decreases (16 to 24 iterations)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import gaugefix as gf
from architectures import assert_same_bits, snapshot
from test_coordinates_audit2 import built
from test_coordinates_audit4 import check_agree

pytestmark = pytest.mark.usefixtures("single_thread")

DT = torch.float64
TOL = 1e-13
MAX_ITER = 100
EXACT = 1e-10  # h against h0 of max(1, |h0|); balanced against the base of each largest |entry|
LN2 = math.log(2.0)
# The largest |k| of a move by 2^k per model that keeps the moved model's squares inside
# float64 unscaled (beyond, they overflow, and scaled down they underflow: refused by both).
REACH = {"mlp": 500, "gated": 500, "tied": 500, "gpt": 500, "gpt_tied": 500, "wide_mlp": 400}
# The binary exponents of the two entries that make the wide MLP's balanced point span 2^660.
WIDE = 330


@functools.cache
def _balanced(name: str) -> tuple[nn.Module, gf.GaugeStructure]:
    if name == "wide_mlp":
        model, s = built("mlp")
        with torch.no_grad():  # input features are not gauged: the balanced point keeps them
            model[0].weight[0, 0] = 2.0**WIDE
            model[0].weight[0, 1] = 2.0**-WIDE
    else:
        model, s = built(name)
    result = gf.balance_(model, s, tol=TOL, max_iter=MAX_ITER)
    assert result.converged and not result.dead_generators.numel()
    return model, s


def balanced(name: str) -> tuple[nn.Module, gf.GaugeStructure]:
    """A fresh copy of model ``name`` balanced to ``TOL``, and its structure."""
    model, s = _balanced(name)
    return copy.deepcopy(model), s


def check_exact(base: nn.Module, s: gf.GaugeStructure, h0: torch.Tensor) -> None:
    """``g(h0) . base`` has the coordinates ``(base, h0)``, and they are ``balance_``'s."""
    model = copy.deepcopy(base)
    gf.apply_gauge_(model, s, h0)
    coords = gf.gauge_coordinates(model, s, tol=TOL, max_iter=MAX_ITER)
    assert coords.converged and not coords.dead_generators.numel()
    gap = float((coords.h - h0).abs().max())
    assert gap <= EXACT * max(1.0, float(h0.abs().max())), gap
    state = base.state_dict()
    for k in s.params:
        size = float(state[k].abs().max())
        assert float((coords.balanced[k] - state[k]).abs().max()) <= EXACT * size, k
    check_agree(model, s)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(REACH)), which=st.integers(0, 2**16), k=st.integers(-500, 500))
@example(name="mlp", which=1, k=400)
@example(name="gated", which=1, k=-450)
@example(name="gpt", which=1, k=500)
@example(name="wide_mlp", which=0, k=400)
@example(name="wide_mlp", which=1484, k=-133)  # stalled at mu_rel 1.2e-9 before the fix
@example(name="wide_mlp", which=1484, k=-183)
@example(name="wide_mlp", which=1, k=-164)  # converged false after 100 iterations before the fix
@example(name="wide_mlp", which=4, k=-164)
@example(name="wide_mlp", which=2, k=-165)
def test_one_generator_moved_by_two_to_the_k_has_coordinate_k_log_2(name, which, k):
    assume(abs(k) <= REACH[name])
    base, s = balanced(name)
    h0 = torch.zeros(s.num_generators, dtype=DT)
    h0[which % s.num_generators] = k * LN2
    check_exact(base, s, h0)


@settings(max_examples=25, deadline=None)
@given(a=st.integers(-500, 500), b=st.integers(-500, 500))
@example(a=400, b=-100)  # the entries span 2^900: 2^400 on layer 0, 2^-500 on layer 2
@example(a=-300, b=200)
def test_a_chain_of_layers_moved_by_two_to_the_a_and_b(a, b):
    """The MLP's first hidden layer moved by ``2^a``, its second by ``2^b``: the three weight
    matrices by ``2^a``, ``2^(b - a)`` and ``2^-b``."""
    assume(abs(b - a) <= REACH["mlp"])
    base, s = balanced("mlp")
    first = torch.tensor([layer == s.generator_layers[0] for layer in s.generator_layers])
    h0 = torch.where(first, a * LN2, b * LN2).to(DT)
    check_exact(base, s, h0)


@pytest.mark.parametrize("k", [600, -600, 900])
def test_a_neuron_beyond_float64s_squares_is_refused_not_called_dead(k):
    """Moved by ``2^600``, the squares of the neuron's large side overflow float64 and, scaled
    down to where they do not, those of its small side underflow: both refuse it in one line
    (with ``allow_dead`` too), the model unchanged. Before the fix ``gauge_coordinates`` held
    it dead at ``h = 0`` (``416`` off) and reported ``converged``."""
    model, s = balanced("mlp")
    h0 = torch.zeros(s.num_generators, dtype=DT)
    h0[1] = k * LN2
    gf.apply_gauge_(model, s, h0)
    state = snapshot(model)
    for call in (
        lambda: gf.gauge_coordinates(model, s, allow_dead=True),
        lambda: gf.balance_(model, s),
    ):
        with pytest.raises(ValueError, match="overflow float64.*underflow") as info:
            call()
        assert "\n" not in str(info.value)
        assert_same_bits(model, state)
