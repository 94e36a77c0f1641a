"""``GaugeFixing`` over a model trained by several optimizers (Muon on the weight matrices,
AdamW on embeddings, biases and norm gains): one hook takes the orbit step once per training
step, after every optimizer stepped, at the rate its parameters' learning rates give, and
transports every optimizer's state; bad input is refused with nothing attached."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix.soft import FROZEN_REASON
from gaugefix.zoo import GPT
from test_action_audit2 import assert_close
from test_transport_audit import assert_states_equal, set_lr

pytestmark = pytest.mark.usefixtures("single_thread")

O = torch.optim
D = torch.float64
VOCAB, CONTEXT = 16, 8
MUON_LR, ADAMW_LR = 0.02, 0.003
STRENGTH = 20.0
EVERY = 3
COLLECT = 2  # steps at lr = 0 before the one that moves (the state collects gradients at one point)


def gpt() -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, dim=8, heads=2, layers=1, context=CONTEXT).to(D)
    return model, gaugefix.discover(model, batch(0))


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, CONTEXT), generator=torch.Generator().manual_seed(i))


def split(model: nn.Module) -> tuple[list[str], list[str]]:
    """The names of the weight matrices (Muon's) and of the rest (AdamW's: embeddings too)."""
    names = [n for n, _ in model.named_parameters()]
    matrices = [
        n for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n and "wpe" not in n
    ]
    return matrices, [n for n in names if n not in matrices]


def muon_adamw(model: nn.Module, lr: float = 1.0) -> list[O.Optimizer]:
    """Muon over the weight matrices, AdamW over the rest, at ``lr`` times their rates."""
    params = dict(model.named_parameters())
    matrices, rest = split(model)
    return [
        O.Muon([params[n] for n in matrices], lr=MUON_LR * lr),
        O.AdamW([params[n] for n in rest], lr=ADAMW_LR * lr),
    ]


def gradients(model: nn.Module, opts: list[O.Optimizer], i: int) -> None:
    for opt in opts:
        opt.zero_grad()
    model(batch(i)).square().mean().backward()


def train(model: nn.Module, opts: list[O.Optimizer], steps: range, order=(0, 1)) -> None:
    for i in steps:
        gradients(model, opts, i)
        for k in order:
            opts[k].step()


def rates(model: nn.Module, s: gaugefix.GaugeStructure, steps: int) -> torch.Tensor:
    """Per generator ``STRENGTH * min(lr sums)`` over the two optimizers whose parameters it
    touches, after ``steps`` steps at the base learning rates."""
    matrices, rest = split(model)
    on_muon, on_adamw = s.touching(set(matrices)), s.touching(set(rest))
    muon, adamw = (torch.tensor(sum([lr] * steps), dtype=D) for lr in (MUON_LR, ADAMW_LR))
    lr = torch.where(on_adamw, adamw, muon)
    return STRENGTH * torch.where(on_adamw & on_muon, torch.minimum(muon, adamw), lr)


def assert_models_close(a: nn.Module, b: nn.Module, tol: float = 1e-12) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert_close(p, q, p.abs().amax(), name)
        if p.grad is not None:
            assert_close(p.grad, q.grad, p.grad.abs().amax(), name)


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_one_hook_keeps_every_generator_that_a_hook_per_optimizer_loses():
    model, s = gpt()
    opts = muon_adamw(model)
    for opt in opts:
        with gaugefix.GaugeFixing(opt, model, s, STRENGTH, balance_at_start=False) as gf:
            assert gf.active.num_generators == 0  # every generator touches both optimizers
    with gaugefix.GaugeFixing(opts, model, s, STRENGTH, balance_at_start=False) as gf:
        assert gf.active.num_generators == s.num_generators
        assert gf.left_out == {}


def test_orbit_steps_are_relax_with_both_optimizers():
    """``EVERY`` training steps hooked equal the same steps unhooked followed by ``relax_``
    at the rates of the summed learning rates with both optimizers passed (1e-12)."""
    model, s = gpt()
    ref = copy.deepcopy(model)
    opts, ref_opts = muon_adamw(model), muon_adamw(ref)
    gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=EVERY, balance_at_start=False)
    for start in (0, EVERY):
        train(model, opts, range(start, start + EVERY))
        train(ref, ref_opts, range(start, start + EVERY))
        h = gaugefix.relax_(ref, s, rates(ref, s, EVERY), optimizer=ref_opts)
        assert float(h.abs().max()) > 1e-3
        assert_models_close(model, ref)
        pairs = list(zip(model.parameters(), ref.parameters(), strict=True))
        for opt, new in zip(opts, ref_opts, strict=True):
            mine = [(p, q) for p, q in pairs if p in opt.state]
            assert_states_equal(opt, new, mine, type(opt).__name__)
    assert (gf.steps, gf.skipped) == (2, 0)


def test_both_optimizers_states_are_the_states_at_the_moved_point():
    """``COLLECT`` steps at ``lr = 0`` and one at the base rates collect gradients at one
    point; the orbit step after it moves both optimizers' state to the state collected at the
    moved point (as many steps at ``lr = 0`` there)."""
    model, s = gpt()
    start = copy.deepcopy(model)
    opts = muon_adamw(model, lr=0.0)
    gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=COLLECT + 1, balance_at_start=False)
    train(model, opts, range(COLLECT))
    ref = copy.deepcopy(model)
    ref_opts = muon_adamw(ref, lr=0.0)
    for opt, new in zip(opts, ref_opts, strict=True):
        new.load_state_dict(copy.deepcopy(opt.state_dict()))  # shares no tensor
    for pair in (opts, ref_opts):
        for opt, lr in zip(pair, (MUON_LR, ADAMW_LR), strict=True):
            set_lr(opt, lr)
    train(model, opts, range(COLLECT, COLLECT + 1))
    train(ref, ref_opts, range(COLLECT, COLLECT + 1))
    h = gaugefix.relax_(ref, s, rates(ref, s, 1), optimizer=ref_opts)
    assert gf.steps == 1 and float(h.abs().max()) > 1e-3
    assert_models_close(model, ref)
    gaugefix.apply_gauge_(start, s, h)
    fresh = muon_adamw(start, lr=0.0)
    train(start, fresh, range(COLLECT + 1))
    pairs = list(zip(model.parameters(), start.parameters(), strict=True))
    for opt, new in zip(opts, fresh, strict=True):
        assert_states_equal(opt, new, [(p, q) for p, q in pairs if p in opt.state], "moved")


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (0, 0, 1), (1, 0, 0)])
def test_one_orbit_step_per_training_step_in_any_order(order):
    """Whichever optimizer steps first (and however often one steps before the other), the
    orbit step is taken once, after both stepped: the same model as Muon then AdamW."""
    runs = []
    for steps in ((0, 1), order):
        model, s = gpt()
        opts = muon_adamw(model)
        gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=1, balance_at_start=False)
        for i in range(4):
            gradients(model, opts, i)
            for k in steps:
                opts[k].step()
        assert (gf.steps, gf.skipped) == (4, 0)
        runs.append(model)
    if order in ((0, 1), (1, 0)):  # the same optimizer steps: the same model, bit for bit
        for p, q in zip(*(m.parameters() for m in runs), strict=True):
            assert torch.equal(p, q)


def test_a_step_of_one_optimizer_alone_takes_no_orbit_step():
    model, s = gpt()
    plain = copy.deepcopy(model)
    opts, plain_opts = muon_adamw(model), muon_adamw(plain)
    gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=1, balance_at_start=False)
    for m, os in ((model, opts), (plain, plain_opts)):
        gradients(m, os, 0)
        os[0].step()
        os[0].step()
    assert (gf.steps, gf.state_dict()["since"]) == (0, 0)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    opts[1].step()
    assert gf.steps == 1


def test_state_dict_counts_every_optimizers_groups_and_resumes():
    """The interval's learning-rate sums, one per group of each optimizer in order; a hook
    resumed from it continues bit for bit; sums for more groups are refused."""
    runs = []
    for resume in (False, True):
        model, s = gpt()
        opts = muon_adamw(model)
        gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=EVERY, balance_at_start=False)
        train(model, opts, range(EVERY + 1))
        state = gf.state_dict()
        assert state["since"] == 1 and state["lr_sums"] == [MUON_LR, ADAMW_LR]
        if resume:
            gf.remove()
            gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=EVERY, balance_at_start=False)
            with pytest.raises(ValueError, match="with 2 parameter groups"):
                gf.load_state_dict({**state, "lr_sums": [1.0, 1.0, 1.0]})
            gf.load_state_dict(state)
        train(model, opts, range(EVERY + 1, 2 * EVERY + 2))
        assert (gf.steps, gf.skipped) == (2, 0)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs), strict=True):
        assert torch.equal(p, q)


def hooks(opt: O.Optimizer) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


BAD = {
    "listed twice": (lambda opts, other: [opts[0], opts[0]], ValueError, "more than once"),
    "no model parameter": (lambda opts, other: [opts[0], other], ValueError, "no parameter of"),
    "alone, no model parameter": (lambda opts, other: other, ValueError, "no parameter of"),
    "empty": (lambda opts, other: [], ValueError, "empty"),
    "not an optimizer": (lambda opts, other: [opts[0], "adamw"], TypeError, "Optimizer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_optimizers_are_refused_with_nothing_attached(case):
    model, s = gpt()
    before = copy.deepcopy(model.state_dict())
    opts = muon_adamw(model)
    other = O.AdamW(nn.Linear(2, 2).parameters())
    make, error, match = BAD[case]
    with pytest.raises(error, match=match):
        gaugefix.GaugeFixing(make(opts, other), model, s, STRENGTH)
    assert all(hooks(opt) == 0 for opt in (*opts, other))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    gaugefix.GaugeFixing(opts, model, s, STRENGTH).remove()  # nothing was left attached


def test_an_optimizer_already_hooked_or_penalty_mode_is_refused_with_nothing_attached():
    model, s = gpt()
    opts = muon_adamw(model)
    first = gaugefix.GaugeFixing(opts[1], model, s, STRENGTH, balance_at_start=False)
    with pytest.raises(ValueError, match="already has a GaugeFixing"):
        gaugefix.GaugeFixing(opts, model, s, STRENGTH)
    assert hooks(opts[0]) == 0 and hooks(opts[1]) == 2
    first.remove()
    with pytest.raises(ValueError, match="takes one optimizer"):
        gaugefix.GaugeFixing(opts, model, s, STRENGTH, mode="penalty")
    assert hooks(opts[0]) == hooks(opts[1]) == 0
    both = gaugefix.GaugeFixing(opts, model, s, STRENGTH, balance_at_start=False)
    assert hooks(opts[0]) == hooks(opts[1]) == 2
    both.remove()
    assert hooks(opts[0]) == hooks(opts[1]) == 0


@pytest.mark.parametrize("fused", [False, True])
def test_a_grad_scaler_changes_nothing(fused):
    """Four training steps under a scaler of ``2**12`` (AdamW fused, which unscales itself, or
    not) equal the same run without a scaler bit for bit, orbit steps at the same steps; a step
    the scaler skips for Muon alone (an inf in its gradients) leaves the training step waiting
    for Muon's next step."""
    runs = []
    for scaled in (False, True):
        model, s = gpt()
        opts = muon_adamw(model)
        opts[1] = O.AdamW(opts[1].param_groups[0]["params"], lr=ADAMW_LR, fused=fused)
        gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=2, balance_at_start=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        for i in range(4):
            for opt in opts:
                opt.zero_grad()
            scaler.scale(model(batch(i)).square().mean()).backward()
            for opt in opts:
                scaler.step(opt)
            scaler.update()
        runs.append((torch.cat([p.detach().flatten() for p in model.parameters()]), gf.steps))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 2
    opts[0].param_groups[0]["params"][0].grad.fill_(float("inf"))
    scaler.step(opts[0])  # skipped: Muon's gradients are not finite
    scaler.step(opts[1])
    scaler.update()
    assert (gf.steps, gf.state_dict()["since"]) == (2, 0)


