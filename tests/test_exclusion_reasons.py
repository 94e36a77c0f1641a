"""The reasons discovery records for excluded channels. A reason names the first op at or after
the excluded layer that blocks its channels or channels joined with them (the nearest blocking
op downstream), and, when other layers produce joined channels (a residual stream), the first of
them and how many more. The wording never changes which channels are excluded: the generator
counts and the excluded channels of every model here are those discovery found before.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

import gaugefix
from gaugefix.structure import compilation
from gaugefix.structure.compilation import _row_groups
from gaugefix.structure.terms import module_of

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
VOCAB = 40
SHARED = "on channels shared with"


def tiny_llama() -> tuple[nn.Module, tuple]:
    """A two-layer Llama with ReLU units (RMSNorm reads the residual stream)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2,
        tie_word_embeddings=False, hidden_act="relu", bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(DTYPE).eval(), (
        torch.randint(0, VOCAB, (2, 5)),
    )


def tiny_gpt2() -> tuple[nn.Module, tuple]:
    """A two-layer GPT-2 with ReLU units (LayerNorm reads the stream; tied embeddings)."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=64,
        activation_function="relu", bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(DTYPE).eval(), (torch.randint(0, VOCAB, (2, 5)),)


def tanh_mlp() -> tuple[nn.Module, tuple]:
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(8, 2)).to(DTYPE)
    return model, (torch.randn(3, 4, dtype=DTYPE),)


class ErfCNN(nn.Module):
    """Convolutions with an op no rule knows as homogeneous (``torch.erf``) after ``c2``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3), nn.Conv2d(5, 6, 3)
        self.f = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.erf(self.c2(torch.relu(self.c1(x))))))
        return self.f(x.mean((2, 3)))


class TwoBlocked(nn.Module):
    """Two independent blocking ops: tanh after ``a``, sigmoid after ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6),
                                          nn.Linear(6, 2))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.sigmoid(self.c(torch.relu(self.b(torch.tanh(self.a(x)))))))


MODELS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "tanh": tanh_mlp,
    "cnn": lambda: (ErfCNN().to(DTYPE), (torch.randn(2, 3, 9, 9, dtype=DTYPE),)),
    "two": lambda: (TwoBlocked().to(DTYPE), (torch.randn(3, 4, dtype=DTYPE),)),
}
# name: (generators, excluded channel count per module), as discovery found them before the
# reasons named the nearest op
FOUND = {
    "llama": (200, {"model.embed_tokens": 16, "model.layers.0.self_attn.o_proj": 16,
                    "model.layers.0.mlp.down_proj": 16, "model.layers.1.self_attn.o_proj": 16,
                    "model.layers.1.mlp.down_proj": 16, "lm_head": VOCAB}),
    "gpt2": (256, {"transformer.wte": 16, "transformer.wpe": 16, "transformer.ln_f": 16,
                   **{f"transformer.h.{i}.{m}.c_proj": 16 for i in (0, 1)
                      for m in ("attn", "mlp")}}),
    "tanh": (16, {"2": 8, "6": 2}),
    "cnn": (10, {"c2": 5, "f": 2}),
    "two": (6, {"a": 6, "c": 6, "d": 2}),
}  # fmt: skip


@pytest.fixture(scope="module")
def discovered() -> dict[str, gaugefix.GaugeStructure]:
    torch.manual_seed(0)
    out = {}
    for name, build in MODELS.items():
        model, inputs = build()
        out[name] = gaugefix.discover(model, *inputs)
    return out


def reasons(structure: gaugefix.GaugeStructure) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in structure.excluded:
        out.setdefault(e.module, []).append(e.reason)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_wording_leaves_the_structure_alone(discovered, name):
    """The same generators and excluded channels as before; every excluded channel is one its
    module produces with no generator, listed once, and every reason is one line."""
    s = discovered[name]
    count, excluded = FOUND[name]
    assert s.num_generators == count
    channels: dict[str, list[int]] = {}
    for e in s.excluded:
        assert e.reason and "\n" not in e.reason
        channels.setdefault(e.module, []).extend(e.channels)
    assert {m: len(c) for m, c in channels.items()} == excluded
    for param, index in s.produced.items():
        module = module_of(param)
        if module in channels:
            assert sorted(channels[module]) == sorted(set(channels[module]))
            assert set(torch.nonzero(index < 0).reshape(-1).tolist()) == set(channels[module])


def test_llama_stream_names_the_nearest_norm_and_the_shared_channels(discovered):
    """Each projection into the residual stream is blamed on the RMSNorm that next reads the
    stream (not layer 0's), saying the channels are shared with the other producers."""
    got = reasons(discovered["llama"])
    nearest = {
        "model.embed_tokens": "model.layers.0.input_layernorm",
        "model.layers.0.self_attn.o_proj": "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp.down_proj": "model.layers.1.input_layernorm",
        "model.layers.1.self_attn.o_proj": "model.layers.1.post_attention_layernorm",
        "model.layers.1.mlp.down_proj": "model.norm",
    }
    for module, norm in nearest.items():
        first = "model.layers.0.self_attn.o_proj" if module == "model.embed_tokens" else (
            "model.embed_tokens")  # fmt: skip
        assert got[module] == [
            f"not positively homogeneous: Tensor.pow in '{norm}'; {SHARED} '{first}' and 3 more "
            "layers (outputs joined, e.g. by a residual sum)"
        ]
    assert got["lm_head"] == ["model output (rescaling it changes the function)"]


def test_llama_summary_line_names_the_final_norm(discovered):
    """What ``gaugefix inspect`` prints for layer 1's down projection."""
    row = next(
        line
        for line in discovered["llama"].summary().splitlines()
        if line.startswith("model.layers.1.mlp.down_proj ")
    )
    assert "16 excluded: not positively homogeneous: Tensor.pow in 'model.norm'; " in row
    assert "model.layers.0.input_layernorm" not in row


def test_gpt2_stream_names_the_nearest_layer_norm(discovered):
    got = reasons(discovered["gpt2"])
    nearest = {
        "transformer.wte": "transformer.h.0.ln_1",
        "transformer.wpe": "transformer.h.0.ln_1",
        "transformer.h.0.attn.c_proj": "transformer.h.0.ln_2",
        "transformer.h.0.mlp.c_proj": "transformer.h.1.ln_1",
        "transformer.h.1.attn.c_proj": "transformer.h.1.ln_2",
        "transformer.h.1.mlp.c_proj": "transformer.ln_f",
    }
    for module, norm in nearest.items():
        (reason,) = got[module]
        assert reason.startswith(f"normalised by F.layer_norm in '{norm}'; {SHARED} '")
        assert reason.endswith("' and 4 more layers (outputs joined, e.g. by a residual sum)")
    # the final norm's gains: blocked by the tied output layer itself, nothing shared
    assert got["transformer.ln_f"] == [
        "parameter 'transformer.wte.weight' used in two different roles (F.linear in 'lm_head')"
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tanh", {"2": "not positively homogeneous: torch.tanh in '3'"}),
        ("cnn", {"c2": "not positively homogeneous: torch.erf in '<root>'"}),
        (
            "two",
            {
                "a": "not positively homogeneous: torch.tanh in '<root>'",
                "c": "not positively homogeneous: torch.sigmoid in '<root>'",
            },
        ),
    ],
)
def test_own_channels_name_their_own_op_and_nothing_shared(discovered, name, expected):
    """Channels no other layer produces: the op that reads them, with no sharing note; two
    independent blocked ops each name their own."""
    got = reasons(discovered[name])
    for module, reason in expected.items():
        assert got[module] == [reason]
    assert all(SHARED not in r for rs in got.values() for r in rs)


