"""The calibration pass of ``equalize_(..., "activation")`` never records wrong maxima: for
each counted weight read as a linear map, ``max_t |x_{t,j}|`` of the input multiplying its
dim, equal (to ``EXACT``) to the maxima that plain forward hooks record on an unfused model of
``nn.Linear`` layers, or no maxima and the weight listed as not followed. A copy written in
place (``w2 = W.clone(); w2.t_()``, ``copy_``, ``x[i] = v``, ``out=``, ``.data = v``, ``set_``)
no longer stands for ``W``; a weight written in place is not followed."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaugefix.calibration import _calibrated
from test_equalize_products import EXACT, D, _batch

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, TOKENS, HEADS = 4, 7, 2


def maxima(model: nn.Module, *calibration: object) -> tuple[dict, tuple[str, ...]]:
    """The pass's maxima and the weights it lists as not followed (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _calibrated(model, dict(model.named_parameters()), calibration)


class Hooked(nn.Module):
    """The unfused reference: a LayerNorm, then ``nn.Linear`` layers sharing one weight
    ``[OUT, D]``, reading the inputs ``inputs(h)``; a forward hook records ``max |x_j|``."""

    def __init__(self, inputs: Callable[[Tensor], list[Tensor]]) -> None:
        super().__init__()
        self.inputs, self.norm, self.seen = inputs, nn.LayerNorm(D), []
        self.lin = nn.Linear(D, OUT, bias=False)
        self.lin.register_forward_hook(lambda m, args, out: self.seen.append(args[0]))

    def forward(self, x: Tensor) -> Tensor:
        return sum(self.lin(u) for u in self.inputs(self.norm(x)))

    def maxima(self, x: Tensor) -> Tensor:
        self.seen.clear()
        with torch.no_grad():
            self(x)
        return torch.stack([u.abs().reshape(-1, D).amax(0) for u in self.seen]).amax(0)


class Spelled(nn.Module):
    """A LayerNorm, then a weight ``w`` (``[OUT, D]``; ``[D, OUT]`` where ``transposed``,
    ``[D, D]`` where ``square``) read as ``read(h, w, model)`` spells it; ``v`` another weight
    of ``w``'s shape."""

    def __init__(self, read: Callable, transposed: bool = False, square: bool = False) -> None:
        super().__init__()
        self.read, self.norm = read, nn.LayerNorm(D)
        shape = (D, D) if square else (D, OUT) if transposed else (OUT, D)
        self.w, self.v = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.read(self.norm(x), self.w, self)


