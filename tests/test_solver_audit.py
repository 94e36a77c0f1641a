"""Audit of the Newton solves of orbit selection (``balance_``, ``gauge_coordinates``) against
their documented contracts, with the imbalance computed by hand from the weights.

For an MLP ``Linear -> ReLU -> ... -> Linear`` hidden neuron ``j`` of layer ``k`` has
``S_in = ||W_k[j, :]||^2 + b_k[j]^2`` and ``S_out = ||W_{k+1}[:, j]||^2``; ``g(h)`` multiplies
``W_k[i, j]`` by ``exp(h_k,i - h_{k-1},j)`` and ``b_k[i]`` by ``exp(h_k,i)`` (input and output
channels have ``h = 0``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
TOL = 1e-10
EXACT = 1e-12  # function, round trip and transport, relative (float64)
WIDTHS = [4, 6, 5, 2]


def mlp(widths: list[int], seed: int = 0, dtype: torch.dtype = D) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def linears(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def hand_sides(model: nn.Sequential) -> tuple[Tensor, Tensor]:
    """``(S_in, S_out)`` of every hidden neuron, ``[N]`` each, float64, from the weights."""
    s_in, s_out = [], []
    for first, second in zip(linears(model)[:-1], linears(model)[1:], strict=True):
        w1, b1 = first.weight.detach().to(D), first.bias.detach().to(D)
        s_in.append(w1.square().sum(1) + b1.square())
        s_out.append(second.weight.detach().to(D).square().sum(0))
    return torch.cat(s_in), torch.cat(s_out)


def hand_rel(model: nn.Sequential, skip: Tensor | None = None) -> float:
    """``max |mu_n| / S_n`` by hand over the hidden neurons not in ``skip``."""
    s_in, s_out = hand_sides(model)
    ratio = (s_in - s_out).abs() / (s_in + s_out)
    keep = torch.ones_like(ratio, dtype=torch.bool)
    if skip is not None:
        keep[skip] = False
    return float(ratio[keep].max())


def hand_factors(model: nn.Sequential, h: Tensor) -> dict[str, Tensor]:
    """``exp(sum_n w_n(e) h_n)`` of every parameter, by hand."""
    lins = linears(model)
    sizes = [lin.out_features for lin in lins[:-1]]
    per_layer = [torch.zeros(lins[0].in_features, dtype=D)]
    per_layer += list(h.to(D).split(sizes)) + [torch.zeros(lins[-1].out_features, dtype=D)]
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for k, lin in enumerate(lins):
        rows, cols = per_layer[k + 1], per_layer[k]
        out[names[id(lin.weight)]] = torch.exp(rows[:, None] - cols[None, :])
        out[names[id(lin.bias)]] = torch.exp(rows)
    return out


def params64(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().to(D).clone() for n, p in model.named_parameters()}


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return float((a.to(D) - b.to(D)).abs().max()) / max(float(b.to(D).abs().max()), 1e-300)


def gauged(widths=WIDTHS, seed: int = 0, scale: float = 1.0, dtype=D):
    model = mlp(widths, seed)
    structure = gaugefix.discover(model, torch.randn(1, widths[0], dtype=D))
    gen = torch.Generator().manual_seed(seed)
    gaugefix.random_gauge_(model, structure, scale=scale, generator=gen)
    return model.to(dtype), structure


def inputs(widths=WIDTHS) -> Tensor:
    return torch.randn(7, widths[0], generator=torch.Generator().manual_seed(9), dtype=D)


def check_moved_by_h(model, before: dict[str, Tensor], h: Tensor, rel: float = EXACT) -> None:
    """Every parameter is its value before times the hand factor of the reported ``h``."""
    factors = hand_factors(model, h)
    for name, p in model.named_parameters():
        assert rel_err(p.detach(), before[name] * factors[name]) <= rel, name


def everything(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list:
    """Copies of the parameters, their flags and gradients, and the optimizer's state."""
    out = [(n, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()]
    out = [(n, v, r, None if g is None else g.clone()) for n, v, r, g in out]
    if optimizer is not None:
        out.append(copy.deepcopy(optimizer.state_dict()))
    return out


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equality (NaN included)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_bits(saved: list, model: nn.Module, optimizer=None) -> None:
    now = everything(model, optimizer)
    for (n, v, r, g), (_, v2, r2, g2) in zip(
        saved[: len(now) - bool(optimizer)], now, strict=False
    ):
        assert same_bits(v, v2) and r == r2, n
        assert (g is None) == (g2 is None) and (g is None or same_bits(g, g2)), n
    if optimizer is not None:
        old, new = saved[-1]["state"], now[-1]["state"]
        assert old.keys() == new.keys()
        for i in old:
            assert old[i].keys() == new[i].keys()
            for k in old[i]:
                assert same_bits(old[i][k], new[i][k]), (i, k)


def trained_optimizer(model: nn.Module, kind: str, steps: int = 2) -> torch.optim.Optimizer:
    """An optimizer of ``kind`` with state after ``steps`` steps, and fresh ``.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = {
        "sgd": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
        "adam": lambda: torch.optim.Adam(params, lr=1e-3),
        "adamw-amsgrad": lambda: torch.optim.AdamW(params, lr=1e-3, amsgrad=True),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=1e-3, initial_accumulator_value=0.1),
    }[kind]()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    x = inputs([first.in_features])
    for _ in range(steps + 1):
        optimizer.zero_grad()
        model(x.to(next(model.parameters()).dtype)).square().sum().backward()
        if _ < steps:
            optimizer.step()
    return optimizer


# -- dead generators ---------------------------------------------------------------------------

KILLS = {
    "incoming": lambda m, j: (m[0].weight[j].zero_(), m[0].bias[j].zero_()),
    "outgoing": lambda m, j: m[2].weight[:, j].zero_(),
    "both": lambda m, j: (m[0].weight[j].zero_(), m[0].bias[j].zero_(), m[2].weight[:, j].zero_()),
    # squares below float64's smallest subnormal: zero for the solve (documented)
    "underflowing": lambda m, j: (m[0].weight[j].fill_(1e-170), m[0].bias[j].fill_(1e-170)),
}


@pytest.mark.parametrize("kill", sorted(KILLS))
@pytest.mark.parametrize("seed", [0, 1])
def test_dead_generators_are_reported_kept_at_zero_and_the_rest_balanced(kill, seed):
    model, s = gauged(seed=seed, scale=1.5)
    with torch.no_grad():
        KILLS[kill](model, 2)
    x, before = inputs(), params64(model)
    y = model(x).detach()
    stats = gaugefix.imbalance_stats(model, s)
    result = gaugefix.balance_(model, s)
    assert result.dead_generators.tolist() == [2] and stats["dead_count"] == 1
    assert float(result.h[2]) == 0.0
    assert result.converged and result.mu_rel_max <= TOL
    assert hand_rel(model, skip=result.dead_generators) <= TOL
    assert rel_err(model(x).detach(), y) <= EXACT
    check_moved_by_h(model, before, result.h)


def test_a_neuron_with_only_a_bias_in_is_alive_and_balanced():
    model, s = gauged(scale=1.5)
    with torch.no_grad():
        model[0].weight[3].zero_()  # its bias alone is incoming mass
    result = gaugefix.balance_(model, s)
    assert result.dead_generators.numel() == 0 and result.converged
    assert hand_rel(model) <= TOL


# -- scales --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["one-neuron", "one-layer", "alternating", "balanced-giants"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generators_whose_squares_differ_by_1e30(layout, seed):
    model = mlp([4, 8, 8, 8, 2], seed)
    s = gaugefix.discover(model, torch.randn(1, 4, dtype=D))
    big = 1e15  # squares 1e30 apart
    with torch.no_grad():
        l0, l1, l2 = linears(model)[:3]
        if layout == "one-neuron":
            l0.weight[1] *= big
            l0.bias[1] *= big
        elif layout == "one-layer":
            l0.weight *= big
            l0.bias *= big
        elif layout == "alternating":
            l0.weight[::2] *= big
            l0.bias[::2] *= big
            l1.weight[1::2] /= big
            l1.bias[1::2] /= big
        else:  # both sides huge, then a random gauge on top
            l0.weight[0] *= big
            l0.bias[0] *= big
            l1.weight[:, 0] *= big
            l1.weight[3] *= big
            l1.bias[3] *= big
            l2.weight[:, 3] *= big
            gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(seed))
    s_in, s_out = hand_sides(model)
    assert float((s_in + s_out).max() / (s_in + s_out).min()) >= 1e25
    x, before = inputs([4]), params64(model)
    y = model(x).detach()
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= TOL and hand_rel(model) <= TOL
    assert rel_err(model(x).detach(), y) <= EXACT
    check_moved_by_h(model, before, result.h)


def test_a_single_generator_takes_the_closed_form():
    model = mlp([3, 1, 2])
    s = gaugefix.discover(model, torch.randn(1, 3, dtype=D))
    assert s.num_generators == 1
    with torch.no_grad():
        model[0].weight *= 1e3
    s_in, s_out = hand_sides(model)
    result = gaugefix.balance_(model, s)
    expected = 0.25 * math.log(float(s_out[0] / s_in[0]))
    assert result.converged and abs(float(result.h[0]) - expected) <= EXACT * abs(expected)
    assert hand_rel(model) <= TOL
    assert sorted(s.params) == ["0.bias", "0.weight", "2.weight"]
    assert result.norm_sq_before == pytest.approx(float(s_in[0] + s_out[0]), rel=1e-15)
    assert result.norm_sq_after == pytest.approx(
        2 * math.sqrt(float(s_in[0] * s_out[0])), rel=1e-13
    )


# -- tied and shared parameters ------------------------------------------------------------------


class SharedWeight(nn.Module):
    """Two branches reading one weight: neuron ``j`` of both branches shares one factor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(4, 6)
        self.c.weight = self.a.weight
        self.out = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.c(x))], -1))

    def hand_mu(self) -> tuple[Tensor, Tensor]:
        w, out = self.a.weight.detach(), self.out.weight.detach()
        s_in = w.square().sum(1) + self.a.bias.detach().square() + self.c.bias.detach().square()
        s_out = out[:, :6].square().sum(0) + out[:, 6:].square().sum(0)
        return s_in - s_out, s_in + s_out


