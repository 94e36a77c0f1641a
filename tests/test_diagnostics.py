"""The analytic predictions of issue 4 against the established theory, in float64:
conservation of ``mu`` (Du, Hu & Lee 2018) and its exact one-step change, the relaxation rates of
soft gauge fixing, and sharpness by Lanczos on Hessian-vector products."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugefix as gf
from gaugefix import zoo


def build(name: str, seed: int = 0, train: bool = False, batch: int = 8):
    torch.manual_seed(seed)
    ctor, shape = zoo.EXAMPLES[name]
    model = ctor().double().train(train)
    x = torch.randn(batch, *shape[1:], dtype=torch.float64)
    return model, gf.discover(model, x[:1]), x


def loss_and_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    loss = 0.5 * (model(x) - target).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, dict(zip([n for n, _ in model.named_parameters()], grads, strict=True))


def targets_for(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)


# -- conservation and the exact one-step change -----------------------------------------------


def gd_drift(lr: float, horizon: float) -> tuple[float, float]:
    """Plain full-batch gradient descent for time ``horizon`` with step ``lr``: the relative
    drift ``max_n |mu_n(T) - mu_n(0)| / max_n S_n(0)``, and the relative residual of the summed
    exact identity ``mu(T) - mu(0) = sum_k lr^2 mu(g_k)``."""
    model, s, x = build("mlp", seed=2, batch=16)
    y = targets_for(model, x)
    s_in, s_out = gf.moment.in_out_sums(model, s)
    mu0 = (s_in - s_out).detach()
    predicted = torch.zeros_like(mu0)
    for _ in range(round(horizon / lr)):
        _, g = loss_and_grads(model, x, y)
        predicted += gf.predicted_imbalance_change(model, g, s, lr)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= lr * g[name]
    change = gf.imbalance(model, s).detach() - mu0
    drift = float(change.abs().max() / (s_in + s_out).detach().max())
    residual = float((change - predicted).abs().max() / change.abs().max())
    return drift, residual


def test_gradient_descent_conserves_imbalance_to_first_order_in_lr():
    drift_a, res_a = gd_drift(4e-3, horizon=1.0)
    drift_b, res_b = gd_drift(2e-3, horizon=1.0)
    drift_c, res_c = gd_drift(1e-3, horizon=1.0)
    # mu is conserved by the flow; at step lr it drifts by O(lr) over a fixed horizon.
    assert drift_a < 1e-3
    assert 1.9 <= drift_a / drift_b <= 2.1
    assert 1.9 <= drift_b / drift_c <= 2.1
    # The drift is exactly the accumulated lr^2 mu(g_k), up to rounding over the steps.
    assert max(res_a, res_b, res_c) <= 1e-9


@pytest.mark.parametrize("name,train", [("mlp", False), ("cnn", False), ("resnet", True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_one_sgd_step_changes_imbalance_by_the_formula(name, train, weight_decay):
    model, s, x = build(name, train=train)
    y = targets_for(model, x)
    lr = 2.0  # the identity is algebraic: any step size; a large one keeps rounding small
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss, g = loss_and_grads(model, x, y)
    for name_, p in model.named_parameters():
        p.grad = g[name_].clone()
    mu_before = gf.imbalance(model, s).detach()
    predicted = gf.predicted_imbalance_change(model, g, s, lr, weight_decay)
    opt.step()  # coupled L2: theta - lr (g + wd theta) = (1 - lr wd) theta - lr g
    actual = gf.imbalance(model, s).detach() - mu_before
    scale = float(predicted.abs().max())
    assert scale > 1e-3 * float(mu_before.abs().max())  # a real change, not rounding
    assert float((actual - predicted).abs().max()) <= 1e-12 * scale
    if weight_decay == 0.0:  # the change is exactly lr^2 mu(g)
        expected = lr**2 * gf.imbalance(g, s)
        assert float((actual - expected).abs().max()) <= 1e-12 * scale


def test_momentum_drift_is_what_the_formula_leaves_out():
    model, s, x = build("mlp")
    y = targets_for(model, x)
    lr = 0.2
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    residuals = []
    for _ in range(2):
        opt.zero_grad()
        _, g = loss_and_grads(model, x, y)
        for name_, p in model.named_parameters():
            p.grad = g[name_].clone()
        before = gf.imbalance(model, s).detach()
        predicted = gf.predicted_imbalance_change(model, g, s, lr)
        opt.step()
        actual = gf.imbalance(model, s).detach() - before
        residuals.append(float((actual - predicted).abs().max() / predicted.abs().max()))
    assert residuals[0] <= 1e-12  # the first momentum step is a plain step
    assert residuals[1] > 1e-3  # afterwards the buffer adds drift the formula does not see


def test_predicted_change_rejects_bad_input():
    model, s, x = build("mlp")
    _, g = loss_and_grads(model, x, targets_for(model, x))
    with pytest.raises(ValueError, match="'2.weight'"):
        gf.predicted_imbalance_change(model, {**g, "2.weight": g["2.weight"][:3]}, s, 0.1)
    with pytest.raises(ValueError, match="lr"):
        gf.predicted_imbalance_change(model, g, s, float("nan"))
    with pytest.raises(ValueError, match="weight_decay"):
        gf.predicted_imbalance_change(model, g, s, 0.1, weight_decay=-1.0)


def test_predicted_change_refuses_non_finite_or_non_float_tensors():
    model, s, x = build("mlp")
    _, g = loss_and_grads(model, x, targets_for(model, x))
    nan = g["0.weight"].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="grads: '0.weight' contains NaN or inf"):
        gf.predicted_imbalance_change(model, {**g, "0.weight": nan}, s, 0.1)
    with pytest.raises(ValueError, match="grads: '2.bias' must be a floating-point"):
        gf.predicted_imbalance_change(model, {**g, "2.bias": g["2.bias"].long()}, s, 0.1)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="parameter '2.weight' contains NaN or inf"):
        gf.predicted_imbalance_change(model, g, s, 0.1)


# -- relaxation rates -------------------------------------------------------------------------


def test_two_layer_rates_are_two_strength_s_n():
    torch.manual_seed(0)
    model = zoo.mlp((5, 7, 3)).double()
    s = gf.discover(model, torch.randn(1, 5, dtype=torch.float64))
    strength = 0.3
    result = gf.relaxation_rates(model, s, strength)
    s_in, s_out = gf.moment.in_out_sums(model, s)
    expected = torch.sort(2 * strength * (s_in + s_out)).values
    assert result.complete and result.rates.shape == (7,)
    assert torch.allclose(result.rates, expected, rtol=1e-13, atol=0)
    # Each mode is one neuron (K is diagonal): the slowest is the lightest neuron.
    assert torch.allclose(result.modes.abs().max(dim=0).values, torch.ones(7, dtype=torch.float64))
    assert result.slowest_generator == int((s_in + s_out).argmin())
    assert result.fastest_generator == int((s_in + s_out).argmax())
    assert result.slowest_layer == result.fastest_layer == "0"


def test_deep_network_modes_decay_at_predicted_rates():
    """Penalty-only gradient descent with a tiny step, in the linear regime (``mu`` ~ 1e-6 of
    ``S``, so ``K`` changes by ~1e-7 over the run): each eigenmode of ``K`` decays at
    ``2 strength k_i``. The remaining bias is the time discretisation, ``~ lr strength k_i``."""
    torch.manual_seed(0)
    model = zoo.mlp((4, 8, 7, 6, 3)).double()
    s = gf.discover(model, torch.randn(1, 4, dtype=torch.float64))
    gf.balance_(model, s, tol=1e-14)
    strength = 0.5
    result = gf.relaxation_rates(model, s, strength)
    modes, rates = result.modes, result.rates
    gram = gf.generators_gram(model, s).to_dense()
    assert torch.allclose(2 * strength * torch.linalg.eigvalsh(gram), rates, rtol=1e-12)
    # Start with mu = eps * (sum of all unit modes): mu(g(h0) theta_bar) = 2 K h0 + O(h0^2).
    eps = 1e-6 * float(torch.diagonal(gram).mean())
    gf.apply_gauge_(model, s, eps / 2 * torch.linalg.solve(gram, modes.sum(dim=1)))
    a0 = modes.T @ gf.imbalance(model, s).detach()
    assert torch.allclose(a0, torch.full_like(a0, eps), rtol=1e-3)
    lr = 1e-3 / float(rates[-1])
    steps = round(0.5 / (float(rates[0]) * lr))  # the slowest mode decays by e^-0.5
    params = list(model.parameters())
    for _ in range(steps):
        penalty = strength / 4 * gf.imbalance(model, s).square().sum()
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p -= lr * g
    a = modes.T @ gf.imbalance(model, s).detach()
    measured = -torch.log(a / a0) / (steps * lr)
    assert float((measured / rates - 1).abs().max()) <= 0.02
    moved = gf.generators_gram(model, s).to_dense()
    assert float((moved - gram).norm() / gram.norm()) <= 1e-5


def test_sparse_extremes_match_dense_rates():
    model, s, _ = build("cnn")
    dense = gf.relaxation_rates(model, s, 2.0)
    sparse = gf.relaxation_rates(model, s, 2.0, k=3)
    assert not sparse.complete and sparse.rates.shape == (6,)
    expected = torch.cat([dense.rates[:3], dense.rates[-3:]])
    assert torch.allclose(sparse.rates, expected, rtol=1e-10)
    assert sparse.slowest_layer == dense.slowest_layer
    assert sparse.fastest_layer == dense.fastest_layer
    with pytest.raises(ValueError, match="strength"):
        gf.relaxation_rates(model, s, -1.0)


def test_rates_of_a_few_generators_are_all_computed_whatever_dense_limit():
    """With ``k=None`` and more generators than ``dense_limit`` but at most ``2 * 6``, the 6
    smallest and 6 largest would overlap: all rates, once each, by the dense path."""
    torch.manual_seed(0)
    model = zoo.mlp((5, 7, 3)).double()
    s = gf.discover(model, torch.randn(1, 5, dtype=torch.float64))
    result = gf.relaxation_rates(model, s, 0.3, dense_limit=0)
    assert result.complete and result.rates.shape == (7,)
    assert torch.equal(result.rates, gf.relaxation_rates(model, s, 0.3).rates)
    for bad in (-1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="dense_limit"):
            gf.relaxation_rates(model, s, 0.3, dense_limit=bad)


# -- sharpness --------------------------------------------------------------------------------


def half_squared(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(f - y)^2 / 2`` summed (one sample here)."""
    return 0.5 * (out - target).square().sum()


