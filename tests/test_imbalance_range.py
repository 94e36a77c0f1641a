"""``imbalance_stats`` of float32 models outside float32's range: the float32 sums are redone in
float64 when their statistics show a dead or non-finite generator, an infinite or NaN statistic,
or a sum, quotient or ``mu_norm`` too small for float32 (squares that underflow or round to
subnormals); every other model keeps the float32 result of ``imbalance_stats_tensor``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugefix as gf
from gaugefix import zoo
from gaugefix.moment import STAT_NAMES

FLOAT32_ROUNDING = 1e-6  # relative, a few float32 units in the last place
COUNTS = ("dead_count", "nonfinite_count")


def mlp32(sizes: tuple[int, ...] = (3, 4, 2)) -> tuple[nn.Sequential, gf.GaugeStructure]:
    """A float32 ReLU MLP off balance (a random gauge)."""
    torch.manual_seed(0)
    model = zoo.mlp(sizes).float()
    s = gf.discover(model, torch.randn(1, sizes[0]))
    gf.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
    return model, s


def scaled(model: nn.Module, scale: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def assert_float64_statistics(model: nn.Module, s: gf.GaugeStructure) -> dict[str, float]:
    """The statistics of a float32 model are those of its float64 copy, to float32 rounding."""
    stats = gf.imbalance_stats(model, s)
    wide = gf.imbalance_stats(copy.deepcopy(model).double(), s)
    assert all(stats[k] == wide[k] for k in COUNTS), (stats, wide)
    for k in STAT_NAMES:
        assert abs(stats[k] - wide[k]) <= FLOAT32_ROUNDING * abs(wide[k]), (k, stats, wide)
    return stats


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_entries_whose_squares_underflow_or_overflow_float32(scale):
    """Every square below float32's smallest subnormal (counted dead in float32) or above its
    largest number (counted non-finite)."""
    model, s = mlp32()
    stats = assert_float64_statistics(scaled(model, scale), s)
    assert stats["dead_count"] == stats["nonfinite_count"] == 0


@pytest.mark.parametrize("scale", [1e-20, 1e-22])
def test_sides_summing_to_subnormals(scale):
    """Squares that round to subnormals (not all to 0, so nothing counts dead in float32):
    ``mu_rel`` divided subnormal sums, off by 2e-6 at 1e-20 and far more at 1e-22."""
    model, s = mlp32()
    assert_float64_statistics(scaled(model, scale), s)


def test_one_neuron_with_tiny_incoming_weights():
    """A healthy model but for one neuron whose incoming weights are ``1e-21``: its incoming
    side is subnormal in float32 and the quotient ``S_in / S_out`` underflows float32's normal
    range, so its log-ratio (the model's ``log_ratio_max``) lost precision."""
    model, s = mlp32((5, 8, 3))
    with torch.no_grad():
        model[0].weight[2].mul_(1e-21)
        model[0].bias[2].mul_(1e-21)
    assert_float64_statistics(model, s)


def test_quotient_below_float32_normal_range_with_normal_sums():
    """Both sides of one neuron normal in float32 (``1e-30`` and ``1e14``) but their quotient
    subnormal: its log-ratio came from a subnormal's few bits."""
    model, s = mlp32((5, 8, 3))
    with torch.no_grad():
        model[0].weight[2].fill_(1e-15 / 6**0.5)
        model[0].bias[2].fill_(1e-15 / 6**0.5)
        model[2].weight[:, 2].fill_(1e7 / 3**0.5)
    assert_float64_statistics(model, s)


def test_mu_norm_whose_squares_underflow():
    """Entries ``1e-13``: sums ``~1e-26``, normal, but every ``mu_n`` (``~1e-27``) squares below
    float32's range, so the float32 ``mu_norm`` was 0."""
    model, s = mlp32()
    assert_float64_statistics(scaled(model, 1e-13), s)


def test_healthy_float32_model_keeps_the_float32_statistics():
    """No flag: ``imbalance_stats`` is exactly the float32 ``imbalance_stats_tensor``."""
    model, s = mlp32((5, 8, 3))
    stats = gf.imbalance_stats(model, s)
    on_device = gf.imbalance_stats_tensor(model, s)
    assert on_device.dtype == torch.float32
    assert list(stats.values()) == on_device.tolist()


def test_truly_dead_neurons_give_the_float32_result_to_its_rounding():
    """Two neurons with all incoming weights 0: the same dead count as the float32 statistics of
    ``imbalance_stats_tensor`` (what ``imbalance_stats`` returned before), and the same
    statistics to float32 rounding (now float64's)."""
    model, s = mlp32((5, 8, 3))
    with torch.no_grad():
        model[0].weight[[1, 6]] = 0
        model[0].bias[[1, 6]] = 0
    stats = assert_float64_statistics(model, s)
    before = dict(zip(STAT_NAMES, gf.imbalance_stats_tensor(model, s).tolist(), strict=True))
    assert stats["dead_count"] == before["dead_count"] == 2
    for k in STAT_NAMES:
        assert abs(stats[k] - before[k]) <= FLOAT32_ROUNDING * abs(before[k]), (k, stats, before)


def test_non_finite_entry_still_counted():
    """A NaN entry: float64 does not cure it; the count and the NaN ratios stay."""
    model, s = mlp32((5, 8, 3))
    with torch.no_grad():
        model[0].weight[3, 0] = float("nan")
    stats = gf.imbalance_stats(model, s)
    assert stats["nonfinite_count"] == 1
    assert stats["mu_rel_max"] != stats["mu_rel_max"]  # NaN
