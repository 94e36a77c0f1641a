"""Third audit of distributed gauge fixing, 2 gloo processes on CPU in float64 (the worker is
:func:`run_worker` below, under torchrun): FSDP2 shards uneven along dim 0 and split along
dim 1 (a generator's entries on both processes), a model mixing sharded and replicated
parameters (``ignored_params``, a ``Replicate`` placement, a 2-D mesh), DDP replicas balanced
on each process; and ``gaugefix balance`` given a sharded model or sharded weights."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from gaugefix import zoo
from processes import report_and_exit
from test_fsdp import run_in_processes

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

TOL = 1e-12  # relative, against the whole model; measured: below 5e-16
SEED_GAUGE, SEED_H, SEED_DRAW, SEED_Y = 1, 4, 5, 3
STEPS = 3  # GaugeFixing training steps compared
CHANGING = ["apply_gauge_", "random_gauge_", "relax_small", "relax_large", "balance_"]
WHOLE_ONLY = ["equalize_", "gauge_coordinates", "project", "OrbitSelectionPenalty"]
ON_SLICES = ["imbalance", "imbalance_stats", *CHANGING, "GaugeFixing"]
ACTIVATION = "activation"
REPLICA_MOVES = [
    "balance_", "relax_", "apply_gauge_", "equalize_norm", "equalize_range", "equalize_activation",
]  # fmt: skip
NO_PARAMETER = "the structure does not match: no parameter '0.weight'"  # names 'module.0.weight'


# -- the worker (run by torchrun, two processes) -------------------------------------------


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = _whole(a).detach(), _whole(b).detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _params_rel(a: nn.Module, b: nn.Module) -> float:
    return max(_rel(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _mlp(dims: tuple[int, ...]) -> tuple[nn.Module, gaugefix.GaugeStructure, Tensor]:
    torch.manual_seed(0)
    model = zoo.mlp(dims)
    x = torch.randn(4, dims[0])
    structure = gaugefix.discover(model, x[:1])
    gaugefix.random_gauge_(model, structure, 1.0, torch.Generator().manual_seed(SEED_GAUGE))
    return model, structure, x


def _dim1_where_even(p: Tensor):
    """Matrices along their input dim (FSDP2 shards dim 1 only evenly), vectors along dim 0."""
    from torch.distributed.tensor import Shard

    return Shard(1) if p.ndim > 1 and p.shape[1] % 2 == 0 else Shard(0)


def _sharded(model: nn.Module, placement=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    out = copy.deepcopy(model)
    options = {} if placement is None else {"shard_placement_fn": placement}
    for layer in out:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **options)
    fully_shard(out, **options)
    return out


def _moves(sharded: nn.Module, model: nn.Module, structure) -> dict:
    """Each changing function on both models in turn: the largest relative difference of
    its result, and of the parameters right after it."""
    n = structure.num_generators
    h = torch.randn(n, generator=torch.Generator().manual_seed(SEED_H))
    calls = {
        "apply_gauge_": lambda m: gaugefix.apply_gauge_(m, structure, h) or h,
        "random_gauge_": lambda m: gaugefix.random_gauge_(
            m, structure, 1.0, torch.Generator().manual_seed(SEED_DRAW)
        ),
        "relax_small": lambda m: gaugefix.relax_(m, structure, 1e-3),
        "relax_large": lambda m: gaugefix.relax_(m, structure, 1e3),
        "balance_": lambda m: gaugefix.balance_(m, structure),
    }
    out = {}
    for name, call in calls.items():
        a, b = call(sharded), call(model)
        diff = _balance_diff(a, b) if name == "balance_" else _rel(a, b)
        out[name] = max(diff, _params_rel(sharded, model))
    return out


def _balance_diff(a: gaugefix.BalanceResult, b: gaugefix.BalanceResult) -> float:
    same = (a.iterations, a.converged) == (b.iterations, b.converged) and torch.equal(
        a.dead_generators, b.dead_generators
    )
    norms = abs(a.norm_sq_after - b.norm_sq_after) / b.norm_sq_after
    return max(_rel(a.h, b.h), norms) if same else float("inf")


def _train(net: nn.Module, structure, x: Tensor, mode: str) -> int:
    y = torch.randn(len(x), 1, generator=torch.Generator().manual_seed(SEED_Y))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    fixing = gaugefix.GaugeFixing(opt, net, structure, 1.0, mode, every=1)
    for _ in range(STEPS):
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()
    fixing.remove()
    return fixing.steps


def _against_whole(dims: tuple[int, ...], placement=None) -> dict:
    """Every function computing on slices, on the sharded model and on the whole one."""
    model, structure, x = _mlp(dims)
    sharded = _sharded(model, placement)
    mu = [gaugefix.imbalance(m, structure) for m in (sharded, model)]
    out = {
        "imbalance": _rel(*mu),
        "imbalance_stats": max(
            abs(a - b) / max(abs(b), 1e-300)
            for a, b in zip(
                gaugefix.imbalance_stats(sharded, structure).values(),
                gaugefix.imbalance_stats(model, structure).values(),
                strict=True,
            )
        ),
    }  # fmt: skip
    out.update(_moves(sharded, model, structure))
    steps = [
        [_train(m, structure, x, mode) for m in (sharded, model)] for mode in ("exact", "penalty")
    ]
    out["GaugeFixing"] = _params_rel(sharded, model) if steps == [[STEPS] * 2] * 2 else float("inf")
    out["whole_only"] = _whole_only(sharded, structure)
    return out


def _outcome(model: nn.Module, call) -> dict:
    """``call()``'s error on every process (type, message) and whether the gathered
    parameters stayed bit-identical."""
    import torch.distributed as dist

    before = [_whole(p).clone() for p in model.parameters()]
    try:
        call()
        error = None
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        error = [type(exc).__name__, str(exc)]
    unchanged = all(
        torch.equal(_whole(p), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, [error, unchanged])
    return {"errors": [r[0] for r in results], "unchanged": all(r[1] for r in results)}


def _whole_only(sharded: nn.Module, structure) -> dict:
    vectors = {k: _whole(v).detach().clone() for k, v in sharded.named_parameters()}
    calls = {
        "equalize_": lambda: gaugefix.equalize_(sharded, structure),
        "gauge_coordinates": lambda: gaugefix.gauge_coordinates(sharded, structure),
        "project": lambda: gaugefix.project(vectors, sharded, structure),
        "OrbitSelectionPenalty": lambda: gaugefix.OrbitSelectionPenalty(structure, 1.0)(sharded),
    }
    return {name: _outcome(sharded, call) for name, call in calls.items()}


def _slice_calls(structure) -> dict:
    n = structure.num_generators
    return {
        "imbalance": lambda m: gaugefix.imbalance(m, structure),
        "imbalance_stats": lambda m: gaugefix.imbalance_stats(m, structure),
        "apply_gauge_": lambda m: gaugefix.apply_gauge_(m, structure, torch.ones(n)),
        "random_gauge_": lambda m: gaugefix.random_gauge_(
            m, structure, 1.0, torch.Generator().manual_seed(SEED_DRAW)
        ),
        "relax_small": lambda m: gaugefix.relax_(m, structure, 1e-3),
        "relax_large": lambda m: gaugefix.relax_(m, structure, 1e3),
        "balance_": lambda m: gaugefix.balance_(m, structure),
        "GaugeFixing": lambda m: gaugefix.GaugeFixing(
            torch.optim.SGD(m.parameters(), lr=0.1), m, structure, 1.0
        ).remove(),
    }


def _mixed() -> dict:
    """Sharded and replicated parameters in one model: each function's outcome."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    model, structure, _ = _mlp((7, 5, 3, 1))
    ignored = copy.deepcopy(model)
    fully_shard(ignored, ignored_params={ignored[2].bias})
    mesh = init_device_mesh("cpu", (2,))

    def biases_replicated(name: str, module: nn.Module, mesh) -> None:
        for key, p in list(module.named_parameters(recurse=False)):
            placement = Replicate() if key == "bias" else Shard(0)
            module.register_parameter(
                key, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]))
            )

    replicated = distribute_module(copy.deepcopy(model), mesh, biases_replicated)
    hybrid = copy.deepcopy(model)
    fully_shard(hybrid, mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")))
    models = {"ignored_params": ignored, "replicate": replicated, "hsdp": hybrid}
    calls = _slice_calls(structure)
    return {
        kind: {name: _outcome(m, lambda c=call, m=m: c(m)) for name, call in calls.items()}
        for kind, m in models.items()
    }  # fmt: skip


def _replica_spread(model: nn.Module) -> float:
    """The largest difference of a parameter entry between the processes' replicas."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    high, low = flat.clone(), -flat
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    return float((high + low).max())


def _ddp() -> dict:
    """Replicas of a DistributedDataParallel model moved by each process on its own (no
    communication): how far apart the replicas end up."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, structure, x = _mlp((8, 6, 5, 1))
    n = structure.num_generators
    own = torch.randn(16, 8, generator=torch.Generator().manual_seed(10 + dist.get_rank()))
    calls = {
        "balance_": lambda m: gaugefix.balance_(m, structure),
        "relax_": lambda m: gaugefix.relax_(m, structure, 0.1),
        "apply_gauge_": lambda m: gaugefix.apply_gauge_(m, structure, torch.ones(n)),
        "equalize_norm": lambda m: gaugefix.equalize_(m, structure, "norm"),
        "equalize_range": lambda m: gaugefix.equalize_(m, structure, "range"),
        "equalize_activation": lambda m: gaugefix.equalize_(
            m, structure, ACTIVATION, calibration=x
        ),
        "activation_own_data": lambda m: gaugefix.equalize_(
            m, structure, ACTIVATION, calibration=own
        ),
    }
    out = {}
    for name, call in calls.items():
        wrapped = DistributedDataParallel(copy.deepcopy(model))
        call(wrapped.module)
        out[name] = _replica_spread(wrapped.module)
    wrapped = DistributedDataParallel(copy.deepcopy(model))
    out["wrapper"] = _outcome(wrapped, lambda: gaugefix.balance_(wrapped, structure))
    return out


def run_worker() -> None:
    """Entry point under torchrun: rank 0 prints one JSON object."""
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")
    result = {
        "uneven": _against_whole((7, 5, 3, 1)),
        "dim1": _against_whole((8, 6, 5, 3, 1), _dim1_where_even),
        "mixed": _mixed(),
        "ddp": _ddp(),
    }
    report_and_exit(result)


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> dict:
    return run_in_processes("import test_distributed_audit3; test_distributed_audit3.run_worker()")


def refused(result: dict, words: str) -> None:
    """Every process raised one line, a ShardingError holding ``words``; nothing changed."""
    assert result["unchanged"]
    for error in result["errors"]:
        assert error is not None and error[0] == "ShardingError", error
        assert words in error[1] and "\n" not in error[1], error


@pytest.mark.parametrize("function", ON_SLICES)
@pytest.mark.parametrize("sharding", ["uneven", "dim1"])
def test_uneven_and_input_dim_shards_equal_the_whole_model(worker, sharding, function):
    """``uneven``: an MLP 7-5-3-1, every layer sharded along dim 0 into 3+2, 2+1 and 1+0
    rows (the second process holds no slice of the last layer). ``dim1``: an MLP 8-6-5-3-1
    whose even matrices are sharded along their input dim, the others and the biases along
    dim 0: a hidden unit's incoming row lies on one process and its outgoing column is split
    between both. Results and parameters afterwards equal the whole model's in float64."""
    assert worker[sharding][function] <= TOL


@pytest.mark.parametrize("function", WHOLE_ONLY)
@pytest.mark.parametrize("sharding", ["uneven", "dim1"])
def test_whole_parameter_functions_refuse_uneven_shards(worker, sharding, function):
    refused(worker[sharding]["whole_only"][function], "is sharded (an FSDP2 DTensor)")


@pytest.mark.parametrize("function", ON_SLICES)
@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("ignored_params", "fully_shard's ignored_params"),
        ("replicate", "placed (Replicate(),)"),
        ("hsdp", "on a 2-D mesh"),
    ],
)
def test_sharded_and_replicated_parameters_together_are_refused(worker, kind, words, function):
    """A parameter left out by ``fully_shard(ignored_params=...)`` (a plain tensor on every
    process), a bias placed ``Replicate()`` beside ``Shard(0)`` weights, a 2-D (HSDP) mesh:
    one line on every process, nothing changed."""
    refused(worker["mixed"][kind][function], words)


