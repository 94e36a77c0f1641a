"""Audit of optimizer-state transport under the gauge action (``apply_gauge_(..., optimizer)``):
every ``torch.optim`` optimizer either has its state moved to exactly the state built from the
same loss gradients at the moved point (so every later step, ``k`` of them, is that optimizer's
at the moved point, to 1e-12 in float64), or is refused with one line, nothing modified. The
transport is an allow-list: an optimizer class, or a state key, it does not know is refused,
never passed through (a custom optimizer's ``exp_avg_sq`` may not be a second moment)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from gaugefix.structure import GaugeStructure
from test_action_audit2 import (
    EXACT,
    assert_close,
    batches,
    gauge,
    loss_of,
    model_and_input,
    step,
)
from test_kernels_audit import assert_unchanged, everything

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
D = torch.float64
LATER_STEPS = 3  # steps with lr > 0 after the move, compared step by step
LATER_LR = 0.05
NO_MOVE = 1e-300  # a learning rate whose steps round to no change (SparseAdam refuses 0)


# --- optimizers whose state is transported: k later steps are the optimizer's own ------------
# Without coupled L2 decay (documented as moved as gradients, not rebuilt): the state is made
# of loss gradients only, so it is rebuilt exactly at the moved point.
EXACT_TRANSPORT = {
    "sgd-momentum-dampening": lambda ps: O.SGD(ps, lr=0.0, momentum=0.7, dampening=0.2),
    "sgd-nesterov-maximize": lambda ps: O.SGD(
        ps, lr=0.0, momentum=0.9, nesterov=True, maximize=True
    ),
    "sgd-plain-wd": lambda ps: O.SGD(ps, lr=0.0, weight_decay=0.1),
    "sgd-foreach": lambda ps: O.SGD(ps, lr=0.0, momentum=0.9, foreach=True),
    "adam-foreach": lambda ps: O.Adam(ps, lr=0.0, betas=(0.5, 0.6), foreach=True),
    "adam-amsgrad-fused": lambda ps: O.Adam(ps, lr=0.0, amsgrad=True, fused=True),
    "adamw-foreach-maximize": lambda ps: O.AdamW(ps, lr=0.0, foreach=True, maximize=True),
    "adamw-amsgrad": lambda ps: O.AdamW(ps, lr=0.0, amsgrad=True, weight_decay=0.3),
    "nadam-momentum-decay": lambda ps: O.NAdam(ps, lr=0.0, momentum_decay=0.01),
    "nadam-decoupled": lambda ps: O.NAdam(
        ps, lr=0.0, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "radam-decoupled-foreach": lambda ps: O.RAdam(
        ps, lr=0.0, weight_decay=0.1, decoupled_weight_decay=True, foreach=True
    ),
}


def set_lr(opt: O.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def accumulate(model: nn.Module, opt: O.Optimizer, xs: list[Tensor]) -> None:
    """Steps at ``lr = 0``: the state collects loss gradients at one fixed point."""
    for xb in xs:
        step(model, opt, xb)


def assert_states_equal(opt: O.Optimizer, fresh: O.Optimizer, pairs, what: str) -> None:
    """Each key of each parameter's state: counts bit-equal, buffers to 1e-12 of their size."""
    for p, q in pairs:
        assert opt.state[p].keys() == fresh.state[q].keys(), what
        for key, want in fresh.state[q].items():
            got = opt.state[p][key]
            if not torch.is_tensor(want) or key in ("step", "mu_product"):
                assert torch.equal(torch.as_tensor(got), torch.as_tensor(want)), (what, key)
            else:
                assert_close(got, want, want.abs().amax(), (what, key))


