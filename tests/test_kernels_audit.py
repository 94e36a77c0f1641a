"""An audit of the numerical core (kernels, action, masses, balancing, statistics) at the edges:
gauges that would overflow a moved tensor's dtype, half-precision factors, inference tensors,
sparse gradients, zero-size parameters, and the numbers ``balance_`` and ``imbalance_stats``
report. Every refused call changes nothing, bit for bit (parameters, gradients, optimizer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gaugefix
from gaugefix import kernels
from gaugefix.structure import GaugeStructure
from gaugefix.structure.terms import ParamTerms, Term

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64


def mlp(dtype: torch.dtype = D, widths: tuple[int, ...] = (4, 6, 5, 2)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def discovered(widths: tuple[int, ...] = (4, 6, 5, 2)) -> gaugefix.GaugeStructure:
    return gaugefix.discover(mlp(D, widths), torch.randn(3, widths[0], dtype=D))


def factor(structure: gaugefix.GaugeStructure, name: str, h: torch.Tensor) -> torch.Tensor:
    """``exp(sum_n w_n(e) h_n)`` for every entry of parameter ``name`` (float64; 1 if none)."""
    if name not in structure.params:
        return torch.ones((), dtype=D)
    n = structure.num_generators
    hx = torch.cat([h.to(D), torch.zeros(1, dtype=D)])
    terms = structure.params[name].terms
    return torch.exp(sum(t.sign * hx[torch.where(t.index < 0, n, t.index)] for t in terms))


def everything(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Copies of every parameter, gradient and optimizer-state tensor."""
    out = []
    for p in model.parameters():
        out += [p.detach().clone()] + ([p.grad.clone()] if p.grad is not None else [])
        if opt is not None:
            out += [v.clone() for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def assert_unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    """Bit-for-bit equality (NaN included), whatever the dtype."""
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def trained(model: nn.Module, width: int, adam: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (or Adam) after one step, with a fresh gradient in ``.grad``."""
    x = torch.randn(3, width, dtype=next(model.parameters()).dtype)
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=1e-3) if adam else torch.optim.SGD(params, 1e-3, 0.9)
    model(x).square().sum().backward()
    opt.step()
    model(x).square().sum().backward()
    return opt


# --- gauges that would overflow ----------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, value",
    [(D, 800.0), (D, -800.0), (D, 1e300), (torch.float32, 100.0), (torch.float32, -100.0),
     (torch.bfloat16, 100.0), (torch.float16, 15.0)],
)  # fmt: skip
def test_apply_gauge_refuses_h_that_overflows_and_changes_nothing(dtype, value):
    """A finite ``h`` whose factors overflow the parameters' dtype made them inf, 0 and NaN (the
    function destroyed, silently); now one ``ValueError`` before anything moves."""
    model, s = mlp(dtype), discovered()
    opt = trained(model, 4)
    before = everything(model, opt)
    h = torch.full((s.num_generators,), value, dtype=D)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.apply_gauge_(model, s, h, opt)
    assert_unchanged(before, everything(model, opt))
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.random_gauge_(model, s, abs(value) * 10, optimizer=opt)
    assert_unchanged(before, everything(model, opt))


def test_transported_second_moment_that_would_overflow_is_refused():
    """``h = -50`` on one generator moves float32 parameters and gradients within range, but
    Adam's second moment by ``exp(100)``: it became inf silently."""
    model, s = mlp(torch.float32), discovered()
    opt = trained(model, 4, adam=True)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["exp_avg_sq"].fill_(1.0)
    h = torch.zeros(s.num_generators, dtype=D)
    h[0] = -50.0
    named = dict(model.named_parameters())
    for name in s.params:  # the parameters themselves stay in range
        moved = named[name].detach().double() * factor(s, name, h)
        assert float(moved.abs().max()) < torch.finfo(torch.float32).max
    before = everything(model, opt)
    with pytest.raises(ValueError, match="overflow"):
        gaugefix.apply_gauge_(model, s, h, opt)
    assert_unchanged(before, everything(model, opt))


def test_large_gauges_that_stay_in_range_still_move_exactly():
    """The check refuses nothing that fits: ``|h| = 300`` on a float64 model of small weights
    moves every entry to within 1e-13 of its exact value, and back."""
    model, s = mlp(D), discovered()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-140)
    old = {k: v.detach().clone() for k, v in model.named_parameters()}
    h = torch.full((s.num_generators,), 300.0, dtype=D)
    h[6:] = 150.0  # the second hidden layer: its weights move by exp(-150)
    gaugefix.apply_gauge_(model, s, h)
    for name, p in model.named_parameters():
        want = old[name] * factor(s, name, h)
        assert float(((p.detach() - want) / want).abs().max()) <= 1e-13, name
    gaugefix.apply_gauge_(model, s, -h)
    for name, p in model.named_parameters():
        assert float(((p.detach() - old[name]) / old[name]).abs().max()) <= 1e-13, name


