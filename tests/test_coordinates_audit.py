"""Audit of the coordinates, projections, Gram matrix, penalty and exact orbit step: property
tests on every generated family (float64, exact things to 1e-10 or better) and regressions for
the defects the audit found (each failed before its fix)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gaugefix as gf
from architectures import FAMILIES, assert_same_bits, gauged_zoo_model, incidence, snapshot
from gaugefix import zoo
from gaugefix.coordinates import SingularGramError, generator_pairing

DT = torch.float64


def family_case(data):
    case = data.draw(FAMILIES[data.draw(st.sampled_from(sorted(FAMILIES)), label="family")])
    return case, gf.discover(case.model, *case.inputs)


def sides(model: nn.Module, s) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mu, live, F)`` of the gauged parameters, in float64 from the dense weights."""
    s_in, s_out = gf.moment.in_out_sums({k: v.detach() for k, v in s.bind(model).items()}, s)
    live = (s_in > 0) & (s_out > 0)
    f = sum(float(p.detach().double().square().sum()) for p in s.bind(model).values())
    return s_in - s_out, live, f


def dense_xi(model: nn.Module, s) -> torch.Tensor:
    """``[N, P]``: ``xi_n(e) = w_n(e) theta_e`` over the gauged parameters, from the incidence."""
    params = s.bind(model)
    return torch.cat(
        [
            (incidence(s, k).to(DT) * params[k].detach()).reshape(s.num_generators, -1)
            for k in s.params
        ],
        dim=1,
    )


def flat(vectors: dict, s) -> torch.Tensor:
    return torch.cat([vectors[k].detach().reshape(-1) for k in s.params])


# -- the exact orbit step ----------------------------------------------------------------------


def scaled_mlp(exponent: int, seed: int = 0) -> tuple[nn.Module, gf.GaugeStructure]:
    torch.manual_seed(seed)
    model = zoo.mlp((3, 5, 4, 2)).double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    gf.random_gauge_(model, s, 1.5, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0**exponent)
    return model, s


@pytest.mark.parametrize("exponent", [-490, -330, 330, 490])
@pytest.mark.parametrize("relative_rate", [0.3, 3.0, 1e3])
def test_relax_is_exactly_scale_equivariant(exponent, relative_rate):
    """``relax_`` of ``2^e theta`` at ``rate / 4^e`` takes the step it takes at ``theta`` (bit
    for bit: every mass scales by a power of 2), down to ``1e-147`` and up to ``1e147``, where
    ``balance_`` works. Before the fix the bounded search took ``||mu||`` as a plain norm, 0
    below about ``1e-77`` (so it never moved there)."""
    hs = []
    for e in (0, exponent):
        model, s = scaled_mlp(e)
        s_in, s_out = gf.moment.in_out_sums(model, s)
        hs.append(gf.relax_(model, s, relative_rate / float((s_in + s_out).detach().max())))
    assert bool((hs[0] != 0).any())
    assert torch.equal(hs[1], hs[0])


