"""Models whose weights are computed from parameters (``torch.nn.utils.parametrize``, weight and
spectral normalisation, orthogonal maps, pruning masks, LoRA adapters).

A generator found on such a model must be an exact symmetry of its function, and the gauge
actions (``apply_gauge_``, ``balance_``, ``GaugeFixing``) must act on the parameters themselves
(a parametrization's ``original``), never on a computed weight. Weight normalisation
``g v / ||v||`` is ``g`` broadcast times a tensor set by ``v`` alone: the generators act on the
gains ``g`` (one factor per gain) and never move ``v``. A weight computed by another map that is
not a relabelling of one parameter's entries (a norm, an exponential, a sum of two parameters, a
mask) makes its layer's channels excluded, with the reason recorded.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import gaugefix as gf

D = torch.float64
TOL = 1e-10
BATCHES = (3, 7)
NOT_A_PARAMETER = "weight is not a parameter of the model"


class MLP(nn.Module):
    """4 -> 6 -> 6 -> 3 ReLU MLP, optionally with a residual sum around the second layer."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.residual = residual

    def forward(self, x):
        h = F.relu(self.l1(x))
        g = F.relu(self.l2(h))
        return self.l3(g + h if self.residual else g)


class CNN(nn.Module):
    """Two 3x3 convs with a residual sum, flattened into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Conv2d(2, 4, 3, padding=1)
        self.l2 = nn.Conv2d(4, 4, 3, padding=1)
        self.l3 = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = F.relu(self.l1(x))
        return self.l3((F.relu(self.l2(h)) + h).flatten(1))


class CNN1d(nn.Module):
    """Two length-preserving 1-d convs (2 -> 4 -> 5 channels), flattened into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Conv1d(2, 4, 3, padding=1)
        self.l2 = nn.Conv1d(4, 5, 3, padding=1)
        self.l3 = nn.Linear(5 * 5, 3)

    def forward(self, x):
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))).flatten(1))


class Map(nn.Module):
    """A parametrization given by a function of the original tensor."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class MergedLoRA(nn.Module):
    """The parametrization ``W -> W + B @ A`` (a merged low-rank adapter)."""

    def __init__(self, rows: int, cols: int, rank: int = 2) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, cols, dtype=D))
        self.B = nn.Parameter(torch.randn(rows, rank, dtype=D))

    def forward(self, w):
        return w + self.B @ self.A


class LoRALinear(nn.Module):
    """``x W^T + b + (x A^T) B^T``: a linear layer with a low-rank adapter of its own."""

    def __init__(self, base: nn.Linear, rank: int = 2, merged: bool = False) -> None:
        super().__init__()
        self.base, self.merged = base, merged
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=D))
        self.B = nn.Parameter(torch.randn(base.out_features, rank, dtype=D))

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.base.weight + self.B @ self.A, self.base.bias)
        return self.base(x) + (x @ self.A.T) @ self.B.T


BASES = {"mlp": MLP, "residual": lambda: MLP(residual=True), "cnn": CNN, "cnn1d": CNN1d}
PLAIN_GENERATORS = {"mlp": 12, "residual": 6, "cnn": 4, "cnn1d": 9}

# weight -> f(weight) that relabels the entries of one parameter (scaled by a number): every
# rescaling of the original is the same rescaling of the computed weight
RELABELLINGS = {
    "times_two": lambda w: w * 2,
    "clone": lambda w: w.clone(),
    "double_transpose": lambda w: w.transpose(0, 1).contiguous().transpose(0, 1),
    "rows_rolled": lambda w: w.roll(1, 0),
}
# weight -> f(weight) where the arrangement or the mask depends on the weight's values: a
# rescaling of the original can change which entry lands where, so it is not a symmetry
VALUE_ARRANGED = {
    "rows_sorted_by_value": lambda w: w[w[:, 0].argsort()],
    "magnitude_mask": lambda w: w * (w.abs() > 0.1),
}


def _register(layer: nn.Module, kind: str) -> None:
    """Put the parametrization ``kind`` on ``layer``'s weight."""
    if kind in RELABELLINGS or kind in VALUE_ARRANGED:
        fn = RELABELLINGS.get(kind) or VALUE_ARRANGED[kind]
        parametrize.register_parametrization(layer, "weight", Map(fn))
    elif kind.startswith("weight_norm"):
        _weight_normed(layer, kind)
    elif kind == "spectral_norm":
        spectral_norm(layer)
    elif kind == "orthogonal":
        orthogonal(layer)
    elif kind == "exp":
        with torch.no_grad():
            layer.weight.abs_().add_(0.1).log_()
        parametrize.register_parametrization(layer, "weight", Map(torch.exp))
    elif kind == "softplus":
        parametrize.register_parametrization(layer, "weight", Map(F.softplus))
    elif kind == "merged_lora":
        rows, cols = layer.weight.shape
        parametrize.register_parametrization(layer, "weight", MergedLoRA(rows, cols))
    elif kind == "pruned":
        prune.random_unstructured(layer, "weight", amount=0.3)
    else:
        raise AssertionError(kind)


