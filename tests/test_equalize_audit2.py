"""Regressions found by a second audit of ``equalize_`` and ``scale_groups``: overflow of a
half-precision model, readers of ``"activation"`` that are not what their type says (a forward
that reads the weight transposed, a weight tied between modules, an input passed by keyword, a
pruned column), the iteration budget of ``"range"``, and scale groups on a weight read
transposed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugefix
import test_scale_groups as registry
import test_scale_groups_audit as audit
from architectures import randomise_, rel_change
from test_equalize import (
    MODELS,
    SeparableResidual,
    counted,
    output,
    reference_ranges,
    same_bits,
    scrambled,
    snapshot,
)
from test_scale_groups_audit import assert_groups_exact, run_on

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 and eval mode, every parameter moved by ``0.3 * N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return model


# -- overflow in the model's dtype ---------------------------------------------------------------


def cancelling_half_mlp() -> tuple[nn.Module, Tensor]:
    """A float16 MLP whose two identical hidden channels (about 250) are read by columns of
    +-1000 that cancel: SmoothQuant at ``alpha = 1`` makes those columns about 2.5e5, past
    float16's largest number (65504), while the output stays small."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.abs_().mul_(250)
        model[0].bias.zero_()
        model[0].weight[1] = model[0].weight[0]
        model[2].weight[:, 0], model[2].weight[:, 1] = 1000.0, -1000.0
    return model.half(), torch.rand(8, 4, generator=torch.Generator().manual_seed(1)).half()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_move_that_overflows_the_dtype_is_refused_and_changes_nothing(alpha):
    model, x = cancelling_half_mlp()
    assert bool(torch.isfinite(model(x)).all())
    state = snapshot(model)
    with pytest.raises(ValueError, match="would overflow parameter") as err:
        gaugefix.equalize_(
            model, gaugefix.discover(model, x), "activation", calibration=x, alpha=alpha
        )
    assert "\n" not in str(err.value) and same_bits(model, state)


# -- readers of "activation" -----------------------------------------------------------------------


class TransposedLinear(nn.Linear):
    """An ``nn.Linear`` whose ``forward`` reads its (square) weight as ``[in, out]``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.T, self.bias)


class TransposedKey(nn.Module):
    """A pre-norm attention whose key projection reads its weight transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.q, self.k = nn.LayerNorm(6), nn.Linear(6, 6), TransposedLinear(6, 6)
        self.v, self.o = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        p = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1)
        return x + self.o(p @ self.v(h))


def test_a_linear_that_reads_its_weight_transposed_is_no_reader():
    """Its input channels are the weight's rows, not the columns ``nn.Linear`` has: taken as a
    reader, the query-key pairs (its output channels, divided on the weight's dim 1) were
    balanced against the norm's output ranges, converged, to nothing SmoothQuant or ``range``
    defines (log-ratio of the pairs' ranges 1.8). No linear map reads them: they are balanced
    as ``"range"`` balances them."""
    model = perturbed(TransposedKey())
    x = torch.randn(2, 5, 6, dtype=DTYPE) * torch.tensor([1, 10, 0.1, 3, 1, 1], dtype=DTYPE)
    s = gaugefix.discover(model, x)
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    pairs = [n for n, k in enumerate(s.generator_kinds) if k == "query-key"]
    r_in, r_out = reference_ranges(model, s, counted(s))
    assert len(pairs) == 6
    assert float((r_in[pairs] / r_out[pairs]).log().abs().max()) <= 1e-12


def smoothquant_check(reader_inputs: Tensor, columns: Tensor, alpha: float) -> float:
    """``max_j |alpha log A_j - (1 - alpha) log B_j|`` with ``A_j = max |x_j|`` over the
    readers' inputs (``[rows, C]``) and ``B_j`` the largest ``|entry|`` of column ``j``."""
    a = reader_inputs.abs().amax(0).log()
    b = columns.abs().amax(0).log()
    return float((alpha * a - (1 - alpha) * b).abs().max())


def test_gpt2_conv1d_reads_its_input_channels_on_its_weight_rows():
    """Hugging Face's ``Conv1D`` (``x @ W``, ``W [in, out]``) is still a reader, found by its
    own ``forward``: ``ln_2``'s channels against ``c_fc``'s rows, SmoothQuant's formula."""
    model, ids, s = scrambled("hf-gpt2")
    result = gaugefix.equalize_(model, s, "activation", calibration=ids, alpha=0.7)
    seen = []
    block = model.transformer.h[1]
    hook = block.mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    output(model, (ids,))
    hook.remove()
    (normed,) = seen
    rows = block.mlp.c_fc.weight.detach().T  # [out, in]: input channel j is column j
    assert result.converged
    assert smoothquant_check(normed.reshape(-1, normed.shape[-1]), rows, 0.7) <= 1e-12


