"""Second audit of the soft gauge-fixing functional, the gauge-adapted coordinates and the
diagnostics: every documented identity checked in float64 on an MLP, a CNN with BatchNorm, a
residual MLP, ``zoo.GPT`` and a tiny Hugging Face Llama (property tests where the identity is
exact), adversarial inputs, and regressions for the defects found (each failed before its fix)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix as gf
from gaugefix import zoo
from gaugefix.coordinates import gauge_tensors, generator_pairing
from gaugefix.soft import generator_combination
from test_equalize import llama

DT = torch.float64
ARCHS = ["mlp", "cnn-bn", "residual", "gpt", "llama"]
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)


class Residual(nn.Module):
    """A ReLU MLP with one residual block: hidden-to-hidden weights couple generators."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(i, o) for i, o in [(5, 6), (6, 6), (6, 6), (6, 2)]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.a(x))
        x = x + self.c(torch.relu(self.b(x)))
        return self.d(torch.relu(x))


def _factory(name: str) -> tuple[nn.Module, Tensor]:
    if name == "mlp":
        return zoo.mlp((4, 8, 8, 3)), torch.randn(3, 4, dtype=DT)
    if name == "cnn-bn":
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(80, 2),
        )  # fmt: skip
        return model, torch.randn(2, 3, 8, 8, dtype=DT)
    if name == "residual":
        return Residual(), torch.randn(3, 5, dtype=DT)
    if name == "gpt":
        return zoo.GPT(vocab=11, dim=8, heads=2, layers=1, context=8), torch.randint(0, 11, (2, 5))
    return llama("relu"), torch.randint(0, 40, (2, 5))


@functools.cache
def _base(name: str) -> tuple[nn.Module, Tensor, gf.GaugeStructure]:
    torch.manual_seed(0)
    model, x = _factory(name)
    model = model.to(DT).eval()
    with torch.no_grad():  # norm gains and statistics away from their defaults 1 and 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) or type(m).__name__.endswith("Norm"):
                m.weight.uniform_(0.5, 1.5)
    return model, x, gf.discover(model, x)


def build(name: str, seed: int = 0, gauge: float = 0.7):
    """A fresh copy of architecture ``name`` moved off balance by a seeded random gauge."""
    base, x, s = _base(name)
    model = copy.deepcopy(base)
    gf.random_gauge_(model, s, gauge, generator=torch.Generator().manual_seed(seed))
    return model, x, s


def output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def flat(vectors: dict[str, Tensor], names) -> Tensor:
    return torch.cat([vectors[k].detach().reshape(-1).to(DT) for k in names])


def live_mu(model: nn.Module, s: gf.GaugeStructure) -> tuple[Tensor, float]:
    """``(mu over generators with a closed orbit, F = ||theta||^2)``, float64."""
    s_in, s_out = gf.moment.in_out_sums(model, s)
    mu = torch.where((s_in > 0) & (s_out > 0), s_in - s_out, 0.0).detach()
    return mu, sum(float(p.detach().square().sum()) for p in s.bind(model).values())


def s_max(model: nn.Module, s: gf.GaugeStructure) -> float:
    s_in, s_out = gf.moment.in_out_sums(model, s)
    return float((s_in + s_out).detach().max())


seeds = st.integers(0, 2**16)


# -- the functional and its gradient --------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
@SETTINGS
@given(seed=seeds, strength=st.floats(1e-3, 1e3))
def test_penalty_gradient_is_autograd_vertical_and_twice_differentiable(name, seed, strength):
    """``grad P = strength sum_n mu_n xi_n`` equals autograd of ``strength / 4 sum mu^2``, its
    horizontal part vanishes, and HVPs through ``P`` equal those of the plain formula."""
    model, _, s = build(name, seed)
    params = list(s.bind(model).values())
    penalty = gf.OrbitSelectionPenalty(s, strength)
    plain = strength / 4 * gf.imbalance(model, s).square().sum()
    assert abs(float(penalty(model).detach() / plain.detach()) - 1) <= 1e-13
    want = torch.autograd.grad(plain, params, create_graph=True)
    got = torch.autograd.grad(penalty(model), params, create_graph=True)
    scale = max(float(g.abs().max()) for g in want)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) <= 1e-13 * scale
    closed = penalty.grad(model)
    assert all(rel(closed[k], w) <= 1e-13 for k, w in zip(s.params, want, strict=True))
    v = [torch.randn_like(p) for p in params]
    hvp = [torch.autograd.grad(g, params, v, retain_graph=True)[0] for g in (got, want)]
    hvp = [torch.autograd.grad(sum((g * u).sum() for g, u in zip(gs, v, strict=True)), params)
           for gs in (got, want)]  # fmt: skip
    assert max(rel(a, b) for a, b in zip(*hvp, strict=True)) <= 1e-12
    horizontal = gf.project(closed, model, s, onto="horizontal")
    assert float(flat(horizontal, s.params).norm()) <= 1e-10 * float(flat(closed, s.params).norm())


