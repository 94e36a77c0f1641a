"""Training a group of runs as one batched computation.

Runs that share a task, an optimizer, a batch size and a number of steps differ only in method,
learning rate, strength, initial imbalance and seed (with it, the task instance whose data they
train on): their parameters, and their instances' data, are stacked along a leading dim and
trained together with ``torch.func.vmap``, every step one :mod:`gaugefix.step`
transformation with a learning rate and strengths per run (:func:`group_step`). A run that
diverges is masked out (its parameters freeze) without stopping the others, and once a quarter of
the rows computed are such runs (:data:`COMPACT_FRACTION`) they are dropped from the computation:
every per-run object is cut to the runs still active (at least :data:`MIN_ROWS` rows) and the step
rebuilt for them, the dropped runs' final parameters kept aside for their results, which are
bitwise what they would be without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from gaugefix.action import apply_gauge_
from gaugefix.balancing import balance_, solve_balance
from gaugefix.equalize import equalize_
from gaugefix.experiments.tasks import DATA_SEED, Task
from gaugefix.kernels import generator_sums, rescale_
from gaugefix.masses import Masses
from gaugefix.minimize import sharpness_objective
from gaugefix.moment import STAT_NAMES, stats_from_sums
from gaugefix.step import (
    AdamState,
    EmptyState,
    ExactState,
    OrbitState,
    ScaleState,
    SgdState,
    Transformation,
    adam,
    adamw,
    applied,
    chain,
    decoupled_penalty,
    exact,
    orbit_step_,
    penalty,
    scale_by_tensor,
    sgd,
    state_targets,
    weight_decay,
)
from gaugefix.structure import GaugeStructure, discover

__all__ = [
    "Stack",
    "Method",
    "METHODS",
    "MECHANISM_METHODS",
    "STRENGTH_METHODS",
    "REFERENCES",
    "OPTIMIZERS",
    "MOMENTUM",
    "DIVERGENCE_FACTOR",
    "COMPACT_FRACTION",
    "MIN_ROWS",
    "STABILITY_MARGIN",
    "DEFINITIONS",
    "run_status",
    "method_problem",
    "run_problem",
    "check_runs",
    "task_hash",
    "IDENTITY_SEED",
    "model_identity",
    "data_identity",
    "task_version",
    "RunConfig",
    "CurvePoint",
    "RunResult",
    "init_direction",
    "Instances",
    "instances",
    "train_group",
    "group_step",
    "optimizers",
    "run_stats",
    "penalty_grads",
    "balanced_gauges",
    "balance_runs_",
    "balance_changes",
    "PER_LAYER_LR_OPTIMIZERS",
    "MIN_SHARPNESS_TOL",
    "MIN_SHARPNESS_ITERATIONS",
    "SharpnessStart",
    "min_sharpness_start",
    "per_layer_lr_multipliers",
    "moved_starts_",
]

# A stack maps each parameter name to ``[R, *shape]``: run ``r`` of a group is slice ``r``. The
# library's kernels take such stacks directly (``batch_dims=1``).
Stack = dict[str, Tensor]


@dataclass(frozen=True)
class Method:
    """A training method: whether it starts from the balanced point of its initialisation's
    orbit (``balance_`` at step 0; the function is unchanged), what it adds to every step
    (``fixing``: ``"penalty"``, ``"decoupled-penalty"``, ``"exact"``, ``"weight-decay"``,
    ``"balance"`` or ``None``),
    its definition in words (docs and report), for ``"exact"`` the optimizer steps between
    orbit steps (``every``, as :class:`gaugefix.GaugeFixing`'s), and for a replica the method it
    replicates (``replica_of``): the same method from an independent initialisation draw for the
    run's seed (the same task instance, other weights), compared with that method only.

    The methods that test the mechanism add: ``start``, a move along the orbit at step 0
    besides balancing (``"orbit-step"``: the exact orbit step once before the first optimizer
    step; ``"min-sharpness"``: :func:`min_sharpness_start`); ``until``, for hard fixing, the
    number of optimizer steps it follows (``None``: every one); ``per_layer_lr``, the learning
    rate of each parameter tensor multiplied by :func:`per_layer_lr_multipliers`; and
    ``compared_with``, a method it is compared with besides the references."""

    balanced_start: bool
    fixing: str | None
    definition: str
    every: int = 1
    replica_of: str | None = None
    start: str | None = None
    until: int | None = None
    per_layer_lr: bool = False
    compared_with: str | None = None

    def __post_init__(self) -> None:
        if self.start not in (None, "orbit-step", "min-sharpness"):
            raise ValueError(f"unknown start {self.start!r}")
        if self.start == "orbit-step" and self.fixing != "exact":
            raise ValueError("the orbit-step start is the exact step's, for fixing 'exact'")
        if self.until is not None and self.fixing != "balance":
            raise ValueError("until counts the steps of hard fixing ('balance') only")


_FROM_GIVEN = "from the initialisation as given"
_FROM_BALANCED = "from the balanced point of the initialisation's orbit (balanced once at step 0)"
_PENALTY = (
    "the paper's functional `(strength / 4) sum_n mu_n^2` added to the loss (its closed-form "
    "gradient added to the optimizer's gradient)"
)
_EXACT = (
    "after every optimizer step (`every = 1`), the bounded exact orbit step of `relax_` "
    '(`h = -rate mu`, `rate = lr * strength`; `GaugeFixing(mode="exact", every=1)`)'
)
_EXACT_EVERY_10 = (
    "after every 10th optimizer step, the same exact orbit step at the rate of the 10 steps "
    "together (`rate = strength * (the sum of lr over them)`; `GaugeFixing`'s default, "
    '`GaugeFixing(mode="exact")` with `every = 10`)'
)
METHODS: dict[str, Method] = {
    "plain": Method(False, None, f"the optimizer alone, {_FROM_GIVEN}"),
    "balanced-init": Method(True, None, f"the optimizer alone, {_FROM_BALANCED}"),
    "penalty": Method(False, "penalty", f"{_PENALTY}, {_FROM_GIVEN}"),
    "balanced-penalty": Method(True, "penalty", f"{_PENALTY}, {_FROM_BALANCED}"),
    "exact": Method(False, "exact", f"{_EXACT}, {_FROM_GIVEN}", every=1),
    "balanced-exact": Method(True, "exact", f"{_EXACT}, {_FROM_BALANCED}", every=1),
    "exact-every-10": Method(False, "exact", f"{_EXACT_EVERY_10}, {_FROM_GIVEN}", every=10),
    "decoupled-penalty": Method(
        False,
        "decoupled-penalty",
        "the penalty's gradient `strength * sum_n mu_n xi_n` taken after the optimizer's update "
        "at the rate `lr * strength`, outside its preconditioner (as AdamW decouples weight "
        f"decay): a vertical step, {_FROM_GIVEN}",
    ),
    "weight-decay": Method(
        False, "weight-decay", f"L2, `strength * theta` added to the gradient, {_FROM_GIVEN}"
    ),
    "balance": Method(
        True,
        "balance",
        "hard gauge fixing: balanced (`balance_`) at step 0 and after every optimizer step",
    ),
    "plain-replica": Method(
        False,
        None,
        "the optimizer alone, from another initialisation draw of the same task instance (the "
        "plain-vs-plain sham control)",
        replica_of="plain",
    ),
    "exact-first": Method(
        False,
        "exact",
        "the exact orbit step of `exact` also once before the first optimizer step (at step 0, "
        f"at the rate of one step, `lr * strength`), then as `exact`, {_FROM_GIVEN}; compared "
        "with `exact` (does the step before the first update matter?)",
        start="orbit-step",
        compared_with="exact",
    ),
    "balance-after-step-1": Method(
        False,
        "balance",
        f"the optimizer alone, {_FROM_GIVEN}, balanced (`balance_`) once, after the first "
        "optimizer step; compared with `exact` (does a one-step rescue do what continuous "
        "fixing does?)",
        until=1,
        compared_with="exact",
    ),
    "per-layer-lr": Method(
        False,
        None,
        f"the optimizer alone, {_FROM_GIVEN}, each parameter tensor's learning rate multiplied "
        "by the mean over its entries of `d_e^-2`, `d_e` the factor balancing would scale entry "
        "`e` by (computed at step 0; no gauge move ever): GD from the balanced point is GD with "
        "the preconditioner `D^-2`, matched per tensor in the mean (gd, sgd, momentum only)",
        per_layer_lr=True,
    ),
    "min-sharpness-init": Method(
        False,
        None,
        "the optimizer alone, from the point of the initialisation's orbit with the least "
        "largest Hessian eigenvalue of the training loss (`equalize_` with "
        "`sharpness_objective`, L-BFGS from the balanced point; at step 0)",
        start="min-sharpness",
    ),
}
STRENGTH_METHODS = tuple(
    m
    for m, d in METHODS.items()
    if d.fixing in ("penalty", "decoupled-penalty", "exact", "weight-decay")
)
# The references a method is compared with, where a regime has them: the optimizer alone from the
# initialisation as given (plain) and from its balanced point (balanced-init).
REFERENCES = ("plain", "balanced-init")
# The methods that test the mechanism of continuous gauge fixing (run in the full-batch GD regimes
# where it is decided): the first orbit step before the first update, a one-step rescue, the
# gauge's preconditioner without a gauge move, and a start at the orbit's least sharp point.
MECHANISM_METHODS = ("exact-first", "balance-after-step-1", "per-layer-lr", "min-sharpness-init")
# The optimizers per-layer-lr is defined for: on them a gauge change is the preconditioner D^-2.
PER_LAYER_LR_OPTIMIZERS = ("gd", "sgd", "momentum")
# The L-BFGS of min-sharpness-init: the gradient tolerance in h and the most iterations.
MIN_SHARPNESS_TOL = 1e-6
MIN_SHARPNESS_ITERATIONS = 50
REPLICA_SEED = 1_000_003  # a replica of seed k is initialised from torch seed k + REPLICA_SEED
OPTIMIZERS = ("gd", "sgd", "momentum", "adam", "adamw")
# The momentum of the sweep's ``momentum`` optimizer (SGD's own default is none).
MOMENTUM = 0.9
DIVERGENCE_FACTOR = 1e3
# A group drops its diverged runs from the computation once the runs still active are at most this
# fraction of the rows it computes. A diverged row costs a whole step (forward, backward, optimizer,
# gauge fixing) for nothing; a compaction costs a copy of the rows kept and a rebuilt step. Waiting
# until a quarter of the rows are diverged wastes at most a quarter of a step's rows and bounds the
# compactions of a group of R runs by log(R) / log(4/3) (14 for 60 runs, not one per divergence).
COMPACT_FRACTION = 0.75
# A compaction keeps at least this many rows (a diverged run's, frozen, beside a last active one):
# a product over one row takes another kernel than over several, whose float32 results differ in
# the last bits (1.5e-7 on teacher-student), and a run's results must not depend on whether the
# group dropped the others.
MIN_ROWS = 2
# A finished run is stable when its final training loss is at most this fraction of the smaller
# of its initial loss and the constant predictor's loss (:func:`run_status`).
STABILITY_MARGIN = 0.9
# The version of the experiment definitions: bump it whenever a change to the engine, the methods,
# the optimizers or the tasks changes what a run computes. It is part of every task hash, so runs
# of older definitions are never taken for runs of the current ones.
DEFINITIONS = 4


def run_status(
    initial: float, final: float | None, constant: float, margin: float = STABILITY_MARGIN
) -> str:
    """``"diverged"`` (``final`` is ``None``: the loss became non-finite or exceeded
    :data:`DIVERGENCE_FACTOR` times its initial value), ``"stable"`` (``final <= margin *
    min(initial, constant)``, :data:`STABILITY_MARGIN` unless a sensitivity analysis asks for
    another: the run learned beyond the best constant predictor, so a network that collapsed
    to one is not stable) or ``"unstable"``; never stable where ``initial`` or ``constant`` is
    NaN (``min`` would skip a NaN second argument)."""
    if final is None:
        return "diverged"
    stable = final <= margin * initial and final <= margin * constant
    return "stable" if stable else "unstable"


def method_problem(method: str, optimizer: str, strength: float) -> str | None:
    """What keeps ``method`` at ``strength`` under ``optimizer`` from being a run the engine
    trains as named (``None``: nothing): an unknown method or optimizer, per-layer-lr outside
    :data:`PER_LAYER_LR_OPTIMIZERS`, or a strength that is not finite and ``>= 0`` (a negative
    one would train the optimizer alone: the step leaves out a fixing of no positive strength;
    a method without a strength ignores it)."""
    if method not in METHODS:
        return f"unknown method {method!r}; choose from {', '.join(METHODS)}"
    if optimizer not in OPTIMIZERS:
        return f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
    if METHODS[method].per_layer_lr and optimizer not in PER_LAYER_LR_OPTIMIZERS:
        return (
            f"per-layer-lr is defined for {', '.join(PER_LAYER_LR_OPTIMIZERS)}, not {optimizer!r}"
        )
    if not (math.isfinite(strength) and strength >= 0):
        return f"the strength of {method} must be finite and >= 0, got {strength!r}"
    return None


def run_problem(config: RunConfig) -> str | None:
    """What keeps ``config`` from being a run the engine trains as its key says (``None``:
    nothing): :func:`method_problem`, a number field that is not a number (an integer field:
    an integer), a learning rate that is not finite and ``> 0``, an
    initial imbalance that is not finite, a dtype that is no floating-point torch dtype, fewer
    than one step, or a negative batch size (another key for full batch) or seed."""
    c = config
    kinds = {**dict.fromkeys(_FLOAT_FIELDS, float), **dict.fromkeys(_INT_FIELDS, int)}
    for name, kind in kinds.items():
        if not isinstance(value := getattr(c, name), kind):
            return f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}"
    dtype = getattr(torch, c.dtype, None) if isinstance(c.dtype, str) else None
    problems = (
        (not (math.isfinite(c.lr) and c.lr > 0), f"lr must be finite and > 0, got {c.lr!r}"),
        (not math.isfinite(c.s), f"the initial imbalance s must be finite, got {c.s!r}"),
        (
            not (isinstance(dtype, torch.dtype) and dtype.is_floating_point),
            f"dtype must be a floating-point torch dtype, got {c.dtype!r}",
        ),
        (c.steps < 1, f"steps must be >= 1, got {c.steps}"),
        (c.batch_size < 0, f"the batch size must be >= 0 (0: full batch), got {c.batch_size}"),
        (c.seed < 0, f"the seed must be >= 0, got {c.seed}"),
    )
    problem = method_problem(c.method, c.optimizer, c.strength)
    return problem or next((text for bad, text in problems if bad), None)


def check_runs(configs: Sequence[RunConfig]) -> None:
    """``ValueError`` naming the first of ``configs`` with a :func:`run_problem`."""
    for c in configs:
        if problem := run_problem(c):
            raise _refusal(c, problem)


def _refusal(config: RunConfig, problem: str) -> ValueError:
    """The one-line ``ValueError`` refusing ``config``, naming it, for ``problem``."""
    c = config
    return ValueError(
        f"cannot train the run ({c.task}, {c.method}, {c.optimizer}, lr {c.lr!r}, "
        f"seed {c.seed}): {problem}"
    )


def task_hash(task: Task) -> str:
    """What a run's task fixes, as 16 hex digits: a SHA-256 of the data arrays as trained on
    (dtypes, shapes, bytes), the loss kind, the model as it starts (:func:`model_identity`:
    architecture, hyperparameters, initialisation and dtypes) and :data:`DEFINITIONS`."""
    digest = hashlib.sha256(f"{DEFINITIONS}|{task.kind}|".encode())
    digest.update(model_identity(task))
    data_identity(task, digest)
    return digest.hexdigest()[:16]


def data_identity(task: Task, digest: Any) -> None:
    """Feed ``task``'s data arrays as trained on (dtype, shape, bytes; a missing test split
    marked) to the hash ``digest``."""
    for t in (task.x, task.y, task.x_test, task.y_test):
        if t is None:
            digest.update(b"|no test split|")
            continue
        a = t.detach().cpu().contiguous().numpy()
        digest.update(f"|{a.dtype}{a.shape}|".encode())
        digest.update(a.tobytes())


# The torch seed of the initialisation a task hash covers: any change of the model's
# initialisation (PyTorch's default, a task's own scheme, a dtype) changes this draw too.
IDENTITY_SEED = 0


def _plain(value: Any) -> bool:
    """Whether ``value`` is a module setting the hash reads: a number, string, flag or
    ``None``, or a tuple or list of such (sets and objects left out: their text may vary)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def model_identity(task: Task) -> bytes:
    """``task``'s model as it starts, as bytes: its ``repr``, each module's name, class and
    settings (its public plain attributes, such as a layer's sizes, an attention's heads, a
    norm's ``eps``, which ``repr`` may leave out), and each entry of its ``state_dict`` (name,
    dtype, shape, bytes) at the initialisation for torch seed :data:`IDENTITY_SEED`, drawn in a
    forked generator (the caller's random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(IDENTITY_SEED)
        model = task.make_model()
    parts = [repr(model).encode()]
    for name, module in model.named_modules():
        settings = sorted((k, v) for k, v in vars(module).items() if k[0] != "_" and _plain(v))
        parts.append(f"|{name}|{type(module).__qualname__}|{settings!r}".encode())
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        parts.append(f"|{name}|{a.dtype}{tuple(a.shape)}|".encode())
        parts.append(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def task_version(task_hash: str) -> str:
    """The first 8 hex digits of a task hash: shared by the instances (seeds) of one task, they
    change with its data, model or experiment definitions."""
    return task_hash[:8]


_FLOAT_FIELDS = ("lr", "strength", "s")
_INT_FIELDS = ("seed", "batch_size", "steps", "bisection")


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``task_hash`` is :func:`task_hash` of its task (so a run's key changes
    with the data, the model and the definitions, not only with the task's name);
    ``method`` is a key of :data:`METHODS`; ``strength`` the penalty, exact-step or
    weight-decay strength (0 for the other methods); ``s`` the initial imbalance; ``batch_size``
    0 means full batch; ``bisection`` the round of the bisection of the stable edge that asked
    for the run (0: a run of the learning-rate grid)."""

    task: str
    method: str
    optimizer: str
    lr: float
    strength: float
    s: float
    seed: int
    batch_size: int
    steps: int
    dtype: str = "float32"
    task_hash: str = field(kw_only=True)
    bisection: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        """Numbers in one form, so that one run has one key: the float fields as floats (``1``
        and ``numpy.float64(1)`` as ``1.0``, ``-0.0`` as ``0.0``), the integer fields as ints
        (``numpy.int64(3)`` as ``3``); other values are left for :func:`run_problem`."""
        for name in _FLOAT_FIELDS:
            if isinstance(value := getattr(self, name), numbers.Real):
                object.__setattr__(self, name, float(value) + 0.0)
        for name in _INT_FIELDS:
            if isinstance(value := getattr(self, name), numbers.Integral):
                object.__setattr__(self, name, int(value))

    def key(self) -> str:
        """The canonical identity of the run in a store."""
        return json.dumps(asdict(self), sort_keys=True)

    def group(self) -> tuple:
        """Runs with equal groups are trained together: one task's version (any of its
        instances, :func:`task_version`), optimizer, batch size, number of steps and dtype."""
        version = task_version(self.task_hash)
        return (self.task, version, self.optimizer, self.batch_size, self.steps, self.dtype)


