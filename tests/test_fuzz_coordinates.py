"""Property-based audit of the gauge-adapted coordinates, the projections and the imbalance.

Models are drawn from the grammar of ``tests/test_fuzz_architectures.py`` (attention, gated
products, norm gains, tied weights, residuals, ...) and the families of ``tests/architectures.py``
(MLPs, CNNs, ResNets, DenseNets, grouped convolutions, transformer blocks), moved by a random
gauge and optionally damaged: a generator's incoming or outgoing side zeroed (dead), both sides
zeroed (a zero generator: ``K`` singular), random rows zeroed, parameters frozen. Every property
is checked in float64 against a reference read off the structure's terms alone (the dense
weights ``w_n(e)``, :func:`architectures.term_counts`):

1. ``gauge_coordinates``: ``to_state_dict()`` is the state dict entrywise to ``1e-13``;
   ``balanced`` is unchanged and ``h`` moves by ``h0`` under ``g(h0)`` (``h0`` 0 on dead
   generators); ``converged`` implies ``mu(balanced) <= tol``; dead generators refused or listed.
2. ``project``: ``Pi_H v`` is orthogonal to every ``xi_n``, both projections idempotent, and an
   orbit tangent ``sum_n c_n xi_n`` (a function-preserving direction) has no horizontal part; a
   singular ``K`` is refused naming generators that span a null space, nothing changed.
3. ``imbalance``, ``imbalance_stats``: ``2 mu(g(h) theta)`` is autograd's gradient of
   ``F(h) = ||g(h) theta||^2`` at any ``h``, ``4 K`` its Hessian; the statistics are their
   definitions; under ``theta -> 2^k theta``, ``mu`` scales by ``4^k`` and the ratios not at all.
4. Refusals (a NaN or inf weight) are one ``ValueError`` naming the parameter, nothing changed.
5. Lower precision: the coordinates of float32, bfloat16 and float16 models round-trip to one
   unit in the last place, or are refused.
6. ``predicted_imbalance_change`` is the change of ``mu`` under one ``torch.optim.SGD`` step,
   frozen parameters included.

Regressions (each failed before its fix): a stabiliser refused by ``gauge_coordinates``, a
balanced point the dtype cannot hold refused, frozen parameters in the one-step prediction,
``project`` on an ill-conditioned gated unit (the solve with ``K = xi xi^T`` alone: 4e-8).

``GAUGEFIX_FUZZ_COORDINATES_EXAMPLES`` raises the example count locally.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import FAMILIES, assert_same_bits, snapshot, term_counts
from gaugefix.coordinates import SingularGramError
from test_coordinates import SelfLoop, isolate
from test_fuzz_uses import dead_of, discovered, draw, mu_rel_max, sides

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
EXAMPLES = int(os.environ.get("GAUGEFIX_FUZZ_COORDINATES_EXAMPLES", "25"))
TOL = 1e-13  # gauge_coordinates' default tol
ROUND_TRIP = 1e-13  # entrywise relative, g(-h) . g(h) . theta in float64
COVARIANT = 1e-10  # balanced and h under a further gauge (h, balanced: measured 1e-13)
PROJECTION = 1e-10  # orthogonality, idempotence, tangents (relative to the norms involved)
PROJECT_RTOL = 1e-13  # project's default rtol
EXACT = 1e-12  # mu, its gradient and Hessian, the statistics, relative to their scale
ROUNDING = 16 * torch.finfo(DTYPE).eps  # |mu_n| / S_n from sums added in another order

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- drawing a model ------------------------------------------------------------------------------
def drawn_with_inputs(data: st.DataObject) -> tuple[nn.Module, gaugefix.GaugeStructure, tuple]:
    """:func:`drawn_model` with the model's example inputs (``None``: nothing to check)."""
    if data.draw(st.booleans(), label="grammar"):
        program = draw(data)
        found = discovered(program)
        if found is None:
            return None
        model, s, inputs = program[0], found[0], (found[1][0],)
    else:
        case = data.draw(FAMILIES[data.draw(st.sampled_from(sorted(FAMILIES)), label="family")])
        model, s, inputs = case.model, gaugefix.discover(case.model, *case.inputs), case.inputs
        if not s.num_generators:
            return None
    scale = data.draw(st.sampled_from([0.5, 2.0, 4.0]), label="gauge scale")
    seed = data.draw(st.integers(0, 2**16), label="gauge seed")
    gaugefix.random_gauge_(model, s, scale, torch.Generator().manual_seed(seed))
    damage(data, model, s)
    return model, s, inputs


