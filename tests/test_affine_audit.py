"""Adversarial uses of the rules for linear maps, convolutions, norms and embeddings
(``gaugefix.structure.affine``): every spelling of a convolution (groups, dilation, stride,
padding modes, ``padding='same'``, transposed with ``output_padding``), weights that are views,
slices, transposes or flips of a parameter or shared by two ops, products of parameters, norm
layers in training and evaluation, embeddings and bags of them (weighted, renormalised, the
table passed first), parametrizations and lazy modules. Every structure found must be exact: a
random gauge of scale 2 keeps every float64 output (and every floating buffer after the forward)
to 1e-12 relative, on the example input and on fresh inputs of other batch sizes and lengths; the
generator counts are derived by hand (a rule that blocks what it could keep fails them)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

import gaugefix
from architectures import rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
SCALE = 2.0
HIDDEN = 6  # channels of the producer in front of the op under test
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SIZES = {1: (7, 5, 9), 2: (6, 5, 7), 3: (4, 3, 5)}  # example, then fresh spatial sizes


def _floats(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    return [t for o in out for t in _floats(o)]


def gauged(make: Callable[[], nn.Module], example: tuple, fresh: list, train: bool = False):
    """Discover ``make()`` (float64, parameters redrawn away from their initial values) on
    ``example``, apply a random gauge of scale 2 to a copy and return the structure and the
    largest relative change of an output (on ``example`` and every input of ``fresh``) or of a
    floating buffer, both copies having run the same forwards."""
    torch.manual_seed(0)
    model = make().to(DTYPE).train(train)
    with torch.no_grad():
        model(*example)  # materialise lazy modules
        for p in model.parameters():
            p.copy_(0.7 * torch.randn_like(p) + 0.3)
    s = gaugefix.discover(copy.deepcopy(model), *example)
    moved = copy.deepcopy(model)
    gaugefix.random_gauge_(moved, s, SCALE, generator=torch.Generator().manual_seed(1))
    changes = [0.0]
    for inputs in (example, *fresh):
        with torch.no_grad():
            before, after = _floats(model(*inputs)), _floats(moved(*inputs))
        changes += [rel_change(b, a) for b, a in zip(before, after, strict=True)]
    for b, a in zip(model.buffers(), moved.buffers(), strict=True):
        if b.is_floating_point():
            changes.append(rel_change(b, a))
    return s, max(changes)


def assert_exact(s: gaugefix.GaugeStructure, change: float, expected: int | None) -> None:
    """The gauge kept the outputs, and ``expected`` generators were found (``None``: some exact
    symmetries are missed there, which costs an opportunity and is not checked)."""
    assert change <= TOL, s.summary()
    assert expected is None or s.num_generators == expected, s.summary()


# --- convolutions ---------------------------------------------------------------------------------
class Between(nn.Module):
    """``post(relu(op(self, relu(pre(x)))))`` with 1x1 convolutions ``pre`` (``HIDDEN``
    channels) and ``post`` (reading ``cout``), and the parameters ``w``, ``b`` of the given
    shapes for ``op``: ``pre``'s channels are generators when ``op`` consumes them with its
    weight, ``op``'s output channels when it produces them."""

    def __init__(self, dim: int, op, cout: int, w: tuple = (1,), b: tuple = (1,), module=None):
        super().__init__()
        self.pre, self.post = CONV[dim](2, HIDDEN, 1), CONV[dim](cout, 3, 1)
        self.w, self.b = nn.Parameter(torch.randn(w)), nn.Parameter(torch.randn(b))
        self.op, self.module = op, module if module is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.post(F.relu(self.op(self, F.relu(self.pre(x)))))


def conv_case(dim: int, op, cout: int, **kw) -> tuple:
    """The change under a random gauge of :class:`Between` on a batch of 2 and fresh batches of
    1 and 3 of other spatial sizes."""
    first, *others = SIZES[dim]
    example = (torch.randn(2, 2, *[first] * dim, dtype=DTYPE),)
    fresh = [
        (torch.randn(n, 2, *[s] * dim, dtype=DTYPE),) for n, s in zip((1, 3), others, strict=True)
    ]
    return gauged(lambda: Between(dim, op, cout, **kw), example, fresh)


def module_op(m: Between, h: Tensor) -> Tensor:
    return m.module(h)


