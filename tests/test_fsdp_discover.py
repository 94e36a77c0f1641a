"""``discover`` on a model sharded with FSDP2 (``fully_shard``) or holding ``DTensor`` s
(tensor parallelism): one ``ShardingError`` line, the model unchanged (before: an empty
structure, silently, where the unsharded model has generators). A gloo process group of this
process alone, on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gaugefix
from gaugefix import zoo
from gaugefix.distributed import ShardingError

DT = torch.float64
WIDTHS = (4, 6, 5, 1)  # two hidden layers: 11 generators
ADVICE = "discover the structure on the unsharded model, then shard it"

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def mlp() -> tuple[nn.Module, torch.Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = zoo.mlp(WIDTHS).to(DT)
    x = torch.randn(3, WIDTHS[0], dtype=DT)
    return model, x, gaugefix.discover(model, x)


def each_layer(model: nn.Module, x: torch.Tensor) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)


def root_after_forward(model: nn.Module, x: torch.Tensor) -> None:
    """The root alone, after a forward: FSDP2 holds its parameters gathered (plain tensors)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    model(x)
    assert not any(isinstance(p, dist.tensor.DTensor) for p in model.parameters())


def tensor_parallel(model: nn.Module, x: torch.Tensor) -> None:
    """Tensor parallelism (``DTensor`` weights, no ``fully_shard``): the first hidden layer's
    rows and the second's columns sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (1,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


SHARDINGS = {
    "each layer": (each_layer, "parameter '0.weight' is sharded (a DTensor)"),
    "root after forward": (root_after_forward, "the model is sharded (by fully_shard)"),
    "tensor parallel": (tensor_parallel, "parameter '0.weight' is sharded (a DTensor)"),
}


def local(model: nn.Module) -> dict[str, torch.Tensor]:
    """The values this process holds of each parameter and buffer."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: getattr(v, "_local_tensor", v).detach().clone() for k, v in state.items()}


def hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


@pytest.mark.parametrize("sharding", list(SHARDINGS))
def test_discover_refuses_a_sharded_model_in_one_line(one_process, sharding):
    """Before: an empty structure (0 generators over 0 parameters, nothing excluded, no note)
    where the unsharded model has 11 generators. Now one ``ShardingError`` (a ``ValueError``)
    naming the first sharded parameter, every value, hook and type of the model as before."""
    model, x, structure = mlp()
    assert structure.num_generators == WIDTHS[1] + WIDTHS[2]
    shard, words = SHARDINGS[sharding]
    shard(model, x)
    before, kinds, attached = local(model), [type(m) for m in model.modules()], hooks(model)
    with pytest.raises(ShardingError) as refused:
        gaugefix.discover(model, x)
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and "\n" not in message
    assert message.startswith(words) and ADVICE in message
    after = local(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [type(m) for m in model.modules()] == kinds and hooks(model) == attached


def test_structure_of_the_unsharded_model_binds_the_sharded_one(one_process):
    """What the refusal advises: the structure discovered before sharding gives the sharded
    model the whole model's imbalance."""
    model, x, structure = mlp()
    sharded = copy.deepcopy(model)
    each_layer(sharded, x)
    whole = gaugefix.imbalance(model, structure).detach()
    sliced = gaugefix.imbalance(sharded, structure)
    assert whole.abs().max() > 0
    assert torch.allclose(sliced, whole, rtol=1e-12, atol=0.0)
