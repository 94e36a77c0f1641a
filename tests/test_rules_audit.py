"""Hostile uses of the built-in op rules (``gaugefix.structure.rules``, ``affine``,
``attention``): one parameter in two roles of one op, parameters cast to integer dtypes, einsum
ellipses next to capital letters, attention over keys of lower rank than the queries, and
legitimate spellings a rule crashed on. Each discovered structure must be exact: a random gauge
keeps every float64 output to 1e-10."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10


class Around(nn.Module):
    """``g = l2(relu(l1(x)))``, then ``f(self, g)`` (with parameters ``p`` and ``b`` of the given
    shapes) read by a lazy linear head: a rule that claims too much in ``f`` leaves a wrong
    generator on ``p``, ``b``, ``l2`` or the head."""

    def __init__(self, f, shape: tuple[int, ...], bias: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.f = f
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 6)
        self.p, self.b = nn.Parameter(torch.rand(shape)), nn.Parameter(torch.rand(bias))
        self.head = nn.LazyLinear(2)

    def forward(self, x: Tensor) -> Tensor:
        g = self.l2(F.relu(self.l1(x)))
        return self.head(F.relu(self.f(self, g)).reshape(x.shape[0], -1))


def change_under_gauge(model: nn.Module, *inputs: Tensor) -> tuple:
    """Discover ``model`` (float64), apply a random gauge of scale 1 and return the structure and
    the largest relative change of a floating output or of a buffer after the forward."""
    model.to(DTYPE)
    with torch.no_grad():
        model(*inputs)  # materialise lazy modules
        for p in model.parameters():
            p.copy_(0.7 * torch.randn_like(p) + 0.3)
        before = _floats(model(*inputs)) + [b.clone() for b in model.buffers()]
    s = gaugefix.discover(model, *inputs)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = _floats(model(*inputs)) + [b.clone() for b in model.buffers()]
    return s, max(rel_change(b, a) for b, a in zip(before, after, strict=True))


def _floats(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    return [t for o in out for t in _floats(o)]


def around(f, shape: tuple[int, ...], bias: tuple[int, ...] = ()) -> tuple:
    torch.manual_seed(0)
    return change_under_gauge(Around(f, shape, bias), torch.randn(3, 4, dtype=DTYPE))


# --- one parameter in two roles of one op ----------------------------------------------------
# Within one op the roles a rule gives a parameter add up (a weight's rows and columns); a
# parameter that is also the op's bias would carry the sum of a weight's and a bias's factors.
TWO_ROLES = {
    "F.linear(g, W, W[0])": lambda m, g: F.linear(g, m.p, m.p[0]),
    "F.linear(g, W, W[-1])": lambda m, g: F.linear(g, m.p, m.p[-1]),
    "F.linear(g, W, W.T[0])": lambda m, g: F.linear(g, m.p, m.p.T[0]),
    "addmm(W[0], g, W)": lambda m, g: torch.addmm(m.p[0], g, m.p),
    "addmv(W[0], W, g[i])": lambda m, g: torch.stack([torch.addmv(m.p[0], m.p, r) for r in g]),
    "conv1d(g, W, W[0])": lambda m, g: F.conv1d(g[..., None], m.p.unsqueeze(-1), m.p[0])[..., 0],
}


@pytest.mark.parametrize("f", list(TWO_ROLES.values()), ids=list(TWO_ROLES))
def test_a_parameter_in_two_roles_of_one_op_is_exact(f):
    s, change = around(f, (6, 6))
    assert change <= TOL, s.summary()


class SharedProjections(nn.Module):
    """``F.multi_head_attention_forward`` with separate projections, two of them one tensor."""

    def __init__(self, same: tuple[str, str]) -> None:
        super().__init__()
        self.same = same
        self.pre_q, self.pre_kv = nn.Linear(8, 8), nn.Linear(8, 8)
        self.w = nn.ParameterDict({k: nn.Parameter(torch.randn(8, 8)) for k in "qkvo"})
        self.in_bias, self.out_bias = nn.Parameter(torch.randn(24)), nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, kv = F.relu(self.pre_q(x)), F.relu(self.pre_kv(x))
        w = dict(self.w.items())
        w[self.same[1]] = w[self.same[0]]
        y, _ = F.multi_head_attention_forward(
            q, kv, kv, 8, 2, None, self.in_bias, None, None, False, 0.0, w["o"], self.out_bias,
            use_separate_proj_weight=True, q_proj_weight=w["q"], k_proj_weight=w["k"],
            v_proj_weight=w["v"],
        )  # fmt: skip
        return self.head(F.relu(y))


@pytest.mark.parametrize("same", [("q", "k"), ("q", "o"), ("v", "o")], ids="=".join)
def test_attention_with_one_tensor_for_two_projections_is_exact(same):
    torch.manual_seed(0)
    s, change = change_under_gauge(SharedProjections(same), torch.randn(5, 2, 8, dtype=DTYPE))
    assert change <= TOL, s.summary()
    assert "two roles" in " | ".join(e.reason for e in s.excluded)


def test_distinct_parameters_keep_their_roles():
    torch.manual_seed(0)
    s, change = change_under_gauge(SharedProjections(("q", "q")), torch.randn(5, 2, 8, dtype=DTYPE))
    assert change <= TOL
    assert s.num_generators == 40, s.summary()


# --- parameters cast to integer or boolean dtypes ------------------------------------------
# A cast of an activation to such a dtype blocks its labels; a parameter's cast was taken for an
# arrangement of the parameter, although truncation is not homogeneous.
CASTS = {
    "p.to(long)": lambda m, g: g * m.p.to(torch.long),
    "p.to(bool)": lambda m, g: g * m.p.to(torch.bool),
    "p.to(dtype=int16)": lambda m, g: g * m.p.to(dtype=torch.int16),
    "p.type_as(ids)": lambda m, g: g * m.p.type_as(torch.ones(1, dtype=torch.long)),
    "p.data.to(int64)": lambda m, g: g * m.p.data.to(torch.int64),
    "(2 * p).to(long)": lambda m, g: g * (2 * m.p).to(torch.long),
    "g + p.to(long)": lambda m, g: g + m.p.to(torch.long),
    "F.linear(g, p.to(int32).double())": lambda m, g: F.linear(
        g, m.p.view(1, 6).to(torch.int32).double()
    ),
}


@pytest.mark.parametrize("f", list(CASTS.values()), ids=list(CASTS))
def test_a_parameter_cast_to_an_integer_dtype_is_fixed(f):
    s, change = around(f, (6,))
    assert change <= TOL, s.summary()


# --- einsum: the letters an ellipsis stands for ---------------------------------------------
# ``...`` was spelled with capital letters from "A" on, which an equation may use itself.
ELLIPSES = {
    "...i,Ai->...": (lambda m, g: torch.einsum("...i,Ai->...", g, m.p).expand(3, 3), (3, 6)),
    "...i,Ai->...A": (lambda m, g: torch.einsum("...i,Ai->...A", g, m.p), (5, 6)),
    "...i,iA->...A on 3 dims": (
        lambda m, g: torch.einsum("...i,iA->...A", g.view(3, 2, 3), m.p),
        (3, 5),
    ),
    "...i,Ai (implicit)": (lambda m, g: torch.einsum("...i,Ai", g, m.p).expand(3, 3), (3, 6)),
}


@pytest.mark.parametrize("f, shape", list(ELLIPSES.values()), ids=list(ELLIPSES))
def test_einsum_ellipsis_next_to_capital_letters_is_exact(f, shape):
    s, change = around(f, shape)
    assert change <= TOL, s.summary()


# A weight's letters kept in the output in another order than the weight's own (heads before
# head dims, ``"bsh,hdn->bnsd"``): the produced factors must be permuted, not reshaped.
REORDERED = {
    "bi,ion->bno": lambda m, g: torch.einsum("bi,ion->bno", g, m.p),
    "bi,ion->nbo": lambda m, g: torch.einsum("bi,ion->nbo", g, m.p),
    "bi,iBA (implicit: ABb)": lambda m, g: torch.einsum("bi,iBA", g, m.p),
    "...i,ion->...no": lambda m, g: torch.einsum("...i,ion->...no", g.view(3, 1, 6), m.p),
}


@pytest.mark.parametrize("f", list(REORDERED.values()), ids=list(REORDERED))
def test_einsum_weight_letters_reordered_in_the_output_are_exact(f):
    s, change = around(f, (6, 2, 3))
    assert change <= TOL, s.summary()


# --- attention over keys and values of lower rank than the queries ----------------------------
class LowRankKeys(nn.Module):
    """``F.scaled_dot_product_attention(q [B, H, L, e], k [H, S, e], v [H, S, e])`` (the keys and
    values broadcast over the batch), with per-position gains on the values and on the output:
    the sequence dim of ``k`` and ``v`` is their dim -2, not the queries'."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.gain_v, self.gain_out = nn.Parameter(torch.rand(5, 8)), nn.Parameter(torch.rand(5, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x).view(2, 5, 2, 4).transpose(1, 2)
        k = self.k(x[0]).view(5, 2, 4).transpose(0, 1)
        v = (self.v(x[0]) * self.gain_v).view(5, 2, 4).transpose(0, 1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8)
        return self.head(y * self.gain_out)