CONV_MODULES = {  # (in, out, kwargs) of nn.ConvNd(in=HIDDEN, ...)
    "groups=1": (6, dict(kernel_size=3, padding=1)),
    "groups=2, no bias": (6, dict(kernel_size=3, padding=1, groups=2, bias=False)),
    "depthwise": (6, dict(kernel_size=3, padding=1, groups=6)),
    "depthwise, multiplier 2": (12, dict(kernel_size=3, padding=1, groups=6)),
    "groups=3, 6 -> 9, dilation, stride": (
        9,
        dict(kernel_size=3, padding=2, groups=3, dilation=2, stride=2),
    ),  # fmt: skip
    "padding='same', even kernel": (12, dict(kernel_size=2, padding="same", groups=2, dilation=2)),
    "reflect": (6, dict(kernel_size=3, padding=1, groups=2, padding_mode="reflect")),
    "replicate": (6, dict(kernel_size=3, padding=1, groups=3, padding_mode="replicate")),
    "circular": (6, dict(kernel_size=3, padding=1, groups=6, padding_mode="circular")),
    "same, reflect": (12, dict(kernel_size=4, padding="same", groups=2, padding_mode="reflect")),
}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("cout, kw", list(CONV_MODULES.values()), ids=list(CONV_MODULES))
def test_convolution_modules_are_exact(dim, cout, kw):
    s, change = conv_case(dim, module_op, cout, module=CONV[dim](HIDDEN, cout, **kw))
    assert_exact(s, change, HIDDEN + cout)


CONV_T_MODULES = {  # (out, kwargs) of nn.ConvTransposeNd(in=HIDDEN, ...)
    "groups=1": (6, dict(kernel_size=3, padding=1)),
    "groups=2, 6 -> 4, output_padding": (4, dict(kernel_size=3, stride=2, padding=1,
                                                  output_padding=1, groups=2)),  # fmt: skip
    "groups=3, 6 -> 9, dilation, no bias": (9, dict(kernel_size=3, stride=2, padding=1, groups=3,
                                                     output_padding=1, dilation=2, bias=False)),
    "depthwise, multiplier 2": (12, dict(kernel_size=3, padding=1, groups=6)),
}  # fmt: skip


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("cout, kw", list(CONV_T_MODULES.values()), ids=list(CONV_T_MODULES))
def test_transposed_convolution_modules_are_exact(dim, cout, kw):
    s, change = conv_case(dim, module_op, cout, module=CONV_T[dim](HIDDEN, cout, **kw))
    assert_exact(s, change, HIDDEN + cout)


# Channel i with channel i + 3, made before the trace: a constant (a list of ints, or a tensor made
# in the forward, may have been computed from a size and unites the channels it picks).
HALVES = torch.tensor([3, 4, 5, 0, 1, 2])


class Spanning(nn.Module):
    """``post(relu(conv(u)))`` where ``u`` unites channels of ``relu(pre(x))`` that a grouped
    (transposed) convolution reads in different groups: ``i`` with ``i + 3`` (a sum with the
    channels swapped in halves: 3 generators) or every channel with the next (a rolled residual
    with a second producer: 1 generator)."""

    def __init__(self, conv: nn.Module, unite: str) -> None:
        super().__init__()
        self.pre, self.pre2, self.post = nn.Conv2d(2, 6, 1), nn.Conv2d(2, 6, 1), nn.Conv2d(6, 2, 1)
        self.conv, self.unite = conv, unite

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.pre(x))
        if self.unite == "halves":
            u = h + h[:, HALVES]
        else:
            u = h + F.relu(self.pre2(x)).roll(1, 1) + h.roll(1, 1)
        return self.post(F.relu(self.conv(u)))


@pytest.mark.parametrize("unite, united", [("halves", 3), ("rolled", 1)])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("groups", [2, 3, 6])
def test_generators_split_across_groups_are_exact(groups, transposed, unite, united):
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(6, 6, 3, padding=1, groups=groups)
    example = (torch.randn(2, 2, 5, 5, dtype=DTYPE),)
    fresh = [(torch.randn(3, 2, 4, 6, dtype=DTYPE),)]
    s, change = gauged(lambda: Spanning(conv, unite), example, fresh)
    assert_exact(s, change, united + 6)


def _tied_conv_pair(m: Between, h: Tensor, groups: int) -> Tensor:
    hidden = F.relu(F.conv2d(h, m.w, groups=groups, padding=1))
    return F.conv_transpose2d(hidden, m.w, groups=groups, padding=1)


