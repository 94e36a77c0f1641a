"""Fourth audit of distributed gauge fixing, gloo processes on CPU in float64 (the worker is
:func:`run_worker` below, under torchrun): an optimizer passed on one process only, parameters
frozen (``requires_grad=False``) on one process only, an optimizer refused on one process only,
and local slices that are not ``torch.chunk``'s on some of 3 processes. Each process writes
its outcomes to a file of its own as it goes (no collective reports them); collectives time out
after :data:`CASE_TIMEOUT`, and a worker still running after :data:`WORKER_TIMEOUT` is killed,
so that a process left waiting in a collective fails the tests instead of blocking the suite."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from gaugefix import zoo
from processes import all_end
from test_fsdp import ROOT

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

CASE_TIMEOUT = timedelta(seconds=10)  # a collective waiting longer: a hang
WORKER_TIMEOUT = 120  # seconds for a whole worker (its cases' timeouts included)
TOL = 1e-12  # relative, against the whole model
SEED_GAUGE, SEED_H, SEED_DRAW = 1, 4, 5
DIMS = (7, 5, 3, 1)  # uneven over 2 processes (3+2, 2+1, 1+0 rows) and over 3 (3+3+1, ...)
MOVES = ["apply_gauge_", "random_gauge_", "relax_small", "relax_large", "balance_"]
RELAX = ["relax_small", "relax_large"]
FROZEN_FREE = ["apply_gauge_", "random_gauge_", "balance_"]  # frozen parameters move too
FIXING = ["GaugeFixing_balanced", "GaugeFixing_step"]
INCONSISTENT = ["imbalance", "apply_gauge_", "GaugeFixing"]
# 3 processes: the rows of the first weight (5 = 2 + 2 + 1 as torch.chunk slices it) held
# 2 + 1 + 2: process 0's slice is valid, the others' are not.
ROWS = (2, 1, 2)


# -- the worker (run by torchrun) ------------------------------------------------------------


def _mlp() -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = zoo.mlp(DIMS)
    structure = gaugefix.discover(model, torch.randn(1, DIMS[0]))
    gaugefix.random_gauge_(model, structure, 1.0, torch.Generator().manual_seed(SEED_GAUGE))
    return model, structure


def _mesh():
    """The 1-D mesh of every process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def _sharded(model: nn.Module) -> tuple[nn.Module, torch.optim.SGD]:
    """``model`` sharded per layer, with gradients and an SGD momentum optimizer holding state
    (local arithmetic only: no collective)."""
    from torch.distributed.fsdp import fully_shard

    out, mesh = copy.deepcopy(model), _mesh()
    for layer in out:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(out, mesh=mesh)
    opt = torch.optim.SGD(out.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        for p in out.parameters():
            p.grad = 0.25 * p.detach()
            opt.state[p]["momentum_buffer"] = 0.5 * p.detach()
    return out, opt


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer | None) -> list[Tensor]:
    """This process's slices of the parameters, gradients and optimizer state (no collective:
    a hang may have left the process group broken)."""
    out = []
    for p in model.parameters():
        out += [_local(p).clone()] + ([] if p.grad is None else [_local(p.grad).clone()])
        if opt is not None:
            out += [_local(v).clone() for v in opt.state.get(p, {}).values()]
    return out


def _outcome(model: nn.Module, opt: torch.optim.Optimizer | None, call) -> dict:
    """This process's outcome of ``call()``: its error (``[type, message]``, or ``None``) and
    whether its slices, gradients and optimizer state stayed bit-identical."""
    before = _snapshot(model, opt)
    try:
        call()
        error = None
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        error = [type(exc).__name__, str(exc)]
    after = _snapshot(model, opt)
    unchanged = len(after) == len(before) and all(
        torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )
    return {"error": error, "unchanged": unchanged}


