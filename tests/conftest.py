"""Shared test setup.

- ``tests/architectures.py`` is importable as ``architectures``.
- One intra-op thread: the tests run many tiny float64 ops, for which thread hand-offs cost far
  more than they save (a 3x4x6x6 BatchNorm takes milliseconds with two threads on a busy machine,
  microseconds with one).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
