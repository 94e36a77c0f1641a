"""Second audit of GaugeFixing in real training loops: loss scaling, parameter groups with
schedulers and groups added later, freezing between steps, tensor learning rates, resuming
from a checkpoint, the transported state's next step, wrappers, and Lightning's gradient
accumulation with clipping."""

from __future__ import annotations

import copy
import io
import itertools
import logging
import warnings

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing
from test_hook_audit import POWERS, gauge_apart
from test_soft_hook import setup

SCALE = 2.0**12  # a loss scale that is a power of 2: scaling and unscaling are exact
TOL = 1e-12


@pytest.fixture(autouse=True)
def quiet_hook():
    """The hook's warnings (frozen generators left out) silenced here, restored after."""
    hook_logger = logging.getLogger("gaugefix.train.hook")
    level = hook_logger.level
    hook_logger.setLevel(logging.ERROR)
    yield
    hook_logger.setLevel(level)


def train_step(model, opt, x, y, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    (model(x) - y).square().mean().backward()
    opt.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def two_groups(model, lrs=(0.02, 0.05), decays=(0.1, 0.0)):
    """The first three parameters (first layer, second weight) and the rest, with their own
    learning rates and weight decays."""
    ps = list(model.parameters())
    return [
        {"params": ps[:3], "lr": lrs[0], "weight_decay": decays[0]},
        {"params": ps[3:], "lr": lrs[1], "weight_decay": decays[1]},
    ]


# -- torch.amp.GradScaler ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "fused,mode,clip", list(itertools.product((False, True), ("exact", "penalty"), (False, True)))
)
def test_a_grad_scaler_changes_nothing(fused, mode, clip):
    """Five Adam steps under a scaler of 2^12, with or without ``unscale_`` and clipping before
    the step, fused (the optimizer unscales) or not (the scaler does), equal the same run without
    a scaler bit for bit: the penalty is added in the units of ``.grad`` and the orbit steps
    come at the same steps."""
    runs = []
    for scaled in (False, True):
        model, x, y, structure = setup()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
        every = 2 if mode == "exact" else None
        hook = GaugeFixing(opt, model, structure, 0.5, mode=mode, every=every)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, enabled=scaled)
        for _ in range(5):
            opt.zero_grad()
            scaler.scale((model(x) - y).square().mean()).backward()
            if clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
        runs.append((flat(model), hook.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][1]["steps"] == (2 if mode == "exact" else 5)


# -- parameter groups: rates, groups added later, transport -------------------------------------
def test_a_group_added_mid_interval_relaxes_at_the_minimum_of_the_group_sums():
    """SGD holds the first two layers; after one step the last layer is added with its own lr;
    the orbit step after step 3 equals ``relax_`` with the rates by hand: the first layer's
    neurons at ``strength * 3 * lr0``, the second's (touching both groups) at ``strength * min(3
    lr0, 2 lr1)``, the new group summed from when it was added. Bit for bit."""
    model, x, y, structure = setup()
    ref = copy.deepcopy(model)
    ps, qs = list(model.parameters()), list(ref.parameters())
    opt = torch.optim.SGD(ps[:4], lr=0.03, momentum=0.9)
    ref_opt = torch.optim.SGD(qs[:4], lr=0.03, momentum=0.9)
    hook = GaugeFixing(opt, model, structure, 2.0, balance_at_start=False, every=3)
    assert hook.active.num_generators == 12
    train_step(model, opt, x, y)
    train_step(ref, ref_opt, x, y)
    opt.add_param_group({"params": ps[4:], "lr": 0.01})
    ref_opt.add_param_group({"params": qs[4:], "lr": 0.01})
    for _ in range(2):
        train_step(model, opt, x, y)
        train_step(ref, ref_opt, x, y)
    first, second = 2.0 * (0.03 + 0.03 + 0.03), 2.0 * (0.01 + 0.01)
    rates = torch.tensor([first] * 12 + [min(first, second)] * 12, dtype=torch.float64)
    gaugefix.relax_(ref, structure, rates, optimizer=ref_opt)
    assert hook.steps == 1 and hook.left_out == {}
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


FLAGGED = {
    "sgd_fused": lambda g: torch.optim.SGD(g, momentum=0.9, fused=True),
    "sgd_foreach_nesterov": lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=True, foreach=True),
    "adam_amsgrad_fused": lambda g: torch.optim.Adam(g, amsgrad=True, fused=True),
    "adam_amsgrad_foreach": lambda g: torch.optim.Adam(g, amsgrad=True, foreach=True),
    "adamw_fused": lambda g: torch.optim.AdamW(g, fused=True),
    "adamw_maximize": lambda g: torch.optim.AdamW(g, maximize=True, foreach=False),
    "nadam_decoupled": lambda g: torch.optim.NAdam(g, decoupled_weight_decay=True),
    "radam_decoupled": lambda g: torch.optim.RAdam(g, decoupled_weight_decay=True, foreach=True),
}


