"""GaugeFixing: soft gauge fixing attached to an unchanged torch.optim loop."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, OrbitSelectionPenalty, imbalance, zoo
from gaugefix.train import unwrap_model

OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "sgd_momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "sgd_nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01),
}


@functools.cache
def _discovered(widths=(6, 12, 12, 2), dtype=torch.float64):
    torch.manual_seed(0)
    model = zoo.mlp(widths).to(dtype)
    x = torch.randn(32, widths[0], dtype=dtype)
    y = torch.randn(32, widths[-1], dtype=dtype)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, 0.8, generator=torch.Generator().manual_seed(1))
    return model, x, y, structure


def setup(widths=(6, 12, 12, 2), dtype=torch.float64):
    model, x, y, structure = _discovered(widths, dtype)
    return copy.deepcopy(model), x, y, structure


def bias_free_setup():
    """A float64 ReLU MLP without biases (2-D parameters only), off balance by a random gauge;
    inputs, targets and its structure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 2, bias=False))
    model = model.double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    structure = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, structure, 0.8, generator=torch.Generator().manual_seed(1))
    return model, x, y, structure


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def mu_norm(model, structure):
    with torch.no_grad():
        return float(imbalance(model, structure).norm())


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_exact_mode_keeps_the_steps_function_and_transports_state(opt_name):
    """A step with the hook realises the same function as the same step without it; the two
    models then differ by a gauge transformation, every entry by a factor
    f = theta_hook / theta_plain, and so does the optimizer state (gradient-like buffers / f,
    second moments / f^2)."""
    model, x, y, structure = setup()
    plain = copy.deepcopy(model)
    opt = OPTIMIZERS[opt_name](model.parameters(), 0.05)
    opt_plain = OPTIMIZERS[opt_name](plain.parameters(), 0.05)
    hook = GaugeFixing(opt, model, structure, strength=2.0, balance_at_start=False, every=1)
    train_step(model, opt, x, y)
    train_step(plain, opt_plain, x, y)
    assert rel(model(x).detach(), plain(x).detach()) <= 1e-10
    assert hook.steps == 1 and hook.skipped == 0
    assert mu_norm(model, structure) < 0.99 * mu_norm(plain, structure)
    plain_params = structure.bind(plain)
    for k, p in structure.bind(model).items():
        f = p.detach() / plain_params[k].detach()
        assert float((f - 1).abs().max()) > 1e-4  # the hook did move this parameter
        assert float((p.grad - plain_params[k].grad / f).norm()) <= 1e-12 * float(p.grad.norm())
        for s, v in opt.state[p].items():
            ref = opt_plain.state[plain_params[k]][s]
            if s in ("momentum_buffer", "exp_avg"):
                assert float((v - ref / f).norm()) <= 1e-12 * float(ref.norm())
            elif s == "exp_avg_sq":
                assert float((v - ref / f**2).norm()) <= 1e-12 * float(ref.norm())
            else:
                assert torch.equal(v, ref)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_training_suppresses_drift(opt_name, mode):
    """A short training run: the loss goes down and the imbalance stays far below plain
    training's (both start balanced). The explicit form is the weaker one at large
    lr * strength * S (e.g. SGD with Nesterov momentum diverges at strength 5 here, where the
    exact form is stable), so penalty mode runs at strength 1."""
    model, x, y, structure = setup()
    gaugefix.balance_(model, structure)
    plain = copy.deepcopy(model)
    lr = 0.01 if opt_name.startswith("adam") else 0.1
    opt = OPTIMIZERS[opt_name](model.parameters(), lr)
    opt_plain = OPTIMIZERS[opt_name](plain.parameters(), lr)
    GaugeFixing(opt, model, structure, strength=5.0 if mode == "exact" else 1.0, mode=mode, every=1)
    losses = [train_step(model, opt, x, y) for _ in range(30)]
    for _ in range(30):
        train_step(plain, opt_plain, x, y)
    assert losses[-1] < 0.9 * losses[0]
    assert mu_norm(model, structure) < 0.5 * mu_norm(plain, structure)


