"""``equalize_(..., "activation")`` lists every counted weight whose channels fall back to
``"range"`` for want of calibration maxima, also where its calibration pass sees no read of it
at all: a call dispatching as one call (``torch.cdist``, ``F.bilinear``, ``linalg.vecdot``,
``addbmm``, a ``multi_dot`` of three operands), a ``tensordot`` whose ``dims`` is a tensor, an
``einsum`` contracting the weight with the input over no index, a product passed through another
call before its sum, a weight never read. Each warns and is listed in ``uncalibrated``, and the
gauge is the one of the same model with that read removed (the weight unread): listing it
changes nothing else; the generators the weight does not touch end where the ``F.linear``
spelling (the oracle, float64) puts them. ``torch.vdot`` and a ``multi_dot`` of two operands
read as ``torch.dot`` and ``matmul`` do: their maxima are ``F.linear``'s bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from gaugefix.calibration import _calibrated
from test_equalize_products import EXACT, TOKENS, D, _batch

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, CLASSES = 4, 2
SOLVE = 1e-13  # the solve's tolerance: the gauges compared are its solutions


def _rows(h: Tensor, w: Tensor, read: object) -> Tensor:
    """``read(u, v)`` of every row ``u`` of ``h`` and ``v`` of ``w``: ``[T, rows of w]``."""
    return torch.stack([torch.stack([read(u, v) for v in w]) for u in h])


# A read of ``w`` (``[CLASSES, D]``) by ``h`` (``[T, D]``) that the pass does not see.
UNSEEN = {
    "tensordot, dims a tensor": lambda h, w: torch.tensordot(h, w, dims=torch.tensor([[1], [1]])),
    "multi_dot of three": lambda h, w: torch.linalg.multi_dot(
        [h, w.T, torch.eye(CLASSES, dtype=h.dtype)]
    ),
    "addbmm": lambda h, w: torch.addbmm(h.new_zeros(1), h[None], w.T[None]),
    "linalg.vecdot": lambda h, w: torch.linalg.vecdot(h[:, None, :], w),
    "F.bilinear": lambda h, w: F.bilinear(h, h, w[:, :, None].expand(-1, -1, D)),
    "cdist": lambda h, w: torch.cdist(h, w),
    "einsum over no index, then summed": lambda h, w: torch.einsum("td,od->tod", h, w).sum(-1),
    "the product cloned before its sum": lambda h, w: (h[:, None, :] * w).clone().sum(-1),
    "w never read": None,
}

NOT_LINEAR = ("F.bilinear", "cdist", "w never read")  # not F.linear(h, w)

# A read of ``w`` that the pass calibrates as ``F.linear(h, w)``.
CALIBRATED = {
    "vdot": lambda h, w: _rows(h, w, torch.vdot),
    "Tensor.vdot": lambda h, w: _rows(h, w, Tensor.vdot),
    "multi_dot of two": lambda h, w: torch.linalg.multi_dot([h, w.T]),
    "multi_dot of two, w first": lambda h, w: torch.linalg.multi_dot((w, h.T)).T,
}


class Branches(nn.Module):
    """Two LayerNorms of one input: the first read by ``w`` as ``read(h, w)`` spells it, straight
    into the output (``None``: ``w`` unread); the second by ``v``, a ReLU and a head."""

    def __init__(self, read: object) -> None:
        super().__init__()
        self.read, self.norm_a, self.norm_b = read, nn.LayerNorm(D), nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(CLASSES, D))
        self.v, self.head = nn.Linear(D, OUT), nn.Linear(OUT, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        y = self.head(torch.relu(self.v(self.norm_b(x))))
        return y if self.read is None else y + self.read(self.norm_a(x), self.w)


def branches(read: object) -> nn.Module:
    torch.manual_seed(0)
    model = Branches(read).double().eval()
    with torch.no_grad():  # gains and biases away from 1 and 0: channels of different ranges
        for norm in (model.norm_a, model.norm_b):
            norm.weight.uniform_(0.2, 3.0)
            norm.bias.uniform_(-1.0, 1.0)
    return model


def linear(h: Tensor, w: Tensor) -> Tensor:
    return F.linear(h, w)


def equalized(read: object, structure: gaugefix.GaugeStructure, x: Tensor):
    model = branches(read)
    return gaugefix.equalize_(model, structure, "activation", calibration=x, tol=SOLVE)


@pytest.mark.parametrize("how", UNSEEN)
def test_a_read_the_pass_does_not_see_is_listed_and_warned(how):
    x = _batch(TOKENS, D)
    reference = branches(linear)
    structure = gaugefix.discover(reference, x)
    model = branches(UNSEEN[how])
    if how not in NOT_LINEAR:  # the same function as the oracle
        with torch.no_grad():
            y, want_y = model(x), reference(x)
        assert float((y - want_y).abs().max()) <= EXACT * float(want_y.abs().max())
    with pytest.warns(UserWarning, match=r"cannot follow how w \(it sees no call read it\)"):
        got = equalized(UNSEEN[how], structure, x)
    with pytest.warns(UserWarning, match="cannot follow how w "):
        removed = equalized(None, structure, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = equalized(linear, structure, x)
    assert got.uncalibrated == removed.uncalibrated == ("w",) and want.uncalibrated == ()
    assert got.converged and removed.converged and want.converged
    assert torch.equal(got.h, removed.h)  # listing changes nothing else
    others = ~structure.touching(["w"])
    assert bool(others.any()) and bool(structure.touching(["w"]).any())
    assert torch.equal(got.h[others], want.h[others])


@pytest.mark.parametrize("how", UNSEEN)
def test_the_pass_itself_records_no_maxima_for_it(how):
    """The pass alone lists nothing (it sees no read); ``equalize_`` lists ``w`` from the
    structure (its columns' generators get no ``A_j``)."""
    model = branches(UNSEEN[how])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, left = _calibrated(model, dict(model.named_parameters()), (_batch(TOKENS, D),))
    assert left == () and [key for key in got if key[0] == "w"] == []


@pytest.mark.parametrize("how", CALIBRATED)
def test_vdot_and_a_multi_dot_of_two_record_what_f_linear_records(how):
    x = _batch(TOKENS, D)
    model, reference = branches(CALIBRATED[how]), branches(linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, left = _calibrated(model, dict(model.named_parameters()), (x,))
        want, want_left = _calibrated(reference, dict(reference.named_parameters()), (x,))
        result = gaugefix.equalize_(
            model, gaugefix.discover(reference, x), "activation", calibration=x
        )
    assert left == want_left == () and result.uncalibrated == ()
    assert sorted(got) == sorted(want) and ("w", 1) in got
    for key in want:
        assert torch.equal(got[key], want[key])


class Listed(Branches):
    """``w`` read through ``2 * w`` (a computed tensor: a read not followed) and ``v`` not
    read at all (its columns' generators get no ``A_j``); the head read by ``F.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        y = self.head(torch.relu(self.norm_b(x)[:, :OUT]))
        return y + F.linear(self.norm_a(x), 2 * self.w)


def test_both_kinds_are_listed_in_parameter_order():
    x = _batch(TOKENS, D)
    structure = gaugefix.discover(branches(linear), x)
    torch.manual_seed(0)
    model = Listed(None).double().eval()
    with pytest.warns(UserWarning) as caught:
        result = gaugefix.equalize_(model, structure, "activation", calibration=x)
    assert result.uncalibrated == ("w", "v.weight")
    messages = [str(w.message) for w in caught if "cannot follow" in str(w.message)]
    assert len(messages) == 2
    assert "how w (a view" in messages[0] and "how v.weight (it sees no call" in messages[1]
