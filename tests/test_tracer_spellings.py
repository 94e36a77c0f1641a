"""Spellings of one op trace alike: the norm layers called as ``torch.layer_norm``,
``torch.rms_norm``, ``torch.group_norm``, ``torch.batch_norm`` and ``torch.instance_norm``
(whose arguments are ordered unlike the ``F.*`` forms) keep the generators of their ``F.*``
forms, and ``t[mask] = 0`` (``index_put_`` with a boolean mask) keeps those of
``t.masked_fill(mask, 0)``.

Oracle: each spelling computes what its ``F.*`` form computes (checked), finds as many
generators, and a random gauge of scale 2 keeps its float64 outputs to 1e-12 relative at the
example and at other batch sizes. A non-zero fill and a mask computed from the rescaled tensor
still block: the gauge the zero fill allows moves their outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
MOVED = 1e-3  # an output change that no rounding explains
SCALE = 2.0
CHANNELS, LENGTH = 4, 3
BATCH = 5
OTHER_BATCHES = (2, 7)
EPS = 1e-5
MOMENTUM = 0.1


class Net(nn.Module):
    """``head(f(self, h, x))`` with ``h = relu(stem(x))`` viewed ``[batch, CHANNELS, LENGTH]``;
    ``f`` may read the gains ``wc, bc [CHANNELS]`` and ``w, b [LENGTH]`` and the running
    statistics ``mean, var [CHANNELS]`` (buffers)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.stem = nn.Linear(4, CHANNELS * LENGTH)
        self.wc = nn.Parameter(torch.rand(CHANNELS) + 0.5)
        self.bc = nn.Parameter(torch.randn(CHANNELS))
        self.w = nn.Parameter(torch.rand(LENGTH) + 0.5)
        self.b = nn.Parameter(torch.randn(LENGTH))
        self.register_buffer("mean", torch.randn(CHANNELS))
        self.register_buffer("var", torch.rand(CHANNELS) + 0.5)
        self.head = nn.Linear(CHANNELS * LENGTH, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x)).view(x.shape[0], CHANNELS, LENGTH)
        return self.head(self.f(self, h, x).reshape(x.shape[0], -1))


def model(f) -> Net:
    torch.manual_seed(0)
    return Net(f).to(DTYPE)


def inputs(batch: int = BATCH) -> Tensor:
    return torch.randn(batch, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(batch))


def run(net: nn.Module, x: Tensor) -> Tensor:
    """``net(x)`` on a copy of the buffers (training-mode norms update them)."""
    saved = [(b, b.clone()) for b in net.buffers()]
    with torch.no_grad():
        out = net(x)
        for b, value in saved:
            b.copy_(value)
    return out


def change_under(net: Net, s: gaugefix.GaugeStructure) -> float:
    """The largest relative output change of ``net`` under a random gauge of ``s``, at the
    example and at other batch sizes."""
    xs = [inputs(), *(inputs(n) for n in OTHER_BATCHES)]
    before = [run(net, x) for x in xs]
    assert all(bool(b.isfinite().all()) for b in before)
    gaugefix.random_gauge_(net, s, SCALE, torch.Generator().manual_seed(1))
    return max(rel_change(b, run(net, x)) for b, x in zip(before, xs, strict=True))


