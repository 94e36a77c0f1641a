"""``gaugefix.step``: its optimizers are ``torch.optim``'s (SGD, momentum, Adam, AdamW; float64,
1e-12, with and without leading run dims); its penalty and exact orbit step are
``GaugeFixing``'s, and the sweep engine's runs follow the same trajectories as ``GaugeFixing`` on
each run alone (penalty; exact every 1 and every 10)."""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import step
from gaugefix.experiments import engine
from gaugefix.experiments.engine import Method, RunConfig, init_direction, task_hash, train_group
from gaugefix.experiments.tasks import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.opcount import OpCounter  # noqa: E402

DTYPE = torch.float64
STEPS = 6
TORCH = {
    "sgd": (lambda ps, lr: torch.optim.SGD(ps, lr), lambda lr: step.sgd(lr)),
    "momentum": (
        lambda ps, lr: torch.optim.SGD(ps, lr, momentum=0.9),
        lambda lr: step.sgd(lr, momentum=0.9),
    ),
    "adam": (lambda ps, lr: torch.optim.Adam(ps, lr), lambda lr: step.adam(lr)),
    "adamw": (lambda ps, lr: torch.optim.AdamW(ps, lr), lambda lr: step.adamw(lr)),
}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).to(DTYPE)


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(DTYPE)  # fmt: skip


ARCHS = {"mlp": (mlp, (5,)), "cnn": (cnn, (2, 8, 8))}


def data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, *shape, generator=g, dtype=DTYPE), torch.randn(
        16, 3, generator=g, dtype=DTYPE
    )


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) - y).square().sum(-1).mean()


def torch_trajectory(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> list[dict]:
    out = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def stacked_grads(models: list[nn.Module], x, y) -> dict[str, torch.Tensor]:
    for m in models:
        m.zero_grad()
        loss_of(m, x, y).backward()
    names = [n for n, _ in models[0].named_parameters()]
    return {n: torch.stack([dict(m.named_parameters())[n].grad for m in models]) for n in names}


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", list(TORCH))
def test_optimizers_equal_torch_optim_alone_and_stacked(arch, kind):
    """Several steps of sgd / momentum / adam equal torch.optim's, for one model (``batch_dims``
    0, a float lr) and for three copies stacked on a leading dim, each with its own lr (a tensor
    ``[3]``), the gradients of each copy taken at its own parameters."""
    build, shape = ARCHS[arch]
    x, y = data(shape)
    make_torch, make_step = TORCH[kind]
    lrs = [0.01, 0.03, 0.002]
    references = []
    for r, lr in enumerate(lrs):
        model = build(r)
        references.append(torch_trajectory(model, make_torch(model.parameters(), lr), x, y))
    # one model alone
    model = build(0)
    params = dict(model.named_parameters())
    tx = step.applied(make_step(lrs[0]))
    state = tx.init(params)
    for t in range(STEPS):
        model.zero_grad()
        loss_of(model, x, y).backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        params, state = tx.update(grads, state, params)
        for n, p in params.items():
            assert_close(p.detach(), references[0][t][n])
    # three copies stacked
    models = [build(r) for r in range(len(lrs))]
    stack = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in params
    }
    tx = step.applied(make_step(torch.tensor(lrs, dtype=DTYPE)))
    state = tx.init(stack)
    for t in range(STEPS):
        with torch.no_grad():  # each copy's model holds its slice of the stack
            for r, m in enumerate(models):
                for n, p in m.named_parameters():
                    p.copy_(stack[n][r])
        stack, state = tx.update(stacked_grads(models, x, y), state, stack)
        for r in range(len(lrs)):
            for n in stack:
                assert_close(stack[n][r], references[r][t][n])