def test_penalty_mode_adds_the_functional_gradient():
    """With plain SGD: theta' = theta - lr (grad L + grad P)."""
    model, x, y, structure = setup()
    expected = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    GaugeFixing(
        opt, model, structure, strength=0.7, mode="penalty", balance_at_start=False, every=1
    )
    train_step(model, opt, x, y)
    loss = (expected(x) - y).square().mean() + OrbitSelectionPenalty(structure, 0.7)(expected)
    loss.backward()
    with torch.no_grad():
        for p, q in zip(model.parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(p, q - 0.05 * q.grad, rtol=1e-13, atol=1e-15)


def test_several_param_groups_and_params_outside_the_optimizer():
    """Each neuron relaxes at strength * min(lr) over the parameters it touches; neurons
    touching parameters the optimizer does not hold are left out and never moved."""
    model, x, y, structure = setup((6, 12, 12, 12, 2))
    lin = [m for m in model if isinstance(m, nn.Linear)]
    frozen = lin[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(
        [
            {"params": lin[1].parameters(), "lr": 0.01},
            {"params": [*lin[2].parameters(), *lin[3].parameters()], "lr": 0.04},
        ],
        momentum=0.9,
    )
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    hook = GaugeFixing(opt, model, structure, strength=3.0, balance_at_start=False, every=1)
    rate = hook.rate()
    assert isinstance(rate, torch.Tensor)
    assert hook.left_out == {"touching a parameter the optimizer does not hold": 12}
    expected = torch.tensor([3.0 * 0.01] * 12 + [3.0 * 0.04] * 12, dtype=torch.float64)
    torch.testing.assert_close(rate, expected)
    plain = copy.deepcopy(model)
    opt_plain = torch.optim.SGD(
        [
            {"params": list(plain)[2].parameters(), "lr": 0.01},
            {"params": [*list(plain)[4].parameters(), *list(plain)[6].parameters()], "lr": 0.04},
        ],
        momentum=0.9,
    )
    mu0 = imbalance(model, structure).detach()
    for _ in range(3):
        train_step(model, opt, x, y)
        train_step(plain, opt_plain, x, y)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    mu = imbalance(model, structure).detach()
    mu_plain = imbalance(plain, structure).detach()
    assert float(mu[12:].norm()) < float(mu_plain[12:].norm())
    assert float(mu[12:].norm()) < float(mu0[12:].norm())
    opt.param_groups[0]["lr"] = 0.04  # schedulers are followed
    assert hook.rate() == pytest.approx(3.0 * 0.04)


def test_uniform_lr_gives_scalar_rate_and_uncovered_params_are_left_alone():
    """Parameters the structure does not cover (the output bias, an extra parameter) get
    exactly the plain optimizer's update; the rate is strength * lr as a float. (Two steps: after
    the first, both models realise the same function, so the output bias sees the same gradient
    in the second; after that the Euclidean steps from two points of one orbit differ.)"""
    model, x, y, structure = setup()
    plain = copy.deepcopy(model)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    extra_plain = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1, momentum=0.9)
    opt_plain = torch.optim.SGD([*plain.parameters(), extra_plain], lr=0.1, momentum=0.9)
    hook = GaugeFixing(opt, model, structure, strength=2.0, balance_at_start=False, every=1)
    assert hook.rate() == pytest.approx(0.2)
    assert "4.bias" not in structure.params
    for m, o, e in ((model, opt, extra), (plain, opt_plain, extra_plain)):
        for _ in range(2):
            o.zero_grad()
            ((m(x) - y).square().mean() + e.square().sum()).backward()
            o.step()
    assert torch.equal(model[4].bias, plain[4].bias) and torch.equal(extra, extra_plain)
    assert not torch.equal(model[4].weight, plain[4].weight)  # a covered parameter did move
    assert hook.steps == 2


def test_balance_at_start_and_remove():
    model, x, y, structure = setup()
    y0 = model(x).detach()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_step(model, opt, x, y)  # the optimizer already has state
    y0 = model(x).detach()
    hook = GaugeFixing(opt, model, structure, strength=1.0, every=1)
    assert rel(model(x).detach(), y0) <= 1e-10
    s = hook.stats()
    assert s["mu_rel_max"] <= 1e-9
    hook.remove()
    plain = copy.deepcopy(model)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt_plain.load_state_dict(copy.deepcopy(opt.state_dict()))  # (it would share tensors)
    train_step(model, opt, x, y)
    train_step(plain, opt_plain, x, y)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    assert hook.steps == 0


def test_non_finite_gradient_or_parameters_skip_the_step():
    """A non-finite loss: the hook neither raises nor touches anything; the optimizer's own
    update is what the plain optimizer would have done."""
    for mode in ("exact", "penalty"):
        model, x, y, structure = setup()
        plain = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
        hook = GaugeFixing(
            opt, model, structure, strength=1.0, mode=mode, balance_at_start=False, every=1
        )
        for m, o in ((model, opt), (plain, opt_plain)):
            o.zero_grad()
            (m(x).sum() * float("inf")).backward()
            o.step()
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q, equal_nan=True, rtol=0, atol=0)
        assert hook.skipped == 1 and hook.steps == 0

    # Finite gradients but a parameter that is already non-finite after the step.
    model, x, y, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = GaugeFixing(opt, model, structure, strength=1.0, balance_at_start=False, every=1)
    (model(x) - y).square().mean().backward()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    opt.step()
    assert hook.skipped == 1


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_step_with_closure(mode):
    """optimizer.step(closure) (as Lightning calls it) gets the same gauge fixing as a plain
    step: the closure is wrapped, so the gradients it computes are the ones checked and, in
    penalty mode, the ones grad P is added to."""
    model, x, y, structure = setup()
    other = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    GaugeFixing(opt, model, structure, strength=1.0, mode=mode, balance_at_start=False, every=1)
    hook = GaugeFixing(opt_other, other, structure, 1.0, mode=mode, balance_at_start=False, every=1)

    def closure():
        opt_other.zero_grad()
        loss = (other(x) - y).square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        train_step(model, opt, x, y)
        assert float(opt_other.step(closure).detach()) > 0
        opt_other.step(closure=closure)  # the keyword form
        train_step(model, opt, x, y)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
    assert hook.steps == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_low_precision_parameters(dtype, mode):
    """float32 and bfloat16 parameters train with the hook, stay in their dtype, and drift less
    than without it (mu itself is accumulated in float32)."""
    model, x, y, structure = setup(dtype=dtype)
    gaugefix.balance_(model, structure)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    hook = GaugeFixing(
        opt, model, structure, strength=5.0 if mode == "exact" else 1.0, mode=mode, every=1
    )
    losses = [train_step(model, opt, x, y) for _ in range(20)]
    for _ in range(20):
        train_step(plain, opt_plain, x, y)
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert losses[-1] < losses[0]
    assert hook.skipped == 0
    assert hook.stats()["mu_norm"] < 0.5 * gaugefix.imbalance_stats(plain, structure)["mu_norm"]


