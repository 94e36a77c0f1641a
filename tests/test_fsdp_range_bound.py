"""``apply_gauge_`` on a float16 model sharded with FSDP2 (``fully_shard``), 2 gloo processes on
CPU: the per-tensor range bound (``in_range_by_tensor``) is taken on each process's slices with
their shard structure and agreed by one all-reduce. Proved on both processes, the exact check
``overflowing`` does not run; not proved on one, it runs on both, which then move alike or
refuse alike. Moves equal those of the same model unsharded, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugefix
import gaugefix.action
from gaugefix import zoo
from test_fsdp import run_in_processes

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

WIDTHS = (4, 6, 5, 1)  # fully_shard gives process 1 rows 3..5 of the first layer's weight
SHRUNK, GROWN = 3, 4  # rows of the first layer held by process 1, moved by exp(-1), exp(+1)
BIG = 40000.0  # a float16 entry: times exp(-1) in range, times exp(+1) past 65504
SMALL_H = 0.1  # the other rows' generators
# per case: the row of the first layer's weight whose entry 0 becomes BIG (None: none)
CASES = {"proved": None, "fallback": SHRUNK, "refused": GROWN}


# -- run by two processes under torchrun ------------------------------------------------------


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(model: nn.Module) -> list[Tensor]:
    """This process's slices of every parameter, copied."""
    return [_slice(p).detach().clone() for p in model.parameters()]


def _slice(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _counting() -> dict:
    """Wrap ``overflowing`` and ``in_range_by_tensor`` of ``gaugefix.action``: how often the
    exact check runs, and the bound's verdicts on this process before they are agreed."""
    seen: dict = {"overflowing": 0, "bound": []}
    overflowing, bound = gaugefix.action.overflowing, gaugefix.action.in_range_by_tensor

    def counted_overflowing(*args):
        seen["overflowing"] += 1
        return overflowing(*args)

    def recorded_bound(*args):
        fits = bound(*args)
        seen["bound"].append(bool(fits))
        return fits

    gaugefix.action.overflowing = counted_overflowing
    gaugefix.action.in_range_by_tensor = recorded_bound
    seen["restore"] = (overflowing, bound)
    return seen


def _apply(model: nn.Module, structure, h: Tensor) -> dict:
    """``apply_gauge_`` on ``model``: its error (type and message, or None), the exact check's
    count, the bound's local verdicts, and whether this process's slices stayed bitwise."""
    before = _local(model)
    seen = _counting()
    try:
        gaugefix.apply_gauge_(model, structure, h)
        error = None
    except Exception as exc:  # recorded: the test compares them across processes
        error = [type(exc).__name__, str(exc)]
    finally:
        gaugefix.action.overflowing, gaugefix.action.in_range_by_tensor = seen.pop("restore")
    after = _local(model)
    unchanged = all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    return {**seen, "error": error, "unchanged": unchanged}


def _scenario(big_row: int | None) -> dict:
    """A float16 MLP, whole and sharded per layer (alike on every process), entry 0 of row
    ``big_row`` of its first weight BIG; ``h`` moves row SHRUNK by ``exp(-1)``, row GROWN by
    ``exp(+1)``, the first layer's other rows by ``exp(SMALL_H)``."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = zoo.mlp(WIDTHS).double()
    structure = gaugefix.discover(model, torch.randn(1, WIDTHS[0], dtype=torch.float64))
    model = model.half()
    with torch.no_grad():
        if big_row is not None:
            model[0].weight[big_row, 0] = BIG
    rows = structure.params["0.weight"].terms[0].index[:, 0]  # the generator of each row
    h = torch.zeros(structure.num_generators, dtype=torch.float64)
    h[rows] = SMALL_H
    h[rows[SHRUNK]], h[rows[GROWN]] = -1.0, 1.0
    sharded = copy.deepcopy(model)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    whole = _apply(model, structure, h)
    mine = _apply(sharded, structure, h)
    same = all(
        torch.equal(_whole(p).detach(), q.detach())
        for p, q in zip(sharded.parameters(), model.parameters(), strict=True)
    )
    return {"whole": whole, "sharded": mine, "same_as_whole": same}


def run_worker() -> None:
    """Entry point (torchrun, 2 processes): rank 0 prints one JSON line, every process's
    results."""
    import torch.distributed as dist

    from processes import report_and_exit

    dist.init_process_group("gloo")
    local = {case: _scenario(row) for case, row in CASES.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    report_and_exit({"ranks": every})


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_in_processes("import test_fsdp_range_bound; test_fsdp_range_bound.run_worker()")[
        "ranks"
    ]


def test_a_move_the_bound_proves_on_every_process_skips_the_exact_check(ranks):
    """No large entry: each process's bound proves its slices in range, the exact check runs
    on neither, and the move equals that of the whole model (which the bound proves too)."""
    for rank in ranks:
        result = rank["proved"]
        assert result["sharded"]["bound"] == [True] and result["sharded"]["overflowing"] == 0
        assert result["whole"]["bound"] == [True] and result["whole"]["overflowing"] == 0
        assert result["sharded"]["error"] is None and not result["sharded"]["unchanged"]
        assert result["same_as_whole"]


def test_a_move_not_proved_on_one_process_is_checked_exactly_on_both(ranks):
    """BIG in row SHRUNK, held by process 1: its bound (largest entry times the largest factor
    of its rows, ``exp(+1)``) does not prove the move, process 0's does; both run the exact
    check, which finds the BIG entry shrunk, and both move, as the whole model does."""
    assert [rank["fallback"]["sharded"]["bound"] for rank in ranks] == [[True], [False]]
    for rank in ranks:
        result = rank["fallback"]
        assert result["sharded"]["overflowing"] == 1 and result["whole"]["overflowing"] == 1
        assert result["sharded"]["error"] is None and not result["sharded"]["unchanged"]
        assert result["same_as_whole"]


def test_a_move_overflowing_one_process_only_is_refused_on_both(ranks):
    """BIG in row GROWN, held by process 1, would pass 65504: process 1's bound does not prove
    the move, process 0's does; both run the exact check and both refuse it (ValueError,
    nothing changed), as the whole model does."""
    assert [rank["refused"]["sharded"]["bound"] for rank in ranks] == [[True], [False]]
    for rank in ranks:
        result = rank["refused"]
        for mode in ("sharded", "whole"):
            assert result[mode]["overflowing"] == 1 and result[mode]["unchanged"]
            kind, message = result[mode]["error"]
            assert kind == "ValueError" and "overflow" in message
            assert message.endswith("nothing was modified")
        assert result["same_as_whole"]
    assert "another process" in ranks[0]["refused"]["sharded"]["error"][1]
    assert "'0.weight'" in ranks[1]["refused"]["sharded"]["error"][1]
