"""Hard gauge fixing: ``balance_`` finds the minimal-norm point of the orbit, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import (
    DTYPE,
    FAMILIES,
    GeneratedMLP,
    assert_same_bits,
    deep_mlp,
    randomise_,
    reference_imbalance,
    reference_sides,
    reference_sq_norms,
    rel_change,
    snapshot,
)
from gaugefix import zoo

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10


def norm_sq(model: nn.Module, s: gaugefix.GaugeStructure) -> float:
    """``||theta||^2`` over the parameters the structure touches."""
    params = dict(model.named_parameters())
    return sum(float(params[name].detach().square().sum()) for name in s.params)


def mu_rel_max(model: nn.Module, s: gaugefix.GaugeStructure, skip=()) -> float:
    """``max_n |mu_n| / S_n`` from the per-neuron references (neurons in ``skip`` left out)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    mu, total = reference_imbalance(s, params), reference_sq_norms(s, params)
    keep = torch.ones(s.num_generators, dtype=torch.bool)
    keep[list(skip)] = False
    return float((mu.abs() / total)[keep].max()) if bool(keep.any()) else 0.0


def check_balance(model: nn.Module, inputs: tuple, s: gaugefix.GaugeStructure, data=None):
    """Balance, then check the tolerance (reported and recomputed), the outputs, the reported
    norms, idempotence and, when ``data`` is given, minimality against random gauges."""
    with torch.no_grad():
        before = model(*inputs)
    norm_before = norm_sq(model, s)
    original = snapshot(model)
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= TOL, result
    assert result.dead_generators.numel() == 0
    assert mu_rel_max(model, s) <= TOL
    with torch.no_grad():
        assert rel_change(before, model(*inputs)) <= TOL
    assert result.norm_sq_before == pytest.approx(norm_before, rel=1e-12)
    assert result.norm_sq_after == pytest.approx(norm_sq(model, s), rel=1e-12)
    assert result.norm_sq_after <= result.norm_sq_before
    # the reported transformation is the one applied
    undone = copy.deepcopy(model)
    gaugefix.apply_gauge_(undone, s, -result.h)
    for name, p in undone.named_parameters():
        err = (p.detach() - original[name]).abs()
        assert bool((err <= 1e-12 * original[name].abs()).all()), name
    # idempotent: nothing left to do, nothing changes
    balanced = snapshot(model)
    again = gaugefix.balance_(model, s)
    assert again.iterations == 0 and again.converged
    assert again.norm_sq_after == again.norm_sq_before  # one sum of the same parameters
    assert_same_bits(model, balanced)
    if data is not None and s.num_generators:
        # minimal norm: no gauge transformation of the result is shorter
        for _ in range(3):
            scale = data.draw(st.floats(1e-2, 1.0), label="scale")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            moved = copy.deepcopy(model)
            gaugefix.random_gauge_(moved, s, scale, generator=torch.Generator().manual_seed(seed))
            # F(h) - F(0) >= 2 h^T K h > 0; the allowance is the rounding of the sums only
            assert norm_sq(moved, s) >= result.norm_sq_after * (1 - 1e-14)
    return result


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_balance_reaches_tolerance_keeps_outputs_and_is_minimal(family, data):
    case = data.draw(FAMILIES[family])
    s = gaugefix.discover(case.model, *case.inputs)
    scale = data.draw(st.sampled_from([0.0, 1.0, 3.0]), label="initial gauge scale")
    seed = data.draw(st.integers(0, 2**16), label="initial gauge seed")
    gaugefix.random_gauge_(case.model, s, scale, generator=torch.Generator().manual_seed(seed))
    check_balance(case.model, case.inputs, s, data)


@settings(max_examples=10, deadline=None)
@given(width=st.integers(1, 6), seed=st.integers(0, 2**16))
@example(width=1, seed=1)  # a chain: per-neuron closed-form steps diffuse, 50 are not enough
@example(width=4, seed=0)  # one exponential dominates F: unit Newton steps only divide it by e
def test_twenty_layer_mlp_from_a_large_random_gauge(width, seed):
    case = deep_mlp(depth=20, width=width, seed=seed)
    s = gaugefix.discover(case.model, *case.inputs)
    assert s.num_generators == case.expected
    gaugefix.random_gauge_(case.model, s, 3.0, generator=torch.Generator().manual_seed(seed))
    assert mu_rel_max(case.model, s) > 0.5  # a real starting imbalance
    result = check_balance(case.model, case.inputs, s)
    assert result.iterations <= 50


