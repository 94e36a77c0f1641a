"""Second audit of the gauge-adapted coordinates and the tangent projections, against oracles
built by hand: the orbit tangents ``d/dh (g(h) . theta)`` by ``torch.func.jvp`` through an
action written from the structure's terms alone, a dense least-squares projection onto their
span, the function on fresh inputs. Models: dead and half-dead neurons, tied weights, generators
coupled through residual sums, norm gains and attention pairs (``zoo.GPT``), gated units, frozen
parameters, mixed dtypes, float32; then the regressions this audit found (each failed before its
fix): NaN/inf on entries no generator acts on, ``rtol >= 1``, parameters whose squares leave
float64's normal range."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix as gf
from architectures import assert_same_bits, snapshot, term_counts
from gaugefix import zoo
from gaugefix.coordinates import SingularGramError
from test_coordinates import isolate

pytestmark = pytest.mark.usefixtures("single_thread")

DT = torch.float64
EXACT = 1e-10  # the oracles' tolerance, relative to the norms involved
ROUND_TRIP = 1e-13  # to_state_dict() against the parameters, entrywise relative


# -- oracles ----------------------------------------------------------------------------------
def weights(s: gf.GaugeStructure) -> dict[str, Tensor]:
    """``w_n(e)`` per gauged parameter, ``[N, *shape]`` float64, from the terms alone."""
    return {name: plus - minus for name, (plus, minus) in term_counts(s).items()}


def acted(params: dict[str, Tensor], w: dict[str, Tensor], h: Tensor) -> tuple[Tensor, ...]:
    """``g(h) . theta`` flattened per parameter: ``theta_e exp(sum_n w_n(e) h_n)``."""
    return tuple(
        (params[k].detach().to(DT) * torch.exp(torch.tensordot(h, w[k], dims=1))).reshape(-1)
        for k in sorted(w)
    )


def tangents(model: nn.Module, s: gf.GaugeStructure) -> Tensor:
    """``[N, P]``: row ``n`` is ``d/dh_n (g(h) . theta)`` at ``h = 0``, by ``torch.func.jvp``."""
    params, w = s.bind(model), weights(s)
    zero = torch.zeros(s.num_generators, dtype=DT)
    rows = [
        torch.cat(torch.func.jvp(lambda h: acted(params, w, h), (zero,), (e,))[1])
        for e in torch.eye(s.num_generators, dtype=DT)
    ]
    return torch.stack(rows)


def flat(vectors: dict[str, Tensor], s: gf.GaugeStructure) -> Tensor:
    return torch.cat([vectors[k].detach().to(DT).reshape(-1) for k in sorted(s.params)])


def random_vectors(model: nn.Module, seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (scale * torch.randn(p.shape, generator=gen, dtype=DT)).to(p.dtype)
        for k, p in model.named_parameters()
    }


def check_projection(model: nn.Module, s: gf.GaugeStructure, v: dict[str, Tensor]) -> None:
    """``Pi_V v`` is the dense least-squares projection onto the tangents, ``Pi_H v`` is
    orthogonal to each of them, the two sum to ``v``; model and ``v`` bitwise unchanged."""
    state, saved = snapshot(model), {k: t.clone() for k, t in v.items()}
    vertical = gf.project(v, model, s)
    horizontal = gf.project(v, model, s, onto="horizontal")
    assert_same_bits(model, state)
    assert all(torch.equal(v[k], saved[k]) for k in v)
    xi, flat_v = tangents(model, s), flat(v, s)
    c = torch.linalg.lstsq(xi.T, flat_v[:, None], driver="gelsd").solution
    expected = (xi.T @ c)[:, 0]
    size = float(flat_v.norm())
    assert float((flat(vertical, s) - expected).norm()) <= EXACT * size
    b = xi @ flat(horizontal, s)
    assert bool((b.abs() <= EXACT * xi.norm(dim=1) * size).all())
    for k, t in v.items():
        assert vertical[k].dtype == t.dtype and horizontal[k].dtype == t.dtype, k
        total = vertical[k].to(DT) + horizontal[k].to(DT)
        eps = torch.finfo(t.dtype).eps
        assert float((total - t.to(DT)).abs().max()) <= 2 * eps * max(size, 1e-300), k


def check_coordinates(
    model: nn.Module, s: gf.GaugeStructure, inputs: tuple, allow_dead: bool = False
) -> None:
    """Round trip entrywise, ``mu(balanced) = 0`` on live generators, the same function on
    fresh inputs, and under ``random_gauge_``: ``balanced`` unchanged, ``h`` moved by ``h0``."""
    state = snapshot(model)
    coords = gf.gauge_coordinates(model, s, allow_dead=allow_dead)
    assert_same_bits(model, state)
    back = coords.to_state_dict()
    for k, t in state.items():
        if t.is_floating_point():
            rel = (back[k] - t).abs() / t.abs().clamp_min(1e-300)
            assert bool((rel <= ROUND_TRIP).all() | (back[k] == t).all()), k
    live = torch.ones(s.num_generators, dtype=torch.bool)
    live[coords.dead_generators] = False
    w, bal = weights(s), {k: coords.balanced[k].to(DT) for k in s.params}
    mu = sum((w[k] * bal[k].square()).reshape(s.num_generators, -1).sum(1) for k in w)
    size = sum((w[k].abs() * bal[k].square()).reshape(s.num_generators, -1).sum(1) for k in w)
    assert bool((mu.abs()[live] <= 1e-12 * size[live]).all())
    twin = copy.deepcopy(model)
    twin.load_state_dict(coords.balanced)
    with torch.no_grad():
        expected, found = model(*inputs), twin(*inputs)
    assert float((found - expected).abs().max()) <= EXACT * float(expected.abs().max())
    twin.load_state_dict(state)
    h0 = gf.random_gauge_(twin, s, 1.5, torch.Generator().manual_seed(7))
    if coords.dead_generators.numel():  # the dead keep h = 0: only gauges 0 there commute
        h0[coords.dead_generators] = 0
        twin.load_state_dict(state)
        gf.apply_gauge_(twin, s, h0)
    moved = gf.gauge_coordinates(twin, s, allow_dead=allow_dead)
    assert float((moved.h - coords.h - h0).abs().max()) <= EXACT
    for k in s.params:
        scale = float(coords.balanced[k].abs().max())
        assert float((moved.balanced[k] - coords.balanced[k]).abs().max()) <= EXACT * scale


# -- models -----------------------------------------------------------------------------------
class SelfLoop(nn.Module):
    """``fc2(relu(h + mid(h)))``, ``h = relu(fc1(x))``: the residual sum couples ``mid``'s row
    and column generators into the neurons of ``fc1``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(F.relu(h + self.mid(h)))


