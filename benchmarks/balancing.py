"""Item 2: ``balance_`` against Equi-normalization sweeps and Saul's parallel updates, from
``random_gauge_(scale=3)`` to ``max |mu_n| / S_n <= 1e-10`` in float64."""

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
from gaugefix import zoo

TOL = 1e-10
SCALE = 3.0


@dataclass(frozen=True)
class BalanceCase:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    pairs: int


def cases(tiny: bool = False) -> list[BalanceCase]:
    if tiny:
        return [
            BalanceCase("MLP 6 layers x 16 (tiny)", lambda: zoo.mlp((16,) * 7), (16,), 2),
            BalanceCase("ResNet (tiny)", lambda: zoo.ResNet((1, 1), 4), (3, 8, 8), 2),
        ]
    return [
        BalanceCase("MLP 20 layers x 512", lambda: zoo.mlp((512,) * 21), (512,), 5),
        BalanceCase("ResNet-18 (CIFAR)", zoo.resnet18, (3, 32, 32), 5),
    ]


def max_rel_imbalance(model: nn.Module, structure: gaugefix.GaugeStructure) -> float:
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
    x = torch.randn(2, *case.input_shape, dtype=torch.float64)
    structure = gaugefix.discover(base, x)
    gaugefix.random_gauge_(base, structure, SCALE, generator=torch.Generator().manual_seed(0))
    start = max_rel_imbalance(base, structure)
    models = {name: copy.deepcopy(base) for name in METHODS}
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    iterations: dict[str, list[int]] = {name: [] for name in METHODS}
    reached: dict[str, list[float]] = {name: [] for name in METHODS}

    def prepare(name: str) -> None:
        """Untimed, before each call: check the previous run's result, restore the start."""
        if len(iterations[name]) > len(reached[name]):
            reached[name].append(max_rel_imbalance(models[name], structure))
        models[name].load_state_dict(snapshot)

    def side(name: str) -> Callable[[], None]:
        def call() -> None:
            iterations[name].append(METHODS[name](models[name], structure))

        return call

    _ours(copy.deepcopy(base), structure)  # warm the allocator once
    times = paired({name: side(name) for name in METHODS}, case.pairs, 0, prepare)
    for name in METHODS:
        prepare(name)
    row: dict = {
        "case": case.name,
        "pairs": case.pairs,
        "neurons": structure.num_generators,
        "params": sum(p.numel() for p in base.parameters()),
        "start_max_rel_imbalance": start,
        "tol": TOL,
    }
    for name in METHODS:
        row[name] = {
            **summary(times[name]),
            "iterations": statistics.median(iterations[name]),
            "max_rel_imbalance": max(reached[name]),
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