def gauged_copy(model, plain, ref):
    """``plain`` and ``ref``'s state moved by the per-entry factors ``f = model / plain`` by
    hand (parameters by ``f``, each buffer by ``f ** POWERS[key]``), on copies. (Copied whole:
    ``load_state_dict`` would cast NAdam's float32 ``mu_product`` to float64.)"""
    other, other_opt = copy.deepcopy((plain, ref))
    with torch.no_grad():
        for p, q, o in zip(model.parameters(), plain.parameters(), other.parameters(), strict=True):
            f = p / q
            o.mul_(f)
            for key, value in other_opt.state[o].items():
                if key in POWERS:  # (counts stay)
                    value.mul_(f ** POWERS[key])
    return other, other_opt


@pytest.mark.parametrize("opt_name", list(FLAGGED))
def test_orbit_step_with_two_groups_is_a_gauge_and_the_next_step_is_equivariant(opt_name):
    """Two groups with their own lr and weight decay, an orbit step after step 2 at per-neuron
    rates: the model and every buffer are the plain run's moved by one gauge (function to 1e-10,
    state to 1e-12); the next optimizer step then equals the step taken from the plain run's
    model and state moved by that gauge by hand (1e-12)."""
    model, x, y, structure = setup()
    plain = copy.deepcopy(model)
    opt, ref = FLAGGED[opt_name](two_groups(model)), FLAGGED[opt_name](two_groups(plain))
    hook = GaugeFixing(opt, model, structure, 3.0, balance_at_start=False, every=2)
    assert isinstance(hook.rate(), torch.Tensor)  # one rate per neuron
    for _ in range(2):
        train_step(model, opt, x, y)
        train_step(plain, ref, x, y)
    assert hook.steps == 1
    assert max(gauge_apart(model, plain, x, opt, ref)) > 0.1  # the orbit step moved the model
    other, other_opt = gauged_copy(model, plain, ref)
    train_step(model, opt, x, y)  # no orbit step at step 3
    train_step(other, other_opt, x, y)
    assert hook.steps == 1
    for p, o in zip(model.parameters(), other.parameters(), strict=True):
        assert float((p - o).detach().norm()) <= TOL * float(p.detach().norm())
        for key, value in opt.state[p].items():
            want = other_opt.state[o][key]
            assert float((value - want).norm()) <= TOL * max(float(want.norm()), 1.0), key


# -- freezing between steps, and balance() -----------------------------------------------------
def freeze_by_grad(model, opt):
    model[0].weight.requires_grad_(False)


def freeze_by_lr(model, opt):
    opt.param_groups[0]["lr"] = 0.0


@pytest.mark.parametrize("freeze", [freeze_by_grad, freeze_by_lr])
def test_balance_after_freezing_leaves_the_frozen_parameters_alone(freeze):
    """A layer frozen after construction (``requires_grad_(False)``, or its group's lr set to
    0), then ``hook.balance()``: the frozen weight stays bit for bit. (``balance()`` used the
    generators of the last step and moved the frozen weight by 0.85.)"""
    model, x, y, structure = setup()
    first = model[0].weight
    opt = torch.optim.SGD(
        [{"params": [first], "lr": 0.05}, {"params": list(model.parameters())[1:], "lr": 0.05}],
        momentum=0.9,
    )
    hook = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False)
    train_step(model, opt, x, y)
    freeze(model, opt)
    before = first.detach().clone()
    hook.balance()
    assert torch.equal(first, before)
    assert sum(hook.left_out.values()) == 12