def drawn_model(data: st.DataObject) -> tuple[nn.Module, gaugefix.GaugeStructure] | None:
    """A grammar program or a family case with at least one generator, moved by a random
    gauge, then damaged (:func:`damage`); ``None`` when there is nothing to check."""
    drawn = drawn_with_inputs(data)
    return None if drawn is None else drawn[:2]


@torch.no_grad()
def damage(data: st.DataObject, model: nn.Module, s: gaugefix.GaugeStructure) -> None:
    """Zero one side (dead) or both sides (a zero generator) of a random generator, or random
    rows of a random parameter, or nothing; then freeze a random subset of the parameters."""
    kind = data.draw(st.sampled_from(["none", "in", "out", "both", "rows"]), label="damage")
    params = s.bind(model)
    n = data.draw(st.integers(0, s.num_generators - 1), label="damaged generator")
    for name, (plus, minus) in term_counts(s).items():
        side = {"in": plus[n] > 0, "out": minus[n] > 0, "both": (plus[n] + minus[n]) > 0}
        if kind in side:
            params[name][side[kind]] = 0
    if kind == "rows":
        name = data.draw(st.sampled_from(sorted(params)), label="zeroed parameter")
        p = params[name].view(*(params[name].shape[:1] or (1,)), -1)
        p[torch.rand(p.shape[0], generator=torch.Generator().manual_seed(n)) < 0.5] = 0
    for name, p in model.named_parameters():
        p.requires_grad_(not data.draw(st.booleans(), label=f"freeze {name}"))
    note(f"damage: {kind} of generator {n}")


# -- references -----------------------------------------------------------------------------------
def weights(s: gaugefix.GaugeStructure) -> dict[str, Tensor]:
    """``w_n(e)`` per gauged parameter, ``[N, *shape]`` float64."""
    return {name: plus - minus for name, (plus, minus) in term_counts(s).items()}


def dense_xi(params: dict[str, Tensor], w: dict[str, Tensor]) -> Tensor:
    """``[N, P]``: row ``n`` is ``xi_n(e) = w_n(e) theta_e`` over the gauged parameters."""
    n = next(iter(w.values())).shape[0]
    return torch.cat([(w[k] * params[k].detach().to(DTYPE)).reshape(n, -1) for k in sorted(w)], 1)


def flat(vectors: dict[str, Tensor], w: dict[str, Tensor]) -> Tensor:
    return torch.cat([vectors[k].detach().to(DTYPE).reshape(-1) for k in sorted(w)])


def orbit_norm_sq(params: dict[str, Tensor], w: dict[str, Tensor], h: Tensor) -> Tensor:
    """``F(h) = sum_e theta_e^2 exp(2 sum_n w_n(e) h_n)`` (differentiable in ``h``)."""
    return sum(
        (params[k].detach().to(DTYPE).square() * torch.exp(2 * torch.tensordot(h, w[k], 1))).sum()
        for k in w
    )


def entrywise(a: Tensor, b: Tensor) -> float:
    """``max_e |a_e - b_e| / |b_e|`` (0 where they agree, so also where both are 0)."""
    diff = (a.to(DTYPE) - b.to(DTYPE)).abs()
    return float(torch.where(diff == 0, 0.0, diff / b.to(DTYPE).abs()).max()) if b.numel() else 0.0


def live_mask(s: gaugefix.GaugeStructure, dead: Tensor) -> Tensor:
    return torch.ones(s.num_generators, dtype=torch.bool).index_fill_(0, dead, False)


