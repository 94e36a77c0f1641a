"""The Lightning callback trains a small model on CPU with the imbalance statistics logged."""

from __future__ import annotations

import csv
import importlib
import logging
import warnings

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import zoo

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from gaugefix.integrations.lightning import GaugeFixingCallback  # noqa: E402

hook_module = importlib.import_module("gaugefix.train.hook")


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = zoo.mlp((4, 16, 16, 1))
        self.lr = lr
        self.example_input_array = torch.randn(2, 4)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(n: int = 64, batch: int = 16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = x[:, :1].relu() - 0.5 * x[:, 1:2]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def fit(module, callback, tmp_path, steps: int = 6):
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=[callback],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "the dataloader does not have many workers"
        trainer.fit(module, loader())
    return trainer


@pytest.fixture(autouse=True)
def quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def logged_stats(trainer):
    with open(trainer.logger.experiment.metrics_file_path) as f:
        return [r for r in csv.DictReader(f) if r.get("gauge/mu_rel_rms")]


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_trains_and_logs_imbalance_statistics(tmp_path, mode):
    """12 steps of SGD with momentum: the loss falls, the statistics are logged every step, and
    the imbalance drifts far less than in the same fit with strength 0 (which only logs). An
    orbit step after every optimizer step (``every=1``), so that every logged step shows it."""
    x, y = loader().dataset.tensors
    runs = {}
    for strength in (0.0, 10.0):
        torch.manual_seed(0)
        module = Regressor()
        before = float(nn.functional.mse_loss(module(x), y).detach())
        # The structure is discovered from example_input_array.
        callback = GaugeFixingCallback(strength=strength, mode=mode, every=1)
        trainer = fit(module, callback, tmp_path / str(strength), steps=12)
        assert trainer.global_step == 12
        assert float(nn.functional.mse_loss(module(x), y).detach()) < before
        logged = logged_stats(trainer)
        assert len(logged) == 12
        for key in ("mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "norm_sq"):
            assert all(float(r[f"gauge/{key}"]) >= 0 for r in logged), key
        assert float(logged[0]["gauge/mu_rel_max"]) < 0.01  # balanced at the start
        stats = gaugefix.imbalance_stats(module, callback.structure)
        assert stats["mu_norm"] == pytest.approx(float(logged[-1]["gauge/mu_norm"]), rel=1e-5)
        # The hooks are removed when training ends.
        assert callback.hooks == []
        opt = trainer.optimizers[0]
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        runs[strength] = float(logged[-1]["gauge/mu_norm"])
    assert runs[10.0] < 0.25 * runs[0.0]


def test_explicit_structure_and_bad_input(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    structure = gaugefix.discover(module, module.example_input_array)
    callback = GaugeFixingCallback(strength=0.0, structure=structure, balance_at_start=False)
    fit(module, callback, tmp_path, steps=2)
    with pytest.raises(ValueError, match="strength"):
        GaugeFixingCallback(strength=-1.0)
    with pytest.raises(ValueError, match="mode"):
        GaugeFixingCallback(strength=1.0, mode="hard")
    with pytest.raises(TypeError, match="GaugeFixingCallback got unknown option.*: moed"):
        GaugeFixingCallback(strength=1.0, moed="penalty")
    with pytest.raises(TypeError, match="structure must be a GaugeStructure"):
        GaugeFixingCallback(strength=1.0, structure=module)
    other = gaugefix.discover(module.net, module.example_input_array)  # names lack "net."
    with pytest.raises(ValueError, match="does not match"):
        fit(Regressor(), GaugeFixingCallback(strength=1.0, structure=other), tmp_path, steps=1)


class Recording(GaugeFixingCallback):
    def on_train_end(self, trainer, pl_module):
        self.seen = [(hook.every, hook.steps) for hook in self.hooks]
        self.since = [hook.state_dict()["since"] for hook in self.hooks]
        super().on_train_end(trainer, pl_module)


def test_every_is_passed_to_the_hooks(tmp_path):
    torch.manual_seed(0)
    callback = Recording(strength=1.0, every=4)
    trainer = fit(Regressor(), callback, tmp_path, steps=9)
    assert trainer.global_step == 9
    assert callback.seen == [(4, 2)]  # orbit steps after optimizer steps 4 and 8
    with pytest.raises(ValueError, match="every"):
        GaugeFixingCallback(strength=1.0, every=0)


def test_resumed_fit_continues_the_interval_and_does_not_balance_again(tmp_path, monkeypatch):
    """4 steps, a checkpoint, and a fit resumed from it to step 7 (orbit steps every 3 steps):
    the checkpoint holds the hook's state (one orbit step, one step since), and the resumed
    hook continues from it, taking its next orbit step at step 6 (not 4 + 3), without balancing
    the model again."""

    def trainer(steps: int, callback, **options):
        return pl.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
            enable_progress_bar=False, enable_model_summary=False, **options,
        )  # fmt: skip

    torch.manual_seed(0)
    module = Regressor()
    trainer(4, Recording(strength=5.0, every=3), default_root_dir=tmp_path).fit(module, loader())
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "Recording" in k]
    assert [(h["steps"], h["since"]) for h in state["hooks"]] == [(1, 1)]

    def no_balancing(*args, **kwargs):
        raise AssertionError("the resumed fit balanced the model again")

    monkeypatch.setattr(hook_module, "balance_", no_balancing)
    callback = Recording(strength=5.0, every=3)
    trainer(7, callback, enable_checkpointing=False).fit(
        Regressor(), loader(), ckpt_path=checkpoint
    )
    assert callback.seen == [(3, 2)]
    assert callback.since == [1]


def bare_trainer(steps: int, callback, **options):
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, **options,
    )  # fmt: skip