def spelled(read: Callable, transposed: bool = False, square: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Spelled(read, transposed, square).to(torch.float64).eval()


def _two(t: Tensor) -> Tensor:
    return t.expand(2, *t.shape)  # stride 0 along the batch


def _copy_under_vmap(h: Tensor, w: Tensor) -> Tensor:
    return torch.vmap(lambda u: F.linear(u.clone().mul_(1), w))(h)


def twice(h: Tensor, w: Tensor) -> list[Tensor]:
    return [h, 2 * h - 1]


def scaled(h: Tensor, w: Tensor) -> list[Tensor]:
    return [h * w.sum()]


# How a weight is read, whether it is stored [D, OUT], the dim that runs over the channels,
# and the inputs the reference's linear layers read.
EXACT_READS = {
    "linear": (lambda h, w, m: F.linear(h, w), False, 1, None),
    "x @ w.T": (lambda h, w, m: h @ w.T, False, 1, None),
    "x @ w [in, out]": (lambda h, w, m: h @ w, True, 0, None),
    "matmul [in, out]": (lambda h, w, m: torch.matmul(h, w), True, 0, None),
    "mm": (lambda h, w, m: torch.mm(h, w.t()), False, 1, None),
    "addmm [in, out]": (lambda h, w, m: torch.addmm(m.v[0], h, w), True, 0, None),
    "bmm expanded": (lambda h, w, m: torch.bmm(_two(h), w.T.expand(2, D, OUT)), False, 1, None),
    "baddbmm": (lambda h, w, m: torch.baddbmm(m.v[:, 0], _two(h), _two(w).mT), False, 1, None),
    "einsum": (lambda h, w, m: torch.einsum("td,od->to", h, w), False, 1, None),
    "einsum [in, out]": (lambda h, w, m: torch.einsum("...d,do->...o", h, w), True, 0, None),
    "detach().T": (lambda h, w, m: h @ w.detach().T, False, 1, None),
    "clone()": (lambda h, w, m: F.linear(h, w.clone()), False, 1, None),
    "clone() then .T": (lambda h, w, m: h @ w.clone().T, False, 1, None),
    "read twice": (lambda h, w, m: F.linear(h, w) + F.linear(2 * h - 1, w), False, 1, twice),
    "scaled by w.sum()": (lambda h, w, m: F.linear(h * w.sum(), w) * w.sum(), False, 1, scaled),
    "vmap, w unbatched": (
        lambda h, w, m: torch.vmap(lambda u: F.linear(u, w))(h.view(TOKENS, 1, D)),
        False,
        1,
        None,
    ),
    "a copy read under vmap, an in-place write to the input": (
        lambda h, w, m: _copy_under_vmap(h, w.clone()),
        False,
        1,
        None,
    ),
    "nested vmap": (
        lambda h, w, m: torch.vmap(torch.vmap(lambda u: w @ u))(h.view(TOKENS, 1, D)),
        False,
        1,
        None,
    ),
}


@pytest.mark.parametrize("how", EXACT_READS)
def test_a_read_records_the_hooked_reference_maxima(how):
    read, transposed, dim, inputs = EXACT_READS[how]
    model = spelled(read, transposed)
    x = _batch(TOKENS, D)
    reference = Hooked(lambda h: (inputs or (lambda h, w: [h]))(h, model.w.detach()))
    reference = reference.to(torch.float64)
    reference.norm.load_state_dict(model.norm.state_dict())
    got, left = maxima(model, x)
    assert left == ()
    assert [key for key in got if key[0] == "w"] == [("w", dim)]
    want = reference.maxima(x)
    assert float((got["w", dim] - want).abs().max()) <= EXACT * float(want.max())


# A copy written in place before it is read (or the weight itself): not followed. Before, each
# was read as ``w`` (the dims swapped, or another tensor's input recorded as ``w``'s).
WRITTEN = {
    "t_": lambda h, w, m: F.linear(h, _written(w.clone(), "t_")),
    "transpose_": lambda h, w, m: F.linear(h, w.clone().transpose_(0, 1)),
    "as_strided_": lambda h, w, m: F.linear(h, w.clone().as_strided_((D, D), (1, D))),
    "detach() clone() swapdims_": lambda h, w, m: F.linear(h, w.detach().clone().swapdims_(0, 1)),
    "copy_ of another weight": lambda h, w, m: F.linear(3 * h, w.clone().copy_(m.v)),
    "setitem": lambda h, w, m: F.linear(h, _set(w.clone())),
    "a view's mul_": lambda h, w, m: F.linear(h, _view_mul(w.clone())),
    "out=": lambda h, w, m: F.linear(3 * h, _out(m.v, w.clone())),
    "+=": lambda h, w, m: F.linear(h, _iadd(w.clone(), m.v)),
    "zero_ add_": lambda h, w, m: F.linear(3 * h, w.clone().zero_().add_(m.v)),
    "index_copy_": lambda h, w, m: F.linear(h, w.clone().index_copy_(0, _first(), m.v[:1])),
    "set_": lambda h, w, m: F.linear(3 * h, w.clone().set_(m.v.detach() * 1)),
    ".data =": lambda h, w, m: F.linear(3 * h, _data(w.clone(), m.v)),
    "a constant written from the weight": lambda h, w, m: F.linear(
        h, torch.zeros(D, D, dtype=w.dtype).copy_(w)
    ),
    "a detached alias's mul_": lambda h, w, m: F.linear(h, w.detach().mul_(1)),
    "the weight's own mul_": lambda h, w, m: F.linear(h, w.mul_(1)),
    "t().contiguous()": lambda h, w, m: h @ w.t().contiguous(),
    "to(float32)": lambda h, w, m: F.linear(h.float(), w.to(torch.float32)).double(),
    "vmap over the weight": lambda h, w, m: torch.vmap(lambda u: F.linear(h, u))(
        torch.stack([w, w])
    ).sum(0),
}


def _written(t: Tensor, method: str) -> Tensor:
    getattr(t, method)()
    return t


def _set(t: Tensor) -> Tensor:
    t[:, 0] = 0
    return t


def _view_mul(t: Tensor) -> Tensor:
    t[:, 0].mul_(2)
    return t


def _out(v: Tensor, t: Tensor) -> Tensor:
    torch.mul(v, 1.0, out=t)
    return t


def _iadd(t: Tensor, v: Tensor) -> Tensor:
    t += v
    return t


def _first() -> Tensor:
    return torch.zeros(1, dtype=torch.long)


def _data(t: Tensor, v: Tensor) -> Tensor:
    t.data = v.detach() * 1
    return t


@pytest.mark.parametrize("how", WRITTEN)
def test_a_copy_written_in_place_is_not_read_as_the_weight(how):
    got, left = maxima(spelled(WRITTEN[how], square=True), _batch(TOKENS, D))
    assert "w" in left
    assert [key for key in got if key[0] == "w"] == []


class Experts(nn.Module):
    """Stacked experts ``w`` ``[E, OUT, D]`` gathered per token (``w[ids]``), copied, then
    (``how``) written in place or viewed as one matrix, read by ``bmm``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.norm = how, nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(3, OUT, D))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        picked = self.w[torch.arange(h.shape[0]) % 3].clone()
        if self.how == "mul_":
            picked.mul_(2)
        if self.how == "view":
            return F.linear(h, picked.view(-1, D))
        return torch.bmm(picked, h.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("how", ["mul_", "view"])
def test_a_gathered_copy_written_or_viewed_is_not_followed(how):
    torch.manual_seed(0)
    model = Experts(how).to(torch.float64).eval()
    got, left = maxima(model, _batch(TOKENS, D))
    assert left == ("w",) and [key for key in got if key[0] == "w"] == []


def test_a_gathered_copy_read_as_it_is_records_each_experts_tokens():
    torch.manual_seed(0)
    model = Experts("read").to(torch.float64).eval()
    x = _batch(TOKENS, D)
    got, left = maxima(model, x)
    with torch.no_grad():
        h = model.norm(x).abs()
    want = torch.stack([h[e::3].amax(0) for e in range(3)])
    assert left == () and float((got["w", 2] - want).abs().max()) <= EXACT * float(want.max())


class Cached(nn.Module):
    """A weight copied once at construction (``w_cached``, a plain attribute): the forward
    reads the copy, never ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(OUT, D, dtype=torch.float64))
        self.w_cached = self.w.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w_cached)


