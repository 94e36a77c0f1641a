"""Hugging Face ``Trainer``: soft gauge fixing and imbalance logging as a callback.

Needs the optional extra: ``pip install gaugefix[transformers]``.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any, Unpack

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
    from transformers import TrainingArguments as Args
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gaugefix.integrations.transformers needs transformers: "
        "pip install 'gaugefix[transformers]'"
    ) from exc

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gaugefix.integrations.common import (
    CallbackOptions,
    acted_structure,
    callback_repr,
    check_structure_agrees,
    prefixed_stats,
    set_options,
)
from gaugefix.structure import GaugeStructure, ValueDependentError, discover
from gaugefix.train.hook import GaugeFixing, Mode

__all__ = ["decode_structure", "GaugeFixingCallback", "torch_optimizer"]

# The entry of ``TrainerState.stateful_callbacks`` (a checkpoint's ``trainer_state.json``) that
# holds the gauge state of a run.
STATE_KEY = "gaugefix"


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside Accelerate's ``AcceleratedOptimizer`` (the
    ``Trainer``'s wrapper forwards its steps to it; the wrapper's own step hooks never run)."""
    inner = getattr(optimizer, "optimizer", None)
    return torch_optimizer(inner) if isinstance(inner, torch.optim.Optimizer) else optimizer


def encode_structure(structure: GaugeStructure) -> str:
    """:meth:`GaugeStructure.to_dict` as zlib-compressed JSON in base64: one string of a
    checkpoint's ``trainer_state.json`` (about 0.5 MB for GPT-2 small)."""
    raw = json.dumps(structure.to_dict(), separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw)).decode("ascii")


def decode_structure(text: str) -> GaugeStructure:
    """The structure :func:`encode_structure` wrote; ``ValueError`` for JSON nested too deeply
    to parse (``encode_structure`` writes a few levels)."""
    raw = zlib.decompress(base64.b64decode(text))
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("not an encoded GaugeStructure (JSON nested too deeply)") from None
    return GaugeStructure.from_dict(data)


