"""The built-in tasks and user data: data arrays plus the model family trained on them.

Nothing is downloaded: teacher-student and modular-addition data are generated from a seed, the
digits come with scikit-learn and the text of ``char-gpt`` is Python's own standard library. A
built-in task has one *instance* per seed of the runs trained on it (the teacher and its data,
or the train/test split, drawn from :func:`data_seed`), so the seeds of a sweep are independent
instances of the task, not only independent initialisations.
"""

from __future__ import annotations

import operator
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from gaugefix.errors import GaugefixError
from gaugefix.zoo import GPT, mlp

__all__ = [
    "DATA_SEED",
    "data_seed",
    "TaskError",
    "Task",
    "DigitsCNN",
    "he_mlp",
    "MODULUS",
    "LastTokenGPT",
    "python_source",
    "float32_cpu_default",
    "CORPUS_FILES",
    "CONTEXT",
    "WINDOWS",
    "VALIDATION_WINDOWS",
    "char_gpt",
    "ResidualCNN",
    "REALISTIC",
    "BUILTIN",
    "load_task",
    "npz_task",
]

DATA_SEED = 1234
KINDS = ("regression", "classification")  # a task's loss: squared error or cross-entropy
DEFAULT_HIDDEN = (128,)  # a data file's MLP: its hidden widths unless given
T = TypeVar("T")


def data_seed(instance: int) -> int:
    """The seed that draws a built-in task's instance ``instance`` (its teacher and data, or its
    split): the runs of seed ``k`` train on instance ``k``; a :class:`TaskError` for an
    instance that is no seed of a run (not an integer ``>= 0``)."""
    refusal = TaskError(f"a task's instance must be an integer >= 0, got {instance!r}")
    try:
        k = operator.index(instance)
    except TypeError:
        raise refusal from None
    if k < 0:
        raise refusal
    return DATA_SEED + k


