"""Property-based fuzzing of ``gaugefix.GaugeFixing`` in training (docs/soft_gauge_fixing.md).

A run is drawn: a small float64 model (the grammar of ``tests/test_fuzz_architectures.py``, or a
ReLU MLP), an optimizer ``GaugeFixing`` supports (SGD with or without momentum, Nesterov and
weight decay; Adam, AdamW, AMSGrad, NAdam, RAdam; for-loop, foreach or fused; Adamax, which it
refuses) with one to three parameter groups of different learning rates, some parameters frozen
(``requires_grad=False`` in the optimizer or not, not held, or in a group with ``lr=0``), an lr
scheduler, a mode (``"exact"`` with ``every`` in 1..4, or ``"penalty"``), a strength and a few
steps on random data. The oracle is a *shadow*: right before each ``optimizer.step()``, a copy of
the model, its gradients and the optimizer state, stepped by the same optimizer without the hook.
After the step, against the shadow:

1. exact mode, at an orbit step: the hook moved the shadow's point by a gauge ``g(h)``, ``h`` its
   recorded step (a witness): every parameter entry is the shadow's times
   ``exp(sum_n w_n(e) h_n)`` (``w`` read off the active structure's terms), ``.grad`` and the
   gradient-like buffers (``momentum_buffer``, ``exp_avg``) times its inverse, the squared ones
   (``exp_avg_sq``, ``max_exp_avg_sq``) times its inverse square, counts and anything the active
   structure does not act on bit-identical; the outputs agree to ``1e-10`` relative. The rate is
   ``strength * min`` over the generator's parameters of their groups' sums of learning rates
   since the last orbit step; ``h_n`` lies between 0 and ``-rate_n mu_n`` and between 0 and the
   local balance ``(1/4) log(S_out / S_in)``, is 0 for a generator with an all-zero side, and
   neither ``||mu||`` (live generators) nor ``F = ||theta||^2`` increases. Between orbit steps
   the hook touches nothing (bit-identical to the shadow).
2. the gradients the optimizer sees (recorded by a step pre-hook after ``GaugeFixing``'s) are the
   shadow's, bit for bit, except in penalty mode, where ``strength * (sum_n w_n(e) mu_n)
   theta_e`` of the active generators is added (to ``1e-12`` relative, plus the rounding of
   ``mu``: ``64 eps strength sum(S) |theta_e|``); the shadow then steps on those gradients, and
   in penalty mode and between orbit steps the result is the hooked step's, bit for bit.
3. frozen parameters are bit-identical through the start balancing and the whole run, and get
   no ``.grad`` when ``requires_grad=False``; the start balancing keeps the outputs; the active
   generators are those acting on no frozen parameter.
4. a non-finite gradient injected at a step the hook acts on, or parameters whose squared sums
   are not finite where the hook would move them: the step is the shadow's bit for bit, and
   ``skipped`` counts it (``steps`` the others).
5. ``state_dict()`` (through JSON) loaded mid-interval into a fresh hook on a copy of the model and
   optimizer (and scheduler) continues bit-identically to the uninterrupted run.

Adamax is refused at construction in exact mode (its state, made at its first step, cannot be
transported), and in either mode once its state exists; nothing changes then.
``GAUGEFIX_FUZZ_TRAINING_EXAMPLES`` raises the example count locally; ``HUNT=1`` draws new
examples instead of the derandomized ones.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
import gaugefix.train.hook as hook_module
from architectures import term_counts
from gaugefix import GaugeFixing, zoo
from test_fuzz_architectures import DTYPE, FRESH_INPUTS, TOL, outputs, programs, rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = int(os.environ.get("GAUGEFIX_FUZZ_TRAINING_EXAMPLES", "200"))
TRANSPORT = 1e-12  # entrywise relative: a factor exp(w h) formed in another order
ROUNDING = 64 * torch.finfo(DTYPE).eps  # sums of squares added in another order
GRAD_LIKE = ("momentum_buffer", "exp_avg")
SQUARED = ("exp_avg_sq", "max_exp_avg_sq")
FREEZES = ("nograd", "drop", "unheld", "zero_lr")
LRS = (1e-3, 1e-2, 5e-2)
STRENGTHS = (0.0, 0.3, 2.0, 50.0, 1e4)
MAX_STEPS = 6

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("HUNT"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Case(NamedTuple):
    """A drawn run (see the module docstring)."""

    model: nn.Module
    make: Callable[[int], Tensor]
    optimizer: tuple[str, dict[str, Any]]
    groups: dict[str, int | str]  # parameter name -> group index, or how it is frozen
    lrs: tuple[float, ...]
    scheduler: str
    mode: str
    every: int
    strength: float
    steps: int
    inject: bool  # a non-finite gradient at the last step the hook acts on
    resume: int | None  # the step before which a copy resumes from the hook's state_dict
    pre_step: bool  # a plain optimizer step before the hook is attached
    balance: bool
    tensor_lr: bool  # learning rates as tensors (never read on the host: lr=0 freezes nothing)


# -- drawing a run --------------------------------------------------------------------------------
@st.composite
def mlps(draw) -> tuple[nn.Module, Callable[[int], Tensor], str]:
    """A ReLU MLP of 2 or 3 layers (widths 2 to 6), with or without biases."""
    widths = tuple(draw(st.lists(st.integers(2, 6), min_size=3, max_size=4)))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = zoo.mlp(widths, bias=bias).to(DTYPE)

    def make(seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(5, widths[0], dtype=DTYPE, generator=g)

    return model, make, f"mlp{widths} bias={bias}"


@st.composite
def optimizers(draw) -> tuple[str, dict[str, Any]]:
    """An optimizer class name and its keyword arguments."""
    name = draw(st.sampled_from(["SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax"]))
    impls = ["for-loop", "foreach"] + (["fused"] if name in ("SGD", "Adam", "AdamW") else [])
    impl = draw(st.sampled_from(impls))
    kw: dict[str, Any] = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if name == "SGD":
        kw["momentum"] = draw(st.sampled_from([0.0, 0.9]))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        kw["weight_decay"] = draw(st.sampled_from([0.0, 0.1]))
    elif name in ("Adam", "AdamW"):
        kw["amsgrad"] = draw(st.booleans())
        kw["weight_decay"] = draw(st.sampled_from([0.0, 0.1]))
        kw["betas"] = (0.8, 0.9)
    elif name in ("NAdam", "RAdam"):
        kw["decoupled_weight_decay"] = draw(st.booleans())
        kw["weight_decay"] = draw(st.sampled_from([0.0, 0.1]))
    return name, kw


@st.composite
def cases(draw) -> Case:
    model, make, desc = draw(st.one_of(programs(), mlps(), mlps()))
    note(desc)
    assume("tied logits" not in desc)  # its closure holds the embedding: a copy would share it
    names = [name for name, _ in model.named_parameters()]
    n_groups = draw(st.integers(1, 3))
    frozen = st.sampled_from(FREEZES)
    groups = {
        name: draw(frozen) if draw(st.integers(0, 5)) == 0 else draw(st.integers(0, n_groups - 1))
        for name in names
    }
    mode = draw(st.sampled_from(["exact", "penalty"]))
    every = draw(st.integers(1, 4)) if mode == "exact" else 1
    steps = draw(st.integers(every, MAX_STEPS))  # at least one step the hook acts on
    optimizer = draw(optimizers())
    loop = optimizer[0] in ("SGD", "Adam", "AdamW") and optimizer[1].get("foreach") is False
    return Case(
        model,
        make,
        optimizer,
        groups,
        tuple(draw(st.sampled_from(LRS)) for _ in range(n_groups)),
        draw(st.sampled_from(["none", "step", "warmup", "exponential"])),
        mode,
        every,
        draw(st.sampled_from(STRENGTHS)),
        steps,
        draw(st.booleans()),
        draw(st.none() | st.integers(0, steps - 1)),
        draw(st.booleans()),
        draw(st.booleans()),
        loop and draw(st.booleans()),
    )


# -- building a run -------------------------------------------------------------------------------
def param_groups(case: Case, model: nn.Module) -> list[dict[str, Any]]:
    """The optimizer's groups over ``model``'s parameters (``zero_lr`` ones in a last group with
    ``lr=0``); sets ``requires_grad`` of the frozen ones."""
    named = dict(model.named_parameters())
    groups: list[list[Tensor]] = [[] for _ in case.lrs] + [[]]
    for name, where in case.groups.items():
        named[name].requires_grad_(where not in ("nograd", "drop"))
        if where == "zero_lr":
            groups[-1].append(named[name])
        elif isinstance(where, int) or where == "nograd":
            groups[where if isinstance(where, int) else 0].append(named[name])
    lrs = [torch.tensor(lr, dtype=DTYPE) if case.tensor_lr else lr for lr in (*case.lrs, 0.0)]
    return [{"params": ps, "lr": lr} for ps, lr in zip(groups, lrs, strict=True) if ps]


def build_optimizer(case: Case, model: nn.Module) -> torch.optim.Optimizer:
    name, kw = case.optimizer
    return getattr(torch.optim, name)(param_groups(case, model), **kw)


def warmup(step: int) -> float:
    return min(1.0, step / 3)


def build_scheduler(case: Case, opt: torch.optim.Optimizer) -> Any:
    if case.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if case.scheduler == "warmup":
        return torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    if case.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, 0.8)
    return None


def copied(case: Case, model: nn.Module, opt: torch.optim.Optimizer, sched: Any = None):
    """A copy of ``model`` (gradients included), a fresh optimizer over it with ``opt``'s state
    and, given ``sched``, a fresh scheduler with its state."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    twin_opt = build_optimizer(case, twin)
    twin_sched = build_scheduler(case, twin_opt)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if p in opt.state:  # as it is: load_state_dict casts NAdam's mu_product to float64
            twin_opt.state[q] = copy.deepcopy(opt.state[p])
    if sched is not None:
        twin_sched.load_state_dict(sched.state_dict())
    return twin, twin_opt, twin_sched