class GaugeFixingCallback(TrainerCallback):
    """Soft gauge fixing (:class:`gaugefix.GaugeFixing`) for a Hugging Face ``Trainer``, with
    :func:`gaugefix.imbalance_stats` logged through ``trainer.log`` (so ``state.log_history`` and
    every ``report_to`` integration get them; keys ``prefix + name``) over the generators the
    hook acts on (:meth:`gaugefix.GaugeFixing.stats`: those touching frozen parameters, a LoRA
    fine-tune's base weights say, left out).

    The callback needs its ``Trainer`` to log through it, so it is added after the trainer is
    built: ``trainer.add_callback(GaugeFixingCallback(trainer, strength=1.0))``.

    - ``structure``: discovered on the model's inputs of the first batch of every ``train()``
      that does not resume when ``None`` (the
      trainer's model itself, ``labels`` included, with the random state restored, so training
      is the same as with the structure given); a given one must be discovered on
      ``trainer.model`` (its parameter names). Hugging Face models that receive an
      ``attention_mask`` read its values in Python to choose how to build the attention mask,
      which :func:`gaugefix.discover` refuses by default (one trace sees one path);
      ``allow_value_dependent=True`` accepts that for discovery on the first batch, when the
      branches only choose how the mask is applied (the structure's ``notes`` record it).
    - :class:`gaugefix.GaugeFixing` (``strength`` and the shared ``options``,
      :class:`~gaugefix.integrations.common.CallbackOptions`) is attached to the
      ``torch.optim`` optimizer the trainer built (inside Accelerate's wrapper) and re-attached
      when the trainer's optimizer is replaced; it acts once per optimizer step (after the
      gradients of all accumulated micro-batches and any clipping), never per micro-batch. It is
      removed when training ends. In exact mode an optimizer whose state an orbit step cannot
      move (transformers' Adafactor, torchao's low-bit AdamW) is refused when it is attached,
      as :class:`gaugefix.GaugeFixing` refuses it. ``balance_at_start``
      balances the model when gauge fixing starts.
    - ``log_every``: ``None`` logs whenever the trainer logs (its ``logging_strategy`` and
      ``logging_steps``), ``n > 0`` every ``n`` optimizer steps, ``0`` never.
    - Checkpoints: the gauge state (the structure, whether gauge fixing started, the hook's
      :meth:`~gaugefix.GaugeFixing.state_dict`: counts and the place in the interval between
      orbit steps) is stored in ``TrainerState.stateful_callbacks["gaugefix"]``, i.e. in every
      checkpoint's ``trainer_state.json``, when the trainer may save next (the counts are read
      from the device then, not at every step). A run resumed from a checkpoint takes the structure
      from there (when none is given) and does not balance again; with the optimizer state the
      trainer restores, it continues as the uninterrupted run would.
    """

    def __init__(
        self,
        trainer: Trainer,
        strength: float,
        *,
        log_every: int | None = None,
        allow_value_dependent: bool = False,
        **options: Unpack[CallbackOptions],
    ) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.structure: GaugeStructure | None
        self.mode: Mode
        set_options(self, strength, options)
        self.allow_value_dependent = bool(allow_value_dependent)
        if log_every is not None and (
            isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0
        ):
            raise ValueError(f"log_every must be an integer >= 0 or None, got {log_every!r}")
        self.trainer = trainer
        self.log_every = log_every
        self.hook: GaugeFixing | None = None
        self.started = False  # gauge fixing started in this run (balanced then): not again
        # the state the next hook continues from (a resumed run's, or a replaced hook's)
        self._carry: dict[str, Any] | None = None
        self._discovery: RemovableHandle | None = None
        self._encoded: tuple[GaugeStructure, str] | None = None
        # discovered or read from a checkpoint by this callback, for the last train()'s model
        self._found: GaugeStructure | None = None
        self._last_logged = -1

    def __repr__(self) -> str:
        return callback_repr(self)

    def _hook_state(self) -> dict[str, Any]:
        if self.hook is not None:
            return self.hook.state_dict()
        return self._carry or {"steps": 0, "skipped": 0, "since": 0, "lr_sums": []}

    @property
    def steps(self) -> int:
        """Gauge-fixing steps applied in this run (resumed runs included)."""
        return self._hook_state()["steps"]

    @property
    def skipped(self) -> int:
        """Gauge-fixing steps skipped (non-finite gradients or parameters)."""
        return self._hook_state()["skipped"]

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Args, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._detach()
        if self not in self.trainer.callback_handler.callbacks:
            raise ValueError(
                "this GaugeFixingCallback belongs to another Trainer: "
                "trainer.add_callback(GaugeFixingCallback(trainer, ...))"
            )
        saved = state.stateful_callbacks.get(STATE_KEY)  # present when resuming a gauge-fixed run
        self.started, self._carry, self._last_logged = False, None, -1
        if self.structure is self._found:  # the earlier train()'s (model_init builds anew)
            self.structure = None
        if saved is not None:
            structure, self.started, self._carry = self._read(saved)
            if self.structure is None:
                self.structure = self._found = structure
        model = self.trainer.model
        if self.structure is None:
            self._discovery = model.register_forward_pre_hook(self._discover, with_kwargs=True)
        else:
            # a structure of another model fails here, before training
            self.structure.bind(model, sharded=True)

    def on_step_begin(
        self, args: Args, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.structure is not None:
            self._attach()

    def on_step_end(
        self, args: Args, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._store_if_saving(state, control)
        if self.log_every is None:
            due = control.should_log
        else:
            due = self.log_every > 0 and state.global_step % self.log_every == 0
        if due:
            self._log(state, control)

    def on_epoch_end(
        self, args: Args, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._store_if_saving(state, control)
        if self.log_every is None and control.should_log:  # logging_strategy="epoch"
            self._log(state, control)

    def on_train_end(
        self, args: Args, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._store(state)  # for a trainer.save_state() after training
        self._detach()

    # -- helpers ----------------------------------------------------------------------------------
    def _read(self, saved: Any) -> tuple[GaugeStructure | None, bool, dict[str, Any]]:
        """The structure (``None`` when one is given: not decoded), whether gauge fixing
        started, and the hook state of a checkpoint's entry; ``ValueError`` for an entry
        :meth:`_store` did not write."""
        try:
            started, hook = saved["started"], saved["hook"]
            given = self.structure is not None
            structure = None if given else decode_structure(saved["structure"])
        except (LookupError, TypeError, ValueError, AttributeError, zlib.error) as err:
            raise ValueError(
                f"the checkpoint's gauge-fixing state (stateful_callbacks[{STATE_KEY!r}]) is "
                f"not one this callback wrote: {type(err).__name__}"
            ) from None
        if not isinstance(started, bool) or not isinstance(hook, dict):
            raise ValueError(
                f"the checkpoint's gauge-fixing state (stateful_callbacks[{STATE_KEY!r}]) is "
                "not one this callback wrote: 'started' must be a bool, 'hook' a dict"
            )
        return structure, started, hook

    @torch.compiler.disable  # run eagerly inside a compiled forward (torch_compile=True)
    def _discover(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook for the first batch: discover the structure on its inputs, then start
        gauge fixing before the forward reads the parameters."""
        self._discovery.remove()
        self._discovery = None
        try:
            self.structure = self._found = discover(
                module, *args, allow_value_dependent=self.allow_value_dependent, **kwargs
            )
        except ValueDependentError as err:  # the argument to pass is this callback's
            raise ValueDependentError(
                f"{err}: GaugeFixingCallback(trainer, ..., allow_value_dependent=True), which "
                "discovers the structure on the first batch (Hugging Face models read the "
                "attention_mask's values to choose how to apply it)"
            ) from None
        self._attach()

    def _attach(self) -> None:
        """Attach :class:`GaugeFixing` to the trainer's optimizer unless it already is."""
        optimizer = torch_optimizer(self.trainer.optimizer)
        if self.hook is not None:
            if self.hook.optimizer is optimizer:
                return
            self._detach()  # the optimizer was rebuilt
        check_structure_agrees(self.structure, next(self.trainer.model.parameters()).device)
        hook = GaugeFixing(
            optimizer,
            self.trainer.model,
            self.structure,
            self.strength,
            mode=self.mode,
            balance_at_start=False,  # once the saved state fits: a refused one moves nothing
            every=self.every,
        )
        if self._carry is not None:
            try:
                hook.load_state_dict(self._carry)
            except ValueError as err:  # a saved state that does not fit (another every or mode)
                hook.remove()
                raise ValueError(f"the checkpoint's gauge-fixing state: {err}") from None
        if self.balance_at_start and not self.started:
            try:
                hook.balance()
            except Exception:  # e.g. non-finite parameters: no hook stays attached
                hook.remove()
                raise
        self.hook, self.started = hook, True

    def _detach(self) -> None:
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None
        if self.hook is not None:
            self._carry = self.hook.state_dict()
            self.hook.remove()
            self.hook = None

    def _store_if_saving(self, state: TrainerState, control: TrainerControl) -> None:
        """:meth:`_store` when the trainer may save a checkpoint after this event (a save, or an
        evaluation that may find a new best model): the counts are read from the device only
        then, not at every step."""
        if control.should_save or control.should_evaluate:
            self._store(state)

    def _store(self, state: TrainerState) -> None:
        """The gauge state, where the trainer writes it into ``trainer_state.json`` (none
        before a structure is known)."""
        if self.structure is None:
            return
        state.stateful_callbacks[STATE_KEY] = {
            "structure": self._encoded_structure(),
            "started": self.started,
            "hook": self._hook_state(),
        }

    def _log(self, state: TrainerState, control: TrainerControl) -> None:
        """``trainer.log`` the statistics; the trainer's own decision to log this step (which
        its ``on_log`` event resets) is kept."""
        if self.structure is None or state.global_step == self._last_logged:
            return
        self._last_logged = state.global_step
        should_log = control.should_log
        acted = acted_structure(self.structure, [self.hook] if self.hook is not None else [])
        self.trainer.log(prefixed_stats(self.trainer.model, acted, self.prefix))
        self.trainer.control.should_log = control.should_log = should_log

    def _encoded_structure(self) -> str:
        if self._encoded is None or self._encoded[0] is not self.structure:
            self._encoded = (self.structure, encode_structure(self.structure))
        return self._encoded[1]
