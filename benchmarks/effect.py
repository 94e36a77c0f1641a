"""Item 1b: the effect of ``GaugeFixing``'s default configuration (an exact orbit step every
``EVERY`` optimizer steps at the summed rate) against an exact orbit step at every step, on the
teacher-student scale-drift experiment: mini-batch training of the 16-128-1 student from the
balanced point of PyTorch's default initialisation (plain training starts there too, so only
the drift accumulated in training is measured), and the final RMS log-ratio
(``imbalance_stats``) of plain training over that of each configuration (drift suppression;
larger is less drift). The final measurement is taken just before the default configuration's
next orbit step.

No timing: every number here is deterministic (fixed seeds, one thread).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

import gaugefix
from gaugefix.experiments.tasks import load_task
from gaugefix.train.hook import EVERY

# Optimizers of the drift experiment, with learning rates chosen before measuring (the order of
# magnitude at which each trains the student without diverging), and the exact strength of the
# reproduction's exact method.
OPTIMIZERS = {
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr), 0.1),
    "momentum": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 0.01),
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr), 1e-3),
}
STRENGTH = 1.0
BATCH = 64


def final_log_ratio(opt_name: str, every: int | None, steps: int, seed: int) -> float:
    """Train the balanced student with mini-batches; ``every=None`` is plain training."""
    task = load_task("teacher-student")
    torch.manual_seed(seed)
    model = task.make_model()
    structure = gaugefix.discover(model, task.x[:2])
    gaugefix.balance_(model, structure)
    make, lr = OPTIMIZERS[opt_name]
    opt = make(model.parameters(), lr)
    if every is not None:
        gaugefix.GaugeFixing(opt, model, structure, STRENGTH, every=every)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(task.x), generator=gen)[:BATCH]
        opt.zero_grad()
        task.loss(model(task.x[idx]), task.y[idx]).backward()
        opt.step()
    return gaugefix.imbalance_stats(model, structure)["log_ratio_rms"]


def run(tiny: bool = False, log: Callable[[str], None] = print) -> dict:
    # The last step is the one just before an orbit step of the default configuration: its
    # imbalance has drifted for EVERY - 1 steps since the last one (the least favourable point).
    steps, seeds = (2 * EVERY - 1, 1) if tiny else (200 * EVERY + EVERY - 1, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = {}
    try:
        for opt_name in OPTIMIZERS:
            per_seed = []
            for seed in range(seeds):
                plain = final_log_ratio(opt_name, None, steps, seed)
                every_step = final_log_ratio(opt_name, 1, steps, seed)
                default = final_log_ratio(opt_name, EVERY, steps, seed)
                per_seed.append(
                    {
                        "plain": plain,
                        "every_step": every_step,
                        "default": default,
                        "suppression_every_step": plain / every_step,
                        "suppression_default": plain / default,
                    }
                )
            row = {
                "lr": OPTIMIZERS[opt_name][1],
                "seeds": per_seed,
                "suppression_every_step": statistics.median(
                    r["suppression_every_step"] for r in per_seed
                ),
                "suppression_default": statistics.median(
                    r["suppression_default"] for r in per_seed
                ),
            }
            row["relative_difference"] = (
                row["suppression_default"] / row["suppression_every_step"] - 1.0
            )
            rows[opt_name] = row
            log(
                f"  {opt_name} (lr {row['lr']:g}): drift suppression every step "
                f"{row['suppression_every_step']:.3g}, default (every {EVERY}) "
                f"{row['suppression_default']:.3g} ({row['relative_difference']:+.1%})"
            )
    finally:
        torch.set_num_threads(threads)
    return {
        "every": EVERY,
        "strength": STRENGTH,
        "batch": BATCH,
        "steps": steps,
        "optimizers": rows,
        "max_relative_difference": max(abs(r["relative_difference"]) for r in rows.values()),
    }
