"""Item 6: peak resident memory of training with ``GaugeFixing`` (its defaults, and penalty mode)
against the same training without it (ResNet-18 with SGD, the GPT-style transformer with AdamW),
each measured in a fresh process, alternating, medians over rounds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.memory_probe import CASES, MODES

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
NAMES = {
    "resnet18": "ResNet-18, batch 64, SGD",
    "gpt": "GPT 6 x 384, sequence 128, batch 8, AdamW",
}


def supported() -> bool:
    return Path("/proc/self/clear_refs").exists()


def _probe(case: str, mode: str, tiny: bool) -> dict:
    args = [sys.executable, str(PROBE), case, mode, str(torch.get_num_threads())]
    out = subprocess.run(args + (["tiny"] if tiny else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(tiny: bool = False, log: Callable[[str], None] = print) -> list[dict] | dict:
    if not supported():
        log("  skipped: needs Linux /proc/self/clear_refs")
        return {"skipped": "needs Linux /proc/self/clear_refs"}
    rounds = 2 if tiny else 5
    modes = list(MODES)
    rows = []
    for case in CASES:
        peaks: dict[str, list[int]] = {m: [] for m in modes}
        for i in range(rounds):
            k = i % len(modes)
            for mode in modes[k:] + modes[:k]:
                peaks[mode].append(_probe(case, mode, tiny)["peak"])
        row: dict = {"case": NAMES[case] + (" (tiny)" if tiny else ""), "rounds": rounds}
        row["plain_peak_mib"] = statistics.median(peaks["plain"]) / 2**20
        for mode in modes[1:]:
            row[mode] = {
                "peak_mib": statistics.median(peaks[mode]) / 2**20,
                # The i-th process of each side forms a pair.
                "excess": statistics.median(
                    a / b - 1 for a, b in zip(peaks[mode], peaks["plain"], strict=True)
                ),
            }
        shown = ", ".join(f"{m} {row[m]['excess']:+.2%}" for m in modes[1:])
        log(f"  {row['case']}: peak RSS plain {row['plain_peak_mib']:.0f} MiB; {shown}")
        rows.append(row)
    return rows
