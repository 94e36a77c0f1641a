"""Item 9 (``--only cuda``): the overhead of ``GaugeFixing`` and ``imbalance_stats`` (and of
``imbalance_stats_tensor``, which leaves the statistics on the device) on a CUDA GPU, where users
train, and the time of one exact orbit step against three plain passes over the parameters (a
``torch._foreach_mul_`` over all of them). Runs only where CUDA exists; on any other machine it
records that it was skipped."""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from benchmarks.common import paired, ratio
from benchmarks.models import ResNet50
from benchmarks.opcount import gpt2, logits
from benchmarks.step import MODES, STRENGTH

ROUNDS, STEPS = 5, 10  # timed rounds; steps per side and round (holds one default orbit step)
WARMUP = 2  # untimed calls of every side first: optimizer state, caches, autotuning


@dataclass(frozen=True)
class CudaCase:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[], tuple[Tensor, Tensor]]  # (inputs, class targets) on the GPU
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]


def cases(tiny: bool) -> list[CudaCase]:
    dev = "cuda"
    n, tokens, images = (2, 64, 32) if tiny else (8, 1024, 128)
    return [
        CudaCase(
            f"GPT-2 small, ReLU, batch {n} x {tokens}, bf16 autocast, fused AdamW",
            lambda: gpt2(2 if tiny else 12, 64 if tiny else 768),
            lambda: (torch.randint(0, 50257, (n, tokens), device=dev),) * 2,
            lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1, fused=True),
        ),
        CudaCase(
            f"ResNet-50, batch {images} x 224^2, channels_last, bf16 autocast, SGD momentum",
            lambda: ResNet50().to(memory_format=torch.channels_last),
            lambda: (
                torch.randn(images, 3, 224, 224, device=dev).to(memory_format=torch.channels_last),
                torch.randint(0, 1000, (images,), device=dev),
            ),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        ),
    ]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = logits(model, x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    opt.step()


def _seconds(fn: Callable[[], None], repeat: int) -> float:
    """Seconds per call of ``fn``, by CUDA events around ``repeat`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def rounds(sides: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
    """Seconds per call of every side: :data:`ROUNDS` rounds of :data:`STEPS` calls per side
    (:func:`_seconds`), the sides' order rotating from round to round, after :data:`WARMUP`
    untimed calls of each."""
    return paired(sides, ROUNDS, WARMUP, clock=lambda fn: (_seconds(fn, STEPS), None))


def _case(case: CudaCase, log: Callable[[str], None]) -> dict:
    x, y = case.batch()
    torch.manual_seed(0)
    structure = gaugefix.discover(case.make().cuda().train(), x[:1])
    sides: dict[str, Callable[[], None]] = {}
    models = {}
    for mode in (None, *MODES):
        torch.manual_seed(0)
        model = case.make().cuda().train()
        opt = case.optimizer(model)
        if mode is not None:
            gaugefix.GaugeFixing(opt, model, structure, STRENGTH, **MODES[mode])
        sides[mode or "plain"] = lambda m=model, o=opt: _step(m, o, x, y)
        models[mode or "plain"] = (model, opt)
    plain_model, plain_opt = models["plain"]
    sides["imbalance_stats"] = lambda: (
        _step(plain_model, plain_opt, x, y),
        gaugefix.imbalance_stats(plain_model, structure),
    )
    sides["imbalance_stats_tensor"] = lambda: (
        _step(plain_model, plain_opt, x, y),
        gaugefix.imbalance_stats_tensor(plain_model, structure),
    )
    params = [p for p in plain_model.parameters()]
    sides["three_passes"] = lambda: [torch._foreach_mul_(params, 1.0) for _ in range(3)]
    exact_model, exact_opt = models["exact_every_step"]
    sides["orbit_step"] = lambda: gaugefix.relax_(exact_model, structure, 1e-6, exact_opt)
    times = rounds(sides)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    row = {"case": case.name, "generators": structure.num_generators, "ms": ms}
    stats = ("imbalance_stats", "imbalance_stats_tensor")
    for name in (*MODES, *stats):  # the median over rounds of the per-round ratio
        row[f"{name}_overhead"] = ratio(times[name], times["plain"]) - 1.0
    row["orbit_step_over_three_passes"] = ratio(times["orbit_step"], times["three_passes"])
    log(
        f"  {case.name}: step {ms['plain']:.1f} ms; "
        + ", ".join(f"{n} {row[f'{n}_overhead']:+.1%}" for n in (*MODES, *stats))
        + f"; orbit step {ms['orbit_step']:.2f} ms = "
        f"{row['orbit_step_over_three_passes']:.1f}x three passes"
    )
    return row


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    if not torch.cuda.is_available():
        log("  no CUDA device here: skipped")
        return {"skipped": "no CUDA device"}
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "cases": [_case(case, log) for case in cases(tiny)],
    }
