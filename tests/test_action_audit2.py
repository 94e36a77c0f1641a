"""Second audit of the group action ``apply_gauge_`` and its kernels: optimizer-state transport
for every ``torch.optim`` optimizer that keeps per-parameter state, bad ``h``, parameter layouts
(non-contiguous, channels_last, views of one storage, frozen with ``.grad``), and the range
checks (``overflowing``, ``provably_in_range``) at the limits of float16, bfloat16 and float32.
Every refused call changes nothing, bit for bit (parameters, gradients, optimizer state)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from gaugefix import kernels, zoo
from gaugefix.action import (
    RANGE_MARGIN,
    SAFE_EXPONENT,
    exponent_bounds,
    in_range_by_tensor,
    moved_with,
    overflowing,
    provably_in_range,
)
from gaugefix.structure import GaugeStructure
from gaugefix.structure.terms import ParamTerms, Term
from test_kernels_audit import everything

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
LAYOUTS = pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
EXACT = 1e-12  # float64: transported state and the next step, relative to the terms' size
O = torch.optim


# --- helpers ----------------------------------------------------------------------------------
def model_and_input(name: str) -> tuple[nn.Module, Tensor]:
    """A tiny float64 zoo model (eval mode) and an input batch."""
    torch.manual_seed(3)
    if name == "mlp":
        return zoo.mlp((4, 6, 5, 3)).double(), torch.randn(5, 4, dtype=D)
    if name == "cnn":
        return zoo.cnn().double().eval(), torch.randn(2, 3, 16, 16, dtype=D)
    return zoo.TransformerBlock().double().eval(), torch.randn(3, 6, 8, dtype=D)


def loose_bound(targets, h: Tensor, terms: int) -> bool:
    """The bound the per-tensor one replaced: ``e = 2 terms max|h|`` (float64) at most
    ``SAFE_EXPONENT``, and every tensor's largest entry times ``exp(e)`` below its dtype's
    largest number by ``RANGE_MARGIN``."""
    tensors = [t for moved in targets.values() for t, _ in moved if t.numel()]
    e = 2 * terms * float(h.abs().amax().to(torch.float64))
    room = [
        math.log(torch.finfo(t.dtype).max) - RANGE_MARGIN - math.log(float(t.detach().abs().max()))
        for t in tensors
    ]
    return e <= SAFE_EXPONENT and min(room, default=math.inf) > e


def loss_of(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.square().mean() + out.mean()


def step(model: nn.Module, opt: O.Optimizer, x: Tensor) -> None:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        return loss

    opt.step(closure)


def batches(x: Tensor) -> list[Tensor]:
    return [x, x.flip(0) * 0.5 + 0.1, -x, 2 * x - 0.3]


def gauge(structure: GaugeStructure, seed: int = 2, scale: float = 0.5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(structure.num_generators, dtype=D, generator=g)


def factor(structure: GaugeStructure, name: str, h: Tensor) -> Tensor:
    """``exp(sum_n w_n(e) h_n)`` for every entry of parameter ``name`` (float64; 1 if none)."""
    if name not in structure.params:
        return torch.ones((), dtype=D)
    hx = torch.cat([h.to(D), torch.zeros(1, dtype=D)])
    terms = structure.params[name].terms
    n = structure.num_generators
    return torch.exp(sum(t.sign * hx[torch.where(t.index < 0, n, t.index)] for t in terms))


def assert_unchanged(before: list[Tensor], after: list[Tensor]) -> None:
    """Bit-for-bit equality (NaN included), whatever the dtype."""
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_close(actual: Tensor, expected: Tensor, scale: Tensor, what: object) -> None:
    """``|actual - expected| <= EXACT * scale`` entry by entry."""
    err = (actual.detach() - expected.detach()).abs()
    assert bool((err <= EXACT * scale).all()), (what, float((err / scale).max()))


# --- optimizer state: exactly the state built at the moved point -------------------------------
# Optimizers whose per-parameter state is gradient-like (scales by 1/f) or squared (1/f^2)
# and holds nothing else that a rescaling changes: after apply_gauge_ the state is the one the
# optimizer would hold had it seen the same loss gradients at the moved point, so its next step
# is that optimizer's next step.
TRANSPORTED = {
    "sgd-momentum": lambda ps: O.SGD(ps, lr=0.0, momentum=0.9),
    "sgd-nesterov-foreach": lambda ps: O.SGD(ps, lr=0.0, momentum=0.9, nesterov=True, foreach=True),
    "sgd-dampening-maximize": lambda ps: O.SGD(
        ps, lr=0.0, momentum=0.5, dampening=0.3, maximize=True
    ),
    "sgd-fused": lambda ps: O.SGD(ps, lr=0.0, momentum=0.9, fused=True),
    "adam": lambda ps: O.Adam(ps, lr=0.0, betas=(0.8, 0.9)),
    "adam-amsgrad-foreach": lambda ps: O.Adam(ps, lr=0.0, amsgrad=True, foreach=True),
    "adam-fused-maximize": lambda ps: O.Adam(ps, lr=0.0, fused=True, maximize=True),
    "adamw-amsgrad": lambda ps: O.AdamW(ps, lr=0.0, amsgrad=True, weight_decay=0.1),
    "adamw-amsgrad-fused": lambda ps: O.AdamW(ps, lr=0.0, amsgrad=True, fused=True),
    "nadam": lambda ps: O.NAdam(ps, lr=0.0),
    "nadam-decoupled-foreach": lambda ps: O.NAdam(
        ps, lr=0.0, weight_decay=0.1, decoupled_weight_decay=True, foreach=True
    ),
    "radam": lambda ps: O.RAdam(ps, lr=0.0),
    "radam-decoupled-foreach": lambda ps: O.RAdam(
        ps, lr=0.0, weight_decay=0.1, decoupled_weight_decay=True, foreach=True
    ),
}
NEXT_LR = 0.05


def accumulated_pair(model_name: str, make, h: Tensor | None = None):
    """``(model, opt, moved, fresh, structure, h, x)``: the same model with state accumulated at
    ``theta`` (``lr = 0``) and, from a copy moved by ``g(h)`` first, at ``g(h) . theta``."""
    model, x = model_and_input(model_name)
    s = gaugefix.discover(model, x)
    h = gauge(s) if h is None else h
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h)
    opt, fresh = make(list(model.parameters())), make(list(moved.parameters()))
    for xb in batches(x)[:3]:
        step(model, opt, xb)
        step(moved, fresh, xb)
    return model, opt, moved, fresh, s, h, x


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("opt_name", list(TRANSPORTED))
def test_next_step_after_transport_is_the_step_at_the_moved_point(model_name, opt_name):
    """The transported state equals, to 1e-12 in float64, the state built at the moved point,
    and the next step (``lr > 0``) is that optimizer's next step."""
    model, opt, moved, fresh, s, h, x = accumulated_pair(model_name, TRANSPORTED[opt_name])
    gaugefix.apply_gauge_(model, s, h, opt)
    pairs = list(zip(model.parameters(), moved.parameters(), strict=True))
    for p, q in pairs:
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, want in fresh.state[q].items():
            got = opt.state[p][key]
            if key in ("step", "mu_product"):
                assert torch.equal(got, want), key
            else:
                assert_close(got, want, want.abs().amax(), (opt_name, key))
    for o in (opt, fresh):
        for group in o.param_groups:
            group["lr"] = NEXT_LR
    before = [q.detach().clone() for _, q in pairs]
    step(model, opt, batches(x)[3])
    step(moved, fresh, batches(x)[3])
    for (p, q), q0 in zip(pairs, before, strict=True):
        assert_close(p, q, q0.abs() + (q.detach() - q0).abs(), opt_name)