class CurvePoint(NamedTuple):
    """A recorded step of a run: the training loss (of the step's mini-batch), the RMS
    log-ratio and ``max |mu| / S`` of :func:`gaugefix.imbalance_stats`."""

    step: int
    loss: float
    log_ratio_rms: float
    mu_rel_max: float


@dataclass
class RunResult:
    """What a run gives: its :func:`run_status`, the losses it is judged by (initial, final,
    the constant predictor's), test metrics, final imbalance statistics, the step it diverged
    at, its largest training loss over its initial loss (``peak_loss_ratio``, over the steps
    until it diverged and the final loss on the whole training set; infinite where the loss
    became non-finite), for trained ``plain``
    networks the output change when balanced, and its curve."""

    config: RunConfig
    status: str
    initial_loss: float
    constant_loss: float
    final_loss: float | None
    test_loss: float | None
    accuracy: float | None
    test_accuracy: float | None
    log_ratio_rms: float | None
    mu_rel_max: float | None
    diverged_at: int | None
    peak_loss_ratio: float
    balance_change: float | None = None
    curves: list[CurvePoint] = field(default_factory=list)


def init_direction(structure: GaugeStructure) -> Tensor:
    """The fixed direction ``z`` of the initial imbalance (``h = s z``): a random sign per
    generator from a fixed seed, the same for every run of a task, so that every generator is
    moved by exactly ``|s|`` along its orbit."""
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.randn(structure.num_generators, generator=g, dtype=torch.float64).sign()