def test_attention_over_keys_of_lower_rank_is_exact():
    torch.manual_seed(0)
    s, change = change_under_gauge(LowRankKeys(), torch.randn(2, 5, 8, dtype=DTYPE))
    assert change <= TOL, s.summary()
    assert s.kind_counts().get("query-key", 0) > 0, s.summary()


# --- legitimate spellings a rule crashed on ---------------------------------------------------
SPELLINGS = {
    "F.linear with a 1-d weight": (lambda m, g: F.linear(g, m.p)[:, None], (6,), ()),
    "F.linear with a bias broadcast": (lambda m, g: F.linear(g, m.p, m.b), (5, 6), (1,)),
    "F.linear with a 0-d bias": (lambda m, g: F.linear(g, m.p, m.b), (5, 6), ()),
    "sum(0) of a 0-d tensor": (lambda m, g: g * g.sum().sum(0), (1,), ()),
    "amax(-1) of a 0-d tensor": (lambda m, g: g - g.amax().amax(-1), (1,), ()),
    "einsum with a weight broadcast": (
        lambda m, g: torch.einsum("bi,bi->b", g, m.p)[:, None],
        (3, 1),
        (),
    ),
    "einsum with a weight broadcast, kept": (
        lambda m, g: torch.einsum("bi,bi->bi", g * m.b, m.p),
        (1, 6),
        (3, 6),
    ),
}


