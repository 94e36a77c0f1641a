"""Orbit selection by objective: ``equalize_`` keeps the function exactly and reaches the
closed forms of cross-layer equalization (Nagel et al.) and SmoothQuant."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugefix
from architectures import randomise_, rel_change
from gaugefix import zoo
from test_transformers import throughout

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE = torch.float64
TOL = 1e-10
transformers = pytest.importorskip("transformers")


def output(model: nn.Module, inputs: tuple) -> Tensor:
    """The model's output (its ``logits`` where it has them), computed in float64 throughout
    when the model is float64."""
    with torch.no_grad(), throughout(model):
        out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(model: nn.Module, state: dict[str, Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def reference_ranges(
    model: nn.Module, s: gaugefix.GaugeStructure, names: set[str], p: float = math.inf
) -> tuple[Tensor, Tensor]:
    """Per generator, the largest |entry| it multiplies and divides among ``names`` (for finite
    ``p``: the sum of their ``|entry|^p``), read entry list by entry list from
    ``s.generator(n)`` (0 where it has none)."""
    params = dict(model.named_parameters())
    sides = torch.zeros(2, s.num_generators, dtype=DTYPE)
    for n in range(s.num_generators):
        for k, entries in enumerate(s.generator(n)):
            for name, index in entries:
                if name in names:
                    where = tuple(slice(None) if i is None else i for i in index)
                    values = params[name].detach()[where].abs()
                    if math.isinf(p):
                        sides[k, n] = torch.maximum(sides[k, n], values.max())
                    else:
                        sides[k, n] += values.pow(p).sum()
    return sides[0], sides[1]


def counted(s: gaugefix.GaugeStructure) -> set[str]:
    """What ``range`` counts by default: weight matrices, kernels and gains (not biases)."""
    return {name for name, p in s.params.items() if len(p.shape) >= 2 or "bias" not in name}


# -- the closed forms -----------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(widths=st.tuples(*[st.integers(1, 6)] * 3), seed=st.integers(0, 2**16), bias=st.booleans())
def test_range_is_cross_layer_equalization_on_two_layers(widths, seed, bias):
    """Nagel et al.: with ``r1_i`` the range of row ``i`` of ``W1`` and ``r2_i`` that of
    column ``i`` of ``W2``, both become ``sqrt(r1_i r2_i)``."""
    torch.manual_seed(seed)
    model = zoo.mlp(widths, bias=bias).to(DTYPE)
    x = torch.randn(3, widths[0], dtype=DTYPE)
    s = gaugefix.discover(model, x)
    r1, r2 = model[0].weight.detach().abs().amax(1), model[2].weight.detach().abs().amax(0)
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "range")
    assert result.converged and result.iterations == 1
    expected = (r1 * r2).sqrt()
    assert torch.allclose(model[0].weight.detach().abs().amax(1), expected, rtol=1e-14, atol=0)
    assert torch.allclose(model[2].weight.detach().abs().amax(0), expected, rtol=1e-14, atol=0)
    assert rel_change(before, output(model, (x,))) <= TOL


def test_range_on_a_norm_takes_its_gain_as_the_first_layer():
    """LayerNorm -> Linear is the two-layer chain with ``W1 = diag(gain)``: ``|gain_j|`` and the
    column range ``r2_j`` both become ``sqrt(|gain_j| r2_j)`` (the bias follows the gain)."""
    torch.manual_seed(0)
    model = randomise_(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4)), seed=1).eval()
    x = torch.randn(5, 6, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    gain, shift = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    r2 = model[1].weight.detach().abs().amax(0)
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "range")
    assert result.converged and result.iterations == 1
    expected = (gain.abs() * r2).sqrt()
    assert torch.allclose(model[0].weight.detach().abs(), expected, rtol=1e-14, atol=0)
    assert torch.allclose(model[1].weight.detach().abs().amax(0), expected, rtol=1e-14, atol=0)
    assert torch.allclose(model[0].bias.detach(), shift * expected / gain.abs(), rtol=1e-13)
    assert rel_change(before, output(model, (x,))) <= TOL


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.0, 1.0])
def test_activation_is_smoothquant_on_a_layernorm_linear_block(alpha):
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``: the norm's gain and bias are divided
    by ``s``, the linear's columns multiplied."""
    torch.manual_seed(0)
    model = randomise_(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4)), seed=1).eval()
    x = 2 * torch.randn(5, 3, 6, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    with torch.no_grad():
        act = model[0](x).abs().amax((0, 1))
    gain, shift = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    w = model[1].weight.detach().clone()
    scale = act**alpha / w.abs().amax(0) ** (1 - alpha)
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "activation", calibration=x, alpha=alpha)
    assert result.converged and result.iterations == 1
    for got, want in ((model[0].weight, gain / scale), (model[0].bias, shift / scale)):
        assert torch.allclose(got.detach(), want, rtol=1e-13, atol=0)
    assert torch.allclose(model[1].weight.detach(), w * scale, rtol=1e-13, atol=0)
    assert rel_change(before, output(model, (x,))) <= TOL


