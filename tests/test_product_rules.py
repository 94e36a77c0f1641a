"""Discovery follows the matrix products that models spell otherwise than ``F.linear``
(``torch.linalg.matmul``, ``torch.addmv`` with its arguments named, ``x @ w`` and ``w @ x``,
``baddbmm`` of stacked expert weights added to zeros): the same generators, acting on the same
parameter entries, as the model written with ``nn.Linear`` (the oracle); random gauges keep
the outputs on fresh inputs; ``equalize_(..., "activation")`` with the structure found on the
spelling itself ends at the oracle's point."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
import test_equalize_products as products
from architectures import randomise_, rel_change
from test_equalize import output
from test_equalize_products import FUSED, OUT, READS, TOKENS, D, _batch, _rows, block, moe

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10

# More spellings of ``F.linear(h, w)`` (``w`` ``[OUT, D]``) than the calibration tests read.
SPELLINGS = {
    **READS,
    "weight_left": lambda h, w: (w @ h.mT).mT,
    "matmul_transposed": lambda h, w: h @ w.T,
    "addmv_named": lambda h, w: _rows(h, lambda v: torch.addmv(v.new_zeros(OUT), mat=w, vec=v)),
    "addmv_positional": lambda h, w: _rows(h, lambda v: torch.addmv(v.new_zeros(OUT), w, v)),
    "tensor_addmv": lambda h, w: _rows(h, lambda v: v.new_zeros(OUT).addmv(w, v)),
    "linalg_matmul_weight_left": lambda h, w: torch.linalg.matmul(w, h.mT).mT,
}

Entry = tuple[str, tuple[int, ...], int]


def actions(
    s: gaugefix.GaugeStructure, rename: Callable[[str, tuple], tuple] = lambda n, i: (n, i)
) -> list[frozenset[Entry]]:
    """Each generator as the set of parameter entries it multiplies (+1) and divides (-1),
    entries named by ``rename(name, index)``; sorted, so that generators numbered otherwise
    compare equal."""
    found = []
    for n in range(s.num_generators):
        g = s.generator(n)
        entries: set[Entry] = set()
        for sign, side in ((1, g.incoming), (-1, g.outgoing)):
            for name, idx in side:
                shape = s.params[name].shape
                ranges = [range(shape[d]) if i is None else (i,) for d, i in enumerate(idx)]
                entries.update((*rename(name, full), sign) for full in itertools.product(*ranges))
        found.append(frozenset(entries))
    return sorted(found, key=sorted)


def gauge_keeps_outputs(model: nn.Module, s: gaugefix.GaugeStructure, fresh: Tensor) -> float:
    before = output(model, (fresh,))
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(7))
    return rel_change(before, output(model, (fresh,)))


def equalize(model: nn.Module, x: Tensor) -> nn.Module:
    """``model`` at its ``"activation"`` point, with the structure discovered on itself."""
    before = output(model, (x,))
    result = gaugefix.equalize_(model, gaugefix.discover(model, x), "activation", calibration=x)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    return model


class Block(products.Block):
    """:class:`test_equalize_products.Block` reading with ``SPELLINGS``."""

    reads = SPELLINGS


def spelled(how: str) -> nn.Module:
    reference = block("linear")
    model = Block(how).to(DTYPE).eval()
    model.load_state_dict(reference.state_dict())
    return model


@pytest.mark.parametrize("how", [h for h in SPELLINGS if h != "linear"])
def test_a_product_spelled_otherwise_has_the_generators_of_f_linear(how):
    x, fresh = _batch(5, 3, D), _batch(4, 2, D, seed=9)
    reference, model = block("linear"), spelled(how)
    assert rel_change(output(reference, (fresh,)), output(model, (fresh,))) <= TOL
    expected, got = gaugefix.discover(reference, x), gaugefix.discover(model, x)
    assert expected.num_generators == 10  # 6 norm gains, 4 neurons
    assert got.num_generators == expected.num_generators
    assert got.kind_counts() == expected.kind_counts()
    assert actions(got) == actions(expected)
    assert gauge_keeps_outputs(spelled(how), got, fresh) <= TOL
    state = equalize(reference, x).state_dict()
    for name, value in equalize(model, x).state_dict().items():
        assert rel_change(state[name], value) <= TOL, name


class Vector(nn.Module):
    """A norm, a 1-d weight ``w`` ``[D]`` reading it (one output entry), a ReLU and a head."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        y = F.linear(h, self.w) if self.how == "linear" else VECTOR_READS[self.how](h, self.w)
        return self.head(torch.relu(y)[..., None])


VECTOR_READS = {
    "matmul": lambda h, w: h @ w,
    "linalg_matmul": lambda h, w: torch.linalg.matmul(h, w),
    "mv": lambda h, w: torch.mv(h.reshape(-1, D), w).reshape(h.shape[:-1]),
    "einsum": lambda h, w: torch.einsum("btd,d->bt", h, w),
}