@pytest.mark.parametrize("f, shape, bias", list(SPELLINGS.values()), ids=list(SPELLINGS))
def test_legitimate_spellings_are_traced_exactly(f, shape, bias):
    s, change = around(f, shape, bias)
    assert change <= TOL, s.summary()


# --- buffers the forward points at activations ------------------------------------------------
class RepointedBuffer(nn.Module):
    """A forward that keeps its hidden activations by re-pointing a buffer at them
    (``buf.set_(h.detach())``, which no torch function reports): the buffer is read after the
    forward like an output."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.register_buffer("hidden", torch.zeros(3, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        self.hidden.set_(h.detach())
        return self.l2(h)


def test_a_buffer_repointed_at_an_activation_blocks_it():
    torch.manual_seed(0)
    s, change = change_under_gauge(RepointedBuffer(), torch.randn(3, 4, dtype=DTYPE))
    assert change <= TOL, s.summary()
    assert "stored on module" in " | ".join(e.reason for e in s.excluded)


# --- sign tests: a positive factor keeps the sign of every entry --------------------------------
class SignGated(nn.Module):
    """``l2(f(l1(x)))``: a hidden activation written with a test of its sign."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.f(self.l1(x)))


SIGN_TESTS = {
    "where(h > 0, h, 0.1 h)": lambda h: torch.where(h > 0, h, 0.1 * h),
    "where(0 < h, h, -h)": lambda h: torch.where(0 < h, h, -h),
    "h * (h >= 0)": lambda h: h * (h >= 0),
    "masked_fill(h < 0, 0)": lambda h: h.masked_fill(h < 0, 0),
    "masked_fill(h.le(0), 0)": lambda h: h.masked_fill(h.le(0), 0),
    "h * sign(h)": lambda h: h * torch.sign(h),
    "where(h != 0, h, 0)": lambda h: torch.where(h != 0, h, 0.0),
    "where(torch.gt(h, 0), h, 0.2 h)": lambda h: torch.where(torch.gt(h, 0), h, 0.2 * h),
}
THRESHOLDS = {
    "where(h > 0.1, h, 0)": lambda h: torch.where(h > 0.1, h, 0.0),
    "h * (h > h.mean())": lambda h: h * (h > h.mean()),
    "h * (h.abs() > 1)": lambda h: h * (h.abs() > 1),
    "h * (h >= torch.zeros(1))": lambda h: h * (h >= torch.zeros(1, dtype=h.dtype) + 0.5),
}


