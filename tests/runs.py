"""Run results made by hand for the store, summary and report tests."""

from __future__ import annotations

from gaugefix.experiments.engine import CurvePoint, RunConfig, RunResult, run_status


def run_result(
    method: str,
    lr: float,
    top: float,
    steps: int = 10,
    batch: int = 0,
    seed: int = 0,
    task: str = "t",
    test_loss: float | None = 0.3,
) -> RunResult:
    """A run of ``task`` stable (with test metrics) up to ``top`` and diverged above."""
    config = RunConfig(task, method, "sgd", lr, 0.0, 0.0, seed, batch, steps, task_hash="h")
    final = 0.2 if lr <= top else None
    ok = final is not None
    curve = [CurvePoint(0, 1.0, 0.5, 0.25), CurvePoint(steps, 0.2, 0.4 + seed, 0.125)]
    return RunResult(
        config,
        run_status(1.0, final, 0.5),
        1.0,
        0.5,
        final,
        test_loss if ok else None,
        0.9 if ok else None,
        0.8 if ok else None,
        0.1 + seed / 10 if ok else None,
        0.01 if ok else None,
        None if ok else 5,
        1.0 if ok else 2e3,
        curves=curve if ok else [],
    )
