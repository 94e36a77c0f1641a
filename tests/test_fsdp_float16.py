"""GaugeFixing's exact mode on a float16 model sharded with FSDP2 (``fully_shard``), 2 gloo
processes on CPU, every=1: the per-tensor range bound of each orbit step is taken on each
process's slices (the structure's exponent bounds of its local slices, their largest entries)
and agreed by one all-reduce. Steps the bound accepts act on both processes like on the same
model unsharded; a step that would overflow one momentum entry held by process 1 only is
skipped on both, changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugefix
import gaugefix.action
import gaugefix.soft
from gaugefix import zoo
from gaugefix.action import exponent_bounds, range_index
from gaugefix.kernels import rescale_
from test_fsdp import run_in_processes

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

WIDTHS = (4, 6, 5, 1)
STRENGTH, LR, MOMENTUM = 10.0, 0.1, 0.9
ACCEPTED = 3  # orbit steps the bound accepts, then one that would overflow
HUGE = 60000.0  # a momentum entry that the step divides past float16's 65504
ONE_ROW = (3, 1, 1, 1)  # every parameter has one row: process 1 holds no slice
F16_MAX = torch.finfo(torch.float16).max
F16_EPS = torch.finfo(torch.float16).eps
F16_TINY = torch.finfo(torch.float16).tiny
F16_ULPS = 1  # float16 roundings by which sharded and whole may differ (measured: 0)


# -- run by two processes under torchrun ------------------------------------------------------


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _recorder(whole_structure) -> list[dict]:
    """Wrap the per-tensor range check (``gaugefix.action``): per call, its verdict on this process,
    whether the step ``h`` moves, whether some local target would leave float16's range (moved
    in float64), whether every moved tensor's parameter is found by name in the structure's
    table, whether its exponent bounds are at most the whole structure's, and whether the
    verdict is that of the per-tensor table built afresh for this call's slices."""
    calls: list[dict] = []
    original = gaugefix.action.in_range_by_tensor

    def checked(targets, structure, h):
        fits = original(targets, structure, h)
        tables = range_index(structure, h.device).tables
        kept = dict(tables)
        tables.clear()  # the verdict of tables built afresh for these slices
        fresh = original(targets, structure, h)
        tables.update(kept)
        moved = {n: [(t.double(), p) for t, p in ts if t.numel()] for n, ts in targets.items()}
        moved = {n: ts for n, ts in moved.items() if ts and n in structure.params}
        if moved:
            rescale_(moved, structure, h)
        overflow = any(bool((t.abs() > F16_MAX).any()) for ts in moved.values() for t, _ in ts)
        places = range_index(structure, h.device).places
        mine, whole = exponent_bounds(structure, h), exponent_bounds(whole_structure, h)
        whole_places = range_index(whole_structure, h.device).places
        calls.append({
            "sharded": structure is not whole_structure,
            "fits": bool(fits), "overflow": overflow, "moves": bool((h != 0).any()),
            "cached_is_fresh": bool(fits) == bool(fresh),
            "names_found": all(n in places for n in moved),
            "bounds_within_whole": all(
                bool((mine[places[n]] <= whole[whole_places[n]]).all()) for n in moved
            ),
        })  # fmt: skip
        return fits

    gaugefix.action.in_range_by_tensor = checked
    return calls


