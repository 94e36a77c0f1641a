"""Second audit of ``gaugefix balance`` and checkpoint files: buffers a forward updates, models
that cannot be copied, and signals that arrive while the output is being written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import gaugefix
from faults import listing
from gaugefix.checkpoint import CheckpointError, balance_state_dict, read_state_dict
from gaugefix.cli import app

cli = CliRunner()
TESTS = Path(__file__).parent


class Recording(nn.Module):
    """A ReLU MLP whose forward records, in eval mode too, the largest input seen per feature
    (a float buffer, as an observer does) and counts its calls (an integer buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(5, 7), nn.Linear(7, 3)
        self.register_buffer("seen", torch.zeros(5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            torch.maximum(self.seen, x.abs().amax(0).to(self.seen.dtype), out=self.seen)
            self.calls += 1
        return self.down(F.relu(self.up(x)))


def scrambled(make, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``make()``'s state dict moved off balance by a random gauge, in ``dtype``."""
    torch.manual_seed(0)
    model = make().double().eval()
    structure = gaugefix.discover(model, torch.randn(1, 5, dtype=torch.float64))
    gaugefix.random_gauge_(model, structure, 1.5, torch.Generator().manual_seed(1))
    state = model.state_dict()
    return {k: v.to(dtype) if v.is_floating_point() else v.clone() for k, v in state.items()}


def _balance(model: str, src: Path, out: Path, *extra: str, shape: str = "2,5"):
    args = ["balance", "--model", model, "--weights", str(src), "--out", str(out)]
    return cli.invoke(app, [*args, "--input-shape", shape, *extra])


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("objective", ["norm", "range"])
def test_buffers_a_forward_updates_are_written_as_they_were(tmp_path, objective):
    """The forwards of the output check updated the buffers, and the updated values were
    written (a float buffer silently changed); an integer one crashed the overflow check with a
    traceback ("linalg.vector_norm: Expected a floating point ... Got Long")."""
    state = scrambled(Recording)
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(state, src)
    result = _balance("test_cli_audit2:Recording", src, out, "--objective", objective)
    assert result.exit_code == 0, result.output
    written = read_state_dict(out).tensors
    assert torch.equal(written["seen"], state["seen"]) and int(written["calls"]) == 0
    assert not torch.equal(written["up.weight"], state["up.weight"])  # the gauge acted
    returned, _ = balance_state_dict(Recording(), state, torch.randn(2, 5))
    for name in ("seen", "calls"):
        assert returned[name].dtype == state[name].dtype
        assert torch.equal(returned[name], state[name])


def old_weight_norm() -> nn.Module:
    """``torch.nn.utils.weight_norm`` (deprecated): its module cannot be deep-copied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        first = nn.utils.weight_norm(nn.Linear(5, 7))
    return nn.Sequential(first, nn.ReLU(), nn.Linear(7, 3))


def test_a_model_that_cannot_be_copied_is_one_line(tmp_path):
    """``copy.deepcopy`` of the model raised a RuntimeError traceback."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(old_weight_norm().state_dict(), src)
    before = listing(tmp_path)
    result = _balance("test_cli_audit2:old_weight_norm", src, out)
    _one_line(result, "cannot copy the model (RuntimeError: Only Tensors created explicitly")
    assert listing(tmp_path) == before
    with pytest.raises(CheckpointError, match="cannot copy the model"):
        balance_state_dict(old_weight_norm(), old_weight_norm().state_dict(), torch.randn(1, 5))


def plain() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


SIGNALLED = """
import os, signal, sys
import gaugefix.files
from gaugefix.cli import app

real = gaugefix.files.os.fsync


def signalled(fd):  # the signal arrives while the temporary file is being written
    os.kill(os.getpid(), signal.{signal})
    real(fd)


gaugefix.files.os.fsync = signalled
app(sys.argv[1:])
"""


def _signalled(signum: signal.Signals, *args: str) -> subprocess.CompletedProcess:
    """The command ``args``, run in a process that gets ``signum`` while it writes its output."""
    script = textwrap.dedent(SIGNALLED).format(signal=signum.name)
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=TESTS,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        timeout=120,
    )


def _interrupted(done: subprocess.CompletedProcess, out: Path) -> None:
    assert done.returncode == 130, done.stderr
    lines = done.stderr.strip().splitlines()
    assert (
        lines and lines[-1] == f"interrupted: {out} is as it was (or complete, had its write ended)"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_during_the_write_leaves_no_partial_file(tmp_path, signum):
    """SIGTERM killed the command with the half-written temporary file and the directories made
    for it left behind; Ctrl-C ended it with exit status 1 ("Aborted!")."""
    src = tmp_path / "in.pt"
    torch.save(scrambled(plain), src)
    (tmp_path / "old.pt").write_bytes(b"the previous weights")
    before = listing(tmp_path)
    for out in (tmp_path / "new" / "dir" / "out.pt", tmp_path / "old.pt"):
        args = ["--model", "test_cli_audit2:plain", "--weights", str(src), "--out", str(out)]
        _interrupted(_signalled(signum, "balance", *args, "--input-shape", "2,5"), out)
        assert listing(tmp_path) == before and not (tmp_path / "new").exists()
    out = tmp_path / "new" / "structure.json"
    _interrupted(_signalled(signum, "inspect", "mlp", "--save", str(out)), out)
    assert listing(tmp_path) == before and not (tmp_path / "new").exists()


class Softplus(nn.Module):
    """Not positively homogeneous; the test below registers a wrong rule that says it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


def dead_output() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), Softplus(), nn.Linear(6, 2), nn.ReLU())


def test_outputs_all_zero_on_the_example_input_are_refused(tmp_path):
    """The output check passed vacuously (tolerance 0 x max |output| = 0, change 0) when every
    output was 0 on the example input, so a wrong symmetry was written: on 256 inputs of scale 3
    the balanced weights moved the outputs by 0.39 (max |output| 4.45)."""
    torch.manual_seed(0)
    model = dead_output()
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # unbalanced, so balancing moves it
        model[2].bias.fill_(-3.0)  # the final ReLU is 0 on the example input
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), src)
    gaugefix.register_rule(Softplus, gaugefix.rules.elementwise)
    try:
        result = _balance("test_cli_audit2:dead_output", src, out, shape="1,4")
        x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))  # the command's
        with pytest.raises(CheckpointError, match="all zero"):
            balance_state_dict(dead_output(), model.state_dict(), x)
    finally:
        gaugefix.unregister_rule(Softplus)
    _one_line(result, "the model's outputs on the example input are all zero")
    assert not out.exists()


class Aliased(nn.Module):
    """A ReLU MLP whose second module holds a buffer sharing the first one's weight storage
    (a view of it under another name): loading a state dict copies both into that storage."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(5, 7), nn.Linear(7, 3)
        self.down.register_buffer("up_view", self.up.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))


def test_a_buffer_that_shares_a_weights_storage_is_not_written_stale(tmp_path):
    """The float64 copy (``.to``) no longer shared the storage, so the weight was balanced and
    the buffer kept: loaded into the model, the stale buffer overwrote the balanced weight (it
    comes later), and the function moved by 0.76 relative, with ``within_tolerance`` True."""
    torch.manual_seed(0)
    model = Aliased()
    with torch.no_grad():
        model.up.weight.mul_(3.0)  # unbalanced, so balancing moves it
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), src)
    result = _balance("test_cli_audit2:Aliased", src, out)
    _one_line(result, "balancing would break a tie of the model: up.weight and down.up_view differ")
    assert not out.exists()