class Instances(NamedTuple):
    """The distinct task instances of a group's runs (``K`` of them): their arrays
    (:meth:`Task.arrays`) stacked, ``[K, n, ...]`` (``None`` without a test split), and the
    instance of each run, ``of_run`` ``[R]``."""

    tasks: list[Task]
    x: Tensor
    y: Tensor
    x_test: Tensor | None
    y_test: Tensor | None
    of_run: Tensor

    def per_run(self, data: Tensor) -> tuple[Tensor, int | None]:
        """``data`` (one of the stacked arrays) for ``vmap`` over runs, with its ``in_dims``:
        the one instance's array, shared (``None``), or each run's, ``[R, n, ...]`` (``0``)."""
        return (data[0], None) if len(self.tasks) == 1 else (data[self.of_run], 0)


def instances(tasks: list[Task], dtype: torch.dtype) -> Instances:
    """The :class:`Instances` of runs on ``tasks`` (one per run) in ``dtype``; the tasks must
    have one kind and data of equal shapes (:meth:`Task.data_shapes`)."""
    distinct = list({id(t): t for t in tasks}.values())
    if len({(t.kind, t.data_shapes()) for t in distinct}) != 1:
        names = sorted({t.name for t in distinct})
        raise ValueError(f"runs trained together need data of one kind and shape: {names}")
    index = {id(t): k for k, t in enumerate(distinct)}
    columns = zip(*(t.arrays(dtype) for t in distinct), strict=True)
    stacked = [None if c[0] is None else torch.stack(c) for c in columns]
    return Instances(distinct, *stacked, torch.tensor([index[id(t)] for t in tasks]))