# --- half precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
def test_float16_factor_of_one_term_may_exceed_float16(gpu, monkeypatch):
    """A float16 weight between two generators moved by the same ``h = 12`` keeps its values
    (its entries' factor is 1); each term's factor, ``exp(12) > 65504``, was rounded to float16
    on its own and made it inf."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    model, s = mlp(torch.float16), discovered()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    middle = params["2.weight"].clone()
    h = torch.full((s.num_generators,), 12.0, dtype=D)
    kernels.rescale_({k: [(v, 1)] for k, v in params.items() if k in s.params}, s, h)
    assert torch.equal(params["2.weight"], middle)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
def test_float16_entries_are_rounded_once(gpu, monkeypatch):
    """Each moved float16 entry is the correctly rounded ``theta_e * exp(x_e)`` (its factor in
    float32, then one rounding): a factor below float16's normal range (``exp(-10)``) lost
    0.1%, and several terms' factors each rounded added their errors."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    dtype = torch.float16
    model, s = mlp(dtype), discovered()
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    old = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    h = torch.cat([torch.full((6,), -10.0), torch.full((5,), -6.0)]).to(D)
    h += 0.3 * torch.randn(s.num_generators, generator=torch.Generator().manual_seed(0), dtype=D)
    gaugefix.apply_gauge_(model, s, h)
    for name, p in model.named_parameters():
        exact = old[name] * factor(s, name, h)
        nearest = (exact.to(dtype).double() - exact).abs()
        # the nearest value of the dtype, up to the float32 factor's own rounding
        err = (p.detach().double() - exact).abs() - nearest
        assert float((err / exact.abs()).max()) <= 1e-6, name


def test_balance_moves_float16_entries_whose_factor_exceeds_float16():
    """A float16 model with subnormal first-layer weights and large last-layer ones balances
    with factors ``exp(11.5) > 65504`` on the first layer: its entries became inf."""
    model, s = mlp(torch.float16, (4, 6, 2)), discovered((4, 6, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.mul_(1e-6)
        model[2].weight.mul_(1e4)
    x = torch.rand(5, 4, dtype=D)
    reference = mlp(D, (4, 6, 2))
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        before = reference(x)
    result = gaugefix.balance_(model, s)
    assert result.converged and float(result.h.max()) > math.log(65504.0)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        after = reference(x)
    assert float((after - before).abs().max()) <= 3e-3 * float(before.abs().max())
    assert result.mu_rel_max <= 3e-3


def refused_by_every_move(model: nn.Module, s, before, match: str) -> None:
    """``apply_gauge_`` and ``balance_`` refuse ``model`` (``ValueError`` matching ``match``),
    its parameters, gradients and state as ``before``."""
    h = torch.randn(s.num_generators, dtype=D)
    for call in (lambda: gaugefix.apply_gauge_(model, s, h), lambda: gaugefix.balance_(model, s)):
        with pytest.raises(ValueError, match=match):
            call()
        assert_unchanged(before, everything(model))


# --- tensors that cannot be moved in place ----------------------------------------------------
def test_inference_tensor_parameter_is_refused_before_anything_moves():
    """A parameter created under ``torch.inference_mode`` cannot be updated in place outside it:
    the move failed after rescaling the parameters before it (the function changed)."""
    model, s = mlp(D), discovered()
    with torch.inference_mode():
        weight = torch.randn(2, 5, dtype=D)
    model[4].weight = nn.Parameter(weight, requires_grad=False)
    before = everything(model)
    refused_by_every_move(model, s, before, "inference")


def test_inference_tensors_move_inside_inference_mode():
    model, s = mlp(D), discovered()
    with torch.inference_mode():
        moved = mlp(D)
        h = torch.randn(s.num_generators, dtype=D)
        gaugefix.apply_gauge_(moved, s, h)
    for (name, p), q in zip(moved.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p, q.detach() * factor(s, name, h), rtol=1e-14, atol=0)


class SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 6, sparse=True, dtype=D)
        self.l, self.o = nn.Linear(6, 6, dtype=D), nn.Linear(6, 2, dtype=D)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.l(self.e(i))))


