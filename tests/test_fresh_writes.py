"""Assignment into tensors allocated in the forward (``empty``, ``new_empty``, ``zeros``...):
``t[..., a:b] = x``, ``t[..., a:b].copy_(x)`` and ``t.index_put_(idx, x)`` into fresh memory
whose entries nobody read give those entries the labels of ``x`` (a concatenation written by
slices), in every tensor of that memory (its views and base).

DeepSeek-V2/V3's multi-head latent attention assembles its keys that way: its query-key
generators are found, as many as when the keys are assembled by ``torch.cat``, and they keep the
outputs. Near misses (a region written twice, read before it is written, garbage of ``empty``
read, a parameter or data written, overlapping views, ``out=``, a buffer kept on the module,
duplicate or data-dependent indices, ``masked_scatter_``) must keep the float64 outputs to 1e-12
under ``random_gauge_`` (scale 2) on the example input and on fresh ones; a hypothesis grammar
chains them. ``GAUGEFIX_FUZZ_EXAMPLES`` raises the example count.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from gaugefix.precision import Float64Throughout

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-12
SCALE = 2.0
BATCH, FEATURES, WIDTH = 5, 4, 8
EXAMPLES = int(os.environ.get("GAUGEFIX_FUZZ_EXAMPLES", "25"))


def run_all(model: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
    """The outputs on ``inputs``, after one call on the last of them (a model that keeps state
    between calls then sees the same history on every pass)."""
    with torch.no_grad():
        model(inputs[-1])
        return [model(x) for x in inputs]


def gauged(model: nn.Module, x: Tensor) -> tuple[gaugefix.GaugeStructure, float]:
    """Discover ``model`` (float64, first call), apply a random gauge of scale 2 and return the
    structure and the largest relative change of the output on ``x``, ``-x`` (where a value of
    the data moves what is written) and two fresh inputs."""
    model.to(DTYPE)
    s = gaugefix.discover(model, x)
    seeds = [torch.Generator().manual_seed(k) for k in (11, 12)]
    fresh = [-x, *(3 * torch.randn(x.shape, dtype=DTYPE, generator=g) for g in seeds)]
    before = run_all(model, [x, *fresh])
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    after = run_all(model, [x, *fresh])
    return s, max(rel_change(b, a) for b, a in zip(before, after, strict=True))


def example() -> Tensor:
    return torch.randn(BATCH, FEATURES, dtype=DTYPE, generator=torch.Generator().manual_seed(0))


class Pieces(nn.Module):
    """``head(f(self, a, b, x))`` with ``a = relu(la(x))`` and ``b = relu(lb(x))`` of width
    ``WIDTH // 2`` each; ``f`` assembles what the head reads (width ``WIDTH``)."""

    def __init__(self, f) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = f
        self.la, self.lb = nn.Linear(FEATURES, WIDTH // 2), nn.Linear(FEATURES, WIDTH // 2)
        self.head = nn.Linear(WIDTH, 2)
        self.p = nn.Parameter(torch.rand(WIDTH // 2) + 0.5)
        self.kept: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        a, b = F.relu(self.la(x)), F.relu(self.lb(x))
        return self.head(self.f(self, a, b, x))


H = WIDTH // 2
COLUMNS = torch.arange(WIDTH)


def _copy(m, a, b, x):
    t = a.new_empty(BATCH, WIDTH)
    t[..., :H].copy_(a)
    t[..., H:].copy_(b)
    return t


def _setitem_zeros(m, a, b, x):
    t = torch.zeros(BATCH, WIDTH, dtype=a.dtype)
    t[:, H:] = b
    t[:, :H] = a
    return t


def _index_put(m, a, b, x):
    t = torch.empty_like(torch.cat([a, b], 1).detach())
    rows = torch.arange(BATCH)[:, None]
    t.index_put_((rows, COLUMNS[None, :H]), a)
    t.index_put_((rows, COLUMNS[None, H:]), b)
    return t


def _through_transpose(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH)
    t.T[:H] = a.T
    t.narrow(1, H, H).copy_(b)
    return t


CONCATENATIONS = {"copy_": _copy, "setitem into zeros": _setitem_zeros,
                  "index_put_": _index_put, "through views": _through_transpose}  # fmt: skip


@pytest.mark.parametrize("f", list(CONCATENATIONS.values()), ids=list(CONCATENATIONS))
def test_a_concatenation_by_slices_equals_torch_cat(f):
    """Written by slices into fresh memory, ``[a | b]`` has the generators of
    ``torch.cat([a, b])`` (every hidden neuron), exactly."""
    s_cat, change_cat = gauged(Pieces(lambda m, a, b, x: torch.cat([a, b], 1)), example())
    s, change = gauged(Pieces(f), example())
    assert s_cat.num_generators == WIDTH, s_cat.summary()
    assert s.num_generators == s_cat.num_generators, s.summary()
    assert max(change, change_cat) <= TOL


# --- near misses ---------------------------------------------------------------------------------
def _shift(x: Tensor) -> Tensor:
    """1 or 0 as the sign of ``x[0, 0]`` (a value of the data; ``-x`` flips it)."""
    return (x[0, 0] > 0).long()


def _moved(t: Tensor, x: Tensor, s: int, w: int) -> Tensor:
    """Columns ``s:s+w`` of ``t``, moved by one where the data says (a view)."""
    step = 1 if s + w < t.shape[1] else -1
    return t.narrow(1, s + step * _shift(x), w)


def _twice(m, a, b, x):
    t = a.new_empty(BATCH, WIDTH)
    t[:, :H] = a
    t[:, :H] = b  # a's values are gone: b's channels feed both halves
    t[:, H:] = b
    return t


def _read_first(m, a, b, x):
    t = torch.zeros(BATCH, WIDTH, dtype=a.dtype)
    y = b + t[:, H:]  # read while zero, then overwritten: the reader saw the old value
    t[:, H:] = a
    t[:, :H] = y
    return t


def _garbage_read(m, a, b, x):
    t = a.new_empty(BATCH, WIDTH)
    t[:, : H - 1] = a[:, : H - 1]
    t[:, H:] = b
    return torch.where(COLUMNS < H - 1, t, torch.cat([a, b], 1))  # column H-1 meets garbage


def _parameter_and_data(m, a, b, x):
    t = a.new_empty(BATCH, WIDTH)
    t[:, :H] = m.p
    t[:, H:] = x
    return t + torch.cat([a, b], 1)


def _overlapping_views(m, a, b, x):
    t = a.new_empty(BATCH, WIDTH + H)
    first, second = t[:, :WIDTH], t[:, H:]
    first.copy_(torch.cat([a, b], 1))
    second[:, :H].copy_(a)  # through another view: first[:, H:] holds a now, not b
    second[:, H:].copy_(b)
    return first + second[:, :WIDTH]  # [a | a] + [a | b]: a and b share factors


def _out_into_slice(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH)
    torch.mul(a.detach(), 1.0, out=t[:, :H])  # (out= takes no tensor that requires grad)
    t[:, H:] = b
    return t


def _kept(m, a, b, x):
    if m.kept is None:
        m.kept = torch.zeros(BATCH, WIDTH, dtype=a.dtype)
    y = m.kept[:, :H] + a  # the last call's values on later calls
    m.kept[:, :H] = a
    m.kept[:, H:] = b
    return torch.cat([y, m.kept[:, H:]], 1)


def _kept_unread(m, a, b, x):
    m.kept = a.new_empty(BATCH, WIDTH)
    m.kept[:, :H] = a
    m.kept[:, H:] = b
    return m.kept


def _duplicate_index(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH)
    t[:, torch.tensor([0, 0, 1, 2])] = a  # which of a[:, 0], a[:, 1] lands is undefined
    t[:, H:] = b
    return t


def _data_index(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH)
    shift = _shift(x)
    t[:, (torch.arange(H) + shift) % H] = a
    t[:, H:] = b
    return t


def _placed_view(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH + 1)
    v = _moved(t, x, 0, WIDTH)  # columns 0:8 or 1:9 as the data says, taken before the writes
    t[:, :H] = a
    t[:, H:WIDTH] = b
    return v


def _masked_scatter(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH)
    t.masked_scatter_((COLUMNS < H).expand(BATCH, WIDTH), a)  # reads t (keeps its other entries)
    t[:, H:] = b
    return t


def _accumulate(m, a, b, x):
    t = a.new_zeros(BATCH, WIDTH)
    rows = torch.arange(BATCH)[:, None]
    t.index_put_((rows, COLUMNS[None, :H]), a, accumulate=True)
    t[:, H:] = b
    return t


# name: (assembly, generators that stay)
NEAR_MISSES = {
    "written twice": (_twice, H),
    "read, then overwritten": (_read_first, 0),
    "garbage of empty read": (_garbage_read, WIDTH - 1),
    "parameter and data written": (_parameter_and_data, 0),
    "overlapping views": (_overlapping_views, H),
    "out= into a slice": (_out_into_slice, H),
    "kept on the module, read first": (_kept, 0),
    "kept on the module": (_kept_unread, 0),
    "duplicate index": (_duplicate_index, H),
    "index from the data": (_data_index, H),
    "view placed by the data": (_placed_view, 0),
    "masked_scatter_": (_masked_scatter, 0),
    "index_put_ accumulating": (_accumulate, WIDTH),  # added into zeros: a residual sum
}


@pytest.mark.parametrize("f, kept", list(NEAR_MISSES.values()), ids=list(NEAR_MISSES))
def test_near_misses_keep_the_outputs(f, kept):
    """Each near miss keeps the outputs exactly, with the generators its writes allow."""
    s, change = gauged(Pieces(f), example())
    assert change <= TOL, s.summary()
    assert s.num_generators == kept, s.summary()


def _relu_against_written_zeros(m, a, b, x):
    z = a.new_zeros(WIDTH)
    z[0] = 1.0  # the other entries stay 0
    return torch.maximum(torch.cat([a, b], 1), z)


def test_entries_of_zeros_left_unwritten_stay_zero():
    """``maximum(h, z)`` with ``z`` zeros but ``z[0] = 1``: channel 0 is blocked, the others are
    ReLUs against 0 and keep their generators (``tests/test_rules_audit2.py`` expects none)."""
    s, change = gauged(Pieces(_relu_against_written_zeros), example())
    assert change <= TOL, s.summary()
    assert s.num_generators == WIDTH - 1, s.summary()


# --- DeepSeek multi-head latent attention ---------------------------------------------------------
def _deepseek(version: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=32, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, experts_implementation="batched_mm",
    )  # fmt: skip
    if version == 2:
        config, cls = transformers.DeepseekV2Config(**common), transformers.DeepseekV2ForCausalLM
    else:
        config = transformers.DeepseekV3Config(**common, n_group=2, topk_group=1)
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    return cls(config).to(DTYPE).eval()


def _keys_by_cat(self, kv_nope: Tensor, k_rot: Tensor) -> tuple[Tensor, Tensor]:
    """DeepSeek's ``expand_kv`` with the keys assembled by ``torch.cat``."""
    batch, _, length, _ = kv_nope.shape
    shape = (batch, length, -1, self.qk_nope_head_dim + self.v_head_dim)
    kv = self.kv_b_proj(kv_nope).view(shape).transpose(1, 2)
    k_nope, values = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    return torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1), values


@pytest.fixture
def exact_router(monkeypatch):
    """The routers' ``.type(torch.float32)`` casts and V2's float32 complex rotary embedding
    (``xq.float()``) made the identity on float64 tensors: the float64 model is then exact to
    float64 rounding (the casts round the router's logits and the rotated queries and keys to
    float32)."""
    cast, to_float = torch.Tensor.type, torch.Tensor.float

    def type_(self, *args, **kwargs):
        if args == (torch.float32,) and not kwargs:
            return self
        return cast(self, *args, **kwargs)

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "type", type_)
    monkeypatch.setattr(torch.Tensor, "float", float_)


@pytest.mark.parametrize("version, per_layer", [(2, 36), (3, 36)])
def test_deepseek_latent_attention_query_key_generators(version, per_layer):
    """The keys written by slices into ``new_empty`` give the query-key generators of the
    ``torch.cat`` spelling (36 per layer: the rotary pairs too, written with ``view_as_complex``
    in V2 and ``rotate_half`` in V3), exactly."""
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _deepseek(version)
    attention = type(model.model.layers[0].self_attn)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "expand_kv", _keys_by_cat)
        by_cat = gaugefix.discover(model, ids).num_generators
    s = gaugefix.discover(model, ids)
    assert s.num_generators == by_cat, s.summary()
    for layer in range(2):
        terms = s.params[f"model.layers.{layer}.self_attn.q_b_proj.weight"].terms
        rows = [t.index for t in terms if t.sign == 1]  # the generators of the query rows
        assert len(rows) == 1 and rows[0][rows[0] >= 0].unique().numel() == per_layer
    with torch.no_grad(), Float64Throughout():
        before = model(ids).logits
    gaugefix.random_gauge_(model, s, SCALE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), Float64Throughout():
        after = model(ids).logits
    assert rel_change(before, after) <= TOL


