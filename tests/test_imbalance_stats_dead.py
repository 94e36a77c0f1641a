"""``imbalance_stats`` of float32 models with dead neurons (a generator with an all-zero side):
their float32 statistics are always redone in float64, so after a call that finds one the next
call on the structure sums in float64 first and stops there while such a side remains, one pass
over the parameters instead of two. The results are those of the two passes, bit for bit."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gaugefix as gf
import gaugefix.moment as moment
from gaugefix import zoo
from gaugefix.kernels import generator_sums
from gaugefix.moment import (
    FLOAT32_SUM_FLOOR,
    STAT_NAMES,
    accumulation_dtype,
    local_params,
    out_of_float32_range,
    stats_from_sums,
)

SIZES = ((3, 4, 2), (5, 8, 6, 3))
TINY, HUGE = 1e-25, 1e20  # squares below float32's smallest subnormal, above its largest number
KINDS = ("dead_in", "dead_out", "tiny", "huge", "nan")


@torch.no_grad()
def reference_stats(source, structure) -> dict[str, float]:
    """``imbalance_stats`` as it was before the float64-first shortcut: the float32 statistics,
    redone in float64 when out of float32's range."""
    bound = local_params(source, structure)
    if bound is None:
        return dict.fromkeys(STAT_NAMES, 0.0)
    params, local = bound
    dtype = accumulation_dtype(params)
    floor = FLOAT32_SUM_FLOOR if dtype == torch.float32 else 0.0
    values = stats_from_sums(*generator_sums(params, local, dtype), floor).tolist()
    if dtype == torch.float32 and out_of_float32_range(values, structure.num_generators):
        values = stats_from_sums(*generator_sums(params, local, torch.float64)).tolist()
    return dict(zip(STAT_NAMES, values, strict=True))


def bits(stats: dict[str, float]) -> list[str]:
    """The statistics as exact hexadecimal floats (NaN equal to NaN)."""
    return [float.hex(stats[k]) for k in STAT_NAMES]


@functools.cache
def mlp32(sizes: tuple[int, ...]) -> tuple[nn.Sequential, gf.GaugeStructure]:
    """A float32 ReLU MLP off balance (a random gauge) and its structure, shared by the examples
    so that the structure carries the previous example's state into the next."""
    torch.manual_seed(0)
    model = zoo.mlp(sizes).float()
    s = gf.discover(model, torch.randn(1, sizes[0]))
    gf.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(1))
    return model, s


@torch.no_grad()
def edited(model: nn.Sequential, edits: list[tuple[int, int, str]]) -> nn.Sequential:
    """A copy of ``model`` with hidden neuron ``n`` of hidden layer ``layer`` given, per edit,
    all-zero incoming (``dead_in``) or outgoing (``dead_out``) weights, incoming weights scaled
    by ``TINY`` or ``HUGE``, or one NaN incoming weight."""
    model = copy.deepcopy(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer, n, kind in edits:
        into, out = linears[layer % (len(linears) - 1)], linears[layer % (len(linears) - 1) + 1]
        n %= into.out_features
        if kind == "dead_in":
            into.weight[n] = into.bias[n] = 0
        elif kind == "dead_out":
            out.weight[:, n] = 0
        elif kind == "nan":
            into.weight[n, 0] = float("nan")
        else:
            into.weight[n] *= TINY if kind == "tiny" else HUGE
            into.bias[n] *= TINY if kind == "tiny" else HUGE
    return model


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.sampled_from(SIZES),
    edits=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 7), st.sampled_from(KINDS)), max_size=4
    ),
    scale=st.sampled_from([1.0, 1.0, TINY, HUGE]),
)
def test_the_statistics_are_the_two_pass_ones_bit_for_bit(sizes, edits, scale):
    """Float32 MLPs with dead, tiny, huge and NaN neurons (the whole model scaled at times):
    two calls in a row, after whatever the previous example left on the shared structure,
    give the two-pass statistics bit for bit."""
    base, s = mlp32(sizes)
    model = edited(base, edits)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    expected = bits(reference_stats(model, s))
    assert bits(gf.imbalance_stats(model, s)) == expected
    assert bits(gf.imbalance_stats(model, s)) == expected


