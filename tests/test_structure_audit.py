"""Audit of ``GaugeStructure`` as an object: exact round trips of every field, loading refuses
malformed data with one line (never a structure that crashes later or moves a model off its
orbit), ``bind`` refuses other models, ``restrict`` is the subgroup, and ``discover``'s
arguments are checked."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import DTYPE, randomise_
from gaugefix import GaugeStructure, zoo
from gaugefix.moment import in_out_sums
from gaugefix.structure import ParamTerms, Term

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-12


def assert_identical(a: GaugeStructure, b: GaugeStructure) -> None:
    """Every field equal, index maps bit for bit and int64."""
    assert type(b) is GaugeStructure and a.num_generators == b.num_generators
    assert list(a.params) == list(b.params)
    for name, p in a.params.items():
        q = b.params[name]
        assert (p.name, p.shape, len(p.terms)) == (q.name, q.shape, len(q.terms)), name
        for s, t in zip(p.terms, q.terms, strict=True):
            assert s.sign == t.sign and t.index.dtype == torch.int64, name
            assert torch.equal(s.index, t.index), name
    assert a.produced.keys() == b.produced.keys()
    assert all(torch.equal(v, b.produced[k]) for k, v in a.produced.items())
    assert a.excluded == b.excluded and a.param_order == b.param_order
    assert (a.generator_layers, a.generator_kinds) == (b.generator_layers, b.generator_kinds)
    assert a.notes == b.notes and type(b.notes) is tuple
    assert a.in_out == b.in_out and type(b.in_out) is frozenset
    assert a.summary() == b.summary()


class ValueRead(nn.Module):
    """A forward that reads its input's value into Python: its structure carries a note."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(h) if float(x.mean()) > -1e9 else -self.fc2(h)


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, activation_function="relu"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def ids() -> Tensor:
    return torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))


def zoo_case(name: str) -> tuple[nn.Module, tuple]:
    factory, shape = zoo.EXAMPLES[name]
    torch.manual_seed(0)
    model = randomise_(factory(), 0).eval()
    return model, (torch.randn(2, *shape[1:], dtype=DTYPE),)


CASES = {
    "mlp": lambda: zoo_case("mlp"),
    "resnet": lambda: zoo_case("resnet"),
    "densenet": lambda: zoo_case("densenet"),
    "transformer": lambda: zoo_case("transformer"),
    "gpt-tied": lambda: (zoo.GPT(vocab=16, dim=8, heads=2, tied=True).double().eval(), (ids(),)),
    "gpt-untied": lambda: (zoo.GPT(vocab=16, dim=8, heads=2).double().eval(), (ids(),)),
    "hf-gpt2": lambda: (gpt2(), (ids(),)),
    "no-generators": lambda: (nn.Linear(3, 2).double(), (torch.randn(2, 3, dtype=DTYPE),)),
}


def discovered(name: str) -> tuple[nn.Module, tuple, GaugeStructure]:
    model, inputs = CASES[name]()
    return model, inputs, gaugefix.discover(model, *inputs)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def moved(model: nn.Module, structure: GaugeStructure, h: Tensor) -> dict[str, Tensor]:
    """The parameters after ``apply_gauge_(model, structure, h)``, the model put back."""
    start = snapshot(model)
    gaugefix.apply_gauge_(model, structure, h)
    out = snapshot(model)
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(start[k])
    return out


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_save_load_keeps_every_field(name, tmp_path):
    model, _, s = discovered(name)
    path = tmp_path / "s.json"
    s.save(path)
    assert_identical(s, GaugeStructure.load(path))
    assert_identical(s, GaugeStructure.from_dict(json.loads(json.dumps(s.to_dict()))))
    if name == "hf-gpt2":  # Conv1D weights are stored [in, out]
        assert s.in_out and s.in_out <= s.params.keys()
    h = torch.randn(s.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    loaded = moved(model, GaugeStructure.load(path), h)
    assert all(torch.equal(v, loaded[k]) for k, v in moved(model, s, h).items())


def test_notes_and_a_restricted_structure_round_trip():
    model = ValueRead().double()
    s = gaugefix.discover(model, torch.randn(4, 3, dtype=DTYPE), allow_value_dependent=True)
    assert s.notes
    r = s.restrict(torch.tensor([True, False, True, False]), "left out")
    for x in (s, r):
        assert_identical(x, GaugeStructure.from_dict(json.loads(json.dumps(x.to_dict()))))


def test_a_failed_save_leaves_the_file_as_it_was(tmp_path):
    _, _, s = discovered("mlp")
    path = tmp_path / "s.json"
    path.write_text("previous")
    s.notes = (object(),)  # not JSON
    with pytest.raises(TypeError):
        s.save(path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


# --- malformed data ------------------------------------------------------------------------------
def mlp_dict() -> dict:
    """The saved structure of a 3-4-2 ReLU MLP: 4 generators; 0.weight [4, 3] has one term
    (rows [4, 1], +1), 0.bias one (+1), 2.weight one (columns [1, 4], -1)."""
    model = zoo.mlp((3, 4, 2)).double()
    return gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE)).to_dict()