class Gated(nn.Module):
    """``down(relu(gate(x)) * up(x))``: gate and up generators sharing ``down``'s columns."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(3, 4), nn.Linear(3, 4, bias=False)
        self.down = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


class Tied(nn.Module):
    """An MLP whose middle ``Linear`` is also registered under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.net = zoo.mlp((3, 5, 4, 2))
        self.alias = self.net[2]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def gpt(tied: bool) -> nn.Module:
    return zoo.GPT(vocab=11, dim=8, heads=2, layers=2, hidden=8, context=6, tied=tied)


MODELS = {
    "mlp": (lambda: zoo.mlp((3, 5, 4, 2)), lambda g: (torch.randn(4, 3, generator=g, dtype=DT),)),
    "self_loop": (SelfLoop, lambda g: (torch.randn(4, 3, generator=g, dtype=DT),)),
    "gated": (Gated, lambda g: (torch.randn(4, 3, generator=g, dtype=DT),)),
    "tied": (Tied, lambda g: (torch.randn(4, 3, generator=g, dtype=DT),)),
    "gpt": (lambda: gpt(False), lambda g: (torch.randint(0, 11, (2, 6), generator=g),)),
    "gpt_tied": (lambda: gpt(True), lambda g: (torch.randint(0, 11, (2, 6), generator=g),)),
}


