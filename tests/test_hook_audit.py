"""Audit of GaugeFixing in real training loops: loss scaling with fused optimizers, every
``torch.optim`` optimizer's state, L-BFGS, sparse gradients, and the Lightning callback with
several optimizers."""

from __future__ import annotations

import copy
import functools
import logging
import warnings

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing
from test_soft_hook import bias_free_setup, bit_equal, setup, train_step

FUSED = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, fused=True),
}


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def hooked(optimizer) -> bool:
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)


# -- torch.amp.GradScaler ---------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", list(FUSED))
def test_penalty_under_a_grad_scaler_stepping_a_fused_optimizer(opt_name):
    """GradScaler hands a fused optimizer its gradients still scaled (``optimizer.grad_scale``),
    and the optimizer divides them by the scale: the penalty's gradient must be added scaled
    too. Training under a scaler of 2^10 (exact in float64) equals training without one; the
    penalty used to be divided by the scale (7% and 59% of the parameters' norm off after 3
    steps)."""
    runs = []
    for scaled in (False, True):
        model, x, y, structure = setup()
        opt = FUSED[opt_name](model.parameters())
        GaugeFixing(opt, model, structure, 0.3, mode="penalty", balance_at_start=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale((model(x) - y).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
        runs.append(flat(model))
    assert float((runs[1] - runs[0]).norm()) <= 1e-12 * float(runs[0].norm())


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_a_step_a_fused_optimizer_skips_under_a_grad_scaler_moves_nothing(mode):
    """A fused optimizer's step is called even when the scaler found inf gradients (it skips
    inside): the hook, acting at that step, adds and moves nothing (parameters and state bit
    for bit as before) and counts it as skipped."""
    model, x, y, structure = setup(dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    hook = GaugeFixing(opt, model, structure, 1.0, mode=mode, balance_at_start=False, every=1)
    scaler = torch.amp.GradScaler("cpu")
    for overflow in (False, True):
        opt.zero_grad()
        loss = (model(x) - y).square().mean() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        before = copy.deepcopy(([p.detach() for p in model.parameters()], opt.state_dict()))
        scaler.step(opt)
        scaler.update()
    assert bit_equal(before, ([p.detach() for p in model.parameters()], opt.state_dict()))
    assert (hook.steps, hook.skipped) == (1, 1)


POWERS = {"momentum_buffer": -1, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}


def gauge_apart(model, plain, x, opt, ref) -> list[float]:
    """Check that ``model`` is ``plain`` moved by a gauge (every entry by ``f``, the output on
    ``x`` unchanged) and ``opt``'s state ``ref``'s moved with it (by ``f ** POWERS[key]``);
    returns each parameter's ``max |f - 1|``."""
    out, expected = model(x).detach(), plain(x).detach()
    assert float((out - expected).norm()) <= 1e-10 * float(expected.norm())
    moved = []
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        f = p.detach() / q.detach()
        moved.append(float((f - 1).abs().max()))
        for key, value in opt.state[p].items():
            want = ref.state[q][key] * f ** POWERS.get(key, 0)
            assert float((value - want).norm()) <= 1e-12 * float(want.norm()), key
    return moved


# -- optimizer state: transported exactly, or refused in one line --------------------------------
TRANSPORTED = {
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "adam_tensor_lr": lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01), foreach=False),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
}


@pytest.mark.parametrize("opt_name", list(TRANSPORTED))
def test_state_of_every_supported_optimizer_is_transported(opt_name):
    """After an orbit step the model differs from the same step without the hook by a gauge
    transformation (every entry by ``f``, the function unchanged), and so does every buffer:
    gradient-like ones by ``1 / f``, squared ones (AMSGrad's maximum too) by ``1 / f^2``;
    counts and NAdam's ``mu_product`` stay as they are."""
    model, x, y, structure = setup()
    plain = copy.deepcopy(model)
    opt = TRANSPORTED[opt_name](list(model.parameters()))
    ref = TRANSPORTED[opt_name](list(plain.parameters()))
    hook = GaugeFixing(opt, model, structure, 2.0, balance_at_start=False, every=2)
    for _ in range(2):
        train_step(model, opt, x, y)
        train_step(plain, ref, x, y)
    assert hook.steps == 1
    gauge_apart(model, plain, x, opt, ref)


def test_muon_momentum_is_transported():
    """Muon (2-D parameters only: a bias-free network) keeps a gradient-like momentum buffer,
    transported by ``1 / f``; the orbit step keeps the function."""
    model, x, y, structure = bias_free_setup()
    plain = copy.deepcopy(model)
    opt, ref = (
        torch.optim.Muon(model.parameters(), lr=0.01),
        torch.optim.Muon(plain.parameters(), lr=0.01),
    )
    hook = GaugeFixing(opt, model, structure, 2.0, balance_at_start=False, every=1)
    train_step(model, opt, x, y)
    train_step(plain, ref, x, y)
    assert hook.steps == 1
    assert min(gauge_apart(model, plain, x, opt, ref)) > 1e-4  # every weight moved


UNSUPPORTED = {
    "adagrad_initial": lambda p: torch.optim.Adagrad(p, lr=0.01, initial_accumulator_value=0.1),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=0.5),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),
}