# --- a grammar of writes into a fresh buffer ----------------------------------------------------
SOURCES, SOURCE_WIDTH = 3, 4
ALLOCATIONS = {
    "empty": lambda s: torch.empty(BATCH, WIDTH, dtype=s.dtype),
    "new_empty": lambda s: s.new_empty(BATCH, WIDTH),
    "empty_like": lambda s: torch.empty_like(s.new_ones(BATCH, WIDTH)),
    "zeros": lambda s: torch.zeros(BATCH, WIDTH, dtype=s.dtype),
    "new_zeros": lambda s: s.new_zeros(BATCH, WIDTH),
    "zeros_like": lambda s: torch.zeros_like(s.new_ones(BATCH, WIDTH)),
}
EXACT = ["copy_", "setitem", "ellipsis", "index_put_", "narrow", "transpose"]
NEAR = ["parameter", "data", "out=", "masked_scatter_", "duplicate", "data index", "accumulate",
        "read and add", "data view"]  # fmt: skip
MOVED = ("data view", "view")  # written or read where the data says: zero buffers only


def _write(m: nn.Module, t: Tensor, spelling: str, a: Tensor, x: Tensor, s: int) -> None:
    """Write ``a`` (``[BATCH, w]``) into columns ``s:s+w`` of ``t`` as ``spelling`` says."""
    w = a.shape[1]
    cols, rows = torch.arange(s, s + w), torch.arange(BATCH)[:, None]
    region = t[:, s : s + w]
    if spelling == "copy_":
        region.copy_(a)
    elif spelling == "setitem":
        t[:, s : s + w] = a
    elif spelling == "ellipsis":
        t[..., s : s + w] = a
    elif spelling in ("index_put_", "accumulate"):
        t.index_put_((rows, cols[None]), a, accumulate=spelling == "accumulate")
    elif spelling == "narrow":
        t.narrow(1, s, w).copy_(a)
    elif spelling == "transpose":
        t.T[s : s + w] = a.T
    elif spelling == "parameter":
        t[:, s : s + w] = m.p[:w]
    elif spelling == "data":
        t[:, s : s + w] = x[:, :1]
    elif spelling == "out=":
        torch.mul(a.detach(), 1.0, out=t.detach()[:, s : s + w])  # out= takes no grad
    elif spelling == "masked_scatter_":
        t.masked_scatter_(((COLUMNS >= s) & (COLUMNS < s + w)).expand(BATCH, WIDTH), a)
    elif spelling == "duplicate":
        t[:, torch.cat([cols[:1], cols[:-1]])] = a
    elif spelling == "data index":
        t[:, s + (torch.arange(w) + _shift(x)) % w] = a
    elif spelling == "data view":
        _moved(t, x, s, w).copy_(a)
    else:  # read and add
        region.add_(a)