# --- norm layers: (F form, torch forms) ----------------------------------------------------
L, C = (LENGTH,), CHANNELS
NORMS = {
    "layer_norm": (
        lambda m, h, x: F.layer_norm(h, L, m.w, m.b, EPS),
        [
            lambda m, h, x: torch.layer_norm(h, L, m.w, m.b, EPS, True),
            lambda m, h, x: torch.layer_norm(h, L, m.w, m.b, EPS, False),
            lambda m, h, x: torch.layer_norm(
                input=h, normalized_shape=L, weight=m.w, bias=m.b, eps=EPS, cudnn_enable=False
            ),
            lambda m, h, x: torch.layer_norm(h, [LENGTH], bias=m.b, weight=m.w),
        ],
    ),
    "layer_norm without bias": (
        lambda m, h, x: F.layer_norm(h, L, m.w),
        [lambda m, h, x: torch.layer_norm(h, L, m.w)],
    ),
    "rms_norm": (
        lambda m, h, x: F.rms_norm(h, L, m.w, EPS),
        [
            lambda m, h, x: torch.rms_norm(h, L, m.w, EPS),
            lambda m, h, x: torch.rms_norm(input=h, normalized_shape=L, weight=m.w, eps=EPS),
        ],
    ),
    "rms_norm, default eps": (
        lambda m, h, x: F.rms_norm(h, L, m.w),
        [lambda m, h, x: torch.rms_norm(h, L, weight=m.w, eps=None)],
    ),
    "group_norm": (
        lambda m, h, x: F.group_norm(h, 2, m.wc, m.bc, EPS),
        [
            lambda m, h, x: torch.group_norm(h, 2, m.wc, m.bc, EPS, True),
            lambda m, h, x: torch.group_norm(h, 2, m.wc, m.bc, EPS, False),
            lambda m, h, x: torch.group_norm(
                input=h, num_groups=2, weight=m.wc, bias=m.bc, eps=EPS, cudnn_enabled=True
            ),
        ],
    ),
    "batch_norm, eval": (
        lambda m, h, x: F.batch_norm(h, m.mean, m.var, m.wc, m.bc, False, MOMENTUM, EPS),
        [
            lambda m, h, x: torch.batch_norm(
                h, m.wc, m.bc, m.mean, m.var, False, MOMENTUM, EPS, True
            ),
            lambda m, h, x: torch.batch_norm(
                h, m.wc, m.bc, m.mean, m.var, False, MOMENTUM, EPS, False
            ),
            lambda m, h, x: torch.batch_norm(
                input=h, weight=m.wc, bias=m.bc, running_mean=m.mean, running_var=m.var,
                training=False, momentum=MOMENTUM, eps=EPS, cudnn_enabled=True,
            ),
        ],
    ),
    "batch_norm, training": (
        lambda m, h, x: F.batch_norm(h, m.mean, m.var, m.wc, m.bc, True, MOMENTUM, EPS),
        [
            lambda m, h, x: torch.batch_norm(
                h, m.wc, m.bc, m.mean, m.var, True, MOMENTUM, EPS, True
            ),
            lambda m, h, x: torch.batch_norm(h, m.wc, m.bc, None, None, True, MOMENTUM, EPS, False),
        ],
    ),
    "instance_norm": (
        lambda m, h, x: F.instance_norm(h, None, None, m.wc, m.bc, True, MOMENTUM, EPS),
        [
            lambda m, h, x: torch.instance_norm(
                h, m.wc, m.bc, None, None, True, MOMENTUM, EPS, True
            ),
            lambda m, h, x: torch.instance_norm(
                h, m.wc, m.bc, m.mean, m.var, True, MOMENTUM, EPS, False
            ),
        ],
    ),
    "instance_norm, running statistics": (
        lambda m, h, x: F.instance_norm(h, m.mean, m.var, m.wc, m.bc, False, MOMENTUM, EPS),
        [
            lambda m, h, x: torch.instance_norm(
                input=h, weight=m.wc, bias=m.bc, running_mean=m.mean, running_var=m.var,
                use_input_stats=False, momentum=MOMENTUM, eps=EPS, cudnn_enabled=False,
            ),
        ],
    ),
}  # fmt: skip
NORM_CASES = [
    pytest.param(f_form, spelling, id=f"{name} #{i}")
    for name, (f_form, spellings) in NORMS.items()
    for i, spelling in enumerate(spellings)
]


@pytest.mark.parametrize("f_form, spelling", NORM_CASES)
def test_torch_norm_spelling_traces_as_its_functional_form(f_form, spelling):
    traces_as(f_form, spelling)


def traces_as(f_form, spelling) -> None:
    """``spelling`` computes what ``f_form`` does (one op, two spellings), and its discovery
    finds as many generators (some), exact under a random gauge."""
    reference, net = model(f_form), model(spelling)
    x = inputs()
    assert rel_change(run(reference, x), run(net, x)) <= TOL
    expected = gaugefix.discover(reference, x).num_generators
    s = gaugefix.discover(net, x)
    assert expected > 0
    assert s.num_generators == expected, s.summary()
    assert change_under(net, s) <= TOL, s.summary()