def test_a_copy_made_before_the_pass_is_not_the_weight():
    torch.manual_seed(0)
    got, left = maxima(Cached(), _batch(TOKENS, D))
    assert got == {} and left == ()


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(D), nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.attn(h, h, h, need_weights=False)[0]


class HookedAttention(nn.Module):
    """The same attention with ``nn.Linear`` projections (hooked)."""

    def __init__(self, model: Attention) -> None:
        super().__init__()
        self.norm, mha = model.norm, model.attn
        self.q, self.k, self.v, self.out = (nn.Linear(D, D).double() for _ in range(4))
        for lin, w, b in zip(
            (self.q, self.k, self.v),
            mha.in_proj_weight.chunk(3),
            mha.in_proj_bias.chunk(3),
            strict=True,
        ):
            lin.weight.data, lin.bias.data = w.detach().clone(), b.detach().clone()
        self.out.load_state_dict(mha.out_proj.state_dict())
        self.seen: dict[str, Tensor] = {}
        for name in ("q", "out"):
            hook = lambda m, args, out, name=name: self.seen.__setitem__(name, args[0])  # noqa: E731
            getattr(self, name).register_forward_hook(hook)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        heads = [f(h).unflatten(-1, (HEADS, -1)).transpose(1, 2) for f in (self.q, self.k, self.v)]
        return self.out(F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(-2))


