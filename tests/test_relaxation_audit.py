"""Audit of the relaxation predictions in float64: ``relaxation_rates`` against the decay of
``mu`` under ``relax_`` (one small step: error ``O(rate^2)``, checked by halving the rate) on
MLP, CNN, GPT (tied and untied), a gated MLP and a residual MLP, with frozen parameters and
open generators (which ``relax_`` holds) and dead ones; the eigen-solver on tiny, degenerate
and clustered spectra; ``predicted_imbalance_change`` against an actual SGD step with the
penalty gradient; bad input refused in one line with nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugefix as gf
from gaugefix import zoo
from test_soft_audit2 import build

DT = torch.float64
EXACT = 1e-10
STRENGTH = 0.5


def tied_gpt() -> tuple[nn.Module, gf.GaugeStructure]:
    torch.manual_seed(0)
    model = zoo.GPT(vocab=11, dim=8, heads=2, layers=1, context=8, tied=True).to(DT).eval()
    s = gf.discover(model, torch.randint(0, 11, (2, 5)))
    gf.random_gauge_(model, s, 0.7, generator=torch.Generator().manual_seed(1))
    return model, s


def architecture(name: str) -> tuple[nn.Module, gf.GaugeStructure]:
    if name == "gpt-tied":
        return tied_gpt()
    model, _, s = build(name)
    return model, s


def moving(model: nn.Module, s: gf.GaugeStructure) -> torch.Tensor:
    """Bool ``[N]``: the generators ``relax_`` moves (closed orbit, no frozen parameter)."""
    params = s.bind(model)
    frozen = s.touching([n for n, p in params.items() if not p.requires_grad])
    s_in, s_out = gf.moment.in_out_sums(model, s)
    return ~frozen & ~((s_in == 0) ^ (s_out == 0))


def decay_error(model: nn.Module, s: gf.GaugeStructure, rate: float) -> tuple[float, float]:
    """One ``relax_`` at ``rate``: ``max_i |a_i' - exp(-rate_i t) a_i|`` over the modes
    ``a = U^T mu`` with ``t = rate / strength``, and ``max_i |a_i' - a_i|``."""
    model = copy.deepcopy(model)
    result = gf.relaxation_rates(model, s, STRENGTH)
    before = result.modes.T @ gf.imbalance(model, s)
    gf.relax_(model, s, rate)
    after = result.modes.T @ gf.imbalance(model, s)
    predicted = torch.exp(-result.rates * rate / STRENGTH) * before
    return float((after - predicted).abs().max()), float((after - before).abs().max())


def assert_second_order(model: nn.Module, s: gf.GaugeStructure) -> None:
    """The documented order: the one-step error is ``O(rate^2)``, a quarter at half the rate."""
    top = float(gf.relaxation_rates(model, s, 1.0).rates.max())
    rate = 1e-3 / top
    err, change = decay_error(model, s, rate)
    half, _ = decay_error(model, s, rate / 2)
    assert err <= 1e-2 * change
    assert 3.5 <= err / half <= 4.5, (err, half)


@pytest.mark.parametrize("name", ["mlp", "cnn-bn", "residual", "gpt", "gpt-tied", "llama"])
def test_rates_predict_one_relax_step_to_second_order(name):
    model, s = architecture(name)
    assert_second_order(model, s)


def freeze_first(model: nn.Module, s: gf.GaugeStructure) -> str:
    name = next(n for n in s.param_order if s.touching([n]).any())
    dict(model.named_parameters())[name].requires_grad_(False)
    return name


@pytest.mark.parametrize("name", ["mlp", "residual", "gpt"])
def test_rates_with_a_frozen_parameter_predict_relax(name):
    """``relax_`` holds the generators on a frozen parameter: the rates are those of the
    others' Gram matrix ``K_AA``, its modes zero on the held rows (left eigenvectors)."""
    model, s = architecture(name)
    freeze_first(model, s)
    assert_second_order(model, s)


def principal_rates(model: nn.Module, s: gf.GaugeStructure) -> torch.Tensor:
    keep = moving(model, s)
    gram = gf.generators_gram(model, s).to_dense()[keep][:, keep]
    return torch.linalg.eigvalsh(2 * STRENGTH * gram)


def check_held(model: nn.Module, s: gf.GaugeStructure, k: int | None) -> None:
    keep = moving(model, s)
    assert not keep.all()
    result = gf.relaxation_rates(model, s, STRENGTH, k=k)
    want = principal_rates(model, s)
    got = result.rates
    if not result.complete:
        half = got.numel() // 2
        want = torch.cat([want[:half], want[-half:]])
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= EXACT * float(want.abs().max())
    assert float(result.modes[~keep].abs().max()) == 0.0
    assert bool(keep[result.slowest_generator]) and bool(keep[result.fastest_generator])


@pytest.mark.parametrize("k", [None, 2])
def test_frozen_generators_are_left_out_of_the_rates(k):
    model, s = architecture("residual")
    freeze_first(model, s)
    check_held(model, s, k)


def open_mlp() -> tuple[nn.Module, gf.GaugeStructure]:
    """A ReLU MLP whose first hidden unit has no incoming weights or bias: an open generator."""
    model, s = architecture("mlp")
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.0
    return model, s


@pytest.mark.parametrize("k", [None, 2])
def test_open_generators_are_left_out_of_the_rates(k):
    model, s = open_mlp()
    check_held(model, s, k)


def test_rates_with_an_open_generator_predict_relax():
    model, s = open_mlp()
    assert_second_order(model, s)


