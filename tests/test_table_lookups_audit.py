"""An adversarial audit of how discovery reads whole rows of a 2-D table looked up by the data
(``p[ids]``, ``p.index_select(0, ids)``) as ``F.embedding(ids, p)``: the table's columns
produce the output's channels, one factor per column for every row.

Every model is float64; its structure is discovered on one example and must be exact on FRESH
ids (other values, other counts): a random gauge of scale 3 changes the outputs by at most
1e-10 relative. Three groups:

- the looked-up rows used every other way (a tied head, ``F.linear(x, p)``, ``p.sum()``, rows
  normalised, a per-expert bias or gain, gating, a weight, softmax logits, thresholds, ``relu``,
  ``exp``, sums along the channels, ``p[ids] @ p.T``, two lookups added, transposed), spelt by
  indexing and by ``index_select``: the structure is the one ``F.embedding`` gives, and the
  table is fixed where a use is not homogeneous in its columns;
- ids of shape ``[]``, ``[B]``, ``[B, T]``, negative, ``int32``, and ids computed from the
  rescaled state (``argmax``, ``topk``, ``argsort``, thresholds, ``bucketize``, ``round``),
  as ``F.embedding`` reads them;
- tables held other ways: a view of a 3-D parameter, frozen, in a ``ParameterList`` or a
  ``ParameterDict``, written after the lookup, looked up under ``torch.no_grad``, an
  ``nn.Embedding`` whose weight is also indexed, rows also picked by a size or at a constant
  place, read through ``detach``, a stacked experts' bias whose example meets only some of
  the experts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from test_experts import same_structure
from test_table_lookups import acts_on, change_under_gauge

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL = torch.float64, 1e-10
VOCAB, WIDTH, UNITS, EXPERTS, IN = 11, 6, 5, 3, 3
EXAMPLE, FRESH = 8, (3, 5, 13)
THRESHOLD = 0.5  # a comparison that a rescaling of its operand changes


class Net(nn.Module):
    """A module whose forward is ``forward(self, x, ids)``, with a table ``p [VOCAB, WIDTH]``,
    ``inp: IN -> WIDTH``, a head ``o(relu(a(.)))`` (``WIDTH -> UNITS -> 2``) and the given
    parts."""

    def __init__(self, forward: Callable[..., Tensor], **parts: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.run = forward
        self.p = nn.Parameter(torch.randn(VOCAB, WIDTH))
        self.inp, self.a, self.o = (
            nn.Linear(IN, WIDTH),
            nn.Linear(WIDTH, UNITS),
            nn.Linear(UNITS, 2),
        )
        for name, part in parts.items():
            setattr(self, name, part)
        self.to(DTYPE)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.run(self, x, ids)


def head(m: Net, e: Tensor) -> Tensor:
    return m.o(F.relu(m.a(e)))


def hidden(m: Net, x: Tensor) -> Tensor:
    return F.relu(m.inp(x))


def inputs(n: int, seed: int, ids_shape: tuple = (None,), dtype=torch.int64) -> tuple:
    """``x [n, IN]`` and ids of ``ids_shape`` (``None`` stands for ``n``) in ``[0, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(n if d is None else d for d in ids_shape)
    x = torch.randn(n, IN, dtype=DTYPE, generator=g)
    return x, torch.randint(0, VOCAB, shape, generator=g).to(dtype)


def discovered(model: nn.Module, example: tuple, fresh: list) -> tuple:
    """The structure found on ``example`` and its change on ``example`` and ``fresh``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = gaugefix.discover(model, *example)
        return s, change_under_gauge(model, s, example, *fresh)


# -- uses of the looked-up rows, three spellings of the lookup ---------------------------------
LOOKUPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "embedding": lambda w, i: F.embedding(i, w),
    "getitem": lambda w, i: w[i],
    "index_select": lambda w, i: w.index_select(0, i.reshape(-1)).view(*i.shape, w.shape[1]),
}


def per_expert_bias(m: Net, r: Tensor, x: Tensor, ids: Tensor) -> Tensor:
    """``relu(x @ w[e].T + r)`` with ``e = ids % EXPERTS`` and ``w [EXPERTS, WIDTH, IN]``:
    per-expert unit factors met by the rows."""
    return head(m, F.relu(torch.einsum("nk,ndk->nd", x, m.w[ids % EXPERTS]) + r))


# name -> (use(m, r, x, ids) with r the looked-up rows, the table must be fixed)
USES: dict[str, tuple[Callable[..., Tensor], bool]] = {
    "added": (lambda m, r, x, i: head(m, r + hidden(m, x)), False),
    "tied head x @ p.T": (lambda m, r, x, i: (r + hidden(m, x)) @ m.p.T, False),
    "F.linear(x, p)": (lambda m, r, x, i: F.linear(r + hidden(m, x), m.p), False),
    "times p.sum()": (lambda m, r, x, i: head(m, r + hidden(m, x)) * m.p.sum(), True),
    "p's rows normalised": (
        lambda m, r, x, i: head(m, r + hidden(m, x)) + (m.p / m.p.norm(dim=1, keepdim=True)).sum(),
        True,
    ),
    "gating h * p[ids]": (lambda m, r, x, i: head(m, hidden(m, x) * r), False),
    "weight x @ p[ids].T": (lambda m, r, x, i: F.relu(hidden(m, x) @ r.T) @ r, False),
    "softmax logits": (lambda m, r, x, i: head(m, hidden(m, x) + F.softmax(r, -1)), True),
    "thresholded": (lambda m, r, x, i: head(m, hidden(m, x) + (r > THRESHOLD).to(DTYPE)), True),
    "relu": (lambda m, r, x, i: head(m, hidden(m, x) + F.relu(r)), False),
    "exp": (lambda m, r, x, i: head(m, hidden(m, x) + r.exp()), True),
    "sum(-1)": (lambda m, r, x, i: head(m, hidden(m, x) + r.sum(-1, keepdim=True)), False),
    "p[ids] @ p.T": (lambda m, r, x, i: r @ m.p.T, True),
    "p[ids] * p[ids]": (lambda m, r, x, i: head(m, hidden(m, x) + r * r), True),
    "transposed": (lambda m, r, x, i: head(m, (r.T + hidden(m, x).T).T), False),
    "rows normalised": (lambda m, r, x, i: head(m, hidden(m, x) + F.normalize(r, dim=-1)), True),
    "per-expert bias": (per_expert_bias, False),
}


@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("lookup", ["getitem", "index_select"])
def test_looked_up_rows_used_any_way_are_read_as_an_embedding(lookup, use):
    """The structure ``F.embedding`` gives, exact on fresh ids; uses that are not homogeneous
    in the table's columns (``exp``, softmax, a threshold, ``p.sum()``, normalised rows, a
    product of two lookups, ``p[ids] @ p.T``) fix the table."""
    form, fixed = USES[use]
    look = LOOKUPS[lookup]
    parts = {"w": nn.Parameter(torch.randn(EXPERTS, WIDTH, IN))}
    model = Net(lambda m, x, i: form(m, look(m.p, i), x, i), **parts)
    reference = Net(lambda m, x, i: form(m, F.embedding(i, m.p), x, i), **parts)
    example, fresh = inputs(EXAMPLE, 1), [inputs(n, n) for n in FRESH]
    s, change = discovered(model, example, fresh)
    same_structure(s, gaugefix.discover(reference, *example))
    assert change <= TOL, s.summary()
    if fixed:
        assert not acts_on(s, "p"), s.summary()


def two_lookups(m: Net, x: Tensor, i: Tensor) -> Tensor:
    return head(m, m.p[i] + m.p.index_select(0, (i + 3) % VOCAB) + hidden(m, x))


def test_two_lookups_added_keep_the_embedding_structure():
    """``p[ids] + p[ids2]``: one factor per column, as for one lookup."""
    model = Net(two_lookups)
    s, change = discovered(model, inputs(EXAMPLE, 1), [inputs(n, n) for n in FRESH])
    assert change <= TOL
    assert acts_on(s, "p") and s.num_generators == UNITS + WIDTH, s.summary()


# -- ids of other shapes and dtypes, ids from the rescaled state -------------------------------
# name -> (ids shape, dtype, ids(m, x, ids))
IDS: dict[str, tuple[tuple, torch.dtype, Callable[[Net, Tensor, Tensor], Tensor]]] = {
    "[]": ((), torch.int64, lambda m, x, i: i),
    "[B]": ((None,), torch.int64, lambda m, x, i: i),
    "[B, T]": ((2, None), torch.int64, lambda m, x, i: i),
    "int32": ((None,), torch.int32, lambda m, x, i: i),
    "argmax of h": ((None,), torch.int64, lambda m, x, i: hidden(m, x).argmax(-1)),
    "argmax of p[ids]": ((None,), torch.int64, lambda m, x, i: m.p[i].argmax(-1)),
    "max(-1).indices": ((None,), torch.int64, lambda m, x, i: hidden(m, x).max(-1).indices),
    "topk": ((None,), torch.int64, lambda m, x, i: hidden(m, x).topk(1).indices[:, 0]),
    "argsort": ((None,), torch.int64, lambda m, x, i: hidden(m, x).argsort(-1)[:, 0]),
    "h > threshold": (
        (None,),
        torch.int64,
        lambda m, x, i: (hidden(m, x)[:, 0] > THRESHOLD).long(),
    ),
    "bucketize": (
        (None,),
        torch.int64,
        lambda m, x, i: torch.bucketize(hidden(m, x)[:, 0], torch.tensor([0.2, THRESHOLD, 1.0])),
    ),
    "round": ((None,), torch.int64, lambda m, x, i: hidden(m, x)[:, 0].round().long() % VOCAB),
    "int32 threshold": (
        (None,),
        torch.int64,
        lambda m, x, i: (hidden(m, x)[:, 0] > THRESHOLD).int(),
    ),
}


def looked_up_by(look: Callable, ids: Callable) -> Callable:
    """``head(look(p, ids) + h)``, summed over a leading dim of the ids beyond the batch."""

    def forward(m: Net, x: Tensor, i: Tensor) -> Tensor:
        y = head(m, look(m.p, ids(m, x, i)) + hidden(m, x))
        return y.sum(0) if y.dim() == 3 else y

    return forward


@pytest.mark.parametrize("ids", list(IDS))
@pytest.mark.parametrize("lookup", ["getitem", "index_select"])
def test_ids_of_any_shape_and_origin_are_read_as_an_embedding_reads_them(lookup, ids):
    """The structure ``F.embedding`` gives with the same ids, exact on fresh ids."""
    shape, dtype, make = IDS[ids]
    model = Net(looked_up_by(LOOKUPS[lookup], make))
    reference = Net(looked_up_by(LOOKUPS["embedding"], make))
    example = inputs(EXAMPLE, 1, shape, dtype)
    fresh = [inputs(n, n, shape, dtype) for n in FRESH]
    s, change = discovered(model, example, fresh)
    same_structure(s, gaugefix.discover(reference, *example))
    assert change <= TOL, s.summary()


def test_negative_ids_are_read_as_the_rows_they_name():
    """``p[ids - VOCAB]`` (rows counted from the end) gives the structure of
    ``F.embedding(ids, p)``, exact on fresh ids."""
    model = Net(looked_up_by(LOOKUPS["getitem"], lambda m, x, i: i - VOCAB))
    reference = Net(looked_up_by(LOOKUPS["embedding"], lambda m, x, i: i))
    example = inputs(EXAMPLE, 1)
    s, change = discovered(model, example, [inputs(n, n) for n in FRESH])
    same_structure(s, gaugefix.discover(reference, *example))
    assert change <= TOL, s.summary()


# -- tables held other ways --------------------------------------------------------------------
def written_after(m: Net, x: Tensor, i: Tensor) -> Tensor:
    rows = m.p[i]
    with torch.no_grad():
        m.p[i[:1]] = m.p[i[:1]] * 1.0
    return head(m, rows + hidden(m, x))


def looked_up_without_grad(m: Net, x: Tensor, i: Tensor) -> Tensor:
    with torch.no_grad():
        rows = m.p[i]
    return head(m, rows + hidden(m, x))


# name -> (forward, parts, parameters that must stay fixed)
HELD: dict[str, tuple[Callable[..., Tensor], Callable[[], dict], tuple[str, ...]]] = {
    "a view of a 3-D parameter": (
        lambda m, x, i: head(m, m.q[1][i] + m.q[0].index_select(0, i) + hidden(m, x)),
        lambda: {"q": nn.Parameter(torch.randn(2, VOCAB, WIDTH))},
        (),
    ),
    "frozen": (
        lambda m, x, i: head(m, m.p[i] + hidden(m, x)),
        lambda: {},
        (),
    ),
    "ParameterList": (
        lambda m, x, i: head(m, m.pl[0][i] + m.pl[1].index_select(0, i) + hidden(m, x)),
        lambda: {"pl": nn.ParameterList([torch.randn(VOCAB, WIDTH) for _ in range(2)])},
        (),
    ),
    "ParameterDict": (
        lambda m, x, i: head(m, m.pd["t"][i] + hidden(m, x)),
        lambda: {"pd": nn.ParameterDict({"t": torch.randn(VOCAB, WIDTH)})},
        (),
    ),
    "written after the lookup": (written_after, lambda: {}, ("p",)),
    "looked up under no_grad": (looked_up_without_grad, lambda: {}, ()),
    "nn.Embedding also indexed": (
        lambda m, x, i: head(m, m.emb(i) + m.emb.weight[(i + 2) % VOCAB] + hidden(m, x)),
        lambda: {"emb": nn.Embedding(VOCAB, WIDTH)},
        (),
    ),
    "rows from arange(n) and ids": (
        lambda m, x, i: head(m, m.p[(torch.arange(x.shape[0]) + i) % VOCAB] + hidden(m, x)),
        lambda: {},
        (),
    ),
    "leading rows by a size too": (
        lambda m, x, i: head(m, m.p[: x.shape[0] % VOCAB + 1].sum(0) + m.p[i] + hidden(m, x)),
        lambda: {},
        (),
    ),
    "a constant row too": (
        lambda m, x, i: head(m, m.p[torch.tensor(3)] + m.p.index_select(0, i) + hidden(m, x)),
        lambda: {},
        (),
    ),
    "looked up from p.detach()": (  # as F.embedding(i, p.detach()), the same values
        lambda m, x, i: head(m, m.p.detach()[i] + hidden(m, x)),
        lambda: {},
        (),
    ),
    "rows' signs": (lambda m, x, i: head(m, m.p[i].sign() + hidden(m, x)), lambda: {}, ("p",)),
    "rows' maxima": (
        lambda m, x, i: head(m, m.p[i].amax(1, keepdim=True) + hidden(m, x)),
        lambda: {},
        (),
    ),
    "a row read as a weight too": (
        lambda m, x, i: head(m, m.p[i] + hidden(m, x)) + (hidden(m, x) @ m.p[0])[:, None],
        lambda: {},
        (),
    ),
    "columns by the data too": (
        lambda m, x, i: head(m, m.p[i] + hidden(m, x)) + m.p[:, i % WIDTH].sum(),
        lambda: {},
        ("p",),
    ),
}


@pytest.mark.parametrize("held", list(HELD))
def test_tables_held_other_ways(held):
    """Exact on fresh ids; a table written by the forward, also read by columns or by its signs
    is fixed."""
    forward, parts, fixed = HELD[held]
    model = Net(forward, **parts())
    if held == "frozen":
        model.p.requires_grad_(False)
    s, change = discovered(model, inputs(EXAMPLE, 1), [inputs(n, n) for n in FRESH])
    assert change <= TOL, s.summary()
    assert not any(acts_on(s, name) for name in fixed), s.summary()


# -- stacked experts' biases looked up by the router -------------------------------------------
def expert_bias(m: Net, x: Tensor, e: Tensor) -> Tensor:
    """``relu(x @ w1[e].T + q[e]) @ w2[e].T`` per token, ``e`` in ``[0, EXPERTS)``: each
    expert's units have their own factors, and the bias table ``q [EXPERTS, UNITS]`` is looked
    up by the router."""
    h = F.relu(torch.einsum("nk,nuk->nu", x, m.w1[e]) + m.q.index_select(0, e))
    return torch.einsum("nu,ndu->nd", h, m.w2[e])


@pytest.mark.parametrize("met", [EXPERTS, EXPERTS - 1], ids=["all met", "one unmet"])
def test_a_looked_up_expert_bias_is_exact_for_experts_the_example_misses(met):
    """Rows of ``q`` get one factor per column; fresh tokens routed to an expert the example
    never met stay exact."""
    parts = {
        "w1": nn.Parameter(torch.randn(EXPERTS, UNITS, IN)),
        "w2": nn.Parameter(torch.randn(EXPERTS, 2, UNITS)),
        "q": nn.Parameter(torch.randn(EXPERTS, UNITS)),
    }
    model = Net(expert_bias, **parts)
    g = torch.Generator().manual_seed(1)
    example = (torch.randn(EXAMPLE, IN, dtype=DTYPE, generator=g), torch.arange(EXAMPLE) % met)
    fresh = [(torch.randn(n, IN, dtype=DTYPE), torch.arange(n) % EXPERTS) for n in FRESH]
    s, change = discovered(model, example, fresh)
    assert change <= TOL, s.summary()