def still_blocks(reference, f) -> None:
    """The gauge ``reference`` allows moves the outputs of ``f``; the structure of ``f`` has
    fewer generators and keeps them."""
    x = inputs()
    allowed = gaugefix.discover(model(reference), x)
    net = model(f)
    assert change_under(net, allowed) > MOVED
    net = model(f)
    s = gaugefix.discover(net, x)
    assert s.num_generators < allowed.num_generators, s.summary()
    assert change_under(net, s) <= TOL, s.summary()


# --- t[mask] = 0: (masked_fill form, assignment forms) ---------------------------------------
def assigned(h: Tensor, index, value) -> Tensor:
    h[index] = value
    return h


def rows(x: Tensor) -> Tensor:
    """A mask of the samples, from the input (the same under every gauge)."""
    return x[:, 0] > 0


def entries(x: Tensor) -> Tensor:
    """A mask ``[batch, CHANNELS, LENGTH]`` from the input."""
    return (x[:, :CHANNELS, None] * torch.arange(-1.0, LENGTH - 1.0, dtype=DTYPE)) > 0


def zero(h: Tensor) -> Tensor:
    return torch.zeros((), dtype=h.dtype)


FILLS = {
    "rows = 0": (
        lambda m, h, x: h.masked_fill(rows(x)[:, None, None], 0),
        [
            lambda m, h, x: assigned(h, rows(x), 0),
            lambda m, h, x: assigned(h, rows(x), 0.0),
            lambda m, h, x: assigned(h, rows(x), zero(h)),
            lambda m, h, x: assigned(h, rows(x), h.new_zeros(())),
            lambda m, h, x: h.index_put_((rows(x),), zero(h)),
            lambda m, h, x: torch.index_put_(h, (rows(x),), zero(h)),
        ],
    ),
    "entries = 0": (
        lambda m, h, x: h.masked_fill(entries(x), 0.0),
        [
            lambda m, h, x: assigned(h, entries(x), 0),
            lambda m, h, x: h.index_put_((entries(x),), torch.tensor(0.0, dtype=h.dtype)),
        ],
    ),
    "on a view": (
        lambda m, h, x: torch.cat([h[:, :2].masked_fill(entries(x)[:, :2], 0), h[:, 2:]], 1),
        [lambda m, h, x: (assigned(h[:, :2], entries(x)[:, :2], 0), h)[1]],
    ),
    "mask from a sign test": (
        lambda m, h, x: h.masked_fill(h.roll(1, 2) > 0, 0),
        [lambda m, h, x: assigned(h, h.roll(1, 2) > 0, 0)],
    ),
}  # fmt: skip
FILL_CASES = [
    pytest.param(f_form, spelling, id=f"{name} #{i}")
    for name, (f_form, spellings) in FILLS.items()
    for i, spelling in enumerate(spellings)
]


@pytest.mark.parametrize("f_form, spelling", FILL_CASES)
def test_zero_assigned_by_mask_traces_as_masked_fill(f_form, spelling):
    traces_as(f_form, spelling)


BLOCKED = {
    "rows = 0.5": lambda m, h, x: assigned(h, rows(x), 0.5),
    "rows = tensor 0.5": lambda m, h, x: assigned(h, rows(x), torch.tensor(0.5, dtype=h.dtype)),
    "index_put_ 0.5": lambda m, h, x: h.index_put_((rows(x),), torch.tensor(0.5, dtype=h.dtype)),
    "h[h > 1] = 0": lambda m, h, x: assigned(h, h > 1.0, 0),
}


@pytest.mark.parametrize("f", list(BLOCKED.values()), ids=list(BLOCKED))
def test_other_fills_and_masks_of_the_scale_still_block(f):
    """The gauge that ``h[rows] = 0`` allows moves these outputs; their own structure has
    fewer generators and keeps them."""
    still_blocks(lambda m, h, x: assigned(h, rows(x), 0), f)
