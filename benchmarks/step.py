"""Item 1: the overhead of ``GaugeFixing`` on a training step (its default configuration, and
for information an exact orbit step at every step and the penalty mode), and of
``imbalance_stats``."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from benchmarks.common import ratio, summary
from gaugefix import zoo
from gaugefix.train.hook import EVERY


@dataclass(frozen=True)
class StepCase:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]  # (inputs, class targets)
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    pairs: int  # timed rounds; each times EVERY steps per side, interleaved step by step
    warmup: int = 1


def _images(n: int, shape: tuple[int, ...], classes: int) -> Callable:
    return lambda g: (
        torch.randn(n, *shape, generator=g),
        torch.randint(0, classes, (n,), generator=g),
    )


def _tokens(n: int, length: int, vocab: int) -> Callable:
    def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab, (n, length + 1), generator=g)
        return ids[:, :-1], ids[:, 1:]

    return batch


LR, MOMENTUM, STRENGTH = 0.05, 0.9, 0.1


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)


GPT_VOCAB = 1024


def gpt() -> nn.Module:
    """GPT-style: 6 layers, width 384, 6 heads, ReLU MLP (4 x 384), context 128."""
    return zoo.GPT(GPT_VOCAB, 384, 6, 6, 4 * 384, 128)


def cases(tiny: bool = False) -> list[StepCase]:
    if tiny:
        return [
            StepCase("resnet (tiny)", lambda: zoo.ResNet((1, 1), 4), _images(4, (3, 8, 8), 10),
                     _sgd, 2, 1),
            StepCase("mlp (tiny)", lambda: zoo.mlp((16, 32, 32, 10)), _images(8, (16,), 10),
                     _sgd, 2, 1),
            StepCase("gpt (tiny)", lambda: zoo.GPT(32, 16, 2, 1, 32, 8), _tokens(2, 8, 32),
                     _adamw, 2, 1),
        ]  # fmt: skip
    return [
        StepCase(
            "ResNet-18, CIFAR 3x32x32, batch 64",
            zoo.resnet18,
            _images(64, (3, 32, 32), 10),
            _sgd,
            5,
        ),
        StepCase(
            "MLP 784-1024-1024-10, batch 256",
            lambda: zoo.mlp((784, 1024, 1024, 10)),
            _images(256, (784,), 10),
            _sgd,
            9,
        ),
        StepCase(
            "GPT 6 x 384, 6 heads, ReLU MLP, sequence 128, batch 8, AdamW",
            gpt,
            _tokens(8, 128, GPT_VOCAB),
            _adamw,
            5,
        ),
    ]


class HookClock:
    """Seconds spent between two optimizer hooks registered around ``GaugeFixing``'s own."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def stop(self, *args: object) -> None:
        self.total += time.perf_counter() - self._start


# The configurations timed against plain training: GaugeFixing's defaults, and for information
# an exact orbit step at every step and the penalty mode.
MODES = {
    "default": {},
    "exact_every_step": {"mode": "exact", "every": 1},
    "penalty": {"mode": "penalty"},
}


def _setup(case: StepCase, mode: str | None, structure: gaugefix.GaugeStructure):
    torch.manual_seed(0)
    model = case.make().train()
    opt = case.optimizer(model)
    clock = HookClock()
    opt.register_step_pre_hook(clock.start)
    opt.register_step_post_hook(clock.start)
    hook = None
    if mode is not None:
        hook = gaugefix.GaugeFixing(opt, model, structure, STRENGTH, **MODES[mode])
    opt.register_step_pre_hook(clock.stop)
    opt.register_step_post_hook(clock.stop)
    return model, opt, clock, hook


def run(tiny: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    return [_run_case(case, log) for case in cases(tiny)]


def _run_case(case: StepCase, log: Callable[[str], None]) -> dict:
    x, y = case.batch(torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    structure = gaugefix.discover(case.make().train(), x[:2])
    variants = {mode: _setup(case, mode, structure) for mode in (None, *MODES)}
    # Per side and timed call: the whole step, and the time inside the optimizer hooks.
    step_times: dict[str, list[float]] = {}
    hook_times: dict[str, list[float]] = {}
    stats_times: list[float] = []
    plain_model = variants[None][0]

    def make_step(name: str, model: nn.Module, opt: torch.optim.Optimizer, clock: HookClock):
        step_times[name], hook_times[name] = [], []

        def step() -> None:
            """One training step; the time of the step, and of the time inside the hooks."""
            before, start = clock.total, time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            opt.step()
            step_times[name].append(time.perf_counter() - start)
            hook_times[name].append(clock.total - before)
            if model is plain_model and len(step_times[name]) % EVERY == 0:
                # imbalance_stats is timed where a training loop logs it: after a step.
                start = time.perf_counter()
                gaugefix.imbalance_stats(model, structure)
                stats_times.append(time.perf_counter() - start)

        return step

    sides = {
        mode or "plain": make_step(mode or "plain", model, opt, clock)
        for mode, (model, opt, clock, _) in variants.items()
    }
    # The sides take turns step by step (the order rotating), so that a slow spell of a shared
    # machine falls on all of them; each side's consecutive EVERY steps form one interval (the
    # default configuration's orbit step is in each), and the rounds are those intervals.
    names = list(sides)
    for i in range(EVERY * (case.warmup + case.pairs)):
        if i % EVERY == 0:
            gc.collect()
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sides[name]()

    def per_interval(seconds: list[float]) -> list[float]:
        return [sum(seconds[i : i + EVERY]) / EVERY for i in range(0, len(seconds), EVERY)]

    times = {name: per_interval(seconds)[case.warmup :] for name, seconds in step_times.items()}
    hook_intervals = {
        name: per_interval(seconds)[case.warmup :] for name, seconds in hook_times.items()
    }
    times["imbalance_stats"] = stats_times[case.warmup :]
    plain = times["plain"]
    row = {
        "case": case.name,
        "pairs": case.pairs,
        "optimizer": type(variants[None][1]).__name__,
        "strength": STRENGTH,
        "every": variants["default"][3].every,
        "generators": structure.num_generators,
        "params": sum(p.numel() for p in plain_model.parameters()),
        "plain_step": summary(plain),
        "imbalance_stats": summary(times["imbalance_stats"]),
        "imbalance_stats_overhead": ratio(times["imbalance_stats"], plain),
    }
    for mode in MODES:
        hooks, plain_hooks = hook_intervals[mode], hook_intervals["plain"]
        row[mode] = {
            **summary(times[mode]),
            "overhead": ratio(times[mode], plain) - 1.0,
            "hook_s": summary(hooks),
            # Time inside GaugeFixing's hooks over the plain step of the same round (the
            # empty clock hooks' own time subtracted): the overhead without the noise of
            # two whole steps.
            "hook_fraction": ratio([a - b for a, b in zip(hooks, plain_hooks, strict=True)], plain),
            "skipped": variants[mode][3].skipped,
        }
    shown = ", ".join(
        f"{mode} {row[mode]['overhead']:+.2%} (hooks {row[mode]['hook_fraction']:.2%})"
        for mode in MODES
    )
    log(
        f"  {case.name}: step {row['plain_step']['median_s'] * 1e3:.1f} ms; {shown}; "
        f"imbalance_stats {row['imbalance_stats_overhead']:.2%}"
    )
    return row
