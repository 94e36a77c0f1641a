"""``--executor ray``: the same runs as the local executor, faults, and no Ray without it.

Every Ray driver runs as a ``gaugefix`` subprocess, so the test process never imports Ray, and
every process descended from one a test started is watched and must have ended afterwards.
A module-scoped Ray instance with 2 CPUs (``cluster``) serves the tests that join a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gaugefix.cli import app
from gaugefix.experiments.store import Store
from gaugefix.report import STORE_NAME
from processes import all_end, descendants, processes

cli = CliRunner()

GRID = [
    "--task", "teacher-student", "--method", "plain,exact", "--lr", "0.1,0.4", "--seeds", "2",
    "--optimizer", "gd,sgd,momentum,adam", "--steps", "40",
]  # fmt: skip
RUNS = 32  # 4 groups (one per optimizer) of 8 runs: 4 Ray tasks
GAUGEFIX = [sys.executable, "-c", "from gaugefix.cli import app; app()"]
HEAD = textwrap.dedent(
    """
    import logging, sys, ray
    info = ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                    logging_level=logging.ERROR, configure_logging=False)
    print(info.address_info["gcs_address"], flush=True)
    sys.stdin.read()
    ray.shutdown()
    """
)


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*GAUGEFIX, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    return out


def _runs(out: Path) -> dict[str, tuple]:
    """Every stored run by key: its results and its curve."""
    store = Store(out / STORE_NAME)
    rows = store.runs()
    assert len({r.config.key() for r in rows}) == len(rows)  # no run twice
    fields = ("status", "initial_loss", "final_loss", "test_loss", "accuracy", "test_accuracy")
    fields += ("log_ratio_rms", "mu_rel_max", "diverged_at", "balance_change")
    return {
        r.config.key(): (
            tuple(getattr(r, f) for f in fields),
            tuple(tuple(c) for c in store.curves(r.id)),
        )
        for r in rows
    }


def _summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("seconds")
    return summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The grid run by the local executor."""
    out = tmp_path_factory.mktemp("local")
    result = cli.invoke(app, ["sweep", *GRID, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(_runs(out)) == RUNS
    return out


@pytest.fixture(scope="module")
def cluster():
    """A Ray instance with 2 CPUs, joined by address: its address and its head's pid."""
    pytest.importorskip("ray")
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    with all_end(head.pid):
        try:
            address = head.stdout.readline().strip()
            assert address, "the Ray head did not start"
            yield address, head.pid
        finally:
            head.stdin.close()
            head.wait(120)


# Joining a cluster by an explicit address needs Ray's token mode set (``auto`` finds it).
JOIN = {"RAY_AUTH_MODE": "token"}


def test_library_and_local_executor_never_import_ray(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import gaugefix, gaugefix.cli
        from gaugefix.experiments.engine import RunConfig
        from gaugefix.experiments.runner import TaskSpec, run_all
        from gaugefix.experiments.store import Store
        task_hash = TaskSpec("teacher-student").hash()
        configs = [
            RunConfig("teacher-student", "plain", "gd", 0.1, 0.0, 0.0, 0, 0, 2, task_hash=task_hash)
        ]
        assert run_all(Store({str(tmp_path / "s.sqlite")!r}), configs, lambda c: TaskSpec(c.task))
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_ray_gives_the_runs_and_summary_of_the_local_executor(tmp_path, reference):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    # a local Ray instance with --jobs CPUs, started and stopped by the command
    driver = _start(["sweep", *GRID, "--out", str(out), "--executor", "ray", "--jobs", "2"])
    with all_end(driver.pid) as started:
        _finish(driver)
    assert len(started) >= 4  # the instance's processes (GCS, raylet, workers...), all ended
    assert _runs(out) == _runs(reference)
    assert _summary(out) == _summary(reference)


def _kill_one_task(head: int, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first worker of the cluster seen running a group of runs."""
    while not stop.is_set():
        for pid in descendants(head, processes()):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::train_batch"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


def test_a_worker_killed_mid_task_has_its_group_retried(tmp_path, reference, cluster):
    address, head = cluster
    out = tmp_path / "ray"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_one_task, args=(head, killed, stop))
    killer.start()
    try:
        args = ["sweep", *GRID, "--out", str(out), "--executor", "ray", "--ray-address", address]
        _finish(_start(args, JOIN))
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    assert _runs(out) == _runs(reference)  # no run lost, none twice, the same results


def _stored(out: Path) -> int:
    path = out / STORE_NAME
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0
    finally:
        db.close()


def test_a_driver_killed_and_restarted_resumes(tmp_path, reference, cluster):
    address, _ = cluster
    out = tmp_path / "ray"
    args = ["sweep", *GRID, "--out", str(out), "--executor", "ray", "--ray-address", address]
    driver = _start(args, JOIN)
    deadline = time.monotonic() + 240
    while _stored(out) == 0 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    before = _stored(out)
    assert 0 < before < RUNS, "the driver was not killed mid-sweep"
    assert f"{RUNS - before} new runs written" in _finish(_start(args, JOIN))
    assert _runs(out) == _runs(reference)
    assert _summary(out) == _summary(reference)


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as s:  # a port nothing listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    for args, message in (
        (["--executor", "ray", "--ray-address", f"127.0.0.1:{port}"], "cannot reach a Ray"),
        (["--executor", "ray", "--ray-address", "nowhere"], "must be auto, HOST:PORT"),
        (["--ray-address", f"127.0.0.1:{port}"], "--ray-address needs --executor ray"),
        (["--executor", "dask"], "unknown executor 'dask'"),
    ):
        for command in (["sweep", *GRID], ["reproduce", "--quick"]):
            result = cli.invoke(app, [*command, *args, "--out", str(out)])
            assert result.exit_code == 2, result.output
            assert result.output.startswith("error: ") and message in result.output
            assert len(result.output.strip().splitlines()) == 1
            assert not out.exists()