def test_balanced_point_is_gauge_invariant():
    """Kempf-Ness: the minimiser is unique on the orbit, so balancing any point of one orbit
    gives the same parameters (to the accuracy ``tol`` allows)."""
    torch.manual_seed(0)
    a = zoo.mlp((5, 8, 8, 3)).double()
    x = torch.randn(4, 5, dtype=DTYPE)
    s = gaugefix.discover(a, x)
    b = copy.deepcopy(a)
    gaugefix.random_gauge_(b, s, 2.0, generator=torch.Generator().manual_seed(1))
    gaugefix.balance_(a, s, tol=1e-13)
    gaugefix.balance_(b, s, tol=1e-13)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-9, atol=0), name


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_balanced_point_is_the_same_from_anywhere_on_the_orbit(data):
    """Uniqueness (Kempf-Ness) on every family, from gauges up to ``e^8`` per generator: the
    balanced parameters do not depend on the point of the orbit balancing starts from."""
    family = data.draw(st.sampled_from(sorted(FAMILIES)), label="family")
    case = data.draw(FAMILIES[family])
    s = gaugefix.discover(case.model, *case.inputs)
    moved = copy.deepcopy(case.model)
    scale = data.draw(st.sampled_from([0.1, 1.0, 8.0]), label="gauge scale")
    seed = data.draw(st.integers(0, 2**16), label="gauge seed")
    gaugefix.random_gauge_(moved, s, scale, generator=torch.Generator().manual_seed(seed))
    for model in (case.model, moved):
        assert gaugefix.balance_(model, s, tol=1e-13).converged
        model.requires_grad_(False)
    moved_params = dict(moved.named_parameters())
    for name, p in case.model.named_parameters():
        assert float((moved_params[name] - p).norm()) <= 1e-10 * float(p.norm()), name


@settings(max_examples=20, deadline=None)
@given(exponent=st.integers(-150, 150), seed=st.integers(0, 2**16))
@example(exponent=-150, seed=0)  # masses ~1e-300: the squared norms of the Newton step underflow
@example(exponent=150, seed=0)  # masses ~1e300: they overflow
def test_balance_is_invariant_under_a_global_scale(exponent, seed):
    """``F(h)`` of ``c theta`` is ``c^2 F(h)`` of ``theta``: the same minimiser, for any ``c``
    whose squares float64 holds (the Newton solve's norms must not square the imbalance)."""
    c = 10.0**exponent
    model, _, s = _imbalanced_mlp(seed)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(c)
    result = gaugefix.balance_(scaled, s)
    assert result.converged and result.mu_rel_max <= TOL, result
    assert mu_rel_max(scaled, s) <= TOL
    reference = gaugefix.balance_(model, s)
    assert float((result.h - reference.h).abs().max()) <= 1e-8
    assert result.norm_sq_after == pytest.approx(c * c * reference.norm_sq_after, rel=1e-9, abs=0)


@pytest.mark.parametrize("h0", [-322.0, -230.0, 230.0, 322.0])
def test_a_gauge_of_hundreds_on_one_generator_is_undone(h0):
    """``g(h0)`` with ``h0 = 322`` on one neuron multiplies its incoming entries by ``1e140``
    and its outgoing ones by ``1e-140`` (masses ``1e280`` and ``1e-280``, which float64 holds):
    balancing reaches the tolerance, on the model, at the point balancing the original
    reaches. The solve passes through several bases, whose masses must not lose the entries
    that underflow at one of them."""
    model, x, s = _imbalanced_mlp()
    reference = copy.deepcopy(model)
    gauge = torch.zeros(s.num_generators, dtype=DTYPE)
    gauge[0] = h0
    gaugefix.apply_gauge_(model, s, gauge)
    with torch.no_grad():
        before = model(x)
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= TOL, result
    assert mu_rel_max(model, s) <= TOL
    with torch.no_grad():
        assert rel_change(before, model(x)) <= TOL
    gaugefix.balance_(reference, s)
    expected = snapshot(reference)
    for name, p in snapshot(model).items():
        assert float((p - expected[name]).norm()) <= 1e-9 * float(expected[name].norm()), name


