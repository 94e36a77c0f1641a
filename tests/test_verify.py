"""``gaugefix.verify``: a numerical check of a structure on other inputs.

Exact structures (the zoo's, tiny GPT-2 and Llama) verify at other batch sizes and lengths to
1e-12. On the models whose sizes escape the trace (the strict xfails of ``test_size_numbers*``),
verify at another batch size flags exactly the generators whose own gauge moves the outputs
there (the oracle: a gauge ``h = e_n`` of each generator alone), and the restricted structure is
exact there. A wrong generator planted among 256 good ones is found, within ``4 + 4 k log2 N``
forwards. Nothing verify is given changes, and bad arguments raise before anything runs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import ZOO_ARCHS, assert_same_bits, rel_change, snapshot
from gaugefix import zoo
from gaugefix.verification import VERIFY_TOLERANCE
from test_rules_audit3 import Two
from test_size_numbers import NOT_CAUGHT
from test_size_numbers3 import MIXED
from test_size_numbers_audit import Warmed

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE = torch.float64
EXACT = 1e-12  # an exact structure: float64 rounding only
RESTRICTED = 1e-10
R = F.relu


def randn(*shape: int, seed: int = 7) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, *inputs: Tensor) -> Tensor:
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        return model(*inputs)


def moves_alone(model: nn.Module, s: gaugefix.GaugeStructure, x: Tensor) -> Tensor:
    """The oracle: ``[num_generators]`` bool, true where a gauge ``h = e_n`` of generator ``n``
    alone changes ``model(x)`` by more than the tolerance (relative)."""
    before = outputs(model, x)
    moved = []
    for n in range(s.num_generators):
        gauged = copy.deepcopy(model)
        h = torch.zeros(s.num_generators, dtype=DTYPE)
        h[n] = 1.0
        gaugefix.apply_gauge_(gauged, s, h)
        moved.append(rel_change(before, outputs(gauged, x)) > VERIFY_TOLERANCE)
    return torch.tensor(moved)


def worst_gauged(model: nn.Module, s: gaugefix.GaugeStructure, x: Tensor) -> float:
    """The relative change of ``model(x)`` under a random gauge of scale 2 of ``s`` (a copy)."""
    gauged = copy.deepcopy(model)
    gaugefix.random_gauge_(gauged, s, 2.0, generator=torch.Generator().manual_seed(3))
    return rel_change(outputs(model, x), outputs(gauged, x))


# --- exact structures ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ZOO_ARCHS)
def test_exact_structures_of_the_zoo_verify_at_other_batch_sizes(arch):
    torch.manual_seed(0)
    factory, shape = zoo.EXAMPLES[arch]
    model = factory().to(DTYPE).eval()
    s = gaugefix.discover(model, randn(2, *shape[1:]))
    assert s.num_generators > 0
    for batch in (1, 5):
        result = gaugefix.verify(model, s, randn(batch, *shape[1:], seed=batch))
        assert result.ok and result.max_change <= EXACT, (arch, batch, result.max_change)
        assert result.broken.dtype == torch.bool and not result.broken.any()
        assert result.broken.shape == (s.num_generators,)


def tiny_hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=64,
            activation_function="relu", bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).to(DTYPE).eval()
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2,
        tie_word_embeddings=False, hidden_act="relu", bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(DTYPE).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tiny_hugging_face_models_verify_at_other_batch_sizes_and_lengths(name):
    model = tiny_hf(name)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    s = gaugefix.discover(model, ids)
    assert s.num_generators > 0
    for shape in ((1, 9), (3, 4)):
        other = torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(2))
        result = gaugefix.verify(model, s, other, use_cache=False)
        assert result.ok and result.max_change <= EXACT, (shape, result.max_change)


# --- the blind spots of discovery --------------------------------------------------------------
def two(f, batch: int) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model = Two(f).to(DTYPE)
    x = 2 * randn(batch, 4)
    outputs(model, x)  # materialise the lazy head
    return model, gaugefix.discover(model, x)


def warmed(batch: int) -> tuple[nn.Module, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    model, x = Warmed().double(), randn(batch, 4)
    outputs(model, x)  # the cache holds a plain 0 for this batch size
    return model, gaugefix.discover(model, x)


FLIP = lambda m, h, g, x: R(h).reshape(3, -1).flip(0).reshape(x.shape[0], -1)  # noqa: E731
BLIND_SPOTS = {  # name: (built at the example's batch, another batch)
    "h + 0.5 * (B - 5)": (lambda: two(NOT_CAUGHT["h + 0.5 * (B - 5)"][0], 5), 3),
    "reshape(2, -1, 3) at 2": (lambda: two(MIXED["reshape(2, -1, 3).transpose(0, 2), back"], 2), 4),
    "reshape(3, -1).flip(0) at 3": (lambda: two(FLIP, 3), 4),
    "a size cached before discovery": (lambda: warmed(5), 3),
}


@pytest.mark.parametrize("build, batch", list(BLIND_SPOTS.values()), ids=list(BLIND_SPOTS))
def test_verify_flags_exactly_the_generators_that_move_the_outputs(build, batch):
    model, s = build()
    x = randn(batch, 4, seed=batch)
    expected = moves_alone(model, s, x)
    assert expected.any(), s.summary()  # the blind spot is real at this batch size
    result = gaugefix.verify(model, s, x)
    assert not result.ok and result.max_change > 1e-3
    assert torch.equal(result.broken, expected), (result.broken, expected)
    kept = s.restrict(~result.broken, f"moves the outputs at batch {batch}")
    assert kept.num_generators == int((~expected).sum())
    again = gaugefix.verify(model, kept, x)
    assert again.ok and again.max_change <= RESTRICTED and not again.broken.any()
    assert worst_gauged(model, kept, x) <= RESTRICTED, kept.summary()


# --- a wrong generator among many good ones ------------------------------------------------------
WIDTH = 256


class Planted(nn.Module):
    """``l2(act(l1(x)))`` with ``WIDTH`` units: ReLU, except ``tanh`` on the units ``wrong``
    (no rescaling symmetry there). Counts its forwards in ``Planted.calls``."""

    calls = 0

    def __init__(self, wrong: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.wrong = list(wrong)
        self.l1, self.l2 = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        Planted.calls += 1
        h = self.l1(x)
        a = R(h)
        if self.wrong:
            a[:, self.wrong] = torch.tanh(h[:, self.wrong])
        return self.l2(a)


@pytest.fixture(scope="module")
def planted_structure() -> gaugefix.GaugeStructure:
    """The structure of the all-ReLU ``Planted``: one generator per unit, which a ``Planted``
    with ``tanh`` units is refused nothing for (the same modules and names)."""
    s = gaugefix.discover(Planted().double(), randn(5, 4))
    assert s.num_generators == WIDTH
    return s


@settings(max_examples=15, deadline=None)
@given(wrong=st.sets(st.integers(0, WIDTH - 1), min_size=1, max_size=3), batch=st.integers(1, 6))
def test_a_planted_wrong_generator_is_found_among_hundreds(planted_structure, wrong, batch):
    torch.manual_seed(1)
    model = Planted(tuple(sorted(wrong))).double()
    Planted.calls = 0
    result = gaugefix.verify(model, planted_structure, randn(batch, 4, seed=batch))
    expected = torch.zeros(WIDTH, dtype=torch.bool)
    expected[sorted(wrong)] = True
    assert torch.equal(result.broken, expected), torch.nonzero(result.broken).flatten()
    assert Planted.calls <= 5 + 4 * len(wrong) * math.ceil(math.log2(WIDTH))


class TanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(R(self.l1(x)))))


def claimed_homogeneous(ctx, result, input):
    """A wrong rule: ``tanh(a x) = a tanh(x)`` (true of ReLU, not of tanh)."""
    return ctx.labels(input)


def test_a_wrong_user_rule_is_found_and_restricted_away():
    """A user rule claiming ``torch.tanh`` positively homogeneous adds the 6 units of ``l2``
    to the 6 true ones of ``l1``: verify flags those 6 alone."""
    torch.manual_seed(0)
    model = TanhMLP().double()
    honest = gaugefix.discover(model, randn(5, 4))
    s = gaugefix.discover(model, randn(5, 4), rules=[(torch.tanh, claimed_homogeneous)])
    assert (honest.num_generators, s.num_generators) == (6, 12)
    x = randn(3, 4)
    result = gaugefix.verify(model, s, x)
    assert torch.equal(result.broken, moves_alone(model, s, x))
    assert int(result.broken.sum()) == 6
    kept = s.restrict(~result.broken, "tanh is not homogeneous")
    assert gaugefix.verify(model, kept, x).max_change <= RESTRICTED


# --- nothing changes ---------------------------------------------------------------------------
def trained() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double().train()


def test_verify_in_train_mode_with_dropout_and_batchnorm_changes_nothing():
    model, x = trained(), randn(5, 4)
    s = gaugefix.discover(model, x)
    assert s.num_generators > 0
    other = randn(3, 4)
    saved, given_input, rng = snapshot(model), other.clone(), torch.get_rng_state()
    result = gaugefix.verify(model, s, other)
    assert result.ok and result.max_change <= EXACT, result.max_change
    assert_same_bits(model, saved)
    assert torch.equal(other, given_input) and torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert int(model[1].num_batches_tracked) == int(saved["1.num_batches_tracked"])


def test_verify_in_float32_runs_in_float64_and_keeps_the_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    s = gaugefix.discover(model, x)
    saved = snapshot(model)
    result = gaugefix.verify(model, s, torch.randn(2, 4), **{})
    assert result.ok and result.max_change <= EXACT, result.max_change
    assert_same_bits(model, saved)
    assert next(model.parameters()).dtype == torch.float32


def test_a_structure_without_generators_is_ok_without_a_forward():
    model = Planted((0,)).double()
    s = gaugefix.discover(nn.Sequential(nn.Linear(4, 2)).double(), randn(3, 4))
    assert s.num_generators == 0
    with pytest.raises(ValueError, match="does not match"):
        gaugefix.verify(model, s, randn(3, 4))  # another model's names
    full = gaugefix.discover(model, randn(3, 4))
    empty = full.restrict(torch.zeros(full.num_generators, dtype=torch.bool), "none kept")
    Planted.calls = 0
    result = gaugefix.verify(model, empty, randn(3, 4))
    assert Planted.calls == 0
    assert result.ok and result.max_change == 0.0 and result.broken.shape == (0,)


class Zero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(R(self.l1(x))) * 0.0


ANOTHER = nn.Linear(4, 2).double()


def meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes without values)."""
    return copy.deepcopy(model).to("meta")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, s, x: gaugefix.verify(s, s, x), TypeError, "nn.Module"),
        (lambda m, s, x: gaugefix.verify(m, m, x), TypeError, "GaugeStructure"),
        (lambda m, s, x: gaugefix.verify(ANOTHER, s, x), ValueError, "does not match"),
        (lambda m, s, x: gaugefix.verify(m, s, x * math.nan), gaugefix.VerificationError, "finite"),
        (lambda m, s, x: gaugefix.verify(m, s, x[:, :3]), RuntimeError, "cannot be multiplied"),
        (lambda m, s, x: gaugefix.verify(m, s, x[:0]), gaugefix.VerificationError, "empty"),
        (lambda m, s, x: gaugefix.verify(m, s, "x"), TypeError, "must be Tensor"),
        (lambda m, s, x: gaugefix.verify(meta(m), s, x), gaugefix.VerificationError, "meta"),
        (
            lambda m, s, x: gaugefix.verify(meta(m), s, x.to("meta")),
            gaugefix.VerificationError,
            "meta",
        ),
    ],
    ids=["not a module", "not a structure", "another model", "NaN outputs", "wrong input shape"]
    + ["empty outputs", "a string input", "a model on meta", "a model and inputs on meta"],
)
def test_bad_arguments_raise_and_change_nothing(call, error, match):
    model = trained().eval()
    x = randn(3, 4)
    s = gaugefix.discover(model, x)
    saved, given_input, rng = snapshot(model), x.clone(), torch.get_rng_state()
    with pytest.raises(error, match=match):
        call(model, s, x)
    assert_same_bits(model, saved)
    assert torch.equal(x, given_input) and torch.equal(torch.get_rng_state(), rng)


