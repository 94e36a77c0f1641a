"""Fifth boundary audit: generator indices that are bools, discovery on the ``meta`` device, the
inspection methods of a :class:`gaugefix.distributed.ShardStructure`, the report's use of the
stability analysis, and ``OrbitSelectionPenalty.add_grad_`` with frozen parameters."""

from __future__ import annotations

import ast
import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import GaugeFixing, zoo

DT = torch.float64
WIDTHS = (4, 6, 5, 3)  # two hidden layers: generators 0-5 and 6-10
STRENGTH = 0.7


def mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(seed)
    model = zoo.mlp(WIDTHS).to(DT)
    x = torch.randn(8, WIDTHS[0], dtype=DT)
    return model, x, gaugefix.discover(model, x)


# -- 1. generator indices ---------------------------------------------------------------------

NOT_INDICES = {
    "True": True,  # regression: read as generator 1
    "False": False,  # regression: read as generator 0
    "numpy bool": np.bool_(True),
    "bool tensor": torch.tensor(True),  # regression: read as generator 1
    "float": 1.0,
    "numpy float": np.float64(1.0),
    "float tensor": torch.tensor(1.0),
    "1-element tensor": torch.tensor([1]),  # regression: read as generator 1
    "meta tensor": torch.tensor(1, device="meta"),  # regression: RuntimeError
    "string": "1",
}


@pytest.mark.parametrize("case", list(NOT_INDICES))
def test_generator_refuses_bools_floats_and_tensors_that_are_not_integer_scalars(case):
    """One ``TypeError`` line naming the index: a bool is an ``int`` subclass, not an index."""
    _, _, s = mlp()
    with pytest.raises(TypeError, match="generator index") as err:
        s.generator(NOT_INDICES[case])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "n",
    [
        np.int64(7),
        np.uint8(7),
        np.int32(7),
        np.array(7),
        torch.tensor(7),
        torch.tensor(7, dtype=torch.int16),
    ],  # fmt: skip
    ids=["int64", "uint8", "int32", "0-dim array", "0-dim tensor", "int16 tensor"],
)
def test_generator_takes_integer_scalars_of_any_type(n):
    """Numpy integers and 0-dim integer tensors name the generator their value does."""
    _, _, s = mlp()
    assert s.generator(n) == s.generator(7)
    assert s.generator(7).incoming  # not vacuous: generator 7 multiplies some entries


def test_generator_out_of_range_is_still_an_index_error():
    _, _, s = mlp()
    for n in (s.num_generators, -1, np.int64(-1), torch.tensor(s.num_generators)):
        with pytest.raises(IndexError, match="out of range"):
            s.generator(n)


def test_restrict_takes_a_bool_mask_not_generator_indices():
    """An index list to ``restrict`` is refused, not read as a mask."""
    _, _, s = mlp()
    for keep in (torch.tensor([0, 2]), [1, 0] * 5 + [1], np.arange(s.num_generators)):
        with pytest.raises((TypeError, ValueError), match="mask|keep"):
            s.restrict(keep, "r")


# -- 2. discovery on the meta device ------------------------------------------------------------