def _moves(structure, optimizer) -> dict:
    """Each changing function, passing ``optimizer`` (a model's optimizer, or ``None``)."""
    h = torch.randn(structure.num_generators, generator=torch.Generator().manual_seed(SEED_H))
    return {
        "apply_gauge_": lambda m: gaugefix.apply_gauge_(m, structure, h, optimizer(m)),
        "random_gauge_": lambda m: gaugefix.random_gauge_(
            m, structure, 1.0, torch.Generator().manual_seed(SEED_DRAW), optimizer(m)
        ),
        "relax_small": lambda m: gaugefix.relax_(m, structure, 1e-3, optimizer(m)),
        "relax_large": lambda m: gaugefix.relax_(m, structure, 1e3, optimizer(m)),
        "balance_": lambda m: gaugefix.balance_(m, structure, optimizer=optimizer(m)),
    }


def _optimizer_on_one() -> dict:
    """Process 0 passes its optimizer (its momentum moves), process 1 passes none."""
    import torch.distributed as dist

    model, structure = _mlp()
    out = {}
    for name in MOVES:
        sharded, opt = _sharded(model)
        call = _moves(structure, lambda m, o=opt: o if dist.get_rank() == 0 else None)[name]
        out[name] = _outcome(sharded, opt, lambda c=call, m=sharded: c(m))
    return out


def _refused_optimizer_on_one() -> dict:
    """Process 0 passes an Adagrad optimizer with state from an initial value (refused: not
    transportable), process 1 passes none."""
    import torch.distributed as dist

    model, structure = _mlp()
    out = {}
    for name in MOVES:
        sharded, _ = _sharded(model)
        adagrad = torch.optim.Adagrad(sharded.parameters(), initial_accumulator_value=0.1)
        for p in sharded.parameters():
            adagrad.state[p]["sum"] = p.detach().square()
        call = _moves(structure, lambda m, o=adagrad: o if dist.get_rank() == 0 else None)[name]
        out[name] = _outcome(sharded, adagrad, lambda c=call, m=sharded: c(m))
    return out


def _freeze_on_one(sharded: nn.Module) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        sharded[0].weight.requires_grad_(False)


def _frozen_on_one() -> dict:
    """Process 1 freezes the first weight, process 0 does not: each function's outcome; for
    those that move frozen parameters like the others, also the largest relative difference
    from the whole model (moved alike, frozen or not)."""
    model, structure = _mlp()
    out = {}
    calls = _moves(structure, lambda m: None)
    for name in MOVES:
        sharded, opt = _sharded(model)
        _freeze_on_one(sharded)
        out[name] = _outcome(sharded, opt, lambda c=calls[name], m=sharded: c(m))
        if name in FROZEN_FREE:
            whole = copy.deepcopy(model)
            calls[name](whole)
            out[name]["rel"] = _slices_rel(sharded, whole)
    return out


def _frozen_on_one_fixing() -> dict:
    """Process 1 freezes the first weight, process 0 does not: a ``GaugeFixing`` hook
    balancing at the start, and one not balancing, stepped once."""
    model, structure = _mlp()
    out = {}
    for name, balanced in zip(FIXING, (True, False), strict=True):
        sharded, opt = _sharded(model)
        _freeze_on_one(sharded)
        call = lambda m=sharded, o=opt, b=balanced: _fix(m, o, structure, b)  # noqa: E731
        out[name] = _outcome(sharded, opt, call)
    return out


def _slices_rel(sharded: nn.Module, whole: nn.Module) -> float:
    """The largest difference of this process's slices from the whole model's, relative to
    each whole parameter's largest entry."""
    import torch.distributed as dist

    out = 0.0
    for p, q in zip(sharded.parameters(), whole.parameters(), strict=True):
        rows = _chunk_rows(len(q), dist.get_world_size())
        mine = q.detach().narrow(0, sum(rows[: dist.get_rank()]), rows[dist.get_rank()])
        if mine.numel():
            out = max(out, float((p.to_local() - mine).abs().max() / q.detach().abs().max()))
    return out