def test_multihead_attention_records_the_hooked_projections_inputs():
    torch.manual_seed(0)
    model = Attention().to(torch.float64).eval()
    reference = HookedAttention(model).eval()
    x = _batch(3, 5, D)
    with torch.no_grad():
        assert float((reference(x) - model(x)).abs().max()) <= EXACT * 10
    got, left = maxima(model, x)
    assert left == ()
    for key, name in (("attn.in_proj_weight", "q"), ("attn.out_proj.weight", "out")):
        want = reference.seen[name].abs().reshape(-1, D).amax(0)
        assert float((got[key, 1] - want).abs().max()) <= EXACT * float(want.max())


def test_a_convolution_records_the_hooked_channel_maxima():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3, padding=1)).double().eval()
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = _batch(2, 3, 4, 4)
    got, left = maxima(model, x)
    assert left == () and len(seen) == 1
    want = seen[0].abs().movedim(1, -1).reshape(-1, 3).amax(0)
    assert torch.equal(got["1.weight", 1], want)


class Pair(nn.Module):
    """Two inputs, passed as a tuple or as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, OUT), nn.Linear(D, OUT)

    def forward(self, x: Tensor | dict, y: Tensor | None = None) -> Tensor:
        x, y = (x["x"], x["y"]) if isinstance(x, dict) else (x, y)
        return self.a(x) + self.b(y)


@pytest.mark.parametrize("packed", ["tuple", "dict"])
def test_a_calibration_batch_of_several_inputs(packed):
    torch.manual_seed(0)
    model = Pair().double().eval()
    x, y = _batch(TOKENS, D), _batch(TOKENS, D, seed=5)
    calibration = (x, y) if packed == "tuple" else ({"x": x, "y": y},)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, left = _calibrated(model, dict(model.named_parameters()), calibration)
    assert left == ()
    assert torch.equal(got["a.weight", 1], x.abs().amax(0))
    assert torch.equal(got["b.weight", 1], y.abs().amax(0))


# A weight combined with a constant made in the forward (from no input): computed from the
# weight, not followed. Before, the result was taken for an activation: no maxima, not listed.
WITH_CONSTANTS = {
    "columns permuted by an index": lambda h, w, m: F.linear(h, w[:, torch.arange(D).flip(0)]),
    "times a constant made in the forward": lambda h, w, m: F.linear(h, w * torch.ones(1)),
    "torch.where with a constant": lambda h, w, m: F.linear(
        h, torch.where(torch.ones(OUT, D, dtype=torch.bool), w, 0)
    ),
}


@pytest.mark.parametrize("how", WITH_CONSTANTS)
def test_a_weight_combined_with_a_constant_is_listed(how):
    torch.set_default_dtype(torch.float64)
    try:
        got, left = maxima(spelled(WITH_CONSTANTS[how]), _batch(TOKENS, D))
    finally:
        torch.set_default_dtype(torch.float32)
    assert left == ("w",) and [key for key in got if key[0] == "w"] == []


# Reads spelled without a product call: calibrated or listed, never left to "range" silently
# (tests/test_calibration_spelled.py checks the maxima).
BY_HAND = {
    "broadcast multiply, then sum": lambda h, w, m: (h[:, None, :] * w).sum(-1),
}


@pytest.mark.parametrize("how", BY_HAND)
def test_a_read_spelled_by_hand_is_calibrated_or_listed(how):
    torch.set_default_dtype(torch.float64)
    try:
        got, left = maxima(spelled(BY_HAND[how]), _batch(TOKENS, D))
    finally:
        torch.set_default_dtype(torch.float32)
    assert "w" in left or ("w", 1) in got


def test_a_grouped_convolution_of_a_view_is_listed():
    torch.set_default_dtype(torch.float64)
    try:
        model = spelled(lambda h, w, m: F.conv1d(h.T[None], w[:, :3, None], groups=2))
        got, left = maxima(model, _batch(TOKENS, D))
    finally:
        torch.set_default_dtype(torch.float32)
    assert left == ("w",) and [key for key in got if key[0] == "w"] == []
