"""Third audit of the sweep engine: every run of a batched group, for every method and optimizer,
is the run trained alone by the engine and the run trained alone by the library (torch.optim,
GaugeFixing, balance_, relax_, OrbitSelectionPenalty) to 1e-10 in float64: losses, final
parameters, imbalance and stopping step, with learning rates orders of magnitude apart, strengths
of 0, runs non-finite at step 0 and runs diverging at other steps (the group compacts); and no
run's result depends on the others' order."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import NamedTuple

import pytest
import torch

import gaugefix
from gaugefix.experiments import engine
from gaugefix.experiments.engine import METHODS, RunConfig, init_direction, train_group
from gaugefix.experiments.runner import TaskSpec

pytestmark = pytest.mark.usefixtures("single_thread")

TS = "teacher-student"
DTYPE = torch.float64
TOL = 1e-10
STEPS = 12
# The instance (seed) with an infinite feature: its runs' loss is not finite at step 0.
POISONED = 2
# The imbalance statistics a run records.
STATS = ("log_ratio_rms", "mu_rel_max")
TORCH_OPTIMIZERS = {
    "gd": lambda groups: torch.optim.SGD(groups),
    "sgd": lambda groups: torch.optim.SGD(groups),
    "momentum": lambda groups: torch.optim.SGD(groups, momentum=engine.MOMENTUM),
    "adam": lambda groups: torch.optim.Adam(groups),
    "adamw": lambda groups: torch.optim.AdamW(groups),
}
# (method, strength): every method but min-sharpness-init, strengths of 0 beside positive ones.
LIBRARY_METHODS = (
    ("plain", 0.0),
    ("plain-replica", 0.0),
    ("balanced-init", 0.0),
    ("penalty", 0.5),
    ("penalty", 0.0),
    ("balanced-penalty", 0.5),
    ("decoupled-penalty", 0.5),
    ("decoupled-penalty", 0.0),
    ("exact", 1.0),
    ("exact", 0.0),
    ("balanced-exact", 1.0),
    ("exact-every-10", 1.0),
    ("exact-first", 1.0),
    ("weight-decay", 1e-2),
    ("weight-decay", 0.0),
    ("balance", 0.0),
    ("balance-after-step-1", 0.0),
    ("per-layer-lr", 0.0),
)
# (optimizer, batch size, learning rates from 1e-4 to diverging within the steps).
GROUPS = [
    ("gd", 0, (1e-4, 0.05, 1.5)),
    ("sgd", 16, (1e-4, 0.05, 1.5)),
    ("momentum", 16, (1e-4, 0.02, 0.4)),
    ("adam", 0, (1e-4, 0.01, 3.0)),
    ("adamw", 16, (1e-4, 0.01, 3.0)),
]


def _config(method: str = "plain", **changes) -> RunConfig:
    """A run of teacher-student instance ``seed`` (float64, full batch, GD unless changed)."""
    seed = changes.pop("seed", 0)
    values = dict(method=method, optimizer="gd", lr=0.1, strength=0.0, s=1.0, batch_size=0,
                  steps=STEPS, dtype="float64")  # fmt: skip
    values.update(changes)
    return RunConfig(TS, seed=seed, task_hash=TaskSpec(TS).for_seed(seed).hash(), **values)


def _load(seed: int):
    """Teacher-student instance ``seed``; :data:`POISONED` with one feature infinite."""
    task = TaskSpec(TS).for_seed(seed).load()
    if seed != POISONED:
        return task
    x = task.x.clone()
    x[0, 0] = math.inf
    return dataclasses.replace(task, x=x)


def _tasks(configs: list[RunConfig]) -> list:
    loaded = {k: _load(k) for k in {c.seed for c in configs}}
    return [loaded[c.seed] for c in configs]


class Trained(NamedTuple):
    """A run's trajectory: the loss and imbalance statistics (RMS log-ratio, ``max |mu| / S``)
    of each step until it stopped, the step it diverged at (``None``: never), the final full
    training loss and imbalance statistics (``None``: diverged), the peak loss ratio and the
    final parameters ``name -> [*shape]``."""

    losses: list[float]
    stats: list[tuple[float, float]]
    diverged_at: int | None
    final_loss: float | None
    log_ratio_rms: float | None
    mu_rel_max: float | None
    peak: float
    params: dict[str, torch.Tensor]


def _engine_runs(configs: list[RunConfig], monkeypatch) -> list[Trained]:
    """``configs`` trained as one group by the engine, with each run's final parameters."""
    stacks = []
    results_of = engine._results

    def spy(data, configs, template, stack, *rest):
        stacks.append({n: p.detach().clone() for n, p in stack.items()})
        return results_of(data, configs, template, stack, *rest)

    monkeypatch.setattr(engine, "_results", spy)
    results = train_group(_tasks(configs), configs, record_every=1)
    monkeypatch.setattr(engine, "_results", results_of)
    (stack,) = stacks
    return [
        Trained(
            [p.loss for p in r.curves],
            [(p.log_ratio_rms, p.mu_rel_max) for p in r.curves],
            r.diverged_at,
            r.final_loss,
            r.log_ratio_rms,
            r.mu_rel_max,
            r.peak_loss_ratio,
            {n: p[i] for n, p in stack.items()},
        )
        for i, r in enumerate(results)
    ]