def _weight_normed(layer: nn.Module, kind: str) -> None:
    """``weight_norm`` (the parametrization) or ``weight_norm_hook`` (the deprecated hook) on
    ``layer``, over ``dim`` 0 or the dim the suffix names (``_dim1``, ``_dimNone``...)."""
    name, _, dim = kind.partition("_dim")
    dim = 0 if not dim else None if dim == "None" else int(dim)
    if name == "weight_norm":
        weight_norm(layer, dim=dim)
        return
    assert name == "weight_norm_hook", kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(layer, dim=dim)


def _build(base: str, kind: str | None, layers: tuple[int, ...], seed: int = 0) -> nn.Module:
    """The same model for the same arguments (built from ``seed``), with ``kind`` on the weights
    of ``layers`` (indices into l1, l2, l3)."""
    torch.manual_seed(seed)
    model = BASES[base]().to(D)
    for i in layers:
        _register((model.l1, model.l2, model.l3)[i], kind)
    return model


def _input(base: str, batch: int) -> torch.Tensor:
    shape = {"cnn": (batch, 2, 5, 5), "cnn1d": (batch, 2, 5)}.get(base, (batch, 4))
    return torch.randn(shape, dtype=D)


def _largest_relative_change(moved: nn.Module, ref: nn.Module, inputs: list) -> float:
    """max over inputs of ``max|moved(x) - ref(x)| / max|ref(x)|``; the two models run the same
    sequence of forwards (a forward in training mode may update buffers, as spectral_norm's)."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            a, b = moved(x), ref(x)
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return worst


def _moved_by(action: str, model: nn.Module, structure, h: torch.Tensor) -> None:
    """Apply ``g(h)`` to ``model``, then (``balance``, ``exact``) gauge-fix it."""
    gf.apply_gauge_(model, structure, h)
    if action == "balance":
        assert gf.balance_(model, structure).converged
    elif action == "exact":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        gf.GaugeFixing(opt, model, structure, strength=1.0, balance_at_start=True)
        for _ in range(3):
            opt.step()


def _check_exact(base: str, kind: str | None, layers: tuple[int, ...], train: bool) -> object:
    """Discover on the model, move it by a random gauge and each gauge fixing, and check the
    function (two batch sizes) is unchanged to ``TOL`` and that only bound parameters moved."""
    model = _build(base, kind, layers).train(train)
    inputs = [_input(base, b) for b in BATCHES]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = gf.discover(model, inputs[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    bound = set(structure.bind(model))
    assert bound <= {n for n, _ in model.named_parameters()}
    for action in ("apply", "balance", "exact"):
        seeded = torch.Generator().manual_seed(1)
        h = torch.randn(structure.num_generators, dtype=D, generator=seeded)
        moved = _build(base, kind, layers).train(train)
        ref = _build(base, kind, layers).train(train)
        _moved_by(action, moved, structure, h)
        assert _largest_relative_change(moved, ref, inputs) <= TOL, (base, kind, layers, action)
        originals = dict(ref.named_parameters())
        changed = {n for n, p in moved.named_parameters() if not torch.equal(p, originals[n])}
        assert changed <= bound
        assert changed or structure.num_generators == 0
    return structure


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("kind", list(RELABELLINGS))
def test_relabelling_parametrization_keeps_every_generator_and_moves_the_original(
    kind, base, train
):
    """A parametrization that only relabels (and scales by a number) one parameter's entries
    keeps the plain model's generators; they act on ``parametrizations.weight.original``."""
    layers = (0, 1, 2)
    structure = _check_exact(base, kind, layers, train)
    assert structure.num_generators == PLAIN_GENERATORS[base]
    bound = set(structure.bind(_build(base, kind, layers)))
    assert {f"l{i + 1}.parametrizations.weight.original" for i in layers} <= bound
    assert not {f"l{i + 1}.weight" for i in layers} & bound


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "kind",
    ["spectral_norm", "orthogonal", "exp", "softplus", "pruned", *VALUE_ARRANGED,
     "weight_norm_dim-2"],
)  # fmt: skip
def test_computed_weight_excludes_its_layer_and_keeps_the_rest_exact(kind, train):
    """A weight computed by a map that is not a fixed relabelling (a norm, exp, a sum with a
    product of two parameters, a mask, an order read from the values) fixes its layer: the
    channels it produces and consumes are excluded with the reason recorded, no parameter of it
    is moved, and the generators of the other layers stay exact (first layer: those between l2
    and l3; last: between l1 and l2)."""
    for layer, kept in ((0, "l2"), (2, "l1")):
        structure = _check_exact("mlp", kind, (layer,), train)
        assert structure.num_generators == 6
        bound = set(structure.bind(_build("mlp", kind, (layer,))))
        assert not any(n.startswith(f"l{layer + 1}.") for n in bound)
        assert f"{kept}.weight" in bound
    structure = _check_exact("mlp", kind, (1,), train)  # the middle layer: nothing is left
    assert structure.num_generators == 0
    reasons = [e.reason for e in structure.excluded]
    assert any(NOT_A_PARAMETER in r or "'l2.parametrizations.weight" in r for r in reasons)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_merged_lora_parametrization_keeps_only_its_rank_channels(train):
    """``W -> W + B @ A`` is a computed weight: its layer's channels are excluded as above, but
    ``B @ A`` is invariant under its 2 rank channels (column ``k`` of ``B`` and row ``k`` of
    ``A`` scaled oppositely), which stay generators; the original weight never moves."""
    for layer, kept in ((0, 6), (1, 0), (2, 6)):
        structure = _check_exact("mlp", "merged_lora", (layer,), train)
        assert structure.num_generators == kept + 2
        bound = set(structure.bind(_build("mlp", "merged_lora", (layer,))))
        prefix = f"l{layer + 1}.parametrizations.weight.0"
        assert {n for n in bound if n.startswith(f"l{layer + 1}.")} == {
            f"{prefix}.A", f"{prefix}.B"}  # fmt: skip


