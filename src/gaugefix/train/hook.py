"""``GaugeFixing``: soft gauge fixing attached to an unchanged ``torch.optim`` training loop."""

from __future__ import annotations

import logging
import math
import operator
import weakref
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gaugefix.action import (
    Optimizers,
    check_transport,
    finite_on_device,
    optimizers,
    untransportable_state,
)
from gaugefix.balancing import balance_
from gaugefix.distributed import (
    check_same_structure,
    first_dtensor,
    local_view,
    mesh_group,
    refuse_gathered,
    sharded,
)
from gaugefix.errors import check_count, check_number
from gaugefix.moment import imbalance_stats
from gaugefix.soft import (
    FROZEN_REASON,
    add_orbit_selection_grad_,
    check_rate,
    check_strength,
    relax_unchecked_,
)
from gaugefix.step import EVERY, OrbitState, advance, check_every
from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import check_structure, unwrap_model, wrappers

__all__ = [
    "Mode",
    "unwrap_model",
    "check_mode_every",
    "GaugeFixing",
    "options_repr",
]

Mode = Literal["exact", "penalty"]
logger = logging.getLogger(__name__)
# What the frozen flags and the float16 range check read from each parameter at every step.
_FLAGS = operator.attrgetter("requires_grad", "dtype")
# The GaugeFixing hook attached to each optimizer (one at most).
_attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, GaugeFixing] = (
    weakref.WeakKeyDictionary()
)