def _per_layer_groups(model, structure, lr: float) -> list[dict]:
    """per-layer-lr's parameter groups: tensor ``T`` at ``lr * mean_e (theta_e / theta'_e)^2``,
    ``theta'`` the balanced copy of the model (``d_e = theta'_e / theta_e``)."""
    balanced = copy.deepcopy(model)
    gaugefix.balance_(balanced, structure)
    after = dict(balanced.named_parameters())
    return [
        {"params": [p], "lr": lr * float(((p.detach() / after[n].detach()) ** 2).mean())}
        for n, p in model.named_parameters()
    ]


def _library_start(config: RunConfig):
    """``config``'s model, data and structure at step 0, by the library alone."""
    method, task = METHODS[config.method], _load(config.seed)
    torch.manual_seed(config.seed + engine.REPLICA_SEED * bool(method.replica_of))
    model = task.make_model().to(DTYPE)
    x, y, _, _ = task.arrays(DTYPE)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.apply_gauge_(model, structure, config.s * init_direction(structure))
    if method.balanced_start:
        gaugefix.balance_(model, structure)
    if method.start == "orbit-step":
        gaugefix.relax_(model, structure, config.lr * config.strength)
    return task, model, x, y, structure


def _library_run(config: RunConfig) -> Trained:
    """``config`` trained alone by the library (torch.optim; GaugeFixing for penalty and exact,
    ``balance_`` for hard fixing, the penalty's gradient of OrbitSelectionPenalty after the
    optimizer's update for the decoupled penalty, L2 in the loss for weight decay, a parameter
    group per tensor for per-layer-lr), mini-batches drawn by a generator of the run's seed."""
    method = METHODS[config.method]
    task, model, x, y, structure = _library_start(config)
    params = list(model.parameters())
    groups = [{"params": params, "lr": config.lr}]
    if method.per_layer_lr:
        groups = _per_layer_groups(model, structure, config.lr)
    opt = TORCH_OPTIMIZERS[config.optimizer](groups)
    if method.fixing in ("penalty", "exact"):
        gaugefix.GaugeFixing(opt, model, structure, config.strength, mode=method.fixing,
                             every=method.every, balance_at_start=False)  # fmt: skip
    vertical = gaugefix.OrbitSelectionPenalty(structure, 1.0)
    sampler = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        initial = float(task.loss(model(x), y))
    ratios, stats = [], []
    for step in range(config.steps + 1 if math.isfinite(initial) else 0):
        batch = slice(None)
        if 0 < config.batch_size < len(x):
            batch = torch.randperm(len(x), generator=sampler)[: config.batch_size]
        loss = task.loss(model(x[batch]), y[batch])
        ratios.append(float(loss.detach()) / initial)
        if not ratios[-1] <= engine.DIVERGENCE_FACTOR:
            break
        stats.append(tuple(gaugefix.imbalance_stats(model, structure)[k] for k in STATS))
        if step == config.steps:
            break
        if method.fixing == "weight-decay":
            loss = loss + config.strength / 2 * sum(p.square().sum() for p in params)
        opt.zero_grad()
        loss.backward()
        decoupled = vertical.grad(model) if method.fixing == "decoupled-penalty" else {}
        opt.step()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in decoupled:
                    p.sub_(config.lr * config.strength * decoupled[name])
        if method.fixing == "balance" and (method.until is None or step < method.until):
            gaugefix.balance_(model, structure, optimizer=opt)
    return _judged(task, model, (x, y), structure, initial, ratios, stats)