@pytest.fixture
def passes(monkeypatch) -> list[torch.dtype]:
    """The dtype of every pass over the parameters (``generator_sums`` call) of
    ``imbalance_stats``, in order."""
    seen: list[torch.dtype] = []

    def counted(params, structure, dtype, *args):
        seen.append(dtype)
        return generator_sums(params, structure, dtype, *args)

    monkeypatch.setattr(moment, "generator_sums", counted)
    return seen


def fresh_structure(sizes: tuple[int, ...]) -> tuple[nn.Sequential, gf.GaugeStructure]:
    """The shared model and a structure discovered anew, with no state from other tests."""
    base, _ = mlp32(sizes)
    return base, gf.discover(base, torch.randn(1, sizes[0]))


def test_a_dead_neuron_costs_one_float64_pass_from_the_second_call(passes):
    """The passes of successive calls: a healthy model one float32 pass; a dead neuron two
    passes, then one in float64 per call while it stays dead; revived, one float64 pass that
    finds no dead side before the float32 one, then one float32 pass again. The statistics stay
    the two-pass ones throughout."""
    base, s = fresh_structure((5, 8, 3))
    dead = edited(base, [(0, 2, "dead_in")])
    f32, f64 = torch.float32, torch.float64
    for model, expected in [
        (base, [f32]),
        (dead, [f32, f64]),
        (dead, [f64]),
        (dead, [f64]),
        (base, [f64, f32]),
        (base, [f32]),
    ]:
        passes.clear()
        stats = gf.imbalance_stats(model, s)
        assert passes == expected
        assert bits(stats) == bits(reference_stats(model, s))


def test_tiny_entries_without_a_dead_side_keep_two_passes(passes):
    """A neuron whose float32 squares underflow to 0 (counted dead in float32 only) has no
    all-zero side: every call takes the float32 pass, then the float64 one."""
    base, s = fresh_structure((5, 8, 3))
    tiny = edited(base, [(0, 2, "tiny")])
    for _ in range(3):
        passes.clear()
        stats = gf.imbalance_stats(tiny, s)
        assert passes == [torch.float32, torch.float64]
        assert bits(stats) == bits(reference_stats(tiny, s))


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "restrict", "save"])
def test_copies_of_a_structure_carry_no_float64_first_state(passes, how, tmp_path):
    """Whether to sum in float64 first is a cache of the last call on one structure: a copy
    (pickled, deep-copied, restricted, saved and loaded) holds none of it, its first call takes
    both passes, and every call gives the two-pass statistics bit for bit."""
    base, s = fresh_structure((5, 8, 3))
    dead = edited(base, [(0, 2, "dead_in")])
    expected = bits(reference_stats(dead, s))
    assert bits(gf.imbalance_stats(dead, s)) == expected  # the state is set: float64 next
    if how == "pickle":
        other = pickle.loads(pickle.dumps(s))
    elif how == "deepcopy":
        other = copy.deepcopy(s)
    elif how == "restrict":
        other = s.restrict(torch.ones(s.num_generators, dtype=torch.bool), "kept")
    else:
        s.save(tmp_path / "s.json")
        other = gf.GaugeStructure.load(tmp_path / "s.json")
    assert not [k for k, v in vars(other).items() if "float64" in k and v]
    for structure, taken in [(s, [torch.float64]), (other, [torch.float32, torch.float64])]:
        passes.clear()
        assert bits(gf.imbalance_stats(dead, structure)) == expected
        assert passes == taken


def test_float64_models_take_one_pass_and_keep_their_statistics(passes):
    """A float64 model with dead neurons: one float64 pass per call, before and after a pickle
    round trip, with the same statistics bit for bit."""
    base, s = fresh_structure((5, 8, 3))
    dead = edited(base, [(0, 2, "dead_in"), (0, 5, "dead_out")]).double()
    expected = bits(reference_stats(dead, s))
    for structure in (s, s, pickle.loads(pickle.dumps(s))):
        passes.clear()
        assert bits(gf.imbalance_stats(dead, structure)) == expected
        assert passes == [torch.float64]
