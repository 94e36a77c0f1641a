"""Item 5: peak resident memory of a ResNet-18 training step with ``GaugeFixing`` against the
same step without it, each measured in a fresh process, alternating, medians over rounds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
MODES = ("plain", "exact", "penalty")


def supported() -> bool:
    return Path("/proc/self/clear_refs").exists()


def _probe(mode: str, tiny: bool) -> dict:
    args = [sys.executable, str(PROBE), mode, str(torch.get_num_threads())]
    out = subprocess.run(args + (["tiny"] if tiny else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    if not supported():
        log("  skipped: needs Linux /proc/self/clear_refs")
        return {"skipped": "needs Linux /proc/self/clear_refs"}
    rounds = 2 if tiny else 5
    peaks: dict[str, list[int]] = {m: [] for m in MODES}
    for i in range(rounds):
        k = i % len(MODES)
        for mode in MODES[k:] + MODES[:k]:
            peaks[mode].append(_probe(mode, tiny)["peak"])
    row: dict = {"rounds": rounds, "model": "ResNet-18, batch 64" if not tiny else "tiny"}
    row["plain_peak_mib"] = statistics.median(peaks["plain"]) / 2**20
    for mode in ("exact", "penalty"):
        row[mode] = {
            "peak_mib": statistics.median(peaks[mode]) / 2**20,
            # The i-th process of each side forms a pair.
            "excess": statistics.median(
                a / b - 1 for a, b in zip(peaks[mode], peaks["plain"], strict=True)
            ),
        }
    log(
        f"  peak RSS of a step: plain {row['plain_peak_mib']:.0f} MiB, exact "
        f"{row['exact']['excess']:+.2%}, penalty {row['penalty']['excess']:+.2%}"
    )
    return row
