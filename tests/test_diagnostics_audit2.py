"""Second audit of ``gaugefix.diagnostics`` in float64: relaxation rates of restricted
structures and of float32 weights against ``K`` built from tangents certified by
``torch.func.jvp``, the one-step change of ``mu`` with shared and mixed-dtype parameters, the
sharpness of dropout, buffer, linear and negatively curved losses against the dense Hessian, and
bad input (complex, ``meta`` or sparse tensors, an unusable seed, step coefficients beyond
float64, an operation without forward-mode AD) refused in one line with nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugefix as gf
from gaugefix import zoo
from test_diagnostics_audit import action_weights

EXACT = 1e-12  # relative tolerance of the algebraic identities in float64


# -- K from certified tangents ----------------------------------------------------------------


def tangents(model: nn.Module, structure: gf.GaugeStructure, x: torch.Tensor) -> torch.Tensor:
    """``X [N, E]``: ``xi_n = w_n(e) theta_e`` over all parameters (``named_parameters`` order),
    ``w_n(e)`` read from the action (``g(log 2 e_n)`` doubles an entry equal to 1 ``w`` times).
    Each ``xi_n`` is certified a symmetry: ``jvp`` of the model's output along it vanishes."""
    weights = action_weights(copy.deepcopy(model).double(), structure)
    reference = copy.deepcopy(model).double()
    theta = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    names = [n for n, _ in reference.named_parameters()]
    sizes = [p.numel() for p in reference.parameters()]
    shapes = [p.shape for p in reference.parameters()]

    def out(v: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}
        return torch.func.functional_call(reference, params, (x.double(),))

    xs = weights * theta
    scale = float(out(theta).abs().max())
    for xi in xs:
        assert float(torch.func.jvp(out, (theta,), (xi,))[1].abs().max()) <= EXACT * scale
    return xs


def mlp_and_input(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return zoo.mlp((4, 9, 7, 3)).to(dtype), torch.randn(1, 4, dtype=dtype)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_rates_of_a_restricted_structure_are_the_principal_submatrix_eigenvalues():
    model, x = mlp_and_input()
    s = gf.discover(model, x)
    keep = torch.arange(s.num_generators) % 3 == 0
    sub = s.restrict(keep, "audit")
    xs = tangents(model, s, x)
    ev = 1.4 * torch.linalg.eigvalsh((xs @ xs.T)[keep][:, keep])
    dense = gf.relaxation_rates(model, sub, 0.7)
    assert dense.complete and dense.rates.shape == (int(keep.sum()),)
    assert relative(dense.rates, ev) <= EXACT
    sparse = gf.relaxation_rates(model, sub, 0.7, k=2)
    assert relative(sparse.rates, torch.cat([ev[:2], ev[-2:]])) <= EXACT


@pytest.mark.parametrize("k", [None, 3])
def test_rates_of_float32_weights_unscaled_are_float64_exact(k):
    """The largest ``|entry|`` in ``[1/2, 1)``: the weights are not scaled (nor cast) before
    ``K`` is formed; ``K`` of the float32 values is still squared in float64."""
    model, x = mlp_and_input(torch.float32)
    with torch.no_grad():
        top = max(float(p.abs().max()) for p in model.parameters())
        for p in model.parameters():
            p.mul_(0.75 / top)
    s = gf.discover(model, x)
    xs = tangents(model, s, x)
    ev = 2 * torch.linalg.eigvalsh(xs @ xs.T)
    result = gf.relaxation_rates(model, s, 1.0, k=k)
    assert result.rates.dtype == torch.float64
    want = ev if k is None else torch.cat([ev[:k], ev[-k:]])
    assert relative(result.rates, want) <= EXACT


def test_rates_refuse_complex_weights_and_modify_nothing():
    """Was: the imaginary parts were dropped (a ``ComplexWarning``) and the rates of the real
    parts returned."""
    model, x = mlp_and_input()
    s = gf.discover(model, x)
    model = model.to(torch.complex128)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="parameter '0.weight' must be a floating-point tensor"):
        gf.relaxation_rates(model, s, 1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- the one-step change of mu ----------------------------------------------------------------


class Shared(nn.Module):
    """One hidden layer applied twice (shared weights) between two others."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.b(F.relu(self.a(x))))))
        return self.c(h)


class Mixed(nn.Module):
    """A float64 layer feeding a float32 one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(3, 5).double(), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.a(x)).float()).double()


