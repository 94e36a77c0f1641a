"""Progress of long commands: a tqdm bar on a terminal, otherwise plain lines on stderr."""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["Progress"]


class Progress:
    """Units done out of ``total`` and the time left, shown at least every ``every`` seconds
    while open (a background thread keeps the elapsed time moving through long stretches with
    no report; plain lines start after ``every`` seconds, and end with a line at completion).
    Work in progress counts by fractions: ``update(part=k, amount=x)`` credits ``x`` units to
    part ``k`` until it is finished (``amount=0`` once it is counted in ``done``)."""

    def __init__(self, total: int, unit: str = "runs", every: float = 5.0) -> None:
        self.total, self.unit, self.every = total, unit, every
        self.done, self.label = 0, ""
        self.parts: dict[int, float] = {}
        self.start = self.shown = time.monotonic()
        self.finished, self.lines = False, 0
        self.lock = threading.Lock()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit=unit,
                dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total} "
                + unit
                + " [{elapsed}<{remaining}]",
            )
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        self.ticker.start()

    @property
    def value(self) -> float:
        return min(self.total, self.done + sum(self.parts.values()))

    def update(
        self,
        done: int | None = None,
        part: int | None = None,
        amount: float = 0.0,
        label: str | None = None,
    ) -> None:
        """Set the units ``done`` and/or the ``amount`` of ``part`` in progress, or the
        ``label`` of what is being done; then show it (plain lines: if ``every`` passed)."""
        with self.lock:
            if done is not None:
                self.done = done
            if part is not None:
                self.parts[part] = amount
            if label is not None:
                self.label = label
            self._show(force=False)

    def _show(self, force: bool) -> None:
        value, now = self.value, time.monotonic()
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label}: " if self.label else "", refresh=False)
            self.bar.update(value - self.bar.n)
            if force:
                self.bar.refresh()
            return
        last = value == self.total and not self.finished and self.lines > 0
        if not (last or force or now - self.shown >= self.every):
            return
        self.shown, self.finished, self.lines = now, self.finished or last, self.lines + 1
        elapsed = now - self.start
        left = f"~{elapsed / value * (self.total - value):.0f} s left" if value else "none done yet"
        print(
            f"[gaugefix] {self.label + ': ' if self.label else ''}{round(value, 1):g}/"
            f"{self.total} {self.unit}, {elapsed:.0f} s elapsed, {left}",
            file=sys.stderr,
            flush=True,
        )

    def _tick(self) -> None:
        while not self.stop.wait(self.every / 5):
            with self.lock:
                waiting = not self.finished and self.value < self.total
                if waiting and time.monotonic() - self.shown >= self.every:
                    self._show(force=True)
                    self.shown = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        self.ticker.join()
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