# -- the reference, read off the structure's terms ------------------------------------------------
def factor(counts: tuple[Tensor, Tensor], h: Tensor, power: int) -> Tensor:
    """``exp(power * sum_n w_n(e) h_n)`` for every entry."""
    plus, minus = counts
    return torch.exp(power * torch.tensordot(h, plus - minus, 1))


def masses(params: dict[str, Tensor], maps: dict, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(S_in, S_out, F)``: the squares each generator multiplies and divides, and
    ``||theta||^2`` over the parameters ``maps`` covers."""
    s_in, s_out, f = torch.zeros(n, dtype=DTYPE), torch.zeros(n, dtype=DTYPE), 0.0
    for name, (plus, minus) in maps.items():
        sq = params[name].detach().square().reshape(-1)
        s_in += plus.reshape(n, -1) @ sq
        s_out += minus.reshape(n, -1) @ sq
        f += float(sq.sum())
    return s_in, s_out, torch.tensor(f, dtype=DTYPE)


def live_mu_norm(s_in: Tensor, s_out: Tensor) -> float:
    return float(torch.where((s_in > 0) & (s_out > 0), s_in - s_out, 0.0).norm())


def penalty_grad(params: dict[str, Tensor], maps: dict, n: int, strength: float) -> dict:
    """``strength * (sum_n w_n(e) mu_n) theta_e`` per parameter ``maps`` covers."""
    s_in, s_out, _ = masses(params, maps, n)
    mu = strength * (s_in - s_out)
    return {
        name: torch.tensordot(mu, plus - minus, 1) * params[name].detach()
        for name, (plus, minus) in maps.items()
    }


# -- comparisons ----------------------------------------------------------------------------------
def entrywise_close(actual: Tensor, expected: Tensor, what: str) -> None:
    err = (actual - expected).abs()
    bad = err > TRANSPORT * expected.abs()
    assert not bool(bad.any()), f"{what}: off by {float((err / expected.abs())[bad].max()):.3g}"


def bit_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and a.dtype == b.dtype
            and torch.equal(a.nan_to_num(), b.nan_to_num())
            and torch.equal(a.isnan(), b.isnan())
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(bit_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def everything(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Every parameter, gradient and optimizer state entry, by parameter name."""
    return {
        name: (p.detach(), p.grad, dict(opt.state.get(p, {})))
        for name, p in model.named_parameters()
    }


def assert_bit_equal(model, opt, shadow, shadow_opt, names, what: str) -> None:
    ours, theirs = everything(model, opt), everything(shadow, shadow_opt)
    for name in names:
        assert bit_equal(ours[name], theirs[name]), f"{what}: {name}"


# -- the recorded orbit steps ---------------------------------------------------------------------
@contextmanager
def recorded_orbit_steps():
    """Record ``(rate, h)`` of every orbit step ``GaugeFixing`` takes (a witness, checked
    against the shadow; nothing of it is trusted)."""
    calls: list[tuple[Tensor, Tensor]] = []
    original = hook_module.relax_unchecked_

    def recording(structure, params, rate, optimizer, check_range=False, ok=None):
        h, moved = original(structure, params, rate, optimizer, check_range, ok)
        taken = torch.as_tensor(rate, dtype=DTYPE)  # 0 where the gradients were not finite
        taken = taken if ok is None else torch.where(ok, taken, 0.0)
        calls.append((taken.clone(), h.clone()))
        return h, moved

    hook_module.relax_unchecked_ = recording
    try:
        yield calls
    finally:
        hook_module.relax_unchecked_ = original


# -- the checks after one step --------------------------------------------------------------------
class Run:
    """A hooked run with its bookkeeping: the structure, the active structure's term maps, and
    per group the sums of learning rates since the last orbit step."""

    def __init__(self, case: Case, model, structure, opt, sched, hook) -> None:
        self.case, self.model, self.structure = case, model, structure
        self.opt, self.sched, self.hook = opt, sched, hook
        self.maps = term_counts(hook.active)
        self.lr_sums = [0.0] * len(opt.param_groups)
        self.since, self.steps, self.skipped = 0, 0, 0

    def acts(self) -> bool:
        return self.since + 1 >= self.case.every

    def expected_rate(self) -> Tensor:
        """Per active generator: strength times the least sum of learning rates over the
        groups of the parameters it acts on."""
        group = {id(p): i for i, g in enumerate(self.opt.param_groups) for p in g["params"]}
        params = self.hook.active.bind(self.model)
        least = torch.full((self.hook.active.num_generators,), math.inf, dtype=DTYPE)
        for name, (plus, minus) in self.maps.items():
            touched = (plus + minus).reshape(plus.shape[0], -1).sum(1) > 0
            lr_sum = self.lr_sums[group[id(params[name])]]
            least = torch.where(touched, least.clamp(max=lr_sum), least)
        return self.case.strength * least

    def check_orbit_step(self, shadow, shadow_opt, calls, inputs) -> None:
        """Property 1 at an orbit step (see the module docstring)."""
        n = self.hook.active.num_generators
        rate = self.expected_rate()
        if not calls:  # a zero rate: no orbit step, nothing moves
            assert not bool((rate > 0).any()), "an orbit step was due and not taken"
            assert_bit_equal(self.model, self.opt, shadow, shadow_opt, self.names(), "no step")
            return
        ((taken, h),) = calls
        event("per-generator rates" if taken.dim() else "one rate")
        assert torch.equal(taken.expand(n), rate), (taken, rate)
        params, before = self.model_params(), shadow_params(shadow, self.hook.active)
        self.check_moved_by(h, shadow, shadow_opt)
        assert rel_change(outputs(shadow, inputs), outputs(self.model, inputs)) <= TOL
        s_in, s_out, f0 = masses(before, self.maps, n)
        self.check_step_bounds(h, rate, s_in, s_out)
        unclamped = torch.allclose(h, -rate * (s_in - s_out), rtol=1e-9, atol=0)
        event("orbit step checked" + ("" if unclamped else " (clamped or halved)"))
        a_in, a_out, f1 = masses(params, self.maps, n)
        pad = ROUNDING * float((s_in + s_out).sum())
        assert live_mu_norm(a_in, a_out) <= live_mu_norm(s_in, s_out) + pad, "||mu|| grew"
        assert float(f1) <= float(f0) * (1 + ROUNDING), "F grew"

    def names(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters()]

    def model_params(self) -> dict[str, Tensor]:
        return self.hook.active.bind(self.model)

    def check_moved_by(self, h: Tensor, shadow, shadow_opt) -> None:
        ours, theirs = everything(self.model, self.opt), everything(shadow, shadow_opt)
        for name in self.names():
            if name not in self.maps:
                assert bit_equal(ours[name], theirs[name]), f"{name} is not acted on, but moved"
                continue
            (p, grad, state), (q, q_grad, q_state) = ours[name], theirs[name]
            entrywise_close(p, q * factor(self.maps[name], h, 1), name)
            if q_grad is not None:
                entrywise_close(grad, q_grad * factor(self.maps[name], h, -1), f"{name}.grad")
            assert state.keys() == q_state.keys()
            for key, value in state.items():
                power = -1 if key in GRAD_LIKE else -2 if key in SQUARED else 0
                if power:
                    want = q_state[key] * factor(self.maps[name], h, power)
                    entrywise_close(value, want, f"{name} {key}")
                else:
                    assert bit_equal(value, q_state[key]), f"{name} {key}"

    def check_step_bounds(self, h: Tensor, rate: Tensor, s_in: Tensor, s_out: Tensor) -> None:
        """``h_n`` between 0 and ``-rate_n mu_n`` and between 0 and the local balance; 0 for a
        generator with an all-zero side."""
        live = (s_in > 0) & (s_out > 0)
        assert bool((h[~live] == 0).all()), "a generator with an all-zero side moved"
        pad = rate * ROUNDING * (s_in + s_out)
        step = -rate * (s_in - s_out)
        local = 0.25 * torch.log(torch.where(live, s_out / s_in, 1.0))
        for bound, slack in ((step, pad), (local, ROUNDING * (1 + local.abs()))):
            low, high = bound.clamp(max=0) - slack, bound.clamp(min=0) + slack
            assert bool(((h >= low) & (h <= high))[live].all()), (h, bound)


def shadow_params(shadow: nn.Module, active: gaugefix.GaugeStructure) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in active.bind(shadow).items()}


