"""Audit of the rule registry a user extends: a rule registered for a module instance (which a
trace never looks up: modules are ruled by type) is refused, and a discovery sees the global
rules as they were when it started, whatever is registered or unregistered while it runs (from
another thread, or from a rule itself)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugefix
from test_user_rules import UNRULED, ChannelScale, X, _exact, _model, channel_scale_rule


@pytest.mark.parametrize("instance", [ChannelScale(6), nn.ReLU()])
def test_a_rule_for_a_module_instance_is_refused_and_changes_nothing(instance):
    """An instance is callable, so it was kept as an op rule that no trace ever looks up:
    registering one raised nothing and the rule silently never applied."""
    with pytest.raises(TypeError, match=r"a rule for a module is for its type \(\w+\)"):
        gaugefix.register_rule(instance, channel_scale_rule)
    with pytest.raises(TypeError, match="a rule for a module is for its type"):
        gaugefix.discover(_model(), X, rules=[(instance, channel_scale_rule)])
    assert gaugefix.discover(_model(), X).num_generators == UNRULED


class TwoOps(nn.Module):
    """``fc3(abs(fc2(relu(fc1(x)))))``: ReLU and abs are positively homogeneous, each fc1 and
    fc2 neuron a generator."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.abs(self.fc2(F.relu(self.fc1(x)))))


def _two_ops() -> nn.Module:
    torch.manual_seed(0)
    return TwoOps().double()


def test_a_rule_unregistered_during_a_discovery_applies_to_the_whole_trace():
    """A global op rule removed while a discovery runs (here by the rule itself, as another
    thread could) ruled the first ``torch.abs`` of the trace and not the second: one structure
    from two rule sets. A trace now reads the registry once, when it starts."""
    calls = []

    def blocking_once(ctx, result, *args, **kwargs):
        calls.append(True)
        if len(calls) == 1:
            gaugefix.unregister_rule(torch.abs)
        return gaugefix.rules.blocker(ctx, result, *args, **kwargs)

    class AbsTwice(TwoOps):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(torch.abs(self.fc2(torch.abs(self.fc1(x)))))

    model = AbsTwice().double()
    gaugefix.register_rule(torch.abs, blocking_once)
    try:
        found = gaugefix.discover(model, X)
    finally:
        if not calls:  # the rule never ran, so never removed itself
            gaugefix.unregister_rule(torch.abs)
    assert len(calls) == 2
    blocked = gaugefix.discover(model, X, rules=[(torch.abs, gaugefix.rules.blocker)])
    assert found.to_dict() == blocked.to_dict() != gaugefix.discover(model, X).to_dict()
    _exact(model, found, X)


def test_a_rule_registered_during_a_discovery_applies_from_the_next():
    """A global rule registered while a discovery runs (by a per-call rule for the ReLU, before
    the ``torch.abs`` it rules) ruled the rest of that trace. It applies from the next discovery
    on."""

    def registering_relu(ctx, result, input, *rest, **options):
        gaugefix.register_rule(torch.abs, gaugefix.rules.blocker)
        return gaugefix.rules.elementwise(ctx, result, input, *rest, **options)

    model = _two_ops()
    unruled = gaugefix.discover(model, X)
    try:
        found = gaugefix.discover(model, X, rules=[(F.relu, registering_relu)])
        after = gaugefix.discover(model, X)
    finally:
        gaugefix.unregister_rule(torch.abs)
    assert found.to_dict() == unruled.to_dict()
    blocked = gaugefix.discover(model, X, rules=[(torch.abs, gaugefix.rules.blocker)])
    assert after.to_dict() == blocked.to_dict() != unruled.to_dict()
    _exact(model, found, X)
