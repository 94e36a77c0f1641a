"""An adversarial audit of ``gaugefix.verify``: structures that are not exact, forwards that do
not repeat, and everything verify must leave as it was.

A generator that breaks only for factors above 1 (a clamp from above the activations reach) or
only below 1 (a clamp from below) is found whatever the sign of its random ``h``, alone, as are a
pair that is exact only when moved together and a unit that moves the outputs just past the
tolerance. A forward that does not repeat (Python's random
numbers, a class attribute counting calls) raises rather than blaming every generator. Integer
token ids, a dict of inputs, outputs holding ints and ``None``, a float32 forward that casts
inside, bfloat16, frozen parameters and a structure read back from JSON verify as they should;
a structure of another model raises. The model's tensors, gradients, ``requires_grad``, modes
and hooks are the same after verify, and after verify raises. Two blind spots of a numerical
check are pinned as documented: entries far below the largest of their tensor, and a clamp
beyond the factors one draw reaches.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import assert_same_bits, snapshot
from test_verify import Planted, moves_alone

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE = torch.float64
EXACT = 1e-12  # an exact structure: float64 rounding only
WIDTH = 8
MARGIN = 1e-4  # a clamp this far (relative) beyond the activations the inputs reach
FAR = 100.0  # a clamp this many times beyond them: past the factors one draw reaches


def randn(*shape: int, seed: int = 7) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


class Clamped(nn.Module):
    """``l2(a)``, ``a = relu(l1(x))``, the unit ``unit`` clamped to ``[low, high]`` (exact for
    the inputs whose activations lie inside; a gauge factor that moves them out breaks it).
    ``l1``'s bias 3 keeps every activation positive on ``randn`` inputs."""

    def __init__(self, unit: int | None = None, low: float = -1.0, high: float = 1e300) -> None:
        super().__init__()
        self.unit, self.low, self.high = unit, low, high
        self.l1, self.l2 = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 3)
        with torch.no_grad():
            self.l1.weight.mul_(0.5)
            self.l1.bias.fill_(3.0)

    def hidden(self, x: Tensor) -> Tensor:
        return F.relu(self.l1(x))

    def forward(self, x: Tensor) -> Tensor:
        a = self.hidden(x)
        if self.unit is not None:
            a = a.clone()
            a[:, self.unit] = a[:, self.unit].clamp(self.low, self.high)
        return self.l2(a)


def clamped_at(base: Clamped, unit: int, side: str, x: Tensor, margin: float) -> Clamped:
    """``base``'s weights with ``unit`` clamped just beyond its activations on ``x``: from
    above (``side == "above"``, broken by factors above 1) or from below (by factors below 1)."""
    with torch.no_grad():
        a = base.hidden(x)[:, unit]
    assert bool((a > 0).all())
    model = copy.deepcopy(base)
    model.unit = unit
    if side == "above":
        model.high = float(a.max()) * margin
    else:
        model.low = float(a.min()) / margin
    return model


@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize("unit", range(WIDTH))
def test_a_generator_broken_on_one_side_of_1_is_found_whatever_the_sign_of_its_draw(
    clamped, unit, side
):
    """Before the inverse gauge ``-h``, 8 of these 16 passed (``ok``, a change of 2.4e-16: the
    draw ``h`` of the clamped unit had the sign that keeps it inside its clamp) and 6 blamed 2 to
    8 generators (a failing set neither of whose halves failed under their fresh draws)."""
    base, s = clamped
    x = randn(3, 4, seed=3)
    model = clamped_at(base, unit, side, x, 1.0 + MARGIN)
    assert gaugefix.verify(base, s, x).max_change <= EXACT  # exact without the clamp
    result = gaugefix.verify(model, s, x)
    expected = torch.zeros(WIDTH, dtype=torch.bool)
    expected[unit] = True
    assert not result.ok and result.max_change > 1e-4, result.max_change
    assert torch.equal(result.broken, expected), result.broken


def test_a_clamp_beyond_the_factors_one_draw_reaches_passes_as_documented(clamped):
    """A numerical check is a test: a clamp 100 times above every activation is broken only by
    factors above 100, which ``h ~ N(0, 1)`` does not reach on these 8 generators (the oracle
    at ``h = 5 e_n``, a factor of 148, moves the outputs)."""
    base, s = clamped
    x = randn(3, 4, seed=3)
    model = clamped_at(base, 0, "above", x, FAR)
    assert gaugefix.verify(model, s, x).ok
    gauged = copy.deepcopy(model)
    gaugefix.apply_gauge_(gauged, s, 5.0 * torch.eye(WIDTH, dtype=DTYPE)[0])
    with torch.no_grad():
        assert float((gauged(x) - model(x)).abs().max()) > 1e-3


