"""Sizes that reach a rule other than as Python int arithmetic: a ``view`` or ``reshape`` whose
``-1`` absorbs the batch, and ``math`` functions of a size.

``h.reshape(6, -1)`` of ``h [B, 6]`` is ``[6, B]``: row ``i`` holds the flat entries
``i B .. i B + B - 1``, so which channel lands where depends on ``B``. Traced on 2 samples the
rows pair channels ``(0, 1), (2, 3), (4, 5)``; on 3 samples they pair others. Such a reshape
unites the channels it mixes with the batch; one that keeps the batch apart from the channels
(``[B, 6] -> [B, 2, 3]``, ``[B * 6]``, ``[2 B, 3]``) keeps every generator. ``math.log(B / 5)``
is 0 at the example only, like ``B - 5``. Oracle as in ``test_rules_audit3``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from test_rules_audit3 import BATCH, HIDDEN, TOL, gauged

pytestmark = pytest.mark.usefixtures("single_thread")
R = F.relu


def _b(x: Tensor) -> int:
    return x.shape[0]


# Reshapes whose pattern the -1 sets: exact on other batch sizes. Traced on 2 and 3 samples the
# rows pair channels in twos or threes; on 4 or more every channel meets every other anyway.
MIXED = {
    "view(6, -1).T": lambda m, h, g, x: R(h).view(6, -1).T,
    "reshape((6, -1)).T": lambda m, h, g, x: R(h).reshape((6, -1)).T,
    "torch.reshape(h, shape=(6, -1)).T": lambda m, h, g, x: torch.reshape(R(h), shape=(6, -1)).T,
    "reshape(2, -1, 3).transpose(0, 2), back": lambda m, h, g, x: (
        R(h).reshape(2, -1, 3).transpose(0, 2).reshape(_b(x), -1)
    ),
    "T.reshape(-1) then view(B, 6)": lambda m, h, g, x: R(h).T.reshape(-1).view(_b(x), HIDDEN),
}
_COINCIDENT = {("reshape(2, -1, 3).transpose(0, 2), back", 2)}  # the 2 read as the batch
_MIXED_CASES = [
    pytest.param(f, batch, id=f"{name}-{batch}")
    for name, f in MIXED.items()
    for batch in (2, 3)
    if (name, batch) not in _COINCIDENT
]


@pytest.mark.parametrize("f, batch", _MIXED_CASES)
def test_a_reshape_whose_minus_one_mixes_the_batch_with_channels_is_exact(f, batch):
    s, change = gauged(f, batch)
    assert change <= TOL, s.summary()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="a plain number that repeats the input's size in place is read as that size "
    "(view(*x.shape[:-1], -1, 4) with sizes read from a blocked activation must keep its "
    "generators): see docs/generators.md",
)
@pytest.mark.parametrize(
    "f, batch",
    [
        pytest.param(MIXED["reshape(2, -1, 3).transpose(0, 2), back"], 2, id="reshape(2, -1, 3)"),
        pytest.param(
            lambda m, h, g, x: R(h).reshape(3, -1).flip(0).reshape(_b(x), -1),
            3,
            id="reshape(3, -1).flip(0)",
        ),
    ],
)
def test_a_plain_number_equal_to_the_batch_at_the_example_is_not_caught(f, batch):
    s, change = gauged(f, batch)
    assert change <= TOL, s.summary()


# The same reshapes with the batch given as a size read from the input, not through -1.
GIVEN = {
    "reshape(6, B).T": lambda m, h, g, x: R(h).reshape(6, _b(x)).T,
    "view(6, B).T": lambda m, h, g, x: R(h).view(6, _b(x)).T,
    "torch.reshape(h, (6, B)).T": lambda m, h, g, x: torch.reshape(R(h), (6, _b(x))).T,
    "reshape(3, 2 B).T, back": lambda m, h, g, x: R(h).reshape(3, 2 * _b(x)).T.reshape(_b(x), -1),
}


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("f", list(GIVEN.values()), ids=list(GIVEN))
def test_a_reshape_given_the_batch_as_a_marked_size_is_exact(f, batch):
    s, change = gauged(f, batch)
    assert change <= TOL, s.summary()


# Shapes given as sizes that keep the batch apart from the channels: the 6 units stay.
GIVEN_KEPT = {
    "view(B, 2, 3), back": lambda m, h, g, x: R(h).view(_b(x), 2, 3).reshape(_b(x), HIDDEN),
    "reshape(B * 6), view(B, 6)": lambda m, h, g, x: R(h).reshape(_b(x) * HIDDEN).view(_b(x), 6),
    "reshape(2 B, 3), back": lambda m, h, g, x: R(h).reshape(2 * _b(x), 3).reshape(_b(x), 6),
    "view(1, B, 6)[0]": lambda m, h, g, x: R(h).view(1, _b(x), HIDDEN)[0],
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("f", list(GIVEN_KEPT.values()), ids=list(GIVEN_KEPT))
def test_a_shape_given_as_sizes_that_keeps_the_batch_apart_keeps_the_generators(f, batch):
    s, change = gauged(f, batch)
    assert change <= TOL, s.summary()
    assert s.num_generators == HIDDEN, s.summary()


# Reshapes whose -1 keeps the batch apart from the channels: the 6 units of h stay.
KEPT = {
    "reshape(-1, 2, 3), back": lambda m, h, g, x: R(h).reshape(-1, 2, 3).reshape(_b(x), -1),
    "reshape(-1), view(B, 6)": lambda m, h, g, x: R(h).reshape(-1).view(_b(x), HIDDEN),
    "reshape(-1, 3), back": lambda m, h, g, x: R(h).reshape(-1, 3).reshape(_b(x), -1),
    "view(-1, 6)": lambda m, h, g, x: R(h).view(-1, 6),
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("f", list(KEPT.values()), ids=list(KEPT))
def test_a_reshape_that_keeps_the_batch_apart_keeps_the_generators(f, batch):
    s, change = gauged(f, batch)
    assert change <= TOL, s.summary()
    assert s.num_generators == HIDDEN, s.summary()


# math functions of a size: 0 (or the example's number) at the example only.
MATH = {
    "h + log(B / 5)": lambda m, h, g, x: h + math.log(_b(x) / BATCH),
    "clamp(h, min=sqrt(|B - 5|))": lambda m, h, g, x: h.clamp(min=math.sqrt(abs(_b(x) - BATCH))),
    "h + log2(B) - log2(5)": lambda m, h, g, x: h + (math.log2(_b(x)) - math.log2(BATCH)),
    "h + fabs(B - 5)": lambda m, h, g, x: h + math.fabs(_b(x) - BATCH),
    "maximum(h, tensor(pow(B - 5, 3)))": lambda m, h, g, x: torch.maximum(
        h, torch.tensor(math.pow(_b(x) - BATCH, 3))
    ),
    "alpha_dropout with p = sqrt(|B - 5|) / 10": lambda m, h, g, x: F.alpha_dropout(
        R(h), math.sqrt(abs(_b(x) - BATCH)) / 10, True
    ),
}


@pytest.mark.parametrize("f", list(MATH.values()), ids=list(MATH))
def test_math_of_a_size_is_exact_on_other_batch_sizes(f):
    s, change = gauged(f, BATCH)
    assert change <= TOL, s.summary()


def test_math_of_a_channel_count_keeps_the_generators():
    """``h / sqrt(h.shape[1])`` divides by a constant; ``h + log(6 / 6)`` adds the constant 0."""
    s, change = gauged(lambda m, h, g, x: R(h) / math.sqrt(h.shape[1]) + math.log(h.shape[1] / 6))
    assert change <= TOL, s.summary()
    assert s.num_generators == HIDDEN, s.summary()


def test_the_math_functions_are_the_originals_after_discovery_even_when_the_forward_fails():
    originals = (math.sqrt, math.log, math.floor)

    class Failing(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError(f"{math.sqrt(_b(x))} is no size for this forward")

    with pytest.raises(gaugefix.TracingError):
        gaugefix.discover(Failing(), torch.randn(BATCH, 4))
    gauged(lambda m, h, g, x: h + math.log(_b(x) / BATCH))
    assert (math.sqrt, math.log, math.floor) == originals


class _UnbatchedFlatten(nn.Module):
    """A conv on an unbatched input made batched by ``unsqueeze(0)``, flattened by ``spell``."""

    def __init__(self, spell: str) -> None:
        super().__init__()
        self.spell = spell
        self.conv, self.head = nn.Conv1d(2, 3, 1), nn.Linear(27, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x.unsqueeze(0)))
        h = h.view(h.size(0), -1) if self.spell == "view" else torch.flatten(h, 1)
        return self.head(h)


@pytest.mark.parametrize("spell", ["view", "flatten"])
def test_a_flatten_after_a_kept_leading_dim_keeps_the_channels_as_torch_flatten(spell):
    """``h.view(h.size(0), -1)`` with a plain leading 1 is ``torch.flatten(h, 1)``: the same
    verdict, the conv's 3 channels kept (the -1 rule united them)."""
    torch.manual_seed(0)
    model = _UnbatchedFlatten(spell).double()
    assert gaugefix.discover(model, torch.randn(2, 9, dtype=torch.float64)).num_generators == 3