SORTING = {"unique", "unique_consecutive", "argsort", "sort", "searchsorted", "scatter_reduce"}


class _SortCount(TorchFunctionMode):
    """Counts the torch calls that sort or search (``SORTING``) made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in SORTING
        return func(*args, **(kwargs or {}))


def _sorts_explaining(depth: int, monkeypatch) -> tuple[int, int]:
    """The number of excluded modules and of sorting calls that explain them, for ``depth``
    layers each followed by ``tanh`` and an output layer (every layer's channels excluded)."""
    layers = [m for _ in range(depth) for m in (nn.Linear(3, 3), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(3, 1)).to(DTYPE)
    explain, counter = compilation._exclusions, _SortCount()

    def counted(*args):
        with counter:
            return explain(*args)

    monkeypatch.setattr(compilation, "_exclusions", counted)
    s = gaugefix.discover(model, torch.randn(2, 3, dtype=DTYPE))
    return len({e.module for e in s.excluded}), counter.count


def test_explaining_sorts_once_for_all_layers(monkeypatch):
    """The reasons of all excluded channels come from one pass over every producing layer: the
    sorts and searches do not grow with the number of layers."""
    few, many = _sorts_explaining(2, monkeypatch), _sorts_explaining(12, monkeypatch)
    assert (few[0], many[0]) == (3, 13)
    assert many[1] == few[1]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(
                st.lists(st.sampled_from([0, 1, 2, 7, 2**40, 2**61]), min_size=c, max_size=c),
                max_size=30,
            ),
        )
    )
)
def test_row_groups_match_a_dictionary(columns_rows):
    """Distinct rows in the order of their first occurrence, each with the positions holding
    it, as a dictionary keyed by the row finds them; keys past int64 are renumbered first."""
    columns, rows = columns_rows
    expected: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        expected.setdefault(tuple(row), []).append(i)
    table = torch.tensor(rows, dtype=torch.long).reshape(len(rows), columns)
    distinct, positions = _row_groups(table, torch.arange(len(rows)))
    assert [tuple(r) for r in distinct] == list(expected)
    assert positions == list(expected.values())
