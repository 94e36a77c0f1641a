"""The Hugging Face ``Trainer`` callback, with a real ``Trainer`` on CPU: a small GPT-2 with a
ReLU MLP trained on synthetic token ids (random weights, nothing downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gaugefix

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gaugefix.integrations import transformers as integration  # noqa: E402
from gaugefix.integrations.transformers import GaugeFixingCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

STATS = "gauge/mu_rel_rms"


@pytest.fixture(autouse=True)
def quiet():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def gpt2(dtype: torch.dtype = torch.float32, gauge: float = 1.0) -> torch.nn.Module:
    """The same small GPT-2 at every call, moved off balance by a random gauge of ``gauge``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, n_positions=16, vocab_size=40,
        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    structure = gaugefix.discover(model, torch.zeros(1, 4, dtype=torch.long))
    gaugefix.random_gauge_(model, structure, gauge, torch.Generator().manual_seed(5))
    return model.to(dtype)


class Tokens(torch.utils.data.Dataset):
    """64 sequences of 12 random token ids, each its own label."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 40, (64, 12), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(model, out, **options) -> transformers.Trainer:
    args = {
        "output_dir": str(out), "use_cpu": True, "report_to": [], "disable_tqdm": True,
        "per_device_train_batch_size": 8, "max_steps": 8, "logging_steps": 2,
        "learning_rate": 1e-2, "seed": 0, "save_strategy": "no",
    }  # fmt: skip
    args.update(options)
    return transformers.Trainer(
        model, transformers.TrainingArguments(**args), train_dataset=Tokens()
    )


def train(model, out, resume=None, callback_options=None, **options):
    """Train ``model`` with a GaugeFixingCallback: ``(trainer, callback)``."""
    trainer = trainer_for(model, out, **options)
    options = {"strength": 1000.0, "every": 1, **(callback_options or {})}
    callback = GaugeFixingCallback(trainer, **options)
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def logged(trainer, key: str = STATS) -> dict[int, float]:
    return {r["step"]: r[key] for r in trainer.state.log_history if key in r}


def max_diff(a, b) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


def hooked(optimizer) -> bool:
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_imbalance_falls_and_is_logged_through_the_trainer(tmp_path, mode):
    """From a random gauge (not balanced at the start): the logged imbalance falls much further
    than in the same training with strength 0, which only logs."""
    final = {}
    for strength in (0.0, 1000.0):
        model = gpt2()
        options = {"strength": strength, "mode": mode, "balance_at_start": False}
        trainer, callback = train(model, tmp_path / str(strength), callback_options=options)
        # at the trainer's logging steps, next to its own loss entries (which are kept)
        stats = logged(trainer)
        assert sorted(stats) == [2, 4, 6, 8]
        assert sorted(logged(trainer, "loss")) == [2, 4, 6, 8]
        entry = next(r for r in trainer.state.log_history if STATS in r)
        assert set(entry) >= {"gauge/" + k for k in gaugefix.moment.STAT_NAMES}
        now = gaugefix.imbalance_stats(model, callback.structure)
        assert stats[8] == pytest.approx(now["mu_rel_rms"], rel=1e-6)
        # once per optimizer step, removed when training ends
        assert callback.steps == 8 and callback.skipped == 0
        assert callback.hook is None and not hooked(integration.torch_optimizer(trainer.optimizer))
        final[strength] = stats[8]
    start = gaugefix.imbalance_stats(gpt2(), callback.structure)["mu_rel_rms"]
    assert final[1000.0] < start
    assert final[1000.0] < (0.1 if mode == "exact" else 0.85) * final[0.0]


def test_log_every(tmp_path):
    trainer, _ = train(gpt2(), tmp_path / "3", callback_options={"log_every": 3})
    assert sorted(logged(trainer)) == [3, 6]
    assert sorted(logged(trainer, "loss")) == [2, 4, 6, 8]
    trainer, _ = train(gpt2(), tmp_path / "0", callback_options={"log_every": 0})
    assert logged(trainer) == {}


def test_discovered_on_the_first_batch_as_if_given(tmp_path):
    """Discovery on the first batch (labels included) finds the structure of the model, and the
    training is the same, bit for bit, as with that structure given."""
    a = gpt2()
    _, callback = train(a, tmp_path / "a")
    d, layers = 16, 2
    assert callback.structure.num_generators == layers * (4 * d + 4 * d)
    assert callback.structure.kind_counts()["neuron"] == layers * 4 * d
    b = gpt2()
    given = gaugefix.discover(b, torch.zeros(1, 3, dtype=torch.long))
    train(b, tmp_path / "b", callback_options={"structure": given})
    # the same group; the notes may differ (the given one's call returned a cache, not a loss)
    assert given.to_dict() | {"notes": []} == callback.structure.to_dict() | {"notes": []}
    assert max_diff(a, b) == 0.0


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_resumed_run_continues_bit_identically(tmp_path, mode, monkeypatch):
    """8 steps saving at step 4, and a new trainer and callback resuming from checkpoint-4:
    the same parameters bit for bit and the same logged statistics. The resumed run takes the
    structure from the checkpoint (no discovery), does not balance again (which would move
    the parameters: the checkpoint is far from balance), and continues the interval of the
    exact orbit steps (every 3 steps: the checkpoint is one step past the first)."""
    a = gpt2()
    options = {"save_strategy": "steps", "save_steps": 4}
    gauge = {"mode": mode, "every": 3 if mode == "exact" else 1}
    trainer_a, callback_a = train(a, tmp_path, callback_options=gauge, **options)
    checkpoint = tmp_path / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    hook = saved["gaugefix"]["hook"]
    assert saved["gaugefix"]["started"]
    assert (hook["steps"], hook["since"]) == ((1, 1) if mode == "exact" else (4, 0))
    restored = integration.decode_structure(saved["gaugefix"]["structure"])
    assert restored.to_dict() == callback_a.structure.to_dict()
    weights = transformers.GPT2LMHeadModel.from_pretrained(checkpoint)
    assert gaugefix.imbalance_stats(weights, restored)["mu_rel_max"] > 1e-3

    def no_discovery(*args, **kwargs):
        raise AssertionError("the resumed run discovered the structure again")

    monkeypatch.setattr(integration, "discover", no_discovery)
    b = gpt2()
    trainer_b, callback_b = train(
        b, tmp_path, resume=str(checkpoint), callback_options=gauge, **options
    )
    assert trainer_b.state.global_step == 8
    assert callback_b.steps == callback_a.steps == (2 if mode == "exact" else 8)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    # the log history up to step 4 comes from the checkpoint, the rest is logged again
    assert logged(trainer_b) == logged(trainer_a)


@pytest.mark.parametrize("mode", ["exact", "penalty"])
def test_gradient_accumulation_gauge_fixes_once_per_optimizer_step(tmp_path, mode):
    """float64, SGD: 2 accumulated micro-batches of 4 train like one batch of 8 (to rounding),
    with 8 gauge-fixing steps in both. Gauge fixing per micro-batch would act like a doubled
    strength, which moves the parameters by far more than the tolerance. (With Adam the key
    biases, which no loss gradient moves, follow the sign of the penalty's gradient on them in
    penalty mode, and rounding differences grow to 1e-4 in 8 steps.)"""

    def run(batch: int, accumulate: int, strength: float) -> torch.nn.Module:
        model = gpt2(torch.float64)
        _, callback = train(
            model,
            tmp_path / f"{batch}-{strength}",
            callback_options={"mode": mode, "strength": strength},
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            optim="sgd",
            learning_rate=0.05,
        )
        assert callback.steps == 8
        return model

    accumulated = run(4, 2, 100.0)
    assert max_diff(accumulated, run(8, 1, 100.0)) <= 1e-10
    assert max_diff(accumulated, run(8, 1, 200.0)) > 1e-8


def test_reattached_when_the_optimizer_is_rebuilt(tmp_path):
    """A callback replaces the trainer's optimizer after step 3: gauge fixing moves to the new
    one (and leaves the old), and keeps counting."""
    model = gpt2()
    trainer = trainer_for(model, tmp_path)
    callback = GaugeFixingCallback(trainer, strength=1000.0, every=1)
    seen = []

    class Rebuild(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                seen.append(integration.torch_optimizer(trainer.optimizer))
                trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            elif state.global_step > 3:
                seen.append(callback.hook.optimizer)

    trainer.add_callback(callback)
    trainer.add_callback(Rebuild())
    trainer.train()
    old, *later = seen
    assert later and all(opt is trainer.optimizer for opt in later)
    assert not hooked(old) and callback.steps == 8


def test_bad_input_changes_nothing(tmp_path):
    trainer = trainer_for(gpt2(), tmp_path)
    for options, error, match in [
        ({"strength": -1.0}, ValueError, "strength"),
        ({"strength": 1.0, "mode": "hard"}, ValueError, "mode"),
        ({"strength": 1.0, "structure": "s"}, TypeError, "structure"),
        ({"strength": 1.0, "log_every": -1}, ValueError, "log_every"),
        ({"strength": 1.0, "log_stats": True}, TypeError, "unknown option.*: log_stats"),
    ]:
        with pytest.raises(error, match=match):
            GaugeFixingCallback(trainer, **options)
    with pytest.raises(TypeError, match="Trainer"):
        GaugeFixingCallback(trainer.model, strength=1.0)
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a structure of another model (its names lack "transformer.")
    other = gaugefix.discover(model.transformer, torch.zeros(1, 3, dtype=torch.long))
    for make in (
        lambda t: GaugeFixingCallback(t, strength=1.0, structure=other),
        lambda t: GaugeFixingCallback(trainer_for(gpt2(), tmp_path), strength=1.0),
    ):
        bad = trainer_for(model, tmp_path)
        bad.add_callback(make(bad))
        with pytest.raises(ValueError, match="does not match|another Trainer"):
            bad.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class Padded(Tokens):
    """The same sequences with an attention mask that hides the first 3 tokens of odd rows."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(12, dtype=torch.long)
        if i % 2:
            mask[:3] = 0
        return {**super().__getitem__(i), "attention_mask": mask}