def test_balance_after_adding_a_group_balances_its_generators():
    """Parameters added with ``add_param_group`` after construction: ``balance()`` then balances
    the generators that act on them (it used to leave them out)."""
    model, x, y, structure = setup()
    ps = list(model.parameters())
    opt = torch.optim.SGD(ps[:2], lr=0.05)
    hook = GaugeFixing(opt, model, structure, 1.0, balance_at_start=False)
    opt.add_param_group({"params": ps[2:]})
    hook.balance()
    assert hook.stats()["mu_rel_max"] <= 1e-9


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_parameters_frozen_in_the_optimizer_are_never_moved(mode):
    """A weight the optimizer holds with ``requires_grad=False`` and a group at ``lr=0`` (no
    scheduler), gradients zeroed with ``set_to_none=False``: balancing at the start and four
    gauge-fixed steps leave both bit for bit; thawed, their generators are acted on again."""
    model, x, y, structure = setup((6, 12, 12, 12, 2))
    lin = [m for m in model if isinstance(m, nn.Linear)]
    lin[0].weight.requires_grad_(False)
    rest = [p for p in model.parameters() if p is not lin[0].weight and p is not lin[3].weight]
    opt = torch.optim.Adam(
        [{"params": [lin[0].weight, *rest]}, {"params": [lin[3].weight], "lr": 0.0}], lr=0.05
    )
    frozen = [lin[0].weight.detach().clone(), lin[3].weight.detach().clone()]
    hook = GaugeFixing(opt, model, structure, 2.0, mode=mode, every=1)
    for _ in range(4):
        train_step(model, opt, x, y, set_to_none=False)
    assert torch.equal(lin[0].weight, frozen[0]) and torch.equal(lin[3].weight, frozen[1])
    assert hook.steps == 4 and sum(hook.left_out.values()) == 24
    lin[0].weight.requires_grad_(True)
    opt.param_groups[1]["lr"] = 0.05
    train_step(model, opt, x, y)
    assert hook.left_out == {} and hook.active.num_generators == structure.num_generators


# -- tensor learning rates (capturable or compiled optimizers) ----------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_a_negative_tensor_learning_rate_does_not_unbalance(groups):
    """A tensor lr is never read on the host, so a negative one (a schedule past its end) is
    not refused; the orbit step must then not move the generators it sets the rate of (it took
    ``h = +|rate| mu`` and raised ``||mu||`` from 39 to 3.4e5). The step after: zero gradients,
    so the optimizer moves nothing and the model stays bit for bit."""
    model, x, y, structure = setup()
    if groups == 1:
        opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05), foreach=False)
    else:
        both = two_groups(model, lrs=(torch.tensor(0.05), torch.tensor(0.02)), decays=(0.0, 0.0))
        opt = torch.optim.SGD(both, foreach=False)
    hook = GaugeFixing(opt, model, structure, 2.0, balance_at_start=False, every=1)
    train_step(model, opt, x, y)
    for group in opt.param_groups:
        group["lr"].fill_(-0.3)
    for p in model.parameters():
        p.grad.zero_()
    before = flat(model)
    opt.step()
    assert torch.equal(flat(model), before)
    assert hook.steps == 2 and hook.skipped == 0


# -- checkpoints ---------------------------------------------------------------------------------
def adamw_with_schedule(model, tensor_lr):
    groups = two_groups(model)
    if tensor_lr:
        for group in groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    opt = torch.optim.AdamW(groups, amsgrad=True, foreach=False)
    if tensor_lr:  # a scheduler would replace a tensor lr by a float: one in place instead
        return opt, None
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.3 * k))