def built(name: str, seed: int = 0, gauge: float = 1.0) -> tuple[nn.Module, gf.GaugeStructure]:
    """A float64 model in eval mode moved by ``random_gauge_(gauge)``, and its structure."""
    factory, inputs = MODELS[name]
    torch.manual_seed(seed)
    model = factory().double().eval()
    s = gf.discover(model, *inputs(torch.Generator().manual_seed(seed)))
    gf.random_gauge_(model, s, gauge, torch.Generator().manual_seed(seed + 1))
    return model, s


def fresh(name: str, seed: int = 11) -> tuple:
    return MODELS[name][1](torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_projection_and_coordinates_against_the_oracles(name, seed):
    model, s = built(name, seed)
    check_projection(model, s, random_vectors(model, seed + 5))
    check_coordinates(model, s, fresh(name))


@torch.no_grad()
def test_dead_and_half_dead_neurons_and_frozen_parameters():
    """Neuron 1 dead (no incoming entries), neuron 7 half dead the other way (no outgoing),
    every other parameter frozen: coordinates with ``allow_dead`` keep the dead at ``h = 0``
    and factor the rest covariantly; ``K`` has a zero row only for an all-zero generator,
    so the projection works with one side zeroed and is refused with both."""
    model, s = built("mlp")
    model[0].weight[1] = 0
    model[0].bias[1] = 0
    model[4].weight[:, 2] = 0
    for p in list(model.parameters())[::2]:
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"2 dead generator\(s\).*1 \(neuron of layer '0'\)"):
        gf.gauge_coordinates(model, s)
    check_coordinates(model, s, fresh("mlp"), allow_dead=True)
    check_projection(model, s, random_vectors(model, 3))
    model[2].weight[:, 1] = 0  # neuron 1: now no entry at all
    v, state = random_vectors(model, 3), snapshot(model)
    with pytest.raises(SingularGramError, match=r"1 \(neuron of layer '0'\)") as info:
        gf.project(v, model, s)
    assert info.value.generators == [1]
    assert_same_bits(model, state)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_float32_and_mixed_dtype_models_project_as_their_float64_values(name):
    """A model with float32 layers (all, or every other one): the projection is that of the
    float64 model holding the same values, in each vector's dtype; vectors of mixed dtypes."""
    model, s = built(name)
    params = list(model.parameters())
    for i, p in enumerate(params):
        if name == "mlp" or i % 2:
            p.data = p.data.float()
    reference = copy.deepcopy(model).double()
    v = random_vectors(model, 4)  # in each parameter's dtype
    check_projection(reference, s, {k: t.double() for k, t in v.items()})
    for onto in ("vertical", "horizontal"):
        found = gf.project(v, model, s, onto=onto)
        expected = gf.project({k: t.double() for k, t in v.items()}, reference, s, onto=onto)
        for k, t in found.items():
            assert t.dtype == v[k].dtype, k
            assert torch.equal(t, expected[k].to(t.dtype)), k


# -- regressions ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(("name", "entry"), [("0.weight", (4, 0)), ("2.weight", (0, 3))])
def test_non_finite_vector_entry_no_generator_acts_on_is_refused(bad, name, entry):
    """A structure restricted to neurons 0 and 1: ``0.weight[4, 0]`` and ``2.weight[0, 3]``
    carry no generator. Before the fix a NaN or inf there never reached ``<xi_n, v>``, so it
    passed the check and came back in ``Pi_H v`` (the docs promise a ``ValueError`` naming
    the parameter for a gauged parameter's vector holding NaN/inf)."""
    model, s = built("mlp")
    keep = torch.zeros(s.num_generators, dtype=torch.bool)
    keep[:2] = True
    restricted = s.restrict(keep, "audit")
    v = random_vectors(model, 2)
    v[name][entry] = bad
    saved, state = {k: t.clone() for k, t in v.items()}, snapshot(model)
    for onto in ("vertical", "horizontal"):
        with pytest.raises(ValueError, match=f"'{name}' contains NaN or inf"):
            gf.project(v, model, restricted, onto=onto)
    assert_same_bits(model, state)
    assert all(torch.equal(v[k], saved[k]) for k in v if k != name)
    assert torch.equal(v[name].nan_to_num(), saved[name].nan_to_num())
    v[name][entry] = 0.5  # the same vector, finite: projected as the oracle says
    check_projection(model, restricted, v)