@pytest.mark.parametrize("base", ["residual", "cnn"])
@pytest.mark.parametrize("kind", ["spectral_norm", "exp"])
def test_computed_weight_on_a_residual_stream_blocks_the_whole_stream(kind, base):
    """In a residual sum every channel of the stream is one generator: a computed weight on any
    layer that reads or writes it removes it (never wrong, sometimes incomplete)."""
    for layers in ((0,), (1,), (2,)):
        for train in (True, False):
            assert _check_exact(base, kind, layers, train).num_generators == 0


# (base, dim) -> generators with weight_norm over ``dim`` on l1, l2, l3 (None: not a dim of l3's
# weight). A gain per slice along ``dim`` carries the factor of the channel (row or column) that
# slice is; a gain over several rows (columns) unites their factors, so the channels produced
# (consumed) there form one generator: all of them rescaled together, the gains divided.
WEIGHT_NORM_GENERATORS = {
    ("mlp", 0): (12, 7, 7), ("mlp", 1): (7, 7, 12), ("mlp", None): (7, 2, 7),
    ("residual", 0): (6, 1, 1), ("residual", None): (1, 1, 1),
    ("cnn", 0): (4, 1, 1), ("cnn", 2): (1, 1, None),
    ("cnn1d", 0): (9, 6, 5), ("cnn1d", 1): (6, 5, 9), ("cnn1d", None): (6, 2, 5),
}  # fmt: skip


def _weight_norm_names(kind: str, layer: int) -> tuple[str, str]:
    """The names of the gain ``g`` and the direction ``v`` of ``l{layer + 1}``'s weight norm."""
    if kind.startswith("weight_norm_hook"):
        return f"l{layer + 1}.weight_g", f"l{layer + 1}.weight_v"
    prefix = f"l{layer + 1}.parametrizations.weight"
    return f"{prefix}.original0", f"{prefix}.original1"