def _initial_stack(tasks: list[Task], configs: list[RunConfig], dtype: torch.dtype) -> tuple:
    """Each run's initial parameters: its task model's initialisation for its seed, moved along
    its own orbit by ``s z``; returns the template model, structure and the stack. The
    instances of one task share their model and so the structure (of the first run's). The
    caller's random generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        template = tasks[0].make_model().to(dtype)
    structure = discover(template, tasks[0].arrays(dtype)[0][:2])
    z = init_direction(structure)
    members = []
    for task, c in zip(tasks, configs, strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed + REPLICA_SEED * bool(METHODS[c.method].replica_of))
            model = task.make_model().to(dtype)
        try:
            apply_gauge_(model, structure, c.s * z)
        except ValueError as error:  # the move out of the dtype's range: nothing was moved
            raise _refusal(c, f"its start, moved by s = {c.s!r}, is refused: {error}") from None
        members.append({n: p.detach() for n, p in model.named_parameters()})
    stack = {n: torch.stack([m[n] for m in members]).requires_grad_(True) for n in members[0]}
    return template, structure, stack


def train_group(
    tasks: Task | Sequence[Task],
    configs: list[RunConfig],
    record_every: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """Train ``configs`` (one group: instances of one task, same optimizer, batch size, steps,
    dtype) together, run ``r`` on ``tasks[r]`` (or all on one ``Task``); ``on_step(step)`` is
    called after each step (for progress). A run that diverges freezes; once the runs still
    active are at most :data:`COMPACT_FRACTION` of the rows computed, the others are dropped
    (:func:`_compacted`). Each run trains on the task given: its ``task_hash`` is the caller's
    label, not checked here (the runner, which stores runs, checks it). A run that cannot be
    trained as its key says is refused with one ``ValueError`` naming it, before any step."""
    group, stack = _started(tasks, configs)
    with torch.no_grad():
        initial = _full_loss(group.data, group.template)(stack)
    active = torch.isfinite(initial)
    diverged_at: list[int | None] = [None if bool(a) else 0 for a in active]
    # Each run's learning rate, set to 0 (with its updates: frozen) once the run diverged.
    lr = torch.tensor([c.lr for c in configs], dtype=torch.float64) * active
    # The largest loss / initial loss so far, in the losses' dtype.
    peak = torch.where(active, 0.0, math.inf).to(initial.dtype)
    rows = _built(group, torch.arange(len(configs)), stack, None, lr, active, initial, peak)
    final = _Final({n: p.detach().clone() for n, p in stack.items()}, active.clone(), peak.clone())
    curves: list[list[CurvePoint]] = [[] for _ in configs]
    steps = configs[0].steps
    every = record_every or max(1, steps // 50)
    for step in range(steps + 1):
        loss = rows.batch_loss(rows.stack)
        _judge(rows, loss, step, diverged_at)
        if step % every == 0 or step == steps:
            stats = run_stats(group.structure, rows.stack)
            _record(curves, step, loss.detach(), stats, rows.active, rows.runs.tolist())
        if on_step is not None:
            on_step(step)
        if step == steps or not bool(rows.active.any()):
            break
        live = torch.where(rows.active, loss, 0.0).sum()
        grads = torch.autograd.grad(live, list(rows.stack.values()))
        with torch.no_grad():
            updates = dict(zip(rows.stack, grads, strict=True))
            _, rows.state = rows.step_fn.update(updates, rows.state, rows.stack)
        if max(int(rows.active.sum()), MIN_ROWS) <= COMPACT_FRACTION * len(rows.runs):
            rows = _compacted(group, rows, final)
    _set_rows(final, rows, torch.arange(len(rows.runs)))
    return _results(
        group.data,
        configs,
        group.template,
        final.stack,
        initial,
        final.active,
        diverged_at,
        final.peak,
        curves,
        group.structure,
    )


class _Group(NamedTuple):
    """What every batch of a group's runs is built from: the runs' :class:`Instances`, the
    template model, the gauge structure, the configs (``R``) and each run's mini-batch sampler
    (a generator seeded by its seed, drawn from at every step it is computed)."""

    data: Instances
    template: torch.nn.Module
    structure: GaugeStructure
    configs: list[RunConfig]
    samplers: list[torch.Generator]


def _started(tasks: Task | Sequence[Task], configs: list[RunConfig]) -> tuple[_Group, Stack]:
    """The :class:`_Group` of ``configs`` (checked to be one group with a task each) and its
    initial stack ``[R, ...]``: each run's initialisation, balanced or moved where its method
    starts so."""
    check_runs(configs)
    groups = {c.group() for c in configs}
    if len(groups) != 1:
        raise ValueError(f"train_group needs one group, got {sorted(groups)}")
    tasks = list(tasks) if isinstance(tasks, Sequence) else [tasks] * len(configs)
    if len(tasks) != len(configs):
        raise ValueError(f"train_group needs a task per run: {len(tasks)} for {len(configs)}")
    dtype = getattr(torch, configs[0].dtype)
    data = instances(tasks, dtype)
    template, structure, stack = _initial_stack(tasks, configs, dtype)
    _check_masses(structure, stack, configs)
    starts = torch.tensor([METHODS[c.method].balanced_start for c in configs])
    balance_runs_(structure, stack, starts, None)
    moved_starts_(tasks, structure, stack, configs)
    samplers = [torch.Generator().manual_seed(c.seed) for c in configs]
    return _Group(data, template, structure, configs, samplers), stack


# The fixings that act through the generators' masses (sums of squared parameters).
_MASS_FIXINGS = ("penalty", "decoupled-penalty", "exact", "balance")


def _check_masses(structure: GaugeStructure, stack: Stack, configs: list[RunConfig]) -> None:
    """``ValueError`` naming the first run whose method acts through the generators' masses
    (balancing, an orbit step, the penalty, per-layer-lr's factors) and whose initial parameters
    (``[R, ...]``, moved by ``s z``) have masses or a squared norm that are not finite in
    float64: the squares of a large ``s``'s move overflow, and each of those would skip the run
    (or give it a NaN gradient), training the optimizer alone under the method's name."""
    if structure.num_generators == 0:
        return
    with torch.no_grad():
        sums = generator_sums(stack, structure, torch.float64, batch_dims=1)
    finite = torch.stack([torch.isfinite(t).reshape(len(configs), -1).all(-1) for t in sums])
    for c, ok in zip(configs, finite.all(0).tolist(), strict=True):
        m = METHODS[c.method]
        if not ok and (m.balanced_start or m.start or m.per_layer_lr or m.fixing in _MASS_FIXINGS):
            raise _refusal(
                c,
                f"at the initial imbalance s = {c.s!r} the squares of its {c.dtype} parameters "
                "overflow, so its gauge operations cannot act on it",
            )


@dataclass
class _Rows:
    """The rows a group computes, ``B`` of its ``R`` runs (all of them until a compaction): the
    group's index of each (``runs``, ``[B]``, increasing), their parameters (``[B, ...]``, leaves
    that require grad), the step's state, learning rates (``lr``: 0 once a run diverged), whether
    each is still ``active``, its ``initial`` loss and ``peak`` loss ratio (``[B]`` each), and the
    step and the loss on the step's batch built for them. ``step_fn``'s closures read ``lr`` and
    ``active``, which change in place."""

    runs: Tensor
    stack: Stack
    state: Any
    lr: Tensor
    active: Tensor
    initial: Tensor
    peak: Tensor
    step_fn: Transformation
    batch_loss: Callable[[Stack], Tensor]


class _Final(NamedTuple):
    """The group's runs as they left the computation, at their rows ``[R]``: the parameters,
    whether still active and the peak loss ratio (written when a run is dropped, and for the
    rows computed at the end)."""

    stack: Stack
    active: Tensor
    peak: Tensor


def _built(
    group: _Group,
    runs: Tensor,
    stack: Stack,
    state: Any,
    lr: Tensor,
    active: Tensor,
    initial: Tensor,
    peak: Tensor,
) -> _Rows:
    """The :class:`_Rows` of the group's runs ``runs`` (``[B]``) from their per-run objects (all
    ``[B]``-leading): the step rebuilt for their configs with the layout of the whole group's
    (so that ``state``, the whole group's cut to them, fits it; ``None``: the step's ``init``), and
    their loss on the step's batch from their own instances and samplers."""
    configs = [group.configs[i] for i in runs.tolist()]
    optimizer, size = configs[0].optimizer, configs[0].batch_size
    step_fn = group_step(group.structure, configs, optimizer, lr, active, layout=group.configs)
    data = group.data._replace(of_run=group.data.of_run[runs])
    samplers = [group.samplers[i] for i in runs.tolist()]
    batch_loss = _batch_loss(data, group.template, size, samplers)
    state = step_fn.init(stack) if state is None else state
    return _Rows(runs, stack, state, lr, active, initial, peak, step_fn, batch_loss)


def _judge(rows: _Rows, loss: Tensor, step: int, diverged_at: list[int | None]) -> None:
    """The runs of ``rows`` whose ``loss`` on the step's batch (``[B]``) is not finite or exceeds
    :data:`DIVERGENCE_FACTOR` times their initial loss diverge at ``step`` (``diverged_at`` by the
    group's index): no longer active, learning rate 0, in place; the peak ratios of the runs
    active until now updated."""
    bad = ~torch.isfinite(loss) | (loss > DIVERGENCE_FACTOR * rows.initial)
    ratio = (loss.detach() / rows.initial).nan_to_num(math.inf, math.inf)
    rows.peak = torch.where(rows.active, rows.peak.fmax(ratio), rows.peak)
    for i in rows.runs[rows.active & bad].tolist():
        diverged_at[i] = step
    rows.active &= ~bad
    rows.lr.mul_(rows.active)


def _compacted(group: _Group, rows: _Rows, final: _Final) -> _Rows:
    """``rows`` without its runs no longer active, but for the first of them where fewer than
    :data:`MIN_ROWS` are: the others written to ``final``, and every per-run object of the
    rows kept cut to them (the step's state by :func:`_state_rows`), the step and the batch
    loss rebuilt for them (per-layer-lr's multipliers, in the state, stay those of the initial
    parameters; the step counts carry on)."""
    kept = rows.active.clone()
    kept[torch.nonzero(~kept).reshape(-1)[: max(MIN_ROWS - int(kept.sum()), 0)]] = True
    keep = torch.nonzero(kept).reshape(-1)
    _set_rows(final, rows, torch.nonzero(~kept).reshape(-1))
    stack = {n: p.detach()[keep].requires_grad_(True) for n, p in rows.stack.items()}
    state = _state_rows(rows.state, keep)
    lr, active, initial, peak = (t[keep] for t in (rows.lr, rows.active, rows.initial, rows.peak))
    return _built(group, rows.runs[keep], stack, state, lr, active, initial, peak)


@torch.no_grad()
def _set_rows(final: _Final, rows: _Rows, which: Tensor) -> None:
    """Rows ``which`` (indices into ``rows``, ``[k]``) written to ``final`` at their runs."""
    at = rows.runs[which]
    for n, p in rows.stack.items():
        final.stack[n][at] = p.detach()[which]
    final.active[at] = rows.active[which]
    final.peak[at] = rows.peak[which]


def _state_rows(state: Any, keep: Tensor) -> Any:
    """A state of :func:`group_step` (``B`` runs) cut to the runs ``keep`` (indices, ``[k]``), by
    an explicit rule per state type, never by shape: per run are the optimizer buffers
    (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``: ``[B, ...]`` by name), the update factors
    (``ScaleState.factors``: ``[B]`` by name) and the learning rates summed since the last orbit
    step (``OrbitState.lr_sum``: ``[B]`` as ``lr``, or ``None``); the step counts
    (``AdamState.step``, ``OrbitState.since``, ``_Counted.steps``) are the group's and stay.
    ``TypeError`` for a state without a rule (a chain's state is a plain tuple of states)."""

    def cut(buffers: Stack | None) -> Stack | None:
        return None if buffers is None else {n: b[keep] for n, b in buffers.items()}

    if isinstance(state, _Counted):
        return _Counted(_state_rows(state.inner, keep), state.steps)
    if isinstance(state, ExactState):
        return ExactState(_state_rows(state.inner, keep), _state_rows(state.orbit, keep))
    if isinstance(state, OrbitState):
        lr_sum = None if state.lr_sum is None else state.lr_sum[keep]
        return OrbitState(state.since, lr_sum)
    if isinstance(state, SgdState):
        return SgdState(cut(state.momentum_buffer))
    if isinstance(state, AdamState):
        return AdamState(state.step, cut(state.exp_avg), cut(state.exp_avg_sq))
    if isinstance(state, ScaleState):
        return ScaleState(cut(state.factors))
    if isinstance(state, EmptyState):
        return state
    if type(state) is tuple:
        return tuple(_state_rows(s, keep) for s in state)
    raise TypeError(f"no rule to cut a step state of type {type(state).__name__} to runs")


def _run_loss(
    data: Instances, template: torch.nn.Module
) -> Callable[[Stack, Tensor, Tensor], Tensor]:
    """One run's :meth:`Task.loss` of ``template`` with parameters ``params`` on ``(xb, yb)``."""
    task = data.tasks[0]

    def loss(params: Stack, xb: Tensor, yb: Tensor) -> Tensor:
        return task.loss(functional_call(template, params, (xb,)), yb)

    return loss


def _full_loss(data: Instances, template: torch.nn.Module) -> Callable[[Stack], Tensor]:
    """Per run (``[R]``), :meth:`Task.loss` on its instance's full training set."""
    (x, dim), (y, _) = data.per_run(data.x), data.per_run(data.y)
    on_full = vmap(_run_loss(data, template), in_dims=(0, dim, dim))
    return lambda stack: on_full(stack, x, y)


def _batch_loss(
    data: Instances,
    template: torch.nn.Module,
    batch_size: int,
    samplers: list[torch.Generator],
) -> Callable[[Stack], Tensor]:
    """Per run (``[R]``), :meth:`Task.loss` on the step's batch: the full set (``batch_size`` 0
    or at least the set), or ``batch_size`` of its instance's examples drawn by the run's own
    generator (``samplers``, one per run) at every call."""
    n = data.x.shape[1]
    if batch_size <= 0 or batch_size >= n:
        return _full_loss(data, template)
    own = vmap(_run_loss(data, template))
    of_run = data.of_run[:, None]

    def drawn(stack: Stack) -> Tensor:
        idx = torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in samplers])
        return own(stack, data.x[of_run, idx], data.y[of_run, idx])

    return drawn