def test_muon_momentum_is_the_state_built_at_the_moved_point():
    """Muon keeps one gradient-like buffer per matrix: transported to 1e-12 (its step
    orthogonalises the buffer in bfloat16, so only the state is compared exactly)."""

    def make(ps: list[Tensor]) -> O.Optimizer:
        return O.Muon([p for p in ps if p.dim() == 2], lr=0.0)

    model, opt, moved, fresh, s, h, _ = accumulated_pair("mlp", make)
    gaugefix.apply_gauge_(model, s, h, opt)
    for p, q in zip(model.parameters(), moved.parameters(), strict=True):
        if p.dim() == 2:
            want = fresh.state[q]["momentum_buffer"]
            assert_close(opt.state[p]["momentum_buffer"], want, want.abs().amax(), "muon")


# --- coupled weight decay: transported as gradients (documented), not rebuilt -------------------
COUPLED = {
    "sgd-momentum-wd": lambda ps: O.SGD(ps, lr=0.0, momentum=0.9, weight_decay=0.1),
    "adam-wd": lambda ps: O.Adam(ps, lr=0.0, amsgrad=True, weight_decay=0.1),
    "nadam-wd": lambda ps: O.NAdam(ps, lr=0.0, weight_decay=0.1),
    "radam-wd": lambda ps: O.RAdam(ps, lr=0.0, weight_decay=0.1, foreach=True),
}
POWERS = {"momentum_buffer": -1, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}


