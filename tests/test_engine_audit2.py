"""Second audit of the sweep engine: a batched run is the library's run alone (torch.optim with
GaugeFixing, mini-batches, divergences and compactions in the group), compaction leaves the other
rows bitwise as they were in float32 too, and bad runs, blocks and data files are refused before
anything is trained or written."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gaugefix
from gaugefix.cli import app
from gaugefix.experiments import engine
from gaugefix.experiments.engine import METHODS, RunConfig, init_direction, train_group
from gaugefix.experiments.plan import Block
from gaugefix.experiments.runner import TaskSpec, run_all
from gaugefix.experiments.store import Store
from gaugefix.experiments.tasks import TaskError, npz_task

pytestmark = pytest.mark.usefixtures("single_thread")

cli = CliRunner()
TS = "teacher-student"
DTYPE = torch.float64
TORCH_OPTIMIZERS = {
    "gd": lambda ps, lr: torch.optim.SGD(ps, lr),
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr),
    "momentum": lambda ps, lr: torch.optim.SGD(ps, lr, momentum=engine.MOMENTUM),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr),
}


def _config(method: str = "plain", **changes) -> RunConfig:
    """A run of teacher-student instance ``seed`` (float64, full batch, GD unless changed)."""
    seed = changes.pop("seed", 0)
    values = dict(method=method, optimizer="gd", lr=0.1, strength=0.0, s=0.0, batch_size=0,
                  steps=4, dtype="float64")  # fmt: skip
    values.update(changes)
    hash_ = TaskSpec(TS).for_seed(max(seed, 0)).hash()  # a negative seed has no instance
    return RunConfig(TS, seed=seed, task_hash=hash_, **values)


def _fields(result) -> str:
    """Every field of a result, curves included, as text (equal texts: equal floats)."""
    return repr(dataclasses.asdict(result))


# -- a batched run is the library's run alone ------------------------------------------------------


def _library_run(config: RunConfig) -> tuple[list[float], float | None]:
    """``config`` trained alone by the library: torch.optim, GaugeFixing for penalty and exact
    (the method's ``every``), ``balance_`` for balanced starts and hard fixing (the optimizer's
    state transported), L2 in the loss for weight decay; the mini-batches drawn by a generator of
    the run's seed. The loss of every step (its batch's) until it diverges, and the final full
    training loss (``None``: diverged)."""
    method, task = METHODS[config.method], TaskSpec(TS).for_seed(config.seed).load()
    torch.manual_seed(config.seed)
    model = task.make_model().to(DTYPE)
    x, y, _, _ = task.arrays(DTYPE)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.apply_gauge_(model, structure, config.s * init_direction(structure))
    params = list(model.parameters())
    opt = TORCH_OPTIMIZERS[config.optimizer](params, config.lr)
    if method.balanced_start:
        gaugefix.balance_(model, structure)
    if method.fixing in ("penalty", "exact"):
        gaugefix.GaugeFixing(opt, model, structure, config.strength, mode=method.fixing,
                             every=method.every, balance_at_start=False)  # fmt: skip
    sampler = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        initial = float(task.loss(model(x), y))
    losses = []
    for step in range(config.steps + 1):
        batch = slice(None)
        if 0 < config.batch_size < len(x):
            batch = torch.randperm(len(x), generator=sampler)[: config.batch_size]
        loss = task.loss(model(x[batch]), y[batch])
        if not float(loss.detach()) <= engine.DIVERGENCE_FACTOR * initial:
            return losses, None
        losses.append(float(loss.detach()))
        if step == config.steps:
            break
        opt.zero_grad()
        if method.fixing == "weight-decay":
            loss = loss + config.strength / 2 * sum(p.square().sum() for p in params)
        loss.backward()
        opt.step()
        if method.fixing == "balance" and (method.until is None or step < method.until):
            gaugefix.balance_(model, structure, optimizer=opt)
    with torch.no_grad():
        return losses, float(task.loss(model(x), y))


LIBRARY_METHODS = (
    ("plain", 0.0),
    ("balanced-init", 0.0),
    ("penalty", 0.5),
    ("exact", 1.0),
    ("exact-every-10", 1.0),
    ("weight-decay", 1e-2),
    ("balance", 0.0),
    ("balance-after-step-1", 0.0),
)


@pytest.mark.parametrize(
    ("optimizer", "batch_size", "lrs"),
    [("momentum", 16, (0.02, 0.1, 0.3)), ("adamw", 16, (0.003, 0.03, 0.3))],
)
def test_a_mixed_group_with_mini_batches_and_divergences_is_the_library_run_alone(
    optimizer, batch_size, lrs
):
    """Every method the library has, on two instances, from an imbalanced start, at rates from
    stable to diverging (the group compacts): each run's loss at every step and its final loss
    equal the library's run alone to 1e-10."""
    configs = [
        _config(
            m,
            optimizer=optimizer,
            lr=lr,
            strength=st,
            s=1.0,
            seed=i % 2,
            batch_size=batch_size,
            steps=25,
        )  # fmt: skip
        for m, st in LIBRARY_METHODS
        for i, lr in enumerate(lrs)
    ]
    tasks = [TaskSpec(TS).for_seed(c.seed).load() for c in configs]
    results = train_group(tasks, configs, record_every=1)
    outcomes = set()
    for config, result in zip(configs, results, strict=True):
        losses, final = _library_run(config)
        assert [p.loss for p in result.curves] == pytest.approx(losses, rel=1e-10, abs=0)
        assert (result.final_loss is None) == (final is None), config
        if final is not None:
            assert result.final_loss == pytest.approx(final, rel=1e-10, abs=0)
        outcomes.add(result.status)
    assert outcomes >= {"stable", "diverged"}