# -- 1. coordinates -------------------------------------------------------------------------------
def check_coordinates(model: nn.Module, s: gaugefix.GaugeStructure, data: st.DataObject) -> None:
    """The factorisation, the refusal of dead generators, ``converged`` against the measured
    imbalance, and the covariance under a further gauge ``h0`` (0 on dead generators)."""
    state, maps = snapshot(model), term_counts(s)
    dead = dead_of(s.bind(model), maps)
    if dead.numel():
        with pytest.raises(ValueError, match="dead generator") as info:
            gaugefix.gauge_coordinates(model, s)
        assert str(dead[0].item()) in str(info.value)
    coords = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    assert_same_bits(model, state)
    assert torch.equal(coords.dead_generators, dead) and bool((coords.h[dead] == 0).all())
    back = coords.to_state_dict()
    assert back.keys() == state.keys()
    assert max(entrywise(back[k], v) for k, v in state.items() if v.is_floating_point()) <= (
        ROUND_TRIP
    )
    measured = mu_rel_max(s.bind(coords.balanced), maps, live_mask(s, dead))
    note(f"converged={coords.converged} mu_rel_max={coords.mu_rel_max} measured={measured}")
    assert abs(coords.mu_rel_max - measured) <= ROUNDING
    assert coords.converged == (coords.mu_rel_max <= TOL)
    if not coords.converged:  # a group dead only together (docs/coordinates.md, Limitations)
        return
    seed = data.draw(st.integers(0, 2**16), label="h0 seed")
    h0 = 3 * torch.randn(
        s.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)
    )
    h0[dead] = 0
    gaugefix.apply_gauge_(model, s, h0)
    moved = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    for k, v in coords.balanced.items():
        if v.is_floating_point():
            assert entrywise(moved.balanced[k], v) <= COVARIANT, k
    assert float((moved.h - coords.h - h0).abs().max()) <= COVARIANT
    model.load_state_dict(state)


@FUZZ
@given(data=st.data())
def test_coordinates_factor_the_parameters_covariantly(data: st.DataObject) -> None:
    drawn = drawn_model(data)
    if drawn is not None:
        check_coordinates(*drawn, data)


# -- 2. projections -------------------------------------------------------------------------------
def check_singular(model, s, vectors, error: SingularGramError, w) -> None:
    """The generators named span a null space of ``K`` (dense, from the incidence)."""
    xi = dense_xi(s.bind(model), w)[error.generators]
    values = torch.linalg.eigvalsh(xi @ xi.T)
    assert float(values[0]) <= 1e-12 * max(float(values[-1]), 1e-300)


def forward_error(xi: Tensor, s: gaugefix.GaugeStructure) -> float:
    """The relative error the projections promise: :data:`PROJECTION`, or where ``K`` is
    ill-conditioned the documented forward error ``k rtol cond(K)`` of the solve with ``K``
    (``k`` the most generators one entry carries, ``rtol`` ``project``'s default)."""
    values = torch.linalg.eigvalsh(xi @ xi.T)
    cond = float(values[-1] / values[0]) if float(values[0]) > 0 else math.inf
    note(f"cond(K) = {cond:.3g}")
    return max(PROJECTION, max(2, s.most_terms()) * PROJECT_RTOL * cond)


def check_projections(model: nn.Module, s: gaugefix.GaugeStructure, data: st.DataObject) -> None:
    """``Pi_H v`` orthogonal to every ``xi_n``, idempotence of both projections, and no
    horizontal part of an orbit tangent."""
    w, state = weights(s), snapshot(model)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="vector seed"))
    v = {k: torch.randn(p.shape, generator=gen, dtype=DTYPE) for k, p in model.named_parameters()}
    saved = {k: t.clone() for k, t in v.items()}
    try:
        ph = gaugefix.project(v, model, s, onto="horizontal")
    except SingularGramError as error:
        check_singular(model, s, v, error, w)
        assert_same_bits(model, state)
        assert all(torch.equal(v[k], saved[k]) for k in v)
        return
    pv = gaugefix.project(v, model, s, onto="vertical")
    params = s.bind(model)
    xi = dense_xi(params, w)
    allowed = forward_error(xi, s)
    v_norm = float(flat(v, w).norm())
    pairing = xi @ flat(ph, w)
    assert bool((pairing.abs() <= allowed * xi.norm(dim=1) * v_norm).all())
    for onto, p in (("horizontal", ph), ("vertical", pv)):
        again = gaugefix.project(p, model, s, onto=onto)
        assert float((flat(again, w) - flat(p, w)).norm()) <= allowed * v_norm, onto
    c = torch.randn(s.num_generators, generator=gen, dtype=DTYPE)
    tangent = (xi.T @ c).split([params[k].numel() for k in sorted(w)])
    t = {k: part.reshape(params[k].shape) for k, part in zip(sorted(w), tangent, strict=True)}
    t.update({k: torch.zeros_like(p) for k, p in model.named_parameters() if k not in t})
    t_norm = float(flat(t, w).norm())
    assert float(flat(gaugefix.project(t, model, s, onto="horizontal"), w).norm()) <= (
        allowed * t_norm
    )
    assert_same_bits(model, state)
    assert all(torch.equal(v[k], saved[k]) for k in v)


