"""Training a group of runs as one batched computation.

Runs that share a task, an optimizer, a batch size and a number of steps differ only in method,
learning rate, strength, initial imbalance and seed: their parameters are stacked along a leading
dim and trained together with ``torch.func.vmap``. A run that diverges is masked out (its
parameters freeze) without stopping the others.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from gaugefix.action import apply_gauge_, rescale_
from gaugefix.balancing import solve_balance
from gaugefix.experiments.tasks import DATA_SEED, Task
from gaugefix.moment import STAT_NAMES, Masses, generator_sums, stats_from_sums
from gaugefix.soft import orbit_selection_grads, orbit_step
from gaugefix.structure import GaugeStructure, discover

# A stack maps each parameter name to ``[R, *shape]``: run ``r`` of a group is slice ``r``. The
# library's kernels take such stacks directly (``batch_dims=1``).
Stack = dict[str, Tensor]


@dataclass(frozen=True)
class Method:
    """A training method: whether it starts from the balanced point of its initialisation's
    orbit (``balance_`` at step 0; the function is unchanged), what it adds to every step
    (``fixing``: ``"penalty"``, ``"exact"``, ``"weight-decay"``, ``"balance"`` or ``None``),
    its definition in words (docs and report), and for a replica the method it replicates
    (``replica_of``): the same method from an independent initialisation draw for the run's
    seed (the same task instance, other weights), compared with that method only."""

    balanced_start: bool
    fixing: str | None
    definition: str
    replica_of: str | None = None


_FROM_GIVEN = "from the initialisation as given"
_FROM_BALANCED = "from the balanced point of the initialisation's orbit (balanced once at step 0)"
_PENALTY = (
    "the paper's functional `(strength / 4) sum_n mu_n^2` added to the loss (its closed-form "
    "gradient added to the optimizer's gradient)"
)
_EXACT = (
    "after every optimizer step, the bounded exact orbit step of `relax_` (`h = -rate mu`, "
    "`rate = lr * strength`)"
)
METHODS: dict[str, Method] = {
    "plain": Method(False, None, f"the optimizer alone, {_FROM_GIVEN}"),
    "balanced-init": Method(True, None, f"the optimizer alone, {_FROM_BALANCED}"),
    "penalty": Method(False, "penalty", f"{_PENALTY}, {_FROM_GIVEN}"),
    "balanced-penalty": Method(True, "penalty", f"{_PENALTY}, {_FROM_BALANCED}"),
    "exact": Method(False, "exact", f"{_EXACT}, {_FROM_GIVEN}"),
    "balanced-exact": Method(True, "exact", f"{_EXACT}, {_FROM_BALANCED}"),
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
}
STRENGTH_METHODS = tuple(
    m for m, d in METHODS.items() if d.fixing in ("penalty", "exact", "weight-decay")
)
# The references a method is compared with, where a regime has them: the optimizer alone from the
# initialisation as given (plain) and from its balanced point (balanced-init).
REFERENCES = tuple(m for m, d in METHODS.items() if d.fixing is None and not d.replica_of)
REPLICA_SEED = 1_000_003  # a replica of seed k is initialised from torch seed k + REPLICA_SEED
OPTIMIZERS = ("gd", "sgd", "momentum", "adam")
DIVERGENCE_FACTOR = 1e3
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
    to one is not stable) or ``"unstable"``."""
    if final is None:
        return "diverged"
    return "stable" if final <= margin * min(initial, constant) else "unstable"


def task_hash(task: Task) -> str:
    """What a run's task fixes, as 16 hex digits: a SHA-256 of the data arrays as trained on
    (dtypes, shapes, bytes), the loss kind, the model architecture (the modules' ``repr``) and
    :data:`DEFINITIONS`."""
    digest = hashlib.sha256(f"{DEFINITIONS}|{task.kind}|".encode())
    with torch.random.fork_rng(devices=[]):
        digest.update(repr(task.make_model()).encode())
    for t in (task.x, task.y, task.x_test, task.y_test):
        if t is None:
            digest.update(b"|no test split|")
            continue
        a = t.detach().cpu().contiguous().numpy()
        digest.update(f"|{a.dtype}{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


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

    def key(self) -> str:
        """The canonical identity of the run in a store."""
        return json.dumps(asdict(self), sort_keys=True)

    def group(self) -> tuple:
        """Runs with equal groups are trained together."""
        return (self.task, self.task_hash, self.optimizer, self.batch_size, self.steps, self.dtype)


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
    until it diverged; infinite where the loss became non-finite), for trained ``plain``
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