def group_step(
    structure: GaugeStructure,
    configs: list[RunConfig],
    optimizer: str,
    lr: Tensor,
    active: Tensor,
    *,
    layout: Sequence[RunConfig] | None = None,
) -> Transformation:
    """The step of :mod:`gaugefix.step` every run of a group takes, each with its method's
    strengths (0 where its method has none): the penalty's gradient and weight decay added to
    the loss gradient, the optimizer (``lr``: ``[R]``), the decoupled penalty's vertical step
    added to its update, the updates of runs no longer
    ``active`` zeroed, the exact orbit step of each ``every`` the methods use, and hard gauge
    fixing (``balance``) after the step. Which of these the step chains is decided by the runs
    of ``layout`` (default ``configs``): a step built for some of a group's runs with the
    group's configs as ``layout`` has the state layout of the group's step, its parts that none
    of ``configs`` uses acting on them with strength 0."""
    layout = configs if layout is None else layout

    def strengths(fixing: str, every: int = 1, runs: Sequence[RunConfig] = configs) -> Tensor:
        return torch.tensor(
            [
                c.strength if (m := METHODS[c.method]).fixing == fixing and m.every == every
                else 0.0
                for c in runs
            ],
            dtype=torch.float64,
        )  # fmt: skip

    def used(fixing: str, every: int = 1) -> bool:
        return bool((strengths(fixing, every, layout) > 0).any())

    pen, wd = strengths("penalty"), strengths("weight-decay")
    parts = [penalty(structure, strength=pen, batch_dims=1)] if used("penalty") else []
    parts += [weight_decay(strength=wd)] if used("weight-decay") else []
    parts += [optimizers(optimizer, lr)]
    if used("decoupled-penalty"):
        decoupled = strengths("decoupled-penalty")
        parts += [decoupled_penalty(structure, lr=lr, strength=decoupled, batch_dims=1)]
    parts += _per_layer_lr(structure, configs, optimizer, layout)
    parts += [_frozen(active)]
    step_fn = applied(chain(*parts))
    for every in sorted({METHODS[c.method].every for c in layout}):
        if used("exact", every):
            strength = strengths("exact", every)  # 0 (never acts) where no run of configs has one
            strength = strength if bool((strength > 0).any()) else 0.0
            step_fn = exact(step_fn, structure, lr=lr, strength=strength, every=every, batch_dims=1)
    hard = torch.tensor([METHODS[c.method].fixing == "balance" for c in configs])
    until = torch.tensor([METHODS[c.method].until or 0 for c in configs])
    if not any(METHODS[c.method].fixing == "balance" for c in layout):
        return step_fn
    return _balanced(step_fn, structure, hard, until, active)


