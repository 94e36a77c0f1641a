"""``torch.inner`` and ``torch.tensordot`` are einsums: ``inner(a, b)`` contracts the last dim
of each (output ``a.shape[:-1] + b.shape[:-1]``), ``tensordot(a, b, dims=k)`` ``a``'s last
``k`` dims with ``b``'s first ``k``, ``dims=([i, ...], [j, ...])`` the dims paired (output:
``a``'s free dims, then ``b``'s). Oracle: the same model spelled with ``torch.einsum``.
``discover`` finds the same structure (generator count and kinds), a random gauge keeps the
outputs (float64, 1e-10), and ``equalize_(..., "activation")``'s calibration pass gives the
same maxima bit for bit. ``out=`` and a parameter contracted with itself block."""

from __future__ import annotations

import copy
import string
import warnings

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix.calibration import _calibrated
from gaugefix.structure.affine import dot_equation

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
D, OUT, T = 5, 4, 3  # the activations' channels, the weight's outputs, the tokens of 3-D inputs
LETTERS = string.ascii_letters
BATCHES = (3, 2, 6)  # the example's batch, then fresh inputs'


def _scores(y: Tensor) -> Tensor:
    """``[..., B', ...]`` products of two activations summed to one channel per row."""
    return y.flatten(1).sum(-1, keepdim=True)


# name: (spelled, einsum spelling, weight shape, head width, tokens: 3-D activations)
CASES = {
    "inner(h, W): a linear map": (
        lambda m, h, g: torch.inner(h, m.w),
        lambda m, h, g: torch.einsum("bd,od->bo", h, m.w),
        (OUT, D),
        OUT,
        False,
    ),
    "h.inner(W)": (
        lambda m, h, g: h.inner(m.w),
        lambda m, h, g: torch.einsum("bd,od->bo", h, m.w),
        (OUT, D),
        OUT,
        False,
    ),
    "inner(W, h).T": (
        lambda m, h, g: torch.inner(m.w, h).T,
        lambda m, h, g: torch.einsum("od,bd->ob", m.w, h).T,
        (OUT, D),
        OUT,
        False,
    ),
    "inner of two activations": (
        lambda m, h, g: _scores(torch.inner(h, g)) * m.w,
        lambda m, h, g: _scores(torch.einsum("bd,cd->bc", h, g)) * m.w,
        (1,),
        1,
        False,
    ),
    "tensordot(h, W, dims=([1], [1]))": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=([1], [1])),
        lambda m, h, g: torch.einsum("bd,od->bo", h, m.w),
        (OUT, D),
        OUT,
        False,
    ),
    "tensordot(h, W, dims=((1,), (1,)))": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=((1,), (1,))),
        lambda m, h, g: torch.einsum("bd,od->bo", h, m.w),
        (OUT, D),
        OUT,
        False,
    ),
    "tensordot(h, V, dims=1)": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=1),
        lambda m, h, g: torch.einsum("bd,do->bo", h, m.w),
        (D, OUT),
        OUT,
        False,
    ),
    "tensordot(h, W, dims=([-1], [-1]))": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=([-1], [-1])),
        lambda m, h, g: torch.einsum("bd,od->bo", h, m.w),
        (OUT, D),
        OUT,
        False,
    ),
    "tensordot(W, h, dims=([-1], [-1])).T": (
        lambda m, h, g: torch.tensordot(m.w, h, dims=([-1], [-1])).T,
        lambda m, h, g: torch.einsum("od,bd->ob", m.w, h).T,
        (OUT, D),
        OUT,
        False,
    ),
    "inner(h, W), 3-D": (
        lambda m, h, g: torch.inner(h, m.w),
        lambda m, h, g: torch.einsum("btd,od->bto", h, m.w),
        (OUT, D),
        OUT,
        True,
    ),
    "tensordot(h, W, dims=([2], [1])), 3-D": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=([2], [1])),
        lambda m, h, g: torch.einsum("btd,od->bto", h, m.w),
        (OUT, D),
        OUT,
        True,
    ),
    "tensordot(h, W, dims=([-1], [-1])), 3-D": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=([-1], [-1])),
        lambda m, h, g: torch.einsum("btd,od->bto", h, m.w),
        (OUT, D),
        OUT,
        True,
    ),
    "tensordot(h, V, dims=1), 3-D": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=1),
        lambda m, h, g: torch.einsum("btd,do->bto", h, m.w),
        (D, OUT),
        OUT,
        True,
    ),
    "tensordot(h, V, dims=2), 3-D: tokens and channels at once": (
        lambda m, h, g: torch.tensordot(h, m.w, dims=2)[:, None],
        lambda m, h, g: torch.einsum("btd,tdo->bo", h, m.w)[:, None],
        (T, D, OUT),
        OUT,
        True,
    ),
    "inner of two activations, 3-D": (
        lambda m, h, g: _scores(torch.inner(h, g)) * m.w,
        lambda m, h, g: _scores(torch.einsum("btd,csd->btcs", h, g)) * m.w,
        (1,),
        1,
        True,
    ),
    "tensordot of two activations, dims=([-1, 1], [2, -2]), 3-D": (
        lambda m, h, g: _scores(torch.tensordot(h, g, dims=([-1, 1], [2, -2]))) * m.w,
        lambda m, h, g: _scores(torch.einsum("btd,ctd->bc", h, g)) * m.w,
        (1,),
        1,
        True,
    ),
}


