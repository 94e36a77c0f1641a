"""Shared test setup.

- ``tests/architectures.py`` is importable as ``architectures``.
- ``single_thread``: one intra-op thread for the modules that use it. Those tests run many tiny
  float64 ops, for which thread hand-offs cost far more than they save (a 3x4x6x6 BatchNorm
  takes milliseconds with two threads on a busy machine, microseconds with one).
- ``captured_figures``: every matplotlib figure saved while the test runs.
- ``one_process``: a gloo process group of this process alone.
"""

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