class Ratio(Clamped):
    """``Clamped`` plus ``tanh(a_0 / a_1)``: units 0 and 1 are exact together (the ratio keeps
    under equal factors), neither alone."""

    def forward(self, x: Tensor) -> Tensor:
        a = self.hidden(x)
        return self.l2(a) + torch.tanh(a[:, :1] / a[:, 1:2])


def test_two_generators_exact_only_together_are_both_found(clamped):
    base, s = clamped
    model = Ratio().double()
    model.load_state_dict(base.state_dict())
    x = randn(3, 4, seed=3)
    expected = moves_alone(model, s, x)
    assert expected.tolist() == [True, True] + [False] * (WIDTH - 2)
    result = gaugefix.verify(model, s, x)
    assert not result.ok and torch.equal(result.broken, expected), result.broken


# --- forwards that do not repeat -----------------------------------------------------------------
class PythonNoise(Clamped):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + random.random()


class CountsCalls(Clamped):
    calls = 0

    def forward(self, x: Tensor) -> Tensor:
        CountsCalls.calls += 1
        return super().forward(x) * CountsCalls.calls


@pytest.mark.parametrize("kind", [PythonNoise, CountsCalls])
def test_a_forward_that_does_not_repeat_raises_and_changes_nothing(clamped, kind):
    """Before, every generator was reported broken (8 of 8, a change of 0.36 and 2.0): a
    change the gauge does not cause, blamed on the exact structure."""
    base, s = clamped
    model = kind().double()
    model.load_state_dict(base.state_dict())
    saved, rng = snapshot(model), torch.get_rng_state()
    with pytest.raises(gaugefix.VerificationError, match="two forwards without a gauge"):
        gaugefix.verify(model, s, randn(3, 4))
    assert_same_bits(model, saved)
    assert torch.equal(torch.get_rng_state(), rng)


# --- entries of very different magnitudes ------------------------------------------------------
class Stacked(Clamped):
    """An exact head scaled by ``big`` and, beside it, ``l2(tanh(l1(x)))`` (no rescaling
    symmetry through ``tanh``): in one tensor (``apart=False``) or two."""

    def __init__(self, big: float, apart: bool) -> None:
        super().__init__()
        self.big, self.apart = big, apart

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        exact, broken = self.big * self.l2(self.hidden(x)), self.l2(torch.tanh(self.l1(x)))
        return (exact, broken) if self.apart else torch.cat([exact, broken], 1)


def test_entries_far_below_the_largest_of_their_tensor_pass_as_documented(clamped):
    """The change is relative to each output tensor's largest entry: the ``tanh`` entries, 1e10
    times smaller, move by about 1e-11 of it in one tensor (passes), by 1e-2 or more of their
    own largest when returned apart (every generator found)."""
    base, s = clamped
    x = randn(3, 4, seed=3)
    together, apart = Stacked(1e10, apart=False).double(), Stacked(1e10, apart=True).double()
    for model in (together, apart):
        model.load_state_dict(base.state_dict())
    assert gaugefix.verify(together, s, x).ok
    result = gaugefix.verify(apart, s, x)
    assert not result.ok and result.max_change > 1e-2
    assert result.broken.all(), result.broken  # every unit goes through tanh


# --- inputs and outputs of other kinds ---------------------------------------------------------
class Tokens(nn.Module):
    """Token ids and a float scale in a dict; a dict output with the logits, the ids, ``None``
    and an int. ``wrong`` units go through ``tanh``."""

    def __init__(self, wrong: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.wrong = list(wrong)
        self.emb, self.l1, self.l2 = nn.Embedding(11, 6), nn.Linear(6, WIDTH), nn.Linear(WIDTH, 5)

    def forward(self, batch: dict) -> dict:
        z = self.l1(self.emb(batch["ids"]) * batch["scale"])
        a = F.relu(z)
        if self.wrong:
            a = a.clone()
            a[..., self.wrong] = torch.tanh(z[..., self.wrong])
        return {"logits": self.l2(a), "ids": batch["ids"], "none": None, "count": 3}


def tokens(batch: int, length: int, seed: int) -> dict:
    ids = torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"ids": ids, "scale": randn(batch, length, 1, seed=seed).abs() + 0.5}


def test_token_ids_in_a_dict_and_a_mixed_output_verify_and_flag_exactly():
    torch.manual_seed(0)
    exact = Tokens().double()
    s = gaugefix.discover(exact, tokens(2, 3, seed=1))
    assert s.num_generators >= WIDTH
    batch = tokens(4, 7, seed=2)
    given = {k: v.clone() for k, v in batch.items()}
    assert gaugefix.verify(exact, s, batch).max_change <= EXACT
    wrong = Tokens((2, 5)).double()
    wrong.load_state_dict(exact.state_dict())
    result = gaugefix.verify(wrong, s, batch)
    assert not result.ok and int(result.broken.sum()) >= 1
    kept = s.restrict(~result.broken, "tanh units")
    assert gaugefix.verify(wrong, kept, batch).max_change <= 1e-10
    assert all(torch.equal(batch[k], given[k]) for k in batch)