@torch.no_grad()
def _judged(task, model, data, structure, initial: float, ratios: list, stats: list) -> Trained:
    """The library run's :class:`Trained` from its loss ratios and statistics of each step
    (up to the one it diverged at): the final full loss judged like a step's, and counted in
    the peak ratio (a ratio that is not a number counts as ``inf``)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [r * initial for r in ratios[: len(stats)]]
    if len(stats) == len(ratios) and stats:  # ran to the end
        ratios.append(float(task.loss(model(data[0]), data[1])) / initial)
    peak = max([math.inf if math.isnan(r) else r for r in ratios], default=math.inf)
    if not ratios or not ratios[-1] <= engine.DIVERGENCE_FACTOR:
        return Trained(losses, stats, max(len(ratios) - 1, 0), None, None, None, peak, params)
    end = gaugefix.imbalance_stats(model, structure)
    final = ratios[-1] * initial
    return Trained(losses, stats, None, final, *(end[k] for k in STATS), peak, params)


def _close(a: float | None, b: float | None, absolute: float = 0.0) -> bool:
    """Both ``None``, or equal to :data:`TOL` relative (or ``absolute``)."""
    return (a is None) == (b is None) and (
        a is None or a == pytest.approx(b, rel=TOL, abs=absolute)
    )


def _assert_same(a: Trained, b: Trained, label: tuple) -> None:
    """Equal trajectories to :data:`TOL`: losses relative, the imbalance statistics (ratios,
    near 0 at a balanced point) absolute too, parameters to TOL of their largest finite entry
    (non-finite entries equal)."""
    assert a.losses == pytest.approx(b.losses, rel=TOL, abs=0), label
    assert sum(a.stats, ()) == pytest.approx(sum(b.stats, ()), rel=TOL, abs=TOL), label
    assert a.peak == pytest.approx(b.peak, rel=TOL, abs=0), label
    assert a.diverged_at == b.diverged_at, label
    assert _close(a.final_loss, b.final_loss), (a.final_loss, b.final_loss, label)
    for f in ("log_ratio_rms", "mu_rel_max"):
        assert _close(getattr(a, f), getattr(b, f), TOL), (f, getattr(a, f), getattr(b, f), label)
    for n, p in b.params.items():
        scale = float(p.nan_to_num(0, 0, 0).abs().max())
        assert torch.allclose(a.params[n], p, rtol=0, atol=TOL * scale, equal_nan=True), (n, label)


def _group_configs(optimizer: str, batch_size: int, lrs: tuple[float, ...]) -> list[RunConfig]:
    """Every library method at every rate, on two instances, plus runs non-finite at step 0."""
    configs = [
        _config(m, optimizer=optimizer, lr=lr, strength=st, seed=i % 2, batch_size=batch_size)
        for m, st in LIBRARY_METHODS
        if optimizer in engine.PER_LAYER_LR_OPTIMIZERS or m != "per-layer-lr"
        for i, lr in enumerate(lrs)
    ]
    poisoned = [
        _config(
            m, optimizer=optimizer, lr=lrs[1], strength=st, seed=POISONED, batch_size=batch_size
        )
        for m, st in (("plain", 0.0), ("exact", 1.0), ("balance", 0.0))
    ]
    return configs + poisoned


@pytest.mark.parametrize(("optimizer", "batch_size", "lrs"), GROUPS)
def test_a_batched_run_is_the_run_alone_in_the_engine_and_in_the_library(
    monkeypatch, optimizer, batch_size, lrs
):
    """Each run of a mixed group (every method, rates 1e-4 to diverging, strengths 0, runs
    non-finite at step 0; the group compacts) equals the engine's group of that run alone and
    the library's run: losses, imbalance, peak ratio, stopping step, final parameters."""
    configs = _group_configs(optimizer, batch_size, lrs)
    compactions, compacted = [], engine._compacted

    def counted(group, rows, final):
        compactions.append(len(rows.runs))
        return compacted(group, rows, final)

    monkeypatch.setattr(engine, "_compacted", counted)
    batched = _engine_runs(configs, monkeypatch)
    assert compactions, "the group compacts"
    stops = set()
    for config, run in zip(configs, batched, strict=True):
        (alone,) = _engine_runs([config], monkeypatch)
        _assert_same(run, alone, ("alone", config))
        _assert_same(run, _library_run(config), ("library", config))
        stops.add(run.diverged_at)
    assert {None, 0} < stops, "runs run to the end, diverge at step 0 and at later steps"


