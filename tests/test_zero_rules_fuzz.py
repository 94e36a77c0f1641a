"""Fuzzing the ReLU-against-a-constant-0 rules (``maximum(h, zeros)``, clamps, ``where``...).

A ReLU written against a constant exactly 0 keeps its generators only while that constant is 0
on every call: made in this forward from numbers and shapes and never written. Here the zero is
written through ``z.data``, through a view or its base, with ``out=``, ``index_put_``, ``copy_``,
or kept in a global, a closure or a default argument and raised after the read; the written
values are 0 on the example input and not on fresh ones (``relu(|x| - 1)`` with a small example
input), so only the trace's record of the writes can tell. A hypothesis grammar chains Linear
layers with these spellings; every structure found must keep the float64 outputs to 1e-12 under
``random_gauge_`` (scale 2) on the example input and on larger fresh inputs, and the spellings
that are exact must keep their hidden channels. ``GAUGEFIX_FUZZ_EXAMPLES`` raises the example
count. Also: exclusions name the module of the op that fixed a channel.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import rel_change

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
SCALE = 2.0
HIDDEN = 6
SMALL, LARGE = 0.1, 3.0  # example inputs stay below the threshold of data_zero, fresh ones not
EXAMPLES = int(os.environ.get("GAUGEFIX_FUZZ_EXAMPLES", "60"))


def data_zero(x: Tensor) -> Tensor:
    """``relu(|x| - 1)`` on the first input feature, ``[B, 1]``: 0 on the example input, not on
    large inputs (a value of the data, fixed under the gauge)."""
    return F.relu(x[:, :1].abs() - 1.0)


def _data_write(h: Tensor, x: Tensor) -> Tensor:
    z = torch.zeros_like(h)
    z.data.copy_(data_zero(x).expand_as(h))
    return torch.maximum(h, z)


def _data_setitem(h: Tensor, x: Tensor) -> Tensor:
    z = torch.zeros_like(h)
    z.data[:] = data_zero(x)
    return h.clamp(min=z)


def _base_written(h: Tensor, x: Tensor) -> Tensor:
    base = torch.zeros(h.shape[0], h.shape[1] + 1, dtype=h.dtype)
    z = base[:, 1:]
    base.data.add_(data_zero(x))
    return torch.where(h > 0, h, z)


def _expanded_written(h: Tensor, x: Tensor) -> Tensor:
    z = torch.zeros(1, h.shape[1], dtype=h.dtype).expand_as(h)
    z.data[0, :] = data_zero(x).amax()
    return torch.fmax(h, z)


def _out_written(h: Tensor, x: Tensor) -> Tensor:
    z = torch.zeros_like(h)
    torch.mul(data_zero(x).expand_as(h), 1.0, out=z)
    return torch.max(h, z)


def _index_put(h: Tensor, x: Tensor) -> Tensor:
    z = torch.zeros_like(h)
    z.index_put_((torch.arange(h.shape[0]),), data_zero(x).expand_as(h))
    return torch.maximum(z, h)


def _two_branches(m: nn.Module, h: Tensor) -> Tensor:
    return torch.maximum(h, m.other(m.prev))


# name -> (activation f(m, h, x), whether it keeps the hidden channels). ``m.prev`` is the
# layer's input, ``m.other`` a second Linear of the same shape.
SPELLINGS = {
    "maximum(h, zeros_like)": (lambda m, h, x: torch.maximum(h, torch.zeros_like(h)), True),
    "maximum(h, zeros(1))": (lambda m, h, x: torch.maximum(h, h.new_zeros(1)), True),
    "minimum(h, tensor(0.))": (lambda m, h, x: torch.minimum(h, torch.tensor(0.0).to(h)), True),
    "clamp(min=zeros)": (lambda m, h, x: h.clamp(min=torch.zeros_like(h)), True),
    "clamp(max=zeros.t().t())": (lambda m, h, x: h.clamp(max=torch.zeros_like(h).t().t()), True),
    "where(h > 0, h, zeros(1, 1))": (
        lambda m, h, x: torch.where(h > 0, h, torch.zeros(1, 1, dtype=h.dtype)),
        True,
    ),
    "threshold(h, 0, 0)": (lambda m, h, x: F.threshold(h, 0.0, 0.0), True),
    "hardtanh(h, 0, inf)": (lambda m, h, x: F.hardtanh(h, 0.0, math.inf), True),
    "maximum(h, 0.2 h)": (lambda m, h, x: torch.maximum(h, 0.2 * h), True),
    "clamp(-|h|, 2|h|)": (lambda m, h, x: h.clamp(min=-h.abs(), max=2 * h.abs()), True),
    "maximum(h, other(prev))": (lambda m, h, x: _two_branches(m, h), True),
    "maximum(h, zeros * x)": (
        lambda m, h, x: torch.maximum(h, torch.zeros_like(h) * x[:, :1]),
        True,
    ),
    "zeros written through .data": (lambda m, h, x: _data_write(h, x), False),
    "zeros[:] = through .data": (lambda m, h, x: _data_setitem(h, x), False),
    "base of a zero view written": (lambda m, h, x: _base_written(h, x), False),
    "expanded zero written": (lambda m, h, x: _expanded_written(h, x), False),
    "zeros written by out=": (lambda m, h, x: _out_written(h, x), False),
    "zeros written by index_put_": (lambda m, h, x: _index_put(h, x), False),
    "maximum(h, data)": (lambda m, h, x: torch.maximum(h, data_zero(x)), False),
    "maximum(h, |x| column)": (lambda m, h, x: torch.maximum(h, x[:, :1].abs()), False),
    "clamp(min=1e-6)": (lambda m, h, x: h.clamp(min=1e-6), False),
}


class Step(nn.Module):
    """``f(self, lin(prev), x)``: one Linear and an activation spelling."""

    def __init__(self, width_in: int, width: int, f) -> None:
        super().__init__()
        self.f = f
        self.lin, self.other = nn.Linear(width_in, width), nn.Linear(width_in, width)

    def forward(self, prev: Tensor, x: Tensor) -> Tensor:
        self.prev = prev
        y = self.f(self, self.lin(prev), x)
        del self.prev
        return y


class Chain(nn.Module):
    """The steps in turn, then a Linear head of 2 outputs."""

    def __init__(self, widths: list[int], spellings: list[str]) -> None:
        super().__init__()
        ins = [4, *widths[:-1]]
        fs = [SPELLINGS[s][0] if s in SPELLINGS else UNTRACED[s] for s in spellings]
        self.steps = nn.ModuleList(Step(a, b, f) for a, b, f in zip(ins, widths, fs, strict=True))
        self.head = nn.Linear(widths[-1], 2)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for step in self.steps:
            h = step(h, x)
        return self.head(h)


def inputs(seed: int, scale: float) -> Tensor:
    return scale * torch.randn(5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def gauge_change(model: nn.Module, reset=lambda: None) -> tuple[gaugefix.GaugeStructure, float]:
    """Discover ``model`` on a small input, apply a random gauge of scale 2 and return the
    structure and the largest relative change of the output on it and on two large inputs
    (``reset()`` before every call puts back state a call changes)."""
    xs = [inputs(0, SMALL), inputs(1, LARGE), inputs(2, LARGE)]
    s = gaugefix.discover(model, xs[0])

    def run() -> list[Tensor]:
        out = []
        for x in xs:
            reset()
            with torch.no_grad():
                out.append(model(x))
        return out

    before = run()
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    return s, max(rel_change(b, a) for b, a in zip(before, run(), strict=True))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    layers=st.lists(
        st.tuples(st.integers(2, 5), st.sampled_from(sorted(SPELLINGS))), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_zero_spellings_are_exact_and_keep_what_they_should(layers, seed):
    widths, spellings = [w for w, _ in layers], [s for _, s in layers]
    note(f"{widths} {spellings}")
    torch.manual_seed(seed)
    s, change = gauge_change(Chain(widths, spellings).to(DTYPE))
    assert change <= TOL, s.summary()
    expected = sum(w for w, name in layers if SPELLINGS[name][1])
    assert s.num_generators == expected, s.summary()


@pytest.mark.parametrize("name", [n for n, (_, keeps) in SPELLINGS.items() if not keeps])
def test_a_written_or_data_zero_blocks_alone(name):
    """Each blocking spelling alone: the hidden channels are blocked; gauged, outputs keep."""
    torch.manual_seed(0)
    s, change = gauge_change(Chain([HIDDEN], [name]).to(DTYPE))
    assert s.num_generators == 0, s.summary()
    assert change <= TOL, s.summary()


# --- zeros kept across calls ----------------------------------------------------------------------
_FLOOR: dict[str, Tensor] = {}


def _global_floor(h: Tensor) -> Tensor:
    if "z" not in _FLOOR:
        _FLOOR["z"] = torch.zeros(h.shape[-1], dtype=h.dtype)
    y = torch.maximum(h, _FLOOR["z"])
    _FLOOR["z"] += 0.5
    return y


def _default_argument_floor(h: Tensor, cache: list = []) -> Tensor:  # noqa: B006 (the point)
    if not cache:
        cache.append(torch.zeros(h.shape[-1], dtype=h.dtype))
    y = h.clamp(min=cache[0])
    cache[0].add_(0.5)
    return y


class Floored(nn.Module):
    """``head(f(l1(x)))`` with ``f`` reading a zero kept outside the module for later calls."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.l1, self.head = f, nn.Linear(4, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.f(self.l1(x)))


