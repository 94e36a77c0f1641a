"""Gauge-adapted coordinates, the Gram matrix of the generators and the tangent projections
(issue 4), in float64, on several zoo architectures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gaugefix as gf
from architectures import FAMILIES, incidence
from gaugefix import zoo
from gaugefix.coordinates import SingularGramError

ARCHS = ["mlp", "cnn", "resnet", "densenet", "transformer"]


def build(name: str, seed: int = 0, train: bool = False):
    """A float64 zoo model, its structure and a batch of 4 inputs."""
    torch.manual_seed(seed)
    ctor, shape = zoo.EXAMPLES[name]
    model = ctor().double().train(train)
    x = torch.randn(4, *shape[1:], dtype=torch.float64)
    return model, gf.discover(model, x[:1]), x


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def rel_err(a: dict, b: dict) -> float:
    """The largest ``||a_k - b_k|| / ||b_k||`` over the floating-point entries of ``b``."""
    errs = [
        float((a[k] - b[k]).norm() / b[k].norm())
        for k in b
        if b[k].is_floating_point() and b[k].norm() > 0
    ]
    return max(errs)


def norm(vectors: dict) -> float:
    return float(sum(v.double().square().sum() for v in vectors.values()).sqrt())


def sub(a: dict, b: dict) -> dict:
    return {k: a[k] - b[k] for k in a}


def named_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of a gauge-invariant loss (squared outputs against fixed targets)."""
    torch.manual_seed(1)
    out = model(x)
    loss = (out - torch.randn_like(out)).square().mean()
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))


# -- coordinates ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_round_trip_and_balanced_point(name):
    model, s, x = build(name)
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(3))
    before = float_state(model)
    coords = gf.gauge_coordinates(model, s)
    # The model is untouched; the inverse map gives the parameters back.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert rel_err(coords.to_state_dict(), before) <= 1e-12
    # theta_bar is balanced (mu = 0), no longer than theta, and realises the same function.
    s_in, s_out = gf.moment.in_out_sums(coords.balanced, s)
    assert float(((s_in - s_out).abs() / (s_in + s_out)).max()) <= 1e-12
    sq = {k: coords.balanced[k].square().sum() for k in s.params}
    assert sum(sq.values()) <= sum(before[k].square().sum() for k in s.params)
    with torch.no_grad():
        y = model(x)
        model.load_state_dict(coords.balanced)
        assert float((model(x) - y).norm() / y.norm()) <= 1e-10
    assert coords.h.shape == (s.num_generators,)
    assert coords.dead_generators.numel() == 0


@pytest.mark.parametrize("name", ARCHS)
def test_balanced_invariant_and_h_equivariant(name):
    model, s, _ = build(name)
    coords = gf.gauge_coordinates(model, s)
    h0 = gf.random_gauge_(model, s, 2.0, torch.Generator().manual_seed(5))
    moved = gf.gauge_coordinates(model, s)
    assert rel_err(moved.balanced, coords.balanced) <= 1e-9
    assert float((moved.h - (coords.h + h0)).abs().max()) <= 1e-9
    # Balancing the model in place lands on the same representative.
    gf.balance_(model, s, tol=1e-13)
    assert rel_err(float_state(model), coords.balanced) <= 1e-9


def test_dead_neuron_is_reported_not_mapped():
    model, s, _ = build("mlp")
    with torch.no_grad():  # neuron 3 of the first hidden layer: no incoming entries
        model[0].weight[3] = 0
        model[0].bias[3] = 0
    with pytest.raises(ValueError, match=r"dead generator.*3 \(neuron of layer '0'\)"):
        gf.gauge_coordinates(model, s)
    before = float_state(model)
    coords = gf.gauge_coordinates(model, s, allow_dead=True)
    assert coords.dead_generators.tolist() == [3]
    assert float(coords.h[3]) == 0.0
    assert rel_err(coords.to_state_dict(), before) <= 1e-12


