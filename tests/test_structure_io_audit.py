"""Audit of saved structures used on models: the module classes a structure records (a model
with the same parameter names and shapes but an ``nn.Tanh`` where it had an ``nn.ReLU`` is
another symmetry group, and is refused with nothing moved), their round trip through files,
restriction and pickles for every architecture, files without them (written before they were
recorded), and files that are no JSON a parser can read."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import Tensor, nn

import gaugefix
from architectures import DTYPE
from gaugefix import GaugeStructure, zoo
from test_structure_audit import CASES, assert_identical, discovered

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-12
SCALE = 1.0  # of the random gauges: factors around e^{+-1}


class Net(nn.Module):
    """Two layers with an activation module between them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().double()


X = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _others() -> dict[str, nn.Module]:
    """Models with the parameter names and shapes of ``_net()`` and another function, whose
    outputs the ReLU network's gauges move."""
    tanh, doubled, subclassed = _net(), _net(), _net()
    tanh.act = nn.Tanh()
    doubled.act = nn.Sequential(nn.ReLU(), nn.Tanh())  # new modules act.0 and act.1

    class Shifted(nn.ReLU):
        def forward(self, x: Tensor) -> Tensor:  # another function, yet a ReLU by class
            return torch.relu(x) + 1.0

    subclassed.act = Shifted()
    return {"tanh": tanh, "new modules": doubled, "a subclass": subclassed}


@pytest.mark.parametrize("which", ["tanh", "new modules"])
@pytest.mark.parametrize("saved", [False, True])
def test_a_model_with_other_module_classes_is_refused_and_left_as_it_was(which, saved, tmp_path):
    """Before, the ReLU network's structure bound to these (names and shapes equal) and a
    random gauge moved their outputs by about 0.1."""
    s = gaugefix.discover(_net(), X)
    if saved:
        s.save(tmp_path / "s.json")
        s = GaugeStructure.load(tmp_path / "s.json")
    other = _others()[which]
    unchecked = GaugeStructure.from_dict({**s.to_dict(), "module_types": None})
    moved = copy.deepcopy(other)
    before = moved(X).detach()
    gaugefix.random_gauge_(moved, unchecked, SCALE, torch.Generator().manual_seed(7))
    assert float((moved(X).detach() - before).abs().max()) > 1e-2  # what accepting it did
    params = _params(other)
    for fn, args in (
        (gaugefix.random_gauge_, (other, s, SCALE)),
        (gaugefix.balance_, (other, s)),
        (gaugefix.imbalance, (other, s)),
        (s.bind, (other,)),
    ):
        with pytest.raises(ValueError, match="does not match") as info:
            fn(*args)
        assert len(str(info.value).splitlines()) == 1
    assert all(torch.equal(v.detach(), params[k]) for k, v in other.named_parameters())


def test_a_subclass_of_the_recorded_class_passes():
    """A subclass keeps its recorded class in its MRO (FSDP2 swaps a module's class for such a
    subclass): bound, and exact where it keeps the forward; one overriding the forward is the
    user's to rediscover (not detected)."""
    s = gaugefix.discover(_net(), X)
    model = _net()
    model.fc1.__class__ = type("FSDPLinear", (nn.Linear,), {})
    before = model(X).detach()
    gaugefix.random_gauge_(model, s, SCALE, torch.Generator().manual_seed(7))
    assert not torch.equal(model.fc1.weight, _net().fc1.weight)
    assert float((model(X).detach() - before).abs().max()) <= EXACT * float(before.abs().max())
    assert s.bind(_others()["a subclass"]).keys() == s.params.keys()


