"""An audit of the low-precision paths of the action, ``balance_`` and the statistics: float16,
bfloat16 and float32 models at the ends of their range, mixed-dtype models, in both kernel
layouts (the GPU one taken on CPU tensors). Every moved entry is compared with the float64
move of a copy; a move the factors' dtype cannot carry out is refused, changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import kernels, zoo

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
LAYOUTS = pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])


def mlp(dtype: torch.dtype, widths: tuple[int, ...] = (4, 6, 5, 2)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def discovered(model: nn.Module, x: torch.Tensor) -> gaugefix.GaugeStructure:
    return gaugefix.discover(copy.deepcopy(model).to(D), x)


def factor(structure: gaugefix.GaugeStructure, name: str, h: torch.Tensor) -> torch.Tensor:
    """``exp(sum_n w_n(e) h_n)`` for every entry of parameter ``name`` (float64)."""
    n = structure.num_generators
    hx = torch.cat([h.to(D), torch.zeros(1, dtype=D)])
    terms = structure.params[name].terms
    return torch.exp(sum(t.sign * hx[torch.where(t.index < 0, n, t.index)] for t in terms))


def everything(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of every parameter, gradient and optimizer-state tensor."""
    out = []
    for p in model.parameters():
        out += [p.detach().clone()] + ([p.grad.clone()] if p.grad is not None else [])
        out += [v.clone() for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def same_bits(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(
        a.dtype == b.dtype
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        for a, b in zip(before, after, strict=True)
    )


# --- partial products in the CPU layout ---------------------------------------------------------
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_entry_is_not_rounded_through_its_partial_products(dtype, gpu, monkeypatch):
    """A middle weight of ``1e-20`` between two generators moved by the same ``h = -60`` keeps
    its value (its factor is ``exp(60 - 60) = 1``). The CPU layout multiplied it by each term's
    factor in turn: by ``exp(-60)`` first, which took every entry to 0 (below float32's range),
    and then by ``exp(60)``. The product of the factors, taken first, is 1 to a few units of
    the dtype's rounding."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model = mlp(dtype)
    s = discovered(model, torch.randn(3, 4, dtype=D))
    with torch.no_grad():
        model[2].weight.mul_(1e-20)
    old = model[2].weight.detach().to(D).clone()
    h = torch.zeros(s.num_generators, dtype=D)
    h[:11] = -60.0  # both hidden layers
    gaugefix.apply_gauge_(model, s, h)
    moved = model[2].weight.detach().to(D)
    # two factors, their product and the entry, each rounded once: 4 units of eps / 2
    assert float(((moved - old) / old).abs().max()) <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_both_layouts_move_parameters_by_the_same_products(dtype, monkeypatch):
    """Both layouts compute the same products: a parameter is multiplied once by the product
    of its terms' factors, bit for bit the same in either layout (the CPU layout multiplied
    bfloat16 and float32 entries by each factor in turn, rounding each time: bfloat16 entries
    differed by 1.4 units of its eps from the exact move where the GPU layout's differed by
    1.2)."""
    torch.manual_seed(0)
    base = zoo.GPT(vocab=11, dim=8, heads=2, layers=2, context=8).to(D).eval()
    s = gaugefix.discover(base, torch.randint(0, 11, (2, 5)))
    h = 1.5 * torch.randn(s.num_generators, generator=torch.Generator().manual_seed(2), dtype=D)
    moved = []
    for gpu in (False, True):
        monkeypatch.setattr(kernels, "gpu_layout", lambda device, gpu=gpu: gpu)
        model = copy.deepcopy(base).to(dtype)
        gaugefix.apply_gauge_(model, s, h)
        moved.append([p.detach() for p in model.parameters()])
    assert same_bits(*moved)


# --- factors below their dtype's range ----------------------------------------------------------
class Mixed(nn.Module):
    """A float64 first layer feeding a layer of ``dtype`` feeding float64 layers."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=dt) for dt in (D, dtype, D))
        self.out = nn.Linear(8, 2, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x.to(layer.weight.dtype))).to(D)
        return self.out(x)


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_factor_below_its_dtype_range_is_refused_and_changes_nothing(dtype, gpu, monkeypatch):
    """The middle weight (``dtype``) moves by ``exp(85 - 110) = 1.4e-11``, within float32's
    range, but its outgoing term's factor ``exp(-110)`` is 0 in float32 (the float64 layer on
    the generator's other side takes ``exp(110)``): every entry became 0, the generators
    reported dead, silently. Now one ``ValueError`` before anything moves."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    torch.manual_seed(0)
    model, x = Mixed(dtype), torch.randn(5, 8, dtype=D)
    s = discovered(model, x)
    model.layers[1].requires_grad_(False)  # its gradient would take exp(110): an overflow
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).square().sum().backward()
    opt.step()
    model(x).square().sum().backward()
    h = torch.zeros(s.num_generators, dtype=D)
    h[:8], h[8:16] = 110.0, 85.0  # the hidden units before and after the middle layer
    before = everything(model, opt)
    with pytest.raises(ValueError, match="underflow") as err:
        gaugefix.apply_gauge_(model, s, h, opt)
    assert "\n" not in str(err.value)
    assert same_bits(before, everything(model, opt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balance_whose_solution_needs_such_a_factor_is_refused(dtype):
    """Balancing float64 layers of ``1e-90`` and ``1e60`` around a float32 one moves its
    generators by up to ``exp(140)``: ``balance_`` reported ``converged`` and zeroed the middle
    layer (the function lost); now it refuses, and nothing changes."""
    torch.manual_seed(0)
    model, x = Mixed(dtype), torch.randn(5, 8, dtype=D)
    s = discovered(model, x)
    with torch.no_grad():
        model.layers[0].weight.mul_(1e-90)
        model.layers[0].bias.mul_(1e-90)
        model.layers[2].weight.mul_(1e60)
        model.out.weight.mul_(1e30)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="underflow"):
        gaugefix.balance_(model, s)
    assert same_bits(before, [p.detach() for p in model.parameters()])


# --- balance_ on half-precision models against float64 ---------------------------------------
def half_gpt(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, gaugefix.GaugeStructure]:
    """A GPT in ``dtype`` with float32 norm gains, off balance, and its float64 copy."""
    torch.manual_seed(0)
    wide = zoo.GPT(vocab=11, dim=8, heads=2, layers=2, context=8).to(D).eval()
    s = gaugefix.discover(wide, torch.randint(0, 11, (2, 5)))
    gaugefix.random_gauge_(wide, s, 1.0, torch.Generator().manual_seed(1))
    model = copy.deepcopy(wide).to(dtype)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    wide.load_state_dict({k: v.to(D) for k, v in model.state_dict().items()})
    return model, wide, s


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_balance_of_a_mixed_half_model_is_the_float64_balance_rounded(dtype, gpu, monkeypatch):
    """``balance_`` solves on the parameters' values in float64: the same ``h`` as for a float64
    copy, bit for bit, and every moved float16 entry the float64 entry rounded once (its
    factor's float32 rounding aside); float32 norm gains to float32's rounding."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model, wide, s = half_gpt(dtype)
    result, reference = gaugefix.balance_(model, s), gaugefix.balance_(wide, s)
    assert result.converged and torch.equal(result.h, reference.h)
    named = dict(wide.named_parameters())
    for name, p in model.named_parameters():
        exact, got = named[name].detach(), p.detach().to(D)
        nearest = (exact.to(p.dtype).to(D) - exact).abs()
        bound = 4 * torch.finfo(torch.float32).eps if p.dtype == dtype == torch.float16 else 0.0
        if p.dtype != dtype:  # float32 norm gains: their own rounding
            bound = torch.finfo(torch.float32).eps
            nearest = torch.zeros_like(nearest)
        excess = ((got - exact).abs() - nearest) / exact.abs().clamp_min(1e-300)
        assert float(excess.max()) <= max(bound, torch.finfo(p.dtype).eps), name


def test_half_statistics_are_the_float64_statistics():
    """float16 squares are exact in float32 (22 significant bits): ``imbalance`` and
    ``imbalance_stats`` of a float16 model are a float64 copy's to float32's rounding of the
    sums."""
    model, wide, s = half_gpt(torch.float16)
    mu, mu64 = gaugefix.imbalance(model, s).detach(), gaugefix.imbalance(wide, s).detach()
    sums = sum(gaugefix.moment.in_out_sums(wide, s)).detach()
    assert float(((mu.to(D) - mu64).abs() / sums).max()) <= 8 * torch.finfo(torch.float32).eps
    stats, wide_stats = gaugefix.imbalance_stats(model, s), gaugefix.imbalance_stats(wide, s)
    for key in ("mu_rel_max", "log_ratio_max", "norm_sq", "mu_norm"):
        assert abs(stats[key] - wide_stats[key]) <= 1e-6 * abs(wide_stats[key]), key
    assert stats["dead_count"] == wide_stats["dead_count"] == 0