class Program(nn.Module):
    """Three sources ``relu(L_k x)`` (width 4) written into a fresh buffer ``[BATCH, WIDTH]``
    by ``events`` (``("write", spelling, k, start, width)`` or ``("read", start, width)``: the
    columns read, kept for the head); ``keep`` stores the buffer on the module (``"reused"``:
    the next call writes into it again). The head reads the buffer and what was read; unwritten
    entries of an ``empty`` buffer are read as 0 through ``where``. ``reference``: the head
    reads the final columns assembled by ``torch.stack`` instead (no reads)."""

    def __init__(self, kind: str, events: list, keep: str, reference: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.events, self.keep, self.reference = kind, events, keep, reference
        self.sources = nn.ModuleList(nn.Linear(FEATURES, SOURCE_WIDTH) for _ in range(SOURCES))
        reads = sum(e[2] for e in events if e[0] != "write")
        self.head = nn.Linear(WIDTH + reads, 2)
        self.p = nn.Parameter(torch.rand(SOURCE_WIDTH) + 0.5)
        self.kept: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        srcs = [F.relu(layer(x)) for layer in self.sources]
        if self.reference:
            return self.head(_stacked(srcs, self.events))
        reuse = self.keep == "reused" and self.kept is not None
        t = self.kept if reuse else ALLOCATIONS[self.kind](srcs[0])
        written, reads = torch.zeros(WIDTH, dtype=torch.bool), []
        zeros = self.kind.startswith(("zeros", "new_zeros"))
        for event in self.events:
            if event[0] in ("read", "view"):
                _, s, w = event
                if event[0] == "view" and zeros:  # read at the end, after later writes
                    reads.append(_moved(t, x, s, w))
                    continue
                seen = t[:, s : s + w]
                reads.append(seen if zeros else torch.where(written[s : s + w], seen, 0.0))
                continue
            _, spelling, k, s, w = event
            adds = spelling in ("accumulate", "read and add")
            if adds and (self.keep == "reused" or not (zeros or bool(written[s : s + w].all()))):
                spelling = "copy_"  # it would add garbage, or what earlier calls left
            if spelling == "data view" and not zeros:
                spelling = "copy_"  # it would leave garbage where the mask does not know
            _write(self, t, spelling, srcs[k][:, :w], x, s)
            written[_columns(spelling, s, w)] = True
        if self.keep != "none":
            self.kept = t
        return self.head(torch.cat([torch.where(written, t, 0.0), *reads], 1))


def _columns(spelling: str, s: int, w: int) -> slice:
    """The columns a write of width ``w`` at ``s`` fills (the duplicate index misses one)."""
    return slice(s, s + max(w - 1, 1)) if spelling == "duplicate" else slice(s, s + w)


def _stacked(srcs: list[Tensor], events: list) -> Tensor:
    """The buffer the exact writes of ``events`` leave, column by column (0 where unwritten)."""
    columns = [srcs[0].new_zeros(BATCH) for _ in range(WIDTH)]
    for _, _, k, s, w in events:
        for j in range(w):
            columns[s + j] = srcs[k][:, j]
    return torch.stack(columns, 1)


@st.composite
def programs(draw) -> tuple[str, list, str]:
    """Half of them exact writes only, kept nowhere (compared with ``torch.stack``)."""
    clean = draw(st.booleans())
    kind = draw(st.sampled_from(sorted(ALLOCATIONS)))
    keep = "none" if clean else draw(st.sampled_from(["none", "kept", "reused"]))
    events = []
    for _ in range(draw(st.integers(1, 5))):
        w = draw(st.integers(1, SOURCE_WIDTH))
        s = draw(st.integers(0, WIDTH - w))
        if not clean and draw(st.integers(0, 4)) == 0:
            events.append((draw(st.sampled_from(["read", "view"])), s, w))
        else:
            spelling = draw(st.sampled_from(EXACT if clean else EXACT + NEAR))
            events.append(("write", spelling, draw(st.integers(0, SOURCES - 1)), s, w))
    return kind, events, keep


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(programs())
def test_grammar_of_fresh_writes_is_exact(program):
    """Every program keeps its outputs under a random gauge, on the example and fresh inputs;
    one of exact writes only, kept nowhere and read only by the head, has the generators of
    its buffer assembled by ``torch.stack``."""
    kind, events, keep = program
    note(f"{kind} {keep} {events}")
    s, change = gauged(Program(kind, events, keep), example())
    assert change <= TOL, s.summary()
    if keep == "none" and all(e[0] == "write" and e[1] in EXACT for e in events):
        reference, _ = gauged(Program(kind, events, keep, reference=True), example())
        assert s.num_generators == reference.num_generators, s.summary()
