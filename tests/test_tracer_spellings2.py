"""More spellings of exact symmetries that trace alike.

- A zero written in place at positions chosen without reading the rescaled values (``t[:, 3] =
  0``, ``t[..., :k] = 0``, ``t[idx] = 0``, ``fill_(0)`` and ``zero_()`` of a view, ``copy_`` of
  zeros, ``index_put_`` of 0 at integer indices, ``index_fill(dim, idx, 0)``) commutes with every
  positive rescaling of the entries: the model keeps every generator of the model without the
  write.
- Rescaled values accumulated into a tensor (``index_put_(..., accumulate=True)``,
  ``index_add_``, ``scatter_add_``, ``scatter_reduce_(..., "sum")``) tie only the channels that
  meet, like a residual sum: adding a tensor's rows into its own rows keeps every generator.
- ``torch.native_layer_norm``, ``torch.native_batch_norm`` and ``torch.native_group_norm``
  (ATen entry points) trace as ``F.layer_norm``, ``F.batch_norm`` and ``F.group_norm``.

Oracle: each spelling computes what its reference does (checked), finds as many generators
(some), and a random gauge of scale 2 keeps its float64 outputs to 1e-12 relative at the
example and at other batch sizes. Non-zero fills, positions computed from the rescaled values
and accumulation of other channels still block: the gauge the reference allows moves their
outputs, and their own structure has fewer generators and keeps them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_tracer_spellings import (
    BATCH,
    CHANNELS,
    DTYPE,
    EPS,
    LENGTH,
    MOMENTUM,
    SCALE,
    TOL,
    assigned,
    change_under,
    inputs,
    model,
    run,
    still_blocks,
    traces_as,
    zero,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# --- zeros written where no rescaled value says -------------------------------------------
def channels() -> Tensor:
    return torch.tensor([0, 2])


def keep(dim: int, where: list[int], size: int) -> Tensor:
    """A constant 0/1 multiplier zeroing positions ``where`` along ``dim`` of ``h``."""
    k = torch.ones(size, dtype=DTYPE)
    k[where] = 0
    return k.view(*([1] * dim), size, *([1] * (2 - dim)))


def first_rows(x: Tensor) -> Tensor:
    """Sample indices chosen by the input (the same under every gauge)."""
    return x[:, 0].argsort()[:2]


def identity(m, h, x) -> Tensor:
    return h


ZEROED = {
    "h[:, 3] = 0": [
        lambda m, h, x: assigned(h, (slice(None), 3), 0),
        lambda m, h, x: assigned(h, (slice(None), 3), 0.0),
        lambda m, h, x: assigned(h, (slice(None), 3), zero(h)),
        lambda m, h, x: (h[:, 3].fill_(0), h)[1],
        lambda m, h, x: (h[:, 3].zero_(), h)[1],
        lambda m, h, x: (h.select(1, 3).fill_(zero(h)), h)[1],
    ],
    "h[..., :2] = 0": [
        lambda m, h, x: assigned(h, (Ellipsis, slice(None, 2)), 0),
        lambda m, h, x: (h[..., :2].zero_(), h)[1],
        lambda m, h, x: (h[..., :2].copy_(torch.zeros(2, dtype=h.dtype)), h)[1],
        lambda m, h, x: (h.narrow(2, 0, 2).fill_(0.0), h)[1],
    ],
    "h[:, [0, 2]] = 0": [
        lambda m, h, x: assigned(h, (slice(None), channels()), 0),
        lambda m, h, x: assigned(h, (slice(None), [0, 2]), 0),
        lambda m, h, x: h.index_fill_(1, channels(), 0),
        lambda m, h, x: h.index_fill(1, channels(), 0.0),
        lambda m, h, x: torch.index_fill(h, 1, channels(), zero(h)),
        lambda m, h, x: h.index_put_((torch.arange(x.shape[0])[:, None], channels()), zero(h)),
        lambda m, h, x: h.index_put((torch.arange(x.shape[0])[:, None], channels()), zero(h)),
    ],
    "rows picked by the input = 0": [
        lambda m, h, x: assigned(h, first_rows(x), 0),
        lambda m, h, x: h.index_fill_(0, first_rows(x), 0),
        lambda m, h, x: h.index_put_((first_rows(x),), zero(h)),
    ],
}  # fmt: skip
ZERO_CASES = [
    pytest.param(spelling, id=f"{name} #{i}")
    for name, spellings in ZEROED.items()
    for i, spelling in enumerate(spellings)
]


@pytest.mark.parametrize("spelling", ZERO_CASES)
def test_zero_written_in_place_keeps_every_generator(spelling):
    keeps_every_generator(spelling)


def keeps_every_generator(f) -> None:
    """The model with ``f`` has the generators of the model without it (some), exact under a
    random gauge."""
    expected = gaugefix.discover(model(identity), inputs()).num_generators
    net = model(f)
    s = gaugefix.discover(net, inputs())
    assert expected > 0
    assert s.num_generators == expected, s.summary()
    assert change_under(net, s) <= TOL, s.summary()


def test_zero_writes_compute_the_masked_product():
    """The spellings compute what a constant 0/1 multiplier does (they write what is meant)."""
    x = inputs()
    references = {
        "h[:, 3] = 0": lambda m, h, x: h * keep(1, [3], CHANNELS),
        "h[..., :2] = 0": lambda m, h, x: h * keep(2, [0, 1], LENGTH),
        "h[:, [0, 2]] = 0": lambda m, h, x: h * keep(1, [0, 2], CHANNELS),
    }
    for name, reference in references.items():
        expected = run(model(reference), x)
        for spelling in ZEROED[name]:
            assert rel_change(expected, run(model(spelling), x)) <= TOL, name


BLOCKED_WRITES = {
    "h[:, 3] = 0.5": lambda m, h, x: assigned(h, (slice(None), 3), 0.5),
    "h[:, 3].fill_(0.5)": lambda m, h, x: (h[:, 3].fill_(0.5), h)[1],
    "h[..., :2] = tensor 0.5": lambda m, h, x: (
        h[..., :2].copy_(torch.full((2,), 0.5, dtype=h.dtype)), h
    )[1],
    "index_fill_ 0.5": lambda m, h, x: h.index_fill_(1, channels(), 0.5),
    "index_put 0.5": lambda m, h, x: h.index_put(
        (torch.arange(x.shape[0])[:, None], channels()), torch.tensor(0.5, dtype=h.dtype)
    ),
    "index_put_ 0.5": lambda m, h, x: h.index_put_(
        (torch.arange(x.shape[0])[:, None], channels()), torch.tensor(0.5, dtype=h.dtype)
    ),
    "h[:, 3] = a size minus 5": lambda m, h, x: assigned(h, (slice(None), 3), x.shape[0] - BATCH),
    "h[:, argmax of h] = 0": lambda m, h, x: assigned(h, (slice(None), h[0, :, 0].argmax()), 0),
    "index_fill_ at topk of h": lambda m, h, x: h.index_fill_(
        1, h.sum((0, 2)).topk(2).indices, 0
    ),
    "h[:, argsort of h] = 0": lambda m, h, x: assigned(
        h, (slice(None), h[0, :, 0].argsort()[:2]), 0
    ),
}  # fmt: skip


@pytest.mark.parametrize("f", list(BLOCKED_WRITES.values()), ids=list(BLOCKED_WRITES))
def test_other_fills_and_positions_read_from_the_scale_still_block(f):
    still_blocks(identity, f)


# --- rescaled values accumulated into a tensor --------------------------------------------
def samples() -> Tensor:
    """Sample indices with a repeat (accumulated twice)."""
    return torch.tensor([1, 1])


def rows_of(x: Tensor) -> Tensor:
    """An index ``[2, CHANNELS, LENGTH]`` along dim 0 (samples), for scatters."""
    return samples()[:, None, None].expand(2, CHANNELS, LENGTH)


ACCUMULATED = {
    "index_add_": lambda m, h, x: h.clone().index_add_(0, samples(), h[:2]),
    "index_put_ accumulate": lambda m, h, x: h.clone().index_put_(
        (samples(),), h[:2], accumulate=True
    ),
    "index_put accumulate": lambda m, h, x: torch.index_put(h, (samples(),), h[:2], True),
    "index_put_ accumulate, rows by the input": lambda m, h, x: h.clone().index_put_(
        (first_rows(x),), h[:2], accumulate=True
    ),
    "scatter_add_": lambda m, h, x: h.clone().scatter_add_(0, rows_of(x), h[:2]),
    "scatter_reduce_ sum": lambda m, h, x: h.clone().scatter_reduce_(0, rows_of(x), h[:2], "sum"),
    "scatter_reduce_ mean": lambda m, h, x: h.clone().scatter_reduce_(0, rows_of(x), h[:2], "mean"),
    "scatter_reduce sum, not self": lambda m, h, x: h.scatter_reduce(
        0, rows_of(x), h[:2], reduce="sum", include_self=False
    ),
}  # fmt: skip


@pytest.mark.parametrize("f", list(ACCUMULATED.values()), ids=list(ACCUMULATED))
def test_accumulating_a_tensor_into_its_own_channels_keeps_every_generator(f):
    """Rows of ``h`` added into rows of ``h`` meet the same channels: nothing is lost."""
    keeps_every_generator(f)


OTHER_CHANNELS = {
    "index_put_ accumulate": lambda m, h, x: h.clone().index_put_(
        (samples(),), h[:2].roll(1, 1), accumulate=True
    ),
    "index_put_ accumulate, channels by the input": lambda m, h, x: h.clone().index_put_(
        (torch.arange(x.shape[0])[:, None], x[0, :2].argsort()), h[:, :2], accumulate=True
    ),
    "index_add_": lambda m, h, x: h.clone().index_add_(0, samples(), h[:2].roll(1, 1)),
    "scatter_reduce_ sum": lambda m, h, x: h.clone().scatter_reduce_(
        0, rows_of(x), h[:2].roll(1, 1), "sum"
    ),
    "scatter_reduce_ prod": lambda m, h, x: h.clone().scatter_reduce_(0, rows_of(x), h[:2], "prod"),
}  # fmt: skip


@pytest.mark.parametrize("f", list(OTHER_CHANNELS.values()), ids=list(OTHER_CHANNELS))
def test_accumulating_other_channels_still_ties_or_blocks(f):
    """Channels rolled onto others meet them (they are tied); a product is not a sum."""
    still_blocks(identity, f)


# --- ATen entry points of the norms -------------------------------------------------------
L = (LENGTH,)
NATIVE_NORMS = {
    "native_layer_norm": (
        lambda m, h, x: F.layer_norm(h, L, m.w, m.b, EPS),
        lambda m, h, x: torch.native_layer_norm(h, L, m.w, m.b, EPS)[0],
    ),
    "native_layer_norm, keywords": (
        lambda m, h, x: F.layer_norm(h, L, m.w, m.b, EPS),
        lambda m, h, x: torch.native_layer_norm(
            input=h, normalized_shape=L, weight=m.w, bias=m.b, eps=EPS
        )[0],
    ),
    "native_batch_norm, eval": (
        lambda m, h, x: F.batch_norm(h, m.mean, m.var, m.wc, m.bc, False, MOMENTUM, EPS),
        lambda m, h, x: torch.native_batch_norm(
            h, m.wc, m.bc, m.mean, m.var, False, MOMENTUM, EPS
        )[0],
    ),
    "native_batch_norm, training": (
        lambda m, h, x: F.batch_norm(h, m.mean, m.var, m.wc, m.bc, True, MOMENTUM, EPS),
        lambda m, h, x: torch.native_batch_norm(
            h, m.wc, m.bc, m.mean, m.var, True, MOMENTUM, EPS
        )[0],
    ),
    "native_group_norm": (
        lambda m, h, x: F.group_norm(h, 2, m.wc, m.bc, EPS),
        lambda m, h, x: torch.native_group_norm(
            h, m.wc, m.bc, x.shape[0], CHANNELS, LENGTH, 2, EPS
        )[0],
    ),
    "native_layer_norm, statistics used": (
        lambda m, h, x: F.layer_norm(h, L, m.w, m.b, EPS)
        * torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + EPS),
        lambda m, h, x: (lambda o: o[0] * o[2])(torch.native_layer_norm(h, L, m.w, m.b, EPS)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("reference, spelling", list(NATIVE_NORMS.values()), ids=list(NATIVE_NORMS))
def test_native_norm_traces_as_its_functional_form(reference, spelling):
    traces_as(reference, spelling)


# --- parameters read through slices along dim 0 -------------------------------------------
class Sliced(nn.Module):
    """``head(relu(f(self, relu(stem(x)))))``: ``f`` reads the parameter ``w`` (made by
    ``init``) through some view; ``v`` holds a copy of what ``view`` takes of ``w``, for the
    reference that reads ``v`` whole."""

    def __init__(self, f, shape: tuple[int, ...], view) -> None:
        super().__init__()
        self.f = f
        self.stem = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(shape))
        self.v = nn.Parameter(view(self.w.detach()).clone())
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.f(self, F.relu(self.stem(x)))))


def sliced(f, shape, view) -> Sliced:
    torch.manual_seed(0)
    return Sliced(f, shape, view).to(DTYPE)


def pair(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """Two halves of a fused weight applied to ``h`` and summed after a ReLU each."""
    return F.relu(F.linear(h, a)) + F.relu(F.linear(h, b))


# name: (spelling reading w, shape of w, the view of w, reference reading v; None: a linear
# map by v)
SLICES = {
    "w[:3]": (lambda m, h: F.linear(h, m.w[:3]), (5, 6), lambda w: w[:3], None),
    "w[1:4, ...]": (lambda m, h: F.linear(h, m.w[1:4, ...]), (5, 6), lambda w: w[1:4], None),
    "w[1:6:2, :]": (lambda m, h: F.linear(h, m.w[1:6:2, :]), (6, 6), lambda w: w[1:6:2], None),
    "narrow": (lambda m, h: F.linear(h, m.w.narrow(0, 1, 3)), (5, 6), lambda w: w[1:4], None),
    "select": (lambda m, h: F.linear(h, m.w.select(0, 1)), (2, 3, 6), lambda w: w[1], None),
    "chunk": (lambda m, h: F.linear(h, m.w.chunk(2)[1]), (6, 6), lambda w: w[3:], None),
    "torch.split": (lambda m, h: F.linear(h, torch.split(m.w, 3)[0]), (6, 6), lambda w: w[:3],
                    None),
    "split sizes": (lambda m, h: F.linear(h, m.w.split([2, 3], dim=0)[1]), (5, 6),
                    lambda w: w[2:], None),
    "tensor_split": (lambda m, h: F.linear(h, m.w.tensor_split(2)[0]), (6, 6),
                     lambda w: w[:3], None),
    "unbind": (lambda m, h: F.linear(h, m.w.unbind()[0]), (2, 3, 6), lambda w: w[0], None),
    "w[:3].T": (lambda m, h: h @ m.w[:3].T, (5, 6), lambda w: w[:3], lambda m, h: h @ m.v.T),
    "fused halves": (lambda m, h: pair(*m.w.chunk(2), h), (6, 6), lambda w: w,
                     lambda m, h: pair(m.v[:3], m.v[3:], h)),
}  # fmt: skip


@pytest.mark.parametrize(
    "spelling, shape, view, reference", list(SLICES.values()), ids=list(SLICES)
)
def test_parameter_sliced_along_dim_0_keeps_the_generators(spelling, shape, view, reference):
    """A weight read through slices along dim 0 keeps the generators of a weight holding those
    slices: the slices are the parameter's rows, picked at constant places."""
    reference = reference or (lambda m, h: F.linear(h, m.v))
    x = inputs()
    expected_net, net = sliced(reference, shape, view), sliced(spelling, shape, view)
    assert rel_change(run(expected_net, x), run(net, x)) <= TOL
    expected = gaugefix.discover(expected_net, x).num_generators
    s = gaugefix.discover(net, x)
    assert expected > 0
    assert s.num_generators == expected, s.summary()
    assert change_under(net, s) <= TOL, s.summary()