class TiedReaders(nn.Module):
    """Two ``nn.Linear`` modules sharing one weight, reading two activations (the second ten
    times larger): the weight's column ``j`` is divided by one generator, which scales
    channel ``j`` of both."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 5), nn.Linear(4, 5)
        self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 4)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.a(torch.relu(self.fa(x))) + self.b(torch.relu(self.fb(x)))


def test_every_module_reading_a_tied_weight_is_calibrated():
    """The second module holding the weight was not hooked (its parameter name is not the one
    the structure uses), so ``A_j`` missed its input."""
    model = perturbed(TiedReaders())
    with torch.no_grad():
        model.fb.weight.mul_(10)
        model.fb.bias.mul_(10)
    x = torch.randn(7, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    with torch.no_grad():
        inputs = torch.cat([torch.relu(model.fa(x)), torch.relu(model.fb(x))])
    assert result.converged
    assert smoothquant_check(inputs, model.a.weight.detach(), 0.5) <= 1e-12


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(input=torch.relu(self.fc1(x)))


def test_a_reader_called_with_its_input_by_keyword_is_calibrated():
    """``fc2(input=h)`` gives the forward hook no positional input: the calibration pass was
    refused as if the model did not run on the batch."""
    model = perturbed(KeywordCall())
    x = torch.randn(6, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    result = gaugefix.equalize_(model, s, "activation", calibration=x, alpha=0.3)
    with torch.no_grad():
        hidden = torch.relu(model.fc1(x))
    assert result.converged
    assert smoothquant_check(hidden, model.fc2.weight.detach(), 0.3) <= 1e-12


class RoutedTokens(nn.Module):
    """A norm, then two ``nn.Linear`` experts, each called on the tokens routed to it (none,
    when the router sends every token to the other), summed back into place, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.router = nn.LayerNorm(4), nn.Linear(4, 2)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        choice = self.router(h).argmax(-1)
        y = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            tokens = (choice == i).nonzero().reshape(-1)
            y = y.index_add(0, tokens, torch.relu(expert(h[tokens])))
        return self.head(y)


def test_a_reader_called_on_no_tokens_is_calibrated_on_the_others():
    """An expert that receives no token of the calibration batch is called on an empty input:
    its maximum over nothing failed, and the batch was refused as one the model does not run
    on. It adds nothing to the activation ranges, and its columns, which move with the
    others, count among the readers' (``B_j``) as the router's and the other expert's do."""
    torch.manual_seed(0)
    model = perturbed(RoutedTokens())
    x = torch.randn(6, 4, dtype=DTYPE)
    s = gaugefix.discover(model, x, allow_value_dependent=True)
    with torch.no_grad():  # every token to expert 0
        model.router.bias.copy_(torch.tensor([100.0, -100.0], dtype=DTYPE))
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    with torch.no_grad():
        normed = model.ln(x)
    readers = (model.router, *model.experts)  # the norm's channels: read by all three
    columns = torch.cat([m.weight for m in readers]).detach()
    assert smoothquant_check(normed, columns, 0.5) <= 1e-12


def test_a_channel_its_reader_ignores_is_balanced_on_weights_only():
    """A residual stream channel the head reads through a zero (pruned) column has no
    SmoothQuant scale (``B_j = 0``); it is balanced as ``"range"`` balances it (stem and
    pointwise rows against the depthwise kernel), not its activation range against the
    kernel."""
    torch.manual_seed(0)
    model = SeparableResidual().to(DTYPE).eval()
    with torch.no_grad():
        model.head.weight[:, 2] = 0
        model.stem.bias[2] = 5.0  # an activation range far above the weights
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    assert result.converged and rel_change(before, output(model, (x,))) <= TOL
    r_in, r_out = reference_ranges(model, s, counted(s))
    assert math.isclose(float(r_in[2]), float(r_out[2]), rel_tol=1e-12)


# -- the iteration budget --------------------------------------------------------------------------


@pytest.mark.parametrize("max_iter", [1, 3])
def test_range_takes_at_most_max_iter_iterations(max_iter):
    """Where the tie-break runs, the ``p``-balance and the max-balance each had ``max_iter``:
    ``iterations`` reported up to twice it."""
    model, _, s = scrambled("gpt")
    result = gaugefix.equalize_(model, s, "range", max_iter=max_iter)
    assert result.iterations <= max_iter and not result.converged