def test_batches_with_an_attention_mask_need_the_opt_in(tmp_path):
    """GPT-2 reads the attention mask's values to choose how to apply it: discovery on such a
    batch is refused by default (before anything moves), and accepted with
    allow_value_dependent=True, its notes saying so."""
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = trainer_for(model, tmp_path)
    trainer.train_dataset = Padded()
    trainer.add_callback(GaugeFixingCallback(trainer, strength=1000.0, every=1))
    with pytest.raises(gaugefix.ValueDependentError, match="read a tensor value") as refused:
        trainer.train()
    message = str(refused.value)  # names the callback's argument, not discover()'s
    assert "GaugeFixingCallback(trainer, ..., allow_value_dependent=True)" in message
    assert "discover()" not in message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    trainer = trainer_for(gpt2(), tmp_path)
    trainer.train_dataset = Padded()
    callback = GaugeFixingCallback(trainer, strength=1000.0, every=1, allow_value_dependent=True)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.steps == 8 and "traced one path" in callback.structure.notes[0]


def test_library_never_imports_transformers():
    code = (
        "import sys, gaugefix, gaugefix.cli, gaugefix.checkpoint, gaugefix.integrations.common\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'accelerate')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_resumed_state_that_does_not_fit_leaves_no_hook_attached(tmp_path):
    """Resuming a run saved inside an interval of 3 steps with ``every=1``: a one-line
    ``ValueError`` naming the checkpoint's state, and no hook left on the optimizer."""
    options = {"save_strategy": "steps", "save_steps": 4, "max_steps": 4}
    train(gpt2(), tmp_path, callback_options={"every": 3}, **options)
    trainer = trainer_for(gpt2(), tmp_path, **{**options, "max_steps": 8})
    trainer.add_callback(GaugeFixingCallback(trainer, strength=1000.0, every=1))
    with pytest.raises(ValueError, match="checkpoint's gauge-fixing state.*does not fit every=1"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert not hooked(integration.torch_optimizer(trainer.optimizer))


def test_penalty_mode_takes_no_every(tmp_path):
    trainer = trainer_for(gpt2(), tmp_path)
    with pytest.raises(ValueError, match="every=3 has no meaning in penalty mode"):
        GaugeFixingCallback(trainer, strength=1.0, mode="penalty", every=3)
    assert GaugeFixingCallback(trainer, strength=1.0, mode="penalty").every == 1


def test_warmup_from_zero_lr_still_balances_at_the_start(tmp_path):
    """The trainer's linear warmup sets lr=0 before the first step; gauge fixing starts then,
    and balances the model (it used to take every group as frozen and balance nothing). The
    first step at lr=0 moves nothing, so the model is still balanced after it."""
    model = gpt2()
    trainer, callback = train(
        model, tmp_path, callback_options={"strength": 1e-3}, max_steps=1, warmup_steps=4
    )
    assert callback.hook is None and callback.steps == 1
    assert gaugefix.imbalance_stats(model, callback.structure)["mu_rel_max"] < 1e-5


class HostReads(TorchDispatchMode):
    """Counts the host reads (``item``, ``int``, ``bool`` of a tensor) dispatched inside it."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_counts_are_read_from_the_device_only_when_a_checkpoint_may_follow(tmp_path):
    """The hook counts its applied steps on the device; the callback reads them (one host read,
    which drains a GPU's queue) at the steps where the trainer saves (every 4 of 8), not at
    every step."""
    trainer = trainer_for(gpt2(), tmp_path, save_strategy="steps", save_steps=4)
    callback = GaugeFixingCallback(trainer, strength=1000.0, every=1, log_every=0)
    trainer.add_callback(callback)
    step_end, reading = callback.on_step_end, []

    def counted(args, state, control, **kwargs):
        with HostReads() as reads:
            step_end(args, state, control, **kwargs)
        if reads.count:
            reading.append(state.global_step)

    callback.on_step_end = counted
    trainer.train()
    assert reading == [4, 8]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_resumed_from_an_epoch_checkpoint_continues_bit_identically(tmp_path):
    """``save_strategy="epoch"`` (8 steps an epoch): the trainer decides to save at the
    epoch's end, after the last step's events; the checkpoint still holds the gauge state, so
    the resumed run neither discovers nor balances again."""
    options = {"save_strategy": "epoch", "max_steps": 16}
    a = gpt2()
    train(a, tmp_path, callback_options={"every": 3}, **options)
    b = gpt2()
    train(b, tmp_path, resume=str(tmp_path / "checkpoint-8"), callback_options={"every": 3},
          **options)  # fmt: skip
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
