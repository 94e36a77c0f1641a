"""Audit of the ``produced`` table of saved structures (the generator of each channel a
parameter produces, ``-1`` for none), which reports and :meth:`GaugeStructure.scale_groups`
read: a file's table must fit its parameters and name, for every generator, the module
``generator_layers`` names as its first producer; and a version-1 file, whose table is its
row maps, cannot declare more channels than its maps store.

What every discovered table satisfies, and what it need not: a table has a whole number of its
parameter's entries per channel (fused experts ``[experts, in, out]`` produce ``experts * out``
channels, not ``experts``); a producing parameter may divide its channels (a key projection,
against its query), and may produce generators that none of its terms names (a depthwise
convolution on a residual stream carries a channel's factor and its inverse, which cancel).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import DTYPE
from gaugefix import GaugeStructure, zoo
from test_scale_groups_audit import Experts
from test_structure_audit import mlp_v1

pytestmark = pytest.mark.usefixtures("single_thread")


class KeyDivides(nn.Module):
    """Scores of a query and a key projection: the key's rows divide the generators the
    query's rows multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(6, 6) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(scores @ self.v(x))


class DepthwiseResidual(nn.Module):
    """A depthwise convolution without bias added to its input: its kernel's factors cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv1d(3, 4, 1), nn.Conv1d(4, 2, 1)
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(F.relu(h + self.dw(h)))


MODELS = {
    "mlp": (lambda: zoo.mlp((3, 5, 4, 2)), (4, 3)),
    "resnet": (zoo.EXAMPLES["resnet"][0], zoo.EXAMPLES["resnet"][1]),
    "transformer": (zoo.EXAMPLES["transformer"][0], zoo.EXAMPLES["transformer"][1]),
    "key divides": (KeyDivides, (2, 5, 6)),
    "depthwise residual": (DepthwiseResidual, (2, 3, 7)),
    "3-D experts": (Experts, (4, 8)),
}


def discovered(name: str) -> GaugeStructure:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(DTYPE).eval()
    return gaugefix.discover(model, torch.randn(*shape, dtype=DTYPE))


@pytest.mark.parametrize("name", list(MODELS))
def test_discovered_tables_load_unchanged(name, tmp_path):
    s = discovered(name)
    path = tmp_path / "s.json"
    s.save(path)
    loaded = GaugeStructure.load(path)
    assert loaded.produced.keys() == s.produced.keys()
    assert all(torch.equal(loaded.produced[k], v) for k, v in s.produced.items())
    assert loaded.generator_layers == s.generator_layers and loaded.summary() == s.summary()


def test_the_cases_above_are_the_ones_named():
    """Each model shows what it is listed for: a producer whose table is not one entry per
    row, one that divides its channels, one producing generators its terms do not name."""
    experts = discovered("3-D experts")
    assert len(experts.produced["w_in"]) == 3 * 6  # experts * hidden, of [3, 6, 8]
    keys = discovered("key divides")
    produced = keys.produced["k.weight"]
    assert bool((produced >= 0).any())
    assert all(t.sign < 0 for t in keys.params["k.weight"].terms if bool((t.index >= 0).any()))
    dw = discovered("depthwise residual")
    assert bool((dw.produced["dw.weight"] >= 0).all()) and "dw.weight" not in dw.params


def edited(s: GaugeStructure, name: str, table: list[int]) -> dict:
    data = copy.deepcopy(s.to_dict())
    data["produced"][name] = {"shape": [len(table)], "data": table}
    return data


def mlp_edits() -> dict[str, tuple[str, list[int]]]:
    """Hand edits of the 3-5-4-2 MLP's table (generators 0-4: layer 0, 5-8: layer 2)."""
    return {
        "a channel more": ("0.weight", [0, 1, 2, 3, 4, -1]),
        "a channel less": ("0.weight", [0, 1, 2, 3]),
        "a generator dropped": ("0.weight", [-1, 1, 2, 3, 4]),
        "a generator taken from a later layer": ("0.weight", [5, 1, 2, 3, 4]),
    }


@pytest.mark.parametrize("edit", list(mlp_edits()))
def test_a_table_that_contradicts_the_structure_is_refused(edit, tmp_path):
    s = discovered("mlp")
    assert s.generator_layers == ["0"] * 5 + ["2"] * 4
    name, table = mlp_edits()[edit]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(edited(s, name, table)))
    with pytest.raises(ValueError) as err:
        GaugeStructure.load(path)
    assert "\n" not in str(err.value) and "s.json" in str(err.value)
    assert "produces" in str(err.value) or "layer" in str(err.value)


def test_a_table_naming_a_later_producer_still_loads():
    """A layer reading the channels of generator 5 claiming to produce it too is no
    contradiction the file shows (a residual sum makes such tables): it loads, and
    scale_groups only loses groups (a layer does not balance channels it produces), so every
    group it exports is one of the exact ones of the true table."""
    s = discovered("mlp")
    loaded = GaugeStructure.from_dict(edited(s, "4.weight", [5, -1]))
    before = [g["generators"] for g in s.scale_groups()]
    after = [g["generators"] for g in loaded.scale_groups()]
    assert [5, 6, 7, 8] in before
    assert after == [g for g in before if 5 not in g]


# -- version 1: the table is the row maps, spread over the parameter's channels ------------------
def test_version_1_rows_cannot_declare_more_channels_than_the_file_stores():
    """A row map of one entry spread over ``2 * 10**7`` channels: the table would be 160 MB
    from a file of a few hundred bytes (and far more for larger shapes)."""
    data = mlp_v1()
    data["params"][1] = {
        "name": "0.bias", "shape": [2 * 10**7], "rows": {"shape": [1], "data": [0]}, "cols": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"more channels than the file's maps \(9\)"):
        GaugeStructure.from_dict(data)


def test_version_1_rows_spread_over_the_channels_the_file_backs_still_load():
    data = mlp_v1()
    data["params"][1]["rows"] = {"shape": [1], "data": [0]}  # every bias entry: generator 0
    loaded = GaugeStructure.from_dict(data)
    assert loaded.produced["0.bias"].tolist() == [0, 0, 0, 0]
    assert loaded.produced["0.weight"].tolist() == [0, 1, 2, 3]


HUGE = 2**40  # channels a small file may declare: 8 TiB as one int64 map, never to be built


@pytest.mark.parametrize("declared", ["bias", "every layer"])
def test_a_small_file_declaring_huge_channels_gives_no_group_and_allocates_nothing(declared):
    """One hidden neuron: its terms are one entry long, so the declared shapes alone say how
    many channels each map has. A file claiming ``2**40`` of them (no term spans them, no layer
    produces them, more than ``UNSTORED_CHANNELS``) loads, and ``scale_groups`` leaves that
    layer's generators out instead of building maps of that size (which would fail to
    allocate); the file as saved has its group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 2)).to(DTYPE)
    structure = gaugefix.discover(model, torch.randn(2, 4, dtype=DTYPE))
    data = structure.to_dict()
    assert [g["generators"] for g in GaugeStructure.from_dict(data).scale_groups()] == [[0]]
    shapes = {"0.weight": [HUGE, 4], "0.bias": [HUGE], "2.weight": [2, HUGE]}
    for p in data["params"]:
        if declared == "every layer" or p["name"] == "0.bias":
            p["shape"] = shapes[p["name"]]
    assert len(json.dumps(data)) < 1000
    loaded = GaugeStructure.from_dict(data)
    assert loaded.params["0.bias"].shape == (HUGE,)
    assert loaded.scale_groups() == []