SHARED_ROWS = {
    "overlapping slices": lambda m, h: F.linear(h, m.w[:3]) + F.linear(h, m.w[2:5]),
    "a slice and the whole": lambda m, h: F.linear(h, m.w[:3]) + F.linear(h, m.w)[:, 1:4],
}  # fmt: skip


@pytest.mark.parametrize("f", list(SHARED_ROWS.values()), ids=list(SHARED_ROWS))
def test_slices_sharing_rows_are_exact(f):
    """Rows read by several slices carry the factors of every use (or are fixed)."""
    net = sliced(f, (5, 6), lambda w: w)
    s = gaugefix.discover(net, inputs())
    assert s.num_generators > 0, s.summary()
    assert change_under(net, s) <= TOL, s.summary()


PLACED_BY_A_SIZE = {
    "w[: B - 2]": lambda m, h: F.linear(h, m.w[: h.shape[0] - 2]),
    "w.narrow(0, 0, B - 2)": lambda m, h: F.linear(h, m.w.narrow(0, 0, h.shape[0] - 2)),
}


@pytest.mark.parametrize("f", list(PLACED_BY_A_SIZE.values()), ids=list(PLACED_BY_A_SIZE))
def test_parameter_slices_placed_by_a_size_still_block(f):
    """Rows ``:B - 2`` are rows ``:3`` at the example only: the parameter is fixed."""
    x = inputs()
    plain = gaugefix.discover(sliced(SLICES["w[:3]"][0], (5, 6), lambda w: w), x)
    net = sliced(f, (5, 6), lambda w: w)
    s = gaugefix.discover(net, x)
    assert s.num_generators < plain.num_generators, s.summary()
    before = run(net, x)
    gaugefix.random_gauge_(net, s, SCALE, torch.Generator().manual_seed(1))
    assert rel_change(before, run(net, x)) <= TOL