def test_a_shared_weight_is_balanced_once_and_stays_shared():
    torch.manual_seed(0)
    model = SharedWeight().to(D)
    s = gaugefix.discover(model, torch.randn(1, 4, dtype=D))
    assert s.num_generators == 6
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(1))
    optimizer = trained_optimizer(model, "adam")
    x = inputs()
    y = model(x).detach()
    result = gaugefix.balance_(model, s, optimizer=optimizer)
    mu, total = model.hand_mu()
    assert result.converged and float((mu.abs() / total).max()) <= TOL
    assert model.c.weight is model.a.weight
    assert rel_err(model(x).detach(), y) <= EXACT


# -- dtypes --------------------------------------------------------------------------------------

# A float16 or float32 entry is the float64 result rounded (a few ulps of the factor's float32
# product); a bfloat16 one within about its eps 2^-7 (docs/balance.md).
NEAR = {torch.float32: 4 * 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("dtype", sorted(NEAR, key=str))
@pytest.mark.parametrize("seed", [0, 1])
def test_low_precision_models_solve_in_float64_and_round_once(dtype, seed):
    model, s = gauged(seed=seed, scale=1.0, dtype=dtype)
    copy64 = copy.deepcopy(model).to(D)
    result = gaugefix.balance_(model, s)
    exact = gaugefix.balance_(copy64, s)
    assert torch.equal(result.h, exact.h) and result.converged and exact.converged
    assert result.iterations == exact.iterations and hand_rel(copy64) <= TOL
    assert result.mu_rel_max == pytest.approx(hand_rel(model), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), copy64.parameters(), strict=True):
        assert p.dtype == dtype
        assert float(((p.to(D) - q) / q).abs().max()) <= NEAR[dtype], name


