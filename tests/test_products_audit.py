"""Products of two parameters (``B @ A``), audited.

Discovery keeps the rank channels of ``B [4, r] @ A [r, 6]`` and carries the product's outer
factors (``B``'s rows, ``A``'s columns). Every spelling here is tried for a generator that is not
exact: the product beside other reads of its factors (a linear map, a bias, a norm, an
elementwise scale, a second product), inside a residual sum ``W + B @ A`` and DoRA's column norm
``||W + B @ A||``, a factor that is a vector (``v @ A``, ``B @ v``, ``u @ B``), chains of three
parameters, a square parameter read as both factors of two products, ``addmm``, ``einsum``
with three operands or a repeated letter, batched, sliced, permuted, expanded and parametrized
factors, and a function of the product (``relu``, ``softmax``, ``layer_norm``, its norms). Each
structure found moves the model without changing its outputs on fresh inputs (float64, 1e-10);
the forms that are not a symmetry (one parameter twice, a slice, a letter summed over one
factor alone, a batch, a shift) are excluded, with a reason. The consumers work on such a
structure: ``balance_``, ``equalize_`` (norm and range), ``GaugeFixing``,
``gauge_coordinates``, ``scale_groups`` and the JSON round trip. peft's DoRA on GPT-2 and Llama
with rsLoRA, ``lora_bias`` and ``modules_to_save`` is exact too.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn

import gaugefix
from architectures import rel_change
from test_lora import DTYPE, FRESH_IDS, IDS, SCALE, TOL, assert_exact, lora_model, outputs
from test_lora_audit import llama_with

pytestmark = pytest.mark.usefixtures("single_thread")

R = 3  # the rank of B @ A
X = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
FRESH_X = torch.randn(9, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
SEEDS = (0, 1, 2)
TINY_LR = 1e-30


class Net(nn.Module):
    """Parameters ``A [r, 6]``, ``B [4, r]``, ``C [6, 4]``, ``W [4, 6]``, ``S [6, 6]``,
    ``v [r]``, ``u [4]``, ``w6 [6]`` and a linear map ``L [3, 4]``, read by ``op(self, x)``."""

    def __init__(self, op) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = {"A": (R, 6), "B": (4, R), "C": (6, 4), "W": (4, 6), "S": (6, 6), "v": (R,),
                  "u": (4,), "w6": (6,)}  # fmt: skip
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.randn(shape, generator=g, dtype=DTYPE)))
        self.L = nn.Linear(4, 3).to(DTYPE)
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(self, x)


def net(op) -> nn.Module:
    torch.manual_seed(0)
    return Net(op).eval()


def worst_change(model: nn.Module, structure: gaugefix.GaugeStructure) -> float:
    """The largest relative change of the outputs on fresh inputs over random gauges."""
    worst = 0.0
    for seed in SEEDS:
        moved = copy.deepcopy(model)
        gaugefix.random_gauge_(
            moved, structure, SCALE, generator=torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            worst = max(worst, rel_change(model(FRESH_X), moved(FRESH_X)))
    return worst


def dora(m: Net) -> Tensor:
    """DoRA's weight: ``W + B @ A`` divided by its (detached) norm per output row, times
    ``u``."""
    weight = m.W + m.B @ m.A
    return m.u[:, None] * weight / weight.norm(p=2, dim=1, keepdim=True).detach()


def unit_rows(weight: Tensor) -> Tensor:
    return weight / weight.norm(p=2, dim=1, keepdim=True)


# op, and the number of generators: the r rank channels, plus what the rest of the net keeps
FOUND = {
    "F.linear(x, B @ A)": (lambda m, x: F.linear(x, m.B @ m.A), R),
    "x @ (B @ A).T": (lambda m, x: x @ (m.B @ m.A).T, R),
    "tensordot(B, A, dims=1)": (lambda m, x: F.linear(x, torch.tensordot(m.B, m.A, dims=1)), R),
    "multi_dot([B, A])": (lambda m, x: F.linear(x, torch.linalg.multi_dot([m.B, m.A])), R),
    "F.linear(x, (B @ A).T)": (lambda m, x: F.linear(x[:, :4], (m.B @ m.A).T), R),
    "W + B @ A": (lambda m, x: F.linear(x, m.W + m.B @ m.A), R),
    "W - B @ A, W read alone too": (
        lambda m, x: F.linear(x, m.W - m.B @ m.A) + F.linear(x, m.W),
        R,
    ),
    "addmm(W, B, A, beta, alpha)": (
        lambda m, x: F.linear(x, torch.addmm(m.W, m.B, m.A, beta=0.5, alpha=2.0)),
        R,
    ),
    "DoRA column norm, L after relu": (lambda m, x: m.L(torch.relu(F.linear(x, dora(m)))), R),
    "||W + B @ A|| not detached": (
        lambda m, x: F.linear(x, m.W + m.B @ m.A) / (m.W + m.B @ m.A).norm(dim=1),
        R,
    ),
    "B @ A beside B(A(x))": (
        lambda m, x: F.linear(x, m.B @ m.A) + F.linear(F.linear(x, m.A), m.B),
        R,
    ),
    "B @ A beside A^T(B^T(x))": (
        lambda m, x: F.linear(x, m.B @ m.A) + F.linear(F.linear(x[:, :4], m.B.T), m.A.T)[:, :4],
        R,
    ),
    "B @ A beside tanh between A and B (relu)": (
        lambda m, x: F.linear(x, m.B @ m.A) + torch.relu(F.linear(x, m.A)) @ m.B.T,
        R,
    ),
    "B @ A and B @ v": (lambda m, x: F.linear(x, m.B @ m.A) * (m.B @ m.v), R),
    "B @ A with bias u": (lambda m, x: F.linear(x, m.B @ m.A, m.u), R),
    "B @ A then functions of it": (
        lambda m, x: F.linear(x, F.layer_norm(torch.softmax(m.B @ m.A, 1), (6,))),
        R,
    ),
    "(B @ A) / ||B @ A||": (lambda m, x: F.linear(x, (m.B @ m.A) / (m.B @ m.A).norm()), R),
    "(B @ A) @ (B @ A).T": (lambda m, x: F.linear(x[:, :4], (m.B @ m.A) @ (m.B @ m.A).T), R),
    "2 (B @ A) - B @ A": (lambda m, x: F.linear(x, 2 * (m.B @ m.A) - m.B @ m.A), R),
    "B @ A + u w6^T": (lambda m, x: F.linear(x, m.B @ m.A + m.u[:, None] * m.w6), R),
    "rows of B @ A gathered": (lambda m, x: F.linear(x, (m.B @ m.A)[[0, 1, 1, 2]]), R),
    "views, transposes, contiguous": (
        lambda m, x: F.linear(x, (m.A.T.contiguous() @ m.B.view(4, R).T.contiguous()).T),
        R,
    ),
    "A reshaped": (lambda m, x: F.linear(x, m.B @ m.A.reshape(6, R).T), R),
    "einsum ok,ki->io": (lambda m, x: F.linear(x, torch.einsum("ok,ki->io", m.B, m.A).T), R),
    "v @ A": (lambda m, x: x * (m.v @ m.A), R),
    "mv(B, v)": (lambda m, x: x[:, :4] * torch.mv(m.B, m.v), R),
    "v @ A beside A(x) * v": (
        lambda m, x: (F.linear(x, m.A) * m.v).sum(1, keepdim=True) + x * (m.v @ m.A),
        R,
    ),
    "v in two products": (lambda m, x: x * (m.v @ m.A) * (m.B @ m.v).sum(), R),
    "B @ (A @ S)": (lambda m, x: F.linear(x, m.B @ m.A) + F.linear(x, m.B @ (m.A @ m.S)), R),
    "C @ B @ A, L": (lambda m, x: m.L(F.linear(x, (m.C @ m.B @ m.A).T[:4])), None),
    "u @ B": (lambda m, x: F.linear(x, m.A) * (m.u @ m.B), None),
    "(B @ A) * W": (lambda m, x: F.linear(x, (m.B @ m.A) * m.W), None),
    "W @ S and C^T @ S": (lambda m, x: F.linear(x, m.W @ m.S) + F.linear(x, m.C.T @ m.S), None),
    "S as a factor and in x @ S^T": (
        lambda m, x: F.linear(x, m.W @ m.S) + F.linear(x @ m.S.T, m.W),
        None,
    ),
    "(B @ A) @ S": (lambda m, x: F.linear(x, (m.B @ m.A) @ m.S), None),
    "B @ A.detach(), A.data, A.clone()": (
        lambda m, x: F.linear(x, m.B @ m.A.detach() + m.B @ m.A.data + m.B @ m.A.clone()),
        R,
    ),
    "einsum ij,ji-> (a trace of W C)": (lambda m, x: x * torch.einsum("ij,ji->", m.W, m.C), None),
    "einsum ij,ij-> (Frobenius)": (lambda m, x: x * torch.einsum("ij,ij->", m.W, m.C.T), None),
    "u . (B @ v)": (lambda m, x: x * torch.einsum("i,i->", m.u, m.B @ m.v), None),
    "einsum i,ij->j": (lambda m, x: x * torch.einsum("i,ij->j", m.u, m.W), None),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_every_generator_of_a_product_is_exact(name):
    """Random gauges (h ~ N(0, 2.5^2)) change the outputs on fresh inputs by 1e-10 at most;
    where the rest of the net keeps no more, the generators are the r rank channels."""
    op, count = FOUND[name]
    model = net(op)
    structure = gaugefix.discover(model, X)
    assert structure.num_generators >= R if count is None else structure.num_generators == count
    assert worst_change(model, structure) <= TOL


BLOCKED = {
    "A^T @ A": lambda m, x: F.linear(x[:, :R], m.A @ m.A.T),
    "S @ S": lambda m, x: F.linear(x, m.S @ m.S),
    "einsum ii->": lambda m, x: x * torch.einsum("ii->", m.S),
    "einsum ij,ij->": lambda m, x: x * torch.einsum("ij,ij->", m.W, m.W),
    "einsum of three": lambda m, x: F.linear(x, torch.einsum("ok,kj,ji->oi", m.B, m.A, m.S)),
    "einsum ok,ki->": lambda m, x: x * torch.einsum("ok,ki->", m.B, m.A),
    "einsum ok,ki->i": lambda m, x: x * torch.einsum("ok,ki->i", m.B, m.A),
    "bmm": lambda m, x: F.linear(x, torch.bmm(m.B[None], m.A[None])[0]),
    "baddbmm": lambda m, x: F.linear(x, torch.baddbmm(m.W[None], m.B[None], m.A[None])[0]),
    "sliced factors": lambda m, x: F.linear(x, m.B[:, :2] @ m.A[:2]),
    "permuted factor": lambda m, x: F.linear(x, m.B[:, [2, 0, 1]] @ m.A),
    "repeated column": lambda m, x: F.linear(x, m.B[:, [0, 0, 1]] @ m.A),
    "expanded column": lambda m, x: F.linear(x, m.B[:, :1].expand(4, R) @ m.A),
    "u B @ A": lambda m, x: F.linear(x, (m.u[:, None] * m.B) @ m.A),
    "B @ (v A)": lambda m, x: F.linear(x, m.B @ (m.v[:, None] * m.A)),
    "kron": lambda m, x: F.linear(x, torch.kron(m.B, m.A)[:4, :6]),
    "outer": lambda m, x: F.linear(x, torch.outer(m.u, m.w6)),
    "multi_dot of three": lambda m, x: F.linear(x, torch.linalg.multi_dot([m.B, m.A, m.S])),
    "v @ v": lambda m, x: x * (m.v @ m.v),
    "S @ S.clone()": lambda m, x: F.linear(x, m.S @ m.S.clone()),
    "S @ S.detach()": lambda m, x: F.linear(x, m.S @ m.S.detach()),
    "S @ S.T.contiguous()": lambda m, x: F.linear(x, m.S @ m.S.T.contiguous()),
    "S @ S.flip(0)": lambda m, x: F.linear(x, m.S @ m.S.flip(0)),
    "S @ S reshaped": lambda m, x: F.linear(x, m.S @ m.S.reshape(36).reshape(6, 6)),
    "S @ (S * 1)": lambda m, x: F.linear(x, m.S @ (m.S * 1.0)),
    "einsum ii,ij->j": lambda m, x: x[:, :4] * torch.einsum("ii,ij->j", m.S, m.C),
    "einsum ij,jj->i": lambda m, x: x[:, :4] * torch.einsum("ij,jj->i", m.W, m.S),
    "einsum ij,ji->i": lambda m, x: x[:, :4] * torch.einsum("ij,ji->i", m.W, m.C),
    "einsum ij,ij->ij": lambda m, x: F.linear(x, torch.einsum("ij,ij->ij", m.W, m.C.T)),
    "B @ relu(A)": lambda m, x: F.linear(x, m.B @ torch.relu(m.A)),
    "||A|| beside B @ A": lambda m, x: F.linear(x, m.B @ m.A) * m.A.norm(),
    "B as a bias beside B @ A": lambda m, x: F.linear(x, m.B @ m.A, m.B.sum(1)),
    "B @ A over ||B||": lambda m, x: F.linear(x, (m.B @ m.A) / m.B.norm()),
}


@pytest.mark.parametrize("name", list(BLOCKED))
def test_products_that_are_not_symmetries_are_excluded(name):
    """A parameter twice, a repeated letter, three operands, a batch, a slice or an
    arrangement of a factor, a factor scaled by another parameter, a norm or a plain read of a
    factor: no generator acts on ``A`` or ``B``, and a reason is recorded."""
    model = net(BLOCKED[name])
    structure = gaugefix.discover(model, X)
    touched = {"A", "B", "S", "W", "v", "u", "w6"} & set(structure.param_order)
    assert not bool(structure.touching(touched).any())
    assert structure.excluded
    assert worst_change(model, structure) <= TOL


class Doubled(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2.0 * w


def test_a_parametrized_factor_is_exact():
    """``A`` behind ``torch.nn.utils.parametrize``: what is found stays exact."""
    model = net(lambda m, x: F.linear(x, m.B @ m.A))
    parametrize.register_parametrization(model, "A", Doubled())
    structure = gaugefix.discover(model, X)
    assert worst_change(model, structure) <= TOL


# --- the consumers on a structure with products --------------------------------------------------
def consumer_net() -> tuple[nn.Module, gaugefix.GaugeStructure]:
    """DoRA's weight read through ``L`` after a ReLU: rank channels and hidden channels."""
    model = net(lambda m, x: m.L(torch.relu(m.u * F.linear(x, unit_rows(m.W + m.B @ m.A)))))
    structure = gaugefix.discover(model, X)
    assert structure.num_generators == R + 4
    gaugefix.random_gauge_(model, structure, 1.0, generator=torch.Generator().manual_seed(4))
    return model, structure


