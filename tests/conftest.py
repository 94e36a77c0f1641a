"""Shared test setup.

- ``tests/architectures.py`` is importable as ``architectures``.
- ``single_thread``: one intra-op thread for the modules that use it. Those tests run many tiny
  float64 ops, for which thread hand-offs cost far more than they save (a 3x4x6x6 BatchNorm
  takes milliseconds with two threads on a busy machine, microseconds with one).
- ``captured_figures``: every matplotlib figure saved while the test runs.
- ``one_process``: a gloo process group of this process alone.
- ``clamped``: the verify tests' two-layer model with a clampable unit, and its structure.
- ``quick_run``, ``quick_copy``: one quick reproduction for the session, and a copy of it.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def captured_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib ``Figure`` saved (``savefig``) while the test runs, in order."""
    from matplotlib.figure import Figure

    figs: list = []
    savefig = Figure.savefig

    def capture(fig, *args, **kwargs):
        figs.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return figs


@pytest.fixture
def one_process():
    """A gloo process group of this process alone (ended afterwards)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def clamped():
    """``test_verify_audit.Clamped`` in float64 (seed 0) and its structure (one generator per
    hidden unit)."""
    import gaugefix
    from test_verify_audit import WIDTH, Clamped, randn

    torch.manual_seed(0)
    model = Clamped().double()
    s = gaugefix.discover(model, randn(5, 4))
    assert s.num_generators == WIDTH
    return model, s


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One ``gaugefix reproduce --quick --jobs 2`` for the session: its output folder, never
    written to afterwards, and the command's output. The tests that check the quick reproduction
    read it through ``quick_copy`` (the run takes minutes; each test ran it for itself)."""
    from typer.testing import CliRunner

    from gaugefix.cli import app

    out = tmp_path_factory.mktemp("quick-run") / "results"
    result = CliRunner().invoke(app, ["reproduce", "--quick", "--jobs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture
def quick_copy(quick_run: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    """A copy of the session's quick reproduction, as a folder of the test's own (the test may
    re-run or re-render into it), and the command's output."""
    out = tmp_path / "results"
    shutil.copytree(quick_run[0], out)
    return out, quick_run[1]
