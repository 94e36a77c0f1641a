"""What ``--executor ray`` says when Ray is missing or no cluster runs: what to do, in gaugefix's
terms. The test process never imports Ray (the command that would runs in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from gaugefix.cli import app

cli = CliRunner()
SWEEP = ["sweep", "--task", "teacher-student", "--steps", "2", "--executor", "ray"]


def test_without_ray_an_address_says_that_ray_is_needed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    out = tmp_path / "out"
    for address in ("127.0.0.1:1", "auto"):
        result = cli.invoke(app, [*SWEEP, "--ray-address", address, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert result.stderr == "error: --executor ray needs Ray: pip install 'gaugefix[ray]'\n"
        assert not out.exists()


def test_auto_without_a_cluster_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")  # where `ray start` would have left its address
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from gaugefix.cli import app; app()", *SWEEP]
    done = subprocess.run(
        [*command, "--ray-address", "auto", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: cannot join the Ray cluster at auto: none runs on")
    assert "`ray start --head`" in done.stderr and "--ray-address HOST:PORT" in done.stderr
    assert "`--address`" not in done.stderr and "RAY_ADDRESS" not in done.stderr  # Ray's terms
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()