# -- frozen parameters ---------------------------------------------------------------------------


def test_frozen_parameters_move_with_the_orbit_and_keep_their_flags():
    """``balance_`` reaches ``mu = 0``, so it moves every parameter the structure acts on,
    ``requires_grad=False`` ones too (documented in docs/balance.md); an optimizer holding only
    the trainable ones has their state transported."""
    model, s = gauged(scale=1.0)
    for p in linears(model)[0].parameters():
        p.requires_grad_(False)
    optimizer = trained_optimizer(model, "sgd")
    x, before = inputs(), params64(model)
    y = model(x).detach()
    buffers = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()
               if p.requires_grad}  # fmt: skip
    result = gaugefix.balance_(model, s, optimizer=optimizer)
    assert result.converged and hand_rel(model) <= TOL
    assert [p.requires_grad for p in linears(model)[0].parameters()] == [False, False]
    assert not torch.equal(linears(model)[0].weight.to(D), before["0.weight"])
    check_moved_by_h(model, before, result.h)
    factors = hand_factors(model, result.h)
    for name, p in model.named_parameters():
        if p.requires_grad:
            moved = optimizer.state[p]["momentum_buffer"]
            assert rel_err(moved, buffers[id(p)] / factors[name]) <= EXACT, name
    assert rel_err(model(x).detach(), y) <= EXACT


