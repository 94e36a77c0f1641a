"""Adversarial audit of the rules for ``quantile``/``nanquantile`` and ``aminmax``: they unite
the entries compared and the outputs carry their factor.

Each model is discovered on one example, moved by random gauges (``scale=2``) and compared on
fresh inputs (other values and batch sizes, which move a level between other order statistics):
every generator found keeps the outputs, exactly in float64. The levels are Python floats,
floats computed from a size, tensors made in the forward (from constants or from ``arange``)
and rescaled activations (which must keep factor 1); the ops run along positive and negative
dims and over every entry, with ``keepdim``, on 0-d and 1-d tensors, on products ``h * g``,
with NaNs, spelt as methods, functions and with keywords, and their outputs feed residual sums
and broadcasting products. Parameters compared (or views of them) are fixed, ``out=`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from gaugefix.structure.rules import _aminmax, _quantile, funcs
from test_ranking_rules_audit import _NotUniting, largest_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE, TOL, SCALE = torch.float64, 1e-10, 2.0
IN, WIDTH = 4, 6
SLOPE = 0.1
SEEDS = (1, 2)
NAN = float("nan")
# a structure that leaves the compared entries apart changes the outputs by far more than this
MOVED = 1e-3
# the batch of the example (first) and of the fresh inputs
BATCHES = (9, 5, 13, 2)

Fn = Callable[[nn.Module, Tensor, Tensor], Tensor]


class Model(nn.Module):
    """``f(self, h, g)`` with ``h = leaky_relu(inp(x)) * p`` (a gain ``p``) and ``g =
    leaky_relu(gl(x))``: two activations of ``WIDTH`` channels with factors of their own (no
    ties, unlike ReLU's zeros, so a wrong factor reorders them); ``o``, ``v`` read them."""

    def __init__(self, f: Fn) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = f
        self.inp, self.gl = nn.Linear(IN, WIDTH), nn.Linear(IN, WIDTH)
        self.o, self.v = nn.Linear(WIDTH, 2), nn.Linear(WIDTH, 2)
        self.p = nn.Parameter(torch.rand(WIDTH) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.inp(x), SLOPE) * self.p
        g = F.leaky_relu(self.gl(x), SLOPE)
        return self.f(self, h, g)


def model(f: Fn) -> nn.Module:
    return Model(f).to(DTYPE)


def inputs(i: int) -> Tensor:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(BATCHES[i], IN, dtype=DTYPE, generator=gen)


def change(m: nn.Module, s: gaugefix.GaugeStructure) -> float:
    """The largest relative change of ``m``'s outputs (NaN where they are NaN) on the example
    and the fresh inputs under random gauges of ``s``."""
    return largest_change(m, s, [inputs(i) for i in range(len(BATCHES))])


def R(t: Tensor) -> Tensor:
    return torch.relu(t)


def lv(*q: float) -> Tensor:
    return torch.tensor(q, dtype=DTYPE)


def q_of_h0(m: nn.Module, h: Tensor, g: Tensor) -> Tensor:
    """A level read from ``h``: the share of channel 0 in the first row (its factor must be 1)."""
    a = h[0].abs()
    return m.o(h) + m.v(R(g * h.quantile(a[0] / a.sum(), 0)))


def q_of_h_tokens(m: nn.Module, h: Tensor, g: Tensor) -> Tensor:
    """A level per channel read from ``h`` (shares of the first row), compared over tokens."""
    a = h[0].abs()
    q = a / a.sum()
    return m.o(h) + m.v(R(g * h.quantile(q, 0).diagonal()))


def quantile_out(m: nn.Module, h: Tensor, g: Tensor) -> Tensor:
    buf = torch.empty(len(h), dtype=DTYPE)
    with torch.no_grad():  # out= refuses tensors that require grad
        torch.quantile(h, 0.3, 1, out=buf)
    return m.o(h) + m.v(R(g * buf[:, None]))


def aminmax_out(m: nn.Module, h: Tensor, g: Tensor) -> Tensor:
    lo, hi = torch.empty(len(h), dtype=DTYPE), torch.empty(len(h), dtype=DTYPE)
    with torch.no_grad():
        torch.aminmax(h, dim=1, out=(lo, hi))
    return m.o(h) + m.v(R(g * hi[:, None]))


def aminmax_min_max(m: nn.Module, h: Tensor, g: Tensor) -> Tensor:
    lo, hi = torch.aminmax(h, dim=1, keepdim=True)
    return m.o(R(h - lo)) + m.v(R(g * hi))


def nan_rows(h: Tensor) -> Tensor:
    """``h`` with its negative entries NaN."""
    return torch.where(h > 0, h, NAN)


# name: forward
CASES: dict[str, Fn] = {
    # levels: Python floats, from sizes, tensors made in the forward
    "g * h.quantile(0.3, 1)": lambda m, h, g: m.o(h) + m.v(R(g * h.quantile(0.3, 1)[:, None])),
    "g * h.quantile(0.3, 0)": lambda m, h, g: m.o(h) + m.v(R(g * h.quantile(0.3, 0))),
    "h - h.quantile(0.5, 0, keepdim)": lambda m, h, g: m.o(R(h - h.quantile(0.5, 0, True))),
    "h - h.quantile(0.5, 1, keepdim)": lambda m, h, g: m.o(R(h - h.quantile(0.5, 1, True))),
    "h - h.quantile(0.5, -1, keepdim)": lambda m, h, g: m.o(R(h - h.quantile(0.5, -1, True))),
    "h - h.quantile(0.7, -2)": lambda m, h, g: m.o(R(h - h.quantile(0.7, -2))),
    "q = (B - 1) / B, dim 0": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile((len(h) - 1) / len(h), 0)))
    ),
    "q = 1 / B over every entry": lambda m, h, g: m.o(h) + m.v(R(g * h.quantile(1 / len(h)))),
    "q = arange(B) / B, dim 1": lambda m, h, g: (
        m.o(h)
        + m.v(R(g * h.quantile(torch.arange(len(h), dtype=DTYPE) / len(h), 1).diagonal()[:, None]))
    ),
    "q = arange(W) / W, dim 0, keepdim": lambda m, h, g: (
        m.o(h)
        + m.v(R(g * h.quantile(torch.arange(WIDTH, dtype=DTYPE) / WIDTH, 0, True)[:, 0].diagonal()))
    ),
    "q = tensor of 3 levels, dim None": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(lv(0.1, 0.5, 0.9)).sum()))
    ),
    "q = tensor of 3 levels, dim None, keepdim": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.quantile(h, lv(0.1, 0.5, 0.9), keepdim=True).sum(0)))
    ),
    "q = tensor of 2 levels, dim 0": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(lv(0.25, 0.75), 0).prod(0).sqrt()))
    ),
    "q = 0-d tensor, dim 1": lambda m, h, g: m.o(R(h - h.quantile(lv(0.4)[0], 1)[:, None])),
    "q = linspace levels, dim -1, keepdim": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(torch.linspace(0, 1, 5, dtype=DTYPE), -1, True).mean(0)))
    ),
    # levels read from activations: held at factor 1
    "q from h (one level, dim 0)": q_of_h0,
    "q from h (per channel, dim 0)": q_of_h_tokens,
    "q from h * g ratio": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile((g[0, 0] / g[0].abs().sum()).abs(), 0)))
    ),
    # levels that carry a factor, blocked (small enough to stay levels under a gauge)
    "q = |h[0, 0]| / 100, dim 1": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(h[0, 0].abs() / 100, 1, True)))
    ),
    "q = |g[0]| / 100 per channel, dim 1": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(g[0].abs() / 100, 1, True)[..., 0].T))
    ),
    "q = p[:2] / 10, every entry": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.quantile(h, m.p[:2] / 10).sum()))
    ),
    # every interpolation, keywords, functions
    "interpolation lower": lambda m, h, g: m.o(
        R(h - torch.quantile(h, 0.35, dim=1, keepdim=True, interpolation="lower"))
    ),
    "interpolation higher, dim 0": lambda m, h, g: m.o(
        R(h - h.quantile(0.35, dim=0, interpolation="higher"))
    ),
    "interpolation midpoint": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(0.35, 1, True, interpolation="midpoint")))
    ),
    "interpolation nearest, q = 0.5": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.quantile(0.5, 0, interpolation="nearest")))
    ),
    "torch.quantile(input=, q=, dim=)": lambda m, h, g: m.o(
        R(h - torch.quantile(input=h, q=0.6, dim=1, keepdim=True))
    ),
    # products, 0-d and 1-d inputs
    "(h * g).quantile(0.3, 1)": lambda m, h, g: m.o(h) + m.v(R(g * (h * g).quantile(0.3, 1, True))),
    "(h * g).quantile(0.3, 0)": lambda m, h, g: m.o(R(h * g - (h * g).quantile(0.3, 0))),
    "cat([h, g], 1).quantile(0.4, 1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.cat([h, g], 1).quantile(0.4, 1, True)))
    ),
    "stack([h, 2 * h]).quantile(0.3, 0)": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.stack([h, 2 * h]).quantile(0.3, 0)))
    ),
    "(h * h).quantile(0.3, 1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * (h * h).quantile(0.3, 1, True).sqrt()))
    ),
    "(h + inp.bias).quantile(0.3, 1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * (h + m.inp.bias).quantile(0.3, 1, True)))
    ),
    "relu(h).quantile(0.6, 1), ties at 0": lambda m, h, g: (
        m.o(h) + m.v(R(g * R(h).quantile(0.6, 1, True)))
    ),
    "quantile of a 0-d tensor": lambda m, h, g: m.o(h) + m.v(R(g * h.sum().quantile(0.3))),
    "quantile of a 0-d tensor, dim 0": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.sum().quantile(0.3, 0, True)))
    ),
    "quantile of a 1-d row": lambda m, h, g: m.o(h) + m.v(R(g * h[0].quantile(0.3))),
    "quantile of a 1-d column, dim -1": lambda m, h, g: m.o(R(h - h[:, 2].quantile(0.3, -1))),
    "quantile of a 1-d tensor, levels": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.sum(0).quantile(lv(0.2, 0.8)).sum()))
    ),
    "h / quantile of every |entry|": lambda m, h, g: m.o(h / h.abs().quantile(0.9)),
    # NaNs
    "nanquantile with NaNs, dim 1": lambda m, h, g: (
        m.o(h) + m.v(R(g * nan_rows(h).nanquantile(0.5, 1, True).nan_to_num(0.0)))
    ),
    "nanquantile with NaNs, dim 0": lambda m, h, g: (
        m.o(h) + m.v(R(g * nan_rows(h).nanquantile(0.25, 0).nan_to_num(0.0)))
    ),
    "nanquantile with NaNs, every entry, levels": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.nanquantile(nan_rows(h), lv(0.2, 0.6)).sum()))
    ),
    "nanquantile, rows all NaN": lambda m, h, g: (
        m.o(h) + m.v(R(g * nan_rows(h).nanquantile(0.5, 1, True).nan_to_num(1.0)))
    ),
    "Tensor.nanquantile(h, q=, dim=)": lambda m, h, g: m.o(
        R(h - torch.Tensor.nanquantile(h, q=0.2, dim=1, keepdim=True))
    ),
    "quantile with NaNs (NaN out)": lambda m, h, g: (
        m.o(h) + m.v(R(g * nan_rows(h).quantile(0.5, 1, True).nan_to_num(0.0)))
    ),
    # aminmax
    "aminmax(h, dim=1, keepdim) unpacked": aminmax_min_max,
    "aminmax(h, dim=0).min/.max": lambda m, h, g: (
        m.o(R(h - h.aminmax(dim=0).min)) + m.v(R(g * h.aminmax(dim=0).max))
    ),
    "aminmax(h, dim=-1)[1]": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.aminmax(h, dim=-1)[1][:, None]))
    ),
    "aminmax(h) of every entry": lambda m, h, g: (
        m.o(h) + m.v(R(g * (h.aminmax().max - h.aminmax().min)))
    ),
    "aminmax(h, keepdim) of every entry": lambda m, h, g: m.o(
        R(h - torch.aminmax(h, keepdim=True).min)
    ),
    "aminmax((h * g), dim=1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * (h * g).aminmax(dim=1, keepdim=True).max))
    ),
    "aminmax(h, dim=None, keepdim=False)": lambda m, h, g: (
        m.o(h) + m.v(R(g * torch.aminmax(h, dim=None, keepdim=False).max))
    ),
    "relu(h).aminmax(dim=1), ties at 0": lambda m, h, g: (
        m.o(h) + m.v(R(g * R(h).aminmax(dim=1, keepdim=True).min + g))
    ),
    "(h / h.norm(dim=1)).aminmax(dim=1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * (h / h.norm(dim=1, keepdim=True)).aminmax(dim=1).max[:, None]))
    ),
    "aminmax of a 0-d tensor": lambda m, h, g: m.o(h) + m.v(R(g * h.sum().aminmax().max)),
    "aminmax of a 1-d row, dim 0": lambda m, h, g: m.o(h) + m.v(R(g * h[1].aminmax(dim=0).min)),
    "aminmax(h.T, dim=0)": lambda m, h, g: m.o(R(h - h.T.aminmax(dim=0).max[:, None])),
    # blocks and fixes
    "quantile(out=)": quantile_out,
    "aminmax(out=)": aminmax_out,
    "p.quantile(0.5)": lambda m, h, g: m.o(h) + m.v(R(g * m.p.quantile(0.5))),
    "p[:3].aminmax()": lambda m, h, g: m.o(h) + m.v(R(g * m.p[:3].aminmax().max)),
    "(p * 1).quantile(lv, keepdim)": lambda m, h, g: (
        m.o(h) + m.v(R(g * (m.p * 1).quantile(lv(0.3, 0.6), 0, True).sum()))
    ),
    "inp.weight.aminmax(dim=1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * m.inp.weight.aminmax(dim=1).max[:, None].T))
    ),
    "h[:, None].expand(B, 3, W).quantile(0.4, 2)": lambda m, h, g: (
        m.o(h) + m.v(R(g * h[:, None].expand(-1, 3, -1).quantile(0.4, 2).mean(1, True)))
    ),
    "h.detach().aminmax(dim=1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.detach().aminmax(dim=1, keepdim=True).min))
    ),
    "aminmax of argmax ids": lambda m, h, g: (
        m.o(h) + m.v(R(g * h.argmax(1).aminmax().max.to(DTYPE)))
    ),
    "p.data.quantile(0.5)": lambda m, h, g: m.o(h) + m.v(R(g * m.p.data.quantile(0.5))),
    "p.detach().aminmax()": lambda m, h, g: m.o(h) + m.v(R(g * m.p.detach().aminmax().max)),
    "p.expand(B, W).quantile(0.5, 1)": lambda m, h, g: (
        m.o(h) + m.v(R(g * m.p.expand(len(h), WIDTH).quantile(0.5, 1, True)))
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_random_gauge_keeps_the_outputs_on_fresh_inputs(case):
    m = model(CASES[case])
    s = gaugefix.discover(m, inputs(0))
    assert s.num_generators > 0, s.summary()
    assert change(m, s) <= TOL, s.summary()


def _quantile_not_uniting(ctx: Any, result: Any, *args: Any, **options: Any) -> Any:
    return _quantile(_NotUniting(ctx), result, *args, **options)


def _aminmax_not_uniting(ctx: Any, result: Any, *args: Any, **options: Any) -> Any:
    return _aminmax(_NotUniting(ctx), result, *args, **options)


NOT_UNITING = [(op, _quantile_not_uniting) for op in funcs("quantile", "nanquantile")] + [
    (op, _aminmax_not_uniting) for op in funcs("aminmax")
]
# models whose ops compare entries that carry other factors
SHARP = [
    "g * h.quantile(0.3, 1)",
    "q = arange(B) / B, dim 1",
    "q = tensor of 3 levels, dim None",
    "(h * g).quantile(0.3, 1)",
    "cat([h, g], 1).quantile(0.4, 1)",
    "quantile of a 1-d tensor, levels",
    "aminmax(h, dim=-1)[1]",
    "aminmax(h) of every entry",
    "aminmax((h * g), dim=1)",
    "aminmax of a 1-d row, dim 0",
]


@pytest.mark.parametrize("case", SHARP)
def test_a_weaker_rule_is_caught(case):
    """The rules with their unions taken out: these outputs move."""
    m = model(CASES[case])
    s = gaugefix.discover(m, inputs(0), rules=NOT_UNITING)
    assert change(m, s) > MOVED


@pytest.mark.parametrize("f", [quantile_out, aminmax_out])
def test_out_blocks_what_is_compared(f):
    """The channels ``p`` produces (``h``'s) are excluded; ``p`` divides out ``inp``'s."""
    s = gaugefix.discover(model(f), inputs(0))
    assert bool((s.produced["p"] == -1).all()) and "inp.weight" in s.params, s.summary()


# a parameter compared, a view or a copy of one, or levels made from one: the one it fixes
PARAMETERS = {
    "p.quantile(0.5)": "p",
    "p[:3].aminmax()": "p",
    "(p * 1).quantile(lv, keepdim)": "p",
    "p.expand(B, W).quantile(0.5, 1)": "p",
    "inp.weight.aminmax(dim=1)": "inp.weight",
    "q = p[:2] / 10, every entry": "p",
    "p.data.quantile(0.5)": "p",
    "p.detach().aminmax()": "p",
}


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize("level", ["item", "float"])
def test_a_level_read_as_a_number_from_an_activation_is_refused(level):
    """A level that is a Python number read from an activation would move under a gauge that
    discovery cannot see: the trace stops with a clear error."""
    read = {"item": lambda t: t.item(), "float": float}[level]
    m = model(lambda m, h, g: m.o(h) + m.v(R(g * h.quantile(read(h[0, 0].abs() / 100), 1, True))))
    with pytest.raises(gaugefix.ValueDependentError, match="read a tensor value"):
        gaugefix.discover(m, inputs(0))


@pytest.mark.parametrize("case", list(PARAMETERS))
def test_a_parameter_compared_is_fixed(case):
    s = gaugefix.discover(model(CASES[case]), inputs(0))
    assert PARAMETERS[case] not in s.params, s.summary()
