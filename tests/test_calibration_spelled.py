"""Linear reads spelled without ``F.linear``, seen by ``equalize_(..., "activation")``'s
calibration pass: an elementwise product of an activation and a weight summed over the
weight's input dim (``(h[:, None, :] * W).sum(-1)`` is ``h @ W.T``), and ``bmm`` of one
matrix ``W.T[None]`` / ``W.t().expand(1, -1, -1)``. Oracle: the same model written with
``F.linear`` (float64; the maxima equal bit for bit, the same keys, nothing listed). A product
summed in another way over the weight's dims is listed; one never summed over them (a gain
``h * gamma``, ``h * wpe``, ``h + wpe``) is no read, and a 1-D weight has no channel dim
(``(h * w_row).sum(-1)`` as ``torch.mv(h, w_row)``): no maxima, no warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix.calibration import _calibrated
from test_equalize_products import EXACT, D, _batch

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, TOKENS, BATCH = 4, 7, 3


class Spelled(nn.Module):
    """A LayerNorm, a weight ``w`` (``[OUT, D]``; ``[D, OUT]`` where ``transposed``) read as
    ``read(h, w)`` spells it, a ReLU and a head."""

    def __init__(self, read: object, transposed: bool = False) -> None:
        super().__init__()
        self.read, self.norm = read, nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn((D, OUT) if transposed else (OUT, D)))
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.read(self.norm(x), self.w)  # [T, OUT], or one row of OUT, or one number
        return self.head(torch.relu(y.reshape(y.shape[0], -1).expand(x.shape[0], OUT)))


def spelled(read: object, transposed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Spelled(read, transposed).double().eval()
    with torch.no_grad():  # a gain and bias away from 1 and 0: channels of different ranges
        model.norm.weight.uniform_(0.2, 3.0)
        model.norm.bias.uniform_(-1.0, 1.0)
    return model


def calibrated(model: nn.Module, x: Tensor) -> tuple[dict, tuple[str, ...]]:
    """The pass's maxima and listed weights, any warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _calibrated(model, dict(model.named_parameters()), (x,))


def listed(model: nn.Module, x: Tensor) -> tuple[dict, tuple[str, ...]]:
    with pytest.warns(UserWarning, match="cannot follow"):
        return _calibrated(model, dict(model.named_parameters()), (x,))


def linear(h: Tensor, w: Tensor) -> Tensor:
    return F.linear(h, w)


def linear_t(h: Tensor, w: Tensor) -> Tensor:
    return F.linear(h, w.T)


def _summed(h: Tensor, w: Tensor) -> Tensor:
    return F.linear(h, w).sum(0)[None]


# How ``w`` is read, whether it is stored ``[D, OUT]`` (its F.linear reference reads w.T), and
# a reference other than ``F.linear(h, w)`` (``F.linear(h, w.T)``).
EXACT_READS = {
    "(h[:, None, :] * w).sum(-1)": (lambda h, w: (h[:, None, :] * w).sum(-1), False),
    "(h.unsqueeze(1) * w).sum(2)": (lambda h, w: (h.unsqueeze(1) * w).sum(2), False),
    "torch.sum(h[:, None] * w, dim=-1)": (lambda h, w: torch.sum(h[:, None] * w, dim=-1), False),
    "(w * h[:, None, :]).sum(-1)": (lambda h, w: (w * h[:, None, :]).sum(-1), False),
    "torch.mul then sum keepdim": (
        lambda h, w: torch.mul(h[:, None], w).sum(-1, keepdim=True),
        False,
    ),
    "torch.mul by keyword": (lambda h, w: torch.mul(input=w, other=h[:, None]).sum(-1), False),
    "over tokens too": (lambda h, w: (h[:, None, :] * w).sum((0, 2))[None], False, _summed),
    "w[None] * h[:, None]": (lambda h, w: (w[None] * h[:, None]).sum(-1), False),
    "[in, out]: (h[:, :, None] * w).sum(1)": (lambda h, w: (h[:, :, None] * w).sum(1), True),
    "[in, out] as w.T: (h[:, None] * w.T).sum(-1)": (
        lambda h, w: (h[:, None] * w.T).sum(-1),
        True,
    ),
    "a row: (h * w[0]).sum(-1)": (
        lambda h, w: (h * w[0]).sum(-1, keepdim=True),
        False,
        lambda h, w: F.linear(h, w[:1]),
    ),
    "under vmap": (lambda h, w: torch.vmap(lambda u: (u * w).sum(-1))(h), False),
    "bmm(h[None], w.T[None])[0]": (lambda h, w: torch.bmm(h[None], w.T[None])[0], False),
    "bmm(h[None], w.t().expand(1, -1, -1))": (
        lambda h, w: torch.bmm(h[None], w.t().expand(1, -1, -1))[0],
        False,
    ),
    "bmm(h[None], w[None]) [in, out]": (lambda h, w: torch.bmm(h[None], w[None])[0], True),
    "matmul(h[:, None], w.T[None]) broadcast": (
        lambda h, w: torch.matmul(h[:, None], w.T[None]),
        False,
    ),
    "baddbmm(., h[None], w.T.unsqueeze(0))": (
        lambda h, w: torch.baddbmm(h.new_zeros(1), h[None], w.T.unsqueeze(0))[0],
        False,
    ),
}