@pytest.mark.parametrize("opt_name", list(UNSUPPORTED))
def test_state_gaugefix_cannot_transport_is_refused_in_one_line(opt_name):
    """Optimizers whose state is neither gradient-like nor squared (Adagrad's sum from an
    initial value, Adamax's infinity norm, RMSprop's momentum, Rprop's step sizes, ASGD's
    average, Adadelta's squared updates, Adafactor's factored moments): one-line
    ``ValueError`` at construction in exact mode, before the optimizer's first step, nothing
    changed and no hook attached. Penalty mode moves no state and takes a fresh one; the
    refusal is no stricter than the transport:
    after a step of its own, its state is refused too."""
    model, x, y, structure = setup()
    opt = UNSUPPORTED[opt_name](model.parameters())
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    with pytest.raises(ValueError, match="cannot transport optimizer state") as err:
        GaugeFixing(opt, model, structure, 1.0, balance_at_start=False, every=1)
    assert "\n" not in str(err.value) and not hooked(opt)
    assert bit_equal(before, (model.state_dict(), opt.state_dict()))
    if not opt.state:
        GaugeFixing(opt, model, structure, 1.0, mode="penalty", balance_at_start=False).remove()
    train_step(model, opt, x, y)
    with pytest.raises(ValueError, match="cannot transport optimizer state"):
        gaugefix.action.check_transport(opt, structure.bind(model))


# -- L-BFGS --------------------------------------------------------------------------------------
def lbfgs_closure(model, opt, x, y):
    opt.zero_grad()
    loss = (model(x) - y).square().mean()
    loss.backward()
    return loss


def test_lbfgs_history_is_refused_wherever_it_is_kept():
    """L-BFGS keeps its flat direction and history on its first parameter, here the output
    bias, which no generator touches: it used to escape the check, and orbit steps left the
    history stale. Now a stepped L-BFGS is refused at construction by the state it holds
    (nothing changed, no hook), and a fresh one by its class in exact mode."""
    model, x, y, structure = setup()
    opt = torch.optim.LBFGS(list(model.parameters())[::-1], lr=0.1)
    with pytest.raises(ValueError, match="cannot transport optimizer state .* of LBFGS"):
        GaugeFixing(opt, model, structure, 2.0, balance_at_start=False, every=1)
    assert not hooked(opt)
    stepped = torch.optim.LBFGS(list(model.parameters())[::-1], lr=0.1)
    stepped.step(functools.partial(lbfgs_closure, model, stepped, x, y))
    before = copy.deepcopy((model.state_dict(), stepped.state_dict()))
    with pytest.raises(ValueError, match="cannot transport optimizer state .* of LBFGS"):
        GaugeFixing(stepped, model, structure, 2.0, every=1)
    assert bit_equal(before, (model.state_dict(), stepped.state_dict())) and not hooked(stepped)