def set_(path: tuple, value) -> callable:
    def edit(d: dict) -> None:
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return edit


def extra_term(sign: int) -> callable:
    """A second term on 0.weight naming the same generators as its first, with ``sign``."""

    def edit(d: dict) -> None:
        term = copy.deepcopy(d["params"][0]["terms"][0])
        term["sign"] = sign
        d["params"][0]["terms"].append(term)

    return edit


WIDE = {"shape": [4, 3], "data": [0, 1, 2, 3] * 3}
MALFORMED = {
    "negative count": set_(("num_generators",), -1),
    "more generators than entries": set_(("num_generators",), 5),
    "huge count": set_(("num_generators",), 10**12),
    "count as text": set_(("num_generators",), "4"),
    "count as float": set_(("num_generators",), 4.0),
    "count as bool": set_(("num_generators",), True),
    "duplicate parameter": lambda d: d["params"].append(copy.deepcopy(d["params"][0])),
    "index wider than its parameter": lambda d: (
        set_(("params", 0, "shape"), [4, 1])(d),
        set_(("params", 0, "terms", 0, "index"), WIDE)(d),
    ),
    "index of another size": set_(
        ("params", 0, "terms", 0, "index"), {"shape": [2, 1], "data": [0, 1]}
    ),
    "index with fewer dims": set_(
        ("params", 0, "terms", 0, "index"), {"shape": [4], "data": [0, 1, 2, 3]}
    ),
    "index out of range": set_(("params", 0, "terms", 0, "index", "data"), [0, 1, 2, 4]),
    "index below -1": set_(("params", 0, "terms", 0, "index", "data"), [0, 1, 2, -2]),
    "float index": set_(("params", 0, "terms", 0, "index", "data"), [0, 1, 2, 3.0]),
    "bool index": set_(("params", 0, "terms", 0, "index", "data"), [False, True, True, True]),
    "nested index data": set_(("params", 0, "terms", 0, "index", "data"), [[0], [1], [2], [3]]),
    "inferred index shape": set_(("params", 0, "terms", 0, "index", "shape"), [-1, 1]),
    "index data too short": set_(("params", 0, "terms", 0, "index", "data"), [0, 1, 2]),
    "sign as text": set_(("params", 0, "terms", 0, "sign"), "1"),
    "sign as float": set_(("params", 0, "terms", 0, "sign"), 1.5),
    "sign 2": set_(("params", 0, "terms", 0, "sign"), 2),
    "squared factor": extra_term(1),
    "factor cancelled by itself": extra_term(-1),
    "no terms": set_(("params", 1, "terms"), []),
    "generators that divide nothing": lambda d: d["params"].pop(),
    "float shape": set_(("params", 0, "shape"), [4.0, 3]),
    "negative shape": set_(("params", 0, "shape"), [-4, 3]),
    "name not text": set_(("params", 0, "name"), 5),
    "parameter not in param_order": set_(("param_order",), ["0.bias", "2.weight"]),
    "param_order as text": set_(("param_order",), "0.weight"),
    "duplicate in param_order": lambda d: d["param_order"].append("0.bias"),
    "negative layer": set_(("generator_layers", 0), -1),
    "layer out of range": set_(("generator_layers", 0), 1),
    "too few layers": set_(("generator_layers",), [0, 0]),
    "layer name not text": set_(("layers",), [0]),
    "too few kinds": set_(("generator_kinds",), ["neuron"] * 3),
    "unknown kind": set_(("generator_kinds", 0), "magic"),
    "produced out of range": set_(("produced", "0.weight", "data", 0), 4),
    "produced of two dims": set_(("produced", "0.weight"), {"shape": [2, 2], "data": [0, 1, 2, 3]}),
    "channels as text": set_(("excluded", 0, "channels"), "01"),
    "negative channel": set_(("excluded", 0, "channels"), [-1]),
    "module not text": set_(("excluded", 0, "module"), 2),
    "notes as text": set_(("notes",), "a note"),
    "in_out as text": set_(("in_out",), "0.weight"),
    "missing key": lambda d: d.pop("param_order"),
    "params not a list": set_(("params",), {"0.weight": 1}),
    "a term not a map": set_(("params", 0, "terms", 0), [1, 0]),
}