# -- tol and max_iter ----------------------------------------------------------------------------

BAD_OPTIONS = [
    {"tol": 0.0},
    {"tol": -1e-10},
    {"tol": math.nan},
    {"tol": math.inf},
    {"tol": True},
    {"tol": "1e-10"},
    {"tol": torch.tensor(1e-10)},
    {"max_iter": -1},
    {"max_iter": True},
    {"max_iter": False},
    {"max_iter": 2.0},
    {"max_iter": math.nan},
    {"max_iter": None},
]


@pytest.mark.parametrize("kwargs", BAD_OPTIONS, ids=repr)
def test_bad_options_are_refused_with_model_and_optimizer_untouched(kwargs):
    model, s = gauged()
    optimizer = trained_optimizer(model, "adam")
    saved = everything(model, optimizer)
    with pytest.raises(ValueError, match="tol|max_iter"):
        gaugefix.balance_(model, s, optimizer=optimizer, **kwargs)
    assert_same_bits(saved, model, optimizer)
    with pytest.raises(ValueError, match="tol|max_iter"):
        gaugefix.gauge_coordinates(model, s, **kwargs)
    assert_same_bits(saved, model, optimizer)


@pytest.mark.parametrize("kwargs", [{"max_iter": np.int64(50)}, {"tol": np.float32(1e-6)}])
def test_numpy_scalars_are_numbers(kwargs):
    model, s = gauged()
    result = gaugefix.balance_(model, s, **kwargs)
    assert result.converged and hand_rel(model) <= float(kwargs.get("tol", TOL))
    assert gaugefix.gauge_coordinates(model, s, **kwargs).converged


def test_max_iter_zero_moves_nothing_and_reports_the_imbalance():
    model, s = gauged(scale=1.0)
    optimizer = trained_optimizer(model, "adam")
    saved = everything(model, optimizer)
    result = gaugefix.balance_(model, s, max_iter=0, optimizer=optimizer)
    assert_same_bits(saved, model, optimizer)
    assert result.iterations == 0 and not result.converged
    assert not bool(result.h.any()) and result.norm_sq_before == result.norm_sq_after
    assert result.mu_rel_max == pytest.approx(hand_rel(model), rel=1e-13)


def test_max_iter_one_takes_one_step_and_keeps_the_function():
    model, s = gauged(scale=1.0)
    x, before = inputs(), params64(model)
    y = model(x).detach()
    start = hand_rel(model)
    result = gaugefix.balance_(model, s, max_iter=1)
    assert result.iterations == 1 and not result.converged
    assert result.mu_rel_max == pytest.approx(hand_rel(model), rel=1e-12)
    assert result.mu_rel_max < start
    assert result.norm_sq_after < result.norm_sq_before
    check_moved_by_h(model, before, result.h)
    assert rel_err(model(x).detach(), y) <= EXACT


@pytest.mark.parametrize("tol", [1.0, 1e300])
def test_a_tolerance_every_point_meets_moves_nothing(tol):
    model, s = gauged(scale=1.0)
    saved = everything(model)
    result = gaugefix.balance_(model, s, tol=tol)
    assert_same_bits(saved, model)
    assert result.converged and result.iterations == 0


def test_a_tolerance_below_rounding_is_not_converged_but_balanced_to_rounding():
    model, s = gauged(scale=1.0)
    result = gaugefix.balance_(model, s, tol=1e-300, max_iter=20)
    assert result.iterations == 20 and not result.converged
    assert hand_rel(model) <= 1e-14 and result.mu_rel_max <= 1e-14