def test_sparse_gradient_is_refused_with_one_clear_error():
    """A sparse gradient (``nn.Embedding(sparse=True)``) raised ``NotImplementedError: Cannot
    access storage of SparseTensorImpl``."""
    torch.manual_seed(0)
    model, i = SparseEmbedding(), torch.randint(0, 10, (2, 3))
    s = gaugefix.discover(model, i)
    assert "e.weight" in s.params
    model(i).sum().backward()
    assert model.e.weight.grad.is_sparse
    before = everything(model)
    refused_by_every_move(model, s, before, "sparse")


# --- zero-size parameters -----------------------------------------------------------------------
ZERO_SIZE = {
    "a": ((3, 4), [((3, 1), 1)]),
    "empty_rows": ((0, 3), [((1, 3), -1)]),
    "empty_cols": ((3, 0), [((3, 1), -1)]),
    "empty_slots": ((0, 3), [((0, 1), 1), ((1, 3), -1)]),
    "scalar": ((), [((), -1)]),
    "b": ((2, 3), [((1, 3), -1)]),
}


def zero_size_structure() -> GaugeStructure:
    """Generators 0-2 (rows of ``a``, columns of ``b``); parameters of zero entries among them,
    one with a term varying along its empty dim."""
    params = {}
    for name, (shape, terms) in ZERO_SIZE.items():
        index = [torch.arange(math.prod(s)).reshape(s) % 3 for s, _ in terms]
        params[f"ps.{name}"] = ParamTerms(
            f"ps.{name}",
            shape,
            tuple(Term(i, sign) for i, (_, sign) in zip(index, terms, strict=True)),
        )
    return GaugeStructure(3, params, [], ["x"] * 3, ["neuron"] * 3, {}, list(params))


class ZeroSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ps = nn.ParameterDict(
            {
                k: nn.Parameter(torch.randn(shape, dtype=D)) for k, (shape, _) in ZERO_SIZE.items()
            }  # fmt: skip
        )


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
def test_zero_size_parameters_are_summed_and_balanced(gpu, monkeypatch):
    """Parameters of no entries add nothing (a term's slots over an empty dim broke the sums:
    ``output with shape [1, 3] doesn't match the broadcast shape [0, 3]``, ``_chunk_cat expects
    non-empty tensor``, and ``balance_`` raised after moving the model)."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    s = zero_size_structure()
    model = ZeroSize()
    tensors = dict(model.named_parameters())
    a, b, scalar = (model.ps[k].detach().clone() for k in ("a", "b", "scalar"))
    want_in = a.square().sum(1)
    want_out = b.square().sum(0) + torch.tensor([scalar.square(), 0.0, 0.0], dtype=D)
    mu = gaugefix.imbalance(tensors, s).detach()
    assert float((mu - (want_in - want_out)).abs().max()) <= 1e-14
    stats = gaugefix.imbalance_stats(tensors, s)
    norm = float(a.square().sum() + b.square().sum() + scalar.square())
    assert abs(stats["norm_sq"] - norm) <= 1e-14 * norm
    batched = {k: torch.stack([v.detach(), 2 * v.detach()]) for k, v in tensors.items()}
    s_in, s_out, _ = kernels.generator_sums(batched, s, D, batch_dims=1)
    assert float((s_in[1] - s_out[1] - 4 * mu).abs().max()) <= 1e-13
    h = torch.randn(3, dtype=D)
    gaugefix.apply_gauge_(model, s, h)
    assert float((model.ps["a"].detach() - a * torch.exp(h)[:, None]).abs().max()) <= 1e-14
    result = gaugefix.balance_(model, s)
    assert result.converged and result.mu_rel_max <= 1e-10


class Scalar(nn.Module):
    """A 0-dim parameter scaling a hidden layer (LayerScale with one gain)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 6, dtype=D), nn.Linear(6, 2, dtype=D)
        self.g = nn.Parameter(torch.tensor(1.5, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)) * self.g)


