"""Second audit of the tasks: data and initialisation that depend on nothing but (task, seed)
(the caller's random state and default device), losses and accuracies recomputed by hand in
float64 through one step of training, the documented model sizes, and task options that
cannot be trained as keyed (refused with one TaskError, nothing loaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gaugefix
from gaugefix.cli import app
from gaugefix.experiments.engine import RunConfig, task_hash, train_group
from gaugefix.experiments.runner import TaskSpec
from gaugefix.experiments.tasks import (
    BUILTIN,
    CONTEXT,
    MODULUS,
    ResidualCNN,
    Task,
    TaskError,
    load_task,
    npz_task,
)
from gaugefix.zoo import GPT

EXACT = 1e-10  # relative agreement of float64 computations done in two orders
HAND_LR = 0.05  # the one GD step recomputed by hand
INSTANCE, SEED = 1, 2
BATCH, BATCH_STEPS = 16, 2  # char-gpt's mini-batch of windows, and the steps recomputed


def _init(task, seed: int) -> list[torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [p.detach().clone() for p in task.make_model().parameters()]


def _same(a: list, b: list) -> bool:
    return all(
        (x is None and y is None)
        or (x.dtype == y.dtype and x.device == y.device and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("name", list(BUILTIN))
def test_loading_neither_reads_nor_moves_the_global_random_state(name):
    """An instance loaded after two different global seeds is the same, and loading it and
    hashing it leave the global generator where it was."""
    torch.manual_seed(0)
    first = BUILTIN[name](INSTANCE)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    again = BUILTIN[name](INSTANCE)
    assert task_hash(again) == task_hash(first)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same(list(first.arrays(torch.float32)), list(again.arrays(torch.float32)))


@pytest.mark.parametrize("name", list(BUILTIN))
def test_data_and_initialisation_do_not_depend_on_the_default_device(name):
    """A process whose default device is another (here ``meta``, as ``cuda`` would be) loads
    the same CPU data and draws the same CPU initialisation for a seed: no run key holds the
    default device, and a CUDA draw would be other numbers under the same key."""
    task = BUILTIN[name](INSTANCE)
    default = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        other = BUILTIN[name](INSTANCE)
        other_init = _init(other, SEED)
    finally:
        torch.set_default_device(default)
    assert _same(list(other.arrays(torch.float32)), list(task.arrays(torch.float32)))
    assert _same(other_init, _init(task, SEED))


def _hand(task, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple:
    """The loss (half the summed squared error, or the cross-entropy of every position, as
    log-sum-exp minus the label's logit) and accuracy of the float64 model ``params``."""
    out = torch.func.functional_call(task.make_model().to(torch.float64), params, (x,))
    if task.kind == "regression":
        return 0.5 * ((out - y) ** 2).sum(-1).mean(), None
    logits = out.reshape(-1, out.shape[-1])
    labels = y.reshape(-1)
    picked = logits.gather(1, labels[:, None])[:, 0]
    loss = (torch.logsumexp(logits, 1) - picked).mean()
    return loss, float((logits.argmax(1) == labels).to(torch.float64).mean())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= EXACT * abs(b)


@pytest.mark.parametrize("name", ["teacher-student", "modular-addition"])
def test_a_float64_runs_losses_and_accuracies_are_the_hand_computed_ones(name):
    """Plain full-batch GD, float64, one step: the run's initial, final and test loss and
    accuracies equal those of ``p - lr grad`` recomputed by hand from the seed's
    initialisation, and its constant loss is the entropy of the training labels (of every
    position) or half the targets' summed variance."""
    task = load_task(name, instance=INSTANCE)
    x, y, x_test, y_test = task.arrays(torch.float64)
    names = [n for n, _ in task.make_model().named_parameters()]
    init = zip(names, _init(task, SEED), strict=True)
    params = {n: p.to(torch.float64).requires_grad_(True) for n, p in init}
    initial, _ = _hand(task, params, x, y)
    grads = torch.autograd.grad(initial, list(params.values()))
    stepped = {
        n: (p - HAND_LR * g).detach() for (n, p), g in zip(params.items(), grads, strict=True)
    }
    final, accuracy = _hand(task, stepped, x, y)
    test, test_accuracy = _hand(task, stepped, x_test, y_test)
    key = TaskSpec(name, instance=INSTANCE).hash()
    config = RunConfig(name, "plain", "gd", HAND_LR, 0.0, 0.0, SEED, 0, 1, "float64", task_hash=key)
    (run,) = train_group(task, [config])
    assert _close(run.initial_loss, float(initial.detach())) and _close(
        run.final_loss, float(final)
    )
    assert _close(run.test_loss, float(test))
    assert (run.accuracy, run.test_accuracy) == (accuracy, test_accuracy)
    if task.kind == "regression":
        constant = 0.5 * ((y - y.mean(0)) ** 2).sum(-1).mean()
    else:
        freq = np.bincount(y.flatten().numpy()) / y.numel()
        constant = -(freq[freq > 0] * np.log(freq[freq > 0])).sum()
    assert _close(run.constant_loss, float(constant))


def test_a_mini_batch_run_is_sgd_on_its_seeds_draws_of_distinct_examples():
    """char-gpt, float64, SGD on batches of 16 windows for two steps: the run's final loss is
    that of SGD by hand on ``randperm(n)[:16]`` drawn afresh at each step by a generator seeded
    with the run's seed (no epochs, no repeats in a batch), the loss of every position; so are
    its validation loss and the accuracies (over every position)."""
    task = load_task("char-gpt", instance=INSTANCE)
    x, y, x_test, y_test = task.arrays(torch.float64)
    names = [n for n, _ in task.make_model().named_parameters()]
    params = dict(zip(names, (p.to(torch.float64) for p in _init(task, SEED)), strict=True))
    sampler = torch.Generator().manual_seed(SEED)
    for _ in range(BATCH_STEPS):
        idx = torch.randperm(len(x), generator=sampler)[:BATCH]
        live = {n: p.requires_grad_(True) for n, p in params.items()}
        loss, _ = _hand(task, live, x[idx], y[idx])
        grads = torch.autograd.grad(loss, list(live.values()))
        params = {
            n: (p - HAND_LR * g).detach() for (n, p), g in zip(live.items(), grads, strict=True)
        }
    final, accuracy = _hand(task, params, x, y)
    test, test_accuracy = _hand(task, params, x_test, y_test)
    key = TaskSpec("char-gpt", instance=INSTANCE).hash()
    config = RunConfig("char-gpt", "plain", "sgd", HAND_LR, 0.0, 0.0, SEED, BATCH, BATCH_STEPS,
                       "float64", task_hash=key)  # fmt: skip
    (run,) = train_group(task, [config])
    assert _close(run.final_loss, float(final)) and _close(run.test_loss, float(test))
    assert (run.accuracy, run.test_accuracy) == (accuracy, test_accuracy)


def test_the_models_are_the_documented_sizes():
    """modular-addition: GPT over 0..53 (dim 32, 4 heads, 1 layer, MLP 128, context 3,
    untied head); char-gpt: over 256 bytes (dim 64, 4 heads, 2 layers, MLP 256, context 64,
    untied); residual-cnn: a 3x3 stem of 16 channels, two blocks of two 3x3 convs, a head on the
    2x2-pooled 16x4x4 map."""
    torch.manual_seed(0)
    gpts = {
        "modular-addition": (
            load_task("modular-addition").make_model().gpt, MODULUS + 1, 32, 1, 128, 3
        ),
        "char-gpt": (load_task("char-gpt").make_model(), 256, 64, 2, 256, CONTEXT),
    }  # fmt: skip
    for name, (gpt, vocab, dim, layers, hidden, context) in gpts.items():
        assert isinstance(gpt, GPT) and gpt.head.weight is not gpt.wte.weight, name
        assert tuple(gpt.wte.weight.shape) == (vocab, dim), name
        assert tuple(gpt.wpe.weight.shape) == (context, dim) and len(gpt.blocks) == layers, name
        block = gpt.blocks[0]
        assert block.attn.heads == 4 and not block.attn.sdpa and block.fc.out_features == hidden
    cnn = load_task("residual-cnn").make_model()
    assert isinstance(cnn, ResidualCNN) and len(cnn.blocks) == 2
    convs = [cnn.stem, *(c for b in cnn.blocks for c in b if isinstance(c, torch.nn.Conv2d))]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 16, (3, 3)),
        *[(16, 16, (3, 3))] * 4,
    ]
    assert cnn.head.in_features == 16 * 4 * 4