def optimizers(kind: str, lr: Tensor) -> Transformation:
    """The sweep's optimizer ``kind`` (:data:`OPTIMIZERS`): ``gd`` (full batch) and ``sgd``
    are ``torch.optim.SGD``, ``momentum`` is SGD with momentum :data:`MOMENTUM`, ``adam`` and
    ``adamw`` are ``torch.optim.Adam`` and ``torch.optim.AdamW`` with their defaults (AdamW's
    decoupled weight decay 0.01)."""
    if kind in ("gd", "sgd"):
        return sgd(lr)
    if kind == "momentum":
        return sgd(lr, momentum=MOMENTUM)
    if kind == "adam":
        return adam(lr)
    if kind == "adamw":
        return adamw(lr)
    raise ValueError(f"unknown optimizer {kind!r}")


def _frozen(active: Tensor) -> Transformation:
    """Zero updates for the runs no longer ``active`` (bool ``[R]``, read at every step), so
    that their parameters freeze whatever their gradients hold."""

    def update(updates: Stack, state: EmptyState, params: Stack) -> tuple[Stack, EmptyState]:
        keep = {n: active.view(-1, *[1] * (u.dim() - 1)) for n, u in updates.items()}
        return {n: torch.where(keep[n], u, 0.0) for n, u in updates.items()}, state

    return Transformation(lambda params: EmptyState(), update)


class _Counted(NamedTuple):
    """The state of a step, and the number of steps taken."""

    inner: Any
    steps: int