def keeps_outputs(model: nn.Module, move) -> None:
    with torch.no_grad():
        before = model(FRESH_X)
        move()
        assert rel_change(before, model(FRESH_X)) <= TOL


def test_balance_and_equalize_on_products_keep_the_function():
    for move in (
        lambda m, s: gaugefix.balance_(m, s, tol=1e-12),
        lambda m, s: gaugefix.equalize_(m, s, "norm"),
        lambda m, s: gaugefix.equalize_(m, s, "range"),
    ):
        model, structure = consumer_net()
        keeps_outputs(model, lambda: move(model, structure))  # noqa: B023
    model, structure = consumer_net()
    result = gaugefix.balance_(model, structure, tol=1e-12)
    assert result.converged
    params = dict(model.named_parameters())
    rows = params["A"].detach().square().sum(1)
    cols = params["B"].detach().square().sum(0)
    assert float(((rows - cols).abs() / (rows + cols)).max()) <= 1e-8


def test_gauge_coordinates_round_trip_on_products():
    model, structure = consumer_net()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    coords = gaugefix.gauge_coordinates(model, structure)
    back = coords.to_state_dict()
    assert (
        max(float((back[k] - state[k]).abs().max() / state[k].abs().max()) for k in back) <= 1e-12
    )
    with torch.no_grad():
        before = model(FRESH_X)
        model.load_state_dict(coords.balanced, strict=False)
        assert rel_change(before, model(FRESH_X)) <= TOL