@pytest.mark.parametrize("edit", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_data_is_refused_with_one_line(edit, tmp_path):
    data = mlp_dict()
    GaugeStructure.from_dict(copy.deepcopy(data))  # the unedited data loads
    MALFORMED[edit](data)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    for load in (lambda: GaugeStructure.from_dict(data), lambda: GaugeStructure.load(path)):
        with pytest.raises(ValueError, match="malformed saved GaugeStructure") as info:
            load()
        assert len(str(info.value).splitlines()) == 1


def test_what_malformed_data_would_have_done():
    """The edits the checks refuse that the loader used to accept moved the model off its orbit
    (a squared factor, a cancelled one, generators dividing nothing): the function changed."""
    model = zoo.mlp((3, 4, 2)).double()
    x = torch.randn(5, 3, dtype=DTYPE)
    for edit in ("squared factor", "factor cancelled by itself", "generators that divide nothing"):
        data = mlp_dict()
        MALFORMED[edit](data)
        s = GaugeStructure(4, {}, [], ["0"] * 4, ["neuron"] * 4, {}, data["param_order"])
        s.params = {
            p["name"]: ParamTerms(
                p["name"],
                tuple(p["shape"]),
                tuple(
                    Term(torch.tensor(t["index"]["data"]).view(t["index"]["shape"]), t["sign"])
                    for t in p["terms"]
                ),
            )
            for p in data["params"]
        }
        m = copy.deepcopy(model)
        before = m(x)
        gaugefix.random_gauge_(m, s, 1.0, generator=torch.Generator().manual_seed(0))
        assert float((m(x) - before).abs().max()) > 1e-3, edit


def test_not_a_structure_says_so():
    for data in ([], {"format": "other"}, {}):
        with pytest.raises(ValueError, match="not a saved GaugeStructure"):
            GaugeStructure.from_dict(data)


# --- version 1 -----------------------------------------------------------------------------------
class Recurrent(nn.Module):
    """One hidden Linear applied to its own output: at its diagonal entries the row's and the
    column's generator are the same, so the entry is invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        return self.out(F.relu(self.hidden(F.relu(self.hidden(h)))))


def test_a_version_1_file_with_a_layer_applied_to_its_own_output():
    """Version 1 wrote a layer applied to its own output as a rows map and a columns map naming
    one generator at its diagonal entries (the factors cancel there). Loaded, the diagonal is
    neither multiplied nor divided, as in the structure discovered now: the same S_in, S_out."""
    torch.manual_seed(0)
    model = Recurrent().double()
    s = gaugefix.discover(model, torch.randn(5, 3, dtype=DTYPE))
    assert s.num_generators == 4
    rows = {"shape": [4, 1], "data": [0, 1, 2, 3]}
    cols = {"shape": [1, 4], "data": [0, 1, 2, 3]}
    v1 = {
        "format": "gaugefix.GaugeStructure/1",
        "num_neurons": 4,
        "params": [
            {"name": "inp.weight", "shape": [4, 3], "rows": rows, "cols": None},
            {
                "name": "inp.bias",
                "shape": [4],
                "rows": {"shape": [4], "data": [0, 1, 2, 3]},
                "cols": None,
            },
            {"name": "hidden.weight", "shape": [4, 4], "rows": rows, "cols": cols},
            {
                "name": "hidden.bias",
                "shape": [4],
                "rows": {"shape": [4], "data": [0, 1, 2, 3]},
                "cols": None,
            },
            {"name": "out.weight", "shape": [2, 4], "rows": None, "cols": cols},
        ],
        "excluded": [],
        "layers": ["inp"],
        "neuron_layers": [0, 0, 0, 0],
        "param_order": s.param_order,
    }
    old = GaugeStructure.from_dict(v1)
    for a, b in zip(in_out_sums(model, s), in_out_sums(model, old), strict=True):
        assert torch.equal(a, b)
    h = torch.randn(4, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    new = moved(model, old, h)
    assert all(torch.equal(v, new[k]) for k, v in moved(model, s, h).items())


def mlp_v1() -> dict:
    """A 3-4-2 ReLU MLP's structure as version 1 wrote it."""
    index = {"shape": [4], "data": [0, 1, 2, 3]}
    return {
        "format": "gaugefix.GaugeStructure/1",
        "num_neurons": 4,
        "params": [
            {
                "name": "0.weight",
                "shape": [4, 3],
                "rows": {"shape": [4, 1], "data": [0, 1, 2, 3]},
                "cols": None,
            },
            {"name": "0.bias", "shape": [4], "rows": index, "cols": None},
            {
                "name": "2.weight",
                "shape": [2, 4],
                "rows": None,
                "cols": {"shape": [1, 4], "data": [0, 1, 2, 3]},
            },
        ],
        "excluded": [],
        "layers": ["0"],
        "neuron_layers": [0, 0, 0, 0],
        "param_order": ["0.weight", "0.bias", "2.weight", "2.bias"],
    }


MALFORMED_V1 = {
    "huge count": set_(("num_neurons",), 10**12),
    "count below the layers": set_(("num_neurons",), 3),
    "float count": set_(("num_neurons",), 4.0),
    "rows out of range": set_(("params", 0, "rows", "data"), [0, 1, 2, 4]),
    "rows wider than the parameter": set_(("params", 1, "rows"), {"shape": [8], "data": [0] * 8}),
    "negative layer": set_(("neuron_layers", 0), -1),
    "no dividing map": lambda d: d["params"].pop(),
}


@pytest.mark.parametrize("edit", list(MALFORMED_V1), ids=list(MALFORMED_V1))
def test_malformed_version_1_data_is_refused_with_one_line(edit):
    data = mlp_v1()
    model = zoo.mlp((3, 4, 2)).double()
    x = torch.randn(5, 3, dtype=DTYPE)
    before = model(x)
    gaugefix.random_gauge_(model, GaugeStructure.from_dict(copy.deepcopy(data)), 1.0)
    assert float((model(x) - before).abs().max()) <= 1e-12 * float(before.abs().max())
    MALFORMED_V1[edit](data)
    with pytest.raises(ValueError, match="malformed saved GaugeStructure") as info:
        GaugeStructure.from_dict(data)
    assert len(str(info.value).splitlines()) == 1


# --- bind ----------------------------------------------------------------------------------------
class Parallel(nn.Module):
    """Two Linear layers reading the input, summed before a ReLU; ``tied``: one weight."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4, bias=False)
        self.out = nn.Linear(4, 2)
        if tied:
            self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.a(x) + self.b(x)))


def test_bind_refuses_a_model_with_a_tied_weight_untied():
    """A structure of the tied model moves ``a.weight`` for both branches; on the untied model
    ``b.weight`` would not move and the function would change: refused, nothing moved."""
    torch.manual_seed(0)
    tied, untied = Parallel(True).double(), Parallel(False).double()
    untied.load_state_dict(tied.state_dict())
    s = gaugefix.discover(tied, torch.randn(4, 3, dtype=DTYPE))
    assert s.num_generators == 4 and "b.weight" not in s.param_order
    before = snapshot(untied)
    with pytest.raises(ValueError, match="b.weight") as info:
        gaugefix.random_gauge_(untied, s, 1.0)
    assert len(str(info.value).splitlines()) == 1
    assert all(torch.equal(v, before[k]) for k, v in untied.named_parameters())
    # the other way round: the untied structure names b.weight, which the tied model lacks
    with pytest.raises(ValueError, match="b.weight"):
        gaugefix.random_gauge_(tied, gaugefix.discover(untied, torch.randn(4, 3, dtype=DTYPE)), 1.0)


def test_bind_refuses_renamed_extra_and_missing_parameters():
    model = zoo.mlp((3, 4, 2)).double()
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    s.bind(model)
    extra = copy.deepcopy(model)
    extra.register_parameter("scale", nn.Parameter(torch.ones(())))
    no_bias = zoo.mlp((3, 4, 2)).double()
    no_bias[2].bias = None  # not acted on: the names still differ
    renamed = nn.Sequential()
    for i, m in enumerate(model):
        renamed.add_module(f"l{i}", m)
    for other, name in ((extra, "scale"), (no_bias, "2.bias"), (renamed, "0.weight")):
        with pytest.raises(ValueError, match=rf"does not match.*{name}") as info:
            s.bind(other)
        assert len(str(info.value).splitlines()) == 1
    # a mapping of tensors (gradients, a part of the parameters) is checked name by name only
    assert set(s.bind({k: v for k, v in model.named_parameters() if k != "2.bias"})) == set(
        s.params
    )


# --- restrict ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hf-gpt2", "gpt-untied", "resnet"])
def test_restrict_moves_exactly_the_kept_generators(name):
    model, _, s = discovered(name)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(s.num_generators, generator=g) < 0.5
    r = s.restrict(keep, "left out")
    assert r.num_generators == int(keep.sum())
    assert r.generator_kinds == [
        k for k, x in zip(s.generator_kinds, keep.tolist(), strict=True) if x
    ]
    h = torch.randn(r.num_generators, dtype=DTYPE, generator=g)
    full = torch.zeros(s.num_generators, dtype=DTYPE)
    full[keep] = h
    expected, got = moved(model, s, full), moved(model, r, h)
    for k, v in expected.items():
        assert float((got[k] - v).abs().max()) <= EXACT * float(v.abs().max()), k
    # each kept generator names the entries it named before, renumbered
    old = torch.nonzero(keep).reshape(-1).tolist()
    for n in range(0, r.num_generators, max(1, r.num_generators // 7)):
        assert r.generator(n) == s.generator(old[n])
    lost = {(e.module, c) for e in r.excluded if e.reason == "left out" for c in e.channels}
    dropped = {
        (name.rsplit(".", 1)[0], c)
        for name, index in s.produced.items()
        for c, g in enumerate(index.tolist())
        if g >= 0 and not keep[g]
    }
    assert lost == dropped


def test_restrict_refuses_a_keep_that_is_not_a_mask():
    _, _, s = discovered("mlp")
    n = s.num_generators
    for keep in (torch.arange(n), torch.ones(n), [1] * n):
        with pytest.raises(TypeError, match="bool"):
            s.restrict(keep, "x")
    with pytest.raises(TypeError, match="reason"):
        s.restrict(torch.ones(n, dtype=torch.bool), 3)
    assert s.restrict([True] * n, "x").num_generators == n


# --- inspection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hf-gpt2", "gpt-tied", "resnet", "densenet"])
def test_reported_counts_match_the_terms(name):
    _, _, s = discovered(name)
    incoming = torch.zeros(s.num_generators, dtype=torch.long)
    outgoing = torch.zeros(s.num_generators, dtype=torch.long)
    for p in s.params.values():
        for t in p.terms:
            index = t.index.expand(p.shape).reshape(-1)
            side = incoming if t.sign > 0 else outgoing
            side.index_add_(0, index[index >= 0], torch.ones_like(index[index >= 0]))
    assert bool((incoming > 0).all()) and bool((outgoing > 0).all())
    for n in range(s.num_generators):
        entries = s.generator(n)
        sizes = [
            [
                math.prod(s.params[p].shape[d] for d, i in enumerate(idx) if i is None)
                for p, idx in side
            ]
            for side in entries
        ]
        assert (sum(sizes[0]), sum(sizes[1])) == (int(incoming[n]), int(outgoing[n]))
    assert sum(s.kind_counts().values()) == s.num_generators
    lines = s.summary().splitlines()
    rows = lines[2 : lines.index(lines[1], 2)]
    assert sum(int(line.split(None, 3)[2]) for line in rows) == s.num_generators
    excluded = sum(len(e.channels) for e in s.excluded)
    plural = {n: "" if n == 1 else "s" for n in (s.num_generators, excluded)}
    assert f"{s.num_generators} generator{plural[s.num_generators]} (" in lines[-1 - len(s.notes)]
    assert f"{excluded} producing channel{plural[excluded]} excluded" in lines[-1 - len(s.notes)]
    with pytest.raises(TypeError):
        s.generator(0.5)


# --- discover's arguments ------------------------------------------------------------------------
def double_rule(ctx, result, input, other):
    return ctx.labels(input).expand(result.shape)


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"allow_value_dependent": "no"}, TypeError, "allow_value_dependent"),
        ({"allow_value_dependent": None}, TypeError, "allow_value_dependent"),
        ({"rules": None}, TypeError, "rules"),
        ({"rules": {torch.maximum: double_rule}}, TypeError, "rules"),
        ({"rules": (torch.maximum, double_rule)}, TypeError, "pairs"),
        ({"rules": [torch.maximum]}, TypeError, "pairs"),
    ],
)
def test_discover_checks_its_arguments(kwargs, error, text):
    model = zoo.mlp((3, 4, 2)).double()
    before = snapshot(model)
    with pytest.raises(error, match=text) as info:
        gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE), **kwargs)
    assert len(str(info.value).splitlines()) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