def _initial_stack(task: Task, configs: list[RunConfig], dtype: torch.dtype) -> tuple:
    """Each run's initial parameters: its task model's initialisation for its seed, moved along
    its own orbit by ``s z``; returns the template model, structure and the stack."""
    template = task.make_model().to(dtype)
    structure = discover(template, task.arrays(dtype)[0][:2])
    z = init_direction(structure)
    members = []
    for c in configs:
        torch.manual_seed(c.seed + REPLICA_SEED * bool(METHODS[c.method].replica_of))
        model = task.make_model().to(dtype)
        apply_gauge_(model, structure, c.s * z)
        members.append({n: p.detach() for n, p in model.named_parameters()})
    stack = {n: torch.stack([m[n] for m in members]).requires_grad_(True) for n in members[0]}
    return template, structure, stack


def train_group(
    task: Task,
    configs: list[RunConfig],
    record_every: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """Train ``configs`` (one group: same task, optimizer, batch size, steps, dtype) together;
    ``on_step(step)`` is called after each step (for progress)."""
    groups = {c.group() for c in configs}
    if len(groups) != 1:
        raise ValueError(f"train_group needs one group, got {sorted(groups)}")
    first = configs[0]
    dtype = getattr(torch, first.dtype)
    r = len(configs)
    template, structure, stack = _initial_stack(task, configs, dtype)

    def column(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=dtype)

    def strengths(fixing: str) -> Tensor:
        return column([c.strength if METHODS[c.method].fixing == fixing else 0.0 for c in configs])

    lr = column([c.lr for c in configs])
    pen, wd, exact = strengths("penalty"), strengths("weight-decay"), strengths("exact")
    hard = torch.tensor([METHODS[c.method].fixing == "balance" for c in configs])
    balance_rows_(
        structure, stack, torch.tensor([METHODS[c.method].balanced_start for c in configs]), {}
    )

    x, y, _, _ = task.arrays(dtype)
    forward = vmap(lambda p, xb: functional_call(template, p, (xb,)), in_dims=(0, None))
    batched_forward = vmap(lambda p, xb: functional_call(template, p, (xb,)))

    def losses(params: Stack, xb: Tensor, yb: Tensor, shared: bool) -> Tensor:
        out = forward(params, xb) if shared else batched_forward(params, xb)
        if task.kind == "regression":
            return 0.5 * (out - yb).square().sum(-1).mean(-1)
        flat = torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), yb.expand(r, -1).reshape(-1), reduction="none"
        )
        return flat.view(r, -1).mean(-1)

    with torch.no_grad():
        initial = losses(stack, x, y, True)
    active = torch.isfinite(initial)
    diverged_at: list[int | None] = [None if bool(a) else 0 for a in active]
    peak = torch.where(active, 0.0, math.inf)  # the largest loss / initial loss so far
    buffers: dict[str, Stack] = {k: {} for k in ("momentum", "exp_avg", "exp_avg_sq")}
    curves: list[list[CurvePoint]] = [[] for _ in range(r)]
    every = record_every or max(1, first.steps // 50)
    sampler = [torch.Generator().manual_seed(c.seed) for c in configs]
    n = len(x)

    for step in range(first.steps + 1):
        full = first.batch_size <= 0 or first.batch_size >= n
        if full:
            loss = losses(stack, x, y, True)
        else:
            idx = torch.stack([torch.randperm(n, generator=g)[: first.batch_size] for g in sampler])
            loss = losses(stack, x[idx], y[idx], False)
        bad = ~torch.isfinite(loss) | (loss > DIVERGENCE_FACTOR * initial)
        ratio = (loss.detach() / initial).nan_to_num(math.inf, math.inf)
        peak = torch.where(active, peak.fmax(ratio), peak)
        for i in torch.nonzero(active & bad).reshape(-1).tolist():
            diverged_at[i] = step
        active = active & ~bad
        if step % every == 0 or step == first.steps:
            _record(curves, step, loss.detach(), run_stats(structure, stack), active)
        if on_step is not None:
            on_step(step)
        if step == first.steps or not bool(active.any()):
            break
        grads = torch.autograd.grad(torch.where(active, loss, 0.0).sum(), list(stack.values()))
        with torch.no_grad():
            g = dict(zip(stack, grads, strict=True))
            if bool((pen > 0).any()):
                for name, extra in penalty_grads(structure, stack, pen).items():
                    g[name] = g[name] + extra
            if bool((wd > 0).any()):
                for name, p in stack.items():
                    g[name] = g[name] + _col(wd, p) * p
            _optimizer_step_(first.optimizer, stack, g, buffers, lr, active, step + 1)
            if bool((exact > 0).any()):
                rate = lr.to(torch.float64) * exact.to(torch.float64) * active
                h, _ = orbit_step(stack, structure, rate, batch_dims=1)
                rescale_(_transported(stack, buffers), structure, h, batch_dims=1)
            if bool(hard.any()):
                balance_rows_(structure, stack, hard & active, buffers)

    return _results(
        task, configs, template, stack, initial, active, diverged_at, peak, curves, structure
    )


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


_POWERS = {"momentum": -1, "exp_avg": -1, "exp_avg_sq": -2}


def _transported(stack: Stack, buffers: dict[str, Stack]) -> dict[str, list[tuple[Tensor, int]]]:
    """Each parameter stack with the optimizer buffers that move with it (gradient-like ones
    scale by the inverse factor, squared ones by its square)."""
    return {
        name: [(p, 1)] + [(b[name], _POWERS[k]) for k, b in buffers.items() if name in b]
        for name, p in stack.items()
    }


def run_stats(structure: GaugeStructure, stack: Stack) -> tuple[Tensor, Tensor]:
    """Per run, the RMS log-ratio and ``max |mu| / S`` of :func:`gaugefix.imbalance_stats`."""
    s_in, s_out, norm_sq = generator_sums(stack, structure, torch.float64, batch_dims=1)
    n = structure.num_generators
    stats = stats_from_sums(s_in[:, :n], s_out[:, :n], norm_sq)
    return stats[:, STAT_NAMES.index("log_ratio_rms")], stats[:, STAT_NAMES.index("mu_rel_max")]


def penalty_grads(structure: GaugeStructure, stack: Stack, strength: Tensor) -> Stack:
    """The gradient of ``P = (strength_r / 4) sum_n mu_n^2`` for every run (``strength``:
    ``[R]``), as :func:`gaugefix.OrbitSelectionPenalty` computes it for one model."""
    s_in, s_out, _ = generator_sums(stack, structure, torch.float64, batch_dims=1)
    n = structure.num_generators
    mu = (s_in - s_out)[:, :n] * strength.to(torch.float64)[:, None]
    return orbit_selection_grads(stack, structure, mu, batch_dims=1)


def balanced_gauges(structure: GaugeStructure, stack: Stack) -> Tensor:
    """``h`` ``[R, N]`` that balances every run, by :func:`gaugefix.balancing.solve_balance` (the
    iteration of :func:`gaugefix.balance_`)."""
    return solve_balance(Masses({k: v.detach() for k, v in stack.items()}, structure)).h


def balance_rows_(
    structure: GaugeStructure, stack: Stack, rows: Tensor, buffers: dict[str, Stack]
) -> None:
    """Hard gauge fixing of the selected runs (``rows``: bool ``[R]``)."""
    if not bool(rows.any()) or structure.num_generators == 0:
        return
    sel = torch.nonzero(rows).reshape(-1)
    h = torch.zeros(rows.shape[0], structure.num_generators, dtype=torch.float64)
    h[sel] = balanced_gauges(structure, {k: v[sel] for k, v in stack.items()})
    rescale_(_transported(stack, buffers), structure, h, batch_dims=1)


def _optimizer_step_(
    kind: str,
    stack: Stack,
    g: Stack,
    buffers: dict[str, Stack],
    lr: Tensor,
    active: Tensor,
    t: int,
) -> None:
    """One step of ``kind`` for every active run, in place (inactive runs are frozen)."""
    for name, p in stack.items():
        grad = g[name]
        lr_p = _col(lr * active, p)
        if kind in ("gd", "sgd"):
            update = grad
        elif kind == "momentum":
            buf = buffers["momentum"].get(name)
            buf = grad.clone() if buf is None else 0.9 * buf + grad
            buffers["momentum"][name] = torch.where(_col(active, p), buf, buf.new_zeros(()))
            update = buf
        elif kind == "adam":
            m = buffers["exp_avg"].setdefault(name, torch.zeros_like(p))
            v = buffers["exp_avg_sq"].setdefault(name, torch.zeros_like(p))
            m.mul_(0.9).add_(0.1 * grad)
            v.mul_(0.999).addcmul_(grad, grad, value=0.001)
            update = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        else:
            raise ValueError(f"unknown optimizer {kind!r}")
        p.sub_(lr_p * torch.nan_to_num(update))


def _record(
    curves: list[list[CurvePoint]],
    step: int,
    loss: Tensor,
    stats: tuple[Tensor, Tensor],
    active: Tensor,
) -> None:
    rows = torch.stack([loss.to(torch.float64), *stats], 1).tolist()
    for i in torch.nonzero(active).reshape(-1).tolist():
        curves[i].append(CurvePoint(step, *rows[i]))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def _results(
    task: Task,
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
    dtype = next(iter(stack.values())).dtype
    forward = vmap(lambda p, xb: functional_call(template, p, (xb,)), in_dims=(0, None))
    x, y, x_test, y_test = task.arrays(dtype)
    out_train = forward(stack, x)
    split = x_test is not None
    out_test = forward(stack, x_test) if split else None
    log_ratio, rel = run_stats(structure, stack)
    plain = active & torch.tensor([c.method == "plain" for c in configs])
    change = balance_changes(task, template, structure, stack, plain)
    constant = task.constant_loss()
    results = []
    for i, c in enumerate(configs):
        ok = bool(active[i])
        tested = ok and split
        final = _finite(float(task.loss(out_train[i], y))) if ok else None
        results.append(
            RunResult(
                config=c,
                status=run_status(float(initial[i]), final, constant),
                initial_loss=float(initial[i]),
                constant_loss=constant,
                final_loss=final,
                test_loss=float(task.loss(out_test[i], y_test)) if tested else None,
                accuracy=task.accuracy(out_train[i], task.y) if ok else None,
                test_accuracy=task.accuracy(out_test[i], task.y_test) if tested else None,
                log_ratio_rms=_finite(float(log_ratio[i])) if ok else None,
                mu_rel_max=_finite(float(rel[i])) if ok else None,
                diverged_at=diverged_at[i],
                peak_loss_ratio=float(peak[i]),
                balance_change=change.get(i),
                curves=curves[i],
            )
        )
    return results


def balance_changes(
    task: Task, template: torch.nn.Module, structure: GaugeStructure, stack: Stack, rows: Tensor
) -> dict[int, float]:
    """How much hard gauge fixing changes each selected trained network's outputs on the
    training inputs, relative, in float64: the runs are balanced (``max |mu| / S <= 1e-10``) by
    the iteration of :func:`gaugefix.balance_` and ``||f_balanced - f|| / ||f||`` measured."""
    if not bool(rows.any()):
        return {}
    sel = torch.nonzero(rows).reshape(-1)
    params = {k: v[sel].detach().to(torch.float64) for k, v in stack.items()}
    forward = vmap(lambda p, xb: functional_call(template, p, (xb,)), in_dims=(0, None))
    x = task.arrays(torch.float64)[0]
    before = forward(params, x)
    rescale_(_transported(params, {}), structure, balanced_gauges(structure, params), batch_dims=1)
    after = forward(params, x)
    diff = torch.linalg.vector_norm((after - before).flatten(1), dim=1)
    rel = diff / torch.linalg.vector_norm(before.flatten(1), dim=1)
    return dict(zip(sel.tolist(), rel.tolist(), strict=True))
