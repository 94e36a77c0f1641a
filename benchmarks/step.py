"""Item 1: the overhead of ``GaugeFixing`` on a training step, and of ``imbalance_stats``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from benchmarks.common import paired, ratio, summary
from gaugefix import zoo


@dataclass(frozen=True)
class StepCase:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example
    classes: int
    batch: int
    pairs: int
    warmup: int = 2


def cases(tiny: bool = False) -> list[StepCase]:
    if tiny:
        return [
            StepCase("resnet (tiny)", lambda: zoo.ResNet((1, 1), 4), (3, 8, 8), 10, 4, 2, 1),
            StepCase("mlp (tiny)", lambda: zoo.mlp((16, 32, 32, 10)), (16,), 10, 8, 2, 1),
        ]
    return [
        StepCase("ResNet-18, CIFAR 3x32x32, batch 64", zoo.resnet18, (3, 32, 32), 10, 64, 7),
        StepCase(
            "MLP 784-1024-1024-10, batch 256",
            lambda: zoo.mlp((784, 1024, 1024, 10)),
            (784,),
            10,
            256,
            15,
            3,
        ),
    ]


LR, MOMENTUM, STRENGTH = 0.05, 0.9, 0.1


class HookClock:
    """Seconds spent between two optimizer hooks registered around ``GaugeFixing``'s own."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def stop(self, *args: object) -> None:
        self.total += time.perf_counter() - self._start


def _setup(case: StepCase, mode: str | None, x: Tensor, structure: gaugefix.GaugeStructure):
    torch.manual_seed(0)
    model = case.make().train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    clock = HookClock()
    opt.register_step_pre_hook(clock.start)
    opt.register_step_post_hook(clock.start)
    hook = None
    if mode is not None:
        hook = gaugefix.GaugeFixing(opt, model, structure, STRENGTH, mode=mode)
    opt.register_step_pre_hook(clock.stop)
    opt.register_step_post_hook(clock.stop)
    return model, opt, clock, hook


def run(tiny: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    return [_run_case(case, log) for case in cases(tiny)]


def _run_case(case: StepCase, log: Callable[[str], None]) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, *case.input_shape, generator=gen)
    y = torch.randint(0, case.classes, (case.batch,), generator=gen)
    torch.manual_seed(0)
    structure = gaugefix.discover(case.make().train(), x[:2])
    variants = {mode: _setup(case, mode, x, structure) for mode in (None, "exact", "penalty")}
    # Per side and timed call: the whole step, and the time inside the optimizer hooks.
    step_times: dict[str, list[float]] = {}
    hook_times: dict[str, list[float]] = {}
    stats_times: list[float] = []
    plain_model = variants[None][0]

    def make_step(name: str, model: nn.Module, opt: torch.optim.Optimizer, clock: HookClock):
        step_times[name], hook_times[name] = [], []

        def step() -> None:
            before, start = clock.total, time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step_times[name].append(time.perf_counter() - start)
            hook_times[name].append(clock.total - before)
            if model is plain_model:
                # imbalance_stats is timed where a training loop logs it: after the step.
                start = time.perf_counter()
                gaugefix.imbalance_stats(model, structure)
                stats_times.append(time.perf_counter() - start)

        return step

    sides = {
        mode or "plain": make_step(mode or "plain", model, opt, clock)
        for mode, (model, opt, clock, _) in variants.items()
    }
    paired(sides, case.pairs, case.warmup)
    times = {name: seconds[case.warmup :] for name, seconds in step_times.items()}
    times["imbalance_stats"] = stats_times[case.warmup :]
    plain = times["plain"]
    row = {
        "case": case.name,
        "pairs": case.pairs,
        "lr": LR,
        "momentum": MOMENTUM,
        "strength": STRENGTH,
        "neurons": structure.num_generators,
        "params": sum(p.numel() for p in plain_model.parameters()),
        "plain_step": summary(plain),
        "imbalance_stats": summary(times["imbalance_stats"]),
        "imbalance_stats_overhead": ratio(times["imbalance_stats"], plain),
    }
    for mode in ("exact", "penalty"):
        hooks = hook_times[mode][case.warmup :]
        plain_hooks = hook_times["plain"][case.warmup :]
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
    log(
        f"  {case.name}: step {row['plain_step']['median_s'] * 1e3:.1f} ms; "
        f"exact {row['exact']['overhead']:+.2%} (hooks {row['exact']['hook_fraction']:.2%}), "
        f"penalty {row['penalty']['overhead']:+.2%} "
        f"(hooks {row['penalty']['hook_fraction']:.2%}), "
        f"imbalance_stats {row['imbalance_stats_overhead']:.2%}"
    )
    return row