@pytest.mark.parametrize("rtol", [1.0, 2.0, 1e300])
def test_rtol_of_one_or_more_is_refused(rtol):
    """``||b - K c|| <= rtol (||b|| + ||K|| ||c||)`` holds for ``c = 0`` once ``rtol >= 1``:
    before the fix ``project`` returned ``Pi_V v = 0`` and ``Pi_H v = v`` without solving."""
    model, s = built("mlp")
    v = random_vectors(model, 2)
    with pytest.raises(ValueError, match="rtol must be"):
        gf.project(v, model, s, rtol=rtol)
    assert float(flat(gf.project(v, model, s, rtol=0.5), s).norm()) > 0


@pytest.mark.parametrize("exponent", [-540, -512, -500, 500, 514, 540])
def test_projection_and_coordinates_at_extreme_scales(exponent):
    """The model at ``2^e theta`` (``1e-163`` to ``1e162``): ``Pi_V`` is that at ``theta`` (the
    span of the tangents does not scale), ``h`` the same and ``balanced`` scaled by ``2^e``,
    exactly. Before the fix the squares left float64's normal range: near ``1e-151`` the
    projection was ``3e-13`` off, from ``1e-153`` refused as ill-conditioned (``RuntimeError``);
    the coordinates reported ``converged`` with ``mu_rel_max = 1.05e-13 > tol`` at ``2^-512``,
    ``h`` off by ``2.5e-7`` at ``2^-515``; above ``1.3e154`` both refused an overflow."""
    model, s = built("mlp")
    v = random_vectors(model, 2)
    expected, coords = gf.project(v, model, s), gf.gauge_coordinates(model, s)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0**exponent)
    state = snapshot(model)
    found = gf.project(v, model, s)
    assert float((flat(found, s) - flat(expected, s)).norm()) <= 1e-13 * float(flat(v, s).norm())
    scaled = gf.gauge_coordinates(model, s)
    assert_same_bits(model, state)
    assert scaled.converged and scaled.mu_rel_max <= 1e-13
    assert torch.equal(scaled.h, coords.h)
    for k in s.params:
        assert torch.equal(scaled.balanced[k], coords.balanced[k] * 2.0**exponent), k


@pytest.mark.parametrize(
    "call",
    [
        lambda m, s, v: gf.gauge_coordinates(m, s),
        lambda m, s, v: gf.project(v, m, s),
        lambda m, s, v: gf.coordinates.ungrounded_generators(m, s),
        lambda m, s, v: gf.coordinates.gram_solve(m, s, torch.ones(s.num_generators, dtype=DT)),
    ],
    ids=["gauge_coordinates", "project", "ungrounded_generators", "gram_solve"],
)
def test_a_model_on_the_meta_device_is_one_clear_error(call):
    """Parameters without data: before the fix ``ungrounded_generators`` failed inside PyTorch
    (``RuntimeError: Tensor.item() cannot be called on meta tensors``)."""
    model, s = built("mlp")
    v = random_vectors(model, 2)
    with pytest.raises(ValueError, match="'0.weight' is on the meta device"):
        call(model.to("meta"), s, v)