def hooked_trajectory(model, structure, opt, x, y, **fixing) -> list[dict]:
    gaugefix.GaugeFixing(opt, model, structure, balance_at_start=False, **fixing)
    return torch_trajectory(model, opt, x, y)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "kind,mode,every",
    [("sgd", "penalty", 1), ("adam", "penalty", 1), ("sgd", "exact", 1),
     ("momentum", "exact", 2), ("adam", "exact", 3), ("adamw", "penalty", 1),
     ("adamw", "exact", 2)],
)  # fmt: skip
def test_penalty_and_exact_equal_gauge_fixing(arch, kind, mode, every):
    """The step's penalty before the optimizer, and its exact orbit step every ``every`` steps
    after it (the optimizer's buffers transported), equal GaugeFixing around torch.optim."""
    build, shape = ARCHS[arch]
    x, y = data(shape)
    make_torch, make_step = TORCH[kind]
    lr, strength = 0.02, 3.0
    model = build(0)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.random_gauge_(model, structure, 1.0, generator=torch.Generator().manual_seed(2))
    mine = copy.deepcopy(model)
    opt = make_torch(model.parameters(), lr)
    reference = hooked_trajectory(model, structure, opt, x, y, strength=strength, mode=mode,
                                  every=every)  # fmt: skip
    params = dict(mine.named_parameters())
    if mode == "penalty":
        tx = step.applied(step.chain(step.penalty(structure, strength=strength), make_step(lr)))
    else:
        tx = step.exact(step.applied(make_step(lr)), structure, lr=lr, strength=strength,
                        every=every)  # fmt: skip
    state = tx.init(params)
    for t in range(STEPS):
        mine.zero_grad()
        loss_of(mine, x, y).backward()
        params, state = tx.update({n: p.grad.clone() for n, p in params.items()}, state, params)
        for n, p in params.items():
            assert_close(p.detach(), reference[t][n])


def test_state_targets_find_every_buffer_in_nested_states():
    """Momentum and Adam buffers are found with their powers inside chains and exact wrappers."""
    model = mlp(0)
    params = dict(model.named_parameters())
    structure = gaugefix.discover(model, torch.randn(2, 5, dtype=DTYPE))
    tx = step.exact(step.applied(step.chain(step.weight_decay(strength=0.1), step.adam(0.1))),
                    structure, lr=0.1, strength=1.0, every=2)  # fmt: skip
    state = tx.init(params)
    targets = step.state_targets(params, state)
    for name, p in params.items():
        assert targets[name][0] == (p, 1)
        assert [power for _, power in targets[name][1:]] == [-1, -2]
        assert targets[name][1][0] is state.inner[1].exp_avg[name]


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_exact_every_must_be_a_positive_integer(every):
    model = mlp(0)
    structure = gaugefix.discover(model, torch.randn(2, 5, dtype=DTYPE))
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        step.exact(step.applied(step.sgd(0.1)), structure, lr=0.1, strength=1.0, every=every)


BAD_SCALARS = [-1.0, float("nan"), float("inf"), "x", torch.tensor([1.0, -1.0]),
               torch.tensor([0.5, float("nan")])]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_SCALARS)
def test_gauge_fixing_steps_refuse_a_bad_strength_or_lr(bad):
    """A negative, NaN or infinite strength or lr (of any copy) is refused when a step is built
    (as torch.optim refuses a negative lr); they used to be taken silently (a negative rate
    drives a copy away from balance)."""
    model = mlp(0)
    structure = gaugefix.discover(model, torch.randn(2, 5, dtype=DTYPE))
    inner = step.applied(step.sgd(0.1))
    builds = {
        "strength": [
            lambda: step.penalty(structure, strength=bad),
            lambda: step.decoupled_penalty(structure, lr=0.1, strength=bad),
            lambda: step.exact(inner, structure, lr=0.1, strength=bad),
            lambda: step.weight_decay(strength=bad),
        ],
        "lr": [
            lambda: step.decoupled_penalty(structure, lr=bad, strength=1.0),
            lambda: step.exact(inner, structure, lr=bad, strength=1.0),
            lambda: step.sgd(bad),
            lambda: step.adam(bad),
            lambda: step.adamw(bad),
        ],
    }
    for name, calls in builds.items():
        for build in calls:
            with pytest.raises(ValueError, match=f"^{name} must be"):
                build()


# -- the sweep engine and GaugeFixing: one meaning per method -------------------------------------


