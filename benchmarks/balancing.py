"""Item 3: ``balance_`` against Gauss-Seidel sweeps of closed-form updates (Equi-normalization's
generalisation) and Saul's parallel updates, from ``random_gauge_(scale=3)`` to
``max |mu_n| / S_n <= 1e-10`` in float64."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import gaugefix
from benchmarks.baselines import gauss_seidel_balance_, saul_balance_
from benchmarks.common import paired, summary
from benchmarks.step import gpt
from gaugefix import zoo

TOL = 1e-10
SCALE = 3.0


@dataclass(frozen=True)
class BalanceCase:
    name: str
    make: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    pairs: int
    target: bool  # whether the 10x target applies (coupled generators)


def _floats(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, *shape, dtype=torch.float64)


def _ids(vocab: int, length: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, vocab, (1, length))


def cases(tiny: bool = False) -> list[BalanceCase]:
    if tiny:
        return [
            BalanceCase("MLP 6 x 16 (tiny)", lambda: zoo.mlp((16,) * 7), _floats(16), 2, True),
            BalanceCase("GPT (tiny)", lambda: zoo.GPT(32, 16, 2, 2, 32, 8), _ids(32, 8), 2, True),
            BalanceCase("ResNet (tiny)", lambda: zoo.ResNet((1, 1), 4), _floats(3, 8, 8), 2, False),
        ]  # fmt: skip
    return [
        BalanceCase("MLP 20 layers x 512", lambda: zoo.mlp((512,) * 21), _floats(512), 5, True),
        BalanceCase("GPT 6 x 384 (norm gains, query-key, value-output, MLP)", gpt, _ids(1024, 16),
                    5, True),
        BalanceCase("ResNet-18 (CIFAR)", zoo.resnet18, _floats(3, 32, 32), 5, False),
    ]  # fmt: skip


def mu_rel_max(model: nn.Module, structure: gaugefix.GaugeStructure) -> float:
    """``max_n |mu_n| / S_n`` over the live generators, float64, from the model's parameters."""
    s_in, s_out = gaugefix.moment.in_out_sums(
        {k: v.detach().double() for k, v in structure.bind(model).items()}, structure
    )
    live = (s_in > 0) & (s_out > 0)
    return float(((s_in - s_out).abs() / (s_in + s_out))[live].max())


def _ours(model: nn.Module, structure: gaugefix.GaugeStructure) -> int:
    return gaugefix.balance_(model, structure, tol=TOL).iterations


def _gauss_seidel(model: nn.Module, structure: gaugefix.GaugeStructure) -> int:
    return gauss_seidel_balance_(model, structure, tol=TOL).iterations


def _saul(model: nn.Module, structure: gaugefix.GaugeStructure) -> int:
    return saul_balance_(model, structure, tol=TOL).iterations


METHODS = {"balance_": _ours, "gauss-seidel": _gauss_seidel, "saul": _saul}


def run(tiny: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    return [_run_case(case, log) for case in cases(tiny)]


def _run_case(case: BalanceCase, log: Callable[[str], None]) -> dict:
    torch.manual_seed(0)
    base = case.make().double().train()
    x = case.example()
    structure = gaugefix.discover(base, x)
    gaugefix.random_gauge_(base, structure, SCALE, generator=torch.Generator().manual_seed(0))
    start = mu_rel_max(base, structure)
    models = {name: copy.deepcopy(base) for name in METHODS}
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    iterations: dict[str, list[int]] = {name: [] for name in METHODS}
    reached: dict[str, list[float]] = {name: [] for name in METHODS}

    def prepare(name: str) -> None:
        """Untimed, before each call: check the previous run's result, restore the start."""
        if len(iterations[name]) > len(reached[name]):
            reached[name].append(mu_rel_max(models[name], structure))
        models[name].load_state_dict(snapshot)

    def side(name: str) -> Callable[[], None]:
        def call() -> None:
            iterations[name].append(METHODS[name](models[name], structure))

        return call

    # One untimed round warms every side alike: the allocator, and the plans each builds once
    # per structure (balance_'s kernel plans, Gauss-Seidel's blocks).
    times = paired({name: side(name) for name in METHODS}, case.pairs, 1, prepare)
    for name in METHODS:
        prepare(name)
    row: dict = {
        "case": case.name,
        "pairs": case.pairs,
        "generators": structure.num_generators,
        "kinds": structure.kind_counts(),
        "target": case.target,
        "params": sum(p.numel() for p in base.parameters()),
        "start_mu_rel_max": start,
        "tol": TOL,
    }
    for name in METHODS:
        row[name] = {
            **summary(times[name]),
            "iterations": statistics.median(iterations[name]),
            "mu_rel_max": max(reached[name]),
            "converged": max(reached[name]) <= TOL,
        }
    baselines = ("gauss-seidel", "saul")
    faster = min(baselines, key=lambda b: row[b]["median_s"])
    ours = times["balance_"]
    row["faster_baseline"] = faster
    row["speedup_vs_faster_baseline"] = statistics.median(
        b / a for a, b in zip(ours, times[faster], strict=True)
    )
    for b in baselines:
        row[f"speedup_vs_{b}"] = statistics.median(
            t / a for a, t in zip(ours, times[b], strict=True)
        )
    log(
        f"  {case.name}: balance_ {row['balance_']['median_s'] * 1e3:.0f} ms "
        f"({row['balance_']['iterations']:.0f} it), "
        f"Gauss-Seidel {row['gauss-seidel']['median_s'] * 1e3:.0f} ms "
        f"({row['gauss-seidel']['iterations']:.0f} sweeps), "
        f"Saul {row['saul']['median_s'] * 1e3:.0f} ms ({row['saul']['iterations']:.0f} it); "
        f"{row['speedup_vs_faster_baseline']:.1f}x vs {faster}"
    )
    return row