def test_a_structure_discovered_on_a_sharded_model_binds_the_unsharded_one():
    """FSDP2's class for a sharded module (``FSDPLinear``, defined in torch.distributed.fsdp,
    imitated here) is looked through when recorded: discovered on a sharded model, the
    structure binds the same model unsharded, and is exact there."""
    sharded = _net()
    sharded.fc1.__class__ = type(
        "FSDPLinear", (nn.Linear,), {"__module__": "torch.distributed.fsdp._fully_shard._x"}
    )
    s = gaugefix.discover(sharded, X)
    assert s.module_types["fc1"] == "Linear" and s.num_generators == 5
    model = _net()
    before = model(X).detach()
    gaugefix.random_gauge_(model, s, SCALE, torch.Generator().manual_seed(7))
    assert not torch.equal(model.fc1.weight, _net().fc1.weight)
    assert float((model(X).detach() - before).abs().max()) <= EXACT * float(before.abs().max())


def test_a_structure_without_module_classes_binds_as_before(tmp_path):
    """A file written before module classes were recorded loads with ``module_types = None``
    and binds any model with the parameter names and shapes, as it did."""
    s = gaugefix.discover(_net(), X)
    data = s.to_dict()
    assert data["module_types"] == {"": "Net", "fc1": "Linear", "act": "ReLU", "fc2": "Linear"}
    del data["module_types"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = GaugeStructure.load(tmp_path / "old.json")
    assert old.module_types is None and "module_types" not in old.to_dict()
    assert old.bind(_others()["tanh"]).keys() == s.params.keys()
    state = s.__getstate__()
    del state["module_types"]
    unpickled = GaugeStructure.__new__(GaugeStructure)
    unpickled.__setstate__(state)
    assert unpickled.module_types is None


@pytest.mark.parametrize("name", list(CASES))
def test_module_classes_round_trip_through_files_restrict_and_pickles(name, tmp_path):
    model, _, s = discovered(name)
    assert s.module_types == {n: type(m).__name__ for n, m in model.named_modules()}
    s.save(tmp_path / "s.json")
    keep = torch.arange(s.num_generators) % 2 == 0
    for other in (
        GaugeStructure.load(tmp_path / "s.json"),
        pickle.loads(pickle.dumps(s)),
        s.restrict(keep, "left out"),
    ):
        assert other.module_types == s.module_types and other.aliases == s.aliases
        other.bind(model)
    assert_identical(s, GaugeStructure.load(tmp_path / "s.json"))


@pytest.mark.parametrize("value", [["Net"], {"fc1": 3}, "Net"])
def test_malformed_module_classes_are_refused(value):
    data = {**gaugefix.discover(_net(), X).to_dict(), "module_types": value}
    with pytest.raises(ValueError, match="module_types must map module names to class names"):
        GaugeStructure.from_dict(data)


def test_a_file_nested_too_deep_to_parse_is_refused_with_one_value_error(tmp_path):
    """``json.load`` raised ``RecursionError`` for it, not the documented ``ValueError``."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="is not a saved GaugeStructure") as info:
        GaugeStructure.load(path)
    assert len(str(info.value).splitlines()) == 1


def test_dropout_swapped_for_identity_is_refused_and_rediscovery_binds():
    """An ``nn.Identity`` where the structure's model had an ``nn.Dropout`` computes the same
    function in eval mode, yet the recorded class names cannot show it: the gauge action is
    refused with one line saying to discover again, and moves nothing; the structure
    discovered on the model as it is now binds it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(0.1), nn.Linear(5, 2))
    model = model.double().eval()
    s = gaugefix.discover(model, X)
    model[2] = nn.Identity()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="module '2' is a Identity, was a Dropout") as info:
        gaugefix.apply_gauge_(model, s, torch.ones(s.num_generators, dtype=torch.float64))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "discover its structure again on this model" in message
    assert "class names cannot show two classes equivalent" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again = gaugefix.discover(model, X)
    assert again.num_generators == s.num_generators == 5
    assert again.bind(model).keys() == s.params.keys()


def test_a_zoo_mlp_with_tanh_activations_is_refused():
    """``zoo.mlp`` with its ReLUs replaced by Tanh: same names and shapes, no symmetry."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 5, 4, 2)).double()
    s = gaugefix.discover(model, X)
    for i, m in enumerate(model):
        if isinstance(m, nn.ReLU):
            model[i] = nn.Tanh()
    with pytest.raises(ValueError, match="module '1' is a Tanh, was a ReLU"):
        s.bind(model)