# -- the exact orbit step -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
@SETTINGS
@given(seed=seeds, relative=st.floats(1e-4, 1e4), repeats=st.integers(1, 3))
def test_relax_keeps_the_function_and_never_raises_mu_or_f(name, seed, relative, repeats):
    """Whatever the rate, ``relax_`` keeps the function to rounding and neither ``||mu||`` (over
    generators with a closed orbit) nor ``F`` increases."""
    model, x, s = build(name, seed, gauge=1.5)
    y0, rate = output(model, x), relative / s_max(model, s)
    mu, f = live_mu(model, s)
    for _ in range(repeats):
        gf.relax_(model, s, rate)
        mu1, f1 = live_mu(model, s)
        assert float(mu1.norm()) <= float(mu.norm()) * (1 + 1e-12)
        assert f1 <= f * (1 + 1e-13)
        mu, f = mu1, f1
    assert rel(output(model, x), y0) <= 1e-10


@pytest.mark.parametrize("name", ARCHS)
def test_small_relax_step_is_minus_rate_mu_and_its_change_is_linear(name):
    """For a small rate the step is ``h = -rate mu`` exactly and ``mu`` moves by
    ``-2 rate K mu``; what is left is second order: halving the rate quarters it."""
    residuals = []
    for relative in (1e-5, 5e-6):
        model, _, s = build(name, 3)
        mu0 = gf.imbalance(model, s).detach()
        rate = relative / s_max(model, s)
        gram = gf.generators_gram(model, s).to_dense()
        h = gf.relax_(model, s, rate)
        assert torch.equal(h, -rate * mu0)
        change = gf.imbalance(model, s).detach() - mu0
        residual = float((change + 2 * rate * gram @ mu0).norm())
        assert residual <= 1e-4 * float(change.norm())
        residuals.append(residual)
    assert 3.9 <= residuals[0] / residuals[1] <= 4.1


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_every_mode_decays_at_its_predicted_rate(name):
    """Near balance (``mu ~ 1e-6 S``), penalty-only gradient descent at a small step decays each
    eigenmode of ``K`` at ``2 strength k_i`` (the rates of :func:`relaxation_rates`)."""
    model, _, s = build(name, 1)
    gf.balance_(model, s, tol=1e-14)
    strength = 0.5
    result = gf.relaxation_rates(model, s, strength)
    modes, rates = result.modes, result.rates
    gram = gf.generators_gram(model, s).to_dense()
    eps = 1e-6 * float(torch.diagonal(gram).mean())
    gf.apply_gauge_(model, s, eps / 2 * torch.linalg.solve(gram, modes.sum(dim=1)))
    a0 = modes.T @ gf.imbalance(model, s).detach()
    lr, steps = 1e-3 / float(rates[-1]), 1000
    params = s.bind(model)
    for _ in range(steps):
        with torch.no_grad():
            for k, g in gf.soft.orbit_selection_grad(model, s, strength).items():
                params[k] -= lr * g
    a = modes.T @ gf.imbalance(model, s).detach()
    measured = -torch.log(a / a0) / (steps * lr)
    assert float((measured / rates - 1).abs().max()) <= 0.02


# -- coordinates and projections ------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
@SETTINGS
@given(seed=seeds, prior=seeds)
def test_coordinates_round_trip_and_are_invariant_under_a_prior_gauge(name, seed, prior):
    model, _, s = build(name, seed)
    coords = gf.gauge_coordinates(model, s)
    assert coords.converged and coords.mu_rel_max <= 1e-12
    state = model.state_dict()
    back = coords.to_state_dict()
    assert all(rel(back[k], v) <= 1e-12 for k, v in state.items() if v.is_floating_point())
    h0 = gf.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(prior))
    moved = gf.gauge_coordinates(model, s)
    assert all(rel(moved.balanced[k], v) <= 1e-10 for k, v in coords.balanced.items()
               if v.is_floating_point())  # fmt: skip
    assert float((moved.h - coords.h - h0).abs().max()) <= 1e-10