class CastsInside(Clamped):
    """A float32 model whose forward hard-casts to float32 between its layers."""

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.hidden(x).to(torch.float32).float())


@pytest.mark.parametrize("kind, dtype", [(CastsInside, torch.float32), (Clamped, torch.bfloat16)])
def test_a_narrow_model_verifies_in_float64_and_keeps_its_dtype(kind, dtype):
    torch.manual_seed(0)
    model = kind().to(dtype).eval()
    s = gaugefix.discover(model, torch.randn(5, 4, dtype=dtype))
    saved = snapshot(model)
    result = gaugefix.verify(model, s, torch.randn(3, 4, dtype=dtype))
    assert result.ok and result.max_change <= EXACT, result.max_change
    assert_same_bits(model, saved)
    assert all(p.dtype == dtype for p in model.parameters())


def test_a_structure_read_back_from_json_verifies_as_the_original(clamped, tmp_path):
    base, s = clamped
    path = tmp_path / "structure.json"
    s.save(path)
    loaded = gaugefix.GaugeStructure.load(path)
    x = randn(3, 4, seed=3)
    model = clamped_at(base, 6, "below", x, 1.0 + MARGIN)
    first, again = gaugefix.verify(model, s, x), gaugefix.verify(model, loaded, x)
    assert (first.max_change, first.broken.tolist()) == (again.max_change, again.broken.tolist())
    assert again.broken.tolist() == [n == 6 for n in range(WIDTH)]


# --- nothing verify is given changes -------------------------------------------------------------
def dressed(model: nn.Module) -> tuple[nn.Module, list, list]:
    """``model`` with ``l1`` frozen, a gradient on ``l2.weight``, ``l2`` in eval mode under a
    training parent, and a forward hook and a pre-hook that record their calls."""
    model.l1.requires_grad_(False)
    model.l2.weight.grad = randn(*model.l2.weight.shape, seed=9)
    model.train()
    model.l2.eval()
    seen: list = []
    handles = [
        model.l1.register_forward_hook(lambda m, i, o: seen.append("hook")),
        model.register_forward_pre_hook(lambda m, i: seen.append("pre")),
    ]
    return model, seen, handles


def same_dress(model: nn.Module, saved: dict, grad: Tensor) -> None:
    assert_same_bits(model, saved)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert torch.equal(model.l2.weight.grad, grad) and model.l1.weight.grad is None
    assert model.training and model.l1.training and not model.l2.training
    assert len(model.l1._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1


@pytest.mark.parametrize("case", ["ok", "broken", "another model", "all zero", "no repeat"])
def test_the_model_its_grads_modes_and_hooks_are_the_same_after_verify(clamped, case):
    """Frozen parameters are gauged on the copy (a broken generator through them is found);
    the hooks run on the copies (3 forwards when ok), as the docstring says."""
    base, s = clamped
    x = randn(3, 4, seed=3)
    kinds = {"broken": lambda: clamped_at(base, 3, "below", x, 1.0 + MARGIN)}
    kinds["no repeat"] = PythonNoise
    model = kinds.get(case, Clamped)().double()
    if case != "broken":
        model.load_state_dict(base.state_dict())
    if case == "all zero":
        with torch.no_grad():
            model.l2.weight.zero_()
            model.l2.bias.zero_()
    model, seen, handles = dressed(model)
    saved, grad = snapshot(model), model.l2.weight.grad.clone()
    if case == "another model":
        other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
        s = gaugefix.discover(other, x)
    raises = {"another model": ValueError, "all zero": gaugefix.VerificationError}
    raises["no repeat"] = gaugefix.VerificationError
    if case in raises:
        with pytest.raises(raises[case]):
            gaugefix.verify(model, s, x)
    else:
        result = gaugefix.verify(model, s, x)
        assert result.broken.tolist() == [case == "broken" and n == 3 for n in range(WIDTH)]
        assert case == "broken" or seen == ["pre", "hook"] * 3
    same_dress(model, saved, grad)
    for handle in handles:
        handle.remove()


def test_a_unit_that_moves_the_outputs_just_past_the_tolerance_is_found_alone():
    """A ``tanh`` unit at batch 1 moves the outputs by 2.4e-9 (relative) under the whole draw,
    2.4 times the tolerance. Bisection with a fresh draw for each half blamed whole sets before
    (all 256 generators, a change of 1.0e-9, with ``h`` alone; 32 with ``h`` and ``-h``): the
    same draw restricted to each half keeps the unit's move and finds it alone."""
    torch.manual_seed(0)
    s = gaugefix.discover(Planted().double(), randn(5, 4))
    torch.manual_seed(1)
    model = Planted((152,)).double()
    result = gaugefix.verify(model, s, randn(1, 4, seed=1))
    assert not result.ok and result.max_change < 1e-8, result.max_change
    assert result.broken.nonzero().flatten().tolist() == [152]
