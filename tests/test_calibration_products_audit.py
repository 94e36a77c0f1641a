"""Adversarial spellings of linear reads for ``equalize_(..., "activation")``'s calibration pass,
each compared with the same function written with ``F.linear`` or ``@`` (float64; the maxima
equal bit for bit, the same keys, nothing listed), or, where the pass cannot know the read's
input, listed with a warning and given no maxima:

- a vector view of a matrix (a row ``W[0]``, a column ``W[:, 0]``) read by ``F.linear``, ``@``,
  ``mv``, ``dot``, ``einsum`` is read as its ``[1, C]`` view (``W[:1]``), as the product path
  reads it;
- an elementwise product of an activation and a weight summed (or averaged) first over dims
  along which the weight does not vary (tokens), then over its input dim, is the read of the
  summed (averaged) activation; a product averaged over the input dim is the read a sum is;
- an activation written in place after its product with the weight, a product written in
  place before its sum, a product written into the activation or into ``out=``, and a product
  of a weight batched by ``vmap``: the input the sum reads is not known, listed;
- a constant buffer written from an activation (``copy_``) is an activation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaugefix.calibration import _calibrated
from test_calibration_spelled import assert_equalized_alike
from test_equalize_products import D, _batch

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, TOKENS = 4, 7


class Read(nn.Module):
    """A LayerNorm, weights ``w``, ``v`` (``[OUT, D]``), a vector ``u`` (``[D]``), a buffer
    ``buf`` (``[TOKENS, D]``) and ``read(model, h)`` of the normalized input, each of its
    entries fed through a ReLU to a head."""

    def __init__(self, read: object) -> None:
        super().__init__()
        self.read, self.norm = read, nn.LayerNorm(D)
        self.w, self.v = nn.Parameter(torch.randn(OUT, D)), nn.Parameter(torch.randn(OUT, D))
        self.u = nn.Parameter(torch.randn(D))
        self.register_buffer("buf", torch.rand(TOKENS, D) + 0.5)
        self.head = nn.Linear(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.read(self, self.norm(x)).reshape(-1, 1)))


def read(how: object) -> nn.Module:
    torch.manual_seed(0)
    model = Read(how).double().eval()
    with torch.no_grad():  # a gain and bias away from 1 and 0: channels of different ranges
        model.norm.weight.uniform_(0.2, 3.0)
        model.norm.bias.uniform_(-1.0, 1.0)
    return model


def calibrated(model: nn.Module, x: Tensor) -> tuple[dict, tuple[str, ...]]:
    """The pass's maxima of ``w``, ``v``, ``u`` and its listed weights, any warning an
    error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, left = _calibrated(model, dict(model.named_parameters()), (x,))
    return {key: a for key, a in got.items() if key[0] in ("w", "v", "u")}, left


def _product(h: Tensor, w: Tensor) -> Tensor:
    return h[:, None, :] * w


def _after(first: Tensor, then: Tensor) -> Tensor:
    return then


def _two(m: nn.Module, h: Tensor) -> Tensor:
    p = _product(h, m.w)
    return p.sum(-1) + p.sum(0).sum(-1)


def _copied(m: nn.Module, h: Tensor) -> Tensor:
    buf = torch.zeros(TOKENS, D, dtype=h.dtype)
    buf.copy_(h)
    return (buf[:, None, :] * m.w).sum(-1)


# A read spelled otherwise, and its reference spelled with F.linear or @.
EXACT_READS = {
    "F.linear(h, w[0])": (lambda m, h: F.linear(h, m.w[0]), lambda m, h: F.linear(h, m.w[:1])),
    "h @ w[2]": (lambda m, h: h @ m.w[2], lambda m, h: F.linear(h, m.w[2:3])),
    "torch.mv(h, w[0])": (lambda m, h: torch.mv(h, m.w[0]), lambda m, h: F.linear(h, m.w[:1])),
    "w[1] @ h.T": (lambda m, h: m.w[1] @ h.T, lambda m, h: F.linear(h, m.w[1:2])),
    "h @ w.T[:, 0]": (lambda m, h: h @ m.w.T[:, 0], lambda m, h: F.linear(h, m.w[:1])),
    "a column: h[:, :OUT] @ w[:, 0]": (
        lambda m, h: h[:, :OUT] @ m.w[:, 0],
        lambda m, h: h[:, :OUT] @ m.w[:, :1],
    ),
    "einsum('td,d->t', h, w[0])": (
        lambda m, h: torch.einsum("td,d->t", h, m.w[0]),
        lambda m, h: F.linear(h, m.w[:1]),
    ),
    "torch.dot(h[0], w[0])": (
        lambda m, h: torch.dot(h[0], m.w[0]),
        lambda m, h: F.linear(h[0], m.w[:1]),
    ),
    "addmv(., h, w[0])": (
        lambda m, h: torch.addmv(h.new_zeros(TOKENS), h, m.w[0]),
        lambda m, h: F.linear(h, m.w[:1]),
    ),
    "over tokens, then over w's input dim": (
        lambda m, h: _product(h, m.w).sum(0).sum(-1),
        lambda m, h: F.linear(h.sum(0), m.w),
    ),
    "over tokens keepdim, then over w's input dim": (
        lambda m, h: _product(h, m.w).sum(0, keepdim=True).sum(-1),
        lambda m, h: F.linear(h.sum(0, keepdim=True), m.w),
    ),
    "averaged over tokens, then summed": (
        lambda m, h: _product(h, m.w).mean(0).sum(-1),
        lambda m, h: F.linear(h.mean(0), m.w),
    ),
    "over tokens of a [1, T, 1, D] input": (
        lambda m, h: (h.view(1, TOKENS, 1, D) * m.w).sum(1).sum(-1),
        lambda m, h: F.linear(h.view(1, TOKENS, D).sum(1), m.w),
    ),
    "the input broadcast along the summed tokens": (
        lambda m, h: (h[0][None, None] * m.w.expand(TOKENS, OUT, D)).sum(0).sum(-1),
        lambda m, h: F.linear(h[0][None].expand(TOKENS, D).sum(0), m.w),
    ),
    "one product summed twice: over D, and over tokens then D": (
        _two,
        lambda m, h: F.linear(h, m.w) + F.linear(h.sum(0), m.w),
    ),
    "averaged over w's input dim": (
        lambda m, h: _product(h, m.w).mean(-1),
        lambda m, h: F.linear(h, m.w),
    ),
    "a constant buffer, copy_(h), then the product": (_copied, lambda m, h: F.linear(h, m.w)),
}


