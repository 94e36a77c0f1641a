"""What ``GaugeFixing.stats()`` and the callbacks report is the imbalance of the generators gauge
fixing acts on (``GaugeFixing.active``): on a LoRA-like fine-tune (a frozen base linear map
with a trainable low-rank adapter and a trainable head) the generators touching the frozen base
are left out, never moved, and not counted; the adapters' rank generators are, and their
imbalance falls during training. With nothing frozen the statistics are the whole structure's,
bit for bit; with every generator left out they are those of an empty structure (all 0)."""

from __future__ import annotations

import importlib
import logging
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from gaugefix import GaugeFixing
from gaugefix.moment import STAT_NAMES

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
RANK = 3
WIDTH = 16
GAUGE = 2.0  # random gauges h ~ N(0, 2^2): the adapters far off balance
STRENGTH = 5.0
LR = 0.05
STEPS = 8
FALL = 1e-3  # the acted-on imbalance after training, relative to before: at most this
FROZEN_REASON = "acts on a frozen base weight"


class Adapted(nn.Module):
    """``head(relu(base(x) + B(A(x))))`` with ``base`` frozen: the ReLU neurons' generators
    touch ``base`` (left out), the adapter's rank channels do not (acted on). With ``labels`` it
    returns ``{"loss": ...}``, as a Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(4, WIDTH).requires_grad_(False)
        self.A = nn.Linear(4, RANK, bias=False)
        self.B = nn.Linear(RANK, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        out = self.head(torch.relu(self.base(x) + self.B(self.A(x))))
        if labels is None:
            return out
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def data(n: int = 64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen, dtype=DTYPE)
    return x, x[:, :1].relu() - 0.5 * x[:, 1:2]


def model_and_structure(gauge: float = GAUGE) -> tuple[Adapted, gaugefix.GaugeStructure]:
    model = Adapted().to(DTYPE)
    structure = gaugefix.discover(model, data()[0][:2])
    rank = rank_only(model, structure)  # the adapter's channels off balance, the rest as drawn
    gaugefix.random_gauge_(model, rank, gauge, torch.Generator().manual_seed(5))
    return model, structure


def rank_only(model: nn.Module, structure: gaugefix.GaugeStructure) -> gaugefix.GaugeStructure:
    """The subgroup of the generators touching no frozen parameter: the adapter's rank ones."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return structure.restrict(~structure.touching(frozen), FROZEN_REASON)


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> None:
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# --- GaugeFixing.stats() -------------------------------------------------------------------------
def test_setup_has_both_kinds_of_generators():
    model, structure = model_and_structure()
    acted = rank_only(model, structure)
    assert acted.num_generators == RANK < structure.num_generators


# (mode, gauge, fall): the penalty, explicit, diverges from adapters as far off balance
@pytest.mark.parametrize(("mode", "gauge", "fall"), [("exact", GAUGE, FALL), ("penalty", 1.0, 0.5)])
def test_stats_are_those_of_the_generators_acted_on_and_fall(mode, gauge, fall):
    model, structure = model_and_structure(gauge)
    hook = GaugeFixing(
        torch.optim.SGD(trainable(model), lr=LR), model, structure, STRENGTH, mode=mode,
        balance_at_start=False, every=1,
    )  # fmt: skip
    acted = rank_only(model, structure)
    assert hook.active.num_generators == RANK
    before = hook.stats()
    assert before == gaugefix.imbalance_stats(model, hook.active)
    assert before == gaugefix.imbalance_stats(model, acted)
    assert before != gaugefix.imbalance_stats(model, structure)
    assert torch.equal(hook.active_mask, ~structure.touching({"base.weight", "base.bias"}))
    train(model, hook.optimizer)
    after = hook.stats()
    assert after == gaugefix.imbalance_stats(model, acted)
    assert after["mu_rel_rms"] <= fall * before["mu_rel_rms"], (before, after)
    hook.remove()


def test_stats_with_nothing_frozen_are_the_whole_structure_bit_for_bit():
    model, structure = model_and_structure()
    model.base.requires_grad_(True)
    hook = GaugeFixing(torch.optim.SGD(model.parameters(), lr=LR), model, structure, STRENGTH)
    assert hook.active is structure and bool(hook.active_mask.all())
    train(model, hook.optimizer, 2)
    assert hook.stats() == gaugefix.imbalance_stats(model, structure)
    hook.remove()


def test_stats_follow_a_parameter_frozen_after_attaching():
    """Freezing the adapter's ``A`` between steps leaves its rank generators out at once: no
    generator is acted on, and the statistics are those of an empty structure."""
    model, structure = model_and_structure()
    hook = GaugeFixing(torch.optim.SGD(trainable(model), lr=LR), model, structure, STRENGTH)
    assert hook.stats() == gaugefix.imbalance_stats(model, rank_only(model, structure))
    model.A.weight.requires_grad_(False)
    stats = hook.stats()
    assert hook.active.num_generators == 0 and not bool(hook.active_mask.any())
    assert stats == dict.fromkeys(STAT_NAMES, 0.0)
    hook.remove()