def _fix(model: nn.Module, opt: torch.optim.Optimizer, structure, balanced: bool) -> None:
    """A ``GaugeFixing`` hook on ``model`` (balancing at the start or not) and one step."""
    fixing = gaugefix.GaugeFixing(opt, model, structure, 1.0, balance_at_start=balanced, every=1)
    try:
        opt.step()
    finally:
        fixing.remove()


def _chunk_rows(n: int, processes: int) -> tuple[int, ...]:
    """The rows of each process's torch.chunk slice of ``n`` rows."""
    c = -(-n // processes)
    return tuple(min(c, max(n - r * c, 0)) for r in range(processes))


def _inconsistent_slices() -> dict:
    """3 processes whose slices of the first weight are 2 + 1 + 2 rows (torch.chunk's: 2 + 2
    + 1), built with ``DTensor.from_local`` and the global shape given: processes 1 and 2 hold
    slices that are not torch.chunk's, process 0 a valid one."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    model, structure = _mlp()
    rank = dist.get_rank()
    out = {}
    for name in INCONSISTENT:
        mesh, sharded = _mesh(), copy.deepcopy(model)
        for layer in sharded:
            for key, p in list(layer.named_parameters()):
                rows = ROWS if p.shape == (DIMS[1], DIMS[0]) else _chunk_rows(len(p), mesh.size())
                local = p.detach().narrow(0, sum(rows[:rank]), rows[rank]).clone()
                d = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
                )
                layer.register_parameter(key, nn.Parameter(d))
        calls = {
            "imbalance": lambda m: gaugefix.imbalance(m, structure),
            "apply_gauge_": lambda m: gaugefix.apply_gauge_(
                m, structure, torch.ones(structure.num_generators)
            ),
            "GaugeFixing": lambda m: gaugefix.GaugeFixing(
                torch.optim.SGD(m.parameters(), lr=0.1), m, structure, 1.0
            ).remove(),
        }
        out[name] = _outcome(sharded, None, lambda c=calls[name], m=sharded: c(m))
    return out


CASES = {  # those that hung before come last
    "optimizer_on_one": _optimizer_on_one,
    "frozen_on_one": _frozen_on_one,
    "refused_optimizer_on_one": _refused_optimizer_on_one,
    "frozen_on_one_fixing": _frozen_on_one_fixing,
    "inconsistent_slices": _inconsistent_slices,
}


THREE = ["inconsistent_slices"]  # the cases run on 3 processes


def run_worker(group: str, where: str) -> None:
    """Entry point under torchrun: each process writes ``{case: {function: outcome}}``
    (:func:`_outcome`) to ``where/rank<r>.json`` after each case of ``group`` (``"two"`` or
    ``"three"`` processes)."""
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", timeout=CASE_TIMEOUT)
    names = THREE if group == "three" else [c for c in CASES if c not in THREE]
    result, path = {}, Path(where) / f"rank{dist.get_rank()}.json"
    for name in names:
        result[name] = CASES[name]()
        path.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo occasionally aborts at interpreter finalization (examples/ddp_train.py)


# -- the tests ------------------------------------------------------------------------------


def _run(processes: int, group: str, where: Path) -> list[dict]:
    """The worker under torchrun with ``processes`` processes: what each wrote. A run past
    :data:`WORKER_TIMEOUT` (a hang) is killed; every process it started must end."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    code = f"import test_distributed_audit4 as t; t.run_worker({group!r}, {str(where)!r})"
    cmd = [sys.executable, *launcher, "--no-python", sys.executable, "-c", code]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with all_end(os.getpid()):
        proc = subprocess.Popen(
            cmd, cwd=ROOT / "tests", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    files = [where / f"rank{r}.json" for r in range(processes)]
    return [json.loads(f.read_text()) if f.exists() else {} for f in files]


def outcome(per_rank: list[dict], case: str, function: str) -> dict:
    """Every process's error (``["missing", ...]`` where it reported none: it hung or
    crashed), whether all left everything unchanged, and the largest ``rel`` reported."""
    records = [r.get(case, {}).get(function) for r in per_rank]
    done = [r for r in records if r is not None]
    return {
        "errors": [
            r["error"] if r else ["missing", "no outcome: hung or crashed"] for r in records
        ],
        "unchanged": len(done) == len(records) and all(r["unchanged"] for r in done),
        "rel": max((r.get("rel", math.inf) for r in done), default=math.inf),
    }


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    return _run(2, "two", tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[dict]:
    return _run(3, "three", tmp_path_factory.mktemp("three"))


def refused(result: dict, words: str) -> None:
    """Every process raised one line, a ShardingError holding ``words``; nothing changed."""
    assert result["unchanged"]
    for error in result["errors"]:
        assert error is not None and error[0] == "ShardingError", error
        assert words in error[1] and "\n" not in error[1], error


@pytest.mark.parametrize("function", MOVES)
def test_optimizer_passed_on_one_process_only_is_refused(two, function):
    """Before: no error; process 0 moved its slices of the momentum, process 1 not (its
    slices of one DTensor buffer moved by different factors)."""
    refused(outcome(two, "optimizer_on_one", function), "whether an optimizer is passed")


@pytest.mark.parametrize("function", MOVES)
def test_optimizer_refused_on_one_process_only_raises_on_every_process(two, function):
    """Process 0's Adagrad state is refused (ValueError, its own error), process 1 passed
    none: every process raises, nothing changes. Before: process 0 raised before any
    collective while process 1 waited in the next all-reduce (a hang: the case's group timed
    out)."""
    result = outcome(two, "refused_optimizer_on_one", function)
    assert result["unchanged"]
    (kind0, message0), (kind1, message1) = result["errors"]
    assert kind0 == "ValueError" and "Adagrad" in message0 and "\n" not in message0
    assert kind1 == "ShardingError" and "differs between the processes" in message1


@pytest.mark.parametrize("function", RELAX)
def test_parameters_frozen_on_one_process_only_are_refused_by_relax(two, function):
    """relax_ keeps the generators touching a frozen parameter at h = 0: with the first weight
    frozen on process 1 only, the processes computed different steps. Before: a ShardingError
    about ``h`` (small rate), or a hang (large rate: different bounded searches)."""
    refused(outcome(two, "frozen_on_one", function), "which parameters are frozen")


@pytest.mark.parametrize("function", FROZEN_FREE)
def test_parameters_frozen_on_one_process_only_move_alike_where_freezing_does_not_matter(
    two, function
):
    """apply_gauge_, random_gauge_ and balance_ move frozen parameters like the others: no
    refusal, the whole model's result."""
    result = outcome(two, "frozen_on_one", function)
    assert result["errors"] == [None, None], result
    assert result["rel"] <= TOL


@pytest.mark.parametrize("case", FIXING)
def test_parameters_frozen_on_one_process_only_are_refused_by_gauge_fixing(two, case):
    """GaugeFixing leaves out the generators touching a frozen parameter: the restricted
    structures differ, refused as a structure that differs between the processes. Before:
    process 0 reused the cached shard structure of the whole structure (no all-reduce),
    process 1 built one of its restricted structure (an all-reduce): gloo aborted process 1."""
    refused(
        outcome(two, "frozen_on_one_fixing", case),
        "the gauge structure differs between the processes",
    )


@pytest.mark.parametrize("function", INCONSISTENT)
def test_slices_not_chunks_on_some_processes_are_refused_on_every_process(three, function):
    """Before: processes 1 and 2 raised at once (their slices are not torch.chunk's), process
    0 waited in the all-reduce of the structure check (a hang: the case's group timed out)."""
    result = outcome(three, "inconsistent_slices", function)
    assert result["unchanged"]
    for rank, error in enumerate(result["errors"]):
        assert error is not None and error[0] == "ShardingError", error
        words = "another process" if rank == 0 else "is not a torch.chunk slice"
        assert words in error[1] and "\n" not in error[1], error