@pytest.mark.parametrize("opt_name", list(EXACT_TRANSPORT))
def test_later_steps_after_transport_are_the_steps_at_the_moved_point(opt_name):
    """State collected at ``theta`` and transported by ``g(h)`` equals the state collected at
    ``g(h) . theta``; then ``LATER_STEPS`` steps with ``lr > 0`` stay equal, step by step."""
    make = EXACT_TRANSPORT[opt_name]
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    h = gauge(s)
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h)
    opt, fresh = make(list(model.parameters())), make(list(moved.parameters()))
    accumulate(model, opt, batches(x)[:3])
    accumulate(moved, fresh, batches(x)[:3])
    gaugefix.apply_gauge_(model, s, h, opt)
    pairs = list(zip(model.parameters(), moved.parameters(), strict=True))
    assert_states_equal(opt, fresh, pairs, opt_name)
    set_lr(opt, LATER_LR)
    set_lr(fresh, LATER_LR)
    for k in range(LATER_STEPS):
        xb = batches(x)[k]
        step(model, opt, xb)
        step(moved, fresh, xb)
        for p, q in pairs:
            assert_close(p, q, q.detach().abs() + LATER_LR, (opt_name, k))
    assert_states_equal(opt, fresh, pairs, opt_name)


def embedding_model() -> tuple[nn.Module, Tensor, GaugeStructure]:
    """An embedding (sparse gradients) into a ReLU MLP, float64; the gauge acts on the
    embedding's columns."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 5, sparse=True), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    x = torch.randint(0, 7, (9,))
    s = gaugefix.discover(model, x)
    assert "0.weight" in s.params
    return model, x, s


def sparse_adam_steps(model: nn.Module, opt: O.Optimizer, xs: list[Tensor]) -> None:
    """SparseAdam steps on the embedding, every gradient cleared after each (a sparse
    ``.grad`` cannot be moved in place)."""
    for xb in xs:
        loss_of(model, xb).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def test_sparse_adam_state_is_transported_exactly():
    """SparseAdam on the embedding: its moments move like Adam's, to the state collected at the
    moved point, and ``LATER_STEPS`` steps with ``lr > 0`` stay equal."""
    model, x, s = embedding_model()
    h = gauge(s)
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h)
    opt, fresh = (O.SparseAdam([m[0].weight], lr=NO_MOVE) for m in (model, moved))
    xs = [x, x.flip(0), (x + 3) % 7]
    sparse_adam_steps(model, opt, xs)
    sparse_adam_steps(moved, fresh, xs)
    gaugefix.apply_gauge_(model, s, h, opt)
    pairs = [(model[0].weight, moved[0].weight)]
    assert_states_equal(opt, fresh, pairs, "sparse-adam")
    set_lr(opt, LATER_LR)
    set_lr(fresh, LATER_LR)
    sparse_adam_steps(model, opt, xs)
    sparse_adam_steps(moved, fresh, xs)
    for p, q in zip(model.parameters(), moved.parameters(), strict=True):
        assert_close(p, q, q.detach().abs() + LATER_LR, "sparse-adam")


# --- optimizers and state keys the transport does not know: refused, nothing modified --------
class AbsEMA(O.Optimizer):
    """Scale-free steps ``g / (exp_avg_sq + 1e-30)`` with ``exp_avg_sq`` an average of ``|g|``
    (it moves by ``1/f``, not by ``1/f^2`` as a second moment would)."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                avg = state.setdefault("exp_avg_sq", torch.zeros_like(p))
                avg.mul_(0.9).add_(p.grad.abs(), alpha=0.1)
                p.add_(p.grad / (avg + 1e-30), alpha=-group["lr"])
        return loss