def scheduled_step(model, opt, sched, x, y, k):
    train_step(model, opt, x, y, set_to_none=k % 2 == 0)
    if sched is None:
        for group in opt.param_groups:
            group["lr"].mul_(0.9)
    else:
        sched.step()


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_run_resumed_mid_interval_continues_bit_for_bit(tensor_lr):
    """Ten AdamW (AMSGrad) steps with two groups of their own lr and weight decay under a
    decaying schedule, orbit steps every 3; a checkpoint after step 5 (two steps into an
    interval) written with ``torch.save``, and a new model, optimizer, scheduler and hook
    (``balance_at_start=False``) loaded from it: the resumed run's parameters and hook state
    equal the uninterrupted run's bit for bit."""
    model, x, y, structure = setup()
    opt, sched = adamw_with_schedule(model, tensor_lr)
    hook = GaugeFixing(opt, model, structure, 2.0, every=3)
    buffer = io.BytesIO()
    for k in range(10):
        scheduled_step(model, opt, sched, x, y, k)
        if k == 4:
            states = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "hook": hook.state_dict(),
            }
            if sched is not None:
                states["sched"] = sched.state_dict()
            torch.save(states, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert (saved["hook"]["steps"], saved["hook"]["since"]) == (1, 2)
    resumed, _, _, _ = setup()
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = adamw_with_schedule(resumed, tensor_lr)
    opt2.load_state_dict(saved["opt"])
    if sched2 is not None:
        sched2.load_state_dict(saved["sched"])
    hook2 = GaugeFixing(opt2, resumed, structure, 2.0, every=3, balance_at_start=False)
    hook2.load_state_dict(saved["hook"])
    for k in range(5, 10):
        scheduled_step(resumed, opt2, sched2, x, y, k)
    assert torch.equal(flat(resumed), flat(model))
    assert hook2.state_dict() == hook.state_dict() and hook.steps == 3


# -- wrappers ------------------------------------------------------------------------------------
def test_a_data_parallel_model_is_fixed_as_the_bare_one():
    """``nn.DataParallel`` (here without GPUs: it calls its module) is looked through like
    ``DistributedDataParallel``: three steps equal the bare model's bit for bit."""
    runs = []
    for wrap in (False, True):
        model, x, y, structure = setup()
        outer = nn.DataParallel(model) if wrap else model
        opt = torch.optim.SGD(outer.parameters(), lr=0.05, momentum=0.9)
        GaugeFixing(opt, outer, structure, 2.0, every=1)
        for _ in range(3):
            train_step(outer, opt, x, y)
        runs.append(flat(model))
    assert torch.equal(*runs)


# -- Lightning: gradient accumulation and clipping ---------------------------------------------
@pytest.mark.parametrize("mode,every,steps", [("penalty", None, 4), ("exact", 3, 1)])
def test_lightning_accumulation_and_clipping_equal_the_plain_loop(mode, every, steps):
    """Lightning with ``accumulate_grad_batches=2`` and ``gradient_clip_val`` (float64, 4
    optimizer steps over 8 batches): the penalty is added once per optimizer step, after
    clipping, and orbit steps come every ``every`` optimizer steps, not micro-batches; the
    parameters equal a plain loop doing the same (to 1e-12)."""
    pl = pytest.importorskip("lightning.pytorch")
    from gaugefix.integrations.lightning import GaugeFixingCallback

    torch.manual_seed(0)
    xs, ys = torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=8)
    model, _, _, _ = setup()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(model)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            x, y = batch
            return (self(x) - y).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    module = Module()
    structure = gaugefix.discover(module, xs)
    callback = GaugeFixingCallback(1.0, structure=structure, mode=mode, every=every)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
        accumulate_grad_batches=2, gradient_clip_val=0.05, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    hook = GaugeFixing(opt, plain, gaugefix.discover(plain, xs), 1.0, mode=mode, every=every)
    batches = list(data)
    for i in range(0, 8, 2):
        opt.zero_grad()
        for x, y in batches[i : i + 2]:
            ((plain(x) - y).square().mean() / 2).backward()
        nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt.step()
    assert hook.steps == steps and callback._last[0]["steps"] == steps
    assert float((flat(module.net) - flat(plain)).norm()) <= TOL * float(flat(plain).norm())