@pytest.mark.parametrize("opt_name", list(COUPLED))
def test_coupled_weight_decay_state_moves_as_the_docs_say(opt_name):
    """With L2 decay coupled into the gradient the buffers also hold ``wd * theta``: no exact
    rebuild exists, and the documented transport is the state pushed forward (every buffer by
    ``1/f``, second moments by ``1/f^2``), to 1e-12; the counts stay as they are."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    h = gauge(s)
    opt = COUPLED[opt_name](list(model.parameters()))
    for xb in batches(x)[:3]:
        step(model, opt, xb)
    old = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    gaugefix.apply_gauge_(model, s, h, opt)
    for name, p in model.named_parameters():
        f = factor(s, name, h)
        for key, value in opt.state[p].items():
            if key in POWERS:
                want = old[name][key] * f ** POWERS[key]
                assert_close(value, want, want.abs(), (opt_name, key))
            else:
                assert torch.equal(value, old[name][key]), key


# --- optimizer state that cannot be transported: one line, nothing changed ---------------------
REFUSED = {
    "adagrad-initial": lambda ps: O.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1),
    "adagrad-initial-foreach": lambda ps: O.Adagrad(
        ps, lr=0.1, initial_accumulator_value=0.1, foreach=True
    ),
    "adamax": lambda ps: O.Adamax(ps, lr=0.1, foreach=True),
    "rmsprop-centered-momentum": lambda ps: O.RMSprop(ps, lr=0.1, centered=True, momentum=0.5),
    "adadelta": lambda ps: O.Adadelta(ps, lr=0.1),
    "asgd": lambda ps: O.ASGD(ps, lr=0.1),
    "rprop": lambda ps: O.Rprop(ps, lr=0.1, foreach=True),
    "lbfgs": lambda ps: O.LBFGS(ps, lr=0.1, max_iter=2),
    "adafactor": lambda ps: O.Adafactor(ps, lr=0.1),
}


@pytest.mark.parametrize("opt_name", list(REFUSED))
def test_untransportable_state_is_refused_in_one_line_and_changes_nothing(opt_name):
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = REFUSED[opt_name](list(model.parameters()))
    step(model, opt, x)
    loss_of(model, x).backward()  # a fresh gradient in .grad, to be left alone
    before = everything(model, opt)
    with pytest.raises(ValueError, match="cannot transport") as info:
        gaugefix.apply_gauge_(model, s, gauge(s), opt)
    assert "\n" not in str(info.value)
    assert_unchanged(before, everything(model, opt))


def test_lbfgs_before_its_first_step_holds_nothing_to_transport():
    """L-BFGS makes its state at its first step: before it the move is allowed, and the first
    step is the one at the moved point."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    h = gauge(s)
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h)
    opt, fresh = (O.LBFGS(list(m.parameters()), lr=0.1, max_iter=3) for m in (model, moved))
    gaugefix.apply_gauge_(model, s, h, opt)
    step(model, opt, x)
    step(moved, fresh, x)
    for p, q in zip(model.parameters(), moved.parameters(), strict=True):
        assert torch.equal(p, q)