class GainSGD(O.SGD):
    """SGD whose per-parameter scalar ``gain``, the mean square gradient, sets the step: a
    scalar that the gauge changes (a subclass of a known class, with a key it does not know)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["gain"] = p.grad.square().mean()
        return super().step(closure)


def adam_with_extra_key(ps: list[Tensor]) -> O.Optimizer:
    """torch's Adam with a per-parameter number it does not make (a later torch's new key)."""
    opt = O.Adam(ps, lr=0.1)
    opt.register_step_post_hook(lambda o, *_: [o.state[p].update(extra=0.5) for p in ps])
    return opt


def sgd_with_scalar_buffer(ps: list[Tensor]) -> O.Optimizer:
    """SGD whose ``momentum_buffer`` was replaced by a number (not shaped like its parameter)."""
    opt = O.SGD(ps, lr=0.1, momentum=0.9)
    opt.register_step_post_hook(
        lambda o, *_: [o.state[p].update(momentum_buffer=torch.tensor(1.0, dtype=D)) for p in ps]
    )
    return opt


UNKNOWN = {
    "custom-abs-ema": lambda ps: AbsEMA(ps, lr=0.1),
    "sgd-subclass-scalar-gain": lambda ps: GainSGD(ps, lr=0.1, momentum=0.9),
    "adam-extra-number": adam_with_extra_key,
    "sgd-scalar-momentum-buffer": sgd_with_scalar_buffer,
}


@pytest.mark.parametrize("opt_name", list(UNKNOWN))
def test_unknown_optimizer_or_state_key_is_refused_and_changes_nothing(opt_name):
    """A class or key the transport does not know was moved by its name (``exp_avg_sq`` by
    ``1/f^2``) or left as it was (numbers), silently changing training: now one line, nothing
    modified."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = UNKNOWN[opt_name](list(model.parameters()))
    step(model, opt, x)
    before = everything(model, opt)
    extra = [v for st in opt.state.values() for v in st.values() if not torch.is_tensor(v)]
    with pytest.raises(ValueError, match="cannot transport") as info:
        gaugefix.apply_gauge_(model, s, gauge(s), opt)
    assert "\n" not in str(info.value)
    assert_unchanged(before, everything(model, opt))
    assert extra == [v for st in opt.state.values() for v in st.values() if not torch.is_tensor(v)]


def test_abs_ema_transport_by_name_was_wrong():
    """Why the refusal: moving ``AbsEMA``'s ``exp_avg_sq`` by ``1/f^2`` (the name's power) is
    not the state collected at the moved point (that moves by ``1/f``)."""
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    h = gauge(s)
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h)
    opt, fresh = AbsEMA(list(model.parameters()), 0.0), AbsEMA(list(moved.parameters()), 0.0)
    accumulate(model, opt, batches(x)[:2])
    accumulate(moved, fresh, batches(x)[:2])
    p, q = next(model.parameters()), next(moved.parameters())
    f = (q / p).detach()
    by_name = opt.state[p]["exp_avg_sq"] / f**2
    want = fresh.state[q]["exp_avg_sq"]
    assert_close(opt.state[p]["exp_avg_sq"] / f, want, want.abs().amax(), "power -1")
    assert float(((by_name - want).abs() / want.abs().amax()).max()) > 1e3 * EXACT


# torch.optim optimizers (every flag) whose state is not rebuilt by a rescaling: Adagrad's
# initial value, Adamax's eps inside its max, RMSprop's momentum of g / (sqrt(v) + eps),
# Adadelta's eps in its deltas, ASGD's average of iterates, Rprop's step sizes (power 0 or 1, by
# which claim), Adafactor's factored moments, L-BFGS's flat history.
REFUSED = {
    "adagrad-lr-decay-initial": lambda ps: O.Adagrad(
        ps, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1
    ),
    "adamax": lambda ps: O.Adamax(ps, lr=0.1),
    "rmsprop-centered-momentum-foreach": lambda ps: O.RMSprop(
        ps, lr=0.1, centered=True, momentum=0.5, foreach=True
    ),
    "adadelta-foreach": lambda ps: O.Adadelta(ps, foreach=True),
    "asgd-foreach": lambda ps: O.ASGD(ps, lr=0.1, foreach=True),
    "rprop": lambda ps: O.Rprop(ps, lr=0.1),
    "lbfgs-line-search": lambda ps: O.LBFGS(ps, lr=0.1, max_iter=2, line_search_fn="strong_wolfe"),
    "adafactor": lambda ps: O.Adafactor(ps, lr=0.1),
}


