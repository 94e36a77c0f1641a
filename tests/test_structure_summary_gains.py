"""The summary's channels of a layer under a weight norm: the output channels it produces that
belong to generators. Gains per row (``dim=0``) give each output channel its own generator;
gains per column (``dim=1``) or one for the whole weight (``dim=None``) scale every output
channel together, so all of them carry the gains' one generator, whatever the number of gains.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import gaugefix as gf
from gaugefix import GaugeStructure

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
TOL = 1e-10
OUT = 3  # the output channels of the weight-normed layer (4 inputs, so 4 gains per column)
BATCHES = (2, 5)


def _net(conv: bool, dim: int | None, hook: bool) -> nn.Sequential:
    """4 -> 4 -> OUT -> 2 with ReLUs (``Conv2d`` or ``Linear``), the middle layer's weight
    normalised over ``dim`` (the parametrization, or the deprecated hook)."""
    torch.manual_seed(0)
    layer = nn.Conv2d if conv else nn.Linear
    sizes = {"kernel_size": 3} if conv else {}
    model = nn.Sequential(
        layer(2, 4, **sizes), nn.ReLU(), layer(4, OUT, **sizes), nn.ReLU(), layer(OUT, 2, **sizes)
    ).to(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (torch.nn.utils.weight_norm if hook else weight_norm)(model[2], dim=dim)
    return model


def _row(structure: GaugeStructure, layer: str) -> list[str]:
    """The channels and generators the summary gives ``layer``."""
    return next(r for r in structure.summary().splitlines() if r.startswith(layer + " ")).split()


@pytest.mark.parametrize("hook", [False, True], ids=["parametrization", "hook"])
@pytest.mark.parametrize("dim, generators", [(0, OUT), (1, 1), (None, 1)])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_a_weight_normed_layer_counts_its_output_channels(conv, dim, generators, hook, tmp_path):
    """Before, the summary counted a produced table that lists the gains: 4 (the columns)
    for ``dim=1`` and 1 for ``dim=None``, where the layer has 3 output channels."""
    model, moved = _net(conv, dim, hook), _net(conv, dim, hook)
    shape = (2, 10, 10) if conv else (2,)
    inputs = [torch.randn(b, *shape, dtype=D) for b in BATCHES]
    structure = gf.discover(model, inputs[0])
    layer = "2" if hook else "2.parametrizations.weight"
    assert _row(structure, layer)[1:3] == [str(OUT), str(generators)]
    path = tmp_path / "s.json"
    structure.save(path)
    for again in (GaugeStructure.load(path), pickle.loads(pickle.dumps(structure))):
        assert again.summary() == structure.summary()
    gf.apply_gauge_(moved, structure, 2 * torch.rand(structure.num_generators, dtype=D))
    with torch.no_grad():
        for x in inputs:
            assert (moved(x) - model(x)).abs().max() <= TOL * model(x).abs().max()
    pairs = zip(moved.parameters(), model.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)  # the gauge moved some parameter


def test_a_gain_whose_generator_is_dropped_counts_no_channel():
    structure = gf.discover(_net(False, 1, False), torch.randn(2, 2, dtype=D))
    name = "2.parametrizations.weight"
    gain = int(structure.produced[f"{name}.original0"][0])
    keep = torch.ones(structure.num_generators, dtype=torch.bool)
    keep[gain] = False
    assert _row(structure.restrict(keep, "dropped"), name)[1:3] == ["0", "0"]


def test_gain_channels_must_name_produced_parameters():
    data = gf.discover(_net(False, 1, False), torch.randn(2, 2, dtype=D)).to_dict()
    assert data["gain_channels"] == {"2.parametrizations.weight.original0": OUT}
    for bad, message in (
        ({"0.weight": -1}, "non-negative integer"),
        ({"4.bias": 1}, "gain_channels must name parameters of produced"),
        ([1], "gain_channels must be a map"),
    ):
        with pytest.raises(ValueError, match=message):
            GaugeStructure.from_dict({**data, "gain_channels": bad})