def test_gauge_fixing_steps_move_along_the_orbit_only():
    """With ``lr = 1e-30`` the optimizer's steps round away (1e-30 |grad| is far below the
    parameters' last bit): ``GaugeFixing``'s moves (its balancing at the start) are all that is
    left, and they are gauge moves."""
    model, structure = consumer_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=TINY_LR)
    with torch.no_grad():
        before = model(FRESH_X)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    gaugefix.GaugeFixing(optimizer, model, structure, strength=1.0, every=1)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).square().sum().backward()
        optimizer.step()
    with torch.no_grad():
        assert rel_change(before, model(FRESH_X)) <= TOL
    assert any(not torch.equal(start[k], p) for k, p in model.named_parameters())


def test_json_round_trip_and_scale_groups_on_products():
    model, structure = consumer_net()
    again = gaugefix.GaugeStructure.from_dict(json.loads(json.dumps(structure.to_dict())))
    h = torch.randn(
        structure.num_generators, dtype=DTYPE, generator=torch.Generator().manual_seed(9)
    )
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    gaugefix.apply_gauge_(one, structure, h)
    gaugefix.apply_gauge_(two, again, h)
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters(), strict=True))
    groups = structure.scale_groups()
    assert isinstance(groups, list)
    assert json.loads(json.dumps(groups)) == groups