@pytest.mark.parametrize("onto", ["vertical", "horizontal"])
def test_a_projection_its_dtype_cannot_hold_is_refused(onto):
    """float16 vectors of ``60000`` everywhere: entries of both projections reach ``9e4``,
    beyond float16's ``65504``. Before the fix they came back as ``inf`` silently; now
    ``ValueError`` names a parameter, the inputs unchanged; at ``6000`` the projections are
    those of the float64 vectors rounded once."""
    model, s = built("mlp")
    v = {k: torch.full(p.shape, 60000.0, dtype=torch.float16) for k, p in model.named_parameters()}
    saved, state = {k: t.clone() for k, t in v.items()}, snapshot(model)
    with pytest.raises(ValueError, match=r"projection of '\d\.\w+' overflows .*float16"):
        gf.project(v, model, s, onto=onto)
    assert_same_bits(model, state)
    assert all(torch.equal(v[k], saved[k]) for k in v)
    small = {k: t / 10 for k, t in v.items()}
    expected = gf.project({k: t.double() for k, t in small.items()}, model, s, onto=onto)
    found = gf.project(small, model, s, onto=onto)
    assert all(torch.equal(found[k], expected[k].half()) for k in v)


@pytest.mark.parametrize("tiny", [1e-156, 1e-158, 1e-160])
def test_converged_is_not_claimed_for_a_neuron_whose_squares_are_subnormal(tiny):
    """Neuron 1 of a model at scale 1 with every entry times ``1e-156`` to ``1e-160``: its
    squares are below float64's smallest normal number, where ``mu_1`` has few digits. Before
    the fix ``converged`` was true while ``|mu_1| / S_1`` of ``balanced`` (read at the neuron's
    own scale) was ``6e-11`` and ``2.6e-7 > tol``; the round trip holds all the same."""
    model, s = built("mlp")
    with torch.no_grad():
        for t in (model[0].weight[1], model[0].bias[1:2], model[2].weight[:, 1]):
            t.mul_(tiny)
    state = snapshot(model)
    coords = gf.gauge_coordinates(model, s)
    own = [coords.balanced[k].to(DT) / tiny for k in ("0.weight", "0.bias", "2.weight")]
    s_in = own[0][1].square().sum() + own[1][1].square()
    s_out = own[2][:, 1].square().sum()
    ratio = float((s_in - s_out).abs() / (s_in + s_out))
    assert not coords.converged or ratio <= 1e-13
    back = coords.to_state_dict()
    for k, t in state.items():
        assert bool(((back[k] - t).abs() <= ROUND_TRIP * t.abs()).all()), k


@pytest.mark.xfail(
    strict=True,
    reason="cond(K) = 2.4e18 > 1 / eps: project's refinement on the tangent residual cannot "
    "recover the digits the solves with K = xi xi^T lose along the near dependence; documented, "
    "not refused: Pi_V is 4.5e-9 of ||v|| off here (3.5e-8 before the refinement; a dense "
    "least-squares solve on the tangents: 5e-9, Householder QR: 9.6e-10)",
)
def test_projection_where_two_generators_are_nearly_a_stabiliser():
    """Residual self-loop neurons 0 and 2 isolated but for one incoming weight of ``1e-9``: ``K``
    is non-singular (nothing refused), its smallest eigenvalue ``1e-18`` of the largest. Checked
    against the projection in 60 digits (``mpmath``)."""
    mpmath = pytest.importorskip("mpmath")
    torch.manual_seed(0)
    model = SelfLoop().double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(1))
    isolate(model, [0, 2])  # K singular on them (refused) but for one weight:
    with torch.no_grad():
        model.fc1.weight[0, 0] = 1e-9
    v = random_vectors(model, 3)
    xi, flat_v = tangents(model, s), flat(v, s)
    with mpmath.workdps(60):
        x = mpmath.matrix(xi.tolist())
        c = mpmath.lu_solve(x * x.T, x * mpmath.matrix(flat_v.tolist()))
        exact = torch.tensor([float(e) for e in x.T * c], dtype=DT)
    found = flat(gf.project(v, model, s), s)
    assert float((found - exact).norm()) <= EXACT * float(flat_v.norm())
