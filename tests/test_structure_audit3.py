"""Third audit of ``GaugeStructure`` and ``discover``'s entry: the kinds of generators united
with a permutation of themselves outside attention, parameters held under several names (the
structure's ``aliases``, checked by ``bind``, saved, restricted and pickled), ``touching`` given
iterators, module names and other things, ``restrict`` given what is not a mask, and saved data
naming parameters the model lacks. Symmetries are checked on the function: float64 outputs after
a random gauge to 1e-12."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import DTYPE
from gaugefix import GaugeStructure, zoo

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-12
SCALE = 1.0  # of the random gauges: factors around e^{+-1}
WIDTH = 6  # channels of the hidden layers below


def inputs(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 with every parameter drawn from N(0, 1) (biases and gains too)."""
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DTYPE, generator=g))
    return model


def relative_change(model: nn.Module, structure: GaugeStructure, x: Tensor) -> float:
    """The largest change of ``model``'s outputs on ``x`` after a random gauge of ``structure``,
    relative to their size."""
    with torch.no_grad():
        before = model(x)
    h = gaugefix.random_gauge_(model, structure, SCALE, torch.Generator().manual_seed(7))
    assert float(h.abs().max()) > 0.5
    with torch.no_grad():
        return float((model(x) - before).abs().max() / before.abs().max())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def unchanged(model: nn.Module, before: dict[str, Tensor]) -> bool:
    after = model.state_dict(keep_vars=True)
    return after.keys() == before.keys() and all(
        torch.equal(after[k].detach(), v) for k, v in before.items()
    )


# -- kinds: a union with a permutation of itself is no rotary pair outside attention --------------
SWAPPED = torch.tensor([1, 0, 3, 2, 5, 4])  # made before the trace: a constant index
PERMUTED = {
    "flip": lambda h: h + h.flip(1),
    "index": lambda h: h + h[:, SWAPPED],
    "roll": lambda h: h + h.roll(2, 1),
}


class PermutedCNN(nn.Module):
    """conv -> ReLU -> ``h + perm(h)`` (channels united with a permutation of themselves) ->
    conv: the united channels are neurons of the first convolution."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.c1, self.c2, self.mix = nn.Conv2d(3, WIDTH, 3), nn.Conv2d(WIDTH, 4, 3), mix

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(PERMUTED[self.mix](F.relu(self.c1(x))))


@pytest.mark.parametrize(("mix", "count"), [("flip", 3), ("index", 3), ("roll", 2)])
def test_a_cnn_channel_union_with_its_permutation_is_a_neuron(mix, count):
    model = randomised(PermutedCNN(mix))
    x = inputs(2, 3, 7, 7)
    s = gaugefix.discover(model, x)
    assert s.kind_counts() == {"neuron": count}, s.summary()
    assert "rotary pair" not in s.summary()
    assert relative_change(model, s, x) <= EXACT


class RotaryHead(nn.Module):
    """One attention head of width 4 with ``q cos + rotate_half(q) sin`` on queries and keys."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 4) for _ in range(3))
        self.o = nn.Linear(4, 8)
        angle = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.3])
        self.register_buffer("cos", angle.cos().repeat(1, 2).double())
        self.register_buffer("sin", angle.sin().repeat(1, 2).double())

    def rotate(self, t: Tensor) -> Tensor:
        half = torch.cat([-t[..., 2:], t[..., :2]], dim=-1)
        return t * self.cos + half * self.sin

    def forward(self, x: Tensor) -> Tensor:
        q, k = self.rotate(self.q(x)), self.rotate(self.k(x))
        return self.o(torch.softmax(q @ k.mT, dim=-1) @ self.v(x))


def test_rotary_pairs_of_attention_keep_their_kind():
    model = randomised(RotaryHead())
    x = inputs(3, 5, 8)
    s = gaugefix.discover(model, x)
    assert s.kind_counts() == {"rotary pair": 2, "value-output": 4}, s.summary()
    assert relative_change(model, s, x) <= EXACT