@pytest.mark.parametrize(
    "hook, train",
    [(False, True), (False, False), (True, False)],
    ids=["parametrization-train", "parametrization-eval", "hook-eval"],
)
@pytest.mark.parametrize("base, dim", list(WEIGHT_NORM_GENERATORS))
def test_weight_norm_gains_carry_exact_generators_and_the_direction_never_moves(
    base, dim, hook, train
):
    """``w = g v / ||v||``: the gains ``g`` carry the factors of the rows (``dim=0``), columns
    (``dim=1``), kernel slices or whole weight (``dim=None``) they multiply; every generator is
    exact under ``apply_gauge_``, ``balance_`` and ``GaugeFixing`` (two batch sizes), ``g``
    moves (unless its layer reads and writes one residual stream: the stream's generator
    leaves it invariant) and ``v`` is fixed, with the reason recorded."""
    kind = ("weight_norm_hook" if hook else "weight_norm") + ("" if dim == 0 else f"_dim{dim}")
    for layer, expected in enumerate(WEIGHT_NORM_GENERATORS[base, dim]):
        if expected is None:
            continue
        structure = _check_exact(base, kind, (layer,), train)
        assert structure.num_generators == expected, (kind, layer)
        g, v = _weight_norm_names(kind, layer)
        bound = structure.bind(_build(base, kind, (layer,)))
        # a layer reading and writing one residual stream: its gains carry s - s = 0
        assert (g in bound) == (base not in ("residual", "cnn") or layer != 1)
        assert v not in bound
        assert any("direction of a weight norm" in e.reason and v in e.reason
                   for e in structure.excluded)  # fmt: skip
        saved = gf.GaugeStructure.from_dict(structure.to_dict())  # one channel entry per gain
        assert saved.num_generators == expected and saved.params.keys() == bound.keys()


@pytest.mark.parametrize("kind", ["weight_norm", "weight_norm_hook"])
def test_weight_norm_moves_the_gains_the_bias_and_the_next_layer(kind):
    """The per-row generators of a weight-normalised middle layer rescale ``g``'s rows and the
    bias, and divide the next layer's columns; the layer before is rescaled as a whole (its
    channels meet ``v``'s rows, which one norm divides); ``v`` never moves."""
    model = _build("mlp", kind, (1,))
    structure = gf.discover(model, _input("mlp", 3))
    g, v = _weight_norm_names(kind, 1)
    moved = _build("mlp", kind, (1,))
    gf.apply_gauge_(moved, structure, torch.randn(structure.num_generators, dtype=D))
    before, after = dict(model.named_parameters()), dict(moved.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"l1.weight", "l1.bias", g, "l2.bias", "l3.weight"}
    ratio = after[g] / before[g]  # one factor per row: distinct rows move differently
    assert ratio.shape == (6, 1) and ratio.unique().numel() == 6
    assert torch.equal(after[v], before[v])


class TransposedNet(nn.Module):
    """A transposed convolution (2 -> 3 channels, weight ``[in, out, *kernel]``), a ReLU and a
    plain convolution back to 2 channels, in 1 or 2 spatial dims."""

    def __init__(self, spatial: int) -> None:
        super().__init__()
        up, conv = (
            (nn.ConvTranspose1d, nn.Conv1d) if spatial == 1 else (nn.ConvTranspose2d, nn.Conv2d)
        )
        self.up, self.out = up(2, 3, 3), conv(3, 2, 3)

    def forward(self, x):
        return self.out(F.relu(self.up(x)))


def _transposed_net(spatial: int, kind: str | None) -> nn.Module:
    """The same :class:`TransposedNet` on every call, weight-normalised as ``kind`` says."""
    torch.manual_seed(0)
    model = TransposedNet(spatial).to(D)
    if kind is not None:
        _weight_normed(model.up, kind)
    return model


@pytest.mark.parametrize("kind", [None, "weight_norm_dim1", "weight_norm_hook_dim1"])
@pytest.mark.parametrize("spatial", [1, 2])
def test_transposed_convolution_names_the_layer_of_every_generator(spatial, kind):
    """A transposed convolution produces along dim 1 of its weight, where ``weight_norm(dim=1)``
    puts its gains: each of the 3 output channels is one exact generator, produced by the layer
    (by the parametrized weight's module for the parametrization), named in the summary."""
    model, moved = _transposed_net(spatial, kind), _transposed_net(spatial, kind)
    inputs = [torch.randn(b, 2, *([5] * spatial), dtype=D) for b in BATCHES]
    structure = gf.discover(model, inputs[0])
    layer = "up.parametrizations.weight" if kind == "weight_norm_dim1" else "up"
    assert structure.num_generators == 3
    assert structure.generator_layers == [layer] * 3
    row = next(r for r in structure.summary().splitlines() if r.startswith(layer + " "))
    assert row.split()[1:3] == ["3", "3"]  # channels, generators
    gf.apply_gauge_(moved, structure, torch.randn(3, dtype=D))
    assert _largest_relative_change(moved, model, inputs) <= TOL
    saved = gf.GaugeStructure.from_dict(structure.to_dict())
    assert saved.generator_layers == structure.generator_layers