def test_unwraps_compiled_module():
    model, *_ = setup()
    assert unwrap_model(torch.compile(model)) is model


@pytest.mark.parametrize("strength", [-0.1, float("nan"), float("inf")])
def test_bad_strength(strength):
    model, *_, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="strength"):
        GaugeFixing(opt, model, structure, strength, every=1)


def test_bad_arguments_modify_nothing():
    model, x, y, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, x, y)
    before = copy.deepcopy(model.state_dict())
    state = {
        k: v["momentum_buffer"].clone() for k, v in zip(range(99), opt.state.values(), strict=False)
    }
    other = zoo.mlp((6, 12, 8, 2)).double()
    with pytest.raises(ValueError, match="holds no parameter of the model"):
        GaugeFixing(opt, other, structure, 1.0, every=1)
    with pytest.raises(ValueError, match="does not match"):
        GaugeFixing(torch.optim.SGD(other.parameters(), lr=0.1), other, structure, 1.0, every=1)
    with pytest.raises(ValueError, match="mode"):
        GaugeFixing(opt, model, structure, 1.0, mode="soft", every=1)
    with pytest.raises(TypeError):
        GaugeFixing("sgd", model, structure, 1.0, every=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in zip(range(99), opt.state.values(), strict=False):
        assert torch.equal(v["momentum_buffer"], state[k])
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_untransportable_optimizer_state():
    model, x, y, structure = setup()
    with pytest.raises(ValueError, match="cannot transport optimizer state 'sum'"):
        opt = torch.optim.Adagrad(model.parameters(), initial_accumulator_value=0.1)
        GaugeFixing(opt, model, structure, 1.0, every=1)
    opt = torch.optim.Adamax(model.parameters(), lr=0.01)  # its state made at its first step
    with pytest.raises(ValueError, match="cannot transport optimizer state .exp_inf. of Adamax"):
        GaugeFixing(opt, model, structure, 1.0, every=1)
    assert not opt.state and not opt._optimizer_step_post_hooks


def bit_equal(a, b) -> bool:
    """Equal, tensors bit for bit, through the dicts and lists of an optimizer's state_dict."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(bit_equal, a, b))
    return a == b


UNSHAPED = {
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),
}


@pytest.mark.parametrize("opt_name", list(UNSHAPED))
def test_state_not_shaped_like_its_parameter_is_refused(opt_name):
    """State a rescaling cannot transport because it is not shaped like its parameter (L-BFGS's
    flat direction and history, Adafactor's factored second moments of a bias-free net) is
    refused like Adagrad's: by the constructor, relax_, balance_ and apply_gauge_ (nothing
    changed, no hook left), and a fresh one by its class in exact mode; it used to be left
    stale."""
    if not hasattr(torch.optim, "Adafactor") and opt_name == "adafactor":
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    model, x, y, structure = bias_free_setup()

    def closure(opt):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    opt = UNSHAPED[opt_name](model.parameters())
    opt.step(functools.partial(closure, opt))
    before, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="cannot transport optimizer state"):
        GaugeFixing(opt, model, structure, 1.0, every=1)
    h = torch.ones(structure.num_generators, dtype=torch.float64)
    for entry in (
        lambda: gaugefix.relax_(model, structure, 1.0, optimizer=opt),
        lambda: gaugefix.balance_(model, structure, optimizer=opt),
        lambda: gaugefix.apply_gauge_(model, structure, h, optimizer=opt),
    ):
        with pytest.raises(ValueError, match="cannot transport optimizer state"):
            entry()
    assert bit_equal(model.state_dict(), before) and bit_equal(opt.state_dict(), state)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    fresh = UNSHAPED[opt_name](model.parameters())
    with pytest.raises(ValueError, match="cannot transport optimizer state"):
        GaugeFixing(fresh, model, structure, 1.0, every=1)  # no state yet: by its class


def test_param_group_added_later_is_followed():
    model, x, y, structure = setup()
    params = list(model.parameters())
    opt = torch.optim.SGD(params[:2], lr=0.1)
    hook = GaugeFixing(opt, model, structure, strength=1.0, balance_at_start=False, every=1)
    assert hook.active.num_generators == 0  # every neuron touches an unheld parameter
    assert hook.rate() == 0.0
    opt.add_param_group({"params": params[2:], "lr": 0.1})
    assert hook.rate() == pytest.approx(0.1)
    assert hook.active.num_generators == structure.num_generators and hook.left_out == {}


# -- an orbit step every k optimizer steps (the default configuration) ----------------------------
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_every_k_steps_is_one_orbit_step_at_the_summed_rate(opt_name):
    """``every=3``: the first two steps are the optimizer's alone; after the third the model is
    moved by ``relax_`` at ``strength * (lr_1 + lr_2 + lr_3)`` with the state transported,
    exactly as done by hand (the learning rate changes between the steps)."""
    model, x, y, structure = setup()
    reference = copy.deepcopy(model)
    opt = OPTIMIZERS[opt_name](model.parameters(), 0.01)
    ref_opt = OPTIMIZERS[opt_name](reference.parameters(), 0.01)
    hook = GaugeFixing(opt, model, structure, strength=3.0, balance_at_start=False, every=3)
    lrs = [0.01, 0.02, 0.005, 0.01]
    for k, lr in enumerate(lrs, start=1):
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = lr
        train_step(model, opt, x, y)
        train_step(reference, ref_opt, x, y)
        if k == 3:
            gaugefix.relax_(reference, structure, 3.0 * sum(lrs[:3]), optimizer=ref_opt)
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b), k
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, ref_opt.state[q][key]), (k, key)
    assert hook.steps == 1 and hook.skipped == 0 and hook.every == 3


def test_steps_between_orbit_steps_are_not_checked_or_touched():
    """A NaN gradient on a step the hook does not act on is the optimizer's business: the hook
    neither reads nor counts it."""
    model, x, y, structure = setup()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    hook = GaugeFixing(opt, model, structure, strength=1.0, balance_at_start=False, every=2)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        (m(x) - y).square().mean().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    next(reference.parameters()).grad[0, 0] = float("nan")
    opt.step()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.detach().nan_to_num(), q.detach().nan_to_num())
        assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
    assert hook.steps == 0 and hook.skipped == 0


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_every_must_be_a_positive_integer(every):
    model, _, _, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="every"):
        GaugeFixing(opt, model, structure, 1.0, every=every)
    assert not opt._optimizer_step_pre_hooks


def test_state_dict_round_trip_and_bad_states():
    model, x, y, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=4)
    for _ in range(6):
        train_step(model, opt, x, y)
    state = hook.state_dict()
    assert state == {"steps": 1, "skipped": 0, "since": 2, "lr_sums": [0.02]}
    hook.remove()
    other = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=4)
    other.load_state_dict(state)
    assert other.state_dict() == state
    bad_sums = ([0.01, 0.01], [float("nan")], [-0.01], [float("inf")])  # one group: one sum >= 0
    for bad in (
        {},
        {**state, "since": 4},
        {**state, "steps": "x"},
        {**state, "skipped": -1},
        *({**state, "lr_sums": sums} for sums in bad_sums),
    ):
        with pytest.raises(ValueError):
            other.load_state_dict(bad)
    assert other.state_dict() == state


def test_second_hook_on_one_optimizer_is_refused():
    """Issue 18, item 10: a second GaugeFixing on an optimizer that has one raises one line and
    changes nothing; after ``remove()`` a new one is accepted."""
    model, x, y, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = GaugeFixing(opt, model, structure, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="already has a GaugeFixing hook") as err:
        GaugeFixing(opt, model, structure, 0.1)
    assert "\n" not in str(err.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    first.remove()
    second = GaugeFixing(opt, model, structure, 0.1)
    assert second.active.num_generators == structure.num_generators


def snapshot(model, opt):
    """Every parameter, gradient and optimizer-state tensor, cloned."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, grads, state


def same(a, b) -> bool:
    def eq(u, v):
        return (u is None and v is None) or torch.equal(u, v)

    (pa, ga, sa), (pb, gb, sb) = a, b
    states = zip(sa, sb, strict=True)
    return all(eq(u, v) for u, v in zip(pa + ga, pb + gb, strict=True)) and all(
        x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x) for x, y in states
    )