# -- parameters held under several names ----------------------------------------------------------
class SharedBiases(nn.Module):
    """Three LayerNorms read by three heads; ``ln3.bias`` is ``ln1.bias`` (``tie="1"``) or
    ``ln2.bias`` (``tie="2"``): the same parameter names either way."""

    def __init__(self, tie: str) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(8) for _ in range(3))
        self.h1, self.h2, self.h3 = (nn.Linear(8, 3) for _ in range(3))
        self.ln3.bias = self.ln1.bias if tie == "1" else self.ln2.bias

    def forward(self, x: Tensor) -> Tensor:
        return (
            self.h1(self.ln1(x)) + self.h2(self.ln2(x.flip(-1))) + self.h3(self.ln3(x.roll(1, -1)))
        )


def test_bind_refuses_a_weight_tied_to_another_tensor_since():
    """Discovered with ``ln3.bias = ln1.bias``, the structure would move the other model's
    ``ln3.bias`` (its ``ln2.bias``) with ``ln2``'s gains: its outputs changed by 5.7 relative."""
    first, second = randomised(SharedBiases("1")), randomised(SharedBiases("2"))
    assert [n for n, _ in first.named_parameters()] == [n for n, _ in second.named_parameters()]
    x = inputs(4, 8)
    s = gaugefix.discover(first, x)
    before = snapshot(second)
    with pytest.raises(ValueError, match="ties its parameters otherwise") as info:
        gaugefix.random_gauge_(second, s, SCALE)
    assert len(str(info.value).splitlines()) == 1
    assert unchanged(second, before)
    assert relative_change(first, s, x) <= EXACT


def test_aliases_are_recorded_saved_restricted_and_pickled(tmp_path):
    model = randomised(SharedBiases("1"))
    s = gaugefix.discover(model, inputs(4, 8))
    assert s.aliases == {"ln1.bias": ("ln3.bias",)}
    s.save(tmp_path / "s.json")
    keep = torch.arange(s.num_generators) % 2 == 0
    copies = [
        GaugeStructure.from_dict(s.to_dict()),
        GaugeStructure.load(tmp_path / "s.json"),
        pickle.loads(pickle.dumps(s)),
        s.restrict(keep, "a test"),
    ]
    assert [c.aliases for c in copies] == [s.aliases] * len(copies)
    for c in copies:
        c.bind(model)
    assert gaugefix.discover(zoo.mlp((3, 4, 2)), inputs(2, 3).float()).aliases == {}


def test_a_structure_saved_before_aliases_binds_as_before():
    """A file without ``aliases`` (written by an earlier version) has them not recorded: its
    structure binds to the model it was discovered on, tied or not, as it did."""
    model = randomised(SharedBiases("1"))
    s = gaugefix.discover(model, inputs(4, 8))
    data = s.to_dict()
    del data["aliases"]
    old = GaugeStructure.from_dict(data)
    assert old.aliases is None and "aliases" not in old.to_dict()
    assert old.bind(model).keys() == s.bind(model).keys()
    older = copy.copy(s)  # an object of a version without the field, pickled
    del older.aliases
    unpickled = pickle.loads(pickle.dumps(older))
    assert unpickled.aliases is None
    assert unpickled.bind(model).keys() == s.bind(model).keys()


def mlp_dict() -> dict:
    return gaugefix.discover(zoo.mlp((3, 4, 2)).double(), inputs(2, 3)).to_dict()


def edited(**changes) -> dict:
    data = mlp_dict()
    data.update(changes)
    return data


