"""Discovery on an example that routes no token to an expert, continued (see
``test_empty_routes``): experts as modules a registered rule speaks for, and experts as slices
``W[e]`` of one weight, whose other slices keep their generators. The example sends no row to
expert 0 (or 1), the fresh inputs rows to every expert, and the logits must not change (1e-10)
under a random gauge of scale 2.5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from test_empty_routes import DIM, DTYPE, EXPERTS, HIDDEN, SCALE, TOL, Routed, routes

pytestmark = pytest.mark.usefixtures("single_thread")

FRESH_CALLS = 3


def worst_change(cls: type[nn.Module], empty: int | None) -> tuple[float, gaugefix.GaugeStructure]:
    """The structure of ``cls`` discovered on 8 rows that reach every expert but ``empty``,
    and the largest relative change of its logits on fresh calls of 40 rows that reach every
    expert, each under a random gauge of the structure."""
    torch.manual_seed(1)
    model = cls().to(DTYPE)
    x = torch.randn(8, DIM, dtype=DTYPE)
    s = gaugefix.discover(model, x, routes(8, empty, seed=0), allow_value_dependent=True)
    worst = 0.0
    for seed in range(FRESH_CALLS):
        gauged = cls().to(DTYPE)
        gauged.load_state_dict(model.state_dict())
        g = torch.Generator().manual_seed(seed)
        fresh = (torch.randn(40, DIM, dtype=DTYPE, generator=g), routes(40, None, seed=seed))
        with torch.no_grad():
            before = gauged(*fresh)
        gaugefix.random_gauge_(gauged, s, SCALE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            change = (gauged(*fresh) - before).abs().max() / before.abs().max()
        worst = max(worst, float(change))
    return worst, s


# -- experts as modules a registered rule speaks for ----------------------------------------------
class Expert(nn.Module):
    """``w2 relu(w1 h)`` (``w1``: ``[6, 4]``, ``w2``: ``[4, 6]``). ``[n, 4] -> [n, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(HIDDEN, DIM))
        self.w2 = nn.Parameter(torch.randn(DIM, HIDDEN))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(h, self.w1)), self.w2)


def expert_rule(ctx, result, h):
    """``w1``'s rows produce the hidden units, its columns consume ``h``'s channels; ``w2``'s
    columns consume the hidden units, its rows produce the output."""
    m = ctx.module
    hidden = ctx.produce(m.w1, HIDDEN, 1).view(HIDDEN)
    ctx.consume(m.w1, ctx.along_terms(h, -1).map(lambda c: c.view(1, -1)))
    rows = ctx.produce(m.w2, DIM, 1).view(DIM)
    ctx.consume(m.w2, hidden.view(1, -1))
    return rows


class Identity(nn.Module):
    """The identity expert: ``h * 1``."""

    def forward(self, h: Tensor) -> Tensor:
        return h * 1.0


def identity_rule(ctx, result, h):
    return ctx.terms(h)


class AddInto(nn.Module):
    """``y.index_add(0, idx, z)``: an expert's rows added into the output."""

    def forward(self, y: Tensor, idx: Tensor, z: Tensor) -> Tensor:
        return y.index_add(0, idx, z)


def add_into_rule(ctx, result, y, idx, z):
    """The rows of ``z`` carry the channels of ``y`` (``z`` with no row says nothing)."""
    if z.numel():
        ctx.union(ctx.labels(y), ctx.along(z, -1))
    else:
        ctx.claim(z)
    return ctx.terms(y)


MODULE_RULES = [(Expert, expert_rule), (Identity, identity_rule), (AddInto, add_into_rule)]


@pytest.fixture
def module_rules():
    for target, rule in MODULE_RULES:
        gaugefix.register_rule(target, rule)
    try:
        yield
    finally:
        for target, _ in MODULE_RULES:
            gaugefix.unregister_rule(target)


class ModuleExperts(Routed):
    """:class:`Routed` with three :class:`Expert` modules (the fused weights unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))


class ModulesByMask(ModuleExperts):
    """``y[m] = expert(h[m])``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            m = r == e
            y[m] = self.experts[e](h[m])
        return y