class Filled(nn.Module):
    """Writes two ReLU layers' outputs into one buffer allocated in the forward: the trace
    follows the writes through the buffer's memory, which a meta tensor does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(x.shape[0], 12, dtype=x.dtype, device=x.device)
        buf[:, :6] = torch.relu(self.a(x))
        buf[:, 6:] = torch.relu(self.c(x))
        return self.b(buf)


class Aliased(nn.Module):
    """Returns a buffer sharing ``a.weight``'s memory (or a copy of it, ``shared=False``):
    rescaling ``a``'s rows changes that output exactly when the memory is shared."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        weight = self.a.weight.detach()
        self.register_buffer("wa", weight if shared else weight.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b(torch.relu(self.a(x))), self.wa


def test_discovery_depends_on_memory_which_meta_tensors_lack():
    """Why discovery on ``meta`` is refused: the structure depends on which tensors share memory,
    which the trace reads from the data pointers that meta tensors do not have. ``Filled`` has
    12 generators, found through its buffer's memory; ``Aliased`` has none when its output
    shares ``a.weight``'s memory and 6 when it is a copy. (On meta, before the fix: ``Filled``
    0, ``Aliased`` 6 for the shared one, a wrong group: ``a``'s rows moved its output.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    assert gaugefix.discover(Filled(), x).num_generators == 12
    shared = Aliased(shared=True)
    assert gaugefix.discover(shared, x).num_generators == 0
    copied = Aliased(shared=False)
    s = gaugefix.discover(copied, x)
    assert s.num_generators == 6
    gaugefix.random_gauge_(shared, s, 1.0, torch.Generator().manual_seed(1))  # what 6 would do
    assert not torch.equal(shared.wa, copied.wa)  # the shared model's output moved


@pytest.mark.parametrize("make", [Filled, Aliased, lambda: zoo.mlp(WIDTHS)],
                         ids=["filled", "aliased", "mlp"])  # fmt: skip
@pytest.mark.parametrize("inputs", ["meta", "cpu"])
def test_discover_refuses_parameters_on_the_meta_device(make, inputs):
    """A model built on ``meta`` (``with torch.device("meta")``): one ``ValueError`` line naming
    the parameter and the device, whatever device the example input is on."""
    with torch.device("meta"):
        model = make()
    x = torch.randn(2, 4, device=inputs)
    with pytest.raises(ValueError, match="meta device") as err:
        gaugefix.discover(model, x)
    assert "\n" not in str(err.value) and "weight" in str(err.value)


def test_discover_refuses_a_buffer_on_the_meta_device():
    """A buffer holds values the forward reads (a ``BatchNorm``'s running statistics)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    model[1].running_mean = torch.zeros(6, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        gaugefix.discover(model, torch.randn(2, 4))


# -- 3. ShardStructure's inspection ------------------------------------------------------------


def shard_of(model, structure, monkeypatch, rank: int, processes: int):
    """The :class:`ShardStructure` process ``rank`` of ``processes`` builds: DTensors holding
    its ``torch.chunk`` slices along dim 0 on a one-process mesh that says it has
    ``processes`` (so one process builds another's shard structure)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from gaugefix.distributed import ShardStructure

    mesh = init_device_mesh("cpu", (1,))
    params = {}
    for name, p in structure.bind(model).items():
        chunk = -(-p.shape[0] // processes)
        start = min(rank * chunk, p.shape[0])
        local = p.detach().narrow(0, start, min(chunk, p.shape[0] - start))
        params[name] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
        )
    monkeypatch.setattr(DeviceMesh, "size", lambda self, mesh_dim=None: processes)
    monkeypatch.setattr(DeviceMesh, "get_local_rank", lambda self, mesh_dim=None: rank)
    return ShardStructure(structure, params)


@pytest.mark.parametrize("rank", [0, 1])
def test_shard_structure_answers_inspection_as_the_whole_structure(one_process, monkeypatch, rank):
    """``generator``, ``scale_groups`` and ``touching`` of a process's shard structure are the
    whole structure's, as ``summary``, ``restrict`` and ``to_dict`` are (they named the local
    slices: process 1 saw generator 0 act on no entry and local row numbers)."""
    model, _, s = mlp()
    shard = shard_of(model, s, monkeypatch, rank, processes=2)
    assert any(p.shape != s.params[n].shape for n, p in shard.params.items())  # slices
    for n in range(s.num_generators):
        assert shard.generator(n) == s.generator(n), n
    assert shard.scale_groups() == s.scale_groups() and s.scale_groups()
    for names in ({"0.weight"}, {"2.bias"}, {"4.weight"}, set()):
        assert torch.equal(shard.touching(names), s.touching(names)), names
    assert shard.summary() == s.summary() and shard.to_dict() == s.to_dict()


# -- 4. the report's use of the stability analysis ----------------------------------------------


def test_report_reads_no_private_name_of_the_stability_analysis():
    """The report's realistic grid tops use ``stability.grid_top``, a public name."""
    from gaugefix import report
    from gaugefix.experiments import stability

    tree = ast.parse(inspect.getsource(report))
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "stability"
        and node.attr.startswith("_")
    ]
    assert private == []
    assert "grid_top" in stability.__all__ and callable(stability.grid_top)
    assert not hasattr(stability, "_grid_top")  # one name, not two