@FUZZ
@given(data=st.data())
def test_projections_are_orthogonal_idempotent_and_kill_orbit_tangents(data) -> None:
    drawn = drawn_model(data)
    if drawn is not None:
        check_projections(*drawn, data)


# -- 3. the imbalance -----------------------------------------------------------------------------
def check_imbalance(model: nn.Module, s: gaugefix.GaugeStructure, data: st.DataObject) -> None:
    """``2 mu(g(h1) theta) = dF/dh (h1)`` and ``4 K(g(h1) theta) c = d^2F/dh^2 (h1) c`` by
    autograd, at a random ``h1``; the statistics are their definitions."""
    w, params = weights(s), s.bind(model)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="h1 seed"))
    h1 = torch.randn(s.num_generators, generator=gen, dtype=DTYPE, requires_grad=True)
    c = torch.randn(s.num_generators, generator=gen, dtype=DTYPE)
    grad = torch.autograd.grad(orbit_norm_sq(params, w, h1), h1, create_graph=True)[0]
    hvp = torch.autograd.grad(grad @ c, h1)[0]
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h1.detach())
    s_in, s_out = sides(s.bind(moved), term_counts(s), set(w), "sum")
    mu = gaugefix.imbalance(moved, s)
    assert bool(((2 * mu - grad).abs() <= EXACT * 2 * (s_in + s_out)).all())
    gram = gaugefix.generators_gram(moved, s).to_dense()
    assert bool(((4 * gram @ c - hvp).abs() <= EXACT * 4 * (gram.abs() @ c.abs())).all())
    check_stats(gaugefix.imbalance_stats(moved, s), s_in, s_out, s.bind(moved))


def check_stats(stats: dict, s_in: Tensor, s_out: Tensor, params: dict) -> None:
    """``imbalance_stats`` against the definitions of its docstring."""
    total, low = s_in + s_out, torch.minimum(s_in, s_out)
    counted, live = total > 0, low > 0
    rel = ((s_in - s_out).abs() / total)[counted]
    log = (0.5 * (s_in / s_out).log()).abs()[live]
    want = {
        "mu_rel_rms": float(rel.square().mean().sqrt()) if rel.numel() else 0.0,
        "mu_rel_max": float(rel.max()) if rel.numel() else 0.0,
        "log_ratio_rms": float(log.square().mean().sqrt()) if log.numel() else 0.0,
        "log_ratio_max": float(log.max()) if log.numel() else 0.0,
        "mu_norm": float((s_in - s_out).norm()),
        "norm_sq": sum(float(p.detach().square().sum()) for p in params.values()),
        "dead_count": float((low == 0).sum()),
        "nonfinite_count": 0.0,
    }
    scale = {"mu_norm": float(total.norm()), "norm_sq": want["norm_sq"]}
    for key, value in want.items():
        assert abs(stats[key] - value) <= EXACT * scale.get(key, max(1.0, value)), key


@FUZZ
@given(data=st.data())
def test_imbalance_is_the_orbit_gradient_and_stats_their_definitions(data) -> None:
    drawn = drawn_model(data)
    if drawn is not None:
        check_imbalance(*drawn, data)


