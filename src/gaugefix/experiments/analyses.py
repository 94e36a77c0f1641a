"""Experiments 4 and 5 of the reproduction: dissipative relaxation and conditioning.

Each analysis trains or probes a single float64 network with the library's public API and is
stored under its name in the store's ``analyses`` table (skipped when already there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gaugefix
from gaugefix.diagnostics import relaxation_rates, sharpness
from gaugefix.experiments.engine import init_direction, task_hash
from gaugefix.experiments.progress import Progress
from gaugefix.experiments.store import Store
from gaugefix.experiments.summary import max_stable_lr, s_key
from gaugefix.experiments.tasks import Task, load_task
from gaugefix.soft import orbit_selection_grad


def _model(task: Task, seed: int = 0) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(seed)
    model = task.make_model().to(torch.float64)
    return model, gaugefix.discover(model, task.x[:2].to(torch.float64))


def _loss(task: Task, model: nn.Module) -> torch.Tensor:
    y = task.y.to(torch.float64) if task.kind == "regression" else task.y
    return task.loss(model(task.x.to(torch.float64)), y)


def _train_plain(task: Task, model: nn.Module, lr: float, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _loss(task, model).backward()
        opt.step()


def relaxation(task: Task, strength: float, train_steps: int, fall: float = 0.9) -> dict[str, Any]:
    """Penalty-only gradient descent on a trained network against ``d mu/dt = -2 lambda K mu``.

    A plain network is trained (full-batch GD, lr 0.05), then descends ``P`` alone with a step
    ``dt`` that makes the fastest mode's Euler factor ``0.01``, until ``||mu||`` falls to
    ``fall`` times its start (the prediction freezes ``K`` at the start, and ``K`` moves with the
    representative). For each mode of ``K`` with at least 1% of ``||mu||`` the measured decay
    rate (a least-squares fit of ``log |c_i(t)|``) is compared with the predicted ``2 lambda k_i``.
    """
    model, structure = _model(task)
    _train_plain(task, model, 0.05, train_steps)
    pred = relaxation_rates(model, structure, strength)
    modes = pred.modes
    dt = 0.01 / float(pred.rates.max())
    mu0 = gaugefix.imbalance(model, structure).detach()
    c0 = modes.T @ mu0
    times, coords, norms = [0.0], [c0], [float(mu0.norm())]
    params = structure.bind(model)
    for step in range(1, 200_000):
        with torch.no_grad():
            grads = orbit_selection_grad(params, structure, strength)
            for name, g in grads.items():
                params[name].sub_(dt * g)
        mu = gaugefix.imbalance(model, structure).detach()
        times.append(step * dt)
        coords.append(modes.T @ mu)
        norms.append(float(mu.norm()))
        if norms[-1] <= fall * norms[0]:
            break
    t = torch.tensor(times, dtype=torch.float64)
    c = torch.stack(coords)  # [T, N]
    significant = c0.abs() >= 0.01 * float(mu0.norm())
    measured, predicted = [], []
    for i in torch.nonzero(significant).reshape(-1).tolist():
        amp = c[:, i].abs()
        keep = amp > 1e-8 * float(mu0.norm())
        slope = _slope(t[keep], torch.log(amp[keep]))
        measured.append(-slope)
        predicted.append(float(pred.rates[i]))
    errors = [abs(m - p) / p for m, p in zip(measured, predicted, strict=True)]
    pred_norm = [float((c0 * torch.exp(-pred.rates * ti)).norm()) for ti in times]
    return {
        "task": task.name,
        "strength": strength,
        "dt": dt,
        "steps": len(times) - 1,
        "fall": fall,
        "predicted_rates": predicted,
        "measured_rates": measured,
        "max_relative_error": max(errors) if errors else None,
        "times": times[:: max(1, len(times) // 200)],
        "measured_norm": norms[:: max(1, len(times) // 200)],
        "predicted_norm": pred_norm[:: max(1, len(times) // 200)],
    }


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    xm, ym = x.mean(), y.mean()
    return float(((x - xm) * (y - ym)).sum() / (x - xm).square().sum())


def sharpness_init(task: Task, s_values: list[float]) -> dict[str, Any]:
    """Sharpness of the training loss at initialisation along the orbit ``s z`` (the same
    function for every ``s``), and at the balanced point of that orbit."""

    def value(model: nn.Module) -> float:
        y = task.y.to(torch.float64) if task.kind == "regression" else task.y
        return float(sharpness(model, task.loss, task.x.to(torch.float64), y))

    by_s = {}
    for s in s_values:
        model, structure = _model(task)
        gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
        by_s[s_key(s)] = value(model)
    model, structure = _model(task)
    gaugefix.balance_(model, structure)
    return {"task": task.name, "by_s": by_s, "balanced": value(model)}


def sharpness_training(
    task: Task, lr: float, s: float, steps: int, every: int, strength: float
) -> dict[str, Any]:
    """Sharpness along full-batch GD training for ``plain`` and ``exact`` (via
    :class:`gaugefix.GaugeFixing`), from the initialisation moved by ``s z``."""
    out: dict[str, Any] = {"task": task.name, "lr": lr, "s": s, "two_over_lr": 2 / lr}
    y = task.y.to(torch.float64) if task.kind == "regression" else task.y
    for method in ("plain", "exact"):
        model, structure = _model(task)
        gaugefix.apply_gauge_(model, structure, s * init_direction(structure))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        if method == "exact":
            gaugefix.GaugeFixing(opt, model, structure, strength, mode="exact")
        curve = []
        for step in range(steps + 1):
            loss = _loss(task, model)
            if not math.isfinite(loss.item()):
                break
            if step % every == 0:
                sharp = float(sharpness(model, task.loss, task.x.to(torch.float64), y))
                curve.append((step, loss.item(), sharp))
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[method] = curve
    return out


def run_analyses(store: Store, quick: bool) -> None:
    """Experiments 4 and 5 on teacher-student (also deep-teacher-student in the full run): each
    analysis is computed and stored under its name, with progress, unless the store holds it
    for the same task hash and grid (``"made_for"`` in its value)."""
    tasks = ["teacher-student"] if quick else ["teacher-student", "deep-teacher-student"]
    s_values = [-2.0, -1.0, 0.0, 1.0, 2.0] if quick else [x / 2 for x in range(-4, 5)]
    steps = 100 if quick else 300
    todo: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    made_for: dict[str, dict[str, Any]] = {}
    for name in tasks:
        task = load_task(name)
        made_for[name] = {"task_hash": task_hash(task), "quick": quick}
        todo += [
            (f"relaxation/{name}", lambda t=task: relaxation(t, 1.0, 150 if quick else 500)),
            (f"sharpness-init/{name}", lambda t=task: sharpness_init(t, s_values)),
            (
                f"sharpness-train/{name}",
                lambda t=task: sharpness_training(
                    t, _largest_stable_lr(store, t), 1.0, steps, steps // 10, 1.0
                ),
            ),
        ]
    todo = [
        (name, compute)
        for name, compute in todo
        if (store.analysis(name) or {}).get("made_for") != made_for[name.split("/")[1]]
    ]
    if not todo:
        return
    with Progress(len(todo), unit="analyses") as progress:
        for i, (name, compute) in enumerate(todo):
            progress.update(done=i, label=name)
            start = time.perf_counter()
            value = {**compute(), "made_for": made_for[name.split("/")[1]]}
            store.put_analysis(name, value, time.perf_counter() - start, replace=True)
        progress.update(done=len(todo), label="")


def _largest_stable_lr(store: Store, task: Task) -> float:
    """The largest learning rate stable for plain full-batch GD at s = 1 (0.1 without runs)."""
    runs = store.runs(
        task=task.name, task_hash=task_hash(task), method="plain", optimizer="gd", s=1.0
    )
    return max_stable_lr(runs) or 0.1