def test_generator_with_subnormal_squares_is_balanced():
    """Incoming entries ``~1e-160`` have subnormal squares (``~1e-321``): the generator is
    live (not dead), its two sides are ``1e320`` apart, and the closed-form step
    ``log(S_out / S_in) / 4`` must not overflow to inf on the way."""
    model, x, s = _imbalanced_mlp()
    with torch.no_grad():
        model[0].weight[1] *= 1e-160
        model[0].bias[1] *= 1e-160
        before = model(x)
    result = gaugefix.balance_(model, s)
    assert result.dead_generators.numel() == 0
    assert result.converged and result.mu_rel_max <= TOL, result
    assert mu_rel_max(model, s) <= TOL
    with torch.no_grad():
        assert rel_change(before, model(x)) <= TOL


@pytest.mark.parametrize("seed", range(6))
def test_norms_before_and_after_are_equal_when_nothing_moves(seed):
    """A balanced model is left as it is, and ``norm_sq_before`` and ``norm_sq_after`` are one
    sum of the same parameters: equal, not two summation orders apart."""
    model, _, s = _imbalanced_mlp(seed)
    gaugefix.balance_(model, s)
    saved = snapshot(model)
    again = gaugefix.balance_(model, s)
    assert again.iterations == 0
    assert again.norm_sq_after == again.norm_sq_before == pytest.approx(norm_sq(model, s))
    assert_same_bits(model, saved)


def test_balance_of_a_two_layer_net_is_the_closed_form():
    """Two layers: ``K`` is diagonal and the balance of each neuron is closed form,
    ``h_n = log(S_out / S_in) / 4``."""
    torch.manual_seed(1)
    model = zoo.mlp((6, 5, 4)).double()
    s = gaugefix.discover(model, torch.randn(3, 6, dtype=DTYPE))
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    s_in = w1.square().sum(1) + b1.square()
    s_out = w2.square().sum(0)
    expected = 0.25 * torch.log(s_out / s_in)
    result = gaugefix.balance_(model, s)
    assert torch.allclose(result.h, expected, rtol=0, atol=1e-9)


# --- dead neurons --------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    depth=st.integers(2, 5),
    width=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    kills=st.lists(
        st.tuples(st.integers(0, 99), st.sampled_from(["in", "out", "both"])), max_size=4
    ),
)
def test_dead_generators_are_reported_left_alone_and_never_nan(depth, width, seed, kills):
    widths = [3] + [width] * (depth - 1) + [2]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GeneratedMLP(widths, ["nn.ReLU"] * (depth - 1), [True] * depth, [False] * depth)
    model = randomise_(model, seed).eval()
    x = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    s = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for k, side in kills:
            layer, unit = divmod(k % s.num_generators, width)
            if side in ("in", "both"):
                model.layers[layer].weight[unit] = 0
                model.layers[layer].bias[unit] = 0
            if side in ("out", "both"):
                model.layers[layer + 1].weight[:, unit] = 0
    # dead: all incoming or all outgoing entries zero (killing a neuron's incoming row also
    # removes one outgoing entry of every neuron of the layer before)
    s_in, s_out = reference_sides(s, {k: v.detach() for k, v in model.named_parameters()})
    dead = set(torch.nonzero((s_in == 0) | (s_out == 0)).view(-1).tolist())
    assert {k % s.num_generators for k, _ in kills} <= dead
    with torch.no_grad():
        before = model(x)
    result = gaugefix.balance_(model, s)
    assert set(result.dead_generators.tolist()) == dead
    assert bool(torch.isfinite(result.h).all())
    assert bool((result.h[sorted(dead)] == 0).all())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert result.converged and result.mu_rel_max <= TOL
    assert mu_rel_max(model, s, skip=dead) <= TOL
    with torch.no_grad():
        assert rel_change(before, model(x)) <= TOL