def test_zero_dim_parameter_in_the_gpu_layout(monkeypatch):
    """In the GPU layout (taken on every non-CPU device) a 0-dim parameter's squares reached
    ``_chunk_cat``, which needs a dim past the batch dims: ``imbalance_stats``, ``balance_``
    (after moving the model) and every ``GaugeFixing`` step raised ``RuntimeError: _chunk_cat
    expects dim < ndim``. The statistics equal the CPU layout's."""
    model, x = Scalar(), torch.randn(3, 4, dtype=D)
    s = gaugefix.discover(model, x)
    assert "g" in s.params
    expected = gaugefix.imbalance_stats(model, s)
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: True)
    stats = gaugefix.imbalance_stats(model, s)
    assert all(abs(stats[k] - v) <= 1e-12 * max(abs(v), 1.0) for k, v in expected.items())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gaugefix.GaugeFixing(opt, model, s, strength=1.0, every=1)
    model(x).square().sum().backward()
    opt.step()
    assert gaugefix.balance_(model, s).converged


# --- the numbers reported ----------------------------------------------------------------------
def reference_stats(model: nn.Module, s: gaugefix.GaugeStructure) -> dict[str, float]:
    """The statistics of ``imbalance_stats`` as its docstring defines them, in float64."""
    named, n = dict(model.named_parameters()), s.num_generators
    sides = torch.zeros(2, n + 1, dtype=D)
    for name, p in s.params.items():
        sq = named[name].detach().to(D).square()
        for t in p.terms:
            index = torch.where(t.index < 0, n, t.index).expand(sq.shape).reshape(-1)
            sides[0 if t.sign > 0 else 1].index_add_(0, index, sq.reshape(-1))
    s_in, s_out = sides[:, :n]
    mu, total, live = s_in - s_out, s_in + s_out, (s_in > 0) & (s_out > 0)
    rel = (mu.abs() / total)[total > 0]
    log = (0.5 * torch.log(s_in / s_out)).abs()[live]
    norm = sum(named[k].detach().to(D).square().sum() for k in s.params)
    return {
        "mu_rel_rms": float(rel.square().mean().sqrt()), "mu_rel_max": float(rel.max()),
        "log_ratio_rms": float(log.square().mean().sqrt()), "log_ratio_max": float(log.max()),
        "mu_norm": float(mu.norm()), "norm_sq": float(norm),
        "dead_count": float((~live).sum()), "nonfinite_count": 0.0,
    }  # fmt: skip


def test_imbalance_stats_are_their_definitions_in_float64():
    """The RMS statistics divided by the square root of an integer count taken in float32
    (``torch.sqrt`` of an int64 tensor): ``mu_rel_rms`` and ``log_ratio_rms`` of a float64
    model were only float32-accurate (3e-8 relative)."""
    model, s = mlp(D), discovered()
    gaugefix.random_gauge_(model, s, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 0.0, 0.0  # generator 0: no incoming mass
        model[2].weight[:, 1] = 0.0  # generator 1: no outgoing mass
    stats, want = gaugefix.imbalance_stats(model, s), reference_stats(model, s)
    assert want["dead_count"] == 2.0
    for key, value in want.items():
        assert abs(stats[key] - value) <= 1e-13 * max(abs(value), 1.0), key


def test_optimizer_state_on_another_device_is_refused_with_one_clear_error():
    """A momentum buffer on another device than its parameter (here ``meta``, the only other
    device a CPU build has) raised ``RuntimeError: Tensor.item() cannot be called on meta
    tensors`` from the shared-memory check; on a real device the move failed halfway."""
    model, s = mlp(D), discovered()
    opt = trained(model, 4)
    p = model[2].weight
    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, device="meta")
    before = everything(model)
    with pytest.raises(ValueError, match="'2.weight' is on meta"):
        gaugefix.apply_gauge_(model, s, torch.randn(s.num_generators, dtype=D), opt)
    assert_unchanged(before, everything(model))


@pytest.mark.parametrize(
    "h",
    [torch.zeros(11, device="meta"), torch.zeros(11).to(torch.float8_e4m3fn)],
    ids=["meta", "float8"],
)
def test_h_without_data_or_of_float8_is_refused_with_one_clear_error(h):
    """``h`` on the meta device raised ``RuntimeError: Tensor.item() cannot be called on meta
    tensors``, a float8 ``h`` ``NotImplementedError: "norm_cpu" not implemented``."""
    model, s = mlp(D), discovered()
    before = everything(model)
    with pytest.raises(ValueError, match=r"\bh\b"):
        gaugefix.apply_gauge_(model, s, h)
    assert_unchanged(before, everything(model))
