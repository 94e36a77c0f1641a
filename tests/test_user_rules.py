"""The rule registry a user extends: rules for one ``discover`` call (``rules=[...]``), global
ones (``register_rule`` / ``unregister_rule``), module rules matched along the class's MRO,
arguments bound to the rule's signature by name; and what discovery says about parameters read
by ops it does not handle (``einsum`` with a weight is handled)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gaugefix
from architectures import rel_change

DTYPE = torch.float64
TOL = 1e-10
DOCS = Path(__file__).resolve().parent.parent / "docs"


class ChannelScale(nn.Module):
    """``y = gamma * x`` per feature: a learnable scale that produces its output channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class NamedScale(ChannelScale):
    """A subclass that keeps ChannelScale's forward: ruled by ChannelScale's rule."""


class ShiftedScale(ChannelScale):
    """A subclass with a forward of its own (not homogeneous): traced through, never ruled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + 1.0


def channel_scale_rule(ctx, result, x):
    ctx.block(ctx.labels(x), ctx.reason("input of a learnable scale"))
    return ctx.produce(ctx.module.gamma, ctx.module.gamma.shape[0])


def _model(scale: type[ChannelScale] = ChannelScale) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 6), scale(6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)
    ).double()


def _exact(model: nn.Module, s: gaugefix.GaugeStructure, x: torch.Tensor) -> None:
    before = model(x)
    gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
    assert rel_change(before, model(x)) <= TOL
    gaugefix.balance_(model, s)
    assert rel_change(before, model(x)) <= TOL


X = torch.randn(7, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
# without a rule gamma is a per-channel gain: it divides the linear layer's rows (one generator
# each) and produces its own channels (another each); with the rule it only produces
UNRULED, RULED = 6 + 6 + 4, 6 + 4


def test_without_a_rule_gamma_is_a_per_channel_gain():
    model = _model()
    s = gaugefix.discover(model, X)
    assert s.num_generators == UNRULED
    assert [t.sign for t in s.params["1.gamma"].terms] == [1, -1]
    _exact(model, s, X)


def test_a_per_call_rule_through_ctx_module_applies_to_that_call_only():
    model = _model()
    s = gaugefix.discover(model, X, rules=[(ChannelScale, channel_scale_rule)])
    assert s.num_generators == RULED
    assert [t.sign for t in s.params["1.gamma"].terms] == [1]
    assert "0.weight" not in s.params  # its rows feed the blocked input of the scale
    _exact(model, s, X)
    assert gaugefix.discover(_model(), X).num_generators == UNRULED


def test_global_registration_and_unregistration():
    gaugefix.register_rule(ChannelScale, channel_scale_rule)
    try:
        assert gaugefix.discover(_model(), X).num_generators == RULED
        # a per-call rule takes precedence over the global one
        per_call = [(ChannelScale, gaugefix.rules.blocker)]
        blocked = gaugefix.discover(_model(), X, rules=per_call)
        assert any("ChannelScale" in e.reason for e in blocked.excluded)
    finally:
        gaugefix.unregister_rule(ChannelScale)
    assert gaugefix.discover(_model(), X).num_generators == UNRULED
    with pytest.raises(KeyError, match="no rule registered for"):
        gaugefix.unregister_rule(ChannelScale)


def test_a_user_rule_replaces_a_built_in_one_until_unregistered():
    model = _model()
    gaugefix.register_rule(F.relu, gaugefix.rules.blocker)
    try:
        # ReLU blocks: only gamma's channels (consumed by the second linear layer) are left
        assert gaugefix.discover(model, X).num_generators == 6
    finally:
        gaugefix.unregister_rule(F.relu)
    assert gaugefix.discover(model, X).num_generators == UNRULED


def test_module_rules_match_along_the_mro_when_the_forward_is_inherited():
    rules = [(ChannelScale, channel_scale_rule)]
    model = _model(NamedScale)
    s = gaugefix.discover(model, X, rules=rules)
    assert s.num_generators == RULED
    _exact(model, s, X)
    # a subclass with its own forward (x * gamma + 1) is traced: gamma is a per-channel gain
    # that divides the first layer's rows (6 generators) and whose own channels the constant
    # blocks; the third layer's 4 neurons
    model = _model(ShiftedScale)
    s = gaugefix.discover(model, X, rules=rules)
    assert s.num_generators == 6 + 4
    assert any("nonzero constant" in e.reason for e in s.excluded if e.module == "1")
    _exact(model, s, X)


def test_a_call_the_rule_signature_does_not_take_blocks():
    def relu_with_one_argument(ctx, result, x):  # F.relu(x, inplace=False) passes two
        return ctx.terms(x)

    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    s = gaugefix.discover(model, X, rules=[(F.relu, relu_with_one_argument)])
    assert s.num_generators == 0
    assert any("call its rule does not take" in e.reason for e in s.excluded if e.module == "0")


@pytest.mark.parametrize(
    "target, rule, message",
    [
        (3, gaugefix.rules.elementwise, "a rule is for a callable or an nn.Module type"),
        (F.relu, "not a function", "a rule must be callable"),
        (F.relu, lambda ctx: None, "must take (ctx, result, ...)"),
    ],
)
def test_bad_registrations_are_refused_and_change_nothing(target, rule, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        gaugefix.register_rule(target, rule)
    with pytest.raises(TypeError, match=re.escape(message)):
        gaugefix.discover(_model(), X, rules=[(target, rule)])
    assert gaugefix.discover(_model(), X).num_generators == UNRULED


def test_per_call_rules_must_be_pairs():
    with pytest.raises(TypeError, match=r"rules must be \(target, rule\) pairs"):
        gaugefix.discover(_model(), X, rules=[channel_scale_rule])


# -- einsum with a weight, and parameters read by ops discovery does not handle ----------------
class EinsumLinear(nn.Module):
    """Three linear maps spelled with einsum and a weight operand, ReLUs between."""

    def __init__(self, widths: tuple[int, int, int] = (6, 4, 3)) -> None:
        super().__init__()
        a, b, c = widths
        self.w1 = nn.Parameter(torch.randn(a, 5))
        self.w2 = nn.Parameter(torch.randn(b, a))
        self.w3 = nn.Parameter(torch.randn(b, c))
        self.w4 = nn.Parameter(torch.randn(2, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(torch.einsum("bi,oi->bo", x, self.w1))
        h = F.relu(torch.einsum("...i,oi->...o", h.unsqueeze(1), self.w2))
        h = F.relu(torch.einsum("bsh,hd->bsd", h, self.w3))
        return F.linear(h, self.w4)


@settings(max_examples=10, deadline=None)
@given(widths=st.tuples(*[st.integers(1, 7)] * 3), seed=st.integers(0, 1000))
def test_einsum_with_a_weight_is_a_linear_map(widths, seed):
    torch.manual_seed(seed)
    model = EinsumLinear(widths).double()
    s = gaugefix.discover(model, X)
    assert s.num_generators == sum(widths)  # the hidden units of the three einsum layers
    assert [t.sign for t in s.params["w2"].terms] == [1, -1]
    _exact(model, s, X)


class UnknownOnWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 6)
        self.w = nn.Parameter(torch.randn(2, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inner(x))
        return torch.einsum("bi,oi,o->bo", h, self.w, torch.ones(2, dtype=x.dtype))


def test_a_parameter_read_by_an_unhandled_op_is_excluded_with_the_op_and_its_name():
    s = gaugefix.discover(UnknownOnWeight().double(), X)
    assert s.num_generators == 0
    (exclusion,) = [e for e in s.excluded if "parameter 'w'" in e.reason]
    assert "torch.einsum in '<root>'" in exclusion.reason
    assert exclusion.channels == (0, 1)
    assert "parameter 'w'" in s.summary()


def test_the_python_blocks_of_the_generators_page_run():
    text = (DOCS / "generators.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/generators.md", "exec"), {})