def hooked(optimizer) -> bool:
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)


def test_checkpoint_saved_after_the_fit_keeps_the_hook_states(tmp_path, monkeypatch):
    """``trainer.save_checkpoint`` after ``fit`` returned (the hooks are removed then) saves the
    hooks' states as they ended, not an empty list that would make a resumed fit balance again
    and count from 0."""
    torch.manual_seed(0)
    trainer = bare_trainer(4, Recording(strength=5.0, every=3), enable_checkpointing=False)
    trainer.fit(Regressor(), loader())
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=False)["callbacks"]
    (state,) = saved.values()
    assert [(h["steps"], h["since"]) for h in state["hooks"]] == [(1, 1)]

    def no_balancing(*args, **kwargs):
        raise AssertionError("the resumed fit balanced the model again")

    monkeypatch.setattr(hook_module, "balance_", no_balancing)
    callback = Recording(strength=5.0, every=3)
    bare_trainer(7, callback, enable_checkpointing=False).fit(
        Regressor(), loader(), ckpt_path=tmp_path / "after.ckpt"
    )
    assert callback.seen == [(3, 2)] and callback.since == [1]


def test_strength_zero_without_balancing_only_logs(tmp_path):
    """``strength=0, balance_at_start=False`` logs the statistics and leaves the training as it
    is without the callback, bit for bit (the model starts far from balance and stays there)."""

    def run(callbacks):
        torch.manual_seed(0)
        module = Regressor()
        structure = gaugefix.discover(module, module.example_input_array)
        gaugefix.random_gauge_(module, structure, 1.0, torch.Generator().manual_seed(3))
        trainer = pl.Trainer(
            max_steps=3, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)),
            callbacks=callbacks, log_every_n_steps=1, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, loader())
        return module, trainer

    logging_only, trainer = run([GaugeFixingCallback(strength=0.0, balance_at_start=False)])
    plain, _ = run([])
    for p, q in zip(logging_only.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    assert len(logged_stats(trainer)) == 3
    assert float(logged_stats(trainer)[0]["gauge/mu_rel_max"]) > 0.5


def test_penalty_mode_takes_no_every():
    with pytest.raises(ValueError, match="every=3 has no meaning in penalty mode"):
        GaugeFixingCallback(strength=1.0, mode="penalty", every=3)
    assert GaugeFixingCallback(strength=1.0, mode="penalty").every == 1
    assert GaugeFixingCallback(strength=1.0).every == 10


def test_restored_state_that_does_not_fit_leaves_no_hook_attached(tmp_path):
    """A fit resumed with another ``every`` than the checkpoint's interval allows raises the
    hook's one-line ``ValueError``, and leaves no hook on the optimizer."""
    torch.manual_seed(0)
    bare_trainer(4, GaugeFixingCallback(strength=5.0, every=3), default_root_dir=tmp_path).fit(
        Regressor(), loader()
    )
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    trainer = bare_trainer(
        7, GaugeFixingCallback(strength=5.0, every=1), enable_checkpointing=False
    )
    with pytest.raises(ValueError, match="does not fit every=1"):
        trainer.fit(Regressor(), loader(), ckpt_path=checkpoint)
    assert trainer.optimizers and not any(hooked(opt) for opt in trainer.optimizers)


def test_statistics_are_computed_only_where_the_loggers_write(tmp_path, monkeypatch):
    """``log_every_n_steps=4`` over 8 steps: the loggers write steps 4 and 8 (Lightning's
    rows for steps 3 and 7, counted from 0), and the statistics (a pass over the parameters and
    a host read) are computed there only, not at every batch."""
    computed = []
    stats = importlib.import_module("gaugefix.integrations.common").prefixed_stats

    def counted(module, structure, prefix):
        computed.append(module.trainer.global_step)
        return stats(module, structure, prefix)

    lightning_module = importlib.import_module("gaugefix.integrations.lightning")
    monkeypatch.setattr(lightning_module, "prefixed_stats", counted)
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=[GaugeFixingCallback(strength=1.0, every=1)], log_every_n_steps=4,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regressor(), loader(n=128))
    assert computed == [4, 8]
    assert [int(r["step"]) for r in logged_stats(trainer)] == [3, 7]