@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf"), "0.1", True])
def test_bad_learning_rate_mid_run_is_refused_before_the_step(bad):
    """A scheduler (or a user) sets a group's lr to NaN, a negative number, inf or a non-number
    in the middle of an interval between orbit steps: the step is refused before the optimizer
    moves anything, with an error naming the group, and the run continues once the lr is
    fixed, as if the bad step had never been attempted."""
    model, x, y, structure = setup()
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    groups = [{"params": first, "lr": 0.05}, {"params": rest, "lr": 0.02}]
    opt = torch.optim.SGD(groups, momentum=0.9)
    hook = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=3)
    train_step(model, opt, x, y)
    opt.param_groups[1]["lr"] = bad
    state, before = hook.state_dict(), snapshot(model, opt)
    with pytest.raises(ValueError, match=r"learning rate \(lr\) of parameter group 1") as err:
        opt.step()
    assert "\n" not in str(err.value) and "refused" in str(err.value)
    assert same(snapshot(model, opt), before) and hook.state_dict() == state
    opt.param_groups[1]["lr"] = 0.02
    for _ in range(2):
        train_step(model, opt, x, y)
    assert hook.steps == 1 and hook.state_dict()["since"] == 0


def test_penalty_mode_takes_no_every():
    """Penalty mode adds the penalty's gradient at every step: an ``every`` other than 1 is
    refused (nothing attached), 1 or none accepted; exact mode defaults to EVERY."""
    model, _, _, structure = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="every=5 has no meaning in penalty mode"):
        GaugeFixing(opt, model, structure, 1.0, mode="penalty", every=5)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for mode, every, expected in (
        ("penalty", {"every": 1}, 1),
        ("penalty", {}, 1),
        ("exact", {}, 10),
    ):
        with GaugeFixing(opt, model, structure, 1.0, mode=mode, **every) as hook:
            assert hook.every == expected
    with pytest.raises(ValueError, match="every=10 has no meaning"):  # given, not the default
        GaugeFixing(opt, model, structure, 1.0, mode="penalty", every=10)