def _fields(result) -> str:
    """Every field of a result, curves included, as text (equal texts: equal floats)."""
    return repr(dataclasses.asdict(result))


@pytest.mark.parametrize(("optimizer", "batch_size"), [("momentum", 16), ("adam", 0)])
def test_no_run_depends_on_the_order_of_the_others(optimizer, batch_size):
    """A mixed group (methods with optimizer buffers, samplers, orbit steps, hard fixing;
    divergences at several steps and at step 0) trained in three orders: each run's result is
    bitwise the same (no state or random stream shared by position)."""
    configs = [
        _config(m, optimizer=optimizer, lr=lr, strength=st, seed=i % 3, batch_size=batch_size)
        for m, st in (("plain", 0.0), ("exact-every-10", 1.0), ("balance", 0.0), ("penalty", 0.5))
        for i, lr in enumerate((1e-3, 0.02, 0.4, 3.0))
    ]
    orders = [list(range(len(configs))), list(range(len(configs)))[::-1]]
    orders.append(sorted(orders[0], key=lambda i: (i * 7) % len(configs)))
    trained, stops = [], set()
    for order in orders:
        chosen = [configs[i] for i in order]
        results = train_group(_tasks(chosen), chosen, record_every=1)
        trained.append({i: _fields(r) for i, r in zip(order, results, strict=True)})
        stops |= {r.diverged_at for r in results}
    assert trained[0] == trained[1] == trained[2]
    assert len(stops) >= 3 and {None, 0} < stops


