"""Numbers and arrangement patterns a forward computes from an input's size.

The tracer sees one example shape. A number computed from a size (``B - 5`` with ``B =
x.shape[0]``) must not be taken for the constant it happens to be there (0 is what a ReLU
spelling, a bias of 0 or a padding value of 0 needs), and an arrangement whose pattern depends
on a size (a roll by ``B``, an index built from ``arange(B)``, a reshape mixing the batch into
the channels) must not be traced with the example's pattern. Oracle as in
``test_rules_audit3``: a random gauge of scale 2 keeps the float64 outputs to 1e-12 relative on
the example and on inputs of other batch sizes; spellings whose pattern does not depend on the
size keep their generators.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_rules_audit3 import BATCH, HIDDEN, TOL, gauged

pytestmark = pytest.mark.usefixtures("single_thread")
R = F.relu


def _b(x):
    return x.shape[0]


FROM_THE_SIZE = {  # name: (f, example batch size)
    "h + (B - 5)": (lambda m, h, g, x: h + (_b(x) - BATCH), BATCH),
    "h - (B - 5) * 2": (lambda m, h, g, x: h - (_b(x) - BATCH) * 2, BATCH),
    "clamp(h, min=B - 5)": (lambda m, h, g, x: h.clamp(min=_b(x) - BATCH), BATCH),
    "threshold(h, B - 5, 0)": (lambda m, h, g, x: F.threshold(h, _b(x) - BATCH, 0.0), BATCH),
    "hardtanh(h, B - 5, inf)": (lambda m, h, g, x: F.hardtanh(h, _b(x) - BATCH, math.inf), BATCH),
    "h * (h > B - 5)": (lambda m, h, g, x: h * (h > _b(x) - BATCH), BATCH),
    "where(h > 0, h, B - 5)": (lambda m, h, g, x: torch.where(h > 0, h, _b(x) - BATCH), BATCH),
    "maximum(h, full_like(h, B - 5))": (
        lambda m, h, g, x: torch.maximum(h, torch.full_like(h, _b(x) - BATCH)),
        BATCH,
    ),
    "gather(1, arange(B) % 6)": (
        lambda m, h, g, x: R(h).gather(1, (torch.arange(_b(x))[:, None] + idx6()) % HIDDEN),
        BATCH,
    ),
    "h[:, (arange(6) + B) % 6]": (
        lambda m, h, g, x: R(h)[:, (torch.arange(HIDDEN) + _b(x)) % HIDDEN],
        BATCH,
    ),
    "h[:, B - 5]": (lambda m, h, g, x: torch.cat([R(h), R(h)[:, _b(x) - BATCH, None]], 1), BATCH),
    "narrow by the size": (
        lambda m, h, g, x: torch.cat([R(h), R(h).narrow(1, _b(x) - BATCH, 1)], 1),
        BATCH,
    ),
    "index_put_ at columns (arange(6) + B) % 6": (
        lambda m, h, g, x: _written(R(h), (torch.arange(HIDDEN) + _b(x)) % HIDDEN),
        BATCH,
    ),
    "flatten, view(6, -1).T": (lambda m, h, g, x: R(h).flatten().view(6, -1).T, 2),
    "reshape(B, -1, 2) of the transpose": (
        lambda m, h, g, x: R(h).T.reshape(_b(x), -1, 2).reshape(_b(x), -1),
        3,
    ),
}


def idx6():
    return torch.arange(HIDDEN)


def _written(h, columns):
    """``h`` written into a fresh tensor at ``columns`` (rows by ``arange`` of the batch size)."""
    t = h.new_zeros(h.shape)
    return t.index_put_((torch.arange(h.shape[0])[:, None], columns[None]), h)


@pytest.mark.parametrize("f, batch", list(FROM_THE_SIZE.values()), ids=list(FROM_THE_SIZE))
def test_numbers_and_patterns_from_the_size_are_exact_on_other_batch_sizes(f, batch):
    s, change = gauged(f, batch)
    assert change <= TOL, s.summary()


# Spellings whose result does not depend on the size in a way the rescaling sees: the sizes are
# read, used as shapes, and the generators are kept.
KEPT = {  # name: (f, generators)
    "view(B, 2, 3) and back": (lambda m, h, g, x: R(h).view(_b(x), 2, 3).view(_b(x), -1), HIDDEN),
    "view(B, 2, -1).transpose(1, 2)": (
        lambda m, h, g, x: R(h).view(_b(x), 2, -1).transpose(1, 2).reshape(_b(x), -1),
        HIDDEN,
    ),
    "reshape(-1, 6)": (lambda m, h, g, x: R(h).reshape(-1, HIDDEN), HIDDEN),
    "flatten and view(B, -1)": (lambda m, h, g, x: R(h).flatten().view(_b(x), -1), HIDDEN),
    "expand(B, 2, 6)": (lambda m, h, g, x: R(h)[:, None].expand(_b(x), 2, HIDDEN).sum(1), HIDDEN),
    "h * B": (lambda m, h, g, x: R(h) * _b(x), HIDDEN),
    "h / sqrt(h.shape[-1])": (lambda m, h, g, x: R(h) / math.sqrt(h.shape[-1]), HIDDEN),
    "h[:B] and zeros(B, 6)": (lambda m, h, g, x: R(h)[: _b(x)] + torch.zeros(_b(x), HIDDEN), 6),
    "maximum(h, zeros(B, 6))": (lambda m, h, g, x: torch.maximum(h, torch.zeros(_b(x), 6)), 6),
    "index_put_ at rows arange(B)": (lambda m, h, g, x: _written(R(h), idx6().flip(0)), HIDDEN),
}


@pytest.mark.parametrize("f, count", list(KEPT.values()), ids=list(KEPT))
def test_sizes_used_as_shapes_keep_the_generators(f, count):
    s, change = gauged(f)
    assert change <= TOL, s.summary()
    assert s.num_generators == count, s.summary()
