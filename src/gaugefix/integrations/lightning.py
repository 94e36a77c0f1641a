"""PyTorch Lightning: soft gauge fixing and imbalance logging as a callback.

Needs the optional extra: ``pip install gaugefix[lightning]``.
"""

from __future__ import annotations

from typing import Any, Unpack

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package name
    try:
        from pytorch_lightning import LightningModule, Trainer
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "gaugefix.integrations.lightning needs PyTorch Lightning: "
            "pip install 'gaugefix[lightning]'"
        ) from exc

import torch

from gaugefix.action import check_finite_params
from gaugefix.integrations.common import (
    CallbackOptions,
    acted_structure,
    callback_repr,
    check_structure_agrees,
    prefixed_stats,
    set_options,
)
from gaugefix.structure import GaugeStructure, discover
from gaugefix.train.hook import GaugeFixing, Mode

__all__ = ["GaugeFixingCallback"]


def _discover(trainer: Trainer, pl_module: LightningModule, example: Any) -> GaugeStructure:
    """:func:`gaugefix.discover` on ``example_input_array`` as Lightning calls ``forward`` with
    it (a tuple or list unpacked, a dict as keyword arguments), converted as the trainer
    converts batches (its precision's dtype: float64 under ``"64-true"``) and moved to the
    module's device."""
    example = trainer.precision_plugin.convert_input(example)
    if isinstance(example, dict):
        args, kwargs = (), example
    else:
        args, kwargs = (tuple(example) if isinstance(example, tuple | list) else (example,)), {}

    def place(x: Any) -> Any:
        return x.to(pl_module.device) if torch.is_tensor(x) else x

    args, kwargs = tuple(map(place, args)), {k: place(v) for k, v in kwargs.items()}
    return discover(pl_module, *args, **kwargs)


def _check_restored(restored: tuple[list[dict[str, Any]], int], count: int, hooks: int) -> None:
    """``ValueError`` unless a checkpoint's ``(hook states, optimizers)`` fit a fit with
    ``count`` optimizers and ``hooks`` hooks (one over all of them, or one per optimizer)."""
    states, covered = restored
    if covered != count:
        raise ValueError(
            f"the checkpoint holds the gauge-fixing states of {covered} optimizers, "
            f"this fit has {count}"
        )
    if len(states) != hooks:
        raise ValueError(
            f"the checkpoint holds {len(states)} gauge-fixing states for {count} optimizers, "
            f"this fit has {hooks} (exact mode: one over all optimizers; penalty mode: one per "
            "optimizer), so it cannot continue them exactly"
        )


