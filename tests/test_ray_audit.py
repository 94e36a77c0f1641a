"""``--executor ray`` under faults the other Ray tests leave out: SIGTERM of the driver, a task
that raises on the cluster, and an address where something other than Ray listens. Each is one
line, leaves the store as a resumable sweep would, and leaves no process behind. Every Ray
driver runs as a ``gaugefix`` subprocess, so the test process never imports Ray."""

from __future__ import annotations

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

from gaugefix.report import STORE_NAME
from processes import all_end
from test_ray import GRID, HEAD, JOIN, RUNS, _start, _stored

INTERRUPTED = "interrupted: finished runs are stored; run the same command to resume\n"


def _claims(out: Path) -> int:
    db = sqlite3.connect(out / STORE_NAME, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    finally:
        db.close()


def _progress(line: str) -> bool:
    """Whether a line of stderr is the sweep's progress line (shown without a terminal)."""
    return line.startswith("[gaugefix] ") and " elapsed, " in line


def test_sigterm_of_the_driver_is_one_line_and_releases_its_claims(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    driver = _start(["sweep", *GRID, "--out", str(out), "--executor", "ray", "--jobs", "2"])
    with all_end(driver.pid):  # the local instance the command started ends with it
        deadline = time.monotonic() + 120
        while _stored(out) == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    assert 0 < _stored(out) < RUNS, "the driver was not stopped mid-sweep"
    assert driver.returncode == 130, err
    # nor Ray's signal dump, nor its warnings (a slow start may show a progress line)
    assert "".join(line for line in err.splitlines(True) if not _progress(line)) == INTERRUPTED
    assert _claims(out) == 0


def test_a_task_that_raises_on_the_cluster_is_one_line_naming_its_run(tmp_path):
    pytest.importorskip("ray")
    broken = tmp_path / "node" / "gaugefix"  # the cluster's workers import this gaugefix
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no gaugefix on this node')\n")
    env = {**JOIN, "PYTHONPATH": str(broken.parent)}
    head = _start_head(env)
    out = tmp_path / "ray"
    with all_end(head.pid):
        try:
            address = head.stdout.readline().strip()
            assert address, "the Ray head did not start"
            args = ["sweep", *GRID[:2], "--steps", "5", "--out", str(out), "--executor", "ray"]
            done = _start([*args, "--ray-address", address], JOIN)
            _, err = done.communicate(timeout=120)
        finally:
            head.stdin.close()
            head.wait(120)
    assert done.returncode == 2, err
    assert err.startswith("error: the run (task teacher-student, method plain, optimizer gd")
    assert "failed on the cluster: " in err and "no gaugefix on this node" in err
    assert len(err.strip().splitlines()) == 1
    assert _stored(out) == 0 and _claims(out) == 0


def _start_head(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
    )


def test_an_address_where_something_else_listens_fails_fast(tmp_path):
    pytest.importorskip("ray")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:  # an HTTP/1.1 server, say
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    out = tmp_path / "out"
    start = time.monotonic()
    try:
        sweep = ["sweep", "--task", "teacher-student", "--steps", "2", "--executor", "ray"]
        driver = _start([*sweep, "--ray-address", address, "--out", str(out)], JOIN)
        with all_end(driver.pid):
            _, err = driver.communicate(timeout=120)
    finally:
        server.close()
    assert time.monotonic() - start < 60
    assert driver.returncode == 2, err
    assert err == f"error: no Ray cluster answers at {address}: something else listens there\n"
    assert not out.exists()


def test_the_driver_keeps_the_programs_sigterm_handler():
    pytest.importorskip("ray")
    code = textwrap.dedent(
        """
        import signal
        from gaugefix.experiments.ray_executor import ray_executor
        def mine(signum, frame): pass
        signal.signal(signal.SIGTERM, mine)
        with ray_executor(None, 1) as workers:
            assert signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGTERM)
            print(workers.width)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "1" and done.stderr == ""