@FUZZ
@given(data=st.data(), k=st.integers(-300, 300))
def test_imbalance_scales_by_powers_of_two_exactly(data, k: int) -> None:
    """``mu(2^k theta) = 4^k mu(theta)`` bit for bit, the ratio statistics unchanged."""
    drawn = drawn_model(data)
    if drawn is None:
        return
    model, s = drawn
    mu, stats = gaugefix.imbalance(model, s), gaugefix.imbalance_stats(model, s)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0**k)
    assert torch.equal(gaugefix.imbalance(model, s), mu * 4.0**k)
    scaled = gaugefix.imbalance_stats(model, s)
    for key in ("mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "dead_count"):
        assert scaled[key] == stats[key], key


# -- 4. refusals ----------------------------------------------------------------------------------
REFUSING = {
    "gauge_coordinates": lambda m, s, v: gaugefix.gauge_coordinates(m, s, allow_dead=True),
    "project": lambda m, s, v: gaugefix.project(v, m, s),
    "generators_gram": lambda m, s, v: gaugefix.generators_gram(m, s),
    "relaxation_rates": lambda m, s, v: gaugefix.relaxation_rates(m, s, 1.0),
    "predicted_imbalance_change": lambda m, s, v: gaugefix.predicted_imbalance_change(m, v, s, 0.1),
}


@FUZZ
@given(data=st.data(), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_non_finite_weight_is_one_clear_error_changing_nothing(data, bad: float) -> None:
    """A NaN or inf in a gauged parameter: one line naming it from each function, the model and
    the vectors bit for bit as before; ``imbalance_stats`` counts the generators carrying the
    entry (none for an entry no generator acts on) and its ``norm_sq`` is not finite."""
    drawn = drawn_model(data)
    if drawn is None:
        return
    model, s = drawn
    name = data.draw(st.sampled_from(sorted(s.params)), label="poisoned parameter")
    entry = data.draw(st.integers(0, s.bind(model)[name].numel() - 1), label="entry")
    with torch.no_grad():
        s.bind(model)[name].view(-1)[entry] = bad
    v = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    state = snapshot(model)
    for function, call in REFUSING.items():
        with pytest.raises(ValueError, match=f"'{name}' contains NaN or inf") as info:
            call(model, s, v)
        assert "\n" not in str(info.value), function
        assert_same_bits(model, state)
        assert all(bool((t == 1).all()) for t in v.values())
    plus, minus = term_counts(s)[name]
    carrying = int(((plus + minus).reshape(s.num_generators, -1)[:, entry] > 0).sum())
    stats = gaugefix.imbalance_stats(model, s)
    assert stats["nonfinite_count"] == carrying and not math.isfinite(stats["norm_sq"])


def self_loop(group: list[int]) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    """:class:`test_coordinates.SelfLoop` moved by a gauge, with the neurons of ``group``
    isolated: only ``mid``'s entries inside the group are non-zero."""
    torch.manual_seed(0)
    model = SelfLoop().double()
    s = gaugefix.discover(model, torch.randn(1, 3, dtype=DTYPE))
    gaugefix.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(1))
    isolate(model, group)
    return model, s


def test_coordinates_refuse_a_stabiliser_naming_its_generators():
    """Neurons 0 and 2 isolated in a residual self-loop: ``g(t (e_0 + e_2))`` moves no entry
    (``K`` is singular, no generator is dead), so ``h`` is not unique and cannot move by ``h0``
    under ``g(h0)``. Before the fix ``converged`` was true and, for a random ``h0``, ``h`` moved
    by ``h0`` plus 0.99 on both; now ``SingularGramError`` names them, nothing changed."""
    model, s = self_loop([0, 2])
    assert gaugefix.imbalance_stats(model, s)["dead_count"] == 0
    state = snapshot(model)
    for allow_dead in (False, True):
        with pytest.raises(SingularGramError, match="not unique") as info:
            gaugefix.gauge_coordinates(model, s, allow_dead=allow_dead)
        assert info.value.generators == [0, 2] and "\n" not in str(info.value)
        assert_same_bits(model, state)


def test_coordinates_of_a_healthy_self_loop_are_unique():
    """The same model without the isolation has coordinates moving by exactly ``h0``."""
    model, s = self_loop([])
    coords = gaugefix.gauge_coordinates(model, s)
    h0 = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=DTYPE)
    gaugefix.apply_gauge_(model, s, h0)
    assert float((gaugefix.gauge_coordinates(model, s).h - coords.h - h0).abs().max()) <= 1e-12