# --- bad h: refused, nothing changed (optimizer state included) ---------------------------------
BAD_H = {
    "long": (lambda n: torch.zeros(n + 1, dtype=D), ValueError),
    "column": (lambda n: torch.zeros(n, 1, dtype=D), ValueError),
    "scalar": (lambda n: torch.zeros((), dtype=D), ValueError),
    "bool": (lambda n: torch.zeros(n, dtype=torch.bool), ValueError),
    "int": (lambda n: torch.zeros(n, dtype=torch.int64), ValueError),
    "complex": (lambda n: torch.zeros(n, dtype=torch.complex128), ValueError),
    "nan-last": (lambda n: torch.cat([torch.zeros(n - 1), torch.tensor([math.nan])]), ValueError),
    "inf-half": (lambda n: torch.full((n,), math.inf, dtype=torch.float16), ValueError),
    "-inf-bfloat16": (lambda n: torch.full((n,), -math.inf, dtype=torch.bfloat16), ValueError),
    "non-contiguous-nan": (
        lambda n: torch.stack([torch.zeros(n), torch.full((n,), math.nan)], 1)[:, 1],
        ValueError,
    ),
    "meta": (lambda n: torch.zeros(n, device="meta"), ValueError),
    "list": (lambda n: [0.0] * n, TypeError),
    "numpy": (lambda n: torch.zeros(n).numpy(), TypeError),
}


@pytest.mark.parametrize("bad", list(BAD_H))
def test_bad_h_is_refused_and_changes_nothing(bad):
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = O.Adam(list(model.parameters()), lr=0.1, amsgrad=True)
    step(model, opt, x)
    loss_of(model, x).backward()
    before = everything(model, opt)
    make, error = BAD_H[bad]
    with pytest.raises(error, match=r"\bh\b"):
        gaugefix.apply_gauge_(model, s, make(s.num_generators), opt)
    assert_unchanged(before, everything(model, opt))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_h_on_another_device_moves_as_h_on_the_model_device():
    """``h`` is one number per generator wherever it lies (``random_gauge_`` draws it on its
    generator's device): a CPU ``h`` moves a CUDA model, and a CUDA ``h`` a CPU one, bit for bit
    as ``h`` on the model's device does."""
    for device, other in (("cuda", "cpu"), ("cpu", "cuda")):
        model, x = model_and_input("mlp")
        model = model.to(device)
        s = gaugefix.discover(model, x.to(device))
        h = gauge(s)
        same = copy.deepcopy(model)
        gaugefix.apply_gauge_(same, s, h.to(device))
        gaugefix.apply_gauge_(model, s, h.to(other))
        for p, q in zip(model.parameters(), same.parameters(), strict=True):
            assert torch.equal(p, q), device


# --- parameter layouts ---------------------------------------------------------------------------
def momentum_model(model_name: str) -> tuple[nn.Module, O.Optimizer, GaugeStructure, Tensor]:
    """A model after one SGD-momentum step, with a fresh gradient in ``.grad``."""
    model, x = model_and_input(model_name)
    s = gaugefix.discover(model, x)
    opt = O.SGD(list(model.parameters()), lr=0.01, momentum=0.9)
    step(model, opt, x)
    loss_of(model, x).backward()
    return model, opt, s, x


def relaid_(model: nn.Module, opt: O.Optimizer, layout: str) -> None:
    """Every parameter, gradient and momentum buffer given ``layout`` in place of its own, same
    values: ``transposed`` (non-contiguous), ``channels_last``, or ``flat`` (views of one storage
    each, in order)."""
    params = list(model.parameters())
    if layout == "flat":
        for get in (lambda p: p, lambda p: p.grad, lambda p: opt.state[p]["momentum_buffer"]):
            buffer = torch.cat([get(p).detach().reshape(-1) for p in params])
            offset = 0
            for p in params:
                t = get(p)
                view = buffer[offset : offset + t.numel()].view_as(t)
                t.data = view
                offset += t.numel()
        return
    for p in params:
        for t in (p, p.grad, opt.state[p]["momentum_buffer"]):
            if layout == "transposed" and t.dim() == 2:
                t.data = t.detach().t().contiguous().t()
            if layout == "channels_last" and t.dim() == 4:
                t.data = t.detach().contiguous(memory_format=torch.channels_last)