# -- optimizer state -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw-amsgrad"])
def test_optimizer_state_is_transported_entry_by_entry(kind):
    model, s = gauged(scale=1.0)
    optimizer = trained_optimizer(model, kind)
    old = {
        id(p): (p.grad.clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
        for p in model.parameters()
    }
    result = gaugefix.balance_(model, s, optimizer=optimizer)
    assert result.converged
    factors = hand_factors(model, result.h)
    powers = {"momentum_buffer": -1, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}
    for name, p in model.named_parameters():
        grad, state = old[id(p)]
        assert rel_err(p.grad, grad * factors[name] ** -1) <= EXACT, name
        for key, value in state.items():
            if key in powers:
                expected = value * factors[name] ** powers[key]
                assert rel_err(optimizer.state[p][key], expected) <= EXACT, (name, key)
            else:
                assert torch.equal(optimizer.state[p][key], value), (name, key)


def test_refusals_leave_model_gradients_and_optimizer_state_bit_for_bit():
    # NaN weight
    model, s = gauged()
    optimizer = trained_optimizer(model, "adam")
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    saved = everything(model, optimizer)
    with pytest.raises(ValueError, match="NaN"):
        gaugefix.balance_(model, s, optimizer=optimizer)
    assert_same_bits(saved, model, optimizer)
    # state the action cannot transport (Adagrad's sum from an initial value)
    model, s = gauged()
    optimizer = trained_optimizer(model, "adagrad")
    saved = everything(model, optimizer)
    with pytest.raises(ValueError, match="transport"):
        gaugefix.balance_(model, s, optimizer=optimizer)
    assert_same_bits(saved, model, optimizer)


def test_a_balanced_point_beyond_float16_is_refused_nothing_changed():
    """One incoming entry of 6e4 against 1000 outgoing ones: balanced, the incoming entry is
    ``6e4 * 1000^(1/4)`` > 65504."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1000)).half()
    s = gaugefix.discover(model, torch.ones(1, 1, dtype=torch.float16))
    with torch.no_grad():
        model[0].weight.fill_(6e4)
        model[2].weight.fill_(6e4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    saved = everything(model, optimizer)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.balance_(model, s, optimizer=optimizer)
    assert_same_bits(saved, model, optimizer)


# -- strict convexity ----------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [WIDTHS, [3, 5, 5, 5, 5, 1]])
def test_every_start_on_the_orbit_reaches_the_same_point(widths):
    reference, s = gauged(widths, seed=4, scale=0.0)
    x = inputs(widths)
    y = reference(x).detach()
    gaugefix.balance_(reference, s, tol=1e-13, max_iter=100)
    target = params64(reference)
    for start in range(8):
        model = copy.deepcopy(reference)
        h0 = 3.0 * torch.randn(s.num_generators, generator=torch.Generator().manual_seed(start))
        gaugefix.apply_gauge_(model, s, h0.to(D))
        result = gaugefix.balance_(model, s, tol=1e-13, max_iter=100)
        assert result.converged and hand_rel(model) <= 1e-13
        for name, p in model.named_parameters():
            assert rel_err(p.detach(), target[name]) <= 1e-10, (start, name)
        assert (result.h + h0.to(D)).abs().max() <= 1e-10
        assert rel_err(model(x).detach(), y) <= EXACT


# -- gauge coordinates ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("dead", [False, True])
def test_coordinates_round_trip_exactly_and_leave_the_model_alone(scale, dead):
    model, s = gauged(seed=2, scale=scale)
    if dead:
        with torch.no_grad():
            model[2].weight[:, 1].zero_()
    saved, theta = everything(model), params64(model)
    coords = gaugefix.gauge_coordinates(model, s, allow_dead=dead)
    assert_same_bits(saved, model)
    assert coords.converged and coords.dead_generators.tolist() == ([1] if dead else [])
    balanced = copy.deepcopy(model)
    balanced.load_state_dict(coords.balanced)
    assert hand_rel(balanced, skip=coords.dead_generators) <= 1e-13
    assert coords.mu_rel_max == pytest.approx(hand_rel(balanced, coords.dead_generators), rel=1e-9)
    factors = hand_factors(model, coords.h)
    back = coords.to_state_dict()
    for name in theta:
        assert rel_err(coords.balanced[name] * factors[name], theta[name]) <= EXACT, name
        assert rel_err(back[name], theta[name]) <= EXACT, name
    x = inputs()
    assert rel_err(balanced(x).detach(), model(x).detach()) <= EXACT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_coordinates_round_trip_to_one_ulp(dtype):
    model, s = gauged(seed=3, scale=1.0, dtype=dtype)
    saved = everything(model)
    coords = gaugefix.gauge_coordinates(model, s)
    assert_same_bits(saved, model)
    assert coords.converged and coords.h.dtype == D
    balanced = copy.deepcopy(model)
    balanced.load_state_dict(coords.balanced)
    assert coords.mu_rel_max == pytest.approx(hand_rel(balanced), rel=1e-12)
    back = coords.to_state_dict()
    for name, p in model.named_parameters():
        size = p.detach().abs()
        ulp = torch.nextafter(size, torch.full_like(size, math.inf)).to(D) - size.to(D)
        assert back[name].dtype == dtype
        assert bool(((back[name].to(D) - p.detach().to(D)).abs() <= ulp).all()), name


def test_coordinates_with_max_iter_zero_are_the_model_itself():
    model, s = gauged(scale=1.0)
    coords = gaugefix.gauge_coordinates(model, s, max_iter=0)
    assert not coords.converged and not bool(coords.h.any())
    assert coords.mu_rel_max == pytest.approx(hand_rel(model), rel=1e-13)
    for name, p in model.named_parameters():
        assert same_bits(coords.balanced[name], p.detach()), name


def test_coordinates_refuse_a_dead_generator_by_default_model_untouched():
    model, s = gauged()
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0].zero_()
    saved = everything(model)
    with pytest.raises(ValueError, match="dead generator"):
        gaugefix.gauge_coordinates(model, s)
    assert_same_bits(saved, model)


# -- a group of live generators without a closed orbit -------------------------------------------


class Cycle(nn.Module):
    """``out(relu(loop(relu(loop(relu(a(x)))))))``: ``loop.weight[i, j]`` carries ``h_i -
    h_j``, ``a.weight[i]`` ``+h_i``, ``out.weight[:, j]`` ``-h_j``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.loop, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.loop(torch.relu(self.a(x))))
        return self.out(torch.relu(self.loop(h)))


