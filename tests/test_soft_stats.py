"""imbalance_stats: cheap logging statistics of the imbalance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import imbalance_stats, zoo

KEYS = {"mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "mu_norm", "norm_sq"}


def test_values_match_definitions():
    """A 3-4-2 net, where S_in,n = ||W1[n]||^2 + b1[n]^2 and S_out,n = ||W2[:, n]||^2."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 4, 2)).double()
    structure = gaugefix.discover(model, torch.randn(1, 3, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 1.0, generator=torch.Generator().manual_seed(0))
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    s_in = (w1.square().sum(1) + b1.square()).detach()
    s_out = w2.square().sum(0).detach()
    mu_rel = (s_in - s_out).abs() / (s_in + s_out)
    log_ratio = 0.5 * torch.log(s_in / s_out).abs()
    stats = imbalance_stats(model, structure)
    assert KEYS <= stats.keys() and all(type(v) is float for v in stats.values())
    assert stats["mu_rel_rms"] == pytest.approx(float(mu_rel.square().mean().sqrt()), rel=1e-12)
    assert stats["mu_rel_max"] == pytest.approx(float(mu_rel.max()), rel=1e-12)
    assert stats["log_ratio_rms"] == pytest.approx(
        float(log_ratio.square().mean().sqrt()), rel=1e-12
    )
    assert stats["log_ratio_max"] == pytest.approx(float(log_ratio.max()), rel=1e-12)
    assert stats["mu_norm"] == pytest.approx(float((s_in - s_out).norm()), rel=1e-12)
    norm_sq = float((w1.square().sum() + b1.square().sum() + w2.square().sum()).detach())
    assert stats["norm_sq"] == pytest.approx(norm_sq, rel=1e-12)  # the output bias is not gauged
    assert stats["dead_count"] == 0.0
    # (S_in - S_out) / (S_in + S_out) = tanh(0.5 log(S_in / S_out)), both maxima at one neuron
    assert stats["mu_rel_max"] == pytest.approx(math.tanh(stats["log_ratio_max"]), rel=1e-12)


def test_balanced_model_and_dead_neuron():
    torch.manual_seed(1)
    model = zoo.mlp((3, 4, 2)).double()
    structure = gaugefix.discover(model, torch.randn(1, 3, dtype=torch.float64))
    gaugefix.balance_(model, structure)
    stats = imbalance_stats(model, structure)
    assert stats["mu_rel_max"] <= 1e-9 and stats["log_ratio_max"] <= 1e-9
    with torch.no_grad():
        model[2].weight[:, 1] = 0.0  # neuron 1 consumes nothing: mu / S = 1, no log-ratio
    stats = imbalance_stats(model, structure)
    assert stats["dead_count"] == 1.0
    assert stats["mu_rel_max"] == pytest.approx(1.0)
    assert math.isfinite(stats["log_ratio_max"]) and stats["log_ratio_max"] <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_no_graph(dtype):
    model = zoo.cnn().to(dtype)
    structure = gaugefix.discover(model, torch.randn(1, 3, 16, 16, dtype=dtype))
    ref = zoo.cnn().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    stats, expected = imbalance_stats(model, structure), imbalance_stats(ref, structure)
    for k in KEYS:
        assert stats[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), k


def test_no_gauge_neurons_and_bad_structure():
    model = nn.Linear(3, 2)
    structure = gaugefix.discover(model, torch.randn(1, 3))
    assert imbalance_stats(model, structure)["mu_rel_max"] == 0.0
    other = gaugefix.discover(zoo.mlp(), torch.randn(1, 16))
    with pytest.raises(ValueError, match="does not match"):
        imbalance_stats(model, other)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weight_shows_in_the_statistics(bad):
    """Issue 18, item 11: a NaN (or inf) weight makes the statistics of its generators NaN and
    is counted in ``nonfinite_count``, never as a healthy or dead generator."""
    torch.manual_seed(1)
    model = zoo.mlp((3, 4, 2)).double()
    structure = gaugefix.discover(model, torch.randn(1, 3, dtype=torch.float64))
    assert imbalance_stats(model, structure)["nonfinite_count"] == 0.0
    with torch.no_grad():
        model[0].weight[2, 0] = bad  # an incoming entry of neuron 2
    stats = imbalance_stats(model, structure)
    assert stats["nonfinite_count"] == 1.0
    assert stats["dead_count"] == 0.0
    for key in ("mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "mu_norm"):
        assert not math.isfinite(stats[key]), key