def test_frozen_parameters_of_either_optimizer_are_left_out():
    """A norm gain AdamW holds with ``requires_grad=False`` and a Muon group at ``lr = 0``: the
    generators touching them are left out, per reason, and those parameters stay bit-identical
    through the orbit steps."""
    model, s = gpt()
    opts = muon_adamw(model)
    gain, proj = model.blocks[0].ln1.weight, model.blocks[0].attn.proj.weight
    gain.requires_grad_(False)
    group = opts[0].param_groups[0]
    group["params"] = [p for p in group["params"] if p is not proj]
    opts[0].add_param_group({"params": [proj], "lr": 0.0})
    names = {p: n for n, p in model.named_parameters()}
    still = s.touching({names[proj]}) & ~s.touching({names[gain]})
    before = gain.clone(), proj.clone()
    gf = gaugefix.GaugeFixing(opts, model, s, STRENGTH, every=1, balance_at_start=False)
    assert gf.left_out == {
        FROZEN_REASON: int(s.touching({names[gain]}).sum()),
        "touching a parameter whose optimizer group has lr=0": int(still.sum()),
    }
    train(model, opts, range(3))
    assert gf.steps == 3 and 0 < gf.active.num_generators < s.num_generators
    assert torch.equal(gain, before[0]) and torch.equal(proj, before[1])