class Keyworded(nn.Module):
    """A forward whose keyword arguments are named like ``verify``'s own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor, model: Tensor, structure: Tensor) -> Tensor:
        return self.l2(R(self.l1(x * model))) + structure


def test_forward_keywords_named_model_and_structure_reach_the_forward():
    torch.manual_seed(0)
    net, x = Keyworded().double(), randn(3, 4)
    kwargs = {"model": randn(3, 4, seed=8), "structure": randn(3, 2, seed=9)}
    s = gaugefix.discover(net, x, **kwargs)
    assert s.num_generators == 6
    result = gaugefix.verify(net, s, randn(5, 4), model=randn(5, 4), structure=randn(5, 2))
    assert result.ok and result.max_change <= EXACT, result.max_change


def test_outputs_that_are_all_zero_cannot_show_a_change():
    model = Zero().double()
    s = gaugefix.discover(model, randn(3, 4))
    with pytest.raises(gaugefix.VerificationError, match="all zero"):
        gaugefix.verify(model, s, randn(2, 4))


# --- Python state a forward keeps ----------------------------------------------------------------
HIDDEN = 6


class Cache:
    """The outputs of the forwards it was given to (a key-value cache's role)."""

    def __init__(self, *items: Tensor) -> None:
        self.items = list(items)


class Stateful(nn.Module):
    """``head(relu(l1(x))) + extra``, exact under the ``HIDDEN`` unit generators of ``l1``, with
    ``extra`` read from Python state the forward updates (``kind``): a step counter, a list it
    appends its outputs to, a weight memoised on the first call (stale after a gauge of a model
    already run), a cache object given as ``cache=``. ``tanh`` on the units ``wrong``."""

    def __init__(self, kind: str, wrong: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.kind, self.wrong = kind, list(wrong)
        self.l1, self.head = nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)
        self.step, self.history, self.memo = 0, [], {}

    def hidden(self, x: Tensor) -> Tensor:
        h = self.l1(x)
        a = R(h)
        if self.wrong:
            a[:, self.wrong] = torch.tanh(h[:, self.wrong])
        return a

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.kind == "memoised weight":
            w = self.memo.setdefault("l1", self.l1.weight.detach().clone())
            return self.head(R(F.linear(x, w, self.l1.bias)))
        out = self.head(self.hidden(x))
        if self.kind == "memoised output":  # the same output for the same shape
            return self.memo.setdefault(x.shape, out)
        self.step += 1
        extra = {"step counter": self.step, "appended list": sum(self.history, 0.0 * out)}
        if self.kind == "cache object":
            extra["cache object"] = sum(cache.items, 0.0 * out)
            cache.items.append(out)
        self.history.append(out)
        return out + extra[self.kind]


EXACT_STATEFUL = ["step counter", "appended list", "memoised weight", "cache object"]


def python_state(model: Stateful) -> tuple:
    return model.step, len(model.history), dict(model.memo), model.kind, model.wrong


@pytest.mark.parametrize("kind", EXACT_STATEFUL)
def test_python_state_a_forward_keeps_raises_no_false_alarm(kind):
    torch.manual_seed(0)
    model = Stateful(kind).double()
    s = gaugefix.discover(copy.deepcopy(model), randn(5, 4), cache=Cache())
    assert s.num_generators == HIDDEN
    x, cache = randn(3, 4), Cache(randn(3, 2, seed=1))
    before, saved, rng = python_state(model), snapshot(model), torch.get_rng_state()
    result = gaugefix.verify(model, s, x, cache=cache)
    assert result.ok and result.max_change <= EXACT, result.max_change
    assert not result.broken.any()
    assert python_state(model) == before and model.training
    assert_same_bits(model, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(cache.items) == 1 and torch.equal(cache.items[0], randn(3, 2, seed=1))


@pytest.mark.parametrize("kind", ["step counter", "appended list", "memoised output"])
def test_python_state_neither_hides_nor_adds_to_a_real_move(kind):
    """Units 1 and 4 through ``tanh``: verify flags them alone (the oracle, on a fresh copy of
    the model for each forward)."""
    torch.manual_seed(0)
    s = gaugefix.discover(Stateful(kind).double(), randn(5, 4))
    model = Stateful(kind, wrong=(1, 4)).double()
    model.load_state_dict(Stateful(kind).double().state_dict())
    expected = torch.zeros(HIDDEN, dtype=torch.bool)
    expected[[1, 4]] = True
    result = gaugefix.verify(model, s, randn(3, 4))
    assert not result.ok and result.max_change > 1e-3
    assert torch.equal(result.broken, expected), result.broken


def test_a_model_already_run_keeps_its_memo_and_the_move_it_causes():
    """A memo filled before ``verify`` is the model's state: a gauge of the model leaves the
    memoised weight stale and moves the outputs, which verify reports (each generator whose
    gauge ``h = e_n`` moves them at least; its random ``h`` may wake a unit ``e_n`` leaves dead)."""
    torch.manual_seed(0)
    model = Stateful("memoised weight").double()
    s = gaugefix.discover(copy.deepcopy(model), randn(5, 4))
    outputs(model, randn(2, 4))  # fills the memo
    x = randn(3, 4)
    expected = moves_alone(model, s, x)  # a gauge of a copy that keeps the memo
    assert expected.any()
    result = gaugefix.verify(model, s, x)
    assert not result.ok and not (expected & ~result.broken).any(), (result.broken, expected)


class Uncopyable(Cache):
    def __deepcopy__(self, memo: dict) -> Cache:
        raise RuntimeError("a cache that refuses copies")


def test_an_input_that_cannot_be_copied_raises_and_is_left_as_it_was():
    torch.manual_seed(0)
    model = Stateful("cache object").double()
    s = gaugefix.discover(copy.deepcopy(model), randn(5, 4), cache=Cache())
    cache = Uncopyable(randn(3, 2, seed=1))
    with pytest.raises(gaugefix.VerificationError, match="cannot copy an input of type Uncopyable"):
        gaugefix.verify(model, s, randn(3, 4), cache=cache)
    assert len(cache.items) == 1 and python_state(model) == (0, 0, {}, "cache object", [])