@pytest.mark.parametrize("name", ARCHS)
@SETTINGS
@given(seed=seeds, vector_seed=seeds)
def test_project_is_the_euclidean_orthogonal_projection(name, seed, vector_seed):
    """``Pi_V + Pi_H = I``, both idempotent and self-adjoint, ``Pi_V xi_m = xi_m``, and
    ``Pi_H Pi_V = 0``, in the Euclidean metric on all the model's parameters."""
    model, _, s = build(name, seed)
    gen = torch.Generator().manual_seed(vector_seed)
    v, w = ({k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
            for _ in range(2))  # fmt: skip
    names = list(v)
    scale = float(flat(v, names).norm()) * float(flat(w, names).norm())
    vertical, horizontal = (gf.project(v, model, s, onto=o) for o in ("vertical", "horizontal"))
    total = flat(vertical, names) + flat(horizontal, names)
    assert float((total - flat(v, names)).abs().max()) <= 1e-15 * float(flat(v, names).abs().max())
    for part, onto in ((vertical, "vertical"), (horizontal, "horizontal")):
        again = gf.project(part, model, s, onto=onto)
        assert float((flat(again, names) - flat(part, names)).norm()) <= 1e-10 * scale**0.5
        pw = flat(gf.project(w, model, s, onto=onto), names)
        assert abs(float(flat(part, names) @ flat(w, names) - flat(v, names) @ pw)) <= 1e-10 * scale
    cross = gf.project(vertical, model, s, onto="horizontal")
    assert float(flat(cross, names).norm()) <= 1e-10 * scale**0.5
    params = {k: p.detach() for k, p in s.bind(model).items()}
    c = torch.zeros(s.num_generators, dtype=DT)
    c[seed % s.num_generators] = 1.0
    xi = generator_combination(params, s, c)
    fixed = flat(gf.project(xi, model, s), s.params) - flat(xi, s.params)
    assert float(fixed.norm()) <= 1e-10 * float(flat(xi, s.params).norm())
    gram = gf.generators_gram(model, s).to_dense()
    assert torch.allclose(
        gram @ c, generator_pairing(params, xi, s), rtol=0, atol=1e-14 * float(gram.abs().max())
    )


def test_project_keeps_dtype_of_float32_and_bfloat16_vectors():
    """Arithmetic in float64, results rounded once to each vector's dtype."""
    model, _, s = build("gpt", 2)
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    exact = gf.project(v, model, s)
    for dtype in (torch.float32, torch.bfloat16):
        got = gf.project({k: t.to(dtype) for k, t in v.items()}, model, s)
        want = gf.project({k: t.to(dtype).to(DT) for k, t in v.items()}, model, s)
        assert all(got[k].dtype == dtype for k in got)
        assert all(torch.equal(got[k], want[k].to(dtype)) for k in got)
    assert set(exact) == set(v)


# -- diagnostics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_predicted_imbalance_change_is_exact_for_one_sgd_step(name):
    model, x, s = build(name, 4)
    y = model(x)
    y = y.logits if hasattr(y, "logits") else y
    (y.square().mean() + 0.3 * y.sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for wd in (0.0, 0.3):
        predicted = gf.predicted_imbalance_change(model, grads, s, lr=2.0, weight_decay=wd)
        moved = copy.deepcopy(model)
        for k, p in moved.named_parameters():
            p.grad = grads[k].clone()
        torch.optim.SGD(moved.parameters(), lr=2.0, weight_decay=wd).step()
        change = (gf.imbalance(moved, s) - gf.imbalance(model, s)).detach()
        assert rel(predicted, change) <= 1e-12


class Quadratic(nn.Module):
    """``model(A) = w``, so ``loss_fn(w, A) = w^T A w / 2`` has the Hessian ``A``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=DT))

    def forward(self, a: Tensor) -> Tensor:
        return self.w


def quadratic(w: Tensor, a: Tensor) -> Tensor:
    return 0.5 * w @ a @ w


@pytest.mark.parametrize(
    "eigenvalues", [[-10.0, 1.0, 0.5], [-10.0, -5.0, -1.0], [3.0, -3.0], [-100.0, 2.0, 1.9, -0.5]]
)
@pytest.mark.parametrize("krylov_dim", [2, 50])
def test_sharpness_is_the_largest_algebraic_eigenvalue_of_an_indefinite_hessian(
    eigenvalues, krylov_dim
):
    """The docs promise the largest algebraic eigenvalue (not the largest magnitude), also
    with a Krylov dimension above the number of parameters."""
    n = len(eigenvalues)
    torch.manual_seed(n)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T
    result = gf.sharpness(
        Quadratic(n), quadratic, (a,), a, krylov_dim=krylov_dim, tol=1e-10, iters=5000
    )
    assert result.converged
    assert abs(result.value - max(eigenvalues)) <= 1e-9 * max(map(abs, eigenvalues))
    vector = result.vector["w"]
    assert float((a @ vector - result.value * vector).norm()) <= 1e-8 * max(map(abs, eigenvalues))


def test_no_generators_everywhere():
    """A model without gauge neurons: every function answers without work."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    assert s.num_generators == 0
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    assert all(torch.equal(t, v[k]) for k, t in gf.project(v, model, s, "horizontal").items())
    assert all(not t.any() for t in gf.project(v, model, s).values())
    assert gf.generators_gram(model, s).shape == (0, 0)
    assert gf.relaxation_rates(model, s, 1.0).rates.numel() == 0
    assert float(gf.OrbitSelectionPenalty(s, 1.0)(model)) == 0.0
    assert gf.relax_(model, s, 1.0).numel() == 0
    assert gf.gauge_coordinates(model, s).h.numel() == 0


# -- regressions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_gauge_tensors_refuses_an_h_that_is_not_one_finite_entry_per_generator(name):
    """Before the fix an ``h`` with an extra entry silently scaled every entry no generator acts
    on (the dummy slot ``N``: GPT's parameters changed by up to 9.6, breaking the function), one
    entry short silently left the last generator out, and a NaN ``h`` gave NaN tensors."""
    model, _, s = build(name)
    params = {k: p.detach() for k, p in s.bind(model).items()}
    n = s.num_generators
    longer = torch.zeros(n + 1, dtype=DT)
    longer[n] = 1.0
    for h in (longer, torch.ones(n - 1, dtype=DT), torch.full((n,), math.nan, dtype=DT)):
        with pytest.raises(ValueError, match="h must"):
            gauge_tensors(params, s, h)
    h = torch.randn(n, dtype=DT)
    moved = copy.deepcopy(model)
    gf.apply_gauge_(moved, s, h)
    assert all(
        rel(t, s.bind(moved)[k].detach()) <= 1e-15 for k, t in gauge_tensors(params, s, h).items()
    )


def test_gauge_tensors_refuses_to_overflow_a_tensor_dtype():
    """Before the fix ``g(h)`` of float32 tensors silently came back with inf entries."""
    model, _, s = build("mlp")
    params = {k: p.detach().float() for k, p in s.bind(model).items()}
    h = torch.full((s.num_generators,), 100.0, dtype=DT)
    with pytest.raises(ValueError, match="overflows"):
        gauge_tensors(params, s, h)
    assert all(torch.isfinite(t).all() for t in gauge_tensors(params, s, h / 10).values())


def test_generator_combination_refuses_coefficients_of_another_length():
    """Before the fix a coefficient vector one too long put its last entry on every entry no
    generator acts on (GPT: non-zero where ``sum_n c_n xi_n`` is 0)."""
    model, _, s = build("gpt")
    params = {k: p.detach() for k, p in s.bind(model).items()}
    for size in (s.num_generators + 1, s.num_generators - 1):
        with pytest.raises(ValueError, match="one coefficient per generator"):
            generator_combination(params, s, torch.ones(size, dtype=DT))


def test_project_names_a_non_finite_model_parameter():
    """Before the fix a NaN weight of the model was reported as ``vectors: <xi_n, v> overflows
    float64``, blaming finite vectors."""
    model, _, s = build("mlp")
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="parameter '0.weight' contains NaN"):
        gf.project(v, model, s)


def test_sparse_relaxation_rates_find_the_zero_rate_of_a_singular_gram_matrix():
    """A generator whose entries are all zero makes ``K`` singular (a zero rate). Before the fix
    the sparse path fell back to plain Lanczos at the smallest eigenvalues, which returned the
    next rates instead (0.2388 for 0) and located the slowest mode at another generator."""
    model, _, s = build("gpt")
    block = model.blocks[0]
    with torch.no_grad():
        block.fc.weight[0].zero_()
        block.fc.bias[0] = 0.0
        block.out.weight[:, 0] = 0.0
    dense = gf.relaxation_rates(model, s, 0.5)
    assert float(dense.rates[0]) <= 1e-14
    for k in (1, 2, 5):
        sparse = gf.relaxation_rates(model, s, 0.5, k=k)
        expected = torch.cat([dense.rates[:k], dense.rates[-k:]])
        assert float((sparse.rates - expected).abs().max()) <= 1e-10 * float(dense.rates[-1])
        assert sparse.slowest_generator == dense.slowest_generator


def test_sparse_relaxation_rates_of_an_all_zero_model():
    """Every generator all-zero: ``K = 0`` and every rate is 0. Before the fix the sparse path
    raised SciPy's ``ArpackError`` ("Starting vector is zero")."""
    torch.manual_seed(0)
    model = zoo.mlp((4, 9, 9, 3)).double()
    s = gf.discover(model, torch.randn(1, 4, dtype=DT))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = gf.relaxation_rates(model, s, 1.0, k=2)
    assert not result.complete and torch.equal(result.rates, torch.zeros(4, dtype=DT))
    assert torch.equal(result.modes.T @ result.modes, torch.eye(4, dtype=DT))


def float32_mlp(scale: float) -> tuple[nn.Module, gf.GaugeStructure]:
    """A float32 ReLU MLP off balance (a random gauge), every entry then times ``scale``."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 4, 2)).float()
    s = gf.discover(model, torch.randn(1, 3))
    gf.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model, s


def test_relax_float32_parameters_whose_squares_overflow_float32():
    """Finite float32 parameters around ``1e20`` have squares beyond float32's range. Before the
    fix ``relax_`` then silently returned ``h = 0`` as if it had relaxed; it now says so in one
    line, and nothing moves."""
    model, s = float32_mlp(1e20)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="squared parameters overflow") as err:
        gf.relax_(model, s, 1e6 / 4e40)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_predicted_imbalance_change_names_a_gradient_that_is_missing():
    """A gauged parameter missing from ``grads`` (or not a tensor); before the fix that read
    "the structure does not match: no parameter ...", as if the structure were another
    model's. ``None`` is a parameter the loss does not reach (SGD leaves it in place)."""
    model, _, s = build("mlp")
    grads = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    del grads["0.weight"]
    with pytest.raises(ValueError, match="grads: no tensor for the gauged parameter '0.weight'"):
        gf.predicted_imbalance_change(model, grads, s, 0.1)
    grads["0.weight"] = 0.0
    with pytest.raises(ValueError, match="gauged parameter '0.weight' \\(got float\\)"):
        gf.predicted_imbalance_change(model, grads, s, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_project_takes_vectors_on_another_device():
    """The docs: results come back in each input's dtype and device."""
    model, _, s = build("mlp")
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    on_cpu = gf.project(v, model, s)
    on_gpu = gf.project({k: t.cuda() for k, t in v.items()}, model, s)
    assert all(t.is_cuda and torch.equal(t.cpu(), on_cpu[k]) for k, t in on_gpu.items())


# -- float32 statistics out of range (gaugefix/moment.py, outside this audit's files) --------------


def test_float32_imbalance_stats_of_subnormal_sums():
    """Entries around ``1e-20`` have subnormal float32 squares: ``mu / S`` divided by
    float32's smallest normal number instead of ``S`` (``mu_rel_max`` 0.025 where a float64
    copy has 0.944, an unbalanced model looking healthy); now only the subnormals' precision is
    lost."""
    model, s = float32_mlp(1e-20)
    stats = gf.imbalance_stats(model, s)
    wide = gf.imbalance_stats(copy.deepcopy(model).double(), s)
    assert stats["nonfinite_count"] == 0 and stats["dead_count"] == 0
    assert abs(stats["mu_rel_max"] - wide["mu_rel_max"]) <= 1e-4


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_float32_imbalance_stats_out_of_float32_range(scale):
    model, s = float32_mlp(scale)
    stats = gf.imbalance_stats(model, s)
    wide = gf.imbalance_stats(copy.deepcopy(model).double(), s)
    assert stats["nonfinite_count"] == 0 and stats["dead_count"] == 0
    assert abs(stats["mu_rel_max"] - wide["mu_rel_max"]) <= 1e-6


def test_sparse_relaxation_rates_find_a_repeated_zero_rate_as_often_as_it_repeats():
    """Three dead neurons (zero on both sides) give ``K`` a threefold zero eigenvalue; from a
    start of all ones ARPACK met that eigenspace in one direction and returned a single zero
    (the next two rates were then K's fourth and fifth)."""
    torch.manual_seed(0)
    model = zoo.mlp((6, 40, 40, 1)).double()
    s = gf.discover(model, torch.randn(2, 6, dtype=torch.float64))
    with torch.no_grad():
        for n in (5, 17, 30):
            model[0].weight[n], model[0].bias[n], model[2].weight[:, n] = 0, 0, 0
    found = gf.relaxation_rates(model, s, 0.5, k=5)
    assert not found.complete
    true = torch.linalg.eigvalsh(gf.generators_gram(model, s).to_dense())
    scale = float(true[-1])
    assert float((found.rates[:5] - true[:5]).abs().max()) <= 1e-10 * scale
    assert float((found.rates[5:] - true[-5:]).abs().max()) <= 1e-10 * scale
