"""A user rule that gives a custom module's parameter a producer role through ``ctx.module``."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import gaugefix

trace_module = importlib.import_module("gaugefix.structure.trace")


class ChannelScale(nn.Module):
    """``y = gamma * x`` per feature: a learnable scale that produces its output channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def channel_scale_rule(ctx, args, kwargs, out):
    (x,) = args
    ctx.block(ctx.labels(x), ctx.reason("input of a learnable scale"))
    return ctx.produce(ctx.module.gamma, ctx.module.gamma.shape[0])


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(trace_module, "_MODULE_RULES", dict(trace_module._MODULE_RULES))


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 6), ChannelScale(6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)
    ).double()


def test_without_a_rule_gamma_is_a_per_channel_gain(registry):
    """The built-in rule for ``x * parameter``: gamma divides the linear layer's rows (one
    generator each) and produces its own channels (another each)."""
    model = _model()
    x = torch.randn(3, 5, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    assert structure.num_generators == 6 + 6 + 4
    assert [t.sign for t in structure.params["1.gamma"].terms] == [1, -1]
    assert [t.sign for t in structure.params["0.weight"].terms] == [1]
    before = model(x)
    gaugefix.random_gauge_(model, structure, 1.0)
    assert float((model(x) - before).norm() / before.norm()) <= 1e-12


def test_a_producer_rule_through_ctx_module(registry):
    gaugefix.register_rule(ChannelScale, channel_scale_rule)
    model = _model()
    x = torch.randn(7, 5, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    assert structure.num_generators == 6 + 4
    assert [t.sign for t in structure.params["1.gamma"].terms] == [1]
    assert "0.weight" not in structure.params  # its rows feed the blocked input of the scale
    before = model(x)
    gaugefix.random_gauge_(model, structure, 1.0)
    assert float((model(x) - before).norm() / before.norm()) <= 1e-12
    gaugefix.balance_(model, structure)
    assert float((model(x) - before).norm() / before.norm()) <= 1e-12
