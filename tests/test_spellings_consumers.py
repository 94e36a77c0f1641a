"""Every consumer of a structure on models that use the tracer's newer spellings.

The spellings: a parameter read through slices along dim 0 at plain numbers (a fused gate-up or
QKV weight split by ``chunk``, ``split``, ``tensor_split``, ``narrow``, ``W[a:b]``; gains
stacked and ``unbind``/``select``-ed; a weight read whole and sliced), zeros written into an
activation (``t[:, 3] = 0``, ``fill_``, ``index_fill``, ``index_put_``), rescaled values
accumulated (``index_put_(..., accumulate=True)``, ``scatter_reduce(..., "sum")``) and
``torch.native_layer_norm``.

Oracle: each spelled model computes what a reference does that spells none of them (separate
``nn.Linear`` layers, a 0/1 mask, ``index_add_``, ``nn.LayerNorm``) with the same entries, so
every orbit-level consumer (``balance_`` in both kernel layouts, ``equalize_``, the balanced
point of ``gauge_coordinates``, ``relax_``, ``GaugeFixing`` training, ``imbalance`` as a set)
gives the reference's parameters to 1e-10 from the same orbit point. On every spelled model,
including a weight read whole by one layer and sliced by another: a gauge keeps the float64
outputs at other batch sizes to 1e-10 in both kernel layouts, every exported scale group
applied as a tool applies it keeps them and moves the parameters as ``apply_gauge_`` does, the
structure survives its JSON round trip, ``verify`` passes, and the balanced and range-equalized
points are stationary by entries read off the action (each entry counted once).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_scale_groups_audit import apply_like_a_tool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.opcount import gpu_layout_on_cpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
IN, D, H, OUT = 4, 6, 5, 3
BATCH, OTHER_BATCHES = 7, (3, 11)
SCALE = 1.5  # the random gauge moving both models to the same orbit point
STEPS, LR, MOMENTUM, STRENGTH = 20, 1e-2, 0.9, 0.1
RELAX_RATE = 0.01


# --- spelled models and their references ---------------------------------------------------
def fused_halves(w: Tensor, b: Tensor, how: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two halves of a fused ``[2H, D]`` weight and ``[2H]`` bias, sliced by ``how``."""
    if how == "chunk":
        (wg, wu), (bg, bu) = w.chunk(2), b.chunk(2)
    elif how == "split":
        (wg, wu), (bg, bu) = w.split(H), b.split(H)
    elif how == "tensor_split":
        (wg, wu), (bg, bu) = w.tensor_split(2), b.tensor_split(2)
    elif how == "narrow":
        wg, wu, bg, bu = w.narrow(0, 0, H), w.narrow(0, H, H), b.narrow(0, 0, H), b.narrow(0, H, H)
    else:
        wg, wu, bg, bu = w[:H], w[H:, ...], b[:H], b[H:]
    return wg, wu, bg, bu


