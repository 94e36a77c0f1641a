"""``equalize_(..., "activation")``'s calibration pass records the matrix products that real
models spell otherwise than ``F.linear``: ``torch.einsum`` with a parameter operand (its
subscripts parsed), ``torch.linalg.matmul``, ``torch.mv``, ``torch.addmv``, batched products of
stacked expert weights (``bmm``, ``baddbmm``, batched ``matmul``, ``grouped_mm``, a slice
``W[e]`` of ``[E, out, in]``: each matrix's channels have the maxima of its own tokens) and the
input projections inside ``F.multi_head_attention_forward`` (its output projection:
``test_equalize_products2.py``). Oracles: the same model written
with ``F.linear`` / ``nn.Linear`` (float64, the recorded maxima bit for bit and the equalized
point), SmoothQuant's closed form, and maxima computed from the routed tokens directly. An
einsum that does not read a weight's channels one by one records nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
from architectures import randomise_, rel_change
from gaugefix.calibration import activation_ranges
from test_equalize import output

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
EXACT = 1e-12
D, OUT = 6, 4
EXPERTS, HIDDEN, TOKENS = 3, 5, 24


def _batch(*shape: int, seed: int = 2) -> Tensor:
    return 3 * torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _rows(h: Tensor, read: object) -> Tensor:
    """``read`` (one input row ``[D]`` to ``[OUT]``) applied to every row of ``h``."""
    return torch.stack([read(v) for v in h.reshape(-1, D)]).reshape(*h.shape[:-1], -1)


# How a ``[OUT, D]`` weight ``w`` reads ``h`` (``[B, T, D]``); "linear" is the oracle.
READS = {
    "linear": lambda h, w: F.linear(h, w),
    "einsum": lambda h, w: torch.einsum("bti,oi->bto", h, w),
    "einsum_weight_first": lambda h, w: torch.einsum("oi,bti->bto", w, h),
    "einsum_implicit": lambda h, w: torch.einsum("bti,oi", h, w).transpose(1, 2),  # "bot"
    "einsum_ellipsis": lambda h, w: torch.einsum("...d,de->...e", h, w.T),
    "einsum_list": lambda h, w: torch.einsum("b t i , o i -> b t o", [h, w]),
    "linalg_matmul": lambda h, w: torch.linalg.matmul(h, w.T),
    "mv": lambda h, w: _rows(h, lambda v: torch.mv(w, v)),
    "tensor_mv": lambda h, w: _rows(h, lambda v: w.mv(v)),
    "addmv": lambda h, w: _rows(h, lambda v: torch.addmv(v.new_zeros(OUT), w, vec=v)),
}


class Block(nn.Module):
    """A LayerNorm, a weight ``w`` ``[OUT, D]`` reading the normed input as ``reads[how]``
    spells it, a ReLU and a head."""

    reads = READS

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(OUT, D))
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.reads[self.how](self.norm(x), self.w)))


def block(how: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_(Block(how).to(DTYPE), seed=1).eval()


def equalized(
    model: nn.Module, x: Tensor, structure: gaugefix.GaugeStructure, alpha: float = 0.8
) -> nn.Module:
    """``model`` at its ``"activation"`` point with ``structure`` (discovered on ``model``
    itself)."""
    before = output(model, (x,))
    result = gaugefix.equalize_(model, structure, "activation", calibration=x, alpha=alpha)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    return model


def mismatch(model: nn.Module, reference: nn.Module) -> float:
    expected = reference.state_dict()
    return max(rel_change(expected[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", [h for h in READS if h != "linear"])
def test_a_product_spelled_otherwise_is_calibrated_as_f_linear(how):
    """The same maxima under the same keys, and the same ``"activation"`` point."""
    x = _batch(5, 3, D)
    reference, model = block("linear"), block(how)
    weights = {"w": model.w, "head.weight": model.head.weight}
    expected = activation_ranges(
        reference, {"w": reference.w, "head.weight": reference.head.weight}, x
    )
    got = activation_ranges(model, weights, x)
    assert list(got) == list(expected) == [("w", 1), ("head.weight", 1)]
    assert torch.equal(got["w", 1], expected["w", 1])  # the normed input, bit for bit
    head = expected["head.weight", 1]  # the product's output: rounded otherwise
    assert torch.allclose(got["head.weight", 1], head, rtol=EXACT, atol=0)
    got_point = equalized(model, x, gaugefix.discover(model, x))
    assert mismatch(got_point, equalized(reference, x, gaugefix.discover(reference, x))) <= TOL


class NormEinsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.randn(OUT, D))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("btd,od->bto", self.norm(x), self.w)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.0, 1.0])
def test_activation_is_smoothquant_on_a_norm_einsum_block(alpha):
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``: the norm's gain and bias divided by
    ``s``, the einsum weight's columns multiplied."""
    torch.manual_seed(0)
    model = randomise_(NormEinsum(), seed=1).eval()
    x = _batch(5, 3, D)
    with torch.no_grad():
        act = model.norm(x).abs().amax((0, 1))
    gain, shift = model.norm.weight.detach().clone(), model.norm.bias.detach().clone()
    w = model.w.detach().clone()
    scale = act**alpha / w.abs().amax(0) ** (1 - alpha)
    equalized(model, x, gaugefix.discover(model, x), alpha)
    for got, want in ((model.norm.weight, gain / scale), (model.norm.bias, shift / scale)):
        assert torch.allclose(got.detach(), want, rtol=EXACT, atol=0)
    assert torch.allclose(model.w.detach(), w * scale, rtol=EXACT, atol=0)