def test_the_decoupled_penalty_is_the_penalty_under_gd():
    """Under GD the penalty's gradient taken after the update at ``lr * strength`` is the
    penalty's gradient in the update: one trajectory (the plan runs both at one strength)."""
    configs = [_config(m, lr=0.1, strength=1.0, s=1.0, steps=20)
               for m in ("penalty", "decoupled-penalty")]  # fmt: skip
    penalty, decoupled = train_group(TaskSpec(TS).load(), configs, record_every=1)
    for a, b in zip(penalty.curves, decoupled.curves, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-12, abs=0)
        assert a.log_ratio_rms == pytest.approx(b.log_ratio_rms, rel=1e-12, abs=0)
    assert penalty.curves[0].log_ratio_rms > 1.1 * penalty.log_ratio_rms  # the penalty acted


# -- compaction in float32 -------------------------------------------------------------------------


@pytest.mark.parametrize("stable", [1, 2, 3])
def test_compaction_to_one_active_row_leaves_it_bitwise_as_masked_in_float32(monkeypatch, stable):
    """A float32 group (every sweep's dtype) whose runs but ``stable`` diverge at once
    compacts once, and the rows left compute exactly what they compute with the diverged rows
    masked (a one-row product takes another kernel than a batched one: 1.5e-7 apart)."""
    lrs = (0.05, 0.03, 0.02)[:stable] + (100.0,) * 5
    configs = [_config(lr=lr, s=1.0, steps=30, dtype="float32") for lr in lrs]
    task = TaskSpec(TS).load()
    compactions = []
    compacted = engine._compacted

    def counted(group, rows, final):
        compactions.append(len(rows.runs))
        return compacted(group, rows, final)

    monkeypatch.setattr(engine, "_compacted", counted)
    dropping = train_group(task, configs, record_every=1)
    assert compactions == [len(configs)]
    monkeypatch.setattr(engine, "COMPACT_FRACTION", -1.0)
    masked = train_group(task, configs, record_every=1)
    assert [r.status for r in masked] == ["stable"] * stable + ["diverged"] * 5
    assert [_fields(a) for a in dropping] == [_fields(b) for b in masked]


# -- bad runs: refused before anything is trained or written ---------------------------------------


def test_a_negative_strength_is_refused_not_trained_as_plain():
    """A penalty, exact step or weight decay of negative strength is no method: it was trained
    as plain (the step leaves out a fixing no run uses at a positive strength) and recorded as
    the method at that strength."""
    task = TaskSpec(TS).load()
    for method in ("penalty", "exact", "weight-decay", "decoupled-penalty"):
        with pytest.raises(ValueError, match=f"strength of {method} must be finite and >= 0"):
            train_group(task, [_config(method, strength=-1.0, s=1.0)])


BAD_RUNS = {
    "negative strength": (dict(method="penalty", strength=-0.5), "strength of penalty must be"),
    "nan strength": (dict(strength=math.nan), "strength of plain must be finite and >= 0"),
    "unknown method": (dict(method="magic"), "unknown method 'magic'"),
    "unknown optimizer": (dict(optimizer="nadam"), "unknown optimizer 'nadam'"),
    "per-layer-lr under adam": (
        dict(method="per-layer-lr", optimizer="adam"),
        "per-layer-lr is defined for gd, sgd, momentum, not 'adam'",
    ),
    "nan lr": (dict(lr=math.nan), "lr must be finite and > 0"),
    "zero lr": (dict(lr=0.0), "lr must be finite and > 0"),
    "infinite s": (dict(s=math.inf), "initial imbalance s must be finite"),
    "integer dtype": (dict(dtype="int64"), "dtype must be a floating-point torch dtype"),
    "no dtype": (dict(dtype="nope"), "dtype must be a floating-point torch dtype"),
    "negative batch": (dict(batch_size=-1), "batch size must be >= 0"),
    "no steps": (dict(steps=0), "steps must be >= 1"),
    "negative seed": (dict(seed=-1), "seed must be >= 0"),
    "fractional steps": (dict(steps=5.5), "steps must be an integer, got 5.5"),
    "text lr": (dict(lr="0.1"), "lr must be a number, got '0.1'"),
}