@pytest.mark.parametrize("name", ["mlp", "transformer"])  # coupled generators
def test_newton_solves_report_not_converging_by_their_flag(name):
    """The one failure policy of the Newton solves: stopped by ``max_iter`` before ``tol``,
    ``gauge_coordinates`` and ``balance_`` return ``converged=False`` with the imbalance they
    reached, and raise nothing; the coordinates still factor the parameters exactly."""
    model, s, _ = build(name)
    gf.random_gauge_(model, s, 2.0, torch.Generator().manual_seed(3))
    before = float_state(model)
    coords = gf.gauge_coordinates(model, s, max_iter=1)
    assert not coords.converged and coords.mu_rel_max > 1e-13
    assert rel_err(coords.to_state_dict(), before) <= 1e-12
    assert gf.gauge_coordinates(model, s).converged
    result = gf.balance_(model, s, max_iter=1)
    assert not result.converged and result.mu_rel_max > 1e-10
    assert gf.balance_(model, s).converged


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_coordinates_on_every_family_from_large_gauges(data):
    """The documented claims on every generated family, from gauges up to ``e^8`` per
    generator: the round trip to ``1e-12``, ``balanced`` unchanged and ``h`` moved by ``h0``
    under ``g(h0)`` (to ``1e-9``), the model untouched, and ``mu_rel_max`` within ``tol``."""
    case = data.draw(FAMILIES[data.draw(st.sampled_from(sorted(FAMILIES)), label="family")])
    s = gf.discover(case.model, *case.inputs)
    coords = gf.gauge_coordinates(case.model, s)
    scale = data.draw(st.sampled_from([0.1, 1.0, 8.0]), label="gauge scale")
    seed = data.draw(st.integers(0, 2**16), label="gauge seed")
    moved = copy.deepcopy(case.model)
    h0 = gf.random_gauge_(moved, s, scale, torch.Generator().manual_seed(seed))
    before = float_state(moved)
    again = gf.gauge_coordinates(moved, s)
    assert all(torch.equal(v, before[k]) for k, v in moved.state_dict().items())
    assert again.converged and again.mu_rel_max <= 1e-13
    assert rel_err(again.to_state_dict(), before) <= 1e-12
    assert rel_err(again.balanced, coords.balanced) <= 1e-9
    assert torch.allclose(again.h, coords.h + h0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mu_rel_max_is_that_of_the_balanced_tensors(dtype):
    """``mu_rel_max`` is ``max |mu_n(theta_bar)| / S_n`` of ``balanced`` as returned, rounded to
    the model's dtype, not the float64 solve's (which is ``1e-15`` while ``balanced`` carries
    its float32 or bfloat16 rounding)."""
    model, s, _ = build("mlp")
    model.to(dtype)
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(3))
    coords = gf.gauge_coordinates(model, s)
    assert coords.converged
    s_in, s_out = gf.moment.in_out_sums({k: v.double() for k, v in coords.balanced.items()}, s)
    measured = float(((s_in - s_out).abs() / (s_in + s_out)).max())
    assert measured > 1e-10  # the dtype's rounding, far above the solve's tol
    assert coords.mu_rel_max == pytest.approx(measured, rel=1e-9)


def test_coordinates_reject_mismatched_structure():
    model, s, _ = build("mlp")
    other = zoo.mlp((16, 32, 31, 1)).double()
    with pytest.raises(ValueError, match="'2.weight'"):
        gf.gauge_coordinates(other, s)


# -- the Gram matrix --------------------------------------------------------------------------


def explicit_generators(model: nn.Module, s) -> torch.Tensor:
    """``[N, P]``: row ``n`` is ``xi_n`` flattened over the gauged parameters (a loop over
    generators, for the test only)."""
    params = s.bind(model)
    rows = []
    for n in range(s.num_generators):
        parts = []
        for name in s.params:
            t = params[name].detach()
            w = incidence(s, name)[n].to(torch.float64)
            parts.append((t * w).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ARCHS)
def test_gram_matrix_matches_explicit_generators(name):
    model, s, _ = build(name)
    gf.random_gauge_(model, s, 0.5, torch.Generator().manual_seed(2))
    gram = gf.generators_gram(model, s)
    assert gram.layout == torch.sparse_coo and gram.is_coalesced()
    assert gram.dtype == torch.float64 and gram.shape == (s.num_generators, s.num_generators)
    xi = explicit_generators(model, s)
    expected = xi @ xi.T
    assert float((gram.to_dense() - expected).norm() / expected.norm()) <= 1e-12
    # Positive definite for these models (every neuron touches a non-gauge entry).
    assert float(torch.linalg.eigvalsh(gram.to_dense())[0]) > 0


def test_gram_matrix_is_diagonal_for_two_layers():
    torch.manual_seed(0)
    model = zoo.mlp((5, 7, 3)).double()
    s = gf.discover(model, torch.randn(1, 5, dtype=torch.float64))
    dense = gf.generators_gram(model, s).to_dense()
    s_in, s_out = gf.moment.in_out_sums(model, s)
    assert torch.equal(dense, torch.diag(torch.diagonal(dense)))
    assert torch.allclose(torch.diagonal(dense), s_in + s_out, rtol=1e-14, atol=0)