def scalar_chain(weights: list[float]) -> nn.Sequential:
    layers = [nn.Linear(1, 1, bias=False).double() for _ in weights]
    with torch.no_grad():
        for layer, w in zip(layers, weights, strict=True):
            layer.weight.fill_(w)
    return nn.Sequential(*layers)


def chain_sharpness(weights: list[float], y: float) -> float:
    one = torch.ones(1, 1, dtype=torch.float64)
    result = gf.sharpness(scalar_chain(weights), half_squared, one, y * one, tol=1e-12)
    assert result.converged
    return result.value


def test_sharpness_of_ab_is_a2_plus_b2_and_smallest_when_balanced():
    y = 2.0
    values = {}
    for a in (0.25, 0.5, 1.0, math.sqrt(2), 2.0, 4.0):
        values[a] = chain_sharpness([a, y / a], y)
        assert values[a] == pytest.approx(a**2 + (y / a) ** 2, rel=1e-12)
    assert min(values, key=values.get) == math.sqrt(2)  # |a| = |b|
    assert values[math.sqrt(2)] == pytest.approx(2 * abs(y), rel=1e-12)


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
@pytest.mark.parametrize("y", [3.0, -0.5])
def test_sharpness_of_balanced_chain(depth, y):
    w = abs(y) ** (1 / depth)
    weights = [-w if (i == 0 and y < 0) else w for i in range(depth)]
    expected = depth * abs(y) ** (2 - 2 / depth)
    assert chain_sharpness(weights, y) == pytest.approx(expected, rel=1e-12)
    # Unbalancing the chain along its orbit (same function) makes it sharper.
    skewed = [weights[0] * 2, weights[1] / 2, *weights[2:]]
    assert chain_sharpness(skewed, y) > expected