# -- 5. the penalty's gradient with frozen parameters ----------------------------------------------


def frozen_first_layer(seed: int = 0):
    """The MLP with its first layer frozen (``requires_grad=False``), the loss's gradients in
    place and the first weight given a ``.grad`` of its own, the bias none."""
    model, x, s = mlp(seed)
    for p in model[0].parameters():
        p.requires_grad_(False)
    model(x).square().sum().backward()
    model[0].weight.grad = torch.randn(6, 4, dtype=DT)
    return model, x, s


def test_add_grad_leaves_frozen_parameters_gradients_as_they_were():
    """``.grad`` of a frozen parameter: ``None`` stays ``None``, a tensor stays bit-identical
    (the bias got one, the weight's moved)."""
    model, _, s = frozen_first_layer()
    weight_grad = model[0].weight.grad.clone()
    gaugefix.OrbitSelectionPenalty(s, STRENGTH).add_grad_(model)
    assert model[0].bias.grad is None
    assert torch.equal(model[0].weight.grad, weight_grad)


def test_add_grad_with_frozen_parameters_is_the_subgroups_gradient():
    """On the other parameters: the gradient of the penalty of the generators touching no
    frozen parameter (``restrict(~touching(frozen))``), bit for bit."""
    model, _, s = frozen_first_layer()
    loss_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    sub = s.restrict(~s.touching({"0.weight", "0.bias"}), "frozen")
    assert 0 < sub.num_generators < s.num_generators
    expected = gaugefix.OrbitSelectionPenalty(sub, STRENGTH).grad(model)
    assert set(expected) == {"2.weight", "2.bias", "4.weight"}  # the output bias: no generator
    gaugefix.OrbitSelectionPenalty(s, STRENGTH).add_grad_(model)
    for name, g in loss_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, g + expected.get(name, 0.0),
                                   rtol=1e-14, atol=0)  # fmt: skip
    assert not torch.equal(model[2].weight.grad, loss_grads["2.weight"])  # it added something


@pytest.mark.parametrize("frozen", [True, False], ids=["one layer frozen", "none frozen"])
def test_penalty_mode_equals_a_hand_loop_adding_add_grad_bit_for_bit(frozen):
    """GaugeFixing(mode="penalty") with SGD and momentum, against ``add_grad_`` before each
    ``step()`` of a copy: every parameter and gradient bit for bit, five steps."""
    model, x, s = mlp()
    if frozen:
        model[0].requires_grad_(False)
    ref = copy.deepcopy(model)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref))
    GaugeFixing(opt, model, s, STRENGTH, mode="penalty", balance_at_start=False)
    penalty = gaugefix.OrbitSelectionPenalty(s, STRENGTH)
    weight = model[0].weight.clone()
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
        opt.step()
        penalty.add_grad_(ref)
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q)
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert torch.equal(model[0].weight, weight) == frozen
    assert ref[0].weight.grad is None if frozen else ref[0].weight.grad is not None


def test_add_grad_refuses_parameters_that_are_not_finite_with_nothing_modified():
    """A NaN parameter: one ``ValueError`` line, every ``.grad`` as it was (``mu`` is not a
    number; the gradient would be NaN everywhere a generator reaches)."""
    model, x, s = mlp()
    model(x).square().sum().backward()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    model[4].bias.grad = None
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="not finite") as err:
        gaugefix.OrbitSelectionPenalty(s, STRENGTH).add_grad_(model)
    assert "\n" not in str(err.value)
    for p, g in zip(model.parameters(), before, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