def open_cycle() -> tuple[Cycle, gaugefix.GaugeStructure]:
    """Generators 0 and 1 read each other through ``loop`` and nothing else reads them; only 0
    has other incoming mass. Each has both sides non-zero, but along ``h = t (1, 1)``,
    ``t -> -inf``, the norm decreases to an infimum it never reaches: no closed orbit."""
    torch.manual_seed(0)
    model = Cycle().to(D)
    s = gaugefix.discover(model, torch.randn(1, 4, dtype=D))
    with torch.no_grad():
        model.a.weight[1:].zero_()
        model.a.bias[1:].zero_()
        model.loop.weight.zero_()
        model.loop.bias.zero_()
        model.loop.weight[0, 1], model.loop.weight[1, 0] = 1.0, 2.0
        model.out.weight[:, :2].zero_()
    return model, s


def test_an_open_group_of_live_generators_keeps_h_0_from_any_starting_point():
    """The open group (generators 0 and 1, and 2 fed by them) has no minimum to converge to:
    held at ``h = 0`` and reported, from the model as it is and after a gauge on the group."""
    model, s = open_cycle()
    assert s.num_generators == 3
    first = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    gaugefix.apply_gauge_(model, s, torch.tensor([1.0, 1.0, 0.0], dtype=D))
    second = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    for c in (first, second):
        assert c.converged and c.dead_generators.tolist() == [0, 1, 2]
        assert c.h.abs().max() == 0


def test_an_open_group_of_live_generators_is_reported_without_a_closed_orbit():
    model, s = open_cycle()
    result = gaugefix.balance_(copy.deepcopy(model), s)
    assert result.dead_generators.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="closed orbit"):
        gaugefix.gauge_coordinates(model, s)