# name: (op, weight shape, bias shape, channels out, generators)
WEIGHTS = {
    "a view of a flat parameter, groups=2": (
        lambda m, h: F.conv2d(h, m.w.view(6, 3, 3, 3), m.b, groups=2, padding=1),
        (162,), (6,), 6, 12,
    ),
    "a view that splits rows, groups=2": (
        lambda m, h: F.conv2d(h, m.w.view(12, 3, 3, 3), m.b, groups=2, padding=1),
        (6, 6, 3, 3), (12,), 12, 18,
    ),
    "a view that merges rows": (
        lambda m, h: F.conv2d(h, m.w.view(6, 6, 3, 3), m.b, padding=1), (12, 3, 3, 3), (6,), 6, 12,
    ),
    "transposed, groups=2": (
        lambda m, h: F.conv2d(h, m.w.transpose(0, 1), m.b, groups=2, padding=1),
        (3, 6, 3, 3), (6,), 6, 12,
    ),
    "kernel dims permuted": (
        lambda m, h: F.conv2d(h, m.w.permute(0, 3, 1, 2), m.b, padding=1), (6, 3, 3, 6), (6,), 6,
        12,
    ),
    "flipped along every dim": (
        lambda m, h: F.conv2d(h, m.w.flip(0, 1, 2, 3), m.b, padding=1), (6, 6, 3, 3), (6,), 6, 12,
    ),
    "flipped bias": (
        lambda m, h: F.conv2d(h, m.w, m.b.flip(0), padding=1), (6, 6, 3, 3), (6,), 6, 12,
    ),
    "rolled rows": (
        lambda m, h: F.conv2d(h, m.w.roll(1, 0), m.b, padding=1), (6, 6, 3, 3), (6,), 6, 12,
    ),
    "transposed conv of a view": (
        lambda m, h: F.conv_transpose2d(h, m.w.view(6, 3, 3, 3), m.b, groups=2, padding=1),
        (3, 6, 3, 3), (6,), 6, 12,
    ),
    "transposed conv of a flip": (
        lambda m, h: F.conv_transpose2d(h, m.w.flip(1), m.b, groups=2, padding=1),
        (6, 3, 3, 3), (6,), 6, 12,
    ),
    "unbatched input, groups=2": (
        lambda m, h: F.conv2d(h[0], m.w, m.b, groups=2, padding=1)[None],
        (6, 3, 3, 3), (6,), 6, 12,
    ),
    "one weight for two convs": (
        lambda m, h: F.conv2d(F.relu(F.conv2d(h, m.w, m.b, padding=1)), m.w, m.b, padding=1),
        (6, 6, 3, 3), (6,), 6, 6,
    ),
    "one weight, groups 2 and 1 on two inputs": (
        lambda m, h: F.conv2d(h, m.w, groups=2, padding=1) + F.conv2d(h[:, :3], m.w, padding=1),
        (6, 3, 3, 3), (1,), 6, 9,
    ),
    # tied: a channel's factors pair as 2 r = p + q, which some generators cannot state (missed)
    "a conv and its transpose, groups=2": (
        lambda m, h: _tied_conv_pair(m, h, 2), (6, 3, 3, 3), (1,), 6, None,
    ),
    "a conv and its transpose, depthwise": (
        lambda m, h: _tied_conv_pair(m, h, 6), (6, 1, 3, 3), (1,), 6, None,
    ),
    # not arrangements of one parameter: the weight is fixed (its symmetries, if any, missed)
    "a slice of rows": (
        lambda m, h: F.conv2d(h, m.w[:6], m.b[:6], padding=1), (9, 6, 3, 3), (9,), 6, None,
    ),
    "expanded": (lambda m, h: F.conv2d(h, m.w.expand(6, 1, 3, 3), padding=1, groups=6),
                 (1, 1, 3, 3), (1,), 6, None),  # fmt: skip
    "repeated": (lambda m, h: F.conv2d(h, m.w.repeat(2, 1, 1, 1), padding=1, groups=2),
                 (3, 3, 3, 3), (1,), 6, None),  # fmt: skip
    "a column of it as the bias of a conv": (
        lambda m, h: F.conv2d(h, m.w, m.w[:, 0, 0, 0], padding=1), (6, 6, 3, 3), (1,), 6, None,
    ),
    "its absolute value": (
        lambda m, h: F.conv2d(h, m.w.abs(), padding=1), (6, 6, 3, 3), (1,), 6, None,
    ),
    "a product of two parameters": (
        lambda m, h: F.conv2d(h, m.w * m.b, padding=1), (6, 6, 3, 3), (3,), 6, None,
    ),
    "normalised per row (weight standardisation)": (
        lambda m, h: F.conv2d(h, m.w / m.w.flatten(1).norm(dim=1)[:, None, None, None], padding=1),
        (6, 6, 3, 3), (1,), 6, 0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("op, w, b, cout, expected", list(WEIGHTS.values()), ids=list(WEIGHTS))
def test_convolution_weight_spellings_are_exact(op, w, b, cout, expected):
    s, change = conv_case(2, op, cout, w=w, b=b)
    assert_exact(s, change, expected)


# --- linear maps and products of parameters -------------------------------------------------------
class Around(nn.Module):
    """``head(relu(op(self, h, g)))`` with ``h = relu(pre(x))`` and ``g = relu(l2(h))``
    (``HIDDEN`` channels each) and free parameters ``q [6, 6]``, ``r [5, 6]``: an op that
    multiplies a parameter used elsewhere (``l2``'s weight or bias) by another must not leave
    ``l2``'s generators in place."""

    def __init__(self, op) -> None:
        super().__init__()
        self.pre, self.l2 = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.q, self.r = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(5, 6))
        self.op, self.head = op, nn.LazyLinear(3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.pre(x))
        g = F.relu(self.l2(h))
        return self.head(F.relu(self.op(self, h, g)).reshape(x.shape[0], -1))


def around(op) -> tuple:
    example = (torch.randn(3, 4, dtype=DTYPE),)
    fresh = [(torch.randn(2, 4, dtype=DTYPE),), (torch.randn(7, 4, dtype=DTYPE),)]
    return gauged(lambda: Around(op), example, fresh)


def _tied(m: Around, h: Tensor) -> Tensor:
    """An autoencoder's tied weights: ``r`` encodes, ``r.T`` decodes."""
    return F.linear(F.relu(F.linear(h, m.r, m.r[0, :5])), m.r.t())


# name: (op, generators or None where some are missed)
LINEAR = {
    "tied weight, used transposed": (
        lambda m, h, g: F.linear(F.relu(F.linear(h, m.r)), m.r.t()),
        None,
    ),
    "tied weight, x @ W.T then @ W": (lambda m, h, g: F.relu(h @ m.r.T) @ m.r, None),
    "tied weight with a slice as bias": (lambda m, h, g: _tied(m, h), None),
    "einsum of two parameters, one of them l2's": (
        lambda m, h, g: h @ torch.einsum("io,oj->ij", m.q, m.l2.weight) + g,
        None,
    ),
    "einsum of l2's weight and a parameter": (
        lambda m, h, g: h @ torch.einsum("io,oj->ij", m.l2.weight, m.q) + g,
        None,
    ),
    "einsum of l2's bias and a parameter": (
        lambda m, h, g: torch.einsum("o,oj->j", m.l2.bias, m.q) * g,
        None,
    ),
    "matmul of a parameter and a slice of l2's weight": (
        lambda m, h, g: (m.q @ m.l2.weight[:, :3]).sum(-1) * g,
        None,
    ),
    "linear of a slice of l2's weight": (
        lambda m, h, g: F.linear(m.l2.weight[:3], m.q).sum(0) * g,
        None,
    ),
    "linear with a slice of l2's bias as bias": (
        lambda m, h, g: F.linear(h, m.q, m.l2.bias[:6]) + g,
        None,
    ),
    "linear with a column of l2's weight as bias": (
        lambda m, h, g: F.linear(h, m.q, m.l2.weight.T[0]) + g,
        None,
    ),
    "addmm with a slice of l2's bias": (
        lambda m, h, g: torch.addmm(m.l2.bias[:6], h, m.q) + g,
        None,
    ),
    "addmm with l2's bias broadcast": (lambda m, h, g: torch.addmm(m.l2.bias, h, m.q) + g, 12),
    "addmm with l2's bias times 1": (lambda m, h, g: torch.addmm(m.l2.bias * 1, h, m.q) + g, 12),
    "addmm with beta=2, alpha=0.5": (
        lambda m, h, g: torch.addmm(m.l2.bias, h, m.q, beta=2, alpha=0.5) + g,
        12,
    ),
    "addmm with beta=0": (lambda m, h, g: torch.addmm(m.r[0], h, m.q, beta=0), 12),
    "addmm with a product as the bias": (
        lambda m, h, g: torch.addmm(m.l2.bias @ m.q, h, m.q.T) + g,
        None,
    ),
    "baddbmm, bias broadcast": (
        lambda m, h, g: torch.baddbmm(m.l2.bias, h.unsqueeze(0), m.q.unsqueeze(0))[0] + g,
        12,
    ),
    "addmv per row": (
        lambda m, h, g: torch.stack([torch.addmv(m.l2.bias, m.q, v) for v in h]) + g,
        12,
    ),
    "a parameter indexed with None (missed: fixed)": (
        lambda m, h, g: torch.baddbmm(m.l2.bias, h[None], m.q[None])[0] + g,
        None,
    ),
    "conv1d of a slice of l2's weight": (
        lambda m, h, g: F.conv1d(m.l2.weight[None], m.q[..., None]).sum(-1) * g,
        None,
    ),
    "F.bilinear (missed: blocks)": (
        lambda m, h, g: F.bilinear(h, g, m.q.view(1, 6, 6).expand(5, 6, 6), m.r[:, 0]),
        None,
    ),
    "nn.Bilinear weight (missed: blocks)": (
        lambda m, h, g: F.bilinear(h[:, :5], g, m.r.view(5, 1, 6).expand(5, 5, 6)),
        None,
    ),
}


@pytest.mark.parametrize("op, expected", list(LINEAR.values()), ids=list(LINEAR))
def test_linear_maps_and_products_of_parameters_are_exact(op, expected):
    s, change = around(op)
    assert_exact(s, change, expected)


# --- norm layers ----------------------------------------------------------------------------------
class Normed(nn.Module):
    """``post(relu(norm(relu(pre(x)))))`` over ``HIDDEN`` channels (dim 1), with ``dim``
    spatial dims (0: ``pre`` and ``post`` are linear): the norm's input is normalised, so its
    affine parameters, if any, produce the only generators (``HIDDEN``)."""

    def __init__(self, norm: nn.Module, dim: int) -> None:
        super().__init__()
        layer = CONV.get(dim, lambda i, o, k: nn.Linear(i, o))
        self.pre, self.norm, self.post = layer(2, HIDDEN, 1), norm, layer(HIDDEN, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(F.relu(self.norm(F.relu(self.pre(x)))))


def normed(norm: Callable[[], nn.Module], dim: int, train: bool) -> tuple:
    """The change under a random gauge of :class:`Normed` (batches of 4, then 2 and 5; other
    spatial sizes), in training or evaluation mode."""
    first, *others = SIZES.get(dim, (0, 0, 0))
    example = (torch.randn(4, 2, *[first] * dim, dtype=DTYPE),)
    fresh = [
        (torch.randn(n, 2, *[s] * dim, dtype=DTYPE),) for n, s in zip((2, 5), others, strict=True)
    ]
    return gauged(lambda: Normed(norm(), dim), example, fresh, train=train)


BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
# name: (norm of (dim), spatial dims, generators)
NORMS = {
    **{
        f"BatchNorm{max(d, 1)}d over {d + 2 - (d == 0)}-d {k}": (
            lambda d=d, kw=kw: BATCH_NORM[max(d, 1)](HIDDEN, **kw), d,
            0 if kw.get("affine") is False else HIDDEN,
        )
        for d in (0, 1, 2, 3)
        for k, kw in {
            "": {}, "track_running_stats=False": {"track_running_stats": False},
            "momentum=None": {"momentum": None}, "affine=False": {"affine": False},
        }.items()
    },
    **{
        f"GroupNorm({g}) affine={a}": (
            lambda g=g, a=a: nn.GroupNorm(g, HIDDEN, affine=a), 2, HIDDEN if a else 0,
        )
        for g in (1, 2, 3, 6)
        for a in (True, False)
    },
    **{
        f"InstanceNorm{d}d {kw}": (
            lambda d=d, kw=kw: INSTANCE_NORM[d](HIDDEN, **kw), d,
            HIDDEN if kw.get("affine") else 0,
        )
        for d in (1, 2, 3)
        for kw in ({}, {"affine": True}, {"track_running_stats": True},
                   {"affine": True, "track_running_stats": True, "momentum": None})  # fmt: skip
    },
    "SyncBatchNorm (one process)": (lambda: nn.SyncBatchNorm(HIDDEN), 2, HIDDEN),
    "LocalResponseNorm": (lambda: nn.LocalResponseNorm(3), 2, 0),
    "LocalResponseNorm, k=0": (lambda: nn.LocalResponseNorm(3, k=0.0), 2, 0),
}  # fmt: skip


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("norm, dim, expected", list(NORMS.values()), ids=list(NORMS))
def test_norm_layers_are_exact(norm, dim, expected, train):
    s, change = normed(norm, dim, train)
    assert_exact(s, change, expected)


class Gains(nn.Module):
    """``head(relu(f(norm(relu(pre(x)).view(..., 2, 3)))))``: a norm over ``(2, 3)`` or over
    the last dim, read by ``f``: a linear map of the last dim (the gains' factors are united
    over the other dim), a sum over dim -2 first, or the whole trailing shape flattened."""

    def __init__(self, norm: nn.Module, read: str) -> None:
        super().__init__()
        self.pre, self.norm, self.read = nn.Linear(4, HIDDEN), norm, read
        self.lin, self.head = nn.Linear(3, 4), nn.LazyLinear(2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(F.relu(self.pre(x)).view(*x.shape[:-1], 2, 3))
        if self.read == "last":
            y = self.lin(y)
        elif self.read == "sum":
            y = self.lin(y.sum(-2))
        return self.head(F.relu(y).flatten(-2 if self.read != "sum" else -1))


# name: (norm, how it is read, generators: the gains' and ``lin``'s rows when read)
GAINS = {
    "LayerNorm((2, 3)), read per last dim": (lambda: nn.LayerNorm((2, 3)), "last", 3 + 4),
    "LayerNorm((2, 3)), summed over dim -2": (lambda: nn.LayerNorm((2, 3)), "sum", 3 + 4),
    "LayerNorm((2, 3)), flattened": (lambda: nn.LayerNorm((2, 3)), "flat", 6),
    "LayerNorm((2, 3), bias=False)": (lambda: nn.LayerNorm((2, 3), bias=False), "last", 3 + 4),
    "LayerNorm(3) over (2, 3)": (lambda: nn.LayerNorm(3), "flat", 3),
    "LayerNorm((2, 3)) without affine": (
        lambda: nn.LayerNorm((2, 3), elementwise_affine=False),
        "last",
        4,
    ),
    "RMSNorm((2, 3))": (lambda: nn.RMSNorm((2, 3)), "last", 3 + 4),
    "RMSNorm((2, 3), eps=0.1)": (lambda: nn.RMSNorm((2, 3), eps=0.1), "flat", 6),
    "RMSNorm(3) without weight": (lambda: nn.RMSNorm(3, elementwise_affine=False), "last", 4),
}


@pytest.mark.parametrize("norm, read, expected", list(GAINS.values()), ids=list(GAINS))
def test_norm_gains_over_several_dims_are_exact(norm, read, expected):
    example = (torch.randn(5, 4, dtype=DTYPE),)
    fresh = [(torch.randn(2, 3, 4, dtype=DTYPE),), (torch.randn(1, 4, dtype=DTYPE),)]
    s, change = gauged(lambda: Gains(norm(), read), example, fresh)
    assert_exact(s, change, expected)


# name: (op on (m, h, g) of :class:`Around`, generators)
NORM_PARAMETERS = {
    "a bias without a weight, l2's bias (LayerNorm)": (
        lambda m, h, g: F.layer_norm(h, (6,), None, m.l2.bias) + g,
        None,
    ),
    "a bias without a weight, l2's bias (GroupNorm)": (
        lambda m, h, g: F.group_norm(h, 2, None, m.l2.bias) + g,
        None,
    ),
    "a bias without a weight, l2's bias (BatchNorm)": (
        lambda m, h, g: F.batch_norm(h, None, None, None, m.l2.bias, True) + g,
        None,
    ),
    "running mean sharing l2's bias's memory": (
        lambda m, h, g: F.batch_norm(h, m.l2.bias.detach(), torch.ones(6, dtype=DTYPE), m.q[0]) + g,
        None,  # fmt: skip
    ),
    "l2's bias as the weight of an RMSNorm, added to g": (
        lambda m, h, g: F.rms_norm(h, (6,), m.l2.bias) + g,
        HIDDEN,
    ),
    "l2's bias as the weight of an RMSNorm of g": (
        lambda m, h, g: F.rms_norm(g, (6,), m.l2.bias),
        None,
    ),
    "a row of l2's weight as the weight of a LayerNorm": (
        lambda m, h, g: F.layer_norm(g, (6,), m.l2.weight[0]),
        None,
    ),
    "one parameter normalised and the weight": (
        lambda m, h, g: g * F.layer_norm(m.l2.bias, (6,), m.l2.bias),
        None,
    ),
    "torch.layer_norm, as F.layer_norm": (
        lambda m, h, g: torch.layer_norm(h, (6,), m.q[0], m.r[0]) + g,
        HIDDEN,
    ),
}


@pytest.mark.parametrize("op, expected", list(NORM_PARAMETERS.values()), ids=list(NORM_PARAMETERS))
def test_norm_parameters_in_other_roles_are_exact(op, expected):
    s, change = around(op)
    assert_exact(s, change, expected)


# --- embeddings -----------------------------------------------------------------------------------
class Embedded(nn.Module):
    """``head(relu(lin(embed(ids))))`` (bags: ``embed(ids, per_sample_weights=...)``): the
    table's columns produce ``HIDDEN`` channels that ``lin`` consumes, ``lin`` its own
    ``HIDDEN``."""

    def __init__(self, embed: nn.Module, weighted: bool = False) -> None:
        super().__init__()
        self.embed, self.weighted = embed, weighted
        self.lin, self.head = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 3)

    def forward(self, ids: Tensor) -> Tensor:
        if self.weighted:
            weights = torch.linspace(0.5, 1.5, ids.numel(), dtype=DTYPE).view(ids.shape)
            y = self.embed(ids, per_sample_weights=weights)
        else:
            y = self.embed(ids)
        return self.head(F.relu(self.lin(y)))


IDS = torch.tensor([[0, 2, 1, 4], [3, 0, 0, 1], [4, 4, 2, 3]])
FRESH_IDS = [torch.tensor([[1, 0]]), torch.tensor([[3, 3, 3, 0, 1, 2]] * 4)]
# name: (table, per-sample weights, generators)
EMBEDDINGS = {
    "Embedding": (lambda: nn.Embedding(5, HIDDEN), False, 2 * HIDDEN),
    "padding_idx": (lambda: nn.Embedding(5, HIDDEN, padding_idx=0), False, 2 * HIDDEN),
    "padding_idx=-1": (lambda: nn.Embedding(5, HIDDEN, padding_idx=-1), False, 2 * HIDDEN),
    "scale_grad_by_freq": (
        lambda: nn.Embedding(5, HIDDEN, scale_grad_by_freq=True),
        False,
        2 * HIDDEN,
    ),
    "sparse": (lambda: nn.Embedding(5, HIDDEN, sparse=True), False, 2 * HIDDEN),
    # the forward renormalises the rows it reads in place: the table is fixed
    "max_norm": (lambda: nn.Embedding(5, HIDDEN, max_norm=1.0), False, HIDDEN),
    "max_norm never reached": (lambda: nn.Embedding(5, HIDDEN, max_norm=1e9), False, HIDDEN),
    "max_norm, norm_type=1": (
        lambda: nn.Embedding(5, HIDDEN, max_norm=1.0, norm_type=1.0),
        False,
        HIDDEN,
    ),
    **{
        f"EmbeddingBag {mode}{extra}": (
            lambda mode=mode, kw=kw: nn.EmbeddingBag(5, HIDDEN, mode=mode, **kw),
            False,
            HIDDEN if "max_norm" in kw else 2 * HIDDEN,
        )
        for mode in ("sum", "mean", "max")
        for extra, kw in {
            "": {},
            ", padding_idx": {"padding_idx": 0},
            ", max_norm": {"max_norm": 1.0},
        }.items()  # fmt: skip
    },
    "EmbeddingBag sum, fixed per_sample_weights": (
        lambda: nn.EmbeddingBag(5, HIDDEN, mode="sum"),
        True,
        2 * HIDDEN,
    ),
}


@pytest.mark.parametrize(
    "embed, weighted, expected", list(EMBEDDINGS.values()), ids=list(EMBEDDINGS)
)
def test_embeddings_are_exact(embed, weighted, expected):
    fresh = [(ids,) for ids in FRESH_IDS]
    s, change = gauged(lambda: Embedded(embed(), weighted), (IDS,), fresh)
    assert_exact(s, change, expected)
    if embed().max_norm is not None:  # the table is fixed
        assert "embed.weight" not in s.params, s.summary()


class Bags(nn.Module):
    """``head(relu(lin(bag(ids, offsets, per_sample_weights=w))))`` on flat ``ids``, with ``w``
    fixed, a slice of a parameter (which fixes it), or rescaled (a one-column embedding of the
    ids through a ReLU: the bag's output would carry the sum of two factors, so the table is
    fixed)."""

    def __init__(self, weights: str) -> None:
        super().__init__()
        self.bag, self.weights = nn.EmbeddingBag(5, HIDDEN, mode="sum"), weights
        self.scores, self.p = nn.Embedding(5, 1), nn.Parameter(torch.rand(24))
        self.lin, self.head = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 3)

    def forward(self, ids: Tensor) -> Tensor:
        offsets = torch.arange(0, ids.numel(), 2)
        w = {"fixed": torch.linspace(0.5, 1.5, ids.numel(), dtype=DTYPE),
             "parameter": self.p[: ids.numel()],
             "rescaled": F.relu(self.scores(ids))[:, 0]}[self.weights]  # fmt: skip
        return self.head(F.relu(self.lin(self.bag(ids, offsets, per_sample_weights=w))))


@pytest.mark.parametrize("weights, expected", [("fixed", 2 * HIDDEN), ("parameter", 2 * HIDDEN),
                                               ("rescaled", HIDDEN)])  # fmt: skip
def test_bags_with_per_sample_weights_and_offsets_are_exact(weights, expected):
    fresh = [(ids.flatten(),) for ids in FRESH_IDS]
    s, change = gauged(lambda: Bags(weights), (IDS.flatten(),), fresh)
    assert_exact(s, change, expected)
    assert (weights == "rescaled") == ("bag.weight" not in s.params), s.summary()


# --- parametrizations and lazy modules ------------------------------------------------------------
class Symmetric(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).transpose(0, 1)


class Doubled(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


class Transposed(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.T


class RowNormalised(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=1, keepdim=True)


class GainTimesDirection(nn.Module):
    """Two originals, ``g [out, 1]`` and ``v [out, in]``: ``W = g * v``."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return g * v

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        norm = w.norm(dim=1, keepdim=True)
        return norm, w / norm


def parametrized(parametrization: nn.Module, tensor: str = "weight") -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layer = nn.Linear(HIDDEN, HIDDEN)
        parametrize.register_parametrization(layer, tensor, parametrization)
        return layer

    return make


class Cached(nn.Module):
    """A parametrized layer applied twice under ``parametrize.cached()`` (one weight tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = parametrized(Doubled())()

    def forward(self, x: Tensor) -> Tensor:
        with parametrize.cached():
            return self.layer(F.relu(self.layer(x)))


class Wrapped(nn.Module):
    """``post(relu(layer(relu(pre(x)))))``: ``pre``'s ``HIDDEN`` channels are consumed by
    ``layer``'s weight, ``layer``'s ``HIDDEN`` outputs by ``post``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.pre, self.layer, self.post = nn.Linear(4, HIDDEN), layer, nn.Linear(HIDDEN, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(F.relu(self.layer(F.relu(self.pre(x)))))


def _legacy(wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``wrap`` (the deprecated hook-based ``weight_norm``, ``spectral_norm``) of a linear layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return wrap(nn.Linear(HIDDEN, HIDDEN))


# name: (layer, training mode, generators)
PARAMETRIZED = {
    # W = g v / |v|: g carries the rows' (dim=0) or columns' (dim=1) factors, one gain (dim=None)
    # the whole weight's; the channels meeting v's normalised slices form one generator
    "weight_norm, dim=0": (
        lambda: parametrizations.weight_norm(nn.Linear(HIDDEN, HIDDEN)),
        False,
        HIDDEN + 1,
    ),
    "weight_norm, dim=1": (
        lambda: parametrizations.weight_norm(nn.Linear(HIDDEN, HIDDEN), dim=1),
        False,
        HIDDEN + 1,
    ),
    "weight_norm, dim=None": (
        lambda: parametrizations.weight_norm(nn.Linear(HIDDEN, HIDDEN), dim=None),
        False,
        2,
    ),
    "spectral_norm, eval": (
        lambda: parametrizations.spectral_norm(nn.Linear(HIDDEN, HIDDEN)),
        False,
        0,
    ),
    "spectral_norm, train (power iteration)": (
        lambda: parametrizations.spectral_norm(nn.Linear(HIDDEN, HIDDEN)),
        True,
        0,
    ),
    "orthogonal": (lambda: parametrizations.orthogonal(nn.Linear(HIDDEN, HIDDEN)), False, 0),
    "legacy weight_norm (weight_g, weight_v)": (
        lambda: _legacy(torch.nn.utils.weight_norm),
        False,
        HIDDEN + 1,
    ),
    "legacy spectral_norm, train": (lambda: _legacy(torch.nn.utils.spectral_norm), True, 0),
    "symmetric": (parametrized(Symmetric()), False, 0),
    "row-normalised": (parametrized(RowNormalised()), False, 0),
    "doubled": (parametrized(Doubled()), False, 2 * HIDDEN),
    "doubled bias": (parametrized(Doubled(), "bias"), False, 2 * HIDDEN),
    "transposed": (parametrized(Transposed()), False, 2 * HIDDEN),
    "g * v, two originals (missed)": (parametrized(GainTimesDirection()), False, None),
    "cached, applied twice": (Cached, False, HIDDEN),
    "LazyLinear": (lambda: nn.LazyLinear(HIDDEN), False, 2 * HIDDEN),
}


@pytest.mark.parametrize(
    "layer, train, expected", list(PARAMETRIZED.values()), ids=list(PARAMETRIZED)
)
def test_parametrized_and_lazy_layers_are_exact(layer, train, expected):
    example = (torch.randn(3, 4, dtype=DTYPE),)
    fresh = [(torch.randn(1, 4, dtype=DTYPE),), (torch.randn(2, 5, 4, dtype=DTYPE),)]
    s, change = gauged(lambda: Wrapped(layer()), example, fresh, train=train)
    assert_exact(s, change, expected)


class LazyStack(nn.Module):
    """Lazy convolution, batch norm and instance norm (affine) over ``x [B, 3, L]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.LazyConv1d(4, 3), nn.LazyBatchNorm1d()
        self.inorm, self.head = nn.LazyInstanceNorm1d(affine=True), nn.LazyConv1d(2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.inorm(F.relu(self.bn(self.conv(x))))))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_lazy_modules_once_run_are_exact(train):
    example = (torch.randn(3, 3, 7, dtype=DTYPE),)
    fresh = [(torch.randn(2, 3, 5, dtype=DTYPE),), (torch.randn(4, 3, 9, dtype=DTYPE),)]
    s, change = gauged(LazyStack, example, fresh, train=train)
    assert_exact(s, change, 4)  # the instance norm's gains; the batch norm's are normalised


def test_a_lazy_module_that_never_ran_is_refused():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(gaugefix.TracingError, match="lazy module"):
        gaugefix.discover(model, torch.randn(3, 5, dtype=DTYPE))


class TableFirst(nn.Module):
    """``F.embedding_bag(table, ids)``: the legacy argument order, which the op swaps back, with
    the table ``pre.weight.T`` whose rows ``pre`` produces: the bag must not leave them free."""

    def __init__(self, swapped: bool) -> None:
        super().__init__()
        self.swapped = swapped
        self.pre, self.lin = nn.Linear(5, HIDDEN), nn.Linear(HIDDEN, 3)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, ids: Tensor) -> Tensor:
        table, offsets = self.pre.weight.T, torch.arange(0, ids.numel(), 4)
        args = (table, ids) if self.swapped else (ids, table)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the op warns about the legacy order
            bags = F.embedding_bag(*args, offsets, mode="sum")
        return self.lin(F.relu(bags)) + self.head(F.relu(self.pre(torch.eye(5, dtype=DTYPE))))[:1]


@pytest.mark.parametrize("swapped", [False, True], ids=["ids first", "table first"])
def test_a_bag_with_the_table_passed_first_is_exact(swapped):
    s, change = gauged(lambda: TableFirst(swapped), (IDS.flatten(),), [(IDS[:2].flatten(),)])
    assert_exact(s, change, 0 if swapped else HIDDEN)