# -- the run --------------------------------------------------------------------------------------
def data(case: Case, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return case.make(100 + k), torch.randn(like.shape, dtype=DTYPE, generator=g)


def backward(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> bool:
    """Gradients of the squared error; whether there are any and they are finite."""
    opt.zero_grad()
    loss = (model(x) - y).square().mean()
    if not loss.requires_grad:  # every parameter frozen
        return False
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def inject(model: nn.Module, active: gaugefix.GaugeStructure) -> bool:
    """An inf in the first gradient of an acted-on parameter that has one."""
    for p in active.bind(model).values():
        if p.grad is not None and p.grad.numel():
            p.grad.view(-1)[0] = math.inf
            return True
    return False


def discovered(case: Case) -> gaugefix.GaugeStructure | None:
    try:
        s = gaugefix.discover(case.model, case.make(0))
    except gaugefix.GaugefixError:
        event("refused")
        return None
    out = outputs(case.model, [case.make(0)])[0]
    if not s.num_generators or not bool(torch.isfinite(out).all()):
        return None
    note(s.summary())
    return s


def adamax_refused(case: Case, structure, model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Whether the hook refuses Adamax at construction: in exact mode, or once it has state
    for a parameter of the structure."""
    params = structure.bind(model).values()
    stateful = case.mode == "exact" or any(opt.state.get(p) for p in params)
    return case.optimizer[0] == "Adamax" and stateful


def attach(case: Case, structure, model, opt) -> GaugeFixing | None:
    """The hook (``None`` when refused as documented: Adamax, :func:`adamax_refused`)."""
    kw = dict(mode=case.mode, every=case.every, balance_at_start=case.balance)
    if adamax_refused(case, structure, model, opt):
        before = copy.deepcopy(everything(model, opt))
        with pytest.raises(ValueError, match="cannot transport optimizer state .?exp_inf"):
            GaugeFixing(opt, model, structure, case.strength, **kw)
        assert bit_equal(before, everything(model, opt))
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        return None
    return GaugeFixing(opt, model, structure, case.strength, **kw)


@FUZZ
@given(case=cases())
def test_training_with_gauge_fixing_keeps_what_the_docs_promise(case: Case) -> None:
    structure = discovered(case)
    if structure is None:
        return
    model, inputs = case.model, [case.make(seed) for seed in range(FRESH_INPUTS + 1)]
    if not param_groups(case, model):
        return
    opt = build_optimizer(case, model)
    sched = build_scheduler(case, opt)
    like = outputs(model, [case.make(0)])[0]
    if case.pre_step and not backward(model, opt, *data(case, -1, like)):
        return
    if case.pre_step:
        opt.step()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = outputs(model, inputs)
    hook = attach(case, structure, model, opt)
    if hook is None:
        return
    assert rel_change(before, outputs(model, inputs)) <= TOL, "the start balancing"
    check_left_out(case, structure, hook)
    run = Run(case, model, structure, opt, sched, hook)
    event(f"trained, {hook.active.num_generators > 0 and 'some' or 'no'} active generators")
    event(f"{case.optimizer[0]}, tensor lr {case.tensor_lr}")
    with recorded_orbit_steps() as calls:
        train(run, like, inputs, calls)
    check_frozen(case, model, initial)


def freezes(case: Case) -> set[str]:
    """The ways of freezing that freeze in ``case``: a tensor ``lr`` of 0 does not."""
    return set(FREEZES) - ({"zero_lr"} if case.tensor_lr else set())


def check_left_out(case: Case, structure, hook: GaugeFixing) -> None:
    """The active generators are those acting on no frozen parameter."""
    frozen = {name for name, where in case.groups.items() if where in freezes(case)}
    maps = term_counts(structure)
    touched = torch.zeros(structure.num_generators, dtype=torch.bool)
    for name in frozen & maps.keys():
        plus, minus = maps[name]
        touched |= (plus + minus).reshape(plus.shape[0], -1).sum(1) > 0
    assert hook.active.num_generators == int((~touched).sum())
    assert sum(hook.left_out.values()) == int(touched.sum())


def check_frozen(case: Case, model: nn.Module, initial: dict[str, Tensor]) -> None:
    """Property 3: frozen parameters never changed; no ``.grad`` without ``requires_grad``."""
    named = dict(model.named_parameters())
    for name, where in case.groups.items():
        if where in freezes(case) - {"unheld"}:
            assert torch.equal(named[name], initial[name]), f"frozen {name} ({where}) moved"
        if where in ("nograd", "drop"):
            assert named[name].grad is None, f"frozen {name} ({where}) got a .grad"


def last_acting_step(case: Case) -> int:
    return case.steps - 1 if case.mode == "penalty" else (case.steps // case.every) * case.every - 1


def train(run: Run, like: Tensor, inputs: list[Tensor], calls: list) -> None:
    """The steps, each checked against its shadow, and a resumed copy in lockstep."""
    case, resumed = run.case, None
    inject_at = last_acting_step(case) if case.inject else -1
    for k in range(case.steps):
        if k == case.resume:
            resumed = resume(run)
        x, y = data(case, k, like)
        if not backward(run.model, run.opt, x, y):
            break
        injected = k == inject_at and inject(run.model, run.hook.active)
        if not step(run, calls, inputs, injected):
            return
        if resumed is not None:
            lockstep(resumed, x, y, injected)
            assert_same_runs(run, resumed)
            event("resumed step checked")
        if injected:
            break
    assert (run.hook.steps, run.hook.skipped) == (run.steps, run.skipped)


def step(run: Run, calls: list, inputs: list[Tensor], injected: bool) -> bool:
    """One optimizer step of the hooked run and of its shadow, compared. The gradients the
    optimizer sees are checked (penalty mode: the penalty's gradient added), then given to the
    shadow."""
    case = run.case
    shadow, shadow_opt, _ = copied(case, run.model, run.opt)
    acts = run.acts() and not injected
    penalty = case.mode == "penalty" and acts and squares_finite(run, shadow)
    expected = expected_grads(run, shadow, penalty)
    calls.clear()
    with seen_grads(run.opt, run.model) as seen:
        run.opt.step()
    check_grads(seen, expected)
    for name, q in shadow.named_parameters():
        q.grad = seen[name]
    shadow_opt.step()
    for i, group in enumerate(run.opt.param_groups):
        run.lr_sums[i] += group["lr"]
    orbit = case.mode == "exact" and acts and orbit_possible(run, shadow)
    if orbit:
        run.check_orbit_step(shadow, shadow_opt, calls, inputs)
    else:
        assert_bit_equal(run.model, run.opt, shadow, shadow_opt, run.names(), "the step")
        event("penalty step checked" if penalty else "untouched step checked")
    count(run, run.acts(), not (penalty or orbit))
    if run.sched is not None:
        run.sched.step()
    return True


def squares_finite(run: Run, model: nn.Module) -> bool:
    """Whether the squared sums of the acted-on parameters are finite (every entry finite and
    below about ``1e154``)."""
    params = run.hook.active.bind(model).values()
    return math.isfinite(sum(float(p.detach().square().sum()) for p in params))


def orbit_possible(run: Run, shadow: nn.Module) -> bool:
    """Whether the hook can take an orbit step at the shadow's point: its parameters are finite,
    and, for a positive rate, their squared sums too; else it skips."""
    params = list(run.hook.active.bind(shadow).values())
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    return finite and (squares_finite(run, shadow) or not bool((run.expected_rate() > 0).any()))


@contextmanager
def seen_grads(opt: torch.optim.Optimizer, model: nn.Module):
    """The gradients ``opt`` sees at its step (after ``GaugeFixing``'s pre-step hook), cloned."""
    seen: dict[str, Tensor | None] = {}

    def record(*_: Any) -> None:
        seen.update(
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        )

    handle = opt.register_step_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def expected_grads(run: Run, shadow: nn.Module, penalty: bool) -> dict[str, tuple]:
    """Per parameter, the gradient the optimizer should see and its entrywise slack: the
    shadow's, plus (``penalty``) the active generators' penalty gradient, whose ``mu`` is known
    to the rounding of the sums ``S`` (slack ``ROUNDING strength sum(S) |theta_e|``)."""
    out = {name: (q.grad, 0.0) for name, q in shadow.named_parameters()}
    if not penalty:
        return out
    params = run.hook.active.bind(shadow)
    n = run.hook.active.num_generators
    s_in, s_out, _ = masses(params, run.maps, n)
    scale = ROUNDING * run.case.strength * float((s_in + s_out).sum())
    for name, g in penalty_grad(params, run.maps, n, run.case.strength).items():
        grad = params[name].grad
        out[name] = (g if grad is None else grad + g, scale * params[name].detach().abs())
    return out


def check_grads(seen: dict, expected: dict) -> None:
    for name, (want, slack) in expected.items():
        got = seen[name]
        if isinstance(slack, float):
            assert bit_equal(got, want), f"{name}.grad changed before the step"
            continue
        err = (got - want).abs()  # an overflow to inf in both: equal
        same = (got == want) | (got.isnan() & want.isnan())
        assert bool((same | (err <= TRANSPORT * want.abs() + slack)).all()), (
            f"{name}.grad: off by {err.max():.3g}"
        )


def count(run: Run, acts: bool, skipped: bool) -> None:
    """The bookkeeping of one step: the place in the interval and the expected counts."""
    if not acts:
        run.since += 1
        return
    run.skipped += skipped
    run.steps += not skipped
    if skipped:
        event("skipped")
    run.since, run.lr_sums = 0, [0.0] * len(run.lr_sums)


def resume(run: Run) -> tuple | None:
    """A copy of the run now: model, optimizer and scheduler, and a fresh hook loading the
    hook's ``state_dict()`` through JSON (``None``: Adamax, refused at construction)."""
    case = run.case
    model, opt, sched = copied(case, run.model, run.opt, run.sched)
    kw = dict(mode=case.mode, every=case.every, balance_at_start=False)
    if adamax_refused(case, run.structure, model, opt):
        with pytest.raises(ValueError, match="cannot transport optimizer state .?exp_inf"):
            GaugeFixing(opt, model, run.structure, case.strength, **kw)
        return None
    hook = GaugeFixing(opt, model, run.structure, case.strength, **kw)
    hook.load_state_dict(json.loads(json.dumps(run.hook.state_dict())))
    return model, opt, sched, hook


def lockstep(resumed: tuple, x: Tensor, y: Tensor, injected: bool) -> None:
    model, opt, sched, hook = resumed
    backward(model, opt, x, y)
    if injected:
        inject(model, hook.active)
    opt.step()
    if sched is not None:
        sched.step()


def assert_same_runs(run: Run, resumed: tuple) -> None:
    model, opt, _, hook = resumed
    assert_bit_equal(run.model, run.opt, model, opt, run.names(), "resumed")
    assert hook.state_dict() == run.hook.state_dict()


# -- regressions found by the fuzzing -------------------------------------------------------------
def small_mlp() -> tuple[nn.Module, Tensor, Tensor, gaugefix.GaugeStructure]:
    """A float64 ReLU MLP off balance, inputs, targets and its structure."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 4, 2)).to(DTYPE)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, 0.8, generator=torch.Generator().manual_seed(1))
    return model, x, y, structure


HUGE = 1e160  # finite; its square overflows float64


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_a_finite_gradient_whose_square_overflows_is_not_skipped(mode):
    """Penalty mode, SGD at strength 1e4 diverged to gradients of 1e174 (finite) in the fuzzing:
    the finiteness check took the 2-norm of each gradient, which overflows for entries above
    about 1e154, and the hook skipped the step (counted in ``skipped``) as if a gradient were
    inf or NaN. A finite gradient is finite: the hook acts (a learning rate that keeps the
    parameters' squares finite)."""
    model, x, y, structure = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1 / HUGE)
    hook = GaugeFixing(opt, model, structure, 1.0, mode=mode, balance_at_start=False, every=1)
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    model[0].weight.grad[0, 0] = HUGE
    opt.step()
    assert (hook.steps, hook.skipped) == (1, 0)


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_parameters_whose_squares_overflow_skip_the_step_in_both_modes(mode):
    """A finite parameter of 1e160 (its square overflows float64): the exact orbit step moved
    nothing and counted the step as skipped, but penalty mode added the penalty's gradient from
    sums of squares that were inf (``mu = inf - inf``), turning every gauged gradient NaN. Both
    modes now skip: nothing added, the optimizer's own step, counted in ``skipped``."""
    model, x, y, structure = small_mlp()
    x = x.abs()  # hidden unit 0 is dead: the loss and its gradients stay finite
    with torch.no_grad():
        model[0].weight[0, 0] = -HUGE
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    hook = GaugeFixing(opt, model, structure, 1.0, mode=mode, balance_at_start=False, every=1)
    plain = copy.deepcopy(model)
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        q.grad = p.grad.clone()
    with seen_grads(opt, model) as seen:
        opt.step()
    assert all(bit_equal(seen[n], q.grad) for n, q in plain.named_parameters())
    assert (hook.steps, hook.skipped) == (0, 1)


class ScalarGain(nn.Module):
    """``b(p * a(x))`` with a 0-dim gain ``p``: a norm-gain generator acts on ``p``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.p = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.p * self.a(x))


def test_nadam_with_a_0_dim_parameter_is_transported():
    """NAdam is documented as supported, its ``mu_product`` left as it is; with a 0-dim
    parameter (a scalar gain) its first orbit step raised ``cannot transport optimizer state
    'mu_product'`` (found by the fuzzing): it took the scalar for a buffer shaped like the
    parameter. The orbit step must keep the function."""
    torch.manual_seed(0)
    model, x = ScalarGain().to(DTYPE), torch.randn(5, 3, dtype=DTYPE)
    structure = gaugefix.discover(model, x)
    assert "p" in structure.params
    opt = torch.optim.NAdam(model.parameters(), lr=1e-2)
    hook = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=1)
    opt.zero_grad()
    model(x).square().mean().backward()
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.NAdam(plain.parameters(), lr=1e-2)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        q.grad = p.grad.clone()
    opt.step()
    plain_opt.step()
    assert hook.steps == 1
    assert rel_change(outputs(plain, [x]), outputs(model, [x])) <= TOL