@pytest.mark.parametrize("orders", [100, 150])
def test_relax_balances_a_neuron_whose_sides_are_over_1e308_apart(orders):
    """A neuron with incoming entries ``1e100`` times and outgoing ones ``1e-100`` times
    their size: its squared sides are ``1e400`` apart. A huge rate balances it in one step, as
    ``balance_`` does (before the fix the local balance was ``log(0) = -inf``, the clamp was
    lost and no halving brought the step back: nothing moved)."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 4, 2)).double()
    x = torch.randn(5, 3, dtype=DT)
    s = gf.discover(model, x[:1])
    h = torch.zeros(s.num_generators, dtype=DT)
    h[0] = orders * math.log(10)
    gf.apply_gauge_(model, s, h)
    y = model(x).detach()
    expected = gf.balance_(copy.deepcopy(model), s).h
    found = gf.relax_(model, s, 1e300)
    assert float((found - expected).abs().max()) <= 1e-12 * float(expected.abs().max())
    assert gf.imbalance_stats(model, s)["mu_rel_max"] <= 1e-12
    assert float((model(x).detach() - y).norm() / y.norm()) <= 1e-12


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_relax_never_raises_mu_or_the_norm_and_keeps_the_function(data):
    """On every family, from gauges up to ``e^4``, at rates from ``1e-3`` to ``1e6`` over
    ``max S`` (uniform, or per generator with zeros): ``||mu||`` (live generators) and ``F``
    do not increase, generators at rate 0 do not move, and the outputs are kept to rounding."""
    case, s = family_case(data)
    if s.num_generators == 0:
        return
    gauge = data.draw(st.sampled_from([0.5, 2.0, 4.0]), label="gauge")
    gf.random_gauge_(
        case.model, s, gauge, torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    y = case.run()
    mu0, live, f0 = sides(case.model, s)
    s_in, s_out = gf.moment.in_out_sums(case.model, s)
    rate = 10.0 ** data.draw(st.floats(-3, 6), label="log rate") / float((s_in + s_out).max())
    zeros = torch.zeros(s.num_generators, dtype=torch.bool)
    if data.draw(st.booleans(), label="per generator"):
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
        zeros = torch.rand(s.num_generators, generator=gen) < 0.3
        rate = torch.rand(s.num_generators, generator=gen, dtype=torch.float32) * rate
        rate[zeros] = 0
    h = gf.relax_(case.model, s, rate)
    mu1, _, f1 = sides(case.model, s)
    assert bool((h[zeros] == 0).all())
    assert float(mu1[live].norm()) <= float(mu0[live].norm()) * (1 + 1e-12)
    assert f1 <= f0 * (1 + 1e-12)
    scale = max(float(y.abs().max()), 1e-300)
    assert float((case.run() - y).abs().max()) <= 1e-10 * scale


def test_relax_takes_rates_of_other_dtypes_and_refuses_overflowing_nothing_changed():
    """A float32 per-generator rate that requires grad is taken as float64; non-finite
    parameters are refused before anything moves."""
    model, x, s = gauged_zoo_model("mlp", 0, DT, 1.0)
    rate = torch.full((s.num_generators,), 0.01, dtype=torch.float32, requires_grad=True)
    reference = copy.deepcopy(model)
    h = gf.relax_(model, s, rate)
    assert torch.equal(h, gf.relax_(reference, s, rate.detach().double()))
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        gf.relax_(model, s, 1.0)
    assert_same_bits(model, before)


# -- the penalty -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "resnet", "transformer"])
def test_penalty_hessian_vector_products_equal_autograd(name):
    """``create_graph=True`` through the penalty gives the Hessian of ``P``: the Hessian-vector
    product of ``L + P`` equals autograd's of ``L + (strength / 4) sum mu^2`` to ``1e-12``.
    Before the fix the once-differentiable backward returned a gradient without a graph, so
    the product silently left ``P``'s Hessian out."""
    model, x, s = gauged_zoo_model(name, 0, DT, 0.7)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
    penalty = gf.OrbitSelectionPenalty(s, 0.37)

    def hvp(p_term):
        loss = model(x).square().mean() + p_term()
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, v, strict=True))
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(dot, params)])

    found = hvp(lambda: penalty(model))
    expected = hvp(lambda: 0.37 / 4 * gf.imbalance(model, s).square().sum())
    assert float((found - expected).norm()) <= 1e-12 * float(expected.norm())


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_penalty_value_and_gradient_equal_autograd_on_every_family(data):
    case, s = family_case(data)
    if s.num_generators == 0:
        return
    gf.random_gauge_(
        case.model, s, 1.0, torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    strength = data.draw(st.sampled_from([1e-3, 0.5, 7.0]), label="strength")
    params = s.bind(case.model)
    mu = gf.imbalance(case.model, s)
    value = strength / 4 * mu.square().sum()
    expected = torch.autograd.grad(value, list(params.values()))
    p = gf.OrbitSelectionPenalty(s, strength)(case.model)
    assert abs(float(p - value)) <= 1e-13 * float(value)
    found = torch.autograd.grad(p, list(params.values()))
    for a, b in zip(found, expected, strict=True):
        assert float((a - b).norm()) <= 1e-12 * max(float(b.norm()), 1e-300)


def test_penalty_of_a_model_without_gradients_is_a_plain_value():
    model, _, s = gauged_zoo_model("mlp", 0, DT, 0.7)
    expected = 0.5 / 4 * float(gf.imbalance(model, s).square().sum())
    for p in model.parameters():
        p.requires_grad_(False)
    value = gf.OrbitSelectionPenalty(s, 0.5)(model)
    assert not value.requires_grad
    assert abs(float(value) - expected) <= 1e-14 * expected


# -- the Gram matrix and the projections ---------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gram_and_projections_on_every_family(data):
    """``K`` equals the dense ``xi xi^T``; ``Pi_V v`` lies in the span of the ``xi_n`` and
    ``Pi_H v`` is orthogonal to every ``xi_n`` (to ``1e-10``), both idempotent, summing to
    ``v``. A singular ``K`` raises ``SingularGramError`` naming generators in its null space."""
    case, s = family_case(data)
    if s.num_generators == 0:
        return
    gf.random_gauge_(
        case.model, s, 1.0, torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    xi = dense_xi(case.model, s)
    dense = xi @ xi.T
    gram = gf.generators_gram(case.model, s).to_dense()
    assert float((gram - dense).abs().max()) <= 1e-13 * float(dense.abs().max())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    v = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in case.model.named_parameters()}
    try:
        pv = gf.project(v, case.model, s)
    except SingularGramError as err:
        null = torch.linalg.eigh(dense[err.generators][:, err.generators])
        assert float(null.eigenvalues[0]) <= 1e-12 * float(null.eigenvalues[-1])
        return
    ph = gf.project(v, case.model, s, onto="horizontal")
    params = s.bind(case.model)
    b = generator_pairing(params, ph, s)  # <xi_n, Pi_H v>
    xi_norms = xi.norm(dim=1)
    assert bool((b.abs() <= 1e-10 * xi_norms * float(flat(ph, s).norm())).all())
    # Pi_V v = xi^T c: its residual off the span of the xi_n, by least squares
    c = torch.linalg.lstsq(xi.T, flat(pv, s)[:, None]).solution
    residual = flat(pv, s) - (xi.T @ c)[:, 0]
    assert float(residual.norm()) <= 1e-10 * float(flat(v, s).norm())
    assert all(torch.allclose(pv[k] + ph[k], v[k], rtol=0, atol=1e-14) for k in v)
    twice = gf.project(pv, case.model, s)
    assert float(flat({k: twice[k] - pv[k] for k in s.params}, s).norm()) <= 1e-10 * float(
        flat(pv, s).norm() + 1e-300
    )


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.bool, torch.complex128], ids=["int64", "bool", "complex"]
)
def test_project_refuses_vectors_that_are_not_real_floating(dtype):
    """An integer or bool vector came back as the projection rounded to integers; a complex
    one lost its imaginary part. Now ``ValueError`` names the parameter; the input is kept."""
    model, _, s = gauged_zoo_model("mlp", 0, DT, 0.7)
    v = {k: (3 * torch.randn_like(p)).to(dtype) for k, p in model.named_parameters()}
    saved = {k: t.clone() for k, t in v.items()}
    with pytest.raises(ValueError, match=r"'0\.weight' is torch\.\w+, expected a real floating"):
        gf.project(v, model, s)
    assert all(torch.equal(v[k], saved[k]) for k in v)


