"""What gauge fixing adds to a training step, counted rather than timed: the aten operations
dispatched (on a GPU, roughly the kernels launched) and the host reads (each drains a GPU's
queue). Counted on the CPU with a ``TorchDispatchMode``; ``Tensor.tolist`` does not dispatch, so
its calls are counted apart. An orbit step or a penalty gradient adds a number of operations that
does not grow with depth, at most the plain (non-fused) AdamW step's own, and at most one host
read."""

from __future__ import annotations

import collections
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gaugefix
from gaugefix import zoo

HOST_READS = ("aten._local_scalar_dense",)
VOCAB, CONTEXT = 64, 16


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name, and ``Tensor.tolist`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> OpCounter:
        self._tolist = torch.Tensor.tolist
        counter, tolist = self.ops, self._tolist

        def counted(t, *args, **kwargs):
            counter["Tensor.tolist"] += 1
            return tolist(t, *args, **kwargs)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for name, n in self.ops.items() if name != "Tensor.tolist")

    @property
    def host_reads(self) -> int:
        return sum(self.ops[name] for name in (*HOST_READS, "Tensor.tolist"))


def zoo_gpt(layers: int) -> nn.Module:
    return zoo.GPT(VOCAB, 32, 4, layers, 64, CONTEXT)


def hf_gpt2(layers: int) -> nn.Module:
    """GPT-2's architecture (Hugging Face), ReLU MLP, random weights, small width."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=layers, n_head=4,
        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@functools.cache
def discovered(build, layers: int) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = build(layers)
    return model, gaugefix.discover(model, torch.randint(0, VOCAB, (1, CONTEXT)))


@functools.cache
def counted_step(build, layers: int, mode: str | None) -> OpCounter:
    """The operations of the second ``optimizer.step()`` of AdamW (its state exists), with
    ``GaugeFixing`` in ``mode`` acting at every step (or none)."""
    model, structure = discovered(build, layers)
    model = copy.deepcopy(model)
    x = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    if mode is not None:
        gaugefix.GaugeFixing(opt, model, structure, 0.1, mode, balance_at_start=False, every=1)
    for _ in range(2):
        opt.zero_grad()
        out = logits(model, x)
        F.cross_entropy(out.reshape(-1, VOCAB), x.reshape(-1)).backward()
        counter = OpCounter()
        with counter:
            opt.step()
    return counter


@pytest.mark.parametrize("build", [zoo_gpt, hf_gpt2], ids=["zoo.GPT", "GPT-2"])
@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_gauge_fixing_adds_a_fixed_number_of_operations(build, mode):
    """At 2 and 12 layers of one width: the operations a step of GaugeFixing adds are the same
    (within 10%), at most the plain AdamW step's own at 12 layers, with at most one host read."""
    added, reads = {}, {}
    for layers in (2, 12):
        plain = counted_step(build, layers, None)
        fixed = counted_step(build, layers, mode)
        added[layers] = fixed.total - plain.total
        reads[layers] = fixed.host_reads - plain.host_reads
        if layers == 12:
            assert added[layers] <= plain.total, (added, plain.total)
    assert abs(added[12] - added[2]) <= 0.1 * added[2], added
    assert max(reads.values()) <= 1, reads


@pytest.mark.parametrize("build", [zoo_gpt, hf_gpt2], ids=["zoo.GPT", "GPT-2"])
def test_imbalance_stats_operations_do_not_grow_with_depth(build):
    """imbalance_stats: the same operations at 2 and 12 layers, and one host read."""
    counts = {}
    for layers in (2, 12):
        model, structure = discovered(build, layers)
        gaugefix.imbalance_stats(model, structure)  # the plan is built once per structure
        counter = OpCounter()
        with counter:
            gaugefix.imbalance_stats(model, structure)
        counts[layers] = counter.total
        assert counter.host_reads == 1
    assert counts[2] == counts[12], counts
