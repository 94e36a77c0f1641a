"""One training step's peak resident memory, in a fresh process (run by ``memory.py``).

Usage: ``python benchmarks/memory_probe.py CASE MODE THREADS [tiny]`` with CASE ``resnet18`` or
``gpt`` and MODE one of :data:`MODES`. Builds the model, optimizer and (unless plain)
``GaugeFixing``, takes
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
from benchmarks.step import GPT_VOCAB, gpt
from gaugefix import zoo
from gaugefix.train.hook import EVERY

# Plain training; training after discover alone (the structure found, no GaugeFixing: what
# discovery leaves in the process, such as heap memory the allocator keeps); GaugeFixing's
# defaults and its penalty mode. The exact orbit step at every step is left out: the default's
# measured interval holds the same orbit step (once), so its peak covers that mode's.
MODES = {"plain": None, "discover": None, "default": {}, "penalty": {"mode": "penalty"}}
CASES = ("resnet18", "gpt")
# Warm-up steps before the measured interval of EVERY steps: one, so that the optimizer's state
# exists. The default configuration acts after its EVERY-th step, so its first orbit step (with
# everything it allocates) falls in the measured interval.
WARMUP = 1


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _setup(case: str, tiny: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, object]:
    """(model, inputs, targets, optimizer factory) of a case."""
    torch.manual_seed(0)
    if case == "gpt":
        model = zoo.GPT(32, 16, 2, 1, 32, 8) if tiny else gpt()
        vocab, length, batch = (32, 8, 2) if tiny else (GPT_VOCAB, 128, 8)
        ids = torch.randint(0, vocab, (batch, length + 1))
        return model, ids[:, :-1], ids[:, 1:], lambda p: torch.optim.AdamW(p, lr=3e-4)
    model, batch, shape = (
        (zoo.ResNet((1, 1), 4), 4, (3, 8, 8)) if tiny else (zoo.resnet18(), 64, (3, 32, 32))
    )
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    return model, x, y, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)


def measure(case: str, mode: str, tiny: bool = False) -> dict:
    """The peak resident set over ``EVERY`` steps after ``WARMUP`` steps (the interval holds the
    default configuration's first orbit step)."""
    model, x, y, make_opt = _setup(case, tiny)
    model.train()
    opt = make_opt(model.parameters())
    if mode != "plain":
        structure = gaugefix.discover(model, x[:2])
    if MODES[mode] is not None:
        gaugefix.GaugeFixing(opt, model, structure, 0.1, **MODES[mode])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _status("VmRSS")
    for _ in range(EVERY):
        step()
    return {"case": case, "mode": mode, "rss_before": before, "peak": _status("VmHWM")}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[3]))
    print(json.dumps(measure(sys.argv[1], sys.argv[2], tiny=len(sys.argv) > 4)))