def _balanced(
    step_fn: Transformation, structure: GaugeStructure, runs: Tensor, until: Tensor, active: Tensor
) -> Transformation:
    """``step_fn``, then the selected runs still ``active`` balanced (``runs``: bool ``[R]``)
    after each of their first ``until`` steps (``[R]``; 0: after every step), the optimizer
    buffers transported."""

    def update(grads: Stack, state: _Counted, params: Stack) -> tuple[Stack, _Counted]:
        params, inner = step_fn.update(grads, state.inner, params)
        steps = state.steps + 1
        now = runs & active & ((until == 0) | (until >= steps))
        balance_runs_(structure, params, now, inner)
        return params, _Counted(inner, steps)

    return Transformation(lambda params: _Counted(step_fn.init(params), 0), update)


def _per_layer_lr(
    structure: GaugeStructure,
    configs: list[RunConfig],
    optimizer: str,
    layout: Sequence[RunConfig],
) -> list[Transformation]:
    """per-layer-lr's multipliers (:func:`per_layer_lr_multipliers` of the initial parameters,
    computed at ``init``) on the updates of its runs, as a list of at most one transformation
    (one where a run of ``layout`` is per-layer-lr); ``ValueError`` for an optimizer outside
    :data:`PER_LAYER_LR_OPTIMIZERS`, and at ``init`` one naming the first run whose multipliers
    are not finite (the factors of a large ``s`` overflow: it would train as something else)."""
    if not any(METHODS[c.method].per_layer_lr for c in layout):
        return []
    runs = torch.tensor([METHODS[c.method].per_layer_lr for c in configs])
    if optimizer not in PER_LAYER_LR_OPTIMIZERS:
        raise ValueError(
            f"per-layer-lr is defined for {', '.join(PER_LAYER_LR_OPTIMIZERS)}, not {optimizer!r}"
        )

    def multipliers(params: Stack) -> Stack:
        factors = per_layer_lr_multipliers(structure, params, runs)
        finite = torch.stack([torch.isfinite(f) for f in factors.values()]).all(0)
        for c, ok in zip(configs, finite.tolist(), strict=True):
            if not ok:
                raise _refusal(
                    c,
                    f"at the initial imbalance s = {c.s!r} its per-layer learning-rate "
                    "multipliers (the mean d_e^-2 of each tensor) overflow float64",
                )
        return factors

    return [scale_by_tensor(multipliers)]


def per_layer_lr_multipliers(structure: GaugeStructure, stack: Stack, runs: Tensor) -> Stack:
    """The learning-rate multiplier of each parameter tensor ``T`` for the selected runs
    (``runs``: bool ``[R]``; 1 for the others), ``[R]`` float64 by name: ``c_T = mean_{e in T}
    d_e^-2``, ``d_e = exp(sum_n w_n(e) h_n)`` the factor by which balancing
    (:func:`balanced_gauges`) scales entry ``e``.

    GD from the balanced point ``theta' = D theta`` has gradient ``D^-1 grad L(theta)``, so in
    the original coordinates it is ``theta <- theta - lr D^-2 grad L(theta)`` at every step:
    GD with the fixed per-entry preconditioner ``D^-2``. ``c_T I`` is the multiple of the
    identity with its trace on each tensor (a tensor balancing does not touch keeps 1)."""
    h = torch.zeros(runs.shape[0], structure.num_generators, dtype=torch.float64)
    if bool(runs.any()) and structure.num_generators:
        sel = torch.nonzero(runs).reshape(-1)
        h[sel] = balanced_gauges(structure, {k: v[sel] for k, v in stack.items()})
    factors = {n: torch.ones_like(p, dtype=torch.float64) for n, p in stack.items()}
    rescale_(state_targets(factors, None), structure, -2 * h, batch_dims=1)
    return {n: f.flatten(1).mean(1) for n, f in factors.items()}


class SharpnessStart(NamedTuple):
    """min-sharpness-init's start for one seed: ``h`` (``[N]``, float64) that moves the seed's
    initialisation as given (``s = 0``) to it; the largest Hessian eigenvalue of the training
    loss at the balanced point (where the L-BFGS starts) and at the point found; the L-BFGS
    iterations and whether it reached :data:`MIN_SHARPNESS_TOL`."""

    h: Tensor
    balanced: float
    found: float
    iterations: int
    converged: bool


# min_sharpness_start's results in this process, by task hash and seed (a pure function's),
# each with the task it was computed on.
_SHARPNESS_STARTS: dict[tuple[str, int], tuple[Task, SharpnessStart]] = {}


