"""The group action ``g(h)``, optimizer-state transport, ``random_gauge_`` and the imbalance."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import (
    DTYPE,
    FAMILIES,
    any_case,
    assert_same_bits,
    entries,
    randomise_,
    reference_action,
    reference_imbalance,
    reference_sq_norms,
    rel_change,
    snapshot,
)
from gaugefix import zoo

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_rel_close(actual: Tensor, expected: Tensor, rel: float, what: str = "") -> None:
    """Entry-wise ``|actual - expected| <= rel * |expected|``."""
    actual, expected = actual.detach(), expected.detach()
    err = (actual - expected).abs()
    bad = err > rel * expected.abs()
    assert not bool(bad.any()), (what, float((err / expected.abs()).nan_to_num(0).max()))


def assert_close_to_scale(actual: Tensor, expected: Tensor, rel: float, what: str = "") -> None:
    """``max |actual - expected| <= rel * max |expected|`` (for computed gradients, whose small
    entries carry the rounding of the large ones)."""
    actual, expected = actual.detach(), expected.detach()
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rel * float(expected.abs().max() if expected.numel() else 0.0), (what, err)


def drawn_gauge(data, n: int, scale: float | None = None) -> Tensor:
    if scale is None:
        scale = data.draw(st.floats(0.1, 2.0), label="scale")
    seed = data.draw(st.integers(0, 2**16), label="gauge seed")
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# --- the action --------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(case=any_case, data=st.data())
def test_action_matches_the_per_neuron_definition(case, data):
    s = gaugefix.discover(case.model, *case.inputs)
    h = drawn_gauge(data, s.num_generators)
    expected = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    reference_action(s, expected, h)
    gaugefix.apply_gauge_(case.model, s, h)
    for name, p in case.model.named_parameters():
        assert_rel_close(p.detach(), expected[name], 1e-13, name)


@settings(max_examples=100, deadline=None)
@given(case=any_case, data=st.data())
def test_action_composes_additively_and_inverts(case, data):
    s = gaugefix.discover(case.model, *case.inputs)
    h1, h2 = drawn_gauge(data, s.num_generators), drawn_gauge(data, s.num_generators)
    original = snapshot(case.model)
    twice = copy.deepcopy(case.model)
    gaugefix.apply_gauge_(twice, s, h1)
    gaugefix.apply_gauge_(twice, s, h2)
    once = copy.deepcopy(case.model)
    gaugefix.apply_gauge_(once, s, h1 + h2)
    for (name, a), b in zip(twice.named_parameters(), once.parameters(), strict=True):
        assert_rel_close(a.detach(), b.detach(), 1e-12, name)
    gaugefix.apply_gauge_(once, s, -(h1 + h2))  # the inverse
    for name, p in once.named_parameters():
        assert_rel_close(p.detach(), original[name], 1e-14, name)
    for name, b in once.named_buffers():  # buffers (BatchNorm statistics) are never touched
        assert torch.equal(b, original[name]), name


def test_action_keeps_references_and_leaves_buffers_alone():
    torch.manual_seed(0)
    model = randomise_(zoo.ResNet(), 0).train()
    x = torch.randn(4, 3, 8, 8, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    refs = [p for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    gaugefix.random_gauge_(model, s, 1.0)
    assert [p for p in model.parameters()] == refs
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_action_in_float32_keeps_outputs_to_float32_precision():
    torch.manual_seed(1)
    model = zoo.cnn().float().eval()
    x = torch.randn(2, 3, 16, 16)
    s = gaugefix.discover(model, x)
    with torch.no_grad():
        before = model(x)
        gaugefix.random_gauge_(model, s, 1.0, generator=torch.Generator().manual_seed(0))
        after = model(x)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert rel_change(before, after) <= 1e-5


# --- random_gauge_ -------------------------------------------------------------------------------
def test_random_gauge_is_seeded_and_scaled():
    torch.manual_seed(2)
    a = zoo.mlp((5, 40, 40, 2)).double()
    b = copy.deepcopy(a)
    s = gaugefix.discover(a, torch.randn(3, 5, dtype=DTYPE))
    ha = gaugefix.random_gauge_(a, s, 0.5, generator=torch.Generator().manual_seed(3))
    hb = gaugefix.random_gauge_(b, s, 0.5, generator=torch.Generator().manual_seed(3))
    assert ha.dtype == torch.float64 and ha.shape == (80,)
    assert torch.equal(ha, hb)
    assert torch.equal(
        ha, 0.5 * torch.randn(80, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    )
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_random_gauge_with_scale_zero_changes_nothing():
    model = zoo.mlp((4, 6, 3)).double()
    s = gaugefix.discover(model, torch.randn(2, 4, dtype=DTYPE))
    saved = snapshot(model)
    h = gaugefix.random_gauge_(model, s, 0.0)
    assert torch.equal(h, torch.zeros(6, dtype=DTYPE))
    assert_same_bits(model, saved)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), "1"])
def test_random_gauge_rejects_bad_scales(scale):
    model = zoo.mlp((4, 6, 3)).double()
    s = gaugefix.discover(model, torch.randn(2, 4, dtype=DTYPE))
    saved = snapshot(model)
    with pytest.raises(ValueError):
        gaugefix.random_gauge_(model, s, scale)
    assert_same_bits(model, saved)


@pytest.mark.parametrize("seeded", [True, False])
def test_random_gauge_refused_leaves_the_generator_as_it_was(seeded):
    # a move refused (here: factors beyond float32's range) draws nothing from the caller's
    # generator, or from torch's global one when none is given
    model = zoo.mlp((4, 6, 3))
    s = gaugefix.discover(model, torch.randn(2, 4))
    saved = snapshot(model)
    generator = torch.Generator().manual_seed(5) if seeded else None
    source = generator if seeded else torch.default_generator
    state = source.get_state()
    with pytest.raises(ValueError):
        gaugefix.random_gauge_(model, s, 1e6, generator=generator)
    assert torch.equal(source.get_state(), state)
    assert_same_bits(model, saved)


# --- optimizer state -----------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.0, momentum=0.9),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.0, momentum=0.9, nesterov=True),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.0, momentum=0.5, dampening=0.3),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=0.0),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.0, betas=(0.8, 0.9)),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.0, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.0, weight_decay=0.1),
}


def loss_of(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.square().mean() + out.mean()


def accumulate(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Tensor]) -> None:
    """Optimizer steps with ``lr = 0``: the state accumulates gradients at one fixed point."""
    for x in batches:
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_transported_state_equals_state_built_at_the_new_point(optimizer, data):
    """Transporting state along ``g(h)`` gives what the optimizer would hold had it seen the
    gradients at ``g(h) . theta``: gradient-like buffers scale by the inverse factor, second
    moments by its square."""
    family = data.draw(st.sampled_from(["mlp", "cnn", "resnet", "transformer"]))
    case = data.draw(FAMILIES[family])
    s = gaugefix.discover(case.model, *case.inputs)
    h = drawn_gauge(data, s.num_generators)
    x = case.inputs[0]
    batches = [x, x.flip(0) * 0.5 + 0.1, -x]
    moved = copy.deepcopy(case.model)
    gaugefix.apply_gauge_(moved, s, h)
    opt = OPTIMIZERS[optimizer](case.model.parameters())
    fresh = OPTIMIZERS[optimizer](moved.parameters())
    accumulate(case.model, opt, batches)
    accumulate(moved, fresh, batches)

    gaugefix.apply_gauge_(case.model, s, h, optimizer=opt)

    # Gradients computed at two points agree to rounding relative to the size of the terms
    # that formed them; an entry that is zero in exact arithmetic (the bias of a conv feeding a
    # training-mode BatchNorm) is pure rounding noise, so it is compared at the scale of the
    # largest entry of that kind in the model.
    params = list(case.model.named_parameters())
    expected_of = {
        "grad": {name: q.grad for (name, _), q in zip(params, moved.parameters(), strict=True)}
    }
    for (name, _), q in zip(params, moved.parameters(), strict=True):
        for key, value in fresh.state[q].items():
            if isinstance(value, Tensor) and value.shape == q.shape:
                expected_of.setdefault(key, {})[name] = value
    largest = {
        key: max(float(t.abs().max()) for t in ts.values() if t.numel())
        for key, ts in expected_of.items()
    }
    for (name, p), q in zip(params, moved.parameters(), strict=True):
        assert_rel_close(p.detach(), q.detach(), 1e-12, name)
        actual_of = {"grad": p.grad} | {k: v for k, v in opt.state[p].items()}
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, value in ({"grad": q.grad} | fresh.state[q]).items():
            actual = actual_of[key]
            if isinstance(value, Tensor) and value.shape == p.shape:
                err = float((actual - value).abs().max())
                bound = 1e-10 * float(value.abs().max()) + 1e-13 * largest[key]
                assert err <= bound, (name, key, err, bound)
            elif isinstance(value, Tensor):
                assert torch.equal(actual, value), key  # e.g. Adam's step count
            else:
                assert actual == value, key


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adagrad(ps, lr=0.0, initial_accumulator_value=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=0.0, momentum=0.9),
        lambda ps: torch.optim.Adamax(ps, lr=0.0),
    ],
    ids=["adagrad-initial", "rmsprop-momentum", "adamax"],
)
def test_untransportable_optimizer_state_raises_before_modifying(make):
    torch.manual_seed(4)
    model = zoo.mlp((4, 6, 3)).double()
    x = torch.randn(5, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    opt = make(model.parameters())
    accumulate(model, opt, [x])
    saved, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="cannot transport"):
        gaugefix.apply_gauge_(model, s, torch.ones(6, dtype=DTYPE), optimizer=opt)
    assert_same_bits(model, saved)
    for k, v in opt.state_dict()["state"].items():
        for key, t in v.items():
            assert torch.equal(t, state["state"][k][key])


def test_optimizer_must_be_an_optimizer():
    model = zoo.mlp((4, 6, 3)).double()
    s = gaugefix.discover(model, torch.randn(2, 4, dtype=DTYPE))
    saved = snapshot(model)
    with pytest.raises(TypeError):
        gaugefix.apply_gauge_(model, s, torch.ones(6, dtype=DTYPE), optimizer={"lr": 1})
    assert_same_bits(model, saved)


# --- bad input -----------------------------------------------------------------------------------
def _resnet() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(5)
    return randomise_(zoo.ResNet(), 5).train(), torch.randn(3, 3, 8, 8, dtype=DTYPE)


def _mlp() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(6)
    return zoo.mlp((4, 6, 5, 3)).double(), torch.randn(3, 4, dtype=DTYPE)


@pytest.mark.parametrize("build", [_mlp, _resnet], ids=["mlp", "resnet"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_parameters_raise_and_change_nothing(build, bad, where):
    model, x = build()
    s = gaugefix.discover(model, x)
    names = list(s.params)
    name = names[0] if where == "first" else names[-1]
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[-1] = bad
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    saved = snapshot(model)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        gaugefix.apply_gauge_(model, s, torch.full((s.num_generators,), 0.3, dtype=DTYPE), opt)
    assert_same_bits(model, saved)
    assert all(
        torch.equal(st["momentum_buffer"], torch.ones_like(p)) for p, st in opt.state.items()
    )
    with pytest.raises(ValueError):
        gaugefix.random_gauge_(model, s, 1.0)
    assert_same_bits(model, saved)


@pytest.mark.parametrize(
    "h, error",
    [
        (torch.zeros(12, dtype=DTYPE), ValueError),
        (torch.zeros(10, dtype=DTYPE), ValueError),
        (torch.zeros(1, 11, dtype=DTYPE), ValueError),
        (torch.zeros(11, 1, dtype=DTYPE), ValueError),
        (torch.zeros((), dtype=DTYPE), ValueError),
        (torch.zeros(11, dtype=torch.long), ValueError),
        (torch.full((11,), float("nan"), dtype=DTYPE), ValueError),
        (torch.full((11,), float("inf"), dtype=DTYPE), ValueError),
        ([0.0] * 11, TypeError),
    ],
    ids=["long", "short", "row", "column", "scalar", "integer", "nan", "inf", "list"],
)
def test_bad_h_raises_and_changes_nothing(h, error):
    model, x = _mlp()
    s = gaugefix.discover(model, x)
    assert s.num_generators == 11
    saved = snapshot(model)
    with pytest.raises(error, match=r"\bh\b"):
        gaugefix.apply_gauge_(model, s, h)
    assert_same_bits(model, saved)


@pytest.mark.parametrize(
    "other",
    [
        lambda: zoo.mlp((4, 6, 7, 3)),  # a shape differs, late in parameter order
        lambda: zoo.mlp((4, 6, 3)),  # a parameter is missing
        lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 5))),
    ],
    ids=["shape", "missing", "names"],
)
def test_structure_of_another_model_raises_before_modifying(other):
    model, x = _mlp()
    s = gaugefix.discover(model, x)
    target = other().double()
    saved = snapshot(target)
    with pytest.raises(ValueError, match="structure does not match"):
        gaugefix.apply_gauge_(target, s, torch.ones(s.num_generators, dtype=DTYPE))
    assert_same_bits(target, saved)
    with pytest.raises(ValueError, match="structure does not match"):
        gaugefix.imbalance(target, s)


# --- imbalance -----------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(case=any_case, data=st.data())
def test_imbalance_matches_the_per_neuron_reference(case, data):
    s = gaugefix.discover(case.model, *case.inputs)
    gaugefix.apply_gauge_(case.model, s, drawn_gauge(data, s.num_generators))
    params = {k: v.detach() for k, v in case.model.named_parameters()}
    mu = gaugefix.imbalance(case.model, s)
    assert mu.shape == (s.num_generators,) and mu.dtype == DTYPE
    assert_close_to_scale(mu, reference_imbalance(s, params), 1e-13)
    # from a mapping of tensors (here: gradients) instead of a model
    loss_of(case.model, case.inputs[0]).backward()
    grads = {k: v.grad for k, v in case.model.named_parameters() if v.grad is not None}
    if all(name in grads for name in s.params):
        mu_g = gaugefix.imbalance(grads, s)
        assert_close_to_scale(mu_g, reference_imbalance(s, grads), 1e-13)


@settings(max_examples=30, deadline=None)
@given(case=any_case, eta=st.floats(1e-3, 1.0))
def test_one_gradient_step_changes_imbalance_by_eta_squared_mu_of_the_gradient(case, eta):
    """``mu(theta - eta g) - mu(theta) = eta^2 mu(g)``: the cross term vanishes because each
    neuron is a symmetry of the loss (Euler identity); a neuron that is not would break this."""
    s = gaugefix.discover(case.model, *case.inputs)
    loss_of(case.model, case.inputs[0]).backward()
    params = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    grads = {k: v.grad for k, v in case.model.named_parameters()}
    if not all(grads.get(name) is not None for name in s.params):
        return
    stepped = {k: params[k] - eta * grads[k] if grads[k] is not None else params[k] for k in params}
    change = gaugefix.imbalance(stepped, s) - gaugefix.imbalance(params, s)
    expected = eta**2 * gaugefix.imbalance(grads, s)
    scale = reference_sq_norms(s, params) + reference_sq_norms(s, stepped)
    assert bool(((change - expected).abs() <= 1e-12 * scale).all())


@settings(max_examples=30, deadline=None)
@given(case=any_case, data=st.data())
def test_imbalance_gradient_is_twice_the_generator(case, data):
    """``grad mu_n = 2 xi_n``: for weights ``v``, ``d(v . mu)/d theta_e = 2 theta_e (v_row -
    v_col)``, a missing side counting 0 (checked against the per-neuron slices)."""
    s = gaugefix.discover(case.model, *case.inputs)
    v = drawn_gauge(data, s.num_generators, scale=1.0)
    params = dict(case.model.named_parameters())
    names = list(s.params)
    if not names:
        return
    mu = gaugefix.imbalance(case.model, s)
    grads = torch.autograd.grad((v * mu).sum(), [params[n] for n in names])
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for n in range(s.num_generators):
        slices = s.generator(n)
        for name, idx in slices.incoming:
            expected[name][entries(idx)] += v[n]
        for name, idx in slices.outgoing:
            expected[name][entries(idx)] -= v[n]
    for name, g in zip(names, grads, strict=True):
        assert_rel_close(g, 2 * params[name].detach() * expected[name], 1e-13, name)


def test_imbalance_in_float32_accumulates_in_float32():
    model = zoo.mlp((4, 6, 3))
    s = gaugefix.discover(model, torch.randn(2, 4))
    mu = gaugefix.imbalance(model, s)
    assert mu.dtype == torch.float32
    ref = reference_imbalance(s, {k: v.detach() for k, v in model.named_parameters()})
    assert torch.allclose(mu.double(), ref, rtol=1e-5, atol=1e-6)


def test_imbalance_of_a_dict_with_missing_entries_raises():
    model, x = _mlp()
    s = gaugefix.discover(model, x)
    tensors = {k: v.detach() for k, v in model.named_parameters()}
    tensors.pop("2.weight")
    with pytest.raises(ValueError, match="2.weight"):
        gaugefix.imbalance(tensors, s)
