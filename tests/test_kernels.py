"""The kernels' two layouts (``gaugefix.kernels.gpu_layout``): on the CPU the squared sums are
taken parameter by parameter (a large parameter's squares a block of rows at a time) and each
term's factor is broadcast; on a GPU the sums come from stacks of equally shaped parameters and
one dense factor per parameter. Both are run here on the CPU, in float64, against the
per-neuron definitions of the sums and the action and the closed form of the penalty's
gradient."""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gaugefix
from architectures import (
    DTYPE,
    any_case,
    entries,
    reference_action,
    reference_imbalance,
    reference_sides,
)
from gaugefix import kernels
from gaugefix.kernels import add_selection_grads_
from gaugefix.soft import add_orbit_selection_grad_

pytestmark = pytest.mark.usefixtures("single_thread")

STRENGTH = 0.3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rel * float(expected.abs().max() if expected.numel() else 0.0), (what, err)


# The layouts: (GPU layout, entries per block of rows on the CPU, the short run). Blocks of 7
# entries split every generated parameter of more than 7 entries into blocks of rows, and a short
# run of 2 leaves every factor broadcast (so that blocks of rows apply to the action too).
LAYOUTS = {
    "gpu": (True, kernels.CHUNK, kernels.SHORT_RUN),
    "cpu": (False, kernels.CHUNK, kernels.SHORT_RUN),
    "cpu, blocks of 7": (False, 7, 2),
}


def patched(patch: pytest.MonkeyPatch, layout: str) -> None:
    gpu, chunk, short = LAYOUTS[layout]
    patch.setattr(kernels, "gpu_layout", lambda device: gpu)
    patch.setattr(kernels, "CHUNK", chunk)
    patch.setattr(kernels, "SHORT_RUN", short)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=40, deadline=None)
@given(case=any_case, copies=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_generator_sums_in_either_layout_match_the_definition(layout, case, copies, seed):
    """``S_in``, ``S_out`` and ``||theta||^2`` of ``generator_sums``, of one model or of a stack
    of ``copies`` (``batch_dims=1``), equal the generator-by-generator sums to 1e-12."""
    s, stack, tensors = random_parameters(case, copies, seed)
    with pytest.MonkeyPatch.context() as patch:
        patched(patch, layout)
        sums = kernels.generator_sums(tensors, s, DTYPE, batch_dims=int(copies > 0))
    assert_sums_of_definition(s, stack, copies, sums)


def random_parameters(case, copies: int, seed: int) -> tuple:
    """``case``'s structure (one generator at least), a stack of ``max(copies, 1)`` random
    float64 copies of its parameters, and the parameters given to the kernels (the stack, or
    its one copy where ``copies == 0``)."""
    s = gaugefix.discover(case.model, *case.inputs)
    assume(s.num_generators > 0)
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in s.bind(case.model).items()}
    stack = {k: torch.randn(max(copies, 1), *shape, generator=gen, dtype=DTYPE)
             for k, shape in shapes.items()}  # fmt: skip
    return s, stack, stack if copies else {k: v[0] for k, v in stack.items()}


def assert_sums_of_definition(s, stack: dict, copies: int, sums: tuple) -> None:
    """``sums`` (``S_in``, ``S_out``, ``||theta||^2``, per copy where ``copies``) equal the
    generator-by-generator sums of each copy in ``stack`` to 1e-12."""
    for r in range(max(copies, 1)):
        copy_r = {k: v[r] for k, v in stack.items()}
        want_in, want_out = reference_sides(s, copy_r)
        want_norm = sum(v.square().sum() for v in copy_r.values())
        got = [x[r] if copies else x for x in sums]
        assert_close(got[0], want_in, 1e-12, "S_in")
        assert_close(got[1], want_out, 1e-12, "S_out")
        assert_close(got[2], want_norm, 1e-12, "||theta||^2")


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=40, deadline=None)
@given(case=any_case, seed=st.integers(0, 2**16))
def test_action_in_either_layout_matches_the_definition(layout, case, seed):
    """Parameters (power 1), gradients (power -1) and a second moment (power -2) moved by
    ``rescale_`` equal the generator-by-generator action to 1e-13."""
    s = gaugefix.discover(case.model, *case.inputs)
    assume(s.num_generators > 0)
    h = torch.randn(s.num_generators, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    params = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    grads = {k: torch.rand_like(v) + 0.5 for k, v in params.items()}
    moments = {k: torch.rand_like(v) + 0.5 for k, v in params.items()}
    expected = copy.deepcopy((params, grads, moments))
    reference_action(s, expected[0], h)
    reference_action(s, expected[1], -h)
    reference_action(s, expected[2], -2 * h)
    targets = {k: [(params[k], 1), (grads[k], -1), (moments[k], -2)] for k in s.bind(params)}
    with pytest.MonkeyPatch.context() as patch:
        patched(patch, layout)
        kernels.rescale_(targets, s, h)
    for got, want in zip((params, grads, moments), expected, strict=True):
        for name in got:
            assert_close(got[name], want[name], 1e-13, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=25, deadline=None)
@given(case=any_case, seed=st.integers(0, 2**16))
def test_stacked_copies_move_as_each_copy_alone(layout, case, seed):
    """A stack of 3 copies (``batch_dims=1``): ``rescale_`` moves copy ``b`` (parameters,
    gradients, second moments) by ``h[b]``, and ``add_selection_grads_`` adds the penalty
    gradient of copy ``b`` for coefficients ``c[b]``, as the generator-by-generator
    definitions, to 1e-13."""
    s = gaugefix.discover(case.model, *case.inputs)
    assume(s.num_generators > 0)
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in s.bind(case.model).items()}
    powers = (1, -1, -2)  # parameters, gradients, second moments
    stacks = [
        {k: torch.rand(3, *shape, generator=gen, dtype=DTYPE) + 0.5 for k, shape in shapes.items()}
        for _ in powers
    ]
    h, c = torch.randn(2, 3, s.num_generators, generator=gen, dtype=DTYPE)
    expected = copy.deepcopy(stacks)
    grads_expected = {}
    for b in range(3):
        for stack, power in zip(expected, powers, strict=True):
            reference_action(s, {k: v[b] for k, v in stack.items()}, power * h[b])
        copy_b = {k: v[b] for k, v in stacks[0].items()}
        grads_expected[b] = reference_penalty_grad(s, copy_b, c[b])
    grads = {k: torch.zeros_like(v) for k, v in stacks[0].items()}
    with pytest.MonkeyPatch.context() as patch:
        patched(patch, layout)
        add_selection_grads_(grads, stacks[0], s, c, batch_dims=1)
        targets = {k: [(x[k], p) for x, p in zip(stacks, powers, strict=True)] for k in shapes}
        kernels.rescale_(targets, s, h, batch_dims=1)
    for got, want in zip(stacks, expected, strict=True):
        for name in got:
            assert_close(got[name], want[name], 1e-13, name)
    for b in range(3):
        for name, want in grads_expected[b].items():
            assert_close(grads[name][b], want, 1e-13, name)