# -- any architecture ---------------------------------------------------------------------------


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=4, n_positions=16, vocab_size=40, activation_function="relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama(hidden_act: str = "silu") -> nn.Module:
    """A one-layer Llama (GQA, gated MLP of ``hidden_act``), random weights."""
    config = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=24, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=40, hidden_act=hidden_act, tie_word_embeddings=False,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def ids(n: int) -> Tensor:
    return torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(n))


class SeparableResidual(nn.Module):
    """A MobileNet-style CNN without norms: a stem, a residual block of a depthwise 3x3 and a
    pointwise 1x1 convolution with ReLU, global pooling, a linear head."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.pointwise(torch.relu(self.depthwise(x)))
        return self.head(torch.relu(x).mean((2, 3)))


MODELS = {
    "mlp": (lambda: zoo.mlp((6, 8, 8, 5)), lambda: torch.randn(4, 6, dtype=DTYPE)),
    "cnn": (zoo.cnn, lambda: torch.randn(2, 3, 16, 16, dtype=DTYPE)),
    "separable": (SeparableResidual, lambda: torch.randn(2, 3, 8, 8, dtype=DTYPE)),
    "gpt": (lambda: zoo.GPT(40, 16, 4, 2, 24, 16), lambda: ids(1)),
    "hf-gpt2": (gpt2, lambda: ids(2)),
    "hf-llama": (llama, lambda: ids(3)),
}


def scrambled(name: str) -> tuple[nn.Module, Tensor, gaugefix.GaugeStructure]:
    """A float64 model in eval mode moved off balance by ``random_gauge_(1.5)``."""
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    model = randomise_(factory(), seed=0).eval()
    x = inputs()
    s = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, s, 1.5, generator=torch.Generator().manual_seed(4))
    return model, x, s


@pytest.mark.parametrize("objective", ["range", "activation", "norm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_function_unchanged_and_objective_reached(name, objective):
    model, x, s = scrambled(name)
    before = output(model, (x,))
    calibration = x if objective == "activation" else None
    result = gaugefix.equalize_(model, s, objective, calibration=calibration)
    assert result.converged and result.objective_after <= result.objective_before, result
    assert rel_change(before, output(model, (x,))) <= TOL
    if objective == "norm":
        assert gaugefix.imbalance_stats(model, s)["mu_rel_max"] <= TOL
    if objective == "range":  # every live generator: largest incoming = largest outgoing
        r_in, r_out = reference_ranges(model, s, counted(s))
        live = torch.ones(s.num_generators, dtype=torch.bool)
        live[result.dead_generators] = False
        assert bool(((r_in == 0) | (r_out == 0))[~live].all())
        assert bool(live.any())
        assert float((r_in[live] / r_out[live]).log().abs().max()) <= 1e-9
    if objective == "activation":  # pairs no linear map reads are range-balanced
        pairs = [n for n, k in enumerate(s.generator_kinds) if k in ("query-key", "rotary pair")]
        r_in, r_out = reference_ranges(model, s, counted(s))
        if pairs:
            assert float((r_in[pairs] / r_out[pairs]).log().abs().max()) <= 1e-9
    assert result.h.shape == (s.num_generators,)


def equalized_from(name: str, seed: int, scale: float = 1.5) -> nn.Module:
    """The float64 model ``name`` moved along its orbit by ``random_gauge_(scale)`` (``seed``),
    then equalized by ``range`` to a residual of ``1e-12`` (two solves stopped at ``1e-10``
    can differ by about that much)."""
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    model = randomise_(factory(), seed=0).eval()
    s = gaugefix.discover(model, inputs())
    gaugefix.random_gauge_(model, s, scale, generator=torch.Generator().manual_seed(seed))
    assert gaugefix.equalize_(model, s, "range", tol=1e-12).converged
    return model


def assert_same_parameters(a: nn.Module, b: nn.Module, rtol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert bool(((p - q).abs() <= rtol * q.abs()).all()), name


@pytest.mark.parametrize("name", list(MODELS))
def test_range_reaches_one_point_from_anywhere_on_the_orbit(name):
    """Two starting points of one orbit equalize to the same parameters: where generators share
    counted entries (the residual stream of ``separable``, attention, stacked neurons) the
    max-balances form a set, and the ``p``-balance picks one point of it."""
    assert_same_parameters(equalized_from(name, 4), equalized_from(name, 5), 1e-10)


@settings(max_examples=6, deadline=None)
@given(seeds=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)), scale=st.floats(0.1, 3))
def test_range_on_a_residual_cnn_is_unique(seeds, scale):
    first, second = (equalized_from("separable", seed, scale) for seed in seeds)
    assert_same_parameters(first, second, 1e-10)


def activated_from(name: str, seed: int) -> tuple[nn.Module, gaugefix.EqualizeResult]:
    """The float64 model ``name`` moved by ``random_gauge_(1.5)`` (``seed``), then equalized
    by ``activation`` on its example input."""
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    model = randomise_(factory(), seed=0).eval()
    x = inputs()
    s = gaugefix.discover(model, x)
    gaugefix.random_gauge_(model, s, 1.5, generator=torch.Generator().manual_seed(seed))
    return model, gaugefix.equalize_(model, s, "activation", calibration=x)


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_is_solved_to_rounding_at_one_point_of_the_orbit(name):
    """The Newton steps on the entries attaining each side end on the exact solution of the
    linearised balances (residual at rounding, far below ``tol``, where the parallel step
    alone stops just under it), and two starting points of one orbit reach the same
    parameters."""
    (first, done), (second, _) = activated_from(name, 4), activated_from(name, 5)
    assert done.converged and done.objective_after <= 1e-13, done
    assert_same_parameters(first, second, 1e-10)


@pytest.mark.parametrize("objective", ["range", "activation", "norm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equalizing_twice_changes_nothing(name, objective):
    model, x, s = scrambled(name)
    calibration = x if objective == "activation" else None
    gaugefix.equalize_(model, s, objective, calibration=calibration)
    first = copy.deepcopy(model)
    assert gaugefix.equalize_(model, s, objective, calibration=calibration).converged
    assert_same_parameters(model, first, 1e-10)


def test_range_tie_break_is_the_p_balance():
    """Where generators share counted entries, ``range`` starts from the minimiser of
    ``J_p = sum_e |theta_e|^p``: there every live generator's incoming and outgoing
    ``p``-masses are equal."""
    model, x, s = scrambled("separable")
    names, p = counted(s), gaugefix.equalize.RANGE_P
    h, _, converged, _ = gaugefix.equalize.p_balance(s.bind(model), s, names, p, TOL, 100)
    before = output(model, (x,))
    gaugefix.apply_gauge_(model, s, h)
    m_in, m_out = reference_ranges(model, s, names, p)
    live = (m_in > 0) & (m_out > 0)
    assert converged and bool(live.all())
    assert float(((m_in - m_out).abs() / (m_in + m_out)).max()) <= TOL
    assert rel_change(before, output(model, (x,))) <= TOL


def test_norm_is_balance():
    model, x, s = scrambled("cnn")
    twin = copy.deepcopy(model)
    result = gaugefix.equalize_(model, s, "norm")
    reference = gaugefix.balance_(twin, s)
    assert torch.equal(result.h, reference.h)
    assert result.objective_after == reference.norm_sq_after
    assert same_bits(model, snapshot(twin))


def test_activation_matches_its_calibration_ranges():
    """After ``activation`` with ``alpha = 1/2``, each counted generator's activation range
    equals its readers' column range, both measured afresh."""
    model, x, s = scrambled("gpt")
    result = gaugefix.equalize_(model, s, "activation", calibration=x)
    ranges = {}
    hooks = [
        m.register_forward_hook(
            lambda m, i, o, n=n: ranges.__setitem__(n, i[0].detach().abs().amax((0, 1)))
        )
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    output(model, (x,))
    for hook in hooks:
        hook.remove()
    block = model.blocks[0]
    # ln2's gains: read by fc; the ReLU neurons: read by out
    for reader, weight in (("blocks.0.fc", block.fc.weight), ("blocks.0.out", block.out.weight)):
        col = weight.detach().abs().amax(0)
        assert torch.allclose(ranges[reader], col, rtol=1e-9, atol=0)
    assert result.converged


# -- frozen parameters, optimizer state, bad input ---------------------------------------------


def test_frozen_parameters_never_move():
    model, x, s = scrambled("mlp")
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    before = output(model, (x,))
    result = gaugefix.equalize_(model, s, "range")
    assert torch.equal(model[2].weight, frozen)
    assert rel_change(before, output(model, (x,))) <= TOL
    assert bool((result.h[:16] == 0).all()) and set(range(16)) <= set(
        result.dead_generators.tolist()
    )


def test_optimizer_state_is_transported_as_apply_gauge_does():
    model, x, s = scrambled("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    output(model, (x,))
    model(x).square().sum().backward()
    opt.step()
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    twin_opt.load_state_dict(opt.state_dict())
    result = gaugefix.equalize_(model, s, "range", optimizer=opt)
    gaugefix.apply_gauge_(twin, s, result.h, optimizer=twin_opt)
    assert same_bits(model, snapshot(twin))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key])


