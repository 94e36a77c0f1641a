"""``balance_`` on parameters whose squares leave float64's normal range: it solves on copies
scaled by a power of two (as ``gauge_coordinates`` does) and applies ``h`` to the parameters.

Regressions (each failed before the fix): a pruned neuron in a model at ``1e160`` (refused: the
squares overflowed); one entry ``1e250`` above the rest (refused, now naming the underflow
that scaling would cause); norms beyond float64 and the optimizer state of a model at ``1e-200``
(every generator dead, ``h = 0``); a model at ``2^-700`` sharded with FSDP2 whose slices' largest
entries differ (every generator dead). Checked to fail on mutations too: norms unscaled by
``2^e`` rather than ``4^e`` (norm tests), each process scaling by its own slices' largest entry
(the FSDP test)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gaugefix as gf
from architectures import assert_same_bits, snapshot
from test_coordinates_audit2 import built
from test_coordinates_audit4 import check_agree, scaled_neuron
from test_fsdp import run_in_processes

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-13
MAX_ITER = 100
EXACT = 1e-12  # relative, float64 rounding of sums and products


def test_a_pruned_neuron_in_a_model_beyond_float64s_squares_is_dead_not_refused():
    """Neuron 1 of a model at ``1e160`` zeroed: its squares are 0 at every scale, so it is dead
    (as at ``1`` and for ``gauge_coordinates``), and the rest is balanced. Before the fix the
    overflow was refused."""
    model, s = scaled_neuron(0.0, 1e160)
    reference, _ = scaled_neuron(0.0)
    result = gf.balance_(copy.deepcopy(model), s, tol=TOL, max_iter=MAX_ITER)
    expected = gf.balance_(reference, s, tol=TOL, max_iter=MAX_ITER)
    assert result.dead_generators.tolist() == expected.dead_generators.tolist() != []
    assert result.converged and result.mu_rel_max <= TOL
    check_agree(model, s)  # gauge_coordinates(allow_dead=True): point, h, dead set, converged


def test_a_live_generator_lost_only_to_the_scaling_is_refused():
    """One entry ``1e250`` above the rest: scaled to where its square fits, the rest underflow,
    though none is zero. Refused in one line naming the overflow, nothing modified."""
    model, s = built("mlp")
    with torch.no_grad():
        model[2].weight[0, 0] = 1e250
    state = snapshot(model)
    with pytest.raises(ValueError, match="overflow float64.*underflow") as info:
        gf.balance_(model, s)
    assert "\n" not in str(info.value)
    assert_same_bits(model, state)


@pytest.mark.parametrize("whole", [2.0**-300, 2.0**-400])
def test_norms_are_those_of_the_parameters_not_of_the_scaled_copies(whole):
    """A model below ``2^-256`` (solved scaled up) whose squares still fit float64:
    ``norm_sq_before`` and ``norm_sq_after`` are its own ``||theta||^2``, summed directly."""
    model, s = scaled_neuron(1.0, whole)
    before = sum(float(p.detach().square().sum()) for p in s.bind(model).values())
    result = gf.balance_(model, s, tol=TOL, max_iter=MAX_ITER)
    after = sum(float(p.detach().square().sum()) for p in s.bind(model).values())
    assert bool(result.h.any()) and result.converged
    assert math.isclose(result.norm_sq_before, before, rel_tol=EXACT)
    assert math.isclose(result.norm_sq_after, after, rel_tol=EXACT)


def test_norms_beyond_float64_are_infinite_and_zero():
    """``||theta||^2`` of a model at ``1e200`` overflows float64 (``inf``), at ``1e-200`` it
    underflows (0); ``h``, ``mu_rel_max`` and ``converged`` are those of the scaled solve."""
    big, s = scaled_neuron(1.0, 1e200)
    small, _ = scaled_neuron(1.0, 1e-200)
    for model, norm in ((big, math.inf), (small, 0.0)):
        result = gf.balance_(model, s, tol=TOL, max_iter=MAX_ITER)
        assert result.norm_sq_before == result.norm_sq_after == norm
        assert result.converged and result.mu_rel_max <= TOL and not result.dead_generators.numel()


def test_gradients_and_optimizer_state_move_with_the_parameters_at_1e_minus_200():
    """SGD momentum and gradients of a model at ``1e-200`` move as ``apply_gauge_`` moves them
    by the same ``h`` (bit for bit). Before the fix every generator was dead and ``h = 0``."""
    model, s = scaled_neuron(1.0, 1e-200)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-200
    opt.step()
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(opt.state_dict())
    result = gf.balance_(model, s, tol=TOL, max_iter=MAX_ITER, optimizer=opt)
    assert result.converged and float(result.h.abs().max()) > 1e-3
    gf.apply_gauge_(twin, s, result.h, twin_opt)
    assert_same_bits(model, snapshot(twin))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
        assert torch.equal(opt.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"])


def uneven_mlp() -> tuple[nn.Module, gf.GaugeStructure]:
    """A float64 MLP at ``2^-700`` whose first rows are ``2^100`` larger: under FSDP2 on 2
    processes, the slices' largest entries differ by ``2^100``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = model.double()
    s = gf.discover(model, torch.randn(2, 3, dtype=torch.float64))
    gf.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0**-700)
            p[0].mul_(2.0**100)
    return model, s


FSDP_CODE = """
import copy, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import gaugefix as gf
from processes import report_and_exit
from test_balance_range import uneven_mlp
dist.init_process_group("gloo")
model, s = uneven_mlp()
sharded = copy.deepcopy(model)
fully_shard(sharded)
rs = gf.balance_(sharded, s, tol=1e-13, max_iter=100)
rm = gf.balance_(model, s, tol=1e-13, max_iter=100)
gap = max(
    float(((p.full_tensor() - q).abs() / q.abs().amax()).max())
    for p, q in zip(sharded.parameters(), model.parameters())
)
out = {"h": float((rs.h - rm.h).abs().max()), "gap": gap, "converged": [rs.converged, rm.converged],
       "dead": [rs.dead_generators.tolist(), rm.dead_generators.tolist()], "mu": rs.mu_rel_max}
report_and_exit(out)  # leaves the group and exits at once: gloo can abort at finalization
"""


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_sharded_slices_are_scaled_by_one_power_of_two():
    """FSDP2 on 2 gloo processes, a model at ``2^-700`` with slices ``2^100`` apart: the same
    ``h`` and point as on the whole model."""
    out = run_in_processes(FSDP_CODE)
    assert out["converged"] == [True, True] and out["dead"] == [[], []]
    assert out["h"] <= EXACT and out["gap"] <= EXACT and out["mu"] <= TOL