def sgd_change(model: nn.Module, still: set[str], replay: bool) -> tuple[torch.Tensor, ...]:
    """Predicted and actual change of ``mu`` under SGD (lr 0.7, wd 0.3) of a squared error;
    the gradients of ``still`` are ``None``. ``replay``: the step taken exactly, in float64, on a
    float64 copy of the parameters (instead of ``torch.optim.SGD`` in their dtype)."""
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    s = gf.discover(model, x[:1])
    named = dict(model.named_parameters())
    values = torch.autograd.grad((model(x) - y).square().sum(), list(named.values()))
    grads = dict(zip(named, values, strict=True))
    g = {n: None if n in still else t for n, t in grads.items()}
    target = copy.deepcopy(model).double() if replay else model
    before = gf.imbalance(target, s).detach()
    predicted = gf.predicted_imbalance_change(model, g, s, 0.7, 0.3)
    with torch.no_grad():
        for n, p in target.named_parameters():
            if g[n] is not None:
                p.grad = g[n].to(p.dtype)
        torch.optim.SGD(target.parameters(), lr=0.7, weight_decay=0.3).step()
    return predicted, gf.imbalance(target, s).detach() - before


@pytest.mark.parametrize("still", [set(), {"b.bias"}, {"a.weight", "c.weight"}])
def test_predicted_change_with_a_layer_shared_twice(still):
    predicted, actual = sgd_change(Shared().double(), still, replay=False)
    assert float(actual.abs().max()) > 1e-2
    assert relative(predicted, actual) <= EXACT


def test_predicted_change_of_mixed_dtypes_with_a_still_parameter():
    """The cross term over the moving entries is formed in float64: exact for the step with the
    given (float32-rounded) gradients, replayed in float64."""
    predicted, actual = sgd_change(Mixed(), {"a.bias"}, replay=True)
    assert predicted.dtype == torch.float64
    assert relative(predicted, actual) <= EXACT


def test_predicted_change_refuses_meta_and_sparse_tensors_in_one_line():
    """Was: ``meta`` weights or gradients raised ``Tensor.item() cannot be called on meta
    tensors``; a sparse gradient (``nn.Embedding(sparse=True)``) a 93-line
    ``NotImplementedError``."""
    model, x = mlp_and_input()
    s = gf.discover(model, x)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    kept = {n: t.clone() for n, t in g.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (copy.deepcopy(model).to("meta"), g, "parameter '0.weight' is on the meta device"),
        (model, {**g, "2.weight": g["2.weight"].to("meta")}, "grads: '2.weight' is on the meta"),
        (model, {**g, "0.bias": g["0.bias"].to_sparse()}, "grads: '0.bias' must be a dense"),
    ]
    for target, grads, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            gf.predicted_imbalance_change(target, grads, s, 0.1, 0.1)
        assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(t, kept[n]) for n, t in g.items())


# -- sharpness ----------------------------------------------------------------------------------


def dense_spectrum(model: nn.Module, loss_fn, args: tuple, target, rng: torch.Tensor):
    """The Hessian's eigenvalues over the parameters that require grad, each evaluation from the
    random state ``rng`` and fresh copies of the buffers (the global state restored after)."""
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in live.values()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(v: torch.Tensor) -> torch.Tensor:
        params = {
            n: t.view(p.shape) for (n, p), t in zip(live.items(), v.split(sizes), strict=True)
        }
        torch.set_rng_state(rng)
        state = {**{n: b.clone() for n, b in buffers.items()}, **params}
        return loss_fn(torch.func.functional_call(model, state, args), target)

    saved = torch.get_rng_state()
    flat = torch.cat([p.detach().reshape(-1) for p in live.values()])
    try:
        return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
    finally:
        torch.set_rng_state(saved)