@pytest.mark.parametrize("bad", list(BAD_RUNS))
def test_a_bad_run_among_good_ones_is_refused_before_any_is_written(tmp_path, bad):
    """Good runs sorted before and after the bad one (batches are trained in key order): one
    ValueError naming the run, and the store holds no run and no claim."""
    changes, message = BAD_RUNS[bad]
    configs = [_config(lr=0.1), _config(optimizer="sgd", lr=0.2, steps=3), _config(**changes)]
    store = Store(tmp_path / "runs.sqlite")
    with pytest.raises(ValueError, match=message) as err:
        run_all(store, configs, lambda c: TaskSpec(TS).for_seed(c.seed))
    assert len(str(err.value).splitlines()) == 1
    assert store.runs() == [] and store.claims() == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(optimizer="nadam"), "unknown optimizer 'nadam'"),
        (dict(methods={"penalty": (0.1, -1.0)}), "strength of penalty must be finite and >= 0"),
        (dict(methods={"exact": (math.nan,)}), "strength of exact must be finite and >= 0"),
        (dict(methods={"per-layer-lr": (0.0,)}, optimizer="adam"), "per-layer-lr is defined"),
        (dict(s=(0.0, math.nan)), "initial imbalance s must be finite"),
    ],
)
def test_a_block_of_runs_the_engine_cannot_train_is_refused(changes, message):
    values = dict(methods={"plain": (0.0,)}, optimizer="gd", lr_range=(-4, 0), s=(0.0,),
                  seeds=1, steps=10)  # fmt: skip
    with pytest.raises(ValueError, match=message):
        Block(**{**values, **changes})


# -- data files: what is trained on is what was checked --------------------------------------------


def _xy(rows: int = 12, features: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(rows, features))
    return x, x[:, :1] ** 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (lambda x, y: {"X": x * 1e300, "y": y}, "X holds 36 values beyond float32's range"),
        (
            lambda x, y: {"X": x, "y": y, "X_test": x, "y_test": y - 1e39},
            "y_test holds 12 values beyond float32's range",
        ),
        (lambda x, y: {"X": x + 1j, "y": y}, "X must be real numbers, got complex128"),
        (lambda x, y: {"X": x, "y": y + 0j}, "y must be real numbers, got complex128"),
        (lambda x, y: {"X": x[:, :0], "y": y}, "X has no feature columns"),
        (lambda x, y: {"X": x, "y": y[:, :0]}, "regression targets y have no columns"),
    ],
)
def test_a_data_file_that_would_train_on_other_numbers_is_refused(tmp_path, arrays, message):
    """Values finite in the file but infinite in float32 (every run diverged at step 0),
    complex values (their imaginary parts dropped), no features, or no targets (every run
    stable at every rate: the loss of nothing is 0) are refused with one line."""
    path = tmp_path / "data.npz"
    np.savez(path, **arrays(*_xy()))
    with pytest.raises(TaskError, match=message):
        npz_task(path, "regression", (8,))
    out = tmp_path / "out"
    result = cli.invoke(app, ["sweep", "--data", str(path), "--steps", "2", "--out", str(out)])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_training_leaves_the_callers_random_state_as_it_was():
    """Each run's initialisation is drawn from its own seed without reseeding the caller's
    generator (which ended seeded by the group's last run: a caller's later draws repeated
    across sweeps of other grids)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_group(TaskSpec(TS).load(), [_config(seed=0), _config("plain-replica", seed=0)])
    assert torch.equal(torch.rand(3), expected)


def test_one_run_given_in_other_number_types_has_one_key_and_trains_once(tmp_path):
    """``1`` and ``1.0``, ``-0.0`` and ``0.0``, numpy's scalars and Python's: one run, one key
    (two keys trained it twice and the summary counted it twice), read back as written."""
    given = _config("penalty", lr=np.float32(0.25), strength=1, s=-0.0, seed=np.int64(0),
                    steps=np.int32(3))  # fmt: skip
    canonical = _config("penalty", lr=0.25, strength=1.0, s=0.0, seed=0, steps=3)
    assert given.key() == canonical.key() and given == canonical
    store = Store(tmp_path / "runs.sqlite")
    assert run_all(store, [given, canonical], lambda c: TaskSpec(TS).for_seed(c.seed)) == 1
    (stored,) = store.runs()
    assert stored.config.key() == canonical.key()
    assert run_all(store, [canonical], lambda c: TaskSpec(TS).for_seed(c.seed)) == 0