# -- scale groups of a weight read transposed ----------------------------------------------------


class Transposed(nn.Module):
    """A norm, an ``nn.Linear`` whose weight is read as ``[in, out]`` (``read``), then a ReLU
    MLP (``fc``, ``out``)."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.ln, self.lin, self.read = nn.LayerNorm(6), nn.Linear(6, 6), read
        self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.ln(x), self.lin.weight
        if self.read == "matmul":
            y = h @ w
        elif self.read == "linear of .T":
            y = F.linear(h, w.T, self.lin.bias)
        elif self.read == "einsum":
            y = torch.einsum("bi,io->bo", h, w)
        else:  # the module's own forward
            y = self.lin(h)
        return self.out(torch.relu(self.fc(torch.relu(y))))


class PlainAddmm(nn.Module):
    """A weight on a plain ``nn.Module``, read as ``Conv1D`` reads it: a tool applying groups
    by module type takes it for ``[out, in]``."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.proj = nn.LayerNorm(6), nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(6, 6))
        self.proj.bias = nn.Parameter(torch.randn(6))
        self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.addmm(self.proj.bias, self.ln(x), self.proj.weight)
        return self.out(torch.relu(self.fc(torch.relu(y))))


TRANSPOSED = {
    "matmul": lambda: Transposed("matmul"),
    "linear of .T": lambda: Transposed("linear of .T"),
    "einsum": lambda: Transposed("einsum"),
    "addmm on a plain module": PlainAddmm,
}


@pytest.mark.parametrize("case", list(TRANSPOSED))
def test_scale_groups_leave_out_a_weight_read_against_its_type(case):
    """A 2-D weight is exported only on the dims its module type stores them (``nn.Linear``
    and unknown modules ``[out, in]``, ``Conv1D`` ``[in, out]``): the groups through ``lin``
    are left out (they were exported on the dims as read, which a tool applying the type's
    convention puts on the wrong dim), and every group exported applies by names and types;
    so also after a save and load."""
    torch.manual_seed(0)
    model = perturbed(TRANSPOSED[case]())
    x = torch.randn(5, 6, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    groups = s.scale_groups()
    assert [(g["smooth_layer"], g["balance_layers"]) for g in groups] == [("fc", ["out"])]
    assert_groups_exact(model, run_on(x), groups)
    assert gaugefix.GaugeStructure.from_dict(s.to_dict()).scale_groups() == groups


def test_scale_groups_keep_a_plain_linear():
    plain = perturbed(Transposed("module"))
    s = gaugefix.discover(plain, torch.randn(5, 6, dtype=DTYPE))
    assert len(s.scale_groups()) == 3 and not s.in_out


HF = {**{f"registry {a}": a for a in registry.ARCHS}, **{f"audit {a}": a for a in audit.ARCHS}}


@pytest.mark.parametrize("name", list(HF))
def test_the_weights_stored_in_out_are_the_conv1d_and_embedding_weights(name):
    """``structure.in_out`` names exactly the gauged weights of ``Conv1D`` and embedding
    modules (GPT-2's ``Conv1D`` groups are exported from it; the registries' tests check the
    groups themselves)."""
    arch = HF[name]
    if name.startswith("registry"):
        model, ids = registry.build(arch)
        s = gaugefix.discover(model, ids)
    else:
        model, inputs = audit.build(arch)
        moe = "num_experts_per_tok" in audit.ARCHS[arch][2]
        s = gaugefix.discover(model, **inputs, allow_value_dependent=moe)
    stored = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if type(m).__name__ == "Conv1D" or isinstance(m, nn.Embedding)
    }
    assert s.in_out == stored & s.params.keys()


def test_activation_at_alpha_zero_ends_where_the_start_leaves_it():
    """Documented: at ``alpha = 0`` the calibration ranges drop out and the conditions
    (every read column's range 1, query-key pairs range-balanced) leave a set; two starting
    points of one orbit end apart, each converged."""
    factory, inputs = MODELS["gpt"]
    ends = []
    for seed in (4, 5):
        torch.manual_seed(0)
        model, x = randomise_(factory(), seed=0).eval(), inputs()
        s = gaugefix.discover(model, x)
        gaugefix.random_gauge_(model, s, 1.5, generator=torch.Generator().manual_seed(seed))
        assert gaugefix.equalize_(model, s, "activation", calibration=x, alpha=0.0).converged
        ends.append(model)
    gap = max(
        float(((p - q).abs() / q.abs()).max())
        for p, q in zip(ends[0].parameters(), ends[1].parameters(), strict=True)
    )
    assert gap > 0.1
