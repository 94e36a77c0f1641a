"""Runs as the store returns them, grouped into tasks, regimes and cells."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

Runs = list[dict[str, Any]]
# The references a method is compared with, where a regime has them: plain training from the
# initialisation as given, and plain training from its balanced point.
REFERENCES = ("plain", "balanced-init")


def s_key(s: float) -> str:
    """An initial imbalance as a JSON key: ``"0.0"``, ``"1.5"``."""
    return str(float(s))


def lr_key(lr: float) -> str:
    """A learning rate as a JSON key, to 6 significant digits: ``"0.353553"``."""
    return f"{lr:.6g}"


@dataclass(frozen=True)
class Regime:
    """How a group of runs was trained: optimizer, batch size (0: full batch) and steps."""

    optimizer: str
    batch_size: int
    steps: int

    @staticmethod
    def of(run: dict[str, Any]) -> Regime:
        return Regime(run["optimizer"], run["batch_size"], run["steps"])

    @staticmethod
    def parse(key: str) -> Regime:
        optimizer, batch, steps = key.split("/")
        return Regime(optimizer, 0 if batch == "full" else int(batch), int(steps))

    @property
    def key(self) -> str:
        """``"gd/full/150"``, ``"adam/64/1500"``: optimizer, batch size, steps."""
        return f"{self.optimizer}/{self.batch_size or 'full'}/{self.steps}"

    @property
    def label(self) -> str:
        """``"full-batch gd, 150 steps"``, ``"adam, batch 64, 1500 steps"``."""
        if self.batch_size:
            return f"{self.optimizer}, batch {self.batch_size}, {self.steps} steps"
        return f"full-batch {self.optimizer}, {self.steps} steps"

    @property
    def slug(self) -> str:
        return self.key.replace("/", "-")


def reference(runs: Runs) -> str | None:
    """The reference of a regime's comparisons at s = 0: plain, else balanced-init."""
    present = {r["method"] for r in runs if r["s"] == 0.0}
    return next((m for m in REFERENCES if m in present), None)


def by_task(runs: Runs) -> dict[str, Runs]:
    """The runs of each task, keyed by its name; when runs of one name have several task hashes
    (other data, model or experiment definitions) each hash is its own task, keyed
    ``NAME@HASH`` (the hash's first 8 digits), so they are never mixed."""
    hashes: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        hashes[r["task"]].add(r["task_hash"])
    out: dict[str, Runs] = defaultdict(list)
    for r in runs:
        several = len(hashes[r["task"]]) > 1
        out[f"{r['task']}@{r['task_hash'][:8]}" if several else r["task"]].append(r)
    return dict(sorted(out.items()))


def by_regime(runs: Runs) -> dict[Regime, Runs]:
    """The runs of each regime, full-batch ones first, then by optimizer and steps."""
    out: dict[Regime, Runs] = defaultdict(list)
    for r in runs:
        out[Regime.of(r)].append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0].batch_size > 0, kv[0].steps, kv[0].key)))


def group(runs: Runs, *columns: str) -> dict[tuple, Runs]:
    """``runs`` grouped by the values of ``columns``, in sorted order."""
    out: dict[tuple, Runs] = defaultdict(list)
    for r in runs:
        out[tuple(r[c] for c in columns)].append(r)
    return dict(sorted(out.items()))


def median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None