def test_all_frozen_model_has_no_rates():
    model, s = architecture("mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    result = gf.relaxation_rates(model, s, STRENGTH)
    assert result.rates.numel() == 0 and result.modes.shape == (s.num_generators, 0)
    assert result.complete and result.slowest_generator is None and result.fastest_layer is None


def test_dead_generators_keep_their_exact_zero_rate():
    model, s = architecture("mlp")
    with torch.no_grad():
        model[0].weight[:2] = 0.0
        model[0].bias[:2] = 0.0
        model[2].weight[:, :2] = 0.0
    dense = gf.relaxation_rates(model, s, STRENGTH)
    assert dense.rates.numel() == s.num_generators
    assert int((dense.rates == 0).sum()) >= 2
    sparse = gf.relaxation_rates(model, s, STRENGTH, k=3)
    assert torch.equal(sparse.rates[:2], torch.zeros(2, dtype=DT))


@pytest.mark.parametrize("k", [None, 2])
def test_float32_rates_are_those_of_the_float64_copy(k):
    """``K`` is formed in float64 from the float32 values, which float64 holds exactly."""
    model, s = architecture("gpt")
    freeze_first(model, s)
    model = model.float()
    got = gf.relaxation_rates(model, s, STRENGTH, k=k)
    want = gf.relaxation_rates(copy.deepcopy(model).double(), s, STRENGTH, k=k)
    assert got.rates.dtype == DT and got.rates.shape == want.rates.shape
    assert float((got.rates - want.rates).abs().max()) <= EXACT * float(want.rates.abs().max())


# -- the eigen-solver on small, degenerate and clustered spectra ------------------------------


def two_layer(hidden: int, scales: list[float]) -> tuple[nn.Module, gf.GaugeStructure]:
    """``K = diag(S)`` with ``S_n`` set by ``scales`` (repeats give a degenerate spectrum)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2)).to(DT)
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    with torch.no_grad():
        factor = torch.tensor(scales, dtype=DT)
        model[0].weight.mul_(factor[:, None])
        model[0].bias.mul_(factor)
    return model, s


@pytest.mark.parametrize(
    "scales",
    [[1.0], [1.0, 1.0], [1.0, 2.0, 3.0], [1.0] * 7,
     [1.0, 1.0 + 1e-9, 1.0 + 2e-9, 5.0, 5.0, 9.0, 9.0], [1e-8, 1.0, 1.0, 1.0, 1e3, 1e3, 1e3, 1e3]],
)  # fmt: skip
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_rates_match_the_dense_ones(scales, k):
    model, s = two_layer(len(scales), scales)
    dense = gf.relaxation_rates(model, s, STRENGTH)
    sparse = gf.relaxation_rates(model, s, STRENGTH, k=k)
    want = dense.rates
    if not sparse.complete:
        want = torch.cat([want[:k], want[-k:]])
    assert float((sparse.rates - want).abs().max()) <= EXACT * float(want.abs().max())
    eye = torch.eye(sparse.modes.shape[1], dtype=DT)
    assert float((sparse.modes.T @ sparse.modes - eye).abs().max()) <= EXACT


def test_no_generators():
    model = nn.Linear(3, 2).to(DT)
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    assert s.num_generators == 0
    result = gf.relaxation_rates(model, s, STRENGTH, k=1)
    assert result.rates.numel() == 0 and result.complete


# -- the one-step change of mu --------------------------------------------------------------


def loss_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("wd", [0.0, 0.3])
@pytest.mark.parametrize("freeze", [False, True])
def test_predicted_change_with_the_penalty_gradient_is_one_sgd_step(wd, freeze):
    """``grads`` holding the loss gradient plus the penalty's (as ``GaugeFixing``'s penalty
    mode leaves ``.grad`` before the step): the cross term ``-2 lr <xi_n, g>`` no longer
    vanishes, and the prediction must still be the step's change."""
    model, _, s = build("mlp")
    if freeze:
        freeze_first(model, s)
    x = torch.randn(3, 4, dtype=DT)
    grads = loss_grads(model, x)
    for name, g in gf.soft.orbit_selection_grad(model, s, 2.0).items():
        if model.get_parameter(name).requires_grad:
            grads[name] = grads[name] + g
            model.get_parameter(name).grad = grads[name]
    lr = 0.05
    before = gf.imbalance(model, s).detach().clone()
    predicted = gf.predicted_imbalance_change(model, grads, s, lr, wd)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr, weight_decay=wd).step()
    actual = gf.imbalance(model, s).detach() - before
    assert float((predicted - actual).abs().max()) <= EXACT * float(actual.abs().max())


# -- bad input --------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf"), True, "1", None])
def test_bad_strength_is_one_line_and_changes_nothing(strength):
    model, s = architecture("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="strength") as info:
        gf.relaxation_rates(model, s, strength)
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))


@pytest.mark.parametrize("lr", [float("nan"), -0.1, float("inf")])
def test_bad_lr_is_one_line(lr):
    model, s = architecture("mlp")
    grads = loss_grads(model, torch.randn(3, 4, dtype=DT))
    before = snapshot(model)
    with pytest.raises(ValueError, match="lr") as info:
        gf.predicted_imbalance_change(model, grads, s, lr)
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))


def test_a_structure_of_another_model_is_refused():
    model, s = architecture("mlp")
    other, _ = architecture("gpt")
    with pytest.raises(ValueError) as info:
        gf.relaxation_rates(other, s, STRENGTH)
    assert "\n" not in str(info.value)


def test_non_finite_parameters_are_refused():
    model, s = architecture("mlp")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        gf.relaxation_rates(model, s, STRENGTH, k=2)
    after = snapshot(model)
    assert all(a.equal(b) or a.isnan().equal(b.isnan()) for a, b in zip(before, after, strict=True))