def test_a_data_file_named_as_a_built_in_task_is_refused(tmp_path):
    """A user file ``deep-mlp-digits.npz`` holding that task's instance 0, trained with its
    widths, had the built-in's name and task hash, so its runs (PyTorch's default
    initialisation) and the built-in's (He initialisation) had one key: one TaskError."""
    built_in = load_task("deep-mlp-digits")
    path = tmp_path / "deep-mlp-digits.npz"
    arrays = dict(zip(("X", "y", "X_test", "y_test"), built_in.arrays(torch.float32), strict=True))
    np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    with pytest.raises(TaskError, match="built-in task 'deep-mlp-digits'"):
        npz_task(path, "classification", (64,) * 6)
    out = tmp_path / "out"
    hidden = ",".join(["64"] * 6)
    args = ["sweep", "--data", str(path), "--task-type", "classification", "--hidden", hidden]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "built-in task" in result.output and not out.exists()


@pytest.mark.parametrize("y", [np.zeros(8), np.full(8, 3)])
def test_training_labels_of_a_single_class_are_refused(tmp_path, y):
    """Labels of one class: the best constant predictor's loss is 0, so no run could be judged
    stable (class 0: a model of one output, loss 0 at every rate, every run 'stable'; class 3:
    every run 'unstable', its loss going to 0.007 in 20 steps); one TaskError."""
    path = tmp_path / "data.npz"
    np.savez(path, X=np.arange(24.0).reshape(8, 3), y=y)
    with pytest.raises(TaskError, match="all one class"):
        npz_task(path, "classification", (4,))