class TaskError(GaugefixError, ValueError):
    """A task name or a data file that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Task:
    """Train and test arrays, the loss kind and a factory for the model trained on them.

    ``kind`` is ``"regression"`` (squared loss: the mean over examples of ``||f - y||^2 / 2``;
    ``y`` is ``[n, out]``)
    or ``"classification"`` (cross-entropy; ``y`` holds class indices ``[n]``, or ``[n, tokens]``
    for a model that predicts every position, ``[n, tokens, classes]``). ``x`` holds features
    (floating point) or token ids (integers, never cast). ``x_test`` and ``y_test`` are ``None``
    for a task without a test split (then no test metric is reported). ``make_model`` is kept
    wrapped by :func:`float32_cpu_default`, so a seed's initialisation does not depend on the
    caller's default dtype or device (which no run key holds).
    """

    name: str
    kind: str
    x: Tensor
    y: Tensor
    x_test: Tensor | None
    y_test: Tensor | None
    make_model: Callable[[], nn.Module]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # any other kind was trained as classification
            raise TaskError(f"a task's kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "make_model", float32_cpu_default(self.make_model))

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The mean loss of predictions ``out`` ``[n, out]`` (or ``[n, tokens, classes]``, the
        mean over every position) against ``y``."""
        if self.kind == "regression":
            return 0.5 * (out - y).square().sum(-1).mean()
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())

    def arrays(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(x, y, x_test, y_test)`` for a model in ``dtype``: floating-point features and
        regression targets in ``dtype``; token ids and class indices as they are."""

        def cast(t: Tensor | None) -> Tensor | None:
            return t.to(dtype) if t is not None and t.is_floating_point() else t

        return cast(self.x), cast(self.y), cast(self.x_test), cast(self.y_test)

    def data_shapes(self) -> tuple:
        """The shapes and dtypes of ``(x, y, x_test, y_test)`` (``None`` for a missing test
        split): instances of a task with equal ones are trained in one batch."""
        arrays = (self.x, self.y, self.x_test, self.y_test)
        return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in arrays)

    def constant_loss(self) -> float:
        """The training loss of the best constant predictor: half the summed variance of the
        targets (regression), the entropy of the training class frequencies (classification)."""
        if self.kind == "regression":
            y = self.y.to(torch.float64)
            return float(0.5 * y.var(0, correction=0).sum())
        freq = torch.bincount(self.y.flatten()).to(torch.float64) / self.y.numel()
        freq = freq[freq > 0]
        return float(-(freq * freq.log()).sum())

    def accuracy(self, out: Tensor, y: Tensor) -> float | None:
        if self.kind != "classification":
            return None
        return float((out.argmax(-1) == y).to(torch.float64).mean())


def float32_cpu_default(factory: Callable[..., T]) -> Callable[..., T]:
    """``factory`` called with float32 as PyTorch's default dtype and the CPU as its default
    device (the caller's restored after): a model's initialisation for a seed, or a task's data,
    is then the same in a process whose default is float64 or CUDA (there it would be other
    numbers under the same run key)."""
    if getattr(factory, "float32_cpu_default", False):
        return factory

    def make(*args: Any) -> T:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.device("cpu"):
                return factory(*args)
        finally:
            torch.set_default_dtype(default)

    make.float32_cpu_default = True  # type: ignore[attr-defined]
    return make


def _teacher_student(name: str, hidden: tuple[int, ...], instance: int) -> Task:
    g = torch.Generator().manual_seed(data_seed(instance))

    def normal(*shape: int) -> Tensor:  # float32 whatever the default dtype
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    x = normal(1024, 16)
    w1 = normal(8, 16) / 4.0
    b1 = 0.1 * normal(8)
    w2 = normal(1, 8) / 8**0.5
    y = torch.relu(x @ w1.T + b1) @ w2.T
    return Task(
        name, "regression", x[:512], y[:512], x[512:], y[512:], lambda: mlp((16, *hidden, 1))
    )


class DigitsCNN(nn.Module):
    """A small ReLU CNN for the 8x8 digits: two 3x3 conv layers, max pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        convs = [
            layer
            for c_in, c_out in ((1, 8), (8, 16))
            for layer in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        ]
        self.body = nn.Sequential(*convs, nn.Flatten(), nn.Linear(16 * 2 * 2, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.view(-1, 1, 8, 8))


def _digits(name: str, make_model: Callable[[], nn.Module], instance: int) -> Task:
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    order = np.random.default_rng(data_seed(instance)).permutation(len(y_np))
    x = torch.tensor(x_np[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np[order], dtype=torch.long)
    cut = 1347  # a 75 / 25 split
    return Task(name, "classification", x[:cut], y[:cut], x[cut:], y[cut:], make_model)


def he_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """:func:`gaugefix.zoo.mlp` with He (Kaiming) normal weights for ReLU and zero biases, the
    initialisation that keeps the signal's scale through many ReLU layers (PyTorch's default,
    variance ``1 / (3 fan_in)``, shrinks it by about ``sqrt(6)`` per layer)."""
    model = mlp(widths)
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


MODULUS = 53  # modular addition: (a + b) mod MODULUS


class LastTokenGPT(nn.Module):
    """:class:`gaugefix.zoo.GPT` reading out only the last position: token ids ``[batch,
    tokens]`` to logits ``[batch, vocab]``."""

    def __init__(self, vocab: int, dim: int, heads: int, hidden: int, context: int) -> None:
        super().__init__()
        self.gpt = GPT(vocab, dim, heads, 1, hidden, context, sdpa=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt(ids)[:, -1]


def _modular_addition(name: str, instance: int) -> Task:
    """All pairs ``(a, b)`` as the tokens ``a b =`` (``=`` is token ``MODULUS``), labelled
    ``(a + b) mod MODULUS``; a random half of the pairs for training, the rest for test.
    The model: a one-layer transformer (dim 32, 4 heads, ReLU MLP of 128) over the vocabulary
    ``0..MODULUS`` (the class ``=`` never occurs as a label)."""
    p = MODULUS
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    x = torch.stack([a, b, torch.full_like(a, p)], 1)
    y = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(data_seed(instance)))
    train, test = order[: p * p // 2], order[p * p // 2 :]
    return _classification(name, x, y, train, test, lambda: LastTokenGPT(p + 1, 32, 4, 128, 3))


def _classification(
    name: str, x: Tensor, y: Tensor, train: Tensor, test: Tensor, make_model: Callable
) -> Task:
    """A classification task on the examples ``train`` of ``(x, y)``, tested on ``test``."""
    return Task(name, "classification", x[train], y[train], x[test], y[test], make_model)


def python_source(limit: int, names: Iterable[str] | None = None) -> bytes:
    """The first ``limit`` bytes of the standard library's top-level ``.py`` files ``names``
    (default: every one), concatenated in sorted order; a :class:`TaskError` where a file
    the text needs is not in this Python's library."""
    root = Path(os.__file__).parent
    paths = sorted(root / n for n in names) if names is not None else sorted(root.glob("*.py"))
    out = bytearray()
    for path in paths:
        if not path.is_file():
            raise TaskError(
                f"this Python ({platform.python_version()}) has no standard-library file "
                f"{path.name!r} in {str(root)!r}"
            )
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


# char-gpt's text: pure-Python modules of the standard library, the same on every platform of
# Python 3.11 (a platform's own files, such as ``_sysconfigdata_*.py``, would not be).
CORPUS_FILES = ("__future__.py", "_compat_pickle.py", "_compression.py", "_markupbase.py")
CONTEXT = 64  # tokens a char-gpt window predicts from
WINDOWS = 320  # windows of CONTEXT + 1 bytes cut from the text
VALIDATION_WINDOWS = 64  # of them, held out per instance


def char_gpt(name: str, instance: int) -> Task:
    """The first ``WINDOWS * (CONTEXT + 1)`` bytes of :data:`CORPUS_FILES` cut into
    :data:`WINDOWS` consecutive windows; a window's first ``CONTEXT`` bytes are the input ids,
    each position labelled with the byte after it. A random :data:`VALIDATION_WINDOWS` of them
    (drawn per instance) are the test split. The model: :class:`gaugefix.zoo.GPT` over the 256
    byte values (2 layers, dim 64, 4 heads, ReLU MLP of 256, context 64, untied head), loss the
    cross-entropy of every position."""
    text = python_source(WINDOWS * (CONTEXT + 1), CORPUS_FILES)
    if len(text) < WINDOWS * (CONTEXT + 1):
        raise TaskError(
            f"{name} needs {WINDOWS * (CONTEXT + 1)} bytes of {', '.join(CORPUS_FILES)}; this "
            f"Python's ({platform.python_version()}) have {len(text)}"
        )
    windows = torch.tensor(list(text), dtype=torch.long).view(WINDOWS, CONTEXT + 1)
    order = torch.randperm(WINDOWS, generator=torch.Generator().manual_seed(data_seed(instance)))
    train, test = order[VALIDATION_WINDOWS:], order[:VALIDATION_WINDOWS]
    x, y = windows[:, :-1], windows[:, 1:]
    return _classification(
        name, x, y, train, test, lambda: GPT(256, 64, 4, 2, 256, CONTEXT, sdpa=False)
    )


class ResidualCNN(nn.Module):
    """A residual ReLU CNN without normalisation for the 8x8 digits: a 3x3 conv stem of
    ``width`` channels and a ReLU, ``blocks`` residual blocks
    ``x <- relu(x + conv(relu(conv(x))))`` (3x3), 2x2 max pooling and a linear head on the
    pooled map."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(width * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x.view(-1, 1, 8, 8)))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(self.pool(x).flatten(1))


# Each built-in task by name: its instance ``k`` (:func:`data_seed`), drawn on the CPU in float32
# whatever the caller's defaults (:func:`float32_cpu_default`).
_BUILTIN: dict[str, Callable[[int], Task]] = {
    "teacher-student": lambda k: _teacher_student("teacher-student", (128,), k),
    "deep-teacher-student": lambda k: _teacher_student("deep-teacher-student", (64, 64, 64), k),
    "digits": lambda k: _digits("digits", lambda: mlp((64, 256, 10)), k),
    "deep-mlp-digits": lambda k: _digits("deep-mlp-digits", lambda: he_mlp((64, *[64] * 6, 10)), k),
    "digits-cnn": lambda k: _digits("digits-cnn", DigitsCNN, k),
    "modular-addition": lambda k: _modular_addition("modular-addition", k),
    "char-gpt": lambda k: char_gpt("char-gpt", k),
    "residual-cnn": lambda k: _digits("residual-cnn", ResidualCNN, k),
}
BUILTIN: dict[str, Callable[[int], Task]] = {
    name: float32_cpu_default(load) for name, load in _BUILTIN.items()
}
# The realistic tasks: larger models at PyTorch's default initialisation, mini-batch training.
REALISTIC = ("char-gpt", "residual-cnn")


def load_task(
    name: str,
    data: str | None = None,
    kind: str | None = None,
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    instance: int = 0,
) -> Task:
    """Instance ``instance`` of a built-in task by name (which fixes its loss kind and model),
    or user data from an ``.npz`` file (arrays ``X``, ``y``, optional ``X_test``, ``y_test``;
    one instance) trained with an MLP of the given hidden widths."""
    if data is None:
        if name not in BUILTIN:
            raise TaskError(f"unknown task {name!r}; choose from {', '.join(BUILTIN)}")
        if kind is not None or tuple(hidden) != DEFAULT_HIDDEN:
            raise TaskError(
                f"a loss kind and hidden widths apply to a data file only; the built-in task "
                f"{name!r} fixes both (got kind={kind!r}, hidden={tuple(hidden)!r})"
            )
        return BUILTIN[name](instance)
    return float32_cpu_default(lambda: npz_task(Path(data), kind or "regression", hidden))()


def npz_task(path: Path, kind: str, hidden: tuple[int, ...]) -> Task:
    """A task from a user's ``.npz`` file; every problem is reported as a :class:`TaskError`."""
    if kind not in KINDS:
        raise TaskError(f"--task-type must be regression or classification, got {kind!r}")
    if path.stem in BUILTIN:
        raise TaskError(
            f"data file {path.name!r} is named as the built-in task {path.stem!r} (a run's key "
            f"holds the task's name): rename the file"
        )
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} does not exist")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as err:
        raise TaskError(f"cannot read {str(path)!r} as .npz: {err}") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise TaskError(f"{path.name} has no array {key!r} (found: {', '.join(arrays)})")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise TaskError(f"{path.name} must have both X_test and y_test, or neither")
    x, y = arrays["X"], arrays["y"]
    split = "X_test" in arrays
    x_test, y_test = arrays.get("X_test", x), arrays.get("y_test", y)
    for key, a in (("X", x), ("X_test", x_test)):
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise TaskError(f"{key} must be a numeric 2-d array, got {a.dtype} of shape {a.shape}")
        _check_values(key, a)
    for xs, ys, key in ((x, y, "y"), (x_test, y_test, "y_test")):
        if len(ys) != len(xs):
            raise TaskError(f"{key} has {len(ys)} rows but its X has {len(xs)}")
        if not np.issubdtype(ys.dtype, np.number):
            raise TaskError(f"{key} must be numeric, got {ys.dtype}")
        _check_values(key, ys)
    if x.shape[1] == 0:
        raise TaskError("X has no feature columns")
    if x_test.shape[1] != x.shape[1]:
        raise TaskError(f"X_test has {x_test.shape[1]} features but X has {x.shape[1]}")
    if len(x) < 2 or len(x_test) < 1:
        raise TaskError("X needs at least 2 rows, X_test at least 1")
    _check_targets(kind, y, y_test)
    if kind == "classification":
        classes = int(max(y.max(), y_test.max())) + 1
        yt, yt_test = torch.tensor(y, dtype=torch.long), torch.tensor(y_test, dtype=torch.long)
    else:
        classes = 1 if y.ndim == 1 else y.shape[1]
        yt = torch.tensor(y, dtype=torch.float32).reshape(len(y), classes)
        yt_test = torch.tensor(y_test, dtype=torch.float32).reshape(len(y_test), classes)
    widths = (x.shape[1], *hidden, classes)
    return Task(
        path.stem,
        kind,
        torch.tensor(x, dtype=torch.float32),
        yt,
        torch.tensor(x_test, dtype=torch.float32) if split else None,
        yt_test if split else None,
        lambda: mlp(widths),
    )


def _check_targets(kind: str, y: np.ndarray, y_test: np.ndarray) -> None:
    """A :class:`TaskError` unless ``y`` and ``y_test`` are labels (classification: 1-d,
    integers >= 0) or targets of the same width (regression: 1-d, or 2-d ``[n, out]``), and
    ``y`` is not constant (one class; targets equal in every column in float32): else the best
    constant predictor's loss is 0."""
    for key, ys in (("y", y), ("y_test", y_test)):
        if kind == "classification" and (
            ys.ndim != 1 or not np.all(np.mod(ys, 1) == 0) or ys.min() < 0
        ):
            raise TaskError(f"classification labels {key} must be a 1-d array of integers >= 0")
        if kind == "regression" and ys.ndim not in (1, 2):
            raise TaskError(f"regression targets {key} must be 1-d or 2-d, got shape {ys.shape}")
    if kind == "regression" and y.shape[1:] == (0,):
        raise TaskError("regression targets y have no columns")
    if kind == "regression" and (y.shape[1:] or (1,)) != (y_test.shape[1:] or (1,)):
        raise TaskError(f"y_test has shape {y_test.shape} but y has {y.shape}: other widths")
    trained = y if kind == "classification" else y.astype(np.float32)  # as regression trains
    if np.all(trained == trained[:1]):
        what = "regression targets y are constant (in every column, in float32)"
        if kind == "classification":
            what = f"labels y are all one class ({int(y[0])})"
        raise TaskError(
            f"the training {what}: the best constant predictor's loss is 0, so no run could be "
            "judged stable"
        )


def _check_values(key: str, a: np.ndarray) -> None:
    """A :class:`TaskError` unless ``a`` holds real numbers, finite also in float32 (the dtype
    features and regression targets are trained in)."""
    if np.iscomplexobj(a):
        raise TaskError(f"{key} must be real numbers, got {a.dtype}")
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if nan or inf:
        counts = [
            f"{n} {what} value{'s' * (n != 1)}"
            for n, what in ((nan, "NaN"), (inf, "infinite"))
            if n
        ]
        raise TaskError(f"{key} must be finite, but it holds {' and '.join(counts)}")
    beyond = int((np.abs(a) > np.finfo(np.float32).max).sum())
    if beyond:
        raise TaskError(
            f"{key} holds {beyond} value{'s' * (beyond != 1)} beyond float32's range "
            f"(|v| > {np.finfo(np.float32).max:.4g}), the dtype it is trained in"
        )
