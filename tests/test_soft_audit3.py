"""Third audit of :mod:`gaugefix.soft`: the penalty checked against a hand computation and
finite differences, its gradient's tangency on tied and dead-neuron models, ``relax_``'s sign
and monotonicity guarantees, frozen parameters, ``nn.DataParallel``, an empty structure, and bad
input refused with nothing modified (parameters, gradients and optimizer state, bit for bit).
Regressions for the defects found (each failed before its fix) are marked as such."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, jvp

import gaugefix as gf
from architectures import ZOO_ARCHS, gauged_zoo_model
from gaugefix import zoo

DT = torch.float64
STRENGTH = 0.37
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


class Tied(nn.Module):
    """A ReLU MLP whose two hidden-to-hidden layers share one weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(i, o) for i, o in [(4, 6), (6, 6), (6, 6), (6, 2)]
        )
        self.c.weight = self.b.weight

    def forward(self, x: Tensor) -> Tensor:
        for layer in (self.a, self.b, self.c):
            x = torch.relu(layer(x))
        return self.d(x)


def mlp(widths=(4, 6, 5, 3), seed: int = 0, gauge: float = 1.0, dtype=DT):
    """A ReLU MLP off balance (a seeded random gauge), its input and structure."""
    torch.manual_seed(seed)
    model = zoo.mlp(widths).to(dtype)
    x = torch.randn(3, widths[0], dtype=dtype)
    s = gf.discover(model, x)
    gf.random_gauge_(model, s, gauge, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, s


def tied(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied().double()
    x = torch.randn(5, 4, dtype=DT)
    s = gf.discover(model, x)
    gf.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, s


def dead(seed: int = 0):
    """An MLP whose first hidden neuron has no outgoing weight (no closed orbit) and whose
    second has no incoming weight nor bias."""
    model, x, s = mlp(seed=seed)
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0
        model[0].weight[1], model[0].bias[1] = 0.0, 0.0
    return model, x, s


MODELS = {"mlp": mlp, "tied": tied, "dead": dead}


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> list[Tensor]:
    """Every parameter, gradient and optimizer state tensor, cloned."""
    out = []
    for p in model.parameters():
        out += [p.detach().clone()] + ([p.grad.clone()] if p.grad is not None else [])
        if opt is not None:
            out += [v.clone() for v in opt.state[p].values() if isinstance(v, Tensor)]
    return out


def assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def with_adam(model: nn.Module, x: Tensor) -> torch.optim.Optimizer:
    """Adam after one step, with a fresh gradient in every ``.grad``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        if not opt.state:
            opt.step()
    return opt


def live_mu(model: nn.Module, s: gf.GaugeStructure) -> tuple[Tensor, Tensor, float]:
    """``(mu over generators with a closed orbit, S = S_in + S_out, F)``, float64."""
    with torch.no_grad():
        s_in, s_out = gf.moment.in_out_sums(model, s)
        live = (s_in > 0) & (s_out > 0)
        f = sum(float(p.double().square().sum()) for p in s.bind(model).values())
    return torch.where(live, s_in - s_out, 0.0).double(), (s_in + s_out).double(), f


# -- the functional and its gradient ------------------------------------------------------------


def hand_mu(model: nn.Sequential) -> list[Tensor]:
    """Per hidden layer of a ReLU MLP, ``mu = ||incoming row||^2 + bias^2 - ||outgoing col||^2``
    from the weights alone."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    out = []
    for a, b in zip(linears, linears[1:], strict=False):
        w_in, bias, w_out = a.weight.detach(), a.bias.detach(), b.weight.detach()
        out.append(w_in.square().sum(1) + bias.square() - w_out.square().sum(0))
    return out


def hand_grad(model: nn.Sequential, strength: float) -> dict[str, Tensor]:
    """``dP/dtheta_e = strength (mu_producer(e) - mu_consumer(e)) theta_e`` per layer by hand."""
    linears = [(k, m) for k, m in model.named_children() if isinstance(m, nn.Linear)]
    mus = hand_mu(model)
    grads = {}
    for i, (k, m) in enumerate(linears):
        row = mus[i] if i < len(mus) else torch.zeros(m.out_features, dtype=DT)
        col = mus[i - 1] if i > 0 else torch.zeros(m.in_features, dtype=DT)
        grads[f"{k}.weight"] = strength * (row[:, None] - col[None, :]) * m.weight.detach()
        if i < len(mus):
            grads[f"{k}.bias"] = strength * row * m.bias.detach()
    return grads


@pytest.mark.parametrize("seed", range(3))
def test_penalty_value_and_gradients_equal_the_hand_computation(seed):
    """``P`` equals ``strength / 4 sum mu^2`` with ``mu`` computed from the weights by hand; its
    autograd gradient, ``grad`` and ``add_grad_`` all equal the hand closed form (1e-12)."""
    model, _, s = mlp(seed=seed)
    penalty = gf.OrbitSelectionPenalty(s, STRENGTH)
    want = STRENGTH / 4 * sum(float(m.square().sum()) for m in hand_mu(model))
    assert abs(float(penalty(model).detach()) / want - 1) <= 1e-13
    hand = hand_grad(model, STRENGTH)
    params = s.bind(model)
    assert set(params) == set(hand)  # the output bias is no gauged parameter
    scale = max(float(g.abs().max()) for g in hand.values())
    auto = dict(
        zip(params, torch.autograd.grad(penalty(model), list(params.values())), strict=True)
    )
    penalty.add_grad_(model)
    for got in (auto, penalty.grad(model), {k: p.grad for k, p in params.items()}):
        assert max(float((got[k] - g).abs().max()) for k, g in hand.items()) <= 1e-12 * scale


def directional(f, theta: list[Tensor], v: list[Tensor], eps: float) -> float:
    """Richardson-extrapolated central difference of ``f`` along ``v``: exact (to rounding) for
    a polynomial of degree 4, as ``P`` is in ``theta``."""

    def central(e: float) -> float:
        plus = f([t + e * u for t, u in zip(theta, v, strict=True)])
        minus = f([t - e * u for t, u in zip(theta, v, strict=True)])
        return (plus - minus) / (2 * e)

    return (4 * central(eps / 2) - central(eps)) / 3


@pytest.mark.parametrize("name", [*ZOO_ARCHS, "tied", "dead"])
def test_penalty_gradient_equals_finite_differences(name):
    """``<grad P, v>`` equals the derivative of ``P`` along ``v`` (1e-10, float64)."""
    if name in MODELS:
        model, _, s = MODELS[name]()
    else:
        model, _, s = gauged_zoo_model(name, 0)
    params = s.bind(model)
    names, theta = list(params), [p.detach() for p in params.values()]
    penalty = gf.OrbitSelectionPenalty(s, STRENGTH)
    grads = penalty.grad(model)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        v = [torch.randn(t.shape, generator=gen, dtype=DT) for t in theta]
        size = math.sqrt(sum(float(t.square().sum()) for t in theta))
        size /= math.sqrt(sum(float(u.square().sum()) for u in v))

        def f(ts: list[Tensor]) -> float:
            return float(penalty(dict(zip(names, ts, strict=True))))

        fd = directional(f, theta, v, 0.1 * size)
        closed = sum(float((grads[k] * u).sum()) for k, u in zip(names, v, strict=True))
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        norm *= math.sqrt(sum(float(u.square().sum()) for u in v))
        assert abs(fd - closed) <= 1e-10 * norm


@pytest.mark.parametrize("name", ["tied", "dead"])
def test_penalty_gradient_is_tangent_to_the_orbit(name):
    """The outputs' JVP along ``grad P`` is at rounding: ``<= 1e-12`` of the JVP along a random
    direction of the same norm (a tied weight and dead neurons included)."""
    model, x, s = MODELS[name]()
    params = {k: p.detach() for k, p in model.named_parameters()}
    grads = gf.OrbitSelectionPenalty(s, 1.0).grad(model)
    v = {k: grads.get(k, torch.zeros_like(p)) for k, p in params.items()}
    gen = torch.Generator().manual_seed(3)
    r = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}
    scale = math.sqrt(sum(float(t.square().sum()) for t in v.values()))
    scale /= math.sqrt(sum(float(t.square().sum()) for t in r.values()))

    def f(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (x,))

    along = jvp(f, (params,), (v,))[1]
    random = jvp(f, (params,), ({k: t * scale for k, t in r.items()},))[1]
    assert scale > 0 and float(along.norm()) <= 1e-12 * float(random.norm())


# -- the exact orbit step -------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**16), log_rate=st.floats(-6.0, 6.0))
def test_isolated_generators_never_overshoot(seed, log_rate):
    """Two-layer MLP (``K`` diagonal): for every rate, each ``mu_n`` keeps its sign or lands on
    0 (to rounding), ``||mu||`` and ``F`` do not increase, the function is kept."""
    model, x, s = mlp((5, 9, 3), seed=seed, gauge=1.5)
    mu, total, f = live_mu(model, s)
    rate = 10**log_rate / float(total.max())
    y = model(x).detach()
    gf.relax_(model, s, rate)
    mu1, _, f1 = live_mu(model, s)
    assert bool((mu1 * mu.sign() >= -1e-14 * total).all())
    assert float(mu1.norm()) <= float(mu.norm()) and f1 <= f * (1 + 1e-15)
    assert float((model(x).detach() - y).abs().max()) <= 1e-12 * float(y.abs().max())


@pytest.mark.parametrize("name", ["tied", "dead"])
@pytest.mark.parametrize("per_generator", [False, True])
def test_relax_is_monotone_with_tied_weights_dead_generators_and_per_generator_rates(
    name, per_generator
):
    """Repeated steps at rates from 1e-3 to 1e3 (per generator: alternately 0): ``||mu||`` over
    the live generators and ``F`` never increase, dead generators keep ``h = 0``, a zero rate
    keeps ``h_n = 0``, the function is kept to 1e-12."""
    base, x, s = MODELS[name]()
    y = base(x).detach()
    for rate in (1e-3, 1e-1, 1.0, 1e1, 1e3):
        model = copy.deepcopy(base)
        if per_generator:
            rate = torch.full((s.num_generators,), rate, dtype=DT)
            rate[::2] = 0.0
        mu, total, f = live_mu(model, s)
        for _ in range(4):
            h = gf.relax_(model, s, rate)
            assert bool((h[mu == 0] == 0).all()) and (
                not per_generator or bool((h[::2] == 0).all())
            )
            mu1, _, f1 = live_mu(model, s)
            assert float(mu1.norm()) <= float(mu.norm()) * (1 + 1e-14) and f1 <= f * (1 + 1e-14)
            mu, f = mu1, f1
        assert float((model(x).detach() - y).abs().max()) <= 1e-12 * float(y.abs().max())


@pytest.mark.parametrize("how", ["held", "unheld"])
def test_relax_leaves_frozen_parameters_bit_identical(how):
    """Regression: ``relax_`` moved parameters with ``requires_grad=False`` (by factors up to
    exp(0.93)). Now the generators touching one keep ``h = 0``: the frozen parameter, its
    gradient and its optimizer state stay bit-identical, the others relax, the function is
    kept."""
    model, x, s = mlp(seed=1)
    opt = with_adam(model, x)
    frozen = model[2].weight
    frozen.requires_grad_(False)
    if how == "unheld":
        group = opt.param_groups[0]
        group["params"] = [p for p in group["params"] if p is not frozen]
        del opt.state[frozen]
    keep = [frozen.detach().clone(), frozen.grad.clone()]
    keep += [v.clone() for v in opt.state[frozen].values()]
    mu, _, _ = live_mu(model, s)
    y = model(x).detach()
    h = gf.relax_(model, s, 10.0, optimizer=opt)
    assert_same([frozen.detach(), frozen.grad, *opt.state[frozen].values()], keep)
    assert bool((h == 0).all())  # 2.weight touches every generator of this MLP
    model[4].weight.requires_grad_(False)
    frozen.requires_grad_(True)
    h = gf.relax_(model, s, 10.0, optimizer=opt)
    assert bool((h[:6] != 0).all()) and bool((h[6:] == 0).all())
    assert float(live_mu(model, s)[0][:6].norm()) < 1e-3 * float(mu[:6].norm())
    assert float((model(x).detach() - y).abs().max()) <= 1e-12 * float(y.abs().max())


def _float16_neuron_at_6e4() -> tuple[torch.nn.Module, gf.GaugeStructure]:
    """A float16 neuron with incoming weights ``[6e4, 6e4]``, outgoing ``6e4`` and zero biases,
    and its structure: balanced, its outgoing weight would be ``71352`` > 65504."""
    model = zoo.mlp((2, 1, 1))
    s = gf.discover(model, torch.randn(1, 2))
    model.half()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(6e4 if p.dim() == 2 else 0.0)
    return model, s


def test_relax_refuses_a_step_that_overflows_float16():
    """Regression: a float16 neuron with incoming ``[6e4, 6e4]`` and outgoing ``6e4`` balances
    at an outgoing weight of ``6e4 * 2^(1/4) = 71352`` > 65504: ``relax_`` wrote ``inf`` into
    the model. Now refused, nothing modified."""
    model, s = _float16_neuron_at_6e4()
    before = snapshot(model)
    with pytest.raises(ValueError, match="overflow parameter '2.weight'") as err:
        gf.relax_(model, s, 1e6)
    assert "\n" not in str(err.value)
    assert_same(snapshot(model), before)
    h = gf.relax_(model, s, 1e-12)  # a step that fits still moves
    assert float(h.abs().max()) > 0 and all(bool(p.isfinite().all()) for p in model.parameters())


def test_relax_refuses_a_step_that_overflows_adam_state():
    """Regression: float32 Adam ``exp_avg_sq`` near ``1e36``, transported by ``f^-2 ~ 2e4`` at
    the step, became ``inf``. Now refused, nothing modified."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 2, 1))
    s = gf.discover(model, torch.randn(1, 3))
    with torch.no_grad():
        model[0].weight.fill_(100.0), model[0].bias.fill_(100.0), model[2].weight.fill_(1e-2)
    opt = torch.optim.Adam(model.parameters())
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e19)
        if not opt.state:
            opt.step()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="overflow parameter '0.weight'"):
        gf.relax_(model, s, 1e6, optimizer=opt)
    assert_same(snapshot(model, opt), before)


def test_gauge_fixing_orbit_step_keeps_float16_parameters_finite():
    """Regression: GaugeFixing's orbit step did not check the range of float16 parameters: the
    neuron's outgoing weight of 6e4 became inf and the step counted as applied. Now the step is
    skipped (counted), nothing moves; a step that fits still moves."""
    model, s = _float16_neuron_at_6e4()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    fixing = gf.GaugeFixing(opt, model, s, strength=1e6, balance_at_start=False, every=1)
    before = snapshot(model)
    opt.step()
    assert_same(snapshot(model), before)
    assert (fixing.steps, fixing.skipped) == (0, 1)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(8.0)  # far from the range's end: balanced at outgoing 2^(7/4)
    opt.step()
    assert (fixing.steps, fixing.skipped) == (1, 1)
    assert float(model[2].weight.detach().float().sub(2**1.75).abs().max()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relax_transports_state_of_low_precision_models(dtype):
    """float32 / bfloat16: ``theta * grad`` and ``theta^2 * exp_avg_sq`` are invariant under a
    rescaling; after the step they equal their values before to the dtype's rounding, and the
    state keeps its dtype."""
    model, x, s = mlp(seed=2, dtype=dtype)
    opt = with_adam(model, x)
    params = s.bind(model)
    inv = {k: (p.double() * p.grad.double(), p.double() ** 2 * opt.state[p]["exp_avg_sq"].double())
           for k, p in params.items()}  # fmt: skip
    h = gf.relax_(model, s, 1.0, optimizer=opt)
    assert float(h.abs().max()) > 0.05
    eps = torch.finfo(dtype).eps
    for k, p in params.items():
        assert p.grad.dtype == dtype and opt.state[p]["exp_avg_sq"].dtype == dtype
        now = (p.double() * p.grad.double(), p.double() ** 2 * opt.state[p]["exp_avg_sq"].double())
        for a, b in zip(now, inv[k], strict=True):
            assert float((a - b).abs().max()) <= 8 * eps * float(b.abs().max())


def test_relax_and_penalty_through_data_parallel_on_cpu():
    """``nn.DataParallel`` (on the CPU it calls the module): ``discover`` through the wrapper
    gives the bare model's structure (as ``GaugeFixing`` binds the wrapper); the functions
    moving a model take the replica, which gives bit for bit the step and penalty of the bare
    model, and refuse the wrapper in one line naming its prefix, nothing modified."""
    bare, x, s = mlp(seed=3)
    wrapped = nn.DataParallel(copy.deepcopy(bare))
    ws = gf.discover(wrapped, x)
    assert ws.to_dict() == s.to_dict()
    replica = wrapped.module
    assert torch.equal(
        gf.OrbitSelectionPenalty(ws, 0.5)(replica), gf.OrbitSelectionPenalty(s, 0.5)(bare)
    )
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match="does not match.*'module.'"):
        gf.relax_(wrapped, ws, 1.0)
    assert_same(snapshot(wrapped), before)
    assert torch.equal(gf.relax_(replica, ws, 3.0), gf.relax_(bare, s, 3.0))
    assert all(
        torch.equal(a, b) for a, b in zip(replica.parameters(), bare.parameters(), strict=True)
    )


def test_empty_structure():
    """No generator: the penalty is an exact 0 that backpropagates, ``relax_`` moves nothing and
    returns an empty ``h`` (with an optimizer, or an empty per-generator rate), and still refuses
    a bad rate."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(2, 3, dtype=DT)
    s = gf.discover(model, x)
    assert s.num_generators == 0
    penalty = gf.OrbitSelectionPenalty(s, 1.0)
    (model(x).sum() + penalty(model)).backward()
    assert float(penalty(model)) == 0.0 and penalty.grad(model) == {}
    opt = with_adam(model, x)
    before = snapshot(model, opt)
    penalty.add_grad_(model)
    for rate in (1.0, torch.zeros(0, dtype=DT)):
        assert gf.relax_(model, s, rate, optimizer=opt).shape == (0,)
    assert_same(snapshot(model, opt), before)
    with pytest.raises(ValueError, match="rate"):
        gf.relax_(model, s, -1.0)


# -- bad input ----------------------------------------------------------------------------------

BAD_RATES = {
    "nan": math.nan,
    "negative": -1e-3,
    "bool": True,
    "bool tensor": torch.tensor(True),  # regression: read as rate 1, the model moved
    "meta tensor": torch.tensor(1.0, device="meta"),  # regression: RuntimeError
    "meta per generator": torch.ones(
        11, dtype=DT, device="meta"
    ),  # regression: NotImplementedError
    "complex tensor": torch.tensor(1 + 1j),  # regression: RuntimeError
    "negative per generator": -torch.ones(12, dtype=DT),
    "nan per generator": torch.full((11,), math.nan, dtype=DT),
    "wrong length": torch.ones(12, dtype=DT),
}


@pytest.mark.parametrize("case", list(BAD_RATES))
def test_bad_rate_is_refused_with_nothing_modified(case):
    """One ``ValueError`` naming the rate; parameters, gradients and Adam's state bit for bit as
    before."""
    model, x, s = mlp()
    assert s.num_generators == 11
    opt = with_adam(model, x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="rate") as err:
        gf.relax_(model, s, BAD_RATES[case], optimizer=opt)
    assert "\n" not in str(err.value)
    assert_same(snapshot(model, opt), before)


def test_structure_of_another_model_is_refused_with_nothing_modified():
    """Another model's structure (same layer names, other widths), to ``relax_`` and to
    ``add_grad_``: refused before anything moves, gradients and optimizer state included."""
    _, _, s = mlp((4, 6, 5, 3))
    other, x, _ = mlp((4, 7, 5, 3), seed=4)
    opt = with_adam(other, x)
    before = snapshot(other, opt)
    for call in (lambda: gf.relax_(other, s, 1.0, optimizer=opt),
                 lambda: gf.OrbitSelectionPenalty(s, 1.0).add_grad_(other)):  # fmt: skip
        with pytest.raises(ValueError, match="does not match"):
            call()
        assert_same(snapshot(other, opt), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rate_on_another_device_than_the_model():
    """A per-generator rate on the GPU for a CPU model (and the reverse) is read as numbers:
    the same step as the rate on the model's device."""
    for device in ("cpu", "cuda"):
        model, _, s = mlp()
        model.to(device)
        rate = torch.linspace(0.1, 2.0, s.num_generators, dtype=DT)
        other = "cuda" if device == "cpu" else "cpu"
        twin = copy.deepcopy(model)
        assert torch.equal(gf.relax_(model, s, rate.to(other)), gf.relax_(twin, s, rate.to(device)))
        assert all(
            torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
        )