def _leaves(value) -> list:
    """The numbers, strings and ``None`` s of a result's fields, in order."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _assert_results_close(batched: list, alone: list) -> None:
    """Every field of each result, curves included, equal to :data:`TOL` relative (numbers of
    size 1 or less: absolute); texts, integers and ``None`` s equal."""
    for a, b in zip(batched, alone, strict=True):
        left, right = _leaves(dataclasses.asdict(a)), _leaves(dataclasses.asdict(b))
        assert len(left) == len(right), a.config
        for x, y in zip(left, right, strict=True):
            if isinstance(y, float):
                assert x == pytest.approx(y, rel=TOL, abs=TOL, nan_ok=True), a.config
            else:
                assert x == y, a.config


def _alone(configs: list[RunConfig], tasks: list) -> list:
    return [train_group([t], [c], record_every=1)[0] for c, t in zip(configs, tasks, strict=True)]


def test_a_classification_group_with_a_test_split_is_each_run_alone():
    """Digits (cross-entropy, accuracies, a test split) under Adam on two instances, at rates
    from 1e-4 to diverging, with the fixings: every field equals the run trained alone."""
    specs = {k: TaskSpec("digits").for_seed(k) for k in (0, 1)}
    loaded = {k: spec.load() for k, spec in specs.items()}
    configs = [
        RunConfig(
            "digits", m, "adam", lr, st, 1.0, i % 2, 64, 8, "float64", task_hash=specs[i % 2].hash()
        )  # fmt: skip
        for m, st in (("plain", 0.0), ("exact", 1.0), ("decoupled-penalty", 0.5), ("balance", 0.0))
        for i, lr in enumerate((1e-4, 3e-3, 1.0, 30.0))
    ]
    tasks = [loaded[c.seed] for c in configs]
    batched = train_group(tasks, configs, record_every=1)
    assert {r.status for r in batched} >= {"stable", "diverged"}
    assert all(r.test_accuracy is not None for r in batched if r.status == "stable")
    _assert_results_close(batched, _alone(configs, tasks))


# min-sharpness-init's L-BFGS iterations in the group test: a group and its runs alone start
# from the same point whatever the search's length (a pure function of the instance and seed),
# so a few iterations that move the start suffice (what the full search finds:
# tests/test_analyses_audit2.py and tests/test_analyses_audit4.py).
FEW_SHARPNESS_ITERATIONS = 3


def test_min_sharpness_init_in_a_group_is_the_run_alone(monkeypatch):
    """min-sharpness-init beside plain and exact-first runs (other starts in one group), at
    rates from 1e-4 to diverging: every field equals the run trained alone, whose start is
    searched afresh (not kept from the group's)."""
    monkeypatch.setattr(engine, "MIN_SHARPNESS_ITERATIONS", FEW_SHARPNESS_ITERATIONS)
    monkeypatch.setattr(engine, "_SHARPNESS_STARTS", {})
    configs = [
        _config(m, lr=lr, strength=st, seed=i % 2)
        for m, st in (("min-sharpness-init", 0.0), ("exact-first", 1.0), ("plain", 0.0))
        for i, lr in enumerate((1e-4, 0.05, 1.5))
    ]
    tasks = _tasks(configs)
    batched = train_group(tasks, configs, record_every=1)
    assert {r.status for r in batched} >= {"diverged"}
    starts = {k: v[1] for k, v in engine._SHARPNESS_STARTS.items()}
    assert len(starts) == 2 and all(s.found < s.balanced for s in starts.values())  # moved
    monkeypatch.setattr(engine, "_SHARPNESS_STARTS", {})
    _assert_results_close(batched, _alone(configs, tasks))


# An initial imbalance whose gauge move keeps the float64 parameters finite (e^400 < 1e308)
# but overflows their squares (e^800), which balancing, the orbit steps and the penalty use; and
# one (on instance 0) whose squares are finite but not their sum, which balancing also needs.
OVERFLOWING_SQUARES_S = 400.0
OVERFLOWING_NORM_S = 354.0


@pytest.mark.parametrize(
    ("method", "s"),
    [
        *((m, OVERFLOWING_SQUARES_S) for m in ("balanced-init", "exact", "exact-first")),
        *((m, OVERFLOWING_SQUARES_S) for m in ("penalty", "balance", "per-layer-lr")),
        ("balanced-init", OVERFLOWING_NORM_S),
        ("decoupled-penalty", OVERFLOWING_NORM_S),
    ],
)
def test_a_run_whose_squared_parameters_overflow_is_refused_not_trained_as_another(method, s):
    """A gauge-using method at an initial imbalance whose squares (or their sum) overflow
    float64 trained as the optimizer alone from the unbalanced point (balancing and orbit steps
    skip a copy whose masses are not finite; the penalty's gradient is NaN), recorded under its
    name (balanced-init at s = 400: diverged at step 1, log-ratio NaN at step 0; balanced, it is
    the run from s = 0, stable): one ValueError naming the run and its s, before any step."""
    configs = [_config("plain", lr=0.05), _config(method, lr=0.05, strength=1.0, s=s)]
    steps = []
    with pytest.raises(ValueError, match="squares of its float64 parameters overflow") as err:
        train_group(_tasks(configs), configs, on_step=steps.append)
    assert f"({TS}, {method}, gd, lr 0.05, seed 0): at the initial imbalance s = {s!r}" in str(
        err.value
    )
    assert len(str(err.value).splitlines()) == 1 and steps == []


def test_the_optimizer_alone_trains_at_an_initial_imbalance_whose_squares_overflow():
    """plain and weight decay use no masses: trained, the function the same as from s = 0."""
    configs = [
        _config(m, lr=0.05, strength=st, s=s)
        for m, st in (("plain", 0.0), ("weight-decay", 0.0))
        for s in (0.0, OVERFLOWING_SQUARES_S)
    ]
    results = train_group(_tasks(configs), configs, record_every=1)
    assert results[0].curves[0].loss == pytest.approx(results[1].curves[0].loss, rel=TOL)
    assert all(r.curves for r in results)