@pytest.mark.parametrize("how", EXACT_READS)
def test_a_read_records_what_f_linear_records(how):
    read, transposed, *ref = EXACT_READS[how]
    model = spelled(read, transposed)
    reference = spelled(ref[0] if ref else linear_t if transposed else linear, transposed)
    reference.load_state_dict(model.state_dict())
    x = _batch(TOKENS, D)
    got, left = calibrated(model, x)
    want, want_left = calibrated(reference, x)
    key = ("w", 0 if transposed else 1)
    assert left == want_left == ()
    assert sorted(got) == sorted(want) == sorted([key, ("head.weight", 1)])
    assert torch.equal(got[key], want[key])
    head = want["head.weight", 1]  # the read's output, rounded as the spelling sums
    assert float((got["head.weight", 1] - head).abs().max()) <= EXACT * float(head.max())


@pytest.mark.parametrize("how", ["(h[:, None, :] * w).sum(-1)", "bmm(h[None], w.T[None])[0]"])
def test_equalize_on_a_read_ends_where_f_linear_does(how):
    x = _batch(TOKENS, D)
    model, reference = spelled(EXACT_READS[how][0]), spelled(linear)
    reference.load_state_dict(model.state_dict())
    assert_equalized_alike(model, reference, x)


def assert_equalized_alike(model: nn.Module, reference: nn.Module, x: Tensor) -> None:
    """``"activation"`` on ``model`` (the reference's structure; no warning) converges, lists
    nothing, and ends at the reference's point to :data:`EXACT`."""
    structure = gaugefix.discover(reference, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gaugefix.equalize_(model, structure, "activation", calibration=x)
        want = gaugefix.equalize_(reference, structure, "activation", calibration=x)
    assert got.converged and want.converged and got.uncalibrated == want.uncalibrated == ()
    for name, p in reference.named_parameters():
        assert rel_change(p.detach(), model.get_parameter(name).detach()) <= EXACT


def _offset(h: Tensor) -> Tensor:
    """``h`` varying along a new dim of ``OUT`` rows (row ``i``: ``h + i``)."""
    return h[:, None, :] + torch.arange(OUT, dtype=h.dtype)[:, None]


# A product of ``w`` and an activation summed over ``w``'s dims in another way: listed.
LISTED = {
    "summed over every dim": lambda h, w: (h[:, None, :] * w).sum()[None, None],
    "summed over both of w's dims": lambda h, w: (h[:, None, :] * w).sum((1, 2))[:, None],
    "the input broadcast along the summed dim": lambda h, w: (h[:, None, :1] * w).sum(-1),
    "the input varying along w's other dim": lambda h, w: (_offset(h) * w).sum(-1),
    "summed over w's output dim only": lambda h, w: (h[:, None, :] * w).sum(1)[:, :OUT],
    "w computed from itself first": lambda h, w: (h[:, None, :] * (2 * w)).sum(-1),
    "a view other than a transpose or a range": lambda h, w: (
        h[:, None, :] * w.reshape(D, OUT).T
    ).sum(-1),
    "bmm of a batch of two copies": lambda h, w: torch.bmm(_two(h), w.T.repeat(2, 1, 1))[0],
}


def _two(h: Tensor) -> Tensor:
    return h.expand(2, *h.shape)


@pytest.mark.parametrize("how", LISTED)
def test_a_product_summed_otherwise_is_listed(how):
    got, left = listed(spelled(LISTED[how]), _batch(TOKENS, D))
    assert left == ("w",) and [key for key in got if key[0] == "w"] == []
    assert ("head.weight", 1) in got


class Controls(nn.Module):
    """A LayerNorm over ``[B, T, D]``, then ``how``: a gain ``g`` ``[D]``, a positional table
    ``wpe`` ``[T, D]``, a vector ``u`` ``[D]``, and the linear map ``w``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.norm = how, nn.LayerNorm(D)
        self.g, self.u = nn.Parameter(torch.rand(D) + 0.5), nn.Parameter(torch.randn(D))
        self.wpe, self.w = nn.Parameter(torch.randn(TOKENS, D)), nn.Parameter(torch.randn(OUT, D))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        if self.how == "h * g":
            return F.linear(h * self.g, self.w)
        if self.how == "h * wpe":
            return F.linear(h * self.wpe, self.w)
        if self.how == "h + wpe":
            return F.linear(h + self.wpe, self.w)
        if self.how == "(h * wpe).sum(0): over the batch":
            return F.linear((h * self.wpe).sum(0), self.w)
        if self.how == "(h * u).sum(-1)":
            return (h * self.u).sum(-1)
        if self.how == "(h * g).sum(-1)":
            return (h * self.g).sum(-1, keepdim=True) * F.linear(h, self.w)
        if self.how == "torch.mv(h, u)":
            return torch.mv(h.flatten(0, 1), self.u)
        return F.linear(h, self.u)


CONTROLS = [
    "h * g",
    "h * wpe",
    "h + wpe",
    "(h * wpe).sum(0): over the batch",
    "(h * u).sum(-1)",
    "(h * g).sum(-1)",
    "torch.mv(h, u)",
    "F.linear(h, u)",
]


@pytest.mark.parametrize("how", CONTROLS)
def test_a_product_never_summed_over_a_weights_dims_is_no_read(how):
    torch.manual_seed(0)
    model = Controls(how).double().eval()
    x = _batch(BATCH, TOKENS, D)
    got, left = calibrated(model, x)
    with torch.no_grad():
        h = model.norm(x)
    inputs = {"h * g": h * model.g, "h * wpe": h * model.wpe, "h + wpe": h + model.wpe}
    inputs["(h * wpe).sum(0): over the batch"] = (h * model.wpe).sum(0)
    inputs["(h * g).sum(-1)"] = h
    assert left == ()
    assert list(got) == ([("w", 1)] if how in inputs else [])
    if how in inputs:
        assert torch.equal(got["w", 1], inputs[how].abs().reshape(-1, D).amax(0))
