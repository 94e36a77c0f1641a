"""``equalize_(..., "activation")`` on a convolution of ``G`` groups (kernel ``[out, in/G, ...]``;
depthwise: ``G = in``): input channel ``j`` is read by column ``j mod (in/G)`` of the ``out/G``
rows of group ``j // (in/G)``, and the calibration pass records its maxima there (``[out, in/G]``).
Oracle (float64, to ``EXACT``): the same network with each group written as its own ungrouped
convolution reading its slice of the channels, calibrated and equalized with its own structure.
A grouped read through a view of the weight is not followed: listed, never silent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from gaugefix.calibration import _calibrated
from test_equalize_products import EXACT

pytestmark = pytest.mark.usefixtures("single_thread")

CIN, WIDTH, CLASSES, SIDE, BATCH = 3, 8, 4, 6, 5
# (groups, output channels per input channel): grouped, depthwise, depthwise with a multiplier.
SHAPES = [(2, 1), (4, 2), (WIDTH, 1), (WIDTH, 2)]
CONVS = {1: nn.Conv1d, 2: nn.Conv2d}


def _batch(dims: int, seed: int = 3) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(BATCH, CIN, *[SIDE] * dims, dtype=torch.float64, generator=gen)


class Separable(nn.Module):
    """A convolution, ReLU, a convolution of ``groups`` groups, ReLU, a pointwise one."""

    def __init__(self, groups: int, mult: int, dims: int = 2) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.a = conv(CIN, WIDTH, 3, padding=1)
        self.b = conv(WIDTH, WIDTH * mult, 3, padding=1, groups=groups)
        self.c = conv(WIDTH * mult, CLASSES, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class Sliced(nn.Module):
    """``Separable`` with each group of ``b`` its own ungrouped convolution (the same values)."""

    def __init__(self, ref: Separable) -> None:
        super().__init__()
        self.a, self.c, groups = copy.deepcopy(ref.a), copy.deepcopy(ref.c), ref.b.groups
        self.width = ref.b.in_channels // groups
        rows = ref.b.weight.shape[0] // groups
        conv = type(ref.b)
        self.b = nn.ModuleList(conv(self.width, rows, 3, padding=1).double() for _ in range(groups))
        with torch.no_grad():
            for g, m in enumerate(self.b):
                m.weight.copy_(ref.b.weight[g * rows : (g + 1) * rows])
                m.bias.copy_(ref.b.bias[g * rows : (g + 1) * rows])

    def kernel(self) -> Tensor:
        return torch.cat([m.weight for m in self.b])

    def forward(self, x: Tensor) -> Tensor:
        h, w = F.relu(self.a(x)), self.width
        h = torch.cat([m(h[:, g * w : (g + 1) * w]) for g, m in enumerate(self.b)], 1)
        return self.c(F.relu(h))


def _models(groups: int, mult: int, dims: int) -> tuple[Separable, Sliced]:
    torch.manual_seed(groups + mult + dims)
    model = Separable(groups, mult, dims).double()
    return model, Sliced(model)


@pytest.mark.parametrize("dims", CONVS)
@pytest.mark.parametrize(("groups", "mult"), SHAPES)
def test_grouped_conv_equalizes_as_its_groups_ungrouped(groups, mult, dims):
    model, sliced = _models(groups, mult, dims)
    x = _batch(dims)
    got = gaugefix.equalize_(model, gaugefix.discover(model, x), "activation", calibration=x)
    ref = gaugefix.equalize_(sliced, gaugefix.discover(sliced, x), "activation", calibration=x)
    assert got.uncalibrated == ref.uncalibrated == ()
    assert got.converged and ref.converged
    for name in ("a.weight", "a.bias", "c.weight", "c.bias"):
        want = sliced.get_parameter(name)
        assert (model.get_parameter(name) - want).abs().max() <= EXACT * want.abs().max()
    want = sliced.kernel()
    assert (model.b.weight - want).abs().max() <= EXACT * want.abs().max()


@pytest.mark.parametrize(("groups", "mult"), SHAPES)
def test_grouped_conv_records_each_rows_input_channel(groups, mult):
    model, _ = _models(groups, mult, 2)
    x, seen = _batch(2), []
    model.b.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    got, left = _calibrated(model, dict(model.named_parameters()), (x,))
    per_channel = seen[0].abs().amax((0, 2, 3)).view(groups, -1)  # [G, in/G]
    want = per_channel.repeat_interleave(WIDTH * mult // groups, 0)  # row o: group o // (out/G)
    assert left == ()
    assert got["b.weight", 1].shape == model.b.weight.shape[:2]
    assert torch.equal(got["b.weight", 1], want)


class Viewed(nn.Module):
    """A grouped convolution of a view of its kernel (``W[:, :1]`` of ``[out, 2, 3]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2 * CIN, 2, 3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.w[:, :1], groups=CIN)


def test_grouped_read_of_a_view_is_listed():
    model = Viewed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, left = _calibrated(model, dict(model.named_parameters()), (_batch(1),))
    assert left == ("w",) and ("w", 1) not in got
