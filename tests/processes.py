"""Watching real processes: every process descended from one a test started must end."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def processes() -> dict[int, tuple[int, int]]:
    """Every live process (zombies, which have ended, left out): pid -> (parent pid, start
    time)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


@contextmanager
def all_end(root: int, within: float = 30.0) -> Iterator[set[int]]:
    """Watch every process descended from ``root`` while the block runs (yields the pids seen
    so far); afterwards each must have exited within ``within`` seconds, or it is killed and the
    test fails."""
    seen: dict[int, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            table = processes()
            for pid in descendants(root, table):
                seen.setdefault(pid, table[pid][1])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen.keys()
    finally:  # also when the block failed: nothing is left running
        stop.set()
        watcher.join()
        deadline = time.monotonic() + within
        while True:
            table = processes()
            left = [pid for pid, start in seen.items() if table.get(pid, (0, None))[1] == start]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def report_and_exit(result: dict) -> None:
    """Rank 0 prints ``result`` as one JSON line; every process leaves the group and exits at
    once (gloo on CPU occasionally aborts at interpreter finalization, examples/ddp_train.py)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
