"""The singularity test of the generator Gram matrix ``K = xi xi^T`` on the ungrounded
generators (:func:`gaugefix.coordinates.ungrounded_generators`, ``SingularGramError``).

``K c = 0`` exactly when ``sum_n w_n(e) c_n = 0`` on every entry of positive mass, so whether
``K`` is singular depends only on the integer weights ``w_n(e)`` of those entries, never on
their sizes. The regression: a test of ``K``'s eigenvalue ratio against ``1e-12`` squared the
conditioning of the tangents and refused a group of generators that is exactly non-singular
whose tangents are only ``3e-7`` from dependent (``cond(K) = 9e12``). Truth here is the exact
rank (``sympy``, over the rationals) of the integer pattern.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix as gf
from architectures import term_counts
from gaugefix.coordinates import SingularGramError, rank_modulo_prime
from test_coordinates import SelfLoop, isolate
from test_project_conditioning import exact_vertical, flat, tangents, unflat

sympy = pytest.importorskip("sympy")
pytestmark = pytest.mark.usefixtures("single_thread")

DT = torch.float64
EXACT = 1e-10  # relative to ||v||, against the 60-digit projection
GAP = 1e-8  # the tangents' singular value ratio of the non-singular cases is at least this


class GatedLoop(nn.Module):
    """``fc2(relu(h + down(relu(gate(h)) * up(h))))`` with ``h = relu(fc1(x))``: the residual
    merges ``down``'s rows with ``h``'s neurons, so a down entry carries three generators (its
    row neuron, and the gate and up generators of its unit, with the same sign)."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, width), nn.Linear(width, 2)
        self.gate = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, width, bias=False)
        self.down = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(F.relu(h + self.down(F.relu(self.gate(h)) * self.up(h))))


def gated_loop(down: float) -> tuple[nn.Module, gf.GaugeStructure]:
    """Neuron 0 and unit 0 (generators 0, 2, 4) isolated: only ``gate[0, 0] = up[0, 0] = 1``
    and ``down[0, 0] = down`` are non-zero among their entries. The weights of those three
    entries on (neuron, gate, up) are ``(-1, 1, 0)``, ``(-1, 0, 1)``, ``(1, -1, -1)``, of
    determinant ``-1``: ``K`` is non-singular for every ``down != 0``, and singular (the
    combination ``(1, 1, 1)`` moves nothing) for ``down = 0``."""
    torch.manual_seed(0)
    model = GatedLoop().double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    with torch.no_grad():
        for t in (model.fc1.weight[0], model.fc1.bias[0], model.down.bias[0]):
            t.zero_()
        model.fc2.weight[:, 0] = 0
        for w in (model.gate.weight, model.up.weight, model.down.weight):
            w[0, 1] = w[1, 0] = 0
        model.gate.weight[0, 0] = model.up.weight[0, 0] = 1
        model.down.weight[0, 0] = down
    return model, s


def pattern_rank(model: nn.Module, s: gf.GaugeStructure) -> int:
    """The exact rank of the integer matrix ``w_n(e)`` over the entries with ``theta_e != 0``."""
    params = s.bind(model)
    cols = [
        (plus - minus).reshape(s.num_generators, -1)[:, params[k].detach().reshape(-1) != 0]
        for k, (plus, minus) in sorted(term_counts(s).items())
    ]
    return sympy.Matrix(torch.cat(cols, dim=1).to(torch.int64).tolist()).rank()


@pytest.mark.parametrize("down", [1e-6, 3e-7])
def test_ill_conditioned_but_non_singular_group_is_projected(down):
    """The isolated gated loop at ``down = 1e-6`` (``3e-7``): exactly non-singular (full
    integer rank), the tangents' singular value ratio ``3.3e-7`` (``1e-7``), ``cond(K) = 9e12``
    (``1e14``). Before the fix ``project`` raised ``SingularGramError``; now it matches the
    60-digit projection to ``1e-10`` of ``||v||`` and ``gram_solve`` the 60-digit solve."""
    model, s = gated_loop(down)
    assert pattern_rank(model, s) == s.num_generators
    xi = tangents(model, s)
    values = torch.linalg.svdvals(xi)
    assert float(values[-1] / values[0]) >= GAP
    assert gf.coordinates.ungrounded_generators(model, s).numel() == 0
    v = torch.randn(xi.shape[1], dtype=DT, generator=torch.Generator().manual_seed(1))
    found = flat(gf.project(unflat(v, model, s), model, s), s)
    assert float((found - exact_vertical(xi, v)).norm()) <= EXACT * float(v.norm())
    b = xi @ v
    c = gf.coordinates.gram_solve(model, s, b)
    assert float((xi.T @ c - exact_vertical(xi, v)).norm()) <= EXACT * float(v.norm())