def reference_penalty_grad(
    s: gaugefix.GaugeStructure, params: dict[str, torch.Tensor], mu: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``(sum_n w_n(e) mu_n) theta_e`` for every entry, generator by generator."""
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(s.num_generators):
        slices = s.generator(n)
        for name, idx in slices.incoming:
            out[name][entries(idx)] += mu[n] * params[name][entries(idx)]
        for name, idx in slices.outgoing:
            out[name][entries(idx)] -= mu[n] * params[name][entries(idx)]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=40, deadline=None)
@given(case=any_case)
def test_penalty_gradient_in_either_layout_matches_the_closed_form(layout, case):
    """``grad += strength (sum_n w_n(e) mu_n) theta_e`` for every entry, to 1e-12."""
    s = gaugefix.discover(case.model, *case.inputs)
    assume(s.num_generators > 0)
    params = s.bind(case.model)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    mu = reference_imbalance(s, {k: v.detach() for k, v in params.items()})
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(s.num_generators):  # d/dtheta of (strength / 4) mu_n^2, term by term
        slices = s.generator(n)
        for name, idx in slices.incoming:
            expected[name][entries(idx)] += STRENGTH * mu[n] * params[name].detach()[entries(idx)]
        for name, idx in slices.outgoing:
            expected[name][entries(idx)] -= STRENGTH * mu[n] * params[name].detach()[entries(idx)]
    with pytest.MonkeyPatch.context() as patch:
        patched(patch, layout)
        assert add_orbit_selection_grad_(params, s, STRENGTH, torch.tensor(True))
    for name, p in params.items():
        assert_close(p.grad, expected[name], 1e-12, name)


@settings(max_examples=50, deadline=None)
@given(
    exponent=st.integers(-300, 300),
    values=st.lists(st.floats(-1.0, 1.0).filter(lambda x: x == 0 or abs(x) >= 1e-3), max_size=6),
)
def test_row_norms_are_norms_at_any_scale(exponent, values):
    """``row_norms`` of ``10^k v`` is ``10^k ||v||`` for any normal float64 ``10^k v``, where the
    plain 2-norm squares the entries (0 below about ``1e-154``, inf above ``1e154``); 0 for an
    empty or all-zero row."""
    v = torch.tensor([values, [0.0] * len(values)], dtype=DTYPE).reshape(2, len(values))
    scale = 10.0**exponent
    norms = kernels.row_norms(v * scale)
    assert float(norms[1]) == 0.0
    expected = float(torch.linalg.vector_norm(v[0])) * scale
    assert float(norms[0]) == pytest.approx(expected, rel=1e-14, abs=0)


def test_factor_batches_take_one_foreach_call_per_pass_within_the_largest_group():
    """The groups fall into batches (each group in one) holding at most as many entries as
    the largest group, fewer batches than groups on a GPT; in the GPU layout the action moves
    parameters (power 1), gradients (-1) and a second moment (-2) with one
    ``torch._foreach_mul_`` and two ``torch._foreach_div_`` calls per batch."""
    torch.manual_seed(0)
    model = gaugefix.zoo.GPT(64, 32, 4, 3, 64, 16).double()
    s = gaugefix.discover(model, torch.randint(0, 64, (1, 16)))
    plan = kernels.kernel_plan(s, "cpu")
    sizes = [len(g.names) * math.prod(g.shape) for g in plan.groups]
    assert sorted(g for batch in plan.batches for g in batch) == list(range(len(plan.groups)))
    assert max(sum(sizes[g] for g in batch) for batch in plan.batches) == max(sizes)
    assert len(plan.batches) < len(plan.groups)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    targets = {k: [(p, 1), (p.clone(), -1), (p.clone(), -2)] for k, p in s.bind(params).items()}
    calls = collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        patched(patch, "gpu")
        for name in ("_foreach_mul_", "_foreach_div_"):
            op = getattr(torch, name)
            counted = lambda *a, op=op, name=name: (calls.update([name]), op(*a))  # noqa: E731
            patch.setattr(torch, name, counted)
        kernels.rescale_(targets, s, torch.randn(s.num_generators, dtype=DTYPE))
    n = len(plan.batches)
    assert calls == {"_foreach_mul_": n, "_foreach_div_": 2 * n}
