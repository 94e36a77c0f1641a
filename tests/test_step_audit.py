"""An audit of ``gaugefix.step``: its optimizers are ``torch.optim``'s step by step (float64, 20
steps, 0-dim parameters, stacked copies with per-copy and scheduled learning rates, a copy at lr 0
frozen bit for bit); ``exact`` is ``GaugeFixing(mode='exact')`` (every 1 and 10, state transport,
resumption from a saved state), each stacked copy steps as it would alone and a copy at lr 0 is
not moved by the orbit step; ``penalty`` is the gradient of ``(strength / 4) sum mu^2``; bad
input is refused with one clear ``ValueError`` before anything (state, parameters, gradients)
changes."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import step
from test_step import TORCH

D = torch.float64
STEPS = 20
DECAY = 0.9  # the learning-rate schedule: lr <- DECAY * lr after every step
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
X = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=D)
# name -> (torch.optim optimizer from (params, lr), gaugefix.step optimizer from lr): test_step's
# defaults, and non-default constants
OPTIMIZERS = {
    **TORCH,
    "adam-constants": (
        lambda ps, lr: torch.optim.Adam(ps, lr, betas=(0.8, 0.95), eps=1e-6),
        lambda lr: step.adam(lr, betas=(0.8, 0.95), eps=1e-6),
    ),
    "adamw-constants": (
        lambda ps, lr: torch.optim.AdamW(ps, lr, betas=(0.7, 0.9), eps=1e-5, weight_decay=0.3),
        lambda lr: step.adamw(lr, betas=(0.7, 0.9), eps=1e-5, weight_decay=0.3),
    ),
}


def start(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=D) for n, s in SHAPES.items()}


def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((X @ p["w"] + p["b"]) * p["s"]).tanh().square().sum() + 0.01 * p["w"].pow(3).sum()


def grads_at(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q = {n: v.detach().clone().requires_grad_(True) for n, v in p.items()}
    return dict(zip(q, torch.autograd.grad(loss(q), list(q.values())), strict=True))


def stacked_grads(stack: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    each = [grads_at({n: v[r] for n, v in stack.items()}) for r in range(copies)]
    return {n: torch.stack([g[n] for g in each]) for n in stack}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def torch_run(kind: str, seed: int, lr: float, schedule: bool) -> list[dict[str, torch.Tensor]]:
    """``torch.optim`` alone on copy ``seed``: the parameters after each step."""
    params = {n: v.requires_grad_(True) for n, v in start(seed).items()}
    opt = OPTIMIZERS[kind][0](list(params.values()), lr)
    out = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss(params).backward()
        opt.step()
        out.append({n: v.detach().clone() for n, v in params.items()})
        if schedule:
            opt.param_groups[0]["lr"] *= DECAY
    return out


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizers_equal_torch_optim_alone(kind):
    """One copy: a float lr, and a 0-dim tensor lr changed in place between steps (a schedule)."""
    for schedule in (False, True):
        reference = torch_run(kind, 0, 0.05, schedule)
        lr = torch.tensor(0.05, dtype=D) if schedule else 0.05
        tx = step.applied(OPTIMIZERS[kind][1](lr))
        params = start(0)
        state = tx.init(params)
        for t in range(STEPS):
            params, state = tx.update(grads_at(params), state, params)
            for n in params:
                close(params[n], reference[t][n])
            if schedule:
                lr.mul_(DECAY)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizers_stacked_copies_equal_each_alone(kind):
    """Four stacked copies with lrs ``[4]`` (changed in place between steps): each equals
    torch.optim on that copy alone; the copy at lr 0 stays bit for bit where it started."""
    lrs = [0.05, 0.0, 0.01, 0.2]
    references = [torch_run(kind, r, lr, True) for r, lr in enumerate(lrs)]
    lr = torch.tensor(lrs, dtype=D)
    stack = {n: torch.stack([start(r)[n] for r in range(len(lrs))]) for n in SHAPES}
    first = {n: v.clone() for n, v in stack.items()}
    tx = step.applied(OPTIMIZERS[kind][1](lr))
    state = tx.init(stack)
    for t in range(STEPS):
        stack, state = tx.update(stacked_grads(stack, len(lrs)), state, stack)
        for r in range(len(lrs)):
            for n in stack:
                close(stack[n][r], references[r][t][n])
        for n in stack:
            assert torch.equal(stack[n][1], first[n][1])
        lr.mul_(DECAY)


# -- exact -------------------------------------------------------------------------------------


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    return model.to(D)


DATA = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=D)
TARGET = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=D)
STRUCTURE = gaugefix.discover(mlp(0), DATA[:2])


def gauged(seed: int) -> nn.Module:
    model = mlp(seed)
    gaugefix.random_gauge_(model, STRUCTURE, 1.0, generator=torch.Generator().manual_seed(seed))
    return model


def gauged_stack(copies: int) -> dict[str, torch.Tensor]:
    models = [dict(gauged(r).named_parameters()) for r in range(copies)]
    return {n: torch.stack([m[n].detach() for m in models]) for n in models[0]}


def model_loss(model: nn.Module) -> torch.Tensor:
    return 0.5 * (model(DATA) - TARGET).square().sum(-1).mean()


def hooked_run(kind: str, seed: int, lr: float, strength: float, every: int, cut: int = 0):
    """GaugeFixing(mode='exact') around torch.optim on copy ``seed``: the parameters after each
    step; with ``cut``, model, optimizer and hook are saved after ``cut`` steps and the run goes
    on in fresh ones loaded from the saved states."""
    model = gauged(seed)
    opt = OPTIMIZERS[kind][0](model.parameters(), lr)
    fixing = gaugefix.GaugeFixing(opt, model, STRUCTURE, strength, every=every,
                                  balance_at_start=False)  # fmt: skip
    out = []
    for t in range(STEPS):
        if cut and t == cut:
            saved = [copy.deepcopy(x.state_dict()) for x in (model, opt, fixing)]
            model = mlp(seed + 1)
            opt = OPTIMIZERS[kind][0](model.parameters(), lr)
            fixing = gaugefix.GaugeFixing(opt, model, STRUCTURE, strength, every=every,
                                          balance_at_start=False)  # fmt: skip
            for x, s in zip((model, opt, fixing), saved, strict=True):
                x.load_state_dict(s)
        opt.zero_grad()
        model_loss(model).backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert fixing.steps == STEPS // every
    return out


def module_grads(stack: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    model = mlp(0)
    each = []
    for r in range(copies):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(stack[n][r])
        model.zero_grad()
        model_loss(model).backward()
        each.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return {n: torch.stack([g[n] for g in each]) for n in stack}


def one_copy_grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: g[0] for n, g in module_grads({n: p[None] for n, p in params.items()}, 1).items()}


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("every", [1, 10])
def test_exact_equals_gauge_fixing_and_resumes_from_a_saved_state(kind, every):
    """``exact(applied(opt))`` is ``GaugeFixing(mode='exact', every)`` around torch.optim over
    20 steps (the optimizer state transported), also when both are saved after 7 steps (mid
    interval for every=10) and resumed from the saved state (torch.save round trip)."""
    lr, strength = 0.05, 4.0
    reference = hooked_run(kind, 0, lr, strength, every)
    resumed = hooked_run(kind, 0, lr, strength, every, cut=7)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(reference, resumed, strict=True) for n in a)
    tx = step.exact(step.applied(OPTIMIZERS[kind][1](lr)), STRUCTURE, lr=lr, strength=strength,
                    every=every)  # fmt: skip
    params = {n: p.detach().clone() for n, p in gauged(0).named_parameters()}
    state = tx.init(params)
    for t in range(STEPS):
        if t == 7:
            buffer = io.BytesIO()
            torch.save((params, state), buffer)
            params, state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
            assert isinstance(state, step.ExactState) and state.orbit.since == 7 % every
        params, state = tx.update(one_copy_grads(params), state, params)
        for n in params:
            close(params[n], reference[t][n])
    assert state.orbit.since == 0


@pytest.mark.parametrize("kind", ["momentum", "adam"])
@pytest.mark.parametrize("every", [1, 10])
def test_exact_stacked_copies_equal_each_alone_and_lr_0_copies_stay(kind, every):
    """Stacked copies with per-copy lr and strength (one with a strength large enough for the
    bounded search, one at lr 0, one diverged at lr 0) each step as ``exact`` on that copy alone;
    the copies at lr 0 are not moved (bit for bit), finite or not."""
    lrs = [0.05, 0.02, 0.0, 0.0]
    strengths = [4.0, 500.0, 4.0, 4.0]
    copies = len(lrs)
    stack = gauged_stack(copies)
    stack["0.weight"][3, 0, 0] = float("inf")  # copy 3 diverged
    first = {n: v.clone() for n, v in stack.items()}
    alone = []
    for r in range(3):
        params = {n: v[r].clone() for n, v in stack.items()}
        tx = step.exact(step.applied(OPTIMIZERS[kind][1](lrs[r])), STRUCTURE, lr=lrs[r],
                        strength=strengths[r], every=every)  # fmt: skip
        state = tx.init(params)
        trajectory = []
        for _ in range(STEPS):
            params, state = tx.update(one_copy_grads(params), state, params)
            trajectory.append({n: p.clone() for n, p in params.items()})
        alone.append(trajectory)
    lr, strength = torch.tensor(lrs, dtype=D), torch.tensor(strengths, dtype=D)
    tx = step.exact(step.applied(OPTIMIZERS[kind][1](lr)), STRUCTURE, lr=lr, strength=strength,
                    every=every, batch_dims=1)  # fmt: skip
    state = tx.init(stack)
    for t in range(STEPS):
        grads = module_grads(stack, copies)
        grads = {n: g.nan_to_num(0.0, 0.0, 0.0) for n, g in grads.items()}  # finite
        stack, state = tx.update(grads, state, stack)
        for r in range(3):
            for n in stack:
                close(stack[n][r], alone[r][t][n])
        for n in stack:
            assert torch.equal(stack[n][2:], first[n][2:])


# -- penalty -----------------------------------------------------------------------------------


def test_penalty_is_the_gradient_of_its_functional_alone_and_stacked():
    """``penalty`` adds autograd's gradient of ``(strength / 4) sum_n mu_n^2`` (float64, 1e-12),
    for one copy and for stacked copies with a strength each."""
    strengths = [0.7, 0.0, 3.0]
    models = [gauged(r) for r in range(len(strengths))]
    expected = []
    for model, s in zip(models, strengths, strict=True):
        mu = gaugefix.imbalance(model, STRUCTURE)
        params = dict(model.named_parameters())
        grads = torch.autograd.grad((s / 4) * mu.square().sum(), list(params.values()),
                                    allow_unused=True, materialize_grads=True)  # fmt: skip
        expected.append(dict(zip(params, grads, strict=True)))
    for r, model in enumerate(models):
        params = {n: p.detach() for n, p in model.named_parameters()}
        base = {n: torch.full_like(p, 0.5) for n, p in params.items()}
        out, _ = step.penalty(STRUCTURE, strength=strengths[r]).update(
            base, step.EmptyState(), params
        )
        for n in params:
            close(out[n] - 0.5, expected[r][n])
    stack = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in
             expected[0]}  # fmt: skip
    tx = step.penalty(STRUCTURE, strength=torch.tensor(strengths, dtype=D), batch_dims=1)
    out, _ = tx.update({n: torch.zeros_like(v) for n, v in stack.items()}, step.EmptyState(), stack)
    for r in range(len(strengths)):
        for n in stack:
            close(out[n][r], expected[r][n])


def test_a_copy_frozen_mid_interval_is_not_moved_by_the_orbit_step():
    """A copy whose lr is set to 0 in place (the sweep engine's frozen, diverged runs) between
    two orbit steps of ``every=10`` stays bit for bit where it was frozen: the orbit step does not
    move it although the lrs summed before it froze are not 0 (it used to: rate
    ``strength * 3 lr``)."""
    lr = torch.tensor([0.05, 0.05], dtype=D)
    stack = gauged_stack(2)
    tx = step.exact(step.applied(step.sgd(lr)), STRUCTURE, lr=lr, strength=torch.tensor(
        [4.0, 4.0], dtype=D), every=10, batch_dims=1)  # fmt: skip
    state = tx.init(stack)
    for t in range(STEPS):
        if t == 3:
            lr[1] = 0.0
            frozen = {n: v[1].clone() for n, v in stack.items()}
        moving = {n: v[0].clone() for n, v in stack.items()}
        stack, state = tx.update(module_grads(stack, 2), state, stack)
        if t >= 3:
            assert all(torch.equal(stack[n][1], frozen[n]) for n in stack)
    assert not all(torch.equal(stack[n][0], moving[n]) for n in stack)


# -- bad input: one clear ValueError, nothing changed -----------------------------------------


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: step.sgd(0.1, momentum=-0.5), "^momentum must be"),
        (lambda: step.sgd(0.1, momentum=float("nan")), "^momentum must be"),
        (lambda: step.sgd(0.1, momentum=True), "^momentum must be"),
        (lambda: step.adam(0.1, betas=(1.0, 0.999)), "^betas must be"),
        (lambda: step.adam(0.1, betas=(0.9, 1.5)), "^betas must be"),
        (lambda: step.adam(0.1, betas=(-0.1, 0.9)), "^betas must be"),
        (lambda: step.adam(0.1, betas=(float("nan"), 0.9)), "^betas must be"),
        (lambda: step.adam(0.1, betas=(0.9,)), "^betas must be"),
        (lambda: step.adam(0.1, eps=-1e-8), "^eps must be"),
        (lambda: step.adam(0.1, eps=float("nan")), "^eps must be"),
        (lambda: step.adamw(0.1, betas=(0.9, 1.0)), "^betas must be"),
        (lambda: step.adamw(0.1, weight_decay=-0.01), "^weight_decay must be"),
        (lambda: step.adamw(0.1, weight_decay=float("inf")), "^weight_decay must be"),
        (lambda: step.sgd(torch.tensor([1, 2])), "^lr must be a floating"),
        (lambda: step.adam(torch.tensor([True, False])), "^lr must be a floating"),
        (lambda: step.sgd(torch.tensor([1j])), "^lr must be a floating"),
        (lambda: step.weight_decay(strength=torch.tensor(1)), "^strength must be a floating"),
        (lambda: step.penalty(STRUCTURE, strength=torch.ones(STRUCTURE.num_generators)),
         "^strength must be a number,"),
        (lambda: step.exact(step.applied(step.sgd(0.1)), STRUCTURE, lr=torch.ones(3),
                            strength=1.0), "^lr must be a number,"),
        (lambda: step.exact(step.applied(step.sgd(0.1)), STRUCTURE, lr=torch.ones(3),
                            strength=torch.ones(2), batch_dims=1), "^lr and strength"),
        (lambda: step.decoupled_penalty(STRUCTURE, lr=torch.ones(3), strength=torch.ones(2),
                                        batch_dims=1), "^lr and strength"),
    ],
)  # fmt: skip
def test_bad_constants_and_per_copy_tensors_are_refused_when_built(build, match):
    """As torch.optim refuses them: a momentum, eps or weight decay that is not a finite number
    ``>= 0``, betas not a pair in ``[0, 1)`` (they used to be taken: ``beta1 = 1`` divides by 0);
    a per-copy tensor that is not floating, has other dims than ``batch_dims`` or another shape
    than the other's (they used to be taken, a strength ``[N]`` silently as one per generator)."""
    with pytest.raises(ValueError, match=match):
        build()


def stack_of(copies: int) -> dict[str, torch.Tensor]:
    return {n: torch.stack([start(r)[n] for r in range(copies)]) for n in SHAPES}


def snapshot(*trees) -> list[torch.Tensor]:
    """Every tensor in ``trees`` (dicts, tuples, NamedTuples), cloned."""
    out = []
    for tree in trees:
        if isinstance(tree, torch.Tensor):
            out += [] if tree.is_meta else [tree.clone()]
        elif isinstance(tree, dict):
            out += snapshot(*tree.values())
        elif isinstance(tree, tuple):
            out += snapshot(*tree)
    return out


def assert_refused_unchanged(tx, grads, state, params, match: str) -> None:
    before = snapshot(grads, state, params)
    with pytest.raises(ValueError, match=match):
        tx.update(grads, state, params)
    after = snapshot(grads, state, params)
    assert len(before) == len(after) and all(map(torch.equal, before, after))


def stepped(tx, params):
    """``tx``'s state after one step on ``params`` (left unchanged)."""
    state = tx.init(params)
    _, state = tx.update({n: torch.ones_like(p) for n, p in params.items()}, state,
                         {n: p.clone() for n, p in params.items()})  # fmt: skip
    return state


def ones(params, **change):
    out = {n: torch.ones_like(p) for n, p in params.items()}
    return {**out, **change}


@pytest.mark.parametrize("make", [lambda lr: step.sgd(lr, momentum=0.9), step.adam, step.adamw])
def test_per_copy_lr_of_another_shape_is_refused_at_update_before_the_state_changes(make):
    """A per-copy lr ``[2]`` for 3 stacked copies, or ``[3]`` for one model with a 0-dim
    parameter: ``ValueError`` naming it, the buffers untouched (momentum and Adam moments used to
    be updated before the broadcast failed)."""
    stack = stack_of(3)
    state = stepped(step.applied(make(torch.ones(3, dtype=D))), stack)
    tx = step.applied(make(torch.tensor([0.1, 0.2], dtype=D)))
    assert_refused_unchanged(tx, ones(stack), state, stack, "^lr of shape")
    one = start(0)
    tx = step.applied(make(torch.tensor([0.1, 0.2, 0.3], dtype=D)))
    assert_refused_unchanged(tx, ones(one), stepped(step.applied(make(0.1)), one), one,
                             "^lr of shape")  # fmt: skip


def test_per_copy_strength_of_another_shape_is_refused_at_update():
    """A per-copy strength ``[2]`` for 3 stacked copies: ``ValueError`` before the gradients,
    state or parameters change (exact used to take the optimizer step and then fail)."""
    params = {n: p.detach().expand(3, *p.shape).clone() for n, p in gauged(0).named_parameters()}
    strength = torch.ones(2, dtype=D)
    for tx in (
        step.weight_decay(strength=strength),
        step.penalty(STRUCTURE, strength=strength, batch_dims=1),
        step.exact(step.applied(step.sgd(0.1, momentum=0.9)), STRUCTURE, lr=0.1,
                   strength=strength, every=1, batch_dims=1),
    ):  # fmt: skip
        assert_refused_unchanged(tx, ones(params), tx.init(params), params, "^strength of shape")


GRAD_CHANGES = {
    "extra": ({"z": torch.ones(2, dtype=D)}, "^the gradients are for other parameters"),
    "missing": (None, "^the gradients are for other parameters"),
    "shape": ({"b": torch.ones(5, dtype=D)}, "^the gradient of 'b' is"),
    "dtype": ({"b": torch.ones(4, dtype=torch.float32)}, "^the gradient of 'b' is"),
    "device": ({"b": torch.ones(4, dtype=D, device="meta")}, "^the gradient of 'b' is"),
}


@pytest.mark.parametrize("change", list(GRAD_CHANGES))
@pytest.mark.parametrize(
    "make",
    [lambda: step.applied(step.sgd(0.1, momentum=0.9)), lambda: step.applied(step.adam(0.1)),
     lambda: step.applied(step.adamw(0.1)),
     lambda: step.applied(step.chain(step.weight_decay(strength=0.1), step.sgd(0.1))),
     lambda: step.exact(step.applied(step.adam(0.1)), STRUCTURE, lr=0.1, strength=1.0)],
)  # fmt: skip
def test_gradients_that_do_not_fit_are_refused_before_anything_changes(make, change):
    """Gradients for other names, or of another shape, dtype or device than their parameter:
    ``ValueError`` naming them, the state and parameters untouched (Adam's moments of the names
    before the bad one used to be updated before a KeyError or RuntimeError)."""
    extra, match = GRAD_CHANGES[change]
    params = {n: p.detach().clone() for n, p in gauged(0).named_parameters()}
    params = {**params, **{"b": torch.ones(4, dtype=D)}}
    tx = make()
    state = stepped(tx, params)
    grads = ones(params, **(extra or {}))
    if extra is None:
        del grads["b"]
    assert_refused_unchanged(tx, grads, state, params, match)


def test_optimizer_state_of_other_parameters_is_refused():
    """A state made by ``init`` on other parameters (a name more, or another shape)."""
    params = start(0)
    tx = step.applied(step.adam(0.1))
    other = stepped(tx, {**params, "z": torch.ones(2, dtype=D)})
    assert_refused_unchanged(
        tx, ones(params), other, params, r"^the optimizer state \(exp_avg\) is for other"
    )
    other = stepped(tx, {**params, "b": torch.ones(5, dtype=D)})
    assert_refused_unchanged(
        tx, ones(params), other, params, r"^the optimizer state \(exp_avg\) of 'b' is"
    )


@pytest.mark.parametrize("make", [lambda: step.sgd(0.1, momentum=0.9), lambda: step.adam(0.1)])
def test_non_floating_parameters_are_refused(make):
    params = {"a": torch.ones(3, dtype=torch.int64)}
    tx = step.applied(make())
    with pytest.raises(ValueError, match="^parameter 'a' must be floating"):
        tx.init(params)
    state = tx.init({"a": torch.ones(3, dtype=D)})
    assert_refused_unchanged(tx, ones(params), state, params, "^parameter 'a' must be floating")


@pytest.mark.parametrize(
    "factor", [torch.tensor(-1.0), torch.tensor(float("nan")), torch.tensor(1), torch.ones(2)]
)
def test_scale_by_tensor_refuses_bad_factors_at_init(factor):
    """A factor (an lr multiplier) that is negative, NaN, not floating or not one per copy."""
    tx = step.scale_by_tensor(lambda params: {"b": factor})
    with pytest.raises(ValueError, match="^the factor of 'b'"):
        tx.init(stack_of(3))