class DirectWeightNorm(nn.Module):
    """``F.linear(x, torch._weight_norm(v, g, dim))`` with ``g`` of the given shape between two
    ReLU layers."""

    def __init__(self, g_shape: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.l1, self.l3, self.dim = nn.Linear(4, 6), nn.Linear(6, 3), dim
        self.v = nn.Parameter(torch.randn(6, 6))
        self.g = nn.Parameter(torch.rand(g_shape) + 0.5)

    def forward(self, x):
        w = torch._weight_norm(self.v, self.g, self.dim)
        return self.l3(F.relu(F.linear(F.relu(self.l1(x)), w)))


@pytest.mark.parametrize(
    "g_shape, dim, expected",
    [((6, 1), 0, 7), ((1, 6), 1, 7), ((), -1, 2), ((1, 1), -1, 2), ((6,), 0, 0),
     ((6, 1), -2, 0), ((6, 6), 0, 0)],
    ids=["rows", "columns", "whole", "whole 2-d", "1-d gain", "dim -2", "full gain"],
)  # fmt: skip
def test_weight_norm_called_directly_keeps_only_the_forms_it_reads(g_shape, dim, expected):
    """``torch._weight_norm`` with a gain of the shape its dim gives (one gain per slice, or one
    number for ``dim=-1``) carries generators; a gain of another shape, or a negative dim other
    than -1, is excluded with the reason recorded, and what is found stays exact."""
    torch.manual_seed(0)
    model = DirectWeightNorm(g_shape, dim).to(D)
    inputs = [_input("mlp", b) for b in BATCHES]
    structure = gf.discover(model, inputs[0])
    assert structure.num_generators == expected
    if expected == 0:
        assert any("weight norm of another form" in e.reason for e in structure.excluded)
        return
    moved = copy.deepcopy(model)
    gf.apply_gauge_(moved, structure, torch.randn(structure.num_generators, dtype=D))
    assert not torch.equal(moved.g, model.g) and torch.equal(moved.v, model.v)
    assert _largest_relative_change(moved, model, inputs) <= TOL


def test_spectral_norm_in_training_mode_keeps_its_power_iteration_state():
    """Discovery runs the forward once; spectral_norm's power iteration updates ``u`` and ``v``
    in training mode, and discovery restores them, so the model is unchanged."""
    model = _build("mlp", "spectral_norm", (0,)).train()
    u = model.l1.parametrizations.weight[0]._u.clone()
    gf.discover(model, _input("mlp", 3))
    assert torch.equal(model.l1.parametrizations.weight[0]._u, u)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lora_adapter_of_its_own_adds_exact_rank_generators(train):
    """``x W^T + b + (x A^T) B^T`` keeps the neuron generators on both sides of the adapted
    layer and adds one per rank dimension (``B``'s column times ``a``, ``A``'s row over ``a``);
    every one is exact, and ``A`` and ``B`` move."""
    torch.manual_seed(0)
    model = MLP().to(D)
    model.l2 = LoRALinear(model.l2)
    model.train(train)
    inputs = [_input("mlp", b) for b in BATCHES]
    structure = gf.discover(model, inputs[0])
    assert structure.num_generators == 12 + 2
    assert {"l2.A", "l2.B", "l2.base.weight"} <= set(structure.bind(model))
    h = torch.randn(structure.num_generators, dtype=D)
    moved = copy.deepcopy(model)
    gf.apply_gauge_(moved, structure, h)
    assert not torch.equal(moved.l2.A, model.l2.A)
    assert _largest_relative_change(moved, model, inputs) <= TOL
    gf.balance_(moved, structure)
    assert _largest_relative_change(moved, model, inputs) <= TOL
    assert gf.imbalance(moved, structure).abs().max() <= 1e-8


def test_merged_lora_in_the_forward_excludes_the_adapted_layer():
    """``F.linear(x, W + B @ A)``: the weight is a sum with a product of two parameters, so the
    adapted layer's channels (and those it reads) are excluded with the reason recorded; the
    2 rank channels of ``B @ A`` stay."""
    torch.manual_seed(0)
    model = MLP().to(D)
    model.l2 = LoRALinear(model.l2, merged=True)
    structure = gf.discover(model, _input("mlp", 3))
    assert structure.num_generators == 2
    assert set(structure.bind(model)) == {"l2.A", "l2.B"}
    assert any(NOT_A_PARAMETER in e.reason for e in structure.excluded)
    moved = copy.deepcopy(model)
    gf.random_gauge_(moved, structure, 2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(moved.l2.A, model.l2.A)
    assert _largest_relative_change(moved, model, [_input("mlp", b) for b in BATCHES]) <= TOL