# -- 5. lower precision ---------------------------------------------------------------------------
def ulps_apart(a: Tensor, b: Tensor) -> Tensor:
    """``|a - b|`` in units of the spacing of ``b``'s dtype just above ``|b|``."""
    up = torch.nextafter(b.abs(), torch.tensor(math.inf, dtype=b.dtype))
    return (a.to(DTYPE) - b.to(DTYPE)).abs() / (up.to(DTYPE) - b.abs().to(DTYPE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_coordinates_refuse_a_balanced_point_their_dtype_cannot_hold(dtype):
    """A neuron with incoming weights ``1e4`` and ``1e-4`` (or ``1e18`` and ``1e-25``) and
    outgoing ``1e-4`` (``1e-18``): balancing divides its incoming side by ``1e4`` (``1e18``),
    taking the small weight below the smallest normal number of the dtype. Before the fix a
    float16 model's ``to_state_dict()`` gave that weight back as 0 (100% off), a float32 one
    0.5% off, both silently; now ``ValueError`` names the parameter, nothing changed."""
    big, small, out = (1e4, 1e-4, 1e-4) if dtype == torch.float16 else (1e18, 1e-25, 1e-18)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).to(dtype)
    s = gaugefix.discover(model.double(), torch.randn(1, 2, dtype=DTYPE))
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([big, small])
        model[2].weight[0, 0] = out
    model.to(dtype)
    state = snapshot(model)
    with pytest.raises(ValueError, match=r"'0\.weight'.*smallest normal") as info:
        gaugefix.gauge_coordinates(model, s)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_low_precision_coordinates_round_trip_to_one_ulp(data, dtype) -> None:
    """A drawn model in float32, bfloat16 or float16: the coordinates give every entry back
    within one unit in the last place of its dtype (two roundings), or are refused."""
    drawn = drawn_model(data)
    if drawn is None:
        return
    model, s = drawn
    model.to(dtype)
    state = snapshot(model)
    try:
        coords = gaugefix.gauge_coordinates(model, s, allow_dead=True)
    except ValueError as error:
        event(f"refused in {dtype}")
        assert any(why in str(error) for why in ("smallest normal", "not unique", "overflow"))
        return
    event(f"checked in {dtype}")
    back = coords.to_state_dict()
    for k, v in state.items():
        if v.is_floating_point() and v.numel():
            assert float(ulps_apart(back[k], v).max()) <= 1.0, k


class ReluGated(nn.Module):
    """``down(relu(gate(x)) * up(x))``: three gated units, each a gate and an up generator
    sharing the unit's column of ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(2, 3, bias=False), nn.Linear(2, 3, bias=False)
        self.down = nn.Linear(3, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


def test_projection_of_an_orbit_tangent_on_an_ill_conditioned_gated_unit():
    torch.manual_seed(20)
    model = ReluGated().double()
    s = gaugefix.discover(model, torch.randn(1, 2, dtype=DTYPE))
    gaugefix.random_gauge_(model, s, 4.0, torch.Generator().manual_seed(20))
    w, params = weights(s), s.bind(model)
    c = torch.randn(s.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    parts = (dense_xi(params, w).T @ c).split([params[k].numel() for k in sorted(w)])
    t = {k: part.reshape(params[k].shape) for k, part in zip(sorted(w), parts, strict=True)}
    horizontal = gaugefix.project(t, model, s, onto="horizontal")
    assert float(flat(horizontal, w).norm()) <= PROJECTION * float(flat(t, w).norm())


# -- 6. the one-step change of the imbalance ------------------------------------------------------
def sgd_step_change(
    model: nn.Module, s, inputs: tuple, lr: float, wd: float, head: int | None = None
) -> tuple:
    """``(predicted, actual)`` change of ``mu`` under one ``torch.optim.SGD`` step on a
    gauge-invariant loss (``inputs``, or the model's output ``head`` only), the gradients as
    backward leaves them (``None`` for a frozen parameter or one the loss does not reach)."""
    gen = torch.Generator().manual_seed(0)
    out = model(*inputs) if head is None else model(*inputs)[head]
    loss = (out - torch.randn(out.shape, generator=gen, dtype=DTYPE)).square().mean()
    if loss.requires_grad:  # else no parameter that moves reaches the output
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    predicted = gaugefix.predicted_imbalance_change(model, grads, s, lr, wd)
    before = gaugefix.imbalance(model, s).detach()
    moving = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(moving, lr=lr, weight_decay=wd).step()
    return predicted, gaugefix.imbalance(model, s).detach() - before


@pytest.mark.parametrize("wd", [0.0, 0.3])
@pytest.mark.parametrize("frozen", [[], ["2.weight"], ["0.weight", "4.weight"]])
def test_predicted_imbalance_change_with_frozen_parameters(frozen, wd):
    """SGD leaves a frozen parameter in place (no step, no decay), so the cross term
    ``-2 lr (1 - lr wd) <xi_n, g>`` no longer vanishes over the entries that move. Before the
    fix the prediction with ``2.weight`` frozen was off by 99% of the change (wd = 0) and 28%
    (wd = 0.3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    model.double()
    s = gaugefix.discover(model, torch.randn(1, 3, dtype=DTYPE))
    gaugefix.random_gauge_(model, s, 0.5, torch.Generator().manual_seed(1))
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    predicted, actual = sgd_step_change(model, s, (x,), 0.5, wd)
    scale = float(actual.abs().max())
    assert scale > 1e-3 * float(gaugefix.imbalance(model, s).detach().abs().max())
    assert float((predicted - actual).abs().max()) <= EXACT * scale


class TwoHeads(nn.Module):
    """A hidden layer read by two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x).relu()
        return self.a(h), self.b(h)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_predicted_imbalance_change_leaves_a_parameter_the_loss_does_not_reach(wd):
    """A loss on head ``a`` alone leaves head ``b``'s gradients ``None``, and SGD leaves ``b``
    in place (no step, no decay): the prediction with ``None`` for them is the change. Before,
    ``None`` was refused with the advice to pass zeros, which with weight decay predicts a
    decay SGD does not apply (off by 19% of the change at ``wd = 0.3``)."""
    torch.manual_seed(0)
    model = TwoHeads().double()
    s = gaugefix.discover(model, torch.randn(1, 3, dtype=DTYPE))
    gaugefix.random_gauge_(model, s, 0.5, torch.Generator().manual_seed(1))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    predicted, actual = sgd_step_change(model, s, (x,), 0.5, wd, head=0)
    assert model.b.weight.grad is None
    assert float((predicted - actual).abs().max()) <= EXACT * float(actual.abs().max())


@FUZZ
@given(data=st.data(), wd=st.sampled_from([0.0, 0.3]))
def test_predicted_imbalance_change_is_one_sgd_step_on_drawn_models(data, wd: float) -> None:
    """Damaged, partly frozen drawn models: the prediction is SGD's change to ``1e-12`` of the
    largest change, plus the rounding of the reference (a difference of two ``mu``: ``16 eps
    S_n``)."""
    drawn = drawn_with_inputs(data)
    if drawn is None:
        return
    model, s, inputs = drawn
    if not any(p.requires_grad for p in model.parameters()):
        return
    s_in, s_out = gaugefix.moment.in_out_sums(model, s)
    lr = 0.5 / max(float((s_in + s_out).detach().max()), 1e-300) ** 0.5
    predicted, actual = sgd_step_change(model, s, inputs, lr, wd)
    floor = ROUNDING * (s_in + s_out).detach()  # the rounding of actual, a difference of mu's
    note(f"predicted {predicted}, actual {actual}, floor {floor}")
    assert bool(((predicted - actual).abs() <= EXACT * actual.abs().max() + floor).all())
