"""Optimizer state transport: after apply_gauge_ with an optimizer, the gradient-like buffers equal
the gradients at the transformed point and Adam's second moments their squares (float64).

By the chain rule, for an invariant loss grad L(g . theta) = g^{-1} grad L(theta) entrywise, so the
reference is computed independently: on a copy of the model moved by the same gauge without any
optimizer, by autograd."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import gaugefix
from gaugefix import zoo


@functools.cache
def _discovered(name: str):
    torch.manual_seed(0)
    factory, shape = zoo.EXAMPLES[name]
    model = factory().double().eval()
    x = torch.randn(4, *shape[1:], dtype=torch.float64)
    return model, x, gaugefix.discover(model, x)


def setup(name: str):
    """A fresh float64 copy of a zoo model, example inputs and the (shared) structure."""
    model, x, structure = _discovered(name)
    return copy.deepcopy(model), x, structure


def loss_fn(model, x):
    return model(x).square().mean()


def assert_equal_to_rounding(a, b):
    """Equal up to float64 rounding, measured on the whole tensor (entries that cancel inside the
    loss gradient carry relative rounding above 1e-12 on their own)."""
    assert float((a - b).norm()) <= 1e-12 * float(b.norm())


def gradients_at(model, x, structure):
    params = structure.bind(model)
    grads = torch.autograd.grad(loss_fn(model, x), list(params.values()))
    return dict(zip(params, grads, strict=True))


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.9)),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.9), amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.9), weight_decay=0.1),
}


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_buffers_equal_transported_gradients(name, opt_name):
    model, x, structure = setup(name)
    reference = copy.deepcopy(model)  # at theta_0, before the optimizer step
    opt = OPTIMIZERS[opt_name](model.parameters())
    loss_fn(model, x).backward()
    opt.step()  # after one step: momentum = g0; exp_avg = (1 - b1) g0; exp_avg_sq = (1 - b2) g0^2
    h = 0.8 * torch.randn(structure.num_generators, dtype=torch.float64)
    gaugefix.apply_gauge_(model, structure, h, optimizer=opt)
    gaugefix.apply_gauge_(reference, structure, h)
    g = gradients_at(reference, x, structure)  # grad L at g(h) . theta_0
    b1, b2 = opt.param_groups[0].get("betas", (0.0, 0.0))
    for k, p in structure.bind(model).items():
        state = opt.state[p]
        assert_equal_to_rounding(p.grad, g[k])
        if "momentum_buffer" in state:
            assert_equal_to_rounding(state["momentum_buffer"], g[k])
        if "exp_avg" in state:
            assert_equal_to_rounding(state["exp_avg"], (1 - b1) * g[k])
            assert_equal_to_rounding(state["exp_avg_sq"], (1 - b2) * g[k] ** 2)
        if "max_exp_avg_sq" in state:
            assert_equal_to_rounding(state["max_exp_avg_sq"], (1 - b2) * g[k] ** 2)