@pytest.mark.parametrize("f", list(SIGN_TESTS.values()), ids=list(SIGN_TESTS))
def test_a_test_of_the_sign_keeps_the_hidden_generators(f):
    """Comparing a rescaled tensor with 0 (or taking its sign) gives a mask no positive factor
    changes: the hidden neurons keep their 6 generators, exactly."""
    torch.manual_seed(0)
    s, change = change_under_gauge(SignGated(f), torch.randn(5, 4, dtype=DTYPE))
    assert s.num_generators == 6, s.summary()
    assert change <= TOL, s.summary()


@pytest.mark.parametrize("f", list(THRESHOLDS.values()), ids=list(THRESHOLDS))
def test_a_test_against_another_threshold_blocks(f):
    """Against any other threshold a factor moves entries across it: no hidden generator."""
    torch.manual_seed(0)
    s, change = change_under_gauge(SignGated(f), torch.randn(5, 4, dtype=DTYPE))
    assert s.num_generators == 0, s.summary()
    assert change <= TOL, s.summary()


# --- selections by a constant index: the labels go where the entries go ------------------------
PERM = [2, 0, 1, 5, 4, 3, 3]  # a permutation of 6 channels with channel 3 read twice
# made before the trace: a constant (one made in the forward from Python numbers may have been
# computed from a size, and unites the channels it picks)
PERM_INDEX = torch.tensor(PERM)


def _index(h: Tensor) -> Tensor:
    return PERM_INDEX.to(h.device)


SELECTIONS = {
    "index_select": lambda h, x: torch.index_select(h, 1, _index(h)),
    "Tensor.index_select": lambda h, x: h.index_select(-1, _index(h)),
    "gather": lambda h, x: torch.gather(h, 1, _index(h).expand(h.shape[0], -1)),
    "take_along_dim": lambda h, x: torch.take_along_dim(h, _index(h)[None, :], dim=1),
}


def _by_data(x: Tensor) -> Tensor:
    """Six channel indices that depend on the input ``[B, 4]``: its first row ranked."""
    return torch.cat([x[0].argsort(), x[0].argsort()[:2] % 2 + 4])


DATA_SELECTIONS = {  # the index depends on the data: the channels picked must share one factor
    "index_select": lambda h, x: torch.index_select(h, 1, _by_data(x)),
    "gather": lambda h, x: torch.gather(h, 1, _by_data(x).expand(h.shape[0], -1)),
    "take_along_dim": lambda h, x: torch.take_along_dim(h, _by_data(x)[None, :], dim=1),
}


class Selected(nn.Module):
    """``l3(f(relu(l1(x))))``: the 6 hidden neurons, then ``f`` selects channels."""

    def __init__(self, f, width: int) -> None:
        super().__init__()
        self.f = f
        self.l1, self.l3 = nn.Linear(4, 6), nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(self.f(F.relu(self.l1(x)), x))


@pytest.mark.parametrize("f", list(SELECTIONS.values()), ids=list(SELECTIONS))
def test_a_selection_by_a_constant_index_keeps_the_hidden_generators(f):
    """Channels picked (one twice) by a constant index carry their neurons' factors: 6
    generators, exactly."""
    torch.manual_seed(0)
    s, change = change_under_gauge(Selected(f, len(PERM)), torch.randn(5, 4, dtype=DTYPE))
    assert s.num_generators == 6, s.summary()
    assert change <= TOL, s.summary()


@pytest.mark.parametrize("f", list(DATA_SELECTIONS.values()), ids=list(DATA_SELECTIONS))
def test_a_selection_by_the_data_is_exact(f):
    """An index computed from the input picks other channels for other inputs: the channels it
    picks from share one factor (at most one generator), exactly, also on inputs that order them
    otherwise."""
    torch.manual_seed(0)
    model = Selected(f, 6)
    s, change = change_under_gauge(model, torch.randn(5, 4, dtype=DTYPE))
    assert s.num_generators <= 1, s.summary()
    assert change <= TOL, s.summary()
    original = copy.deepcopy(model)
    gaugefix.random_gauge_(model, s, 2.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
            assert rel_change(original(x), model(x)) <= TOL, s.summary()