def test_steps_a_grad_scaler_skips_are_not_counted():
    """A step ``torch.amp.GradScaler`` skips (inf gradients) never calls ``optimizer.step()``:
    the hook neither counts it nor adds its learning rate, so the orbit step comes after the
    ``every``-th step actually taken, at the sum of their learning rates."""
    model, x, y, structure = setup(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hook = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=2)
    scaler = torch.amp.GradScaler("cpu")
    for overflow in (False, True, False):
        opt.zero_grad()
        loss = (model(x) - y).square().mean() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        before = snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        if overflow:  # (the scaler unscaled the gradients; nothing else moved)
            after = snapshot(model, opt)
            assert same((after[0], [], after[2]), (before[0], [], before[2]))
            assert hook.state_dict() == {"steps": 0, "skipped": 0, "since": 1, "lr_sums": [0.05]}
    assert hook.state_dict() == {"steps": 1, "skipped": 0, "since": 0, "lr_sums": []}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rate", [1e-3, 3.0])  # the cheap bound's step, and the bounded search
def test_orbit_step_takes_a_float_rate_and_an_ok_flag(dtype, rate):
    """``orbit_step`` at a float rate is bit for bit its step at that rate as a 0-dim float64
    tensor (applied as a number, no tensor made for it); with ``ok`` false every copy counts as
    not finite, ``h = 0``, and ``relax_unchecked_`` moves nothing and reports it."""
    model, *_, structure = setup(dtype=dtype)
    params = structure.bind(model)
    as_tensor = gaugefix.soft.orbit_step(params, structure, torch.tensor(rate, dtype=torch.float64))
    as_float = gaugefix.soft.orbit_step(params, structure, rate)
    assert as_tensor[0].abs().max() > 0 and bool(as_tensor[1])
    for a, b in zip(as_tensor, as_float, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    ok = torch.tensor(True)
    assert all(torch.equal(a, b) for a, b in zip(as_float, gaugefix.soft.orbit_step(
        params, structure, rate, ok=ok), strict=True))  # fmt: skip
    h, finite = gaugefix.soft.orbit_step(params, structure, rate, ok=~ok)
    assert not bool(finite) and torch.equal(h, torch.zeros_like(h))
    before = {name: p.detach().clone() for name, p in params.items()}
    _, moved = gaugefix.soft.relax_unchecked_(structure, params, rate, None, ok=~ok)
    assert not bool(moved)
    assert all(torch.equal(before[name], p) for name, p in params.items())


@pytest.mark.parametrize("rate", [1e-3, 3.0])  # the cheap bound's step, and the bounded search
def test_orbit_step_takes_a_float_rate_for_a_stack_of_copies(rate):
    """With ``batch_dims=1`` a float rate is every copy's rate: bit for bit the step at that rate
    as a ``[R]`` float64 tensor (it raised ``TypeError``: 'float' object is not subscriptable)."""
    model, *_, structure = setup(dtype=torch.float64)
    params = structure.bind(model)
    gen = torch.Generator().manual_seed(3)
    stack = {name: p.detach() * (1 + torch.rand(3, *p.shape, generator=gen, dtype=p.dtype))
             for name, p in params.items()}  # fmt: skip
    rates = torch.full((3,), rate, dtype=torch.float64)
    as_tensor = gaugefix.soft.orbit_step(stack, structure, rates, batch_dims=1)
    as_float = gaugefix.soft.orbit_step(stack, structure, rate, batch_dims=1)
    assert as_tensor[0].shape == (3, structure.num_generators) and as_tensor[0].abs().max() > 0
    for a, b in zip(as_tensor, as_float, strict=True):
        assert torch.equal(a, b)