class Dotted(nn.Module):
    """Two producers ``pre``, ``pre2`` of ``D`` channels (``h``, ``g``), the op under test
    with a parameter ``w``, a ReLU and a head."""

    def __init__(self, op, shape: tuple, width: int) -> None:
        super().__init__()
        self.pre, self.pre2 = nn.Linear(2, D), nn.Linear(2, D)
        self.w, self.op, self.head = nn.Parameter(torch.randn(shape)), op, nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, g = torch.relu(self.pre(x)), torch.relu(self.pre2(x))
        return self.head(torch.relu(self.op(self, h, g)))


def _model(op, shape: tuple, width: int) -> nn.Module:
    torch.manual_seed(0)
    model = Dotted(op, shape, width).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn_like(p) + 0.3)
    return model


def _inputs(tokens: bool) -> list[Tensor]:
    torch.manual_seed(1)
    return [torch.randn(b, *((T,) if tokens else ()), 2, dtype=DTYPE) for b in BATCHES]


def gauged(model: nn.Module, inputs: list[Tensor]) -> tuple[gaugefix.GaugeStructure, float]:
    """The structure discovered on ``inputs[0]`` and the largest relative change of an output
    (on every input) under a random gauge of scale 2."""
    s = gaugefix.discover(copy.deepcopy(model), inputs[0])
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, s, 2.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return s, max(rel_change(model(x), moved(x)) for x in inputs)


def calibrated(model: nn.Module, x: Tensor) -> tuple[dict, tuple[str, ...], list[str]]:
    """The calibration pass's maxima, listed weights and warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maxima, listed = _calibrated(model, dict(model.named_parameters()), (x,))
    return maxima, listed, [str(w.message) for w in caught]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_discover_finds_the_einsum_structure_and_the_gauge_is_exact(case):
    spelled, einsum, shape, width, tokens = case
    inputs = _inputs(tokens)
    s, change = gauged(_model(spelled, shape, width), inputs)
    ref, ref_change = gauged(_model(einsum, shape, width), inputs)
    assert ref.num_generators > 0, ref.summary()
    assert s.num_generators == ref.num_generators, s.summary()
    assert s.kind_counts() == ref.kind_counts()
    assert change <= TOL and ref_change <= TOL


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_calibration_maxima_equal_the_einsum_spelling(case):
    spelled, einsum, shape, width, tokens = case
    x = _inputs(tokens)[0]
    maxima, listed, caught = calibrated(_model(spelled, shape, width), x)
    ref, ref_listed, ref_caught = calibrated(_model(einsum, shape, width), x)
    assert maxima.keys() == ref.keys() and listed == ref_listed and caught == ref_caught
    assert any(k[0] == "w" for k in ref) or "w" in ref_listed or shape == (1,)  # w is read
    for key, value in ref.items():  # the head reads the op's output: summed in another order
        if key[0] == "head.weight":
            assert rel_change(value, maxima[key]) <= TOL
        else:
            assert (value is None and maxima[key] is None) or torch.equal(maxima[key], value), key


def test_calibration_of_inner_equals_f_linear():
    x = _inputs(False)[0]
    spelled = calibrated(_model(lambda m, h, g: torch.inner(h, m.w), (OUT, D), OUT), x)
    linear = calibrated(
        _model(lambda m, h, g: torch.nn.functional.linear(h, m.w), (OUT, D), OUT), x
    )
    assert spelled[0].keys() == linear[0].keys() and ("w", 1) in linear[0]
    assert all(torch.equal(spelled[0][k], v) for k, v in linear[0].items() if k[0] != "head.weight")
    assert spelled[1:] == linear[1:] == ((), [])


@pytest.mark.parametrize(
    "read",
    [
        lambda m, h, g: torch.inner(h, m.w, out=torch.empty(h.shape[0], OUT, dtype=DTYPE)),
        lambda m, h, g: torch.tensordot(
            h, m.w, ([1], [1]), torch.empty(h.shape[0], OUT, dtype=DTYPE)
        ),
    ],
    ids=["inner(h, W, out=)", "tensordot(h, W, dims, out)"],
)
def test_calibration_reads_through_out(read):
    """``out=`` writes the same product: the weight's read is the same."""
    x = _inputs(False)[0]
    spelled = calibrated(_model(read, (OUT, D), OUT), x)
    linear = calibrated(
        _model(lambda m, h, g: torch.nn.functional.linear(h, m.w), (OUT, D), OUT), x
    )
    assert torch.equal(spelled[0]["w", 1], linear[0]["w", 1]) and spelled[1:] == ((), [])