# -- projections ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,train", [(a, False) for a in ARCHS] + [("resnet", True)])
def test_gradient_of_invariant_loss_is_horizontal(name, train):
    model, s, x = build(name, train=train)
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(4))
    g = named_grads(model, x)
    vertical = gf.project(g, model, s, onto="vertical")
    horizontal = gf.project(g, model, s, onto="horizontal")
    assert norm(vertical) <= 1e-10 * norm(g)
    assert norm(sub(horizontal, g)) <= 1e-10 * norm(g)
    # A random direction does have a vertical part: the check above is not vacuous.
    r = {k: torch.randn_like(v) for k, v in g.items()}
    assert norm(gf.project(r, model, s, onto="vertical")) >= 1e-3 * norm(r)


@pytest.mark.parametrize("name", ARCHS)
def test_projections_are_complementary_orthogonal_and_idempotent(name):
    model, s, _ = build(name)
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in model.named_parameters()}
    pv = gf.project(v, model, s, onto="vertical")
    ph = gf.project(v, model, s, onto="horizontal")
    assert set(pv) == set(v) == set(ph)
    assert norm(sub({k: pv[k] + ph[k] for k in v}, v)) <= 1e-14 * norm(v)
    inner = sum(float((pv[k] * ph[k]).sum()) for k in v)
    assert abs(inner) <= 1e-12 * norm(pv) * norm(ph)
    assert norm(sub(gf.project(pv, model, s, onto="vertical"), pv)) <= 1e-10 * norm(pv)
    assert norm(sub(gf.project(ph, model, s, onto="horizontal"), ph)) <= 1e-10 * norm(ph)
    assert norm(gf.project(ph, model, s, onto="vertical")) <= 1e-10 * norm(ph)
    # Parameters no neuron touches have no vertical component.
    for k in set(v) - set(s.params):
        assert torch.equal(pv[k], torch.zeros_like(v[k])) and torch.equal(ph[k], v[k])


def penalty_gradient(model: nn.Module, s, strength: float) -> dict[str, torch.Tensor]:
    """``dP/dtheta_e = strength (sum_n w_n(e) mu_n) theta_e`` from the dense weights, for every
    parameter of the model (0 outside the structure)."""
    mu = gf.imbalance(model, s).detach()
    out = {}
    for name, p in model.named_parameters():
        m = s.params.get(name)
        if m is None:
            out[name] = torch.zeros_like(p)
            continue
        w = incidence(s, name).to(torch.float64)
        out[name] = strength * torch.tensordot(mu, w, dims=1) * p.detach()
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_penalty_gradient_is_vertical(name):
    model, s, _ = build(name)
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(8))
    grad_p = penalty_gradient(model, s, strength=0.7)
    # The closed form is the gradient of P = (strength / 4) sum mu^2.
    penalty = 0.7 / 4 * gf.imbalance(model, s).square().sum()
    names = [n for n, p in model.named_parameters()]
    auto = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)
    for n, a in zip(names, auto, strict=True):
        a = torch.zeros_like(grad_p[n]) if a is None else a
        assert torch.allclose(a, grad_p[n], rtol=1e-12, atol=1e-14 * norm(grad_p))
    vertical = gf.project(grad_p, model, s, onto="vertical")
    assert norm(sub(vertical, grad_p)) <= 1e-10 * norm(grad_p)
    assert norm(gf.project(grad_p, model, s, onto="horizontal")) <= 1e-10 * norm(grad_p)


@pytest.mark.parametrize(
    ("of", "scale"),
    [("vectors", c) for c in (1e-200, 1e-160, 1e160, 1e200)]
    + [("parameters", c) for c in (1e-280, 1e280)],
)
def test_projection_is_linear_and_scale_free_at_any_scale(of, scale):
    """``Pi_V (c v) = c Pi_V v``, and ``Pi_V`` at ``sqrt(c) theta`` is ``Pi_V`` at ``theta``
    (the generators scale, their span does not), for any ``c`` float64 holds: the solve with
    ``K`` must not square ``b ~ 1e200`` (inf) or ``1e-200`` (0), nor ``c = K^{-1} b``."""
    model, s, _ = build("mlp")
    gen = torch.Generator().manual_seed(4)
    g = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in model.named_parameters()}
    expected = gf.project(g, model, s)
    with torch.no_grad():
        for p in model.parameters() if of == "parameters" else ():
            p.mul_(scale**0.5)
    vectors = {k: v * scale for k, v in g.items()} if of == "vectors" else g
    found = gf.project(vectors, model, s)
    if of == "vectors":  # compared at scale 1 (the squares of 1e-200 are 0)
        found = {k: v / scale for k, v in found.items()}
    assert norm(sub(found, expected)) <= 1e-12 * norm(expected)