@pytest.mark.parametrize("how", EXACT_READS)
def test_a_read_records_what_its_reference_records(how):
    spelled, reference = EXACT_READS[how]
    x = _batch(TOKENS, D)
    got, left = calibrated(read(spelled), x)
    want, want_left = calibrated(read(reference), x)
    assert left == want_left == ()
    assert list(got) == list(want) and len(want) == 1
    for key, a in want.items():
        assert torch.equal(got[key], a)


@pytest.mark.parametrize(
    "how",
    ["averaged over w's input dim", "one product summed twice: over D, and over tokens then D"],
)
def test_equalize_on_a_read_ends_where_its_reference_does(how):
    x = _batch(TOKENS, D)
    model, reference = read(EXACT_READS[how][0]), read(EXACT_READS[how][1])
    assert_equalized_alike(model, reference, x)


def _modified(m: nn.Module, h: Tensor) -> Tensor:
    h = h.clone()
    p = _product(h, m.w)
    h.mul_(100.0)  # after the product: the sum reads the values before
    return p.sum(-1)


def _set(p: Tensor) -> Tensor:
    p[..., 0] = 0.0
    return p


def _in_place(m: nn.Module, h: Tensor) -> Tensor:
    g = h[:, None, :].repeat(1, OUT, 1)
    g.mul_(m.w)
    return g.sum(-1)


def _imul(m: nn.Module, h: Tensor) -> Tensor:
    g = h[:, None, :].repeat(1, 1, 1)  # [T, 1, D]: no dim along which w is not summed
    g *= m.w[:1]
    return g.sum(-1)


def _out(m: nn.Module, h: Tensor) -> Tensor:
    return torch.mul(h[:, None, :], m.w, out=torch.empty(TOKENS, OUT, D, dtype=h.dtype)).sum(-1)


def _out_like(m: nn.Module, h: Tensor) -> Tensor:
    buf = torch.empty_like(h[:, None, :].expand(TOKENS, OUT, D))
    return torch.mul(h[:, None, :], m.w, out=buf).sum(-1)


# A read whose input the pass cannot know: listed, no maxima.
LISTED = {
    "the input written after the product": _modified,
    "the product relu_'d before its sum": lambda m, h: _product(h, m.w).relu_().sum(-1),
    "the product's column set to 0 before its sum": lambda m, h: _set(_product(h, m.w)).sum(-1),
    "a product summed over tokens, written, summed": lambda m, h: (
        _product(h, m.w).sum(0).mul_(2.0).sum(-1)
    ),
    "h.mul_(w) then sum": _in_place,
    "g *= w[:1] then sum": _imul,
    "torch.mul(., out=a constant buffer)": _out,
    "torch.mul(., out=empty_like(h))": _out_like,
    "vmap over w's rows": lambda m, h: torch.vmap(lambda r: (h * r).sum(-1))(m.w),
    "vmap over w's rows and h's": lambda m, h: torch.vmap(lambda u, r: (u * r).sum(-1))(
        h[:OUT], m.w
    ),
}


@pytest.mark.parametrize("how", LISTED)
def test_a_read_of_an_unknown_input_is_listed(how):
    model = read(LISTED[how])
    with pytest.warns(UserWarning, match="cannot follow"):
        got, left = _calibrated(model, dict(model.named_parameters()), (_batch(TOKENS, D),))
    assert left == ("w",) and [key for key in got if key[0] == "w"] == []
    assert ("head.weight", 1) in got


# Vector weights have no channel dim; products never summed over a weight's varying dims are no
# read: nothing recorded for them, nothing listed.
CONTROLS = {
    "torch.dot(h[0], a vector weight)": lambda m, h: torch.dot(h[0], m.u),
    "h @ a vector weight": lambda m, h: h @ m.u,
    "(h * buf).sum(0), F.linear": lambda m, h: F.linear((h * m.buf).sum(0), m.w),
    "(h * w).sum(0) only": lambda m, h: _product(h, m.w).sum(0),
}


@pytest.mark.parametrize("how", CONTROLS)
def test_a_vector_or_a_product_never_summed_over_a_weight_is_no_read(how):
    model = read(CONTROLS[how])
    x = _batch(TOKENS, D)
    got, left = calibrated(model, x)
    assert left == ()
    with torch.no_grad():
        h = model.norm(x)
    want = {"(h * buf).sum(0), F.linear": {("w", 1): (h * model.buf).sum(0).abs()}}.get(how, {})
    assert list(got) == list(want)
    for key, a in want.items():
        assert torch.equal(got[key], a)