@pytest.mark.parametrize("opt_name", list(REFUSED))
def test_untransportable_torch_optimizers_are_refused(opt_name):
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    opt = REFUSED[opt_name](list(model.parameters()))
    step(model, opt, x)
    loss_of(model, x).backward()
    before = everything(model, opt)
    with pytest.raises(ValueError, match="cannot transport") as info:
        gaugefix.apply_gauge_(model, s, gauge(s), opt)
    assert "\n" not in str(info.value)
    assert_unchanged(before, everything(model, opt))


@pytest.mark.parametrize("opt_name", ["custom-abs-ema", "rprop"])
def test_an_optimizer_without_state_yet_is_not_refused(opt_name):
    """Nothing to transport before the first step: the move goes through (penalty mode and the
    start balancing rely on it), and the first step is then the one at the moved point."""
    make = {**UNKNOWN, **REFUSED}[opt_name]
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    h = gauge(s)
    moved = copy.deepcopy(model)
    gaugefix.apply_gauge_(moved, s, h)
    opt, fresh = make(list(model.parameters())), make(list(moved.parameters()))
    gaugefix.apply_gauge_(model, s, h, opt)
    step(model, opt, x)
    step(moved, fresh, x)
    for p, q in zip(model.parameters(), moved.parameters(), strict=True):
        assert_close(p, q, q.detach().abs(), opt_name)


# --- what the transport is not: the updates are not equivariant (the docs say so) ------------
MOVED = 0.1  # entries moved by a factor f with |log f| above this; a relative gap above it
TINY_EPS = 1e-300  # far below every sqrt(v) but a dead unit's (whose step is 0 either way)
NOT_EQUIVARIANT = {  # optimizer, power of f by which its next step moves
    "sgd-momentum": (lambda ps: O.SGD(ps, lr=LATER_LR, momentum=0.9), -1),
    "adam-eps-tiny": (lambda ps: O.Adam(ps, lr=LATER_LR, eps=TINY_EPS), 0),
}


@pytest.mark.parametrize("opt_name", list(NOT_EQUIVARIANT))
def test_the_next_step_after_transport_scales_as_the_docs_say(opt_name):
    """After the move, each entry's next step is ``f^power`` times its step without the move
    (``-1`` for SGD, ``0`` for Adam with a negligible eps), not ``f`` times it: the transport
    gives the state at the moved point, not the moved trajectory."""
    make, power = NOT_EQUIVARIANT[opt_name]
    model, x = model_and_input("mlp")
    s = gaugefix.discover(model, x)
    h = gauge(s)
    opt = make(list(model.parameters()))
    for xb in batches(x)[:2]:
        step(model, opt, xb)
    plain = copy.deepcopy(model)
    plain_opt = make(list(plain.parameters()))
    plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else they share buffers
    start = [p.detach().clone() for p in model.parameters()]
    gaugefix.apply_gauge_(model, s, h, opt)
    moved = [p.detach().clone() for p in model.parameters()]
    gaps = []
    step(model, opt, batches(x)[2])
    step(plain, plain_opt, batches(x)[2])
    for p, q, p0, q0 in zip(model.parameters(), plain.parameters(), moved, start, strict=True):
        f = p0 / q0
        want = (q.detach() - q0) * f**power
        assert_close(p.detach() - p0, want, want.abs().amax(), opt_name)
        moving = (f.log().abs() > MOVED) & ((q.detach() - q0).abs() > 0)
        equivariant = (q.detach() - q0) * f
        gaps.append(((p.detach() - p0 - equivariant).abs() / equivariant.abs())[moving])
    assert float(torch.cat(gaps).amin()) > MOVED  # nowhere the moved trajectory's step
