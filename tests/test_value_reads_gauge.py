"""Values read into Python under ``allow_value_dependent``: a read of a tensor that carries gauge
labels gives a number the gauge changes (a branch taken, a factor used in the same call, a
number kept for the next call), so the generators acting on it must be excluded. Reads the gauge
keeps (integer routes from a top-k, counts, masks and lengths made from the inputs, a
floating truth value) keep every generator.

Small models in float64: ``h = relu(l1(x))`` (6 units), ``l2`` reads it out; after
:func:`gaugefix.random_gauge_` (scale 2) the outputs must not change (1e-12 relative) on the
example and on fresh inputs, over two calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
SCALE = 2.0
DIM, HIDDEN, OUT = 4, 6, 3
EXPERTS, TOP = 4, 2
MARGIN = 1e-3  # the threshold's relative distance from the example's value


class Read(nn.Module):
    """``x [n, 4] -> [n, 3]``: ``l2(h)`` with ``h = relu(l1(x))`` and a number read from ``h``
    into Python, as :meth:`combine` says."""

    threshold = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, OUT)
        self.kept = 1.0

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.l1(x))
        return self.combine(h, self.l2(h))


class Branch(Read):
    """The sign of the output chosen by unit 0's sum read by ``.item()``."""

    def combine(self, h: Tensor, y: Tensor) -> Tensor:
        if h[:, 0].sum().item() > self.threshold:
            return y
        return -y


class TimesSum(Read):
    def combine(self, h: Tensor, y: Tensor) -> Tensor:
        return y * h.sum().item()


class OverSum(Read):
    def combine(self, h: Tensor, y: Tensor) -> Tensor:
        return y / h.sum().item()


class TimesMax(Read):
    def combine(self, h: Tensor, y: Tensor) -> Tensor:
        return y * float(h.max())


class Kept(Read):
    """``h.mean()`` read by ``.item()`` and kept on the module for the next call."""

    def combine(self, h: Tensor, y: Tensor) -> Tensor:
        out = y * self.kept
        self.kept = h.mean().item()
        return out


class NonzeroBranch(Read):
    """The truth value of a floating tensor (nonzero), which positive factors keep."""

    def combine(self, h: Tensor, y: Tensor) -> Tensor:
        return y if h[:, 0].sum() else -y


class Routed(nn.Module):
    """A Mixtral-style mixture: ``x [b, t, 4]`` and a padding ``mask [b, t]`` ->
    ``[b, 3]``, the last valid token's readout. ``h = inp(x)``; the router's softmax, top-2
    routes each token to experts ``down[e] relu(up[e] h)``; the loop reads the routes as
    :attr:`spelling` says, the mask by ``.all()`` and the lengths by ``.tolist()``."""

    spelling = "counts"

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.up = nn.Parameter(torch.randn(EXPERTS, HIDDEN, DIM))
        self.down = nn.Parameter(torch.randn(EXPERTS, DIM, HIDDEN))
        self.out = nn.Linear(DIM, OUT)

    def hit(self, idx: Tensor) -> list[int]:
        """The experts some token is routed to, read from the routes ``idx [n, 2]``."""
        if self.spelling == "counts":
            counts = torch.bincount(idx.flatten(), minlength=EXPERTS).tolist()
            return [e for e in range(EXPERTS) if counts[e] > 0]
        if self.spelling == "any":
            return [e for e in range(EXPERTS) if (idx == e).any()]
        hits = F.one_hot(idx, EXPERTS).sum((0, 1)) > 0
        return hits.nonzero().flatten().tolist()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if not mask.all():
            x = x * mask[..., None]
        h = self.inp(x).flatten(0, 1)
        weights, idx = F.softmax(self.router(h), -1).topk(TOP, -1)
        y = torch.zeros_like(h)
        for e in self.hit(idx):
            rows, k = torch.where(idx == e)
            z = F.linear(F.relu(F.linear(h[rows], self.up[e])), self.down[e])
            y = y.index_add(0, rows, weights[rows, k, None] * z)
        y = y.view(x.shape)
        lengths = mask.sum(-1).tolist()
        return self.out(torch.stack([y[b, n - 1] for b, n in enumerate(lengths)]))