def _huge_entry(model: nn.Module, structure, opt) -> tuple[str, tuple[int, ...]]:
    """The momentum entry held by process 1 that the coming orbit step of ``model`` (whole,
    after its optimizer update) divides by the largest factor: ``(name, global index)``."""
    params = structure.bind(model)
    rate = torch.tensor(STRENGTH * opt.param_groups[0]["lr"], dtype=torch.float64)
    h, _ = gaugefix.soft.orbit_step(params, structure, rate)
    best = (0.0, "", ())
    for name, p in params.items():
        factor = torch.ones(p.shape, dtype=torch.float64)
        rescale_({name: [(factor, -1)]}, structure, h)
        start = -(-p.shape[0] // 2)  # fully_shard slices dim 0 as torch.chunk
        held = factor[start:]
        if held.numel() and float(held.max()) > best[0]:
            index = [int(i) for i in torch.unravel_index(held.argmax(), held.shape)]
            best = (float(held.max()), name, (start + index[0], *index[1:]))
    return best[1], best[2]


def _train(model, structure, x, y, target, sharded: bool) -> dict:
    """ACCEPTED + 1 steps of SGD momentum with GaugeFixing (exact, every=1); before the last
    orbit step the ``target`` entry (``(name, global index)`` or None) of the momentum becomes
    HUGE (on the sharded model in process 1's slice only). Returns the hook's counts after the
    accepted steps and at the end, whether the last orbit step left parameters, gradients and
    momentum bitwise as the optimizer update made them, and the gathered parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    named = dict(model.named_parameters())
    seen: dict = {}

    def inject(optimizer, args, kwargs) -> None:  # registered first: runs before the orbit step
        if seen.get("target") is not None:
            name, index = seen["target"]
            buf = opt.state[named[name]]["momentum_buffer"]
            if sharded:  # fully_shard slices dim 0 as torch.chunk: process 1 from row `start`
                buf, start = buf.to_local(), -(-named[name].shape[0] // 2)
                mine = torch.distributed.get_rank() == 1  # the entry is in process 1's rows
                index = (index[0] - start, *index[1:]) if mine else None
            if index is not None:
                buf[index] = HUGE
        seen["before"] = [t.detach().clone() for t in _local_state(model, opt)]

    opt.register_step_post_hook(inject)
    fixing = gaugefix.GaugeFixing(opt, model, structure, STRENGTH, balance_at_start=False, every=1)
    for step in range(ACCEPTED + 1):
        if step == ACCEPTED:
            seen["target"] = target
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        if step == ACCEPTED - 1:
            counts = [fixing.steps, fixing.skipped]
    after = _local_state(model, opt)
    unchanged = all(torch.equal(a, b) for a, b in zip(after, seen["before"], strict=True))
    fixing.remove()
    return {
        "counts": counts + [fixing.steps, fixing.skipped], "unchanged": unchanged,
        "params": {k: _whole(p).detach().double() for k, p in named.items()},
    }  # fmt: skip


def _local_state(model: nn.Module, opt) -> list[Tensor]:
    """This process's slices of every parameter, its gradient and its momentum buffer."""
    out = []
    for p in model.parameters():
        moved = (p.detach(), p.grad, opt.state[p]["momentum_buffer"])
        out += [t.to_local() if hasattr(t, "to_local") else t for t in moved]
    return out


def _planned_entry(model, structure, x, y) -> tuple[str, tuple[int, ...]]:
    """:func:`_huge_entry` at the last step, found on a copy trained the accepted steps."""
    probe = copy.deepcopy(model)
    opt = torch.optim.SGD(probe.parameters(), lr=LR, momentum=MOMENTUM)
    fixing = gaugefix.GaugeFixing(opt, probe, structure, STRENGTH, balance_at_start=False, every=1)
    for _ in range(ACCEPTED):
        opt.zero_grad()
        (probe(x) - y).square().mean().backward()
        opt.step()
    fixing.remove()
    opt.zero_grad()
    (probe(x) - y).square().mean().backward()
    opt.step()
    return _huge_entry(probe, structure, opt)


def _scenario(widths: tuple[int, ...], overflow: bool) -> dict:
    """A float16 MLP from a random gauge, trained whole and sharded per layer (both in this
    process, alike on every process); with ``overflow`` the last step meets a HUGE momentum
    entry held by process 1."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = zoo.mlp(widths).double()
    x, y = torch.randn(8, widths[0], dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    structure = gaugefix.discover(model, x[:1])
    gaugefix.random_gauge_(model, structure, 1.0, torch.Generator().manual_seed(1))
    model, x, y = model.half(), x.half(), y.half()
    sharded = copy.deepcopy(model)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    target = _planned_entry(model, structure, x, y) if overflow else None
    original = gaugefix.action.in_range_by_tensor
    calls = _recorder(structure)
    try:
        whole = _train(model, structure, x, y, target, sharded=False)
        mine = _train(sharded, structure, x, y, target, sharded=True)
    finally:
        gaugefix.action.in_range_by_tensor = original
    ulps = max(
        float(((mine["params"][k] - v).abs() / v.abs().clamp_min(F16_TINY)).max()) / F16_EPS
        for k, v in whole["params"].items()
    )
    return {
        "whole": whole["counts"] + [whole["unchanged"]],
        "sharded": mine["counts"] + [mine["unchanged"]],
        "calls": calls, "ulps": ulps, "target": target,
    }  # fmt: skip


def run_worker() -> None:
    """Entry point (torchrun, 2 processes): rank 0 prints one JSON line, every process's
    results."""
    import torch.distributed as dist

    from processes import report_and_exit

    dist.init_process_group("gloo")
    local = {"split": _scenario(WIDTHS, overflow=True), "one_row": _scenario(ONE_ROW, False)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    report_and_exit({"ranks": every})


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_in_processes("import test_fsdp_float16; test_fsdp_float16.run_worker()")["ranks"]


@pytest.mark.parametrize("case", ["split", "one_row"])
def test_accepted_orbit_steps_act_on_every_process_as_on_the_whole_model(ranks, case):
    """The first ACCEPTED orbit steps pass the bound on both processes and move (``h != 0``):
    counted as steps on both, and the gathered parameters equal those of the same model
    unsharded (measured: bitwise). ``one_row``: process 1 holds no slice at all."""
    for rank in ranks:
        result = rank[case]
        assert result["whole"][:2] == [ACCEPTED, 0] and result["sharded"][:2] == [ACCEPTED, 0]
        sharded = [c for c in result["calls"] if c["sharded"]]
        assert len(sharded) == ACCEPTED + 1
        assert all(c["fits"] and c["moves"] for c in sharded[:ACCEPTED])
        assert result["ulps"] <= F16_ULPS
    assert ranks[0]["one_row"]["sharded"][2:] == [ACCEPTED + 1, 0, False]


def test_a_step_overflowing_on_one_process_only_is_skipped_on_both(ranks):
    """The last orbit step divides a momentum entry of HUGE, held by process 1 only, past
    65504: process 1's bound refuses it, process 0's accepts its own slices; both skip it
    (nothing moves: parameters, gradients and momentum stay bitwise as the optimizer update
    left them) and count it in ``skipped``, as the unsharded model does."""
    last = [[c for c in rank["split"]["calls"] if c["sharded"]][-1] for rank in ranks]
    assert [c["overflow"] for c in last] == [False, True]
    assert [c["fits"] for c in last] == [True, False]
    for rank in ranks:
        assert rank["split"]["sharded"][2:] == [ACCEPTED, 1, True]
        assert rank["split"]["whole"][2:] == [ACCEPTED, 1, True]
        whole_last = [c for c in rank["split"]["calls"] if not c["sharded"]][-1]
        assert whole_last["overflow"] and not whole_last["fits"]


@pytest.mark.parametrize("case", ["split", "one_row"])
def test_the_per_tensor_table_on_slices_is_sound(ranks, case):
    """Each process's bound finds every moved tensor by name in its shard structure, takes
    exponent bounds no larger than the whole structure's for the same parameter (a slice's
    terms are a subset), gives the verdict of its table built afresh for its slices, and never
    accepts a step that takes a local entry out of range."""
    for rank in ranks:
        for call in rank[case]["calls"]:
            assert call["names_found"] and call["bounds_within_whole"]
            assert call["cached_is_fresh"]
            assert not (call["fits"] and call["overflow"])