class Counted(nn.Module):
    """Dropout, and a buffer the forward updates in place and reads back (``scale`` grows by 1
    per call): every evaluation must start from the model's own buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 2))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.add_(1.0)
        return self.scale * self.net(x)


def sse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().sum()


def test_sharpness_with_dropout_and_an_updated_buffer_is_the_dense_top():
    torch.manual_seed(0)
    model = Counted().double().train()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    rng = torch.get_rng_state()
    ev = dense_spectrum(model, sse, (x,), y, rng)
    result = gf.sharpness(model, sse, x, y, tol=1e-12)
    assert result.converged and result.value == pytest.approx(float(ev[-1]), rel=1e-10)
    assert float(model.scale) == 1.0 and torch.equal(torch.get_rng_state(), rng)


def test_sharpness_is_the_largest_algebraic_eigenvalue_under_dominant_negative_curvature():
    """A maximised squared error: the Hessian's most negative eigenvalue is far larger in
    magnitude than its top, which ``sharpness`` returns (not the largest magnitude)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)

    def ascent(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -sse(out, target)

    ev = dense_spectrum(model, ascent, (x,), y, torch.get_rng_state())
    assert float(-ev[0]) > 5 * abs(float(ev[-1]))
    result = gf.sharpness(model, ascent, x, y, tol=1e-10, iters=600)
    assert result.converged
    assert result.value == pytest.approx(float(ev[-1]), rel=1e-8)


def test_sharpness_of_a_linear_loss_is_exactly_zero():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    result = gf.sharpness(model, lambda out, _: out.sum(), torch.randn(5, 4).double(), None)
    assert result.value == 0.0 and result.residual == 0.0 and result.converged


def test_sharpness_refuses_complex_parameters_and_a_seed_torch_cannot_take():
    """Was: complex parameters raised ``RuntimeError: value cannot be converted to type double
    without overflow``; ``seed=2**64`` ``ValueError: Overflow when unpacking long long``."""
    torch.manual_seed(0)
    real = nn.Linear(2, 2).double()
    model = nn.Linear(2, 2).to(torch.complex128)
    one = torch.ones(1, 2, dtype=torch.complex128)

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.abs().square().sum()

    rng = torch.get_rng_state()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="parameter 'weight' must be a floating-point tensor, got torch.complex128"
    ):
        gf.sharpness(model, loss, one, None)
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            gf.sharpness(real, loss, one.real, None, seed=seed)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert gf.sharpness(real, loss, one.real, None, seed=2**64 - 1).converged


def test_sharpness_without_forward_mode_ad_is_one_line_and_changes_nothing():
    """``weight_norm``'s kernel has no forward-mode derivative. Was: a three-line
    ``NotImplementedError`` from PyTorch (its double backward is no way out: that Hessian is not
    even symmetric, ``|H - H^T| / |H| = 0.28``)."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 5, 2)).double()
    nn.utils.parametrizations.weight_norm(model[0])
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="forward-mode .*_weight_norm_interface") as info:
        gf.sharpness(model, sse, x, y)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("lr,wd", [(1e200, 0.0), (1e160, 1e160), (1e100, 1e250)])
def test_predicted_change_refuses_step_coefficients_beyond_float64(lr, wd):
    """Was: ``OverflowError: (34, 'Numerical result out of range')`` from ``lr**2``, or ``inf``
    for every generator where ``(1 - lr wd)^2`` overflowed."""
    model, x = mlp_and_input()
    s = gf.discover(model, x)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="leave float64's range") as info:
        gf.predicted_imbalance_change(model, g, s, lr, wd)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
