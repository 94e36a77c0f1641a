"""An audit of parameter memory layouts and parametrizations: channels_last, transposed and
strided parameters, views into one flat buffer, tied parameters, parameters larger than the CPU
block size (odd row counts), 0-dim parameters, dtype mixtures, ``torch.nn.utils.parametrize``
weights. Every gauge move leaves the float64 outputs unchanged (1e-10 relative), ``mu``,
``imbalance_stats`` and ``balance_``'s norms equal a reference summed from
``named_parameters()`` (1e-12), and ``.grad`` and the optimizer state (kept in the parameter's
layout) are transported exactly. Parameters that share memory (with each other, or an expanded
one with itself) and parameters on the ``meta`` device are refused with one ``ValueError``
before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import gaugefix
from gaugefix import kernels

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
GRAD_LIKE = ("momentum_buffer", "exp_avg")
SQUARED = ("exp_avg_sq", "max_exp_avg_sq")


def reference_sums(model: nn.Module, structure: gaugefix.GaugeStructure) -> tuple:
    """``(S_in, S_out, ||theta||^2)`` in float64, term by term from ``named_parameters()``."""
    named, n = dict(model.named_parameters()), structure.num_generators
    sums = torch.zeros(2, n + 1, dtype=D)
    norm = torch.zeros((), dtype=D)
    for name, p in structure.params.items():
        sq = named[name].detach().to(D).square()
        norm += sq.sum()
        for t in p.terms:
            index = torch.where(t.index < 0, n, t.index).expand(sq.shape).reshape(-1)
            sums[0 if t.sign > 0 else 1].index_add_(0, index, sq.reshape(-1))
    return sums[0, :n], sums[1, :n], norm


def factor(structure: gaugefix.GaugeStructure, name: str, h: torch.Tensor) -> torch.Tensor:
    """``exp(sum_n w_n(e) h_n)`` for every entry of parameter ``name`` (float64)."""
    n = structure.num_generators
    hx = torch.cat([h.to(D), torch.zeros(1, dtype=D)])
    terms = structure.params[name].terms
    return torch.exp(sum(t.sign * hx[torch.where(t.index < 0, n, t.index)] for t in terms))


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((actual.to(D) - expected.to(D)).abs().max()) / scale if scale else 0.0


def trained(model: nn.Module, x: torch.Tensor, optimizer: str) -> torch.optim.Optimizer:
    """``model`` after one step of ``optimizer``, with a fresh gradient in ``.grad``."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    model(x).square().sum().backward()
    opt.step()
    model(x).square().sum().backward()
    return opt


