"""Second audit of the Hugging Face ``Trainer`` and Lightning callbacks, each run against the
same training written by hand with :class:`gaugefix.GaugeFixing` in a plain loop (float64 where
possible): gradient accumulation, clipping, schedules, mixed precision, frozen and adapter-only
parameters, several optimizers, resuming, ``torch_compile`` and structures of other models."""

from __future__ import annotations

import copy
import functools
import logging
import warnings

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, zoo
from gaugefix.soft import orbit_selection_grad

pytestmark = pytest.mark.usefixtures("single_thread")

LR = 0.05
STEPS = 4
DT = torch.float64


def same(a: nn.Module, b: nn.Module) -> float:
    """The largest entry difference between two models' parameters."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


def hooked(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)


# -- Hugging Face Trainer -------------------------------------------------------------------------
@pytest.fixture
def hf():
    """transformers, quiet (skips without transformers or accelerate)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield transformers
    transformers.logging.set_verbosity(verbosity)


def gpt2(transformers, dtype=DT, n_embd=16):
    """A tiny ReLU GPT-2 off balance, and its structure."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=n_embd, n_head=2, n_positions=8, vocab_size=24,
        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    structure = gaugefix.discover(model, torch.zeros(1, 4, dtype=torch.long))
    gaugefix.random_gauge_(model, structure, 1.0, torch.Generator().manual_seed(5))
    return model, structure


class Tokens(torch.utils.data.Dataset):
    """32 sequences of 8 random token ids, each its own label."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 24, (32, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_train(transformers, model, structure, out, gauge, **options):
    """Train with the callback: ``(trainer, callback, calls)``, ``calls`` the keyword arguments
    of every forward the trainer made (its micro-batches, ``num_items_in_batch`` included)."""
    from gaugefix.integrations.transformers import GaugeFixingCallback

    calls = []

    def note(module, args, kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    record = model.register_forward_pre_hook(note, with_kwargs=True)
    args = {
        "output_dir": str(out), "use_cpu": True, "report_to": [], "disable_tqdm": True,
        "per_device_train_batch_size": 4, "max_steps": STEPS, "learning_rate": LR, "seed": 0,
        "save_strategy": "no", "logging_strategy": "no", "optim": "sgd",
        "optim_args": "momentum=0.9",
    }  # fmt: skip
    trainer = transformers.Trainer(
        model, transformers.TrainingArguments(**{**args, **options}), train_dataset=Tokens()
    )
    callback = GaugeFixingCallback(trainer, structure=structure, **gauge)
    trainer.add_callback(callback)
    try:
        trainer.train()
    finally:
        record.remove()
    return trainer, callback, calls


def hand_loop(transformers, model, structure, calls, gauge, *, accumulate=1, clip=1.0,
              warmup=0, autocast=None, penalty_clipped=False):  # fmt: skip
    """The trainer's loop by hand: the recorded micro-batches, clipping, SGD with momentum, its
    linear schedule, with ``GaugeFixing``. ``penalty_clipped``: the penalty's gradient added
    before clipping instead (what the callbacks document they do not do)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    strength = gauge["strength"]
    hook_strength = 0.0 if penalty_clipped else strength  # then it only balances at the start
    hook = GaugeFixing(opt, model, structure, **{**gauge, "strength": hook_strength})
    schedule = transformers.get_scheduler("linear", opt, warmup, STEPS)
    for step in range(STEPS):
        for kwargs in calls[step * accumulate : (step + 1) * accumulate]:
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
                loss = model(**kwargs).loss
            loss.backward()
        if penalty_clipped:
            params = dict(model.named_parameters())
            for name, grad in orbit_selection_grad(model, structure, strength).items():
                params[name].grad += grad
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        schedule.step()
        opt.zero_grad()
    hook.remove()
    return hook


def gauges(strength: float) -> dict[str, dict]:
    """The gauge-fixing settings every comparison runs: penalty, and exact every 1 and 3 steps."""
    return {
        "penalty": {"strength": strength, "mode": "penalty"},
        "exact-1": {"strength": strength, "mode": "exact", "every": 1},
        "exact-3": {"strength": strength, "mode": "exact", "every": 3},
    }


GAUGES = gauges(50.0)


@pytest.mark.parametrize("name", GAUGES)
def test_hf_accumulation_clipping_and_schedule_equal_the_hand_loop(hf, tmp_path, name):
    """2 accumulated micro-batches per step, clipping at 0.1 and a warmup-then-linear schedule
    (lr 0 at the first step), from a model off balance: the callback acts once per optimizer
    step, after clipping, at the lr of the step just taken; the trained model equals the hand
    loop to 1e-12. The penalty added before clipping instead (clipped with the loss's gradient)
    differs."""
    gauge = {**GAUGES[name], "balance_at_start": False}
    options = {"max_grad_norm": 0.1, "warmup_steps": 1}
    trained, structure = gpt2(hf)
    _, callback, calls = hf_train(
        hf, trained, structure, tmp_path, gauge, gradient_accumulation_steps=2, **options
    )
    assert len(calls) == 2 * STEPS
    by_hand, structure = gpt2(hf)
    hook = hand_loop(hf, by_hand, structure, calls, gauge, accumulate=2, clip=0.1, warmup=1)
    assert callback.steps == hook.steps == (1 if name == "exact-3" else STEPS)
    assert same(trained, by_hand) <= 1e-12
    if name == "penalty":
        clipped, structure = gpt2(hf)
        hand_loop(hf, clipped, structure, calls, gauge, accumulate=2, clip=0.1, warmup=1,
                  penalty_clipped=True)  # fmt: skip
        assert same(trained, clipped) > 1e-6


def test_hf_bf16_autocast_equals_the_hand_loop(hf, tmp_path):
    """``bf16=True`` on CPU (autocast to bfloat16, float32 parameters, no scaler): the same as
    the hand loop under ``torch.autocast``, bit for bit, in both modes."""
    for name in ("penalty", "exact-1"):
        trained, structure = gpt2(hf, torch.float32)
        _, callback, calls = hf_train(hf, trained, structure, tmp_path, GAUGES[name], bf16=True)
        by_hand, structure = gpt2(hf, torch.float32)
        hook = hand_loop(hf, by_hand, structure, calls, GAUGES[name], autocast=torch.bfloat16)
        assert callback.steps == hook.steps == STEPS
        assert same(trained, by_hand) == 0.0


class LoRA(nn.Module):
    """A frozen ``Conv1D`` plus a trainable rank-2 update ``x A B`` (as PEFT's LoRA)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        n_in, n_out = base.weight.shape
        gen, dtype = torch.Generator().manual_seed(7), base.weight.dtype
        self.lora_A = nn.Parameter(0.3 * torch.randn(n_in, 2, generator=gen, dtype=dtype))
        self.lora_B = nn.Parameter(0.3 * torch.randn(2, n_out, generator=gen, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A) @ self.lora_B


def adapted(transformers):
    """The tiny GPT-2 frozen, with LoRA on its attention and MLP input maps, and its structure."""
    model, _ = gpt2(transformers)
    model.requires_grad_(False)
    block = model.transformer.h[0]
    block.attn.c_attn, block.mlp.c_fc = LoRA(block.attn.c_attn), LoRA(block.mlp.c_fc)
    return model, gaugefix.discover(model, torch.zeros(1, 4, dtype=torch.long))


def test_hf_adapter_only_training_equals_the_hand_loop(hf, tmp_path, caplog):
    """A PEFT-like model (only the LoRA factors train): the trainer's optimizer holds only
    them, so every generator touching a frozen weight is left out and the two rank-2 gauges of
    the adapters (A's columns against B's rows) are fixed; frozen weights stay bit-identical
    and the result equals the hand loop."""
    trained, structure = adapted(hf)
    frozen = {n: p.clone() for n, p in trained.named_parameters() if not p.requires_grad}
    with caplog.at_level(logging.WARNING, "gaugefix.train.hook"):
        _, callback, calls = hf_train(hf, trained, structure, tmp_path, GAUGES["exact-1"])
    assert "acts on 4 of 132 generators" in caplog.text
    by_hand, structure = adapted(hf)
    hook = hand_loop(hf, by_hand, structure, calls, GAUGES["exact-1"])
    assert hook.active.num_generators == 4 and callback.steps == STEPS
    assert same(trained, by_hand) == 0.0
    params = dict(trained.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert gaugefix.imbalance_stats(trained, hook.active)["mu_rel_max"] < 1e-10


def test_hf_torch_compile_with_a_given_structure_equals_the_hand_loop(hf, tmp_path):
    """``torch_compile=True`` (backend ``eager``) with the structure given: checked against
    ``trainer.model`` at the start and trained as the hand loop, bit for bit."""
    trained, structure = gpt2(hf)
    _, callback, calls = hf_train(
        hf, trained, structure, tmp_path, GAUGES["exact-3"],
        torch_compile=True, torch_compile_backend="eager",
    )  # fmt: skip
    by_hand, structure = gpt2(hf)
    hook = hand_loop(hf, by_hand, structure, calls, GAUGES["exact-3"])
    assert callback.steps == hook.steps == 1
    assert same(trained, by_hand) == 0.0


def test_hf_structure_of_another_model_is_refused_in_one_line(hf, tmp_path):
    """A structure discovered on a wider GPT-2 (the same parameter names): one line naming the
    mismatch when training starts, before any step; the model and optimizer untouched."""
    model, _ = gpt2(hf)
    _, wider = gpt2(hf, n_embd=32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="structure does not match.*shape") as refused:
        hf_train(hf, model, wider, tmp_path, GAUGES["exact-1"])
    assert "\n" not in str(refused.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("optim", ["adafactor", "adamw_torch_8bit"])
def test_hf_untransportable_optimizer_is_refused_at_the_start(hf, tmp_path, optim):
    """Exact mode with an optimizer whose state an orbit step cannot move (transformers'
    Adafactor: factored second moments; torchao's 8-bit AdamW: quantized moments). Before:
    training ran ``every`` steps, then the first orbit step raised (a ValueError for Adafactor,
    torchao's NotImplementedError 'aten.alias' for its quantized state on weights of 4096
    entries or more). Now one line when training starts, the model untouched; penalty mode,
    which moves no state, trains."""
    if optim.endswith("8bit"):
        pytest.importorskip("torchao")
    model, structure = gpt2(hf, torch.float32)
    before = copy.deepcopy(model.state_dict())
    options = {"optim": optim, "optim_args": None}
    with pytest.raises(ValueError, match="cannot transport.*mode='penalty'") as refused:
        hf_train(hf, model, structure, tmp_path, GAUGES["exact-3"], **options)
    assert "\n" not in str(refused.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    _, callback, _ = hf_train(hf, model, structure, tmp_path, GAUGES["penalty"], **options)
    assert callback.steps == STEPS


# -- Lightning ------------------------------------------------------------------------------------
@pytest.fixture
def pl():
    """lightning.pytorch, quiet (skips without it)."""
    lightning = pytest.importorskip("lightning.pytorch")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return lightning


def batches(dtype=DT) -> torch.utils.data.DataLoader:
    """4 batches of 8 inputs ``[8, 4]`` and targets ``[8, 2]``, in order."""
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(32, 4, generator=gen, dtype=dtype),
        torch.randn(32, 2, generator=gen, dtype=dtype),
    )
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def mlp(dtype=DT) -> nn.Module:
    """A ReLU MLP 4-8-8-2 off balance."""
    torch.manual_seed(0)
    model = zoo.mlp((4, 8, 8, 2)).to(dtype)
    structure = gaugefix.discover(model, torch.zeros(2, 4, dtype=dtype))
    gaugefix.random_gauge_(model, structure, 1.0, torch.Generator().manual_seed(3))
    return model


SGD = functools.partial(torch.optim.SGD, lr=LR, momentum=0.9)


def harmonic(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """lr / (1 + step): another learning rate at every step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def module_for(pl, model, optimizer=SGD, schedule=None):
    """A LightningModule training ``model`` (as ``net``) on the squared error."""

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.example_input_array = torch.zeros(2, 4, dtype=next(model.parameters()).dtype)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            x, y = batch
            return (self(x) - y).square().mean()

        def configure_optimizers(self):
            opt = optimizer([p for p in self.parameters() if p.requires_grad])
            if schedule is None:
                return opt
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": schedule(opt), "interval": "step"},
            }

    return Module()


def fit(pl, module, callbacks, root, ckpt=None, **options):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=callbacks, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, **options,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "the dataloader does not have many workers"
        trainer.fit(module, batches(next(module.parameters()).dtype), ckpt_path=ckpt)
    return trainer


def plain_loop(model, gauge, steps, optimizer=SGD, schedule=None, precision=None):
    """The same training by hand: ``GaugeFixing`` on the optimizer, the batches in order,
    autocast (and a loss scaler for float16) for ``precision``."""
    opt = optimizer(model.parameters())
    dtype = next(model.parameters()).dtype
    hook = GaugeFixing(
        opt, model, gaugefix.discover(model, torch.zeros(2, 4, dtype=dtype)), **gauge
    )
    lr_schedule = schedule(opt) if schedule else None
    scaler = torch.amp.GradScaler("cpu", enabled=precision == torch.float16)
    data = list(batches(dtype))
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=bool(precision)):
            loss = (model(x) - y).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if lr_schedule:
            lr_schedule.step()
    hook.remove()
    return hook


LIGHTNING_GAUGES = gauges(5.0)


@pytest.mark.parametrize("name", LIGHTNING_GAUGES)
def test_lightning_schedule_equals_the_plain_loop(pl, tmp_path, name):
    """A per-step LambdaLR (a new lr at every step, float64, 7 steps): each orbit step takes
    the lrs of the steps just taken, as the plain loop's hook does; equal bit for bit."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    gauge = LIGHTNING_GAUGES[name]
    module = module_for(pl, mlp(), schedule=harmonic)
    callback = GaugeFixingCallback(**gauge)
    fit(pl, module, [callback], tmp_path, max_steps=7, enable_checkpointing=False)
    plain = mlp()
    hook = plain_loop(plain, gauge, 7, schedule=harmonic)
    assert callback.state_dict()["hooks"] == [hook.state_dict()]
    assert same(module.net, plain) == 0.0


@pytest.mark.parametrize("name", ["penalty", "exact-3"])
def test_lightning_resumed_fit_equals_the_uninterrupted_fit(pl, tmp_path, name):
    """One epoch (4 steps, a checkpoint at its end), then a fit resumed from it to 2 epochs:
    the same parameters, bit for bit, and hook states as the fit of 2 epochs in one go (the
    resumed hook continues the interval of orbit steps every 3, with the schedule's lrs)."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    gauge = LIGHTNING_GAUGES[name]
    first = module_for(pl, mlp(), schedule=harmonic)
    fit(pl, first, [GaugeFixingCallback(**gauge)], tmp_path / "a", max_epochs=1)
    (checkpoint,) = (tmp_path / "a").rglob("*.ckpt")
    runs = []
    for ckpt in (checkpoint, None):
        module, callback = module_for(pl, mlp(), schedule=harmonic), GaugeFixingCallback(**gauge)
        fit(pl, module, [callback], tmp_path / "b", ckpt, max_epochs=2, enable_checkpointing=False)
        runs.append((module.net, callback.state_dict()["hooks"]))
    (resumed, states), (whole, whole_states) = runs
    assert states == whole_states and states[0]["steps"] == (8 if name == "penalty" else 2)
    assert same(resumed, whole) == 0.0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_equals_the_plain_loop(pl, tmp_path, precision):
    """float32 parameters under autocast: ``bf16-mixed``, and ``16-mixed`` with its
    ``GradScaler`` on CPU (the scaler unscales before the step, the hook sees the true
    gradients): both modes equal the plain loop with autocast (and the scaler), bit for bit."""
    from lightning.pytorch.plugins import MixedPrecision

    from gaugefix.integrations.lightning import GaugeFixingCallback

    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    for name in ("penalty", "exact-1"):
        gauge = LIGHTNING_GAUGES[name]
        module, callback = module_for(pl, mlp(torch.float32)), GaugeFixingCallback(**gauge)
        plugin = MixedPrecision(precision, "cpu")
        fit(pl, module, [callback], tmp_path, max_steps=STEPS, plugins=[plugin],
            enable_checkpointing=False)  # fmt: skip
        plain = mlp(torch.float32)
        hook = plain_loop(plain, gauge, STEPS, precision=dtype)
        assert callback.state_dict()["hooks"] == [hook.state_dict()] and hook.steps == STEPS
        assert same(module.net, plain) == 0.0


def two_optimizer_module(pl):
    """Manual optimization of ``a(x) + b(x)``: the first SGD holds ``a`` and ``b``'s first
    layer, an Adam ``b``'s second layer, so ``b``'s neurons span both optimizers."""

    class Two(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = zoo.mlp((4, 8, 2)).to(DT), zoo.mlp((4, 8, 2)).to(DT)
            self.automatic_optimization = False
            self.example_input_array = torch.zeros(2, 4, dtype=DT)

        def forward(self, x):
            return self.a(x) + self.b(x)

        def training_step(self, batch, idx):
            x, y = batch
            first, second = self.optimizers()
            first.zero_grad()
            second.zero_grad()
            self.manual_backward((self(x) - y).square().mean())
            first.step()
            second.step()

        def configure_optimizers(self):
            return [
                SGD([*self.a.parameters(), *self.b[0].parameters()]),
                torch.optim.Adam(self.b[2].parameters(), lr=0.01),
            ]

    module = Two()
    structure = gaugefix.discover(module, module.example_input_array)
    gaugefix.random_gauge_(module, structure, 1.0, torch.Generator().manual_seed(3))
    return module, structure


def two_optimizer_loop(module, hooks, epochs=1):
    """The training of :func:`two_optimizer_module` by hand, for ``epochs`` epochs of the 4
    batches; ``hooks`` are attached to ``module.configure_optimizers()``'s two optimizers."""
    first, second = module.configure_optimizers()
    attached = hooks(first, second)
    for _ in range(epochs):
        for x, y in batches():
            first.zero_grad()
            second.zero_grad()
            (module(x) - y).square().mean().backward()
            first.step()
            second.step()
    return attached


def test_lightning_two_optimizers_penalty_equal_the_plain_loop(pl, tmp_path):
    """Manual optimization with two optimizers in penalty mode (4 batches, 8 optimizer steps):
    one hook per optimizer, each acting on the generators whose parameters it holds (``a``'s 8
    neurons for the first, none for the second: ``b``'s span both); equal to the plain loop
    with one ``GaugeFixing`` per optimizer, bit for bit."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    gauge = LIGHTNING_GAUGES["penalty"]
    module, structure = two_optimizer_module(pl)
    plain = copy.deepcopy(module)
    callback = GaugeFixingCallback(**gauge)
    fit(pl, module, [callback], tmp_path, max_steps=8, enable_checkpointing=False)
    hooks = two_optimizer_loop(
        plain, lambda *opts: [GaugeFixing(opt, plain, structure, **gauge) for opt in opts]
    )
    assert [h.active.num_generators for h in hooks] == [8, 0]
    assert callback.state_dict() == {"hooks": [h.state_dict() for h in hooks], "optimizers": 2}
    assert same(module, plain) == 0.0


@pytest.mark.parametrize("name", ["exact-1", "exact-3"])
def test_lightning_two_optimizers_exact_equal_the_plain_loop(pl, tmp_path, name):
    """Manual optimization with two optimizers in exact mode (4 batches, 8 optimizer steps):
    one hook over both, acting on all 16 generators (``b``'s 8 span both optimizers); equal to
    the plain loop with ``GaugeFixing([first, second], ...)``, bit for bit."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    gauge = LIGHTNING_GAUGES[name]
    module, structure = two_optimizer_module(pl)
    plain = copy.deepcopy(module)
    callback = GaugeFixingCallback(**gauge)
    fit(pl, module, [callback], tmp_path, max_steps=8, enable_checkpointing=False)
    hook = two_optimizer_loop(plain, lambda *opts: GaugeFixing(list(opts), plain, structure,
                                                               **gauge))  # fmt: skip
    assert hook.active.num_generators == structure.num_generators == 16
    assert callback.state_dict() == {"hooks": [hook.state_dict()], "optimizers": 2}
    assert hook.steps == 4 // gauge["every"] and same(module, plain) == 0.0


def two_optimizer_checkpoint(pl, root):
    """A checkpoint after one epoch (4 training steps) of :func:`two_optimizer_module` with the
    callback in exact mode every 3 steps (one step into the interval)."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    module, _ = two_optimizer_module(pl)
    fit(pl, module, [GaugeFixingCallback(**LIGHTNING_GAUGES["exact-3"])], root, max_epochs=1)
    (checkpoint,) = root.rglob("*.ckpt")
    return checkpoint


def test_lightning_two_optimizers_exact_resumed_fit_equals_the_uninterrupted_fit(pl, tmp_path):
    """Exact mode every 3 steps over two optimizers: a fit resumed from the checkpoint after
    one epoch (4 steps) to 2 epochs has the same parameters, bit for bit, and the same one
    hook state as the fit of 2 epochs in one go, which equals the plain loop."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    gauge = LIGHTNING_GAUGES["exact-3"]
    checkpoint = two_optimizer_checkpoint(pl, tmp_path / "a")
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    ((_, state),) = [(k, v) for k, v in saved.items() if k.startswith("GaugeFixingCallback")]
    assert state["optimizers"] == 2 and [h["since"] for h in state["hooks"]] == [1]
    runs = []
    for ckpt in (checkpoint, None):
        (module, structure), callback = two_optimizer_module(pl), GaugeFixingCallback(**gauge)
        fit(pl, module, [callback], tmp_path / "b", ckpt, max_epochs=2, enable_checkpointing=False)
        runs.append((module, callback.state_dict()))
    (resumed, state), (whole, whole_state) = runs
    plain, _ = two_optimizer_module(pl)
    hook = two_optimizer_loop(plain, lambda *o: GaugeFixing(list(o), plain, structure, **gauge), 2)
    assert state == whole_state == {"hooks": [hook.state_dict()], "optimizers": 2}
    assert hook.steps == 2 and same(resumed, whole) == 0.0 and same(whole, plain) == 0.0


def test_lightning_per_optimizer_checkpoint_into_one_exact_hook_is_refused(pl, tmp_path):
    """A checkpoint holding one state per optimizer (as penalty mode, and exact mode before it
    took one hook over all, write them; no ``optimizers`` entry) resumed in exact mode with two
    optimizers: one ``ValueError`` line when training starts, no hook attached, the module as
    the checkpoint left it (the per-optimizer hooks left the spanning generators out, so the
    interval cannot be continued exactly)."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    checkpoint = two_optimizer_checkpoint(pl, tmp_path / "a")
    saved = torch.load(checkpoint, weights_only=False)
    key = next(k for k in saved["callbacks"] if k.startswith("GaugeFixingCallback"))
    (state,) = saved["callbacks"][key]["hooks"]
    saved["callbacks"][key] = {"hooks": [state, {**state, "lr_sums": state["lr_sums"][:1]}]}
    torch.save(saved, tmp_path / "old.ckpt")
    module, _ = two_optimizer_module(pl)
    callback = GaugeFixingCallback(**LIGHTNING_GAUGES["exact-3"])
    with pytest.raises(ValueError, match="2 gauge-fixing states for 2 optimizers") as refused:
        fit(pl, module, [callback], tmp_path / "b", tmp_path / "old.ckpt", max_epochs=2)
    assert "\n" not in str(refused.value) and callback.hooks == []
    weights = saved["state_dict"]
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("name", ["penalty", "exact-3"])
def test_lightning_frozen_then_unfrozen_equals_the_plain_loop(pl, tmp_path, name):
    """``BaseFinetuning`` freezes the last layer for the first epoch and adds it to the
    optimizer as a new group at the second (in the middle of an interval of 3 steps): its
    generators are left out, then followed; equal to the plain loop doing the same."""
    from lightning.pytorch.callbacks import BaseFinetuning

    from gaugefix.integrations.lightning import GaugeFixingCallback

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net[4])

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.net[4], optimizer, lr=LR,
                                                  initial_denom_lr=1.0)  # fmt: skip

    gauge = LIGHTNING_GAUGES[name]
    module, callback = module_for(pl, mlp()), GaugeFixingCallback(**gauge)
    fit(pl, module, [Unfreeze(), callback], tmp_path, max_epochs=2, enable_checkpointing=False)
    plain = mlp()
    structure = gaugefix.discover(plain, torch.zeros(2, 4, dtype=DT))
    plain[4].requires_grad_(False)
    opt = SGD([p for p in plain.parameters() if p.requires_grad])
    hook = GaugeFixing(opt, plain, structure, **gauge)
    for epoch in range(2):
        if epoch == 1:
            plain[4].requires_grad_(True)
            opt.add_param_group({"params": list(plain[4].parameters()), "lr": LR})
        for x, y in batches():
            opt.zero_grad()
            (plain(x) - y).square().mean().backward()
            opt.step()
    assert callback.state_dict()["hooks"] == [hook.state_dict()]
    assert same(module.net, plain) == 0.0


def test_lightning_structure_of_another_model_is_refused_in_one_line(pl, tmp_path):
    """A structure discovered on a wider MLP with the same parameter names: one line when the
    fit starts, the module untouched and no hook attached."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    wider = zoo.mlp((4, 16, 8, 2)).to(DT)
    module = module_for(pl, mlp())
    structure = gaugefix.discover(module_for(pl, wider), torch.zeros(2, 4, dtype=DT))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="structure does not match.*shape") as refused:
        fit(pl, module, [GaugeFixingCallback(1.0, structure=structure)], tmp_path, max_steps=2)
    assert "\n" not in str(refused.value)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_lightning_untransportable_optimizer_is_refused_at_the_start(pl, tmp_path):
    """Exact mode with torchao's 8-bit AdamW (quantized moments, made at its first step):
    before, the fit ran ``every`` steps and the first orbit step failed inside torchao
    (NotImplementedError on weights of 4096 entries or more); now one line when training
    starts, the module untouched and no hook attached."""
    torchao_optim = pytest.importorskip("torchao.optim")
    from gaugefix.integrations.lightning import GaugeFixingCallback

    module = module_for(pl, mlp(torch.float32), optimizer=torchao_optim.AdamW8bit)
    before = copy.deepcopy(module.state_dict())
    callback = GaugeFixingCallback(1.0, every=2)
    refusal = r"cannot transport optimizer state \(quantized moments\) of AdamW8bit"
    with pytest.raises(ValueError, match=refusal) as refused:
        fit(pl, module, [callback], tmp_path, max_steps=STEPS, enable_checkpointing=False)
    assert "\n" not in str(refused.value)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert callback.hooks == [] and not any(hooked(o) for o in module.trainer.optimizers)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_lightning_discovers_on_an_input_converted_to_the_precision(pl, tmp_path, precision):
    """``precision="64-true"`` / ``"bf16-true"`` convert the module's parameters (and each
    batch) before the fit starts; a float32 ``example_input_array`` used to reach the converted
    module unconverted (TracingError: 'mat1 and mat2 must have the same dtype'). Now it is
    converted as Lightning converts batches, and the structure is the module's."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    module, callback = module_for(pl, mlp(torch.float32)), GaugeFixingCallback(1.0, every=1)
    assert module.example_input_array.dtype == torch.float32
    fit(pl, module, [callback], tmp_path, max_steps=2, precision=precision,
        enable_checkpointing=False)  # fmt: skip
    dtype = torch.float64 if precision == "64-true" else torch.bfloat16
    assert (
        next(module.parameters()).dtype == dtype and callback.state_dict()["hooks"][0]["steps"] == 2
    )
    expected = gaugefix.discover(module, torch.zeros(2, 4, dtype=dtype))
    assert callback.structure.to_dict() == expected.to_dict()


def test_lightning_discovers_on_a_dict_example_input(pl, tmp_path):
    """Lightning's ``example_input_array`` may be a dict of ``forward``'s keyword arguments
    (``forward(**example)``, as its model summary calls it); it used to be passed as one
    positional argument. Now discovery calls ``forward(**example)`` and the fit trains as
    with the tensor example."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    runs = []
    for example in (torch.zeros(2, 4, dtype=DT), {"x": torch.zeros(2, 4, dtype=DT)}):
        module, callback = module_for(pl, mlp()), GaugeFixingCallback(1.0, every=1)
        module.example_input_array = example
        fit(pl, module, [callback], tmp_path, max_steps=STEPS, enable_checkpointing=False)
        runs.append((module.net, callback.structure.to_dict()))
    (tensor_net, tensor_structure), (dict_net, dict_structure) = runs
    assert dict_structure == tensor_structure
    assert same(dict_net, tensor_net) == 0.0


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit", "Adafactor"])
def test_gauge_fixing_refuses_foreign_untransportable_optimizers_when_built(name):
    """Plain ``GaugeFixing`` in exact mode refuses torchao's low-bit AdamW and transformers'
    Adafactor when it is built (before: at its first orbit step, after ``every`` steps of
    training), the model untouched; penalty mode takes them."""
    module = "transformers.optimization" if name == "Adafactor" else "torchao.optim"
    optimizer_class = getattr(pytest.importorskip(module), name)
    model = mlp(torch.float32)
    structure = gaugefix.discover(model, torch.zeros(2, 4))
    before = copy.deepcopy(model.state_dict())
    opt = optimizer_class(model.parameters())  # each one's own default learning rate
    with pytest.raises(ValueError, match=f"cannot transport optimizer state .* of {name}"):
        GaugeFixing(opt, model, structure, strength=1.0, mode="exact", every=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    GaugeFixing(opt, model, structure, strength=1.0, mode="penalty").remove()


# -- a structure the callback discovered belongs to that fit's model --------------------------
def tanh_mlp() -> nn.Module:
    """:func:`mlp` with ``tanh`` for ``relu``: the same parameter names and shapes, and no
    rescaling symmetry."""
    return nn.Sequential(*[nn.Tanh() if isinstance(m, nn.ReLU) else m for m in mlp()])


def test_lightning_callback_reused_for_another_model_discovers_again(pl, tmp_path):
    """One callback (no structure given) in two fits: a ReLU MLP, then a tanh MLP of the same
    names and shapes. The second fit must gauge-fix the tanh MLP's own (empty) structure, as a
    fresh callback does, not the ReLU MLP's (which rescales the tanh neurons: 3.7 apart)."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    gauge = LIGHTNING_GAUGES["exact-1"]
    callback = GaugeFixingCallback(**gauge)
    options = {"max_steps": 2, "enable_checkpointing": False}
    fit(pl, module_for(pl, mlp()), [callback], tmp_path, **options)
    reused, fresh = module_for(pl, tanh_mlp()), module_for(pl, tanh_mlp())
    fit(pl, reused, [callback], tmp_path, **options)
    fit(pl, fresh, [GaugeFixingCallback(**gauge)], tmp_path, **options)
    assert callback.structure.num_generators == 0
    assert same(reused.net, fresh.net) == 0.0


def test_hf_callback_reused_for_a_new_model_init_model_discovers_again(hf, tmp_path):
    """``Trainer(model_init=...)`` builds a new model at every ``train()`` (a hyperparameter
    search's trials): a ReLU GPT-2, then a tanh one of the same names and shapes. The second
    run must gauge-fix the tanh model's own structure (discovered on its first batch), as a
    fresh callback does, not the ReLU model's."""
    from gaugefix.integrations.transformers import GaugeFixingCallback

    def model_init(run):
        activation = next(run)
        torch.manual_seed(0)
        config = hf.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=24,
            activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return hf.GPT2LMHeadModel(config).to(DT)

    args = hf.TrainingArguments(
        str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
        per_device_train_batch_size=4, max_steps=2, learning_rate=LR, logging_strategy="no",
    )  # fmt: skip
    # model_init runs when the trainer is built and at every train()
    runs = (iter(["relu", "relu", "tanh"]), iter(["tanh", "tanh"]))
    trainers = [
        hf.Trainer(args=args, model_init=functools.partial(model_init, run),
                   train_dataset=Tokens())
        for run in runs
    ]  # fmt: skip
    callbacks = [GaugeFixingCallback(t, **GAUGES["exact-1"]) for t in trainers]
    for trainer, callback in zip(trainers, callbacks, strict=True):
        trainer.add_callback(callback)
    trainers[0].train()  # relu, discovered on its first batch
    trainers[0].train()  # tanh, the same callback
    trainers[1].train()  # tanh, a fresh callback
    first, second = callbacks
    assert first.structure.to_dict() == second.structure.to_dict()
    assert same(trainers[0].model, trainers[1].model) == 0.0


@pytest.mark.parametrize(
    "field,value", [("since", 1.5), ("since", True), ("steps", "2"), ("skipped", 2.0),
                    ("lr_sums", ["0.1"]), ("lr_sums", [True])],
)  # fmt: skip
def test_hook_state_with_a_count_that_is_not_an_integer_is_refused(field, value):
    """``GaugeFixing.load_state_dict`` of a state whose counts are not integers (``since=1.5``
    was read as 1, ``"2"`` steps as 2) or whose sums are not numbers: one ``ValueError``, the
    hook's state as before."""
    model = mlp()
    opt = SGD(model.parameters())
    hook = GaugeFixing(opt, model, gaugefix.discover(model, torch.zeros(2, 4, dtype=DT)), 1.0,
                       every=3, balance_at_start=False)  # fmt: skip
    before = hook.state_dict()
    state = {"steps": 2, "skipped": 0, "since": 1, "lr_sums": [0.1], field: value}
    with pytest.raises(ValueError, match="GaugeFixing state") as refused:
        hook.load_state_dict(state)
    assert "\n" not in str(refused.value) and hook.state_dict() == before
    hook.remove()


@pytest.mark.parametrize(
    "state", [{}, {"hooks": 3}, {"hooks": [{"steps": 1}, 2]}, [],
              {"hooks": [{}, {}], "optimizers": 3}, {"hooks": [{}], "optimizers": "2"}],
)  # fmt: skip
def test_lightning_malformed_checkpoint_state_is_one_value_error(pl, state):
    """``load_state_dict`` of a callback state that ``state_dict`` did not write (no ``hooks``
    list of dicts: a KeyError or TypeError before; neither one hook state nor one per optimizer,
    or a count of optimizers that is not an integer): one ``ValueError``, nothing restored."""
    from gaugefix.integrations.lightning import GaugeFixingCallback

    callback = GaugeFixingCallback(1.0)
    with pytest.raises(ValueError, match="GaugeFixingCallback state") as refused:
        callback.load_state_dict(state)
    assert "\n" not in str(refused.value) and callback._restored is None


@pytest.mark.parametrize(
    "saved", [{"structure": "not a structure", "started": True, "hook": {}}, {"started": True},
              {"structure": None, "started": True, "hook": {}}, "gaugefix"],
)  # fmt: skip
def test_hf_malformed_checkpoint_state_is_one_value_error(hf, tmp_path, saved):
    """A ``trainer_state.json`` whose ``gaugefix`` entry the callback did not write (garbage
    for the structure, keys missing: zlib, binascii or key errors before): one ``ValueError``
    naming it when training starts, no discovery hook on the model, nothing attached."""
    from gaugefix.integrations.transformers import GaugeFixingCallback

    model, _ = gpt2(hf)
    args = hf.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = hf.Trainer(model, args, train_dataset=Tokens())
    callback = GaugeFixingCallback(trainer, **GAUGES["exact-1"])
    trainer.add_callback(callback)
    trainer.state.stateful_callbacks["gaugefix"] = saved
    with pytest.raises(ValueError, match="checkpoint's gauge-fixing state") as refused:
        callback.on_train_begin(args, trainer.state, trainer.control)
    assert "\n" not in str(refused.value)
    assert callback.structure is None and not model._forward_pre_hooks


def test_hf_saved_hook_state_that_does_not_fit_moves_nothing(hf, tmp_path):
    """A checkpoint entry of a run that had not started gauge fixing (``started=False``, so it
    balances at the start) whose hook state does not fit ``every=1``: one ``ValueError`` when
    gauge fixing starts, and the model not balanced (it was balanced before the state was
    checked)."""
    from gaugefix.integrations.transformers import GaugeFixingCallback, encode_structure

    model, structure = gpt2(hf)
    args = hf.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = hf.Trainer(model, args, train_dataset=Tokens())
    trainer.create_optimizer()
    callback = GaugeFixingCallback(trainer, **GAUGES["exact-1"])
    trainer.add_callback(callback)
    hook = {"steps": 0, "skipped": 0, "since": 2, "lr_sums": [0.1]}
    trainer.state.stateful_callbacks["gaugefix"] = {
        "structure": encode_structure(structure), "started": False, "hook": hook,
    }  # fmt: skip
    before = copy.deepcopy(model.state_dict())
    callback.on_train_begin(args, trainer.state, trainer.control)
    with pytest.raises(ValueError, match="does not fit every=1"):
        callback.on_step_begin(args, trainer.state, trainer.control)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert callback.hook is None and not hooked(trainer.optimizer)