@LAYOUTS
@pytest.mark.parametrize(
    "model_name, layout",
    [("mlp", "transposed"), ("cnn", "channels_last"), ("transformer", "flat"), ("cnn", "flat")],
)
def test_any_memory_layout_moves_bit_for_bit_as_contiguous_tensors(
    model_name, layout, gpu, monkeypatch
):
    """Non-contiguous and channels_last tensors and views of one storage move, with their
    ``.grad`` and momentum, exactly as contiguous copies do."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model, opt, s, _ = momentum_model(model_name)
    reference, ref_opt, _, _ = momentum_model(model_name)
    relaid_(model, opt, layout)
    assert_unchanged(everything(reference, ref_opt), everything(model, opt))
    h = gauge(s, scale=1.0)
    gaugefix.apply_gauge_(model, s, h, opt)
    gaugefix.apply_gauge_(reference, s, h, ref_opt)
    assert_unchanged(everything(reference, ref_opt), everything(model, opt))


@LAYOUTS
def test_frozen_parameters_with_a_gradient_have_it_transported(gpu, monkeypatch):
    """``requires_grad=False`` changes nothing: the parameter moves by ``f``, a ``.grad`` set on it
    by ``1/f`` (the docs: gradients in ``.grad`` are transported), its flag is kept."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model, _, s, _ = momentum_model("mlp")
    frozen = model[2]
    frozen.requires_grad_(False)
    old = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    h = gauge(s)
    gaugefix.apply_gauge_(model, s, h)
    for name, p in model.named_parameters():
        f = factor(s, name, h)
        assert_close(p, old[name][0] * f, (old[name][0] * f).abs(), name)
        assert_close(p.grad, old[name][1] / f, (old[name][1] / f).abs(), name)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("what", ["params", "grads", "momentum-is-grad", "expanded"])
def test_overlapping_memory_is_refused_and_changes_nothing(what):
    model, opt, s, _ = momentum_model("mlp")
    a, b = model[0].bias, model[2].bias  # 6 and 5 entries
    if what == "params":
        storage = torch.randn(8, dtype=D)
        a.data, b.data = storage[:6], storage[3:]
    elif what == "grads":
        storage = torch.randn(8, dtype=D)
        a.grad, b.grad = storage[:6], storage[3:]
    elif what == "momentum-is-grad":
        opt.state[a]["momentum_buffer"] = a.grad
    else:
        a.grad = torch.ones(1, dtype=D).expand(6)
    before = everything(model, opt)
    with pytest.raises(ValueError, match="share memory"):
        gaugefix.apply_gauge_(model, s, gauge(s), opt)
    assert_unchanged(before, everything(model, opt))


# --- half precision and the range checks --------------------------------------------------------
BF16, H = torch.bfloat16, torch.float16


def one_neuron_model(dtype: torch.dtype) -> tuple[nn.Module, GaugeStructure]:
    """``Linear(2, 3) - ReLU - Linear(3, 1)`` in ``dtype``: generator 0 multiplies row 0 of the
    first layer (and its bias) and divides column 0 of the second."""
    model = zoo.mlp((2, 3, 1))
    s = gaugefix.discover(model.double(), torch.randn(4, 2, dtype=D))
    return model.to(dtype), s