# -- coordinates -------------------------------------------------------------------------------


def gpt2_tiny() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, activation_function="relu"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize("name", ["zoo.GPT", "GPT-2"])
def test_coordinates_of_language_models(name):
    """Round trip to ``1e-12``, ``mu(theta_bar) = 0`` and invariance under a further gauge on
    attention models (zoo.GPT, Hugging Face GPT-2 with a tied head)."""
    if name == "GPT-2":
        model = gpt2_tiny()
    else:
        torch.manual_seed(0)
        model = zoo.GPT(vocab=16, dim=8, heads=2, layers=2).double()
    ids = torch.randint(0, 16, (1, 6))
    s = gf.discover(model, ids)
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    coords = gf.gauge_coordinates(model, s)
    after = coords.to_state_dict()
    for k, v in before.items():
        assert float((after[k] - v).norm()) <= 1e-12 * float(v.norm()), k
    assert coords.converged and coords.mu_rel_max <= 1e-13
    h0 = gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(4))
    moved = gf.gauge_coordinates(model, s)
    for k, v in coords.balanced.items():
        assert float((moved.balanced[k] - v).norm()) <= 1e-9 * max(float(v.norm()), 1e-300), k
    assert float((moved.h - coords.h - h0).abs().max()) <= 1e-9


def test_coordinates_with_dead_generators_are_invariant_off_them():
    """With ``allow_dead`` the round trip is exact and ``balanced`` is unchanged by any gauge
    that is 0 on the dead generators (a dead-incoming and a dead-outgoing neuron)."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 5, 4, 2)).double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0
        model[4].weight[:, 2] = 0
    coords = gf.gauge_coordinates(model, s, allow_dead=True)
    assert coords.dead_generators.tolist() == [1, 7]
    h0 = torch.randn(s.num_generators, dtype=DT, generator=torch.Generator().manual_seed(2))
    h0[coords.dead_generators] = 0
    gf.apply_gauge_(model, s, h0)
    moved = gf.gauge_coordinates(model, s, allow_dead=True)
    for k, v in coords.balanced.items():
        assert float((moved.balanced[k] - v).norm()) <= 1e-12 * float(v.norm()), k
    assert float((moved.h - coords.h - h0).abs().max()) <= 1e-12
    state = model.state_dict()
    back = moved.to_state_dict()
    assert all(float((back[k] - v).norm()) <= 1e-15 * float(v.norm()) for k, v in state.items())


@pytest.mark.parametrize("exponent", [-480, 480])
def test_coordinates_are_exactly_scale_equivariant(exponent):
    model, s = scaled_mlp(0)
    coords = gf.gauge_coordinates(model, s)
    big, _ = scaled_mlp(exponent)
    scaled = gf.gauge_coordinates(big, s)
    assert torch.equal(scaled.h, coords.h)
    assert all(
        torch.equal(scaled.balanced[k], v * 2.0**exponent) for k, v in coords.balanced.items()
    )