def mean_squared(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(v: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(sh) for n, t, sh in zip(names, v.split(sizes), shapes, strict=True)}
        return mean_squared(torch.func.functional_call(model, params, (x,)), y)

    return loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("seed", [0, 1])
def test_sharpness_matches_dense_hessian_on_relu_mlp(seed):
    torch.manual_seed(seed)
    model = zoo.mlp((3, 8, 6, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    loss, flat = flat_loss(model, x, y)
    hessian = torch.autograd.functional.hessian(loss, flat)
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    result = gf.sharpness(model, mean_squared, x, y, tol=1e-10)
    assert result.converged
    assert abs(result.value - top) <= 1e-6 * abs(top)
    assert float(result) == result.value
    v = torch.cat([result.vector[n].reshape(-1) for n, _ in model.named_parameters()])
    assert float((hessian @ v - top * v).norm()) <= 1e-5 * abs(top)


def test_sharpness_on_a_few_million_parameters_leaves_the_model_alone():
    torch.manual_seed(0)
    model = zoo.mlp((1024, 1024, 1024, 10))  # float32, 2.1M parameters
    model.append(nn.Dropout(0.1))  # fixed masks across products; RNG restored
    x = torch.randn(32, 1024)
    y = torch.randint(0, 10, (32,))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = gf.sharpness(model, F.cross_entropy, x, y, tol=1e-4)
    assert sum(p.numel() for p in model.parameters()) > 2_000_000
    assert result.converged and result.value > 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # The Rayleigh quotient of the returned vector, by an independent double-backward product.
    loss = F.cross_entropy(_with_mask(model, x, rng), y)
    params = list(model.parameters())
    g = torch.autograd.grad(loss, params, create_graph=True)
    v = [result.vector[n] for n, _ in model.named_parameters()]
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True)), params)
    rayleigh = float(sum((h * vi).sum() for h, vi in zip(hv, v, strict=True)))
    assert rayleigh == pytest.approx(result.value, rel=1e-4)


