"""``GaugeStructure`` as an object: saving and loading, the summary, inspection, binding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import DTYPE, any_case, randomise_
from gaugefix import GaugeStructure, zoo

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_equal_structures(a: GaugeStructure, b: GaugeStructure) -> None:
    assert a.num_generators == b.num_generators
    assert list(a.params) == list(b.params)
    for name, m in a.params.items():
        n = b.params[name]
        assert (m.name, m.shape) == (n.name, n.shape)
        assert len(m.terms) == len(n.terms), name
        for x, y in zip(m.terms, n.terms, strict=True):
            assert x.sign == y.sign, name
            assert x.index.dtype == y.index.dtype == torch.int64, name
            assert torch.equal(x.index, y.index), name
    assert a.excluded == b.excluded
    assert a.generator_layers == b.generator_layers
    assert a.generator_kinds == b.generator_kinds
    assert a.produced.keys() == b.produced.keys()
    assert all(torch.equal(a.produced[k], b.produced[k]) for k in a.produced)
    assert a.param_order == b.param_order
    assert a.summary() == b.summary()
    assert repr(a) == repr(b)


def is_plain(data) -> bool:
    """JSON-like plain data only: dicts with string keys, lists, strings, numbers, None."""
    if isinstance(data, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in data.items())
    if isinstance(data, list):
        return all(is_plain(v) for v in data)
    return data is None or isinstance(data, (str, int, float, bool))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=any_case)
def test_save_load_round_trip(case, tmp_path):
    s = gaugefix.discover(case.model, *case.inputs)
    path = tmp_path / "structure.json"
    s.save(path)
    raw = json.loads(path.read_text())
    assert is_plain(raw) and raw["format"] == "gaugefix.GaugeStructure/2"
    loaded = GaugeStructure.load(path)
    assert_equal_structures(s, loaded)
    assert_equal_structures(s, GaugeStructure.from_dict(json.loads(json.dumps(s.to_dict()))))
    # the loaded structure acts on the model exactly like the discovered one
    h = torch.randn(s.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    a = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    gaugefix.apply_gauge_(case.model, s, h)
    moved = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    with torch.no_grad():
        for k, v in case.model.named_parameters():
            v.copy_(a[k])
    gaugefix.apply_gauge_(case.model, loaded, h)
    for k, v in case.model.named_parameters():
        assert torch.equal(v, moved[k]), k
    assert torch.equal(gaugefix.imbalance(case.model, s), gaugefix.imbalance(case.model, loaded))


def version_1(s: GaugeStructure) -> dict:
    """``s`` as the previous format wrote it: one multiplying map (rows) and one dividing map
    (cols) per parameter."""

    def enc(sign: int, p) -> dict | None:
        maps = [t.index for t in p.terms if t.sign == sign]
        assert len(maps) <= 1
        return {"shape": list(maps[0].shape), "data": maps[0].flatten().tolist()} if maps else None

    layers = sorted(set(s.generator_layers))
    return {
        "format": "gaugefix.GaugeStructure/1",
        "num_neurons": s.num_generators,
        "params": [
            {"name": p.name, "shape": list(p.shape), "rows": enc(1, p), "cols": enc(-1, p)}
            for p in s.params.values()
        ],
        "excluded": [
            {"module": e.module, "reason": e.reason, "channels": list(e.channels)}
            for e in s.excluded
        ],
        "layers": layers,
        "neuron_layers": [layers.index(x) for x in s.generator_layers],
        "param_order": s.param_order,
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_files_of_version_1_still_load(name, tmp_path):
    factory, shape = zoo.EXAMPLES[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    x = torch.randn(2, *shape[1:], dtype=DTYPE)
    s = gaugefix.discover(model, x)
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(version_1(s)))
    old = GaugeStructure.load(path)
    assert old.num_generators == s.num_generators and old.summary() == s.summary()
    h = torch.randn(s.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    before = model(x)
    saved = {k: v.detach().clone() for k, v in model.named_parameters()}
    gaugefix.apply_gauge_(model, s, h)
    moved = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(saved[k])
    gaugefix.apply_gauge_(model, old, h)
    for k, v in model.named_parameters():
        assert torch.equal(v, moved[k]), k
    assert float((model(x) - before).abs().max()) <= 1e-10 * float(before.abs().max())


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something else", "num_generators": 0}))
    with pytest.raises(ValueError, match="not a saved GaugeStructure"):
        GaugeStructure.load(path)
    with pytest.raises(ValueError):
        GaugeStructure.from_dict({})


# --- summary -----------------------------------------------------------------------------------
def summary_rows(s: GaugeStructure) -> dict[str, tuple[int, int, str]]:
    """The per-layer rows of the summary table: layer -> (channels, generators, notes)."""
    lines = s.summary().splitlines()
    assert lines[0].split() == ["layer", "channels", "generators", "notes"]
    assert set(lines[1]) == {"-"} and set(lines[-2]) == {"-"}
    rows = {}
    for line in lines[2:-2]:
        parts = line.split(None, 3)
        rows[parts[0]] = (int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else "")
    return rows


def test_summary_of_a_resnet_names_layers_counts_and_reasons():
    torch.manual_seed(0)
    model = randomise_(zoo.ResNet(), 0).eval()
    s = gaugefix.discover(model, torch.randn(2, 3, 8, 8, dtype=DTYPE))
    rows = summary_rows(s)
    # convolutions feeding a BatchNorm: no freedom, with the reason
    for conv, bn in (
        ("stem.0", "stem.1"),
        ("stages.0.conv1", "stages.0.bn1"),
        ("stages.1.shortcut.0", "stages.1.shortcut.1"),
    ):
        channels, neurons, notes = rows[conv]
        assert (channels, neurons) == (0, 0)
        assert f"excluded: normalised by F.batch_norm in '{bn}'" in notes
    # BatchNorms produce; a neuron merged by a residual addition is counted where it starts
    assert rows["stem.1"][:2] == (8, 8)
    assert rows["stages.0.bn1"][:2] == (8, 8)
    assert rows["stages.0.bn2"][:2] == (8, 0)  # merged with the stem's stream
    assert "8 shared with generators first produced by 'stem.1'" in rows["stages.0.bn2"][2]
    assert rows["stages.1.bn2"][:2] == (16, 16)
    assert rows["stages.1.shortcut.1"][:2] == (16, 0)  # merged with bn2's
    shortcut = rows["stages.1.shortcut.1"][2]
    assert "16 shared with generators first produced by 'stages.1.bn2'" in shortcut
    assert "10 excluded: model output" in rows["fc"][2]
    assert sum(neurons for _, neurons, _ in rows.values()) == s.num_generators == 48
    assert s.summary().splitlines()[-1].startswith("48 generators (48 neuron) over")
    # layers appear in the model's order
    names = list(rows)
    assert names.index("stem.0") < names.index("stages.0.conv1") < names.index("fc")


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(3, 4),
            nn.Linear(4, 5),
            nn.Linear(5, 6),
            nn.Linear(6, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.b(F.relu(self.a(x))))
        return self.d(torch.relu(self.c(x)))


def test_summary_gives_the_reason_per_layer():
    s = gaugefix.discover(Mixed().double(), torch.randn(2, 3, dtype=DTYPE))
    rows = summary_rows(s)
    assert rows["a"] == (4, 4, "")
    assert (
        rows["b"][:2] == (0, 0) and "5 excluded: not positively homogeneous: F.gelu" in rows["b"][2]
    )
    assert rows["c"] == (6, 6, "")
    assert rows["d"][:2] == (0, 0) and "2 excluded: model output" in rows["d"][2]
    assert s.summary().splitlines()[-1] == (
        "10 generators (10 neuron) over 6 parameters; 7 producing channels excluded"
    )
    assert s.excluded == [
        gaugefix.Exclusion("b", "not positively homogeneous: F.gelu in '<root>'", (0, 1, 2, 3, 4)),
        gaugefix.Exclusion("d", "model output (rescaling it changes the function)", (0, 1)),
    ]


def test_summary_of_a_model_without_neurons():
    s = gaugefix.discover(nn.Linear(3, 2).double(), torch.randn(2, 3, dtype=DTYPE))
    assert s.num_generators == 0 and s.params == {}
    assert s.summary().splitlines()[-1].startswith("0 generators (none) over 0 parameters")
    assert gaugefix.imbalance(nn.Linear(3, 2), s).shape == (0,)


# --- inspection and binding ----------------------------------------------------------------------
def test_neuron_slices_and_range():
    model = zoo.mlp((3, 4, 2)).double()
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    assert s.generator(2).incoming == [("0.weight", (2, None)), ("0.bias", (2,))]
    assert s.generator(2).outgoing == [("2.weight", (None, 2))]
    for n in (-1, 4):
        with pytest.raises(IndexError):
            s.generator(n)


def test_bind_checks_type_names_and_shapes():
    model = zoo.mlp((3, 4, 2)).double()
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    tensors = {k: v.detach() for k, v in model.named_parameters()}
    assert set(s.bind(tensors)) == {"0.weight", "0.bias", "2.weight"}
    with pytest.raises(TypeError):
        s.bind([1, 2])
    with pytest.raises(ValueError, match="0.bias"):
        s.bind({k: v for k, v in tensors.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="shape"):
        s.bind(tensors | {"2.weight": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="2.weight"):
        s.bind(tensors | {"2.weight": 1.0})


def test_plan_uses_a_dummy_slot_for_missing_generators():
    model = zoo.mlp((3, 4, 2)).double()
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    plan = {p.name: p for p in s.plan(torch.device("cpu"))}
    assert [t.sign for t in plan["0.weight"].terms] == [1]  # the input is fixed
    assert torch.equal(plan["0.weight"].terms[0].slots.view(-1), torch.arange(4))
    assert [t.sign for t in plan["2.weight"].terms] == [-1]  # the output layer's rows are fixed
    assert torch.equal(plan["2.weight"].terms[0].slots.view(-1), torch.arange(4))
    assert s.plan("cpu") is s.plan(torch.device("cpu"))  # cached
    # a map with -1 entries (excluded channels) points them at the dummy slot num_generators
    cnn = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    sub = gaugefix.discover(cnn, torch.randn(2, 3, dtype=DTYPE)).restrict(
        torch.tensor([True, False, True, False]), "for the test"
    )
    slots = {p.name: p for p in sub.plan("cpu")}["0.weight"].terms[0].slots.view(-1)
    assert slots.tolist() == [0, 2, 1, 2]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=any_case, seed=st.integers(0, 2**16))
def test_restrict_is_the_subgroup_of_the_kept_generators(case, seed):
    """Acting with the restricted structure is acting with the full one where the left-out
    generators have h = 0; the imbalance of a kept generator is unchanged; the left-out producing
    channels are listed with the reason, and the result survives save/load."""
    s = gaugefix.discover(case.model, *case.inputs)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(s.num_generators, generator=g) < 0.5
    r = s.restrict(keep, "left out for the test")
    assert r.num_generators == int(keep.sum())
    assert r.generator_layers == [
        x for x, k in zip(s.generator_layers, keep.tolist(), strict=True) if k
    ]
    h = torch.randn(r.num_generators, dtype=DTYPE, generator=g)
    full_h = torch.zeros(s.num_generators, dtype=DTYPE)
    full_h[keep] = h
    start = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    gaugefix.apply_gauge_(case.model, s, full_h)
    expected = {k: v.detach().clone() for k, v in case.model.named_parameters()}
    with torch.no_grad():
        for k, v in case.model.named_parameters():
            v.copy_(start[k])
    gaugefix.apply_gauge_(case.model, r, h)
    for k, v in case.model.named_parameters():
        assert torch.equal(v, expected[k]), k
    mu = gaugefix.imbalance(case.model, s)
    # the same squares, summed in the order of each structure's groups of equally shaped
    # parameters: equal up to the rounding of that order
    change = gaugefix.imbalance(case.model, r) - mu[keep]
    if change.numel():
        assert float(change.abs().max()) <= 1e-13 * float(mu.abs().max())
    touched = {
        name
        for name, m in s.params.items()
        if any(bool(keep[t.index[t.index >= 0]].any()) for t in m.terms)
    }
    assert set(r.params) == touched
    new = r.excluded[len(s.excluded) :]
    assert r.excluded[: len(s.excluded)] == s.excluded
    assert all(e.reason == "left out for the test" for e in new)
    lost = sum(len(e.channels) for e in new)
    assert (lost > 0) == bool((~keep).any())
    path_free = GaugeStructure.from_dict(json.loads(json.dumps(r.to_dict())))
    assert_equal_structures(r, path_free)


def test_restrict_to_all_or_none():
    torch.manual_seed(0)
    model = zoo.mlp((4, 5, 3, 2)).to(DTYPE)
    s = gaugefix.discover(model, torch.randn(2, 4, dtype=DTYPE))
    assert_equal_structures(s.restrict(torch.ones(s.num_generators, dtype=torch.bool), "x"), s)
    none = s.restrict(torch.zeros(s.num_generators, dtype=torch.bool), "frozen")
    assert none.num_generators == 0 and none.params == {} and none.generator_layers == []
    assert {(e.module, e.channels) for e in none.excluded if e.reason == "frozen"} == {
        ("0", tuple(range(5))),
        ("2", tuple(range(3))),
    }
    with pytest.raises(ValueError, match=r"keep must have shape \(8,\)"):
        s.restrict(torch.ones(3, dtype=torch.bool), "x")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=any_case)
def test_every_summary_row_without_generators_says_why(case):
    s = gaugefix.discover(case.model, *case.inputs)
    for layer, (channels, generators, notes) in summary_rows(s).items():
        assert generators > 0 or notes, (layer, channels)