class GaugeFixingCallback(Callback):
    """Attach :class:`gaugefix.GaugeFixing` to every optimizer of a Lightning fit, and log
    :func:`gaugefix.imbalance_stats` through the Lightning logger (``pl_module.log_dict``, keys
    ``prefix + name``, at the training batches whose values the loggers write: every
    ``Trainer(log_every_n_steps=...)`` steps) over the generators the hooks act on
    (:func:`~gaugefix.integrations.common.acted_structure`: those touching frozen parameters,
    a LoRA fine-tune's base weights say, left out).

    ``structure`` must be discovered on the ``LightningModule`` itself (its parameter names are
    the module's); when it is ``None`` it is discovered when each fit starts (after
    ``configure_model``) from the module's ``example_input_array`` (as ``forward`` takes it:
    a dict as keyword arguments; converted to the trainer's precision as batches are).
    ``options`` are the callbacks' shared
    :class:`~gaugefix.integrations.common.CallbackOptions`; ``strength`` and them are passed
    to :class:`gaugefix.GaugeFixing` (``strength=0`` balances at the start, unless
    ``balance_at_start=False``, then only logs). The hooks are attached when training starts
    (after any checkpoint restored the optimizer state; in a run of several processes, once
    the structure is checked to be the same on every one) and removed when it
    ends; a fit resumed
    from a Lightning checkpoint (``ckpt_path``, also one saved after the fit) does not balance
    again and continues each hook's place in the interval between orbit steps. With several
    optimizers, exact mode attaches one :class:`gaugefix.GaugeFixing` over all of them (the
    orbit step once per training step, after every one stepped; generators spanning two
    optimizers included); penalty mode, which ``GaugeFixing`` takes with one optimizer only,
    attaches one hook per optimizer, each acting on the generators whose parameters its
    optimizer holds and balancing them at the start with its own optimizer's state.
    In exact mode an optimizer whose state an orbit step cannot move (transformers' Adafactor,
    torchao's low-bit AdamW) is refused when training starts, as :class:`gaugefix.GaugeFixing`
    refuses it.
    """

    def __init__(
        self,
        strength: float,
        *,
        log_stats: bool = True,
        **options: Unpack[CallbackOptions],
    ) -> None:
        super().__init__()
        self.structure: GaugeStructure | None
        self.mode: Mode
        set_options(self, strength, options)
        self._discovered: GaugeStructure | None = None  # by this callback, for the last fit
        self.log_stats = log_stats
        self.hooks: list[GaugeFixing] = []
        # a checkpoint's hook states, and the number of optimizers they cover
        self._restored: tuple[list[dict[str, Any]], int] | None = None
        self._optimizers = 0  # the number of optimizers the hooks (or the last ones) cover
        self._last: list[dict[str, Any]] = []  # the removed hooks' states, saved after a fit

    def __repr__(self) -> str:
        return callback_repr(self)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Discover or check the structure once the module is built (after ``configure_model``,
        which may create its layers). One discovered here belongs to this fit's module: the next
        fit (perhaps of another module with the same parameter names) discovers again."""
        if self.structure is None or self.structure is self._discovered:
            example = pl_module.example_input_array
            if example is None:
                raise ValueError(
                    "GaugeFixingCallback needs a structure, or example_input_array on the "
                    "LightningModule to discover one"
                )
            self.structure = self._discovered = _discover(trainer, pl_module, example)
        # a structure of another model fails here, before fitting
        self.structure.bind(pl_module, sharded=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach the hooks; a fit resumed from a checkpoint does not balance again and continues
        each hook's counts and interval between orbit steps."""
        self._remove()
        restored, self._restored, self._last = self._restored, None, []
        optimizers = list(trainer.optimizers)
        # exact mode: one hook over several optimizers; penalty mode: one per optimizer
        targets = [optimizers] if self.mode == "exact" and len(optimizers) > 1 else optimizers
        if restored is not None:
            _check_restored(restored, len(optimizers), len(targets))
        check_structure_agrees(self.structure, pl_module.device)
        self._optimizers = len(optimizers)
        try:  # every hook first, so that one refused leaves the model as it was
            for i, opt in enumerate(targets):
                self.hooks.append(
                    GaugeFixing(
                        opt,
                        pl_module,
                        self.structure,
                        self.strength,
                        mode=self.mode,
                        balance_at_start=False,
                        every=self.every,
                    )
                )
                if restored is not None:
                    self.hooks[-1].load_state_dict(restored[0][i])
            if self.balance_at_start and restored is None:
                self._balance()
        except Exception:  # e.g. a restored state that does not fit: no hook stays attached
            self._remove()
            self._last = []
            raise

    def _balance(self) -> None:
        """Balance each hook's generators (:meth:`GaugeFixing.balance`) once every hook is
        attached; nothing moves unless every hook's parameters are finite."""
        for hook in self.hooks:
            check_finite_params(hook.params)
        for hook in self.hooks:
            hook.balance()

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: each hook's :meth:`GaugeFixing.state_dict` (after the
        fit: as the hooks left it) as ``hooks``, and the number of optimizers they cover as
        ``optimizers`` (several in exact mode: one state over all of them)."""
        hooks = [hook.state_dict() for hook in self.hooks] or self._last
        return {"hooks": hooks, "optimizers": self._optimizers if hooks else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``ValueError``, nothing restored, for anything else); the
        hooks load their states when training starts. A state without ``optimizers`` (written
        with one hook per optimizer) covers one optimizer per hook state."""
        hooks = state_dict.get("hooks") if isinstance(state_dict, dict) else None
        if not isinstance(hooks, list) or not all(isinstance(h, dict) for h in hooks):
            raise ValueError(
                "not a GaugeFixingCallback state (a dict whose 'hooks' is a list of "
                f"GaugeFixing states): {type(state_dict).__name__}"
            )
        count = state_dict.get("optimizers", len(hooks))
        if type(count) is not int or (hooks and len(hooks) not in (1, count)):
            raise ValueError(
                f"not a GaugeFixingCallback state: {len(hooks)} hook states for "
                f"{count!r} optimizers (one over all of them, or one per optimizer)"
            )
        self._restored = (list(hooks), count) if hooks else None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # Only where the loggers write this batch's values (Lightning's own LearningRateMonitor
        # asks the same): the statistics cost a pass over the parameters and one host read.
        if self.log_stats and trainer._logger_connector.should_update_logs:
            pl_module.log_dict(
                prefixed_stats(pl_module, acted_structure(self.structure, self.hooks), self.prefix),
                on_step=True,
                on_epoch=False,
                logger=True,
                prog_bar=False,
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        if self.hooks:
            self._last = [hook.state_dict() for hook in self.hooks]
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
