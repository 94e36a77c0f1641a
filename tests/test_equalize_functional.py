"""``equalize_(..., "activation")`` reads the calibration maxima of every linear call on a
counted weight, not only of the modules that own one: a weight read through ``F.linear`` or a
matrix product inside a custom module, or sliced along its rows (a fused QKV or gate-up weight
split by ``chunk``) or transposed before the call. Oracle: the same function written with
``nn.Linear`` modules (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import randomise_, rel_change
from test_equalize import output, same_bits, snapshot
from test_spellings_consumers import PAIRS, activation, mismatch, pair

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
CLOSED_FORM = 1e-12  # SmoothQuant's formula, one step: rounding only
D, OUT = 6, 4


class FunctionalBlock(nn.Module):
    """``F.linear(F.layer_norm(x), W)``: a LayerNorm and a linear map held as parameters and
    read by functions (``how``: ``F.linear`` on ``W``, ``x @ W.T``, or ``x @ V`` on the
    transposed parameter ``V = W.T``, ``[in, out]``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.gain, self.shift = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        shape = (D, OUT) if how == "in_out" else (OUT, D)
        self.w, self.b = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(OUT))

    def forward(self, x: Tensor) -> Tensor:
        h = F.layer_norm(x, (D,), self.gain, self.shift)
        if self.how == "linear":
            return F.linear(h, self.w, self.b)
        if self.how == "matmul":
            return h @ self.w.T + self.b
        return torch.matmul(h, self.w) + self.b


def module_block() -> nn.Module:
    torch.manual_seed(0)
    return randomise_(nn.Sequential(nn.LayerNorm(D), nn.Linear(D, OUT)), seed=1).eval()


def functional_block(how: str, reference: nn.Module) -> nn.Module:
    """A :class:`FunctionalBlock` holding ``reference``'s entries."""
    model = FunctionalBlock(how).to(DTYPE)
    weight = reference[1].weight.detach()
    with torch.no_grad():
        model.gain.copy_(reference[0].weight)
        model.shift.copy_(reference[0].bias)
        model.w.copy_(weight.T if how == "in_out" else weight)
        model.b.copy_(reference[1].bias)
    return model


@pytest.mark.parametrize("alpha", [0.5, 0.8])
@pytest.mark.parametrize("how", ["linear", "matmul", "in_out"])
def test_smoothquant_on_a_functional_block_is_the_module_blocks(how, alpha):
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``X`` the normed input: the
    functional block ends where the ``nn.Linear`` one does, and both at the closed form."""
    reference = module_block()
    model = functional_block(how, reference)
    x = 2 * torch.randn(5, 3, D, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        act = reference[0](x).abs().amax((0, 1))
    w = reference[1].weight.detach().clone()
    scale = act**alpha / w.abs().amax(0) ** (1 - alpha)
    before = output(model, (x,))
    done = [
        gaugefix.equalize_(m, gaugefix.discover(m, x), "activation", calibration=x, alpha=alpha)
        for m in (reference, model)
    ]
    assert all(r.converged for r in done)
    got = model.w.detach().T if how == "in_out" else model.w.detach()
    assert rel_change(w * scale, got) <= CLOSED_FORM
    assert rel_change(reference[1].weight.detach(), got) <= CLOSED_FORM
    assert rel_change(reference[0].weight.detach(), model.gain.detach()) <= CLOSED_FORM
    assert rel_change(before, output(model, (x,))) <= TOL


FUSED = [name for name in PAIRS if name.startswith(("gate_up", "qkv"))]


@pytest.mark.parametrize("name", FUSED)
def test_fused_weights_read_through_slices_match_the_unfused_reference(name):
    """The slices' inputs calibrate the fused weight's columns: the ``"activation"`` point of
    the fused model is its unfused reference's."""
    spelled, s, reference, s_ref = pair(name)
    activation(name)(reference, s_ref)
    activation(name)(spelled, s)
    assert mismatch(name, spelled, reference) <= TOL


class ReadTwice(nn.Module):
    """One weight ``W`` read whole on ``relu(a(x))`` and its first rows on ``relu(b(x))``
    (ten times larger), under ``torch.no_grad`` inside ``forward`` (``grad``: without)."""

    def __init__(self, grad: bool = True) -> None:
        super().__init__()
        self.grad = grad
        self.a, self.b = nn.Linear(3, D), nn.Linear(3, D)
        self.w = nn.Parameter(torch.randn(OUT, D))
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            ha, hb = torch.relu(self.a(x)), torch.relu(self.b(x))
            y = F.linear(ha, self.w) + F.linear(hb, self.w[: OUT // 2]).repeat(1, 2)
            return self.head(torch.relu(y))


def read_twice(grad: bool) -> tuple[nn.Module, Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = randomise_(ReadTwice(grad), seed=1).eval()
    with torch.no_grad():
        model.b.weight.mul_(10)
        model.b.bias.mul_(10)
    x = torch.randn(7, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    return model, x, gaugefix.discover(model, x)


def test_a_weight_read_by_several_calls_takes_the_max_over_them():
    """The channels of ``a`` and ``b`` are different generators, both divided on ``W``'s
    columns: ``A_j`` is the max over both calls' inputs, SmoothQuant's formula on the
    concatenated inputs (and the function is unchanged)."""
    model, x, s = read_twice(True)
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    with torch.no_grad():
        inputs = torch.cat([torch.relu(model.a(x)), torch.relu(model.b(x))])
    a, b = inputs.abs().amax(0).log(), model.w.detach().abs().amax(0).log()
    assert float((0.5 * a - 0.5 * b).abs().max()) <= CLOSED_FORM


def test_a_forward_under_no_grad_is_calibrated_as_one_with_grad():
    """A calibration forward that disables autograd itself (the model discovered with it on),
    called inside ``torch.no_grad``, sees the same calls."""
    with_grad, x, s = read_twice(True)
    without, _, s2 = read_twice(True)
    without.grad = False
    before = output(without, (x,))
    gaugefix.equalize_(with_grad, s, "activation", calibration=x)
    with torch.no_grad():
        gaugefix.equalize_(without, s2, "activation", calibration=x)
    assert rel_change(before, output(without, (x,))) <= TOL
    expected = with_grad.state_dict()
    for k, v in without.state_dict().items():
        assert rel_change(expected[k], v) <= TOL, k


def test_bad_calibration_is_one_clear_error_and_changes_nothing():
    model = functional_block("linear", module_block())
    s = gaugefix.discover(model, torch.randn(2, D, dtype=DTYPE))
    state = snapshot(model)
    with pytest.raises(ValueError, match="does not run on the calibration batch") as err:
        gaugefix.equalize_(model, s, "activation", calibration=torch.randn(2, D + 1, dtype=DTYPE))
    assert "\n" not in str(err.value) and same_bits(model, state)