@pytest.mark.parametrize(
    "y", [np.full((8, 2), 2.5), np.array([1.0, 1.0 + 1e-12] * 4)], ids=["constant", "in-float32"]
)
def test_constant_regression_targets_are_refused(tmp_path, y):
    """Constant targets (each column, as float32 trains them) were trained, and every run judged
    'unstable' (its loss going to 5e-4 in 20 steps): the best constant predictor's loss is 0."""
    path = tmp_path / "data.npz"
    np.savez(path, X=np.arange(24.0).reshape(8, 3), y=y)
    with pytest.raises(TaskError, match="constant"):
        npz_task(path, "regression", (4,))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"instance": -1}, "instance must be an integer >= 0"),
        ({"instance": 1.0}, "instance must be an integer >= 0"),
        ({"kind": "regression"}, "apply to a data file only"),
        ({"hidden": (64,)}, "apply to a data file only"),
    ],
)
def test_options_a_built_in_task_cannot_take_are_one_task_error(options, message):
    """A negative or fractional instance (no seed of a run) and a loss kind or widths for a
    built-in task (which fixes both, so they were ignored) are refused."""
    with pytest.raises(TaskError, match=message):
        load_task("teacher-student", **options)


def test_a_task_of_an_unknown_kind_is_refused():
    """A Task whose kind is neither loss (``"Regression"``) was trained with the cross-entropy."""
    x = torch.zeros(4, 2)
    with pytest.raises(TaskError, match="kind must be one of"):
        Task("t", "Regression", x, torch.zeros(4, 1), None, None, lambda: torch.nn.Linear(2, 1))


def test_an_instance_given_as_a_numpy_integer_is_that_instance():
    """``numpy.int64(1)`` is instance 1 on every task (it was a TypeError on some)."""
    for name in ("teacher-student", "digits", "modular-addition"):
        assert task_hash(load_task(name, instance=np.int64(1))) == task_hash(
            load_task(name, instance=1)
        )


@pytest.mark.parametrize(
    "name, generators",
    [("teacher-student", 128), ("deep-teacher-student", 3 * 64), ("digits", 256),
     ("digits-cnn", 8 + 16)],
)  # fmt: skip
def test_the_mlp_and_cnn_tasks_have_one_generator_per_hidden_unit_or_channel(name, generators):
    """The documented widths: one ReLU neuron (or conv channel, max pooling commuting with a
    positive scale) per generator, nothing else."""
    task = load_task(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = task.make_model().to(torch.float64)
    structure = gaugefix.discover(model, task.arrays(torch.float64)[0][:2])
    assert structure.kind_counts() == {"neuron": generators}


def test_every_hash_of_the_built_in_instances_is_distinct():
    """No two (task, instance) pairs of the reproduction share a hash, the deep student
    (same data as teacher-student) included."""
    hashes = [task_hash(f(k)) for f in BUILTIN.values() for k in range(3)]
    assert len(set(hashes)) == len(hashes)