@LAYOUTS
@pytest.mark.parametrize("exponent", [0.0039, 0.00391])
def test_bfloat16_entry_near_its_largest_is_not_moved_to_inf(exponent, gpu, monkeypatch):
    """A bfloat16 weight ``(2 - 2^-6) 2^127`` (0.39% below the largest bfloat16) moved by
    ``exp(0.0039)`` stays in range in exact arithmetic (0.0039 < log(max / w) = 0.003929), but
    the factor is rounded to bfloat16 (1.0078) before the product: it became inf, silently.
    Now refused, changing nothing."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model, s = one_neuron_model(BF16)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[0, 0] = (2 - 2**-6) * 2.0**127
    h = torch.zeros(s.num_generators, dtype=D)
    h[0] = exponent
    before = everything(model)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.apply_gauge_(model, s, h)
    assert_unchanged(before, everything(model))


def vector_structure(signs: list[int]) -> GaugeStructure:
    """Parameter ``w`` ``[2]``: entry 0 moved by one term per sign (generator ``n`` with
    ``signs[n]``; three terms give a bound ``2 * 3 * max|h|``, not a power of two times
    ``max|h|``), entry 1 by none."""
    k = len(signs)
    terms = tuple(Term(torch.tensor([n, -1]), sign) for n, sign in enumerate(signs))
    params = {"w": ParamTerms("w", (2,), terms)}
    return GaugeStructure(k, params, [], ["x"] * k, ["neuron"] * k, {}, ["w"])


class Vector(nn.Module):
    def __init__(self, values: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(values)


def adam_vector(values: Tensor, where: str) -> tuple[Vector, O.Optimizer]:
    """A :class:`Vector` with a gradient and Adam's state, ``values`` in ``where`` (the parameter,
    its gradient or the second moment), ones everywhere else."""
    model = Vector(values.clone() if where == "param" else torch.ones_like(values))
    model.w.grad = values.clone() if where == "grad" else torch.ones_like(values)
    opt = O.Adam(list(model.parameters()), lr=0.1)
    opt.state[model.w] = {
        "step": torch.tensor(1.0),
        "exp_avg": torch.ones_like(values),
        "exp_avg_sq": values.clone() if where == "exp_avg_sq" else torch.ones_like(values),
    }
    return model, opt


@LAYOUTS
@pytest.mark.parametrize("h_dtype", [H, BF16])
def test_half_h_does_not_round_the_per_tensor_bound_down(h_dtype, gpu, monkeypatch):
    """An entry of three terms under ``h = -a``: its exponent bound ``D = 3a``
    (:func:`exponent_bounds`) is formed in float64, exactly, where ``h``'s dtype rounds it down
    (float16 ``a = 13.0234375``: ``39.0625`` for ``39.0703125``; bfloat16 ``a = 11.4375``:
    ``34.25`` for ``34.3125``). Adam's float32 second moment (power -2) moves by ``exp(6a)``:
    ``in_range_by_tensor`` proves it in range up to the float32 value whose room is ``6a``
    and not from there (a rounded bound would prove it there), and a value that overflows by
    ``exp(0.004)`` is refused, nothing changed."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    a = 11.4375 if h_dtype == BF16 else 13.0234375
    rounded = float(torch.full((3,), a, dtype=h_dtype).sum())
    assert rounded < 3 * a  # 3a rounds down in h's dtype
    s, h = vector_structure([1, 1, 1]), torch.full((3,), -a, dtype=h_dtype)
    assert torch.equal(exponent_bounds(s, h), torch.tensor([[0.0, 3 * a]], dtype=D))
    edge = edge_of_room(6 * a)
    assert room_of(edge) > 2 * rounded  # where a bound rounded in h's dtype says "in range"
    verdicts = []
    for value in (torch.nextafter(edge, torch.tensor(0.0)), edge):
        model, opt = adam_vector(torch.stack([value, torch.tensor(1.0)]), "exp_avg_sq")
        targets = moved_with(opt, {"w": model.w})
        verdicts.append(bool(in_range_by_tensor(targets, s, h)))
    assert verdicts == [True, False]
    top = math.log(torch.finfo(torch.float32).max) - 6 * a + 0.004  # overflows by exp(0.004)
    model, opt = adam_vector(torch.tensor([math.exp(top), 1.0]), "exp_avg_sq")
    before = everything(model, opt)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.apply_gauge_(model, s, h, opt)
    assert_unchanged(before, everything(model, opt))


def room_of(value: Tensor) -> float:
    """``in_range_by_tensor``'s room of a float32 tensor whose largest entry is ``value``:
    ``log`` of float32's largest number less ``RANGE_MARGIN`` less ``log(value)``."""
    limit = math.log(torch.finfo(torch.float32).max) - RANGE_MARGIN
    return limit - float(value.to(D).log())


def edge_of_room(exponent: float) -> Tensor:
    """The smallest float32 value whose room (:func:`room_of`) is at most ``exponent``."""
    value = torch.tensor(
        math.exp(math.log(torch.finfo(torch.float32).max) - RANGE_MARGIN - exponent)
    )
    value = value.to(torch.float32)
    while room_of(value) > exponent:
        value = torch.nextafter(value, torch.tensor(math.inf))
    while room_of(below := torch.nextafter(value, torch.tensor(0.0))) <= exponent:
        value = below
    return value


