"""Shared test setup.

- ``tests/architectures.py`` is importable as ``architectures``.
- ``single_thread``: one intra-op thread for the modules that use it. Those tests run many tiny
  float64 ops, for which thread hand-offs cost far more than they save (a 3x4x6x6 BatchNorm
  takes milliseconds with two threads on a busy machine, microseconds with one).
- ``captured_figures``: every matplotlib figure saved while the test runs.
"""

import sys
from pathlib import Path

import pytest
import torch

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
