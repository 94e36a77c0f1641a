"""A quantization engineer's first mistakes with ``equalize_``: each is one clear ``ValueError``
and nothing is modified (the state dict compared exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugefix


def _model() -> tuple[nn.Sequential, torch.Tensor, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    model = model.double().eval()
    x = torch.randn(32, 16, dtype=torch.float64)
    return model, x, gaugefix.discover(model, x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("objective", ["range", "activation", "norm"])
def test_an_int8_weight_already_quantized_is_refused_by_name(objective):
    """Before: ``RuntimeError: linalg.vector_norm: Expected a floating point or complex tensor
    as input. Got Char`` (range, norm), which names neither the parameter nor the cause."""
    model, x, structure = _model()
    layer = model[3]
    layer.weight = nn.Parameter(layer.weight.detach().round().to(torch.int8), requires_grad=False)
    before = _state(model)
    calibration = x if objective == "activation" else None
    with pytest.raises(ValueError, match=r"'3\.weight' is torch\.int8.*nothing was modified"):
        gaugefix.equalize_(model, structure, objective, calibration=calibration)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "move",
    [
        lambda m, s: gaugefix.balance_(m, s),
        lambda m, s: gaugefix.random_gauge_(m, s, scale=1.0),
        lambda m, s: gaugefix.apply_gauge_(m, s, torch.ones(s.num_generators, dtype=torch.float64)),
    ],
    ids=["balance_", "random_gauge_", "apply_gauge_"],
)
def test_every_move_refuses_an_int8_weight_by_name(move):
    """The same check at every function that moves a model. Before: ``TypeError:
    torch.finfo() requires a floating point input type`` (balance_) and the ``vector_norm``
    error."""
    model, _, structure = _model()
    layer = model[3]
    layer.weight = nn.Parameter(layer.weight.detach().round().to(torch.int8), requires_grad=False)
    before = _state(model)
    with pytest.raises(ValueError, match=r"'3\.weight' is torch\.int8.*nothing was modified"):
        move(model, structure)
    assert _unchanged(model, before)


def test_a_torchao_quantized_linear_is_refused_by_name():
    """torchao's weight-only int8 keeps a float dtype on a tensor subclass. Before:
    ``NotImplementedError: Int8Tensor dispatch: ... aten._foreach_norm``."""
    quantization = pytest.importorskip("torchao.quantization")
    model, _, structure = _model()
    model.float()  # torchao quantizes float32 weights
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    kind = type(model[1].weight).__name__
    assert kind != "Parameter"  # the subclass this test is about
    before = [p.dequantize() if hasattr(p, "dequantize") else p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"'1\.weight' is {kind}.*nothing was modified"):
        gaugefix.equalize_(model, structure, "range")
    after = [p.dequantize() if hasattr(p, "dequantize") else p for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_calibration_batch_on_the_meta_device_is_refused():
    """A meta tensor holds no data. Before: here the model's own device error, on a Hugging
    Face Llama (whose embedding gives real tensors for meta ids) 'non-finite activations'."""
    model, x, structure = _model()
    before = _state(model)
    with pytest.raises(ValueError, match="calibration batch is on the meta device"):
        gaugefix.equalize_(model, structure, "activation", calibration=(x.to("meta"),))
    assert _unchanged(model, before)


def test_float_parameters_still_equalize_exactly():
    """The check refuses only what it names: a float64 model equalizes, its function kept."""
    model, x, structure = _model()
    reference = model(x)
    result = gaugefix.equalize_(model, structure, "activation", calibration=x)
    assert result.converged
    assert (model(x) - reference).abs().max().item() <= 1e-12


@pytest.mark.parametrize("objective", ["range", "norm"])
def test_alpha_with_another_objective_is_refused(objective):
    """``alpha`` is read by ``"activation"`` only. Before: ``equalize_(..., "range",
    alpha=0.8)`` ran as if it were not given (the command line refused ``--alpha`` there)."""
    model, _, structure = _model()
    before = _state(model)
    with pytest.raises(ValueError, match="alpha is the exponent of 'activation' only"):
        gaugefix.equalize_(model, structure, objective, alpha=0.8)
    assert _unchanged(model, before)


def test_activation_without_alpha_takes_the_default():
    model, x, structure = _model()
    other, _, _ = _model()
    given = gaugefix.equalize_(model, structure, "activation", calibration=x, alpha=0.5)
    default = gaugefix.equalize_(other, structure, "activation", calibration=x)
    assert gaugefix.equalize.DEFAULT_ALPHA == 0.5 and torch.equal(given.h, default.h)