@LAYOUTS
@pytest.mark.parametrize("dtype", [H, BF16])
def test_half_adam_state_that_would_overflow_is_refused_and_changes_nothing(
    dtype, gpu, monkeypatch
):
    """``h`` that keeps the half-precision parameters and gradients in range but takes Adam's
    second moment (``1/f^2``) past the dtype's largest number: refused, bit for bit nothing
    moves (parameters, gradients, both moments, the step count)."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model, s = one_neuron_model(dtype)
    x = torch.randn(4, 2, dtype=dtype)
    opt = O.Adam(list(model.parameters()), lr=1e-3, eps=1e-3)  # 1e-8 is 0 in float16
    step(model, opt, x)
    loss_of(model, x).backward()
    with torch.no_grad():
        opt.state[model[2].weight]["exp_avg_sq"].fill_(1.0)
    limit = math.log(torch.finfo(dtype).max)
    h = torch.zeros(s.num_generators, dtype=D)
    h[0] = 0.6 * limit  # column 0 of the second layer: v moves by exp(1.2 limit)
    before = everything(model, opt)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.apply_gauge_(model, s, h, opt)
    assert_unchanged(before, everything(model, opt))


@LAYOUTS
def test_float16_second_moment_is_not_rounded_past_its_largest_on_the_way(gpu, monkeypatch):
    """Adam's float16 second moment ``17488`` moved by ``1/f^2``, ``f = 0.5167``: ``65502.6``
    exactly, in range. The GPU layout divides by ``f`` twice, rounding to float16 in between
    (``33845.4`` up to ``33856``): it became inf, silently. Now refused, nothing changed."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    f = 0.5167029500007629
    assert 17488 / f**2 < torch.finfo(H).max
    model, opt = adam_vector(torch.tensor([17488.0, 1.0], dtype=H), "exp_avg_sq")
    before = everything(model, opt)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.apply_gauge_(model, vector_structure([1]), torch.tensor([math.log(f)]), opt)
    assert_unchanged(before, everything(model, opt))


DTYPES = [H, BF16, torch.float32, D]
POWER = {"param": 1, "grad": -1, "exp_avg_sq": -2}


@st.composite
def near_the_limit(draw) -> tuple:
    """A parameter ``w`` ``[2]`` whose entry 0 has ``k <= 3`` terms of drawn signs, one of ``w``,
    its gradient or Adam's second moment holding a value ``top`` near its dtype's largest, and
    ``h`` (of any float dtype) that moves it to within about ``exp(+-0.02)`` of that largest."""
    k = draw(st.integers(1, 3), label="terms")
    signs = draw(st.lists(st.sampled_from([1, -1]), min_size=k, max_size=k), label="signs")
    s = vector_structure(signs)
    dtype, h_dtype = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
    where = draw(st.sampled_from(list(POWER)))
    info = torch.finfo(dtype)
    top = info.max * draw(st.floats(0.5, 1.0), label="fraction of the largest")
    top = torch.tensor(top, dtype=dtype) * 2.0 ** -draw(st.integers(0, 20 if dtype == H else 100))
    slack = draw(st.sampled_from([1, -1])) * 10 ** draw(st.floats(-6, -1.5), label="log10 slack")
    room = math.log(info.max / float(top)) - slack
    a = min(room, 85.0) / (abs(POWER[where]) * k)
    direction = 1 if POWER[where] > 0 else -1
    h = torch.tensor([a * sign * direction for sign in signs], dtype=D).to(h_dtype)
    return s, top, h, where


@LAYOUTS
@settings(max_examples=300, deadline=None)
@given(setup=near_the_limit())
def test_a_move_is_refused_or_stays_finite(setup, gpu):
    """Whatever the dtypes: ``apply_gauge_`` refuses ``h`` or leaves every moved tensor finite,
    and ``provably_in_range`` (``in_range_by_tensor``, one answer on every process) never says
    "in range" where ``overflowing`` finds a reason, and says it wherever the loose bound it
    replaced (``2 k max|h|``) does."""
    s, top, h, where = setup
    dtype = top.dtype
    model, opt = adam_vector(torch.stack([top, torch.ones((), dtype=dtype)]), where)
    params = {"w": model.w}
    targets = moved_with(opt, params)
    provable = bool(provably_in_range(targets, s, h))
    assert provable == bool(in_range_by_tensor(targets, s, h))
    assert not provable or overflowing(targets, s, h) is None  # the bound implies it, and
    assert provable or not loose_bound(targets, h, s.most_terms())  # it is never looser
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "gpu_layout", lambda device: gpu)
        try:
            gaugefix.apply_gauge_(model, s, h, opt)
        except ValueError as error:
            assert "overflow" in str(error) or "underflow" in str(error)
            assert not provable
            return
    for t, _ in targets["w"]:
        assert bool(torch.isfinite(t).all()), (where, dtype, h.dtype)