def _engine_and_hook(monkeypatch, method: str, fixing: str, every: int, strength: float):
    """The engine's curve (loss and RMS log-ratio at every step) of one full-batch GD run, and
    GaugeFixing's on the same model, start and data."""
    monkeypatch.setitem(engine.METHODS, method, Method(False, fixing, "test", every=every))
    task = load_task("teacher-student")
    steps, lr, s = 12, 0.05, 1.0
    config = RunConfig("teacher-student", method, "gd", lr, strength, s, 0, 0, steps, "float64",
                       task_hash=task_hash(task))  # fmt: skip
    (result,) = train_group(task, [config], record_every=1)
    torch.manual_seed(config.seed)
    model = task.make_model().to(DTYPE)
    x, y, _, _ = task.arrays(DTYPE)
    structure = gaugefix.discover(model, x[:2])
    gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
    opt = torch.optim.SGD(model.parameters(), lr)
    gaugefix.GaugeFixing(opt, model, structure, strength, mode=fixing, every=every,
                         balance_at_start=False)  # fmt: skip
    curve = []
    for _ in range(steps + 1):
        loss = task.loss(model(x), y)
        stats = gaugefix.imbalance_stats(model, structure)
        curve.append((float(loss.detach()), stats["log_ratio_rms"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [(p.loss, p.log_ratio_rms) for p in result.curves], curve


@pytest.mark.parametrize(
    "method,fixing,every,strength",
    [("penalty", "penalty", 1, 1.0), ("exact", "exact", 1, 1.0),
     ("exact-every-10", "exact", 10, 1.0)],
)  # fmt: skip
def test_engine_runs_follow_gauge_fixing(monkeypatch, method, fixing, every, strength):
    """A sweep run of penalty or exact (every 1, every 10) follows GaugeFixing with the same
    mode and ``every`` around torch.optim.SGD on that run alone, step by step."""
    ours, theirs = _engine_and_hook(monkeypatch, method, fixing, every, strength)
    assert len(ours) == len(theirs)
    plain_ratio = theirs[0][1]
    assert min(r for _, r in theirs) < 0.9 * plain_ratio  # the gauge fixing acted
    for (loss, ratio), (ref_loss, ref_ratio) in zip(ours, theirs, strict=True):
        assert abs(loss - ref_loss) <= 1e-10 * ref_loss
        assert abs(ratio - ref_ratio) <= 1e-10 * ref_ratio


def test_sweep_methods_state_their_every_and_conditioning_uses_them(monkeypatch):
    """The sweep's exact is every 1, exact-every-10 is GaugeFixing's default, and the
    conditioning analysis trains its methods by the sweep's definitions (GaugeFixing built with
    the method's mode and every)."""
    from gaugefix.experiments import conditioning

    for name in ("exact", "balanced-exact"):
        assert engine.METHODS[name].every == 1 and "every = 1" in engine.METHODS[name].definition
    from gaugefix.train.hook import check_mode_every

    assert inspect.signature(gaugefix.GaugeFixing).parameters["every"].default is None
    default = check_mode_every("exact", None)  # what GaugeFixing's every=None means in exact mode
    every_10 = engine.METHODS["exact-every-10"]
    assert every_10.every == default == 10 and "every = 10" in every_10.definition
    built = []
    real = gaugefix.GaugeFixing

    def recorded(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gaugefix, "GaugeFixing", recorded)
    out = conditioning.sharpness_training(load_task("teacher-student"), 0.05, 1.0, 1, 1)
    assert set(out) >= set(conditioning.TRAINED)
    fixed = [m for m in conditioning.TRAINED if engine.METHODS[m].fixing is not None]
    assert [(k["mode"], k["every"]) for k in built] == [
        (engine.METHODS[m].fixing, engine.METHODS[m].every) for m in fixed
    ]


def test_a_tensor_lr_is_not_read_on_the_host():
    """GaugeFixing with a tensor lr: over ``every`` steps, no host read beyond the optimizer's
    own except at most one for the orbit step."""
    model = mlp(0)
    x, y = data((5,))
    structure = gaugefix.discover(model, x[:2])
    reads = {}
    for hooked in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01))
        if hooked:
            gaugefix.GaugeFixing(opt, m, structure, 1.0, every=5, balance_at_start=False)
        counter = OpCounter()
        for _ in range(5):
            opt.zero_grad()
            loss_of(m, x, y).backward()
            with counter:
                opt.step()
        reads[hooked] = counter.host_reads
    assert reads[True] - reads[False] <= 1, reads


def test_a_group_mixing_methods_and_everys_equals_its_runs_alone(monkeypatch):
    """Runs of exact every 1, exact every 10, penalty and balance trained as one group (one
    orbit step wrapper per ``every``; momentum buffers transported) end where each ends alone."""
    task = load_task("teacher-student")
    configs = [
        RunConfig(
            "teacher-student",
            m,
            "momentum",
            0.05,
            1.0,
            1.0,
            0,
            0,
            12,
            "float64",
            task_hash=task_hash(task),
        )  # fmt: skip
        for m in ("exact", "exact-every-10", "penalty", "balance")
    ]
    together = train_group(task, configs)
    finals = set()
    for c, both in zip(configs, together, strict=True):
        (alone,) = train_group(task, [c])
        assert abs(both.final_loss - alone.final_loss) <= 1e-12 * alone.final_loss
        # balance keeps the log-ratio at rounding level (1e-16): an absolute floor there
        assert abs(both.log_ratio_rms - alone.log_ratio_rms) <= 1e-12 * alone.log_ratio_rms + 1e-15
        finals.add(round(alone.log_ratio_rms, 6))
    assert len(finals) == len(configs)  # different methods
