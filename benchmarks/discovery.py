"""Item 3: ``discover`` on a ResNet-50-sized network against 20 forward passes at batch 1."""

from __future__ import annotations

from collections.abc import Callable

import torch

import gaugefix
from benchmarks.common import paired, ratio, summary
from benchmarks.models import ResNet50

FORWARDS = 20


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    torch.manual_seed(0)
    if tiny:
        model, size, pairs = ResNet50((1, 1), 8, 10).eval(), 32, 2
    else:
        model, size, pairs = ResNet50().eval(), 224, 5
    x = torch.randn(1, 3, size, size)
    found: list[gaugefix.GaugeStructure] = []

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(FORWARDS):
                model(x)

    times = paired(
        {"discover": lambda: found.append(gaugefix.discover(model, x)), "forwards": forwards},
        pairs,
        warmup=1,
    )
    structure = found[-1]
    row = {
        "model": "ResNet-50 layout (bottleneck [3, 4, 6, 3], widths 64..2048)"
        if not tiny
        else "ResNet-50 layout (tiny)",
        "params": sum(p.numel() for p in model.parameters()),
        "input": [1, 3, size, size],
        "neurons": structure.num_generators,
        "pairs": pairs,
        "discover": summary(times["discover"]),
        "forwards_x20": summary(times["forwards"]),
        "ratio": ratio(times["discover"], times["forwards"]),
    }
    log(
        f"  discover {row['discover']['median_s']:.2f} s, {FORWARDS} forwards "
        f"{row['forwards_x20']['median_s']:.2f} s: ratio {row['ratio']:.2f} "
        f"({structure.num_generators} neurons)"
    )
    return row