@pytest.mark.parametrize("how", VECTOR_READS)
def test_a_1d_weight_read_by_a_product_has_the_generators_of_f_linear(how):
    x, fresh = _batch(5, 3, D), _batch(4, 2, D, seed=9)
    torch.manual_seed(0)
    reference = randomise_(Vector("linear").to(DTYPE), seed=1).eval()
    model = Vector(how).to(DTYPE).eval()
    model.load_state_dict(reference.state_dict())
    expected, got = gaugefix.discover(reference, x), gaugefix.discover(model, x)
    assert expected.num_generators == 7  # 6 norm gains, 1 neuron
    assert actions(got) == actions(expected)
    assert gauge_keeps_outputs(model, got, fresh) <= TOL


def unfused_name(name: str, index: tuple) -> tuple:
    """A fused expert weight's entry ``W[e, i, j]`` named as ``experts.e``'s ``nn.Linear``
    weight entry ``[i, j]``."""
    if name in ("gate_up", "down"):
        return f"experts.{index[0]}.{name}.weight", index[1:]
    return name, index


@pytest.mark.parametrize("how", FUSED)
def test_fused_experts_have_the_generators_of_unfused_ones(how):
    """Every spelling of stacked expert weights (a loop over slices, ``bmm``, ``baddbmm``
    added to zeros, batched ``matmul``, einsum): one gated-unit generator per expert and
    hidden channel, as the unfused model has, acting on the same entries."""
    x, fresh = _batch(TOKENS, D), _batch(TOKENS, D, seed=9)
    fused, unfused = moe(how)
    expected, got = gaugefix.discover(unfused, x), gaugefix.discover(fused, x)
    assert expected.kind_counts() == {"gated unit": 30, "norm gain": 6}
    assert got.kind_counts() == expected.kind_counts()
    assert actions(got, unfused_name) == actions(expected)
    assert gauge_keeps_outputs(moe(how)[0], got, fresh) <= TOL
    equalize(fused, x)
    equalize(unfused, x)
    for e, expert in enumerate(unfused.experts):
        assert rel_change(expert.gate_up.weight.detach(), fused.gate_up[e].detach()) <= TOL
        assert rel_change(expert.down.weight.detach(), fused.down[e].detach()) <= TOL
    assert rel_change(unfused.norm.weight.detach(), fused.norm.weight.detach()) <= TOL


class StackedBias(nn.Module):
    """Experts ``baddbmm(b [E, 1, H], x [E, N, D], W [E, D, H])`` with a stacked bias."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(3, D, OUT))
        self.b = nn.Parameter(torch.randn(3, 1, OUT))
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)  # [E, N, D]
        if self.how == "baddbmm":
            y = torch.baddbmm(self.b, h, self.w)
        else:
            y = torch.bmm(h, self.w) + self.b
        return self.head(torch.relu(y))


def test_baddbmm_with_a_stacked_bias_is_bmm_plus_the_bias():
    """A stacked bias carries the factors of its expert's output channels, as in ``bmm(x, W)
    + b``: one neuron generator per channel (the head reads every expert's output alike)."""
    x, fresh = _batch(3, 5, D), _batch(3, 4, D, seed=9)
    torch.manual_seed(0)
    reference = randomise_(StackedBias("bmm").to(DTYPE), seed=1).eval()
    model = StackedBias("baddbmm").to(DTYPE).eval()
    model.load_state_dict(reference.state_dict())
    expected, got = gaugefix.discover(reference, x), gaugefix.discover(model, x)
    assert expected.kind_counts() == {"norm gain": 6, "neuron": OUT}
    assert actions(got) == actions(expected)
    assert gauge_keeps_outputs(model, got, fresh) <= TOL


class NotZero(nn.Module):
    """``baddbmm`` or ``addmv`` added to a constant that is not 0: its factor is fixed, so no
    generator passes the product's output."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(3, OUT, D))
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)  # [3, N, D]
        if self.op == "baddbmm":
            y = torch.baddbmm(h.new_ones(1), h, self.w.mT)
        else:
            y = torch.stack([torch.addmv(v.new_ones(OUT), self.w[0], vec=v) for v in h[0]])
        return self.head(torch.relu(y))


@pytest.mark.parametrize("op", ["baddbmm", "addmv"])
def test_a_product_added_to_a_constant_keeps_its_output_fixed(op):
    """Never more than exact: the output channels are not gauged (the norm's gains are)."""
    x, fresh = _batch(3, 5, D), _batch(3, 4, D, seed=9)
    torch.manual_seed(0)
    model = randomise_(NotZero(op).to(DTYPE), seed=1).eval()
    s = gaugefix.discover(model, x)
    assert s.kind_counts() == {"norm gain": 6}
    assert gauge_keeps_outputs(model, s, fresh) <= TOL