def _replicated(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper among ``model``'s wrappers, or ``None``."""
    ddp = nn.parallel.DistributedDataParallel
    return next((m for m in wrappers(model) if isinstance(m, ddp)), None)


def options_repr(mode: Mode, strength: float, every: int) -> str:
    """The options of a gauge-fixing hook or callback as their reprs show them."""
    return f"mode={mode!r}, strength={strength}, every={every}"


def check_mode_every(mode: Mode, every: int | None) -> int:
    """``every`` for ``mode`` (``None``: :data:`EVERY` in exact mode, 1 in penalty mode, which
    acts at every step), or ``ValueError`` for a bad ``mode``, an ``every`` that is not an
    integer ``>= 1``, or one other than 1 given in penalty mode."""
    if mode not in ("exact", "penalty"):
        raise ValueError(f"mode must be 'exact' or 'penalty', got {mode!r}")
    if every is None:
        return EVERY if mode == "exact" else 1
    check_every(every)
    if mode == "penalty" and every != 1:
        raise ValueError(
            f"every={every} has no meaning in penalty mode, which adds the penalty's gradient "
            "at every step: leave every out (or give 1), or use mode='exact'"
        )
    return every


def _check_same_left_out(params: dict[str, Tensor], active: GaugeStructure) -> None:
    """FSDP2 (``DTensor`` ``params``): :class:`~gaugefix.distributed.ShardingError` on every
    process unless all act on the same generators (parameters frozen alike on every process),
    by one all-reduce; nothing for other parameters."""
    if sharded(params.values()):
        like = first_dtensor(list(params.values()))
        check_same_structure(active, mesh_group(like), like.device)


def _frozen_by_lr(group: dict[str, Any]) -> bool:
    """Whether a parameter group is frozen by its learning rate: ``lr == 0``, and so is the
    ``initial_lr`` a ``torch.optim.lr_scheduler`` recorded (a warmup from 0 does not freeze).
    A tensor is never read on the host: its group counts as training."""
    lrs = (group["lr"], group.get("initial_lr", 0.0))
    return all(not isinstance(lr, Tensor) and lr == 0 for lr in lrs)


def _refuse_line_search(optimizer: torch.optim.Optimizer, mode: Mode) -> None:
    """``ValueError`` for L-BFGS with a line search in penalty mode: its line search compares
    the losses the closure returns, which do not include the penalty, with directional
    derivatives of gradients that do."""
    if mode == "penalty" and isinstance(optimizer, torch.optim.LBFGS):
        if optimizer.defaults.get("line_search_fn") is not None:
            raise ValueError(
                "GaugeFixing(mode='penalty') does not support L-BFGS with a line search (the "
                "closure's loss does not include the penalty): use line_search_fn=None"
            )


def _refuse_untransportable(
    optimizer: torch.optim.Optimizer, mode: Mode, params: dict[str, Tensor]
) -> None:
    """``ValueError`` in exact mode for an optimizer whose state, made at its first step, no
    orbit step transports (:func:`gaugefix.action.untransportable_state`: a class of
    ``UNTRANSPORTABLE_STATE`` or a subclass, torch's Adagrad or RMSprop with a setting whose
    state does not move): at construction, not at its first orbit step, after ``every`` steps
    of training (torchao's quantized state failed there with a ``NotImplementedError``)."""
    if mode != "exact":
        return
    found = untransportable_state(optimizer, params)
    if found is not None:
        name, state = found
        raise ValueError(
            f"GaugeFixing(mode='exact') cannot transport optimizer state ({state}) of "
            f"{name}, made at its first step; use mode='penalty', which moves no "
            "state, or an optimizer with momentum or Adam moments"
        )


def _refuse_sparse(model: nn.Module, params: dict[str, Tensor]) -> None:
    """``ValueError`` naming a parameter of ``params`` that gets sparse gradients (the weight of
    an ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True``), which the hook can neither
    check, add to nor transport."""
    names = {id(p): name for name, p in params.items()}
    for module in model.modules():
        sparse = isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse
        if sparse and id(module.weight) in names:
            raise ValueError(
                f"parameter {names[id(module.weight)]!r} gets sparse gradients (sparse=True), "
                "which GaugeFixing cannot check or move: use sparse=False"
            )


def _check_optimizers(optimizer: Optimizers, model: nn.Module, mode: Mode) -> tuple:
    """``optimizer`` (one, or a non-empty list or tuple) as a tuple: ``TypeError`` for an entry
    that is not a ``torch.optim.Optimizer``; ``ValueError`` for one listed twice, one already
    hooked or holding no parameter of ``model``, and, when several are given, penalty mode (each
    optimizer's own loss scale and closure would take the penalty's gradient)."""
    if not isinstance(optimizer, torch.optim.Optimizer | list | tuple):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    opts = optimizers(optimizer)
    if not opts:
        raise ValueError("GaugeFixing needs an optimizer: got an empty list")
    if any(opt in _attached for opt in opts):
        raise ValueError(
            "this optimizer already has a GaugeFixing hook; call .remove() on it first"
        )
    own = {id(p) for p in model.parameters()}
    for i, opt in enumerate(opts):
        if not any(id(p) in own for g in opt.param_groups for p in g["params"]):
            which = f"optimizer {i}" if len(opts) > 1 else "the optimizer"
            raise ValueError(f"{which} holds no parameter of the model (built for another?)")
    if len(opts) > 1:
        if mode == "penalty":
            raise ValueError(
                "GaugeFixing(mode='penalty') takes one optimizer; with several use mode='exact'"
            )
        _refuse_shared(opts, model)
    return opts


def _refuse_shared(opts: tuple, model: nn.Module) -> None:
    """``ValueError`` naming a parameter of ``model`` that two of ``opts`` hold (both would
    step it, and its learning rate, which sets its generators' rate, would be ambiguous)."""
    holder: dict[int, int] = {}
    names = {id(p): name for name, p in model.named_parameters()}
    for i, opt in enumerate(opts):
        for p in (id(p) for g in opt.param_groups for p in g["params"]):
            if holder.setdefault(p, i) != i:
                raise ValueError(
                    f"parameter {names.get(p, '(not of the model)')!r} is held by optimizers "
                    f"{holder[p]} and {i}: each would step it; give each parameter to one"
                )


def _refuse_optimizers(
    opts: tuple, model: nn.Module, mode: Mode, params: dict[str, Tensor]
) -> None:
    """The refusals of :class:`GaugeFixing` for the optimizers ``opts`` and bound ``params``
    (``ValueError``, nothing changed): state that cannot move, L-BFGS's line search in penalty
    mode, sparse gradients."""
    check_transport(opts, params)
    for opt in opts:
        _refuse_line_search(opt, mode)
        _refuse_untransportable(opt, mode, params)
    _refuse_sparse(model, params)


def _negate_(tensors: list[Tensor]) -> None:
    """``t <- -t`` for each of ``tensors`` (exact), in one fused call."""
    if tensors:
        torch._foreach_neg_(tensors)


def _least(sums: tuple[float | Tensor, ...]) -> float | Tensor:
    """The least of ``sums`` (on the device when one is a tensor: no host read)."""
    if any(isinstance(s, Tensor) for s in sums):
        like = next(s for s in sums if isinstance(s, Tensor))
        return torch.stack(
            [torch.as_tensor(s, dtype=like.dtype, device=like.device) for s in sums]
        ).amin()
    return min(sums)


# Per optimizer, its parameter groups (the group objects, in order), and the identities of each
# one's parameters when read (a group's list may change in place): ``_snapshot``.
_Groups = tuple[dict[str, Any], ...]
_Held = tuple[tuple[int, ...], ...]
_Snapshot = tuple[_Groups, _Held]


def _snapshot(groups: Any) -> _Snapshot:
    """An optimizer's ``param_groups`` now: the group objects and their parameters' ids."""
    groups = tuple(groups)
    return groups, tuple(tuple(map(id, g["params"])) for g in groups)


def _matched(old: _Snapshot, new: _Snapshot) -> list[int | None]:
    """Per group of ``new``, the index in ``old`` of the same group: the same object, else the
    one that held the same parameters (by identity, in order; ``load_state_dict`` rebuilds the
    group objects; groups of equal parameters, empty ones, in order), else ``None`` (a group
    added); each of ``old`` matched once at most."""
    by_object = {id(g): i for i, g in enumerate(old[0])}
    found = [by_object.get(id(g)) for g in new[0]]
    if None in found:  # by the parameters
        free: dict[tuple[int, ...], list[int]] = {}
        for i in sorted(set(range(len(old[0]))) - set(found), reverse=True):
            free.setdefault(old[1][i], []).append(i)
        for k, ids in enumerate(new[1]):
            same = free.get(ids) if found[k] is None else None
            found[k] = same.pop() if same else found[k]
    taken: set[int | None] = {None}
    for k, i in enumerate(found):
        found[k] = None if i in taken else i
        taken.add(i)
    return found


def _followed_part(part: tuple, old: _Snapshot, new: _Snapshot) -> list:
    """One optimizer's sums ``part``, of its groups ``old``, for its groups ``new``
    (:func:`_followed`)."""
    found = _matched(old, new)
    if len({i for i in found if i is not None}) < len(old[0]):  # a group removed
        part = (_least(part),) * len(old[0])
    known = {key for ids in old[1] for key in ids}  # the parameters it held
    sums = []
    for i, ids in zip(found, new[1], strict=True):
        if i is None or not known.issuperset(ids):  # added, or a parameter from elsewhere
            sums.append(0.0)
        elif set(ids) <= set(old[1][i]):  # the same parameters, or fewer
            sums.append(part[i])
        else:  # a parameter moved in from another of its groups
            sums.append(_least(part))
    return sums


def _followed(
    orbit: OrbitState, before: tuple[_Snapshot, ...], now: tuple[_Snapshot, ...]
) -> OrbitState:
    """``orbit``, whose sums are those of the groups ``before`` (per optimizer its
    :func:`_snapshot`), for the groups ``now``: each group of ``now`` takes the sum of its group
    of ``before`` (:func:`_matched`: groups reordered, rebuilt or that lost parameters keep
    theirs); a group added, or holding a parameter that none of its optimizer's groups held,
    0 (its sum starts at its first step); one holding a parameter moved in from another group
    of its optimizer, the least of that optimizer's sums; when a group of an optimizer was
    removed (its parameters may sit in the others now), every one of that optimizer's groups
    kept takes the least of its sums. No parameter's own sum since the last orbit step is
    below its group's."""
    if orbit.lr_sum is None:
        return orbit
    sums, start, parts = orbit.lr_sum, 0, []
    for old, new in zip(before, now, strict=True):
        part = sums[start : start + len(old[0])]
        start += len(old[0])
        same = old[1] == new[1] and all(map(operator.is_, old[0], new[0]))
        parts += part if same and len(old[0]) == len(new[0]) else _followed_part(part, old, new)
    return orbit._replace(lr_sum=tuple(parts))


class GaugeFixing:
    """Soft gauge fixing for any ``torch.optim`` optimizer, through its step hooks.

    After construction an unchanged loop (``loss.backward(); optimizer.step()``) is gauge-fixed:

    - ``mode="exact"`` (default): after every ``every``-th step (default :data:`EVERY`),
      :func:`gaugefix.relax_` moves the model along its orbits by ``h = -rate * mu`` with
      ``rate = strength * (the sum of the learning rates of the steps since the last one)`` (the
      decoupled form, like AdamW's weight decay): the function the step produced is kept to
      rounding, and the step's state (``.grad``, momentum, Adam moments) is transported with the
      parameters. An optimizer step changes ``mu`` by ``O(lr^2)``, so ``every`` steps of drift
      relaxed at once at ``every`` times the rate act like a step at each (``every=1``), at
      ``1 / every`` of the cost. Before every step a learning rate that is not a finite number
      ``>= 0`` is refused (``ValueError`` naming its group; the optimizer step is not taken).
    - ``mode="penalty"``: before every step, ``grad P`` of
      ``P = (strength / 4) sum_n mu_n^2`` is added to ``.grad`` (the explicit form; the optimizer
      then treats it like any gradient, so with Adam it is preconditioned; in a group with
      ``maximize=True``, which steps along ``+grad``, it is subtracted, so that ``P`` is still
      descended). It acts at every step: an ``every`` other than 1 is refused (``ValueError``).

    Frozen parameters: a generator that acts on a parameter the optimizer does not hold, one with
    ``requires_grad=False``, or one in a parameter group with ``lr=0`` (and ``initial_lr=0`` if
    a scheduler recorded one: a warmup from 0 freezes nothing), is left out (the hook acts
    on the subgroup the other generators generate, :meth:`GaugeStructure.restrict`): the start
    balancing, the exact step and the penalty never move it, so frozen parameters stay bit-identical
    and their ``.grad`` is left alone. ``left_out`` counts the generators left out per reason
    (logged once whenever it changes); :meth:`stats` measures the imbalance of :attr:`active`
    alone, the generators gauge fixing moves; parameters added with ``optimizer.add_param_group`` or
    moved between groups and ``requires_grad`` or ``lr`` changes are followed at every step.
    Parameters the structure does not cover are never touched.

    Several parameter groups: generator ``n`` relaxes at ``strength * min_g S_g``, the least
    over the groups ``g`` holding a parameter it touches (its incoming and outgoing entries) of
    ``S_g = sum_t lr_g(t)``, the group's learning rates summed over the steps since the last orbit
    step (read at every step, so schedulers are followed; the least of the sums, not of each
    step's rates). Groups changed mid-interval (added, removed, a parameter added or moved in
    place) get sums that no parameter's own sum since the last orbit step is below. A tensor
    ``lr`` stays on its device (no host read; its group is never taken as frozen by its value;
    a generator whose rate from it is negative or not finite is not moved).

    The penalty's gradient, when an orbit step is due and the sum of learning rates it takes
    (:func:`gaugefix.step.advance`) are those of :mod:`gaugefix.step`, which the sweep engine
    steps its runs with.

    ``balance_at_start=True`` balances the model (:func:`gaugefix.balance_`, with optimizer
    state transport) once, now. If any gauged gradient is non-finite before a step that gauge
    fixing acts on, or any gauged parameter after it (penalty mode: before it), that step's
    gauge fixing is skipped: nothing is added or moved (counted in ``skipped``; applied orbit
    steps or penalty gradients in ``steps``; a skipped orbit step's rate is dropped). With
    float16 parameters an orbit step is also skipped unless a per-tensor bound (each moved
    tensor's largest entry times the largest factor its generators give it,
    :func:`gaugefix.action.in_range_by_tensor`) proves that it keeps the parameters, their
    gradients and optimizer state below 65504: checked on the device, one pass over those
    tensors. Steps it does not act on are not checked. A fused
    optimizer stepped by ``torch.amp.GradScaler`` gets
    its gradients still scaled (``optimizer.grad_scale``): the penalty's gradient is added
    scaled alike. With
    ``optimizer.step(closure)`` (Lightning calls it so) the closure is wrapped so that this
    happens after it computed the gradients, i.e. after any gradient clipping done inside it;
    in penalty mode ``grad P`` is added at each closure evaluation (the returned loss does not
    include ``P``, so L-BFGS with a line search is refused).
    ``model`` may be wrapped in ``DistributedDataParallel``, ``DataParallel`` or
    ``torch.compile``; every rank computes the same relaxation from the same (all-reduced)
    parameters, so ranks stay equal
    (given the ``DistributedDataParallel`` wrapper, the structure is checked to be the same on
    every rank, :func:`gaugefix.distributed.check_same_structure`, once; with FSDP2 ``DTensor``
    parameters, that every process leaves out the same frozen generators, once).
    Optimizer state that cannot be transported (L-BFGS's history, wherever it is kept) and
    parameters with sparse gradients are refused (``ValueError``).
    ``remove()`` detaches the hooks. An optimizer takes one ``GaugeFixing`` at a time: a second
    is refused (``ValueError``, nothing changed) until the first is removed.

    Several optimizers (a list: Muon over the weight matrices and AdamW over the rest, say), in
    exact mode: one hook on each, the orbit step taken once per training step, after every one
    stepped since the last (in any order; one stepping again before the others counts once, at its
    last learning rates), with every optimizer's state transported. Their parameter groups count as
    one list, in the order given (``state_dict``'s ``lr_sums``, learning-rate errors): a generator
    whose parameters sit in groups of different optimizers relaxes at ``strength * min_g S_g`` over
    them, as for several groups of one optimizer (a group added to one mid-interval, also after a
    state was loaded or between two optimizers' steps, sums from its first step, also one inserted
    first; the others keep theirs; ``state_dict`` records the parameter count and the parameters'
    names of each group of each optimizer, and a state that does not fit them, optimizers in another
    order say, is refused; groups reordered or rebuilt over the same parameters keep their sums,
    also between two optimizers' steps; one optimizer's step waiting for another's is recorded too,
    with its gradients' check). The gradients each optimizer step takes (of the acted-on parameters
    it holds) are checked at that step, at every step of the training step (one optimizer stepping
    twice, as a GAN's discriminator, included): one non-finite skips the orbit step, as with one
    optimizer (the orbit step reads only parameters, checked after, but a step that ``GradScaler``
    skips inside a fused optimizer shows only in its gradients). An optimizer stepping again while
    another has not is logged once (one that never steps stops gauge fixing). An optimizer listed
    twice, one holding no parameter of ``model``, a parameter two hold, and penalty mode (each
    optimizer's closure and loss scale would take the penalty) are refused (``ValueError``, nothing
    attached). The hooks run eagerly in a compiled ``optimizer.step``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        model: nn.Module,
        structure: GaugeStructure,
        strength: float,
        mode: Mode = "exact",
        balance_at_start: bool = True,
        every: int | None = None,
    ) -> None:
        every = check_mode_every(mode, every)
        self.optimizers = _check_optimizers(optimizer, unwrap_model(model), mode)
        self.optimizer = optimizer
        self.model = unwrap_model(model)
        self.structure = check_structure(structure)
        replicated = _replicated(model)
        if replicated is not None:  # every replica must move alike
            check_same_structure(structure, replicated.process_group, replicated.device)
        self.strength = check_strength(strength)
        self.mode = mode
        self.every = every
        # Optimizer steps since the last orbit step, and per group the sum of their lrs.
        self._orbit = OrbitState()
        self._all_params = structure.bind(self.model, sharded=True)
        refuse_gathered(self.model, self._all_params)  # FSDP2: parameters gathered now
        local_view(self._all_params, structure)  # FSDP2: an unsupported sharding is refused now
        _refuse_optimizers(self.optimizers, self.model, mode, self._all_params)
        self._frozen: tuple[bool, ...] | None = None
        self._group_ids: tuple[tuple[int, ...], ...] | None = None  # each group's, by identity
        self._param_list = list(self._all_params.values())
        # What the frozen flags were last computed from: lr == 0 per group, and per parameter
        # (requires_grad, dtype).
        self._signature: tuple[tuple[bool, ...], tuple[tuple[bool, torch.dtype], ...]] | None = None
        self._held: dict[int, int] = {}  # id of each parameter the optimizer holds -> group
        self.active = structure
        self.active_mask = torch.ones(structure.num_generators, dtype=torch.bool)  # of structure
        self.params = self._all_params
        self.left_out: dict[str, int] = {}
        self._refresh()
        _check_same_left_out(self._all_params, self.active)
        self._acted = 0  # steps gauge fixing acted on (applied or skipped)
        self._applied: int | Tensor = 0  # of those, applied: a device count, read when asked
        # Whether this step's gradients were finite (exact mode: on the device), or whether
        # the penalty's gradient was added (penalty mode).
        self._ok: Tensor | bool | None = None
        if balance_at_start:
            self.balance()
        self._attach()

    def _attach(self) -> None:
        """Register the step hooks on every optimizer, with the state of an open training step."""
        # Per optimizer that stepped since the last orbit step (or since the last training
        # step), its group objects and their learning rates at its step: a training step is
        # complete when all did.
        self._stepped: dict[int, tuple[_Snapshot, tuple[float | Tensor, ...]]] = {}
        # Per optimizer, its groups at the sums' last step, or those a loaded state's sums
        # cover (:func:`_snapshot`; the group objects kept alive: ids stay theirs), and the
        # groups' ids with their parameters' ids.
        self._last_groups: tuple[_Snapshot, ...] | None = None
        self._last_ids: tuple[tuple[tuple[int, ...], _Held], ...] | None = None
        self._warned_open = False  # whether an optimizer stepping twice in one step was logged
        self._handles = [
            handle
            for opt in self.optimizers
            for handle in (
                # eager inside a compiled ``opt.step`` (``torch.compile`` cannot trace the hooks)
                opt.register_step_pre_hook(torch.compiler.disable(self._pre_step)),
                opt.register_step_post_hook(torch.compiler.disable(self._post_step)),
            )
        ]
        _attached.update(dict.fromkeys(self.optimizers, self))

    def __repr__(self) -> str:
        return (
            f"GaugeFixing({options_repr(self.mode, self.strength, self.every)}, "
            f"generators={self.active.num_generators}, left_out={sum(self.left_out.values())}, "
            f"steps={self.steps}, skipped={self.skipped})"
        )

    # -- frozen parameters ----------------------------------------------------------------------
    def _refresh(self) -> None:
        """Restrict to the generators acting only on parameters the optimizer holds with
        ``requires_grad`` in a group with ``lr != 0``, when that set changed since the last
        call (cheap otherwise: the groups' parameters by identity, the groups' frozen flags and
        the parameters' ``requires_grad`` and dtypes, compared with the last call's); whether
        an acted-on parameter is float16 (the range check of an orbit step), re-read whenever
        a dtype changed (``model.half()`` keeps the parameters)."""
        groups = self._groups()
        regrouped = self._follow_groups(groups)
        zero_lr = tuple(map(_frozen_by_lr, groups))
        signature = (zero_lr, tuple(map(_FLAGS, self._param_list)))
        if not regrouped and signature == self._signature:
            return
        self._signature = signature
        frozen = tuple(
            (i := self._held.get(id(p))) is None or not p.requires_grad or zero_lr[i]
            for p in self._param_list
        )
        if frozen != self._frozen:
            self._restrict(frozen, zero_lr)
        elif regrouped:  # the same generators, their parameters in other groups
            self._group_of, self._rate_cache = self._param_groups(), None
        self._float16 = any(p.dtype == torch.float16 for p in self.params.values())

    def _restrict(self, frozen: tuple[bool, ...], zero_lr: tuple[bool, ...]) -> None:
        """Restrict :attr:`active` to the generators touching no parameter ``frozen`` flags
        (by reason: not held by the optimizer, ``requires_grad=False``, in a group of
        ``zero_lr``), and log what is left out."""
        self._frozen = frozen
        unheld = {n for n, p in self._all_params.items() if id(p) not in self._held}
        no_grad = {n for n, p in self._all_params.items() if not p.requires_grad} - unheld
        still = {
            n for n, p in self._all_params.items() if n not in unheld and zero_lr[self._held[id(p)]]
        } - no_grad
        active, left_out = self.structure, {}
        mask = torch.ones(self.structure.num_generators, dtype=torch.bool)
        for names, reason in (
            (unheld, "touching a parameter the optimizer does not hold"),
            (no_grad, FROZEN_REASON),
            (still, "touching a parameter whose optimizer group has lr=0"),
        ):
            touched = active.touching(names)
            if bool(touched.any()):
                left_out[reason] = int(touched.sum())
                active = active.restrict(~touched, reason)
                mask[mask.clone()] = ~touched  # the kept ones of those kept so far
        self.active, self.active_mask, self.left_out = active, mask, left_out
        self.params = active.bind(self._all_params, sharded=True)  # FSDP2: the DTensors
        self._checked = list(self.params.values())  # what each step checks, bound with them
        self._group_of = self._param_groups()
        self._rate_cache = None
        if left_out:
            logger.warning(
                "GaugeFixing acts on %d of %d generators; left out: %s",
                active.num_generators,
                self.structure.num_generators,
                "; ".join(f"{count} {reason}" for reason, count in left_out.items()),
            )

    def _follow_groups(self, groups: list[dict[str, Any]]) -> bool:
        """Re-read which group holds each parameter (``_held``) when the groups' parameters
        changed (compared by identity, in order: a group added or removed, a parameter added,
        moved or swapped between groups); whether it was re-read. The structure's parameters
        stay alive (``_all_params``), so no other object can take one's identity."""
        held = tuple(tuple(map(id, g["params"])) for g in groups)
        if held == self._group_ids:
            return False
        self._group_ids = held
        self._held = {key: i for i, ids in enumerate(held) for key in ids}
        return True

    # -- hooks ------------------------------------------------------------------------------------
    def _pre_step(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Without a closure the gradients are ready now; with one (``step(closure)``, as in
        Lightning), they exist only once it ran, so it is wrapped. Exact mode: a bad learning
        rate is refused here, before the optimizer step."""
        if self.mode == "exact":
            self._check_lrs()
        if self._orbit.since + 1 < self.every:  # a training step gauge fixing does not act on
            return None
        # ``args`` starts with the optimizer itself: ``step(closure)`` has it at ``args[1]``.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._gradients_ready(optimizer)
            return None

        def closure_then_gauge() -> Any:
            loss = closure()
            self._gradients_ready(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_gauge}
        return (args[0], closure_then_gauge, *args[2:]), kwargs

    def _check_lrs(self) -> None:
        """``ValueError`` naming the group unless every group's learning rate is a finite number
        ``>= 0`` (a tensor ``lr`` is not read on the host)."""
        for i, group in enumerate(self._groups()):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                continue
            try:
                check_number(lr, f"the learning rate (lr) of parameter group {i}")
            except ValueError as err:
                raise ValueError(
                    f"{err}; GaugeFixing refused the optimizer step (nothing changed)"
                ) from None

    def _gradients_ready(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the gradients that ``optimizer``'s step takes, those of the acted-on parameters
        it holds (on the device): the first step of a training step sets ``_ok``, every later
        one (another optimizer, or one stepping again) ands its own check in, so that the orbit
        step is skipped if any step of the training step took a non-finite gradient; in penalty
        mode (one optimizer), check the parameters and add ``grad P`` (one host read). Runs
        once per gradient evaluation."""
        self._refresh()
        grads = [g for p in self._held_by(optimizer) if (g := p.grad) is not None]
        ok = finite_on_device(grads)
        self._ok = ok if not self._stepped or self._ok is None else self._ok & ok
        if self.mode == "penalty":
            ascended = self._maximized_grads()
            _negate_(ascended())  # what a group that maximizes descends
            self._ok = add_orbit_selection_grad_(
                self.params, self.active, self._grad_strength(), self._ok
            )
            _negate_(ascended())

    def _held_by(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """The acted-on parameters ``optimizer`` holds (all of them with one optimizer)."""
        if len(self.optimizers) == 1:
            return self._checked
        k = next(i for i, opt in enumerate(self.optimizers) if opt is optimizer)
        start = sum(len(opt.param_groups) for opt in self.optimizers[:k])
        stop = start + len(optimizer.param_groups)
        return [p for p, i in zip(self._checked, self._group_of, strict=True) if start <= i < stop]

    def _maximized_grads(self) -> Any:
        """A function listing the existing ``.grad`` of the acted-on parameters in groups with
        ``maximize=True`` (whose optimizer steps along ``+grad``: ``grad P`` is added to the
        negated gradient, so that the penalty is still descended); no parameter is visited
        unless a group maximizes."""
        flags = [bool(g.get("maximize", False)) for g in self._groups()]
        if not any(flags):
            return list
        held = [p for p, i in zip(self.params.values(), self._group_of, strict=True) if flags[i]]
        return lambda: [p.grad for p in held if p.grad is not None]

    def _grad_strength(self) -> float | Tensor:
        """``strength`` in the units of ``.grad``: times the loss scale while the gradients are
        still scaled (``torch.amp.GradScaler`` stepping a fused optimizer sets
        ``optimizer.grad_scale``, by which the optimizer divides them)."""
        scale = getattr(self.optimizers[0], "grad_scale", None)  # penalty mode: one optimizer
        if scale is None:
            return self.strength
        return self.strength * torch.as_tensor(scale, dtype=torch.float64)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._stepped:
            self._warn_open(optimizer)
        groups = _snapshot(optimizer.param_groups)
        self._stepped[id(optimizer)] = (groups, tuple(group["lr"] for group in groups[0]))
        if len(self._stepped) < len(self.optimizers):  # the training step is not complete
            return
        stepped = [self._stepped[id(opt)] for opt in self.optimizers]
        self._stepped = {}
        lrs = tuple(lr for _, group_lrs in stepped for lr in group_lrs)
        now = tuple(groups for groups, _ in stepped)
        lr_sums, self._orbit = advance(self._follow_sums(self._orbit, now), lrs, self.every)
        if lr_sums is None:  # gauge fixing does not act on this step
            return
        # Groups changed after an optimizer stepped: the sums follow them to the groups now.
        groups_now = tuple(_snapshot(opt.param_groups) for opt in self.optimizers)
        lr_sums = _followed(OrbitState(0, lr_sums), now, groups_now).lr_sum
        ok, self._ok = self._ok, None  # None: no acted-on parameter has a gradient
        if self.mode == "exact":
            rate = self._rate(lr_sums)
            if isinstance(rate, Tensor):  # from a tensor lr, not read: a bad one does not move
                rate = rate.nan_to_num(0.0, posinf=0.0).clamp_min(0.0)
            else:
                rate = check_rate(rate, self.active)
            if isinstance(rate, Tensor) or rate > 0:
                # Finds the parameters' finiteness on the squared sums the step needs, checks
                # the optimizer state (a clear error for unknown state), then moves; no move
                # unless the gradients were finite (``ok``, on the device): ``moved`` holds both.
                _, ok = relax_unchecked_(
                    self.active,
                    self.params,
                    rate,
                    self.optimizers,
                    check_range=self._float16,
                    ok=ok,
                )
            else:
                moved = finite_on_device(self._checked)
                ok = moved if ok is None else ok & moved
        self._acted += 1
        self._applied = self._applied + (True if ok is None else ok)

    def _follow_sums(self, orbit: OrbitState, now: tuple[_Snapshot, ...]) -> OrbitState:
        """``orbit``'s sums following the groups from the sums' last step to ``now`` (per
        optimizer its :func:`_snapshot` at this step, kept for the next): :func:`_followed`;
        one comparison of ids while the groups are the same objects, in the same order, holding
        the same parameters."""
        ids = tuple((tuple(map(id, groups)), held) for groups, held in now)
        if ids == self._last_ids:
            return orbit
        before = self._last_groups
        self._last_groups, self._last_ids = now, ids
        return orbit if before is None else _followed(orbit, before, now)

    def _warn_open(self, optimizer: torch.optim.Optimizer) -> None:
        """Log once per hook that ``optimizer`` stepped again while another has not stepped since
        the last training step (a step ``GradScaler`` skips, an optimizer stepped less often): no
        orbit step is taken until every optimizer stepped, so one that never steps stops gauge
        fixing."""
        if self._warned_open:
            return
        self._warned_open = True
        waiting = [i for i, opt in enumerate(self.optimizers) if id(opt) not in self._stepped]
        logger.warning(
            "GaugeFixing: optimizer %d stepped again before optimizer(s) %s stepped: no orbit "
            "step is taken until every optimizer has stepped (logged once)",
            self.optimizers.index(optimizer),
            waiting,
        )

    @property
    def steps(self) -> int:
        """The steps whose gauge fixing was applied (orbit steps or penalty gradients)."""
        self._applied = int(self._applied)  # the host read, only when asked
        return self._applied

    @property
    def skipped(self) -> int:
        """The steps whose gauge fixing was skipped (non-finite gradients or parameters; with
        float16 parameters also an orbit step that a per-tensor bound does not prove to keep
        them, their gradients and optimizer state in range)."""
        return self._acted - self.steps

    # -- learning rates ---------------------------------------------------------------------------
    def _groups(self) -> list[dict[str, Any]]:
        """The parameter groups of every optimizer, in the order given, one list: a group's index
        here is its index in :meth:`state_dict`'s ``lr_sums`` and in learning-rate errors."""
        return [group for opt in self.optimizers for group in opt.param_groups]

    def _group_sizes(self) -> list[list[int]]:
        """The parameter count of each group of each optimizer now, in the order given."""
        return [[len(group["params"]) for group in opt.param_groups] for opt in self.optimizers]

    def _param_groups(self) -> list[int]:
        """The index of the optimizer group holding each acted-on parameter."""
        return [self._held[id(p)] for p in self.params.values()]

    def rate(self) -> float | Tensor:
        """The relaxation rate of one step at the current learning rates: ``strength * lr`` as
        a float when every acted-on parameter sees the same ``lr``, else one rate per acted-on
        generator (float64 ``[active.num_generators]``), ``strength * min(lr)`` over the
        parameters it acts on. An orbit step every ``every`` steps takes the same with the sum
        of the learning rates since the last one."""
        return self._rate(tuple(g["lr"] for g in self._groups()))

    def _rate(self, group_lrs: tuple[float | Tensor, ...]) -> float | Tensor:
        """:meth:`rate` at the learning rates ``group_lrs`` (one per group), cached by them while
        they are numbers (a tensor ``lr`` is on the device: never compared, never cached)."""
        self._refresh()
        numbers = not any(isinstance(lr, Tensor) for lr in group_lrs)
        if numbers and self._rate_cache is not None and self._rate_cache[0] == group_lrs:
            return self._rate_cache[1]
        rate = self._generator_rates(tuple(group_lrs[i] for i in self._group_of))
        if numbers:
            self._rate_cache = (group_lrs, rate)
        return rate

    def _generator_rates(self, lrs: tuple[float | Tensor, ...]) -> float | Tensor:
        if len({id(lr) if isinstance(lr, Tensor) else lr for lr in lrs}) <= 1:
            return self.strength * (lrs[0] if lrs else 0.0)
        n = self.active.num_generators
        device = next(iter(self.params.values())).device
        rates = torch.full((n + 1,), math.inf, dtype=torch.float64, device=device)
        for param, lr in zip(self.active.plan(device), lrs, strict=True):
            lr = torch.as_tensor(lr, dtype=torch.float64, device=device)
            for term in param.terms:
                src = lr.expand(term.slots.numel())
                rates.scatter_reduce_(0, term.slots.reshape(-1), src, reduce="amin")
        rates = rates[:n]
        return self.strength * torch.where(torch.isfinite(rates), rates, 0.0)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: the counts and where the run stands in
        the interval between orbit steps (the steps since the last one and the sums of their
        learning rates per parameter group now); over several optimizers also ``groups``, per
        optimizer in order the parameter count of each of its groups that ``lr_sums`` covers,
        so that each sum goes back to its optimizer and group, and, while some optimizers
        stepped in a training step that the others have not yet completed (a GAN's generator
        stepping first), ``open``: per such optimizer its index and its groups' learning rates
        at its step, with ``open_ok``, whether the gradients those steps took were finite (one
        host read); over several optimizers ``params`` too, per optimizer per group the
        names of its parameters in the model (``""`` for one not of the model), which tell
        optimizers of equal group counts apart. Plain data (JSON-serialisable)."""
        sums, sizes = self._sums_now()
        state = {
            "steps": self.steps,
            "skipped": self.skipped,
            "since": self._orbit.since,
            "lr_sums": [float(lr) for lr in sums],
        }
        if len(self.optimizers) > 1:
            state["groups"], state["params"] = sizes, self._group_names()
        if self._stepped:  # optimizers that stepped in a training step not yet complete
            index = {id(opt): i for i, opt in enumerate(self.optimizers)}
            state["open"] = [
                [index[k], [float(lr) for lr in lrs]] for k, (_, lrs) in self._stepped.items()
            ]
            if self._ok is not None:  # the gradients of those steps were checked
                state["open_ok"] = bool(self._ok)
        return state

    def _group_names(self) -> list[list[list[str]]]:
        """Per optimizer per group, the names of its parameters in the model (``""`` for one
        not of the model)."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [
            [[names.get(id(p), "") for p in group["params"]] for group in opt.param_groups]
            for opt in self.optimizers
        ]

    def _sums_now(self) -> tuple[tuple[float | Tensor, ...], list[list[int]]]:
        """The sums of learning rates since the last orbit step, one per group now (those of the
        sums' last step followed to them, :func:`_followed`), and per optimizer the parameter
        count of each group now."""
        orbit, before = self._orbit, self._last_groups
        if orbit.lr_sum is not None and before is not None:
            orbit = _followed(
                orbit, before, tuple(_snapshot(opt.param_groups) for opt in self.optimizers)
            )
        return orbit.lr_sum or (), self._group_sizes()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a hook with the same ``every``, which the state
        does not record (``ValueError``, nothing changed, for anything but such a state, or one
        whose place in the interval does not fit this ``every``, or whose ``groups`` do not
        fit the optimizers: :meth:`_saved_sizes`, :meth:`_check_names`)."""
        try:  # integers and numbers as state_dict wrote them: 1.5 or "2" is no count
            steps, skipped, since = [
                check_count(state[key], f"a GaugeFixing state's {key}", 0)
                for key in ("steps", "skipped", "since")
            ]
            lr_sums = [check_number(x, "a GaugeFixing state's lr_sums") for x in state["lr_sums"]]
            sizes = self._saved_sizes(state, since, len(lr_sums))
            stepped = self._saved_open(state.get("open", []))
            if since or stepped:  # what the sums and the open step belong to
                self._check_names(state.get("params"), sizes)
            ok = self._saved_ok(state.get("open_ok"), stepped)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a GaugeFixing state: {err!r}") from None
        if since >= self.every:
            raise ValueError(
                f"a GaugeFixing state with {since} steps since the last orbit step does not fit "
                f"every={self.every}"
            )
        if since and not lr_sums:
            raise ValueError(
                f"a GaugeFixing state with {since} steps since the last orbit step has no sums "
                "of their learning rates (lr_sums)"
            )
        groups = len(self._groups())
        if len(lr_sums) > groups:
            raise ValueError(
                f"a GaugeFixing state with {len(lr_sums)} learning-rate sums does not fit an "
                f"optimizer with {groups} parameter groups"
            )
        self._applied, self._acted = steps, steps + skipped
        self._orbit = OrbitState(since, tuple(lr_sums) if since else None)
        # The sums cover each optimizer's first groups now (checked): followed from them.
        counts = (len(lr_sums),) if sizes is None else tuple(map(len, sizes))
        self._last_groups = self._last_ids = None
        if since:  # one optimizer when sizes is None (several need them in mid-interval)
            self._last_groups = tuple(
                _snapshot(opt.param_groups[:k])
                for opt, k in zip(self.optimizers, counts, strict=True)
            )
        self._stepped, self._ok = stepped, ok

    def _saved_ok(self, ok: Any, stepped: dict) -> Tensor | None:
        """A state's ``open_ok`` (whether the gradients of the open training step's steps were
        finite) as the hook's check, on the parameters' device; ``None`` when absent or no step
        is open."""
        if ok is None or not stepped:
            return None
        if not isinstance(ok, bool):
            raise TypeError(f"open_ok must be true or false, got {ok!r}")
        device = self._param_list[0].device if self._param_list else None
        return torch.tensor(ok, device=device)

    def _check_names(self, names: Any, sizes: tuple[tuple[int, ...], ...] | None) -> None:
        """``ValueError`` unless a state's ``params`` (per optimizer per group its parameters'
        names; absent in an older state: nothing checked) name, optimizer by optimizer, the
        parameters of the first groups of the optimizers now (a group added since is allowed;
        optimizers in another order, of equal group counts too, are refused)."""
        if names is None:
            return
        if not isinstance(names, list | tuple):
            raise TypeError(f"params must be a list of names per optimizer, got {type(names)}")
        if len(names) != len(self.optimizers):
            raise ValueError(
                f"a GaugeFixing state whose params name {len(names)} optimizers' parameters "
                f"does not fit a hook over {len(self.optimizers)}"
            )
        for i, (saved, now) in enumerate(zip(names, self._group_names(), strict=True)):
            saved = [list(group) for group in saved]
            if saved != now[: len(saved)] or (sizes and len(sizes[i]) != len(saved)):
                raise ValueError(
                    f"a GaugeFixing state whose optimizer {i} held parameters "
                    f"{sum(saved, [])[:3]}... does not fit optimizer {i}, which holds "
                    f"{sum(now, [])[:3]}... (optimizers in another order, or parameters "
                    "renamed or moved between groups since?)"
                )

    def _saved_open(self, open_: Any) -> dict[int, tuple[_Snapshot, tuple[float, ...]]]:
        """The optimizers that stepped in a state's training step not yet complete (``open``,
        per optimizer its index and its groups' learning rates), as ``_stepped`` with their
        groups now; ``ValueError`` for an index not of an optimizer, one given twice, or
        learning rates not one per group of that optimizer now."""
        if not isinstance(open_, list | tuple):
            raise TypeError(f"open must be a list of [optimizer, learning rates], got {open_!r}")
        stepped = {}
        for i, lrs in open_:
            i = check_count(i, "a GaugeFixing state's optimizer index in open", 0)
            lrs = tuple(check_number(lr, "a GaugeFixing state's open lr") for lr in lrs)
            opt = self.optimizers[i] if i < len(self.optimizers) else None
            if opt is None or id(opt) in stepped or len(lrs) != len(opt.param_groups):
                raise ValueError(
                    f"a GaugeFixing state whose open training step has optimizer {i} step with "
                    f"{len(lrs)} learning rates does not fit these {len(self.optimizers)} "
                    "optimizers"
                )
            stepped[id(opt)] = (_snapshot(opt.param_groups), lrs)
        return stepped

    def _saved_sizes(
        self, state: dict[str, Any], since: int, sums: int
    ) -> tuple[tuple[int, ...], ...] | None:
        """The parameter count of each group of each optimizer that a state's ``sums``
        learning-rate sums cover (``groups``, their lengths the group counts; ``None`` for a
        state without it: one optimizer's), or ``ValueError`` for counts of another number of
        optimizers or not of ``sums`` groups, in mid-interval for counts other than those of the
        optimizers' groups now, position by position (optimizers in another order; a group
        added since is allowed), and for a state without them over several optimizers in
        mid-interval (which sums are whose is unknown)."""
        n = len(self.optimizers)
        if "groups" not in state:
            if n > 1 and since:
                raise ValueError(
                    f"a GaugeFixing state without 'groups' does not record which optimizer each "
                    f"of its {sums} learning-rate sums belongs to: it cannot continue an "
                    f"interval over {n} optimizers (resume it at an orbit step, since=0)"
                )
            return None
        groups = state["groups"]
        if not isinstance(groups, list | tuple) or not all(
            isinstance(g, list | tuple) for g in groups
        ):
            raise TypeError(f"groups must be a list of lists of counts, got {groups!r}")
        what = "a GaugeFixing state's groups"
        sizes = tuple(tuple(check_count(c, what, 0) for c in g) for g in groups)
        if len(sizes) != n:
            raise ValueError(
                f"a GaugeFixing state that covers {len(sizes)} optimizers does not fit a hook "
                f"over {n}"
            )
        if since and sum(map(len, sizes)) != sums:
            raise ValueError(
                f"a GaugeFixing state with {sums} learning-rate sums does not fit its groups "
                f"{list(map(list, sizes))}, with {sum(map(len, sizes))} parameter groups"
            )
        for i, (saved, now) in enumerate(zip(sizes, self._group_sizes(), strict=True)):
            if since and list(saved) != now[: len(saved)]:
                raise ValueError(
                    f"a GaugeFixing state whose optimizer {i} had groups of {list(saved)} "
                    f"parameters does not fit optimizer {i} with groups of {now} parameters "
                    "(optimizers in another order?)"
                )
        return sizes

    # -- misc -------------------------------------------------------------------------------------
    def balance(self) -> None:
        """Balance the generators the hook acts on now (:func:`gaugefix.balance_` on
        :attr:`active`, the optimizer's state transported), as ``balance_at_start=True`` does.
        Parameters frozen or added to the optimizer since the last step are followed."""
        self._refresh()
        if self.active.num_generators:
            balance_(self.model, self.active, optimizer=self.optimizers)

    def acted(self) -> tuple[GaugeStructure, Tensor]:
        """The generators the hook acts on now, frozen parameters followed: :attr:`active` and
        :attr:`active_mask`, which of :attr:`structure`'s generators it keeps (bool
        ``[structure.num_generators]``; when none is left out, all, and ``active`` is
        ``structure`` itself)."""
        self._refresh()
        return self.active, self.active_mask

    def stats(self) -> dict[str, float]:
        """:func:`gaugefix.imbalance_stats` of the model now over the generators the hook acts
        on (:meth:`acted`): those left out for frozen parameters (``left_out``), which gauge
        fixing never moves, are not counted; with none left out, over the whole structure; with
        all left out, those of no generator (every statistic 0)."""
        return imbalance_stats(self._all_params, self.acted()[0])

    def remove(self) -> None:
        """Detach the optimizer hooks; the model and optimizer are left as they are."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for opt in self.optimizers:
            if _attached.get(opt) is self:
                del _attached[opt]

    def __enter__(self) -> GaugeFixing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
