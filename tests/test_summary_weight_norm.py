"""The summary's count of a weight norm's direction ``v`` in ``w = g v / ||v||``: ``v`` is fixed
(its scale is divided out) and listed in ``excluded``, but the layer's output channels are
produced by the gain ``g``. Where the gain generates them, no channel is lost; where the gain's
channels are lost (the model's output, a restriction), they are counted once, as the gain's;
where the gain produces nothing (it is fixed), the direction's rows are lost."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import gaugefix as gf
from gaugefix import GaugeStructure

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
TOL = 1e-10
IN, OUT, LAST = 2, 3, 2  # the channels read, produced by the normed layer, and of the output
DIRECTION = "direction of a weight norm (its scale is divided out)"
LAYERS = {
    "linear": (nn.Linear, {}, (IN,)),
    "conv": (nn.Conv2d, {"kernel_size": 3}, (IN, 6, 6)),
    "transposed": (nn.ConvTranspose2d, {"kernel_size": 3}, (IN, 4, 4)),
}
# generators of the normed layer when it is hidden: per output channel for the gains per
# output channel (dim 0, or dim 1 of a transposed convolution's [in, out, ...] weight), else one
PER_CHANNEL = {("linear", 0), ("conv", 0), ("transposed", 1)}


def _normed(module: nn.Module, dim: int | None, hook: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return (nn.utils.weight_norm if hook else weight_norm)(module, dim=dim)


def _net(kind: str, dim: int | None, hook: bool, last: bool) -> nn.Sequential:
    """``IN -> OUT -> LAST`` with a ReLU, the weight norm on the first layer (``last``: on the
    second, the model's output)."""
    torch.manual_seed(0)
    layer, sizes, _ = LAYERS[kind]
    first, second = layer(IN, OUT, **sizes), layer(OUT, LAST, **sizes)
    if last:
        second = _normed(second, dim, hook)
    else:
        first = _normed(first, dim, hook)
    return nn.Sequential(first, nn.ReLU(), second).to(D)


def _name(index: int, hook: bool) -> str:
    return str(index) if hook else f"{index}.parametrizations.weight"


def _lines(structure: GaugeStructure) -> tuple[dict[str, list[str]], str]:
    """Per layer its row split into channels, generators and notes; and the total line."""
    lines = structure.summary().splitlines()
    end = lines.index(lines[1], 2)
    rows = {r.split()[0]: r.split(None, 3)[1:] for r in lines[2:end]}
    return rows, lines[end + 1]


def _round_trips(structure: GaugeStructure, tmp_path) -> None:
    path = tmp_path / "s.json"
    structure.save(path)
    for again in (
        GaugeStructure.load(path),
        GaugeStructure.from_dict(structure.to_dict()),
        pickle.loads(pickle.dumps(structure)),
    ):
        assert again.summary() == structure.summary()


DIMS = pytest.mark.parametrize("dim", [0, 1, None])
HOOKS = pytest.mark.parametrize("hook", [False, True], ids=["parametrization", "hook"])
KINDS = pytest.mark.parametrize("kind", sorted(LAYERS))


@KINDS
@DIMS
@HOOKS
def test_a_hidden_weight_normed_layer_loses_no_channel(kind, dim, hook, tmp_path):
    """Before, the direction's rows (``OUT``, or ``IN`` for a transposed convolution, whose
    weight is ``[in, out, ...]``) were counted: ``5`` or ``4`` producing channels excluded
    where only the model's ``LAST`` output channels are lost."""
    model, moved = _net(kind, dim, hook, False), _net(kind, dim, hook, False)
    inputs = [torch.randn(b, *LAYERS[kind][2], dtype=D) for b in (2, 5)]
    structure = gf.discover(model, inputs[0])
    rows, total = _lines(structure)
    v_rows = IN if kind == "transposed" else OUT
    generators = OUT if (kind, dim) in PER_CHANNEL else 1
    channels, gens, note = rows[_name(0, hook)]
    assert (int(channels), int(gens)) == (OUT, generators)
    assert note.startswith(f"{v_rows} generated through the gain: {DIRECTION}")
    assert "excluded" not in note
    assert total.endswith(f"; {LAST} producing channels excluded")
    assert repr(structure).endswith(f"excluded={LAST} channels)")
    _round_trips(structure, tmp_path)
    # the channels are generated: a random gauge moves the gains and keeps the function
    gf.apply_gauge_(moved, structure, 2 * torch.rand(structure.num_generators, dtype=D))
    with torch.no_grad():
        for x in inputs:
            assert (moved(x) - model(x)).abs().max() <= TOL * model(x).abs().max()
    gain = [n for n in structure.produced if n.startswith(_name(0, hook) + ".")]
    params, moved_params = dict(model.named_parameters()), dict(moved.named_parameters())
    assert len(gain) == 1 and not torch.equal(params[gain[0]], moved_params[gain[0]])


@KINDS
@DIMS
@HOOKS
def test_a_weight_normed_output_layer_counts_its_channels_once(kind, dim, hook, tmp_path):
    """The output layer's ``LAST`` channels are lost and counted once, as the gain's (model
    output). Before, the direction's rows were counted again, and gains per column or for the
    whole weight counted the gains, not the channels: 3 to 6 producing channels excluded."""
    model = _net(kind, dim, hook, True)
    structure = gf.discover(model, torch.randn(2, *LAYERS[kind][2], dtype=D))
    rows, total = _lines(structure)
    v_rows = OUT if kind == "transposed" else LAST
    channels, gens, note = rows[_name(2, hook)]
    assert (int(channels), int(gens)) == (0, 0)
    assert f"{LAST} excluded: model output" in note
    assert f"{v_rows} counted with the gain's channels: {DIRECTION}" in note
    assert "generated through the gain" not in note
    assert total.endswith(f"; {LAST} producing channels excluded")
    _round_trips(structure, tmp_path)


@DIMS
@HOOKS
def test_a_frozen_gain_loses_its_layers_channels(dim, hook, tmp_path):
    """The gain's generators dropped (``restrict``, e.g. a frozen gain): the layer's ``OUT``
    channels are lost, counted once. Before: the direction's rows counted again, and gains per
    column or for the whole weight counted the gains (``IN`` or 1), not the layer's channels:
    8, 7 and 6 producing channels excluded for dims 0, 1, None, where 5 are lost."""
    structure = gf.discover(_net("linear", dim, hook, False), torch.randn(2, IN, dtype=D))
    gain = next(i for n, i in structure.produced.items() if n.startswith(_name(0, hook) + "."))
    keep = torch.ones(structure.num_generators, dtype=torch.bool)
    keep[gain] = False
    frozen = structure.restrict(keep, "frozen")
    rows, total = _lines(frozen)
    channels, gens, note = rows[_name(0, hook)]
    assert (int(channels), int(gens)) == (0, 0)
    assert f"{OUT} excluded: frozen" in note
    assert f"{OUT} counted with the gain's channels: {DIRECTION}" in note
    assert total.endswith(f"; {OUT + LAST} producing channels excluded")
    _round_trips(frozen, tmp_path)


class _TanhWeight(nn.Module):
    """A weight-normed layer whose weight goes through ``tanh``: its gain is fixed too."""

    def __init__(self, dim: int | None) -> None:
        super().__init__()
        self.a, self.b = weight_norm(nn.Linear(IN, OUT), dim=dim), nn.Linear(OUT, LAST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(F.linear(x, torch.tanh(self.a.weight), self.a.bias)))


@DIMS
def test_a_fixed_gain_leaves_the_direction_excluded(dim, tmp_path):
    """No parameter of the normed module produces a channel: the direction's rows are lost and
    counted with every other exclusion."""
    structure = gf.discover(_TanhWeight(dim).to(D), torch.randn(2, IN, dtype=D))
    assert structure.num_generators == 0
    rows, total = _lines(structure)
    assert f"{OUT} excluded: {DIRECTION}" in rows["a.parametrizations.weight"][2]
    lost = sum(len(e.channels) for e in structure.excluded)
    assert total.endswith(f"; {lost} producing channels excluded")
    _round_trips(structure, tmp_path)