def test_all_dead_model_is_left_alone():
    model = zoo.mlp((3, 4, 4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    saved = snapshot(model)
    result = gaugefix.balance_(model, s)
    assert result.dead_generators.tolist() == list(range(8))
    assert result.iterations == 0 and result.converged and result.mu_rel_max == 0.0
    assert result.norm_sq_before == result.norm_sq_after == 0.0
    assert_same_bits(model, saved)


# --- options, optimizer, bad input ---------------------------------------------------------------
def _imbalanced_mlp(seed: int = 2) -> tuple[nn.Module, Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(seed)
    model = zoo.mlp((4, 6, 5, 3)).double()
    x = torch.randn(3, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(seed))
    return model, x, s


def test_max_iter_zero_changes_nothing_and_reports_not_converged():
    model, _, s = _imbalanced_mlp()
    saved = snapshot(model)
    result = gaugefix.balance_(model, s, max_iter=0)
    assert result.iterations == 0 and not result.converged
    assert result.norm_sq_after == result.norm_sq_before
    assert result.mu_rel_max == pytest.approx(mu_rel_max(model, s), rel=1e-12)
    assert_same_bits(model, saved)


def test_a_looser_tolerance_stops_earlier():
    model, _, s = _imbalanced_mlp()
    loose = gaugefix.balance_(copy.deepcopy(model), s, tol=1e-2)
    tight = gaugefix.balance_(model, s)
    assert loose.converged and loose.mu_rel_max <= 1e-2
    assert loose.iterations <= tight.iterations


def test_balance_transports_optimizer_state():
    """After balancing with the optimizer, its state is what it would hold had it seen the
    gradients at the balanced point."""
    model, x, s = _imbalanced_mlp()
    balanced = copy.deepcopy(model)
    gaugefix.balance_(balanced, s)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    fresh = torch.optim.Adam(balanced.parameters(), lr=0.0)
    for m, o in ((model, opt), (balanced, fresh)):
        for batch in (x, -x):
            o.zero_grad()
            m(batch).square().mean().backward()
            o.step()
    gaugefix.balance_(model, s, optimizer=opt)
    for p, q in zip(model.parameters(), balanced.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-12, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], fresh.state[q][key]
            assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max()), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["0.weight", "2.bias", "4.weight"])
def test_non_finite_parameters_raise_and_change_nothing(bad, where):
    model, _, s = _imbalanced_mlp()
    with torch.no_grad():
        dict(model.named_parameters())[where].view(-1)[0] = bad
    saved = snapshot(model)
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        gaugefix.balance_(model, s)
    assert_same_bits(model, saved)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tol": 0.0},
        {"tol": -1.0},
        {"tol": float("nan")},
        {"max_iter": -1},
        {"max_iter": 2.5},
        {"max_iter": True},
    ],
)
def test_bad_options_raise_and_change_nothing(kwargs):
    model, _, s = _imbalanced_mlp()
    saved = snapshot(model)
    with pytest.raises(ValueError):
        gaugefix.balance_(model, s, **kwargs)
    assert_same_bits(model, saved)


def test_structure_of_another_model_raises_before_modifying():
    _, _, s = _imbalanced_mlp()
    other = zoo.mlp((4, 6, 7, 3)).double()
    saved = snapshot(other)
    with pytest.raises(ValueError, match="structure does not match"):
        gaugefix.balance_(other, s)
    assert_same_bits(other, saved)


def test_untransportable_optimizer_raises_before_modifying():
    model, x, s = _imbalanced_mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.0, initial_accumulator_value=0.1)
    model(x).sum().backward()
    opt.step()
    saved = snapshot(model)
    with pytest.raises(ValueError, match="cannot transport"):
        gaugefix.balance_(model, s, optimizer=opt)
    assert_same_bits(model, saved)


class ScalarGain(nn.Module):
    """``l2(a * relu(l1(x)))`` with a learned scalar ``a`` (a 0-dim parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 2)
        self.a = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.a * torch.relu(self.l1(x)))


def test_a_zero_dim_parameter_is_rescaled_like_any_other():
    """A structure holding a 0-dim parameter is applied, balanced and measured (the kernels
    used to index it by rows and fail: IndexError)."""
    torch.manual_seed(0)
    model = ScalarGain().double()
    x = torch.randn(5, 3, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    assert "a" in s.params
    with torch.no_grad():
        before = model(x)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert float(model.a) != 1.5
    result = gaugefix.balance_(model, s)
    assert result.converged and mu_rel_max(model, s) <= TOL
    assert gaugefix.imbalance_stats(model, s)["mu_rel_max"] <= TOL
    with torch.no_grad():
        assert rel_change(before, model(x)) <= TOL