class GateUp(nn.Module):
    """``down(relu(gate h)) + down2(relu(up h))``, gate and up the halves of one ``nn.Linear``
    (``how`` slices them; ``None``: two layers ``gate``, ``up``, the reference)."""

    def __init__(self, how: str | None) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Linear(IN, D)
        if how is None:
            self.gate, self.up = nn.Linear(D, H), nn.Linear(D, H)
        else:
            self.gate_up = nn.Linear(D, 2 * H)
        self.down, self.down2 = nn.Linear(H, OUT), nn.Linear(H, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        if self.how is None:
            g, u = self.gate(h), self.up(h)
        else:
            wg, wu, bg, bu = fused_halves(self.gate_up.weight, self.gate_up.bias, self.how)
            g, u = F.linear(h, wg, bg), h @ wu.T + bu
        return self.down(F.relu(g)) + self.down2(F.relu(u))


class QKV(nn.Module):
    """One attention head whose query, key and value maps are thirds of one ``nn.Linear``
    (``fused``) or three layers ``q``, ``k``, ``v``."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.stem = nn.Linear(IN, D)
        if fused:
            self.qkv = nn.Linear(D, 3 * H)
        else:
            self.q, self.k, self.v = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(D, H)
        self.out = nn.Linear(H, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        if self.fused:
            w, b = self.qkv.weight, self.qkv.bias
            q, k = F.linear(h, w.chunk(3)[0], b[:H]), F.linear(h, w[H : 2 * H], b.narrow(0, H, H))
            v = F.linear(h, w.split(H)[2], b.tensor_split(3)[2])
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        return self.out(torch.softmax(q @ k.mT, -1) @ v)


ZEROED = {"setitem": [3], "fill": [2, 3], "index_fill": [1, 5], "index_put": [3]}
WIDE = 8  # the zeroed MLP's first hidden width


class Zeroed(nn.Module):
    """An MLP whose hidden activations are zeroed at fixed channels, written in place by
    ``how`` (``None``: multiplied by a constant 0/1 mask, the reference ``keep``)."""

    def __init__(self, how: str | None, keep: str = "setitem") -> None:
        super().__init__()
        self.how, self.keep = how, keep
        self.fc1, self.fc2, self.fc3 = nn.Linear(IN, WIDE), nn.Linear(WIDE, D), nn.Linear(D, OUT)

    def forward(self, x: Tensor) -> Tensor:
        if self.how is None:
            mask = torch.ones(WIDE, dtype=x.dtype)
            mask[ZEROED[self.keep]] = 0
            g = F.relu(self.fc2(F.relu(self.fc1(x)) * mask))
            return self.fc3(g * (torch.arange(D) >= 2).to(x.dtype))
        h = F.relu(self.fc1(x)).clone()
        if self.how == "setitem":
            h[:, 3] = 0
        elif self.how == "fill":
            h[:, 2:4].fill_(0)
        elif self.how == "index_fill":
            h = h.index_fill(1, torch.tensor([1, 5]), 0)
        else:
            h.index_put_(
                (torch.arange(h.shape[0]), torch.tensor(3)), torch.zeros((), dtype=h.dtype)
            )
        g = F.relu(self.fc2(h)).clone()
        g[..., :2] = 0
        return self.fc3(g)


class Experts(nn.Module):
    """Two experts on fixed halves of the tokens (even, odd), combined by ``how``
    (``index_put``: ``index_put_(..., accumulate=True)``, ``scatter``: ``scatter_reduce``
    ``"sum"``, ``None``: ``index_add_``, the reference), with a residual."""

    def __init__(self, how: str | None) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Linear(IN, D)
        self.up = nn.ModuleList(nn.Linear(D, H) for _ in range(2))
        self.dn = nn.ModuleList(nn.Linear(H, D) for _ in range(2))
        self.head = nn.Linear(D, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        out = torch.zeros_like(h)
        for e in range(2):
            idx = torch.arange(e, h.shape[0], 2)
            y = self.dn[e](F.relu(self.up[e](h[idx])))
            if self.how == "index_put":
                out.index_put_((idx,), y, accumulate=True)
            elif self.how == "scatter":
                out = out.scatter_reduce(0, idx[:, None].expand(-1, D), y, "sum")
            else:
                out.index_add_(0, idx, y)
        return self.head(F.relu(out + h))


class Norm(nn.Module):
    """A LayerNorm with affine gain, through ``torch.native_layer_norm`` (``native``) or the
    module, before an MLP."""

    def __init__(self, native: bool) -> None:
        super().__init__()
        self.native = native
        self.stem, self.ln = nn.Linear(IN, D), nn.LayerNorm(D)
        self.fc, self.head = nn.Linear(D, H), nn.Linear(H, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if self.native:
            y = torch.native_layer_norm(h, (D,), self.ln.weight, self.ln.bias, self.ln.eps)[0]
        else:
            y = self.ln(h)
        return self.head(F.relu(self.fc(y)))


class Gains(nn.Module):
    """Two gains on the same channels, stacked ``[2, D]`` and read by ``unbind`` or
    ``select`` (``how``), or two parameters ``g0``, ``g1`` (``None``)."""

    def __init__(self, how: str | None) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Linear(IN, D)
        if how is None:
            self.g0, self.g1 = nn.Parameter(torch.ones(D)), nn.Parameter(torch.ones(D))
        else:
            self.gains = nn.Parameter(torch.ones(2, D))
        self.fc, self.head = nn.Linear(D, H), nn.Linear(H, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        if self.how is None:
            g0, g1 = self.g0, self.g1
        elif self.how == "unbind":
            g0, g1 = self.gains.unbind()
        else:
            g0, g1 = self.gains.select(0, 0), self.gains.select(0, -1)
        a = self.head(F.relu(self.fc(h * g0)))
        return a + self.head(F.relu(self.fc(F.relu(h) * g1)))


class SharedSliced(nn.Module):
    """``shared`` read whole on ``h`` and its first rows on ``h2`` (``other``) or on ``h``."""

    def __init__(self, other: bool) -> None:
        super().__init__()
        self.other = other
        self.stem, self.stem2, self.shared = nn.Linear(IN, D), nn.Linear(IN, D), nn.Linear(D, D)
        self.head, self.head2 = nn.Linear(D, OUT), nn.Linear(OUT, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h2 = F.relu(self.stem2(x)) if self.other else h
        b = F.relu(F.linear(h2, self.shared.weight[:OUT]))
        return self.head(F.relu(self.shared(h))) + self.head2(b)


def _cat(*names: str) -> Callable[[dict], Tensor]:
    return lambda p: torch.cat([p[n] for n in names])


GATE_UP = {
    "gate_up.weight": _cat("gate.weight", "up.weight"),
    "gate_up.bias": _cat("gate.bias", "up.bias"),
}
QKV_MAP = {
    "qkv.weight": _cat("q.weight", "k.weight", "v.weight"),
    "qkv.bias": _cat("q.bias", "k.bias", "v.bias"),
}
GAINS = {"gains": lambda p: torch.stack([p["g0"], p["g1"]])}
# name -> (spelled factory, reference factory, spelled parameter -> from the reference's)
PAIRS: dict[str, tuple[Callable, Callable, dict]] = {
    **{f"gate_up_{h}": (lambda h=h: GateUp(h), lambda: GateUp(None), GATE_UP)
       for h in ("chunk", "split", "tensor_split", "narrow", "getitem")},
    "qkv": (lambda: QKV(True), lambda: QKV(False), QKV_MAP),
    **{f"zeroed_{h}": (lambda h=h: Zeroed(h), lambda h=h: Zeroed(None, h), {}) for h in ZEROED},
    **{f"experts_{h}": (lambda h=h: Experts(h), lambda: Experts(None), {})
       for h in ("index_put", "scatter")},
    "native_layer_norm": (lambda: Norm(True), lambda: Norm(False), {}),
    **{f"gains_{h}": (lambda h=h: Gains(h), lambda: Gains(None), GAINS)
       for h in ("unbind", "select")},
}  # fmt: skip
# Spelled models without a reference that spells none of them.
ALONE: dict[str, Callable] = {
    "shared_sliced": lambda: SharedSliced(False),
    "shared_sliced_other_input": lambda: SharedSliced(True),
}
EVERY = {**{name: spelled for name, (spelled, _, _) in PAIRS.items()}, **ALONE}


def inputs(name: str, batch: int = BATCH, seed: int = 0) -> Tensor:
    shape = (2, batch, IN) if name == "qkv" else (batch, IN)
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def spelled_params(name: str, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """The spelled model's parameters holding the reference's entries."""
    mapping = PAIRS[name][2]
    names = [k for k, _ in PAIRS[name][0]().named_parameters()]
    return {k: mapping[k](reference) if k in mapping else reference[k] for k in names}


def built(factory: Callable) -> nn.Module:
    torch.manual_seed(0)
    model = factory().to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


Structure = gaugefix.GaugeStructure


def pair(name: str) -> tuple[nn.Module, Structure, nn.Module, Structure]:
    """The spelled model and the reference at the same random point of their orbits, with
    their structures; the two compute the same function."""
    spelled_factory, reference_factory, _ = PAIRS[name]
    reference, spelled = built(reference_factory), built(spelled_factory)
    x = inputs(name)
    s_ref = gaugefix.discover(reference, x)
    gaugefix.random_gauge_(reference, s_ref, SCALE, torch.Generator().manual_seed(1))
    spelled.load_state_dict(spelled_params(name, params(reference)), strict=False)
    with torch.no_grad():
        assert rel_change(reference(x), spelled(x)) <= TOL
    s = gaugefix.discover(spelled, x)
    assert s.num_generators == s_ref.num_generators > 0, s.summary()
    return spelled, s, reference, s_ref


def mismatch(name: str, spelled: nn.Module, reference: nn.Module) -> float:
    """The largest relative difference of the spelled model's parameters from the reference's."""
    got, expected = params(spelled), spelled_params(name, params(reference))
    return max(rel_change(expected[k], got[k]) for k in got)


def trained(model: nn.Module, s: gaugefix.GaugeStructure, name: str, mode: str) -> None:
    """``STEPS`` steps of SGD with momentum under ``GaugeFixing`` in ``mode``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    hook = gaugefix.GaugeFixing(opt, model, s, STRENGTH, mode)
    for i in range(STEPS):
        opt.zero_grad()
        model(inputs(name, seed=100 + i)).square().mean().backward()
        opt.step()
    hook.remove()


def balanced_gpu_layout(model: nn.Module, s: gaugefix.GaugeStructure) -> None:
    with gpu_layout_on_cpu():
        gaugefix.balance_(model, s)


def activation(name: str) -> Callable:
    return lambda m, s: gaugefix.equalize_(m, s, "activation", calibration=inputs(name, seed=5))


ORBIT_CONSUMERS: dict[str, Callable] = {
    "balance": lambda m, s: gaugefix.balance_(m, s),
    "balance_gpu_layout": balanced_gpu_layout,
    "equalize_norm": lambda m, s: gaugefix.equalize_(m, s, "norm"),
    "equalize_range": lambda m, s: gaugefix.equalize_(m, s, "range"),
    "coordinates": lambda m, s: m.load_state_dict(
        gaugefix.gauge_coordinates(m, s, allow_dead=True).balanced
    ),
    "relax": lambda m, s: gaugefix.relax_(m, s, RELAX_RATE),
}
# The fused weights read through slices: tests/test_equalize_functional.py.
CALLED = [n for n in PAIRS if not n.startswith(("gate_up", "qkv"))]


@pytest.mark.parametrize("consumer", ORBIT_CONSUMERS)
@pytest.mark.parametrize("name", PAIRS)
def test_orbit_consumers_match_the_reference(name: str, consumer: str) -> None:
    spelled, s, reference, s_ref = pair(name)
    ORBIT_CONSUMERS[consumer](reference, s_ref)
    ORBIT_CONSUMERS[consumer](spelled, s)
    assert mismatch(name, spelled, reference) <= TOL


@pytest.mark.parametrize("name", CALLED)
def test_activation_equalization_matches_the_reference(name: str) -> None:
    spelled, s, reference, s_ref = pair(name)
    activation(name)(reference, s_ref)
    activation(name)(spelled, s)
    assert mismatch(name, spelled, reference) <= TOL


@pytest.mark.parametrize("mode", ["exact", "penalty"])
@pytest.mark.parametrize("name", PAIRS)
def test_training_with_gauge_fixing_matches_the_reference(name: str, mode: str) -> None:
    spelled, s, reference, s_ref = pair(name)
    trained(reference, s_ref, name, mode)
    trained(spelled, s, name, mode)
    assert mismatch(name, spelled, reference) <= TOL


@pytest.mark.parametrize("name", PAIRS)
def test_imbalance_and_summary_match_the_reference(name: str) -> None:
    spelled, s, reference, s_ref = pair(name)
    mu, mu_ref = (
        gaugefix.imbalance(params(spelled), s),
        gaugefix.imbalance(params(reference), s_ref),
    )
    assert rel_change(mu_ref.sort().values, mu.sort().values) <= TOL
    assert s.kind_counts() == s_ref.kind_counts()
    total = s.summary().splitlines()[-1].split(" over ")[0]
    assert total == s_ref.summary().splitlines()[-1].split(" over ")[0]
    gauged = sum(s._gauged_channels(n) for n in s.produced)
    assert gauged == sum(s_ref._gauged_channels(n) for n in s_ref.produced)
    assert "embedding" not in s.summary()


def outputs(model: nn.Module, name: str) -> list[Tensor]:
    with torch.no_grad():
        return [model(inputs(name, n, seed=n)) for n in OTHER_BATCHES]


def kept(model: nn.Module, name: str, before: list[Tensor]) -> float:
    return max(rel_change(b, a) for b, a in zip(before, outputs(model, name), strict=True))


def discovered(name: str) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    model = built(EVERY[name])
    return model, gaugefix.discover(model, inputs(name))


@pytest.mark.parametrize("name", EVERY)
def test_gauges_keep_outputs_in_both_layouts(name: str, tmp_path: Path) -> None:
    model, s = discovered(name)
    before = outputs(model, name)
    h = torch.randn(s.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model)
    gaugefix.apply_gauge_(cpu, s, h)
    with gpu_layout_on_cpu():
        gaugefix.apply_gauge_(gpu, s, h)
    assert kept(cpu, name, before) <= TOL
    assert max(rel_change(params(cpu)[k], v) for k, v in params(gpu).items()) <= TOL
    s.save(tmp_path / "structure.json")
    loaded = gaugefix.GaugeStructure.load(tmp_path / "structure.json")
    again = copy.deepcopy(model)
    gaugefix.apply_gauge_(again, loaded, h)
    assert all(torch.equal(v, params(cpu)[k]) for k, v in params(again).items())
    assert loaded.summary() == s.summary()
    assert gaugefix.verify(model, s, inputs(name, OTHER_BATCHES[1], seed=9)).ok


@pytest.mark.parametrize("name", EVERY)
def test_scale_groups_act_like_the_gauge(name: str) -> None:
    model, s = discovered(name)
    before = outputs(model, name)
    groups = s.scale_groups()
    gen = torch.Generator().manual_seed(2)
    for group in groups:
        tool, gauged = copy.deepcopy(model), copy.deepcopy(model)
        scales = torch.exp(torch.randn(len(group["generators"]), generator=gen, dtype=DTYPE))
        apply_like_a_tool(tool, group, scales)
        h = torch.zeros(s.num_generators, dtype=DTYPE)
        h[torch.tensor(group["generators"])] = -scales.log()
        gaugefix.apply_gauge_(gauged, s, h)
        assert kept(tool, name, before) <= TOL, group
        assert max(rel_change(params(gauged)[k], v) for k, v in params(tool).items()) <= TOL


def exponents(model: nn.Module, s: gaugefix.GaugeStructure) -> dict[str, Tensor]:
    """``w[name]`` ``[num_generators, *shape]``: each generator's exponent on each entry,
    read off ``apply_gauge_`` by a unit step of that generator alone (entries are non-zero)."""
    base, out = params(model), {k: [] for k in params(model)}
    for n in range(s.num_generators):
        moved = copy.deepcopy(model)
        gaugefix.apply_gauge_(moved, s, torch.eye(s.num_generators, dtype=DTYPE)[n])
        for k, v in params(moved).items():
            out[k].append((v / base[k]).log().round())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("name", EVERY)
def test_balanced_and_range_points_are_stationary(name: str) -> None:
    """After ``balance_``, ``mu_n = sum_e w_n(e) theta_e^2 = 0`` relative to the generator's
    mass; after ``equalize_(..., "range")``, for every generator the largest counted
    (non-bias) entry it multiplies equals the largest it divides: each entry once, however
    many slices read it."""
    model, s = discovered(name)
    gaugefix.random_gauge_(model, s, SCALE, torch.Generator().manual_seed(7))
    w = exponents(model, s)
    balanced = copy.deepcopy(model)
    gaugefix.balance_(balanced, s)
    p = params(balanced)
    mu = sum((w[k] * p[k].square()).flatten(1).sum(1) for k in p)
    mass = sum((w[k].abs() * p[k].square()).flatten(1).sum(1) for k in p)
    assert float((mu.abs() / mass).max()) <= TOL
    gaugefix.equalize_(model, s, "range")
    p = {k: v.abs() for k, v in params(model).items() if not k.endswith("bias")}
    up = torch.stack([torch.stack([(v * (w[k][n] > 0)).max() for k, v in p.items()]).max()
                      for n in range(s.num_generators)])  # fmt: skip
    down = torch.stack([torch.stack([(v * (w[k][n] < 0)).max() for k, v in p.items()]).max()
                        for n in range(s.num_generators)])  # fmt: skip
    assert bool((up > 0).all() & (down > 0).all())
    assert float((up / down).log().abs().max()) <= TOL


def test_activation_calibrates_channels_read_only_through_slices() -> None:
    """A fused weight read through ``F.linear`` and a matrix product on its slices is no call
    of its layer, yet the calibration pass sees the slices' input: the channels it reads
    (``stem``'s) meet SmoothQuant's ``alpha log A_j = (1 - alpha) log B_j`` with ``A_j`` the
    largest ``|x_j|`` of that input and ``B_j`` the largest entry of the fused columns."""
    name = "gate_up_chunk"
    model, s = discovered(name)
    gaugefix.random_gauge_(model, s, SCALE, torch.Generator().manual_seed(7))
    activation(name)(model, s)
    with torch.no_grad():
        read = F.relu(model.stem(inputs(name, seed=5)))
    a, b = read.abs().amax(0).log(), model.gate_up.weight.detach().abs().amax(0).log()
    assert float((a - b).abs().max()) <= TOL
    assert set(s.generator_layers) == {"stem", "gate_up"}