@pytest.mark.parametrize("f, kept, why", [
    (_global_floor, lambda: _FLOOR.get("z"), "written after the read"),
    (_default_argument_floor, lambda: next(iter(_default_argument_floor.__defaults__[0]), None),
     "stored on module '<root>' by the forward (an output), read as a constant 0"),
], ids=["global", "default argument"])  # fmt: skip
def test_a_zero_kept_for_later_calls_and_raised_in_the_forward_blocks(f, kept, why):
    """A zero made lazily in the traced call, kept in a global (a default argument) and raised
    after the read: the next call reads 0.5, so the hidden channels must be blocked. (The
    default argument is reached from the module's attribute ``f``: it is found as stored on the
    module, ``discover`` empties its list again, and the first call after it makes the zero
    anew.)"""
    _FLOOR.clear()
    _default_argument_floor.__defaults__[0].clear()
    torch.manual_seed(0)

    def reset() -> None:
        zero = kept()
        if zero is not None:
            zero.zero_()

    s, change = gauge_change(Floored(f).to(DTYPE), reset)
    assert s.num_generators == 0, s.summary()
    assert why in " | ".join(e.reason for e in s.excluded)
    assert change <= TOL, s.summary()


_LATER: dict[str, Tensor] = {}


def _global_zero(h: Tensor) -> Tensor:
    if "z" not in _LATER:
        _LATER["z"] = torch.zeros(h.shape[-1], dtype=h.dtype)
    return torch.maximum(h, _LATER["z"])