def min_sharpness_start(
    task: Task, structure: GaugeStructure, hash_: str, seed: int
) -> SharpnessStart:
    """The point of the orbit of seed ``seed``'s initialisation (the task instance of hash
    ``hash_``) with the least largest Hessian eigenvalue ``lambda_max`` of the full training
    loss: :func:`gaugefix.equalize_` with :func:`gaugefix.sharpness_objective` (L-BFGS on ``h``,
    at most :data:`MIN_SHARPNESS_ITERATIONS` iterations) in float64, started from the balanced
    point, so the point is the same for every initial imbalance ``s``, and deterministic
    (Lanczos from a fixed seed). Computed once per process for each instance and seed: a
    result kept for ``hash_`` is used for ``task`` only when it was computed on ``task`` or on
    data and a model of the same :func:`task_hash` (the hash is the caller's label)."""
    key = (hash_, seed)
    kept = _SHARPNESS_STARTS.get(key)
    if kept is None or not (kept[0] is task or task_hash(kept[0]) == task_hash(task)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = task.make_model().to(torch.float64)
        x, y, _, _ = task.arrays(torch.float64)
        balanced = balance_(model, structure)
        found = equalize_(
            model,
            structure,
            sharpness_objective(model, task.loss, x, y),
            tol=MIN_SHARPNESS_TOL,
            max_iter=MIN_SHARPNESS_ITERATIONS,
        )
        start = SharpnessStart(
            balanced.h + found.h,
            found.objective_before,
            found.objective_after,
            found.iterations,
            found.converged,
        )
        _SHARPNESS_STARTS[key] = (task, start)
    return _SHARPNESS_STARTS[key][1]


def moved_starts_(
    tasks: Sequence[Task], structure: GaugeStructure, stack: Stack, configs: list[RunConfig]
) -> None:
    """The starts of the methods with a ``start``, run ``r`` on ``tasks[r]``, in place (the
    function unchanged):
    exact-first's orbit step at the rate of one step (``lr * strength``), and min-sharpness-init's
    point (:func:`min_sharpness_start`, reached from the run's ``s z``)."""
    if structure.num_generators == 0:
        return
    starts = [METHODS[c.method].start for c in configs]
    first = [
        c.lr * c.strength if st == "orbit-step" else 0.0
        for c, st in zip(configs, starts, strict=True)
    ]
    rate = torch.tensor(first, dtype=torch.float64)
    if bool((rate > 0).any()):
        orbit_step_(stack, None, structure, rate, batch_dims=1)
    h = torch.zeros(len(configs), structure.num_generators, dtype=torch.float64)
    z = init_direction(structure)
    for i, (c, st) in enumerate(zip(configs, starts, strict=True)):
        if st == "min-sharpness":
            h[i] = min_sharpness_start(tasks[i], structure, c.task_hash, c.seed).h - c.s * z
    if bool(h.any()):
        with torch.no_grad():
            rescale_(state_targets(stack, None), structure, h, batch_dims=1)


def run_stats(structure: GaugeStructure, stack: Stack) -> tuple[Tensor, Tensor]:
    """Per run, the RMS log-ratio and ``max |mu| / S`` of :func:`gaugefix.imbalance_stats`."""
    s_in, s_out, norm_sq = generator_sums(stack, structure, torch.float64, batch_dims=1)
    n = structure.num_generators
    stats = stats_from_sums(s_in[:, :n], s_out[:, :n], norm_sq)
    return stats[:, STAT_NAMES.index("log_ratio_rms")], stats[:, STAT_NAMES.index("mu_rel_max")]


def penalty_grads(structure: GaugeStructure, stack: Stack, strength: Tensor) -> Stack:
    """The gradient of ``P = (strength_r / 4) sum_n mu_n^2`` for every run (``strength``:
    ``[R]``): the engine's :func:`gaugefix.step.penalty` added to zero gradients."""
    zeros = {name: torch.zeros_like(p) for name, p in stack.items()}
    grads, _ = penalty(structure, strength=strength, batch_dims=1).update(
        zeros, EmptyState(), stack
    )
    return {name: grads[name] for name in structure.params if name in grads}


def balanced_gauges(structure: GaugeStructure, stack: Stack) -> Tensor:
    """``h`` ``[R, N]`` that balances every run, by :func:`gaugefix.balancing.solve_balance` (the
    iteration of :func:`gaugefix.balance_`)."""
    return solve_balance(Masses({k: v.detach() for k, v in stack.items()}, structure)).h


def balance_runs_(structure: GaugeStructure, stack: Stack, runs: Tensor, state: Any) -> None:
    """Hard gauge fixing of the selected runs (``runs``: bool ``[R]``), the optimizer buffers
    of ``state`` (a :mod:`gaugefix.step` state, or ``None``) transported."""
    if not bool(runs.any()) or structure.num_generators == 0:
        return
    sel = torch.nonzero(runs).reshape(-1)
    h = torch.zeros(runs.shape[0], structure.num_generators, dtype=torch.float64)
    h[sel] = balanced_gauges(structure, {k: v[sel] for k, v in stack.items()})
    rescale_(state_targets(stack, state), structure, h, batch_dims=1)


def _record(
    curves: list[list[CurvePoint]],
    step: int,
    loss: Tensor,
    stats: tuple[Tensor, Tensor],
    active: Tensor,
    runs: list[int],
) -> None:
    """A :class:`CurvePoint` of each row still ``active`` (``loss`` and ``stats``: ``[B]``)
    appended to the curve of its run (``runs``: the group's index of each row)."""
    per_run = torch.stack([loss.to(torch.float64), *stats], 1).tolist()
    for i in torch.nonzero(active).reshape(-1).tolist():
        curves[runs[i]].append(CurvePoint(step, *per_run[i]))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _peak(peak: float, final: float, initial: float, active: bool) -> float:
    """A run's peak ratio of loss to initial loss, the final loss on the whole training set
    included for a run active until then (a ratio that is not a number counts as ``inf``, as
    in :func:`_judge`)."""
    if not active:
        return peak
    ratio = final / initial if initial else math.inf
    return max(peak, math.inf if math.isnan(ratio) else ratio)


@torch.no_grad()
def _results(
    data: Instances,
    configs: list[RunConfig],
    template: torch.nn.Module,
    stack: Stack,
    initial: Tensor,
    active: Tensor,
    diverged_at: list,
    peak: Tensor,
    curves: list,
    structure: GaugeStructure,
) -> list[RunResult]:
    out_train = _outputs(template, stack, data, data.x)
    split = data.x_test is not None
    out_test = _outputs(template, stack, data, data.x_test) if split else None
    log_ratio, rel = run_stats(structure, stack)
    plain = active & torch.tensor([c.method == "plain" for c in configs])
    tasks = [data.tasks[k] for k in data.of_run.tolist()]
    change = balance_changes(tasks, template, structure, stack, plain)
    constants = [t.constant_loss() for t in data.tasks]
    results = []
    for i, (c, k) in enumerate(zip(configs, data.of_run.tolist(), strict=True)):
        task, constant = data.tasks[k], constants[k]
        start = float(initial[i])
        full = float(task.loss(out_train[i], data.y[k])) if active[i] else math.inf
        # the final loss judged as each step's is (_judge)
        ok = bool(active[i]) and math.isfinite(full) and full <= DIVERGENCE_FACTOR * start
        tested = ok and split
        final = full if ok else None
        results.append(
            RunResult(
                config=c,
                status=run_status(start, final, constant),
                initial_loss=start,
                constant_loss=constant,
                final_loss=final,
                test_loss=float(task.loss(out_test[i], data.y_test[k])) if tested else None,
                accuracy=task.accuracy(out_train[i], task.y) if ok else None,
                test_accuracy=task.accuracy(out_test[i], task.y_test) if tested else None,
                log_ratio_rms=_finite(float(log_ratio[i])) if ok else None,
                mu_rel_max=_finite(float(rel[i])) if ok else None,
                diverged_at=diverged_at[i] if ok or not active[i] else c.steps,
                peak_loss_ratio=_peak(float(peak[i]), full, start, bool(active[i])),
                balance_change=change.get(i),
                curves=curves[i],
            )
        )
    return results


def _outputs(template: torch.nn.Module, stack: Stack, data: Instances, inputs: Tensor) -> Tensor:
    """Every run's network on its instance's ``inputs`` (one of ``data``'s stacked arrays):
    ``[R, n, out]``."""
    x, dim = data.per_run(inputs)
    return vmap(lambda p, xb: functional_call(template, p, (xb,)), in_dims=(0, dim))(stack, x)


def balance_changes(
    tasks: list[Task],
    template: torch.nn.Module,
    structure: GaugeStructure,
    stack: Stack,
    runs: Tensor,
) -> dict[int, float]:
    """How much hard gauge fixing changes each selected trained network's outputs on its
    task's (``tasks``: one per run) training inputs, relative, in float64: the runs are
    balanced (``max |mu| / S <= 1e-10``) by the iteration of :func:`gaugefix.balance_` and
    ``||f_balanced - f|| / ||f||`` measured."""
    if not bool(runs.any()):
        return {}
    sel = torch.nonzero(runs).reshape(-1)
    params = {k: v[sel].detach().to(torch.float64) for k, v in stack.items()}
    data = instances([tasks[i] for i in sel.tolist()], torch.float64)
    before = _outputs(template, params, data, data.x)
    rescale_(
        state_targets(params, None), structure, balanced_gauges(structure, params), batch_dims=1
    )
    after = _outputs(template, params, data, data.x)
    diff = torch.linalg.vector_norm((after - before).flatten(1), dim=1)
    rel = diff / torch.linalg.vector_norm(before.flatten(1), dim=1)
    return dict(zip(sel.tolist(), rel.tolist(), strict=True))
