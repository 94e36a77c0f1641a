"""The kernels' two layouts of per-entry factors (``gaugefix.kernels.dense_factors``): on the CPU
each term's factor is broadcast, on a GPU one dense factor per parameter. Both are run here on
the CPU, in float64, against the per-neuron definition of the action and the closed form of the
penalty's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gaugefix
from architectures import DTYPE, any_case, entries, reference_action, reference_imbalance
from gaugefix import kernels
from gaugefix.soft import add_orbit_selection_grad_

pytestmark = pytest.mark.usefixtures("single_thread")

STRENGTH = 0.3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rel * float(expected.abs().max() if expected.numel() else 0.0), (what, err)


@pytest.mark.parametrize("dense", [False, True], ids=["broadcast", "dense"])
@settings(max_examples=40, deadline=None)
@given(case=any_case, seed=st.integers(0, 2**16))
def test_action_in_either_layout_matches_the_definition(dense, case, seed):
    """Parameters (power 1), gradients (power -1) and a second moment (power -2) moved by
    ``rescale_`` equal the generator-by-generator action to 1e-13."""
    s = gaugefix.discover(case.model, *case.inputs)
    assume(s.num_generators > 0)
    h = torch.randn(s.num_generators, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    params = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    grads = {k: torch.rand_like(v) + 0.5 for k, v in params.items()}
    moments = {k: torch.rand_like(v) + 0.5 for k, v in params.items()}
    expected = copy.deepcopy((params, grads, moments))
    reference_action(s, expected[0], h)
    reference_action(s, expected[1], -h)
    reference_action(s, expected[2], -2 * h)
    targets = {k: [(params[k], 1), (grads[k], -1), (moments[k], -2)] for k in s.bind(params)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "dense_factors", lambda device: dense)
        kernels.rescale_(targets, s, h)
    for got, want in zip((params, grads, moments), expected, strict=True):
        for name in got:
            assert_close(got[name], want[name], 1e-13, name)


@pytest.mark.parametrize("dense", [False, True], ids=["broadcast", "dense"])
@settings(max_examples=40, deadline=None)
@given(case=any_case)
def test_penalty_gradient_in_either_layout_matches_the_closed_form(dense, case):
    """``grad += strength (sum_n w_n(e) mu_n) theta_e`` for every entry, to 1e-12."""
    s = gaugefix.discover(case.model, *case.inputs)
    assume(s.num_generators > 0)
    params = s.bind(case.model)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    mu = reference_imbalance(s, {k: v.detach() for k, v in params.items()})
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(s.num_generators):  # d/dtheta of (strength / 4) mu_n^2, term by term
        slices = s.generator(n)
        for name, idx in slices.incoming:
            expected[name][entries(idx)] += STRENGTH * mu[n] * params[name].detach()[entries(idx)]
        for name, idx in slices.outgoing:
            expected[name][entries(idx)] -= STRENGTH * mu[n] * params[name].detach()[entries(idx)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "dense_factors", lambda device: dense)
        assert add_orbit_selection_grad_(params, s, STRENGTH, torch.tensor(True))
    for name, p in params.items():
        assert_close(p.grad, expected[name], 1e-12, name)
