"""What loading a saved structure allocates: no more than the file's maps store, or a named
bound. Two terms of one parameter that vary along a shared dim are checked for naming one
generator at one entry on their own entries (pairs of a coordinate along the shared dims and a
generator), never on the table of the parameter's declared shape, which a file can declare far
larger than any memory.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugefix import GaugeStructure
from gaugefix.structure import gauge_structure as gs
from gaugefix.structure import terms

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE = 1 << 19  # the declared parameter has 2 * SIDE**2 = 2**39 entries (4 TiB of int64)


def crossed(side: int, collide: bool) -> dict:
    """A structure of one parameter ``w`` of shape ``[2, side, side]``, multiplied by a term of
    shape ``[2, side, 1]`` (generator ``s`` along ``w[s]``) and divided by one of shape
    ``[2, 1, side]`` (generator ``1 - s`` along ``w[s]``, except, where ``collide``, its last
    entry of ``w[1]``, which names generator 1 as the multiplying term does there)."""
    rows = [0] * side + [1] * side
    cols = [1] * side + [0] * (side - 1) + [1 if collide else 0]
    return {
        "format": gs.FORMAT,
        "num_generators": 2,
        "params": [
            {
                "name": "w",
                "shape": [2, side, side],
                "terms": [
                    {"sign": 1, "index": {"shape": [2, side, 1], "data": rows}},
                    {"sign": -1, "index": {"shape": [2, 1, side], "data": cols}},
                ],
            }
        ],
        "produced": {},
        "excluded": [],
        "layers": [""],
        "generator_layers": [0, 0],
        "generator_kinds": ["neuron", "neuron"],
        "param_order": ["w"],
    }


def test_a_file_declaring_a_huge_parameter_with_crossed_terms_loads_without_its_table(tmp_path):
    """The terms store ``4 * SIDE`` entries; the parameter declares ``2**41``. Before, the check
    that no two terms name one generator at one entry compared the two terms broadcast to the
    whole parameter, and the load failed (a malformed-structure error naming the allocator)."""
    path = tmp_path / "crossed.json"
    path.write_text(json.dumps(crossed(SIDE, collide=False)))
    loaded = GaugeStructure.load(path)
    assert loaded.params["w"].shape == (2, SIDE, SIDE)
    assert [t.index.shape for t in loaded.params["w"].terms] == [(2, SIDE, 1), (2, 1, SIDE)]


def test_a_huge_parameter_whose_terms_collide_is_refused_before_allocating_it(
    tmp_path,
):
    path = tmp_path / "collide.json"
    path.write_text(json.dumps(crossed(SIDE, collide=True)))
    with pytest.raises(ValueError, match="two terms of 'w' name one generator at one entry"):
        GaugeStructure.load(path)


def self_applied_v1(side: int) -> dict:
    """A version-1 structure of a parameter ``h`` of shape ``[2, side, side]`` whose row map
    (generator ``s`` along ``h[s]``) and column map (generator 1 along ``h[:, :, 0]``, else 0)
    name one generator at ``h[1, :, 0]`` and at ``h[0, :, 1:]``, and two parameters ``i`` and
    ``o`` that only multiply and only divide both generators."""
    both = {"shape": [2], "data": [0, 1]}
    return {
        "format": gs.FORMAT_V1,
        "num_neurons": 2,
        "params": [
            {
                "name": "h",
                "shape": [2, side, side],
                "rows": {"shape": [2, side, 1], "data": [0] * side + [1] * side},
                "cols": {"shape": [1, 1, side], "data": [1] + [0] * (side - 1)},
            },
            {"name": "o", "shape": [2], "rows": None, "cols": both},
            {"name": "i", "shape": [2], "rows": both, "cols": None},
        ],
        "excluded": [],
        "layers": ["h"],
        "neuron_layers": [0, 0],
        "param_order": ["h", "o", "i"],
    }


def test_a_version_1_file_cancelling_on_a_huge_table_is_refused_before_allocating_it(tmp_path):
    """Version 1 leaves implicit that a row and a column map naming one generator at one entry
    cancel there: the cancelled maps are tables of their broadcast shape, built up to
    ``V1_CANCEL_LIMIT`` entries (a small one loads, exactly) and refused beyond, with the
    reason. Before, a file of ``2**39`` such entries failed in the allocator."""
    small = GaugeStructure.from_dict(self_applied_v1(2))
    assert [t.index.tolist() for t in small.params["h"].terms] == [
        [[[0, -1]], [[-1, 1]]],
        [[[1, -1]], [[-1, 0]]],
    ]
    path = tmp_path / "self_applied.json"
    path.write_text(json.dumps(self_applied_v1(SIDE)))
    with pytest.raises(ValueError, match=r"'h' name one generator .* table of 549755813888 ent"):
        GaugeStructure.load(path)


def broadcast_collisions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The components two maps name at one entry, on their broadcast table."""
    x, y = torch.broadcast_tensors(a, b)
    common = x[x == y].unique()
    return common[common >= 0]


@st.composite
def map_pairs(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps of one parameter of 1 to 4 dims of sizes 1 to 3, each dim of each map kept or
    shrunk to 1, with entries in ``[-1, 4]``."""
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    maps = []
    for _ in range(2):
        own = [draw(st.sampled_from([s, 1])) for s in shape]
        count = int(torch.Size(own).numel())
        data = draw(st.lists(st.integers(-1, 4), min_size=count, max_size=count))
        maps.append(torch.tensor(data, dtype=torch.long).reshape(own))
    return maps[0], maps[1]


@settings(max_examples=300, deadline=None)
@given(map_pairs(), st.sampled_from([0, terms.BROADCAST_FACTOR]))
def test_collisions_are_those_of_the_broadcast_table(pair, factor):
    """On the maps' own entries (``factor`` 0: never on the broadcast table) as on the table."""
    a, b = pair
    with mock.patch.object(terms, "BROADCAST_FACTOR", factor):
        assert torch.equal(terms.collisions(a, b), broadcast_collisions(a, b))