def test_penalty_mode_refuses_lbfgs_with_a_line_search():
    """A line search compares the closure's losses, which lack the penalty, with directional
    derivatives of gradients that include it: refused in one line, nothing attached. Without
    a line search L-BFGS steps with the penalty's gradient added at each evaluation."""
    model, x, y, structure = setup()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, line_search_fn="strong_wolfe")
    with pytest.raises(ValueError, match="does not support L-BFGS with a line search") as err:
        GaugeFixing(opt, model, structure, 1.0, mode="penalty")
    assert "\n" not in str(err.value) and not hooked(opt)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    hook = GaugeFixing(opt, model, structure, 1.0, mode="penalty")
    opt.step(functools.partial(lbfgs_closure, model, opt, x, y))
    assert hook.steps == 1 and hook.skipped == 0


@pytest.mark.parametrize("move", ["relax_", "apply_gauge_", "balance_"])
def test_lbfgs_history_on_an_ungauged_parameter_is_refused_by_every_move(move):
    """L-BFGS's history, kept on a parameter no generator touches, used to be left stale by
    relax_, apply_gauge_ and balance_: refused, nothing changed."""
    model, x, y, structure = setup()
    opt = torch.optim.LBFGS(list(model.parameters())[::-1], lr=0.1)
    opt.step(functools.partial(lbfgs_closure, model, opt, x, y))
    before = copy.deepcopy(model.state_dict())
    args = {
        "relax_": (1.0,),
        "apply_gauge_": (torch.ones(structure.num_generators, dtype=torch.float64),),
        "balance_": (),
    }[move]
    with pytest.raises(ValueError, match="cannot transport optimizer state"):
        getattr(gaugefix, move)(model, structure, *args, optimizer=opt)
    assert bit_equal(before, model.state_dict())


# -- sparse gradients ----------------------------------------------------------------------------
class SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).relu())


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_sparse_gradients_are_refused_in_one_line(mode):
    """An embedding with ``sparse=True`` whose columns the structure rescales gets sparse
    gradients, which the hook can neither check nor move: refused at construction in one line
    (it used to fail at the first step with a multi-line NotImplementedError from
    ``linalg_vector_norm``)."""
    torch.manual_seed(0)
    model = SparseEmbedding().double()
    ids = torch.randint(0, 10, (16,))
    structure = gaugefix.discover(model, ids)
    assert "embed.weight" in structure.params
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'embed.weight' gets sparse gradients") as err:
        GaugeFixing(opt, model, structure, 1.0, mode=mode)
    assert "\n" not in str(err.value) and not hooked(opt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- Lightning -------------------------------------------------------------------------------------
def test_lightning_refused_second_optimizer_leaves_the_model_as_it_was(tmp_path):
    """Two optimizers (manual optimization), the second an Adagrad (with an initial
    accumulator value) whose state cannot be transported: the fit raises its one-line error,
    with no hook attached and the model as it was; the first hook used to balance its half of
    the model (entries moved by 0.85) before the second was refused."""
    pl = pytest.importorskip("lightning.pytorch")
    from gaugefix.integrations.lightning import GaugeFixingCallback

    class Two(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = gaugefix.zoo.mlp((4, 8, 1)), gaugefix.zoo.mlp((4, 8, 1))
            self.automatic_optimization = False

        def forward(self, x):
            return self.a(x) + self.b(x)

        def training_step(self, batch, idx):
            x, y = batch
            first, second = self.optimizers()
            self.manual_backward(nn.functional.mse_loss(self(x), y))
            first.step()
            second.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.a.parameters(), lr=0.05),
                torch.optim.Adagrad(self.b.parameters(), lr=0.05, initial_accumulator_value=0.1),
            ]

    torch.manual_seed(0)
    module = Two()
    x = torch.randn(32, 4)
    structure = gaugefix.discover(module, x[:2])
    gaugefix.random_gauge_(module, structure, 1.0, torch.Generator().manual_seed(3))
    before = copy.deepcopy(module.state_dict())
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[GaugeFixingCallback(1.0, structure=structure)],
    )  # fmt: skip
    data = torch.utils.data.TensorDataset(x, torch.randn(32, 1))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="'sum' of Adagrad"):
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert not any(hooked(opt) for opt in trainer.optimizers)