MALFORMED = {
    "aliases as a list": lambda: edited(aliases=[["0.weight", "x.weight"]]),
    "aliases of a name not in param_order": lambda: edited(aliases={"9.weight": ["x.weight"]}),
    "an alias that is a parameter name": lambda: edited(aliases={"0.weight": ["2.weight"]}),
    "an alias named twice": lambda: edited(aliases={"0.weight": ["x"], "2.weight": ["x"]}),
    "no aliases listed": lambda: edited(aliases={"0.weight": []}),
    "alias not text": lambda: edited(aliases={"0.weight": [3]}),
    "produced by a parameter not in param_order": lambda: edited(
        produced={**mlp_dict()["produced"], "9.weight": {"shape": [2], "data": [0, 1]}}
    ),
    "in_out naming a parameter not in param_order": lambda: edited(in_out=["9.weight"]),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_data_naming_what_the_model_lacks_is_refused(case):
    with pytest.raises(ValueError, match="malformed saved GaugeStructure") as info:
        GaugeStructure.from_dict(MALFORMED[case]())
    assert len(str(info.value).splitlines()) == 1


# -- touching and restrict ------------------------------------------------------------------------
def mlp_structure() -> GaugeStructure:
    """A 3-6-6-2 ReLU MLP's: 12 generators, 6 per hidden layer."""
    return gaugefix.discover(zoo.mlp((3, WIDTH, WIDTH, 2)).double(), inputs(4, 3))


def test_touching_reads_a_one_shot_iterable_once():
    """``touching(iter(names))`` gave no generator for a name after the first parameter (the
    first membership test consumed the iterator)."""
    s = mlp_structure()
    for name in ("0.weight", "2.weight", "4.weight"):
        expected = s.touching({name})
        assert bool(expected.any())
        assert torch.equal(s.touching(iter([name])), expected)
        assert torch.equal(s.touching(n for n in [name]), expected)


@pytest.mark.parametrize(
    ("names", "error"),
    [(["0"], ValueError), (["0.weigh"], ValueError), (["nope"], ValueError), ([0], TypeError)],
    ids=["a module name", "a prefix", "unknown", "an int"],
)
def test_touching_refuses_what_is_no_parameter_name(names, error):
    """A module's name (a prefix of its parameters' names) touched nothing, silently."""
    with pytest.raises(error) as info:
        mlp_structure().touching(names)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    "keep",
    [None, "keep", [[True], [True, False]], torch.ones(12, dtype=torch.bool, device="meta")],
    ids=["None", "a string", "ragged", "a meta tensor"],
)
def test_restrict_refuses_what_is_not_a_mask_with_a_type_error(keep):
    s = mlp_structure()
    before = s.to_dict()
    with pytest.raises(TypeError, match="restrict takes a bool mask") as info:
        s.restrict(keep, "a test")
    assert len(str(info.value).splitlines()) == 1
    assert s.to_dict() == before


def test_restrict_of_a_structure_without_generators_takes_an_empty_list():
    none = mlp_structure().restrict(torch.zeros(2 * WIDTH, dtype=torch.bool), "a test")
    for keep in ([], torch.zeros(0)):
        again = none.restrict(keep, "again")
        assert again.num_generators == 0
        assert again.to_dict() == none.to_dict()
    assert "0 generators (none)" in none.summary()


def test_discover_on_inputs_in_every_form_gives_one_structure():
    """Inputs as a tensor, a keyword, a dict and with unused extras, in train and eval mode
    (BatchNorm, dropout): one structure, and the model's mode, buffers and parameters kept."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn = nn.Linear(4, WIDTH), nn.BatchNorm1d(WIDTH)
            self.fc2, self.drop = nn.Linear(WIDTH, 3), nn.Dropout(0.3)

        def forward(self, x, extra=None):
            h = self.fc1(x["a"] if isinstance(x, dict) else x)
            return self.fc2(self.drop(F.relu(self.bn(h))))

    model, x = randomised(Net()), inputs(5, 4)
    for train in (True, False):
        model.train(train)
        before = snapshot(model)
        found = [
            gaugefix.discover(model, x).to_dict(),
            gaugefix.discover(model, x=x).to_dict(),
            gaugefix.discover(model, {"a": x}).to_dict(),
            gaugefix.discover(model, x, extra=(x, [x.clone()])).to_dict(),
        ]
        assert found[0]["num_generators"] == WIDTH
        assert all(f == found[0] for f in found)
        assert model.training is train and unchanged(model, before)
