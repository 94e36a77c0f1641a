"""One training step's peak resident memory, in a fresh process (run by ``memory.py``).

Usage: ``python benchmarks/memory_probe.py MODE THREADS [tiny]`` with MODE ``plain``,
``exact`` or ``penalty``. Builds the model, optimizer and (unless plain) ``GaugeFixing``, takes
warm-up steps, resets the peak (``/proc/self/clear_refs``, Linux) and prints one JSON line with
the peak resident set (``VmHWM``) of the next step, and the resident set before it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import gaugefix
from gaugefix import zoo

WARMUP = 2


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def measure(mode: str, tiny: bool = False) -> dict:
    torch.manual_seed(0)
    if tiny:
        model, batch, shape = zoo.ResNet((1, 1), 4), 4, (3, 8, 8)
    else:
        model, batch, shape = zoo.resnet18(), 64, (3, 32, 32)
    model.train()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if mode != "plain":
        structure = gaugefix.discover(model, x[:2])
        gaugefix.GaugeFixing(opt, model, structure, 0.1, mode=mode)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _status("VmRSS")
    step()
    return {"mode": mode, "rss_before": before, "peak": _status("VmHWM")}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(measure(sys.argv[1], tiny=len(sys.argv) > 3)))