def calls(model: nn.Module, inputs: tuple, kept: float) -> list[Tensor]:
    """Two calls of ``model`` on ``inputs``, from the kept number ``kept``."""
    model.kept = kept
    with torch.no_grad():
        return [model(*inputs), model(*inputs)]


def change_after_gauge(model: nn.Module, *example: Tensor, fresh: tuple) -> float:
    """The largest relative change of two calls' outputs, on ``example`` and on ``fresh``,
    after a random gauge of the structure discovered on ``example``."""
    kept = getattr(model, "kept", 1.0)
    s = gaugefix.discover(model, *example, allow_value_dependent=True)
    before = [y for inputs in (example, fresh) for y in calls(model, inputs, kept)]
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(0))
    after = [y for inputs in (example, fresh) for y in calls(model, inputs, kept)]
    pairs = zip(after, before, strict=True)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)


def inputs(n: int, seed: int) -> Tensor:
    return 2 * torch.randn(n, DIM, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side", [1 - MARGIN, 1 + MARGIN])
def test_a_branch_on_a_number_read_from_a_gauged_unit_is_not_flipped_by_the_gauge(side):
    """Before, unit 0 (whose sum picks the sign of the output) was a generator: with the
    threshold just below or just above the example's sum, one side flipped the branch on the
    example itself (a relative change of 2.0). Its generator is excluded; the other 5 remain."""
    torch.manual_seed(0)
    model = Branch().to(DTYPE)
    x = inputs(8, 1)
    with torch.no_grad():
        model.threshold = side * float(F.relu(model.l1(x))[:, 0].sum())
    assert change_after_gauge(model, x, fresh=(inputs(20, 2),)) <= TOL
    s = gaugefix.discover(model, x, allow_value_dependent=True)
    assert s.num_generators == HIDDEN - 1, s.summary()
    assert "1 excluded: Tensor.item read a tensor value in '<root>' into Python at" in s.summary()


@pytest.mark.parametrize("cls", [TimesSum, OverSum, TimesMax, Kept])
def test_a_number_read_from_gauged_units_and_computed_with_is_not_changed_by_the_gauge(cls):
    """Before, ``h.sum().item()`` left the 6 units generators, ``float(h.max())`` and the
    kept ``h.mean().item()`` 1: the outputs changed by 21, 0.95 (dividing), 21 and 21 (the
    kept number, on the second call), relative."""
    torch.manual_seed(0)
    model = cls().to(DTYPE)
    assert change_after_gauge(model, inputs(8, 1), fresh=(inputs(20, 2),)) <= TOL


def test_the_truth_value_of_a_gauged_float_keeps_its_generators():
    """``if h[:, 0].sum():`` reads only whether the sum is nonzero, which a positive factor
    keeps: all 6 units remain generators, exact."""
    torch.manual_seed(0)
    model = NonzeroBranch().to(DTYPE)
    x = inputs(8, 1)
    assert change_after_gauge(model, x, fresh=(inputs(20, 2),)) <= TOL
    assert gaugefix.discover(model, x, allow_value_dependent=True).num_generators == HIDDEN


def padded(b: int, t: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[b, t, 4]`` and a mask ``[b, t]`` whose row ``i`` pads its last ``i`` tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t) < (t - torch.arange(b))[:, None]
    return torch.randn(b, t, DIM, dtype=DTYPE, generator=g), mask


@pytest.mark.parametrize("spelling", ["counts", "any", "nonzero"])
def test_reads_of_routes_masks_and_lengths_keep_every_generator(spelling):
    """The routes, the padding mask and the lengths carry no factor: the input map's 4
    channels (compensated by the router and the experts), the experts' 24 units and the 4
    channels they add into (compensated by the readout) remain generators, as before, and
    exact."""
    torch.manual_seed(0)
    model = Routed().to(DTYPE)
    model.spelling = spelling
    example = padded(3, 6, 1)
    assert change_after_gauge(model, *example, fresh=padded(4, 9, 2)) <= TOL
    s = gaugefix.discover(model, *example, allow_value_dependent=True)
    assert s.num_generators == DIM + EXPERTS * HIDDEN + DIM, s.summary()
