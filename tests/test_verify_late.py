"""``gaugefix.verify`` on forwards that stop repeating late, and what the model's hooks see.

A forward that changes for good after its first ``k`` calls (a counter in a hook's closure, a
schedule that enables dropout) while the bisection runs raises rather than blaming generators the
gauge does not move, whatever ``k``. Hooks see exactly the forwards the docstring counts: 3 for a
pass, ``5 + 4 m`` for one broken generator among ``2^m``, fewer than the bound for two. The model
(parameters, buffers, training flags) is the same bit for bit after verify, also in train mode with
BatchNorm and also when verify raises. The blind spots the docstring names are pinned.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import assert_same_bits, snapshot
from test_verify import Planted, trained
from test_verify_audit import MARGIN, WIDTH, Clamped, clamped_at, randn

pytestmark = pytest.mark.usefixtures("single_thread")
BROKEN = 3  # the clamped unit of the broken model
BROKEN_FORWARDS = 5 + 4 * math.ceil(math.log2(WIDTH))  # 17: one broken generator among 8
PASS_FORWARDS = 3
SHIFT = 1.0
DROPOUT = 0.5
MOVED = 1e-3  # a relative change far above verify's tolerance


def inputs() -> Tensor:
    return randn(3, 4, seed=3)


def broken(base: Clamped) -> Clamped:
    """``base`` with unit :data:`BROKEN` clamped from below just under its activations."""
    return clamped_at(base, BROKEN, "below", inputs(), 1.0 + MARGIN)


def counter(calls: list[int]):
    """A forward pre-hook or hook counting the forwards it sees in ``calls[0]``."""

    def count(module: nn.Module, *args: object) -> None:
        calls[0] += 1

    return count


def late(kind: str, after: int):
    """A forward hook that changes the output for good after ``after`` calls: ``"shift"`` adds
    :data:`SHIFT`, ``"dropout"`` turns dropout on (the same mask each forward)."""
    calls = [0]

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] <= after:
            return output
        if kind == "shift":
            return output + SHIFT
        return F.dropout(output, DROPOUT, training=True)

    return hook


# --- forwards that stop repeating late ------------------------------------------------------------
@pytest.mark.parametrize("after", [4, 6, 9, 12, 15, 16])
@pytest.mark.parametrize("kind", ["shift", "dropout"])
def test_a_forward_that_stops_repeating_during_the_bisection_raises(clamped, kind, after):
    """The forward repeats for its first ``after`` calls (the first, ``h``, ``-h`` and the check
    before the bisection among them) and changes from then on. Before, verify returned, for both
    kinds, all 8 generators (``after`` 4 and 6), 4 (9) and 2 (12) instead of unit 3 alone; at 15
    and 16 it returned unit 3 from forwards that a 17th would not repeat."""
    base, s = clamped
    model = broken(base)
    target = model if kind == "shift" else model.l1
    handle = target.register_forward_hook(late(kind, after))
    model.train()
    saved = snapshot(model)
    with pytest.raises(gaugefix.VerificationError, match="one after the bisection"):
        gaugefix.verify(model, s, inputs())
    assert_same_bits(model, saved)
    assert model.training and all(m.training for m in model.modules())
    handle.remove()


@pytest.mark.parametrize("after", [1, 2, 3])
def test_a_forward_that_stops_repeating_before_the_bisection_raises_before_it(clamped, after):
    base, s = clamped
    model = broken(base)
    model.register_forward_hook(late("shift", after))
    with pytest.raises(gaugefix.VerificationError, match="one before the bisection"):
        gaugefix.verify(model, s, inputs())


def test_a_forward_that_repeats_through_the_last_check_blames_exactly(clamped):
    base, s = clamped
    model = broken(base)
    model.register_forward_hook(late("shift", BROKEN_FORWARDS))
    result = gaugefix.verify(model, s, inputs())
    assert result.broken.tolist() == [n == BROKEN for n in range(WIDTH)]


def test_a_forward_that_changes_after_a_pass_is_not_seen_as_documented(clamped):
    """An exact structure passes on 3 forwards: a change from the 4th call on is not seen."""
    base, s = clamped
    model = copy.deepcopy(base)
    model.register_forward_hook(late("shift", PASS_FORWARDS))
    result = gaugefix.verify(model, s, inputs())
    assert result.ok and not result.broken.any()


@pytest.mark.parametrize("after", [None, 1])
def test_batchnorm_in_train_mode_is_left_bit_for_bit_whether_verify_passes_or_raises(after):
    """Each forward runs on a copy in the model's mode: the running statistics, the count of
    batches and every training flag are as on entry, after a pass and after a raise."""
    model, x = trained(), randn(5, 4)
    s = gaugefix.discover(model, x)
    calls = [0]
    model.register_forward_pre_hook(counter(calls))
    if after is not None:
        model.register_forward_hook(late("shift", after))
    saved, rng = snapshot(model), torch.get_rng_state()
    if after is None:
        assert gaugefix.verify(model, s, randn(3, 4)).ok
        assert calls[0] == PASS_FORWARDS
    else:
        with pytest.raises(gaugefix.VerificationError, match="two forwards without a gauge"):
            gaugefix.verify(model, s, randn(3, 4))
    assert_same_bits(model, saved)
    assert int(model[1].num_batches_tracked) == int(saved["1.num_batches_tracked"])
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


# --- what the hooks see ---------------------------------------------------------------------------
def test_hooks_see_3_forwards_for_a_pass_and_5_plus_4_log2_n_for_one_broken(clamped):
    base, s = clamped
    assert BROKEN_FORWARDS == 17
    for model, expected in ((copy.deepcopy(base), PASS_FORWARDS), (broken(base), BROKEN_FORWARDS)):
        pre, post = [0], [0]
        model.register_forward_pre_hook(counter(pre))
        model.register_forward_hook(counter(post))
        gaugefix.verify(model, s, inputs())
        assert pre[0] == post[0] == expected


@pytest.fixture(scope="module")
def planted_structure() -> gaugefix.GaugeStructure:
    return gaugefix.discover(Planted().double(), randn(5, 4))


@pytest.mark.parametrize(("wrong", "expected"), [((7,), 37), ((0, 255), 65), ((0, 1), 37)])
def test_hooks_see_exactly_the_forwards_the_bisection_costs(planted_structure, wrong, expected):
    """256 generators (``m = 8``): one broken, ``5 + 4 * 8``; two in different halves, the top
    split and two paths of 7 splits, ``5 + 4 + 2 * 4 * 7``, under the bound ``5 + 4 * 2 * 8``;
    two side by side share their path, ``5 + 4 * 8``."""
    n = planted_structure.num_generators
    torch.manual_seed(1)
    model = Planted(wrong).double()
    calls = [0]
    model.register_forward_pre_hook(counter(calls))
    result = gaugefix.verify(model, planted_structure, randn(4, 4, seed=4))
    assert result.broken.tolist() == [i in wrong for i in range(n)]
    assert calls[0] == expected <= 5 + 4 * len(wrong) * math.ceil(math.log2(n))


class Counts:
    """A hook object: copied with the model, so its count on the model stays 0."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1


def test_a_function_hook_sees_the_forwards_and_a_hook_object_is_copied_as_documented(clamped):
    base, s = clamped
    model = copy.deepcopy(base)
    function, instance, partial = [0], Counts(), [0]
    model.register_forward_pre_hook(counter(function))
    model.register_forward_pre_hook(instance)
    model.register_forward_pre_hook(functools.partial(lambda c, m, a: c.append(1), partial))
    assert gaugefix.verify(model, s, inputs()).ok
    assert function[0] == PASS_FORWARDS and instance.calls == 0 and partial == [0]


def test_a_hook_reading_the_original_model_sees_no_gauge_as_documented(clamped):
    """A closure over the model reads its ungauged tensors on every copy: a gauge of the model
    itself moves this output, verify does not see it."""
    base, s = clamped
    model = copy.deepcopy(base)
    model.register_forward_hook(lambda m, a, out: out + model.l1.weight.sum())
    assert gaugefix.verify(model, s, inputs()).ok
    with torch.no_grad():
        before = model(inputs())
        gaugefix.apply_gauge_(model, s, torch.ones(WIDTH, dtype=torch.float64))
        moved = float((model(inputs()) - before).abs().max()) / float(before.abs().max())
    assert moved > MOVED, moved