# -- stacked experts ------------------------------------------------------------------------------


class Fused(nn.Module):
    """A norm, a top-1 router and experts stored fused, ``gate_up`` ``[E, 2 H, D]`` and
    ``down`` ``[E, D, H]`` (Mixtral's layout), computed as ``how`` spells it: a loop over
    the experts reading slices ``W[e]``, or products batched over the experts of the tokens
    dispatched to them (``[E, N, D]``, zero where not routed)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.LayerNorm(D)
        self.router = nn.Linear(D, EXPERTS, bias=False)
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * HIDDEN, D))
        self.down = nn.Parameter(torch.randn(EXPERTS, D, HIDDEN))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        routed = F.one_hot(self.router(h).argmax(-1), EXPERTS).to(h.dtype)  # [N, E]
        if self.how.startswith("loop"):
            return self.loop(h, routed)
        hidden = self.batched(routed.T[:, :, None] * h, self.gate_up)  # [E, N, 2 H]
        gate, up = hidden.chunk(2, -1)
        return self.batched(torch.relu(gate) * up, self.down).sum(0)

    def loop(self, h: Tensor, routed: Tensor) -> Tensor:
        out = torch.zeros_like(h)
        for e in range(EXPERTS):
            rows = routed[:, e].nonzero()[:, 0]
            gate, up = self.slice_read(h[rows], self.gate_up[e]).chunk(2, -1)
            out[rows] = self.slice_read(torch.relu(gate) * up, self.down[e])
        return out

    def slice_read(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w) if self.how == "loop_linear" else x @ w.T

    def batched(self, x: Tensor, w: Tensor) -> Tensor:
        """``x[e] @ w[e].T`` for every expert ``e``."""
        if self.how == "bmm":
            return torch.bmm(x, w.mT)
        if self.how == "baddbmm":
            return torch.baddbmm(x.new_zeros(1), x, w.mT)
        if self.how == "einsum":
            return torch.einsum("end,efd->enf", x, w)
        if self.how == "einsum_permuted":  # the expert and channel dims elsewhere in x
            return torch.einsum("dne,efd->enf", x.permute(2, 1, 0), w)
        return x @ w.transpose(1, 2)  # batched matmul


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(torch.relu(gate) * up)


class Unfused(nn.Module):
    """:class:`Fused` with one ``nn.Linear`` per expert matrix: the oracle."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.router = nn.Linear(D, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        top = self.router(h).argmax(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (top == e).nonzero()[:, 0]
            out[rows] = expert(h[rows])
        return out


def moe(how: str) -> tuple[nn.Module, nn.Module]:
    """A fused MoE and its unfused copy (the same weights)."""
    torch.manual_seed(0)
    fused = randomise_(Fused(how), seed=1).eval()
    unfused = Unfused().to(DTYPE).eval()
    with torch.no_grad():
        unfused.norm.load_state_dict(fused.norm.state_dict())
        unfused.router.weight.copy_(fused.router.weight)
        for e, expert in enumerate(unfused.experts):
            expert.gate_up.weight.copy_(fused.gate_up[e])
            expert.down.weight.copy_(fused.down[e])
    return fused, unfused


