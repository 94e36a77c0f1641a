"""Single float64 networks of a task, for the analyses that probe one network at a time."""

from __future__ import annotations

import torch
from torch import nn

import gaugefix
from gaugefix.experiments.tasks import Task

__all__ = ["float64_model", "loss64", "train_plain"]


def float64_model(task: Task, seed: int = 0) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    """The task's model with PyTorch's default initialisation for ``seed``, in float64, and its
    gauge structure; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.make_model().to(torch.float64)
        return model, gaugefix.discover(model, task.arrays(torch.float64)[0][:2])


def loss64(task: Task, model: nn.Module) -> torch.Tensor:
    """The float64 model's training loss on the whole training set."""
    x, y, _, _ = task.arrays(torch.float64)
    return task.loss(model(x), y)


def train_plain(task: Task, model: nn.Module, lr: float, steps: int) -> None:
    """``steps`` of full-batch gradient descent at ``lr``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss64(task, model).backward()
        opt.step()