def test_projection_keeps_dtype_and_rejects_bad_vectors():
    model, s, x = build("mlp")
    g = named_grads(model, x)
    out = gf.project({k: v.float() for k, v in g.items()}, model, s, onto="horizontal")
    assert all(v.dtype == torch.float32 for v in out.values())
    missing = dict(g)
    del missing["2.weight"]
    with pytest.raises(ValueError, match="'2.weight'"):
        gf.project(missing, model, s)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(32, 31\)"):
        gf.project({**g, "2.weight": g["2.weight"][:, 1:]}, model, s)
    with pytest.raises(ValueError, match="'not.a.param'"):
        gf.project({**g, "not.a.param": torch.zeros(3)}, model, s)
    with pytest.raises(ValueError, match="'0.bias' contains NaN"):
        gf.project({**g, "0.bias": torch.full_like(g["0.bias"], float("nan"))}, model, s)
    with pytest.raises(ValueError, match="onto"):
        gf.project(g, model, s, onto="diagonal")


class SelfLoop(nn.Module):
    """``fc2(relu(h + mid(h)))`` with ``h = relu(fc1(x))``: the residual merges ``mid``'s rows
    with ``h``'s neurons, so ``mid.weight[n, n]`` is gauge invariant (row and column neuron n)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(F.relu(h + self.mid(h)))


def isolate(model: SelfLoop, group: list[int]) -> None:
    """Zero every entry of the neurons in ``group`` except those of ``mid`` inside the group."""
    others = [n for n in range(4) if n not in group]
    with torch.no_grad():
        for n in group:
            model.fc1.weight[n] = 0
            model.fc1.bias[n] = 0
            model.mid.bias[n] = 0
            model.fc2.weight[:, n] = 0
            model.mid.weight[n, others] = 0
            model.mid.weight[others, n] = 0


@pytest.mark.parametrize("group", [[1], [0, 2]])
def test_singular_gram_matrix_is_detected(group):
    torch.manual_seed(0)
    model = SelfLoop().double()
    s = gf.discover(model, torch.randn(1, 3, dtype=torch.float64))
    assert s.num_generators == 4
    isolate(model, group)
    # The group's parameters are not all zero: mid.weight inside the group is kept.
    assert float(model.mid.weight.detach()[group][:, group].abs().min()) > 0
    g = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    with pytest.raises(SingularGramError, match="singular") as info:
        gf.project(g, model, s)
    assert info.value.generators == group
    assert all(f"{n} (neuron of layer 'fc1')" in str(info.value) for n in group)
    # The null space is real: the generators of the group sum to zero.
    dense = gf.generators_gram(model, s).to_dense()
    ones = torch.zeros(4, dtype=torch.float64)
    ones[group] = 1
    assert float((dense @ ones).abs().max()) <= 1e-15


def test_singular_check_passes_a_healthy_self_loop_model():
    torch.manual_seed(0)
    model = SelfLoop().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s = gf.discover(model, x[:1])
    g = named_grads(model, x)
    assert norm(gf.project(g, model, s)) <= 1e-10 * norm(g)


class Aliased(nn.Module):
    """An MLP whose last layer is also registered under a second name (tied parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = zoo.mlp((6, 5, 4, 2))
        self.alias = self.net[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_tied_parameter_aliases_stay_consistent():
    torch.manual_seed(0)
    model = Aliased().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    s = gf.discover(model, x[:1])
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(9))
    before = float_state(model)
    coords = gf.gauge_coordinates(model, s)
    assert coords.aliases == {"alias.weight": "net.4.weight"}  # net.4.bias is not gauged
    assert torch.equal(coords.balanced["alias.weight"], coords.balanced["net.4.weight"])
    assert rel_err(coords.to_state_dict(), before) <= 1e-12
    with torch.no_grad():
        y = model(x)
        model.load_state_dict(coords.balanced)
        assert float((model(x) - y).norm() / y.norm()) <= 1e-10