BAD = {
    "unknown objective": ({"objective": "minmax"}, "unknown objective"),
    "alpha above 1": ({"objective": "activation", "alpha": 1.5}, "alpha"),
    "alpha below 0": ({"objective": "activation", "alpha": -0.1}, "alpha"),
    "alpha nan": ({"objective": "activation", "alpha": math.nan}, "alpha"),
    "calibration shape": ({"objective": "activation", "wrong_shape": True}, "calibration"),
    "empty calibration": (
        {"objective": "activation", "calibration": torch.zeros(0, 6, dtype=DTYPE)},
        "^the calibration batch is empty",
    ),
    "no calibration": ({"objective": "activation"}, "calibration"),
    "unknown weights": ({"weights": ["nope.weight"]}, "weights"),
    "non-finite": ({"poison": True}, "NaN or inf"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error_and_changes_nothing(case):
    model, x, s = scrambled("mlp")
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    if kwargs.pop("wrong_shape", False):
        kwargs["calibration"] = torch.randn(4, 7, dtype=DTYPE)
    elif kwargs.get("objective") == "activation" and "alpha" in kwargs:
        kwargs["calibration"] = x
    if kwargs.pop("poison", False):
        with torch.no_grad():
            model[2].weight[0, 0] = math.inf
    state = snapshot(model)
    with pytest.raises(ValueError, match=message) as err:
        gaugefix.equalize_(model, s, **kwargs)
    assert "\n" not in str(err.value)
    assert same_bits(model, state) and not any(m.training for m in model.modules())


def test_weights_may_name_a_frozen_parameter():
    """A frozen weight named in ``weights`` is counted as the default counts it: the generators
    touching it never move."""
    model, x, s = scrambled("mlp")
    model[4].weight.requires_grad_(False)
    twin = copy.deepcopy(model)
    named = gaugefix.equalize_(model, s, "range", weights=["0.weight", "2.weight", "4.weight"])
    default = gaugefix.equalize_(twin, s, "range")
    assert torch.equal(named.h, default.h) and same_bits(model, snapshot(twin))
    assert torch.equal(named.dead_generators, default.dead_generators)


def test_weights_that_are_not_names_are_one_clear_error():
    model, x, s = scrambled("mlp")
    state = snapshot(model)
    with pytest.raises(TypeError, match="weights must be parameter names"):
        gaugefix.equalize_(model, s, "range", weights=3)
    assert same_bits(model, state)


def square_sum(params: dict[str, Tensor]) -> Tensor:
    return sum(t.square().sum() for t in params.values())


BAD_CALLABLES = {
    "detached": lambda p: square_sum(p).detach(),
    "integer": lambda p: torch.tensor(3),
    "complex": lambda p: square_sum(p).to(torch.complex128),
    "constant on the orbit": lambda p: p["4.bias"].square().sum(),
}


@pytest.mark.parametrize("case", list(BAD_CALLABLES))
def test_a_callable_without_a_real_differentiable_value_is_one_clear_error(case):
    model, x, s = scrambled("mlp")
    opt = torch.optim.Adam(model.parameters())
    model(x).square().sum().backward()
    opt.step()
    state, opt_state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="objective must") as err:
        gaugefix.equalize_(model, s, BAD_CALLABLES[case], optimizer=opt, max_iter=20)
    assert "\n" not in str(err.value)
    assert same_bits(model, state)
    now = opt.state_dict()["state"]
    assert now.keys() == opt_state["state"].keys()
    for i, saved in opt_state["state"].items():
        assert all(torch.equal(now[i][k], v) for k, v in saved.items())


def test_a_callable_that_writes_into_its_arguments_does_not_touch_the_model():
    model, x, s = scrambled("mlp")
    bias = model[4].bias.detach().clone()
    before = output(model, (x,))

    def objective(params: dict[str, Tensor]) -> Tensor:
        params["4.bias"].mul_(2.0)  # not a parameter the structure acts on
        return square_sum(params)

    gaugefix.equalize_(model, s, objective, max_iter=20)
    assert torch.equal(model[4].bias, bias)
    assert rel_change(before, output(model, (x,))) <= TOL


def test_a_callable_on_an_all_frozen_model_changes_nothing():
    model, x, s = scrambled("mlp")
    model.requires_grad_(False)
    state = snapshot(model)
    result = gaugefix.equalize_(model, s, square_sum)
    assert same_bits(model, state) and not bool(result.h.any())
    assert result.converged and len(result.dead_generators) == s.num_generators


# -- a callable objective: sharpness ------------------------------------------------------------


def half_squared_error(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).square().sum()


def test_sharpness_gradient_is_the_moment_map_of_the_eigenvector():
    """``dJ/dh`` through the objective's scalar matches central differences of ``J(h)``."""
    torch.manual_seed(0)
    model = zoo.mlp((3, 4, 2)).to(DTYPE)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    objective = gaugefix.sharpness_objective(model, half_squared_error, x, y, tol=1e-13)
    params = s.bind(model)
    base = {n: p.detach() for n, p in model.named_parameters()}

    def value(h: Tensor) -> Tensor:
        return objective({**base, **gaugefix.minimize.rescaled(params, s, h)})

    h = (0.3 * torch.randn(s.num_generators, dtype=DTYPE)).requires_grad_(True)
    (grad,) = torch.autograd.grad(value(h), h)
    step = 1e-5
    for n in range(s.num_generators):
        e = torch.zeros_like(h)
        e[n] = step
        numeric = (float(value(h.detach() + e)) - float(value(h.detach() - e))) / (2 * step)
        assert math.isclose(float(grad[n]), numeric, rel_tol=1e-5, abs_tol=1e-7), n


def test_sharpness_objective_balances_a_product():
    """``f = a b`` fitted to ``y``: the top Hessian eigenvalue at the minimum is ``a^2 + b^2``,
    smallest at ``|a| = |b| = sqrt(y)``, where it is ``2 y``."""
    model = zoo.mlp((1, 1, 1), bias=False).to(DTYPE)
    with torch.no_grad():
        model[0].weight.fill_(4.0)
        model[2].weight.fill_(0.5)
    x, y = torch.ones(1, 1, dtype=DTYPE), torch.full((1, 1), 2.0, dtype=DTYPE)
    s = gaugefix.discover(model, x)
    objective = gaugefix.sharpness_objective(model, half_squared_error, x, y, tol=1e-13)
    result = gaugefix.equalize_(model, s, objective, tol=1e-9, max_iter=100)
    assert result.converged and math.isclose(result.objective_before, 16.25, rel_tol=1e-12)
    assert math.isclose(result.objective_after, 4.0, rel_tol=1e-10)
    assert math.isclose(float(model[0].weight.detach()), math.sqrt(2), rel_tol=1e-8)
    assert math.isclose(float(model[2].weight.detach()), math.sqrt(2), rel_tol=1e-8)


def test_the_code_blocks_of_the_quantization_docs_run():
    text = (Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/quantization.md", "exec"), namespace)
    assert namespace["result"].objective_after < namespace["result"].objective_before