# name: (op, the parameters it blocks: h's producer where h only meets the op)
BLOCKED = {
    "tensordot(h, W, out=)": (
        lambda m, h, g: torch.tensordot(
            h, m.w, dims=([1], [1]), out=torch.empty(h.shape[0], OUT, dtype=DTYPE)
        ),
        ("w", "pre.weight", "pre.bias"),
    ),
    "inner(h, W, out=)": (
        lambda m, h, g: torch.inner(h, m.w, out=torch.empty(h.shape[0], OUT, dtype=DTYPE)),
        ("w", "pre.weight", "pre.bias"),
    ),
    "inner(W, W): a parameter with itself": (
        lambda m, h, g: h[:, :OUT] @ torch.inner(m.w, m.w),
        ("w",),
    ),
    "tensordot(W, W, dims=([1], [1])): a parameter with itself": (
        lambda m, h, g: h[:, :OUT] @ torch.tensordot(m.w, m.w, dims=([1], [1])),
        ("w",),
    ),
}


@pytest.mark.parametrize("case", list(BLOCKED.values()), ids=list(BLOCKED))
def test_out_and_a_parameter_with_itself_block_and_stay_exact(case):
    op, blocked = case
    inputs = _inputs(False)
    s, change = gauged(_model(op, (OUT, D), OUT), inputs)
    assert change <= TOL, s.summary()
    assert not set(blocked) & set(s.params), s.summary()  # no generator touches them


@pytest.mark.parametrize(
    "a_dims, b_dims, dims, equation",
    [
        (2, 2, ([-1], [-1]), "ab,cb->ac"),
        (3, 2, 1, "abc,cd->abd"),
        (3, 3, 2, "abc,bcd->ad"),
        (3, 2, ([1, 2], [1, 0]), "abc,cb->a"),
        (1, 1, 0, "a,b->ab"),
        (2, 2, torch.tensor(1), None),  # dims as a tensor
        (2, 2, 3, None),
        (2, 2, -1, None),
        (2, 2, True, None),
        (2, 2, (1, 1), None),
        (2, 2, ([0], [0, 1]), None),
        (2, 2, ([0, -2], [0, 1]), None),  # one dim twice
        (2, 2, ([2], [0]), None),
        (0, 2, 0, None),  # a scalar operand
        (27, 26, ([0], [0]), f"{LETTERS[:27]},a{LETTERS[27:]}->{LETTERS[1:]}"),  # 52 letters
        (27, 27, ([0], [0]), None),  # 53 letters
    ],
)
def test_dot_equation(a_dims, b_dims, dims, equation):
    got = dot_equation(a_dims, b_dims, dims)
    assert got == equation
    if got is not None:
        torch.manual_seed(3)
        size = 2 if a_dims + b_dims < 8 else 1
        a, b = torch.randn([size] * a_dims, dtype=DTYPE), torch.randn([size] * b_dims, dtype=DTYPE)
        assert rel_change(torch.tensordot(a, b, dims=dims), torch.einsum(got, a, b)) <= TOL