def assert_exact_moves(model: nn.Module, x: torch.Tensor, optimizer: str = "adam") -> None:
    """Reports equal the reference; a random move keeps the outputs and transports every
    tensor exactly; ``balance_``'s norm equals the reference."""
    structure = gaugefix.discover(model, x)
    assert structure.num_generators > 0
    opt = trained(model, x, optimizer)
    s_in, s_out, norm = reference_sums(model, structure)
    assert relative(gaugefix.imbalance(model, structure).detach(), s_in - s_out) <= 1e-12
    stats = gaugefix.imbalance_stats(model, structure)
    assert abs(stats["norm_sq"] - float(norm)) <= 1e-12 * float(norm)
    named = dict(model.named_parameters())
    saved = {
        name: [(p.detach().clone(), 1), (p.grad.clone(), -1)]
        + [
            (v.clone(), -1 if k in GRAD_LIKE else -2)
            for k, v in opt.state[p].items()
            if k in GRAD_LIKE + SQUARED
        ]  # fmt: skip
        for name, p in named.items()
    }
    with torch.no_grad():
        before = model(x)
    h = gaugefix.random_gauge_(model, structure, 0.7, torch.Generator().manual_seed(1), opt)
    with torch.no_grad():
        assert relative(model(x), before) <= 1e-10
    for name, p in named.items():
        f = factor(structure, name, h) if name in structure.params else torch.ones((), dtype=D)
        now = [p.detach(), p.grad] + [
            v for k, v in opt.state[p].items() if k in GRAD_LIKE + SQUARED
        ]
        for tensor, (old, power) in zip(now, saved[name], strict=True):
            assert relative(tensor, old.to(D) * f**power) <= 1e-14, name
    result = gaugefix.balance_(model, structure)
    assert result.converged
    _, _, norm = reference_sums(model, structure)
    assert abs(result.norm_sq_after - float(norm)) <= 1e-12 * float(norm)
    with torch.no_grad():
        assert relative(model(x), before) <= 1e-10


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b, dtype=D), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Transposed(nn.Module):
    """Non-contiguous parameters: a transposed weight, a strided slice, a strided bias."""

    def __init__(self, rows: int = 16) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(rows, 6, dtype=D).t())
        self.b1 = nn.Parameter(torch.randn(2 * rows, dtype=D)[::2])
        self.w2 = nn.Parameter(torch.randn(3, 2 * rows + 1, dtype=D)[:, 1::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1 + self.b1) @ self.w2.t()


class FlatBuffer(nn.Module):
    """Every parameter a view into one flat buffer (apex/DeepSpeed style), non-overlapping;
    with ``interleaved`` two of them are strided views whose entries interleave."""

    def __init__(self, interleaved: bool = False) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 16, dtype=D), nn.Linear(16, 4, dtype=D)
        flat = torch.randn(2 * 16 * 6 + 16 + 4 * 16 + 4, dtype=D)
        w1 = flat[: 2 * 96].view(16, 12)[:, 0::2]
        b1 = flat[: 2 * 96].view(16, 12)[:, 1::2][:, 0] if interleaved else flat[192:208]
        views = [w1, b1, flat[208:272].view(4, 16), flat[272:]]
        for module, key, view in zip([self.l1, self.l1, self.l2, self.l2],
                                     ["weight", "bias"] * 2, views, strict=True):  # fmt: skip
            setattr(module, key, nn.Parameter(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


class Tied(nn.Module):
    """One Parameter in two modules (its channels are excluded, the later layers' are not)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.e, self.f = (nn.Linear(8, 8, dtype=D) for _ in range(5))
        self.d = nn.Linear(8, 2, dtype=D)
        self.c.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.a, self.b, self.c, self.e, self.f):
            x = torch.relu(layer(x))
        return self.d(x)


def conv(channels_last: bool, width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, dtype=D), nn.ReLU(), nn.Conv2d(width, width + 3, 3, dtype=D),
        nn.ReLU(), nn.Conv2d(width + 3, 2, 1, dtype=D),
    )  # fmt: skip
    return model.to(memory_format=torch.channels_last) if channels_last else model


CASES = {
    "channels_last conv": (lambda: conv(True), (2, 3, 9, 9)),
    "transposed and strided": (Transposed, (3, 6)),
    "flat buffer": (FlatBuffer, (3, 6)),
    "interleaved flat buffer": (lambda: FlatBuffer(interleaved=True), (3, 6)),
    "tied": (Tied, (3, 8)),
    # larger than the CPU block size (CHUNK = 2^18 entries), odd row counts
    "larger than a block": (lambda: mlp(37, 7001, 39, 3), (2, 37)),
    "channels_last larger than a block": (lambda: conv(True, 301), (1, 3, 7, 7)),
    "transposed larger than a block": (lambda: Transposed(7001), (2, 6)),
}


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("case", CASES)
def test_layouts_move_exactly_and_report_the_reference(case, optimizer, gpu, monkeypatch):
    """In either kernel layout (the GPU one taken on CPU tensors)."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build()
    if case == "channels_last conv":
        state = trained(model, torch.randn(shape, dtype=D), optimizer).state
        assert all(
            v.is_contiguous(memory_format=torch.channels_last)
            for p, s in state.items() if p.dim() == 4 for v in s.values() if v.dim() == 4
        )  # fmt: skip
        model = build()
    assert_exact_moves(model, torch.randn(shape, dtype=D), optimizer)


def test_small_blocks_of_rows_move_exactly(monkeypatch):
    """The blocked CPU path on small tensors too: blocks of 7 entries, odd row counts."""
    monkeypatch.setattr(kernels, "CHUNK", 7)
    monkeypatch.setattr(kernels, "SHORT_RUN", 2)
    torch.manual_seed(0)
    assert_exact_moves(conv(True, 5), torch.randn(2, 3, 7, 7, dtype=D))
    assert_exact_moves(Transposed(5), torch.randn(3, 6, dtype=D))


class Scalar(nn.Module):
    """A 0-dim parameter scaling a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6, dtype=D), nn.Linear(6, 2, dtype=D)
        self.g = nn.Parameter(torch.tensor(1.5, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)) * self.g)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_zero_dim_parameter_with_adam_state(optimizer):
    """Adam's 0-dim ``step`` counter is shaped like a 0-dim parameter: it is neither refused
    nor rescaled (it was refused as an unknown buffer)."""
    torch.manual_seed(0)
    model, x = Scalar(), torch.randn(3, 4, dtype=D)
    assert "g" in gaugefix.discover(model, x).params
    assert_exact_moves(model, x, optimizer)


def test_zero_dim_parameter_gauge_fixing_keeps_adam_step():
    torch.manual_seed(0)
    model, x = Scalar(), torch.randn(3, 4, dtype=D)
    structure = gaugefix.discover(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gaugefix.GaugeFixing(opt, model, structure, strength=1.0, every=1)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert float(opt.state[model.g]["step"]) == 3.0


class Mixed(nn.Module):
    """Layers of one shape (one kernel group) in different dtypes; the hidden values pass
    between them in float64."""

    def __init__(self, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=dt) for dt in dtypes)
        self.out = nn.Linear(8, 2, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x.to(layer.weight.dtype))).to(D)
        return self.out(x)


MIXTURES = [
    (torch.float16, D, D, D),
    (D, torch.float16, D, D),
    (D, torch.bfloat16, D, D),
    (torch.float32, D, D, D),
]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu layout", "gpu layout"])
@pytest.mark.parametrize("dtypes", MIXTURES, ids=str)
def test_dtype_mixture_moves_float64_parameters_exactly(dtypes, gpu, monkeypatch):
    """A move on the generators that act on float64 parameters only keeps the float64 outputs:
    each tensor takes factors rounded to its own dtype, not to that of the first tensor of its
    group (a float16 factor changed the outputs by 2e-5), in either kernel layout."""
    monkeypatch.setattr(kernels, "gpu_layout", lambda device: gpu)
    torch.manual_seed(0)
    model, x = Mixed(dtypes), torch.randn(5, 8, dtype=D)
    structure = gaugefix.discover(model, x)
    named = dict(model.named_parameters())
    wide = torch.ones(structure.num_generators, dtype=torch.bool)
    for name, p in structure.params.items():
        if named[name].dtype != D:
            for t in p.terms:
                wide[t.index[t.index >= 0]] = False
    assert 0 < int(wide.sum()) < structure.num_generators
    with torch.no_grad():
        before = model(x)
    h = torch.randn(structure.num_generators, dtype=D) * wide
    gaugefix.apply_gauge_(model, structure, h)
    with torch.no_grad():
        assert relative(model(x), before) <= 1e-10


@pytest.mark.parametrize("dtypes", MIXTURES, ids=str)
def test_dtype_mixture_sums_accumulate_in_float64(dtypes):
    """With a float64 parameter anywhere, ``mu`` and the statistics accumulate in float64 (they
    accumulated in the first parameter's, float32: errors of 1e-7)."""
    torch.manual_seed(0)
    model = Mixed(dtypes)
    structure = gaugefix.discover(model, torch.randn(5, 8, dtype=D))
    s_in, s_out, norm = reference_sums(model, structure)
    mu = gaugefix.imbalance(model, structure).detach()
    assert mu.dtype == D
    assert float((mu - (s_in - s_out)).abs().max()) <= 1e-12 * float((s_in + s_out).max())
    stats = gaugefix.imbalance_stats(model, structure)
    assert abs(stats["norm_sq"] - float(norm)) <= 1e-12 * float(norm)
    assert abs(stats["mu_norm"] - float((s_in - s_out).norm())) <= 1e-12 * float(norm)


@pytest.mark.parametrize("dtypes", MIXTURES, ids=str)
def test_dtype_mixture_penalty_and_orbit_step_accumulate_in_float64(dtypes):
    """``gaugefix.step.penalty`` adds ``strength * (sum_n w_n(e) mu_n) theta_e`` exactly to the
    float64 parameters' gradients: ``mu`` summed in float64 when any parameter is float64, and
    each group's coefficients in its widest dtype (both were the first parameter's: 1e-7)."""
    from gaugefix import step

    torch.manual_seed(0)
    model, x = Mixed(dtypes), torch.randn(5, 8, dtype=D)
    structure = gaugefix.discover(model, x)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    s_in, s_out, _ = reference_sums(model, structure)
    mu = s_in - s_out
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    tx = step.penalty(structure, strength=1.0)
    added, _ = tx.update(grads, tx.init(params), params)
    for name, p in params.items():
        if p.dtype == D and name in structure.params:
            combination = torch.zeros_like(p)
            for term in structure.params[name].terms:
                live = term.index >= 0
                c = torch.where(live, mu[term.index.clamp(min=0)], 0.0) * term.sign
                combination += c.expand_as(p) if c.shape != p.shape else c
            expected = combination * p
            assert relative(added[name], expected) <= 1e-12, name


class Aliased(nn.Module):
    """Distinct Parameters over shared memory: ``mode`` 'same' (the whole weight), 'overlap'
    (views of one buffer overlapping by half), 'expanded' (a bias expanded from one entry)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = (nn.Linear(6, 6, dtype=D) for _ in range(3))
        self.out = nn.Linear(6, 2, dtype=D)
        if mode == "same":
            self.l2.weight = nn.Parameter(self.l1.weight.data)
        elif mode == "overlap":
            flat = torch.randn(54, dtype=D)
            self.l1.weight = nn.Parameter(flat[:36].view(6, 6))
            self.l2.weight = nn.Parameter(flat[18:].view(6, 6))
        else:
            self.l2.bias = nn.Parameter(torch.randn(1, dtype=D).expand(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.l1, self.l2, self.l3):
            x = torch.relu(layer(x))
        return self.out(x)


@pytest.mark.parametrize("mode", ["same", "overlap", "expanded"])
@pytest.mark.parametrize("action", ["apply", "balance", "gauge fixing"])
def test_parameters_sharing_memory_are_refused_before_anything_changes(mode, action):
    """An in-place move would scale shared entries twice (outputs moved by 700%) or, expanded,
    fail halfway (the parameters before it already moved). ``GaugeFixing`` balances first: it
    is refused when made."""
    torch.manual_seed(0)
    model, x = Aliased(mode), torch.randn(3, 6, dtype=D)
    structure = gaugefix.discover(model, x)
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="share memory"):
        if action == "apply":
            h = torch.randn(structure.num_generators, dtype=D)
            gaugefix.apply_gauge_(model, structure, h)
        elif action == "balance":
            gaugefix.balance_(model, structure)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gaugefix.GaugeFixing(opt, model, structure, strength=1.0, every=1)
    for p, old in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.detach(), old.detach())


def test_meta_parameters_are_refused_with_one_clear_error():
    model, x = mlp(4, 6, 6, 2), torch.randn(2, 4, dtype=D)
    structure = gaugefix.discover(model, x)
    meta = copy.deepcopy(model).to("meta")
    h = torch.zeros(structure.num_generators, dtype=D)
    calls = [
        lambda: gaugefix.imbalance(meta, structure),
        lambda: gaugefix.imbalance_stats(meta, structure),
        lambda: gaugefix.apply_gauge_(meta, structure, h),
        lambda: gaugefix.random_gauge_(meta, structure, 1.0),
        lambda: gaugefix.balance_(meta, structure),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="meta device"):
            call()


@pytest.mark.parametrize(
    "parametrize",
    [
        lambda m: parametrizations.weight_norm(m),
        lambda m: parametrizations.weight_norm(m, dim=None),
        lambda m: parametrizations.spectral_norm(m),
        lambda m: parametrizations.orthogonal(m),
    ],
    ids=["weight_norm", "weight_norm dim=None", "spectral_norm", "orthogonal"],
)
def test_parametrized_weights_are_excluded_and_the_rest_moves_exactly(parametrize):
    """The tensors of a parametrization (``original0``, ``original1``) are read by an op without
    a rule (``weight_norm``'s gain ``original0`` excepted): their channels are excluded, the
    layers around them keep their generators."""
    torch.manual_seed(0)
    model = mlp(4, 6, 6, 6, 2)
    parametrize(model[2])
    model.eval()
    x = torch.randn(5, 4, dtype=D)
    structure = gaugefix.discover(model, x)
    moved = {name for name in structure.params if "parametrizations" in name}
    # weight_norm's gain g (original0) carries its rows' (or whole weight's) factor; v is fixed
    assert moved == (
        {"2.parametrizations.weight.original0"} if "WeightNorm" in repr(model) else set()
    )
    assert any("parametrizations" in e.module for e in structure.excluded)
    assert_exact_moves(model, x)