FUSED = ("loop_linear", "loop_matmul", "bmm", "baddbmm", "matmul", "einsum", "einsum_permuted")


def assert_calibrated_as_unfused(model: nn.Module, unfused: nn.Module, x: Tensor) -> None:
    """``model`` (stacked or gathered experts) computes ``unfused``'s outputs, and matrix ``e``
    of its weights ``gate_up`` and ``down`` has the maxima ``experts.e``'s ``nn.Linear`` has."""
    assert float((output(model, (x,)) - output(unfused, (x,))).abs().max()) <= EXACT
    got = activation_ranges(model, dict(model.named_parameters()), x)
    expected = activation_ranges(unfused, dict(unfused.named_parameters()), x)
    for name in ("gate_up", "down"):
        want = torch.stack([expected[f"experts.{e}.{name}.weight", 1] for e in range(EXPERTS)])
        assert torch.allclose(got[name, 2], want, rtol=EXACT, atol=0)


@pytest.mark.parametrize("how", FUSED)
def test_fused_experts_are_calibrated_as_unfused_ones(how):
    """Matrix ``e`` of a fused weight has the maxima of the tokens routed to expert ``e`` (row
    ``e`` of ``[E, C]``), as ``experts.e``'s ``nn.Linear`` has, and ``"activation"`` ends at the
    unfused model's point."""
    x = _batch(TOKENS, D)
    fused, unfused = moe(how)
    assert float((output(fused, (x,)) - output(unfused, (x,))).abs().max()) <= EXACT
    got = activation_ranges(fused, dict(fused.named_parameters()), x)
    expected = activation_ranges(unfused, dict(unfused.named_parameters()), x)
    assert all(
        expected[f"experts.{e}.{n}.weight", 1] is not None
        for e in range(EXPERTS)
        for n in ("gate_up", "down")
    )
    for name in ("gate_up", "down"):
        want = torch.stack([expected[f"experts.{e}.{name}.weight", 1] for e in range(EXPERTS)])
        # down reads activations the fused product and the experts' linears compute with other
        # kernels: equal in real arithmetic, rounded alike on some CPUs only
        assert torch.allclose(got[name, 2], want, rtol=EXACT, atol=0)
    equalized(fused, x, gaugefix.discover(fused, x))
    equalized(unfused, x, gaugefix.discover(unfused, x))
    for e, expert in enumerate(unfused.experts):
        assert rel_change(expert.gate_up.weight.detach(), fused.gate_up[e].detach()) <= TOL
        assert rel_change(expert.down.weight.detach(), fused.down[e].detach()) <= TOL
    assert rel_change(unfused.norm.weight.detach(), fused.norm.weight.detach()) <= TOL


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm from torch 2.8")
def test_grouped_mm_reads_each_group_of_rows_with_its_matrix():
    """``grouped_mm(x, W, offs=...)`` (rows sorted by expert, ``W`` ``[E, in, out]`` or a
    transposed ``[E, out, in]``): row ``e`` of the maxima is that of the rows of group ``e``;
    rows past ``offs[-1]`` count for none (float32: the kernels' dtype on CPU)."""
    w = nn.Parameter(torch.randn(EXPERTS, 2 * HIDDEN, 8))  # [E, out, in]; in: 16-byte rows
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(3))
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)  # expert 1: no rows; rows 9, 10: none
    expected = torch.zeros(EXPERTS, 8, dtype=torch.float64)
    expected[0], expected[2] = x[:2].abs().amax(0), x[2:9].abs().amax(0)
    functions = [torch._grouped_mm, getattr(F, "grouped_mm", None)]
    for grouped_mm in filter(None, functions):
        seen = activation_ranges(
            _Call(lambda v, mm=grouped_mm: mm(v, w.transpose(-2, -1), offs=offs)), {"w": w}, x
        )
        assert list(seen) == [("w", 2)] and torch.equal(seen["w", 2], expected)