def _with_mask(model: nn.Module, x: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    """The model's output with the dropout mask the products used (the RNG state at entry)."""
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        return model(x)
    finally:
        torch.set_rng_state(saved)


def test_sharpness_with_batchnorm_in_training_mode():
    model, _, x = build("resnet", train=True, batch=4)
    y = torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = gf.sharpness(model, F.cross_entropy, x, y, tol=1e-8)
    assert result.converged and result.value > 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sharpness_rejects_bad_arguments():
    model = scalar_chain([1.0, 1.0])
    one = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="iters"):
        gf.sharpness(model, half_squared, one, one, iters=0)
    with pytest.raises(ValueError, match="tol"):
        gf.sharpness(model, half_squared, one, one, tol=float("inf"))


def test_sharpness_refuses_non_finite_parameters_inputs_and_a_stuck_krylov_dim():
    one = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="'0.weight' contains NaN or inf"):
        gf.sharpness(scalar_chain([float("inf"), 1.0]), half_squared, one, one)
    with pytest.raises(ValueError, match="Hessian-vector product is not finite"):
        gf.sharpness(scalar_chain([1.0, 2.0]), half_squared, one * float("nan"), one)
    with pytest.raises(ValueError, match="seed"):
        gf.sharpness(scalar_chain([1.0, 2.0]), half_squared, one, one, seed=1.5)
    # One vector per cycle: the restart returns the start vector, which never moves.
    with pytest.raises(ValueError, match="krylov_dim"):
        gf.sharpness(scalar_chain([1.0, 2.0]), half_squared, one, one, krylov_dim=1)
