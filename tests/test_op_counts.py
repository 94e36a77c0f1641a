"""What gauge fixing adds to a training step, counted rather than timed (``benchmarks/opcount.py``):
the aten operations dispatched (on a GPU, each but a view about one kernel launch) and the host
reads (each drains a GPU's queue), in the kernels' GPU layout taken on CPU tensors
(``gpu_layout_on_cpu``; on the CPU the squared sums are taken parameter by parameter instead).
An orbit step or a penalty gradient adds a number of operations that does not grow with depth
(several times the nine kernels of AdamW's own ``foreach`` step, at most :data:`ADDED_OPS` that
launch one and :data:`ADDED_VIEWS` views: ``make bench`` item 8 reports it) and at most one
host read; ``imbalance_stats`` dispatches the same operations at any depth, at most 50, with
one host read."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.opcount import (  # noqa: E402
    MARKS,
    TOKENS,
    VIEW_OPS,
    OpCounter,
    counted_step,
    gpu_layout_on_cpu,
)

VOCAB = 64


def zoo_gpt(layers: int) -> nn.Module:
    return zoo.GPT(VOCAB, 32, 4, layers, 64, TOKENS)


def hf_gpt2(layers: int) -> nn.Module:
    """GPT-2's architecture (Hugging Face), ReLU MLP, random weights, small width."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=TOKENS, n_embd=32, n_layer=layers, n_head=4,
        activation_function="relu",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


@functools.cache
def discovered(build, layers: int) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = build(layers).train()
    return model, gaugefix.discover(model, torch.randint(0, VOCAB, (1, TOKENS)))


@functools.cache
def step_counts(build, layers: int, mode: str | None) -> OpCounter:
    return counted_step(*discovered(build, layers), VOCAB, mode)


# The most operations a step of GaugeFixing adds at 2 and 12 layers of either model here: those
# that launch a kernel on a GPU, and the views (no launch) apart (an exact orbit step 68 and 22,
# a penalty gradient 39 and 22, before the orbit step took S_in and S_out as one view).
ADDED_OPS = {"exact": 66, "penalty": 39}
ADDED_VIEWS = {"exact": 25, "penalty": 22}


@pytest.mark.parametrize("build", [zoo_gpt, hf_gpt2], ids=["zoo.GPT", "GPT-2"])
@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_gauge_fixing_adds_a_fixed_number_of_operations(build, mode):
    """At 2 and 12 layers of one width: the launching operations a step of GaugeFixing adds are
    the same (within 10%), at most :data:`ADDED_OPS`, its views at most :data:`ADDED_VIEWS`,
    with at most one host read."""
    added, views, reads = {}, {}, {}
    for layers in (2, 12):
        plain, fixed = step_counts(build, layers, None), step_counts(build, layers, mode)
        added[layers] = fixed.launching - plain.launching
        views[layers] = fixed.views - plain.views
        reads[layers] = fixed.host_reads - plain.host_reads
        assert fixed.launching + fixed.views + len(MARKS) == fixed.total
    assert abs(added[12] - added[2]) <= 0.1 * added[2], added
    assert max(added.values()) <= ADDED_OPS[mode], added
    assert max(views.values()) <= ADDED_VIEWS[mode], views
    assert max(reads.values()) <= 1, reads


def _aliases_only(name: str) -> bool:
    """Whether every overload of the aten operation ``name`` (``"aten.view"``) on a tensor
    returns views of it per its schema (``Tensor(a)``, not written) or changes its metadata in
    place (overloads on lists and strings, ``aten.split.str``, left out)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten."))
    funcs = [getattr(packet, overload) for overload in packet.overloads()]
    funcs = [f for f in funcs if str(f._schema.arguments[0].type) == "Tensor"]
    return bool(funcs) and all(
        torch.Tag.inplace_view in f.tags
        or f._schema.returns
        and all(r.alias_info is not None and not r.alias_info.is_write for r in f._schema.returns)
        for f in funcs
    )


def test_views_are_the_operations_that_alias_their_input():
    """:data:`VIEW_OPS` holds operations that make views (by their schemas; ``_unsafe_view``,
    ``reshape``'s view of a fresh tensor, declares none), and every operation a counted step
    dispatches that returns only views of its input is in it: none is counted as a launch."""
    assert all(_aliases_only(name) for name in VIEW_OPS - {"aten._unsafe_view"})
    seen = set()
    for build in (zoo_gpt, hf_gpt2):
        for mode in (None, "exact", "penalty"):
            seen |= set(step_counts(build, 2, mode).ops) - {"Tensor.tolist"}
    assert {name for name in seen if not name.startswith("aten.")} <= MARKS
    seen -= MARKS
    assert {name for name in seen if _aliases_only(name)} <= VIEW_OPS
    assert {"aten.view", "aten.split_with_sizes", "aten.unbind"} <= seen & VIEW_OPS
    assert "aten._foreach_mul_" in seen - VIEW_OPS


STATS_OPS = 50  # issue 23: imbalance_stats in at most 50 aten operations whatever the depth


@pytest.mark.parametrize("build", [zoo_gpt, hf_gpt2], ids=["zoo.GPT", "GPT-2"])
def test_imbalance_stats_operations_do_not_grow_with_depth(build):
    """imbalance_stats: the same operations at 2 and 12 layers, at most 50, and one host read
    (its batched ``tolist``); imbalance_stats_tensor the same operations and none."""
    counts = {}
    for layers in (2, 12):
        model, structure = discovered(build, layers)
        gaugefix.imbalance_stats(model, structure)  # the plan is built once per structure
        counter, on_device = OpCounter(), OpCounter()
        with gpu_layout_on_cpu():
            with counter:
                gaugefix.imbalance_stats(model, structure)
            with on_device:
                stats = gaugefix.imbalance_stats_tensor(model, structure)
        counts[layers] = counter.total
        assert counter.host_reads == 1
        assert on_device.host_reads == 0 and on_device.total == counter.total
        assert stats.shape == (len(gaugefix.moment.STAT_NAMES),)
    assert counts[2] == counts[12] <= STATS_OPS, counts