class ModulesByCat(ModuleExperts):
    """The rows sorted by expert, split by counts read into Python, joined by ``torch.cat``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        order = torch.argsort(r, stable=True)
        pieces = h[order].split(torch.bincount(r, minlength=EXPERTS).tolist())
        outs = [self.experts[e](p) for e, p in enumerate(pieces)]
        return torch.cat(outs)[torch.argsort(order)]


class IdentityModuleByMask(ModuleExperts):
    """Expert 0 the :class:`Identity` module: ``y[m] = ident(h[m])``."""

    def __init__(self) -> None:
        super().__init__()
        self.ident = Identity()

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            m = r == e
            y[m] = self.ident(h[m]) if e == 0 else self.experts[e](h[m])
        return y


class JoinedByModule(ModuleExperts):
    """Expert 0 the identity, every expert's rows added into the output by :class:`AddInto`."""

    def __init__(self) -> None:
        super().__init__()
        self.add = AddInto()

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            idx = torch.where(r == e)[0]
            y = self.add(y, idx, h[idx] if e == 0 else self.experts[e](h[idx]))
        return y


@pytest.mark.usefixtures("module_rules")
@pytest.mark.parametrize("cls", [ModulesByMask, ModulesByCat, IdentityModuleByMask, JoinedByModule])
def test_a_module_rule_on_rows_no_token_reaches_gives_exact_generators(cls):
    """Before, a call a module rule spoke for kept no record of an empty output (joined by
    ``torch.cat``: 16 generators, a change of 87 on fresh inputs; the identity expert written
    by a mask: 16, 1.7) nor blocked its empty input joined into a non-empty output (20
    generators, 3.2). The neurons of the reached experts remain generators."""
    change, s = worst_change(cls, 0)
    assert change <= TOL, s.summary()
    assert s.num_generators == 2 * HIDDEN, s.summary()


# -- experts as slices of one weight --------------------------------------------------------------
class SlicesByMask(Routed):
    """Every expert ``W2[e] relu(W1[e] h)``, written back by a mask: ``y[m] = expert(h[m])``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            m = r == e
            y[m] = self.expert(e, h[m])
        return y


class SlicesWithBiases(Routed):
    """:class:`SlicesByMask` with fused biases ``b1[e]``, ``b2[e]``, added back by
    ``index_add_``."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Parameter(torch.randn(EXPERTS, HIDDEN))
        self.b2 = nn.Parameter(torch.randn(EXPERTS, DIM))

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        for e in range(EXPERTS):
            idx = torch.where(r == e)[0]
            z = F.relu(F.linear(h[idx], self.w1[e], self.b1[e]))
            y.index_add_(0, idx, F.linear(z, self.w2[e], self.b2[e]))
        return y


class UnboundTransposed(Routed):
    """The slices by ``unbind``, used transposed: ``relu(h[m] @ W1[e].t()) @ W2[e].t()``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        y = torch.zeros_like(h)
        w1s, w2s = self.w1.unbind(), self.w2.unbind()
        for e in range(EXPERTS):
            m = r == e
            y[m] = F.relu(h[m] @ w1s[e].t()) @ w2s[e].t()
        return y


class SlicesOfArrangement(Routed):
    """Slices of ``W1.transpose(1, 2)`` (an arrangement of the parameter), the rows sorted,
    split by counts and joined by ``torch.cat``."""

    def mix(self, h: Tensor, r: Tensor) -> Tensor:
        order = torch.argsort(r, stable=True)
        pieces = h[order].split(torch.bincount(r, minlength=EXPERTS).tolist())
        w1t = self.w1.transpose(1, 2)
        outs = [F.relu(p @ w1t[e]) @ self.w2[e].t() for e, p in enumerate(pieces)]
        return torch.cat(outs)[torch.argsort(order)]


@pytest.mark.parametrize("empty", [0, 1])
@pytest.mark.parametrize(
    "cls", [SlicesByMask, SlicesWithBiases, UnboundTransposed, SlicesOfArrangement]
)
def test_a_slice_read_with_an_empty_input_fixes_that_slice_only(cls, empty):
    """Before, a slice ``W[e]`` read with an empty input fixed the whole weight: no expert's
    neurons were generators (0 of 12). Now the entries of that slice are fixed along every dim,
    as a weight of its own would be, and the neurons of the reached experts remain
    generators, exact on inputs that reach expert ``empty`` too."""
    change, s = worst_change(cls, empty)
    assert change <= TOL, s.summary()
    assert s.num_generators == 2 * HIDDEN, s.summary()
    assert "a slice of parameter 'w1'" in s.summary()


def test_every_slice_read_with_an_empty_input_fixes_the_weight():
    """A weight all of whose slices an op read with an empty input is fixed, as before."""
    torch.manual_seed(0)
    model = SlicesByMask().to(DTYPE)
    x = torch.randn(3, DIM, dtype=DTYPE)
    s = gaugefix.discover(model, x[:0], routes(0, None, seed=0), allow_value_dependent=True)
    assert s.num_generators == 0
    assert "w1" not in s.params