# -- gaugefix balance ----------------------------------------------------------------------

FACTORY = """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from gaugefix import zoo

    def sharded():
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        model = zoo.mlp((4, 6, 1))
        fully_shard(model)
        return model

    def plain():
        return zoo.mlp((4, 6, 1))

    if __name__ == "__main__":
        import torch
        torch.save(sharded().state_dict(), "sharded.pt")
        torch.save(plain().state_dict(), "plain.pt")
        dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A directory holding ``shardmod.py`` (factories of a plain and an FSDP2-sharded MLP),
    ``plain.pt`` and ``sharded.pt`` (a state dict of DTensors, saved with torch.save)."""
    where = tmp_path_factory.mktemp("sharded_checkpoints")
    (where / "shardmod.py").write_text(textwrap.dedent(FACTORY))
    subprocess.run([sys.executable, "shardmod.py"], cwd=where, check=True, timeout=120)
    return where


@pytest.mark.parametrize(
    ("factory", "weights", "message"),
    [
        (
            "shardmod:sharded", "plain.pt",
            "error: the model is sharded with fully_shard: pass an unsharded instance of it",
        ),
        (
            "shardmod:plain", "sharded.pt",
            "error: parameter '0.weight' is sharded (an FSDP2 DTensor)",
        ),
    ],
)  # fmt: skip
def test_balance_command_reports_sharding_in_one_line(checkpoints, factory, weights, message):
    """Before: a Python traceback ending in ``gaugefix.distributed.ShardingError`` (exit 1)."""
    out = checkpoints / "out.pt"
    args = ["--model", factory, "--weights", weights, "--out", str(out), "--input-shape", "1,4"]
    done = subprocess.run(
        [sys.executable, "-m", "gaugefix", "balance", *args],
        cwd=checkpoints, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert not out.exists()


@pytest.mark.parametrize("function", REPLICA_MOVES)
def test_ddp_replicas_moved_on_each_process_stay_identical(worker, function):
    """Each process moves its own replica (``ddp.module``) with no communication: from the
    same parameters, structure and arguments (the same calibration batch) the kernels give the
    same bits on every process (CPU; on CUDA see the docs: index_add_ is deterministic only
    under torch.use_deterministic_algorithms)."""
    assert worker["ddp"][function] == 0.0


def test_ddp_activation_objective_on_each_process_own_data_splits_the_replicas(worker):
    """Documented: a calibration batch that differs between the processes gives each replica
    another orbit point (DDP does not synchronise parameters again), here entries 0.96 apart."""
    assert worker["ddp"]["activation_own_data"] > 0.1


def test_ddp_wrapper_itself_is_refused_by_the_functions_taking_a_model(worker):
    result = worker["ddp"]["wrapper"]
    assert result["unchanged"]
    for error in result["errors"]:
        assert error[0] == "ValueError" and NO_PARAMETER in error[1], error