def test_every_generator_left_out_gives_the_empty_structure_statistics():
    model, structure = model_and_structure()
    hook = GaugeFixing(torch.optim.SGD([model.head.bias], lr=LR), model, structure, STRENGTH)
    assert hook.active.num_generators == 0
    empty = gaugefix.imbalance_stats(model, hook.active)
    assert empty == dict.fromkeys(STAT_NAMES, 0.0)
    assert all(math.isfinite(v) for v in empty.values())
    train(model, hook.optimizer, 1)
    assert hook.stats() == empty
    hook.remove()


def test_several_hooks_report_the_generators_any_acts_on():
    """Penalty mode, one hook per optimizer: the adapter's in one, the head in the other."""
    common = importlib.import_module("gaugefix.integrations.common")
    model, structure = model_and_structure()
    opts = [
        torch.optim.SGD([model.A.weight, model.B.weight], lr=LR),
        torch.optim.SGD(model.head.parameters(), lr=LR),
    ]
    hooks = [GaugeFixing(opt, model, structure, STRENGTH, mode="penalty") for opt in opts]
    assert [h.active.num_generators for h in hooks] == [RANK, 0]
    acted = common.acted_structure(structure, hooks)
    assert acted.num_generators == RANK
    assert gaugefix.imbalance_stats(model, acted) == hooks[0].stats()
    assert common.acted_structure(structure, []) is structure
    for hook in hooks:
        hook.remove()


# --- the callbacks -------------------------------------------------------------------------------
def assert_logged_fall(
    logged: list[dict[str, float]], expected: list[dict[str, float]], before: dict[str, float]
) -> None:
    """Logged at every step, each value that of the acted-on generators then, and well below
    their imbalance before training (the whole structure's stays near it)."""
    assert len(logged) == STEPS and logged == expected
    assert logged[-1]["mu_rel_rms"] <= FALL * before["mu_rel_rms"], (before, logged)


def test_lightning_logs_the_acted_on_imbalance(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gaugefix.integrations.lightning import GaugeFixingCallback

    model, structure = model_and_structure()
    logged, expected = [], []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: list[Tensor], idx: int) -> Tensor:
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(trainable(self), lr=LR)

        def log_dict(self, values: dict, **kwargs: object) -> None:
            if "gauge/mu_rel_rms" in values:
                (hook,) = self.trainer.callbacks[0].hooks
                logged.append({k.removeprefix("gauge/"): v for k, v in values.items()})
                expected.append(gaugefix.imbalance_stats(self, hook.active))
                assert hook.active.num_generators == RANK
            super().log_dict(values, **kwargs)

    module = Module()
    before = gaugefix.imbalance_stats(model, rank_only(model, structure))
    wrapped = gaugefix.discover(module, data()[0][:2])
    callback = GaugeFixingCallback(STRENGTH, structure=wrapped, every=1, balance_at_start=False)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
        log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
    )  # fmt: skip
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    assert_logged_fall(logged, expected, before)


def test_hf_trainer_logs_the_acted_on_imbalance(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gaugefix.integrations.transformers import GaugeFixingCallback

    model, structure = model_and_structure()
    x, y = data()
    dataset = [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=16, max_steps=STEPS, logging_steps=1, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", seed=0, save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(model, args, train_dataset=dataset)
    callback = GaugeFixingCallback(
        trainer, STRENGTH, structure=structure, every=1, balance_at_start=False
    )
    logged, expected = [], []
    before = gaugefix.imbalance_stats(model, rank_only(model, structure))

    class Recorder(transformers.TrainerCallback):
        def on_log(self, args: object, state: object, control: object, **kw: object) -> None:
            logs = kw["logs"]
            if "gauge/mu_rel_rms" in logs:
                assert callback.hook.active.num_generators == RANK
                logged.append({k: logs["gauge/" + k] for k in STAT_NAMES})
                expected.append(gaugefix.imbalance_stats(model, callback.hook.active))

    trainer.add_callback(callback)
    trainer.add_callback(Recorder())
    trainer.train()
    assert_logged_fall(logged, expected, before)


def test_peft_lora_stats_are_the_adapters_and_fall():
    """A ``peft`` LoRA GPT-2 (the base frozen by ``peft``): ``stats()`` is the imbalance of the
    adapters' rank generators alone, and it falls during training."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4, activation_function="relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    lora = peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True, init_lora_weights=False, lora_dropout=0.0,
    )  # fmt: skip
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(base, lora).to(DTYPE)
    ids = torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(1))
    structure = gaugefix.discover(model, input_ids=ids[:1, :4])
    acted = rank_only(model, structure)
    gaugefix.random_gauge_(model, acted, GAUGE, torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(trainable(model), lr=LR)
    hook = GaugeFixing(opt, model, structure, STRENGTH, balance_at_start=False, every=1)
    assert 0 < hook.active.num_generators == acted.num_generators < structure.num_generators
    before = hook.stats()
    assert before == gaugefix.imbalance_stats(model, acted)
    assert before != gaugefix.imbalance_stats(model, structure)
    for _ in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    after = hook.stats()
    assert after == gaugefix.imbalance_stats(model, acted)
    assert after["mu_rel_rms"] <= FALL * before["mu_rel_rms"], (before, after)
    hook.remove()