def test_the_same_group_without_its_down_entry_is_refused():
    """``down = 0``: neuron, gate and up generators 0, 2, 4 moved together move nothing;
    ``project`` and ``gram_solve`` raise ``SingularGramError`` naming exactly them."""
    model, s = gated_loop(0.0)
    assert pattern_rank(model, s) == s.num_generators - 1
    assert gf.coordinates.ungrounded_generators(model, s).tolist() == [0, 2, 4]
    xi = tangents(model, s)
    with pytest.raises(SingularGramError) as info:
        gf.project(unflat(torch.ones(xi.shape[1], dtype=DT), model, s), model, s)
    assert info.value.generators == [0, 2, 4]
    with pytest.raises(SingularGramError):
        gf.coordinates.gram_solve(model, s, torch.ones(s.num_generators, dtype=DT))


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_a_stabiliser_of_disparate_weights_is_refused(scale):
    """Self-loop neurons 0 and 2 isolated, with ``mid[0, 2] = scale`` and ``mid[2, 0] = 1``:
    the combination ``e_0 + e_2`` moves nothing whatever the sizes, and is refused by
    ``gauge_coordinates`` and ``project`` naming ``[0, 2]``."""
    torch.manual_seed(0)
    model = SelfLoop().double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    isolate(model, [0, 2])
    with torch.no_grad():
        model.mid.weight[0, 2], model.mid.weight[2, 0] = scale, 1.0
    assert pattern_rank(model, s) == s.num_generators - 1
    with pytest.raises(SingularGramError) as info:
        gf.gauge_coordinates(model, s)
    assert info.value.generators == [0, 2]
    v = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    with pytest.raises(SingularGramError):
        gf.project(v, model, s)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    zero=st.floats(0.2, 0.7),
    spread=st.floats(2.0, 12.0),
)
def test_refusal_is_exactly_the_integer_rank(seed, zero, spread):
    """A wider gated loop (3 neurons, 3 units) cut off from input and output (``fc1``, ``fc2``
    and ``down``'s bias zero), its ``gate``, ``up`` and ``down`` entries each zeroed with
    probability ``zero`` and the others of random sign and size ``10^-U(0, spread)``:
    ``project`` is refused exactly when the integer pattern of the entries of positive mass
    has rank below ``N``. Before the fix the eigenvalue test refused exactly non-singular
    patterns of spread-out sizes."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GatedLoop(3).double()
    s = gf.discover(model, torch.randn(1, 3, dtype=DT))
    with torch.no_grad():
        for p in model.parameters():
            size = 10 ** (-spread * torch.rand(p.shape, dtype=DT, generator=gen))
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            keep = torch.rand(p.shape, generator=gen) >= zero
            p.copy_(size * sign * keep)
        for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.down.bias):
            p.zero_()
    singular = pattern_rank(model, s) < s.num_generators
    assert (gf.coordinates.ungrounded_generators(model, s).numel() > 0) == singular
    v = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    try:
        gf.project(v, model, s)
        refused = False
    except SingularGramError:
        refused = True
    assert refused == singular


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from([-2, -1, 0, 0, 0, 1, 2]), min_size=6, max_size=6),
        min_size=1,
        max_size=12,
    )
)
def test_rank_modulo_prime_is_the_rational_rank(rows):
    """The rank of the integer Gram matrix ``M^T M`` of random sparse small-integer ``M``
    (as the pattern Gram matrix is formed), modulo the prime, equals the exact rational
    rank of ``M``."""
    m = torch.tensor(rows, dtype=torch.int64)
    assert rank_modulo_prime(m.T @ m) == sympy.Matrix(rows).rank()