@pytest.mark.xfail(strict=True, reason=(
    "a zero made in the traced call and kept only in a global, changed later by code outside "
    "the forward, is not detected (documented in docs/generators.md)"))  # fmt: skip
def test_a_global_zero_changed_after_discovery_blocks():
    _LATER.clear()
    torch.manual_seed(0)
    model = Floored(_global_zero).to(DTYPE)
    s = gaugefix.discover(model, inputs(0, SMALL))
    _LATER["z"].fill_(0.5)  # e.g. a setter the user calls after discovery
    before = model(inputs(1, LARGE))
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    assert rel_change(before, model(inputs(1, LARGE))) <= TOL


def _untraced_data_write(h: Tensor, x: Tensor) -> Tensor:
    g = F.relu(h).clone()
    v = 7 * data_zero(x).expand_as(h).clone()
    with torch._C.DisableTorchFunction():
        g.data.add_(v)  # ``.data`` has a version counter of its own: g's does not move
    return g


@pytest.mark.xfail(strict=True, reason=(
    "an in-place write through .data under torch._C.DisableTorchFunction changes neither the "
    "version nor the memory of the tensor: no traced op and no placement shows it (any "
    "activation, not only zeros)"))  # fmt: skip
def test_an_untraced_write_through_data_blocks():
    torch.manual_seed(0)
    s, change = gauge_change(Chain([HIDDEN], ["untraced .data write"]).to(DTYPE))
    assert change <= TOL, s.summary()


UNTRACED = {"untraced .data write": lambda m, h, x: _untraced_data_write(h, x)}


# --- exclusions name the module of the op --------------------------------------------------------
class Mix(nn.Module):
    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return h + x


class Scatter(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.scatter(1, torch.zeros(h.shape[0], 1, dtype=torch.long), 1.0)


class TwoParts(nn.Module):
    """``a``'s channels are mixed with the fixed input in module ``mix``; later ``b``'s are
    written by an unknown op in module ``gate``: each exclusion names its own module (both are
    in the component of the fixed factor)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.mix, self.gate = Mix(), Scatter()
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(self.a(x), x)
        g = self.gate(F.relu(self.b(x)))
        return self.head(torch.cat([F.relu(h), g], 1))


def test_exclusions_name_the_module_where_a_channel_was_fixed():
    torch.manual_seed(0)
    model = TwoParts().to(DTYPE)
    s = gaugefix.discover(model, inputs(0, 1.0))
    reasons = {e.module: e.reason for e in s.excluded}
    assert "'gate'" in reasons["b"] and "scatter" in reasons["b"], reasons
    assert "'mix'" in reasons["a"] and "mixed with a fixed tensor" in reasons["a"], reasons


def test_deepseek_v3_attention_exclusions_name_their_own_norms():
    """The tiny DeepSeek-V3's latent projections (``q_a_proj``, ``kv_a_proj_with_mqa``) are fixed
    by their own RMSNorms; every channel fixed anywhere shares one component, whose first block
    was the MoE router's ``scatter_``, and it named them all."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=32, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, experts_implementation="batched_mm",
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).to(DTYPE).eval()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    s = gaugefix.discover(model, ids)
    for layer in range(2):
        attn = f"model.layers.{layer}.self_attn"
        for proj, norm in (("q_a_proj", "q_a_layernorm"), ("kv_a_proj_with_mqa", "kv_a_layernorm")):
            mine = [e.reason for e in s.excluded if e.module == f"{attn}.{proj}"]
            assert mine and all(f"'{attn}.{norm}'" in r for r in mine), mine