class _Call(nn.Module):
    def __init__(self, function: object) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_mixtral_fused_experts_have_the_maxima_of_their_routed_tokens(implementation):
    """transformers' Mixtral, experts fused (``[E, 2 I, H]``, ``[E, H, I]``) and computed on
    slices ``W[e]`` (``"eager"``, float64) or by ``grouped_mm`` (float32): the maxima of each
    expert's own tokens, computed from the routing (``grouped_mm``: the input projection's,
    whose inputs are the routed rows themselves)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = DTYPE if implementation == "eager" else torch.float32
    model = transformers.MixtralForCausalLM(config).to(dtype).eval()
    experts = model.model.layers[0].mlp.experts
    if not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
        pytest.skip("this transformers version stores Mixtral's experts unfused")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    elif implementation != "eager":
        pytest.skip("this transformers version has one experts implementation")
    calls = []
    hook = experts.register_forward_hook(lambda m, args, out: calls.append(args))
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    prefix = "model.layers.0.mlp.experts."
    weights = {prefix + n: p for n, p in experts.named_parameters()}
    seen = activation_ranges(model, weights, ids)
    hook.remove()
    ((hidden, index, _),) = calls
    gate_up, down = torch.zeros(4, 16, dtype=DTYPE), torch.zeros(4, 8, dtype=DTYPE)
    hidden = hidden.to(DTYPE)
    for e in range(4):
        rows = hidden[(index == e).any(-1)]
        gate, up = F.linear(rows, experts.gate_up_proj[e].to(DTYPE)).chunk(2, -1)
        gate_up[e] = rows.abs().amax(0)
        down[e] = (experts.act_fn(gate) * up).abs().amax(0)
    assert torch.equal(seen[prefix + "gate_up_proj", 2], gate_up)
    if implementation == "eager":  # the output projection's input: rounded per row order
        assert torch.allclose(seen[prefix + "down_proj", 2], down, rtol=EXACT, atol=0)


# -- attention ------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, **kwargs: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attention = nn.MultiheadAttention(D, 2, batch_first=True, **kwargs)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        h = self.norm(x)
        key = h if memory is None else memory
        return self.attention(h, key, key, need_weights=False)[0]


def test_multi_head_attention_in_projections_are_recorded():
    """``F.multi_head_attention_forward`` dispatches as one call: its ``F.linear`` of the
    query, key and value through ``in_proj_weight`` (or their own weights when the key and
    value have other widths) are recorded from its arguments, as those ``F.linear`` calls."""
    torch.manual_seed(0)
    x = _batch(2, 5, D)
    model = randomise_(Attention(), seed=1).eval()
    seen = activation_ranges(model, dict(model.named_parameters()), x)
    with torch.no_grad():
        normed = model.norm(x).abs().amax((0, 1))
    assert list(seen) == [("attention.in_proj_weight", 1), ("attention.out_proj.weight", 1)]
    assert torch.equal(seen["attention.in_proj_weight", 1], normed)
    memory = _batch(2, 7, 3, seed=5)
    model = randomise_(Attention(kdim=3, vdim=3), seed=1).eval()
    seen = activation_ranges(model, dict(model.named_parameters()), (x, memory))
    assert torch.equal(seen["attention.q_proj_weight", 1], normed)
    for name in ("k_proj_weight", "v_proj_weight"):
        assert torch.equal(seen[f"attention.{name}", 1], memory.abs().amax((0, 1)))


# -- what is not recorded -------------------------------------------------------------------------

# einsums of ``h`` ([B, D, D] or [B, D]) with a parameter that do not read the parameter's
# channels one by one: contracted on two dims, a repeated subscript (diagonal, trace), elementwise.
UNREAD = {
    "two_dims": ("bij,oij->bo", (OUT, D, D), 3),
    "diagonal_input": ("bii,oi->bo", (OUT, D), 3),
    "diagonal_weight": ("bi,ii->b", (D, D), 2),
    "elementwise": ("bi,oi->boi", (OUT, D), 2),
}


@pytest.mark.parametrize("case", UNREAD)
def test_einsums_not_reading_channels_one_by_one_record_nothing(case):
    """These fall back to ``"range"``: no maxima recorded for the parameter."""
    equation, shape, dims = UNREAD[case]
    w = nn.Parameter(torch.randn(*shape, dtype=DTYPE))
    x = _batch(*([4, D, D][:dims]))
    model = _Call(lambda h: torch.einsum(equation, h, w))
    assert activation_ranges(model, {"w": w}, x) == {}
