"""The GPU layout's squared sums of a group whose every term sums its squares over trailing dims
(a row of a matrix, each row a generator's): one norm per group, and the squares of all those
norms, with those of the gains and biases, in one ``torch._foreach_mul`` (an operation less per
such group on a GPU). Run on the CPU in float64 against the per-neuron definitions, with every
trailing run taking the norm (a short run of 2), and counted with a dispatch-mode counter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugefix
from architectures import DTYPE, any_case
from gaugefix import kernels
from test_kernels import assert_close, assert_sums_of_definition, random_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.opcount import OpCounter, gpu_layout_on_cpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = 16
WIDTH = 64  # GPT-2's rows: a run of kernels.SHORT_RUN entries, summed by a norm


@settings(max_examples=40, deadline=None)
@given(case=any_case, copies=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_sums_from_row_norms_match_the_definition(case, copies, seed):
    """In the GPU layout with every trailing run of 2 or more entries summed by a norm,
    ``S_in``, ``S_out`` and ``||theta||^2`` of one model or of a stack of ``copies`` equal the
    generator-by-generator sums to 1e-12."""
    s, stack, tensors = random_parameters(case, copies, seed)
    with pytest.MonkeyPatch.context() as patch, gpu_layout_on_cpu():
        patch.setattr(kernels, "SHORT_RUN", 2)
        sums = kernels.generator_sums(tensors, s, DTYPE, batch_dims=int(copies > 0))
    assert_sums_of_definition(s, stack, copies, sums)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norms_are_squared_in_the_one_foreach_call(dtype):
    """GPT-2 (Hugging Face, width 64): the squared sums in the GPU layout take one
    ``torch._foreach_mul`` and square no stack that a norm sums (each stacked group either
    squares its stack, one ``pow_``, or takes one norm), and equal the CPU layout's to 1e-12
    in float64."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=TOKENS, n_embd=WIDTH, n_layer=2, n_head=1,
        activation_function="relu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    s = gaugefix.discover(model, torch.randint(0, 64, (1, TOKENS)))
    params = {k: v.detach() for k, v in s.bind(model).items()}
    cpu = kernels.generator_sums(params, s, dtype)
    counter = OpCounter()
    with gpu_layout_on_cpu(), counter:
        gpu = kernels.generator_sums(params, s, dtype)
    norms = counter.ops["aten.linalg_vector_norm"]
    assert norms > 0 and counter.ops["aten._foreach_mul"] == 1, counter.ops
    assert counter.ops["aten.pow_"] == counter.ops["aten.stack"] - norms, counter.ops
    if dtype == torch.float64:
        for got, want, what in zip(gpu, cpu, ("S_in", "S_out", "||theta||^2"), strict=True):
            assert_close(got, want, 1e-12, what)
