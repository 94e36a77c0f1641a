"""``equalize_(..., "activation")``'s calibration pass never leaves a counted weight to
``"range"`` silently: a copy of a gathered expert copy (``W[ids].clone()``) is followed as the
gathered copy is (oracle: the unfused model, float64); a weight read under ``vmap`` as a
batched wrapper, a tensor computed from weights before the call (``W * scale``, a
parametrization, a product of two weights ``A @ B``, neither read by an activation) and an
``einsum`` contracting several of its dims at once record no maxima, warn and are listed in
``EqualizeResult.uncalibrated`` (with the structure of the same function spelled so that the
pass follows it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import gaugefix
from architectures import randomise_, rel_change
from gaugefix.calibration import activation_ranges
from test_equalize import output
from test_equalize_products import (
    EXACT,
    TOKENS,
    TOL,
    D,
    Fused,
    _batch,
    assert_calibrated_as_unfused,
    equalized,
    moe,
)

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, RANK = 4, 3


class GatheredCopy(Fused):
    """Fused experts gathered per token (``W[ids]``) and copied again before ``bmm``."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        ids = self.router(h).argmax(-1)
        hidden = torch.bmm(self.gate_up[ids].clone(), h.unsqueeze(-1)).squeeze(-1)
        gate, up = hidden.chunk(2, -1)
        inner = (torch.relu(gate) * up).unsqueeze(1)
        return torch.bmm(inner, self.down[ids].clone().transpose(1, 2)).squeeze(1)


def test_a_copied_gathered_copy_is_calibrated_as_unfused_experts():
    x = _batch(TOKENS, D)
    fused, unfused = moe("bmm")
    model = GatheredCopy("copy").to(torch.float64).eval()
    model.load_state_dict(fused.state_dict())
    assert_calibrated_as_unfused(model, unfused, x)
    result = gaugefix.equalize_(model, gaugefix.discover(model, x), "activation", calibration=x)
    assert result.converged and result.uncalibrated == ()
    equalized(unfused, x, gaugefix.discover(unfused, x), alpha=0.5)
    for e, expert in enumerate(unfused.experts):
        assert rel_change(expert.gate_up.weight.detach(), model.gate_up[e].detach()) <= TOL
        assert rel_change(expert.down.weight.detach(), model.down[e].detach()) <= TOL


class Reader(nn.Module):
    """A LayerNorm, a counted weight ``w`` reading its output as ``how`` spells it, a ReLU
    and a head."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.LayerNorm(D)
        shape = {"vmap": (2, OUT, D), "slices": (2, OUT, D), "einsum": (D, D, OUT)}
        low_rank = how.startswith("low_rank")
        self.w = nn.Parameter(torch.randn(*shape.get(how, (OUT, RANK) if low_rank else (OUT, D))))
        if low_rank:  # w @ v: a rank-RANK map
            self.v = nn.Parameter(torch.randn(RANK, D))
        self.register_buffer("scale", torch.rand(OUT, 1) + 0.5)
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        if self.how == "vmap":  # an ensemble of two maps, summed
            y = torch.vmap(lambda w: F.linear(h, w))(self.w).sum(0)
        elif self.how == "slices":  # the same ensemble, matrix by matrix
            y = F.linear(h, self.w[0]) + F.linear(h, self.w[1])
        elif self.how == "scaled":
            y = F.linear(h, self.w * self.scale)
        elif self.how == "rowscaled":  # the same map, the weight read as it is
            y = F.linear(h, self.w) * self.scale[:, 0]
        elif self.how == "low_rank":  # the product of two weights, then read
            y = F.linear(h, self.w @ self.v)
        elif self.how == "low_rank_split":  # the same map, one weight after the other
            y = F.linear(F.linear(h, self.v), self.w)
        elif self.how == "einsum":  # [B, D, D] by [D, D, OUT], two dims at once
            y = torch.einsum("bij,ijk->bk", h, self.w)
        else:
            y = F.linear(h, self.w)
        return self.head(torch.relu(y))


class Positive(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.abs()


def reader(how: str) -> nn.Module:
    torch.manual_seed(0)
    model = randomise_(Reader(how).to(torch.float64), seed=1).eval()
    if how == "parametrized":
        parametrize.register_parametrization(model, "w", Positive())
    return model


# The weight's name, and the model (the same function, parameters and symmetries) whose
# discovered structure ``equalize_`` uses (none: the weight's own model's, where it finds any).
NOT_FOLLOWED = {
    "vmap": (("w",), "slices"),
    "scaled": (("w",), "rowscaled"),
    "low_rank": (("w", "v"), "low_rank_split"),
    "einsum": (("w",), "einsum"),
    "parametrized": (("parametrizations.w.original",), None),
}


@pytest.mark.parametrize("how", NOT_FOLLOWED)
def test_a_read_not_followed_warns_and_records_nothing(how):
    x = _batch(5, D, D) if how == "einsum" else _batch(7, D)
    model, (names, _) = reader(how), NOT_FOLLOWED[how]
    with pytest.warns(UserWarning, match="cannot follow"):
        got = activation_ranges(model, dict(model.named_parameters()), x)
    assert [key for key in got if key[0] in names] == []
    assert ("head.weight", 1) in got


@pytest.mark.parametrize("how", [h for h, (_, ref) in NOT_FOLLOWED.items() if ref])
def test_a_read_not_followed_is_listed_as_uncalibrated(how):
    x = _batch(5, D, D) if how == "einsum" else _batch(7, D)
    model, (names, ref) = reader(how), NOT_FOLLOWED[how]
    reference = reader(ref)
    reference.load_state_dict(model.state_dict())
    assert rel_change(output(reference, (x,)), output(model, (x,))) <= EXACT
    structure = gaugefix.discover(reference, x)
    assert set(names) <= gaugefix.equalize.counted_weights(structure, None)
    before = output(model, (x,))
    with pytest.warns(UserWarning, match="cannot follow"):
        result = gaugefix.equalize_(model, structure, "activation", calibration=x)
    assert result.converged and sorted(result.uncalibrated) == sorted(names)
    assert rel_change(before, output(model, (x,))) <= TOL