# --- peft's DoRA ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


BUILDS = {
    "gpt2": lambda peft: lora_variant(peft, "gpt2", {"use_dora": True}),
    "llama_rslora": lambda peft: lora_variant(
        peft, "llama", {"use_dora": True, "use_rslora": True}
    ),
    "llama_modules_to_save": lambda peft: lora_variant(
        peft, "llama", {"use_dora": True, "modules_to_save": ["lm_head"]}
    ),
    "llama_embedding_rslora_modules_to_save": lambda peft: llama_with(
        peft,
        target_modules=["embed_tokens", "o_proj"],
        use_dora=True,
        use_rslora=True,
        modules_to_save=["lm_head"],
    ),  # fmt: skip
}


@pytest.mark.parametrize("build", list(BUILDS))
def test_peft_dora_variants_are_exact(peft, build):
    """DoRA on GPT-2's ``Conv1D`` (``fan_in_fan_out``) and on Llama with rsLoRA, a saved head
    and an adapted embedding: random gauges and ``balance_`` keep the logits (1e-10)."""
    model = BUILDS[build](peft)
    structure = gaugefix.discover(model, input_ids=IDS)
    assert structure.num_generators > 0
    assert_exact(model, structure, input_ids=FRESH_IDS)
    with torch.no_grad():
        before = outputs(model, input_ids=FRESH_IDS)
        gaugefix.balance_(model, structure, tol=1e-12)
        assert rel_change(before, outputs(model, input_ids=FRESH_IDS)) <= TOL


def lora_variant(peft, arch: str, config: dict) -> nn.Module:
    """:func:`test_lora.lora_model` with the options ``config``."""
    import test_lora

    old = dict(test_lora.VARIANTS)
    test_lora.VARIANTS["audit"] = config
    try:
        return lora_model(peft, arch, "audit")
    finally:
        test_lora.VARIANTS.clear()
        test_lora.VARIANTS.update(old)
